//! The guest script of an exercise: the kernel's phase, rnvme's phase per controller, the phase
//! after a reset, and the shell helpers they share.

use super::*;

/// A script and the names of the steps it runs.
#[derive(Default)]
pub(super) struct Script {
    pub(super) text: String,
    pub(super) names: Vec<String>,
    /// Steps expected to fail, with their exit status.
    pub(super) failures: Vec<(String, i32)>,
}

impl Script {
    pub(super) fn line(&mut self, l: &str) {
        self.text.push_str(l);
        self.text.push('\n');
    }

    pub(super) fn step(&mut self, name: &str, cmd: &str) {
        self.names.push(name.to_string());
        let _ = writeln!(self.text, "step {name} {cmd}");
    }

    pub(super) fn failing_step(&mut self, name: &str, code: i32, cmd: &str) {
        self.failures.push((name.to_string(), code));
        self.step(name, cmd);
    }
}

/// Shell helpers specific to the exercise.
pub(super) const HELPERS: &str = r#"
# wr_stdin FILE ARGS...: rnvme ARGS with FILE on standard input
wr_stdin() { _wf=$1; shift; rnvme "$@" <"$_wf"; }
# rd_stdout FILE ARGS...: rnvme ARGS with standard output to FILE
rd_stdout() { _rf=$1; shift; rnvme "$@" >"$_rf"; }
"#;

pub(super) fn bdf_var(ctrl: usize) -> String {
    format!("$NVME{ctrl}")
}

pub(super) fn file(p: &str, r: &str) -> String {
    format!("/tmp/d/{p}_{r}")
}

pub(super) fn rnvme_read(
    s: &mut Script,
    name: &str,
    lay: &NsLayout,
    r: &Region,
    out: &str,
    extra: &str,
) {
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
pub(super) fn rnvme_write_region(
    s: &mut Script,
    lay: &NsLayout,
    r: &Region,
    fua: bool,
    stdin: bool,
) {
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

pub(super) fn rnvme_read_back(
    s: &mut Script,
    lay: &NsLayout,
    r: &Region,
    expect: &str,
    stdout: bool,
) {
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

pub(super) fn kernel_phase(s: &mut Script, ex: &Exercise, lays: &[Vec<NsLayout>]) {
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
pub(super) fn rnvme_phase(ex: &Exercise, ci: usize, lays: &[NsLayout]) -> Script {
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

pub(super) fn after_reset_phase(s: &mut Script, lays: &[Vec<NsLayout>]) {
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
pub(super) fn build_script(ex: &Exercise, lays: &[Vec<NsLayout>]) -> Script {
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
