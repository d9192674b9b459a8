//! The model's reading of data pointers: PRP entries and lists (Base spec §4.1.1) and SGLs
//! (§4.1.2), turned into a list of IOVA segments, with the checks a strict controller makes.
//!
//! This is written from the specification and on purpose shares nothing with the driver's PRP
//! and SGL builders: the model is what checks them.
//!
//! PRP invariants checked here:
//! - PRP1 may have an offset into its page, but it must be dword aligned;
//! - PRP2, when it points directly at the second page, has offset 0;
//! - PRP2, when it points at a list, may have a qword-aligned offset (only this first list
//!   pointer); every list entry, and every pointer to a further list page, has offset 0;
//! - the last entry of a list page points at the next list page when more entries remain than
//!   the page has room for;
//! - a zero entry is a Data Transfer Error (nothing is ever mapped at 0).

use super::iommu::DmaFault;
use crate::spec::{sgl_type, SglDescriptor};
use crate::NvmeStatus;

/// Read access to device-visible memory.
pub(super) trait BusRead {
    /// Read `buf.len()` bytes at `iova`.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault>;
}

impl BusRead for super::iommu::IovaTable {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        super::iommu::IovaTable::read(self, iova, buf)
    }
}

/// A contiguous piece of a transfer on the bus.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Seg {
    pub iova: u64,
    pub len: u64,
}

/// What a walk read from memory besides the data.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct WalkCounters {
    /// PRP list pages read.
    pub prp_list_pages: u64,
    /// SGL descriptors examined (including the one in the command).
    pub sgl_descriptors: u64,
}

/// Why a walk failed: the status to complete the command with, and a reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct WalkError {
    pub status: NvmeStatus,
    pub why: String,
}

fn fail<T>(status: NvmeStatus, why: String) -> Result<T, WalkError> {
    Err(WalkError { status, why })
}

fn transfer_error<T>(what: &str, f: DmaFault) -> Result<T, WalkError> {
    fail(
        NvmeStatus::DATA_TRANSFER_ERROR,
        format!("cannot read the {what}: {f}"),
    )
}

/// Append a segment, merging it with the previous one when they touch.
fn push(out: &mut Vec<Seg>, iova: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.iova.checked_add(last.len) == Some(iova) {
            last.len += len;
            return;
        }
    }
    out.push(Seg { iova, len });
}

/// Entries read from a PRP list or SGL segment at once.
const BATCH: usize = 64;

/// Walk the PRP entries of a command transferring `len` bytes with memory page size `page`,
/// appending the data segments to `out`.
pub(super) fn walk_prp(
    bus: &impl BusRead,
    prp1: u64,
    prp2: u64,
    len: u64,
    page: u64,
    out: &mut Vec<Seg>,
    ctr: &mut WalkCounters,
) -> Result<(), WalkError> {
    let mask = page - 1;
    if len == 0 {
        return Ok(());
    }
    if prp1 & 3 != 0 {
        return fail(
            NvmeStatus::PRP_OFFSET_INVALID,
            format!("PRP1 {prp1:#x} is not dword aligned"),
        );
    }
    if prp1 == 0 {
        return fail(NvmeStatus::DATA_TRANSFER_ERROR, "PRP1 is zero".into());
    }
    let first = len.min(page - (prp1 & mask));
    push(out, prp1, first);
    let mut left = len - first;
    if left == 0 {
        return Ok(());
    }
    if left <= page {
        if prp2 & mask != 0 {
            return fail(
                NvmeStatus::PRP_OFFSET_INVALID,
                format!("PRP2 {prp2:#x} points at the second data page but has an offset"),
            );
        }
        if prp2 == 0 {
            return fail(NvmeStatus::DATA_TRANSFER_ERROR, "PRP2 is zero".into());
        }
        push(out, prp2, left);
        return Ok(());
    }
    if prp2 & 7 != 0 {
        return fail(
            NvmeStatus::PRP_OFFSET_INVALID,
            format!("the PRP list pointer {prp2:#x} is not qword aligned"),
        );
    }
    if prp2 == 0 {
        return fail(
            NvmeStatus::DATA_TRANSFER_ERROR,
            "the PRP list pointer is zero".into(),
        );
    }
    let mut list = prp2;
    let mut needed = left.div_ceil(page);
    let mut buf = [0u8; BATCH * 8];
    loop {
        ctr.prp_list_pages += 1;
        let slots = (page - (list & mask)) / 8;
        let chained = needed > slots;
        let data_here = if chained { slots - 1 } else { needed };
        let total = data_here + chained as u64;
        let mut next = 0;
        let mut i = 0;
        while i < total {
            let n = (total - i).min(BATCH as u64) as usize;
            if let Err(f) = bus.read(list + i * 8, &mut buf[..n * 8]) {
                return transfer_error("PRP list", f);
            }
            for (j, raw) in buf[..n * 8].chunks_exact(8).enumerate() {
                let idx = i + j as u64;
                let entry = u64::from_le_bytes(raw.try_into().expect("8-byte chunk"));
                let at = list + idx * 8;
                let what = if idx == data_here {
                    "pointer to the next PRP list page"
                } else {
                    "PRP list entry"
                };
                if entry & mask != 0 {
                    return fail(
                        NvmeStatus::PRP_OFFSET_INVALID,
                        format!("{what} {entry:#x} (at IOVA {at:#x}) has a page offset"),
                    );
                }
                if entry == 0 {
                    return fail(
                        NvmeStatus::DATA_TRANSFER_ERROR,
                        format!("{what} at IOVA {at:#x} is zero"),
                    );
                }
                if idx == data_here {
                    next = entry;
                } else {
                    let n = left.min(page);
                    push(out, entry, n);
                    left -= n;
                }
            }
            i += n as u64;
        }
        needed -= data_here;
        if !chained {
            debug_assert_eq!(left, 0);
            return Ok(());
        }
        list = next;
    }
}

/// At most this many descriptors are followed for one command (a loop in a chain of segments
/// would otherwise never end).
const MAX_SGL_DESCRIPTORS: u64 = 1 << 17;

/// Walk the SGL of a command transferring `len` bytes whose first descriptor is in DPTR,
/// appending the data segments to `out`.
pub(super) fn walk_sgl(
    bus: &impl BusRead,
    dptr1: u64,
    dptr2: u64,
    len: u64,
    out: &mut Vec<Seg>,
    ctr: &mut WalkCounters,
) -> Result<(), WalkError> {
    let d = SglDescriptor::from_dptr(dptr1, dptr2);
    ctr.sgl_descriptors += 1;
    let mut total: u64 = 0;
    let mut next = None;
    check_subtype(&d, "in the command")?;
    match d.ty() {
        sgl_type::DATA_BLOCK => {
            push(out, d.addr, d.len as u64);
            total += d.len as u64;
        }
        sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => next = Some(d),
        ty => {
            return fail(
                NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID,
                format!("the SGL descriptor in the command has type {ty:#x}"),
            )
        }
    }
    let mut seen: u64 = 1;
    let mut buf = [0u8; BATCH * 16];
    while let Some(seg) = next.take() {
        if seg.len == 0 || seg.len % 16 != 0 {
            return fail(
                NvmeStatus::INVALID_SGL_SEGMENT_DESCRIPTOR,
                format!(
                    "the SGL segment at IOVA {:#x} has length {}, not a nonzero multiple of 16",
                    seg.addr, seg.len
                ),
            );
        }
        let count = (seg.len / 16) as u64;
        let last_list = seg.ty() == sgl_type::LAST_SEGMENT;
        let mut i = 0;
        while i < count {
            let n = (count - i).min(BATCH as u64) as usize;
            if let Err(f) = bus.read(seg.addr + i * 16, &mut buf[..n * 16]) {
                return transfer_error("SGL segment", f);
            }
            for (j, raw) in buf[..n * 16].chunks_exact(16).enumerate() {
                let idx = i + j as u64;
                seen += 1;
                ctr.sgl_descriptors += 1;
                if seen > MAX_SGL_DESCRIPTORS {
                    return fail(
                        NvmeStatus::INVALID_SGL_DESCRIPTOR_COUNT,
                        format!("the SGL has more than {MAX_SGL_DESCRIPTORS} descriptors"),
                    );
                }
                let d = SglDescriptor {
                    addr: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
                    len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
                    reserved: [raw[12], raw[13], raw[14]],
                    id: raw[15],
                };
                let at = seg.addr + idx * 16;
                check_subtype(&d, &format!("at IOVA {at:#x}"))?;
                match d.ty() {
                    sgl_type::DATA_BLOCK => {
                        push(out, d.addr, d.len as u64);
                        total += d.len as u64;
                    }
                    sgl_type::SEGMENT | sgl_type::LAST_SEGMENT if last_list => {
                        return fail(
                            NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID,
                            format!(
                                "the last SGL segment holds a segment descriptor (at IOVA {at:#x})"
                            ),
                        );
                    }
                    sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                        if idx != count - 1 {
                            return fail(
                                NvmeStatus::INVALID_SGL_SEGMENT_DESCRIPTOR,
                                format!(
                                    "the segment descriptor at IOVA {at:#x} is not the last of \
                                     its segment"
                                ),
                            );
                        }
                        next = Some(d);
                    }
                    ty => {
                        return fail(
                            NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID,
                            format!("the SGL descriptor at IOVA {at:#x} has type {ty:#x}"),
                        )
                    }
                }
            }
            i += n as u64;
        }
        if !last_list && next.is_none() {
            return fail(
                NvmeStatus::INVALID_SGL_SEGMENT_DESCRIPTOR,
                format!(
                    "the SGL segment at IOVA {:#x} is not the last one but does not end with a \
                     segment descriptor",
                    seg.addr
                ),
            );
        }
    }
    if total != len {
        return fail(
            NvmeStatus::DATA_SGL_LENGTH_INVALID,
            format!("the SGL describes {total} bytes but the command transfers {len}"),
        );
    }
    Ok(())
}

fn check_subtype(d: &SglDescriptor, where_: &str) -> Result<(), WalkError> {
    if d.id & 0xf != 0 {
        return fail(
            NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID,
            format!("the SGL descriptor {where_} has sub type {:#x}", d.id & 0xf),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Sparse fake memory: 4 KiB pages that exist only when written; reads of absent pages
    /// fault.
    #[derive(Default)]
    struct FakeBus {
        pages: BTreeMap<u64, Vec<u8>>,
    }

    impl FakeBus {
        fn put(&mut self, iova: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                let a = iova + i as u64;
                let page = self.pages.entry(a & !4095).or_insert_with(|| vec![0; 4096]);
                page[(a & 4095) as usize] = *b;
            }
        }
        fn put_u64s(&mut self, iova: u64, v: &[u64]) {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.put(iova, &bytes);
        }
        fn put_descs(&mut self, iova: u64, d: &[SglDescriptor]) {
            let bytes: Vec<u8> = d
                .iter()
                .flat_map(|d| {
                    let mut b = [0u8; 16];
                    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
                    b[8..12].copy_from_slice(&d.len.to_le_bytes());
                    b[15] = d.id;
                    b
                })
                .collect();
            self.put(iova, &bytes);
        }
    }

    impl BusRead for FakeBus {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = iova + i as u64;
                let page = self.pages.get(&(a & !4095)).ok_or(DmaFault { iova: a })?;
                *b = page[(a & 4095) as usize];
            }
            Ok(())
        }
    }

    const P: u64 = 4096;
    const D: u64 = 0x1000_0000; // data pages live here (never read by the walker)
    const L: u64 = 0x2000_0000; // list pages live here

    fn prp(bus: &FakeBus, prp1: u64, prp2: u64, len: u64) -> Result<(Vec<Seg>, u64), NvmeStatus> {
        let mut out = Vec::new();
        let mut ctr = WalkCounters::default();
        walk_prp(bus, prp1, prp2, len, P, &mut out, &mut ctr).map_err(|e| e.status)?;
        assert_eq!(
            out.iter().map(|s| s.len).sum::<u64>(),
            len,
            "segments cover the transfer"
        );
        Ok((out, ctr.prp_list_pages))
    }

    fn seg(iova: u64, len: u64) -> Seg {
        Seg { iova, len }
    }

    #[test]
    fn prp_without_list() {
        let bus = FakeBus::default();
        // (prp1, prp2, len) -> segments
        let table: &[(u64, u64, u64, &[Seg])] = &[
            (D, 0, 4096, &[seg(D, 4096)]),
            (D + 512, 0, 512, &[seg(D + 512, 512)]),
            (
                D + 4092,
                D + 2 * P,
                8,
                &[seg(D + 4092, 4), seg(D + 2 * P, 4)],
            ),
            (D, D + 5 * P, 8192, &[seg(D, 4096), seg(D + 5 * P, 4096)]),
            // Adjacent pages merge into one segment.
            (D, D + P, 8192, &[seg(D, 8192)]),
            (
                D + 2048,
                D + 7 * P,
                6144,
                &[seg(D + 2048, 2048), seg(D + 7 * P, 4096)],
            ),
        ];
        for &(p1, p2, len, want) in table {
            assert_eq!(
                prp(&bus, p1, p2, len).unwrap(),
                (want.to_vec(), 0),
                "{p1:#x} {p2:#x} {len}"
            );
        }
    }

    #[test]
    fn prp_offsets_are_checked() {
        let mut bus = FakeBus::default();
        assert_eq!(
            prp(&bus, D + 2, 0, 512),
            Err(NvmeStatus::PRP_OFFSET_INVALID)
        );
        assert_eq!(
            prp(&bus, D, D + P + 8, 8192),
            Err(NvmeStatus::PRP_OFFSET_INVALID)
        );
        assert_eq!(
            prp(&bus, D, L + 4, 3 * P),
            Err(NvmeStatus::PRP_OFFSET_INVALID)
        );
        bus.put_u64s(L, &[D + P, D + 2 * P + 16]);
        assert_eq!(prp(&bus, D, L, 3 * P), Err(NvmeStatus::PRP_OFFSET_INVALID));
        bus.put_u64s(L, &[D + P, 0]);
        assert_eq!(prp(&bus, D, L, 3 * P), Err(NvmeStatus::DATA_TRANSFER_ERROR));
        assert_eq!(prp(&bus, D, 0, 8192), Err(NvmeStatus::DATA_TRANSFER_ERROR));
        assert_eq!(prp(&bus, 0, 0, 512), Err(NvmeStatus::DATA_TRANSFER_ERROR));
        // The list page itself is not readable.
        assert_eq!(
            prp(&bus, D, L + 7 * P, 3 * P),
            Err(NvmeStatus::DATA_TRANSFER_ERROR)
        );
        // PRP2 is not looked at when the data stays in the first page.
        assert!(prp(&bus, D, 0x3, 4096).is_ok());
    }

    #[test]
    fn prp_list_single_page() {
        let mut bus = FakeBus::default();
        // 12 KiB: PRP1 + list of two.
        bus.put_u64s(L, &[D + 10 * P, D + 20 * P]);
        let (segs, pages) = prp(&bus, D, L, 3 * P).unwrap();
        assert_eq!(
            segs,
            vec![seg(D, P), seg(D + 10 * P, P), seg(D + 20 * P, P)]
        );
        assert_eq!(pages, 1);
        // Unaligned start: 8 KiB from offset 512 needs three pages, the last one partial.
        let (segs, _) = prp(&bus, D + 512, L, 2 * P).unwrap();
        assert_eq!(
            segs,
            vec![
                seg(D + 512, P - 512),
                seg(D + 10 * P, P),
                seg(D + 20 * P, 512)
            ]
        );
        // The first list pointer may have a qword offset.
        bus.put_u64s(L + P + 64, &[D + 30 * P, D + 40 * P]);
        let (segs, _) = prp(&bus, D, L + P + 64, 3 * P).unwrap();
        assert_eq!(
            segs,
            vec![seg(D, P), seg(D + 30 * P, P), seg(D + 40 * P, P)]
        );
    }

    #[test]
    fn prp_list_chains_when_a_page_is_full() {
        let mut bus = FakeBus::default();
        // 2 MiB + 8 KiB aligned: PRP1 + page A (511 data entries + pointer) + page B (2).
        let entries: Vec<u64> = (1..=513).map(|i| D + 2 * i * P).collect();
        let mut page_a = entries[..511].to_vec();
        page_a.push(L + 5 * P);
        bus.put_u64s(L, &page_a);
        bus.put_u64s(L + 5 * P, &entries[511..]);
        let (segs, pages) = prp(&bus, D, L, 514 * P).unwrap();
        assert_eq!(pages, 2);
        assert_eq!(segs.len(), 514);
        assert_eq!(segs[0], seg(D, P));
        assert_eq!(segs[511], seg(entries[510], P));
        assert_eq!(segs[513], seg(entries[512], P));
        // Exactly 512 entries fit one page: no chaining, the last entry is data.
        let one: Vec<u64> = (1..=512).map(|i| D + 2 * i * P).collect();
        bus.put_u64s(L + 9 * P, &one);
        let (segs, pages) = prp(&bus, D, L + 9 * P, 513 * P).unwrap();
        assert_eq!((segs.len(), pages), (513, 1));
        assert_eq!(segs[512], seg(one[511], P));
        // A next-page pointer with an offset is invalid.
        page_a[511] = L + 5 * P + 8;
        bus.put_u64s(L, &page_a);
        assert_eq!(
            prp(&bus, D, L, 514 * P),
            Err(NvmeStatus::PRP_OFFSET_INVALID)
        );
        // A list starting at an offset has fewer slots before it must chain.
        bus.put_u64s(L + 20 * P + 4080, &[D + 2 * P, L + 21 * P]);
        bus.put_u64s(L + 21 * P, &[D + 4 * P, D + 6 * P]);
        let (segs, pages) = prp(&bus, D, L + 20 * P + 4080, 4 * P).unwrap();
        let want = [
            seg(D, P),
            seg(D + 2 * P, P),
            seg(D + 4 * P, P),
            seg(D + 6 * P, P),
        ];
        assert_eq!(segs, want.to_vec());
        assert_eq!(pages, 2);
    }

    fn sgl(bus: &FakeBus, first: SglDescriptor, len: u64) -> Result<(Vec<Seg>, u64), NvmeStatus> {
        let (d1, d2) = first.to_dptr();
        let mut out = Vec::new();
        let mut ctr = WalkCounters::default();
        walk_sgl(bus, d1, d2, len, &mut out, &mut ctr).map_err(|e| e.status)?;
        Ok((out, ctr.sgl_descriptors))
    }

    fn data(addr: u64, len: u32) -> SglDescriptor {
        SglDescriptor::new(sgl_type::DATA_BLOCK, addr, len)
    }

    #[test]
    fn sgl_data_block_in_command() {
        let bus = FakeBus::default();
        assert_eq!(
            sgl(&bus, data(D + 3, 5000), 5000).unwrap(),
            (vec![seg(D + 3, 5000)], 1)
        );
        assert_eq!(
            sgl(&bus, data(D, 4096), 8192),
            Err(NvmeStatus::DATA_SGL_LENGTH_INVALID)
        );
        let mut bad = data(D, 4096);
        bad.id |= 1;
        assert_eq!(
            sgl(&bus, bad, 4096),
            Err(NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID)
        );
        let bit_bucket = SglDescriptor::new(1, D, 4096);
        assert_eq!(
            sgl(&bus, bit_bucket, 4096),
            Err(NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID)
        );
    }

    #[test]
    fn sgl_segments_chain() {
        let mut bus = FakeBus::default();
        // Segment -> [data, data, last segment] -> [data].
        bus.put_descs(
            L,
            &[
                data(D, 4096),
                data(D + 8 * P, 100),
                SglDescriptor::new(sgl_type::LAST_SEGMENT, L + P, 16),
            ],
        );
        bus.put_descs(L + P, &[data(D + 16 * P, 200)]);
        let first = SglDescriptor::new(sgl_type::SEGMENT, L, 48);
        let (segs, descs) = sgl(&bus, first, 4396).unwrap();
        assert_eq!(
            segs,
            vec![seg(D, 4096), seg(D + 8 * P, 100), seg(D + 16 * P, 200)]
        );
        assert_eq!(descs, 5);
        assert_eq!(
            sgl(&bus, first, 4397),
            Err(NvmeStatus::DATA_SGL_LENGTH_INVALID)
        );
        // A last segment straight from the command.
        let last = SglDescriptor::new(sgl_type::LAST_SEGMENT, L, 32);
        assert_eq!(
            sgl(&bus, last, 4196).unwrap().0,
            vec![seg(D, 4096), seg(D + 8 * P, 100)]
        );
        // Bad segment lengths.
        for len in [0, 8, 40] {
            let s = SglDescriptor::new(sgl_type::LAST_SEGMENT, L, len);
            assert_eq!(
                sgl(&bus, s, 4096),
                Err(NvmeStatus::INVALID_SGL_SEGMENT_DESCRIPTOR)
            );
        }
        // A segment list that does not chain although it is not the last one.
        bus.put_descs(L + 2 * P, &[data(D, 4096)]);
        let s = SglDescriptor::new(sgl_type::SEGMENT, L + 2 * P, 16);
        assert_eq!(
            sgl(&bus, s, 4096),
            Err(NvmeStatus::INVALID_SGL_SEGMENT_DESCRIPTOR)
        );
        // A segment descriptor in the middle of a list.
        bus.put_descs(
            L + 3 * P,
            &[
                SglDescriptor::new(sgl_type::LAST_SEGMENT, L + P, 16),
                data(D, 4096),
            ],
        );
        let s = SglDescriptor::new(sgl_type::SEGMENT, L + 3 * P, 32);
        assert_eq!(
            sgl(&bus, s, 4296),
            Err(NvmeStatus::INVALID_SGL_SEGMENT_DESCRIPTOR)
        );
        // A last segment holding a segment descriptor.
        bus.put_descs(
            L + 4 * P,
            &[SglDescriptor::new(sgl_type::SEGMENT, L + P, 16)],
        );
        let s = SglDescriptor::new(sgl_type::LAST_SEGMENT, L + 4 * P, 16);
        assert_eq!(
            sgl(&bus, s, 200),
            Err(NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID)
        );
        // Unknown type in a list; unreadable list.
        bus.put_descs(L + 5 * P, &[SglDescriptor::new(0x4, D, 4096)]);
        let s = SglDescriptor::new(sgl_type::LAST_SEGMENT, L + 5 * P, 16);
        assert_eq!(
            sgl(&bus, s, 4096),
            Err(NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID)
        );
        let s = SglDescriptor::new(sgl_type::LAST_SEGMENT, L + 50 * P, 16);
        assert_eq!(sgl(&bus, s, 4096), Err(NvmeStatus::DATA_TRANSFER_ERROR));
    }

    #[test]
    fn sgl_loop_is_bounded() {
        let mut bus = FakeBus::default();
        bus.put_descs(L, &[SglDescriptor::new(sgl_type::SEGMENT, L, 16)]);
        let s = SglDescriptor::new(sgl_type::SEGMENT, L, 16);
        assert_eq!(
            sgl(&bus, s, 4096),
            Err(NvmeStatus::INVALID_SGL_DESCRIPTOR_COUNT)
        );
    }
}
