use super::report::*;
use super::results::*;
use super::workloads::*;
use super::*;

const FIO_JSON: &str = r#"fio: some warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
{
  "jobname" : "x", "error" : 0,
  "read" : { "iops" : 11000.5, "bw" : 44002, "total_ios" : 55000,
             "lat_ns" : { "mean" : 2900000.0, "percentile" : { "50.000000" : 2800000, "99.000000" : 5000000 } } },
  "write" : { "iops" : 1000.0, "bw" : 4000, "total_ios" : 5000,
             "lat_ns" : { "mean" : 3900000.0, "percentile" : { "50.000000" : 3800000, "99.000000" : 7000000 } } }
}
  ]
}
"#;

#[test]
fn fio_json_is_read_with_reads_and_writes_together() {
    let m = parse_fio("fio libaio", FIO_JSON).unwrap();
    assert_eq!(m.iops, 12000.5);
    assert_eq!(m.mib_s, 48002.0 / 1024.0);
    // (2900 * 55000 + 3900 * 5000) / 60000
    assert!((m.lat_mean_us - 2983.333).abs() < 0.01, "{}", m.lat_mean_us);
    assert_eq!(m.lat_p99_us, 7000.0);
    assert!(parse_fio("x", "no json").is_err());
    assert!(parse_fio("x", "{\"jobs\": []}").is_err());
}

fn rnvme_json(iops: f64, avg: f64) -> String {
    format!(
        r#"{{"iops": {iops}, "mib_s": 300.5, "lat_us": {{"avg": {avg}, "min": 1, "max": 9, "p50": 2, "p99": 8, "p999": 9}},
          "ios": 10, "errors": 0, "verify_errors": 0, "counters": {{"submitted": 10}}}}"#
    )
}

#[test]
fn sections_lines_ratios_and_targets() {
    let wl = [WORKLOADS[0], WORKLOADS[1]];
    let mut out = String::from("@@INFO kernel 6.1\nnoise\n");
    for (engine, iops, lat) in [
        ("fio io_uring", 6000.0, 160.0),
        ("fio io_uring --hipri", 9000.0, 100.0),
        ("fio libaio", 5000.0, 170.0),
        ("fio psync", 4000.0, 200.0),
        ("fio io_uring_cmd", 8500.0, 110.0),
        ("rnvme fio engine", 28000.0, 31.0),
        ("fio null engine (no device)", 99000.0, 3.0),
    ] {
        for w in &wl {
            let body = FIO_JSON
                .replace("11000.5", &iops.to_string())
                .replace("\"iops\" : 1000.0", "\"iops\" : 0")
                .replace("\"total_ios\" : 5000", "\"total_ios\" : 0")
                .replace("2900000.0", &(lat * 1000.0).to_string());
            out.push_str(&format!("{BEGIN}{engine}|{}\n{body}{END}\n", w.name));
        }
    }
    out.push_str(&format!(
        "{BEGIN}rnvme|{}\n{}\n{END}\n",
        wl[0].name,
        rnvme_json(30000.0, 28.8)
    ));
    out.push_str(&format!(
        "{BEGIN}rnvme --reactor|{}\nrnvme: error: broken\n@@FAILED 1\n{END}\n",
        wl[0].name
    ));
    out.push_str(&format!(
        "{BEGIN}rnvme beside a 10 ms waker|{}\n{}\n{END}\n",
        wl[0].name,
        rnvme_json(20000.0, 45.0)
    ));
    out.push_str(&format!(
        "{BEGIN}rnvme|{}\n{}\n{END}\n",
        wl[1].name,
        rnvme_json(84000.0, 380.0)
    ));
    let (lines, info) = collect(&out, &wl);
    assert_eq!(info, ["kernel 6.1"]);
    let l = &lines[0];
    assert_eq!(l.best_kernel.as_deref(), Some("fio io_uring --hipri"));
    assert!((l.iops_ratio.unwrap() - 30000.0 / 9000.0).abs() < 1e-9);
    assert!(
        (l.lat_ratio.unwrap() - 0.288).abs() < 1e-9,
        "against --hipri's 100 us"
    );
    assert_eq!(l.failures.len(), 3);
    assert!(
        l.failures[0].starts_with("rnvme --reactor: ") && l.failures[0].contains("no JSON object"),
        "{:?}",
        l.failures
    );
    assert_eq!(l.failures[1], "rnvme --reactor --cpus 0: no output");
    assert_eq!(l.failures[2], "rnvme --reactor --callbacks: no output");
    // The second line misses its extra rnvme variants.
    assert_eq!(lines[1].results.len(), 8);
    assert_eq!(lines[1].failures.len(), 5);
    let t = check_targets(&lines);
    let qd32 = &t[0];
    assert_eq!(qd32.got, Some(84000.0 / 6000.0));
    assert_eq!(qd32.met, Some(true));
    assert_eq!(qd32.rounds, [84000.0 / 6000.0], "one round, one ratio");
    let qd1 = &t[2];
    assert!((qd1.got.unwrap() - 28.8 / 160.0).abs() < 1e-9);
    assert_eq!(qd1.met, Some(true));
    assert_eq!(t[1].met, None, "no randwrite line");
    let engine_qd1 = t
        .iter()
        .find(|t| t.what == "4k randread qd1: rnvme fio engine IOPS / rnvme perf")
        .unwrap();
    assert_eq!(engine_qd1.got, Some(28000.0 / 30000.0));
    assert_eq!(engine_qd1.met, Some(true));
    let beside = t
        .iter()
        .find(|t| {
            t.what
                .ends_with("rnvme fio engine IOPS / rnvme perf beside a 10 ms waker")
        })
        .unwrap();
    assert_eq!(beside.got, Some(28000.0 / 20000.0));
    let engine_cmd = t
        .iter()
        .find(|t| t.what == "4k randread qd32: rnvme fio engine IOPS / fio io_uring_cmd")
        .unwrap();
    assert_eq!(engine_cmd.got, Some(28000.0 / 8500.0));
    let c = Comparison {
        backend: DeviceBackend::Threads,
        date: utc(0),
        setup: vec!["x".into()],
        seconds: 5,
        rounds: 1,
        lines,
        targets: t,
        wall_s: 1.0,
    };
    let text = table(&c);
    assert!(text.contains("1970-01-01 00:00 UTC"), "{text}");
    assert!(
        text.contains("3.33x IOPS, 0.29x mean latency (best: fio io_uring --hipri)"),
        "{text}"
    );
    assert!(text.contains("NOT MET") || text.contains("met"));
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(
        v["lines"][0]["results"][0]["engine"],
        "fio null engine (no device)"
    );
    assert_eq!(v["lines"][0]["results"][6]["engine"], "rnvme fio engine");
    assert!(v["lines"][0]["results"][7]["counters"]["submitted"].is_u64());
    assert_eq!(v["lines"][0]["workload"]["depth"], 1);
}

#[test]
fn script_runs_every_engine_and_variant() {
    let s = script(&WORKLOADS, 5, 1);
    let begins = s.matches(BEGIN).count();
    let want: usize = WORKLOADS
        .iter()
        .map(|w| KERNEL_ENGINES.len() + 3 + w.extra.len())
        .sum();
    assert_eq!(begins, want);
    assert_eq!(s.matches("rnvme reset $NVME0").count(), WORKLOADS.len() - 1);
    assert!(
        s.trim_end().ends_with(&format!("echo \"{END}\"")),
        "the last workload keeps the device"
    );
    let three = script(&WORKLOADS, 5, 3);
    assert_eq!(three.matches(BEGIN).count(), 3 * want);
    let n = WORKLOADS.len();
    assert_eq!(three.matches("rnvme setup --hugepages").count(), 3 * n);
    assert_eq!(
        three.matches("rnvme reset $NVME0").count(),
        3 * n - 1,
        "back to the kernel after each workload but the last"
    );
    // Each workload's rnvme variants follow its fio runs.
    let first_perf = three.find("rnvme perf $NVME0").unwrap();
    let second_wl_fio = three
        .find(&format!("fio /tmp/jobs/{}.fio", WORKLOADS[1].name))
        .unwrap();
    assert!(first_perf < second_wl_fio);
    // One job file per workload, written once, every engine a section of it.
    assert_eq!(
        three
            .matches(&format!("cat >/tmp/jobs/{}.fio", WORKLOADS[2].name))
            .count(),
        1
    );
    let job = job_file(&WORKLOADS[2], 5);
    assert!(s.contains(&job));
    for want in [
        "[global]\nrw=randread\nbs=4096\niodepth=32\nnumjobs=2\nthread\n",
        "\nclocksource=cpu\n",
        "\n[null]\nioengine=null\nfilename=null\nsize=1g\n",
        "\n[io_uring-hipri]\nioengine=io_uring\nhipri\nfilename=/dev/nvme0n1\ndirect=1\n",
        "\n[psync]\nioengine=psync\niodepth=1\n",
        "\n[io_uring_cmd]\nioengine=io_uring_cmd\ncmd_type=nvme\nfilename=/dev/ng0n1\nfixedbufs\nregisterfiles\nhipri\n",
        "\n[rnvme]\nioengine=external:/usr/local/lib/librnvme_fio.so\nfilename=trtype=PCIe traddr=${RNVME_TRADDR} ns=1\n",
    ] {
        assert!(job.contains(want), "{want:?} not in\n{job}");
    }
    assert!(job_file(&WORKLOADS[6], 5).contains("rw=randrw\nrwmixread=70\n"));
    assert!(s.contains(
        "rnvme perf $NVME0 -q 32 -o 131072 -w read -t 5 --warmup 1 --threads 1 --json --yes 2>&1"
    ));
    assert!(s.contains("-w randrw -M 70 -t 5"));
    assert!(s.contains("--json --yes --reactor"));
    let setup = s.find("rnvme setup").unwrap();
    let fio = s.match_indices("fio /tmp/jobs/").map(|(i, _)| i);
    assert_eq!(fio.filter(|&i| i < setup).count(), KERNEL_ENGINES.len() + 1);
    let engine = s.find("--section=rnvme ").unwrap();
    assert!(engine > setup && s.find("rnvme perf $NVME0").unwrap() > engine);
    assert!(s.contains("--json --yes --reactor --cpus 0"));
    // The waker variant: plain rnvme perf (no flag) inside the script's waker function, which
    // is defined before any use and gives back the program's exit status.
    let waker = "beside_waker rnvme perf $NVME0 -q 1 -o 4096 -w randread -t 5 --warmup 1 \
                 --threads 1 --json --yes 2>&1 || echo";
    assert!(s.contains(waker), "{s}");
    let def = s.find("beside_waker() {").unwrap();
    assert!(def < s.find("beside_waker rnvme").unwrap());
    assert!(s[def..].contains("\"$@\"; r=$?; kill $w; wait $w 2>/dev/null; return $r; }"));
    assert_eq!(
        rnvme_engine_name(BESIDE_WAKER, &WORKLOADS[0]),
        "rnvme beside a 10 ms waker"
    );
}

#[test]
fn rounds_are_reduced_to_their_median() {
    let wl = [WORKLOADS[0]];
    let mut out = String::new();
    for (iops, avg) in [(30000.0, 30.0), (10000.0, 90.0), (20000.0, 50.0)] {
        out.push_str(&format!(
            "{BEGIN}rnvme|{}\n{}\n{END}\n",
            wl[0].name,
            rnvme_json(iops, avg)
        ));
    }
    // A round that failed is reported; the others still count.
    out.push_str(&format!(
        "{BEGIN}rnvme --reactor|{}\nrnvme: error: broken\n{END}\n{BEGIN}rnvme --reactor|{}\n{}\n{END}\n",
        wl[0].name,
        wl[0].name,
        rnvme_json(5000.0, 200.0)
    ));
    let (lines, _) = collect(&out, &wl);
    let ours = lines[0].get("rnvme").unwrap();
    assert_eq!(
        (ours.iops, ours.lat_mean_us),
        (20000.0, 50.0),
        "the median round, whole"
    );
    assert_eq!(
        ours.rounds
            .iter()
            .map(|r| (r.round, r.iops))
            .collect::<Vec<_>>(),
        [(1, 30000.0), (2, 10000.0), (3, 20000.0)],
        "in the order they ran"
    );
    assert_eq!(ours.rounds[1].lat_mean_us, 90.0);
    // The failed first round of the reactor leaves its second one as round 2.
    let reactor = lines[0].get("rnvme --reactor").unwrap();
    assert_eq!(
        reactor.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(
        round_ratios(reactor, ours, |r| r.iops),
        [0.5],
        "paired with the same round only"
    );
    assert_eq!(lines[0].get("rnvme --reactor").unwrap().iops, 5000.0);
    assert!(lines[0]
        .failures
        .iter()
        .any(|f| f.starts_with("rnvme --reactor: no JSON object")));
    assert!(
        !lines[0]
            .failures
            .iter()
            .any(|f| f == "rnvme --reactor: no output"),
        "{:?}",
        lines[0].failures
    );
    // Two rounds: the lower middle one.
    let two = median_round(vec![
        parse_rnvme("rnvme", &rnvme_json(8.0, 1.0)).unwrap(),
        parse_rnvme("rnvme", &rnvme_json(4.0, 2.0)).unwrap(),
    ])
    .unwrap();
    assert_eq!(two.iops, 4.0);
    assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
    assert_eq!(median(Vec::new()), None);
    assert!(median_round(Vec::new()).is_none());
}

#[test]
fn dates() {
    assert_eq!(utc(0), "1970-01-01 00:00 UTC");
    assert_eq!(utc(951_782_400 + 3661), "2000-02-29 01:01 UTC");
    assert_eq!(utc(1_767_225_600), "2026-01-01 00:00 UTC");
}

#[test]
fn the_engines_time_split_is_read_from_its_stats_line_beside_the_json() {
    let line = "rnvme: rnvme: 4000 io_us; per io_u: 0.45 us submitting, 31.20 us reaping (waiting \
                for the device), 3.10 us in fio between the engine's calls; 3990 of 4000 reaps \
                waited; 1.000 submission and 0.004 completion doorbells per command";
    let body = format!("{line}\n{FIO_JSON}");
    let m = parse_fio(RNVME_FIO.0, &body).unwrap();
    let c = m.counters.clone().unwrap();
    assert_eq!(
        (
            c["submit_us"].as_f64(),
            c["reap_us"].as_f64(),
            c["fio_us"].as_f64()
        ),
        (Some(0.45), Some(31.2), Some(3.1))
    );
    assert!(parse_fio("fio libaio", FIO_JSON)
        .unwrap()
        .counters
        .is_none());
    assert_eq!(engine_time_split("rnvme: 12 io_us; per io_u: broken"), None);
    let line = Line {
        workload: WORKLOADS[0],
        results: vec![m],
        best_kernel: None,
        iops_ratio: None,
        lat_ratio: None,
        failures: Vec::new(),
    };
    let c = Comparison {
        backend: DeviceBackend::Threads,
        date: utc(0),
        setup: Vec::new(),
        seconds: 5,
        rounds: 1,
        lines: vec![line],
        targets: Vec::new(),
        wall_s: 1.0,
    };
    let text = table(&c);
    assert!(
        text.contains("per I/O: 0.5 us submitting, 31.2 us reaping, 3.1 us in fio"),
        "{text}"
    );
}
