//! sysfs checks: what the kernel says of a device before it is opened.

use super::*;

/// What sysfs says about a PCI device, gathered without opening anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    /// The PCI address.
    pub bdf: String,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// PCI class code (24 bits: class, subclass, programming interface).
    pub class: u32,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// The IOMMU group, if the IOMMU is on.
    pub iommu_group: Option<u32>,
    /// Every device of the IOMMU group (this one included) with its driver, sorted by address.
    pub group_devices: Vec<(String, Option<String>)>,
}

impl ProbeInfo {
    /// Whether the device is an NVMe controller.
    pub fn is_nvme(&self) -> bool {
        self.class == NVME_CLASS
    }

    /// Whether [`VfioHardware::open`] can be expected to succeed, judging from sysfs and the
    /// presence of `/dev/vfio/vfio`: the error says why not and what to do. Permissions, a
    /// process already using the device and the interrupt remapping setting are only found out
    /// by opening it.
    pub fn check(&self) -> Result<(), VfioSetupError> {
        check_ready(self, Path::new(DEV_VFIO_CONTAINER)).map(|_| ())
    }
}

/// Gather what sysfs says about the PCI device `bdf`, without opening anything.
///
/// Errors: a malformed address, no such device, or unreadable sysfs files. A device that is
/// not an NVMe controller, or that rnvme cannot open, is still described: see
/// [`ProbeInfo::check`].
pub fn probe(bdf: &str) -> Result<ProbeInfo, VfioSetupError> {
    probe_at(&sysfs_root(), bdf)
}

pub(super) fn device_dir(root: &Path, bdf: &str) -> PathBuf {
    root.join("bus/pci/devices").join(bdf)
}

pub(super) fn sysfs_error(bdf: &str, path: &Path, source: io::Error) -> VfioSetupError {
    VfioSetupError::Sysfs {
        bdf: bdf.to_string(),
        path: path.to_path_buf(),
        source,
    }
}

/// Read a sysfs attribute holding one hexadecimal number such as `0x010802`.
pub(super) fn read_hex(bdf: &str, path: &Path) -> Result<u32, VfioSetupError> {
    let text = std::fs::read_to_string(path).map_err(|e| sysfs_error(bdf, path, e))?;
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u32::from_str_radix(digits, 16).map_err(|_| {
        let msg = format!("expected a hexadecimal number, found {t:?}");
        sysfs_error(bdf, path, io::Error::new(io::ErrorKind::InvalidData, msg))
    })
}

pub(super) fn read_hex_u16(bdf: &str, path: &Path) -> Result<u16, VfioSetupError> {
    let v = read_hex(bdf, path)?;
    u16::try_from(v).map_err(|_| {
        let msg = format!("{v:#x} does not fit 16 bits");
        sysfs_error(bdf, path, io::Error::new(io::ErrorKind::InvalidData, msg))
    })
}

/// The last component of the symlink `link`, or None if there is no such link.
pub(super) fn link_name(bdf: &str, link: &Path) -> Result<Option<String>, VfioSetupError> {
    match std::fs::read_link(link) {
        Ok(target) => match target.file_name() {
            Some(name) => Ok(Some(name.to_string_lossy().into_owned())),
            None => {
                let msg = format!("link to {} has no last component", target.display());
                Err(sysfs_error(
                    bdf,
                    link,
                    io::Error::new(io::ErrorKind::InvalidData, msg),
                ))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(sysfs_error(bdf, link, e)),
    }
}

/// [`probe`] against the sysfs tree at `root`.
pub(super) fn probe_at(root: &Path, bdf: &str) -> Result<ProbeInfo, VfioSetupError> {
    check_bdf(bdf)?;
    let dev = device_dir(root, bdf);
    if !dev.exists() {
        return Err(VfioSetupError::NoDevice {
            bdf: bdf.to_string(),
        });
    }
    let vendor = read_hex_u16(bdf, &dev.join("vendor"))?;
    let device = read_hex_u16(bdf, &dev.join("device"))?;
    let class = read_hex(bdf, &dev.join("class"))?;
    let driver = link_name(bdf, &dev.join("driver"))?;

    let group_link = dev.join("iommu_group");
    let iommu_group = match link_name(bdf, &group_link)? {
        None => None,
        Some(name) => Some(name.parse::<u32>().map_err(|_| {
            let msg = format!("IOMMU group name {name:?} is not a number");
            sysfs_error(
                bdf,
                &group_link,
                io::Error::new(io::ErrorKind::InvalidData, msg),
            )
        })?),
    };

    let mut group_devices = Vec::new();
    if let Some(group) = iommu_group {
        let members = root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = std::fs::read_dir(&members).map_err(|e| sysfs_error(bdf, &members, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| sysfs_error(bdf, &members, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let member_driver = link_name(bdf, &entry.path().join("driver"))?;
            group_devices.push((name, member_driver));
        }
        group_devices.sort();
    }

    Ok(ProbeInfo {
        bdf: bdf.to_string(),
        vendor,
        device,
        class,
        driver,
        iommu_group,
        group_devices,
    })
}

/// The first member of the group, other than `bdf` itself, whose driver keeps the kernel from
/// handing the group to user space.
pub(super) fn offending_member(info: &ProbeInfo) -> Option<(&str, &str)> {
    info.group_devices
        .iter()
        .find_map(|(name, driver)| match driver {
            Some(d) if name != &info.bdf && !GROUP_SAFE_DRIVERS.contains(&d.as_str()) => {
                Some((name.as_str(), d.as_str()))
            }
            _ => None,
        })
}

/// The checks that precede opening the device, in the order a user has to fix them: NVMe
/// class, driver, VFIO modules (`dev_vfio` is the container node), IOMMU group, group
/// viability. Returns the IOMMU group.
pub(super) fn check_ready(info: &ProbeInfo, dev_vfio: &Path) -> Result<u32, VfioSetupError> {
    let bdf = || info.bdf.clone();
    if !info.is_nvme() {
        return Err(VfioSetupError::NotNvme {
            bdf: bdf(),
            class: info.class,
        });
    }
    match info.driver.as_deref() {
        Some("vfio-pci") => {}
        Some(driver) => {
            return Err(VfioSetupError::WrongDriver {
                bdf: bdf(),
                driver: driver.to_string(),
            })
        }
        None => return Err(VfioSetupError::NoDriver { bdf: bdf() }),
    }
    if !dev_vfio.exists() {
        return Err(VfioSetupError::NoVfioModule { bdf: bdf() });
    }
    let Some(group) = info.iommu_group else {
        return Err(VfioSetupError::NoIommuGroup { bdf: bdf() });
    };
    if let Some((other, driver)) = offending_member(info) {
        return Err(VfioSetupError::GroupNotViable {
            bdf: bdf(),
            group,
            other: other.to_string(),
            driver: driver.to_string(),
        });
    }
    Ok(group)
}
