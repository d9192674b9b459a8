//! The perf engine against the in-process controller model, and its checks without a device.

use std::sync::Arc;
use std::time::Duration;

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::identify::NamespaceInfo;
use rnvme_driver::model::{bring_up, model_options, Model, ModelConfig, ModelNamespace};
use rnvme_driver::queue::DataPointerMode;
use rnvme_driver::NvmeStatus;

use super::*;

fn open_with(cfg: ModelConfig, dptr: DataPointerMode) -> (Arc<Model>, Controller) {
    let (model, ctrl) = bring_up(
        cfg,
        ControllerOptions {
            data_pointer: dptr,
            ..model_options()
        },
    )
    .expect("bring-up against the model");
    (model, ctrl)
}

fn open() -> (Arc<Model>, Controller) {
    open_with(ModelConfig::default(), DataPointerMode::Prp)
}

fn short(pattern: Pattern) -> PerfConfig {
    PerfConfig {
        pattern,
        depth: 8,
        duration: Duration::from_millis(200),
        ..PerfConfig::default()
    }
}

fn run_quiet(targets: &[Target], cfg: &PerfConfig) -> Result<PerfReport, PerfError> {
    run(targets, cfg, &mut |_| {})
}

fn ns(lba_size: u32, size_lbas: u64) -> NamespaceInfo {
    NamespaceInfo {
        nsid: 1,
        size_lbas,
        capacity_lbas: size_lbas,
        utilization_lbas: 0,
        flbas: 0,
        lba_formats: Vec::new(),
        lba_size,
        metadata_size: 0,
        nsfeat: 0,
        dps: 0,
        nguid: [0; 16],
        eui64: [0; 8],
    }
}

const LIMITS: Limits = Limits {
    max_queue_entries: 1024,
    max_transfer: 128 << 10,
    io_queues: 8,
};

fn invalid(r: Result<impl std::fmt::Debug, PerfError>) -> String {
    match r {
        Err(PerfError::Invalid(m)) => m,
        other => panic!("expected an argument error, got {other:?}"),
    }
}

#[test]
fn depth_above_the_queue_limit_is_refused_with_a_hint() {
    let cfg = PerfConfig {
        depth: 1024,
        ..PerfConfig::default()
    };
    let m = invalid(plan_target(&cfg, "x/1", &ns(4096, 1 << 20), &LIMITS));
    assert!(m.contains("1025 entries"), "{m}");
    assert!(m.contains("at most 1024"), "{m}");
    assert!(m.contains("-q 1023"), "{m}");
    // The same depth fits over two queue pairs.
    let cfg = PerfConfig {
        queues_per_thread: 2,
        ..cfg
    };
    let p = plan_target(&cfg, "x/1", &ns(4096, 1 << 20), &LIMITS).unwrap();
    assert_eq!(p.queue_entries, 513);
    // Splitting counts: 512 KiB I/Os are 4 commands of 128 KiB.
    let cfg = PerfConfig {
        depth: 300,
        io_size: 512 << 10,
        ..PerfConfig::default()
    };
    let m = invalid(plan_target(&cfg, "x/1", &ns(4096, 1 << 20), &LIMITS));
    assert!(
        m.contains("1201 entries") && m.contains("4 command(s)"),
        "{m}"
    );
    assert!(m.contains("-q 255"), "{m}");
    let p = plan_target(
        &PerfConfig { depth: 255, ..cfg },
        "x/1",
        &ns(4096, 1 << 20),
        &LIMITS,
    )
    .unwrap();
    assert_eq!(p.pieces.len(), 4);
    assert_eq!(p.queue_entries, 1021);
}

#[test]
fn size_must_be_a_multiple_of_the_lba_size() {
    let cfg = PerfConfig {
        io_size: 6144,
        ..PerfConfig::default()
    };
    let m = invalid(plan_target(
        &cfg,
        "0000:00:04.0/1",
        &ns(4096, 1 << 20),
        &LIMITS,
    ));
    assert!(m.starts_with("0000:00:04.0/1: "), "{m}");
    assert!(
        m.contains("6144 is not a multiple of the namespace's 4096-byte LBA size"),
        "{m}"
    );
    assert!(plan_target(&cfg, "x/1", &ns(512, 1 << 20), &LIMITS).is_ok());
    let m = invalid(
        PerfConfig {
            io_size: 1000,
            ..PerfConfig::default()
        }
        .check(),
    );
    assert!(m.contains("multiple of 512"), "{m}");
}

#[test]
fn range_beyond_the_namespace_is_refused() {
    let cfg = PerfConfig {
        range: Some(LbaRange {
            start: 1000,
            lbas: 25,
        }),
        ..PerfConfig::default()
    };
    let m = invalid(plan_target(&cfg, "x/1", &ns(4096, 1024), &LIMITS));
    assert!(
        m.contains("beyond the namespace, which has 1024 LBAs"),
        "{m}"
    );
    let cfg = PerfConfig {
        range: Some(LbaRange {
            start: 1000,
            lbas: 24,
        }),
        io_size: 8 << 10,
        ..PerfConfig::default()
    };
    let p = plan_target(&cfg, "x/1", &ns(4096, 1024), &LIMITS).unwrap();
    assert_eq!((p.slots, p.blocks_per_io), (12, 2));
    let cfg = PerfConfig {
        range: Some(LbaRange { start: 0, lbas: 1 }),
        io_size: 8 << 10,
        ..PerfConfig::default()
    };
    let m = invalid(plan_target(&cfg, "x/1", &ns(4096, 1024), &LIMITS));
    assert!(m.contains("cannot hold one I/O of 2 LBAs"), "{m}");
    let cfg = PerfConfig {
        range: Some(LbaRange {
            start: u64::MAX,
            lbas: 2,
        }),
        ..PerfConfig::default()
    };
    invalid(plan_target(&cfg, "x/1", &ns(4096, 1024), &LIMITS));
}

#[test]
fn options_that_do_not_fit_the_workload() {
    let cases: [(PerfConfig, &str); 8] = [
        (
            PerfConfig {
                depth: 0,
                ..PerfConfig::default()
            },
            "at least 1",
        ),
        (
            PerfConfig {
                read_percent: Some(70),
                ..PerfConfig::default()
            },
            "-M (read share) applies to the rw and randrw",
        ),
        (
            PerfConfig {
                pattern: Pattern::RandRw,
                read_percent: Some(101),
                ..PerfConfig::default()
            },
            "not a percentage",
        ),
        (
            PerfConfig {
                pattern: Pattern::Read,
                zipf: Some(1.1),
                ..PerfConfig::default()
            },
            "--zipf applies to random",
        ),
        (
            PerfConfig {
                zipf: Some(-1.0),
                ..PerfConfig::default()
            },
            "not a positive exponent",
        ),
        (
            PerfConfig {
                fua: true,
                ..PerfConfig::default()
            },
            "--fua applies to writes",
        ),
        (
            PerfConfig {
                pattern: Pattern::Write,
                verify: true,
                ..PerfConfig::default()
            },
            "--verify checks reads",
        ),
        (
            PerfConfig {
                depth: 2,
                queues_per_thread: 4,
                ..PerfConfig::default()
            },
            "cannot keep 4 queue pairs busy",
        ),
    ];
    for (cfg, want) in cases {
        let m = invalid(cfg.check());
        assert!(m.contains(want), "{m} (wanted {want:?})");
    }
    assert!(PerfConfig::default().check().is_ok());
}

#[test]
fn parsers() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("4k"), Ok(4096));
    assert_eq!(parse_size("128KiB"), Ok(128 << 10));
    assert_eq!(parse_size("1M"), Ok(1 << 20));
    assert!(parse_size("4g").is_err());
    assert!(parse_size("8192m").is_err());
    assert_eq!(
        "10:20".parse::<LbaRange>(),
        Ok(LbaRange {
            start: 10,
            lbas: 20
        })
    );
    assert!("10".parse::<LbaRange>().is_err());
    assert!("10:0".parse::<LbaRange>().is_err());
    assert!("x:1".parse::<LbaRange>().is_err());
    for p in Pattern::ALL {
        assert_eq!(p.name().parse::<Pattern>(), Ok(p));
    }
    assert!("randomread"
        .parse::<Pattern>()
        .unwrap_err()
        .contains("randread"));
}

#[test]
fn too_many_queue_pairs_for_the_controller() {
    let (_m, ctrl) = open();
    let granted = ctrl.io_queues_granted() as u32;
    let cfg = PerfConfig {
        threads: granted,
        queues_per_thread: 2,
        ..short(Pattern::RandRead)
    };
    let t = [Target { ctrl, nsid: 1 }];
    let m = invalid(plan(&t, &cfg));
    assert!(
        m.contains(&format!("needs {} I/O queue pairs", granted * 2)),
        "{m}"
    );
    let m = invalid(plan(
        &[Target {
            ctrl: t[0].ctrl.clone(),
            nsid: 9,
        }],
        &short(Pattern::RandRead),
    ));
    assert!(m.contains("namespace 9 is not active"), "{m}");
    let m = invalid(plan(
        &[t[0].clone(), t[0].clone()],
        &short(Pattern::RandRead),
    ));
    assert!(m.contains("given twice"), "{m}");
}

#[test]
fn short_random_read_completes_without_errors_and_has_the_json_shape() {
    let (model, ctrl) = open();
    let cfg = PerfConfig {
        latency_histogram: true,
        warmup: Duration::from_millis(50),
        ..short(Pattern::RandRead)
    };
    let mut ticks = 0;
    let r = run(&[Target { ctrl, nsid: 1 }], &cfg, &mut |_| ticks += 1).unwrap();
    assert_eq!(r.error_count(), 0);
    assert!(r.total.ios > 0);
    assert_eq!(r.total.reads, r.total.ios);
    assert!(r.total.iops > 0.0 && r.total.mib_s > 0.0);
    let l = &r.total.lat_us;
    assert!(l.min > 0.0 && l.min <= l.p50 && l.p50 <= l.p99 && l.p99 <= l.p999);
    assert!(l.min <= l.avg && l.avg <= l.max);
    assert_eq!(r.threads.len(), 1);
    assert_eq!(r.threads[0].namespaces[0].target, r.namespaces[0].target);
    assert!(r.namespaces[0].target.ends_with("/1"));
    assert_eq!(r.namespaces[0].data_pointer, "PRP");
    // Every command went through the device; doorbells were batched at depth 8.
    let c = &r.counters;
    assert_eq!(c.submitted, c.completed);
    assert!(c.submitted >= r.total.ios);
    assert!(model.stats().reads >= c.submitted);
    assert!(c.sq_doorbells < c.submitted, "{c:?}");

    let v = serde_json::to_value(&r).unwrap();
    for key in [
        "iops",
        "mib_s",
        "ios",
        "errors",
        "lat_us",
        "threads",
        "namespaces",
    ] {
        assert!(v.get(key).is_some(), "no {key} in {v}");
    }
    for key in ["avg", "min", "max", "p50", "p99", "p999"] {
        assert!(v["lat_us"][key].is_f64(), "lat_us.{key}");
    }
    let t = &v["threads"][0];
    for key in [
        "thread",
        "iops",
        "mib_s",
        "ios",
        "errors",
        "lat_us",
        "namespaces",
    ] {
        assert!(t.get(key).is_some(), "no threads[0].{key}");
    }
    assert!(t["namespaces"][0]["lat_us"]["p999"].is_f64());
    assert_eq!(v["percentiles_us"].as_object().unwrap().len(), 9);
    assert!(v["percentiles_us"]["99.99"].is_f64());
    assert_eq!(v["ios"].as_u64(), Some(r.total.ios));
    // Without --latency-histogram there are no percentiles in the JSON.
    let (_m, ctrl) = open();
    let r = run_quiet(&[Target { ctrl, nsid: 1 }], &short(Pattern::RandRead)).unwrap();
    let v = serde_json::to_value(&r).unwrap();
    assert!(v.get("percentiles_us").is_none());
    let table = r.table(false);
    assert!(table.contains("total") && table.contains("IOPS"), "{table}");
}

/// LBAs at the start of a range that a sequential write run of one thread certainly wrote: its
/// stream starts at the range's first slot, each I/O counted in the window queued another one
/// before the end, and every queued I/O completes before the run returns. So at least
/// `depth + writes` I/Os of `blocks` LBAs were written from the start of the range.
fn covered_prefix(w: &PerfReport, depth: u64, blocks: u64, range: u64) -> u64 {
    ((depth + w.total.writes) * blocks).min(range)
}

/// Stamps of `count` LBAs from `lba` as the model holds them: (LBA field, magic field).
fn stamps(model: &Model, lba: u64, count: u64, lba_size: usize) -> Vec<(u64, u64)> {
    let data = model.read_ns(1, lba, count);
    data.chunks(lba_size)
        .map(|b| {
            (
                u64::from_le_bytes(b[0..8].try_into().unwrap()),
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn writes_read_back_with_their_stamps() {
    let (model, ctrl) = open();
    let t = [Target { ctrl, nsid: 1 }];
    let range = LbaRange {
        start: 100,
        lbas: 64,
    };
    // Sequential 8 KiB writes wrap around the 64-LBA range many times.
    let w = run_quiet(
        &t,
        &PerfConfig {
            io_size: 8192,
            range: Some(range),
            fua: true,
            ..short(Pattern::Write)
        },
    )
    .unwrap();
    assert_eq!(w.error_count(), 0);
    assert!(w.total.writes > 0, "{:?}", w.total);
    let covered = covered_prefix(&w, 8, 2, 64);
    assert!(covered >= 16);
    for (i, (l, m)) in stamps(&model, 100, covered, 4096).into_iter().enumerate() {
        assert_eq!((l, m), (100 + i as u64, STAMP_MAGIC), "LBA {}", 100 + i);
    }
    // Nothing outside the range was touched.
    assert!(stamps(&model, 99, 1, 4096)[0] == (0, 0));
    assert!(stamps(&model, 164, 1, 4096)[0] == (0, 0));
    // A verifying random read of what was written finds every stamp.
    let r = run_quiet(
        &t,
        &PerfConfig {
            range: Some(LbaRange {
                start: 100,
                lbas: covered,
            }),
            verify: true,
            ..short(Pattern::RandRead)
        },
    )
    .unwrap();
    assert!(r.total.ios > 0);
    assert_eq!(r.total.verify_errors, 0);
    // And one outside it does not.
    let r = run_quiet(
        &t,
        &PerfConfig {
            range: Some(LbaRange {
                start: 1000,
                lbas: 64,
            }),
            verify: true,
            ..short(Pattern::RandRead)
        },
    )
    .unwrap();
    assert!(r.total.verify_errors > 0);
    assert!(
        r.first_errors[0].error.contains("no rnvme perf stamp"),
        "{:?}",
        r.first_errors
    );
}

#[test]
fn large_ios_are_split_at_the_max_transfer() {
    // MDTS 5: 128 KiB per command; 512 KiB I/Os take 4.
    let (model, ctrl) = open();
    assert_eq!(ctrl.max_transfer_bytes(), 128 << 10);
    let t = [Target { ctrl, nsid: 1 }];
    let range = LbaRange {
        start: 0,
        lbas: 1024,
    };
    let w = run_quiet(
        &t,
        &PerfConfig {
            io_size: 512 << 10,
            depth: 4,
            range: Some(range),
            ..short(Pattern::Write)
        },
    )
    .unwrap();
    assert_eq!(w.error_count(), 0);
    assert_eq!(w.counters.submitted % 4, 0);
    assert!(w.counters.submitted >= 4 * w.total.ios);
    assert_eq!(
        model.stats().bytes_written,
        w.counters.submitted * (128 << 10)
    );
    // Every LBA written carries its stamp across the 128 KiB command boundaries.
    let covered = covered_prefix(&w, 4, 128, 1024);
    assert!(covered >= 512);
    for (i, (l, m)) in stamps(&model, 0, covered, 4096).into_iter().enumerate() {
        assert_eq!((l, m), (i as u64, STAMP_MAGIC), "LBA {i}");
    }
    let r = run_quiet(
        &t,
        &PerfConfig {
            io_size: 512 << 10,
            depth: 4,
            range: Some(LbaRange {
                start: 0,
                lbas: covered,
            }),
            verify: true,
            ..short(Pattern::Read)
        },
    )
    .unwrap();
    assert_eq!(r.error_count(), 0);
    assert!(r.total.ios > 0);
}

#[test]
fn mixed_workload_with_zipf_and_several_threads_queues_and_namespaces() {
    let cfg = ModelConfig {
        namespaces: vec![
            ModelNamespace {
                nsid: 1,
                lba_size: 4096,
                blocks: 4096,
            },
            ModelNamespace {
                nsid: 2,
                lba_size: 512,
                blocks: 65536,
            },
        ],
        ..ModelConfig::default()
    };
    let (_model, ctrl) = open_with(cfg, DataPointerMode::Prp);
    let targets = [
        Target {
            ctrl: ctrl.clone(),
            nsid: 1,
        },
        Target { ctrl, nsid: 2 },
    ];
    let r = run_quiet(
        &targets,
        &PerfConfig {
            threads: 2,
            queues_per_thread: 2,
            read_percent: Some(70),
            zipf: Some(1.1),
            latency_histogram: true,
            ..short(Pattern::RandRw)
        },
    )
    .unwrap();
    assert_eq!(r.error_count(), 0);
    assert_eq!(r.threads.len(), 2);
    assert!(r.threads.iter().all(|t| t.namespaces.len() == 2));
    assert_eq!(r.namespaces.len(), 2);
    assert_eq!(r.namespaces[1].range, (0, 65536));
    let total: u64 = r.threads.iter().map(|t| t.summary.ios).sum();
    assert_eq!(total, r.total.ios);
    let ns_total: u64 = r.namespaces.iter().map(|n| n.summary.ios).sum();
    assert_eq!(ns_total, r.total.ios);
    // 70 % reads, within four binomial standard deviations.
    let n = r.total.ios as f64;
    let reads = r.total.reads as f64 / n;
    let tol = (4.0 * (0.7f64 * 0.3 / n).sqrt()).max(0.02);
    assert!((reads - 0.7).abs() < tol, "read share {reads} of {n} I/Os");
    // Reads and writes apart add up to the total, in every view.
    let t = &r.total;
    assert_eq!(t.read.total_ios, t.reads);
    assert_eq!(t.write.total_ios, t.writes);
    assert_eq!(t.read.total_ios + t.write.total_ios, t.ios);
    assert!((t.read.iops + t.write.iops - t.iops).abs() < 1e-6 * t.iops);
    assert!((t.read.mib_s() + t.write.mib_s() - t.mib_s).abs() < 1e-6 * t.mib_s);
    assert_eq!(t.read.io_bytes, t.read.total_ios * 4096);
    let (rl, wl) = (&t.read.lat_ns, &t.write.lat_ns);
    assert!(rl.min.min(wl.min) as f64 / 1000.0 == t.lat_us.min);
    assert!(rl.max.max(wl.max) as f64 / 1000.0 == t.lat_us.max);
    let mean = (rl.mean * rl.n as f64 + wl.mean * wl.n as f64) / (rl.n + wl.n) as f64;
    assert!((mean / 1000.0 - t.lat_us.avg).abs() < 1e-6 * t.lat_us.avg);
    for th in &r.threads {
        let s = &th.summary;
        assert_eq!(s.read.total_ios + s.write.total_ios, s.ios);
    }
    let table = r.table(true);
    assert!(
        table.contains("99.99%") && table.contains("all "),
        "{table}"
    );
    assert!(table.contains("reads and writes apart:"), "{table}");
    assert!(
        table.contains("total reads") && table.contains("total writes"),
        "{table}"
    );
}

#[test]
fn failed_commands_are_counted_and_reported_and_the_run_goes_on() {
    let (model, ctrl) = open();
    model.fail_lba(1, 3, NvmeStatus::UNRECOVERED_READ_ERROR, None);
    let t = [Target { ctrl, nsid: 1 }];
    let range = LbaRange { start: 0, lbas: 8 };
    let r = run_quiet(
        &t,
        &PerfConfig {
            range: Some(range),
            ..short(Pattern::RandRead)
        },
    )
    .unwrap();
    assert!(r.total.errors > 0);
    assert!(r.total.ios > 0, "the other LBAs still read");
    let e = &r.first_errors[0];
    assert_eq!((e.op, e.lba, e.blocks), ("read", 3, 1));
    assert!(e.error.contains("Unrecovered Read Error"), "{}", e.error);
    assert!(r.first_errors.len() <= 10);
    assert!(r.table(false).contains("Unrecovered Read Error"));

    // --stop-on-error: the run ends at the first error, well before its time.
    let r = run_quiet(
        &t,
        &PerfConfig {
            range: Some(range),
            stop_on_error: true,
            duration: Duration::from_secs(30),
            ..short(Pattern::RandRead)
        },
    )
    .unwrap();
    assert!(r.total.errors >= 1);
    assert!(r.elapsed_s < 10.0, "{}", r.elapsed_s);
}

#[test]
fn reactor_runs_the_same_workload() {
    let (_model, ctrl) = open();
    let t = [Target { ctrl, nsid: 1 }];
    let r = run_quiet(
        &t,
        &PerfConfig {
            reactor: true,
            threads: 2,
            queues_per_thread: 2,
            ..short(Pattern::RandRead)
        },
    )
    .unwrap();
    assert_eq!(r.error_count(), 0);
    assert!(r.total.ios > 0);
    assert_eq!(r.threads.len(), 2);
    let rc = r.counters.reactor.as_ref().expect("reactor counters");
    assert_eq!(rc.requests, r.counters.submitted);
    assert!(r.counters.submitted >= r.total.ios);
    // Writes through the reactor read back too.
    let range = LbaRange {
        start: 0,
        lbas: 128,
    };
    let w = run_quiet(
        &t,
        &PerfConfig {
            reactor: true,
            range: Some(range),
            ..short(Pattern::Write)
        },
    )
    .unwrap();
    assert_eq!(w.error_count(), 0);
    let covered = covered_prefix(&w, 8, 1, 128);
    let r = run_quiet(
        &t,
        &PerfConfig {
            reactor: true,
            range: Some(LbaRange {
                start: 0,
                lbas: covered,
            }),
            verify: true,
            ..short(Pattern::Read)
        },
    )
    .unwrap();
    assert_eq!(r.error_count(), 0);
    assert!(r.total.ios > 0);
}

#[test]
fn reactor_with_callbacks_runs_the_same_workload() {
    let (model, ctrl) = open();
    let t = [Target { ctrl, nsid: 1 }];
    let cfg = PerfConfig {
        reactor: true,
        reactor_callbacks: true,
        threads: 2,
        queues_per_thread: 2,
        ..short(Pattern::RandRead)
    };
    let r = run_quiet(&t, &cfg).unwrap();
    assert_eq!(r.error_count(), 0);
    assert!(r.threads.iter().all(|t| t.summary.ios > 0));
    let rc = r.counters.reactor.as_ref().expect("reactor counters");
    assert_eq!(rc.requests, r.counters.submitted);
    assert!(r.table(false).contains("through a reactor (callbacks)"));
    // Failed commands are counted through the callbacks too.
    model.fail_lba(1, 3, NvmeStatus::UNRECOVERED_READ_ERROR, None);
    let r = run_quiet(
        &t,
        &PerfConfig {
            range: Some(LbaRange { start: 0, lbas: 8 }),
            ..cfg.clone()
        },
    )
    .unwrap();
    assert!(r.total.errors > 0 && r.total.ios > 0);
    assert_eq!(r.first_errors[0].lba, 3);
    // Writes read back.
    let range = LbaRange {
        start: 512,
        lbas: 64,
    };
    let w = run_quiet(
        &t,
        &PerfConfig {
            pattern: Pattern::Write,
            threads: 1,
            queues_per_thread: 1,
            range: Some(range),
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(w.error_count(), 0);
    let covered = covered_prefix(&w, 8, 1, 64);
    for (i, (l, m)) in stamps(&model, 512, covered, 4096).into_iter().enumerate() {
        assert_eq!((l, m), (512 + i as u64, STAMP_MAGIC), "LBA {}", 512 + i);
    }
    let m = invalid(
        PerfConfig {
            reactor: false,
            ..cfg
        }
        .check(),
    );
    assert!(m.contains("--callbacks applies to --reactor"), "{m}");
}

#[test]
fn sgl_data_pointers_are_used_and_reported() {
    let (model, ctrl) = open_with(ModelConfig::default(), DataPointerMode::Sgl);
    let r = run_quiet(
        &[Target { ctrl, nsid: 1 }],
        &PerfConfig {
            io_size: 64 << 10,
            ..short(Pattern::RandRead)
        },
    )
    .unwrap();
    assert_eq!(r.error_count(), 0);
    assert_eq!(r.namespaces[0].data_pointer, "SGL");
    assert!(model.stats().sgl_descriptors > 0);
    assert_eq!(model.stats().prp_list_pages, 0);
}

#[test]
fn file_system_signatures_are_found_on_the_namespace() {
    let (model, ctrl) = open();
    let t = Target { ctrl, nsid: 1 };
    assert!(find_signatures(&t).unwrap().is_empty());
    let mut sb = vec![0u8; 4096];
    sb[1024..1028].copy_from_slice(&1024u32.to_le_bytes());
    sb[1028..1032].copy_from_slice(&4096u32.to_le_bytes());
    sb[1048..1052].copy_from_slice(&2u32.to_le_bytes());
    sb[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
    sb[1100..1104].copy_from_slice(&1u32.to_le_bytes());
    sb[1120..1124].copy_from_slice(&0x40u32.to_le_bytes());
    model.write_ns(1, 0, &sb);
    let s = find_signatures(&t).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].what, "ext4 file system");
}

#[test]
fn threads_and_the_reactor_run_on_the_cpus_given_and_unusable_cpus_are_refused() {
    let (_model, ctrl) = open();
    let t = [Target { ctrl, nsid: 1 }];
    let allowed = rnvme_driver::affinity::allowed_cpus().unwrap();
    let cpus = CpuList::new(vec![*allowed.cpus().last().unwrap()]);
    for reactor in [false, true] {
        let cfg = PerfConfig {
            reactor,
            threads: 2,
            cpus: Some(cpus.clone()),
            ..short(Pattern::RandRead)
        };
        let r = run_quiet(&t, &cfg).unwrap();
        assert_eq!(r.error_count(), 0);
        assert!(r.threads.iter().all(|t| t.summary.ios > 0));
        assert_eq!(r.workload.cpus.as_deref(), Some(cpus.to_string().as_str()));
        assert!(r.table(false).contains(&format!("on CPUs {cpus}")));
    }
    let missing = (0..4096).find(|c| !allowed.contains(*c)).unwrap();
    for reactor in [false, true] {
        let cfg = PerfConfig {
            reactor,
            cpus: Some(CpuList::new(vec![missing])),
            ..short(Pattern::RandRead)
        };
        let m = invalid(run_quiet(&t, &cfg));
        assert!(
            m.starts_with("--cpus: CPU") && m.contains(&allowed.to_string()),
            "{m}"
        );
    }
    let cfg = PerfConfig {
        cpus: Some(CpuList::new(Vec::new())),
        ..short(Pattern::RandRead)
    };
    assert!(invalid(cfg.check()).contains("names no CPU"));

    // The reactor on a CPU of its own, apart from the workers'.
    let first = allowed.cpus()[0];
    let cfg = PerfConfig {
        reactor: true,
        reactor_cpu: Some(first),
        cpus: Some(cpus.clone()),
        ..short(Pattern::RandRead)
    };
    let r = run_quiet(&t, &cfg).unwrap();
    assert_eq!(r.error_count(), 0);
    assert_eq!(r.workload.reactor_cpu, Some(first));
    assert!(
        r.table(false)
            .contains(&format!("on CPUs {cpus}, reactor on CPU {first}")),
        "{}",
        r.table(false)
    );
    // Without it, the reactor takes the first of --cpus, and says so.
    let r = run_quiet(
        &t,
        &PerfConfig {
            reactor_cpu: None,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(r.workload.reactor_cpu, Some(cpus.cpus()[0]));
    let m = invalid(run_quiet(
        &t,
        &PerfConfig {
            reactor_cpu: Some(missing),
            ..cfg.clone()
        },
    ));
    assert!(
        m.starts_with("--reactor-cpu: CPU") && m.contains(&allowed.to_string()),
        "{m}"
    );
    let m = invalid(
        PerfConfig {
            reactor: false,
            ..cfg
        }
        .check(),
    );
    assert!(m.contains("--reactor-cpu applies to --reactor runs"), "{m}");
}

/// Every waiting mode, directly and through the async API: writes land with their stamps, a
/// verifying read finds them, and the report says how it waited and what CPU it used.
#[test]
fn every_mode_directly_and_async_writes_and_verifies() {
    let modes = [
        WaitMode::Polled,
        WaitMode::Interrupt,
        WaitMode::Hybrid {
            spin: Duration::from_micros(30),
        },
    ];
    for async_api in [false, true] {
        for (k, wait) in modes.into_iter().enumerate() {
            let (model, ctrl) = open();
            model.complete_from_thread(Duration::from_micros(40));
            let t = [Target { ctrl, nsid: 1 }];
            let range = LbaRange {
                start: 256 * k as u64,
                lbas: 128,
            };
            let w = run_quiet(
                &t,
                &PerfConfig {
                    io_size: 8192,
                    range: Some(range),
                    wait,
                    async_api,
                    ..short(Pattern::Write)
                },
            )
            .unwrap();
            assert_eq!(w.error_count(), 0, "{wait:?} async {async_api}");
            assert!(w.total.writes > 0);
            assert_eq!(w.mode, wait.name());
            assert_eq!(w.workload.async_api, async_api);
            let covered = covered_prefix(&w, 8, 2, 128);
            for (i, (l, m)) in stamps(&model, range.start, covered, 4096)
                .into_iter()
                .enumerate()
            {
                assert_eq!((l, m), (range.start + i as u64, STAMP_MAGIC));
            }
            let r = run_quiet(
                &t,
                &PerfConfig {
                    range: Some(LbaRange {
                        start: range.start,
                        lbas: covered,
                    }),
                    verify: true,
                    wait,
                    async_api,
                    ..short(Pattern::RandRead)
                },
            )
            .unwrap();
            assert!(r.total.ios > 0);
            assert_eq!(r.error_count(), 0, "{wait:?} async {async_api}");
            let cpu = &r.cpu;
            assert!(cpu.busy_fraction > 0.0, "{cpu:?}");
            assert!(cpu.per_io_us.is_some_and(|us| us > 0.0), "{cpu:?}");
            let json = serde_json::to_value(&r).unwrap();
            assert_eq!(json["mode"], wait.name());
            for k in ["user_s", "system_s", "per_io_us", "busy_fraction"] {
                assert!(json["cpu"][k].is_number(), "cpu.{k} in {json}");
            }
            if wait.needs_interrupts() {
                assert!(model.stats().interrupts > 0, "{wait:?}");
            } else {
                assert_eq!(model.stats().interrupts, 0);
            }
        }
    }
}

#[test]
fn an_idle_run_submits_nothing_and_reports_its_cpu() {
    for wait in [WaitMode::Polled, WaitMode::Interrupt] {
        let (model, ctrl) = open();
        let r = run_quiet(
            &[Target { ctrl, nsid: 1 }],
            &PerfConfig {
                idle: true,
                wait,
                ..short(Pattern::RandRead)
            },
        )
        .unwrap();
        assert_eq!(r.total.ios, 0);
        assert_eq!(model.stats().io_commands, 0);
        assert!(r.cpu.per_io_us.is_none());
        assert!(r.workload.idle);
    }
}

#[test]
fn modes_that_cannot_apply_are_refused() {
    let (_model, ctrl) = open();
    let t = [Target { ctrl, nsid: 1 }];
    let m = invalid(run_quiet(
        &t,
        &PerfConfig {
            wait: WaitMode::Interrupt,
            reactor: true,
            ..short(Pattern::RandRead)
        },
    ));
    assert!(m.contains("the reactor polls"), "{m}");
    let m = invalid(run_quiet(
        &t,
        &PerfConfig {
            async_api: true,
            queues_per_thread: 2,
            ..short(Pattern::RandRead)
        },
    ));
    assert!(m.contains("one queue pair per thread"), "{m}");
    // A device without MSI-X: a clear error from the device, nothing run.
    let (_model, ctrl) = open_with(
        ModelConfig {
            msix_vectors: 0,
            ..ModelConfig::default()
        },
        DataPointerMode::Prp,
    );
    let e = run_quiet(
        &[Target { ctrl, nsid: 1 }],
        &PerfConfig {
            wait: WaitMode::Hybrid {
                spin: Duration::from_micros(10),
            },
            ..short(Pattern::RandRead)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("MSI-X"), "{e}");
}

#[test]
fn thinktime_pauses_each_slot_between_its_ios_and_is_refused_where_it_cannot_apply() {
    let (_m, ctrl) = open();
    let cfg = PerfConfig {
        depth: 1,
        thinktime: Duration::from_millis(20),
        ..short(Pattern::RandRead)
    };
    let r = run_quiet(&[Target { ctrl, nsid: 1 }], &cfg).unwrap();
    // One slot waits 20 ms after each completion before its next I/O: at most one I/O per
    // 20 ms of the measured time, and the latency measured excludes the pause.
    let most = (r.elapsed_s / 0.020).floor() as u64 + 1;
    assert!(
        r.total.ios >= 1 && r.total.ios <= most,
        "{} I/Os in {} s",
        r.total.ios,
        r.elapsed_s
    );
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["workload"]["thinktime_us"].as_u64(), Some(20_000));
    for (async_api, reactor) in [(true, false), (false, true)] {
        let cfg = PerfConfig {
            async_api,
            reactor,
            ..cfg.clone()
        };
        let m = invalid(cfg.check());
        assert!(m.contains("--thinktime-us"), "{m}");
    }
    let m = invalid(
        PerfConfig {
            thinktime: Duration::from_secs(2),
            ..PerfConfig::default()
        }
        .check(),
    );
    assert!(m.contains("over a second"), "{m}");
}

#[test]
fn ring_each_applies_to_async_workers_too() {
    // MMIO doorbells only: each ring of a submission is a register write the counters see.
    for ring_each in [false, true] {
        let (_m, ctrl) = open_with(
            ModelConfig {
                shadow_doorbells: false,
                ..ModelConfig::default()
            },
            DataPointerMode::Prp,
        );
        let cfg = PerfConfig {
            async_api: true,
            ring_each,
            ..short(Pattern::RandRead)
        };
        let r = run_quiet(&[Target { ctrl, nsid: 1 }], &cfg).unwrap();
        let c = &r.counters;
        assert!(c.submitted > 0);
        if ring_each {
            assert_eq!(c.sq_doorbells, c.submitted, "{c:?}");
        } else {
            assert!(c.sq_doorbells < c.submitted, "batched at depth 8: {c:?}");
        }
    }
}
