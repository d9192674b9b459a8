//! A throwaway QEMU guest that runs one shell script.
//!
//! [`run`] boots Debian's cloud kernel under QEMU (TCG, q35, emulated Intel IOMMU with interrupt
//! remapping) with a freshly built initramfs: static busybox, the VFIO modules, any host binaries
//! the caller asks for (with their shared libraries), any files, and an `/init` that loads the
//! modules, reserves hugepages, runs the script and powers the guest off.
//!
//! Each [`ControllerSpec`] becomes one emulated NVMe controller on the root bus at a fixed slot
//! (`0000:00:04.0`, `0000:00:05.0`, …); the script sees those addresses as `$NVME0`, `$NVME1`, …
//! and the caller gets them in [`VmOutput::bdfs`]. Every namespace is backed by a raw image file
//! (sparse, in the run's temporary directory unless the caller names one to keep), optionally
//! behind QEMU's `blkdebug` driver for fault injection.
//!
//! Output: the kernel console goes to the first serial port and is returned separately in
//! [`VmOutput::console`]; the script's stdout and stderr go to the second serial port
//! (`/dev/ttyS1` in the guest, put in raw mode), so [`VmOutput::output`] holds exactly what the
//! script printed. The serial port carries roughly 200 KB/s under TCG: a script with bulk
//! output should write it to a file and print a digest, or write it to a namespace whose image
//! the caller keeps ([`NamespaceSpec::image`]).
//!
//! The initramfs is an uncompressed cpio archive: inflating a compressed one costs the guest
//! kernel seconds under TCG. The kernel gets `init_on_alloc=0` for the same reason (zeroing the
//! reserved hugepages took 3.5 s). Booting to the first command of the script takes about 4 to
//! 6 s here.
//!
//! While the script runs the guest beats: a console line every two seconds with its uptime and
//! the step the script names (see [`Beat`]). A guest whose beats stop has stopped — QEMU's TCG
//! losing a halted vCPU's timer wake-up — and is booted again or reported
//! ([`VmError::Stalled`]); a script that hangs in a beating guest ends at the time limit with
//! the step and the state of the guest's tasks in the error ([`VmError::Timeout`]).
//!
//! Everything lives in the cache directory ([`cache_dir`]): the unpacked kernel under
//! `kernels/`, and a `run-*` directory per run (initramfs, images, logs) that is removed
//! when the run ends.

mod beat;
mod build;
mod host;
mod initramfs;
mod qemu;
mod spec;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use beat::{Beat, BEAT_EVERY_S, STEP_FILE};
pub use build::{build_static_rnvme, fio_engine, static_binary};
pub use host::{cache_dir, ensure_host, ensure_kernel, fetch_kernel, is_static_elf, Kernel};
pub use spec::{parse_controller_spec, SPEC_HELP};

/// Guest PCI slot of the first controller; controller `i` sits at slot `FIRST_SLOT + i`.
pub const FIRST_SLOT: u8 = 0x04;
/// Highest slot a controller may use (0x1f holds q35's LPC/SATA/SMBus functions).
pub const LAST_SLOT: u8 = 0x1e;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in MiB (default 2048).
    pub memory_mib: u32,
    /// Guest CPUs (default 2).
    pub cpus: u32,
    /// 2 MiB hugepages reserved by `/init` before the script runs (default 256).
    pub hugepages: u32,
    /// NVMe controllers, in guest slot order.
    pub controllers: Vec<ControllerSpec>,
    /// Host binaries to copy into the guest, with their shared libraries, as
    /// `/usr/local/bin/<file name>` (first in the guest's `PATH`). A name without `/` is
    /// looked up in `PATH`, `/usr/sbin` and `/sbin`.
    pub host_binaries: Vec<String>,
    /// Host files or directories and the absolute guest path to put them at.
    pub files: Vec<(PathBuf, String)>,
    /// Extra kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// Wall-clock limit for the whole guest run (default 600 s); QEMU is killed past it.
    pub timeout: Duration,
    /// A guest whose heartbeat (see [`Beat`]) stops this long while its script runs has
    /// stopped (default 60 s): it is booted again on fresh images, or
    /// [`VmError::Stalled`] is returned.
    pub stall_limit: Duration,
    /// A step the script named in [`STEP_FILE`] that runs this long gets the state of every
    /// task of the guest on the console, once (default 240 s).
    pub state_dump_after: Duration,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_mib: 2048,
            cpus: 2,
            hugepages: 256,
            controllers: Vec::new(),
            host_binaries: Vec::new(),
            files: Vec::new(),
            kernel_args: Vec::new(),
            timeout: Duration::from_secs(600),
            stall_limit: Duration::from_secs(60),
            state_dump_after: Duration::from_secs(240),
        }
    }
}

/// The kernel argument guests need to run an NVMe/TCP initiator and a userspace target in one
/// kernel: Linux 6.1's `nvme-tcp` sends the pages of a request's multi-page bio_vecs without
/// copying, and over loopback such a fragment can span two compound pages (a transparent
/// hugepage's end and the next); hardened usercopy then takes the receiving `recv()` of the
/// target for a kernel memory exposure and kills the thread with a BUG (`usercopy: Kernel
/// memory exposure attempt detected from page alloc`). The kernel's own target receives
/// without that check. Initiators on other machines are not affected.
pub const LOOPBACK_NVME_TCP_ARG: &str = "hardened_usercopy=off";

/// One emulated NVMe controller (`-device nvme`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerSpec {
    /// Serial number (at most 20 characters of `[A-Za-z0-9._-]`); empty means `rnvme<i>`.
    pub serial: String,
    /// Maximum data transfer size as a power of two of the minimum page size (QEMU default 7).
    pub mdts: Option<u8>,
    /// Maximum number of I/O queue pairs (QEMU default 64).
    pub max_ioqpairs: Option<u16>,
    /// Namespaces, given NSIDs 1, 2, … in order.
    pub namespaces: Vec<NamespaceSpec>,
    /// How QEMU does the image files' I/O (`-drive aio=`): `None` for QEMU's default, a pool
    /// of threads; [`DriveAio::IoUring`] submits from QEMU's main loop, a thread hop less
    /// per command. Namespaces with fault injection keep the default.
    pub aio: Option<DriveAio>,
}

/// QEMU's `-drive aio=` for the namespace images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveAio {
    /// `aio=threads`: a pool of worker threads (QEMU's default).
    Threads,
    /// `aio=io_uring`: Linux io_uring from QEMU's main loop.
    IoUring,
}

impl DriveAio {
    /// Every mode.
    pub const ALL: [DriveAio; 2] = [DriveAio::Threads, DriveAio::IoUring];

    /// The value of QEMU's `aio=`.
    pub fn name(self) -> &'static str {
        match self {
            DriveAio::Threads => "threads",
            DriveAio::IoUring => "io_uring",
        }
    }
}

impl Default for ControllerSpec {
    /// One controller with one default namespace.
    fn default() -> Self {
        ControllerSpec {
            serial: String::new(),
            mdts: None,
            max_ioqpairs: None,
            namespaces: vec![NamespaceSpec::default()],
            aio: None,
        }
    }
}

/// The largest namespace: the largest file an image can be (`off_t`), 8 EiB less 1 MiB.
pub const MAX_NAMESPACE_MIB: u64 = (i64::MAX as u64) >> 20;

/// One namespace (`-device nvme-ns`) and its backing image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSpec {
    /// Size in MiB (default 256; at most [`MAX_NAMESPACE_MIB`]).
    pub size_mib: u64,
    /// Logical (and physical) block size in bytes: a power of two, at least 512 (default 512).
    pub lba_size: u32,
    /// Image file to use and keep. Created (sparse, `size_mib`) if missing; used as it is if
    /// present and `size_mib` large, else refused. `None` puts a fresh image in the run's
    /// temporary directory.
    pub image: Option<PathBuf>,
    /// Fault-injection rules; non-empty puts the image behind QEMU's `blkdebug` driver.
    pub blkdebug: Vec<BlkdebugRule>,
    /// Metadata bytes per logical block (QEMU `nvme-ns` `ms=`; 0 for none). QEMU keeps it
    /// in the image after the data, so the namespace has size / (LBA size + ms) blocks.
    pub metadata: u16,
    /// Metadata interleaved with each block (extended LBAs, `mset=1`) rather than in a
    /// separate buffer.
    pub extended: bool,
    /// Protection information type (`pi=`, 0 to 3; needs 8 bytes of metadata or more).
    pub pi: u8,
    /// No image at all: QEMU's `null-co` block driver, which completes every request at once
    /// (reads return zeros, writes are dropped). What remains is the cost of the drivers and
    /// of the emulated controller.
    pub null: bool,
}

impl Default for NamespaceSpec {
    fn default() -> Self {
        NamespaceSpec {
            size_mib: 256,
            lba_size: 512,
            image: None,
            blkdebug: Vec::new(),
            metadata: 0,
            extended: false,
            pi: 0,
            null: false,
        }
    }
}

/// One `[inject-error]` rule of QEMU's blkdebug driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkdebugRule {
    /// `read_aio` or `write_aio`.
    pub event: String,
    /// errno the I/O fails with (5 = EIO: the controller reports an unrecovered read error).
    pub errno: i32,
    /// 512-byte sector the rule is limited to; `None` fails every request of that kind.
    pub sector: Option<u64>,
    /// Fail only the first matching request.
    pub once: bool,
}

/// What a guest run produced.
#[derive(Debug, Clone)]
pub struct VmOutput {
    /// Everything the script wrote to stdout and stderr, in order.
    pub output: String,
    /// The script's exit status.
    pub exit_code: i32,
    /// The kernel console (first serial port).
    pub console: String,
    /// From starting QEMU to the script starting.
    pub boot_to_script: Duration,
    /// The whole run, initramfs build and clean-up included.
    pub total: Duration,
    /// Guest PCI addresses of the controllers, in [`VmConfig::controllers`] order.
    pub bdfs: Vec<String>,
}

/// Why a guest run failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration cannot be turned into a guest.
    #[error("invalid guest configuration: {0}")]
    Config(String),
    /// Host packages are missing and we may not install them.
    #[error(
        "missing host packages: {pkgs} (as root, run `rnvme vm fetch` or `apt-get install -y {pkgs}`)",
        pkgs = .packages.join(" ")
    )]
    MissingPackages {
        /// Debian package names.
        packages: Vec<String>,
    },
    /// A host command failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command line, shortened.
        command: String,
        /// Exit status and the tail of its error output.
        detail: String,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No guest kernel could be found or prepared.
    #[error("guest kernel: {0}")]
    Kernel(String),
    /// The guest did not finish in time; QEMU was killed.
    #[error("guest did not finish within {} s; QEMU was killed ({guest}; last console line: {})", .timeout.as_secs(), last_line(.console))]
    Timeout {
        /// The configured limit.
        timeout: Duration,
        /// Whether the guest was alive and where its script was, from its last heartbeat.
        guest: String,
        /// The last state dump of the guest's tasks (see [`VmConfig::state_dump_after`]).
        state: Option<String>,
        /// The kernel console up to the kill (without heartbeats and state dumps).
        console: String,
        /// What the script had printed.
        output: String,
    },
    /// The guest stopped while its script ran (its heartbeat ceased: QEMU's TCG losing a
    /// halted vCPU's timer wake-up), in every boot tried; QEMU was killed.
    #[error("the guest stopped: no heartbeat for {} s after the last one ({last_beat}), in {attempts} boot(s); QEMU was killed (last console line: {})", .limit.as_secs(), last_line(.console))]
    Stalled {
        /// The configured limit ([`VmConfig::stall_limit`]).
        limit: Duration,
        /// Boots tried in all (the last one stalled).
        attempts: u32,
        /// The last heartbeat, described.
        last_beat: String,
        /// The kernel console of the last boot (without heartbeats).
        console: String,
        /// What the script had printed in the last boot.
        output: String,
    },
    /// QEMU stopped before the script reported its exit status (boot failure, kernel panic,
    /// QEMU error).
    #[error("guest stopped before the script finished (QEMU {status}{}; last console line: {})", qemu_detail(.qemu_stderr), last_line(.console))]
    GuestFailed {
        /// QEMU's exit status.
        status: String,
        /// QEMU's own stderr.
        qemu_stderr: String,
        /// The kernel console.
        console: String,
        /// What the script had printed.
        output: String,
    },
}

impl VmError {
    /// The kernel console captured before the failure, if the guest was started.
    pub fn console(&self) -> Option<&str> {
        match self {
            VmError::Timeout { console, .. }
            | VmError::Stalled { console, .. }
            | VmError::GuestFailed { console, .. } => Some(console),
            _ => None,
        }
    }

    /// The last `n` lines of the console, for diagnosis.
    pub fn console_tail(&self, n: usize) -> Option<String> {
        self.console().map(|c| tail_lines(c, n))
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        VmError::Io {
            what: what.into(),
            source,
        }
    }
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(empty)")
        .to_string()
}

fn qemu_detail(stderr: &str) -> String {
    let line = last_line(stderr);
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!(": {line}")
    }
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Guest PCI address of controller `index`.
pub fn controller_bdf(index: usize) -> String {
    format!("0000:00:{:02x}.0", usize::from(FIRST_SLOT) + index)
}

/// Markers that frame the script's output on the second serial port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Markers {
    pub start: String,
    pub exit_prefix: String,
}

impl Markers {
    pub fn new(token: &str) -> Self {
        Markers {
            start: format!("RNVME-START-{token}\n"),
            exit_prefix: format!("\nRNVME-EXIT-{token} "),
        }
    }

    /// Splits the raw second-serial-port capture into the script output and exit status.
    /// `None` while the exit marker is incomplete.
    pub fn parse(&self, raw: &[u8]) -> Option<(String, i32)> {
        let text = String::from_utf8_lossy(raw);
        let begin = text.find(&self.start)? + self.start.len();
        let rest = &text[begin..];
        let end = rest.find(&self.exit_prefix)?;
        let after = &rest[end + self.exit_prefix.len()..];
        let line_end = after.find('\n')?;
        let code = after[..line_end].trim().parse().ok()?;
        Some((rest[..end].to_string(), code))
    }

    /// What the script printed so far (after the start marker), for error reports.
    pub fn partial(&self, raw: &[u8]) -> String {
        let text = String::from_utf8_lossy(raw);
        match text.find(&self.start) {
            Some(i) => text[i + self.start.len()..].to_string(),
            None => String::new(),
        }
    }
}

fn unique_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// Kills QEMU if the run is abandoned early.
struct QemuGuard {
    child: Child,
    reaped: bool,
}

impl QemuGuard {
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A guest that has not started its script this long after QEMU started, or whose QEMU died
/// of a signal, is booted again
/// (normal boots take 4-20 s), up to `BOOT_ATTEMPTS` boots in all.
const BOOT_LIMIT: Duration = Duration::from_secs(75);
const BOOT_ATTEMPTS: u32 = 2;

/// How long to wait for QEMU to exit after the script reported its status.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

/// Boots a guest as described by `config`, runs `script` with `/bin/sh`, and returns what it
/// printed and its exit status.
///
/// Installs missing host packages and fetches the guest kernel first if needed (see
/// [`ensure_host`], [`ensure_kernel`]). A script that exits non-zero is not an error: check
/// [`VmOutput::exit_code`].
pub fn run(config: &VmConfig, script: &str) -> Result<VmOutput, VmError> {
    let begin = Instant::now();
    qemu::validate(config)?;
    // Images the caller keeps are checked before anything is installed or booted.
    for (c, ctrl) in config.controllers.iter().enumerate() {
        for (n, ns) in ctrl.namespaces.iter().enumerate() {
            if let Some(p) = &ns.image {
                existing_image(p, ns.size_mib).map_err(|e| match e {
                    VmError::Config(m) => {
                        VmError::Config(format!("controller {c} namespace {}: {m}", n + 1))
                    }
                    other => other,
                })?;
            }
        }
    }
    ensure_host()?;
    let cache = cache_dir()?;
    sweep_stale(&cache);
    let kernel = ensure_kernel(&cache)?;
    let tmp = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&cache)
        .map_err(|e| VmError::io(format!("create a run directory in {}", cache.display()), e))?;
    let dir = tmp.path().to_path_buf();
    let dir = dir.as_path();
    let token = unique_token();
    let markers = Markers::new(&token);
    let bdfs: Vec<String> = (0..config.controllers.len()).map(controller_bdf).collect();

    // Namespace images and blkdebug rule files.
    let mut backings = Vec::new();
    // The run's own images (not the caller's): recreated if the guest has to run again.
    let mut own_images = Vec::new();
    for (c, ctrl) in config.controllers.iter().enumerate() {
        for (n, ns) in ctrl.namespaces.iter().enumerate() {
            let image = match &ns.image {
                Some(p) => p.clone(),
                None => dir.join(format!("c{c}n{}.img", n + 1)),
            };
            if !ns.null {
                prepare_image(&image, ns.size_mib)?;
                if ns.image.is_none() {
                    own_images.push((image.clone(), ns.size_mib));
                }
            }
            let rules = if ns.blkdebug.is_empty() {
                None
            } else {
                let conf = dir.join(format!("c{c}n{}.blkdebug.conf", n + 1));
                fs::write(&conf, qemu::blkdebug_conf(&ns.blkdebug))
                    .map_err(|e| VmError::io(format!("write {}", conf.display()), e))?;
                Some(conf)
            };
            backings.push(qemu::Backing { image, rules });
        }
    }

    let initrd = dir.join("initrd.cpio");
    let params = initramfs::Params {
        token: &token,
        hugepages: config.hugepages,
        bdfs: &bdfs,
        host_binaries: &config.host_binaries,
        files: &config.files,
        script,
        state_dump_after: config.state_dump_after,
    };
    let beats = beat::BeatMarkers::new(&token);
    initramfs::build(&kernel, &params, &dir.join("root"), &initrd)?;

    let console_log = dir.join("console.log");
    let output_log = dir.join("output.log");
    let paths = qemu::Paths {
        kernel: kernel.vmlinuz.clone(),
        initrd,
        console_log: console_log.clone(),
        output_log: output_log.clone(),
        backings,
    };
    let args = qemu::args(config, &paths);
    log::debug!("qemu-system-x86_64 {}", args.join(" "));
    let qemu_stderr_path = dir.join("qemu.stderr");
    let mut attempt = 0;
    let (status, mut raw, boot_to_script, started, guard, mut out) = 'boot: loop {
        attempt += 1;
        let qemu_stderr = File::create(&qemu_stderr_path)
            .map_err(|e| VmError::io(format!("create {}", qemu_stderr_path.display()), e))?;
        let qemu_stdout = qemu_stderr
            .try_clone()
            .map_err(|e| VmError::io("duplicate QEMU's log file", e))?;
        // The output and console files exist before QEMU starts so they can be opened for
        // polling.
        for log in [&output_log, &console_log] {
            File::create(log).map_err(|e| VmError::io(format!("create {}", log.display()), e))?;
        }

        let started = Instant::now();
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(qemu_stdout)
            .stderr(qemu_stderr)
            .spawn()
            .map_err(|e| VmError::io("start qemu-system-x86_64", e))?;
        let mut guard = QemuGuard {
            child,
            reaped: false,
        };
        let mut out = File::open(&output_log)
            .map_err(|e| VmError::io(format!("open {}", output_log.display()), e))?;
        let mut console_in = File::open(&console_log)
            .map_err(|e| VmError::io(format!("open {}", console_log.display()), e))?;
        let mut console_raw = Vec::new();
        // The last heartbeat and when it was read.
        let mut last_beat: Option<(Beat, Instant)> = None;
        let mut raw = Vec::new();
        let mut boot_to_script = None;
        let mut finished_at = None;
        // Markers are searched for in the newly read bytes plus enough of the old ones to catch a
        // marker split across reads.
        let overlap = markers.exit_prefix.len().max(markers.start.len()) + 32;
        let status: Option<ExitStatus> = loop {
            let exited = guard
                .try_wait()
                .map_err(|e| VmError::io("wait for QEMU", e))?;
            let old_len = raw.len();
            out.read_to_end(&mut raw)
                .map_err(|e| VmError::io(format!("read {}", output_log.display()), e))?;
            if raw.len() > old_len {
                let fresh = &raw[old_len.saturating_sub(overlap)..];
                if boot_to_script.is_none() && contains(fresh, markers.start.as_bytes()) {
                    boot_to_script = Some(started.elapsed());
                    log::info!("guest script started after {:?}", started.elapsed());
                }
                if finished_at.is_none()
                    && contains(fresh, markers.exit_prefix.as_bytes())
                    && markers.parse(&raw).is_some()
                {
                    finished_at = Some(Instant::now());
                }
            }
            let old_console = console_raw.len();
            console_in
                .read_to_end(&mut console_raw)
                .map_err(|e| VmError::io(format!("read {}", console_log.display()), e))?;
            if console_raw.len() > old_console {
                let fresh =
                    String::from_utf8_lossy(&console_raw[old_console.saturating_sub(512)..]);
                if let Some(b) = beats.last_beat(&fresh) {
                    if last_beat.as_ref().is_none_or(|(l, _)| *l != b) {
                        last_beat = Some((b, Instant::now()));
                    }
                }
            }
            if let Some(st) = exited {
                // QEMU 7.2 under TCG now and then dies of SIGSEGV however far the guest got
                // (seen in the firmware's first steps and in the middle of scripts, never
                // reproducibly): the emulator crashed, not the code under test. Such a run
                // proved nothing, so the guest runs again from the start: before its script,
                // as after a stalled boot; once the script ran, on fresh images — unless the
                // caller keeps images the first run may have changed.
                let signal = std::os::unix::process::ExitStatusExt::signal(&st);
                let fresh = boot_to_script.is_none() || config_images_are_own(config);
                if let Some(sig) = signal.filter(|_| fresh && attempt < BOOT_ATTEMPTS) {
                    log::warn!(
                        "QEMU died of signal {sig} {} (last console line: {}); running the \
                         guest again",
                        if boot_to_script.is_none() {
                            "before the guest reached its script"
                        } else {
                            "while the script ran"
                        },
                        last_line(&read_console(&console_log, &beats))
                    );
                    if boot_to_script.is_some() {
                        fresh_images(&own_images)?;
                    }
                    continue 'boot;
                }
                break exited;
            }
            if boot_to_script.is_none() && attempt < BOOT_ATTEMPTS && started.elapsed() > BOOT_LIMIT
            {
                // The script never started: nothing of the test ran. Guests on a busy host
                // occasionally stall in early boot (the emulated CPUs' timers stop firing).
                log::warn!(
                    "the guest did not reach its script within {} s (last console line: {}); \
                 booting it again",
                    BOOT_LIMIT.as_secs(),
                    last_line(&read_console(&console_log, &beats))
                );
                guard.kill();
                continue 'boot;
            }
            if finished_at.is_some_and(|t| t.elapsed() > POWEROFF_GRACE) {
                log::warn!("guest reported its exit status but did not power off; killing QEMU");
                guard.kill();
                break None;
            }
            // A guest whose heartbeat stopped (or never began) while its script ran has stopped:
            // QEMU's TCG lost a halted vCPU's timer wake-up and nothing will wake it. Such a
            // run proves nothing either: booted again as after a crash, on fresh images.
            let quiet_since = match (&last_beat, boot_to_script) {
                (Some((_, at)), _) => Some(*at),
                (None, Some(d)) => Some(started + d),
                (None, None) => None,
            };
            if finished_at.is_none()
                && boot_to_script.is_some()
                && quiet_since.is_some_and(|t| t.elapsed() > config.stall_limit)
            {
                guard.kill();
                let last = match &last_beat {
                    Some((b, _)) => b.describe(),
                    None => "none since the script started".to_string(),
                };
                if attempt < BOOT_ATTEMPTS && config_images_are_own(config) {
                    log::warn!(
                        "the guest stopped: no heartbeat for {} s (the last {last}; last console \
                         line: {}); running it again",
                        config.stall_limit.as_secs(),
                        last_line(&read_console(&console_log, &beats))
                    );
                    fresh_images(&own_images)?;
                    continue 'boot;
                }
                return Err(VmError::Stalled {
                    limit: config.stall_limit,
                    attempts: attempt,
                    last_beat: last,
                    console: read_console(&console_log, &beats),
                    output: markers.partial(&raw),
                });
            }
            if started.elapsed() > config.timeout {
                guard.kill();
                let guest = match &last_beat {
                    Some((b, at)) => format!(
                        "its last heartbeat {:.0} s before the kill, {}",
                        at.elapsed().as_secs_f64(),
                        b.describe()
                    ),
                    None => "no heartbeat from it".to_string(),
                };
                let console = read_console(&console_log, &beats);
                return Err(VmError::Timeout {
                    timeout: config.timeout,
                    guest,
                    state: beats.last_state(&console),
                    console: beats.without_states(&console),
                    output: markers.partial(&raw),
                });
            }
            std::thread::sleep(POLL);
        };
        break 'boot (status, raw, boot_to_script, started, guard, out);
    };
    out.read_to_end(&mut raw)
        .map_err(|e| VmError::io(format!("read {}", output_log.display()), e))?;
    let console = read_console(&console_log, &beats);
    let Some((output, exit_code)) = markers.parse(&raw) else {
        return Err(VmError::GuestFailed {
            status: status.map_or_else(|| "killed".to_string(), |s| s.to_string()),
            qemu_stderr: read_lossy(&qemu_stderr_path),
            console,
            output: markers.partial(&raw),
        });
    };
    let boot_to_script = boot_to_script.unwrap_or_else(|| started.elapsed());
    drop(guard);
    tmp.close()
        .map_err(|e| VmError::io(format!("remove {}", dir.display()), e))?;
    Ok(VmOutput {
        output,
        exit_code,
        console,
        boot_to_script,
        total: begin.elapsed(),
        bdfs,
    })
}

/// Age past which a leftover `run-*`/`fetch-*` directory (from a runner that was killed) is
/// removed.
const STALE_AGE: Duration = Duration::from_secs(2 * 24 * 3600);

/// Removes leftovers of killed runners from the cache.
fn sweep_stale(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("run-") || name.starts_with("fetch-")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AGE);
        if old {
            log::info!("removing stale {}", e.path().display());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The console capture without terminal escape sequences (SeaBIOS clears the screen) and
/// carriage returns.
pub(crate) fn clean_console(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            // ESC and the character after it; for CSI (ESC [) also the parameters up to the
            // final byte in @..~.
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The console capture, cleaned, without heartbeat lines.
fn read_console(path: &Path, beats: &beat::BeatMarkers) -> String {
    beats.without_beats(&clean_console(&read_lossy(path)))
}

/// Recreates the run's own images empty, for a guest that runs again after its script began.
fn fresh_images(own_images: &[(PathBuf, u64)]) -> Result<(), VmError> {
    for (image, size_mib) in own_images {
        fs::remove_file(image)
            .map_err(|e| VmError::io(format!("remove {}", image.display()), e))?;
        prepare_image(image, *size_mib)?;
    }
    Ok(())
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Whether an image is at `path`, refusing one of another size than `size_mib` MiB: reused
/// as it is, it would give the guest a namespace of another size than asked for (and grown or
/// cut to size, lose data).
fn existing_image(path: &Path, size_mib: u64) -> Result<bool, VmError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(VmError::io(format!("look at {}", path.display()), e)),
    };
    if !meta.is_file() {
        return Err(VmError::Config(format!(
            "image {} is not a regular file",
            path.display()
        )));
    }
    let want = size_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| VmError::Config(format!("size {size_mib} MiB is too large")))?;
    let len = meta.len();
    if len == want {
        return Ok(true);
    }
    let fix = if len > 0 && len.is_multiple_of(1 << 20) {
        format!("give size={}M to use it as it is", len >> 20)
    } else {
        "it cannot be used as a namespace of whole MiB".into()
    };
    Err(VmError::Config(format!(
        "image {} is {len} bytes, not the {size_mib} MiB asked for: {fix}, or give another image",
        path.display()
    )))
}

/// Creates a sparse image of `size_mib` MiB if `path` does not exist yet; an existing one must
/// have that size (see [`existing_image`]).
/// Whether every namespace image of `config` is the run's own (none kept by the caller).
fn config_images_are_own(config: &VmConfig) -> bool {
    config
        .controllers
        .iter()
        .flat_map(|c| &c.namespaces)
        .all(|n| n.image.is_none())
}

fn prepare_image(path: &Path, size_mib: u64) -> Result<(), VmError> {
    if existing_image(path, size_mib)? {
        log::info!("using existing image {}", path.display());
        return Ok(());
    }
    let bytes = size_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| VmError::Config(format!("size {size_mib} MiB is too large")))?;
    let f = File::create(path).map_err(|e| VmError::io(format!("create {}", path.display()), e))?;
    f.set_len(bytes)
        .map_err(|e| VmError::io(format!("size {} to {size_mib} MiB", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn controller_bdfs_follow_slots() {
        assert_eq!(controller_bdf(0), "0000:00:04.0");
        assert_eq!(controller_bdf(1), "0000:00:05.0");
        assert_eq!(controller_bdf(12), "0000:00:10.0");
    }

    #[test]
    fn markers_extract_exact_output_and_status() {
        let m = Markers::new("abc");
        let raw = b"noise RNVME-START-abc\nline 1\nno newline at end\nRNVME-EXIT-abc 3\n";
        assert_eq!(
            m.parse(raw),
            Some(("line 1\nno newline at end".to_string(), 3))
        );
        let raw = b"RNVME-START-abc\nhello\n\nRNVME-EXIT-abc 0\n";
        assert_eq!(m.parse(raw), Some(("hello\n".to_string(), 0)));
    }

    #[test]
    fn markers_need_the_complete_exit_line() {
        let m = Markers::new("abc");
        assert_eq!(m.parse(b"RNVME-START-abc\nx\nRNVME-EXIT-abc 1"), None);
        assert_eq!(m.parse(b"x\nRNVME-EXIT-abc 1\n"), None);
        // Another run's token does not count.
        assert_eq!(m.parse(b"RNVME-START-abc\nx\nRNVME-EXIT-abd 1\n"), None);
        assert_eq!(m.partial(b"boot RNVME-START-abc\npartial"), "partial");
        assert_eq!(m.partial(b"boot only"), "");
    }

    #[test]
    fn console_escapes_are_removed() {
        assert_eq!(
            clean_console("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\nBooting\n"),
            "SeaBIOS\nBooting\n"
        );
        assert_eq!(clean_console("plain [ text ]\n"), "plain [ text ]\n");
    }

    #[test]
    fn tail_and_last_line() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(last_line("x\n  y  \n\n"), "y");
        assert_eq!(last_line(""), "(empty)");
    }

    #[test]
    fn prepare_image_creates_sparse_file_and_keeps_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        prepare_image(&p, 3).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 3 << 20);
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all(b"keep")
            .unwrap();
        prepare_image(&p, 3).unwrap();
        let data = fs::read(&p).unwrap();
        assert_eq!(data.len(), 3 << 20);
        assert_eq!(&data[..4], b"keep");
    }

    #[test]
    fn an_existing_image_of_another_size_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        prepare_image(&p, 3).unwrap();
        let e = prepare_image(&p, 4).unwrap_err();
        assert!(matches!(e, VmError::Config(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "invalid guest configuration: image {} is 3145728 bytes, not the 4 MiB asked for: \
                 give size=3M to use it as it is, or give another image",
                p.display()
            )
        );
        assert_eq!(fs::metadata(&p).unwrap().len(), 3 << 20);
        fs::write(&p, b"odd").unwrap();
        let e = prepare_image(&p, 3).unwrap_err().to_string();
        assert!(
            e.contains("3 bytes, not the 3 MiB") && e.contains("whole MiB"),
            "{e}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"odd");
        let e = prepare_image(dir.path(), 3).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn run_refuses_a_kept_image_of_another_size_before_booting() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kept.img");
        fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let config = VmConfig {
            controllers: vec![ControllerSpec {
                namespaces: vec![NamespaceSpec {
                    size_mib: 2,
                    image: Some(p.clone()),
                    ..NamespaceSpec::default()
                }],
                ..ControllerSpec::default()
            }],
            ..VmConfig::default()
        };
        let e = run(&config, "true").unwrap_err().to_string();
        assert!(
            e.contains("controller 0 namespace 1: image") && e.contains("give size=1M"),
            "{e}"
        );
        assert_eq!(fs::read(&p).unwrap(), vec![7u8; 1 << 20]);
    }
}
