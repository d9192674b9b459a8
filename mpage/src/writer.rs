//! Writing files in the cache: read-modify-write of partly overwritten pages and blocks,
//! and marking what was written dirty (it reaches the disk on write-back).

use crate::backend::BlockIo;
use crate::cache::{check_page, FileId, PageCache, PAGE};
use crate::error::MpageError;
use crate::page::{full_mask, BlockBits};
use crate::pool::{FrameId, PAGE_SIZE};
impl<D: BlockIo> PageCache<D> {
    // ---- writing ----------------------------------------------------------------------

    /// Have page `p` cached and idle, taking a frame if needed.
    pub(crate) fn page_for_write(&mut self, f: FileId, p: u64) -> Result<(), MpageError> {
        self.wait_page(f, p)?;
        let cached = self.page_ref(f, p).map(|pg| (pg.frame, pg.dirty()));
        if !matches!(cached, Some((_, true))) {
            // About to dirty one more page: the writer's share of write-back first. It
            // neither evicts nor takes a clean page, so `p` stays as it was found.
            self.balance_dirty()?;
        }
        match cached.map(|(frame, _)| frame) {
            Some(frame) => self.check_not_viewed(f, p, frame)?,
            None => {
                let frame = self.alloc_frame()?.ok_or_else(|| self.cache_full())?;
                self.insert_page(f, p, frame);
            }
        }
        Ok(())
    }

    /// Refuse to change a page a [`PageRef`] holds: its holder reads the bytes in place.
    pub(crate) fn check_not_viewed(
        &self,
        f: FileId,
        p: u64,
        frame: FrameId,
    ) -> Result<(), MpageError> {
        if self.pool.is_viewed(frame) {
            return Err(MpageError::PageHeld { file: f, page: p });
        }
        Ok(())
    }

    /// Make bytes `from..from + len` of page `p` ready to be overwritten: read what of the
    /// blocks they only partly cover is not in the frame yet (read-modify-write).
    /// `old_size` is the file size before the write began.
    pub(crate) fn prepare_write(
        &mut self,
        f: FileId,
        p: u64,
        from: usize,
        len: usize,
        old_size: u64,
    ) -> Result<(), MpageError> {
        self.page_for_write(f, p)?;
        let geo = self.geo(f)?;
        let page = self.page_mut(f, p);
        if page.uptodate || (from == 0 && len == PAGE_SIZE) {
            return Ok(());
        }
        let bs = geo.bs as usize;
        if p * PAGE >= old_size {
            // Nothing of the file here yet: what is not in the frame is zeros.
            let bits = page.bits(geo.bpp);
            let frame = page.frame;
            for i in 0..geo.bpp as usize {
                if bits.uptodate & (1 << i) == 0 {
                    self.pool.zero(frame, i * bs, bs);
                }
            }
            let page = self.page_mut(f, p);
            page.blocks = Some(BlockBits {
                uptodate: full_mask(geo.bpp),
                dirty: bits.dirty,
            });
            let change = page.normalize(geo.bpp);
            self.dirty_changed(frame.index() as u32, change);
            return Ok(());
        }
        let (first_blk, last_blk) = (from / bs, (from + len - 1) / bs);
        let mut partial = 0u8;
        if !from.is_multiple_of(bs) {
            partial |= 1 << first_blk;
        }
        if !(from + len).is_multiple_of(bs) {
            partial |= 1 << last_blk;
        }
        let need = partial & !page.bits(geo.bpp).uptodate;
        if need == 0 {
            return Ok(());
        }
        self.lock_for_read(f, p);
        if geo.bpp == 1 {
            self.read_batch(f, &[p])?;
        } else {
            self.read_blocks(f, p, &geo, need)?;
        }
        self.kick();
        self.wait_page(f, p)?;
        self.page_result(f, p)
    }

    /// Record that bytes `from..from + len` of page `p` were overwritten.
    pub(crate) fn mark_written(&mut self, f: FileId, p: u64, from: usize, len: usize, bpp: u64) {
        let bs = PAGE_SIZE / bpp as usize;
        let page = self.page_mut(f, p);
        let fr = page.frame.index() as u32;
        let change = if page.uptodate || (from == 0 && len == PAGE_SIZE) {
            page.uptodate = true;
            page.blocks = None;
            page.set_dirty(true)
        } else {
            let mut touched = 0u8;
            for i in from / bs..=(from + len - 1) / bs {
                touched |= 1 << i;
            }
            let mut bits = page.bits(bpp);
            bits.uptodate |= touched;
            bits.dirty |= touched;
            page.blocks = Some(bits);
            page.normalize(bpp)
        };
        page.zeroed_from = None;
        self.dirty_changed(fr, change);
    }

    /// Write `data` at `offset`, growing the file if it ends beyond it. Pages only partly
    /// overwritten are read first (only the blocks partly overwritten, when blocks are
    /// smaller than pages). The data reaches the disk on write-back (`sync`).
    pub fn write_at(&mut self, f: FileId, offset: u64, data: &[u8]) -> Result<usize, MpageError> {
        let old_size = self.file(f)?.size;
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= crate::MAX_FILE_SIZE)
            .ok_or(MpageError::Overflow {
                offset,
                len: data.len(),
            })?;
        if end > old_size {
            self.grow(f, end)?;
        }
        let bpp = self.geo(f)?.bpp;
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let (p, from) = (pos / PAGE, (pos % PAGE) as usize);
            let len = (PAGE_SIZE - from).min(data.len() - done);
            self.prepare_write(f, p, from, len, old_size)?;
            let frame = self.page_ref(f, p).expect("prepared page").frame;
            self.pool.write(frame, from, &data[done..done + len]);
            self.mark_written(f, p, from, len, bpp);
            self.touch(f, p);
            done += len;
        }
        Ok(data.len())
    }

    /// Overwrite a whole cached page and mark it dirty without changing the file size, as a
    /// store through a shared mapping does. No read is needed.
    pub fn write_page(&mut self, f: FileId, p: u64, data: &[u8]) -> Result<(), MpageError> {
        assert_eq!(data.len(), PAGE_SIZE, "write_page takes one whole page");
        let bpp = self.geo(f)?.bpp;
        check_page(p)?;
        self.page_for_write(f, p)?;
        let frame = self.page_ref(f, p).expect("page").frame;
        self.pool.write(frame, 0, data);
        self.mark_written(f, p, 0, PAGE_SIZE, bpp);
        self.touch(f, p);
        Ok(())
    }

    /// Overwrite one whole file block in the cache and mark just it dirty, without changing
    /// the file size and without reading the rest of its page.
    pub fn write_block(&mut self, f: FileId, block: u64, data: &[u8]) -> Result<(), MpageError> {
        let geo = self.geo(f)?;
        assert_eq!(
            data.len() as u64,
            geo.bs,
            "write_block takes one whole block"
        );
        let (p, i) = (check_page(block / geo.bpp)?, (block % geo.bpp) as usize);
        self.page_for_write(f, p)?;
        let frame = self.page_ref(f, p).expect("page").frame;
        let from = i * geo.bs as usize;
        self.pool.write(frame, from, data);
        self.mark_written(f, p, from, geo.bs as usize, geo.bpp);
        self.touch(f, p);
        Ok(())
    }
}
