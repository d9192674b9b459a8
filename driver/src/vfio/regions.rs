//! Region I/O through the device file descriptor, and the BAR0 mapping.

use super::*;

pub(super) fn file_offset(off: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(off)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

/// Read exactly `buf.len()` bytes at `off` of `fd`; a short read is an error.
pub(super) fn pread_exact(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<()> {
    let off = file_offset(off)?;
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize != buf.len() {
            let msg = format!("short read: {n} of {} bytes", buf.len());
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
        }
        return Ok(());
    }
}

/// Write exactly `buf.len()` bytes at `off` of `fd`; a short write is an error.
pub(super) fn pwrite_exact(fd: RawFd, buf: &[u8], off: u64) -> io::Result<()> {
    let off = file_offset(off)?;
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize != buf.len() {
            let msg = format!("short write: {n} of {} bytes", buf.len());
            return Err(io::Error::new(io::ErrorKind::WriteZero, msg));
        }
        return Ok(());
    }
}

// ---------------------------------------------------------------------------------------------
// BAR0 mapping
// ---------------------------------------------------------------------------------------------

/// One mmapped area of BAR0 and the volatile register accesses into it.
///
/// Invariant: `base` is the start of a live, page-aligned mapping of `len` readable and
/// writable bytes, holding the BAR bytes `start..start + len`; the mapping lives exactly as
/// long as `self` (it is unmapped in `Drop`). `len == 0` is the empty area: it covers no
/// offset and maps nothing.
pub(super) struct MmioArea {
    pub(super) base: *mut u8,
    /// BAR offset of the first byte of the mapping.
    pub(super) start: usize,
    pub(super) len: usize,
    /// Number of byte offsets (from `start`) at which a 4-byte access fits: `len - 3`.
    pub(super) limit: usize,
}

// SAFETY: an MmioArea is a pointer to device registers mapped MAP_SHARED. Every access through
// it is one aligned volatile 32-bit load or store to a register (`read32`/`write32`), which the
// device serialises itself; no Rust reference into the mapping is ever made, so there is no
// aliasing to violate when several threads access it at once (ordering between threads is the
// callers' business, with fences, as for any MMIO). The mapping lives as long as the struct, so
// moving the struct to another thread or sharing it keeps the pointer valid.
unsafe impl Send for MmioArea {}
// SAFETY: see the Send impl above: shared use is only ever single aligned volatile accesses.
unsafe impl Sync for MmioArea {}

impl MmioArea {
    /// The area that covers nothing.
    pub(super) const fn empty() -> MmioArea {
        MmioArea {
            base: std::ptr::null_mut(),
            start: 0,
            len: 0,
            limit: 0,
        }
    }

    /// Map `len` bytes of `fd` at file offset `file_off`, which hold the BAR bytes
    /// `start..start + len`.
    pub(super) fn map(fd: RawFd, file_off: u64, start: usize, len: usize) -> io::Result<MmioArea> {
        let off = file_offset(file_off)?;
        // SAFETY: a fresh shared mapping chosen by the kernel (address hint null): it cannot
        // overlap any memory Rust already uses. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MmioArea {
            base: p.cast(),
            start,
            len,
            limit: len.saturating_sub(3),
        })
    }

    /// The offset of the register at BAR offset `offset` inside the mapping, if a 4-byte aligned
    /// access there lies wholly inside it.
    #[inline(always)]
    pub(super) fn rel(&self, offset: usize) -> Option<usize> {
        let rel = offset.wrapping_sub(self.start);
        // `base` and `start` are page aligned, so `rel` aligned means the address is aligned.
        ((rel < self.limit) & (rel & 3 == 0)).then_some(rel)
    }

    /// Volatile 32-bit load of the register at BAR offset `offset`; None if outside the area.
    #[inline(always)]
    pub(super) fn read32(&self, offset: usize) -> Option<u32> {
        let rel = self.rel(offset)?;
        // SAFETY: `rel + 4 <= len` and `rel` is 4-aligned (checked by `rel`), and the mapping
        // of `len` bytes at `base` lives as long as `self` (type invariant): the load is an
        // aligned access inside the mapping.
        let v = unsafe { self.base.add(rel).cast::<u32>().read_volatile() };
        Some(u32::from_le(v))
    }

    /// Volatile 32-bit store to the register at BAR offset `offset`; false if outside the area.
    #[inline(always)]
    pub(super) fn write32(&self, offset: usize, value: u32) -> bool {
        let Some(rel) = self.rel(offset) else {
            return false;
        };
        // SAFETY: as in `read32`: an aligned 4-byte access inside the live, writable mapping.
        unsafe {
            self.base
                .add(rel)
                .cast::<u32>()
                .write_volatile(value.to_le())
        };
        true
    }
}

impl Drop for MmioArea {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: `base`/`len` is the mapping this area owns (type invariant); nothing else
        // points into it once the area is dropped.
        let r = unsafe { libc::munmap(self.base.cast(), self.len) };
        if r != 0 {
            log::error!(
                "munmap of a BAR0 area failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// BAR0: the mapped areas and where the region sits in the device file for the slow path.
pub(super) struct Bar0 {
    /// The area tried first: the one that holds the doorbells (usually all of BAR0).
    pub(super) fast: MmioArea,
    /// Other mapped areas of a sparsely mappable BAR.
    pub(super) others: Vec<MmioArea>,
    /// Offset of the BAR0 region in the device file.
    pub(super) region_offset: u64,
    pub(super) size: u64,
    /// Set once the slow path has been reported.
    pub(super) slow_warned: AtomicBool,
}

impl Bar0 {
    /// Every mapped area as (address, length).
    pub(super) fn areas(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        std::iter::once(&self.fast)
            .chain(&self.others)
            .filter(|a| a.len > 0)
            .map(|a| (a.base as usize, a.len))
    }
}

/// The mmappable areas of a region: the sparse-mmap capability's if present, else the whole
/// region. Areas of size zero are dropped.
pub(super) fn mmap_areas(size: u64, caps: &[VfioRegionInfoCap]) -> Vec<(u64, u64)> {
    let sparse = caps.iter().find_map(|cap| match cap {
        VfioRegionInfoCap::SparseMmap(s) => Some(s),
        _ => None,
    });
    match sparse {
        Some(s) => s
            .areas
            .iter()
            .filter(|a| a.size > 0)
            .map(|a| (a.offset, a.size))
            .collect(),
        None => vec![(0, size)],
    }
}

/// Index of the area to try first: the one holding the first doorbell, else the first.
pub(super) fn fast_area_index(areas: &[(u64, u64)]) -> Option<usize> {
    areas
        .iter()
        .position(|&(off, size)| off <= DOORBELL_BASE && DOORBELL_BASE < off.saturating_add(size))
        .or(if areas.is_empty() { None } else { Some(0) })
}

pub(super) fn map_bar0(bdf: &str, device: &VfioDevice) -> Result<Bar0, VfioSetupError> {
    let index = VFIO_PCI_BAR0_REGION_INDEX;
    let flags = device.get_region_flags(index);
    let size = device.get_region_size(index);
    let region_offset = device.get_region_offset(index);
    let needed =
        VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    if flags & needed != needed {
        return Err(VfioSetupError::BarNotMappable {
            bdf: bdf.to_string(),
            flags,
            size,
        });
    }
    if size < MIN_BAR0_SIZE {
        return Err(VfioSetupError::BarTooSmall {
            bdf: bdf.to_string(),
            size,
        });
    }

    let areas = mmap_areas(size, &device.get_region_caps(index));
    let fast_index = fast_area_index(&areas);
    let fd = device.as_raw_fd();
    let mut fast = MmioArea::empty();
    let mut others = Vec::new();
    for (i, &(off, len)) in areas.iter().enumerate() {
        let map_err = |source: io::Error| VfioSetupError::BarMap {
            bdf: bdf.to_string(),
            offset: off,
            len,
            source,
        };
        let too_big = || {
            map_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "area does not fit the address space",
            ))
        };
        let start = usize::try_from(off).map_err(|_| too_big())?;
        let ulen = usize::try_from(len).map_err(|_| too_big())?;
        let area = MmioArea::map(fd, region_offset + off, start, ulen).map_err(map_err)?;
        log::debug!("{bdf}: BAR0 bytes {off:#x}..{:#x} mapped", off + len);
        if Some(i) == fast_index {
            fast = area;
        } else {
            others.push(area);
        }
    }
    if fast_index.is_none() {
        log::warn!("{bdf}: no part of BAR0 can be mmapped: every register access is a system call");
    } else if fast.rel(DOORBELL_BASE as usize).is_none() {
        log::warn!(
            "{bdf}: the doorbells are outside the mmappable part of BAR0: every doorbell write \
             is a system call"
        );
    }
    Ok(Bar0 {
        fast,
        others,
        region_offset,
        size,
        slow_warned: AtomicBool::new(false),
    })
}
