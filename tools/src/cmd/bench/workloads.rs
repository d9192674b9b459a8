//! The workloads of the comparison, the fio job file of each (a section per engine), the
//! `rnvme perf` line beside it, and the guest script that runs them all.

use std::fmt::Write as _;

use serde::Serialize;

/// One workload, run the same way by every engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Short name: "4k-randread-qd32-t1".
    pub name: &'static str,
    /// fio --rw / rnvme perf -w.
    pub rw: &'static str,
    /// Bytes per I/O.
    pub bs: u32,
    /// I/Os in flight per thread.
    pub depth: u32,
    /// Threads (fio jobs).
    pub threads: u32,
    /// Share of reads for mixes.
    pub read_percent: Option<u8>,
    /// rnvme variants beside the default (`--other-dptr`, `--reactor`, `--reactor --callbacks`).
    #[serde(skip)]
    pub extra: &'static [&'static str],
    /// Part of the quick run.
    #[serde(skip)]
    pub quick: bool,
}

const fn w(
    name: &'static str,
    rw: &'static str,
    bs: u32,
    (depth, threads): (u32, u32),
    read_percent: Option<u8>,
    extra: &'static [&'static str],
    quick: bool,
) -> Workload {
    Workload {
        name,
        rw,
        bs,
        depth,
        threads,
        read_percent,
        extra,
        quick,
    }
}

/// The workloads of the comparison.
pub const WORKLOADS: [Workload; 8] = [
    w(
        "4k-randread-qd1-t1",
        "randread",
        4096,
        (1, 1),
        None,
        &[
            "--reactor",
            "--reactor --cpus 0",
            "--reactor --callbacks",
            BESIDE_WAKER,
        ],
        true,
    ),
    w(
        "4k-randread-qd32-t1",
        "randread",
        4096,
        (32, 1),
        None,
        &[
            "--other-dptr",
            "--reactor",
            "--reactor --cpus 0",
            "--reactor --callbacks",
            BESIDE_WAKER,
        ],
        true,
    ),
    w(
        "4k-randread-qd32-t2",
        "randread",
        4096,
        (32, 2),
        None,
        &["--reactor"],
        false,
    ),
    w(
        "4k-randwrite-qd32-t1",
        "randwrite",
        4096,
        (32, 1),
        None,
        &[],
        true,
    ),
    w(
        "128k-read-qd16-t1",
        "read",
        128 << 10,
        (16, 1),
        None,
        &["--other-dptr"],
        false,
    ),
    w(
        "128k-read-qd32-t1",
        "read",
        128 << 10,
        (32, 1),
        None,
        &["--other-dptr"],
        true,
    ),
    w(
        "4k-randrw70-qd32-t1",
        "randrw",
        4096,
        (32, 1),
        Some(70),
        &[],
        false,
    ),
    w(
        "4k-randrw70-qd32-t2",
        "randrw",
        4096,
        (32, 2),
        Some(70),
        &[],
        false,
    ),
];

/// The kernel-side engines: name in the results, and the section of the workload's job file
/// that runs it.
pub const KERNEL_ENGINES: [(&str, &str); 5] = [
    ("fio io_uring", "io_uring"),
    ("fio io_uring --hipri", "io_uring-hipri"),
    ("fio libaio", "libaio"),
    ("fio psync", "psync"),
    ("fio io_uring_cmd", "io_uring_cmd"),
];

/// rnvme through fio: the result's name and its job file section.
pub const RNVME_FIO: (&str, &str) = ("rnvme fio engine", "rnvme");

/// fio alone, with its null engine: what one of fio's I/Os costs with no device behind it,
/// the ceiling of any engine in this guest.
pub const FIO_NULL: (&str, &str) = ("fio null engine (no device)", "null");

/// Where the guest finds the fio engine.
pub const GUEST_ENGINE: &str = "/usr/local/lib/librnvme_fio.so";

/// The job file of workload `wl`: the workload in `[global]`, then one section per engine
/// (`fio FILE --section=NAME` runs one), the same file for the kernel and for rnvme. The
/// kernel's sections read `/dev/nvme0n1` (the generic char device `/dev/ng0n1` for
/// io_uring_cmd passthrough); rnvme's names the controller by the address in `RNVME_TRADDR`
/// (fio expands the variable). sqthread_poll is left out: with two CPUs its kernel thread
/// takes from the submitting one more than it saves (measured here: 6.2k IOPS with it, 8.2k
/// without, 4 KiB random reads at depth 32).
pub fn job_file(wl: &Workload, seconds: u32) -> String {
    let mix = wl
        .read_percent
        .map(|p| format!("rwmixread={p}\n"))
        .unwrap_or_default();
    let mut s = format!(
        "; {name}: the same job for every engine; run one with --section=NAME\n\
         [global]\n\
         rw={rw}\n\
         {mix}\
         bs={bs}\n\
         iodepth={depth}\n\
         numjobs={t}\n\
         thread\n\
         group_reporting\n\
         time_based\n\
         runtime={seconds}\n\
         ramp_time=1\n\
         norandommap\n\
         randrepeat=0\n\
         lat_percentiles=1\n\
         percentile_list=50:99:99.9\n\
         ; the guest's kernel clock is an emulated HPET (a VM exit per reading); rnvme perf\n\
         ; reads the TSC, and so does fio here\n\
         clocksource=cpu\n",
        name = wl.name,
        rw = wl.rw,
        bs = wl.bs,
        depth = wl.depth,
        t = wl.threads,
    );
    let kernel = "filename=/dev/nvme0n1\ndirect=1\n";
    let sections = [
        (
            "null",
            "ioengine=null\nfilename=null\nsize=1g\n".to_string(),
        ),
        ("io_uring", format!("ioengine=io_uring\n{kernel}")),
        (
            "io_uring-hipri",
            format!("ioengine=io_uring\nhipri\n{kernel}"),
        ),
        ("libaio", format!("ioengine=libaio\n{kernel}")),
        ("psync", format!("ioengine=psync\niodepth=1\n{kernel}")),
        (
            "io_uring_cmd",
            "ioengine=io_uring_cmd\ncmd_type=nvme\nfilename=/dev/ng0n1\nfixedbufs\n\
             registerfiles\nhipri\n"
                .to_string(),
        ),
        (
            "rnvme",
            format!(
                "ioengine=external:{GUEST_ENGINE}\n\
                 filename=trtype=PCIe traddr=${{RNVME_TRADDR}} ns=1\n\
                 rnvme_stats=1\n"
            ),
        ),
    ];
    for (name, body) in sections {
        let _ = write!(s, "\n[{name}]\n{body}");
    }
    s
}

/// The rnvme perf variant that runs beside a shell loop waking every 10 ms, as fio's main
/// thread does while its jobs run (fio's backend.c, `do_usleep(10000)`). On a host with no
/// core to spare for the guest's other threads (two host CPUs for two vCPUs and the emulated
/// device's threads), each such wake takes CPU from the polling thread or the device: this
/// row shows what that costs a program that has no such thread, next to the fio engine that
/// always runs with one.
pub const BESIDE_WAKER: &str = "beside a 10 ms waker";

/// The shell function the script runs [`BESIDE_WAKER`] with.
const WAKER_FN: &str = "beside_waker() { ( while :; do usleep 10000; done ) & w=$!; \"$@\"; r=$?; kill $w; wait $w 2>/dev/null; return $r; }\n";

/// The rnvme variant `flag` of workload `wl`: "--other-dptr" names the data pointer the
/// default per-command choice does not take at this size (SGLs for transfers that fit two PRP
/// entries, PRPs for larger ones).
pub(super) fn rnvme_flag<'a>(flag: &'a str, wl: &Workload) -> &'a str {
    match flag {
        "--other-dptr" if wl.bs as usize <= 2 * rnvme_driver::spec::PAGE_SIZE => "--sgl",
        "--other-dptr" => "--prp",
        other => other,
    }
}

pub(super) fn rnvme_engine_name(flag: &str, wl: &Workload) -> String {
    let f = rnvme_flag(flag, wl);
    if f.is_empty() {
        "rnvme".into()
    } else {
        format!("rnvme {f}")
    }
}

pub(super) fn fio_command(wl: &Workload, section: &str) -> String {
    format!(
        "fio /tmp/jobs/{}.fio --section={section} --output-format=json",
        wl.name
    )
}

pub(super) fn rnvme_command(wl: &Workload, flag: &str, seconds: u32) -> String {
    let mix = wl
        .read_percent
        .map(|p| format!(" -M {p}"))
        .unwrap_or_default();
    let (waker, f) = if flag == BESIDE_WAKER {
        ("beside_waker ", "")
    } else {
        ("", rnvme_flag(flag, wl))
    };
    format!(
        "{waker}rnvme perf $NVME0 -q {depth} -o {bs} -w {rw}{mix} -t {seconds} --warmup 1 --threads {t} --json --yes{sp}{f}",
        depth = wl.depth,
        bs = wl.bs,
        rw = wl.rw,
        t = wl.threads,
        sp = if f.is_empty() { "" } else { " " },
    )
}

/// Marker lines around each measurement's output.
pub(super) const BEGIN: &str = "@@BEGIN ";
pub(super) const END: &str = "@@END";

/// The guest script: fill the namespace; then, `rounds` times and for every workload, run fio
/// with every engine, bind the device to vfio-pci, run rnvme perf's variants, and give the
/// device back to the kernel driver. The kernel and rnvme figures of one workload and round
/// are minutes apart at most (slow phases of a noisy host last tens of seconds), so each
/// round's ratio compares like with like; rounds spread those phases over both sides.
pub fn script(workloads: &[Workload], seconds: u32, rounds: u32) -> String {
    let mut s = String::from(
        "echo \"@@INFO kernel $(uname -r)\"\n\
         echo \"@@INFO io_poll $(cat /sys/block/nvme0n1/queue/io_poll 2>/dev/null)\"\n\
         echo \"@@INFO cpus $(grep -c ^processor /proc/cpuinfo)\"\n\
         echo \"@@INFO clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\"\n\
         fio --name=fill --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio --rw=write --bs=1m \
         --iodepth=8 --size=100% --output-format=terse >/dev/null 2>&1 || echo \"@@INFO fill failed\"\n\
         export RNVME_TRADDR=$(echo $NVME0 | tr : .)\n\
         mkdir -p /tmp/jobs\n",
    );
    s.push_str(WAKER_FN);
    for wl in workloads {
        let _ = writeln!(
            s,
            "cat >/tmp/jobs/{}.fio <<'@@JOB'\n{}@@JOB",
            wl.name,
            job_file(wl, seconds)
        );
    }
    let run = |s: &mut String, key: &str, cmd: &str| {
        let _ = writeln!(
            s,
            "echo \"{BEGIN}{key}\"\n{cmd} 2>&1 || echo \"@@FAILED $?\"\necho \"{END}\""
        );
    };
    for round in 1..=rounds {
        for (k, wl) in workloads.iter().enumerate() {
            for (name, section) in std::iter::once(FIO_NULL).chain(KERNEL_ENGINES) {
                run(
                    &mut s,
                    &format!("{name}|{}", wl.name),
                    &fio_command(wl, section),
                );
            }
            s.push_str(
                "rnvme setup --hugepages 0 $NVME0 >/dev/null || { echo \"@@INFO rnvme setup failed\"; exit 1; }\n",
            );
            run(
                &mut s,
                &format!("{}|{}", RNVME_FIO.0, wl.name),
                &fio_command(wl, RNVME_FIO.1),
            );
            for flag in std::iter::once("").chain(wl.extra.iter().copied()) {
                run(
                    &mut s,
                    &format!("{}|{}", rnvme_engine_name(flag, wl), wl.name),
                    &rnvme_command(wl, flag, seconds),
                );
            }
            if round == rounds && k + 1 == workloads.len() {
                break;
            }
            s.push_str(
                "rnvme reset $NVME0 >/dev/null || { echo \"@@INFO rnvme reset failed\"; exit 1; }\n\
                 i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n",
            );
        }
    }
    s
}
