//! Commands that drive a controller through the userspace driver: identify, read, write,
//! flush, write-zeroes, trim and log.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::identify::{NamespaceInfo, SglSupport};
use rnvme_driver::io::IoQueuePair;
use rnvme_driver::queue::DataPointerMode;
use serde::Serialize;

use super::{outln, UsageError};

/// Bytes moved per step by `read` and `write` (the driver splits further at the max transfer).
const STEP: u64 = 8 << 20;

/// How to reach a controller.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// PCI address of the controller, full form (0000:00:04.0)
    #[arg(value_parser = super::bdf_arg)]
    pub bdf: String,
    /// Take DMA memory from ordinary 4 KiB pages (pinned by VFIO) instead of hugepages
    #[arg(long)]
    pub no_hugepages: bool,
    /// Describe every data buffer with SGLs (the default: PRPs where they need no list, SGLs
    /// where they would, when the controller supports SGLs)
    #[arg(long)]
    pub sgl: bool,
}

impl DeviceArgs {
    /// Open and bring up the controller.
    pub fn open(&self) -> Result<Controller> {
        let backing = if self.no_hugepages {
            Backing::SmallPages
        } else {
            Backing::Hugepages
        };
        let data_pointer = if self.sgl {
            DataPointerMode::Sgl
        } else {
            DataPointerMode::Auto
        };
        Ok(Controller::open(
            &self.bdf,
            ControllerOptions {
                backing,
                data_pointer,
                ..Default::default()
            },
        )?)
    }
}

/// Namespace and LBA range arguments.
#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
    /// First LBA
    #[arg(long)]
    pub lba: Option<u64>,
    /// Number of LBAs
    #[arg(long)]
    pub count: Option<u64>,
}

/// Check a range against the namespace, as a usage error that says what is valid.
fn check_range(ns: &NamespaceInfo, lba: u64, count: u64) -> Result<()> {
    if count == 0 {
        return Err(UsageError("--count must be at least 1".into()).into());
    }
    if lba.checked_add(count).is_none_or(|end| end > ns.size_lbas) {
        return Err(UsageError(format!(
            "LBAs {lba}..{} are beyond namespace {}, which has {} LBAs (0..{})",
            lba.saturating_add(count),
            ns.nsid,
            ns.size_lbas,
            ns.size_lbas
        ))
        .into());
    }
    Ok(())
}

fn namespace(ctrl: &Controller, nsid: u32) -> Result<NamespaceInfo> {
    ctrl.namespace(nsid)
        .cloned()
        .map_err(|e| UsageError(e.to_string()).into())
}

fn qpair(ctrl: &Controller) -> Result<IoQueuePair> {
    Ok(ctrl.create_io_qpair(ctrl.max_queue_entries().min(64))?)
}

/// `rnvme identify`
#[derive(Args, Debug)]
pub struct IdentifyArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct IdentifyJson {
    bdf: String,
    vendor_id: u16,
    subsystem_vendor_id: u16,
    serial: String,
    model: String,
    firmware: String,
    mdts: u8,
    mdts_bytes: Option<u64>,
    max_transfer_bytes: u32,
    cntlid: u16,
    version: String,
    nn: u32,
    max_queue_entries: u32,
    io_queues_granted: u16,
    sqes: u8,
    cqes: u8,
    oncs: u16,
    compare: bool,
    dataset_management: bool,
    write_zeroes: bool,
    volatile_write_cache: bool,
    sgl: &'static str,
    namespaces: Vec<NamespaceJson>,
}

#[derive(Serialize)]
struct NamespaceJson {
    nsid: u32,
    size_lbas: u64,
    capacity_lbas: u64,
    utilization_lbas: u64,
    lba_size: u32,
    metadata_size: u16,
    flbas: u8,
    size_bytes: u64,
}

pub fn identify(a: IdentifyArgs) -> Result<ExitCode> {
    let ctrl = a.dev.open()?;
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

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn human(bytes: u64) -> String {
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

/// `rnvme read`
#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Write the data to this file instead of standard output
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn read(a: ReadArgs) -> Result<ExitCode> {
    let (Some(lba), Some(count)) = (a.range.lba, a.range.count) else {
        return Err(UsageError("read needs --lba and --count".into()).into());
    };
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.range.nsid)?;
    check_range(&ns, lba, count)?;
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => {
            Box::new(File::create(p).with_context(|| format!("cannot create {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let write_error = |e: std::io::Error| match &a.out {
        Some(p) => anyhow::Error::new(e).context(format!("cannot write {}", p.display())),
        None => super::stdout_error(e),
    };
    let mut qp = qpair(&ctrl)?;
    let lba_size = ns.lba_size as u64;
    let per_step = (STEP / lba_size).max(1);
    let buf = ctrl.alloc((per_step * lba_size) as usize)?;
    let mut host = vec![0u8; buf.len()];
    let mut done = 0;
    while done < count {
        let n = per_step.min(count - done);
        qp.read(ns.nsid, lba + done, n, &buf)?;
        let bytes = (n * lba_size) as usize;
        buf.read_bytes(0, &mut host[..bytes]);
        out.write_all(&host[..bytes]).map_err(write_error)?;
        done += n;
    }
    out.flush().map_err(write_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `rnvme write`
#[derive(Args, Debug)]
pub struct WriteArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
    /// First LBA
    #[arg(long)]
    pub lba: u64,
    /// Read the data from this file instead of standard input
    #[arg(long = "in")]
    pub input: Option<PathBuf>,
    /// Force Unit Access: the data is on stable media when each write completes
    #[arg(long)]
    pub fua: bool,
}

pub fn write(a: WriteArgs) -> Result<ExitCode> {
    // Read all the input first: a length that is not a multiple of the LBA size must be
    // refused before anything is written.
    let data = match &a.input {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => {
            let mut v = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut v)
                .context("cannot read standard input")?;
            v
        }
    };
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.nsid)?;
    let lba_size = ns.lba_size as u64;
    let len = data.len() as u64;
    if len == 0 || !len.is_multiple_of(lba_size) {
        return Err(UsageError(format!(
            "the input is {len} bytes, not a positive multiple of the namespace's {lba_size}-byte LBA size; nothing was written"
        ))
        .into());
    }
    let count = len / lba_size;
    check_range(&ns, a.lba, count)?;
    let mut qp = qpair(&ctrl)?;
    let per_step = (STEP / lba_size).max(1);
    let buf = ctrl.alloc((per_step * lba_size).min(len) as usize)?;
    let mut done = 0;
    while done < count {
        let n = per_step.min(count - done);
        let off = (done * lba_size) as usize;
        buf.write_bytes(0, &data[off..off + (n * lba_size) as usize]);
        qp.write(ns.nsid, a.lba + done, n, &buf, a.fua)?;
        done += n;
    }
    eprintln!(
        "wrote {count} LBAs ({len} bytes) at LBA {} of namespace {}",
        a.lba, ns.nsid
    );
    Ok(ExitCode::SUCCESS)
}

/// `rnvme flush`
#[derive(Args, Debug)]
pub struct FlushArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
}

pub fn flush(a: FlushArgs) -> Result<ExitCode> {
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.nsid)?;
    qpair(&ctrl)?.flush(ns.nsid)?;
    eprintln!("flushed namespace {}", ns.nsid);
    Ok(ExitCode::SUCCESS)
}

/// `rnvme write-zeroes` and `rnvme trim`
#[derive(Args, Debug)]
pub struct ZeroArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// The whole namespace (instead of --lba and --count)
    #[arg(long)]
    pub all: bool,
}

/// Which of the two range commands.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RangeOp {
    WriteZeroes,
    Trim,
}

impl RangeOp {
    fn name(self) -> &'static str {
        match self {
            RangeOp::WriteZeroes => "write-zeroes",
            RangeOp::Trim => "trim",
        }
    }
}

/// The range a write-zeroes or trim asks for: `Some((lba, count))`, or `None` for the whole
/// namespace (`--all`). Both destroy data, so neither is assumed: the range is given in full
/// or `--all` is.
fn requested_range(a: &ZeroArgs, op: RangeOp) -> Result<Option<(u64, u64)>> {
    let name = op.name();
    match (a.all, a.range.lba, a.range.count) {
        (true, None, None) => Ok(None),
        (true, _, _) => Err(UsageError(format!(
            "{name}: --all is the whole namespace; give either --all or --lba and --count, not both"
        ))
        .into()),
        (false, Some(lba), Some(count)) => Ok(Some((lba, count))),
        (false, None, None) => Err(UsageError(format!(
            "{name} needs a range: add --lba L --count C, or --all for the whole namespace"
        ))
        .into()),
        (false, _, _) => Err(UsageError(format!(
            "{name} needs both --lba and --count (or --all for the whole namespace)"
        ))
        .into()),
    }
}

pub fn range_op(a: ZeroArgs, op: RangeOp) -> Result<ExitCode> {
    let range = requested_range(&a, op)?;
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.range.nsid)?;
    let (lba, count) = range.unwrap_or((0, ns.size_lbas));
    check_range(&ns, lba, count)?;
    let mut qp = qpair(&ctrl)?;
    let info = ctrl.info();
    match op {
        RangeOp::WriteZeroes => {
            if !info.supports_write_zeroes() {
                anyhow::bail!(
                    "{}: the controller does not support Write Zeroes",
                    ctrl.name()
                );
            }
            qp.write_zeroes(ns.nsid, lba, count)?;
            eprintln!("zeroed {count} LBAs at LBA {lba} of namespace {}", ns.nsid);
        }
        RangeOp::Trim => {
            if !info.supports_dsm() {
                anyhow::bail!(
                    "{}: the controller does not support Dataset Management (deallocate)",
                    ctrl.name()
                );
            }
            qp.deallocate(ns.nsid, lba, count)?;
            eprintln!(
                "deallocated {count} LBAs at LBA {lba} of namespace {}",
                ns.nsid
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Which log page.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogKind {
    /// SMART / health information
    Smart,
    /// Error information
    Errors,
}

/// `rnvme log`
#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Which log page
    #[arg(value_enum)]
    pub kind: LogKind,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

pub fn log(a: LogArgs) -> Result<ExitCode> {
    let ctrl = a.dev.open()?;
    match a.kind {
        LogKind::Smart => {
            let s = ctrl.smart_log()?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&s)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            outln!("SMART / health log of {}", ctrl.name())?;
            outln!("  critical warning        {:#04x}", s.critical_warning)?;
            outln!(
                "  temperature             {} °C ({} K)",
                s.temperature_celsius(),
                s.temperature_kelvin
            )?;
            outln!(
                "  available spare         {} % (threshold {} %)",
                s.available_spare,
                s.available_spare_threshold
            )?;
            outln!("  percentage used         {} %", s.percentage_used)?;
            outln!(
                "  data units read         {} (× 512 000 bytes)",
                s.data_units_read
            )?;
            outln!(
                "  data units written      {} (× 512 000 bytes)",
                s.data_units_written
            )?;
            outln!("  host read commands      {}", s.host_read_commands)?;
            outln!("  host write commands     {}", s.host_write_commands)?;
            outln!("  controller busy time    {} min", s.controller_busy_time)?;
            outln!("  power cycles            {}", s.power_cycles)?;
            outln!("  power on hours          {}", s.power_on_hours)?;
            outln!("  unsafe shutdowns        {}", s.unsafe_shutdowns)?;
            outln!("  media errors            {}", s.media_errors)?;
            outln!("  error log entries       {}", s.num_err_log_entries)?;
        }
        LogKind::Errors => {
            let entries = ctrl.error_log()?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&entries)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            if entries.is_empty() {
                outln!("error log of {}: no entries", ctrl.name())?;
            }
            for e in entries {
                outln!(
                    "error #{}: sq {} cid {} nsid {} lba {}: {}",
                    e.error_count,
                    e.sqid,
                    e.cid,
                    e.nsid,
                    e.lba,
                    e.status
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
