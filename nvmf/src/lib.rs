//! rnvme-nvmf: an NVMe over TCP target on the rnvme driver.
//!
//! Namespaces of devices driven by rnvme are exported to any NVMe/TCP initiator (the Linux
//! kernel's `nvme-tcp`, SPDK's, nvme-cli's discovery): the device stays under the userspace
//! driver, and hosts elsewhere use it as a standard fabrics controller.
//!
//! - [`pdu`]: the NVMe/TCP PDUs, their checks, digests;
//! - [`cmd`]: commands and completions as capsules carry them, Connect;
//! - [`target`]: subsystems, fabric controllers, Identify/log/feature data, discovery;
//! - [`conn`]: one connection (one queue): PDUs in and out, admin and fabrics commands,
//!   I/O commands to the device;
//! - [`server`]: listeners, poll threads, shutdown, counters.
#![forbid(unsafe_code)]

pub mod client;
pub mod cmd;
pub mod conn;
pub mod pdu;
pub mod server;
pub mod target;

pub use server::{DeviceWait, Report, ServeOptions, Server, ThreadReport};
pub use target::{Limits, Namespace, Subsystem, Target, DISCOVERY_NQN};

/// Errors of starting a target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {0}: {1}")]
    Listen(std::net::SocketAddr, std::io::Error),
    #[error("{0}: {1}")]
    Device(String, rnvme_driver::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}
