//! Namespaces formatted with metadata, on QEMU's emulated NVMe, as a user meets them: 8 bytes
//! per 4 KiB block interleaved with the data (extended LBAs), in a separate buffer (MPTR), and
//! holding type 1 protection information that the controller inserts and strips (PRACT).
//! `rnvme read`/`write` and `perf` move exactly what the format says, the IOMMU sees no stray
//! DMA, and the kernel reads back what rnvme wrote (through its block devices, and for the
//! extended-LBA namespace, which the kernel does not expose as a block device, with nvme-cli on
//! the generic character device).

use std::time::Duration;

use rnvme_tests::{run_guest, Step};
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};

/// 16 blocks of 4 KiB, and of 4 KiB + 8 bytes of metadata.
const DATA: u64 = 16 * 4096;
const EXTENDED: u64 = 16 * 4104;

fn namespace(extended: bool, pi: u8) -> NamespaceSpec {
    NamespaceSpec {
        size_mib: 32,
        lba_size: 4096,
        metadata: 8,
        extended,
        pi,
        ..NamespaceSpec::default()
    }
}

fn clean_perf(step: &Step) -> serde_json::Value {
    let p = step.json();
    assert_eq!(p["errors"].as_u64(), Some(0), "{}", step.describe());
    assert_eq!(p["verify_errors"].as_u64(), Some(0), "{}", step.describe());
    assert!(p["ios"].as_u64() > Some(0), "{}", step.describe());
    p
}

#[test]
fn metadata_formats_move_exactly_what_they_hold_and_the_kernel_reads_them() {
    // The 4 KiB run mixes reads and writes, except on the PI namespace: QEMU writes a block's
    // data and its protection information separately, so a read racing a write of the same
    // block can see new data beside the old guard and fail its check (the 128 KiB runs do not
    // race: one writes, then one reads).
    let perf = |name: &str, ns: u32, mix: &str| {
        format!(
            "step {name}_pw rnvme perf $NVME0/{ns} -q 16 -o 128k -w write -t 1 --range 1024:512 \
             --json --yes\n\
             step {name}_pv rnvme perf $NVME0/{ns} -q 16 -o 128k -w randread -t 1 \
             --range 1024:512 --verify --json\n\
             step {name}_p4 rnvme perf $NVME0/{ns} -q 32 -o 4k -w {mix} -t 1 --range 1024:512 \
             --json --yes\n"
        )
    };
    let body = format!(
        r#"step setup rnvme setup --hugepages 0 $NVME0
step id rnvme identify $NVME0 --json
# Extended LBAs: each block carries its 8 bytes of metadata.
rnd /tmp/d/e {EXTENDED}
rnd /tmp/d/e4k {DATA}
step e_w rnvme write $NVME0 --ns 1 --lba 0 --in /tmp/d/e
step e_r rnvme read $NVME0 --ns 1 --lba 0 --count 16 --out /tmp/d/e.out
step e_cmp same /tmp/d/e /tmp/d/e.out
step e_short rnvme write $NVME0 --ns 1 --lba 100 --in /tmp/d/e4k
step e_meta rnvme read $NVME0 --ns 1 --lba 0 --count 1 --out /tmp/d/x --metadata /tmp/d/xm
{e_perf}
# A separate metadata buffer.
rnd /tmp/d/s {DATA}
rnd /tmp/d/sm 128
step s_nometa rnvme write $NVME0 --ns 2 --lba 0 --in /tmp/d/s
step s_w rnvme write $NVME0 --ns 2 --lba 0 --in /tmp/d/s --metadata /tmp/d/sm
step s_r rnvme read $NVME0 --ns 2 --lba 0 --count 16 --out /tmp/d/s.out --metadata /tmp/d/sm.out
step s_cmp same /tmp/d/s /tmp/d/s.out
step s_mcmp same /tmp/d/sm /tmp/d/sm.out
step s_rnometa rnvme read $NVME0 --ns 2 --lba 0 --count 1 --out /tmp/d/x
{s_perf}
# Type 1 protection information in the 8 bytes: inserted and stripped by the controller.
rnd /tmp/d/p {DATA}
step p_w rnvme write $NVME0 --ns 3 --lba 8 --in /tmp/d/p
step p_r rnvme read $NVME0 --ns 3 --lba 8 --count 16 --out /tmp/d/p.out
step p_cmp same /tmp/d/p /tmp/d/p.out
{p_perf}
step e_cache rnvme mpage bench $NVME0 --ns 1 --lba 0 --mib 1 --rounds 1
step s_cache rnvme mpage bench $NVME0 --ns 2 --lba 0 --mib 1 --rounds 1
step p_cache rnvme mpage bench $NVME0 --ns 3 --lba 2048 --mib 4 --rounds 1 --json
step dmar sh -c 'dmesg | grep -c "DMAR: DRHD: handling fault" || true'
# Back to the kernel.
step reset rnvme reset $NVME0
step kblk2 wait_blk $NVME0 2
step kblk3 wait_blk $NVME0 3
step k_s kread "$(blk $NVME0 2)" 0 {DATA} /tmp/d/ks
step k_s_cmp same /tmp/d/s /tmp/d/ks
step k_p kread "$(blk $NVME0 3)" 32768 {DATA} /tmp/d/kp
step k_p_cmp same /tmp/d/p /tmp/d/kp
C=$(ctrl_of $NVME0)
G=/dev/ng${{C#nvme}}n1
_gi=0; while [ ! -c "$G" ] && [ $_gi -lt 200 ]; do sleep 0.05; _gi=$((_gi + 1)); done
step k_e nvme read "$G" --start-block=0 --block-count=15 --data-size={EXTENDED} --data=/tmp/d/ke
step k_e_cmp same /tmp/d/e /tmp/d/ke
true
"#,
        e_perf = perf("e", 1, "randrw"),
        s_perf = perf("s", 2, "randrw"),
        p_perf = perf("p", 3, "randread"),
    );
    let config = VmConfig {
        controllers: vec![ControllerSpec {
            namespaces: vec![namespace(true, 0), namespace(false, 0), namespace(false, 1)],
            ..ControllerSpec::default()
        }],
        timeout: Duration::from_secs(300),
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &body);
    let s = &run.steps;
    s.ok("setup");
    let id = s.ok("id").json();
    let nss = id["namespaces"].as_array().expect("namespaces");
    assert_eq!(nss.len(), 3, "{id}");
    for ns in nss {
        assert_eq!(ns["metadata_size"], 8, "{ns}");
    }

    s.ok("e_w");
    s.ok("e_r");
    s.ok("e_cmp");
    // 16 blocks of data without their metadata are not a whole number of 4104-byte blocks.
    s.failed("e_short", 2).stderr_has(&["4104"]);
    s.failed("e_meta", 2).stderr_has(&["drop --metadata"]);

    s.failed("s_nometa", 2)
        .stderr_has(&["separate buffer", "--metadata"]);
    for step in ["s_w", "s_r", "s_cmp", "s_mcmp"] {
        s.ok(step);
    }
    s.failed("s_rnometa", 2).stderr_has(&["--metadata"]);

    for step in ["p_w", "p_r", "p_cmp"] {
        s.ok(step);
    }

    for name in ["e", "s", "p"] {
        let w = clean_perf(s.ok(&format!("{name}_pw")));
        assert!(w["ios"].as_u64() >= Some(512 / 32), "{name}: {w}");
        clean_perf(s.ok(&format!("{name}_pv")));
        // (Over blocks written first: on the PI namespace a block never written has no valid
        // guard, and the controller fails its reads.)
        let mixed = s.ok(&format!("{name}_p4")).json();
        assert_eq!(mixed["errors"].as_u64(), Some(0), "{name}: {mixed}");
    }
    // The page cache takes plain blocks only; the controller's PI insertion makes them plain.
    s.failed("e_cache", 1)
        .stderr_has(&["8 bytes of metadata per block interleaved", "page cache"]);
    s.failed("s_cache", 1)
        .stderr_has(&["8 bytes of metadata per block in a separate buffer"]);
    s.ok("p_cache");
    assert_eq!(s.ok("dmar").text().trim(), "0", "the IOMMU saw stray DMA");

    s.ok("reset");
    s.ok("kblk2");
    s.ok("kblk3");
    // The kernel reads rnvme's data; on the PI namespace it checks the guard and the reference
    // tags the controller generated from the LBAs rnvme gave.
    for step in ["k_s", "k_s_cmp", "k_p", "k_p_cmp", "k_e", "k_e_cmp"] {
        s.ok(step);
    }
}
