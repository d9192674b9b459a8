//! `rnvme perf`: throughput and latency of the userspace driver on one or more namespaces.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rnvme_driver::affinity::CpuList;
use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::queue::DataPointerMode;
use rnvme_tools::perf::{self, LbaRange, Pattern, PerfConfig, PerfError, Progress, Target};

use super::{allow_closed_stdout, out, outln, UsageError};

/// The data pointer used when neither --prp nor --sgl is given: chosen per command (PRPs when
/// PRPs need no list, SGLs otherwise; PRPs when the controller has no SGLs). On QEMU's
/// controller a single SGL Data Block descriptor moved 1.3-1.4x the 128 KiB sequential-read
/// data per second of the equivalent PRP list (the device maps one range instead of 32 pages),
/// while a 4 KiB command with its one PRP entry did 1.2x the IOPS of the same command with an
/// SGL descriptor (medians of 3 rounds).
pub const DEFAULT_DATA_POINTER: DataPointerMode = DataPointerMode::Auto;

/// `rnvme perf`
#[derive(Args, Debug)]
#[command(after_help = "\
Each thread keeps DEPTH I/Os in flight on every namespace, on queue pairs of its own. \
Writes stamp each LBA they write (its number in the first 8 bytes, \"rnvmperf\" in the next 8) \
so that a later --verify read can check them. Prints a table, or one JSON object with --json; \
exit status 1 when a command failed.")]
pub struct PerfArgs {
    /// Namespaces: a controller's full PCI address, with /NSID for another namespace than --ns
    #[arg(value_name = "BDF[/NSID]", required = true, value_parser = target_arg)]
    pub targets: Vec<(String, Option<u32>)>,
    /// Namespace of targets given without /NSID
    #[arg(long = "ns", default_value_t = 1, value_name = "N")]
    pub nsid: u32,
    /// I/Os in flight per thread and namespace
    #[arg(short = 'q', long = "depth", value_name = "DEPTH")]
    pub depth: u32,
    /// Bytes per I/O (4096, 4k, 128k, 1m); larger than the controller's max transfer is split
    #[arg(short = 'o', long = "size", value_name = "BYTES", value_parser = perf::parse_size)]
    pub size: u32,
    /// read, write, randread, randwrite, rw or randrw
    #[arg(short = 'w', long = "workload", value_name = "PATTERN", value_parser = parse_pattern)]
    pub workload: Pattern,
    /// Share of reads in rw and randrw, % (default 50)
    #[arg(short = 'M', long = "read-percent", value_name = "READ%")]
    pub read_percent: Option<u8>,
    /// Seconds to measure (fractions allowed)
    #[arg(short = 't', long = "time", value_name = "SECONDS", value_parser = seconds)]
    pub time: Duration,
    /// Seconds to run before measuring
    #[arg(long, value_name = "S", default_value = "0", value_parser = seconds)]
    pub warmup: Duration,
    /// Worker threads
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub threads: u32,
    /// I/O queue pairs per thread and namespace (with --reactor: per namespace)
    #[arg(long, default_value_t = 1, value_name = "Q")]
    pub queues_per_thread: u32,
    /// LBAs to use, START:LBAS (default: the whole namespace)
    #[arg(long, value_name = "START:LBAS", value_parser = parse_range)]
    pub range: Option<LbaRange>,
    /// Zipf-distributed random offsets with this exponent (such as 0.8 or 1.2)
    #[arg(long, value_name = "THETA")]
    pub zipf: Option<f64>,
    /// Force Unit Access on writes
    #[arg(long)]
    pub fua: bool,
    /// Check that every block read carries the stamp a perf write left on its LBA
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
    /// Latency percentiles (1 to 99.99 %) in the table and the JSON
    #[arg(long)]
    pub latency_histogram: bool,
    /// Stop at the first failed command (the default counts failures and goes on)
    #[arg(long)]
    pub stop_on_error: bool,
    /// Write even if a namespace holds a file system or partition table signature
    #[arg(long)]
    pub yes: bool,
    /// Describe data with PRPs
    #[arg(long, conflicts_with = "sgl")]
    pub prp: bool,
    /// Describe data with SGLs (the default when the controller supports them)
    #[arg(long)]
    pub sgl: bool,
    /// Send the I/O through a reactor thread that owns the queue pairs (cross-thread submission)
    #[arg(long)]
    pub reactor: bool,
    /// With --reactor: complete each I/O on the reactor thread, in a completer shared by the
    /// worker's requests that sends the next one straight into the reactor, instead of
    /// answering the worker threads over a channel
    #[arg(long, requires = "reactor")]
    pub callbacks: bool,
    /// Pin the worker threads to these CPUs in turn (0,2 or 0-3), and a reactor to the first
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,
    /// With --reactor: pin the reactor thread to this CPU (instead of the first of --cpus)
    #[arg(long, value_name = "CPU", requires = "reactor")]
    pub reactor_cpu: Option<usize>,
    /// Take DMA memory from ordinary 4 KiB pages (pinned by VFIO) instead of hugepages
    #[arg(long)]
    pub no_hugepages: bool,
    /// Seed of the random offsets
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Ring MMIO doorbells only, even where the controller offers shadow doorbells
    #[arg(long)]
    pub no_shadow_doorbells: bool,
    /// Ring at every submission instead of once per batch of submissions
    #[arg(long)]
    pub ring_each: bool,
}

/// `BDF` or `BDF/NSID`.
fn target_arg(s: &str) -> Result<(String, Option<u32>), String> {
    let (bdf, ns) = match s.split_once('/') {
        Some((b, n)) => {
            let nsid = n
                .parse::<u32>()
                .ok()
                .filter(|&n| n >= 1 && n != u32::MAX)
                .ok_or_else(|| {
                    format!("{s:?}: namespace {n:?} is not a namespace id (1 or more)")
                })?;
            (b, Some(nsid))
        }
        None => (s, None),
    };
    Ok((super::bdf_arg(bdf)?, ns))
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    s.parse()
}

fn parse_range(s: &str) -> Result<LbaRange, String> {
    s.parse()
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && (0.0..=86_400.0 * 365.0).contains(&v)) {
        return Err(format!("{s:?} is not a number of seconds from 0 to a year"));
    }
    Ok(Duration::from_secs_f64(v))
}

impl PerfArgs {
    /// The engine's configuration.
    pub fn config(&self) -> PerfConfig {
        PerfConfig {
            pattern: self.workload,
            read_percent: self.read_percent,
            io_size: self.size,
            depth: self.depth,
            duration: self.time,
            warmup: self.warmup,
            threads: self.threads,
            queues_per_thread: self.queues_per_thread,
            range: self.range,
            zipf: self.zipf,
            fua: self.fua,
            reactor: self.reactor,
            reactor_callbacks: self.callbacks,
            cpus: self.cpus.clone(),
            reactor_cpu: self.reactor_cpu,
            verify: self.verify,
            stop_on_error: self.stop_on_error,
            latency_histogram: self.latency_histogram,
            seed: self.seed,
            shadow_doorbells: !self.no_shadow_doorbells,
            ring_each: self.ring_each,
        }
    }

    fn data_pointer(&self) -> Option<DataPointerMode> {
        if self.prp {
            Some(DataPointerMode::Prp)
        } else if self.sgl {
            Some(DataPointerMode::Sgl)
        } else {
            None
        }
    }
}

/// An engine error as the command reports it: argument errors exit with status 2.
fn to_cli(e: PerfError) -> anyhow::Error {
    match e {
        PerfError::Invalid(m) => UsageError(m).into(),
        other => other.into(),
    }
}

/// Open each controller once.
fn open(args: &PerfArgs, cfg: &PerfConfig) -> Result<Vec<Target>> {
    let forced = args.data_pointer();
    let mut ctrls: BTreeMap<String, Controller> = BTreeMap::new();
    let mut targets = Vec::new();
    for (bdf, ns) in &args.targets {
        let ctrl = match ctrls.get(bdf) {
            Some(c) => c.clone(),
            None => {
                // Enough DMA memory for the buffers up front, so the pool does not grow
                // while the clock runs.
                let per_target = cfg.io_size as u64
                    * cfg.depth as u64
                    * cfg.threads as u64
                    * args.targets.iter().filter(|(b, _)| b == bdf).count() as u64;
                let chunks = (per_target.div_ceil(2 << 20) + 1).min(1024) as usize;
                let c = Controller::open(
                    bdf,
                    ControllerOptions {
                        backing: if args.no_hugepages {
                            Backing::SmallPages
                        } else {
                            Backing::Hugepages
                        },
                        data_pointer: forced.unwrap_or(DEFAULT_DATA_POINTER),
                        initial_chunks: chunks,
                        shadow_doorbells: cfg.shadow_doorbells,
                        ..ControllerOptions::default()
                    },
                )?;
                if forced == Some(DataPointerMode::Sgl) && !c.supports_sgl() {
                    return Err(UsageError(format!(
                        "{bdf}: the controller does not support SGLs (Identify Controller SGLS is 0): use --prp"
                    ))
                    .into());
                }
                ctrls.insert(bdf.clone(), c.clone());
                c
            }
        };
        targets.push(Target {
            ctrl,
            nsid: ns.unwrap_or(args.nsid),
        });
    }
    Ok(targets)
}

/// Refuse to write over a file system or partition table unless told to.
fn check_signatures(targets: &[Target]) -> Result<()> {
    let mut found = Vec::new();
    for t in targets {
        for s in perf::find_signatures(t).map_err(to_cli)? {
            eprintln!(
                "rnvme: warning: {} holds a {s}; a write workload would destroy it",
                t.label()
            );
            found.push(format!("{} ({})", t.label(), s.what));
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(UsageError(format!(
        "refusing to write to {}: add --yes to write anyway",
        found.join(", ")
    ))
    .into())
}

fn progress_bar(cfg: &PerfConfig) -> ProgressBar {
    let total = (cfg.warmup + cfg.duration).as_millis() as u64;
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:24}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn progress_message(p: &Progress) -> String {
    format!(
        "{:>11.0} IOPS {:>9.1} MiB/s{}{}",
        p.iops,
        p.mib_s,
        if p.errors > 0 {
            format!(", {} errors", p.errors)
        } else {
            String::new()
        },
        if p.warming_up { " (warm-up)" } else { "" }
    )
}

/// `rnvme perf`.
pub fn perf(args: PerfArgs) -> Result<ExitCode> {
    let cfg = args.config();
    cfg.check().map_err(to_cli)?;
    let targets = open(&args, &cfg)?;
    perf::plan(&targets, &cfg).map_err(to_cli)?;
    if cfg.pattern.writes() && !args.yes {
        check_signatures(&targets)?;
    }
    let bar = progress_bar(&cfg);
    let result = perf::run(&targets, &cfg, &mut |p| {
        bar.set_position(p.elapsed.as_millis() as u64);
        bar.set_message(progress_message(p));
    });
    bar.finish_and_clear();
    let report = result.map_err(to_cli)?;
    let printed = if args.json {
        serde_json::to_string_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(|j| outln!("{j}"))
    } else {
        out!("{}", report.table(args.latency_histogram))
    };
    // Failed commands decide the status even when nobody reads the table.
    allow_closed_stdout(printed)?;
    if report.error_count() > 0 {
        eprintln!(
            "rnvme: {} command(s) failed and {} block(s) did not verify",
            report.total.errors, report.total.verify_errors
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: PerfArgs,
    }

    fn parse(args: &[&str]) -> Result<PerfArgs, clap::Error> {
        let mut v = vec!["perf"];
        v.extend_from_slice(args);
        T::try_parse_from(v).map(|t| t.a)
    }

    #[test]
    fn full_command_line() {
        let a = parse(&[
            "0000:00:04.0",
            "0000:00:05.0/2",
            "--ns",
            "3",
            "-q",
            "32",
            "-o",
            "128k",
            "-w",
            "randrw",
            "-M",
            "70",
            "-t",
            "2.5",
            "--warmup",
            "1",
            "--threads",
            "2",
            "--queues-per-thread",
            "2",
            "--range",
            "0:1000",
            "--zipf",
            "1.2",
            "--fua",
            "--json",
            "--latency-histogram",
            "--stop-on-error",
            "--yes",
            "--sgl",
            "--reactor",
            "--seed",
            "9",
        ])
        .unwrap();
        assert_eq!(
            a.targets,
            [
                ("0000:00:04.0".to_string(), None),
                ("0000:00:05.0".to_string(), Some(2))
            ]
        );
        let c = a.config();
        assert_eq!(c.pattern, Pattern::RandRw);
        assert_eq!((c.depth, c.io_size, c.read_percent()), (32, 128 << 10, 70));
        assert_eq!(c.duration, Duration::from_millis(2500));
        assert_eq!(c.warmup, Duration::from_secs(1));
        assert_eq!((c.threads, c.queues_per_thread), (2, 2));
        assert_eq!(
            c.range,
            Some(LbaRange {
                start: 0,
                lbas: 1000
            })
        );
        assert_eq!(c.zipf, Some(1.2));
        assert!(c.fua && c.reactor && c.stop_on_error && c.latency_histogram);
        assert_eq!(c.seed, 9);
        assert_eq!(a.data_pointer(), Some(DataPointerMode::Sgl));
        assert!(c.check().is_ok());
    }

    #[test]
    fn clap_refuses_with_exit_status_2() {
        let ok = [
            "0000:00:04.0",
            "-q",
            "1",
            "-o",
            "4096",
            "-w",
            "read",
            "-t",
            "1",
        ];
        assert!(parse(&ok).is_ok());
        for bad in [
            vec!["0000:00:04.0", "-q", "1", "-o", "4096", "-w", "read"],
            vec!["00:04.0", "-q", "1", "-o", "4096", "-w", "read", "-t", "1"],
            vec![
                "0000:00:04.0/0",
                "-q",
                "1",
                "-o",
                "4096",
                "-w",
                "read",
                "-t",
                "1",
            ],
            vec![
                "0000:00:04.0",
                "-q",
                "1",
                "-o",
                "4x",
                "-w",
                "read",
                "-t",
                "1",
            ],
            vec![
                "0000:00:04.0",
                "-q",
                "1",
                "-o",
                "4096",
                "-w",
                "seq",
                "-t",
                "1",
            ],
            vec![
                "0000:00:04.0",
                "-q",
                "1",
                "-o",
                "4096",
                "-w",
                "read",
                "-t",
                "-1",
            ],
            vec![
                "0000:00:04.0",
                "-q",
                "1",
                "-o",
                "4096",
                "-w",
                "read",
                "-t",
                "1",
                "--range",
                "5",
            ],
            vec![
                "0000:00:04.0",
                "-q",
                "1",
                "-o",
                "4096",
                "-w",
                "read",
                "-t",
                "1",
                "--prp",
                "--sgl",
            ],
            vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "1"],
        ] {
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn argument_errors_become_usage_errors() {
        let a = parse(&[
            "0000:00:04.0",
            "-q",
            "0",
            "-o",
            "4096",
            "-w",
            "read",
            "-t",
            "1",
        ])
        .unwrap();
        let e = to_cli(a.config().check().unwrap_err());
        let u = e
            .downcast_ref::<UsageError>()
            .expect("a usage error (exit status 2)");
        assert!(u.0.contains("queue depth"), "{u}");
        let e = to_cli(PerfError::Run("lost".into()));
        assert!(e.downcast_ref::<UsageError>().is_none());
        let m = progress_message(&Progress {
            elapsed: Duration::from_secs(1),
            total: Duration::from_secs(2),
            warming_up: true,
            iops: 1000.0,
            mib_s: 3.9,
            errors: 2,
        });
        assert!(
            m.contains("1000 IOPS") && m.contains("2 errors") && m.contains("warm-up"),
            "{m}"
        );
    }
}
