//! The target against the in-process controller model, driven by the crate's own small host
//! over loopback TCP: admin bring-up, I/O both ways (in the capsule and by R2T), digests,
//! refusals, and hostile PDUs that end one connection and never the target.

use std::sync::Arc;

use rnvme_driver::controller::Controller;
use rnvme_driver::hw::Hardware;
use rnvme_driver::model::{model_options, Model, ModelConfig};
use rnvme_driver::NvmeStatus;
use rnvme_nvmf::client::{sqe, Client, ClientError};
use rnvme_nvmf::cmd::status;
use rnvme_nvmf::pdu::{fes, CommonHeader};
use rnvme_nvmf::{
    DeviceWait, Limits, Namespace, ServeOptions, Server, Subsystem, Target, DISCOVERY_NQN,
};

const NQN: &str = "nqn.2026-12.io.rnvme:test";
const HOST: &str = "nqn.2026-12.io.rnvme:host-a";

fn serve(read_only: bool, allowed: &[&str]) -> (Server, String) {
    let (_, server, addr) = serve_model(test_model(), read_only, allowed, ServeOptions::default());
    (server, addr)
}

/// The tests' controller: one namespace of 16 384 512-byte blocks, 128 KiB transfers, SGLs.
fn test_model() -> ModelConfig {
    ModelConfig {
        mdts: 5,
        sgl: true,
        ..ModelConfig::one_namespace(512, 1 << 14)
    }
}

/// A target on a model configured by `config`, with `opts` (its listen address and queue
/// entries set here).
fn serve_model(
    config: ModelConfig,
    read_only: bool,
    allowed: &[&str],
    opts: ServeOptions,
) -> (Arc<Model>, Server, String) {
    serve_model_limits(config, read_only, allowed, opts, test_limits())
}

/// The limits of the tests' targets.
fn test_limits() -> Limits {
    Limits {
        in_capsule: 4096,
        max_h2c_data: 8192,
        ..Limits::default()
    }
}

/// [`serve_model`] with `limits`.
fn serve_model_limits(
    config: ModelConfig,
    read_only: bool,
    allowed: &[&str],
    opts: ServeOptions,
    limits: Limits,
) -> (Arc<Model>, Server, String) {
    let model = Model::new(config);
    let hw: Arc<dyn Hardware> = model.clone();
    let ctrl = Arc::new(Controller::init(hw, model_options()).unwrap());
    let sub = Subsystem {
        nqn: NQN.into(),
        serial: "rnvme-test".into(),
        namespaces: vec![Namespace {
            nsid: 1,
            dev: 0,
            dev_nsid: 1,
            lba_size: 512,
            blocks: 1 << 14,
        }],
        allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
        read_only,
    };
    let target = Arc::new(Target::new(vec![ctrl], vec![sub], limits));
    let server = Server::start(
        target,
        &ServeOptions {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            device_queue_entries: 64,
            ..opts
        },
    )
    .unwrap();
    let addr = server.local_addrs()[0].to_string();
    (model, server, addr)
}

fn io_queue(addr: &str, cntlid: u16, hd: bool, dd: bool) -> Client {
    let mut q = Client::connect(addr, hd, dd).unwrap();
    let c = q.fabrics_connect(1, 63, cntlid, NQN, HOST, 0).unwrap();
    assert!(c.status.is_success(), "{}", c.status);
    q
}

fn rw(q: &mut Client, write: bool, slba: u64, data: &[u8], blocks: u32) -> (NvmeStatus, Vec<u8>) {
    let op = if write { 0x01 } else { 0x02 };
    let s = sqe(
        op,
        1,
        [slba as u32, (slba >> 32) as u32, blocks - 1, 0, 0, 0],
    );
    let (c, d) = if write {
        q.command(s, data, 0).unwrap()
    } else {
        q.command(s, &[], blocks * 512).unwrap()
    };
    (c.status, d)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn bring_up_identify_and_io_both_ways() {
    let (server, addr) = serve(false, &[]);
    for (hd, dd) in [(false, false), (true, true)] {
        let mut admin = Client::connect(&addr, hd, dd).unwrap();
        let cntlid = admin.admin_setup(NQN, HOST, 2).unwrap();
        let cap = admin.property_get(0).unwrap();
        assert_eq!(cap & 0xffff, 127, "MQES");
        assert_ne!(cap & 1 << 37, 0, "NVM command set");
        let (c, id) = admin
            .command(sqe(0x06, 0, [1, 0, 0, 0, 0, 0]), &[], 4096)
            .unwrap();
        assert!(c.status.is_success());
        assert_eq!(&id[768..768 + NQN.len()], NQN.as_bytes());
        assert_eq!(u16::from_le_bytes([id[78], id[79]]), cntlid);
        let ioccsz = u32::from_le_bytes(id[1792..1796].try_into().unwrap());
        assert_eq!(ioccsz, (64 + 4096) / 16);
        let (c, list) = admin
            .command(sqe(0x06, 0, [2, 0, 0, 0, 0, 0]), &[], 4096)
            .unwrap();
        assert!(c.status.is_success());
        assert_eq!(&list[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        let (c, ns) = admin
            .command(sqe(0x06, 1, [0, 0, 0, 0, 0, 0]), &[], 4096)
            .unwrap();
        assert!(c.status.is_success());
        assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), 1 << 14);
        let (c, smart) = admin
            .command(
                sqe(0x02, u32::MAX, [0x02 | 127 << 16, 0, 0, 0, 0, 0]),
                &[],
                512,
            )
            .unwrap();
        assert!(c.status.is_success());
        assert_eq!(smart.len(), 512);
        let (c, _) = admin.command(sqe(0x18, 0, [0; 6]), &[], 0).unwrap();
        assert!(c.status.is_success(), "keep alive");

        let mut q = io_queue(&addr, cntlid, hd, dd);
        q.in_capsule = 4096;
        // In the capsule (4 KiB), by R2T over several H2CData PDUs (64 KiB), and reads back.
        for (slba, len) in [(0u64, 4096usize), (100, 65536), (16383, 512)] {
            let data = pattern(len, slba as u8);
            let (s, _) = rw(&mut q, true, slba, &data, (len / 512) as u32);
            assert!(s.is_success(), "write {len} at {slba}: {s}");
            let (s, back) = rw(&mut q, false, slba, &[], (len / 512) as u32);
            assert!(s.is_success(), "read: {s}");
            assert!(back == data, "{len} bytes at {slba} read back differently");
        }
        // Beyond the end, a bad namespace, an unknown opcode, flush.
        let (c, _) = q
            .command(sqe(0x02, 1, [16383, 0, 1, 0, 0, 0]), &[], 1024)
            .unwrap();
        assert_eq!(c.status, status::LBA_OUT_OF_RANGE);
        let (c, _) = q
            .command(sqe(0x02, 9, [0, 0, 0, 0, 0, 0]), &[], 512)
            .unwrap();
        assert_eq!(c.status, status::INVALID_NAMESPACE);
        let (c, _) = q.command(sqe(0x7e, 1, [0; 6]), &[], 0).unwrap();
        assert_eq!(c.status, status::INVALID_OPCODE);
        let (c, _) = q.command(sqe(0x00, 1, [0; 6]), &[], 0).unwrap();
        assert!(c.status.is_success(), "flush: {}", c.status);
        // Write zeroes and deallocate.
        let (c, _) = q.command(sqe(0x08, 1, [0, 0, 7, 0, 0, 0]), &[], 0).unwrap();
        assert!(c.status.is_success(), "write zeroes: {}", c.status);
        let (_, back) = rw(&mut q, false, 0, &[], 8);
        assert!(back.iter().all(|&b| b == 0));
        let mut range = vec![0u8; 16];
        range[4..8].copy_from_slice(&8u32.to_le_bytes());
        range[8..16].copy_from_slice(&100u64.to_le_bytes());
        let (c, _) = q
            .command(sqe(0x09, 1, [0, 1 << 2, 0, 0, 0, 0]), &range, 0)
            .unwrap();
        assert!(c.status.is_success(), "deallocate: {}", c.status);
        // The second I/O queue, and a queue that was not granted.
        let mut q2 = Client::connect(&addr, hd, dd).unwrap();
        let c = q2.fabrics_connect(2, 63, cntlid, NQN, HOST, 0).unwrap();
        assert!(c.status.is_success());
        let mut q3 = Client::connect(&addr, hd, dd).unwrap();
        let c = q3.fabrics_connect(3, 63, cntlid, NQN, HOST, 0).unwrap();
        assert_eq!(c.status, status::CONNECT_INVALID_PARAMETERS);
        assert_eq!(c.dw0, 42, "the offending field: QID");
        let mut q4 = Client::connect(&addr, hd, dd).unwrap();
        let c = q4
            .fabrics_connect(1, 63, cntlid.wrapping_add(100), NQN, HOST, 0)
            .unwrap();
        assert_eq!(c.status, status::CONNECT_INVALID_PARAMETERS);
        assert_eq!(c.dw0, 1 << 16 | 16, "the offending field: CNTLID");
    }
    assert!(server.is_running());
    server.stop();
}

#[test]
fn discovery_lists_the_subsystem_for_allowed_hosts_only() {
    let (server, addr) = serve(false, &[HOST]);
    let port = addr.rsplit(':').next().unwrap().to_string();
    for (host, entries) in [(HOST, 1u64), ("nqn.2026-12.io.rnvme:other", 0)] {
        let mut d = Client::connect(&addr, false, false).unwrap();
        d.admin_setup(DISCOVERY_NQN, host, 0).unwrap();
        let (c, log) = d
            .command(sqe(0x02, 0, [0x70 | 1023 << 16, 0, 0, 0, 0, 0]), &[], 4096)
            .unwrap();
        assert!(c.status.is_success());
        assert_eq!(u64::from_le_bytes(log[8..16].try_into().unwrap()), entries);
        if entries == 1 {
            let e = &log[1024..2048];
            assert_eq!(e[0], 3, "TCP");
            assert_eq!(std::str::from_utf8(&e[32..64]).unwrap().trim(), port);
            assert_eq!(&e[256..256 + NQN.len()], NQN.as_bytes());
            assert_eq!(
                std::str::from_utf8(&e[512..768]).unwrap().trim(),
                "127.0.0.1"
            );
        }
    }
    server.stop();
}

/// A client connected to the discovery subsystem as a host nobody allowed.
fn anyone_on_discovery(addr: &str) -> Client {
    let mut d = Client::connect(addr, false, false).unwrap();
    d.admin_setup(DISCOVERY_NQN, "nqn.2026-12.io.rnvme:anyone", 0)
        .unwrap();
    d
}

#[test]
fn anyone_on_discovery_gets_bounded_answers_and_a_keep_alive() {
    let (server, addr) = serve(false, &[HOST]);
    // A host nobody allowed: the discovery subsystem takes it (with an empty log).
    let mut d = anyone_on_discovery(&addr);
    // Identify with a 4 GiB descriptor, Get Log Page asking 16 GiB in a descriptor as long:
    // refused before anything is allocated.
    let (c, data) = d
        .command(sqe(0x06, 0, [1, 0, 0, 0, 0, 0]), &[], u32::MAX)
        .unwrap();
    assert_eq!(c.status, status::SGL_LENGTH_INVALID);
    assert!(data.is_empty());
    let (c, _) = d
        .command(
            sqe(0x02, 0, [0x70 | 0xffff << 16, 0xffff, 0, 0, 0, 0]),
            &[],
            u32::MAX,
        )
        .unwrap();
    assert_eq!(c.status, status::SGL_LENGTH_INVALID);
    // What fits still reads.
    let (c, log) = d
        .command(sqe(0x02, 0, [0x70 | 1023 << 16, 0, 0, 0, 0, 0]), &[], 4096)
        .unwrap();
    assert!(c.status.is_success());
    assert_eq!(log.len(), 4096);
    // It asked for no keep alive (KATO 0): a discovery controller gets the kernel's 120 s,
    // also when it sets 0 again, so a silent host cannot hold a connection for ever.
    let kato = |d: &mut Client| {
        let (c, _) = d
            .command(sqe(0x0a, 0, [0x0f, 0, 0, 0, 0, 0]), &[], 0)
            .unwrap();
        assert!(c.status.is_success());
        c.dw0
    };
    assert_eq!(kato(&mut d), 120_000);
    let (c, _) = d
        .command(sqe(0x09, 0, [0x0f, 0, 0, 0, 0, 0]), &[], 0)
        .unwrap();
    assert!(c.status.is_success());
    assert_eq!(kato(&mut d), 120_000);
    // A subsystem's controller keeps what its host asks for, none included.
    let mut a = Client::connect(&addr, false, false).unwrap();
    a.admin_setup(NQN, HOST, 1).unwrap();
    assert_eq!(kato(&mut a), 0);
    assert!(server.is_running());
    server.stop();
}

#[test]
fn a_host_that_does_not_read_its_answers_is_not_answered_without_end() {
    let (server, addr) = serve(false, &[HOST]);
    let mut d = anyone_on_discovery(&addr);
    // 8 000 Identify commands (4 KiB answers each: 33 MB) from a writer that never reads.
    let mut pdu = vec![0x04, 0, 72, 0, 72, 0, 0, 0];
    let mut cmd = sqe(0x06, 0, [1, 0, 0, 0, 0, 0]);
    cmd[32..36].copy_from_slice(&4096u32.to_le_bytes());
    cmd[39] = 0x5a;
    pdu.extend_from_slice(&cmd);
    let mut flood = Vec::new();
    for cid in 0..8000u16 {
        let mut p = pdu.clone();
        p[8 + 2..8 + 4].copy_from_slice(&(cid + 100).to_le_bytes());
        flood.extend_from_slice(&p);
    }
    let writer = std::thread::spawn(move || {
        // Blocks once the target stops reading (TCP holds it back): ended by the time limit.
        let _ = d.send_raw_with_timeout(&flood, std::time::Duration::from_secs(3));
        d
    });
    let d = writer.join().unwrap();
    // What is queued for it, as the target reports it, until it stops growing.
    let unsent = || -> usize {
        server
            .report()
            .connections
            .iter()
            .map(|c| c.stats.unsent)
            .sum()
    };
    let (mut last, mut most) = (usize::MAX, 0);
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = unsent();
        most = most.max(now);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    // (The limit, and the answer of the command that crossed it.)
    assert!(
        most <= (8 << 20) + 8192,
        "{most} bytes queued for a host that reads nothing"
    );
    assert!(most > 1 << 20, "{most}: the answers were being queued");
    drop(d);
    // Others are served meanwhile and after.
    let mut a = Client::connect(&addr, false, false).unwrap();
    a.admin_setup(NQN, HOST, 1).unwrap();
    assert!(server.is_running());
    server.stop();
}

#[test]
fn refusals_hosts_subsystems_and_read_only() {
    let (server, addr) = serve(true, &[HOST]);
    let mut a = Client::connect(&addr, false, false).unwrap();
    let c = a
        .fabrics_connect(0, 31, 0xffff, NQN, "nqn.2026-12.io.rnvme:intruder", 0)
        .unwrap();
    assert_eq!(c.status, status::CONNECT_INVALID_HOST);
    assert_eq!(c.dw0, 1 << 16 | 512);
    let c = a
        .fabrics_connect(0, 31, 0xffff, "nqn.2026-12.io.rnvme:nothing", HOST, 0)
        .unwrap();
    assert_eq!(c.status, status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(c.dw0, 1 << 16 | 256);
    // Commands before Connect.
    let (c, _) = a
        .command(sqe(0x06, 0, [1, 0, 0, 0, 0, 0]), &[], 4096)
        .unwrap();
    assert_eq!(c.status, status::COMMAND_SEQUENCE_ERROR);
    let cntlid = a.admin_setup(NQN, HOST, 1).unwrap();
    let mut q = io_queue(&addr, cntlid, false, false);
    q.in_capsule = 4096;
    let (s, _) = rw(&mut q, true, 0, &[1u8; 512], 1);
    assert_eq!(s, status::NS_WRITE_PROTECTED);
    let (s, _) = rw(&mut q, false, 0, &[], 1);
    assert!(s.is_success(), "reads of a read-only export: {s}");
    server.stop();
}

/// A hostile PDU ends its connection with a termination request; the target goes on serving.
#[test]
fn hostile_pdus_end_their_connection_only() {
    let (server, addr) = serve(false, &[]);
    let mut admin = Client::connect(&addr, false, false).unwrap();
    let cntlid = admin.admin_setup(NQN, HOST, 4).unwrap();
    let hdr = |ptype: u8, flags: u8, hlen: u8, pdo: u8, plen: u32| {
        CommonHeader {
            ptype,
            flags,
            hlen,
            pdo,
            plen,
        }
        .encode()
        .to_vec()
    };
    let mut cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        (
            "unknown type",
            hdr(0x42, 0, 24, 0, 24),
            fes::INVALID_HEADER_FIELD,
            true,
        ),
        (
            "bad header length",
            hdr(0x04, 0, 60, 0, 72),
            fes::INVALID_HEADER_FIELD,
            true,
        ),
        (
            "capsule beyond in-capsule size",
            hdr(0x04, 0, 72, 72, 72 + (1 << 20)),
            fes::DATA_LIMIT_EXCEEDED,
            true,
        ),
        (
            "H2CData with no R2T",
            {
                let mut h = hdr(0x06, 0, 24, 24, 24 + 512);
                h.extend_from_slice(&[0; 16]);
                h
            },
            fes::INVALID_HEADER_FIELD,
            true,
        ),
        (
            "a target's PDU type",
            hdr(0x05, 0, 24, 0, 24),
            fes::INVALID_HEADER_FIELD,
            true,
        ),
    ];
    // A digest that does not match.
    cases.push((
        "header digest",
        {
            let mut h = hdr(0x04, 1, 72, 0, 76);
            h.extend_from_slice(&[0; 64]);
            h.extend_from_slice(&[1, 2, 3, 4]);
            h
        },
        fes::HEADER_DIGEST_ERROR,
        false,
    ));
    for (what, bytes, want, plain) in cases {
        let mut c = Client::connect(&addr, !plain, false).unwrap();
        c.send_raw(&bytes).unwrap();
        match c.read_pdu() {
            Err(ClientError::Terminated { fes, .. }) => assert_eq!(fes, want, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Data beyond what the R2T granted.
    let mut q = io_queue(&addr, cntlid, false, false);
    let mut s = sqe(0x01, 1, [0, 0, 15, 0, 0, 0]);
    s[2] = 9;
    s[32..36].copy_from_slice(&8192u32.to_le_bytes());
    s[39] = 0x5a;
    let mut pdu = hdr(0x04, 0, 72, 0, 72);
    pdu.extend_from_slice(&s);
    q.send_raw(&pdu).unwrap();
    let (ch, h, _) = q.read_pdu().unwrap();
    assert_eq!(ch.ptype, 0x09, "R2T");
    let ttag = u16::from_le_bytes([h[10], h[11]]);
    match q
        .h2c_data(9, ttag, 4096, &[0u8; 8192], true)
        .and_then(|_| q.read_pdu().map(|_| ()))
    {
        Err(ClientError::Terminated { fes: f, .. }) => assert_eq!(f, fes::DATA_OUT_OF_RANGE),
        other => panic!("data beyond the R2T: {other:?}"),
    }
    // A Connect for a queue that does not exist.
    let mut q = Client::connect(&addr, false, false).unwrap();
    let c = q.fabrics_connect(9, 63, cntlid, NQN, HOST, 0).unwrap();
    assert_eq!(c.status, status::CONNECT_INVALID_PARAMETERS);
    // Garbage, then the target still serves.
    let mut g = Client::connect(&addr, false, false).unwrap();
    g.send_raw(&[0xff; 300]).unwrap();
    assert!(matches!(g.read_pdu(), Err(ClientError::Terminated { .. })));
    let mut q = io_queue(&addr, cntlid, false, false);
    let (s, _) = rw(&mut q, false, 0, &[], 8);
    assert!(s.is_success());
    assert!(server.is_running());
    server.stop();
}

/// An admin queue that asked for a keep alive timeout and then says nothing is closed, and its
/// controller with it.
#[test]
fn silent_hosts_time_out_by_keep_alive() {
    let (server, addr) = serve(false, &[]);
    let mut a = Client::connect(&addr, false, false).unwrap();
    let c = a.fabrics_connect(0, 31, 0xffff, NQN, HOST, 300).unwrap();
    assert!(c.status.is_success());
    assert_eq!(server.target().ctrl_count(), 1);
    let start = std::time::Instant::now();
    // The target closes the connection: the read ends (no PDU comes).
    assert!(a.read_pdu().is_err(), "the connection stays open");
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(server.target().ctrl_count(), 0, "the controller ended");
    server.stop();
}

/// Compare: equal data succeeds, different data fails with Compare Failure.
#[test]
fn compare_checks_the_data() {
    let (server, addr) = serve(false, &[]);
    let mut a = Client::connect(&addr, false, false).unwrap();
    let cntlid = a.admin_setup(NQN, HOST, 1).unwrap();
    let mut q = io_queue(&addr, cntlid, false, false);
    q.in_capsule = 4096;
    let data = pattern(8192, 7);
    assert!(rw(&mut q, true, 40, &data, 16).0.is_success());
    let (c, _) = q
        .command(sqe(0x05, 1, [40, 0, 15, 0, 0, 0]), &data, 0)
        .unwrap();
    assert!(c.status.is_success(), "compare of equal data: {}", c.status);
    let mut other = data.clone();
    other[5000] ^= 1;
    let (c, _) = q
        .command(sqe(0x05, 1, [40, 0, 15, 0, 0, 0]), &other, 0)
        .unwrap();
    assert_eq!(
        (c.status.sct, c.status.sc),
        (2, 0x85),
        "compare failure: {}",
        c.status
    );
    server.stop();
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any bytes after a good ICReq: the connection ends or answers, the target serves on.
        #[test]
        fn any_bytes_leave_the_target_serving(bytes in proptest::collection::vec(any::<u8>(), 1..600),
                                              hd in any::<bool>()) {
            // Bytes that begin a PDU claiming more leave both sides waiting until the target's
            // connect deadline ends the connection (no Connect came): a short one, so that a
            // case takes a moment and not the default 10 s.
            let (_, server, addr) = serve_model_limits(
                test_model(),
                false,
                &[],
                ServeOptions::default(),
                Limits { connect_timeout_ms: 300, ..test_limits() },
            );
            let mut c = Client::connect(&addr, hd, false).unwrap();
            c.send_raw(&bytes).unwrap();
            // Whatever comes back (a termination request, a response), until the end.
            for _ in 0..16 {
                if c.read_pdu().is_err() {
                    break;
                }
            }
            let mut a = Client::connect(&addr, false, false).unwrap();
            prop_assert!(a.admin_setup(NQN, HOST, 1).is_ok());
            prop_assert!(server.is_running());
            server.stop();
        }

        /// Any command on a connected admin or I/O queue gets an answer (never a crash).
        #[test]
        fn any_command_is_answered(raw in proptest::collection::vec(any::<u8>(), 64),
                                   io in any::<bool>(), len in 0u32..20000) {
            let (server, addr) = serve(false, &[]);
            let mut a = Client::connect(&addr, false, false).unwrap();
            let cntlid = a.admin_setup(NQN, HOST, 1).unwrap();
            let mut q = if io { io_queue(&addr, cntlid, false, false) } else { a };
            q.in_capsule = 4096;
            let mut s = [0u8; 64];
            s.copy_from_slice(&raw);
            if !io && s[0] == 0x0c {
                // An Asynchronous Event Request is held, not answered: another opcode.
                s[0] = 0x0d;
            }
            let data = vec![0x5a; (len % 9000) as usize];
            let r = if raw[1] & 1 == 0 { q.command(s, &[], len) } else { q.command(s, &data, 0) };
            match r {
                Ok(_) | Err(ClientError::Terminated { .. }) => {}
                Err(e) => prop_assert!(false, "{e}"),
            }
            prop_assert!(server.is_running());
            let mut b = Client::connect(&addr, false, false).unwrap();
            prop_assert!(b.admin_setup(NQN, HOST, 0).is_ok());
            server.stop();
        }
    }
}

/// Two devices, each its own subsystem, served by two poll threads: queues of one controller
/// land on both threads, and each subsystem reads back its own data.
#[test]
fn two_devices_two_subsystems_two_threads() {
    let dev = || {
        let hw: Arc<dyn Hardware> = Model::new(ModelConfig::one_namespace(512, 1 << 12));
        Arc::new(Controller::init(hw, model_options()).unwrap())
    };
    let sub = |i: usize| Subsystem {
        nqn: format!("{NQN}-{i}"),
        serial: format!("s{i}"),
        namespaces: vec![Namespace {
            nsid: 1,
            dev: i,
            dev_nsid: 1,
            lba_size: 512,
            blocks: 1 << 12,
        }],
        allowed_hosts: Vec::new(),
        read_only: false,
    };
    let target = Arc::new(Target::new(
        vec![dev(), dev()],
        vec![sub(0), sub(1)],
        Limits::default(),
    ));
    let server = Server::start(
        target,
        &ServeOptions {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            cpus: vec![0, 0],
            device_queue_entries: 64,
            ..ServeOptions::default()
        },
    )
    .unwrap();
    let addr = server.local_addrs()[0].to_string();
    let mut admins = Vec::new();
    let mut queues = Vec::new();
    for i in 0..2u8 {
        let nqn = format!("{NQN}-{i}");
        let mut a = Client::connect(&addr, false, false).unwrap();
        let cntlid = a.admin_setup(&nqn, HOST, 3).unwrap();
        for qid in 1..=3 {
            let mut q = Client::connect(&addr, false, false).unwrap();
            let c = q.fabrics_connect(qid, 31, cntlid, &nqn, HOST, 0).unwrap();
            assert!(c.status.is_success(), "{}", c.status);
            q.in_capsule = 8192;
            let data = pattern(4096, i * 16 + qid as u8);
            assert!(rw(&mut q, true, qid as u64 * 8, &data, 8).0.is_success());
            queues.push((q, i, qid, data));
        }
        admins.push(a);
    }
    for (q, i, qid, data) in &mut queues {
        let (s, back) = rw(q, false, *qid as u64 * 8, &[], 8);
        assert!(s.is_success());
        assert!(
            back == *data,
            "subsystem {i} queue {qid} read another's data"
        );
    }
    // The counters are published every 100 ms.
    let mut r = server.report();
    for _ in 0..50 {
        if r.connections.len() == 8 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        r = server.report();
    }
    let threads: std::collections::BTreeSet<usize> =
        r.connections.iter().map(|c| c.thread).collect();
    assert_eq!(threads.len(), 2, "connections on both threads: {r:?}");
    assert_eq!(r.controllers, 2);
    server.stop();
}

/// The poll thread's counters once it has published them (every 100 ms).
fn thread_report(server: &Server, sleeps_at_least: u64) -> rnvme_nvmf::ThreadReport {
    let t0 = std::time::Instant::now();
    loop {
        let r = server.report();
        let t = r.threads[0].clone();
        if t.sleeps >= sleeps_at_least || t0.elapsed() > std::time::Duration::from_secs(20) {
            return t;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn every_device_wait_serves_io_and_interrupts_wake_a_sleeping_poll_thread() {
    use std::time::Duration;
    let config = || ModelConfig {
        mdts: 5,
        sgl: true,
        ..ModelConfig::one_namespace(512, 1 << 14)
    };
    let cases = [
        (config(), DeviceWait::Interrupt, "interrupt"),
        (
            config(),
            DeviceWait::Timed(Duration::from_micros(200)),
            "timed",
        ),
        (config(), DeviceWait::Busy, "busy"),
        // No vectors: interrupts asked for, polling every 50 µs instead.
        (
            ModelConfig {
                msix_vectors: 0,
                ..config()
            },
            DeviceWait::Interrupt,
            "timed",
        ),
    ];
    for (i, (cfg, wait, shown)) in cases.into_iter().enumerate() {
        let (model, server, addr) = serve_model(
            cfg,
            false,
            &[],
            ServeOptions {
                device_wait: wait,
                spin: Duration::ZERO,
                ..ServeOptions::default()
            },
        );
        // Completions come 2 ms after the doorbell, from another thread: a poll thread
        // with nothing else to do waits for them as `wait` says.
        model.complete_from_thread(Duration::from_millis(2));
        let mut admin = Client::connect(&addr, false, false).unwrap();
        let cntlid = admin.admin_setup(NQN, HOST, 1).unwrap();
        let mut q = io_queue(&addr, cntlid, false, false);
        q.in_capsule = 4096;
        for k in 0..8u64 {
            let data = pattern(2048, (i * 8) as u8 + k as u8);
            let (s, _) = rw(&mut q, true, 64 * k, &data, 4);
            assert!(s.is_success(), "{wait:?} write {k}: {s}");
            let (s, back) = rw(&mut q, false, 64 * k, &[], 4);
            assert!(s.is_success(), "{wait:?} read {k}: {s}");
            assert_eq!(back, data, "{wait:?}: the data read back");
            assert_eq!(model.read_ns(1, 64 * k, 4), data, "{wait:?}: on the device");
        }
        let t = thread_report(&server, 16);
        assert_eq!(t.device_wait, shown, "{wait:?} on case {i}");
        match (wait, shown) {
            (DeviceWait::Interrupt, "interrupt") => {
                // 16 commands, each waited for 2 ms with nothing else to do: the sleeps
                // end by the completion's interrupt (a few by a socket at most).
                assert!(t.sleeps >= 16, "{t:?}");
                assert!(t.device_wakeups >= 12, "woken by the device: {t:?}");
                assert!(model.stats().interrupts >= 12, "{:?}", model.stats());
            }
            (DeviceWait::Busy, _) => {
                assert_eq!(t.device_wakeups, 0, "{t:?}");
                assert_eq!(
                    model.stats().interrupts,
                    0,
                    "a busy thread's queue has none"
                );
            }
            _ => {
                assert!(t.sleeps >= 16, "sleeps between polls: {t:?}");
                assert_eq!(t.device_wakeups, 0, "no vector to wake it: {t:?}");
                assert_eq!(model.stats().interrupts, 0);
            }
        }
        drop(q);
        drop(admin);
        server.stop();
    }
}

#[test]
fn an_adaptive_spin_keeps_polling_through_a_steady_hosts_pauses() {
    use std::time::Duration;
    // A host that sends its next command 200 µs after each answer: with a fixed spin of 0
    // the poll thread sleeps before every command; adaptive, it learns the pauses and polls
    // through most of them (its spin is twice the recent pauses, up to 1 ms).
    let mut sleeps = Vec::new();
    for adaptive in [false, true] {
        let (_model, server, addr) = serve_model(
            ModelConfig::one_namespace(512, 1 << 14),
            false,
            &[],
            ServeOptions {
                spin: Duration::ZERO,
                adaptive_spin: adaptive,
                ..ServeOptions::default()
            },
        );
        let mut admin = Client::connect(&addr, false, false).unwrap();
        let cntlid = admin.admin_setup(NQN, HOST, 1).unwrap();
        let mut q = io_queue(&addr, cntlid, false, false);
        // Let the thread learn its clock's rate (50 ms) before counting.
        std::thread::sleep(Duration::from_millis(120));
        let before = thread_report(&server, 0).sleeps;
        const COMMANDS: u64 = 60;
        for k in 0..COMMANDS {
            std::thread::sleep(Duration::from_micros(200));
            let (s, _) = rw(&mut q, false, k, &[], 1);
            assert!(s.is_success());
        }
        std::thread::sleep(Duration::from_millis(250));
        let after = thread_report(&server, 0).sleeps;
        sleeps.push(after - before);
        eprintln!("adaptive {adaptive}: {} sleeps", after - before);
        drop(q);
        drop(admin);
        server.stop();
    }
    // Fixed: a sleep before each command, and some while idle at the end.
    assert!(sleeps[0] >= 60, "fixed spin: {sleeps:?}");
    assert!(
        sleeps[1] < sleeps[0] / 2,
        "adaptive spin sleeps far less: {sleeps:?}"
    );
}

#[test]
fn an_idle_target_sleeps_until_a_connection_or_the_stop_wakes_it() {
    use std::time::Duration;
    // Quiet poll threads sleep an hour: only the wakes of a new connection and of the stop,
    // and a connection's own traffic, can end their sleeps (the client gives up on an answer
    // after 20 s).
    let (_model, server, addr) = serve_model(
        ModelConfig::one_namespace(512, 1 << 14),
        false,
        &[],
        ServeOptions {
            idle_wait: Duration::from_secs(3600),
            ..ServeOptions::default()
        },
    );
    std::thread::sleep(Duration::from_millis(400));
    let mut admin = Client::connect(&addr, false, false).unwrap();
    let cntlid = admin.admin_setup(NQN, HOST, 1).unwrap();
    let mut q = io_queue(&addr, cntlid, false, false);
    let data = pattern(1024, 7);
    assert!(rw(&mut q, true, 3, &data, 2).0.is_success());
    let before = thread_report(&server, 0).sleeps;
    // 1.2 s without a command: 10 ms sleeps for the first 200 ms, then one long one.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(rw(&mut q, false, 3, &[], 2).1, data);
    let after = thread_report(&server, before + 1).sleeps;
    assert!(
        (1..=40).contains(&(after - before)),
        "{} sleeps in 1.2 s idle (10 ms each would be 120)",
        after - before
    );
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.stop();
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the stop wakes the sleeping poll thread and the acceptor");
}
