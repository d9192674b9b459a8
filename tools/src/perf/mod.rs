//! The engine behind `rnvme perf`: a throughput and latency benchmark of the userspace driver.
//!
//! [`run`] takes controllers that are already up ([`Target`]), so it runs as well on the
//! in-process controller model as on a device. Each of `threads` worker threads gets its own
//! `queues_per_thread` I/O queue pairs per namespace and keeps `depth` I/Os in flight on each
//! namespace; buffers come from the controller's DMA pool and are allocated before the clock
//! starts; a worker queues every command it can, rings each doorbell once per loop turn, and
//! takes one clock reading per poll that reaped anything. With [`PerfConfig::reactor`] the
//! queue pairs belong to one reactor thread instead and the workers send their commands to it
//! over a channel, so the cost of cross-thread submission can be measured against direct use.
//!
//! I/Os above the controller's largest transfer are split by the driver's
//! [`split_transfer`]; an I/O completes when all its commands have.
//!
//! Writes stamp every LBA they write: its first 8 bytes hold the LBA (little-endian), the next
//! 8 bytes [`STAMP_MAGIC`]. A later read with [`PerfConfig::verify`] checks the stamps, so a
//! write workload can be read back and checked.

mod engine;
pub mod fssig;
pub mod gen;
pub mod report;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rnvme_driver::affinity::CpuList;
use rnvme_driver::controller::Controller;
use rnvme_driver::identify::{DataLayout, NamespaceInfo};
use rnvme_driver::io::{split_transfer, Piece};
use rnvme_driver::irq::WaitMode;
use rnvme_driver::spec::MAX_NLB;

pub use fssig::Signature;
pub use report::PerfReport;

/// The most worker threads a run may have.
pub const MAX_THREADS: u32 = 256;

/// The second 8 bytes of every LBA a perf write workload writes ("rnvmperf" in ASCII,
/// little-endian). The first 8 hold the LBA.
pub const STAMP_MAGIC: u64 = u64::from_le_bytes(*b"rnvmperf");

/// The access pattern.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential mix of reads and writes.
    Rw,
    /// Random mix.
    RandRw,
}

impl Pattern {
    /// Every pattern, in the order `--help` lists them.
    pub const ALL: [Pattern; 6] = [
        Pattern::Read,
        Pattern::Write,
        Pattern::RandRead,
        Pattern::RandWrite,
        Pattern::Rw,
        Pattern::RandRw,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Rw => "rw",
            Pattern::RandRw => "randrw",
        }
    }

    /// Random offsets (else sequential).
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw
        )
    }

    /// A mix of reads and writes.
    pub fn is_mix(self) -> bool {
        matches!(self, Pattern::Rw | Pattern::RandRw)
    }

    /// Writes anything.
    pub fn writes(self) -> bool {
        !matches!(self, Pattern::Read | Pattern::RandRead)
    }

    /// Reads anything.
    pub fn reads(self) -> bool {
        !matches!(self, Pattern::Write | Pattern::RandWrite)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Pattern, String> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown workload {s:?}: one of {}",
                    Pattern::ALL.map(Pattern::name).join(", ")
                )
            })
    }
}

/// An LBA range: `START:LBAS` on the command line.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LbaRange {
    /// First LBA.
    pub start: u64,
    /// Number of LBAs.
    pub lbas: u64,
}

impl FromStr for LbaRange {
    type Err = String;
    fn from_str(s: &str) -> Result<LbaRange, String> {
        let (a, b) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not START:LBAS (such as 0:262144)"))?;
        let start = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: START {a:?} is not an LBA number"))?;
        let lbas: u64 = b
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: LBAS {b:?} is not a number of LBAs"))?;
        if lbas == 0 {
            return Err(format!("{s:?}: the range must hold at least one LBA"));
        }
        Ok(LbaRange { start, lbas })
    }
}

/// A byte size: `4096`, `4k`, `128K`, `128KiB`, `1m`, `1MiB`.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = [
        ("kib", 1u64 << 10),
        ("k", 1 << 10),
        ("mib", 1 << 20),
        ("m", 1 << 20),
    ]
    .into_iter()
    .find_map(|(suffix, m)| lower.strip_suffix(suffix).map(|n| (n.to_string(), m)))
    .unwrap_or((lower.clone(), 1));
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes (such as 4096, 4k or 1m)"))?;
    n.checked_mul(mult)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("{s:?} is too large: at most 4 GiB - 1"))
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct PerfConfig {
    /// Access pattern.
    pub pattern: Pattern,
    /// Share of reads for [`Pattern::Rw`] and [`Pattern::RandRw`] (`None`: 50).
    pub read_percent: Option<u8>,
    /// Bytes per I/O: a multiple of each namespace's LBA size.
    pub io_size: u32,
    /// I/Os in flight per thread and namespace.
    pub depth: u32,
    /// Measured time.
    pub duration: Duration,
    /// Time run before measuring.
    pub warmup: Duration,
    /// Worker threads.
    pub threads: u32,
    /// Queue pairs per thread and namespace (with a reactor: per namespace, all owned by it).
    pub queues_per_thread: u32,
    /// LBAs to use (default: the whole namespace).
    pub range: Option<LbaRange>,
    /// Zipf exponent for random offsets (default: uniform).
    pub zipf: Option<f64>,
    /// Force Unit Access on writes.
    pub fua: bool,
    /// Send I/O through a reactor thread.
    pub reactor: bool,
    /// With `reactor`: complete each I/O on the reactor thread, in a
    /// [`Completer`](rnvme_driver::reactor::Completer) shared by the worker's requests that
    /// sends the slot's next I/O straight into the reactor, instead of answering the worker
    /// thread over a channel (measures the reactor without the cost of waking another thread).
    pub reactor_callbacks: bool,
    /// CPUs to pin the worker threads to, in turn (worker `t` on the `t mod n`-th); a reactor
    /// runs on the first. `None`: wherever the scheduler puts them.
    pub cpus: Option<CpuList>,
    /// With `reactor`: the CPU of the reactor thread (`None`: the first of `cpus`, if any).
    pub reactor_cpu: Option<usize>,
    /// Check that every block read carries the stamp of its LBA.
    pub verify: bool,
    /// Stop every thread at the first failed command.
    pub stop_on_error: bool,
    /// Percentiles in the report.
    pub latency_histogram: bool,
    /// Seed of the offset and read/write choices.
    pub seed: u64,
    /// Use shadow doorbells where the controller offers them.
    pub shadow_doorbells: bool,
    /// Ring at every submission instead of once per batch.
    pub ring_each: bool,
    /// fio's `thinktime`: how long a worker waits (busy, like `thinktime_spin`) after an I/O
    /// completes before it submits the slot's next one. Direct queue pairs only.
    pub thinktime: Duration,
    /// How the workers wait for completions (direct workers; a reactor polls).
    pub wait: WaitMode,
    /// Through the async API: each worker runs a tokio runtime and drives its I/O as futures.
    pub async_api: bool,
    /// Submit nothing: wait on the queue pairs for the run's time.
    pub idle: bool,
}

impl Default for PerfConfig {
    fn default() -> Self {
        PerfConfig {
            pattern: Pattern::RandRead,
            read_percent: None,
            io_size: 4096,
            depth: 32,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            threads: 1,
            queues_per_thread: 1,
            range: None,
            zipf: None,
            fua: false,
            reactor: false,
            reactor_callbacks: false,
            cpus: None,
            reactor_cpu: None,
            verify: false,
            stop_on_error: false,
            latency_histogram: false,
            seed: 1,
            shadow_doorbells: true,
            ring_each: false,
            thinktime: Duration::ZERO,
            wait: WaitMode::Polled,
            async_api: false,
            idle: false,
        }
    }
}

impl PerfConfig {
    /// The share of reads, %.
    pub fn read_percent(&self) -> u8 {
        match self.pattern {
            Pattern::Read | Pattern::RandRead => 100,
            Pattern::Write | Pattern::RandWrite => 0,
            Pattern::Rw | Pattern::RandRw => self.read_percent.unwrap_or(50),
        }
    }

    fn info(&self) -> report::WorkloadInfo {
        report::WorkloadInfo {
            pattern: self.pattern.name().into(),
            io_size: self.io_size,
            depth: self.depth,
            read_percent: self.read_percent(),
            threads: self.threads,
            queues_per_thread: self.queues_per_thread,
            duration_s: self.duration.as_secs_f64(),
            warmup_s: self.warmup.as_secs_f64(),
            zipf: self.zipf,
            fua: self.fua,
            reactor: self.reactor,
            reactor_callbacks: self.reactor_callbacks,
            cpus: self.cpus.as_ref().map(|c| c.to_string()),
            reactor_cpu: self.reactor.then(|| self.reactor_cpu()).flatten(),
            verify: self.verify,
            seed: self.seed,
            shadow_doorbells: self.shadow_doorbells,
            ring_each: self.ring_each,
            thinktime_us: self.thinktime.as_micros() as u64,
            mode: self.wait.name().into(),
            spin_us: match self.wait {
                WaitMode::Hybrid { spin } => Some(spin.as_micros() as u64),
                _ => None,
            },
            async_api: self.async_api,
            idle: self.idle,
        }
    }

    /// The CPU the reactor runs on: `reactor_cpu`, else the first of `cpus`, else anywhere.
    pub fn reactor_cpu(&self) -> Option<usize> {
        self.reactor_cpu
            .or_else(|| self.cpus.as_ref().map(|c| c.cpus()[0]))
    }

    /// Checks that need no device.
    pub fn check(&self) -> Result<(), PerfError> {
        let bad = |m: String| Err(PerfError::Invalid(m));
        if self.depth == 0 {
            return bad("the queue depth (-q) must be at least 1".into());
        }
        if self.io_size == 0 || !self.io_size.is_multiple_of(512) {
            return bad(format!(
                "the I/O size (-o) {} is not a positive multiple of 512 bytes, the smallest LBA size",
                self.io_size
            ));
        }
        if self.duration.is_zero() {
            return bad("the run time (-t) must be above zero".into());
        }
        if !self.thinktime.is_zero() && (self.reactor || self.async_api) {
            return bad(
                "--thinktime-us works with the worker's own queue pairs: not with --reactor or --async"
                    .into(),
            );
        }
        if self.thinktime > Duration::from_secs(1) {
            return bad(format!(
                "--thinktime-us {} is over a second",
                self.thinktime.as_micros()
            ));
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return bad(format!(
                "--threads {} is outside 1 to {MAX_THREADS}",
                self.threads
            ));
        }
        if self.queues_per_thread == 0 || self.queues_per_thread > 64 {
            return bad(format!(
                "--queues-per-thread {} is outside 1 to 64",
                self.queues_per_thread
            ));
        }
        let in_flight = if self.reactor {
            self.depth as u64 * self.threads as u64
        } else {
            self.depth as u64
        };
        if in_flight < self.queues_per_thread as u64 {
            return bad(format!(
                "a depth of {} cannot keep {} queue pairs busy: give -q {} or more, or fewer --queues-per-thread",
                self.depth, self.queues_per_thread, self.queues_per_thread
            ));
        }
        if let Some(p) = self.read_percent {
            if !self.pattern.is_mix() {
                return bad(format!(
                    "-M (read share) applies to the rw and randrw workloads, not {}",
                    self.pattern
                ));
            }
            if p > 100 {
                return bad(format!("-M {p} is not a percentage (0 to 100)"));
            }
        }
        if let Some(z) = self.zipf {
            if !self.pattern.is_random() {
                return bad(format!(
                    "--zipf applies to random workloads (randread, randwrite, randrw), not {}",
                    self.pattern
                ));
            }
            if !(z.is_finite() && z > 0.0) {
                return bad(format!(
                    "--zipf {z} is not a positive exponent (such as 0.8 or 1.2)"
                ));
            }
        }
        if self.fua && !self.pattern.writes() {
            return bad(format!(
                "--fua applies to writes; {} only reads",
                self.pattern
            ));
        }
        if let Some(c) = &self.cpus {
            if c.cpus().is_empty() {
                return bad("--cpus names no CPU".into());
            }
        }
        if self.reactor_callbacks && !self.reactor {
            return bad("--callbacks applies to --reactor runs".into());
        }
        if self.reactor_cpu.is_some() && !self.reactor {
            return bad("--reactor-cpu applies to --reactor runs".into());
        }
        let sleeps = self.wait.needs_interrupts();
        if sleeps && self.reactor {
            return bad(format!(
                "--mode {}: the reactor polls its queue pairs; interrupt and hybrid modes are \
                 for direct workers and --async",
                self.wait.name()
            ));
        }
        if (sleeps || self.async_api) && self.queues_per_thread > 1 {
            return bad(format!(
                "{} waits on one queue pair per thread: give -P 1",
                if self.async_api {
                    "--async"
                } else {
                    "--mode interrupt/hybrid"
                }
            ));
        }
        if self.verify && !self.pattern.reads() {
            return bad(format!(
                "--verify checks reads; {} only writes",
                self.pattern
            ));
        }
        Ok(())
    }
}

/// A namespace to run on.
#[derive(Clone)]
pub struct Target {
    /// Its controller, brought up.
    pub ctrl: Controller,
    /// The namespace.
    pub nsid: u32,
}

impl Target {
    /// `BDF/nsid`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.ctrl.name(), self.nsid)
    }
}

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// The arguments do not fit the device (or each other).
    #[error("{0}")]
    Invalid(String),
    /// The driver failed.
    #[error("{target}: {source}")]
    Device {
        /// BDF/nsid.
        target: String,
        /// What failed.
        #[source]
        source: rnvme_driver::Error,
    },
    /// The run broke down (a controller that stopped answering, a thread that died).
    #[error("{0}")]
    Run(String),
}

impl PerfError {
    fn device(target: &str, source: rnvme_driver::Error) -> PerfError {
        PerfError::Device {
            target: target.to_string(),
            source,
        }
    }
}

/// The limits of one controller that a plan must respect.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries per I/O queue (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// Largest transfer of one command in bytes (the driver's bound, MDTS included).
    pub max_transfer: u32,
    /// I/O queue pairs granted.
    pub io_queues: u16,
}

impl Limits {
    /// The limits of `ctrl`.
    pub fn of(ctrl: &Controller) -> Limits {
        Limits {
            max_queue_entries: ctrl.max_queue_entries(),
            max_transfer: ctrl.max_transfer_bytes(),
            io_queues: ctrl.io_queues_granted(),
        }
    }
}

/// What the engine works out for one namespace before the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPlan {
    /// BDF/nsid.
    pub label: String,
    /// Namespace.
    pub nsid: u32,
    /// Its LBA size.
    pub lba_size: u32,
    /// How its blocks move: bytes of the data buffer and of the separate metadata buffer
    /// per LBA (an extended-LBA format carries each block's metadata in the data).
    pub layout: DataLayout,
    /// Bytes per I/O.
    pub io_size: u32,
    /// LBAs per I/O.
    pub blocks_per_io: u32,
    /// The commands of one I/O, relative to its first LBA and its buffer.
    pub pieces: Vec<Piece>,
    /// The LBAs used.
    pub range: LbaRange,
    /// I/O-sized slots in the range.
    pub slots: u64,
    /// Entries of each queue pair.
    pub queue_entries: u32,
    /// Queue pairs this namespace needs on its controller.
    pub queue_pairs: u32,
}

/// Plan one namespace: the checks that need its size and its controller's limits.
pub fn plan_target(
    cfg: &PerfConfig,
    label: &str,
    ns: &NamespaceInfo,
    limits: &Limits,
) -> Result<TargetPlan, PerfError> {
    let bad = |m: String| Err(PerfError::Invalid(format!("{label}: {m}")));
    let lba = ns.lba_size;
    if !cfg.io_size.is_multiple_of(lba) {
        return bad(format!(
            "the I/O size (-o) {} is not a multiple of the namespace's {lba}-byte LBA size",
            cfg.io_size
        ));
    }
    let blocks = cfg.io_size / lba;
    let layout = match ns.layout() {
        Ok(l) => l,
        Err(why) => return bad(why),
    };
    let stride = layout.data_per_lba;
    let range = cfg.range.unwrap_or(LbaRange {
        start: 0,
        lbas: ns.size_lbas,
    });
    if range
        .start
        .checked_add(range.lbas)
        .is_none_or(|end| end > ns.size_lbas)
    {
        return bad(format!(
            "the range {}:{} (LBAs {} to {}) is beyond the namespace, which has {} LBAs (0 to {})",
            range.start,
            range.lbas,
            range.start,
            range.start.saturating_add(range.lbas).saturating_sub(1),
            ns.size_lbas,
            ns.size_lbas.saturating_sub(1)
        ));
    }
    if range.lbas < blocks as u64 {
        return bad(format!(
            "the range of {} LBAs cannot hold one I/O of {blocks} LBAs ({} bytes)",
            range.lbas, cfg.io_size
        ));
    }
    let max_transfer = (limits.max_transfer as u64).min(MAX_NLB as u64 * stride as u64) as u32;
    let pieces: Vec<Piece> = split_transfer(0, blocks as u64, stride, max_transfer).collect();
    let q = cfg.queues_per_thread;
    let per_queue = if cfg.reactor {
        cfg.threads as u64 * (cfg.depth as u64).div_ceil(q as u64)
    } else {
        (cfg.depth as u64).div_ceil(q as u64)
    };
    let entries = per_queue * pieces.len() as u64 + 1;
    if entries > limits.max_queue_entries as u64 {
        let per_cmd = pieces.len() as u64;
        let most = (limits.max_queue_entries as u64 - 1) / per_cmd;
        let depth_hint = if cfg.reactor {
            most * q as u64 / cfg.threads as u64
        } else {
            most * q as u64
        };
        return bad(format!(
            "queue depth {} needs {entries} entries per queue pair ({per_queue} I/Os of {per_cmd} command(s) each, plus one), \
             but the controller allows at most {} (CAP.MQES + 1): use -q {} or less, or more --queues-per-thread",
            cfg.depth,
            limits.max_queue_entries,
            depth_hint.max(1)
        ));
    }
    let queue_pairs = if cfg.reactor { q } else { q * cfg.threads };
    Ok(TargetPlan {
        label: label.to_string(),
        nsid: ns.nsid,
        lba_size: lba,
        layout,
        io_size: cfg.io_size,
        blocks_per_io: blocks,
        slots: range.lbas / blocks as u64,
        pieces,
        range,
        queue_entries: entries.max(2) as u32,
        queue_pairs,
    })
}

/// Plan every target, checking also that each controller has the queue pairs they need.
pub fn plan(targets: &[Target], cfg: &PerfConfig) -> Result<Vec<TargetPlan>, PerfError> {
    cfg.check()?;
    if targets.is_empty() {
        return Err(PerfError::Invalid("no namespace to run on".into()));
    }
    if (cfg.wait.needs_interrupts() || cfg.async_api) && targets.len() > 1 {
        return Err(PerfError::Invalid(format!(
            "{} waits on one queue pair per thread: give one namespace ({} given)",
            if cfg.async_api {
                "--async"
            } else {
                "--mode interrupt/hybrid"
            },
            targets.len()
        )));
    }
    let mut plans = Vec::new();
    let mut per_ctrl: BTreeMap<String, (u32, u16)> = BTreeMap::new();
    for t in targets {
        let label = t.label();
        if plans.iter().any(|p: &TargetPlan| p.label == label) {
            return Err(PerfError::Invalid(format!("{label} is given twice")));
        }
        let ns = t
            .ctrl
            .namespace(t.nsid)
            .map_err(|e| PerfError::Invalid(e.to_string()))?;
        let limits = Limits::of(&t.ctrl);
        let p = plan_target(cfg, &label, ns, &limits)?;
        let e = per_ctrl
            .entry(t.ctrl.name().to_string())
            .or_insert((0, limits.io_queues));
        e.0 += p.queue_pairs;
        plans.push(p);
    }
    for (name, (need, granted)) in per_ctrl {
        if need > granted as u32 {
            return Err(PerfError::Invalid(format!(
                "{name}: the run needs {need} I/O queue pairs (threads x queues per thread x namespaces), \
                 but the controller granted {granted}: use fewer --threads or --queues-per-thread"
            )));
        }
    }
    Ok(plans)
}

/// Progress, once a second.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Since the start (warm-up included).
    pub elapsed: Duration,
    /// Warm-up plus measured time.
    pub total: Duration,
    /// Still in the warm-up.
    pub warming_up: bool,
    /// I/Os per second over the last second.
    pub iops: f64,
    /// MiB per second over the last second.
    pub mib_s: f64,
    /// Failed commands so far.
    pub errors: u64,
}

/// Run `cfg` on `targets`; `progress` is called about once a second from the calling thread.
pub fn run(
    targets: &[Target],
    cfg: &PerfConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PerfReport, PerfError> {
    let plans = plan(targets, cfg)?;
    engine::execute(
        &engine::Ctx {
            targets,
            plans: &plans,
            cfg,
            rate: rnvme_driver::reactor::TickRate::calibrate(Duration::from_millis(50)),
        },
        progress,
    )
}

/// The file system and partition table signatures in the first blocks of `target`.
pub fn find_signatures(target: &Target) -> Result<Vec<Signature>, PerfError> {
    let label = target.label();
    let ns = target
        .ctrl
        .namespace(target.nsid)
        .map_err(|e| PerfError::Invalid(e.to_string()))?
        .clone();
    let want = (fssig::PROBE_BYTES as u64).min(ns.size_bytes());
    let blocks = want / ns.lba_size as u64;
    if blocks == 0 {
        return Ok(Vec::new());
    }
    let entries = target.ctrl.max_queue_entries().min(64);
    let mut qp = target
        .ctrl
        .create_io_qpair(entries)
        .map_err(|e| PerfError::device(&label, e))?;
    let buf = target
        .ctrl
        .alloc((blocks * ns.lba_size as u64) as usize)
        .map_err(|e| PerfError::device(&label, e))?;
    qp.read(ns.nsid, 0, blocks, &buf)
        .map_err(|e| PerfError::device(&label, e))?;
    Ok(fssig::detect(&buf.to_vec(), ns.lba_size))
}

#[cfg(test)]
mod tests;
