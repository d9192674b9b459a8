//! Workers that go through a reactor: channel clients and callback completers.

use super::*;

/// The reactor requests of slot `i` of target `t`, each handed to `send`.
#[inline]
pub(super) fn slot_requests(
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
pub(super) fn queue_slot(
    out: &mut Vec<IoRequest>,
    t: usize,
    w: &NsWork,
    i: usize,
    queue_base: usize,
) {
    slot_requests(t, w, i, queue_base, |r| out.push(r));
}

/// What a reactor answer says: its target, its tag within the target, the error to count
/// (`None`: success), and whether that error ends the run (anything but a command status).
pub(super) struct Answer {
    pub(super) t: usize,
    pub(super) tag: u64,
    pub(super) err: Option<String>,
    pub(super) ends_run: bool,
}

impl Answer {
    pub(super) fn of(d: &IoDone) -> Answer {
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
pub(super) fn run_ended(w: &NsWork, err: &Option<String>) -> PerfError {
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
pub(super) fn wait_answers(rx: &Receiver<IoDone>, batch: &mut Vec<IoDone>) {
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
pub(super) fn reactor_works(ctx: &Ctx, shared: &Shared, thread: usize) -> Option<Vec<NsWork>> {
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
pub(super) fn reactor_client(
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
pub(super) struct CbState {
    pub(super) works: Vec<NsWork>,
    pub(super) rng: Rng,
    pub(super) clock: Clock,
    pub(super) errors: Vec<ErrorReport>,
    pub(super) totals: Totals,
    pub(super) fatal: Option<PerfError>,
    pub(super) outstanding: usize,
}

/// The completer of one worker's requests: everything its loop would own.
pub(super) struct CbInner {
    pub(super) state: Mutex<CbState>,
    pub(super) queue_base: Vec<usize>,
    pub(super) thread: usize,
    pub(super) stop_on_error: bool,
    pub(super) shared_abort: std::sync::Arc<AtomicBool>,
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
pub(super) fn reactor_callbacks(
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
