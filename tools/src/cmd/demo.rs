//! `rnvme demo`: the main job on an emulated NVMe controller, with no set-up: boot a QEMU
//! guest, bind its controller to vfio-pci, identify it, write and read it back through the
//! userspace driver, check the data with the kernel driver, and measure it side by side
//! with the kernel.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use rnvme_tools::vm::{self, ControllerSpec, NamespaceSpec, VmConfig};

use super::{allow_closed_stdout, out, outln};

/// `rnvme demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seconds each benchmark runs (1 to 60)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub seconds: u32,
}

/// The script run in the guest. `$NVME0` is the controller's PCI address.
fn script(seconds: u32) -> String {
    format!(
        r#"set -e
step() {{ echo; echo "== $*"; }}
step "the emulated controller, on the kernel's nvme driver"
nvme list
step "fill the first 64 MiB through the kernel, so that both drivers read data, not holes"
dd if=/dev/urandom of=/dev/nvme0n1 bs=1M count=64 oflag=direct status=none
step "fio through the kernel (io_uring), 4 KiB random read, depth 32, 1 s warm-up, {seconds} s"
fio --name=kernel --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring --rw=randread --bs=4k \
    --iodepth=32 --time_based --ramp_time=1 --runtime={seconds} --size=64m --norandommap \
    --randrepeat=0 --output-format=terse --terse-version=3 >/tmp/fio.terse
awk -F';' '{{ printf "kernel io_uring: %d IOPS, %.1f MiB/s, mean latency %.1f us\n", $8, $7/1024, $40 }}' /tmp/fio.terse
awk -F';' '{{ print $8 }}' /tmp/fio.terse >/tmp/kernel.iops
step "rnvme setup $NVME0: unbind from nvme, bind to vfio-pci, reserve hugepages"
rnvme setup $NVME0
step "rnvme identify $NVME0"
rnvme identify $NVME0
step "write 4 MiB of random data at LBA 256 with rnvme, read it back with rnvme"
head -c 4194304 /dev/urandom > /tmp/data
rnvme write $NVME0 --ns 1 --lba 256 --in /tmp/data --fua
rnvme read $NVME0 --ns 1 --lba 256 --count 1024 --out /tmp/back
cmp /tmp/data /tmp/back && echo "rnvme read back exactly what it wrote"
step "rnvme perf: the same workload (4 KiB random read, depth 32, same 64 MiB, 1 s warm-up, {seconds} s)"
rnvme perf $NVME0 -q 32 -o 4096 -w randread -t {seconds} --warmup 1 --range 0:16384 --json >/tmp/perf.json
rnvme_iops=$(tr -d '\n ' </tmp/perf.json | sed -E 's/^.*"elapsed_s":[0-9.]+,"iops":([0-9.]+).*$/\1/')
awk -v r="$rnvme_iops" -v k="$(cat /tmp/kernel.iops)" \
    'BEGIN {{ printf "rnvme: %d IOPS, %.1f times the kernel driver with io_uring on the same device\n", r, r / k }}'
step "SMART / health log"
rnvme log $NVME0 smart
step "rnvme reset $NVME0: back to the kernel, which reads the same data"
rnvme reset $NVME0
sleep 1
dd if=/dev/nvme0n1 of=/tmp/kernel bs=4096 skip=256 count=1024 iflag=direct 2>/dev/null
cmp /tmp/data /tmp/kernel && echo "the kernel driver reads exactly what rnvme wrote"
"#
    )
}

pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    let rnvme = super::vm::static_rnvme()?;
    let config = VmConfig {
        controllers: vec![ControllerSpec {
            namespaces: vec![NamespaceSpec {
                size_mib: 512,
                lba_size: 4096,
                ..NamespaceSpec::default()
            }],
            ..ControllerSpec::default()
        }],
        host_binaries: vec!["nvme".into(), "fio".into()],
        files: vec![(rnvme, "/usr/local/bin/rnvme".into())],
        // The boot and the rest, and the two timed runs with their warm-ups.
        timeout: Duration::from_secs(300 + 2 * (a.seconds as u64 + 1)),
        ..VmConfig::default()
    };
    eprintln!("booting a QEMU guest with an emulated NVMe controller (TCG, a few seconds)...");
    let out = vm::run(&config, &script(a.seconds))?;
    // The guest's status decides, whether or not its output was read.
    allow_closed_stdout(out!("{}", out.output))?;
    if out.exit_code != 0 {
        anyhow::bail!(
            "the demo failed in the guest (exit status {})",
            out.exit_code
        );
    }
    outln!(
        "\ndemo done: guest booted to its first command in {:.1} s",
        out.boot_to_script.as_secs_f64()
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_outside_1_to_60_are_refused_before_a_guest_boots() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: DemoArgs,
        }
        let parse = |s: &str| <T as clap::Parser>::try_parse_from(s.split_whitespace());
        for bad in ["0", "61", "200"] {
            let e = parse(&format!("t --seconds {bad}")).err().expect("refused");
            assert!(e.to_string().contains("not in 1..=60"), "{bad}: {e}");
        }
        assert_eq!(parse("t --seconds 60").ok().map(|t| t.a.seconds), Some(60));
        assert_eq!(parse("t").ok().map(|t| t.a.seconds), Some(3));
    }
}
