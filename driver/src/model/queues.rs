//! Queue state of the model: submission and completion queues, the completions waiting to be
//! posted, and the set of command identifiers outstanding on each submission queue.

use std::collections::VecDeque;

/// Which command identifiers are outstanding on one submission queue.
pub(super) struct CidSet(Box<[u64]>);

impl CidSet {
    pub fn new() -> CidSet {
        CidSet(vec![0u64; 65536 / 64].into_boxed_slice())
    }
    pub fn contains(&self, cid: u16) -> bool {
        self.0[cid as usize / 64] & (1 << (cid % 64)) != 0
    }
    pub fn insert(&mut self, cid: u16) {
        self.0[cid as usize / 64] |= 1 << (cid % 64);
    }
    pub fn remove(&mut self, cid: u16) {
        self.0[cid as usize / 64] &= !(1 << (cid % 64));
    }
}

/// A submission queue as the controller sees it.
pub(super) struct Sq {
    /// Base IOVA (physically contiguous).
    pub base: u64,
    /// Number of entries.
    pub size: u32,
    /// Next entry to fetch.
    pub head: u32,
    /// Last tail doorbell value.
    pub tail: u32,
    /// Completion queue its completions go to.
    pub cqid: u16,
    /// CIDs fetched and not completed yet.
    pub outstanding: CidSet,
    /// The event index last written for this queue (shadow doorbells).
    pub event_index: Option<u16>,
}

impl Sq {
    pub fn new(base: u64, size: u32, cqid: u16) -> Sq {
        Sq {
            base,
            size,
            head: 0,
            tail: 0,
            cqid,
            outstanding: CidSet::new(),
            event_index: None,
        }
    }
}

/// A completion queue as the controller sees it.
pub(super) struct Cq {
    /// Base IOVA (physically contiguous).
    pub base: u64,
    /// Number of entries.
    pub size: u32,
    /// Last head doorbell value: the first entry the host has not consumed.
    pub head: u32,
    /// Next slot to post into.
    pub tail: u32,
    /// Phase tag of the entries being posted now.
    pub phase: bool,
    /// Completions waiting for the host to free a slot, in order.
    pub waiting: VecDeque<Completion>,
    /// The MSI-X vector signalled when an entry is posted (IEN set at creation).
    pub vector: Option<u16>,
}

impl Cq {
    pub fn new(base: u64, size: u32) -> Cq {
        Cq {
            base,
            size,
            head: 0,
            tail: 0,
            phase: true,
            waiting: VecDeque::new(),
            vector: None,
        }
    }
    /// Entries posted and not yet consumed by the host.
    pub fn used(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }
    /// Whether posting one more entry would overwrite an unconsumed one (a queue of N entries
    /// holds at most N - 1).
    pub fn full(&self) -> bool {
        self.used() == self.size - 1
    }
}

/// A completion the controller has decided on but may not have posted yet.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Completion {
    pub sqid: u16,
    pub cqid: u16,
    pub cid: u16,
    pub dw0: u32,
    /// The 15-bit status field.
    pub status: u16,
    /// SQ head when the command was fetched (reported if the SQ is gone when this is posted).
    pub sq_head: u16,
    /// Whether posting this completion ends the command (false for the second copy of a
    /// duplicated completion and for the rejection of a conflicting CID).
    pub frees_cid: bool,
    /// Post a second copy right after this one.
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_set_bits() {
        let mut s = CidSet::new();
        for cid in [0u16, 63, 64, 65535] {
            assert!(!s.contains(cid));
            s.insert(cid);
            assert!(s.contains(cid));
        }
        s.remove(63);
        assert!(!s.contains(63) && s.contains(64) && s.contains(0));
    }

    #[test]
    fn cq_fullness() {
        let mut cq = Cq::new(0, 4);
        assert_eq!(cq.used(), 0);
        cq.tail = 3;
        assert!(cq.full());
        cq.head = 2;
        assert_eq!(cq.used(), 1);
        cq.tail = 1;
        assert_eq!(cq.used(), 3);
        assert!(cq.full());
    }
}
