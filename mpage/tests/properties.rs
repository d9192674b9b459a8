//! Property tests: random extent maps, holes, flags, block sizes and page sets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use rnvme_driver::dma::{Backing, DmaPool};
use rnvme_driver::hw::MemoryOnly;
use rnvme_mpage::{
    fill_pattern, pattern_byte, BlockMap, CacheOptions, DiskFill, Extent, ExtentMap, FileId, IoOp,
    MapError, Mapping, MpageError, PageCache, PagePool, RecordingDevice, PAGE_SIZE,
};

const INLINE_SEED: u64 = 7;
const PAGE: u64 = PAGE_SIZE as u64;

/// A map shared with the test, to look at it after the cache is done.
#[derive(Clone)]
struct SharedMap(Arc<Mutex<ExtentMap>>);

impl SharedMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExtentMap> {
        self.0.lock().unwrap()
    }
}

impl BlockMap for SharedMap {
    fn block_size(&self) -> u32 {
        self.lock().block_size()
    }
    fn map(&mut self, b: u64, max: u64, create: bool) -> Result<Mapping, MapError> {
        self.lock().map(b, max, create)
    }
    fn read_inline(&mut self, b: u64, dst: &mut [u8]) -> Result<(), MapError> {
        self.lock().read_inline(b, dst)
    }
    fn truncate(&mut self, first: u64) -> Result<(), MapError> {
        self.lock().truncate(first)
    }
}

fn new_cache(lba: u32, max: Option<u32>, opts: CacheOptions) -> PageCache<RecordingDevice> {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    let pool = PagePool::new(&dma, 512).unwrap();
    // Fresh DMA memory is zeroed; garbage in the frames shows any zeroing the cache forgets.
    let frames: Vec<_> = std::iter::from_fn(|| pool.alloc()).collect();
    for &fr in &frames {
        pool.write(fr, 0, &[0xEE; PAGE_SIZE]);
    }
    for fr in frames {
        pool.free(fr);
    }
    let mut dev = RecordingDevice::new(pool.clone(), lba, 1 << 32);
    dev.set_fill(DiskFill::Pattern);
    if let Some(m) = max {
        dev.set_max_transfer(m);
    }
    PageCache::new(dev, pool, opts).unwrap()
}

/// What one file block is.
#[derive(Clone, Debug)]
enum Blk {
    Hole,
    Error,
    /// Mapped; `new_extent` starts an extent `gap` blocks after the previous one on disk.
    Mapped {
        new_extent: bool,
        gap: u64,
        boundary: bool,
        uptodate: bool,
    },
}

fn blk() -> impl Strategy<Value = Blk> {
    prop_oneof![
        3 => Just(Blk::Hole),
        1 => Just(Blk::Error),
        12 => (any::<bool>(), 0u64..3, prop::bool::weighted(0.2), prop::bool::weighted(0.1))
            .prop_map(|(n, gap, boundary, uptodate)| Blk::Mapped { new_extent: n, gap, boundary, uptodate }),
    ]
}

/// Block size and LBA size.
fn geometry() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![
        Just((512, 512)),
        Just((1024, 512)),
        Just((2048, 512)),
        Just((4096, 512)),
        Just((4096, 4096)),
        Just((2048, 2048))
    ]
}

fn max_transfer() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![Just(None), (1u32..=16).prop_map(|p| Some(p * 4096))]
}

/// The extent map of `blocks`, and the disk block of each mapped file block.
fn build(bs: u32, blocks: &[Blk]) -> (ExtentMap, BTreeMap<u64, (u64, bool)>) {
    let mut extents: Vec<Extent> = Vec::new();
    let mut where_ = BTreeMap::new();
    let mut disk = 100u64;
    let mut errors = Vec::new();
    let mut prev_mapped = false;
    for (b, k) in blocks.iter().enumerate() {
        let b = b as u64;
        match *k {
            Blk::Mapped {
                new_extent,
                gap,
                boundary,
                uptodate,
            } => {
                let start =
                    new_extent || !prev_mapped || extents.last().is_some_and(|e| e.boundary);
                if start {
                    disk += gap;
                    extents.push(Extent {
                        file_block: b,
                        disk_block: disk,
                        blocks: 1,
                        boundary,
                        uptodate,
                    });
                } else {
                    let e = extents.last_mut().unwrap();
                    e.blocks += 1;
                    e.boundary = boundary;
                }
                let up = extents.last().unwrap().uptodate;
                where_.insert(b, (disk, up));
                disk += 1;
                prev_mapped = true;
            }
            Blk::Error => {
                errors.push(b);
                prev_mapped = false;
            }
            Blk::Hole => prev_mapped = false,
        }
    }
    let mut m = ExtentMap::with_extents(bs, extents).unwrap();
    for e in errors {
        m.fail_block(e);
    }
    for (&b, &(_, up)) in &where_ {
        if up {
            let mut v = vec![0u8; bs as usize];
            fill_pattern(INLINE_SEED, b * bs as u64, &mut v);
            m.set_inline(b, v);
        }
    }
    (m, where_)
}

#[derive(Clone, Debug)]
enum ReadOp {
    Ahead { start: u64, count: u64 },
    Page(u64),
    At { offset: u64, len: usize },
}

fn read_ops(pages: u64) -> impl Strategy<Value = Vec<ReadOp>> {
    let op = prop_oneof![
        (0..pages + 2, 1..pages + 2).prop_map(|(start, count)| ReadOp::Ahead { start, count }),
        (0..pages + 2).prop_map(ReadOp::Page),
        (0..(pages + 1) * PAGE, 1usize..3 * PAGE_SIZE)
            .prop_map(|(offset, len)| ReadOp::At { offset, len }),
    ];
    prop::collection::vec(op, 1..6)
}

/// The file's byte `off` as the reads must see it (bytes past the end of the file but inside
/// its last block are what the block holds).
fn model_byte(
    bs: u64,
    size: u64,
    blocks: &[Blk],
    where_: &BTreeMap<u64, (u64, bool)>,
    off: u64,
) -> u8 {
    let b = off / bs;
    if b >= size.div_ceil(bs) || b as usize >= blocks.len() {
        return 0;
    }
    match where_.get(&b) {
        Some(&(_, true)) => pattern_byte(INLINE_SEED, off),
        Some(&(d, false)) => pattern_byte(0, d * bs + off % bs),
        None => 0,
    }
}

type ReadCase = ((u32, u32), Option<u32>, Vec<Blk>, u64, Vec<ReadOp>, usize);

fn read_case() -> impl Strategy<Value = ReadCase> {
    (
        geometry(),
        max_transfer(),
        prop::collection::vec(blk(), 1..64),
        prop_oneof![Just(3usize), Just(8), Just(512)],
    )
        .prop_flat_map(|((bs, lba), max, blocks, cap)| {
            let total = blocks.len() as u64 * bs as u64;
            let pages = total.div_ceil(PAGE);
            (
                Just((bs, lba)),
                Just(max),
                Just(blocks),
                0..=total,
                read_ops(pages),
                Just(cap),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reads_see_the_model_file((geo, max, blocks, size, ops, cap) in read_case()) {
        let (bs, lba) = geo;
        let (map, where_) = build(bs, &blocks);
        let mut c = new_cache(lba, max, CacheOptions { capacity: Some(cap), ..CacheOptions::default() });
        let f = c.open(Box::new(map), size).unwrap();
        let bsz = bs as u64;
        let bpp = PAGE / bsz;
        let bad_page = |p: u64| (p * bpp..(p + 1) * bpp).any(|b| b < size.div_ceil(bsz) && matches!(blocks.get(b as usize), Some(Blk::Error)));
        for op in &ops {
            match *op {
                ReadOp::Ahead { start, count } => {
                    c.readahead(f, start, count).unwrap();
                }
                ReadOp::Page(p) => match c.read_page(f, p) {
                    Ok(()) => prop_assert!(!bad_page(p)),
                    Err(MpageError::Read { page, .. }) => prop_assert!(bad_page(page), "page {} failed", page),
                    Err(e) => panic!("{e}"),
                },
                ReadOp::At { offset, len } => {
                    let mut buf = vec![0u8; len];
                    let end = (offset + len as u64).min(size);
                    let touches_bad = offset < size && (offset / PAGE..=(end.max(offset + 1) - 1) / PAGE).any(bad_page);
                    match c.read_at(f, offset, &mut buf) {
                        Ok(n) => {
                            prop_assert!(!touches_bad);
                            prop_assert_eq!(n as u64, end.saturating_sub(offset));
                            for (i, &got) in buf[..n].iter().enumerate() {
                                let off = offset + i as u64;
                                prop_assert_eq!(got, model_byte(bsz, size, &blocks, &where_, off), "byte {}", off);
                            }
                        }
                        Err(MpageError::Read { page, .. }) => prop_assert!(touches_bad && bad_page(page)),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
        c.wait_idle().unwrap();
        // Every cached page: uptodate with the model's bytes, or in error because of a block.
        for p in c.cached_pages(f).unwrap() {
            let s = c.page_state(f, p).unwrap();
            if bad_page(p) {
                prop_assert!(!s.uptodate && s.error.is_some(), "page {} should be in error", p);
                continue;
            }
            prop_assert!(s.uptodate && s.error.is_none(), "page {} {:?}", p, s);
            let data = c.page_data(f, p).unwrap();
            for (i, &got) in data.iter().enumerate() {
                let off = p * PAGE + i as u64;
                prop_assert_eq!(got, model_byte(bsz, size, &blocks, &where_, off), "page {} byte {}", p, i);
            }
        }
        // No LBA read twice, none read that no block maps to, no command too long.
        let lpb = bsz / lba as u64;
        let mapped_lbas: BTreeSet<u64> = where_.values().filter(|(_, up)| !up).flat_map(|&(d, _)| d * lpb..(d + 1) * lpb).collect();
        let mut seen = BTreeSet::new();
        // A page evicted and needed again is read again; otherwise no LBA is read twice.
        let evicted = c.stats().evictions > 0;
        for r in c.device().commands() {
            prop_assert_eq!(r.op, IoOp::Read);
            if let Some(m) = max {
                prop_assert!(r.lbas as u64 * lba as u64 <= m as u64, "{:?}", r);
            }
            for l in r.slba..r.slba + r.lbas as u64 {
                prop_assert!(mapped_lbas.contains(&l), "LBA {} maps to no block", l);
                prop_assert!(seen.insert(l) || evicted, "LBA {} read twice", l);
            }
        }
    }

    #[test]
    fn contiguous_files_use_the_fewest_commands(
        (bs, lba) in geometry(),
        max in max_transfer(),
        pages in 1u64..300,
        short in 0u64..4096,
    ) {
        let size = (pages * PAGE).saturating_sub(short).max(1);
        let blocks = size.div_ceil(bs as u64);
        let map = ExtentMap::with_extents(bs, [Extent::new(0, 5000, blocks)]).unwrap();
        let mut c = new_cache(lba, max, CacheOptions::default());
        let f = c.open(Box::new(map), size).unwrap();
        c.readahead(f, 0, pages).unwrap();
        c.wait_idle().unwrap();
        let data_pages = (blocks * bs as u64).div_ceil(PAGE);
        let per_cmd = max.map_or(u64::MAX, |m| m as u64 / PAGE).min(65536 * lba as u64 / PAGE);
        let s = c.stats();
        prop_assert_eq!(s.commands, data_pages.div_ceil(per_cmd));
        prop_assert_eq!(s.fallback_commands, 0);
        prop_assert_eq!(s.map_calls, 1);
        let total: u64 = c.device().commands().iter().map(|r| r.lbas as u64).sum();
        prop_assert_eq!(total, blocks * (bs / lba) as u64);
    }
}

#[derive(Clone, Debug)]
enum WriteOp {
    At { offset: u64, len: usize, seed: u64 },
    Page { page: u64, seed: u64 },
    Grow(u64),
    Shrink(u64),
    Sync,
}

fn write_ops(span: u64) -> impl Strategy<Value = Vec<WriteOp>> {
    let op = prop_oneof![
        6 => (0..span, 1usize..3 * PAGE_SIZE, 2u64..1000).prop_map(|(offset, len, seed)| WriteOp::At { offset, len, seed }),
        2 => (0..span / PAGE + 2, 2u64..1000).prop_map(|(page, seed)| WriteOp::Page { page, seed }),
        1 => (0..span).prop_map(WriteOp::Grow),
        1 => (0..span).prop_map(WriteOp::Shrink),
        1 => Just(WriteOp::Sync),
    ];
    prop::collection::vec(op, 1..12)
}

type WriteCase = (
    (u32, u32),
    Option<u32>,
    Vec<Blk>,
    u64,
    Vec<WriteOp>,
    usize,
    bool,
);

fn write_case() -> impl Strategy<Value = WriteCase> {
    let blk = prop_oneof![1 => Just(Blk::Hole), 3 => (any::<bool>(), 0u64..3, prop::bool::weighted(0.2))
        .prop_map(|(n, gap, boundary)| Blk::Mapped { new_extent: n, gap, boundary, uptodate: false })];
    (
        geometry(),
        max_transfer(),
        prop::collection::vec(blk, 1..40),
        prop_oneof![Just(4usize), Just(8), Just(512)],
        prop::bool::weighted(0.2),
    )
        .prop_flat_map(|((bs, lba), max, blocks, cap, force)| {
            let total = blocks.len() as u64 * bs as u64;
            (
                Just((bs, lba)),
                Just(max),
                Just(blocks),
                0..=total,
                write_ops(total + 3 * PAGE),
                Just(cap),
                Just(force),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn written_data_reaches_the_mapped_blocks_and_nothing_past_the_end((geo, max, blocks, size0, ops, cap, force) in write_case()) {
        let (bs, lba) = geo;
        let bsz = bs as u64;
        let (mut map, where_) = build(bs, &blocks);
        map.set_allocation_range(10_000..20_000);
        // Blocks mapped beyond the initial end hold no file data.
        map.truncate(size0.div_ceil(bsz)).unwrap();
        let shared = SharedMap(Arc::new(Mutex::new(map)));
        // Background write-back and the dirty limit from the capacity (the defaults), or tiny
        // ones, or none: the cache fills with dirty pages and stalls.
        let (dirty_background, dirty_limit) = match cap % 3 {
            0 => (0, 0),
            1 => (1, 2),
            _ => (usize::MAX, usize::MAX),
        };
        let opts = CacheOptions { capacity: Some(cap), force_per_block: force, dirty_background, dirty_limit, ..CacheOptions::default() };
        let mut c = new_cache(lba, max, opts.clone());
        let f = c.open(Box::new(shared.clone()), size0).unwrap();
        let mut model: Vec<u8> = (0..size0).map(|off| model_byte(bsz, size0, &blocks, &where_, off)).collect();
        let mut checked = 0;
        for op in &ops {
            let size_before = model.len() as u64;
            match *op {
                WriteOp::At { offset, len, seed } => {
                    let mut data = vec![0u8; len];
                    fill_pattern(seed, offset, &mut data);
                    c.write_at(f, offset, &data).unwrap();
                    let end = (offset as usize) + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[offset as usize..end].copy_from_slice(&data);
                }
                WriteOp::Page { page, seed } => {
                    let mut data = vec![0u8; PAGE_SIZE];
                    fill_pattern(seed, page * PAGE, &mut data);
                    c.write_page(f, page, &data).unwrap();
                    let from = (page * PAGE) as usize;
                    if from < model.len() {
                        let to = model.len().min(from + PAGE_SIZE);
                        model[from..to].copy_from_slice(&data[..to - from]);
                    }
                }
                WriteOp::Grow(n) => {
                    if n > model.len() as u64 {
                        c.set_len(f, n).unwrap();
                        model.resize(n as usize, 0);
                    }
                }
                WriteOp::Shrink(n) => {
                    if n < model.len() as u64 {
                        c.set_len(f, n).unwrap();
                        model.truncate(n as usize);
                    }
                }
                WriteOp::Sync => c.sync(f).unwrap(),
            }
            // Writes issued during this operation touched only blocks inside the file (as it
            // was before or after the operation: write-back to make room may run at either).
            let size = size_before.max(model.len() as u64);
            for r in &c.device().commands()[checked..] {
                if r.op != IoOp::Write {
                    continue;
                }
                for (i, seg) in r.segments.iter().enumerate() {
                    let page = if r.fallback { r.pages[0] } else { r.pages[i] };
                    // Frames are page aligned: the IOVA's offset is the offset in the page.
                    let first = page * PAGE + seg.iova.0 % PAGE;
                    let last = first + seg.len as u64 - 1;
                    prop_assert!(last / bsz < size.div_ceil(bsz), "write of bytes {}..={} past the end {}", first, last, size);
                }
            }
            checked = c.device().commands().len();
            // Every change of a page's dirtiness was counted.
            let dirty = c.cached_pages(f).unwrap().into_iter().filter(|&p| c.page_state(f, p).unwrap().dirty).count();
            prop_assert_eq!(c.dirty_pages_total(), dirty);
        }
        c.sync(f).unwrap();
        prop_assert_eq!(c.dirty_pages(f).unwrap(), 0);
        let size = model.len() as u64;
        prop_assert_eq!(c.file_size(f).unwrap(), size);
        // The disk holds the file in the mapped blocks; unmapped blocks are zeros in the file.
        {
            let m = shared.lock();
            for b in 0..size.div_ceil(bsz) {
                let from = (b * bsz) as usize;
                let to = model.len().min(from + bs as usize);
                match m.lookup(b) {
                    Some(d) => {
                        let got = c.device().read_bytes(d * bsz, to - from);
                        prop_assert_eq!(&got[..], &model[from..to], "block {} at disk block {}", b, d);
                    }
                    None => prop_assert!(model[from..to].iter().all(|&x| x == 0), "block {} unmapped but not zero", b),
                }
            }
        }
        // The block holding the end, if the cache wrote it, has zeros past the end on disk.
        if !size.is_multiple_of(bsz) {
            let last = size / bsz;
            if let Some(d) = shared.lock().lookup(last) {
                let lpb = bsz / lba as u64;
                if c.device().written_lbas().contains(&(d * lpb)) {
                    let tail = c.device().read_bytes(d * bsz + size % bsz, (bsz - size % bsz) as usize);
                    prop_assert!(tail.iter().all(|&x| x == 0), "disk block {} has data past the end", d);
                }
            }
        }
        // Read back through this cache, and through a fresh one over the same disk and map.
        let mut got = vec![0u8; model.len()];
        prop_assert_eq!(c.read_at(f, 0, &mut got).unwrap(), model.len());
        prop_assert!(got == model, "read back through the cache differs");
        let pool = c.pool().clone();
        let spare = RecordingDevice::new(pool.clone(), lba, 1);
        let dev = std::mem::replace(c.device_mut(), spare);
        drop(c);
        let mut fresh = PageCache::new(dev, pool, CacheOptions::default()).unwrap();
        let g = fresh.open(Box::new(shared.clone()), size).unwrap();
        let mut again = vec![0u8; model.len()];
        prop_assert_eq!(fresh.read_at(g, 0, &mut again).unwrap(), model.len());
        prop_assert!(again == model, "read back from the disk differs");
        let _: FileId = g;
    }
}
