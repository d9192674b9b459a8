//! Command implementations, one module per command family.

pub mod bench;
pub mod demo;
pub mod device;
pub mod ext;
pub mod list;
pub mod mpage;
pub mod perf;
pub mod serve;
pub mod setup;
pub mod status;
pub mod verify;
pub mod vm;

/// Standard output was closed by its reader, as `rnvme list | head -1` does once it has its
/// line.
///
/// The commands print with [`out!`] and [`outln!`], which turn that write error into this one
/// instead of panicking as `print!` does; `main` then exits quietly with status 0. It is not
/// the shell's 141 (killed by SIGPIPE): the reader asked for no more, which is not a failure of
/// the command. A command whose status says more than "done" (verify, perf, bench) finishes its
/// checks and keeps its own status when its report cannot be printed.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// An error writing to standard output: [`StdoutClosed`] when the reader is gone.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}

/// Whether `e` is (or was caused by) [`StdoutClosed`].
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// `printed` (the result of printing a report), with a closed standard output let through:
/// for a command whose status comes from what it found, which the reader closing the pipe
/// must not turn into success.
pub fn allow_closed_stdout(printed: anyhow::Result<()>) -> anyhow::Result<()> {
    match printed {
        Err(e) if is_stdout_closed(&e) => Ok(()),
        other => other,
    }
}

/// `print!` that returns an `anyhow::Result<()>` instead of panicking (see [`StdoutClosed`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).map_err($crate::cmd::stdout_error)
    }};
}

/// `println!` that returns an `anyhow::Result<()>` instead of panicking (see [`StdoutClosed`]).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cmd::stdout_error)
    }};
}

pub(crate) use {out, outln};

/// `-o, --output-format` of the commands that also speak nvme-cli's JSON.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// rnvme's text
    #[default]
    Normal,
    /// nvme-cli's JSON: its keys, shapes and values (see also --json, rnvme's own)
    Json,
}

/// A usage error found after argument parsing (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The wait mode a `--mode`/`--wait` of `polled`, `interrupt` or `hybrid` (with its
/// `--spin-us`) names, as `rnvme perf` and the `mpage` commands take it.
pub fn wait_mode(name: &str, spin_us: u64) -> rnvme_driver::irq::WaitMode {
    use rnvme_driver::irq::WaitMode;
    match name {
        "interrupt" => WaitMode::Interrupt,
        "hybrid" => WaitMode::Hybrid {
            spin: std::time::Duration::from_micros(spin_us),
        },
        _ => WaitMode::Polled,
    }
}

/// clap value parser for a full PCI address (suggesting the full form for a short one).
pub fn bdf_arg(s: &str) -> Result<String, String> {
    rnvme_driver::vfio::check_bdf(s).map_err(|e| e.to_string())?;
    rnvme_tools::sysfs::parse_bdf(s).map_err(|e| e.to_string())
}

/// The error and its causes on one line, joined by ": ", leaving out a cause whose text the
/// line already ends with.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if line.ends_with(&s) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&s);
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn error_chain_on_one_line_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = Err::<(), _>(io)
            .context("open /x")
            .context("load\nthing")
            .unwrap_err();
        assert_eq!(error_line(&e), "load thing: open /x: gone");
        let e = anyhow::Error::from(rnvme_tools::sysfs::SysfsError::Io {
            what: "write",
            path: "/sys/x".into(),
            source: std::io::Error::from_raw_os_error(13),
        });
        let line = error_line(&e);
        assert_eq!(line.matches("Permission denied").count(), 1, "{line}");
    }

    #[test]
    fn a_broken_pipe_on_stdout_is_stdout_closed_and_other_errors_are_not() {
        let closed = stdout_error(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(is_stdout_closed(&closed));
        assert!(is_stdout_closed(&closed.context("print the table")));
        assert!(allow_closed_stdout(Err(stdout_error(std::io::Error::from(
            std::io::ErrorKind::BrokenPipe
        ))))
        .is_ok());
        let full = stdout_error(std::io::Error::from_raw_os_error(28));
        assert!(!is_stdout_closed(&full));
        let line = error_line(&full);
        assert!(
            line.starts_with("cannot write to standard output: "),
            "{line}"
        );
        assert!(allow_closed_stdout(Err(full)).is_err());
        // A broken pipe that is not stdout's (a child process's input) is an error.
        let other = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(!is_stdout_closed(&other));
    }

    #[test]
    fn bdf_values() {
        assert_eq!(bdf_arg("0000:00:04.0").unwrap(), "0000:00:04.0");
        let e = bdf_arg("00:04.0").unwrap_err();
        assert!(e.contains("did you mean 0000:00:04.0"), "{e}");
        assert!(bdf_arg("0000:00:04.0 ").is_err());
    }
}
