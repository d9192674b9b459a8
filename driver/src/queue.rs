//! Submission/completion queue pairs, polled.
//!
//! A [`QueuePair`] is owned by one thread and takes no locks: `submit` writes an entry into
//! the submission queue without ringing the doorbell, [`QueuePair::ring`] rings it once for
//! the whole batch, and [`QueuePair::poll`] reaps completions by phase tag, hands each back
//! with the caller's tag and rings the completion doorbell once per poll.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vm_memory::VolatileMemory;

use crate::dma::{DmaBuffer, DmaPool};
use crate::error::{Error, Result};
use crate::hw::Hardware;
use crate::prp::{build_prp, ListPages};
use crate::sgl::build_sgl;
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
}

struct Slot {
    tag: u64,
    busy: bool,
    /// The PRP list / SGL segment page owned by this slot.
    list: DmaBuffer,
    /// Further list pages for long transfers, fetched from the pool on first use and kept.
    extra: Vec<DmaBuffer>,
}

/// List pages of one slot, as the PRP and SGL builders see them.
struct SlotLists<'a> {
    first: &'a DmaBuffer,
    extra: &'a mut Vec<DmaBuffer>,
    pool: &'a DmaPool,
}

impl ListPages for SlotLists<'_> {
    #[inline]
    fn page_iova(&mut self, page: usize) -> Option<Iova> {
        if page == 0 {
            return Some(self.first.iova());
        }
        while self.extra.len() < page {
            match self.pool.alloc(PAGE_SIZE) {
                Ok(b) => self.extra.push(b),
                Err(e) => {
                    log::warn!("no DMA memory for another list page: {e}");
                    return None;
                }
            }
        }
        Some(self.extra[page - 1].iova())
    }

    #[inline]
    fn write_qword(&mut self, page: usize, index: usize, value: u64) {
        let buf = if page == 0 {
            self.first
        } else {
            &self.extra[page - 1]
        };
        buf.write_u64(index * 8, value);
    }
}

/// A submission queue and its completion queue.
pub struct QueuePair {
    qid: u16,
    entries: u16,
    sq: DmaBuffer,
    cq: DmaBuffer,
    sq_tail: u16,
    sq_head: u16,
    rung_tail: u16,
    cq_head: u16,
    phase: bool,
    sq_db: usize,
    cq_db: usize,
    hw: Arc<dyn Hardware>,
    pool: DmaPool,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    mode: DataPointerMode,
    stats: QueueStats,
    /// Owned by one thread: Send but not Sync.
    _not_sync: PhantomData<Cell<()>>,
}

impl QueuePair {
    /// Allocate the rings and slots of a queue pair with `entries` entries per queue (it holds
    /// at most `entries - 1` commands). The controller must then be told about it.
    pub(crate) fn new(
        hw: Arc<dyn Hardware>,
        pool: &DmaPool,
        qid: u16,
        entries: u16,
        dstrd: u8,
    ) -> Result<QueuePair> {
        if entries < 2 {
            return Err(Error::InvalidArgument(format!(
                "queue depth {entries} is too small: at least 2 entries"
            )));
        }
        let sq = pool.alloc(entries as usize * std::mem::size_of::<SqEntry>())?;
        let cq = pool.alloc(entries as usize * std::mem::size_of::<CqEntry>())?;
        let slots = (0..entries - 1)
            .map(|_| {
                Ok(Slot {
                    tag: 0,
                    busy: false,
                    list: pool.alloc(PAGE_SIZE)?,
                    extra: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into_boxed_slice();
        // Pop from the end: hand out low command ids first.
        let free = (0..entries - 1).rev().collect();
        Ok(QueuePair {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_head: 0,
            rung_tail: 0,
            cq_head: 0,
            phase: true,
            sq_db: reg::sq_tail_doorbell(qid, dstrd),
            cq_db: reg::cq_head_doorbell(qid, dstrd),
            hw,
            pool: pool.clone(),
            slots,
            free,
            mode: DataPointerMode::Prp,
            stats: QueueStats::default(),
            _not_sync: PhantomData,
        })
    }

    /// The queue identifier.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Entries per queue.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// How many commands can be outstanding at once (entries − 1).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Room for more commands.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The data pointer kind used for commands with data.
    pub fn data_pointer_mode(&self) -> DataPointerMode {
        self.mode
    }

    pub(crate) fn set_data_pointer_mode_unchecked(&mut self, mode: DataPointerMode) {
        self.mode = mode;
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
    /// refuses is an error and nothing is queued.
    #[inline]
    pub fn submit(&mut self, mut cmd: SqEntry, data: &[Segment], tag: u64) -> Result<CommandId> {
        let Some(&cid) = self.free.last() else {
            self.stats.queue_full += 1;
            return Err(Error::QueueFull);
        };
        if !data.is_empty() {
            let slot = &mut self.slots[cid as usize];
            let mut lists = SlotLists {
                first: &slot.list,
                extra: &mut slot.extra,
                pool: &self.pool,
            };
            match self.mode {
                DataPointerMode::Prp => {
                    let prp = build_prp(data, &mut lists)?;
                    cmd.dptr1 = prp.prp1;
                    cmd.dptr2 = prp.prp2;
                }
                DataPointerMode::Sgl => {
                    let (d1, d2) = build_sgl(data, &mut lists)?.to_dptr();
                    cmd.cdw0 |= PSDT_SGL;
                    cmd.dptr1 = d1;
                    cmd.dptr2 = d2;
                }
            }
        }
        self.free.pop();
        cmd.set_cid(cid);
        let slot = &mut self.slots[cid as usize];
        slot.tag = tag;
        slot.busy = true;
        let off = self.sq_tail as usize * std::mem::size_of::<SqEntry>();
        self.sq
            .volatile()
            .get_ref::<SqEntry>(off)
            .expect("SQ slot inside the ring")
            .store(cmd);
        self.sq_tail = if self.sq_tail + 1 == self.entries {
            0
        } else {
            self.sq_tail + 1
        };
        self.stats.submitted += 1;
        Ok(CommandId(cid))
    }

    /// Ring the submission doorbell if anything was queued since the last ring.
    #[inline]
    pub fn ring(&mut self) {
        if self.sq_tail != self.rung_tail {
            // The entries must be visible in memory before the device learns of them.
            fence(Ordering::Release);
            self.hw.write32(self.sq_db, self.sq_tail as u32);
            self.rung_tail = self.sq_tail;
            self.stats.sq_doorbells += 1;
        }
    }

    /// Reap up to `max` completions, calling `f` for each; rings the submission doorbell
    /// first if needed and the completion doorbell once at the end. Returns how many were
    /// reaped. Completions for a command id that is not outstanding are counted as spurious
    /// and dropped, so no command ever completes twice.
    #[inline]
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(Completion)) -> usize {
        self.ring();
        self.stats.polls += 1;
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
            let e = cq
                .get_ref::<CqEntry>(off)
                .expect("CQ entry inside the ring")
                .load();
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            n += 1;
            let head = e.sq_head();
            if head < self.entries {
                self.sq_head = head;
            }
            let cid = e.cid();
            match self.slots.get_mut(cid as usize) {
                Some(slot) if slot.busy => {
                    slot.busy = false;
                    self.free.push(cid);
                    self.stats.completed += 1;
                    f(Completion {
                        tag: slot.tag,
                        cid: CommandId(cid),
                        status: NvmeStatus::from_field(e.status_field()),
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
            self.hw.write32(self.cq_db, self.cq_head as u32);
            self.stats.cq_doorbells += 1;
        } else {
            self.stats.idle_polls += 1;
        }
        n
    }

    /// The tags of the commands still outstanding, with their command ids.
    pub fn outstanding_tags(&self) -> Vec<(CommandId, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.busy)
            .map(|(i, s)| (CommandId(i as u16), s.tag))
            .collect()
    }

    /// Forget every outstanding command and reset the ring indices, after the controller
    /// dropped its queues (a reset). Returns the tags that will never complete.
    pub fn abandon_all(&mut self) -> Vec<(CommandId, u64)> {
        let lost = self.outstanding_tags();
        for (cid, _) in &lost {
            self.slots[cid.0 as usize].busy = false;
            self.free.push(cid.0);
        }
        self.sq_tail = 0;
        self.sq_head = 0;
        self.rung_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        self.cq.fill(0);
        lost
    }
}
