//! What the kernel shows of PCI devices: NVMe controllers, their drivers, the kernel's
//! controllers and block devices on them, and what uses those.

use super::*;

impl Sysfs {
    /// Every PCI device's address, sorted.
    pub fn pci_devices(&self) -> Result<Vec<String>> {
        let dir = self.path("/sys/bus/pci/devices");
        let mut v: Vec<String> = fs::read_dir(&dir)
            .map_err(|source| SysfsError::Io {
                what: "list",
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| parse_bdf(n).is_ok())
            .collect();
        v.sort();
        Ok(v)
    }

    /// Every NVMe controller (class 0x010802), sorted by address.
    pub fn nvme_controllers(&self) -> Result<Vec<String>> {
        Ok(self
            .pci_devices()?
            .into_iter()
            .filter(|bdf| {
                self.read_hex(&self.dev_dir(bdf).join("class"))
                    .is_ok_and(|c| c == NVME_CLASS)
            })
            .collect())
    }

    /// What sysfs says about one device.
    pub fn device(&self, bdf: &str) -> Result<PciDevice> {
        let dir = self.dev_dir(bdf);
        if !dir.exists() {
            return Err(SysfsError::NoDevice(bdf.to_string()));
        }
        let id = |f: &str| -> Result<u16> {
            let v = self.read_hex(&dir.join(f))?;
            Ok(u16::try_from(v).unwrap_or(u16::MAX))
        };
        Ok(PciDevice {
            bdf: bdf.to_string(),
            vendor: id("vendor")?,
            device: id("device")?,
            class: self.read_hex(&dir.join("class"))?,
            driver: self.link_name(&dir.join("driver")),
            iommu_group: self
                .link_name(&dir.join("iommu_group"))
                .and_then(|g| g.parse().ok()),
            driver_override: self
                .read_opt(&dir.join("driver_override"))
                .filter(|s| !s.is_empty() && s != "(null)"),
            // -1 where the platform does not say.
            numa_node: self
                .read_opt(&dir.join("numa_node"))
                .and_then(|n| n.parse().ok()),
        })
    }

    /// The device, checked to be an NVMe controller.
    pub fn nvme_device(&self, bdf: &str) -> Result<PciDevice> {
        let d = self.device(bdf)?;
        if d.class != NVME_CLASS {
            return Err(SysfsError::NotNvme {
                bdf: bdf.to_string(),
                class: d.class,
            });
        }
        Ok(d)
    }

    /// Kernel NVMe controllers of a device bound to the `nvme` driver.
    pub fn kernel_controllers(&self, bdf: &str) -> Vec<KernelController> {
        let dir = self.dev_dir(bdf).join("nvme");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut v: Vec<KernelController> = entries
            .filter_map(|e| e.ok())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let p = e.path();
                let mut namespaces: Vec<String> = fs::read_dir(&p)
                    .map(|it| {
                        it.filter_map(|e| e.ok())
                            .filter_map(|e| namespace_block_name(&e.file_name().to_string_lossy()))
                            .collect()
                    })
                    .unwrap_or_default();
                namespaces.sort();
                namespaces.dedup();
                KernelController {
                    serial: self.read_opt(&p.join("serial")).unwrap_or_default(),
                    model: self.read_opt(&p.join("model")).unwrap_or_default(),
                    name,
                    namespaces,
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Block devices of the controller's namespaces, partitions included.
    pub fn block_devices(&self, bdf: &str) -> Vec<BlockDev> {
        let mut out = Vec::new();
        for ctrl in self.kernel_controllers(bdf) {
            for ns in ctrl.namespaces {
                let dir = self.path(&format!("/sys/block/{ns}"));
                out.push(BlockDev {
                    name: ns.clone(),
                    dev: self.read_opt(&dir.join("dev")),
                    dir: dir.clone(),
                });
                let Ok(entries) = fs::read_dir(&dir) else {
                    continue;
                };
                let mut parts: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&ns) && n.len() > ns.len())
                    .collect();
                parts.sort();
                for p in parts {
                    let pdir = dir.join(&p);
                    out.push(BlockDev {
                        name: p,
                        dev: self.read_opt(&pdir.join("dev")),
                        dir: pdir,
                    });
                }
            }
        }
        out
    }

    /// What each block device of the controller's namespaces (partitions included) is used
    /// for: mount points, swap, holders (device-mapper, md, …).
    pub fn block_usage(&self, bdf: &str) -> Vec<BlockUsage> {
        let devs = self.block_devices(bdf);
        if devs.is_empty() {
            return Vec::new();
        }
        let mountinfo = self
            .read_opt(&self.path("/proc/self/mountinfo"))
            .unwrap_or_default();
        let mounts = self
            .read_opt(&self.path("/proc/self/mounts"))
            .unwrap_or_default();
        let swaps = self.read_opt(&self.path("/proc/swaps")).unwrap_or_default();
        devs.into_iter()
            .map(|b| {
                let node = format!("/dev/{}", b.name);
                let mut points = Vec::new();
                for line in mountinfo.lines() {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    if f.len() > 4 && b.dev.as_deref() == Some(f[2]) {
                        points.push(unescape_mount(f[4]));
                    }
                }
                for line in mounts.lines() {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    if f.len() > 1 && f[0] == node {
                        points.push(unescape_mount(f[1]));
                    }
                }
                points.sort();
                points.dedup();
                let swap = swaps
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next())
                    .any(|s| unescape_mount(s) == node);
                let mut holders: Vec<String> = fs::read_dir(b.dir.join("holders"))
                    .map(|it| {
                        it.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                holders.sort();
                BlockUsage {
                    name: b.name,
                    mounts: points,
                    swap,
                    holders,
                }
            })
            .collect()
    }

    /// What keeps the controller's namespaces busy: mounts, swap, holders. Empty when free.
    pub fn usage(&self, bdf: &str) -> Vec<String> {
        self.block_usage(bdf)
            .iter()
            .flat_map(BlockUsage::reasons)
            .collect()
    }

    /// Every NVMe controller not in use (see [`Sysfs::usage`]), and those left out with why.
    pub fn select_all(&self) -> Result<Selection> {
        self.select(&PciFilter::default())
    }

    /// Every NVMe controller `filter` lets through and that is not in use; those in use and
    /// those the filter leaves out, with why.
    pub fn select(&self, filter: &PciFilter) -> Result<Selection> {
        let mut sel = Selection::default();
        for bdf in self.nvme_controllers()? {
            if let Some(why) = filter.excludes(&bdf) {
                sel.excluded.push((bdf, why));
                continue;
            }
            let u = self.usage(&bdf);
            if u.is_empty() {
                sel.free.push(bdf);
            } else {
                sel.busy.push((bdf, u));
            }
        }
        Ok(sel)
    }
}
