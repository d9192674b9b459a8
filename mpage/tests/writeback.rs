//! Write-back on its own: background write-back past a threshold, writers throttled at the
//! dirty limit instead of the cache stalling on every dirty page, expiry of old dirty pages,
//! and `sync_range`.

use std::sync::Arc;
use std::time::Duration;

use rnvme_driver::dma::{Backing, DmaPool};
use rnvme_driver::hw::MemoryOnly;
use rnvme_mpage::{
    CacheOptions, DiskFill, FileId, IoOp, Linear, MpageError, PageCache, PagePool, RecordingDevice,
};

type Cache = PageCache<RecordingDevice>;

/// Write-back only when asked (or when the cache runs short), nothing expires.
fn manual() -> CacheOptions {
    CacheOptions {
        dirty_background: usize::MAX,
        dirty_limit: usize::MAX,
        dirty_expire: Duration::from_secs(3600),
        ..CacheOptions::default()
    }
}

fn cache_on(opts: CacheOptions, set: impl FnOnce(&mut RecordingDevice)) -> Cache {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), 4096, 1 << 30);
    dev.set_fill(DiskFill::Pattern);
    set(&mut dev);
    PageCache::new(dev, pool, opts).unwrap()
}

fn cache(opts: CacheOptions) -> Cache {
    cache_on(opts, |_| {})
}

/// A device that holds 4 commands of at most 8 pages and completes one per poll: write-back
/// takes many polls, as on hardware.
fn slow_cache(opts: CacheOptions) -> Cache {
    cache_on(opts, |dev| {
        dev.set_max_transfer(8 * 4096);
        dev.set_queue_depth(4);
        dev.set_completions_per_poll(1);
    })
}

/// A file of `pages` pages at LBA 1000 onwards.
fn linear(c: &mut Cache, pages: u64) -> FileId {
    c.open(Box::new(Linear::new(4096, 1000, pages)), pages * 4096)
        .unwrap()
}

fn page_of(p: u64) -> Vec<u8> {
    vec![p as u8 ^ 0xA5; 4096]
}

fn writes(c: &Cache) -> Vec<(u64, u32)> {
    c.device()
        .commands()
        .iter()
        .filter(|r| r.op == IoOp::Write)
        .map(|r| (r.slba, r.lbas))
        .collect()
}

fn count_dirty(c: &Cache, f: FileId) -> usize {
    c.cached_pages(f)
        .unwrap()
        .into_iter()
        .filter(|&p| c.page_state(f, p).unwrap().dirty)
        .count()
}

#[test]
fn past_the_background_threshold_writers_start_write_back_without_waiting() {
    let opts = CacheOptions {
        dirty_background: 8,
        ..manual()
    };
    let mut c = cache(opts);
    let f = linear(&mut c, 64);
    for p in 0..9 {
        c.write_at(f, p * 4096, &page_of(p)).unwrap();
    }
    assert!(
        writes(&c).is_empty(),
        "at the threshold nothing is written yet"
    );
    // The 10th page finds 9 dirty, one past the threshold: the 9 go out as one command, and
    // the writer does not wait for it.
    c.write_at(f, 9 * 4096, &page_of(9)).unwrap();
    assert_eq!(writes(&c), vec![(1000, 9)]);
    assert_eq!(c.stats().background_writebacks, 9);
    assert_eq!(
        c.outstanding(),
        1,
        "the writer did not wait for its completion"
    );
    c.wait_idle().unwrap();
    assert_eq!(c.dirty_pages(f).unwrap(), 1);
    assert_eq!(c.dirty_pages_total(), 1);
    assert_eq!(c.device().read_bytes(1003 * 4096, 4096), page_of(3));
    // The next pass starts where this one stopped: page 9 onwards, not page 0 again.
    for p in 10..19 {
        c.write_at(f, p * 4096, &page_of(p)).unwrap();
    }
    assert_eq!(writes(&c), vec![(1000, 9), (1009, 9)]);
    c.sync(f).unwrap();
    for p in 0..19 {
        assert_eq!(c.device().read_bytes((1000 + p) * 4096, 4096), page_of(p));
    }
    assert_eq!(c.stats().writeback_stalls, 0);
}

#[test]
fn the_oldest_dirty_file_is_written_back_first() {
    let opts = CacheOptions {
        dirty_background: 4,
        ..manual()
    };
    let mut c = cache(opts);
    let old = linear(&mut c, 16);
    let new = c
        .open(Box::new(Linear::new(4096, 5000, 16)), 16 * 4096)
        .unwrap();
    c.write_at(old, 0, &page_of(0)).unwrap();
    for p in 0..4 {
        c.write_at(new, p * 4096, &page_of(p)).unwrap();
    }
    // Five dirty, one over: the older file (one page) goes first, then the newer one.
    c.write_at(new, 4 * 4096, &page_of(4)).unwrap();
    assert_eq!(writes(&c), vec![(1000, 1), (5000, 4)]);
    c.wait_idle().unwrap();
    assert_eq!(c.dirty_pages(old).unwrap(), 0);
    assert_eq!(c.dirty_pages(new).unwrap(), 1);
}

/// Write `pages` pages one by one, returning the most pages dirty at once.
fn write_all(c: &mut Cache, f: FileId, pages: u64) -> usize {
    let mut most = 0;
    for p in 0..pages {
        c.write_at(f, p * 4096, &page_of(p)).unwrap();
        most = most.max(c.dirty_pages_total());
        assert_eq!(
            c.dirty_pages_total(),
            count_dirty(c, f),
            "dirty pages miscounted"
        );
    }
    most
}

#[test]
fn at_the_dirty_limit_writers_are_throttled_instead_of_the_cache_stalling() {
    // 64 pages of cache, 300 pages written. Without a limit the cache fills with dirty pages
    // and each time waits for all of them; with one, writers wait for a few commands each
    // time and the dirty pages never pass the limit.
    let unlimited = CacheOptions {
        capacity: Some(64),
        ..manual()
    };
    let mut c = slow_cache(unlimited);
    let f = linear(&mut c, 300);
    let most = write_all(&mut c, f, 300);
    let s = c.stats();
    assert_eq!(most, 64);
    assert!(s.writeback_stalls >= 4, "{s:?}");
    assert_eq!(s.throttled, 0);

    let limited = CacheOptions {
        capacity: Some(64),
        dirty_limit: 24,
        ..manual()
    };
    let mut c = slow_cache(limited);
    let f = linear(&mut c, 300);
    let most = write_all(&mut c, f, 300);
    let s = c.stats();
    assert!(most <= 24, "{most} pages dirty at once, limit 24");
    assert_eq!(s.writeback_stalls, 0, "{s:?}");
    assert!(s.throttled > 0, "{s:?}");
    c.sync(f).unwrap();
    for p in 0..300 {
        assert_eq!(c.device().read_bytes((1000 + p) * 4096, 4096), page_of(p));
    }
}

#[test]
fn the_default_thresholds_follow_the_capacity() {
    let c = cache(CacheOptions {
        capacity: Some(400),
        ..CacheOptions::default()
    });
    assert_eq!(c.dirty_thresholds(), (100, 200));
}

#[test]
fn a_throttled_writer_on_a_failing_device_goes_on_and_sync_reports_the_failure() {
    let opts = CacheOptions {
        dirty_limit: 8,
        ..manual()
    };
    let mut c = slow_cache(opts);
    let f = linear(&mut c, 32);
    for lba in 1000..1032 {
        c.device_mut().fail_lba(lba);
    }
    // Every write-back fails and leaves its pages dirty: the writer is not held for ever.
    for p in 0..32 {
        c.write_at(f, p * 4096, &page_of(p)).unwrap();
    }
    assert_eq!(c.dirty_pages(f).unwrap(), 32);
    assert!(c.stats().throttled > 0);
    assert!(matches!(c.sync(f), Err(MpageError::Write { .. })));
    assert_eq!(c.dirty_pages(f).unwrap(), 32, "failed pages stay dirty");
}

#[test]
fn dirty_pages_past_the_expiry_are_written_back_by_tick_and_by_writers() {
    // Nothing expires within an hour: tick writes nothing.
    let mut c = cache(CacheOptions {
        writeback_interval: Duration::ZERO,
        ..manual()
    });
    let f = linear(&mut c, 16);
    c.write_at(f, 0, &page_of(0)).unwrap();
    assert_eq!(c.tick().unwrap(), 0);
    assert!(writes(&c).is_empty());

    // Everything expires at once.
    let expiring = CacheOptions {
        dirty_expire: Duration::ZERO,
        writeback_interval: Duration::ZERO,
        ..manual()
    };
    let mut c = cache(expiring);
    let f = linear(&mut c, 16);
    c.write_at(f, 0, &page_of(0)).unwrap();
    assert!(writes(&c).is_empty(), "nothing was dirty before");
    // A writer about to dirty a page writes the expired ones first.
    c.write_at(f, 4096, &page_of(1)).unwrap();
    assert_eq!(writes(&c), vec![(1000, 1)]);
    // Tick reaps that completion and writes page 1 back.
    assert_eq!(c.tick().unwrap(), 1);
    assert_eq!(writes(&c), vec![(1000, 1), (1001, 1)]);
    assert_eq!(c.tick().unwrap(), 0, "nothing left to write");
    assert_eq!(c.dirty_pages(f).unwrap(), 0);
    assert_eq!(c.stats().expired_writebacks, 2);
    assert_eq!(c.device().read_bytes(1001 * 4096, 4096), page_of(1));
}

#[test]
fn a_page_dirtied_before_the_expiry_waits_for_it() {
    let mut c = cache(CacheOptions {
        dirty_expire: Duration::from_millis(200),
        writeback_interval: Duration::ZERO,
        ..manual()
    });
    let f = linear(&mut c, 16);
    c.write_at(f, 0, &page_of(0)).unwrap();
    assert_eq!(c.tick().unwrap(), 0, "younger than the expiry");
    std::thread::sleep(Duration::from_millis(250));
    c.write_at(f, 4096, &page_of(1)).unwrap();
    // Page 0 expired and went out; page 1 is new and stays.
    assert_eq!(writes(&c), vec![(1000, 1)]);
    c.wait_idle().unwrap();
    assert_eq!(c.dirty_pages(f).unwrap(), 1);
}

#[test]
fn sync_range_writes_and_waits_for_just_its_pages_without_a_flush() {
    let mut c = cache(manual());
    let f = linear(&mut c, 16);
    for p in 0..8 {
        c.write_at(f, p * 4096, &page_of(p)).unwrap();
    }
    // Bytes 2.5 pages to 4.5 pages: pages 2, 3 and 4.
    c.sync_range(f, 2 * 4096 + 2048, 2 * 4096).unwrap();
    let cmds = c.device().commands();
    assert_eq!(writes(&c), vec![(1002, 3)]);
    assert!(cmds.iter().all(|r| r.op != IoOp::Flush), "no Flush");
    assert_eq!(c.outstanding(), 0, "waited for");
    for p in 0..8 {
        let dirty = c.page_state(f, p).unwrap().dirty;
        assert_eq!(dirty, !(2..=4).contains(&p), "page {p}");
    }
    assert_eq!(c.device().read_bytes(1003 * 4096, 4096), page_of(3));
    c.sync_range(f, 0, 0).unwrap();
    assert_eq!(writes(&c).len(), 1, "an empty range writes nothing");
    assert!(matches!(
        c.sync_range(f, u64::MAX - 10, 100),
        Err(MpageError::Overflow { .. })
    ));
}

#[test]
fn sync_range_reports_a_failed_page_in_its_range_only() {
    let mut c = cache(manual());
    let f = linear(&mut c, 16);
    for p in 0..8 {
        c.write_at(f, p * 4096, &page_of(p)).unwrap();
    }
    c.device_mut().fail_lba(1006);
    match c.sync_range(f, 4 * 4096, 4 * 4096) {
        Err(MpageError::Write { page, .. }) => assert_eq!(page, 4, "first page of the command"),
        other => panic!("{other:?}"),
    }
    assert!(
        c.page_state(f, 6).unwrap().dirty,
        "a failed page stays dirty"
    );
    // Pages elsewhere are fine, and the failure is not reported for them.
    c.sync_range(f, 0, 4 * 4096).unwrap();
    c.device_mut().heal_lba(1006);
    // Once the device recovers, the range goes through.
    c.sync_range(f, 4 * 4096, 4 * 4096).unwrap();
    c.sync(f).unwrap();
    assert_eq!(c.dirty_pages(f).unwrap(), 0);
}

#[test]
fn a_shared_cache_ticks_every_shard_and_syncs_ranges() {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    let dev = RecordingDevice::new(pool.clone(), 4096, 1 << 30);
    let opts = CacheOptions {
        dirty_expire: Duration::ZERO,
        writeback_interval: Duration::ZERO,
        ..manual()
    };
    let cache = rnvme_mpage::SharedCache::new(vec![dev.queue(), dev.queue()], pool, opts).unwrap();
    let a = cache
        .open_in(0, Box::new(Linear::new(4096, 1000, 8)), 8 * 4096)
        .unwrap();
    let b = cache
        .open_in(1, Box::new(Linear::new(4096, 2000, 8)), 8 * 4096)
        .unwrap();
    cache.write_at(a, 0, &page_of(0)).unwrap();
    cache.write_at(b, 0, &page_of(1)).unwrap();
    cache.write_at(b, 4096, &page_of(2)).unwrap();
    // b's first page went out on b's second write (it had expired); the tick takes a's page
    // and b's second.
    assert_eq!(cache.tick().unwrap(), 2);
    cache.tick().unwrap();
    assert_eq!(cache.unsynced_pages().unwrap(), 0);
    cache.write_at(a, 4096, &page_of(3)).unwrap();
    cache.sync_range(a, 4096, 4096).unwrap();
    assert_eq!(cache.dirty_pages(a).unwrap(), 0);
    assert_eq!(dev.read_bytes(1001 * 4096, 4096), page_of(3));
}
