//! Errors of the page cache.

use crate::backend::{IoError, IoOp};
use crate::id::FileId;
use crate::map::MapError;
use crate::pool::PoolError;

/// Why a page (or some of its blocks) could not be read or written. Kept on the page, so it
/// is cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// The block map failed.
    #[error(transparent)]
    Map(MapError),
    /// The block map left a block unmapped although it was asked to allocate it.
    #[error(
        "the block map left file block {file_block} unmapped although it was asked to allocate it"
    )]
    Unmapped { file_block: u64 },
    /// A command failed.
    #[error("{op} of {lbas} LBA(s) at LBA {slba} failed: {source}")]
    Io {
        op: IoOp,
        slba: u64,
        lbas: u32,
        #[source]
        source: IoError,
    },
}

/// Everything the cache's operations can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MpageError {
    /// A page could not be read.
    #[error("{dev}: reading page {page} of file {file}: {source}")]
    Read {
        dev: String,
        file: FileId,
        page: u64,
        #[source]
        source: PageError,
    },
    /// A dirty page could not be written back (it stays dirty; the next sync retries it).
    #[error("{dev}: writing back page {page} of file {file}: {source}; the page stays dirty and the next sync retries it")]
    Write {
        dev: String,
        file: FileId,
        page: u64,
        #[source]
        source: PageError,
    },
    /// The Flush after write-back failed.
    #[error("{dev}: Flush failed: {source}")]
    Flush {
        dev: String,
        #[source]
        source: IoError,
    },
    /// No frame could be had: every page is dirty, locked or under I/O.
    #[error(
        "{dev}: the page cache is full: all {capacity} pages are busy or dirty ({dirty} dirty) and \
         none could be freed; sync the files (a dirty page whose write keeps failing stays in \
         the cache) or give the cache more pages"
    )]
    CacheFull {
        dev: String,
        capacity: usize,
        dirty: usize,
    },
    /// The device stopped completing commands.
    #[error("{dev}: no completion for {ms} ms with {outstanding} command(s) outstanding; the device may be hung, reset it")]
    Timeout {
        dev: String,
        ms: u64,
        outstanding: usize,
    },
    /// The cache waited for something no outstanding command will bring (a bug).
    #[error("{dev}: waiting for {what}, but no command is outstanding that would bring it")]
    Stuck { dev: String, what: String },
    /// The file id is not (or no longer) open.
    #[error("file {0} is not open in this cache")]
    NoSuchFile(FileId),
    /// The file's block size does not fit the device.
    #[error("{dev}: cannot open a file with block size {block_size}: {why}")]
    BadBlockSize {
        dev: String,
        block_size: u32,
        why: String,
    },
    /// The device cannot carry one page per command.
    #[error("{dev}: the max transfer of {max} bytes is less than one 4096-byte page; the cache needs at least one page per command")]
    MaxTransferTooSmall { dev: String, max: u32 },
    /// An offset and length past the largest file offset.
    #[error("offset {offset} + {len} bytes is past the largest file offset")]
    Overflow { offset: u64, len: usize },
    /// A page index past the last page a file can have ([`crate::MAX_PAGE`]).
    #[error(
        "page {page} is past the last page a file can have, {}",
        crate::MAX_PAGE
    )]
    PageOutOfRange { page: u64 },
    /// A file size past the largest a file can have ([`crate::MAX_FILE_SIZE`]).
    #[error(
        "a file of {size} bytes is larger than the largest a file can be, {} bytes",
        crate::MAX_FILE_SIZE
    )]
    TooLarge { size: u64 },
    /// The block map refused to truncate.
    #[error("changing the size of file {file}: {source}")]
    Truncate {
        file: FileId,
        #[source]
        source: MapError,
    },
    /// The page pool could not be made.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A page to be changed is held in place by a [`crate::PageRef`].
    #[error("page {page} of file {file} is held in place by a PageRef: drop it before changing the page")]
    PageHeld { file: FileId, page: u64 },
    /// A shared cache was given no device queue, too many, or a shard it does not have.
    #[error(
        "a shared page cache takes 1 to {max} device queues (one per shard); {given} asked for"
    )]
    Shards { given: usize, max: usize },
    /// A thread panicked while it used a shard of a shared cache.
    #[error("shard {shard} of the page cache is unusable: a thread panicked while using it")]
    Poisoned { shard: usize },
    /// A shard of a shared cache has as many files open as file ids can number.
    #[error("a shard of a shared page cache holds at most {max} open files")]
    TooManyFiles { max: usize },
}
