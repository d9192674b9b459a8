//! IOVA allocation inside the ranges the IOMMU accepts.
//!
//! IOVA = virtual address does not work under a vIOMMU with a 39-bit address width (user
//! space addresses reach 47 bits), so every DMA mapping gets an IOVA chosen here, inside the
//! ranges reported by VFIO (the IOVA range capability of `VFIO_IOMMU_GET_INFO`).
//!
//! Hand-written rather than rust-vmm's `vm-allocator`: its `AddressAllocator` manages one
//! contiguous range, while VFIO reports several (below and above the MSI window, say), so it
//! would take one allocator per range and a first-fit walk across them: as much code as this
//! map of free extents, which merges on free and serves any set of ranges.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::types::Iova;

/// Hands out aligned IOVA blocks from a set of ranges and takes them back.
///
/// Free space is kept as a map from start to end, merged on free, so fragmentation stays
/// bounded. Allocation is first fit, which keeps IOVAs low and compact.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    free: BTreeMap<u64, u64>,
}

impl IovaAllocator {
    /// An allocator over `ranges` (end exclusive). Overlapping ranges are merged. Addresses
    /// below 64 KiB are never handed out, so a zero IOVA is always a bug.
    pub fn new(ranges: &[Range<u64>]) -> IovaAllocator {
        let mut a = IovaAllocator {
            free: BTreeMap::new(),
        };
        for r in ranges {
            let start = r.start.max(0x1_0000);
            if start < r.end {
                a.insert_free(start, r.end);
            }
        }
        a
    }

    /// Allocate `len` bytes aligned to `align` (a power of two). None when no range has room.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<Iova> {
        debug_assert!(align.is_power_of_two() && len > 0);
        let (start, end, at) = self.free.iter().find_map(|(&start, &end)| {
            let at = start.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(len)? <= end).then_some((start, end, at))
        })?;
        self.free.remove(&start);
        if start < at {
            self.free.insert(start, at);
        }
        if at + len < end {
            self.free.insert(at + len, end);
        }
        Some(Iova(at))
    }

    /// Give back a block handed out by [`IovaAllocator::alloc`].
    pub fn free(&mut self, iova: Iova, len: u64) {
        self.insert_free(iova.0, iova.0 + len);
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    fn insert_free(&mut self, mut start: u64, mut end: u64) {
        // Merge with the block before, if it touches or overlaps.
        if let Some((&s, &e)) = self.free.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.free.remove(&s);
            }
        }
        // Merge with the blocks after that touch or overlap.
        while let Some((&s, &e)) = self.free.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.free.remove(&s);
        }
        self.free.insert(start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB2: u64 = 2 << 20;

    #[test]
    fn allocates_inside_ranges_aligned() {
        let mut a = IovaAllocator::new(&[0x1000..0x40_0000, 0x1_0000_0000..0x1_0040_0000]);
        // Above the 64 KiB floor, the first range holds one aligned 2 MiB block, at 2 MiB.
        let x = a.alloc(MB2, MB2).unwrap();
        assert_eq!(x, Iova(0x20_0000));
        // Next 2 MiB block must come from the second range.
        let y = a.alloc(MB2, MB2).unwrap();
        assert_eq!(y, Iova(0x1_0000_0000));
        let z = a.alloc(MB2, MB2).unwrap();
        assert_eq!(z, Iova(0x1_0020_0000));
        assert_eq!(a.alloc(MB2, MB2), None);
        // Small blocks still fit in the gaps.
        let s = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(s, Iova(0x1_0000));
    }

    #[test]
    fn never_hands_out_zero() {
        let mut a = IovaAllocator::new(std::slice::from_ref(&(0..0x2_0000)));
        assert_eq!(a.alloc(0x1000, 0x1000), Some(Iova(0x1_0000)));
    }

    #[test]
    fn free_merges_back() {
        let mut a = IovaAllocator::new(std::slice::from_ref(&(0x10_0000..0x50_0000)));
        let total = a.free_bytes();
        let x = a.alloc(0x1000, 0x1000).unwrap();
        let y = a.alloc(MB2, MB2).unwrap();
        let z = a.alloc(0x3000, 0x1000).unwrap();
        a.free(y, MB2);
        a.free(x, 0x1000);
        a.free(z, 0x3000);
        assert_eq!(a.free_bytes(), total);
        assert_eq!(a.free.len(), 1);
    }

    proptest! {
        #[test]
        fn blocks_never_overlap_and_stay_in_range(ops in proptest::collection::vec((1u64..64, 0u32..4, any::<bool>()), 1..200)) {
            let range = 0x40_0000u64..0x400_0000;
            let mut a = IovaAllocator::new(std::slice::from_ref(&range));
            let total = a.free_bytes();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (pages, align_shift, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (s, l) = live.swap_remove(0);
                    a.free(Iova(s), l);
                    continue;
                }
                let len = pages * 0x1000;
                let align = 0x1000u64 << (align_shift * 3);
                if let Some(Iova(s)) = a.alloc(len, align) {
                    prop_assert_eq!(s % align, 0);
                    prop_assert!(s >= range.start && s + len <= range.end);
                    for &(o, ol) in &live {
                        prop_assert!(s + len <= o || o + ol <= s, "overlap");
                    }
                    live.push((s, len));
                }
            }
            let used: u64 = live.iter().map(|l| l.1).sum();
            prop_assert_eq!(a.free_bytes() + used, total);
        }
    }
}
