//! DMA memory: a pool of 2 MiB hugepages, each mapped once into the IOMMU at an IOVA chosen
//! by [`IovaAllocator`], carved into 4 KiB-aligned buffers.
//!
//! The device may read and write this memory at any time, so the CPU holds no Rust reference
//! into it: [`DmaBuffer`] gives access through `vm_memory`'s volatile types and copying
//! helpers. The one exception is a [`DmaView`] of a buffer made with
//! [`DmaPool::alloc_viewable`]: a `&[u8]` of pages that per-page counters keep free of every
//! writer (commands that make the device write them, and CPU writes) for as long as the view
//! lives. Mapping happens when the pool grows (start-up, or a rare refill), never per I/O.
//! Everything is unmapped and freed when the last buffer and the pool are gone.

use std::alloc::Layout;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::hw::{Hardware, HwError};
use crate::iova::IovaAllocator;
use crate::spec::PAGE_SIZE;
use crate::types::{Iova, Segment};

mod buffer;

pub(crate) use buffer::PlainBuffer;
pub use buffer::{
    send_vectored, DmaBuffer, DmaLease, DmaSlice, DmaView, DmaWords, SendPart, SEND_PARTS_MAX,
};

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

impl Backing {
    /// Hugepages, or small pages where the user said no hugepages (`--no-hugepages`).
    pub fn small_pages_if(no_hugepages: bool) -> Backing {
        if no_hugepages {
            Backing::SmallPages
        } else {
            Backing::Hugepages
        }
    }
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
    /// A view of a buffer that does not keep count of its views.
    #[error(
        "this DMA buffer cannot be read in place: only buffers from DmaPool::alloc_viewable \
         hand out views"
    )]
    NotViewable,
    /// A range that is not inside the buffer.
    #[error("range {offset}+{len} is outside a DMA buffer of {size} bytes")]
    OutOfRange {
        offset: usize,
        len: usize,
        size: usize,
    },
    /// A view of quarantined memory.
    #[error(
        "the DMA memory at IOVA {iova}+{len} is quarantined (a command that used it may still \
         be running in the device): it is never read in place"
    )]
    Quarantined { iova: Iova, len: usize },
    /// A view of memory that a command in flight may make the device write, or that the CPU
    /// is writing.
    #[error(
        "the DMA memory at IOVA {iova}+{len} is being written (a command in flight makes the \
         device write it, or the CPU is writing it): it can be read in place once the command's \
         completion is reaped"
    )]
    BeingWritten { iova: Iova, len: usize },
    /// A CPU write to memory that is being read in place.
    #[error(
        "the DMA memory at IOVA {iova}+{len} is being read in place (a DmaView of it is held): \
         it cannot be written until the view is dropped"
    )]
    Viewed { iova: Iova, len: usize },
    /// A page already counts the most views, or writers, it can.
    #[error(
        "the 4 KiB page of DMA memory at IOVA {iova} already has 65535 views or writers: no \
         more can be counted"
    )]
    Saturated { iova: Iova },
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

/// The default hugepage size in KiB, or None without hugetlb. (Three fields of
/// `/proc/meminfo` are read by hand: procfs-core would parse the whole file into 60 fields and
/// bring chrono into the driver for them.)
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
        self.alloc_with(len, false)
    }

    /// [`DmaPool::alloc`] for a buffer that can be read in place: it keeps a count of views
    /// and writers per 4 KiB page (4 bytes of ordinary memory per page), so that
    /// [`DmaBuffer::view`] can hand out `&[u8]`s of it. While a page is viewed, commands that
    /// make the device write it are refused, and so are CPU writes to it
    /// ([`DmaBuffer::try_write_bytes`]; [`DmaBuffer::write_bytes`] panics), and
    /// [`DmaBuffer::volatile`] is not available for such a buffer at all.
    pub fn alloc_viewable(&self, len: usize) -> Result<DmaBuffer, DmaError> {
        self.alloc_with(len, true)
    }

    /// [`DmaPool::alloc`] for memory that is never read in place (queue rings): see
    /// [`PlainBuffer`].
    pub(crate) fn alloc_plain(&self, len: usize) -> Result<PlainBuffer, DmaError> {
        Ok(PlainBuffer(self.alloc_with(len, false)?))
    }

    fn alloc_with(&self, len: usize, viewable: bool) -> Result<DmaBuffer, DmaError> {
        if len == 0 || len > (1 << 40) {
            return Err(DmaError::InvalidSize(len));
        }
        let pages = len.div_ceil(PAGE_SIZE);
        let views = viewable.then(|| (0..pages).map(|_| AtomicU32::new(0)).collect());
        let flags = AtomicU8::new(if viewable { VIEWABLE } else { 0 });
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
                flags,
                views,
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
                flags,
                views,
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
        // unmap before freeing), and the CPU reaches it only through VolatileSlice, or through
        // a `DmaView` of pages that no command may make the device write while it lives.
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
    /// [`QUARANTINED`] and [`VIEWABLE`]: one load tells a queue pair that a buffer needs no
    /// more than a share.
    flags: AtomicU8,
    /// Buffers from [`DmaPool::alloc_viewable`]: one counter per 4 KiB page, the low half
    /// counting views ([`DmaView`]) of the page, the high half writers (commands that may
    /// make the device write it, and CPU writes under way). A page never has both.
    views: Option<Box<[AtomicU32]>>,
}

/// [`Mem::flags`]: the memory was quarantined.
const QUARANTINED: u8 = 1;
/// [`Mem::flags`]: the memory counts views and writers per page.
const VIEWABLE: u8 = 2;

/// One view of a page, in a page's counter.
const VIEW: u32 = 1;
/// The views half of a page's counter.
const VIEWS: u32 = 0xffff;
/// One writer of a page, in a page's counter.
const WRITER: u32 = 1 << 16;
/// The writers half of a page's counter.
const WRITERS: u32 = 0xffff << 16;

/// What kept a page from being claimed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Busy {
    /// A view of the page is held (a writer was asked for).
    Viewed,
    /// A writer of the page is under way (a view was asked for).
    Written,
    /// The page counts the most claims of the kind asked for that it can.
    Saturated,
}

/// Claim `pages` of `counters` for views (`one` = [`VIEW`]) or writers (`one` = [`WRITER`]):
/// all of them, or none. A view needs a page without writers; a writer a page without views.
/// Returns the first page that could not be claimed, and why.
fn claim(counters: &[AtomicU32], pages: Range<usize>, one: u32) -> Result<(), (usize, Busy)> {
    let (own, other) = if one == VIEW {
        (VIEWS, WRITERS)
    } else {
        (WRITERS, VIEWS)
    };
    for p in pages.clone() {
        // Acquire: what the last holder of the other kind did to the page (a CPU copy, the
        // device's writes made visible by the completion) happens before this claim's use.
        let claimed = counters[p].fetch_update(Ordering::Acquire, Ordering::Relaxed, |v| {
            // Lazily: on a saturated half the sum would overflow.
            (v & other == 0 && v & own != own).then(|| v + one)
        });
        if let Err(v) = claimed {
            unclaim(counters, pages.start..p, one);
            let why = if v & other != 0 {
                if one == VIEW {
                    Busy::Written
                } else {
                    Busy::Viewed
                }
            } else {
                Busy::Saturated
            };
            return Err((p, why));
        }
    }
    Ok(())
}

/// Let go of claims made by [`claim`].
fn unclaim(counters: &[AtomicU32], pages: Range<usize>, one: u32) {
    for p in pages {
        // Release: this holder's use of the page happens before the next claim of the other
        // kind.
        let before = counters[p].fetch_sub(one, Ordering::Release);
        debug_assert!(
            before & (if one == VIEW { VIEWS } else { WRITERS }) != 0,
            "unclaimed a page that was not claimed"
        );
    }
}

/// The 4 KiB pages `len` bytes at `offset` touch (none for no bytes).
#[inline]
fn page_range(offset: usize, len: usize) -> Range<usize> {
    if len == 0 {
        0..0
    } else {
        offset / PAGE_SIZE..(offset + len).div_ceil(PAGE_SIZE)
    }
}

// SAFETY: a Mem is ownership of pages of the pool plus their addresses. The CPU writes the
// pages only through the one `DmaBuffer` that owns a Mem (which is `!Sync`); the other holders
// (commands in flight, `DmaLease`s) use only the addresses. The exception is a `DmaView`,
// which may live on any thread and reads its pages through a `&[u8]`: that is fine because
// the page counters, updated atomically, keep every writer (the owning buffer's CPU writes,
// and commands that may make the device write) off those pages for as long as it lives, and
// the memory itself stays allocated and mapped while any holder keeps the Mem.
unsafe impl Send for Mem {}
// SAFETY: see `Send`: shared holders read the immutable fields, update the atomic flags and
// page counters, and read memory only through views the counters protect from every writer.
unsafe impl Sync for Mem {}

impl Mem {
    /// Never give this memory back to the pool: the device may still touch it.
    pub(crate) fn quarantine(&self) {
        if self.flags.fetch_or(QUARANTINED, Ordering::AcqRel) & QUARANTINED == 0 {
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
        self.flags.load(Ordering::Relaxed) & QUARANTINED != 0
    }

    /// Whether the memory was quarantined or counts views: a queue pair's one test for
    /// whether lending it to a command takes more than a share.
    #[inline(always)]
    pub(crate) fn quarantined_or_viewable(&self) -> bool {
        self.flags.load(Ordering::Relaxed) != 0
    }

    /// Whether the memory counts views and writers per page.
    #[inline]
    pub(crate) fn is_viewable(&self) -> bool {
        self.views.is_some()
    }

    /// Count a command that may make the device write `seg` (inside this memory) as a writer
    /// of the pages it covers, so that no view of them is handed out until
    /// [`Mem::release_device_write`]. Returns the first page and the number of pages; for
    /// memory that does not count views, claims nothing. Refused if a page is viewed: returns
    /// where the first page that could not be claimed is, and why.
    pub(crate) fn claim_device_write(&self, seg: Segment) -> Result<(u32, u32), (Iova, Busy)> {
        let Some(counters) = &self.views else {
            return Ok((0, 0));
        };
        let offset = (seg.iova.0 - self.iova.0) as usize;
        let pages = page_range(offset, seg.len as usize);
        claim(counters, pages.clone(), WRITER)
            .map_err(|(p, why)| (self.iova.add((p * PAGE_SIZE) as u64), why))?;
        // Pages of a buffer shorter than 1 TiB: they fit.
        Ok((pages.start as u32, pages.len() as u32))
    }

    /// Let go of a claim made by [`Mem::claim_device_write`]: the device will not write the
    /// pages for that command any more.
    pub(crate) fn release_device_write(&self, first: u32, pages: u32) {
        if let Some(counters) = &self.views {
            unclaim(
                counters,
                first as usize..first as usize + pages as usize,
                WRITER,
            );
        }
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        if offset.checked_add(len).is_some_and(|e| e <= self.len) {
            Ok(())
        } else {
            Err(DmaError::OutOfRange {
                offset,
                len,
                size: self.len,
            })
        }
    }

    /// A view of `len` bytes at `offset` (see [`DmaBuffer::view`]).
    fn view(self: &Arc<Mem>, offset: usize, len: usize) -> Result<DmaView, DmaError> {
        let counters = self.views.as_ref().ok_or(DmaError::NotViewable)?;
        self.check_range(offset, len)?;
        let iova = self.iova.add(offset as u64);
        if self.is_quarantined() {
            return Err(DmaError::Quarantined { iova, len });
        }
        let pages = page_range(offset, len);
        claim(counters, pages.clone(), VIEW).map_err(|(p, why)| match why {
            Busy::Saturated => DmaError::Saturated {
                iova: self.iova.add((p * PAGE_SIZE) as u64),
            },
            _ => DmaError::BeingWritten { iova, len },
        })?;
        // Memory quarantined meanwhile is still not written where the view is (the command
        // that could not be accounted for keeps its writer claims forever), but it is never
        // read in place: refuse it all the same.
        if self.is_quarantined() {
            unclaim(counters, pages, VIEW);
            return Err(DmaError::Quarantined { iova, len });
        }
        Ok(DmaView {
            mem: self.clone(),
            offset,
            len,
        })
    }

    /// Whether a page of `len` bytes at `offset` is viewed.
    fn is_viewed(&self, offset: usize, len: usize) -> bool {
        let Some(counters) = &self.views else {
            return false;
        };
        page_range(offset, len).any(|p| counters[p].load(Ordering::Relaxed) & VIEWS != 0)
    }

    /// Count a CPU write of `len` bytes at `offset` (inside the memory) as a writer of the
    /// pages it touches, until the guard is dropped. Refused if a page is viewed.
    #[inline]
    fn write_guard(&self, offset: usize, len: usize) -> Result<WriteGuard<'_>, DmaError> {
        let Some(counters) = &self.views else {
            return Ok(WriteGuard {
                counters: &[],
                pages: 0..0,
            });
        };
        let pages = page_range(offset, len);
        claim(counters, pages.clone(), WRITER).map_err(|(p, why)| match why {
            Busy::Saturated => DmaError::Saturated {
                iova: self.iova.add((p * PAGE_SIZE) as u64),
            },
            _ => DmaError::Viewed {
                iova: self.iova.add(offset as u64),
                len,
            },
        })?;
        Ok(WriteGuard { counters, pages })
    }
}

/// A CPU write under way: its pages count it as a writer until it is dropped.
struct WriteGuard<'a> {
    counters: &'a [AtomicU32],
    pages: Range<usize>,
}

impl Drop for WriteGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            unclaim(self.counters, self.pages.clone(), WRITER);
        }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        let quarantined = *self.flags.get_mut() & QUARANTINED != 0;
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

    /// What the page counters must hold: views and writers per page.
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Expected {
        views: u32,
        writers: u32,
    }

    #[derive(Clone, Debug)]
    enum Op {
        View(Range<usize>),
        Write(Range<usize>),
        /// Let go of the held claim with this index (modulo how many are held).
        Release(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let range = (0usize..8, 0usize..4).prop_map(|(a, n)| a..(a + n).min(8));
        prop_oneof![
            range.clone().prop_map(Op::View),
            range.prop_map(Op::Write),
            any::<usize>().prop_map(Op::Release),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Claims are all or nothing: a view gets every page of its range or none, a writer
        /// likewise, and no page ever counts views and writers at once.
        #[test]
        fn page_claims_are_all_or_nothing_and_views_exclude_writers(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            let counters: Vec<AtomicU32> = (0..8).map(|_| AtomicU32::new(0)).collect();
            let mut want = vec![Expected::default(); 8];
            let mut held: Vec<(Range<usize>, u32)> = Vec::new();
            for op in ops {
                match op {
                    Op::View(r) | Op::Write(r) if r.is_empty() => {
                        let one = VIEW;
                        proptest::prop_assert!(claim(&counters, r, one).is_ok());
                    }
                    Op::View(r) => {
                        let free = want[r.clone()].iter().all(|e| e.writers == 0);
                        let got = claim(&counters, r.clone(), VIEW);
                        proptest::prop_assert_eq!(got.is_ok(), free, "{:?} {:?}", r, want);
                        match got {
                            Ok(()) => {
                                want[r.clone()].iter_mut().for_each(|e| e.views += 1);
                                held.push((r, VIEW));
                            }
                            Err((p, why)) => {
                                proptest::prop_assert_eq!(why, Busy::Written);
                                proptest::prop_assert!(want[p].writers > 0);
                                proptest::prop_assert!(want[r.start..p].iter().all(|e| e.writers == 0));
                            }
                        }
                    }
                    Op::Write(r) => {
                        let free = want[r.clone()].iter().all(|e| e.views == 0);
                        let got = claim(&counters, r.clone(), WRITER);
                        proptest::prop_assert_eq!(got.is_ok(), free, "{:?} {:?}", r, want);
                        match got {
                            Ok(()) => {
                                want[r.clone()].iter_mut().for_each(|e| e.writers += 1);
                                held.push((r, WRITER));
                            }
                            Err((p, why)) => {
                                proptest::prop_assert_eq!(why, Busy::Viewed);
                                proptest::prop_assert!(want[p].views > 0);
                            }
                        }
                    }
                    Op::Release(i) => {
                        if !held.is_empty() {
                            let (r, one) = held.swap_remove(i % held.len());
                            unclaim(&counters, r.clone(), one);
                            for e in &mut want[r] {
                                if one == VIEW { e.views -= 1 } else { e.writers -= 1 }
                            }
                        }
                    }
                }
                for (c, e) in counters.iter().zip(&want) {
                    let v = c.load(Ordering::Relaxed);
                    proptest::prop_assert_eq!(v & VIEWS, e.views);
                    proptest::prop_assert_eq!(v >> 16, e.writers);
                    proptest::prop_assert!(e.views == 0 || e.writers == 0);
                }
            }
        }
    }

    #[test]
    fn a_page_counts_at_most_65535_claims_of_a_kind() {
        let counters: Vec<AtomicU32> = (0..2).map(|_| AtomicU32::new(0)).collect();
        counters[1].store(VIEWS, Ordering::Relaxed);
        assert_eq!(claim(&counters, 0..2, VIEW), Err((1, Busy::Saturated)));
        assert_eq!(counters[0].load(Ordering::Relaxed), 0, "undone");
        assert_eq!(claim(&counters, 0..2, WRITER), Err((1, Busy::Viewed)));
        counters[1].store(WRITERS, Ordering::Relaxed);
        assert_eq!(claim(&counters, 1..2, WRITER), Err((1, Busy::Saturated)));
        assert_eq!(
            counters[1].load(Ordering::Relaxed),
            WRITERS,
            "nothing carried over"
        );
    }

    #[test]
    fn page_ranges_cover_the_pages_touched() {
        assert_eq!(page_range(0, 0), 0..0);
        assert_eq!(page_range(5000, 0), 0..0);
        assert_eq!(page_range(0, 1), 0..1);
        assert_eq!(page_range(4095, 2), 0..2);
        assert_eq!(page_range(4096, 4096), 1..2);
        assert_eq!(page_range(100, 8192), 0..3);
    }

    #[test]
    fn views_of_chunk_and_region_buffers() {
        let (_model, pool) = pool(1);
        for len in [3 * 4096 + 1, 3 << 20] {
            let b = pool.alloc_viewable(len).unwrap();
            assert!(b.is_viewable());
            b.write_bytes(4096, &[9; 4096]);
            let v = b.view(4096, 4096).unwrap();
            assert_eq!(&v[..], &[9; 4096][..]);
            assert_eq!(v.iova(), b.iova().add(4096));
            assert!(b.is_viewed(4096, 1) && b.is_viewed(0, 4097) && !b.is_viewed(0, 4096));
            assert!(matches!(
                b.try_write_bytes(8000, &[1; 10]),
                Err(DmaError::Viewed { .. })
            ));
            b.write_bytes(0, &[1; 4096]);
            b.write_bytes(8192, &[2; 10]);
            let w = b.view(4000, 200).unwrap();
            assert_eq!(&w[..96], &[1; 96][..]);
            assert_eq!(&w[96..], &[9; 104][..]);
            drop((v, w));
            assert!(!b.is_viewed(0, len));
            b.fill(3);
            let all = b.view(0, len).unwrap();
            assert!(all.iter().all(|&x| x == 3));
            assert!(b.view(len, 0).unwrap().is_empty());
            assert!(matches!(
                b.view(len - 1, 2),
                Err(DmaError::OutOfRange { .. })
            ));
        }
    }

    #[test]
    fn a_view_keeps_the_memory_out_of_the_pool() {
        let (_model, pool) = pool(1);
        let b = pool.alloc_viewable(8192).unwrap();
        b.write_bytes(0, b"kept");
        let v = b.lease(0, 4096).view().unwrap();
        let used = pool.stats().pages_in_use;
        drop(b);
        assert_eq!(pool.stats().pages_in_use, used, "the view holds the pages");
        assert_eq!(&v[..4], b"kept");
        drop(v);
        assert_eq!(pool.stats().pages_in_use, used - 2);
    }

    #[test]
    fn plain_buffers_have_no_views() {
        let (_model, pool) = pool(1);
        let b = pool.alloc(4096).unwrap();
        assert!(!b.is_viewable());
        assert!(matches!(b.view(0, 4096), Err(DmaError::NotViewable)));
        assert!(matches!(
            b.lease(0, 4096).view(),
            Err(DmaError::NotViewable)
        ));
        assert!(!b.is_viewed(0, 4096));
        let e = DmaError::NotViewable.to_string();
        assert!(e.contains("alloc_viewable"), "{e}");
    }

    #[test]
    #[should_panic(expected = "not available for a viewable buffer")]
    fn viewable_buffers_give_no_volatile_slice() {
        let (_model, pool) = pool(1);
        let _ = pool.alloc_viewable(4096).unwrap().volatile();
    }

    #[test]
    #[should_panic(expected = "not alloc_viewable")]
    fn viewable_buffers_do_not_become_shared_dwords() {
        let (_model, pool) = pool(1);
        let _ = DmaWords::new(pool.alloc_viewable(4096).unwrap());
    }

    #[test]
    #[should_panic(expected = "being read in place")]
    fn filling_a_viewed_buffer_panics() {
        let (_model, pool) = pool(1);
        let b = pool.alloc_viewable(8192).unwrap();
        let _v = b.view(4096, 1).unwrap();
        b.fill(0);
    }
}
