//! rnvme speaking the ecosystem's language, in one guest with two emulated controllers:
//!
//! - nvme-cli's JSON on the kernel side of a controller (`id-ctrl`, `id-ns`, `smart-log`,
//!   `error-log`, `list`) against rnvme's `-o json` of the same controller once it is bound to
//!   vfio-pci, key by key;
//! - `rnvme status` before and after `rnvme setup` (per-node hugepages, `PCI_BLOCKED`, a
//!   controller held as swap, `HUGEMEM`), and `rnvme reset` without addresses;
//! - `rnvme perf` invoked as SPDK perf is (`-r`, no namespace at all, `-c`, `-P`, `-a`, `-LL`,
//!   `-Q`, `-F`, `--spdk-format`), and a mixed workload whose read and write figures add up
//!   to its totals;
//! - `rnvme read`/`write` with nvme-cli's `-s`, `-c` (zero-based) and `-z`, read back by
//!   `nvme read` with the same spelling once the kernel has the controller again.

use std::time::Duration;

use rnvme_tests::{run_guest, Step, Steps};
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};
use serde_json::Value;

/// The LBAs rnvme writes with nvme-cli's spelling (16 LBAs of 512 bytes from LBA 100).
const START: u64 = 100;
const BYTES: u64 = 16 * 512;

fn ns(size_mib: u64, lba_size: u32) -> NamespaceSpec {
    NamespaceSpec {
        size_mib,
        lba_size,
        ..NamespaceSpec::default()
    }
}

fn script() -> String {
    format!(
        r#"B0=$(wait_blk $NVME0 1) && B1=$(wait_blk $NVME1 1) && S1=$(wait_blk $NVME1 2) || exit 1
C0=$(ctrl_of $NVME0)
echo "$B0" >/tmp/d/b0
step k_blk0 cat /tmp/d/b0
step k_id_ctrl nvme id-ctrl /dev/$C0 -o json
step k_id_ns nvme id-ns /dev/$C0 -n 1 -o json
step k_smart nvme smart-log /dev/$C0 -o json
step k_errors nvme error-log /dev/$C0 -o json
step k_list nvme list -o json
# The second controller's second namespace becomes swap: in use.
step mkswap mkswap $S1
step swapon swapon $S1
step status_before rnvme status --json
step status_before_text rnvme status
# Nothing to take: the first controller is blocked, the second in use.
step setup_none env PCI_BLOCKED="$NVME0" rnvme setup --hugepages 300 --node 0
# No address: every free controller that is not blocked; 300 hugepages on node 0.
step setup_free env PCI_BLOCKED="$NVME1" rnvme setup --hugepages 300 --node 0
step status_after rnvme status --json
step r_id_ctrl rnvme identify $NVME0 -o json
step r_id_ns rnvme identify $NVME0 --ns 1 -o json
step r_smart rnvme log $NVME0 smart -o json
step r_errors rnvme log $NVME0 errors -o json
step r_list rnvme list -o json
step r_ns_bad rnvme identify $NVME0 --ns 9 -o json
# nvme-cli's spelling of reads and writes: -c is zero-based.
rnd /tmp/d/w {BYTES}
step w_cli rnvme write $NVME0 -n 1 -s {START} -c 15 -z {BYTES} -d /tmp/d/w
step r_cli rnvme read $NVME0 -n 1 -s {START} -c 15 -d /tmp/d/r
step r_z rnvme read $NVME0 --ns 1 --start-block {START} --data-size {BYTES} --out /tmp/d/rz
step same_c same /tmp/d/w /tmp/d/r
step same_z same /tmp/d/w /tmp/d/rz
step r_disagree rnvme read $NVME0 -s {START} -c 15 -z 4096 -d /tmp/d/x
# The swap goes; without addresses setup now takes the second controller, HUGEMEM in MiB.
step swapoff swapoff $S1
step setup_hugemem env HUGEMEM=700 rnvme setup
step status_all rnvme status --json
# SPDK perf's spellings.
step p_r rnvme perf -r "trtype:PCIe traddr:$NVME0 ns:1" -q 8 -o 4096 -w randread -t 1 --json
step p_r_all rnvme perf -r "trtype:PCIe traddr:$NVME1" -q 4 -o 4096 -w randread -t 1 --json
step p_none rnvme perf -q 4 -o 4096 -w randread -t 1 --json
step p_none_write rnvme perf -q 4 -o 4096 -w randwrite -t 1
step setup_named_blocked env PCI_BLOCKED="$NVME0" rnvme setup $NVME0 --hugepages 0
step reset_named_blocked env PCI_BLOCKED="$NVME0" rnvme reset $NVME0
step p_spdk rnvme perf -r "trtype:PCIe traddr:$NVME0 ns:1" -q 8 -o 4096 -w randread -t 1 -c 0x3 -P 2 -a 0.5 -LL -Q 1 -F 1.2 --spdk-format
step p_spdk_json rnvme perf -r "trtype:PCIe traddr:$NVME0 ns:1" -q 8 -o 4096 -w randread -t 1 -c 0x3 -P 2 -a 0.5 -L -Q 1 -F 1.2 --json
# A mixed workload, away from the LBAs written above.
step p_mix rnvme perf $NVME0 -q 16 -o 4k -w randrw -M 70 -t 2 --range 8192:8192 --json --yes
step p_mix_table rnvme perf $NVME0 -q 16 -o 4k -w rw -t 1 --range 8192:8192 --yes -L
# Without addresses reset gives back what setup bound.
step reset_all rnvme reset
step status_reset rnvme status --json
K0=$(wait_blk $NVME0 1) || exit 1
step k_read nvme read $K0 -s {START} -c 15 -z {BYTES} -d /tmp/d/k
step same_k same /tmp/d/w /tmp/d/k
step reset_none rnvme reset
true
"#
    )
}

/// The controller `bdf` in a `rnvme status --json`.
fn controller<'a>(status: &'a Value, bdf: &str) -> &'a Value {
    status["controllers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["bdf"] == bdf))
        .unwrap_or_else(|| panic!("{bdf} is not in {status}"))
}

/// Reserved 2 MiB hugepages on node 0.
fn node0_2m(status: &Value) -> u64 {
    status["hugepages"]
        .as_array()
        .and_then(|h| {
            h.iter()
                .find(|p| p["node"] == 0 && p["size_kib"] == 2048)
                .and_then(|p| p["total"].as_u64())
        })
        .unwrap_or_else(|| panic!("no 2 MiB pool on node 0 in {status}"))
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// The same keys in the same order, and the same values but for `differ`, whose values
/// `check` is given instead.
fn same_but(
    what: &str,
    kernel: &Value,
    rnvme: &Value,
    differ: &[&str],
    check: &dyn Fn(&str, &Value, &Value),
) {
    assert_eq!(keys(kernel), keys(rnvme), "{what}: keys differ");
    for k in keys(kernel) {
        if differ.contains(&k) {
            check(k, &kernel[k], &rnvme[k]);
        } else {
            assert_eq!(kernel[k], rnvme[k], "{what}: {k} differs");
        }
    }
}

fn check_json_against_nvme_cli(s: &Steps) {
    // Identify Controller and Namespace: the same device's data, every field equal (the
    // kernel changes nothing in them).
    let (k, r) = (s.ok("k_id_ctrl").json(), s.ok("r_id_ctrl").json());
    same_but("id-ctrl", &k, &r, &[], &|_, _, _| {});
    assert!(k["sn"].as_str().unwrap_or("").starts_with("rnvme0"), "{k}");
    for key in [
        "vid", "ssvid", "sn", "mn", "fr", "mdts", "cntlid", "ver", "oncs", "sgls", "psds",
    ] {
        assert!(k.get(key).is_some(), "nvme-cli printed no {key}: {k}");
    }
    let (k, r) = (s.ok("k_id_ns").json(), s.ok("r_id_ns").json());
    same_but("id-ns", &k, &r, &[], &|_, _, _| {});
    assert_eq!(k["nsze"], 131072, "{k}");
    assert_eq!(
        k["lbafs"][k["flbas"].as_u64().unwrap_or(0) as usize & 0xf]["ds"],
        9
    );

    // SMART: the static fields equal; the temperature may move between the two reads; the
    // counters only grow (rnvme reads after the kernel, and I/O went on in between).
    let (k, r) = (s.ok("k_smart").json(), s.ok("r_smart").json());
    let counters = [
        "data_units_read",
        "data_units_written",
        "host_read_commands",
        "host_write_commands",
        "controller_busy_time",
        "power_cycles",
        "power_on_hours",
        "unsafe_shutdowns",
    ];
    let mut differ: Vec<&str> = counters.to_vec();
    differ.push("temperature");
    same_but("smart-log", &k, &r, &differ, &|key, kv, rv| {
        if key == "temperature" {
            let (a, b) = (kv.as_u64().unwrap(), rv.as_u64().unwrap());
            assert!(
                (250..400).contains(&a) && (250..400).contains(&b),
                "temperature {a} {b}"
            );
            return;
        }
        // 128-bit counters are decimal strings in nvme-cli.
        let n = |v: &Value| -> u128 {
            v.as_str()
                .unwrap_or_else(|| panic!("{key}: {v} is not a string"))
                .parse()
                .unwrap()
        };
        assert!(n(rv) >= n(kv), "{key}: rnvme {rv} < kernel {kv}");
    });
    assert!(
        r["host_read_commands"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0,
        "{r}"
    );

    // The error log: every entry the controller keeps, the same (empty) ones.
    let (k, r) = (s.ok("k_errors").json(), s.ok("r_errors").json());
    assert_eq!(k, r);
    assert!(!k["errors"].as_array().unwrap().is_empty(), "{k}");
    same_but(
        "error-log entry",
        &k["errors"][0],
        &r["errors"][0],
        &[],
        &|_, _, _| {},
    );

    // list: nvme-cli lists the kernel's namespaces, rnvme those it can reach (the first
    // controller's); the same keys and values but DevicePath: where each tool reaches it.
    let b0 = s.ok("k_blk0").text().to_string();
    let (k, r) = (s.ok("k_list").json(), s.ok("r_list").json());
    assert_eq!(keys(&k), ["Devices"]);
    assert_eq!(keys(&r), ["Devices"]);
    assert_eq!(k["Devices"].as_array().unwrap().len(), 3, "{k}");
    let rd = r["Devices"].as_array().unwrap();
    assert_eq!(rd.len(), 1, "{r}");
    let kd = k["Devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["DevicePath"] == b0.as_str())
        .unwrap_or_else(|| panic!("{b0} is not in {k}"));
    same_but("list", kd, &rd[0], &["DevicePath"], &|_, _, rv| {
        assert_eq!(rv, "0000:00:04.0/1");
    });
}

fn check_status_and_setup(s: &Steps) {
    let before = s.ok("status_before").json();
    let a = controller(&before, "0000:00:04.0");
    assert_eq!(a["driver"], "nvme", "{a}");
    assert_eq!(a["vendor"], "1b36");
    assert_eq!(a["device"], "0010");
    assert_eq!(a["usable"], false);
    assert!(
        a["kernel_name"].as_str().unwrap_or("").starts_with("nvme"),
        "{a}"
    );
    assert_eq!(
        a["block_devices"][0]["name"],
        s.ok("k_blk0").text().trim_start_matches("/dev/")
    );
    assert!(a["iommu_group"].is_u64(), "{a}");
    // The guest has one NUMA node, and the device no node of its own (numa_node -1).
    assert_eq!(a["numa_node"], Value::Null);
    let b = controller(&before, "0000:00:05.0");
    let swap: Vec<&Value> = b["block_devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["swap"] == true)
        .collect();
    assert_eq!(swap.len(), 1, "{b}");
    assert_eq!(node0_2m(&before), 256, "{before}");
    assert!(before["memlock"]["privileged"] == true, "{before}");
    let text = s.ok("status_before_text");
    assert!(
        text.stdout.contains("Hugepages (free / total)"),
        "{}",
        text.describe()
    );
    assert!(text.stdout.contains("(swap)"), "{}", text.describe());

    let none = s.failed("setup_none", 1);
    none.clean_error();
    assert!(
        none.stdout
            .contains("0000:00:04.0: skipped, listed in PCI_BLOCKED"),
        "{}",
        none.describe()
    );
    assert!(
        none.stdout.contains("0000:00:05.0: skipped, in use:")
            && none.stdout.contains("is used as swap"),
        "{}",
        none.describe()
    );
    let free = s.ok("setup_free");
    assert!(
        free.stdout.contains("0000:00:04.0: nvme -> vfio-pci"),
        "{}",
        free.describe()
    );
    assert!(
        free.stdout
            .contains("0000:00:05.0: skipped, listed in PCI_BLOCKED"),
        "{}",
        free.describe()
    );
    assert!(
        free.stdout.contains("hugepages on node 0: 300 reserved"),
        "{}",
        free.describe()
    );

    let after = s.ok("status_after").json();
    let a = controller(&after, "0000:00:04.0");
    assert_eq!(
        (&a["driver"], &a["usable"]),
        (&"vfio-pci".into(), &true.into()),
        "{a}"
    );
    assert!(a["block_devices"].as_array().unwrap().is_empty(), "{a}");
    assert_eq!(a["kernel_name"], Value::Null);
    assert_eq!(controller(&after, "0000:00:05.0")["driver"], "nvme");
    assert_eq!(node0_2m(&after), 300, "{after}");

    let h = s.ok("setup_hugemem");
    assert!(
        h.stdout.contains("0000:00:05.0: nvme -> vfio-pci"),
        "{}",
        h.describe()
    );
    assert!(
        h.stdout.contains("0000:00:04.0: already bound to vfio-pci"),
        "{}",
        h.describe()
    );
    // HUGEMEM=700 MiB is 350 pages of 2 MiB, in all (one node here).
    assert!(
        h.stdout.contains("hugepages: 350 reserved (700 MiB)"),
        "{}",
        h.describe()
    );
    let all = s.ok("status_all").json();
    assert_eq!(node0_2m(&all), 350, "{all}");
    assert_eq!(controller(&all, "0000:00:05.0")["usable"], true);

    let reset = s.ok("reset_all");
    for bdf in ["0000:00:04.0", "0000:00:05.0"] {
        assert!(
            reset.stdout.contains(&format!("{bdf}: vfio-pci -> nvme")),
            "{}",
            reset.describe()
        );
    }
    let back = s.ok("status_reset").json();
    for bdf in ["0000:00:04.0", "0000:00:05.0"] {
        assert_eq!(controller(&back, bdf)["driver"], "nvme", "{back}");
    }
    let none = s.ok("reset_none");
    assert!(
        none.stdout.contains("no controller to give back"),
        "{}",
        none.describe()
    );
}

fn clean(step: &Step) -> Value {
    let p = step.json();
    assert_eq!(p["errors"], 0, "{}", step.describe());
    assert!(p["ios"].as_u64() > Some(0), "{}", step.describe());
    p
}

fn targets(p: &Value) -> Vec<&str> {
    p["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["target"].as_str().unwrap())
        .collect()
}

/// Reads and writes apart add up to what the summary `m` says of both.
fn adds_up(what: &str, m: &Value) {
    let f = |v: &Value| {
        v.as_f64()
            .unwrap_or_else(|| panic!("{what}: {v} is not a number"))
    };
    let (r, w) = (&m["read"], &m["write"]);
    assert_eq!(
        r["total_ios"].as_u64().unwrap() + w["total_ios"].as_u64().unwrap(),
        m["ios"].as_u64().unwrap(),
        "{what}: {m}"
    );
    assert_eq!(r["total_ios"], m["reads"], "{what}");
    assert_eq!(w["total_ios"], m["writes"], "{what}");
    let iops = f(&r["iops"]) + f(&w["iops"]);
    assert!(
        (iops - f(&m["iops"])).abs() <= 1e-6 * f(&m["iops"]),
        "{what}: {iops} {m}"
    );
    let mib = (f(&r["bw_bytes"]) + f(&w["bw_bytes"])) / (1 << 20) as f64;
    assert!(
        (mib - f(&m["mib_s"])).abs() <= 1e-6 * f(&m["mib_s"]),
        "{what}: {mib} {m}"
    );
    let n = |v: &Value| v["lat_ns"]["N"].as_u64().unwrap();
    let mean = (f(&r["lat_ns"]["mean"]) * n(r) as f64 + f(&w["lat_ns"]["mean"]) * n(w) as f64)
        / (n(r) + n(w)) as f64;
    let avg = f(&m["lat_us"]["avg"]) * 1000.0;
    assert!(
        (mean - avg).abs() <= 1e-6 * avg,
        "{what}: mean {mean} ns, avg {avg} ns"
    );
    let min = r["lat_ns"]["min"]
        .as_u64()
        .unwrap()
        .min(w["lat_ns"]["min"].as_u64().unwrap());
    assert_eq!(min as f64 / 1000.0, f(&m["lat_us"]["min"]), "{what}");
    for d in [r, w] {
        for k in ["iops", "bw_bytes", "io_bytes", "runtime", "total_ios"] {
            assert!(d.get(k).is_some(), "{what}: no {k} in {d}");
        }
        for k in ["min", "max", "mean", "stddev", "percentile"] {
            assert!(d["lat_ns"].get(k).is_some(), "{what}: no lat_ns.{k} in {d}");
        }
        assert!(
            d["lat_ns"]["percentile"]["99.000000"].is_u64(),
            "{what}: {d}"
        );
    }
}

/// The numbers of an SPDK table row (`...: IOPS MiB/s Average min max`).
fn row_numbers(line: &str) -> Vec<f64> {
    line.rsplit(':')
        .next()
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap_or_else(|_| panic!("{line:?}")))
        .collect()
}

fn check_perf(s: &Steps) {
    assert_eq!(targets(&clean(s.ok("p_r"))), ["0000:00:04.0/1"]);
    // -r without ns: every namespace of the controller.
    assert_eq!(
        targets(&clean(s.ok("p_r_all"))),
        ["0000:00:05.0/1", "0000:00:05.0/2"]
    );
    // Nothing named: every controller on vfio-pci, every namespace; to read, not to write
    // unless told.
    assert_eq!(
        targets(&clean(s.ok("p_none"))),
        ["0000:00:04.0/1", "0000:00:05.0/1", "0000:00:05.0/2"]
    );
    s.failed("p_none_write", 2)
        .clean_error()
        .stderr_has(&["(0000:00:04.0, 0000:00:05.0): name the namespaces, or add --yes"]);
    // Every controller named is blocked: nothing to do is a failure, not a success.
    s.failed("setup_named_blocked", 1)
        .clean_error()
        .stderr_has(&["every one named is left out by PCI_ALLOWED / PCI_BLOCKED"]);
    s.failed("reset_named_blocked", 1)
        .clean_error()
        .stderr_has(&["every one named is left out by PCI_ALLOWED / PCI_BLOCKED"]);

    let t = s.ok("p_spdk");
    let out = &t.stdout;
    assert!(
        out.starts_with("========================================================\n"),
        "{}",
        t.describe()
    );
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.contains(" from core ") && !l.starts_with("Summary") && !l.starts_with("Latency")
        })
        .collect();
    assert_eq!(rows.len(), 2, "{}", t.describe());
    assert!(
        rows[0].starts_with("PCIE (0000:00:04.0) [1b36:0010] NSID 1 from core  0:"),
        "{}",
        t.describe()
    );
    assert!(
        rows[1].starts_with("PCIE (0000:00:04.0) [1b36:0010] NSID 1 from core  1:"),
        "{}",
        t.describe()
    );
    let total = out
        .lines()
        .find(|l| l.starts_with("Total "))
        .unwrap_or_else(|| panic!("{}", t.describe()));
    let (a, b, tot) = (
        row_numbers(rows[0]),
        row_numbers(rows[1]),
        row_numbers(total),
    );
    assert!((a[0] + b[0] - tot[0]).abs() < 0.02, "{}", t.describe());
    assert_eq!(tot[3], a[3].min(b[3]));
    assert_eq!(tot[4], a[4].max(b[4]));
    assert_eq!(
        out.matches("Summary latency data for PCIE (0000:00:04.0)")
            .count(),
        2,
        "{}",
        t.describe()
    );
    assert_eq!(
        out.matches("Latency histogram for PCIE (0000:00:04.0)")
            .count(),
        2,
        "{}",
        t.describe()
    );
    assert!(out.contains(" 99.00000% : "), "{}", t.describe());
    assert!(
        out.contains("       Range in us     Cumulative    IO count\n"),
        "{}",
        t.describe()
    );

    let p = clean(s.ok("p_spdk_json"));
    let w = &p["workload"];
    assert_eq!(w["threads"], 2, "{w}");
    assert_eq!(w["cpus"], "0-1", "{w}");
    assert_eq!(w["queues_per_thread"], 2, "{w}");
    assert_eq!(w["warmup_s"], 0.5, "{w}");
    assert_eq!(w["zipf"], 1.2, "{w}");
    assert!(p["percentiles_us"]["99"].is_f64(), "{p}");
    assert_eq!(p["threads"].as_array().unwrap().len(), 2);

    let p = clean(s.ok("p_mix"));
    adds_up("total", &p);
    for (i, t) in p["threads"].as_array().unwrap().iter().enumerate() {
        adds_up(&format!("thread {i}"), t);
    }
    adds_up("namespace", &p["namespaces"][0]);
    let share = p["reads"].as_f64().unwrap() / p["ios"].as_f64().unwrap();
    assert!((share - 0.7).abs() < 0.1, "read share {share}: {p}");
    assert!(
        p["read"]["total_ios"].as_u64() > Some(0) && p["write"]["total_ios"].as_u64() > Some(0)
    );

    let t = s.ok("p_mix_table");
    let line = |prefix: &str| -> Vec<f64> {
        let l = t
            .stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {}", t.describe()));
        l.split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    assert!(
        t.stdout.contains("reads and writes apart:"),
        "{}",
        t.describe()
    );
    // IOPS and MiB/s of the read and write rows add up to the total row's.
    let (r, w, tot) = (line("read "), line("write "), line("total "));
    assert!((r[0] + w[0] - tot[0]).abs() <= 0.15, "{}", t.describe());
    assert!((r[1] + w[1] - tot[1]).abs() <= 0.015, "{}", t.describe());
    assert!(
        t.stdout.contains("total reads") && t.stdout.contains("total writes"),
        "{}",
        t.describe()
    );
}

fn check_read_write(s: &Steps) {
    for step in [
        "w_cli", "r_cli", "r_z", "same_c", "same_z", "k_read", "same_k",
    ] {
        s.ok(step);
    }
    s.ok("w_cli")
        .stderr_has(&["wrote 16 LBAs (8192 bytes) at LBA 100"]);
    let bad = s.failed("r_disagree", 2);
    bad.clean_error();
    bad.stderr_has(&["--data-size 4096 is 8 LBAs of 512 bytes, but the count asks for 16"]);
    let bad = s.failed("r_ns_bad", 2);
    bad.clean_error();
}

#[test]
fn nvme_cli_json_spdk_perf_spellings_and_setup_status() {
    let config = VmConfig {
        controllers: vec![
            ControllerSpec {
                namespaces: vec![ns(64, 512)],
                ..ControllerSpec::default()
            },
            ControllerSpec {
                namespaces: vec![ns(32, 4096), ns(16, 4096)],
                ..ControllerSpec::default()
            },
        ],
        timeout: Duration::from_secs(600),
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &script());
    let s = &run.steps;
    for step in [
        "k_id_ctrl",
        "k_id_ns",
        "k_smart",
        "k_errors",
        "k_list",
        "mkswap",
        "swapon",
        "swapoff",
    ] {
        s.ok(step);
    }
    check_json_against_nvme_cli(s);
    check_status_and_setup(s);
    check_read_write(s);
    check_perf(s);
}
