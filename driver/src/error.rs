//! The driver's error type. Every error names the device and says what to do where there is
//! something to do.

use crate::hw::HwError;
use crate::prp::PrpError;
use crate::sgl::SglError;
use crate::status::NvmeStatus;
use crate::types::Iova;
use crate::vfio::VfioSetupError;

/// Result with the driver's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the device through VFIO failed.
    #[error(transparent)]
    Vfio(#[from] VfioSetupError),
    /// A DMA mapping failed.
    #[error(transparent)]
    Hw(#[from] HwError),
    /// DMA memory could not be had.
    #[error(transparent)]
    Dma(#[from] crate::dma::DmaError),
    /// A register did not reach the expected state in time.
    #[error("{dev}: timed out after {ms} ms waiting for {what}")]
    RegisterTimeout {
        dev: String,
        what: &'static str,
        ms: u64,
    },
    /// The controller reported a fatal error (CSTS.CFS).
    #[error(
        "{dev}: controller fatal status (CSTS.CFS) during {during}; the controller needs a reset"
    )]
    ControllerFatal { dev: String, during: &'static str },
    /// The controller could not be stopped: disabling it left CSTS.RDY set and a function
    /// level reset did not help. Memory lent to its commands stays quarantined.
    #[error(
        "{dev}: the controller could not be stopped during {during} ({why}); memory lent to its \
         commands is quarantined"
    )]
    ControllerStuck {
        dev: String,
        during: String,
        why: String,
    },
    /// The device is gone: taken back by the kernel, or no longer answering (registers read
    /// all ones).
    #[error(
        "{dev}: device removed (hot-unplugged, removed through sysfs, or no longer answering: \
         registers read all ones)"
    )]
    DeviceRemoved { dev: String },
    /// The controller cannot be driven by this driver.
    #[error("{dev}: unsupported controller: {why}")]
    Unsupported { dev: String, why: String },
    /// A command completed with an error status.
    #[error("{dev}: {command} failed: {status}")]
    Command {
        dev: String,
        command: &'static str,
        status: NvmeStatus,
    },
    /// A command did not complete in time.
    #[error("{dev}: {command} did not complete within {ms} ms")]
    CommandTimeout {
        dev: String,
        command: &'static str,
        ms: u64,
    },
    /// The PRP builder refused a buffer.
    #[error("cannot describe the buffer with PRPs: {0}")]
    Prp(#[from] PrpError),
    /// The SGL builder refused a buffer.
    #[error("cannot describe the buffer with SGLs: {0}")]
    Sgl(#[from] SglError),
    /// A command that may make the device write host memory was given memory that is being
    /// read in place: a [`DmaView`](crate::dma::DmaView) of it is held.
    #[error(
        "the data at IOVA {iova}+{len} is being read in place (a DmaView of it is held): the \
         device may not write it; drop the view, or read into another buffer"
    )]
    BufferViewed { iova: Iova, len: u32 },
    /// The submission queue has no free slot: poll for completions and try again.
    #[error("queue full: poll for completions, then submit again")]
    QueueFull,
    /// A request lies (partly) beyond the namespace.
    #[error("LBA range {lba}..{end} is beyond namespace {nsid}, which has {size} LBAs")]
    LbaOutOfRange {
        nsid: u32,
        lba: u64,
        end: u64,
        size: u64,
    },
    /// The namespace does not exist or is not active.
    #[error("{dev}: namespace {nsid} is not active (active namespaces: {active})")]
    NoSuchNamespace {
        dev: String,
        nsid: u32,
        active: String,
    },
    /// A thread could not be pinned to a CPU.
    #[error(transparent)]
    Affinity(#[from] crate::affinity::AffinityError),
    /// A caller passed something that cannot work.
    #[error("{0}")]
    InvalidArgument(String),
    /// Identify data could not be parsed.
    #[error("{dev}: {source}")]
    Identify {
        dev: String,
        #[source]
        source: crate::identify::IdentifyError,
    },
}

impl Error {
    /// The NVMe status, if this is a command error.
    pub fn status(&self) -> Option<NvmeStatus> {
        match self {
            Error::Command { status, .. } => Some(*status),
            _ => None,
        }
    }
}
