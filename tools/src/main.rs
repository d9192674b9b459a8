//! `rnvme`: set NVMe controllers up for the userspace driver, list them, and run throwaway
//! QEMU guests.

mod cmd;

use std::io::Write;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// rnvme: a userspace NVMe driver's companion tool.
#[derive(Debug, Parser)]
#[command(name = "rnvme", version, propagate_version = true)]
#[command(after_help = "Set RUST_LOG=info (or debug) for logging.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One variant per command family; each dispatches to a module under `cmd/`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the main job on an emulated NVMe controller, with no set-up: boot a guest, bind,
    /// identify, write, read, benchmark against the kernel
    Demo(cmd::demo::DemoArgs),
    /// Bind NVMe controllers to vfio-pci and reserve hugepages, so rnvme can drive them
    Setup(cmd::setup::SetupArgs),
    /// Give controllers back to the kernel's nvme driver
    Reset(cmd::setup::ResetArgs),
    /// Hugepages per NUMA node, the locked-memory limit, and every NVMe controller: ids, node,
    /// driver, IOMMU group, block devices and mounts, whether rnvme can open it
    Status(cmd::status::StatusArgs),
    /// List the NVMe controllers on the PCI bus and whether rnvme can open them
    List(cmd::list::ListArgs),
    /// Identify a controller and its namespaces
    Identify(cmd::device::IdentifyArgs),
    /// Read LBAs to standard output or a file
    Read(cmd::device::ReadArgs),
    /// Write LBAs from standard input or a file
    Write(cmd::device::WriteArgs),
    /// Flush the volatile write cache of a namespace
    Flush(cmd::device::FlushArgs),
    /// Zero a range of LBAs (--lba L --count C), or the whole namespace (--all)
    WriteZeroes(cmd::device::ZeroArgs),
    /// Deallocate (trim) a range of LBAs (--lba L --count C), or the whole namespace (--all)
    Trim(cmd::device::ZeroArgs),
    /// Show the SMART / health or error information log page
    Log(cmd::device::LogArgs),
    /// List a directory of an ext2/ext3/ext4 namespace (with -l: extents and the commands a read takes)
    Ls(cmd::ext::LsArgs),
    /// Print a file of an ext2/ext3/ext4 namespace, read through the page cache
    Cat(cmd::ext::CatArgs),
    /// Copy a file of an ext2/ext3/ext4 namespace to a local path, through the page cache
    Cp(cmd::ext::CpArgs),
    /// Measure throughput and latency on one or more namespaces (queue depth, I/O size, workload)
    Perf(cmd::perf::PerfArgs),
    /// Write a self-describing pattern and read it back, or check a range written earlier;
    /// reports misdirected, stale, torn, zeroed and corrupt blocks
    Verify(cmd::verify::VerifyArgs),
    /// Export namespaces over NVMe/TCP: any NVMe/TCP initiator (the kernel's nvme-tcp) uses them
    Serve(cmd::serve::ServeArgs),
    /// Benchmarks: the kernel driver (fio) and rnvme side by side in one QEMU guest
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// The mpage page cache: trace its commands on a recording device; read, write and
    /// benchmark files through it on a device
    #[command(subcommand)]
    Mpage(cmd::mpage::MpageCommand),
    /// Throwaway QEMU guests with emulated NVMe controllers
    #[command(subcommand)]
    Vm(cmd::vm::VmCommand),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
    std::panic::set_hook(Box::new(|info| report_panic(&mut std::io::stderr(), info)));
    let cli = Cli::parse();
    exit_status_of(|| run(cli))
}

/// The panic hook (`out` is stderr): report the panic on one line and let it unwind.
/// Destructors run (a QEMU guest is killed, temporary directories are removed), a
/// `catch_unwind` on the way (the reactor's, perf's worker set-up) sees it, and a panic on
/// another thread does not end the process. A panic of the command itself reaches
/// [`exit_status_of`].
fn report_panic(out: &mut dyn Write, info: &PanicHookInfo<'_>) {
    let msg = info.to_string().replace('\n', " ");
    // Not eprintln!: a panic inside the hook (stderr closed) would abort.
    let _ = writeln!(out, "rnvme: error: internal error: {msg}");
}

/// Runs `f`; a panic that unwinds out of it (reported by the hook) is exit status 1.
fn exit_status_of(f: impl FnOnce() -> ExitCode) -> ExitCode {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or(ExitCode::from(1))
}

/// Runs the command; its exit status.
fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::demo(a),
        Command::Setup(a) => cmd::setup::setup(a),
        Command::Reset(a) => cmd::setup::reset(a),
        Command::Status(a) => cmd::status::status(a),
        Command::List(a) => cmd::list::list(a),
        Command::Identify(a) => cmd::device::identify(a),
        Command::Read(a) => cmd::device::read(a),
        Command::Write(a) => cmd::device::write(a),
        Command::Flush(a) => cmd::device::flush(a),
        Command::WriteZeroes(a) => cmd::device::range_op(a, cmd::device::RangeOp::WriteZeroes),
        Command::Trim(a) => cmd::device::range_op(a, cmd::device::RangeOp::Trim),
        Command::Log(a) => cmd::device::log(a),
        Command::Ls(a) => cmd::ext::ls(a),
        Command::Cat(a) => cmd::ext::cat(a),
        Command::Cp(a) => cmd::ext::cp(a),
        Command::Perf(a) => cmd::perf::perf(a),
        Command::Verify(a) => cmd::verify::verify(a),
        Command::Serve(a) => cmd::serve::serve(a),
        Command::Bench(c) => cmd::bench::bench(c),
        Command::Mpage(c) => cmd::mpage::mpage(c),
        Command::Vm(c) => cmd::vm::vm(c),
    };
    // What is still buffered goes out now, where a write error is seen. A closed stdout does
    // not change the command's status (which may say it found a failure).
    let result = result.and_then(|code| {
        cmd::allow_closed_stdout(std::io::stdout().flush().map_err(cmd::stdout_error))?;
        Ok(code)
    });
    match result {
        Ok(code) => code,
        // See cmd::StdoutClosed: the reader wanted no more, the command did not fail.
        Err(e) if cmd::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rnvme: error: {}", cmd::error_line(&e));
            if e.downcast_ref::<cmd::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    struct SetOnDrop<'a>(&'a AtomicBool);

    impl Drop for SetOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_panic_is_reported_on_one_line_unwinds_and_exits_with_1() {
        static OUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
        let previous = std::panic::take_hook();
        // The hook, writing to OUT instead of stderr: one that ended the process would end
        // this test binary.
        std::panic::set_hook(Box::new(|info| {
            report_panic(&mut *OUT.lock().unwrap_or_else(|e| e.into_inner()), info)
        }));
        let dropped = AtomicBool::new(false);
        let code = exit_status_of(|| {
            let _guard = SetOnDrop(&dropped);
            panic!("first line\nsecond line of the command's panic");
        });
        let thread = std::thread::spawn(|| panic!("a worker thread's panic")).join();
        std::panic::set_hook(previous);

        assert_eq!(code, ExitCode::from(1));
        assert!(dropped.load(Ordering::SeqCst), "the destructor did not run");
        assert!(thread.is_err());
        let out = String::from_utf8(OUT.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .expect("UTF-8");
        let lines: Vec<&str> = out.lines().collect();
        let of = |needle: &str| {
            lines
                .iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?} in {lines:?}"))
                .to_string()
        };
        let line = of("first line second line of the command's panic");
        assert!(
            line.starts_with("rnvme: error: internal error: panicked at "),
            "{line}"
        );
        let line = of("a worker thread's panic");
        assert!(line.starts_with("rnvme: error: internal error: "), "{line}");
        assert_eq!(exit_status_of(|| ExitCode::from(7)), ExitCode::from(7));
    }
}
