//! `rnvme verify`: write a self-describing pattern over a range of LBAs and read it back, or
//! check a range written earlier (after a crash, a fault test or a reset).
//!
//! Every block carries who it is, so a mismatch says what went wrong and not only that
//! something did. The first 32 bytes of a block are a header:
//!
//! | bytes  | field                                                      |
//! |--------|------------------------------------------------------------|
//! | 0..8   | [`MAGIC`] (`rnvmeVFY`)                                      |
//! | 8..16  | the LBA the block was written to (little-endian)            |
//! | 16..24 | the seed of the run                                         |
//! | 24..28 | the generation (several passes over one range tell apart)   |
//! | 28..32 | CRC-32 of the block without these 4 bytes                   |
//!
//! and the rest comes from a generator seeded by (seed, generation, LBA). A block read back
//! is [`classify`]d against the block expected there:
//!
//! - **misdirected**: a pattern block of another LBA (a write landed at the wrong place);
//! - **stale**: a pattern block of this LBA, but of another seed or generation (a write that
//!   never reached the media, or an old copy);
//! - **torn**: the header is right but whole 512-byte sectors after the first are not (part of
//!   a write reached the media);
//! - **zero**: all zeros (never written, or deallocated);
//! - **corrupt**: anything else (bit flips, foreign data, a damaged header).
//!
//! A "pattern block" has the magic and either a right CRC or at least a first sector that is
//! exactly the pattern its header names: a header damaged in place is corruption, not a stray
//! block.
//!
//! The engine ([`run`]) takes a brought-up [`Controller`], so it runs on the in-process model
//! as well as on a device. Each of `threads` threads gets its own I/O queue pair and a disjoint
//! part of the range and keeps `depth` commands in flight on it. While writing, every
//! `sync_every` LBAs completed in order are made durable with a Flush, and reported: what a
//! progress line names survived even a kill of the process right after it. A command that
//! fails is split into single-LBA commands so that the report names exactly the LBAs that
//! cannot be read or written; the rest of the range goes on.

use std::collections::VecDeque;
use std::fmt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use rnvme_driver::clock::{elapsed_since, Ticks};
use rnvme_driver::controller::Controller;
use rnvme_driver::dma::DmaBuffer;
use rnvme_driver::hw::Hardware;
use rnvme_driver::io::{flush_cmd, read_cmd, write_cmd, IoQueuePair};
use rnvme_driver::queue::{Completion, QueueStats};
use rnvme_driver::spec::{csts, reg, MAX_NLB};
use rnvme_driver::{Error as DriverError, NvmeStatus};
use serde::Serialize;

use super::device::DeviceArgs;
use super::{allow_closed_stdout, outln, UsageError};

/// The first 8 bytes of every pattern block: "rnvmeVFY" in ASCII.
pub const MAGIC: u64 = u64::from_le_bytes(*b"rnvmeVFY");
/// Bytes of the block header.
pub const HEADER_LEN: usize = 32;
/// Where the CRC sits in the header.
const CRC_AT: usize = 28;
/// The unit a device writes atomically at least: torn writes tear at these boundaries.
const SECTOR: usize = 512;
/// Tag of the Flush commands of the write phase (data commands use their slot index).
const FLUSH_TAG: u64 = u64::MAX;
/// How often a command cancelled by a controller reset is sent again.
const RESET_RESUBMITS: u8 = 3;

// ----- CRC-32 -----

/// CRC-32 as in IEEE 802.3, zlib and gzip (reflected polynomial 0xEDB88320), slicing by 8.
mod crc32 {
    const POLY: u32 = 0xedb8_8320;

    const fn tables() -> [[u32; 256]; 8] {
        let mut t = [[0u32; 256]; 8];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { POLY ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut i = 0;
        while i < 256 {
            let mut s = 1;
            while s < 8 {
                let prev = t[s - 1][i];
                t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
                s += 1;
            }
            i += 1;
        }
        t
    }

    static T: [[u32; 256]; 8] = tables();

    /// Continue a CRC (start with [`start`], finish with [`finish`]).
    pub fn update(mut crc: u32, data: &[u8]) -> u32 {
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
            let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            crc = T[7][(lo & 0xff) as usize]
                ^ T[6][((lo >> 8) & 0xff) as usize]
                ^ T[5][((lo >> 16) & 0xff) as usize]
                ^ T[4][(lo >> 24) as usize]
                ^ T[3][(hi & 0xff) as usize]
                ^ T[2][((hi >> 8) & 0xff) as usize]
                ^ T[1][((hi >> 16) & 0xff) as usize]
                ^ T[0][(hi >> 24) as usize];
        }
        for &b in chunks.remainder() {
            crc = (crc >> 8) ^ T[0][((crc ^ b as u32) & 0xff) as usize];
        }
        crc
    }

    pub const fn start() -> u32 {
        u32::MAX
    }

    pub const fn finish(crc: u32) -> u32 {
        !crc
    }

    /// The CRC-32 of `data`.
    #[cfg(test)]
    pub fn of(data: &[u8]) -> u32 {
        finish(update(start(), data))
    }
}

// ----- the pattern -----

/// splitmix64's finaliser.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator of a block's body: splitmix64 from a state derived from all three keys.
struct Fill(u64);

impl Fill {
    fn new(seed: u64, generation: u32, lba: u64) -> Fill {
        Fill(mix(
            seed ^ mix(lba ^ mix(generation as u64 ^ 0x6a09_e667_f3bc_c909))
        ))
    }

    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
}

/// Who a pattern block says it is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The LBA it was written to.
    pub lba: u64,
    /// The seed of the run that wrote it.
    pub seed: u64,
    /// The generation of that run.
    pub generation: u32,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The CRC a block should carry: of everything but the CRC field itself.
fn block_crc(block: &[u8]) -> u32 {
    let c = crc32::update(crc32::start(), &block[..CRC_AT]);
    crc32::finish(crc32::update(c, &block[HEADER_LEN..]))
}

/// Fill `block` (one LBA: at least [`HEADER_LEN`] bytes, a multiple of 8) with the pattern of
/// `stamp`.
pub fn encode(block: &mut [u8], stamp: Stamp) {
    debug_assert!(block.len() >= HEADER_LEN && block.len().is_multiple_of(8));
    block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&stamp.lba.to_le_bytes());
    block[16..24].copy_from_slice(&stamp.seed.to_le_bytes());
    block[24..28].copy_from_slice(&stamp.generation.to_le_bytes());
    let mut f = Fill::new(stamp.seed, stamp.generation, stamp.lba);
    for w in block[HEADER_LEN..].chunks_exact_mut(8) {
        w.copy_from_slice(&f.next().to_le_bytes());
    }
    let crc = block_crc(block);
    block[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// What the header of `block` says, if it has the magic; and whether its CRC matches.
pub fn decode(block: &[u8]) -> Option<(Stamp, bool)> {
    if block.len() < HEADER_LEN || u64_at(block, 0) != MAGIC {
        return None;
    }
    let stamp = Stamp {
        lba: u64_at(block, 8),
        seed: u64_at(block, 16),
        generation: u32_at(block, 24),
    };
    Some((stamp, block_crc(block) == u32_at(block, CRC_AT)))
}

/// What is wrong with a block.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// A pattern block of another LBA.
    Misdirected,
    /// A block of this LBA from another seed or generation.
    Stale,
    /// Header right, whole sectors after the first wrong.
    Torn,
    /// All zeros.
    Zero,
    /// Anything else.
    Corrupt,
}

impl Class {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Class::Misdirected => "misdirected",
            Class::Stale => "stale",
            Class::Torn => "torn",
            Class::Zero => "zero",
            Class::Corrupt => "corrupt",
        }
    }
}

/// One block that is not what was written there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The LBA.
    pub lba: u64,
    /// What is wrong.
    pub class: Class,
    /// The LBA, seed and generation its header names, if it has a pattern header.
    pub found_lba: Option<u64>,
    pub found_seed: Option<u64>,
    pub found_generation: Option<u32>,
    /// Whether its CRC matches its content (a self-consistent block).
    pub checksum_ok: bool,
    /// Bytes that differ from the expected block.
    pub bad_bytes: u32,
    /// Offset of the first of them.
    pub first_bad: u32,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LBA {}: {}", self.lba, self.class.name())?;
        match (self.found_lba, self.found_seed, self.found_generation) {
            (Some(l), Some(s), Some(g)) => write!(
                f,
                ": carries LBA {l}, seed {s:#x}, generation {g}, checksum {}",
                if self.checksum_ok { "ok" } else { "bad" }
            )?,
            _ => write!(f, ": no pattern header")?,
        }
        write!(
            f,
            "; {} bytes differ from the expected block, the first at byte {}",
            self.bad_bytes, self.first_bad
        )
    }
}

/// Count the bytes of `a` that differ from `b`, and the first such offset.
fn diff(a: &[u8], b: &[u8]) -> (u32, u32) {
    let mut n = 0u32;
    let mut first = None;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            n += 1;
            first.get_or_insert(i as u32);
        }
    }
    (n, first.unwrap_or(0))
}

/// Whether the differences of a block whose header is right look like a torn write: the
/// first sector (with the header) is intact and every other differing sector differs in at
/// least three quarters of its 8-byte words (replaced as a whole, not damaged here and there).
fn looks_torn(block: &[u8], expected: &[u8]) -> bool {
    let sector = SECTOR.min(block.len());
    let mut any = false;
    for (i, (s, e)) in block
        .chunks(sector)
        .zip(expected.chunks(sector))
        .enumerate()
    {
        let words = s.len() / 8;
        let differ = s
            .chunks_exact(8)
            .zip(e.chunks_exact(8))
            .filter(|(x, y)| x != y)
            .count();
        if differ == 0 {
            continue;
        }
        if i == 0 || differ * 4 < words * 3 {
            return false;
        }
        any = true;
    }
    any
}

/// Whether the first sector of `block` is that of the pattern of `stamp` (but for the CRC,
/// which covers the whole block). Overwrites `scratch`.
fn first_sector_is(block: &[u8], stamp: Stamp, scratch: &mut [u8]) -> bool {
    encode(scratch, stamp);
    let n = SECTOR.min(block.len());
    block[..CRC_AT] == scratch[..CRC_AT] && block[HEADER_LEN..n] == scratch[HEADER_LEN..n]
}

/// Check `block`, read from the LBA of `want`, against the pattern of `want`. `scratch` (the
/// block size) receives the expected block. None when the block is exactly as expected.
pub fn classify(block: &[u8], want: Stamp, scratch: &mut [u8]) -> Option<Mismatch> {
    encode(scratch, want);
    if block == scratch {
        return None;
    }
    let decoded = decode(block);
    let (bad_bytes, first_bad) = diff(block, scratch);
    let torn = decoded.is_some_and(|(s, _)| s == want) && looks_torn(block, scratch);
    let mut m = Mismatch {
        lba: want.lba,
        class: Class::Corrupt,
        found_lba: None,
        found_seed: None,
        found_generation: None,
        checksum_ok: false,
        bad_bytes,
        first_bad,
    };
    match decoded {
        Some((stamp, crc_ok)) => {
            m.found_lba = Some(stamp.lba);
            m.found_seed = Some(stamp.seed);
            m.found_generation = Some(stamp.generation);
            m.checksum_ok = crc_ok;
            m.class = if stamp == want {
                if torn {
                    Class::Torn
                } else {
                    Class::Corrupt
                }
            } else if crc_ok || first_sector_is(block, stamp, scratch) {
                // A whole block of another LBA or run (its first sector at least: it may be
                // torn as well). A damaged header is corruption, not a stray block.
                if stamp.lba != want.lba {
                    Class::Misdirected
                } else {
                    Class::Stale
                }
            } else {
                Class::Corrupt
            };
        }
        None if block.iter().all(|&b| b == 0) => m.class = Class::Zero,
        None => {}
    }
    Some(m)
}

// ----- the engine -----

/// What to verify and how.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// Namespace.
    pub nsid: u32,
    /// First LBA.
    pub lba: u64,
    /// LBAs; None: to the end of the namespace.
    pub count: Option<u64>,
    /// Write the pattern first (and flush), then read it back.
    pub write: bool,
    /// Seed of the pattern.
    pub seed: u64,
    /// Generation of the pattern.
    pub generation: u32,
    /// Commands in flight per thread.
    pub depth: u32,
    /// Threads, each with its own queue pair and part of the range.
    pub threads: u32,
    /// Bytes per command (a multiple of the LBA size; lowered to the max transfer).
    pub io_size: u32,
    /// While writing, flush after this many LBAs completed in order (per thread); None: 8 MiB
    /// worth.
    pub sync_every: Option<u64>,
    /// Mismatches and I/O errors listed in the report (all are counted).
    pub max_listed: usize,
    /// Command deadline of the queue pairs (None: the driver's default).
    pub command_timeout: Option<Duration>,
}

impl Default for VerifyConfig {
    fn default() -> VerifyConfig {
        VerifyConfig {
            nsid: 1,
            lba: 0,
            count: None,
            write: false,
            seed: 1,
            generation: 0,
            depth: 32,
            threads: 1,
            io_size: 128 << 10,
            sync_every: None,
            max_listed: 20,
            command_timeout: None,
        }
    }
}

/// The longest command deadline `--timeout-ms` takes: an hour.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);

impl VerifyConfig {
    /// The checks that need no controller: zero where zero means nothing, a deadline too
    /// long to wait for.
    pub fn check(&self) -> Result<(), VerifyError> {
        let bad = |m: &str| Err(VerifyError::Invalid(m.into()));
        if self.count == Some(0) {
            return bad("nothing to verify: give --count of at least 1");
        }
        if self.depth == 0 {
            return bad("--depth (-q) must be at least 1");
        }
        if self.threads == 0 {
            return bad("--threads must be at least 1");
        }
        if self.io_size == 0 {
            return bad("--io-size must be at least one LBA");
        }
        if self.sync_every == Some(0) {
            return bad("--sync-every must be at least 1 LBA");
        }
        match self.command_timeout {
            Some(t) if t.is_zero() => bad(
                "--timeout-ms must be at least 1 (a command deadline of 0 ms fails every command)",
            ),
            Some(t) if t > MAX_COMMAND_TIMEOUT => Err(VerifyError::Invalid(format!(
                "--timeout-ms {} is more than an hour ({} ms)",
                t.as_millis(),
                MAX_COMMAND_TIMEOUT.as_millis()
            ))),
            _ => Ok(()),
        }
    }
}

/// Why a verify run could not be done (mismatches are not errors: they are the report).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The configuration does not fit the controller or namespace.
    #[error("{0}")]
    Invalid(String),
    /// The driver failed in a way that stops the run (device removed, no DMA memory, …).
    #[error("{dev}: verify stopped with {done} of {total} LBA reads and writes done")]
    Stopped {
        dev: String,
        done: u64,
        total: u64,
        #[source]
        source: DriverError,
    },
    /// A controller reset cancelled commands and the controller did not come back.
    #[error(
        "{dev}: verify stopped with {done} of {total} LBA reads and writes done: the controller \
         did not come back after a reset (CSTS {csts:#x}); check the device (`rnvme list`, the \
         kernel log) and open it again"
    )]
    ControllerLost {
        dev: String,
        done: u64,
        total: u64,
        csts: u32,
    },
    /// The device stopped answering and the driver did not notice.
    #[error("{dev}: verify stopped: no completion for {secs} s with {outstanding} command(s) outstanding")]
    Stalled {
        dev: String,
        secs: u64,
        outstanding: usize,
    },
}

/// Blocks per class.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    pub misdirected: u64,
    pub stale: u64,
    pub torn: u64,
    pub zero: u64,
    pub corrupt: u64,
}

impl ClassCounts {
    fn add(&mut self, c: Class) {
        match c {
            Class::Misdirected => self.misdirected += 1,
            Class::Stale => self.stale += 1,
            Class::Torn => self.torn += 1,
            Class::Zero => self.zero += 1,
            Class::Corrupt => self.corrupt += 1,
        }
    }

    fn merge(&mut self, o: &ClassCounts) {
        self.misdirected += o.misdirected;
        self.stale += o.stale;
        self.torn += o.torn;
        self.zero += o.zero;
        self.corrupt += o.corrupt;
    }

    /// All mismatching blocks.
    pub fn total(&self) -> u64 {
        self.misdirected + self.stale + self.torn + self.zero + self.corrupt
    }
}

/// An LBA range a command failed on, after retries (single LBAs once a multi-LBA command was
/// split).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IoFailure {
    /// "read", "write" or "flush".
    pub op: &'static str,
    pub lba: u64,
    pub blocks: u32,
    /// The status, as `Name (sct S / sc 0xNN)`.
    pub status: String,
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op == "flush" {
            return write!(f, "flush failed: {}", self.status);
        }
        write!(f, "{} of LBA {}", self.op, self.lba)?;
        if self.blocks > 1 {
            write!(f, "..{}", self.lba + self.blocks as u64)?;
        }
        write!(f, " failed: {}", self.status)
    }
}

/// Driver counters summed over the run's queue pairs.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DriverCounts {
    pub commands: u64,
    pub retries: u64,
    pub timeouts: u64,
    pub aborts: u64,
    pub resets: u64,
    pub cancelled: u64,
    pub spurious: u64,
}

impl DriverCounts {
    fn add(&mut self, s: &QueueStats) {
        self.commands += s.submitted;
        self.retries += s.retries;
        self.timeouts += s.timeouts;
        self.aborts += s.aborts;
        self.resets += s.resets;
        self.cancelled += s.cancelled;
        self.spurious += s.spurious;
    }
}

/// What a run found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub device: String,
    pub nsid: u32,
    pub lba: u64,
    pub count: u64,
    pub lba_size: u32,
    pub seed: u64,
    pub generation: u32,
    pub threads: u32,
    pub depth: u32,
    pub io_size: u32,
    /// LBAs written (successfully) and made durable by the final Flush.
    pub written: u64,
    /// LBAs read back and compared.
    pub checked: u64,
    /// LBAs exactly as expected.
    pub ok: u64,
    /// LBAs that are not, by class.
    pub mismatches: ClassCounts,
    /// LBAs that could not be read.
    pub unreadable: u64,
    /// LBAs that could not be written.
    pub unwritable: u64,
    /// Flushes that failed.
    pub flush_errors: u64,
    /// The first mismatches, by LBA.
    pub first_mismatches: Vec<Mismatch>,
    /// The first I/O failures, by LBA.
    pub io_failures: Vec<IoFailure>,
    pub driver: DriverCounts,
    pub elapsed_s: f64,
}

impl VerifyReport {
    /// Whether everything read back as written and no command failed.
    pub fn clean(&self) -> bool {
        self.mismatches.total() == 0
            && self.unreadable == 0
            && self.unwritable == 0
            && self.flush_errors == 0
    }

    /// The one-line summary.
    pub fn summary(&self) -> String {
        let m = &self.mismatches;
        let mib = (self.written + self.checked) as f64 * self.lba_size as f64 / (1 << 20) as f64;
        format!(
            "verify {} ns {} LBAs {}..{} (seed {:#x}, generation {}): {} written, {} checked, {} ok, \
             {} mismatches (misdirected {}, stale {}, torn {}, zero {}, corrupt {}), {} unreadable, \
             {} unwritable, {} flush errors; {} retries, {} resets; {:.1} MiB in {:.2} s",
            self.device,
            self.nsid,
            self.lba,
            self.lba + self.count,
            self.seed,
            self.generation,
            self.written,
            self.checked,
            self.ok,
            m.total(),
            m.misdirected,
            m.stale,
            m.torn,
            m.zero,
            m.corrupt,
            self.unreadable,
            self.unwritable,
            self.flush_errors,
            self.driver.retries,
            self.driver.resets,
            mib,
            self.elapsed_s
        )
    }
}

/// Progress of the write phase: LBAs `start..synced` of one thread's part are written and
/// flushed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    pub thread: u32,
    pub start: u64,
    pub synced: u64,
    pub end: u64,
}

/// A range of LBAs one command covers, and how often it was sent again after a reset.
#[derive(Copy, Clone, Debug)]
struct Item {
    lba: u64,
    blocks: u32,
    resubmits: u8,
}

/// What one thread found.
#[derive(Default)]
struct Part {
    written: u64,
    checked: u64,
    ok: u64,
    counts: ClassCounts,
    unreadable: u64,
    unwritable: u64,
    flush_errors: u64,
    mismatches: Vec<Mismatch>,
    failures: Vec<IoFailure>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Write,
    Read,
}

/// The parameters every thread shares.
struct Plan {
    dev: String,
    nsid: u32,
    lba_size: usize,
    seed: u64,
    generation: u32,
    depth: usize,
    io_blocks: u32,
    sync_every: u64,
    max_listed: usize,
    /// LBAs to deal with in the whole run (twice the range with the write phase).
    total: u64,
    /// LBAs dealt with so far by all threads.
    done: AtomicU64,
}

/// One thread's queue pair, buffers and part of the range.
struct Worker<'a> {
    plan: &'a Plan,
    thread: u32,
    hw: Arc<dyn Hardware>,
    qp: IoQueuePair,
    bufs: Vec<DmaBuffer>,
    host: Vec<u8>,
    scratch: Vec<u8>,
    start: u64,
    end: u64,
    part: Part,
}

impl Worker<'_> {
    /// The chunk (of `io_blocks` LBAs from `start`) an LBA belongs to.
    fn chunk(&self, lba: u64) -> usize {
        ((lba - self.start) / self.plan.io_blocks as u64) as usize
    }

    fn stopped(&self, source: DriverError) -> VerifyError {
        VerifyError::Stopped {
            dev: self.plan.dev.clone(),
            done: self.plan.done.load(Ordering::Relaxed),
            total: self.plan.total,
            source,
        }
    }

    /// After a reset cancelled commands: fine if the controller is ready again, else the run
    /// stops.
    fn controller_back(&self, stop: &AtomicBool) -> Result<(), VerifyError> {
        let csts = self.hw.read32(reg::CSTS);
        if csts == u32::MAX {
            stop.store(true, Ordering::Relaxed);
            return Err(self.stopped(DriverError::DeviceRemoved {
                dev: self.plan.dev.clone(),
            }));
        }
        if csts & csts::RDY == 0 || csts & csts::CFS != 0 {
            stop.store(true, Ordering::Relaxed);
            return Err(VerifyError::ControllerLost {
                dev: self.plan.dev.clone(),
                done: self.plan.done.load(Ordering::Relaxed),
                total: self.plan.total,
                csts,
            });
        }
        Ok(())
    }

    fn record_failure(&mut self, f: IoFailure) {
        if self.part.failures.len() < self.plan.max_listed {
            self.part.failures.push(f);
        }
    }

    /// Check the blocks of a completed read in `self.bufs[slot]`.
    fn check(&mut self, slot: usize, item: Item) {
        let ls = self.plan.lba_size;
        let bytes = item.blocks as usize * ls;
        self.bufs[slot].read_bytes(0, &mut self.host[..bytes]);
        for i in 0..item.blocks as usize {
            let lba = item.lba + i as u64;
            let want = Stamp {
                lba,
                seed: self.plan.seed,
                generation: self.plan.generation,
            };
            let block = &self.host[i * ls..(i + 1) * ls];
            self.part.checked += 1;
            match classify(block, want, &mut self.scratch) {
                None => self.part.ok += 1,
                Some(m) => {
                    log::debug!("{}: {m}", self.plan.dev);
                    self.part.counts.add(m.class);
                    if self.part.mismatches.len() < self.plan.max_listed {
                        self.part.mismatches.push(m);
                    }
                }
            }
        }
    }

    /// Run one phase over this worker's part. `synced` hears of every Flush that completed.
    fn phase(
        &mut self,
        phase: Phase,
        stop: &AtomicBool,
        synced: &(dyn Fn(Synced) + Sync),
    ) -> Result<(), VerifyError> {
        let plan = self.plan;
        let ls = plan.lba_size;
        let io = plan.io_blocks as u64;
        let chunks = (self.end - self.start).div_ceil(io) as usize;
        // Write phase: LBAs of each chunk not yet dealt with, for the in-order watermark.
        let mut remaining: Vec<u32> = match phase {
            Phase::Write => (0..chunks)
                .map(|c| (io.min(self.end - self.start - c as u64 * io)) as u32)
                .collect(),
            Phase::Read => Vec::new(),
        };
        let mut watermark = 0usize; // chunks fully dealt with, in order
        let mut flushed_to = self.start;
        let mut flush_pending: Option<u64> = None;
        let mut next = self.start;
        let mut redo: VecDeque<Item> = VecDeque::new();
        let mut inflight: Vec<Option<Item>> = vec![None; plan.depth];
        let mut free: Vec<usize> = (0..plan.depth).rev().collect();
        let mut completions: Vec<Completion> = Vec::with_capacity(plan.depth + 1);
        let stall = self.qp.command_timeout() * 4 + Duration::from_secs(10);
        // Ticks, not `Instant`: this is checked on every empty poll, and a clock read can be a
        // system call.
        let mut last_progress = Ticks::now();
        let mut final_flush_done = phase == Phase::Read;
        loop {
            if stop.load(Ordering::Relaxed) {
                // Another thread hit a fatal error; its error is the run's.
                return Ok(());
            }
            // Queue as much as there is room for.
            while let Some(&slot) = free.last() {
                let item = match redo.pop_front() {
                    Some(i) => i,
                    None if next < self.end => {
                        let n = io.min(self.end - next) as u32;
                        let i = Item {
                            lba: next,
                            blocks: n,
                            resubmits: 0,
                        };
                        next += n as u64;
                        i
                    }
                    None => break,
                };
                let bytes = item.blocks as usize * ls;
                let cmd = match phase {
                    Phase::Write => {
                        for (i, block) in self.host[..bytes].chunks_exact_mut(ls).enumerate() {
                            encode(
                                block,
                                Stamp {
                                    lba: item.lba + i as u64,
                                    seed: plan.seed,
                                    generation: plan.generation,
                                },
                            );
                        }
                        self.bufs[slot].write_bytes(0, &self.host[..bytes]);
                        write_cmd(plan.nsid, item.lba, item.blocks, false)
                    }
                    Phase::Read => read_cmd(plan.nsid, item.lba, item.blocks),
                };
                let seg = [self.bufs[slot].segment_at(0, bytes)];
                match self.qp.submit(cmd, &seg, slot as u64) {
                    Ok(_) => {
                        free.pop();
                        inflight[slot] = Some(item);
                    }
                    Err(DriverError::QueueFull) => {
                        redo.push_front(item);
                        break;
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        return Err(self.stopped(e));
                    }
                }
            }
            // Write phase: make what completed in order durable, every sync_every LBAs and
            // at the end.
            if phase == Phase::Write && flush_pending.is_none() {
                while watermark < chunks && remaining[watermark] == 0 {
                    watermark += 1;
                }
                let mark = (self.start + watermark as u64 * io).min(self.end);
                if mark > flushed_to && (mark - flushed_to >= plan.sync_every || mark == self.end) {
                    match self.qp.submit(flush_cmd(plan.nsid), &[], FLUSH_TAG) {
                        Ok(_) => flush_pending = Some(mark),
                        Err(DriverError::QueueFull) => {}
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            return Err(self.stopped(e));
                        }
                    }
                }
            }
            let outstanding = self.qp.outstanding();
            if outstanding == 0
                && redo.is_empty()
                && next >= self.end
                && flush_pending.is_none()
                && final_flush_done
            {
                return Ok(());
            }
            completions.clear();
            self.qp.poll(plan.depth + 1, |c| completions.push(c));
            if completions.is_empty() {
                if elapsed_since(last_progress).is_some_and(|w| w > stall) {
                    stop.store(true, Ordering::Relaxed);
                    return Err(VerifyError::Stalled {
                        dev: plan.dev.clone(),
                        secs: stall.as_secs(),
                        outstanding,
                    });
                }
                continue;
            }
            last_progress = Ticks::now();
            for c in completions.drain(..) {
                if c.status == NvmeStatus::DEVICE_REMOVED {
                    stop.store(true, Ordering::Relaxed);
                    return Err(self.stopped(DriverError::DeviceRemoved {
                        dev: plan.dev.clone(),
                    }));
                }
                if c.tag == FLUSH_TAG {
                    let mark = flush_pending.take().expect("a flush was outstanding");
                    if c.status.is_success() {
                        flushed_to = mark;
                        if mark == self.end {
                            final_flush_done = true;
                        }
                        synced(Synced {
                            thread: self.thread,
                            start: self.start,
                            synced: mark,
                            end: self.end,
                        });
                    } else if c.status == NvmeStatus::ABORTED_BY_RESET {
                        // Sent again at the next turn.
                    } else {
                        self.part.flush_errors += 1;
                        self.record_failure(IoFailure {
                            op: "flush",
                            lba: self.start,
                            blocks: 0,
                            status: c.status.to_string(),
                        });
                        // Do not try again for what is already there.
                        flushed_to = mark;
                        if mark == self.end {
                            final_flush_done = true;
                        }
                    }
                    continue;
                }
                let slot = c.tag as usize;
                let item = inflight[slot].take().expect("a command in this slot");
                free.push(slot);
                if c.status.is_success() {
                    match phase {
                        Phase::Write => self.part.written += item.blocks as u64,
                        Phase::Read => self.check(slot, item),
                    }
                } else if c.status == NvmeStatus::ABORTED_BY_RESET
                    && item.resubmits < RESET_RESUBMITS
                {
                    // Cancelled by a controller reset: it may or may not have happened. Send
                    // it again if the controller came back.
                    self.controller_back(stop)?;
                    redo.push_front(Item {
                        resubmits: item.resubmits + 1,
                        ..item
                    });
                    continue;
                } else if item.blocks > 1 && c.status != NvmeStatus::ABORTED_BY_RESET {
                    // Find exactly which LBAs fail: one command per LBA.
                    log::info!(
                        "{}: {} of LBAs {}..{} failed ({}): trying each LBA alone",
                        plan.dev,
                        if phase == Phase::Write {
                            "write"
                        } else {
                            "read"
                        },
                        item.lba,
                        item.lba + item.blocks as u64,
                        c.status
                    );
                    for k in (0..item.blocks as u64).rev() {
                        redo.push_front(Item {
                            lba: item.lba + k,
                            blocks: 1,
                            resubmits: 0,
                        });
                    }
                    continue;
                } else {
                    let op = match phase {
                        Phase::Write => {
                            self.part.unwritable += 1;
                            "write"
                        }
                        Phase::Read => {
                            self.part.unreadable += 1;
                            "read"
                        }
                    };
                    log::warn!(
                        "{}: {op} of LBA {} failed: {}",
                        plan.dev,
                        item.lba,
                        c.status
                    );
                    self.record_failure(IoFailure {
                        op,
                        lba: item.lba,
                        blocks: item.blocks,
                        status: c.status.to_string(),
                    });
                }
                plan.done.fetch_add(item.blocks as u64, Ordering::Relaxed);
                if phase == Phase::Write {
                    let ch = self.chunk(item.lba);
                    remaining[ch] -= item.blocks;
                }
            }
        }
    }
}

/// The largest command of this controller and namespace, in LBAs.
fn max_blocks(ctrl: &Controller, lba_size: u32) -> u32 {
    (ctrl.max_transfer_bytes() / lba_size).clamp(1, MAX_NLB)
}

/// Run `cfg` on `ctrl`. `synced` hears of each Flush of the write phase that completed (from
/// the worker threads).
pub fn run(
    ctrl: &Controller,
    cfg: &VerifyConfig,
    synced: &(dyn Fn(Synced) + Sync),
) -> Result<VerifyReport, VerifyError> {
    cfg.check()?;
    let dev = ctrl.name().to_string();
    let ns = ctrl
        .namespace(cfg.nsid)
        .map_err(|e| VerifyError::Invalid(e.to_string()))?
        .clone();
    let count = match cfg.count {
        Some(c) => c,
        None => ns.size_lbas.saturating_sub(cfg.lba),
    };
    if count == 0 {
        return Err(VerifyError::Invalid(
            "nothing to verify: give --count of at least 1 (or an --lba inside the namespace)"
                .into(),
        ));
    }
    if cfg.lba.checked_add(count).is_none_or(|e| e > ns.size_lbas) {
        return Err(VerifyError::Invalid(format!(
            "LBAs {}..{} are beyond namespace {}, which has {} LBAs (0..{})",
            cfg.lba,
            cfg.lba.saturating_add(count),
            ns.nsid,
            ns.size_lbas,
            ns.size_lbas
        )));
    }
    let lba_size = ns.lba_size;
    if (lba_size as usize) < HEADER_LEN * 2 || !lba_size.is_multiple_of(8) {
        return Err(VerifyError::Invalid(format!(
            "namespace {} has {lba_size}-byte LBAs: the pattern needs at least 64",
            ns.nsid
        )));
    }
    if cfg.io_size == 0 || !cfg.io_size.is_multiple_of(lba_size) {
        return Err(VerifyError::Invalid(format!(
            "the I/O size {} bytes is not a positive multiple of namespace {}'s {lba_size}-byte LBA size",
            cfg.io_size, ns.nsid
        )));
    }
    // One queue entry is always empty, one more is kept for the Flush.
    let max_depth = ctrl.max_queue_entries().saturating_sub(2).max(1);
    if cfg.depth == 0 || cfg.depth > max_depth {
        return Err(VerifyError::Invalid(format!(
            "queue depth {} is outside what {dev} allows: 1 to {max_depth} commands in flight \
             (the controller's queues have {} entries, CAP.MQES + 1; one stays empty and one is kept for Flush)",
            cfg.depth,
            ctrl.max_queue_entries()
        )));
    }
    let granted = ctrl.io_queues_granted() as u32;
    if cfg.threads == 0 || cfg.threads > granted {
        return Err(VerifyError::Invalid(format!(
            "{} threads: {dev} granted {granted} I/O queue pairs, one per thread; give --threads 1 to {granted}",
            cfg.threads
        )));
    }
    let io_blocks = (cfg.io_size / lba_size)
        .min(max_blocks(ctrl, lba_size))
        .max(1);
    let sync_every = cfg
        .sync_every
        .unwrap_or(((8u64 << 20) / lba_size as u64).max(1));
    let plan = Plan {
        dev: dev.clone(),
        nsid: ns.nsid,
        lba_size: lba_size as usize,
        seed: cfg.seed,
        generation: cfg.generation,
        depth: cfg.depth as usize,
        io_blocks,
        sync_every,
        max_listed: cfg.max_listed,
        total: count * if cfg.write { 2 } else { 1 },
        done: AtomicU64::new(0),
    };
    // Split the range into one part per thread, at command boundaries.
    let chunks = count.div_ceil(io_blocks as u64);
    let threads = (cfg.threads as u64).min(chunks);
    let mut bounds = Vec::new();
    for t in 0..threads {
        let a = cfg.lba + (chunks * t / threads) * io_blocks as u64;
        let b = (cfg.lba + (chunks * (t + 1) / threads) * io_blocks as u64).min(cfg.lba + count);
        bounds.push((a, b));
    }
    let stopped = |source| VerifyError::Stopped {
        dev: dev.clone(),
        done: 0,
        total: plan.total,
        source,
    };
    let mut workers = Vec::new();
    for (t, &(start, end)) in bounds.iter().enumerate() {
        let mut qp = ctrl.create_io_qpair(cfg.depth + 2).map_err(stopped)?;
        if let Some(t) = cfg.command_timeout {
            qp.set_timeout(t);
        }
        let bytes = io_blocks as usize * lba_size as usize;
        let bufs = (0..cfg.depth)
            .map(|_| ctrl.alloc(bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(stopped)?;
        workers.push(Worker {
            plan: &plan,
            thread: t as u32,
            hw: ctrl.hardware().clone(),
            qp,
            bufs,
            host: vec![0; bytes],
            scratch: vec![0; lba_size as usize],
            start,
            end,
            part: Part::default(),
        });
    }
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let phases: &[Phase] = if cfg.write {
        &[Phase::Write, Phase::Read]
    } else {
        &[Phase::Read]
    };
    for &phase in phases {
        // All threads finish writing before any reads back: a misdirected write into another
        // thread's part is then seen too.
        let first_err: Mutex<Option<VerifyError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for w in workers.iter_mut() {
                let (stop, first_err) = (&stop, &first_err);
                s.spawn(move || {
                    if let Err(e) = w.phase(phase, stop, synced) {
                        let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
    }
    let elapsed = started.elapsed();
    let mut report = VerifyReport {
        device: dev,
        nsid: ns.nsid,
        lba: cfg.lba,
        count,
        lba_size,
        seed: cfg.seed,
        generation: cfg.generation,
        threads: workers.len() as u32,
        depth: cfg.depth,
        io_size: io_blocks * lba_size,
        written: 0,
        checked: 0,
        ok: 0,
        mismatches: ClassCounts::default(),
        unreadable: 0,
        unwritable: 0,
        flush_errors: 0,
        first_mismatches: Vec::new(),
        io_failures: Vec::new(),
        driver: DriverCounts::default(),
        elapsed_s: elapsed.as_secs_f64(),
    };
    for w in &workers {
        let p = &w.part;
        report.written += p.written;
        report.checked += p.checked;
        report.ok += p.ok;
        report.mismatches.merge(&p.counts);
        report.unreadable += p.unreadable;
        report.unwritable += p.unwritable;
        report.flush_errors += p.flush_errors;
        report.first_mismatches.extend(p.mismatches.iter().cloned());
        report.io_failures.extend(p.failures.iter().cloned());
        report.driver.add(&w.qp.stats());
    }
    report.first_mismatches.sort_by_key(|m| m.lba);
    report.first_mismatches.truncate(cfg.max_listed);
    report.io_failures.sort_by_key(|f| f.lba);
    report.io_failures.truncate(cfg.max_listed);
    Ok(report)
}

// ----- the command -----

/// `rnvme verify`
#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
    /// First LBA
    #[arg(long, default_value_t = 0)]
    pub lba: u64,
    /// Number of LBAs (default: to the end of the namespace)
    #[arg(long)]
    pub count: Option<u64>,
    /// Write the pattern first (flushing as it goes), then read it back; without it, check a
    /// range written earlier with the same seed and generation
    #[arg(long)]
    pub write: bool,
    /// Seed of the pattern (decimal or 0x hex)
    #[arg(long, default_value = "1", value_parser = parse_u64)]
    pub seed: u64,
    /// Generation of the pattern (tells passes with the same seed apart)
    #[arg(long, default_value_t = 0)]
    pub generation: u32,
    /// Commands in flight per thread
    #[arg(short = 'q', long = "depth", default_value_t = 32)]
    pub depth: u32,
    /// Threads, each with its own I/O queue pair and part of the range
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Bytes per command: a multiple of the LBA size, with an optional K or M suffix
    #[arg(long, default_value = "128K", value_parser = parse_bytes)]
    pub io_size: u32,
    /// While writing, flush and report progress after this many LBAs completed in order
    /// (per thread; default 8 MiB worth)
    #[arg(long, value_name = "LBAS")]
    pub sync_every: Option<u64>,
    /// Command deadline in milliseconds (default: the driver's)
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// Mismatches and failed LBAs to list (all are counted)
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// A u64 in decimal or with a 0x prefix in hex.
fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal, or hex with 0x)"))
}

/// Bytes, with an optional K or M suffix (binary).
fn parse_bytes(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0 && n <= u32::MAX as u64)
        .map(|n| n as u32)
        .ok_or_else(|| format!("{s:?} is not a size in bytes (such as 4096, 64K or 1M)"))
}

/// The report on stdout: a summary and the listed mismatches and failures, or JSON.
fn print_report(report: &VerifyReport, json: bool) -> Result<()> {
    if json {
        return outln!("{}", serde_json::to_string_pretty(report)?);
    }
    outln!("{}", report.summary())?;
    for m in &report.first_mismatches {
        outln!("  {m}")?;
    }
    for f in &report.io_failures {
        outln!("  {f}")?;
    }
    let listed = report.first_mismatches.len() as u64;
    if report.mismatches.total() > listed {
        outln!(
            "  … and {} more mismatches (--show N lists more)",
            report.mismatches.total() - listed
        )?;
    }
    Ok(())
}

pub fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let cfg = VerifyConfig {
        nsid: a.nsid,
        lba: a.lba,
        count: a.count,
        write: a.write,
        seed: a.seed,
        generation: a.generation,
        depth: a.depth,
        threads: a.threads,
        io_size: a.io_size,
        sync_every: a.sync_every,
        max_listed: a.show,
        command_timeout: a.timeout_ms.map(Duration::from_millis),
    };
    // Before the device is opened.
    cfg.check().map_err(|e| UsageError(e.to_string()))?;
    let ctrl = a.dev.open()?;
    let progress = |s: Synced| {
        eprintln!(
            "verify: thread {}: LBAs {}..{} written and flushed (of {}..{})",
            s.thread, s.start, s.synced, s.start, s.end
        );
    };
    let report = match run(&ctrl, &cfg, &progress) {
        Ok(r) => r,
        Err(VerifyError::Invalid(m)) => return Err(UsageError(m).into()),
        Err(e) => return Err(e.into()),
    };
    // The report decides the status even when nobody reads it.
    allow_closed_stdout(print_report(&report, a.json))?;
    if report.clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "rnvme: error: {}: {} mismatching, {} unreadable and {} unwritable LBAs, {} failed flushes",
            report.device,
            report.mismatches.total(),
            report.unreadable,
            report.unwritable,
            report.flush_errors
        );
        Ok(ExitCode::from(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rnvme_driver::controller::ControllerOptions;
    use rnvme_driver::dma::Backing;
    use rnvme_driver::model::{CompletionMode, Model, ModelConfig, ModelNamespace};

    const SEED: u64 = 0x5eed;

    fn stamp(lba: u64) -> Stamp {
        Stamp {
            lba,
            seed: SEED,
            generation: 3,
        }
    }

    fn block(len: usize, s: Stamp) -> Vec<u8> {
        let mut b = vec![0; len];
        encode(&mut b, s);
        b
    }

    fn check(b: &[u8], want: Stamp) -> Option<Mismatch> {
        let mut scratch = vec![0; b.len()];
        classify(b, want, &mut scratch)
    }

    #[test]
    fn crc32_matches_the_standard() {
        assert_eq!(crc32::of(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32::of(b""), 0);
        // Slicing by 8 and byte at a time agree on every length and alignment.
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                let mut c = crc32::start();
                for b in &data[start..end] {
                    c = crc32::update(c, std::slice::from_ref(b));
                }
                assert_eq!(crc32::finish(c), crc32::of(&data[start..end]));
            }
        }
    }

    #[test]
    fn blocks_carry_their_stamp_and_differ_by_every_key() {
        for len in [512, 4096] {
            let b = block(len, stamp(77));
            assert_eq!(decode(&b), Some((stamp(77), true)));
            assert_eq!(&b[..8], b"rnvmeVFY");
            assert_eq!(check(&b, stamp(77)), None);
            for other in [
                stamp(78),
                Stamp {
                    seed: SEED + 1,
                    ..stamp(77)
                },
                Stamp {
                    generation: 4,
                    ..stamp(77)
                },
            ] {
                let o = block(len, other);
                // The bodies differ almost everywhere, not just in the header.
                let (n, _) = diff(&b[HEADER_LEN..], &o[HEADER_LEN..]);
                assert!(n as usize > (len - HEADER_LEN) * 9 / 10, "{other:?}: {n}");
            }
        }
        assert_eq!(decode(&[0u8; 512]), None);
        assert_eq!(decode(&[0u8; 8]), None);
    }

    #[test]
    fn each_kind_of_damage_is_told_apart() {
        let len = 4096;
        let want = stamp(10);
        let good = block(len, want);

        let m = check(&block(len, stamp(11)), want).unwrap();
        assert_eq!(m.class, Class::Misdirected);
        assert_eq!((m.found_lba, m.found_seed), (Some(11), Some(SEED)));
        assert!(m.checksum_ok);

        let other_seed = Stamp { seed: 9, ..want };
        let m = check(&block(len, other_seed), want).unwrap();
        assert_eq!((m.class, m.found_seed), (Class::Stale, Some(9)));
        let old_gen = Stamp {
            generation: 2,
            ..want
        };
        let m = check(&block(len, old_gen), want).unwrap();
        assert_eq!((m.class, m.found_generation), (Class::Stale, Some(2)));

        // Half of a new write over the old generation's block: torn at a sector boundary.
        let mut torn = block(len, old_gen);
        torn[..2048].copy_from_slice(&good[..2048]);
        let m = check(&torn, want).unwrap();
        assert_eq!(m.class, Class::Torn);
        assert!(!m.checksum_ok);
        assert_eq!(m.first_bad, 2048);
        // … or over zeros.
        let mut torn = vec![0u8; len];
        torn[..1024].copy_from_slice(&good[..1024]);
        assert_eq!(check(&torn, want).unwrap().class, Class::Torn);

        let m = check(&vec![0u8; len], want).unwrap();
        assert_eq!((m.class, m.found_lba), (Class::Zero, None));

        // One flipped bit in the body, in the header, in the magic.
        let mut flip = good.clone();
        flip[1000] ^= 0x10;
        let m = check(&flip, want).unwrap();
        assert_eq!(m.class, Class::Corrupt);
        assert_eq!((m.bad_bytes, m.first_bad, m.checksum_ok), (1, 1000, false));
        let mut flip = good.clone();
        flip[8] ^= 1; // the LBA field now says 11, but nothing else is LBA 11's
        let m = check(&flip, want).unwrap();
        assert_eq!((m.class, m.found_lba), (Class::Corrupt, Some(11)));
        let mut flip = good.clone();
        flip[0] ^= 1;
        let m = check(&flip, want).unwrap();
        assert_eq!((m.class, m.found_lba), (Class::Corrupt, None));
        // Foreign data.
        let m = check(&vec![0xa5u8; len], want).unwrap();
        assert_eq!(m.class, Class::Corrupt);
        assert_eq!(
            m.bad_bytes as usize,
            len - good.iter().filter(|&&b| b == 0xa5).count()
        );
        // Scattered damage in later sectors is corruption, not a torn write.
        let mut spots = good.clone();
        for at in [600, 1500, 3000] {
            spots[at] ^= 0xff;
        }
        assert_eq!(check(&spots, want).unwrap().class, Class::Corrupt);
        // A misdirected block that is torn as well is still misdirected.
        let mut md = block(len, stamp(12));
        md[2048..].fill(0);
        let m = check(&md, want).unwrap();
        assert_eq!((m.class, m.checksum_ok), (Class::Misdirected, false));
    }

    #[test]
    fn a_512_byte_block_cannot_tear() {
        let want = stamp(5);
        let mut b = block(512, want);
        b[300..].fill(0);
        assert_eq!(check(&b, want).unwrap().class, Class::Corrupt);
    }

    #[test]
    fn mismatch_lines_say_what_was_found() {
        let m = check(&block(512, stamp(11)), stamp(10)).unwrap();
        let line = m.to_string();
        assert!(
            line.starts_with("LBA 10: misdirected: carries LBA 11, seed 0x5eed"),
            "{line}"
        );
        let line = check(&[0u8; 512], stamp(10)).unwrap().to_string();
        assert!(line.contains("zero: no pattern header"), "{line}");
        assert_eq!(parse_u64("0x1F"), Ok(31));
        assert_eq!(parse_u64("31"), Ok(31));
        assert!(parse_u64("x").is_err());
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("1m"), Ok(1 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("8G").is_err());
    }

    // ----- the engine on the controller model -----

    fn open_model(config: ModelConfig) -> (Arc<Model>, Controller) {
        let model = Model::new(config);
        let ctrl = Controller::init(
            model.clone(),
            ControllerOptions {
                backing: Backing::SmallPages,
                ..ControllerOptions::default()
            },
        )
        .unwrap();
        (model, ctrl)
    }

    fn model() -> (Arc<Model>, Controller) {
        open_model(ModelConfig::default())
    }

    fn cfg(lba: u64, count: u64, write: bool) -> VerifyConfig {
        VerifyConfig {
            lba,
            count: Some(count),
            write,
            seed: SEED,
            generation: 3,
            depth: 8,
            io_size: 16 << 10,
            command_timeout: Some(Duration::from_millis(50)),
            ..VerifyConfig::default()
        }
    }

    fn quiet(_: Synced) {}

    #[test]
    fn write_then_read_back_is_clean_and_lands_where_it_says() {
        let (model, ctrl) = model();
        let r = run(&ctrl, &cfg(100, 203, true), &quiet).unwrap();
        assert!(r.clean(), "{}", r.summary());
        assert_eq!((r.written, r.checked, r.ok), (203, 203, 203));
        assert_eq!(r.io_size, 16 << 10);
        // 203 LBAs of 4 KiB in 16 KiB commands: 51 writes and 51 reads, and the final Flush.
        let s = model.stats();
        assert_eq!((s.writes, s.reads), (51, 51));
        assert!(s.flushes >= 1);
        // On the media: every block is the pattern of its own LBA, nothing around was touched.
        let data = model.read_ns(1, 99, 205);
        assert!(data[..4096].iter().all(|&b| b == 0));
        assert!(data[204 * 4096..].iter().all(|&b| b == 0));
        for i in 0..203u64 {
            let b = &data[(i as usize + 1) * 4096..(i as usize + 2) * 4096];
            assert_eq!(decode(b), Some((stamp(100 + i), true)));
        }
        // A later check of the same range, without writing, agrees.
        let r = run(&ctrl, &cfg(100, 203, false), &quiet).unwrap();
        assert!(r.clean());
        assert_eq!((r.written, r.checked), (0, 203));
        // Another seed sees only stale blocks; past the range only zeros.
        let r = run(
            &ctrl,
            &VerifyConfig {
                seed: 1,
                ..cfg(100, 203, false)
            },
            &quiet,
        )
        .unwrap();
        assert_eq!(r.mismatches.stale, 203);
        assert_eq!(r.mismatches.total(), 203);
        let r = run(&ctrl, &cfg(303, 10, false), &quiet).unwrap();
        assert_eq!(r.mismatches.zero, 10);
        assert_eq!(r.first_mismatches.len(), 10);
        assert_eq!(r.first_mismatches[0].lba, 303);
    }

    #[test]
    fn damage_made_on_the_media_is_classified_block_by_block() {
        let (model, ctrl) = model();
        assert!(run(&ctrl, &cfg(0, 64, true), &quiet).unwrap().clean());
        let read = |lba: u64| model.read_ns(1, lba, 1);
        // Misdirected: LBA 20 holds what was written for LBA 30.
        model.write_ns(1, 20, &read(30));
        // Stale: LBA 21 holds a block of the previous generation.
        model.write_ns(
            1,
            21,
            &block(
                4096,
                Stamp {
                    generation: 2,
                    ..stamp(21)
                },
            ),
        );
        // Torn: the second half of LBA 22 never made it (zeros there).
        let mut torn = read(22);
        torn[2048..].fill(0);
        model.write_ns(1, 22, &torn);
        // Zero: LBA 23 was deallocated.
        model.write_ns(1, 23, &[0; 4096]);
        // Corrupt: a flipped bit in LBA 24.
        let mut flip = read(24);
        flip[777] ^= 4;
        model.write_ns(1, 24, &flip);
        // Unreadable: LBA 25 fails every read.
        model.fail_lba(1, 25, NvmeStatus::UNRECOVERED_READ_ERROR, None);

        let r = run(&ctrl, &cfg(0, 64, false), &quiet).unwrap();
        let classes: Vec<(u64, Class)> = r
            .first_mismatches
            .iter()
            .map(|m| (m.lba, m.class))
            .collect();
        assert_eq!(
            classes,
            [
                (20, Class::Misdirected),
                (21, Class::Stale),
                (22, Class::Torn),
                (23, Class::Zero),
                (24, Class::Corrupt)
            ]
        );
        assert_eq!(r.first_mismatches[0].found_lba, Some(30));
        assert_eq!(
            r.mismatches,
            ClassCounts {
                misdirected: 1,
                stale: 1,
                torn: 1,
                zero: 1,
                corrupt: 1
            }
        );
        // Only LBA 25 itself is unreadable: its command was split and the others read fine.
        assert_eq!(r.unreadable, 1);
        assert_eq!(r.checked, 63);
        assert_eq!(r.ok, 58);
        assert_eq!(r.io_failures.len(), 1);
        let f = &r.io_failures[0];
        assert_eq!((f.op, f.lba, f.blocks), ("read", 25, 1));
        assert!(
            f.status
                .contains("Unrecovered Read Error (sct 2 / sc 0x81)"),
            "{}",
            f.status
        );
        assert!(!r.clean());
        // The driver retried the persistent error before handing it back.
        assert!(r.driver.retries >= 3, "{:?}", r.driver);
        let s = r.summary();
        assert!(
            s.contains(
                "5 mismatches (misdirected 1, stale 1, torn 1, zero 1, corrupt 1), 1 unreadable"
            ),
            "{s}"
        );
    }

    #[test]
    fn write_errors_are_pinned_to_their_lba() {
        let (model, ctrl) = model();
        model.fail_lba(1, 7, NvmeStatus::WRITE_FAULT.with_dnr(true), None);
        let r = run(&ctrl, &cfg(0, 16, true), &quiet).unwrap();
        assert_eq!((r.written, r.unwritable), (15, 1));
        let f = &r.io_failures[0];
        assert_eq!((f.op, f.lba), ("write", 7));
        assert!(f.status.contains("Write Fault"), "{}", f.status);
        // The rule fails reads of LBA 7 too.
        assert_eq!((r.checked, r.unreadable, r.ok), (15, 1, 15));
    }

    #[test]
    fn threads_and_depth_share_the_range_exactly() {
        let (model, ctrl) = open_model(ModelConfig {
            namespaces: vec![ModelNamespace {
                nsid: 1,
                lba_size: 512,
                blocks: 1 << 16,
            }],
            ..ModelConfig::default()
        });
        let marks = Mutex::new(Vec::new());
        let record = |s: Synced| marks.lock().unwrap().push(s);
        let c = VerifyConfig {
            threads: 3,
            depth: 5,
            io_size: 4096,
            sync_every: Some(64),
            ..cfg(1000, 1001, true)
        };
        let r = run(&ctrl, &c, &record).unwrap();
        assert!(r.clean(), "{}", r.summary());
        assert_eq!((r.written, r.checked, r.threads), (1001, 1001, 3));
        let data = model.read_ns(1, 1000, 1001);
        for (i, b) in data.chunks(512).enumerate() {
            assert_eq!(
                decode(b),
                Some((stamp(1000 + i as u64), true)),
                "LBA {}",
                1000 + i
            );
        }
        // Each thread reported flushed progress in order, ending at the end of its part, and
        // the parts tile the range.
        let marks = marks.into_inner().unwrap();
        let mut parts = Vec::new();
        for t in 0..3 {
            let mine: Vec<&Synced> = marks.iter().filter(|s| s.thread == t).collect();
            assert!(mine.len() >= 2, "thread {t}: {mine:?}");
            assert!(mine.windows(2).all(|w| w[0].synced < w[1].synced));
            let last = mine.last().unwrap();
            assert_eq!(last.synced, last.end);
            parts.push((last.start, last.end));
        }
        parts.sort();
        assert_eq!(parts[0].0, 1000);
        assert_eq!(parts[2].1, 2001);
        assert!(parts.windows(2).all(|w| w[0].1 == w[1].0));
        assert!(model.stats().flushes as usize >= marks.len());
    }

    #[test]
    fn bad_configurations_are_refused_with_the_limit() {
        let (_model, ctrl) = model();
        let err = |c: VerifyConfig| match run(&ctrl, &c, &quiet) {
            Err(VerifyError::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = err(VerifyConfig {
            depth: 100_000,
            ..cfg(0, 8, false)
        });
        assert!(
            m.contains("queue depth 100000") && m.contains("1 to 1022"),
            "{m}"
        );
        let m = err(VerifyConfig {
            io_size: 1000,
            ..cfg(0, 8, false)
        });
        assert!(
            m.contains("not a positive multiple") && m.contains("4096-byte"),
            "{m}"
        );
        let m = err(cfg(16380, 8, false));
        assert!(
            m.contains("16380..16388") && m.contains("16384 LBAs"),
            "{m}"
        );
        let m = err(VerifyConfig {
            threads: 9,
            ..cfg(0, 8, false)
        });
        assert!(m.contains("granted 8"), "{m}");
        let m = err(VerifyConfig {
            nsid: 2,
            ..cfg(0, 8, false)
        });
        assert!(m.contains("namespace 2 is not active"), "{m}");
        assert!(matches!(
            run(&ctrl, &cfg(0, 0, false), &quiet),
            Err(VerifyError::Invalid(_))
        ));
    }

    #[test]
    fn zero_and_overlong_values_are_refused_before_any_io() {
        let (model, ctrl) = model();
        let err = |c: VerifyConfig| {
            let m = match c.check() {
                Err(VerifyError::Invalid(m)) => m,
                other => panic!("{other:?}"),
            };
            // run() refuses the same, and sends nothing to the controller.
            match run(&ctrl, &c, &quiet) {
                Err(VerifyError::Invalid(r)) => assert_eq!(r, m),
                other => panic!("{other:?}"),
            }
            m
        };
        let base = cfg(0, 8, true);
        let m = err(VerifyConfig {
            command_timeout: Some(Duration::ZERO),
            ..base.clone()
        });
        assert!(m.starts_with("--timeout-ms must be at least 1"), "{m}");
        let m = err(VerifyConfig {
            command_timeout: Some(Duration::from_millis(u64::MAX)),
            ..base.clone()
        });
        assert!(m.contains("more than an hour"), "{m}");
        let m = err(VerifyConfig {
            sync_every: Some(0),
            ..base.clone()
        });
        assert_eq!(m, "--sync-every must be at least 1 LBA");
        let m = err(VerifyConfig {
            depth: 0,
            ..base.clone()
        });
        assert_eq!(m, "--depth (-q) must be at least 1");
        let m = err(VerifyConfig {
            threads: 0,
            ..base.clone()
        });
        assert_eq!(m, "--threads must be at least 1");
        let m = err(cfg(0, 0, true));
        assert!(m.starts_with("nothing to verify"), "{m}");
        assert_eq!(model.stats().writes, 0);
        assert_eq!(model.stats().reads, 0);
        // The longest deadline is allowed.
        assert!(VerifyConfig {
            command_timeout: Some(MAX_COMMAND_TIMEOUT),
            ..base
        }
        .check()
        .is_ok());
    }

    #[test]
    fn removal_stops_the_run_with_device_removed() {
        let (model, ctrl) = model();
        model.surprise_remove();
        let t = Instant::now();
        let e = run(&ctrl, &cfg(0, 512, true), &quiet).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(
                &e,
                VerifyError::Stopped {
                    source: DriverError::DeviceRemoved { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let line = crate::cmd::error_line(&anyhow::Error::from(e));
        assert!(
            line.contains("verify stopped") && line.contains("device removed"),
            "{line}"
        );
    }

    #[test]
    fn commands_cancelled_by_a_reset_are_sent_again() {
        let (model, ctrl) = model();
        // The first writes are held by the controller; a reset (from another thread, as a
        // recovery elsewhere would) drops them, and the run sends them again.
        model.set_completion_mode(CompletionMode::Deferred);
        let c = VerifyConfig {
            command_timeout: Some(Duration::from_secs(20)),
            ..cfg(0, 64, true)
        };
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                while model.held() < 8 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                model.set_completion_mode(CompletionMode::Instant);
                ctrl.reset().unwrap();
            });
            run(&ctrl, &c, &quiet).unwrap()
        });
        assert!(r.clean(), "{}", r.summary());
        assert_eq!((r.written, r.checked), (64, 64));
        assert_eq!(r.driver.resets, 1, "{:?}", r.driver);
        assert_eq!(r.driver.cancelled, 8, "{:?}", r.driver);
        assert_eq!(ctrl.resets(), 1);
        assert_eq!(model.enables(), 2);
    }

    #[test]
    fn a_controller_that_does_not_come_back_stops_the_run() {
        let (model, ctrl) = model();
        // Writes are never completed, aborts do not help, and the reset that follows leaves
        // the controller not ready.
        model.set_completion_mode(CompletionMode::Deferred);
        model.set_abort_ineffective(true);
        model.set_never_ready(true);
        let t = Instant::now();
        let e = run(&ctrl, &cfg(0, 64, true), &quiet).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        match &e {
            VerifyError::ControllerLost { csts, done, .. } => {
                assert_eq!(csts & 1, 0, "not ready");
                assert_eq!(*done, 0);
            }
            other => panic!("{other:?}"),
        }
        let line = e.to_string();
        assert!(line.contains("did not come back after a reset"), "{line}");
        assert_eq!(ctrl.resets(), 0, "the reset failed");
    }

    #[test]
    fn random_misbehaviour_never_hangs_and_every_lba_is_accounted_for() {
        for seed in 1..=4u64 {
            let (model, ctrl) = model();
            model.set_random_misbehaviour(seed, 10);
            let c = VerifyConfig {
                io_size: 8192,
                command_timeout: Some(Duration::from_millis(20)),
                ..cfg(0, 300, true)
            };
            let r = run(&ctrl, &c, &quiet).unwrap();
            assert_eq!(
                r.written + r.unwritable,
                300,
                "seed {seed}: {}",
                r.summary()
            );
            assert_eq!(
                r.checked + r.unreadable,
                300,
                "seed {seed}: {}",
                r.summary()
            );
            assert_eq!(r.ok + r.mismatches.total(), r.checked);
            // A block written without error reads back right unless its read failed.
            assert!(
                r.mismatches.total() <= r.unwritable,
                "seed {seed}: {}",
                r.summary()
            );
            let d = r.driver;
            assert!(
                d.retries + d.timeouts + d.spurious > 0,
                "seed {seed}: {d:?}"
            );
        }
    }
}
