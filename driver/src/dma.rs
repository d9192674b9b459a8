//! DMA memory: a pool of 2 MiB hugepages, each mapped once into the IOMMU at an IOVA chosen
//! by [`IovaAllocator`], carved into 4 KiB-aligned buffers.
//!
//! The device may read and write this memory at any time, so the CPU never holds a Rust
//! reference into it: [`DmaBuffer`] gives access only through `vm_memory`'s volatile types
//! and copying helpers. Mapping happens when the pool grows (start-up, or a rare refill), never
//! per I/O. Everything is unmapped and freed when the last buffer and the pool are gone.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{VolatileMemory, VolatileSlice};

use crate::hw::{Hardware, HwError};
use crate::iova::IovaAllocator;
use crate::spec::PAGE_SIZE;
use crate::types::{Iova, Segment};

/// The size of one hugepage, and of each chunk the pool maps.
pub const CHUNK_SIZE: usize = 2 << 20;
const PAGES_PER_CHUNK: usize = CHUNK_SIZE / PAGE_SIZE;

/// Where the pool's memory comes from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Backing {
    /// 2 MiB hugepages (reserve them with `rnvme setup --hugepages N` or
    /// `/proc/sys/vm/nr_hugepages`).
    #[default]
    Hugepages,
    /// Ordinary 4 KiB pages, pinned by VFIO when mapped: an explicit opt-in for machines
    /// without hugepages. Each 2 MiB chunk is still mapped once, at contiguous IOVAs.
    SmallPages,
}

/// Why DMA memory could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Not enough free hugepages.
    #[error(
        "not enough hugepages: {needed} more 2 MiB hugepage(s) needed, {free} free; reserve \
         them with `rnvme setup --hugepages {suggest}` (or `echo {suggest} > \
         /proc/sys/vm/nr_hugepages`), or opt in to ordinary pages with --no-hugepages"
    )]
    NoHugepages {
        needed: usize,
        free: u64,
        suggest: u64,
    },
    /// The kernel has no hugetlb support at all.
    #[error("this kernel offers no hugepages (no Hugepagesize in /proc/meminfo); opt in to ordinary pages with --no-hugepages")]
    HugepagesUnsupported,
    /// The default hugepage size is not 2 MiB.
    #[error(
        "the default hugepage size is {0} KiB; rnvme maps 2 MiB hugepages: boot with \
         default_hugepagesz=2M, or opt in to ordinary pages with --no-hugepages"
    )]
    HugepageSize(u64),
    /// Ordinary memory ran out.
    #[error("out of memory allocating {0} bytes of DMA memory")]
    OutOfMemory(usize),
    /// The IOVA space is exhausted.
    #[error("no room left in the IOMMU address space for {0} more bytes")]
    IovaExhausted(usize),
    /// The IOMMU refused the mapping.
    #[error(transparent)]
    Map(#[from] HwError),
    /// A zero-sized or absurd request.
    #[error("invalid DMA allocation of {0} bytes")]
    InvalidSize(usize),
}

/// Counters describing the pool.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes currently mapped for DMA (chunks and dedicated regions).
    pub mapped_bytes: u64,
    /// 4 KiB pages handed out from chunks.
    pub pages_in_use: u64,
    /// Number of 2 MiB chunks.
    pub chunks: u64,
    /// Number of DMA map calls made so far.
    pub map_calls: u64,
    /// Buffers quarantined: lent to a command the device may still run (a reset that could
    /// not disable the controller, a queue dropped with commands outstanding). Their memory is
    /// never handed out again while the pool maps it.
    pub quarantined_buffers: u64,
    /// Bytes of those buffers.
    pub quarantined_bytes: u64,
}

/// A pool of DMA memory for one device. Cheap to clone; buffers keep it alive.
#[derive(Clone)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    hw: Arc<dyn Hardware>,
    backing: Backing,
    state: Mutex<PoolState>,
}

struct PoolState {
    iova: IovaAllocator,
    chunks: Vec<Chunk>,
    stats: PoolStats,
    /// Dedicated regions of quarantined buffers: still mapped, never reused, unmapped with
    /// the pool.
    quarantined_regions: Vec<(Region, Iova)>,
}

/// One mapped 2 MiB chunk and which of its pages are free.
struct Chunk {
    mem: Region,
    iova: Iova,
    /// Bit set = page free.
    free: [u64; PAGES_PER_CHUNK / 64],
    free_count: usize,
}

/// Memory obtained from the kernel (hugepages) or the allocator (small pages).
struct Region {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: a Region is plain ownership of a block of memory that no Rust reference points
// into; moving the owner to another thread moves nothing but the address.
unsafe impl Send for Region {}

impl Region {
    fn alloc(len: usize, backing: Backing) -> Result<Region, DmaError> {
        let layout =
            Layout::from_size_align(len, CHUNK_SIZE).map_err(|_| DmaError::InvalidSize(len))?;
        let ptr = match backing {
            Backing::Hugepages => {
                // hugepage-rs maps the default hugepage size: a chunk must be one 2 MiB page,
                // not a 1 GiB one per 2 MiB asked for.
                let size_kib = default_hugepage_kib().ok_or(DmaError::HugepagesUnsupported)?;
                if size_kib != (CHUNK_SIZE / 1024) as u64 {
                    return Err(DmaError::HugepageSize(size_kib));
                }
                let (total, free) = hugepage_counts().ok_or(DmaError::HugepagesUnsupported)?;
                // SAFETY: the layout has a non-zero size (len > 0 is checked by callers).
                let p = unsafe { hugepage_rs::alloc(layout) };
                if p.is_null() {
                    let needed = len / CHUNK_SIZE;
                    return Err(DmaError::NoHugepages {
                        needed,
                        free,
                        suggest: total + needed as u64 - free.min(needed as u64) + 64,
                    });
                }
                p
            }
            // SAFETY: the layout has a non-zero size.
            Backing::SmallPages => unsafe { std::alloc::alloc_zeroed(layout) },
        };
        let ptr = NonNull::new(ptr).ok_or(DmaError::OutOfMemory(len))?;
        // A child process must not get a copy-on-write view of memory the device writes: after
        // a fork the parent's next write would move its pages away from what the IOMMU maps.
        // SAFETY: ptr..ptr+len is the mapping just made; MADV_DONTFORK changes no contents.
        let r = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTFORK) };
        if r != 0 {
            log::warn!(
                "madvise(MADV_DONTFORK) on DMA memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Region { ptr, len, backing })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.len, CHUNK_SIZE).expect("layout was valid at allocation");
        match self.backing {
            // SAFETY: the pointer came from hugepage_rs::alloc with this layout, and the
            // mapping was undone before the region is dropped.
            Backing::Hugepages => unsafe { hugepage_rs::dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: the pointer came from alloc_zeroed with this layout.
            Backing::SmallPages => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) },
        }
    }
}

/// The default hugepage size in KiB, or None without hugetlb.
fn default_hugepage_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_hugepage_kib(&meminfo)
}

fn parse_hugepage_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// (HugePages_Total, HugePages_Free) of the default hugepage size, or None without hugetlb.
fn hugepage_counts() -> Option<(u64, u64)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    field("Hugepagesize:")?;
    Some((field("HugePages_Total:")?, field("HugePages_Free:")?))
}

impl DmaPool {
    /// A pool that maps memory for `hw`, `initial_chunks` chunks of 2 MiB mapped up front.
    pub fn new(
        hw: Arc<dyn Hardware>,
        backing: Backing,
        initial_chunks: usize,
    ) -> Result<DmaPool, DmaError> {
        let iova = IovaAllocator::new(&hw.iova_ranges());
        let pool = DmaPool {
            inner: Arc::new(PoolInner {
                hw,
                backing,
                state: Mutex::new(PoolState {
                    iova,
                    chunks: Vec::new(),
                    stats: PoolStats::default(),
                    quarantined_regions: Vec::new(),
                }),
            }),
        };
        {
            let mut st = pool.inner.lock();
            for _ in 0..initial_chunks {
                pool.inner.add_chunk(&mut st)?;
            }
        }
        Ok(pool)
    }

    /// The memory backing of this pool.
    pub fn backing(&self) -> Backing {
        self.inner.backing
    }

    /// The hardware this pool maps memory for.
    pub fn hardware(&self) -> &Arc<dyn Hardware> {
        &self.inner.hw
    }

    /// A zero-filled buffer of at least `len` bytes, 4 KiB aligned in IOVA and in memory.
    /// Buffers up to 2 MiB come from the mapped chunks (no system call unless the pool must
    /// grow); larger ones get a region of their own, contiguous in IOVA.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer, DmaError> {
        if len == 0 || len > (1 << 40) {
            return Err(DmaError::InvalidSize(len));
        }
        let pages = len.div_ceil(PAGE_SIZE);
        let mut st = self.inner.lock();
        if pages <= PAGES_PER_CHUNK {
            let (chunk, first) = match st.find_pages(pages) {
                Some(found) => found,
                None => {
                    let chunk = self.inner.add_chunk(&mut st)?;
                    (
                        chunk,
                        st.chunks[chunk].take(pages).expect("a new chunk has room"),
                    )
                }
            };
            st.stats.pages_in_use += pages as u64;
            let c = &st.chunks[chunk];
            let offset = first * PAGE_SIZE;
            // SAFETY: offset + pages*4K lies inside the chunk's allocation.
            let ptr = unsafe { NonNull::new_unchecked(c.mem.ptr.as_ptr().add(offset)) };
            let buf = DmaBuffer::new(Mem {
                ptr,
                len,
                iova: c.iova.add(offset as u64),
                pool: self.inner.clone(),
                origin: Origin::Chunk {
                    chunk,
                    first,
                    pages,
                },
                quarantined: AtomicBool::new(false),
            });
            drop(st);
            buf.fill(0);
            Ok(buf)
        } else {
            let size = len.div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
            let (mem, iova) = self.inner.map_region(&mut st, size)?;
            let ptr = mem.ptr;
            Ok(DmaBuffer::new(Mem {
                ptr,
                len,
                iova,
                pool: self.inner.clone(),
                origin: Origin::Region(Some(mem)),
                quarantined: AtomicBool::new(false),
            }))
        }
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.inner.lock().stats
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves consistent state (every update is a few
        // plain assignments), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocate and map a region of `size` bytes (a multiple of 2 MiB).
    fn map_region(&self, st: &mut PoolState, size: usize) -> Result<(Region, Iova), DmaError> {
        let mem = Region::alloc(size, self.backing)?;
        let iova = st
            .iova
            .alloc(size as u64, CHUNK_SIZE as u64)
            .ok_or(DmaError::IovaExhausted(size))?;
        // SAFETY: the region stays allocated until it is unmapped (Chunk/DmaBuffer drop
        // unmap before freeing), and no Rust reference into it is ever created: all CPU
        // access goes through VolatileSlice.
        if let Err(e) = unsafe { self.hw.dma_map(mem.ptr.as_ptr(), size, iova) } {
            st.iova.free(iova, size as u64);
            return Err(e.into());
        }
        st.stats.mapped_bytes += size as u64;
        st.stats.map_calls += 1;
        Ok((mem, iova))
    }

    fn unmap_region(&self, st: &mut PoolState, mem: Region, iova: Iova) {
        match self.hw.dma_unmap(iova, mem.len) {
            Ok(()) => {
                st.iova.free(iova, mem.len as u64);
                st.stats.mapped_bytes -= mem.len as u64;
                drop(mem);
            }
            Err(e) => {
                // The device may still reach this memory: never give it back to the
                // allocator. Leaking is the only safe choice.
                log::error!("{e}; leaking {} bytes of DMA memory to stay safe", mem.len);
                std::mem::forget(mem);
            }
        }
    }

    fn add_chunk(&self, st: &mut PoolState) -> Result<usize, DmaError> {
        let (mem, iova) = self.map_region(st, CHUNK_SIZE)?;
        st.chunks.push(Chunk {
            mem,
            iova,
            free: [u64::MAX; PAGES_PER_CHUNK / 64],
            free_count: PAGES_PER_CHUNK,
        });
        st.stats.chunks += 1;
        Ok(st.chunks.len() - 1)
    }
}

impl PoolState {
    fn find_pages(&mut self, pages: usize) -> Option<(usize, usize)> {
        self.chunks
            .iter_mut()
            .enumerate()
            .filter(|(_, c)| c.free_count >= pages)
            .find_map(|(i, c)| c.take(pages).map(|first| (i, first)))
    }
}

impl Chunk {
    fn is_free(&self, page: usize) -> bool {
        self.free[page / 64] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, first: usize, pages: usize, free: bool) {
        for p in first..first + pages {
            if free {
                self.free[p / 64] |= 1 << (p % 64);
            } else {
                self.free[p / 64] &= !(1 << (p % 64));
            }
        }
        if free {
            self.free_count += pages;
        } else {
            self.free_count -= pages;
        }
    }

    /// First fit run of `pages` free pages; marks them used.
    fn take(&mut self, pages: usize) -> Option<usize> {
        let mut run = 0;
        for p in 0..PAGES_PER_CHUNK {
            if self.is_free(p) {
                run += 1;
                if run == pages {
                    let first = p + 1 - pages;
                    self.set(first, pages, false);
                    return Some(first);
                }
            } else {
                run = 0;
            }
        }
        None
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let mut st = std::mem::replace(
            self.state.get_mut().unwrap_or_else(|e| e.into_inner()),
            PoolState {
                iova: IovaAllocator::new(&[]),
                chunks: Vec::new(),
                stats: PoolStats::default(),
                quarantined_regions: Vec::new(),
            },
        );
        // Unmapping is what makes quarantined memory safe to free: the device can no longer
        // reach it. A failed unmap leaks it (see unmap_region).
        for c in std::mem::take(&mut st.chunks) {
            self.unmap_region(&mut st, c.mem, c.iova);
        }
        for (mem, iova) in std::mem::take(&mut st.quarantined_regions) {
            self.unmap_region(&mut st, mem, iova);
        }
    }
}

enum Origin {
    Chunk {
        chunk: usize,
        first: usize,
        pages: usize,
    },
    Region(Option<Region>),
}

/// The memory behind a [`DmaBuffer`], shared by the buffer and by every command it is lent
/// to. It goes back to the pool only when the last of them lets go: a command lets go when
/// its completion is reaped or the controller was disabled; a command that can no longer be
/// accounted for quarantines it instead, and then it never goes back.
pub(crate) struct Mem {
    ptr: NonNull<u8>,
    len: usize,
    iova: Iova,
    pool: Arc<PoolInner>,
    origin: Origin,
    quarantined: AtomicBool,
}

// SAFETY: a Mem is ownership of pages of the pool plus their addresses. The CPU reaches the
// pages only through the one `DmaBuffer` that owns a Mem (which is `!Sync`); the other holders
// (commands in flight, `DmaLease`s) use only the addresses, never the memory.
unsafe impl Send for Mem {}
// SAFETY: see `Send`: shared holders read only the immutable fields and the atomic flag.
unsafe impl Sync for Mem {}

impl Mem {
    /// Never give this memory back to the pool: the device may still touch it.
    pub(crate) fn quarantine(&self) {
        if !self.quarantined.swap(true, Ordering::AcqRel) {
            log::error!(
                "{}: quarantining {} bytes of DMA memory at IOVA {}: a command that used it may \
                 still be running in the device; it will never be reused",
                self.pool.hw.name(),
                self.len,
                self.iova
            );
        }
    }

    /// Whether the memory was quarantined.
    #[inline]
    pub(crate) fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        let quarantined = *self.quarantined.get_mut();
        if quarantined {
            st.stats.quarantined_buffers += 1;
            st.stats.quarantined_bytes += self.len as u64;
        }
        match &mut self.origin {
            Origin::Chunk {
                chunk,
                first,
                pages,
            } => {
                // A quarantined buffer's pages stay marked used until the chunk is unmapped.
                if !quarantined {
                    st.chunks[*chunk].set(*first, *pages, true);
                    st.stats.pages_in_use -= *pages as u64;
                }
            }
            Origin::Region(mem) => {
                if let Some(mem) = mem.take() {
                    if quarantined {
                        st.quarantined_regions.push((mem, self.iova));
                    } else {
                        self.pool.unmap_region(&mut st, mem, self.iova);
                    }
                }
            }
        }
    }
}

/// A buffer of DMA memory: known to the device at [`DmaBuffer::iova`], reached by the CPU
/// only through volatile accesses.
///
/// Lending it to a command ([`DmaBuffer::segment`] passed to a queue pair) gives the command
/// a share of its memory: dropping the buffer while the command runs does not free the
/// memory; the command's completion does. A buffer whose command could not be accounted for
/// (the controller could not be disabled after a failed reset, say) is quarantined: queue
/// pairs refuse it, and its memory never returns to the pool.
pub struct DmaBuffer {
    mem: Arc<Mem>,
    /// Owned by one thread at a time: Send but not Sync.
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &self.mem.iova)
            .field("len", &self.mem.len)
            .finish()
    }
}

/// Part of a [`DmaBuffer`] as data of a command: a [`Segment`] that keeps a borrow of the
/// buffer, so that the queue pair can hold the buffer's memory for as long as the device may
/// use it. Made only from a buffer ([`DmaBuffer::segment`], [`DmaBuffer::segment_at`],
/// [`DmaLease::slice`]): safe code cannot point a command at memory nobody owns.
#[derive(Copy, Clone)]
pub struct DmaSlice<'a> {
    mem: &'a Arc<Mem>,
    seg: Segment,
}

impl std::fmt::Debug for DmaSlice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.seg.fmt(f)
    }
}

impl std::ops::Deref for DmaSlice<'_> {
    type Target = Segment;
    #[inline(always)]
    fn deref(&self) -> &Segment {
        &self.seg
    }
}

impl AsRef<Segment> for DmaSlice<'_> {
    #[inline(always)]
    fn as_ref(&self) -> &Segment {
        &self.seg
    }
}

impl<'a> DmaSlice<'a> {
    /// The addresses the device sees.
    #[inline(always)]
    pub fn segment(&self) -> Segment {
        self.seg
    }

    /// A share of the memory that outlives the borrow (for requests sent to another thread).
    pub fn lease(&self) -> DmaLease {
        DmaLease {
            mem: self.mem.clone(),
            seg: self.seg,
        }
    }

    /// Part of this slice: `len` bytes at `offset` into it.
    ///
    /// # Panics
    /// If the range is not inside the slice.
    pub fn sub(&self, offset: usize, len: usize) -> DmaSlice<'a> {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|e| e <= self.seg.len as usize),
            "slice {offset}+{len} beyond a slice of {}",
            self.seg.len
        );
        DmaSlice {
            mem: self.mem,
            seg: Segment::new(self.seg.iova.add(offset as u64), len as u32),
        }
    }

    #[inline(always)]
    pub(crate) fn mem(&self) -> &'a Arc<Mem> {
        self.mem
    }
}

/// An owned share of a [`DmaBuffer`]'s memory and a range of it: what a request carries to
/// another thread. It gives no CPU access to the memory; it only keeps the memory from going
/// back to the pool while a command may use it.
#[derive(Clone)]
pub struct DmaLease {
    mem: Arc<Mem>,
    seg: Segment,
}

impl std::fmt::Debug for DmaLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.seg.fmt(f)
    }
}

impl DmaLease {
    /// The range as a command's data.
    #[inline(always)]
    pub fn slice(&self) -> DmaSlice<'_> {
        DmaSlice {
            mem: &self.mem,
            seg: self.seg,
        }
    }

    /// The addresses the device sees.
    #[inline(always)]
    pub fn segment(&self) -> Segment {
        self.seg
    }

    /// Whether the memory was quarantined (a queue pair refuses it).
    pub fn is_quarantined(&self) -> bool {
        self.mem.is_quarantined()
    }

    pub(crate) fn quarantine(&self) {
        self.mem.quarantine();
    }
}

/// Dwords of DMA memory shared by threads, each of which reads and writes dwords of its own:
/// the shadow doorbell and event index pages, where every queue pair keeps its tail and head
/// and the controller its event indexes. Accesses are single volatile 32-bit loads and stores;
/// ordering against other memory is the caller's (fences).
pub struct DmaWords {
    mem: Arc<Mem>,
}

impl std::fmt::Debug for DmaWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaWords")
            .field("iova", &self.mem.iova)
            .field("len", &self.mem.len)
            .finish()
    }
}

impl DmaWords {
    /// `buf` as shared dwords, zeroed.
    pub fn new(buf: DmaBuffer) -> DmaWords {
        buf.fill(0);
        DmaWords { mem: buf.mem }
    }

    /// Where the device sees the first byte.
    pub fn iova(&self) -> Iova {
        self.mem.iova
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len
    }

    /// Whether there are no bytes (never).
    pub fn is_empty(&self) -> bool {
        self.mem.len == 0
    }

    #[inline(always)]
    fn word(&self, offset: usize) -> vm_memory::volatile_memory::VolatileRef<'_, u32> {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.mem.len,
            "dword at {offset} outside {} bytes",
            self.mem.len
        );
        // SAFETY: offset..offset+4 lies inside the memory (checked above), which stays
        // allocated and mapped while the Mem lives; it is reached only through volatile
        // accesses, never a Rust reference.
        unsafe {
            vm_memory::volatile_memory::VolatileRef::new(self.mem.ptr.as_ptr().add(offset).cast())
        }
    }

    /// The little-endian dword at byte `offset`.
    #[inline(always)]
    pub fn load(&self, offset: usize) -> u32 {
        u32::from_le(self.word(offset).load())
    }

    /// Store a little-endian dword at byte `offset`.
    #[inline(always)]
    pub fn store(&self, offset: usize, value: u32) {
        self.word(offset).store(value.to_le());
    }

    /// The device may still use these dwords: never give them back to the pool.
    pub(crate) fn quarantine(&self) {
        self.mem.quarantine();
    }
}

impl DmaBuffer {
    fn new(mem: Mem) -> DmaBuffer {
        DmaBuffer {
            mem: Arc::new(mem),
            _not_sync: std::marker::PhantomData,
        }
    }

    /// The address the device uses for the first byte.
    #[inline]
    pub fn iova(&self) -> Iova {
        self.mem.iova
    }

    /// Length in bytes, as asked for.
    #[inline]
    pub fn len(&self) -> usize {
        self.mem.len
    }

    /// Whether the buffer is empty (never, buffers have at least one byte).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.mem.len == 0
    }

    /// Whether the buffer was quarantined: a command that used it may still be running in
    /// the device. Queue pairs refuse it, and its memory never returns to the pool; what the
    /// CPU reads from it is whatever the device left there.
    pub fn is_quarantined(&self) -> bool {
        self.mem.is_quarantined()
    }

    /// Quarantine the buffer (see [`DmaBuffer::is_quarantined`]).
    pub(crate) fn quarantine(&self) {
        self.mem.quarantine();
    }

    /// The whole buffer as a command's data.
    ///
    /// # Panics
    /// If the buffer is 4 GiB or longer: use [`DmaBuffer::segment_at`] for pieces of it.
    #[inline]
    pub fn segment(&self) -> DmaSlice<'_> {
        self.segment_at(0, self.mem.len)
    }

    /// `len` bytes at `offset` as a command's data.
    ///
    /// # Panics
    /// If the range is not inside the buffer, or is 4 GiB or longer (a data segment's length
    /// is 32 bits; one command moves less than that anyway).
    #[inline]
    pub fn segment_at(&self, offset: usize, len: usize) -> DmaSlice<'_> {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.mem.len),
            "segment {offset}+{len} beyond a buffer of {}",
            self.mem.len
        );
        assert!(
            len <= u32::MAX as usize,
            "segment of {len} bytes: a data segment is shorter than 4 GiB"
        );
        DmaSlice {
            mem: &self.mem,
            seg: Segment::new(self.mem.iova.add(offset as u64), len as u32),
        }
    }

    /// An owned share of `len` bytes at `offset`, for a request that travels to another
    /// thread (see [`DmaLease`]).
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn lease(&self, offset: usize, len: usize) -> DmaLease {
        self.segment_at(offset, len).lease()
    }

    /// Volatile view of the memory.
    #[inline]
    pub fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: ptr..ptr+len is allocated and mapped for as long as the Mem lives (the
        // pool outlives it through the Arc), and no Rust reference to it exists.
        unsafe { VolatileSlice::new(self.mem.ptr.as_ptr(), self.mem.len) }
    }

    /// Copy `buf.len()` bytes out of the buffer, starting at `offset`.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn read_bytes(&self, offset: usize, buf: &mut [u8]) {
        let s = self
            .volatile()
            .subslice(offset, buf.len())
            .expect("read range inside the DMA buffer");
        s.copy_to(buf);
    }

    /// Copy `data` into the buffer at `offset`.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) {
        let s = self
            .volatile()
            .subslice(offset, data.len())
            .expect("write range inside the DMA buffer");
        s.copy_from(data);
    }

    /// The whole buffer copied into a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.mem.len];
        self.read_bytes(0, &mut v);
        v
    }

    /// Set every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        let block = [byte; 4096];
        let mut off = 0;
        while off < self.mem.len {
            let n = (self.mem.len - off).min(block.len());
            self.write_bytes(off, &block[..n]);
            off += n;
        }
    }

    /// Write a little-endian u64 at `offset` (used for PRP list and SGL pages).
    #[inline]
    pub fn write_u64(&self, offset: usize, value: u64) {
        self.volatile()
            .get_ref::<u64>(offset)
            .expect("qword inside the DMA buffer")
            .store(value.to_le());
    }

    /// Read a little-endian u64 at `offset`.
    #[inline]
    pub fn read_u64(&self, offset: usize) -> u64 {
        u64::from_le(
            self.volatile()
                .get_ref::<u64>(offset)
                .expect("qword inside the DMA buffer")
                .load(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Model, ModelConfig};

    fn pool(initial: usize) -> (Arc<Model>, DmaPool) {
        let model = Model::new(ModelConfig::default());
        let pool = DmaPool::new(model.clone(), Backing::SmallPages, initial).unwrap();
        (model, pool)
    }

    #[test]
    fn buffers_are_carved_from_mapped_chunks_and_reused() {
        let (model, pool) = pool(1);
        assert_eq!(model.mapped_bytes(), CHUNK_SIZE as u64);
        let a = pool.alloc(4096).unwrap();
        let b = pool.alloc(3 * 4096 + 1).unwrap();
        assert_eq!(a.iova().0 % 4096, 0);
        assert_eq!(b.iova(), a.iova().add(4096), "first fit, adjacent");
        assert_eq!(pool.stats().pages_in_use, 5);
        let a_iova = a.iova();
        drop(a);
        assert_eq!(pool.stats().pages_in_use, 4);
        let c = pool.alloc(100).unwrap();
        assert_eq!(c.iova(), a_iova, "freed pages are handed out again");
        assert_eq!(
            pool.stats().map_calls,
            1,
            "no mapping on the allocation path"
        );
        drop((b, c));
    }

    #[test]
    fn the_pool_grows_and_large_buffers_get_their_own_region() {
        let (model, pool) = pool(0);
        let small: Vec<_> = (0..513).map(|_| pool.alloc(4096).unwrap()).collect();
        assert_eq!(pool.stats().chunks, 2);
        let big = pool.alloc(5 << 20).unwrap();
        assert_eq!(big.len(), 5 << 20);
        assert_eq!(big.iova().0 % CHUNK_SIZE as u64, 0);
        assert_eq!(model.mapped_bytes(), (2 * CHUNK_SIZE + (6 << 20)) as u64);
        drop(big);
        assert_eq!(
            model.mapped_bytes(),
            2 * CHUNK_SIZE as u64,
            "a dedicated region is unmapped at once"
        );
        drop(small);
        drop(pool);
        assert_eq!(
            model.mapped_bytes(),
            0,
            "everything unmapped when the pool is gone"
        );
    }

    #[test]
    fn buffers_are_zeroed_and_copy_in_and_out() {
        let (_model, pool) = pool(1);
        let a = pool.alloc(8192).unwrap();
        a.write_bytes(100, b"hello");
        drop(a);
        let b = pool.alloc(8192).unwrap();
        assert!(
            b.to_vec().iter().all(|&x| x == 0),
            "a reused buffer starts zeroed"
        );
        b.write_bytes(4000, &[7; 200]);
        let mut out = [0u8; 200];
        b.read_bytes(4000, &mut out);
        assert_eq!(out, [7; 200]);
        b.write_u64(8, 0x1122_3344_5566_7788);
        assert_eq!(b.read_u64(8), 0x1122_3344_5566_7788);
        assert_eq!(
            b.segment_at(4096, 4096).segment(),
            Segment::new(b.iova().add(4096), 4096)
        );
    }

    #[test]
    fn iovas_stay_inside_the_reported_ranges() {
        let (model, pool) = pool(0);
        let ranges = model.iova_ranges();
        for len in [4096, 1 << 20, 3 << 20] {
            let b = pool.alloc(len).unwrap();
            let end = b.iova().0 + len as u64;
            assert!(
                ranges.iter().any(|r| r.start <= b.iova().0 && end <= r.end),
                "{:?}",
                b.iova()
            );
        }
    }

    #[test]
    fn only_2mib_hugepages_are_used() {
        assert_eq!(
            parse_hugepage_kib("Hugepagesize:       2048 kB\n"),
            Some(2048)
        );
        assert_eq!(
            parse_hugepage_kib("MemTotal: 1 kB\nHugepagesize:    1048576 kB\n"),
            Some(1 << 20)
        );
        assert_eq!(parse_hugepage_kib("MemTotal: 1 kB\n"), None);
        let e = DmaError::HugepageSize(1 << 20).to_string();
        assert!(
            e.contains("1048576 KiB") && e.contains("--no-hugepages"),
            "{e}"
        );
    }

    #[test]
    #[should_panic(expected = "shorter than 4 GiB")]
    fn segments_of_4_gib_or_more_are_refused_not_truncated() {
        let (_model, pool) = pool(0);
        let b = pool.alloc((4 << 30) + 4096).unwrap();
        let _ = b.segment();
    }

    #[test]
    fn invalid_sizes_are_refused() {
        let (_model, pool) = pool(0);
        assert!(matches!(pool.alloc(0), Err(DmaError::InvalidSize(0))));
    }

    #[test]
    fn missing_hugepages_say_how_many_to_reserve() {
        // Only meaningful where no hugepages are free; elsewhere the allocation succeeds.
        let (_model, p) = {
            let model = Model::new(ModelConfig::default());
            let r = DmaPool::new(model.clone(), Backing::Hugepages, 0).unwrap();
            (model, r)
        };
        match hugepage_counts() {
            Some((_, 0)) => {
                let err = p.alloc(4096).unwrap_err().to_string();
                assert!(err.contains("1 more 2 MiB hugepage(s) needed"), "{err}");
                assert!(
                    err.contains("rnvme setup --hugepages") && err.contains("--no-hugepages"),
                    "{err}"
                );
            }
            None => assert!(matches!(p.alloc(4096), Err(DmaError::HugepagesUnsupported))),
            Some(_) => {
                let b = p.alloc(4096).unwrap();
                assert_eq!(b.len(), 4096);
            }
        }
    }
}
