//! The async worker: the same I/O as the direct worker, issued through the driver's async API
//! ([`AsyncQueuePair`]) on a tokio current-thread runtime of the worker's own. The I/Os in
//! flight are a task per slot, each preparing its next I/O when the last completes.
//! A polled queue pair's completions are reaped by a poller task beside the I/O tasks; with
//! interrupts, the queue pair's reaper thread sleeps on its vector (spinning first in hybrid
//! mode) and wakes them. The worker's own bookkeeping costs what the direct worker's does: with
//! a poller, one clock read and one progress update per reap (the tasks it woke share that
//! time), as the direct worker has per poll; with a reaper thread, per I/O.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use rnvme_driver::aio::{AsyncQueuePair, Drive, Poller};
use rnvme_driver::irq::WaitMode;

use super::*;

/// A worker whose I/O goes through the async API (one namespace, one queue pair).
pub(super) fn async_worker(ctx: &Ctx, shared: &Shared, thread: usize) -> Option<WorkerResult> {
    let cfg = ctx.cfg;
    let (work, aqp) = setup(shared, || {
        pin_worker(cfg, thread)?;
        let (plan, target) = (&ctx.plans[0], &ctx.targets[0]);
        let mut qp = target
            .ctrl
            .create_io_qpair_with(plan.queue_entries, cfg.wait)
            .map_err(|e| PerfError::device(&plan.label, e))?;
        qp.set_ring_each(cfg.ring_each);
        let drive = match cfg.wait {
            WaitMode::Polled => Drive::Poller,
            _ => Drive::Reaper,
        };
        let aqp = AsyncQueuePair::new(qp, drive).map_err(|e| PerfError::device(&plan.label, e))?;
        let work = NsWork::new(thread, plan, target, cfg, cfg.depth as usize, 1)?;
        if work.ms > 0 {
            return Err(PerfError::Invalid(format!(
                "{}: --async moves data only; this namespace keeps metadata in a separate buffer",
                plan.label
            )));
        }
        Ok((work, aqp))
    })?;
    let data_pointer = vec![aqp
        .with_queue_pair(|qp| format!("{:?}", qp.data_pointer_mode()))
        .to_uppercase()];
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(r) => r,
        Err(e) => {
            shared.fail(PerfError::Run(format!("cannot start a tokio runtime: {e}")));
            return None;
        }
    };
    let start = Ticks::now();
    let run = Rc::new(RefCell::new(Run {
        work,
        rng: Rng::new(cfg.seed.wrapping_add(thread as u64 * 0x1_0000_0001)),
        clock: Clock::new(start, cfg, ctx.rate),
        errors: Vec::new(),
        totals: Totals::default(),
        reaped_at: None,
    }));
    let counters = &shared.counters[thread];
    // A task per slot, each awaiting its I/O in turn, as a storage engine's tasks would.
    let local = tokio::task::LocalSet::new();
    let mut tasks = Vec::with_capacity(cfg.depth as usize);
    for i in 0..cfg.depth as usize {
        let (run, aqp) = (run.clone(), aqp.clone());
        let (abort, all) = (shared.abort.clone(), shared.counters.clone());
        let stop_on_error = cfg.stop_on_error;
        // The task borrows nothing past an await: `run` is borrowed between them only.
        let task = async move {
            {
                let r = &mut *run.borrow_mut();
                r.work.prepare(i, &mut r.rng, start);
            }
            loop {
                // Made before the await: the borrow of `run` must not live across it.
                let io = issue(&aqp, &run.borrow().work, i);
                let result = io.await;
                let r = &mut *run.borrow_mut();
                let now = match r.reaped_at {
                    // The poller's time of the reap that woke this task.
                    Some(t) => t,
                    None => {
                        let now = Ticks::now();
                        r.clock.tick(now, abort.load(Ordering::Relaxed));
                        now
                    }
                };
                let status = result.err().map(|e| e.to_string());
                if status.is_some() {
                    r.totals.errors += 1;
                    if stop_on_error {
                        abort.store(true, Ordering::Relaxed);
                    }
                }
                for p in 0..r.work.pieces.len() {
                    let tag = ((i as u64) << 16) | p as u64;
                    r.work
                        .complete(tag, status.as_deref(), now, &r.clock, thread, &mut r.errors);
                }
                r.totals.ios += 1;
                r.totals.bytes += r.work.io_bytes;
                if r.reaped_at.is_none() {
                    r.totals.publish(&all[thread]);
                }
                if r.clock.phase == Phase::Stop {
                    break;
                }
                r.work.prepare(i, &mut r.rng, now);
            }
        };
        tasks.push(local.spawn_local(task));
    }
    if aqp.drive() == Drive::Poller {
        local.spawn_local(Stamped {
            poller: aqp.poller(),
            run: run.clone(),
            abort: shared.abort.clone(),
            counters: shared.counters.clone(),
            thread,
        });
    }
    runtime.block_on(local.run_until(async {
        for t in tasks {
            let _ = t.await;
        }
    }));
    // The poller task ends with the runtime.
    drop(local);
    let queue_stats = vec![aqp.with_queue_pair(|qp| qp.stats())];
    let Ok(cell) = Rc::try_unwrap(run) else {
        shared.fail(PerfError::Run("an async task outlived the run".into()));
        return None;
    };
    let mut r = cell.into_inner();
    r.totals.publish(counters);
    Some(WorkerResult {
        thread,
        measured: r.clock.measured,
        accs: final_accs(std::slice::from_mut(&mut r.work), &r.clock),
        queue_stats,
        errors: r.errors,
        data_pointer,
    })
}

/// A worker's state, shared by its tasks (one thread: `Rc<RefCell<_>>`).
struct Run {
    work: NsWork,
    rng: Rng,
    clock: Clock,
    errors: Vec<ErrorReport>,
    totals: Totals,
    /// With a poller task: the time of its last turn, the completion time of the I/Os its
    /// reap woke.
    reaped_at: Option<Ticks>,
}

/// The queue pair's poller task, reading the clock after each of its turns for the tasks the
/// turn woke (they run after it), advancing the run's clock and publishing its progress: the
/// direct worker's one clock read per poll.
struct Stamped {
    poller: Poller,
    run: Rc<RefCell<Run>>,
    abort: Arc<AtomicBool>,
    counters: Arc<Vec<ProgressCounters>>,
    thread: usize,
}

impl Future for Stamped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let turn = Pin::new(&mut self.poller).poll(cx);
        let now = Ticks::now();
        let r = &mut *self.run.borrow_mut();
        r.reaped_at = Some(now);
        r.clock.tick(now, self.abort.load(Ordering::Relaxed));
        r.totals.publish(&self.counters[self.thread]);
        turn
    }
}

/// Slot `i`'s prepared I/O as a future (its data in the slot's buffer: nothing comes back).
fn issue(aqp: &AsyncQueuePair, w: &NsWork, i: usize) -> rnvme_driver::aio::IoFuture {
    let s = &w.slots[i];
    let lease = s.buf.lease(0, w.blocks as usize * w.lba_size as usize);
    let blocks = w.blocks as u64;
    if s.read {
        aqp.read_lease(w.nsid, s.lba, blocks, lease)
    } else {
        aqp.write_lease(w.nsid, s.lba, blocks, lease, w.fua)
    }
}
