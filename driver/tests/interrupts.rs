//! Queue pairs that wait on MSI-X interrupts, against the controller model, which signals a
//! vector's eventfd for every completion it posts to a queue created with interrupts enabled.

use std::sync::Arc;
use std::time::Duration;

use rnvme_driver::controller::{Coalescing, Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::io::{read_cmd, IoQueuePair};
use rnvme_driver::irq::WaitMode;
use rnvme_driver::model::{bring_up, CompletionMode, Model, ModelConfig};
use rnvme_driver::queue::Completion;
use rnvme_driver::Error;

fn open(config: ModelConfig, options: ControllerOptions) -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(
        config,
        ControllerOptions {
            backing: Backing::SmallPages,
            ..options
        },
    )
    .expect("bring-up against the model");
    (model, ctrl)
}

fn model() -> (Arc<Model>, Controller) {
    open(ModelConfig::default(), ControllerOptions::default())
}

/// A model that holds completions until released, and an interrupt queue pair of 8 entries.
fn held_completions_interrupt_queue() -> (Arc<Model>, Controller, IoQueuePair) {
    let (model, ctrl) = model();
    model.set_completion_mode(CompletionMode::Deferred);
    let qp = ctrl.create_io_qpair_with(8, WaitMode::Interrupt).unwrap();
    (model, ctrl, qp)
}

const HYBRID: WaitMode = WaitMode::Hybrid {
    spin: Duration::from_micros(20),
};

#[test]
fn every_mode_moves_data_with_completions_from_another_thread() {
    let (model, ctrl) = model();
    model.complete_from_thread(Duration::from_micros(50));
    let data: Vec<u8> = (0..256u32 << 10).map(|i| (i * 7 + 3) as u8).collect();
    for (i, mode) in [WaitMode::Polled, WaitMode::Interrupt, HYBRID]
        .into_iter()
        .enumerate()
    {
        let before = model.stats().interrupts;
        let mut qp = ctrl.create_io_qpair_with(16, mode).unwrap();
        assert_eq!(qp.wait_mode(), mode);
        assert_eq!(qp.interrupt().is_some(), mode.needs_interrupts());
        if let Some(irq) = qp.interrupt() {
            assert_eq!(
                irq.vector(),
                qp.qid(),
                "each queue has the vector of its id"
            );
        }
        let buf = ctrl.alloc(data.len()).unwrap();
        buf.write_bytes(0, &data);
        let lba = 64 * i as u64;
        qp.write(1, lba, 64, &buf, false).unwrap();
        let back = ctrl.alloc(data.len()).unwrap();
        qp.read(1, lba, 64, &back).unwrap();
        assert_eq!(back.to_vec(), data, "{mode:?}");
        assert_eq!(model.read_ns(1, lba, 64), data);
        let raised = model.stats().interrupts - before;
        if mode == WaitMode::Interrupt {
            // 128 KiB per command: two writes and two reads, each signalled.
            assert_eq!(raised, 4, "{mode:?}");
        } else if mode == HYBRID {
            // Signalled, or held pending while the vector was masked for polling.
            assert!(raised <= 4, "{mode:?}: {raised}");
        } else {
            assert_eq!(raised, 0, "a polled queue is created without interrupts");
        }
        let st = qp.stats();
        if mode == WaitMode::Interrupt {
            assert!(st.sleeps > 0, "interrupt mode sleeps: {st:?}");
            assert!(st.wakeups > 0, "and interrupts wake it: {st:?}");
        }
        if mode == WaitMode::Polled {
            assert_eq!(st.sleeps, 0);
        }
    }
}

#[test]
fn a_completion_between_the_last_poll_and_the_sleep_wakes_the_sleeper() {
    let (model, ctrl, mut qp) = held_completions_interrupt_queue();
    let buf = ctrl.alloc(4096).unwrap();
    qp.submit(read_cmd(1, 5, 1), &[buf.segment()], 77).unwrap();
    qp.ring();
    // The controller posts the completion exactly after the queue pair's last empty poll and
    // before it sleeps. Consuming the eventfd's signal after that poll (instead of before)
    // would lose this wake-up: the sleep would run out its time instead.
    let m = model.clone();
    qp.set_before_sleep(Some(Box::new(move || {
        m.release(1);
    })));
    let mut got: Vec<Completion> = Vec::new();
    let n = qp.wait(usize::MAX, Duration::from_secs(30), |c| got.push(c));
    assert_eq!(n, 1);
    assert_eq!(got[0].tag, 77);
    assert!(got[0].status.is_success());
    let st = qp.stats();
    assert_eq!(st.sleeps, 1, "{st:?}");
    assert_eq!(
        st.wakeups, 1,
        "the sleep ended by the interrupt, not a timeout: {st:?}"
    );

    // And a sleep with nothing to come runs out its time and reports nothing.
    qp.set_before_sleep(None);
    let n = qp.wait(usize::MAX, Duration::from_millis(30), |_| unreachable!());
    assert_eq!(n, 0);
    let st = qp.stats();
    assert!(st.sleeps >= 2);
    assert_eq!(st.wakeups, 1);
}

#[test]
fn hybrid_mode_polls_up_the_spin_budget_before_it_sleeps() {
    let (model, ctrl) = model();
    model.set_completion_mode(CompletionMode::Deferred);
    let mut qp = ctrl
        .create_io_qpair_with(
            8,
            WaitMode::Hybrid {
                spin: Duration::from_millis(5),
            },
        )
        .unwrap();
    let buf = ctrl.alloc(4096).unwrap();
    qp.submit(read_cmd(1, 5, 1), &[buf.segment()], 1).unwrap();
    qp.ring();
    let m = model.clone();
    qp.set_before_sleep(Some(Box::new(move || {
        m.release(1);
    })));
    let polls = qp.stats().polls;
    let n = qp.wait(usize::MAX, Duration::from_secs(30), |_| {});
    assert_eq!(n, 1);
    let st = qp.stats();
    assert!(st.polls - polls > 64, "it spun before sleeping: {st:?}");
    assert_eq!((st.sleeps, st.wakeups), (1, 1), "{st:?}");
}

#[test]
fn modes_switch_only_where_the_queue_has_a_vector() {
    let (_model, ctrl) = model();
    let mut polled = ctrl.create_io_qpair(8).unwrap();
    let e = polled.set_wait_mode(WaitMode::Interrupt).unwrap_err();
    assert!(e.to_string().contains("created polled"), "{e}");
    let mut irq = ctrl.create_io_qpair_with(8, WaitMode::Interrupt).unwrap();
    irq.set_wait_mode(WaitMode::Polled).unwrap();
    irq.set_wait_mode(HYBRID).unwrap();
    assert_eq!(irq.wait_mode(), HYBRID);
}

#[test]
fn a_device_without_enough_vectors_refuses_interrupt_queues_clearly() {
    let (_model, ctrl) = open(
        ModelConfig {
            msix_vectors: 0,
            ..ModelConfig::default()
        },
        ControllerOptions::default(),
    );
    let e = ctrl
        .create_io_qpair_with(8, WaitMode::Interrupt)
        .err()
        .expect("no vectors");
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("MSI-X"), "{e}");
    // The queue id was given back: a polled queue pair still works.
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    assert_eq!(qp.qid(), 1);
    qp.flush(1).unwrap();

    // Two vectors: the admin queue's and queue 1's.
    let (_model, ctrl) = open(
        ModelConfig {
            msix_vectors: 2,
            ..ModelConfig::default()
        },
        ControllerOptions::default(),
    );
    let mut first = ctrl.create_io_qpair_with(8, WaitMode::Interrupt).unwrap();
    first.flush(1).unwrap();
    let e = ctrl
        .create_io_qpair_with(8, WaitMode::Interrupt)
        .err()
        .expect("no vector left");
    assert!(
        e.to_string().contains("no interrupt vector of its own"),
        "{e}"
    );
}

#[test]
fn coalescing_is_set_with_the_first_interrupt_queue_and_after_a_reset() {
    let c = Coalescing {
        threshold: 7,
        time_100us: 2,
    };
    let (_model, ctrl) = open(
        ModelConfig::default(),
        ControllerOptions {
            interrupt_coalescing: Some(c),
            ..ControllerOptions::default()
        },
    );
    let feature = rnvme_driver::spec::feature::INTERRUPT_COALESCING;
    assert_eq!(ctrl.get_features(feature, 0).unwrap(), 0, "not before");
    let mut qp = ctrl.create_io_qpair_with(8, WaitMode::Interrupt).unwrap();
    assert_eq!(ctrl.get_features(feature, 0).unwrap(), 0x0207);
    ctrl.reset().unwrap();
    assert_eq!(ctrl.get_features(feature, 0).unwrap(), 0x0207, "set again");
    // The queue pair is recreated with its vector after the reset and still sleeps on it.
    qp.flush(1).unwrap();
    assert_eq!(qp.stats().resets, 1);
    let buf = ctrl.alloc(4096).unwrap();
    qp.read(1, 0, 1, &buf).unwrap();
}

#[test]
fn hybrid_with_nothing_outstanding_sleeps_at_once() {
    let (_model, ctrl) = model();
    let mut qp = ctrl
        .create_io_qpair_with(
            8,
            WaitMode::Hybrid {
                spin: Duration::from_millis(50),
            },
        )
        .unwrap();
    let before = qp.stats();
    let n = qp.wait(usize::MAX, Duration::from_millis(20), |_| unreachable!());
    assert_eq!(n, 0);
    let st = qp.stats();
    // No spinning through the 50 ms budget: a poll, then the sleep (and a poll after it).
    assert!(st.polls - before.polls < 8, "{st:?}");
    assert!(st.sleeps > before.sleeps, "{st:?}");
}

#[test]
fn hybrid_masks_its_vector_while_polling_pays_off_and_unmasks_it_to_sleep() {
    let (model, ctrl) = model();
    // Completions come 200 µs after their command, well inside a 20 ms spin budget.
    model.complete_from_thread(Duration::from_micros(200));
    let mut qp = ctrl
        .create_io_qpair_with(
            8,
            WaitMode::Hybrid {
                spin: Duration::from_millis(20),
            },
        )
        .unwrap();
    let irq = qp.interrupt().unwrap().clone();
    let buf = ctrl.alloc(4096).unwrap();
    let before = model.stats();
    for i in 0..40 {
        qp.read(1, i, 1, &buf).unwrap();
    }
    let st = qp.stats();
    // Masked when polling first found a completion, and left so; only a sleep unmasks it
    // (none is expected with 200 µs completions and a 1 ms spin, but a loaded host may
    // stall the completing thread that long).
    assert!(st.interrupt_masks >= 1, "{st:?}");
    assert!(st.interrupt_masks <= 1 + 2 * st.sleeps, "{st:?}");
    assert_eq!(irq.is_masked(), st.interrupt_masks % 2 == 1, "{st:?}");
    // Interrupts: the first completion's (before the first masking), and per sleep at most
    // three — one held while masked and sent at the unmasking, the one that wakes the
    // sleeper, and the next command's, which may complete before the spin masks again.
    let raised = model.stats().interrupts - before.interrupts;
    assert!(
        raised <= 1 + 3 * st.sleeps,
        "only completions before the masking or around sleeps interrupt: {raised}, {st:?}"
    );
    let masks = st.interrupt_masks;

    // Sleeping unmasks first: interrupts wake the sleeper again.
    qp.set_wait_mode(WaitMode::Interrupt).unwrap();
    for i in 0..5 {
        qp.read(1, i, 1, &buf).unwrap();
    }
    let st = qp.stats();
    assert!(!irq.is_masked());
    assert_eq!(st.interrupt_masks, masks + masks % 2, "{st:?}");
    assert!(st.sleeps >= 5 && st.wakeups >= 5, "{st:?}");
    assert!(model.stats().interrupts - before.interrupts >= 5);

    // And hybrid masks it again as soon as polling pays off.
    qp.set_wait_mode(WaitMode::Hybrid {
        spin: Duration::from_millis(20),
    })
    .unwrap();
    for i in 0..5 {
        qp.read(1, i, 1, &buf).unwrap();
    }
    let st = qp.stats();
    assert!(
        st.interrupt_masks > masks + masks % 2,
        "masked again: {st:?}"
    );
}

#[test]
fn an_interrupt_held_while_masked_is_sent_at_the_unmasking() {
    let (model, ctrl, mut qp) = held_completions_interrupt_queue();
    let irq = qp.interrupt().unwrap().clone();
    assert!(irq.mask(), "the model masks vectors");
    let buf = ctrl.alloc(4096).unwrap();
    qp.submit(read_cmd(1, 5, 1), &[buf.segment()], 9).unwrap();
    qp.ring();
    let sent = model.stats().interrupts;
    model.release(1);
    assert_eq!(model.stats().interrupts, sent, "held: the vector is masked");
    assert!(!irq.arm(), "nothing signalled while masked");
    // The queue pair sleeps: it unmasks, the held interrupt is sent, and the arm and poll
    // that follow find the completion (a sleep would not end otherwise until its time ran
    // out, which the wake-up count tells apart).
    irq.unmask();
    assert_eq!(model.stats().interrupts, sent + 1, "sent at the unmasking");
    assert!(
        irq.sleep(Duration::from_secs(10)),
        "the eventfd is signalled"
    );
    let mut got = Vec::new();
    assert_eq!(
        qp.wait(usize::MAX, Duration::from_secs(10), |c| got.push(c.tag)),
        1
    );
    assert_eq!(got, vec![9]);
    // Masking twice or unmasking an unmasked vector does nothing.
    irq.unmask();
    assert!(irq.mask());
    assert!(irq.mask());
    assert_eq!(irq.masks(), 3);
}

#[test]
fn an_event_loop_of_its_own_sleeps_on_the_vector_without_losing_a_completion() {
    let (model, ctrl, mut qp) = held_completions_interrupt_queue();
    let irq = qp.interrupt().unwrap().clone();
    // A masked vector (as a busy loop leaves it) is unmasked by the preparation.
    assert!(irq.mask());
    let buf = ctrl.alloc(4096).unwrap();
    qp.submit(read_cmd(1, 5, 1), &[buf.segment()], 41).unwrap();
    qp.ring();
    let mut got = Vec::new();
    assert_eq!(qp.prepare_sleep(8, |c| got.push(c.tag)), 0, "nothing yet");
    assert!(!irq.is_masked(), "unmasked before the sleep");
    // The completion lands after the preparation's poll: the eventfd says so, and the poll
    // after the wake-up finds it.
    model.release(1);
    assert!(irq.sleep(Duration::from_secs(10)), "signalled");
    qp.woke(true);
    assert_eq!(qp.poll(8, |c| got.push(c.tag)), 1);
    assert_eq!(got, vec![41]);
    let st = qp.stats();
    assert_eq!((st.sleeps, st.wakeups), (1, 1), "{st:?}");

    // A completion that landed before the preparation is found by its poll: no sleep.
    qp.submit(read_cmd(1, 6, 1), &[buf.segment()], 42).unwrap();
    qp.ring();
    model.release(1);
    assert_eq!(qp.prepare_sleep(8, |c| got.push(c.tag)), 1);
    assert_eq!(got, vec![41, 42]);
    // Its interrupt was consumed by the preparation's arm, which came before the poll: a
    // signal left over now would only cost one spurious wake-up, never a lost one.
    qp.woke(false);
    assert_eq!(qp.stats().wakeups, 1, "a quiet sleep is not a wake-up");

    // A polled queue pair has no vector: the preparation only polls.
    let mut polled = ctrl.create_io_qpair(8).unwrap();
    assert!(polled.interrupt().is_none());
    polled
        .submit(read_cmd(1, 7, 1), &[buf.segment()], 43)
        .unwrap();
    polled.ring();
    model.release(1);
    assert_eq!(polled.prepare_sleep(8, |c| got.push(c.tag)), 1);
    assert_eq!(got, vec![41, 42, 43]);
}
