//! The cache over a real queue pair, against the driver's in-process controller model.

use std::sync::Arc;

use rnvme_driver::controller::Controller;
use rnvme_driver::dma::Backing;
use rnvme_driver::dma::DmaPool;
use rnvme_driver::hw::Hardware;
use rnvme_driver::hw::MemoryOnly;
use rnvme_driver::model::{model_options, CompletionMode, Model, ModelConfig};
use rnvme_driver::queue::DataPointerMode;
use rnvme_driver::NvmeStatus;
use rnvme_mpage::{
    fill_pattern, BlockIo, CacheOptions, DataPointer, Extent, ExtentMap, IoError, IoOp, MpageError,
    NvmeBlockIo, PageCache, PageError, PagePool, RecordingDevice,
};

fn setup(mdts: u8) -> (Arc<Model>, PageCache<NvmeBlockIo>) {
    let model = Model::new(ModelConfig {
        mdts,
        ..ModelConfig::one_namespace(512, 1 << 16)
    });
    let hw: Arc<dyn Hardware> = model.clone();
    let ctrl = Controller::init(hw, model_options()).expect("model controller comes up");
    let qp = ctrl.create_io_qpair(16).expect("I/O queue pair");
    let io = NvmeBlockIo::new(qp, 1, 512);
    let pool = PagePool::new(ctrl.pool(), 512).expect("frames");
    (
        model,
        PageCache::new(io, pool, CacheOptions::default()).expect("cache"),
    )
}

fn ns_pattern(lba: u64, count: u64) -> Vec<u8> {
    let mut v = vec![0u8; (count * 512) as usize];
    fill_pattern(3, lba * 512, &mut v);
    v
}

#[test]
fn fragmented_file_reads_and_writes_through_a_queue_pair() {
    let (model, mut c) = setup(3); // 32 KiB max transfer
    assert_eq!(c.device().max_transfer(), 32 << 10);
    model.write_ns(1, 0, &ns_pattern(0, 4096));
    // 1 KiB blocks: 0-15 at disk block 100, 16-19 a hole, 20-35 at disk block 300.
    let mut m =
        ExtentMap::with_extents(1024, [Extent::new(0, 100, 16), Extent::new(20, 300, 16)]).unwrap();
    m.set_allocation_range(1000..1100);
    let size = 36 * 1024;
    let f = c.open(Box::new(m), size).unwrap();
    let mut buf = vec![0u8; size as usize];
    assert_eq!(c.read_at(f, 0, &mut buf).unwrap(), size as usize);
    let mut want = ns_pattern(200, 32);
    want.extend(vec![0u8; 4096]);
    want.extend(ns_pattern(600, 32));
    assert_eq!(buf, want);
    // The model fails any command beyond its 32 KiB MDTS, so the bytes above prove the cache
    // split its runs at the max transfer.
    let q = c.device().queue().stats();
    assert!(q.submitted >= 2, "{q:?}");
    // Write into the hole (allocates) and over mapped blocks, then sync.
    c.write_at(f, 4096 * 4 + 100, b"into the hole").unwrap();
    c.write_at(f, 10, b"over data").unwrap();
    c.sync(f).unwrap();
    let on_disk = model.read_ns(1, 200, 2);
    assert_eq!(&on_disk[10..19], b"over data");
    assert_eq!(&on_disk[..10], &ns_pattern(200, 1)[..10]);
    let alloc = model.read_ns(1, 2000, 2);
    assert_eq!(&alloc[100..113], b"into the hole");
    assert!(
        alloc[..100].iter().all(|&b| b == 0),
        "the rest of a fresh block is zeros"
    );
    assert_eq!(c.dirty_pages(f).unwrap(), 0);
}

#[test]
fn a_failed_status_reaches_the_reader_decoded() {
    let (model, mut c) = setup(5);
    model.write_ns(1, 0, &ns_pattern(0, 256));
    model.fail_lba(1, 26, NvmeStatus::UNRECOVERED_READ_ERROR, None); // page 1: LBAs 24..32
    let f = c
        .open(
            Box::new(ExtentMap::with_extents(4096, [Extent::new(0, 2, 8)]).unwrap()),
            8 * 4096,
        )
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(f, 4096, &mut buf).unwrap_err();
    match e {
        MpageError::Read {
            page: 1,
            source:
                PageError::Io {
                    op: IoOp::Read,
                    source: IoError::Status(s),
                    ..
                },
            ..
        } => {
            assert_eq!(
                (s.sct, s.sc),
                (
                    NvmeStatus::UNRECOVERED_READ_ERROR.sct,
                    NvmeStatus::UNRECOVERED_READ_ERROR.sc
                )
            );
        }
        other => panic!("unexpected {other}"),
    }
    c.read_at(f, 0, &mut buf).unwrap();
    assert_eq!(buf, ns_pattern(16, 8));
}

#[test]
fn readahead_leaves_commands_in_flight_until_the_device_completes_them() {
    let (model, mut c) = setup(5);
    model.write_ns(1, 0, &ns_pattern(0, 1024));
    let f = c
        .open(
            Box::new(ExtentMap::with_extents(4096, [Extent::new(0, 10, 64)]).unwrap()),
            64 * 4096,
        )
        .unwrap();
    model.set_completion_mode(CompletionMode::Deferred);
    c.readahead(f, 0, 64).unwrap();
    assert_eq!(c.outstanding(), 2, "two commands of 128 KiB in flight");
    assert!(c.page_state(f, 0).unwrap().locked);
    model.release_all();
    c.wait_idle().unwrap();
    let mut buf = vec![0u8; 64 * 4096];
    c.read_at(f, 0, &mut buf).unwrap();
    assert_eq!(buf, ns_pattern(80, 512));
    assert_eq!(c.stats().read_commands, 2);
}

/// Scattered dirty pages written back, a readahead split at the max transfer, one page read.
fn scattered_writes_and_runs<D: BlockIo>(c: &mut PageCache<D>) -> Vec<u8> {
    let f = c
        .open(
            Box::new(ExtentMap::with_extents(4096, [Extent::new(0, 10, 64)]).unwrap()),
            64 * 4096,
        )
        .unwrap();
    for p in [2, 1, 0, 9, 7, 8] {
        c.write_page(f, p, &[p as u8 + 1; 4096]).unwrap();
    }
    c.start_writeback(f).unwrap();
    c.wait_idle().unwrap();
    c.readahead(f, 16, 40).unwrap();
    c.wait_idle().unwrap();
    c.read_page(f, 60).unwrap();
    let mut buf = vec![0u8; 64 * 4096];
    c.read_at(f, 0, &mut buf).unwrap();
    buf
}

#[test]
fn a_recording_device_offering_sgls_carries_what_the_driver_does() {
    // The model offers SGLs and the driver's queue pair is in its default mode, Auto.
    let (model, mut c) = setup(5); // 128 KiB max transfer
    assert_eq!(
        c.device().queue().data_pointer_mode(),
        DataPointerMode::Auto
    );
    model.write_ns(1, 0, &ns_pattern(0, 1024));
    let on_model = scattered_writes_and_runs(&mut c);

    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), 512, 1 << 16);
    dev.set_max_transfer(128 << 10);
    dev.set_data_pointer_mode(DataPointerMode::Auto);
    dev.write_bytes(0, &ns_pattern(0, 1024));
    let mut r = PageCache::new(dev, pool, CacheOptions::default()).unwrap();
    let on_recording = scattered_writes_and_runs(&mut r);
    assert_eq!(on_recording, on_model);

    let records = r.device().commands();
    let (mut descriptors, mut prp_lists, mut sgls) = (0, 0, 0);
    for rec in records {
        match &rec.dptr {
            DataPointer::Sgl(d) => {
                descriptors += d.len() as u64;
                sgls += 1;
            }
            _ => prp_lists += rec.list_pages as u64,
        }
    }
    let stats = model.stats();
    assert_eq!(stats.reads + stats.writes, records.len() as u64);
    assert!(sgls >= 3 && sgls < records.len(), "{records:?}");
    assert_eq!(
        stats.sgl_descriptors, descriptors,
        "the model read as many SGL descriptors as the recording device"
    );
    assert_eq!(stats.prp_list_pages, prp_lists);
}
