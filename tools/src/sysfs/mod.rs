//! NVMe controllers on the PCI bus, seen and rebound through sysfs.
//!
//! Every path goes through [`Sysfs::path`], so tests can run against a fake tree:
//! - `/sys/…` lives under the sysfs root: `/sys`, or `$RNVME_SYSFS_ROOT` (the same variable, with
//!   the same meaning, as in `rnvme_driver::vfio`);
//! - the other paths (`/proc/self/mountinfo`, `/proc/self/mounts`, `/proc/swaps`,
//!   `/proc/sys/vm/nr_hugepages`, `/proc/self/limits`, `/proc/self/status`, `/dev/vfio`,
//!   `/etc/passwd`, and [`BOUND_RECORD`]) live under the system root, `/`.
//!
//! [`Sysfs::new`] puts both under one directory (`DIR/sys`, `DIR/proc`, …) for tests.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod binding;
mod devices;
mod memory;

/// PCI class code of an NVMe controller (mass storage, non-volatile memory, NVM Express).
pub const NVME_CLASS: u32 = 0x01_08_02;
/// The kernel driver rnvme needs a controller bound to.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// The kernel's NVMe driver.
pub const NVME_DRIVER: &str = "nvme";
/// Extra locked memory, beyond the hugepages, that a process driving a controller may pin
/// (queues and PRP lists allocated outside the hugepage pool).
pub const MEMLOCK_HEADROOM_MIB: u64 = 64;

/// The hugepage size rnvme allocates DMA memory from, KiB.
pub const HUGEPAGE_KIB: u64 = 2048;
/// The controllers `rnvme setup` bound to vfio-pci, one address a line: what `rnvme reset`
/// without addresses gives back. Under `/run`, which is emptied at boot, as the bindings are.
pub const BOUND_RECORD: &str = "/run/rnvme/bound";
/// Linux capability that exempts a process from the locked-memory limit (CAP_IPC_LOCK).
const CAP_IPC_LOCK: u32 = 14;

/// How long to wait for the kernel to finish a rebind (driver link, `/dev/vfio` node).
const SETTLE: Duration = Duration::from_secs(3);

/// Why a sysfs operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// Reading or writing a file failed.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Not a full PCI address.
    #[error(
        "invalid PCI address {0:?}: expected the full form DDDD:BB:DD.F, such as 0000:00:03.0"
    )]
    InvalidBdf(String),
    /// No such PCI device.
    #[error("{0}: no such PCI device (see `rnvme list`)")]
    NoDevice(String),
    /// The device is not an NVMe controller.
    #[error("{bdf}: not an NVMe controller (PCI class {class:#08x}, expected {NVME_CLASS:#08x})")]
    NotNvme {
        /// The device.
        bdf: String,
        /// Its class code.
        class: u32,
    },
    /// A namespace of the controller is in use.
    #[error("{bdf}: in use: {} (stop using it first, or pass --force)", .reasons.join("; "))]
    InUse {
        /// The controller.
        bdf: String,
        /// What uses it.
        reasons: Vec<String>,
    },
    /// The device has no IOMMU group, so VFIO cannot take it.
    #[error("{0}: no IOMMU group; enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line, VT-d/AMD-Vi in the firmware)")]
    NoIommuGroup(String),
    /// The vfio-pci driver is not available.
    #[error("the vfio-pci driver is not available: {0}")]
    NoVfioDriver(String),
    /// The device did not end up bound to the expected driver.
    #[error("{bdf}: bound to {} instead of {expected} after probing{note}", .actual.as_deref().unwrap_or("no driver"))]
    BindFailed {
        /// The device.
        bdf: String,
        /// The driver wanted.
        expected: String,
        /// The driver it is bound to.
        actual: Option<String>,
        /// What was done about it.
        note: String,
    },
    /// The device node of the IOMMU group did not appear.
    #[error("{bdf}: {} did not appear after binding to vfio-pci", .path.display())]
    NoGroupNode {
        /// The device.
        bdf: String,
        /// The missing node.
        path: PathBuf,
    },
    /// Unknown user name.
    #[error("unknown user {0:?} (not in the system's user database; a numeric uid works too)")]
    UnknownUser(String),
    /// No such NUMA node.
    #[error("NUMA node {node} does not exist (nodes: {})", if .nodes.is_empty() { "none in sysfs".to_string() } else { .nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ") })]
    NoNode {
        /// The node asked for.
        node: u32,
        /// The nodes there are.
        nodes: Vec<u32>,
    },
    /// A PCI_ALLOWED or PCI_BLOCKED entry that is not a PCI address.
    #[error("{var}: {value:?} is not a PCI address (DDDD:BB:DD.F or BB:DD.F)")]
    BadFilter {
        /// The variable.
        var: &'static str,
        /// The entry.
        value: String,
    },
}

type Result<T> = std::result::Result<T, SysfsError>;

/// Checks and normalises (lower-case) a full PCI address `DDDD:BB:DD.F`.
pub fn parse_bdf(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    let ok = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
        && u8::from_str_radix(&s[8..10], 16).is_ok_and(|slot| slot < 0x20);
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(SysfsError::InvalidBdf(s.to_string()))
    }
}

/// A PCI device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PciDevice {
    /// Full PCI address.
    pub bdf: String,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (24 bits).
    pub class: u32,
    /// Bound driver.
    pub driver: Option<String>,
    /// IOMMU group number.
    pub iommu_group: Option<u32>,
    /// `driver_override`, if set.
    pub driver_override: Option<String>,
    /// NUMA node the device is attached to (`None`: the kernel does not know, or no NUMA).
    pub numa_node: Option<u32>,
}

/// A kernel NVMe controller (`/sys/class/nvme/nvmeN`) of a PCI device bound to `nvme`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelController {
    /// `nvme0`, …
    pub name: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Block devices of its namespaces (`nvme0n1`, …), partitions not included.
    pub namespaces: Vec<String>,
}

/// A namespace block device or one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// `nvme0n1`, `nvme0n1p1`, …
    pub name: String,
    /// `major:minor`, when sysfs has it.
    pub dev: Option<String>,
    /// Its sysfs directory.
    pub dir: PathBuf,
}

/// What a namespace block device (or partition) is used for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockUsage {
    /// `nvme0n1`, `nvme0n1p1`, …
    pub name: String,
    /// Where it is mounted.
    pub mounts: Vec<String>,
    /// It is used as swap.
    pub swap: bool,
    /// Devices stacked on it (`dm-0`, `md0`).
    pub holders: Vec<String>,
}

impl BlockUsage {
    /// Whether anything uses it.
    pub fn in_use(&self) -> bool {
        !self.mounts.is_empty() || self.swap || !self.holders.is_empty()
    }

    /// What uses it, one sentence each ("nvme0n1p1 is mounted on /data").
    pub fn reasons(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .mounts
            .iter()
            .map(|p| format!("{} is mounted on {p}", self.name))
            .collect();
        if self.swap {
            v.push(format!("{} is used as swap", self.name));
        }
        if !self.holders.is_empty() {
            v.push(format!(
                "{} is held by {}",
                self.name,
                self.holders.join(", ")
            ));
        }
        v
    }
}

/// NVMe controllers split by whether they are in use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Controllers not in use, by address.
    pub free: Vec<String>,
    /// Controllers in use, with what uses them.
    pub busy: Vec<(String, Vec<String>)>,
    /// Controllers `PCI_ALLOWED` or `PCI_BLOCKED` leave out, with which.
    pub excluded: Vec<(String, &'static str)>,
}

/// Result of binding a controller to vfio-pci.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindReport {
    /// The controller.
    pub bdf: String,
    /// Driver it was bound to before (`None`: no driver).
    pub previous_driver: Option<String>,
    /// It already was bound to vfio-pci; nothing was changed.
    pub already_bound: bool,
    /// Its IOMMU group.
    pub group: u32,
    /// The group's device node (`/dev/vfio/<group>`).
    pub group_node: PathBuf,
    /// Usage found and ignored because of `force`.
    pub forced_past: Vec<String>,
    /// Why the binding could not be written to [`BOUND_RECORD`], if it could not.
    pub record_error: Option<String>,
}

/// Result of giving a controller back to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetReport {
    /// The controller.
    pub bdf: String,
    /// Driver it was bound to before.
    pub previous_driver: Option<String>,
    /// Driver it is bound to now.
    pub driver: Option<String>,
}

/// Result of reserving hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hugepages {
    /// Pages reserved before.
    pub before: u64,
    /// Pages asked for.
    pub requested: u64,
    /// Pages reserved now.
    pub after: u64,
}

/// Hugepages of one size, on one NUMA node or system-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HugepagePool {
    /// The NUMA node; `None` where sysfs has no NUMA nodes (the counts are system-wide).
    pub node: Option<u32>,
    /// Page size, KiB.
    pub size_kib: u64,
    /// Pages reserved.
    pub total: u64,
    /// Of which not in use.
    pub free: u64,
}

/// The locked-memory limit of this process, which VFIO charges every DMA page against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Memlock {
    /// The soft limit in bytes; `None` for unlimited.
    pub limit_bytes: Option<u64>,
    /// The process has CAP_IPC_LOCK (root has), which VFIO lets pin memory beyond the limit.
    pub privileged: bool,
}

impl Memlock {
    /// Whether `bytes` can be pinned.
    pub fn allows(&self, bytes: u64) -> bool {
        self.privileged || self.limit_bytes.is_none_or(|l| l >= bytes)
    }
}

/// The controllers a set-up or reset may touch, from `PCI_ALLOWED` and `PCI_BLOCKED` (lists of
/// PCI addresses separated by spaces or commas, as SPDK's `setup.sh` reads them): when
/// `PCI_ALLOWED` is set and not empty only the controllers it names, never those
/// `PCI_BLOCKED` names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PciFilter {
    allowed: Option<Vec<String>>,
    blocked: Vec<String>,
}

impl PciFilter {
    /// The filter of the environment.
    pub fn from_env() -> Result<PciFilter> {
        let var = |n: &str| std::env::var(n).ok();
        PciFilter::new(var("PCI_ALLOWED").as_deref(), var("PCI_BLOCKED").as_deref())
    }

    /// The filter of these values of `PCI_ALLOWED` and `PCI_BLOCKED`.
    pub fn new(allowed: Option<&str>, blocked: Option<&str>) -> Result<PciFilter> {
        let list = |var: &'static str, v: &str| -> Result<Vec<String>> {
            v.split(|c: char| c.is_whitespace() || c == ',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    let full = if t.len() == 7 {
                        format!("0000:{t}")
                    } else {
                        t.to_string()
                    };
                    parse_bdf(&full).map_err(|_| SysfsError::BadFilter {
                        var,
                        value: t.to_string(),
                    })
                })
                .collect()
        };
        let allowed = match allowed {
            Some(v) => Some(list("PCI_ALLOWED", v)?).filter(|l| !l.is_empty()),
            None => None,
        };
        Ok(PciFilter {
            allowed,
            blocked: list("PCI_BLOCKED", blocked.unwrap_or(""))?,
        })
    }

    /// Why `bdf` is left alone, or `None` when it may be touched.
    pub fn excludes(&self, bdf: &str) -> Option<&'static str> {
        if self.blocked.iter().any(|b| b == bdf) {
            return Some("listed in PCI_BLOCKED");
        }
        match &self.allowed {
            Some(a) if !a.iter().any(|b| b == bdf) => Some("not listed in PCI_ALLOWED"),
            _ => None,
        }
    }
}

/// Whether rnvme can open a controller, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Access {
    /// rnvme can open it.
    pub usable: bool,
    /// Why not, or how it is reachable.
    pub reason: String,
}

/// 2 MiB hugepages for `HUGEMEM`, the hugepage memory in MiB that SPDK's `setup.sh` reads
/// (rounded up to whole pages).
pub fn hugemem_pages(value: &str) -> std::result::Result<u64, String> {
    let mib: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("HUGEMEM={value:?} is not a number of MiB (such as 2048)"))?;
    Ok(mib.div_ceil(HUGEPAGE_KIB / 1024))
}

/// Locked memory (KiB, the unit of `ulimit -l`) a process needs to map `hugepages` 2 MiB pages
/// for DMA, plus [`MEMLOCK_HEADROOM_MIB`].
pub fn memlock_needed_kib(hugepages: u64) -> u64 {
    (hugepages * 2 + MEMLOCK_HEADROOM_MIB) * 1024
}

/// Octal escapes of `/proc` mount tables (`\040` for a space).
///
/// Kept by hand, with the line-tolerant readers of `/proc/self/mountinfo`, `/proc/self/mounts`
/// and `/proc/swaps` in `devices`: procfs-core's parsers refuse a whole table for one line they
/// cannot read, and a controller whose namespace is mounted must never look free because of
/// it. (procfs-core also has no reader of `/proc/swaps`.)
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `nvme0c1n2` (a multipath path device) → `nvme0n2` (its block device); `nvme0n1` as is;
/// anything else → `None`.
pub fn namespace_block_name(entry: &str) -> Option<String> {
    let rest = entry.strip_prefix("nvme")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    let (ctrl, ns) = rest.split_once('n')?;
    if !digits(ns) {
        return None;
    }
    match ctrl.split_once('c') {
        Some((subsys, path)) if digits(subsys) && digits(path) => {
            Some(format!("nvme{subsys}n{ns}"))
        }
        None if digits(ctrl) => Some(entry.to_string()),
        _ => None,
    }
}

/// sysfs (and friends) under a root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    /// Where sysfs is (`/sys`).
    sys: PathBuf,
    /// Where everything else is (`/`).
    root: PathBuf,
    settle: Duration,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::from_env()
    }
}

impl Sysfs {
    /// Everything under `root`: sysfs at `root/sys`, `/proc` at `root/proc`, and so on.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Sysfs {
            sys: root.join("sys"),
            root,
            settle: SETTLE,
        }
    }

    /// Sets how long to wait for the kernel after a rebind (default 3 s).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The running system: sysfs at `$RNVME_SYSFS_ROOT` if set (a fake sysfs tree), else
    /// `/sys`; everything else at `/`.
    pub fn from_env() -> Self {
        Self::from_env_value(std::env::var_os("RNVME_SYSFS_ROOT"))
    }

    pub(super) fn from_env_value(var: Option<std::ffi::OsString>) -> Self {
        let sys = match var {
            Some(v) if !v.is_empty() => PathBuf::from(v),
            _ => PathBuf::from("/sys"),
        };
        Sysfs {
            sys,
            root: PathBuf::from("/"),
            settle: SETTLE,
        }
    }

    /// The sysfs root.
    pub fn sys_root(&self) -> &Path {
        &self.sys
    }

    /// Where an absolute system path is: under the sysfs root for `/sys/…`, else under the
    /// system root.
    pub fn path(&self, abs: &str) -> PathBuf {
        let rel = abs.trim_start_matches('/');
        match rel.strip_prefix("sys") {
            Some("") => self.sys.clone(),
            Some(rest) if rest.starts_with('/') => self.sys.join(rest.trim_start_matches('/')),
            _ => self.root.join(rel),
        }
    }

    pub(super) fn dev_dir(&self, bdf: &str) -> PathBuf {
        self.path(&format!("/sys/bus/pci/devices/{bdf}"))
    }

    pub(super) fn read(&self, path: &Path) -> Result<String> {
        fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|source| SysfsError::Io {
                what: "read",
                path: path.to_path_buf(),
                source,
            })
    }

    pub(super) fn read_opt(&self, path: &Path) -> Option<String> {
        fs::read_to_string(path).ok().map(|s| s.trim().to_string())
    }

    /// Writes `value` in one `write`, like `echo value > path`.
    pub(super) fn write(&self, path: &Path, value: &str) -> Result<()> {
        log::debug!("write {value:?} to {}", path.display());
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|source| SysfsError::Io {
                what: "write",
                path: path.to_path_buf(),
                source,
            })
    }

    /// The last component of a symlink's target.
    pub(super) fn link_name(&self, path: &Path) -> Option<String> {
        fs::read_link(path)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    pub(super) fn read_hex(&self, path: &Path) -> Result<u32> {
        let s = self.read(path)?;
        u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| SysfsError::Io {
            what: "parse",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, format!("{s:?} is not hex")),
        })
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake sysfs tree for tests.
    use super::*;
    use std::os::unix::fs::symlink;

    pub struct FakeSys {
        _dir: tempfile::TempDir,
        pub sys: Sysfs,
    }

    impl FakeSys {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let sys = Sysfs::new(dir.path()).with_settle(Duration::from_millis(50));
            let f = FakeSys { _dir: dir, sys };
            for d in [
                "/sys/bus/pci/devices",
                "/sys/bus/pci/drivers/nvme",
                "/sys/bus/pci/drivers/vfio-pci",
                "/sys/block",
                "/proc/self",
                "/proc/sys/vm",
                "/dev/vfio",
                "/etc",
            ] {
                fs::create_dir_all(f.p(d)).unwrap();
            }
            for d in ["nvme", "vfio-pci"] {
                fs::write(f.p(&format!("/sys/bus/pci/drivers/{d}/unbind")), "").unwrap();
            }
            f.write("/sys/bus/pci/drivers_probe", "");
            f.write("/proc/self/mountinfo", "");
            f.write("/proc/self/mounts", "");
            f.write("/proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n");
            f.write("/proc/sys/vm/nr_hugepages", "0\n");
            f
        }

        pub fn p(&self, abs: &str) -> PathBuf {
            self.sys.path(abs)
        }

        pub fn write(&self, abs: &str, content: &str) {
            let p = self.p(abs);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }

        pub fn read(&self, abs: &str) -> String {
            fs::read_to_string(self.p(abs)).unwrap()
        }

        /// A PCI device; `driver` and `group` become symlinks like the kernel's.
        pub fn device(&self, bdf: &str, class: u32, driver: Option<&str>, group: Option<u32>) {
            let d = format!("/sys/bus/pci/devices/{bdf}");
            self.write(&format!("{d}/vendor"), "0x1b36\n");
            self.write(&format!("{d}/device"), "0x0010\n");
            self.write(&format!("{d}/class"), &format!("{class:#08x}\n"));
            self.write(&format!("{d}/driver_override"), "(null)\n");
            if let Some(drv) = driver {
                self.set_driver(bdf, Some(drv));
            }
            if let Some(g) = group {
                fs::create_dir_all(self.p(&format!("/sys/kernel/iommu_groups/{g}/devices")))
                    .unwrap();
                symlink(
                    self.p(&format!("/sys/kernel/iommu_groups/{g}")),
                    self.p(&format!("{d}/iommu_group")),
                )
                .unwrap();
                symlink(
                    self.p(&format!("/sys/bus/pci/devices/{bdf}")),
                    self.p(&format!("/sys/kernel/iommu_groups/{g}/devices/{bdf}")),
                )
                .unwrap();
            }
        }

        pub fn set_driver(&self, bdf: &str, driver: Option<&str>) {
            let link = self.p(&format!("/sys/bus/pci/devices/{bdf}/driver"));
            let _ = fs::remove_file(&link);
            if let Some(drv) = driver {
                fs::create_dir_all(self.p(&format!("/sys/bus/pci/drivers/{drv}"))).unwrap();
                let unbind = self.p(&format!("/sys/bus/pci/drivers/{drv}/unbind"));
                if !unbind.exists() {
                    fs::write(unbind, "").unwrap();
                }
                symlink(self.p(&format!("/sys/bus/pci/drivers/{drv}")), link).unwrap();
            }
        }

        /// A kernel controller `nvmeN` with namespaces (entry names as under the controller).
        pub fn kernel_ctrl(&self, bdf: &str, name: &str, entries: &[&str]) {
            let d = format!("/sys/bus/pci/devices/{bdf}/nvme/{name}");
            self.write(&format!("{d}/serial"), &format!("SER-{name}   \n"));
            self.write(&format!("{d}/model"), "QEMU NVMe Ctrl          \n");
            for e in entries {
                fs::create_dir_all(self.p(&format!("{d}/{e}"))).unwrap();
            }
        }

        /// Hugepages of `size_kib` on NUMA node `node` (`None`: the system-wide pool of a
        /// kernel without NUMA).
        pub fn hugepool(&self, node: Option<u32>, size_kib: u64, total: u64, free: u64) {
            let d = match node {
                Some(n) => {
                    format!("/sys/devices/system/node/node{n}/hugepages/hugepages-{size_kib}kB")
                }
                None => format!("/sys/kernel/mm/hugepages/hugepages-{size_kib}kB"),
            };
            self.write(&format!("{d}/nr_hugepages"), &format!("{total}\n"));
            self.write(&format!("{d}/free_hugepages"), &format!("{free}\n"));
        }

        /// A block device with `dev` numbers and optional partitions `(name, dev)`.
        pub fn block(&self, name: &str, dev: &str, parts: &[(&str, &str)]) {
            let d = format!("/sys/block/{name}");
            self.write(&format!("{d}/dev"), &format!("{dev}\n"));
            fs::create_dir_all(self.p(&format!("{d}/holders"))).unwrap();
            for (p, pdev) in parts {
                self.write(&format!("{d}/{p}/dev"), &format!("{pdev}\n"));
                fs::create_dir_all(self.p(&format!("{d}/{p}/holders"))).unwrap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSys;
    use super::*;

    const A: &str = "0000:00:04.0";
    const B: &str = "0000:00:05.0";
    const C: &str = "0000:00:06.0";
    const NIC: &str = "0000:00:02.0";

    #[test]
    fn bdf_parsing() {
        assert_eq!(parse_bdf("0000:00:03.0").unwrap(), "0000:00:03.0");
        assert_eq!(parse_bdf("0000:AF:1f.7").unwrap(), "0000:af:1f.7");
        for bad in [
            "00:03.0",
            "0000:00:03",
            "0000:00:03.8",
            "0000:00:20.0",
            "0000-00:03.0",
            "0000:00:03.0 ",
            "",
            "zzzz:00:03.0",
        ] {
            assert!(
                matches!(parse_bdf(bad), Err(SysfsError::InvalidBdf(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn namespace_names() {
        assert_eq!(namespace_block_name("nvme0n1").as_deref(), Some("nvme0n1"));
        assert_eq!(
            namespace_block_name("nvme0c1n2").as_deref(),
            Some("nvme0n2")
        );
        assert_eq!(
            namespace_block_name("nvme12n3").as_deref(),
            Some("nvme12n3")
        );
        for other in [
            "serial",
            "nvme0",
            "nvme0n",
            "nvme0n1p1",
            "power",
            "nvmexn1",
            "nvme0cn1",
        ] {
            assert_eq!(namespace_block_name(other), None, "{other}");
        }
    }

    #[test]
    fn class_filter_keeps_only_nvme() {
        let f = FakeSys::new();
        f.device(B, NVME_CLASS, Some("nvme"), Some(2));
        f.device(A, NVME_CLASS, None, Some(1));
        f.device(NIC, 0x020000, Some("e1000e"), Some(0));
        // An AHCI controller (mass storage, SATA) is not NVMe either.
        f.device(C, 0x010601, Some("ahci"), Some(3));
        assert_eq!(f.sys.pci_devices().unwrap(), [NIC, A, B, C]);
        assert_eq!(f.sys.nvme_controllers().unwrap(), [A, B]);
        let d = f.sys.device(B).unwrap();
        assert_eq!(
            d,
            PciDevice {
                bdf: B.into(),
                vendor: 0x1b36,
                device: 0x0010,
                class: NVME_CLASS,
                driver: Some("nvme".into()),
                iommu_group: Some(2),
                driver_override: None,
                numa_node: None,
            }
        );
        assert!(matches!(
            f.sys.nvme_device(C),
            Err(SysfsError::NotNvme {
                class: 0x010601,
                ..
            })
        ));
        assert!(matches!(
            f.sys.device("0000:00:1e.0"),
            Err(SysfsError::NoDevice(_))
        ));
    }

    #[test]
    fn kernel_controllers_and_block_devices() {
        let f = FakeSys::new();
        f.device(A, NVME_CLASS, Some("nvme"), Some(1));
        f.kernel_ctrl(A, "nvme0", &["nvme0c0n1", "nvme0c0n2", "power"]);
        f.block(
            "nvme0n1",
            "259:0",
            &[("nvme0n1p1", "259:1"), ("nvme0n1p2", "259:2")],
        );
        f.block("nvme0n2", "259:3", &[]);
        let k = f.sys.kernel_controllers(A);
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].serial, "SER-nvme0");
        assert_eq!(k[0].model, "QEMU NVMe Ctrl");
        assert_eq!(k[0].namespaces, ["nvme0n1", "nvme0n2"]);
        let b: Vec<(String, Option<String>, PathBuf)> = f
            .sys
            .block_devices(A)
            .into_iter()
            .map(|b| (b.name, b.dev, b.dir))
            .collect();
        let dev = |n: &str, d: &str, dir: &str| (n.to_string(), Some(d.to_string()), f.p(dir));
        assert_eq!(
            b,
            [
                dev("nvme0n1", "259:0", "/sys/block/nvme0n1"),
                dev("nvme0n1p1", "259:1", "/sys/block/nvme0n1/nvme0n1p1"),
                dev("nvme0n1p2", "259:2", "/sys/block/nvme0n1/nvme0n1p2"),
                dev("nvme0n2", "259:3", "/sys/block/nvme0n2"),
            ]
        );
    }

    fn busy_tree() -> FakeSys {
        let f = FakeSys::new();
        // A: partition mounted (seen by device number, the mount source is a by-uuid link).
        f.device(A, NVME_CLASS, Some("nvme"), Some(1));
        f.kernel_ctrl(A, "nvme0", &["nvme0n1"]);
        f.block("nvme0n1", "259:0", &[("nvme0n1p1", "259:1")]);
        // B: namespace used as swap and held by device-mapper.
        f.device(B, NVME_CLASS, Some("nvme"), Some(2));
        f.kernel_ctrl(B, "nvme1", &["nvme1n1"]);
        f.block("nvme1n1", "259:4", &[("nvme1n1p1", "259:5")]);
        fs::create_dir_all(f.p("/sys/block/nvme1n1/nvme1n1p1/holders/dm-0")).unwrap();
        // C: free, with an unrelated mount and swap around.
        f.device(C, NVME_CLASS, Some("nvme"), Some(3));
        f.kernel_ctrl(C, "nvme2", &["nvme2n1"]);
        f.block("nvme2n1", "259:8", &[]);
        f.write(
            "/proc/self/mountinfo",
            "22 1 259:1 / /mnt/my\\040data rw,relatime shared:1 - ext4 /dev/disk/by-uuid/x rw\n\
             23 1 8:1 / / rw - ext4 /dev/sda1 rw\n",
        );
        f.write("/proc/self/mounts", "/dev/sda1 / ext4 rw 0 0\n");
        f.write(
            "/proc/swaps",
            "Filename\tType\tSize\tUsed\tPriority\n/dev/nvme1n1\tpartition\t1024\t0\t-2\n/dev/sdb2\tpartition\t1\t0\t-3\n",
        );
        f
    }

    #[test]
    fn in_use_detection() {
        let f = busy_tree();
        assert_eq!(f.sys.usage(A), ["nvme0n1p1 is mounted on /mnt/my data"]);
        assert_eq!(
            f.sys.usage(B),
            ["nvme1n1 is used as swap", "nvme1n1p1 is held by dm-0"]
        );
        assert!(f.sys.usage(C).is_empty());
    }

    #[test]
    fn mounts_by_device_name_count_too() {
        let f = FakeSys::new();
        f.device(A, NVME_CLASS, Some("nvme"), Some(1));
        f.kernel_ctrl(A, "nvme0", &["nvme0n1"]);
        // No dev file: only /proc/self/mounts can tell.
        fs::create_dir_all(f.p("/sys/block/nvme0n1")).unwrap();
        f.write("/proc/self/mounts", "/dev/nvme0n1 /data xfs rw 0 0\n");
        assert_eq!(f.sys.usage(A), ["nvme0n1 is mounted on /data"]);
        fs::create_dir_all(f.p("/sys/block/nvme0n1/holders/md0")).unwrap();
        assert_eq!(
            f.sys.usage(A),
            ["nvme0n1 is mounted on /data", "nvme0n1 is held by md0"]
        );
    }

    #[test]
    fn all_selects_the_free_controllers() {
        let f = busy_tree();
        f.device(NIC, 0x020000, Some("e1000e"), Some(0));
        // Already on vfio-pci, no kernel namespaces: free.
        f.device("0000:00:07.0", NVME_CLASS, Some("vfio-pci"), Some(4));
        let Selection { free, busy, .. } = f.sys.select_all().unwrap();
        assert_eq!(free, [C, "0000:00:07.0"]);
        let busy_bdfs: Vec<&str> = busy.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(busy_bdfs, [A, B]);
        assert_eq!(busy[0].1, ["nvme0n1p1 is mounted on /mnt/my data"]);
        let filter = PciFilter::new(None, Some(C)).unwrap();
        let sel = f.sys.select(&filter).unwrap();
        assert_eq!(sel.free, ["0000:00:07.0"]);
        assert_eq!(sel.excluded, [(C.to_string(), "listed in PCI_BLOCKED")]);
        assert_eq!(sel.busy.len(), 2);
    }

    #[test]
    fn bind_refuses_a_controller_in_use_without_touching_it() {
        let f = busy_tree();
        let e = f.sys.bind_vfio(A, false).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("nvme0n1p1 is mounted on /mnt/my data"),
            "{msg}"
        );
        assert!(msg.contains("--force"), "{msg}");
        assert_eq!(
            f.read(&format!("/sys/bus/pci/devices/{A}/driver_override")),
            "(null)\n"
        );
        assert_eq!(f.read("/sys/bus/pci/drivers/nvme/unbind"), "");
        assert_eq!(f.read("/sys/bus/pci/drivers_probe"), "");
    }

    #[test]
    fn bind_refuses_non_nvme_and_missing_iommu_group() {
        let f = FakeSys::new();
        f.device(NIC, 0x020000, Some("e1000e"), Some(0));
        assert!(matches!(
            f.sys.bind_vfio(NIC, false),
            Err(SysfsError::NotNvme { .. })
        ));
        f.device(A, NVME_CLASS, Some("nvme"), None);
        assert!(matches!(
            f.sys.bind_vfio(A, false),
            Err(SysfsError::NoIommuGroup(_))
        ));
        assert_eq!(f.read("/sys/bus/pci/drivers/nvme/unbind"), "");
    }

    #[test]
    fn bind_writes_the_sysfs_sequence_and_rolls_back_when_nothing_binds() {
        let f = FakeSys::new();
        f.device(C, NVME_CLASS, Some("nvme"), Some(3));
        // Nothing in a fake tree reacts to the writes, so the device stays on nvme.
        let e = f.sys.bind_vfio(C, false).unwrap_err();
        match &e {
            SysfsError::BindFailed { actual, .. } => assert_eq!(actual.as_deref(), Some("nvme")),
            other => panic!("unexpected {other}"),
        }
        assert_eq!(f.read("/sys/bus/pci/drivers/nvme/unbind"), C);
        assert_eq!(f.read("/sys/bus/pci/drivers_probe"), C);
        // The override was set, then cleared again.
        assert_eq!(
            f.read(&format!("/sys/bus/pci/devices/{C}/driver_override")),
            "\n"
        );
    }

    #[test]
    fn bind_of_a_bound_controller_changes_nothing() {
        let f = FakeSys::new();
        f.device(C, NVME_CLASS, Some("vfio-pci"), Some(3));
        let r = f.sys.bind_vfio(C, false).unwrap();
        assert!(r.already_bound);
        assert_eq!(r.group, 3);
        assert_eq!(r.group_node, f.p("/dev/vfio/3"));
        assert_eq!(f.read("/sys/bus/pci/drivers/vfio-pci/unbind"), "");
    }

    #[test]
    fn bind_with_force_reports_what_it_ignored() {
        let f = busy_tree();
        f.set_driver(A, Some("vfio-pci"));
        let r = f.sys.bind_vfio(A, true).unwrap();
        assert_eq!(r.forced_past, ["nvme0n1p1 is mounted on /mnt/my data"]);
    }

    #[test]
    fn missing_vfio_driver_is_not_modprobed_for_a_fake_root() {
        let f = FakeSys::new();
        fs::remove_dir_all(f.p("/sys/bus/pci/drivers/vfio-pci")).unwrap();
        f.device(C, NVME_CLASS, Some("nvme"), Some(3));
        let e = f.sys.bind_vfio(C, false).unwrap_err();
        assert!(matches!(e, SysfsError::NoVfioDriver(_)), "{e}");
        assert_eq!(f.read("/sys/bus/pci/drivers/nvme/unbind"), "");
    }

    #[test]
    fn reset_unbinds_clears_and_probes() {
        let f = FakeSys::new();
        f.device(C, NVME_CLASS, Some("vfio-pci"), Some(3));
        f.write(
            &format!("/sys/bus/pci/devices/{C}/driver_override"),
            "vfio-pci\n",
        );
        let r = f.sys.reset(C).unwrap();
        assert_eq!(r.previous_driver.as_deref(), Some("vfio-pci"));
        assert_eq!(f.read("/sys/bus/pci/drivers/vfio-pci/unbind"), C);
        assert_eq!(
            f.read(&format!("/sys/bus/pci/devices/{C}/driver_override")),
            "\n"
        );
        // The fake kernel leaves the driver link alone, so no probe was needed.
        assert_eq!(f.read("/sys/bus/pci/drivers_probe"), "");
        f.set_driver(C, None);
        let r = f.sys.reset(C).unwrap();
        assert_eq!(r.previous_driver, None);
        assert_eq!(r.driver, None);
        assert_eq!(f.read("/sys/bus/pci/drivers_probe"), C);
    }

    #[test]
    fn hugepages_are_raised_never_lowered() {
        let f = FakeSys::new();
        let h = f.sys.reserve_hugepages(512).unwrap();
        assert_eq!(
            h,
            Hugepages {
                before: 0,
                requested: 512,
                after: 512
            }
        );
        f.write("/proc/sys/vm/nr_hugepages", "1024\n");
        let h = f.sys.reserve_hugepages(512).unwrap();
        assert_eq!(
            h,
            Hugepages {
                before: 1024,
                requested: 512,
                after: 1024
            }
        );
        assert_eq!(f.read("/proc/sys/vm/nr_hugepages"), "1024\n");
    }

    #[test]
    fn users_by_name_or_number() {
        let f = FakeSys::new();
        f.write(
            "/etc/passwd",
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:100::/home/alice:/bin/sh\n",
        );
        assert_eq!(f.sys.lookup_user("alice").unwrap(), (1000, 100));
        assert_eq!(f.sys.lookup_user("1000").unwrap(), (1000, 100));
        assert_eq!(f.sys.lookup_user("2000").unwrap(), (2000, 2000));
        assert!(matches!(
            f.sys.lookup_user("bob"),
            Err(SysfsError::UnknownUser(_))
        ));
    }

    #[test]
    fn users_of_the_real_system_come_from_its_name_service() {
        let sys = Sysfs::new("/");
        assert_eq!(sys.lookup_user("root").unwrap(), (0, 0));
        assert_eq!(sys.lookup_user("0").unwrap(), (0, 0));
        assert!(matches!(
            sys.lookup_user("no-such-user-rnvme"),
            Err(SysfsError::UnknownUser(_))
        ));
    }

    #[test]
    fn hugemem_in_mib() {
        assert_eq!(hugemem_pages("2048"), Ok(1024));
        assert_eq!(hugemem_pages("3"), Ok(2));
        assert_eq!(hugemem_pages("0"), Ok(0));
        assert!(hugemem_pages("2G").unwrap_err().contains("HUGEMEM"));
    }

    #[test]
    fn memlock_need() {
        assert_eq!(memlock_needed_kib(512), (1024 + 64) * 1024);
        assert_eq!(memlock_needed_kib(0), 64 * 1024);
    }

    #[test]
    fn access_reasons() {
        let f = FakeSys::new();
        f.device(A, NVME_CLASS, Some("nvme"), Some(1));
        f.device(B, NVME_CLASS, None, Some(2));
        f.device(C, NVME_CLASS, Some("vfio-pci"), Some(3));
        f.device("0000:00:07.0", NVME_CLASS, Some("vfio-pci"), None);
        let a = f.sys.access(A);
        assert!(!a.usable);
        assert!(
            a.reason.contains("bound to nvme") && a.reason.contains("rnvme setup 0000:00:04.0"),
            "{}",
            a.reason
        );
        assert!(f.sys.access(B).reason.contains("no driver bound"));
        assert!(f
            .sys
            .access("0000:00:07.0")
            .reason
            .contains("no IOMMU group"));
        // C: the container node is missing.
        let c = f.sys.access(C);
        assert!(!c.usable);
        assert!(c.reason.contains("/dev/vfio/vfio"), "{}", c.reason);
        f.write("/dev/vfio/vfio", "");
        assert!(f.sys.access(C).reason.contains("/dev/vfio/3 is missing"));
        f.write("/dev/vfio/3", "");
        let c = f.sys.access(C);
        assert!(c.usable, "{}", c.reason);
        // Another device in group 3 still on a kernel driver spoils it.
        f.device("0000:00:08.0", 0x020000, Some("e1000e"), None);
        std::os::unix::fs::symlink(
            f.p("/sys/bus/pci/devices/0000:00:08.0"),
            f.p("/sys/kernel/iommu_groups/3/devices/0000:00:08.0"),
        )
        .unwrap();
        let c = f.sys.access(C);
        assert!(!c.usable);
        assert!(c.reason.contains("0000:00:08.0 (e1000e)"), "{}", c.reason);
    }

    #[test]
    fn block_usage_per_device() {
        let f = busy_tree();
        let u = f.sys.block_usage(A);
        assert_eq!(
            u,
            [
                BlockUsage {
                    name: "nvme0n1".into(),
                    ..BlockUsage::default()
                },
                BlockUsage {
                    name: "nvme0n1p1".into(),
                    mounts: vec!["/mnt/my data".into()],
                    ..BlockUsage::default()
                },
            ]
        );
        assert!(!u[0].in_use() && u[1].in_use());
        let b = f.sys.block_usage(B);
        assert!(b[0].swap && b[0].holders.is_empty());
        assert_eq!(b[1].holders, ["dm-0"]);
        assert!(f.sys.block_usage(C).iter().all(|b| !b.in_use()));
    }

    #[test]
    fn hugepages_per_node_and_size() {
        let f = FakeSys::new();
        // No NUMA in sysfs: the system-wide pools.
        f.hugepool(None, 2048, 64, 60);
        assert_eq!(f.sys.numa_nodes(), Vec::<u32>::new());
        assert_eq!(
            f.sys.hugepages(),
            [HugepagePool {
                node: None,
                size_kib: 2048,
                total: 64,
                free: 60
            }]
        );
        f.hugepool(Some(1), 2048, 8, 8);
        f.hugepool(Some(0), 1048576, 1, 0);
        f.hugepool(Some(0), 2048, 512, 500);
        fs::create_dir_all(f.p("/sys/devices/system/node/power")).unwrap();
        assert_eq!(f.sys.numa_nodes(), [0, 1]);
        let pools: Vec<(Option<u32>, u64, u64, u64)> = f
            .sys
            .hugepages()
            .iter()
            .map(|p| (p.node, p.size_kib, p.total, p.free))
            .collect();
        assert_eq!(
            pools,
            [
                (Some(0), 2048, 512, 500),
                (Some(0), 1048576, 1, 0),
                (Some(1), 2048, 8, 8)
            ]
        );
        // Per node: raised, never lowered, on that node only.
        let h = f.sys.reserve_node_hugepages(1, 100).unwrap();
        assert_eq!((h.before, h.requested, h.after), (8, 100, 100));
        let h = f.sys.reserve_node_hugepages(0, 100).unwrap();
        assert_eq!((h.before, h.after), (512, 512));
        assert_eq!(
            f.read("/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"),
            "100"
        );
        assert_eq!(
            f.read("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"),
            "512\n"
        );
        assert_eq!(f.read("/proc/sys/vm/nr_hugepages"), "0\n");
        let e = f.sys.reserve_node_hugepages(2, 1).unwrap_err();
        assert_eq!(e.to_string(), "NUMA node 2 does not exist (nodes: 0, 1)");
    }

    #[test]
    fn numa_node_of_a_device() {
        let f = FakeSys::new();
        f.device(A, NVME_CLASS, Some("nvme"), Some(1));
        assert_eq!(f.sys.device(A).unwrap().numa_node, None);
        f.write(&format!("/sys/bus/pci/devices/{A}/numa_node"), "-1\n");
        assert_eq!(f.sys.device(A).unwrap().numa_node, None);
        f.write(&format!("/sys/bus/pci/devices/{A}/numa_node"), "1\n");
        assert_eq!(f.sys.device(A).unwrap().numa_node, Some(1));
    }

    #[test]
    fn memlock_limit_and_capability() {
        let f = FakeSys::new();
        assert_eq!(f.sys.memlock(), None);
        f.write(
            "/proc/self/limits",
            "Limit                     Soft Limit           Hard Limit           Units\n\
             Max open files            1024                 4096                 files\n\
             Max locked memory         8388608              16777216             bytes\n",
        );
        f.write(
            "/proc/self/status",
            "Name:\trnvme\nCapEff:\t0000000000000000\n",
        );
        let m = f.sys.memlock().unwrap();
        assert_eq!(
            m,
            Memlock {
                limit_bytes: Some(8 << 20),
                privileged: false
            }
        );
        assert!(m.allows(8 << 20) && !m.allows((8 << 20) + 1));
        // Root: CAP_IPC_LOCK (bit 14) among all the capabilities.
        f.write("/proc/self/status", "CapEff:\t000001ffffffffff\n");
        assert!(f.sys.memlock().unwrap().allows(u64::MAX));
        f.write(
            "/proc/self/limits",
            "Max locked memory         unlimited            unlimited            bytes\n",
        );
        f.write("/proc/self/status", "CapEff:\t0000000000000000\n");
        let m = f.sys.memlock().unwrap();
        assert_eq!(m.limit_bytes, None);
        assert!(m.allows(u64::MAX));
    }

    #[test]
    fn pci_allowed_and_blocked() {
        let all = PciFilter::new(None, None).unwrap();
        assert_eq!(all.excludes(A), None);
        assert_eq!(PciFilter::new(Some(""), Some(" ")).unwrap(), all);
        let f = PciFilter::new(
            Some("0000:00:04.0 00:05.0"),
            Some("0000:00:05.0,0000:00:06.0"),
        )
        .unwrap();
        assert_eq!(f.excludes(A), None);
        assert_eq!(f.excludes(B), Some("listed in PCI_BLOCKED"));
        assert_eq!(f.excludes(C), Some("listed in PCI_BLOCKED"));
        assert_eq!(
            f.excludes("0000:00:07.0"),
            Some("not listed in PCI_ALLOWED")
        );
        let f = PciFilter::new(None, Some("0000:00:05.0")).unwrap();
        assert_eq!((f.excludes(A), f.excludes(B).is_some()), (None, true));
        let e = PciFilter::new(Some("0000:00:04.0 nvme0"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "PCI_ALLOWED: \"nvme0\" is not a PCI address (DDDD:BB:DD.F or BB:DD.F)"
        );
    }

    #[test]
    fn the_record_of_bound_controllers() {
        let f = FakeSys::new();
        f.device(A, NVME_CLASS, Some("vfio-pci"), Some(1));
        f.device(B, NVME_CLASS, Some("nvme"), Some(2));
        f.device(C, NVME_CLASS, Some("vfio-pci"), Some(3));
        assert!(f.sys.bound_by_rnvme().is_empty());
        f.sys.record_bound(A, true).unwrap();
        f.sys.record_bound(B, true).unwrap();
        f.sys.record_bound(A, true).unwrap();
        assert_eq!(f.read(BOUND_RECORD), format!("{A}\n{B}\n"));
        // B went back to nvme by other means; C was bound by someone else.
        assert_eq!(f.sys.bound_by_rnvme(), [A]);
        // A reset that leaves the controller on vfio-pci keeps it recorded; one that gives it
        // back takes it out.
        f.sys.reset(A).unwrap();
        assert_eq!(f.sys.bound_by_rnvme(), [A]);
        f.set_driver(A, Some("nvme"));
        f.sys.reset(A).unwrap();
        assert_eq!(f.read(BOUND_RECORD), format!("{B}\n"));
        // A controller already on vfio-pci is not recorded by a set-up.
        assert!(f.sys.bind_vfio(C, false).unwrap().already_bound);
        assert_eq!(f.read(BOUND_RECORD), format!("{B}\n"));
    }

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/end\\04"), "/end\\04");
    }

    #[test]
    fn root_from_env_and_paths() {
        let s = Sysfs::new("/fake");
        assert_eq!(s.path("/sys/bus/pci"), PathBuf::from("/fake/sys/bus/pci"));
        assert_eq!(
            Sysfs::new("/").path("/proc/swaps"),
            PathBuf::from("/proc/swaps")
        );
    }
}
