//! `rnvme setup` and `rnvme reset`: move controllers between the kernel's nvme driver and
//! vfio-pci.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use rnvme_tools::sysfs::{
    hugemem_pages, memlock_needed_kib, Hugepages, PciFilter, Selection, Sysfs,
    MEMLOCK_HEADROOM_MIB, NVME_DRIVER,
};

use super::{bdf_arg, outln, UsageError};

/// Hugepages reserved when neither --hugepages nor HUGEMEM says how many.
const DEFAULT_HUGEPAGES: u64 = 512;

/// Arguments of `rnvme setup`.
#[derive(Debug, Args)]
#[command(after_help = "\
Without addresses every NVMe controller whose namespaces are not in use is bound, as SPDK's \
setup.sh does. Its variables are read too: PCI_ALLOWED and PCI_BLOCKED (addresses separated by \
spaces) limit which controllers are touched, also when addresses are given; HUGEMEM (MiB) is the \
hugepage memory when --hugepages is not given.")]
pub struct SetupArgs {
    /// 2 MiB hugepages to reserve: in all, or on each --node (never lowers the current
    /// number; 0 leaves it alone) [default: 512, or HUGEMEM / 2]
    #[arg(long, value_name = "N")]
    pub hugepages: Option<u64>,
    /// Reserve the hugepages on these NUMA nodes (0,1), N on each, instead of in all
    #[arg(long = "node", value_name = "NODE", value_delimiter = ',')]
    pub nodes: Vec<u32>,
    /// Give this user (name or uid) the VFIO group devices and print the locked-memory limit it needs
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Take controllers even if their namespaces are mounted, used as swap or held
    #[arg(long)]
    pub force: bool,
    /// Every NVMe controller whose namespaces are not in use (the default without addresses)
    #[arg(long, conflicts_with = "bdfs")]
    pub all: bool,
    /// Controllers by full PCI address, such as 0000:00:04.0 (default: every one not in use)
    #[arg(value_name = "BDF", value_parser = bdf_arg)]
    pub bdfs: Vec<String>,
}

/// Arguments of `rnvme reset`.
#[derive(Debug, Args)]
#[command(after_help = "\
Without addresses every controller `rnvme setup` bound to vfio-pci is given back. PCI_ALLOWED \
and PCI_BLOCKED limit which controllers are touched, as for setup.")]
pub struct ResetArgs {
    /// Controllers by full PCI address, such as 0000:00:04.0 (default: those rnvme set up)
    #[arg(value_name = "BDF", value_parser = bdf_arg)]
    pub bdfs: Vec<String>,
}

fn driver_name(d: &Option<String>) -> &str {
    d.as_deref().unwrap_or("no driver")
}

/// PCI_ALLOWED and PCI_BLOCKED; a bad entry is a usage error.
fn filter() -> anyhow::Result<PciFilter> {
    PciFilter::from_env().map_err(|e| UsageError(e.to_string()).into())
}

/// The hugepages to reserve: --hugepages, else HUGEMEM, else the default.
fn hugepages_wanted(args: &SetupArgs, hugemem: Option<&str>) -> anyhow::Result<u64> {
    match (args.hugepages, hugemem) {
        (Some(n), _) => Ok(n),
        (None, Some(v)) if !v.trim().is_empty() => {
            hugemem_pages(v).map_err(|e| UsageError(e).into())
        }
        _ => Ok(DEFAULT_HUGEPAGES),
    }
}

/// One line on a hugepage reservation (`what`: "hugepages" or "hugepages on node 1").
fn report_hugepages(what: &str, h: &Hugepages) -> anyhow::Result<()> {
    if h.after >= h.requested {
        outln!(
            "{what}: {} reserved ({} MiB){}",
            h.after,
            h.after * 2,
            if h.before >= h.requested {
                ", unchanged"
            } else {
                ""
            }
        )
    } else {
        outln!(
            "{what}: warning: only {} of {} reserved ({} MiB); memory is short or fragmented: free some, or reserve them at boot (hugepages= on the kernel command line)",
            h.after,
            h.requested,
            h.after * 2
        )
    }
}

/// `rnvme setup`.
pub fn setup(args: SetupArgs) -> anyhow::Result<ExitCode> {
    let sys = Sysfs::from_env();
    let filter = filter()?;
    let pages = hugepages_wanted(&args, std::env::var("HUGEMEM").ok().as_deref())?;
    let nodes = sys.numa_nodes();
    if let Some(n) = args.nodes.iter().find(|n| !nodes.contains(n)) {
        return Err(UsageError(format!(
            "--node {n}: no such NUMA node (nodes: {})",
            if nodes.is_empty() {
                "none in sysfs".to_string()
            } else {
                nodes
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))
        .into());
    }
    let targets = if args.bdfs.is_empty() {
        let Selection {
            free,
            busy,
            excluded,
        } = sys.select(&filter).context("list NVMe controllers")?;
        for (bdf, why) in &excluded {
            outln!("{bdf}: skipped, {why}")?;
        }
        for (bdf, reasons) in &busy {
            outln!("{bdf}: skipped, in use: {}", reasons.join("; "))?;
        }
        if free.is_empty() {
            bail!(
                "no NVMe controller to set up ({} in use, {} left out by PCI_ALLOWED / PCI_BLOCKED)",
                busy.len(),
                excluded.len()
            );
        }
        free
    } else {
        let mut v = Vec::new();
        for bdf in &args.bdfs {
            match filter.excludes(bdf) {
                Some(why) => outln!("{bdf}: skipped, {why}")?,
                None => v.push(bdf.clone()),
            }
        }
        if v.is_empty() {
            bail!("no NVMe controller to set up: every one named is left out by PCI_ALLOWED / PCI_BLOCKED");
        }
        v
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
        if let Some(e) = &r.record_error {
            outln!("{bdf}: warning: {e}")?;
        }
        if let Some((name, (uid, gid))) = owner {
            sys.chown_group_node(&r.group_node, uid, gid)?;
            outln!("{bdf}: {} now belongs to {name}", r.group_node.display())?;
        }
    }
    // With 0 pages this only reads the current numbers.
    let reserved = if args.nodes.is_empty() {
        let h = sys.reserve_hugepages(pages).context("reserve hugepages")?;
        if pages > 0 {
            report_hugepages("hugepages", &h)?;
        }
        h.after
    } else {
        let mut sum = 0;
        for &n in &args.nodes {
            let h = sys
                .reserve_node_hugepages(n, pages)
                .with_context(|| format!("reserve hugepages on node {n}"))?;
            if pages > 0 {
                report_hugepages(&format!("hugepages on node {n}"), &h)?;
            }
            sum += h.after;
        }
        sum
    };
    if let Some((name, _)) = owner {
        let kib = memlock_needed_kib(reserved);
        outln!(
            "memlock: {name} needs `ulimit -l` of at least {kib} KiB ({reserved} hugepages x 2 MiB + {MEMLOCK_HEADROOM_MIB} MiB for queues); for example add \"{name} - memlock {kib}\" to /etc/security/limits.conf"
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `rnvme reset`.
pub fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let sys = Sysfs::from_env();
    let filter = filter()?;
    let candidates = if args.bdfs.is_empty() {
        let bound = sys.bound_by_rnvme();
        if bound.is_empty() {
            outln!("no controller to give back: none that `rnvme setup` bound is on vfio-pci")?;
        }
        bound
    } else {
        args.bdfs.clone()
    };
    let mut targets = Vec::new();
    let named = !args.bdfs.is_empty();
    for bdf in candidates {
        match filter.excludes(&bdf) {
            Some(why) => outln!("{bdf}: skipped, {why}")?,
            None => targets.push(bdf),
        }
    }
    if named && targets.is_empty() {
        bail!(
            "no controller to give back: every one named is left out by PCI_ALLOWED / PCI_BLOCKED"
        );
    }
    for bdf in &targets {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: SetupArgs,
    }

    fn parse(args: &[&str]) -> Result<SetupArgs, clap::Error> {
        T::try_parse_from(std::iter::once("setup").chain(args.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn hugepages_from_the_flag_then_hugemem_then_the_default() {
        let a = parse(&[]).unwrap();
        assert!(a.bdfs.is_empty() && !a.all);
        assert_eq!(hugepages_wanted(&a, None).unwrap(), DEFAULT_HUGEPAGES);
        assert_eq!(hugepages_wanted(&a, Some("")).unwrap(), DEFAULT_HUGEPAGES);
        assert_eq!(hugepages_wanted(&a, Some("4096")).unwrap(), 2048);
        let e = hugepages_wanted(&a, Some("lots")).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        let a = parse(&["--hugepages", "64", "--node", "0,1", "--node", "3"]).unwrap();
        assert_eq!(hugepages_wanted(&a, Some("4096")).unwrap(), 64);
        assert_eq!(a.nodes, [0, 1, 3]);
        let a = parse(&["0000:00:04.0", "0000:00:05.0"]).unwrap();
        assert_eq!(a.bdfs.len(), 2);
        assert_eq!(
            parse(&["--all", "0000:00:04.0"]).unwrap_err().exit_code(),
            2
        );
        assert_eq!(parse(&["--node", "x"]).unwrap_err().exit_code(), 2);
    }
}
