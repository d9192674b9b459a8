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
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rnvme_driver::controller::Controller;
use rnvme_driver::identify::NamespaceInfo;
use rnvme_driver::Segment;
use rnvme_mpage::{
    BlockIo, BlockMap, CacheOptions, CacheStats, Extent, ExtentMap, FileId, IoError, IoOp,
    IoRequest, Linear, MapError, MapSpec, Mapping, NvmeBlockIo, PageCache, PagePool, TraceError,
    TraceOp, CHUNK_BYTES, PAGE_SIZE,
};
use serde::Serialize;

use super::device::DeviceArgs;
use super::{allow_closed_stdout, outln, UsageError};

/// Bytes asked for by each `read_at` of a sequential pass (large, so readahead runs ahead).
const READ_CHUNK: usize = 1 << 20;
/// Bytes handed to each `write_at` of a write pass.
const WRITE_CHUNK: usize = 1 << 20;
/// Largest automatic readahead window in pages, unless told: 0, one command of the
/// controller's max transfer.
pub const DEFAULT_READAHEAD_MAX: u64 = 0;
/// Largest command of the raw pass in bytes (each command in flight has its own frames).
const RAW_PIECE_MAX: usize = CHUNK_BYTES;
/// Bytes per `IoQueuePair::read` call of the synchronous raw pass (as `rnvme read` does).
const SYNC_STEP: u64 = 8 << 20;
/// How long the raw pass waits without any completion before giving up.
const RAW_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// Namespace and page cache arguments of the device commands.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
    /// Hugepage memory for the cache's page frames, in MiB (rounded up to 2 MiB)
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    pub cache_mib: u64,
    /// Entries of the I/O queue pair (at most what the controller allows)
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub queue_entries: u32,
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
    #[arg(long, default_value_t = DEFAULT_READAHEAD_MAX, value_name = "PAGES")]
    pub readahead_max: u64,
    /// Readahead windows in flight (0: half the queue's entries, at most 16)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub readahead_depth: u64,
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
    #[arg(long, default_value_t = DEFAULT_READAHEAD_MAX, value_name = "PAGES")]
    pub readahead_max: u64,
    /// Readahead windows in flight (0: half the queue's entries, at most 16)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub readahead_depth: u64,
    /// Most commands in flight in the raw pass (default: as many as the queue holds)
    #[arg(long, value_name = "N")]
    pub depth: Option<usize>,
    /// Run every pass this many times and report the fastest of each
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub rounds: u32,
    /// Print the figures as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn mpage(c: MpageCommand) -> Result<ExitCode> {
    match c {
        MpageCommand::Trace(a) => trace(a, std::env::args().collect()),
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
    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        self.io.poll(done)
    }
}

/// A controller and one of its namespaces.
struct Device {
    ctrl: Controller,
    ns: NamespaceInfo,
    entries: u32,
}

impl Device {
    fn open(dev: &DeviceArgs, args: &CacheArgs) -> Result<Device> {
        if args.queue_entries < 2 {
            return Err(UsageError("--queue-entries must be at least 2".into()).into());
        }
        let ctrl = dev.open()?;
        let ns = ctrl
            .namespace(args.nsid)
            .cloned()
            .map_err(|e| UsageError(e.to_string()))?;
        let entries = args.queue_entries.min(ctrl.max_queue_entries());
        Ok(Device { ctrl, ns, entries })
    }

    /// A fresh I/O queue pair on the namespace.
    fn block_io(&self) -> Result<NvmeBlockIo> {
        let qp = self.ctrl.create_io_qpair(self.entries)?;
        Ok(NvmeBlockIo::for_namespace(qp, self.ns.nsid)?)
    }

    /// Page frames for a cache of `mib` MiB.
    fn pool(&self, mib: u64) -> Result<PagePool> {
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

// ---- passes ----------------------------------------------------------------------------

/// What one pass over a file did.
#[derive(Clone, Debug, Serialize)]
pub struct PassReport {
    /// Bytes read or written.
    pub bytes: u64,
    /// Time spent in the cache (or the device) only: not in the caller's use of the data.
    pub seconds: f64,
    /// `bytes` over `seconds`.
    pub mib_per_s: f64,
    /// The cache's counters for the pass.
    #[serde(flatten)]
    pub stats: CacheStats,
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / (1 << 20) as f64 / s
    } else {
        f64::INFINITY
    }
}

impl PassReport {
    fn new(bytes: u64, busy: Duration, stats: CacheStats) -> PassReport {
        PassReport {
            bytes,
            seconds: busy.as_secs_f64(),
            mib_per_s: mib_per_s(bytes, busy),
            stats,
        }
    }
}

/// Open `map` as a file of `size` bytes, read it from start to end in `chunk`-byte `read_at`
/// calls (sequential, so readahead runs ahead of the reader), hand each piece to `sink`, and
/// close it again. Only the time spent in the cache is counted.
pub fn read_pass<D: BlockIo>(
    cache: &mut PageCache<D>,
    map: Box<dyn BlockMap>,
    size: u64,
    chunk: usize,
    mut sink: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<PassReport> {
    let f = cache.open(map, size)?;
    cache.reset_stats();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut off = 0u64;
    let mut busy = Duration::ZERO;
    while off < size {
        let t = Instant::now();
        let n = cache
            .read_at(f, off, &mut buf)
            .with_context(|| format!("reading the file at byte {off} through the page cache"))?;
        busy += t.elapsed();
        anyhow::ensure!(
            n > 0,
            "the page cache returned no data at byte {off} of a {size}-byte file"
        );
        sink(off, &buf[..n])?;
        off += n as u64;
    }
    let stats = cache.stats();
    close(cache, f)?;
    Ok(PassReport::new(off, busy, stats))
}

/// Open `map` as a file of `size` bytes, write `data` at offset 0, sync (write back and
/// Flush) and close it. Returns the report and the file size after the write.
pub fn write_pass<D: BlockIo>(
    cache: &mut PageCache<D>,
    map: Box<dyn BlockMap>,
    size: u64,
    data: &[u8],
) -> Result<(PassReport, u64)> {
    let f = cache.open(map, size)?;
    cache.reset_stats();
    let t = Instant::now();
    let mut off = 0usize;
    for piece in data.chunks(WRITE_CHUNK) {
        cache
            .write_at(f, off as u64, piece)
            .with_context(|| format!("writing at byte {off} through the page cache"))?;
        off += piece.len();
    }
    cache.sync(f).context("syncing the file")?;
    let busy = t.elapsed();
    let stats = cache.stats();
    let new_size = cache.file_size(f)?;
    close(cache, f)?;
    Ok((PassReport::new(off as u64, busy, stats), new_size))
}

fn close<D: BlockIo>(cache: &mut PageCache<D>, f: FileId) -> Result<()> {
    cache.close(f).context("closing the file")
}

/// What the raw pass did.
#[derive(Clone, Debug, Serialize)]
pub struct RawReport {
    /// Bytes read.
    pub bytes: u64,
    /// Time from the first submission to the last copy.
    pub seconds: f64,
    /// `bytes` over `seconds`.
    pub mib_per_s: f64,
    /// Read commands issued.
    pub commands: u64,
    /// Bytes per command (the last may be shorter).
    pub command_bytes: u64,
    /// Most commands in flight at once.
    pub max_in_flight: usize,
}

/// Read `lbas` LBAs at `slba` straight from `dev`, no cache and no map: commands of the max
/// transfer (at most 2 MiB), up to `depth` in flight, each into frames of `pool` of its own.
/// Each completed command's data is copied out of the frames (as any reader must) and handed
/// to `sink` with its byte offset, in completion order; the time `sink` takes is not counted.
pub fn raw_read<D: BlockIo>(
    dev: &mut D,
    pool: &PagePool,
    slba: u64,
    lbas: u64,
    depth: usize,
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<RawReport> {
    let lba = dev.lba_size() as usize;
    let per_cmd = (dev.max_transfer() as usize)
        .min(65536 * lba)
        .min(RAW_PIECE_MAX);
    let piece = per_cmd / PAGE_SIZE * PAGE_SIZE;
    anyhow::ensure!(
        piece >= PAGE_SIZE,
        "{}: a max transfer of {per_cmd} bytes is less than a page",
        dev.name()
    );
    let total = lbas * lba as u64;
    let frames_per = piece / PAGE_SIZE;
    let depth = depth
        .max(1)
        .min(total.div_ceil(piece as u64).max(1) as usize)
        .min(pool.free_frames() / frames_per);
    anyhow::ensure!(
        depth > 0,
        "the page pool has {} free frames, too few for one command of {piece} bytes",
        pool.free_frames()
    );
    // Each slot's frames, merged into segments where they are adjacent in IOVA.
    let mut slots: Vec<(Vec<rnvme_mpage::FrameId>, Vec<Segment>)> = Vec::with_capacity(depth);
    for _ in 0..depth {
        let mut frames = Vec::with_capacity(frames_per);
        for _ in 0..frames_per {
            frames.push(pool.alloc().ok_or_else(|| {
                anyhow::anyhow!("the page pool ran out of frames for the raw pass")
            })?);
        }
        let mut segs: Vec<Segment> = Vec::new();
        let mut prev: Option<rnvme_mpage::FrameId> = None;
        for &fr in &frames {
            let iova = pool.iova(fr);
            // Adjacent in IOVA and in the same 2 MiB buffer: a segment never spans buffers.
            let same_buffer = prev.is_some_and(|p| {
                p.index() / rnvme_mpage::FRAMES_PER_CHUNK
                    == fr.index() / rnvme_mpage::FRAMES_PER_CHUNK
            });
            match segs.last_mut() {
                Some(s) if same_buffer && s.iova.add(s.len as u64) == iova => {
                    s.len += PAGE_SIZE as u32
                }
                _ => segs.push(Segment::new(iova, PAGE_SIZE as u32)),
            }
            prev = Some(fr);
        }
        slots.push((frames, segs));
    }
    let result = raw_loop(dev, pool, &slots, slba, total, piece, &mut sink);
    for (frames, _) in slots {
        for fr in frames {
            pool.free(fr);
        }
    }
    result
}

/// The segments of a slot cut to `len` bytes.
fn cut(segs: &[Segment], len: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        let n = (s.len as usize).min(left);
        out.push(Segment::new(s.iova, n as u32));
        left -= n;
    }
    out
}

#[allow(clippy::type_complexity)]
fn raw_loop<D: BlockIo>(
    dev: &mut D,
    pool: &PagePool,
    slots: &[(Vec<rnvme_mpage::FrameId>, Vec<Segment>)],
    slba: u64,
    total: u64,
    piece: usize,
    sink: &mut impl FnMut(u64, &[u8]),
) -> Result<RawReport> {
    let lba = dev.lba_size() as u64;
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    // Byte offset and length of the piece each slot holds.
    let mut holds = vec![(0u64, 0usize); slots.len()];
    let mut host = vec![0u8; piece];
    let (mut next, mut done, mut commands, mut in_flight, mut max_in_flight) = (0u64, 0, 0, 0, 0);
    let mut outside = Duration::ZERO;
    let mut completed: Vec<(u64, Result<(), IoError>)> = Vec::new();
    let start = Instant::now();
    let mut last_progress = start;
    while done < total {
        while next < total {
            let Some(s) = free.pop() else { break };
            let len = (piece as u64).min(total - next) as usize;
            let segs = cut(&slots[s].1, len)
                .into_iter()
                .map(|seg| pool.slice_of(seg))
                .collect::<Result<Vec<_>, _>>()?;
            let req = IoRequest {
                op: IoOp::Read,
                slba: slba + next / lba,
                lbas: (len as u64 / lba) as u32,
                segments: &segs,
                pages: &[],
                fallback: false,
            };
            match dev.submit(&req, s as u64) {
                Ok(()) => {
                    holds[s] = (next, len);
                    next += len as u64;
                    commands += 1;
                    in_flight += 1;
                    max_in_flight = max_in_flight.max(in_flight);
                }
                Err(IoError::QueueFull) if in_flight > 0 => {
                    free.push(s);
                    break;
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e).context(format!(
                        "{}: raw Read of {len} bytes at LBA {} not submitted",
                        dev.name(),
                        req.slba
                    )))
                }
            }
        }
        dev.kick();
        completed.clear();
        dev.poll(&mut |tag, r| completed.push((tag, r)));
        if completed.is_empty() {
            if last_progress.elapsed() > RAW_TIMEOUT {
                anyhow::bail!(
                    "{}: no raw Read completed in {} s ({in_flight} outstanding)",
                    dev.name(),
                    RAW_TIMEOUT.as_secs()
                );
            }
            continue;
        }
        last_progress = Instant::now();
        for (tag, r) in completed.drain(..) {
            let s = tag as usize;
            let (off, len) = holds[s];
            r.with_context(|| {
                format!(
                    "{}: raw Read of {len} bytes at LBA {} failed",
                    dev.name(),
                    slba + off / lba
                )
            })?;
            for (i, &fr) in slots[s].0.iter().enumerate() {
                let from = i * PAGE_SIZE;
                if from >= len {
                    break;
                }
                let n = PAGE_SIZE.min(len - from);
                pool.read(fr, 0, &mut host[from..from + n]);
            }
            let t = Instant::now();
            sink(off, &host[..len]);
            outside += t.elapsed();
            done += len as u64;
            in_flight -= 1;
            free.push(s);
        }
    }
    let busy = start.elapsed().saturating_sub(outside);
    Ok(RawReport {
        bytes: total,
        seconds: busy.as_secs_f64(),
        mib_per_s: mib_per_s(total, busy),
        commands,
        command_bytes: piece as u64,
        max_in_flight,
    })
}

/// An order-independent digest of data by position: pieces may be added in any order and
/// any split, as long as every piece starts at a multiple of 8 bytes. It is the wrapping sum,
/// over the little-endian 8-byte words of the data (the last one padded with zeros), of
/// `mix(word index, word)` with `x = word ^ index * 0x9E3779B97F4A7C15; x ^= x >> 31;
/// x *= 0xBF58476D1CE4E5B9; x ^ (x >> 29)` (wrapping arithmetic).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Digest(u64);

impl Digest {
    /// Add `data`, found at byte `offset`.
    pub fn add(&mut self, offset: u64, data: &[u8]) {
        debug_assert!(offset.is_multiple_of(8), "pieces start at 8-byte multiples");
        let mut word = offset / 8;
        let mut chunks = data.chunks_exact(8);
        for c in chunks.by_ref() {
            let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = self.0.wrapping_add(mix(word, v));
            word += 1;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.0 = self.0.wrapping_add(mix(word, u64::from_le_bytes(b)));
        }
    }

    /// The digest value.
    pub fn value(self) -> u64 {
        self.0
    }
}

fn mix(word: u64, v: u64) -> u64 {
    let mut x = v ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
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
    let data =
        std::fs::read(&a.input).with_context(|| format!("cannot read {}", a.input.display()))?;
    if data.is_empty() {
        return Err(UsageError(format!("{} is empty: nothing to write", a.input.display())).into());
    }
    let d = Device::open(&a.dev, &a.cache)?;
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

/// What `bench` prints with `--json`.
#[derive(Serialize)]
struct BenchJson {
    nsid: u32,
    lba: u64,
    mib: u64,
    lba_size: u32,
    block_size: u32,
    max_transfer: u32,
    queue_entries: u32,
    readahead_max: u64,
    /// Readahead windows in flight (resolved).
    readahead_depth: u64,
    /// Rounds run; each figure is the fastest of its pass.
    rounds: u32,
    /// Through the cache, with readahead.
    cache: PassReport,
    /// Through the cache, every page on the per-block path.
    per_block: PassReport,
    /// Raw, pipelined on a queue pair.
    raw: RawReport,
    /// Raw, `IoQueuePair::read` in 8 MiB steps (what `rnvme read` does).
    raw_sync: RawReport,
    /// Cache MiB/s over the faster raw pass.
    cache_vs_raw: f64,
    /// Cache MiB/s over per-block MiB/s.
    cache_vs_per_block: f64,
    /// All four passes read the same bytes.
    data_matches: bool,
    /// The [`Digest`] of what the cache pass read (hex), for checking against the source.
    digest: String,
    /// The cache is within 20 % of raw.
    raw_target_met: bool,
    /// The cache is at least 4 times the per-block path.
    per_block_target_met: bool,
}

/// The synchronous raw pass: `IoQueuePair::read` of `SYNC_STEP` at a time into one buffer,
/// copied out after each step, as `rnvme read` does.
fn sync_read(
    d: &Device,
    slba: u64,
    lbas: u64,
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<RawReport> {
    let mut qp = d.ctrl.create_io_qpair(d.entries)?;
    let lba = d.ns.lba_size as u64;
    let step = (SYNC_STEP / lba).max(1);
    let buf = d.ctrl.alloc((step.min(lbas) * lba) as usize)?;
    let mut host = vec![0u8; buf.len()];
    let max = qp.max_transfer_for(d.ns.lba_size) as u64;
    let before = qp.stats().submitted;
    let mut outside = Duration::ZERO;
    let start = Instant::now();
    let mut done = 0;
    while done < lbas {
        let n = step.min(lbas - done);
        qp.read(d.ns.nsid, slba + done, n, &buf)?;
        let bytes = (n * lba) as usize;
        buf.read_bytes(0, &mut host[..bytes]);
        let t = Instant::now();
        sink(done * lba, &host[..bytes]);
        outside += t.elapsed();
        done += n;
    }
    let busy = start.elapsed().saturating_sub(outside);
    Ok(RawReport {
        bytes: lbas * lba,
        seconds: busy.as_secs_f64(),
        mib_per_s: mib_per_s(lbas * lba, busy),
        commands: qp.stats().submitted - before,
        command_bytes: max,
        max_in_flight: (step.min(lbas) * lba)
            .div_ceil(max)
            .min(qp.capacity() as u64) as usize,
    })
}

pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    if a.mib == 0 {
        return Err(usage("--mib must be at least 1".into()));
    }
    let Some(bytes) = a.mib.checked_mul(1 << 20) else {
        return Err(usage(format!("--mib {} is too large", a.mib)));
    };
    if a.rounds == 0 {
        return Err(usage("--rounds must be at least 1".into()));
    }
    if a.depth == Some(0) {
        return Err(usage("--depth must be at least 1".into()));
    }
    let d = Device::open(&a.dev, &a.cache)?;
    let (nsid, lba_size) = (d.ns.nsid, d.ns.lba_size as u64);
    let page = PAGE_SIZE as u64;
    if lba_size > page {
        return Err(usage(format!(
            "namespace {nsid} has {lba_size}-byte LBAs; the page cache needs LBAs of at most {page} bytes"
        )));
    }
    if !a.lba.is_multiple_of(page / lba_size) {
        return Err(usage(format!(
            "--lba {} is not 4 KiB aligned: give a multiple of {}",
            a.lba,
            page / lba_size
        )));
    }
    let lbas = bytes / lba_size;
    if a.lba.saturating_add(lbas) > d.ns.size_lbas {
        return Err(usage(format!(
            "{} MiB at LBA {} reach past namespace {nsid}, which has {} LBAs",
            a.mib, a.lba, d.ns.size_lbas
        )));
    }
    let linear = || {
        Box::new(Linear::new(
            PAGE_SIZE as u32,
            a.lba * lba_size / page,
            bytes / page,
        ))
    };
    let pool = d.pool(a.cache.cache_mib)?;
    let opts = CacheOptions {
        readahead_max: a.readahead_max,
        readahead_depth: a.readahead_depth,
        ..CacheOptions::default()
    };
    let mut digests = Vec::new();
    let mut best: Option<(PassReport, PassReport, RawReport, RawReport)> = None;
    let mut max_transfer = 0;
    let mut ra = (0, 0);
    for _ in 0..a.rounds {
        let mut dg = [Digest::default(); 4];
        let mut cache = PageCache::new(d.block_io()?, pool.clone(), opts.clone())?;
        max_transfer = cache.device().max_transfer();
        ra = (cache.readahead_window_max(), cache.readahead_depth());
        let cached = read_pass(&mut cache, linear(), bytes, READ_CHUNK, |o, b| {
            dg[0].add(o, b);
            Ok(())
        })?;
        cache.set_force_per_block(true);
        let per_block = read_pass(&mut cache, linear(), bytes, READ_CHUNK, |o, b| {
            dg[1].add(o, b);
            Ok(())
        })?;
        drop(cache);
        let mut io = d.block_io()?;
        let depth = a.depth.unwrap_or(usize::MAX).min(io.queue().capacity());
        let raw = raw_read(&mut io, &pool, a.lba, lbas, depth, |o, b| dg[2].add(o, b))?;
        drop(io);
        let raw_sync = sync_read(&d, a.lba, lbas, |o, b| dg[3].add(o, b))?;
        digests.extend(dg);
        best = Some(match best {
            None => (cached, per_block, raw, raw_sync),
            Some((c, p, r, s)) => (
                faster(c, cached, |x| x.mib_per_s),
                faster(p, per_block, |x| x.mib_per_s),
                faster(r, raw, |x| x.mib_per_s),
                faster(s, raw_sync, |x| x.mib_per_s),
            ),
        });
    }
    let (cached, per_block, raw, raw_sync) = best.expect("at least one round");
    let fastest_raw = raw.mib_per_s.max(raw_sync.mib_per_s);
    let cache_vs_raw = cached.mib_per_s / fastest_raw;
    let cache_vs_per_block = cached.mib_per_s / per_block.mib_per_s;
    let data_matches = digests.iter().all(|x| *x == digests[0]);
    let digest_values: Vec<String> = digests
        .iter()
        .map(|x| format!("{:#x}", x.value()))
        .collect();
    let r = BenchJson {
        nsid,
        lba: a.lba,
        mib: a.mib,
        lba_size: lba_size as u32,
        block_size: PAGE_SIZE as u32,
        max_transfer,
        queue_entries: d.entries,
        readahead_max: ra.0,
        readahead_depth: ra.1,
        rounds: a.rounds,
        cache: cached,
        per_block,
        raw,
        raw_sync,
        cache_vs_raw,
        cache_vs_per_block,
        data_matches,
        digest: format!("{:#018x}", digests[0].value()),
        raw_target_met: cache_vs_raw >= 0.8,
        per_block_target_met: cache_vs_per_block >= 4.0,
    };
    let printed = if a.json {
        serde_json::to_string(&r)
            .map_err(anyhow::Error::from)
            .and_then(|j| outln!("{j}"))
    } else {
        print_bench(&r)
    };
    // The data check decides the status even when nobody reads the figures.
    allow_closed_stdout(printed)?;
    if !data_matches {
        anyhow::bail!(
            "{}: the passes read different data (digests of cache, per-block, raw and raw sync passes, by round: {})",
            d.ctrl.name(),
            digest_values.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The one of `a` and `b` with the larger `key`.
fn faster<T>(a: T, b: T, key: impl Fn(&T) -> f64) -> T {
    if key(&b) > key(&a) {
        b
    } else {
        a
    }
}

fn print_bench(r: &BenchJson) -> Result<()> {
    let met = |b: bool| if b { "met" } else { "missed" };
    outln!(
        "sequential read of {} MiB at LBA {} of namespace {} ({}-byte LBAs, {}-byte blocks, max transfer {} bytes, {} queue entries, readahead windows up to {} pages, {} in flight; fastest of {} rounds)",
        r.mib, r.lba, r.nsid, r.lba_size, r.block_size, r.max_transfer, r.queue_entries, r.readahead_max, r.readahead_depth, r.rounds
    )?;
    for (name, p) in [("cache", &r.cache), ("per-block", &r.per_block)] {
        outln!(
            "  {name:<10} {:>9.1} MiB/s  {:>7} commands ({} per-block), {} map calls, {} readahead windows",
            p.mib_per_s,
            p.stats.read_commands,
            p.stats.fallback_commands,
            p.stats.map_calls,
            p.stats.readahead_windows
        )?;
    }
    for (name, p) in [("raw", &r.raw), ("raw sync", &r.raw_sync)] {
        outln!(
            "  {name:<10} {:>9.1} MiB/s  {:>7} commands of up to {} bytes, up to {} in flight",
            p.mib_per_s,
            p.commands,
            p.command_bytes,
            p.max_in_flight
        )?;
    }
    outln!(
        "  cache / raw = {:.2} (target >= 0.80: {}), cache / per-block = {:.2} (target >= 4: {})",
        r.cache_vs_raw,
        met(r.raw_target_met),
        r.cache_vs_per_block,
        met(r.per_block_target_met)
    )?;
    outln!(
        "  data: {}",
        if r.data_matches {
            "all passes read the same bytes"
        } else {
            "the passes read DIFFERENT bytes"
        }
    )?;
    Ok(())
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
        ops.push(
            TraceOp::parse(name, &value)
                .map_err(|e| UsageError(format!("--{name} {value}: {e}")))?,
        );
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
    let lines = rnvme_mpage::trace(&json, &ops).map_err(|e| match e {
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
    use super::*;
    use rnvme_driver::dma::{Backing, DmaPool};
    use rnvme_driver::hw::MemoryOnly;
    use rnvme_mpage::{DiskFill, RecordingDevice};

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
    fn malformed_operation_is_a_usage_error() {
        let e = ops_in_order(&args("rnvme mpage trace --read 4")).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(e.to_string().contains("--read 4"), "{e}");
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

    #[test]
    fn raw_pass_reads_every_byte_in_max_transfer_pieces_with_a_full_queue() {
        let pool = frames(512);
        let mut dev = disk(&pool, 512, 64 << 10);
        dev.set_queue_depth(3);
        dev.set_completions_per_poll(1);
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
}
