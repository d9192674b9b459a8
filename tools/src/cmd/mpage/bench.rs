//! `rnvme mpage bench`: a contiguous file read through the cache, on the per-block path and
//! raw, side by side; with `--threads`, several files by several threads at once; and random
//! page reads through the cache against the same reads raw.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use rnvme_driver::clock::Stopwatch;
use rnvme_mpage::{
    BlockIo, BlockMap, CacheOptions, Linear, PageCache, PagePool, SharedCache, MAX_SHARDS,
    PAGE_SIZE,
};
use serde::Serialize;

use super::passes::{
    mib_per_s, random_pass, raw_piece, raw_read, raw_read_in_place, read_pass, read_pass_in_place,
    threaded_raw_read, threaded_read, warm_buffer, Digest, PassReport, RandomReport, RawReport,
    ThreadedReport, TimeSplit,
};
use super::{BenchArgs, Device, READ_CHUNK};
use crate::cmd::{allow_closed_stdout, outln, UsageError};

/// Bytes per `IoQueuePair::read` call of the synchronous raw pass (as `rnvme read` does).
const SYNC_STEP: u64 = 8 << 20;

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
    /// Timed rounds run (after a round that checks the data); each figure is the fastest
    /// of its pass.
    rounds: u32,
    /// Through the cache, with readahead.
    cache: PassReport,
    /// Through the cache, every page on the per-block path.
    per_block: PassReport,
    /// Raw, pipelined on a queue pair.
    raw: RawReport,
    /// Raw, `IoQueuePair::read` in 8 MiB steps (what `rnvme read` does).
    raw_sync: RawReport,
    /// Through the cache, the bytes used in place (`read_with`), no copy.
    cache_in_place: PassReport,
    /// Raw, pipelined, the bytes used in place in the frames the device wrote, no copy.
    raw_in_place: RawReport,
    /// In-place cache MiB/s over in-place raw MiB/s.
    in_place_cache_vs_raw: f64,
    /// Cache MiB/s over the faster raw pass.
    cache_vs_raw: f64,
    /// Cache MiB/s over per-block MiB/s.
    cache_vs_per_block: f64,
    /// All four passes read the same bytes.
    data_matches: bool,
    /// The [`Digest`] of what the cache pass read (hex), for checking against the source.
    digest: String,
    /// The cache is within 10 % of raw.
    raw_target_met: bool,
    /// The cache is at least 4 times the per-block path.
    per_block_target_met: bool,
    /// With `--threads` above 1: several files by several threads at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<ThreadsJson>,
    /// With `--random` above 0: random page reads, cache and raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    random: Option<RandomJson>,
}

/// The threaded passes of `bench`.
#[derive(Serialize)]
struct ThreadsJson {
    /// One thread reading the first file through a shared cache of one shard (fastest round).
    one: ThreadedReport,
    /// `--threads` threads reading a file each through a shared cache of one shard (and one
    /// queue pair) per thread (fastest round).
    many: ThreadedReport,
    /// `many` MiB/s over `one` MiB/s.
    scaling: f64,
    /// One thread reading the first file raw, as the raw pass does (fastest round).
    raw_one: ThreadedReport,
    /// `--threads` threads reading a file each raw, on a queue pair each (fastest round).
    raw_many: ThreadedReport,
    /// `raw_many` MiB/s over `raw_one` MiB/s: what the device and the machine give several
    /// threads without a cache, measured beside `scaling`.
    raw_scaling: f64,
    /// Every thread read what raw reads of its file read.
    data_matches: bool,
    /// The threads read the pages in place (`--in-place`) rather than copying them out.
    in_place: bool,
}

/// The random passes of `bench`.
#[derive(Serialize)]
struct RandomJson {
    /// Through a cold cache, one `read_at` of a page at a time (fastest round).
    cache: RandomReport,
    /// `IoQueuePair::read` of the same pages, one at a time (fastest round).
    raw: RandomReport,
    /// Cache IOPS over raw IOPS.
    cache_vs_raw: f64,
    /// Both read the same bytes.
    data_matches: bool,
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
    let mut host = warm_buffer(buf.len());
    let max = qp.max_transfer_for(d.ns.lba_size) as u64;
    let before = qp.stats().submitted;
    // The synchronous read's whole call counts as waiting (its doorbell included).
    let (mut outside, mut copying, mut waiting) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let start = Stopwatch::start();
    let mut done = 0;
    while done < lbas {
        let n = step.min(lbas - done);
        let t = Stopwatch::start();
        qp.read(d.ns.nsid, slba + done, n, &buf)?;
        waiting += t.elapsed();
        let bytes = (n * lba) as usize;
        let t = Stopwatch::start();
        buf.read_bytes(0, &mut host[..bytes]);
        copying += t.elapsed();
        let t = Stopwatch::start();
        sink(done * lba, &host[..bytes]);
        outside += t.elapsed();
        done += n;
    }
    let busy = start.elapsed().saturating_sub(outside);
    let commands = qp.stats().submitted - before;
    Ok(RawReport {
        bytes: lbas * lba,
        seconds: busy.as_secs_f64(),
        mib_per_s: mib_per_s(lbas * lba, busy),
        commands,
        // One buffer, contiguous in IOVA: a piece per command.
        data_segments: commands,
        command_bytes: max,
        max_in_flight: (step.min(lbas) * lba)
            .div_ceil(max)
            .min(qp.capacity() as u64) as usize,
        time: TimeSplit {
            busy_seconds: busy.as_secs_f64(),
            copy_seconds: copying.as_secs_f64(),
            wait_seconds: waiting.as_secs_f64(),
            doorbell_seconds: 0.0,
        },
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
    if a.threads == 0 || a.threads > MAX_SHARDS {
        return Err(usage(format!(
            "--threads must be 1 to {MAX_SHARDS}, not {}",
            a.threads
        )));
    }
    let d = Device::open(&a.dev, &a.cache)?;
    learn_clock();
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
    let all = lbas.saturating_mul(a.threads as u64);
    if a.lba.saturating_add(all) > d.ns.size_lbas {
        return Err(usage(format!(
            "{} file(s) of {} MiB at LBA {} reach past namespace {nsid}, which has {} LBAs",
            a.threads, a.mib, a.lba, d.ns.size_lbas
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
        kick_batch: a.kick_batch,
        ..CacheOptions::default()
    };
    let mut digests = Vec::new();
    #[allow(clippy::type_complexity)]
    let mut best: Option<(
        PassReport,
        PassReport,
        RawReport,
        RawReport,
        PassReport,
        RawReport,
    )> = None;
    let mut max_transfer = 0;
    let mut ra = (0, 0);
    // Round 0 checks the data: every pass digests what it read (the digests must agree).
    // The rounds after it are the timed ones: their passes hand the data to nothing, so the
    // device is not left to work unseen while a digest runs.
    for round in 0..=a.rounds {
        let check = round == 0;
        let mut dg = [Digest::default(); 6];
        let mut cache = PageCache::new(d.block_io()?, pool.clone(), opts.clone())?;
        max_transfer = cache.device().max_transfer();
        ra = (cache.readahead_window_max(), cache.readahead_depth());
        let cached = read_pass(&mut cache, linear(), bytes, READ_CHUNK, |o, b| {
            if check {
                dg[0].add(o, b);
            }
            Ok(())
        })?;
        let in_place = read_pass_in_place(&mut cache, linear(), bytes, READ_CHUNK, |o, b| {
            if check {
                dg[4].add(o, b)
            }
        })?;
        cache.set_force_per_block(true);
        let per_block = read_pass(&mut cache, linear(), bytes, READ_CHUNK, |o, b| {
            if check {
                dg[1].add(o, b);
            }
            Ok(())
        })?;
        drop(cache);
        let mut io = d.block_io()?;
        let depth = a.depth.unwrap_or(usize::MAX).min(io.queue().capacity());
        let raw = raw_read(&mut io, &pool, a.lba, lbas, depth, |o, b| {
            if check {
                dg[2].add(o, b)
            }
        })?;
        let raw_in_place = raw_read_in_place(&mut io, &pool, a.lba, lbas, depth, |o, b| {
            if check {
                dg[5].add(o, b)
            }
        })?;
        drop(io);
        let raw_sync = sync_read(&d, a.lba, lbas, |o, b| {
            if check {
                dg[3].add(o, b)
            }
        })?;
        if check {
            digests.extend(dg);
            continue;
        }
        best = Some(match best {
            None => (cached, per_block, raw, raw_sync, in_place, raw_in_place),
            Some((c, p, r, s, ci, ri)) => (
                faster(c, cached, |x| x.mib_per_s),
                faster(p, per_block, |x| x.mib_per_s),
                faster(r, raw, |x| x.mib_per_s),
                faster(s, raw_sync, |x| x.mib_per_s),
                faster(ci, in_place, |x| x.mib_per_s),
                faster(ri, raw_in_place, |x| x.mib_per_s),
            ),
        });
    }
    let (cached, per_block, raw, raw_sync, cache_in_place, raw_in_place) =
        best.expect("at least one round");
    let in_place_cache_vs_raw = cache_in_place.mib_per_s / raw_in_place.mib_per_s;
    let threads = if a.threads > 1 {
        Some(threads_passes(&d, &a, &pool, &opts)?)
    } else {
        None
    };
    let random = if a.random > 0 {
        Some(random_passes(&d, &a, &pool, &opts)?)
    } else {
        None
    };
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
        cache_in_place,
        raw_in_place,
        in_place_cache_vs_raw,
        cache_vs_raw,
        cache_vs_per_block,
        data_matches,
        digest: format!("{:#018x}", digests[0].value()),
        raw_target_met: cache_vs_raw >= 0.9,
        per_block_target_met: cache_vs_per_block >= 4.0,
        threads,
        random,
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
    if let Some(t) = &r.threads {
        anyhow::ensure!(
            t.data_matches,
            "{}: a thread of the shared cache read different data from raw reads of its file",
            d.ctrl.name()
        );
    }
    if let Some(x) = &r.random {
        anyhow::ensure!(
            x.data_matches,
            "{}: random reads through the cache and raw read different data",
            d.ctrl.name()
        );
    }
    if !data_matches {
        anyhow::bail!(
            "{}: the passes read different data (digests of cache, per-block, raw, raw sync, cache in place and raw in place passes: {})",
            d.ctrl.name(),
            digest_values.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Fix the time-stamp counter's rate before anything is timed, so that every pass's
/// [`Stopwatch`] reads the counter alone: `Instant::now()` is a system call and an emulated
/// HPET read in a guest, and the passes take from one clock read per command (raw) to one per
/// 8 MiB (raw sync), so reading it would weigh on the passes unevenly.
fn learn_clock() {
    rnvme_driver::clock::start_learning_rate();
    // The rate is fixed by the first look after 50 ms of learning.
    std::thread::sleep(Duration::from_millis(55));
    let _ = rnvme_driver::clock::learned_rate();
}

/// The one of `a` and `b` with the larger `key`.
fn faster<T>(a: T, b: T, key: impl Fn(&T) -> f64) -> T {
    if key(&b) > key(&a) {
        b
    } else {
        a
    }
}

/// The `time:` line under a threads pass: where the threads' time went, and one thread's.
fn threads_time(many: &ThreadedReport, one: &ThreadedReport) -> String {
    format!(
        "{:13}time: {} threads: {}; one thread: {}",
        "",
        many.threads,
        many.time.describe(),
        one.time.describe()
    )
}

fn print_bench(r: &BenchJson) -> Result<()> {
    let met = |b: bool| if b { "met" } else { "missed" };
    outln!(
        "sequential read of {} MiB at LBA {} of namespace {} ({}-byte LBAs, {}-byte blocks, max transfer {} bytes, {} queue entries, readahead windows up to {} pages, {} in flight; fastest of {} rounds)",
        r.mib, r.lba, r.nsid, r.lba_size, r.block_size, r.max_transfer, r.queue_entries, r.readahead_max, r.readahead_depth, r.rounds
    )?;
    for (name, p) in [("cache", &r.cache), ("per-block", &r.per_block)] {
        outln!(
            "  {name:<10} {:>9.1} MiB/s  {:>7} commands ({} per-block) in {} doorbells, {} data pieces, {} map calls, {} readahead windows",
            p.mib_per_s,
            p.stats.read_commands,
            p.stats.fallback_commands,
            p.stats.kicks,
            p.stats.data_segments,
            p.stats.map_calls,
            p.stats.readahead_windows
        )?;
        outln!(
            "{:13}time: {}",
            "",
            TimeSplit::of_cache(p.seconds, &p.stats).describe()
        )?;
    }
    for (name, p) in [("raw", &r.raw), ("raw sync", &r.raw_sync)] {
        outln!(
            "  {name:<10} {:>9.1} MiB/s  {:>7} commands of up to {} bytes, up to {} in flight, {} data pieces",
            p.mib_per_s,
            p.commands,
            p.command_bytes,
            p.max_in_flight,
            p.data_segments
        )?;
        outln!("{:13}time: {}", "", p.time.describe())?;
    }
    outln!(
        "  in place   {:>9.1} MiB/s  through the cache without a copy ({} commands); raw in place {:.1} MiB/s; cache / raw = {:.2}",
        r.cache_in_place.mib_per_s,
        r.cache_in_place.stats.read_commands,
        r.raw_in_place.mib_per_s,
        r.in_place_cache_vs_raw
    )?;
    outln!(
        "  cache / raw = {:.2} (target >= 0.9: {}), cache / per-block = {:.2} (target >= 4: {})",
        r.cache_vs_raw,
        met(r.raw_target_met),
        r.cache_vs_per_block,
        met(r.per_block_target_met)
    )?;
    if let Some(t) = &r.threads {
        let per: Vec<String> = t
            .many
            .per_thread_mib_per_s
            .iter()
            .map(|x| format!("{x:.1}"))
            .collect();
        outln!(
            "  threads    {:>9.1} MiB/s  {} threads on {} files{} (each {} MiB/s), {} commands, {} data pieces; one thread {:.1} MiB/s ({} data pieces); {} / 1 = {:.2} (target >= 1.3: {}); data {}",
            t.many.mib_per_s,
            t.many.threads,
            t.many.threads,
            if t.in_place { " in place" } else { "" },
            per.join(", "),
            t.many.read_commands,
            t.many.data_segments,
            t.one.mib_per_s,
            t.one.data_segments,
            t.many.threads,
            t.scaling,
            met(t.scaling >= 1.3),
            if t.data_matches { "matches raw" } else { "DIFFERS from raw" }
        )?;
        outln!("{}", threads_time(&t.many, &t.one))?;
        outln!(
            "  raw threads{:>9.1} MiB/s  {} threads raw on a queue each ({} commands, {} data pieces); one thread {:.1} MiB/s; {} / 1 = {:.2}",
            t.raw_many.mib_per_s,
            t.raw_many.threads,
            t.raw_many.read_commands,
            t.raw_many.data_segments,
            t.raw_one.mib_per_s,
            t.raw_many.threads,
            t.raw_scaling
        )?;
        outln!("{}", threads_time(&t.raw_many, &t.raw_one))?;
    }
    if let Some(x) = &r.random {
        outln!(
            "  random     {:>9.0} IOPS   {} distinct 4 KiB pages one at a time through a cold cache ({} commands); raw {:.0} IOPS; cache / raw = {:.2}; data {}",
            x.cache.iops,
            x.cache.reads,
            x.cache.commands,
            x.raw.iops,
            x.cache_vs_raw,
            if x.data_matches { "matches" } else { "DIFFERS" }
        )?;
    }
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

/// File `t` of the bench: `--mib` MiB from `--lba`, the files one after the other.
fn file_map(d: &Device, a: &BenchArgs, t: usize) -> (Box<dyn BlockMap>, u64) {
    let page = PAGE_SIZE as u64;
    let bytes = a.mib << 20;
    let first = a.lba * d.ns.lba_size as u64 / page + t as u64 * (bytes / page);
    (
        Box::new(Linear::new(PAGE_SIZE as u32, first, bytes / page)),
        bytes,
    )
}

/// One thread on one file, then `--threads` threads on a file each, through shared caches of
/// one shard per thread over the same frames; then a checked round against raw reads.
///
/// Every thread, cache or raw, reads its file once untimed before its timed read. Under an
/// emulator a thread that starts on a vCPU that had been idle reads the same file through
/// the same cache at about half the speed of one that has been working: in one guest, a
/// `SharedCache` read on the bench's main thread made 1 600–2 000 MiB/s and the same read on
/// a thread just spawned 750–1 350 MiB/s, its copy loop alone 1.4× slower; neither where its
/// buffer was allocated, nor its alignment, nor the CPU it ran on made the difference, and a
/// thread that had read the file once before read it again at 1 500–1 760 MiB/s. A storage
/// engine's threads are warm: so are the bench's, or one thread's figure would be half what
/// the cache pass shows for the same reader.
fn threads_passes(
    d: &Device,
    a: &BenchArgs,
    pool: &PagePool,
    opts: &CacheOptions,
) -> Result<ThreadsJson> {
    let shared = |n: usize| -> Result<SharedCache<_>> {
        let queues = (0..n).map(|_| d.block_io()).collect::<Result<Vec<_>>>()?;
        Ok(SharedCache::new(queues, pool.clone(), opts.clone())?)
    };
    let files = |n: usize| (0..n).map(|t| file_map(d, a, t)).collect::<Vec<_>>();
    let lba = d.ns.lba_size as u64;
    let lbas = (a.mib << 20) / lba;
    // The raw threads: each with frames of its own, its share of the cache's memory (taking
    // frames from one pool at once, they would interleave, and leave the cache's pool in
    // pieces for the passes after them), at the queue's depth or as deep as its frames go.
    let raw = |n: usize| -> Result<ThreadedReport> {
        let mib_each = (a.cache.cache_mib / n as u64).max(1);
        let queues = (0..n)
            .map(|_| Ok((d.block_io()?, d.pool(mib_each)?)))
            .collect::<Result<Vec<_>>>()?;
        let (q, p) = &queues[0];
        let per_command = (raw_piece(q) / PAGE_SIZE).max(1);
        let depth = q
            .queue()
            .capacity()
            .min(a.depth.unwrap_or(usize::MAX))
            .min(p.frames() / per_command);
        let spans: Vec<(u64, u64)> = (0..n as u64).map(|t| (a.lba + t * lbas, lbas)).collect();
        threaded_raw_read(queues, &spans, depth, true)
    };
    let best_of = |best: Option<ThreadedReport>, r: ThreadedReport| match best {
        None => r,
        Some(b) => faster(b, r, |x| x.mib_per_s),
    };
    let mut best: [Option<ThreadedReport>; 4] = Default::default();
    for _ in 0..a.rounds {
        let (one, _) = threaded_read(
            &shared(1)?,
            files(1),
            READ_CHUNK,
            Some(files(1)),
            false,
            a.in_place,
        )?;
        let (many, _) = threaded_read(
            &shared(a.threads)?,
            files(a.threads),
            READ_CHUNK,
            Some(files(a.threads)),
            false,
            a.in_place,
        )?;
        let raw_one = raw(1)?;
        let raw_many = raw(a.threads)?;
        for (slot, r) in best.iter_mut().zip([one, many, raw_one, raw_many]) {
            *slot = Some(best_of(slot.take(), r));
        }
    }
    let [Some(one), Some(many), Some(raw_one), Some(raw_many)] = best else {
        anyhow::bail!("no threaded round ran");
    };
    // The data: each thread's digest against raw reads of its file.
    let (_, digests) = threaded_read(
        &shared(a.threads)?,
        files(a.threads),
        READ_CHUNK,
        None,
        true,
        a.in_place,
    )?;
    let mut io = d.block_io()?;
    let depth = io.queue().capacity();
    let mut data_matches = true;
    for (t, got) in digests.iter().enumerate() {
        let mut want = Digest::default();
        raw_read(
            &mut io,
            pool,
            a.lba + t as u64 * lbas,
            lbas,
            depth,
            |o, b| want.add(o, b),
        )?;
        data_matches &= *got == want;
    }
    Ok(ThreadsJson {
        scaling: many.mib_per_s / one.mib_per_s,
        one,
        many,
        raw_scaling: raw_many.mib_per_s / raw_one.mib_per_s,
        raw_one,
        raw_many,
        data_matches,
        in_place: a.in_place,
    })
}

/// `--random` page reads of the first file through a cold cache, then the same pages raw,
/// one command at a time.
fn random_passes(
    d: &Device,
    a: &BenchArgs,
    pool: &PagePool,
    opts: &CacheOptions,
) -> Result<RandomJson> {
    let page = PAGE_SIZE as u64;
    let pages_in_file = (a.mib << 20) / page;
    // Distinct pages (each read is a miss for the cache too), as many as asked and the file has.
    let mut rng = rnvme_tools::perf::gen::Rng::new(0x5EED);
    let mut seen = std::collections::HashSet::new();
    let want = a.random.min(pages_in_file) as usize;
    let mut pages: Vec<u64> = Vec::with_capacity(want);
    while pages.len() < want {
        let p = rng.below(pages_in_file);
        if seen.insert(p) {
            pages.push(p);
        }
    }
    let lpp = page / d.ns.lba_size as u64;
    let mut best: Option<(RandomReport, RandomReport)> = None;
    let mut digests = Vec::new();
    for _ in 0..a.rounds {
        let mut dg = [Digest::default(); 2];
        let mut cache = PageCache::new(d.block_io()?, pool.clone(), opts.clone())?;
        let (map, size) = file_map(d, a, 0);
        let cached = random_pass(&mut cache, map, size, &pages, |o, b| dg[0].add(o, b))?;
        drop(cache);
        let mut qp = d.ctrl.create_io_qpair(d.entries)?;
        let buf = d.ctrl.alloc(PAGE_SIZE)?;
        let mut host = warm_buffer(PAGE_SIZE);
        let mut busy = Duration::ZERO;
        for &p in &pages {
            let t = Stopwatch::start();
            qp.read(d.ns.nsid, a.lba + p * lpp, lpp, &buf)?;
            buf.read_bytes(0, &mut host);
            busy += t.elapsed();
            dg[1].add(p * page, &host);
        }
        let raw = RandomReport::new(pages.len() as u64, busy, pages.len() as u64);
        digests.extend(dg);
        best = Some(match best {
            None => (cached, raw),
            Some((c, r)) => (faster(c, cached, |x| x.iops), faster(r, raw, |x| x.iops)),
        });
    }
    let (cache, raw) = best.expect("at least one round");
    Ok(RandomJson {
        cache_vs_raw: cache.iops / raw.iops,
        cache,
        raw,
        data_matches: digests.iter().all(|x| *x == digests[0]),
    })
}
