//! Device access for the file system: a device shared between the page cache and the
//! metadata reader, the metadata reader itself, and a device that only counts commands.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rnvme_driver::clock::Stopwatch;
use rnvme_driver::Segment;

use super::ExtError;
use crate::backend::{BlockIo, IoError, IoOp, IoRequest};
use crate::pool::{FrameId, PagePool, PAGE_SIZE};

type Completion = (u64, Result<(), IoError>);

struct Hub<D> {
    dev: D,
    next_tag: u64,
    next_client: u32,
    /// Device tag → (client, client's tag).
    routes: HashMap<u64, (u32, u64)>,
    /// Completions waiting for the client that submitted them (live clients only).
    done: HashMap<u32, VecDeque<Completion>>,
}

/// One device shared by several users, each through its own handle.
///
/// **Why.** [`crate::PageCache`] owns its device, but a block map must read metadata
/// (extent index nodes, indirect blocks) while the cache is in the middle of a read. A
/// `SharedDevice` puts one device behind a mutex and hands out handles ([`SharedDevice::share`]);
/// each handle is a [`BlockIo`] with its own tag space: completions are routed back to the
/// handle that submitted the command, so the metadata reader never sees (or steals) the
/// cache's completions and the other way round. The lock is held only inside one `submit`,
/// `kick` or `poll` call, never across calls, so the cache calling into the map that calls
/// into the reader cannot deadlock. One queue pair thus serves both, and the same code runs
/// on a controller ([`crate::NvmeBlockIo`]) and on the in-memory [`crate::RecordingDevice`],
/// whose command log then shows data and metadata reads in the order the device got them.
pub struct SharedDevice<D: BlockIo> {
    hub: Arc<Mutex<Hub<D>>>,
    client: u32,
    name: String,
    lba_size: u32,
    max_transfer: u32,
}

impl<D: BlockIo> SharedDevice<D> {
    /// Share `dev`; this is the first handle.
    pub fn new(dev: D) -> SharedDevice<D> {
        let name = dev.name().to_string();
        let (lba_size, max_transfer) = (dev.lba_size(), dev.max_transfer());
        let mut done = HashMap::new();
        done.insert(0, VecDeque::new());
        SharedDevice {
            hub: Arc::new(Mutex::new(Hub {
                dev,
                next_tag: 1,
                next_client: 1,
                routes: HashMap::new(),
                done,
            })),
            client: 0,
            name,
            lba_size,
            max_transfer,
        }
    }

    /// Another handle to the same device, with a tag space of its own.
    pub fn share(&self) -> SharedDevice<D> {
        let mut hub = self.lock();
        let client = hub.next_client;
        hub.next_client += 1;
        hub.done.insert(client, VecDeque::new());
        SharedDevice {
            hub: Arc::clone(&self.hub),
            client,
            name: self.name.clone(),
            lba_size: self.lba_size,
            max_transfer: self.max_transfer,
        }
    }

    /// Run `f` on the device, to inspect it or change its settings. Commands submitted
    /// directly to it bypass the routing: their completions are dropped.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.lock().dev)
    }

    fn lock(&self) -> MutexGuard<'_, Hub<D>> {
        // Every update under the lock leaves the routing tables consistent (a panic inside
        // the device's own code leaves at most a route whose completion never comes).
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D: BlockIo> Drop for SharedDevice<D> {
    fn drop(&mut self) {
        // Completions still to come for this handle are dropped when they arrive.
        self.lock().done.remove(&self.client);
    }
}

impl<D: BlockIo> BlockIo for SharedDevice<D> {
    fn name(&self) -> &str {
        &self.name
    }

    fn lba_size(&self) -> u32 {
        self.lba_size
    }

    fn max_transfer(&self) -> u32 {
        self.max_transfer
    }

    fn submit(&mut self, req: &IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        let mut hub = self.lock();
        let dtag = hub.next_tag;
        hub.dev.submit(req, dtag)?;
        hub.next_tag += 1;
        hub.routes.insert(dtag, (self.client, tag));
        Ok(())
    }

    fn kick(&mut self) {
        self.lock().dev.kick();
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        let mine: Vec<Completion> = {
            let mut hub = self.lock();
            let Hub {
                dev,
                routes,
                done: queues,
                ..
            } = &mut *hub;
            dev.poll(&mut |dtag, r| match routes.remove(&dtag) {
                Some((client, tag)) => {
                    if let Some(q) = queues.get_mut(&client) {
                        q.push_back((tag, r));
                    }
                }
                None => log::warn!("completion for unknown device tag {dtag} ignored"),
            });
            queues
                .get_mut(&self.client)
                .map(|q| q.drain(..).collect())
                .unwrap_or_default()
        };
        let n = mine.len();
        for (tag, r) in mine {
            done(tag, r);
        }
        n
    }
}

/// A device that completes every command at once and moves no data: the page cache run on
/// it issues exactly the commands it would issue on the real device (same LBA size and max
/// transfer), which is how a full read is planned without reading anything.
pub struct PlanDevice {
    name: String,
    lba_size: u32,
    max_transfer: u32,
    queue: VecDeque<u64>,
}

impl PlanDevice {
    /// A stand-in for a device with these limits.
    pub fn new(name: &str, lba_size: u32, max_transfer: u32) -> PlanDevice {
        PlanDevice {
            name: format!("dry run of {name}"),
            lba_size,
            max_transfer,
            queue: VecDeque::new(),
        }
    }
}

impl BlockIo for PlanDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn lba_size(&self) -> u32 {
        self.lba_size
    }
    fn max_transfer(&self) -> u32 {
        self.max_transfer
    }
    fn submit(&mut self, _req: &IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        self.queue.push_back(tag);
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        let n = self.queue.len();
        for tag in self.queue.drain(..) {
            done(tag, Ok(()));
        }
        n
    }
}

/// Counters of the metadata reader.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetaStats {
    /// Read commands issued for metadata.
    pub reads: u64,
    /// Bytes those commands read.
    pub bytes: u64,
    /// Metadata blocks found in the reader's block cache (no command needed).
    pub cache_hits: u64,
}

impl MetaStats {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &MetaStats) -> MetaStats {
        MetaStats {
            reads: self.reads - earlier.reads,
            bytes: self.bytes - earlier.bytes,
            cache_hits: self.cache_hits - earlier.cache_hits,
        }
    }
}

/// Most metadata blocks kept.
const BLOCK_CACHE: usize = 512;
/// How long a metadata read may take.
const META_TIMEOUT: Duration = Duration::from_secs(30);

/// Synchronous reads of metadata through a [`BlockIo`], one bounce frame from the page pool
/// at a time, with a small LRU cache of file system blocks.
pub(crate) struct MetaReader {
    io: Box<dyn BlockIo + Send>,
    pool: PagePool,
    frame: FrameId,
    /// A read timed out: the device may still write the frame, so it is never given back.
    frame_lost: bool,
    lba_size: u32,
    /// File system block size (0 until the superblock is read).
    block_size: u32,
    blocks: HashMap<u64, (Arc<[u8]>, u64)>,
    lru: BTreeMap<u64, u64>,
    clock: u64,
    next_tag: u64,
    stats: MetaStats,
}

impl MetaReader {
    pub(crate) fn new(io: Box<dyn BlockIo + Send>, pool: PagePool) -> Result<MetaReader, ExtError> {
        let lba_size = io.lba_size();
        if lba_size as usize > PAGE_SIZE || !lba_size.is_power_of_two() {
            return Err(ExtError::LbaSize {
                dev: io.name().to_string(),
                lba_size,
            });
        }
        let frame = pool.alloc().ok_or_else(|| ExtError::NoFrame {
            dev: io.name().to_string(),
        })?;
        Ok(MetaReader {
            io,
            pool,
            frame,
            frame_lost: false,
            lba_size,
            block_size: 0,
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            next_tag: 1,
            stats: MetaStats::default(),
        })
    }

    pub(crate) fn lba_size(&self) -> u32 {
        self.lba_size
    }

    pub(crate) fn max_transfer(&self) -> u32 {
        self.io.max_transfer()
    }

    pub(crate) fn stats(&self) -> MetaStats {
        self.stats
    }

    pub(crate) fn set_block_size(&mut self, bs: u32) {
        debug_assert!(bs as usize <= PAGE_SIZE && bs.is_power_of_two());
        self.block_size = bs;
        self.blocks.clear();
        self.lru.clear();
    }

    /// Read `buf.len()` bytes at byte `offset` of the namespace (uncached).
    pub(crate) fn read_bytes(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ExtError> {
        let ls = self.lba_size as u64;
        let per_cmd = PAGE_SIZE as u64 / ls;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (lba, skip) = (pos / ls, (pos % ls) as usize);
            let want = buf.len() - done;
            let lbas = ((skip + want) as u64).div_ceil(ls).min(per_cmd);
            self.read_lbas(lba, lbas as u32, pos)?;
            let n = want.min(lbas as usize * ls as usize - skip);
            self.pool.read(self.frame, skip, &mut buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// One read command of `lbas` LBAs at `slba` into the bounce frame; waits for it.
    fn read_lbas(&mut self, slba: u64, lbas: u32, offset: u64) -> Result<(), ExtError> {
        let len = lbas * self.lba_size;
        let pool = self.pool.clone();
        let segs = [pool
            .slice_of(Segment::new(pool.iova(self.frame), len))
            .map_err(|e| ExtError::Io {
                dev: self.io.name().to_string(),
                offset,
                len: len as usize,
                source: IoError::Rejected {
                    dev: self.io.name().to_string(),
                    reason: e.to_string(),
                },
            })?];
        let req = IoRequest {
            op: IoOp::Read,
            slba,
            lbas,
            segments: &segs,
            pages: &[],
            fallback: false,
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        let started = Stopwatch::start();
        let io_err = |dev: &str, source| ExtError::Io {
            dev: dev.to_string(),
            offset,
            len: len as usize,
            source,
        };
        loop {
            match self.io.submit(&req, tag) {
                Ok(()) => break,
                Err(IoError::QueueFull) => {
                    // Others' commands fill the queue: let them complete.
                    self.io.kick();
                    self.io.poll(&mut |t, _| {
                        log::warn!("metadata reader: completion for foreign tag {t} ignored")
                    });
                    self.check_timeout(started, offset)?;
                }
                Err(e) => return Err(io_err(self.io.name(), e)),
            }
        }
        self.stats.reads += 1;
        self.stats.bytes += len as u64;
        self.io.kick();
        let mut result = None;
        let mut idle = 0u32;
        while result.is_none() {
            let n = self.io.poll(&mut |t, r| {
                if t == tag {
                    result = Some(r);
                } else {
                    log::warn!("metadata reader: completion for foreign tag {t} ignored");
                }
            });
            if n == 0 {
                idle += 1;
                if idle.is_multiple_of(256) {
                    self.check_timeout(started, offset)?;
                }
            }
        }
        match result {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(io_err(self.io.name(), e)),
            None => unreachable!("the loop ends with a result"),
        }
    }

    fn check_timeout(&mut self, since: Stopwatch, offset: u64) -> Result<(), ExtError> {
        if since.elapsed() < META_TIMEOUT {
            std::thread::yield_now();
            return Ok(());
        }
        self.frame_lost = true;
        Err(ExtError::Timeout {
            dev: self.io.name().to_string(),
            offset,
            ms: META_TIMEOUT.as_millis() as u64,
        })
    }

    /// Whether file system block `b` is in the block cache.
    pub(crate) fn is_cached(&self, b: u64) -> bool {
        self.blocks.contains_key(&b)
    }

    /// Block `b` if it is cached, without counting or reordering anything.
    pub(crate) fn peek(&self, b: u64) -> Option<Arc<[u8]>> {
        self.blocks.get(&b).map(|(d, _)| Arc::clone(d))
    }

    /// File system block `b`, from the cache or the device.
    pub(crate) fn block(&mut self, b: u64) -> Result<Arc<[u8]>, ExtError> {
        debug_assert!(self.block_size > 0, "block size set before block reads");
        self.clock += 1;
        let stamp = self.clock;
        if let Some((data, old)) = self.blocks.get_mut(&b) {
            let data = Arc::clone(data);
            self.lru.remove(old);
            *old = stamp;
            self.lru.insert(stamp, b);
            self.stats.cache_hits += 1;
            return Ok(data);
        }
        let bs = self.block_size as usize;
        let mut buf = vec![0u8; bs];
        self.read_bytes(b * bs as u64, &mut buf)?;
        let data: Arc<[u8]> = buf.into();
        if self.blocks.len() >= BLOCK_CACHE {
            let victims: Vec<u64> = self.lru.values().take(BLOCK_CACHE / 8).copied().collect();
            for v in victims {
                if let Some((_, s)) = self.blocks.remove(&v) {
                    self.lru.remove(&s);
                }
            }
        }
        self.blocks.insert(b, (Arc::clone(&data), stamp));
        self.lru.insert(stamp, b);
        Ok(data)
    }
}

impl Drop for MetaReader {
    fn drop(&mut self) {
        if self.frame_lost {
            log::error!(
                "{}: a metadata read never completed; its bounce frame is not returned to the pool",
                self.io.name()
            );
        } else {
            self.pool.free(self.frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::RecordingDevice;
    use rnvme_driver::dma::{Backing, DmaPool, DmaSlice};
    use rnvme_driver::hw::MemoryOnly;

    fn pool() -> PagePool {
        let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
        PagePool::new(&dma, 8).unwrap()
    }

    fn read(pool: &PagePool, frame: FrameId, slba: u64) -> (Vec<DmaSlice<'_>>, u64) {
        (vec![pool.slice(frame, 0, 512)], slba)
    }

    #[test]
    fn handles_get_their_own_completions_under_their_own_tags() {
        let pool = pool();
        let mut dev = RecordingDevice::new(pool.clone(), 512, 64);
        dev.write_bytes(512, &[1; 512]);
        dev.write_bytes(1024, &[2; 512]);
        let mut a = SharedDevice::new(dev);
        let mut b = a.share();
        let (fa, fb) = (pool.alloc().unwrap(), pool.alloc().unwrap());
        for (h, f, lba, tag) in [(&mut a, fa, 1, 7u64), (&mut b, fb, 2, 7u64)] {
            let (segs, slba) = read(&pool, f, lba);
            let req = IoRequest {
                op: IoOp::Read,
                slba,
                lbas: 1,
                segments: &segs,
                pages: &[],
                fallback: false,
            };
            h.submit(&req, tag).unwrap();
        }
        // b's poll completes both commands at the device but reports only its own.
        let mut got_b = Vec::new();
        assert_eq!(b.poll(&mut |t, r| got_b.push((t, r))), 1);
        assert_eq!(got_b, vec![(7, Ok(()))]);
        let mut got_a = Vec::new();
        assert_eq!(
            a.poll(&mut |t, r| got_a.push((t, r))),
            1,
            "a's completion waited"
        );
        assert_eq!(got_a, vec![(7, Ok(()))]);
        assert_eq!(a.poll(&mut |_, _| panic!("nothing left")), 0);
        assert_eq!(pool.frame_bytes(fa)[..512], [1; 512]);
        assert_eq!(pool.frame_bytes(fb)[..512], [2; 512]);
        assert_eq!(a.with_device(|d| d.commands().len()), 2);
    }

    #[test]
    fn the_metadata_reader_reads_unaligned_bytes_and_caches_blocks() {
        let pool = pool();
        let mut dev = RecordingDevice::new(pool.clone(), 4096, 16);
        let data: Vec<u8> = (0..16 * 4096).map(|i| (i % 251) as u8).collect();
        dev.write_bytes(0, &data);
        let shared = SharedDevice::new(dev);
        let free = pool.free_frames();
        let mut r = MetaReader::new(Box::new(shared.share()), pool.clone()).unwrap();
        assert_eq!(pool.free_frames(), free - 1, "one bounce frame");
        let mut buf = vec![0u8; 5000];
        r.read_bytes(1000, &mut buf).unwrap();
        assert_eq!(buf, data[1000..6000]);
        assert_eq!(r.stats().reads, 2, "LBAs 0 and 1, one command each");
        r.set_block_size(1024);
        let b = r.block(9).unwrap();
        assert_eq!(&b[..], &data[9 * 1024..10 * 1024]);
        assert!(r.is_cached(9) && !r.is_cached(10));
        r.block(9).unwrap();
        assert_eq!((r.stats().reads, r.stats().cache_hits), (3, 1));
        drop(r);
        assert_eq!(pool.free_frames(), free, "the frame goes back");
        let e = MetaReader::new(
            Box::new(SharedDevice::new(RecordingDevice::new(
                pool.clone(),
                8192,
                4,
            ))),
            pool.clone(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, ExtError::LbaSize { lba_size: 8192, .. }));
    }
}
