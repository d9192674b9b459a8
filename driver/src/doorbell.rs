//! Shadow doorbells (NVMe Doorbell Buffer Config): where a queue pair writes its tails and
//! heads in host memory, and when the controller's event index still asks for an MMIO doorbell.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::dma::DmaWords;
use crate::spec::reg;

/// Whether a doorbell moving from `old` to `new` passes the controller's event index `event`,
/// so that the controller asked to be told by an MMIO write (NVMe Doorbell Buffer Config;
/// Linux's `nvme_dbbuf_need_event`): `event` lies in `[old, new)`, modulo 2^16.
#[inline(always)]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A queue pair's shadow doorbells: its dwords in the controller's shadow doorbell page and
/// event index page (Doorbell Buffer Config).
#[derive(Clone)]
pub(crate) struct Shadow {
    pub(crate) dbs: Arc<DmaWords>,
    pub(crate) eis: Arc<DmaWords>,
    /// Byte offsets of this queue pair's submission tail and completion head dwords.
    pub(crate) sq: usize,
    pub(crate) cq: usize,
}

impl Shadow {
    pub(crate) fn new(dbs: Arc<DmaWords>, eis: Arc<DmaWords>, qid: u16, dstrd: u8) -> Shadow {
        Shadow {
            sq: reg::sq_tail_doorbell(qid, dstrd) - reg::DOORBELL_BASE,
            cq: reg::cq_head_doorbell(qid, dstrd) - reg::DOORBELL_BASE,
            dbs,
            eis,
        }
    }

    /// Write `value` (moving from `old`) to the doorbell dword at `offset`, and say whether the
    /// controller's event index asks for the MMIO doorbell as well. The store must be visible
    /// before the index is read: a controller that stops polling writes its index, then reads
    /// the doorbell.
    #[inline(always)]
    pub(crate) fn update(&self, offset: usize, value: u16, old: u16) -> bool {
        self.dbs.store(offset, value as u32);
        fence(Ordering::SeqCst);
        need_event(self.eis.load(offset) as u16, value, old)
    }

    /// Start from zero, as a newly created queue does (before the controller is told of it).
    pub(crate) fn clear(&self) {
        for w in [&self.dbs, &self.eis] {
            w.store(self.sq, 0);
            w.store(self.cq, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn event_index_arithmetic() {
        // The event index inside [old, new) asks for a doorbell; outside it does not.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 9, 3));
        assert!(!need_event(9, 9, 3), "new itself is not passed");
        assert!(!need_event(2, 9, 3), "before old");
        assert!(!need_event(5, 5, 5), "no movement");
        // Across the 16-bit wrap.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(need_event(0, 2, 0xfffe));
        assert!(!need_event(3, 2, 0xfffe));
    }
}
