//! The write path (`mpage_writepages`): dirty pages in index order, coalesced into as few
//! Writes as their disk layout allows.
//!
//! Blocks are mapped with `create`, but only those inside the file: a page wholly beyond the
//! end is not written and nothing is allocated for it; the page straddling the end has its
//! tail zeroed before it is written. Pages join a command when their blocks follow its last
//! block on disk (they need not be neighbours in the file); `boundary` ends the command.
//! Confused pages (per-block state, a mapping error, blocks not contiguous, or a block the
//! map leaves unmapped although asked to allocate it: never a command with a made-up LBA)
//! are sent block by block, just their dirty blocks, one command each.
//!
//! A page stays dirty until its write has completed; a failed write leaves it dirty.

use crate::backend::{BlockIo, IoOp};
use crate::cache::{FileId, Geo, PageCache};
use crate::command::{Confused, Walk};
use crate::error::{MpageError, PageError};
use crate::map::Mapping;
use crate::page::BlockBits;
use crate::pool::{FrameId, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

impl<D: BlockIo> PageCache<D> {
    /// Start writing the dirty, idle pages `pages` (ascending) of a file.
    pub(crate) fn write_batch(&mut self, f: FileId, pages: &[u64]) -> Result<(), MpageError> {
        if pages.is_empty() {
            return Ok(());
        }
        let geo = self.geo(f)?;
        let mut walk = Walk::default();
        for &p in pages {
            if let Err(e) = self.write_one(f, p, &geo, &mut walk) {
                // The command being built and this page never went out: they stay dirty.
                let this: Vec<(u64, u32)> = self
                    .file(f)?
                    .pages
                    .get(p)
                    .map(|fr| (p, fr))
                    .into_iter()
                    .collect();
                self.release_unsent(&mut walk, &this);
                return Err(e);
            }
        }
        self.send(f, IoOp::Write, &mut walk.cmd)?;
        self.kick();
        Ok(())
    }

    fn write_one(&mut self, f: FileId, p: u64, geo: &Geo, w: &mut Walk) -> Result<(), MpageError> {
        let size = geo.size;
        let (end_page, tail) = (size / PAGE, (size % PAGE) as usize);
        if p > end_page || (p == end_page && tail == 0) {
            // Wholly beyond the end: not part of the file, nothing to write or allocate.
            let page = self.page_mut(f, p);
            let frame = page.frame;
            let change = page.set_dirty(false);
            page.blocks = None;
            page.uptodate = true;
            page.zeroed_from = Some(0);
            self.dirty_changed(frame.index() as u32, change);
            self.zero_unless_viewed(frame, 0);
            return Ok(());
        }
        if self.opts.force_per_block {
            return self.confused(IoOp::Write, f, p, geo, w, Confused::Forced);
        }
        if self.page_mut(f, p).blocks.is_some() {
            return self.confused(IoOp::Write, f, p, geo, w, Confused::PerBlockState);
        }
        let first = p * geo.bpp;
        let last_in_file = (size - 1) / geo.bs;
        let n = (last_in_file - first + 1).min(geo.bpp) as usize;
        let mut disk = [0u64; 8];
        let mut boundary = false;
        for i in 0..n {
            let b = first + i as u64;
            let hit = match self.map_block(f, b, (n - i) as u64, true, w) {
                Ok(h) => h,
                Err(e) => return self.confused(IoOp::Write, f, p, geo, w, Confused::MapFailed(e)),
            };
            let Some(d) = hit.disk else {
                return self.confused(IoOp::Write, f, p, geo, w, Confused::Unmapped(b));
            };
            if i > 0 && disk[i - 1] + 1 != d {
                return self.confused(IoOp::Write, f, p, geo, w, Confused::Discontiguous);
            }
            disk[i] = d;
            if hit.flags.boundary && b + 1 == hit.run_end {
                boundary = true;
            }
        }
        let frame = self.page_mut(f, p).frame;
        if p == end_page {
            self.zero_tail(f, p, tail);
        }
        let page = self.page_mut(f, p);
        if n == geo.bpp as usize {
            page.mapped_to_disk = true;
        }
        page.writeback = true;

        let len = n as u64 * geo.bs;
        let end_here = boundary || n < geo.bpp as usize;
        self.add_to_command(
            f,
            IoOp::Write,
            &mut w.cmd,
            p,
            frame,
            (disk[0], disk[n - 1]),
            len,
            geo,
            end_here,
        )?;
        Ok(())
    }

    /// Zero the page from byte `from` (the end of the file) before it is written.
    fn zero_tail(&mut self, f: FileId, p: u64, from: usize) {
        let page = self.page_mut(f, p);
        let frame = page.frame;
        page.zeroed_from = Some(from as u32);
        self.zero_unless_viewed(frame, from);
    }

    /// Zero a frame from `from` to its end, the part beyond the end of the file, unless a
    /// [`crate::PageRef`] holds it: its holder sees the page only up to the end of the file,
    /// and `set_len` zeroes (or refuses to grow over) that part before it becomes file data.
    fn zero_unless_viewed(&mut self, frame: FrameId, from: usize) {
        if !self.pool.is_viewed(frame) {
            self.pool.zero(frame, from, PAGE_SIZE - from);
        }
    }

    /// The per-block write path for page `p`: write its dirty blocks, each mapped (with
    /// `create`) on its own and written by a command of its own; blocks past the end of the
    /// file are not written. A block the map leaves unmapped is an error of the page, never a
    /// command with a made-up LBA.
    pub(crate) fn write_blocks(&mut self, f: FileId, p: u64, geo: &Geo) -> Result<(), MpageError> {
        let size = geo.size;
        if p == size / PAGE {
            self.zero_tail(f, p, (size % PAGE) as usize);
        }
        let last_in_file = (size - 1) / geo.bs;
        let mut pb = self.per_block_begin(IoOp::Write, f, p, geo);
        for i in 0..geo.bpp as usize {
            let bit = 1u8 << i;
            if pb.start.dirty & bit == 0 {
                continue;
            }
            let b = p * geo.bpp + i as u64;
            if b > last_in_file {
                // Beyond the end: nothing to write.
                let page = self.page_mut(f, p);
                let bits = page.bits(geo.bpp);
                page.blocks = Some(BlockBits {
                    dirty: bits.dirty & !bit,
                    ..bits
                });
                continue;
            }
            match self.map_call(f, b, 1, true) {
                Err(e) => {
                    pb.failed.get_or_insert(PageError::Map(e));
                }
                Ok(Mapping::Hole { .. }) => {
                    pb.failed
                        .get_or_insert(PageError::Unmapped { file_block: b });
                }
                Ok(Mapping::Mapped { disk_block, .. }) => {
                    self.stats.pages_written += u64::from(pb.mapped == 0);
                    if !self.per_block_submit(&mut pb, f, p, geo, i, disk_block) {
                        break;
                    }
                }
            }
        }
        self.per_block_end(pb, f, p, geo)
    }
}
