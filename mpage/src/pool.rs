//! The page pool: 2 MiB DMA buffers taken from the driver's pool once, at start-up, and carved
//! into 4 KiB frames.
//!
//! A frame is a (buffer, offset) pair; the device reaches it at `buffer.iova() + offset`. The
//! buffers are mapped for DMA when the pool is made, so the I/O path never maps anything. The
//! CPU touches frames through copies ([`PagePool::read`], [`PagePool::write`]) or through
//! views ([`PagePool::view`]): shared references to frame bytes that the driver hands out
//! only while no command may make the device write them, and that keep any such command from
//! being submitted (and the CPU from writing them) while they live.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rnvme_driver::dma::{DmaBuffer, DmaError, DmaLease, DmaPool, DmaSlice, DmaView};
use rnvme_driver::{Iova, Segment};

/// Bytes in a page (and in a frame).
pub const PAGE_SIZE: usize = 4096;
/// Bytes in one buffer taken from the DMA pool.
pub const CHUNK_BYTES: usize = 2 << 20;
/// Frames carved from one buffer.
pub const FRAMES_PER_CHUNK: usize = CHUNK_BYTES / PAGE_SIZE;

/// One 4 KiB page frame of a [`PagePool`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrameId(u32);

impl FrameId {
    /// The frame's number in its pool (buffer index × 512 + slot).
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// Frame number `i` of a pool.
    pub(crate) fn from_index(i: usize) -> FrameId {
        FrameId(i as u32)
    }

    fn chunk(self) -> usize {
        self.0 as usize / FRAMES_PER_CHUNK
    }

    fn offset(self) -> usize {
        (self.0 as usize % FRAMES_PER_CHUNK) * PAGE_SIZE
    }
}

/// Frames of a [`PagePool`] seen in place ([`PagePool::view`]): derefs to their bytes.
pub struct FrameView {
    /// Always Some but in `drop`.
    view: Option<DmaView>,
    pool: Arc<PoolInner>,
}

impl std::fmt::Debug for FrameView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view.fmt(f)
    }
}

impl std::ops::Deref for FrameView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.view
            .as_deref()
            .expect("a live FrameView holds its view")
    }
}

impl Drop for FrameView {
    fn drop(&mut self) {
        // The pages first, then the count: while the count says a view may be alive,
        // `is_viewed` asks the pages.
        drop(self.view.take());
        self.pool.views.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why the pool could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A pool of no frames is useless.
    #[error("a page pool needs at least one frame")]
    NoFrames,
    /// The DMA pool could not supply a 2 MiB buffer.
    #[error("cannot take buffer {chunk} of {chunks} (2 MiB each) for the page pool: {source}")]
    Dma {
        chunk: usize,
        chunks: usize,
        #[source]
        source: DmaError,
    },
    /// The driver handed out a buffer that is not 4 KiB aligned in IOVA.
    #[error("the DMA pool returned a buffer at IOVA {0}, which is not 4 KiB aligned")]
    Misaligned(Iova),
    /// A frame could not be viewed in place (a command may be writing it, or the memory was
    /// quarantined).
    #[error("frame {frame} cannot be read in place: {source}")]
    View {
        frame: usize,
        #[source]
        source: DmaError,
    },
    /// A device addressed memory outside the pool.
    #[error("IOVA range {iova}+{len} is not inside one frame of the page pool")]
    NotInPool { iova: Iova, len: usize },
}

/// A fixed set of 4 KiB DMA frames. Cheap to clone: clones share the frames (a recording
/// device holds one to move data the way a controller would).
#[derive(Clone)]
pub struct PagePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// IOVA of each buffer, sorted as the buffers are (immutable after start-up).
    iovas: Vec<Iova>,
    /// A share of each buffer: what commands are given, so that the queue pair holds the
    /// memory for as long as the device may use it.
    leases: Vec<DmaLease>,
    /// (IOVA, buffer index), sorted by IOVA: finds the buffer behind a segment.
    by_iova: Vec<(Iova, usize)>,
    frames: usize,
    state: Mutex<PoolState>,
    /// The buffers, each behind a lock of its own (a `DmaBuffer` is used by one thread at a
    /// time): copies from different buffers, by the shards of a shared cache, run side by
    /// side.
    buffers: Vec<Mutex<DmaBuffer>>,
    /// Views of frames alive ([`FrameView`]s): while none is, no frame is viewed and
    /// [`PagePool::is_viewed`] answers without the lock.
    views: AtomicUsize,
}

/// The free frames: a bit per frame, handed out lowest first. Whatever order frames were
/// given back in — two threads closing files at once interleave their frees — the free
/// frames of a buffer go out again as consecutive runs, so the pages a readahead window
/// takes land in consecutive frames and its command's data stays one piece. (A queue in the
/// order of freeing kept that order: after two closes at once, each command of the next
/// read came in 17 pieces instead of one.)
struct PoolState {
    /// Bit `f % 64` of word `f / 64` is set when frame `f` is free (frames come in whole
    /// buffers of [`FRAMES_PER_CHUNK`], a multiple of 64).
    free: Vec<u64>,
    /// Free frames.
    count: usize,
    /// No frame below word `first` is free.
    first: usize,
}

impl PoolState {
    fn new(frames: usize) -> PoolState {
        PoolState {
            free: vec![u64::MAX; frames.div_ceil(64)],
            count: frames,
            first: 0,
        }
    }

    /// Take up to `n` free frames, lowest first, handing each to `out`; returns how many.
    fn take(&mut self, n: usize, mut out: impl FnMut(FrameId)) -> usize {
        let mut k = 0;
        let mut w = self.first;
        while k < n && w < self.free.len() {
            let word = &mut self.free[w];
            while *word != 0 && k < n {
                let bit = word.trailing_zeros();
                *word &= *word - 1;
                out(FrameId(w as u32 * 64 + bit));
                k += 1;
            }
            if *word == 0 {
                w += 1;
            }
        }
        self.first = w;
        self.count -= k;
        k
    }

    fn put(&mut self, frame: u32) {
        let (w, bit) = (frame as usize / 64, frame % 64);
        debug_assert!(self.free[w] & (1 << bit) == 0, "frame {frame} freed twice");
        self.free[w] |= 1 << bit;
        self.count += 1;
        self.first = self.first.min(w);
    }
}

impl std::fmt::Debug for PagePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagePool")
            .field("frames", &self.inner.frames)
            .field("free", &self.free_frames())
            .finish()
    }
}

impl PagePool {
    /// Take enough 2 MiB buffers from `dma` for `frames` frames (rounded up to whole
    /// buffers: every frame of every buffer is used).
    pub fn new(dma: &DmaPool, frames: usize) -> Result<PagePool, PoolError> {
        if frames == 0 {
            return Err(PoolError::NoFrames);
        }
        let chunks = frames.div_ceil(FRAMES_PER_CHUNK);
        let mut buffers = Vec::with_capacity(chunks);
        for chunk in 0..chunks {
            let buf = dma
                .alloc_viewable(CHUNK_BYTES)
                .map_err(|source| PoolError::Dma {
                    chunk,
                    chunks,
                    source,
                })?;
            if buf.iova().0 % PAGE_SIZE as u64 != 0 {
                return Err(PoolError::Misaligned(buf.iova()));
            }
            buffers.push(buf);
        }
        let frames = chunks * FRAMES_PER_CHUNK;
        let iovas = buffers.iter().map(DmaBuffer::iova).collect();
        let leases = buffers.iter().map(|b| b.lease(0, b.len())).collect();
        let mut by_iova: Vec<(Iova, usize)> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (b.iova(), i))
            .collect();
        by_iova.sort_unstable();
        Ok(PagePool {
            inner: Arc::new(PoolInner {
                iovas,
                leases,
                by_iova,
                frames,
                state: Mutex::new(PoolState::new(frames)),
                buffers: buffers.into_iter().map(Mutex::new).collect(),
                views: AtomicUsize::new(0),
            }),
        })
    }

    /// Buffer `chunk`.
    fn buffer(&self, chunk: usize) -> MutexGuard<'_, DmaBuffer> {
        // A copy in or out cannot be left half done by a panic in a way that matters to
        // the lock: the buffer itself has no state beyond its bytes.
        self.inner.buffers[chunk]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every update under the lock is a single push, pop or copy: a panic cannot leave it
        // half done, so a poisoned lock is still consistent.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.inner.frames
    }

    /// Frames not handed out.
    pub fn free_frames(&self) -> usize {
        self.lock().count
    }

    /// Take a free frame (its contents are whatever it last held).
    pub fn alloc(&self) -> Option<FrameId> {
        let mut one = None;
        self.lock().take(1, |f| one = Some(f));
        one
    }

    /// Take up to `n` free frames at once (one lock), in the order [`PagePool::alloc`] would
    /// give them, appended to `out`; returns how many.
    pub fn alloc_many(&self, n: usize, out: &mut Vec<FrameId>) -> usize {
        self.lock().take(n, |f| out.push(f))
    }

    /// Give a frame back. The caller must not use it afterwards.
    pub fn free(&self, frame: FrameId) {
        self.lock().put(frame.0);
    }

    /// Where the device finds the frame.
    pub fn iova(&self, frame: FrameId) -> Iova {
        self.inner.iovas[frame.chunk()].add(frame.offset() as u64)
    }

    /// `len` bytes at `offset` of `frame` as a command's data.
    ///
    /// # Panics
    /// If the range leaves the frame.
    pub fn slice(&self, frame: FrameId, offset: usize, len: usize) -> DmaSlice<'_> {
        assert!(
            offset + len <= PAGE_SIZE,
            "slice {offset}+{len} leaves the frame"
        );
        self.inner.leases[frame.chunk()]
            .slice()
            .sub(frame.offset() + offset, len)
    }

    /// The piece of the pool that `seg` describes (inside one 2 MiB buffer), as a command's
    /// data.
    pub fn slice_of(&self, seg: Segment) -> Result<DmaSlice<'_>, PoolError> {
        let not_in_pool = PoolError::NotInPool {
            iova: seg.iova,
            len: seg.len as usize,
        };
        let by_iova = &self.inner.by_iova;
        let at = by_iova.partition_point(|&(iova, _)| iova.0 <= seg.iova.0);
        let Some(&(base, chunk)) = at.checked_sub(1).map(|i| &by_iova[i]) else {
            return Err(not_in_pool);
        };
        let offset = seg.iova.0 - base.0;
        if seg.len == 0 || offset + seg.len as u64 > CHUNK_BYTES as u64 {
            return Err(not_in_pool);
        }
        Ok(self.inner.leases[chunk]
            .slice()
            .sub(offset as usize, seg.len as usize))
    }

    /// Copy bytes out of a frame, starting at `offset`.
    ///
    /// # Panics
    /// If the range leaves the frame.
    pub fn read(&self, frame: FrameId, offset: usize, buf: &mut [u8]) {
        assert!(
            offset + buf.len() <= PAGE_SIZE,
            "read {offset}+{} leaves the frame",
            buf.len()
        );
        self.buffer(frame.chunk())
            .read_bytes(frame.offset() + offset, buf);
    }

    /// Copy bytes out of consecutive frames from `frame` (one 2 MiB buffer), starting at
    /// `offset` in the first: one lock of the pool for a run of pages that lie one after the
    /// other. The copy goes a page at a time: under QEMU's TCG, page-sized copies measured
    /// twice as fast as one long one (a run of 256 pages), and elsewhere they cost the same.
    ///
    /// # Panics
    /// If the range leaves the buffer.
    pub fn read_run(&self, frame: FrameId, offset: usize, buf: &mut [u8]) {
        let start = frame.offset() + offset;
        assert!(
            start + buf.len() <= CHUNK_BYTES,
            "read {offset}+{} from frame {} leaves its buffer",
            buf.len(),
            frame.0
        );
        let b = self.buffer(frame.chunk());
        let mut done = 0;
        while done < buf.len() {
            let at = start + done;
            let n = (PAGE_SIZE - at % PAGE_SIZE).min(buf.len() - done);
            b.read_bytes(at, &mut buf[done..done + n]);
            done += n;
        }
    }

    /// Copy bytes into a frame at `offset`.
    ///
    /// # Panics
    /// If the range leaves the frame.
    pub fn write(&self, frame: FrameId, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= PAGE_SIZE,
            "write {offset}+{} leaves the frame",
            data.len()
        );
        self.buffer(frame.chunk())
            .write_bytes(frame.offset() + offset, data);
    }

    /// `len` bytes from `offset` of `frame` and the frames after it (in one 2 MiB buffer)
    /// in place, without a copy: while the view lives, no command may make the device write
    /// them and the CPU may not write them (both are refused).
    ///
    /// # Panics
    /// If the range leaves the buffer.
    pub fn view(&self, frame: FrameId, offset: usize, len: usize) -> Result<FrameView, PoolError> {
        let start = frame.offset() + offset;
        assert!(
            start + len <= CHUNK_BYTES,
            "view {offset}+{len} from frame {} leaves its buffer",
            frame.0
        );
        // Counted before the view exists, so that a view is never alive uncounted.
        self.inner.views.fetch_add(1, Ordering::AcqRel);
        let view = self.buffer(frame.chunk()).view(start, len);
        match view {
            Ok(view) => Ok(FrameView {
                view: Some(view),
                pool: self.inner.clone(),
            }),
            Err(source) => {
                self.inner.views.fetch_sub(1, Ordering::AcqRel);
                Err(PoolError::View {
                    frame: frame.index(),
                    source,
                })
            }
        }
    }

    /// Whether a view of the frame is alive.
    #[inline]
    pub fn is_viewed(&self, frame: FrameId) -> bool {
        // No view at all (the usual case, checked per page by eviction): no lock.
        self.inner.views.load(Ordering::Acquire) != 0 && self.is_viewed_slow(frame)
    }

    #[cold]
    fn is_viewed_slow(&self, frame: FrameId) -> bool {
        self.buffer(frame.chunk())
            .is_viewed(frame.offset(), PAGE_SIZE)
    }

    /// Zero `len` bytes of a frame from `offset`.
    pub fn zero(&self, frame: FrameId, offset: usize, len: usize) {
        const ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        self.write(frame, offset, &ZEROS[..len]);
    }

    /// A copy of a whole frame.
    pub fn frame_bytes(&self, frame: FrameId) -> Vec<u8> {
        let mut v = vec![0; PAGE_SIZE];
        self.read(frame, 0, &mut v);
        v
    }

    /// The buffer and offset holding `len` bytes at `iova`, which must lie in one frame.
    fn locate(&self, iova: Iova, len: usize) -> Result<(usize, usize), PoolError> {
        let not_in_pool = PoolError::NotInPool { iova, len };
        let chunk = self
            .inner
            .iovas
            .iter()
            .position(|b| iova.0 >= b.0 && iova.0 < b.0 + CHUNK_BYTES as u64)
            .ok_or(not_in_pool)?;
        let offset = (iova.0 - self.inner.iovas[chunk].0) as usize;
        if len == 0 || offset % PAGE_SIZE + len > PAGE_SIZE {
            return Err(PoolError::NotInPool { iova, len });
        }
        Ok((chunk, offset))
    }

    /// Device-side read of memory at `iova` (what a controller does for a Write command).
    pub fn dma_read(&self, iova: Iova, buf: &mut [u8]) -> Result<(), PoolError> {
        let (chunk, offset) = self.locate(iova, buf.len())?;
        self.buffer(chunk).read_bytes(offset, buf);
        Ok(())
    }

    /// Device-side write of memory at `iova` (what a controller does for a Read command).
    pub fn dma_write(&self, iova: Iova, data: &[u8]) -> Result<(), PoolError> {
        let (chunk, offset) = self.locate(iova, data.len())?;
        self.buffer(chunk).write_bytes(offset, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rnvme_driver::dma::Backing;
    use rnvme_driver::hw::MemoryOnly;

    fn pool(frames: usize) -> PagePool {
        let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
        PagePool::new(&dma, frames).unwrap()
    }

    #[test]
    fn frames_are_carved_from_2mib_buffers() {
        let p = pool(513);
        assert_eq!(p.frames(), 1024);
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert_eq!((a.index(), b.index()), (0, 1));
        assert_eq!(p.iova(b).0 - p.iova(a).0, 4096);
        assert_eq!(p.iova(a).0 % 4096, 0);
        let last = FrameId(1023);
        assert_eq!(p.iova(last).0 % (2 << 20), 511 * 4096);
        assert_eq!(p.free_frames(), 1022);
        p.free(b);
        p.free(a);
        // The lowest free frames go first, whatever order they came back in.
        let rest: Vec<usize> = std::iter::from_fn(|| p.alloc())
            .map(FrameId::index)
            .collect();
        assert_eq!(rest, (0..1024).collect::<Vec<_>>());
        assert_eq!(p.free_frames(), 0);
    }

    /// Two files' frames given back interleaved (two threads closing at once) come out again
    /// as one consecutive run per buffer: a window's command stays one piece.
    #[test]
    fn frames_freed_interleaved_are_handed_out_consecutive() {
        let p = pool(1024);
        let mut all = Vec::new();
        assert_eq!(p.alloc_many(1024, &mut all), 1024);
        assert_eq!(p.alloc(), None);
        let (a, b) = all.split_at(512);
        for (x, y) in a.iter().zip(b).rev() {
            p.free(*y);
            p.free(*x);
        }
        assert_eq!(p.free_frames(), 1024);
        for chunk in 0..2 {
            let mut got = Vec::new();
            assert_eq!(p.alloc_many(512, &mut got), 512);
            let want: Vec<usize> = (chunk * 512..(chunk + 1) * 512).collect();
            assert_eq!(got.iter().map(|f| f.index()).collect::<Vec<_>>(), want);
        }
        // A few frames back out of order, and a partial take across words.
        for i in [700, 3, 64, 65, 1023] {
            p.free(FrameId(i));
        }
        let mut got = Vec::new();
        assert_eq!(p.alloc_many(3, &mut got), 3);
        assert_eq!(got, [FrameId(3), FrameId(64), FrameId(65)]);
        assert_eq!(p.alloc_many(9, &mut got), 2);
        assert_eq!(got[3..], [FrameId(700), FrameId(1023)]);
        assert_eq!(p.free_frames(), 0);
    }

    #[test]
    fn cpu_and_device_views_agree() {
        let p = pool(2);
        let f = p.alloc().unwrap();
        p.write(f, 100, b"hello");
        let mut got = [0u8; 5];
        p.dma_read(p.iova(f).add(100), &mut got).unwrap();
        assert_eq!(&got, b"hello");
        p.dma_write(p.iova(f).add(4090), b"abcdef").unwrap();
        let mut back = [0u8; 6];
        p.read(f, 4090, &mut back);
        assert_eq!(&back, b"abcdef");
        p.zero(f, 4090, 6);
        p.read(f, 4090, &mut back);
        assert_eq!(back, [0; 6]);
        assert!(
            p.dma_write(p.iova(f).add(4095), b"xy").is_err(),
            "a copy may not straddle frames"
        );
        assert!(p.dma_read(Iova(1), &mut back).is_err());
    }
}
