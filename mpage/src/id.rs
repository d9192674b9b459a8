//! The id of a file open in a page cache: below the cache and its errors, which both name it.

use std::fmt;

/// A file open in a [`crate::PageCache`]: the slot it has in the cache, and which of the
/// files that had that slot it is. A slot is used again after a close; an id kept past its
/// file's close names no file (`MpageError::NoSuchFile`), never the file opened after it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    slot: u32,
    generation: u32,
}

impl FileId {
    pub(crate) const fn new(slot: u32, generation: u32) -> FileId {
        FileId { slot, generation }
    }

    /// The slot, an index into the cache's files.
    #[inline(always)]
    pub(crate) fn slot(self) -> usize {
        self.slot as usize
    }

    pub(crate) fn raw_slot(self) -> u32 {
        self.slot
    }

    pub(crate) fn generation(self) -> u32 {
        self.generation
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.generation {
            0 => write!(f, "#{}", self.slot),
            g => write!(f, "#{}.{g}", self.slot),
        }
    }
}
