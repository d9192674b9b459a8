//! Hugepages (per node) and the locked-memory limit.

use super::*;

impl Sysfs {
    /// Raises the number of reserved 2 MiB hugepages to `pages` (never lowers it).
    pub fn reserve_hugepages(&self, pages: u64) -> Result<Hugepages> {
        self.raise_count(&self.path("/proc/sys/vm/nr_hugepages"), pages)
    }

    /// Raises the number of 2 MiB hugepages reserved on NUMA node `node` to `pages` (never
    /// lowers it).
    pub fn reserve_node_hugepages(&self, node: u32, pages: u64) -> Result<Hugepages> {
        let nodes = self.numa_nodes();
        if !nodes.contains(&node) {
            return Err(SysfsError::NoNode { node, nodes });
        }
        self.raise_count(
            &self.path(&format!(
                "/sys/devices/system/node/node{node}/hugepages/hugepages-{HUGEPAGE_KIB}kB/nr_hugepages"
            )),
            pages,
        )
    }

    /// Writes `pages` to the count at `path` if it holds fewer; the count before and after.
    pub(super) fn raise_count(&self, path: &Path, pages: u64) -> Result<Hugepages> {
        let parse = |s: String| s.parse::<u64>().unwrap_or(0);
        let before = parse(self.read(path)?);
        if before < pages {
            self.write(path, &pages.to_string())?;
        }
        let after = parse(self.read(path)?);
        Ok(Hugepages {
            before,
            requested: pages,
            after,
        })
    }

    /// The NUMA nodes sysfs knows (`/sys/devices/system/node/nodeN`), sorted; empty on a
    /// kernel without NUMA.
    pub fn numa_nodes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = fs::read_dir(self.path("/sys/devices/system/node"))
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .strip_prefix("node")
                            .and_then(|n| n.parse().ok())
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// The hugepage pools (free and reserved pages of each size) of every NUMA node, or the
    /// system-wide ones where sysfs has no nodes; by node, then size.
    pub fn hugepages(&self) -> Vec<HugepagePool> {
        let sizes = |dir: PathBuf, node: Option<u32>| -> Vec<HugepagePool> {
            let Ok(entries) = fs::read_dir(&dir) else {
                return Vec::new();
            };
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let size_kib = name
                        .strip_prefix("hugepages-")?
                        .strip_suffix("kB")?
                        .parse()
                        .ok()?;
                    let count = |f: &str| {
                        self.read_opt(&e.path().join(f))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0)
                    };
                    Some(HugepagePool {
                        node,
                        size_kib,
                        total: count("nr_hugepages"),
                        free: count("free_hugepages"),
                    })
                })
                .collect()
        };
        let nodes = self.numa_nodes();
        let mut v: Vec<HugepagePool> = if nodes.is_empty() {
            sizes(self.path("/sys/kernel/mm/hugepages"), None)
        } else {
            nodes
                .iter()
                .flat_map(|&n| {
                    sizes(
                        self.path(&format!("/sys/devices/system/node/node{n}/hugepages")),
                        Some(n),
                    )
                })
                .collect()
        };
        v.sort_by_key(|p| (p.node, p.size_kib));
        v
    }

    /// This process's locked-memory limit (`/proc/self/limits`) and whether it has
    /// CAP_IPC_LOCK (`/proc/self/status`); `None` when the limit cannot be read.
    pub fn memlock(&self) -> Option<Memlock> {
        let limits = self.read_opt(&self.path("/proc/self/limits"))?;
        let line = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max locked memory"))?;
        let soft = line.split_whitespace().next()?;
        let limit_bytes = match soft {
            "unlimited" => None,
            n => Some(n.parse().ok()?),
        };
        let privileged = self
            .read_opt(&self.path("/proc/self/status"))
            .and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            })
            .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
        Some(Memlock {
            limit_bytes,
            privileged,
        })
    }
}
