//! `rnvme bench compare`: the kernel's NVMe driver and rnvme side by side, with the same
//! fio job files, in one boot of one QEMU guest.
//!
//! The guest gets one emulated controller with a 1 GiB namespace of 4 KiB LBAs and boots with
//! `nvme.poll_queues=2`, so that fio's `hipri` polls. The namespace is filled once; every
//! workload is one fio job file ([`workloads::job_file`]) with a section per engine: the kernel through
//! io_uring, io_uring with `hipri`, libaio, psync and io_uring_cmd passthrough on the generic
//! char device; then the controller moves to vfio-pci (`rnvme setup`) and the same file runs
//! on rnvme through its fio engine (`librnvme_fio.so`), and `rnvme perf` runs the workload
//! beside it (the engine's own cost). Each measurement prints its JSON between markers on the

mod modes;
mod report;
mod results;
mod serve;
mod workloads;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rnvme_tools::vm::{self, ControllerSpec, DriveAio, NamespaceSpec, VmConfig};
use serde::Serialize;

use super::{allow_closed_stdout, out, UsageError};
use report::{check_targets, table, Comparison};
use results::collect;
use workloads::{script, Workload, GUEST_ENGINE, KERNEL_ENGINES, WORKLOADS};

/// `rnvme bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot one guest; run the same fio job files on the kernel driver (io_uring, io_uring
    /// --hipri, libaio, psync, io_uring_cmd passthrough) and on rnvme (its fio engine), and
    /// rnvme perf beside them, on the same emulated device; print the table and the ratios
    Compare(CompareArgs),
    /// Boot one guest; run fio through the guest kernel's NVMe/TCP initiator against the
    /// kernel's own target (nvmet-tcp) and against `rnvme serve`, on the same emulated
    /// controller, rounds interleaved; print IOPS, latency and CPU time per I/O side by side
    Serve(serve::ServeBenchArgs),
    /// Boot one guest; run 4 KiB random reads at depth 1 and 32 with rnvme waiting polled, on
    /// MSI-X interrupts and hybrid, directly and through the async API, and an idle process in
    /// each mode, rounds interleaved; print IOPS, latency and CPU side by side and the targets
    Modes(modes::ModesBenchArgs),
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

/// The guest of a side-by-side run: one emulated controller with a 1 GiB namespace of 4 KiB
/// LBAs on `backend`, 128 hugepages, and `files` installed.
fn bench_vm(
    backend: DeviceBackend,
    host_binaries: &[&str],
    files: Vec<(PathBuf, String)>,
    kernel_args: &[&str],
    timeout: Duration,
) -> VmConfig {
    VmConfig {
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
        host_binaries: host_binaries.iter().map(|b| b.to_string()).collect(),
        files,
        kernel_args: kernel_args.iter().map(|a| a.to_string()).collect(),
        hugepages: 128,
        timeout,
        ..VmConfig::default()
    }
}

/// Why one boot's results do not count: the guest script failed, or some measurements did.
fn boot_failure(out: &vm::VmOutput, measurements_failed: bool) -> Option<String> {
    if out.exit_code != 0 {
        Some(format!(
            "the guest script failed (exit status {}); its last lines: {}",
            out.exit_code,
            vm::tail_lines(&out.output, 5)
        ))
    } else if measurements_failed {
        Some("some measurements failed (see the table)".to_string())
    } else {
        None
    }
}

/// What a bench gathers over its guest boots (one per device back end): each boot's
/// comparison, printed as it comes, the first failure, and the time it all took.
struct Boots<T> {
    all: Vec<T>,
    failed: Option<String>,
    begin: Instant,
}

impl<T: Serialize> Boots<T> {
    fn new() -> Boots<T> {
        Boots {
            all: Vec::new(),
            failed: None,
            begin: Instant::now(),
        }
    }

    /// Print one boot's `table` and keep its comparison `c`; a failed guest script or failed
    /// measurements make the whole bench fail at [`Boots::finish`] (the first failure, after
    /// `label` when given), whether or not anybody reads the table.
    fn add(
        &mut self,
        c: T,
        table: &str,
        out: &vm::VmOutput,
        measurements_failed: bool,
        label: Option<&str>,
    ) -> Result<()> {
        allow_closed_stdout(out!("{table}\n"))?;
        if let Some(why) = boot_failure(out, measurements_failed) {
            self.failed.get_or_insert(match label {
                Some(l) => format!("{l}: {why}"),
                None => why,
            });
        }
        self.all.push(c);
        Ok(())
    }

    /// Write every boot's comparison to `json` when asked; then fail with the first failure,
    /// or say how long it all took.
    fn finish(self, json: Option<&std::path::Path>) -> Result<ExitCode> {
        if let Some(path) = json {
            std::fs::write(path, serde_json::to_string_pretty(&self.all)? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        if let Some(why) = self.failed {
            bail!("{why}");
        }
        eprintln!("rnvme: done in {:.0} s", self.begin.elapsed().as_secs_f64());
        Ok(ExitCode::SUCCESS)
    }
}

/// `YYYY-MM-DD HH:MM UTC` now.
fn utc_now() -> String {
    utc(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()))
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
    let mut boots = Boots::new();
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
    for backend in backends {
        // Each measurement takes its time, a warm-up and a start; each hand-over of the
        // device between the kernel and rnvme a few seconds more.
        let config = bench_vm(
            backend,
            &["fio"],
            vec![
                (rnvme.clone(), "/usr/local/bin/rnvme".into()),
                (engine.clone(), GUEST_ENGINE.into()),
            ],
            &["nvme.poll_queues=2"],
            Duration::from_secs(
                120 + measurements as u64 * (seconds as u64 + 6) + switches as u64 * 15,
            ),
        );
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
        let date = utc_now();
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
        let shown = table(&c);
        let failures = c.lines.iter().any(|l| !l.failures.is_empty());
        boots.add(c, &shown, &out, failures, Some(backend.describe()))?;
    }
    boots.finish(a.json.as_deref())
}

/// `rnvme bench`.
pub fn bench(c: BenchCommand) -> Result<ExitCode> {
    match c {
        BenchCommand::Compare(a) => compare(a),
        BenchCommand::Serve(a) => serve::serve_bench(a),
        BenchCommand::Modes(a) => modes::modes_bench(a),
    }
}

#[cfg(test)]
mod tests;
