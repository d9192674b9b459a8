//! Submission/completion queue pairs, polled.
//!
//! A [`QueuePair`] is owned by one thread and takes no locks: `submit` writes an entry into
//! the submission queue without ringing the doorbell, [`QueuePair::ring`] rings it once for
//! the whole batch, and [`QueuePair::poll`] reaps completions by phase tag, hands each back
//! with the caller's tag and rings the completion doorbell once per poll.

use std::cell::Cell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::VolatileMemory;

use crate::clock::{self, Ticks};
use crate::dma::{Busy, DmaError, DmaPool, DmaSlice, Mem, PlainBuffer};
pub use crate::doorbell::need_event;
pub(crate) use crate::doorbell::Shadow;
use crate::error::{Error, Result};
use crate::hw::Hardware;
use crate::irq::{Interrupt, WaitMode};
use crate::prp::build_prp;
use crate::sgl::{build_sgl, dword_aligned};
use crate::slot::{Leases, Slot, SlotLists};

mod recovery;
use crate::spec::{reg, CqEntry, SqEntry, PAGE_SIZE, PSDT_SGL};
use crate::status::NvmeStatus;
use crate::types::{CommandId, Iova, Segment};

/// How data buffers are described to the controller.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub enum DataPointerMode {
    /// Physical Region Page entries and lists (every controller supports them).
    #[default]
    Prp,
    /// Scatter-gather lists (only when the controller reports SGL support).
    Sgl,
    /// Chosen per command: PRPs when the data fits the two entries of the command (one
    /// contiguous piece of at most two pages), SGLs when PRPs would need a list. Only when the
    /// controller reports SGL support; PRPs otherwise.
    Auto,
}

/// Whether `data` fits the command's two PRP entries: one piece over at most two pages.
#[inline(always)]
fn fits_two_prps(data: &[DmaSlice<'_>]) -> bool {
    match data {
        [s] => (s.iova.0 & (PAGE_SIZE as u64 - 1)) + s.len as u64 <= 2 * PAGE_SIZE as u64,
        _ => false,
    }
}

/// Whether a command with `opcode` may make the device write host memory. Bits 1:0 of an
/// NVMe opcode give its data transfer direction: 01b is host to controller (the device only
/// reads the data); 10b (controller to host) and 11b (both ways) write it, and 00b (no data)
/// is taken to write it too, should such a command come with data.
#[inline]
fn device_writes(opcode: u8) -> bool {
    opcode & 3 != 0b01
}

/// Why memory given to a submission was refused.
#[derive(Copy, Clone, Debug)]
enum Refusal {
    /// The data is quarantined memory.
    Quarantined(Segment),
    /// The command may make the device write data that is being read in place.
    Viewed(Segment),
    /// A page of the data (at this IOVA) already counts the most writers it can.
    Saturated(Iova),
}

/// Lend quarantined or viewable memory to a command: `d` is the first slice of a run of
/// slices of one such buffer in `data`. Quarantined memory is refused. If the command (its
/// `opcode`) may make the device write its data, the first run of a viewable buffer claims
/// the pages of every slice of that buffer in `data` for it: a viewed page refuses the
/// command. Claims made before a refusal stay in `leases`, which the caller clears.
#[cold]
#[inline(never)]
fn lend_special(
    leases: &mut Leases,
    d: &DmaSlice<'_>,
    opcode: u8,
    data: &[DmaSlice<'_>],
) -> std::result::Result<(), Refusal> {
    let m = d.mem();
    if m.is_quarantined() {
        return Err(Refusal::Quarantined(d.segment()));
    }
    if !device_writes(opcode) {
        return Ok(());
    }
    let mut first_run = false;
    for s in data {
        first_run |= std::ptr::eq(s, d);
        if Arc::ptr_eq(s.mem(), m) {
            if !first_run {
                // An earlier run of this buffer claimed all of its slices.
                return Ok(());
            }
            claim_device_writes(leases, std::slice::from_ref(s))?;
        }
    }
    Ok(())
}

/// Count a command as a writer of the pages of every viewable slice of `data`, in `leases`.
/// Claims made before a refusal stay in `leases`, which the caller clears.
fn claim_device_writes(
    leases: &mut Leases,
    data: &[DmaSlice<'_>],
) -> std::result::Result<(), Refusal> {
    for d in data.iter().filter(|d| d.mem().is_viewable()) {
        leases
            .claim_device_write(d.mem(), d.segment())
            .map_err(|(page, why)| match why {
                Busy::Saturated => Refusal::Saturated(page),
                Busy::Viewed | Busy::Written => Refusal::Viewed(d.segment()),
            })?;
    }
    Ok(())
}

/// One completed command.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag the caller gave at submission.
    pub tag: u64,
    /// The command identifier it ran under.
    pub cid: CommandId,
    /// Its status.
    pub status: NvmeStatus,
    /// Command specific result (completion DW0).
    pub dw0: u32,
}

impl Completion {
    /// DW0 on success, the status otherwise.
    pub fn result(&self) -> std::result::Result<u32, NvmeStatus> {
        if self.status.is_success() {
            Ok(self.dw0)
        } else {
            Err(self.status)
        }
    }
}

/// Counters that make batching visible.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Commands written into the submission queue.
    pub submitted: u64,
    /// Completions handed back.
    pub completed: u64,
    /// Submission doorbell writes.
    pub sq_doorbells: u64,
    /// Completion doorbell writes.
    pub cq_doorbells: u64,
    /// Calls to poll.
    pub polls: u64,
    /// Calls to poll that found nothing.
    pub idle_polls: u64,
    /// Completions for a command id that was not outstanding (ignored).
    pub spurious: u64,
    /// Submissions refused because the queue was full.
    pub queue_full: u64,
    /// Commands resubmitted after a retryable error.
    pub retries: u64,
    /// Commands that outlived their deadline.
    pub timeouts: u64,
    /// Abort commands sent for them.
    pub aborts: u64,
    /// Controller resets this queue pair went through.
    pub resets: u64,
    /// Commands completed by the driver itself (reset or removal) instead of the device.
    pub cancelled: u64,
    /// Of those, commands whose memory (data, list pages) was quarantined: the controller
    /// could not be shown to have stopped (no reaped completion, no CSTS.RDY = 0, no reset).
    pub quarantined: u64,
    /// Submissions refused because their data was quarantined memory.
    pub quarantined_refused: u64,
    /// Submissions refused because the device would have written memory that is being read
    /// in place (a [`DmaView`](crate::dma::DmaView) of it is held).
    pub viewed_refused: u64,
    /// Submission queue tails written to the shadow doorbell (each may or may not have needed
    /// an MMIO doorbell as well: those are counted in `sq_doorbells`).
    pub sq_shadow_writes: u64,
    /// Completion queue heads written to the shadow doorbell.
    pub cq_shadow_writes: u64,
    /// Sleeps on the interrupt vector (interrupt and hybrid modes).
    pub sleeps: u64,
    /// Of those, sleeps an interrupt ended (the rest ran out of time).
    pub wakeups: u64,
    /// Interrupts of the queue pair's vector consumed, by its waits or by whoever reaps for
    /// it (an async reaper); signals that arrive together count once.
    pub interrupts: u64,
}

/// What a queue pair needs from its controller to recover from a lost command, a fatal
/// controller status or a reset: implemented by the controller for I/O queue pairs.
pub(crate) trait Recovery: Send + Sync {
    /// Ask the controller to abort a command: whether it says it did, or None when the Abort
    /// command itself failed (the admin queue does not answer: only a reset can help).
    fn abort(&self, sqid: u16, cid: u16) -> Option<bool>;
    /// Reset the controller unless it was reset since generation `seen`; returns the
    /// generation after the reset.
    fn reset(&self, seen: u64, why: &str) -> Result<u64>;
    /// The current reset generation.
    fn generation(&self) -> u64;
    /// Create this queue pair's queues again on the controller (after a reset).
    fn recreate(&self, qp: &QueuePair) -> Result<()>;
    /// This queue pair's shadow doorbells, if the controller uses them now (asked again after
    /// every reset).
    fn shadow(&self, qid: u16) -> Option<Shadow>;
    /// How many times the controller was seen stopped: disabled with CSTS.RDY read 0, or
    /// through a function level reset. A command outstanding before it can no longer be
    /// touching memory.
    fn quiesces(&self) -> u64;
}

/// Low bits of a command id: the slot. High bits: a generation bumped at every submission from
/// that slot, so a late or duplicated completion of an earlier command from the same slot is
/// recognised as stale instead of completing the command now in the slot.
const CID_INDEX_BITS: u32 = 12;
const CID_INDEX_MASK: u16 = (1 << CID_INDEX_BITS) - 1;
/// The largest queue the command id layout allows (4095 commands in flight).
pub const MAX_QUEUE_ENTRIES: u32 = 1 << CID_INDEX_BITS;

/// The longest a hybrid wait spins, however slow recent completions were.
const MAX_HYBRID_SPIN: Duration = Duration::from_millis(1);

/// Polls between health checks while commands are outstanding.
const CHECK_EVERY: u32 = 1024;
/// How often a failing command is retried when the controller allows it (DNR clear).
pub const DEFAULT_RETRIES: u8 = 3;
/// How long a command may take before it is aborted, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Write `cmd` at the tail of the submission queue ring `sq` of `entries` entries.
#[inline]
fn push_entry(sq: &PlainBuffer, tail: &mut u16, entries: u16, cmd: &SqEntry) {
    let off = *tail as usize * std::mem::size_of::<SqEntry>();
    // One 64-byte volatile store, as eight qwords (zerocopy checks the sizes match).
    let qwords: [u64; 8] = zerocopy::transmute!(*cmd);
    sq.volatile()
        .get_ref::<[u64; 8]>(off)
        .expect("SQ slot inside the ring")
        .store(qwords);
    *tail = if *tail + 1 == entries { 0 } else { *tail + 1 };
}

/// A submission queue and its completion queue.
pub struct QueuePair {
    qid: u16,
    entries: u16,
    /// Entries of the completion queue: at least `entries`. The surplus lets the head doorbell
    /// be rung once per many completions instead of after every poll that reaped one.
    cq_entries: u16,
    /// Completions reaped since the head doorbell was last rung; rung once it would exceed
    /// `cq_entries - entries`. The controller then always sees room for every command that can
    /// be outstanding (at most `entries - 1`), so it never waits for the doorbell.
    cq_unrung: u16,
    sq: PlainBuffer,
    cq: PlainBuffer,
    sq_tail: u16,
    sq_head: u16,
    rung_tail: u16,
    cq_head: u16,
    phase: bool,
    sq_db: usize,
    cq_db: usize,
    /// Shadow doorbells, when the controller has them configured.
    shadow: Option<Shadow>,
    /// Ring at every submission rather than once per batch.
    ring_each: bool,
    /// Ring the MMIO doorbells whatever the event index says (the admin queue: controllers
    /// differ on whether its doorbells are shadowed).
    always_mmio: bool,
    /// The completion queue head last written to the shadow doorbell.
    shadow_cq_head: u16,
    hw: Arc<dyn Hardware>,
    pool: DmaPool,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    mode: DataPointerMode,
    /// The controller requires SGL data blocks to be dword aligned (SGLS = 10b).
    sgl_dword: bool,
    stats: QueueStats,
    recovery: Option<Arc<dyn Recovery>>,
    generation: u64,
    /// The controller's reset generation, read at every submission: an idle queue pair learns
    /// of a reset before it rings a queue the reset deleted.
    generation_now: Arc<AtomicU64>,
    /// [`Recovery::quiesces`] when the outstanding commands were last accounted for.
    quiesce_seen: u64,
    /// Completions to hand out at the next poll before any new one: commands the driver
    /// cancelled outside a poll, and completions a synchronous helper reaped for others.
    deferred: VecDeque<Completion>,
    /// The owner said what happened to the controller's use of this queue pair's memory
    /// ([`QueuePair::retire`]); without that, dropping it quarantines everything live.
    retired: bool,
    timeout: Duration,
    retry_limit: u8,
    polls_to_check: u32,
    removed: bool,
    /// How [`QueuePair::wait`] waits, and the interrupt vector it sleeps on.
    wait_mode: WaitMode,
    irq: Option<Arc<Interrupt>>,
    /// How long recent waits with commands outstanding took to find a completion.
    recent_wait: Duration,
    /// Test hook: run between the last empty poll and the sleep of [`QueuePair::wait`].
    #[cfg(any(test, feature = "test-utils"))]
    before_sleep: Option<Box<dyn FnMut() + Send>>,
    /// Owned by one thread: Send but not Sync.
    _not_sync: PhantomData<Cell<()>>,
}

impl QueuePair {
    /// Allocate the rings and slots of a queue pair with `entries` submission queue entries (it
    /// holds at most `entries - 1` commands) and `cq_entries` completion queue entries (at
    /// least `entries`). The controller must then be told about it.
    pub(crate) fn new(
        hw: Arc<dyn Hardware>,
        pool: &DmaPool,
        qid: u16,
        (entries, cq_entries): (u16, u16),
        dstrd: u8,
    ) -> Result<QueuePair> {
        if entries < 2 {
            return Err(Error::InvalidArgument(format!(
                "queue depth {entries} is too small: at least 2 entries"
            )));
        }
        if entries as u32 > MAX_QUEUE_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "queue depth {entries} is too large: at most {MAX_QUEUE_ENTRIES} entries"
            )));
        }
        if cq_entries < entries || cq_entries as u32 > MAX_QUEUE_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "completion queue of {cq_entries} entries for a submission queue of {entries}: \
                 it needs {entries} to {MAX_QUEUE_ENTRIES}"
            )));
        }
        let sq = pool.alloc_plain(entries as usize * std::mem::size_of::<SqEntry>())?;
        let cq = pool.alloc_plain(cq_entries as usize * std::mem::size_of::<CqEntry>())?;
        let slots = (0..entries - 1)
            .map(|_| {
                Ok(Slot {
                    tag: 0,
                    busy: false,
                    cmd: SqEntry::default(),
                    submitted: Ticks(0),
                    retries: 0,
                    aborted: false,
                    gen: 0,
                    list: pool.alloc(PAGE_SIZE)?,
                    extra: Vec::new(),
                    leases: Leases::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into_boxed_slice();
        // Pop from the end: hand out low command ids first.
        let free = (0..entries - 1).rev().collect();
        // Deadlines need the tick rate: start learning it now, while nothing is outstanding.
        clock::start_learning_rate();
        Ok(QueuePair {
            qid,
            entries,
            cq_entries,
            cq_unrung: 0,
            sq,
            cq,
            sq_tail: 0,
            sq_head: 0,
            rung_tail: 0,
            cq_head: 0,
            phase: true,
            sq_db: reg::sq_tail_doorbell(qid, dstrd),
            cq_db: reg::cq_head_doorbell(qid, dstrd),
            shadow: None,
            ring_each: false,
            always_mmio: false,
            shadow_cq_head: 0,
            hw,
            pool: pool.clone(),
            slots,
            free,
            mode: DataPointerMode::Prp,
            sgl_dword: false,
            stats: QueueStats::default(),
            recovery: None,
            generation: 0,
            generation_now: Arc::new(AtomicU64::new(0)),
            quiesce_seen: 0,
            deferred: VecDeque::new(),
            retired: false,
            timeout: DEFAULT_TIMEOUT,
            retry_limit: DEFAULT_RETRIES,
            polls_to_check: CHECK_EVERY,
            removed: false,
            wait_mode: WaitMode::Polled,
            irq: None,
            recent_wait: Duration::ZERO,
            #[cfg(any(test, feature = "test-utils"))]
            before_sleep: None,
            _not_sync: PhantomData,
        })
    }

    /// The queue identifier.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Entries of the submission queue.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Entries of the completion queue (at least [`QueuePair::entries`]).
    pub fn cq_entries(&self) -> u16 {
        self.cq_entries
    }

    /// How many commands can be outstanding at once (entries − 1).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        if self.removed {
            return 0;
        }
        self.slots.len() - self.free.len()
    }

    /// Room for more commands.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            interrupts: self.irq.as_ref().map_or(0, |i| i.signals()),
            ..self.stats
        }
    }

    /// The data pointer kind used for commands with data.
    pub fn data_pointer_mode(&self) -> DataPointerMode {
        self.mode
    }

    pub(crate) fn set_data_pointer_mode_unchecked(&mut self, mode: DataPointerMode) {
        self.mode = mode;
    }

    pub(crate) fn set_sgl_dword_aligned(&mut self, required: bool) {
        self.sgl_dword = required;
    }

    pub(crate) fn set_recovery(
        &mut self,
        recovery: Arc<dyn Recovery>,
        generation_now: Arc<AtomicU64>,
        generation: u64,
    ) {
        self.quiesce_seen = recovery.quiesces();
        self.recovery = Some(recovery);
        self.generation_now = generation_now;
        self.generation = generation;
    }

    /// How long a command may take before the driver aborts it (and, if the abort does not
    /// bring it back within the same time again, resets the controller).
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The command deadline.
    pub fn command_timeout(&self) -> Duration {
        self.timeout
    }

    /// How many times a command that fails with a retryable status (DNR clear) is
    /// resubmitted before its error is handed back.
    pub fn set_retry_limit(&mut self, retries: u8) {
        self.retry_limit = retries;
    }

    /// Whether the device was found removed: every later submission fails.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    pub(crate) fn sq_iova(&self) -> Iova {
        self.sq.iova()
    }

    pub(crate) fn cq_iova(&self) -> Iova {
        self.cq.iova()
    }

    /// Queue `cmd` with `data` (empty for commands without data) under `tag`, without ringing
    /// the doorbell. The command id is filled in here. A full queue is an
    /// [`Error::QueueFull`]: poll, then submit again. A buffer the data pointer builder
    /// refuses, or quarantined memory, is an error and nothing is queued.
    ///
    /// The command holds a share of each buffer in `data` until its completion is reaped (or
    /// the controller was stopped): dropping a buffer meanwhile does not free its memory.
    ///
    /// The data and metadata pointers of `cmd` (DPTR, MPTR) are the driver's: built from
    /// `data` (and the metadata buffer of [`QueuePair::submit_with_metadata`]), and cleared
    /// where there is none, so that a command reaches only memory it holds a share of. (A
    /// vendor specific command that carries addresses in other dwords is beyond what the
    /// driver can check.)
    #[inline(always)]
    pub fn submit(&mut self, cmd: SqEntry, data: &[DmaSlice<'_>], tag: u64) -> Result<CommandId> {
        self.submit_inner(cmd, data, None, false, tag)
    }

    /// Queue `cmd` as it is, data pointer included, without data: for the controller's own
    /// commands that hand it queue rings and doorbell pages, memory that is never viewable
    /// and outlives the commands.
    pub(crate) fn submit_raw(&mut self, cmd: SqEntry, tag: u64) -> Result<CommandId> {
        self.submit_inner(cmd, &[], None, true, tag)
    }

    /// [`QueuePair::submit`] with a separate metadata buffer: `metadata` goes into the
    /// command's metadata pointer (MPTR), one contiguous dword-aligned piece, held like the
    /// data until the command is done.
    pub fn submit_with_metadata(
        &mut self,
        cmd: SqEntry,
        data: &[DmaSlice<'_>],
        metadata: DmaSlice<'_>,
        tag: u64,
    ) -> Result<CommandId> {
        if metadata.iova.0 & 3 != 0 || metadata.len == 0 {
            return Err(Error::InvalidArgument(format!(
                "a metadata buffer must be dword aligned and not empty: {}+{}",
                metadata.iova, metadata.len
            )));
        }
        if metadata.mem().is_quarantined() {
            return Err(self.quarantined_data(metadata.segment()));
        }
        self.submit_inner(cmd, data, Some(metadata), false, tag)
    }

    /// `raw`: keep the data and metadata pointers of a command without `data` or `metadata`
    /// as they are (see [`QueuePair::submit_raw`]); otherwise they are cleared.
    #[inline(always)]
    fn submit_inner(
        &mut self,
        mut cmd: SqEntry,
        data: &[DmaSlice<'_>],
        metadata: Option<DmaSlice<'_>>,
        raw: bool,
        tag: u64,
    ) -> Result<CommandId> {
        if self.generation_now.load(Ordering::Relaxed) != self.generation {
            self.reset_noticed_on_submit();
        }
        // A removed device keeps its free list empty, so this one check covers both cases.
        let Some(index) = self.free.pop() else {
            return Err(self.no_slot());
        };
        let slot = &mut self.slots[index as usize];
        if !data.is_empty() {
            // One share per buffer: consecutive slices of one buffer (a page cache's run)
            // take one.
            let mut last: *const Mem = std::ptr::null();
            for d in data {
                let m = d.mem();
                if Arc::as_ptr(m) != last {
                    // One test for plain memory; quarantined or viewable memory is rare.
                    if m.quarantined_or_viewable() {
                        if let Err(r) = lend_special(&mut slot.leases, d, cmd.opcode(), data) {
                            slot.leases.clear();
                            self.free.push(index);
                            return Err(self.refused(r));
                        }
                    }
                    last = Arc::as_ptr(m);
                    slot.leases.push(m.clone());
                }
            }
            let built = {
                let mut lists = SlotLists {
                    first: &slot.list,
                    extra: &mut slot.extra,
                    pool: &self.pool,
                };
                let sgl = match self.mode {
                    DataPointerMode::Prp => false,
                    DataPointerMode::Sgl => true,
                    // A controller that wants dword-aligned SGL data gets PRPs for the
                    // rest (they check alignment themselves).
                    DataPointerMode::Auto => {
                        !fits_two_prps(data) && (!self.sgl_dword || dword_aligned(data))
                    }
                };
                if sgl && self.sgl_dword && !dword_aligned(data) {
                    Err(Error::InvalidArgument(
                        "this controller takes SGL data only at dword-aligned addresses in \
                         whole dwords (Identify SGLS = 10b): align the buffer, or use PRPs"
                            .into(),
                    ))
                } else if sgl {
                    build_sgl(data, &mut lists)
                        .map(|d| (d.to_dptr(), true))
                        .map_err(Error::from)
                } else {
                    build_prp(data, &mut lists)
                        .map(|p| ((p.prp1, p.prp2), false))
                        .map_err(Error::from)
                }
            };
            let slot = &mut self.slots[index as usize];
            match built {
                Ok(((d1, d2), sgl)) => {
                    if sgl {
                        cmd.cdw0 |= PSDT_SGL;
                    }
                    cmd.dptr1 = d1;
                    cmd.dptr2 = d2;
                }
                Err(e) => {
                    slot.leases.clear();
                    self.free.push(index);
                    return Err(e);
                }
            }
        } else if !raw {
            cmd.dptr1 = 0;
            cmd.dptr2 = 0;
        }
        let slot = &mut self.slots[index as usize];
        if metadata.is_none() && !raw {
            cmd.mptr = 0;
        }
        if let Some(m) = metadata {
            slot.leases.push(m.mem().clone());
            if m.mem().is_viewable() && device_writes(cmd.opcode()) {
                if let Err(r) = claim_device_writes(&mut slot.leases, std::slice::from_ref(&m)) {
                    slot.leases.clear();
                    self.free.push(index);
                    return Err(self.refused(r));
                }
            }
            cmd.mptr = m.iova.0;
        }
        slot.gen = (slot.gen + 1) & 0xf;
        let cid = index | ((slot.gen as u16) << CID_INDEX_BITS);
        cmd.set_cid(cid);
        slot.tag = tag;
        slot.busy = true;
        slot.cmd = cmd;
        slot.submitted = Ticks::now();
        slot.retries = 0;
        slot.aborted = false;
        push_entry(&self.sq, &mut self.sq_tail, self.entries, &cmd);
        self.stats.submitted += 1;
        if self.ring_each {
            self.ring();
        }
        Ok(CommandId(cid))
    }

    /// The error for memory a submission refused.
    #[cold]
    fn refused(&mut self, r: Refusal) -> Error {
        match r {
            Refusal::Quarantined(seg) => self.quarantined_data(seg),
            Refusal::Viewed(seg) => {
                self.stats.viewed_refused += 1;
                Error::BufferViewed {
                    iova: seg.iova,
                    len: seg.len,
                }
            }
            Refusal::Saturated(page) => Error::Dma(DmaError::Saturated { iova: page }),
        }
    }

    #[cold]
    fn quarantined_data(&mut self, seg: Segment) -> Error {
        self.stats.quarantined_refused += 1;
        Error::InvalidArgument(format!(
            "the data at IOVA {}+{} is quarantined DMA memory (a command that used it may still              be running in the device): use another buffer",
            seg.iova, seg.len
        ))
    }

    /// The controller was reset since this queue pair last looked: account for its commands
    /// (handed out at the next poll) and create its queues again before submitting more.
    #[cold]
    fn reset_noticed_on_submit(&mut self) {
        let Some(rec) = self.recovery.clone() else {
            return;
        };
        let mut cancelled = Vec::new();
        self.after_reset(rec.as_ref(), &mut |c| cancelled.push(c));
        self.deferred.extend(cancelled);
    }

    /// Hand `c` out at the next poll, before any new completion (for a synchronous helper
    /// that reaped completions of commands that were not its own).
    pub fn defer(&mut self, c: Completion) {
        self.deferred.push_back(c);
    }

    #[cold]
    fn no_slot(&mut self) -> Error {
        if self.removed {
            return Error::DeviceRemoved {
                dev: self.hw.name().to_string(),
            };
        }
        self.stats.queue_full += 1;
        Error::QueueFull
    }

    /// Ring the submission doorbell if anything was queued since the last ring. With shadow
    /// doorbells the tail goes to the shadow doorbell, and the MMIO doorbell is written only
    /// when the controller's event index asks for it.
    #[inline]
    pub fn ring(&mut self) {
        if self.sq_tail != self.rung_tail {
            // The entries must be visible in memory before the device learns of them.
            fence(Ordering::Release);
            let mmio = match &self.shadow {
                None => true,
                Some(sh) => {
                    self.stats.sq_shadow_writes += 1;
                    let asked = sh.update(sh.sq, self.sq_tail, self.rung_tail);
                    self.always_mmio || asked
                }
            };
            if mmio {
                self.hw.write32(self.sq_db, self.sq_tail as u32);
                self.stats.sq_doorbells += 1;
            }
            self.rung_tail = self.sq_tail;
        }
    }

    /// Whether each submission rings (see [`QueuePair::ring`]), so that a controller reading
    /// shadow doorbells picks commands up as they come, or only [`QueuePair::ring`] and
    /// [`QueuePair::poll`] do, once per batch (the default).
    pub fn set_ring_each(&mut self, each: bool) {
        self.ring_each = each;
    }

    /// Whether the queue pair uses shadow doorbells.
    pub fn shadow_doorbells(&self) -> bool {
        self.shadow.is_some()
    }

    /// Use `shadow` doorbells from now on (None: MMIO only). Its dwords are cleared: call this
    /// before the controller is told of the queues.
    pub(crate) fn set_shadow(&mut self, shadow: Option<Shadow>) {
        if let Some(sh) = &shadow {
            sh.clear();
        }
        self.shadow = shadow;
        self.shadow_cq_head = 0;
    }

    pub(crate) fn set_always_mmio(&mut self) {
        self.always_mmio = true;
    }

    /// Reap up to `max` completions, calling `f` for each; rings the submission doorbell
    /// first if needed and, when the completion queue's surplus of entries is used up, the
    /// completion doorbell once at the end. Returns how many were
    /// reaped. Completions for a command id that is not outstanding are counted as spurious
    /// and dropped, so no command ever completes twice.
    ///
    /// Every so often while commands are outstanding, poll also checks their deadlines and
    /// the controller's health: a command past its deadline is aborted, and if that does not
    /// bring it back the controller is reset and the queue pair recreated; a fatal controller
    /// status resets it too; a removed device fails every outstanding command. Commands the
    /// driver had to cancel complete with [`NvmeStatus::ABORTED_BY_RESET`] or
    /// [`NvmeStatus::DEVICE_REMOVED`], so the caller always gets a completion. Failures with
    /// a retryable status are resubmitted up to the retry limit before they are handed back.
    #[inline]
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(Completion)) -> usize {
        self.polls_to_check -= 1;
        if self.polls_to_check == 0 {
            self.polls_to_check = CHECK_EVERY;
            if self.free.len() < self.slots.len() {
                self.maintenance(&mut f);
            }
        }
        self.ring();
        self.stats.polls += 1;
        let mut handed = 0;
        if !self.deferred.is_empty() {
            while handed < max {
                let Some(c) = self.deferred.pop_front() else {
                    break;
                };
                f(c);
                handed += 1;
            }
        }
        let max = max - handed;
        let mut n = 0;
        let cq = self.cq.volatile();
        while n < max {
            let off = self.cq_head as usize * std::mem::size_of::<CqEntry>();
            let dw3 = cq
                .get_ref::<u32>(off + 12)
                .expect("CQ entry inside the ring")
                .load();
            if (dw3 & (1 << 16) != 0) != self.phase {
                break;
            }
            // The phase tag says the entry is complete; read the rest only after it.
            fence(Ordering::Acquire);
            let dwords = cq
                .get_ref::<[u32; 4]>(off)
                .expect("CQ entry inside the ring")
                .load();
            let e: CqEntry = zerocopy::transmute!(dwords);
            self.cq_head += 1;
            if self.cq_head == self.cq_entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            n += 1;
            let head = e.sq_head();
            if head < self.entries {
                self.sq_head = head;
            }
            let cid = e.cid();
            let index = cid & CID_INDEX_MASK;
            match self.slots.get_mut(index as usize) {
                Some(slot) if slot.busy && slot.gen as u16 == cid >> CID_INDEX_BITS => {
                    let field = e.status_field();
                    // Success is the common case: skip decoding and the retry checks.
                    let status = if field == 0 {
                        NvmeStatus::SUCCESS
                    } else {
                        NvmeStatus::from_field(field)
                    };
                    if field != 0
                        && status.is_retryable()
                        && slot.retries < self.retry_limit
                        && !slot.aborted
                        && status != NvmeStatus::ABORT_REQUESTED
                    {
                        slot.retries += 1;
                        slot.submitted = Ticks::now();
                        let cmd = slot.cmd;
                        self.stats.retries += 1;
                        log::debug!(
                            "{}: queue {}: retrying command {cid} after {status}",
                            self.hw.name(),
                            self.qid
                        );
                        push_entry(&self.sq, &mut self.sq_tail, self.entries, &cmd);
                        continue;
                    }
                    slot.busy = false;
                    slot.release();
                    self.free.push(index);
                    self.stats.completed += 1;
                    f(Completion {
                        tag: slot.tag,
                        cid: CommandId(cid),
                        status,
                        dw0: e.dw0,
                    });
                }
                _ => {
                    self.stats.spurious += 1;
                    log::warn!(
                        "{}: queue {}: completion for command id {cid} that is not outstanding (ignored)",
                        self.hw.name(),
                        self.qid
                    );
                }
            }
        }
        if n > 0 {
            // Fewer than `cq_entries` (at most 4096) completions are reaped per call: no
            // overflow.
            self.cq_unrung += n as u16;
            if self.cq_unrung > self.cq_entries - self.entries {
                self.ring_cq_head();
            } else if let Some(sh) = &self.shadow {
                // A shadow head costs a memory write: a controller that reads it sees freed
                // entries at once. The MMIO doorbell waits for the surplus to run out, as
                // without shadows: the controller never finds the queue full before that.
                sh.dbs.store(sh.cq, self.cq_head as u32);
                self.stats.cq_shadow_writes += 1;
            }
        } else if handed == 0 {
            self.stats.idle_polls += 1;
        }
        n + handed
    }

    /// The interrupt vector the completion queue signals, when it waits on interrupts.
    pub fn interrupt(&self) -> Option<&Arc<Interrupt>> {
        self.irq.as_ref()
    }

    /// How [`QueuePair::wait`] waits.
    pub fn wait_mode(&self) -> WaitMode {
        self.wait_mode
    }

    /// Give the queue pair its interrupt vector (before its queues are created).
    pub(crate) fn set_interrupt(&mut self, irq: Option<Arc<Interrupt>>, mode: WaitMode) {
        self.irq = irq;
        self.wait_mode = mode;
    }

    /// Switch between waiting modes. A queue pair created polled has no interrupt vector
    /// (its completion queue was created without interrupts) and can only stay polled; one
    /// created for interrupts can also poll (its interrupts then just go unread).
    pub fn set_wait_mode(&mut self, mode: WaitMode) -> Result<()> {
        if mode.needs_interrupts() && self.irq.is_none() {
            return Err(Error::InvalidArgument(format!(
                "queue {} was created polled: it has no interrupt vector for {} mode",
                self.qid,
                mode.name()
            )));
        }
        self.wait_mode = mode;
        Ok(())
    }

    /// Check deadlines, health and removal at the next poll (after a quiet stretch spent
    /// sleeping rather than polling).
    pub(crate) fn check_soon(&mut self) {
        self.polls_to_check = 1;
    }

    /// Test hook: `f` runs in [`QueuePair::wait`] after its last empty poll, just before it
    /// sleeps (to complete a command exactly in that window).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn set_before_sleep(&mut self, f: Option<Box<dyn FnMut() + Send>>) {
        self.before_sleep = f;
    }

    /// Wait until at least one completion is handed to `f` (at most `max`), or `timeout`
    /// passes; returns how many were. How it waits is the queue pair's [`WaitMode`]: polling,
    /// sleeping on the interrupt vector, or polling for the spin budget and then sleeping.
    /// Deadlines, health checks and removal are watched as in [`QueuePair::poll`].
    pub fn wait(&mut self, max: usize, timeout: Duration, mut f: impl FnMut(Completion)) -> usize {
        let n = self.poll(max, &mut f);
        if n > 0 || timeout.is_zero() {
            return n;
        }
        let start = clock::Stopwatch::start();
        let passed = || start.elapsed();
        let idle = self.free.len() == self.slots.len() && self.deferred.is_empty();
        let spin = match self.wait_mode {
            WaitMode::Polled => timeout,
            WaitMode::Interrupt => Duration::ZERO,
            // Nothing outstanding: nothing can complete, sleep at once.
            WaitMode::Hybrid { .. } if idle => Duration::ZERO,
            // Busy: at least the budget, and twice the recent wait for a completion (a device
            // or host slower than the budget keeps the queue pair polling while busy).
            WaitMode::Hybrid { spin } => spin
                .max(self.recent_wait * 2)
                .min(MAX_HYBRID_SPIN)
                .min(timeout),
        };
        let mut polls = 0u32;
        while !spin.is_zero() {
            let n = self.poll(max, &mut f);
            if n > 0 {
                self.note_wait(passed());
                return n;
            }
            polls += 1;
            // Reading the clock costs more than a poll: every 64th.
            if polls.is_multiple_of(64) && passed() >= spin {
                break;
            }
        }
        if self.irq.is_none() {
            return 0;
        }
        loop {
            let n = self.sleep_once(max, timeout.saturating_sub(passed()), &mut f);
            if n > 0 && !idle {
                self.note_wait(passed());
            }
            if n > 0 || passed() >= timeout {
                return n;
            }
        }
    }

    /// Fold how long a busy wait took into `recent_wait` (an average over about 8 waits).
    fn note_wait(&mut self, waited: Duration) {
        self.recent_wait = (self.recent_wait * 7 + waited.min(MAX_HYBRID_SPIN)) / 8;
    }

    /// Arm, poll once more, and sleep on the vector (at most `left`, and at most 100 ms while
    /// commands are outstanding, so deadlines are checked); then poll. See the module documentation of [`crate::irq`].
    fn sleep_once(&mut self, max: usize, left: Duration, f: &mut impl FnMut(Completion)) -> usize {
        let irq = self.irq.clone().expect("a vector to sleep on");
        irq.arm();
        // The controller learns of every reaped entry before the host sleeps.
        if self.cq_unrung > 0 {
            self.ring_cq_head();
        }
        let n = self.poll(max, &mut *f);
        if n > 0 {
            return n;
        }
        #[cfg(any(test, feature = "test-utils"))]
        if let Some(hook) = self.before_sleep.as_mut() {
            hook();
        }
        self.stats.sleeps += 1;
        // With commands outstanding, wake at least every 100 ms to check their deadlines;
        // with none, every second (the removal watcher does not depend on this).
        let cap = if self.free.len() == self.slots.len() && self.deferred.is_empty() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(100)
        };
        if irq.sleep(left.min(cap)) {
            self.stats.wakeups += 1;
        } else {
            // A quiet stretch: check deadlines, health and removal at this poll.
            self.check_soon();
        }
        self.poll(max, f)
    }

    /// Tell the controller every completion reaped so far.
    #[inline(always)]
    fn ring_cq_head(&mut self) {
        let mmio = match &self.shadow {
            None => true,
            Some(sh) => {
                self.stats.cq_shadow_writes += 1;
                let old = std::mem::replace(&mut self.shadow_cq_head, self.cq_head);
                let asked = sh.update(sh.cq, self.cq_head, old);
                // Past the surplus the controller may be about to find the queue full:
                // ring whatever the event index says.
                self.always_mmio || self.cq_unrung > self.cq_entries - self.entries || asked
            }
        };
        if mmio {
            self.hw.write32(self.cq_db, self.cq_head as u32);
            self.stats.cq_doorbells += 1;
        }
        self.cq_unrung = 0;
    }
}
