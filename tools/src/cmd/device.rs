//! Commands that drive a controller through the userspace driver: identify, read, write,
//! flush, write-zeroes, trim and log.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::identify::{NamespaceInfo, SglSupport};
use rnvme_driver::io::IoQueuePair;
use rnvme_driver::queue::DataPointerMode;
use rnvme_driver::spec::{admin_op, cns, log_page, SqEntry};
use rnvme_tools::nvmecli;
use serde::Serialize;

use super::{outln, OutputFormat, UsageError};

/// Bytes moved per step by `read` (the driver splits further at the max transfer; `write`
/// streams pieces of the max transfer).
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

/// Namespace and LBA range arguments, in rnvme's spelling and in nvme-cli's.
#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Namespace id
    #[arg(
        short = 'n',
        long = "ns",
        visible_alias = "namespace-id",
        default_value_t = 1
    )]
    pub nsid: u32,
    /// First LBA
    #[arg(short = 's', long, visible_alias = "start-block")]
    pub lba: Option<u64>,
    /// Number of LBAs
    #[arg(long, conflicts_with = "block_count")]
    pub count: Option<u64>,
    /// Number of LBAs less one, as nvme-cli counts (-c 7 is 8 LBAs)
    #[arg(short = 'c', long = "block-count", value_name = "N")]
    pub block_count: Option<u64>,
}

impl RangeArgs {
    /// The number of LBAs, from --count or the zero-based --block-count.
    pub fn count(&self) -> Result<Option<u64>> {
        match (self.count, self.block_count) {
            (_, Some(c)) => c
                .checked_add(1)
                .map(Some)
                .ok_or_else(|| UsageError(format!("--block-count {c} is too large")).into()),
            (c, None) => Ok(c),
        }
    }
}

/// The number of LBAs of a read or write: `count` (from --count or --block-count), or
/// `data_size` (nvme-cli's --data-size, bytes) over `per_lba` bytes per LBA; when both are
/// given they must agree.
fn resolve_count(count: Option<u64>, data_size: Option<u64>, per_lba: u64) -> Result<Option<u64>> {
    let Some(bytes) = data_size else {
        return Ok(count);
    };
    if bytes == 0 || !bytes.is_multiple_of(per_lba) {
        return Err(UsageError(format!(
            "--data-size {bytes} is not a positive multiple of the namespace's {per_lba}-byte LBAs"
        ))
        .into());
    }
    let lbas = bytes / per_lba;
    match count {
        Some(c) if c != lbas => Err(UsageError(format!(
            "--data-size {bytes} is {lbas} LBAs of {per_lba} bytes, but the count asks for {c} \
             (--block-count is the count less one)"
        ))
        .into()),
        _ => Ok(Some(lbas)),
    }
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
fn identify_raw(ctrl: &Controller, cns: u32, nsid: u32, what: &'static str) -> Result<Vec<u8>> {
    let buf = ctrl.alloc(nvmecli::IDENTIFY_LEN)?;
    let mut c = SqEntry::new(admin_op::IDENTIFY, nsid);
    c.cdw10 = cns;
    ctrl.admin(c, Some(&buf), what)?;
    Ok(buf.to_vec())
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
    /// Bytes to read, a multiple of the LBA size (nvme-cli's data size; instead of a count)
    #[arg(short = 'z', long = "data-size", value_name = "BYTES")]
    pub data_size: Option<u64>,
    /// Write the data to this file instead of standard output
    #[arg(short = 'd', long, visible_alias = "data")]
    pub out: Option<PathBuf>,
    /// Write the metadata to this file (namespaces that keep it in a separate buffer; on an
    /// extended-LBA format it is part of each block of the data)
    #[arg(long)]
    pub metadata: Option<PathBuf>,
}

pub fn read(a: ReadArgs) -> Result<ExitCode> {
    let wanted = a.range.count()?;
    let (Some(lba), true) = (a.range.lba, wanted.is_some() || a.data_size.is_some()) else {
        return Err(UsageError(
            "read needs --lba and --count (or nvme-cli's -s, and -c or -z)".into(),
        )
        .into());
    };
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.range.nsid)?;
    let per_lba = ns
        .layout()
        .map_or(u64::from(ns.lba_size), |l| u64::from(l.data_per_lba));
    let count = resolve_count(wanted, a.data_size, per_lba)?.unwrap_or(0);
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
    let layout = qp.layout(ns.nsid)?;
    let mut meta_out = metadata_file(&ns, layout.metadata_per_lba, a.metadata.as_deref(), true)?;
    let lba_size = layout.data_per_lba as u64;
    let ms = layout.metadata_per_lba as u64;
    let per_step = (STEP / lba_size).max(1);
    let buf = ctrl.alloc((per_step * lba_size) as usize)?;
    let meta = match ms {
        0 => None,
        _ => Some(ctrl.alloc((per_step * ms) as usize)?),
    };
    let mut host = vec![0u8; buf.len()];
    let mut done = 0;
    while done < count {
        let n = per_step.min(count - done);
        match &meta {
            Some(m) => qp.read_with_metadata(ns.nsid, lba + done, n, &buf, m)?,
            None => qp.read(ns.nsid, lba + done, n, &buf)?,
        }
        let bytes = (n * lba_size) as usize;
        buf.read_bytes(0, &mut host[..bytes]);
        out.write_all(&host[..bytes]).map_err(write_error)?;
        if let (Some(m), Some((f, path))) = (&meta, meta_out.as_mut()) {
            let mut mhost = vec![0u8; (n * ms) as usize];
            m.read_bytes(0, &mut mhost);
            f.write_all(&mhost)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        done += n;
    }
    out.flush().map_err(write_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `rnvme write`
#[derive(Args, Debug)]
#[command(after_help = "\
The input is written as it is read, one piece of the controller's largest transfer at a time. \
Its length must be a positive multiple of the LBA size and fit in the namespace: a file (--in) \
is checked before anything is written. Standard input cannot be: when it turns out not to be a \
multiple of the LBA size, its last piece is not written; when it reaches past the end of the \
namespace, it is written up to the end. Either way the pieces before are on the device, and the \
error says which LBAs were written (exit status 2).")]
pub struct WriteArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Namespace id
    #[arg(
        short = 'n',
        long = "ns",
        visible_alias = "namespace-id",
        default_value_t = 1
    )]
    pub nsid: u32,
    /// First LBA
    #[arg(short = 's', long, visible_alias = "start-block")]
    pub lba: Option<u64>,
    /// Number of LBAs less one, as nvme-cli counts: the input must hold that many LBAs, and
    /// only they are written
    #[arg(short = 'c', long = "block-count", value_name = "N")]
    pub block_count: Option<u64>,
    /// Bytes to write, a multiple of the LBA size (nvme-cli's data size): the input must hold
    /// that many, and only they are written
    #[arg(short = 'z', long = "data-size", value_name = "BYTES")]
    pub data_size: Option<u64>,
    /// Read the data from this file instead of standard input
    #[arg(short = 'd', long = "in", visible_alias = "data")]
    pub input: Option<PathBuf>,
    /// Force Unit Access: the data is on stable media when each write completes
    #[arg(long)]
    pub fua: bool,
    /// Read the metadata from this file (namespaces that keep it in a separate buffer: it
    /// must hold the metadata of every LBA written; on an extended-LBA format it is part of
    /// each block of the data)
    #[arg(long)]
    pub metadata: Option<PathBuf>,
}

/// The `--metadata` file of `read` (`create`) or `write`, checked against the namespace: one
/// is needed exactly when the namespace keeps `ms` bytes of metadata per LBA in a separate
/// buffer.
fn metadata_file(
    ns: &NamespaceInfo,
    ms: u32,
    path: Option<&Path>,
    create: bool,
) -> Result<Option<(File, PathBuf)>> {
    match (ms, path) {
        (0, None) => Ok(None),
        (0, Some(_)) => Err(UsageError(format!(
            "namespace {} keeps no metadata in a separate buffer ({} bytes per LBA{}): drop \
             --metadata",
            ns.nsid,
            ns.metadata_size,
            if ns.metadata_size > 0 {
                ", moved with the data or inserted by the controller"
            } else {
                ""
            }
        ))
        .into()),
        (_, None) => Err(UsageError(format!(
            "namespace {} keeps {ms} bytes of metadata per LBA in a separate buffer: give \
             --metadata FILE",
            ns.nsid
        ))
        .into()),
        (_, Some(p)) => {
            let f = if create {
                File::create(p)
            } else {
                File::open(p)
            }
            .with_context(|| format!("cannot open {}", p.display()))?;
            Ok(Some((f, p.to_path_buf())))
        }
    }
}

/// The input of `rnvme write`.
struct Input {
    reader: Box<dyn Read>,
    /// What to call it in an error.
    name: String,
    /// Its length, when it is known before reading (a regular file).
    len: Option<u64>,
}

impl Input {
    fn open(path: Option<&Path>) -> Result<Input> {
        let Some(p) = path else {
            return Ok(Input {
                reader: Box::new(std::io::stdin().lock()),
                name: "standard input".into(),
                len: None,
            });
        };
        let f = File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        let meta = f
            .metadata()
            .with_context(|| format!("cannot read {}", p.display()))?;
        // A pipe or a device has no length up front: it is read like standard input.
        let len = meta.is_file().then_some(meta.len());
        Ok(Input {
            // Never more than was checked, should the file grow meanwhile.
            reader: Box::new(f.take(len.unwrap_or(u64::MAX))),
            name: p.display().to_string(),
            len,
        })
    }
}

impl Input {
    /// Reads no more than `bytes`; a file must hold that many (checked before anything is
    /// written).
    fn limit(&mut self, bytes: u64) -> Result<()> {
        if let Some(len) = self.len {
            if len < bytes {
                return Err(UsageError(format!(
                    "{} holds {len} bytes, fewer than the {bytes} asked for; nothing was written",
                    self.name
                ))
                .into());
            }
            self.len = Some(bytes);
        }
        let reader = std::mem::replace(&mut self.reader, Box::new(std::io::empty()));
        self.reader = Box::new(reader.take(bytes));
        Ok(())
    }
}

/// Read until `buf` is full or the input ends; the number of bytes read.
fn fill(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a streamed write left on the device when it stopped: `done` LBAs from `start`.
fn written(start: u64, done: u64) -> String {
    if done == 0 {
        "nothing was written".into()
    } else {
        format!(
            "its first {done} LBAs were written (LBAs {start}..{}), the rest was not",
            start + done
        )
    }
}

/// Writes `input` at LBA `start` of `ns`, one piece at a time: each piece is read into `piece`
/// (a whole number of LBAs; filled unless the input ends) and handed to `write` with its first
/// LBA. A last piece that is not a multiple of the LBA size is not written; a piece that reaches
/// past the end of the namespace is written up to the end. Both end the stream with a usage
/// error that says which LBAs were written. Returns the number of LBAs written.
fn write_stream(
    input: &mut Input,
    (ns, lba_size): (&NamespaceInfo, u64),
    start: u64,
    piece: &mut [u8],
    write: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    debug_assert!(!piece.is_empty() && (piece.len() as u64).is_multiple_of(lba_size));
    let mut done = 0u64;
    loop {
        let n = fill(&mut input.reader, piece).with_context(|| {
            if done == 0 {
                format!("cannot read {}", input.name)
            } else {
                format!("cannot read {}; {}", input.name, written(start, done))
            }
        })?;
        if n == 0 {
            break;
        }
        let bytes = n as u64;
        if !bytes.is_multiple_of(lba_size) {
            return Err(UsageError(format!(
                "the input is {} bytes, not a positive multiple of the namespace's {lba_size}-byte LBA size; {}",
                done * lba_size + bytes,
                written(start, done)
            ))
            .into());
        }
        let at = start + done;
        let lbas = bytes / lba_size;
        let room = ns.size_lbas.saturating_sub(at);
        let now = lbas.min(room);
        if now > 0 {
            write(at, &piece[..(now * lba_size) as usize]).with_context(|| {
                if done == 0 {
                    format!("write LBAs {at}..{}", at + now)
                } else {
                    format!(
                        "write LBAs {at}..{} (LBAs {start}..{at} are written)",
                        at + now
                    )
                }
            })?;
            done += now;
        }
        if lbas > room {
            return Err(UsageError(format!(
                "the input goes beyond namespace {}, which has {} LBAs (0..{}); {}",
                ns.nsid,
                ns.size_lbas,
                ns.size_lbas,
                written(start, done)
            ))
            .into());
        }
        if n < piece.len() {
            break;
        }
    }
    if done == 0 {
        return Err(UsageError(format!(
            "the input is 0 bytes, not a positive multiple of the namespace's {lba_size}-byte LBA size; nothing was written"
        ))
        .into());
    }
    Ok(done)
}

pub fn write(a: WriteArgs) -> Result<ExitCode> {
    let Some(start) = a.lba else {
        return Err(UsageError("write needs --lba (or nvme-cli's -s)".into()).into());
    };
    let mut input = Input::open(a.input.as_deref())?;
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.nsid)?;
    let mut qp = qpair(&ctrl)?;
    let layout = qp.layout(ns.nsid)?;
    let lba_size = layout.data_per_lba as u64;
    let ms = layout.metadata_per_lba as u64;
    let counted = RangeArgs {
        nsid: a.nsid,
        lba: a.lba,
        count: None,
        block_count: a.block_count,
    }
    .count()?;
    let expected = resolve_count(counted, a.data_size, lba_size)?;
    if let Some(n) = expected {
        input.limit(n * lba_size)?;
    }
    let mut meta_in = metadata_file(&ns, layout.metadata_per_lba, a.metadata.as_deref(), false)?;
    if let (Some((f, p)), Some(len)) = (meta_in.as_ref(), input.len) {
        let have = f
            .metadata()
            .with_context(|| format!("cannot read {}", p.display()))?
            .len();
        let want = len / lba_size * ms;
        if have < want {
            return Err(UsageError(format!(
                "{} holds {have} bytes of metadata; the {} LBAs of the input need {want}; \
                 nothing was written",
                p.display(),
                len / lba_size
            ))
            .into());
        }
    }
    match input.len {
        // A length known up front is checked before anything is written.
        Some(len) => {
            if len == 0 || !len.is_multiple_of(lba_size) {
                return Err(UsageError(format!(
                    "the input is {len} bytes, not a positive multiple of the namespace's {lba_size}-byte LBA size; nothing was written"
                ))
                .into());
            }
            check_range(&ns, start, len / lba_size)?;
        }
        None => check_range(&ns, start, 1)?,
    }
    // One DMA buffer of the largest transfer: one command per piece.
    let per_piece = (qp.max_transfer_for(layout.data_per_lba) as u64 / lba_size).max(1);
    let piece_bytes = per_piece * lba_size;
    let piece_bytes = input.len.map_or(piece_bytes, |len| len.min(piece_bytes)) as usize;
    let buf = ctrl.alloc(piece_bytes)?;
    let meta = match ms {
        0 => None,
        _ => Some(ctrl.alloc((piece_bytes as u64 / lba_size * ms) as usize)?),
    };
    let mut host = vec![0u8; piece_bytes];
    let count = write_stream(
        &mut input,
        (&ns, lba_size),
        start,
        &mut host,
        &mut |at, data| {
            let lbas = data.len() as u64 / lba_size;
            buf.write_bytes(0, data);
            match (&meta, meta_in.as_mut()) {
                (Some(m), Some((f, p))) => {
                    let mut mhost = vec![0u8; (lbas * ms) as usize];
                    f.read_exact(&mut mhost).with_context(|| {
                        format!(
                            "{} ends before the metadata of LBA {}",
                            p.display(),
                            at + lbas - 1
                        )
                    })?;
                    m.write_bytes(0, &mhost);
                    qp.write_with_metadata(ns.nsid, at, lbas, (&buf, m), a.fua)?;
                }
                _ => qp.write(ns.nsid, at, lbas, &buf, a.fua)?,
            }
            Ok(())
        },
    )?;
    if let Some(n) = expected.filter(|&n| count < n) {
        return Err(UsageError(format!(
            "{} ended after {count} of the {n} LBAs asked for; {}",
            input.name,
            written(start, count)
        ))
        .into());
    }
    eprintln!(
        "wrote {count} LBAs ({} bytes) at LBA {start} of namespace {}",
        count * lba_size,
        ns.nsid
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
    match (a.all, a.range.lba, a.range.count()?) {
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
#[command(after_help = "\
-o json prints what `nvme smart-log -o json` or `nvme error-log -o json` prints (nvme-cli's keys \
and shapes; the error log with every entry the controller keeps, up to 64, empty ones too). \
--json prints rnvme's own decoding.")]
pub struct LogArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Which log page
    #[arg(value_enum)]
    pub kind: LogKind,
    /// Print rnvme's JSON
    #[arg(long)]
    pub json: bool,
    /// normal, or json for nvme-cli's JSON (smart-log, error-log)
    #[arg(
        short = 'o',
        long = "output-format",
        value_enum,
        default_value_t,
        conflicts_with = "json"
    )]
    pub output_format: OutputFormat,
}

pub fn log(a: LogArgs) -> Result<ExitCode> {
    let ctrl = a.dev.open()?;
    if a.output_format == OutputFormat::Json {
        let v = match a.kind {
            // The controller's log, as `nvme smart-log` asks for it (all namespaces).
            LogKind::Smart => nvmecli::smart_log(&ctrl.get_log_page(
                log_page::SMART,
                u32::MAX,
                nvmecli::SMART_LEN,
            )?),
            LogKind::Errors => {
                let entries = nvmecli::error_log_entries(ctrl.info().elpe);
                nvmecli::error_log(&ctrl.get_log_page(
                    log_page::ERROR,
                    0,
                    entries * nvmecli::ERROR_ENTRY_LEN,
                )?)
            }
        };
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const LBA: u32 = 512;

    fn ns(size_lbas: u64) -> NamespaceInfo {
        NamespaceInfo {
            nsid: 1,
            size_lbas,
            capacity_lbas: size_lbas,
            utilization_lbas: 0,
            flbas: 0,
            lba_formats: Vec::new(),
            lba_size: LBA,
            metadata_size: 0,
            nsfeat: 0,
            dps: 0,
            nguid: [0; 16],
            eui64: [0; 8],
        }
    }

    /// A reader that hands out at most `chunk` bytes per read, then fails if `fail_at` is
    /// reached.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        fail_at: Option<usize>,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.fail_at.is_some_and(|f| self.at >= f) {
                return Err(std::io::Error::other("the pipe broke"));
            }
            let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    fn stdin_of(data: Vec<u8>, chunk: usize, fail_at: Option<usize>) -> Input {
        Input {
            reader: Box::new(Trickle {
                data,
                at: 0,
                chunk,
                fail_at,
            }),
            name: "standard input".into(),
            len: None,
        }
    }

    /// A namespace of `size` LBAs in memory, and the writes it received as (LBA, LBAs).
    struct Disk {
        bytes: Vec<u8>,
        writes: Vec<(u64, u64)>,
    }

    /// Streams `input` to a fresh disk of `size` LBAs at `start`, in pieces of `piece_lbas`.
    fn stream(mut input: Input, size: u64, start: u64, piece_lbas: usize) -> (Result<u64>, Disk) {
        let mut disk = Disk {
            bytes: vec![0; size as usize * LBA as usize],
            writes: Vec::new(),
        };
        let mut piece = vec![0u8; piece_lbas * LBA as usize];
        let r = write_stream(
            &mut input,
            (&ns(size), LBA as u64),
            start,
            &mut piece,
            &mut |at, d| {
                assert!(d.len() <= piece_lbas * LBA as usize && d.len() % LBA as usize == 0);
                let off = at as usize * LBA as usize;
                disk.bytes[off..off + d.len()].copy_from_slice(d);
                disk.writes.push((at, d.len() as u64 / LBA as u64));
                Ok(())
            },
        );
        (r, disk)
    }

    fn usage_message(r: Result<u64>) -> String {
        let e = r.expect_err("a refusal");
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e:#}");
        crate::cmd::error_line(&e)
    }

    #[test]
    fn input_is_written_piece_by_piece_at_the_next_lba() {
        // 3.5 pieces of 4 LBAs, read 300 bytes at a time.
        let d = data(14 * LBA as usize);
        let (r, disk) = stream(stdin_of(d.clone(), 300, None), 64, 10, 4);
        assert_eq!(r.unwrap(), 14);
        assert_eq!(disk.writes, [(10, 4), (14, 4), (18, 4), (22, 2)]);
        assert_eq!(&disk.bytes[10 * 512..24 * 512], &d[..]);
        assert!(disk.bytes[..10 * 512].iter().all(|&b| b == 0));
        assert!(disk.bytes[24 * 512..].iter().all(|&b| b == 0));
        // Up to the last LBA exactly.
        let (r, disk) = stream(stdin_of(d.clone(), 4096, None), 24, 10, 4);
        assert_eq!(r.unwrap(), 14);
        assert_eq!(&disk.bytes[10 * 512..], &d[..]);
    }

    #[test]
    fn a_last_piece_that_is_not_whole_lbas_is_not_written_and_the_error_says_what_was() {
        let (r, disk) = stream(stdin_of(data(8 * 512 + 700), 1000, None), 64, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input is 4796 bytes, not a positive multiple of the namespace's 512-byte LBA size; \
             its first 8 LBAs were written (LBAs 10..18), the rest was not"
        );
        assert_eq!(disk.writes, [(10, 4), (14, 4)]);
        assert!(disk.bytes[18 * 512..].iter().all(|&b| b == 0));

        let (r, disk) = stream(stdin_of(data(700), 1000, None), 64, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input is 700 bytes, not a positive multiple of the namespace's 512-byte LBA size; \
             nothing was written"
        );
        assert!(disk.writes.is_empty());

        let (r, disk) = stream(stdin_of(Vec::new(), 1000, None), 64, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input is 0 bytes, not a positive multiple of the namespace's 512-byte LBA size; \
             nothing was written"
        );
        assert!(disk.writes.is_empty());
    }

    #[test]
    fn input_beyond_the_namespace_is_written_up_to_its_end_then_refused() {
        let d = data(20 * 512);
        let (r, disk) = stream(stdin_of(d.clone(), 4096, None), 16, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input goes beyond namespace 1, which has 16 LBAs (0..16); \
             its first 6 LBAs were written (LBAs 10..16), the rest was not"
        );
        assert_eq!(disk.writes, [(10, 4), (14, 2)]);
        assert_eq!(&disk.bytes[10 * 512..], &d[..6 * 512]);
    }

    #[test]
    fn a_failing_read_says_what_was_written() {
        let (r, disk) = stream(stdin_of(data(20 * 512), 512, Some(5 * 512)), 64, 0, 4);
        let e = r.unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_none());
        assert_eq!(
            crate::cmd::error_line(&e),
            "cannot read standard input; its first 4 LBAs were written (LBAs 0..4), the rest was \
             not: the pipe broke"
        );
        assert_eq!(disk.writes, [(0, 4)]);
    }

    #[test]
    fn a_failing_write_names_its_lbas_and_those_written_before() {
        let mut input = stdin_of(data(12 * 512), 4096, None);
        let mut piece = vec![0u8; 4 * 512];
        let mut calls = 0;
        let r = write_stream(
            &mut input,
            (&ns(64), LBA as u64),
            3,
            &mut piece,
            &mut |_, _| {
                calls += 1;
                if calls == 2 {
                    anyhow::bail!("Write failed: LBA Out of Range");
                }
                Ok(())
            },
        );
        let e = r.unwrap_err();
        assert_eq!(
            crate::cmd::error_line(&e),
            "write LBAs 7..11 (LBAs 3..7 are written): Write failed: LBA Out of Range"
        );
    }

    #[test]
    fn nvme_cli_counts_and_data_sizes() {
        let r = |count, block_count| RangeArgs {
            nsid: 1,
            lba: Some(0),
            count,
            block_count,
        };
        assert_eq!(r(Some(8), None).count().unwrap(), Some(8));
        // nvme-cli's block count is zero-based.
        assert_eq!(r(None, Some(7)).count().unwrap(), Some(8));
        assert_eq!(r(None, Some(0)).count().unwrap(), Some(1));
        assert_eq!(r(None, None).count().unwrap(), None);
        assert!(r(None, Some(u64::MAX)).count().is_err());
        assert_eq!(resolve_count(Some(8), None, 512).unwrap(), Some(8));
        assert_eq!(resolve_count(None, Some(4096), 512).unwrap(), Some(8));
        assert_eq!(resolve_count(Some(8), Some(4096), 512).unwrap(), Some(8));
        assert_eq!(resolve_count(None, None, 512).unwrap(), None);
        for (count, size) in [(Some(7), Some(4096)), (None, Some(4000)), (None, Some(0))] {
            let e = resolve_count(count, size, 512).unwrap_err();
            assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        }
        assert_eq!(
            resolve_count(Some(7), Some(4096), 512)
                .unwrap_err()
                .to_string(),
            "--data-size 4096 is 8 LBAs of 512 bytes, but the count asks for 7 \
             (--block-count is the count less one)"
        );
    }

    #[test]
    fn a_limit_takes_that_much_of_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in");
        std::fs::write(&p, data(6 * 512)).unwrap();
        let mut input = Input::open(Some(&p)).unwrap();
        input.limit(4 * 512).unwrap();
        assert_eq!(input.len, Some(4 * 512));
        let (r, disk) = stream(input, 64, 0, 3);
        assert_eq!(r.unwrap(), 4);
        assert_eq!(disk.writes, [(0, 3), (3, 1)]);
        let mut input = Input::open(Some(&p)).unwrap();
        let e = input.limit(8 * 512).unwrap_err();
        assert!(
            e.to_string()
                .contains("holds 3072 bytes, fewer than the 4096"),
            "{e}"
        );
        let mut input = stdin_of(data(6 * 512), 700, None);
        input.limit(2 * 512).unwrap();
        let (r, _) = stream(input, 64, 0, 4);
        assert_eq!(r.unwrap(), 2);
    }

    #[test]
    fn a_file_is_read_up_to_the_length_it_was_checked_at() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in");
        std::fs::write(&p, data(3 * 512)).unwrap();
        let input = Input::open(Some(&p)).unwrap();
        assert_eq!(input.len, Some(3 * 512));
        std::fs::write(&p, data(9 * 512)).unwrap();
        let (r, disk) = stream(input, 64, 0, 4);
        assert_eq!(r.unwrap(), 3);
        assert_eq!(disk.writes, [(0, 3)]);
        let e = Input::open(Some(&dir.path().join("missing")))
            .err()
            .expect("a missing file");
        assert!(crate::cmd::error_line(&e).starts_with("cannot open "));
    }
}
