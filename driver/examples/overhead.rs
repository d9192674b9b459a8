//! Driver overhead: 4 KiB reads at queue depth 32 against the controller model in
//! instant-completion mode. Run it under callgrind with `driver/benches/overhead.sh`, which
//! subtracts the model's own work (everything below its doorbell handler) from the cost of
//! the I/O loop and prints the instructions the driver spends per I/O.

use std::hint::black_box;

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::{DmaBuffer, DmaSlice};
use rnvme_driver::io::{read_cmd, IoQueuePair};
use rnvme_driver::model::{model_options, Model, ModelConfig};

const DEPTH: usize = 32;

/// Keep DEPTH reads in flight until `ios` have completed. Everything here but the model's
/// doorbell handling is driver work: submit, ring, poll, completion hand-back.
#[inline(never)]
fn workload(qp: &mut IoQueuePair, bufs: &[DmaBuffer], ios: u64) -> u64 {
    let segs: Vec<[DmaSlice<'_>; 1]> = bufs.iter().map(|b| [b.segment()]).collect();
    let mut submitted = 0u64;
    let mut completed = 0u64;
    while completed < ios {
        // Refill the queue to DEPTH, then reap. A buffer may take a new read while an older
        // one into it is in flight: the data is not looked at, only the path is measured.
        while submitted - completed < DEPTH as u64 && submitted < ios {
            let i = (submitted % DEPTH as u64) as usize;
            qp.submit(read_cmd(1, submitted % 4096, 1), &segs[i], submitted)
                .expect("submit");
            submitted += 1;
        }
        completed += qp.poll(DEPTH, |c| debug_assert!(c.status.is_success())) as u64;
    }
    completed
}

fn main() {
    let ios: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let model = Model::new(ModelConfig::default());
    let ctrl = Controller::init(
        model,
        ControllerOptions {
            // RNVME_SHADOW=0 measures the driver with MMIO doorbells only.
            shadow_doorbells: std::env::var("RNVME_SHADOW").map_or(true, |v| v != "0"),
            ..model_options()
        },
    )
    .expect("model bring-up");
    let mut qp = ctrl.create_io_qpair(64).expect("queue pair");
    let bufs: Vec<DmaBuffer> = (0..DEPTH)
        .map(|_| ctrl.alloc(4096).expect("buffer"))
        .collect();
    // Warm up list pages and caches outside the measured function's first call.
    workload(&mut qp, &bufs, 1000);
    let n = black_box(workload(&mut qp, &bufs, ios));
    let s = qp.stats();
    println!(
        "ios={} submitted={} shadow={} sq_doorbells={} cq_doorbells={} sq_shadow_writes={} polls={} idle_polls={}",
        n + 1000,
        s.submitted,
        qp.shadow_doorbells(),
        s.sq_doorbells,
        s.cq_doorbells,
        s.sq_shadow_writes,
        s.polls,
        s.idle_polls
    );
}
