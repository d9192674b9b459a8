//! One submission slot of a queue pair: the command it carries, its list pages, and the
//! shares of memory the command holds until the device is done with it.

use std::sync::Arc;

use crate::clock::Ticks;
use crate::dma::{Busy, DmaBuffer, DmaPool, Mem};
use crate::prp::ListPages;
use crate::spec::{SqEntry, PAGE_SIZE};
use crate::types::{Iova, Segment};

pub(crate) struct Slot {
    pub(crate) tag: u64,
    pub(crate) busy: bool,
    /// The command as submitted, for retries.
    pub(crate) cmd: SqEntry,
    /// When it was submitted (or aborted, once aborted).
    pub(crate) submitted: Ticks,
    pub(crate) retries: u8,
    pub(crate) aborted: bool,
    /// Generation of the command id last handed out from this slot (4 bits).
    pub(crate) gen: u8,
    /// The PRP list / SGL segment page owned by this slot.
    pub(crate) list: DmaBuffer,
    /// Further list pages for long transfers, fetched from the pool on first use and kept.
    pub(crate) extra: Vec<DmaBuffer>,
    /// Shares of the memory the command's data lives in, held until its completion is
    /// reaped (or the controller was stopped): the owner dropping its buffer meanwhile does
    /// not give the memory back to the pool.
    pub(crate) leases: Leases,
}

/// The shares of memory one command holds: almost always one buffer, kept inline.
///
/// A command that may make the device write viewable memory ([`DmaPool::alloc_viewable`])
/// also holds writer claims on the pages it may write, so that no view of them is made until
/// the device is done; memory that is not viewable has none, and costs nothing more.
#[derive(Default)]
pub(crate) struct Leases {
    first: Option<Arc<Mem>>,
    /// Further shares and the writer claims: empty in the common case, which clears with one
    /// test (and keeps the slot small).
    more: Vec<More>,
}

/// A share beyond the first, or a writer claim, of one command.
enum More {
    Share(Arc<Mem>),
    /// Writer claims on viewable memory: `pages` pages from `first` (a share too).
    Claim {
        mem: Arc<Mem>,
        first: u32,
        pages: u32,
    },
}

impl Leases {
    #[inline(always)]
    pub(crate) fn push(&mut self, m: Arc<Mem>) {
        if self.first.is_none() {
            self.first = Some(m);
        } else {
            self.more.push(More::Share(m));
        }
    }

    /// Count the command as a writer of the pages `seg` of `m` covers (see
    /// [`Mem::claim_device_write`]), until the leases are cleared. Refused if a page is viewed:
    /// returns where the page is, and why.
    pub(crate) fn claim_device_write(
        &mut self,
        m: &Arc<Mem>,
        seg: Segment,
    ) -> Result<(), (Iova, Busy)> {
        let (first, pages) = m.claim_device_write(seg)?;
        if pages > 0 {
            self.more.push(More::Claim {
                mem: m.clone(),
                first,
                pages,
            });
        }
        Ok(())
    }

    /// The device will not touch the memory again: let go of the shares and claims.
    #[inline(always)]
    pub(crate) fn clear(&mut self) {
        self.first = None;
        if !self.more.is_empty() {
            self.clear_more();
        }
    }

    #[cold]
    fn clear_more(&mut self) {
        for m in self.more.drain(..) {
            if let More::Claim { mem, first, pages } = m {
                mem.release_device_write(first, pages);
            }
        }
    }

    /// The device may still touch the memory: quarantine all of it. The writer claims are
    /// kept forever (forgotten without being released): the pages may still be written, so
    /// they must never be viewed.
    pub(crate) fn quarantine(&mut self) {
        if let Some(m) = self.first.take() {
            m.quarantine();
        }
        for m in self.more.drain(..) {
            match m {
                More::Share(mem) | More::Claim { mem, .. } => mem.quarantine(),
            }
        }
    }
}

impl Drop for Leases {
    /// A slot dropped with its command's memory neither released nor quarantined: the owner
    /// of the queue pair said the controller was stopped
    /// ([`QueuePair::retire`](crate::queue::QueuePair::retire)), so the device no longer
    /// writes it.
    fn drop(&mut self) {
        self.clear();
    }
}

impl Slot {
    /// The device will not touch this slot's memory again: let go of it.
    #[inline]
    pub(crate) fn release(&mut self) {
        self.leases.clear();
    }

    /// The device may still touch this slot's memory: quarantine all of it (data and list
    /// pages), and give the slot fresh list pages. Returns false if the slot cannot be used
    /// again (no memory for a new list page).
    pub(crate) fn quarantine(&mut self, pool: &DmaPool) -> bool {
        self.leases.quarantine();
        self.list.quarantine();
        for b in self.extra.drain(..) {
            b.quarantine();
        }
        match pool.alloc(PAGE_SIZE) {
            Ok(b) => {
                self.list = b;
                true
            }
            Err(e) => {
                log::error!("no DMA memory for a list page to replace a quarantined one: {e}");
                false
            }
        }
    }
}

/// List pages of one slot, as the PRP and SGL builders see them.
pub(crate) struct SlotLists<'a> {
    pub(crate) first: &'a DmaBuffer,
    pub(crate) extra: &'a mut Vec<DmaBuffer>,
    pub(crate) pool: &'a DmaPool,
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
