//! What the guest printed, read back: each measurement's figures (fio's JSON, rnvme perf's),
//! their rounds reduced to medians, one line per workload.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::workloads::{rnvme_engine_name, BEGIN, END, FIO_NULL, KERNEL_ENGINES, RNVME_FIO};
use super::Workload;

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
pub(super) fn sections(output: &str) -> (Vec<(String, String)>, Vec<String>) {
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
pub(super) fn json_in(body: &str) -> Result<Value> {
    let start = body.find('{').context("no JSON object in the output")?;
    let end = body.rfind('}').context("no end of the JSON object")?;
    serde_json::from_str(&body[start..=end]).context("the JSON does not parse")
}

pub(super) fn num(v: &Value) -> f64 {
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
        counters: body.lines().find_map(engine_time_split),
    })
}

/// The rnvme engine's account of its job thread's time (`rnvme_stats=1`, one line on stderr):
/// microseconds per io_u submitting, reaping and in fio between the engine's calls.
pub(super) fn engine_time_split(line: &str) -> Option<Value> {
    let rest = line.split_once(" io_us; per io_u: ")?.1;
    let us = |label: &str| -> Option<f64> {
        let before = &rest[..rest.find(label)?];
        before.rsplit(' ').next()?.parse().ok()
    };
    Some(serde_json::json!({
        "submit_us": us(" us submitting")?,
        "reap_us": us(" us reaping")?,
        "fio_us": us(" us in fio")?,
    }))
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
    pub(super) fn get(&self, engine: &str) -> Option<&Measurement> {
        self.results.iter().find(|m| m.engine == engine)
    }
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
pub(super) fn median_round(mut rounds: Vec<Measurement>) -> Option<Measurement> {
    let all: Vec<RoundFigures> = rounds.iter().flat_map(|m| m.rounds.clone()).collect();
    rounds.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let mid = rounds.len().checked_sub(1)? / 2;
    let mut m = rounds.swap_remove(mid);
    m.rounds = all;
    Some(m)
}

/// The median (the mean of the middle two of an even count); None for none.
pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `ours`'s figure over `theirs`'s in each round both have, in round order.
pub(super) fn round_ratios(
    ours: &Measurement,
    theirs: &Measurement,
    f: fn(&RoundFigures) -> f64,
) -> Vec<f64> {
    ours.rounds
        .iter()
        .filter_map(|o| {
            let t = theirs.rounds.iter().find(|t| t.round == o.round)?;
            (f(t) > 0.0).then(|| f(o) / f(t))
        })
        .collect()
}
