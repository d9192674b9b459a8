//! Sequential read of a 64 MiB file through the cache on a device that completes every read
//! at once without moving data, so that what remains is the cache's own work per page: for
//! profiling (`valgrind --tool=callgrind target/release/examples/seqread [in-place]`).
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
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 8192).unwrap();
    let mut c = PageCache::new(Instant(Vec::new()), pool, CacheOptions::default()).unwrap();
    let pages = 16384u64;
    let f = c
        .open(Box::new(Linear::new(4096, 0, pages)), pages * 4096)
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    let mut sum = 0u64;
    while off < pages * 4096 {
        off += if in_place {
            c.read_with(f, off, 1 << 20, |_, b| sum += b[0] as u64)
                .unwrap() as u64
        } else {
            c.read_at(f, off, &mut buf).unwrap() as u64
        };
    }
    println!("{sum} {:?}", c.stats());
}
