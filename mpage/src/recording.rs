//! A recording device: an in-memory disk that executes commands the way a controller would
//! (walking the PRP entries, or the SGL, and copying through the page pool), and records each
//! of them.
//!
//! It is the stand-in for hardware in tests and in `rnvme mpage trace`: it can be told to fail
//! chosen LBAs, to complete only a few commands per poll, and to hold only a few commands at
//! once, so the cache's asynchronous paths run as they would on a device. By default it is a
//! controller without SGL support, and every command carries PRPs; told to offer SGLs
//! ([`RecordingDevice::set_data_pointer_mode`]), it describes each command's data as the
//! driver's queue pair would on such a controller ([`uses_sgl`]), with the driver's builders.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rnvme_driver::prp::{build_prp, ListPages};
use rnvme_driver::queue::{uses_sgl, DataPointerMode};
use rnvme_driver::sgl::{build_sgl, dword_aligned};
use rnvme_driver::spec::{sgl_type, SglDescriptor};
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

/// One SGL descriptor as the device read it (Base spec §4.1.2).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SglEntry {
    /// Data Block: `len` bytes of data at `addr`.
    Data { addr: Iova, len: u32 },
    /// Segment: a list of `len / 16` descriptors at `addr`, whose last one leads on to the
    /// next list.
    Segment { addr: Iova, len: u32 },
    /// Last Segment: the final list, of `len / 16` descriptors at `addr`.
    LastSegment { addr: Iova, len: u32 },
}

/// How a command described its data to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPointer {
    /// No data (a Flush).
    None,
    /// PRP entries and lists (counted in [`CommandRecord::prps`] and
    /// [`CommandRecord::list_pages`]).
    Prp,
    /// An SGL: every descriptor the device read, in the order it read them. The first is the
    /// one in the command (DPTR): a Data Block for data in one piece, otherwise a segment
    /// descriptor; then the descriptors of each list in turn, where a segment descriptor is the
    /// last of its list and the ones after it are in the list it points at.
    Sgl(Vec<SglEntry>),
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
    /// Data pointers used: PRP1, PRP2 when it points at data, and PRP list entries (0 when the
    /// command carried an SGL).
    pub prps: u32,
    /// List pages used: PRP list pages, or the SGL's descriptor lists (one page each).
    pub list_pages: u32,
    /// What kind of data pointer it carried, and for an SGL its descriptors.
    pub dptr: DataPointer,
    /// The file pages it carried.
    pub pages: Vec<u64>,
    /// Whether it was a per-block (fallback) command.
    pub fallback: bool,
    /// The memory as the cache described it.
    pub segments: Vec<Segment>,
    /// The data as the device walked the data pointers: (IOVA, bytes) of each PRP's page or
    /// SGL Data Block, in order.
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

/// What the device found walking a command's data pointer.
struct Walked {
    prps: u32,
    list_pages: u32,
    dptr: DataPointer,
    data: Vec<(Iova, u32)>,
}

struct Queued {
    tag: u64,
    record: usize,
}

/// PRP list and SGL descriptor list pages kept in ordinary memory at IOVAs no frame uses.
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

    /// The qword at `addr` (of an SGL descriptor list).
    fn qword(&self, addr: u64) -> Result<u64, String> {
        let off = addr
            .checked_sub(LIST_BASE)
            .filter(|&o| o / (PAGE_SIZE as u64) < self.pages.len() as u64)
            .ok_or_else(|| format!("SGL list address {addr:#x} leads nowhere"))?;
        if off % 8 != 0 {
            return Err(format!("SGL list address {addr:#x} is not qword aligned"));
        }
        let (page, byte) = (off as usize / PAGE_SIZE, off as usize % PAGE_SIZE);
        Ok(self.pages[page][byte / 8])
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

/// At most this many SGL descriptors are read for one command: a chain of lists that loops
/// would otherwise never end. (Twice what a command of 65536 LBAs in 512-byte pieces needs.)
const MAX_SGL_DESCRIPTORS: usize = 1 << 17;

/// The descriptor `d` read from `at` as an [`SglEntry`]: sub type 0 (address) and a type the
/// device knows (Data Block, Segment, Last Segment), with its reserved bytes zero.
fn sgl_entry(d: SglDescriptor, reserved: u64, at: &str) -> Result<SglEntry, String> {
    if d.id & 0xf != 0 {
        return Err(format!(
            "the SGL descriptor {at} has sub type {:#x}, not 0 (address)",
            d.id & 0xf
        ));
    }
    if reserved != 0 {
        return Err(format!("the SGL descriptor {at} has reserved bytes set"));
    }
    let (addr, len) = (Iova(d.addr), d.len);
    match d.ty() {
        sgl_type::DATA_BLOCK => Ok(SglEntry::Data { addr, len }),
        sgl_type::SEGMENT => Ok(SglEntry::Segment { addr, len }),
        sgl_type::LAST_SEGMENT => Ok(SglEntry::LastSegment { addr, len }),
        ty => Err(format!(
            "the SGL descriptor {at} has type {ty:#x}, which this device does not take"
        )),
    }
}

/// What an SGL walk found.
#[derive(Debug, PartialEq, Eq)]
struct SglWalk {
    /// Every descriptor read, in order (the one in the command first).
    descriptors: Vec<SglEntry>,
    /// The Data Blocks of nonzero length, in order: (IOVA, bytes).
    data: Vec<(Iova, u32)>,
    /// Descriptor lists read.
    lists: u32,
}

/// Walk an SGL like a controller, from the descriptor in the command (DPTR as its two qwords)
/// through Segment and Last Segment lists, for a command transferring `total` bytes.
///
/// The rules checked: every descriptor has sub type 0 and a known type; a segment descriptor's
/// length is a nonzero multiple of 16; a segment descriptor is the last of its list; a Last
/// Segment list holds none; a Segment list ends with one; the Data Blocks add up to `total`;
/// at most [`MAX_SGL_DESCRIPTORS`] descriptors.
fn walk_sgl(dptr: (u64, u64), total: u64, lists: &ShadowLists) -> Result<SglWalk, String> {
    let mut walk = SglWalk {
        descriptors: Vec::new(),
        data: Vec::new(),
        lists: 0,
    };
    let mut described: u64 = 0;
    let mut data = |walk: &mut SglWalk, addr: Iova, len: u32| {
        described += len as u64;
        if len > 0 {
            walk.data.push((addr, len));
        }
        if described > total {
            return Err(format!(
                "the SGL describes more than the {total} bytes the command transfers"
            ));
        }
        Ok(())
    };
    let first = SglDescriptor::from_dptr(dptr.0, dptr.1);
    let reserved = (dptr.1 >> 32) & 0xff_ffff;
    let mut next = match sgl_entry(first, reserved, "in the command")? {
        e @ SglEntry::Data { addr, len } => {
            walk.descriptors.push(e);
            data(&mut walk, addr, len)?;
            None
        }
        e => {
            walk.descriptors.push(e);
            Some(e)
        }
    };
    while let Some(list) = next.take() {
        let (addr, len, last) = match list {
            SglEntry::Segment { addr, len } => (addr, len, false),
            SglEntry::LastSegment { addr, len } => (addr, len, true),
            SglEntry::Data { .. } => unreachable!("only segment descriptors lead to lists"),
        };
        if len == 0 || len % 16 != 0 {
            return Err(format!(
                "the SGL list at {addr} has length {len}, not a nonzero multiple of 16"
            ));
        }
        walk.lists += 1;
        let count = len as u64 / 16;
        for i in 0..count {
            if walk.descriptors.len() >= MAX_SGL_DESCRIPTORS {
                return Err(format!(
                    "the SGL has more than {MAX_SGL_DESCRIPTORS} descriptors"
                ));
            }
            let at = addr.0.wrapping_add(16 * i);
            let (lo, hi) = (lists.qword(at)?, lists.qword(at.wrapping_add(8))?);
            let d = SglDescriptor::from_dptr(lo, hi);
            let e = sgl_entry(d, (hi >> 32) & 0xff_ffff, &format!("at {at:#x}"))?;
            walk.descriptors.push(e);
            match e {
                SglEntry::Data { addr, len } => data(&mut walk, addr, len)?,
                _ if last => {
                    return Err(format!(
                        "the Last Segment list at {addr} holds a segment descriptor (at {at:#x})"
                    ))
                }
                _ if i != count - 1 => {
                    return Err(format!(
                        "the segment descriptor at {at:#x} is not the last of its list"
                    ))
                }
                _ => next = Some(e),
            }
        }
        if !last && next.is_none() {
            return Err(format!(
                "the SGL Segment list at {addr} is not the last but does not end with a segment \
                 descriptor"
            ));
        }
    }
    if described != total {
        return Err(format!(
            "the SGL describes {described} bytes but the command transfers {total}"
        ));
    }
    Ok(walk)
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
    /// Commands reach the disk only when kicked ([`BlockIo::set_kick_only`]), as an NVMe
    /// queue's reach the controller only through its doorbell.
    kick_only: bool,
    /// Commands at the back of `queue` not kicked yet (with `kick_only`).
    unkicked: usize,
    /// Kicks that told the disk of new commands (doorbells).
    kicks: u64,
    fill: DiskFill,
    mode: DataPointerMode,
    sgl_dword: bool,
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
            kick_only: false,
            unkicked: 0,
            kicks: 0,
            fill: DiskFill::Zeros,
            mode: DataPointerMode::Prp,
            sgl_dword: false,
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
            kick_only: false,
            unkicked: 0,
            kicks: 0,
            fill: self.fill,
            mode: self.mode,
            sgl_dword: self.sgl_dword,
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

    /// Describe each command's data as the driver's queue pair does in `mode`: the default,
    /// [`DataPointerMode::Prp`], is a controller without SGL support (every command carries
    /// PRPs); [`DataPointerMode::Auto`], the driver's default on a controller that offers SGLs,
    /// chooses per command ([`uses_sgl`]); [`DataPointerMode::Sgl`] always takes an SGL.
    pub fn set_data_pointer_mode(&mut self, mode: DataPointerMode) {
        self.mode = mode;
    }

    /// How commands describe their data ([`RecordingDevice::set_data_pointer_mode`]).
    pub fn data_pointer_mode(&self) -> DataPointerMode {
        self.mode
    }

    /// Take SGL data only at dword-aligned addresses in whole dwords, like a controller that
    /// reports SGLS = 10b: in [`DataPointerMode::Auto`] other data gets PRPs, in
    /// [`DataPointerMode::Sgl`] it is refused.
    pub fn set_sgl_dword_aligned(&mut self, required: bool) {
        self.sgl_dword = required;
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

    /// Kicks that told the disk of new commands (doorbells rung), with
    /// [`BlockIo::set_kick_only`].
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Commands submitted and not kicked yet, with [`BlockIo::set_kick_only`].
    pub fn unkicked(&self) -> usize {
        self.unkicked
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

    /// Check a command, build its data pointer as the driver would and walk it.
    fn check(&self, req: &IoRequest<'_>) -> Result<Walked, IoError> {
        if req.op == IoOp::Flush {
            if !req.segments.is_empty() || req.lbas != 0 {
                return Err(self.reject("a Flush carries no data".into()));
            }
            return Ok(Walked {
                prps: 0,
                list_pages: 0,
                dptr: DataPointer::None,
                data: Vec::new(),
            });
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
        if uses_sgl(self.mode, self.sgl_dword, req.segments) {
            if self.sgl_dword && !dword_aligned(req.segments) {
                return Err(self.reject(
                    "this device takes SGL data only at dword-aligned addresses in whole dwords"
                        .into(),
                ));
            }
            let sgl =
                build_sgl(req.segments, &mut lists).map_err(|e| self.reject(e.to_string()))?;
            let walk = walk_sgl(sgl.to_dptr(), total, &lists).map_err(|e| self.reject(e))?;
            return Ok(Walked {
                prps: 0,
                list_pages: walk.lists,
                dptr: DataPointer::Sgl(walk.descriptors),
                data: walk.data,
            });
        }
        let prp = build_prp(req.segments, &mut lists).map_err(|e| self.reject(e.to_string()))?;
        let data = walk_prps(prp.prp1, prp.prp2, total, &lists).map_err(|e| self.reject(e))?;
        Ok(Walked {
            prps: data.len() as u32,
            list_pages: lists.pages.len() as u32,
            dptr: DataPointer::Prp,
            data,
        })
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
            // A PRP's piece is at most a page; an SGL Data Block may be longer.
            let mut done = 0u32;
            while done < len {
                let n = (len - done).min(PAGE_SIZE as u32);
                let at = Iova(iova.0 + done as u64);
                let chunk = &mut buf[..n as usize];
                let status = IoError::Status(NvmeStatus::DATA_TRANSFER_ERROR);
                if op == IoOp::Read {
                    chunk.copy_from_slice(&self.read_bytes(disk_off, n as usize));
                    self.pool.dma_write(at, chunk).map_err(|_| status)?;
                } else {
                    self.pool.dma_read(at, chunk).map_err(|_| status)?;
                    let c = chunk.to_vec();
                    self.write_bytes(disk_off, &c);
                }
                disk_off += n as u64;
                done += n;
            }
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
        let Walked {
            prps,
            list_pages,
            dptr,
            data,
        } = self.check(req)?;
        self.records.push(CommandRecord {
            op: req.op,
            slba: req.slba,
            lbas: req.lbas,
            prps,
            list_pages,
            dptr,
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
        if self.kick_only {
            self.unkicked += 1;
        }
        Ok(())
    }

    fn kick(&mut self) {
        if self.unkicked > 0 {
            self.kicks += 1;
            self.unkicked = 0;
        }
    }

    fn set_kick_only(&mut self) -> bool {
        self.kick_only = true;
        true
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        if self.stalled {
            return 0;
        }
        let mut n = 0;
        // Commands not kicked yet are not the disk's to see.
        while n < self.per_poll && self.queue.len() > self.unkicked {
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

    fn io<'a>(op: IoOp, slba: u64, lbas: u32, segments: &'a [DmaSlice<'a>]) -> IoRequest<'a> {
        IoRequest {
            op,
            slba,
            lbas,
            segments,
            pages: &[],
            fallback: false,
        }
    }

    fn data(addr: Iova, len: u32) -> SglEntry {
        SglEntry::Data { addr, len }
    }

    #[test]
    fn auto_takes_an_sgl_for_scattered_pages_and_prps_for_one_page() {
        let (pool, mut dev) = setup();
        dev.set_data_pointer_mode(DataPointerMode::Auto);
        let frames: Vec<_> = (0..6).map(|_| pool.alloc().unwrap()).collect();
        // Pages in frames 4, 0 and 2: three pieces, one Data Block each, in one list.
        let order = [frames[4], frames[0], frames[2]];
        for (i, &f) in order.iter().enumerate() {
            let mut page = vec![0; 4096];
            fill_pattern(9, i as u64 * 4096, &mut page);
            pool.write(f, 0, &page);
        }
        let segs: Vec<_> = order.iter().map(|&f| pool.slice(f, 0, 4096)).collect();
        dev.submit(&io(IoOp::Write, 40, 24, &segs), 1).unwrap();
        assert_eq!(run(&mut dev), vec![(1, Ok(()))]);
        let rec = &dev.commands()[0];
        let list = Iova(LIST_BASE);
        assert_eq!(
            rec.dptr,
            DataPointer::Sgl(vec![
                SglEntry::LastSegment {
                    addr: list,
                    len: 48
                },
                data(pool.iova(frames[4]), 4096),
                data(pool.iova(frames[0]), 4096),
                data(pool.iova(frames[2]), 4096),
            ])
        );
        assert_eq!((rec.prps, rec.list_pages), (0, 1));
        let mut want = vec![0; 3 * 4096];
        fill_pattern(9, 0, &mut want);
        assert_eq!(
            dev.read_bytes(40 * 512, 3 * 4096),
            want,
            "written in SGL order"
        );

        // Read it back into other frames, scattered the other way round.
        for &f in &frames {
            pool.write(f, 0, &[0; 4096]);
        }
        let back = [frames[5], frames[3], frames[1]];
        let segs: Vec<_> = back.iter().map(|&f| pool.slice(f, 0, 4096)).collect();
        dev.submit(&io(IoOp::Read, 40, 24, &segs), 2).unwrap();
        assert_eq!(run(&mut dev), vec![(2, Ok(()))]);
        for (i, &f) in back.iter().enumerate() {
            assert_eq!(
                pool.frame_bytes(f),
                want[i * 4096..(i + 1) * 4096],
                "page {i}"
            );
        }
        assert!(matches!(dev.commands()[1].dptr, DataPointer::Sgl(_)));

        // One page fits PRP1: PRPs, as the driver chooses.
        let one = [pool.slice(frames[0], 0, 4096)];
        dev.submit(&io(IoOp::Read, 40, 8, &one), 3).unwrap();
        assert_eq!(run(&mut dev), vec![(3, Ok(()))]);
        let rec = &dev.commands()[2];
        assert_eq!(
            (&rec.dptr, rec.prps, rec.list_pages),
            (&DataPointer::Prp, 1, 0)
        );
        assert_eq!(pool.frame_bytes(frames[0]), want[..4096]);

        // Without the setting: PRPs for everything, as before.
        dev.set_data_pointer_mode(DataPointerMode::Prp);
        dev.submit(&io(IoOp::Read, 40, 24, &segs), 4).unwrap();
        let rec = &dev.commands()[3];
        assert_eq!(
            (&rec.dptr, rec.prps, rec.list_pages),
            (&DataPointer::Prp, 3, 1)
        );
    }

    #[test]
    fn one_contiguous_piece_over_three_pages_is_one_data_block_in_the_command() {
        let (pool, mut dev) = setup();
        dev.set_data_pointer_mode(DataPointerMode::Auto);
        let frames: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pool.iova(frames[2]).0 - pool.iova(frames[0]).0, 8192);
        let start = pool.iova(frames[0]);
        let seg = [pool
            .slice_of(Segment::new(start, 3 * 4096))
            .expect("three frames in a row")];
        dev.submit(&io(IoOp::Read, 1000, 24, &seg), 1).unwrap();
        assert_eq!(run(&mut dev), vec![(1, Ok(()))]);
        let rec = &dev.commands()[0];
        assert_eq!(rec.dptr, DataPointer::Sgl(vec![data(start, 3 * 4096)]));
        assert_eq!((rec.prps, rec.list_pages), (0, 0));
        assert_eq!(rec.data, vec![(start, 3 * 4096)]);
        for (i, &f) in frames.iter().enumerate() {
            assert_eq!(
                pool.frame_bytes(f),
                dev.read_bytes((1000 + 8 * i as u64) * 512, 4096),
                "page {i}"
            );
        }
    }

    #[test]
    fn more_than_256_pieces_chain_descriptor_lists() {
        let (pool, mut dev) = setup();
        dev.set_data_pointer_mode(DataPointerMode::Auto);
        let frames: Vec<_> = (0..1024).map(|_| pool.alloc().unwrap()).collect();
        for (i, &f) in frames.iter().enumerate() {
            pool.write(f, 0, &vec![(i % 251) as u8; 4096]);
        }
        // Every other frame: 512 pieces, lists of 255 + 255 + 2 behind Segment, Segment and
        // Last Segment descriptors.
        let used: Vec<_> = frames.iter().copied().step_by(2).collect();
        let segs: Vec<_> = used.iter().map(|&f| pool.slice(f, 0, 4096)).collect();
        dev.submit(&io(IoOp::Write, 0, 512 * 8, &segs), 1).unwrap();
        assert_eq!(run(&mut dev), vec![(1, Ok(()))]);
        let rec = &dev.commands()[0];
        assert_eq!((rec.prps, rec.list_pages), (0, 3));
        let DataPointer::Sgl(d) = &rec.dptr else {
            panic!("not an SGL: {:?}", rec.dptr)
        };
        let page = |n: u64| Iova(LIST_BASE + n * 4096);
        assert_eq!(d.len(), 1 + 256 + 256 + 2);
        assert_eq!(
            d[0],
            SglEntry::Segment {
                addr: page(0),
                len: 4096
            }
        );
        assert_eq!(
            d[256],
            SglEntry::Segment {
                addr: page(1),
                len: 4096
            }
        );
        assert_eq!(
            d[512],
            SglEntry::LastSegment {
                addr: page(2),
                len: 32
            }
        );
        let blocks: Vec<_> = d
            .iter()
            .filter_map(|e| match *e {
                SglEntry::Data { addr, len } => Some((addr, len)),
                _ => None,
            })
            .collect();
        let want: Vec<_> = used.iter().map(|&f| (pool.iova(f), 4096)).collect();
        assert_eq!(blocks, want);
        assert_eq!(rec.data, want);
        for (i, _) in used.iter().enumerate() {
            assert_eq!(
                dev.read_bytes(i as u64 * 4096 + 7, 1),
                vec![((2 * i) % 251) as u8],
                "piece {i}"
            );
        }
    }

    #[test]
    fn sgl_data_needs_no_page_alignment_unless_the_device_wants_dwords() {
        let (pool, mut dev) = setup();
        let a = pool.alloc().unwrap();
        let _gap = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        // One 512-byte LBA from 510 bytes at offset 2 of one frame and 2 bytes of another.
        let segs = [pool.slice(a, 2, 510), pool.slice(b, 0, 2)];
        let read = io(IoOp::Read, 3, 1, &segs);
        assert!(
            matches!(dev.submit(&read, 1), Err(IoError::Rejected { .. })),
            "PRPs cannot describe it"
        );
        dev.set_data_pointer_mode(DataPointerMode::Auto);
        dev.submit(&read, 2).unwrap();
        assert_eq!(run(&mut dev), vec![(2, Ok(()))]);
        let mut got = vec![0; 512];
        pool.read(a, 2, &mut got[..510]);
        pool.read(b, 0, &mut got[510..]);
        assert_eq!(got, dev.read_bytes(3 * 512, 512));
        // A controller with SGLS = 10b: PRPs in Auto (which refuse it), refused in Sgl mode.
        dev.set_sgl_dword_aligned(true);
        let e = dev.submit(&read, 3).unwrap_err();
        assert!(e.to_string().contains("PRP"), "{e}");
        dev.set_data_pointer_mode(DataPointerMode::Sgl);
        let e = dev.submit(&read, 4).unwrap_err();
        assert!(e.to_string().contains("dword"), "{e}");
        let aligned = [pool.slice(a, 0, 512)];
        dev.submit(&io(IoOp::Read, 3, 1, &aligned), 5).unwrap();
        assert_eq!(
            dev.commands().last().unwrap().dptr,
            DataPointer::Sgl(vec![data(pool.iova(a), 512)]),
            "Sgl mode takes an SGL even for one page"
        );
    }

    /// List pages holding `lists`, each a list of (type, address, length) descriptors.
    fn lists_of(lists: &[&[(u8, u64, u32)]]) -> ShadowLists {
        let mut mem = ShadowLists { pages: Vec::new() };
        for (p, list) in lists.iter().enumerate() {
            mem.page_iova(p);
            for (i, &(ty, addr, len)) in list.iter().enumerate() {
                let (lo, hi) = SglDescriptor::new(ty, addr, len).to_dptr();
                mem.write_qword(p, 2 * i, lo);
                mem.write_qword(p, 2 * i + 1, hi);
            }
        }
        mem
    }

    #[test]
    fn malformed_sgls_are_refused() {
        use sgl_type::{DATA_BLOCK as D, LAST_SEGMENT as L, SEGMENT as S};
        let page = |n: u64| LIST_BASE + n * 4096;
        let walk = |first: (u8, u64, u32), total: u64, mem: &ShadowLists| {
            walk_sgl(
                SglDescriptor::new(first.0, first.1, first.2).to_dptr(),
                total,
                mem,
            )
        };
        let err = |r: Result<SglWalk, String>| r.unwrap_err();
        let ok = lists_of(&[
            &[(D, 0x1000, 100), (D, 0x9000, 200), (L, page(1), 16)],
            &[(D, 0x5000, 300)],
        ]);
        let w = walk((S, page(0), 48), 600, &ok).unwrap();
        assert_eq!(
            w.data,
            vec![
                (Iova(0x1000), 100),
                (Iova(0x9000), 200),
                (Iova(0x5000), 300)
            ]
        );
        assert_eq!((w.descriptors.len(), w.lists), (5, 2));
        assert!(err(walk((S, page(0), 48), 601, &ok)).contains("describes 600 bytes"));
        assert!(err(walk((S, page(0), 48), 500, &ok)).contains("more than the 500 bytes"));
        assert!(err(walk((D, 0x1000, 100), 200, &ok)).contains("describes 100 bytes"));
        for len in [0, 8, 40] {
            assert!(err(walk((L, page(0), len), 100, &ok)).contains("multiple of 16"));
        }
        assert!(err(walk((L, page(7), 16), 100, &ok)).contains("leads nowhere"));
        assert!(err(walk((L, page(0) + 4, 16), 100, &ok)).contains("not qword aligned"));
        assert!(
            err(walk((L, page(0), 48), 600, &ok)).contains("Last Segment list"),
            "a Last Segment list holding a segment descriptor"
        );
        assert!(
            err(walk((S, page(0), 32), 300, &ok)).contains("does not end with a segment"),
            "a Segment list that does not lead on"
        );
        let middle = lists_of(&[&[(L, page(1), 16), (D, 0x1000, 100)], &[(D, 0x5000, 300)]]);
        assert!(err(walk((S, page(0), 32), 400, &middle)).contains("not the last of its list"));
        let unknown = lists_of(&[&[(0x1, 0x1000, 100)]]);
        assert!(err(walk((L, page(0), 16), 100, &unknown)).contains("type 0x1"));
        assert!(err(walk((0x4, 0x1000, 100), 100, &unknown)).contains("type 0x4"));
        let mut sub = SglDescriptor::new(D, 0x1000, 100).to_dptr();
        sub.1 |= 1 << 56;
        assert!(walk_sgl(sub, 100, &unknown)
            .unwrap_err()
            .contains("sub type 0x1"));
        let reserved = (0x1000, 100 | 1 << 40);
        assert!(walk_sgl(reserved, 100, &unknown)
            .unwrap_err()
            .contains("reserved"));
        // A list that leads back to itself ends at the bound.
        let looped = lists_of(&[&[(D, 0x1000, 0), (S, page(0), 32)]]);
        assert!(err(walk((S, page(0), 32), 100, &looped)).contains("more than 131072"));
    }
}
