//! Sequential read of a 64 MiB file through the cache on a recording device, for profiling
//! the cache's per-page work (`valgrind --tool=callgrind`).
use std::sync::Arc;

use rnvme_driver::dma::{Backing, DmaPool};
use rnvme_driver::hw::MemoryOnly;
use rnvme_mpage::{CacheOptions, DiskFill, Linear, PageCache, PagePool, RecordingDevice};

fn main() {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 16384).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), 4096, 1 << 16);
    dev.set_fill(DiskFill::Zeros);
    dev.set_max_transfer(512 << 10);
    let mut c = PageCache::new(dev, pool, CacheOptions::default()).unwrap();
    let pages = 16384u64;
    let f = c
        .open(Box::new(Linear::new(4096, 0, pages)), pages * 4096)
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < pages * 4096 {
        off += c.read_at(f, off, &mut buf).unwrap() as u64;
    }
    println!("{:?}", c.stats());
}
