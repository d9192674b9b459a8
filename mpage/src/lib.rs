#![forbid(unsafe_code)]
//! rnvme-mpage: a hugepage page cache that turns contiguous block runs into single NVMe
//! commands, modelled on Linux's `fs/mpage.c`.
//!
//! - [`PagePool`]: 4 KiB frames carved from 2 MiB DMA buffers mapped once at start-up.
//! - [`PageCache`]: (file, page) → frame with per-page and per-block state, LRU eviction of
//!   clean pages, write-back of dirty ones when short, and the file API (`read_at`,
//!   `write_at`, `sync`, `set_len`, `readahead`).
//! - [`SharedCache`]: the cache shared by threads, in shards of one device queue each.
//! - [`BlockMap`]: where a file's blocks are (the `get_block` role), with [`Linear`] and
//!   [`ExtentMap`] built in; [`MapSpec`] loads an extent map from MAP.json.
//! - [`BlockIo`]: the asynchronous device interface, implemented by [`NvmeBlockIo`] (a driver
//!   queue pair) and [`RecordingDevice`] (in memory, recording every command).
//! - [`trace()`]: the `rnvme mpage trace` contract.
//!
//! The read path (`read.rs`) and the write path (`write.rs`) follow `mpage_readahead` and
//! `mpage_writepages`: contiguous pages become one command, anything unusual falls back to one
//! command per block.

mod backend;
mod cache;
mod command;
mod completion;
mod error;
pub mod ext;
mod id;
mod index;
mod lru;
mod map;
mod nvme;
mod page;
mod pool;
mod read;
mod readahead;
mod reader;
mod recording;
mod shared;
mod spec;
pub mod trace;
mod write;
mod writeback;
mod writer;

pub use backend::{BlockIo, IoError, IoOp, IoRequest};
pub use cache::{CacheOptions, CacheStats, FileId, PageCache, MAX_FILE_SIZE, MAX_PAGE};
pub use error::{MpageError, PageError};
pub use map::{BlockMap, Extent, ExtentError, ExtentMap, Linear, MapError, MapFlags, Mapping};
pub use nvme::NvmeBlockIo;
pub use page::{BlockBits, PageRef, PageState};
pub use pool::{FrameId, FrameView, PagePool, PoolError, CHUNK_BYTES, FRAMES_PER_CHUNK, PAGE_SIZE};
pub use recording::{
    fill_pattern, pattern_byte, CommandRecord, DataPointer, DiskFill, EventLog, LoggedMap,
    RecordingDevice, SglEntry, TraceEvent, MAX_LBAS_PER_COMMAND,
};
pub use shared::{SharedCache, MAX_SHARDS};
pub use spec::{check_block_size, MapSpec, SpecError};
pub use trace::{
    parse_ops, run_trace, run_trace_with, trace, trace_with, PageReport, TraceError, TraceOp,
    TraceOptions, TraceReport, WRITE_SEED,
};
