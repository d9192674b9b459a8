//! The guest matrix: each entry boots one guest and runs [`run_exercise`] on it (identify
//! against nvme-cli, data both ways between rnvme and the kernel driver, every admin and I/O
//! command). See `rnvme_tests::exercise` for what is checked. (a) and (b) write 9 MiB at once,
//! across rnvme read's 8 MiB step; (c) and (d), about several namespaces and controllers, 2 MiB.

use rnvme_tests::exercise::{run_exercise, Exercise, RNVME_STEP};
use rnvme_tools::vm::{BlkdebugRule, ControllerSpec, NamespaceSpec, VmConfig};

const MIB: u64 = 1 << 20;

fn namespace(lba_size: u32, size_mib: u64) -> NamespaceSpec {
    NamespaceSpec {
        lba_size,
        size_mib,
        ..NamespaceSpec::default()
    }
}

/// (a) One controller, 4 KiB LBAs, QEMU's default MDTS (512 KiB); also text output, SGLs,
/// 4 KiB-page DMA memory, and a read error injected by blkdebug at 200 MiB.
#[test]
fn a_one_controller_4k_lbas_default_mdts() {
    let mut ns = namespace(4096, 256);
    ns.blkdebug.push(BlkdebugRule {
        event: "read_aio".into(),
        errno: 5,
        sector: Some(200 * 2048),
        once: false,
    });
    run_exercise(&Exercise {
        config: VmConfig {
            controllers: vec![ControllerSpec {
                serial: "matrix-a".into(),
                namespaces: vec![ns],
                ..ControllerSpec::default()
            }],
            ..VmConfig::default()
        },
        concurrent: false,
        one_process: false,
        extras: true,
        big_bytes: RNVME_STEP + MIB,
    });
}

/// (b) 512-byte LBAs with mdts=2 (16 KiB): every large transfer is split into many commands
/// (the 9 MiB write into 577).
#[test]
fn b_512_byte_lbas_mdts_2() {
    run_exercise(&Exercise {
        config: VmConfig {
            controllers: vec![ControllerSpec {
                mdts: Some(2),
                namespaces: vec![namespace(512, 256)],
                ..ControllerSpec::default()
            }],
            ..VmConfig::default()
        },
        concurrent: false,
        one_process: false,
        extras: false,
        big_bytes: RNVME_STEP + MIB,
    });
}

/// (c) One controller with two namespaces of different LBA sizes (4096 and 512 bytes).
#[test]
fn c_two_namespaces_of_different_lba_sizes() {
    run_exercise(&Exercise {
        config: VmConfig {
            controllers: vec![ControllerSpec {
                serial: "matrix-c".into(),
                namespaces: vec![namespace(4096, 128), namespace(512, 128)],
                ..ControllerSpec::default()
            }],
            ..VmConfig::default()
        },
        concurrent: false,
        one_process: false,
        extras: false,
        big_bytes: 2 * MIB,
    });
}

/// (d) Two controllers used at once: two rnvme processes run concurrently, then one process
/// (`two_controllers`) drives both.
#[test]
fn d_two_controllers_at_once() {
    run_exercise(&Exercise {
        config: VmConfig {
            controllers: vec![
                ControllerSpec {
                    namespaces: vec![namespace(4096, 128)],
                    ..ControllerSpec::default()
                },
                ControllerSpec {
                    mdts: Some(3),
                    namespaces: vec![namespace(512, 128)],
                    ..ControllerSpec::default()
                },
            ],
            ..VmConfig::default()
        },
        concurrent: true,
        one_process: true,
        extras: false,
        big_bytes: 2 * MIB,
    });
}
