//! The engine's Rust side against the in-process controller model: what fio's callbacks do,
//! without fio.

use std::sync::Arc;
use std::time::Duration;

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::hw::Hardware;
use rnvme_driver::model::{CompletionMode, Model, ModelConfig, ModelNamespace};
use rnvme_driver::queue::DataPointerMode;
use rnvme_driver::NvmeStatus;
use rnvme_fio::job::{Job, JobParams, Op, Queued};
use rnvme_fio::name::{parse, Target};
use rnvme_fio::EngineError;

fn model(mdts: u8, sgl: bool) -> (Arc<Model>, Arc<Controller>) {
    let model = Model::new(ModelConfig {
        namespaces: vec![
            ModelNamespace {
                nsid: 1,
                lba_size: 512,
                blocks: 1 << 15,
            },
            ModelNamespace {
                nsid: 2,
                lba_size: 4096,
                blocks: 1 << 10,
            },
        ],
        mdts,
        sgl,
        ..ModelConfig::default()
    });
    let hw: Arc<dyn Hardware> = model.clone();
    let ctrl = Controller::init(
        hw,
        ControllerOptions {
            backing: Backing::SmallPages,
            ..ControllerOptions::default()
        },
    )
    .expect("model controller");
    (model, Arc::new(ctrl))
}

fn job(ctrl: &Arc<Controller>, depth: u32, max_bs: u64, dptr: DataPointerMode) -> Job {
    let mut j = Job::new(JobParams {
        depth,
        max_bs,
        dptr,
        fua: false,
        ring_at_commit: false,
        stats: false,
    })
    .unwrap();
    j.add_file(0, &parse("0000.00.04.0/1").unwrap(), ctrl.clone())
        .unwrap();
    j.add_file(1, &parse("0000.00.04.0/2").unwrap(), ctrl.clone())
        .unwrap();
    j.start().unwrap();
    j
}

/// A started job of 4 KiB io_us on namespace 1 of `ctrl` alone.
fn one_file_job(ctrl: &Arc<Controller>, depth: u32, dptr: DataPointerMode, at_commit: bool) -> Job {
    let mut j = Job::new(JobParams {
        depth,
        max_bs: 4096,
        dptr,
        fua: false,
        ring_at_commit: at_commit,
        stats: false,
    })
    .unwrap();
    j.add_file(0, &parse("0000.00.04.0/1").unwrap(), ctrl.clone())
        .unwrap();
    j.start().unwrap();
    j
}

fn reap_all(j: &mut Job, n: usize) -> Vec<(u32, i32)> {
    let got = j.getevents(n, n, None);
    (0..got).map(|i| j.event(i).unwrap()).collect()
}

#[test]
fn writes_and_reads_move_the_bytes_split_at_the_max_transfer() {
    // mdts 2: 16 KiB per command; 64 KiB io_us take four commands each.
    for dptr in [
        DataPointerMode::Prp,
        DataPointerMode::Sgl,
        DataPointerMode::Auto,
    ] {
        let (model, ctrl) = model(2, true);
        let mut j = job(&ctrl, 4, 64 << 10, dptr);
        let base = j.iomem_alloc(4 * (64 << 10)).unwrap();
        let data: Vec<u8> = (0..4 * (64 << 10)).map(|i| (i * 7 + 3) as u8).collect();
        j.io_buffer().unwrap().write_bytes(0, &data);
        for i in 0..4u32 {
            let at = i as usize * (64 << 10);
            let q = j.queue(0, Op::Write, (i as u64) << 20, 64 << 10, base + at, i);
            assert_eq!(q.unwrap(), Queued::Queued);
        }
        assert_eq!(j.outstanding(), 16, "four commands per io_u");
        j.commit();
        let mut ev = reap_all(&mut j, 4);
        ev.sort();
        assert_eq!(ev, [(0, 0), (1, 0), (2, 0), (3, 0)]);
        for i in 0..4u64 {
            let on_disk = model.read_ns(1, (i << 20) / 512, 128);
            assert_eq!(on_disk, data[(i as usize) << 16..((i as usize) + 1) << 16]);
        }
        // Read them back into the other halves of the buffer, in reverse.
        j.io_buffer().unwrap().fill(0);
        for i in 0..4u32 {
            let at = (3 - i) as usize * (64 << 10);
            j.queue(0, Op::Read, (i as u64) << 20, 64 << 10, base + at, i)
                .unwrap();
        }
        j.commit();
        assert_eq!(reap_all(&mut j, 4).len(), 4);
        let back = j.io_buffer().unwrap().to_vec();
        for i in 0..4usize {
            assert_eq!(
                back[(3 - i) << 16..(4 - i) << 16],
                data[i << 16..(i + 1) << 16],
                "{dptr:?}"
            );
        }
    }
}

#[test]
fn a_full_queue_is_busy_until_completions_are_reaped() {
    let (_model, ctrl) = model(0, false);
    // Depth 3 of 4 KiB io_us.
    let mut j = job(&ctrl, 3, 4096, DataPointerMode::Prp);
    let base = j.iomem_alloc(3 * 4096).unwrap();
    let mut queued = 0;
    let mut busy = false;
    for i in 0..3u32 {
        match j
            .queue(0, Op::Read, 0, 4096, base + i as usize * 4096, i)
            .unwrap()
        {
            Queued::Queued => queued += 1,
            Queued::Busy => busy = true,
        }
    }
    // The queue pair was sized for the depth: all three fit.
    assert_eq!((queued, busy), (3, false));
    j.commit();
    assert_eq!(reap_all(&mut j, 3).len(), 3);
    // An io_u still in flight cannot be queued again.
    j.queue(0, Op::Read, 0, 4096, base, 0).unwrap();
    let e = j.queue(0, Op::Read, 0, 4096, base, 0).unwrap_err();
    assert!(e.to_string().contains("already in flight"), "{e}");
    j.commit();
    assert_eq!(reap_all(&mut j, 1), [(0, 0)]);
}

#[test]
fn trim_deallocates_and_flush_completes() {
    let (model, ctrl) = model(0, false);
    let mut j = job(&ctrl, 4, 8192, DataPointerMode::Prp);
    let base = j.iomem_alloc(8192).unwrap();
    j.io_buffer().unwrap().fill(0xab);
    j.queue(1, Op::Write, 4096 * 10, 8192, base, 0).unwrap();
    j.commit();
    assert_eq!(reap_all(&mut j, 1), [(0, 0)]);
    assert_eq!(model.read_ns(2, 10, 2), vec![0xab; 8192]);
    j.queue(1, Op::Trim, 4096 * 10, 8192, 0, 1).unwrap();
    j.queue(1, Op::Flush, 0, 0, 0, 2).unwrap();
    j.commit();
    let mut ev = reap_all(&mut j, 2);
    ev.sort();
    assert_eq!(ev, [(1, 0), (2, 0)]);
    assert_eq!(
        model.read_ns(2, 10, 2),
        vec![0; 8192],
        "deallocated blocks read as zeros"
    );
}

#[test]
fn a_failed_command_fails_its_io_u_with_eio_and_says_why() {
    let (model, ctrl) = model(2, false);
    let mut j = job(&ctrl, 2, 64 << 10, DataPointerMode::Prp);
    let base = j.iomem_alloc(2 * (64 << 10)).unwrap();
    // The third of the four commands of io_u 0 fails (every time: retries do not help).
    model.fail_lba(1, 64, NvmeStatus::DATA_TRANSFER_ERROR, None);
    j.queue(0, Op::Read, 0, 64 << 10, base, 0).unwrap();
    j.queue(0, Op::Read, 1 << 20, 64 << 10, base + (64 << 10), 1)
        .unwrap();
    j.commit();
    let mut ev = reap_all(&mut j, 2);
    ev.sort();
    assert_eq!(
        ev,
        [(0, 5), (1, 0)],
        "io_u 0 fails with EIO once all its commands are back"
    );
    assert!(j.error_detail(0).unwrap().contains("NVMe status"));
    assert_eq!(j.error_detail(1), None);
    // The next use of the io_u starts clean.
    model.fail_lba(1, 64, NvmeStatus::DATA_TRANSFER_ERROR, Some(0));
    j.queue(0, Op::Read, 0, 64 << 10, base, 0).unwrap();
    j.commit();
    assert_eq!(reap_all(&mut j, 1), [(0, 0)]);
    assert_eq!(j.error_detail(0), None);
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let (_model, ctrl) = model(0, false);
    let mut j = job(&ctrl, 2, 8192, DataPointerMode::Prp);
    let base = j.iomem_alloc(8192).unwrap();
    let cases: Vec<(Result<Queued, EngineError>, &str)> = vec![
        (
            j.queue(1, Op::Read, 512, 4096, base, 0),
            "whole 4096-byte LBAs",
        ),
        (
            j.queue(1, Op::Read, 0, 2048, base, 0),
            "whole 4096-byte LBAs",
        ),
        (
            j.queue(1, Op::Read, 4 << 20, 4096, base, 0),
            "beyond the end",
        ),
        (
            j.queue(0, Op::Read, 0, 4096, base + 8192, 0),
            "not inside the engine's DMA memory",
        ),
        (
            j.queue(0, Op::Read, 0, 4096, base - 4096, 0),
            "not inside the engine's DMA memory",
        ),
        (j.queue(7, Op::Read, 0, 4096, base, 0), "fio file 7"),
        (j.queue(0, Op::Read, 0, 4096, base, 9), "beyond iodepth"),
    ];
    for (r, want) in cases {
        let e = r.unwrap_err();
        assert!(e.to_string().contains(want), "{e} lacks {want:?}");
    }
    assert_eq!(j.outstanding(), 0);
    // Still usable.
    j.queue(0, Op::Read, 0, 4096, base, 0).unwrap();
    j.commit();
    assert_eq!(reap_all(&mut j, 1), [(0, 0)]);
}

#[test]
fn files_must_exist_fit_the_block_size_and_share_the_controller() {
    let (_m1, c1) = model(0, false);
    let (_m2, c2) = model(0, false);
    let mut j = Job::new(JobParams {
        depth: 1,
        max_bs: 2048,
        dptr: DataPointerMode::Auto,
        fua: false,
        ring_at_commit: false,
        stats: false,
    })
    .unwrap();
    let t = |n: u32| Target {
        bdf: "0000:00:04.0".into(),
        nsid: n,
    };
    let e = j.add_file(0, &t(9), c1.clone()).unwrap_err();
    assert!(e.to_string().contains("no such active namespace"), "{e}");
    let e = j.add_file(0, &t(2), c1.clone()).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a multiple of the namespace's 4096-byte LBA"),
        "{e}"
    );
    j.add_file(0, &t(1), c1.clone()).unwrap();
    let e = j.add_file(1, &t(1), c2).unwrap_err();
    assert!(
        e.to_string().contains("namespaces of one controller"),
        "{e}"
    );
    assert_eq!(j.file_size(0), Some((512 << 15, 512)));
    assert!(Job::new(JobParams {
        depth: 0,
        max_bs: 4096,
        dptr: DataPointerMode::Auto,
        fua: false,
        ring_at_commit: false,
        stats: false
    })
    .is_err());
}

#[test]
fn dropping_a_job_with_commands_in_flight_keeps_their_memory_out_of_the_pool() {
    use rnvme_driver::model::LateDma;
    let (model, ctrl) = model(0, false);
    let mut j = job(&ctrl, 2, 4096, DataPointerMode::Prp);
    let base = j.iomem_alloc(2 << 20).unwrap();
    // The device takes the read but writes its data only later.
    model.set_late_dma(LateDma::Io);
    j.queue(0, Op::Read, 0, 4096, base, 0).unwrap();
    j.commit();
    // A reap that waits for nothing rings the doorbell.
    assert_eq!(j.getevents(0, 1, None), 0);
    let before = ctrl.pool().stats();
    // fio gives the buffers back and ends the job with the read in flight.
    j.iomem_free();
    drop(j);
    let after = ctrl.pool().stats();
    assert!(
        after.quarantined_bytes > before.quarantined_bytes,
        "the buffers the read may still write are quarantined: {before:?} -> {after:?}"
    );
    // New buffers never get the late data.
    let fresh: Vec<_> = (0..4).map(|_| ctrl.alloc(2 << 20).unwrap()).collect();
    for b in &fresh {
        b.fill(0x55);
    }
    let late = model.fire_late_dma(0xaa, false);
    assert_eq!(late.commands, 1);
    for b in &fresh {
        assert!(b.to_vec().iter().all(|&x| x == 0x55));
    }
}

#[test]
fn commands_go_out_at_the_next_reap_or_at_commit_when_asked() {
    for at_commit in [false, true] {
        let (model, ctrl) = model(0, false);
        let mut j = one_file_job(&ctrl, 4, DataPointerMode::Prp, at_commit);
        let base = j.iomem_alloc(4 * 4096).unwrap();
        for i in 0..4u32 {
            j.queue(
                0,
                Op::Read,
                i as u64 * 4096,
                4096,
                base + i as usize * 4096,
                i,
            )
            .unwrap();
            j.commit();
        }
        // The model runs commands when their doorbell is written.
        let seen = model.stats().reads;
        assert_eq!(
            seen,
            if at_commit { 4 } else { 0 },
            "ring at commit: {at_commit}"
        );
        assert_eq!(reap_all(&mut j, 4).len(), 4);
        assert_eq!(model.stats().reads, 4);
    }
}

#[test]
fn with_rnvme_stats_a_job_accounts_its_io_us_and_the_reaps_that_waited() {
    let run = |stats: bool, threaded: bool| {
        let (model, ctrl) = model(0, false);
        if threaded {
            model.complete_from_thread(Duration::from_millis(1));
        }
        let mut j = Job::new(JobParams {
            depth: 1,
            max_bs: 4096,
            dptr: DataPointerMode::Prp,
            fua: false,
            ring_at_commit: false,
            stats,
        })
        .unwrap();
        j.add_file(0, &parse("0000.00.04.0/1").unwrap(), ctrl.clone())
            .unwrap();
        j.start().unwrap();
        let base = j.iomem_alloc(4096).unwrap();
        for i in 0..8u64 {
            assert_eq!(
                j.queue(0, Op::Read, i * 4096, 4096, base, 0).unwrap(),
                Queued::Queued
            );
            j.commit();
            assert_eq!(reap_all(&mut j, 1), vec![(0, 0)]);
        }
        while rnvme_driver::clock::learned_rate().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        j.report()
    };
    assert_eq!(run(false, false), None);
    // Completions posted while the doorbell is written: each reap's first poll finds one.
    let r = run(true, false).unwrap();
    assert!(r.starts_with("8 io_us; per io_u: "), "{r}");
    assert!(r.contains("; 0 of 8 reaps waited; 1.000 submission"), "{r}");
    // Completions from another thread a millisecond later: every reap waits.
    let r = run(true, true).unwrap();
    assert!(r.contains("; 8 of 8 reaps waited; "), "{r}");
}

#[test]
fn with_fios_batch_complete_max_one_reap_takes_every_completion_and_one_doorbell_resubmits() {
    // fio asks for one completion per getevents unless iodepth_batch_complete_max says more;
    // asked for up to eight, the engine hands over all eight a poll finds, and the eight io_us
    // fio queues again go to the controller under one doorbell at the next getevents.
    let model = Model::new(ModelConfig::one_namespace(4096, 1 << 10));
    let hw: Arc<dyn Hardware> = model.clone();
    let ctrl = Arc::new(
        Controller::init(
            hw,
            ControllerOptions {
                backing: Backing::SmallPages,
                shadow_doorbells: false,
                ..ControllerOptions::default()
            },
        )
        .unwrap(),
    );
    let mut j = one_file_job(&ctrl, 8, DataPointerMode::Auto, false);
    let base = j.iomem_alloc(8 * 4096).unwrap();
    for i in 0..8u64 {
        model.write_ns(1, i, &[i as u8 + 1; 4096]);
    }
    model.set_completion_mode(CompletionMode::Deferred);
    // Doorbells of the I/O queue from here on (bring-up rang the admin queue's).
    let db0 = model.stats().sq_doorbells;
    let doorbells = || model.stats().sq_doorbells - db0;
    let read = |j: &mut Job, i: u32| {
        let q = j.queue(
            0,
            Op::Read,
            i as u64 * 4096,
            4096,
            base + i as usize * 4096,
            i,
        );
        assert_eq!(q.unwrap(), Queued::Queued);
    };
    for round in 1..=2 {
        for i in 0..8 {
            read(&mut j, i);
        }
        j.commit();
        assert_eq!(j.getevents(0, 8, None), 0, "the controller holds them");
        assert_eq!(doorbells(), round, "one doorbell for eight io_us");
        assert_eq!(model.release_all(), 8);
        let mut got = reap_all(&mut j, 8);
        got.sort();
        assert_eq!(got, (0..8).map(|i| (i, 0)).collect::<Vec<_>>());
        let data = j.io_buffer().unwrap().to_vec();
        for i in 0..8 {
            assert_eq!(data[i * 4096], i as u8 + 1, "io_u {i}'s data");
        }
    }
}

#[test]
fn a_depth_no_queue_holds_is_refused() {
    let params = |depth| JobParams {
        depth,
        max_bs: 4096,
        dptr: DataPointerMode::Auto,
        fua: false,
        ring_at_commit: false,
        stats: false,
    };
    for depth in [0, 65536, u32::MAX] {
        let e = Job::new(params(depth)).err().expect("refused");
        assert!(
            e.to_string()
                .contains(&format!("iodepth {depth} is outside 1 to 65535")),
            "{e}"
        );
    }
    assert!(Job::new(params(65535)).is_ok());
}
