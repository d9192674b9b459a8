//! The handles on DMA memory: the owner's [`DmaBuffer`] (volatile copies), [`DmaSlice`] and
//! [`DmaLease`] (shares lent to commands), [`DmaView`] (in-place reads) and [`DmaWords`]
//! (32-bit words shared with the device, for shadow doorbells).

use std::sync::Arc;

use vm_memory::{VolatileMemory, VolatileSlice};

use super::*;
use crate::types::{Iova, Segment};

/// A buffer of DMA memory: known to the device at [`DmaBuffer::iova`], reached by the CPU
/// through volatile accesses, or, for a buffer from [`DmaPool::alloc_viewable`], also read in
/// place through [`DmaView`]s.
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

/// A [`DmaBuffer`] that is not viewable, by construction ([`DmaPool::alloc_plain`]): volatile
/// access to it needs no test (queue rings, reached at every submission and poll).
pub(crate) struct PlainBuffer(pub(super) DmaBuffer);

impl PlainBuffer {
    /// Volatile access to the memory, for reading and writing (see [`DmaBuffer::volatile`]).
    #[inline(always)]
    pub(crate) fn volatile(&self) -> VolatileSlice<'_> {
        // No view of this memory can exist: it was allocated without page counters.
        self.0.raw()
    }
}

impl std::ops::Deref for PlainBuffer {
    type Target = DmaBuffer;
    #[inline(always)]
    fn deref(&self) -> &DmaBuffer {
        &self.0
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

    /// The whole range read in place: see [`DmaBuffer::view`].
    pub fn view(&self) -> Result<DmaView, DmaError> {
        let offset = (self.seg.iova.0 - self.mem.iova.0) as usize;
        self.mem.view(offset, self.seg.len as usize)
    }
}

/// Bytes of a viewable [`DmaBuffer`] read in place, without copying: a `&[u8]` of DMA memory
/// (through `Deref`). Made by [`DmaBuffer::view`] or [`DmaLease::view`].
///
/// While a view lives, the pages it covers are counted as viewed: a command that would make
/// the device write any of them is refused by the queue pair, and so are CPU writes through
/// the buffer, so the bytes cannot change under the reference. The view holds a share of the
/// memory, which stays allocated and mapped until the last holder lets go; it can go to other
/// threads and be read there. Dropping it lets go of the pages.
pub struct DmaView {
    pub(super) mem: Arc<Mem>,
    pub(super) offset: usize,
    pub(super) len: usize,
}

impl DmaView {
    /// Where the device sees the first byte of the view.
    pub fn iova(&self) -> Iova {
        self.mem.iova.add(self.offset as u64)
    }
}

impl std::ops::Deref for DmaView {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: offset..offset+len lies inside the memory (checked when the view was made),
        // which stays allocated and mapped as long as the Mem lives, and this view holds a
        // share of it. The view is counted on every page it covers, for its whole lifetime:
        // the page counters refuse, while it is counted, every command that may make the
        // device write those pages and every CPU write through the buffer (and a viewable
        // buffer hands out no writable `VolatileSlice`, nor can it become `DmaWords`), so
        // nothing mutates the bytes while the returned reference, bounded by `&self`, lives.
        unsafe { std::slice::from_raw_parts(self.mem.ptr.as_ptr().add(self.offset), self.len) }
    }
}

impl AsRef<[u8]> for DmaView {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for DmaView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaView")
            .field("iova", &self.iova())
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for DmaView {
    fn drop(&mut self) {
        if let Some(counters) = &self.mem.views {
            unclaim(counters, page_range(self.offset, self.len), VIEW);
        }
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
    ///
    /// # Panics
    /// If `buf` is viewable ([`DmaPool::alloc_viewable`]): dwords are stored without counting
    /// writers, so views of them could change under the reader.
    pub fn new(buf: DmaBuffer) -> DmaWords {
        assert!(
            !buf.mem.is_viewable(),
            "DmaWords need a buffer from DmaPool::alloc, not alloc_viewable"
        );
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
        // accesses, never a Rust reference (the buffer was not viewable: see `new`).
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
    pub(super) fn new(mem: Mem) -> DmaBuffer {
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

    /// Whether the buffer can be read in place ([`DmaPool::alloc_viewable`]).
    pub fn is_viewable(&self) -> bool {
        self.mem.is_viewable()
    }

    /// `len` bytes at `offset` read in place, without copying: a [`DmaView`] that derefs to
    /// `&[u8]`, which may go to other threads. While it lives, commands that would make the
    /// device write its pages are refused by queue pairs, and CPU writes to them through this
    /// buffer are refused ([`DmaBuffer::try_write_bytes`]) or panic
    /// ([`DmaBuffer::write_bytes`]). Pages are 4 KiB: a view of part of a page keeps writers
    /// off the whole page.
    ///
    /// Refused if the buffer is not viewable, the range is not inside it, it is quarantined,
    /// or a page of the range is being written: a command in flight may make the device write
    /// it (until its completion is reaped) or the CPU is writing it.
    pub fn view(&self, offset: usize, len: usize) -> Result<DmaView, DmaError> {
        self.mem.view(offset, len)
    }

    /// Whether a 4 KiB page touched by `len` bytes at `offset` is viewed (never for a buffer
    /// that is not viewable).
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn is_viewed(&self, offset: usize, len: usize) -> bool {
        if let Err(e) = self.mem.check_range(offset, len) {
            panic!("{e}");
        }
        self.mem.is_viewed(offset, len)
    }

    /// Volatile access to the memory, for reading and writing.
    ///
    /// # Panics
    /// If the buffer is viewable ([`DmaPool::alloc_viewable`]): writes through the slice could
    /// not be kept off pages that are viewed now or later. Use the copying helpers
    /// ([`DmaBuffer::read_bytes`], [`DmaBuffer::try_write_bytes`], ...) for those.
    #[inline]
    pub fn volatile(&self) -> VolatileSlice<'_> {
        assert!(
            !self.mem.is_viewable(),
            "DmaBuffer::volatile is not available for a viewable buffer (its views would see \
             writes through it): use read_bytes/try_write_bytes"
        );
        self.raw()
    }

    /// Volatile access to the memory, for reading, or for writing under a [`WriteGuard`].
    #[inline(always)]
    fn raw(&self) -> VolatileSlice<'_> {
        // SAFETY: ptr..ptr+len is allocated and mapped for as long as the Mem lives (the
        // pool outlives it through the Arc). The slice holds no Rust reference to the bytes.
        // Views hold shared references to pages of viewable buffers: this buffer's methods
        // write through the slice only under a writer claim of the pages they write, which
        // viewed pages refuse, and `volatile` does not hand it out for viewable buffers.
        unsafe { VolatileSlice::new(self.mem.ptr.as_ptr(), self.mem.len) }
    }

    /// Copy `buf.len()` bytes out of the buffer, starting at `offset`.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn read_bytes(&self, offset: usize, buf: &mut [u8]) {
        let s = self
            .raw()
            .subslice(offset, buf.len())
            .expect("read range inside the DMA buffer");
        s.copy_to(buf);
    }

    /// Copy `data` into the buffer at `offset`.
    ///
    /// # Panics
    /// If the range is not inside the buffer, or (viewable buffers) a page it touches is
    /// viewed: writing memory that is being read in place is a programming error. See
    /// [`DmaBuffer::try_write_bytes`].
    pub fn write_bytes(&self, offset: usize, data: &[u8]) {
        if let Err(e) = self.try_write_bytes(offset, data) {
            panic!("DmaBuffer::write_bytes: {e}");
        }
    }

    /// Copy `data` into the buffer at `offset`; refused if the range is not inside the buffer,
    /// or (viewable buffers) a 4 KiB page it touches is viewed. For the copy, the pages count
    /// it as a writer, so no view of them can be made meanwhile.
    pub fn try_write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let s = self
            .raw()
            .subslice(offset, data.len())
            .map_err(|_| DmaError::OutOfRange {
                offset,
                len: data.len(),
                size: self.mem.len,
            })?;
        let _writing = self.mem.write_guard(offset, data.len())?;
        s.copy_from(data);
        Ok(())
    }

    /// The whole buffer copied into a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.mem.len];
        self.read_bytes(0, &mut v);
        v
    }

    /// Set every byte to `byte`.
    ///
    /// # Panics
    /// If the buffer is viewable and a page of it is viewed (nothing is written then).
    pub fn fill(&self, byte: u8) {
        let _writing = match self.mem.write_guard(0, self.mem.len) {
            Ok(g) => g,
            Err(e) => panic!("DmaBuffer::fill: {e}"),
        };
        let block = [byte; 4096];
        let mem = self.raw();
        let mut off = 0;
        while off < self.mem.len {
            let n = (self.mem.len - off).min(block.len());
            mem.subslice(off, n)
                .expect("inside the DMA buffer")
                .copy_from(&block[..n]);
            off += n;
        }
    }

    /// Write a little-endian u64 at `offset` (used for PRP list and SGL pages).
    ///
    /// # Panics
    /// If the qword is not inside the buffer, or the buffer is viewable and its page is
    /// viewed.
    #[inline]
    pub fn write_u64(&self, offset: usize, value: u64) {
        let mem = self.raw();
        let r = mem
            .get_ref::<u64>(offset)
            .expect("qword inside the DMA buffer");
        let _writing = match self.mem.write_guard(offset, 8) {
            Ok(g) => g,
            Err(e) => panic!("DmaBuffer::write_u64: {e}"),
        };
        r.store(value.to_le());
    }

    /// Read a little-endian u64 at `offset`.
    #[inline]
    pub fn read_u64(&self, offset: usize) -> u64 {
        u64::from_le(
            self.raw()
                .get_ref::<u64>(offset)
                .expect("qword inside the DMA buffer")
                .load(),
        )
    }
}

/// One part of a [`send_vectored`]: plain bytes, or `len` bytes of a DMA buffer from `offset`.
#[derive(Copy, Clone, Debug)]
pub enum SendPart<'a> {
    /// Ordinary memory.
    Bytes(&'a [u8]),
    /// A range of DMA memory, sent from where it is (no copy in this process).
    Dma(&'a DmaBuffer, usize, usize),
}

impl SendPart<'_> {
    /// The part's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            SendPart::Bytes(b) => b.len(),
            SendPart::Dma(_, _, len) => *len,
        }
    }

    /// Whether the part is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most parts one [`send_vectored`] passes to the kernel (the rest wait for the next call).
pub const SEND_PARTS_MAX: usize = 64;

/// Writes `parts`, in order, to the socket or file `fd` with one `writev(2)`: DMA memory goes
/// to the kernel straight from its pages, with the headers around it in the same system call.
/// Returns the bytes written, which may be fewer than asked (a non-blocking socket's send
/// buffer was full): the caller resumes from there.
///
/// Reading DMA memory the device may be writing at the same moment (a buffer lent for a
/// command) gives unspecified bytes but is not unsound; callers send memory whose command
/// completed.
///
/// # Panics
/// If a DMA range is not inside its buffer.
pub fn send_vectored(
    fd: std::os::fd::BorrowedFd<'_>,
    parts: &[SendPart<'_>],
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut iov: [libc::iovec; SEND_PARTS_MAX] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; SEND_PARTS_MAX];
    let mut n = 0;
    for p in parts.iter().filter(|p| !p.is_empty()).take(SEND_PARTS_MAX) {
        iov[n] = match *p {
            SendPart::Bytes(b) => libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            },
            SendPart::Dma(buf, offset, len) => {
                assert!(
                    offset.checked_add(len).is_some_and(|end| end <= buf.len()),
                    "send_vectored: {len} bytes at {offset} are outside a {}-byte DMA buffer",
                    buf.len()
                );
                libc::iovec {
                    iov_base: buf.raw().ptr_guard().as_ptr().wrapping_add(offset)
                        as *mut libc::c_void,
                    iov_len: len,
                }
            }
        };
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    loop {
        // SAFETY: each of the first `n` iovecs describes memory that stays allocated and
        // mapped for this call: plain slices borrowed by `parts`, and ranges inside DMA
        // buffers borrowed by `parts` (checked above). writev only reads that memory.
        let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
