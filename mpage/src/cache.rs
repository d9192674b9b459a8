//! The page cache: (file, page index) → frame, with per-page and per-block state, a bounded
//! size with LRU eviction, and the file API on top.
//!
//! One cache drives one [`BlockIo`] from one thread. Commands are asynchronous: readahead
//! returns once its commands are submitted, and whoever needs a page waits for it by polling
//! the device, which completes whatever is done (other pages included).
//!
//! Page state: `locked` while a read is in flight, `writeback` while a write is, `uptodate`
//! once the frame holds the file's data, `dirty` while it holds data the disk does not have,
//! `mapped_to_disk` when all its blocks were found mapped, `error` when the last read or write
//! failed. A page whose blocks differ (block size < page size, some blocks valid or dirty and
//! others not) carries per-block bits, the role of Linux's buffer heads.
//!
//! **Write errors differ from Linux.** Linux clears a page's dirty bit when its write is
//! submitted and only records an error on the mapping when it fails: the data is lost from
//! the cache and a later `fsync` reports the error once. Here a page stays dirty until its
//! write has *completed* successfully; a failed write leaves it dirty (and in error), the
//! next `sync` retries it and returns the first error seen since the previous `sync`. Nothing
//! is dropped silently; a page whose write keeps failing stays in the cache.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use rnvme_driver::dma::DmaSlice;
use rnvme_driver::Segment;

use crate::backend::{BlockIo, IoError, IoOp, IoRequest};
use crate::error::{MpageError, PageError};
use crate::map::{BlockMap, MapError, Mapping};
use crate::pool::{FrameId, FrameView, PagePool, FRAMES_PER_CHUNK, PAGE_SIZE};
use crate::recording::MAX_LBAS_PER_COMMAND;
use crate::spec::check_block_size;

const PAGE: u64 = PAGE_SIZE as u64;
/// Most frames taken from the pool at once.
const STASH_BATCH: usize = 64;
/// Most clean pages evicted at once when a frame is needed.
const EVICT_BATCH: usize = 32;

/// A file open in a [`PageCache`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(pub(crate) u32);

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Tuning of a [`PageCache`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// Send every page down the per-block path (one command per block), as if every page
    /// were confused: for measuring what coalescing gains.
    pub force_per_block: bool,
    /// First automatic readahead window, in pages.
    pub readahead_initial: u64,
    /// Largest automatic readahead window, in pages (windows double up to it); 0 for the
    /// device's largest command (its max transfer).
    pub readahead_max: u64,
    /// Most readahead windows kept in flight ahead of a sequential reader; 0 to cover half
    /// the device's queue with commands (at most 16). Readahead never takes more than a
    /// quarter of the cache, and backs off when its pages are evicted before they are read.
    pub readahead_depth: u64,
    /// How long to wait without any completion before giving up on the device.
    pub io_timeout: Duration,
    /// Most pages cached at once; None for every frame of the pool.
    pub capacity: Option<usize>,
}

impl Default for CacheOptions {
    fn default() -> CacheOptions {
        CacheOptions {
            force_per_block: false,
            readahead_initial: 4,
            readahead_max: 0,
            readahead_depth: 0,
            io_timeout: Duration::from_secs(30),
            capacity: None,
        }
    }
}

/// Counters (for benchmarks and tests).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Pages for which read commands were issued.
    pub pages_read: u64,
    /// Pages that were wholly holes: zeroed without I/O.
    pub pages_zeroed: u64,
    /// Pages for which write commands were issued.
    pub pages_written: u64,
    /// Commands issued (all kinds).
    pub commands: u64,
    /// Read commands issued.
    pub read_commands: u64,
    /// Write commands issued.
    pub write_commands: u64,
    /// Flush commands issued.
    pub flush_commands: u64,
    /// Per-block (fallback) commands among them.
    pub fallback_commands: u64,
    /// Calls of the block maps.
    pub map_calls: u64,
    /// Automatic readahead windows started.
    pub readahead_windows: u64,
    /// Read-ahead pages evicted before anyone read them (each one shrinks the file's
    /// readahead: the cache is thrashing).
    pub readahead_thrashed: u64,
    /// Clean pages evicted to make room.
    pub evictions: u64,
    /// Dirty pages written back because the cache ran short.
    pub writebacks: u64,
    /// Multi-page reads that failed and were retried page by page.
    pub read_retries: u64,
    /// Pages left in error by a read.
    pub read_errors: u64,
    /// Pages left dirty by a failed write.
    pub write_errors: u64,
}

impl CacheStats {
    /// Add `o`'s counts to these.
    pub fn add(&mut self, o: &CacheStats) {
        let CacheStats {
            pages_read,
            pages_zeroed,
            pages_written,
            commands,
            read_commands,
            write_commands,
            flush_commands,
            fallback_commands,
            map_calls,
            readahead_windows,
            readahead_thrashed,
            evictions,
            writebacks,
            read_retries,
            read_errors,
            write_errors,
        } = *o;
        self.pages_read += pages_read;
        self.pages_zeroed += pages_zeroed;
        self.pages_written += pages_written;
        self.commands += commands;
        self.read_commands += read_commands;
        self.write_commands += write_commands;
        self.flush_commands += flush_commands;
        self.fallback_commands += fallback_commands;
        self.map_calls += map_calls;
        self.readahead_windows += readahead_windows;
        self.readahead_thrashed += readahead_thrashed;
        self.evictions += evictions;
        self.writebacks += writebacks;
        self.read_retries += read_retries;
        self.read_errors += read_errors;
        self.write_errors += write_errors;
    }
}

/// A page of a file read in place ([`PageCache::page`]): derefs to its bytes up to the end
/// of the file, without a copy. While it lives the page is not evicted, no command may make
/// the device write its frame, and the cache refuses to change it ([`MpageError::PageHeld`]);
/// a page dropped from the file meanwhile (truncation, close) keeps its frame until the
/// `PageRef` goes. It may be sent to and read on other threads.
#[derive(Debug)]
pub struct PageRef {
    view: FrameView,
    page: u64,
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
    pub(crate) frame: FrameId,
    pub(crate) uptodate: bool,
    pub(crate) dirty: bool,
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
    file: FileId,
    index: u64,
}

/// No frame: the end of the LRU list.
const NIL: u32 = u32::MAX;

impl Page {
    fn new(frame: FrameId, file: FileId, index: u64) -> Page {
        Page {
            frame,
            uptodate: false,
            dirty: false,
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

    pub(crate) fn busy(&self) -> bool {
        self.locked || self.writeback || self.pending > 0
    }

    fn evictable(&self) -> bool {
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
    pub(crate) fn normalize(&mut self, bpp: u64) {
        if let Some(b) = self.blocks {
            let full = full_mask(bpp);
            if b.uptodate == full {
                self.uptodate = true;
            }
            self.dirty = b.dirty != 0;
            if self.uptodate && (b.dirty == 0 || b.dirty == full) {
                self.blocks = None;
            }
        }
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

#[derive(Copy, Clone, Debug, Default)]
pub(crate) struct Readahead {
    pub(crate) start: u64,
    /// Current window size in pages; 0 when the reader is not sequential.
    pub(crate) size: u64,
    /// Last page a read_at returned.
    pub(crate) prev: Option<u64>,
    /// Most pages read ahead of the reader now: the cache's depth in windows of the
    /// largest size (within a quarter of the cache), halved when read-ahead pages are
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

pub(crate) struct FileState {
    pub(crate) map: Box<dyn BlockMap>,
    pub(crate) block_size: u64,
    pub(crate) size: u64,
    /// Cached pages: page index → frame index (the page itself is in the cache's slots).
    pub(crate) pages: PageIndex,
    pub(crate) ra: Readahead,
    /// First write error since the last sync: (page, error).
    pub(crate) write_error: Option<(u64, PageError)>,
}

/// Pages per chunk of a [`PageIndex`].
const CHUNK_PAGES: u64 = 64;

/// A file's cached pages: page index → frame index, in chunks of 64 consecutive pages found
/// through a hash table, with the last chunk used remembered (readers and readahead walk
/// pages in order, so most lookups skip the table). Walks in page order sort the chunks.
#[derive(Default)]
pub(crate) struct PageIndex {
    /// Chunk number → position in `chunks`.
    by_key: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    chunks: Vec<IndexChunk>,
    /// The chunk found last: (chunk number + 1, position); 0 for none.
    last: Cell<(u64, u32)>,
}

struct IndexChunk {
    key: u64,
    /// Entries that are not [`NIL`].
    used: u32,
    frames: [u32; CHUNK_PAGES as usize],
}

/// A multiplicative hash for chunk numbers (they are not chosen by an adversary).
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl PageIndex {
    fn position(&self, key: u64) -> Option<usize> {
        let (k, i) = self.last.get();
        if k == key + 1 {
            return Some(i as usize);
        }
        let i = *self.by_key.get(&key)?;
        self.last.set((key + 1, i));
        Some(i as usize)
    }

    /// The frame of page `p`.
    pub(crate) fn get(&self, p: u64) -> Option<u32> {
        let i = self.position(p / CHUNK_PAGES)?;
        let fr = self.chunks[i].frames[(p % CHUNK_PAGES) as usize];
        (fr != NIL).then_some(fr)
    }

    /// Record page `p` in frame `fr`; returns the frame it was in before.
    fn insert(&mut self, p: u64, fr: u32) -> Option<u32> {
        let key = p / CHUNK_PAGES;
        let i = match self.position(key) {
            Some(i) => i,
            None => {
                let i = self.chunks.len();
                self.chunks.push(IndexChunk {
                    key,
                    used: 0,
                    frames: [NIL; CHUNK_PAGES as usize],
                });
                self.by_key.insert(key, i as u32);
                self.last.set((key + 1, i as u32));
                i
            }
        };
        let c = &mut self.chunks[i];
        let old = std::mem::replace(&mut c.frames[(p % CHUNK_PAGES) as usize], fr);
        if old == NIL {
            c.used += 1;
            None
        } else {
            Some(old)
        }
    }

    /// Forget page `p`; returns its frame.
    fn remove(&mut self, p: u64) -> Option<u32> {
        let key = p / CHUNK_PAGES;
        let i = self.position(key)?;
        let c = &mut self.chunks[i];
        let old = std::mem::replace(&mut c.frames[(p % CHUNK_PAGES) as usize], NIL);
        if old == NIL {
            return None;
        }
        c.used -= 1;
        if c.used == 0 {
            self.by_key.remove(&key);
            self.chunks.swap_remove(i);
            if let Some(moved) = self.chunks.get(i) {
                self.by_key.insert(moved.key, i as u32);
            }
            self.last.set((0, 0));
        }
        Some(old)
    }

    /// (page, frame) pairs from page `first` on, ascending.
    pub(crate) fn iter_from(&self, first: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        let mut order: Vec<(u64, u32)> = self
            .by_key
            .iter()
            .filter(|&(&k, _)| k >= first / CHUNK_PAGES)
            .map(|(&k, &i)| (k, i))
            .collect();
        order.sort_unstable();
        order
            .into_iter()
            .flat_map(move |(k, i)| {
                self.chunks[i as usize]
                    .frames
                    .iter()
                    .enumerate()
                    .filter(|&(_, &fr)| fr != NIL)
                    .map(move |(j, &fr)| (k * CHUNK_PAGES + j as u64, fr))
            })
            .filter(move |&(p, _)| p >= first)
    }

    /// Every (page, frame) pair, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.iter_from(0)
    }
}

/// Block geometry of a file, copied out for a walk.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Geo {
    /// Block size in bytes.
    pub(crate) bs: u64,
    /// Blocks per page.
    pub(crate) bpp: u64,
    /// LBAs per block.
    pub(crate) lpb: u64,
    /// File size in bytes.
    pub(crate) size: u64,
}

impl Geo {
    /// First block wholly beyond the end of the file.
    pub(crate) fn eof_block(&self) -> u64 {
        self.size.div_ceil(self.bs)
    }
}

pub(crate) enum Target {
    /// Whole pages, with their frames (a page under I/O is never evicted, so its frame
    /// stays its own until the command completes).
    Pages {
        pages: Vec<u64>,
        frames: Vec<u32>,
    },
    Block {
        page: u64,
        block: u32,
    },
    Flush,
}

pub(crate) struct InFlight {
    file: FileId,
    op: IoOp,
    slba: u64,
    lbas: u32,
    target: Target,
}

/// A page cache over one block device.
pub struct PageCache<D: BlockIo> {
    pub(crate) dev: D,
    pub(crate) pool: PagePool,
    pub(crate) opts: CacheOptions,
    pub(crate) lba_size: u32,
    /// Largest command in bytes (max transfer and the 65 536-LBA limit).
    pub(crate) max_cmd_bytes: u64,
    /// Most pages cached at once.
    capacity: usize,
    /// Largest readahead window in pages ([`CacheOptions::readahead_max`] resolved).
    ra_window_max: u64,
    /// Most readahead windows in flight ([`CacheOptions::readahead_depth`] resolved).
    ra_depth: u64,
    pub(crate) files: Vec<Option<FileState>>,
    inflight: HashMap<u64, InFlight>,
    next_tag: u64,
    /// The cached pages, by frame index: a frame holds at most one page, so its state lives
    /// with the frame (as Linux keeps it in `struct page`) and the per-file index is small.
    slots: Vec<Option<Page>>,
    /// The LRU list through the slots, least recently used at the head: each frame's
    /// neighbours (frame indexes, [`NIL`] at the ends).
    lru_head: u32,
    lru_tail: u32,
    lru_prev: Vec<u32>,
    lru_next: Vec<u32>,
    /// Pages cached now.
    cached: usize,
    /// Frames of evicted pages, kept for the next pages instead of going back to the pool
    /// (returned to it when a file is closed and when the cache is dropped).
    spare: VecDeque<FrameId>,
    /// Frames taken from the pool in a batch and not used yet (in pool order, next last):
    /// one lock of the pool per batch rather than per page.
    stash: Vec<FrameId>,
    /// Frames of pages dropped from the cache while a [`PageRef`] still held them: they go
    /// back to the pool once nobody views them.
    viewed_out: Vec<FrameId>,
    pub(crate) stats: CacheStats,
    flush_results: HashMap<u64, Result<(), IoError>>,
    /// Pages of failed multi-page reads, to read again one by one.
    retry: Vec<(FileId, Vec<u64>)>,
    in_retry: bool,
}

impl<D: BlockIo> PageCache<D> {
    /// A cache over `dev` whose pages are the frames of `pool`.
    pub fn new(dev: D, pool: PagePool, opts: CacheOptions) -> Result<PageCache<D>, MpageError> {
        let lba_size = dev.lba_size();
        let max = dev.max_transfer();
        if (max as u64) < PAGE {
            return Err(MpageError::MaxTransferTooSmall {
                dev: dev.name().to_string(),
                max,
            });
        }
        let max_cmd_bytes = (max as u64).min(MAX_LBAS_PER_COMMAND as u64 * lba_size as u64);
        let capacity = opts
            .capacity
            .unwrap_or(usize::MAX)
            .min(pool.frames())
            .max(1);
        let frames = pool.frames();
        let slots = (0..frames).map(|_| None).collect();
        let cmd_pages = (max_cmd_bytes / PAGE).clamp(1, 512);
        let ra_window_max = match opts.readahead_max {
            0 => cmd_pages,
            n => n,
        };
        let ra_depth = match opts.readahead_depth {
            0 => (dev.queue_depth() as u64 / 2).clamp(1, 16),
            n => n,
        };
        Ok(PageCache {
            dev,
            pool,
            opts,
            lba_size,
            max_cmd_bytes,
            capacity,
            ra_window_max,
            ra_depth,
            files: Vec::new(),
            inflight: HashMap::new(),
            next_tag: 1,
            slots,
            lru_head: NIL,
            lru_tail: NIL,
            lru_prev: vec![NIL; frames],
            lru_next: vec![NIL; frames],
            cached: 0,
            spare: VecDeque::new(),
            stash: Vec::new(),
            viewed_out: Vec::new(),
            stats: CacheStats::default(),
            flush_results: HashMap::new(),
            retry: Vec::new(),
            in_retry: false,
        })
    }

    // ---- accessors --------------------------------------------------------------------

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device, to change its settings (not to submit commands behind the cache's back).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// The frames.
    pub fn pool(&self) -> &PagePool {
        &self.pool
    }

    /// The options in force.
    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    /// Switch the per-block path on or off for pages read or written from now on.
    pub fn set_force_per_block(&mut self, force: bool) {
        self.opts.force_per_block = force;
    }

    /// Pages in the largest command (for sizing the lists of a command being built).
    pub(crate) fn cmd_pages(&self) -> usize {
        (self.max_cmd_bytes / PAGE).clamp(1, 512) as usize
    }

    /// The largest readahead window in pages, as resolved from the options and the device.
    pub fn readahead_window_max(&self) -> u64 {
        self.ra_window_max
    }

    /// Readahead windows kept in flight ahead of a sequential reader, as resolved.
    pub fn readahead_depth(&self) -> u64 {
        self.ra_depth
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Zero the counters.
    pub fn reset_stats(&mut self) {
        self.stats = CacheStats::default();
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    /// Most pages cached at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages cached now (all files).
    pub fn cached_total(&self) -> usize {
        self.cached
    }

    pub(crate) fn file(&self, f: FileId) -> Result<&FileState, MpageError> {
        // A match, not `ok_or`: this runs for every page, and the error is not cheap to make
        // and drop.
        match self.files.get(f.0 as usize).and_then(Option::as_ref) {
            Some(fs) => Ok(fs),
            None => Err(MpageError::NoSuchFile(f)),
        }
    }

    pub(crate) fn file_mut(&mut self, f: FileId) -> Result<&mut FileState, MpageError> {
        match self.files.get_mut(f.0 as usize).and_then(Option::as_mut) {
            Some(fs) => Ok(fs),
            None => Err(MpageError::NoSuchFile(f)),
        }
    }

    /// A page the caller knows is cached.
    pub(crate) fn page_mut(&mut self, f: FileId, p: u64) -> &mut Page {
        let fr = self.files[f.0 as usize]
            .as_ref()
            .and_then(|fs| fs.pages.get(p))
            .expect("page is cached");
        self.slot_mut(fr)
    }

    pub(crate) fn page_ref(&self, f: FileId, p: u64) -> Option<&Page> {
        let fr = self.files.get(f.0 as usize)?.as_ref()?.pages.get(p)?;
        self.slots[fr as usize].as_ref()
    }

    /// The page held by frame `fr`, which the caller knows holds one.
    fn slot(&self, fr: u32) -> &Page {
        self.slots[fr as usize]
            .as_ref()
            .expect("frame holds a page")
    }

    pub(crate) fn slot_mut(&mut self, fr: u32) -> &mut Page {
        self.slots[fr as usize]
            .as_mut()
            .expect("frame holds a page")
    }

    pub(crate) fn geo(&self, f: FileId) -> Result<Geo, MpageError> {
        let fs = self.file(f)?;
        Ok(Geo {
            bs: fs.block_size,
            bpp: PAGE / fs.block_size,
            lpb: fs.block_size / self.lba_size as u64,
            size: fs.size,
        })
    }

    /// The size of a file in bytes.
    pub fn file_size(&self, f: FileId) -> Result<u64, MpageError> {
        Ok(self.file(f)?.size)
    }

    /// The state of a cached page.
    pub fn page_state(&self, f: FileId, page: u64) -> Option<PageState> {
        self.page_ref(f, page).map(|p| PageState {
            uptodate: p.uptodate,
            dirty: p.dirty,
            locked: p.locked,
            writeback: p.writeback,
            mapped_to_disk: p.mapped_to_disk,
            error: p.error.as_deref().cloned(),
            zeroed_from: p.zeroed_from,
            blocks: p.blocks,
            frame: p.frame,
        })
    }

    /// A copy of a cached page's frame, whatever its state.
    pub fn page_data(&self, f: FileId, page: u64) -> Option<Vec<u8>> {
        self.page_ref(f, page)
            .map(|p| self.pool.frame_bytes(p.frame))
    }

    /// Indexes of a file's cached pages, ascending.
    pub fn cached_pages(&self, f: FileId) -> Result<Vec<u64>, MpageError> {
        Ok(self.file(f)?.pages.iter().map(|(p, _)| p).collect())
    }

    /// Number of dirty pages of a file.
    pub fn dirty_pages(&self, f: FileId) -> Result<usize, MpageError> {
        let fs = self.file(f)?;
        Ok(fs
            .pages
            .iter()
            .filter(|&(_, fr)| self.slot(fr).dirty)
            .count())
    }

    // ---- files ------------------------------------------------------------------------

    /// Open a file of `size` bytes whose blocks `map` knows. Its block size must be a power
    /// of two, a multiple of the device's LBA size and at most a page.
    pub fn open(&mut self, map: Box<dyn BlockMap>, size: u64) -> Result<FileId, MpageError> {
        let block_size = map.block_size();
        check_block_size(block_size, self.lba_size).map_err(|why| MpageError::BadBlockSize {
            dev: self.dev.name().to_string(),
            block_size,
            why,
        })?;
        let st = FileState {
            map,
            block_size: block_size as u64,
            size,
            pages: PageIndex::default(),
            ra: Readahead::default(),
            write_error: None,
        };
        let slot = match self.files.iter().position(Option::is_none) {
            Some(i) => {
                self.files[i] = Some(st);
                i
            }
            None => {
                self.files.push(Some(st));
                self.files.len() - 1
            }
        };
        Ok(FileId(slot as u32))
    }

    /// Sync a file and drop its pages. On a sync error the file stays open (and its dirty
    /// pages cached) so nothing is lost.
    pub fn close(&mut self, f: FileId) -> Result<(), MpageError> {
        self.sync(f)?;
        let pages = self.cached_pages(f)?;
        for p in pages {
            self.remove_page(f, p);
        }
        self.files[f.0 as usize] = None;
        self.release_spare();
        Ok(())
    }

    // ---- pages, frames, LRU -----------------------------------------------------------

    fn lru_unlink(&mut self, fr: u32) {
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

    fn lru_push(&mut self, fr: u32) {
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
    fn touch_frame(&mut self, fr: u32) {
        if self.lru_tail != fr {
            self.lru_unlink(fr);
            self.lru_push(fr);
        }
    }

    fn touch(&mut self, f: FileId, p: u64) {
        if let Some(fr) = self.files[f.0 as usize]
            .as_ref()
            .and_then(|fs| fs.pages.get(p))
        {
            self.touch_frame(fr);
        }
    }

    /// Put a new page into the cache (most recently used).
    pub(crate) fn insert_page(&mut self, f: FileId, p: u64, frame: FrameId) {
        let fr = frame.index() as u32;
        let fs = self.files[f.0 as usize].as_mut().expect("open file");
        let old = fs.pages.insert(p, fr);
        debug_assert!(old.is_none(), "page {p} inserted twice");
        debug_assert!(self.slots[fr as usize].is_none(), "frame {fr} in use");
        self.slots[fr as usize] = Some(Page::new(frame, f, p));
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
    fn reap_viewed_out(&mut self) {
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
    fn detach_page(&mut self, f: FileId, p: u64) -> Option<FrameId> {
        let fr = self.files[f.0 as usize].as_mut()?.pages.remove(p)?;
        debug_assert!(!self.slot(fr).busy(), "page {p} removed with I/O in flight");
        self.lru_unlink(fr);
        let page = self.slots[fr as usize].take().expect("frame holds a page");
        self.cached -= 1;
        Some(page.frame)
    }

    /// Give the frames kept from evictions back to the pool.
    fn release_spare(&mut self) {
        for frame in self.spare.drain(..) {
            self.pool.free(frame);
        }
        for frame in self.stash.drain(..).rev() {
            self.pool.free(frame);
        }
        self.reap_viewed_out();
    }

    fn evict(&mut self, want: usize) -> usize {
        let mut victims: Vec<(FileId, u64)> = Vec::with_capacity(want);
        let mut fr = self.lru_head;
        let mut thrashed = Vec::new();
        while fr != NIL && victims.len() < want {
            let pg = self.slot(fr);
            if pg.evictable() && !self.pool.is_viewed(pg.frame) {
                victims.push((pg.file, pg.index));
                if pg.ra_unused {
                    thrashed.push(pg.file);
                }
            }
            fr = self.lru_next[fr as usize];
        }
        // Read ahead and thrown away unread: that file's readahead runs too far ahead of its
        // reader for this cache. Halve what it may keep in flight.
        self.stats.readahead_thrashed += thrashed.len() as u64;
        thrashed.dedup();
        for f in thrashed {
            if let Some(fs) = self.files[f.0 as usize].as_mut() {
                fs.ra.ceiling = (fs.ra.limit * 3 / 4).max(1);
                fs.ra.limit = (fs.ra.limit / 2).max(1);
                fs.ra.thrashed = true;
            }
        }
        for &(f, p) in &victims {
            if let Some(frame) = self.detach_page(f, p) {
                self.spare.push_back(frame);
            }
        }
        self.stats.evictions += victims.len() as u64;
        victims.len()
    }

    /// A free frame, evicting clean pages and writing back dirty ones if the pool is empty.
    /// None when every page is busy or dirty and stays so.
    pub(crate) fn alloc_frame(&mut self) -> Result<Option<FrameId>, MpageError> {
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
                written += self.start_writeback(FileId(i as u32))?;
            }
        }
        self.stats.writebacks += written as u64;
        if written > 0 || !self.inflight.is_empty() {
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

    fn cache_full(&self) -> MpageError {
        let dirty = self
            .files
            .iter()
            .flatten()
            .map(|fs| {
                fs.pages
                    .iter()
                    .filter(|&(_, fr)| self.slot(fr).dirty)
                    .count()
            })
            .sum();
        MpageError::CacheFull {
            dev: self.dev.name().to_string(),
            capacity: self.capacity,
            dirty,
        }
    }

    // ---- commands and completions -----------------------------------------------------

    pub(crate) fn map_call(
        &mut self,
        f: FileId,
        block: u64,
        max_blocks: u64,
        create: bool,
    ) -> Result<Mapping, MapError> {
        self.stats.map_calls += 1;
        let fs = self.files[f.0 as usize].as_mut().expect("open file");
        let m = fs.map.map(block, max_blocks.max(1), create)?;
        if m.blocks() == 0 {
            return Err(MapError::Failed {
                file_block: block,
                reason: "the map answered with an empty run".into(),
            });
        }
        Ok(m)
    }

    /// Submit one command, polling while the queue is full. A command the device refuses
    /// completes at once with the refusal, so its pages get the error like any other.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn submit_cmd(
        &mut self,
        f: FileId,
        op: IoOp,
        slba: u64,
        lbas: u32,
        segs: &[Segment],
        target: Target,
        fallback: bool,
    ) -> Result<u64, MpageError> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let pages = match &target {
            Target::Pages { pages, .. } => pages.clone(),
            Target::Block { page, .. } => vec![*page],
            Target::Flush => Vec::new(),
        };
        self.inflight.insert(
            tag,
            InFlight {
                file: f,
                op,
                slba,
                lbas,
                target,
            },
        );
        // The commands carry shares of the pool's buffers (a handle of the pool is held here
        // so that the borrow does not tie up `self`).
        let pool = self.pool.clone();
        let one;
        let many: Vec<DmaSlice<'_>>;
        let data: &[DmaSlice<'_>] = match segs {
            [] => &[],
            [s] => {
                one = [pool.slice_of(*s).map_err(MpageError::from)?];
                &one
            }
            _ => {
                many = segs
                    .iter()
                    .map(|s| pool.slice_of(*s))
                    .collect::<Result<_, _>>()
                    .map_err(MpageError::from)?;
                &many
            }
        };
        let req = IoRequest {
            op,
            slba,
            lbas,
            segments: data,
            pages: &pages,
            fallback,
        };
        let started = Instant::now();
        let mut idle = 0u32;
        loop {
            match self.dev.submit(&req, tag) {
                Ok(()) => break,
                Err(IoError::QueueFull) if self.inflight.len() > 1 => {
                    self.dev.kick();
                    if self.poll_once() == 0 {
                        idle += 1;
                        if idle.is_multiple_of(256) {
                            self.check_timeout(started)?;
                        }
                    }
                }
                Err(e) => {
                    log::warn!(
                        "{}: {op} of {lbas} LBA(s) at {slba} not submitted: {e}",
                        self.dev.name()
                    );
                    self.complete(tag, Err(e));
                    return Ok(tag);
                }
            }
        }
        self.stats.commands += 1;
        match op {
            IoOp::Read => self.stats.read_commands += 1,
            IoOp::Write => self.stats.write_commands += 1,
            IoOp::Flush => self.stats.flush_commands += 1,
        }
        if fallback {
            self.stats.fallback_commands += 1;
        }
        Ok(tag)
    }

    fn check_timeout(&self, since: Instant) -> Result<(), MpageError> {
        if since.elapsed() >= self.opts.io_timeout {
            return Err(MpageError::Timeout {
                dev: self.dev.name().to_string(),
                ms: self.opts.io_timeout.as_millis() as u64,
                outstanding: self.inflight.len(),
            });
        }
        std::thread::yield_now();
        Ok(())
    }

    /// Reap what the device has completed.
    pub(crate) fn poll_once(&mut self) -> usize {
        let mut done = Vec::new();
        let n = self.dev.poll(&mut |tag, r| done.push((tag, r)));
        for (tag, r) in done {
            self.complete(tag, r);
        }
        n
    }

    /// Poll until `cond` holds. `page` names what is waited for, for the error when nothing
    /// outstanding can make it hold.
    pub(crate) fn wait_until(
        &mut self,
        page: Option<(FileId, u64)>,
        cond: impl Fn(&Self) -> bool,
    ) -> Result<(), MpageError> {
        let mut since = Instant::now();
        let mut idle = 0u32;
        loop {
            self.run_retries()?;
            if cond(self) {
                return Ok(());
            }
            if self.inflight.is_empty() && self.retry.is_empty() {
                let what = match page {
                    Some((f, p)) => format!("page {p} of file {f}"),
                    None => "I/O completions".to_string(),
                };
                return Err(MpageError::Stuck {
                    dev: self.dev.name().to_string(),
                    what,
                });
            }
            self.dev.kick();
            if self.poll_once() > 0 {
                since = Instant::now();
                idle = 0;
            } else {
                idle += 1;
                if idle.is_multiple_of(256) {
                    self.check_timeout(since)?;
                }
            }
        }
    }

    /// Wait for every outstanding command.
    pub fn wait_idle(&mut self) -> Result<(), MpageError> {
        if self.inflight.is_empty() && self.retry.is_empty() {
            return Ok(());
        }
        self.wait_until(None, |c| c.inflight.is_empty() && c.retry.is_empty())
    }

    /// Wait until a page has no I/O in flight (or is gone).
    pub(crate) fn wait_page(&mut self, f: FileId, p: u64) -> Result<(), MpageError> {
        if !self.page_ref(f, p).is_some_and(Page::busy) {
            return Ok(());
        }
        self.wait_until(Some((f, p)), |c| !c.page_ref(f, p).is_some_and(Page::busy))
    }

    fn run_retries(&mut self) -> Result<(), MpageError> {
        if self.in_retry || self.retry.is_empty() {
            return Ok(());
        }
        self.in_retry = true;
        let work = std::mem::take(&mut self.retry);
        let mut result = Ok(());
        for (f, pages) in work {
            for p in pages {
                if let Err(e) = self.read_batch(f, &[p]) {
                    log::error!("{}: re-reading page {p} of file {f}: {e}", self.dev.name());
                    let page = self.page_mut(f, p);
                    page.locked = false;
                    result = result.and(Err(e));
                }
            }
        }
        self.dev.kick();
        self.in_retry = false;
        result
    }

    fn complete(&mut self, tag: u64, result: Result<(), IoError>) {
        let Some(inf) = self.inflight.remove(&tag) else {
            log::warn!(
                "{}: completion for unknown tag {tag} ignored",
                self.dev.name()
            );
            return;
        };
        if let Target::Flush = inf.target {
            self.flush_results.insert(tag, result);
            return;
        }
        let f = inf.file;
        let err = result.err().map(|source| PageError::Io {
            op: inf.op,
            slba: inf.slba,
            lbas: inf.lbas,
            source,
        });
        if let Some(e) = &err {
            log::warn!("{}: file {f}: {e}", self.dev.name());
        }
        let Ok(geo) = self.geo(f) else { return };
        match (inf.op, inf.target) {
            (IoOp::Read, Target::Pages { pages, frames }) => {
                if err.is_some() && pages.len() > 1 {
                    // Find out which pages are bad: read each again on its own.
                    self.stats.read_retries += 1;
                    self.retry.push((f, pages));
                    return;
                }
                for (p, fr) in pages.into_iter().zip(frames) {
                    let page = self.slot_mut(fr);
                    debug_assert!(
                        page.file == f && page.index == p,
                        "frame {fr} changed hands"
                    );
                    page.locked = false;
                    match &err {
                        None => {
                            page.uptodate = true;
                            page.error = None;
                        }
                        Some(e) => {
                            page.error = Some(Box::new(e.clone()));
                            self.stats.read_errors += 1;
                        }
                    }
                }
            }
            (IoOp::Write, Target::Pages { pages, frames }) => {
                for (&p, &fr) in pages.iter().zip(&frames) {
                    let page = self.slot_mut(fr);
                    debug_assert!(
                        page.file == f && page.index == p,
                        "frame {fr} changed hands"
                    );
                    page.writeback = false;
                    match &err {
                        None => {
                            page.dirty = false;
                            page.blocks = None;
                            page.error = None;
                        }
                        Some(e) => page.error = Some(Box::new(e.clone())),
                    }
                }
                if let Some(e) = err {
                    self.stats.write_errors += pages.len() as u64;
                    let fs = self.files[f.0 as usize].as_mut().expect("open file");
                    fs.write_error.get_or_insert((pages[0], e));
                }
            }
            (op, Target::Block { page: p, block }) => {
                let page = self.page_mut(f, p);
                let mut bits = page.bits(geo.bpp);
                match err {
                    None if op == IoOp::Read => bits.uptodate |= 1 << block,
                    None => bits.dirty &= !(1 << block),
                    Some(e) => {
                        page.pending_error.get_or_insert_with(|| Box::new(e));
                    }
                }
                page.blocks = Some(bits);
                self.end_block_io(f, p, op, geo.bpp);
            }
            (IoOp::Flush, _) | (_, Target::Flush) => unreachable!("flushes are handled above"),
        }
    }

    /// One per-block command of page `p` (or the issuing loop) is done.
    pub(crate) fn end_block_io(&mut self, f: FileId, p: u64, op: IoOp, bpp: u64) {
        let page = self.page_mut(f, p);
        page.pending -= 1;
        if page.pending > 0 {
            return;
        }
        let failed = page.pending_error.take().map(|e| *e);
        if op == IoOp::Read {
            page.locked = false;
        } else {
            page.writeback = false;
        }
        page.normalize(bpp);
        match failed {
            None => {
                if op == IoOp::Read || !page.dirty {
                    page.error = None;
                }
            }
            Some(e) => {
                page.error = Some(Box::new(e.clone()));
                if op == IoOp::Read {
                    self.stats.read_errors += 1;
                } else {
                    self.stats.write_errors += 1;
                    let fs = self.files[f.0 as usize].as_mut().expect("open file");
                    fs.write_error.get_or_insert((p, e));
                }
            }
        }
    }

    // ---- reading ----------------------------------------------------------------------

    /// Lock the cached, idle, not-uptodate page `p` for a read.
    pub(crate) fn lock_for_read(&mut self, f: FileId, p: u64) {
        let page = self.page_mut(f, p);
        debug_assert!(!page.busy() && !page.uptodate);
        page.locked = true;
        page.error = None;
    }

    /// Lock pages `start..end` that need reading, taking frames for those not cached. Stops
    /// early when no frame can be had; returns the pages and where it stopped.
    pub(crate) fn prepare_batch(
        &mut self,
        f: FileId,
        start: u64,
        end: u64,
    ) -> Result<(Vec<u64>, u64), MpageError> {
        let mut out = Vec::with_capacity(end.saturating_sub(start).min(1024) as usize);
        for p in start..end {
            match self.file(f)?.pages.get(p) {
                Some(fr) => {
                    let pg = self.slot_mut(fr);
                    if !pg.uptodate && !pg.busy() {
                        pg.locked = true;
                        pg.error = None;
                        out.push(p);
                    }
                }
                None => match self.alloc_frame()? {
                    Some(frame) => {
                        self.insert_page(f, p, frame);
                        self.slot_mut(frame.index() as u32).locked = true;
                        out.push(p);
                    }
                    None => return Ok((out, p)),
                },
            }
        }
        Ok((out, end))
    }

    /// Start reading pages `start..start + pages` (in the background): explicit readahead.
    /// Pages already cached are skipped; holes and the part beyond the end of the file are
    /// zeroed. Returns once the commands are submitted.
    pub fn readahead(&mut self, f: FileId, start: u64, pages: u64) -> Result<(), MpageError> {
        self.file(f)?;
        let end = start.saturating_add(pages);
        let mut p = start;
        while p < end {
            let (batch, next) = self.prepare_batch(f, p, end)?;
            if batch.is_empty() && next == p {
                if self.inflight.is_empty() {
                    return Err(self.cache_full());
                }
                self.wait_idle()?;
                continue;
            }
            self.read_batch(f, &batch)?;
            p = next;
        }
        self.dev.kick();
        Ok(())
    }

    /// Read one page (like Linux's `read_folio`) and wait for it.
    pub fn read_page(&mut self, f: FileId, p: u64) -> Result<(), MpageError> {
        self.file(f)?;
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

    fn page_result(&self, f: FileId, p: u64) -> Result<(), MpageError> {
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
    fn ensure_uptodate(&mut self, f: FileId, p: u64, last: u64) -> Result<(), MpageError> {
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
                    if !mark {
                        return Ok(());
                    }
                    // The window's frames must not come from evicting this very page.
                    let pg = self.page_mut(f, p);
                    pg.ra_mark = false;
                    pg.held = true;
                    let r = self.readahead_async(f, p);
                    if let Some(fr) = self.files[f.0 as usize]
                        .as_ref()
                        .and_then(|fs| fs.pages.get(p))
                    {
                        self.slot_mut(fr).held = false;
                    }
                    return r;
                }
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

    fn readahead_cap(&self) -> u64 {
        (self.capacity as u64 / 4).max(1)
    }

    /// Most pages read ahead of one reader: `depth` windows of the largest size, within a
    /// quarter of the cache.
    fn readahead_limit(&self) -> u64 {
        (self.ra_depth * self.ra_window_max)
            .min(self.readahead_cap())
            .max(1)
    }

    /// A reader missed page `p`: read it, and a window beyond it if the reader is sequential.
    fn readahead_miss(&mut self, f: FileId, p: u64, last: u64) -> Result<(), MpageError> {
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
        let (batch, _) = self.prepare_batch(f, p, p + len)?;
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
        self.mark_unused(f, &batch, Some(p..=last));
        self.read_batch(f, &batch)?;
        self.dev.kick();
        Ok(())
    }

    fn set_ra_mark(&mut self, f: FileId, p: u64) {
        if let Some(fr) = self.files[f.0 as usize]
            .as_ref()
            .and_then(|fs| fs.pages.get(p))
        {
            self.slot_mut(fr).ra_mark = true;
        }
    }

    /// Flag the pages of a readahead batch that nobody asked for yet.
    fn mark_unused(
        &mut self,
        f: FileId,
        batch: &[u64],
        asked: Option<std::ops::RangeInclusive<u64>>,
    ) {
        for &q in batch {
            if !asked.as_ref().is_some_and(|a| a.contains(&q)) {
                self.page_mut(f, q).ra_unused = true;
            }
        }
    }

    /// The reader reached a marked page `at`: keep windows in flight ahead of it, each
    /// twice the last up to the largest window, as many as the depth allows (the kernel
    /// keeps one; a queue of many commands is busy only with several). What is read ahead
    /// stays within the file's limit, which shrinks when its pages are evicted unread
    /// (thrashing) and grows back by a small window each time none were.
    fn readahead_async(&mut self, f: FileId, at: u64) -> Result<(), MpageError> {
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
            let (batch, next) = self.prepare_batch(f, start, start + len)?;
            self.set_ra_mark(f, start + len - len.div_ceil(2));
            self.mark_unused(f, &batch, None);
            self.read_batch(f, &batch)?;
            issued = true;
            if next < start + len {
                // No frames for the rest: the window ends here.
                self.file_mut(f)?.ra.size = next - start;
                break;
            }
        }
        self.dev.kick();
        Ok(())
    }

    /// Read up to `buf.len()` bytes at `offset`; returns how many (0 at or past the end).
    /// Sequential readers get readahead windows that double up to
    /// [`CacheOptions::readahead_max`].
    pub fn read_at(&mut self, f: FileId, offset: u64, buf: &mut [u8]) -> Result<usize, MpageError> {
        // One copy per run of pages in consecutive frames, not one per page.
        self.walk_runs(f, offset, buf.len(), |c, frame, in_page, at, bytes| {
            let from = (at - offset) as usize;
            c.pool
                .read_run(frame, in_page, &mut buf[from..from + bytes]);
            Ok(())
        })
    }

    /// Make bytes `offset..offset + len` of a file (up to its end) uptodate and hand them to
    /// `each` in runs of pages that lie in consecutive frames of one buffer, in file order:
    /// (first frame, offset in it, file offset, bytes). A run is handed over before anything
    /// that could evict its pages (waiting for a page), so its frames are the file's while
    /// `each` runs. Returns the bytes walked (0 at or past the end).
    fn walk_runs(
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
        for p in first..=last {
            // Fast path: an uptodate page that starts no readahead, found with one lookup.
            let fr = match self.page_ref(f, p) {
                Some(pg) if pg.uptodate && !pg.ra_mark => pg.frame,
                _ => {
                    // Waiting may evict pages: hand the run over first.
                    if let Some((fr, o, at, b)) = run.take() {
                        each(self, fr, o, at, b)?;
                    }
                    self.ensure_uptodate(f, p, last)?;
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

    /// A reader took the page in frame `fr`: use-once LRU (see [`PageCache::read_at`]).
    fn consume(&mut self, fr: FrameId) {
        let i = fr.index() as u32;
        let pg = self.slot_mut(i);
        if pg.ra_unused {
            pg.ra_unused = false;
        } else {
            self.touch_frame(i);
        }
    }

    // ---- writing ----------------------------------------------------------------------

    /// Have page `p` cached and idle, taking a frame if needed.
    fn page_for_write(&mut self, f: FileId, p: u64) -> Result<(), MpageError> {
        self.wait_page(f, p)?;
        match self.page_ref(f, p).map(|pg| pg.frame) {
            Some(frame) => self.check_not_viewed(f, p, frame)?,
            None => {
                let frame = self.alloc_frame()?.ok_or_else(|| self.cache_full())?;
                self.insert_page(f, p, frame);
            }
        }
        Ok(())
    }

    /// Refuse to change a page a [`PageRef`] holds: its holder reads the bytes in place.
    fn check_not_viewed(&self, f: FileId, p: u64, frame: FrameId) -> Result<(), MpageError> {
        if self.pool.is_viewed(frame) {
            return Err(MpageError::PageHeld { file: f, page: p });
        }
        Ok(())
    }

    /// Make bytes `from..from + len` of page `p` ready to be overwritten: read what of the
    /// blocks they only partly cover is not in the frame yet (read-modify-write).
    /// `old_size` is the file size before the write began.
    fn prepare_write(
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
            page.normalize(geo.bpp);
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
        self.dev.kick();
        self.wait_page(f, p)?;
        self.page_result(f, p)
    }

    /// Record that bytes `from..from + len` of page `p` were overwritten.
    fn mark_written(&mut self, f: FileId, p: u64, from: usize, len: usize, bpp: u64) {
        let bs = PAGE_SIZE / bpp as usize;
        let page = self.page_mut(f, p);
        if page.uptodate || (from == 0 && len == PAGE_SIZE) {
            page.uptodate = true;
            page.dirty = true;
            page.blocks = None;
        } else {
            let mut touched = 0u8;
            for i in from / bs..=(from + len - 1) / bs {
                touched |= 1 << i;
            }
            let mut bits = page.bits(bpp);
            bits.uptodate |= touched;
            bits.dirty |= touched;
            page.blocks = Some(bits);
            page.normalize(bpp);
        }
        page.zeroed_from = None;
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
        let (p, i) = (block / geo.bpp, (block % geo.bpp) as usize);
        self.page_for_write(f, p)?;
        let frame = self.page_ref(f, p).expect("page").frame;
        let from = i * geo.bs as usize;
        self.pool.write(frame, from, data);
        self.mark_written(f, p, from, geo.bs as usize, geo.bpp);
        self.touch(f, p);
        Ok(())
    }

    /// Start writing back the dirty pages of a file; returns how many were taken.
    pub fn start_writeback(&mut self, f: FileId) -> Result<usize, MpageError> {
        let pages: Vec<u64> = self
            .file(f)?
            .pages
            .iter()
            .filter(|&(_, fr)| {
                let pg = self.slot(fr);
                pg.dirty && !pg.busy()
            })
            .map(|(p, _)| p)
            .collect();
        self.write_batch(f, &pages)?;
        Ok(pages.len())
    }

    /// Write back every dirty page of the file, wait, then Flush. Returns the first error
    /// since the previous sync: pages whose write failed stay dirty and are retried here.
    ///
    /// Unlike Linux, where a page is clean once its write is submitted and a failed write
    /// loses the data from the cache (fsync reports it once), a page here stays dirty until
    /// its write completed successfully, so a failed write is never dropped silently.
    pub fn sync(&mut self, f: FileId) -> Result<(), MpageError> {
        self.file(f)?;
        self.wait_idle()?;
        self.start_writeback(f)?;
        self.wait_idle()?;
        let flush = self.flush(f);
        if let Some((page, source)) = self.file_mut(f)?.write_error.take() {
            return Err(MpageError::Write {
                dev: self.dev.name().to_string(),
                file: f,
                page,
                source,
            });
        }
        flush
    }

    /// Issue a Flush and wait for it.
    pub fn flush(&mut self, f: FileId) -> Result<(), MpageError> {
        let tag = self.submit_cmd(f, IoOp::Flush, 0, 0, &[], Target::Flush, false)?;
        self.dev.kick();
        self.wait_until(None, |c| c.flush_results.contains_key(&tag))?;
        let r = self.flush_results.remove(&tag).expect("flush completed");
        r.map_err(|source| MpageError::Flush {
            dev: self.dev.name().to_string(),
            source,
        })
    }

    // ---- size -------------------------------------------------------------------------

    /// Change the size of a file. Growing makes the new bytes read as zeros; shrinking drops
    /// the cached pages beyond the end (dirty or not: their data is no longer in the file)
    /// and releases the blocks through [`BlockMap::truncate`].
    pub fn set_len(&mut self, f: FileId, len: u64) -> Result<(), MpageError> {
        let size = self.file(f)?.size;
        match len.cmp(&size) {
            std::cmp::Ordering::Greater => self.grow(f, len),
            std::cmp::Ordering::Less => self.shrink(f, len),
            std::cmp::Ordering::Equal => Ok(()),
        }
    }

    fn drop_pages_from(&mut self, f: FileId, first: u64) -> Result<(), MpageError> {
        let gone: Vec<u64> = self
            .file(f)?
            .pages
            .iter_from(first)
            .map(|(p, _)| p)
            .collect();
        if gone
            .iter()
            .any(|&p| self.page_ref(f, p).is_some_and(Page::busy))
        {
            self.wait_idle()?;
        }
        for p in gone {
            self.remove_page(f, p);
        }
        Ok(())
    }

    fn truncate_map(&mut self, f: FileId, first_block: u64) -> Result<(), MpageError> {
        self.file_mut(f)?
            .map
            .truncate(first_block)
            .map_err(|source| MpageError::Truncate { file: f, source })
    }

    fn grow(&mut self, f: FileId, new_size: u64) -> Result<(), MpageError> {
        let geo = self.geo(f)?;
        let old = geo.size;
        let tail = (old % PAGE) as usize;
        if tail != 0 {
            // The rest of the page holding the old end must read as zeros from now on, on
            // disk too: zero it and dirty it.
            let p = old / PAGE;
            self.prepare_write(f, p, tail, PAGE_SIZE - tail, old)?;
            let frame = self.page_ref(f, p).expect("prepared page").frame;
            self.pool.zero(frame, tail, PAGE_SIZE - tail);
            self.mark_written(f, p, tail, PAGE_SIZE - tail, geo.bpp);
        }
        self.drop_pages_from(f, old.div_ceil(PAGE))?;
        self.truncate_map(f, old.div_ceil(geo.bs))?;
        self.file_mut(f)?.size = new_size;
        Ok(())
    }

    fn shrink(&mut self, f: FileId, new_size: u64) -> Result<(), MpageError> {
        let geo = self.geo(f)?;
        // Pages past the new end go first: no point writing them back to make room below.
        self.drop_pages_from(f, new_size.div_ceil(PAGE))?;
        let tail = (new_size % PAGE) as usize;
        if tail != 0 {
            let p = new_size / PAGE;
            if !new_size.is_multiple_of(geo.bs) {
                // The block holding the new end keeps file data before it and must hold
                // zeros after it, on disk too: read it, zero its tail, dirty it.
                self.prepare_write(f, p, tail, PAGE_SIZE - tail, geo.size)?;
                let frame = self.page_ref(f, p).expect("prepared page").frame;
                self.pool.zero(frame, tail, PAGE_SIZE - tail);
                self.mark_written(f, p, tail, PAGE_SIZE - tail, geo.bpp);
            } else {
                self.wait_page(f, p)?;
                if let Some(frame) = self.page_ref(f, p).map(|pg| pg.frame) {
                    self.check_not_viewed(f, p, frame)?;
                    self.pool.zero(frame, tail, PAGE_SIZE - tail);
                }
            }
        }
        self.truncate_map(f, new_size.div_ceil(geo.bs))?;
        self.file_mut(f)?.size = new_size;
        Ok(())
    }
}

impl<D: BlockIo> Drop for PageCache<D> {
    /// Waits for commands in flight (the device may still be moving data into the frames);
    /// dirty pages not synced are lost, and said so in the log.
    fn drop(&mut self) {
        self.release_spare();
        if let Err(e) = self.wait_idle() {
            log::error!(
                "{}: dropping the page cache with commands in flight: {e}",
                self.dev.name()
            );
        }
        let dirty: usize = self
            .files
            .iter()
            .flatten()
            .map(|fs| {
                fs.pages
                    .iter()
                    .filter(|&(_, fr)| self.slot(fr).dirty)
                    .count()
            })
            .sum();
        if dirty > 0 {
            log::warn!(
                "{}: dropping the page cache with {dirty} dirty page(s) never synced",
                self.dev.name()
            );
        }
    }
}
