//! One worker's work: its slots, the namespaces it drives and their counters, and the
//! helpers every kind of worker shares (pinning, set-up, stall and drain errors).

use super::*;

/// One I/O in flight (or ready to go): its buffer and what it is doing.
pub(super) struct Slot {
    pub(super) buf: DmaBuffer,
    /// The separate metadata buffer, on namespaces that keep metadata apart.
    pub(super) meta: Option<DmaBuffer>,
    pub(super) lba: u64,
    pub(super) read: bool,
    pub(super) submitted: Ticks,
    /// Commands of this I/O not yet completed.
    pub(super) left: u32,
    pub(super) failed: bool,
    /// Queue pair (index among this target's) it always goes to.
    pub(super) queue: usize,
    pub(super) busy: bool,
}

/// One command's share of an I/O: LBA offset, LBAs, byte offset.
#[derive(Copy, Clone, Debug)]
pub(super) struct PieceT {
    pub(super) lba_off: u64,
    pub(super) blocks: u32,
    pub(super) byte_off: usize,
}

/// One thread's work on one namespace.
pub(super) struct NsWork {
    pub(super) label: String,
    pub(super) nsid: u32,
    /// Bytes of the data buffer per LBA (the block, and its metadata on an extended-LBA
    /// format).
    pub(super) lba_size: u32,
    /// Bytes of the separate metadata buffer per LBA (0: none).
    pub(super) ms: u32,
    /// Bytes of logical block data per I/O (the -o size: metadata not counted).
    pub(super) io_bytes: u64,
    pub(super) blocks: u32,
    pub(super) pieces: Vec<PieceT>,
    pub(super) gen: OffsetGen,
    pub(super) read_percent: u8,
    pub(super) fua: bool,
    pub(super) verify: bool,
    pub(super) slots: Vec<Slot>,
    pub(super) acc: Acc,
    /// The window `acc` counts for: 0 = warm-up, 1 = measured.
    pub(super) acc_epoch: u8,
    pub(super) outstanding: usize,
}

/// What one worker thread hands back.
pub(crate) struct WorkerResult {
    pub(super) thread: usize,
    pub(super) measured: Duration,
    pub(super) accs: Vec<Acc>,
    pub(super) queue_stats: Vec<QueueStats>,
    pub(super) errors: Vec<ErrorReport>,
    pub(super) data_pointer: Vec<String>,
}

impl NsWork {
    pub(super) fn new(
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
    pub(super) fn prepare(&mut self, i: usize, rng: &mut Rng, now: Ticks) {
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
    pub(super) fn commands<'a>(
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
    pub(super) fn complete(
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

pub(super) fn status_text(st: NvmeStatus) -> String {
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
pub(super) fn pin_worker(cfg: &PerfConfig, thread: usize) -> Result<(), PerfError> {
    let Some(cpus) = &cfg.cpus else {
        return Ok(());
    };
    let cpu = cpus.cpus()[thread % cpus.cpus().len()];
    rnvme_driver::affinity::pin_current_thread(cpu).map_err(cpus_error)
}

/// A CPU of `--cpus` that cannot be used.
pub(super) fn cpus_error(e: rnvme_driver::affinity::AffinityError) -> PerfError {
    PerfError::Invalid(format!("--cpus: {e}"))
}

/// Per-thread set-up that cannot fail half way without telling the others.
pub(super) fn setup<T>(shared: &Shared, f: impl FnOnce() -> Result<T, PerfError>) -> Option<T> {
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
pub(super) fn submit_slot(w: &NsWork, i: usize, qp: &mut IoQueuePair) -> Result<(), PerfError> {
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
pub(super) struct Totals {
    pub(super) ios: u64,
    pub(super) bytes: u64,
    pub(super) errors: u64,
}

impl Totals {
    #[inline]
    pub(super) fn publish(&self, c: &ProgressCounters) {
        c.ios.store(self.ios, Ordering::Relaxed);
        c.bytes.store(self.bytes, Ordering::Relaxed);
        c.errors.store(self.errors, Ordering::Relaxed);
    }
}

pub(super) fn stalled(works: &[NsWork], outstanding: usize) -> PerfError {
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

pub(super) fn drain_timeout(outstanding: usize) -> PerfError {
    PerfError::Run(format!(
        "{outstanding} I/O(s) still in flight {} s after the end of the run: the controller stopped answering",
        DRAIN.as_secs()
    ))
}

/// The accumulators to report: a namespace that completed nothing since the measured window
/// opened still holds warm-up counts.
pub(super) fn final_accs(works: &mut [NsWork], clock: &Clock) -> Vec<Acc> {
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
