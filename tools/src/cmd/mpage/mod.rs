//! `rnvme mpage`: the page cache on a recording device (`trace`: the commands it would issue)
//! and on a controller (`read`, `write`: a file described by a MAP.json; `bench`: a contiguous
//! file read through the cache, on the per-block path and raw).
//!
//! The device commands open the controller like the other device commands, create one I/O
//! queue pair, wrap it in [`NvmeBlockIo`] and run a [`PageCache`] over frames taken from the
//! controller's DMA pool. The passes themselves are generic over [`BlockIo`], so the same code
//! runs on a [`rnvme_mpage::RecordingDevice`] in the tests below.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rnvme_driver::controller::Controller;
use rnvme_driver::identify::NamespaceInfo;
use rnvme_driver::irq::WaitMode;
use rnvme_mpage::{
    BlockIo, BlockMap, CacheOptions, CacheStats, Extent, ExtentMap, IoError, IoRequest, MapError,
    MapSpec, Mapping, NvmeBlockIo, PageCache, PagePool, TraceError, TraceOp, TraceOptions,
    PAGE_SIZE,
};
use serde::Serialize;

mod bench;
mod passes;

pub use bench::bench;
pub use passes::{read_pass, write_pass, PassReport};

use super::device::DeviceArgs;
use super::{outln, UsageError};

/// Bytes asked for by each `read_at` of a sequential pass (large, so readahead runs ahead).
pub(super) const READ_CHUNK: usize = 1 << 20;
/// Largest automatic readahead window in pages, unless told: 0, one command of the
/// controller's max transfer.
pub const DEFAULT_READAHEAD_MAX: u64 = 0;
/// The largest readahead window the options take, in pages (256 MiB; the cache caps a
/// window at its own size anyway).
pub const MAX_READAHEAD_PAGES: u64 = 65536;
/// The most readahead windows in flight the options take (a queue holds at most 65 536).
pub const MAX_READAHEAD_DEPTH: u64 = 65536;
/// The most hugepage memory the cache options take, in MiB (1 TiB).
pub const MAX_CACHE_MIB: u64 = 1 << 20;

/// `rnvme mpage ...`
#[derive(Debug, Subcommand)]
pub enum MpageCommand {
    /// Run the page cache on a recording device and print the commands it issues
    Trace(TraceArgs),
    /// Read a file described by MAP.json through the page cache on a controller
    Read(ReadArgs),
    /// Write a file through the page cache on a controller at offset 0, then sync (write back
    /// and Flush)
    Write(WriteArgs),
    /// Read a contiguous file through the cache, on the per-block path and raw, and compare
    Bench(BenchArgs),
}

/// Operations are applied in the order given on the command line, on one cache.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The file's block map: block size, LBA size, max transfer, file size, extents, failing
    /// blocks, where `create` allocates
    #[arg(long)]
    pub map: PathBuf,
    /// Read COUNT pages from page START (readahead, then wait): START:COUNT
    #[arg(long, value_name = "START:COUNT")]
    pub read: Vec<String>,
    /// Read one page
    #[arg(long, value_name = "N")]
    pub read_page: Vec<String>,
    /// Dirty whole pages (comma list of page indexes), then write them back
    #[arg(long, value_name = "PAGES")]
    pub write: Vec<String>,
    /// Dirty single file blocks (comma list of block indexes), then write them back
    #[arg(long, value_name = "BLOCKS")]
    pub write_blocks: Vec<String>,
    /// Record a device that offers SGLs (as QEMU's emulated NVMe does) and show the data
    /// pointer each command carries
    ///
    /// The driver's default mode then chooses per command: PRPs when the data is one piece
    /// within two pages (a one-page command carries PRPs), an SGL otherwise. Each command
    /// line says which, after "lbas": "dptr":"prp" with "prps", or "dptr":"sgl" with
    /// "descriptors", every SGL descriptor the device read in order, each
    /// {"type":"data"|"segment"|"last_segment","addr":"0x…","len":BYTES}: the one in the
    /// command first (a Data Block for data in one piece), then each list's, a segment
    /// descriptor last in its list. List addresses are the recording device's own. Without
    /// --sgl the device takes PRPs only and the lines are unchanged.
    #[arg(long)]
    pub sgl: bool,
}

/// Namespace and page cache arguments of the device commands.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
    /// Hugepage memory for the cache's page frames, in MiB (rounded up to 2 MiB)
    #[arg(long, default_value_t = 32, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(0..=MAX_CACHE_MIB))]
    pub cache_mib: u64,
    /// Entries of the I/O queue pair (at most what the controller allows)
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub queue_entries: u32,
    /// How a reader with nothing to do waits for the device: `polled` (its core busy),
    /// `interrupt` (sleeps on the queue pair's MSI-X vector), or `hybrid` (polls for
    /// --spin-us, then sleeps)
    #[arg(long, default_value = "polled", value_parser = ["polled", "interrupt", "hybrid"])]
    pub wait: String,
    /// With --wait hybrid: how long a wait polls before it sleeps, in µs
    #[arg(long, default_value_t = 20, value_name = "US")]
    pub spin_us: u64,
}

impl CacheArgs {
    /// The queue pairs' wait mode.
    pub(super) fn wait_mode(&self) -> WaitMode {
        super::wait_mode(&self.wait, self.spin_us)
    }
}

/// `rnvme mpage read`
#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The file's block map (MAP.json, as for `trace`): `lba_size` must be the namespace's,
    /// `max_transfer` (if given) lowers the controller's limit, `file_size` is read
    #[arg(long)]
    pub map: PathBuf,
    /// Write the file's bytes here (else they are read and discarded)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Send every page down the per-block path (one command per block)
    #[arg(long)]
    pub per_block: bool,
    /// Largest readahead window in pages (0: the controller's max transfer)
    #[arg(long, default_value_t = DEFAULT_READAHEAD_MAX, value_name = "PAGES",
          value_parser = clap::value_parser!(u64).range(0..=MAX_READAHEAD_PAGES))]
    pub readahead_max: u64,
    /// Readahead windows in flight (0: half the queue's entries, at most 16)
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u64).range(0..=MAX_READAHEAD_DEPTH))]
    pub readahead_depth: u64,
    /// Readahead windows held back to go to the device at once, one doorbell for several
    /// (0: half the windows in flight; 1: a doorbell for each)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub kick_batch: usize,
    /// Print every cache counter to stderr
    #[arg(long)]
    pub stats: bool,
    /// Print the figures as JSON on stdout instead
    #[arg(long)]
    pub json: bool,
}

/// `rnvme mpage write`
#[derive(Debug, Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The file's block map (MAP.json); holes are allocated from `allocate_from`
    #[arg(long)]
    pub map: PathBuf,
    /// The bytes to write at offset 0 (the file grows if they reach past `file_size`)
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Print every cache counter to stderr
    #[arg(long)]
    pub stats: bool,
    /// Print the figures and the file's extents after allocation as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// `rnvme mpage bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// First LBA of the file (4 KiB aligned)
    #[arg(long)]
    pub lba: u64,
    /// Size of the file in MiB
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// Largest readahead window of the cache pass in pages (0: the controller's max transfer)
    #[arg(long, default_value_t = DEFAULT_READAHEAD_MAX, value_name = "PAGES",
          value_parser = clap::value_parser!(u64).range(0..=MAX_READAHEAD_PAGES))]
    pub readahead_max: u64,
    /// Readahead windows in flight (0: half the queue's entries, at most 16)
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u64).range(0..=MAX_READAHEAD_DEPTH))]
    pub readahead_depth: u64,
    /// Readahead windows held back to go to the device at once, one doorbell for several
    /// (0: half the windows in flight; 1: a doorbell for each)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub kick_batch: usize,
    /// Most commands in flight in the raw pass (default: as many as the queue holds)
    #[arg(long, value_name = "N")]
    pub depth: Option<usize>,
    /// Run every pass this many times and report the fastest of each
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub rounds: u32,
    /// Also read N files of --mib each (one after the other from --lba) by N threads at
    /// once through a shared cache of one queue pair per thread, against one thread
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: usize,
    /// The threads read the cache's pages in place (`read_with`) instead of copying them into
    /// a buffer of their own (`read_at`)
    #[arg(long)]
    pub in_place: bool,
    /// Random 4 KiB page reads of the file, one at a time, through a cold cache and raw
    /// (0: no random pass)
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub random: u64,
    /// Print the figures as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn mpage(c: MpageCommand) -> Result<ExitCode> {
    match c {
        // The operations' order comes from the raw arguments (lossy: clap has checked them,
        // and `args()` would panic on one that is not UTF-8, such as a path).
        MpageCommand::Trace(a) => trace(
            a,
            std::env::args_os()
                .map(|x| x.to_string_lossy().into_owned())
                .collect(),
        ),
        MpageCommand::Read(a) => read(a),
        MpageCommand::Write(a) => write(a),
        MpageCommand::Bench(a) => bench(a),
    }
}

// ---- maps ------------------------------------------------------------------------------

/// An extent map shared with the command, so the extents can be shown after allocation.
#[derive(Clone)]
struct SharedMap(Arc<Mutex<ExtentMap>>);

impl SharedMap {
    fn lock(&self) -> MutexGuard<'_, ExtentMap> {
        // Map calls leave the map consistent between statements: a poisoned lock is usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn extents(&self) -> Vec<Extent> {
        self.lock().extents().cloned().collect()
    }
}

impl BlockMap for SharedMap {
    fn block_size(&self) -> u32 {
        self.lock().block_size()
    }
    fn map(&mut self, file_block: u64, max_blocks: u64, create: bool) -> Result<Mapping, MapError> {
        self.lock().map(file_block, max_blocks, create)
    }
    fn read_inline(&mut self, file_block: u64, dst: &mut [u8]) -> Result<(), MapError> {
        self.lock().read_inline(file_block, dst)
    }
    fn truncate(&mut self, first_block: u64) -> Result<(), MapError> {
        self.lock().truncate(first_block)
    }
}

fn load_spec(path: &Path) -> Result<MapSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the map file {}", path.display()))?;
    MapSpec::from_json(&text).map_err(|e| UsageError(format!("{}: {e}", path.display())).into())
}

/// The extent map of `spec` for a namespace of `ns_lbas` LBAs of `lba_size` bytes: the LBA
/// sizes must agree and every extent must lie inside the namespace; allocation is bounded by
/// its end.
fn namespace_map(spec: &MapSpec, nsid: u32, ns_lbas: u64, lba_size: u32) -> Result<ExtentMap> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    if spec.lba_size != lba_size {
        return Err(usage(format!(
            "the map is for {}-byte LBAs but namespace {nsid} has {lba_size}-byte LBAs: set \"lba_size\":{lba_size}",
            spec.lba_size
        )));
    }
    let lpb = (spec.block_size / lba_size) as u64;
    let ns_blocks = ns_lbas / lpb;
    for (i, e) in spec.extents.iter().enumerate() {
        let end = e.disk_block.saturating_add(e.blocks);
        if end > ns_blocks {
            return Err(usage(format!(
                "extents[{i}] (disk blocks {}..{end}) reaches past namespace {nsid}, which holds {ns_blocks} blocks of {} bytes",
                e.disk_block, spec.block_size
            )));
        }
    }
    let mut map = spec.extent_map().map_err(|e| usage(e.to_string()))?;
    if let Some(a) = spec.allocate_from {
        if a >= ns_blocks {
            return Err(usage(format!(
                "allocate_from {a} is past namespace {nsid}, which holds {ns_blocks} blocks of {} bytes",
                spec.block_size
            )));
        }
        map.set_allocation_range(a..ns_blocks);
    }
    Ok(map)
}

// ---- devices ---------------------------------------------------------------------------

/// A device whose max transfer is lowered (to a MAP.json's `max_transfer`).
struct Limited<D> {
    io: D,
    max: u32,
}

impl<D: BlockIo> BlockIo for Limited<D> {
    fn name(&self) -> &str {
        self.io.name()
    }
    fn lba_size(&self) -> u32 {
        self.io.lba_size()
    }
    fn max_transfer(&self) -> u32 {
        self.io.max_transfer().min(self.max)
    }
    fn queue_depth(&self) -> usize {
        self.io.queue_depth()
    }
    fn submit(&mut self, req: &IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        self.io.submit(req, tag)
    }
    fn kick(&mut self) {
        self.io.kick()
    }
    fn set_kick_only(&mut self) -> bool {
        self.io.set_kick_only()
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        self.io.poll(done)
    }
    fn wait(
        &mut self,
        timeout: std::time::Duration,
        done: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        self.io.wait(timeout, done)
    }
}

/// A controller and one of its namespaces.
pub(super) struct Device {
    pub(super) ctrl: Controller,
    pub(super) ns: NamespaceInfo,
    pub(super) entries: u32,
    pub(super) wait: WaitMode,
}

impl Device {
    pub(super) fn open(dev: &DeviceArgs, args: &CacheArgs) -> Result<Device> {
        if args.queue_entries < 2 {
            return Err(UsageError("--queue-entries must be at least 2".into()).into());
        }
        let ctrl = dev.open()?;
        let ns = ctrl
            .namespace(args.nsid)
            .cloned()
            .map_err(|e| UsageError(e.to_string()))?;
        let entries = args.queue_entries.min(ctrl.max_queue_entries());
        Ok(Device {
            ctrl,
            ns,
            entries,
            wait: args.wait_mode(),
        })
    }

    /// A fresh I/O queue pair on the namespace.
    pub(super) fn block_io(&self) -> Result<NvmeBlockIo> {
        let qp = self.ctrl.create_io_qpair_with(self.entries, self.wait)?;
        Ok(NvmeBlockIo::for_namespace(qp, self.ns.nsid)?)
    }

    /// Page frames for a cache of `mib` MiB.
    pub(super) fn pool(&self, mib: u64) -> Result<PagePool> {
        if mib == 0 {
            return Err(UsageError("--cache-mib must be at least 1".into()).into());
        }
        let frames = mib
            .checked_mul(1 << 20)
            .and_then(|b| usize::try_from(b / PAGE_SIZE as u64).ok())
            .ok_or_else(|| UsageError(format!("--cache-mib {mib} is too large")))?;
        PagePool::new(self.ctrl.pool(), frames).with_context(|| {
            format!(
                "{}: cannot take {mib} MiB of DMA memory for the page cache (reserve more hugepages, or lower --cache-mib)",
                self.ctrl.name()
            )
        })
    }
}

// ---- commands --------------------------------------------------------------------------

/// What `read` and `write` print with `--json`.
#[derive(Serialize)]
struct FileJson<'a> {
    op: &'static str,
    nsid: u32,
    file_size: u64,
    block_size: u32,
    lba_size: u32,
    max_transfer: u32,
    per_block: bool,
    readahead_max: u64,
    #[serde(flatten)]
    pass: &'a PassReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    extents: Option<Vec<Extent>>,
}

/// The counters as `name value` lines.
fn counter_lines(stats: &CacheStats) -> Result<Vec<String>> {
    let v = serde_json::to_value(stats)?;
    Ok(v.as_object()
        .map(|o| o.iter().map(|(k, v)| format!("  {k:<20} {v}")).collect())
        .unwrap_or_default())
}

fn report(r: &FileJson<'_>, json: bool, all: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string(r)?)?;
        return Ok(());
    }
    let p = r.pass;
    let s = &p.stats;
    let (verb, pages, cmds) = match r.op {
        "read" => ("read", s.pages_read, s.read_commands),
        _ => ("wrote", s.pages_written, s.write_commands),
    };
    eprintln!(
        "{verb} {} bytes in {:.3} s ({:.1} MiB/s): {pages} pages {verb} by {cmds} commands ({} per-block), {} map calls",
        p.bytes, p.seconds, p.mib_per_s, s.fallback_commands, s.map_calls
    );
    if all {
        for l in counter_lines(s)? {
            eprintln!("{l}");
        }
    }
    Ok(())
}

pub fn read(a: ReadArgs) -> Result<ExitCode> {
    let spec = load_spec(&a.map)?;
    let d = Device::open(&a.dev, &a.cache)?;
    let map = namespace_map(&spec, d.ns.nsid, d.ns.size_lbas, d.ns.lba_size)?;
    let io = Limited {
        io: d.block_io()?,
        max: spec.max_transfer.unwrap_or(u32::MAX),
    };
    let max_transfer = io.max_transfer();
    let opts = CacheOptions {
        force_per_block: a.per_block,
        readahead_max: a.readahead_max,
        readahead_depth: a.readahead_depth,
        kick_batch: a.kick_batch,
        ..CacheOptions::default()
    };
    let mut cache = PageCache::new(io, d.pool(a.cache.cache_mib)?, opts)?;
    let mut out = match &a.out {
        Some(p) => Some(BufWriter::new(
            File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let pass = read_pass(
        &mut cache,
        Box::new(map),
        spec.file_size,
        READ_CHUNK,
        |_, data| match out.as_mut() {
            Some(o) => o.write_all(data).context("cannot write the output"),
            None => Ok(()),
        },
    )?;
    if let Some(mut o) = out {
        o.flush().context("cannot write the output")?;
    }
    let r = FileJson {
        op: "read",
        nsid: d.ns.nsid,
        file_size: spec.file_size,
        block_size: spec.block_size,
        lba_size: spec.lba_size,
        max_transfer,
        per_block: a.per_block,
        readahead_max: a.readahead_max,
        pass: &pass,
        extents: None,
    };
    report(&r, a.json, a.stats)?;
    Ok(ExitCode::SUCCESS)
}

pub fn write(a: WriteArgs) -> Result<ExitCode> {
    let spec = load_spec(&a.map)?;
    let d = Device::open(&a.dev, &a.cache)?;
    // No file can be larger than its namespace: read at most one byte more than that, so
    // that an endless input (a pipe, /dev/zero) ends in an error, not in memory exhausted.
    let room = d.ns.size_lbas.saturating_mul(d.ns.lba_size as u64);
    let data = read_at_most(&a.input, room)?;
    if data.is_empty() {
        return Err(UsageError(format!("{} is empty: nothing to write", a.input.display())).into());
    }
    let map = SharedMap(Arc::new(Mutex::new(namespace_map(
        &spec,
        d.ns.nsid,
        d.ns.size_lbas,
        d.ns.lba_size,
    )?)));
    let io = Limited {
        io: d.block_io()?,
        max: spec.max_transfer.unwrap_or(u32::MAX),
    };
    let max_transfer = io.max_transfer();
    let opts = CacheOptions::default();
    let readahead_max = opts.readahead_max;
    let mut cache = PageCache::new(io, d.pool(a.cache.cache_mib)?, opts)?;
    let (pass, file_size) = write_pass(&mut cache, Box::new(map.clone()), spec.file_size, &data)?;
    let r = FileJson {
        op: "write",
        nsid: d.ns.nsid,
        file_size,
        block_size: spec.block_size,
        lba_size: spec.lba_size,
        max_transfer,
        per_block: false,
        readahead_max,
        pass: &pass,
        extents: Some(map.extents()),
    };
    report(&r, a.json, a.stats)?;
    Ok(ExitCode::SUCCESS)
}

/// The bytes of `path`, which may be at most `max` of them.
fn read_at_most(path: &std::path::Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut data = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if data.len() as u64 > max {
        return Err(UsageError(format!(
            "{} holds more than the {max} bytes of the namespace: nothing was written",
            path.display()
        ))
        .into());
    }
    Ok(data)
}

// ---- trace -----------------------------------------------------------------------------

/// The operations in command-line order. clap keeps each flag's values in order but not the
/// order between flags, so the raw arguments decide it.
fn ops_in_order(args: &[String]) -> Result<Vec<TraceOp>> {
    let mut ops = Vec::new();
    let mut it = args.iter().skip_while(|a| a.as_str() != "trace").skip(1);
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--") else {
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if !matches!(name, "read" | "read-page" | "write" | "write-blocks") {
            continue;
        }
        let value = match value {
            Some(v) => v,
            None => it.next().cloned().unwrap_or_default(),
        };
        // The error names the flag and the value.
        ops.push(TraceOp::parse(name, &value).map_err(|e| UsageError(e.to_string()))?);
    }
    Ok(ops)
}

fn trace(a: TraceArgs, raw: Vec<String>) -> Result<ExitCode> {
    let json = std::fs::read_to_string(&a.map)
        .with_context(|| format!("cannot read the map file {}", a.map.display()))?;
    let ops = ops_in_order(&raw)?;
    let given = a.read.len() + a.read_page.len() + a.write.len() + a.write_blocks.len();
    if ops.len() != given {
        return Err(UsageError(
            "could not tell the order of the operations: give each as --flag VALUE".into(),
        )
        .into());
    }
    if ops.is_empty() {
        return Err(UsageError(
            "nothing to trace: give --read, --read-page, --write or --write-blocks".into(),
        )
        .into());
    }
    let options = TraceOptions { sgl: a.sgl };
    let lines = rnvme_mpage::trace_with(&json, &ops, options).map_err(|e| match e {
        TraceError::Spec(s) => anyhow::Error::from(UsageError(format!("{}: {s}", a.map.display()))),
        other => anyhow::Error::from(other),
    })?;
    for l in lines {
        outln!("{l}")?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::passes::{raw_read, Digest};
    use super::*;
    use rnvme_driver::dma::{Backing, DmaPool};
    use rnvme_driver::hw::MemoryOnly;
    use rnvme_mpage::{DiskFill, Linear, RecordingDevice};

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn operations_keep_command_line_order() {
        let ops = ops_in_order(&args(
            "rnvme mpage trace --map m.json --write 0,1 --read 0:4 --read-page=3 --write-blocks 5",
        ))
        .unwrap();
        assert_eq!(
            ops,
            vec![
                TraceOp::WritePages(vec![0, 1]),
                TraceOp::Read { start: 0, count: 4 },
                TraceOp::ReadPage(3),
                TraceOp::WriteBlocks(vec![5]),
            ]
        );
    }

    #[test]
    fn sgl_is_a_flag_between_the_operations() {
        let ops = ops_in_order(&args(
            "rnvme mpage trace --map m.json --write 2,1,0 --sgl --read 0:4",
        ))
        .unwrap();
        assert_eq!(
            ops,
            vec![
                TraceOp::WritePages(vec![2, 1, 0]),
                TraceOp::Read { start: 0, count: 4 }
            ]
        );
        let MpageCommand::Trace(t) = parse("t trace --map m.json --write 2,1,0 --sgl --read 0:4")
        else {
            panic!("not trace")
        };
        assert!(t.sgl);
        assert_eq!((t.write.len(), t.read.len()), (1, 1));
        let MpageCommand::Trace(t) = parse("t trace --map m.json --read 0:4") else {
            panic!("not trace")
        };
        assert!(!t.sgl);
    }

    #[test]
    fn inputs_longer_than_the_namespace_are_refused_without_reading_them_whole() {
        let data = read_at_most(std::path::Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(data.downcast_ref::<UsageError>().is_some());
        assert!(
            data.to_string()
                .contains("holds more than the 1048576 bytes"),
            "{data}"
        );
        let dir = std::env::temp_dir().join(format!("rnvme-at-most-{}", std::process::id()));
        std::fs::write(&dir, [7u8; 100]).unwrap();
        assert_eq!(read_at_most(&dir, 100).unwrap(), vec![7u8; 100]);
        assert!(read_at_most(&dir, 99).is_err());
        std::fs::remove_file(&dir).unwrap();
        assert!(read_at_most(&dir, 99)
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }

    #[test]
    fn malformed_operation_is_a_usage_error() {
        let e = ops_in_order(&args("rnvme mpage trace --read 4")).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(e.to_string().starts_with("--read \"4\": "), "{e}");
        // Too far or too many: refused before anything runs.
        let e =
            ops_in_order(&args("rnvme mpage trace --read-page 18446744073709551615")).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(e.to_string().contains("pages go up to"), "{e}");
        let e = ops_in_order(&args("rnvme mpage trace --read=0:100000000")).unwrap_err();
        assert!(e.to_string().contains("at most 65536 pages"), "{e}");
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        c: MpageCommand,
    }

    fn parse(s: &str) -> MpageCommand {
        <Cli as clap::Parser>::try_parse_from(args(s)).unwrap().c
    }

    #[test]
    fn device_commands_parse() {
        let MpageCommand::Read(r) = parse(
            "t read 0000:00:04.0 --ns 2 --map m.json --out o --per-block --readahead-max 64 --json",
        ) else {
            panic!("not read")
        };
        assert_eq!((r.dev.bdf.as_str(), r.cache.nsid), ("0000:00:04.0", 2));
        assert!(r.per_block && r.json && !r.stats);
        assert_eq!((r.readahead_max, r.out), (64, Some(PathBuf::from("o"))));
        let MpageCommand::Write(w) = parse("t write 0000:00:04.0 --map m.json --in data --stats")
        else {
            panic!("not write")
        };
        assert_eq!((w.cache.nsid, w.input), (1, PathBuf::from("data")));
        assert!(w.stats);
        let MpageCommand::Bench(b) = parse("t bench 0000:00:05.0 --lba 2048 --mib 8 --depth 4")
        else {
            panic!("not bench")
        };
        assert_eq!((b.lba, b.mib, b.depth), (2048, 8, Some(4)));
        assert_eq!(b.readahead_max, DEFAULT_READAHEAD_MAX);
        let missing_in =
            <Cli as clap::Parser>::try_parse_from(args("t write 0000:00:04.0 --map m"));
        assert!(missing_in.is_err());
    }

    fn frames(n: usize) -> PagePool {
        let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
        PagePool::new(&dma, n).unwrap()
    }

    fn disk(pool: &PagePool, lba_size: u32, max_transfer: u32) -> RecordingDevice {
        let mut d = RecordingDevice::new(pool.clone(), lba_size, 1 << 20);
        d.set_fill(DiskFill::Pattern);
        d.set_max_transfer(max_transfer);
        d
    }

    /// 512-byte LBAs, 64 KiB commands, three at a time at the device, one completion per poll.
    fn shallow_disk() -> (PagePool, RecordingDevice) {
        let pool = frames(512);
        let mut dev = disk(&pool, 512, 64 << 10);
        dev.set_queue_depth(3);
        dev.set_completions_per_poll(1);
        (pool, dev)
    }

    #[test]
    fn raw_pass_reads_every_byte_in_max_transfer_pieces_with_a_full_queue() {
        let (pool, mut dev) = shallow_disk();
        // 1000 LBAs: seven commands of 128 LBAs and one of 104.
        let (slba, lbas) = (40u64, 1000u64);
        let mut got = vec![0u8; (lbas * 512) as usize];
        let r = raw_read(&mut dev, &pool, slba, lbas, 8, |off, d| {
            got[off as usize..off as usize + d.len()].copy_from_slice(d)
        })
        .unwrap();
        assert_eq!(got, dev.read_bytes(slba * 512, got.len()));
        assert_eq!((r.bytes, r.commands, r.command_bytes), (512_000, 8, 65536));
        assert_eq!(r.max_in_flight, 3, "the device holds three commands");
        let cmds: Vec<(u64, u32)> = dev.commands().iter().map(|c| (c.slba, c.lbas)).collect();
        let want: Vec<(u64, u32)> = (0..8)
            .map(|i| (40 + i * 128, if i == 7 { 104 } else { 128 }))
            .collect();
        assert_eq!(cmds, want);
        assert_eq!(pool.free_frames(), pool.frames(), "frames are given back");
    }

    #[test]
    fn the_raw_pass_says_where_its_time_went() {
        let (pool, mut dev) = shallow_disk();
        let r = raw_read(&mut dev, &pool, 40, 1000, 8, |_, _| {}).unwrap();
        let t = r.time;
        assert_eq!(t.busy_seconds, r.seconds);
        assert!(
            t.copy_seconds > 0.0,
            "every command's data is copied: {t:?}"
        );
        assert!(t.doorbell_seconds > 0.0, "{t:?}");
        // Disjoint stretches of the pass's own time.
        assert!(
            t.copy_seconds + t.wait_seconds + t.doorbell_seconds <= t.busy_seconds * 1.001,
            "{t:?}"
        );
        // In place, nothing is copied.
        let r = super::passes::raw_read_in_place(&mut dev, &pool, 40, 1000, 8, |_, _| {}).unwrap();
        assert_eq!(r.time.copy_seconds, 0.0, "{:?}", r.time);
    }

    #[test]
    fn a_time_split_reads_as_shares_of_the_busy_time() {
        use super::passes::TimeSplit;
        let t = TimeSplit {
            busy_seconds: 2.0,
            copy_seconds: 1.0,
            wait_seconds: 0.5,
            doorbell_seconds: 0.1,
        };
        assert_eq!(
            t.plus(t).describe(),
            "copy 50 %, device wait 25 %, doorbells 5 %, other 20 %"
        );
        assert_eq!(t.plus(t).busy_seconds, 4.0);
        // Nothing timed: no division by zero.
        assert_eq!(
            TimeSplit::default().describe(),
            "copy 0 %, device wait 0 %, doorbells 0 %, other 0 %"
        );
        let s = rnvme_mpage::CacheStats {
            copy_out_ns: 250_000_000,
            device_wait_ns: 500_000_000,
            doorbell_ns: 0,
            ..Default::default()
        };
        assert_eq!(
            TimeSplit::of_cache(1.0, &s).describe(),
            "copy 25 %, device wait 50 %, doorbells 0 %, other 25 %"
        );
    }

    #[test]
    fn a_failed_raw_pass_hands_no_frame_back_that_a_command_may_still_fill() {
        let (pool, mut dev) = shallow_disk();
        // The second command fails while the third is still queued at the device.
        dev.fail_lba(40 + 128 + 5);
        let e = raw_read(&mut dev, &pool, 40, 1000, 8, |_, _| {}).unwrap_err();
        assert!(format!("{e:#}").contains("failed"), "{e:#}");
        assert!(dev.outstanding() > 0, "a command is still at the device");
        // Eight slots of 16 frames (64 KiB commands): none goes back.
        assert_eq!(
            pool.free_frames(),
            pool.frames() - 8 * 16,
            "the slots' frames stay out of the pool"
        );
    }

    #[test]
    fn raw_pass_depth_is_bounded_by_the_pool() {
        let pool = frames(512); // one 2 MiB chunk: four 512 KiB commands at most
        let mut dev = disk(&pool, 4096, 512 << 10);
        let r = raw_read(&mut dev, &pool, 0, 1024, 64, |_, _| ()).unwrap();
        assert_eq!((r.commands, r.max_in_flight), (8, 4));
        let taken: Vec<_> = (0..510).map(|_| pool.alloc().unwrap()).collect();
        let e = raw_read(&mut dev, &pool, 0, 1024, 64, |_, _| ()).unwrap_err();
        assert!(e.to_string().contains("too few"), "{e}");
        taken.into_iter().for_each(|f| pool.free(f));
    }

    #[test]
    fn cache_passes_read_what_raw_reads_and_coalesce_unless_forced() {
        let pool = frames(2048);
        let dev = Limited {
            io: disk(&pool, 512, 1 << 20),
            max: 128 << 10,
        };
        assert_eq!(dev.max_transfer(), 128 << 10);
        let opts = CacheOptions {
            readahead_max: DEFAULT_READAHEAD_MAX,
            ..CacheOptions::default()
        };
        let mut cache = PageCache::new(dev, pool.clone(), opts).unwrap();
        let size = 2u64 << 20;
        let linear = || Box::new(Linear::new(4096, 25, size / 4096));
        let mut expect = Digest::default();
        expect.add(0, &cache.device().io.read_bytes(25 * 4096, size as usize));
        let mut dg = Digest::default();
        let fast = read_pass(&mut cache, linear(), size, READ_CHUNK, |o, b| {
            dg.add(o, b);
            Ok(())
        })
        .unwrap();
        assert_eq!(dg, expect);
        let s = fast.stats;
        assert_eq!(
            (fast.bytes, s.pages_read, s.fallback_commands),
            (size, 512, 0)
        );
        assert!(
            s.read_commands >= 16 && s.read_commands <= 16 + s.readahead_windows,
            "{s:?}"
        );
        let big = cache
            .device()
            .io
            .commands()
            .iter()
            .filter(|c| c.lbas == 256)
            .count();
        assert!(big >= 12, "most reads are of the max transfer: {big}");
        assert!(cache.device().io.commands().iter().all(|c| c.lbas <= 256));

        cache.set_force_per_block(true);
        let mut slow_dg = Digest::default();
        let slow = read_pass(&mut cache, linear(), size, READ_CHUNK, |o, b| {
            slow_dg.add(o, b);
            Ok(())
        })
        .unwrap();
        assert_eq!(slow_dg, expect);
        assert_eq!(
            (slow.stats.read_commands, slow.stats.fallback_commands),
            (512, 512)
        );
        assert_eq!(pool.free_frames(), pool.frames(), "closing frees the pages");

        let mut raw_dg = Digest::default();
        raw_read(cache.device_mut(), &pool, 200, size / 512, 16, |o, b| {
            raw_dg.add(o, b)
        })
        .unwrap();
        assert_eq!(raw_dg, expect);
    }

    const WRITE_MAP: &str = r#"{"block_size":1024,"lba_size":512,"file_size":17920,
        "extents":[{"file_block":0,"disk_block":100,"blocks":4},
                   {"file_block":4,"disk_block":200,"blocks":2},
                   {"file_block":6,"disk_block":300,"blocks":2},
                   {"file_block":12,"disk_block":400,"blocks":4}],
        "allocate_from":1000}"#;

    #[test]
    fn write_pass_fills_extents_and_allocates_holes_in_order() {
        let spec = MapSpec::from_json(WRITE_MAP).unwrap();
        let pool = frames(64);
        let mut cache = PageCache::new(
            disk(&pool, 512, 1 << 20),
            pool.clone(),
            CacheOptions::default(),
        )
        .unwrap();
        let map = SharedMap(Arc::new(Mutex::new(
            namespace_map(&spec, 1, 1 << 20, 512).unwrap(),
        )));
        let mut data = vec![0u8; 17920];
        rnvme_mpage::fill_pattern(9, 0, &mut data);
        let (pass, size) = write_pass(&mut cache, Box::new(map.clone()), 17920, &data).unwrap();
        assert_eq!((pass.bytes, size), (17920, 17920));
        assert_eq!(pass.stats.flush_commands, 1);
        // Blocks 8-11 (page 2) and 16-17 (in page 4, which ends the file) were holes.
        let at = [
            100, 101, 102, 103, 200, 201, 300, 301, 1000, 1001, 1002, 1003,
        ]
        .into_iter()
        .chain([400, 401, 402, 403, 1004, 1005]);
        let dev = &cache.device();
        let mut lbas = Vec::new();
        for (b, d) in at.enumerate() {
            let mut want = vec![0u8; 1024];
            let from = b * 1024;
            let n = (data.len() - from).min(1024);
            want[..n].copy_from_slice(&data[from..from + n]);
            assert_eq!(
                dev.read_bytes(d * 1024, 1024),
                want,
                "file block {b} at disk block {d}"
            );
            lbas.extend([d * 2, d * 2 + 1]);
        }
        lbas.sort_unstable();
        assert_eq!(dev.written_lbas(), lbas, "nothing else was written");
        let ext: Vec<(u64, u64, u64)> = map
            .extents()
            .iter()
            .map(|e| (e.file_block, e.disk_block, e.blocks))
            .collect();
        assert_eq!(
            ext,
            [
                (0, 100, 4),
                (4, 200, 2),
                (6, 300, 2),
                (8, 1000, 4),
                (12, 400, 4),
                (16, 1004, 2)
            ]
        );
    }

    #[test]
    fn maps_are_checked_against_the_namespace() {
        let spec = MapSpec::from_json(WRITE_MAP).unwrap();
        let e = namespace_map(&spec, 3, 1 << 20, 4096).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(
            e.to_string().contains("namespace 3 has 4096-byte LBAs"),
            "{e}"
        );
        // 800 LBAs hold 400 blocks: extent 3 (disk 400..404) does not fit.
        let e = namespace_map(&spec, 1, 800, 512).unwrap_err();
        assert!(e.to_string().contains("extents[3]"), "{e}");
        let e = namespace_map(&spec, 1, 2000, 512).unwrap_err();
        assert!(e.to_string().contains("allocate_from 1000"), "{e}");
        // Allocation stops at the end of the namespace.
        let mut m = namespace_map(&spec, 1, 2002, 512).unwrap();
        assert!(m.map(8, 1, true).is_ok());
        assert!(matches!(
            m.map(9, 1, true),
            Err(MapError::NoSpace { file_block: 9, .. })
        ));
    }

    #[test]
    fn digest_ignores_order_and_split_but_not_data() {
        let mut data = vec![0u8; 10_000];
        rnvme_mpage::fill_pattern(4, 0, &mut data);
        let mut whole = Digest::default();
        whole.add(0, &data);
        let mut parts = Digest::default();
        parts.add(4096, &data[4096..]);
        parts.add(0, &data[..4096]);
        assert_eq!(whole, parts);
        data[9_999] ^= 1;
        let mut changed = Digest::default();
        changed.add(0, &data);
        assert_ne!(whole, changed);
        let mut moved = Digest::default();
        moved.add(8, &data[..8]);
        let mut here = Digest::default();
        here.add(0, &data[..8]);
        assert_ne!(moved, here, "the same bytes elsewhere are different data");
    }

    #[test]
    fn warm_threads_read_each_file_twice_and_count_only_the_timed_read() {
        use super::passes::{threaded_raw_read, threaded_read};
        use rnvme_mpage::{CacheOptions, SharedCache};
        let pool = frames(1024);
        let mut d0 = disk(&pool, 4096, 128 << 10);
        // Every queue of the disk logs its commands here.
        let log = rnvme_mpage::EventLog::default();
        d0.set_event_log(log.clone());
        let commands = || {
            log.lock()
                .unwrap()
                .iter()
                .filter(|e| matches!(e, rnvme_mpage::TraceEvent::Command(_)))
                .count() as u64
        };
        // Files that fit in their shards: a warm-up through the same file ids would leave
        // every page cached for the timed read.
        let pages = 200u64;
        let files = || two_files(pages);
        let mut seen = Vec::new();
        for warm in [false, true] {
            let before = commands();
            let cache = SharedCache::new(
                vec![d0.queue(), d0.queue()],
                pool.clone(),
                CacheOptions::default(),
            )
            .unwrap();
            let (r, _) =
                threaded_read(&cache, files(), 64 << 10, warm.then(files), false, false).unwrap();
            drop(cache);
            assert_eq!(r.bytes, 2 * pages * 4096);
            seen.push((r.read_commands, commands() - before));
        }
        let (cold, warm) = (seen[0], seen[1]);
        // (The device also sees a flush per file closed.)
        assert!(cold.0 > 0 && cold.0 <= cold.1, "{seen:?}");
        // Warm: the device saw each file read twice, each time from the device; the counters
        // count the timed read.
        assert_eq!((warm.0, warm.1), (cold.0, 2 * cold.1), "{seen:?}");
        assert_eq!(
            pool.free_frames(),
            pool.frames(),
            "every frame back in the pool"
        );

        // Raw: the same.
        let mut raw = Vec::new();
        for warm in [false, true] {
            let before = commands();
            let queues = (0..2)
                .map(|_| (d0.queue(), frames(256)))
                .collect::<Vec<_>>();
            let spans = [(0, pages), (pages, pages)];
            let r = threaded_raw_read(queues, &spans, 4, warm).unwrap();
            raw.push((r.read_commands, commands() - before));
        }
        assert_eq!(raw[0].0, raw[0].1, "{raw:?}");
        assert_eq!((raw[1].0, raw[1].1), (raw[0].0, 2 * raw[0].1), "{raw:?}");
    }

    #[test]
    fn a_worker_that_panics_getting_ready_fails_alone_and_holds_nobody_up() {
        type Work = Box<dyn FnOnce() -> anyhow::Result<u32>>;
        type Ready = Box<dyn FnOnce() -> Work + Send>;
        let workers: Vec<Ready> = vec![
            Box::new(|| Box::new(|| Ok(1))),
            Box::new(|| panic!("no buffer")),
            Box::new(|| Box::new(|| Ok(3))),
        ];
        let (results, _) = super::passes::at_once(workers, || {});
        let got: Vec<Result<u32, String>> = results
            .into_iter()
            .map(|r| r.map(|(v, _)| v).map_err(|e| e.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                Ok(1),
                Err("a worker thread panicked while getting ready".to_string()),
                Ok(3)
            ]
        );
    }

    /// Two files of `pages` pages each, one after the other on the disk.
    fn two_files(pages: u64) -> Vec<(Box<dyn rnvme_mpage::BlockMap>, u64)> {
        (0..2u64)
            .map(|t| {
                let map: Box<dyn rnvme_mpage::BlockMap> =
                    Box::new(Linear::new(4096, t * pages, pages));
                (map, pages * 4096)
            })
            .collect()
    }

    #[test]
    fn threads_time_from_the_first_start_to_the_last_end_and_read_what_raw_reads() {
        use super::passes::threaded_read;
        use rnvme_mpage::{CacheOptions, SharedCache};
        let pool = frames(1024);
        let d0 = disk(&pool, 4096, 128 << 10);
        let queues = vec![d0.queue(), d0.queue()];
        let cache = SharedCache::new(queues, pool.clone(), CacheOptions::default()).unwrap();
        let pages = 300u64;
        let files = || two_files(pages);
        let around = rnvme_driver::clock::Stopwatch::start();
        let (r, digests) = threaded_read(&cache, files(), 64 << 10, None, true, false).unwrap();
        let outside = around.elapsed().as_secs_f64();
        assert_eq!((r.threads, r.bytes), (2, 2 * pages * 4096));
        assert_eq!(r.per_thread_mib_per_s.len(), 2);
        // The aggregate's time covers each thread's own time and lies within the call.
        let slowest = r
            .per_thread_mib_per_s
            .iter()
            .map(|m| (pages * 4096) as f64 / (1 << 20) as f64 / m)
            .fold(0.0, f64::max);
        assert!(r.seconds >= slowest * 0.999, "{} < {slowest}", r.seconds);
        assert!(r.seconds <= outside, "{} > {outside}", r.seconds);
        // Their time split sums both threads' own times, each within the aggregate's.
        let t = r.time;
        assert!(
            t.busy_seconds >= slowest * 0.999 && t.busy_seconds <= 2.0 * r.seconds * 1.001,
            "{t:?}"
        );
        assert!(t.copy_seconds > 0.0 && t.wait_seconds > 0.0, "{t:?}");
        assert!(
            t.copy_seconds + t.wait_seconds + t.doorbell_seconds <= t.busy_seconds,
            "{t:?}"
        );
        // Each thread read its file: what raw reads of the same LBAs read.
        let mut io = d0.queue();
        for (t, got) in digests.iter().enumerate() {
            let mut want = Digest::default();
            raw_read(&mut io, &pool, t as u64 * pages, pages, 8, |o, b| {
                want.add(o, b)
            })
            .unwrap();
            assert_eq!(*got, want, "file {t}");
        }
        // In place: the same data, handed over without a copy, and the same commands.
        let (p, in_place) = threaded_read(&cache, files(), 64 << 10, None, true, true).unwrap();
        assert_eq!(in_place, digests);
        assert_eq!((p.bytes, p.read_commands), (r.bytes, r.read_commands));
        assert_eq!(p.time.copy_seconds, 0.0, "{:?}", p.time);
    }
}
