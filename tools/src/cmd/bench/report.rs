//! The targets checked against the lines, and the table printed of a comparison.

use std::fmt::Write as _;

use serde::Serialize;

use super::results::{median, num, round_ratios, Line, RoundFigures};
use super::workloads::{rnvme_engine_name, BESIDE_WAKER, RNVME_FIO, WORKLOADS};
use super::DeviceBackend;

/// A target of the comparison, checked against this boot.
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

/// The comparison's targets, each a ratio of two measurements of the same boot and round.
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
    let waker = format!("rnvme {BESIDE_WAKER}");
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
            "4k randread qd1: rnvme fio engine IOPS / rnvme perf beside a 10 ms waker",
            ">= 0.9",
            ratio("4k-randread-qd1-t1", RNVME_FIO.0, &waker, iops),
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
            } else if let Some(c) = m.counters.as_ref().filter(|_| m.engine == RNVME_FIO.0) {
                format!(
                    "per I/O: {:.1} us submitting, {:.1} us reaping, {:.1} us in fio",
                    num(&c["submit_us"]),
                    num(&c["reap_us"]),
                    num(&c["fio_us"])
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
