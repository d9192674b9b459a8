//! Binding controllers to vfio-pci and back, the record of what rnvme bound, and who may
//! open a device (users, groups, permissions).

use super::*;

impl Sysfs {
    /// Loads vfio-pci if its driver directory is missing.
    pub fn ensure_vfio_driver(&self) -> Result<()> {
        let dir = self.path("/sys/bus/pci/drivers/vfio-pci");
        if dir.is_dir() {
            return Ok(());
        }
        if self.sys != Path::new("/sys") {
            return Err(SysfsError::NoVfioDriver(format!(
                "{} is missing (not loading modules for a sysfs root other than /sys)",
                dir.display()
            )));
        }
        let out = Command::new("modprobe")
            .arg("vfio-pci")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| SysfsError::NoVfioDriver(format!("cannot run modprobe: {e}")))?;
        if !out.status.success() || !dir.is_dir() {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(SysfsError::NoVfioDriver(format!(
                "`modprobe vfio-pci` failed ({}){}; install the kernel's VFIO modules or load them by hand",
                out.status,
                if msg.is_empty() { String::new() } else { format!(": {msg}") }
            )));
        }
        Ok(())
    }

    /// Waits until `check` holds or the settle time passes; returns whether it held.
    pub(super) fn settle(&self, mut check: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        loop {
            if check() {
                return true;
            }
            if start.elapsed() > self.settle {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unbinds the controller from its driver and binds it to vfio-pci: writes `vfio-pci` to
    /// `driver_override`, the address to `driver/unbind` and then to `drivers_probe`, and checks
    /// the result. Refuses a controller whose namespaces are mounted, swapped on or held, unless
    /// `force`. On failure the override is cleared again so the kernel driver can take it back.
    pub fn bind_vfio(&self, bdf: &str, force: bool) -> Result<BindReport> {
        let dev = self.nvme_device(bdf)?;
        let usage = self.usage(bdf);
        if !usage.is_empty() && !force {
            return Err(SysfsError::InUse {
                bdf: bdf.to_string(),
                reasons: usage,
            });
        }
        let group = dev
            .iommu_group
            .ok_or_else(|| SysfsError::NoIommuGroup(bdf.to_string()))?;
        let group_node = self.path(&format!("/dev/vfio/{group}"));
        if dev.driver.as_deref() == Some(VFIO_DRIVER) {
            return Ok(BindReport {
                bdf: bdf.to_string(),
                previous_driver: dev.driver,
                already_bound: true,
                group,
                group_node,
                forced_past: usage,
                record_error: None,
            });
        }
        self.ensure_vfio_driver()?;
        let dir = self.dev_dir(bdf);
        self.write(&dir.join("driver_override"), VFIO_DRIVER)?;
        let result = (|| {
            if dev.driver.is_some() {
                self.write(&dir.join("driver/unbind"), bdf)?;
            }
            self.write(&self.path("/sys/bus/pci/drivers_probe"), bdf)
        })();
        let bound =
            self.settle(|| self.link_name(&dir.join("driver")).as_deref() == Some(VFIO_DRIVER));
        if result.is_err() || !bound {
            let actual = self.link_name(&dir.join("driver"));
            let note = match self.restore(bdf) {
                Ok(Some(d)) => format!("; driver_override cleared, back on {d}"),
                Ok(None) => "; driver_override cleared, no driver took it back".to_string(),
                Err(e) => format!("; clearing driver_override failed too: {e}"),
            };
            return match result {
                Err(e) => Err(e),
                Ok(()) => Err(SysfsError::BindFailed {
                    bdf: bdf.to_string(),
                    expected: VFIO_DRIVER.to_string(),
                    actual,
                    note,
                }),
            };
        }
        let record_error = self
            .record_bound(bdf, true)
            .err()
            .map(|e| format!("`rnvme reset` without addresses will not know it: {e}"));
        if !self.settle(|| group_node.exists()) {
            return Err(SysfsError::NoGroupNode {
                bdf: bdf.to_string(),
                path: group_node,
            });
        }
        Ok(BindReport {
            bdf: bdf.to_string(),
            previous_driver: dev.driver,
            already_bound: false,
            group,
            group_node,
            forced_past: usage,
            record_error,
        })
    }

    /// Clears `driver_override` and asks the kernel to probe the device again; returns the
    /// driver it ends up with.
    pub(super) fn restore(&self, bdf: &str) -> Result<Option<String>> {
        let dir = self.dev_dir(bdf);
        self.write(&dir.join("driver_override"), "\n")?;
        if self.link_name(&dir.join("driver")).is_none() {
            // Fails with ENODEV-like errors when no driver wants it; the result is checked below.
            let _ = self.write(&self.path("/sys/bus/pci/drivers_probe"), bdf);
        }
        Ok(self.link_name(&dir.join("driver")))
    }

    /// Gives the controller back to the kernel: unbinds it from vfio-pci, clears
    /// `driver_override` and probes it again (normally binding `nvme`).
    pub fn reset(&self, bdf: &str) -> Result<ResetReport> {
        let dev = self.nvme_device(bdf)?;
        let dir = self.dev_dir(bdf);
        if dev.driver.as_deref() == Some(VFIO_DRIVER) {
            self.write(&dir.join("driver/unbind"), bdf)?;
        }
        self.write(&dir.join("driver_override"), "\n")?;
        let mut driver = self.link_name(&dir.join("driver"));
        if driver.is_none() {
            self.write(&self.path("/sys/bus/pci/drivers_probe"), bdf)?;
            self.settle(|| self.link_name(&dir.join("driver")).is_some());
            driver = self.link_name(&dir.join("driver"));
        }
        if driver.as_deref() != Some(VFIO_DRIVER) && self.bound_record().iter().any(|b| b == bdf) {
            self.record_bound(bdf, false)?;
        }
        Ok(ResetReport {
            bdf: bdf.to_string(),
            previous_driver: dev.driver,
            driver,
        })
    }

    /// The controllers in [`BOUND_RECORD`].
    pub(super) fn bound_record(&self) -> Vec<String> {
        self.read_opt(&self.path(BOUND_RECORD))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| parse_bdf(l.trim()).ok())
            .collect()
    }

    /// Adds `bdf` to [`BOUND_RECORD`] (`bound`) or takes it out.
    pub(super) fn record_bound(&self, bdf: &str, bound: bool) -> Result<()> {
        let mut v = self.bound_record();
        v.retain(|b| b != bdf);
        if bound {
            v.push(bdf.to_string());
        }
        v.sort();
        let path = self.path(BOUND_RECORD);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| SysfsError::Io {
                what: "create",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let text: String = v.iter().map(|b| format!("{b}\n")).collect();
        fs::write(&path, text).map_err(|source| SysfsError::Io {
            what: "write",
            path,
            source,
        })
    }

    /// The controllers `rnvme setup` bound to vfio-pci that still are: what `rnvme reset`
    /// without addresses gives back.
    pub fn bound_by_rnvme(&self) -> Vec<String> {
        self.bound_record()
            .into_iter()
            .filter(|b| {
                self.device(b)
                    .is_ok_and(|d| d.driver.as_deref() == Some(VFIO_DRIVER))
            })
            .collect()
    }

    /// Resolves a user name or a numeric uid to (uid, gid): through the system's name service
    /// (nix: `/etc/passwd`, LDAP, SSSD, whatever NSS is configured with) on the real system;
    /// from the `/etc/passwd` of a system root given in its place (tests describe a system so).
    pub fn lookup_user(&self, user: &str) -> Result<(u32, u32)> {
        let entry = if self.root == Path::new("/") {
            nss_user(user)?
        } else {
            let passwd = self.read_opt(&self.path("/etc/passwd")).unwrap_or_default();
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && (f[0] == user || f[2] == user))
                    .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                    .flatten()
            })
        };
        match entry {
            Some(ids) => Ok(ids),
            None => match user.parse::<u32>() {
                Ok(uid) => Ok((uid, uid)),
                Err(_) => Err(SysfsError::UnknownUser(user.to_string())),
            },
        }
    }

    /// Gives `user` the IOMMU group's device node.
    pub fn chown_group_node(&self, node: &Path, uid: u32, gid: u32) -> Result<()> {
        std::os::unix::fs::chown(node, Some(uid), Some(gid)).map_err(|source| SysfsError::Io {
            what: "chown",
            path: node.to_path_buf(),
            source,
        })
    }

    /// Other devices in the same IOMMU group bound to a driver VFIO cannot share the group with.
    pub(super) fn group_conflicts(&self, bdf: &str, group: u32) -> Vec<String> {
        let dir = self.path(&format!("/sys/kernel/iommu_groups/{group}/devices"));
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|other| other != bdf)
            .filter_map(|other| {
                let d = self.link_name(&self.dev_dir(&other).join("driver"))?;
                (!matches!(d.as_str(), "vfio-pci" | "pci-stub" | "pcieport"))
                    .then(|| format!("{other} ({d})"))
            })
            .collect();
        v.sort();
        v
    }

    /// Whether rnvme can open the controller through VFIO, checked through sysfs and by opening
    /// the VFIO nodes (which are closed again at once).
    pub fn access(&self, bdf: &str) -> Access {
        let no = |reason: String| Access {
            usable: false,
            reason,
        };
        let dev = match self.nvme_device(bdf) {
            Ok(d) => d,
            Err(e) => return no(e.to_string()),
        };
        match dev.driver.as_deref() {
            Some(VFIO_DRIVER) => {}
            Some(d) => return no(format!("bound to {d}; run `rnvme setup {bdf}`")),
            None => return no(format!("no driver bound; run `rnvme setup {bdf}`")),
        }
        let Some(group) = dev.iommu_group else {
            return no("no IOMMU group (is the IOMMU enabled?)".into());
        };
        let conflicts = self.group_conflicts(bdf, group);
        if !conflicts.is_empty() {
            return no(format!(
                "IOMMU group {group} also holds {}; bind them to vfio-pci too",
                conflicts.join(", ")
            ));
        }
        let open = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let container = self.path("/dev/vfio/vfio");
        if let Err(e) = open(&container) {
            return no(format!("cannot open {}: {e}", container.display()));
        }
        let node = self.path(&format!("/dev/vfio/{group}"));
        match open(&node) {
            Ok(_) => Access {
                usable: true,
                reason: format!("ready ({})", node.display()),
            },
            Err(e) => match e.kind() {
                io::ErrorKind::PermissionDenied => no(format!(
                    "no permission on {}; run `rnvme setup --user $USER {bdf}` as root",
                    node.display()
                )),
                io::ErrorKind::NotFound => no(format!("{} is missing", node.display())),
                _ if e.raw_os_error() == Some(16) => {
                    no(format!("{} is open in another process", node.display()))
                }
                _ => no(format!("cannot open {}: {e}", node.display())),
            },
        }
    }
}

/// `user` (a name, or a uid) in the system's user database.
fn nss_user(user: &str) -> Result<Option<(u32, u32)>> {
    use nix::unistd::{Uid, User};
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    match found {
        Ok(u) => Ok(u.map(|u| (u.uid.as_raw(), u.gid.as_raw()))),
        Err(e) => Err(SysfsError::Io {
            what: "look up the user",
            path: PathBuf::from("/etc/nsswitch.conf"),
            source: std::io::Error::from(e),
        }),
    }
}
