//! The async API against the controller model posting completions from its own thread:
//! tokio (current-thread and multi-thread) and a plain `futures` executor; many tasks sharing
//! a queue pair and a queue pair per task; each way of reaping; dropped futures.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rnvme_driver::aio::{AsyncQueuePair, Drive};
use rnvme_driver::controller::Controller;
use rnvme_driver::irq::WaitMode;
use rnvme_driver::model::{bring_up, model_options, CompletionMode, Model, ModelConfig};
use rnvme_driver::{Error, NvmeStatus};

const BLOCKS: u64 = 8192;

fn open() -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(
        ModelConfig {
            // 16 KiB per command: larger transfers are split.
            mdts: 2,
            ..ModelConfig::one_namespace(4096, BLOCKS)
        },
        model_options(),
    )
    .expect("bring-up against the model");
    model.complete_from_thread(Duration::from_micros(30));
    (model, ctrl)
}

fn stamp(lba: u64, blocks: u64, pass: u8) -> Vec<u8> {
    (0..blocks * 4096)
        .map(|i| (i.wrapping_mul(29) ^ lba.wrapping_mul(131) ^ (pass as u64 * 7)) as u8)
        .collect()
}

fn aqp(ctrl: &Controller, drive: Drive) -> AsyncQueuePair {
    let mode = match drive {
        Drive::Poll | Drive::Poller => WaitMode::Polled,
        _ => WaitMode::Hybrid {
            spin: Duration::from_micros(20),
        },
    };
    AsyncQueuePair::new(ctrl.create_io_qpair_with(16, mode).unwrap(), drive).unwrap()
}

/// Task `t` of `tasks` writes, reads back and compares LBAs t, t + tasks, ... (runs of 1 to 6
/// blocks: some split into two commands), then flushes.
async fn worker(q: AsyncQueuePair, ctrl: Controller, t: u64, tasks: u64, pass: u8) {
    let mut lba = t * 8;
    while lba + 8 <= BLOCKS / 4 {
        let blocks = 1 + (lba / 8) % 6;
        let data = stamp(lba, blocks, pass);
        let buf = ctrl.alloc(data.len()).unwrap();
        buf.write_bytes(0, &data);
        let buf = q.write(1, lba, blocks, buf, false).await.unwrap().unwrap();
        buf.fill(0);
        let buf = q.read(1, lba, blocks, buf).await.unwrap().unwrap();
        assert_eq!(buf.to_vec(), data, "LBA {lba}");
        q.compare(1, lba, blocks, buf).await.unwrap();
        lba += 8 * tasks;
    }
    q.flush(1).await.unwrap();
}

fn check(model: &Model, pass: u8) {
    for lba in (0..BLOCKS / 4).step_by(8).take(64) {
        let blocks = 1 + (lba / 8) % 6;
        assert_eq!(
            model.read_ns(1, lba, blocks),
            stamp(lba, blocks, pass),
            "LBA {lba}"
        );
    }
}

#[test]
fn tokio_current_thread_many_tasks_share_a_queue_pair_each_way_of_reaping() {
    for (pass, drive) in [Drive::Poll, Drive::Reaper, Drive::Poller]
        .into_iter()
        .enumerate()
    {
        let (model, ctrl) = open();
        let q = aqp(&ctrl, drive);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            if drive == Drive::Poller {
                tokio::spawn(q.poller());
            }
            let tasks: Vec<_> = (0..12)
                .map(|t| tokio::spawn(worker(q.clone(), ctrl.clone(), t, 12, pass as u8)))
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        check(&model, pass as u8);
        let st = q.with_queue_pair(|qp| qp.stats());
        assert_eq!(st.spurious, 0);
        if drive == Drive::Reaper {
            assert!(st.submitted > 500, "{st:?}");
            assert!(model.stats().interrupts > 0);
        }
    }
}

#[test]
fn tokio_multi_thread_a_queue_pair_per_task_and_a_shared_one() {
    let (model, ctrl) = open();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        // Six tasks with a queue pair each (two reaped by threads, two by their futures, two
        // by poller tasks on other workers), and four more sharing one with a poller.
        let shared = aqp(&ctrl, Drive::Reaper);
        let polled = aqp(&ctrl, Drive::Poller);
        tokio::spawn(polled.poller());
        let mut tasks = Vec::new();
        for t in 0..10u64 {
            let q = match t {
                0 | 1 => aqp(&ctrl, Drive::Reaper),
                2 | 3 => aqp(&ctrl, Drive::Poll),
                4 | 5 => {
                    let q = aqp(&ctrl, Drive::Poller);
                    tokio::spawn(q.poller());
                    q
                }
                6 | 7 => shared.clone(),
                _ => polled.clone(),
            };
            tasks.push(tokio::spawn(worker(q, ctrl.clone(), t, 10, 9)));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    check(&model, 9);
}

#[test]
fn tokio_async_fd_reaps_when_the_interrupt_is_readable() {
    let (model, ctrl) = open();
    // A hybrid wait that polled its completion left the vector masked; the runtime's reaping
    // needs it unmasked, and gets it so.
    let mut qp = ctrl
        .create_io_qpair_with(
            16,
            WaitMode::Hybrid {
                spin: Duration::from_millis(20),
            },
        )
        .unwrap();
    let probe = ctrl.alloc(4096).unwrap();
    // (A read whose completion took longer than the 1 ms spin sleeps and unmasks: read on
    // until one was found by polling.)
    for lba in 0..200 {
        qp.read(1, lba, 1, &probe).unwrap();
        if qp.interrupt().unwrap().is_masked() {
            break;
        }
    }
    assert!(qp.interrupt().unwrap().is_masked());
    let q = AsyncQueuePair::new(qp, Drive::External).unwrap();
    assert!(!q.interrupt().unwrap().is_masked());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let irq = q.interrupt().unwrap();
        // SAFETY: the AsyncFd owns a share of the `Interrupt`, whose eventfd stays open, the
        // same descriptor, for as long as the `Interrupt` lives.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(irq, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.to_string())
        .unwrap();
        let reaper = {
            let q = q.clone();
            tokio::spawn(async move {
                loop {
                    let mut ready = fd.readable().await.unwrap();
                    ready.clear_ready();
                    q.reap_interrupt();
                }
            })
        };
        let tasks: Vec<_> = (0..6)
            .map(|t| tokio::spawn(worker(q.clone(), ctrl.clone(), t, 6, 3)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        reaper.abort();
    });
    check(&model, 3);
}

#[test]
fn a_plain_executor_runs_the_futures_and_errors_come_back_clearly() {
    let (model, ctrl) = open();
    let q = aqp(&ctrl, Drive::Reaper);
    futures::executor::block_on(async {
        // Sixty-four reads at once through a queue of 15 slots: the rest wait for free slots.
        let data = stamp(100, 64, 5);
        model.write_ns(1, 100, &data);
        let reads = (0..64u64).map(|i| {
            let buf = ctrl.alloc(4096).unwrap();
            q.read(1, 100 + i, 1, buf)
        });
        for (i, got) in join_all(reads).await.into_iter().enumerate() {
            let got = got.unwrap().unwrap().to_vec();
            assert_eq!(got, data[i * 4096..(i + 1) * 4096]);
        }
        // Leased memory: the caller keeps its buffer and reads it after the future.
        let mine = ctrl.alloc(8 * 4096).unwrap();
        let got = q
            .read_lease(1, 100, 8, mine.lease(0, 8 * 4096))
            .await
            .unwrap();
        assert!(got.is_none(), "nothing to give back");
        assert_eq!(mine.to_vec(), data[..8 * 4096]);
        mine.fill(0x5a);
        q.write_lease(1, 200, 8, mine.lease(0, 8 * 4096), true)
            .await
            .unwrap();
        assert_eq!(model.read_ns(1, 207, 1), vec![0x5a; 4096]);
        q.write_zeroes(1, 100, 64).await.unwrap();
        assert_eq!(model.read_ns(1, 163, 1), vec![0; 4096]);
        q.deallocate(1, 0, 16).await.unwrap();

        // Bad input: a clear error, nothing sent.
        let e = q
            .read(1, BLOCKS, 1, ctrl.alloc(4096).unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("LBA"), "{e}");
        let e = q
            .read(1, 0, 2, ctrl.alloc(4096).unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = q
            .read(7, 0, 1, ctrl.alloc(4096).unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoSuchNamespace { .. }), "{e}");
        // A device error: a compare that differs.
        let buf = ctrl.alloc(4096).unwrap();
        buf.fill(0xee);
        match q.compare(1, 100, 1, buf).await {
            Err(Error::Command { status, .. }) => {
                let want = NvmeStatus::COMPARE_FAILURE;
                assert_eq!((status.sct, status.sc), (want.sct, want.sc), "{status}");
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_dropped_future_keeps_its_memory_lent_until_the_completion_is_reaped() {
    let (model, ctrl) = open();
    model.set_completion_mode(CompletionMode::Deferred);
    let q = aqp(&ctrl, Drive::External);
    let data = stamp(40, 1, 1);
    model.write_ns(1, 40, &data);
    let buf = ctrl.alloc(4096).unwrap();
    let in_use = || ctrl.pool().stats().pages_in_use;
    let before = in_use();
    let mut fut = Box::pin(q.read(1, 40, 1, buf));
    // Polled once: submitted, not complete.
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    assert_eq!(q.with_queue_pair(|qp| qp.outstanding()), 1);
    drop(fut);
    // The buffer was dropped with the future, but its memory is still the device's.
    assert_eq!(in_use(), before);
    model.release_all();
    assert_eq!(q.reap(), 1, "the abandoned command's completion is reaped");
    assert_eq!(q.with_queue_pair(|qp| qp.outstanding()), 0);
    // Now it is back, and the queue pair goes on.
    assert_eq!(in_use(), before - 1);
    model.set_completion_mode(CompletionMode::Instant);
    let got = futures::executor::block_on(q.read(1, 40, 1, ctrl.alloc(4096).unwrap()));
    assert_eq!(got.unwrap().unwrap().to_vec(), data);
}

use std::future::Future;

#[test]
fn futures_awaited_out_of_completion_order_all_finish() {
    // `x` is submitted first and completes while `y` is awaited; `y` must not wait for `x`'s
    // result to be collected (its owner awaits `y` first), in every way of reaping.
    for drive in [Drive::Poll, Drive::Reaper] {
        let (model, ctrl) = open();
        let q = aqp(&ctrl, drive);
        model.write_ns(1, 9, &stamp(9, 1, 4));
        futures::executor::block_on(async {
            // x's completion is held until x is submitted and pending, then posted; the
            // reads after it complete at once, and their polls reap x's completion too.
            model.set_completion_mode(CompletionMode::Deferred);
            let mut x = Box::pin(q.read(1, 9, 1, ctrl.alloc(4096).unwrap()));
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            assert!(x.as_mut().poll(&mut cx).is_pending(), "submitted");
            model.release_all();
            model.set_completion_mode(CompletionMode::Instant);
            for i in 0..20u64 {
                let y = q.read(1, 20 + i, 1, ctrl.alloc(4096).unwrap()).await;
                y.unwrap();
            }
            let got = x.await.unwrap().unwrap();
            assert_eq!(got.to_vec(), stamp(9, 1, 4));
        });
    }
}

#[test]
fn a_poller_task_reaps_sleeps_while_nothing_is_outstanding_and_ends_with_the_queue_pair() {
    use futures::task::LocalSpawnExt;
    let (model, ctrl) = open();
    let q = aqp(&ctrl, Drive::Poller);
    let mut pool = futures::executor::LocalPool::new();
    let spawner = pool.spawner();
    let poller = spawner
        .spawn_local_with_handle(q.poller())
        .expect("spawn the poller");
    let data = stamp(300, 4, 1);
    model.write_ns(1, 300, &data);
    // Reads on a plain executor, reaped by the poller only.
    let got = pool.run_until({
        let (q, ctrl) = (q.clone(), ctrl.clone());
        async move {
            let reads = (0..4u64).map(|i| q.read(1, 300 + i, 1, ctrl.alloc(4096).unwrap()));
            join_all(reads).await
        }
    });
    for (i, r) in got.into_iter().enumerate() {
        assert_eq!(r.unwrap().unwrap().to_vec(), data[i * 4096..(i + 1) * 4096]);
    }
    // Nothing outstanding: the poller parks rather than spinning (the pool runs out of
    // work and returns), and a new submission wakes it.
    pool.run_until_stalled();
    let polls = q.with_queue_pair(|qp| qp.stats().polls);
    pool.run_until_stalled();
    assert_eq!(
        q.with_queue_pair(|qp| qp.stats().polls),
        polls,
        "a parked poller does not poll"
    );
    let buf = pool.run_until(q.read(1, 301, 1, ctrl.alloc(4096).unwrap()));
    assert_eq!(buf.unwrap().unwrap().to_vec(), data[4096..8192]);
    // The last handle gone, the poller (parked: nothing outstanding) is woken and ends.
    pool.run_until_stalled();
    drop(q);
    pool.run_until(poller);
}
