//! `rnvme perf`: throughput and latency of the userspace driver on one or more namespaces.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rnvme_driver::affinity::{CpuList, MAX_CPU};
use rnvme_driver::controller::{Coalescing, Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::queue::DataPointerMode;
use rnvme_tools::perf::{
    self, LbaRange, Pattern, PerfConfig, PerfError, Progress, Target, MAX_THREADS,
};
use rnvme_tools::sysfs::{Sysfs, VFIO_DRIVER};

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
so that a later --verify read can check them. Prints a table (reads and writes apart for rw and \
randrw), SPDK perf's table with --spdk-format, or one JSON object with --json (with fio's read \
and write objects); exit status 1 when a command failed.

SPDK perf's spellings are taken beside rnvme's: -r 'trtype:PCIe traddr:0000:04:00.0 ns:1' \
(repeatable; without ns: every namespace of the controller), -c core mask (0x3, or [0-1]: one \
thread pinned on each core), -P queue pairs, -a warm-up seconds, -L / -LL latency percentiles / \
and histogram, -Q N continue on errors (rnvme's default; N is accepted and not used), -F zipf \
(0: uniform), --io-depth, --io-size, --io-pattern, --rwmixread, --time. Without namespaces \
(neither BDF nor -r) every controller bound to vfio-pci is run on, every namespace of it.")]
pub struct PerfArgs {
    /// Namespaces: a controller's full PCI address, with /NSID for another namespace than --ns
    #[arg(value_name = "BDF[/NSID]", value_parser = target_arg)]
    pub targets: Vec<(String, Option<u32>)>,
    /// SPDK's transport ID of a namespace or controller: 'trtype:PCIe traddr:BDF [ns:NSID]'
    // The doc comment is the option's help text, shown as written: its brackets are not a link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(short = 'r', long = "transport", value_name = "TRID", value_parser = trid_arg)]
    pub trids: Vec<Trid>,
    /// Namespace of targets given without /NSID
    #[arg(long = "ns", default_value_t = 1, value_name = "N")]
    pub nsid: u32,
    /// I/Os in flight per thread and namespace
    #[arg(
        short = 'q',
        long = "depth",
        visible_alias = "io-depth",
        value_name = "DEPTH",
        value_parser = clap::value_parser!(u32).range(1..=65536)
    )]
    pub depth: u32,
    /// Bytes per I/O (4096, 4k, 128k, 1m); larger than the controller's max transfer is split
    #[arg(short = 'o', long = "size", visible_alias = "io-size", value_name = "BYTES", value_parser = perf::parse_size)]
    pub size: u32,
    /// read, write, randread, randwrite, rw or randrw
    #[arg(short = 'w', long = "workload", visible_alias = "io-pattern", value_name = "PATTERN", value_parser = parse_pattern)]
    pub workload: Pattern,
    /// Share of reads in rw and randrw, % (default 50)
    #[arg(
        short = 'M',
        long = "read-percent",
        visible_alias = "rwmixread",
        value_name = "READ%"
    )]
    pub read_percent: Option<u8>,
    /// Seconds to measure (fractions allowed)
    #[arg(short = 't', long = "time", value_name = "SECONDS", value_parser = seconds)]
    pub time: Duration,
    /// Seconds to run before measuring
    #[arg(short = 'a', long, visible_alias = "warmup-time", value_name = "S", default_value = "0", value_parser = seconds)]
    pub warmup: Duration,
    /// Worker threads
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub threads: u32,
    /// SPDK's core mask (0x3, or a list such as [0-1,4]): one worker thread pinned to each core
    #[arg(short = 'c', long = "core-mask", value_name = "MASK", value_parser = core_mask_arg, conflicts_with_all = ["threads", "cpus"])]
    pub core_mask: Option<CpuList>,
    /// I/O queue pairs per thread and namespace (with --reactor: per namespace)
    #[arg(
        short = 'P',
        long,
        visible_alias = "num-qpairs",
        default_value_t = 1,
        value_name = "Q"
    )]
    pub queues_per_thread: u32,
    /// LBAs to use, START:LBAS (default: the whole namespace)
    #[arg(long, value_name = "START:LBAS", value_parser = parse_range)]
    pub range: Option<LbaRange>,
    /// Zipf-distributed random offsets with this exponent (such as 0.8 or 1.2; 0: uniform)
    #[arg(short = 'F', long, value_name = "THETA")]
    pub zipf: Option<f64>,
    /// Force Unit Access on writes
    #[arg(long)]
    pub fua: bool,
    /// Check that every block read carries the stamp a perf write left on its LBA
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object instead of the table
    #[arg(long, conflicts_with = "spdk_format")]
    pub json: bool,
    /// Print the table in SPDK perf's layout (one row per namespace and core, then the total)
    #[arg(long)]
    pub spdk_format: bool,
    /// Latency percentiles (1 to 99.99 %) in the table and the JSON
    #[arg(long)]
    pub latency_histogram: bool,
    /// SPDK's latency tracking: -L percentiles (as --latency-histogram), -LL the histogram too
    #[arg(short = 'L', long = "enable-sw-latency-tracking", action = clap::ArgAction::Count)]
    pub latency_level: u8,
    /// Stop at the first failed command (the default counts failures and goes on)
    #[arg(long)]
    pub stop_on_error: bool,
    /// SPDK's continue-on-error: rnvme's default, accepted for SPDK's command lines (N, how
    /// often SPDK logs an error, is not used: the first failures are listed in the report)
    #[arg(short = 'Q', long = "continue-on-error", value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "stop_on_error")]
    pub continue_on_error: Option<u32>,
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
    /// Microseconds to wait (busy) after an I/O completes before submitting the slot's next
    /// one, as fio's thinktime (with thinktime_spin): the device sees a pause between I/Os
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub thinktime_us: u64,
    /// How workers wait for completions: polled (a busy core), interrupt (sleep on the queue
    /// pair's MSI-X vector) or hybrid (poll for --spin-us, then sleep)
    #[arg(long, value_name = "MODE", default_value = "polled", value_parser = ["polled", "interrupt", "hybrid"])]
    pub mode: String,
    /// With --mode hybrid: microseconds to keep polling an empty queue before sleeping
    #[arg(long, value_name = "US", default_value_t = rnvme_driver::irq::DEFAULT_HYBRID_SPIN.as_micros() as u64)]
    pub spin_us: u64,
    /// Interrupt Coalescing for interrupt and hybrid modes: THRESHOLD,TIME (0-based
    /// aggregation threshold, time in 100 µs units)
    #[arg(long, value_name = "THR,TIME", value_parser = coalescing_arg)]
    pub coalesce: Option<Coalescing>,
    /// Issue the I/O through the async API (futures on a tokio runtime per worker) instead of
    /// the queue pair directly
    #[arg(long = "async", conflicts_with = "reactor")]
    pub async_api: bool,
    /// Submit nothing: only wait on the queue pairs for the run's time (what an idle process
    /// costs in each mode)
    #[arg(long, conflicts_with_all = ["reactor", "async_api", "verify"])]
    pub idle: bool,
}

fn coalescing_arg(s: &str) -> Result<Coalescing, String> {
    let (t, time) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}': give THRESHOLD,TIME such as 7,1"))?;
    let num = |v: &str, what: &str| {
        v.trim()
            .parse::<u8>()
            .map_err(|_| format!("'{v}': the {what} is a number from 0 to 255"))
    };
    Ok(Coalescing {
        threshold: num(t, "threshold")?,
        time_100us: num(time, "time")?,
    })
}

/// An SPDK transport ID, as `-r` takes it: a PCIe controller and maybe a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trid {
    /// The controller's full PCI address.
    pub traddr: String,
    /// The namespace (`None`: every namespace of the controller, as SPDK does).
    pub ns: Option<u32>,
}

/// Parses `trtype:PCIe traddr:0000:04:00.0 ns:1` (keys as SPDK spells them, any case; `:` or
/// `=` after a key; the short address `04:00.0` is in domain 0).
fn trid_arg(s: &str) -> Result<Trid, String> {
    let mut traddr = None;
    let mut ns = None;
    for token in s.split_whitespace() {
        let cut = token
            .find([':', '='])
            .ok_or_else(|| format!("{token:?} in {s:?} is not KEY:VALUE"))?;
        let (key, value) = (&token[..cut], &token[cut + 1..]);
        match key.to_ascii_lowercase().as_str() {
            "trtype" => {
                if !value.eq_ignore_ascii_case("pcie") {
                    return Err(format!(
                        "trtype {value}: rnvme drives local PCIe controllers only (trtype:PCIe)"
                    ));
                }
            }
            "traddr" => {
                let value = value.to_ascii_lowercase();
                let full = if value.len() == 7 {
                    format!("0000:{value}")
                } else {
                    value
                };
                traddr = Some(super::bdf_arg(&full)?);
            }
            "ns" => {
                ns = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|&n| n >= 1 && n != u32::MAX)
                        .ok_or_else(|| format!("ns:{value} is not a namespace id (1 or more)"))?,
                );
            }
            other => {
                return Err(format!(
                    "{other:?} in {s:?}: rnvme takes the keys trtype, traddr and ns"
                ))
            }
        }
    }
    let traddr =
        traddr.ok_or_else(|| format!("{s:?} names no traddr (such as traddr:0000:04:00.0)"))?;
    Ok(Trid { traddr, ns })
}

/// Parses an SPDK (DPDK) core mask: hexadecimal (`0x3`, `3`) or a list in brackets (`[0-1,4]`).
fn core_mask_arg(s: &str) -> Result<CpuList, String> {
    let t = s.trim();
    let cpus = if let Some(list) = t.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
        list.parse::<CpuList>()?
    } else {
        let hex = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        let mut cpus = Vec::new();
        for (i, c) in hex.chars().rev().enumerate() {
            let d = c.to_digit(16).ok_or_else(|| {
                format!("core mask {s:?} is not hexadecimal (0x3) nor a list ([0-1])")
            })?;
            cpus.extend((0..4).filter(|b| d & (1 << b) != 0).map(|b| i * 4 + b));
        }
        if let Some(&last) = cpus.iter().max().filter(|&&c| c > MAX_CPU) {
            return Err(format!(
                "core mask {s:?} names core {last}, beyond the last possible CPU, {MAX_CPU}"
            ));
        }
        CpuList::new(cpus)
    };
    if cpus.cpus().is_empty() {
        return Err(format!("core mask {s:?} names no core"));
    }
    // A thread per core: as many cores as `--threads` allows.
    if cpus.cpus().len() > MAX_THREADS as usize {
        return Err(format!(
            "core mask {s:?} names {} cores: at most {MAX_THREADS} (a thread each)",
            cpus.cpus().len()
        ));
    }
    Ok(cpus)
}

/// `BDF` or `BDF/NSID`.
pub(crate) fn target_arg(s: &str) -> Result<(String, Option<u32>), String> {
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
            threads: match &self.core_mask {
                Some(m) => m.cpus().len() as u32,
                None => self.threads,
            },
            queues_per_thread: self.queues_per_thread,
            range: self.range,
            // SPDK's -F 0 is uniform.
            zipf: self.zipf.filter(|&z| z != 0.0),
            fua: self.fua,
            reactor: self.reactor,
            reactor_callbacks: self.callbacks,
            cpus: self.core_mask.clone().or_else(|| self.cpus.clone()),
            reactor_cpu: self.reactor_cpu,
            verify: self.verify,
            stop_on_error: self.stop_on_error,
            latency_histogram: self.latency_histogram || self.latency_level > 0,
            seed: self.seed,
            shadow_doorbells: !self.no_shadow_doorbells,
            ring_each: self.ring_each,
            thinktime: Duration::from_micros(self.thinktime_us),
            wait: super::wait_mode(&self.mode, self.spin_us),
            async_api: self.async_api,
            idle: self.idle,
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

/// Which namespaces of a controller to run on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Which {
    One(u32),
    /// Every active namespace (SPDK's `-r` without `ns`).
    All,
}

/// The controllers and namespaces asked for: the BDF[/NSID] arguments, then the `-r`
/// transport IDs; with neither, every NVMe controller bound to vfio-pci (`bound`), all its
/// namespaces, as SPDK perf does.
fn requested(
    args: &PerfArgs,
    bound: &dyn Fn() -> Result<Vec<String>>,
) -> Result<Vec<(String, Which)>> {
    let mut v: Vec<(String, Which)> = args
        .targets
        .iter()
        .map(|(b, n)| (b.clone(), Which::One(n.unwrap_or(args.nsid))))
        .collect();
    v.extend(
        args.trids
            .iter()
            .map(|t| (t.traddr.clone(), t.ns.map_or(Which::All, Which::One))),
    );
    if v.is_empty() {
        v = bound()?.into_iter().map(|b| (b, Which::All)).collect();
        if v.is_empty() {
            return Err(UsageError(
                "no namespace given (BDF[/NSID] or -r) and no NVMe controller is bound to vfio-pci: name one, or run `rnvme setup`".into(),
            )
            .into());
        }
    }
    Ok(v)
}

/// The NVMe controllers bound to vfio-pci.
fn vfio_controllers() -> Result<Vec<String>> {
    let sys = Sysfs::from_env();
    let mut v = Vec::new();
    for bdf in sys.nvme_controllers()? {
        if sys.device(&bdf)?.driver.as_deref() == Some(VFIO_DRIVER) {
            v.push(bdf);
        }
    }
    Ok(v)
}

/// Open each controller once.
fn open(args: &PerfArgs, cfg: &PerfConfig, wanted: &[(String, Which)]) -> Result<Vec<Target>> {
    let forced = args.data_pointer();
    let mut ctrls: BTreeMap<String, Controller> = BTreeMap::new();
    let mut targets = Vec::new();
    for (bdf, which) in wanted {
        let ctrl = match ctrls.get(bdf) {
            Some(c) => c.clone(),
            None => {
                // Enough DMA memory for the buffers up front, so the pool does not grow
                // while the clock runs (for every namespace: counted as one).
                let per_target = (cfg.io_size as u64)
                    .saturating_mul(cfg.depth as u64)
                    .saturating_mul(cfg.threads as u64)
                    .saturating_mul(wanted.iter().filter(|(b, _)| b == bdf).count() as u64);
                let chunks = (per_target.div_ceil(2 << 20) + 1).min(1024) as usize;
                let c = Controller::open(
                    bdf,
                    ControllerOptions {
                        backing: Backing::small_pages_if(args.no_hugepages),
                        data_pointer: forced.unwrap_or(DEFAULT_DATA_POINTER),
                        initial_chunks: chunks,
                        shadow_doorbells: cfg.shadow_doorbells,
                        interrupt_coalescing: args.coalesce,
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
        let nsids: Vec<u32> = match which {
            Which::One(n) => vec![*n],
            Which::All => ctrl.namespaces().iter().map(|n| n.nsid).collect(),
        };
        if nsids.is_empty() {
            return Err(
                UsageError(format!("{bdf}: the controller has no active namespace")).into(),
            );
        }
        for nsid in nsids {
            targets.push(Target {
                ctrl: ctrl.clone(),
                nsid,
            });
        }
    }
    Ok(targets)
}

/// SPDK's name of a namespace from its `BDF/nsid`: `PCIE (0000:04:00.0) NSID 1`, with the
/// PCI vendor and device ids where sysfs has them, as SPDK prints them since 2025.
fn spdk_name(label: &str) -> String {
    let (bdf, nsid) = label.split_once('/').unwrap_or((label, "1"));
    let ids = Sysfs::from_env()
        .device(bdf)
        .map(|d| format!(" [{:04x}:{:04x}]", d.vendor, d.device))
        .unwrap_or_default();
    format!("PCIE ({bdf}){ids} NSID {nsid}")
}

/// Refuse a write workload on controllers nobody named (no BDF and no -r: every namespace
/// of every controller bound to vfio-pci, as SPDK perf runs) unless told to: a destructive
/// command names its range or says so.
fn check_implicit_writes(
    args: &PerfArgs,
    cfg: &PerfConfig,
    wanted: &[(String, Which)],
) -> Result<()> {
    if !cfg.pattern.writes() || !args.targets.is_empty() || !args.trids.is_empty() || args.yes {
        return Ok(());
    }
    let mut ctrls: Vec<&str> = wanted.iter().map(|(b, _)| b.as_str()).collect();
    ctrls.dedup();
    Err(UsageError(format!(
        "a write workload with no BDF[/NSID] or -r writes every namespace of every controller \
         bound to vfio-pci ({}): name the namespaces, or add --yes",
        ctrls.join(", ")
    ))
    .into())
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
    let wanted = requested(&args, &vfio_controllers)?;
    check_implicit_writes(&args, &cfg, &wanted)?;
    let targets = open(&args, &cfg, &wanted)?;
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
    } else if args.spdk_format {
        let level = args.latency_level.max(u8::from(args.latency_histogram));
        out!("{}", report.spdk_table(level, &spdk_name))
    } else {
        let mut t = report.table(args.latency_histogram || args.latency_level > 0);
        if args.latency_level >= 2 {
            t.push_str(&report.histogram_table());
        }
        out!("{t}")
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
    use rnvme_driver::irq::WaitMode;

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
    fn waiting_modes_async_idle_and_coalescing() {
        let a = parse(&["-q", "1", "-o", "4k", "-w", "randread", "-t", "1"]).unwrap();
        assert_eq!(a.config().wait, WaitMode::Polled);
        let a = parse(&[
            "-q",
            "32",
            "-o",
            "4k",
            "-w",
            "randread",
            "-t",
            "1",
            "--mode",
            "hybrid",
            "--spin-us",
            "20",
            "--async",
            "--coalesce",
            "7,2",
        ])
        .unwrap();
        let c = a.config();
        assert_eq!(
            c.wait,
            WaitMode::Hybrid {
                spin: Duration::from_micros(20)
            }
        );
        assert!(c.async_api && !c.idle);
        assert_eq!(
            a.coalesce,
            Some(Coalescing {
                threshold: 7,
                time_100us: 2
            })
        );
        let a = parse(&[
            "-q",
            "1",
            "-o",
            "4k",
            "-w",
            "randread",
            "-t",
            "1",
            "--mode",
            "interrupt",
            "--idle",
        ])
        .unwrap();
        assert_eq!(a.config().wait, WaitMode::Interrupt);
        assert!(a.config().idle);
        for bad in [
            &["--mode", "sometimes"][..],
            &["--coalesce", "7"],
            &["--coalesce", "300,1"],
            &["--async", "--reactor"],
            &["--idle", "--verify"],
        ] {
            let mut args = vec!["-q", "1", "-o", "4k", "-w", "randread", "-t", "1"];
            args.extend_from_slice(bad);
            assert!(parse(&args).is_err(), "{bad:?}");
        }
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
        ] {
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn spdk_perf_spellings() {
        let a = parse(&[
            "-q",
            "32",
            "-o",
            "4096",
            "-w",
            "randrw",
            "-M",
            "70",
            "-t",
            "1",
            "-r",
            "trtype:PCIe traddr:0000:04:00.0 ns:2",
            "-r",
            "TRTYPE=pcie TRADDR=AF:00.0",
            "-c",
            "0x5",
            "-P",
            "2",
            "-a",
            "0.5",
            "-LL",
            "-Q",
            "10",
            "-F",
            "1.1",
            "--spdk-format",
        ])
        .unwrap();
        assert!(a.targets.is_empty());
        assert_eq!(
            a.trids,
            [
                Trid {
                    traddr: "0000:04:00.0".into(),
                    ns: Some(2)
                },
                Trid {
                    traddr: "0000:af:00.0".into(),
                    ns: None
                },
            ]
        );
        let c = a.config();
        assert_eq!((c.threads, c.queues_per_thread), (2, 2));
        assert_eq!(c.cpus.as_ref().map(|c| c.cpus().to_vec()), Some(vec![0, 2]));
        assert_eq!(c.warmup, Duration::from_millis(500));
        assert_eq!(c.zipf, Some(1.1));
        assert!(c.latency_histogram && !c.stop_on_error);
        assert_eq!((a.latency_level, a.continue_on_error), (2, Some(10)));
        assert!(a.spdk_format);
        // Every controller's namespaces for a -r without ns, one for ns: or BDF/NSID.
        let w = requested(&a, &|| unreachable!()).unwrap();
        assert_eq!(
            w,
            [
                ("0000:04:00.0".to_string(), Which::One(2)),
                ("0000:af:00.0".to_string(), Which::All)
            ]
        );
        // The long spellings, and -L alone.
        let a = parse(&[
            "--io-depth",
            "4",
            "--io-size",
            "4k",
            "--io-pattern",
            "rw",
            "--rwmixread",
            "30",
            "--time",
            "1",
            "--warmup-time",
            "1",
            "--num-qpairs",
            "1",
            "--core-mask",
            "[1,3]",
            "-L",
            "0000:00:04.0",
        ])
        .unwrap();
        let c = a.config();
        assert_eq!((c.depth, c.io_size, c.read_percent()), (4, 4096, 30));
        assert_eq!(c.threads, 2);
        assert_eq!(a.latency_level, 1);
        assert!(c.latency_histogram);
        // -F 0 is SPDK's uniform.
        let a = parse(&[
            "0000:00:04.0",
            "-q",
            "1",
            "-o",
            "4k",
            "-w",
            "randread",
            "-t",
            "1",
            "-F",
            "0",
        ])
        .unwrap();
        assert_eq!(a.config().zipf, None);
        assert!(a.config().check().is_ok());
    }

    #[test]
    fn without_namespaces_every_vfio_controller_and_its_namespaces() {
        let a = parse(&["-q", "1", "-o", "4k", "-w", "read", "-t", "1"]).unwrap();
        let w = requested(&a, &|| {
            Ok(vec!["0000:00:04.0".into(), "0000:00:05.0".into()])
        })
        .unwrap();
        assert_eq!(
            w,
            [
                ("0000:00:04.0".to_string(), Which::All),
                ("0000:00:05.0".to_string(), Which::All)
            ]
        );
        let e = requested(&a, &|| Ok(Vec::new())).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(e.to_string().contains("rnvme setup"), "{e}");
        // Reading them all is fine; writing them all needs --yes, and naming one does not.
        check_implicit_writes(&a, &a.config(), &w).unwrap();
        let line = |s: String| parse(&s.split_whitespace().collect::<Vec<_>>()).unwrap();
        for workload in ["write", "randwrite", "rw", "randrw"] {
            let a = line(format!("-q 1 -o 4k -w {workload} -t 1"));
            let e = check_implicit_writes(&a, &a.config(), &w).unwrap_err();
            let u = e.downcast_ref::<UsageError>().expect("a usage error");
            assert!(
                u.0.contains("(0000:00:04.0, 0000:00:05.0): name the namespaces, or add --yes"),
                "{workload}: {u}"
            );
            for allowed in ["--yes", "0000:00:04.0"] {
                let a = line(format!("{allowed} -q 1 -o 4k -w {workload} -t 1"));
                check_implicit_writes(&a, &a.config(), &w).unwrap();
            }
        }
        // Given ones come first, then -r, and the bound ones are not added.
        let a = parse(&[
            "0000:00:06.0/3",
            "-r",
            "traddr:0000:00:04.0 ns:1",
            "-q",
            "1",
            "-o",
            "4k",
            "-w",
            "read",
            "-t",
            "1",
        ])
        .unwrap();
        let w = requested(&a, &|| unreachable!()).unwrap();
        assert_eq!(
            w,
            [
                ("0000:00:06.0".to_string(), Which::One(3)),
                ("0000:00:04.0".to_string(), Which::One(1))
            ]
        );
    }

    #[test]
    fn transport_ids_and_core_masks() {
        for (bad, why) in [
            ("trtype:TCP traddr:10.0.0.1", "PCIe controllers only"),
            ("trtype:PCIe", "names no traddr"),
            ("traddr:0000:04:00.0 ns:0", "not a namespace id"),
            (
                "traddr:0000:04:00.0 subnqn:x",
                "takes the keys trtype, traddr and ns",
            ),
            ("traddr:4:0.0", "is not a PCI address"),
            ("traddr", "is not KEY:VALUE"),
        ] {
            let e = trid_arg(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let cpus = |s: &str| core_mask_arg(s).map(|c| c.cpus().to_vec());
        assert_eq!(cpus("0x1"), Ok(vec![0]));
        assert_eq!(cpus("3"), Ok(vec![0, 1]));
        assert_eq!(cpus("0xF0"), Ok(vec![4, 5, 6, 7]));
        assert_eq!(cpus("0x100000001"), Ok(vec![0, 32]));
        assert_eq!(cpus("[0-2,5]"), Ok(vec![0, 1, 2, 5]));
        assert!(cpus("0x0").unwrap_err().contains("names no core"));
        assert!(cpus("0xg").unwrap_err().contains("not hexadecimal"));
        // A core past the last possible CPU, or more cores than threads may be: the mask's
        // own error, before anything runs.
        let far = format!("0x1{}", "0".repeat(300));
        assert!(cpus(&far)
            .unwrap_err()
            .contains("beyond the last possible CPU"));
        let wide = format!("0x{}", "f".repeat(72));
        assert!(cpus(&wide)
            .unwrap_err()
            .contains("names 288 cores: at most 256"));
        assert_eq!(
            cpus(&format!("0x{}", "f".repeat(64))).map(|c| c.len()),
            Ok(256)
        );
        // Queue depths the specification cannot have are refused when parsed.
        for q in ["0", "65537", "4294967295"] {
            let mut a = vec!["0000:00:04.0", "-o", "4k", "-w", "read", "-t", "1", "-q"];
            a.push(q);
            let e = parse(&a).unwrap_err().to_string();
            assert!(e.contains("not in 1..=65536"), "-q {q}: {e}");
        }
        // -c cannot be given with --threads or --cpus, -Q not with --stop-on-error, nor 0.
        let base = [
            "0000:00:04.0",
            "-q",
            "1",
            "-o",
            "4k",
            "-w",
            "read",
            "-t",
            "1",
        ];
        for extra in [
            &["-c", "0x3", "--threads", "2"][..],
            &["-c", "0x3", "--cpus", "0"],
            &["-Q", "1", "--stop-on-error"],
            &["-Q", "0"],
            &["--json", "--spdk-format"],
        ] {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            assert_eq!(parse(&v).unwrap_err().exit_code(), 2, "{extra:?}");
        }
    }

    #[test]
    fn argument_errors_become_usage_errors() {
        let mut a = parse(&[
            "0000:00:04.0",
            "-q",
            "1",
            "-o",
            "4096",
            "-w",
            "read",
            "-t",
            "1",
        ])
        .unwrap();
        // (The command line refuses -q 0 itself; the configuration checks it too.)
        a.depth = 0;
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
