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

/// What one thread counted for one namespace. Updated on the I/O path: no allocation, no lock.
#[derive(Clone, Debug)]
pub struct Acc {
    /// I/Os that completed successfully inside the measured window.
    pub ios: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Bytes they moved.
    pub bytes: u64,
    /// Commands that completed with an error status (over the whole run, warm-up included).
    pub errors: u64,
    /// Reads whose data did not carry the stamp of their LBA (`--verify`).
    pub verify_errors: u64,
    lat_sum_ns: u128,
    lat_min_ns: u64,
    lat_max_ns: u64,
    hist: Histogram<u64>,
}

impl Default for Acc {
    fn default() -> Self {
        Acc::new()
    }
}

impl Acc {
    /// Nothing counted yet.
    pub fn new() -> Acc {
        Acc {
            ios: 0,
            reads: 0,
            writes: 0,
            bytes: 0,
            errors: 0,
            verify_errors: 0,
            lat_sum_ns: 0,
            lat_min_ns: u64::MAX,
            lat_max_ns: 0,
            hist: Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds"),
        }
    }

    /// One I/O of `bytes` that took `lat_ns`.
    #[inline]
    pub fn record(&mut self, lat_ns: u64, bytes: u64, read: bool) {
        self.ios += 1;
        if read {
            self.reads += 1;
        } else {
            self.writes += 1;
        }
        self.bytes += bytes;
        self.lat_sum_ns += lat_ns as u128;
        self.lat_min_ns = self.lat_min_ns.min(lat_ns);
        self.lat_max_ns = self.lat_max_ns.max(lat_ns);
        self.hist.saturating_record(lat_ns.max(1));
    }

    /// Forget the I/Os counted so far (the end of the warm-up); errors stay counted.
    pub fn reset_window(&mut self) {
        self.ios = 0;
        self.reads = 0;
        self.writes = 0;
        self.bytes = 0;
        self.lat_sum_ns = 0;
        self.lat_min_ns = u64::MAX;
        self.lat_max_ns = 0;
        self.hist.reset();
    }

    /// Add another accumulator's counts.
    pub fn merge(&mut self, o: &Acc) {
        self.ios += o.ios;
        self.reads += o.reads;
        self.writes += o.writes;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.verify_errors += o.verify_errors;
        self.lat_sum_ns += o.lat_sum_ns;
        self.lat_min_ns = self.lat_min_ns.min(o.lat_min_ns);
        self.lat_max_ns = self.lat_max_ns.max(o.lat_max_ns);
        self.hist
            .add(&o.hist)
            .expect("histograms of equal bounds merge");
    }

    fn percentile_us(&self, p: f64) -> f64 {
        if self.ios == 0 {
            0.0
        } else {
            self.hist.value_at_quantile(p / 100.0) as f64 / 1000.0
        }
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
}

impl Summary {
    /// The summary of `acc` over `elapsed`.
    pub fn new(acc: &Acc, elapsed: Duration, percentiles: bool) -> Summary {
        let secs = elapsed.as_secs_f64();
        let rate = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
        let avg = if acc.ios == 0 {
            0.0
        } else {
            acc.lat_sum_ns as f64 / acc.ios as f64 / 1000.0
        };
        Summary {
            iops: rate(acc.ios as f64),
            mib_s: rate(acc.bytes as f64 / (1 << 20) as f64),
            lat_us: Latency {
                avg,
                min: if acc.ios == 0 {
                    0.0
                } else {
                    acc.lat_min_ns as f64 / 1000.0
                },
                max: acc.lat_max_ns as f64 / 1000.0,
                p50: acc.percentile_us(50.0),
                p99: acc.percentile_us(99.0),
                p999: acc.percentile_us(99.9),
            },
            ios: acc.ios,
            reads: acc.reads,
            writes: acc.writes,
            errors: acc.errors,
            verify_errors: acc.verify_errors,
            percentiles_us: percentiles.then(|| {
                PERCENTILES
                    .iter()
                    .map(|&p| (percentile_name(p), acc.percentile_us(p)))
                    .collect()
            }),
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
        assert_eq!((a.ios, a.bytes, a.errors), (0, 0, 2));
        a.record(5000, 1, false);
        let s = Summary::new(&a, Duration::from_secs(1), false);
        assert_eq!(
            (s.ios, s.writes, s.lat_us.min, s.lat_us.max),
            (1, 1, 5.0, 5.0)
        );
        assert!((s.lat_us.p50 - 5.0).abs() < 0.01);
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
