//! `rnvme perf` on QEMU's emulated NVMe, in the guest: every way of driving I/O (a queue pair
//! per thread with the data pointer chosen per command, PRPs forced, SGLs forced, a reactor
//! answering over a channel, a reactor completing in a completer, two threads) writes its own
//! range with zero errors, and a `--verify` read of that range finds every block carrying the
//! stamp of its LBA. A verify over blocks nobody wrote must fail: the check can tell.

use std::time::Duration;

use rnvme_tests::{run_guest, Step};
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};

/// LBAs each mode writes and reads back: small enough that a one-second sequential write
/// wraps over it many times, so every block is written.
const RANGE: u64 = 256;

/// The modes, each with its own range (`start = index * 1024`): data pointers, reactors,
/// and each way of waiting for completions (polled, MSI-X interrupts, hybrid), directly and
/// through the async API.
const MODES: [(&str, &str); 11] = [
    ("direct", ""),
    ("prp", "--prp"),
    ("sgl", "--sgl"),
    ("reactor", "--reactor"),
    ("completer", "--reactor --callbacks"),
    ("threads", "--threads 2 --reactor"),
    ("interrupt", "--mode interrupt"),
    ("hybrid", "--mode hybrid --spin-us 20"),
    ("async", "--async"),
    ("async_interrupt", "--async --mode interrupt"),
    ("async_hybrid", "--async --mode hybrid --spin-us 20"),
];

/// Where nobody writes.
const UNWRITTEN: u64 = 16_384;

fn checked_run(step: &Step) -> serde_json::Value {
    let p = step.json();
    assert_eq!(p["errors"].as_u64(), Some(0), "{}", step.describe());
    assert_eq!(p["verify_errors"].as_u64(), Some(0), "{}", step.describe());
    assert!(p["ios"].as_u64().unwrap_or(0) > 0, "{}", step.describe());
    p
}

#[test]
fn every_mode_writes_and_reads_back_its_range() {
    let mut body = String::from("step setup rnvme setup --hugepages 0 $NVME0\n");
    for (i, (name, flags)) in MODES.iter().enumerate() {
        let start = i as u64 * 1024;
        body.push_str(&format!(
            "step w_{name} rnvme perf $NVME0 -q 16 -o 4k -w write -t 1 --range {start}:{RANGE} \
             --json --yes {flags}\n\
             step v_{name} rnvme perf $NVME0 -q 16 -o 4k -w randread -t 1 --range {start}:{RANGE} \
             --verify --json {flags}\n"
        ));
    }
    body.push_str(
        "step idle_interrupt rnvme perf $NVME0 -q 1 -o 4k -w randread -t 1 --idle \
         --mode interrupt --json\n\
         step idle_hybrid rnvme perf $NVME0 -q 1 -o 4k -w randread -t 1 --idle \
         --mode hybrid --json\n",
    );
    body.push_str(&format!(
        "step v_unwritten rnvme perf $NVME0 -q 4 -o 4k -w randread -t 1 --range {UNWRITTEN}:64 \
         --verify --json\ntrue\n"
    ));
    let config = VmConfig {
        controllers: vec![ControllerSpec {
            namespaces: vec![NamespaceSpec {
                size_mib: 128,
                lba_size: 4096,
                ..NamespaceSpec::default()
            }],
            ..ControllerSpec::default()
        }],
        timeout: Duration::from_secs(420),
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &body);
    let s = &run.steps;
    s.ok("setup");
    for (name, flags) in MODES {
        let w = checked_run(s.ok(&format!("w_{name}")));
        // Sequential writes cover the range once they number at least its length; with two
        // threads each streams its own half.
        for t in w["threads"].as_array().unwrap() {
            let n = w["threads"].as_array().unwrap().len() as u64;
            assert!(t["writes"].as_u64().unwrap() >= RANGE / n, "{name}: {w}");
        }
        let v = checked_run(s.ok(&format!("v_{name}")));
        assert_eq!(v["workload"]["verify"], true, "{v}");
        let reactor = flags.contains("--reactor");
        for p in [&w, &v] {
            assert_eq!(p["workload"]["reactor"], reactor, "{name}: {p}");
            assert_eq!(
                p["workload"]["reactor_callbacks"],
                flags.contains("--callbacks"),
                "{name}: {p}"
            );
            if reactor {
                // Every command went through the reactor.
                let c = &p["counters"];
                let requests = c["reactor"]["requests"].as_u64();
                assert!(requests > Some(0), "{name}: {p}");
                assert_eq!(requests, c["submitted"].as_u64(), "{name}: {p}");
            }
        }
        let dptr = v["namespaces"][0]["data_pointer"].as_str().unwrap_or("");
        match name {
            "prp" => assert_eq!(dptr, "PRP", "{v}"),
            "sgl" => assert_eq!(dptr, "SGL", "{v}"),
            _ => {}
        }
        if name == "threads" {
            assert_eq!(v["threads"].as_array().map(Vec::len), Some(2), "{v}");
        }
        // How it waited: the mode in the report, CPU time measured, and with interrupts the
        // device's MSI-X messages reached the process through VFIO.
        let mode = if flags.contains("interrupt") {
            "interrupt"
        } else if flags.contains("hybrid") {
            "hybrid"
        } else {
            "polled"
        };
        for p in [&w, &v] {
            assert_eq!(p["mode"], mode, "{name}: {p}");
            assert_eq!(
                p["workload"]["async_api"],
                flags.contains("--async"),
                "{name}: {p}"
            );
            assert!(p["cpu"]["busy_fraction"].as_f64() > Some(0.0), "{p}");
            assert!(p["cpu"]["per_io_us"].as_f64() > Some(0.0), "{p}");
            let interrupts = p["counters"]["interrupts"].as_u64().unwrap_or(0);
            let masks = p["counters"]["interrupt_masks"].as_u64().unwrap_or(0);
            match mode {
                "polled" => assert_eq!(interrupts + masks, 0, "{name}: {p}"),
                "interrupt" => {
                    assert!(interrupts > 0, "{name}: no interrupt taken: {p}");
                    assert_eq!(masks, 0, "{name}: interrupt mode never masks: {p}");
                }
                // Polling finds completions at depth 16: the vector was masked through VFIO
                // (and unmasked again for every sleep).
                _ => assert!(masks > 0, "{name}: the vector was never masked: {p}"),
            }
            if mode == "interrupt" && !flags.contains("--async") {
                let c = &p["counters"];
                assert!(c["wakeups"].as_u64() > Some(0), "{name}: {p}");
            }
        }
    }
    // An idle process in interrupt or hybrid mode submits nothing and sleeps on its vector.
    for step in ["idle_interrupt", "idle_hybrid"] {
        let idle = s.ok(step).json();
        assert_eq!(idle["ios"].as_u64(), Some(0), "{idle}");
        assert!(idle["counters"]["sleeps"].as_u64() > Some(0), "{idle}");
        assert!(idle["cpu"]["per_io_us"].is_null(), "{idle}");
    }
    // Zeroed blocks carry no stamp: the verify run counts every read as a mismatch, names
    // the blocks, and exits non-zero.
    let bad = s.get("v_unwritten");
    assert_eq!(bad.rc, 1, "{}", bad.describe());
    let p = bad.json();
    // (Reads that completed after the measured second count too.)
    let (mismatches, ios) = (p["verify_errors"].as_u64(), p["ios"].as_u64());
    assert!(ios > Some(0) && mismatches >= ios, "{p}");
    let first = &p["first_errors"][0];
    assert!(
        first["error"]
            .as_str()
            .unwrap_or("")
            .contains("no rnvme perf stamp"),
        "{p}"
    );
    let lba = first["lba"].as_u64().unwrap_or(0);
    assert!((UNWRITTEN..UNWRITTEN + 64).contains(&lba), "{p}");
}
