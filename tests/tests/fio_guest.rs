//! rnvme as an fio engine (`librnvme_fio.so`, built against the source of the fio installed
//! here, which the guest runs too), in one guest with two controllers: the first for rnvme,
//! two namespaces (512-byte and 4 KiB LBAs); the second left to the kernel.
//!
//! - data the kernel wrote with `verify=crc32c` is verified through the engine, and data the
//!   engine wrote is verified by the kernel once it has the controller back;
//! - the engine writes and verifies with zero errors: random sizes, PRPs, SGLs, ordinary
//!   pages, FUA; `numjobs=2` over both namespaces with fsync; mixed reads and writes; trim
//!   (the kernel reads the trimmed blocks as zeros);
//! - the SPDK plugin's filename form and the short one;
//! - bad input: an unknown address, a controller not bound to vfio-pci, a namespace that does
//!   not exist, a block size that is not a multiple of the LBA size, `thread=0`, another
//!   transport, `io_submit_mode=offload`, an iodepth no queue holds, jobs of one fio
//!   disagreeing on `rnvme_hugepages`: each one clear line and a failed fio, and the device
//!   works afterwards; the short name makes no directory.

use rnvme_tests::{fio_engine, run_guest, Step, Steps};
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};
use serde_json::Value;

const ENGINE: &str = "/usr/local/lib/librnvme_fio.so";

fn script() -> String {
    format!(
        r#"B=$(wait_blk $NVME0 1) && wait_blk $NVME0 2 >/dev/null && wait_blk $NVME1 1 >/dev/null || exit 1
E={ENGINE}
A=$(echo $NVME0 | tr : .)
A1=$(echo $NVME1 | tr : .)
J="--output-format=json --thread=1"
V="--verify=crc32c --verify_fatal=1"
# The kernel writes 8 MiB with crc32c headers; the engine verifies them.
step k_write fio --name=seq --filename=$B --ioengine=libaio --direct=1 --rw=write --bs=64k --size=8m --iodepth=8 $V --do_verify=0 --output-format=json
step setup rnvme setup --hugepages 0 $NVME0
step r_verify_kernel fio --name=seq --ioengine=external:$E $J --filename="trtype=PCIe traddr=$A ns=1" --rw=write --bs=64k --size=8m --iodepth=8 $V --verify_only=1
# The engine writes and verifies: random sizes, then each data pointer and memory kind, FUA.
step r_crc fio --name=crc --ioengine=$E $J --filename=$A/1 --offset=8m --size=8m --rw=randwrite --bsrange=4k-256k --iodepth=16 $V
step r_prp fio --name=prp --ioengine=$E $J --filename=$A/1 --offset=16m --size=2m --rw=randwrite --bs=16k --iodepth=8 $V --rnvme_dptr=prp
step r_sgl fio --name=sgl --ioengine=$E $J --filename=$A/1 --offset=18m --size=2m --rw=randwrite --bs=16k --iodepth=8 $V --rnvme_dptr=sgl
step r_small fio --name=small --ioengine=$E $J --filename=$A/1 --offset=20m --size=2m --rw=randwrite --bs=8k --iodepth=4 $V --rnvme_hugepages=0
step r_fua fio --name=fua --ioengine=$E $J --filename=$A/2 --offset=0 --size=2m --rw=write --bs=4k --iodepth=4 $V --rnvme_fua=1 --rnvme_stats=1
# Two threads, each on both namespaces, with flushes.
step r_two fio --name=two --ioengine=$E $J --numjobs=2 --filename=$A/1:$A/2 --offset=24m --offset_increment=4m --size=4m --rw=randwrite --bs=4k --iodepth=8 --fsync=16 $V
# Mixed reads and writes with percentiles, on what is there.
step r_mix fio --name=mix --ioengine=$E $J --filename=$A/1 --offset=8m --size=8m --rw=randrw --rwmixread=70 --bssplit=4k/50:64k/50 --iodepth=16 --iodepth_batch_submit=4 --iodepth_batch_complete_min=1 --iodepth_batch_complete_max=8 --norandommap --random_distribution=zipf:1.2 --io_size=16m --percentile_list=50:99
# Trim 1 MiB the engine wrote (the kernel reads it back as zeros below).
step r_trim fio --name=trim --ioengine=$E $J --filename=$A/1 --offset=16m --size=1m --rw=trim --bs=256k
# Data for the kernel to verify.
step r_for_kernel fio --name=seq2 --ioengine=$E $J --filename=$A/1 --offset=40m --size=8m --rw=write --bs=128k --iodepth=8 $V --do_verify=0
# Bad input: each one line and a failed fio, the device untouched.
step bad_bdf fio --name=b --ioengine=$E --thread=1 --filename=0000.7f.00.0/1 --rw=read --bs=4k --size=1m
step bad_vfio fio --name=b --ioengine=$E --thread=1 --filename=$A1/1 --rw=read --bs=4k --size=1m
step bad_ns fio --name=b --ioengine=$E --thread=1 --filename=$A/9 --rw=read --bs=4k --size=1m
step bad_bs fio --name=b --ioengine=$E --thread=1 --filename=$A/2 --rw=read --bs=2k --size=1m
step bad_thread fio --name=b --ioengine=$E --filename=$A/1 --rw=read --bs=4k --size=1m
step bad_trtype fio --name=b --ioengine=$E --thread=1 --filename="trtype=RDMA traddr=$A ns=1" --rw=read --bs=4k --size=1m
step bad_offload fio --name=b --ioengine=$E --thread=1 --filename=$A/1 --rw=read --bs=4k --size=1m --io_submit_mode=offload
step bad_depth fio --name=b --ioengine=$E --thread=1 --filename=$A/1 --rw=read --bs=4k --size=1m --iodepth=100000
step bad_huge fio --thread=1 --ioengine=$E --rw=read --bs=4k --size=1m --name=a --filename=$A/1 --name=b --filename=$A/2 --rnvme_hugepages=0
# The short name holds a slash: no directory is made for the part before it.
mkdir -p /tmp/d/cwd
step r_nodir sh -c "cd /tmp/d/cwd && fio --name=nodir --ioengine=$E $J --filename=$A/1 --offset=48m --size=1m --rw=read --bs=4k"
step nodir_ls ls -A /tmp/d/cwd
step r_after fio --name=after --ioengine=$E $J --filename=$A/1 --offset=48m --size=1m --rw=randwrite --bs=4k --iodepth=4 $V
step reset rnvme reset $NVME0
B=$(wait_blk $NVME0 1) || exit 1
step k_verify_rnvme fio --name=seq2 --filename=$B --ioengine=libaio --direct=1 --offset=40m --size=8m --rw=write --bs=128k --iodepth=8 $V --verify_only=1 --output-format=json
step k_trimmed kread $B 16777216 1048576 /tmp/d/trimmed
step trimmed_zero is_zero /tmp/d/trimmed 1048576
"#
    )
}

/// fio's JSON report of a step that succeeded, with every job free of errors.
fn report(s: &Steps, name: &str) -> Value {
    let step = s.ok(name);
    // fio may print lines of its own before the JSON document.
    let out = &step.stdout;
    let v: Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..]).unwrap_or_else(|e| {
        panic!(
            "{name}: fio's output is not JSON ({e}):\n{}",
            step.describe()
        )
    });
    // The engine answers fio's cache invalidation (no cache to drop) and anything else fio asks.
    assert!(
        !step.stderr.contains("failed") && !step.stdout.contains("cache invalidation"),
        "{name}: {}",
        step.describe()
    );
    let jobs = v["jobs"].as_array().expect("jobs");
    assert!(!jobs.is_empty(), "{name}: no jobs");
    for j in jobs {
        assert_eq!(j["error"], 0, "{name}: job error: {j}");
    }
    v
}

fn bytes(job: &Value, dir: &str) -> u64 {
    job[dir]["io_bytes"].as_u64().unwrap_or(0)
}

/// A write-and-verify job: everything written was read back and matched.
fn verified(s: &Steps, name: &str, written: u64) {
    let v = report(s, name);
    let (w, r): (u64, u64) = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (bytes(j, "write"), bytes(j, "read")))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(w, written, "{name}: bytes written");
    assert_eq!(r, written, "{name}: bytes verified");
}

fn refused(s: &Steps, name: &str, line: &str) -> String {
    let step: &Step = s.get(name);
    assert_ne!(step.rc, 0, "{name}: fio succeeded:\n{}", step.describe());
    let all = format!("{}{}", step.stdout, step.stderr);
    let hit: Vec<&str> = all.lines().filter(|l| l.starts_with("rnvme: ")).collect();
    assert_eq!(
        hit.len(),
        1,
        "{name}: one rnvme line expected:\n{}",
        step.describe()
    );
    assert!(hit[0].contains(line), "{name}: {:?} lacks {line:?}", hit[0]);
    assert!(!all.contains("panicked"), "{name}: {}", step.describe());
    hit[0].to_string()
}

#[test]
fn fio_jobs_run_on_rnvme_through_the_engine() {
    let config = VmConfig {
        controllers: vec![
            ControllerSpec {
                namespaces: vec![
                    NamespaceSpec {
                        size_mib: 64,
                        lba_size: 512,
                        ..NamespaceSpec::default()
                    },
                    NamespaceSpec {
                        size_mib: 32,
                        lba_size: 4096,
                        ..NamespaceSpec::default()
                    },
                ],
                ..ControllerSpec::default()
            },
            ControllerSpec::default(),
        ],
        host_binaries: vec!["fio".into()],
        files: vec![(fio_engine(), ENGINE.into())],
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &script());
    let s = &run.steps;
    report(s, "k_write");
    // The kernel's data, verified through the engine (the SPDK plugin's filename form).
    let v = report(s, "r_verify_kernel");
    assert_eq!(
        bytes(&v["jobs"][0], "read"),
        8 << 20,
        "kernel data verified"
    );
    verified(s, "r_crc", 8 << 20);
    for name in ["r_prp", "r_sgl", "r_small"] {
        verified(s, name, 2 << 20);
    }
    verified(s, "r_fua", 2 << 20);
    // rnvme_stats=1: one line at the job's end on where its time went, on stderr (fio's JSON
    // on stdout stays whole): 512 writes of 4 KiB and the 512 reads that verify them.
    let fua = s.ok("r_fua");
    let stats: Vec<&str> = fua
        .stderr
        .lines()
        .filter(|l| l.starts_with("rnvme: fua: "))
        .collect();
    assert_eq!(stats.len(), 1, "{}", fua.describe());
    assert!(
        stats[0].starts_with("rnvme: fua: 1024 io_us; per io_u: ")
            && stats[0].contains(" us reaping (waiting for the device), ")
            && stats[0].contains(" reaps waited; "),
        "{}",
        stats[0]
    );
    // Two jobs of 4 MiB over two namespaces each, with fsync every 16 writes.
    let v = report(s, "r_two");
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "numjobs=2 reports two jobs");
    for j in jobs {
        assert_eq!(bytes(j, "write"), 4 << 20, "{j}");
        assert_eq!(bytes(j, "read"), 4 << 20, "{j}");
        assert!(
            j["sync"]["total_ios"].as_u64().unwrap_or(0) > 0,
            "flushes: {j}"
        );
    }
    let v = report(s, "r_mix");
    let j = &v["jobs"][0];
    let (r, w) = (bytes(j, "read"), bytes(j, "write"));
    // io_size is reached with the last io_us in flight: at most iodepth blocks beyond it.
    assert!(
        (16 << 20..=(16 << 20) + 16 * (64 << 10)).contains(&(r + w)),
        "io_size: {r} + {w}"
    );
    assert!(r > w, "rwmixread=70: {r} read, {w} written");
    assert!(
        j["read"]["clat_ns"]["percentile"]["99.000000"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{j}"
    );
    let v = report(s, "r_trim");
    assert_eq!(bytes(&v["jobs"][0], "trim"), 1 << 20, "trimmed");
    report(s, "r_for_kernel");
    refused(s, "bad_bdf", "no PCI device 0000:7f:00.0");
    refused(s, "bad_vfio", "is bound to nvme: bind it with `rnvme setup");
    refused(s, "bad_ns", "no such active namespace");
    refused(
        s,
        "bad_bs",
        "block size 2048 is not a multiple of the namespace's 4096-byte LBA",
    );
    refused(s, "bad_thread", "set thread=1");
    refused(s, "bad_trtype", "only trtype=PCIe");
    refused(s, "bad_offload", "io_submit_mode=offload is not supported");
    refused(s, "bad_depth", "iodepth 100000 is outside 1 to 65535");
    refused(
        s,
        "bad_huge",
        "is already open with rnvme_hugepages=1 by an earlier job of this fio process",
    );
    report(s, "r_nodir");
    assert_eq!(
        s.ok("nodir_ls").stdout.trim(),
        "",
        "nothing made in the working directory"
    );
    verified(s, "r_after", 1 << 20);
    s.ok("reset");
    let v = report(s, "k_verify_rnvme");
    assert_eq!(
        bytes(&v["jobs"][0], "read"),
        8 << 20,
        "rnvme's data verified by the kernel"
    );
    s.ok("k_trimmed");
    s.ok("trimmed_zero");
}
