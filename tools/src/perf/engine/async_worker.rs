//! The async worker: the same I/O as the direct worker, issued through the driver's async API
//! ([`AsyncQueuePair`]) on a tokio current-thread runtime of the worker's own. The I/Os in
//! flight are futures in one `FuturesUnordered`; each completion prepares the slot's next I/O.
//! A polled queue pair's futures reap for themselves; with interrupts, the queue pair's reaper
//! thread sleeps on its vector (spinning first in hybrid mode) and wakes them.

use futures::stream::{FuturesUnordered, StreamExt};
use rnvme_driver::aio::{AsyncQueuePair, Drive};
use rnvme_driver::irq::WaitMode;

use super::*;

/// A worker whose I/O goes through the async API (one namespace, one queue pair).
pub(super) fn async_worker(ctx: &Ctx, shared: &Shared, thread: usize) -> Option<WorkerResult> {
    let cfg = ctx.cfg;
    let (mut work, aqp) = setup(shared, || {
        pin_worker(cfg, thread)?;
        let (plan, target) = (&ctx.plans[0], &ctx.targets[0]);
        let qp = target
            .ctrl
            .create_io_qpair_with(plan.queue_entries, cfg.wait)
            .map_err(|e| PerfError::device(&plan.label, e))?;
        let drive = match cfg.wait {
            WaitMode::Polled => Drive::Poll,
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
    let mut rng = Rng::new(cfg.seed.wrapping_add(thread as u64 * 0x1_0000_0001));
    let start = Ticks::now();
    let mut clock = Clock::new(start, cfg, ctx.rate);
    let mut errors = Vec::new();
    let counters = &shared.counters[thread];
    let mut totals = Totals::default();
    let w = &mut work;
    runtime.block_on(async {
        let mut inflight = FuturesUnordered::new();
        for i in 0..w.slots.len() {
            w.prepare(i, &mut rng, start);
            inflight.push(issue(&aqp, w, i));
        }
        // No timer of its own (reading the clock is a system call in some guests): the queue
        // pair's deadlines abort a lost command, reset the controller if that fails, and so
        // always complete it.
        while let Some((i, result)) = inflight.next().await {
            let now = Ticks::now();
            clock.tick(now, shared.abort.load(Ordering::Relaxed));
            let status = result.err().map(|e| e.to_string());
            if status.is_some() {
                totals.errors += 1;
                if cfg.stop_on_error {
                    shared.abort.store(true, Ordering::Relaxed);
                }
            }
            for p in 0..w.pieces.len() {
                let tag = ((i as u64) << 16) | p as u64;
                w.complete(tag, status.as_deref(), now, &clock, thread, &mut errors);
            }
            totals.ios += 1;
            totals.bytes += w.io_bytes;
            totals.publish(counters);
            if clock.phase != Phase::Stop {
                w.prepare(i, &mut rng, now);
                inflight.push(issue(&aqp, w, i));
            }
        }
    });
    totals.publish(counters);
    let queue_stats = vec![aqp.with_queue_pair(|qp| qp.stats())];
    Some(WorkerResult {
        thread,
        measured: clock.measured,
        accs: final_accs(std::slice::from_mut(&mut work), &clock),
        queue_stats,
        errors,
        data_pointer,
    })
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
