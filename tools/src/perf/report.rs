//! Counting during a run, and the result: per thread and namespace, per namespace, in total;
//! as a table for people and as JSON for programs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The percentiles `--latency-histogram` shows.
pub const PERCENTILES: [f64; 9] = [1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99];

/// Highest latency the histogram tells apart (longer ones count as this): 100 s.
const HIST_MAX_NS: u64 = 100_000_000_000;

/// The percentiles fio reports by default, which the `read` and `write` objects carry.
pub const FIO_PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// The fractions SPDK perf's `-L` prints the latency at.
pub const SPDK_CUTOFFS: [f64; 15] = [
    0.01, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 0.999999,
    0.9999999,
];

/// What one thread counted for one namespace in one direction (reads or writes). Updated on
/// the I/O path: no allocation, no lock.
#[derive(Clone, Debug)]
pub struct DirAcc {
    /// I/Os that completed successfully inside the measured window.
    pub ios: u64,
    /// Bytes they moved.
    pub bytes: u64,
    lat_sum_ns: u128,
    lat_sq_sum_ns: u128,
    lat_min_ns: u64,
    lat_max_ns: u64,
    hist: Histogram<u64>,
}

impl Default for DirAcc {
    fn default() -> Self {
        DirAcc::new()
    }
}

impl DirAcc {
    /// Nothing counted yet.
    pub fn new() -> DirAcc {
        DirAcc {
            ios: 0,
            bytes: 0,
            lat_sum_ns: 0,
            lat_sq_sum_ns: 0,
            lat_min_ns: u64::MAX,
            lat_max_ns: 0,
            hist: Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds"),
        }
    }

    #[inline]
    fn record(&mut self, lat_ns: u64, bytes: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.lat_sum_ns += lat_ns as u128;
        self.lat_sq_sum_ns += (lat_ns as u128) * (lat_ns as u128);
        self.lat_min_ns = self.lat_min_ns.min(lat_ns);
        self.lat_max_ns = self.lat_max_ns.max(lat_ns);
        self.hist.saturating_record(lat_ns.max(1));
    }

    fn reset(&mut self) {
        self.ios = 0;
        self.bytes = 0;
        self.lat_sum_ns = 0;
        self.lat_sq_sum_ns = 0;
        self.lat_min_ns = u64::MAX;
        self.lat_max_ns = 0;
        self.hist.reset();
    }

    fn merge(&mut self, o: &DirAcc) {
        self.ios += o.ios;
        self.bytes += o.bytes;
        self.lat_sum_ns += o.lat_sum_ns;
        self.lat_sq_sum_ns += o.lat_sq_sum_ns;
        self.lat_min_ns = self.lat_min_ns.min(o.lat_min_ns);
        self.lat_max_ns = self.lat_max_ns.max(o.lat_max_ns);
        self.hist
            .add(&o.hist)
            .expect("histograms of equal bounds merge");
    }

    fn mean_ns(&self) -> f64 {
        if self.ios == 0 {
            0.0
        } else {
            self.lat_sum_ns as f64 / self.ios as f64
        }
    }

    /// Population standard deviation of the latencies, ns (fio's stddev).
    fn stddev_ns(&self) -> f64 {
        if self.ios == 0 {
            return 0.0;
        }
        let n = self.ios as f64;
        let mean = self.mean_ns();
        (self.lat_sq_sum_ns as f64 / n - mean * mean)
            .max(0.0)
            .sqrt()
    }

    fn min_ns(&self) -> u64 {
        if self.ios == 0 {
            0
        } else {
            self.lat_min_ns
        }
    }

    fn percentile_ns(&self, p: f64) -> u64 {
        if self.ios == 0 {
            0
        } else {
            self.hist.value_at_quantile(p / 100.0)
        }
    }

    /// The histogram's buckets that hold I/Os, as (from µs, to µs, I/Os, cumulative %): the
    /// layout of SPDK perf's `-LL`.
    pub fn buckets(&self) -> Vec<(f64, f64, u64, f64)> {
        let mut out = Vec::new();
        let mut so_far = 0u64;
        let mut from = 0u64;
        for v in self.hist.iter_recorded() {
            let count = v.count_since_last_iteration();
            so_far += count;
            let to = self.hist.highest_equivalent(v.value_iterated_to());
            out.push((
                from as f64 / 1000.0,
                to as f64 / 1000.0,
                count,
                100.0 * so_far as f64 / self.ios.max(1) as f64,
            ));
            from = to + 1;
        }
        out
    }
}

/// What one thread counted for one namespace: reads and writes apart.
#[derive(Clone, Debug, Default)]
pub struct Acc {
    /// Reads.
    pub read: DirAcc,
    /// Writes.
    pub write: DirAcc,
    /// Commands that completed with an error status (over the whole run, warm-up included).
    pub errors: u64,
    /// Reads whose data did not carry the stamp of their LBA (`--verify`).
    pub verify_errors: u64,
}

impl Acc {
    /// Nothing counted yet.
    pub fn new() -> Acc {
        Acc::default()
    }

    /// One I/O of `bytes` that took `lat_ns`.
    #[inline]
    pub fn record(&mut self, lat_ns: u64, bytes: u64, read: bool) {
        if read {
            self.read.record(lat_ns, bytes);
        } else {
            self.write.record(lat_ns, bytes);
        }
    }

    /// I/Os counted, reads and writes.
    pub fn ios(&self) -> u64 {
        self.read.ios + self.write.ios
    }

    /// Forget the I/Os counted so far (the end of the warm-up); errors stay counted.
    pub fn reset_window(&mut self) {
        self.read.reset();
        self.write.reset();
    }

    /// Add another accumulator's counts.
    pub fn merge(&mut self, o: &Acc) {
        self.read.merge(&o.read);
        self.write.merge(&o.write);
        self.errors += o.errors;
        self.verify_errors += o.verify_errors;
    }

    /// Reads and writes together.
    pub fn both(&self) -> DirAcc {
        let mut d = self.read.clone();
        d.merge(&self.write);
        d
    }
}

/// Latency summary in microseconds.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Latency {
    /// Mean (exact).
    pub avg: f64,
    /// Fastest (exact).
    pub min: f64,
    /// Slowest (exact).
    pub max: f64,
    /// Median (histogram, 3 significant digits).
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

/// Latency in nanoseconds, shaped like fio's `lat_ns`.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct FioLatency {
    /// Fastest.
    pub min: u64,
    /// Slowest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub stddev: f64,
    /// Samples.
    #[serde(rename = "N")]
    pub n: u64,
    /// fio's percentiles ("99.000000" → ns), when there are samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percentile: Option<BTreeMap<String, u64>>,
}

/// One direction's figures, shaped like fio's `read` and `write` objects.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct FioDir {
    /// Bytes moved.
    pub io_bytes: u64,
    /// KiB per second.
    pub bw: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// I/Os per second.
    pub iops: f64,
    /// Measured time, ms.
    pub runtime: u64,
    /// I/Os completed.
    pub total_ios: u64,
    /// Latency, submission to completion.
    pub lat_ns: FioLatency,
}

impl FioDir {
    /// The figures of `d` over `elapsed`.
    pub fn new(d: &DirAcc, elapsed: Duration) -> FioDir {
        let secs = elapsed.as_secs_f64();
        let rate = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
        FioDir {
            io_bytes: d.bytes,
            bw: rate(d.bytes as f64 / 1024.0),
            bw_bytes: rate(d.bytes as f64),
            iops: rate(d.ios as f64),
            runtime: elapsed.as_millis() as u64,
            total_ios: d.ios,
            lat_ns: FioLatency {
                min: d.min_ns(),
                max: d.lat_max_ns,
                mean: d.mean_ns(),
                stddev: d.stddev_ns(),
                n: d.ios,
                percentile: (d.ios > 0).then(|| {
                    FIO_PERCENTILES
                        .iter()
                        .map(|&p| (format!("{p:.6}"), d.percentile_ns(p)))
                        .collect()
                }),
            },
        }
    }

    /// MiB per second.
    pub fn mib_s(&self) -> f64 {
        self.bw_bytes / (1 << 20) as f64
    }
}

/// Rates and latencies of a set of I/Os.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Summary {
    /// I/Os per second.
    pub iops: f64,
    /// MiB (2^20 bytes) per second.
    pub mib_s: f64,
    /// Latency, µs.
    pub lat_us: Latency,
    /// I/Os completed successfully in the measured window.
    pub ios: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Commands that failed.
    pub errors: u64,
    /// Reads whose data did not match (`--verify`).
    pub verify_errors: u64,
    /// With `--latency-histogram`: percentile (as text, "99.9") → µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percentiles_us: Option<BTreeMap<String, f64>>,
    /// The reads alone, as fio reports them.
    pub read: FioDir,
    /// The writes alone, as fio reports them.
    pub write: FioDir,
    /// With `--latency-histogram`: the latency histogram's buckets (reads and writes), for
    /// SPDK's `-LL` layout.
    #[serde(skip)]
    pub buckets: Vec<(f64, f64, u64, f64)>,
    /// With `--latency-histogram`: (fraction, µs) at SPDK perf's cutoffs, for its `-L` layout.
    #[serde(skip)]
    pub cutoffs_us: Vec<(f64, f64)>,
    /// With `--latency-histogram`: the reads' and the writes' percentiles, as
    /// `percentiles_us` (the JSON has them in `read` and `write`, at fio's percentiles).
    #[serde(skip)]
    pub dir_percentiles_us: Option<[BTreeMap<String, f64>; 2]>,
}

impl Summary {
    /// The summary of `acc` over `elapsed`.
    pub fn new(acc: &Acc, elapsed: Duration, percentiles: bool) -> Summary {
        let both = acc.both();
        let secs = elapsed.as_secs_f64();
        let rate = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
        let us = |ns: u64| ns as f64 / 1000.0;
        let ours = |d: &DirAcc| -> BTreeMap<String, f64> {
            PERCENTILES
                .iter()
                .map(|&p| (percentile_name(p), us(d.percentile_ns(p))))
                .collect()
        };
        Summary {
            iops: rate(both.ios as f64),
            mib_s: rate(both.bytes as f64 / (1 << 20) as f64),
            lat_us: Latency {
                avg: both.mean_ns() / 1000.0,
                min: us(both.min_ns()),
                max: us(both.lat_max_ns),
                p50: us(both.percentile_ns(50.0)),
                p99: us(both.percentile_ns(99.0)),
                p999: us(both.percentile_ns(99.9)),
            },
            ios: both.ios,
            reads: acc.read.ios,
            writes: acc.write.ios,
            errors: acc.errors,
            verify_errors: acc.verify_errors,
            percentiles_us: percentiles.then(|| ours(&both)),
            dir_percentiles_us: percentiles.then(|| [ours(&acc.read), ours(&acc.write)]),
            read: FioDir::new(&acc.read, elapsed),
            write: FioDir::new(&acc.write, elapsed),
            buckets: if percentiles {
                both.buckets()
            } else {
                Vec::new()
            },
            cutoffs_us: if percentiles {
                SPDK_CUTOFFS
                    .iter()
                    .map(|&c| (c, us(both.percentile_ns(c * 100.0))))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// "1", "99.9", "99.99".
pub fn percentile_name(p: f64) -> String {
    let s = format!("{p}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// The workload, as run.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct WorkloadInfo {
    /// read, write, randread, randwrite, rw or randrw.
    pub pattern: String,
    /// Bytes per I/O.
    pub io_size: u32,
    /// I/Os in flight per thread and namespace.
    pub depth: u32,
    /// Share of reads, %.
    pub read_percent: u8,
    /// Threads.
    pub threads: u32,
    /// Queue pairs per thread and namespace (per namespace with a reactor).
    pub queues_per_thread: u32,
    /// Measured seconds asked for.
    pub duration_s: f64,
    /// Warm-up seconds.
    pub warmup_s: f64,
    /// Zipf exponent, if any.
    pub zipf: Option<f64>,
    /// Force Unit Access on writes.
    pub fua: bool,
    /// I/O through the cross-thread reactor.
    pub reactor: bool,
    /// Completions handled by callbacks on the reactor thread.
    pub reactor_callbacks: bool,
    /// CPUs the threads were pinned to (`0-1,4`), if they were.
    pub cpus: Option<String>,
    /// The CPU the reactor thread was pinned to, if there was a reactor and it was.
    pub reactor_cpu: Option<usize>,
    /// Reads checked against the LBA stamps.
    pub verify: bool,
    /// Seed of the offset generators.
    pub seed: u64,
    /// Shadow doorbells asked for (used where the controller offers them).
    pub shadow_doorbells: bool,
    /// Every submission rings (instead of once per batch).
    pub ring_each: bool,
    /// Wait after each completion before the next submission (fio's `thinktime`), µs.
    #[serde(default)]
    pub thinktime_us: u64,
    /// How the workers waited for completions: polled, interrupt or hybrid.
    pub mode: String,
    /// Hybrid mode's spin budget, µs.
    pub spin_us: Option<u64>,
    /// Through the async API.
    pub async_api: bool,
    /// Nothing submitted: the run only waited.
    pub idle: bool,
}

/// The process's CPU time over the measured window (from `getrusage`).
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct CpuUsage {
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub system_s: f64,
    /// CPU microseconds per I/O completed in the window (none in an idle run).
    pub per_io_us: Option<f64>,
    /// CPU seconds per wall-clock second: 1.0 is one core kept busy.
    pub busy_fraction: f64,
}

impl CpuUsage {
    /// From two readings of the process's (user, system) CPU time, the wall time between
    /// them and the I/Os completed meanwhile.
    pub fn between(before: (f64, f64), after: (f64, f64), wall_s: f64, ios: u64) -> CpuUsage {
        let user_s = (after.0 - before.0).max(0.0);
        let system_s = (after.1 - before.1).max(0.0);
        let cpu = user_s + system_s;
        CpuUsage {
            user_s,
            system_s,
            per_io_us: (ios > 0).then(|| cpu * 1e6 / ios as f64),
            busy_fraction: if wall_s > 0.0 { cpu / wall_s } else { 0.0 },
        }
    }
}

/// One namespace's result (in a thread, or over all threads).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct NsReport {
    /// BDF/nsid.
    pub target: String,
    /// PRP or SGL.
    pub data_pointer: String,
    /// First LBA and LBA count of the range used.
    pub range: (u64, u64),
    /// The numbers.
    #[serde(flatten)]
    pub summary: Summary,
}

/// One thread's result.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ThreadReport {
    /// Thread number.
    pub thread: usize,
    /// Seconds measured by this thread.
    pub elapsed_s: f64,
    /// Over its namespaces.
    #[serde(flatten)]
    pub summary: Summary,
    /// Per namespace.
    pub namespaces: Vec<NsReport>,
}

/// Queue pair and reactor counters over the run (warm-up and drain included).
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Commands submitted.
    pub submitted: u64,
    /// Completions reaped.
    pub completed: u64,
    /// Submission doorbell writes.
    pub sq_doorbells: u64,
    /// Completion doorbell writes.
    pub cq_doorbells: u64,
    /// Calls to poll.
    pub polls: u64,
    /// Calls to poll that found nothing.
    pub idle_polls: u64,
    /// Submission doorbell writes per command.
    pub sq_doorbells_per_cmd: f64,
    /// Completion doorbell writes per command.
    pub cq_doorbells_per_cmd: f64,
    /// Submission tails written to shadow doorbells (0 without them).
    pub sq_shadow_writes: u64,
    /// Completion heads written to shadow doorbells.
    pub cq_shadow_writes: u64,
    /// Completions per poll that found any.
    pub completions_per_busy_poll: f64,
    /// Interrupt and hybrid modes: sleeps on the interrupt vector, sleeps an interrupt ended,
    /// and interrupts taken (by the waits or an async reaper); maskings and unmaskings of the
    /// vectors (hybrid masks a vector while polling finds its completions).
    pub sleeps: u64,
    pub wakeups: u64,
    pub interrupts: u64,
    pub interrupt_masks: u64,
    /// With a reactor: requests it took, loop turns that submitted, most commands in one turn,
    /// times it slept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reactor: Option<ReactorCounters>,
}

/// Reactor counters.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct ReactorCounters {
    /// Requests the reactor took: from the channel, and those its callbacks and completers
    /// sent on its thread (every command of the run).
    pub requests: u64,
    /// Loop turns that submitted.
    pub batches: u64,
    /// Largest batch.
    pub max_batch: u64,
    /// Times it slept on an empty channel.
    pub sleeps: u64,
    /// Client threads it woke (once per client and poll with answers for it).
    pub wakes: u64,
}

impl Counters {
    /// Add one queue pair's counters.
    pub fn add(&mut self, s: &rnvme_driver::queue::QueueStats) {
        self.submitted += s.submitted;
        self.completed += s.completed;
        self.sq_doorbells += s.sq_doorbells;
        self.cq_doorbells += s.cq_doorbells;
        self.polls += s.polls;
        self.idle_polls += s.idle_polls;
        self.sq_shadow_writes += s.sq_shadow_writes;
        self.cq_shadow_writes += s.cq_shadow_writes;
        self.sleeps += s.sleeps;
        self.wakeups += s.wakeups;
        self.interrupts += s.interrupts;
        self.interrupt_masks += s.interrupt_masks;
        self.sq_doorbells_per_cmd = ratio(self.sq_doorbells, self.submitted);
        self.cq_doorbells_per_cmd = ratio(self.cq_doorbells, self.submitted);
        self.completions_per_busy_poll = ratio(self.completed, self.polls - self.idle_polls);
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// A failed command (the first few are kept).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ErrorReport {
    /// Thread that saw it.
    pub thread: usize,
    /// BDF/nsid.
    pub target: String,
    /// "read" or "write".
    pub op: &'static str,
    /// First LBA of the command.
    pub lba: u64,
    /// LBAs.
    pub blocks: u32,
    /// What went wrong: the decoded status, or the data mismatch.
    pub error: String,
}

/// The whole result.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PerfReport {
    /// What ran.
    pub workload: WorkloadInfo,
    /// Seconds measured (the longest thread's).
    pub elapsed_s: f64,
    /// Over everything.
    #[serde(flatten)]
    pub total: Summary,
    /// Per thread.
    pub threads: Vec<ThreadReport>,
    /// Per namespace, over all threads.
    pub namespaces: Vec<NsReport>,
    /// Batching counters.
    pub counters: Counters,
    /// The first failed commands.
    pub first_errors: Vec<ErrorReport>,
    /// How the workers waited: polled, interrupt or hybrid (as in `workload`).
    pub mode: String,
    /// The process's CPU time over the measured window.
    pub cpu: CpuUsage,
}

impl PerfReport {
    /// Failed commands and data mismatches.
    pub fn error_count(&self) -> u64 {
        self.total.errors + self.total.verify_errors
    }

    /// The result as a table.
    pub fn table(&self, percentiles: bool) -> String {
        let w = &self.workload;
        let mut s = String::new();
        let mix = if matches!(w.pattern.as_str(), "rw" | "randrw") {
            format!(" ({}% reads)", w.read_percent)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{}{mix}, {} bytes, depth {}, {} thread(s) x {} queue pair(s){}{}, {:.1} s measured{}",
            w.pattern,
            w.io_size,
            w.depth,
            w.threads,
            w.queues_per_thread,
            match (w.reactor, w.reactor_callbacks) {
                (true, true) => " through a reactor (callbacks)",
                (true, false) => " through a reactor",
                _ => "",
            },
            w.cpus
                .as_ref()
                .map(|c| format!(" on CPUs {c}"))
                .unwrap_or_default()
                + &w.reactor_cpu
                    .map(|c| format!(", reactor on CPU {c}"))
                    .unwrap_or_default(),
            self.elapsed_s,
            if w.warmup_s > 0.0 {
                format!(" after {:.1} s warm-up", w.warmup_s)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "{:<7} {:<17} {:>4} {:>11} {:>10} {:>10} {:>10} {:>10} {:>7}",
            "thread", "namespace", "dptr", "IOPS", "MiB/s", "avg us", "min us", "max us", "errors"
        );
        let row = |s: &mut String, who: &str, target: &str, dptr: &str, m: &Summary| {
            let _ = writeln!(
                s,
                "{:<7} {:<17} {:>4} {:>11.1} {:>10.2} {:>10.1} {:>10.1} {:>10.1} {:>7}",
                who,
                target,
                dptr,
                m.iops,
                m.mib_s,
                m.lat_us.avg,
                m.lat_us.min,
                m.lat_us.max,
                m.errors + m.verify_errors
            );
        };
        for t in &self.threads {
            for n in &t.namespaces {
                row(
                    &mut s,
                    &t.thread.to_string(),
                    &n.target,
                    &n.data_pointer,
                    &n.summary,
                );
            }
        }
        if self.threads.len() > 1 {
            for n in &self.namespaces {
                row(&mut s, "all", &n.target, &n.data_pointer, &n.summary);
            }
        }
        row(&mut s, "total", "", "", &self.total);
        let c = &self.cpu;
        let _ = writeln!(
            s,
            "{} mode{}{}: CPU {:.2} s user + {:.2} s system, {:.1} % of a CPU{}",
            w.mode,
            w.spin_us
                .map(|us| format!(" (spin {us} us)"))
                .unwrap_or_default(),
            if w.async_api { ", async API" } else { "" },
            c.user_s,
            c.system_s,
            c.busy_fraction * 100.0,
            c.per_io_us
                .map(|us| format!(", {us:.1} us per I/O"))
                .unwrap_or_default()
        );
        let mix = matches!(w.pattern.as_str(), "rw" | "randrw");
        if mix {
            let _ = writeln!(s, "\nreads and writes apart:");
            let dir_row = |s: &mut String, who: &str, target: &str, d: &FioDir| {
                let _ = writeln!(
                    s,
                    "{:<7} {:<17} {:>4} {:>11.1} {:>10.2} {:>10.1} {:>10.1} {:>10.1}",
                    who,
                    target,
                    "",
                    d.iops,
                    d.mib_s(),
                    d.lat_ns.mean / 1000.0,
                    d.lat_ns.min as f64 / 1000.0,
                    d.lat_ns.max as f64 / 1000.0
                );
            };
            for n in &self.namespaces {
                dir_row(&mut s, "read", &n.target, &n.summary.read);
                dir_row(&mut s, "write", &n.target, &n.summary.write);
            }
            if self.namespaces.len() > 1 {
                dir_row(&mut s, "read", "total", &self.total.read);
                dir_row(&mut s, "write", "total", &self.total.write);
            }
        }
        if percentiles {
            let _ = writeln!(s, "\nlatency percentiles, us:");
            let _ = write!(s, "{:<25}", "namespace");
            for p in PERCENTILES {
                let _ = write!(s, " {:>9}", format!("{}%", percentile_name(p)));
            }
            s.push('\n');
            let mut line = |who: &str, m: &Summary| {
                let _ = write!(s, "{who:<25}");
                if let Some(ps) = &m.percentiles_us {
                    for p in PERCENTILES {
                        let _ = write!(s, " {:>9.1}", ps[&percentile_name(p)]);
                    }
                }
                s.push('\n');
            };
            for n in &self.namespaces {
                line(&n.target, &n.summary);
            }
            line("total", &self.total);
            if let (true, Some([r, w])) = (mix, &self.total.dir_percentiles_us) {
                for (name, ps) in [("total reads", r), ("total writes", w)] {
                    let _ = write!(s, "{name:<25}");
                    for p in PERCENTILES {
                        let _ = write!(s, " {:>9.1}", ps[&percentile_name(p)]);
                    }
                    s.push('\n');
                }
            }
        }
        let c = &self.counters;
        let _ = writeln!(
            s,
            "\n{} commands, {:.3} submission and {:.3} completion MMIO doorbells per command, {:.2} completions per busy poll, {:.1} % of polls idle",
            c.submitted,
            c.sq_doorbells_per_cmd,
            c.cq_doorbells_per_cmd,
            c.completions_per_busy_poll,
            100.0 * ratio(c.idle_polls, c.polls)
        );
        if let Some(r) = &c.reactor {
            let _ = writeln!(
                s,
                "reactor: {} requests in {} batches (largest {}), slept {} times, woke clients {} times",
                r.requests, r.batches, r.max_batch, r.sleeps, r.wakes
            );
        }
        if !self.first_errors.is_empty() {
            let _ = writeln!(
                s,
                "\n{} failed command(s) and {} data mismatch(es); the first:",
                self.total.errors, self.total.verify_errors
            );
            for e in &self.first_errors {
                let _ = writeln!(
                    s,
                    "  thread {} {} {} LBA {} (+{}): {}",
                    e.thread, e.target, e.op, e.lba, e.blocks, e.error
                );
            }
        }
        s
    }
}

impl PerfReport {
    /// The latency histogram of every I/O (reads and writes, all threads): the buckets that
    /// hold I/Os, with the cumulative share (needs `--latency-histogram`).
    pub fn histogram_table(&self) -> String {
        let mut s = String::from(
            "\nlatency histogram, us:\n       from          to   cumulative        I/Os\n",
        );
        for (from, to, count, cum) in &self.total.buckets {
            let _ = writeln!(s, "{from:>11.3} {to:>11.3} {cum:>11.4}% {count:>11}");
        }
        s
    }

    /// The result in SPDK perf's layout: one row per namespace and worker ("from core N": the
    /// CPU the worker was pinned to, else its number), the total, and with `latency` 1 (`-L`)
    /// the latency at SPDK's cutoffs, with 2 (`-LL`) also the histogram's buckets. `name`
    /// gives a target's SPDK name (`PCIE (0000:00:04.0) NSID 1`) from its `BDF/nsid`.
    pub fn spdk_table(&self, latency: u8, name: &dyn Fn(&str) -> String) -> String {
        let cpus: Vec<usize> = self
            .workload
            .cpus
            .as_deref()
            .and_then(|c| c.parse::<rnvme_driver::affinity::CpuList>().ok())
            .map(|c| c.cpus().to_vec())
            .unwrap_or_default();
        let core = |t: usize| {
            if cpus.is_empty() {
                t
            } else {
                cpus[t % cpus.len()]
            }
        };
        let rows: Vec<(String, usize, &Summary)> = self
            .threads
            .iter()
            .flat_map(|t| {
                t.namespaces
                    .iter()
                    .map(move |n| (name(&n.target), core(t.thread), &n.summary))
            })
            .collect();
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "========================================================"
        );
        let _ = writeln!(s, "{:>width$}", "Latency(us)", width = w + 60);
        let _ = writeln!(
            s,
            "{:<width$}: {:>10} {:>10} {:>10} {:>10} {:>10}",
            "Device Information",
            "IOPS",
            "MiB/s",
            "Average",
            "min",
            "max",
            width = w + 13
        );
        let (mut iops, mut mib, mut ios, mut lat_sum) = (0.0, 0.0, 0u64, 0.0);
        let (mut min, mut max) = (f64::MAX, 0.0f64);
        for (n, c, m) in rows.iter().filter(|r| r.2.ios > 0) {
            let _ = writeln!(
                s,
                "{n:<w$} from core {c:>2}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                m.iops, m.mib_s, m.lat_us.avg, m.lat_us.min, m.lat_us.max
            );
            iops += m.iops;
            mib += m.mib_s;
            ios += m.ios;
            lat_sum += m.lat_us.avg * m.ios as f64;
            min = min.min(m.lat_us.min);
            max = max.max(m.lat_us.max);
        }
        if ios > 0 {
            let _ = writeln!(
                s,
                "========================================================"
            );
            let _ = writeln!(
                s,
                "{:<width$}: {iops:>10.2} {mib:>10.2} {:>10.2} {min:>10.2} {max:>10.2}",
                "Total",
                lat_sum / ios as f64,
                width = w + 13
            );
            let _ = writeln!(s);
        }
        if latency == 0 || ios == 0 {
            return s;
        }
        for (n, c, m) in &rows {
            let _ = writeln!(s, "Summary latency data for {n:<43.43} from core {c}:");
            let _ = writeln!(
                s,
                "================================================================================="
            );
            for (cut, v) in &m.cutoffs_us {
                let _ = writeln!(s, "{:9.5}% : {v:9.3}us", cut * 100.0);
            }
            let _ = writeln!(s);
        }
        if latency < 2 {
            return s;
        }
        for (n, c, m) in &rows {
            let _ = writeln!(s, "Latency histogram for {n:<43.43} from core {c}:");
            let _ = writeln!(
                s,
                "=============================================================================="
            );
            let _ = writeln!(s, "       Range in us     Cumulative    IO count");
            for (from, to, count, cum) in &m.buckets {
                let _ = writeln!(s, "{from:9.3} - {to:9.3}: {cum:9.4}%  ({count:9})");
            }
            let _ = writeln!(s);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc_with(lats_us: &[u64], bytes: u64) -> Acc {
        let mut a = Acc::new();
        for &l in lats_us {
            a.record(l * 1000, bytes, true);
        }
        a
    }

    #[test]
    fn summary_rates_and_latencies() {
        let a = acc_with(&[10, 20, 30, 40], 4096);
        let s = Summary::new(&a, Duration::from_secs(2), false);
        assert_eq!(s.ios, 4);
        assert_eq!(s.iops, 2.0);
        assert_eq!(s.mib_s, 4.0 * 4096.0 / 1048576.0 / 2.0);
        assert_eq!(s.lat_us.avg, 25.0);
        assert_eq!(s.lat_us.min, 10.0);
        assert_eq!(s.lat_us.max, 40.0);
        assert!((s.lat_us.p50 - 20.0).abs() < 0.05, "{}", s.lat_us.p50);
        assert!((s.lat_us.p99 - 40.0).abs() < 0.05);
        assert!(s.percentiles_us.is_none());
        let empty = Summary::new(&Acc::new(), Duration::ZERO, true);
        assert_eq!(
            (empty.iops, empty.lat_us.min, empty.lat_us.p99),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn merge_and_reset() {
        let mut a = acc_with(&[10], 512);
        a.errors = 2;
        let b = acc_with(&[100, 1000], 512);
        a.merge(&b);
        let s = Summary::new(&a, Duration::from_secs(1), true);
        assert_eq!((s.ios, s.errors), (3, 2));
        assert_eq!((s.lat_us.min, s.lat_us.max), (10.0, 1000.0));
        let p = s.percentiles_us.unwrap();
        assert_eq!(p.len(), 9);
        assert!(p.contains_key("99.99") && p.contains_key("1"));
        assert!((p["50"] - 100.0).abs() < 0.1, "{p:?}");
        a.reset_window();
        assert_eq!((a.ios(), a.read.bytes, a.errors), (0, 0, 2));
        a.record(5000, 1, false);
        let s = Summary::new(&a, Duration::from_secs(1), false);
        assert_eq!(
            (s.ios, s.writes, s.lat_us.min, s.lat_us.max),
            (1, 1, 5.0, 5.0)
        );
        assert!((s.lat_us.p50 - 5.0).abs() < 0.01);
    }

    #[test]
    fn reads_and_writes_apart_add_up_to_the_total() {
        let mut a = Acc::new();
        for l in [10u64, 20, 30] {
            a.record(l * 1000, 4096, true);
        }
        a.record(100_000, 8192, false);
        let s = Summary::new(&a, Duration::from_secs(2), false);
        assert_eq!((s.ios, s.reads, s.writes), (4, 3, 1));
        assert_eq!((s.read.total_ios, s.write.total_ios), (3, 1));
        assert_eq!(s.read.iops + s.write.iops, s.iops);
        assert_eq!(s.read.io_bytes + s.write.io_bytes, 3 * 4096 + 8192);
        assert_eq!(s.read.mib_s() + s.write.mib_s(), s.mib_s);
        assert_eq!(s.read.bw_bytes, 3.0 * 4096.0 / 2.0);
        assert_eq!(s.read.bw, 3.0 * 4.0 / 2.0);
        assert_eq!(s.read.runtime, 2000);
        let r = &s.read.lat_ns;
        assert_eq!((r.min, r.max, r.mean, r.n), (10_000, 30_000, 20_000.0, 3));
        // Population standard deviation of 10, 20 and 30 µs.
        assert!((r.stddev - 8164.97).abs() < 0.01, "{}", r.stddev);
        let p = r.percentile.as_ref().unwrap();
        assert_eq!(p.len(), 17);
        assert!((p["50.000000"] as f64 - 20_000.0).abs() < 20.0, "{p:?}");
        assert!((p["99.000000"] as f64 - 30_000.0).abs() < 40.0, "{p:?}");
        assert_eq!(s.write.lat_ns.min, 100_000);
        assert_eq!(s.write.lat_ns.stddev, 0.0);
        assert_eq!(s.lat_us.min, 10.0);
        assert_eq!(s.lat_us.max, 100.0);
        // The JSON: fio's shape beside the existing keys.
        let v = serde_json::to_value(&s).unwrap();
        for key in [
            "iops", "mib_s", "lat_us", "ios", "reads", "writes", "read", "write",
        ] {
            assert!(v.get(key).is_some(), "{key}: {v}");
        }
        assert!(
            v["read"]["lat_ns"]["percentile"]["99.990000"].is_u64(),
            "{v}"
        );
        assert_eq!(v["read"]["lat_ns"]["N"], 3);
        assert!(v["read"]["bw_bytes"].is_f64());
        // No writes: zeros, and no percentiles, as fio.
        let r = Summary::new(&acc_with(&[5], 512), Duration::from_secs(1), false);
        let w = serde_json::to_value(&r.write).unwrap();
        assert_eq!(w["total_ios"], 0);
        assert_eq!(w["lat_ns"]["min"], 0);
        assert!(w["lat_ns"].get("percentile").is_none());
    }

    #[test]
    fn buckets_count_every_io() {
        let a = acc_with(&[10, 10, 20, 400], 512);
        let s = Summary::new(&a, Duration::from_secs(1), true);
        let b = &s.buckets;
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), 4);
        assert_eq!(b.last().unwrap().3, 100.0);
        assert!(b.windows(2).all(|w| w[0].1 < w[1].0 + 0.002), "{b:?}");
        assert!(b[0].0 <= 10.0 && b[0].1 >= 10.0 && b[0].2 == 2, "{b:?}");
        assert!(Summary::new(&a, Duration::from_secs(1), false)
            .buckets
            .is_empty());
    }

    /// A report of two threads on one namespace, as the engine assembles it.
    fn report(pattern: &str, cpus: Option<&str>, percentiles: bool) -> PerfReport {
        let second = Duration::from_secs(1);
        let mut accs = [Acc::new(), Acc::new()];
        for l in [10u64, 20, 30, 40] {
            accs[0].record(l * 1000, 4096, true);
            accs[1].record(l * 2000, 4096, pattern != "rw");
        }
        let mut total = Acc::new();
        let threads = accs
            .iter()
            .enumerate()
            .map(|(t, a)| {
                total.merge(a);
                let summary = Summary::new(a, second, percentiles);
                ThreadReport {
                    thread: t,
                    elapsed_s: 1.0,
                    summary: summary.clone(),
                    namespaces: vec![NsReport {
                        target: "0000:00:04.0/1".into(),
                        data_pointer: "PRP".into(),
                        range: (0, 1000),
                        summary,
                    }],
                }
            })
            .collect();
        let t = Summary::new(&total, second, percentiles);
        PerfReport {
            workload: WorkloadInfo {
                pattern: pattern.into(),
                io_size: 4096,
                depth: 4,
                read_percent: 50,
                threads: 2,
                queues_per_thread: 1,
                duration_s: 1.0,
                warmup_s: 0.0,
                zipf: None,
                fua: false,
                reactor: false,
                reactor_callbacks: false,
                cpus: cpus.map(String::from),
                reactor_cpu: None,
                verify: false,
                seed: 1,
                shadow_doorbells: true,
                ring_each: false,
                thinktime_us: 0,
                mode: "polled".into(),
                spin_us: None,
                async_api: false,
                idle: false,
            },
            elapsed_s: 1.0,
            total: t.clone(),
            threads,
            namespaces: vec![NsReport {
                target: "0000:00:04.0/1".into(),
                data_pointer: "PRP".into(),
                range: (0, 1000),
                summary: t,
            }],
            counters: Counters::default(),
            first_errors: Vec::new(),
            mode: "polled".into(),
            cpu: CpuUsage::between((1.0, 0.5), (1.9, 0.6), 1.0, 1000),
        }
    }

    #[test]
    fn a_mixed_run_shows_reads_and_writes_apart() {
        let r = report("rw", None, true);
        let t = r.table(true);
        assert!(t.contains("reads and writes apart:"), "{t}");
        let read = t.lines().find(|l| l.starts_with("read ")).unwrap();
        // 4 reads in a second, of 4096 bytes, 10 to 40 µs.
        assert!(
            read.contains("0000:00:04.0/1")
                && read.contains("        4.0       0.02       25.0       10.0       40.0"),
            "{t}"
        );
        let write = t.lines().find(|l| l.starts_with("write ")).unwrap();
        assert!(write.contains("       50.0       20.0       80.0"), "{t}");
        assert!(t.contains("\ntotal reads  "), "{t}");
        assert!(t.contains("\ntotal writes  "), "{t}");
        let plain = report("randread", None, false).table(false);
        assert!(!plain.contains("reads and writes apart"), "{plain}");
    }

    #[test]
    fn spdk_layout() {
        let r = report("randread", Some("2,5"), true);
        let name = |t: &str| format!("PCIE ({}) NSID {}", &t[..12], &t[13..]);
        let t = r.spdk_table(0, &name);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "========================================================"
        );
        // The name is 26 characters: "Latency(us)" right-aligned at 86, the header's label
        // padded to 39.
        assert_eq!(lines[1], format!("{:>86}", "Latency(us)"));
        assert_eq!(
            lines[2],
            "Device Information                     :       IOPS      MiB/s    Average        min        max"
        );
        assert_eq!(
            lines[3],
            "PCIE (0000:00:04.0) NSID 1 from core  2:       4.00       0.02      25.00      10.00      40.00"
        );
        assert_eq!(
            lines[4],
            "PCIE (0000:00:04.0) NSID 1 from core  5:       4.00       0.02      50.00      20.00      80.00"
        );
        assert_eq!(
            lines[6],
            "Total                                  :       8.00       0.03      37.50      10.00      80.00"
        );
        assert_eq!(lines.len(), 8);
        let t = r.spdk_table(1, &name);
        assert!(t.contains("Summary latency data for PCIE (0000:00:04.0) NSID 1                  from core 2:\n"), "{t}");
        // hdrhistogram keeps 3 significant digits: 20 µs reads as its bucket's top, 20.015.
        assert!(t.contains(" 50.00000% :    20.015us\n"), "{t}");
        assert_eq!(t.matches("% : ").count(), 2 * SPDK_CUTOFFS.len());
        assert!(!t.contains("Latency histogram"));
        let t = r.spdk_table(2, &name);
        assert!(
            t.contains(
                "Latency histogram for PCIE (0000:00:04.0) NSID 1                  from core 5:\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("       Range in us     Cumulative    IO count\n"),
            "{t}"
        );
        assert!(t.contains(":  100.0000%  (        1)\n"), "{t}");
        let h = r.histogram_table();
        assert!(h.starts_with("\nlatency histogram, us:\n"), "{h}");
        assert!(h.trim_end().ends_with("100.0000%           1"), "{h}");
        assert_eq!(h.lines().count(), 3 + r.total.buckets.len());
        // Without pinning, the worker's number.
        let t = report("randread", None, false).spdk_table(0, &name);
        assert!(t.contains("NSID 1 from core  1:"), "{t}");
    }

    #[test]
    fn percentile_names() {
        let names: Vec<String> = PERCENTILES.iter().map(|&p| percentile_name(p)).collect();
        assert_eq!(
            names,
            ["1", "10", "25", "50", "75", "90", "99", "99.9", "99.99"]
        );
    }

    #[test]
    fn counters_ratios() {
        let mut c = Counters::default();
        c.add(&rnvme_driver::queue::QueueStats {
            submitted: 100,
            completed: 100,
            sq_doorbells: 25,
            cq_doorbells: 20,
            polls: 70,
            idle_polls: 50,
            ..Default::default()
        });
        assert_eq!(c.sq_doorbells_per_cmd, 0.25);
        assert_eq!(c.completions_per_busy_poll, 5.0);
    }
}
