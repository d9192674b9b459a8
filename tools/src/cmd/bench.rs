//! `rnvme bench compare`: the kernel's NVMe driver and rnvme side by side, with the same
//! fio job files, in one boot of one QEMU guest.
//!
//! The guest gets one emulated controller with a 1 GiB namespace of 4 KiB LBAs and boots with
//! `nvme.poll_queues=2`, so that fio's `hipri` polls. The namespace is filled once; every
//! workload is one fio job file ([`job_file`]) with a section per engine: the kernel through
//! io_uring, io_uring with `hipri`, libaio, psync and io_uring_cmd passthrough on the generic
//! char device; then the controller moves to vfio-pci (`rnvme setup`) and the same file runs
//! on rnvme through its fio engine (`librnvme_fio.so`), and `rnvme perf` runs the workload
//! beside it (the engine's own cost). Each measurement prints its JSON between markers on the
//! script's output; the host parses them and prints one table, and writes the same as JSON.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rnvme_tools::vm::{self, ControllerSpec, DriveAio, NamespaceSpec, VmConfig};
use serde::Serialize;
use serde_json::Value;

use super::{allow_closed_stdout, out, UsageError};

/// `rnvme bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot one guest; run the same fio job files on the kernel driver (io_uring, io_uring
    /// --hipri, libaio, psync, io_uring_cmd passthrough) and on rnvme (its fio engine), and
    /// rnvme perf beside them, on the same emulated device; print the table and the ratios
    Compare(CompareArgs),
}

/// `rnvme bench compare`
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Also write the results as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Fewer workloads and 2 s per measurement (about 2 minutes instead of 7)
    #[arg(long)]
    pub quick: bool,
    /// Seconds per measurement (after a 1 s warm-up); default 5, 2 with --quick
    #[arg(long, value_name = "S")]
    pub seconds: Option<u32>,
    /// Rounds of every measurement, the device going back and forth between the kernel and
    /// rnvme; the table shows each one's median. Default 3, 1 with --quick
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=9))]
    pub rounds: Option<u32>,
    /// Print the guest's output and console as well
    #[arg(long, short)]
    pub verbose: bool,
    /// The emulated device's back end, one guest boot and table each: threads (an image
    /// through QEMU's default thread pool), io_uring (an image through io_uring) or null
    /// (QEMU's null-co: no storage, so what remains is the drivers' and the emulated
    /// controller's cost). Repeatable; default all three
    #[arg(long, value_enum)]
    pub backend: Vec<DeviceBackend>,
}

/// The emulated device's back end in a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DeviceBackend {
    /// An image file through QEMU's default `aio=threads`.
    Threads,
    /// An image file through `aio=io_uring`.
    IoUring,
    /// QEMU's `null-co` block driver.
    Null,
}

impl DeviceBackend {
    /// All of them, in the order they run.
    pub const ALL: [DeviceBackend; 3] = [
        DeviceBackend::Threads,
        DeviceBackend::IoUring,
        DeviceBackend::Null,
    ];

    fn describe(self) -> &'static str {
        match self {
            DeviceBackend::Threads => "a 1 GiB image through QEMU's default aio=threads",
            DeviceBackend::IoUring => "a 1 GiB image through aio=io_uring",
            DeviceBackend::Null => "QEMU's null-co back end (no storage)",
        }
    }
}

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
        &["--reactor", "--reactor --cpus 0", "--reactor --callbacks"],
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
                 filename=trtype=PCIe traddr=${{RNVME_TRADDR}} ns=1\n"
            ),
        ),
    ];
    for (name, body) in sections {
        let _ = write!(s, "\n[{name}]\n{body}");
    }
    s
}

/// The rnvme variant `flag` of workload `wl`: "--other-dptr" names the data pointer the
/// default per-command choice does not take at this size (SGLs for transfers that fit two PRP
/// entries, PRPs for larger ones).
fn rnvme_flag<'a>(flag: &'a str, wl: &Workload) -> &'a str {
    match flag {
        "--other-dptr" if wl.bs as usize <= 2 * rnvme_driver::spec::PAGE_SIZE => "--sgl",
        "--other-dptr" => "--prp",
        other => other,
    }
}

fn rnvme_engine_name(flag: &str, wl: &Workload) -> String {
    let f = rnvme_flag(flag, wl);
    if f.is_empty() {
        "rnvme".into()
    } else {
        format!("rnvme {f}")
    }
}

fn fio_command(wl: &Workload, section: &str) -> String {
    format!(
        "fio /tmp/jobs/{}.fio --section={section} --output-format=json",
        wl.name
    )
}

fn rnvme_command(wl: &Workload, flag: &str, seconds: u32) -> String {
    let mix = wl
        .read_percent
        .map(|p| format!(" -M {p}"))
        .unwrap_or_default();
    let f = rnvme_flag(flag, wl);
    format!(
        "rnvme perf $NVME0 -q {depth} -o {bs} -w {rw}{mix} -t {seconds} --warmup 1 --threads {t} --json --yes{sp}{f}",
        depth = wl.depth,
        bs = wl.bs,
        rw = wl.rw,
        t = wl.threads,
        sp = if f.is_empty() { "" } else { " " },
    )
}

/// Marker lines around each measurement's output.
const BEGIN: &str = "@@BEGIN ";
const END: &str = "@@END";

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

/// One measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// "fio io_uring", "rnvme --reactor", …
    pub engine: String,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Mean latency, µs.
    pub lat_mean_us: f64,
    /// 99th percentile latency, µs (the larger of reads' and writes' for fio mixes).
    pub lat_p99_us: f64,
    /// Failed I/Os.
    pub errors: u64,
    /// Every round's figures, in the order they ran; the fields above are the median round's.
    pub rounds: Vec<RoundFigures>,
    /// rnvme's batching counters, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<Value>,
}

/// One round of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoundFigures {
    /// Which round (1 for the first).
    pub round: u32,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Mean latency, µs.
    pub lat_mean_us: f64,
}

impl Measurement {
    /// This measurement's figures as round `round`.
    fn as_round(&self, round: u32) -> RoundFigures {
        RoundFigures {
            round,
            iops: self.iops,
            mib_s: self.mib_s,
            lat_mean_us: self.lat_mean_us,
        }
    }
}

/// Everything between the markers, by key, and the info lines.
fn sections(output: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut out = Vec::new();
    let mut info = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in output.lines() {
        if let Some(k) = line.strip_prefix(BEGIN) {
            cur = Some((k.trim().to_string(), String::new()));
        } else if line.trim_end() == END {
            if let Some(c) = cur.take() {
                out.push(c);
            }
        } else if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        } else if let Some(i) = line.strip_prefix("@@INFO ") {
            info.push(i.to_string());
        }
    }
    (out, info)
}

/// The JSON object in `body`, ignoring text around it.
fn json_in(body: &str) -> Result<Value> {
    let start = body.find('{').context("no JSON object in the output")?;
    let end = body.rfind('}').context("no end of the JSON object")?;
    serde_json::from_str(&body[start..=end]).context("the JSON does not parse")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// fio's result: the first (group-reported) job, reads and writes together.
pub fn parse_fio(engine: &str, body: &str) -> Result<Measurement> {
    let v = json_in(body)?;
    let job = &v["jobs"][0];
    if job.is_null() {
        bail!("no job in fio's output");
    }
    let (mut iops, mut kib, mut ios, mut lat_sum, mut p99, mut errors) =
        (0.0, 0.0, 0.0, 0.0, 0.0f64, 0u64);
    for dir in ["read", "write"] {
        let d = &job[dir];
        let n = num(&d["total_ios"]);
        iops += num(&d["iops"]);
        kib += num(&d["bw"]);
        if n > 0.0 {
            ios += n;
            lat_sum += num(&d["lat_ns"]["mean"]) * n;
            p99 = p99.max(num(&d["lat_ns"]["percentile"]["99.000000"]));
        }
    }
    errors += job["error"].as_u64().unwrap_or(0);
    Ok(Measurement {
        engine: engine.to_string(),
        iops,
        mib_s: kib / 1024.0,
        lat_mean_us: if ios > 0.0 {
            lat_sum / ios / 1000.0
        } else {
            0.0
        },
        lat_p99_us: p99 / 1000.0,
        errors,
        rounds: Vec::new(),
        counters: None,
    })
}

/// rnvme perf's result.
pub fn parse_rnvme(engine: &str, body: &str) -> Result<Measurement> {
    let v = json_in(body)?;
    if v["iops"].is_null() {
        bail!("no iops in rnvme perf's output");
    }
    Ok(Measurement {
        engine: engine.to_string(),
        iops: num(&v["iops"]),
        mib_s: num(&v["mib_s"]),
        lat_mean_us: num(&v["lat_us"]["avg"]),
        lat_p99_us: num(&v["lat_us"]["p99"]),
        errors: v["errors"].as_u64().unwrap_or(0) + v["verify_errors"].as_u64().unwrap_or(0),
        rounds: Vec::new(),
        counters: Some(v["counters"].clone()),
    })
}

/// One line of the table: a workload and every engine's result.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// The workload.
    pub workload: Workload,
    /// Kernel engines first, then rnvme's variants.
    pub results: Vec<Measurement>,
    /// The kernel engine with the most IOPS.
    pub best_kernel: Option<String>,
    /// rnvme's IOPS / the best kernel engine's.
    pub iops_ratio: Option<f64>,
    /// rnvme's mean latency / the best kernel engine's.
    pub lat_ratio: Option<f64>,
    /// Measurements that failed, with the reason.
    pub failures: Vec<String>,
}

impl Line {
    fn get(&self, engine: &str) -> Option<&Measurement> {
        self.results.iter().find(|m| m.engine == engine)
    }
}

/// A target of the issue, checked against this boot.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// What is compared.
    pub what: String,
    /// The target, as text.
    pub target: String,
    /// The median of the rounds' ratios.
    pub got: Option<f64>,
    /// The ratio in each round that measured both sides, in round order.
    pub rounds: Vec<f64>,
    /// Whether it is met.
    pub met: Option<bool>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// UTC date of the run.
    pub date: String,
    /// The emulated device's back end.
    pub backend: DeviceBackend,
    /// Host, QEMU and guest facts.
    pub setup: Vec<String>,
    /// Seconds per measurement.
    pub seconds: u32,
    /// Rounds of every measurement (the table shows medians).
    pub rounds: u32,
    /// The lines.
    pub lines: Vec<Line>,
    /// The targets.
    pub targets: Vec<TargetCheck>,
    /// Wall time of the whole run, s.
    pub wall_s: f64,
}

/// Build the lines from the guest's output.
pub fn collect(output: &str, workloads: &[Workload]) -> (Vec<Line>, Vec<String>) {
    let (secs, info) = sections(output);
    let mut lines = Vec::new();
    for wl in workloads {
        let mut results = Vec::new();
        let mut failures = Vec::new();
        let mut engines: Vec<String> = std::iter::once(FIO_NULL)
            .chain(KERNEL_ENGINES)
            .map(|(n, _)| n.to_string())
            .collect();
        engines.push(RNVME_FIO.0.to_string());
        engines.extend(
            std::iter::once("")
                .chain(wl.extra.iter().copied())
                .map(|f| rnvme_engine_name(f, wl)),
        );
        for engine in engines {
            let key = format!("{engine}|{}", wl.name);
            let mut rounds = Vec::new();
            for (round, (_, body)) in (1..).zip(secs.iter().filter(|(k, _)| *k == key)) {
                let parsed = if engine.starts_with("fio ") || engine == RNVME_FIO.0 {
                    parse_fio(&engine, body)
                } else {
                    parse_rnvme(&engine, body)
                };
                match parsed {
                    Ok(mut m) => {
                        m.rounds = vec![m.as_round(round)];
                        rounds.push(m)
                    }
                    Err(e) => failures.push(format!(
                        "{engine}: {e}: {}",
                        body.lines().rev().take(3).collect::<Vec<_>>().join(" / ")
                    )),
                }
            }
            match median_round(rounds) {
                Some(m) => results.push(m),
                None if !failures
                    .iter()
                    .any(|f| f.starts_with(&format!("{engine}: "))) =>
                {
                    failures.push(format!("{engine}: no output"))
                }
                None => {}
            }
        }
        // The best kernel engine is the one with the most IOPS; both ratios compare with it
        // (the lowest latency alone would often be psync's, which runs at depth 1).
        let best = results
            .iter()
            .filter(|m| KERNEL_ENGINES.iter().any(|(n, _)| *n == m.engine))
            .max_by(|a, b| a.iops.total_cmp(&b.iops))
            .cloned();
        let ours = results.iter().find(|m| m.engine == "rnvme").cloned();
        let iops_ratio = match (&ours, &best) {
            (Some(o), Some(b)) if b.iops > 0.0 => Some(o.iops / b.iops),
            _ => None,
        };
        let lat_ratio = match (&ours, &best) {
            (Some(o), Some(b)) if b.lat_mean_us > 0.0 => Some(o.lat_mean_us / b.lat_mean_us),
            _ => None,
        };
        lines.push(Line {
            workload: *wl,
            results,
            best_kernel: best.map(|b| b.engine),
            iops_ratio,
            lat_ratio,
            failures,
        });
    }
    (lines, info)
}

/// The round with the median IOPS (the lower middle one of an even count), carrying every
/// round's figures; None without rounds.
fn median_round(mut rounds: Vec<Measurement>) -> Option<Measurement> {
    let all: Vec<RoundFigures> = rounds.iter().flat_map(|m| m.rounds.clone()).collect();
    rounds.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let mid = rounds.len().checked_sub(1)? / 2;
    let mut m = rounds.swap_remove(mid);
    m.rounds = all;
    Some(m)
}

/// The median (the mean of the middle two of an even count); None for none.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `ours`'s figure over `theirs`'s in each round both have, in round order.
fn round_ratios(ours: &Measurement, theirs: &Measurement, f: fn(&RoundFigures) -> f64) -> Vec<f64> {
    ours.rounds
        .iter()
        .filter_map(|o| {
            let t = theirs.rounds.iter().find(|t| t.round == o.round)?;
            (f(t) > 0.0).then(|| f(o) / f(t))
        })
        .collect()
}

/// The issue's targets, against fio io_uring in the same boot.
pub fn check_targets(lines: &[Line]) -> Vec<TargetCheck> {
    let line = |n: &str| lines.iter().find(|l| l.workload.name == n);
    // Each round's ratio, from measurements minutes apart in the same round.
    let ratio = |n: &str, ours: &str, theirs: &str, f: fn(&RoundFigures) -> f64| {
        let l = line(n);
        l.and_then(|l| Some(round_ratios(l.get(ours)?, l.get(theirs)?, f)))
            .unwrap_or_default()
    };
    let check = |what: &str, target: &str, rounds: Vec<f64>, ok: fn(f64) -> bool| {
        let got = median(rounds.clone());
        TargetCheck {
            what: what.into(),
            target: target.into(),
            got,
            met: got.map(ok),
            rounds,
        }
    };
    let iops = |m: &RoundFigures| m.iops;
    let mib = |m: &RoundFigures| m.mib_s;
    let lat = |m: &RoundFigures| m.lat_mean_us;
    let other_128k = WORKLOADS
        .iter()
        .find(|w| w.name == "128k-read-qd32-t1")
        .map(|w| rnvme_engine_name("--other-dptr", w))
        .unwrap_or_default();
    vec![
        check(
            "4k randread qd32: rnvme IOPS / fio io_uring",
            ">= 7",
            ratio("4k-randread-qd32-t1", "rnvme", "fio io_uring", iops),
            |r| r >= 7.0,
        ),
        check(
            "4k randwrite qd32: rnvme IOPS / fio io_uring",
            ">= 5",
            ratio("4k-randwrite-qd32-t1", "rnvme", "fio io_uring", iops),
            |r| r >= 5.0,
        ),
        check(
            "4k randread qd1: rnvme mean latency / fio io_uring",
            "<= 0.18",
            ratio("4k-randread-qd1-t1", "rnvme", "fio io_uring", lat),
            |r| r <= 0.18,
        ),
        check(
            "4k randread qd1: rnvme mean latency / fio io_uring --hipri",
            "< 1",
            ratio("4k-randread-qd1-t1", "rnvme", "fio io_uring --hipri", lat),
            |r| r < 1.0,
        ),
        check(
            "128k read qd32: rnvme MiB/s / fio io_uring",
            ">= 8",
            ratio("128k-read-qd32-t1", "rnvme", "fio io_uring", mib),
            |r| r >= 8.0,
        ),
        check(
            "4k randread qd32: rnvme --reactor IOPS / rnvme",
            ">= 0.8",
            ratio("4k-randread-qd32-t1", "rnvme --reactor", "rnvme", iops),
            |r| r >= 0.8,
        ),
        check(
            "4k randread qd32: rnvme --reactor --cpus 0 IOPS / rnvme",
            ">= 0.8",
            ratio(
                "4k-randread-qd32-t1",
                "rnvme --reactor --cpus 0",
                "rnvme",
                iops,
            ),
            |r| r >= 0.8,
        ),
        check(
            "4k randread qd32: rnvme --reactor --callbacks IOPS / rnvme",
            ">= 0.8",
            ratio(
                "4k-randread-qd32-t1",
                "rnvme --reactor --callbacks",
                "rnvme",
                iops,
            ),
            |r| r >= 0.8,
        ),
        check(
            "4k randread qd32: rnvme fio engine IOPS / rnvme perf",
            ">= 0.9",
            ratio("4k-randread-qd32-t1", RNVME_FIO.0, "rnvme", iops),
            |r| r >= 0.9,
        ),
        check(
            "4k randread qd1: rnvme fio engine IOPS / rnvme perf",
            ">= 0.9",
            ratio("4k-randread-qd1-t1", RNVME_FIO.0, "rnvme", iops),
            |r| r >= 0.9,
        ),
        check(
            "128k read qd32: rnvme fio engine MiB/s / rnvme perf",
            ">= 0.9",
            ratio("128k-read-qd32-t1", RNVME_FIO.0, "rnvme", mib),
            |r| r >= 0.9,
        ),
        check(
            "4k randread qd32: rnvme fio engine IOPS / fio io_uring_cmd",
            "> 1",
            ratio("4k-randread-qd32-t1", RNVME_FIO.0, "fio io_uring_cmd", iops),
            |r| r > 1.0,
        ),
        check(
            "128k read qd32: rnvme (default data pointer) MiB/s / the other one",
            ">= 1",
            ratio("128k-read-qd32-t1", "rnvme", &other_128k, mib),
            |r| r >= 1.0,
        ),
    ]
}

/// The table.
pub fn table(c: &Comparison) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "rnvme bench compare, {} ({} s per measurement, median of {} round{})",
        c.date,
        c.seconds,
        c.rounds,
        if c.rounds == 1 { "" } else { "s" }
    );
    for l in &c.setup {
        let _ = writeln!(s, "  {l}");
    }
    let _ = writeln!(
        s,
        "\n{:<21} {:<28} {:>10} {:>9} {:>9} {:>9}  rnvme / best kernel",
        "workload", "engine", "IOPS", "MiB/s", "mean us", "p99 us"
    );
    for line in &c.lines {
        let mut first = true;
        for m in &line.results {
            let note = if m.engine == "rnvme" {
                format!(
                    "{} IOPS, {} mean latency{}",
                    line.iops_ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                    line.lat_ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                    line.best_kernel
                        .as_ref()
                        .map(|b| format!(" (best: {b})"))
                        .unwrap_or_default()
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{:<21} {:<28} {:>10.0} {:>9.1} {:>9.1} {:>9.1}  {}{}",
                if first { line.workload.name } else { "" },
                m.engine,
                m.iops,
                m.mib_s,
                m.lat_mean_us,
                m.lat_p99_us,
                note,
                if m.errors > 0 {
                    format!(" ({} errors)", m.errors)
                } else {
                    String::new()
                }
            );
            first = false;
        }
        for f in &line.failures {
            let _ = writeln!(
                s,
                "{:<21} failed: {f}",
                if first { line.workload.name } else { "" }
            );
            first = false;
        }
    }
    let _ = writeln!(
        s,
        "\ntargets (median of each round's ratio, the two sides minutes apart in one boot):"
    );
    for t in &c.targets {
        let _ = writeln!(
            s,
            "  {:<66} {:>7}  got {:>7}  {:<12}  rounds {}",
            t.what,
            t.target,
            t.got.map_or("-".into(), |g| format!("{g:.2}")),
            match t.met {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None => "not measured",
            },
            t.rounds
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = writeln!(s, "\nwall time {:.0} s", c.wall_s);
    s
}

/// `YYYY-MM-DD HH:MM UTC` of `secs` since the epoch.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

fn host_facts() -> Vec<String> {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "QEMU version unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let fio = Command::new("fio")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    vec![
        format!("host: {cpus} CPU(s), {model}"),
        format!("{qemu}, TCG, q35, intel-iommu, -smp 2, 2 GiB"),
        "device: QEMU NVMe, 1 namespace of 1 GiB with 4 KiB LBAs (filled before measuring)".into(),
        format!(
            "kernel side: {fio} on /dev/nvme0n1 (direct=1) and /dev/ng0n1 (io_uring_cmd), \
             nvme.poll_queues=2; rnvme side: the same job files through librnvme_fio.so, and \
             rnvme perf"
        ),
    ]
}

/// `rnvme bench compare`.
fn compare(a: CompareArgs) -> Result<ExitCode> {
    if a.seconds == Some(0) {
        return Err(UsageError(
            "--seconds must be at least 1 (fio and rnvme perf measure for whole seconds)".into(),
        )
        .into());
    }
    let begin = Instant::now();
    let seconds = a.seconds.unwrap_or(if a.quick { 2 } else { 5 });
    let rounds = a.rounds.unwrap_or(if a.quick { 1 } else { 3 });
    let workloads: Vec<Workload> = WORKLOADS
        .iter()
        .filter(|w| !a.quick || w.quick)
        .copied()
        .collect();
    let measurements: usize = rounds as usize
        * workloads
            .iter()
            .map(|w| KERNEL_ENGINES.len() + 3 + w.extra.len())
            .sum::<usize>();
    let switches = 2 * rounds as usize * workloads.len();
    let rnvme = super::vm::static_rnvme()?;
    let engine = super::vm::fio_engine()?;
    let backends = if a.backend.is_empty() {
        DeviceBackend::ALL.to_vec()
    } else {
        a.backend.clone()
    };
    let mut all = Vec::new();
    let mut failed = None;
    for backend in backends {
        let config = VmConfig {
            controllers: vec![ControllerSpec {
                namespaces: vec![NamespaceSpec {
                    size_mib: 1024,
                    lba_size: 4096,
                    null: backend == DeviceBackend::Null,
                    ..NamespaceSpec::default()
                }],
                aio: match backend {
                    DeviceBackend::IoUring => Some(DriveAio::IoUring),
                    DeviceBackend::Threads | DeviceBackend::Null => None,
                },
                ..ControllerSpec::default()
            }],
            host_binaries: vec!["fio".into()],
            files: vec![
                (rnvme.clone(), "/usr/local/bin/rnvme".into()),
                (engine.clone(), GUEST_ENGINE.into()),
            ],
            kernel_args: vec!["nvme.poll_queues=2".into()],
            hugepages: 128,
            // Each measurement takes its time, a warm-up and a start; each hand-over of the
            // device between the kernel and rnvme a few seconds more.
            timeout: Duration::from_secs(
                120 + measurements as u64 * (seconds as u64 + 6) + switches as u64 * 15,
            ),
            ..VmConfig::default()
        };
        eprintln!(
            "rnvme: booting one guest ({}) for {measurements} measurements of {seconds} s each \
             (about {} min)...",
            backend.describe(),
            (measurements as u64 * (seconds as u64 + 3) + switches as u64 * 4 + 30).div_ceil(60)
        );
        let begin = Instant::now();
        let out = vm::run(&config, &script(&workloads, seconds, rounds))?;
        if a.verbose {
            eprintln!("--- guest output ---\n{}\n---", out.output.trim_end());
        }
        let (lines, info) = collect(&out.output, &workloads);
        let mut setup = host_facts();
        setup.push(format!("back end: {}", backend.describe()));
        setup.extend(info.iter().map(|i| format!("guest {i}")));
        let date = utc(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()));
        let targets = check_targets(&lines);
        let c = Comparison {
            date,
            backend,
            setup,
            seconds,
            rounds,
            lines,
            targets,
            wall_s: begin.elapsed().as_secs_f64(),
        };
        // The guest's status and the failures decide the status even when nobody reads the
        // table.
        allow_closed_stdout(out!("{}\n", table(&c)))?;
        if out.exit_code != 0 {
            failed.get_or_insert(format!(
                "the guest script failed with {} (exit status {}); its last lines: {}",
                backend.describe(),
                out.exit_code,
                vm::tail_lines(&out.output, 5)
            ));
        } else if c.lines.iter().any(|l| !l.failures.is_empty()) {
            failed.get_or_insert("some measurements failed (see the table)".to_string());
        }
        all.push(c);
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&all)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(why) = failed {
        bail!("{why}");
    }
    eprintln!("rnvme: done in {:.0} s", begin.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// `rnvme bench`.
pub fn bench(c: BenchCommand) -> Result<ExitCode> {
    match c {
        BenchCommand::Compare(a) => compare(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO_JSON: &str = r#"fio: some warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "x", "error" : 0,
      "read" : { "iops" : 11000.5, "bw" : 44002, "total_ios" : 55000,
                 "lat_ns" : { "mean" : 2900000.0, "percentile" : { "50.000000" : 2800000, "99.000000" : 5000000 } } },
      "write" : { "iops" : 1000.0, "bw" : 4000, "total_ios" : 5000,
                 "lat_ns" : { "mean" : 3900000.0, "percentile" : { "50.000000" : 3800000, "99.000000" : 7000000 } } }
    }
  ]
}
"#;

    #[test]
    fn fio_json_is_read_with_reads_and_writes_together() {
        let m = parse_fio("fio libaio", FIO_JSON).unwrap();
        assert_eq!(m.iops, 12000.5);
        assert_eq!(m.mib_s, 48002.0 / 1024.0);
        // (2900 * 55000 + 3900 * 5000) / 60000
        assert!((m.lat_mean_us - 2983.333).abs() < 0.01, "{}", m.lat_mean_us);
        assert_eq!(m.lat_p99_us, 7000.0);
        assert!(parse_fio("x", "no json").is_err());
        assert!(parse_fio("x", "{\"jobs\": []}").is_err());
    }

    fn rnvme_json(iops: f64, avg: f64) -> String {
        format!(
            r#"{{"iops": {iops}, "mib_s": 300.5, "lat_us": {{"avg": {avg}, "min": 1, "max": 9, "p50": 2, "p99": 8, "p999": 9}},
              "ios": 10, "errors": 0, "verify_errors": 0, "counters": {{"submitted": 10}}}}"#
        )
    }

    #[test]
    fn sections_lines_ratios_and_targets() {
        let wl = [WORKLOADS[0], WORKLOADS[1]];
        let mut out = String::from("@@INFO kernel 6.1\nnoise\n");
        for (engine, iops, lat) in [
            ("fio io_uring", 6000.0, 160.0),
            ("fio io_uring --hipri", 9000.0, 100.0),
            ("fio libaio", 5000.0, 170.0),
            ("fio psync", 4000.0, 200.0),
            ("fio io_uring_cmd", 8500.0, 110.0),
            ("rnvme fio engine", 28000.0, 31.0),
            ("fio null engine (no device)", 99000.0, 3.0),
        ] {
            for w in &wl {
                let body = FIO_JSON
                    .replace("11000.5", &iops.to_string())
                    .replace("\"iops\" : 1000.0", "\"iops\" : 0")
                    .replace("\"total_ios\" : 5000", "\"total_ios\" : 0")
                    .replace("2900000.0", &(lat * 1000.0).to_string());
                out.push_str(&format!("{BEGIN}{engine}|{}\n{body}{END}\n", w.name));
            }
        }
        out.push_str(&format!(
            "{BEGIN}rnvme|{}\n{}\n{END}\n",
            wl[0].name,
            rnvme_json(30000.0, 28.8)
        ));
        out.push_str(&format!(
            "{BEGIN}rnvme --reactor|{}\nrnvme: error: broken\n@@FAILED 1\n{END}\n",
            wl[0].name
        ));
        out.push_str(&format!(
            "{BEGIN}rnvme|{}\n{}\n{END}\n",
            wl[1].name,
            rnvme_json(84000.0, 380.0)
        ));
        let (lines, info) = collect(&out, &wl);
        assert_eq!(info, ["kernel 6.1"]);
        let l = &lines[0];
        assert_eq!(l.best_kernel.as_deref(), Some("fio io_uring --hipri"));
        assert!((l.iops_ratio.unwrap() - 30000.0 / 9000.0).abs() < 1e-9);
        assert!(
            (l.lat_ratio.unwrap() - 0.288).abs() < 1e-9,
            "against --hipri's 100 us"
        );
        assert_eq!(l.failures.len(), 3);
        assert!(
            l.failures[0].starts_with("rnvme --reactor: ")
                && l.failures[0].contains("no JSON object"),
            "{:?}",
            l.failures
        );
        assert_eq!(l.failures[1], "rnvme --reactor --cpus 0: no output");
        assert_eq!(l.failures[2], "rnvme --reactor --callbacks: no output");
        // The second line misses its extra rnvme variants.
        assert_eq!(lines[1].results.len(), 8);
        assert_eq!(lines[1].failures.len(), 4);
        let t = check_targets(&lines);
        let qd32 = &t[0];
        assert_eq!(qd32.got, Some(84000.0 / 6000.0));
        assert_eq!(qd32.met, Some(true));
        assert_eq!(qd32.rounds, [84000.0 / 6000.0], "one round, one ratio");
        let qd1 = &t[2];
        assert!((qd1.got.unwrap() - 28.8 / 160.0).abs() < 1e-9);
        assert_eq!(qd1.met, Some(true));
        assert_eq!(t[1].met, None, "no randwrite line");
        let engine_qd1 = t
            .iter()
            .find(|t| t.what == "4k randread qd1: rnvme fio engine IOPS / rnvme perf")
            .unwrap();
        assert_eq!(engine_qd1.got, Some(28000.0 / 30000.0));
        assert_eq!(engine_qd1.met, Some(true));
        let engine_cmd = t
            .iter()
            .find(|t| t.what == "4k randread qd32: rnvme fio engine IOPS / fio io_uring_cmd")
            .unwrap();
        assert_eq!(engine_cmd.got, Some(28000.0 / 8500.0));
        let c = Comparison {
            backend: DeviceBackend::Threads,
            date: utc(0),
            setup: vec!["x".into()],
            seconds: 5,
            rounds: 1,
            lines,
            targets: t,
            wall_s: 1.0,
        };
        let text = table(&c);
        assert!(text.contains("1970-01-01 00:00 UTC"), "{text}");
        assert!(
            text.contains("3.33x IOPS, 0.29x mean latency (best: fio io_uring --hipri)"),
            "{text}"
        );
        assert!(text.contains("NOT MET") || text.contains("met"));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["lines"][0]["results"][0]["engine"],
            "fio null engine (no device)"
        );
        assert_eq!(v["lines"][0]["results"][6]["engine"], "rnvme fio engine");
        assert!(v["lines"][0]["results"][7]["counters"]["submitted"].is_u64());
        assert_eq!(v["lines"][0]["workload"]["depth"], 1);
    }

    #[test]
    fn script_runs_every_engine_and_variant() {
        let s = script(&WORKLOADS, 5, 1);
        let begins = s.matches(BEGIN).count();
        let want: usize = WORKLOADS
            .iter()
            .map(|w| KERNEL_ENGINES.len() + 3 + w.extra.len())
            .sum();
        assert_eq!(begins, want);
        assert_eq!(s.matches("rnvme reset $NVME0").count(), WORKLOADS.len() - 1);
        assert!(
            s.trim_end().ends_with(&format!("echo \"{END}\"")),
            "the last workload keeps the device"
        );
        let three = script(&WORKLOADS, 5, 3);
        assert_eq!(three.matches(BEGIN).count(), 3 * want);
        let n = WORKLOADS.len();
        assert_eq!(three.matches("rnvme setup --hugepages").count(), 3 * n);
        assert_eq!(
            three.matches("rnvme reset $NVME0").count(),
            3 * n - 1,
            "back to the kernel after each workload but the last"
        );
        // Each workload's rnvme variants follow its fio runs.
        let first_perf = three.find("rnvme perf $NVME0").unwrap();
        let second_wl_fio = three
            .find(&format!("fio /tmp/jobs/{}.fio", WORKLOADS[1].name))
            .unwrap();
        assert!(first_perf < second_wl_fio);
        // One job file per workload, written once, every engine a section of it.
        assert_eq!(
            three
                .matches(&format!("cat >/tmp/jobs/{}.fio", WORKLOADS[2].name))
                .count(),
            1
        );
        let job = job_file(&WORKLOADS[2], 5);
        assert!(s.contains(&job));
        for want in [
            "[global]\nrw=randread\nbs=4096\niodepth=32\nnumjobs=2\nthread\n",
            "\nclocksource=cpu\n",
            "\n[null]\nioengine=null\nfilename=null\nsize=1g\n",
            "\n[io_uring-hipri]\nioengine=io_uring\nhipri\nfilename=/dev/nvme0n1\ndirect=1\n",
            "\n[psync]\nioengine=psync\niodepth=1\n",
            "\n[io_uring_cmd]\nioengine=io_uring_cmd\ncmd_type=nvme\nfilename=/dev/ng0n1\nfixedbufs\nregisterfiles\nhipri\n",
            "\n[rnvme]\nioengine=external:/usr/local/lib/librnvme_fio.so\nfilename=trtype=PCIe traddr=${RNVME_TRADDR} ns=1\n",
        ] {
            assert!(job.contains(want), "{want:?} not in\n{job}");
        }
        assert!(job_file(&WORKLOADS[6], 5).contains("rw=randrw\nrwmixread=70\n"));
        assert!(s.contains(
            "rnvme perf $NVME0 -q 32 -o 131072 -w read -t 5 --warmup 1 --threads 1 --json --yes 2>&1"
        ));
        assert!(s.contains("-w randrw -M 70 -t 5"));
        assert!(s.contains("--json --yes --reactor"));
        let setup = s.find("rnvme setup").unwrap();
        let fio = s.match_indices("fio /tmp/jobs/").map(|(i, _)| i);
        assert_eq!(fio.filter(|&i| i < setup).count(), KERNEL_ENGINES.len() + 1);
        let engine = s.find("--section=rnvme ").unwrap();
        assert!(engine > setup && s.find("rnvme perf $NVME0").unwrap() > engine);
        assert!(s.contains("--json --yes --reactor --cpus 0"));
    }

    #[test]
    fn rounds_are_reduced_to_their_median() {
        let wl = [WORKLOADS[0]];
        let mut out = String::new();
        for (iops, avg) in [(30000.0, 30.0), (10000.0, 90.0), (20000.0, 50.0)] {
            out.push_str(&format!(
                "{BEGIN}rnvme|{}\n{}\n{END}\n",
                wl[0].name,
                rnvme_json(iops, avg)
            ));
        }
        // A round that failed is reported; the others still count.
        out.push_str(&format!(
            "{BEGIN}rnvme --reactor|{}\nrnvme: error: broken\n{END}\n{BEGIN}rnvme --reactor|{}\n{}\n{END}\n",
            wl[0].name,
            wl[0].name,
            rnvme_json(5000.0, 200.0)
        ));
        let (lines, _) = collect(&out, &wl);
        let ours = lines[0].get("rnvme").unwrap();
        assert_eq!(
            (ours.iops, ours.lat_mean_us),
            (20000.0, 50.0),
            "the median round, whole"
        );
        assert_eq!(
            ours.rounds
                .iter()
                .map(|r| (r.round, r.iops))
                .collect::<Vec<_>>(),
            [(1, 30000.0), (2, 10000.0), (3, 20000.0)],
            "in the order they ran"
        );
        assert_eq!(ours.rounds[1].lat_mean_us, 90.0);
        // The failed first round of the reactor leaves its second one as round 2.
        let reactor = lines[0].get("rnvme --reactor").unwrap();
        assert_eq!(
            reactor.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(
            round_ratios(reactor, ours, |r| r.iops),
            [0.5],
            "paired with the same round only"
        );
        assert_eq!(lines[0].get("rnvme --reactor").unwrap().iops, 5000.0);
        assert!(lines[0]
            .failures
            .iter()
            .any(|f| f.starts_with("rnvme --reactor: no JSON object")));
        assert!(
            !lines[0]
                .failures
                .iter()
                .any(|f| f == "rnvme --reactor: no output"),
            "{:?}",
            lines[0].failures
        );
        // Two rounds: the lower middle one.
        let two = median_round(vec![
            parse_rnvme("rnvme", &rnvme_json(8.0, 1.0)).unwrap(),
            parse_rnvme("rnvme", &rnvme_json(4.0, 2.0)).unwrap(),
        ])
        .unwrap();
        assert_eq!(two.iops, 4.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
        assert!(median_round(Vec::new()).is_none());
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400 + 3661), "2000-02-29 01:01 UTC");
        assert_eq!(utc(1_767_225_600), "2026-01-01 00:00 UTC");
    }
}
