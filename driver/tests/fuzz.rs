//! Property tests with many cases, in bounded time: decoding of completion entries and log
//! pages from arbitrary bytes, arbitrary segment lists through `QueuePair::submit` against the
//! controller model, and a model that misbehaves at random under random queue depths and
//! deadlines. Nothing may panic, nothing may be sent for a buffer the driver refuses, data must
//! land where the segments say, and every command completes exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::{DmaBuffer, DmaSlice};
use rnvme_driver::identify::{parse_error_log, SmartLog};
use rnvme_driver::io::{read_cmd, write_cmd, IoQueuePair};
use rnvme_driver::model::{bring_up, model_options, Model, ModelConfig, ModelNamespace};
use rnvme_driver::prp::PrpError;
use rnvme_driver::queue::DataPointerMode;
use rnvme_driver::spec::{CqEntry, PAGE_SIZE};
use rnvme_driver::status::sct;
use rnvme_driver::{Error, NvmeStatus, Segment};

/// LBA size of the namespace the data tests use.
const LBA: usize = 512;
/// The data buffer segments are cut from: 4 regions of 9 pages (a transfer is at most 8).
const REGION: usize = 9 * PAGE_SIZE;
const REGIONS: usize = 4;

fn open(lba_size: u32) -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(
        ModelConfig {
            namespaces: vec![ModelNamespace {
                nsid: 1,
                lba_size,
                blocks: 4096,
            }],
            ..ModelConfig::default()
        },
        model_options(),
    )
    .expect("the model comes up");
    (model, ctrl)
}

/// Poll until the command tagged `tag` completes; its status. Fails instead of hanging.
fn wait_for(qp: &mut IoQueuePair, tag: u64) -> NvmeStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut got = None;
        qp.poll(64, |c| {
            if c.tag == tag {
                got = Some(c.status);
            }
        });
        if let Some(s) = got {
            return s;
        }
        assert!(Instant::now() < deadline, "command {tag} never completed");
    }
}

/// `cases` cases, without a failure file (integration tests have no source root for it):
/// a failing case is printed with its inputs.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ----- completion entries and log pages -----

proptest! {
    #![proptest_config(config(2048))]

    /// Any 16 bytes are a completion entry whose fields and status decode without panicking,
    /// and the status survives a round trip through its 15-bit field (CRD aside).
    #[test]
    fn completion_entries_decode(dw in any::<[u32; 4]>()) {
        let e = CqEntry { dw0: dw[0], dw1: dw[1], dw2: dw[2], dw3: dw[3] };
        let field = e.status_field();
        prop_assert!(field < 1 << 15);
        let s = NvmeStatus::from_field(field);
        prop_assert_eq!(s.sc as u16, field & 0xff);
        prop_assert_eq!(s.sct as u16, (field >> 8) & 7);
        prop_assert_eq!(s.dnr, field & (1 << 14) != 0);
        prop_assert_eq!(s.more, field & (1 << 13) != 0);
        // CRD (bits 12:11) is not kept.
        prop_assert_eq!(s.to_field(), field & !(3 << 11));
        prop_assert_eq!(s.is_success(), field & 0x7ff == 0);
        prop_assert_eq!(s.is_retryable(), field & 0x7ff != 0 && !s.dnr);
        let text = s.to_string();
        prop_assert!(!s.name().is_empty());
        let sct_sc = format!("(sct {} / sc {:#04x})", s.sct, s.sc);
        prop_assert!(text.starts_with(s.name()) && text.contains(&sct_sc), "{}", text);
        prop_assert_eq!(text.ends_with(", do not retry"), s.dnr);
        if s.sct == sct::VENDOR_SPECIFIC {
            prop_assert_eq!(s.name(), "Vendor Specific");
        }
        // Building an entry from its parts gives the same parts back.
        let b = CqEntry::build(e.dw0, e.sq_head(), e.sq_id(), e.cid(), e.phase(), field);
        prop_assert_eq!((b.dw0, b.dw2, b.dw3), (e.dw0, e.dw2, e.dw3));
    }

    /// Error log entries written field by field at the offsets of the specification read back
    /// as written; empty entries and a trailing partial entry are skipped.
    #[test]
    fn error_log_entries_round_trip(
        entries in prop::collection::vec(
            (any::<u64>(), any::<u16>(), any::<u16>(), 0u16..1 << 15, any::<bool>(), any::<u16>(), any::<u64>(), any::<u32>(), any::<u8>()),
            0..12),
        tail in 0usize..64,
    ) {
        let mut page = Vec::new();
        for &(count, sqid, cid, status, phase, pel, lba, nsid, vs) in &entries {
            let mut e = [0u8; 64];
            e[0..8].copy_from_slice(&count.to_le_bytes());
            e[8..10].copy_from_slice(&sqid.to_le_bytes());
            e[10..12].copy_from_slice(&cid.to_le_bytes());
            e[12..14].copy_from_slice(&((status << 1) | phase as u16).to_le_bytes());
            e[14..16].copy_from_slice(&pel.to_le_bytes());
            e[16..24].copy_from_slice(&lba.to_le_bytes());
            e[24..28].copy_from_slice(&nsid.to_le_bytes());
            e[28] = vs;
            page.extend_from_slice(&e);
        }
        page.extend(std::iter::repeat_n(0xffu8, tail));
        let parsed = parse_error_log(&page);
        let want: Vec<_> = entries.iter().filter(|e| e.0 != 0).collect();
        prop_assert_eq!(parsed.len(), want.len());
        for (p, &&(count, sqid, cid, status, _, pel, lba, nsid, vs)) in parsed.iter().zip(&want) {
            prop_assert_eq!((p.error_count, p.sqid, p.cid), (count, sqid, cid));
            prop_assert_eq!(p.status, NvmeStatus::from_field(status));
            prop_assert_eq!((p.parameter_error_location, p.lba, p.nsid, p.vendor_specific), (pel, lba, nsid, vs));
        }
    }

    /// A SMART log of any content of at least 512 bytes parses; shorter ones are refused with
    /// the length that was expected.
    #[test]
    fn smart_log_of_any_bytes(data in prop::collection::vec(any::<u8>(), 0..700)) {
        match SmartLog::parse(&data) {
            Ok(s) => {
                prop_assert!(data.len() >= 512);
                prop_assert_eq!(s.critical_warning, data[0]);
                prop_assert_eq!(s.temperature_kelvin, u16::from_le_bytes([data[1], data[2]]));
                let _ = s.temperature_celsius();
            }
            Err(e) => {
                prop_assert!(data.len() < 512);
                prop_assert!(e.to_string().contains("512"), "{}", e);
            }
        }
    }
}

/// Get Log Page through the controller for every page id and many lengths: a result or a
/// command error, never a panic; and the error log the model keeps names the failures it
/// returned.
#[test]
fn log_pages_through_the_controller() {
    let (model, ctrl) = open(4096);
    for lid in 0u8..=0x10 {
        for len in [4usize, 7, 64, 512, 513, 4096, 4100, 8192] {
            match ctrl.get_log_page(lid, 0xffff_ffff, len) {
                Ok(v) => assert_eq!(v.len(), len),
                Err(e) => {
                    let s = e
                        .status()
                        .unwrap_or_else(|| panic!("lid {lid} len {len}: {e}"));
                    assert!(!s.is_success());
                }
            }
        }
    }
    // Failures the model returned show up in its error log, newest first.
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_retry_limit(0);
    let buf = ctrl.alloc(4096).unwrap();
    for lba in [9u64, 17, 33] {
        model.fail_lba(1, lba, NvmeStatus::UNRECOVERED_READ_ERROR, Some(1));
        let e = qp.read(1, lba, 1, &buf).unwrap_err();
        assert_eq!(e.status(), Some(NvmeStatus::UNRECOVERED_READ_ERROR));
    }
    let log = ctrl.error_log().unwrap();
    let reads: Vec<(u64, NvmeStatus)> = log
        .iter()
        .filter(|e| e.sqid == qp.qid())
        .map(|e| (e.lba, e.status))
        .collect();
    assert_eq!(
        reads,
        [33, 17, 9].map(|l| (l, NvmeStatus::UNRECOVERED_READ_ERROR))
    );
    assert!(log.windows(2).all(|w| w[0].error_count > w[1].error_count));
    let smart = ctrl.smart_log().unwrap();
    assert!(smart.media_errors >= 3);
}

// ----- segment lists through submit -----

/// Where a segment starts inside its region.
#[derive(Copy, Clone, Debug)]
enum Align {
    Page,
    Dword,
    Any,
}

/// Segment `(offset, len)` pairs in the data buffer for `total` bytes cut at `cuts`, each in
/// its own region (so they never overlap), placed with any alignment.
fn layout(total: usize, placing: &[(Align, usize)], cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < total)
        .collect();
    points.sort();
    points.dedup();
    points.insert(0, 0);
    points.push(total);
    points
        .windows(2)
        .zip(placing)
        .enumerate()
        .map(|(i, (w, &(align, raw)))| {
            let len = w[1] - w[0];
            let room = REGION - len;
            let off = match align {
                Align::Page => 0,
                Align::Dword => (raw % (room + 1)) & !3,
                Align::Any => raw % (room + 1),
            };
            (i * REGION + off, len)
        })
        .collect()
}

/// A list the PRP rules allow, for `total` bytes: a first piece of `first` bytes (a multiple
/// of 4) that ends on a page boundary, then whole pages of `pages` sizes, the last piece
/// taking the rest.
fn prp_layout(total: usize, first: usize, pages: &[usize]) -> Vec<(usize, usize)> {
    let first = first.min(total);
    let mut out = vec![((PAGE_SIZE - first % PAGE_SIZE) % PAGE_SIZE, first)];
    let mut left = total - first;
    for (i, &p) in pages.iter().enumerate() {
        if left == 0 {
            break;
        }
        let len = if i + 2 == REGIONS {
            left
        } else {
            (p * PAGE_SIZE).min(left)
        };
        out.push(((i + 1) * REGION, len));
        left -= len;
    }
    if left > 0 {
        // Fewer page counts than needed: the last piece takes the rest.
        let last = out.len() - 1;
        if last == 0 {
            out.push((REGION, left));
        } else {
            out[last].1 += left;
        }
    }
    out
}

/// Blocks and segment pieces: half of the cases shaped the way the PRP rules allow, half
/// anyhow (mostly refused by the PRP builder, always fine for SGLs).
fn pieces_strategy() -> impl Strategy<Value = (u32, Vec<(usize, usize)>)> {
    (1u32..=64).prop_flat_map(|blocks| {
        let total = blocks as usize * LBA;
        let shaped = (
            (1usize..=total / 4).prop_map(|q| q * 4),
            prop::collection::vec(1usize..=3, REGIONS - 1),
        )
            .prop_map(move |(first, pages)| (blocks, prp_layout(total, first, &pages)));
        let anyhow = (1usize..=REGIONS).prop_flat_map(move |k| {
            (
                prop::collection::vec(
                    (
                        prop_oneof![Just(Align::Page), Just(Align::Dword), Just(Align::Any)],
                        0usize..REGION,
                    ),
                    k,
                ),
                prop::collection::vec(
                    prop_oneof![
                        (1usize..total).prop_map(|c| c / PAGE_SIZE * PAGE_SIZE),
                        1usize..total
                    ],
                    k - 1,
                ),
            )
                .prop_map(move |(placing, cuts)| (blocks, layout(total, &placing, &cuts)))
        });
        prop_oneof![shaped, anyhow]
    })
}

/// What the PRP rules say about a segment list (the oracle for `submit` in PRP mode).
fn prp_allows(segs: &[Segment]) -> bool {
    let page = PAGE_SIZE as u64;
    let last = segs.len() - 1;
    segs.iter().enumerate().all(|(i, s)| {
        let start_ok = if i == 0 {
            s.iova.0.is_multiple_of(4)
        } else {
            s.iova.0.is_multiple_of(page)
        };
        let end_ok = i == last || (s.iova.0 + s.len as u64).is_multiple_of(page);
        start_ok && end_ok
    })
}

struct Bench {
    model: Arc<Model>,
    qp: IoQueuePair,
    buf: DmaBuffer,
    tag: u64,
}

fn bench(mode: DataPointerMode) -> Bench {
    let (model, ctrl) = open(LBA as u32);
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_data_pointer_mode(mode).unwrap();
    let buf = ctrl.alloc(REGION * REGIONS).unwrap();
    // The controller handle may go: the queue pair and the buffer keep what they need.
    drop(ctrl);
    Bench {
        model,
        qp,
        buf,
        tag: 0,
    }
}

/// Submit one write and one read with `segs` at `lba`: refused before anything is sent, or
/// the data goes exactly where the segments say, both ways.
fn segments_case(
    b: &mut Bench,
    mode: DataPointerMode,
    blocks: u32,
    pieces: &[(usize, usize)],
    lba: u64,
    fill: u8,
) -> Result<(), TestCaseError> {
    let slices: Vec<DmaSlice<'_>> = pieces
        .iter()
        .map(|&(off, len)| b.buf.segment_at(off, len))
        .collect();
    let segs: Vec<Segment> = slices.iter().map(|s| s.segment()).collect();
    let total: usize = pieces.iter().map(|p| p.1).sum();
    prop_assert_eq!(total, blocks as usize * LBA);
    // Distinct data in every byte of the segments.
    let mut data = Vec::with_capacity(total);
    b.buf.fill(0xee);
    for &(off, len) in pieces {
        let bytes: Vec<u8> = (0..len)
            .map(|i| fill.wrapping_add((data.len() + i) as u8 ^ (i >> 8) as u8))
            .collect();
        b.buf.write_bytes(off, &bytes);
        data.extend_from_slice(&bytes);
    }
    let before = (
        b.model.stats().io_commands,
        b.qp.stats().submitted,
        b.qp.free_slots(),
    );
    b.tag += 1;
    let tag = b.tag;
    match b.qp.submit(write_cmd(1, lba, blocks, false), &slices, tag) {
        Err(e) => {
            prop_assert_eq!(mode, DataPointerMode::Prp, "SGLs describe any list: {}", e);
            prop_assert!(!prp_allows(&segs), "refused a valid list {:?}: {}", segs, e);
            prop_assert!(matches!(e, Error::Prp(_)), "{:?}", e);
            prop_assert!(
                e.to_string()
                    .starts_with("cannot describe the buffer with PRPs: PRP"),
                "{}",
                e
            );
            // Nothing was queued, let alone sent.
            b.qp.ring();
            let after = (
                b.model.stats().io_commands,
                b.qp.stats().submitted,
                b.qp.free_slots(),
            );
            prop_assert_eq!(before, after);
            return Ok(());
        }
        Ok(_) => {
            prop_assert!(
                mode == DataPointerMode::Sgl || prp_allows(&segs),
                "accepted an invalid PRP list {:?}",
                segs
            );
        }
    }
    b.qp.ring();
    prop_assert_eq!(wait_for(&mut b.qp, tag), NvmeStatus::SUCCESS);
    prop_assert_eq!(b.model.read_ns(1, lba, blocks as u64), data.clone());
    // And back: the blocks land in the segments, nothing outside them changes.
    b.buf.fill(0x11);
    b.tag += 1;
    let tag = b.tag;
    b.qp.submit(read_cmd(1, lba, blocks), &slices, tag).unwrap();
    b.qp.ring();
    prop_assert_eq!(wait_for(&mut b.qp, tag), NvmeStatus::SUCCESS);
    let host = b.buf.to_vec();
    let mut at = 0;
    let mut inside = vec![false; host.len()];
    for &(off, len) in pieces {
        prop_assert_eq!(&host[off..off + len], &data[at..at + len]);
        inside[off..off + len].fill(true);
        at += len;
    }
    prop_assert!(
        host.iter().zip(&inside).all(|(&h, &i)| i || h == 0x11),
        "a read wrote outside its segments"
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn prp_segment_lists_are_refused_or_transfer_exactly(
        (blocks, pieces) in pieces_strategy(),
        lba in 0u64..4000,
        fill in any::<u8>(),
    ) {
        thread_local!(static B: std::cell::RefCell<Option<Bench>> = const { std::cell::RefCell::new(None) });
        B.with(|cell| {
            let mut slot = cell.borrow_mut();
            let b = slot.get_or_insert_with(|| bench(DataPointerMode::Prp));
            segments_case(b, DataPointerMode::Prp, blocks, &pieces, lba, fill)
        })?;
    }

    #[test]
    fn sgl_segment_lists_transfer_exactly(
        (blocks, pieces) in pieces_strategy(),
        lba in 0u64..4000,
        fill in any::<u8>(),
    ) {
        thread_local!(static B: std::cell::RefCell<Option<Bench>> = const { std::cell::RefCell::new(None) });
        B.with(|cell| {
            let mut slot = cell.borrow_mut();
            let b = slot.get_or_insert_with(|| bench(DataPointerMode::Sgl));
            segments_case(b, DataPointerMode::Sgl, blocks, &pieces, lba, fill)
        })?;
    }
}

/// A user buffer at an odd address, through the library API: refused with the reason before
/// anything is sent, and the queue pair goes on working.
#[test]
fn misaligned_buffer_is_refused_before_anything_is_sent() {
    let (model, ctrl) = open(LBA as u32);
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    // PRPs throughout: by default a scattered buffer would go out as an SGL.
    qp.set_data_pointer_mode(DataPointerMode::Prp).unwrap();
    let buf = ctrl.alloc(2 * PAGE_SIZE).unwrap();
    type Expect = fn(&PrpError) -> bool;
    let cases: [(Vec<DmaSlice<'_>>, Expect); 3] = [
        // An odd start.
        (vec![buf.segment_at(1, LBA)], |e| {
            matches!(e, PrpError::OffsetNotDwordAligned { .. })
        }),
        // A second piece that starts inside a page.
        (
            vec![
                buf.segment_at(0, PAGE_SIZE),
                buf.segment_at(PAGE_SIZE + 8, LBA),
            ],
            |e| matches!(e, PrpError::StartNotPageAligned { index: 1, .. }),
        ),
        // A first piece that ends inside a page, followed by another.
        (
            vec![buf.segment_at(0, LBA), buf.segment_at(PAGE_SIZE, PAGE_SIZE)],
            |e| matches!(e, PrpError::EndNotPageAligned { index: 0, .. }),
        ),
    ];
    for (i, (segs, expected)) in cases.iter().enumerate() {
        let blocks = (segs.iter().map(|s| s.len as usize).sum::<usize>() / LBA) as u32;
        let before = (
            model.stats().io_commands,
            qp.stats().submitted,
            qp.free_slots(),
        );
        let err = qp
            .submit(read_cmd(1, 0, blocks), segs, 1)
            .expect_err("a misaligned buffer must be refused");
        match &err {
            Error::Prp(p) => assert!(expected(p), "case {i}: {p:?}"),
            other => panic!("case {i}: {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("use a 4-byte aligned buffer")
                || text.contains("use SGLs or bounce the data"),
            "case {i}: the error says what to do: {text}"
        );
        qp.ring();
        assert_eq!(
            before,
            (
                model.stats().io_commands,
                qp.stats().submitted,
                qp.free_slots()
            ),
            "case {i}: nothing was sent"
        );
    }
    // A zero-length piece is refused too. (An address nobody owns cannot be expressed: data
    // is made only from buffers.)
    let e = qp
        .submit(
            read_cmd(1, 0, 1),
            &[buf.segment_at(0, 0), buf.segment_at(0, LBA)],
            1,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::Prp(PrpError::ZeroLength { .. })),
        "{e:?}"
    );
    assert_eq!(model.stats().io_commands, 0);
    // The queue pair is unharmed.
    model.write_ns(1, 3, &[0x42; LBA]);
    qp.read(1, 3, 1, &buf).unwrap();
    let mut first = [0u8; LBA];
    buf.read_bytes(0, &mut first);
    assert_eq!(first, [0x42; LBA]);
}

// ----- a controller that misbehaves at random -----

/// One run of a randomly misbehaving model: see
/// `random_misbehaviour_completes_every_command_exactly_once`.
fn misbehaviour_case(
    seed: u64,
    rate: u8,
    entries: u32,
    timeout_ms: u64,
    retries: u8,
    commands: u64,
) -> Result<(), TestCaseError> {
    let (model, ctrl) = open(4096);
    let mut qp = ctrl.create_io_qpair(entries).unwrap();
    qp.set_command_timeout(Duration::from_millis(timeout_ms));
    qp.set_retry_limit(retries);
    let bufs: Vec<_> = (0..8).map(|_| ctrl.alloc(4096).unwrap()).collect();
    model.set_random_misbehaviour(seed, rate);
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < commands as usize {
        while next < commands && qp.free_slots() > 0 {
            let b = &bufs[(next % 8) as usize];
            let cmd = if next.is_multiple_of(3) {
                write_cmd(1, next % 1024, 1, false)
            } else {
                read_cmd(1, next % 1024, 1)
            };
            match qp.submit(cmd, &[b.segment()], next) {
                Ok(_) => next += 1,
                Err(Error::QueueFull) => break,
                Err(e) => return Err(TestCaseError::fail(format!("submit: {e}"))),
            }
        }
        qp.poll(64, |c| {
            *seen.entry(c.tag).or_default() += 1;
        });
        prop_assert!(
            Instant::now() < deadline,
            "hung: {} of {} completed, {} outstanding, {:?}",
            seen.len(),
            commands,
            qp.outstanding(),
            qp.stats()
        );
    }
    // A few more polls: a late duplicate must not complete anything again.
    for _ in 0..2048 {
        qp.poll(64, |c| *seen.entry(c.tag).or_default() += 1);
    }
    prop_assert!(seen.values().all(|&n| n == 1), "a command completed twice");
    prop_assert_eq!(seen.len() as u64, commands);
    prop_assert_eq!(qp.outstanding(), 0);
    let s = qp.stats();
    prop_assert_eq!(s.completed, commands);
    // Calm again: held completions are posted now, and the driver drops them as spurious
    // (their commands were aborted or cancelled long ago).
    model.set_random_misbehaviour(0, 0);
    model.release_all();
    for _ in 0..64 {
        qp.poll(64, |c| *seen.entry(c.tag).or_default() += 1);
    }
    prop_assert!(
        seen.values().all(|&n| n == 1),
        "a released completion completed a command again"
    );
    // The misbehaving queue pair is deleted (the controller forgets what it still held) and
    // the controller moves data correctly on a new one.
    drop(qp);
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    bufs[0].fill(0x5c);
    qp.write(1, 2000, 1, &bufs[0], false).unwrap();
    bufs[1].fill(0);
    qp.read(1, 2000, 1, &bufs[1]).unwrap();
    prop_assert_eq!(bufs[1].to_vec(), vec![0x5c; 4096]);
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    /// Dropped, held, duplicated, reordered completions and random error statuses, with random
    /// queue depths, deadlines and retry limits: every command completes exactly once, nothing
    /// hangs, and afterwards the controller moves data correctly.
    #[test]
    fn random_misbehaviour_completes_every_command_exactly_once(
        seed in 1u64..u64::MAX,
        rate in 1u8..40,
        entries in 2u32..64,
        timeout_ms in 5u64..40,
        retries in 0u8..4,
        commands in 20u64..200,
    ) {
        misbehaviour_case(seed, rate, entries, timeout_ms, retries, commands)?;
    }
}

/// A case proptest found: on a two-entry queue, a duplicated completion that had to wait for
/// room in the completion queue arrived after its command id was reused.
#[test]
fn misbehaviour_regression_two_entry_queue() {
    misbehaviour_case(12196188608767353406, 12, 2, 5, 0, 33).unwrap();
}

/// Status codes of every type survive a completion entry round trip through the model's
/// per-LBA failure rules: what the controller posts is what the caller is handed.
#[test]
fn injected_statuses_reach_the_caller_decoded() {
    let (model, ctrl) = open(4096);
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    qp.set_retry_limit(0);
    let buf = ctrl.alloc(4096).unwrap();
    let statuses = [
        NvmeStatus::UNRECOVERED_READ_ERROR,
        NvmeStatus::UNRECOVERED_READ_ERROR.with_dnr(true),
        NvmeStatus::WRITE_FAULT.with_more(true),
        NvmeStatus::new(sct::GENERIC, 0x22),
        NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x80).with_dnr(true),
        NvmeStatus::new(sct::PATH, 0x60),
        NvmeStatus::new(sct::VENDOR_SPECIFIC, 0xfe),
        NvmeStatus::new(5, 0x01),
    ];
    for (i, &st) in statuses.iter().enumerate() {
        let lba = 100 + i as u64;
        model.fail_lba(1, lba, st, Some(1));
        let e = qp.read(1, lba, 1, &buf).unwrap_err();
        assert_eq!(e.status(), Some(st), "{e}");
        assert!(e.to_string().contains(&st.to_string()), "{e}");
        // The rule was used up: the next read succeeds.
        qp.read(1, lba, 1, &buf).unwrap();
    }
}

/// Lost commands on a controller whose admin queue does not answer either: the first Abort
/// times out and the driver resets at once instead of spending an admin timeout on the Abort
/// of every other lost command; every command comes back cancelled, and the queue pair works
/// after the reset.
#[test]
fn an_abort_that_times_out_leads_straight_to_a_reset() {
    let (model, ctrl) = bring_up(
        ModelConfig::default(),
        ControllerOptions {
            admin_timeout: Duration::from_millis(300),
            ..model_options()
        },
    )
    .unwrap();
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    qp.set_command_timeout(Duration::from_millis(50));
    let bufs: Vec<_> = (0..6).map(|_| ctrl.alloc(4096).unwrap()).collect();
    // Six reads are lost, and so is the completion of the first Abort.
    model.drop_next_completions(7);
    for (i, b) in bufs.iter().enumerate() {
        qp.submit(read_cmd(1, i as u64, 1), &[b.segment()], i as u64)
            .unwrap();
    }
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < 6 {
        qp.poll(64, |c| got.push((c.tag, c.status)));
        assert!(t.elapsed() < Duration::from_secs(10), "hung: {got:?}");
    }
    // One Abort (timed out), no more: six would have cost six admin timeouts.
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(model.stats().aborts, 1);
    let s = qp.stats();
    assert_eq!((s.aborts, s.resets, s.cancelled), (1, 1, 6), "{s:?}");
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        (0..6u64)
            .map(|t| (t, NvmeStatus::ABORTED_BY_RESET))
            .collect::<Vec<_>>()
    );
    model.write_ns(1, 3, &[0x33; 4096]);
    qp.read(1, 3, 1, &bufs[0]).unwrap();
    assert_eq!(bufs[0].to_vec(), vec![0x33; 4096]);
}

/// A controller reset behind the driver's back (as a function level reset does): noticed at
/// the next health check, without waiting for the command deadline and an Abort that cannot
/// be heard; the outstanding commands come back cancelled and the queue pair works again.
#[test]
fn a_reset_behind_the_drivers_back_is_noticed_at_once() {
    use rnvme_driver::hw::Hardware;
    use rnvme_driver::model::CompletionMode;
    use rnvme_driver::spec::reg;

    let (model, ctrl) = open(4096);
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    qp.set_command_timeout(Duration::from_secs(30));
    let bufs: Vec<_> = (0..4).map(|_| ctrl.alloc(4096).unwrap()).collect();
    model.set_completion_mode(CompletionMode::Deferred);
    for (i, b) in bufs.iter().enumerate() {
        qp.submit(read_cmd(1, i as u64, 1), &[b.segment()], i as u64)
            .unwrap();
    }
    qp.ring();
    assert_eq!(model.held(), 4);
    model.set_completion_mode(CompletionMode::Instant);
    // Someone else clears CC.EN: the controller drops its queues and its held completions.
    model.write32(reg::CC, model.cc() & !1);
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < 4 {
        qp.poll(64, |c| got.push((c.tag, c.status)));
        assert!(t.elapsed() < Duration::from_secs(10), "hung: {got:?}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "noticed after {:?}, not after the 30 s deadline",
        t.elapsed()
    );
    assert!(got.iter().all(|&(_, s)| s == NvmeStatus::ABORTED_BY_RESET));
    let s = qp.stats();
    assert_eq!((s.timeouts, s.aborts, s.resets), (0, 0, 1), "{s:?}");
    assert_eq!(
        model.enables(),
        2,
        "brought up, then enabled again by the reset"
    );
    model.write_ns(1, 2, &[0x77; 4096]);
    qp.read(1, 2, 1, &bufs[0]).unwrap();
    assert_eq!(bufs[0].to_vec(), vec![0x77; 4096]);
}
