//! The I/O loops: one per thread, either on its own queue pairs (no locks, one doorbell per
//! queue per loop turn) or through a reactor thread that owns the queue pairs.
//!
//! Timing: an I/O's latency runs from the timestamp taken when its commands were queued to the
//! one taken when the poll that reaped its last command returned. Timestamps are [`Ticks`]
//! (the time-stamp counter, a few nanoseconds to read; `Instant::now()` costs about 2 µs in a
//! TCG guest whose clock source is the emulated HPET), converted to time with a [`TickRate`]
//! calibrated before the run. One reading per poll that found completions serves as both the
//! completion time of what it reaped and the submission time of what is queued in its place;
//! idle polls read the counter every [`IDLE_CLOCK_EVERY`] turns, to notice the end of the run.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rnvme_driver::dma::DmaBuffer;
use rnvme_driver::io::{read_cmd, write_cmd, IoQueuePair};
use rnvme_driver::queue::{Completion, QueueStats};
use rnvme_driver::reactor::{
    wait_parked, Completer, IoData, IoDone, IoRequest, Next, Reactor, ReactorConfig, ReactorHandle,
    Reply, TickRate, Ticks,
};
use rnvme_driver::spec::SqEntry;
use rnvme_driver::NvmeStatus;

use super::gen::{is_read, Access, OffsetGen, Rng};
use super::report::{
    Acc, Counters, ErrorReport, NsReport, PerfReport, ReactorCounters, Summary, ThreadReport,
};
use super::{PerfConfig, PerfError, Progress, Target, TargetPlan, STAMP_MAGIC};

/// Idle polls between two clock reads.
const IDLE_CLOCK_EVERY: u32 = 16;
/// A run in which nothing completes for this long has lost its controller.
const STALL: Duration = Duration::from_secs(30);
/// How long the end of a run waits for the commands still in flight.
const DRAIN: Duration = Duration::from_secs(10);
/// Failed commands remembered per thread for the report.
const KEEP_ERRORS: usize = 8;
/// Reactor clients: empty checks of the answer channel before parking. Spinning does not pay
/// where clients and the reactor share few CPUs: the device takes far longer than a wake-up.
/// The checks carry no spin-loop hint (on an emulated CPU each hint can stop the world), and
/// the client parks with `wait_parked` rather than a blocking receive, which hints before it
/// sleeps.
const CLIENT_SPINS: u32 = 16;

/// Where the run is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    Stop,
}

/// The run's schedule, as one thread sees it.
struct Clock {
    phase: Phase,
    measure_at: Ticks,
    end_at: Ticks,
    measure_started: Ticks,
    rate: TickRate,
    measured: Duration,
    /// The measured window has opened.
    opened: bool,
}

impl Clock {
    fn new(start: Ticks, cfg: &PerfConfig, rate: TickRate) -> Clock {
        let measure_at = start.after(rate.ticks(cfg.warmup));
        Clock {
            rate,
            phase: if cfg.warmup.is_zero() {
                Phase::Measure
            } else {
                Phase::Warmup
            },
            measure_at,
            end_at: measure_at.after(rate.ticks(cfg.duration)),
            measure_started: start,
            measured: Duration::ZERO,
            opened: cfg.warmup.is_zero(),
        }
    }

    /// Advance to `now` (or straight to the end on `abort`).
    #[inline]
    fn tick(&mut self, now: Ticks, abort: bool) {
        if self.phase == Phase::Warmup && now >= self.measure_at {
            self.phase = Phase::Measure;
            self.measure_started = now;
            self.opened = true;
        }
        if self.phase != Phase::Stop && (now >= self.end_at || abort) {
            if self.phase == Phase::Measure {
                self.measured = self.rate.duration(now.since(self.measure_started));
            }
            self.phase = Phase::Stop;
        }
    }

    /// 0 before the measured window opened, 1 after.
    #[inline]
    fn epoch(&self) -> u8 {
        self.opened as u8
    }
}

/// Shared between the workers and the thread that reports progress. Nothing here is touched
/// more than once per loop turn.
pub(crate) struct Shared {
    barrier: Barrier,
    /// Set by a failing worker (set-up error, --stop-on-error): everyone stops.
    abort: AtomicBool,
    counters: Vec<ProgressCounters>,
    finished: AtomicUsize,
    first_failure: Mutex<Option<PerfError>>,
}

/// One worker's running totals, on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct ProgressCounters {
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn new(workers: usize) -> Shared {
        Shared {
            barrier: Barrier::new(workers + 1),
            abort: AtomicBool::new(false),
            counters: (0..workers).map(|_| ProgressCounters::default()).collect(),
            finished: AtomicUsize::new(0),
            first_failure: Mutex::new(None),
        }
    }

    fn fail(&self, e: PerfError) {
        self.abort.store(true, Ordering::Relaxed);
        let mut f = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    }
}

/// One I/O in flight (or ready to go): its buffer and what it is doing.
struct Slot {
    buf: DmaBuffer,
    /// The separate metadata buffer, on namespaces that keep metadata apart.
    meta: Option<DmaBuffer>,
    lba: u64,
    read: bool,
    submitted: Ticks,
    /// Commands of this I/O not yet completed.
    left: u32,
    failed: bool,
    /// Queue pair (index among this target's) it always goes to.
    queue: usize,
    busy: bool,
}

/// One command's share of an I/O: LBA offset, LBAs, byte offset.
#[derive(Copy, Clone, Debug)]
struct PieceT {
    lba_off: u64,
    blocks: u32,
    byte_off: usize,
}

/// One thread's work on one namespace.
struct NsWork {
    label: String,
    nsid: u32,
    /// Bytes of the data buffer per LBA (the block, and its metadata on an extended-LBA
    /// format).
    lba_size: u32,
    /// Bytes of the separate metadata buffer per LBA (0: none).
    ms: u32,
    /// Bytes of logical block data per I/O (the -o size: metadata not counted).
    io_bytes: u64,
    blocks: u32,
    pieces: Vec<PieceT>,
    gen: OffsetGen,
    read_percent: u8,
    fua: bool,
    verify: bool,
    slots: Vec<Slot>,
    acc: Acc,
    /// The window `acc` counts for: 0 = warm-up, 1 = measured.
    acc_epoch: u8,
    outstanding: usize,
}

/// What one worker thread hands back.
pub(crate) struct WorkerResult {
    thread: usize,
    measured: Duration,
    accs: Vec<Acc>,
    queue_stats: Vec<QueueStats>,
    errors: Vec<ErrorReport>,
    data_pointer: Vec<String>,
}

impl NsWork {
    fn new(
        thread: usize,
        plan: &TargetPlan,
        target: &Target,
        cfg: &PerfConfig,
        depth: usize,
        queues: usize,
    ) -> Result<NsWork, PerfError> {
        let access = if cfg.pattern.is_random() {
            match cfg.zipf {
                Some(theta) => Access::Zipf(theta),
                None => Access::Uniform,
            }
        } else {
            // Threads start their sequential streams evenly spread over the range.
            Access::Sequential {
                first_slot: (plan.slots as u128 * thread as u128 / cfg.threads as u128) as u64,
            }
        };
        let gen = OffsetGen::new(
            plan.range.start,
            plan.range.lbas,
            plan.blocks_per_io as u64,
            access,
        )
        .map_err(|e| PerfError::Invalid(format!("{}: {e}", plan.label)))?;
        let pieces = plan
            .pieces
            .iter()
            .map(|p| PieceT {
                lba_off: p.slba,
                blocks: p.blocks,
                byte_off: p.offset as usize,
            })
            .collect();
        let stride = plan.layout.data_per_lba;
        let ms = plan.layout.metadata_per_lba;
        let data_bytes = plan.blocks_per_io as usize * stride as usize;
        // The data written is this fill, with each LBA's first 16 bytes stamped.
        let fill: Vec<u8> = {
            let mut r = Rng::new(cfg.seed ^ 0x5eed);
            (0..data_bytes).map(|_| r.next_u64() as u8).collect()
        };
        let now = Ticks::now();
        let mut slots = Vec::with_capacity(depth);
        for i in 0..depth {
            let buf = target
                .ctrl
                .alloc(data_bytes)
                .map_err(|e| PerfError::device(&plan.label, e))?;
            buf.write_bytes(0, &fill);
            let meta = match ms {
                0 => None,
                _ => Some(
                    target
                        .ctrl
                        .alloc(plan.blocks_per_io as usize * ms as usize)
                        .map_err(|e| PerfError::device(&plan.label, e))?,
                ),
            };
            slots.push(Slot {
                buf,
                meta,
                lba: 0,
                read: true,
                submitted: now,
                left: 0,
                failed: false,
                queue: i % queues,
                busy: false,
            });
        }
        Ok(NsWork {
            label: plan.label.clone(),
            nsid: plan.nsid,
            lba_size: stride,
            ms,
            io_bytes: plan.io_size as u64,
            blocks: plan.blocks_per_io,
            pieces,
            gen,
            read_percent: cfg.read_percent(),
            fua: cfg.fua,
            verify: cfg.verify,
            slots,
            acc: Acc::new(),
            acc_epoch: 0,
            outstanding: 0,
        })
    }

    /// Choose the next I/O for slot `i` and prepare its buffer.
    #[inline]
    fn prepare(&mut self, i: usize, rng: &mut Rng, now: Ticks) {
        let read = is_read(rng, self.read_percent);
        let lba = self.gen.next_lba(rng);
        let lba_size = self.lba_size as usize;
        let s = &mut self.slots[i];
        s.read = read;
        s.lba = lba;
        s.submitted = now;
        s.left = self.pieces.len() as u32;
        s.failed = false;
        s.busy = true;
        if !read {
            for j in 0..self.blocks as usize {
                s.buf.write_u64(j * lba_size, lba + j as u64);
                s.buf.write_u64(j * lba_size + 8, STAMP_MAGIC);
            }
        } else if self.verify {
            // A read that moved no data must not pass on what an earlier one left.
            for j in 0..self.blocks as usize {
                s.buf.write_u64(j * lba_size, u64::MAX);
            }
        }
        self.outstanding += 1;
    }

    /// The commands of slot `i`'s I/O, with their tags.
    #[inline]
    fn commands<'a>(
        &'a self,
        i: usize,
        mut f: impl FnMut(
            SqEntry,
            rnvme_driver::dma::DmaSlice<'a>,
            Option<rnvme_driver::dma::DmaSlice<'a>>,
            u64,
        ),
    ) {
        let s = &self.slots[i];
        for (p, piece) in self.pieces.iter().enumerate() {
            let lba = s.lba + piece.lba_off;
            let cmd = if s.read {
                read_cmd(self.nsid, lba, piece.blocks)
            } else {
                write_cmd(self.nsid, lba, piece.blocks, self.fua)
            };
            let seg = s.buf.segment_at(
                piece.byte_off,
                piece.blocks as usize * self.lba_size as usize,
            );
            let meta = s.meta.as_ref().map(|m| {
                let ms = self.ms as usize;
                m.segment_at(piece.lba_off as usize * ms, piece.blocks as usize * ms)
            });
            f(cmd, seg, meta, ((i as u64) << 16) | p as u64);
        }
    }

    /// A command of slot `tag >> 16` completed. Returns the slot when its whole I/O is done.
    #[inline]
    fn complete(
        &mut self,
        tag: u64,
        status: Option<&str>,
        now: Ticks,
        clock: &Clock,
        thread: usize,
        errors: &mut Vec<ErrorReport>,
    ) -> Option<usize> {
        let epoch = clock.epoch();
        if epoch != self.acc_epoch {
            // The measured window opened: forget the warm-up.
            self.acc.reset_window();
            self.acc_epoch = epoch;
        }
        let i = (tag >> 16) as usize;
        let p = (tag & 0xffff) as usize;
        let lba_size = self.lba_size as usize;
        let s = &mut self.slots[i];
        if let Some(err) = status {
            s.failed = true;
            self.acc.errors += 1;
            if errors.len() < KEEP_ERRORS {
                let piece = self.pieces[p];
                errors.push(ErrorReport {
                    thread,
                    target: self.label.clone(),
                    op: if s.read { "read" } else { "write" },
                    lba: s.lba + piece.lba_off,
                    blocks: piece.blocks,
                    error: err.to_string(),
                });
            }
        }
        s.left -= 1;
        if s.left > 0 {
            return None;
        }
        s.busy = false;
        self.outstanding -= 1;
        if s.failed {
            return Some(i);
        }
        if s.read && self.verify {
            for j in 0..self.blocks as usize {
                let want = s.lba + j as u64;
                let got = s.buf.read_u64(j * lba_size);
                let magic = s.buf.read_u64(j * lba_size + 8);
                if got != want || magic != STAMP_MAGIC {
                    self.acc.verify_errors += 1;
                    if errors.len() < KEEP_ERRORS {
                        errors.push(ErrorReport {
                            thread,
                            target: self.label.clone(),
                            op: "read",
                            lba: want,
                            blocks: 1,
                            error: if magic == STAMP_MAGIC {
                                format!("data mismatch: the block carries the stamp of LBA {got}")
                            } else {
                                "data mismatch: the block carries no rnvme perf stamp".into()
                            },
                        });
                    }
                    break;
                }
            }
        }
        if clock.phase != Phase::Stop {
            let lat = clock.rate.nanos(now.since(s.submitted));
            self.acc.record(lat, self.io_bytes, s.read);
        }
        Some(i)
    }
}

fn status_text(st: NvmeStatus) -> String {
    st.to_string()
}

/// Everything a worker needs, borrowed from `run`.
pub(crate) struct Ctx<'a> {
    pub targets: &'a [Target],
    pub plans: &'a [TargetPlan],
    pub cfg: &'a PerfConfig,
    pub rate: TickRate,
}

/// Pin worker `thread` to its CPU of `--cpus`, if given.
fn pin_worker(cfg: &PerfConfig, thread: usize) -> Result<(), PerfError> {
    let Some(cpus) = &cfg.cpus else {
        return Ok(());
    };
    let cpu = cpus.cpus()[thread % cpus.cpus().len()];
    rnvme_driver::affinity::pin_current_thread(cpu).map_err(cpus_error)
}

/// A CPU of `--cpus` that cannot be used.
fn cpus_error(e: rnvme_driver::affinity::AffinityError) -> PerfError {
    PerfError::Invalid(format!("--cpus: {e}"))
}

/// Per-thread set-up that cannot fail half way without telling the others.
fn setup<T>(shared: &Shared, f: impl FnOnce() -> Result<T, PerfError>) -> Option<T> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(PerfError::Run(
            "a worker thread panicked while setting up".into(),
        ))
    });
    let r = match r {
        Ok(v) => Some(v),
        Err(e) => {
            shared.fail(e);
            None
        }
    };
    shared.barrier.wait();
    if shared.abort.load(Ordering::Relaxed) {
        None
    } else {
        r
    }
}

/// Queue the commands of slot `i` of `w` on `qp` (the doorbell is rung by the caller).
#[inline]
fn submit_slot(w: &NsWork, i: usize, qp: &mut IoQueuePair) -> Result<(), PerfError> {
    let mut err = None;
    w.commands(i, |cmd, seg, meta, tag| {
        if err.is_none() {
            let r = match meta {
                Some(m) => qp.submit_with_metadata(cmd, &[seg], m, tag),
                None => qp.submit(cmd, &[seg], tag),
            };
            if let Err(e) = r {
                err = Some(e);
            }
        }
    });
    match err {
        None => Ok(()),
        Some(e) => Err(PerfError::device(&w.label, e)),
    }
}

/// Running totals a worker publishes for the progress line.
#[derive(Default)]
struct Totals {
    ios: u64,
    bytes: u64,
    errors: u64,
}

impl Totals {
    #[inline]
    fn publish(&self, c: &ProgressCounters) {
        c.ios.store(self.ios, Ordering::Relaxed);
        c.bytes.store(self.bytes, Ordering::Relaxed);
        c.errors.store(self.errors, Ordering::Relaxed);
    }
}

fn stalled(works: &[NsWork], outstanding: usize) -> PerfError {
    PerfError::Run(format!(
        "no command completed for {} s with {outstanding} I/O(s) in flight on {}: the controller stopped answering",
        STALL.as_secs(),
        works
            .iter()
            .map(|w| w.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn drain_timeout(outstanding: usize) -> PerfError {
    PerfError::Run(format!(
        "{outstanding} I/O(s) still in flight {} s after the end of the run: the controller stopped answering",
        DRAIN.as_secs()
    ))
}

/// The accumulators to report: a namespace that completed nothing since the measured window
/// opened still holds warm-up counts.
fn final_accs(works: &mut [NsWork], clock: &Clock) -> Vec<Acc> {
    works
        .iter_mut()
        .map(|w| {
            if w.acc_epoch != clock.epoch() || !clock.opened {
                w.acc.reset_window();
            }
            w.acc.clone()
        })
        .collect()
}

/// A worker on its own queue pairs.
fn direct_worker(ctx: &Ctx, shared: &Shared, thread: usize) -> Option<WorkerResult> {
    let cfg = ctx.cfg;
    let q = cfg.queues_per_thread as usize;
    let (mut works, mut qps) = setup(shared, || {
        pin_worker(cfg, thread)?;
        let mut works = Vec::new();
        let mut qps: Vec<Vec<IoQueuePair>> = Vec::new();
        for (plan, target) in ctx.plans.iter().zip(ctx.targets) {
            let mut v = Vec::new();
            for _ in 0..q {
                v.push(
                    target
                        .ctrl
                        .create_io_qpair(plan.queue_entries)
                        .map(|mut qp| {
                            qp.set_ring_each(cfg.ring_each);
                            qp
                        })
                        .map_err(|e| PerfError::device(&plan.label, e))?,
                );
            }
            qps.push(v);
            works.push(NsWork::new(
                thread,
                plan,
                target,
                cfg,
                cfg.depth as usize,
                q,
            )?);
        }
        Ok((works, qps))
    })?;
    let data_pointer = qps
        .iter()
        .map(|v| format!("{:?}", v[0].data_pointer_mode()).to_uppercase())
        .collect();
    let mut rng = Rng::new(cfg.seed.wrapping_add(thread as u64 * 0x1_0000_0001));
    let start = Ticks::now();
    let mut clock = Clock::new(start, cfg, ctx.rate);
    let (stall, drain) = (ctx.rate.ticks(STALL), ctx.rate.ticks(DRAIN));
    let mut errors = Vec::new();
    let counters = &shared.counters[thread];
    let mut done: Vec<Completion> = Vec::new();
    let mut fatal: Option<PerfError> = None;
    let mut totals = Totals::default();

    // Fill every queue, one doorbell each.
    'fill: for (w, qv) in works.iter_mut().zip(qps.iter_mut()) {
        for i in 0..w.slots.len() {
            w.prepare(i, &mut rng, start);
            let qi = w.slots[i].queue;
            if let Err(e) = submit_slot(w, i, &mut qv[qi]) {
                fatal = Some(e);
                break 'fill;
            }
        }
        for qp in qv.iter_mut() {
            qp.ring();
        }
    }

    let mut idle = 0u32;
    let mut last_progress = start;
    let mut stop_at: Option<Ticks> = None;
    while fatal.is_none() {
        let abort = shared.abort.load(Ordering::Relaxed);
        let mut reaped = false;
        for (w, qv) in works.iter_mut().zip(qps.iter_mut()) {
            for qp in qv.iter_mut() {
                done.clear();
                qp.poll(usize::MAX, |c| done.push(c));
                if done.is_empty() {
                    continue;
                }
                reaped = true;
                let now = Ticks::now();
                last_progress = now;
                clock.tick(now, abort);
                for c in &done {
                    let st = (!c.status.is_success()).then(|| status_text(c.status));
                    if st.is_some() {
                        totals.errors += 1;
                        if cfg.stop_on_error {
                            shared.abort.store(true, Ordering::Relaxed);
                        }
                    }
                    let Some(i) =
                        w.complete(c.tag, st.as_deref(), now, &clock, thread, &mut errors)
                    else {
                        continue;
                    };
                    totals.ios += 1;
                    totals.bytes += w.io_bytes;
                    if clock.phase != Phase::Stop {
                        // The slot's queue is the one it completed on.
                        w.prepare(i, &mut rng, now);
                        if let Err(e) = submit_slot(w, i, qp) {
                            fatal = Some(e);
                        }
                    }
                }
                qp.ring();
            }
        }
        if reaped {
            idle = 0;
            totals.publish(counters);
        } else {
            idle += 1;
            if idle < IDLE_CLOCK_EVERY {
                continue;
            }
            idle = 0;
            let now = Ticks::now();
            clock.tick(now, abort);
            let outstanding: usize = works.iter().map(|w| w.outstanding).sum();
            if outstanding > 0 && now.since(last_progress) > stall {
                fatal = Some(stalled(&works, outstanding));
                break;
            }
        }
        if clock.phase == Phase::Stop {
            let outstanding: usize = works.iter().map(|w| w.outstanding).sum();
            if outstanding == 0 {
                break;
            }
            let now = Ticks::now();
            if now >= *stop_at.get_or_insert(now.after(drain)) {
                fatal = Some(drain_timeout(outstanding));
            }
        }
    }
    totals.publish(counters);
    if let Some(e) = fatal {
        shared.fail(e);
    }
    Some(WorkerResult {
        thread,
        measured: clock.measured,
        accs: final_accs(&mut works, &clock),
        queue_stats: qps.iter().flatten().map(|q| q.stats()).collect(),
        errors,
        data_pointer,
    })
}

/// Bits of a reactor request tag above the slot and piece: the target index.
const TARGET_SHIFT: u32 = 48;

/// The reactor requests of slot `i` of target `t`, each handed to `send`.
#[inline]
fn slot_requests(
    t: usize,
    w: &NsWork,
    i: usize,
    queue_base: usize,
    mut send: impl FnMut(IoRequest),
) {
    let queue = Some(queue_base + w.slots[i].queue);
    w.commands(i, |cmd, seg, meta, tag| {
        send(IoRequest {
            cmd,
            data: IoData::Segment(seg.lease()),
            tag: ((t as u64) << TARGET_SHIFT) | tag,
            metadata: meta.map(|m| m.lease()),
            queue,
        })
    });
}

/// Add the commands of slot `i` of target `t` to the batch for the reactor.
#[inline]
fn queue_slot(out: &mut Vec<IoRequest>, t: usize, w: &NsWork, i: usize, queue_base: usize) {
    slot_requests(t, w, i, queue_base, |r| out.push(r));
}

/// What a reactor answer says: its target, its tag within the target, the error to count
/// (`None`: success), and whether that error ends the run (anything but a command status).
struct Answer {
    t: usize,
    tag: u64,
    err: Option<String>,
    ends_run: bool,
}

impl Answer {
    fn of(d: &IoDone) -> Answer {
        let (err, ends_run) = match &d.result {
            Ok(_) => (None, false),
            Err(e) => (Some(e.to_string()), e.status().is_none()),
        };
        Answer {
            t: (d.tag >> TARGET_SHIFT) as usize,
            tag: d.tag & ((1 << TARGET_SHIFT) - 1),
            err,
            ends_run,
        }
    }
}

/// The failure that ended a reactor run on target `w`.
fn run_ended(w: &NsWork, err: &Option<String>) -> PerfError {
    PerfError::Run(format!("{}: {}", w.label, err.as_deref().unwrap_or("")))
}

/// Wait for at least one answer (a few checks, then parked until the reactor unparks this
/// thread), then take all that are there.
///
/// The wait has no timeout: every request gets exactly one answer from the reactor, even when
/// it stops or dies, and the driver's command deadlines bound how long the device may take. A
/// timed wait would also cost far more where the kernel's timers are slow to arm (750 µs
/// instead of 115 µs per wake-up in a TCG guest on the emulated HPET).
#[inline]
fn wait_answers(rx: &Receiver<IoDone>, batch: &mut Vec<IoDone>) {
    for _ in 0..CLIENT_SPINS {
        if let Ok(d) = rx.try_recv() {
            batch.push(d);
            break;
        }
    }
    if batch.is_empty() {
        batch.push(wait_parked(rx));
    }
    batch.extend(rx.try_iter());
}

/// The slots of a reactor worker, one `NsWork` per target (the queue pairs are the
/// reactor's); None when setting them up failed (reported through `setup`).
fn reactor_works(ctx: &Ctx, shared: &Shared, thread: usize) -> Option<Vec<NsWork>> {
    let cfg = ctx.cfg;
    let q = cfg.queues_per_thread as usize;
    setup(shared, || {
        pin_worker(cfg, thread)?;
        ctx.plans
            .iter()
            .zip(ctx.targets)
            .map(|(plan, target)| NsWork::new(thread, plan, target, cfg, cfg.depth as usize, q))
            .collect::<Result<Vec<_>, _>>()
    })
}

/// A worker that sends its I/O through the reactor.
fn reactor_client(
    ctx: &Ctx,
    shared: &Shared,
    thread: usize,
    handle: &ReactorHandle,
    queue_base: &[usize],
) -> Option<WorkerResult> {
    let cfg = ctx.cfg;
    let q = cfg.queues_per_thread as usize;
    let mut works = reactor_works(ctx, shared, thread)?;
    let (tx, rx) = crossbeam_channel::unbounded::<IoDone>();
    let me = std::thread::current();
    let mut rng = Rng::new(cfg.seed.wrapping_add(thread as u64 * 0x1_0000_0001));
    let start = Ticks::now();
    let mut clock = Clock::new(start, cfg, ctx.rate);
    let (stall, drain) = (ctx.rate.ticks(STALL), ctx.rate.ticks(DRAIN));
    let mut errors = Vec::new();
    let counters = &shared.counters[thread];
    let mut fatal: Option<PerfError> = None;
    let mut totals = Totals::default();
    let mut batch: Vec<IoDone> = Vec::new();
    // The next I/Os, sent to the reactor in one message per loop turn.
    let mut outgoing: Vec<IoRequest> = Vec::new();

    for (t, w) in works.iter_mut().enumerate() {
        for i in 0..w.slots.len() {
            // Stagger the slots over the queue pairs of the target.
            w.slots[i].queue = (i + thread) % q;
            w.prepare(i, &mut rng, start);
            queue_slot(&mut outgoing, t, w, i, queue_base[t]);
        }
    }
    handle.submit_batch_with(outgoing.drain(..), || Reply::Wake(tx.clone(), me.clone()));
    let mut last_progress = start;
    let mut stop_at: Option<Ticks> = None;
    while fatal.is_none() {
        let abort = shared.abort.load(Ordering::Relaxed);
        batch.clear();
        if works.iter().any(|w| w.outstanding > 0) {
            wait_answers(&rx, &mut batch);
        }
        let now = Ticks::now();
        clock.tick(now, abort);
        if batch.is_empty() {
            let outstanding: usize = works.iter().map(|w| w.outstanding).sum();
            if outstanding > 0 && now.since(last_progress) > stall {
                fatal = Some(stalled(&works, outstanding));
                break;
            }
        } else {
            last_progress = now;
        }
        for d in batch.drain(..) {
            let Answer {
                t,
                tag,
                err: st,
                ends_run,
            } = Answer::of(&d);
            if ends_run {
                fatal = Some(run_ended(&works[t], &st));
            }
            if st.is_some() {
                totals.errors += 1;
                if cfg.stop_on_error {
                    shared.abort.store(true, Ordering::Relaxed);
                }
            }
            let w = &mut works[t];
            let Some(i) = w.complete(tag, st.as_deref(), now, &clock, thread, &mut errors) else {
                continue;
            };
            totals.ios += 1;
            totals.bytes += w.io_bytes;
            if clock.phase != Phase::Stop && fatal.is_none() {
                w.prepare(i, &mut rng, now);
                queue_slot(&mut outgoing, t, w, i, queue_base[t]);
            }
        }
        handle.submit_batch_with(outgoing.drain(..), || Reply::Wake(tx.clone(), me.clone()));
        totals.publish(counters);
        if clock.phase == Phase::Stop {
            let outstanding: usize = works.iter().map(|w| w.outstanding).sum();
            if outstanding == 0 {
                break;
            }
            if now >= *stop_at.get_or_insert(now.after(drain)) {
                fatal = Some(drain_timeout(outstanding));
            }
        }
    }
    totals.publish(counters);
    if let Some(e) = fatal {
        shared.fail(e);
    }
    Some(WorkerResult {
        thread,
        measured: clock.measured,
        accs: final_accs(&mut works, &clock),
        queue_stats: Vec::new(),
        errors,
        data_pointer: Vec::new(),
    })
}

/// What the callbacks of one worker share: everything its loop would own.
struct CbState {
    works: Vec<NsWork>,
    rng: Rng,
    clock: Clock,
    errors: Vec<ErrorReport>,
    totals: Totals,
    fatal: Option<PerfError>,
    outstanding: usize,
}

/// The completer of one worker's requests: everything its loop would own.
struct CbInner {
    state: Mutex<CbState>,
    queue_base: Vec<usize>,
    thread: usize,
    stop_on_error: bool,
    shared_abort: std::sync::Arc<AtomicBool>,
}

impl Completer for CbInner {
    /// One command completed: account for it and, while the run lasts, send the next I/O of
    /// its slot. Runs on the reactor thread. Answers that do not come from the reactor's poll
    /// (where `next` queues) are Stopped or Submit errors, which end the run and send nothing
    /// more, so `next` never answers on this thread while the state is locked.
    fn complete(&self, d: IoDone, next: &mut Next<'_>) {
        let now = Ticks::now();
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        st.outstanding -= 1;
        st.clock
            .tick(now, self.shared_abort.load(Ordering::Relaxed));
        let Answer {
            t,
            tag,
            err,
            ends_run,
        } = Answer::of(&d);
        if ends_run && st.fatal.is_none() {
            st.fatal = Some(run_ended(&st.works[t], &err));
        }
        if err.is_some() {
            st.totals.errors += 1;
            if self.stop_on_error {
                self.shared_abort.store(true, Ordering::Relaxed);
            }
        }
        let CbState {
            works,
            clock,
            errors,
            ..
        } = st;
        let Some(i) = works[t].complete(tag, err.as_deref(), now, clock, self.thread, errors)
        else {
            return;
        };
        st.totals.ios += 1;
        st.totals.bytes += st.works[t].io_bytes;
        if st.clock.phase != Phase::Stop && st.fatal.is_none() {
            let CbState { works, rng, .. } = st;
            works[t].prepare(i, rng, now);
            st.outstanding += st.works[t].pieces.len();
            slot_requests(t, &st.works[t], i, self.queue_base[t], |r| next.submit(r));
        }
    }
}

/// A worker whose I/Os complete in callbacks on the reactor thread: it starts them, then only
/// watches the clock and publishes progress.
fn reactor_callbacks(
    ctx: &Ctx,
    shared: &Shared,
    thread: usize,
    handle: &ReactorHandle,
    queue_base: &[usize],
) -> Option<WorkerResult> {
    let cfg = ctx.cfg;
    let q = cfg.queues_per_thread as usize;
    let works = reactor_works(ctx, shared, thread)?;
    let start = Ticks::now();
    // The abort flag is mirrored into one the callbacks can hold.
    let abort = std::sync::Arc::new(AtomicBool::new(false));
    let cb = std::sync::Arc::new(CbInner {
        state: Mutex::new(CbState {
            works,
            rng: Rng::new(cfg.seed.wrapping_add(thread as u64 * 0x1_0000_0001)),
            clock: Clock::new(start, cfg, ctx.rate),
            errors: Vec::new(),
            totals: Totals::default(),
            fatal: None,
            outstanding: 0,
        }),
        queue_base: queue_base.to_vec(),
        thread,
        stop_on_error: cfg.stop_on_error,
        shared_abort: abort.clone(),
    });
    let mut first = Vec::new();
    {
        let mut guard = cb.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        for t in 0..st.works.len() {
            for i in 0..st.works[t].slots.len() {
                st.works[t].slots[i].queue = (i + thread) % q;
                let CbState { works, rng, .. } = st;
                works[t].prepare(i, rng, start);
                st.outstanding += st.works[t].pieces.len();
                queue_slot(&mut first, t, &st.works[t], i, queue_base[t]);
            }
        }
    }
    let completer: std::sync::Arc<dyn Completer> = cb.clone();
    handle.submit_batch_with(first, || Reply::Completer(completer.clone()));
    drop(completer);
    let counters = &shared.counters[thread];
    let drain = ctx.rate.ticks(DRAIN);
    let mut stop_at: Option<Ticks> = None;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if shared.abort.load(Ordering::Relaxed) {
            abort.store(true, Ordering::Relaxed);
        }
        let now = Ticks::now();
        let mut st = cb.state.lock().unwrap_or_else(|e| e.into_inner());
        st.clock.tick(now, abort.load(Ordering::Relaxed));
        st.totals.publish(counters);
        if abort.load(Ordering::Relaxed) {
            shared.abort.store(true, Ordering::Relaxed);
        }
        if st.clock.phase == Phase::Stop || st.fatal.is_some() {
            if st.outstanding == 0 {
                break;
            }
            if now >= *stop_at.get_or_insert(now.after(drain)) {
                let n = st.outstanding;
                st.fatal.get_or_insert(drain_timeout(n));
                break;
            }
        }
    }
    let mut st = cb.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = st.fatal.take() {
        shared.fail(e);
    }
    let CbState {
        works,
        clock,
        errors,
        ..
    } = &mut *st;
    Some(WorkerResult {
        thread,
        measured: clock.measured,
        accs: final_accs(works, clock),
        queue_stats: Vec::new(),
        errors: std::mem::take(errors),
        data_pointer: Vec::new(),
    })
}

/// Counts a worker as finished however it ends.
struct FinishGuard<'a>(&'a AtomicUsize);

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Run the workload and assemble the report.
pub(crate) fn execute(
    ctx: &Ctx,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PerfReport, PerfError> {
    let cfg = ctx.cfg;
    let workers = cfg.threads as usize;
    let shared = Shared::new(workers);

    // With a reactor, its queue pairs are made here: Q per target.
    let mut queue_base = Vec::new();
    let mut reactor_dptr = Vec::new();
    let reactor = if cfg.reactor {
        let mut queues = Vec::new();
        for (plan, target) in ctx.plans.iter().zip(ctx.targets) {
            queue_base.push(queues.len());
            for _ in 0..cfg.queues_per_thread {
                queues.push(
                    target
                        .ctrl
                        .create_io_qpair(plan.queue_entries)
                        .map(|mut qp| {
                            qp.set_ring_each(cfg.ring_each);
                            qp
                        })
                        .map_err(|e| PerfError::device(&plan.label, e))?,
                );
            }
            reactor_dptr
                .push(format!("{:?}", queues[queues.len() - 1].data_pointer_mode()).to_uppercase());
        }
        let r = Reactor::spawn(
            queues,
            ReactorConfig {
                name: "rnvme-perf-reactor".into(),
                // A client takes a wake-up (over 100 µs in a guest) to send its next batch:
                // sleeping that soon would cost the reactor a wake-up of its own.
                idle_spin: Duration::from_millis(5),
                cpu: cfg.reactor_cpu(),
                ..ReactorConfig::default()
            },
        )
        .map_err(|e| match e {
            rnvme_driver::Error::Affinity(e) if cfg.reactor_cpu.is_some() => {
                PerfError::Invalid(format!("--reactor-cpu: {e}"))
            }
            rnvme_driver::Error::Affinity(e) => cpus_error(e),
            e => PerfError::Run(e.to_string()),
        })?;
        Some(r)
    } else {
        None
    };
    let handle = reactor.as_ref().map(|r| r.handle());

    let results: Vec<Option<WorkerResult>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..workers {
            let shared = &shared;
            let handle = handle.clone();
            let queue_base = &queue_base;
            let spawned = std::thread::Builder::new()
                .name(format!("rnvme-perf-{t}"))
                .spawn_scoped(s, move || {
                    let _done = FinishGuard(&shared.finished);
                    match &handle {
                        Some(h) if cfg.reactor_callbacks => {
                            reactor_callbacks(ctx, shared, t, h, queue_base)
                        }
                        Some(h) => reactor_client(ctx, shared, t, h, queue_base),
                        None => direct_worker(ctx, shared, t),
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The barrier counts on every worker: stand in for the missing ones.
                    shared.fail(PerfError::Run(format!(
                        "cannot start worker thread {t}: {e}"
                    )));
                    for _ in t..workers {
                        handles.push(s.spawn(move || {
                            let _done = FinishGuard(&shared.finished);
                            shared.barrier.wait();
                            None
                        }));
                    }
                    break;
                }
            }
        }
        shared.barrier.wait();
        report_progress(&shared, cfg, workers, progress);
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    shared.fail(PerfError::Run("a worker thread panicked".into()));
                    None
                })
            })
            .collect()
    });
    let reactor_exit = reactor.and_then(|r| r.shutdown());
    if let Some(e) = shared
        .first_failure
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        return Err(e);
    }
    let results: Vec<WorkerResult> = results.into_iter().flatten().collect();
    let mut counters = Counters::default();
    for r in &results {
        for s in &r.queue_stats {
            counters.add(s);
        }
    }
    if let Some(exit) = &reactor_exit {
        for s in &exit.stats.queues {
            counters.add(s);
        }
        counters.reactor = Some(ReactorCounters {
            requests: exit.stats.requests,
            batches: exit.stats.batches,
            max_batch: exit.stats.max_batch,
            sleeps: exit.stats.sleeps,
            wakes: exit.stats.wakes,
        });
    }
    Ok(assemble(ctx, results, counters, &reactor_dptr))
}

/// Print-free progress: once a second, the rate since the last report.
fn report_progress(
    shared: &Shared,
    cfg: &PerfConfig,
    workers: usize,
    progress: &mut dyn FnMut(&Progress),
) {
    let start = Instant::now();
    let sum = |f: fn(&ProgressCounters) -> &AtomicU64| -> u64 {
        shared
            .counters
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum()
    };
    let mut last = (0u64, 0u64);
    let mut last_at = start;
    let mut next = start + Duration::from_secs(1);
    while shared.finished.load(Ordering::Relaxed) < workers {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(50)));
            continue;
        }
        let ios = sum(|c| &c.ios);
        let bytes = sum(|c| &c.bytes);
        let dt = now.duration_since(last_at).as_secs_f64();
        progress(&Progress {
            elapsed: now.duration_since(start),
            total: cfg.warmup + cfg.duration,
            warming_up: now.duration_since(start) < cfg.warmup,
            iops: (ios - last.0) as f64 / dt,
            mib_s: (bytes - last.1) as f64 / dt / (1 << 20) as f64,
            errors: sum(|c| &c.errors),
        });
        last = (ios, bytes);
        last_at = now;
        next += Duration::from_secs(1);
    }
}

fn assemble(
    ctx: &Ctx,
    mut results: Vec<WorkerResult>,
    counters: Counters,
    reactor_dptr: &[String],
) -> PerfReport {
    let cfg = ctx.cfg;
    let pct = cfg.latency_histogram;
    results.sort_by_key(|r| r.thread);
    let mean_window = if results.is_empty() {
        Duration::ZERO
    } else {
        results.iter().map(|r| r.measured).sum::<Duration>() / results.len() as u32
    };
    let dptr = |r: &WorkerResult, t: usize| -> String {
        r.data_pointer
            .get(t)
            .or(reactor_dptr.get(t))
            .cloned()
            .unwrap_or_default()
    };
    let mut threads = Vec::new();
    let mut per_ns: Vec<Acc> = ctx.plans.iter().map(|_| Acc::new()).collect();
    let mut total = Acc::new();
    for r in &results {
        let mut thread_total = Acc::new();
        let mut namespaces = Vec::new();
        for (t, acc) in r.accs.iter().enumerate() {
            thread_total.merge(acc);
            per_ns[t].merge(acc);
            namespaces.push(NsReport {
                target: ctx.plans[t].label.clone(),
                data_pointer: dptr(r, t),
                range: (ctx.plans[t].range.start, ctx.plans[t].range.lbas),
                summary: Summary::new(acc, r.measured, pct),
            });
        }
        total.merge(&thread_total);
        threads.push(ThreadReport {
            thread: r.thread,
            elapsed_s: r.measured.as_secs_f64(),
            summary: Summary::new(&thread_total, r.measured, pct),
            namespaces,
        });
    }
    let namespaces = ctx
        .plans
        .iter()
        .enumerate()
        .map(|(t, plan)| NsReport {
            target: plan.label.clone(),
            data_pointer: results.first().map(|r| dptr(r, t)).unwrap_or_default(),
            range: (plan.range.start, plan.range.lbas),
            summary: Summary::new(&per_ns[t], mean_window, pct),
        })
        .collect();
    let mut first_errors: Vec<ErrorReport> = results
        .iter()
        .flat_map(|r| r.errors.iter().cloned())
        .collect();
    first_errors.truncate(10);
    PerfReport {
        workload: cfg.info(),
        elapsed_s: mean_window.as_secs_f64(),
        total: Summary::new(&total, mean_window, pct),
        threads,
        namespaces,
        counters,
        first_errors,
    }
}
