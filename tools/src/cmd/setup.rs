//! `rnvme setup` and `rnvme reset`: move controllers between the kernel's nvme driver and
//! vfio-pci.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args};
use rnvme_tools::sysfs::{memlock_needed_kib, Selection, Sysfs, MEMLOCK_HEADROOM_MIB, NVME_DRIVER};

use super::{bdf_arg, outln, UsageError};

/// Arguments of `rnvme setup`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["all", "bdfs"])))]
pub struct SetupArgs {
    /// 2 MiB hugepages to reserve (never lowers the current number; 0 leaves it alone)
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub hugepages: u64,
    /// Give this user (name or uid) the VFIO group devices and print the locked-memory limit it needs
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Take controllers even if their namespaces are mounted, used as swap or held
    #[arg(long)]
    pub force: bool,
    /// Every NVMe controller whose namespaces are not in use
    #[arg(long)]
    pub all: bool,
    /// Controllers by full PCI address, such as 0000:00:04.0
    #[arg(value_name = "BDF", value_parser = bdf_arg)]
    pub bdfs: Vec<String>,
}

/// Arguments of `rnvme reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Controllers by full PCI address, such as 0000:00:04.0
    #[arg(value_name = "BDF", required = true, value_parser = bdf_arg)]
    pub bdfs: Vec<String>,
}

fn driver_name(d: &Option<String>) -> &str {
    d.as_deref().unwrap_or("no driver")
}

/// `rnvme setup`.
pub fn setup(args: SetupArgs) -> anyhow::Result<ExitCode> {
    let sys = Sysfs::from_env();
    let targets = if args.all {
        let Selection { free, busy } = sys.select_all().context("list NVMe controllers")?;
        for (bdf, reasons) in &busy {
            outln!("{bdf}: skipped, in use: {}", reasons.join("; "))?;
        }
        if free.is_empty() {
            bail!("no NVMe controller to set up ({} found in use)", busy.len());
        }
        free
    } else {
        args.bdfs.clone()
    };
    let owner = match &args.user {
        Some(u) => Some((
            u.as_str(),
            sys.lookup_user(u).map_err(|e| UsageError(e.to_string()))?,
        )),
        None => None,
    };
    for bdf in &targets {
        let r = sys.bind_vfio(bdf, args.force)?;
        if !r.forced_past.is_empty() {
            outln!(
                "{bdf}: warning: taken despite: {}",
                r.forced_past.join("; ")
            )?;
        }
        if r.already_bound {
            outln!(
                "{bdf}: already bound to vfio-pci, IOMMU group {}, {}",
                r.group,
                r.group_node.display()
            )?;
        } else {
            outln!(
                "{bdf}: {} -> vfio-pci, IOMMU group {}, {}",
                driver_name(&r.previous_driver),
                r.group,
                r.group_node.display()
            )?;
        }
        if let Some((name, (uid, gid))) = owner {
            sys.chown_group_node(&r.group_node, uid, gid)?;
            outln!("{bdf}: {} now belongs to {name}", r.group_node.display())?;
        }
    }
    // With --hugepages 0 this only reads the current number.
    let h = sys
        .reserve_hugepages(args.hugepages)
        .context("reserve hugepages")?;
    if args.hugepages > 0 {
        if h.after >= h.requested {
            outln!(
                "hugepages: {} reserved ({} MiB){}",
                h.after,
                h.after * 2,
                if h.before >= h.requested {
                    ", unchanged"
                } else {
                    ""
                }
            )?;
        } else {
            outln!(
                "hugepages: warning: only {} of {} reserved ({} MiB); memory is short or fragmented: free some, or reserve them at boot (hugepages= on the kernel command line)",
                h.after,
                h.requested,
                h.after * 2
            )?;
        }
    }
    if let Some((name, _)) = owner {
        let kib = memlock_needed_kib(h.after);
        outln!(
            "memlock: {name} needs `ulimit -l` of at least {kib} KiB ({} hugepages x 2 MiB + {MEMLOCK_HEADROOM_MIB} MiB for queues); for example add \"{name} - memlock {kib}\" to /etc/security/limits.conf",
            h.after
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `rnvme reset`.
pub fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let sys = Sysfs::from_env();
    for bdf in &args.bdfs {
        let r = sys.reset(bdf)?;
        match &r.driver {
            Some(d) => outln!("{bdf}: {} -> {d}", driver_name(&r.previous_driver))?,
            None => bail!(
                "{bdf}: no driver took the controller back; load the kernel driver (modprobe {NVME_DRIVER}) and run `rnvme reset {bdf}` again"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
