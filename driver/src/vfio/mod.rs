//! The VFIO implementation of [`Hardware`]: a real NVMe controller bound to `vfio-pci`.
//!
//! [`VfioHardware::open`] checks, before touching `/dev/vfio`, everything sysfs can tell about
//! the device (is it an NVMe controller, is it bound to `vfio-pci`, does it have an IOMMU group
//! and can that group be handed to user space), so that each way of failing gets its own error
//! with the command that fixes it. It then opens the VFIO container and device, learns the IOVA
//! ranges the IOMMU accepts, enables memory decoding and bus mastering in PCI config space and
//! maps BAR0 into the process.
//!
//! Register accesses inside the mapped part of BAR0 are single volatile 32-bit loads and
//! stores (`MmioArea`); the few that may fall outside it (a BAR the kernel only lets us map
//! sparsely) go through `pread`/`pwrite` on the device file descriptor.
//!
//! When the kernel wants the device back (hot-unplug, `echo 1 > .../remove`, an unbind), vfio-pci
//! signals the device-request eventfd registered at open and waits for the device to be closed.
//! A watcher thread then releases it at once: BAR0 is swapped for memory that reads all ones, so
//! every queue pair and the controller see a removed device and fail outstanding and later
//! commands with "device removed", and the device file is closed so the removal completes.
//!
//! [`probe`] runs the sysfs checks alone, without opening anything: `rnvme list` uses it to say
//! whether each controller can be opened and, if not, why.

use crate::hw::{Hardware, HwError};
use crate::types::Iova;
use std::fmt;
use std::io;
use std::mem::{offset_of, size_of};
use std::ops::Range;
use std::os::unix::io::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_info, vfio_iommu_type1_info_cap_iova_range,
    vfio_iova_range, VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

// Unsafe code here only where the kernel's VFIO interface needs it: mapping and unmapping DMA
// (`mod`), region and BAR access (`regions`), the IOMMU's ranges (`ranges`), the release of a
// removed device (`removal`).
#[forbid(unsafe_code)]
mod bdf;
#[forbid(unsafe_code)]
mod checks;
#[forbid(unsafe_code)]
mod config;
#[forbid(unsafe_code)]
mod diagnose;
mod ranges;
mod regions;
mod removal;

pub use bdf::*;
pub use checks::*;
use config::*;
use diagnose::*;
use ranges::*;
use regions::*;
use removal::*;

/// PCI class code of an NVM Express controller: mass storage (01), non-volatile memory
/// controller (08), NVM Express programming interface (02).
pub const NVME_CLASS: u32 = 0x01_08_02;

/// `vmm-sys-util`'s `EventFd` (the type `vfio-ioctls` takes for interrupts) as a `BorrowedFd`,
/// for `poll(2)` and async runtimes: it implements only `AsRawFd`.
pub(crate) fn eventfd_as_fd(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `fd`, which keeps it open for as long as it lives, and
    // the borrow cannot outlive `fd`.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: the VFIO ioctls called here directly (vfio-ioctls does
/// not expose them as needed).
const fn vfio_io(nr: libc::c_ulong) -> libc::c_ulong {
    (b';' as libc::c_ulong) << 8 | (100 + nr)
}
/// Set one vector's eventfd (vfio-ioctls only sets whole ranges from vector 0).
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
/// Reset the function, with its result.
const VFIO_DEVICE_RESET: libc::c_ulong = vfio_io(11);

/// The VFIO container device node.
const DEV_VFIO_CONTAINER: &str = "/dev/vfio/vfio";

/// Drivers that do not prevent the kernel from giving an IOMMU group to user space: VFIO
/// itself, and drivers that never let the device do DMA of its own (`pci-stub`; `pcieport`, the
/// driver of PCIe bridges and root ports).
const GROUP_SAFE_DRIVERS: [&str; 3] = ["vfio-pci", "pcieport", "pci-stub"];

/// PCI config space: the command register and the bits rnvme sets in it.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// BAR0 must hold the controller registers (0x0..0x1000) and at least the admin doorbells.
const MIN_BAR0_SIZE: u64 = 0x2000;
/// The first doorbell: the mapped area that covers it is the one checked first on every access.
const DOORBELL_BASE: u64 = 0x1000;

/// IOVA window assumed when the kernel does not report one (kernels before 5.4 lack the IOVA
/// range capability): above the first 64 KiB, below the 39-bit limit of the smallest common
/// IOMMU address width.
const FALLBACK_IOVA_RANGE: Range<u64> = 0x1_0000..1 << 39;

/// `VFIO_IOMMU_GET_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 12)` (linux/vfio.h). `_IO` has no
/// direction and no size bits, so the number is just type << 8 | nr.
const VFIO_IOMMU_GET_INFO: u32 = ((VFIO_TYPE as u32) << 8) | (VFIO_BASE + 12);
const _: () = assert!(VFIO_IOMMU_GET_INFO == 0x3b70);

// The layouts the IOVA range parser relies on (linux/vfio.h).
const _: () = assert!(size_of::<vfio_iommu_type1_info>() == 24);
const _: () = assert!(size_of::<vfio_info_cap_header>() == 8);
const _: () = assert!(size_of::<vfio_iommu_type1_info_cap_iova_range>() == 16);
const _: () = assert!(size_of::<vfio_iova_range>() == 16);

/// Why a controller cannot be opened through VFIO. Every message names the device and says
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VfioSetupError {
    /// The PCI address is not in the full `dddd:bb:dd.f` form.
    #[error(
        "`{bdf}` is not a PCI address: expected the full form dddd:bb:dd.f in lowercase hex \
         (domain:bus:device.function, like 0000:00:03.0){}",
        did_you_mean(.suggestion)
    )]
    BadBdf {
        bdf: String,
        /// The address the user most likely meant, when there is one.
        suggestion: Option<String>,
    },
    /// No such PCI device.
    #[error("no PCI device {bdf}; `rnvme list` shows the NVMe controllers")]
    NoDevice { bdf: String },
    /// A sysfs file of the device could not be read or made no sense.
    #[error(
        "{bdf}: cannot read {}: {source}; check that sysfs is mounted on /sys \
         (or that RNVME_SYSFS_ROOT names a sysfs tree)",
        .path.display()
    )]
    Sysfs {
        bdf: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The device is not an NVMe controller.
    #[error(
        "{bdf} is not an NVMe controller (class {class:#08x}, NVMe is 0x010802); \
         `rnvme list` shows the NVMe controllers"
    )]
    NotNvme { bdf: String, class: u32 },
    /// The device is bound to another driver (usually the kernel's `nvme`).
    #[error("{bdf} is bound to {driver}: bind it with `rnvme setup {bdf}`")]
    WrongDriver { bdf: String, driver: String },
    /// The device is bound to no driver at all.
    #[error("{bdf} is not bound to any driver: bind it to vfio-pci with `rnvme setup {bdf}`")]
    NoDriver { bdf: String },
    /// `/dev/vfio/vfio` is missing.
    #[error("{bdf}: vfio modules not loaded (no /dev/vfio/vfio): modprobe vfio-pci")]
    NoVfioModule { bdf: String },
    /// The VFIO type1 IOMMU backend is not available.
    #[error(
        "{bdf}: the VFIO type1 IOMMU backend is not available: modprobe vfio_iommu_type1, \
         and boot with intel_iommu=on (or amd_iommu=on)"
    )]
    NoType1Iommu { bdf: String },
    /// The device has no IOMMU group: the IOMMU is off.
    #[error(
        "{bdf} has no IOMMU group: boot with intel_iommu=on (or amd_iommu=on) and enable \
         VT-d/AMD-Vi in the firmware setup"
    )]
    NoIommuGroup { bdf: String },
    /// Another device of the IOMMU group is bound to a driver that may do DMA.
    #[error(
        "{bdf}: IOMMU group {group} cannot be given to rnvme because {other}, in the same \
         group, is bound to {driver}: bind it with `rnvme setup {other}` too or unbind it \
         (echo {other} > /sys/bus/pci/devices/{other}/driver/unbind)"
    )]
    GroupNotViable {
        bdf: String,
        group: u32,
        /// The device that spoils the group.
        other: String,
        /// Its driver.
        driver: String,
    },
    /// The kernel says the group is not viable although sysfs showed no offending device.
    #[error(
        "{bdf}: the kernel says IOMMU group {group} is not viable: every device in \
         /sys/kernel/iommu_groups/{group}/devices must be bound to vfio-pci or to no driver; \
         bind them with `rnvme setup` or unbind them"
    )]
    GroupNotViableKernel { bdf: String, group: u32 },
    /// The group (or device) is open in another process.
    #[error(
        "{bdf} is already in use by another process (/dev/vfio/{group} is open): stop that \
         process first (`fuser -v /dev/vfio/{group}` names it)"
    )]
    Busy { bdf: String, group: u32 },
    /// Permission denied on a VFIO device node.
    #[error("no permission on {path} for {bdf}: run as root or `rnvme setup --user NAME {bdf}`")]
    Permission {
        bdf: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// `/dev/vfio/N` does not exist although sysfs shows the group.
    #[error(
        "{bdf}: /dev/vfio/{group} does not exist: the device is not (or no longer) bound to \
         vfio-pci; bind it with `rnvme setup {bdf}`"
    )]
    NoGroupNode { bdf: String, group: u32 },
    /// `VFIO_SET_IOMMU` failed with EPERM: the kernel refuses DMA without interrupt remapping.
    #[error(
        "{bdf}: cannot set the VFIO IOMMU type because interrupt remapping is off: boot with \
         intremap=on or load vfio_iommu_type1 with allow_unsafe_interrupts=1"
    )]
    InterruptRemapping { bdf: String },
    /// Any other VFIO failure.
    #[error("{bdf}: {step} failed: {source}; `dmesg` shows the kernel's reason")]
    Vfio {
        bdf: String,
        /// What was being done.
        step: &'static str,
        #[source]
        source: VfioError,
    },
    /// `VFIO_IOMMU_GET_INFO` failed or returned something unusable.
    #[error(
        "{bdf}: cannot learn the IOVA ranges of the IOMMU: {reason}; rnvme cannot choose safe \
         DMA addresses (`dmesg` may say why)"
    )]
    IommuInfo { bdf: String, reason: String },
    /// VFIO offers no PCI config space region.
    #[error(
        "{bdf}: VFIO offers no PCI config space region: is this a PCI device bound to vfio-pci? \
         (`rnvme setup {bdf}`)"
    )]
    NoConfigRegion { bdf: String },
    /// A PCI config space access failed.
    #[error(
        "{bdf}: cannot {op} {len} bytes of PCI config space at offset {offset:#x}: {source}; \
         check that the device is still present and bound to vfio-pci (`dmesg` may say more)"
    )]
    Config {
        bdf: String,
        /// "read" or "write".
        op: &'static str,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    /// BAR0 cannot be mmapped.
    #[error(
        "{bdf}: VFIO does not allow BAR0 to be mapped (region flags {flags:#x}, size {size:#x}): \
         rnvme needs the controller registers mapped; check `dmesg` and that BAR0 is a memory BAR"
    )]
    BarNotMappable { bdf: String, flags: u32, size: u64 },
    /// BAR0 is too small to hold the registers and doorbells.
    #[error(
        "{bdf}: BAR0 is only {size:#x} bytes, an NVMe controller has at least 0x2000 (registers \
         and doorbells); check with `lspci -vv -s {bdf}` that this is the controller you meant"
    )]
    BarTooSmall { bdf: String, size: u64 },
    /// mmap of a BAR0 area failed.
    #[error(
        "{bdf}: cannot mmap BAR0 bytes {offset:#x}..{end:#x}: {source}; check `dmesg` and the \
         address space limit (`ulimit -v`)",
        end = .offset + .len
    )]
    BarMap {
        bdf: String,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean {s}?"),
        None => String::new(),
    }
}

/// The sysfs root: `/sys`, unless the environment variable `RNVME_SYSFS_ROOT` names another
/// directory (a fake sysfs tree for tests).
pub fn sysfs_root() -> PathBuf {
    sysfs_root_from(std::env::var_os("RNVME_SYSFS_ROOT"))
}

/// [`sysfs_root`] given the value of `RNVME_SYSFS_ROOT` (unset or empty: `/sys`).
fn sysfs_root_from(var: Option<std::ffi::OsString>) -> PathBuf {
    match var {
        Some(root) if !root.is_empty() => PathBuf::from(root),
        _ => PathBuf::from("/sys"),
    }
}

/// An NVMe controller opened through VFIO: BAR0 mapped, config space reachable, DMA mappings
/// made in its container.
pub struct VfioHardware {
    // Field order is drop order: BAR0 is unmapped before the device is closed, and the device
    // is closed before the container. The removal watcher is stopped first, in `Drop::drop`.
    bar: Bar0,
    /// None only while dropping, or when it had to be given up after a removal.
    device: Option<VfioDevice>,
    container: Arc<VfioContainer>,
    link: Arc<Link>,
    watcher: Option<RemovalWatcher>,
    bdf: String,
    group: u32,
    config: ConfigSpace,
    iova_ranges: Vec<Range<u64>>,
}

impl fmt::Debug for VfioHardware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioHardware")
            .field("bdf", &self.bdf)
            .field("iommu_group", &self.group)
            .field("bar0_size", &self.bar.size)
            .field("iova_ranges", &self.iova_ranges)
            .finish_non_exhaustive()
    }
}

impl VfioHardware {
    /// Open the NVMe controller at PCI address `bdf` (full form, `0000:00:03.0`), which must be
    /// bound to `vfio-pci`: check it in sysfs, open its VFIO container and device, learn the
    /// IOVA ranges, enable memory decoding and bus mastering (with INTx disabled: rnvme polls)
    /// and map BAR0.
    pub fn open(bdf: &str) -> Result<VfioHardware, VfioSetupError> {
        let root = sysfs_root();
        let info = probe_at(&root, bdf)?;
        let group = check_ready(&info, Path::new(DEV_VFIO_CONTAINER))?;

        let container = VfioContainer::new(None)
            .map_err(|e| open_error(&root, bdf, group, "opening the VFIO container", e))?;
        let container = Arc::new(container);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&device_dir(&root, bdf), ops, false)
            .map_err(|e| open_error(&root, bdf, group, "opening the VFIO device", e))?;

        let iova_ranges = iova_ranges_of(bdf, &container)?;

        let config = ConfigSpace {
            offset: device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX),
            size: device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX),
        };
        if config.size == 0 {
            return Err(VfioSetupError::NoConfigRegion {
                bdf: bdf.to_string(),
            });
        }
        config.enable_memory_and_bus_master(bdf, device.as_raw_fd())?;

        let bar = map_bar0(bdf, &device)?;
        let link = Arc::new(Link {
            bdf: bdf.to_string(),
            areas: bar.areas().collect(),
            device_fd: device.as_raw_fd(),
            request: register_request(bdf, &device),
            released: AtomicBool::new(false),
            lock: Mutex::new(()),
        });
        let watcher = RemovalWatcher::spawn(link.clone()).unwrap_or_else(|e| {
            log::warn!(
                "{bdf}: cannot start the removal watcher ({e}): a removal of the device waits \
                 until rnvme closes it"
            );
            None
        });
        let hw = VfioHardware {
            bar,
            device: Some(device),
            container,
            link,
            watcher,
            bdf: bdf.to_string(),
            group,
            config,
            iova_ranges,
        };
        log::info!(
            "{bdf}: opened through VFIO (IOMMU group {group}, BAR0 {:#x} bytes)",
            hw.bar.size
        );
        Ok(hw)
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The IOMMU group (`/dev/vfio/N`).
    pub fn iommu_group(&self) -> u32 {
        self.group
    }

    /// Whether the kernel took the device back (hot-unplug, sysfs `remove`, unbind): registers
    /// read all ones and every command fails with "device removed".
    pub fn is_released(&self) -> bool {
        self.link.is_released()
    }

    /// The device file descriptor for a config space access, or the error that says the device
    /// is gone.
    fn config_fd(
        &self,
        op: &'static str,
        offset: u64,
        len: usize,
    ) -> Result<RawFd, VfioSetupError> {
        if self.link.is_released() {
            return Err(VfioSetupError::Config {
                bdf: self.bdf.clone(),
                op,
                offset,
                len,
                source: io::Error::new(io::ErrorKind::NotFound, "the device was removed"),
            });
        }
        Ok(self.link.device_fd)
    }

    /// Read one byte of PCI config space.
    pub fn config_read_u8(&self, offset: u64) -> Result<u8, VfioSetupError> {
        self.config
            .read::<1>(&self.bdf, self.config_fd("read", offset, 1)?, offset)
            .map(|b| b[0])
    }

    /// Read a little-endian 16-bit value of PCI config space.
    pub fn config_read_u16(&self, offset: u64) -> Result<u16, VfioSetupError> {
        self.config
            .read::<2>(&self.bdf, self.config_fd("read", offset, 2)?, offset)
            .map(u16::from_le_bytes)
    }

    /// Read a little-endian 32-bit value of PCI config space.
    pub fn config_read_u32(&self, offset: u64) -> Result<u32, VfioSetupError> {
        self.config
            .read::<4>(&self.bdf, self.config_fd("read", offset, 4)?, offset)
            .map(u32::from_le_bytes)
    }

    /// Write a little-endian 16-bit value of PCI config space.
    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<(), VfioSetupError> {
        self.config.write(
            &self.bdf,
            self.config_fd("write", offset, 2)?,
            offset,
            &value.to_le_bytes(),
        )
    }

    fn warn_slow_path(&self, offset: usize) {
        if !self.bar.slow_warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "{}: BAR0 offset {offset:#x} is outside the mapped areas: register accesses there \
                 go through pread/pwrite (slow path)",
                self.bdf
            );
        }
    }

    /// The BAR0 region file offset of a 4-byte access at `offset`, if it lies inside BAR0.
    fn slow_path_offset(&self, offset: usize) -> Option<u64> {
        let off = offset as u64;
        (off.checked_add(4)? <= self.bar.size).then_some(self.bar.region_offset + off)
    }

    #[cold]
    #[inline(never)]
    fn read32_slow(&self, offset: usize) -> u32 {
        if let Some(v) = self.bar.others.iter().find_map(|a| a.read32(offset)) {
            return v;
        }
        if self.link.is_released() {
            return u32::MAX;
        }
        self.warn_slow_path(offset);
        let Some(at) = self.slow_path_offset(offset) else {
            log::error!(
                "{}: register read at {offset:#x} is outside BAR0 ({:#x} bytes)",
                self.bdf,
                self.bar.size
            );
            return u32::MAX;
        };
        let mut buf = [0u8; 4];
        match pread_exact(self.link.device_fd, &mut buf, at) {
            Ok(()) => u32::from_le_bytes(buf),
            Err(e) => {
                // All ones is what a read of a vanished PCI device returns: callers already
                // treat it as a dead controller.
                log::error!(
                    "{}: register read at BAR0 {offset:#x} failed: {e}",
                    self.bdf
                );
                u32::MAX
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn write32_slow(&self, offset: usize, value: u32) {
        if self.bar.others.iter().any(|a| a.write32(offset, value)) || self.link.is_released() {
            return;
        }
        self.warn_slow_path(offset);
        let Some(at) = self.slow_path_offset(offset) else {
            log::error!(
                "{}: register write at {offset:#x} is outside BAR0 ({:#x} bytes)",
                self.bdf,
                self.bar.size
            );
            return;
        };
        if let Err(e) = pwrite_exact(self.link.device_fd, &value.to_le_bytes(), at) {
            log::error!(
                "{}: register write of {value:#x} at BAR0 {offset:#x} failed: {e}",
                self.bdf
            );
        }
    }
}

impl Hardware for VfioHardware {
    fn name(&self) -> &str {
        &self.bdf
    }

    fn interrupt_vectors(&self) -> u32 {
        self.device
            .as_ref()
            .and_then(|d| d.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX))
            .map_or(0, |irq| irq.count)
    }

    /// `VFIO_DEVICE_SET_IRQS` on the MSI-X index: vfio-pci enables MSI-X on the function and
    /// makes each vector's interrupt signal its eventfd.
    fn enable_interrupts(&self, fds: &[&EventFd]) -> Result<(), HwError> {
        let fail = |why: String| HwError::Interrupts {
            dev: self.bdf.clone(),
            why,
        };
        if self.link.is_released() {
            return Err(fail("the device was removed".into()));
        }
        let device = self
            .device
            .as_ref()
            .ok_or_else(|| fail("the device is closed".into()))?;
        let have = self.interrupt_vectors();
        if fds.len() as u32 > have {
            return Err(fail(format!(
                "{} vectors asked for, the device offers {have}",
                fds.len()
            )));
        }
        device.enable_msix(fds.to_vec()).map_err(|e| {
            fail(format!(
                "{e} (an IOMMU without interrupt remapping needs \
                 `vfio_iommu_type1 allow_unsafe_interrupts=1`)"
            ))
        })
    }

    /// `VFIO_DEVICE_SET_IRQS` for one MSI-X vector: eventfd -1 makes vfio-pci free the
    /// vector's handler, which masks it in the MSI-X table (the device then sets its Pending
    /// Bit instead of sending); the eventfd again requests the handler and unmasks it, and a
    /// pending interrupt is sent. vfio-ioctls only sets whole ranges from vector 0.
    fn mask_interrupt(&self, vector: u16, fd: Option<&EventFd>) -> Result<(), HwError> {
        let fail = |why: String| HwError::Interrupts {
            dev: self.bdf.clone(),
            why,
        };
        if self.link.is_released() {
            return Err(fail("the device was removed".into()));
        }
        /// `struct vfio_irq_set` with room for one eventfd (`data[]`).
        #[repr(C)]
        struct IrqSetOne {
            argsz: u32,
            flags: u32,
            index: u32,
            start: u32,
            count: u32,
            fd: i32,
        }
        let set = IrqSetOne {
            argsz: std::mem::size_of::<IrqSetOne>() as u32,
            flags: vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_EVENTFD
                | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER,
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            start: vector as u32,
            count: 1,
            fd: fd.map_or(-1, |f| f.as_raw_fd()),
        };
        // SAFETY: the fd is this device's open VFIO device file (open while the link is not
        // released, checked above); `set` is a complete `vfio_irq_set` with one eventfd, its
        // `argsz` covering exactly that, and the kernel only reads it during the call.
        let r = unsafe {
            libc::ioctl(
                self.link.device_fd,
                VFIO_DEVICE_SET_IRQS as _,
                &set as *const IrqSetOne,
            )
        };
        if r < 0 {
            return Err(fail(format!(
                "VFIO_DEVICE_SET_IRQS (vector {vector}, {}): {}",
                if fd.is_some() { "unmask" } else { "mask" },
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// A register read: one volatile load when the register is mapped (always, for a fully
    /// mappable BAR0). Outside the mapping it is a `pread`; should that fail, the error is
    /// logged and all ones returned, as from a PCI device that has gone away.
    #[inline]
    fn read32(&self, offset: usize) -> u32 {
        match self.bar.fast.read32(offset) {
            Some(v) => v,
            None => self.read32_slow(offset),
        }
    }

    /// A register write: one volatile store when the register is mapped. Outside the mapping it
    /// is a `pwrite`, whose failure is logged.
    #[inline]
    fn write32(&self, offset: usize, value: u32) {
        if !self.bar.fast.write32(offset, value) {
            self.write32_slow(offset, value);
        }
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        self.iova_ranges.clone()
    }

    unsafe fn dma_map(&self, vaddr: *mut u8, len: usize, iova: Iova) -> Result<(), HwError> {
        if self.link.is_released() {
            return Err(HwError::Map {
                dev: self.bdf.clone(),
                iova,
                len,
                source: io::Error::new(io::ErrorKind::NotFound, "the device was removed"),
                hint: String::new(),
            });
        }
        // SAFETY: the caller upholds the contract of `Hardware::dma_map` (memory allocated until
        // unmapped, no references into it), which is the contract of `vfio_dma_map`.
        let r = unsafe { self.container.vfio_dma_map(iova.0, len, vaddr) };
        r.map_err(|e| {
            let source = match e {
                VfioError::IommuDmaMap(se) => io::Error::from_raw_os_error(se.errno()),
                other => io::Error::other(other.to_string()),
            };
            let errno = source.raw_os_error().unwrap_or(0);
            // SAFETY: geteuid has no preconditions and cannot fail.
            let is_root = unsafe { libc::geteuid() } == 0;
            let hint = dma_map_hint(
                errno,
                len,
                iova,
                &self.iova_ranges,
                is_root,
                memlock_limit(),
            );
            HwError::Map {
                dev: self.bdf.clone(),
                iova,
                len,
                source,
                hint,
            }
        })
    }

    fn function_reset(&self) -> Result<(), HwError> {
        let fail = |why: String| HwError::Reset {
            dev: self.bdf.clone(),
            why,
        };
        if self.link.is_released() {
            return Err(fail("the device was removed".into()));
        }
        // vfio-ioctls' `VfioDevice::reset` discards the result, and whether the reset
        // happened is the whole point here.
        // SAFETY: the fd is this device's open VFIO device file (it stays open while the link
        // is not released, checked above), and VFIO_DEVICE_RESET takes no argument.
        let r = unsafe { libc::ioctl(self.link.device_fd, VFIO_DEVICE_RESET as _) };
        if r < 0 {
            return Err(fail(format!(
                "VFIO_DEVICE_RESET: {}",
                io::Error::last_os_error()
            )));
        }
        self.config
            .enable_memory_and_bus_master(&self.bdf, self.link.device_fd)
            .map_err(|e| fail(format!("after the reset: {e}")))?;
        log::warn!("{}: function level reset done", self.bdf);
        Ok(())
    }

    fn dma_unmap(&self, iova: Iova, len: usize) -> Result<(), HwError> {
        if self.link.is_released() {
            // The kernel undid every mapping when it took the device back.
            return Ok(());
        }
        self.container.vfio_dma_unmap(iova.0, len).map_err(|e| {
            let source = match e {
                VfioError::IommuDmaUnmap(se) => io::Error::from_raw_os_error(se.errno()),
                VfioError::InvalidDmaUnmapSize => io::Error::other(
                    "the IOMMU unmapped a different size: the range does not match one mapping",
                ),
                other => io::Error::other(other.to_string()),
            };
            HwError::Unmap {
                dev: self.bdf.clone(),
                iova,
                len,
                source,
            }
        })
    }
}

impl Drop for VfioHardware {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.stop();
        }
        // A request that came after the watcher stopped is honoured the same way: closing the
        // device normally would race with the kernel tearing it down.
        if self.link.request_pending() {
            self.link
                .release("the kernel asks for the device back (hot-unplug or removal)");
        }
        if self.link.is_released() {
            // The device file is already closed and the kernel has torn the device down:
            // `VfioDevice`'s own drop would look the device up in sysfs, where it no longer
            // exists. Its remaining resources (a placeholder descriptor, the group and container
            // descriptors, which the kernel has detached) are given up until the process exits.
            std::mem::forget(self.device.take());
        }
    }
}

// VfioHardware is shared between the threads that own queue pairs.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<VfioHardware>();
    assert_send_sync::<VfioSetupError>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use vfio_ioctls::{
        VfioRegionInfoCapSparseMmap, VfioRegionInfoCapType, VfioRegionSparseMmapArea,
    };

    const BDF: &str = "0000:00:03.0";

    /// `start..end`, for single-range lists.
    fn range(start: u64, end: u64) -> Range<u64> {
        start..end
    }

    // ---- check_bdf ----------------------------------------------------------------------

    #[test]
    fn full_addresses_are_accepted() {
        for bdf in [
            "0000:00:03.0",
            "0000:af:1f.7",
            "ffff:ff:00.0",
            "0001:3b:00.1",
            "0000:00:1f.6",
        ] {
            assert!(check_bdf(bdf).is_ok(), "{bdf}");
        }
    }

    #[test]
    fn fixable_addresses_get_a_suggestion() {
        let table = [
            ("00:03.0", "0000:00:03.0"),
            ("af:00.1", "0000:af:00.1"),
            ("AF:00.1", "0000:af:00.1"),
            ("0000:AF:00.0", "0000:af:00.0"),
            (" 0000:00:03.0", "0000:00:03.0"),
            ("0000:00:03.0\n", "0000:00:03.0"),
        ];
        for (bdf, want) in table {
            match check_bdf(bdf) {
                Err(e @ VfioSetupError::BadBdf { .. }) => {
                    let VfioSetupError::BadBdf { suggestion, .. } = &e else {
                        unreachable!()
                    };
                    assert_eq!(suggestion.as_deref(), Some(want), "{bdf:?}");
                    let msg = e.to_string();
                    assert!(msg.contains(bdf), "{msg}");
                    assert!(msg.contains("dddd:bb:dd.f"), "{msg}");
                    assert!(msg.contains(&format!("did you mean {want}?")), "{msg}");
                }
                other => panic!("{bdf:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_addresses_are_rejected_without_suggestion() {
        let table = [
            "",
            "0000:00:03",
            "0000:00:03.",
            "0000:00:20.0",  // device > 0x1f
            "0000:00:03.8",  // function > 7
            "0000:00:03.10", // two-digit function
            "000:00:03.0",
            "0000:000:03.0",
            "0000:00:3.0",
            "zzzz:00:03.0",
            "0000-00-03.0",
            "0000:00:03.0:1",
            "03.0",
            "nvme0",
        ];
        for bdf in table {
            match check_bdf(bdf) {
                Err(VfioSetupError::BadBdf { bdf: b, suggestion }) => {
                    assert_eq!(b, bdf);
                    assert_eq!(suggestion, None, "{bdf:?}");
                }
                other => panic!("{bdf:?}: {other:?}"),
            }
        }
        let msg = check_bdf("nvme0").unwrap_err().to_string();
        assert!(
            msg.contains("`nvme0`") && msg.contains("0000:00:03.0"),
            "{msg}"
        );
        assert!(!msg.contains("did you mean"), "{msg}");
    }

    // ---- fake sysfs -----------------------------------------------------------------------

    /// A sysfs tree in a temporary directory, removed on drop.
    struct FakeSysfs {
        root: PathBuf,
    }

    impl FakeSysfs {
        fn new(name: &str) -> FakeSysfs {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let root = std::env::temp_dir()
                .join(format!("rnvme-vfio-test-{}-{name}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(root.join("kernel/iommu_groups")).unwrap();
            FakeSysfs { root }
        }

        /// Add a device with the given class, driver and IOMMU group.
        fn device(&self, bdf: &str, class: u32, driver: Option<&str>, group: Option<u32>) -> &Self {
            let dev = device_dir(&self.root, bdf);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("vendor"), "0x1b36\n").unwrap();
            std::fs::write(dev.join("device"), "0x0010\n").unwrap();
            std::fs::write(dev.join("class"), format!("{class:#08x}\n")).unwrap();
            if let Some(driver) = driver {
                let drv = self.root.join("bus/pci/drivers").join(driver);
                std::fs::create_dir_all(&drv).unwrap();
                symlink(&drv, dev.join("driver")).unwrap();
            }
            if let Some(group) = group {
                let g = self
                    .root
                    .join("kernel/iommu_groups")
                    .join(group.to_string());
                std::fs::create_dir_all(g.join("devices")).unwrap();
                symlink(&g, dev.join("iommu_group")).unwrap();
                symlink(&dev, g.join("devices").join(bdf)).unwrap();
            }
            self
        }

        /// A stand-in for /dev/vfio/vfio, present or not.
        fn dev_vfio(&self, present: bool) -> PathBuf {
            let p = self.root.join("dev-vfio-vfio");
            if present {
                std::fs::write(&p, "").unwrap();
            }
            p
        }

        fn probe(&self, bdf: &str) -> Result<ProbeInfo, VfioSetupError> {
            probe_at(&self.root, bdf)
        }

        /// Probe then run the pre-open checks with /dev/vfio/vfio present.
        fn check(&self, bdf: &str) -> Result<u32, VfioSetupError> {
            check_ready(&self.probe(bdf)?, &self.dev_vfio(true))
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn assert_mentions(e: &VfioSetupError, words: &[&str]) {
        let msg = e.to_string();
        for w in words {
            assert!(msg.contains(w), "{w:?} missing from: {msg}");
        }
    }

    #[test]
    fn probe_reads_ids_driver_and_group() {
        let fs = FakeSysfs::new("probe");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), Some(7))
            .device("0000:00:02.0", 0x060400, Some("pcieport"), Some(7))
            .device("0000:00:04.0", 0x020000, None, Some(7));
        let info = fs.probe(BDF).unwrap();
        assert_eq!(
            info,
            ProbeInfo {
                bdf: BDF.into(),
                vendor: 0x1b36,
                device: 0x0010,
                class: 0x010802,
                driver: Some("vfio-pci".into()),
                iommu_group: Some(7),
                group_devices: vec![
                    ("0000:00:02.0".into(), Some("pcieport".into())),
                    (BDF.into(), Some("vfio-pci".into())),
                    ("0000:00:04.0".into(), None),
                ],
            }
        );
        assert!(info.is_nvme());
    }

    #[test]
    fn probe_of_a_missing_device() {
        let fs = FakeSysfs::new("missing");
        let e = fs.probe(BDF).unwrap_err();
        assert!(matches!(e, VfioSetupError::NoDevice { .. }), "{e:?}");
        assert_mentions(&e, &[BDF, "`rnvme list`"]);
        // A malformed address is reported before sysfs is looked at.
        let e = fs.probe("00:03.0").unwrap_err();
        assert!(matches!(e, VfioSetupError::BadBdf { .. }), "{e:?}");
    }

    #[test]
    fn probe_reports_unreadable_or_garbled_sysfs_files() {
        let fs = FakeSysfs::new("garbled");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), Some(1));
        std::fs::write(device_dir(&fs.root, BDF).join("class"), "nvme\n").unwrap();
        let e = fs.probe(BDF).unwrap_err();
        assert!(matches!(e, VfioSetupError::Sysfs { .. }), "{e:?}");
        assert_mentions(&e, &[BDF, "class", "\"nvme\""]);
        std::fs::remove_file(device_dir(&fs.root, BDF).join("vendor")).unwrap();
        let e = fs.probe(BDF).unwrap_err();
        assert_mentions(&e, &[BDF, "vendor", "sysfs"]);
    }

    #[test]
    fn not_nvme() {
        let fs = FakeSysfs::new("notnvme");
        fs.device(BDF, 0x020000, Some("vfio-pci"), Some(3));
        let e = fs.check(BDF).unwrap_err();
        assert!(
            matches!(
                e,
                VfioSetupError::NotNvme {
                    class: 0x020000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[BDF, "not an NVMe controller", "0x020000", "`rnvme list`"],
        );
        // The probe itself still describes the device.
        assert!(!fs.probe(BDF).unwrap().is_nvme());
    }

    #[test]
    fn bound_to_nvme() {
        let fs = FakeSysfs::new("nvme");
        fs.device(BDF, NVME_CLASS, Some("nvme"), Some(3));
        let e = fs.check(BDF).unwrap_err();
        assert!(
            matches!(e, VfioSetupError::WrongDriver { ref driver, .. } if driver == "nvme"),
            "{e:?}"
        );
        assert_mentions(&e, &[BDF, "bound to nvme", &format!("`rnvme setup {BDF}`")]);
        // The driver is reported before missing VFIO modules: it is the first thing to fix.
        let info = fs.probe(BDF).unwrap();
        let e = check_ready(&info, &fs.dev_vfio(false)).unwrap_err();
        assert!(matches!(e, VfioSetupError::WrongDriver { .. }), "{e:?}");
    }

    #[test]
    fn no_driver() {
        let fs = FakeSysfs::new("nodriver");
        fs.device(BDF, NVME_CLASS, None, Some(3));
        let e = fs.check(BDF).unwrap_err();
        assert!(matches!(e, VfioSetupError::NoDriver { .. }), "{e:?}");
        assert_mentions(&e, &[BDF, &format!("`rnvme setup {BDF}`")]);
    }

    #[test]
    fn vfio_modules_not_loaded() {
        let fs = FakeSysfs::new("nomodule");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), Some(3));
        let info = fs.probe(BDF).unwrap();
        let e = check_ready(&info, &fs.dev_vfio(false)).unwrap_err();
        assert!(matches!(e, VfioSetupError::NoVfioModule { .. }), "{e:?}");
        assert_mentions(&e, &[BDF, "modprobe vfio-pci"]);
    }

    #[test]
    fn no_iommu_group() {
        let fs = FakeSysfs::new("nogroup");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), None);
        let info = fs.probe(BDF).unwrap();
        assert_eq!(info.iommu_group, None);
        assert!(info.group_devices.is_empty());
        let e = fs.check(BDF).unwrap_err();
        assert!(matches!(e, VfioSetupError::NoIommuGroup { .. }), "{e:?}");
        assert_mentions(&e, &[BDF, "intel_iommu=on", "amd_iommu=on", "VT-d"]);
    }

    #[test]
    fn group_with_a_device_bound_to_another_driver() {
        let fs = FakeSysfs::new("e1000");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), Some(9))
            .device("0000:00:02.0", 0x060400, Some("pcieport"), Some(9))
            .device("0000:00:19.0", 0x020000, Some("e1000"), Some(9));
        let e = fs.check(BDF).unwrap_err();
        match &e {
            VfioSetupError::GroupNotViable {
                group,
                other,
                driver,
                ..
            } => {
                assert_eq!(
                    (*group, other.as_str(), driver.as_str()),
                    (9, "0000:00:19.0", "e1000")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_mentions(
            &e,
            &[
                BDF,
                "IOMMU group 9",
                "0000:00:19.0",
                "e1000",
                "`rnvme setup 0000:00:19.0`",
                "unbind",
            ],
        );
    }

    #[test]
    fn viable_group() {
        let fs = FakeSysfs::new("viable");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), Some(4))
            .device("0000:00:02.0", 0x060400, Some("pcieport"), Some(4))
            .device("0000:00:03.1", NVME_CLASS, Some("vfio-pci"), Some(4))
            .device("0000:00:03.2", 0x020000, None, Some(4))
            .device("0000:00:03.3", 0x020000, Some("pci-stub"), Some(4))
            // Another group entirely: its driver does not matter.
            .device("0000:00:19.0", 0x020000, Some("e1000"), Some(5));
        assert_eq!(fs.check(BDF).unwrap(), 4);
        assert_eq!(fs.probe(BDF).unwrap().group_devices.len(), 5);
    }

    #[test]
    fn sysfs_root_from_the_environment() {
        assert_eq!(sysfs_root_from(None), PathBuf::from("/sys"));
        assert_eq!(sysfs_root_from(Some("".into())), PathBuf::from("/sys"));
        assert_eq!(
            sysfs_root_from(Some("/tmp/fake-sys".into())),
            PathBuf::from("/tmp/fake-sys")
        );
    }

    // ---- VFIO error translation ---------------------------------------------------------

    #[test]
    fn open_errors_say_what_to_do() {
        let fs = FakeSysfs::new("openerr");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), Some(6));
        let io = |errno| io::Error::from_raw_os_error(errno);
        let step = "opening the VFIO device";

        let e = open_error(
            &fs.root,
            BDF,
            6,
            step,
            VfioError::OpenGroup(io(libc::EBUSY), "6".into()),
        );
        assert!(matches!(e, VfioSetupError::Busy { group: 6, .. }), "{e:?}");
        assert_mentions(&e, &[BDF, "already in use by another process"]);

        for errno in [libc::EACCES, libc::EPERM] {
            let e = open_error(
                &fs.root,
                BDF,
                6,
                step,
                VfioError::OpenGroup(io(errno), "6".into()),
            );
            assert!(matches!(e, VfioSetupError::Permission { .. }), "{e:?}");
            assert_mentions(
                &e,
                &[
                    BDF,
                    "/dev/vfio/6",
                    "run as root",
                    &format!("`rnvme setup --user NAME {BDF}`"),
                ],
            );
        }

        let e = open_error(
            &fs.root,
            BDF,
            6,
            step,
            VfioError::OpenGroup(io(libc::ENOENT), "6".into()),
        );
        assert_mentions(&e, &[BDF, "/dev/vfio/6", "rnvme setup"]);

        let e = open_error(
            &fs.root,
            BDF,
            6,
            step,
            VfioError::OpenContainer(io(libc::ENOENT)),
        );
        assert!(matches!(e, VfioSetupError::NoVfioModule { .. }), "{e:?}");

        let e = open_error(&fs.root, BDF, 6, step, VfioError::VfioExtension);
        assert_mentions(&e, &[BDF, "modprobe vfio_iommu_type1"]);

        let other = VfioError::GetGroupStatus;
        let e = open_error(&fs.root, BDF, 6, step, other);
        assert!(matches!(e, VfioSetupError::Vfio { .. }), "{e:?}");
        assert_mentions(&e, &[BDF, step, "dmesg"]);
    }

    #[test]
    fn kernel_group_viability_names_the_offender_when_sysfs_shows_one() {
        let fs = FakeSysfs::new("kviable");
        fs.device(BDF, NVME_CLASS, Some("vfio-pci"), Some(2));
        let e = open_error(&fs.root, BDF, 2, "x", VfioError::GroupViable);
        assert!(
            matches!(e, VfioSetupError::GroupNotViableKernel { group: 2, .. }),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[BDF, "/sys/kernel/iommu_groups/2/devices", "rnvme setup"],
        );

        fs.device("0000:00:05.0", 0x020000, Some("e1000"), Some(2));
        let e = open_error(&fs.root, BDF, 2, "x", VfioError::GroupViable);
        let named =
            matches!(&e, VfioSetupError::GroupNotViable { other, .. } if other == "0000:00:05.0");
        assert!(named, "{e:?}");
        assert_mentions(&e, &[BDF, "0000:00:05.0", "e1000"]);
    }

    // ---- DMA mapping hints --------------------------------------------------------------

    #[test]
    fn memlock_hint_for_unprivileged_users() {
        let ranges = [range(0x1_0000, 0x80_0000_0000)];
        for errno in [libc::ENOMEM, libc::EPERM] {
            let hint = dma_map_hint(errno, 2 << 20, Iova(0x10_0000), &ranges, false, Some(65536));
            assert!(hint.contains("ulimit -l"), "{hint}");
            assert!(hint.contains("RLIMIT_MEMLOCK, now 65536 bytes"), "{hint}");
            assert!(hint.contains("2097152 bytes asked"), "{hint}");
        }
        let hint = dma_map_hint(
            libc::ENOMEM,
            4096,
            Iova(0x10_0000),
            &ranges,
            false,
            Some(u64::MAX),
        );
        assert!(hint.contains("now unlimited"), "{hint}");
        // Root is not bound by the limit: no memlock advice.
        assert!(
            !dma_map_hint(libc::ENOMEM, 4096, Iova(0x10_0000), &ranges, true, Some(0))
                .contains("ulimit")
        );
    }

    #[test]
    fn iova_hint_for_invalid_arguments() {
        let ranges = [0x1_0000..0xfee0_0000, 0xfef0_0000..0x80_0000_0000];
        for errno in [libc::EINVAL, libc::EFAULT] {
            let hint = dma_map_hint(errno, 0x20_0000, Iova(0xfee0_0000), &ranges, true, None);
            assert!(
                hint.contains("[0x10000..0xfee00000, 0xfef00000..0x8000000000]"),
                "{hint}"
            );
            assert!(hint.contains("IOVA range 0xfee00000..0xff000000"), "{hint}");
            assert!(hint.contains("outside"), "{hint}");
        }
        let hint = dma_map_hint(libc::EINVAL, 0x1000, Iova(0x10_0000), &ranges, true, None);
        assert!(
            hint.contains("inside them") && hint.contains("4 KiB aligned"),
            "{hint}"
        );
        assert!(
            dma_map_hint(libc::EEXIST, 0x1000, Iova(0x10_0000), &ranges, true, None)
                .contains("unmap it first")
        );
        assert!(
            dma_map_hint(libc::ENOSPC, 0x1000, Iova(0x10_0000), &ranges, true, None)
                .contains("dma_entry_limit")
        );
        assert_eq!(
            dma_map_hint(libc::EIO, 0x1000, Iova(0x10_0000), &ranges, true, None),
            ""
        );
    }

    // ---- IOVA range capability ----------------------------------------------------------

    /// Builds a `VFIO_IOMMU_GET_INFO` answer: the 24-byte header, then capabilities.
    struct InfoBuf(Vec<u8>);

    impl InfoBuf {
        fn new(flags: u32) -> InfoBuf {
            let mut b = vec![0u8; 24];
            b[4..8].copy_from_slice(&flags.to_ne_bytes());
            b[8..16].copy_from_slice(&0x1000u64.to_ne_bytes()); // iova_pgsizes
            InfoBuf(b)
        }
        fn set_u32(&mut self, at: usize, v: u32) {
            self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        }
        /// Append a capability and link it at the end of the chain; returns its offset.
        fn push_cap(&mut self, id: u16, body: &[u8]) -> usize {
            let at = self.0.len();
            // Link from the header (cap_offset at 16) or from the last capability's `next`.
            let mut link = 16;
            loop {
                let next = u32::from_ne_bytes(self.0[link..link + 4].try_into().unwrap()) as usize;
                if next == 0 {
                    break;
                }
                link = next + 4;
            }
            self.set_u32(link, at as u32);
            self.0.extend_from_slice(&id.to_ne_bytes());
            self.0.extend_from_slice(&1u16.to_ne_bytes()); // version
            self.0.extend_from_slice(&0u32.to_ne_bytes()); // next
            self.0.extend_from_slice(body);
            let len = self.0.len() as u32;
            self.set_u32(0, len); // argsz
            at
        }
        fn push_iova_ranges(&mut self, ranges: &[(u64, u64)]) -> usize {
            let mut body = Vec::new();
            body.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
            body.extend_from_slice(&0u32.to_ne_bytes()); // reserved
            for &(start, end) in ranges {
                body.extend_from_slice(&start.to_ne_bytes());
                body.extend_from_slice(&end.to_ne_bytes());
            }
            self.push_cap(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16, &body)
        }
    }

    #[test]
    fn iova_ranges_from_the_capability() {
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS | 1);
        b.push_iova_ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]);
        assert_eq!(
            parse_iova_ranges(&b.0),
            Ok(Some(vec![0..0xfee0_0000, 0xfef0_0000..0x80_0000_0000]))
        );
    }

    #[test]
    fn iova_ranges_after_other_capabilities() {
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        // A migration capability (id 2) and a DMA-available one (id 3) come first.
        b.push_cap(2, &[0u8; 24]);
        b.push_cap(3, &[0u8; 8]);
        b.push_iova_ranges(&[(0x1000, 0x1fff)]);
        assert_eq!(
            parse_iova_ranges(&b.0),
            Ok(Some(vec![range(0x1000, 0x2000)]))
        );
    }

    #[test]
    fn an_inclusive_end_at_the_top_of_the_address_space_saturates() {
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        b.push_iova_ranges(&[(0x1_0000, u64::MAX)]);
        assert_eq!(
            parse_iova_ranges(&b.0),
            Ok(Some(vec![range(0x1_0000, u64::MAX)]))
        );
    }

    #[test]
    fn no_iova_capability() {
        // No capabilities at all (old kernel): the flag is clear.
        assert_eq!(parse_iova_ranges(&InfoBuf::new(1).0), Ok(None));
        // Capabilities, but not the IOVA one.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        b.push_cap(2, &[0u8; 24]);
        assert_eq!(parse_iova_ranges(&b.0), Ok(None));
        // The flag set but no chain returned (buffer was too small).
        assert_eq!(
            parse_iova_ranges(&InfoBuf::new(VFIO_IOMMU_INFO_CAPS).0),
            Ok(None)
        );
        // A capability present but the flag clear: the chain is not looked at.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        b.push_iova_ranges(&[(0, 0xffff)]);
        b.set_u32(4, 0);
        assert_eq!(parse_iova_ranges(&b.0), Ok(None));
        // An empty capability is reported as such (open() turns it into an error).
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        b.push_iova_ranges(&[]);
        assert_eq!(parse_iova_ranges(&b.0), Ok(Some(vec![])));
    }

    #[test]
    fn malformed_chains_are_errors() {
        // Truncated inside the range list.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        b.push_iova_ranges(&[(0, 0xffff), (0x2_0000, 0x2_ffff)]);
        let cut = &b.0[..b.0.len() - 4];
        assert!(parse_iova_ranges(cut).unwrap_err().contains("truncated"));
        // A range count far beyond the buffer.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        let at = b.push_iova_ranges(&[(0, 0xffff)]);
        b.set_u32(at + 8, u32::MAX);
        assert!(parse_iova_ranges(&b.0).unwrap_err().contains("truncated"));
        // A capability offset beyond the buffer.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        b.set_u32(16, 4096);
        assert!(parse_iova_ranges(&b.0).unwrap_err().contains("truncated"));
        // A capability pointing into the header.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        let at = b.push_cap(2, &[0u8; 8]);
        b.set_u32(at + 4, 8);
        assert!(parse_iova_ranges(&b.0).unwrap_err().contains("header"));
        // A loop.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        let at = b.push_cap(2, &[0u8; 8]);
        b.set_u32(at + 4, at as u32);
        assert!(parse_iova_ranges(&b.0).unwrap_err().contains("loops"));
        // A range that ends before it starts.
        let mut b = InfoBuf::new(VFIO_IOMMU_INFO_CAPS);
        b.push_iova_ranges(&[(0x2000, 0x1000)]);
        assert!(parse_iova_ranges(&b.0)
            .unwrap_err()
            .contains("before it starts"));
        // Shorter than the header.
        assert!(parse_iova_ranges(&[0u8; 6]).is_err());
    }

    // ---- PCI config space ---------------------------------------------------------------

    /// A temporary file standing in for the device file: 0x100 bytes of something else, then a
    /// 256-byte config space whose command register holds `command`.
    fn fake_device_file(name: &str, command: u16) -> (std::fs::File, PathBuf, ConfigSpace) {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "rnvme-vfio-config-{}-{name}-{n}",
            std::process::id()
        ));
        let mut bytes = vec![0xeeu8; 0x100];
        let mut config = vec![0u8; 0x100];
        config[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        config[2..4].copy_from_slice(&0x0010u16.to_le_bytes());
        config[4..6].copy_from_slice(&command.to_le_bytes());
        config[8..12].copy_from_slice(&0x0108_0202u32.to_le_bytes()); // revision 2, class 010802
        bytes.extend_from_slice(&config);
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (
            file,
            path,
            ConfigSpace {
                offset: 0x100,
                size: 0x100,
            },
        )
    }

    #[test]
    fn config_space_reads_and_writes_at_the_region_offset() {
        let (file, path, cfg) = fake_device_file("rw", 0x0000);
        let fd = file.as_raw_fd();
        assert_eq!(
            u16::from_le_bytes(cfg.read::<2>(BDF, fd, 0).unwrap()),
            0x1b36
        );
        assert_eq!(
            u32::from_le_bytes(cfg.read::<4>(BDF, fd, 8).unwrap()),
            0x0108_0202
        );
        assert_eq!(cfg.read::<1>(BDF, fd, 8).unwrap(), [0x02]);
        cfg.write(BDF, fd, 0x40, &0xbeefu16.to_le_bytes()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x140..0x142], &[0xef, 0xbe]);
        // The last bytes are reachable, one more is not.
        assert!(cfg.read::<4>(BDF, fd, 0xfc).is_ok());
        let e = cfg.read::<4>(BDF, fd, 0xfd).unwrap_err();
        assert!(
            matches!(
                e,
                VfioSetupError::Config {
                    op: "read",
                    offset: 0xfd,
                    len: 4,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_mentions(&e, &[BDF, "PCI config space", "0xfd"]);
        let e = cfg.write(BDF, fd, u64::MAX, &[0, 0]).unwrap_err();
        assert!(
            matches!(e, VfioSetupError::Config { op: "write", .. }),
            "{e:?}"
        );
        drop(file);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn config_space_io_errors_are_errors() {
        let (file, path, _) = fake_device_file("eof", 0);
        // A region said to extend past the end of the file: the read comes back short.
        let cfg = ConfigSpace {
            offset: 0x1f0,
            size: 0x100,
        };
        let e = cfg.read::<4>(BDF, file.as_raw_fd(), 0x20).unwrap_err();
        let VfioSetupError::Config { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof, "{e:?}");
        // A closed descriptor.
        let e = cfg.read::<2>(BDF, -1, 0).unwrap_err();
        let VfioSetupError::Config { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(source.raw_os_error(), Some(libc::EBADF), "{e:?}");
        drop(file);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn command_register_gets_memory_bus_master_and_intx_disable() {
        for (before, after) in [
            (0x0000, 0x0406),
            (0x0001, 0x0407),
            (0x0406, 0x0406),
            (0x0102, 0x0506),
        ] {
            let (file, path, cfg) = fake_device_file("cmd", before);
            cfg.enable_memory_and_bus_master(BDF, file.as_raw_fd())
                .unwrap();
            let got =
                u16::from_le_bytes(cfg.read::<2>(BDF, file.as_raw_fd(), PCI_COMMAND).unwrap());
            assert_eq!(got, after, "command {before:#06x}");
            // Nothing else moved.
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[0x100..0x104], &[0x36, 0x1b, 0x10, 0x00]);
            assert!(bytes[..0x100].iter().all(|&b| b == 0xee));
            drop(file);
            let _ = std::fs::remove_file(&path);
        }
    }

    // ---- messages -------------------------------------------------------------------------

    #[test]
    fn every_message_names_the_device_and_a_remedy() {
        let io = || io::Error::from_raw_os_error(libc::EIO);
        let bdf = || BDF.to_string();
        let table: Vec<(VfioSetupError, &[&str])> = vec![
            (
                VfioSetupError::InterruptRemapping { bdf: bdf() },
                &["intremap=on", "allow_unsafe_interrupts=1"],
            ),
            (
                VfioSetupError::NoType1Iommu { bdf: bdf() },
                &["modprobe vfio_iommu_type1"],
            ),
            (
                VfioSetupError::Busy {
                    bdf: bdf(),
                    group: 3,
                },
                &["already in use by another process", "/dev/vfio/3"],
            ),
            (
                VfioSetupError::NoGroupNode {
                    bdf: bdf(),
                    group: 3,
                },
                &["/dev/vfio/3", "rnvme setup"],
            ),
            (
                VfioSetupError::IommuInfo {
                    bdf: bdf(),
                    reason: "r".into(),
                },
                &["IOVA ranges", "dmesg"],
            ),
            (
                VfioSetupError::NoConfigRegion { bdf: bdf() },
                &["rnvme setup"],
            ),
            (
                VfioSetupError::BarNotMappable {
                    bdf: bdf(),
                    flags: 3,
                    size: 0x4000,
                },
                &["BAR0", "0x3", "dmesg"],
            ),
            (
                VfioSetupError::BarTooSmall {
                    bdf: bdf(),
                    size: 0x1000,
                },
                &["0x1000", "0x2000", "lspci"],
            ),
            (
                VfioSetupError::BarMap {
                    bdf: bdf(),
                    offset: 0x1000,
                    len: 0x3000,
                    source: io(),
                },
                &["0x1000..0x4000", "dmesg"],
            ),
            (
                VfioSetupError::Vfio {
                    bdf: bdf(),
                    step: "opening",
                    source: VfioError::GetGroupStatus,
                },
                &["opening", "dmesg"],
            ),
            (
                VfioSetupError::Sysfs {
                    bdf: bdf(),
                    path: "/sys/x".into(),
                    source: io(),
                },
                &["/sys/x", "sysfs"],
            ),
        ];
        for (e, words) in table {
            assert_mentions(&e, &[BDF]);
            assert_mentions(&e, words);
        }
    }

    // ---- BAR0 areas -----------------------------------------------------------------------

    #[test]
    fn whole_bar_is_one_area_without_sparse_capability() {
        let caps = [VfioRegionInfoCap::MsixMappable];
        assert_eq!(mmap_areas(0x4000, &caps), vec![(0, 0x4000)]);
        assert_eq!(fast_area_index(&mmap_areas(0x4000, &caps)), Some(0));
    }

    #[test]
    fn sparse_areas_and_the_doorbell_area() {
        let sparse = |areas: &[(u64, u64)]| {
            vec![
                VfioRegionInfoCap::Type(VfioRegionInfoCapType {
                    type_: 1,
                    subtype: 1,
                }),
                VfioRegionInfoCap::SparseMmap(VfioRegionInfoCapSparseMmap {
                    areas: areas
                        .iter()
                        .map(|&(offset, size)| VfioRegionSparseMmapArea { offset, size })
                        .collect(),
                }),
            ]
        };
        // The MSI-X table carved out of the middle: the doorbells are in the first area.
        let areas = mmap_areas(0x4000, &sparse(&[(0, 0x2000), (0x3000, 0x1000)]));
        assert_eq!(areas, vec![(0, 0x2000), (0x3000, 0x1000)]);
        assert_eq!(fast_area_index(&areas), Some(0));
        // The registers page left out: the doorbell area is the second one.
        let areas = mmap_areas(0x4000, &sparse(&[(0, 0), (0x0, 0x0), (0x1000, 0x3000)]));
        assert_eq!(areas, vec![(0x1000, 0x3000)]);
        let areas = [(0, 0x1000), (0x1000, 0x1000)];
        assert_eq!(fast_area_index(&areas), Some(1));
        // No area covers the doorbells: the first is still tried first.
        assert_eq!(fast_area_index(&[(0, 0x1000), (0x3000, 0x1000)]), Some(0));
        // Nothing mappable.
        assert_eq!(mmap_areas(0x4000, &sparse(&[])), vec![]);
        assert_eq!(fast_area_index(&[]), None);
    }

    /// An MmioArea over anonymous memory standing in for `len` bytes of BAR0 at `start`.
    fn anonymous_area(start: usize, len: usize) -> MmioArea {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        MmioArea {
            base: p.cast(),
            start,
            len,
            limit: len.saturating_sub(3),
        }
    }

    #[test]
    fn mmio_area_bounds() {
        let area = anonymous_area(0x1000, 0x2000);
        // Inside: the first and the last register, and a doorbell.
        for off in [0x1000, 0x1004, 0x1ffc, 0x2ffc] {
            assert!(area.write32(off, off as u32 ^ 0xa5a5_0000), "{off:#x}");
        }
        for off in [0x1000, 0x1004, 0x1ffc, 0x2ffc] {
            assert_eq!(area.read32(off), Some(off as u32 ^ 0xa5a5_0000), "{off:#x}");
        }
        // Outside, straddling the end, below the start (wrapping), misaligned.
        for off in [
            0x0,
            0xffc,
            0x3000,
            0x2ffd,
            0x2ffe,
            0x1002,
            0x1001,
            usize::MAX - 1,
        ] {
            assert_eq!(area.read32(off), None, "{off:#x}");
            assert!(!area.write32(off, 1), "{off:#x}");
        }
        // The empty area covers nothing.
        let empty = MmioArea::empty();
        assert_eq!(empty.read32(0), None);
        assert!(!empty.write32(0, 0));
    }

    #[test]
    fn mmio_area_is_little_endian() {
        let area = anonymous_area(0, 0x1000);
        area.write32(0x10, 0x1122_3344);
        let mut bytes = [0u8; 4];
        // SAFETY: the area maps 0x1000 readable bytes; offset 0x10..0x14 is inside, and no
        // other access is in flight.
        unsafe { std::ptr::copy_nonoverlapping(area.base.add(0x10), bytes.as_mut_ptr(), 4) };
        assert_eq!(bytes, [0x44, 0x33, 0x22, 0x11]);
    }

    /// A pipe: (read end, write end).
    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        use std::os::unix::io::FromRawFd;
        // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    /// A link over two register areas and the write end of a pipe standing for the device
    /// file; its request eventfd is returned beside it.
    fn test_link(areas: &[&MmioArea], device: &std::fs::File) -> (Arc<Link>, RawFd) {
        let request = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).unwrap();
        let request_fd = request.as_raw_fd();
        let link = Arc::new(Link {
            bdf: "0000:00:04.0".into(),
            areas: areas.iter().map(|a| (a.base as usize, a.len)).collect(),
            device_fd: device.as_raw_fd(),
            request: Some(request),
            released: AtomicBool::new(false),
            lock: Mutex::new(()),
        });
        (link, request_fd)
    }

    /// Whether the pipe's write end is closed: a read of the read end sees end of file.
    fn writer_closed(reader: &std::fs::File) -> bool {
        use std::io::Read;
        let mut b = [0u8; 1];
        let mut r = reader;
        matches!(r.read(&mut b), Ok(0))
    }

    #[test]
    fn a_removal_request_releases_the_device_while_registers_are_in_use() {
        let fast = anonymous_area(0, 0x4000);
        let other = anonymous_area(0x8000, 0x1000);
        fast.write32(0x1c, 1);
        other.write32(0x8000, 7);
        let (reader, device) = pipe();
        let (link, request_fd) = test_link(&[&fast, &other], &device);
        let watcher = RemovalWatcher::spawn(link.clone()).unwrap().unwrap();

        std::thread::scope(|s| {
            // A thread polling a register the whole time never faults and sees the register
            // or all ones, and all ones once released.
            let poller = s.spawn(|| {
                let mut reads = 0u64;
                loop {
                    let v = fast.read32(0x1c).unwrap();
                    assert!(v == 1 || v == u32::MAX, "{v:#x}");
                    reads += 1;
                    if link.is_released() && fast.read32(0x1c) == Some(u32::MAX) {
                        return reads;
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(20));
            assert!(!link.is_released());
            // SAFETY: writing 8 bytes from a valid u64 to an open eventfd.
            let n = unsafe { libc::write(request_fd, (&1u64 as *const u64).cast(), 8) };
            assert_eq!(n, 8);
            assert!(poller.join().unwrap() > 0);
        });
        watcher.stop();

        assert!(link.is_released());
        assert_eq!(other.read32(0x8000), Some(u32::MAX));
        assert_eq!(fast.read32(0x3ffc), Some(u32::MAX));
        // Doorbell writes land in the placeholder memory, harmlessly.
        assert!(fast.write32(0x1000, 5));
        // The device file is closed; its descriptor number now holds a placeholder.
        assert!(writer_closed(&reader));
        // A second request changes nothing.
        link.release("again");
        assert!(link.is_released());
    }

    #[test]
    fn stopping_the_watcher_leaves_the_device_alone() {
        let fast = anonymous_area(0, 0x2000);
        fast.write32(0x1c, 1);
        let (reader, device) = pipe();
        let (link, _request_fd) = test_link(&[&fast], &device);
        let watcher = RemovalWatcher::spawn(link.clone()).unwrap().unwrap();
        watcher.stop();
        assert!(!link.is_released());
        assert!(!link.request_pending());
        assert_eq!(fast.read32(0x1c), Some(1));
        let mut fds = [libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        assert_eq!(
            ready, 0,
            "the writer is still open: nothing to read, no end of file"
        );
    }

    #[test]
    fn a_request_after_the_watcher_stopped_is_seen_as_pending() {
        let fast = anonymous_area(0, 0x2000);
        let (_reader, device) = pipe();
        let (link, request_fd) = test_link(&[&fast], &device);
        // SAFETY: writing 8 bytes from a valid u64 to an open eventfd.
        let n = unsafe { libc::write(request_fd, (&1u64 as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        assert!(link.request_pending());
    }

    #[test]
    fn ioctl_number() {
        // _IO(';', 112) from linux/vfio.h.
        assert_eq!(VFIO_IOMMU_GET_INFO, (b';' as u32) << 8 | 112);
    }
}
