//! What `verify` is told and what it answers: its configuration, errors and report.

use super::*;

/// What to verify and how.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// Namespace.
    pub nsid: u32,
    /// First LBA.
    pub lba: u64,
    /// LBAs; None: to the end of the namespace.
    pub count: Option<u64>,
    /// Write the pattern first (and flush), then read it back.
    pub write: bool,
    /// Seed of the pattern.
    pub seed: u64,
    /// Generation of the pattern.
    pub generation: u32,
    /// Commands in flight per thread.
    pub depth: u32,
    /// Threads, each with its own queue pair and part of the range.
    pub threads: u32,
    /// Bytes per command (a multiple of the LBA size; lowered to the max transfer).
    pub io_size: u32,
    /// While writing, flush after this many LBAs completed in order (per thread); None: 8 MiB
    /// worth.
    pub sync_every: Option<u64>,
    /// Mismatches and I/O errors listed in the report (all are counted).
    pub max_listed: usize,
    /// Command deadline of the queue pairs (None: the driver's default).
    pub command_timeout: Option<Duration>,
}

impl Default for VerifyConfig {
    fn default() -> VerifyConfig {
        VerifyConfig {
            nsid: 1,
            lba: 0,
            count: None,
            write: false,
            seed: 1,
            generation: 0,
            depth: 32,
            threads: 1,
            io_size: 128 << 10,
            sync_every: None,
            max_listed: 20,
            command_timeout: None,
        }
    }
}

/// The longest command deadline `--timeout-ms` takes: an hour.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);

impl VerifyConfig {
    /// The checks that need no controller: zero where zero means nothing, a deadline too
    /// long to wait for.
    pub fn check(&self) -> Result<(), VerifyError> {
        let bad = |m: &str| Err(VerifyError::Invalid(m.into()));
        if self.count == Some(0) {
            return bad("nothing to verify: give --count of at least 1");
        }
        if self.depth == 0 {
            return bad("--depth (-q) must be at least 1");
        }
        if self.threads == 0 {
            return bad("--threads must be at least 1");
        }
        if self.io_size == 0 {
            return bad("--io-size must be at least one LBA");
        }
        if self.sync_every == Some(0) {
            return bad("--sync-every must be at least 1 LBA");
        }
        match self.command_timeout {
            Some(t) if t.is_zero() => bad(
                "--timeout-ms must be at least 1 (a command deadline of 0 ms fails every command)",
            ),
            Some(t) if t > MAX_COMMAND_TIMEOUT => Err(VerifyError::Invalid(format!(
                "--timeout-ms {} is more than an hour ({} ms)",
                t.as_millis(),
                MAX_COMMAND_TIMEOUT.as_millis()
            ))),
            _ => Ok(()),
        }
    }
}

/// Why a verify run could not be done (mismatches are not errors: they are the report).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The configuration does not fit the controller or namespace.
    #[error("{0}")]
    Invalid(String),
    /// The driver failed in a way that stops the run (device removed, no DMA memory, …).
    #[error("{dev}: verify stopped with {done} of {total} LBA reads and writes done")]
    Stopped {
        dev: String,
        done: u64,
        total: u64,
        #[source]
        source: DriverError,
    },
    /// A controller reset cancelled commands and the controller did not come back.
    #[error(
        "{dev}: verify stopped with {done} of {total} LBA reads and writes done: the controller \
         did not come back after a reset (CSTS {csts:#x}); check the device (`rnvme list`, the \
         kernel log) and open it again"
    )]
    ControllerLost {
        dev: String,
        done: u64,
        total: u64,
        csts: u32,
    },
    /// The device stopped answering and the driver did not notice.
    #[error("{dev}: verify stopped: no completion for {secs} s with {outstanding} command(s) outstanding")]
    Stalled {
        dev: String,
        secs: u64,
        outstanding: usize,
    },
}

/// Blocks per class.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    pub misdirected: u64,
    pub stale: u64,
    pub torn: u64,
    pub zero: u64,
    pub corrupt: u64,
}

impl ClassCounts {
    pub(super) fn add(&mut self, c: Class) {
        match c {
            Class::Misdirected => self.misdirected += 1,
            Class::Stale => self.stale += 1,
            Class::Torn => self.torn += 1,
            Class::Zero => self.zero += 1,
            Class::Corrupt => self.corrupt += 1,
        }
    }

    pub(super) fn merge(&mut self, o: &ClassCounts) {
        self.misdirected += o.misdirected;
        self.stale += o.stale;
        self.torn += o.torn;
        self.zero += o.zero;
        self.corrupt += o.corrupt;
    }

    /// All mismatching blocks.
    pub fn total(&self) -> u64 {
        self.misdirected + self.stale + self.torn + self.zero + self.corrupt
    }
}

/// An LBA range a command failed on, after retries (single LBAs once a multi-LBA command was
/// split).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IoFailure {
    /// "read", "write" or "flush".
    pub op: &'static str,
    pub lba: u64,
    pub blocks: u32,
    /// The status, as `Name (sct S / sc 0xNN)`.
    pub status: String,
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op == "flush" {
            return write!(f, "flush failed: {}", self.status);
        }
        write!(f, "{} of LBA {}", self.op, self.lba)?;
        if self.blocks > 1 {
            write!(f, "..{}", self.lba + self.blocks as u64)?;
        }
        write!(f, " failed: {}", self.status)
    }
}

/// Driver counters summed over the run's queue pairs.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DriverCounts {
    pub commands: u64,
    pub retries: u64,
    pub timeouts: u64,
    pub aborts: u64,
    pub resets: u64,
    pub cancelled: u64,
    pub spurious: u64,
}

impl DriverCounts {
    pub(super) fn add(&mut self, s: &QueueStats) {
        self.commands += s.submitted;
        self.retries += s.retries;
        self.timeouts += s.timeouts;
        self.aborts += s.aborts;
        self.resets += s.resets;
        self.cancelled += s.cancelled;
        self.spurious += s.spurious;
    }
}

/// What a run found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub device: String,
    pub nsid: u32,
    pub lba: u64,
    pub count: u64,
    pub lba_size: u32,
    pub seed: u64,
    pub generation: u32,
    pub threads: u32,
    pub depth: u32,
    pub io_size: u32,
    /// LBAs written (successfully) and made durable by the final Flush.
    pub written: u64,
    /// LBAs read back and compared.
    pub checked: u64,
    /// LBAs exactly as expected.
    pub ok: u64,
    /// LBAs that are not, by class.
    pub mismatches: ClassCounts,
    /// LBAs that could not be read.
    pub unreadable: u64,
    /// LBAs that could not be written.
    pub unwritable: u64,
    /// Flushes that failed.
    pub flush_errors: u64,
    /// The first mismatches, by LBA.
    pub first_mismatches: Vec<Mismatch>,
    /// The first I/O failures, by LBA.
    pub io_failures: Vec<IoFailure>,
    pub driver: DriverCounts,
    pub elapsed_s: f64,
}

impl VerifyReport {
    /// Whether everything read back as written and no command failed.
    pub fn clean(&self) -> bool {
        self.mismatches.total() == 0
            && self.unreadable == 0
            && self.unwritable == 0
            && self.flush_errors == 0
    }

    /// The one-line summary.
    pub fn summary(&self) -> String {
        let m = &self.mismatches;
        let mib = (self.written + self.checked) as f64 * self.lba_size as f64 / (1 << 20) as f64;
        format!(
            "verify {} ns {} LBAs {}..{} (seed {:#x}, generation {}): {} written, {} checked, {} ok, \
             {} mismatches (misdirected {}, stale {}, torn {}, zero {}, corrupt {}), {} unreadable, \
             {} unwritable, {} flush errors; {} retries, {} resets; {:.1} MiB in {:.2} s",
            self.device,
            self.nsid,
            self.lba,
            self.lba + self.count,
            self.seed,
            self.generation,
            self.written,
            self.checked,
            self.ok,
            m.total(),
            m.misdirected,
            m.stale,
            m.torn,
            m.zero,
            m.corrupt,
            self.unreadable,
            self.unwritable,
            self.flush_errors,
            self.driver.retries,
            self.driver.resets,
            mib,
            self.elapsed_s
        )
    }
}

/// Progress of the write phase: LBAs `start..synced` of one thread's part are written and
/// flushed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    pub thread: u32,
    pub start: u64,
    pub synced: u64,
    pub end: u64,
}
