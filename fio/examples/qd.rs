//! A fio job's engine path without fio: random 4 KiB reads at a depth through [`Job`], the
//! way fio drives it (queue, commit, getevents, event), to tell the engine's own cost from
//! fio's. `qd BDF/NSID DEPTH SECONDS`.

use std::time::Duration;

use rnvme_driver::clock::Stopwatch;

use rnvme_fio::job::{Job, JobParams, Op, Queued};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (name, depth, secs) = (
        a.get(1).map(String::as_str).unwrap_or("0000.00.04.0/1"),
        a.get(2).and_then(|d| d.parse().ok()).unwrap_or(1u32),
        a.get(3).and_then(|d| d.parse().ok()).unwrap_or(3u64),
    );
    let t = rnvme_fio::name::parse(name).expect("filename");
    let ctrl = rnvme_fio::registry::controller(&t.bdf, true).expect("controller");
    let mut j = Job::new(JobParams {
        depth,
        max_bs: 4096,
        dptr: rnvme_driver::queue::DataPointerMode::Auto,
        fua: false,
        ring_at_commit: false,
        stats: true,
    })
    .unwrap();
    j.add_file(0, &t, ctrl).unwrap();
    j.start().unwrap();
    let blocks = j.file_size(0).unwrap().0 / 4096;
    let base = j.iomem_alloc(depth as usize * 4096).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 4096
    };
    for i in 0..depth {
        assert_eq!(
            j.queue(0, Op::Read, next(), 4096, base + i as usize * 4096, i)
                .unwrap(),
            Queued::Queued
        );
    }
    j.commit();
    let start = Stopwatch::start();
    let mut done = 0u64;
    let mut idx = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        for _ in 0..64 {
            let n = j.getevents(1, depth as usize, None);
            idx.clear();
            idx.extend((0..n).map(|i| j.event(i).unwrap().0));
            for &i in &idx {
                j.queue(0, Op::Read, next(), 4096, base + i as usize * 4096, i)
                    .unwrap();
                j.commit();
            }
            done += n as u64;
        }
    }
    println!("{:.0} IOPS", done as f64 / start.elapsed().as_secs_f64());
    if let Some(line) = j.report() {
        println!("{line}");
    }
}
