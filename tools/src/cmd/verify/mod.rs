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

mod engine;
mod pattern;
mod report;

pub use engine::*;
pub use pattern::*;
pub use report::*;

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
    /// Number of LBAs (default: to the end of the namespace; with --write, give it or --all)
    #[arg(long)]
    pub count: Option<u64>,
    /// From --lba to the end of the namespace (what --write needs, if not --count)
    #[arg(long, conflicts_with = "count")]
    pub all: bool,
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
    // Overwriting is never the default extent: the range is said.
    if a.write && a.count.is_none() && !a.all {
        return Err(UsageError(
            "--write overwrites the LBAs it checks: give --count N, or --all for everything \
             from --lba to the end of the namespace"
                .into(),
        )
        .into());
    }
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

    #[test]
    fn write_without_a_range_is_refused_before_the_device_is_opened() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: VerifyArgs,
        }
        let parse =
            |s: &str| <T as clap::Parser>::try_parse_from(s.split_whitespace()).map(|t| t.a);
        // (No such device: anything that gets as far as opening it fails there.)
        let e = verify(parse("t 0000:ff:1f.7 --write").unwrap()).unwrap_err();
        let u = e.downcast_ref::<UsageError>().expect("a usage error");
        assert!(u.0.contains("--count N, or --all"), "{u}");
        assert!(parse("t 0000:ff:1f.7 --write --all --count 5").is_err());
        for given in ["--count 8", "--all"] {
            let e = verify(parse(&format!("t 0000:ff:1f.7 --write {given}")).unwrap()).unwrap_err();
            assert!(!e.to_string().contains("--all"), "{given}: {e}");
        }
        // Checking only (no --write) may still run to the end of the namespace by default.
        let e = verify(parse("t 0000:ff:1f.7").unwrap()).unwrap_err();
        assert!(!e.to_string().contains("--all"), "{e}");
    }

    use rnvme_driver::model::{bring_up, model_options, CompletionMode, Model, ModelConfig};

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
    fn block_crc_is_ieee_crc32_of_all_but_its_own_field() {
        // The standard check value, through the same crate.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
        let b = block(512, stamp(5));
        let mut without = b[..CRC_AT].to_vec();
        without.extend_from_slice(&b[HEADER_LEN..]);
        assert_eq!(block_crc(&b), crc32fast::hash(&without));
        assert_eq!(u32_at(&b, CRC_AT), block_crc(&b));
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
        let (model, ctrl) = bring_up(config, model_options()).unwrap();
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
        let (model, ctrl) = open_model(ModelConfig::one_namespace(512, 1 << 16));
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
