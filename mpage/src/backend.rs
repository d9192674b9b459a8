//! The I/O backend: what the cache needs from a device, asynchronously.
//!
//! Commands are submitted with a tag and complete later, reported by [`BlockIo::poll`]; many
//! may be in flight at once and no thread waits on any of them. The same cache code runs on a
//! controller ([`crate::NvmeBlockIo`]) and on the in-memory [`crate::RecordingDevice`].

use std::fmt;

use rnvme_driver::dma::DmaSlice;
use rnvme_driver::NvmeStatus;

/// What a command does.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoOp {
    /// Read LBAs into memory.
    Read,
    /// Write memory to LBAs.
    Write,
    /// Make written data durable (no data, no LBAs).
    Flush,
}

impl IoOp {
    /// The lower-case name used in traces.
    pub fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
        }
    }
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "Read",
            IoOp::Write => "Write",
            IoOp::Flush => "Flush",
        })
    }
}

/// One command for a backend.
#[derive(Copy, Clone, Debug)]
pub struct IoRequest<'a> {
    /// What to do.
    pub op: IoOp,
    /// First LBA (0 for Flush).
    pub slba: u64,
    /// Number of LBAs (0 for Flush).
    pub lbas: u32,
    /// The memory: frames' IOVAs, in order; their lengths add up to `lbas` × LBA size.
    pub segments: &'a [DmaSlice<'a>],
    /// For traces and logs: the file pages this command carries.
    pub pages: &'a [u64],
    /// For traces and logs: a per-block (fallback) command.
    pub fallback: bool,
}

/// Why a command failed or could not be submitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// No room for another command now: poll for completions, then submit again.
    #[error("the queue is full: poll for completions, then submit again")]
    QueueFull,
    /// The device completed the command with an error status.
    #[error("the device completed it with status {0}")]
    Status(NvmeStatus),
    /// The command could not be submitted (a bad buffer, a dead device, ...).
    #[error("{dev} refused the command: {reason}")]
    Rejected { dev: String, reason: String },
}

impl IoError {
    /// The NVMe status, if the device completed the command with one.
    pub fn status(&self) -> Option<NvmeStatus> {
        match self {
            IoError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// A block device the cache can drive: submit tagged commands, poll for their completions.
pub trait BlockIo {
    /// A name for messages (device and namespace).
    fn name(&self) -> &str;

    /// Bytes per LBA.
    fn lba_size(&self) -> u32;

    /// Largest data transfer of one command in bytes (`u32::MAX` for no limit).
    fn max_transfer(&self) -> u32;

    /// Most commands the device takes at once (sizes readahead); 64 unless told.
    fn queue_depth(&self) -> usize {
        64
    }

    /// Queue a command under `tag`. It need not reach the device before [`BlockIo::kick`] or
    /// [`BlockIo::poll`]. [`IoError::QueueFull`] means: poll, then try again.
    fn submit(&mut self, req: &IoRequest<'_>, tag: u64) -> Result<(), IoError>;

    /// Make sure queued commands reach the device (ring the doorbell).
    fn kick(&mut self) {}

    /// Ask that queued commands reach the device only through [`BlockIo::kick`] (poll and
    /// wait then only reap), for a caller that rings for several commands at once; returns
    /// whether the device does so. One that cannot keeps delivering on poll (returns
    /// `false`, the default). The caller must then kick before it waits for a command.
    fn set_kick_only(&mut self) -> bool {
        false
    }

    /// Reap completed commands, calling `done(tag, result)` for each; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize;

    /// [`BlockIo::poll`] for a caller with nothing to do until a command completes: a device
    /// may wait up to `timeout` for one, polling or sleeping as it is set up to (an NVMe queue
    /// pair's wait mode). Polls once unless the device says otherwise.
    fn wait(
        &mut self,
        timeout: std::time::Duration,
        done: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        let _ = timeout;
        self.poll(done)
    }
}

impl<B: BlockIo + ?Sized> BlockIo for Box<B> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn lba_size(&self) -> u32 {
        (**self).lba_size()
    }
    fn max_transfer(&self) -> u32 {
        (**self).max_transfer()
    }
    fn queue_depth(&self) -> usize {
        (**self).queue_depth()
    }
    fn submit(&mut self, req: &IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        (**self).submit(req, tag)
    }
    fn kick(&mut self) {
        (**self).kick()
    }
    fn set_kick_only(&mut self) -> bool {
        (**self).set_kick_only()
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        (**self).poll(done)
    }
    fn wait(
        &mut self,
        timeout: std::time::Duration,
        done: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        (**self).wait(timeout, done)
    }
}
