//! One cached page: its state (the role of Linux's `struct page` flags and buffer heads), a
//! snapshot of it for callers, and a page held in place.

use crate::error::PageError;
use crate::id::FileId;
use crate::pool::{FrameId, FrameView};
/// A page of a file read in place ([`crate::PageCache::page`]): derefs to its bytes up to the end
/// of the file, without a copy. While it lives the page is not evicted, no command may make
/// the device write its frame, and the cache refuses to change it ([`crate::MpageError::PageHeld`]);
/// a page dropped from the file meanwhile (truncation, close) keeps its frame until the
/// `PageRef` goes. It may be sent to and read on other threads.
#[derive(Debug)]
pub struct PageRef {
    pub(crate) view: FrameView,
    pub(crate) page: u64,
}

impl PageRef {
    /// The page's index in its file.
    pub fn index(&self) -> u64 {
        self.page
    }
}

impl std::ops::Deref for PageRef {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.view
    }
}

impl AsRef<[u8]> for PageRef {
    fn as_ref(&self) -> &[u8] {
        &self.view
    }
}

/// Validity and dirtiness of each block of a page (bit i = block i).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockBits {
    /// Blocks whose data is in the frame.
    pub uptodate: u8,
    /// Blocks the disk does not have yet.
    pub dirty: u8,
}

/// A snapshot of one cached page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageState {
    /// The frame holds the file's data.
    pub uptodate: bool,
    /// The frame holds data the disk does not have.
    pub dirty: bool,
    /// A read is in flight.
    pub locked: bool,
    /// A write is in flight.
    pub writeback: bool,
    /// All blocks were found mapped to disk.
    pub mapped_to_disk: bool,
    /// Why the last read or write of the page failed.
    pub error: Option<PageError>,
    /// The page was zeroed from this byte to its end (a hole or the end of the file).
    pub zeroed_from: Option<u32>,
    /// Per-block state, when the blocks differ.
    pub blocks: Option<BlockBits>,
    /// The frame holding it.
    pub frame: FrameId,
}

pub(crate) struct Page {
    /// The frame holds this page (a frame without one keeps a vacant `Page`, so that a page
    /// comes and goes by writing fields where they lie rather than moving a whole one in and
    /// out of an `Option`).
    pub(crate) present: bool,
    pub(crate) frame: FrameId,
    pub(crate) uptodate: bool,
    /// Private: every change goes through [`Page::set_dirty`] or [`Page::normalize`], whose
    /// [`DirtyChange`] the cache must account for (its dirty counts drive write-back).
    dirty: bool,
    /// When the page last went from clean to dirty (set by the cache's accounting).
    pub(crate) dirtied: Option<rnvme_driver::clock::Ticks>,
    pub(crate) locked: bool,
    pub(crate) writeback: bool,
    pub(crate) mapped_to_disk: bool,
    /// Boxed: errors are rare, and a small page is cheap to move.
    pub(crate) error: Option<Box<PageError>>,
    pub(crate) zeroed_from: Option<u32>,
    pub(crate) blocks: Option<BlockBits>,
    /// Per-block commands in flight, plus one while they are being issued.
    pub(crate) pending: u16,
    pub(crate) pending_error: Option<Box<PageError>>,
    /// Reaching this page starts the next readahead window.
    pub(crate) ra_mark: bool,
    /// Read ahead and not read by anyone yet.
    pub(crate) ra_unused: bool,
    /// A call is about to hand this page's data out: not to be evicted meanwhile.
    pub(crate) held: bool,
    /// The file and page index this page caches.
    pub(crate) file: FileId,
    pub(crate) index: u64,
}

/// A change of a page's dirtiness. The cache counts dirty pages (per file and in all) to
/// decide when to write back and when to throttle writers, so no change may go unaccounted:
/// hand it to `PageCache::dirty_changed`.
#[must_use = "the cache counts dirty pages: hand this to PageCache::dirty_changed"]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum DirtyChange {
    Same,
    Dirtied,
    Cleaned,
}

impl DirtyChange {
    fn of(before: bool, after: bool) -> DirtyChange {
        match (before, after) {
            (false, true) => DirtyChange::Dirtied,
            (true, false) => DirtyChange::Cleaned,
            _ => DirtyChange::Same,
        }
    }
}

/// No frame: the end of the LRU list.
pub(crate) const NIL: u32 = u32::MAX;

impl Page {
    /// The state of frame `frame` while it holds no page.
    pub(crate) fn vacant(frame: FrameId) -> Page {
        let mut p = Page::new(frame, FileId::new(u32::MAX, 0), u64::MAX);
        p.present = false;
        p
    }

    /// Page `index` of file `file`, new in frame `frame` (not uptodate, idle), with its
    /// flags for a read (`locked`) and for readahead (`ra_unused`), written in place.
    #[inline(always)]
    pub(crate) fn fill(&mut self, file: FileId, index: u64, locked: bool, ra_unused: bool) {
        debug_assert!(
            !self.present,
            "frame {} holds a page already",
            self.frame.index()
        );
        self.present = true;
        self.uptodate = false;
        self.dirty = false;
        self.dirtied = None;
        self.locked = locked;
        self.writeback = false;
        self.mapped_to_disk = false;
        self.error = None;
        self.zeroed_from = None;
        self.blocks = None;
        self.pending = 0;
        self.pending_error = None;
        self.ra_mark = false;
        self.ra_unused = ra_unused;
        self.held = false;
        self.file = file;
        self.index = index;
    }

    /// The frame gives up its page: only what owns memory is dropped.
    #[inline(always)]
    pub(crate) fn vacate(&mut self) {
        self.present = false;
        self.error = None;
        self.pending_error = None;
    }

    pub(crate) fn new(frame: FrameId, file: FileId, index: u64) -> Page {
        Page {
            present: true,
            frame,
            uptodate: false,
            dirty: false,
            dirtied: None,
            locked: false,
            writeback: false,
            mapped_to_disk: false,
            error: None,
            zeroed_from: None,
            blocks: None,
            pending: 0,
            pending_error: None,
            ra_mark: false,
            ra_unused: false,
            held: false,
            file,
            index,
        }
    }

    /// The frame holds data the disk does not have (or not all of it).
    #[inline]
    pub(crate) fn dirty(&self) -> bool {
        self.dirty
    }

    pub(crate) fn set_dirty(&mut self, dirty: bool) -> DirtyChange {
        let before = std::mem::replace(&mut self.dirty, dirty);
        DirtyChange::of(before, dirty)
    }

    pub(crate) fn busy(&self) -> bool {
        self.locked || self.writeback || self.pending > 0
    }

    pub(crate) fn evictable(&self) -> bool {
        !self.busy() && !self.dirty && !self.held
    }

    /// The per-block bits, derived from the page state when it has none.
    pub(crate) fn bits(&self, bpp: u64) -> BlockBits {
        self.blocks.unwrap_or(BlockBits {
            uptodate: if self.uptodate { full_mask(bpp) } else { 0 },
            dirty: if self.dirty { full_mask(bpp) } else { 0 },
        })
    }

    /// Bring page flags in line with the block bits; drop the bits once they say nothing
    /// the page flags do not.
    pub(crate) fn normalize(&mut self, bpp: u64) -> DirtyChange {
        let Some(b) = self.blocks else {
            return DirtyChange::Same;
        };
        let full = full_mask(bpp);
        if b.uptodate == full {
            self.uptodate = true;
        }
        let change = self.set_dirty(b.dirty != 0);
        if self.uptodate && (b.dirty == 0 || b.dirty == full) {
            self.blocks = None;
        }
        change
    }
}

/// Bits for all blocks of a page.
pub(crate) fn full_mask(bpp: u64) -> u8 {
    if bpp >= 8 {
        0xFF
    } else {
        (1u8 << bpp) - 1
    }
}
