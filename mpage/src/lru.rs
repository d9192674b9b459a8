//! Pages, frames and the LRU list: putting pages in frames, taking them out, and finding
//! frames for new pages (from the pool in batches, or by evicting the least recently used
//! clean pages, writing dirty ones back when there are none).

use crate::backend::BlockIo;
use crate::cache::{FileId, PageCache, EVICT_BATCH, STASH_BATCH};
use crate::error::MpageError;
use crate::page::NIL;
use crate::pool::FrameId;
impl<D: BlockIo> PageCache<D> {
    // ---- pages, frames, LRU -----------------------------------------------------------

    // The helpers called once per page on the read path (this, `lru_push`, `touch_frame`,
    // `detach_page`, `consume`, `page_ref`, `Building::add`) are always inlined: under an
    // emulated CPU (QEMU's TCG) a call's return is an indirect jump and its prologue a few
    // stores, and with them out of line a page cost 10 % more there (seqread in-place,
    // 487-527 against 438-467 ns per page in one boot).
    #[inline(always)]
    pub(crate) fn lru_unlink(&mut self, fr: u32) {
        let (prev, next) = (self.lru_prev[fr as usize], self.lru_next[fr as usize]);
        match prev {
            NIL => self.lru_head = next,
            q => self.lru_next[q as usize] = next,
        }
        match next {
            NIL => self.lru_tail = prev,
            n => self.lru_prev[n as usize] = prev,
        }
    }

    #[inline(always)]
    pub(crate) fn lru_push(&mut self, fr: u32) {
        let tail = self.lru_tail;
        self.lru_prev[fr as usize] = tail;
        self.lru_next[fr as usize] = NIL;
        match tail {
            NIL => self.lru_head = fr,
            t => self.lru_next[t as usize] = fr,
        }
        self.lru_tail = fr;
    }

    /// Make the page in frame `fr` the most recently used.
    #[inline(always)]
    pub(crate) fn touch_frame(&mut self, fr: u32) {
        if self.lru_tail != fr {
            self.lru_unlink(fr);
            self.lru_push(fr);
        }
    }

    pub(crate) fn touch(&mut self, f: FileId, p: u64) {
        if let Some(fr) = self.files[f.slot()].as_ref().and_then(|fs| fs.pages.get(p)) {
            self.touch_frame(fr);
        }
    }

    /// Put a new page into the cache (most recently used).
    pub(crate) fn insert_page(&mut self, f: FileId, p: u64, frame: FrameId) {
        self.insert_new(f, p, frame, false, false);
    }

    /// Put page `p` of file `f` into the free frame `frame` as the most recently used, with
    /// its flags for a read and for readahead (see [`Page::fill`]).
    #[inline(always)]
    pub(crate) fn insert_new(
        &mut self,
        f: FileId,
        p: u64,
        frame: FrameId,
        locked: bool,
        ra_unused: bool,
    ) {
        let fr = frame.index() as u32;
        let fs = self.files[f.slot()].as_mut().expect("open file");
        let old = fs.pages.insert(p, fr);
        debug_assert!(old.is_none(), "page {p} inserted twice");
        self.slots[fr as usize].fill(f, p, locked, ra_unused);
        self.cached += 1;
        self.lru_push(fr);
    }

    /// Drop a page from the cache and give its frame back to the pool (once no
    /// [`PageRef`] holds it).
    pub(crate) fn remove_page(&mut self, f: FileId, p: u64) {
        if let Some(frame) = self.detach_page(f, p) {
            if self.pool.is_viewed(frame) {
                self.viewed_out.push(frame);
            } else {
                self.pool.free(frame);
            }
        }
    }

    /// Give back the frames of dropped pages that nobody views any more.
    pub(crate) fn reap_viewed_out(&mut self) {
        let pool = &self.pool;
        self.viewed_out.retain(|&fr| {
            let viewed = pool.is_viewed(fr);
            if !viewed {
                pool.free(fr);
            }
            viewed
        });
    }

    /// Drop a page from the cache; returns its frame, now unused.
    #[inline(always)]
    pub(crate) fn detach_page(&mut self, f: FileId, p: u64) -> Option<FrameId> {
        let fr = self.files[f.slot()].as_mut()?.pages.remove(p)?;
        debug_assert!(!self.slot(fr).busy(), "page {p} removed with I/O in flight");
        self.lru_unlink(fr);
        let change = self.slot_mut(fr).set_dirty(false);
        self.dirty_changed(fr, change);
        let page = self.slot_mut(fr);
        page.vacate();
        let frame = page.frame;
        self.cached -= 1;
        Some(frame)
    }

    /// Give the frames kept from evictions back to the pool.
    pub(crate) fn release_spare(&mut self) {
        for frame in self.spare.drain(..) {
            self.pool.free(frame);
        }
        for frame in self.stash.drain(..).rev() {
            self.pool.free(frame);
        }
        self.reap_viewed_out();
    }

    /// Evict up to `want` clean, idle, unheld pages from the head of the LRU list into
    /// `spare`; returns how many. Pages are detached as the walk passes them (the walk has
    /// taken the next frame first).
    pub(crate) fn evict(&mut self, want: usize) -> usize {
        let mut evicted = 0;
        let mut thrashed = Vec::new();
        let mut fr = self.lru_head;
        while fr != NIL && evicted < want {
            let next = self.lru_next[fr as usize];
            let pg = self.slot(fr);
            if pg.evictable() && !self.held_run.contains(&fr) && !self.pool.is_viewed(pg.frame) {
                let (f, p) = (pg.file, pg.index);
                if pg.ra_unused {
                    thrashed.push(f);
                }
                if let Some(frame) = self.detach_page(f, p) {
                    self.spare.push_back(frame);
                }
                evicted += 1;
            }
            fr = next;
        }
        // Read ahead and thrown away unread: that file's readahead runs too far ahead of its
        // reader for this cache. Halve what it may keep in flight.
        self.stats.readahead_thrashed += thrashed.len() as u64;
        thrashed.dedup();
        for f in thrashed {
            if let Some(fs) = self.files[f.slot()].as_mut() {
                fs.ra.ceiling = (fs.ra.limit * 3 / 4).max(1);
                fs.ra.limit = (fs.ra.limit / 2).max(1);
                fs.ra.thrashed = true;
            }
        }
        self.stats.evictions += evicted as u64;
        evicted
    }

    /// A free frame, evicting clean pages and writing back dirty ones if the pool is empty.
    /// None when every page is busy or dirty and stays so.
    #[inline(always)]
    pub(crate) fn alloc_frame(&mut self) -> Result<Option<FrameId>, MpageError> {
        // The common cases inline (a frame kept from an eviction, or one taken from the pool
        // in the last batch), the rest out of line.
        if self.viewed_out.is_empty() && self.cached < self.capacity {
            if let Some(fr) = self.spare.pop_front() {
                return Ok(Some(fr));
            }
            if let Some(fr) = self.stash.pop() {
                return Ok(Some(fr));
            }
        }
        self.alloc_frame_slow()
    }

    #[inline(never)]
    fn alloc_frame_slow(&mut self) -> Result<Option<FrameId>, MpageError> {
        if !self.viewed_out.is_empty() {
            self.reap_viewed_out();
        }
        if self.cached < self.capacity {
            if let Some(fr) = self.spare.pop_front() {
                return Ok(Some(fr));
            }
            if self.stash.is_empty() {
                let want = (self.capacity - self.cached).min(STASH_BATCH);
                if self.pool.alloc_many(want, &mut self.stash) > 0 {
                    self.stash.reverse();
                }
            }
            if let Some(fr) = self.stash.pop() {
                return Ok(Some(fr));
            }
        }
        let batch = (self.capacity / 16).clamp(1, EVICT_BATCH);
        if self.evict(batch) > 0 {
            return Ok(self.spare.pop_front());
        }
        // Short of clean pages: write dirty ones back, then evict them.
        let mut written = 0;
        for i in 0..self.files.len() {
            if self.files[i].is_some() {
                written += self.start_writeback(self.file_id(i))?;
            }
        }
        self.stats.writebacks += written as u64;
        if written > 0 || !self.inflight.is_empty() {
            self.stats.writeback_stalls += 1;
            log::debug!(
                "{}: cache full, wrote back {written} dirty page(s)",
                self.dev.name()
            );
            self.wait_idle()?;
        }
        if self.evict(batch) > 0 {
            return Ok(self.spare.pop_front());
        }
        Ok(None)
    }

    pub(crate) fn cache_full(&self) -> MpageError {
        let dirty = self.dirty_total();
        MpageError::CacheFull {
            dev: self.dev.name().to_string(),
            capacity: self.capacity,
            dirty,
        }
    }
}
