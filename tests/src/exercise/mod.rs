//! The workload every matrix entry runs, and its checks.
//!
//! One guest boot per matrix entry:
//! 1. **Kernel driver bound.** For each controller: nvme-cli's `id-ctrl` and, per namespace,
//!    `id-ns` (JSON), the namespace ids and `max_hw_sectors_kb` from sysfs; the kernel writes
//!    random data (`dd oflag=direct`) into a few regions of each namespace (1 LBA, 3 LBAs,
//!    MDTS + 1 LBA, 3 MiB + 3 LBAs).
//! 2. **`rnvme setup`** of every controller in one command.
//! 3. **rnvme**, per controller (all controllers at the same time when
//!    [`Exercise::concurrent`]): `identify --json`; reads the kernel's regions back
//!    and compares; writes its own regions (1 LBA, 7 LBAs through stdin and read back through
//!    stdout, exactly MDTS, MDTS + 1 LBA, a big region ([`Exercise::big_bytes`] + 1 LBA) read
//!    back, and a `--fua` write); SMART before and after the 9 MiB
//!    write (the command count shows the MDTS split); flush; write-zeroes and trim of the middle
//!    of a written region (checked by reading: zeros inside, data kept around); the error log.
//!    With [`Exercise::extras`] also text output, `--sgl`, `--no-hugepages`, and a read of a
//!    sector that QEMU's blkdebug fails (the error is reported, the device keeps working).
//! 4. With [`Exercise::one_process`]: `two_controllers` drives controllers 0 and 1 from one
//!    process.
//! 5. **`rnvme reset`** of every controller; the kernel driver takes them back and reads every
//!    region rnvme wrote (`dd iflag=direct`), then nvme-cli's SMART and error logs.
//!
//! The host then checks every step: identify field by field against nvme-cli, all data
//! comparisons, the SMART deltas, and the error paths.

use std::fmt::Write as _;

use rnvme_tools::vm::{ControllerSpec, VmConfig};
use serde_json::Value;

use crate::guest::{run_guest, GuestRun};
use crate::steps::Steps;

mod checks;
mod script;

pub use checks::*;
use script::*;

const MIB: u64 = 1 << 20;
/// QEMU's default MDTS (2^7 minimum-size pages).
const QEMU_DEFAULT_MDTS: u8 = 7;
/// QEMU's controller has CAP.MPSMIN = 0: 4 KiB pages.
const QEMU_MIN_PAGE: u64 = 4096;
/// QEMU deallocates in units of max(LBA size, 4 KiB) (its NPDG); trims are aligned to it.
const DEALLOCATE_GRANULARITY: u64 = 4096;
/// The step (buffer) size of `rnvme read` (`rnvme write` streams pieces of the max transfer):
/// a big region of more than this crosses it.
pub const RNVME_STEP: u64 = 8 * MIB;
/// Byte offset and length of the region `two_controllers` writes on both controllers.
const TWO_CTRL_OFFSET: u64 = 96 * MIB;
const TWO_CTRL_LEN: u64 = 3 * MIB;
/// Bytes per chunk of `two_controllers`' interleaved writes (see its source).
const TWO_CTRL_CHUNK: u64 = 256 << 10;

/// One matrix entry.
#[derive(Debug, Clone)]
pub struct Exercise {
    /// Controllers and namespaces (namespace images stay in the run's temporary directory).
    pub config: VmConfig,
    /// Run the rnvme phase of every controller at the same time (one rnvme process each).
    pub concurrent: bool,
    /// Run `two_controllers` over controllers 0 and 1 (one process, both controllers).
    pub one_process: bool,
    /// Also check text output, `--sgl`, `--no-hugepages`, and an injected read error on every
    /// namespace with a blkdebug `read_aio` rule limited to one sector.
    pub extras: bool,
    /// Size of the region rnvme writes between two SMART snapshots (one LBA is added, so that
    /// it is never a multiple of MDTS); above [`RNVME_STEP`] it also crosses the read step.
    pub big_bytes: u64,
}

/// An LBA range with a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: &'static str,
    pub lba: u64,
    pub count: u64,
}

/// A written region whose middle is then zeroed (write-zeroes) or deallocated (trim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spliced {
    pub region: Region,
    /// LBAs kept at the start (and at the end).
    pub guard: u64,
    /// LBAs zeroed or deallocated in the middle.
    pub mid: u64,
}

/// Where one namespace's regions go.
#[derive(Debug, Clone)]
pub struct NsLayout {
    pub ctrl: usize,
    pub nsid: u32,
    pub lba_size: u64,
    pub size_lbas: u64,
    pub mdts_bytes: u64,
    /// Written by the kernel, read by rnvme.
    pub kernel: Vec<Region>,
    /// Written by rnvme (with FUA when the flag is set), read by the kernel.
    pub rnvme: Vec<(Region, bool)>,
    /// The region written between the two SMART snapshots ([`Exercise::big_bytes`] + 1 LBA).
    pub big: Region,
    pub zeroed: Spliced,
    pub trimmed: Spliced,
    /// A range covering a sector blkdebug fails on every read.
    pub failing: Option<Region>,
    /// The region `two_controllers` writes, if it runs on this namespace.
    pub two_ctrl: Option<Region>,
}

impl NsLayout {
    /// The step-name prefix of this namespace.
    pub fn prefix(&self) -> String {
        format!("c{}n{}", self.ctrl, self.nsid)
    }

    fn bytes(&self, r: &Region) -> u64 {
        r.count * self.lba_size
    }

    fn offset(&self, r: &Region) -> u64 {
        r.lba * self.lba_size
    }

    /// Every region written by anyone, for the overlap check.
    fn all_regions(&self) -> Vec<&Region> {
        let mut v: Vec<&Region> = self.kernel.iter().collect();
        v.extend(self.rnvme.iter().map(|(r, _)| r));
        v.push(&self.big);
        v.push(&self.zeroed.region);
        v.push(&self.trimmed.region);
        v.extend(self.failing.iter());
        v.extend(self.two_ctrl.iter());
        v
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Places regions one after the other with a gap of at least 1 MiB, at chosen misalignments.
struct Cursor {
    next: u64,
    mib: u64,
}

impl Cursor {
    /// A region of `count` LBAs, `shift` LBAs past the next `align`-LBA boundary.
    fn place(&mut self, name: &'static str, count: u64, align: u64, shift: u64) -> Region {
        let lba = align_up(self.next, align) + shift;
        self.next = align_up(lba + count, self.mib) + self.mib;
        Region { name, lba, count }
    }
}

/// The MDTS the controller reports, in bytes.
pub fn expected_mdts_bytes(spec: &ControllerSpec) -> u64 {
    QEMU_MIN_PAGE << spec.mdts.unwrap_or(QEMU_DEFAULT_MDTS)
}

/// The serial number the runner gives controller `index`.
pub fn expected_serial(index: usize, spec: &ControllerSpec) -> String {
    if spec.serial.is_empty() {
        format!("rnvme{index}")
    } else {
        spec.serial.clone()
    }
}

/// Lays out the regions of namespace `n` (0-based) of controller `ctrl`.
pub fn layout(ex: &Exercise, ctrl: usize, n: usize) -> NsLayout {
    let cspec = &ex.config.controllers[ctrl];
    let ns = &cspec.namespaces[n];
    let l = u64::from(ns.lba_size);
    let size_lbas = (ns.size_mib << 20) / l;
    let mdts_bytes = expected_mdts_bytes(cspec);
    let ml = (mdts_bytes / l).max(1);
    let mib = MIB / l;
    let mut c = Cursor { next: mib, mib };
    let kernel = vec![
        Region {
            name: "k1",
            lba: 8,
            count: 1,
        },
        c.place("k2", 3, 1, 1),
        c.place("k3", ml + 1, 1, 3),
        c.place("k4", 3 * mib + 3, 1, 5),
    ];
    let rnvme = vec![
        (
            Region {
                name: "w1",
                lba: 1,
                count: 1,
            },
            false,
        ),
        (c.place("w2", 7, 1, 1), false),
        (c.place("w3", ml, ml, 0), false),
        (c.place("w4", ml + 1, 1, 3), false),
        (c.place("fua", 2 * ml + 3, 1, 1), true),
    ];
    let big = c.place("big", ex.big_bytes / l + 1, 1, 7);
    let zeroed = Spliced {
        region: c.place("zero", mib + 9, 1, 1),
        guard: 2,
        mid: mib + 5,
    };
    let g = (DEALLOCATE_GRANULARITY / l).max(1);
    let trimmed = Spliced {
        region: c.place("trim", mib + 2 * g, g, 0),
        guard: g,
        mid: mib,
    };
    let failing = if ex.extras {
        ns.blkdebug
            .iter()
            .find(|r| r.event == "read_aio")
            .and_then(|r| r.sector)
            .map(|sector| {
                let lba = sector * 512 / l;
                Region {
                    name: "failing",
                    lba: lba.saturating_sub(1),
                    count: 3,
                }
            })
    } else {
        None
    };
    let two_ctrl = (ex.one_process && ctrl < 2 && n == 0).then(|| Region {
        name: "two",
        lba: TWO_CTRL_OFFSET / l,
        count: TWO_CTRL_LEN / l,
    });
    let lay = NsLayout {
        ctrl,
        nsid: n as u32 + 1,
        lba_size: l,
        size_lbas,
        mdts_bytes,
        kernel,
        rnvme,
        big,
        zeroed,
        trimmed,
        failing,
        two_ctrl,
    };
    // The layout must fit and no two regions may overlap.
    let mut spans: Vec<(u64, u64, &str)> = lay
        .all_regions()
        .iter()
        .map(|r| (r.lba, r.lba + r.count, r.name))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "regions {} and {} overlap in {}",
            w[0].2,
            w[1].2,
            lay.prefix()
        );
    }
    let end = spans.last().map_or(0, |s| s.1);
    assert!(
        end <= size_lbas,
        "{}: the regions need {end} LBAs, the namespace has {size_lbas}",
        lay.prefix()
    );
    lay
}

/// Runs `ex` in one guest and checks everything.
pub fn run_exercise(ex: &Exercise) -> GuestRun {
    let lays: Vec<Vec<NsLayout>> = ex
        .config
        .controllers
        .iter()
        .enumerate()
        .map(|(ci, c)| (0..c.namespaces.len()).map(|n| layout(ex, ci, n)).collect())
        .collect();
    let script = build_script(ex, &lays);
    let bins: &[&str] = if ex.one_process {
        &["two_controllers"]
    } else {
        &[]
    };
    let run = run_guest(ex.config.clone(), bins, &script.text);
    let steps = &run.steps;

    // Every step ran and succeeded, except those meant to fail (checked below).
    for name in &script.names {
        let st = steps.get(name);
        if let Some((_, code)) = script.failures.iter().find(|(n, _)| n == name) {
            assert_eq!(st.rc, *code, "{}", st.describe());
        } else {
            assert_eq!(st.rc, 0, "{}", st.describe());
        }
    }

    let setup = steps.ok("setup");
    let reset = steps.ok("reset");
    for ci in 0..ex.config.controllers.len() {
        let bdf = rnvme_tools::vm::controller_bdf(ci);
        assert!(
            setup.stdout.contains(&format!("{bdf}: nvme -> vfio-pci")),
            "{}",
            setup.describe()
        );
        assert!(
            reset.stdout.contains(&format!("{bdf}: vfio-pci -> nvme")),
            "{}",
            reset.describe()
        );
        let kname = steps.ok(&format!("c{ci}_kname")).text().to_string();
        assert!(
            kname.starts_with("nvme") && kname[4..].parse::<u32>().is_ok(),
            "controller {ci} is not bound to the kernel driver at the start: {kname:?}"
        );
    }
    for (ci, l) in lays.iter().enumerate() {
        check_identify(ex, ci, steps, l);
        check_smart(ci, steps, l);
        check_error_log(ex, ci, steps);
        if ex.extras {
            check_extras(ex, ci, steps, l);
        }
        for lay in l {
            let p = lay.prefix();
            let f = steps.ok(&format!("{p}_flush"));
            assert!(
                f.stderr
                    .contains(&format!("flushed namespace {}", lay.nsid)),
                "{}",
                f.describe()
            );
            for (sp, verb) in [(&lay.zeroed, "zeroed"), (&lay.trimmed, "deallocated")] {
                let op = steps.ok(&format!("{p}_{}_op", sp.region.name));
                let needle = format!(
                    "{verb} {} LBAs at LBA {} of namespace {}",
                    sp.mid,
                    sp.region.lba + sp.guard,
                    lay.nsid
                );
                assert!(
                    op.stderr.contains(&needle),
                    "{needle:?}:\n{}",
                    op.describe()
                );
            }
            let mut written: Vec<&Region> = lay.rnvme.iter().map(|(r, _)| r).collect();
            written.extend([&lay.big, &lay.zeroed.region, &lay.trimmed.region]);
            for r in written {
                let w = steps.ok(&format!("{p}_{}_rwrite", r.name));
                let needle = format!(
                    "wrote {} LBAs ({} bytes) at LBA {} of namespace {}",
                    r.count,
                    lay.bytes(r),
                    r.lba,
                    lay.nsid
                );
                assert!(w.stderr.contains(&needle), "{needle:?}:\n{}", w.describe());
            }
        }
    }
    if ex.one_process {
        let two = steps.ok("two_ctrl").json();
        let ctrls = two["controllers"]
            .as_array()
            .unwrap_or_else(|| panic!("no controllers in {two}"));
        assert_eq!(ctrls.len(), 2, "{two}");
        for (ci, c) in ctrls.iter().enumerate() {
            let lay = &lays[ci][0];
            assert_eq!(text(c, "bdf"), rnvme_tools::vm::controller_bdf(ci), "{two}");
            assert_eq!(
                text(c, "serial"),
                expected_serial(ci, &ex.config.controllers[ci]),
                "{two}"
            );
            assert_eq!(num(c, "lba_size"), lay.lba_size, "{two}");
            let r = lay.two_ctrl.as_ref().expect("two_controllers region");
            assert_eq!((num(c, "lba"), num(c, "count")), (r.lba, r.count), "{two}");
        }
        assert_eq!(
            num(&two, "interleaved_chunks"),
            TWO_CTRL_LEN.div_ceil(TWO_CTRL_CHUNK),
            "{two}"
        );
        assert_eq!(two["verified"], Value::Bool(true), "{two}");
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;
    use rnvme_tools::vm::{BlkdebugRule, NamespaceSpec};

    fn ex(lba: u32, mdts: Option<u8>, size_mib: u64) -> Exercise {
        Exercise {
            config: VmConfig {
                controllers: vec![ControllerSpec {
                    mdts,
                    namespaces: vec![NamespaceSpec {
                        lba_size: lba,
                        size_mib,
                        blkdebug: vec![BlkdebugRule {
                            event: "read_aio".into(),
                            errno: 5,
                            sector: Some(200 * 2048),
                            once: false,
                        }],
                        ..NamespaceSpec::default()
                    }],
                    ..ControllerSpec::default()
                }],
                ..VmConfig::default()
            },
            concurrent: false,
            one_process: true,
            extras: true,
            big_bytes: RNVME_STEP + MIB,
        }
    }

    #[test]
    fn layouts_cross_mdts_and_the_write_step() {
        for (lba, mdts) in [(512, Some(2)), (4096, None), (512, None), (4096, Some(2))] {
            let e = ex(lba, mdts, 256);
            let lay = layout(&e, 0, 0);
            let l = u64::from(lba);
            let m = expected_mdts_bytes(&e.config.controllers[0]);
            let sizes: Vec<u64> = lay.rnvme.iter().map(|(r, _)| r.count * l).collect();
            assert!(sizes.contains(&l), "one LBA");
            assert!(sizes.contains(&m), "exactly MDTS");
            assert!(sizes.contains(&(m + l)), "MDTS + 1 LBA");
            assert!(lay.bytes(&lay.big) > RNVME_STEP + m);
            assert!(lay.kernel.iter().any(|r| r.count * l > m));
            assert!(lay.rnvme.iter().any(|(_, fua)| *fua));
            // Odd offsets as well as aligned ones.
            assert!(lay.rnvme.iter().any(|(r, _)| r.lba % 2 == 1));
            // Trims are aligned to the deallocation granularity.
            let g = DEALLOCATE_GRANULARITY / l.min(DEALLOCATE_GRANULARITY);
            assert_eq!((lay.trimmed.region.lba + lay.trimmed.guard) % g, 0);
            assert_eq!(lay.trimmed.mid % g, 0);
            let f = lay.failing.as_ref().expect("failing region");
            assert!(f.lba * l <= 200 * MIB && (f.lba + f.count) * l > 200 * MIB);
            assert_eq!(lay.two_ctrl.as_ref().unwrap().lba * l, TWO_CTRL_OFFSET);
        }
    }

    #[test]
    #[should_panic(expected = "the regions need")]
    fn layout_refuses_a_namespace_too_small() {
        let mut e = ex(512, None, 64);
        e.config.controllers[0].namespaces[0].blkdebug.clear();
        layout(&e, 0, 0);
    }

    #[test]
    fn script_names_every_step_once() {
        let e = ex(512, Some(2), 256);
        let lays = vec![vec![layout(&e, 0, 0)]];
        let s = build_script(&e, &lays);
        let mut names = s.names.clone();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate step names");
        assert!(s.names.contains(&"c0n1_big_kcmp".to_string()));
        assert!(s.names.contains(&"c0n1_trim_op".to_string()));
        assert_eq!(s.failures, vec![("c0n1_failing_read".to_string(), 1)]);
        assert!(s.text.contains("rnvme trim $NVME0 --ns 1"));
        assert!(s.text.contains("two_controllers $NVME0 $NVME1"));
    }

    #[test]
    fn numbers_from_json_numbers_and_strings() {
        let v: Value = serde_json::json!({"a": 5, "b": "17", "c": "x"});
        assert_eq!(num(&v, "a"), 5);
        assert_eq!(num(&v, "b"), 17);
        assert!(std::panic::catch_unwind(|| num(&v, "c")).is_err());
        assert!(std::panic::catch_unwind(|| num(&v, "missing")).is_err());
    }
}
