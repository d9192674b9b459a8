//! `rnvme identify`: the controller's and namespaces' identify data, as text or nvme-cli JSON.

use super::*;

/// `rnvme identify`
#[derive(Args, Debug)]
#[command(after_help = "\
-o json prints what `nvme id-ctrl -o json` prints (nvme-cli's keys, shapes and values), or with \
--ns what `nvme id-ns -o json` prints for that namespace. --json prints rnvme's own summary.")]
pub struct IdentifyArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Print rnvme's JSON: the controller and every namespace
    #[arg(long)]
    pub json: bool,
    /// normal, or json for nvme-cli's JSON (id-ctrl, or id-ns with --ns)
    #[arg(
        short = 'o',
        long = "output-format",
        value_enum,
        default_value_t,
        conflicts_with = "json"
    )]
    pub output_format: OutputFormat,
    /// Only this namespace (with -o json: its Identify Namespace data)
    #[arg(short = 'n', long = "ns", value_name = "NSID")]
    pub nsid: Option<u32>,
}

/// An Identify data structure (`cns`) as the controller returns it.
pub(super) fn identify_raw(
    ctrl: &Controller,
    cns: u32,
    nsid: u32,
    what: &'static str,
) -> Result<Vec<u8>> {
    let buf = ctrl.alloc(nvmecli::IDENTIFY_LEN)?;
    let mut c = SqEntry::new(admin_op::IDENTIFY, nsid);
    c.cdw10 = cns;
    ctrl.admin(c, Some(&buf), what)?;
    Ok(buf.to_vec())
}

#[derive(Serialize)]
pub(super) struct IdentifyJson {
    pub(super) bdf: String,
    pub(super) vendor_id: u16,
    pub(super) subsystem_vendor_id: u16,
    pub(super) serial: String,
    pub(super) model: String,
    pub(super) firmware: String,
    pub(super) mdts: u8,
    pub(super) mdts_bytes: Option<u64>,
    pub(super) max_transfer_bytes: u32,
    pub(super) cntlid: u16,
    pub(super) version: String,
    pub(super) nn: u32,
    pub(super) max_queue_entries: u32,
    pub(super) io_queues_granted: u16,
    pub(super) sqes: u8,
    pub(super) cqes: u8,
    pub(super) oncs: u16,
    pub(super) compare: bool,
    pub(super) dataset_management: bool,
    pub(super) write_zeroes: bool,
    pub(super) volatile_write_cache: bool,
    pub(super) sgl: &'static str,
    pub(super) namespaces: Vec<NamespaceJson>,
}

#[derive(Serialize)]
pub(super) struct NamespaceJson {
    pub(super) nsid: u32,
    pub(super) size_lbas: u64,
    pub(super) capacity_lbas: u64,
    pub(super) utilization_lbas: u64,
    pub(super) lba_size: u32,
    pub(super) metadata_size: u16,
    pub(super) flbas: u8,
    pub(super) size_bytes: u64,
}

pub fn identify(a: IdentifyArgs) -> Result<ExitCode> {
    let ctrl = a.dev.open()?;
    if let Some(nsid) = a.nsid {
        namespace(&ctrl, nsid)?;
    }
    if a.output_format == OutputFormat::Json {
        let v = match a.nsid {
            Some(nsid) => nvmecli::id_ns(&identify_raw(
                &ctrl,
                cns::NAMESPACE,
                nsid,
                "Identify Namespace",
            )?),
            None => nvmecli::id_ctrl(&identify_raw(
                &ctrl,
                cns::CONTROLLER,
                0,
                "Identify Controller",
            )?),
        };
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let i = ctrl.info();
    let v = IdentifyJson {
        bdf: ctrl.name().to_string(),
        vendor_id: i.vid,
        subsystem_vendor_id: i.ssvid,
        serial: i.serial.clone(),
        model: i.model.clone(),
        firmware: i.firmware.clone(),
        mdts: i.mdts,
        mdts_bytes: i.max_transfer_bytes(ctrl.cap().mpsmin()),
        max_transfer_bytes: ctrl.max_transfer_bytes(),
        cntlid: i.cntlid,
        version: format!(
            "{}.{}.{}",
            i.version >> 16,
            (i.version >> 8) & 0xff,
            i.version & 0xff
        ),
        nn: i.nn,
        max_queue_entries: ctrl.max_queue_entries(),
        io_queues_granted: ctrl.io_queues_granted(),
        sqes: i.sqes,
        cqes: i.cqes,
        oncs: i.oncs,
        compare: i.supports_compare(),
        dataset_management: i.supports_dsm(),
        write_zeroes: i.supports_write_zeroes(),
        volatile_write_cache: i.has_volatile_write_cache(),
        sgl: match i.sgl_support() {
            SglSupport::None => "no",
            SglSupport::Supported => "yes",
            SglSupport::DwordAligned => "yes (dword aligned)",
        },
        namespaces: ctrl
            .namespaces()
            .iter()
            .filter(|n| a.nsid.is_none_or(|id| id == n.nsid))
            .map(|n| NamespaceJson {
                nsid: n.nsid,
                size_lbas: n.size_lbas,
                capacity_lbas: n.capacity_lbas,
                utilization_lbas: n.utilization_lbas,
                lba_size: n.lba_size,
                metadata_size: n.metadata_size,
                flbas: n.flbas,
                size_bytes: n.size_bytes(),
            })
            .collect(),
    };
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("controller {}", v.bdf)?;
    outln!(
        "  vendor           {:04x} (subsystem {:04x})",
        v.vendor_id,
        v.subsystem_vendor_id
    )?;
    outln!("  serial           {}", v.serial)?;
    outln!("  model            {}", v.model)?;
    outln!("  firmware         {}", v.firmware)?;
    outln!("  version          {}", v.version)?;
    match v.mdts_bytes {
        Some(b) => outln!("  max transfer     {b} bytes (MDTS {})", v.mdts),
        None => outln!(
            "  max transfer     no limit (MDTS 0); rnvme uses {} bytes",
            v.max_transfer_bytes
        ),
    }?;
    outln!("  namespaces       {} (nn)", v.nn)?;
    outln!(
        "  queues           {} I/O queue pairs granted, up to {} entries each",
        v.io_queues_granted,
        v.max_queue_entries
    )?;
    outln!(
        "  features         compare: {}, dataset management: {}, write zeroes: {}, volatile write cache: {}, SGL: {}",
        yes(v.compare),
        yes(v.dataset_management),
        yes(v.write_zeroes),
        yes(v.volatile_write_cache),
        v.sgl
    )?;
    for n in &v.namespaces {
        outln!(
            "namespace {}: {} LBAs of {} bytes ({}), capacity {} LBAs, metadata {} bytes",
            n.nsid,
            n.size_lbas,
            n.lba_size,
            human(n.size_bytes),
            n.capacity_lbas,
            n.metadata_size
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub(super) fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
