//! PRP (Physical Region Page) data pointers for a scattered buffer (Base spec §4.1.1).
//!
//! Invariants of a PRP transfer, checked before anything is built:
//! - PRP1 is the only entry that may point inside a page; its offset is dword aligned.
//! - Every other entry points at the start of a page, and every page but the first and the last
//!   is full. For a segment list this means: segments after the first start page aligned, and
//!   segments before the last end on a page boundary.
//! - PRP2 is 0 when the transfer stays within the first page, the second page when it spans
//!   exactly two, and otherwise a PRP list: 512 entries per list page, the last entry of a page
//!   chaining to the next list page when more entries remain than fit.
//!
//! The builder writes list entries through [`ListPages`], so it needs no heap, no pointers and
//! no device: it is pure arithmetic on IOVAs.

use crate::spec::{PAGE_SIZE, PRP_ENTRIES_PER_PAGE};
use crate::types::{Iova, Segment};

const PAGE: u64 = PAGE_SIZE as u64;
const PAGE_MASK: u64 = PAGE - 1;
/// Data entries on a list page that chains to another one (the last slot holds the pointer).
const CHAINED_ENTRIES: u64 = PRP_ENTRIES_PER_PAGE as u64 - 1;

/// The pages a builder may write list entries into (a queue slot's preallocated list page,
/// then further pages fetched on demand). Page 0 is the first list page.
pub trait ListPages {
    /// The IOVA of list page `page`, or None if no more pages can be had.
    fn page_iova(&mut self, page: usize) -> Option<Iova>;
    /// Write the 8-byte little-endian word `index` (0..512) of list page `page`.
    fn write_qword(&mut self, page: usize, index: usize, value: u64);
}

/// The two PRP entries of a command's DPTR.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Prp {
    /// Start of the data, possibly at a dword-aligned offset in its page.
    pub prp1: u64,
    /// 0, the second data page, or the first PRP list page.
    pub prp2: u64,
}

/// Why a segment list cannot be described by PRPs.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum PrpError {
    /// No segments at all.
    #[error("PRP: empty segment list; a data transfer needs at least one segment")]
    Empty,
    /// A segment of zero bytes.
    #[error("PRP: segment {index} at {iova} has zero length; drop empty segments before building")]
    ZeroLength { index: usize, iova: Iova },
    /// The first segment starts at an offset whose bits 1:0 are not zero.
    #[error(
        "PRP offset not dword aligned: segment 0 starts at {iova} (bits 1:0 must be zero); \
         use a 4-byte aligned buffer"
    )]
    OffsetNotDwordAligned { iova: Iova },
    /// A segment after the first does not start at a page boundary.
    #[error(
        "PRP: segment {index} starts at {iova}, inside a page; only the first segment may \
         start at an offset (use SGLs or bounce the data)"
    )]
    StartNotPageAligned { index: usize, iova: Iova },
    /// A segment before the last does not end at a page boundary.
    #[error(
        "PRP: segment {index} ends at {end:#x}, inside a page; only the last segment may end \
         short of a page boundary (use SGLs or bounce the data)"
    )]
    EndNotPageAligned { index: usize, end: u64 },
    /// A segment runs past the end of the 64-bit address space.
    #[error(
        "PRP: segment {index} at {iova} of {len} bytes runs past the end of the address space"
    )]
    AddressOverflow { index: usize, iova: Iova, len: u32 },
    /// The transfer is longer than a command can carry.
    #[error(
        "PRP: transfer reaches {total} bytes at segment {index}, more than the {max} bytes a \
         command can carry; split the I/O",
        max = u32::MAX
    )]
    TooLong { index: usize, total: u64 },
    /// The list page supply ran out.
    #[error(
        "PRP: the transfer needs {needed} PRP list pages but only {available} could be had; \
         split the I/O or provide more list pages"
    )]
    ListPagesExhausted { needed: usize, available: usize },
}

/// Number of PRP list pages needed for `entries` list entries.
#[inline]
const fn list_pages_for_entries(entries: u64) -> usize {
    if entries == 0 {
        0
    } else if entries <= PRP_ENTRIES_PER_PAGE as u64 {
        1
    } else {
        // Every page but the last carries 511 entries and a pointer; the last up to 512.
        (entries - 1).div_ceil(CHAINED_ENTRIES) as usize
    }
}

/// How many PRP list pages a transfer of `total_len` bytes needs whose first byte sits at
/// `first_offset` in its page (only the offset within the page counts, so an IOVA may be
/// passed). 0 when PRP1 and PRP2 alone describe it.
#[inline]
pub const fn prp_list_pages_needed(total_len: u64, first_offset: u64) -> usize {
    if total_len == 0 {
        return 0;
    }
    let pages = ((first_offset & PAGE_MASK) + total_len).div_ceil(PAGE);
    if pages <= 2 {
        0
    } else {
        list_pages_for_entries(pages - 1)
    }
}

/// Writes list entries one after the other, chaining list pages as needed.
struct ListWriter<'a, L: ListPages> {
    lists: &'a mut L,
    /// Total list pages this transfer needs (for the error message).
    needed: usize,
    page: usize,
    index: usize,
    /// Entries still to be written, including the next one.
    remaining: u64,
}

impl<L: ListPages> ListWriter<'_, L> {
    #[inline]
    fn page_iova(&mut self, page: usize) -> Result<u64, PrpError> {
        match self.lists.page_iova(page) {
            Some(iova) => {
                debug_assert_eq!(
                    iova.0 & PAGE_MASK,
                    0,
                    "PRP list page {page} at {iova} is not page aligned"
                );
                Ok(iova.0)
            }
            None => Err(PrpError::ListPagesExhausted {
                needed: self.needed,
                available: page,
            }),
        }
    }

    #[inline]
    fn push(&mut self, entry: u64) -> Result<(), PrpError> {
        debug_assert!(self.remaining > 0, "more PRP entries written than counted");
        if self.index == PRP_ENTRIES_PER_PAGE - 1 && self.remaining > 1 {
            // More entries remain than this page holds: its last slot points at the next one.
            let next = self.page_iova(self.page + 1)?;
            self.lists.write_qword(self.page, self.index, next);
            self.page += 1;
            self.index = 0;
        }
        self.lists.write_qword(self.page, self.index, entry);
        self.index += 1;
        self.remaining -= 1;
        Ok(())
    }
}

/// Build the PRP entries describing `segments`, in order, writing a PRP list into `lists`
/// when the transfer spans more than two pages. The memory page size is [`PAGE_SIZE`].
///
/// Rejects, naming the segment and the rule: an empty list, zero-length segments, a first
/// segment that is not dword aligned, a later segment that does not start on a page boundary,
/// an earlier segment that does not end on one, and transfers longer than `u32::MAX` bytes.
/// Fails with [`PrpError::ListPagesExhausted`] when `lists` cannot supply enough pages.
#[inline]
pub fn build_prp<S: AsRef<Segment>>(
    segments: &[S],
    lists: &mut impl ListPages,
) -> Result<Prp, PrpError> {
    // Fast path: one dword-aligned segment inside one page needs PRP1 only (a 4 KiB I/O).
    if let [seg] = segments {
        let seg = seg.as_ref();
        let start = seg.iova.0;
        if seg.len != 0 && start & 3 == 0 && (start & PAGE_MASK) + seg.len as u64 <= PAGE {
            return Ok(Prp {
                prp1: start,
                prp2: 0,
            });
        }
    }
    build_prp_general(segments, lists)
}

fn build_prp_general<S: AsRef<Segment>>(
    segments: &[S],
    lists: &mut impl ListPages,
) -> Result<Prp, PrpError> {
    let Some((first, _)) = segments.split_first() else {
        return Err(PrpError::Empty);
    };
    let first = first.as_ref();
    let last = segments.len() - 1;
    let mut total: u64 = 0;
    // Number of data pages, counting the first one (PRP1).
    let mut pages: u64 = 0;
    for (index, seg) in segments.iter().enumerate() {
        let seg = seg.as_ref();
        let start = seg.iova.0;
        if seg.len == 0 {
            return Err(PrpError::ZeroLength {
                index,
                iova: seg.iova,
            });
        }
        if index == 0 {
            if start & 3 != 0 {
                return Err(PrpError::OffsetNotDwordAligned { iova: seg.iova });
            }
        } else if start & PAGE_MASK != 0 {
            return Err(PrpError::StartNotPageAligned {
                index,
                iova: seg.iova,
            });
        }
        let Some(end) = start.checked_add(seg.len as u64) else {
            return Err(PrpError::AddressOverflow {
                index,
                iova: seg.iova,
                len: seg.len,
            });
        };
        if index != last && end & PAGE_MASK != 0 {
            return Err(PrpError::EndNotPageAligned { index, end });
        }
        total += seg.len as u64;
        if total > u32::MAX as u64 {
            return Err(PrpError::TooLong { index, total });
        }
        pages += (end - (start & !PAGE_MASK)).div_ceil(PAGE);
    }

    let prp1 = first.iova.0;
    let first_page = prp1 & !PAGE_MASK;
    let first_end = prp1 + first.len as u64;
    let prp2 = match pages {
        1 => 0,
        2 => {
            if first_end - first_page > PAGE {
                first_page + PAGE
            } else {
                segments[1].as_ref().iova.0
            }
        }
        _ => {
            let entries = pages - 1;
            let mut writer = ListWriter {
                needed: list_pages_for_entries(entries),
                lists,
                page: 0,
                index: 0,
                remaining: entries,
            };
            let list = writer.page_iova(0)?;
            // The pages of the first segment after its first one, then all pages of the
            // others (page aligned). Counting pages rather than comparing addresses keeps a
            // segment ending in the last page of the address space from overflowing.
            for i in 1..(first_end - first_page).div_ceil(PAGE) {
                writer.push(first_page + i * PAGE)?;
            }
            for seg in &segments[1..] {
                let seg = seg.as_ref();
                for i in 0..(seg.len as u64).div_ceil(PAGE) {
                    writer.push(seg.iova.0 + i * PAGE)?;
                }
            }
            debug_assert_eq!(
                writer.remaining, 0,
                "fewer PRP entries written than counted"
            );
            list
        }
    };
    Ok(Prp { prp1, prp2 })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// List pages held in test memory, at scattered page-aligned IOVAs far from the data.
    /// Unwritten entries read as `None`, so a walker that reads them fails.
    pub(crate) struct TestPages {
        pub limit: usize,
        pub pages: Vec<Vec<Option<u64>>>,
        pub fetched: usize,
    }

    impl TestPages {
        pub(crate) fn new(limit: usize) -> TestPages {
            TestPages {
                limit,
                pages: Vec::new(),
                fetched: 0,
            }
        }

        /// Where list page `page` sits: not adjacent to its neighbours.
        pub(crate) fn iova_of(page: usize) -> u64 {
            0x7f00_0000_0000 + 0x3000 * page as u64 + if page % 2 == 1 { 0x100_0000 } else { 0 }
        }

        /// The qword at `iova` as the device would read it; panics if it is not in a list
        /// page or was never written.
        pub(crate) fn read(&self, iova: u64) -> u64 {
            assert_eq!(iova % 8, 0, "list read at {iova:#x} is not qword aligned");
            let page = (0..self.pages.len())
                .find(|&p| Self::iova_of(p) == iova & !PAGE_MASK)
                .unwrap_or_else(|| panic!("device read {iova:#x}, which is no list page"));
            self.pages[page][((iova & PAGE_MASK) / 8) as usize]
                .unwrap_or_else(|| panic!("device read unwritten list qword at {iova:#x}"))
        }

        pub(crate) fn written(&self) -> usize {
            self.pages.iter().flatten().filter(|q| q.is_some()).count()
        }

        pub(crate) fn entries(&self, page: usize) -> Vec<u64> {
            self.pages[page].iter().map_while(|q| *q).collect()
        }
    }

    impl ListPages for TestPages {
        fn page_iova(&mut self, page: usize) -> Option<Iova> {
            assert_eq!(
                page, self.fetched,
                "list pages must be fetched in order, once each"
            );
            if page >= self.limit {
                return None;
            }
            self.fetched += 1;
            self.pages.push(vec![None; PRP_ENTRIES_PER_PAGE]);
            Some(Iova(Self::iova_of(page)))
        }

        fn write_qword(&mut self, page: usize, index: usize, value: u64) {
            assert!(
                page < self.fetched,
                "write to list page {page} before it was fetched"
            );
            assert!(
                index < PRP_ENTRIES_PER_PAGE,
                "qword index {index} out of the page"
            );
            assert!(
                self.pages[page][index].is_none(),
                "list qword {page}/{index} written twice"
            );
            self.pages[page][index] = Some(value);
        }
    }

    /// Merge adjacent byte ranges, so two descriptions of the same bytes compare equal.
    pub(crate) fn normalize(runs: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (addr, len) in runs {
            assert!(len > 0, "empty run at {addr:#x}");
            match out.last_mut() {
                Some((a, l)) if *a + *l == addr => *l += len,
                _ => out.push((addr, len)),
            }
        }
        out
    }

    pub(crate) fn segment_runs(segments: &[Segment]) -> Vec<(u64, u64)> {
        normalize(segments.iter().map(|s| (s.iova.0, s.len as u64)))
    }

    /// Walk the PRPs of a `len`-byte transfer the way a controller does, returning the byte
    /// ranges it transfers, in order, and the number of list qwords it read.
    fn device_walk(prp: Prp, len: u64, mem: &TestPages) -> (Vec<(u64, u64)>, usize) {
        assert_eq!(prp.prp1 & 3, 0, "PRP1 offset not dword aligned");
        let mut runs = Vec::new();
        let first = len.min(PAGE - (prp.prp1 & PAGE_MASK));
        runs.push((prp.prp1, first));
        let mut left = len - first;
        let mut reads = 0;
        if left == 0 {
            assert_eq!(prp.prp2, 0, "PRP2 must be 0 for a transfer within one page");
        } else if left <= PAGE {
            assert_eq!(prp.prp2 & PAGE_MASK, 0, "direct PRP2 not page aligned");
            runs.push((prp.prp2, left));
        } else {
            let mut entries_left = left.div_ceil(PAGE);
            let mut at = prp.prp2;
            while left > 0 {
                // At the last slot of a list page with more entries to come: a chain pointer.
                if (at & PAGE_MASK) == PAGE - 8 && entries_left > 1 {
                    at = mem.read(at);
                    reads += 1;
                    assert_eq!(at & PAGE_MASK, 0, "chained PRP list not page aligned");
                }
                let entry = mem.read(at);
                reads += 1;
                assert_eq!(
                    entry & PAGE_MASK,
                    0,
                    "PRP list entry {entry:#x} not page aligned"
                );
                let n = left.min(PAGE);
                runs.push((entry, n));
                left -= n;
                entries_left -= 1;
                at += 8;
            }
        }
        (normalize(runs), reads)
    }

    fn seg(iova: u64, len: u32) -> Segment {
        Segment::new(Iova(iova), len)
    }

    /// Build, then check the device sees exactly the segments' bytes and that every written
    /// list qword is read by the device.
    fn build_and_walk(segments: &[Segment], limit: usize) -> (Result<Prp, PrpError>, TestPages) {
        let mut pages = TestPages::new(limit);
        let result = build_prp(segments, &mut pages);
        if let Ok(prp) = result {
            let total: u64 = segments.iter().map(|s| s.len as u64).sum();
            let (runs, reads) = device_walk(prp, total, &pages);
            assert_eq!(
                runs,
                segment_runs(segments),
                "device walk differs from the input"
            );
            assert_eq!(reads, pages.written(), "list qwords written but never read");
            let off = segments[0].iova.0;
            assert_eq!(
                pages.fetched,
                prp_list_pages_needed(total, off),
                "list pages fetched"
            );
        }
        (result, pages)
    }

    const BUF: u64 = 0x10_0000;
    const KIB: u32 = 1024;
    const MIB: u32 = 1024 * 1024;

    fn pages_from(start: u64, n: u64) -> Vec<u64> {
        (0..n).map(|i| start + i * PAGE).collect()
    }

    #[test]
    fn one_page() {
        let (r, p) = build_and_walk(&[seg(BUF, 4 * KIB)], 4);
        assert_eq!(r, Ok(Prp { prp1: BUF, prp2: 0 }));
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn two_pages_direct() {
        let (r, p) = build_and_walk(&[seg(BUF, 8 * KIB)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: BUF + 0x1000
            })
        );
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn three_pages_list() {
        let (r, p) = build_and_walk(&[seg(BUF, 12 * KIB)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.entries(0), vec![BUF + 0x1000, BUF + 0x2000]);
    }

    #[test]
    fn offset_within_one_page() {
        let (r, p) = build_and_walk(&[seg(BUF + 0x200, 3584)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF + 0x200,
                prp2: 0
            })
        );
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn offset_spanning_two_pages() {
        let (r, p) = build_and_walk(&[seg(BUF + 0x200, 4096)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF + 0x200,
                prp2: BUF + 0x1000
            })
        );
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn offset_spanning_three_pages() {
        let (r, p) = build_and_walk(&[seg(BUF + 0x200, 8192)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF + 0x200,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.entries(0), vec![BUF + 0x1000, BUF + 0x2000]);
    }

    #[test]
    fn offset_not_dword_aligned() {
        let (r, p) = build_and_walk(&[seg(BUF + 0x202, 4096)], 4);
        assert_eq!(
            r,
            Err(PrpError::OffsetNotDwordAligned {
                iova: Iova(BUF + 0x202)
            })
        );
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("PRP offset not dword aligned"));
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn two_mib_fills_one_list_page_with_511() {
        let (r, p) = build_and_walk(&[seg(BUF, 2 * MIB)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.fetched, 1);
        assert_eq!(p.entries(0), pages_from(BUF + 0x1000, 511));
    }

    #[test]
    fn two_mib_plus_one_page_fills_512() {
        let (r, p) = build_and_walk(&[seg(BUF, 2 * MIB + 4 * KIB)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.fetched, 1);
        assert_eq!(p.entries(0), pages_from(BUF + 0x1000, 512));
    }

    #[test]
    fn two_mib_plus_two_pages_chains() {
        let (r, p) = build_and_walk(&[seg(BUF, 2 * MIB + 8 * KIB)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.fetched, 2);
        let mut a = pages_from(BUF + 0x1000, 511);
        a.push(TestPages::iova_of(1));
        assert_eq!(p.entries(0), a);
        assert_eq!(
            p.entries(1),
            vec![BUF + 0x1000 + 511 * PAGE, BUF + 0x1000 + 512 * PAGE]
        );
    }

    #[test]
    fn four_mib_aligned_uses_two_full_list_pages() {
        // 1024 pages: PRP1 + 1023 entries = 511 (+ pointer) on page A and 512 on page B.
        let (r, p) = build_and_walk(&[seg(BUF, 4 * MIB)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.fetched, 2);
        let mut a = pages_from(BUF + 0x1000, 511);
        a.push(TestPages::iova_of(1));
        assert_eq!(p.entries(0), a);
        assert_eq!(p.entries(1), pages_from(BUF + 0x1000 + 511 * PAGE, 512));
    }

    #[test]
    fn four_mib_at_offset_uses_three_list_pages() {
        // 1025 pages: 1024 entries = 511 + 511 + 2.
        let (r, p) = build_and_walk(&[seg(BUF + 0x200, 4 * MIB)], 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF + 0x200,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.fetched, 3);
        let mut a = pages_from(BUF + 0x1000, 511);
        a.push(TestPages::iova_of(1));
        let mut b = pages_from(BUF + 0x1000 + 511 * PAGE, 511);
        b.push(TestPages::iova_of(2));
        assert_eq!(p.entries(0), a);
        assert_eq!(p.entries(1), b);
        assert_eq!(p.entries(2), pages_from(BUF + 0x1000 + 1022 * PAGE, 2));
    }

    #[test]
    fn four_mib_plus_one_page_uses_three_list_pages() {
        let (r, p) = build_and_walk(&[seg(BUF, 4 * MIB + 4 * KIB)], 4);
        assert!(r.is_ok());
        assert_eq!(p.fetched, 3);
        assert_eq!(p.entries(2), pages_from(BUF + 0x1000 + 1022 * PAGE, 2));
    }

    #[test]
    fn middle_segment_at_offset_rejected() {
        let segs = [seg(BUF, 4096), seg(0x20_0200, 4096), seg(0x30_0000, 4096)];
        let (r, _) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Err(PrpError::StartNotPageAligned {
                index: 1,
                iova: Iova(0x20_0200)
            })
        );
    }

    #[test]
    fn middle_segment_ending_inside_page_rejected() {
        let segs = [seg(BUF, 4096), seg(0x20_0000, 2048), seg(0x30_0000, 4096)];
        let (r, _) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Err(PrpError::EndNotPageAligned {
                index: 1,
                end: 0x20_0800
            })
        );
    }

    #[test]
    fn first_segment_ending_inside_page_rejected() {
        let segs = [seg(BUF + 0x200, 4096), seg(0x20_0000, 4096)];
        let (r, _) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Err(PrpError::EndNotPageAligned {
                index: 0,
                end: BUF + 0x1200
            })
        );
    }

    #[test]
    fn last_segment_of_1k_accepted() {
        let segs = [seg(BUF, 4096), seg(0x20_0000, KIB)];
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: 0x20_0000
            })
        );
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn first_segment_two_pages_then_1k_uses_list() {
        let segs = [seg(BUF + 0x800, 0x1800), seg(0x20_0000, KIB)];
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF + 0x800,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.entries(0), vec![BUF + 0x1000, 0x20_0000]);
    }

    #[test]
    fn scattered_pages() {
        let segs = [
            seg(0x9000 + 0x100, 0xf00),
            seg(0x40_0000, 0x2000),
            seg(0x1_0000, 0x1000),
            seg(0x77_7000, 0x1000),
            seg(0x5000, 0x10),
        ];
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: 0x9100,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(
            p.entries(0),
            vec![0x40_0000, 0x40_1000, 0x1_0000, 0x77_7000, 0x5000]
        );
    }

    #[test]
    fn scattered_pages_chain_across_list_pages() {
        // 600 single pages, each far from the previous one, in descending order.
        let segs: Vec<Segment> = (0..600u64)
            .map(|i| seg((1000 - i) * 0x10_0000, 4096))
            .collect();
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: 1000 * 0x10_0000,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.fetched, 2);
        assert_eq!(p.entries(0)[511], TestPages::iova_of(1));
        assert_eq!(p.entries(1).len(), 599 - 511);
        assert_eq!(p.entries(1)[0], (1000 - 512) * 0x10_0000);
    }

    #[test]
    fn not_enough_list_pages() {
        let (r, _) = build_and_walk(&[seg(BUF, 12 * KIB)], 0);
        assert_eq!(
            r,
            Err(PrpError::ListPagesExhausted {
                needed: 1,
                available: 0
            })
        );
        let (r, _) = build_and_walk(&[seg(BUF, 2 * MIB + 8 * KIB)], 1);
        assert_eq!(
            r,
            Err(PrpError::ListPagesExhausted {
                needed: 2,
                available: 1
            })
        );
        let err = build_and_walk(&[seg(BUF, 4 * MIB + 4 * KIB)], 2)
            .0
            .unwrap_err();
        assert_eq!(
            err,
            PrpError::ListPagesExhausted {
                needed: 3,
                available: 2
            }
        );
        assert!(err.to_string().contains("needs 3 PRP list pages"));
    }

    #[test]
    fn empty_and_zero_length_rejected() {
        assert_eq!(build_and_walk(&[], 4).0, Err(PrpError::Empty));
        let segs = [seg(BUF, 4096), seg(0x20_0000, 0)];
        assert_eq!(
            build_and_walk(&segs, 4).0,
            Err(PrpError::ZeroLength {
                index: 1,
                iova: Iova(0x20_0000)
            })
        );
    }

    #[test]
    fn too_long_rejected() {
        let segs = [seg(0, u32::MAX), seg(0x1_0000_0000, 4096)];
        // The first segment ends inside a page, which is found first.
        assert_eq!(
            build_and_walk(&segs, 4).0,
            Err(PrpError::EndNotPageAligned {
                index: 0,
                end: 0xffff_ffff
            })
        );
        let segs = [seg(0, u32::MAX - 4095), seg(0x1_0000_0000, 4096)];
        assert_eq!(
            build_and_walk(&segs, 4).0,
            Err(PrpError::TooLong {
                index: 1,
                total: 1 << 32
            })
        );
        // Exactly u32::MAX bytes is accepted as far as length goes (then needs 2 list pages+).
        let segs = [seg(0, u32::MAX - 4095), seg(0x1_0000_0000, 4095)];
        let needed = prp_list_pages_needed(u32::MAX as u64, 0);
        assert_eq!(
            build_and_walk(&segs, 0).0,
            Err(PrpError::ListPagesExhausted {
                needed,
                available: 0
            })
        );
    }

    #[test]
    fn segment_ending_at_top_of_address_space() {
        let top = u64::MAX - 0x1fff; // page aligned, two pages below 2^64
        let segs = [seg(BUF, 4096), seg(top, 0x1fff)];
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: BUF,
                prp2: TestPages::iova_of(0)
            })
        );
        assert_eq!(p.entries(0), vec![top, top + 0x1000]);
        let segs = [seg(top + 0x10, 0x1fef)];
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(Prp {
                prp1: top + 0x10,
                prp2: top + 0x1000
            })
        );
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn address_overflow_rejected() {
        let segs = [seg(u64::MAX - 0xfff, 0x2000)];
        assert_eq!(
            build_and_walk(&segs, 4).0,
            Err(PrpError::AddressOverflow {
                index: 0,
                iova: Iova(u64::MAX - 0xfff),
                len: 0x2000
            })
        );
    }

    #[test]
    fn list_pages_needed_table() {
        let cases: &[(u64, u64, usize)] = &[
            (0, 0, 0),
            (1, 0, 0),
            (4096, 0, 0),
            (8192, 0, 0),
            (8193, 0, 1),
            (3584, 0x200, 0),
            (4096, 0x200, 0),
            (8192, 0x200, 1),
            (2 << 20, 0, 1),
            ((2 << 20) + 4096, 0, 1),
            ((2 << 20) + 4097, 0, 2),
            ((2 << 20) + 8192, 0, 2),
            (4 << 20, 0, 2),
            ((4 << 20) + 1, 0, 3),
            (4 << 20, 0x200, 3),
            // An IOVA may be passed as the offset: only its bits within the page count.
            (4 << 20, 0x1234_5200, 3),
        ];
        for &(len, off, want) in cases {
            assert_eq!(
                prp_list_pages_needed(len, off),
                want,
                "len {len:#x} offset {off:#x}"
            );
        }
    }

    #[test]
    fn messages_name_the_segment() {
        let e = PrpError::StartNotPageAligned {
            index: 3,
            iova: Iova(0x1200),
        };
        assert!(e.to_string().contains("segment 3 starts at 0x1200"), "{e}");
        let e = PrpError::EndNotPageAligned {
            index: 2,
            end: 0x1800,
        };
        assert!(e.to_string().contains("segment 2 ends at 0x1800"), "{e}");
        let e = PrpError::ZeroLength {
            index: 5,
            iova: Iova(0),
        };
        assert!(e.to_string().contains("segment 5"), "{e}");
    }

    /// The PRP rules, written plainly, as an oracle: `None` when `segments` is a valid PRP
    /// transfer (ignoring list page supply).
    fn violation(segments: &[Segment]) -> Option<PrpError> {
        if segments.is_empty() {
            return Some(PrpError::Empty);
        }
        let mut total = 0u64;
        for (i, s) in segments.iter().enumerate() {
            let (start, len) = (s.iova.0 as u128, s.len as u128);
            let end = start + len;
            if len == 0 {
                return Some(PrpError::ZeroLength {
                    index: i,
                    iova: s.iova,
                });
            }
            if i == 0 && start % 4 != 0 {
                return Some(PrpError::OffsetNotDwordAligned { iova: s.iova });
            }
            if i > 0 && start % 4096 != 0 {
                return Some(PrpError::StartNotPageAligned {
                    index: i,
                    iova: s.iova,
                });
            }
            if end > u64::MAX as u128 {
                return Some(PrpError::AddressOverflow {
                    index: i,
                    iova: s.iova,
                    len: s.len,
                });
            }
            if i + 1 < segments.len() && end % 4096 != 0 {
                return Some(PrpError::EndNotPageAligned {
                    index: i,
                    end: end as u64,
                });
            }
            total += s.len as u64;
            if total >= 1 << 32 {
                return Some(PrpError::TooLong { index: i, total });
            }
        }
        None
    }

    /// A segment list of valid PRP shape: scattered, non-adjacent pages.
    fn valid_segments() -> impl Strategy<Value = Vec<Segment>> {
        let page_count =
            prop_oneof![16 => 1u64..4, 2 => 500u64..1100, 1 => 510u64..516, 1 => 1021u64..1027];
        let piece = (0u64..1 << 24, page_count);
        (0u64..1024, prop::collection::vec(piece, 1..6), 1u64..=4096).prop_map(
            |(dw, pieces, tail)| {
                let n = pieces.len();
                pieces
                    .iter()
                    .enumerate()
                    .map(|(i, &(page, count))| {
                        // Spread the pages so segments never touch.
                        let base = (page << 24) + ((i as u64) << 40);
                        let off = if i == 0 { dw * 4 } else { 0 };
                        let len = if i + 1 == n {
                            (count - 1) * PAGE + tail
                        } else {
                            count * PAGE - off
                        };
                        seg(base + off, len as u32)
                    })
                    .collect()
            },
        )
    }

    /// Valid shapes, some bent out of shape.
    fn any_segments() -> impl Strategy<Value = Vec<Segment>> {
        let bend = prop::collection::vec((0usize..8, 0u8..6, any::<u16>()), 0..3);
        (valid_segments(), bend).prop_map(|(mut segs, bends)| {
            for (which, how, amount) in bends {
                let n = segs.len();
                let s = &mut segs[which % n];
                let amount = amount as u64 + 1;
                match how {
                    0 => s.len = 0,
                    1 => s.iova = Iova(s.iova.0.wrapping_add(amount & 0xfff)),
                    2 => s.iova = Iova(s.iova.0.wrapping_add(amount & 3)),
                    3 => s.len = s.len.saturating_add(amount as u32),
                    4 => s.len = s.len.saturating_sub(amount as u32).max(1),
                    _ => s.iova = Iova(u64::MAX - (amount & 0xfff)),
                }
            }
            segs
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prp_describes_input_or_names_violation(segs in any_segments(), limit in 0usize..4) {
            let (result, pages) = build_and_walk(&segs, limit);
            let expected = violation(&segs);
            match (result, expected) {
                (Ok(_), None) => {} // walk checked in build_and_walk
                (Err(PrpError::ListPagesExhausted { needed, available }), None) => {
                    let total: u64 = segs.iter().map(|s| s.len as u64).sum();
                    prop_assert_eq!(needed, prp_list_pages_needed(total, segs[0].iova.0));
                    prop_assert_eq!(available, limit);
                    prop_assert!(available < needed);
                    prop_assert_eq!(pages.fetched, limit);
                }
                (Err(got), Some(want)) => prop_assert_eq!(got, want),
                (got, want) => {
                    return Err(TestCaseError::fail(format!("built {got:?}, rules say {want:?}")));
                }
            }
        }

        #[test]
        fn valid_prp_shapes_are_never_rejected(segs in valid_segments()) {
            prop_assert_eq!(violation(&segs), None);
            let (result, _) = build_and_walk(&segs, usize::MAX);
            prop_assert!(result.is_ok(), "rejected {:?}: {:?}", segs, result);
        }
    }
}
