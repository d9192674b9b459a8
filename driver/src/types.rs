//! Newtypes that keep units apart: an IOVA is not a virtual address, a queue id is not a
//! command id.

use std::fmt;

/// An I/O virtual address: what the device puts on the bus, translated by the IOMMU.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

impl Iova {
    /// The address `bytes` further on.
    #[inline]
    pub const fn add(self, bytes: u64) -> Iova {
        Iova(self.0 + bytes)
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A queue identifier: 0 is the admin queue pair, 1.. are I/O queue pairs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(pub u16);

/// A command identifier (CID), unique among the commands outstanding on one submission queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(pub u16);

/// A namespace identifier (1-based).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nsid(pub u32);

/// One piece of a scattered data buffer, as the device sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Where the piece starts on the bus.
    pub iova: Iova,
    /// Its length in bytes.
    pub len: u32,
}

impl AsRef<Segment> for Segment {
    #[inline(always)]
    fn as_ref(&self) -> &Segment {
        self
    }
}

impl Segment {
    /// A segment of `len` bytes at `iova`.
    #[inline]
    pub const fn new(iova: Iova, len: u32) -> Segment {
        Segment { iova, len }
    }
}
