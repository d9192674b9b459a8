//! Sends an NVMe/TCP target PDUs a well-behaved host never would, each on a connection of its
//! own, and checks that each ends its connection with a termination request (and the fatal
//! error status it names) while the target goes on serving.
//!
//! Usage: `nvmf_hostile ADDR:PORT SUBNQN HOSTNQN`
//!
//! Prints one line per case (`ok CASE fes=0xN`) and exits 0 when every case was terminated as
//! expected and a controller can still be set up afterwards; otherwise prints the failures and
//! exits 1.

use std::process::ExitCode;

use rnvme_nvmf::client::{sqe, Client, ClientError};
use rnvme_nvmf::pdu::{fes, CommonHeader};

fn hdr(ptype: u8, flags: u8, hlen: u8, pdo: u8, plen: u32) -> Vec<u8> {
    CommonHeader {
        ptype,
        flags,
        hlen,
        pdo,
        plen,
    }
    .encode()
    .to_vec()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: nvmf_hostile ADDR:PORT SUBNQN HOSTNQN");
        return ExitCode::from(2);
    }
    let (addr, nqn, host) = (&args[1], &args[2], &args[3]);
    let mut failures = Vec::new();
    let mut h2c_no_r2t = hdr(0x06, 0, 24, 24, 24 + 512);
    h2c_no_r2t.extend_from_slice(&[0; 16]);
    let mut bad_digest = hdr(0x04, 1, 72, 0, 76);
    bad_digest.extend_from_slice(&[0; 64]);
    bad_digest.extend_from_slice(&[1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        (
            "unknown-type",
            hdr(0x42, 0, 24, 0, 24),
            fes::INVALID_HEADER_FIELD,
            false,
        ),
        (
            "bad-header-length",
            hdr(0x04, 0, 60, 0, 72),
            fes::INVALID_HEADER_FIELD,
            false,
        ),
        (
            "capsule-too-big",
            hdr(0x04, 0, 72, 72, 72 + (1 << 20)),
            fes::DATA_LIMIT_EXCEEDED,
            false,
        ),
        (
            "h2cdata-without-r2t",
            h2c_no_r2t,
            fes::INVALID_HEADER_FIELD,
            false,
        ),
        (
            "target-pdu-type",
            hdr(0x05, 0, 24, 0, 24),
            fes::INVALID_HEADER_FIELD,
            false,
        ),
        ("header-digest", bad_digest, fes::HEADER_DIGEST_ERROR, true),
        ("garbage", vec![0xff; 300], fes::INVALID_HEADER_FIELD, false),
    ];
    for (name, bytes, want, digests) in cases {
        let r = Client::connect(addr, digests, false).and_then(|mut c| {
            c.send_raw(&bytes)?;
            c.read_pdu().map(|_| ())
        });
        match r {
            Err(ClientError::Terminated { fes, .. }) if fes == want => {
                println!("ok {name} fes={fes:#x}")
            }
            other => failures.push(format!("{name}: {other:?}")),
        }
    }
    // Data beyond what an R2T asked for, on a connected I/O queue.
    let beyond = (|| -> Result<(), ClientError> {
        let mut a = Client::connect(addr, false, false)?;
        let cntlid = a.admin_setup(nqn, host, 1)?;
        // 8 KiB of namespace 1 in its LBAs.
        let (_, id) = a.command(sqe(0x06, 1, [0; 6]), &[], 4096)?;
        let lbads = id[128 + 4 * (id[26] & 0xf) as usize + 2];
        let blocks = 8192u32 >> lbads.clamp(9, 13);
        let mut q = Client::connect(addr, false, false)?;
        q.fabrics_connect(1, 31, cntlid, nqn, host, 0)?;
        let mut s = sqe(0x01, 1, [0, 0, blocks - 1, 0, 0, 0]);
        s[2] = 9;
        s[32..36].copy_from_slice(&8192u32.to_le_bytes());
        s[39] = 0x5a;
        let mut pdu = hdr(0x04, 0, 72, 0, 72);
        pdu.extend_from_slice(&s);
        q.send_raw(&pdu)?;
        let (ch, h, _) = q.read_pdu()?;
        if ch.ptype != 0x09 {
            return Err(ClientError::Protocol(format!("{:#x} for an R2T", ch.ptype)));
        }
        let ttag = u16::from_le_bytes([h[10], h[11]]);
        q.h2c_data(9, ttag, 4096, &[0u8; 8192], true)?;
        q.read_pdu().map(|_| ())
    })();
    match beyond {
        Err(ClientError::Terminated { fes, .. }) if fes == fes::DATA_OUT_OF_RANGE => {
            println!("ok data-beyond-r2t fes={fes:#x}")
        }
        other => failures.push(format!("data-beyond-r2t: {other:?}")),
    }
    // The target still serves.
    match Client::connect(addr, false, false).and_then(|mut a| a.admin_setup(nqn, host, 1)) {
        Ok(_) => println!("ok still-serving"),
        Err(e) => failures.push(format!("still-serving: {e}")),
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in failures {
            println!("FAILED {f}");
        }
        ExitCode::FAILURE
    }
}
