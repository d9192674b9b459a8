//! The read path: turn a batch of pages into as few commands as their disk layout allows.
//!
//! Pages are walked in index order. Each page's blocks are mapped, reusing the previous
//! answer while it still covers the next block. A page joins the command being built when all
//! its blocks are mapped and contiguous and its first block follows the command's last; else
//! the command is sent and a new one started. A hole at the end of a page (the end of the file
//! with blocks smaller than pages, or a hole inside it) is zeroed and the command sent after
//! that page; a page that is all hole is zeroed with no I/O at all. A `boundary` sends the
//! command before the block after the boundary is mapped (or, when the boundary lies inside
//! a page, as soon as that page is added).
//!
//! Every other case is *confused* and goes one way: send what was built, then read the page
//! block by block ([`PageCache::read_blocks`], through the exit both paths share in
//! `command`). Confused are: a page with per-block state, a
//! mapping error, a mapping that supplies the data itself (`uptodate`), a hole followed by a
//! mapped block, and blocks that are not contiguous on disk. So a multi-page command never
//! carries a partial page, except the last one at the end of the file or before a hole.

use crate::backend::{BlockIo, IoOp};
use crate::cache::{FileId, Geo, PageCache};
use crate::command::{Confused, Walk};
use crate::error::{MpageError, PageError};
use crate::map::Mapping;
use crate::pool::PAGE_SIZE;

impl<D: BlockIo> PageCache<D> {
    /// Read the locked, not-uptodate pages `pages` (ascending) of a file: the
    /// `mpage_readahead` walk. Returns once the commands are submitted.
    pub(crate) fn read_batch(&mut self, f: FileId, pages: &[u64]) -> Result<(), MpageError> {
        let framed: Vec<(u64, u32)> = pages
            .iter()
            .map(|&p| {
                let fr = self.file(f)?.pages.get(p).expect("a locked page is cached");
                Ok((p, fr))
            })
            .collect::<Result<_, MpageError>>()?;
        self.read_framed(f, &framed)
    }

    /// [`PageCache::read_batch`] for pages whose frames the caller has at hand (as
    /// `prepare_batch` does): no lookup per page.
    pub(crate) fn read_framed(
        &mut self,
        f: FileId,
        pages: &[(u64, u32)],
    ) -> Result<(), MpageError> {
        let Some(&(last, _)) = pages.last() else {
            return Ok(());
        };
        let geo = self.geo(f)?;
        // Ask the map for runs reaching the end of the batch, not beyond.
        let batch_end = (last + 1) * geo.bpp;
        let mut walk = Walk::default();
        // Pages of one block each, when they may take the fast path (see `join_fast`).
        let fast = geo.bpp == 1 && !self.opts.force_per_block;
        let eof = geo.eof_block();
        let mut i = 0;
        while i < pages.len() {
            let (p, fr) = pages[i];
            if fast && p < eof {
                let n = self.join_fast_run(&pages[i..], &geo, eof, &mut walk);
                if n > 0 {
                    i += n;
                    continue;
                }
            }
            if let Err(e) = self.read_one(f, p, fr, &geo, batch_end, &mut walk) {
                // The command being built, this page and the pages after it never went out
                // (a page that did has been ended with the error already).
                self.release_unsent(&mut walk, &pages[i..]);
                return Err(e);
            }
            i += 1;
        }
        self.send(f, IoOp::Read, &mut walk.cmd)
    }

    /// The walk's common case in one loop: pages of one block each (`bpp == 1`), consecutive,
    /// inside the file, in frames with no per-block state, whose blocks the walk's last
    /// mapping answer covers (short of its last block when that is a boundary), the first
    /// mapped to the disk block right after the command being built, as many as the command
    /// has room for, join that command. Exactly what [`Self::read_one`] and
    /// `add_to_command` would do with each of them, without a lookup of the mapping per
    /// page; anything else takes the full walk. Returns how many of `pages` (from the
    /// first) joined: 0 when the first did not, and nothing changed.
    fn join_fast_run(&mut self, pages: &[(u64, u32)], geo: &Geo, eof: u64, w: &mut Walk) -> usize {
        debug_assert_eq!(geo.bpp, 1);
        let (Some(c), Some(run), Some(&(p0, _))) = (w.cmd.as_mut(), w.run.as_ref(), pages.first())
        else {
            return 0;
        };
        let Some(hit) = run.lookup(p0) else {
            return 0;
        };
        let Some(d0) = hit.disk else { return 0 };
        if hit.flags.uptodate || c.next_disk != d0 {
            return 0;
        }
        let end = if hit.flags.boundary {
            hit.run_end - 1
        } else {
            hit.run_end
        }
        .min(eof);
        let most = (pages.len() as u64)
            .min(end.saturating_sub(p0))
            .min(c.room(self.max_cmd_bytes) / PAGE_SIZE as u64) as usize;
        let lbas = geo.lpb as u32;
        let mut n = 0;
        for (k, &(p, fr)) in pages[..most].iter().enumerate() {
            if p != p0 + k as u64 {
                break;
            }
            let pg = &mut self.slots[fr as usize];
            if !pg.present || pg.blocks.is_some() {
                break;
            }
            debug_assert!(
                pg.index == p && pg.locked,
                "frame {fr} holds locked page {p}"
            );
            pg.mapped_to_disk = true;
            let frame = pg.frame;
            let seg = rnvme_driver::Segment::new(self.pool.iova(frame), PAGE_SIZE as u32);
            c.add(p, frame, seg, lbas);
            n += 1;
        }
        c.next_disk = d0 + n as u64;
        n
    }

    #[allow(clippy::too_many_arguments)]
    fn read_one(
        &mut self,
        f: FileId,
        p: u64,
        fr: u32,
        geo: &Geo,
        batch_end: u64,
        w: &mut Walk,
    ) -> Result<(), MpageError> {
        if self.opts.force_per_block {
            return self.confused(IoOp::Read, f, p, geo, w, Confused::Forced);
        }
        let (per_block_state, frame) = {
            let pg = self.slot_mut(fr);
            debug_assert!(pg.file == f && pg.index == p, "frame {fr} holds page {p}");
            (pg.blocks.is_some(), pg.frame)
        };
        if per_block_state {
            return self.confused(IoOp::Read, f, p, geo, w, Confused::PerBlockState);
        }
        let bpp = geo.bpp as usize;
        let first = p * geo.bpp;
        let eof = geo.eof_block();
        let last = batch_end.min(eof);
        let mut disk = [0u64; 8];
        let mut first_hole = bpp;
        let mut boundary = false;
        for i in 0..bpp {
            let b = first + i as u64;
            if b >= eof {
                first_hole = first_hole.min(i);
                continue;
            }
            let hit = match self.map_block(f, b, last - b, false, w) {
                Ok(h) => h,
                Err(e) => return self.confused(IoOp::Read, f, p, geo, w, Confused::MapFailed(e)),
            };
            let Some(d) = hit.disk else {
                first_hole = first_hole.min(i);
                continue;
            };
            if hit.flags.uptodate {
                return self.confused(IoOp::Read, f, p, geo, w, Confused::Uptodate);
            }
            if first_hole != bpp {
                return self.confused(IoOp::Read, f, p, geo, w, Confused::HoleThenData);
            }
            if i > 0 && disk[i - 1] + 1 != d {
                return self.confused(IoOp::Read, f, p, geo, w, Confused::Discontiguous);
            }
            disk[i] = d;
            if hit.flags.boundary && b + 1 == hit.run_end {
                boundary = true;
            }
        }

        if first_hole < bpp {
            let from = first_hole * geo.bs as usize;
            self.pool.zero(frame, from, PAGE_SIZE - from);
            let page = self.page_mut(f, p);
            page.zeroed_from = Some(from as u32);
            if first_hole == 0 {
                // All hole: uptodate without I/O, and the command goes on past it.
                page.uptodate = true;
                page.locked = false;
                self.stats.pages_zeroed += 1;
                return Ok(());
            }
        } else {
            self.slot_mut(frame.index() as u32).mapped_to_disk = true;
        }

        let len = first_hole as u64 * geo.bs;
        let blocks = (disk[0], disk[first_hole - 1]);
        let end_here = boundary || first_hole < bpp;
        self.add_to_command(
            f,
            IoOp::Read,
            &mut w.cmd,
            p,
            frame,
            blocks,
            len,
            geo,
            end_here,
        )?;
        Ok(())
    }

    /// The per-block read path for the locked page `p`: read the blocks in `want` that are
    /// not uptodate, each mapped on its own and read by a command of its own; holes and
    /// blocks past the end of the file are zeroed. The page becomes uptodate when all its
    /// blocks are, and takes the error of any block that failed.
    pub(crate) fn read_blocks(
        &mut self,
        f: FileId,
        p: u64,
        geo: &Geo,
        want: u8,
    ) -> Result<(), MpageError> {
        let bs = geo.bs as usize;
        let bpp = geo.bpp as usize;
        let eof = geo.eof_block();
        let mut pb = self.per_block_begin(IoOp::Read, f, p, geo);
        let (frame, mut bits) = (pb.frame, pb.start);
        let want = want & !bits.uptodate;
        let mut zeroed = 0u8;
        pb.mapped = bits.uptodate;
        let mut issued = false;
        for i in 0..bpp {
            let bit = 1u8 << i;
            if want & bit == 0 {
                continue;
            }
            let b = p * geo.bpp + i as u64;
            let mut done = false;
            if b >= eof {
                self.pool.zero(frame, i * bs, bs);
                zeroed |= bit;
                done = true;
            } else {
                match self.map_call(f, b, 1, false) {
                    Err(e) => {
                        pb.failed.get_or_insert(PageError::Map(e));
                    }
                    Ok(Mapping::Hole { .. }) => {
                        self.pool.zero(frame, i * bs, bs);
                        zeroed |= bit;
                        done = true;
                    }
                    Ok(Mapping::Mapped { flags, .. }) if flags.uptodate => {
                        let mut buf = vec![0u8; bs];
                        let fs = self.files[f.slot()].as_mut().expect("open file");
                        match fs.map().read_inline(b, &mut buf) {
                            Ok(()) => {
                                self.pool.write(frame, i * bs, &buf);
                                pb.mapped |= bit;
                                done = true;
                            }
                            Err(e) => {
                                pb.failed.get_or_insert(PageError::Map(e));
                            }
                        }
                    }
                    Ok(Mapping::Mapped { disk_block, .. }) => {
                        issued = true;
                        if !self.per_block_submit(&mut pb, f, p, geo, i, disk_block) {
                            break;
                        }
                    }
                }
            }
            if done {
                let page = self.page_mut(f, p);
                bits = page.bits(geo.bpp);
                bits.uptodate |= bit;
                page.blocks = Some(bits);
            }
        }
        if issued {
            self.stats.pages_read += 1;
        }
        // Zeroed blocks reaching the end of the page: report where the zeroing starts.
        let tail = (0..bpp)
            .rev()
            .take_while(|&i| zeroed & (1 << i) != 0)
            .last();
        if let Some(i) = tail {
            self.page_mut(f, p).zeroed_from = Some((i * bs) as u32);
        }
        self.per_block_end(pb, f, p, geo)
    }
}
