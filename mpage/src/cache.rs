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

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use rnvme_driver::clock::{TickRate, Ticks};

use crate::backend::{BlockIo, IoError, IoOp};
use crate::error::{MpageError, PageError};
pub use crate::id::FileId;
use crate::index::PageIndex;
use crate::map::BlockMap;
use crate::page::{Page, PageState, NIL};
use crate::pool::{FrameId, PagePool, PAGE_SIZE};
use crate::readahead::Readahead;
use crate::recording::MAX_LBAS_PER_COMMAND;
use crate::spec::check_block_size;

pub(crate) const PAGE: u64 = PAGE_SIZE as u64;
/// The last page a file can have: the byte offsets of every page, its end included, fit in
/// 64 bits.
pub const MAX_PAGE: u64 = u64::MAX / PAGE - 1;
/// The largest size a file can have: up to the end of [`MAX_PAGE`].
pub const MAX_FILE_SIZE: u64 = (MAX_PAGE + 1) * PAGE;

/// `p` if a file can have such a page.
pub(crate) fn check_page(p: u64) -> Result<u64, MpageError> {
    if p > MAX_PAGE {
        return Err(MpageError::PageOutOfRange { page: p });
    }
    Ok(p)
}

/// Whether a file can be `size` bytes large.
pub(crate) fn check_size(size: u64) -> Result<(), MpageError> {
    if size > MAX_FILE_SIZE {
        return Err(MpageError::TooLarge { size });
    }
    Ok(())
}
/// Most frames taken from the pool at once: a buffer's worth (one lock of the pool per 2 MiB),
/// so that the shards of a [`crate::SharedCache`], which take their frames turn about from one
/// pool, mostly hold whole buffers each; a copy in or out of frames locks their buffer, and two
/// shards copying from one buffer would take turns (two readers under `SharedCache` gained 5-6 %
/// over batches of 64 frames, natively and in a TCG guest).
pub(crate) const STASH_BATCH: usize = crate::pool::FRAMES_PER_CHUNK;
/// Most clean pages evicted at once when a frame is needed.
pub(crate) const EVICT_BATCH: usize = 32;

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
    /// the device's queue with commands (at most 16). Readahead never takes more than
    /// half the cache, and backs off when its pages are evicted before they are read.
    pub readahead_depth: u64,
    /// How long to wait without any completion before giving up on the device.
    pub io_timeout: Duration,
    /// Most pages cached at once; None for every frame of the pool.
    pub capacity: Option<usize>,
    /// Dirty pages past which a writer starts writing the oldest dirty file back in the
    /// background (without waiting), as Linux's `dirty_background_ratio`: 0 for a quarter of
    /// the capacity; `usize::MAX` never to.
    pub dirty_background: usize,
    /// Most dirty pages (Linux's `dirty_ratio`): a writer about to dirty one more waits for
    /// write-backs to complete until fewer are dirty — throttled to the device's pace — rather
    /// than the cache filling with dirty pages and then stalling on all of them at once. 0 for
    /// half the capacity; `usize::MAX` never to throttle.
    pub dirty_limit: usize,
    /// Dirty pages older than this are written back (Linux's `dirty_expire_centisecs`).
    pub dirty_expire: Duration,
    /// How often writers and [`PageCache::tick`] look for expired dirty pages (Linux's
    /// `dirty_writeback_centisecs`).
    pub writeback_interval: Duration,
    /// Readahead commands held back before the device is told of them all at once (one
    /// doorbell for several: each is an MMIO write, which costs an emulated controller, and
    /// a virtualised one, more than the command's own work): 0 for half the readahead
    /// depth, 1 to ring for each window. Held commands go at once when fewer than
    /// half the depth are in flight before them (the device never runs short: a reader
    /// waiting on a held window sees it go as those before it complete), when the cache
    /// waits for everything, and on [`PageCache::tick`]. The window of a reader's miss,
    /// explicit readahead, writes and flushes are never held.
    pub kick_batch: usize,
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
            dirty_background: 0,
            dirty_limit: 0,
            dirty_expire: Duration::from_secs(30),
            writeback_interval: Duration::from_secs(5),
            kick_batch: 0,
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
    /// Pieces of contiguous memory the read and write commands' data came in: as many as
    /// those commands when each one's pages sit in consecutive frames, more as the pool's
    /// free frames come apart (every piece is a PRP list run or an SGL descriptor of its
    /// own, and a mapping for the IOMMU to walk).
    pub data_segments: u64,
    /// Times the device was told of queued commands (doorbells rung): fewer than commands
    /// when readahead windows go several at once ([`CacheOptions::kick_batch`]).
    pub kicks: u64,
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
    /// Dirty pages written back because the cache ran short of clean pages.
    pub writebacks: u64,
    /// Times the cache ran short of clean pages and waited for every dirty page to be
    /// written (the stall the dirty limit is there to avoid).
    pub writeback_stalls: u64,
    /// Dirty pages written back in the background: past the background threshold.
    pub background_writebacks: u64,
    /// Dirty pages written back because they had been dirty longer than the expiry.
    pub expired_writebacks: u64,
    /// Times a writer waited for write-backs at the dirty limit.
    pub throttled: u64,
    /// Multi-page reads that failed and were retried page by page.
    pub read_retries: u64,
    /// Pages left in error by a read.
    pub read_errors: u64,
    /// Pages left dirty by a failed write.
    pub write_errors: u64,
    /// Nanoseconds callers spent waiting for the device: polling its queue pair (or asleep
    /// on its interrupt) for completions they needed, ending the commands that came.
    pub device_wait_ns: u64,
    /// Nanoseconds spent telling the device of queued commands: doorbell writes (under an
    /// emulator each one is an exit, which can wait for the emulator's lock).
    pub doorbell_ns: u64,
    /// Nanoseconds `read_at` spent copying bytes from frames into callers' buffers.
    pub copy_out_ns: u64,
}

/// Time-stamp counter ticks spent waiting for the device, ringing doorbells and copying out
/// ([`CacheStats::device_wait_ns`], [`CacheStats::doorbell_ns`], [`CacheStats::copy_out_ns`]).
#[derive(Copy, Clone, Debug, Default)]
pub(crate) struct Timed {
    pub(crate) wait: u64,
    pub(crate) doorbell: u64,
    pub(crate) copy: u64,
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
            data_segments,
            kicks,
            fallback_commands,
            map_calls,
            readahead_windows,
            readahead_thrashed,
            evictions,
            writebacks,
            writeback_stalls,
            background_writebacks,
            expired_writebacks,
            throttled,
            read_retries,
            read_errors,
            write_errors,
            device_wait_ns,
            doorbell_ns,
            copy_out_ns,
        } = *o;
        self.pages_read += pages_read;
        self.pages_zeroed += pages_zeroed;
        self.pages_written += pages_written;
        self.commands += commands;
        self.read_commands += read_commands;
        self.write_commands += write_commands;
        self.flush_commands += flush_commands;
        self.data_segments += data_segments;
        self.kicks += kicks;
        self.fallback_commands += fallback_commands;
        self.map_calls += map_calls;
        self.readahead_windows += readahead_windows;
        self.readahead_thrashed += readahead_thrashed;
        self.evictions += evictions;
        self.writebacks += writebacks;
        self.writeback_stalls += writeback_stalls;
        self.background_writebacks += background_writebacks;
        self.expired_writebacks += expired_writebacks;
        self.throttled += throttled;
        self.read_retries += read_retries;
        self.read_errors += read_errors;
        self.write_errors += write_errors;
        self.device_wait_ns += device_wait_ns;
        self.doorbell_ns += doorbell_ns;
        self.copy_out_ns += copy_out_ns;
    }
}

pub(crate) struct FileState {
    /// The block map, behind a mutex that is never locked: the cache reaches it only through
    /// `&mut self` ([`FileState::map`], `Mutex::get_mut`, no atomics). Maps need only be
    /// `Send`; this makes the cache `Sync` all the same (`&PageCache` only reads counters and
    /// page states, never the map).
    map: Mutex<Box<dyn BlockMap>>,
    pub(crate) block_size: u64,
    pub(crate) size: u64,
    /// Cached pages: page index → frame index (the page itself is in the cache's slots).
    pub(crate) pages: PageIndex,
    pub(crate) ra: Readahead,
    /// Dirty pages.
    pub(crate) dirty: usize,
    /// When the file went from no dirty page to some (the oldest file is written back first).
    pub(crate) dirtied: Option<Ticks>,
    /// Where the next background write-back of the file starts (it goes round the file).
    pub(crate) wb_next: u64,
    /// Which of the files its slot has had this one is (see [`FileId`]).
    pub(crate) generation: u32,
    /// First write error since the last sync: (page, error).
    pub(crate) write_error: Option<(u64, PageError)>,
}

impl FileState {
    /// The file's block map.
    pub(crate) fn map(&mut self) -> &mut dyn BlockMap {
        // Never locked, so never poisoned; `into_inner` keeps this total all the same.
        &mut **self.map.get_mut().unwrap_or_else(|e| e.into_inner())
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
    pub(crate) file: FileId,
    pub(crate) op: IoOp,
    pub(crate) slba: u64,
    pub(crate) lbas: u32,
    pub(crate) target: Target,
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
    pub(crate) capacity: usize,
    /// Largest readahead window in pages ([`CacheOptions::readahead_max`] resolved).
    pub(crate) ra_window_max: u64,
    /// Most readahead windows in flight ([`CacheOptions::readahead_depth`] resolved).
    pub(crate) ra_depth: u64,
    /// Commands submitted since the device was last kicked (held back, see
    /// [`CacheOptions::kick_batch`]).
    pub(crate) unkicked: usize,
    /// Held commands that go at once ([`CacheOptions::kick_batch`] resolved).
    pub(crate) kick_batch: usize,
    /// Held commands go at once when fewer than this many are in flight before them.
    pub(crate) kick_low: usize,
    pub(crate) files: Vec<Option<FileState>>,
    /// By slot of `files`: the generation of its file, or of the next one it will have.
    pub(crate) generations: Vec<u32>,
    pub(crate) inflight: HashMap<u64, InFlight>,
    pub(crate) next_tag: u64,
    /// The cached pages, by frame index: a frame holds at most one page, so its state lives
    /// with the frame (as Linux keeps it in `struct page`) and the per-file index is small.
    pub(crate) slots: Vec<Page>,
    /// The LRU list through the slots, least recently used at the head: each frame's
    /// neighbours (frame indexes, [`NIL`] at the ends).
    pub(crate) lru_head: u32,
    pub(crate) lru_tail: u32,
    pub(crate) lru_prev: Vec<u32>,
    pub(crate) lru_next: Vec<u32>,
    /// Pages cached now.
    pub(crate) cached: usize,
    /// Frames of evicted pages, kept for the next pages instead of going back to the pool
    /// (returned to it when a file is closed and when the cache is dropped).
    pub(crate) spare: VecDeque<FrameId>,
    /// Frames taken from the pool in a batch and not used yet (in pool order, next last):
    /// one lock of the pool per batch rather than per page.
    pub(crate) stash: Vec<FrameId>,
    /// Frames of pages dropped from the cache while a [`PageRef`] still held them: they go
    /// back to the pool once nobody views them.
    pub(crate) viewed_out: Vec<FrameId>,
    /// Frames of a run of pages that a read is about to hand out, held from eviction while
    /// the read waits for the pages after them (empty otherwise).
    pub(crate) held_run: std::ops::Range<u32>,
    pub(crate) stats: CacheStats,
    /// Where callers' time went, in ticks (see [`PageCache::stats`]).
    pub(crate) timed: Timed,
    pub(crate) flush_results: HashMap<u64, Result<(), IoError>>,
    /// Pages of failed multi-page reads, to read again one by one.
    pub(crate) retry: Vec<(FileId, Vec<u64>)>,
    pub(crate) in_retry: bool,
    /// Dirty pages of all files.
    pub(crate) dirty: usize,
    /// Pages carried by write commands in flight (a per-block command counts one).
    pub(crate) writing: usize,
    /// [`CacheOptions::dirty_background`] resolved.
    pub(crate) dirty_background: usize,
    /// [`CacheOptions::dirty_limit`] resolved.
    pub(crate) dirty_limit: usize,
    /// When writers next look for expired dirty pages (time-stamp counter: in a guest whose
    /// clock source is emulated, `Instant::now()` is a system call and a device access).
    pub(crate) next_expiry_check: Ticks,
}

impl<D: BlockIo> PageCache<D> {
    /// A cache over `dev` whose pages are the frames of `pool`.
    pub fn new(mut dev: D, pool: PagePool, opts: CacheOptions) -> Result<PageCache<D>, MpageError> {
        let lba_size = dev.lba_size();
        let max = dev.max_transfer();
        if (max as u64) < PAGE {
            return Err(MpageError::MaxTransferTooSmall {
                dev: dev.name().to_string(),
                max,
            });
        }
        let max_cmd_bytes = (max as u64).min(MAX_LBAS_PER_COMMAND as u64 * lba_size as u64);
        // Write-back timestamps are time-stamp counter ticks: have the rate learnt by the
        // first look for expired pages.
        rnvme_driver::clock::start_learning_rate();
        let capacity = opts
            .capacity
            .unwrap_or(usize::MAX)
            .min(pool.frames())
            .max(1);
        let frames = pool.frames();
        let slots = (0..frames)
            .map(|i| Page::vacant(FrameId::from_index(i)))
            .collect();
        let cmd_pages = (max_cmd_bytes / PAGE).clamp(1, 512);
        // Neither a window nor the windows in flight can be more pages than the cache has.
        let ra_window_max = match opts.readahead_max {
            0 => cmd_pages,
            n => n,
        }
        .min(capacity as u64);
        let ra_depth = match opts.readahead_depth {
            0 => (dev.queue_depth() as u64 / 2).clamp(1, 16),
            n => n,
        }
        .min(capacity as u64);
        // The cache kicks the device for what it submits; polls then only reap (a device
        // that cannot hold commands until a kick delivers them sooner, which is harmless).
        dev.set_kick_only();
        let kick_batch = match opts.kick_batch {
            0 => (ra_depth as usize / 2).max(1),
            n => n,
        };
        let kick_low = (ra_depth as usize / 2).max(1);
        // Linux's defaults are 10 % and 20 % of memory; a cache of its own can let more of its
        // frames be dirty before writers wait.
        let dirty_background = match opts.dirty_background {
            0 => (capacity / 4).max(1),
            n => n,
        };
        let dirty_limit = match opts.dirty_limit {
            0 => (capacity / 2).max(1),
            n => n,
        };
        Ok(PageCache {
            dev,
            pool,
            lba_size,
            max_cmd_bytes,
            capacity,
            ra_window_max,
            ra_depth,
            unkicked: 0,
            kick_batch,
            kick_low,
            files: Vec::new(),
            generations: Vec::new(),
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
            held_run: 0..0,
            stats: CacheStats::default(),
            timed: Timed::default(),
            flush_results: HashMap::new(),
            retry: Vec::new(),
            in_retry: false,
            dirty: 0,
            writing: 0,
            dirty_background,
            dirty_limit,
            // The first look is at the first write; the tick rate is learnt meanwhile.
            next_expiry_check: Ticks(0),
            opts,
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
        // The times are counted in time-stamp counter ticks (a register read where the
        // cache counts them, once per run, wait or kick) and converted here.
        let rate = rnvme_driver::clock::learned_rate()
            .unwrap_or_else(|| TickRate::calibrate(std::time::Duration::from_millis(2)));
        CacheStats {
            device_wait_ns: rate.nanos(self.timed.wait),
            doorbell_ns: rate.nanos(self.timed.doorbell),
            copy_out_ns: rate.nanos(self.timed.copy),
            ..self.stats
        }
    }

    /// Zero the counters.
    pub fn reset_stats(&mut self) {
        self.stats = CacheStats::default();
        self.timed = Timed::default();
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
        match self.files.get(f.slot()).and_then(Option::as_ref) {
            Some(fs) if fs.generation == f.generation() => Ok(fs),
            _ => Err(MpageError::NoSuchFile(f)),
        }
    }

    pub(crate) fn file_mut(&mut self, f: FileId) -> Result<&mut FileState, MpageError> {
        match self.files.get_mut(f.slot()).and_then(Option::as_mut) {
            Some(fs) if fs.generation == f.generation() => Ok(fs),
            _ => Err(MpageError::NoSuchFile(f)),
        }
    }

    /// The id of the file open in slot `i`.
    pub(crate) fn file_id(&self, i: usize) -> FileId {
        FileId::new(i as u32, self.generations[i])
    }

    /// A page the caller knows is cached.
    pub(crate) fn page_mut(&mut self, f: FileId, p: u64) -> &mut Page {
        let fr = self.files[f.slot()]
            .as_ref()
            .and_then(|fs| fs.pages.get(p))
            .expect("page is cached");
        self.slot_mut(fr)
    }

    #[inline(always)]
    pub(crate) fn page_ref(&self, f: FileId, p: u64) -> Option<&Page> {
        let fr = self.files.get(f.slot())?.as_ref()?.pages.get(p)?;
        let pg = &self.slots[fr as usize];
        pg.present.then_some(pg)
    }

    /// The page held by frame `fr`, which the caller knows holds one.
    pub(crate) fn slot(&self, fr: u32) -> &Page {
        let pg = &self.slots[fr as usize];
        assert!(pg.present, "frame {fr} holds no page");
        pg
    }

    pub(crate) fn slot_mut(&mut self, fr: u32) -> &mut Page {
        let pg = &mut self.slots[fr as usize];
        assert!(pg.present, "frame {fr} holds no page");
        pg
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
            dirty: p.dirty(),
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
        let fs = self.file(f)?;
        let mut pages = Vec::with_capacity(fs.pages.len());
        pages.extend(fs.pages.iter().map(|(p, _)| p));
        Ok(pages)
    }

    /// Dirty pages of all files.
    pub(crate) fn dirty_total(&self) -> usize {
        self.dirty
    }

    /// Number of dirty pages of a file.
    pub fn dirty_pages(&self, f: FileId) -> Result<usize, MpageError> {
        let fs = self.file(f)?;
        debug_assert_eq!(
            fs.dirty,
            fs.pages
                .iter()
                .filter(|&(_, fr)| self.slot(fr).dirty())
                .count(),
            "file {f}: dirty pages miscounted"
        );
        Ok(fs.dirty)
    }

    // ---- files ------------------------------------------------------------------------

    /// Open a file of `size` bytes whose blocks `map` knows. Its block size must be a power
    /// of two, a multiple of the device's LBA size and at most a page.
    pub fn open(&mut self, map: Box<dyn BlockMap>, size: u64) -> Result<FileId, MpageError> {
        check_size(size)?;
        let block_size = map.block_size();
        check_block_size(block_size, self.lba_size).map_err(|why| MpageError::BadBlockSize {
            dev: self.dev.name().to_string(),
            block_size,
            why,
        })?;
        let st = FileState {
            map: Mutex::new(map),
            block_size: block_size as u64,
            size,
            pages: PageIndex::default(),
            ra: Readahead::default(),
            dirty: 0,
            dirtied: None,
            wb_next: 0,
            write_error: None,
            generation: 0,
        };
        // A slot used before has the generation after its last file's (`close` moves it
        // on): ids of the files closed before name no file.
        let slot = match self.files.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.files.push(None);
                self.generations.push(0);
                self.files.len() - 1
            }
        };
        let generation = self.generations[slot];
        self.files[slot] = Some(FileState { generation, ..st });
        Ok(FileId::new(slot as u32, generation))
    }

    /// Sync a file and drop its pages. On a sync error the file stays open (and its dirty
    /// pages cached) so nothing is lost.
    pub fn close(&mut self, f: FileId) -> Result<(), MpageError> {
        self.sync(f)?;
        let pages = self.cached_pages(f)?;
        for p in pages {
            self.remove_page(f, p);
        }
        self.files[f.slot()] = None;
        self.generations[f.slot()] = f.generation().wrapping_add(1);
        self.release_spare();
        Ok(())
    }

    /// Sync and close every open file: what to call before dropping the cache, whose `Drop`
    /// writes dirty pages back too but cannot return an error, only log it (as `BufWriter`
    /// needs a `flush`). Returns the first error; a file whose sync failed stays open with its
    /// dirty pages (call again once the device recovers), the others are closed.
    pub fn shutdown(&mut self) -> Result<(), MpageError> {
        let mut first = None;
        for i in 0..self.files.len() {
            if self.files[i].is_some() {
                if let Err(e) = self.close(self.file_id(i)) {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Files open now.
    pub fn open_files(&self) -> usize {
        self.files.iter().flatten().count()
    }

    /// Dirty pages of every open file, not yet written back: what dropping the cache now would
    /// lose.
    pub fn unsynced_pages(&self) -> usize {
        self.dirty_total()
    }

    // ---- write-back -------------------------------------------------------------------

    /// Start writing back the dirty pages of a file; returns how many were taken.
    pub fn start_writeback(&mut self, f: FileId) -> Result<usize, MpageError> {
        let pages: Vec<u64> = self
            .file(f)?
            .pages
            .iter()
            .filter(|&(_, fr)| {
                let pg = self.slot(fr);
                pg.dirty() && !pg.busy()
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
        self.kick();
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
        check_size(len)?;
        match len.cmp(&size) {
            std::cmp::Ordering::Greater => self.grow(f, len),
            std::cmp::Ordering::Less => self.shrink(f, len),
            std::cmp::Ordering::Equal => Ok(()),
        }
    }

    pub(crate) fn drop_pages_from(&mut self, f: FileId, first: u64) -> Result<(), MpageError> {
        for p in self.settle_pages_from(f, first)? {
            self.remove_page(f, p);
        }
        Ok(())
    }

    /// The cached pages of `f` from `first` on, once none of them has I/O in flight (waiting
    /// for it if one has): ready to be removed.
    fn settle_pages_from(&mut self, f: FileId, first: u64) -> Result<Vec<u64>, MpageError> {
        let pages: Vec<u64> = self
            .file(f)?
            .pages
            .iter_from(first)
            .map(|(p, _)| p)
            .collect();
        if pages
            .iter()
            .any(|&p| self.page_ref(f, p).is_some_and(Page::busy))
        {
            self.wait_idle()?;
        }
        Ok(pages)
    }

    pub(crate) fn truncate_map(&mut self, f: FileId, first_block: u64) -> Result<(), MpageError> {
        self.file_mut(f)?
            .map()
            .truncate(first_block)
            .map_err(|source| MpageError::Truncate { file: f, source })
    }

    pub(crate) fn grow(&mut self, f: FileId, new_size: u64) -> Result<(), MpageError> {
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

    pub(crate) fn shrink(&mut self, f: FileId, new_size: u64) -> Result<(), MpageError> {
        let geo = self.geo(f)?;
        // Whatever may fail comes first, so that a failure leaves the file as it was (its
        // size, its pages, its dirty data): the page holding the new end made ready, the
        // pages past it idle, the map truncated. Only then is anything dropped or zeroed.
        let tail = (new_size % PAGE) as usize;
        let p = new_size / PAGE;
        // The block holding the new end keeps file data before it and must hold zeros after
        // it, on disk too: read it, zero its tail, dirty it. A page whose blocks end at the
        // new end only has its cached bytes past the end zeroed (those blocks are released).
        let partial_block = tail != 0 && !new_size.is_multiple_of(geo.bs);
        if partial_block {
            self.prepare_write(f, p, tail, PAGE_SIZE - tail, geo.size)?;
        } else if tail != 0 {
            self.wait_page(f, p)?;
            if let Some(frame) = self.page_ref(f, p).map(|pg| pg.frame) {
                self.check_not_viewed(f, p, frame)?;
            }
        }
        // Pages past the new end go: no point writing them back.
        let gone = self.settle_pages_from(f, new_size.div_ceil(PAGE))?;
        self.truncate_map(f, new_size.div_ceil(geo.bs))?;
        for q in gone {
            self.remove_page(f, q);
        }
        if tail != 0 {
            if let Some(frame) = self.page_ref(f, p).map(|pg| pg.frame) {
                self.pool.zero(frame, tail, PAGE_SIZE - tail);
                if partial_block {
                    self.mark_written(f, p, tail, PAGE_SIZE - tail, geo.bpp);
                }
            }
        }
        self.file_mut(f)?.size = new_size;
        Ok(())
    }
}

impl<D: BlockIo> Drop for PageCache<D> {
    /// Writes back and flushes the files with dirty pages, as `BufWriter` flushes on drop:
    /// on a best-effort basis, a failure only logged ([`PageCache::shutdown`] is how to
    /// learn of it), and not while unwinding from a panic (the cache's own state may be what
    /// went wrong). Then waits for commands in flight (the device may still be moving data
    /// into the frames); dirty pages still unwritten are lost, and said so in the log.
    fn drop(&mut self) {
        self.release_spare();
        if self.dirty_total() > 0 && !std::thread::panicking() {
            for i in 0..self.files.len() {
                let f = self.file_id(i);
                if self.files[i].as_ref().is_some_and(|fs| fs.dirty > 0) {
                    if let Err(e) = self.sync(f) {
                        log::error!(
                            "{}: dropping the page cache: write-back of file {f} failed: {e}",
                            self.dev.name()
                        );
                    }
                }
            }
        }
        if let Err(e) = self.wait_idle() {
            log::error!(
                "{}: dropping the page cache with commands in flight: {e}",
                self.dev.name()
            );
        }
        let dirty = self.dirty_total();
        if dirty > 0 {
            log::warn!(
                "{}: dropping the page cache with {dirty} dirty page(s) never written",
                self.dev.name()
            );
        }
    }
}
