//! End-to-end test support: boot QEMU guests with emulated NVMe controllers, drive them with the
//! statically linked `rnvme` (and test binaries) through VFIO, and check the results against the
//! guest kernel's own NVMe driver and nvme-cli.
//!
//! - [`guest`]: building the static binaries once per test binary, running a guest (at most
//!   [`MAX_PARALLEL_GUESTS`] at a time per test binary) and the shell helpers every script gets;
//! - [`steps`]: the protocol by which a script reports each command's status, stdout and stderr
//!   to the host, and assertions on them;
//! - [`exercise`]: the per-matrix-entry workload (identify against nvme-cli, data both ways
//!   between rnvme and the kernel, every admin and I/O command) and its checks.
//!
//! Tests never skip: a missing QEMU, kernel or nvme-cli is installed by the runner when root,
//! and otherwise fails the test with the runner's message.

pub mod exercise;
pub mod guest;
pub mod steps;

pub use guest::{
    fio_engine, rnvme_binary, run_guest, test_binary, workspace_root, GuestRun,
    MAX_PARALLEL_GUESTS, PRELUDE,
};
pub use steps::{Step, Steps};
