//! `rnvme bench modes`: how rnvme waits for completions, side by side in one guest boot:
//! polled, MSI-X interrupts and hybrid, each with the queue pair driven directly and through
//! the async API (futures on tokio), 4 KiB random reads at depth 1 and 32, plus what an idle
//! process costs in each mode. Rounds interleave every configuration; the table shows medians,
//! the ratio to polled, latency and the process's CPU time, and checks the targets.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use rnvme_tools::vm;
use serde::Serialize;

use super::results::{json_in, median, num, sections};
use super::{bench_vm, host_facts, utc_now, Boots, DeviceBackend, UsageError};

/// `rnvme bench modes`
#[derive(Debug, Args)]
pub struct ModesBenchArgs {
    /// Seconds per measurement (after a 1 s warm-up)
    #[arg(long, value_name = "S", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub seconds: u32,
    /// Rounds of every configuration, interleaved; the table shows medians
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub rounds: u32,
    /// The emulated device's back end, one guest boot and table each (repeatable; default
    /// threads and null)
    #[arg(long, value_enum)]
    pub backend: Vec<DeviceBackend>,
    /// Hybrid mode's spin budget, µs
    #[arg(long, value_name = "US", default_value_t = rnvme_driver::irq::DEFAULT_HYBRID_SPIN.as_micros() as u64)]
    pub spin_us: u64,
    /// Also write the results as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// Print the guest's output as well
    #[arg(long, short)]
    pub verbose: bool,
}

const MODES: [&str; 3] = ["polled", "interrupt", "hybrid"];
const DEPTHS: [u32; 2] = [1, 32];
/// LBAs the reads cover (written first).
const RANGE: u64 = 65_536;

/// The guest script: fill the range, then every configuration once per round.
pub fn modes_script(seconds: u32, rounds: u32, spin_us: u64) -> String {
    let mut s = format!(
        r#"echo "@@INFO kernel $(uname -r)"
echo "@@INFO cpus $(grep -c ^processor /proc/cpuinfo)"
echo "@@INFO clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
rnvme setup --hugepages 0 $NVME0 >/dev/null || {{ echo "@@INFO rnvme setup failed"; exit 1; }}
rnvme perf $NVME0 -q 32 -o 128k -w write -t 3 --range 0:{RANGE} --yes >/dev/null 2>&1 || echo "@@INFO fill failed"
measure() {{ # key, perf arguments
    k=$1; shift
    echo "@@BEGIN $k"
    rnvme perf $NVME0 -o 4k -w randread --range 0:{RANGE} -t {seconds} --json "$@" 2>&1 || echo "@@FAILED $?"
    echo "@@END"
}}
"#
    );
    for round in 1..=rounds {
        for depth in DEPTHS {
            for mode in MODES {
                for api in ["direct", "async"] {
                    let _ = writeln!(
                        s,
                        "measure \"{mode}|{api}|{depth}|{round}\" -a 1 -q {depth} --mode {mode} \
                         --spin-us {spin_us}{}",
                        if api == "async" { " --async" } else { "" }
                    );
                }
            }
        }
        for mode in MODES {
            let _ = writeln!(
                s,
                "measure \"{mode}|idle|0|{round}\" -q 1 --idle --mode {mode} --spin-us {spin_us}"
            );
        }
    }
    s
}

/// One configuration's median round.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub mode: String,
    /// direct, async or idle.
    pub api: String,
    pub depth: u32,
    pub iops: f64,
    pub lat_mean_us: f64,
    /// Process CPU seconds per wall second.
    pub busy_fraction: f64,
    pub cpu_us_per_io: Option<f64>,
    pub rounds_iops: Vec<f64>,
}

/// The figures of one run.
#[derive(Debug, Clone)]
struct Run {
    iops: f64,
    lat: f64,
    busy: f64,
    per_io: Option<f64>,
}

fn parse(body: &str) -> Result<Run> {
    let v = json_in(body)?;
    let errors = v["errors"].as_u64().unwrap_or(0) + v["verify_errors"].as_u64().unwrap_or(0);
    if errors > 0 {
        bail!("{errors} failed command(s)");
    }
    Ok(Run {
        iops: num(&v["iops"]),
        lat: num(&v["lat_us"]["avg"]),
        busy: num(&v["cpu"]["busy_fraction"]),
        per_io: v["cpu"]["per_io_us"].as_f64(),
    })
}

/// Medians of the rounds, and what failed.
pub fn collect_modes(output: &str) -> (Vec<Row>, Vec<String>, Vec<String>) {
    let (secs, info) = sections(output);
    let mut failures = Vec::new();
    let mut runs: Vec<((String, String, u32), Run)> = Vec::new();
    for (key, body) in secs {
        let parts: Vec<&str> = key.split('|').collect();
        let [mode, api, depth, _round] = parts[..] else {
            continue;
        };
        if body.contains("@@FAILED") {
            failures.push(format!(
                "{key}: {}",
                body.trim().lines().last().unwrap_or("")
            ));
            continue;
        }
        match parse(&body) {
            Ok(r) => runs.push((
                (
                    mode.to_string(),
                    api.to_string(),
                    depth.parse().unwrap_or(0),
                ),
                r,
            )),
            Err(e) => failures.push(format!("{key}: {e}")),
        }
    }
    let mut rows = Vec::new();
    let mut keys: Vec<(String, String, u32)> = Vec::new();
    for (k, _) in &runs {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    for k in keys {
        let mut mine: Vec<Run> = runs
            .iter()
            .filter(|(x, _)| *x == k)
            .map(|(_, r)| r.clone())
            .collect();
        let rounds_iops: Vec<f64> = mine.iter().map(|r| r.iops).collect();
        // The median round by IOPS (by CPU for idle runs) carries its latency and CPU.
        let idle = k.1 == "idle";
        mine.sort_by(|a, b| {
            if idle {
                a.busy.total_cmp(&b.busy)
            } else {
                a.iops.total_cmp(&b.iops)
            }
        });
        let m = mine[(mine.len() - 1) / 2].clone();
        rows.push(Row {
            mode: k.0,
            api: k.1,
            depth: k.2,
            iops: median(rounds_iops.clone()).unwrap_or(0.0),
            lat_mean_us: m.lat,
            busy_fraction: m.busy,
            cpu_us_per_io: m.per_io,
            rounds_iops,
        });
    }
    (rows, info, failures)
}

/// One backend's result.
#[derive(Debug, Clone, Serialize)]
pub struct ModesComparison {
    pub date: String,
    pub backend: DeviceBackend,
    pub setup: Vec<String>,
    pub seconds: u32,
    pub rounds: u32,
    pub rows: Vec<Row>,
    pub targets: Vec<String>,
    pub failures: Vec<String>,
}

fn find<'a>(rows: &'a [Row], mode: &str, api: &str, depth: u32) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.mode == mode && r.api == api && r.depth == depth)
}

/// The issue's targets, each met or missed with its figures.
pub fn check_targets(rows: &[Row]) -> Vec<String> {
    let mut t = Vec::new();
    let mut check = |what: String, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        t.push(format!("{verdict}: {what}"));
    };
    let p32 = find(rows, "polled", "direct", 32);
    let h32 = find(rows, "hybrid", "direct", 32);
    if let (Some(p), Some(h)) = (p32, h32) {
        let r = h.iops / p.iops.max(1.0);
        check(
            format!("hybrid at depth 32 within 10 % of polled IOPS ({r:.2}x)"),
            Some(r >= 0.9),
        );
    }
    let p1 = find(rows, "polled", "direct", 1);
    let h1 = find(rows, "hybrid", "direct", 1);
    if let (Some(p), Some(h)) = (p1, h1) {
        let r = h.lat_mean_us / p.lat_mean_us.max(0.001);
        check(
            format!("hybrid at depth 1 within 20 % of polled latency ({r:.2}x)"),
            Some(r <= 1.2),
        );
    }
    for mode in ["interrupt", "hybrid"] {
        if let Some(i) = find(rows, mode, "idle", 0) {
            check(
                format!(
                    "an idle process in {mode} mode under 1 % of a CPU ({:.2} %)",
                    i.busy_fraction * 100.0
                ),
                Some(i.busy_fraction < 0.01),
            );
        }
    }
    let i1 = find(rows, "interrupt", "direct", 1);
    if let (Some(p), Some(i)) = (p1, i1) {
        let r = i.busy_fraction / p.busy_fraction.max(0.001);
        check(
            format!("interrupt mode at depth 1 at most half the CPU of polled ({r:.2}x)"),
            Some(r <= 0.5),
        );
    }
    let a32 = find(rows, "polled", "async", 32);
    if let (Some(p), Some(a)) = (p32, a32) {
        let r = a.iops / p.iops.max(1.0);
        check(
            format!(
                "the async API (tokio) at depth 32 at least 0.8x the polled queue pair ({r:.2}x)"
            ),
            Some(r >= 0.8),
        );
    }
    t
}

pub fn modes_table(c: &ModesComparison) -> String {
    let mut s = format!(
        "Waiting for completions: polled, interrupt, hybrid ({}; 4 KiB random reads, {} s per measurement, {} rounds, medians)\n",
        c.date, c.seconds, c.rounds
    );
    let _ = writeln!(
        s,
        "{:<10} {:<7} {:>5} {:>10} {:>9} {:>10} {:>8} {:>10}",
        "mode", "API", "depth", "IOPS", "x polled", "lat avg us", "CPU %", "CPU us/IO"
    );
    for r in &c.rows {
        let base = find(&c.rows, "polled", "direct", r.depth);
        let ratio = match (r.api.as_str(), base) {
            ("idle", _) | (_, None) => "".to_string(),
            (_, Some(b)) => format!("{:.2}", r.iops / b.iops.max(1.0)),
        };
        let idle = r.api == "idle";
        let _ = writeln!(
            s,
            "{:<10} {:<7} {:>5} {:>10} {:>9} {:>10} {:>8.2} {:>10}",
            r.mode,
            r.api,
            if idle {
                "-".into()
            } else {
                r.depth.to_string()
            },
            if idle {
                "-".into()
            } else {
                format!("{:.0}", r.iops)
            },
            ratio,
            if idle {
                "-".into()
            } else {
                format!("{:.1}", r.lat_mean_us)
            },
            r.busy_fraction * 100.0,
            r.cpu_us_per_io
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    for t in &c.targets {
        let _ = writeln!(s, "{t}");
    }
    for f in &c.failures {
        let _ = writeln!(s, "failed: {f}");
    }
    for x in &c.setup {
        let _ = writeln!(s, "  {x}");
    }
    s
}

pub fn modes_bench(a: ModesBenchArgs) -> Result<ExitCode> {
    if a.seconds == 0 {
        return Err(UsageError("--seconds must be at least 1".into()).into());
    }
    let mut boots = Boots::new();
    let rnvme = super::super::vm::static_rnvme()?;
    let backends = if a.backend.is_empty() {
        vec![DeviceBackend::Threads, DeviceBackend::Null]
    } else {
        a.backend.clone()
    };
    let per_round = (DEPTHS.len() * MODES.len() * 2) as u64;
    let measurements = (per_round + MODES.len() as u64) * a.rounds as u64;
    for backend in backends {
        let config = bench_vm(
            backend,
            &[],
            vec![(rnvme.clone(), "/usr/local/bin/rnvme".into())],
            &[],
            Duration::from_secs(180 + measurements * (a.seconds as u64 + 8)),
        );
        eprintln!(
            "rnvme: booting one guest ({}) for {measurements} measurements of {} s each...",
            backend.describe(),
            a.seconds
        );
        let out = vm::run(&config, &modes_script(a.seconds, a.rounds, a.spin_us))?;
        if a.verbose {
            eprintln!("--- guest output ---\n{}\n---", out.output.trim_end());
        }
        let (rows, info, failures) = collect_modes(&out.output);
        let mut setup: Vec<String> = host_facts().into_iter().take(2).collect();
        setup.push(format!(
            "device: QEMU NVMe through VFIO (MSI-X through the guest's intel-iommu with \
             interrupt remapping), 1 namespace of 1 GiB with 4 KiB LBAs, reads over its first \
             {} MiB (written first); rnvme perf, one thread, one queue pair; hybrid spins {} us; \
             async: a tokio current-thread runtime, a poller task or a reaper thread on the \
             vector; CPU: the process's user + system time over the measured window",
            (RANGE * 4096) >> 20,
            a.spin_us
        ));
        setup.push(format!("back end: {}", backend.describe()));
        setup.extend(info.iter().map(|i| format!("guest {i}")));
        let targets = check_targets(&rows);
        let c = ModesComparison {
            date: utc_now(),
            backend,
            setup,
            seconds: a.seconds,
            rounds: a.rounds,
            rows,
            targets,
            failures,
        };
        let shown = modes_table(&c);
        let failures = !c.failures.is_empty();
        boots.add(c, &shown, &out, failures, None)?;
    }
    boots.finish(a.json.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(iops: f64, lat: f64, busy: f64, per_io: Option<f64>) -> String {
        format!(
            "{{\"iops\": {iops}, \"errors\": 0, \"verify_errors\": 0, \"lat_us\": {{\"avg\": {lat}}}, \
             \"cpu\": {{\"busy_fraction\": {busy}, \"per_io_us\": {}}}}}",
            per_io.map_or("null".to_string(), |v| v.to_string())
        )
    }

    #[test]
    fn the_script_runs_every_configuration_each_round() {
        let s = modes_script(2, 3, 40);
        for mode in MODES {
            for depth in DEPTHS {
                for round in 1..=3 {
                    assert!(s.contains(&format!("\"{mode}|direct|{depth}|{round}\"")));
                    assert!(s.contains(&format!("\"{mode}|async|{depth}|{round}\"")));
                }
            }
            assert!(s.contains(&format!("\"{mode}|idle|0|3\" -q 1 --idle --mode {mode}")));
        }
        assert_eq!(s.matches("--async").count(), 3 * 2 * 3);
        assert!(s.contains("--spin-us 40"));
    }

    #[test]
    fn medians_ratios_and_targets_come_from_the_runs() {
        let mut out = String::new();
        let runs = [
            ("polled|direct|32", [100.0, 90.0, 110.0], 300.0, 1.0),
            ("hybrid|direct|32", [95.0, 80.0, 99.0], 320.0, 0.9),
            ("polled|async|32", [70.0, 75.0, 72.0], 400.0, 1.0),
            ("polled|direct|1", [30.0, 31.0, 29.0], 33.0, 1.0),
            ("hybrid|direct|1", [25.0, 26.0, 24.0], 45.0, 0.8),
            ("interrupt|direct|1", [10.0, 11.0, 12.0], 90.0, 0.3),
        ];
        for (key, iops, lat, busy) in runs {
            for (round, i) in iops.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "@@BEGIN {key}|{}\n{}\n@@END",
                    round + 1,
                    body(*i, lat, busy, Some(10.0))
                );
            }
        }
        for (round, busy) in [0.004, 0.02, 0.006].iter().enumerate() {
            let _ = writeln!(
                out,
                "@@BEGIN interrupt|idle|0|{}\n{}\n@@END",
                round + 1,
                body(0.0, 0.0, *busy, None)
            );
        }
        out.push_str("@@BEGIN hybrid|idle|0|1\nrnvme: error: boom\n@@FAILED 1\n@@END\n");
        let (rows, _, failures) = collect_modes(&out);
        assert_eq!(failures.len(), 1, "{failures:?}");
        let p32 = find(&rows, "polled", "direct", 32).unwrap();
        assert_eq!(p32.iops, 100.0);
        assert_eq!(p32.rounds_iops, vec![100.0, 90.0, 110.0]);
        let idle = find(&rows, "interrupt", "idle", 0).unwrap();
        assert_eq!(idle.busy_fraction, 0.006, "the median idle round by CPU");
        let t = check_targets(&rows).join("\n");
        assert!(
            t.contains("met: hybrid at depth 32 within 10 % of polled IOPS (0.95x)"),
            "{t}"
        );
        assert!(
            t.contains("MISSED: hybrid at depth 1 within 20 % of polled latency (1.36x)"),
            "{t}"
        );
        assert!(
            t.contains("met: an idle process in interrupt mode under 1 % of a CPU (0.60 %)"),
            "{t}"
        );
        assert!(
            t.contains("met: interrupt mode at depth 1 at most half the CPU of polled (0.30x)"),
            "{t}"
        );
        assert!(t.contains("MISSED: the async API (tokio) at depth 32 at least 0.8x the polled queue pair (0.72x)"), "{t}");
        let c = ModesComparison {
            date: "today".into(),
            backend: DeviceBackend::Threads,
            setup: vec!["here".into()],
            seconds: 2,
            rounds: 3,
            rows,
            targets: check_targets(&[]),
            failures,
        };
        let table = modes_table(&c);
        assert!(table.contains("hybrid     direct     32"), "{table}");
        assert!(table.contains("0.95"), "{table}");
        assert!(table.contains("failed: hybrid|idle|0|1"), "{table}");
    }
}
