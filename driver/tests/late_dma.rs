//! The DMA ownership rule, against a controller model that runs commands late: memory lent to
//! a command goes back only when its completion was reaped or the controller was stopped
//! (CSTS.RDY = 0, a function level reset); otherwise it is quarantined and never handed out
//! again.
//!
//! Each test parks commands in the model (their data pointers walked when fetched, as a
//! controller does, but no data moved), makes the driver give up on them along one path,
//! fills the pool's memory with fresh zeroed buffers (the "canaries": whatever the pool would
//! hand out again), and then lets the model DMA into the parked commands. A canary that
//! changed is memory the driver handed out while the device could still write it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::DmaBuffer;
use rnvme_driver::io::{read_cmd, IoQueuePair};
use rnvme_driver::model::{bring_up, model_options, LateDma, Model, ModelConfig};
use rnvme_driver::queue::Completion;
use rnvme_driver::reactor::{IoData, IoRequest, Reactor, ReactorConfig, ReactorError};
use rnvme_driver::NvmeStatus;

fn open_with(admin_timeout: Duration) -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(
        ModelConfig::default(),
        ControllerOptions {
            admin_timeout,
            ..model_options()
        },
    )
    .unwrap();
    (model, ctrl)
}

fn open() -> (Arc<Model>, Controller) {
    open_with(Duration::from_secs(10))
}

/// Zeroed 4 KiB buffers covering whatever the pool would hand out next (more than a whole
/// 2 MiB chunk).
fn canaries(ctrl: &Controller) -> Vec<DmaBuffer> {
    (0..600).map(|_| ctrl.alloc(4096).unwrap()).collect()
}

/// How many canaries the device wrote into.
fn hit(canaries: &[DmaBuffer]) -> usize {
    canaries
        .iter()
        .filter(|b| b.to_vec().iter().any(|&x| x != 0))
        .count()
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

/// Park `n` reads of one block each into fresh buffers.
fn park_reads(model: &Model, ctrl: &Controller, qp: &mut IoQueuePair, n: u64) -> Vec<DmaBuffer> {
    model.set_late_dma(LateDma::Io);
    let bufs: Vec<DmaBuffer> = (0..n).map(|_| ctrl.alloc(4096).unwrap()).collect();
    for (i, b) in bufs.iter().enumerate() {
        qp.submit(read_cmd(1, i as u64, 1), &[b.segment()], i as u64)
            .unwrap();
    }
    qp.ring();
    assert_eq!(model.parked(), n as usize);
    bufs
}

#[test]
fn a_buffer_dropped_while_its_command_runs_is_freed_only_when_the_completion_is_reaped() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let bufs = park_reads(&model, &ctrl, &mut qp, 4);
    let in_use = ctrl.pool().stats().pages_in_use;
    drop(bufs);
    assert_eq!(
        ctrl.pool().stats().pages_in_use,
        in_use,
        "the commands still hold the pages"
    );
    let c = canaries(&ctrl);
    let late = model.fire_late_dma(0xaa, true);
    assert_eq!((late.commands, late.faults), (4, 0));
    assert_eq!(hit(&c), 0, "late DMA landed in memory handed out again");
    drop(c);
    let done = wait(&mut qp, 4);
    assert!(done.iter().all(|c| c.status.is_success()));
    assert_eq!(
        ctrl.pool().stats().pages_in_use,
        in_use - 4,
        "reaping the completions gave the pages back"
    );
    assert_eq!(ctrl.pool().stats().quarantined_buffers, 0);
}

#[test]
fn a_failed_reset_quarantines_what_its_commands_used() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_command_timeout(Duration::from_millis(50));
    let bufs = park_reads(&model, &ctrl, &mut qp, 4);
    // The controller cannot be disabled, and a function level reset fails too.
    model.set_stuck_enabled(true);
    model.set_flr_fails(true);
    let done = wait(&mut qp, 4);
    assert!(done
        .iter()
        .all(|c| c.status == NvmeStatus::ABORTED_BY_RESET));
    assert_eq!(qp.stats().quarantined, 4);
    assert!(bufs.iter().all(DmaBuffer::is_quarantined));
    // A quarantined buffer cannot be lent again.
    let e = qp
        .submit(read_cmd(1, 0, 1), &[bufs[0].segment()], 9)
        .unwrap_err();
    assert!(e.to_string().contains("quarantined"), "{e}");
    drop(bufs);
    let c = canaries(&ctrl);
    let late = model.fire_late_dma(0xaa, false);
    assert_eq!((late.commands, late.faults), (4, 0));
    assert!(late.bytes >= 4 * 4096, "{late:?}");
    assert_eq!(
        hit(&c),
        0,
        "late DMA after a failed reset landed in reused memory"
    );
    let st = ctrl.pool().stats();
    assert!(st.quarantined_buffers >= 4, "{st:?}");
}

#[test]
fn a_function_level_reset_stops_the_controller_when_disabling_does_not() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_command_timeout(Duration::from_millis(50));
    let bufs = park_reads(&model, &ctrl, &mut qp, 3);
    model.set_stuck_enabled(true);
    let done = wait(&mut qp, 3);
    assert!(done
        .iter()
        .all(|c| c.status == NvmeStatus::ABORTED_BY_RESET));
    assert_eq!(model.flrs(), 1);
    assert_eq!(model.parked(), 0, "the reset function forgot its commands");
    assert_eq!(qp.stats().quarantined, 0);
    assert!(!bufs.iter().any(DmaBuffer::is_quarantined));
    // The controller works again, with the same buffers.
    model.set_late_dma(LateDma::Off);
    model.write_ns(1, 7, &[0x77; 4096]);
    qp.read(1, 7, 1, &bufs[0]).unwrap();
    assert_eq!(bufs[0].to_vec(), vec![0x77; 4096]);
    assert_eq!(ctrl.pool().stats().quarantined_buffers, 0);
}

#[test]
fn an_admin_command_that_times_out_keeps_its_buffer_until_it_completes() {
    let (model, ctrl) = open_with(Duration::from_millis(100));
    model.set_late_dma(LateDma::Admin);
    let e = ctrl.identify_controller().unwrap_err();
    assert!(e.to_string().contains("did not complete"), "{e}");
    let c = canaries(&ctrl);
    let late = model.fire_late_dma(0xaa, true);
    assert_eq!((late.commands, late.faults), (1, 0));
    assert_eq!(
        hit(&c),
        0,
        "a timed-out Identify's late data landed in reused memory"
    );
    // The next admin command reaps the late completion, and the admin queue goes on.
    model.set_late_dma(LateDma::Off);
    assert_eq!(
        ctrl.identify_controller().unwrap().serial,
        ctrl.info().serial
    );
}

#[test]
fn a_synchronous_helper_never_returns_while_its_commands_may_use_the_buffer() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_timeout(Duration::from_millis(50));
    model.set_late_dma(LateDma::Io);
    model.set_stuck_enabled(true);
    model.set_flr_fails(true);
    let buf = ctrl.alloc(64 << 10).unwrap();
    let e = qp.read(1, 0, 16, &buf).unwrap_err();
    assert!(e.to_string().contains("Aborted"), "{e}");
    assert_eq!(
        model.parked(),
        1,
        "the helper's read was still in the device"
    );
    assert!(buf.is_quarantined(), "its buffer could still be written");
    drop(buf);
    let c = canaries(&ctrl);
    let late = model.fire_late_dma(0xaa, false);
    assert_eq!(late.faults, 0);
    assert_eq!(hit(&c), 0);
}

#[test]
fn a_synchronous_helper_keeps_other_commands_completions_for_the_owner() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    model.write_ns(1, 3, &[3; 4096]);
    let mine = ctrl.alloc(4096).unwrap();
    qp.submit(read_cmd(1, 3, 1), &[mine.segment()], 77).unwrap();
    let other = ctrl.alloc(4096).unwrap();
    qp.read(1, 3, 1, &other).unwrap();
    let got = wait(&mut qp, 1);
    assert_eq!((got[0].tag, got[0].status), (77, NvmeStatus::SUCCESS));
    assert_eq!(mine.to_vec(), vec![3; 4096]);
}

#[test]
fn a_stopping_reactor_does_not_hand_back_buffers_still_in_the_device() {
    let (model, ctrl) = open();
    let reactor = Reactor::spawn(
        vec![ctrl.create_io_qpair(8).unwrap()],
        ReactorConfig {
            drain_timeout: Duration::from_millis(100),
            ..ReactorConfig::default()
        },
    )
    .unwrap();
    model.set_late_dma(LateDma::Io);
    let h = reactor.handle();
    let pending: Vec<_> = (0..3)
        .map(|i| {
            let buf = ctrl.alloc(4096).unwrap();
            h.call(IoRequest::new(read_cmd(1, i, 1), IoData::buffer(buf), i))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while model.parked() < 3 {
        assert!(Instant::now() < deadline, "the reactor never submitted");
        std::thread::yield_now();
    }
    let exit = reactor.shutdown().unwrap();
    assert_eq!(exit.stats.quarantined, 3);
    for p in pending {
        let d = p.wait();
        assert!(matches!(d.result, Err(ReactorError::Stopped)));
        assert!(d.buf.is_none(), "a buffer the device may write came back");
    }
    // Its queue pair goes away with the commands outstanding.
    drop(exit);
    let c = canaries(&ctrl);
    let late = model.fire_late_dma(0xaa, false);
    assert_eq!((late.commands, late.faults), (3, 0));
    assert_eq!(hit(&c), 0);
    assert!(ctrl.pool().stats().quarantined_buffers >= 3);
}

#[test]
fn a_queue_pair_dropped_with_commands_outstanding_quarantines_them() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let bufs = park_reads(&model, &ctrl, &mut qp, 2);
    drop(bufs);
    drop(qp);
    let c = canaries(&ctrl);
    let late = model.fire_late_dma(0xaa, false);
    assert_eq!((late.commands, late.faults), (2, 0));
    assert_eq!(hit(&c), 0);
    assert!(ctrl.pool().stats().quarantined_buffers >= 2);
}

#[test]
fn a_queue_pair_whose_queues_could_not_be_deleted_quarantines_its_rings() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let bufs = park_reads(&model, &ctrl, &mut qp, 2);
    let rings = (qp.entries() as u64 * 64) + (qp.cq_entries() as u64 * 16);
    // A fatal controller: the queues are not deleted.
    model.set_fatal();
    let before = ctrl.pool().stats().quarantined_bytes;
    drop(qp);
    drop(bufs);
    let st = ctrl.pool().stats();
    assert!(
        st.quarantined_bytes - before >= rings + 2 * 4096,
        "rings and data quarantined: {st:?}"
    );
    let c = canaries(&ctrl);
    // The late completions land in the completion queue's ring: it was not reused either.
    let late = model.fire_late_dma(0xaa, true);
    assert_eq!(late.completions, 2);
    assert_eq!(hit(&c), 0);
}

#[test]
fn a_huge_deadline_is_taken_as_it_is() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.set_timeout(Duration::MAX);
    model.write_ns(1, 2, &[2; 4096]);
    let buf = ctrl.alloc(4096).unwrap();
    qp.read(1, 2, 1, &buf).unwrap();
    assert_eq!(buf.to_vec(), vec![2; 4096]);
}
