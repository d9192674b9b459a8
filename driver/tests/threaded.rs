//! The queue pairs, their synchronous helpers and the reactor against a model that posts
//! completions from a thread of its own ([`Model::complete_from_thread`]): completion entries
//! land while the host polls, so the phase tag read, the acquire fence after it and the
//! doorbells are exercised as a real controller exercises them, on the host.

use std::sync::Arc;
use std::time::Duration;

use rnvme_driver::controller::Controller;
use rnvme_driver::io::{read_cmd, write_cmd};
use rnvme_driver::model::{bring_up, model_options, CompletionMode, Model, ModelConfig};
use rnvme_driver::queue::Completion;
use rnvme_driver::reactor::{IoData, IoRequest, Reactor, ReactorConfig};

const BLOCKS: u64 = 4096;

fn open(shadow: bool) -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(
        ModelConfig {
            shadow_doorbells: shadow,
            mdts: 2,
            ..ModelConfig::one_namespace(4096, BLOCKS)
        },
        model_options(),
    )
    .expect("bring-up against the model");
    model.complete_from_thread(Duration::from_micros(20));
    (model, ctrl)
}

/// What LBA `lba` holds after pass `pass`.
fn stamp(lba: u64, pass: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i.wrapping_mul(31) ^ lba.wrapping_mul(131) ^ pass.wrapping_mul(7)) as u8)
        .collect()
}

/// A scrambled order of the LBAs.
fn order(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

#[test]
fn a_deep_queue_moves_the_right_bytes_while_completions_land_concurrently() {
    for shadow in [false, true] {
        let (model, ctrl) = open(shadow);
        assert_eq!(model.stats().io_commands, 0);
        let mut qp = ctrl.create_io_qpair(33).unwrap();
        let depth = 32usize;
        let bufs: Vec<_> = (0..depth).map(|_| ctrl.alloc(4096).unwrap()).collect();
        let lbas = order(1024);
        for (pass, read) in [(1u64, false), (1, true)] {
            // Slot i carries LBA lbas[k] for k = i, i + depth, ...
            let mut next = 0usize;
            let mut inflight = vec![None::<u64>; depth];
            let mut done = 0usize;
            let submit = |qp: &mut rnvme_driver::io::IoQueuePair,
                          slot: usize,
                          next: &mut usize,
                          inflight: &mut Vec<Option<u64>>| {
                if *next >= lbas.len() {
                    return;
                }
                let lba = lbas[*next];
                *next += 1;
                let cmd = if read {
                    bufs[slot].fill(0);
                    read_cmd(1, lba, 1)
                } else {
                    bufs[slot].write_bytes(0, &stamp(lba, pass));
                    write_cmd(1, lba, 1, false)
                };
                qp.submit(cmd, &[bufs[slot].segment()], slot as u64)
                    .unwrap();
                inflight[slot] = Some(lba);
            };
            for slot in 0..depth {
                submit(&mut qp, slot, &mut next, &mut inflight);
            }
            qp.ring();
            let mut got: Vec<Completion> = Vec::new();
            while done < lbas.len() {
                got.clear();
                qp.poll(usize::MAX, |c| got.push(c));
                for c in &got {
                    assert!(c.status.is_success(), "{c:?}");
                    let slot = c.tag as usize;
                    let lba = inflight[slot]
                        .take()
                        .expect("a completion for a slot in flight");
                    if read {
                        assert_eq!(bufs[slot].to_vec(), stamp(lba, pass), "LBA {lba}");
                    }
                    done += 1;
                    submit(&mut qp, slot, &mut next, &mut inflight);
                }
                qp.ring();
            }
            assert!(inflight.iter().all(Option::is_none));
        }
        for lba in [0u64, 511, 1023] {
            assert_eq!(model.read_ns(1, lba, 1), stamp(lba, 1));
        }
        let st = qp.stats();
        assert_eq!(st.spurious, 0, "{st:?}");
        assert_eq!(model.stats().io_commands, 2048);
    }
}

#[test]
fn synchronous_helpers_split_and_wait_for_completions_from_another_thread() {
    let (model, ctrl) = open(true);
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    // 256 KiB at 16 KiB per command (mdts 2): sixteen commands, their completions concurrent.
    let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i * 13 + 5) as u8).collect();
    let buf = ctrl.alloc(data.len()).unwrap();
    buf.write_bytes(0, &data);
    qp.write(1, 100, 64, &buf, false).unwrap();
    assert_eq!(model.read_ns(1, 100, 64), data);
    let back = ctrl.alloc(data.len()).unwrap();
    qp.read(1, 100, 64, &back).unwrap();
    assert_eq!(back.to_vec(), data);
    qp.flush(1).unwrap();
}

#[test]
fn the_reactor_serves_threads_while_completions_land_concurrently() {
    let (model, ctrl) = open(true);
    let reactor = Reactor::spawn(
        vec![
            ctrl.create_io_qpair(16).unwrap(),
            ctrl.create_io_qpair(16).unwrap(),
        ],
        ReactorConfig::default(),
    )
    .unwrap();
    let threads = 4u64;
    let per = 200u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let h = reactor.handle();
            let ctrl = ctrl.clone();
            s.spawn(move || {
                let (tx, rx) = crossbeam_channel::unbounded();
                for i in 0..per {
                    let lba = t * per + i;
                    let buf = ctrl.alloc(4096).unwrap();
                    buf.write_bytes(0, &stamp(lba, 2));
                    h.submit_to(
                        IoRequest::new(write_cmd(1, lba, 1, false), IoData::buffer(buf), lba),
                        &tx,
                    );
                }
                for _ in 0..per {
                    let d = rx.recv().unwrap();
                    assert!(d.result.is_ok(), "{:?}", d.result);
                }
                for i in (0..per).step_by(3) {
                    let lba = t * per + i;
                    let d = h
                        .call(IoRequest::new(
                            read_cmd(1, lba, 1),
                            IoData::buffer(ctrl.alloc(4096).unwrap()),
                            lba,
                        ))
                        .wait();
                    assert!(d.result.is_ok(), "{:?}", d.result);
                    assert_eq!(d.buf.unwrap().to_vec(), stamp(lba, 2), "LBA {lba}");
                }
            });
        }
    });
    let exit = reactor.shutdown().expect("clean stop");
    assert_eq!(exit.stats.abandoned, 0);
    assert_eq!(exit.stats.completed, exit.stats.requests);
    // The mode stays until changed; held completions are then released by hand.
    model.set_completion_mode(CompletionMode::Instant);
}

#[test]
fn completions_come_later_from_the_models_thread() {
    let (model, ctrl) = bring_up(ModelConfig::default(), model_options()).unwrap();
    model.complete_from_thread(Duration::from_millis(50));
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    let buf = ctrl.alloc(4096).unwrap();
    qp.submit(read_cmd(1, 0, 1), &[buf.segment()], 7).unwrap();
    qp.ring();
    let mut got = Vec::new();
    qp.poll(8, |c| got.push(c));
    assert!(got.is_empty(), "posted at once: {got:?}");
    assert_eq!(model.held(), 1, "held for the completer thread");
    let start = std::time::Instant::now();
    while got.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "never posted");
        qp.poll(8, |c| got.push(c));
    }
    assert_eq!(got[0].tag, 7);
    assert!(got[0].status.is_success());
    assert_eq!(model.held(), 0);
}
