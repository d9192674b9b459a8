//! Reading files: into the caller's buffer, or in place (runs of frames, held pages).

use rnvme_driver::clock::Ticks;

use crate::backend::BlockIo;
use crate::cache::{FileId, PageCache, PAGE};
use crate::error::MpageError;
use crate::index::CHUNK_PAGES;
use crate::page::{PageRef, NIL};
use crate::pool::{FrameId, FRAMES_PER_CHUNK, PAGE_SIZE};

impl<D: BlockIo> PageCache<D> {
    /// Read up to `buf.len()` bytes at `offset`; returns how many (0 at or past the end).
    /// Sequential readers get readahead windows that double up to
    /// [`crate::CacheOptions::readahead_max`].
    pub fn read_at(&mut self, f: FileId, offset: u64, buf: &mut [u8]) -> Result<usize, MpageError> {
        let mut copy_ticks = 0u64;
        // One copy per run of pages in consecutive frames, not one per page.
        let walked = self.walk_runs(f, offset, buf.len(), |c, frame, in_page, at, bytes| {
            let from = (at - offset) as usize;
            let t = Ticks::now();
            // One lock of the run's buffer (not of the whole pool: the shards of a shared
            // cache copy from different buffers side by side).
            c.pool
                .read_run(frame, in_page, &mut buf[from..from + bytes]);
            copy_ticks += Ticks::now().since(t);
            Ok(())
        });
        self.timed.copy += copy_ticks;
        walked
    }

    /// Make bytes `offset..offset + len` of a file (up to its end) uptodate and hand them to
    /// `each` in runs of pages that lie in consecutive frames of one buffer, in file order:
    /// (first frame, offset in it, file offset, bytes). A run is handed over before anything
    /// that could evict its pages (waiting for a page), so its frames are the file's while
    /// `each` runs. Returns the bytes walked (0 at or past the end).
    pub(crate) fn walk_runs(
        &mut self,
        f: FileId,
        offset: u64,
        len: usize,
        mut each: impl FnMut(&Self, FrameId, usize, u64, usize) -> Result<(), MpageError>,
    ) -> Result<usize, MpageError> {
        let size = self.file(f)?.size;
        if offset >= size || len == 0 {
            return Ok(0);
        }
        let n = (len as u64).min(size - offset) as usize;
        let (first, last) = (offset / PAGE, (offset + n as u64 - 1) / PAGE);
        let mut run: Option<(FrameId, usize, u64, usize)> = None;
        let mut done = 0usize;
        // The index's frames for pages `ahead_from..ahead_from + ahead_len`, copied a chunk at
        // a time (one search of the index per chunk, not per page), and copied again after
        // anything that may have changed the index (waiting, reading ahead).
        let mut ahead = [NIL; CHUNK_PAGES as usize];
        let (mut ahead_from, mut ahead_len) = (first, 0usize);
        for p in first..=last {
            if p >= ahead_from + ahead_len as u64 {
                ahead_from = p;
                ahead_len = self.file(f)?.pages.frames_from(p, last, &mut ahead);
            }
            let cached = ahead[(p - ahead_from) as usize];
            // Fast path: an uptodate page that starts no readahead.
            let fast = cached != NIL && {
                let pg = &self.slots[cached as usize];
                pg.present && pg.uptodate && !pg.ra_mark
            };
            let fr = match fast {
                true => FrameId::from_index(cached as usize),
                false => {
                    ahead_len = 0;
                    // Waiting and reading ahead may evict pages: the run's stay held meanwhile
                    // (not handed over, so that a run is cut by its frames and not by every
                    // readahead mark: one copy per run of the caller's size, as a raw read of
                    // that size does).
                    // A run of more than a quarter of the cache is handed over instead: a small
                    // cache must keep frames to evict.
                    if let Some((fr, o, at, b)) = run {
                        if (o + b).div_ceil(PAGE_SIZE) * 4 > self.capacity {
                            each(self, fr, o, at, b)?;
                            run = None;
                        }
                    }
                    if let Some((fr, o, _, b)) = run {
                        self.hold_frames(fr, o + b);
                    }
                    let r = self.ensure_uptodate(f, p, last);
                    self.held_run = 0..0;
                    if let Err(e) = r {
                        if let Some((fr, o, at, b)) = run.take() {
                            each(self, fr, o, at, b)?;
                        }
                        return Err(e);
                    }
                    self.page_ref(f, p).expect("uptodate page is cached").frame
                }
            };
            let in_page = ((offset + done as u64) % PAGE) as usize;
            let take = (PAGE_SIZE - in_page).min(n - done);
            run = match run {
                // The next frame of the same buffer, and the run so far ends at a page end.
                Some((f0, o0, at, bytes))
                    if in_page == 0
                        && (o0 + bytes).is_multiple_of(PAGE_SIZE)
                        && fr.index() == f0.index() + (o0 + bytes) / PAGE_SIZE
                        && fr.index() / FRAMES_PER_CHUNK == f0.index() / FRAMES_PER_CHUNK =>
                {
                    Some((f0, o0, at, bytes + take))
                }
                other => {
                    if let Some((fr, o, at, b)) = other {
                        each(self, fr, o, at, b)?;
                    }
                    Some((fr, in_page, offset + done as u64, take))
                }
            };
            // Use-once, as the kernel's LRU does: the first read of a read-ahead page leaves
            // it where readahead put it, so a stream's consumed pages go before the pages
            // read ahead of it; a page read again becomes the most recently used.
            self.consume(fr);
            done += take;
        }
        if let Some((fr, o, at, b)) = run {
            each(self, fr, o, at, b)?;
        }
        self.file_mut(f)?.ra.prev = Some(last);
        Ok(n)
    }

    /// A page of a file in place, without a copy: see [`PageRef`]. Sequential callers get
    /// readahead as with [`PageCache::read_at`]. None at or past the end of the file.
    pub fn page(&mut self, f: FileId, p: u64) -> Result<Option<PageRef>, MpageError> {
        let size = self.file(f)?.size;
        let Some(start) = p.checked_mul(PAGE).filter(|&o| o < size) else {
            return Ok(None);
        };
        self.ensure_uptodate(f, p, p)?;
        let len = (size - start).min(PAGE) as usize;
        let frame = self.page_ref(f, p).expect("uptodate page is cached").frame;
        self.consume(frame);
        self.file_mut(f)?.ra.prev = Some(p);
        let view = self.pool.view(frame, 0, len)?;
        Ok(Some(PageRef { view, page: p }))
    }

    /// Hand `visit` the bytes of the file from `offset`, up to `len` of them, in place: each
    /// call gets a run of pages that lie one after the other in memory (up to 2 MiB), with
    /// its file offset. Like [`PageCache::read_at`] without the copy into a caller's buffer;
    /// the runs are views that end before the call returns. Returns how many bytes were
    /// visited (0 at or past the end).
    pub fn read_with(
        &mut self,
        f: FileId,
        offset: u64,
        len: usize,
        mut visit: impl FnMut(u64, &[u8]),
    ) -> Result<usize, MpageError> {
        self.walk_runs(f, offset, len, |c, frame, in_page, at, bytes| {
            let view = c.pool.view(frame, in_page, bytes)?;
            visit(at, &view);
            Ok(())
        })
    }

    /// Hold the pages in the frames from `first` covering `bytes` bytes, a run of
    /// [`Self::walk_runs`] not handed over yet, until `held_run` is emptied: eviction passes
    /// them by. One range, not a flag per page: a run is consecutive frames, and it is held
    /// around every wait of the walk.
    fn hold_frames(&mut self, first: FrameId, bytes: usize) {
        let first = first.index() as u32;
        self.held_run = first..first + bytes.div_ceil(PAGE_SIZE) as u32;
    }

    /// A reader took the page in frame `fr`: use-once LRU (see [`PageCache::read_at`]).
    #[inline(always)]
    pub(crate) fn consume(&mut self, fr: FrameId) {
        let i = fr.index() as u32;
        let pg = self.slot_mut(i);
        if pg.ra_unused {
            pg.ra_unused = false;
        } else {
            self.touch_frame(i);
        }
    }
}
