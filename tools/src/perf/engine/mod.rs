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
use std::sync::{Arc, Barrier, Mutex};
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
    Acc, Counters, CpuUsage, ErrorReport, NsReport, PerfReport, ReactorCounters, Summary,
    ThreadReport,
};
use super::{PerfConfig, PerfError, Progress, Target, TargetPlan, STAMP_MAGIC};

mod async_worker;
mod direct;
mod through_reactor;
mod work;

use async_worker::*;
use direct::*;
use through_reactor::*;
pub(crate) use work::*;

/// Idle polls between two clock reads.
const IDLE_CLOCK_EVERY: u32 = 16;
/// Longest sleep of one wait in interrupt and hybrid modes (the end of the run is noticed
/// within it).
const WAIT_SLICE: Duration = Duration::from_millis(10);
/// The same with nothing in flight.
const IDLE_WAIT_SLICE: Duration = Duration::from_secs(1);
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
    abort: Arc<AtomicBool>,
    counters: Arc<Vec<ProgressCounters>>,
    finished: AtomicUsize,
    /// Signalled as each worker finishes: the reporting thread sleeps on it between reports
    /// rather than waking to check.
    finish_signal: (Mutex<()>, std::sync::Condvar),
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
            abort: Arc::new(AtomicBool::new(false)),
            counters: Arc::new((0..workers).map(|_| ProgressCounters::default()).collect()),
            finished: AtomicUsize::new(0),
            finish_signal: (Mutex::new(()), std::sync::Condvar::new()),
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

/// Counts a worker as finished however it ends.
struct FinishGuard<'a>(&'a Shared);

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &self.0.finish_signal;
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.finished.fetch_add(1, Ordering::Relaxed);
        cv.notify_all();
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

    let mut cpu = CpuUsage::default();
    let results: Vec<Option<WorkerResult>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..workers {
            let shared = &shared;
            let handle = handle.clone();
            let queue_base = &queue_base;
            let spawned = std::thread::Builder::new()
                .name(format!("rnvme-perf-{t}"))
                .spawn_scoped(s, move || {
                    let _done = FinishGuard(shared);
                    match &handle {
                        Some(h) if cfg.reactor_callbacks => {
                            reactor_callbacks(ctx, shared, t, h, queue_base)
                        }
                        Some(h) => reactor_client(ctx, shared, t, h, queue_base),
                        None if cfg.async_api => async_worker(ctx, shared, t),
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
                            let _done = FinishGuard(shared);
                            shared.barrier.wait();
                            None
                        }));
                    }
                    break;
                }
            }
        }
        shared.barrier.wait();
        cpu = report_progress(&shared, cfg, workers, progress);
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
    Ok(assemble(ctx, results, counters, &reactor_dptr, cpu))
}

/// The process's (user, system) CPU seconds so far.
fn cpu_times() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
            (s(u.user_time()), s(u.system_time()))
        }
        Err(_) => (0.0, 0.0),
    }
}

/// Print-free progress: once a second, the rate since the last report. Returns the
/// process's CPU time from the end of the warm-up to the end of the run.
fn report_progress(
    shared: &Shared,
    cfg: &PerfConfig,
    workers: usize,
    progress: &mut dyn FnMut(&Progress),
) -> CpuUsage {
    let start = Instant::now();
    let measure_at = start + cfg.warmup;
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
    // (CPU times, when, I/Os so far) at the start of the measured window.
    let mut window: Option<((f64, f64), Instant, u64)> = None;
    while shared.finished.load(Ordering::Relaxed) < workers {
        let now = Instant::now();
        if window.is_none() && now >= measure_at {
            window = Some((cpu_times(), now, sum(|c| &c.ios)));
        }
        if now < next {
            // Until the next report (or the window's start), or a worker finishing.
            let until = if window.is_none() {
                measure_at.min(next)
            } else {
                next
            };
            let (lock, cv) = &shared.finish_signal;
            let g = lock.lock().unwrap_or_else(|e| e.into_inner());
            if shared.finished.load(Ordering::Relaxed) < workers {
                let _ = cv.wait_timeout(g, until.saturating_duration_since(now));
            }
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
    let end = (cpu_times(), Instant::now(), sum(|c| &c.ios));
    let (c0, t0, ios0) = window.unwrap_or(end);
    CpuUsage::between(
        c0,
        end.0,
        end.1.duration_since(t0).as_secs_f64(),
        end.2 - ios0,
    )
}

fn assemble(
    ctx: &Ctx,
    mut results: Vec<WorkerResult>,
    counters: Counters,
    reactor_dptr: &[String],
    cpu: CpuUsage,
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
        mode: cfg.wait.name().into(),
        cpu,
    }
}
