//! The passes of `rnvme mpage read`, `write` and `bench`: a file through the cache, and the
//! same bytes read raw from the device, each reporting its figures.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use anyhow::{Context, Result};
use rnvme_driver::clock::Stopwatch;
use rnvme_driver::Segment;
use rnvme_mpage::{
    BlockIo, BlockMap, CacheStats, FileId, IoError, IoOp, IoRequest, PageCache, PagePool,
    SharedCache, CHUNK_BYTES, FRAMES_PER_CHUNK, PAGE_SIZE,
};
use serde::Serialize;

/// Bytes handed to each `write_at` of a write pass.
const WRITE_CHUNK: usize = 1 << 20;
/// Largest command of the raw pass in bytes (each command in flight has its own frames).
const RAW_PIECE_MAX: usize = CHUNK_BYTES;
/// How long the raw pass waits without any completion before giving up.
const RAW_TIMEOUT: Duration = Duration::from_secs(30);

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

pub(super) fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / (1 << 20) as f64 / s
    } else {
        f64::INFINITY
    }
}

impl PassReport {
    pub(super) fn new(bytes: u64, busy: Duration, stats: CacheStats) -> PassReport {
        PassReport {
            bytes,
            seconds: busy.as_secs_f64(),
            mib_per_s: mib_per_s(bytes, busy),
            stats,
        }
    }
}

/// Where a reader's time went: of `busy` seconds (summed over threads where several read),
/// how many it spent copying data out of the frames, waiting for the device (polling for
/// completions it needed) and ringing doorbells; the rest went to the cache's or the pass's
/// own work.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TimeSplit {
    /// The reader's time (the pass's `seconds`; for several threads, the sum of theirs).
    pub busy_seconds: f64,
    /// Copying data from the frames into the reader's buffer.
    pub copy_seconds: f64,
    /// Waiting for completions.
    pub wait_seconds: f64,
    /// Telling the device of commands.
    pub doorbell_seconds: f64,
}

impl TimeSplit {
    /// A cache pass's split, from its busy time and its counters.
    pub fn of_cache(busy: f64, s: &CacheStats) -> TimeSplit {
        TimeSplit {
            busy_seconds: busy,
            copy_seconds: s.copy_out_ns as f64 / 1e9,
            wait_seconds: s.device_wait_ns as f64 / 1e9,
            doorbell_seconds: s.doorbell_ns as f64 / 1e9,
        }
    }

    /// The sum of two splits (two threads' time).
    pub fn plus(self, o: TimeSplit) -> TimeSplit {
        TimeSplit {
            busy_seconds: self.busy_seconds + o.busy_seconds,
            copy_seconds: self.copy_seconds + o.copy_seconds,
            wait_seconds: self.wait_seconds + o.wait_seconds,
            doorbell_seconds: self.doorbell_seconds + o.doorbell_seconds,
        }
    }

    /// "copy 61 %, device wait 12 %, doorbells 2 %, other 25 %" of the busy time.
    pub fn describe(&self) -> String {
        let pct = |x: f64| {
            if self.busy_seconds > 0.0 {
                100.0 * x / self.busy_seconds
            } else {
                0.0
            }
        };
        let other =
            self.busy_seconds - self.copy_seconds - self.wait_seconds - self.doorbell_seconds;
        format!(
            "copy {:.0} %, device wait {:.0} %, doorbells {:.0} %, other {:.0} %",
            pct(self.copy_seconds),
            pct(self.wait_seconds),
            pct(self.doorbell_seconds),
            pct(other.max(0.0))
        )
    }
}

/// A buffer of `len` bytes for a pass to read into, every page of it touched already: a
/// reader's buffer is warm, and the first touch of fresh memory (a page fault, and a 2 MiB page
/// the kernel clears for a large buffer) would otherwise be timed as part of the pass, by
/// chance more in one pass than in another.
pub(super) fn warm_buffer(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.fill(0xa5);
    std::hint::black_box(&mut v);
    v
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
    let mut buf = warm_buffer(chunk.max(1));
    let mut off = 0u64;
    let mut busy = Duration::ZERO;
    while off < size {
        let t = Stopwatch::start();
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

/// [`read_pass`] without the copy: `read_with` hands `sink` the bytes in place, in runs of
/// frames. The time `sink` takes is not counted.
pub fn read_pass_in_place<D: BlockIo>(
    cache: &mut PageCache<D>,
    map: Box<dyn BlockMap>,
    size: u64,
    chunk: usize,
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<PassReport> {
    let f = cache.open(map, size)?;
    cache.reset_stats();
    let mut off = 0u64;
    let mut outside = Duration::ZERO;
    let start = Stopwatch::start();
    while off < size {
        let n = cache
            .read_with(f, off, chunk.max(1), |at, bytes| {
                let t = Stopwatch::start();
                sink(at, bytes);
                outside += t.elapsed();
            })
            .with_context(|| format!("reading the file at byte {off} through the page cache"))?;
        anyhow::ensure!(
            n > 0,
            "the page cache returned no data at byte {off} of a {size}-byte file"
        );
        off += n as u64;
    }
    let busy = start.elapsed().saturating_sub(outside);
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
    let t = Stopwatch::start();
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
    /// Pieces of contiguous memory their data came in (see `CacheStats::data_segments`).
    pub data_segments: u64,
    /// Bytes per command (the last may be shorter).
    pub command_bytes: u64,
    /// Most commands in flight at once.
    pub max_in_flight: usize,
    /// Where the time went.
    pub time: TimeSplit,
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
    sink: impl FnMut(u64, &[u8]),
) -> Result<RawReport> {
    raw_read_as(dev, pool, slba, lbas, depth, false, sink)
}

/// [`raw_read`] without the copy: each completed command's frames are handed to `sink` in
/// place (a view per run of adjacent frames), as a reader that uses the data where the
/// device put it would.
pub fn raw_read_in_place<D: BlockIo>(
    dev: &mut D,
    pool: &PagePool,
    slba: u64,
    lbas: u64,
    depth: usize,
    sink: impl FnMut(u64, &[u8]),
) -> Result<RawReport> {
    raw_read_as(dev, pool, slba, lbas, depth, true, sink)
}

/// Bytes per command of the raw passes on `dev`: its max transfer (at most 2 MiB), in whole
/// pages (0 when that is less than a page).
pub fn raw_piece<D: BlockIo>(dev: &D) -> usize {
    let lba = dev.lba_size() as usize;
    let per_cmd = (dev.max_transfer() as usize)
        .min(65536 * lba)
        .min(RAW_PIECE_MAX);
    per_cmd / PAGE_SIZE * PAGE_SIZE
}

fn raw_read_as<D: BlockIo>(
    dev: &mut D,
    pool: &PagePool,
    slba: u64,
    lbas: u64,
    depth: usize,
    in_place: bool,
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<RawReport> {
    let piece = raw_piece(dev);
    anyhow::ensure!(
        piece >= PAGE_SIZE,
        "{}: a max transfer of {} bytes is less than a page",
        dev.name(),
        dev.max_transfer()
    );
    let total = lbas * dev.lba_size() as u64;
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
            let same_buffer =
                prev.is_some_and(|p| p.index() / FRAMES_PER_CHUNK == fr.index() / FRAMES_PER_CHUNK);
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
    let result = raw_loop(dev, pool, &slots, slba, total, piece, in_place, &mut sink);
    // After a failure commands may still be in flight into the slots' frames: those frames
    // stay out of the pool's free list, never handed out again (the queue pair keeps their
    // memory until the commands complete or the controller stops).
    if result.is_ok() {
        for (frames, _) in slots {
            for fr in frames {
                pool.free(fr);
            }
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

#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn raw_loop<D: BlockIo>(
    dev: &mut D,
    pool: &PagePool,
    slots: &[(Vec<rnvme_mpage::FrameId>, Vec<Segment>)],
    slba: u64,
    total: u64,
    piece: usize,
    in_place: bool,
    sink: &mut impl FnMut(u64, &[u8]),
) -> Result<RawReport> {
    let lba = dev.lba_size() as u64;
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    // Byte offset and length of the piece each slot holds.
    let mut holds = vec![(0u64, 0usize); slots.len()];
    let mut host = warm_buffer(piece);
    let (mut next, mut done, mut commands, mut in_flight, mut max_in_flight) = (0u64, 0, 0, 0, 0);
    let mut data_segments = 0u64;
    let mut outside = Duration::ZERO;
    let mut completed: Vec<(u64, Result<(), IoError>)> = Vec::new();
    let start = Stopwatch::start();
    // The timeout's clock: the time-stamp counter, read every 256th empty poll (in a guest
    // whose clock source is emulated, `Instant::now()` is a system call and a device access,
    // and reading it per poll slowed the raw pass the cache is compared with).
    let mut last_progress = Stopwatch::start();
    let mut empty_polls: u32 = 0;
    // Waiting: from a poll that found nothing to the next one that found something.
    let mut waiting: Option<Stopwatch> = None;
    let (mut wait, mut doorbells, mut copying) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut queued = false;
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
                    queued = true;
                    holds[s] = (next, len);
                    next += len as u64;
                    commands += 1;
                    data_segments += segs.len() as u64;
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
        // Timed only when there is something to ring for: the loop spins through here.
        if queued {
            let t = Stopwatch::start();
            dev.kick();
            doorbells += t.elapsed();
            queued = false;
        } else {
            dev.kick();
        }
        completed.clear();
        dev.poll(&mut |tag, r| completed.push((tag, r)));
        if completed.is_empty() {
            waiting.get_or_insert_with(Stopwatch::start);
            empty_polls = empty_polls.wrapping_add(1);
            if empty_polls.is_multiple_of(256) && last_progress.elapsed() > RAW_TIMEOUT {
                anyhow::bail!(
                    "{}: no raw Read completed in {} s ({in_flight} outstanding)",
                    dev.name(),
                    RAW_TIMEOUT.as_secs()
                );
            }
            continue;
        }
        last_progress = Stopwatch::start();
        if let Some(w) = waiting.take() {
            wait += w.elapsed();
        }
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
            if in_place {
                // One view per segment (a run of adjacent frames in one buffer).
                let mut at = 0usize;
                let mut i = 0usize;
                for seg in cut(&slots[s].1, len) {
                    let view = pool.view(slots[s].0[i], 0, seg.len as usize)?;
                    let t = Stopwatch::start();
                    sink(off + at as u64, &view);
                    outside += t.elapsed();
                    at += seg.len as usize;
                    i += (seg.len as usize).div_ceil(PAGE_SIZE);
                }
            } else {
                // One copy per segment (a run of adjacent frames in one buffer).
                let (mut at, mut i) = (0usize, 0usize);
                let t = Stopwatch::start();
                for seg in cut(&slots[s].1, len) {
                    let n = seg.len as usize;
                    pool.read_run(slots[s].0[i], 0, &mut host[at..at + n]);
                    at += n;
                    i += n.div_ceil(PAGE_SIZE);
                }
                copying += t.elapsed();
                let t = Stopwatch::start();
                sink(off, &host[..len]);
                outside += t.elapsed();
            }
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
        data_segments,
        command_bytes: piece as u64,
        max_in_flight,
        time: TimeSplit {
            busy_seconds: busy.as_secs_f64(),
            copy_seconds: copying.as_secs_f64(),
            wait_seconds: wait.as_secs_f64(),
            doorbell_seconds: doorbells.as_secs_f64(),
        },
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

/// What `threads` threads reading a file each at once (through a [`SharedCache`] or raw) did.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadedReport {
    /// Threads, each reading its own file from start to end.
    pub threads: usize,
    /// Bytes read by all of them.
    pub bytes: u64,
    /// From the moment they all started to the moment the last one finished.
    pub seconds: f64,
    /// `bytes` over `seconds`.
    pub mib_per_s: f64,
    /// Each thread's own MiB/s (its bytes over its own time).
    pub per_thread_mib_per_s: Vec<f64>,
    /// Read commands issued (all shards or queues).
    pub read_commands: u64,
    /// Pieces of contiguous memory their data came in.
    pub data_segments: u64,
    /// Where the threads' time went (summed over them).
    pub time: TimeSplit,
}

/// Open `files` in `cache` (file `t` in shard `t` modulo the shards), read each from start to
/// end in `chunk`-byte `read_at` calls by a thread of its own, all at once, and close them;
/// with `in_place`, in `chunk`-byte [`SharedCache::read_with`] calls instead, which hand the
/// thread the cached pages' bytes without copying them into a buffer of its own.
/// With `warm` (the same files once more), each thread first reads its file through its twin
/// in `warm`, untimed, and closes it: the twin is a file of its own to the cache, so the timed
/// read finds none of its pages cached; the counters are those of the timed reads. With
/// `digests`, each thread also digests what it read (the time for it is then counted too: use
/// it to check data, not for figures). Returns the report and the digests.
pub fn threaded_read<D: BlockIo + Send>(
    cache: &SharedCache<D>,
    files: Vec<(Box<dyn BlockMap>, u64)>,
    chunk: usize,
    warm: Option<Vec<(Box<dyn BlockMap>, u64)>>,
    digests: bool,
    in_place: bool,
) -> Result<(ThreadedReport, Vec<Digest>)> {
    let shards = cache.shards();
    let open = |files: Vec<(Box<dyn BlockMap>, u64)>| {
        files
            .into_iter()
            .enumerate()
            .map(|(t, (map, size))| Ok((cache.open_in(t % shards, map, size)?, size)))
            .collect::<Result<Vec<_>>>()
    };
    let ids = open(files)?;
    let twins: Vec<Option<(FileId, u64)>> = match warm {
        Some(w) => {
            anyhow::ensure!(
                w.len() == ids.len(),
                "{} warm-up files for {} files",
                w.len(),
                ids.len()
            );
            open(w)?.into_iter().map(Some).collect()
        }
        None => vec![None; ids.len()],
    };
    cache.reset_stats()?;
    let read = move |f: FileId, size: u64, buf: &mut [u8], digests: bool| -> Result<Digest> {
        let mut dg = Digest::default();
        let mut off = 0u64;
        while off < size {
            let n = if in_place {
                cache.read_with(f, off, buf.len(), |at, bytes| {
                    if digests {
                        dg.add(at, bytes);
                    }
                    std::hint::black_box(bytes);
                })
            } else {
                cache.read_at(f, off, buf)
            }
            .with_context(|| format!("reading file {f} at byte {off} through the shared cache"))?;
            anyhow::ensure!(n > 0, "the shared cache returned no data at byte {off}");
            if digests && !in_place {
                dg.add(off, &buf[..n]);
            }
            off += n as u64;
        }
        Ok(dg)
    };
    let workers = ids
        .iter()
        .zip(twins)
        .map(|(&(f, size), twin)| {
            move || {
                let mut buf = warm_buffer(chunk.max(1));
                let warmed = match twin {
                    Some((w, wsize)) => read(w, wsize, &mut buf, false).and_then(|_| {
                        cache
                            .close(w)
                            .context("closing a warm-up file of the shared cache")
                    }),
                    None => Ok(()),
                };
                move || -> Result<Digest> {
                    warmed?;
                    read(f, size, &mut buf, digests)
                }
            }
        })
        .collect();
    // The counters count the timed reads only: reset once every thread is warm.
    let (results, wall) = at_once(workers, || {
        if let Err(e) = cache.reset_stats() {
            log::warn!("resetting the shared cache's counters: {e}");
        }
    });
    let stats = cache.stats()?;
    let mut per_thread = Vec::new();
    let mut out = Vec::new();
    let mut busy_sum = 0.0;
    for (r, &(f, size)) in results.into_iter().zip(&ids) {
        let (dg, busy) = r?;
        busy_sum += busy.as_secs_f64();
        per_thread.push(mib_per_s(size, busy));
        out.push(dg);
        cache
            .close(f)
            .context("closing a file of the shared cache")?;
    }
    let bytes: u64 = ids.iter().map(|&(_, s)| s).sum();
    Ok((
        ThreadedReport {
            threads: ids.len(),
            bytes,
            seconds: wall.as_secs_f64(),
            mib_per_s: mib_per_s(bytes, wall),
            per_thread_mib_per_s: per_thread,
            read_commands: stats.read_commands,
            data_segments: stats.data_segments,
            time: TimeSplit::of_cache(busy_sum, &stats),
        },
        out,
    ))
}

/// What a pass of random page reads did.
#[derive(Clone, Debug, Serialize)]
pub struct RandomReport {
    /// Pages read, one `read_at` (or one command) each, one at a time.
    pub reads: u64,
    /// Time spent reading.
    pub seconds: f64,
    /// `reads` over `seconds`.
    pub iops: f64,
    /// Read commands issued.
    pub commands: u64,
}

impl RandomReport {
    pub(super) fn new(reads: u64, busy: Duration, commands: u64) -> RandomReport {
        let s = busy.as_secs_f64();
        RandomReport {
            reads,
            seconds: s,
            iops: if s > 0.0 { reads as f64 / s } else { 0.0 },
            commands,
        }
    }
}

/// Open `map` as a file of `size` bytes in a cold cache and read the pages `pages`, in that
/// order, one 4 KiB `read_at` each; hand each page to `sink`.
pub fn random_pass<D: BlockIo>(
    cache: &mut PageCache<D>,
    map: Box<dyn BlockMap>,
    size: u64,
    pages: &[u64],
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<RandomReport> {
    let f = cache.open(map, size)?;
    cache.reset_stats();
    let mut buf = warm_buffer(PAGE_SIZE);
    let mut busy = Duration::ZERO;
    for &p in pages {
        let t = Stopwatch::start();
        let n = cache
            .read_at(f, p * PAGE_SIZE as u64, &mut buf)
            .with_context(|| format!("reading page {p} through the page cache"))?;
        busy += t.elapsed();
        sink(p * PAGE_SIZE as u64, &buf[..n]);
    }
    let commands = cache.stats().read_commands;
    close(cache, f)?;
    Ok(RandomReport::new(pages.len() as u64, busy, commands))
}

/// Run `workers` on a thread each, all at once. A worker first gets ready (buffers touched,
/// a warm-up: not timed) and returns its work; once every worker is ready, `between` runs
/// (on one of the threads), and then the works start together. Returns each work's result
/// with its own time, in the order of `workers`, and the time from the first work's start to
/// the last one's end (not from the threads' creation).
pub(super) fn at_once<P, W, T>(
    workers: Vec<P>,
    between: impl Fn() + Sync,
) -> (Vec<Result<(T, Duration)>>, Duration)
where
    P: FnOnce() -> W + Send,
    W: FnOnce() -> Result<T>,
    T: Send,
{
    let ready = std::sync::Barrier::new(workers.len());
    let start = std::sync::Barrier::new(workers.len());
    let t0 = Stopwatch::start();
    let ran: Vec<Result<(T, Duration, Duration, Duration)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|get_ready| {
                let (ready, start, between) = (&ready, &start, &between);
                let t0 = &t0;
                sc.spawn(move || {
                    // A worker that panics getting ready still meets the others at both
                    // barriers (else they would wait for it for ever), then reports it.
                    let work = catch_unwind(AssertUnwindSafe(get_ready));
                    if ready.wait().is_leader() && catch_unwind(AssertUnwindSafe(&between)).is_err()
                    {
                        log::error!("a worker panicked between getting ready and starting");
                    }
                    start.wait();
                    let work = work.map_err(|_| {
                        anyhow::anyhow!("a worker thread panicked while getting ready")
                    })?;
                    let began = Stopwatch::start();
                    let began_at = t0.elapsed();
                    let out = work()?;
                    Ok((out, began.elapsed(), began_at, t0.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked")))
            })
            .collect()
    });
    let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
    let results = ran
        .into_iter()
        .map(|r| {
            r.map(|(out, busy, began_at, ended_at)| {
                first = first.min(began_at);
                last = last.max(ended_at);
                (out, busy)
            })
        })
        .collect();
    (results, last.saturating_sub(first))
}

/// Read each of `files` (first LBA, LBAs) raw, as [`raw_read`] does at `depth`, on a thread
/// of its own with a queue and frames of its own (`queues[t]` for file `t`), all at once: the
/// raw counterpart of [`threaded_read`], for what the device gives several threads without a
/// cache. With `warm`, each thread first reads its file once untimed.
pub fn threaded_raw_read<D: BlockIo + Send>(
    queues: Vec<(D, PagePool)>,
    files: &[(u64, u64)],
    depth: usize,
    warm: bool,
) -> Result<ThreadedReport> {
    anyhow::ensure!(
        queues.len() == files.len(),
        "{} queues for {} files",
        queues.len(),
        files.len()
    );
    let workers = queues
        .into_iter()
        .zip(files)
        .map(|((mut dev, pool), &(slba, lbas))| {
            move || {
                let warmed = if warm {
                    raw_read(&mut dev, &pool, slba, lbas, depth, |_, _| {}).map(|_| ())
                } else {
                    Ok(())
                };
                move || {
                    warmed?;
                    raw_read(&mut dev, &pool, slba, lbas, depth, |_, _| {})
                }
            }
        })
        .collect();
    let (results, wall) = at_once(workers, || {});
    let (mut bytes, mut commands, mut segments, mut per_thread) = (0, 0, 0, Vec::new());
    let mut time = TimeSplit::default();
    for r in results {
        let (report, busy) = r?;
        time = time.plus(report.time);
        per_thread.push(mib_per_s(report.bytes, busy));
        bytes += report.bytes;
        commands += report.commands;
        segments += report.data_segments;
    }
    Ok(ThreadedReport {
        threads: files.len(),
        bytes,
        seconds: wall.as_secs_f64(),
        mib_per_s: mib_per_s(bytes, wall),
        per_thread_mib_per_s: per_thread,
        read_commands: commands,
        data_segments: segments,
        time,
    })
}
