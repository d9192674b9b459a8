//! The CPU cost of `rnvme perf`'s three ways of driving I/O (direct queue pairs, a reactor
//! answering over channels, a reactor completing in callbacks), against the in-process
//! controller model. Run it under callgrind with `tools/benches/perf-overhead.sh`.

use std::time::Duration;

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::model::{Model, ModelConfig};
use rnvme_tools::perf::{run, PerfConfig, Target};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "direct".into());
    let ms: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let model = Model::new(ModelConfig::default());
    let ctrl = Controller::init(
        model,
        ControllerOptions {
            backing: Backing::SmallPages,
            ..Default::default()
        },
    )
    .expect("model bring-up");
    let cfg = PerfConfig {
        duration: Duration::from_millis(ms),
        reactor: mode != "direct",
        reactor_callbacks: mode == "callbacks",
        ..PerfConfig::default()
    };
    let report = run(&[Target { ctrl, nsid: 1 }], &cfg, &mut |_| {}).expect("perf run");
    println!("mode={mode} ios={}", report.total.ios);
}
