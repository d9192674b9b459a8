//! `rnvme bench serve`: NVMe/TCP targets side by side in one guest boot, on one emulated
//! controller, with the guest kernel's initiator and fio on both sides: the kernel's own target
//! (`nvmet-tcp`, configured through configfs, exporting `/dev/nvme0n1` of the kernel's NVMe
//! driver) against `rnvme serve` on the same controller (bound to vfio-pci in between). Rounds
//! interleave the two; the table shows each side's median round, their ratio, and CPU time per
//! I/O: the whole guest's (fio, the initiator and the target together: the kernel target's work
//! cannot be told apart from the initiator's) and `rnvme serve`'s own.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use rnvme_tools::vm;
use serde::Serialize;

use super::results::{json_in, parse_fio, sections};
use super::{bench_vm, host_facts, utc_now, Boots, DeviceBackend, UsageError};

/// `rnvme bench serve`
#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// Seconds per measurement (after a 1 s warm-up)
    #[arg(long, value_name = "S", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub seconds: u32,
    /// Rounds, the device going back and forth between the two targets; the table shows
    /// medians
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub rounds: u32,
    /// The emulated device's back end, one guest boot and table each (repeatable; default
    /// threads and null)
    #[arg(long, value_enum)]
    pub backend: Vec<DeviceBackend>,
    /// Also write the results as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// fio on the guest's CPU 0 and rnvme serve's poll thread on CPU 1 (`--cpus 1`), for both
    /// targets' runs (the kernel target works where the kernel schedules it)
    #[arg(long)]
    pub pin: bool,
    /// An argument for `rnvme serve` in the guest (repeatable), e.g. --serve-arg=--device-wait=busy
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
    /// Print the guest's output as well
    #[arg(long, short)]
    pub verbose: bool,
}

/// A workload: fio's rw, block size, depth.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NvmfWorkload {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub depth: u32,
}

pub const NVMF_WORKLOADS: [NvmfWorkload; 4] = [
    NvmfWorkload {
        name: "4k-randread-qd1",
        rw: "randread",
        bs: "4k",
        depth: 1,
    },
    NvmfWorkload {
        name: "4k-randread-qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
    },
    NvmfWorkload {
        name: "4k-randwrite-qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
    },
    NvmfWorkload {
        name: "128k-seqread-qd32",
        rw: "read",
        bs: "128k",
        depth: 32,
    },
];

const KERNEL: &str = "kernel nvmet-tcp";
const RNVME: &str = "rnvme serve";
const HOSTNQN: &str = "nqn.2014-08.io.rnvme:bench-host";
const KNQN: &str = "nqn.2014-08.io.rnvme:kernel-target";
const RNQN: &str = "nqn.2014-08.io.rnvme:rnvme-target";

/// The guest script.
pub fn nvmf_script(seconds: u32, rounds: u32, serve_args: &[String], pin: bool) -> String {
    // Each argument stays one argument in the guest's shell, whatever it holds (arguments
    // from a command line hold no NUL, the one thing a shell word cannot).
    let mut extra = serve_args
        .iter()
        .filter_map(|a| shlex::try_quote(a).ok())
        .collect::<Vec<_>>()
        .join(" ");
    if pin {
        extra.push_str(" --cpus 1");
    }
    let fio_pin = if pin { "--cpus_allowed=0 " } else { "" };
    let mut s = format!(
        r#"echo "@@INFO kernel $(uname -r)"
echo "@@INFO cpus $(grep -c ^processor /proc/cpuinfo)"
HQ={HOSTNQN}
C="-t tcp -a 127.0.0.1 -s 4420"
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fio --name=fill --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio --rw=write --bs=1m --iodepth=8 --size=100% --output-format=terse >/dev/null 2>&1 || echo "@@INFO fill failed"
busy() {{ awk '/^cpu /{{print $2+$3+$4+$7+$8+$9}}' /proc/stat; }}
pcpu() {{ [ -n "$1" ] && awk '{{print $14+$15}}' /proc/$1/stat || echo 0; }}
fab_blk() {{
    for i in $(seq 100); do
        for s in /sys/class/nvme-subsystem/*; do
            [ "$(cat $s/subsysnqn 2>/dev/null)" = "$1" ] || continue
            for n in $s/nvme*n1; do [ -b /dev/${{n##*/}} ] && echo /dev/${{n##*/}} && return 0; done
        done
        sleep 0.1
    done
    return 1
}}
K=/sys/kernel/config/nvmet
kernel_up() {{
    S=$K/subsystems/{KNQN}; P=$K/ports/1
    mkdir $S && echo 1 >$S/attr_allow_any_host && mkdir $S/namespaces/1 &&
    echo -n /dev/nvme0n1 >$S/namespaces/1/device_path && echo 1 >$S/namespaces/1/enable &&
    mkdir $P && echo 127.0.0.1 >$P/addr_traddr && echo tcp >$P/addr_trtype &&
    echo 4420 >$P/addr_trsvcid && echo ipv4 >$P/addr_adrfam && ln -s $S $P/subsystems/{KNQN}
}}
kernel_down() {{
    S=$K/subsystems/{KNQN}; P=$K/ports/1
    rm $P/subsystems/{KNQN}; rmdir $P; echo 0 >$S/namespaces/1/enable; rmdir $S/namespaces/1; rmdir $S
}}
measure() {{ # key pid dev rw bs depth
    b0=$(busy); p0=$(pcpu $2)
    echo "@@BEGIN $1"
    fio {fio_pin}--name=w --filename=$3 --ioengine=libaio --direct=1 --rw=$4 --bs=$5 --iodepth=$6 --time_based --runtime={seconds} --ramp_time=1 --clocksource=cpu --lat_percentiles=1 --percentile_list=99 --output-format=json 2>&1 || echo "@@FAILED $?"
    echo "@@CPU busy=$(( $(busy) - b0 )) proc=$(( $(pcpu $2) - p0 ))"
    echo "@@END"
}}
"#
    );
    for round in 1..=rounds {
        // The kernel's target first.
        let _ = writeln!(
            s,
            "kernel_up || {{ echo \"@@INFO nvmet set-up failed\"; exit 1; }}\n\
             nvme connect $C -n {KNQN} -q $HQ >/dev/null || {{ echo \"@@INFO connect to nvmet failed\"; exit 1; }}\n\
             D=$(fab_blk {KNQN}) || exit 1"
        );
        for w in NVMF_WORKLOADS {
            let _ = writeln!(
                s,
                "measure \"{KERNEL}|{}|{round}\" \"\" $D {} {} {}",
                w.name, w.rw, w.bs, w.depth
            );
        }
        let _ = writeln!(
            s,
            "nvme disconnect -n {KNQN} >/dev/null; kernel_down\n\
             rnvme setup --hugepages 0 $NVME0 >/dev/null || {{ echo \"@@INFO rnvme setup failed\"; exit 1; }}\n\
             rnvme serve $NVME0 {extra} --nqn {RNQN} >/tmp/serve.log 2>&1 &\n\
             SP=$!\n\
             for i in $(seq 100); do grep -q 'listening on' /tmp/serve.log && break; sleep 0.1; done\n\
             nvme connect $C -n {RNQN} -q $HQ >/dev/null || {{ echo \"@@INFO connect to rnvme serve failed\"; cat /tmp/serve.log; exit 1; }}\n\
             D=$(fab_blk {RNQN}) || exit 1"
        );
        for w in NVMF_WORKLOADS {
            let _ = writeln!(
                s,
                "measure \"{RNVME}|{}|{round}\" $SP $D {} {} {}",
                w.name, w.rw, w.bs, w.depth
            );
        }
        let _ = writeln!(
            s,
            "nvme disconnect -n {RNQN} >/dev/null\n\
             kill -TERM $SP; wait $SP || echo \"@@INFO rnvme serve exited with $?\"\n\
             rnvme reset $NVME0 >/dev/null || {{ echo \"@@INFO rnvme reset failed\"; exit 1; }}\n\
             i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done"
        );
    }
    s
}

/// One side's median round of one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub iops: f64,
    pub mib_s: f64,
    pub lat_mean_us: f64,
    pub lat_p99_us: f64,
    /// The whole guest's CPU time per I/O, µs.
    pub guest_cpu_us_per_io: f64,
    /// `rnvme serve`'s own CPU time per I/O, µs (None for the kernel's target).
    pub target_cpu_us_per_io: Option<f64>,
    pub rounds_iops: Vec<f64>,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: NvmfWorkload,
    pub kernel: Option<Side>,
    pub rnvme: Option<Side>,
}

#[derive(Debug, Serialize)]
pub struct NvmfComparison {
    pub date: String,
    pub backend: DeviceBackend,
    pub setup: Vec<String>,
    pub seconds: u32,
    pub rounds: u32,
    pub rows: Vec<Row>,
    pub failures: Vec<String>,
}

/// Ticks of /proc/stat and /proc/PID/stat.
const TICK_US: f64 = 10_000.0;

fn cpu_line(body: &str) -> (f64, f64) {
    let line = body
        .lines()
        .find_map(|l| l.strip_prefix("@@CPU "))
        .unwrap_or("");
    let get = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (get("busy="), get("proc="))
}

/// Reads the guest's output into rows (medians of the rounds) and failures.
pub fn collect_nvmf(output: &str, seconds: u32) -> (Vec<Row>, Vec<String>, Vec<String>) {
    let (secs, info) = sections(output);
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for w in NVMF_WORKLOADS {
        let mut side = |who: &str| -> Option<Side> {
            let mut rounds: Vec<(f64, Side)> = Vec::new();
            for (key, body) in secs.iter().filter(|(k, _)| {
                let mut p = k.split('|');
                p.next() == Some(who) && p.next() == Some(w.name)
            }) {
                if body.contains("@@FAILED") {
                    failures.push(format!("{key}: fio failed"));
                    continue;
                }
                let m = match parse_fio(who, body) {
                    Ok(m) => m,
                    Err(e) => {
                        failures.push(format!("{key}: {e}"));
                        continue;
                    }
                };
                let (busy, proc_ticks) = cpu_line(body);
                // The counters cover the warm-up second too: count its I/Os at the same rate.
                let ios = m.iops * (seconds as f64 + 1.0);
                let per_io = |ticks: f64| {
                    if ios > 0.0 {
                        ticks * TICK_US / ios
                    } else {
                        0.0
                    }
                };
                if m.errors > 0 || json_in(body).is_err() {
                    failures.push(format!("{key}: {} errors", m.errors));
                }
                rounds.push((
                    m.iops,
                    Side {
                        iops: m.iops,
                        mib_s: m.mib_s,
                        lat_mean_us: m.lat_mean_us,
                        lat_p99_us: m.lat_p99_us,
                        guest_cpu_us_per_io: per_io(busy),
                        target_cpu_us_per_io: (who == RNVME).then(|| per_io(proc_ticks)),
                        rounds_iops: Vec::new(),
                        errors: m.errors,
                    },
                ));
            }
            if rounds.is_empty() {
                return None;
            }
            let all: Vec<f64> = rounds.iter().map(|r| r.0).collect();
            rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut med = rounds[rounds.len() / 2].1.clone();
            med.rounds_iops = all;
            Some(med)
        };
        let kernel = side(KERNEL);
        let rnvme = side(RNVME);
        rows.push(Row {
            workload: w,
            kernel,
            rnvme,
        });
    }
    (rows, info, failures)
}

/// The table.
pub fn nvmf_table(c: &NvmfComparison) -> String {
    let mut s = format!(
        "NVMe/TCP targets side by side ({}; {} s per measurement, {} rounds, medians; fio libaio through the guest kernel's initiator)\n",
        c.backend.describe(),
        c.seconds,
        c.rounds
    );
    let _ = writeln!(
        s,
        "{:<18} {:>12} {:>12} {:>7} {:>16} {:>16} {:>18} {:>12}",
        "workload",
        "nvmet IOPS",
        "rnvme IOPS",
        "ratio",
        "lat µs k / r",
        "p99 µs k / r",
        "guest CPU µs/IO k/r",
        "serve µs/IO"
    );
    for r in &c.rows {
        let (Some(k), Some(v)) = (&r.kernel, &r.rnvme) else {
            let _ = writeln!(s, "{:<18} (missing: see the failures)", r.workload.name);
            continue;
        };
        let _ = writeln!(
            s,
            "{:<18} {:>12.0} {:>12.0} {:>6.2}× {:>7.1} / {:<7.1} {:>7.0} / {:<7.0} {:>8.1} / {:<8.1} {:>12.1}",
            r.workload.name,
            k.iops,
            v.iops,
            v.iops / k.iops.max(1.0),
            k.lat_mean_us,
            v.lat_mean_us,
            k.lat_p99_us,
            v.lat_p99_us,
            k.guest_cpu_us_per_io,
            v.guest_cpu_us_per_io,
            v.target_cpu_us_per_io.unwrap_or(0.0)
        );
    }
    for f in &c.failures {
        let _ = writeln!(s, "failed: {f}");
    }
    for x in &c.setup {
        let _ = writeln!(s, "  {x}");
    }
    s
}

pub fn serve_bench(a: ServeBenchArgs) -> Result<ExitCode> {
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
    let measurements = 2 * NVMF_WORKLOADS.len() as u64 * a.rounds as u64;
    for backend in backends {
        let config = bench_vm(
            backend,
            &["fio", "nvme"],
            vec![(rnvme.clone(), "/usr/local/bin/rnvme".into())],
            &[vm::LOOPBACK_NVME_TCP_ARG],
            Duration::from_secs(180 + measurements * (a.seconds as u64 + 6) + a.rounds as u64 * 40),
        );
        eprintln!(
            "rnvme: booting one guest ({}) for {measurements} measurements of {} s each...",
            backend.describe(),
            a.seconds
        );
        let out = vm::run(
            &config,
            &nvmf_script(a.seconds, a.rounds, &a.serve_arg, a.pin),
        )?;
        if a.verbose {
            eprintln!("--- guest output ---\n{}\n---", out.output.trim_end());
        }
        let (rows, info, failures) = collect_nvmf(&out.output, a.seconds);
        let mut setup: Vec<String> = host_facts().into_iter().take(2).collect();
        setup.push(
            "device: QEMU NVMe, 1 namespace of 1 GiB with 4 KiB LBAs (filled before measuring)"
                .into(),
        );
        setup.push(format!(
            "both sides: fio (libaio, direct=1) on the guest kernel's nvme-tcp initiator over loopback; kernel target: nvmet-tcp on /dev/nvme0n1 (the kernel's NVMe driver); rnvme serve{}: one poll thread, the controller on vfio-pci; kernel argument {}",
            {
                let mut x = a.serve_arg.join(" ");
                if a.pin {
                    x.push_str(" --cpus 1; fio on CPU 0");
                }
                if x.is_empty() {
                    x
                } else {
                    format!(" ({})", x.trim())
                }
            },
            vm::LOOPBACK_NVME_TCP_ARG
        ));
        setup.push(format!("back end: {}", backend.describe()));
        setup.extend(info.iter().map(|i| format!("guest {i}")));
        let c = NvmfComparison {
            date: utc_now(),
            backend,
            setup,
            seconds: a.seconds,
            rounds: a.rounds,
            rows,
            failures,
        };
        let shown = nvmf_table(&c);
        let failures = !c.failures.is_empty();
        boots.add(c, &shown, &out, failures, None)?;
    }
    boots.finish(a.json.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fio_json(iops: f64, lat_ns: f64) -> String {
        format!(
            r#"{{"jobs":[{{"error":0,"read":{{"iops":{iops},"bw":{bw},"total_ios":{n},"lat_ns":{{"mean":{lat_ns},"percentile":{{"99.000000":{p99}}}}}}},"write":{{"iops":0,"bw":0,"total_ios":0}}}}]}}"#,
            bw = iops * 4.0,
            n = iops * 2.0,
            p99 = lat_ns * 2.0
        )
    }

    #[test]
    fn the_script_runs_both_targets_every_round() {
        let s = nvmf_script(3, 2, &["--spin-us=5".to_string()], true);
        assert_eq!(s.matches("kernel_up ||").count(), 2);
        assert_eq!(
            s.matches("rnvme serve $NVME0 '--spin-us=5' --cpus 1")
                .count(),
            2
        );
        for w in NVMF_WORKLOADS {
            for round in 1..=2 {
                assert!(s.contains(&format!("\"{KERNEL}|{}|{round}\"", w.name)));
                assert!(s.contains(&format!("\"{RNVME}|{}|{round}\"", w.name)));
            }
        }
        assert!(s.contains("--cpus_allowed=0 --name=w"));
        assert!(s.contains("--runtime=3"));
        assert!(!nvmf_script(3, 1, &[], false).contains("cpus_allowed"));
        // An argument with spaces or shell syntax is one word in the guest, run as nothing.
        let s = nvmf_script(3, 1, &["--nqn=a b; reboot".to_string()], false);
        assert!(s.contains("rnvme serve $NVME0 '--nqn=a b; reboot'"), "{s}");
    }

    #[test]
    fn rounds_are_reduced_to_their_median_with_cpu_per_io() {
        let w = NVMF_WORKLOADS[1].name;
        let mut out = String::new();
        for (round, (k, r)) in [(1000.0, 3000.0), (1200.0, 2000.0), (1100.0, 2500.0)]
            .iter()
            .enumerate()
        {
            for (who, iops) in [(KERNEL, k), (RNVME, r)] {
                out.push_str(&format!(
                    "@@BEGIN {who}|{w}|{}\n{}\n@@CPU busy=300 proc=100\n@@END\n",
                    round + 1,
                    fio_json(*iops, 50_000.0)
                ));
            }
        }
        out.push_str("@@INFO kernel 6.1\n");
        let (rows, info, failures) = collect_nvmf(&out, 2);
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(info, ["kernel 6.1"]);
        let row = rows.iter().find(|r| r.workload.name == w).unwrap();
        let k = row.kernel.as_ref().unwrap();
        let r = row.rnvme.as_ref().unwrap();
        assert_eq!((k.iops, r.iops), (1100.0, 2500.0));
        assert_eq!(r.rounds_iops, [3000.0, 2000.0, 2500.0]);
        // 300 ticks of 10 ms over 2500 IOPS × (2 s + 1 s of warm-up).
        assert!((r.guest_cpu_us_per_io - 300.0 * 10_000.0 / 7500.0).abs() < 1e-6);
        assert!((r.target_cpu_us_per_io.unwrap() - 100.0 * 10_000.0 / 7500.0).abs() < 1e-6);
        assert_eq!(k.target_cpu_us_per_io, None);
        assert!((r.lat_mean_us - 50.0).abs() < 1e-9);
        // Missing workloads are rows without figures, a failed fio is a failure.
        assert!(rows
            .iter()
            .filter(|r| r.workload.name != w)
            .all(|r| r.kernel.is_none()));
        let bad = format!("@@BEGIN {RNVME}|{w}|1\n@@FAILED 1\n@@END\n");
        let (_, _, failures) = collect_nvmf(&bad, 2);
        assert_eq!(failures.len(), 1);
        let c = NvmfComparison {
            date: "d".into(),
            backend: DeviceBackend::Null,
            setup: vec!["s".into()],
            seconds: 2,
            rounds: 3,
            rows,
            failures: Vec::new(),
        };
        let t = nvmf_table(&c);
        assert!(t.contains("2.27×"), "{t}");
    }
}
