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
//! - [`irq`]: MSI-X interrupts and how a queue pair waits (polled, interrupt, hybrid);
//! - [`aio`]: futures for I/O commands, for any async runtime;
//! - [`controller`]: bring-up, admin commands, I/O queue pair creation, shutdown.

// The unsafe boundary: register access and DMA mapping (`hw`, `vfio`), DMA memory (`dma`),
// the time-stamp counter (`clock`) and the controller model's host memory (`model`). Every
// other module forbids unsafe code (the spec's structures are bytes through zerocopy).
#[forbid(unsafe_code)]
pub mod affinity;
#[forbid(unsafe_code)]
pub mod aio;
pub mod clock;
#[forbid(unsafe_code)]
pub mod controller;
pub mod dma;
#[forbid(unsafe_code)]
pub mod doorbell;
#[forbid(unsafe_code)]
pub mod error;
pub mod hw;
#[forbid(unsafe_code)]
pub mod identify;
#[forbid(unsafe_code)]
pub mod io;
#[forbid(unsafe_code)]
pub mod iova;
#[forbid(unsafe_code)]
pub mod irq;
#[cfg(any(test, feature = "test-utils"))]
pub mod model;
#[forbid(unsafe_code)]
pub mod prp;
#[forbid(unsafe_code)]
pub mod queue;
#[forbid(unsafe_code)]
pub mod reactor;
#[forbid(unsafe_code)]
pub mod sgl;
#[forbid(unsafe_code)]
mod shared;
#[forbid(unsafe_code)]
mod slot;
#[forbid(unsafe_code)]
pub mod spec;
#[forbid(unsafe_code)]
pub mod status;
#[forbid(unsafe_code)]
pub mod types;
pub mod vfio;

pub use error::{Error, Result};
pub use status::NvmeStatus;
pub use types::{CommandId, Iova, Nsid, QueueId, Segment};
