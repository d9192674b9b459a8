//! Drives two NVMe controllers from one process with the userspace driver.
//!
//! Usage: `two_controllers BDF0 BDF1 OFFSET LEN OUT0 OUT1`
//!
//! Opens both controllers (each bound to vfio-pci), then on namespace 1 of each:
//! 1. writes LEN bytes at byte OFFSET from one thread, alternating chunks between the two
//!    controllers, so commands of both are outstanding in the same process;
//! 2. reads both ranges back from two threads at the same time and compares them with what was
//!    written;
//! 3. saves the data written to controller i in OUTi, so that the kernel driver can check it
//!    later.
//!
//! Each controller gets its own data (a pseudo-random sequence seeded by its index), so data
//! landing on the wrong controller is caught. Prints one JSON line describing what was done;
//! exits 1 with a one-line error on any failure.

use std::process::ExitCode;

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::DmaBuffer;
use rnvme_driver::io::IoQueuePair;

/// Bytes per command batch of the interleaved write pass (smaller than LEN, so the controllers
/// alternate several times).
const CHUNK: u64 = 256 << 10;

/// Namespace used on both controllers.
const NSID: u32 = 1;

struct Side {
    bdf: String,
    ctrl: Controller,
    lba_size: u64,
    data: Vec<u8>,
}

/// A reproducible pseudo-random byte sequence (xorshift64*), different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `two_controllers BDF0 BDF1 OFFSET LEN OUT0 OUT1`
#[derive(Debug, clap::Parser)]
#[command(name = "two_controllers")]
struct Args {
    /// The first controller (bound to vfio-pci)
    bdf0: String,
    /// The second controller
    bdf1: String,
    /// Byte offset on namespace 1 of each (a multiple of the LBA size)
    offset: u64,
    /// Bytes to write and read back (a positive multiple of the LBA size)
    len: u64,
    /// Where to save the data written to the first controller
    out0: String,
    /// Where to save the data written to the second controller
    out1: String,
}

fn qpair(side: &Side) -> Result<IoQueuePair, String> {
    side.ctrl
        .create_io_qpair(side.ctrl.max_queue_entries().min(64))
        .map_err(|e| format!("{}: cannot create an I/O queue pair: {e}", side.bdf))
}

fn alloc(side: &Side, len: u64) -> Result<DmaBuffer, String> {
    side.ctrl.alloc(len as usize).map_err(|e| {
        format!(
            "{}: cannot allocate {len} bytes of DMA memory: {e}",
            side.bdf
        )
    })
}

/// Reads `len` bytes at `offset` back from `side` and compares them with its data.
fn verify(side: &Side, offset: u64) -> Result<(), String> {
    let mut qp = qpair(side)?;
    let len = side.data.len() as u64;
    let buf = alloc(side, CHUNK.min(len))?;
    let mut host = vec![0u8; buf.len()];
    let mut done = 0u64;
    while done < len {
        let n = CHUNK.min(len - done);
        let lba = (offset + done) / side.lba_size;
        qp.read(NSID, lba, n / side.lba_size, &buf)
            .map_err(|e| format!("{}: read at LBA {lba} failed: {e}", side.bdf))?;
        buf.read_bytes(0, &mut host[..n as usize]);
        let want = &side.data[done as usize..(done + n) as usize];
        if let Some(i) = host[..n as usize]
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
        {
            return Err(format!(
                "{}: byte {} read back as {:#04x}, {:#04x} was written",
                side.bdf,
                offset + done + i as u64,
                host[i],
                want[i]
            ));
        }
        done += n;
    }
    Ok(())
}

fn run(args: &Args) -> Result<String, String> {
    let Args {
        bdf0,
        bdf1,
        offset,
        len,
        out0,
        out1,
    } = args;
    let (offset, len) = (*offset, *len);
    if len == 0 {
        return Err("LEN must be positive".into());
    }
    let mut sides = Vec::new();
    for (i, bdf) in [bdf0, bdf1].into_iter().enumerate() {
        let ctrl = Controller::open(bdf, ControllerOptions::default())
            .map_err(|e| format!("cannot open {bdf}: {e}"))?;
        let ns = ctrl
            .namespace(NSID)
            .map_err(|e| format!("{bdf}: {e}"))?
            .clone();
        let lba_size = u64::from(ns.lba_size);
        if offset % lba_size != 0 || len % lba_size != 0 {
            return Err(format!(
                "{bdf}: OFFSET {offset} and LEN {len} must be multiples of the {lba_size}-byte LBA size"
            ));
        }
        if (offset + len) / lba_size > ns.size_lbas {
            return Err(format!(
                "{bdf}: bytes {offset}..{} are beyond namespace {NSID} ({} LBAs)",
                offset + len,
                ns.size_lbas
            ));
        }
        sides.push(Side {
            bdf: bdf.clone(),
            ctrl,
            lba_size,
            data: pattern(i as u64 + 1, len as usize),
        });
    }

    // Interleaved writes from one thread: chunk k of controller 0, chunk k of controller 1, ...
    let mut qps = Vec::new();
    let mut bufs = Vec::new();
    for s in &sides {
        qps.push(qpair(s)?);
        bufs.push(alloc(s, CHUNK.min(len))?);
    }
    let mut chunks = 0u64;
    let mut done = 0u64;
    while done < len {
        let n = CHUNK.min(len - done);
        for ((s, qp), buf) in sides.iter().zip(qps.iter_mut()).zip(&bufs) {
            buf.write_bytes(0, &s.data[done as usize..(done + n) as usize]);
            let lba = (offset + done) / s.lba_size;
            qp.write(NSID, lba, n / s.lba_size, buf, false)
                .map_err(|e| format!("{}: write at LBA {lba} failed: {e}", s.bdf))?;
        }
        chunks += 1;
        done += n;
    }
    drop(qps);
    drop(bufs);

    // Read back from two threads at once.
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sides
            .iter()
            .map(|s| scope.spawn(move || verify(s, offset)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a verify thread panicked".into()))
            })
            .collect()
    });
    for r in results {
        r?;
    }

    for (s, out) in sides.iter().zip([out0, out1]) {
        std::fs::write(out, &s.data).map_err(|e| format!("cannot write {out}: {e}"))?;
    }
    let described: Vec<serde_json::Value> = sides
        .iter()
        .map(|s| {
            serde_json::json!({
                "bdf": s.bdf,
                "serial": s.ctrl.info().serial,
                "lba_size": s.lba_size,
                "lba": offset / s.lba_size,
                "count": len / s.lba_size,
            })
        })
        .collect();
    Ok(serde_json::json!({
        "controllers": described,
        "interleaved_chunks": chunks,
        "verified": true,
    })
    .to_string())
}

fn main() -> ExitCode {
    // Usage errors: clap's message and exit status 2.
    let args = <Args as clap::Parser>::parse();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("two_controllers: error: {e}");
            ExitCode::FAILURE
        }
    }
}
