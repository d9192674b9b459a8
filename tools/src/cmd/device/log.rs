//! `rnvme log`: SMART / health and error log pages.

use super::*;

/// Which log page.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogKind {
    /// SMART / health information
    Smart,
    /// Error information
    Errors,
}

/// `rnvme log`
#[derive(Args, Debug)]
#[command(after_help = "\
-o json prints what `nvme smart-log -o json` or `nvme error-log -o json` prints (nvme-cli's keys \
and shapes; the error log with every entry the controller keeps, up to 64, empty ones too). \
--json prints rnvme's own decoding.")]
pub struct LogArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Which log page
    #[arg(value_enum)]
    pub kind: LogKind,
    /// Print rnvme's JSON
    #[arg(long)]
    pub json: bool,
    /// normal, or json for nvme-cli's JSON (smart-log, error-log)
    #[arg(
        short = 'o',
        long = "output-format",
        value_enum,
        default_value_t,
        conflicts_with = "json"
    )]
    pub output_format: OutputFormat,
}

pub fn log(a: LogArgs) -> Result<ExitCode> {
    let ctrl = a.dev.open()?;
    if a.output_format == OutputFormat::Json {
        let v = match a.kind {
            // The controller's log, as `nvme smart-log` asks for it (all namespaces).
            LogKind::Smart => nvmecli::smart_log(&ctrl.get_log_page(
                log_page::SMART,
                u32::MAX,
                nvmecli::SMART_LEN,
            )?),
            LogKind::Errors => {
                let entries = nvmecli::error_log_entries(ctrl.info().elpe);
                nvmecli::error_log(&ctrl.get_log_page(
                    log_page::ERROR,
                    0,
                    entries * nvmecli::ERROR_ENTRY_LEN,
                )?)
            }
        };
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    match a.kind {
        LogKind::Smart => {
            let s = ctrl.smart_log()?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&s)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            outln!("SMART / health log of {}", ctrl.name())?;
            outln!("  critical warning        {:#04x}", s.critical_warning)?;
            outln!(
                "  temperature             {} °C ({} K)",
                s.temperature_celsius(),
                s.temperature_kelvin
            )?;
            outln!(
                "  available spare         {} % (threshold {} %)",
                s.available_spare,
                s.available_spare_threshold
            )?;
            outln!("  percentage used         {} %", s.percentage_used)?;
            outln!(
                "  data units read         {} (× 512 000 bytes)",
                s.data_units_read
            )?;
            outln!(
                "  data units written      {} (× 512 000 bytes)",
                s.data_units_written
            )?;
            outln!("  host read commands      {}", s.host_read_commands)?;
            outln!("  host write commands     {}", s.host_write_commands)?;
            outln!("  controller busy time    {} min", s.controller_busy_time)?;
            outln!("  power cycles            {}", s.power_cycles)?;
            outln!("  power on hours          {}", s.power_on_hours)?;
            outln!("  unsafe shutdowns        {}", s.unsafe_shutdowns)?;
            outln!("  media errors            {}", s.media_errors)?;
            outln!("  error log entries       {}", s.num_err_log_entries)?;
        }
        LogKind::Errors => {
            let entries = ctrl.error_log()?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&entries)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            if entries.is_empty() {
                outln!("error log of {}: no entries", ctrl.name())?;
            }
            for e in entries {
                outln!(
                    "error #{}: sq {} cid {} nsid {} lba {}: {}",
                    e.error_count,
                    e.sqid,
                    e.cid,
                    e.nsid,
                    e.lba,
                    e.status
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
