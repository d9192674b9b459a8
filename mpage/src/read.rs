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
//! block by block ([`PageCache::read_blocks`]). Confused are: a page with per-block state, a
//! mapping error, a mapping that supplies the data itself (`uptodate`), a hole followed by a
//! mapped block, and blocks that are not contiguous on disk. So a multi-page command never
//! carries a partial page, except the last one at the end of the file or before a hole.

use rnvme_driver::Segment;

use crate::backend::{BlockIo, IoOp};
use crate::cache::{FileId, Geo, PageCache, Target};
use crate::error::{MpageError, PageError};
use crate::map::{MapError, MapFlags, Mapping};
use crate::page::full_mask;
use crate::pool::{FrameId, FRAMES_PER_CHUNK, PAGE_SIZE};

/// A mapping answer kept for the blocks after the one asked for.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Run {
    start: u64,
    mapping: Mapping,
}

/// What a [`Run`] says about one block.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Hit {
    /// Disk block, or None for a hole.
    pub(crate) disk: Option<u64>,
    /// First block after the run.
    pub(crate) run_end: u64,
    pub(crate) flags: MapFlags,
}

impl Run {
    pub(crate) fn new(start: u64, mapping: Mapping) -> Run {
        Run { start, mapping }
    }

    pub(crate) fn lookup(&self, block: u64) -> Option<Hit> {
        let run_end = self.start + self.mapping.blocks();
        if block < self.start || block >= run_end {
            return None;
        }
        Some(match self.mapping {
            Mapping::Mapped {
                disk_block, flags, ..
            } => Hit {
                disk: Some(disk_block + (block - self.start)),
                run_end,
                flags,
            },
            Mapping::Hole { .. } => Hit {
                disk: None,
                run_end,
                flags: MapFlags::default(),
            },
        })
    }
}

/// A command being built: pages whose blocks follow one another on disk.
pub(crate) struct Building {
    slba: u64,
    lbas: u32,
    bytes: u64,
    /// Disk block the next page must start at to join.
    pub(crate) next_disk: u64,
    pages: Vec<u64>,
    frames: Vec<u32>,
    segs: Vec<Segment>,
}

impl Building {
    /// A command starting at `slba`, with room for `pages` pages before its lists grow.
    pub(crate) fn new(slba: u64, pages: usize) -> Building {
        Building {
            slba,
            lbas: 0,
            bytes: 0,
            next_disk: 0,
            pages: Vec::with_capacity(pages),
            frames: Vec::with_capacity(pages),
            segs: Vec::with_capacity(pages),
        }
    }

    pub(crate) fn fits(&self, next_disk: u64, len: u64, max_bytes: u64) -> bool {
        self.next_disk == next_disk && self.bytes + len <= max_bytes
    }

    pub(crate) fn add(&mut self, page: u64, frame: FrameId, seg: Segment, lbas: u32) {
        // Frames that follow one another in one buffer make one segment: fewer pieces for
        // the command's data (and one lookup of their buffer instead of one per page).
        let same_buffer = self.frames.last().is_some_and(|&prev| {
            prev as usize / FRAMES_PER_CHUNK == frame.index() / FRAMES_PER_CHUNK
        });
        match self.segs.last_mut() {
            Some(last) if same_buffer && last.iova.0 + last.len as u64 == seg.iova.0 => {
                last.len += seg.len
            }
            _ => self.segs.push(seg),
        }
        self.pages.push(page);
        self.frames.push(frame.index() as u32);
        self.lbas += lbas;
        self.bytes += seg.len as u64;
    }
}

/// State carried from page to page of one walk.
#[derive(Default)]
pub(crate) struct Walk {
    pub(crate) cmd: Option<Building>,
    pub(crate) run: Option<Run>,
}

/// Why a page left the fast path (for logs).
enum Confused {
    Forced,
    PerBlockState,
    MapFailed(MapError),
    Uptodate,
    HoleThenData,
    Discontiguous,
}

impl std::fmt::Display for Confused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Confused::Forced => f.write_str("per-block path forced"),
            Confused::PerBlockState => f.write_str("the page has per-block state"),
            Confused::MapFailed(e) => write!(f, "{e}"),
            Confused::Uptodate => f.write_str("the map supplies the data"),
            Confused::HoleThenData => f.write_str("hole followed by a mapped block"),
            Confused::Discontiguous => f.write_str("blocks not contiguous on disk"),
        }
    }
}

impl<D: BlockIo> PageCache<D> {
    /// Send the command being built, if any.
    pub(crate) fn send(
        &mut self,
        f: FileId,
        op: IoOp,
        cmd: &mut Option<Building>,
    ) -> Result<(), MpageError> {
        let Some(c) = cmd.take() else { return Ok(()) };
        let n = c.pages.len() as u64;
        match op {
            IoOp::Read => self.stats.pages_read += n,
            _ => self.stats.pages_written += n,
        }
        self.submit_cmd(
            f,
            op,
            c.slba,
            c.lbas,
            &c.segs,
            Target::Pages {
                pages: c.pages,
                frames: c.frames,
            },
            false,
        )?;
        Ok(())
    }

    /// Add page `p` (in `frame`, `len` bytes on the disk blocks `blocks.0..=blocks.1`) to the
    /// command being built: the command is sent first when the page does not follow it on
    /// disk or would take it past the max transfer, and after the page when `end_here`
    /// (a boundary, or a page that ends early).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_to_command(
        &mut self,
        f: FileId,
        op: IoOp,
        cmd: &mut Option<Building>,
        p: u64,
        frame: FrameId,
        blocks: (u64, u64),
        len: u64,
        geo: &Geo,
        end_here: bool,
    ) -> Result<(), MpageError> {
        if let Some(c) = cmd {
            if !c.fits(blocks.0, len, self.max_cmd_bytes) {
                self.send(f, op, cmd)?;
            }
        }
        let seg = Segment::new(self.pool.iova(frame), len as u32);
        let lbas = (len / self.lba_size as u64) as u32;
        let c = cmd.get_or_insert_with(|| Building::new(blocks.0 * geo.lpb, self.cmd_pages()));
        c.add(p, frame, seg, lbas);
        c.next_disk = blocks.1 + 1;
        if end_here {
            self.send(f, op, cmd)?;
        }
        Ok(())
    }

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
        for (i, &(p, fr)) in pages.iter().enumerate() {
            if let Err(e) = self.read_one(f, p, fr, &geo, batch_end, &mut walk) {
                // The command being built, this page and the pages after it never went out
                // (a page that did has been ended with the error already).
                self.release_unsent(&mut walk, &pages[i..]);
                return Err(e);
            }
        }
        self.send(f, IoOp::Read, &mut walk.cmd)
    }

    /// After a failed walk: unlock (or take out of write-back) the pages of the command
    /// being built and `rest`, pages locked for this walk that no command in flight carries
    /// (pages with per-block commands in flight keep their state until those complete).
    pub(crate) fn release_unsent(&mut self, walk: &mut Walk, rest: &[(u64, u32)]) {
        let built = walk.cmd.take().map(|c| c.frames).unwrap_or_default();
        for fr in built.into_iter().chain(rest.iter().map(|&(_, fr)| fr)) {
            let pg = self.slot_mut(fr);
            if pg.pending == 0 {
                pg.locked = false;
                pg.writeback = false;
            }
        }
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
            return self.read_confused(f, p, geo, w, Confused::Forced);
        }
        let (per_block_state, frame) = {
            let pg = self.slot_mut(fr);
            debug_assert!(pg.file == f && pg.index == p, "frame {fr} holds page {p}");
            (pg.blocks.is_some(), pg.frame)
        };
        if per_block_state {
            return self.read_confused(f, p, geo, w, Confused::PerBlockState);
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
            let hit = match w.run.and_then(|r| r.lookup(b)) {
                Some(h) => h,
                None => match self.map_call(f, b, last - b, false) {
                    Ok(m) => {
                        let r = Run::new(b, m);
                        w.run = Some(r);
                        r.lookup(b).expect("a run covers its first block")
                    }
                    Err(e) => return self.read_confused(f, p, geo, w, Confused::MapFailed(e)),
                },
            };
            let Some(d) = hit.disk else {
                first_hole = first_hole.min(i);
                continue;
            };
            if hit.flags.uptodate {
                return self.read_confused(f, p, geo, w, Confused::Uptodate);
            }
            if first_hole != bpp {
                return self.read_confused(f, p, geo, w, Confused::HoleThenData);
            }
            if i > 0 && disk[i - 1] + 1 != d {
                return self.read_confused(f, p, geo, w, Confused::Discontiguous);
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

    fn read_confused(
        &mut self,
        f: FileId,
        p: u64,
        geo: &Geo,
        w: &mut Walk,
        why: Confused,
    ) -> Result<(), MpageError> {
        log::trace!("file {f} page {p}: per-block read ({why})");
        self.send(f, IoOp::Read, &mut w.cmd)?;
        self.read_blocks(f, p, geo, full_mask(geo.bpp))
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
        let page = self.page_mut(f, p);
        let frame = page.frame;
        let mut bits = page.bits(geo.bpp);
        let want = want & !bits.uptodate;
        page.blocks = Some(bits);
        page.pending = 1;
        page.pending_error = None;
        let mut zeroed = 0u8;
        let mut mapped = bits.uptodate;
        let mut issued = false;
        let mut failed: Option<PageError> = None;
        let mut submit_err: Option<MpageError> = None;
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
                        failed.get_or_insert(PageError::Map(e));
                    }
                    Ok(Mapping::Hole { .. }) => {
                        self.pool.zero(frame, i * bs, bs);
                        zeroed |= bit;
                        done = true;
                    }
                    Ok(Mapping::Mapped { flags, .. }) if flags.uptodate => {
                        let mut buf = vec![0u8; bs];
                        let fs = self.files[f.0 as usize].as_mut().expect("open file");
                        match fs.map().read_inline(b, &mut buf) {
                            Ok(()) => {
                                self.pool.write(frame, i * bs, &buf);
                                mapped |= bit;
                                done = true;
                            }
                            Err(e) => {
                                failed.get_or_insert(PageError::Map(e));
                            }
                        }
                    }
                    Ok(Mapping::Mapped { disk_block, .. }) => {
                        mapped |= bit;
                        issued = true;
                        self.page_mut(f, p).pending += 1;
                        let seg =
                            Segment::new(self.pool.iova(frame).add((i * bs) as u64), bs as u32);
                        let target = Target::Block {
                            page: p,
                            block: i as u32,
                        };
                        if let Err(e) = self.submit_cmd(
                            f,
                            IoOp::Read,
                            disk_block * geo.lpb,
                            geo.lpb as u32,
                            &[seg],
                            target,
                            true,
                        ) {
                            // The block's own command was ended with the error; end the page's
                            // issuing below, so that nothing stays pending.
                            submit_err = Some(e);
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
        let page = self.page_mut(f, p);
        if mapped == full_mask(geo.bpp) {
            page.mapped_to_disk = true;
        }
        // Zeroed blocks reaching the end of the page: report where the zeroing starts.
        let tail = (0..bpp)
            .rev()
            .take_while(|&i| zeroed & (1 << i) != 0)
            .last();
        if let Some(i) = tail {
            page.zeroed_from = Some((i * bs) as u32);
        }
        if let Some(e) = failed {
            page.pending_error.get_or_insert_with(|| Box::new(e));
        }
        self.end_block_io(f, p, IoOp::Read, geo.bpp);
        match submit_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
