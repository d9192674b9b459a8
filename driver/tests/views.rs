//! Views: `&[u8]`s of DMA memory read in place ([`DmaBuffer::view`]), against the controller
//! model. While a page is viewed, no command may make the device write it and the CPU may
//! not write it through the buffer; while a command may make the device write a page, no view
//! of it is made; memory that was quarantined is never viewed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rnvme_driver::controller::Controller;
use rnvme_driver::dma::{DmaBuffer, DmaError, DmaView};
use rnvme_driver::io::{read_cmd, write_cmd, IoQueuePair};
use rnvme_driver::model::{bring_up, model_options, LateDma, Model, ModelConfig};
use rnvme_driver::queue::{Completion, QueuePair};
use rnvme_driver::spec::{admin_op, cns, SqEntry};
use rnvme_driver::{Error, NvmeStatus};

fn open() -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(ModelConfig::default(), model_options()).unwrap();
    (model, ctrl)
}

fn viewable(ctrl: &Controller, pages: usize) -> DmaBuffer {
    ctrl.pool().alloc_viewable(pages * 4096).unwrap()
}

/// Poll until `n` completions arrived (20 s at most).
fn wait(qp: &mut IoQueuePair, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n {
        qp.poll(64, |c| got.push(c));
        assert!(Instant::now() < deadline, "the driver hung");
    }
    got
}

#[test]
fn a_read_into_a_viewed_page_is_refused_and_nothing_is_queued() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.write_ns(1, 3, &[0x33; 4096]);
    let buf = viewable(&ctrl, 2);
    buf.write_bytes(0, &[7; 4096]);
    let view = buf.view(100, 10).unwrap();
    let e = qp
        .submit(read_cmd(1, 3, 1), &[buf.segment_at(0, 4096)], 1)
        .unwrap_err();
    assert!(matches!(e, Error::BufferViewed { iova, len: 4096 } if iova == buf.iova()));
    let msg = e.to_string();
    assert!(
        msg.contains("being read in place") && msg.contains("the device may not write it"),
        "{msg}"
    );
    // A read of both pages touches the viewed one too.
    assert!(matches!(
        qp.submit(read_cmd(1, 3, 2), &[buf.segment()], 2),
        Err(Error::BufferViewed { .. })
    ));
    // The synchronous helper is refused the same way, and returns at once.
    assert!(matches!(
        qp.read(1, 3, 1, &buf),
        Err(Error::BufferViewed { .. })
    ));
    assert_eq!(qp.outstanding(), 0, "nothing queued");
    assert_eq!(qp.stats().submitted, 0);
    assert_eq!(qp.stats().viewed_refused, 3);
    assert_eq!(&view[..], &[7; 10][..], "the view did not change");
    // The queue pair goes on: a read into another buffer works.
    let other = ctrl.alloc(4096).unwrap();
    qp.read(1, 3, 1, &other).unwrap();
    assert_eq!(other.to_vec(), vec![0x33; 4096]);
    // Once the view is gone, the read into the buffer goes through.
    drop(view);
    qp.read(1, 3, 1, &buf).unwrap();
    assert_eq!(buf.view(0, 4096).unwrap()[..], [0x33; 4096][..]);
    assert_eq!(qp.free_slots(), qp.capacity(), "every slot came back");
}

#[test]
fn a_page_being_read_into_is_viewed_only_once_the_completion_is_reaped() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.write_ns(1, 9, &[0x5a; 4096]);
    let buf = viewable(&ctrl, 1);
    qp.submit(read_cmd(1, 9, 1), &[buf.segment()], 7).unwrap();
    let e = buf.view(0, 4096).unwrap_err();
    assert!(matches!(e, DmaError::BeingWritten { .. }), "{e}");
    assert!(e.to_string().contains("completion is reaped"), "{e}");
    // Also through a lease, and for part of the page.
    assert!(buf.lease(0, 4096).view().is_err());
    assert!(buf.view(4000, 1).is_err());
    // The model completes the read when the doorbell rings; the driver has not reaped it.
    qp.ring();
    assert!(buf.view(0, 4096).is_err(), "completion not reaped yet");
    let done = wait(&mut qp, 1);
    assert_eq!((done[0].tag, done[0].status), (7, NvmeStatus::SUCCESS));
    let v = buf.view(0, 4096).unwrap();
    assert_eq!(
        &v[..],
        &[0x5a; 4096][..],
        "the view shows what the device wrote"
    );
}

#[test]
fn a_write_from_a_viewed_page_is_allowed() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let buf = viewable(&ctrl, 1);
    buf.write_bytes(0, &[0xc3; 4096]);
    let v = buf.view(0, 4096).unwrap();
    // Host to controller: the device only reads the data.
    qp.submit(write_cmd(1, 20, 1, false), &[buf.segment()], 1)
        .unwrap();
    // And a second view while the write is in flight.
    let w = buf.view(0, 16).unwrap();
    let done = wait(&mut qp, 1);
    assert!(done[0].status.is_success());
    assert_eq!(model.read_ns(1, 20, 1), vec![0xc3; 4096]);
    assert_eq!(&v[..], &[0xc3; 4096][..]);
    assert_eq!(&w[..], &[0xc3; 16][..]);
    // The synchronous helper too.
    qp.write(1, 21, 1, &buf, false).unwrap();
    assert_eq!(model.read_ns(1, 21, 1), vec![0xc3; 4096]);
}

#[test]
fn other_pages_of_a_viewed_buffer_take_reads() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.write_ns(1, 4, &[4; 4096]);
    let buf = viewable(&ctrl, 3);
    buf.write_bytes(4096, &[1; 4096]);
    let v = buf.view(4096, 4096).unwrap();
    qp.submit(read_cmd(1, 4, 1), &[buf.segment_at(0, 4096)], 1)
        .unwrap();
    qp.submit(read_cmd(1, 4, 1), &[buf.segment_at(8192, 4096)], 2)
        .unwrap();
    // Pages 0 and 2 are being written: no view of them, nor of a range that touches them.
    assert!(buf.view(0, 1).is_err() && buf.view(8191, 2).is_err());
    assert!(buf.view(4096, 4096).is_ok(), "page 1 is not written");
    let done = wait(&mut qp, 2);
    assert!(done.iter().all(|c| c.status.is_success()));
    assert_eq!(&v[..], &[1; 4096][..]);
    let all = buf.view(0, 3 * 4096).unwrap();
    assert_eq!(&all[..4096], &[4; 4096][..]);
    assert_eq!(&all[4096..8192], &[1; 4096][..]);
    assert_eq!(&all[8192..], &[4; 4096][..]);
}

#[test]
fn a_command_over_several_buffers_claims_every_viewable_one() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.write_ns(1, 0, &[0x11; 3 * 4096]);
    let a = viewable(&ctrl, 2);
    let plain = ctrl.alloc(4096).unwrap();
    // a's first page, a plain page, then a's second page: three pieces, two buffers.
    let data = [
        a.segment_at(0, 4096),
        plain.segment(),
        a.segment_at(4096, 4096),
    ];
    let v = a.view(4096, 1).unwrap();
    assert!(matches!(
        qp.submit(read_cmd(1, 0, 3), &data, 1),
        Err(Error::BufferViewed { iova, .. }) if iova == a.iova().add(4096)
    ));
    assert!(
        a.view(0, 4096).is_ok(),
        "the refused command let go of what it claimed"
    );
    drop(v);
    qp.submit(read_cmd(1, 0, 3), &data, 2).unwrap();
    assert!(a.view(0, 1).is_err() && a.view(4096, 1).is_err());
    assert!(wait(&mut qp, 1)[0].status.is_success());
    assert_eq!(a.view(0, 8192).unwrap()[..], [0x11; 8192][..]);
    assert_eq!(plain.to_vec(), vec![0x11; 4096]);
}

#[test]
fn cpu_writes_to_a_viewed_page_are_refused() {
    let (_model, ctrl) = open();
    let buf = viewable(&ctrl, 2);
    let v = buf.view(10, 20).unwrap();
    assert!(buf.is_viewed(0, 1) && !buf.is_viewed(4096, 4096));
    let e = buf.try_write_bytes(4000, &[1; 200]).unwrap_err();
    assert!(matches!(e, DmaError::Viewed { .. }), "{e}");
    assert!(e.to_string().contains("being read in place"), "{e}");
    assert!(matches!(
        buf.try_write_bytes(8000, &[1; 200]),
        Err(DmaError::OutOfRange { .. })
    ));
    // The other page takes writes, and a copy out of the viewed one is fine.
    buf.try_write_bytes(4096, &[2; 4096]).unwrap();
    buf.write_bytes(4096, &[3; 10]);
    buf.write_u64(4096 + 16, 5);
    assert_eq!(buf.read_u64(4096 + 16), 5);
    let mut out = [9; 20];
    buf.read_bytes(10, &mut out);
    assert_eq!(out, [0; 20]);
    assert_eq!(&v[..], &[0; 20][..]);
    drop(v);
    assert!(!buf.is_viewed(0, 8192));
    buf.try_write_bytes(0, &[4; 8]).unwrap();
}

#[test]
#[should_panic(expected = "being read in place")]
fn write_bytes_to_a_viewed_page_panics() {
    let (_model, ctrl) = open();
    let buf = viewable(&ctrl, 1);
    let _v = buf.view(0, 1).unwrap();
    buf.write_bytes(4095, &[1]);
}

#[test]
#[should_panic(expected = "being read in place")]
fn write_u64_to_a_viewed_page_panics() {
    let (_model, ctrl) = open();
    let buf = viewable(&ctrl, 1);
    let _v = buf.view(0, 1).unwrap();
    buf.write_u64(8, 1);
}

#[test]
fn a_quarantined_buffer_is_never_viewed() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_command_timeout(Duration::from_millis(50));
    model.set_late_dma(LateDma::Io);
    let buf = viewable(&ctrl, 2);
    qp.submit(read_cmd(1, 0, 1), &[buf.segment_at(0, 4096)], 1)
        .unwrap();
    qp.ring();
    assert_eq!(model.parked(), 1);
    // The controller can be neither disabled nor reset: the read may still land.
    model.set_stuck_enabled(true);
    model.set_flr_fails(true);
    let done = wait(&mut qp, 1);
    assert_eq!(done[0].status, NvmeStatus::ABORTED_BY_RESET);
    assert!(buf.is_quarantined());
    // The command was abandoned; its memory stays quarantined and is never read in place,
    // neither the page the device may write nor the other one.
    for (off, len) in [(0, 4096), (4096, 4096), (0, 1)] {
        let e = buf.view(off, len).unwrap_err();
        assert!(matches!(e, DmaError::Quarantined { .. }), "{e}");
        assert!(e.to_string().contains("quarantined"), "{e}");
    }
    assert!(buf.lease(4096, 4096).view().is_err());
    // The device writes late; still no view, before or after the buffer's owner lets go.
    let late = model.fire_late_dma(0xaa, false);
    assert_eq!((late.commands, late.faults), (1, 0));
    assert!(buf.view(0, 4096).is_err() && buf.view(4096, 4096).is_err());
    let lease = buf.lease(0, 8192);
    drop(buf);
    assert!(matches!(lease.view(), Err(DmaError::Quarantined { .. })));
}

#[test]
fn commands_cancelled_by_a_reset_that_stopped_the_controller_let_go_of_their_pages() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_command_timeout(Duration::from_millis(50));
    model.set_late_dma(LateDma::Io);
    let buf = viewable(&ctrl, 1);
    qp.submit(read_cmd(1, 0, 1), &[buf.segment()], 1).unwrap();
    qp.ring();
    // Disabling fails, a function level reset stops the controller.
    model.set_stuck_enabled(true);
    let done = wait(&mut qp, 1);
    assert_eq!(done[0].status, NvmeStatus::ABORTED_BY_RESET);
    assert_eq!(model.parked(), 0);
    assert!(!buf.is_quarantined());
    assert!(
        buf.view(0, 4096).is_ok(),
        "the device can no longer write it"
    );
}

#[test]
fn a_queue_pair_dropped_with_a_read_outstanding_keeps_its_pages_unviewable() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.set_late_dma(LateDma::Io);
    let buf = viewable(&ctrl, 1);
    qp.submit(read_cmd(1, 0, 1), &[buf.segment()], 1).unwrap();
    qp.ring();
    drop(qp);
    assert!(buf.is_quarantined());
    assert!(buf.view(0, 4096).is_err());
    model.fire_late_dma(0xaa, false);
    assert!(buf.view(0, 4096).is_err());
}

#[test]
fn plain_buffers_refuse_views() {
    let (_model, ctrl) = open();
    let buf = ctrl.alloc(4096).unwrap();
    assert!(matches!(buf.view(0, 4096), Err(DmaError::NotViewable)));
    assert!(matches!(
        buf.lease(0, 4096).view(),
        Err(DmaError::NotViewable)
    ));
    assert!(!buf.is_viewed(0, 4096));
}

#[test]
fn dropping_the_views_lets_reads_in_again() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.write_ns(1, 1, &[1; 4096]);
    let buf = viewable(&ctrl, 1);
    let v1 = buf.view(0, 4096).unwrap();
    let v2 = buf.lease(0, 4096).view().unwrap();
    drop(v1);
    assert!(buf.is_viewed(0, 4096), "one view is left");
    assert!(qp.read(1, 1, 1, &buf).is_err());
    drop(v2);
    assert!(!buf.is_viewed(0, 4096));
    qp.read(1, 1, 1, &buf).unwrap();
    assert_eq!(buf.to_vec(), vec![1; 4096]);
}

#[test]
fn views_are_read_on_other_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DmaView>();
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let data: Vec<u8> = (0..8192).map(|i| (i * 7 % 251) as u8).collect();
    model.write_ns(1, 40, &data);
    let buf = viewable(&ctrl, 2);
    qp.read(1, 40, 2, &buf).unwrap();
    let first = buf.view(0, 4096).unwrap();
    let lease = buf.lease(4096, 4096);
    std::thread::scope(|s| {
        let t1 = s.spawn(move || first[..].to_vec());
        let t2 = s.spawn(|| lease.view().unwrap().to_vec());
        assert_eq!(t1.join().unwrap(), data[..4096]);
        assert_eq!(t2.join().unwrap(), data[4096..]);
    });
    assert!(!buf.is_viewed(0, 8192), "the threads' views were dropped");
    // A view moved to a thread that outlives the buffer's owner here.
    let v = buf.view(100, 50).unwrap();
    drop(buf);
    let got = std::thread::spawn(move || v.to_vec()).join().unwrap();
    assert_eq!(got, data[100..150]);
}

#[test]
fn metadata_the_device_writes_is_claimed_too() {
    let (_model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let data = ctrl.alloc(4096).unwrap();
    let meta = viewable(&ctrl, 1);
    let v = meta.view(0, 8).unwrap();
    // The model has no metadata; only the queue pair's refusal is looked at.
    let qp: &mut QueuePair = &mut qp;
    let e = qp
        .submit_with_metadata(
            read_cmd(1, 0, 1),
            &[data.segment()],
            meta.segment_at(0, 64),
            1,
        )
        .unwrap_err();
    assert!(matches!(e, Error::BufferViewed { len: 64, .. }), "{e}");
    assert_eq!(qp.outstanding(), 0);
    drop(v);
    qp.submit_with_metadata(
        read_cmd(1, 0, 1),
        &[data.segment()],
        meta.segment_at(0, 64),
        2,
    )
    .unwrap();
    assert!(meta.view(0, 8).is_err(), "the read may write the metadata");
}

#[test]
fn admin_commands_that_return_data_respect_views() {
    let (_model, ctrl) = open();
    let buf = viewable(&ctrl, 1);
    let mut c = SqEntry::new(admin_op::IDENTIFY, 0);
    c.cdw10 = cns::CONTROLLER;
    let v = buf.view(0, 4096).unwrap();
    let e = ctrl
        .admin(c, Some(&buf), "Identify Controller")
        .unwrap_err();
    assert!(matches!(e, Error::BufferViewed { .. }), "{e}");
    drop(v);
    ctrl.admin(c, Some(&buf), "Identify Controller").unwrap();
    let v = buf.view(0, 4096).unwrap();
    let serial = &v[4..24];
    assert_eq!(
        String::from_utf8_lossy(serial).trim_end(),
        ctrl.info().serial
    );
    // The admin queue still works.
    assert_eq!(
        ctrl.identify_controller().unwrap().serial,
        ctrl.info().serial
    );
}

#[test]
fn a_command_cannot_point_the_device_at_memory_by_hand() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.write_ns(1, 2, &[0xee; 4096]);
    let buf = viewable(&ctrl, 1);
    let v = buf.view(0, 4096).unwrap();
    // A read with the viewed page's address written into its data pointer, and no data.
    let mut c = read_cmd(1, 2, 1);
    c.dptr1 = buf.iova().0;
    c.mptr = buf.iova().0;
    let raw: &mut QueuePair = &mut qp;
    raw.submit(c, &[], 1).unwrap();
    let done = wait(&mut qp, 1);
    assert!(
        !done[0].status.is_success(),
        "the pointers were cleared: the read had nowhere to go"
    );
    assert_eq!(&v[..], &[0; 4096][..], "the device did not write the view");
}

#[test]
fn admin_commands_that_keep_memory_are_refused() {
    let (_model, ctrl) = open();
    let buf = viewable(&ctrl, 1);
    let mut create_cq = SqEntry::new(admin_op::CREATE_IO_CQ, 0);
    create_cq.cdw10 = 7 | (15 << 16);
    create_cq.cdw11 = 1;
    let mut hmb = SqEntry::new(admin_op::SET_FEATURES, 0);
    hmb.cdw10 = 0x0d;
    hmb.cdw11 = 1;
    for (c, what) in [
        (create_cq, "Create I/O Completion Queue"),
        (
            SqEntry::new(admin_op::CREATE_IO_SQ, 0),
            "Create I/O Submission Queue",
        ),
        (
            SqEntry::new(admin_op::DOORBELL_BUFFER_CONFIG, 0),
            "Doorbell Buffer Config",
        ),
        (hmb, "Set Features (Host Memory Buffer)"),
    ] {
        let e = ctrl.admin(c, Some(&buf), what).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(
            e.to_string().contains("goes on using") && e.to_string().contains(what),
            "{e}"
        );
    }
    // Other features are set as before.
    let mut vwc = SqEntry::new(admin_op::SET_FEATURES, 0);
    vwc.cdw10 = 0x06;
    vwc.cdw11 = 1;
    ctrl.admin(vwc, None, "Set Features (Volatile Write Cache)")
        .unwrap();
    // And the driver still creates its queues.
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.read(1, 0, 1, &buf).unwrap();
}
