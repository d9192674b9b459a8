//! The model's IOMMU: a translation table from IOVAs to the host memory registered with
//! [`Hardware::dma_map`](crate::hw::Hardware::dma_map), and the only place where the model
//! turns a host pointer into something it can read or write.
//!
//! Every access the "device" makes goes through [`IovaTable::for_each_slice`], which hands out
//! `vm_memory::VolatileSlice`s: no Rust reference into DMA memory is ever created. A range may
//! cross from one mapping into an adjacent one (a buffer built from two separately mapped
//! pieces); any byte outside every mapping is a DMA fault, which the command reports as a Data
//! Transfer Error.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{fence, Ordering};
use vm_memory::{Bytes, VolatileSlice};

/// First IOVA the model accepts (like the real vIOMMU, the space does not start at 0).
pub(super) const IOVA_START: u64 = 0x1000_0000;
/// End (exclusive) of the IOVA space: 39 address bits, as the QEMU vIOMMU reports.
pub(super) const IOVA_END: u64 = 1 << 39;
/// Granularity of mappings.
const MAP_ALIGN: u64 = 4096;

/// A host address registered with `dma_map`.
#[derive(Copy, Clone, Debug)]
struct HostPtr(*mut u8);

// SAFETY: the pointer is only dereferenced through `IovaTable::for_each_slice`, which runs with
// the model's lock held; the `dma_map` contract keeps the memory valid for device access, from
// any thread, until `dma_unmap` removes the entry, and that also needs the lock.
unsafe impl Send for HostPtr {}

#[derive(Debug)]
struct Mapping {
    host: HostPtr,
    len: u64,
}

/// An access to an IOVA that no mapping covers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct DmaFault {
    /// The first address that is not mapped.
    pub iova: u64,
}

impl fmt::Display for DmaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IOVA {:#x} is not DMA-mapped", self.iova)
    }
}

/// Why a mapping request was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MapRefusal {
    /// An argument is not 4 KiB aligned, zero, or null.
    BadArgument(String),
    /// The IOVA range lies outside the IOVA space.
    OutOfRange,
    /// The IOVA range overlaps an existing mapping starting at this IOVA.
    Overlap(u64),
    /// No mapping with exactly this IOVA and length exists.
    NotMapped,
}

impl fmt::Display for MapRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapRefusal::BadArgument(why) => write!(f, "{why}"),
            MapRefusal::OutOfRange => write!(
                f,
                "the range is outside the IOVA space [{IOVA_START:#x}, {IOVA_END:#x})"
            ),
            MapRefusal::Overlap(at) => {
                write!(f, "the range overlaps the mapping at IOVA {at:#x}")
            }
            MapRefusal::NotMapped => {
                write!(f, "no mapping with exactly this IOVA and length exists")
            }
        }
    }
}

/// The translation table.
#[derive(Debug, Default)]
pub(super) struct IovaTable {
    /// Mappings by first IOVA; they never overlap.
    maps: BTreeMap<u64, Mapping>,
    /// Sum of the mapped lengths.
    bytes: u64,
}

impl IovaTable {
    /// Record a mapping of `len` bytes of host memory at `vaddr` to `iova`.
    ///
    /// The caller (the `dma_map` implementation) passes on the `dma_map` contract: the memory
    /// stays valid until [`IovaTable::unmap`] removes this entry and is only accessed with
    /// volatile or atomic operations meanwhile.
    pub fn map(&mut self, vaddr: *mut u8, len: usize, iova: u64) -> Result<(), MapRefusal> {
        let len = len as u64;
        if vaddr.is_null() {
            return Err(MapRefusal::BadArgument("the host address is null".into()));
        }
        if len == 0 || !len.is_multiple_of(MAP_ALIGN) {
            return Err(MapRefusal::BadArgument(format!(
                "the length {len:#x} is not a nonzero multiple of 4 KiB"
            )));
        }
        if !iova.is_multiple_of(MAP_ALIGN) {
            return Err(MapRefusal::BadArgument(format!(
                "the IOVA {iova:#x} is not 4 KiB aligned"
            )));
        }
        if !(vaddr as usize).is_multiple_of(MAP_ALIGN as usize) {
            return Err(MapRefusal::BadArgument(format!(
                "the host address {vaddr:p} is not 4 KiB aligned"
            )));
        }
        let end = iova.checked_add(len).ok_or(MapRefusal::OutOfRange)?;
        if iova < IOVA_START || end > IOVA_END {
            return Err(MapRefusal::OutOfRange);
        }
        if let Some((&start, m)) = self.maps.range(..end).next_back() {
            if start + m.len > iova {
                return Err(MapRefusal::Overlap(start));
            }
        }
        self.maps.insert(
            iova,
            Mapping {
                host: HostPtr(vaddr),
                len,
            },
        );
        self.bytes += len;
        Ok(())
    }

    /// Remove exactly the mapping made at `iova` with `len` bytes.
    pub fn unmap(&mut self, iova: u64, len: usize) -> Result<(), MapRefusal> {
        match self.maps.get(&iova) {
            Some(m) if m.len == len as u64 => {
                self.maps.remove(&iova);
                self.bytes -= len as u64;
                Ok(())
            }
            _ => Err(MapRefusal::NotMapped),
        }
    }

    /// Bytes currently mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether every byte of `[iova, iova + len)` is mapped.
    pub fn check(&self, iova: u64, len: u64) -> Result<(), DmaFault> {
        self.walk(iova, len, |_, _, _| {})
    }

    /// Walk `[iova, iova + len)` mapping by mapping: `f(mapping, offset in it, length)`.
    fn walk<F>(&self, iova: u64, len: u64, mut f: F) -> Result<(), DmaFault>
    where
        F: FnMut(&Mapping, u64, u64),
    {
        let end = iova.checked_add(len).ok_or(DmaFault { iova })?;
        let mut cur = iova;
        while cur < end {
            let fault = DmaFault { iova: cur };
            let (&start, m) = self.maps.range(..=cur).next_back().ok_or(fault)?;
            let off = cur - start;
            if off >= m.len {
                return Err(fault);
            }
            let n = (m.len - off).min(end - cur);
            f(m, off, n);
            cur += n;
        }
        Ok(())
    }

    /// Call `f` with a volatile view of each host piece of `[iova, iova + len)`, in address
    /// order. Nothing is called unless the whole range is mapped.
    pub fn for_each_slice<F>(&self, iova: u64, len: u64, mut f: F) -> Result<(), DmaFault>
    where
        F: FnMut(VolatileSlice<'_>),
    {
        self.check(iova, len)?;
        self.walk(iova, len, |m, off, n| {
            // SAFETY: `off + n <= m.len`, so the range lies inside the memory registered with
            // `dma_map`, which by its contract stays allocated until `dma_unmap` and is only
            // accessed volatilely; `dma_unmap` needs `&mut self`, so it cannot run while the
            // slice (borrowing `self`) is alive.
            let slice = unsafe { VolatileSlice::new(m.host.0.add(off as usize), n as usize) };
            f(slice);
        })
    }

    /// Read `buf.len()` bytes of device memory at `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let mut done = 0;
        self.for_each_slice(iova, buf.len() as u64, |s| {
            let n = s.len();
            s.copy_to(&mut buf[done..done + n]);
            done += n;
        })
    }

    /// Write `buf` to device memory at `iova`.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        let mut done = 0;
        self.for_each_slice(iova, buf.len() as u64, |s| {
            let n = s.len();
            s.copy_from(&buf[done..done + n]);
            done += n;
        })
    }

    /// Write a completion queue entry at `iova` (16-byte aligned) the way a device does: the
    /// first twelve bytes, then the last dword (which holds the phase tag) with release
    /// ordering, so a host that sees the new phase tag and then issues an acquire fence sees
    /// the whole entry.
    pub fn write_cqe(&self, iova: u64, entry: &[u8; 16]) -> Result<(), DmaFault> {
        self.check(iova, 16)?;
        self.write(iova, &entry[..12])?;
        let dw3 = u32::from_le_bytes([entry[12], entry[13], entry[14], entry[15]]);
        let mut result = Ok(());
        self.for_each_slice(iova + 12, 4, |s| {
            // Order the first twelve bytes before the phase tag even if the slice store below
            // had to fall back to plain volatile writes.
            fence(Ordering::Release);
            if s.store(dw3, 0, Ordering::Release).is_err() {
                result = Err(DmaFault { iova: iova + 12 });
            }
        })?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    struct Block {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Block {
        fn new(len: usize) -> Block {
            let layout = Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: the layout has a nonzero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Block { ptr, layout }
        }
    }

    impl Drop for Block {
        fn drop(&mut self) {
            // SAFETY: allocated in `Block::new` with this layout.
            unsafe { dealloc(self.ptr, self.layout) };
        }
    }

    #[test]
    fn map_rejects_bad_arguments_and_overlaps() {
        let b = Block::new(4 * 4096);
        let mut t = IovaTable::default();
        let base = IOVA_START;
        assert!(matches!(
            t.map(b.ptr, 100, base),
            Err(MapRefusal::BadArgument(_))
        ));
        assert!(matches!(
            t.map(b.ptr, 0, base),
            Err(MapRefusal::BadArgument(_))
        ));
        assert!(matches!(
            t.map(b.ptr, 4096, base + 8),
            Err(MapRefusal::BadArgument(_))
        ));
        // SAFETY: one byte into the block, still inside it.
        let odd = unsafe { b.ptr.add(1) };
        assert!(matches!(
            t.map(odd, 4096, base),
            Err(MapRefusal::BadArgument(_))
        ));
        assert_eq!(t.map(b.ptr, 4096, 0), Err(MapRefusal::OutOfRange));
        assert_eq!(t.map(b.ptr, 4096, IOVA_END), Err(MapRefusal::OutOfRange));
        t.map(b.ptr, 2 * 4096, base + 4096).unwrap();
        assert_eq!(
            t.map(b.ptr, 2 * 4096, base),
            Err(MapRefusal::Overlap(base + 4096))
        );
        assert_eq!(
            t.map(b.ptr, 4096, base + 2 * 4096),
            Err(MapRefusal::Overlap(base + 4096))
        );
        t.map(b.ptr, 4096, base).unwrap();
        t.map(b.ptr, 4096, base + 3 * 4096).unwrap();
        assert_eq!(t.mapped_bytes(), 4 * 4096);
        assert_eq!(t.unmap(base + 4096, 4096), Err(MapRefusal::NotMapped));
        assert_eq!(t.unmap(base + 8192, 4096), Err(MapRefusal::NotMapped));
        t.unmap(base + 4096, 8192).unwrap();
        assert_eq!(t.mapped_bytes(), 2 * 4096);
    }

    #[test]
    fn accesses_cross_adjacent_mappings_but_not_holes() {
        let a = Block::new(4096);
        let b = Block::new(4096);
        let mut t = IovaTable::default();
        t.map(a.ptr, 4096, IOVA_START).unwrap();
        t.map(b.ptr, 4096, IOVA_START + 4096).unwrap();
        let data: Vec<u8> = (0..200u8).collect();
        t.write(IOVA_START + 4000, &data).unwrap();
        let mut back = vec![0u8; 200];
        t.read(IOVA_START + 4000, &mut back).unwrap();
        assert_eq!(back, data);
        let mut pieces = Vec::new();
        t.for_each_slice(IOVA_START + 4000, 200, |s| pieces.push(s.len()))
            .unwrap();
        assert_eq!(pieces, vec![96, 104]);
        assert_eq!(
            t.check(IOVA_START + 4096, 4097),
            Err(DmaFault {
                iova: IOVA_START + 8192
            })
        );
        assert_eq!(
            t.check(IOVA_START - 1, 2),
            Err(DmaFault {
                iova: IOVA_START - 1
            })
        );
        let mut calls = 0;
        assert!(t
            .for_each_slice(IOVA_START, 3 * 4096, |_| calls += 1)
            .is_err());
        assert_eq!(
            calls, 0,
            "nothing is touched when part of the range is unmapped"
        );
    }
}
