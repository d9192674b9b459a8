//! rnvme-driver: a userspace NVMe driver.
//!
//! The controller is reached through VFIO: BAR0 is mapped into the process, DMA memory comes
//! from 2 MiB hugepages mapped once into the IOMMU, and I/O queue pairs are polled — no
//! interrupts and no system calls on the I/O path.
//!
//! Layers, bottom up:
//! - [`hw::Hardware`]: register access and DMA mapping, implemented by [`vfio::VfioHardware`]
//!   and, for tests, by the in-process controller model (`model`, feature `test-utils`);
//! - [`dma`]: the DMA memory pool and its buffers ([`dma::DmaBuffer`]);
//! - [`prp`] and [`sgl`]: pure builders of data pointers;
//! - [`queue`]: submission/completion queue pairs;
//! - [`controller`]: bring-up, admin commands, I/O queue pair creation, shutdown.

pub mod affinity;
pub mod clock;
pub mod controller;
pub mod dma;
pub mod doorbell;
pub mod error;
pub mod hw;
pub mod identify;
pub mod io;
pub mod iova;
#[cfg(any(test, feature = "test-utils"))]
pub mod model;
pub mod prp;
pub mod queue;
pub mod reactor;
pub mod sgl;
mod slot;
pub mod spec;
pub mod status;
pub mod types;
pub mod vfio;

pub use error::{Error, Result};
pub use status::NvmeStatus;
pub use types::{CommandId, Iova, Nsid, QueueId, Segment};
