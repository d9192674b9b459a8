//! `rnvme list`: NVMe controllers on the PCI bus and whether rnvme can open them.

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use rnvme_tools::sysfs::{Access, Sysfs};
use serde::Serialize;

use rnvme_tools::nvmecli::{self, ListItem};

use super::{out, outln, OutputFormat};

/// Arguments of `rnvme list`.
#[derive(Debug, Args)]
#[command(after_help = "\
-o json prints `nvme list -o json`'s {\"Devices\": [...]} for the namespaces of the controllers rnvme \
can open, which nvme-cli cannot see: each with the same keys, DevicePath being the BDF/NSID that \
rnvme's commands take. The kernel's namespaces are in nvme-cli's own listing.")]
pub struct ListArgs {
    /// Print rnvme's JSON array (every controller) instead of a table
    #[arg(long)]
    pub json: bool,
    /// normal, or json for nvme-cli's JSON of the namespaces rnvme can reach
    #[arg(
        short = 'o',
        long = "output-format",
        value_enum,
        default_value_t,
        conflicts_with = "json"
    )]
    pub output_format: OutputFormat,
}

/// One controller in the listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// PCI address.
    pub bdf: String,
    /// `vendor:device` in hex.
    pub id: String,
    /// Serial number, when known.
    pub serial: Option<String>,
    /// Model number, when known.
    pub model: Option<String>,
    /// Bound driver.
    pub driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// rnvme can open it.
    pub usable: bool,
    /// Why not, or how.
    pub reason: String,
}

/// A controller the kernel does not drive, brought up through the userspace driver (only for
/// one rnvme can open: bound to vfio-pci and not held by another process). DMA memory comes
/// from ordinary pages, so this works before any hugepage is reserved.
fn open_small(bdf: &str) -> rnvme_driver::Result<Controller> {
    Controller::open(
        bdf,
        ControllerOptions {
            backing: Backing::SmallPages,
            io_queues: 1,
            ..ControllerOptions::default()
        },
    )
}

/// Serial and model of a controller the kernel does not drive, read with Identify Controller
/// through the userspace driver.
fn identify_hook(bdf: &str) -> Option<(String, String)> {
    match open_small(bdf) {
        Ok(c) => Some((c.info().serial.clone(), c.info().model.clone())),
        Err(e) => {
            log::info!("{bdf}: cannot identify: {e}");
            None
        }
    }
}

/// The namespaces of the controllers rnvme can open, for `-o json`.
fn nvme_cli_items(sys: &Sysfs) -> anyhow::Result<Vec<ListItem>> {
    let mut items = Vec::new();
    for bdf in sys.nvme_controllers().context("list NVMe controllers")? {
        if !sys.kernel_controllers(&bdf).is_empty() || !access(sys, &bdf).usable {
            continue;
        }
        let ctrl = match open_small(&bdf) {
            Ok(c) => c,
            Err(e) => {
                log::info!("{bdf}: cannot identify: {e}");
                continue;
            }
        };
        let i = ctrl.info();
        for n in ctrl.namespaces() {
            items.push(ListItem {
                nsid: n.nsid,
                device_path: format!("{bdf}/{}", n.nsid),
                firmware: i.firmware.clone(),
                model: i.model.clone(),
                serial: i.serial.clone(),
                nuse: n.utilization_lbas,
                nsze: n.size_lbas,
                lba_size: n.lba_size,
            });
        }
    }
    Ok(items)
}

/// Whether rnvme can open the controller: the driver's own readiness check, then opening the
/// VFIO device nodes (permissions, another process holding the group).
pub fn access(sys: &Sysfs, bdf: &str) -> Access {
    match rnvme_driver::vfio::probe(bdf).and_then(|p| p.check()) {
        Ok(()) => sys.access(bdf),
        Err(e) => Access {
            usable: false,
            reason: e.to_string(),
        },
    }
}

/// The listing, from sysfs.
pub fn entries(sys: &Sysfs) -> anyhow::Result<Vec<Entry>> {
    let mut v = Vec::new();
    for bdf in sys.nvme_controllers().context("list NVMe controllers")? {
        let dev = sys.device(&bdf)?;
        let a = access(sys, &bdf);
        let (serial, model) = match sys.kernel_controllers(&bdf).into_iter().next() {
            Some(k) => (Some(k.serial), Some(k.model)),
            None if a.usable => match identify_hook(&bdf) {
                Some((s, m)) => (Some(s), Some(m)),
                None => (None, None),
            },
            None => (None, None),
        };
        v.push(Entry {
            id: format!("{:04x}:{:04x}", dev.vendor, dev.device),
            serial,
            model,
            driver: dev.driver,
            iommu_group: dev.iommu_group,
            usable: a.usable,
            reason: a.reason,
            bdf,
        });
    }
    Ok(v)
}

/// The listing as a table.
pub fn table(entries: &[Entry]) -> String {
    let rows: Vec<[String; 7]> = entries
        .iter()
        .map(|e| {
            [
                e.bdf.clone(),
                e.id.clone(),
                e.serial.clone().unwrap_or_else(|| "-".into()),
                e.model.clone().unwrap_or_else(|| "-".into()),
                e.driver.clone().unwrap_or_else(|| "-".into()),
                e.iommu_group.map_or_else(|| "-".into(), |g| g.to_string()),
                if e.usable {
                    format!("yes: {}", e.reason)
                } else {
                    format!("no: {}", e.reason)
                },
            ]
        })
        .collect();
    let header = ["BDF", "ID", "SERIAL", "MODEL", "DRIVER", "GROUP", "RNVME"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
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

/// `rnvme list`.
pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let sys = Sysfs::from_env();
    if args.output_format == OutputFormat::Json {
        let v = nvmecli::list(&nvme_cli_items(&sys)?);
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let e = entries(&sys)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&e)?)?;
    } else if e.is_empty() {
        outln!("no NVMe controllers found")?;
    } else {
        out!("{}", table(&e))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let e = vec![
            Entry {
                bdf: "0000:00:04.0".into(),
                id: "1b36:0010".into(),
                serial: Some("rnvme0".into()),
                model: Some("QEMU NVMe Ctrl".into()),
                driver: Some("nvme".into()),
                iommu_group: Some(3),
                usable: false,
                reason: "bound to nvme".into(),
            },
            Entry {
                bdf: "0000:00:05.0".into(),
                id: "1b36:0010".into(),
                serial: None,
                model: None,
                driver: Some("vfio-pci".into()),
                iommu_group: None,
                usable: true,
                reason: "ready".into(),
            },
        ];
        let t = table(&e);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with(
                "BDF           ID         SERIAL  MODEL           DRIVER    GROUP  RNVME"
            ),
            "{t}"
        );
        assert!(lines[1].ends_with("3      no: bound to nvme"), "{t}");
        assert!(
            lines[2].contains("-       -               vfio-pci  -      yes: ready"),
            "{t}"
        );
    }
}
