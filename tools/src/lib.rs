//! rnvme-tools: the `rnvme` command-line tool, and the pieces of it other crates use.
//!
//! - [`vm`]: boots a throwaway QEMU guest with emulated NVMe controllers and runs a script in it
//!   (used by the end-to-end tests, the benchmarks and `rnvme vm run`);
//! - [`perf`]: the engine of `rnvme perf`, a throughput and latency benchmark that runs on any
//!   brought-up controller (a device, or the in-process model);
//! - [`sysfs`]: finds NVMe controllers and moves them between the kernel's `nvme` driver and
//!   `vfio-pci` (`rnvme setup`, `rnvme reset`, `rnvme list`);
//! - [`status`]: hugepages per NUMA node, the locked-memory limit and every controller in one
//!   view (`rnvme status`);
//! - [`nvmecli`]: Identify data and log pages in nvme-cli's JSON (`-o json`).

pub mod nvmecli;
pub mod perf;
pub mod status;
pub mod sysfs;
pub mod vm;
