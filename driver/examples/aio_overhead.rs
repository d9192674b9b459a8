//! The async API's cost over the queue pair used directly: 4 KiB reads at depth 1 and 32
//! against the controller model in instant-completion mode (the model's work is the same on
//! both sides), in nanoseconds per I/O on this machine, with the futures reaping for themselves
//! and with a poller task. `cargo run --release --example
//! aio_overhead --features test-utils [IOS]`.

use std::time::Instant;

use rnvme_driver::aio::{AsyncQueuePair, Drive};
use rnvme_driver::controller::Controller;
use rnvme_driver::io::read_cmd;
use rnvme_driver::irq::WaitMode;
use rnvme_driver::model::{model_options, Model, ModelConfig};

fn main() {
    let ios: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let model = Model::new(ModelConfig::default());
    let ctrl = Controller::init(model, model_options()).expect("bring-up against the model");
    // AIO_ONLY=direct|poll|poller: depth 32 only, that one way (for an instruction profiler).
    let only = std::env::var("AIO_ONLY").ok();
    let depths: &[usize] = if only.is_some() { &[32] } else { &[1, 32] };
    for &depth in depths {
        let bufs: Vec<_> = (0..depth).map(|_| ctrl.alloc(4096).unwrap()).collect();
        // Directly: submit, ring, poll.
        let mut qp = ctrl.create_io_qpair_with(64, WaitMode::Polled).unwrap();
        let t = Instant::now();
        let (mut submitted, mut completed) = (0u64, 0u64);
        let with_direct = only.as_deref().is_none_or(|o| o == "direct");
        while with_direct && completed < ios {
            while submitted - completed < depth as u64 && submitted < ios {
                let i = (submitted % depth as u64) as usize;
                qp.submit(
                    read_cmd(1, submitted % 4096, 1),
                    &[bufs[i].segment()],
                    submitted,
                )
                .unwrap();
                submitted += 1;
            }
            qp.ring();
            completed += qp.poll(depth, |_| {}) as u64;
        }
        let direct = t.elapsed().as_nanos() as f64 / ios as f64;
        drop(qp);
        // Through the async API: a task per slot on a tokio current-thread runtime, reaped by
        // the futures themselves and by a poller task.
        let mut figures = Vec::new();
        if with_direct {
            figures.push(format!("direct {direct:.0} ns per I/O"));
        }
        for drive in [Drive::Poll, Drive::Poller] {
            if only
                .as_deref()
                .is_some_and(|o| !o.eq_ignore_ascii_case(&format!("{drive:?}")))
            {
                continue;
            }
            let q = AsyncQueuePair::new(
                ctrl.create_io_qpair_with(64, WaitMode::Polled).unwrap(),
                drive,
            )
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            let per = ios / depth as u64;
            let mut tasks = Vec::new();
            for b in &bufs {
                let (q, lease) = (q.clone(), b.lease(0, 4096));
                tasks.push(local.spawn_local(async move {
                    for k in 0..per {
                        q.read_lease(1, k % 4096, 1, lease.clone()).await.unwrap();
                    }
                }));
            }
            if drive == Drive::Poller {
                local.spawn_local(q.poller());
            }
            let t = Instant::now();
            rt.block_on(local.run_until(async {
                for t in tasks {
                    t.await.unwrap();
                }
            }));
            let aio = t.elapsed().as_nanos() as f64 / (per * depth as u64) as f64;
            let mut f = format!("{drive:?} {aio:.0} ns");
            if with_direct {
                f += &format!(" ({:.2}x)", direct / aio);
            }
            figures.push(f);
        }
        println!("depth {depth}: {}", figures.join(", "));
    }
}
