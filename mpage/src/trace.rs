//! `rnvme mpage trace`: run the real cache on a [`RecordingDevice`] and print what it issued.
//!
//! Operations are applied in order on one cache, over a disk holding
//! [`pattern_byte`](crate::recording::pattern_byte) seed 0 at every byte address:
//! - `Read { start, count }`: explicit readahead of `count` pages from `start`, then wait;
//! - `ReadPage(n)`: read one page (`read_page`);
//! - `WritePages(pages)`: overwrite those whole pages in the cache (the file size does not
//!   change), then write back and wait (no Flush);
//! - `WriteBlocks(blocks)`: overwrite those single file blocks, then write back and wait.
//!
//! Written data is [`pattern_byte`](crate::recording::pattern_byte) seed [`WRITE_SEED`] at the
//! file offset. The output is JSON lines: one per command in submission order, then one per
//! page touched by the operations, ascending.
//!
//! By default the device takes PRPs only, and a command's line is
//! `{"op","slba","lbas","prps","pages","fallback"}`. With [`TraceOptions::sgl`] it is a device
//! that offers SGLs, where the driver's default mode ([`DataPointerMode::Auto`]) chooses per
//! command: PRPs for data in one piece within two pages (a one-page command), an SGL
//! otherwise. Each command's line then says what it carried, after `lbas`: `"dptr":"prp"` and
//! `"prps"`, or `"dptr":"sgl"` and `"descriptors"`, every SGL descriptor the device read in
//! order (the one in the command first, then each list's; a segment descriptor is the last of
//! its list), each `{"type":"data"|"segment"|"last_segment","addr":"0x…","len":bytes}`. List
//! addresses are the recording device's own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use rnvme_driver::dma::{Backing, DmaError, DmaPool};
use rnvme_driver::hw::MemoryOnly;
use rnvme_driver::queue::DataPointerMode;

use crate::backend::IoOp;
use crate::cache::{CacheOptions, CacheStats, PageCache};
use crate::error::MpageError;
use crate::pool::{PagePool, PoolError, FRAMES_PER_CHUNK, PAGE_SIZE};
use crate::recording::{
    fill_pattern, CommandRecord, DataPointer, DiskFill, EventLog, LoggedMap, RecordingDevice,
    SglEntry, TraceEvent,
};
use crate::spec::{MapSpec, SpecError};

/// Seed of the data the trace writes.
pub const WRITE_SEED: u64 = 1;

/// The nominal size of the trace disk in LBAs (it is sparse: only written LBAs take memory).
pub const TRACE_DISK_LBAS: u64 = 1 << 40;

/// How a trace's device takes data.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// The device offers SGLs: each command carries what the driver's default mode
    /// ([`DataPointerMode::Auto`]) chooses on such a controller, and the command lines say
    /// which data pointer it was (see the module documentation).
    pub sgl: bool,
}

/// One operation of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceOp {
    /// Read `count` pages from page `start` (readahead, then wait).
    Read { start: u64, count: u64 },
    /// Read one page.
    ReadPage(u64),
    /// Dirty these whole pages, then write back.
    WritePages(Vec<u64>),
    /// Dirty these file blocks, then write back.
    WriteBlocks(Vec<u64>),
}

/// Why a trace could not run.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The map file is wrong.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An operation argument is wrong.
    #[error("--{flag} {value:?}: {problem}")]
    Op {
        flag: String,
        value: String,
        problem: String,
    },
    /// The cache failed (not a page error: those are part of the output).
    #[error(transparent)]
    Cache(#[from] MpageError),
    /// The page pool could not be made.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// DMA memory could not be had.
    #[error(transparent)]
    Dma(#[from] DmaError),
}

fn op_err(flag: &str, value: &str, problem: impl Into<String>) -> TraceError {
    TraceError::Op {
        flag: flag.into(),
        value: value.into(),
        problem: problem.into(),
    }
}

/// The highest page or block index an operation may name: a trace's file is at most
/// 2^40 pages (4 PiB), far past any map, and every byte offset in it fits in 64 bits.
pub const TRACE_MAX_INDEX: u64 = (1 << 40) - 1;
/// The most pages one operation may touch: each is a frame of the trace's cache and a line
/// of its output.
pub const TRACE_MAX_PAGES: u64 = 1 << 16;

fn parse_list(flag: &str, value: &str) -> Result<Vec<u64>, TraceError> {
    let items: Result<Vec<u64>, _> = value.split(',').map(|s| s.trim().parse::<u64>()).collect();
    match items {
        Ok(v) if v.len() as u64 > TRACE_MAX_PAGES => Err(op_err(
            flag,
            value,
            format!("at most {TRACE_MAX_PAGES} items"),
        )),
        Ok(v) if v.iter().any(|&x| x > TRACE_MAX_INDEX) => Err(op_err(
            flag,
            value,
            format!("indexes go up to {TRACE_MAX_INDEX}"),
        )),
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(op_err(
            flag,
            value,
            "expected a comma-separated list of numbers, like 0,1,5",
        )),
    }
}

impl TraceOp {
    /// Parse one command-line operation: `flag` is `read` (START:COUNT), `read-page` (N),
    /// `write` (comma list of pages) or `write-blocks` (comma list of blocks).
    pub fn parse(flag: &str, value: &str) -> Result<TraceOp, TraceError> {
        match flag {
            "read" => {
                let parsed = value.split_once(':').and_then(|(s, c)| {
                    Some((s.trim().parse::<u64>().ok()?, c.trim().parse::<u64>().ok()?))
                });
                match parsed {
                    Some((start, count))
                        if count > TRACE_MAX_PAGES
                            || start.saturating_add(count) > TRACE_MAX_INDEX + 1 =>
                    {
                        Err(op_err(
                            flag,
                            value,
                            format!(
                                "at most {TRACE_MAX_PAGES} pages, up to page {TRACE_MAX_INDEX}"
                            ),
                        ))
                    }
                    Some((start, count)) if count > 0 => Ok(TraceOp::Read { start, count }),
                    _ => Err(op_err(
                        flag,
                        value,
                        "expected START:COUNT with COUNT at least 1, like 0:16",
                    )),
                }
            }
            "read-page" => match value.trim().parse::<u64>() {
                Ok(p) if p <= TRACE_MAX_INDEX => Ok(TraceOp::ReadPage(p)),
                Ok(_) => Err(op_err(
                    flag,
                    value,
                    format!("pages go up to {TRACE_MAX_INDEX}"),
                )),
                Err(_) => Err(op_err(flag, value, "expected a page index")),
            },
            "write" => parse_list(flag, value).map(TraceOp::WritePages),
            "write-blocks" => parse_list(flag, value).map(TraceOp::WriteBlocks),
            _ => Err(op_err(
                flag,
                value,
                "unknown operation; use read, read-page, write or write-blocks",
            )),
        }
    }

    /// The pages this operation touches.
    fn pages(&self, blocks_per_page: u64) -> Vec<u64> {
        match self {
            TraceOp::Read { start, count } => (*start..start.saturating_add(*count)).collect(),
            TraceOp::ReadPage(p) => vec![*p],
            TraceOp::WritePages(v) => v.clone(),
            TraceOp::WriteBlocks(v) => v.iter().map(|b| b / blocks_per_page).collect(),
        }
    }
}

/// The operations of the command-line options, in this order: `--read`, `--read-page`,
/// `--write`, `--write-blocks` (a CLI that keeps the user's order uses [`TraceOp::parse`]).
pub fn parse_ops(
    read: Option<&str>,
    read_page: Option<u64>,
    write: Option<&str>,
    write_blocks: Option<&str>,
) -> Result<Vec<TraceOp>, TraceError> {
    let mut ops = Vec::new();
    if let Some(v) = read {
        ops.push(TraceOp::parse("read", v)?);
    }
    if let Some(p) = read_page {
        ops.push(TraceOp::parse("read-page", &p.to_string())?);
    }
    if let Some(v) = write {
        ops.push(TraceOp::parse("write", v)?);
    }
    if let Some(v) = write_blocks {
        ops.push(TraceOp::parse("write-blocks", v)?);
    }
    Ok(ops)
}

/// The state of one page at the end of a trace (one output line).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PageReport {
    pub page: u64,
    pub uptodate: bool,
    pub dirty: bool,
    pub zeroed_from: Option<u32>,
    pub mapped_to_disk: bool,
    pub error: Option<String>,
}

#[derive(serde::Serialize)]
struct CommandLine<'a> {
    op: IoOp,
    slba: u64,
    lbas: u32,
    prps: u32,
    pages: &'a [u64],
    fallback: bool,
}

/// A command's line when the device offers SGLs: which data pointer it carried.
#[derive(serde::Serialize)]
struct DptrCommandLine<'a> {
    op: IoOp,
    slba: u64,
    lbas: u32,
    dptr: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prps: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    descriptors: Option<Vec<DescriptorLine>>,
    pages: &'a [u64],
    fallback: bool,
}

#[derive(serde::Serialize)]
struct DescriptorLine {
    #[serde(rename = "type")]
    ty: &'static str,
    addr: String,
    len: u32,
}

impl From<&SglEntry> for DescriptorLine {
    fn from(e: &SglEntry) -> DescriptorLine {
        let (ty, addr, len) = match *e {
            SglEntry::Data { addr, len } => ("data", addr, len),
            SglEntry::Segment { addr, len } => ("segment", addr, len),
            SglEntry::LastSegment { addr, len } => ("last_segment", addr, len),
        };
        DescriptorLine {
            ty,
            addr: format!("{:#x}", addr.0),
            len,
        }
    }
}

fn command_line(c: &CommandRecord, sgl: bool) -> String {
    let json = if !sgl {
        serde_json::to_string(&CommandLine {
            op: c.op,
            slba: c.slba,
            lbas: c.lbas,
            prps: c.prps,
            pages: &c.pages,
            fallback: c.fallback,
        })
    } else {
        let (dptr, prps, descriptors) = match &c.dptr {
            DataPointer::None => ("none", None, None),
            DataPointer::Prp => ("prp", Some(c.prps), None),
            DataPointer::Sgl(d) => ("sgl", None, Some(d.iter().map(Into::into).collect())),
        };
        serde_json::to_string(&DptrCommandLine {
            op: c.op,
            slba: c.slba,
            lbas: c.lbas,
            dptr,
            prps,
            descriptors,
            pages: &c.pages,
            fallback: c.fallback,
        })
    };
    json.expect("plain struct serializes")
}

/// Everything a trace produced.
pub struct TraceReport {
    /// The commands, in submission order.
    pub commands: Vec<CommandRecord>,
    /// The touched pages, ascending.
    pub pages: Vec<PageReport>,
    /// Map calls and submissions, interleaved as they happened.
    pub events: Vec<TraceEvent>,
    /// The cache's counters.
    pub stats: CacheStats,
    /// The touched pages' bytes.
    pub page_data: BTreeMap<u64, Vec<u8>>,
    /// The device, with its disk as the trace left it.
    pub device: RecordingDevice,
    /// How the device took data.
    pub options: TraceOptions,
}

impl TraceReport {
    /// The output: one JSON line per command, then one per touched page.
    pub fn json_lines(&self) -> Vec<String> {
        let cmds = self
            .commands
            .iter()
            .map(|c| command_line(c, self.options.sgl));
        let pages = self
            .pages
            .iter()
            .map(|p| serde_json::to_string(p).expect("plain struct serializes"));
        cmds.chain(pages).collect()
    }

    /// Map calls made so far at each command's submission, by command index.
    pub fn map_calls_before_commands(&self) -> Vec<usize> {
        let mut maps = 0;
        let mut out = Vec::new();
        for e in &self.events {
            match e {
                TraceEvent::Map { .. } => maps += 1,
                TraceEvent::Command(_) => out.push(maps),
            }
        }
        out
    }
}

/// Run `ops` on a cache over a recording device set up from `spec` that takes PRPs only.
pub fn run_trace(spec: &MapSpec, ops: &[TraceOp]) -> Result<TraceReport, TraceError> {
    run_trace_with(spec, ops, TraceOptions::default())
}

/// Run `ops` on a cache over a recording device set up from `spec` and `options`.
pub fn run_trace_with(
    spec: &MapSpec,
    ops: &[TraceOp],
    options: TraceOptions,
) -> Result<TraceReport, TraceError> {
    let bpp = (PAGE_SIZE as u32 / spec.block_size) as u64;
    let touched: BTreeSet<u64> = ops.iter().flat_map(|o| o.pages(bpp)).collect();
    let frames = (touched.len() + 64).div_ceil(FRAMES_PER_CHUNK) * FRAMES_PER_CHUNK;
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0)?;
    let pool = PagePool::new(&dma, frames)?;
    let log: EventLog = Arc::new(Mutex::new(Vec::new()));
    let mut dev = RecordingDevice::new(pool.clone(), spec.lba_size, TRACE_DISK_LBAS);
    dev.set_fill(DiskFill::Pattern);
    dev.set_max_transfer(spec.max_transfer.unwrap_or(u32::MAX));
    dev.set_event_log(log.clone());
    if options.sgl {
        dev.set_data_pointer_mode(DataPointerMode::Auto);
    }
    let mut cache = PageCache::new(dev, pool, CacheOptions::default())?;
    let map = LoggedMap::new(spec.extent_map()?, log.clone());
    let f = cache.open(Box::new(map), spec.file_size)?;
    let bs = spec.block_size as u64;
    for op in ops {
        match op {
            TraceOp::Read { start, count } => {
                cache.readahead(f, *start, *count)?;
                cache.wait_idle()?;
            }
            TraceOp::ReadPage(p) => match cache.read_page(f, *p) {
                Ok(()) | Err(MpageError::Read { .. }) => {}
                Err(e) => return Err(e.into()),
            },
            TraceOp::WritePages(pages) => {
                let mut data = vec![0u8; PAGE_SIZE];
                for &p in pages {
                    fill_pattern(WRITE_SEED, p * PAGE_SIZE as u64, &mut data);
                    cache.write_page(f, p, &data)?;
                }
                cache.start_writeback(f)?;
                cache.wait_idle()?;
            }
            TraceOp::WriteBlocks(blocks) => {
                let mut data = vec![0u8; bs as usize];
                for &b in blocks {
                    fill_pattern(WRITE_SEED, b * bs, &mut data);
                    cache.write_block(f, b, &data)?;
                }
                cache.start_writeback(f)?;
                cache.wait_idle()?;
            }
        }
    }
    let mut pages = Vec::new();
    let mut page_data = BTreeMap::new();
    for &p in &touched {
        if let Some(s) = cache.page_state(f, p) {
            pages.push(PageReport {
                page: p,
                uptodate: s.uptodate,
                dirty: s.dirty,
                zeroed_from: s.zeroed_from,
                mapped_to_disk: s.mapped_to_disk,
                error: s.error.map(|e| e.to_string()),
            });
            page_data.insert(p, cache.page_data(f, p).expect("cached page"));
        }
    }
    let stats = cache.stats();
    let spare = RecordingDevice::new(cache.pool().clone(), spec.lba_size, 1);
    let device = std::mem::replace(cache.device_mut(), spare);
    let events = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(TraceReport {
        commands: device.commands().to_vec(),
        pages,
        events,
        stats,
        page_data,
        device,
        options,
    })
}

/// Parse `map_json`, run `ops` on a device that takes PRPs only, return the output lines.
pub fn trace(map_json: &str, ops: &[TraceOp]) -> Result<Vec<String>, TraceError> {
    trace_with(map_json, ops, TraceOptions::default())
}

/// Parse `map_json`, run `ops` on a device set up from `options`, return the output lines.
pub fn trace_with(
    map_json: &str,
    ops: &[TraceOp],
    options: TraceOptions,
) -> Result<Vec<String>, TraceError> {
    let spec = MapSpec::from_json(map_json)?;
    Ok(run_trace_with(&spec, ops, options)?.json_lines())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_parse_and_errors_say_what_is_expected() {
        assert_eq!(
            TraceOp::parse("read", "3:5").unwrap(),
            TraceOp::Read { start: 3, count: 5 }
        );
        assert_eq!(
            TraceOp::parse("read-page", "7").unwrap(),
            TraceOp::ReadPage(7)
        );
        assert_eq!(
            TraceOp::parse("write", "0, 2,5").unwrap(),
            TraceOp::WritePages(vec![0, 2, 5])
        );
        assert_eq!(
            TraceOp::parse("write-blocks", "9").unwrap(),
            TraceOp::WriteBlocks(vec![9])
        );
        assert!(TraceOp::parse("read", "3")
            .unwrap_err()
            .to_string()
            .contains("START:COUNT"));
        assert!(TraceOp::parse("read", "3:0").is_err());
        assert!(TraceOp::parse("write", "1,x")
            .unwrap_err()
            .to_string()
            .contains("--write \"1,x\""));
        assert!(TraceOp::parse("erase", "1").is_err());
        // Indexes whose byte offsets would not fit, and traces nobody could read, are refused.
        let max = TRACE_MAX_INDEX.to_string();
        let past = (TRACE_MAX_INDEX + 1).to_string();
        assert!(TraceOp::parse("read-page", &max).is_ok());
        assert!(TraceOp::parse("write", &max).is_ok());
        for (flag, value) in [
            ("read-page", past.as_str()),
            ("read-page", "18446744073709551615"),
            ("write", "18446744073709551615"),
            ("write-blocks", "1,18446744073709551615"),
            ("read", "0:65537"),
            ("read", "18446744073709551615:1"),
        ] {
            let e = TraceOp::parse(flag, value).unwrap_err().to_string();
            assert!(
                e.contains("up to") || e.contains("at most"),
                "{flag} {value}: {e}"
            );
        }
        assert!(TraceOp::parse("read", "0:65536").is_ok());
        let many = vec!["1"; 65537].join(",");
        assert!(TraceOp::parse("write", &many).is_err());
        let ops = parse_ops(Some("0:4"), Some(2), Some("1"), None).unwrap();
        assert_eq!(
            ops,
            vec![
                TraceOp::Read { start: 0, count: 4 },
                TraceOp::ReadPage(2),
                TraceOp::WritePages(vec![1])
            ]
        );
    }
}
