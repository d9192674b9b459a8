//! Write-back on its own, as the kernel's flusher and `balance_dirty_pages` do it: dirty
//! pages counted exactly (per file and in all), background write-back past a threshold,
//! writers throttled at a dirty limit, expiry of old dirty pages, and `sync_range`.
//!
//! The cache has no thread of its own: the writers do this work on their way in (as a task
//! dirtying pages in Linux pays for write-back in `balance_dirty_pages`), and
//! [`PageCache::tick`] does it for an application that stops writing but wants its old
//! dirty pages to reach the disk.

use rnvme_driver::clock::{self, TickRate, Ticks};

use crate::backend::BlockIo;
use crate::cache::{FileId, PageCache, PAGE};
use crate::error::MpageError;
use crate::page::DirtyChange;

/// Fewest pages a background write-back takes from a file (1 MiB): enough for long commands
/// and not a pass per page written.
const BACKGROUND_CHUNK: usize = 256;

/// The time-stamp counter's rate. Timestamps here are counter ticks (in a guest whose clock
/// source is emulated, `Instant::now()` is a system call and a device access, and writers take
/// one per page they dirty); the driver learns the rate in a process's first millisecond, and
/// the first look for expired pages waits for it.
fn rate() -> TickRate {
    loop {
        if let Some(r) = clock::learned_rate() {
            return r;
        }
        std::hint::spin_loop();
    }
}

impl<D: BlockIo> PageCache<D> {
    /// Account for a change of page `fr`'s dirtiness (every change comes through here: the
    /// page's `dirty` flag is private to it and its setters return a must-use change).
    pub(crate) fn dirty_changed(&mut self, fr: u32, change: DirtyChange) {
        let sign = match change {
            DirtyChange::Same => return,
            DirtyChange::Dirtied => true,
            DirtyChange::Cleaned => false,
        };
        let now = sign.then(Ticks::now);
        let page = self.slot_mut(fr);
        page.dirtied = now;
        let f = page.file;
        if sign {
            self.dirty += 1;
        } else {
            self.dirty -= 1;
        }
        if let Some(fs) = self.files[f.slot()].as_mut() {
            if sign {
                if fs.dirty == 0 {
                    fs.dirtied = now;
                }
                fs.dirty += 1;
            } else {
                fs.dirty -= 1;
                if fs.dirty == 0 {
                    fs.dirtied = None;
                }
            }
        }
    }

    /// Dirty pages of all open files.
    pub fn dirty_pages_total(&self) -> usize {
        self.dirty
    }

    /// Pages carried by write commands in flight now.
    pub fn pages_under_write_back(&self) -> usize {
        self.writing
    }

    /// The background threshold and the dirty limit in force, in pages
    /// ([`crate::CacheOptions::dirty_background`], [`crate::CacheOptions::dirty_limit`]
    /// resolved).
    pub fn dirty_thresholds(&self) -> (usize, usize) {
        (self.dirty_background, self.dirty_limit)
    }

    /// Dirty pages no write command in flight carries.
    fn dirty_not_under_write_back(&self) -> usize {
        self.dirty.saturating_sub(self.writing)
    }

    /// Write-back that starts without waiting: pages past the expiry when the interval has
    /// passed, and background write-back past the threshold.
    fn start_due_writeback(&mut self) -> Result<(), MpageError> {
        if self.dirty == 0 {
            return Ok(());
        }
        self.expire_if_due(Ticks::now())?;
        if self.dirty_not_under_write_back() > self.dirty_background {
            self.background_writeback()?;
        }
        Ok(())
    }

    /// What a writer does before dirtying a page: the write-back that is due, and a wait at
    /// the limit.
    pub(crate) fn balance_dirty(&mut self) -> Result<(), MpageError> {
        self.start_due_writeback()?;
        if self.dirty >= self.dirty_limit {
            self.throttle()?;
        }
        Ok(())
    }

    /// For an application between bursts of work: reap completions, write back dirty pages
    /// that expired and start background write-back past the threshold. Never waits for the
    /// device. Call it now and then (every `writeback_interval` or so) when nothing else
    /// calls the cache; returns the pages it started writing.
    pub fn tick(&mut self) -> Result<usize, MpageError> {
        // Readahead held back goes now: the caller may not be back for a while.
        self.kick();
        self.poll_once();
        self.run_retries()?;
        let before = self.writing;
        self.start_due_writeback()?;
        Ok(self.writing.saturating_sub(before))
    }

    fn expire_if_due(&mut self, now: Ticks) -> Result<(), MpageError> {
        if now < self.next_expiry_check {
            return Ok(());
        }
        let rate = rate();
        self.next_expiry_check = now.after(rate.ticks(self.opts.writeback_interval));
        self.write_expired(now, rate)
    }

    /// Start writing back every idle page dirty for longer than the expiry.
    fn write_expired(&mut self, now: Ticks, rate: TickRate) -> Result<(), MpageError> {
        let expire = rate.ticks(self.opts.dirty_expire);
        let old = |t: Option<Ticks>| t.is_some_and(|t| now.since(t) >= expire);
        for i in 0..self.files.len() {
            let Some(fs) = self.files[i].as_ref() else {
                continue;
            };
            if !old(fs.dirtied) {
                // Its oldest dirty page is younger than the expiry: so are the others.
                continue;
            }
            let pages: Vec<u64> = fs
                .pages
                .iter()
                .filter(|&(_, fr)| {
                    let pg = self.slot(fr);
                    pg.dirty() && !pg.busy() && old(pg.dirtied)
                })
                .map(|(p, _)| p)
                .collect();
            if pages.is_empty() {
                continue;
            }
            self.stats.expired_writebacks += pages.len() as u64;
            self.write_batch(self.file_id(i), &pages)?;
        }
        Ok(())
    }

    /// Start writing back idle dirty pages, oldest dirty file first, going round each file
    /// from where its last background write-back stopped, until enough are on their way to
    /// bring the dirty pages not under write-back down to the threshold (at least
    /// [`BACKGROUND_CHUNK`] pages). Returns the pages started.
    pub(crate) fn background_writeback(&mut self) -> Result<usize, MpageError> {
        let over = self
            .dirty_not_under_write_back()
            .saturating_sub(self.dirty_background);
        let mut want = over.max(BACKGROUND_CHUNK);
        let mut order: Vec<(Ticks, u32)> = self
            .files
            .iter()
            .enumerate()
            .filter_map(|(i, fs)| {
                let fs = fs.as_ref()?;
                Some((fs.dirtied?, i as u32))
            })
            .collect();
        order.sort_unstable();
        let mut started = 0;
        for (_, i) in order {
            if want == 0 {
                break;
            }
            let f = self.file_id(i as usize);
            let fs = self.files[i as usize].as_ref().expect("open file");
            let from = fs.wb_next;
            let idle_dirty = |&(_, fr): &(u64, u32)| {
                let pg = self.slot(fr);
                pg.dirty() && !pg.busy()
            };
            let mut pages: Vec<u64> = fs
                .pages
                .iter_from(from)
                .filter(idle_dirty)
                .map(|(p, _)| p)
                .take(want)
                .collect();
            if pages.len() < want {
                // Round the file: the pages before where the last pass stopped.
                let more: Vec<u64> = fs
                    .pages
                    .range(0, from)
                    .filter(idle_dirty)
                    .map(|(p, _)| p)
                    .take(want - pages.len())
                    .collect();
                // Ascending, as the walk wants: the wrapped part first.
                pages.splice(0..0, more);
            }
            if pages.is_empty() {
                continue;
            }
            // The pass stops after the last page it took from the part past `from` (or, when
            // it took none there, after the wrapped part's last).
            let last = pages.iter().copied().filter(|&p| p >= from).max();
            let last = last.or(pages.last().copied()).expect("not empty");
            self.file_mut(f)?.wb_next = last + 1;
            want -= pages.len();
            started += pages.len();
            self.stats.background_writebacks += pages.len() as u64;
            self.write_batch(f, &pages)?;
        }
        Ok(started)
    }

    /// At the dirty limit: wait for write-backs to complete until fewer pages are dirty than
    /// the limit. A writer waits for some commands, not for every dirty page. Gives up
    /// waiting (and lets the write go on) when write-backs fail and nothing more is in flight:
    /// the failed pages stay dirty and `sync` reports them.
    fn throttle(&mut self) -> Result<(), MpageError> {
        self.stats.throttled += 1;
        loop {
            if self.dirty < self.dirty_limit {
                return Ok(());
            }
            let started = self.background_writeback()?;
            if started == 0 && self.writing == 0 {
                // Nothing idle to write and nothing on its way: every dirty page is busy
                // otherwise (reads of other blocks) or the limit is below what can be cleaned.
                return Ok(());
            }
            let before = self.dirty;
            self.wait_until(None, |c| c.dirty < c.dirty_limit || c.writing == 0)?;
            if self.dirty >= before && self.writing == 0 {
                // The writes completed and cleaned nothing: they failed.
                return Ok(());
            }
        }
    }

    /// Write back the dirty pages holding bytes `offset..offset + len` of a file and wait for
    /// them, as `sync_file_range` with `SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER`
    /// does: it issues no Flush, so the data may still sit in the device's volatile cache
    /// (use [`PageCache::sync`] to make it durable). Pages outside the range are left alone.
    /// A page in the range whose write fails stays dirty and is the error returned.
    pub fn sync_range(&mut self, f: FileId, offset: u64, len: u64) -> Result<(), MpageError> {
        self.file(f)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or(MpageError::Overflow {
            offset,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        })?;
        let (first, end) = (offset / PAGE, end.div_ceil(PAGE));
        let busy_in_range = |c: &Self| {
            c.file(f)
                .is_ok_and(|fs| fs.pages.range(first, end).any(|(_, fr)| c.slot(fr).busy()))
        };
        // Wait before: a write in flight may carry data older than the page holds now.
        if busy_in_range(self) {
            self.wait_until(None, |c| !busy_in_range(c))?;
        }
        let dirty: Vec<u64> = self
            .file(f)?
            .pages
            .range(first, end)
            .filter(|&(_, fr)| self.slot(fr).dirty())
            .map(|(p, _)| p)
            .collect();
        self.write_batch(f, &dirty)?;
        if busy_in_range(self) {
            self.wait_until(None, |c| !busy_in_range(c))?;
        }
        // Errors of this range: the file's first write error if it is here, or any page
        // still dirty with an error.
        let fs = self.file_mut(f)?;
        let error = match fs.write_error.take() {
            Some((p, e)) if (first..end).contains(&p) => Some((p, e)),
            other => {
                fs.write_error = other;
                let fs = self.file(f)?;
                fs.pages.range(first, end).find_map(|(p, fr)| {
                    let pg = self.slot(fr);
                    pg.dirty()
                        .then(|| pg.error.as_deref().cloned())
                        .flatten()
                        .map(|e| (p, e))
                })
            }
        };
        match error {
            None => Ok(()),
            Some((page, source)) => Err(MpageError::Write {
                dev: self.dev.name().to_string(),
                file: f,
                page,
                source,
            }),
        }
    }
}
