//! `rnvme status`: hugepages, locked memory and every NVMe controller in one view.

use std::process::ExitCode;

use clap::Args;
use rnvme_tools::status;
use rnvme_tools::sysfs::Sysfs;

use super::{out, outln};

/// Arguments of `rnvme status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of the tables
    #[arg(long)]
    pub json: bool,
}

/// `rnvme status`.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let sys = Sysfs::from_env();
    let st = status::gather(&sys, &|bdf| super::list::access(&sys, bdf))?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&st)?)?;
    } else {
        out!("{}", st.table())?;
    }
    Ok(ExitCode::SUCCESS)
}
