//! One fio job's side of the engine: its queue pair, its files (namespaces), its I/O buffer
//! in DMA memory, and the io_us in flight. Owned by the job's thread.

use std::sync::Arc;
use std::time::Duration;

use rnvme_driver::clock::Ticks;
use rnvme_driver::controller::Controller;
use rnvme_driver::dma::DmaBuffer;
use rnvme_driver::io::{
    deallocate_cmd, flush_cmd, read_cmd, split_transfer, write_cmd, IoQueuePair,
};
use rnvme_driver::queue::{Completion, DataPointerMode};
use rnvme_driver::{Error as DriverError, NvmeStatus};

use crate::name::Target;
use crate::EngineError;

/// What an io_u asks for (fio's data directions the engine serves).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Dataset Management, Deallocate.
    Trim,
    /// Flush (fio's fsync and fdatasync).
    Flush,
}

/// The engine options of a job file, and what fio's options decide for the engine.
#[derive(Clone, Debug)]
pub struct JobParams {
    /// fio's `iodepth`: io_us in flight at most.
    pub depth: u32,
    /// The largest block size of any data direction.
    pub max_bs: u64,
    /// `rnvme_dptr`.
    pub dptr: DataPointerMode,
    /// `rnvme_fua`: writes with Force Unit Access.
    pub fua: bool,
    /// `rnvme_ring=commit`: ring the doorbell at fio's commit rather than at its next reap.
    pub ring_at_commit: bool,
    /// `rnvme_stats=1`: account where the job thread's time goes ([`Job::report`]).
    pub stats: bool,
}

/// Where a job thread's time went, in time-stamp counter ticks: inside the engine's
/// submissions, inside its reaps (mostly waiting for the device), and between the engine's
/// calls (fio's own work). Kept only with `rnvme_stats=1`: two counter reads per call.
#[derive(Clone, Debug, Default)]
pub struct TimeSplit {
    /// Ticks inside [`Job::queue`].
    pub queue: u64,
    /// Ticks inside [`Job::getevents`].
    pub reap: u64,
    /// Ticks from the end of one engine call to the start of the next.
    pub between: u64,
    /// io_us queued.
    pub queued: u64,
    /// Calls to [`Job::getevents`].
    pub reaps: u64,
    /// Of those, calls that found no completion on their first poll (they waited).
    pub waited: u64,
    /// When the last engine call returned (0: none yet).
    last: u64,
}

impl TimeSplit {
    fn enter(&mut self) -> u64 {
        let now = Ticks::now().0;
        if self.last != 0 {
            self.between += now.saturating_sub(self.last);
        }
        now
    }

    fn leave(&mut self, since: u64) -> u64 {
        let now = Ticks::now().0;
        self.last = now;
        now.saturating_sub(since)
    }
}

/// The outcome of [`Job::queue`].
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    /// Sent to the controller (once the doorbell rings at commit).
    Queued,
    /// The queue pair has no room now: fio reaps completions and tries again.
    Busy,
}

struct JobFile {
    nsid: u32,
    lba_size: u32,
    blocks: u64,
}

#[derive(Clone, Default)]
struct Slot {
    /// Commands of this io_u not yet completed.
    left: u32,
    /// The first failure among them.
    failure: Option<NvmeStatus>,
    /// The failure's text, for fio's error details.
    detail: String,
}

/// One fio job.
pub struct Job {
    params: JobParams,
    ctrl: Option<Arc<Controller>>,
    qp: Option<IoQueuePair>,
    files: Vec<Option<JobFile>>,
    /// fio's I/O buffers (from `iomem_alloc`) and the host address fio reaches them at.
    buf: Option<(DmaBuffer, usize)>,
    /// One 16-byte Dataset Management range per io_u.
    ranges: Option<DmaBuffer>,
    slots: Vec<Slot>,
    /// io_us completed by the last [`Job::getevents`]: (index, errno or 0).
    events: Vec<(u32, i32)>,
    max_transfer: u32,
    split: Option<TimeSplit>,
}

/// Size of one Dataset Management range entry.
const RANGE: usize = 16;
/// The deepest job: what one NVMe queue can hold.
const MAX_DEPTH: u32 = 65535;

impl Job {
    /// A job with no files yet.
    pub fn new(params: JobParams) -> Result<Job, EngineError> {
        // A queue holds at most 65 536 entries (one kept free): a deeper job could never
        // have its I/Os in flight, and its bookkeeping alone could exhaust memory.
        if params.depth == 0 || params.depth > MAX_DEPTH {
            return Err(EngineError::msg(format!(
                "iodepth {} is outside 1 to {MAX_DEPTH}",
                params.depth
            )));
        }
        Ok(Job {
            slots: vec![Slot::default(); params.depth as usize],
            split: params.stats.then(TimeSplit::default),
            params,
            ctrl: None,
            qp: None,
            files: Vec::new(),
            buf: None,
            ranges: None,
            events: Vec::new(),
            max_transfer: 0,
        })
    }

    /// Adds fio's file number `fileno`: namespace `target.nsid` of `ctrl`. The files of one job
    /// are namespaces of one controller (its buffers are mapped for that controller).
    pub fn add_file(
        &mut self,
        fileno: u32,
        target: &Target,
        ctrl: Arc<Controller>,
    ) -> Result<(), EngineError> {
        if let Some(c) = &self.ctrl {
            if !Arc::ptr_eq(c, &ctrl) {
                return Err(EngineError::msg(format!(
                    "{target}: the files of one job must be namespaces of one controller (a \
                     job's I/O buffers are DMA memory mapped for its controller, {}): give each \
                     controller its own job",
                    c.name()
                )));
            }
        }
        let ns = namespace(&ctrl, target)?;
        let file = JobFile {
            nsid: ns.nsid,
            lba_size: ns.lba_size,
            blocks: ns.size_lbas,
        };
        check_block_size(
            target,
            self.params.max_bs,
            file.lba_size,
            "largest block size",
        )?;
        let i = fileno as usize;
        if self.files.len() <= i {
            self.files.resize_with(i + 1, || None);
        }
        self.files[i] = Some(file);
        self.ctrl = Some(ctrl);
        Ok(())
    }

    /// Creates the job's queue pair: deep enough for `depth` io_us of the largest block
    /// size, each split at the controller's maximum transfer.
    pub fn start(&mut self) -> Result<(), EngineError> {
        let ctrl = self
            .ctrl
            .clone()
            .ok_or_else(|| EngineError::msg("the job has no files"))?;
        let min_lba = self
            .files
            .iter()
            .flatten()
            .map(|f| f.lba_size)
            .min()
            .unwrap_or(512);
        let pieces = |mt: u64| self.params.max_bs.div_ceil(mt.max(1)).max(1);
        let want = self.params.depth as u64 * pieces(ctrl.max_transfer_bytes() as u64) + 1;
        let entries = want.clamp(2, ctrl.max_queue_entries() as u64) as u32;
        rnvme_driver::clock::start_learning_rate();
        let mut qp = ctrl.create_io_qpair(entries).map_err(EngineError::Driver)?;
        qp.set_data_pointer_mode(self.params.dptr)
            .map_err(EngineError::Driver)?;
        self.max_transfer = qp.max_transfer_for(min_lba);
        let ranges = ctrl
            .alloc(self.params.depth as usize * RANGE)
            .map_err(EngineError::Driver)?;
        self.ranges = Some(ranges);
        self.qp = Some(qp);
        Ok(())
    }

    /// The size and LBA size of fio's file `fileno`.
    pub fn file_size(&self, fileno: u32) -> Option<(u64, u32)> {
        let f = self.files.get(fileno as usize)?.as_ref()?;
        Some((f.blocks * f.lba_size as u64, f.lba_size))
    }

    /// DMA memory for fio's I/O buffers: `len` bytes, reached by fio at the returned address.
    pub fn iomem_alloc(&mut self, len: usize) -> Result<usize, EngineError> {
        let ctrl = self
            .ctrl
            .as_ref()
            .ok_or_else(|| EngineError::msg("the job has no files"))?;
        let buf = ctrl.alloc(len.max(1)).map_err(EngineError::Driver)?;
        let addr = buf.volatile().ptr_guard_mut().as_ptr() as usize;
        self.buf = Some((buf, addr));
        Ok(addr)
    }

    /// The buffers of [`Job::iomem_alloc`], for copies in and out of them (tests; tools that
    /// drive a job without fio).
    pub fn io_buffer(&self) -> Option<&DmaBuffer> {
        self.buf.as_ref().map(|b| &b.0)
    }

    /// Gives fio's I/O buffers back. Commands still holding them keep their memory until
    /// their completions are reaped (or quarantine it); fio no longer uses the address.
    pub fn iomem_free(&mut self) {
        self.buf = None;
    }

    /// The queue pair's commands in flight.
    pub fn outstanding(&self) -> usize {
        self.qp.as_ref().map_or(0, |q| q.outstanding())
    }

    /// Queues io_u `index`: `op` on fio's file `fileno`, `len` bytes at byte `offset`, its data
    /// at host address `addr` inside the buffers of [`Job::iomem_alloc`].
    pub fn queue(
        &mut self,
        fileno: u32,
        op: Op,
        offset: u64,
        len: u64,
        addr: usize,
        index: u32,
    ) -> Result<Queued, EngineError> {
        let t = self.split.as_mut().map(TimeSplit::enter);
        let r = self.submit(fileno, op, offset, len, addr, index);
        if let (Some(s), Some(t)) = (self.split.as_mut(), t) {
            s.queue += s.leave(t);
            s.queued += matches!(r, Ok(Queued::Queued)) as u64;
        }
        r
    }

    fn submit(
        &mut self,
        fileno: u32,
        op: Op,
        offset: u64,
        len: u64,
        addr: usize,
        index: u32,
    ) -> Result<Queued, EngineError> {
        let qp = self
            .qp
            .as_mut()
            .ok_or_else(|| EngineError::msg("the job was not started"))?;
        let file = self
            .files
            .get(fileno as usize)
            .and_then(|f| f.as_ref())
            .ok_or_else(|| {
                EngineError::msg(format!("fio file {fileno} is not one of the job's"))
            })?;
        let slot = self
            .slots
            .get_mut(index as usize)
            .ok_or_else(|| EngineError::msg(format!("io_u {index} beyond iodepth")))?;
        if slot.left > 0 {
            return Err(EngineError::msg(format!(
                "io_u {index} is already in flight"
            )));
        }
        slot.failure = None;
        slot.detail.clear();
        let lba = file.lba_size as u64;
        if op != Op::Flush {
            if !offset.is_multiple_of(lba) || !len.is_multiple_of(lba) || len == 0 {
                return Err(EngineError::invalid(format!(
                    "{len} bytes at {offset}: I/O must be whole {lba}-byte LBAs of namespace {}",
                    file.nsid
                )));
            }
            let end = (offset + len) / lba;
            if end > file.blocks {
                return Err(EngineError::invalid(format!(
                    "{len} bytes at {offset}: beyond the end of namespace {} ({} bytes)",
                    file.nsid,
                    file.blocks * lba
                )));
            }
        }
        let tag = index as u64;
        match op {
            Op::Read | Op::Write => {
                let (buf, base) = self.buf.as_ref().ok_or_else(|| {
                    EngineError::msg("no I/O buffers (iomem_alloc was not called)")
                })?;
                let at = addr.wrapping_sub(*base);
                if addr < *base || at as u64 + len > buf.len() as u64 {
                    return Err(EngineError::msg(format!(
                        "io_u {index}'s buffer is not inside the engine's DMA memory"
                    )));
                }
                let pieces =
                    || split_transfer(offset / lba, len / lba, file.lba_size, self.max_transfer);
                // Counted first (no allocation on the I/O path): all of an io_u's commands
                // go in, or none.
                let count = if len <= self.max_transfer as u64 && len / lba <= 1 << 16 {
                    1
                } else {
                    pieces().count()
                };
                if count > qp.free_slots() {
                    if qp.outstanding() == 0 {
                        return Err(EngineError::invalid(format!(
                            "{len} bytes need {count} commands, more than the queue pair holds"
                        )));
                    }
                    return Ok(Queued::Busy);
                }
                let fua = self.params.fua;
                for (n, p) in pieces().enumerate() {
                    let cmd = match op {
                        Op::Read => read_cmd(file.nsid, p.slba, p.blocks),
                        _ => write_cmd(file.nsid, p.slba, p.blocks, fua),
                    };
                    let data =
                        buf.segment_at(at + p.offset as usize, p.blocks as usize * lba as usize);
                    if let Err(e) = qp.submit(cmd, &[data], tag) {
                        if n == 0 {
                            return Err(EngineError::Driver(e));
                        }
                        // The pieces already queued complete the io_u, with this failure.
                        slot.failure = Some(NvmeStatus::INTERNAL_ERROR);
                        slot.detail = e.to_string();
                        break;
                    }
                    slot.left += 1;
                }
            }
            Op::Trim => {
                if qp.free_slots() == 0 {
                    return Ok(Queued::Busy);
                }
                let ranges = self.ranges.as_ref().expect("started");
                let blocks = len / lba;
                if blocks > u32::MAX as u64 {
                    return Err(EngineError::invalid(format!(
                        "a trim of {blocks} LBAs: at most {} per io_u",
                        u32::MAX
                    )));
                }
                let at = index as usize * RANGE;
                let mut r = [0u8; RANGE];
                r[4..8].copy_from_slice(&(blocks as u32).to_le_bytes());
                r[8..16].copy_from_slice(&(offset / lba).to_le_bytes());
                ranges.write_bytes(at, &r);
                qp.submit(
                    deallocate_cmd(file.nsid, 1),
                    &[ranges.segment_at(at, RANGE)],
                    tag,
                )
                .map_err(EngineError::Driver)?;
                slot.left = 1;
            }
            Op::Flush => {
                if qp.free_slots() == 0 {
                    return Ok(Queued::Busy);
                }
                qp.submit(flush_cmd(file.nsid), &[], tag)
                    .map_err(EngineError::Driver)?;
                slot.left = 1;
            }
        }
        Ok(Queued::Queued)
    }

    /// fio's commit: the doorbell is rung by the next [`Job::getevents`] instead (its poll
    /// rings first), so that everything fio queued before it waits for completions goes out
    /// under one doorbell, as `rnvme perf` and SPDK's delayed submission do. With
    /// `ring_at_commit`, commit rings at once.
    pub fn commit(&mut self) {
        if self.params.ring_at_commit {
            if let Some(qp) = self.qp.as_mut() {
                qp.ring();
            }
        }
    }

    /// Polls until at least `min` io_us completed (or `timeout` passed), at most `max`;
    /// returns how many, readable with [`Job::event`].
    pub fn getevents(&mut self, min: usize, max: usize, timeout: Option<Duration>) -> usize {
        let t = self.split.as_mut().map(TimeSplit::enter);
        let (n, waited) = self.reap(min, max, timeout);
        if let (Some(s), Some(t)) = (self.split.as_mut(), t) {
            s.reap += s.leave(t);
            s.reaps += 1;
            s.waited += waited as u64;
        }
        n
    }

    /// [`Job::getevents`]; also whether its first poll found nothing.
    fn reap(&mut self, min: usize, max: usize, timeout: Option<Duration>) -> (usize, bool) {
        self.events.clear();
        let Some(qp) = self.qp.as_mut() else {
            return (0, false);
        };
        // The deadline in time-stamp counter ticks: no clock read while polling (a guest whose
        // clock source is an emulated HPET pays a VM exit for each). A zero timeout, and any
        // before the tick rate is known, means one pass.
        let deadline = timeout.map(|t| match rnvme_driver::clock::learned_rate() {
            Some(rate) if !t.is_zero() => Ticks::now().after(rate.ticks(t)),
            _ => Ticks(0),
        });
        let mut first = None;
        while self.events.len() < max {
            let room = max - self.events.len();
            let (slots, events) = (&mut self.slots, &mut self.events);
            let found = qp.poll(room, |c| complete(slots, events, c));
            first.get_or_insert(found == 0);
            if self.events.len() >= min {
                break;
            }
            if deadline.is_some_and(|d| Ticks::now() >= d) {
                break;
            }
            if qp.outstanding() == 0 {
                break;
            }
        }
        (self.events.len(), first.unwrap_or(false))
    }

    /// With `rnvme_stats=1`: one line on where the job thread's time went, per io_u, and the
    /// queue pair's doorbell counts. None without it, or before the tick rate is known.
    pub fn report(&self) -> Option<String> {
        let s = self.split.as_ref()?;
        let rate = rnvme_driver::clock::learned_rate()?;
        let per = |t: u64| rate.nanos(t) as f64 / 1000.0 / s.queued.max(1) as f64;
        let q = self.qp.as_ref()?.stats();
        let per_cmd = |n: u64| n as f64 / q.submitted.max(1) as f64;
        Some(format!(
            "{} io_us; per io_u: {:.2} us submitting, {:.2} us reaping (waiting for the device), \
             {:.2} us in fio between the engine's calls; {} of {} reaps waited; {:.3} submission \
             and {:.3} completion doorbells per command",
            s.queued,
            per(s.queue),
            per(s.reap),
            per(s.between),
            s.waited,
            s.reaps,
            per_cmd(q.sq_doorbells),
            per_cmd(q.cq_doorbells),
        ))
    }

    /// The `i`th io_u of the last [`Job::getevents`]: its index and errno (0: success).
    pub fn event(&self, i: usize) -> Option<(u32, i32)> {
        self.events.get(i).copied()
    }

    /// Why io_u `index` failed, if it did.
    pub fn error_detail(&self, index: u32) -> Option<&str> {
        let s = self.slots.get(index as usize)?;
        s.failure.map(|_| s.detail.as_str())
    }
}

fn complete(slots: &mut [Slot], events: &mut Vec<(u32, i32)>, c: Completion) {
    let Some(s) = slots.get_mut(c.tag as usize) else {
        log::error!(
            "rnvme: a completion for io_u {} the engine never queued",
            c.tag
        );
        return;
    };
    if !c.status.is_success() && s.failure.is_none() {
        s.failure = Some(c.status);
        s.detail = format!("NVMe status {}", c.status);
    }
    s.left = s.left.saturating_sub(1);
    if s.left == 0 {
        let errno = if s.failure.is_some() { EIO } else { 0 };
        events.push((c.tag as u32, errno));
    }
}

/// fio's error for an io_u the device failed (the NVMe status is in the error details).
const EIO: i32 = 5;

fn list(ids: impl Iterator<Item = u32>) -> String {
    let v: Vec<String> = ids.map(|n| n.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        format!("namespace(s) {}", v.join(", "))
    }
}

/// The namespace `target` names on `ctrl`, or why there is none.
pub fn namespace<'a>(
    ctrl: &'a Controller,
    target: &Target,
) -> Result<&'a rnvme_driver::identify::NamespaceInfo, EngineError> {
    ctrl.namespace(target.nsid).map_err(|_| {
        EngineError::msg(format!(
            "{target}: no such active namespace (the controller has {})",
            list(ctrl.namespaces().iter().map(|n| n.nsid))
        ))
    })
}

/// Refuses a block size that is not a whole number of the namespace's LBAs.
fn check_block_size(target: &Target, bs: u64, lba: u32, what: &str) -> Result<(), EngineError> {
    if !bs.is_multiple_of(lba as u64) {
        return Err(EngineError::invalid(format!(
            "{target}: {what} {bs} is not a multiple of the namespace's {lba}-byte LBA"
        )));
    }
    Ok(())
}

impl From<DriverError> for EngineError {
    fn from(e: DriverError) -> Self {
        EngineError::Driver(e)
    }
}
