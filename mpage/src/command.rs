//! Building commands, shared by the read and the write path (`mpage_bio_submit` and the
//! mapping walk of `fs/mpage.c`): mapping answers reused from block to block, the command
//! being built and when it is sent, the one *confused* exit that moves a page block by block
//! in either direction, and the release of pages a failed walk leaves behind.

use rnvme_driver::Segment;

use crate::backend::{BlockIo, IoOp};
use crate::cache::{FileId, Geo, PageCache, Target};
use crate::error::{MpageError, PageError};
use crate::map::{MapError, MapFlags, Mapping};
use crate::page::{full_mask, BlockBits};
use crate::pool::{FrameId, FRAMES_PER_CHUNK};

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

    /// Bytes the command may still take within `max_bytes`.
    pub(crate) fn room(&self, max_bytes: u64) -> u64 {
        max_bytes.saturating_sub(self.bytes)
    }

    pub(crate) fn fits(&self, next_disk: u64, len: u64, max_bytes: u64) -> bool {
        self.next_disk == next_disk && self.bytes + len <= max_bytes
    }

    #[inline(always)]
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
pub(crate) enum Confused {
    /// [`crate::CacheOptions::force_per_block`].
    Forced,
    PerBlockState,
    MapFailed(MapError),
    /// Read: the map supplies the data itself.
    Uptodate,
    /// Read: a hole followed by a mapped block.
    HoleThenData,
    /// Write: a block left unmapped by an allocating map call.
    Unmapped(u64),
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
            Confused::Unmapped(b) => {
                write!(f, "file block {b} left unmapped by an allocating map call")
            }
            Confused::Discontiguous => f.write_str("blocks not contiguous on disk"),
        }
    }
}

/// The issuing of one page block by block, in either direction.
pub(crate) struct PerBlock {
    pub(crate) op: IoOp,
    pub(crate) frame: FrameId,
    /// The page's block bits when the issuing began.
    pub(crate) start: BlockBits,
    /// Blocks found mapped to disk (or supplied by the map).
    pub(crate) mapped: u8,
    /// The first per-block failure that is not a command's (a map error, say).
    pub(crate) failed: Option<PageError>,
    /// A command that could not be submitted: the walk stops there.
    pub(crate) submit_err: Option<MpageError>,
}

impl<D: BlockIo> PageCache<D> {
    /// The mapping of file block `b`: from the walk's last answer when it covers `b`
    /// (for a write, only when it maps `b`: a hole must be allocated), else from the map,
    /// asking for up to `max_blocks` and keeping the answer for the blocks after.
    pub(crate) fn map_block(
        &mut self,
        f: FileId,
        b: u64,
        max_blocks: u64,
        create: bool,
        w: &mut Walk,
    ) -> Result<Hit, MapError> {
        let cached = w.run.and_then(|r| r.lookup(b));
        if let Some(h) = cached.filter(|h| !create || h.disk.is_some()) {
            return Ok(h);
        }
        let r = Run::new(b, self.map_call(f, b, max_blocks, create)?);
        w.run = Some(r);
        Ok(r.lookup(b).expect("a run covers its first block"))
    }

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

    /// The one confused exit of both paths: send what was built, then move page `p` block by
    /// block ([`PageCache::read_blocks`] or [`PageCache::write_blocks`]).
    pub(crate) fn confused(
        &mut self,
        op: IoOp,
        f: FileId,
        p: u64,
        geo: &Geo,
        w: &mut Walk,
        why: Confused,
    ) -> Result<(), MpageError> {
        log::trace!("file {f} page {p}: per-block {op} ({why})");
        self.send(f, op, &mut w.cmd)?;
        match op {
            IoOp::Read => self.read_blocks(f, p, geo, full_mask(geo.bpp)),
            _ => self.write_blocks(f, p, geo),
        }
    }

    /// Begin moving page `p` block by block: its state goes per block, one pending count
    /// covers the issuing itself (so no completion ends the page before it is over).
    pub(crate) fn per_block_begin(&mut self, op: IoOp, f: FileId, p: u64, geo: &Geo) -> PerBlock {
        let page = self.page_mut(f, p);
        let start = page.bits(geo.bpp);
        page.blocks = Some(start);
        if op == IoOp::Write {
            page.writeback = true;
        }
        page.pending = 1;
        page.pending_error = None;
        PerBlock {
            op,
            frame: page.frame,
            start,
            mapped: 0,
            failed: None,
            submit_err: None,
        }
    }

    /// Issue block `i` of page `p` at `disk_block`, a command of its own. False when it could
    /// not be submitted (the error is kept in `pb`; the block's command was ended with it).
    pub(crate) fn per_block_submit(
        &mut self,
        pb: &mut PerBlock,
        f: FileId,
        p: u64,
        geo: &Geo,
        i: usize,
        disk_block: u64,
    ) -> bool {
        pb.mapped |= 1 << i;
        self.page_mut(f, p).pending += 1;
        let bs = geo.bs;
        let seg = Segment::new(self.pool.iova(pb.frame).add(i as u64 * bs), bs as u32);
        let target = Target::Block {
            page: p,
            block: i as u32,
        };
        let lbas = geo.lpb as u32;
        match self.submit_cmd(f, pb.op, disk_block * geo.lpb, lbas, &[seg], target, true) {
            Ok(_) => true,
            Err(e) => {
                pb.submit_err = Some(e);
                false
            }
        }
    }

    /// End the issuing: record what was found, drop the issuing's pending count (the page is
    /// done now if no block command is in flight) and return a submission failure.
    pub(crate) fn per_block_end(
        &mut self,
        pb: PerBlock,
        f: FileId,
        p: u64,
        geo: &Geo,
    ) -> Result<(), MpageError> {
        let page = self.page_mut(f, p);
        if pb.mapped == full_mask(geo.bpp) {
            page.mapped_to_disk = true;
        }
        if let Some(e) = pb.failed {
            page.pending_error.get_or_insert_with(|| Box::new(e));
        }
        self.end_block_io(f, p, pb.op, geo.bpp);
        match pb.submit_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
