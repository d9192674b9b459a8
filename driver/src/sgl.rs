//! SGL (Scatter Gather List) data pointers for a scattered buffer (Base spec §4.1.2).
//!
//! Shape of what is built:
//! - one segment: a Data Block descriptor in the command's DPTR, no list page;
//! - several: DPTR holds a Last Segment descriptor (type 3) pointing at a list of Data Block
//!   descriptors in list page 0, 256 descriptors of 16 bytes per page. When more descriptors
//!   remain than a page holds, the page's last descriptor chains to the next page: a Segment
//!   (type 2), or a Last Segment when the next list is the final one. DPTR then holds a Segment
//!   descriptor. A segment descriptor's length is the byte size of the list it points at.
//!
//! SGLs need no page alignment. Controllers reporting SGLS = 10b require dword-aligned
//! addresses and lengths: check with [`dword_aligned`] before choosing SGLs for them.

use crate::prp::ListPages;
use crate::spec::{sgl_type, SglDescriptor, PAGE_SIZE};
use crate::types::{Iova, Segment};

/// Bytes of one SGL descriptor.
const DESCRIPTOR_BYTES: usize = std::mem::size_of::<SglDescriptor>();
/// Descriptors in one list page.
pub const SGL_DESCRIPTORS_PER_PAGE: usize = PAGE_SIZE / DESCRIPTOR_BYTES;

/// Why a segment list cannot be described by an SGL.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum SglError {
    /// No segments at all.
    #[error("SGL: empty segment list; a data transfer needs at least one segment")]
    Empty,
    /// A segment of zero bytes.
    #[error("SGL: segment {index} at {iova} has zero length; drop empty segments before building")]
    ZeroLength { index: usize, iova: Iova },
    /// A segment runs past the end of the 64-bit address space.
    #[error(
        "SGL: segment {index} at {iova} of {len} bytes runs past the end of the address space"
    )]
    AddressOverflow { index: usize, iova: Iova, len: u32 },
    /// The transfer is longer than a command can carry.
    #[error(
        "SGL: transfer reaches {total} bytes at segment {index}, more than the {max} bytes a \
         command can carry; split the I/O",
        max = u32::MAX
    )]
    TooLong { index: usize, total: u64 },
    /// The list page supply ran out.
    #[error(
        "SGL: the transfer needs {needed} SGL list pages but only {available} could be had; \
         split the I/O or provide more list pages"
    )]
    ListPagesExhausted { needed: usize, available: usize },
}

/// Whether every segment starts at a dword-aligned address and has a length that is a whole
/// number of dwords, as controllers reporting SGLS = 10b require.
#[inline]
pub fn dword_aligned<S: AsRef<Segment>>(segments: &[S]) -> bool {
    segments
        .iter()
        .all(|s| (s.as_ref().iova.0 | s.as_ref().len as u64) & 3 == 0)
}

/// How many SGL list pages `segments` data descriptors need: 0 for one segment (it sits in
/// DPTR), otherwise 256 per page, or 255 and a chain descriptor on all pages but the last.
#[inline]
pub const fn sgl_list_pages_needed(segments: usize) -> usize {
    if segments <= 1 {
        0
    } else if segments <= SGL_DESCRIPTORS_PER_PAGE {
        1
    } else {
        (segments - 1).div_ceil(SGL_DESCRIPTORS_PER_PAGE - 1)
    }
}

/// The descriptor pointing at a list page that starts with `remaining` data descriptors
/// still to be placed (so it is the last list when they all fit).
#[inline]
fn segment_descriptor(list: u64, remaining: usize) -> SglDescriptor {
    let (ty, count) = if remaining > SGL_DESCRIPTORS_PER_PAGE {
        (sgl_type::SEGMENT, SGL_DESCRIPTORS_PER_PAGE)
    } else {
        (sgl_type::LAST_SEGMENT, remaining)
    };
    SglDescriptor::new(ty, list, (count * DESCRIPTOR_BYTES) as u32)
}

#[inline]
fn write_descriptor(lists: &mut impl ListPages, page: usize, slot: usize, d: SglDescriptor) {
    let (addr, hi) = d.to_dptr();
    lists.write_qword(page, 2 * slot, addr);
    lists.write_qword(page, 2 * slot + 1, hi);
}

#[inline]
fn list_page(lists: &mut impl ListPages, page: usize, needed: usize) -> Result<u64, SglError> {
    match lists.page_iova(page) {
        Some(iova) => {
            debug_assert_eq!(
                iova.0 % PAGE_SIZE as u64,
                0,
                "SGL list page {page} at {iova} is not page aligned"
            );
            Ok(iova.0)
        }
        None => Err(SglError::ListPagesExhausted {
            needed,
            available: page,
        }),
    }
}

/// Build the SGL describing `segments`, in order. Returns the descriptor to place in the
/// command's DPTR (see [`SglDescriptor::to_dptr`]); descriptor lists, when needed, are
/// written into `lists`.
///
/// Rejects an empty list, zero-length segments, segments running past the address space and
/// transfers longer than `u32::MAX` bytes; fails with [`SglError::ListPagesExhausted`] when
/// `lists` cannot supply enough pages.
#[inline]
pub fn build_sgl<S: AsRef<Segment>>(
    segments: &[S],
    lists: &mut impl ListPages,
) -> Result<SglDescriptor, SglError> {
    if segments.is_empty() {
        return Err(SglError::Empty);
    }
    let mut total: u64 = 0;
    for (index, seg) in segments.iter().enumerate() {
        let seg = seg.as_ref();
        if seg.len == 0 {
            return Err(SglError::ZeroLength {
                index,
                iova: seg.iova,
            });
        }
        if seg.iova.0.checked_add(seg.len as u64).is_none() {
            return Err(SglError::AddressOverflow {
                index,
                iova: seg.iova,
                len: seg.len,
            });
        }
        total += seg.len as u64;
        if total > u32::MAX as u64 {
            return Err(SglError::TooLong { index, total });
        }
    }

    if let [only] = segments {
        let only = only.as_ref();
        return Ok(SglDescriptor::new(
            sgl_type::DATA_BLOCK,
            only.iova.0,
            only.len,
        ));
    }

    let needed = sgl_list_pages_needed(segments.len());
    let first = list_page(lists, 0, needed)?;
    let dptr = segment_descriptor(first, segments.len());
    let mut page = 0;
    let mut slot = 0;
    for (index, seg) in segments.iter().enumerate() {
        let seg = seg.as_ref();
        let remaining = segments.len() - index;
        if slot == SGL_DESCRIPTORS_PER_PAGE - 1 && remaining > 1 {
            // More descriptors remain than this page holds: its last one chains onwards.
            let next = list_page(lists, page + 1, needed)?;
            write_descriptor(lists, page, slot, segment_descriptor(next, remaining));
            page += 1;
            slot = 0;
        }
        write_descriptor(
            lists,
            page,
            slot,
            SglDescriptor::new(sgl_type::DATA_BLOCK, seg.iova.0, seg.len),
        );
        slot += 1;
    }
    Ok(dptr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prp::tests::{normalize, segment_runs, TestPages};
    use proptest::prelude::*;

    fn seg(iova: u64, len: u32) -> Segment {
        Segment::new(Iova(iova), len)
    }

    fn read_descriptor(mem: &TestPages, at: u64) -> SglDescriptor {
        SglDescriptor::from_dptr(mem.read(at), mem.read(at + 8))
    }

    /// Walk an SGL the way a controller does, checking the descriptor rules, and return the
    /// byte ranges it describes, in order, and the number of list qwords it read.
    fn device_walk(dptr: SglDescriptor, mem: &TestPages) -> (Vec<(u64, u64)>, usize) {
        let mut runs = Vec::new();
        let mut reads = 0;
        let mut current = dptr;
        loop {
            match current.ty() {
                sgl_type::DATA_BLOCK => {
                    runs.push((current.addr, current.len as u64));
                    break;
                }
                ty @ (sgl_type::SEGMENT | sgl_type::LAST_SEGMENT) => {
                    assert_eq!(current.id & 0xf, 0, "sub type must be 0 (address)");
                    let len = current.len as usize;
                    assert!(len > 0 && len & 15 == 0, "segment descriptor length {len}");
                    let count = len / 16;
                    let mut next = None;
                    for i in 0..count {
                        let d = read_descriptor(mem, current.addr + 16 * i as u64);
                        reads += 2;
                        match d.ty() {
                            sgl_type::DATA_BLOCK => runs.push((d.addr, d.len as u64)),
                            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                                assert_eq!(
                                    ty,
                                    sgl_type::SEGMENT,
                                    "Last Segment list holds a segment descriptor"
                                );
                                assert_eq!(i, count - 1, "segment descriptor not last in its list");
                                next = Some(d);
                            }
                            other => panic!("descriptor type {other} in a list"),
                        }
                    }
                    match next {
                        Some(d) => current = d,
                        None => {
                            assert_eq!(
                                ty,
                                sgl_type::LAST_SEGMENT,
                                "Segment list does not chain onwards"
                            );
                            break;
                        }
                    }
                }
                other => panic!("descriptor type {other} in DPTR"),
            }
        }
        (normalize(runs), reads)
    }

    fn build_and_walk(
        segments: &[Segment],
        limit: usize,
    ) -> (Result<SglDescriptor, SglError>, TestPages) {
        let mut pages = TestPages::new(limit);
        let result = build_sgl(segments, &mut pages);
        if let Ok(dptr) = result {
            let (runs, reads) = device_walk(dptr, &pages);
            assert_eq!(
                runs,
                segment_runs(segments),
                "device walk differs from the input"
            );
            assert_eq!(reads, pages.written(), "list qwords written but never read");
            assert_eq!(
                pages.fetched,
                sgl_list_pages_needed(segments.len()),
                "list pages fetched"
            );
        }
        (result, pages)
    }

    /// Descriptors of list page `page`, as written.
    fn descriptors(pages: &TestPages, page: usize) -> Vec<SglDescriptor> {
        pages
            .entries(page)
            .chunks(2)
            .map(|q| SglDescriptor::from_dptr(q[0], q[1]))
            .collect()
    }

    fn data(addr: u64, len: u32) -> SglDescriptor {
        SglDescriptor::new(sgl_type::DATA_BLOCK, addr, len)
    }

    /// `n` one-and-a-bit-kilobyte segments at odd addresses, far apart.
    fn scattered(n: usize) -> Vec<Segment> {
        (0..n)
            .map(|i| seg(0x1_0000_0001 + 0x10_0000 * i as u64, 1000 + i as u32))
            .collect()
    }

    #[test]
    fn one_segment_is_a_data_block_in_dptr() {
        let (r, p) = build_and_walk(&[seg(0x1234_5677, 12345)], 4);
        assert_eq!(r, Ok(data(0x1234_5677, 12345)));
        assert_eq!(r.unwrap().to_dptr(), (0x1234_5677, 12345));
        assert_eq!(p.fetched, 0);
    }

    #[test]
    fn three_segments_last_segment_list() {
        let segs = [seg(0x1000, 0x200), seg(0x9_0003, 7), seg(0x4000, 0x1000)];
        let (r, p) = build_and_walk(&segs, 4);
        let dptr = r.unwrap();
        assert_eq!(
            dptr,
            SglDescriptor::new(sgl_type::LAST_SEGMENT, TestPages::iova_of(0), 48)
        );
        assert_eq!(dptr.to_dptr().1 >> 56, 0x30);
        assert_eq!(
            descriptors(&p, 0),
            vec![data(0x1000, 0x200), data(0x9_0003, 7), data(0x4000, 0x1000)]
        );
        assert_eq!(p.fetched, 1);
    }

    #[test]
    fn exactly_256_fill_one_page() {
        let segs = scattered(256);
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(SglDescriptor::new(
                sgl_type::LAST_SEGMENT,
                TestPages::iova_of(0),
                4096
            ))
        );
        let want: Vec<_> = segs.iter().map(|s| data(s.iova.0, s.len)).collect();
        assert_eq!(descriptors(&p, 0), want);
        assert_eq!(p.fetched, 1);
    }

    #[test]
    fn segments_257_chain_to_a_last_segment() {
        let segs = scattered(257);
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(SglDescriptor::new(
                sgl_type::SEGMENT,
                TestPages::iova_of(0),
                4096
            ))
        );
        let page0 = descriptors(&p, 0);
        assert_eq!(page0.len(), 256);
        assert_eq!(page0[254], data(segs[254].iova.0, segs[254].len));
        assert_eq!(
            page0[255],
            SglDescriptor::new(sgl_type::LAST_SEGMENT, TestPages::iova_of(1), 32)
        );
        assert_eq!(
            descriptors(&p, 1),
            vec![
                data(segs[255].iova.0, segs[255].len),
                data(segs[256].iova.0, segs[256].len)
            ]
        );
    }

    #[test]
    fn many_segments_chain_through_segment_descriptors() {
        // 255 + 255 + 256: three pages, the middle one chaining with a Segment descriptor.
        let segs = scattered(766);
        let (r, p) = build_and_walk(&segs, 4);
        assert_eq!(
            r,
            Ok(SglDescriptor::new(
                sgl_type::SEGMENT,
                TestPages::iova_of(0),
                4096
            ))
        );
        assert_eq!(
            descriptors(&p, 0)[255],
            SglDescriptor::new(sgl_type::SEGMENT, TestPages::iova_of(1), 4096)
        );
        assert_eq!(
            descriptors(&p, 1)[255],
            SglDescriptor::new(sgl_type::LAST_SEGMENT, TestPages::iova_of(2), 4096)
        );
        assert_eq!(descriptors(&p, 2).len(), 256);
        assert_eq!(
            descriptors(&p, 2)[255],
            data(segs[765].iova.0, segs[765].len)
        );
        // One more needs a fourth page.
        let (_, p) = build_and_walk(&scattered(767), 4);
        assert_eq!(p.fetched, 4);
        assert_eq!(
            descriptors(&p, 2)[255],
            SglDescriptor::new(sgl_type::LAST_SEGMENT, TestPages::iova_of(3), 32)
        );
    }

    #[test]
    fn not_enough_list_pages() {
        assert_eq!(
            build_and_walk(&scattered(2), 0).0,
            Err(SglError::ListPagesExhausted {
                needed: 1,
                available: 0
            })
        );
        let err = build_and_walk(&scattered(257), 1).0.unwrap_err();
        assert_eq!(
            err,
            SglError::ListPagesExhausted {
                needed: 2,
                available: 1
            }
        );
        assert!(err.to_string().contains("needs 2 SGL list pages"));
    }

    #[test]
    fn rejects_empty_zero_length_overflow_and_too_long() {
        assert_eq!(build_and_walk(&[], 4).0, Err(SglError::Empty));
        let segs = [seg(0x1000, 1), seg(0x2000, 0)];
        assert_eq!(
            build_and_walk(&segs, 4).0,
            Err(SglError::ZeroLength {
                index: 1,
                iova: Iova(0x2000)
            })
        );
        let segs = [seg(0x1000, 1), seg(u64::MAX, 1)];
        assert_eq!(
            build_and_walk(&segs, 4).0,
            Err(SglError::AddressOverflow {
                index: 1,
                iova: Iova(u64::MAX),
                len: 1
            })
        );
        let segs = [seg(0, u32::MAX), seg(1 << 33, 1)];
        assert_eq!(
            build_and_walk(&segs, 4).0,
            Err(SglError::TooLong {
                index: 1,
                total: 1 << 32
            })
        );
        let segs = [seg(0, u32::MAX - 1), seg(1 << 33, 1)];
        assert!(build_and_walk(&segs, 4).0.is_ok());
    }

    #[test]
    fn dword_alignment_check() {
        assert!(dword_aligned(&[seg(0x1000, 512), seg(0x2004, 8)]));
        assert!(!dword_aligned(&[seg(0x1000, 512), seg(0x2002, 8)]));
        assert!(!dword_aligned(&[seg(0x1000, 511)]));
        assert!(dword_aligned::<Segment>(&[]));
    }

    #[test]
    fn list_pages_needed_table() {
        for (n, want) in [
            (0, 0),
            (1, 0),
            (2, 1),
            (256, 1),
            (257, 2),
            (511, 2),
            (512, 3),
            (766, 3),
            (767, 4),
        ] {
            assert_eq!(sgl_list_pages_needed(n), want, "{n} segments");
        }
    }

    /// Segments of any non-zero length at any address, sometimes around the 256-descriptor
    /// page boundaries.
    fn valid_segments() -> impl Strategy<Value = Vec<Segment>> {
        let piece = (0u64..1 << 40, 1u32..20_000);
        let count = prop_oneof![
            6 => 1usize..6,
            2 => 254usize..259,
            1 => 509usize..514,
            1 => 764usize..769,
        ];
        count
            .prop_flat_map(move |n| prop::collection::vec(piece.clone(), n))
            .prop_map(|v| v.into_iter().map(|(a, l)| seg(a, l)).collect())
    }

    /// Valid lists, some with a segment's length zeroed.
    fn any_segments() -> impl Strategy<Value = Vec<Segment>> {
        let zeroed = prop::collection::vec(any::<prop::sample::Index>(), 0..2);
        (valid_segments(), zeroed).prop_map(|(mut segs, zeroed)| {
            for i in zeroed {
                let n = segs.len();
                segs[i.index(n)].len = 0;
            }
            segs
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sgl_describes_input_or_names_reason(segs in any_segments(), limit in 0usize..5) {
            let (result, pages) = build_and_walk(&segs, limit);
            let zero = segs.iter().position(|s| s.len == 0);
            let needed = sgl_list_pages_needed(segs.len());
            match result {
                Ok(_) => {
                    prop_assert_eq!(zero, None);
                    prop_assert!(needed <= limit);
                }
                Err(SglError::ZeroLength { index, iova }) => {
                    prop_assert_eq!(Some(index), zero);
                    prop_assert_eq!(iova, segs[index].iova);
                }
                Err(SglError::ListPagesExhausted { needed: n, available }) => {
                    prop_assert_eq!(zero, None);
                    prop_assert_eq!(n, needed);
                    prop_assert_eq!(available, limit);
                    prop_assert!(limit < needed);
                    prop_assert_eq!(pages.fetched, limit);
                }
                Err(other) => return Err(TestCaseError::fail(format!("unexpected {other}"))),
            }
        }

        #[test]
        fn valid_sgl_inputs_are_never_rejected(segs in valid_segments()) {
            let (result, _) = build_and_walk(&segs, usize::MAX);
            prop_assert!(result.is_ok(), "rejected: {:?}", result);
        }
    }
}
