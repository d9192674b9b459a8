//! Commands and their completions: submitting a command for pages (polling while the queue is
//! full), reaping completions and ending the I/O of the pages they carry (the role of
//! `mpage_end_io`), retrying failed multi-page reads page by page, and waiting.

use rnvme_driver::clock::{Stopwatch, Ticks};
use rnvme_driver::dma::DmaSlice;
use rnvme_driver::Segment;

use crate::backend::{BlockIo, IoError, IoOp, IoRequest};
use crate::cache::{FileId, InFlight, PageCache, Target};
use crate::error::{MpageError, PageError};
use crate::map::{MapError, Mapping};
use crate::page::Page;

/// The longest one wait for a completion lasts before the waiting loop looks at its deadline
/// and retries again.
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(1);

impl<D: BlockIo> PageCache<D> {
    // ---- commands and completions -----------------------------------------------------

    pub(crate) fn map_call(
        &mut self,
        f: FileId,
        block: u64,
        max_blocks: u64,
        create: bool,
    ) -> Result<Mapping, MapError> {
        self.stats.map_calls += 1;
        let fs = self.files[f.slot()].as_mut().expect("open file");
        let m = fs.map().map(block, max_blocks.max(1), create)?;
        if m.blocks() == 0 {
            return Err(MapError::Failed {
                file_block: block,
                reason: "the map answered with an empty run".into(),
            });
        }
        Ok(m)
    }

    /// Submit one command, polling while the queue is full. A command the device refuses
    /// completes at once with the refusal, so its pages get the error like any other.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn submit_cmd(
        &mut self,
        f: FileId,
        op: IoOp,
        slba: u64,
        lbas: u32,
        segs: &[Segment],
        target: Target,
        fallback: bool,
    ) -> Result<u64, MpageError> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let pages = match &target {
            Target::Pages { pages, .. } => pages.clone(),
            Target::Block { page, .. } => vec![*page],
            Target::Flush => Vec::new(),
        };
        if op == IoOp::Write {
            self.writing += pages.len();
        }
        self.inflight.insert(
            tag,
            InFlight {
                file: f,
                op,
                slba,
                lbas,
                target,
            },
        );
        // The commands carry shares of the pool's buffers (a handle of the pool is held here
        // so that the borrow does not tie up `self`).
        let pool = self.pool.clone();
        let one;
        let many: Vec<DmaSlice<'_>>;
        let sliced: Result<&[DmaSlice<'_>], _> = match segs {
            [] => Ok(&[]),
            [s] => match pool.slice_of(*s) {
                Ok(x) => {
                    one = [x];
                    Ok(&one)
                }
                Err(e) => Err(e),
            },
            _ => match segs.iter().map(|s| pool.slice_of(*s)).collect() {
                Ok(v) => {
                    many = v;
                    Ok(&many)
                }
                Err(e) => Err(e),
            },
        };
        let data = match sliced {
            Ok(d) => d,
            Err(e) => {
                let e = MpageError::from(e);
                self.unsubmitted(tag, &e);
                return Err(e);
            }
        };
        let req = IoRequest {
            op,
            slba,
            lbas,
            segments: data,
            pages: &pages,
            fallback,
        };
        let started = Stopwatch::start();
        let mut idle = 0u32;
        loop {
            match self.dev.submit(&req, tag) {
                Ok(()) => {
                    self.unkicked += 1;
                    break;
                }
                Err(IoError::QueueFull) if self.inflight.len() > 1 => {
                    self.kick();
                    if self.poll_or_wait() == 0 {
                        idle += 1;
                        if idle.is_multiple_of(256) {
                            if let Err(e) = self.check_timeout(started) {
                                // Never submitted: its pages must not wait for it.
                                self.unsubmitted(tag, &e);
                                return Err(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    log::warn!(
                        "{}: {op} of {lbas} LBA(s) at {slba} not submitted: {e}",
                        self.dev.name()
                    );
                    self.complete(tag, Err(e));
                    return Ok(tag);
                }
            }
        }
        self.stats.commands += 1;
        match op {
            IoOp::Read => self.stats.read_commands += 1,
            IoOp::Write => self.stats.write_commands += 1,
            IoOp::Flush => self.stats.flush_commands += 1,
        }
        self.stats.data_segments += segs.len() as u64;
        if fallback {
            self.stats.fallback_commands += 1;
        }
        Ok(tag)
    }

    pub(crate) fn check_timeout(&self, since: Stopwatch) -> Result<(), MpageError> {
        if since.elapsed() >= self.opts.io_timeout {
            return Err(MpageError::Timeout {
                dev: self.dev.name().to_string(),
                ms: self.opts.io_timeout.as_millis() as u64,
                outstanding: self.inflight.len(),
            });
        }
        std::thread::yield_now();
        Ok(())
    }

    /// Tell the device of every command submitted since the last kick.
    pub(crate) fn kick(&mut self) {
        if self.unkicked > 0 {
            self.stats.kicks += 1;
            self.unkicked = 0;
            let t = Ticks::now();
            self.dev.kick();
            self.timed.doorbell += Ticks::now().since(t);
        } else {
            self.dev.kick();
        }
    }

    /// Tell the device of the commands held back if there are enough of them, or too few in
    /// flight before them to keep it busy (see [`crate::CacheOptions::kick_batch`]). Either
    /// way, a caller that waits for completions is not left waiting on held commands alone:
    /// those before them complete, and with fewer than `kick_low` in flight they go.
    #[inline]
    pub(crate) fn kick_lazily(&mut self) {
        if self.unkicked == 0 {
            return;
        }
        let before = self.inflight.len().saturating_sub(self.unkicked);
        if self.unkicked >= self.kick_batch || before < self.kick_low {
            self.kick();
        }
    }

    /// Wait for completions as the device waits (polling, or sleeping on an interrupt: see
    /// [`BlockIo::wait`]), at most `timeout`, and end those that came; returns how many.
    pub(crate) fn wait_once(&mut self, timeout: std::time::Duration) -> usize {
        self.reap(Some(timeout))
    }

    /// Reap what the device has completed; returns how many.
    pub(crate) fn poll_once(&mut self) -> usize {
        self.reap(None)
    }

    /// For a caller that needs a completion: reap what the device has completed, or wait
    /// for some at most [`WAIT_SLICE`] if it has none; returns how many. The time is the
    /// caller's wait for the device ([`crate::CacheStats::device_wait_ns`]).
    fn poll_or_wait(&mut self) -> usize {
        let t = Ticks::now();
        let mut n = self.poll_once();
        if n == 0 {
            n = self.wait_once(WAIT_SLICE);
        }
        self.timed.wait += Ticks::now().since(t);
        n
    }

    /// Poll the device (or wait on it, at most `wait`) and end the commands that completed.
    fn reap(&mut self, wait: Option<std::time::Duration>) -> usize {
        let mut done = Vec::new();
        let mut take = |tag, r| done.push((tag, r));
        let n = match wait {
            None => self.dev.poll(&mut take),
            Some(timeout) => self.dev.wait(timeout, &mut take),
        };
        for (tag, r) in done {
            self.complete(tag, r);
        }
        n
    }

    /// Poll until `cond` holds. `page` names what is waited for, for the error when nothing
    /// outstanding can make it hold.
    pub(crate) fn wait_until(
        &mut self,
        page: Option<(FileId, u64)>,
        cond: impl Fn(&Self) -> bool,
    ) -> Result<(), MpageError> {
        // The time-stamp counter, not `Instant::now()`: in a guest whose clock source is
        // emulated that is a system call and a device access, and a reader waits (and starts
        // this clock again) for most readahead windows.
        let mut since = Stopwatch::start();
        let mut idle = 0u32;
        loop {
            self.run_retries()?;
            if cond(self) {
                return Ok(());
            }
            if self.inflight.is_empty() && self.retry.is_empty() {
                let what = match page {
                    Some((f, p)) => format!("page {p} of file {f}"),
                    None => "I/O completions".to_string(),
                };
                return Err(MpageError::Stuck {
                    dev: self.dev.name().to_string(),
                    what,
                });
            }
            // Waiting for one page, readahead windows may stay held a while longer (the
            // page's own command is among those before them, or they go as those drain);
            // waiting for everything, everything goes.
            if page.is_some() {
                self.kick_lazily();
            } else {
                self.kick();
            }
            if self.poll_or_wait() > 0 {
                since = Stopwatch::start();
                idle = 0;
            } else {
                idle += 1;
                if idle.is_multiple_of(256) {
                    self.check_timeout(since)?;
                }
            }
        }
    }

    /// Wait for every outstanding command.
    pub fn wait_idle(&mut self) -> Result<(), MpageError> {
        if self.inflight.is_empty() && self.retry.is_empty() {
            return Ok(());
        }
        self.wait_until(None, |c| c.inflight.is_empty() && c.retry.is_empty())
    }

    /// Wait until a page has no I/O in flight (or is gone).
    pub(crate) fn wait_page(&mut self, f: FileId, p: u64) -> Result<(), MpageError> {
        if !self.page_ref(f, p).is_some_and(Page::busy) {
            return Ok(());
        }
        self.wait_until(Some((f, p)), |c| !c.page_ref(f, p).is_some_and(Page::busy))
    }

    pub(crate) fn run_retries(&mut self) -> Result<(), MpageError> {
        if self.in_retry || self.retry.is_empty() {
            return Ok(());
        }
        self.in_retry = true;
        let work = std::mem::take(&mut self.retry);
        let mut result = Ok(());
        for (f, pages) in work {
            for p in pages {
                if let Err(e) = self.read_batch(f, &[p]) {
                    log::error!("{}: re-reading page {p} of file {f}: {e}", self.dev.name());
                    let page = self.page_mut(f, p);
                    page.locked = false;
                    result = result.and(Err(e));
                }
            }
        }
        self.kick();
        self.in_retry = false;
        result
    }

    pub(crate) fn complete(&mut self, tag: u64, result: Result<(), IoError>) {
        self.complete_as(tag, result, true)
    }

    /// A command recorded under `tag` never reached the device: end it now with `why`, its
    /// pages unlocked (or out of write-back) with the error, and no page-by-page retry.
    fn unsubmitted(&mut self, tag: u64, why: &MpageError) {
        let e = IoError::Rejected {
            dev: self.dev.name().to_string(),
            reason: format!("not submitted: {why}"),
        };
        self.complete_as(tag, Err(e), false)
    }

    fn complete_as(&mut self, tag: u64, result: Result<(), IoError>, retry: bool) {
        let Some(inf) = self.inflight.remove(&tag) else {
            log::warn!(
                "{}: completion for unknown tag {tag} ignored",
                self.dev.name()
            );
            return;
        };
        if let Target::Flush = inf.target {
            self.flush_results.insert(tag, result);
            return;
        }
        if inf.op == IoOp::Write {
            self.writing -= match &inf.target {
                Target::Pages { pages, .. } => pages.len(),
                _ => 1,
            };
        }
        let f = inf.file;
        let err = result.err().map(|source| PageError::Io {
            op: inf.op,
            slba: inf.slba,
            lbas: inf.lbas,
            source,
        });
        if let Some(e) = &err {
            log::warn!("{}: file {f}: {e}", self.dev.name());
        }
        let Ok(geo) = self.geo(f) else { return };
        match (inf.op, inf.target) {
            (IoOp::Read, Target::Pages { pages, frames }) => {
                if retry && err.is_some() && pages.len() > 1 {
                    // Find out which pages are bad: read each again on its own.
                    self.stats.read_retries += 1;
                    self.retry.push((f, pages));
                    return;
                }
                for (p, fr) in pages.into_iter().zip(frames) {
                    let page = self.slot_mut(fr);
                    debug_assert!(
                        page.file == f && page.index == p,
                        "frame {fr} changed hands"
                    );
                    page.locked = false;
                    match &err {
                        None => {
                            page.uptodate = true;
                            page.error = None;
                        }
                        Some(e) => {
                            page.error = Some(Box::new(e.clone()));
                            self.stats.read_errors += 1;
                        }
                    }
                }
            }
            (IoOp::Write, Target::Pages { pages, frames }) => {
                for (&p, &fr) in pages.iter().zip(&frames) {
                    let page = self.slot_mut(fr);
                    debug_assert!(
                        page.file == f && page.index == p,
                        "frame {fr} changed hands"
                    );
                    page.writeback = false;
                    match &err {
                        None => {
                            let change = page.set_dirty(false);
                            page.blocks = None;
                            page.error = None;
                            self.dirty_changed(fr, change);
                        }
                        Some(e) => page.error = Some(Box::new(e.clone())),
                    }
                }
                if let Some(e) = err {
                    self.stats.write_errors += pages.len() as u64;
                    let fs = self.files[f.slot()].as_mut().expect("open file");
                    fs.write_error.get_or_insert((pages[0], e));
                }
            }
            (op, Target::Block { page: p, block }) => {
                let page = self.page_mut(f, p);
                let mut bits = page.bits(geo.bpp);
                match err {
                    None if op == IoOp::Read => bits.uptodate |= 1 << block,
                    None => bits.dirty &= !(1 << block),
                    Some(e) => {
                        page.pending_error.get_or_insert_with(|| Box::new(e));
                    }
                }
                page.blocks = Some(bits);
                self.end_block_io(f, p, op, geo.bpp);
            }
            (IoOp::Flush, _) | (_, Target::Flush) => unreachable!("flushes are handled above"),
        }
    }

    /// One per-block command of page `p` (or the issuing loop) is done.
    pub(crate) fn end_block_io(&mut self, f: FileId, p: u64, op: IoOp, bpp: u64) {
        let page = self.page_mut(f, p);
        page.pending -= 1;
        if page.pending > 0 {
            return;
        }
        let failed = page.pending_error.take().map(|e| *e);
        if op == IoOp::Read {
            page.locked = false;
        } else {
            page.writeback = false;
        }
        let change = page.normalize(bpp);
        let fr = page.frame.index() as u32;
        match failed {
            None => {
                if op == IoOp::Read || !page.dirty() {
                    page.error = None;
                }
            }
            Some(e) => {
                page.error = Some(Box::new(e.clone()));
                if op == IoOp::Read {
                    self.stats.read_errors += 1;
                } else {
                    self.stats.write_errors += 1;
                    let fs = self.files[f.slot()].as_mut().expect("open file");
                    fs.write_error.get_or_insert((p, e));
                }
            }
        }
        self.dirty_changed(fr, change);
    }
}
