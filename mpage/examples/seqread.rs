//! Sequential read of a 64 MiB file through the cache on a device that completes every read
//! at once without moving data, so that what remains is the cache's own work per page: for
//! profiling (`LOOPS=N target/release/examples/seqread [in-place]` under `perf` or callgrind,
//! or in a guest with `rnvme vm run --bin`).
use std::sync::Arc;

use rnvme_driver::dma::{Backing, DmaPool};
use rnvme_driver::hw::MemoryOnly;
use rnvme_mpage::{BlockIo, CacheOptions, IoError, IoRequest, Linear, PageCache, PagePool};

/// Completes everything at the next poll; moves no data.
struct Instant(Vec<u64>);

impl BlockIo for Instant {
    fn name(&self) -> &str {
        "instant"
    }
    fn lba_size(&self) -> u32 {
        4096
    }
    fn max_transfer(&self) -> u32 {
        512 << 10
    }
    fn queue_depth(&self) -> usize {
        256
    }
    fn submit(&mut self, _: &IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        self.0.push(tag);
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        let n = self.0.len();
        for tag in self.0.drain(..) {
            done(tag, Ok(()));
        }
        n
    }
}

fn main() {
    let in_place = std::env::args().nth(1).as_deref() == Some("in-place");
    let loops: u32 = std::env::var("LOOPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 8192).unwrap();
    let mut c = PageCache::new(Instant(Vec::new()), pool, CacheOptions::default()).unwrap();
    let pages = 16384u64;
    let mut buf = vec![0u8; 1 << 20];
    let (mut sum, mut runs) = (0u64, 0u64);
    let mut hist = std::collections::BTreeMap::new();
    let mut busy = std::time::Duration::ZERO;
    // Each loop opens the file afresh (a cold cache, as `rnvme mpage bench` does); the close
    // is not timed.
    for _ in 0..loops {
        let t = rnvme_driver::clock::Stopwatch::start();
        let f = c
            .open(Box::new(Linear::new(4096, 0, pages)), pages * 4096)
            .unwrap();
        let mut off = 0;
        while off < pages * 4096 {
            off += if in_place {
                c.read_with(f, off, 1 << 20, |_, b| {
                    sum += b[0] as u64;
                    runs += 1;
                    *hist.entry(b.len() / 4096).or_insert(0u64) += 1;
                })
                .unwrap() as u64
            } else {
                c.read_at(f, off, &mut buf).unwrap() as u64
            };
        }
        busy += t.elapsed();
        c.close(f).unwrap();
        if std::env::var("HIST").is_ok() {
            println!("{hist:?}");
            hist.clear();
        }
    }
    let per_page = busy.as_nanos() as f64 / (loops as f64 * pages as f64);
    println!("{per_page:.1} ns per page, {runs} runs in place, checksum {sum}");
}
