//! A page cache shared by threads: [`SharedCache`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::backend::BlockIo;
use crate::cache::{CacheOptions, CacheStats, FileId, PageCache};
use crate::error::MpageError;
use crate::map::BlockMap;
use crate::page::{PageRef, PageState};
use crate::pool::PagePool;

/// Bits of a [`FileId`] that number the file inside its shard; the bits above name the shard.
const LOCAL_BITS: u32 = 24;
/// Most shards: what the top 8 bits of a [`FileId`] can name.
pub const MAX_SHARDS: usize = 1 << (32 - LOCAL_BITS);

struct Shard<D: BlockIo> {
    cache: Mutex<PageCache<D>>,
    /// Files open in this shard (to place new ones).
    files: AtomicUsize,
}

/// A page cache shared by threads.
///
/// [`SharedCache`] is `Sync`: any thread calls any operation through `&self`. It is made of
/// shards, each a [`PageCache`] with a device queue of its own (one I/O queue pair each,
/// never shared) and its own LRU and dirty pages, behind its own lock; a file lives in one
/// shard, chosen when it is opened (the one with the fewest open files, or the one asked
/// for). So:
///
/// - threads working on files of different shards never wait for each other: each submits
///   on its shard's queue pair and reaps its own completions, with nothing shared on the
///   I/O path but the frame pool's free list;
/// - calls on the files of one shard take turns, one call at a time, whole (the way a file
///   system serialises calls on one inode): a page is never read while its I/O is in flight
///   nor written by two threads at once, and each call sees the effects of every call that
///   finished before it, whichever thread made it;
/// - the cache's pages are split evenly between the shards (as sharded caches such as
///   RocksDB's split their capacity): each shard evicts from its own LRU.
///
/// Give it as many queues as threads that work at once, and open at least as many files:
/// with one shard per thread, threads on different files run side by side.
pub struct SharedCache<D: BlockIo> {
    shards: Box<[Shard<D>]>,
}

impl<D: BlockIo> SharedCache<D> {
    /// A cache with one shard per device queue in `queues` (all queues of the same
    /// namespace), whose pages are the frames of `pool`, split evenly between the shards.
    pub fn new(
        queues: Vec<D>,
        pool: PagePool,
        opts: CacheOptions,
    ) -> Result<SharedCache<D>, MpageError> {
        if queues.is_empty() || queues.len() > MAX_SHARDS {
            return Err(MpageError::Shards {
                given: queues.len(),
                max: MAX_SHARDS,
            });
        }
        let total = opts.capacity.unwrap_or(usize::MAX).min(pool.frames());
        let each = (total / queues.len()).max(1);
        let shards = queues
            .into_iter()
            .map(|q| {
                let opts = CacheOptions {
                    capacity: Some(each),
                    ..opts.clone()
                };
                Ok(Shard {
                    cache: Mutex::new(PageCache::new(q, pool.clone(), opts)?),
                    files: AtomicUsize::new(0),
                })
            })
            .collect::<Result<Vec<_>, MpageError>>()?;
        Ok(SharedCache {
            shards: shards.into_boxed_slice(),
        })
    }

    /// Number of shards (device queues).
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    fn lock(&self, shard: usize) -> Result<MutexGuard<'_, PageCache<D>>, MpageError> {
        // A thread that panicked inside a cache call may have left its shard half updated
        // (a page locked for I/O that was never submitted, say): refuse to go on with it.
        self.shards[shard]
            .cache
            .lock()
            .map_err(|_| MpageError::Poisoned { shard })
    }

    /// The shard and the shard's own id of `f`.
    fn locate(&self, f: FileId) -> Result<(usize, FileId), MpageError> {
        let shard = (f.raw_slot() >> LOCAL_BITS) as usize;
        if shard >= self.shards.len() {
            return Err(MpageError::NoSuchFile(f));
        }
        let local = FileId::new(f.raw_slot() & ((1 << LOCAL_BITS) - 1), f.generation());
        Ok((shard, local))
    }

    /// Run `op` on the shard holding `f`, with the shard's id of the file.
    fn with<R>(
        &self,
        f: FileId,
        op: impl FnOnce(&mut PageCache<D>, FileId) -> Result<R, MpageError>,
    ) -> Result<R, MpageError> {
        let (shard, local) = self.locate(f)?;
        let mut cache = self.lock(shard)?;
        op(&mut cache, local).map_err(|e| match e {
            // Errors name the file as the caller knows it.
            MpageError::NoSuchFile(_) => MpageError::NoSuchFile(f),
            e => e,
        })
    }

    /// Open a file of `size` bytes whose blocks `map` knows, in the shard with the fewest
    /// open files.
    pub fn open(&self, map: Box<dyn BlockMap>, size: u64) -> Result<FileId, MpageError> {
        let shard = (0..self.shards.len())
            .min_by_key(|&i| self.shards[i].files.load(Ordering::Relaxed))
            .unwrap_or(0);
        self.open_in(shard, map, size)
    }

    /// Open a file in shard `shard` (for callers that place files themselves: a thread's
    /// own files in its own shard).
    pub fn open_in(
        &self,
        shard: usize,
        map: Box<dyn BlockMap>,
        size: u64,
    ) -> Result<FileId, MpageError> {
        if shard >= self.shards.len() {
            return Err(MpageError::Shards {
                given: shard + 1,
                max: self.shards.len(),
            });
        }
        let mut cache = self.lock(shard)?;
        let local = cache.open(map, size)?;
        if local.raw_slot() >= 1 << LOCAL_BITS {
            cache.close(local)?;
            return Err(MpageError::TooManyFiles {
                max: 1 << LOCAL_BITS,
            });
        }
        self.shards[shard].files.fetch_add(1, Ordering::Relaxed);
        Ok(FileId::new(
            ((shard as u32) << LOCAL_BITS) | local.raw_slot(),
            local.generation(),
        ))
    }

    /// The shard a file lives in.
    pub fn shard_of(&self, f: FileId) -> Result<usize, MpageError> {
        Ok(self.locate(f)?.0)
    }

    /// Sync and close every open file of every shard (see [`PageCache::shutdown`]): call it
    /// before dropping the cache. Returns the first error; files whose sync failed stay open.
    pub fn shutdown(&self) -> Result<(), MpageError> {
        let mut first = None;
        for (i, shard) in self.shards.iter().enumerate() {
            let r = self.lock(i).and_then(|mut c| {
                let r = c.shutdown();
                shard.files.store(c.open_files(), Ordering::Relaxed);
                r
            });
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Dirty pages not yet written back, in every shard.
    pub fn unsynced_pages(&self) -> Result<usize, MpageError> {
        let mut n = 0;
        for i in 0..self.shards.len() {
            n += self.lock(i)?.unsynced_pages();
        }
        Ok(n)
    }

    /// [`PageCache::sync_range`].
    pub fn sync_range(&self, f: FileId, offset: u64, len: u64) -> Result<(), MpageError> {
        self.with(f, |c, l| c.sync_range(l, offset, len))
    }

    /// [`PageCache::tick`] on every shard (a shard another thread holds is skipped: that
    /// thread is doing the work). Returns the pages it started writing.
    pub fn tick(&self) -> Result<usize, MpageError> {
        let mut n = 0;
        for (i, shard) in self.shards.iter().enumerate() {
            let mut c = match shard.cache.try_lock() {
                Ok(c) => c,
                Err(std::sync::TryLockError::WouldBlock) => continue,
                Err(std::sync::TryLockError::Poisoned(_)) => {
                    return Err(MpageError::Poisoned { shard: i })
                }
            };
            n += c.tick()?;
        }
        Ok(n)
    }

    /// Sync a file and drop its pages (see [`PageCache::close`]).
    pub fn close(&self, f: FileId) -> Result<(), MpageError> {
        let (shard, _) = self.locate(f)?;
        self.with(f, |c, l| c.close(l))?;
        self.shards[shard].files.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`PageCache::read_at`].
    pub fn read_at(&self, f: FileId, offset: u64, buf: &mut [u8]) -> Result<usize, MpageError> {
        self.with(f, |c, l| c.read_at(l, offset, buf))
    }

    /// [`PageCache::read_with`]: the shard stays locked while `visit` runs.
    pub fn read_with(
        &self,
        f: FileId,
        offset: u64,
        len: usize,
        visit: impl FnMut(u64, &[u8]),
    ) -> Result<usize, MpageError> {
        self.with(f, |c, l| c.read_with(l, offset, len, visit))
    }

    /// [`PageCache::page`]: the page is held in place, the shard is not locked meanwhile.
    pub fn page(&self, f: FileId, page: u64) -> Result<Option<PageRef>, MpageError> {
        self.with(f, |c, l| c.page(l, page))
    }

    /// [`PageCache::write_at`].
    pub fn write_at(&self, f: FileId, offset: u64, data: &[u8]) -> Result<usize, MpageError> {
        self.with(f, |c, l| c.write_at(l, offset, data))
    }

    /// [`PageCache::readahead`].
    pub fn readahead(&self, f: FileId, start: u64, pages: u64) -> Result<(), MpageError> {
        self.with(f, |c, l| c.readahead(l, start, pages))
    }

    /// [`PageCache::sync`].
    pub fn sync(&self, f: FileId) -> Result<(), MpageError> {
        self.with(f, |c, l| c.sync(l))
    }

    /// [`PageCache::set_len`].
    pub fn set_len(&self, f: FileId, len: u64) -> Result<(), MpageError> {
        self.with(f, |c, l| c.set_len(l, len))
    }

    /// [`PageCache::file_size`].
    pub fn file_size(&self, f: FileId) -> Result<u64, MpageError> {
        self.with(f, |c, l| c.file_size(l))
    }

    /// [`PageCache::page_state`].
    pub fn page_state(&self, f: FileId, page: u64) -> Result<Option<PageState>, MpageError> {
        self.with(f, |c, l| Ok(c.page_state(l, page)))
    }

    /// [`PageCache::dirty_pages`].
    pub fn dirty_pages(&self, f: FileId) -> Result<usize, MpageError> {
        self.with(f, |c, l| c.dirty_pages(l))
    }

    /// Run `op` on the shard holding `f` with the shard's id of the file, for what the
    /// shared cache does not wrap: the shard is locked meanwhile.
    pub fn with_file<R>(
        &self,
        f: FileId,
        op: impl FnOnce(&mut PageCache<D>, FileId) -> Result<R, MpageError>,
    ) -> Result<R, MpageError> {
        self.with(f, op)
    }

    /// The counters of all shards, added up.
    pub fn stats(&self) -> Result<CacheStats, MpageError> {
        let mut total = CacheStats::default();
        for i in 0..self.shards.len() {
            total.add(&self.lock(i)?.stats());
        }
        Ok(total)
    }

    /// Zero the counters of every shard.
    pub fn reset_stats(&self) -> Result<(), MpageError> {
        for i in 0..self.shards.len() {
            self.lock(i)?.reset_stats();
        }
        Ok(())
    }

    /// The counters of one shard.
    pub fn shard_stats(&self, shard: usize) -> Result<CacheStats, MpageError> {
        Ok(self.lock(shard)?.stats())
    }
}
