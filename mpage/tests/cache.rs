//! Behaviour of the cache through its file API, on a recording device.

use std::sync::Arc;

use rnvme_driver::dma::{Backing, DmaPool};
use rnvme_driver::hw::MemoryOnly;
use rnvme_driver::NvmeStatus;
use rnvme_mpage::{
    pattern_byte, BlockMap, CacheOptions, DiskFill, Extent, ExtentMap, FileId, IoError, IoOp,
    Linear, MpageError, PageCache, PageError, PagePool, RecordingDevice,
};

type Cache = PageCache<RecordingDevice>;

fn cache(lba: u32, opts: CacheOptions) -> Cache {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), lba, 1 << 30);
    dev.set_fill(DiskFill::Pattern);
    PageCache::new(dev, pool, opts).unwrap()
}

fn with_capacity(pages: usize) -> CacheOptions {
    CacheOptions {
        capacity: Some(pages),
        ..CacheOptions::default()
    }
}

fn disk(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(0, offset + i))
        .collect()
}

/// Linear file of `pages` 4 KiB pages at disk block 1000.
fn linear(c: &mut Cache, pages: u64) -> FileId {
    c.open(Box::new(Linear::new(4096, 1000, pages)), pages * 4096)
        .unwrap()
}

fn read_sizes(c: &Cache) -> Vec<u32> {
    c.device()
        .commands()
        .iter()
        .filter(|r| r.op == IoOp::Read)
        .map(|r| r.lbas)
        .collect()
}

#[test]
fn lru_evicts_the_least_recently_used_clean_page() {
    let mut c = cache(4096, with_capacity(4));
    let f = linear(&mut c, 16);
    for p in 0..4 {
        c.read_page(f, p).unwrap();
    }
    let mut b = [0u8; 1];
    c.read_at(f, 0, &mut b).unwrap(); // page 0 is now the most recent
    c.read_page(f, 4).unwrap();
    assert_eq!(c.cached_pages(f).unwrap(), vec![0, 2, 3, 4]);
    assert_eq!(c.stats().evictions, 1);
    // A dirty page is never evicted.
    c.write_at(f, 2 * 4096, &[9u8; 4096]).unwrap();
    for p in 5..9 {
        c.read_page(f, p).unwrap();
    }
    assert!(c.cached_pages(f).unwrap().contains(&2));
    assert_eq!(c.cached_total(), 4);
    assert!(c.page_state(f, 2).unwrap().dirty);
}

#[test]
fn dirty_pages_are_written_back_when_the_cache_runs_short() {
    // No background write-back and no dirty limit: the cache fills with dirty pages.
    let opts = CacheOptions {
        dirty_background: usize::MAX,
        dirty_limit: usize::MAX,
        ..with_capacity(4)
    };
    let mut c = cache(4096, opts);
    let mut m = ExtentMap::new(4096);
    m.set_allocation_range(700..800);
    let f = c.open(Box::new(m), 0).unwrap();
    for p in 0..4u64 {
        c.write_at(f, p * 4096, &vec![p as u8 + 1; 4096]).unwrap();
    }
    assert!(c.device().commands().is_empty(), "writes stay in the cache");
    c.write_at(f, 4 * 4096, &[5u8; 4096]).unwrap();
    let s = c.stats();
    assert_eq!((s.writebacks, s.evictions, s.writeback_stalls), (4, 1, 1));
    let writes: Vec<(u64, u32)> = c
        .device()
        .commands()
        .iter()
        .map(|r| (r.slba, r.lbas))
        .collect();
    assert_eq!(writes, vec![(700, 4)], "written back as one command");
    assert_eq!(c.device().read_bytes(702 * 4096, 4096), vec![3; 4096]);
    assert_eq!(c.dirty_pages(f).unwrap(), 1);
    c.sync(f).unwrap();
    assert_eq!(c.device().read_bytes(704 * 4096, 4096), vec![5; 4096]);
    let mut back = vec![0u8; 5 * 4096];
    assert_eq!(c.read_at(f, 0, &mut back).unwrap(), 5 * 4096);
    assert!(back
        .chunks(4096)
        .enumerate()
        .all(|(i, ch)| ch.iter().all(|&b| b == i as u8 + 1)));
}

#[test]
fn write_errors_keep_pages_dirty_and_sync_reports_them() {
    let mut c = cache(4096, CacheOptions::default());
    let mut m = ExtentMap::new(4096);
    m.set_allocation_range(700..800);
    let f = c.open(Box::new(m), 0).unwrap();
    c.write_at(f, 0, &vec![7u8; 4 * 4096]).unwrap();
    c.device_mut().fail_lba(702);
    let e = c.sync(f).unwrap_err();
    match &e {
        MpageError::Write {
            page: 0,
            source:
                PageError::Io {
                    op: IoOp::Write,
                    slba: 700,
                    lbas: 4,
                    source,
                },
            ..
        } => {
            assert_eq!(source.status(), Some(NvmeStatus::WRITE_FAULT));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(e.to_string().contains("stays dirty"));
    assert_eq!(c.dirty_pages(f).unwrap(), 4, "nothing dropped");
    assert!(c.page_state(f, 1).unwrap().error.is_some());
    assert!(c.sync(f).is_err(), "retried and failed again");
    c.device_mut().heal_lba(702);
    c.sync(f).unwrap();
    assert_eq!(c.dirty_pages(f).unwrap(), 0);
    assert!(c.page_state(f, 1).unwrap().error.is_none());
    assert_eq!(
        c.device().read_bytes(700 * 4096, 4 * 4096),
        vec![7u8; 4 * 4096]
    );
    c.sync(f).unwrap();
    // A failed Flush is reported too.
    c.device_mut().set_fail_flush(true);
    assert!(matches!(
        c.sync(f),
        Err(MpageError::Flush {
            source: IoError::Status(_),
            ..
        })
    ));
}

#[test]
fn an_error_in_background_write_back_reaches_the_next_sync() {
    let mut c = cache(4096, with_capacity(2));
    let f = linear(&mut c, 8);
    c.device_mut().fail_lba(1000);
    c.write_at(f, 0, &[1u8; 4096]).unwrap();
    c.write_at(f, 4096, &[2u8; 4096]).unwrap();
    // Page 2 needs room: both dirty pages are written back (and fail).
    let e = c.write_at(f, 2 * 4096, &[3u8; 4096]).unwrap_err();
    assert!(
        matches!(
            e,
            MpageError::CacheFull {
                capacity: 2,
                dirty: 2,
                ..
            }
        ),
        "{e}"
    );
    c.device_mut().heal_lba(1000);
    let e = c.sync(f).unwrap_err();
    assert!(
        matches!(e, MpageError::Write { page: 0, .. }),
        "the earlier failure: {e}"
    );
    assert_eq!(
        c.dirty_pages(f).unwrap(),
        0,
        "but this sync wrote the pages"
    );
    assert_eq!(
        c.device().read_bytes(1000 * 4096, 8192)[4096..],
        [2u8; 4096][..]
    );
    c.sync(f).unwrap();
}

#[test]
fn a_read_error_marks_only_the_affected_page() {
    let mut c = cache(4096, CacheOptions::default());
    let f = linear(&mut c, 8);
    c.device_mut().fail_lba(1005);
    c.readahead(f, 0, 8).unwrap();
    c.wait_idle().unwrap();
    for p in 0..8 {
        let s = c.page_state(f, p).unwrap();
        assert_eq!(
            (s.uptodate, s.error.is_some()),
            (p != 5, p == 5),
            "page {p}"
        );
    }
    assert_eq!(c.stats().read_retries, 1);
    assert_eq!(read_sizes(&c)[0], 8, "first one command for all");
    let mut b = [0u8; 10];
    let e = c.read_at(f, 5 * 4096, &mut b).unwrap_err();
    assert!(
        matches!(
            e,
            MpageError::Read {
                page: 5,
                source: PageError::Io { op: IoOp::Read, .. },
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(c.read_at(f, 4 * 4096, &mut b).unwrap(), 10);
    c.device_mut().heal_lba(1005);
    assert_eq!(c.read_at(f, 5 * 4096, &mut b).unwrap(), 10);
    assert_eq!(b.to_vec(), disk(1005 * 4096, 10));
}

#[test]
fn a_failing_block_on_the_per_block_path_fails_its_page() {
    let mut c = cache(512, CacheOptions::default());
    let m =
        ExtentMap::with_extents(1024, [Extent::new(0, 100, 2), Extent::new(2, 300, 2)]).unwrap();
    let f = c.open(Box::new(m), 4096).unwrap();
    c.device_mut().fail_lba(601);
    let e = c.read_page(f, 0).unwrap_err();
    assert!(matches!(e, MpageError::Read { page: 0, .. }));
    let s = c.page_state(f, 0).unwrap();
    assert!(!s.uptodate && s.error.is_some());
    assert_eq!(
        s.blocks.unwrap().uptodate,
        0b1011,
        "the other blocks were read"
    );
    c.device_mut().heal_lba(601);
    c.read_page(f, 0).unwrap();
    assert_eq!(
        read_sizes(&c).len(),
        5,
        "four blocks, then only the failed one again"
    );
}

#[test]
fn sequential_readers_get_a_growing_readahead_window() {
    // One window in flight, at most 64 pages: the kernel's scheme.
    let mut c = cache(
        4096,
        CacheOptions {
            readahead_max: 64,
            readahead_depth: 1,
            ..CacheOptions::default()
        },
    );
    let f = linear(&mut c, 300);
    let mut b = vec![0u8; 4096];
    for p in 0..200 {
        c.read_at(f, p * 4096, &mut b).unwrap();
        assert_eq!(b, disk((1000 + p) * 4096, 4096), "page {p}");
    }
    assert_eq!(read_sizes(&c), vec![4, 8, 16, 32, 64, 64, 64]);
    assert_eq!(c.stats().readahead_windows, 7);
    // A random reader gets what it asks for, no more.
    c.device_mut().clear_commands();
    c.read_at(f, 290 * 4096 + 5, &mut b[..100]).unwrap();
    c.read_at(f, 260 * 4096, &mut b[..100]).unwrap();
    assert_eq!(read_sizes(&c), vec![1, 1]);
}

#[test]
fn partial_writes_read_modify_write() {
    let mut c = cache(4096, CacheOptions::default());
    let f = linear(&mut c, 4);
    c.write_at(f, 100, b"hello").unwrap();
    assert_eq!(read_sizes(&c), vec![1], "the page is read first");
    c.write_at(f, 4096, &[1u8; 4096]).unwrap();
    assert_eq!(read_sizes(&c), vec![1], "a whole page is not");
    c.sync(f).unwrap();
    let mut want = disk(1000 * 4096, 4096);
    want[100..105].copy_from_slice(b"hello");
    assert_eq!(c.device().read_bytes(1000 * 4096, 4096), want);
    let ops: Vec<IoOp> = c.device().commands().iter().map(|r| r.op).collect();
    assert_eq!(ops, [IoOp::Read, IoOp::Write, IoOp::Flush]);
}

#[test]
fn with_small_blocks_only_partly_written_blocks_are_read() {
    let mut c = cache(512, CacheOptions::default());
    let f = c
        .open(Box::new(Linear::new(1024, 100, 64)), 64 * 1024)
        .unwrap();
    c.write_at(f, 1024 + 10, &[0xAB; 20]).unwrap();
    let recs = c.device().commands().to_vec();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0].slba, recs[0].lbas, recs[0].fallback),
        (202, 2, true),
        "just block 1"
    );
    c.write_at(f, 2048, &[0xCD; 1024]).unwrap();
    assert_eq!(
        c.device().commands().len(),
        1,
        "a whole block needs no read"
    );
    let s = c.page_state(f, 0).unwrap();
    assert_eq!(
        s.blocks.map(|b| (b.uptodate, b.dirty)),
        Some((0b0110, 0b0110))
    );
    // Reading the whole page reads only the blocks the cache lacks: the dirty ones survive.
    let mut page = vec![0u8; 4096];
    c.read_at(f, 0, &mut page).unwrap();
    let mut want = disk(100 * 1024, 4096);
    want[1034..1054].fill(0xAB);
    want[2048..3072].fill(0xCD);
    assert_eq!(page, want);
    let reads: Vec<u64> = c.device().commands().iter().map(|r| r.slba).collect();
    assert_eq!(reads, vec![202, 200, 206]);
    let s = c.page_state(f, 0).unwrap();
    assert!(s.uptodate && s.dirty);
    c.sync(f).unwrap();
    let writes: Vec<(u64, u32, bool)> = c
        .device()
        .commands()
        .iter()
        .filter(|r| r.op == IoOp::Write)
        .map(|r| (r.slba, r.lbas, r.fallback))
        .collect();
    assert_eq!(
        writes,
        vec![(202, 2, true), (204, 2, true)],
        "only the dirty blocks"
    );
    assert_eq!(c.device().read_bytes(100 * 1024, 4096), want);
}

#[test]
fn set_len_shows_zeros_after_growth_and_drops_pages_on_shrink() {
    let mut c = cache(4096, CacheOptions::default());
    let mut m = ExtentMap::with_extents(4096, [Extent::new(0, 100, 4)]).unwrap();
    m.set_allocation_range(500..600);
    let f = c.open(Box::new(m), 10_000).unwrap();
    let mut b = vec![0u8; 16384];
    assert_eq!(c.read_at(f, 0, &mut b).unwrap(), 10_000);
    c.set_len(f, 16384).unwrap();
    assert_eq!(c.read_at(f, 0, &mut b).unwrap(), 16384);
    assert_eq!(b[..10_000], disk(100 * 4096, 10_000)[..]);
    assert!(
        b[10_000..].iter().all(|&x| x == 0),
        "the disk had data past the old end; it must not show"
    );
    c.sync(f).unwrap();
    assert!(c
        .device()
        .read_bytes(102 * 4096 + 1808, 4096 - 1808)
        .iter()
        .all(|&x| x == 0));
    c.set_len(f, 5000).unwrap();
    assert_eq!(c.cached_pages(f).unwrap(), vec![0, 1]);
    c.set_len(f, 12000).unwrap();
    assert_eq!(c.read_at(f, 0, &mut b).unwrap(), 12000);
    assert_eq!(b[..5000], disk(100 * 4096, 5000)[..]);
    assert!(b[5000..12000].iter().all(|&x| x == 0));
    // Writing past the end grows the file; the gap reads as zeros.
    c.write_at(f, 20_000, b"tail").unwrap();
    assert_eq!(c.file_size(f).unwrap(), 20_004);
    let mut all = vec![1u8; 20_004];
    c.sync(f).unwrap();
    assert_eq!(c.read_at(f, 0, &mut all).unwrap(), 20_004);
    assert!(all[5000..20_000].iter().all(|&x| x == 0));
    assert_eq!(&all[20_000..], b"tail");
}

#[test]
fn many_commands_in_flight_through_a_shallow_queue() {
    let mut c = cache(4096, CacheOptions::default());
    c.device_mut().set_queue_depth(2);
    c.device_mut().set_completions_per_poll(1);
    let f = c
        .open(Box::new(Linear::new(4096, 1000, 64)), 64 * 4096)
        .unwrap();
    c.set_force_per_block(true);
    c.readahead(f, 0, 64).unwrap();
    assert!(
        c.outstanding() > 0,
        "readahead returns with commands in flight"
    );
    let mut b = vec![0u8; 64 * 4096];
    c.read_at(f, 0, &mut b).unwrap();
    assert_eq!(b, disk(1000 * 4096, 64 * 4096));
    assert_eq!(c.stats().fallback_commands, 64);
}

#[test]
fn per_block_path_can_be_forced_for_comparison() {
    let mut fast = cache(512, CacheOptions::default());
    let mut slow = cache(
        512,
        CacheOptions {
            force_per_block: true,
            ..CacheOptions::default()
        },
    );
    let mut bufs = Vec::new();
    for c in [&mut fast, &mut slow] {
        let f = c
            .open(Box::new(Linear::new(1024, 100, 64)), 64 * 1024)
            .unwrap();
        c.readahead(f, 0, 16).unwrap();
        let mut b = vec![0u8; 64 * 1024];
        c.read_at(f, 0, &mut b).unwrap();
        bufs.push(b);
    }
    assert_eq!(bufs[0], bufs[1]);
    assert_eq!(bufs[0], disk(100 * 1024, 64 * 1024));
    let (a, b) = (fast.stats(), slow.stats());
    assert_eq!((a.commands, a.fallback_commands, a.map_calls), (1, 0, 1));
    assert_eq!((b.commands, b.fallback_commands, b.map_calls), (64, 64, 64));
    assert_eq!((a.pages_read, b.pages_read), (16, 16));
}

#[test]
fn inline_data_comes_from_the_map() {
    let mut c = cache(4096, CacheOptions::default());
    let mut e = Extent::new(1, 50, 1);
    e.uptodate = true;
    let mut m =
        ExtentMap::with_extents(4096, [Extent::new(0, 100, 1), e, Extent::new(2, 102, 1)]).unwrap();
    m.set_inline(1, b"inline".to_vec());
    let f = c.open(Box::new(m), 3 * 4096).unwrap();
    let mut b = vec![0u8; 3 * 4096];
    c.readahead(f, 0, 3).unwrap();
    c.read_at(f, 0, &mut b).unwrap();
    assert_eq!(&b[4096..4102], b"inline");
    assert_eq!(b[8192..], disk(102 * 4096, 4096)[..]);
    let slbas: Vec<u64> = c.device().commands().iter().map(|r| r.slba).collect();
    assert_eq!(slbas, [100, 102], "no read for the inline block");
}

#[test]
fn bad_geometry_is_refused_when_the_file_is_opened() {
    let mut c = cache(4096, CacheOptions::default());
    let e = c.open(Box::new(Linear::new(1024, 0, 8)), 8192).unwrap_err();
    assert!(
        e.to_string()
            .contains("block size 1024: 1024 is not a multiple of the 4096-byte LBA size"),
        "{e}"
    );
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 1).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), 512, 100);
    dev.set_max_transfer(2048);
    assert!(matches!(
        PageCache::new(dev, pool, CacheOptions::default()),
        Err(MpageError::MaxTransferTooSmall { .. })
    ));
}

#[test]
fn an_unmapped_answer_to_create_is_an_error_not_a_write() {
    struct NoAlloc;
    impl BlockMap for NoAlloc {
        fn block_size(&self) -> u32 {
            4096
        }
        fn map(
            &mut self,
            _b: u64,
            max: u64,
            _create: bool,
        ) -> Result<rnvme_mpage::Mapping, rnvme_mpage::MapError> {
            Ok(rnvme_mpage::Mapping::Hole { blocks: max })
        }
        fn truncate(&mut self, _first: u64) -> Result<(), rnvme_mpage::MapError> {
            Ok(())
        }
    }
    let mut c = cache(4096, CacheOptions::default());
    let f = c.open(Box::new(NoAlloc), 8192).unwrap();
    c.write_at(f, 0, &[1u8; 8192]).unwrap();
    let e = c.sync(f).unwrap_err();
    assert!(
        matches!(
            e,
            MpageError::Write {
                source: PageError::Unmapped { file_block: 0 },
                ..
            }
        ),
        "{e}"
    );
    assert!(
        c.device().commands().iter().all(|r| r.op == IoOp::Flush),
        "no write with a made-up LBA"
    );
    assert_eq!(c.dirty_pages(f).unwrap(), 2);
}

/// A cache of 1024 frames whose device takes commands of at most 16 pages, 16 at a time.
fn small_commands(opts: CacheOptions) -> Cache {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 1024).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), 4096, 1 << 30);
    dev.set_fill(DiskFill::Pattern);
    dev.set_max_transfer(16 * 4096);
    dev.set_queue_depth(16);
    PageCache::new(dev, pool, opts).unwrap()
}

/// Highest page read from the device so far (+1), for a linear file at block 1000.
fn read_frontier(c: &Cache) -> u64 {
    c.device()
        .commands()
        .iter()
        .filter(|r| r.op == IoOp::Read)
        .map(|r| r.slba + r.lbas as u64 - 1000)
        .max()
        .unwrap_or(0)
}

#[test]
fn readahead_windows_are_sized_by_the_device_and_cover_its_queue() {
    // Auto: windows of one command (16 pages), half the queue (8 windows) in flight.
    let mut c = small_commands(CacheOptions::default());
    let f = linear(&mut c, 1000);
    let mut b = vec![0u8; 4096];
    let mut most_ahead = 0;
    for p in 0..600 {
        c.read_at(f, p * 4096, &mut b).unwrap();
        assert_eq!(b, disk((1000 + p) * 4096, 4096), "page {p}");
        let ahead = read_frontier(&c) - p;
        assert!(ahead <= 10 * 16, "page {p}: {ahead} pages read ahead");
        if p > 100 {
            assert!(ahead >= 6 * 16, "page {p}: only {ahead} pages read ahead");
            // Completions are reaped only when needed: what is ahead is in flight.
            most_ahead = most_ahead.max(c.outstanding());
        }
    }
    assert!(most_ahead >= 6, "{most_ahead} commands in flight at most");
    let sizes = read_sizes(&c);
    assert!(sizes.iter().all(|&n| n <= 16), "{sizes:?}");
    assert!(
        sizes.iter().filter(|&&n| n == 16).count() >= sizes.len() - 5,
        "full-size commands once the window has grown: {sizes:?}"
    );
    assert_eq!(c.stats().readahead_thrashed, 0);
}

#[test]
fn readahead_takes_up_to_half_the_cache() {
    // Eight windows of 16 pages in flight want 128 pages ahead of the reader: a cache of 320
    // pages gives them (half of it is 160), one of 128 pages keeps readahead within 64.
    for (capacity, least, most) in [(320, 6 * 16, 9 * 16), (128, 3 * 16, 64 + 16)] {
        let mut c = small_commands(with_capacity(capacity));
        let f = linear(&mut c, 1000);
        let mut b = vec![0u8; 4096];
        let (mut lo, mut hi) = (u64::MAX, 0);
        for p in 0..900 {
            c.read_at(f, p * 4096, &mut b).unwrap();
            assert_eq!(b, disk((1000 + p) * 4096, 4096), "page {p}");
            if p > 100 {
                let ahead = read_frontier(&c) - p;
                lo = lo.min(ahead);
                hi = hi.max(ahead);
            }
        }
        assert!(
            lo >= least && hi <= most,
            "capacity {capacity}: {lo}..={hi} pages ahead"
        );
        assert_eq!(c.stats().readahead_thrashed, 0, "capacity {capacity}");
    }
}

#[test]
fn data_segments_count_the_pieces_of_memory_commands_carry() {
    // Frames handed out in order: a command of 16 pages is one piece (two where it crosses
    // from one 2 MiB buffer to the next). Every frame given back, but interleaved (as two
    // threads closing files at once give them back): the pool hands them out in order
    // again, one piece. Every other frame held elsewhere: 16 pieces.
    for (fragmented, held_apart) in [(false, false), (true, false), (true, true)] {
        let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
        let pool = PagePool::new(&dma, 1024).unwrap();
        let mut held = Vec::new();
        if fragmented {
            let all: Vec<_> = (0..1024).map(|_| pool.alloc().unwrap()).collect();
            for fr in all.iter().step_by(2) {
                pool.free(*fr);
            }
            for fr in all.iter().skip(1).step_by(2) {
                match held_apart {
                    true => held.push(*fr),
                    false => pool.free(*fr),
                }
            }
        }
        let mut dev = RecordingDevice::new(pool.clone(), 4096, 1 << 30);
        dev.set_fill(DiskFill::Pattern);
        dev.set_max_transfer(16 * 4096);
        let mut c = PageCache::new(dev, pool, with_capacity(256)).unwrap();
        let f = linear(&mut c, 200);
        let mut b = vec![0u8; 4096];
        for p in 0..200 {
            c.read_at(f, p * 4096, &mut b).unwrap();
            assert_eq!(b, disk((1000 + p) * 4096, 4096), "page {p}");
        }
        let s = c.stats();
        if held_apart {
            assert_eq!(s.data_segments, s.pages_read, "{s:?}");
        } else {
            assert!(s.data_segments <= s.read_commands + 1, "{s:?}");
        }
        assert!(s.read_commands < s.pages_read, "{s:?}");
        assert_eq!(held.len(), if held_apart { 512 } else { 0 });
    }
}

#[test]
fn a_reader_at_a_marked_page_still_being_read_starts_the_next_windows_before_it_waits() {
    // A first read of 32 pages: its window (two commands of 16 pages) carries the readahead
    // mark on its first page, which the reader reaches while it is being read. The device
    // completes nothing: what was submitted when the wait gives up is what the reader sent
    // before waiting.
    let mut c = small_commands(CacheOptions {
        io_timeout: std::time::Duration::from_millis(50),
        ..CacheOptions::default()
    });
    let f = linear(&mut c, 1000);
    c.device_mut().set_stalled(true);
    let mut b = vec![0u8; 32 * 4096];
    match c.read_at(f, 0, &mut b) {
        Err(MpageError::Timeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    let sizes = read_sizes(&c);
    assert!(
        sizes.len() > 2,
        "only the first window went out before the wait: {sizes:?}"
    );
    assert!(read_frontier(&c) >= 32 + 16, "{sizes:?}");
    // The device wakes up: everything read is right, the windows already sent included.
    c.device_mut().set_stalled(false);
    c.wait_idle().unwrap();
    for p in (0..200).step_by(32) {
        c.read_at(f, p * 4096, &mut b).unwrap();
        assert_eq!(b, disk((1000 + p) * 4096, 32 * 4096), "page {p}");
    }
}

#[test]
fn readahead_backs_off_when_its_pages_are_evicted_unread() {
    // Six readers take turns, page by page, in a cache of 128 pages: each may read up to
    // half the cache ahead, more than the cache holds for all of them.
    let opts = CacheOptions {
        capacity: Some(128),
        ..CacheOptions::default()
    };
    let mut c = small_commands(opts);
    let files: Vec<FileId> = (0..6)
        .map(|i| {
            c.open(Box::new(Linear::new(4096, 1000 + i * 400, 400)), 400 * 4096)
                .unwrap()
        })
        .collect();
    let mut b = vec![0u8; 4096];
    for p in 0..400u64 {
        for (i, &f) in files.iter().enumerate() {
            c.read_at(f, p * 4096, &mut b).unwrap();
            assert_eq!(b, disk((1000 + i as u64 * 400 + p) * 4096, 4096));
        }
    }
    let s = c.stats();
    assert!(s.readahead_thrashed > 0, "{s:?}");
    // Backing off keeps the waste small: without it (windows as large as half the cache
    // for every reader) over twice the pages consumed are read.
    let consumed = 6 * 400;
    assert!(
        s.pages_read < consumed * 5 / 4,
        "{} pages read for {consumed} consumed",
        s.pages_read
    );
}

/// `read_with` of `len` bytes at `off`: bytes visited, their concatenation and the number of
/// runs, checking that the runs come in file order.
fn runs_of(c: &mut Cache, f: FileId, off: u64, len: usize) -> (usize, Vec<u8>, usize) {
    let mut got = Vec::new();
    let mut visits = 0;
    let n = c
        .read_with(f, off, len, |at, bytes| {
            assert_eq!(at, off + got.len() as u64, "runs come in file order");
            got.extend_from_slice(bytes);
            visits += 1;
        })
        .unwrap();
    (n, got, visits)
}

#[test]
fn read_with_shows_what_read_at_reads_in_runs_of_frames() {
    let mut c = cache(512, CacheOptions::default());
    let f = linear(&mut c, 300);
    for (off, len) in [
        (0u64, 300 * 4096),
        (5, 4091),
        (4000, 20_000),
        (123_457, 777_777),
    ] {
        let mut want = vec![0u8; len];
        let n = c.read_at(f, off, &mut want).unwrap();
        let (m, got, visits) = runs_of(&mut c, f, off, len);
        assert_eq!((m, &got[..]), (n, &want[..n]), "{off}+{len}");
        if len > 100_000 {
            assert!(
                visits * 16 < n / 4096,
                "{visits} runs for {} pages",
                n / 4096
            );
        }
    }
    assert_eq!(c.read_with(f, 300 * 4096, 10, |_, _| panic!()).unwrap(), 0);
}

#[test]
fn a_held_page_stays_put_and_refuses_changes() {
    let mut c = cache(4096, with_capacity(8));
    let f = linear(&mut c, 64);
    let held = c.page(f, 3).unwrap().unwrap();
    assert_eq!((held.index(), &held[..]), (3, &disk(1003 * 4096, 4096)[..]));
    // Read far more than the cache holds: page 3 is never evicted, its bytes never change.
    let mut b = vec![0u8; 4096];
    for p in (8..64).chain(0..3) {
        c.read_at(f, p * 4096, &mut b).unwrap();
    }
    assert!(c.page_state(f, 3).is_some(), "a held page is not evicted");
    assert_eq!(&held[..], &disk(1003 * 4096, 4096)[..]);
    // The cache refuses to change it while held.
    match c.write_at(f, 3 * 4096 + 10, b"x") {
        Err(MpageError::PageHeld { page: 3, .. }) => {}
        other => panic!("{other:?}"),
    }
    // Another thread may read it.
    let sum: u64 = std::thread::scope(|s| {
        s.spawn(|| held.iter().map(|&x| x as u64).sum())
            .join()
            .unwrap()
    });
    assert_eq!(
        sum,
        disk(1003 * 4096, 4096)
            .iter()
            .map(|&x| x as u64)
            .sum::<u64>()
    );
    drop(held);
    c.write_at(f, 3 * 4096 + 10, b"x").unwrap();
    // The last page stops at the end of the file; past it there is none.
    c.set_len(f, 10 * 4096 + 100).unwrap();
    assert_eq!(c.page(f, 10).unwrap().unwrap().len(), 100);
    assert!(c.page(f, 11).unwrap().is_none());
}

#[test]
fn held_pages_fill_the_cache_cleanly_and_outlive_truncation() {
    let mut c = cache(4096, with_capacity(4));
    let f = linear(&mut c, 64);
    let held: Vec<_> = (0..4).map(|p| c.page(f, p).unwrap().unwrap()).collect();
    let mut b = vec![0u8; 4096];
    match c.read_at(f, 10 * 4096, &mut b) {
        Err(MpageError::CacheFull { .. }) => {}
        other => panic!("every frame is held: {other:?}"),
    }
    // Truncation drops the pages from the file; their holders keep what they saw.
    c.set_len(f, 4096).unwrap();
    assert!(c.page_state(f, 2).is_none());
    assert_eq!(&held[2][..], &disk(1002 * 4096, 4096)[..]);
    drop(held);
    c.close(f).unwrap();
    assert_eq!(
        c.pool().free_frames(),
        c.pool().frames(),
        "frames of dropped pages go back once unheld"
    );
}

/// A cache whose device holds 2 commands of at most 8 pages and that gives up after 50 ms.
fn impatient() -> Cache {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), 4096, 1 << 30);
    dev.set_fill(DiskFill::Pattern);
    dev.set_max_transfer(8 * 4096);
    dev.set_queue_depth(2);
    let opts = CacheOptions {
        io_timeout: std::time::Duration::from_millis(50),
        readahead_depth: 1,
        ..CacheOptions::default()
    };
    PageCache::new(dev, pool, opts).unwrap()
}

#[test]
fn a_read_that_times_out_leaves_no_page_locked_for_a_command_never_sent() {
    let mut c = impatient();
    let f = linear(&mut c, 64);
    c.device_mut().set_stalled(true);
    match c.readahead(f, 0, 64) {
        Err(MpageError::Timeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    c.device_mut().set_stalled(false);
    // Only what reached the device is waited for; nothing else is left locked.
    c.wait_idle().unwrap();
    for p in c.cached_pages(f).unwrap() {
        assert!(!c.page_state(f, p).unwrap().locked, "page {p} stuck");
    }
    let mut b = vec![0u8; 64 * 4096];
    c.read_at(f, 0, &mut b).unwrap();
    assert_eq!(b, disk(1000 * 4096, 64 * 4096));
}

#[test]
fn a_write_back_that_times_out_leaves_no_page_under_write_back() {
    let mut c = impatient();
    let f = linear(&mut c, 64);
    c.write_at(f, 0, &vec![0x5A; 64 * 4096]).unwrap();
    c.device_mut().set_stalled(true);
    assert!(matches!(c.sync(f), Err(MpageError::Timeout { .. })));
    c.device_mut().set_stalled(false);
    c.wait_idle().unwrap();
    for p in 0..64 {
        assert!(!c.page_state(f, p).unwrap().writeback, "page {p} stuck");
    }
    // The next sync writes everything and reports the write the timeout cut off (the caller
    // has not seen it yet); the one after is clean.
    assert!(matches!(c.sync(f), Err(MpageError::Write { .. })));
    assert_eq!(c.dirty_pages(f).unwrap(), 0);
    c.sync(f).unwrap();
    assert_eq!(
        c.device().read_bytes(1000 * 4096, 64 * 4096),
        vec![0x5A; 64 * 4096]
    );
}

#[test]
fn shutdown_writes_every_file_back_and_a_failure_is_the_callers_error() {
    let mut c = cache(4096, CacheOptions::default());
    let f = linear(&mut c, 8);
    let g = c
        .open(Box::new(Linear::new(4096, 2000, 8)), 8 * 4096)
        .unwrap();
    c.write_at(f, 0, &[5u8; 4096]).unwrap();
    c.write_at(g, 4096, &[6u8; 4096]).unwrap();
    assert_eq!(c.unsynced_pages(), 2);
    // A write fault on g's page: f is written and closed, g stays open and dirty.
    c.device_mut().fail_lba(2001);
    let e = c.shutdown().unwrap_err();
    assert!(
        matches!(e, MpageError::Write { file, .. } if file == g),
        "{e}"
    );
    assert_eq!(c.unsynced_pages(), 1, "nothing dropped");
    assert!(c.dirty_pages(f).is_err(), "f was closed");
    assert_eq!(c.device().read_bytes(1000 * 4096, 4096), vec![5u8; 4096]);
    // Once the device recovers, shutdown finishes the job.
    c.device_mut().heal_lba(2001);
    c.shutdown().unwrap();
    assert_eq!(c.unsynced_pages(), 0);
    assert!(c.dirty_pages(g).is_err(), "g was closed");
    assert_eq!(c.device().read_bytes(2001 * 4096, 4096), vec![6u8; 4096]);
}

#[test]
fn page_cache_is_send_and_sync() {
    // The page index takes `&self` for lookups without interior mutability, and the block
    // maps (only `Send`) are reached through `&mut self`: a cache can be shared for reading
    // its counters and page states, and moved between threads.
    fn check<T: Send + Sync>() {}
    check::<PageCache<RecordingDevice>>();
}

#[test]
fn a_sequential_readers_runs_span_readahead_marks_and_survive_its_evictions() {
    // A cache of 512 pages under a 2 048-page file, readahead windows of 16 pages (a mark in
    // the middle of each): the readahead started at each mark evicts pages while the
    // reader's run (up to 32 pages) waits to be handed over.
    let mut c = cache(
        4096,
        CacheOptions {
            readahead_max: 16,
            ..with_capacity(512)
        },
    );
    let f = linear(&mut c, 2048);
    let chunk = 32 * 4096;
    let (mut off, mut visits, mut chunks) = (0u64, 0usize, 0usize);
    while off < 2048 * 4096 {
        let (n, got, runs) = runs_of(&mut c, f, off, chunk);
        visits += runs;
        assert_eq!(n, chunk);
        assert!(got == disk(1000 * 4096 + off, n), "data at byte {off}");
        off += n as u64;
        chunks += 1;
    }
    assert!(c.stats().evictions > 0, "the readahead evicted pages");
    // Runs end where frames stop being adjacent, not at each readahead mark (there is one
    // every few pages here).
    assert!(
        visits <= chunks * 2,
        "{visits} runs for {chunks} reads of 32 pages"
    );
}

#[test]
fn a_dropped_cache_writes_its_dirty_pages_back_unless_it_is_unwinding() {
    let make = || {
        let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
        let pool = PagePool::new(&dma, 64).unwrap();
        let dev = RecordingDevice::new(pool.clone(), 4096, 1 << 20);
        // Another queue of the same disk, to look at it once the cache is gone.
        let disk = dev.queue();
        (
            PageCache::new(dev, pool, CacheOptions::default()).unwrap(),
            disk,
        )
    };
    let (mut c, disk) = make();
    let f = linear(&mut c, 8);
    c.write_at(f, 4096, &[7u8; 2 * 4096]).unwrap();
    assert_eq!(c.unsynced_pages(), 2);
    drop(c);
    assert_eq!(disk.read_bytes(1001 * 4096, 2 * 4096), vec![7u8; 2 * 4096]);
    // A cache dropped while its thread panics leaves the disk alone.
    let (c, disk) = make();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut c = c;
        let f = linear(&mut c, 8);
        c.write_at(f, 0, &[9u8; 4096]).unwrap();
        panic!("the application failed");
    }));
    assert!(r.is_err());
    assert!(
        disk.written_lbas().is_empty(),
        "nothing written while unwinding"
    );
}

/// A device whose completions come only from `wait` (as a queue pair that sleeps on its
/// interrupt would deliver them), never from `poll`.
struct WaitOnly {
    inner: RecordingDevice,
    waits: usize,
}

impl rnvme_mpage::BlockIo for WaitOnly {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn lba_size(&self) -> u32 {
        self.inner.lba_size()
    }
    fn max_transfer(&self) -> u32 {
        self.inner.max_transfer()
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn submit(&mut self, req: &rnvme_mpage::IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        self.inner.submit(req, tag)
    }
    fn poll(&mut self, _: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        0
    }
    fn wait(
        &mut self,
        _: std::time::Duration,
        done: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        self.waits += 1;
        self.inner.poll(done)
    }
}

#[test]
fn a_device_that_completes_only_when_waited_on_is_read_through() {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 64).unwrap();
    let mut inner = RecordingDevice::new(pool.clone(), 512, 1 << 20);
    inner.set_fill(DiskFill::Pattern);
    // A short queue: the cache also waits for room to submit.
    inner.set_queue_depth(2);
    let opts = CacheOptions {
        io_timeout: std::time::Duration::from_secs(2),
        ..CacheOptions::default()
    };
    let mut c = PageCache::new(WaitOnly { inner, waits: 0 }, pool, opts).unwrap();
    let pages = 200u64;
    let f = c
        .open(Box::new(Linear::new(4096, 1000, pages)), pages * 4096)
        .unwrap();
    let mut buf = vec![0u8; (pages * 4096) as usize];
    let mut off = 0;
    while off < buf.len() {
        let n = c.read_at(f, off as u64, &mut buf[off..]).unwrap();
        assert!(n > 0);
        off += n;
    }
    assert!(
        buf == disk(1000 * 4096, buf.len()),
        "the file reads as the disk holds it"
    );
    assert!(c.device().waits > 0);
}

/// Reads 1 000 pages one at a time, checking each; returns (read commands, kicks).
fn read_sequentially(c: &mut Cache) -> (u64, u64) {
    let f = linear(c, 1000);
    let mut b = vec![0u8; 4096];
    for p in 0..1000 {
        c.read_at(f, p * 4096, &mut b).unwrap();
        assert_eq!(b, disk((1000 + p) * 4096, 4096), "page {p}");
    }
    c.wait_idle().unwrap();
    assert_eq!(c.device().unkicked(), 0, "a command was never kicked");
    let s = c.stats();
    assert_eq!(c.device().kicks(), s.kicks);
    (s.read_commands, s.kicks)
}

#[test]
fn readahead_windows_go_to_the_device_several_at_once_and_none_is_left_behind() {
    // The device sees a command only once kicked. Windows of 16 pages, 8 in flight: by
    // default up to 4 windows are held for one kick while 4 or more are in flight before
    // them. This device completes all it was told of whenever it is polled, so after each
    // wait of the reader few are in flight, and the next windows go at once.
    let quick = std::time::Duration::from_millis(200);
    let mut c = small_commands(CacheOptions {
        io_timeout: quick,
        ..CacheOptions::default()
    });
    let (commands, batched) = read_sequentially(&mut c);
    assert!(commands >= 1000 / 16, "{commands} commands");
    assert!(
        batched * 4 <= commands * 3,
        "{batched} kicks for {commands} commands"
    );
    // A doorbell for each window when asked: every readahead call kicks (the first ones
    // send several windows each).
    let mut c = small_commands(CacheOptions {
        io_timeout: quick,
        kick_batch: 1,
        ..CacheOptions::default()
    });
    let (commands, kicks) = read_sequentially(&mut c);
    assert!(
        kicks * 10 >= commands * 8 && kicks > batched,
        "{kicks} kicks for {commands} commands"
    );
    // A slow device (one completion per poll): the reader waits on windows, some held, and
    // is never left waiting on a held one alone.
    let mut c = small_commands(CacheOptions {
        io_timeout: quick,
        kick_batch: 4,
        ..CacheOptions::default()
    });
    c.device_mut().set_completions_per_poll(1);
    let (commands, kicks) = read_sequentially(&mut c);
    assert!(kicks < commands, "{kicks} kicks for {commands} commands");
}

#[test]
fn tick_sends_the_readahead_windows_held_back() {
    let mut c = small_commands(CacheOptions::default());
    let f = linear(&mut c, 1000);
    let mut b = vec![0u8; 4096];
    let mut p = 0;
    while c.device().unkicked() == 0 {
        assert!(p < 500, "no window was ever held back");
        c.read_at(f, p * 4096, &mut b).unwrap();
        p += 1;
    }
    let kicks = c.stats().kicks;
    c.tick().unwrap();
    assert_eq!(c.device().unkicked(), 0);
    assert_eq!(c.stats().kicks, kicks + 1);
    // Nothing of the file went missing meanwhile.
    for p in 0..1000 {
        c.read_at(f, p * 4096, &mut b).unwrap();
        assert_eq!(b, disk((1000 + p) * 4096, 4096), "page {p}");
    }
}

#[test]
fn the_time_counters_say_where_a_reader_spent_its_time() {
    let mut c = small_commands(CacheOptions::default());
    let f = linear(&mut c, 64);
    let mut buf = vec![0u8; 64 * 4096];
    assert_eq!(c.read_at(f, 0, &mut buf).unwrap(), buf.len());
    let s = c.stats();
    assert!(
        s.device_wait_ns > 0,
        "a cold read waits for its pages: {s:?}"
    );
    assert!(s.doorbell_ns > 0, "and rings for them: {s:?}");
    assert!(s.copy_out_ns > 0, "and copies them out: {s:?}");
    // Cached now: the same read copies and waits for nothing.
    c.reset_stats();
    assert_eq!(c.read_at(f, 0, &mut buf).unwrap(), buf.len());
    let s = c.stats();
    assert_eq!((s.read_commands, s.device_wait_ns), (0, 0), "{s:?}");
    assert!(s.copy_out_ns > 0, "{s:?}");
    // In place: no copy either.
    c.reset_stats();
    let n = c
        .read_with(f, 0, buf.len(), |_, b| {
            std::hint::black_box(b);
        })
        .unwrap();
    assert_eq!(n, buf.len());
    assert_eq!(
        c.stats(),
        rnvme_mpage::CacheStats::default(),
        "nothing to count"
    );
    // A shared cache's counters are its shards' summed.
    let mut sum = rnvme_mpage::CacheStats {
        copy_out_ns: 5,
        device_wait_ns: 7,
        doorbell_ns: 11,
        ..rnvme_mpage::CacheStats::default()
    };
    let same = sum;
    sum.add(&same);
    assert_eq!(
        (sum.copy_out_ns, sum.device_wait_ns, sum.doorbell_ns),
        (10, 14, 22)
    );
}

#[test]
fn readahead_options_beyond_the_cache_are_capped_by_it() {
    let mut c = small_commands(CacheOptions {
        readahead_max: u64::MAX,
        readahead_depth: u64::MAX,
        capacity: Some(64),
        ..CacheOptions::default()
    });
    let f = linear(&mut c, 256);
    let mut buf = vec![0u8; 256 * 4096];
    assert_eq!(c.read_at(f, 0, &mut buf).unwrap(), buf.len());
    assert_eq!(buf, c.device().read_bytes(1000 * 4096, buf.len()));
    assert!(c.cached_total() <= 64);
}

#[test]
fn a_timeout_taking_frames_leaves_no_page_locked() {
    let mut c = cache(
        4096,
        CacheOptions {
            capacity: Some(8),
            io_timeout: std::time::Duration::from_millis(50),
            ..CacheOptions::default()
        },
    );
    let f = linear(&mut c, 64);
    // Four pages in flight on a device that does not answer, then a read ahead of eight more:
    // four frames are free, the next one must wait for the stalled reads, and times out.
    c.device_mut().set_stalled(true);
    c.readahead(f, 0, 4).unwrap();
    let e = c.readahead(f, 4, 8).unwrap_err();
    assert!(matches!(e, MpageError::Timeout { .. }), "{e}");
    c.device_mut().set_stalled(false);
    c.wait_idle().unwrap();
    let locked: Vec<u64> = c
        .cached_pages(f)
        .unwrap()
        .into_iter()
        .filter(|&p| c.page_state(f, p).unwrap().locked)
        .collect();
    assert!(
        locked.is_empty(),
        "pages locked with no command: {locked:?}"
    );
    // And they read: the pages the failed batch had taken come from the disk.
    let mut b = vec![0u8; 8 * 4096];
    assert_eq!(c.read_at(f, 4 * 4096, &mut b).unwrap(), b.len());
    assert_eq!(b, disk(1004 * 4096, b.len()));
    c.close(f).unwrap();
}

#[test]
fn a_shrink_that_fails_leaves_the_file_as_it_was() {
    // The block holding the new end cannot be read (its page must be read to keep the bytes
    // before the new end): set_len fails, and the data written past the new end is still
    // there, as is the size.
    let mut c = cache(4096, CacheOptions::default());
    let f = linear(&mut c, 3);
    c.write_at(f, 2 * 4096, &[0xAB; 4096]).unwrap();
    c.device_mut().fail_lba(1000);
    assert!(c.set_len(f, 100).is_err());
    c.device_mut().heal_lba(1000);
    assert_eq!(c.file_size(f).unwrap(), 3 * 4096);
    let mut b = vec![0u8; 4096];
    c.read_at(f, 2 * 4096, &mut b).unwrap();
    assert_eq!(b, vec![0xAB; 4096], "the written page survived");
    // A page held in place (its tail cannot be zeroed): the same.
    let held = c.page(f, 0).unwrap().expect("in the file");
    let e = c.set_len(f, 100).unwrap_err();
    assert!(matches!(e, MpageError::PageHeld { .. }), "{e}");
    drop(held);
    assert_eq!(c.file_size(f).unwrap(), 3 * 4096);
    c.read_at(f, 2 * 4096, &mut b).unwrap();
    assert_eq!(b, vec![0xAB; 4096]);
    // Once it can, it shrinks: the bytes past the end are gone, those before kept.
    c.set_len(f, 100).unwrap();
    assert_eq!(c.file_size(f).unwrap(), 100);
    let mut head = vec![0u8; 4096];
    assert_eq!(c.read_at(f, 0, &mut head).unwrap(), 100);
    assert_eq!(&head[..100], &disk(1000 * 4096, 100)[..]);
    c.close(f).unwrap();
}

#[test]
fn pages_and_sizes_past_the_largest_file_are_errors_not_wrong_data() {
    use rnvme_mpage::{MAX_FILE_SIZE, MAX_PAGE};
    let mut c = cache(512, CacheOptions::default());
    let f = c
        .open(Box::new(Linear::new(512, 1000, 64)), 64 * 512)
        .unwrap();
    // 512-byte blocks: a page index times 8 blocks must not wrap round to page 0.
    for p in [MAX_PAGE + 1, 1 << 61, u64::MAX] {
        let e = c.read_page(f, p).unwrap_err();
        assert!(
            matches!(e, MpageError::PageOutOfRange { page } if page == p),
            "{e}"
        );
        let e = c.write_page(f, p, &[1; 4096]).unwrap_err();
        assert!(matches!(e, MpageError::PageOutOfRange { .. }), "{e}");
    }
    let e = c.write_block(f, u64::MAX, &[1; 512]).unwrap_err();
    assert!(matches!(e, MpageError::PageOutOfRange { .. }), "{e}");
    // The last page a file can have is past this one's end: zeros, no I/O, no wrap.
    c.read_page(f, MAX_PAGE).unwrap();
    assert_eq!(c.page_data(f, MAX_PAGE).unwrap(), vec![0u8; 4096]);
    let e = c.write_at(f, MAX_FILE_SIZE - 1, &[1, 2]).unwrap_err();
    assert!(matches!(e, MpageError::Overflow { .. }), "{e}");
    let e = c.set_len(f, MAX_FILE_SIZE + 1).unwrap_err();
    assert!(matches!(e, MpageError::TooLarge { .. }), "{e}");
    let e = c
        .open(Box::new(Linear::new(512, 1000, 64)), u64::MAX)
        .unwrap_err();
    assert!(matches!(e, MpageError::TooLarge { .. }), "{e}");
    assert_eq!(c.file_size(f).unwrap(), 64 * 512, "nothing changed");
    // Explicit readahead stops at the file's end, however far it is asked to go.
    c.readahead(f, 0, u64::MAX).unwrap();
    c.readahead(f, u64::MAX - 1, 5).unwrap();
    c.wait_idle().unwrap();
    let cached = c.cached_pages(f).unwrap();
    assert_eq!(cached, vec![0, 1, 2, 3, 4, 5, 6, 7, MAX_PAGE], "{cached:?}");
    c.close(f).unwrap();
    assert_eq!(c.cached_total(), 0);
}

#[test]
fn an_id_kept_past_its_files_close_names_no_file() {
    let mut c = cache(4096, CacheOptions::default());
    let f = linear(&mut c, 8);
    c.close(f).unwrap();
    // The next file takes the same slot: the old id must not reach it.
    let g = c
        .open(Box::new(Linear::new(4096, 5000, 8)), 8 * 4096)
        .unwrap();
    assert_ne!(f, g);
    let mut b = vec![0u8; 16];
    assert!(matches!(c.read_at(f, 0, &mut b), Err(MpageError::NoSuchFile(x)) if x == f));
    assert!(matches!(
        c.write_at(f, 0, &[1]),
        Err(MpageError::NoSuchFile(_))
    ));
    assert!(matches!(c.set_len(f, 0), Err(MpageError::NoSuchFile(_))));
    assert!(matches!(c.close(f), Err(MpageError::NoSuchFile(_))));
    assert_eq!(
        c.file_size(g).unwrap(),
        8 * 4096,
        "the new file is untouched"
    );
    assert_eq!(c.read_at(g, 0, &mut b).unwrap(), 16);
    assert_eq!(b, disk(5000 * 4096, 16));
    // Shared: the same, across threads' files.
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    let dev = RecordingDevice::new(pool.clone(), 4096, 1 << 30);
    let s = rnvme_mpage::SharedCache::new(
        vec![dev.queue(), dev.queue()],
        pool,
        CacheOptions::default(),
    )
    .unwrap();
    let f = s
        .open_in(1, Box::new(Linear::new(4096, 1000, 8)), 8 * 4096)
        .unwrap();
    s.close(f).unwrap();
    let g = s
        .open_in(1, Box::new(Linear::new(4096, 2000, 8)), 8 * 4096)
        .unwrap();
    assert!(matches!(s.set_len(f, 0), Err(MpageError::NoSuchFile(x)) if x == f));
    assert!(matches!(s.close(f), Err(MpageError::NoSuchFile(_))));
    assert_eq!(s.file_size(g).unwrap(), 8 * 4096);
    s.close(g).unwrap();
}
