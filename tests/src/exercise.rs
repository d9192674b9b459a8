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

/// A script and the names of the steps it runs.
#[derive(Default)]
struct Script {
    text: String,
    names: Vec<String>,
    /// Steps expected to fail, with their exit status.
    failures: Vec<(String, i32)>,
}

impl Script {
    fn line(&mut self, l: &str) {
        self.text.push_str(l);
        self.text.push('\n');
    }

    fn step(&mut self, name: &str, cmd: &str) {
        self.names.push(name.to_string());
        let _ = writeln!(self.text, "step {name} {cmd}");
    }

    fn failing_step(&mut self, name: &str, code: i32, cmd: &str) {
        self.failures.push((name.to_string(), code));
        self.step(name, cmd);
    }
}

/// Shell helpers specific to the exercise.
const HELPERS: &str = r#"
# wr_stdin FILE ARGS...: rnvme ARGS with FILE on standard input
wr_stdin() { _wf=$1; shift; rnvme "$@" <"$_wf"; }
# rd_stdout FILE ARGS...: rnvme ARGS with standard output to FILE
rd_stdout() { _rf=$1; shift; rnvme "$@" >"$_rf"; }
"#;

fn bdf_var(ctrl: usize) -> String {
    format!("$NVME{ctrl}")
}

fn file(p: &str, r: &str) -> String {
    format!("/tmp/d/{p}_{r}")
}

fn rnvme_read(s: &mut Script, name: &str, lay: &NsLayout, r: &Region, out: &str, extra: &str) {
    s.step(
        name,
        &format!(
            "rnvme read {} --ns {} --lba {} --count {} --out {out}{extra}",
            bdf_var(lay.ctrl),
            lay.nsid,
            r.lba,
            r.count
        ),
    );
}

/// Writes a fresh random file for `r` and writes it with rnvme, then reads it back.
fn rnvme_write_region(s: &mut Script, lay: &NsLayout, r: &Region, fua: bool, stdin: bool) {
    let p = lay.prefix();
    let f = file(&p, r.name);
    s.step(
        &format!("{p}_{}_gen", r.name),
        &format!("rnd {f} {}", lay.bytes(r)),
    );
    let args = format!(
        "write {} --ns {} --lba {}{}",
        bdf_var(lay.ctrl),
        lay.nsid,
        r.lba,
        if fua { " --fua" } else { "" }
    );
    let cmd = if stdin {
        format!("wr_stdin {f} {args}")
    } else {
        format!("rnvme {args} --in {f}")
    };
    s.step(&format!("{p}_{}_rwrite", r.name), &cmd);
}

fn rnvme_read_back(s: &mut Script, lay: &NsLayout, r: &Region, expect: &str, stdout: bool) {
    let p = lay.prefix();
    let out = format!("{}.r", file(&p, r.name));
    if stdout {
        s.step(
            &format!("{p}_{}_rread", r.name),
            &format!(
                "rd_stdout {out} read {} --ns {} --lba {} --count {}",
                bdf_var(lay.ctrl),
                lay.nsid,
                r.lba,
                r.count
            ),
        );
    } else {
        rnvme_read(s, &format!("{p}_{}_rread", r.name), lay, r, &out, "");
    }
    s.step(
        &format!("{p}_{}_rcmp", r.name),
        &format!("same {expect} {out}"),
    );
}

fn kernel_phase(s: &mut Script, ex: &Exercise, lays: &[Vec<NsLayout>]) {
    for (ci, ctrl_lays) in lays.iter().enumerate() {
        let b = bdf_var(ci);
        // The kernel probes controllers and scans namespaces in the background: wait for every
        // namespace before looking at the controller.
        for lay in ctrl_lays {
            let p = lay.prefix();
            s.step(&format!("{p}_blk"), &format!("wait_blk {b} {}", lay.nsid));
            s.line(&format!("B_{p}=$(blk {b} {})", lay.nsid));
        }
        s.line(&format!("C{ci}=$(ctrl_of {b})"));
        s.step(&format!("c{ci}_kname"), &format!("echo \"$C{ci}\""));
        s.step(
            &format!("c{ci}_idctrl"),
            &format!("nvme id-ctrl /dev/$C{ci} -o json"),
        );
        s.step(&format!("c{ci}_nsids"), &format!("ns_ids {b}"));
        for lay in ctrl_lays {
            let p = lay.prefix();
            s.step(
                &format!("{p}_idns"),
                &format!("nvme id-ns /dev/$C{ci} -n {} -o json", lay.nsid),
            );
            s.step(
                &format!("{p}_maxhw"),
                &format!("cat /sys/block/${{B_{p}#/dev/}}/queue/max_hw_sectors_kb"),
            );
            for r in &lay.kernel {
                let f = file(&p, r.name);
                s.step(
                    &format!("{p}_{}_gen", r.name),
                    &format!("rnd {f} {}", lay.bytes(r)),
                );
                s.step(
                    &format!("{p}_{}_kwrite", r.name),
                    &format!("kwrite $B_{p} {f} {}", lay.offset(r)),
                );
            }
        }
    }
    let bdfs: Vec<String> = (0..ex.config.controllers.len()).map(bdf_var).collect();
    s.step(
        "setup",
        &format!("rnvme setup --hugepages 0 {}", bdfs.join(" ")),
    );
}

/// The rnvme phase of controller `ci`, as the body of a shell function.
fn rnvme_phase(ex: &Exercise, ci: usize, lays: &[NsLayout]) -> Script {
    let mut s = Script::default();
    let b = bdf_var(ci);
    s.step(
        &format!("c{ci}_identify"),
        &format!("rnvme identify {b} --json"),
    );
    if ex.extras {
        s.step(
            &format!("c{ci}_identify_text"),
            &format!("rnvme identify {b}"),
        );
    }
    for lay in lays {
        let p = lay.prefix();
        // Kernel-written data read by rnvme.
        for r in &lay.kernel {
            rnvme_read_back(&mut s, lay, r, &file(&p, r.name), false);
        }
        // rnvme-written data, read back by rnvme now and by the kernel after the reset.
        // (w2 goes through stdin and stdout; the others are read back by the kernel only.)
        for (r, fua) in &lay.rnvme {
            let w2 = r.name == "w2";
            rnvme_write_region(&mut s, lay, r, *fua, w2);
            if w2 {
                rnvme_read_back(&mut s, lay, r, &file(&p, r.name), true);
            }
        }
        s.step(
            &format!("{p}_smart0"),
            &format!("rnvme log {b} smart --json"),
        );
        rnvme_write_region(&mut s, lay, &lay.big, false, false);
        s.step(
            &format!("{p}_smart1"),
            &format!("rnvme log {b} smart --json"),
        );
        rnvme_read_back(&mut s, lay, &lay.big, &file(&p, "big"), false);
        s.step(
            &format!("{p}_flush"),
            &format!("rnvme flush {b} --ns {}", lay.nsid),
        );
        for (sp, cmd) in [(&lay.zeroed, "write-zeroes"), (&lay.trimmed, "trim")] {
            let r = &sp.region;
            rnvme_write_region(&mut s, lay, r, false, false);
            s.step(
                &format!("{p}_{}_op", r.name),
                &format!(
                    "rnvme {cmd} {b} --ns {} --lba {} --count {}",
                    lay.nsid,
                    r.lba + sp.guard,
                    sp.mid
                ),
            );
            let f = file(&p, r.name);
            s.step(
                &format!("{p}_{}_expect", r.name),
                &format!(
                    "splice_zeros {f} {f}.e {} {} {}",
                    lay.lba_size, sp.guard, sp.mid
                ),
            );
            rnvme_read_back(&mut s, lay, r, &format!("{f}.e"), false);
        }
        if ex.extras {
            let big = file(&p, "big");
            rnvme_read(
                &mut s,
                &format!("{p}_big_sgl"),
                lay,
                &lay.big,
                &format!("{big}.sgl"),
                " --sgl",
            );
            s.step(&format!("{p}_big_sglcmp"), &format!("same {big} {big}.sgl"));
            let w4 = lay.rnvme.iter().find(|(r, _)| r.name == "w4").map(|x| &x.0);
            if let Some(w4) = w4 {
                let f = file(&p, "w4");
                rnvme_read(
                    &mut s,
                    &format!("{p}_w4_small"),
                    lay,
                    w4,
                    &format!("{f}.small"),
                    " --no-hugepages",
                );
                s.step(&format!("{p}_w4_smallcmp"), &format!("same {f} {f}.small"));
            }
            if let Some(fr) = &lay.failing {
                let f = file(&p, "failing");
                s.failing_step(
                    &format!("{p}_failing_read"),
                    1,
                    &format!(
                        "rnvme read {b} --ns {} --lba {} --count {} --out {f}",
                        lay.nsid, fr.lba, fr.count
                    ),
                );
                // The device still works after the error.
                let k1 = &lay.kernel[0];
                rnvme_read(
                    &mut s,
                    &format!("{p}_after_error"),
                    lay,
                    k1,
                    &format!("{}.again", file(&p, "k1")),
                    "",
                );
                s.step(
                    &format!("{p}_after_errorcmp"),
                    &format!("same {} {}.again", file(&p, "k1"), file(&p, "k1")),
                );
            }
        }
    }
    s.step(
        &format!("c{ci}_errlog"),
        &format!("rnvme log {b} errors --json"),
    );
    if ex.extras {
        s.step(
            &format!("c{ci}_errlog_text"),
            &format!("rnvme log {b} errors"),
        );
        s.step(
            &format!("c{ci}_smart_text"),
            &format!("rnvme log {b} smart"),
        );
    }
    s.step(
        &format!("c{ci}_smart_end"),
        &format!("rnvme log {b} smart --json"),
    );
    s
}

fn after_reset_phase(s: &mut Script, lays: &[Vec<NsLayout>]) {
    for (ci, ctrl_lays) in lays.iter().enumerate() {
        let b = bdf_var(ci);
        for lay in ctrl_lays {
            let p = lay.prefix();
            s.step(&format!("{p}_kblk2"), &format!("wait_blk {b} {}", lay.nsid));
            s.line(&format!("B_{p}=$(blk {b} {})", lay.nsid));
            let mut checks: Vec<(&Region, String)> = lay
                .rnvme
                .iter()
                .map(|(r, _)| (r, file(&p, r.name)))
                .collect();
            checks.push((&lay.big, file(&p, "big")));
            checks.push((
                &lay.zeroed.region,
                format!("{}.e", file(&p, lay.zeroed.region.name)),
            ));
            checks.push((
                &lay.trimmed.region,
                format!("{}.e", file(&p, lay.trimmed.region.name)),
            ));
            if let Some(r) = &lay.two_ctrl {
                checks.push((r, format!("/tmp/d/two{ci}")));
            }
            for (r, expect) in checks {
                let k = format!("{}.k", file(&p, r.name));
                s.step(
                    &format!("{p}_{}_kread", r.name),
                    &format!("kread $B_{p} {} {} {k}", lay.offset(r), lay.bytes(r)),
                );
                s.step(
                    &format!("{p}_{}_kcmp", r.name),
                    &format!("same {expect} {k}"),
                );
            }
        }
        s.line(&format!("C{ci}=$(ctrl_of {b})"));
        s.step(
            &format!("c{ci}_ksmart"),
            &format!("nvme smart-log /dev/$C{ci} -o json"),
        );
        s.step(
            &format!("c{ci}_kerrlog"),
            &format!("nvme error-log /dev/$C{ci} -o json"),
        );
    }
}

/// The whole guest script for `ex`.
fn build_script(ex: &Exercise, lays: &[Vec<NsLayout>]) -> Script {
    let mut s = Script::default();
    s.line(HELPERS);
    kernel_phase(&mut s, ex, lays);
    let phases: Vec<Script> = lays
        .iter()
        .enumerate()
        .map(|(ci, l)| rnvme_phase(ex, ci, l))
        .collect();
    for (ci, ph) in phases.iter().enumerate() {
        s.line(&format!("rphase_c{ci}() {{"));
        s.text.push_str(&ph.text);
        s.line("}");
        s.names.extend(ph.names.iter().cloned());
        s.failures.extend(ph.failures.iter().cloned());
    }
    if ex.concurrent {
        for ci in 0..phases.len() {
            s.line(&format!("rphase_c{ci} >/tmp/rphase_c{ci}.log 2>&1 &"));
        }
        s.line("wait");
        for ci in 0..phases.len() {
            s.line(&format!("cat /tmp/rphase_c{ci}.log"));
        }
    } else {
        for ci in 0..phases.len() {
            s.line(&format!("rphase_c{ci}"));
        }
    }
    if ex.one_process {
        s.step(
            "two_ctrl",
            &format!(
                "two_controllers $NVME0 $NVME1 {TWO_CTRL_OFFSET} {TWO_CTRL_LEN} /tmp/d/two0 /tmp/d/two1"
            ),
        );
    }
    let bdfs: Vec<String> = (0..ex.config.controllers.len()).map(bdf_var).collect();
    s.step("reset", &format!("rnvme reset {}", bdfs.join(" ")));
    after_reset_phase(&mut s, lays);
    s
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// `v[key]` as an unsigned number (nvme-cli prints 128-bit counters as strings).
pub fn num(v: &Value, key: &str) -> u64 {
    match &v[key] {
        Value::Number(n) => n
            .as_u64()
            .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v}")),
        Value::String(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("`{key}` is not a number in {v}")),
        other => panic!("`{key}` is missing or not a number ({other}) in {v}"),
    }
}

/// `v[key]` as a string.
pub fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is missing or not a string in {v}"))
}

fn flag(v: &Value, key: &str) -> bool {
    v[key]
        .as_bool()
        .unwrap_or_else(|| panic!("`{key}` is missing or not a boolean in {v}"))
}

/// Checks `rnvme identify --json` of controller `ci` against nvme-cli and the configuration.
fn check_identify(ex: &Exercise, ci: usize, steps: &Steps, lays: &[NsLayout]) {
    let spec = &ex.config.controllers[ci];
    let rid = steps.ok(&format!("c{ci}_identify")).json();
    let ctrl = steps.ok(&format!("c{ci}_idctrl")).json();
    let ctx = format!("controller {ci}:\nrnvme: {rid}\nnvme-cli: {ctrl}");

    assert_eq!(
        text(&rid, "bdf"),
        rnvme_tools::vm::controller_bdf(ci),
        "{ctx}"
    );
    assert_eq!(text(&rid, "serial"), text(&ctrl, "sn").trim(), "{ctx}");
    assert_eq!(text(&rid, "serial"), expected_serial(ci, spec), "{ctx}");
    assert_eq!(text(&rid, "model"), text(&ctrl, "mn").trim(), "{ctx}");
    assert_eq!(text(&rid, "firmware"), text(&ctrl, "fr").trim(), "{ctx}");
    assert!(!text(&rid, "model").is_empty(), "{ctx}");
    assert_eq!(num(&rid, "vendor_id"), num(&ctrl, "vid"), "{ctx}");
    assert_eq!(
        num(&rid, "subsystem_vendor_id"),
        num(&ctrl, "ssvid"),
        "{ctx}"
    );
    assert_eq!(num(&rid, "cntlid"), num(&ctrl, "cntlid"), "{ctx}");
    let ver = num(&ctrl, "ver");
    assert_eq!(
        text(&rid, "version"),
        format!("{}.{}.{}", ver >> 16, (ver >> 8) & 0xff, ver & 0xff),
        "{ctx}"
    );
    assert_eq!(num(&rid, "nn"), num(&ctrl, "nn"), "{ctx}");
    assert_eq!(num(&rid, "oncs"), num(&ctrl, "oncs"), "{ctx}");
    assert_eq!(num(&rid, "sqes"), num(&ctrl, "sqes"), "{ctx}");
    assert_eq!(num(&rid, "cqes"), num(&ctrl, "cqes"), "{ctx}");
    let oncs = num(&ctrl, "oncs");
    assert_eq!(flag(&rid, "compare"), oncs & 1 != 0, "{ctx}");
    assert_eq!(flag(&rid, "dataset_management"), oncs & 4 != 0, "{ctx}");
    assert_eq!(flag(&rid, "write_zeroes"), oncs & 8 != 0, "{ctx}");
    assert_eq!(
        flag(&rid, "volatile_write_cache"),
        num(&ctrl, "vwc") & 1 != 0,
        "{ctx}"
    );

    // MDTS: the raw value, its size in bytes (QEMU's MPSMIN is 0: 4 KiB pages), the configured
    // value, and the kernel's view of it (max_hw_sectors_kb is MDTS when MDTS is at most the
    // kernel's own 512 KiB+ limit).
    let mdts = num(&ctrl, "mdts");
    assert_eq!(num(&rid, "mdts"), mdts, "{ctx}");
    let mdts_bytes = num(&rid, "mdts_bytes");
    assert_eq!(mdts_bytes, QEMU_MIN_PAGE << mdts, "{ctx}");
    assert_eq!(mdts_bytes, expected_mdts_bytes(spec), "{ctx}");
    let max_transfer = num(&rid, "max_transfer_bytes");
    assert!(
        max_transfer > 0 && max_transfer <= mdts_bytes,
        "max_transfer_bytes {max_transfer} must be within MDTS {mdts_bytes}: {ctx}"
    );
    for lay in lays {
        let kb = steps.ok(&format!("{}_maxhw", lay.prefix())).number();
        if mdts_bytes <= 512 << 10 {
            assert_eq!(
                kb * 1024,
                mdts_bytes,
                "the kernel's max_hw_sectors_kb disagrees with MDTS: {ctx}"
            );
        } else {
            assert!(kb * 1024 <= mdts_bytes, "{ctx}");
        }
    }

    // Namespaces: the same ids as the kernel sees, and field by field as nvme-cli's id-ns.
    let kernel_ids: Vec<u64> = steps
        .ok(&format!("c{ci}_nsids"))
        .text()
        .lines()
        .map(|l| l.trim().parse().expect("nsid"))
        .collect();
    let want_ids: Vec<u64> = (1..=spec.namespaces.len() as u64).collect();
    assert_eq!(kernel_ids, want_ids, "the kernel's namespaces: {ctx}");
    let namespaces = rid["namespaces"]
        .as_array()
        .unwrap_or_else(|| panic!("no namespaces array: {ctx}"));
    let rnvme_ids: Vec<u64> = namespaces.iter().map(|n| num(n, "nsid")).collect();
    assert_eq!(rnvme_ids, want_ids, "rnvme's namespaces: {ctx}");
    for (n, lay) in namespaces.iter().zip(lays) {
        let idns = steps.ok(&format!("{}_idns", lay.prefix())).json();
        let nctx = format!("namespace {}:\nrnvme: {n}\nnvme-cli: {idns}", lay.nsid);
        assert_eq!(num(n, "size_lbas"), num(&idns, "nsze"), "{nctx}");
        assert_eq!(num(n, "capacity_lbas"), num(&idns, "ncap"), "{nctx}");
        assert_eq!(num(n, "utilization_lbas"), num(&idns, "nuse"), "{nctx}");
        let flbas = num(&idns, "flbas");
        assert_eq!(num(n, "flbas"), flbas, "{nctx}");
        let index = ((flbas & 0xf) | ((flbas >> 5) & 0x3) << 4) as usize;
        let lbaf = &idns["lbafs"][index];
        assert_eq!(num(n, "lba_size"), 1 << num(lbaf, "ds"), "{nctx}");
        assert_eq!(num(n, "metadata_size"), num(lbaf, "ms"), "{nctx}");
        // And as configured.
        assert_eq!(num(n, "lba_size"), lay.lba_size, "{nctx}");
        assert_eq!(num(n, "size_lbas"), lay.size_lbas, "{nctx}");
        assert_eq!(num(n, "size_bytes"), lay.size_lbas * lay.lba_size, "{nctx}");
    }
}

/// The SMART counters around the big write, and rnvme's last SMART log against nvme-cli's.
fn check_smart(ci: usize, steps: &Steps, lays: &[NsLayout]) {
    for lay in lays {
        let p = lay.prefix();
        let s0 = steps.ok(&format!("{p}_smart0")).json();
        let s1 = steps.ok(&format!("{p}_smart1")).json();
        let bytes = lay.bytes(&lay.big);
        let min_cmds = bytes.div_ceil(lay.mdts_bytes);
        let writes = num(&s1, "host_write_commands") - num(&s0, "host_write_commands");
        assert!(
            (min_cmds..=min_cmds + 1).contains(&writes),
            "{p}: {bytes} bytes written with MDTS {} took {writes} write commands, expected {min_cmds} (or one more)\nbefore: {s0}\nafter: {s1}",
            lay.mdts_bytes
        );
        assert_eq!(
            num(&s1, "host_read_commands"),
            num(&s0, "host_read_commands"),
            "{p}: no reads between the snapshots"
        );
        // Data units are thousands of 512-byte units, rounded up.
        let units = num(&s1, "data_units_written") - num(&s0, "data_units_written");
        let sectors = bytes / 512;
        assert!(
            (sectors / 1000..=sectors.div_ceil(1000)).contains(&units),
            "{p}: {units} data units written for {sectors} sectors\nbefore: {s0}\nafter: {s1}"
        );
    }
    // rnvme's last SMART log against nvme-cli's after the reset: counters only grow, the rest
    // is the same.
    let r = steps.ok(&format!("c{ci}_smart_end")).json();
    let k = steps.ok(&format!("c{ci}_ksmart")).json();
    let ctx = format!("controller {ci}:\nrnvme: {r}\nnvme-cli: {k}");
    for (rk, kk) in [
        ("temperature_kelvin", "temperature"),
        ("critical_warning", "critical_warning"),
        ("available_spare", "avail_spare"),
        ("available_spare_threshold", "spare_thresh"),
        ("percentage_used", "percent_used"),
        ("power_cycles", "power_cycles"),
        ("unsafe_shutdowns", "unsafe_shutdowns"),
        ("media_errors", "media_errors"),
        ("num_err_log_entries", "num_err_log_entries"),
    ] {
        assert_eq!(num(&r, rk), num(&k, kk), "{rk} vs {kk}: {ctx}");
    }
    for (rk, kk) in [
        ("host_read_commands", "host_read_commands"),
        ("host_write_commands", "host_write_commands"),
        ("data_units_read", "data_units_read"),
        ("data_units_written", "data_units_written"),
    ] {
        assert!(num(&r, rk) <= num(&k, kk), "{rk} vs {kk}: {ctx}");
    }
    assert!(num(&r, "host_write_commands") > 0, "{ctx}");
}

/// rnvme's error log against nvme-cli's (entries with a non-zero error count).
fn check_error_log(ex: &Exercise, ci: usize, steps: &Steps) {
    let r = steps.ok(&format!("c{ci}_errlog")).json();
    let entries = r
        .as_array()
        .unwrap_or_else(|| panic!("rnvme log errors --json is not an array: {r}"));
    for e in entries {
        assert_ne!(num(e, "error_count"), 0, "empty entry listed: {r}");
    }
    let k = steps.ok(&format!("c{ci}_kerrlog")).json();
    let kernel_entries = k["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("nvme error-log has no errors array: {k}"))
        .iter()
        .filter(|e| num(e, "error_count") != 0)
        .count();
    assert_eq!(
        entries.len(),
        kernel_entries,
        "error log entries: rnvme {r}\nnvme-cli {k}"
    );
    if ex.extras {
        let t = steps.ok(&format!("c{ci}_errlog_text"));
        assert_eq!(
            t.stdout.contains("no entries"),
            entries.is_empty(),
            "{}",
            t.describe()
        );
    }
}

fn check_extras(ex: &Exercise, ci: usize, steps: &Steps, lays: &[NsLayout]) {
    let spec = &ex.config.controllers[ci];
    let bdf = rnvme_tools::vm::controller_bdf(ci);
    let t = steps.ok(&format!("c{ci}_identify_text"));
    for needle in [
        format!("controller {bdf}"),
        expected_serial(ci, spec),
        format!("{} bytes", expected_mdts_bytes(spec)),
    ] {
        assert!(t.stdout.contains(&needle), "{needle:?}:\n{}", t.describe());
    }
    for lay in lays {
        let needle = format!(
            "namespace {}: {} LBAs of {} bytes",
            lay.nsid, lay.size_lbas, lay.lba_size
        );
        assert!(t.stdout.contains(&needle), "{needle:?}:\n{}", t.describe());
        if lay.failing.is_some() {
            let p = lay.prefix();
            steps
                .failed(&format!("{p}_failing_read"), 1)
                .stderr_has(&[&bdf, "Unrecovered Read Error"]);
        }
    }
    let s = steps.ok(&format!("c{ci}_smart_text"));
    assert!(
        s.stdout.contains("temperature") && s.stdout.contains(&bdf),
        "{}",
        s.describe()
    );
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
