//! The driver against the in-process controller model: bring-up, admin commands, queue
//! pairs and I/O, including the model misbehaving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::DmaBuffer;
use rnvme_driver::io::{read_cmd, write_cmd, IoQueuePair};
use rnvme_driver::model::{
    bring_up, model_options, CompletionMode, Model, ModelConfig, ModelNamespace,
};
use rnvme_driver::queue::{Completion, DataPointerMode};
use rnvme_driver::{Error, NvmeStatus};

fn options() -> ControllerOptions {
    model_options()
}

fn config(mdts: u8) -> ModelConfig {
    ModelConfig {
        namespaces: vec![
            ModelNamespace {
                nsid: 1,
                lba_size: 4096,
                blocks: 16384,
            },
            ModelNamespace {
                nsid: 2,
                lba_size: 512,
                blocks: 65536,
            },
        ],
        mdts,
        ..ModelConfig::default()
    }
}

fn open(cfg: ModelConfig) -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(cfg, options()).expect("bring-up against the model");
    (model, ctrl)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn bring_up_identifies_controller_and_namespaces() {
    let (model, ctrl) = open(config(5));
    assert_eq!(ctrl.info().serial, ModelConfig::default().serial);
    assert_eq!(ctrl.namespaces().len(), 2);
    let ns1 = ctrl.namespace(1).unwrap();
    assert_eq!((ns1.lba_size, ns1.size_lbas), (4096, 16384));
    let ns2 = ctrl.namespace(2).unwrap();
    assert_eq!((ns2.lba_size, ns2.size_lbas), (512, 65536));
    assert_eq!(ctrl.max_transfer_bytes(), 128 * 1024);
    assert!(ctrl.io_queues_granted() >= 1);
    let err = ctrl.namespace(7).unwrap_err().to_string();
    assert!(
        err.contains("namespace 7 is not active") && err.contains("1, 2"),
        "{err}"
    );
    assert_eq!(model.enables(), 1);
    drop(ctrl);
    assert_eq!(
        model.shutdowns(),
        1,
        "dropping the controller shuts it down cleanly"
    );
    assert_eq!(model.mapped_bytes(), 0, "every DMA mapping is undone");
}

#[test]
fn ready_never_set_times_out_with_clear_error() {
    let model = Model::new(config(5));
    model.set_never_ready(true);
    let t = Instant::now();
    let err = Controller::init(model.clone(), options())
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::RegisterTimeout { .. }), "{msg}");
    assert!(
        msg.contains("CSTS.RDY = 1") && msg.contains("model"),
        "{msg}"
    );
    // CAP.TO is 500 ms in the model: the wait is bounded by it.
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(model.mapped_bytes(), 0);
}

#[test]
fn fatal_status_during_bring_up_is_an_error() {
    let model = Model::new(config(5));
    model.set_fatal();
    let err = Controller::init(model, options()).err().expect("must fail");
    assert!(matches!(err, Error::ControllerFatal { .. }), "{err}");
    assert!(err.to_string().contains("CSTS.CFS"));
}

#[test]
fn larger_minimum_page_size_is_refused_clearly() {
    let model = Model::new(ModelConfig {
        mpsmin: 1,
        ..config(5)
    });
    let err = Controller::init(model, options()).err().expect("must fail");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("8 KiB"), "{err}");
}

#[test]
fn removed_device_is_reported() {
    let model = Model::new(config(5));
    model.surprise_remove();
    let err = Controller::init(model, options()).err().expect("must fail");
    assert!(matches!(err, Error::DeviceRemoved { .. }), "{err}");
}

#[test]
fn write_then_read_round_trip_both_namespaces_and_modes() {
    let (model, ctrl) = open(config(5));
    for mode in [DataPointerMode::Prp, DataPointerMode::Sgl] {
        let mut qp = ctrl.create_io_qpair(64).unwrap();
        qp.set_data_pointer_mode(mode).unwrap();
        for (nsid, lba, blocks) in [
            (1u32, 10u64, 3u64),
            (1, 100, 300),
            (2, 7, 9),
            (2, 1000, 4000),
        ] {
            let lba_size = ctrl.namespace(nsid).unwrap().lba_size as usize;
            let len = blocks as usize * lba_size;
            let data = pattern(len, nsid as u8 + mode as u8);
            let wbuf = ctrl.alloc(len).unwrap();
            wbuf.write_bytes(0, &data);
            qp.write(nsid, lba, blocks, &wbuf, false).unwrap();
            assert_eq!(
                model.read_ns(nsid, lba, blocks),
                data,
                "device holds what was written"
            );
            let rbuf = ctrl.alloc(len).unwrap();
            qp.read(nsid, lba, blocks, &rbuf).unwrap();
            assert_eq!(rbuf.to_vec(), data);
            qp.compare(nsid, lba, blocks, &wbuf).unwrap();
        }
        assert_eq!(qp.stats().spurious, 0);
    }
}

#[test]
fn four_mib_read_is_split_by_mdts() {
    let (model, ctrl) = open(config(5)); // 128 KiB max transfer
    let mut qp = ctrl.create_io_qpair(16).unwrap();
    let data = pattern(4 << 20, 9);
    model.write_ns(1, 0, &data);
    let before = model.stats().reads;
    let buf = ctrl.alloc(4 << 20).unwrap();
    qp.read(1, 0, 1024, &buf).unwrap();
    assert_eq!(
        model.stats().reads - before,
        32,
        "4 MiB in 128 KiB commands"
    );
    assert_eq!(buf.to_vec(), data);
}

#[test]
fn transfers_beyond_two_mib_use_chained_prp_lists() {
    // No MDTS: one command carries 4 MiB (1024 pages): PRP1, then a list page of 511 data
    // entries and a chain pointer, then a second page of the remaining 512.
    let (model, ctrl) = open(config(0));
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    qp.set_data_pointer_mode(DataPointerMode::Prp).unwrap();
    let data = pattern(4 << 20, 3);
    model.write_ns(1, 64, &data);
    let before = model.stats();
    let buf = ctrl.alloc(4 << 20).unwrap();
    qp.read(1, 64, 1024, &buf).unwrap();
    let after = model.stats();
    assert_eq!(after.reads - before.reads, 1);
    assert_eq!(after.prp_list_pages - before.prp_list_pages, 2);
    assert_eq!(buf.to_vec(), data);
}

#[test]
fn the_default_takes_prps_without_a_list_and_sgls_instead_of_one() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    assert_eq!(qp.data_pointer_mode(), DataPointerMode::Auto);
    let buf = ctrl.alloc(128 << 10).unwrap();
    let data = pattern(128 << 10, 9);
    model.write_ns(1, 0, &data);
    // One page, then two pages: PRP1 (and PRP2), no SGL descriptor, no list.
    for blocks in [1u64, 2] {
        let before = model.stats();
        qp.read(1, 0, blocks, &buf).unwrap();
        let after = model.stats();
        assert_eq!(
            after.sgl_descriptors, before.sgl_descriptors,
            "{blocks} block(s)"
        );
        assert_eq!(
            after.prp_list_pages, before.prp_list_pages,
            "{blocks} block(s)"
        );
    }
    // Two pieces of a page each, apart and in reverse order (frames of a page cache): PRP1
    // ends its page and PRP2 starts one, so PRPs again, no list, no SGL.
    buf.fill(0xee);
    let before = model.stats();
    let pieces = [buf.segment_at(3 * 4096, 4096), buf.segment_at(4096, 4096)];
    qp.submit(read_cmd(1, 0, 2), &pieces, 7).unwrap();
    let mut got = Vec::new();
    while got.is_empty() {
        qp.poll(1, |c| got.push(c));
    }
    assert!(got[0].status.is_success());
    let after = model.stats();
    assert_eq!(after.sgl_descriptors, before.sgl_descriptors);
    assert_eq!(after.prp_list_pages, before.prp_list_pages);
    let back = buf.to_vec();
    assert_eq!(back[3 * 4096..4 * 4096], data[..4096]);
    assert_eq!(back[4096..2 * 4096], data[4096..8192]);
    assert!(
        back[..4096].iter().all(|&b| b == 0xee),
        "nothing else written"
    );
    // Three pages would need a PRP list: one SGL Data Block descriptor instead.
    let before = model.stats();
    qp.read(1, 0, 32, &buf).unwrap();
    let after = model.stats();
    assert_eq!(after.prp_list_pages, before.prp_list_pages);
    assert!(after.sgl_descriptors > before.sgl_descriptors);
    assert_eq!(buf.to_vec(), data);
    // A controller without SGLs gets PRPs for everything.
    let (model, ctrl) = open(ModelConfig {
        sgl: false,
        ..config(5)
    });
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    assert_eq!(qp.data_pointer_mode(), DataPointerMode::Prp);
    qp.set_data_pointer_mode(DataPointerMode::Auto).unwrap();
    assert_eq!(qp.data_pointer_mode(), DataPointerMode::Prp);
    let before = model.stats();
    qp.read(1, 0, 32, &buf).unwrap();
    assert_eq!(model.stats().prp_list_pages - before.prp_list_pages, 1);
}

#[test]
fn lba_range_is_checked_before_submission() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let buf = ctrl.alloc(8192).unwrap();
    let before = model.stats().reads;
    let err = qp.read(1, 16383, 2, &buf).unwrap_err();
    assert!(matches!(err, Error::LbaOutOfRange { .. }), "{err}");
    assert!(err.to_string().contains("16384 LBAs"), "{err}");
    assert_eq!(model.stats().reads, before, "nothing was sent");
    let err = qp.read(1, 0, 4, &buf).unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
    let err = qp.read(9, 0, 1, &buf).unwrap_err();
    assert!(matches!(err, Error::NoSuchNamespace { .. }), "{err}");
}

#[test]
fn phase_wraps_many_times() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    let buf = ctrl.alloc(4096).unwrap();
    let mut seen = Vec::new();
    // The completion queue has 256 entries: 600 commands wrap it twice.
    assert_eq!(qp.cq_entries(), 256);
    for i in 0..600u64 {
        model.write_ns(1, i % 64, &[i as u8; 4096]);
        qp.submit(read_cmd(1, i % 64, 1), &[buf.segment()], i)
            .unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            qp.poll(8, |c| got.push(c));
        }
        assert_eq!(got.len(), 1);
        assert!(got[0].status.is_success());
        seen.push(got[0].tag);
        assert_eq!(buf.to_vec(), vec![i as u8; 4096]);
    }
    assert_eq!(seen, (0..600).collect::<Vec<_>>());
    let s = qp.stats();
    assert_eq!((s.submitted, s.completed, s.spurious), (600, 600, 0));
}

#[test]
fn the_completion_doorbell_is_rung_once_per_many_completions() {
    let (model, ctrl) = open(config(5));
    // 3 commands at most in flight, 256 completion entries: the head doorbell is due once 253
    // entries were reaped, and the controller never finds the queue full.
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    assert_eq!((qp.entries(), qp.cq_entries()), (4, 256));
    let buf = ctrl.alloc(3 * 4096).unwrap();
    let before = model.stats();
    let mut done = 0u64;
    let mut next = 0u64;
    while done < 1000 {
        while next < 1000 && qp.outstanding() < 3 {
            let seg = buf.segment_at((next % 3) as usize * 4096, 4096);
            qp.submit(read_cmd(1, next % 64, 1), &[seg], next).unwrap();
            next += 1;
        }
        done += qp.poll(8, |c| assert!(c.status.is_success())) as u64;
    }
    let after = model.stats();
    let rung = after.cq_doorbells - before.cq_doorbells;
    assert_eq!(rung, qp.stats().cq_doorbells);
    assert!(
        (3..=4).contains(&rung),
        "{rung} head doorbells for 1000 completions"
    );
    assert_eq!(
        after.cq_full_waits, before.cq_full_waits,
        "the controller never waited for room"
    );
    assert_eq!(after.ignored_doorbells, before.ignored_doorbells);
}

#[test]
fn a_queue_as_deep_as_the_controller_allows_rings_after_every_poll() {
    // The model allows 1024 entries: a queue of 1024 has no spare completion entries.
    for shadow in [false, true] {
        let (model, ctrl) = bring_up(
            config(5),
            ControllerOptions {
                shadow_doorbells: shadow,
                ..options()
            },
        )
        .unwrap();
        assert_eq!(ctrl.shadow_doorbells(), shadow);
        let mut qp = ctrl.create_io_qpair(1024).unwrap();
        assert_eq!(qp.cq_entries(), 1024);
        let buf = ctrl.alloc(4096).unwrap();
        let before = model.stats().cq_doorbells;
        for i in 0..5u64 {
            qp.submit(read_cmd(1, i, 1), &[buf.segment()], i).unwrap();
            while qp.poll(8, |c| assert!(c.status.is_success())) == 0 {}
        }
        if shadow {
            // Every head goes to the shadow doorbell, and with no spare entries the MMIO
            // doorbell too: the controller may be about to find the queue full.
            assert_eq!(qp.stats().cq_shadow_writes, 5);
            assert_eq!(model.stats().cq_doorbells - before, 5);
        } else {
            assert_eq!(model.stats().cq_doorbells - before, 5);
        }
    }
}

#[test]
fn queue_full_is_back_pressure_and_ids_are_reused() {
    let (model, ctrl) = open(config(5));
    model.set_completion_mode(CompletionMode::Deferred);
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    let bufs: Vec<_> = (0..3).map(|_| ctrl.alloc(4096).unwrap()).collect();
    let mut cids = Vec::new();
    for (i, b) in bufs.iter().enumerate() {
        cids.push(
            qp.submit(read_cmd(1, i as u64, 1), &[b.segment()], i as u64)
                .unwrap(),
        );
    }
    assert_eq!(qp.capacity(), 3);
    let err = qp
        .submit(read_cmd(1, 0, 1), &[bufs[0].segment()], 99)
        .unwrap_err();
    assert!(matches!(err, Error::QueueFull), "{err}");
    assert_eq!(qp.stats().queue_full, 1);
    qp.ring();
    assert_eq!(
        qp.poll(8, |_| {}),
        0,
        "nothing completes while the model holds them"
    );
    assert_eq!(model.release(1), 1);
    let mut done = Vec::new();
    qp.poll(8, |c| done.push(c));
    assert_eq!(done.len(), 1);
    // The freed slot is handed out again, under a new command id generation, so a late
    // duplicate of the old completion cannot complete the new command.
    let again = qp
        .submit(read_cmd(1, 5, 1), &[bufs[0].segment()], 5)
        .unwrap();
    assert_eq!(again.0 & 0xfff, done[0].cid.0 & 0xfff);
    assert_ne!(again, done[0].cid);
    assert!(cids.contains(&done[0].cid));
    model.release_all();
    let mut n = 0;
    while n < 3 {
        n += qp.poll(8, |_| {});
        model.release_all();
    }
    assert_eq!(qp.outstanding(), 0);
}

#[test]
fn out_of_order_completions_reach_the_right_tags() {
    let (model, ctrl) = open(config(5));
    model.set_completion_mode(CompletionMode::Reversed);
    let mut qp = ctrl.create_io_qpair(32).unwrap();
    let bufs: Vec<_> = (0..20).map(|_| ctrl.alloc(4096).unwrap()).collect();
    for i in 0..20u64 {
        model.write_ns(1, 200 + i, &[i as u8 + 1; 4096]);
        qp.submit(
            read_cmd(1, 200 + i, 1),
            &[bufs[i as usize].segment()],
            1000 + i,
        )
        .unwrap();
    }
    qp.ring();
    model.release_all();
    let mut got: Vec<Completion> = Vec::new();
    while got.len() < 20 {
        qp.poll(64, |c| got.push(c));
    }
    let tags: Vec<u64> = got.iter().map(|c| c.tag).collect();
    assert_eq!(
        tags,
        (1000..1020).rev().collect::<Vec<_>>(),
        "completed in reverse order"
    );
    for (i, b) in bufs.iter().enumerate() {
        assert_eq!(b.to_vec(), vec![i as u8 + 1; 4096]);
    }
}

#[test]
fn errors_carry_decoded_status_and_dnr() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let status = NvmeStatus::UNRECOVERED_READ_ERROR.with_dnr(true);
    model.fail_lba(1, 77, status, None);
    let buf = ctrl.alloc(16 * 4096).unwrap();
    let err = qp.read(1, 70, 16, &buf).unwrap_err();
    assert_eq!(err.status(), Some(status));
    let msg = err.to_string();
    assert!(
        msg.contains("Unrecovered Read Error") && msg.contains("sct 2 / sc 0x81"),
        "{msg}"
    );
    // Commands that do not touch LBA 77 are fine.
    qp.read(1, 78, 8, &buf).unwrap();
    // Straight through the queue: the status and DNR bit reach the completion.
    qp.submit(read_cmd(1, 77, 1), &[buf.segment_at(0, 4096)], 5)
        .unwrap();
    let mut got = None;
    while got.is_none() {
        qp.poll(1, |c| got = Some(c));
    }
    let c = got.unwrap();
    assert!(c.status.dnr && !c.status.is_retryable());
    assert_eq!(c.result(), Err(status));
}

#[test]
fn write_zeroes_deallocate_flush_and_fua() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let buf = ctrl.alloc(8 * 4096).unwrap();
    buf.fill(0xab);
    qp.write(1, 0, 8, &buf, true).unwrap();
    qp.write_zeroes(1, 2, 3).unwrap();
    let d = model.read_ns(1, 0, 8);
    assert!(d[..2 * 4096].iter().all(|&b| b == 0xab));
    assert!(d[2 * 4096..5 * 4096].iter().all(|&b| b == 0));
    assert!(d[5 * 4096..].iter().all(|&b| b == 0xab));
    qp.deallocate(1, 6, 2).unwrap();
    assert!(model.read_ns(1, 6, 2).iter().all(|&b| b == 0));
    qp.flush(1).unwrap();
    let s = model.stats();
    assert!(s.write_zeroes >= 1 && s.dsm >= 1 && s.flushes >= 1);
    // A compare that does not match is a media status.
    let err = qp.compare(1, 0, 8, &buf).unwrap_err();
    assert_eq!(err.status().map(|s| (s.sct, s.sc)), Some((2, 0x85)));
}

#[test]
fn admin_logs_features_and_abort() {
    let (model, ctrl) = open(config(5));
    let smart = ctrl.smart_log().unwrap();
    assert!(smart.temperature_kelvin > 0);
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    let buf = ctrl.alloc(4096).unwrap();
    qp.write(1, 0, 1, &buf, false).unwrap();
    model.fail_lba(1, 3, NvmeStatus::UNRECOVERED_READ_ERROR, None);
    assert!(qp.read(1, 3, 1, &buf).is_err());
    let log = ctrl.error_log().unwrap();
    assert!(
        log.iter().any(|e| e.status.sct == 2 && e.status.sc == 0x81),
        "{log:?}"
    );
    let smart2 = ctrl.smart_log().unwrap();
    assert!(smart2.host_write_commands > smart.host_write_commands);
    let n = ctrl
        .get_features(rnvme_driver::spec::feature::NUMBER_OF_QUEUES, 0)
        .unwrap();
    assert!(n & 0xffff < 0xffff);
    // Abort a command the model is holding.
    model.set_completion_mode(CompletionMode::Deferred);
    let cid = qp.submit(read_cmd(1, 1, 1), &[buf.segment()], 42).unwrap();
    qp.ring();
    assert!(ctrl.abort(qp.qid(), cid.0).unwrap());
    let mut got = None;
    while got.is_none() {
        qp.poll(1, |c| got = Some(c));
    }
    assert_eq!(got.unwrap().status, NvmeStatus::ABORT_REQUESTED);
}

#[test]
fn queue_depth_and_count_limits_are_enforced() {
    let (_model, ctrl) = open(ModelConfig {
        mqes: 63,
        max_io_queues: 2,
        ..config(5)
    });
    let err = ctrl.create_io_qpair(65).err().unwrap().to_string();
    assert!(err.contains("2 to 64"), "{err}");
    let a = ctrl.create_io_qpair(64).unwrap();
    let b = ctrl.create_io_qpair(64).unwrap();
    let err = ctrl.create_io_qpair(8).err().unwrap().to_string();
    assert!(err.contains("all 2 I/O queue pairs"), "{err}");
    drop(a);
    let c = ctrl.create_io_qpair(8).unwrap();
    assert_eq!(c.qid(), 1, "a deleted queue id is reused");
    drop((b, c));
}

#[test]
fn queue_pairs_run_on_their_own_threads() {
    let (model, ctrl) = open(config(5));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let ctrl = ctrl.clone();
            std::thread::spawn(move || {
                let mut qp = ctrl.create_io_qpair(16).unwrap();
                let buf = ctrl.alloc(4096).unwrap();
                for i in 0..50u64 {
                    buf.fill((t * 50 + i) as u8);
                    qp.write(1, t * 1000 + i, 1, &buf, false).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for t in 0..4u64 {
        for i in 0..50u64 {
            assert_eq!(
                model.read_ns(1, t * 1000 + i, 1),
                vec![(t * 50 + i) as u8; 4096]
            );
        }
    }
}

/// Queue `n` one-block writes from `buf` to LBAs 0.., tagged with their LBA; nothing rung.
fn queue_writes(qp: &mut IoQueuePair, buf: &DmaBuffer, n: u64) {
    for i in 0..n {
        qp.submit(
            write_cmd(1, i, 1, false),
            &[buf.segment_at(i as usize * 4096, 4096)],
            i,
        )
        .unwrap();
    }
}

#[test]
fn batching_rings_one_doorbell_for_many_commands() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(64).unwrap();
    let buf = ctrl.alloc(32 * 4096).unwrap();
    let before = model.stats().sq_doorbells;
    queue_writes(&mut qp, &buf, 32);
    let mut n = 0;
    while n < 32 {
        n += qp.poll(64, |c| assert!(c.status.is_success()));
    }
    assert_eq!(model.stats().sq_doorbells - before, 1);
    assert_eq!(qp.stats().sq_doorbells, 1);
}

#[test]
fn without_ring_on_poll_commands_wait_for_the_owners_ring_and_retries_are_rung() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(64).unwrap();
    qp.set_ring_on_poll(false);
    let buf = ctrl.alloc(8 * 4096).unwrap();
    let before = model.stats().sq_doorbells;
    queue_writes(&mut qp, &buf, 8);
    // Polls only reap: nothing reached the controller.
    for _ in 0..100 {
        assert_eq!(qp.poll(64, |_| panic!("a command never rung completed")), 0);
    }
    assert_eq!(model.stats().sq_doorbells, before);
    qp.ring();
    let mut n = 0;
    while n < 8 {
        n += qp.poll(64, |c| assert!(c.status.is_success()));
    }
    assert_eq!(model.stats().sq_doorbells - before, 1);
    // A command the queue pair retries is its own to ring: a transient error on the first
    // attempt, success on the second, with the owner ringing once.
    model.write_ns(1, 40, &[0x77; 4096]);
    model.fail_lba(1, 40, NvmeStatus::UNRECOVERED_READ_ERROR, Some(1));
    let one = ctrl.alloc(4096).unwrap();
    qp.submit(read_cmd(1, 40, 1), &[one.segment()], 99).unwrap();
    qp.ring();
    let mut done = None;
    for _ in 0..1_000_000 {
        qp.poll(64, |c| done = Some(c.status));
        if done.is_some() {
            break;
        }
    }
    assert_eq!(done, Some(NvmeStatus::SUCCESS));
    assert_eq!(qp.stats().retries, 1);
    assert_eq!(one.to_vec(), vec![0x77; 4096]);
    // The queue pair's synchronous calls ring for themselves.
    qp.read(1, 40, 1, &one).unwrap();
    assert_eq!(one.to_vec(), vec![0x77; 4096]);
}

#[test]
fn a_controller_that_wants_dword_aligned_sgls_never_gets_others() {
    let (model, ctrl) = open(ModelConfig {
        sgl_dword: true,
        ..config(5)
    });
    assert_eq!(
        ctrl.info().sgl_support(),
        rnvme_driver::identify::SglSupport::DwordAligned
    );
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    let buf = ctrl.alloc(3 * 4096).unwrap();
    // Forced SGLs: a piece at an odd address is refused before anything is sent.
    qp.set_data_pointer_mode(DataPointerMode::Sgl).unwrap();
    let before = model.stats().io_commands;
    let e = qp
        .submit(read_cmd(1, 0, 1), &[buf.segment_at(2, 4096)], 1)
        .unwrap_err();
    assert!(e.to_string().contains("dword-aligned"), "{e}");
    assert_eq!(model.stats().io_commands, before);
    // Aligned data still goes out as an SGL.
    let sgl_before = model.stats().sgl_descriptors;
    qp.read(1, 0, 2, &buf).unwrap();
    assert!(model.stats().sgl_descriptors > sgl_before);
}

#[test]
fn a_log_page_of_no_bytes_is_refused_and_the_admin_queue_goes_on() {
    let (model, ctrl) = open(config(5));
    let before = model.stats().admin_commands;
    let e = ctrl.get_log_page(2, 0xffff_ffff, 0).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert_eq!(model.stats().admin_commands, before, "nothing was sent");
    assert_eq!(ctrl.get_log_page(2, 0xffff_ffff, 512).unwrap().len(), 512);
}

#[test]
fn data_that_does_not_match_the_lba_count_is_refused() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(4).unwrap();
    let buf = ctrl.alloc(3 * 4096).unwrap();
    let before = model.stats().io_commands;
    for (lbas, len) in [(1, 8192), (2, 4096), (1, 512)] {
        let e = qp
            .submit(read_cmd(1, 0, lbas), &[buf.segment_at(0, len)], 1)
            .unwrap_err();
        assert!(e.to_string().contains("must be exactly"), "{e}");
    }
    assert_eq!(model.stats().io_commands, before, "nothing was sent");
    qp.submit(read_cmd(1, 0, 3), &[buf.segment()], 2).unwrap();
    let mut got = Vec::new();
    while got.is_empty() {
        qp.poll(8, |c| got.push(c));
    }
    assert_eq!((got[0].tag, got[0].status), (2, NvmeStatus::SUCCESS));
}

#[test]
fn shadow_doorbells_are_set_up_and_set_up_again_after_a_reset() {
    let (model, ctrl) = open(config(5));
    assert!(ctrl.shadow_doorbells() && model.shadow_doorbells_on());
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    assert!(qp.shadow_doorbells());
    let buf = ctrl.alloc(4096).unwrap();
    model.write_ns(1, 3, &[3; 4096]);
    qp.read(1, 3, 1, &buf).unwrap();
    assert_eq!(buf.to_vec(), vec![3; 4096]);
    assert!(qp.stats().sq_shadow_writes > 0);
    ctrl.reset().unwrap();
    assert!(
        model.shadow_doorbells_on(),
        "configured again after the reset"
    );
    // The idle queue pair learns of the reset at its next submission, clears its shadow
    // doorbells and creates its queues again: the read goes through.
    model.write_ns(1, 4, &[4; 4096]);
    qp.read(1, 4, 1, &buf).unwrap();
    assert_eq!(buf.to_vec(), vec![4; 4096]);
    assert_eq!(qp.stats().resets, 1);
    // Turned off: MMIO doorbells only, and the controller is never given the pages.
    let (model, ctrl) = bring_up(
        config(5),
        ControllerOptions {
            shadow_doorbells: false,
            ..options()
        },
    )
    .unwrap();
    assert!(!ctrl.shadow_doorbells() && !model.shadow_doorbells_on());
    let mut qp = ctrl.create_io_qpair(8).unwrap();
    qp.read(1, 3, 1, &buf_of(&ctrl)).unwrap();
    assert_eq!(qp.stats().sq_shadow_writes, 0);
    assert_eq!(qp.stats().sq_doorbells, 1);
}

fn buf_of(ctrl: &Controller) -> rnvme_driver::dma::DmaBuffer {
    ctrl.alloc(4096).unwrap()
}

#[test]
fn a_controller_that_reads_shadow_doorbells_lazily_is_rung_rarely_and_loses_nothing() {
    let (model, ctrl) = open(config(5));
    let mut qp = ctrl.create_io_qpair(64).unwrap();
    model.set_shadow_lazy(true);
    let bufs: Vec<_> = (0..20)
        .map(|i| {
            model.write_ns(1, i, &[i as u8; 4096]);
            ctrl.alloc(4096).unwrap()
        })
        .collect();
    let before = model.stats();
    for (i, b) in bufs.iter().enumerate() {
        qp.submit(read_cmd(1, i as u64, 1), &[b.segment()], i as u64)
            .unwrap();
        qp.ring();
    }
    let mmio = model.stats().sq_doorbells - before.sq_doorbells;
    assert!(
        mmio < 20,
        "{mmio} MMIO doorbells for 20 rings: the event index was not respected"
    );
    // The commands the host announced only in the shadow doorbell are fetched when the
    // controller polls it.
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.len() < 20 {
        qp.poll(64, |c| done.push(c));
        if done.len() < 20 {
            model.poll_shadows();
        }
        assert!(
            Instant::now() < deadline,
            "commands lost: {} of 20",
            done.len()
        );
    }
    assert!(done.iter().all(|c| c.status.is_success()));
    for (i, b) in bufs.iter().enumerate() {
        assert_eq!(b.to_vec(), vec![i as u8; 4096], "block {i}");
    }
    assert!(model.stats().sq_shadow_fetches > 0);
    // The controller, having caught up, asks to be rung for what comes next (its event
    // index is the tail it read): the next ring writes the MMIO doorbell.
    model.poll_shadows();
    let before = model.stats().sq_doorbells;
    qp.submit(read_cmd(1, 0, 1), &[bufs[0].segment()], 99)
        .unwrap();
    qp.ring();
    assert_eq!(model.stats().sq_doorbells, before + 1);
    let mut last = Vec::new();
    while last.is_empty() {
        qp.poll(8, |c| last.push(c));
        model.poll_shadows();
    }
    assert_eq!(last[0].tag, 99);
    assert_eq!(
        model.stats().missed_doorbells,
        0,
        "every doorbell the event index asked for was rung"
    );
}
