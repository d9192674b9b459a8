//! `rnvme serve`: export namespaces over NVMe/TCP (the target is `rnvme-nvmf`).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rnvme_driver::affinity::CpuList;
use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;
use rnvme_nvmf::{DeviceWait, Limits, Namespace, Report, ServeOptions, Server, Subsystem, Target};

use super::UsageError;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Namespaces to export: a controller's full PCI address (all its namespaces), or BDF/NSID
    #[arg(value_name = "BDF[/NSID]", required = true, value_parser = super::perf::target_arg)]
    pub targets: Vec<(String, Option<u32>)>,
    /// One subsystem with this NQN holding every namespace given (default: one subsystem per
    /// controller, nqn.2014-08.io.rnvme:BDF)
    #[arg(long, value_name = "NQN")]
    pub nqn: Option<String>,
    /// Address and port to listen on (repeatable; default 127.0.0.1:4420)
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Also listen on this port (on the --listen addresses), the discovery service's 8009
    #[arg(long, value_name = "PORT")]
    pub discovery_port: Option<u16>,
    /// Only this host NQN may connect (repeatable); others are refused at Connect
    #[arg(long = "allow-host", value_name = "NQN")]
    pub allow_host: Vec<String>,
    /// Refuse writes, write zeroes and deallocate (Namespace Is Write Protected)
    #[arg(long)]
    pub read_only: bool,
    /// Poll threads, one per CPU of this list (e.g. 0-1 or 2,3); default: one thread
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,
    /// Print every connection's counters every SECS seconds (they also print on SIGUSR1)
    #[arg(long, value_name = "SECS")]
    pub stats: Option<u64>,
    /// In-capsule data of I/O commands, bytes (IOCCSZ); larger writes go by R2T
    #[arg(long, value_name = "BYTES", default_value_t = 8192)]
    pub in_capsule: u32,
    /// Entries of each I/O queue a host may create (MAXCMD)
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u16).range(2..=1024))]
    pub queue_size: u16,
    /// Busy polling goes on at least this long (µs) after the last work before a poll thread
    /// sleeps; longer, twice the recent pauses between pieces of work, while those pauses are
    /// under 0.5 ms (unless --fixed-spin)
    #[arg(long, value_name = "US", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub spin_us: u64,
    /// Spin exactly --spin-us, never longer (the least CPU for a lightly loaded target)
    #[arg(long)]
    pub fixed_spin: bool,
    /// How a poll thread with nothing else to do waits for commands at the device: `irq`
    /// sleeps until its completion interrupt (or a socket) wakes it; a number of µs sleeps at
    /// most that long between polls of its completions; `busy` never sleeps while commands
    /// are there (dedicated CPUs)
    #[arg(long, value_name = "irq|US|busy", default_value = "irq", value_parser = parse_device_wait)]
    pub device_wait: DeviceWait,
    /// Ring MMIO doorbells only, even where the controller offers shadow doorbells
    #[arg(long)]
    pub no_shadow_doorbells: bool,
    /// Take DMA memory from ordinary 4 KiB pages (pinned by VFIO) instead of hugepages
    #[arg(long)]
    pub no_hugepages: bool,
}

fn parse_device_wait(s: &str) -> std::result::Result<DeviceWait, String> {
    match s {
        "irq" | "interrupt" => Ok(DeviceWait::Interrupt),
        "busy" => Ok(DeviceWait::Busy),
        us => match us.parse::<u64>() {
            Ok(n) if (1..=1_000_000).contains(&n) => {
                Ok(DeviceWait::Timed(Duration::from_micros(n)))
            }
            _ => Err(format!(
                "{us:?}: irq, busy, or microseconds from 1 to 1000000"
            )),
        },
    }
}

/// The default NQN of a controller's subsystem.
pub fn default_nqn(bdf: &str) -> String {
    format!("nqn.2014-08.io.rnvme:{bdf}")
}

fn check_nqn(nqn: &str) -> Result<()> {
    let ok = nqn.starts_with("nqn.")
        && nqn.len() <= 223
        && nqn.bytes().all(|c| (0x21..0x7f).contains(&c));
    if !ok {
        return Err(UsageError(format!(
            "{nqn:?} is not an NQN (nqn.yyyy-mm.reverse.domain:name, printable, at most 223 bytes)"
        ))
        .into());
    }
    Ok(())
}

/// Opens the controllers and lays out the subsystems.
fn build(args: &ServeArgs) -> Result<Target> {
    if let Some(n) = &args.nqn {
        check_nqn(n)?;
    }
    for h in &args.allow_host {
        check_nqn(h)?;
    }
    if args.in_capsule < 1024 || args.in_capsule > 1 << 20 || !args.in_capsule.is_multiple_of(16) {
        return Err(UsageError(format!(
            "--in-capsule {}: 1024 to 1048576 bytes, a multiple of 16 (a Connect's data is 1024)",
            args.in_capsule
        ))
        .into());
    }
    let mut devices: Vec<Arc<Controller>> = Vec::new();
    let mut by_bdf: BTreeMap<String, usize> = BTreeMap::new();
    let mut subsystems: Vec<Subsystem> = Vec::new();
    let mut max_transfer = 128 * 1024u32;
    for (bdf, nsid) in &args.targets {
        let dev = match by_bdf.get(bdf) {
            Some(&d) => d,
            None => {
                let c = Controller::open(
                    bdf,
                    ControllerOptions {
                        backing: Backing::small_pages_if(args.no_hugepages),
                        shadow_doorbells: !args.no_shadow_doorbells,
                        ..ControllerOptions::default()
                    },
                )
                .with_context(|| format!("open {bdf}"))?;
                devices.push(Arc::new(c));
                by_bdf.insert(bdf.clone(), devices.len() - 1);
                devices.len() - 1
            }
        };
        let ctrl = &devices[dev];
        let nsids: Vec<u32> = match nsid {
            Some(n) => vec![*n],
            None => ctrl.namespaces().iter().map(|n| n.nsid).collect(),
        };
        if nsids.is_empty() {
            return Err(
                UsageError(format!("{bdf}: the controller has no active namespace")).into(),
            );
        }
        let (nqn, serial) = match &args.nqn {
            Some(n) => (n.clone(), "rnvme".to_string()),
            None => (default_nqn(bdf), ctrl.info().serial.trim().to_string()),
        };
        let si = match subsystems.iter().position(|s| s.nqn == nqn) {
            Some(i) => i,
            None => {
                subsystems.push(Subsystem {
                    nqn,
                    serial,
                    namespaces: Vec::new(),
                    allowed_hosts: args.allow_host.clone(),
                    read_only: args.read_only,
                });
                subsystems.len() - 1
            }
        };
        for n in nsids {
            let ns = ctrl.namespace(n).map_err(|_| {
                UsageError(format!("{bdf}: namespace {n} is not an active namespace"))
            })?;
            if ns.metadata_size > 0 {
                return Err(UsageError(format!(
                    "{bdf}/{n}: the namespace's LBA format has {} bytes of metadata, which NVMe/TCP does not carry: format it without",
                    ns.metadata_size
                ))
                .into());
            }
            let s = &mut subsystems[si];
            if s.namespaces.iter().any(|x| x.dev == dev && x.dev_nsid == n) {
                return Err(UsageError(format!("{bdf}/{n} is given twice")).into());
            }
            // The device's own numbering when the subsystem is the controller's; in order
            // when several controllers share one.
            let nsid = if args.nqn.is_some() {
                s.namespaces.len() as u32 + 1
            } else {
                n
            };
            max_transfer =
                max_transfer.min(1 << (31 - ctrl.max_transfer_bytes().max(4096).leading_zeros()));
            s.namespaces.push(Namespace {
                nsid,
                dev,
                dev_nsid: n,
                lba_size: ns.lba_size,
                blocks: ns.size_lbas,
            });
        }
    }
    Ok(Target::new(
        devices,
        subsystems,
        Limits {
            in_capsule: args.in_capsule,
            queue_entries: args.queue_size,
            max_transfer,
            ..Limits::default()
        },
    ))
}

fn print_report(r: &Report, started: Instant) {
    eprintln!(
        "rnvme serve: {:.0} s up, {} controllers, {} connections ({} accepted, {} refused)",
        started.elapsed().as_secs_f64(),
        r.controllers,
        r.connections.len(),
        r.connections_accepted,
        r.connections_refused
    );
    for t in &r.threads {
        eprintln!(
            "  poll thread {}: waits for the device by {}; {} sleeps, {} ended by a completion interrupt",
            t.thread, t.device_wait, t.sleeps, t.device_wakeups
        );
    }
    for c in &r.connections {
        eprintln!(
            "  {} thread {} controller {} queue {}: {} commands, {} read, {} written, {} errors; now {} at the device, {} awaiting data, {} queued, {} bytes unsent",
            c.peer,
            c.thread,
            c.cntlid.map_or("-".into(), |x| x.to_string()),
            c.qid.map_or("-".into(), |x| x.to_string()),
            c.stats.commands,
            c.stats.read_bytes,
            c.stats.written_bytes,
            c.stats.errors,
            c.stats.at_device,
            c.stats.awaiting_data,
            c.stats.queued,
            c.stats.unsent
        );
    }
}

/// How the target runs, from the command line.
fn options(args: &ServeArgs, listen: Vec<SocketAddr>) -> ServeOptions {
    ServeOptions {
        listen,
        cpus: args
            .cpus
            .as_ref()
            .map(|c| c.cpus().to_vec())
            .unwrap_or_default(),
        spin: Duration::from_micros(args.spin_us),
        adaptive_spin: !args.fixed_spin,
        device_wait: args.device_wait,
        ..ServeOptions::default()
    }
}

pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    let mut listen = if args.listen.is_empty() {
        vec![SocketAddr::from(([127, 0, 0, 1], 4420))]
    } else {
        args.listen.clone()
    };
    if let Some(p) = args.discovery_port {
        let extra: Vec<SocketAddr> = listen.iter().map(|a| SocketAddr::new(a.ip(), p)).collect();
        for a in extra {
            if !listen.contains(&a) {
                listen.push(a);
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let usr1 = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("install a signal handler")?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone())
        .context("install a signal handler")?;
    // Each of those signals also writes a byte here: the main thread sleeps on it rather than
    // waking up on its own every few milliseconds to look at the flags.
    let (signalled, sig_tx) = UnixStream::pair().context("a socket pair for signals")?;
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ] {
        signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)
            .context("install a signal handler")?;
    }
    let target = Arc::new(build(&args)?);
    let server = Server::start(target.clone(), &options(&args, listen))?;
    for a in server.local_addrs() {
        eprintln!("rnvme serve: listening on {a} (NVMe/TCP)");
    }
    for s in &target.subsystems {
        let ns: Vec<String> = s
            .namespaces
            .iter()
            .map(|n| {
                format!(
                    "{} = {}/{}",
                    n.nsid,
                    target.devices[n.dev].name(),
                    n.dev_nsid
                )
            })
            .collect();
        eprintln!(
            "rnvme serve: subsystem {}{}: namespaces {}",
            s.nqn,
            if s.read_only { " (read-only)" } else { "" },
            ns.join(", ")
        );
    }
    let started = Instant::now();
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Acquire) {
        // Until a signal, the next --stats report, or the next look at the poll threads'
        // health (once a second).
        let mut wait = HEALTH_EVERY;
        if let Some(every) = args.stats {
            wait = wait.min(Duration::from_secs(every.max(1)).saturating_sub(last_stats.elapsed()));
        }
        signalled.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let _ = (&signalled).read(&mut [0u8; 16]);
        if usr1.swap(false, Ordering::AcqRel)
            || args
                .stats
                .is_some_and(|s| last_stats.elapsed() >= Duration::from_secs(s.max(1)))
        {
            print_report(&server.report(), started);
            last_stats = Instant::now();
        }
        if !server.is_running() {
            anyhow::bail!("a poll thread ended unexpectedly");
        }
        if let Some(t) = server.stalled_threads(Duration::from_secs(5)).first() {
            // Commands it held are lost to their hosts, which reconnect to a new process.
            eprintln!("rnvme serve: poll thread {t} has stopped (killed by the kernel? see dmesg); exiting");
            std::process::exit(1);
        }
    }
    eprintln!("rnvme serve: stopping: in-flight commands complete, namespaces are flushed");
    let report = server.report();
    server.stop();
    print_report(&report, started);
    Ok(ExitCode::SUCCESS)
}

/// How often the main thread of `rnvme serve` checks that its poll threads are alive.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(extra: &[&str]) -> std::result::Result<ServeArgs, clap::Error> {
        let mut argv = vec!["serve", "0000:00:04.0"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.serve)
    }

    #[test]
    fn waiting_options_reach_the_target() {
        let a = parse(&[]).unwrap();
        let o = options(&a, Vec::new());
        assert_eq!(o.device_wait, DeviceWait::Interrupt);
        assert_eq!(o.spin, Duration::from_micros(20));
        assert!(o.adaptive_spin);
        assert!(!options(&parse(&["--fixed-spin"]).unwrap(), Vec::new()).adaptive_spin);
        for (arg, want) in [
            ("irq", DeviceWait::Interrupt),
            ("busy", DeviceWait::Busy),
            ("75", DeviceWait::Timed(Duration::from_micros(75))),
        ] {
            let a = parse(&["--device-wait", arg, "--spin-us", "7", "--cpus", "1"]).unwrap();
            let o = options(&a, Vec::new());
            assert_eq!(o.device_wait, want, "{arg}");
            assert_eq!(o.spin, Duration::from_micros(7));
            assert_eq!(o.cpus, vec![1]);
        }
        for bad in ["0", "fast", "1.5", "1000001"] {
            let e = parse(&["--device-wait", bad]).expect_err(bad);
            assert!(
                e.to_string().contains("irq, busy, or microseconds"),
                "{bad}: {e}"
            );
        }
    }
}
