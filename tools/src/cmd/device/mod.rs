//! Commands that drive a controller through the userspace driver: identify, read, write,
//! flush, write-zeroes, trim and log.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_driver::identify::{NamespaceInfo, SglSupport};
use rnvme_driver::io::IoQueuePair;
use rnvme_driver::queue::DataPointerMode;
use rnvme_driver::spec::{admin_op, cns, log_page, SqEntry};
use rnvme_tools::nvmecli;
use serde::Serialize;

use super::{outln, OutputFormat, UsageError};

mod identify;
mod log;
mod rw;

pub use identify::*;
pub use log::*;
pub use rw::*;

/// Bytes moved per step by `read` (the driver splits further at the max transfer; `write`
/// streams pieces of the max transfer).
const STEP: u64 = 8 << 20;

/// How to reach a controller.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// PCI address of the controller, full form (0000:00:04.0)
    #[arg(value_parser = super::bdf_arg)]
    pub bdf: String,
    /// Take DMA memory from ordinary 4 KiB pages (pinned by VFIO) instead of hugepages
    #[arg(long)]
    pub no_hugepages: bool,
    /// Describe every data buffer with SGLs (the default: PRPs where they need no list, SGLs
    /// where they would, when the controller supports SGLs)
    #[arg(long)]
    pub sgl: bool,
}

impl DeviceArgs {
    /// Open and bring up the controller.
    pub fn open(&self) -> Result<Controller> {
        let backing = Backing::small_pages_if(self.no_hugepages);
        let data_pointer = if self.sgl {
            DataPointerMode::Sgl
        } else {
            DataPointerMode::Auto
        };
        Ok(Controller::open(
            &self.bdf,
            ControllerOptions {
                backing,
                data_pointer,
                ..Default::default()
            },
        )?)
    }
}

/// Namespace and LBA range arguments, in rnvme's spelling and in nvme-cli's.
#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Namespace id
    #[arg(
        short = 'n',
        long = "ns",
        visible_alias = "namespace-id",
        default_value_t = 1
    )]
    pub nsid: u32,
    /// First LBA
    #[arg(short = 's', long, visible_alias = "start-block")]
    pub lba: Option<u64>,
    /// Number of LBAs
    #[arg(long, conflicts_with = "block_count")]
    pub count: Option<u64>,
    /// Number of LBAs less one, as nvme-cli counts (-c 7 is 8 LBAs)
    #[arg(short = 'c', long = "block-count", value_name = "N")]
    pub block_count: Option<u64>,
}

impl RangeArgs {
    /// The number of LBAs, from --count or the zero-based --block-count.
    pub fn count(&self) -> Result<Option<u64>> {
        match (self.count, self.block_count) {
            (_, Some(c)) => c
                .checked_add(1)
                .map(Some)
                .ok_or_else(|| UsageError(format!("--block-count {c} is too large")).into()),
            (c, None) => Ok(c),
        }
    }
}

/// The number of LBAs of a read or write: `count` (from --count or --block-count), or
/// `data_size` (nvme-cli's --data-size, bytes) over `per_lba` bytes per LBA; when both are
/// given they must agree.
fn resolve_count(count: Option<u64>, data_size: Option<u64>, per_lba: u64) -> Result<Option<u64>> {
    let Some(bytes) = data_size else {
        return Ok(count);
    };
    if bytes == 0 || !bytes.is_multiple_of(per_lba) {
        return Err(UsageError(format!(
            "--data-size {bytes} is not a positive multiple of the namespace's {per_lba}-byte LBAs"
        ))
        .into());
    }
    let lbas = bytes / per_lba;
    match count {
        Some(c) if c != lbas => Err(UsageError(format!(
            "--data-size {bytes} is {lbas} LBAs of {per_lba} bytes, but the count asks for {c} \
             (--block-count is the count less one)"
        ))
        .into()),
        _ => Ok(Some(lbas)),
    }
}

/// Check a range against the namespace, as a usage error that says what is valid.
fn check_range(ns: &NamespaceInfo, lba: u64, count: u64) -> Result<()> {
    if count == 0 {
        return Err(UsageError("--count must be at least 1".into()).into());
    }
    if lba.checked_add(count).is_none_or(|end| end > ns.size_lbas) {
        return Err(UsageError(format!(
            "LBAs {lba}..{} are beyond namespace {}, which has {} LBAs (0..{})",
            lba.saturating_add(count),
            ns.nsid,
            ns.size_lbas,
            ns.size_lbas
        ))
        .into());
    }
    Ok(())
}

fn namespace(ctrl: &Controller, nsid: u32) -> Result<NamespaceInfo> {
    ctrl.namespace(nsid)
        .cloned()
        .map_err(|e| UsageError(e.to_string()).into())
}

fn qpair(ctrl: &Controller) -> Result<IoQueuePair> {
    Ok(ctrl.create_io_qpair(ctrl.max_queue_entries().min(64))?)
}

/// `rnvme flush`
#[derive(Args, Debug)]
pub struct FlushArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
}

pub fn flush(a: FlushArgs) -> Result<ExitCode> {
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.nsid)?;
    qpair(&ctrl)?.flush(ns.nsid)?;
    eprintln!("flushed namespace {}", ns.nsid);
    Ok(ExitCode::SUCCESS)
}

/// `rnvme write-zeroes` and `rnvme trim`
#[derive(Args, Debug)]
pub struct ZeroArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// The whole namespace (instead of --lba and --count)
    #[arg(long)]
    pub all: bool,
}

/// Which of the two range commands.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RangeOp {
    WriteZeroes,
    Trim,
}

impl RangeOp {
    fn name(self) -> &'static str {
        match self {
            RangeOp::WriteZeroes => "write-zeroes",
            RangeOp::Trim => "trim",
        }
    }
}

/// The range a write-zeroes or trim asks for: `Some((lba, count))`, or `None` for the whole
/// namespace (`--all`). Both destroy data, so neither is assumed: the range is given in full
/// or `--all` is.
fn requested_range(a: &ZeroArgs, op: RangeOp) -> Result<Option<(u64, u64)>> {
    let name = op.name();
    match (a.all, a.range.lba, a.range.count()?) {
        (true, None, None) => Ok(None),
        (true, _, _) => Err(UsageError(format!(
            "{name}: --all is the whole namespace; give either --all or --lba and --count, not both"
        ))
        .into()),
        (false, Some(lba), Some(count)) => Ok(Some((lba, count))),
        (false, None, None) => Err(UsageError(format!(
            "{name} needs a range: add --lba L --count C, or --all for the whole namespace"
        ))
        .into()),
        (false, _, _) => Err(UsageError(format!(
            "{name} needs both --lba and --count (or --all for the whole namespace)"
        ))
        .into()),
    }
}

pub fn range_op(a: ZeroArgs, op: RangeOp) -> Result<ExitCode> {
    let range = requested_range(&a, op)?;
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.range.nsid)?;
    let (lba, count) = range.unwrap_or((0, ns.size_lbas));
    check_range(&ns, lba, count)?;
    let mut qp = qpair(&ctrl)?;
    let info = ctrl.info();
    match op {
        RangeOp::WriteZeroes => {
            if !info.supports_write_zeroes() {
                anyhow::bail!(
                    "{}: the controller does not support Write Zeroes",
                    ctrl.name()
                );
            }
            qp.write_zeroes(ns.nsid, lba, count)?;
            eprintln!("zeroed {count} LBAs at LBA {lba} of namespace {}", ns.nsid);
        }
        RangeOp::Trim => {
            if !info.supports_dsm() {
                anyhow::bail!(
                    "{}: the controller does not support Dataset Management (deallocate)",
                    ctrl.name()
                );
            }
            qp.deallocate(ns.nsid, lba, count)?;
            eprintln!(
                "deallocated {count} LBAs at LBA {lba} of namespace {}",
                ns.nsid
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LBA: u32 = 512;

    fn ns(size_lbas: u64) -> NamespaceInfo {
        NamespaceInfo {
            nsid: 1,
            size_lbas,
            capacity_lbas: size_lbas,
            utilization_lbas: 0,
            flbas: 0,
            lba_formats: Vec::new(),
            lba_size: LBA,
            metadata_size: 0,
            nsfeat: 0,
            dps: 0,
            nguid: [0; 16],
            eui64: [0; 8],
        }
    }

    /// A reader that hands out at most `chunk` bytes per read, then fails if `fail_at` is
    /// reached.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        fail_at: Option<usize>,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.fail_at.is_some_and(|f| self.at >= f) {
                return Err(std::io::Error::other("the pipe broke"));
            }
            let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    fn stdin_of(data: Vec<u8>, chunk: usize, fail_at: Option<usize>) -> Input {
        Input {
            reader: Box::new(Trickle {
                data,
                at: 0,
                chunk,
                fail_at,
            }),
            name: "standard input".into(),
            len: None,
        }
    }

    /// A namespace of `size` LBAs in memory, and the writes it received as (LBA, LBAs).
    struct Disk {
        bytes: Vec<u8>,
        writes: Vec<(u64, u64)>,
    }

    /// Streams `input` to a fresh disk of `size` LBAs at `start`, in pieces of `piece_lbas`.
    fn stream(mut input: Input, size: u64, start: u64, piece_lbas: usize) -> (Result<u64>, Disk) {
        let mut disk = Disk {
            bytes: vec![0; size as usize * LBA as usize],
            writes: Vec::new(),
        };
        let mut piece = vec![0u8; piece_lbas * LBA as usize];
        let r = write_stream(
            &mut input,
            (&ns(size), LBA as u64),
            start,
            &mut piece,
            &mut |at, d| {
                assert!(d.len() <= piece_lbas * LBA as usize && d.len() % LBA as usize == 0);
                let off = at as usize * LBA as usize;
                disk.bytes[off..off + d.len()].copy_from_slice(d);
                disk.writes.push((at, d.len() as u64 / LBA as u64));
                Ok(())
            },
        );
        (r, disk)
    }

    fn usage_message(r: Result<u64>) -> String {
        let e = r.expect_err("a refusal");
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e:#}");
        crate::cmd::error_line(&e)
    }

    #[test]
    fn input_is_written_piece_by_piece_at_the_next_lba() {
        // 3.5 pieces of 4 LBAs, read 300 bytes at a time.
        let d = data(14 * LBA as usize);
        let (r, disk) = stream(stdin_of(d.clone(), 300, None), 64, 10, 4);
        assert_eq!(r.unwrap(), 14);
        assert_eq!(disk.writes, [(10, 4), (14, 4), (18, 4), (22, 2)]);
        assert_eq!(&disk.bytes[10 * 512..24 * 512], &d[..]);
        assert!(disk.bytes[..10 * 512].iter().all(|&b| b == 0));
        assert!(disk.bytes[24 * 512..].iter().all(|&b| b == 0));
        // Up to the last LBA exactly.
        let (r, disk) = stream(stdin_of(d.clone(), 4096, None), 24, 10, 4);
        assert_eq!(r.unwrap(), 14);
        assert_eq!(&disk.bytes[10 * 512..], &d[..]);
    }

    #[test]
    fn a_last_piece_that_is_not_whole_lbas_is_not_written_and_the_error_says_what_was() {
        let (r, disk) = stream(stdin_of(data(8 * 512 + 700), 1000, None), 64, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input is 4796 bytes, not a positive multiple of the namespace's 512-byte LBA size; \
             its first 8 LBAs were written (LBAs 10..18), the rest was not"
        );
        assert_eq!(disk.writes, [(10, 4), (14, 4)]);
        assert!(disk.bytes[18 * 512..].iter().all(|&b| b == 0));

        let (r, disk) = stream(stdin_of(data(700), 1000, None), 64, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input is 700 bytes, not a positive multiple of the namespace's 512-byte LBA size; \
             nothing was written"
        );
        assert!(disk.writes.is_empty());

        let (r, disk) = stream(stdin_of(Vec::new(), 1000, None), 64, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input is 0 bytes, not a positive multiple of the namespace's 512-byte LBA size; \
             nothing was written"
        );
        assert!(disk.writes.is_empty());
    }

    #[test]
    fn input_beyond_the_namespace_is_written_up_to_its_end_then_refused() {
        let d = data(20 * 512);
        let (r, disk) = stream(stdin_of(d.clone(), 4096, None), 16, 10, 4);
        assert_eq!(
            usage_message(r),
            "the input goes beyond namespace 1, which has 16 LBAs (0..16); \
             its first 6 LBAs were written (LBAs 10..16), the rest was not"
        );
        assert_eq!(disk.writes, [(10, 4), (14, 2)]);
        assert_eq!(&disk.bytes[10 * 512..], &d[..6 * 512]);
    }

    #[test]
    fn a_failing_read_says_what_was_written() {
        let (r, disk) = stream(stdin_of(data(20 * 512), 512, Some(5 * 512)), 64, 0, 4);
        let e = r.unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_none());
        assert_eq!(
            crate::cmd::error_line(&e),
            "cannot read standard input; its first 4 LBAs were written (LBAs 0..4), the rest was \
             not: the pipe broke"
        );
        assert_eq!(disk.writes, [(0, 4)]);
    }

    #[test]
    fn a_failing_write_names_its_lbas_and_those_written_before() {
        let mut input = stdin_of(data(12 * 512), 4096, None);
        let mut piece = vec![0u8; 4 * 512];
        let mut calls = 0;
        let r = write_stream(
            &mut input,
            (&ns(64), LBA as u64),
            3,
            &mut piece,
            &mut |_, _| {
                calls += 1;
                if calls == 2 {
                    anyhow::bail!("Write failed: LBA Out of Range");
                }
                Ok(())
            },
        );
        let e = r.unwrap_err();
        assert_eq!(
            crate::cmd::error_line(&e),
            "write LBAs 7..11 (LBAs 3..7 are written): Write failed: LBA Out of Range"
        );
    }

    #[test]
    fn nvme_cli_counts_and_data_sizes() {
        let r = |count, block_count| RangeArgs {
            nsid: 1,
            lba: Some(0),
            count,
            block_count,
        };
        assert_eq!(r(Some(8), None).count().unwrap(), Some(8));
        // nvme-cli's block count is zero-based.
        assert_eq!(r(None, Some(7)).count().unwrap(), Some(8));
        assert_eq!(r(None, Some(0)).count().unwrap(), Some(1));
        assert_eq!(r(None, None).count().unwrap(), None);
        assert!(r(None, Some(u64::MAX)).count().is_err());
        assert_eq!(resolve_count(Some(8), None, 512).unwrap(), Some(8));
        assert_eq!(resolve_count(None, Some(4096), 512).unwrap(), Some(8));
        assert_eq!(resolve_count(Some(8), Some(4096), 512).unwrap(), Some(8));
        assert_eq!(resolve_count(None, None, 512).unwrap(), None);
        for (count, size) in [(Some(7), Some(4096)), (None, Some(4000)), (None, Some(0))] {
            let e = resolve_count(count, size, 512).unwrap_err();
            assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        }
        assert_eq!(
            resolve_count(Some(7), Some(4096), 512)
                .unwrap_err()
                .to_string(),
            "--data-size 4096 is 8 LBAs of 512 bytes, but the count asks for 7 \
             (--block-count is the count less one)"
        );
    }

    #[test]
    fn a_limit_takes_that_much_of_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in");
        std::fs::write(&p, data(6 * 512)).unwrap();
        let mut input = Input::open(Some(&p)).unwrap();
        input.limit(4 * 512).unwrap();
        assert_eq!(input.len, Some(4 * 512));
        let (r, disk) = stream(input, 64, 0, 3);
        assert_eq!(r.unwrap(), 4);
        assert_eq!(disk.writes, [(0, 3), (3, 1)]);
        let mut input = Input::open(Some(&p)).unwrap();
        let e = input.limit(8 * 512).unwrap_err();
        assert!(
            e.to_string()
                .contains("holds 3072 bytes, fewer than the 4096"),
            "{e}"
        );
        let mut input = stdin_of(data(6 * 512), 700, None);
        input.limit(2 * 512).unwrap();
        let (r, _) = stream(input, 64, 0, 4);
        assert_eq!(r.unwrap(), 2);
    }

    #[test]
    fn a_file_is_read_up_to_the_length_it_was_checked_at() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in");
        std::fs::write(&p, data(3 * 512)).unwrap();
        let input = Input::open(Some(&p)).unwrap();
        assert_eq!(input.len, Some(3 * 512));
        std::fs::write(&p, data(9 * 512)).unwrap();
        let (r, disk) = stream(input, 64, 0, 4);
        assert_eq!(r.unwrap(), 3);
        assert_eq!(disk.writes, [(0, 3)]);
        let e = Input::open(Some(&dir.path().join("missing")))
            .err()
            .expect("a missing file");
        assert!(crate::cmd::error_line(&e).starts_with("cannot open "));
    }
}
