//! Faults the driver survives, against the controller model: lost commands (abort, then
//! reset), a fatal controller status, surprise removal, retryable errors, and a model that
//! misbehaves at random. The caller always gets exactly one completion per command.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rnvme_driver::controller::Controller;
use rnvme_driver::dma::DmaBuffer;
use rnvme_driver::io::{read_cmd, write_cmd, IoQueuePair};
use rnvme_driver::model::{bring_up, model_options, CompletionMode, Model, ModelConfig};
use rnvme_driver::queue::Completion;
use rnvme_driver::{Error, NvmeStatus};

fn open() -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(ModelConfig::default(), model_options()).unwrap();
    (model, ctrl)
}

/// Poll until `n` completions arrived; fails the test after 20 s instead of hanging.
fn wait(qp: &mut IoQueuePair, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n {
        qp.poll(64, |c| got.push(c));
        assert!(
            Instant::now() < deadline,
            "no completion: the driver hung ({} of {n})",
            got.len()
        );
    }
    got
}

fn read_one(qp: &mut IoQueuePair, buf: &DmaBuffer, lba: u64, tag: u64) {
    qp.submit(read_cmd(1, lba, 1), &[buf.segment()], tag)
        .unwrap();
}

#[test]
fn lost_command_is_aborted_after_its_deadline() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    qp.set_command_timeout(Duration::from_millis(50));
    let buf = ctrl.alloc(4096).unwrap();
    model.drop_next_completions(1);
    read_one(&mut qp, &buf, 3, 7);
    let c = wait(&mut qp, 1);
    assert_eq!((c[0].tag, c[0].status), (7, NvmeStatus::ABORT_REQUESTED));
    let s = qp.stats();
    assert_eq!((s.timeouts, s.aborts, s.resets), (1, 1, 0));
    assert_eq!(model.stats().aborts, 1);
    // The queue pair goes on working.
    model.write_ns(1, 4, &[5; 4096]);
    qp.read(1, 4, 1, &buf).unwrap();
    assert_eq!(buf.to_vec(), vec![5; 4096]);
}

#[test]
fn abort_that_does_not_help_leads_to_a_reset_and_the_queue_is_recreated() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    let mut other = ctrl.create_io_qpair(16).unwrap();
    qp.set_command_timeout(Duration::from_millis(50));
    other.set_command_timeout(Duration::from_millis(50));
    let buf = ctrl.alloc(4096).unwrap();
    model.set_abort_ineffective(true);
    model.drop_next_completions(1);
    read_one(&mut qp, &buf, 3, 11);
    let c = wait(&mut qp, 1);
    assert_eq!((c[0].tag, c[0].status), (11, NvmeStatus::ABORTED_BY_RESET));
    assert!(
        c[0].status.is_retryable(),
        "cancelled by a reset: the caller may retry"
    );
    assert_eq!(qp.stats().resets, 1);
    assert_eq!(
        model.enables(),
        2,
        "the controller was disabled and enabled again"
    );
    assert_eq!(ctrl.resets(), 1);
    model.set_abort_ineffective(false);
    model.write_ns(1, 9, &[9; 4096]);
    qp.read(1, 9, 1, &buf).unwrap();
    assert_eq!(buf.to_vec(), vec![9; 4096]);
    // The other queue pair lost its queues too. It was idle: it learns of the reset when it
    // next submits, and creates its queues again before ringing (a deleted queue's doorbell
    // would lose the command).
    read_one(&mut other, &buf, 9, 12);
    let c = wait(&mut other, 1);
    assert_eq!((c[0].tag, c[0].status), (12, NvmeStatus::SUCCESS));
    assert_eq!(buf.to_vec(), vec![9; 4096]);
    other.read(1, 9, 1, &buf).unwrap();
    assert_eq!(other.stats().resets, 1);
}

#[test]
fn fatal_status_while_polling_resets_the_controller() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    qp.set_command_timeout(Duration::from_millis(200));
    let buf = ctrl.alloc(4096).unwrap();
    model.set_completion_mode(CompletionMode::Deferred);
    read_one(&mut qp, &buf, 1, 1);
    model.set_fatal();
    let c = wait(&mut qp, 1);
    assert_eq!(c[0].status, NvmeStatus::ABORTED_BY_RESET);
    assert_eq!(model.enables(), 2);
    assert_eq!(model.csts() & 2, 0, "CSTS.CFS cleared by the reset");
    model.set_completion_mode(CompletionMode::Instant);
    qp.read(1, 1, 1, &buf).unwrap();
}

#[test]
fn surprise_removal_fails_everything_without_hanging() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    qp.set_command_timeout(Duration::from_millis(100));
    let bufs: Vec<_> = (0..4).map(|_| ctrl.alloc(4096).unwrap()).collect();
    model.set_completion_mode(CompletionMode::Deferred);
    for (i, b) in bufs.iter().enumerate() {
        read_one(&mut qp, b, i as u64, i as u64);
    }
    model.surprise_remove();
    let c = wait(&mut qp, 4);
    let mut tags: Vec<u64> = c.iter().map(|c| c.tag).collect();
    tags.sort();
    assert_eq!(tags, vec![0, 1, 2, 3]);
    assert!(c
        .iter()
        .all(|c| c.status == NvmeStatus::DEVICE_REMOVED && c.status.dnr));
    assert!(qp.is_removed());
    let err = qp
        .submit(read_cmd(1, 0, 1), &[bufs[0].segment()], 9)
        .unwrap_err();
    assert!(matches!(err, Error::DeviceRemoved { .. }), "{err}");
    assert!(err.to_string().contains("device removed"));
    let err = qp.read(1, 0, 1, &bufs[0]).unwrap_err();
    assert!(matches!(err, Error::DeviceRemoved { .. }), "{err}");
    // Tearing down a removed device neither hangs nor panics.
    let t = Instant::now();
    drop(qp);
    drop(ctrl);
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn retryable_errors_are_retried_a_bounded_number_of_times() {
    let (model, ctrl) = open();
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    let buf = ctrl.alloc(4096).unwrap();
    model.write_ns(1, 20, &[0x5a; 4096]);
    // Two transient failures: the third attempt succeeds, the caller sees success.
    model.fail_lba(1, 20, NvmeStatus::UNRECOVERED_READ_ERROR, Some(2));
    qp.read(1, 20, 1, &buf).unwrap();
    assert_eq!(buf.to_vec(), vec![0x5a; 4096]);
    assert_eq!(qp.stats().retries, 2);
    // A persistent error is handed back after the retries ran out: 1 + 3 attempts.
    let before = model.stats().reads;
    model.fail_lba(1, 21, NvmeStatus::UNRECOVERED_READ_ERROR, None);
    let err = qp.read(1, 21, 1, &buf).unwrap_err();
    assert_eq!(err.status(), Some(NvmeStatus::UNRECOVERED_READ_ERROR));
    assert_eq!(model.stats().reads - before, 4);
    // Do Not Retry means exactly that.
    let before = model.stats().reads;
    model.fail_lba(
        1,
        22,
        NvmeStatus::UNRECOVERED_READ_ERROR.with_dnr(true),
        None,
    );
    assert!(qp.read(1, 22, 1, &buf).is_err());
    assert_eq!(model.stats().reads - before, 1);
    // With retries off, the first error is handed back.
    qp.set_retry_limit(0);
    model.fail_lba(1, 23, NvmeStatus::UNRECOVERED_READ_ERROR, Some(1));
    assert!(qp.read(1, 23, 1, &buf).is_err());
}

#[test]
fn random_misbehaviour_never_hangs_panics_or_completes_twice() {
    for seed in 1..=6u64 {
        let (model, ctrl) = open();
        let mut qp = ctrl.create_io_qpair(32).unwrap();
        qp.set_command_timeout(Duration::from_millis(30));
        let bufs: Vec<_> = (0..16).map(|_| ctrl.alloc(4096).unwrap()).collect();
        model.set_random_misbehaviour(seed, 15);
        let mut completions: HashMap<u64, u32> = HashMap::new();
        let total = 400u64;
        let mut next = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while completions.len() < total as usize {
            while next < total && qp.free_slots() > 0 {
                let b = &bufs[(next % 16) as usize];
                let cmd = if next.is_multiple_of(3) {
                    write_cmd(1, next % 512, 1, false)
                } else {
                    read_cmd(1, next % 512, 1)
                };
                match qp.submit(cmd, &[b.segment()], next) {
                    Ok(_) => next += 1,
                    Err(Error::QueueFull) => break,
                    Err(e) => panic!("seed {seed}: {e}"),
                }
            }
            qp.poll(64, |c| *completions.entry(c.tag).or_default() += 1);
            assert!(
                Instant::now() < deadline,
                "seed {seed}: hung with {} of {total} completed",
                completions.len()
            );
        }
        assert!(
            completions.values().all(|&n| n == 1),
            "seed {seed}: a command completed twice"
        );
        assert_eq!(qp.outstanding(), 0);
        let s = qp.stats();
        assert!(
            s.timeouts + s.retries + s.spurious > 0,
            "seed {seed}: the model did misbehave: {s:?}"
        );
    }
}
