//! Submission/completion queue pairs, polled.
//!
//! A [`QueuePair`] is owned by one thread and takes no locks: `submit` writes an entry into
//! the submission queue without ringing the doorbell, [`QueuePair::ring`] rings it once for
//! the whole batch, and [`QueuePair::poll`] reaps completions by phase tag, hands each back
//! with the caller's tag and rings the completion doorbell once per poll.
//!
//! Here the queue pair itself: its rings, slots, counters and settings. Its jobs live beside
//! it: `submit` (data pointers, slots, the ring entry and doorbell), `complete` (reaping by
//! phase tag, retries, the completion doorbell), `wait` (polling, interrupts, hybrid) and
//! `recovery` (deadlines, aborts, resets, removal, quarantine).

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

mod complete;
mod recovery;
mod submit;
mod wait;
use crate::spec::{reg, CqEntry, SqEntry, PAGE_SIZE, PSDT_SGL};
use crate::status::NvmeStatus;
use crate::types::{CommandId, Iova, Segment};
pub use submit::uses_sgl;

/// How data buffers are described to the controller.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub enum DataPointerMode {
    /// Physical Region Page entries and lists (every controller supports them).
    #[default]
    Prp,
    /// Scatter-gather lists (only when the controller reports SGL support).
    Sgl,
    /// Chosen per command: PRPs when the data fits the two entries of the command (one
    /// contiguous piece of at most two pages, or two pieces where PRP1 ends a page and PRP2
    /// starts one), SGLs when PRPs would need a list. Only when the controller reports SGL
    /// support; PRPs otherwise.
    Auto,
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
    /// Maskings and unmaskings of the vector (a hybrid queue pair masks it while polling).
    pub interrupt_masks: u64,
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

/// Polls between health checks while commands are outstanding.
const CHECK_EVERY: u32 = 1024;
/// And at least this long between two that look at the commands' ages (a scan of every
/// slot) or ring the completion doorbell for a controller that may have posted too much (a
/// register write): done at every 1024th poll, they cost a busy queue pair a third of its
/// time in a guest.
const CHECK_INTERVAL: Duration = Duration::from_millis(1);
/// How often a failing command is retried when the controller allows it (DNR clear).
pub const DEFAULT_RETRIES: u8 = 3;
/// How long a command may take before it is aborted, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Poll rings for what was queued since the last ring (see
    /// [`QueuePair::set_ring_on_poll`]).
    ring_on_poll: bool,
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
    /// No deadline scan before this (see [`CHECK_INTERVAL`]); `Ticks(0)`: at the next check.
    next_check: Ticks,
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
            ring_on_poll: true,
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
            next_check: Ticks(0),
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
            interrupt_masks: self.irq.as_ref().map_or(0, |i| i.masks()),
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
}
