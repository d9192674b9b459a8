//! `rnvme vm`: throwaway QEMU guests.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use rnvme_tools::vm::{self, ControllerSpec, VmConfig, SPEC_HELP};

use super::{allow_closed_stdout, outln, stdout_error, UsageError};

/// `rnvme vm …`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a throwaway guest, run SCRIPT in it with /bin/sh, print its output and exit with its status
    #[command(after_help = SPEC_HELP)]
    Run(RunArgs),
    /// Install the host packages and download the guest kernel into the cache, without booting
    Fetch,
}

/// Arguments of `rnvme vm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest memory in MiB
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub mem: u32,
    /// Guest CPUs
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub cpus: u32,
    /// An NVMe controller (see SPEC below); repeat for more. Default: one with one 256 MiB namespace
    #[arg(long = "ctrl", value_name = "SPEC", value_parser = vm::parse_controller_spec)]
    pub ctrls: Vec<ControllerSpec>,
    /// No NVMe controller at all
    #[arg(long, conflicts_with = "ctrls")]
    pub no_ctrl: bool,
    /// 2 MiB hugepages to reserve in the guest
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub hugepages: u32,
    /// A host binary to copy into the guest with its libraries (name in PATH or a path); repeatable
    #[arg(long = "bin", value_name = "PATH")]
    pub bins: Vec<String>,
    /// A host file or directory to copy to a guest path; repeatable
    #[arg(long = "file", value_name = "HOST:GUEST", value_parser = parse_file)]
    pub files: Vec<(PathBuf, String)>,
    /// Copy a statically linked rnvme into the guest as /usr/local/bin/rnvme (built if needed)
    #[arg(long)]
    pub with_rnvme: bool,
    /// An extra kernel command-line argument; repeatable
    #[arg(long = "append", value_name = "ARG")]
    pub kernel_args: Vec<String>,
    /// Kill the guest after this many seconds
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
    /// Print timings and the guest's kernel console to stderr
    #[arg(long, short)]
    pub verbose: bool,
    /// The script ("-" reads it from stdin); several words are joined with spaces
    #[arg(last = true, required = true, value_name = "SCRIPT")]
    pub script: Vec<String>,
}

/// Parses `HOST:GUEST`.
fn parse_file(s: &str) -> Result<(PathBuf, String), String> {
    let (host, guest) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:GUEST"))?;
    if host.is_empty() || !guest.starts_with('/') {
        return Err(format!(
            "{s:?}: expected HOST:GUEST with an absolute GUEST path"
        ));
    }
    Ok((PathBuf::from(host), guest.to_string()))
}

/// A statically linked rnvme: this executable if it is one, else a fresh static build of the
/// source tree this binary came from.
pub(crate) fn static_rnvme() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("find the rnvme executable")?;
    if vm::is_static_elf(&me) {
        return Ok(me);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !root.join("Cargo.toml").is_file() {
        anyhow::bail!(
            "{} is not statically linked and its source tree {} is gone; pass a static build with --file PATH:/usr/local/bin/rnvme",
            me.display(),
            root.display()
        );
    }
    Ok(vm::build_static_rnvme(&root)?)
}

/// The fio engine, `librnvme_fio.so`, built from the source tree this rnvme was built from,
/// against the installed fio's source (see `tools/fio-source`).
pub(crate) fn fio_engine() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !root.join("fio/Cargo.toml").is_file() {
        anyhow::bail!(
            "the fio engine is built from rnvme's source tree, and {} is gone",
            root.display()
        );
    }
    Ok(vm::fio_engine(&root)?)
}

/// The config for `args`.
fn config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    if args.timeout == 0 {
        return Err(UsageError("--timeout must be at least 1 second".into()).into());
    }
    let controllers = if args.no_ctrl {
        Vec::new()
    } else if args.ctrls.is_empty() {
        vec![ControllerSpec::default()]
    } else {
        args.ctrls.clone()
    };
    let mut files = args.files.clone();
    if args.with_rnvme {
        files.push((static_rnvme()?, "/usr/local/bin/rnvme".into()));
    }
    Ok(VmConfig {
        memory_mib: args.mem,
        cpus: args.cpus,
        hugepages: args.hugepages,
        controllers,
        host_binaries: args.bins.clone(),
        files,
        kernel_args: args.kernel_args.clone(),
        timeout: Duration::from_secs(args.timeout),
        ..VmConfig::default()
    })
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let script = if args.script == ["-"] {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read the script from stdin")?;
        s
    } else {
        args.script.join(" ")
    };
    let cfg = config(&args)?;
    match vm::run(&cfg, &script) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            let printed = stdout
                .write_all(out.output.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(stdout_error);
            drop(stdout);
            // The script's status is the command's, whether or not its output was read.
            allow_closed_stdout(printed)?;
            if args.verbose {
                eprintln!("--- guest console ---\n{}\n---", out.console.trim_end());
                eprintln!(
                    "rnvme: controllers {}; boot to script {:.2} s; total {:.2} s; exit status {}",
                    if out.bdfs.is_empty() {
                        "none".into()
                    } else {
                        out.bdfs.join(" ")
                    },
                    out.boot_to_script.as_secs_f64(),
                    out.total.as_secs_f64(),
                    out.exit_code
                );
            }
            Ok(ExitCode::from(u8::try_from(out.exit_code).unwrap_or(255)))
        }
        Err(e) => {
            if let vm::VmError::Config(m) = &e {
                return Err(UsageError(format!("invalid guest configuration: {m}")).into());
            }
            if let Some(tail) = e.console_tail(if args.verbose { 10_000 } else { 25 }) {
                eprintln!(
                    "--- guest console (last lines) ---\n{}\n---",
                    tail.trim_end()
                );
            }
            Err(e.into())
        }
    }
}

fn fetch() -> anyhow::Result<ExitCode> {
    vm::ensure_host()?;
    let cache = vm::cache_dir()?;
    let k = vm::fetch_kernel(&cache)?;
    outln!("host packages present")?;
    outln!("guest kernel {} in {}", k.release, k.vmlinuz.display())?;
    Ok(ExitCode::SUCCESS)
}

/// `rnvme vm`.
pub fn vm(c: VmCommand) -> anyhow::Result<ExitCode> {
    match c {
        VmCommand::Run(a) => run(a),
        VmCommand::Fetch => fetch(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(subcommand)]
        c: VmCommand,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        match T::try_parse_from(v)?.c {
            VmCommand::Run(r) => Ok(r),
            VmCommand::Fetch => panic!("parsed as fetch"),
        }
    }

    #[test]
    fn run_arguments_become_a_config() {
        let a = parse(&[
            "run",
            "--mem",
            "1024",
            "--ctrl",
            "lba=4096,ns=2",
            "--ctrl",
            "mdts=3",
            "--bin",
            "fio",
            "--file",
            "/etc/hosts:/etc/hosts",
            "--hugepages",
            "64",
            "--append",
            "x=1",
            "--",
            "nvme",
            "list",
        ])
        .unwrap();
        assert_eq!(a.script, ["nvme", "list"]);
        let c = config(&a).unwrap();
        assert_eq!(c.memory_mib, 1024);
        assert_eq!(c.hugepages, 64);
        assert_eq!(c.controllers.len(), 2);
        assert_eq!(c.controllers[0].namespaces.len(), 2);
        assert_eq!(c.controllers[0].namespaces[1].lba_size, 4096);
        assert_eq!(c.controllers[1].mdts, Some(3));
        assert_eq!(c.host_binaries, ["fio"]);
        assert_eq!(
            c.files,
            [(PathBuf::from("/etc/hosts"), "/etc/hosts".to_string())]
        );
        assert_eq!(c.kernel_args, ["x=1"]);
    }

    #[test]
    fn default_and_no_controllers() {
        let c = config(&parse(&["run", "--", "true"]).unwrap()).unwrap();
        assert_eq!(c.controllers, [ControllerSpec::default()]);
        assert_eq!(c.memory_mib, 2048);
        assert_eq!(c.cpus, 2);
        assert_eq!(c.timeout, Duration::from_secs(600));
        let c = config(&parse(&["run", "--no-ctrl", "--", "true"]).unwrap()).unwrap();
        assert!(c.controllers.is_empty());
    }

    #[test]
    fn usage_errors() {
        for bad in [
            vec!["run", "--ctrl", "lba=3", "--", "true"],
            vec!["run", "--file", "nocolon", "--", "true"],
            vec!["run", "--file", "/a:relative", "--", "true"],
            vec!["run"],
            vec!["run", "--no-ctrl", "--ctrl", "ns=1", "--", "true"],
            vec!["run", "--ctrl", "size=99999999999T", "--", "true"],
            vec!["run", "--ctrl", "size=99999999999G", "--", "true"],
        ] {
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let e = config(&parse(&["run", "--timeout", "0", "--", "true"]).unwrap()).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        assert_eq!(e.to_string(), "--timeout must be at least 1 second");
    }
}
