//! The page cache shared by threads: several threads reading and writing the same files at
//! once, checked against what each of them wrote.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rnvme_driver::dma::{Backing, DmaPool};
use rnvme_driver::hw::MemoryOnly;
use rnvme_mpage::{
    pattern_byte, CacheOptions, DiskFill, FileId, Linear, MpageError, PagePool, RecordingDevice,
    SharedCache,
};

const THREADS: usize = 4;
const FILES: usize = 4;
/// Pages per file.
const PAGES: u64 = 96;
/// Bytes each thread owns in every stripe: every page holds pieces of every thread.
const PIECE: usize = 64;
const STRIPE: usize = PIECE * THREADS;

fn setup(shards: usize, capacity: usize) -> (SharedCache<RecordingDevice>, RecordingDevice) {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 1024).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), 512, 1 << 20);
    dev.set_fill(DiskFill::Pattern);
    dev.set_max_transfer(32 << 10);
    dev.set_queue_depth(8);
    let queues = (0..shards).map(|_| dev.queue()).collect();
    let opts = CacheOptions {
        capacity: Some(capacity),
        ..CacheOptions::default()
    };
    (SharedCache::new(queues, pool, opts).unwrap(), dev)
}

fn open_files(c: &SharedCache<RecordingDevice>) -> Vec<FileId> {
    (0..FILES as u64)
        .map(|i| {
            let map = Linear::new(4096, 1000 + i * 200, PAGES);
            c.open(Box::new(map), PAGES * 4096).unwrap()
        })
        .collect()
}

/// What thread `t` writes in stripe `s` of file `f`, version `v`: each byte says who, where
/// and which version, so a torn or lost piece shows.
fn piece(t: usize, f: usize, s: usize, v: u32) -> [u8; PIECE] {
    let mut b = [0u8; PIECE];
    b[0] = t as u8;
    b[1] = f as u8;
    b[2..6].copy_from_slice(&(s as u32).to_le_bytes());
    b[6..10].copy_from_slice(&v.to_le_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(10) {
        *x = (t as u8) ^ (v as u8).wrapping_mul(31) ^ (i as u8);
    }
    b
}

/// The version a piece read back holds: None for the disk's original data, a panic for a
/// piece that is neither the original nor a whole version written by its owner.
fn version_of(got: &[u8], t: usize, f: usize, s: usize, original: &[u8]) -> Option<u32> {
    if got == original {
        return None;
    }
    let v = u32::from_le_bytes(got[6..10].try_into().unwrap());
    assert_eq!(
        got,
        piece(t, f, s, v),
        "file {f} stripe {s} of thread {t}: torn or foreign data"
    );
    Some(v)
}

fn original(f: usize, off: u64) -> Vec<u8> {
    disk_bytes((1000 + f as u64 * 200) * 4096 + off, PIECE)
}

/// A small xorshift generator: each thread's sequence of operations is fixed by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn shared_cache_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SharedCache<RecordingDevice>>();
}

#[test]
fn threads_writing_pieces_of_the_same_pages_lose_nothing() {
    // 2 shards, 4 files, 4 threads writing interleaved 64-byte pieces of every page and
    // reading everything back, in a cache of 2 × 48 pages for 4 × 96 pages of files: pages
    // are evicted, written back and read again while other threads work on them.
    let (cache, dev) = setup(2, 96);
    let files = open_files(&cache);
    let stripes = PAGES as usize * 4096 / STRIPE;
    let last: Vec<Vec<Vec<Option<u32>>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, files) = (&cache, &files);
                sc.spawn(move || {
                    let mut rng = Rng(0x9E37_79B9 * (t as u64 + 1));
                    // What this thread last wrote, and last saw of the others.
                    let mut mine = vec![vec![None; stripes]; FILES];
                    let mut seen = vec![vec![vec![None; stripes]; FILES]; THREADS];
                    let mut version = 0u32;
                    for _ in 0..1500 {
                        let f = rng.below(FILES as u64) as usize;
                        let s = rng.below(stripes as u64) as usize;
                        match rng.below(50) {
                            0..=24 => {
                                version += 1;
                                let off = (s * STRIPE + t * PIECE) as u64;
                                let data = piece(t, f, s, version);
                                cache.write_at(files[f], off, &data).unwrap();
                                mine[f][s] = Some(version);
                            }
                            25..=48 => {
                                // A whole stripe: every thread's piece of it.
                                let mut buf = vec![0u8; STRIPE];
                                let off = (s * STRIPE) as u64;
                                cache.read_at(files[f], off, &mut buf).unwrap();
                                for (o, got) in buf.chunks(PIECE).enumerate() {
                                    let at = off + (o * PIECE) as u64;
                                    let v = version_of(got, o, f, s, &original(f, at));
                                    if o == t {
                                        assert_eq!(v, mine[f][s], "read my own last write");
                                    } else {
                                        assert!(
                                            v >= seen[o][f][s],
                                            "thread {o}'s piece went back in time"
                                        );
                                        seen[o][f][s] = v;
                                    }
                                }
                            }
                            _ => cache.sync(files[f]).unwrap(),
                        }
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for &f in &files {
        cache.sync(f).unwrap();
    }
    let stats = cache.stats().unwrap();
    assert!(
        stats.evictions > 0 && stats.writebacks + stats.background_writebacks > 0,
        "{stats:?}"
    );
    drop(cache);
    // What reached the disk is every thread's last write, nothing older.
    for (t, files_of_t) in last.iter().enumerate() {
        for (f, stripes_of_f) in files_of_t.iter().enumerate() {
            for (s, v) in stripes_of_f.iter().enumerate() {
                let off = (s * STRIPE + t * PIECE) as u64;
                let disk = (1000 + f as u64 * 200) * 4096 + off;
                let got = dev.read_bytes(disk, PIECE);
                assert_eq!(version_of(&got, t, f, s, &original(f, off)), *v);
            }
        }
    }
}

#[test]
fn a_busy_shard_does_not_hold_up_the_others() {
    let (cache, _dev) = setup(2, 64);
    let a = cache
        .open_in(0, Box::new(Linear::new(4096, 1000, 16)), 16 * 4096)
        .unwrap();
    let b = cache
        .open_in(1, Box::new(Linear::new(4096, 2000, 16)), 16 * 4096)
        .unwrap();
    assert_eq!(
        (cache.shard_of(a).unwrap(), cache.shard_of(b).unwrap()),
        (0, 1)
    );
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|sc| {
        let cache = &cache;
        // Shard 0 stays locked until the other thread has read from shard 1.
        let holder = sc.spawn(move || {
            cache.with_file(a, |_, _| {
                Ok(done_rx.recv_timeout(Duration::from_secs(20)).is_ok())
            })
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = vec![0u8; 8192];
        cache.read_at(b, 4096, &mut buf).unwrap();
        assert_eq!(buf[..16], disk_bytes(2001 * 4096, 16)[..]);
        done_tx.send(()).unwrap();
        assert!(
            holder.join().unwrap().unwrap(),
            "shard 1 was read while shard 0 was held"
        );
    });
}

/// The disk's original bytes at byte `disk`.
fn disk_bytes(disk: u64, n: usize) -> Vec<u8> {
    (0..n as u64).map(|i| pattern_byte(0, disk + i)).collect()
}

#[test]
fn files_spread_over_shards_and_errors_name_the_callers_file() {
    let (cache, _dev) = setup(3, 90);
    let files = open_files(&cache);
    let mut shards: Vec<usize> = files.iter().map(|&f| cache.shard_of(f).unwrap()).collect();
    shards.sort_unstable();
    assert_eq!(shards, [0, 0, 1, 2], "the fewest open files first");
    cache.close(files[3]).unwrap();
    match cache.read_at(files[3], 0, &mut [0u8; 1]) {
        Err(MpageError::NoSuchFile(f)) => assert_eq!(f, files[3]),
        other => panic!("{other:?}"),
    }
    let e = cache.open_in(3, Box::new(Linear::new(4096, 0, 1)), 4096);
    assert!(matches!(e, Err(MpageError::Shards { .. })), "{e:?}");
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    let e = SharedCache::<RecordingDevice>::new(Vec::new(), pool, CacheOptions::default());
    assert!(matches!(e, Err(MpageError::Shards { given: 0, .. })));
}

#[test]
fn a_thread_that_panics_in_a_shard_leaves_it_refused_and_the_others_working() {
    let (cache, _dev) = setup(2, 64);
    let a = cache
        .open_in(0, Box::new(Linear::new(4096, 1000, 16)), 16 * 4096)
        .unwrap();
    let b = cache
        .open_in(1, Box::new(Linear::new(4096, 2000, 16)), 16 * 4096)
        .unwrap();
    std::thread::scope(|s| {
        let r = s
            .spawn(|| cache.with_file(a, |_, _| -> Result<(), MpageError> { panic!("boom") }))
            .join();
        assert!(r.is_err(), "the thread panicked");
    });
    let mut buf = [0u8; 16];
    match cache.read_at(a, 0, &mut buf) {
        Err(MpageError::Poisoned { shard: 0 }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        cache.stats(),
        Err(MpageError::Poisoned { shard: 0 })
    ));
    cache.read_at(b, 4096, &mut buf).unwrap();
    assert_eq!(buf[..], disk_bytes(2001 * 4096, 16)[..]);
}

#[test]
fn shutdown_writes_back_every_shard_and_closes_its_files() {
    let (c, dev) = setup(2, 64);
    let files = open_files(&c);
    for (i, &f) in files.iter().enumerate() {
        c.write_at(f, 4096, &[i as u8 + 1; 4096]).unwrap();
    }
    assert_eq!(c.unsynced_pages().unwrap(), FILES);
    c.shutdown().unwrap();
    assert_eq!(c.unsynced_pages().unwrap(), 0);
    for (i, &f) in files.iter().enumerate() {
        assert!(c.dirty_pages(f).is_err(), "file {i} was closed");
        // Page 1 of file i: 8 LBAs of 512 bytes from its start.
        let disk = (1000 + i as u64 * 200 + 1) * 4096;
        assert_eq!(dev.read_bytes(disk, 4096), vec![i as u8 + 1; 4096]);
    }
}
