//! One submission slot of a queue pair: the command it carries, its list pages, and the
//! shares of memory the command holds until the device is done with it.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::clock::Ticks;
use crate::dma::{DmaBuffer, DmaPool, Mem};
use crate::prp::ListPages;
use crate::spec::{SqEntry, PAGE_SIZE};
use crate::types::Iova;

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
#[derive(Default)]
pub(crate) struct Leases {
    first: Option<Arc<Mem>>,
    more: Vec<Arc<Mem>>,
}

impl Leases {
    #[inline(always)]
    pub(crate) fn push(&mut self, m: Arc<Mem>) {
        if self.first.is_none() {
            self.first = Some(m);
        } else {
            self.more.push(m);
        }
    }

    #[inline(always)]
    pub(crate) fn clear(&mut self) {
        self.first = None;
        if !self.more.is_empty() {
            self.more.clear();
        }
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Arc<Mem>> + '_ {
        self.first.take().into_iter().chain(self.more.drain(..))
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
        for m in self.leases.drain() {
            m.quarantine();
        }
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
