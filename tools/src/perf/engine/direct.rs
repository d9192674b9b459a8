//! The direct worker: a thread that owns its queue pairs and drives them itself.

use super::*;

/// A worker on its own queue pairs.
pub(super) fn direct_worker(ctx: &Ctx, shared: &Shared, thread: usize) -> Option<WorkerResult> {
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
                        .create_io_qpair_with(plan.queue_entries, cfg.wait)
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
    let think = ctx.rate.ticks(cfg.thinktime);
    let mut errors = Vec::new();
    let counters = &shared.counters[thread];
    let mut done: Vec<Completion> = Vec::new();
    let mut fatal: Option<PerfError> = None;
    let mut totals = Totals::default();

    // Interrupt and hybrid modes sleep on the queue pair's vector when it has nothing (one
    // queue pair per thread: `PerfConfig::check` and `execute` see to it).
    let sleeps = cfg.wait.needs_interrupts();
    // Fill every queue, one doorbell each (an idle run submits nothing).
    'fill: for (w, qv) in works.iter_mut().zip(qps.iter_mut()) {
        if cfg.idle {
            break;
        }
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
                if sleeps {
                    // Nothing outstanding (an idle run): sleep longer, wake less.
                    let slice = if w.outstanding == 0 {
                        IDLE_WAIT_SLICE
                    } else {
                        WAIT_SLICE
                    };
                    qp.wait(usize::MAX, slice, |c| done.push(c));
                } else {
                    qp.poll(usize::MAX, |c| done.push(c));
                }
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
                        let now = if think == 0 {
                            now
                        } else {
                            // fio's thinktime: the device sees a pause before the next I/O.
                            let until = Ticks::now().after(think);
                            loop {
                                let t = Ticks::now();
                                if t >= until {
                                    break t;
                                }
                                std::hint::spin_loop();
                            }
                        };
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
            // A sleeping wait took up to WAIT_SLICE: read the clock after each.
            if idle < IDLE_CLOCK_EVERY && !sleeps {
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
pub(super) const TARGET_SHIFT: u32 = 48;
