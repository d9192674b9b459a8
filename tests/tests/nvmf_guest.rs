//! `rnvme serve` in a guest, with the guest kernel's own NVMe/TCP initiator (`nvme-tcp`, driven
//! by nvme-cli) as the host, over the loopback interface:
//!
//! - `nvme discover` lists the subsystem for the allowed host, and not for another;
//! - `nvme connect` gives a block device: ext4 on it, files written, unmounted, disconnected,
//!   connected again: the files are intact;
//! - fio with `verify=crc32c` through the initiator, with writes in the capsule (4 KiB) and by
//!   R2T (128 KiB), and again with header and data digests on;
//! - a second host NQN is refused at Connect;
//! - hostile PDUs from a test client (`nvmf_hostile`) end their connections with termination
//!   requests naming the fault, and the target serves on;
//! - the target is killed (SIGKILL) under a write load and started again: the initiator
//!   reconnects, and what it had flushed before is there;
//! - SIGTERM stops the target cleanly (exit status 0).

use rnvme_tests::{run_guest, test_binary, Steps};
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};

const NQN: &str = "nqn.2014-08.io.rnvme:guest";
const HOST_A: &str = "nqn.2014-08.io.rnvme:host-a";
const HOST_B: &str = "nqn.2014-08.io.rnvme:host-b";

fn script() -> String {
    format!(
        r#"wait_blk $NVME0 1 >/dev/null || exit 1
NQN={NQN}
HA={HOST_A}
HB={HOST_B}
HID=6b1c3f7e-2a55-4c1e-9f3a-0d6c1e2b7a91
C="-t tcp -a 127.0.0.1 -s 4420"
V="--verify=crc32c --verify_fatal=1 --output-format=json"
serve() {{
    RUST_LOG=rnvme_nvmf=info rnvme serve $NVME0 --nqn $NQN --allow-host $HA --stats 5 >>/tmp/serve.log 2>&1 &
    echo $! >/tmp/serve.pid
    for i in $(seq 100); do grep -q "listening on" /tmp/serve.log 2>/dev/null && return 0; sleep 0.1; done
    cat /tmp/serve.log; return 1
}}
# The namespace block device the initiator made for the subsystem.
fab_blk() {{
    for i in $(seq 100); do
        for s in /sys/class/nvme-subsystem/*; do
            [ "$(cat $s/subsysnqn 2>/dev/null)" = "$NQN" ] || continue
            for n in $s/nvme*n1; do [ -b /dev/${{n##*/}} ] && echo /dev/${{n##*/}} && return 0; done
        done
        sleep 0.1
    done
    return 1
}}
conn() {{ nvme connect $C -n $NQN -q $HA -I $HID --reconnect-delay=1 --ctrl-loss-tmo=120 "$@"; }}
step setup rnvme setup --hugepages 0 $NVME0
step serve serve
step discover nvme discover $C -q $HA -I $HID
step discover_other nvme discover $C -q $HB -I $HID
step connect conn
D=$(fab_blk) || {{ echo "no block device for $NQN"; exit 1; }}
mkdir -p /mnt/f
step mkfs mkfs.ext4 -q -F $D
step mount mount -t ext4 $D /mnt/f
step files sh -c 'for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/f/file$i bs=64k count=$((i * 8)) 2>/dev/null || exit 1; done; cd /mnt/f && md5sum file* >/tmp/sums && sync'
step umount umount /mnt/f
step disconnect nvme disconnect -n $NQN
step reconnect conn
D=$(fab_blk) || exit 1
step mount_again mount -t ext4 $D /mnt/f
step files_intact sh -c 'cd /mnt/f && md5sum -c /tmp/sums'
step umount_again umount /mnt/f
step fio_small fio --name=small --filename=$D --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --size=16m --iodepth=16 $V
step fio_large fio --name=large --filename=$D --ioengine=libaio --direct=1 --rw=write --bs=128k --offset=16m --size=32m --iodepth=8 $V
step fio_mixed fio --name=mixed --filename=$D --ioengine=libaio --direct=1 --rw=randwrite --bsrange=512-256k --offset=48m --size=16m --iodepth=32 $V
step disconnect2 nvme disconnect -n $NQN
step connect_digests conn -g -G
D=$(fab_blk) || exit 1
step digests_on sh -c "cat /sys/class/nvme-subsystem/*/nvme*/address; dmesg | grep -i digest | tail -3"
step fio_digests fio --name=dig --filename=$D --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-128k --offset=64m --size=16m --iodepth=16 $V
step disconnect3 nvme disconnect -n $NQN
step refused nvme connect $C -n $NQN -q $HB -I $HID
step hostile nvmf_hostile 127.0.0.1:4420 $NQN $HA
# SIGKILL under a write load: the data flushed before it stays.
step connect4 conn
D=$(fab_blk) || exit 1
dd if=/dev/urandom of=/tmp/pat bs=1M count=16 2>/dev/null
step flushed dd if=/tmp/pat of=$D bs=1M count=16 oflag=direct conv=fsync
kill_under_load() {{
    fio --name=load --filename=$D --ioengine=libaio --direct=1 --rw=randwrite --bs=64k --offset=32m --size=64m --iodepth=16 --time_based --runtime=10 --output-format=json >/tmp/load.json 2>&1 &
    f=$!
    sleep 3
    kill -9 $(cat /tmp/serve.pid)
    echo killed
    sleep 1
    serve || return 1
    echo restarted
    wait $f
    echo "fio ended with $?"
}}
step kill_under_load kill_under_load
step after_restart sh -c 'sleep 3; dd if='$D' bs=1M count=16 iflag=direct 2>/dev/null | md5sum; md5sum </tmp/pat'
step io_after fio --name=after --filename=$D --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --offset=96m --size=4m --iodepth=8 $V
step disconnect4 nvme disconnect -n $NQN
step stop sh -c 'kill -TERM $(cat /tmp/serve.pid); for i in $(seq 100); do kill -0 $(cat /tmp/serve.pid) 2>/dev/null || break; sleep 0.1; done; wait; tail -40 /tmp/serve.log; ! kill -0 $(cat /tmp/serve.pid) 2>/dev/null'
step log cat /tmp/serve.log
"#
    )
}

fn fio_ok(s: &Steps, name: &str, bytes: u64) {
    let step = s.ok(name);
    let out = &step.stdout;
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("{name}: not JSON ({e}):\n{}", step.describe()));
    let j = &v["jobs"][0];
    assert_eq!(j["error"], 0, "{name}: {j}");
    assert_eq!(
        j["write"]["io_bytes"].as_u64(),
        Some(bytes),
        "{name}: written"
    );
    assert_eq!(
        j["read"]["io_bytes"].as_u64(),
        Some(bytes),
        "{name}: verified"
    );
}

#[test]
fn the_kernel_initiator_uses_namespaces_served_by_rnvme() {
    let config = VmConfig {
        controllers: vec![ControllerSpec {
            namespaces: vec![NamespaceSpec {
                size_mib: 128,
                ..NamespaceSpec::default()
            }],
            ..ControllerSpec::default()
        }],
        host_binaries: vec!["fio".into(), "mkfs.ext4".into()],
        kernel_args: vec![rnvme_tools::vm::LOOPBACK_NVME_TCP_ARG.into()],
        files: vec![(
            test_binary("nvmf_hostile"),
            "/usr/local/bin/nvmf_hostile".into(),
        )],
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &script());
    let s = &run.steps;
    s.ok("setup");
    s.ok("serve");
    let d = s.ok("discover");
    assert!(d.stdout.contains(NQN), "{}", d.describe());
    assert!(d.stdout.contains("trtype:  tcp"), "{}", d.describe());
    let d = s.get("discover_other");
    assert!(
        !d.stdout.contains(NQN),
        "another host sees the subsystem: {}",
        d.describe()
    );
    s.ok("connect");
    s.ok("mkfs");
    s.ok("mount");
    s.ok("files");
    s.ok("umount");
    s.ok("disconnect");
    s.ok("reconnect");
    s.ok("mount_again");
    s.ok("files_intact");
    fio_ok(s, "fio_small", 16 << 20);
    fio_ok(s, "fio_large", 32 << 20);
    fio_ok(s, "fio_mixed", 16 << 20);
    s.ok("connect_digests");
    fio_ok(s, "fio_digests", 16 << 20);
    let r = s.get("refused");
    assert_ne!(r.rc, 0, "a host not allowed connected: {}", r.describe());
    let h = s.ok("hostile");
    for case in [
        "unknown-type",
        "header-digest",
        "data-beyond-r2t",
        "garbage",
        "still-serving",
    ] {
        assert!(
            h.stdout.contains(&format!("ok {case}")),
            "{case}: {}",
            h.describe()
        );
    }
    s.ok("connect4");
    s.ok("flushed");
    let k = s.ok("kill_under_load");
    assert!(
        k.stdout.contains("killed") && k.stdout.contains("restarted"),
        "{}",
        k.describe()
    );
    let a = s.ok("after_restart");
    let sums: Vec<&str> = a
        .stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(sums.len(), 2, "{}", a.describe());
    assert_eq!(
        sums[0],
        sums[1],
        "data flushed before the kill changed: {}",
        a.describe()
    );
    fio_ok(s, "io_after", 4 << 20);
    let stop = s.ok("stop");
    assert!(stop.stdout.contains("stopping"), "{}", stop.describe());
    let log = s.ok("log");
    assert!(!log.stdout.contains("panicked"), "{}", log.describe());
    // The poll thread waited for the emulated controller's MSI-X interrupts through VFIO,
    // and they woke it (the counters of the final report, after a restart's workload).
    let woken: Vec<u64> = log
        .stdout
        .lines()
        .filter(|l| l.contains("waits for the device by interrupt"))
        .filter_map(|l| {
            let rest = &l[l.find("sleeps, ")? + "sleeps, ".len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    assert!(
        woken.iter().any(|&n| n > 0),
        "no sleep ended by a completion interrupt: {}",
        log.describe()
    );
}
