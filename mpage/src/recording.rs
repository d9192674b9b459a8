//! A recording device: an in-memory disk that executes commands the way a controller would
//! (walking the PRP entries and copying through the page pool), and records each of them.
//!
//! It is the stand-in for hardware in tests and in `rnvme mpage trace`: it can be told to fail
//! chosen LBAs, to complete only a few commands per poll, and to hold only a few commands at
//! once, so the cache's asynchronous paths run as they would on a device.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rnvme_driver::prp::{build_prp, ListPages};
use rnvme_driver::{Iova, NvmeStatus, Segment};

use crate::backend::{BlockIo, IoError, IoOp, IoRequest};
use crate::map::{BlockMap, MapError, Mapping};
use crate::pool::{PagePool, PAGE_SIZE};

/// The NVMe limit on LBAs in one command.
pub const MAX_LBAS_PER_COMMAND: u32 = 65536;

/// A deterministic byte pattern: byte `offset` of the stream numbered `seed`.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let mut x = (offset / 8) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^= x >> 33;
    (x >> ((offset % 8) * 8)) as u8
}

/// Fill `buf` with the pattern `seed` starting at byte `offset`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, offset + i as u64);
    }
}

/// What never-written LBAs hold.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DiskFill {
    /// Zeros.
    Zeros,
    /// [`pattern_byte`] with seed 0 at the LBA's byte address.
    Pattern,
}

/// One command as the device received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRecord {
    /// What it did.
    pub op: IoOp,
    /// First LBA.
    pub slba: u64,
    /// LBAs.
    pub lbas: u32,
    /// Data pointers used: PRP1, PRP2 when it points at data, and PRP list entries.
    pub prps: u32,
    /// PRP list pages used.
    pub list_pages: u32,
    /// The file pages it carried.
    pub pages: Vec<u64>,
    /// Whether it was a per-block (fallback) command.
    pub fallback: bool,
    /// The memory as the cache described it.
    pub segments: Vec<Segment>,
    /// The data pointers as the device walked them: (IOVA, bytes).
    pub data: Vec<(Iova, u32)>,
}

/// Something that happened during a trace, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// A call of the block map.
    Map {
        file_block: u64,
        max_blocks: u64,
        create: bool,
        result: Result<Mapping, MapError>,
    },
    /// A command was submitted: index into the device's records.
    Command(usize),
}

/// A shared, ordered log of map calls and submissions.
pub type EventLog = Arc<Mutex<Vec<TraceEvent>>>;

fn push_event(log: &EventLog, e: TraceEvent) {
    log.lock().unwrap_or_else(|p| p.into_inner()).push(e);
}

/// A block map that logs every call into an [`EventLog`].
pub struct LoggedMap<M> {
    inner: M,
    log: EventLog,
}

impl<M: BlockMap> LoggedMap<M> {
    /// Log the calls of `inner` into `log`.
    pub fn new(inner: M, log: EventLog) -> LoggedMap<M> {
        LoggedMap { inner, log }
    }
}

impl<M: BlockMap> BlockMap for LoggedMap<M> {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn map(&mut self, file_block: u64, max_blocks: u64, create: bool) -> Result<Mapping, MapError> {
        let result = self.inner.map(file_block, max_blocks, create);
        push_event(
            &self.log,
            TraceEvent::Map {
                file_block,
                max_blocks,
                create,
                result: result.clone(),
            },
        );
        result
    }
    fn read_inline(&mut self, file_block: u64, dst: &mut [u8]) -> Result<(), MapError> {
        self.inner.read_inline(file_block, dst)
    }
    fn truncate(&mut self, first_block: u64) -> Result<(), MapError> {
        self.inner.truncate(first_block)
    }
}

/// PRP entries used, list pages used, and the data pages as (IOVA, bytes).
type Walked = (u32, u32, Vec<(Iova, u32)>);

struct Queued {
    tag: u64,
    record: usize,
}

/// PRP list pages kept in ordinary memory at IOVAs no frame uses.
struct ShadowLists {
    pages: Vec<[u64; PAGE_SIZE / 8]>,
}

const LIST_BASE: u64 = 0x7ff0_0000_0000_0000;

impl ListPages for ShadowLists {
    fn page_iova(&mut self, page: usize) -> Option<Iova> {
        while self.pages.len() <= page {
            self.pages.push([0; PAGE_SIZE / 8]);
        }
        Some(Iova(LIST_BASE + (page * PAGE_SIZE) as u64))
    }
    fn write_qword(&mut self, page: usize, index: usize, value: u64) {
        self.pages[page][index] = value;
    }
}

impl ShadowLists {
    fn read(&self, iova: u64, index: usize) -> Result<u64, String> {
        let page = iova
            .checked_sub(LIST_BASE)
            .map(|o| o as usize / PAGE_SIZE)
            .filter(|&p| p < self.pages.len());
        page.map(|p| self.pages[p][index])
            .ok_or_else(|| format!("PRP list pointer {iova:#x} leads nowhere"))
    }
}

/// Walk PRP1/PRP2/lists like a controller: the (address, length) of every data page.
fn walk_prps(
    prp1: u64,
    prp2: u64,
    total: u64,
    lists: &ShadowLists,
) -> Result<Vec<(Iova, u32)>, String> {
    let page = PAGE_SIZE as u64;
    let first = (page - prp1 % page).min(total);
    let mut out = vec![(Iova(prp1), first as u32)];
    let mut rem = total - first;
    if rem == 0 {
        return Ok(out);
    }
    if rem <= page {
        out.push((Iova(prp2), rem as u32));
        return Ok(out);
    }
    let (mut list, mut idx) = (prp2, 0usize);
    while rem > 0 {
        if idx == PAGE_SIZE / 8 - 1 && rem > page {
            list = lists.read(list, idx)?;
            idx = 0;
            continue;
        }
        let n = rem.min(page);
        out.push((Iova(lists.read(list, idx)?), n as u32));
        rem -= n;
        idx += 1;
    }
    Ok(out)
}

/// What a [`RecordingDevice`]'s disk holds.
#[derive(Default)]
struct Disk {
    /// LBAs written so far (the disk is sparse).
    written: HashMap<u64, Box<[u8]>>,
    /// LBAs whose commands fail.
    fail: BTreeSet<u64>,
}

/// An in-memory disk of `lbas` LBAs that records every command.
pub struct RecordingDevice {
    name: String,
    pool: PagePool,
    lba_size: u32,
    lbas: u64,
    max_transfer: u32,
    queue_depth: usize,
    per_poll: usize,
    stalled: bool,
    fill: DiskFill,
    /// The disk, shared with the other queues of the same device ([`RecordingDevice::queue`]).
    disk: Arc<Mutex<Disk>>,
    fail_flush: bool,
    queue: VecDeque<Queued>,
    records: Vec<CommandRecord>,
    events: Option<EventLog>,
}

impl RecordingDevice {
    /// A disk of `lbas` LBAs of `lba_size` bytes, reading zeros until written, moving data
    /// through `pool`. No max transfer, 64 commands in flight, all completed at each poll.
    pub fn new(pool: PagePool, lba_size: u32, lbas: u64) -> RecordingDevice {
        RecordingDevice {
            name: "recording device".into(),
            pool,
            lba_size,
            lbas,
            max_transfer: u32::MAX,
            queue_depth: 64,
            per_poll: usize::MAX,
            stalled: false,
            fill: DiskFill::Zeros,
            disk: Arc::default(),
            fail_flush: false,
            queue: VecDeque::new(),
            records: Vec::new(),
            events: None,
        }
    }

    /// Another queue of the same disk, for another thread: same settings, same data and
    /// failing LBAs, its own commands in flight and its own record of commands.
    pub fn queue(&self) -> RecordingDevice {
        RecordingDevice {
            name: self.name.clone(),
            pool: self.pool.clone(),
            lba_size: self.lba_size,
            lbas: self.lbas,
            max_transfer: self.max_transfer,
            queue_depth: self.queue_depth,
            per_poll: self.per_poll,
            stalled: self.stalled,
            fill: self.fill,
            disk: self.disk.clone(),
            fail_flush: self.fail_flush,
            queue: VecDeque::new(),
            records: Vec::new(),
            events: self.events.clone(),
        }
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        // Every update is one insert or remove: a panic cannot leave the disk half changed.
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What unwritten LBAs hold.
    pub fn set_fill(&mut self, fill: DiskFill) {
        self.fill = fill;
    }

    /// Refuse commands larger than `bytes` (as a controller's MDTS does).
    pub fn set_max_transfer(&mut self, bytes: u32) {
        self.max_transfer = bytes;
    }

    /// Hold at most `depth` commands (at least 1); more are [`IoError::QueueFull`].
    pub fn set_queue_depth(&mut self, depth: usize) {
        self.queue_depth = depth.max(1);
    }

    /// Complete nothing while stalled (a hung controller); commands stay queued.
    pub fn set_stalled(&mut self, stalled: bool) {
        self.stalled = stalled;
    }

    /// Complete at most `n` commands per poll (at least 1).
    pub fn set_completions_per_poll(&mut self, n: usize) {
        self.per_poll = n.max(1);
    }

    /// Fail every command touching `lba` (Unrecovered Read Error / Write Fault).
    pub fn fail_lba(&mut self, lba: u64) {
        self.disk().fail.insert(lba);
    }

    /// Stop failing commands at `lba`.
    pub fn heal_lba(&mut self, lba: u64) {
        self.disk().fail.remove(&lba);
    }

    /// Fail Flush commands.
    pub fn set_fail_flush(&mut self, fail: bool) {
        self.fail_flush = fail;
    }

    /// Log submissions into `log` too.
    pub fn set_event_log(&mut self, log: EventLog) {
        self.events = Some(log);
    }

    /// Every command submitted so far, in order.
    pub fn commands(&self) -> &[CommandRecord] {
        &self.records
    }

    /// Forget the recorded commands.
    pub fn clear_commands(&mut self) {
        self.records.clear();
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }

    /// The contents of one LBA.
    pub fn read_lba(&self, lba: u64) -> Vec<u8> {
        match self.disk().written.get(&lba) {
            Some(d) => d.to_vec(),
            None => {
                let mut v = vec![0; self.lba_size as usize];
                if self.fill == DiskFill::Pattern {
                    fill_pattern(0, lba * self.lba_size as u64, &mut v);
                }
                v
            }
        }
    }

    /// `len` bytes starting at byte `offset` of the disk.
    pub fn read_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let ls = self.lba_size as u64;
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while out.len() < len {
            let lba = self.read_lba(pos / ls);
            let from = (pos % ls) as usize;
            let n = (len - out.len()).min(lba.len() - from);
            out.extend_from_slice(&lba[from..from + n]);
            pos += n as u64;
        }
        out
    }

    /// Store `data` at byte `offset` of the disk (to set it up before a test).
    pub fn write_bytes(&mut self, offset: u64, data: &[u8]) {
        let ls = self.lba_size as u64;
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let lba = pos / ls;
            let mut block = self.read_lba(lba);
            let from = (pos % ls) as usize;
            let n = (data.len() - done).min(block.len() - from);
            block[from..from + n].copy_from_slice(&data[done..done + n]);
            self.disk().written.insert(lba, block.into_boxed_slice());
            done += n;
        }
    }

    /// LBAs written by commands or [`RecordingDevice::write_bytes`], ascending.
    pub fn written_lbas(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.disk().written.keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn reject(&self, reason: String) -> IoError {
        IoError::Rejected {
            dev: self.name.clone(),
            reason,
        }
    }

    /// Check a command and walk its data pointers: (PRPs, list pages, data pages).
    fn check(&self, req: &IoRequest<'_>) -> Result<Walked, IoError> {
        if req.op == IoOp::Flush {
            if !req.segments.is_empty() || req.lbas != 0 {
                return Err(self.reject("a Flush carries no data".into()));
            }
            return Ok((0, 0, Vec::new()));
        }
        if req.lbas == 0 || req.lbas > MAX_LBAS_PER_COMMAND {
            return Err(self.reject(format!(
                "{} LBAs in one command (1 to {MAX_LBAS_PER_COMMAND})",
                req.lbas
            )));
        }
        let total = req.lbas as u64 * self.lba_size as u64;
        if total > self.max_transfer as u64 {
            return Err(self.reject(format!(
                "{total} bytes exceed the max transfer of {} bytes",
                self.max_transfer
            )));
        }
        let described: u64 = req.segments.iter().map(|s| s.len as u64).sum();
        if described != total {
            return Err(self.reject(format!(
                "segments describe {described} bytes for {} LBAs ({total} bytes)",
                req.lbas
            )));
        }
        let mut lists = ShadowLists { pages: Vec::new() };
        let prp = build_prp(req.segments, &mut lists).map_err(|e| self.reject(e.to_string()))?;
        let data = walk_prps(prp.prp1, prp.prp2, total, &lists).map_err(|e| self.reject(e))?;
        Ok((data.len() as u32, lists.pages.len() as u32, data))
    }

    fn execute(&mut self, rec: usize) -> Result<(), IoError> {
        let r = &self.records[rec];
        let (op, slba, lbas) = (r.op, r.slba, r.lbas);
        if op == IoOp::Flush {
            return if self.fail_flush {
                Err(IoError::Status(NvmeStatus::INTERNAL_ERROR))
            } else {
                Ok(())
            };
        }
        if slba
            .checked_add(lbas as u64)
            .is_none_or(|end| end > self.lbas)
        {
            return Err(IoError::Status(NvmeStatus::LBA_OUT_OF_RANGE));
        }
        if self
            .disk()
            .fail
            .range(slba..slba + lbas as u64)
            .next()
            .is_some()
        {
            return Err(IoError::Status(if op == IoOp::Read {
                NvmeStatus::UNRECOVERED_READ_ERROR
            } else {
                NvmeStatus::WRITE_FAULT
            }));
        }
        let data = self.records[rec].data.clone();
        let mut disk_off = slba * self.lba_size as u64;
        let mut buf = vec![0u8; PAGE_SIZE];
        for (iova, len) in data {
            let chunk = &mut buf[..len as usize];
            let status = IoError::Status(NvmeStatus::DATA_TRANSFER_ERROR);
            if op == IoOp::Read {
                chunk.copy_from_slice(&self.read_bytes(disk_off, len as usize));
                self.pool.dma_write(iova, chunk).map_err(|_| status)?;
            } else {
                self.pool.dma_read(iova, chunk).map_err(|_| status)?;
                let c = chunk.to_vec();
                self.write_bytes(disk_off, &c);
            }
            disk_off += len as u64;
        }
        Ok(())
    }
}

impl BlockIo for RecordingDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn lba_size(&self) -> u32 {
        self.lba_size
    }

    fn max_transfer(&self) -> u32 {
        self.max_transfer
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn submit(&mut self, req: &IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        if self.queue.len() >= self.queue_depth {
            return Err(IoError::QueueFull);
        }
        let (prps, list_pages, data) = self.check(req)?;
        self.records.push(CommandRecord {
            op: req.op,
            slba: req.slba,
            lbas: req.lbas,
            prps,
            list_pages,
            pages: req.pages.to_vec(),
            fallback: req.fallback,
            segments: req.segments.iter().map(|s| s.segment()).collect(),
            data,
        });
        let record = self.records.len() - 1;
        if let Some(log) = &self.events {
            push_event(log, TraceEvent::Command(record));
        }
        self.queue.push_back(Queued { tag, record });
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        if self.stalled {
            return 0;
        }
        let mut n = 0;
        while n < self.per_poll {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            let r = self.execute(q.record);
            done(q.tag, r);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rnvme_driver::dma::{Backing, DmaPool, DmaSlice};
    use rnvme_driver::hw::MemoryOnly;

    fn setup() -> (PagePool, RecordingDevice) {
        let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
        let pool = PagePool::new(&dma, 1024).unwrap();
        let mut dev = RecordingDevice::new(pool.clone(), 512, 1 << 20);
        dev.set_fill(DiskFill::Pattern);
        (pool, dev)
    }

    fn run(dev: &mut RecordingDevice) -> Vec<(u64, Result<(), IoError>)> {
        let mut got = Vec::new();
        dev.poll(&mut |t, r| got.push((t, r)));
        got
    }

    #[test]
    fn reads_follow_the_prp_list_into_scattered_frames() {
        let (pool, mut dev) = setup();
        let frames: Vec<_> = (0..600).map(|_| pool.alloc().unwrap()).collect();
        // Every other frame: 300 pages, so PRP1 and 299 list entries on one list page.
        let segs: Vec<_> = frames
            .iter()
            .step_by(2)
            .map(|&f| pool.slice(f, 0, 4096))
            .collect();
        let req = IoRequest {
            op: IoOp::Read,
            slba: 80,
            lbas: 300 * 8,
            segments: &segs,
            pages: &[],
            fallback: false,
        };
        dev.submit(&req, 7).unwrap();
        assert_eq!(dev.outstanding(), 1);
        assert_eq!(run(&mut dev), vec![(7, Ok(()))]);
        let rec = &dev.commands()[0];
        assert_eq!((rec.prps, rec.list_pages), (300, 1));
        for (i, &f) in frames.iter().step_by(2).enumerate() {
            assert_eq!(
                pool.frame_bytes(f),
                dev.read_bytes((80 + i as u64 * 8) * 512, 4096),
                "page {i}"
            );
        }
        assert!(
            pool.frame_bytes(frames[1]).iter().all(|&b| b == 0),
            "frames between are untouched"
        );
    }

    #[test]
    fn long_transfers_chain_list_pages_and_writes_reach_the_disk() {
        let (pool, mut dev) = setup();
        let frames: Vec<_> = (0..1024).map(|_| pool.alloc().unwrap()).collect();
        for (i, &f) in frames.iter().enumerate() {
            pool.write(f, 0, &vec![(i % 251) as u8; 4096]);
        }
        let segs: Vec<_> = frames.iter().map(|&f| pool.slice(f, 0, 4096)).collect();
        let req = IoRequest {
            op: IoOp::Write,
            slba: 0,
            lbas: 1024 * 8,
            segments: &segs,
            pages: &[],
            fallback: false,
        };
        dev.submit(&req, 1).unwrap();
        assert_eq!(run(&mut dev), vec![(1, Ok(()))]);
        let rec = &dev.commands()[0];
        assert_eq!(
            (rec.prps, rec.list_pages),
            (1024, 2),
            "1023 list entries: 511 and a chain pointer, then 512"
        );
        assert_eq!(
            dev.read_bytes(1023 * 4096, 4096),
            vec![(1023 % 251) as u8; 4096]
        );
        assert_eq!(dev.read_bytes(511 * 4096 + 100, 1), vec![(511 % 251) as u8]);
    }

    #[test]
    fn failures_limits_and_queue_depth() {
        let (pool, mut dev) = setup();
        let f = pool.alloc().unwrap();
        let pool: &'static PagePool = Box::leak(Box::new(pool));
        let seg = [pool.slice(f, 0, 4096)];
        let seg_off = [pool.slice(f, 1024, 1024)];
        let rd = |slba, lbas, s: &'static [DmaSlice<'static>]| IoRequest {
            op: IoOp::Read,
            slba,
            lbas,
            segments: s,
            pages: &[],
            fallback: true,
        };
        let seg: &'static [DmaSlice<'static>] = Box::leak(Box::new(seg));
        let seg_off: &'static [DmaSlice<'static>] = Box::leak(Box::new(seg_off));
        dev.fail_lba(17);
        dev.set_queue_depth(2);
        dev.submit(&rd(16, 8, seg), 1).unwrap();
        dev.submit(&rd(2, 2, seg_off), 2).unwrap();
        assert_eq!(dev.submit(&rd(0, 8, seg), 3), Err(IoError::QueueFull));
        dev.set_completions_per_poll(1);
        assert_eq!(
            run(&mut dev),
            vec![(1, Err(IoError::Status(NvmeStatus::UNRECOVERED_READ_ERROR)))]
        );
        assert_eq!(run(&mut dev), vec![(2, Ok(()))]);
        let mut b = vec![0; 1024];
        pool.read(f, 1024, &mut b);
        assert_eq!(
            b,
            dev.read_bytes(1024, 1024),
            "a block at an offset inside its frame"
        );
        dev.set_max_transfer(2048);
        assert!(matches!(
            dev.submit(&rd(0, 8, seg), 4),
            Err(IoError::Rejected { .. })
        ));
        assert!(
            matches!(dev.submit(&rd(0, 4, seg), 5), Err(IoError::Rejected { .. })),
            "length mismatch"
        );
        dev.set_max_transfer(u32::MAX);
        dev.submit(&rd((1 << 20) - 4, 8, seg), 6).unwrap();
        assert_eq!(
            run(&mut dev),
            vec![(6, Err(IoError::Status(NvmeStatus::LBA_OUT_OF_RANGE)))]
        );
    }
}
