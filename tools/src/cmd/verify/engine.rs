//! The verify engine: the plan of writes and reads, the workers that drive the queue pairs, and
//! the run that ties them together (flushes, resets, faults).

use super::*;

/// A range of LBAs one command covers, and how often it was sent again after a reset.
#[derive(Copy, Clone, Debug)]
pub(super) struct Item {
    pub(super) lba: u64,
    pub(super) blocks: u32,
    pub(super) resubmits: u8,
}

/// What one thread found.
#[derive(Default)]
pub(super) struct Part {
    pub(super) written: u64,
    pub(super) checked: u64,
    pub(super) ok: u64,
    pub(super) counts: ClassCounts,
    pub(super) unreadable: u64,
    pub(super) unwritable: u64,
    pub(super) flush_errors: u64,
    pub(super) mismatches: Vec<Mismatch>,
    pub(super) failures: Vec<IoFailure>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Write,
    Read,
}

/// The parameters every thread shares.
pub(super) struct Plan {
    pub(super) dev: String,
    pub(super) nsid: u32,
    pub(super) lba_size: usize,
    pub(super) seed: u64,
    pub(super) generation: u32,
    pub(super) depth: usize,
    pub(super) io_blocks: u32,
    pub(super) sync_every: u64,
    pub(super) max_listed: usize,
    /// LBAs to deal with in the whole run (twice the range with the write phase).
    pub(super) total: u64,
    /// LBAs dealt with so far by all threads.
    pub(super) done: AtomicU64,
}

/// One thread's queue pair, buffers and part of the range.
pub(super) struct Worker<'a> {
    pub(super) plan: &'a Plan,
    pub(super) thread: u32,
    pub(super) hw: Arc<dyn Hardware>,
    pub(super) qp: IoQueuePair,
    pub(super) bufs: Vec<DmaBuffer>,
    pub(super) host: Vec<u8>,
    pub(super) scratch: Vec<u8>,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) part: Part,
}

impl Worker<'_> {
    /// The chunk (of `io_blocks` LBAs from `start`) an LBA belongs to.
    pub(super) fn chunk(&self, lba: u64) -> usize {
        ((lba - self.start) / self.plan.io_blocks as u64) as usize
    }

    pub(super) fn stopped(&self, source: DriverError) -> VerifyError {
        VerifyError::Stopped {
            dev: self.plan.dev.clone(),
            done: self.plan.done.load(Ordering::Relaxed),
            total: self.plan.total,
            source,
        }
    }

    /// After a reset cancelled commands: fine if the controller is ready again, else the run
    /// stops.
    pub(super) fn controller_back(&self, stop: &AtomicBool) -> Result<(), VerifyError> {
        let csts = self.hw.read32(reg::CSTS);
        if csts == u32::MAX {
            stop.store(true, Ordering::Relaxed);
            return Err(self.stopped(DriverError::DeviceRemoved {
                dev: self.plan.dev.clone(),
            }));
        }
        if csts & csts::RDY == 0 || csts & csts::CFS != 0 {
            stop.store(true, Ordering::Relaxed);
            return Err(VerifyError::ControllerLost {
                dev: self.plan.dev.clone(),
                done: self.plan.done.load(Ordering::Relaxed),
                total: self.plan.total,
                csts,
            });
        }
        Ok(())
    }

    pub(super) fn record_failure(&mut self, f: IoFailure) {
        if self.part.failures.len() < self.plan.max_listed {
            self.part.failures.push(f);
        }
    }

    /// Check the blocks of a completed read in `self.bufs[slot]`.
    pub(super) fn check(&mut self, slot: usize, item: Item) {
        let ls = self.plan.lba_size;
        let bytes = item.blocks as usize * ls;
        self.bufs[slot].read_bytes(0, &mut self.host[..bytes]);
        for i in 0..item.blocks as usize {
            let lba = item.lba + i as u64;
            let want = Stamp {
                lba,
                seed: self.plan.seed,
                generation: self.plan.generation,
            };
            let block = &self.host[i * ls..(i + 1) * ls];
            self.part.checked += 1;
            match classify(block, want, &mut self.scratch) {
                None => self.part.ok += 1,
                Some(m) => {
                    log::debug!("{}: {m}", self.plan.dev);
                    self.part.counts.add(m.class);
                    if self.part.mismatches.len() < self.plan.max_listed {
                        self.part.mismatches.push(m);
                    }
                }
            }
        }
    }

    /// Run one phase over this worker's part. `synced` hears of every Flush that completed.
    pub(super) fn phase(
        &mut self,
        phase: Phase,
        stop: &AtomicBool,
        synced: &(dyn Fn(Synced) + Sync),
    ) -> Result<(), VerifyError> {
        let plan = self.plan;
        let ls = plan.lba_size;
        let io = plan.io_blocks as u64;
        let chunks = (self.end - self.start).div_ceil(io) as usize;
        // Write phase: LBAs not yet dealt with of each chunk issued past the in-order
        // watermark (a window, not a count per chunk of the whole range: that could be
        // gigabytes for a large namespace of small I/Os).
        let mut remaining: VecDeque<u32> = VecDeque::new();
        let mut watermark = 0usize; // chunks fully dealt with, in order
        let mut flushed_to = self.start;
        let mut flush_pending: Option<u64> = None;
        let mut next = self.start;
        let mut redo: VecDeque<Item> = VecDeque::new();
        let mut inflight: Vec<Option<Item>> = vec![None; plan.depth];
        let mut free: Vec<usize> = (0..plan.depth).rev().collect();
        let mut completions: Vec<Completion> = Vec::with_capacity(plan.depth + 1);
        let stall = self.qp.command_timeout() * 4 + Duration::from_secs(10);
        // Ticks, not `Instant`: this is checked on every empty poll, and a clock read can be a
        // system call.
        let mut last_progress = Ticks::now();
        let mut final_flush_done = phase == Phase::Read;
        loop {
            if stop.load(Ordering::Relaxed) {
                // Another thread hit a fatal error; its error is the run's.
                return Ok(());
            }
            // Queue as much as there is room for.
            while let Some(&slot) = free.last() {
                let item = match redo.pop_front() {
                    Some(i) => i,
                    None if next < self.end => {
                        let n = io.min(self.end - next) as u32;
                        let i = Item {
                            lba: next,
                            blocks: n,
                            resubmits: 0,
                        };
                        next += n as u64;
                        if phase == Phase::Write {
                            remaining.push_back(n);
                        }
                        i
                    }
                    None => break,
                };
                let bytes = item.blocks as usize * ls;
                let cmd = match phase {
                    Phase::Write => {
                        for (i, block) in self.host[..bytes].chunks_exact_mut(ls).enumerate() {
                            encode(
                                block,
                                Stamp {
                                    lba: item.lba + i as u64,
                                    seed: plan.seed,
                                    generation: plan.generation,
                                },
                            );
                        }
                        self.bufs[slot].write_bytes(0, &self.host[..bytes]);
                        write_cmd(plan.nsid, item.lba, item.blocks, false)
                    }
                    Phase::Read => read_cmd(plan.nsid, item.lba, item.blocks),
                };
                let seg = [self.bufs[slot].segment_at(0, bytes)];
                match self.qp.submit(cmd, &seg, slot as u64) {
                    Ok(_) => {
                        free.pop();
                        inflight[slot] = Some(item);
                    }
                    Err(DriverError::QueueFull) => {
                        redo.push_front(item);
                        break;
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        return Err(self.stopped(e));
                    }
                }
            }
            // Write phase: make what completed in order durable, every sync_every LBAs and
            // at the end.
            if phase == Phase::Write && flush_pending.is_none() {
                while watermark < chunks && remaining.front() == Some(&0) {
                    remaining.pop_front();
                    watermark += 1;
                }
                let mark = (self.start + watermark as u64 * io).min(self.end);
                if mark > flushed_to && (mark - flushed_to >= plan.sync_every || mark == self.end) {
                    match self.qp.submit(flush_cmd(plan.nsid), &[], FLUSH_TAG) {
                        Ok(_) => flush_pending = Some(mark),
                        Err(DriverError::QueueFull) => {}
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            return Err(self.stopped(e));
                        }
                    }
                }
            }
            let outstanding = self.qp.outstanding();
            if outstanding == 0
                && redo.is_empty()
                && next >= self.end
                && flush_pending.is_none()
                && final_flush_done
            {
                return Ok(());
            }
            completions.clear();
            self.qp.poll(plan.depth + 1, |c| completions.push(c));
            if completions.is_empty() {
                if elapsed_since(last_progress).is_some_and(|w| w > stall) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(VerifyError::Stalled {
                        dev: plan.dev.clone(),
                        secs: stall.as_secs(),
                        outstanding,
                    });
                }
                continue;
            }
            last_progress = Ticks::now();
            for c in completions.drain(..) {
                if c.status == NvmeStatus::DEVICE_REMOVED {
                    stop.store(true, Ordering::Relaxed);
                    return Err(self.stopped(DriverError::DeviceRemoved {
                        dev: plan.dev.clone(),
                    }));
                }
                if c.tag == FLUSH_TAG {
                    let mark = flush_pending.take().expect("a flush was outstanding");
                    if c.status.is_success() {
                        flushed_to = mark;
                        if mark == self.end {
                            final_flush_done = true;
                        }
                        synced(Synced {
                            thread: self.thread,
                            start: self.start,
                            synced: mark,
                            end: self.end,
                        });
                    } else if c.status == NvmeStatus::ABORTED_BY_RESET {
                        // Sent again at the next turn.
                    } else {
                        self.part.flush_errors += 1;
                        self.record_failure(IoFailure {
                            op: "flush",
                            lba: self.start,
                            blocks: 0,
                            status: c.status.to_string(),
                        });
                        // Do not try again for what is already there.
                        flushed_to = mark;
                        if mark == self.end {
                            final_flush_done = true;
                        }
                    }
                    continue;
                }
                let slot = c.tag as usize;
                let item = inflight[slot].take().expect("a command in this slot");
                free.push(slot);
                if c.status.is_success() {
                    match phase {
                        Phase::Write => self.part.written += item.blocks as u64,
                        Phase::Read => self.check(slot, item),
                    }
                } else if c.status == NvmeStatus::ABORTED_BY_RESET
                    && item.resubmits < RESET_RESUBMITS
                {
                    // Cancelled by a controller reset: it may or may not have happened. Send
                    // it again if the controller came back.
                    self.controller_back(stop)?;
                    redo.push_front(Item {
                        resubmits: item.resubmits + 1,
                        ..item
                    });
                    continue;
                } else if item.blocks > 1 && c.status != NvmeStatus::ABORTED_BY_RESET {
                    // Find exactly which LBAs fail: one command per LBA.
                    log::info!(
                        "{}: {} of LBAs {}..{} failed ({}): trying each LBA alone",
                        plan.dev,
                        if phase == Phase::Write {
                            "write"
                        } else {
                            "read"
                        },
                        item.lba,
                        item.lba + item.blocks as u64,
                        c.status
                    );
                    for k in (0..item.blocks as u64).rev() {
                        redo.push_front(Item {
                            lba: item.lba + k,
                            blocks: 1,
                            resubmits: 0,
                        });
                    }
                    continue;
                } else {
                    let op = match phase {
                        Phase::Write => {
                            self.part.unwritable += 1;
                            "write"
                        }
                        Phase::Read => {
                            self.part.unreadable += 1;
                            "read"
                        }
                    };
                    log::warn!(
                        "{}: {op} of LBA {} failed: {}",
                        plan.dev,
                        item.lba,
                        c.status
                    );
                    self.record_failure(IoFailure {
                        op,
                        lba: item.lba,
                        blocks: item.blocks,
                        status: c.status.to_string(),
                    });
                }
                plan.done.fetch_add(item.blocks as u64, Ordering::Relaxed);
                if phase == Phase::Write {
                    let ch = self.chunk(item.lba) - watermark;
                    remaining[ch] -= item.blocks;
                }
            }
        }
    }
}

/// The largest command of this controller and namespace, in LBAs.
pub(super) fn max_blocks(ctrl: &Controller, lba_size: u32) -> u32 {
    (ctrl.max_transfer_bytes() / lba_size).clamp(1, MAX_NLB)
}

/// Run `cfg` on `ctrl`. `synced` hears of each Flush of the write phase that completed (from
/// the worker threads).
pub fn run(
    ctrl: &Controller,
    cfg: &VerifyConfig,
    synced: &(dyn Fn(Synced) + Sync),
) -> Result<VerifyReport, VerifyError> {
    cfg.check()?;
    let dev = ctrl.name().to_string();
    let ns = ctrl
        .namespace(cfg.nsid)
        .map_err(|e| VerifyError::Invalid(e.to_string()))?
        .clone();
    let count = match cfg.count {
        Some(c) => c,
        None => ns.size_lbas.saturating_sub(cfg.lba),
    };
    if count == 0 {
        return Err(VerifyError::Invalid(
            "nothing to verify: give --count of at least 1 (or an --lba inside the namespace)"
                .into(),
        ));
    }
    if cfg.lba.checked_add(count).is_none_or(|e| e > ns.size_lbas) {
        return Err(VerifyError::Invalid(format!(
            "LBAs {}..{} are beyond namespace {}, which has {} LBAs (0..{})",
            cfg.lba,
            cfg.lba.saturating_add(count),
            ns.nsid,
            ns.size_lbas,
            ns.size_lbas
        )));
    }
    let lba_size = ns.lba_size;
    if (lba_size as usize) < HEADER_LEN * 2 || !lba_size.is_multiple_of(8) {
        return Err(VerifyError::Invalid(format!(
            "namespace {} has {lba_size}-byte LBAs: the pattern needs at least 64",
            ns.nsid
        )));
    }
    if cfg.io_size == 0 || !cfg.io_size.is_multiple_of(lba_size) {
        return Err(VerifyError::Invalid(format!(
            "the I/O size {} bytes is not a positive multiple of namespace {}'s {lba_size}-byte LBA size",
            cfg.io_size, ns.nsid
        )));
    }
    // One queue entry is always empty, one more is kept for the Flush.
    let max_depth = ctrl.max_queue_entries().saturating_sub(2).max(1);
    if cfg.depth == 0 || cfg.depth > max_depth {
        return Err(VerifyError::Invalid(format!(
            "queue depth {} is outside what {dev} allows: 1 to {max_depth} commands in flight \
             (the controller's queues have {} entries, CAP.MQES + 1; one stays empty and one is kept for Flush)",
            cfg.depth,
            ctrl.max_queue_entries()
        )));
    }
    let granted = ctrl.io_queues_granted() as u32;
    if cfg.threads == 0 || cfg.threads > granted {
        return Err(VerifyError::Invalid(format!(
            "{} threads: {dev} granted {granted} I/O queue pairs, one per thread; give --threads 1 to {granted}",
            cfg.threads
        )));
    }
    let io_blocks = (cfg.io_size / lba_size)
        .min(max_blocks(ctrl, lba_size))
        .max(1);
    let sync_every = cfg
        .sync_every
        .unwrap_or(((8u64 << 20) / lba_size as u64).max(1));
    let plan = Plan {
        dev: dev.clone(),
        nsid: ns.nsid,
        lba_size: lba_size as usize,
        seed: cfg.seed,
        generation: cfg.generation,
        depth: cfg.depth as usize,
        io_blocks,
        sync_every,
        max_listed: cfg.max_listed,
        total: count * if cfg.write { 2 } else { 1 },
        done: AtomicU64::new(0),
    };
    // Split the range into one part per thread, at command boundaries.
    let chunks = count.div_ceil(io_blocks as u64);
    let threads = (cfg.threads as u64).min(chunks);
    let mut bounds = Vec::new();
    for t in 0..threads {
        let a = cfg.lba + (chunks * t / threads) * io_blocks as u64;
        let b = (cfg.lba + (chunks * (t + 1) / threads) * io_blocks as u64).min(cfg.lba + count);
        bounds.push((a, b));
    }
    let stopped = |source| VerifyError::Stopped {
        dev: dev.clone(),
        done: 0,
        total: plan.total,
        source,
    };
    let mut workers = Vec::new();
    for (t, &(start, end)) in bounds.iter().enumerate() {
        let mut qp = ctrl.create_io_qpair(cfg.depth + 2).map_err(stopped)?;
        if let Some(t) = cfg.command_timeout {
            qp.set_timeout(t);
        }
        let bytes = io_blocks as usize * lba_size as usize;
        let bufs = (0..cfg.depth)
            .map(|_| ctrl.alloc(bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(stopped)?;
        workers.push(Worker {
            plan: &plan,
            thread: t as u32,
            hw: ctrl.hardware().clone(),
            qp,
            bufs,
            host: vec![0; bytes],
            scratch: vec![0; lba_size as usize],
            start,
            end,
            part: Part::default(),
        });
    }
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let phases: &[Phase] = if cfg.write {
        &[Phase::Write, Phase::Read]
    } else {
        &[Phase::Read]
    };
    for &phase in phases {
        // All threads finish writing before any reads back: a misdirected write into another
        // thread's part is then seen too.
        let first_err: Mutex<Option<VerifyError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for w in workers.iter_mut() {
                let (stop, first_err) = (&stop, &first_err);
                s.spawn(move || {
                    if let Err(e) = w.phase(phase, stop, synced) {
                        let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
    }
    let elapsed = started.elapsed();
    let mut report = VerifyReport {
        device: dev,
        nsid: ns.nsid,
        lba: cfg.lba,
        count,
        lba_size,
        seed: cfg.seed,
        generation: cfg.generation,
        threads: workers.len() as u32,
        depth: cfg.depth,
        io_size: io_blocks * lba_size,
        written: 0,
        checked: 0,
        ok: 0,
        mismatches: ClassCounts::default(),
        unreadable: 0,
        unwritable: 0,
        flush_errors: 0,
        first_mismatches: Vec::new(),
        io_failures: Vec::new(),
        driver: DriverCounts::default(),
        elapsed_s: elapsed.as_secs_f64(),
    };
    for w in &workers {
        let p = &w.part;
        report.written += p.written;
        report.checked += p.checked;
        report.ok += p.ok;
        report.mismatches.merge(&p.counts);
        report.unreadable += p.unreadable;
        report.unwritable += p.unwritable;
        report.flush_errors += p.flush_errors;
        report.first_mismatches.extend(p.mismatches.iter().cloned());
        report.io_failures.extend(p.failures.iter().cloned());
        report.driver.add(&w.qp.stats());
    }
    report.first_mismatches.sort_by_key(|m| m.lba);
    report.first_mismatches.truncate(cfg.max_listed);
    report.io_failures.sort_by_key(|f| f.lba);
    report.io_failures.truncate(cfg.max_listed);
    Ok(report)
}
