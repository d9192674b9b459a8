//! The id of a file open in a page cache: below the cache and its errors, which both name it.

use std::fmt;

/// A file open in a [`crate::PageCache`]: the slot it has in the cache, and which of the
/// files that had that slot it is. A slot is used again after a close; an id kept past its
/// file's close names no file (`MpageError::NoSuchFile`), never the file opened after it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(
    /// The slot in the low 32 bits, the generation in the high 32: one word to move and
    /// compare (ids are compared and copied for every page).
    u64,
);

impl FileId {
    pub(crate) const fn new(slot: u32, generation: u32) -> FileId {
        FileId((generation as u64) << 32 | slot as u64)
    }

    /// The slot, an index into the cache's files.
    #[inline(always)]
    pub(crate) fn slot(self) -> usize {
        self.0 as u32 as usize
    }

    #[inline(always)]
    pub(crate) fn raw_slot(self) -> u32 {
        self.0 as u32
    }

    #[inline(always)]
    pub(crate) fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.generation() {
            0 => write!(f, "#{}", self.raw_slot()),
            g => write!(f, "#{}.{g}", self.raw_slot()),
        }
    }
}
