//! `rnvme status`: in one view what SPDK's `setup.sh status`, `nvme list` and a look at the
//! locked-memory limit tell apart: hugepages per NUMA node and size, every NVMe controller with
//! its ids, node, driver, IOMMU group, block devices and their use, and whether rnvme can open
//! it.

use std::fmt::Write as _;

use serde::Serialize;

use crate::sysfs::{
    memlock_needed_kib, Access, BlockUsage, HugepagePool, Memlock, Sysfs, SysfsError, HUGEPAGE_KIB,
};

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Hugepages per NUMA node (or system-wide) and size.
    pub hugepages: Vec<HugepagePool>,
    /// This process's locked-memory limit against what the reserved hugepages need.
    pub memlock: Option<MemlockStatus>,
    /// Every NVMe controller, by address.
    pub controllers: Vec<ControllerStatus>,
}

/// The locked-memory limit and the need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemlockStatus {
    /// The limit and the capability that lifts it.
    #[serde(flatten)]
    pub limit: Memlock,
    /// Bytes a process pins to map every reserved 2 MiB hugepage for DMA, queues included.
    pub needed_bytes: u64,
    /// The limit allows it.
    pub enough: bool,
}

/// One controller.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControllerStatus {
    /// PCI address.
    pub bdf: String,
    /// PCI vendor id, hex.
    pub vendor: String,
    /// PCI device id, hex.
    pub device: String,
    /// NUMA node (`None`: not known).
    pub numa_node: Option<u32>,
    /// Bound driver.
    pub driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// The kernel's name of the controller (`nvme0`) while the kernel drives it.
    pub kernel_name: Option<String>,
    /// Its namespaces' block devices and partitions, with what uses them.
    pub block_devices: Vec<BlockUsage>,
    /// rnvme can open it.
    pub usable: bool,
    /// Why not, or how.
    pub reason: String,
}

/// Gathers the status from `sys`; `access` says whether rnvme can open a controller.
pub fn gather(sys: &Sysfs, access: &dyn Fn(&str) -> Access) -> Result<Status, SysfsError> {
    let hugepages = sys.hugepages();
    let reserved: u64 = hugepages
        .iter()
        .filter(|p| p.size_kib == HUGEPAGE_KIB)
        .map(|p| p.total)
        .sum();
    let memlock = sys.memlock().map(|limit| {
        let needed_bytes = memlock_needed_kib(reserved) * 1024;
        MemlockStatus {
            enough: limit.allows(needed_bytes),
            limit,
            needed_bytes,
        }
    });
    let mut controllers = Vec::new();
    for bdf in sys.nvme_controllers()? {
        let dev = sys.device(&bdf)?;
        let a = access(&bdf);
        controllers.push(ControllerStatus {
            vendor: format!("{:04x}", dev.vendor),
            device: format!("{:04x}", dev.device),
            numa_node: dev.numa_node,
            driver: dev.driver,
            iommu_group: dev.iommu_group,
            kernel_name: sys
                .kernel_controllers(&bdf)
                .into_iter()
                .next()
                .map(|k| k.name),
            block_devices: sys.block_usage(&bdf),
            usable: a.usable,
            reason: a.reason,
            bdf,
        });
    }
    Ok(Status {
        hugepages,
        memlock,
        controllers,
    })
}

/// Rows under a header, each column as wide as its widest cell, the last one left ragged.
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for r in std::iter::once(&head).chain(rows) {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 1 == r.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn size_name(kib: u64) -> String {
    if kib >= 1 << 20 && kib.is_multiple_of(1 << 20) {
        format!("{} GiB", kib >> 20)
    } else if kib >= 1024 && kib.is_multiple_of(1024) {
        format!("{} MiB", kib >> 10)
    } else {
        format!("{kib} KiB")
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// What a block device is used for, in a few words: `nvme0n1p1 (on /data)`.
fn block_cell(b: &BlockUsage) -> String {
    let mut uses: Vec<String> = b.mounts.iter().map(|m| format!("on {m}")).collect();
    if b.swap {
        uses.push("swap".into());
    }
    if !b.holders.is_empty() {
        uses.push(format!("held by {}", b.holders.join(" ")));
    }
    if uses.is_empty() {
        b.name.clone()
    } else {
        format!("{} ({})", b.name, uses.join(", "))
    }
}

impl Status {
    /// The status as text.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Hugepages (free / total)");
        if self.hugepages.is_empty() {
            let _ = writeln!(s, "  none: the kernel has no hugepage support in sysfs");
        } else {
            let mut sizes: Vec<u64> = self.hugepages.iter().map(|p| p.size_kib).collect();
            sizes.sort_unstable();
            sizes.dedup();
            let mut nodes: Vec<Option<u32>> = self.hugepages.iter().map(|p| p.node).collect();
            nodes.dedup();
            let header: Vec<String> = std::iter::once("node".to_string())
                .chain(sizes.iter().map(|&k| size_name(k)))
                .collect();
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    std::iter::once(n.map_or_else(|| "all".to_string(), |n| n.to_string()))
                        .chain(sizes.iter().map(|&k| {
                            self.hugepages
                                .iter()
                                .find(|p| p.node == *n && p.size_kib == k)
                                .map_or_else(|| "-".into(), |p| format!("{} / {}", p.free, p.total))
                        }))
                        .collect()
                })
                .collect();
            let h: Vec<&str> = header.iter().map(String::as_str).collect();
            for line in columns(&h, &rows).lines() {
                let _ = writeln!(s, "  {line}");
            }
        }
        let _ = writeln!(s);
        match &self.memlock {
            None => {
                let _ = writeln!(s, "Locked memory: unknown (/proc/self/limits unreadable)");
            }
            Some(m) => {
                let limit = m
                    .limit
                    .limit_bytes
                    .map_or_else(|| "unlimited".to_string(), mib);
                let verdict = if m.limit.privileged {
                    "enough: this process has CAP_IPC_LOCK, which lifts the limit".to_string()
                } else if m.enough {
                    "enough".to_string()
                } else {
                    format!(
                        "too low: raise it to {} KiB (`ulimit -l`, or memlock in /etc/security/limits.conf), or run `rnvme setup --user NAME` as root",
                        m.needed_bytes / 1024
                    )
                };
                let _ = writeln!(
                    s,
                    "Locked memory: {limit} for this process; the reserved 2 MiB hugepages need {}: {verdict}",
                    mib(m.needed_bytes)
                );
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "NVMe controllers");
        if self.controllers.is_empty() {
            let _ = writeln!(s, "  none found");
            return s;
        }
        let rows: Vec<Vec<String>> = self
            .controllers
            .iter()
            .map(|c| {
                let dash = || "-".to_string();
                vec![
                    c.bdf.clone(),
                    c.vendor.clone(),
                    c.device.clone(),
                    c.numa_node.map_or_else(dash, |n| n.to_string()),
                    c.driver.clone().unwrap_or_else(dash),
                    c.iommu_group.map_or_else(dash, |g| g.to_string()),
                    c.kernel_name.clone().unwrap_or_else(dash),
                    if c.block_devices.is_empty() {
                        dash()
                    } else {
                        c.block_devices
                            .iter()
                            .map(block_cell)
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    format!("{}: {}", if c.usable { "yes" } else { "no" }, c.reason),
                ]
            })
            .collect();
        let table = columns(
            &[
                "BDF",
                "VENDOR",
                "DEVICE",
                "NUMA",
                "DRIVER",
                "GROUP",
                "NAME",
                "BLOCK DEVICES",
                "RNVME",
            ],
            &rows,
        );
        for line in table.lines() {
            let _ = writeln!(s, "  {line}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::fake::FakeSys;
    use crate::sysfs::NVME_CLASS;

    const A: &str = "0000:00:04.0";
    const B: &str = "0000:00:05.0";

    fn tree() -> FakeSys {
        let f = FakeSys::new();
        f.hugepool(Some(0), 2048, 512, 500);
        f.hugepool(Some(0), 1048576, 0, 0);
        f.hugepool(Some(1), 2048, 128, 128);
        f.hugepool(Some(1), 1048576, 2, 1);
        f.device(A, NVME_CLASS, Some("nvme"), Some(1));
        f.write(&format!("/sys/bus/pci/devices/{A}/numa_node"), "1\n");
        f.kernel_ctrl(A, "nvme0", &["nvme0n1"]);
        f.block("nvme0n1", "259:0", &[("nvme0n1p1", "259:1")]);
        f.write(
            "/proc/self/mountinfo",
            "22 1 259:1 / /data rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n",
        );
        f.device(B, NVME_CLASS, Some("vfio-pci"), Some(2));
        f.write(&format!("/sys/bus/pci/devices/{B}/numa_node"), "-1\n");
        f.write(
            "/proc/self/limits",
            "Max locked memory         67108864             67108864             bytes\n",
        );
        f.write("/proc/self/status", "CapEff:\t0000000000000000\n");
        f
    }

    fn access(bdf: &str) -> Access {
        Access {
            usable: bdf == B,
            reason: if bdf == B {
                "ready".into()
            } else {
                "bound to nvme".into()
            },
        }
    }

    #[test]
    fn gathers_nodes_controllers_and_the_memlock_need() {
        let f = tree();
        let st = gather(&f.sys, &access).unwrap();
        assert_eq!(st.hugepages.len(), 4);
        let m = st.memlock.as_ref().unwrap();
        // 640 pages of 2 MiB on the two nodes, plus the headroom for queues.
        assert_eq!(m.needed_bytes, (640 * 2 + 64) << 20);
        assert!(!m.enough);
        let a = &st.controllers[0];
        assert_eq!(
            (a.bdf.as_str(), a.vendor.as_str(), a.device.as_str()),
            (A, "1b36", "0010")
        );
        assert_eq!(a.numa_node, Some(1));
        assert_eq!(a.kernel_name.as_deref(), Some("nvme0"));
        assert_eq!(a.block_devices.len(), 2);
        assert_eq!(a.block_devices[1].mounts, ["/data"]);
        let b = &st.controllers[1];
        assert_eq!((b.numa_node, b.usable), (None, true));
        assert!(b.block_devices.is_empty() && b.kernel_name.is_none());

        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["hugepages"][0]["node"], 0);
        assert_eq!(v["hugepages"][0]["free"], 500);
        assert_eq!(v["memlock"]["limit_bytes"], 64 << 20);
        assert_eq!(v["memlock"]["privileged"], false);
        assert_eq!(v["controllers"][0]["block_devices"][1]["name"], "nvme0n1p1");
        assert_eq!(v["controllers"][1]["numa_node"], serde_json::Value::Null);
    }

    #[test]
    fn the_table_shows_every_part() {
        let f = tree();
        let t = gather(&f.sys, &access).unwrap().table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "Hugepages (free / total)");
        assert_eq!(lines[1], "  node  2 MiB      1 GiB");
        assert_eq!(lines[2], "  0     500 / 512  0 / 0");
        assert_eq!(lines[3], "  1     128 / 128  1 / 2");
        assert!(
            lines[5].starts_with(
                "Locked memory: 64 MiB for this process; the reserved 2 MiB hugepages need 1344 MiB: too low"
            ),
            "{t}"
        );
        let a = lines.iter().find(|l| l.contains(A)).unwrap();
        assert!(
            a.contains("1b36    0010    1     nvme      1      nvme0  nvme0n1, nvme0n1p1 (on /data)  no: bound to nvme"),
            "{t}"
        );
        let b = lines.iter().find(|l| l.contains(B)).unwrap();
        assert!(b.contains("-     vfio-pci  2      -      -"), "{t}");
        assert!(b.ends_with("yes: ready"), "{t}");
    }

    #[test]
    fn without_numa_the_pools_are_system_wide() {
        let f = FakeSys::new();
        f.hugepool(None, 2048, 16, 16);
        let t = gather(&f.sys, &access).unwrap().table();
        assert!(t.contains("  all   16 / 16\n"), "{t}");
        assert!(t.contains("Locked memory: unknown"), "{t}");
        assert!(t.contains("NVMe controllers\n  none found"), "{t}");
    }
}
