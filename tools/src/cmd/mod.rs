//! Command implementations, one module per command family.

pub mod bench;
pub mod demo;
pub mod device;
pub mod ext;
pub mod list;
pub mod mpage;
pub mod perf;
pub mod setup;
pub mod verify;
pub mod vm;

/// A usage error found after argument parsing (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

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
    fn bdf_values() {
        assert_eq!(bdf_arg("0000:00:04.0").unwrap(), "0000:00:04.0");
        let e = bdf_arg("00:04.0").unwrap_err();
        assert!(e.contains("did you mean 0000:00:04.0"), "{e}");
        assert!(bdf_arg("0000:00:04.0 ").is_err());
    }
}
