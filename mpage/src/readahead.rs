//! Getting pages uptodate: locking them for reads, the reader's misses, and readahead that
//! keeps windows in flight ahead of a sequential reader (`mpage_readahead`'s caller, the
//! kernel's `page_cache_ra_*`).

use crate::backend::BlockIo;
use crate::cache::{check_page, FileId, PageCache, PAGE};
use crate::command::Walk;
use crate::error::MpageError;
#[derive(Copy, Clone, Debug, Default)]
pub(crate) struct Readahead {
    pub(crate) start: u64,
    /// Current window size in pages; 0 when the reader is not sequential.
    pub(crate) size: u64,
    /// Last page a read_at returned.
    pub(crate) prev: Option<u64>,
    /// Most pages read ahead of the reader now: the cache's depth in windows of the
    /// largest size (within half the cache), halved when read-ahead pages are
    /// evicted unread and grown back by the first window's size each window; 0 until the
    /// first window.
    pub(crate) limit: u64,
    /// Pages were evicted unread since the last window: the next one is half the size.
    pub(crate) thrashed: bool,
    /// Three quarters of the limit the last time pages were evicted unread: below it the
    /// limit grows by a small window each window, above it by one page (as TCP grows its
    /// window past the point where it last lost packets), so a file that thrashed once does
    /// not keep thrashing; 0 before any thrashing.
    pub(crate) ceiling: u64,
}

impl<D: BlockIo> PageCache<D> {
    // ---- reading ----------------------------------------------------------------------

    /// Lock the cached, idle, not-uptodate page `p` for a read.
    pub(crate) fn lock_for_read(&mut self, f: FileId, p: u64) {
        let page = self.page_mut(f, p);
        debug_assert!(!page.busy() && !page.uptodate);
        page.locked = true;
        page.error = None;
    }

    /// Lock pages `start..end` that need reading, taking frames for those not cached. Stops
    /// early when no frame can be had; returns the pages and where it stopped. For a
    /// readahead (`ahead`), the pages outside `asked` are flagged as read ahead and not asked
    /// for yet (see [`Page::ra_unused`](crate::page::Page)).
    pub(crate) fn prepare_batch(
        &mut self,
        f: FileId,
        start: u64,
        end: u64,
        ahead: bool,
        asked: Option<std::ops::RangeInclusive<u64>>,
    ) -> Result<(Vec<(u64, u32)>, u64), MpageError> {
        self.file(f)?;
        let mut out = Vec::with_capacity(end.saturating_sub(start).min(1024) as usize);
        match self.lock_batch(f, start, end, ahead, asked, &mut out) {
            Ok(next) => Ok((out, next)),
            Err(e) => {
                // (Taking a frame may wait, and time out.) The pages locked for this batch
                // will not be read: they must not stay locked.
                self.release_unsent(&mut Walk::default(), &out);
                Err(e)
            }
        }
    }

    /// The work of [`PageCache::prepare_batch`]: the pages locked go to `out`; returns where
    /// it stopped.
    #[inline(always)]
    fn lock_batch(
        &mut self,
        f: FileId,
        start: u64,
        end: u64,
        ahead: bool,
        asked: Option<std::ops::RangeInclusive<u64>>,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<u64, MpageError> {
        let fi = f.slot();
        let flag = |p: u64| ahead && !asked.as_ref().is_some_and(|a| a.contains(&p));
        let mut p = start;
        while p < end {
            // A stretch of pages not cached (one search of the index for all of it): each
            // gets a frame and its new state. Taking frames evicts only cached pages, so the
            // stretch stays uncached meanwhile.
            let absent = match &self.files[fi] {
                Some(fs) => fs.pages.absent_run(p, end - p),
                None => 0,
            };
            for q in p..p + absent {
                match self.alloc_frame()? {
                    Some(frame) => {
                        self.insert_new(f, q, frame, true, flag(q));
                        out.push((q, frame.index() as u32));
                    }
                    None => return Ok(q),
                }
            }
            if absent > 0 {
                // The stretch ends at a cached page or at its chunk's end: look again.
                p += absent;
                continue;
            }
            if let Some(fr) = self.files[fi].as_ref().and_then(|fs| fs.pages.get(p)) {
                let pg = self.slot_mut(fr);
                if !pg.uptodate && !pg.busy() {
                    pg.locked = true;
                    pg.error = None;
                    pg.ra_unused |= flag(p);
                    out.push((p, fr));
                }
                p += 1;
            } else {
                // Neither absent nor recorded: only a file that is not open.
                return Err(MpageError::NoSuchFile(f));
            }
        }
        Ok(end)
    }

    /// Start reading pages `start..start + pages` (in the background): explicit readahead.
    /// Pages already cached are skipped; holes, and the part of the last page beyond the end
    /// of the file, are zeroed; pages past the last are left alone (as the kernel's
    /// readahead stops at the end of the file). Returns once the commands are submitted.
    pub fn readahead(&mut self, f: FileId, start: u64, pages: u64) -> Result<(), MpageError> {
        // Not past the page holding the file's last byte: nothing beyond it is the file's.
        let last = self.file(f)?.size.div_ceil(PAGE);
        let end = start.saturating_add(pages).min(last);
        let mut p = start;
        while p < end {
            let (batch, next) = self.prepare_batch(f, p, end, false, None)?;
            if batch.is_empty() && next == p {
                if self.inflight.is_empty() {
                    return Err(self.cache_full());
                }
                self.wait_idle()?;
                continue;
            }
            self.read_framed(f, &batch)?;
            p = next;
        }
        self.kick();
        Ok(())
    }

    /// Read one page (like Linux's `read_folio`) and wait for it.
    pub fn read_page(&mut self, f: FileId, p: u64) -> Result<(), MpageError> {
        self.file(f)?;
        check_page(p)?;
        self.wait_page(f, p)?;
        match self.page_ref(f, p) {
            Some(pg) if pg.uptodate => return Ok(()),
            Some(_) => self.lock_for_read(f, p),
            None => {
                let frame = self.alloc_frame()?.ok_or_else(|| self.cache_full())?;
                self.insert_page(f, p, frame);
                self.page_mut(f, p).locked = true;
            }
        }
        self.read_batch(f, &[p])?;
        self.wait_page(f, p)?;
        self.page_result(f, p)
    }

    pub(crate) fn page_result(&self, f: FileId, p: u64) -> Result<(), MpageError> {
        match self
            .page_ref(f, p)
            .and_then(|pg| pg.error.as_deref().cloned())
        {
            Some(source) => Err(MpageError::Read {
                dev: self.dev.name().to_string(),
                file: f,
                page: p,
                source,
            }),
            None => Ok(()),
        }
    }

    /// Make page `p` uptodate for a reader that wants pages up to `last`, reading ahead.
    pub(crate) fn ensure_uptodate(
        &mut self,
        f: FileId,
        p: u64,
        last: u64,
    ) -> Result<(), MpageError> {
        let mut reads = 0;
        loop {
            if reads > 2 {
                let what = format!("page {p} of file {f} to become uptodate");
                return Err(MpageError::Stuck {
                    dev: self.dev.name().to_string(),
                    what,
                });
            }
            let state = self
                .page_ref(f, p)
                .map(|pg| (pg.uptodate, pg.busy(), pg.error.is_some(), pg.ra_mark));
            match state {
                Some((true, _, _, mark)) => {
                    if mark {
                        self.readahead_from_mark(f, p)?;
                    }
                    return Ok(());
                }
                // A marked page still being read: the next window starts before the wait for
                // it, as the kernel's `filemap_get_pages` starts async readahead before it waits
                // for the folio, so the device works on the window meanwhile (a reader that
                // caught up with its readahead, and every stream's first window).
                Some((false, true, _, true)) => self.readahead_from_mark(f, p)?,
                Some((false, true, _, _)) => self.wait_page(f, p)?,
                Some((false, false, true, _)) if reads > 0 => return self.page_result(f, p),
                Some((false, false, _, _)) => {
                    self.lock_for_read(f, p);
                    self.read_batch(f, &[p])?;
                    reads += 1;
                }
                None => {
                    self.readahead_miss(f, p, last)?;
                    reads += 1;
                }
            }
        }
    }

    /// The reader reached page `p`'s readahead mark: clear it and start the next windows, the
    /// page held meanwhile (their frames must not come from evicting this very page).
    fn readahead_from_mark(&mut self, f: FileId, p: u64) -> Result<(), MpageError> {
        let pg = self.page_mut(f, p);
        pg.ra_mark = false;
        pg.held = true;
        let r = self.readahead_async(f, p);
        if let Some(fr) = self.files[f.slot()].as_ref().and_then(|fs| fs.pages.get(p)) {
            self.slot_mut(fr).held = false;
        }
        r
    }

    /// Most pages one reader's readahead takes: half the cache. The other half keeps what
    /// the reader holds (a run it copies out holds at most a quarter, see `walk_runs`)
    /// and frames to evict. A quarter was too little for a cache split between threads: a
    /// shard of 16 MiB kept 8 windows of 512 KiB in flight where a reader alone kept 16,
    /// and two readers together no more than one (two `mpage bench --threads 2` builds
    /// alternating in two boots, four runs each per boot: the two threads' aggregate 1 932
    /// against 1 545 MiB/s, medians of eight runs).
    pub(crate) fn readahead_cap(&self) -> u64 {
        (self.capacity as u64 / 2).max(1)
    }

    /// Most pages read ahead of one reader: `depth` windows of the largest size, within
    /// half the cache.
    pub(crate) fn readahead_limit(&self) -> u64 {
        (self.ra_depth.saturating_mul(self.ra_window_max))
            .min(self.readahead_cap())
            .max(1)
    }

    /// A reader missed page `p`: read it, and a window beyond it if the reader is sequential.
    pub(crate) fn readahead_miss(
        &mut self,
        f: FileId,
        p: u64,
        last: u64,
    ) -> Result<(), MpageError> {
        let cap = self.readahead_cap();
        let initial = self.opts.readahead_initial.max(1);
        let limit = self.readahead_limit();
        let fs = self.file_mut(f)?;
        let eof_page = fs.size.div_ceil(PAGE).max(p + 1);
        let want = last - p + 1;
        let ra = fs.ra;
        let sequential = match ra.prev {
            None => p == 0,
            Some(q) => q + 1 == p || q == p || (ra.size > 0 && p == ra.start + ra.size),
        };
        let len = if sequential {
            let size = if ra.size == 0 { initial } else { ra.size };
            let size = if ra.limit == 0 {
                size
            } else {
                size.min(ra.limit)
            };
            size.max(want).min(cap.max(want))
        } else {
            want
        }
        .min(eof_page - p);
        if sequential {
            fs.ra.start = p;
            fs.ra.size = len;
            fs.ra.thrashed = false;
            if fs.ra.limit == 0 {
                fs.ra.limit = limit;
            }
            self.stats.readahead_windows += 1;
        } else {
            fs.ra.size = 0;
        }
        let (batch, _) = self.prepare_batch(f, p, p + len, true, Some(p..=last))?;
        if self.page_ref(f, p).is_none() {
            return Err(self.cache_full());
        }
        if sequential {
            // The next window starts when the reader reaches the middle of this one; when
            // the reader asked for the whole window at once, as soon as it has the first page
            // (the kernel's async size: all of the window).
            let mark = if len > want { p + len - len / 2 } else { p };
            self.set_ra_mark(f, mark);
        }
        self.read_framed(f, &batch)?;
        self.kick();
        Ok(())
    }

    pub(crate) fn set_ra_mark(&mut self, f: FileId, p: u64) {
        if let Some(fr) = self.files[f.slot()].as_ref().and_then(|fs| fs.pages.get(p)) {
            self.slot_mut(fr).ra_mark = true;
        }
    }

    /// The reader reached a marked page `at`: keep windows in flight ahead of it, each
    /// twice the last up to the largest window, as many as the depth allows (the kernel
    /// keeps one; a queue of many commands is busy only with several). What is read ahead
    /// stays within the file's limit, which shrinks when its pages are evicted unread
    /// (thrashing) and grows back by a small window each time none were.
    pub(crate) fn readahead_async(&mut self, f: FileId, at: u64) -> Result<(), MpageError> {
        let (depth, window_max) = (self.ra_depth.max(1), self.ra_window_max.max(1));
        let (initial, max_limit) = (self.opts.readahead_initial.max(1), self.readahead_limit());
        let fs = self.file_mut(f)?;
        if !fs.ra.thrashed {
            let ra = &mut fs.ra;
            let step = if ra.ceiling == 0 || ra.limit < ra.ceiling {
                initial
            } else {
                1
            };
            ra.limit = (ra.limit + step).min(max_limit);
        }
        fs.ra.thrashed = false;
        let mut issued = false;
        loop {
            let fs = self.file(f)?;
            let ra = fs.ra;
            let eof_page = fs.size.div_ceil(PAGE);
            let start = ra.start + ra.size;
            if ra.size == 0 || start >= eof_page {
                break;
            }
            let ahead = start.saturating_sub(at);
            // Within the limit, one window at least (the reader asked for it by reaching the
            // mark), more while fewer than `depth` windows of the last one's size are ahead.
            if ahead >= ra.limit || (issued && ahead >= depth * ra.size) {
                break;
            }
            let len = (ra.size * 2)
                .min(window_max)
                .min(ra.limit)
                .min(eof_page - start)
                .max(1);
            let fs = self.file_mut(f)?;
            fs.ra.start = start;
            fs.ra.size = len;
            self.stats.readahead_windows += 1;
            let (batch, next) = self.prepare_batch(f, start, start + len, true, None)?;
            self.set_ra_mark(f, start + len - len.div_ceil(2));
            self.read_framed(f, &batch)?;
            issued = true;
            if next < start + len {
                // No frames for the rest: the window ends here.
                self.file_mut(f)?.ra.size = next - start;
                break;
            }
        }
        // Windows ahead of the reader: held until several can go at once, unless the device
        // is running short.
        self.kick_lazily();
        Ok(())
    }
}
