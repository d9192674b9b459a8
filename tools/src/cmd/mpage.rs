//! `rnvme mpage trace`: run the real mpage code on a recording device and print the NVMe
//! commands it issued and the state of every page it touched, as JSON lines.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rnvme_mpage::{TraceError, TraceOp};

use super::UsageError;

/// `rnvme mpage ...`
#[derive(Debug, Subcommand)]
pub enum MpageCommand {
    /// Run the page cache on a recording device and print the commands it issues
    Trace(TraceArgs),
}

/// Operations are applied in the order given on the command line, on one cache.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The file's block map: block size, LBA size, max transfer, file size, extents, failing
    /// blocks, where `create` allocates
    #[arg(long)]
    pub map: PathBuf,
    /// Read COUNT pages from page START (readahead, then wait): START:COUNT
    #[arg(long, value_name = "START:COUNT")]
    pub read: Vec<String>,
    /// Read one page
    #[arg(long, value_name = "N")]
    pub read_page: Vec<String>,
    /// Dirty whole pages (comma list of page indexes), then write them back
    #[arg(long, value_name = "PAGES")]
    pub write: Vec<String>,
    /// Dirty single file blocks (comma list of block indexes), then write them back
    #[arg(long, value_name = "BLOCKS")]
    pub write_blocks: Vec<String>,
}

pub fn mpage(c: MpageCommand) -> Result<ExitCode> {
    match c {
        MpageCommand::Trace(a) => trace(a, std::env::args().collect()),
    }
}

/// The operations in command-line order. clap keeps each flag's values in order but not the
/// order between flags, so the raw arguments decide it.
fn ops_in_order(args: &[String]) -> Result<Vec<TraceOp>> {
    let mut ops = Vec::new();
    let mut it = args.iter().skip_while(|a| a.as_str() != "trace").skip(1);
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--") else {
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if !matches!(name, "read" | "read-page" | "write" | "write-blocks") {
            continue;
        }
        let value = match value {
            Some(v) => v,
            None => it.next().cloned().unwrap_or_default(),
        };
        ops.push(
            TraceOp::parse(name, &value)
                .map_err(|e| UsageError(format!("--{name} {value}: {e}")))?,
        );
    }
    Ok(ops)
}

fn trace(a: TraceArgs, raw: Vec<String>) -> Result<ExitCode> {
    let json = std::fs::read_to_string(&a.map)
        .with_context(|| format!("cannot read the map file {}", a.map.display()))?;
    let ops = ops_in_order(&raw)?;
    let given = a.read.len() + a.read_page.len() + a.write.len() + a.write_blocks.len();
    if ops.len() != given {
        return Err(UsageError(
            "could not tell the order of the operations: give each as --flag VALUE".into(),
        )
        .into());
    }
    if ops.is_empty() {
        return Err(UsageError(
            "nothing to trace: give --read, --read-page, --write or --write-blocks".into(),
        )
        .into());
    }
    let lines = rnvme_mpage::trace(&json, &ops).map_err(|e| match e {
        TraceError::Spec(s) => anyhow::Error::from(UsageError(format!("{}: {s}", a.map.display()))),
        other => anyhow::Error::from(other),
    })?;
    for l in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn operations_keep_command_line_order() {
        let ops = ops_in_order(&args(
            "rnvme mpage trace --map m.json --write 0,1 --read 0:4 --read-page=3 --write-blocks 5",
        ))
        .unwrap();
        assert_eq!(
            ops,
            vec![
                TraceOp::WritePages(vec![0, 1]),
                TraceOp::Read { start: 0, count: 4 },
                TraceOp::ReadPage(3),
                TraceOp::WriteBlocks(vec![5]),
            ]
        );
    }

    #[test]
    fn malformed_operation_is_a_usage_error() {
        let e = ops_in_order(&args("rnvme mpage trace --read 4")).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(e.to_string().contains("--read 4"), "{e}");
    }
}
