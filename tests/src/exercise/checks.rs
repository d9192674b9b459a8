//! Checking what the guest printed: identify, SMART, the error log and the extras, against the
//! configuration the guest was booted with.

use super::*;

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

pub(super) fn flag(v: &Value, key: &str) -> bool {
    v[key]
        .as_bool()
        .unwrap_or_else(|| panic!("`{key}` is missing or not a boolean in {v}"))
}

/// Checks `rnvme identify --json` of controller `ci` against nvme-cli and the configuration.
pub(super) fn check_identify(ex: &Exercise, ci: usize, steps: &Steps, lays: &[NsLayout]) {
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
pub(super) fn check_smart(ci: usize, steps: &Steps, lays: &[NsLayout]) {
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
pub(super) fn check_error_log(ex: &Exercise, ci: usize, steps: &Steps) {
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

pub(super) fn check_extras(ex: &Exercise, ci: usize, steps: &Steps, lays: &[NsLayout]) {
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
