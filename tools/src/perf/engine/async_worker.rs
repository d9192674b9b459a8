//! The async worker: the same I/O as the direct worker, issued through the driver's async API
//! ([`AsyncQueuePair`]) on a tokio current-thread runtime of the worker's own. The I/Os in
//! flight are a task per slot, each preparing its next I/O when the last completes.
//! A polled queue pair's completions are reaped by a poller task beside the I/O tasks; with
//! interrupts, the queue pair's reaper thread sleeps on its vector (spinning first in hybrid
//! mode) and wakes them.

use std::cell::RefCell;
use std::rc::Rc;

use rnvme_driver::aio::{AsyncQueuePair, Drive};
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
                let io = issue(&aqp, &run.borrow().work, i);
                let (_, result) = io.await;
                let now = Ticks::now();
                let r = &mut *run.borrow_mut();
                r.clock.tick(now, abort.load(Ordering::Relaxed));
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
                r.totals.publish(&all[thread]);
                if r.clock.phase == Phase::Stop {
                    break;
                }
                r.work.prepare(i, &mut r.rng, now);
            }
        };
        tasks.push(local.spawn_local(task));
    }
    if aqp.drive() == Drive::Poller {
        local.spawn_local(aqp.poller());
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
}

/// Slot `i`'s prepared I/O as a future that yields the slot with the result.
fn issue(
    aqp: &AsyncQueuePair,
    w: &NsWork,
    i: usize,
) -> impl std::future::Future<Output = (usize, rnvme_driver::Result<()>)> {
    let s = &w.slots[i];
    let lease = s.buf.lease(0, w.blocks as usize * w.lba_size as usize);
    let blocks = w.blocks as u64;
    let io = if s.read {
        aqp.read_lease(w.nsid, s.lba, blocks, lease)
    } else {
        aqp.write_lease(w.nsid, s.lba, blocks, lease, w.fua)
    };
    async move { (i, io.await.map(|_| ())) }
}
