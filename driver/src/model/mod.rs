//! An in-process NVMe controller model: a test double behind the [`Hardware`] trait.
//!
//! The model implements the controller registers, an IOMMU-like translation table for the
//! memory the driver maps with [`Hardware::dma_map`], and the admin and NVM I/O command sets
//! over in-memory namespaces. Queues are processed when their doorbells are written: the model
//! fetches every new submission queue entry, executes it and (in
//! [`CompletionMode::Instant`]) posts its completion before `write32` returns. So the driver's
//! own bring-up and queue code runs unchanged against it, single-threaded and deterministic.
//!
//! It is strict where the specification is strict, so that a driver bug fails a test instead
//! of passing silently: misaligned PRPs, malformed SGLs, transfers beyond MDTS, LBAs beyond the
//! namespace, unmapped DMA addresses, command identifiers reused while outstanding, doorbell
//! values out of range and invalid controller configurations are all reported the way a
//! controller reports them (a completion status, or CSTS.CFS), and logged with the reason.
//!
//! Misbehaviour can be switched on at any time to test error paths: a controller that never
//! becomes ready, a fatal status, held, reordered, duplicated or lost completions, per-LBA
//! errors, surprise removal, or all of these at random with a seeded generator.
//!
//! Everything sits behind one mutex; data is copied between DMA memory and the namespaces
//! through `vm_memory::VolatileSlice`s without heap allocation on the I/O path.

// Unsafe code here only for the model's host memory (`iommu`, and the tests' buffers).
#[forbid(unsafe_code)]
mod admin;
#[forbid(unsafe_code)]
mod dptr;
#[forbid(unsafe_code)]
mod io;
mod iommu;
#[forbid(unsafe_code)]
mod queues;
#[forbid(unsafe_code)]
mod storage;
#[cfg(test)]
mod tests;

use crate::hw::{Hardware, HwError};
use crate::spec::{admin_op, cc, csts, io_op, reg, SqEntry};
use crate::types::Iova;
use crate::NvmeStatus;
use dptr::{Seg, WalkCounters, WalkError};
use iommu::{IovaTable, MapRefusal};
use log::{debug, error, warn};
use queues::{Completion, Cq, Sq};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use storage::Storage;
use zerocopy::IntoBytes;

/// The Version register value: NVMe 2.0.
const VERSION: u32 = 0x0002_0000;
/// CAP.MPSMAX: pages up to 64 KiB.
const MPSMAX: u8 = 4;
/// Error Information log entries kept (Identify Controller ELPE + 1).
const ERROR_LOG_ENTRIES: usize = 64;
/// Asynchronous Event Requests the model keeps outstanding at most (AERL + 1).
const AER_LIMIT: usize = 4;
/// High dwords of the 64-bit registers.
const CAP_HI: usize = reg::CAP + 4;
const ASQ_HI: usize = reg::ASQ + 4;
const ACQ_HI: usize = reg::ACQ + 4;

/// Options for a controller brought up on a model: DMA memory from ordinary pages (a test
/// machine need not have hugepages), the rest as by default.
pub fn model_options() -> crate::controller::ControllerOptions {
    crate::controller::ControllerOptions {
        backing: crate::dma::Backing::SmallPages,
        ..crate::controller::ControllerOptions::default()
    }
}

/// A model of `config` and a controller brought up on it with `options` (usually
/// [`model_options`] or an update of it): where tests and examples start.
pub fn bring_up(
    config: ModelConfig,
    options: crate::controller::ControllerOptions,
) -> crate::Result<(Arc<Model>, crate::controller::Controller)> {
    let model = Model::new(config);
    let ctrl = crate::controller::Controller::init(model.clone(), options)?;
    Ok((model, ctrl))
}

/// How the model configures itself.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The namespaces, each with a distinct NSID.
    pub namespaces: Vec<ModelNamespace>,
    /// Identify Controller MDTS: the largest transfer is 2^mdts pages of 2^(12 + mpsmin)
    /// bytes; 0 means no limit.
    pub mdts: u8,
    /// CAP.MQES: the largest I/O queue, 0-based.
    pub mqes: u16,
    /// I/O submission and completion queues the controller can grant (at least 1).
    pub max_io_queues: u16,
    /// CAP.MPSMIN: the smallest memory page size is 2^(12 + mpsmin) (at most 4).
    pub mpsmin: u8,
    /// CAP.TO in units of 500 ms.
    pub cap_to: u8,
    /// CAP.DSTRD: doorbell stride of `4 << dstrd` bytes.
    pub dstrd: u8,
    /// Advertise SGL support for I/O commands (Identify Controller SGLS bit 0).
    pub sgl: bool,
    /// Offer shadow doorbells (Doorbell Buffer Config, OACS bit 8), as QEMU's controller does.
    pub shadow_doorbells: bool,
    /// With `sgl`: advertise SGLS = 10b, SGL data only at dword-aligned addresses in whole
    /// dwords (the model refuses other SGL data).
    pub sgl_dword: bool,
    /// Advertise a volatile write cache.
    pub vwc: bool,
    /// Serial number (at most 20 ASCII characters are reported).
    pub serial: String,
    /// Model number (at most 40).
    pub model: String,
    /// Firmware revision (at most 8).
    pub firmware: String,
    /// MSI-X vectors offered (0: none, interrupts cannot be enabled).
    pub msix_vectors: u32,
}

impl ModelConfig {
    /// The default configuration with one namespace (NSID 1) of `blocks` LBAs of `lba_size`
    /// bytes.
    pub fn one_namespace(lba_size: u32, blocks: u64) -> ModelConfig {
        ModelConfig {
            namespaces: vec![ModelNamespace {
                nsid: 1,
                lba_size,
                blocks,
            }],
            ..ModelConfig::default()
        }
    }
}

impl Default for ModelConfig {
    /// One namespace of 64 MiB with 4096-byte LBAs, MDTS 5 (128 KiB), 1024-entry queues, 8 I/O
    /// queue pairs, 4 KiB pages, SGLs and a volatile write cache.
    fn default() -> ModelConfig {
        ModelConfig {
            namespaces: vec![ModelNamespace {
                nsid: 1,
                lba_size: 4096,
                blocks: 16384,
            }],
            mdts: 5,
            mqes: 1023,
            max_io_queues: 8,
            mpsmin: 0,
            cap_to: 1,
            dstrd: 0,
            sgl: true,
            sgl_dword: false,
            shadow_doorbells: true,
            vwc: true,
            serial: "RNVME-MODEL-0001".into(),
            model: "rnvme controller model".into(),
            firmware: "1.0".into(),
            msix_vectors: 9,
        }
    }
}

/// One namespace of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelNamespace {
    /// Namespace identifier (1..0xffff_fffe).
    pub nsid: u32,
    /// Logical block size: a power of two from 512 to 65536.
    pub lba_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
}

/// When the model posts the completions of I/O commands (admin commands always complete at
/// once).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum CompletionMode {
    /// While the submission doorbell write is processed.
    #[default]
    Instant,
    /// Held until [`Model::release`] or [`Model::release_all`], then posted in order.
    Deferred,
    /// Held like [`CompletionMode::Deferred`], then released newest first.
    Reversed,
    /// Held, and posted by the model's own completer thread ([`Model::complete_from_thread`])
    /// a short while later: the host reads completion queues while another thread writes them,
    /// as with a real controller.
    Threaded,
}

/// Which commands the model parks to DMA into later, as a controller that runs late would
/// ([`Model::set_late_dma`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum LateDma {
    /// None: every command runs when its doorbell is written.
    #[default]
    Off,
    /// Reads and writes on I/O queues.
    Io,
    /// Identify and Get Log Page on the admin queue.
    Admin,
}

/// A command the model holds to DMA into later.
#[derive(Clone, Debug)]
struct ParkedCommand {
    segs: Vec<(u64, u64)>,
    completion: Completion,
}

/// What [`Model::fire_late_dma`] did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LateDmaReport {
    /// Commands whose data was written.
    pub commands: usize,
    /// Bytes written into host memory.
    pub bytes: u64,
    /// Segments the IOMMU no longer translated (their mapping was removed): not written.
    pub faults: usize,
    /// Completions posted afterwards.
    pub completions: usize,
}

/// What the model has seen and done since it was created (resets do not clear it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Admin commands executed.
    pub admin_commands: u64,
    /// Admin commands executed, by opcode.
    pub admin_by_opcode: BTreeMap<u8, u64>,
    /// Abort commands.
    pub aborts: u64,
    /// I/O commands executed.
    pub io_commands: u64,
    /// Read commands.
    pub reads: u64,
    /// Write commands.
    pub writes: u64,
    /// Flush commands.
    pub flushes: u64,
    /// Write Zeroes commands.
    pub write_zeroes: u64,
    /// Dataset Management commands.
    pub dsm: u64,
    /// Compare commands.
    pub compares: u64,
    /// I/O commands with another opcode.
    pub io_other: u64,
    /// Submission queue tail doorbell writes acted upon.
    pub sq_doorbells: u64,
    /// Completion queue head doorbell writes acted upon.
    pub cq_doorbells: u64,
    /// Doorbell writes ignored (controller disabled, not ready, fatal, shut down, unknown queue
    /// or invalid value).
    pub ignored_doorbells: u64,
    /// Completion queue entries written (duplicates included).
    pub completions_posted: u64,
    /// Completions swallowed (lost commands).
    pub completions_dropped: u64,
    /// Completions posted a second time.
    pub completions_duplicated: u64,
    /// Completions that had to wait because their completion queue was full.
    pub cq_full_waits: u64,
    /// Completions with an error status.
    pub errors_returned: u64,
    /// Commands whose CID was already outstanding on their queue.
    pub cid_conflicts: u64,
    /// PRP list pages read.
    pub prp_list_pages: u64,
    /// Times a shadow submission tail announced commands (no MMIO doorbell needed for them).
    pub sq_shadow_fetches: u64,
    /// Times the host moved a shadow submission tail past the event index the model wrote
    /// without ringing the MMIO doorbell it asked for: a protocol error of the host.
    pub missed_doorbells: u64,
    /// SGL descriptors examined.
    pub sgl_descriptors: u64,
    /// Bytes transferred to the host by Read commands.
    pub bytes_read: u64,
    /// Bytes transferred from the host by Write commands.
    pub bytes_written: u64,
    /// MSI-X messages sent (one per completion posted to a queue with interrupts enabled and
    /// its vector unmasked, and one per unmasking of a vector with its Pending Bit set).
    pub interrupts: u64,
    /// Vectors masked or unmasked ([`Hardware::mask_interrupt`]).
    pub interrupt_masks: u64,
}

/// One MSI-X vector: its eventfd, and whether it is masked with an interrupt pending.
struct Vector {
    fd: vmm_sys_util::eventfd::EventFd,
    masked: bool,
    pending: bool,
}

/// The NVMe controller model. See the module documentation.
pub struct Model {
    inner: Mutex<Inner>,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Model>();
};

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Model")
            .field("cc", &format_args!("{:#x}", g.cc))
            .field("csts", &format_args!("{:#x}", g.csts))
            .field("held", &g.held.len())
            .finish_non_exhaustive()
    }
}

/// A namespace and its contents.
struct Namespace {
    nsid: u32,
    lba_size: u64,
    blocks: u64,
    data: Storage,
    /// Bytes read and written by host commands, and the command counts (SMART log).
    bytes_read: u64,
    bytes_written: u64,
    read_commands: u64,
    write_commands: u64,
}

/// A rule of [`Model::fail_lba`].
struct FailRule {
    nsid: u32,
    lba: u64,
    status: NvmeStatus,
    remaining: Option<u32>,
}

/// One Error Information log entry.
#[derive(Copy, Clone, Debug)]
struct ErrorRecord {
    count: u64,
    sqid: u16,
    cid: u16,
    status: u16,
    lba: u64,
    nsid: u32,
}

/// What random misbehaviour did to a command.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Misbehaviour {
    Hold,
    Reorder,
    Duplicate,
    Drop,
    Error(NvmeStatus),
}

/// xorshift64* generator for [`Model::set_random_misbehaviour`].
struct Random {
    state: u64,
    rate: u8,
}

impl Random {
    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn roll(&mut self) -> Option<Misbehaviour> {
        if self.next() % 100 >= self.rate as u64 {
            return None;
        }
        Some(match self.next() % 5 {
            0 => Misbehaviour::Hold,
            1 => Misbehaviour::Reorder,
            2 => Misbehaviour::Duplicate,
            3 => Misbehaviour::Drop,
            _ => {
                const ERRORS: [NvmeStatus; 4] = [
                    NvmeStatus::DATA_TRANSFER_ERROR,
                    NvmeStatus::INTERNAL_ERROR,
                    NvmeStatus::UNRECOVERED_READ_ERROR,
                    NvmeStatus::WRITE_FAULT,
                ];
                let st = ERRORS[(self.next() % ERRORS.len() as u64) as usize];
                Misbehaviour::Error(st.with_dnr(self.next() & 1 == 1))
            }
        })
    }
}

/// Why a command failed: its completion status and, for the log, the reason.
#[derive(Debug)]
struct Failure {
    status: NvmeStatus,
    why: String,
}

impl Failure {
    /// A failure found by the model's checks. Errors that say the command itself is wrong get
    /// Do Not Retry, as a controller sets it; transfer and internal errors do not.
    fn new(status: NvmeStatus, why: impl Into<String>) -> Failure {
        let transient = matches!(
            status,
            NvmeStatus::DATA_TRANSFER_ERROR
                | NvmeStatus::INTERNAL_ERROR
                | NvmeStatus::ABORT_REQUESTED
                | NvmeStatus::ABORTED_SQ_DELETION
        );
        Failure {
            status: status.with_dnr(!transient),
            why: why.into(),
        }
    }

    /// An error injected by a test, with its status exactly as given.
    fn injected(status: NvmeStatus, why: impl Into<String>) -> Failure {
        Failure {
            status,
            why: why.into(),
        }
    }
}

impl From<WalkError> for Failure {
    fn from(e: WalkError) -> Failure {
        Failure::new(e.status, e.why)
    }
}

/// Shorthand for a failed command.
fn bad<T>(status: NvmeStatus, why: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::new(status, why))
}

/// The result of executing a command: completion DW0 or a failure, or no completion for now
/// (an Asynchronous Event Request waits for an event).
enum Outcome {
    Complete(Result<u32, Failure>),
    Parked,
}

/// The state behind the model's mutex.
struct Inner {
    cfg: ModelConfig,
    cap: u64,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
    /// Memory page size latched from CC.MPS when the controller was enabled.
    page_size: u64,
    /// CC.EN was set with a valid configuration but RDY is not set yet (never_ready).
    ready_pending: bool,
    never_ready: bool,
    /// Abort never finds the command (a controller whose aborts do not help).
    pub(crate) abort_ineffective: bool,
    /// A shutdown notification was processed since the last enable.
    shut_down: bool,
    removed: bool,
    /// Clearing CC.EN does nothing: the controller keeps running and CSTS.RDY stays set (a
    /// controller that cannot be disabled).
    stuck_enabled: bool,
    /// A function level reset fails.
    flr_fails: bool,
    /// Which commands with data are parked instead of run ([`Model::set_late_dma`]).
    late: LateDma,
    /// Parked commands: their data segments, fetched when they were submitted.
    parked: Vec<ParkedCommand>,
    /// Function level resets done.
    flrs: u32,
    /// Shadow doorbell and event index pages (Doorbell Buffer Config), until the next reset.
    dbbuf: Option<(u64, u64)>,
    /// Event indexes are written only by [`Model::poll_shadows`]: a controller that reads the
    /// shadow doorbells lazily, so the host skips MMIO doorbells for long stretches.
    shadow_lazy: bool,
    iommu: IovaTable,
    /// By queue identifier, 0 = admin.
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    /// Sorted by NSID.
    namespaces: Vec<Namespace>,
    mode: CompletionMode,
    /// Completions waiting for `release`.
    held: VecDeque<Completion>,
    /// Completions swallowed: the commands stay outstanding until aborted, their queue is
    /// deleted or the controller is reset.
    lost: Vec<Completion>,
    /// Outstanding Asynchronous Event Requests (no event ever happens).
    aers: Vec<Completion>,
    /// Completions to post, in reverse, after the rest of the current doorbell's commands.
    reordered: Vec<Completion>,
    fail_rules: Vec<FailRule>,
    drop_next: u32,
    dup_next: u32,
    random: Option<Random>,
    stats: ModelStats,
    shutdowns: u32,
    enables: u32,
    unsafe_shutdowns: u64,
    media_errors: u64,
    /// Newest first.
    error_log: VecDeque<ErrorRecord>,
    error_count: u64,
    granted_sqs: u16,
    granted_cqs: u16,
    /// Volatile write cache enabled (feature 06h).
    wce: bool,
    /// Interrupt Coalescing (feature 08h), as last set. Recorded and reported; the model
    /// signals every completion (it has no clock to bound a held interrupt by).
    coalescing: u32,
    /// The MSI-X vectors, once enabled ([`Hardware::enable_interrupts`]).
    vectors: Vec<Vector>,
    /// Scratch space reused by every command: the data segments of the current command and a
    /// byte buffer.
    segs: Vec<Seg>,
    buf: Vec<u8>,
}

impl Model {
    /// A model configured by `config`, powered on with CC.EN = 0.
    ///
    /// # Panics
    ///
    /// If the configuration is inconsistent: duplicate or reserved NSIDs, a block size that
    /// is not a power of two from 512 to 65536, an empty namespace, `mpsmin` above 4, `dstrd`
    /// above 15, `mqes` of 0 or no I/O queues.
    pub fn new(config: ModelConfig) -> Arc<Model> {
        let mut namespaces: Vec<Namespace> = config
            .namespaces
            .iter()
            .map(|n| {
                assert!(
                    n.nsid != 0 && n.nsid != u32::MAX,
                    "model: NSID {:#x} is reserved; use 1..0xfffffffe",
                    n.nsid
                );
                assert!(
                    n.lba_size.is_power_of_two() && (512..=65536).contains(&n.lba_size),
                    "model: namespace {}: block size {} is not a power of two in 512..=65536",
                    n.nsid,
                    n.lba_size
                );
                assert!(n.blocks > 0, "model: namespace {} has no blocks", n.nsid);
                assert!(
                    n.blocks.checked_mul(n.lba_size as u64).is_some(),
                    "model: namespace {} is larger than 2^64 bytes",
                    n.nsid
                );
                Namespace {
                    nsid: n.nsid,
                    lba_size: n.lba_size as u64,
                    blocks: n.blocks,
                    data: Storage::default(),
                    bytes_read: 0,
                    bytes_written: 0,
                    read_commands: 0,
                    write_commands: 0,
                }
            })
            .collect();
        namespaces.sort_by_key(|n| n.nsid);
        for w in namespaces.windows(2) {
            assert!(
                w[0].nsid != w[1].nsid,
                "model: NSID {} is configured twice",
                w[0].nsid
            );
        }
        assert!(
            config.mpsmin <= MPSMAX,
            "model: mpsmin {} is above MPSMAX 4",
            config.mpsmin
        );
        assert!(
            config.dstrd <= 15,
            "model: dstrd {} does not fit CAP.DSTRD",
            config.dstrd
        );
        assert!(
            config.mqes >= 1,
            "model: mqes must allow queues of at least two entries"
        );
        assert!(
            config.max_io_queues >= 1,
            "model: at least one I/O queue pair is needed"
        );
        let cap = config.mqes as u64
            | 1 << 16
            | (config.cap_to as u64) << 24
            | (config.dstrd as u64) << 32
            | 1 << 37
            | (config.mpsmin as u64) << 48
            | (MPSMAX as u64) << 52;
        let queues = config.max_io_queues as usize + 1;
        let inner = Inner {
            cap,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            intms: 0,
            page_size: 4096,
            ready_pending: false,
            never_ready: false,
            abort_ineffective: false,
            shut_down: false,
            removed: false,
            stuck_enabled: false,
            flr_fails: false,
            late: LateDma::Off,
            parked: Vec::new(),
            flrs: 0,
            dbbuf: None,
            shadow_lazy: false,
            iommu: IovaTable::default(),
            sqs: (0..queues).map(|_| None).collect(),
            cqs: (0..queues).map(|_| None).collect(),
            namespaces,
            mode: CompletionMode::Instant,
            held: VecDeque::new(),
            lost: Vec::new(),
            aers: Vec::new(),
            reordered: Vec::new(),
            fail_rules: Vec::new(),
            drop_next: 0,
            dup_next: 0,
            random: None,
            stats: ModelStats::default(),
            shutdowns: 0,
            enables: 0,
            unsafe_shutdowns: 0,
            media_errors: 0,
            error_log: VecDeque::new(),
            error_count: 0,
            granted_sqs: config.max_io_queues,
            granted_cqs: config.max_io_queues,
            wce: config.vwc,
            coalescing: 0,
            vectors: Vec::new(),
            segs: Vec::new(),
            buf: Vec::new(),
            cfg: config,
        };
        Arc::new(Model {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held (a failed assertion in a test) leaves consistent
        // enough state for the remaining inspection.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether setting CC.EN leaves CSTS.RDY clear forever (while `on`). Turning it off while
    /// the controller waits to become ready makes it ready.
    pub fn set_never_ready(&self, on: bool) {
        let mut g = self.lock();
        g.never_ready = on;
        if !on && g.ready_pending {
            g.become_ready();
        }
    }

    /// Whether clearing CC.EN is ignored (while `on`): the controller keeps running, CSTS.RDY
    /// stays set, and parked commands can still DMA. A function level reset cures it.
    pub fn set_stuck_enabled(&self, on: bool) {
        self.lock().stuck_enabled = on;
    }

    /// Whether the model reads shadow doorbells lazily (while `on`): it writes its event
    /// indexes only in [`Model::poll_shadows`], so the host rings MMIO doorbells rarely, and
    /// commands it queues are fetched at the next MMIO doorbell or poll.
    pub fn set_shadow_lazy(&self, on: bool) {
        self.lock().shadow_lazy = on;
    }

    /// What a controller polling its shadow doorbells does: fetch every command the shadow
    /// tails announce, take the shadow heads, and set each event index to the value read.
    /// Returns how many commands were fetched.
    pub fn poll_shadows(&self) -> u64 {
        let mut g = self.lock();
        let before = g.stats.io_commands + g.stats.admin_commands;
        for qid in 0..g.sqs.len() as u16 {
            g.shadow_sq(qid, true, true);
        }
        for qid in 0..g.cqs.len() as u16 {
            g.shadow_cq(qid, true);
        }
        g.stats.io_commands + g.stats.admin_commands - before
    }

    /// Whether shadow doorbells are configured (Doorbell Buffer Config since the last reset).
    pub fn shadow_doorbells_on(&self) -> bool {
        self.lock().dbbuf.is_some()
    }

    /// Whether a function level reset fails (while `on`).
    pub fn set_flr_fails(&self, on: bool) {
        self.lock().flr_fails = on;
    }

    /// Function level resets done so far.
    pub fn flrs(&self) -> u32 {
        self.lock().flrs
    }

    /// Park the commands `which` selects from now on: their data pointers are walked when
    /// they are fetched, as a controller does, but no data moves and no completion is posted
    /// until [`Model::fire_late_dma`]. Disabling the controller or a function level reset
    /// forgets them, as a stopped controller does no more DMA.
    pub fn set_late_dma(&self, which: LateDma) {
        self.lock().late = which;
    }

    /// Commands parked by [`Model::set_late_dma`].
    pub fn parked(&self) -> usize {
        self.lock().parked.len()
    }

    /// DMA `byte` into every byte of every parked command's data, through the IOMMU as it is
    /// now (a removed mapping faults and is skipped), then, with `complete`, post their
    /// completions (where their completion queues still exist). The parked list is emptied.
    pub fn fire_late_dma(&self, byte: u8, complete: bool) -> LateDmaReport {
        let mut g = self.lock();
        let parked = std::mem::take(&mut g.parked);
        let mut r = LateDmaReport::default();
        let fill = [byte; 4096];
        for p in parked {
            r.commands += 1;
            for (iova, len) in &p.segs {
                let w = g.iommu.for_each_slice(*iova, *len, |vs| {
                    let mut at = 0;
                    while at < vs.len() {
                        let k = (vs.len() - at).min(fill.len());
                        vs.subslice(at, k).expect("in range").copy_from(&fill[..k]);
                        at += k;
                    }
                });
                match w {
                    Ok(()) => r.bytes += len,
                    Err(_) => r.faults += 1,
                }
            }
            if complete
                && g.cqs
                    .get(p.completion.cqid as usize)
                    .is_some_and(Option::is_some)
            {
                g.post(p.completion);
                r.completions += 1;
            }
        }
        r
    }

    /// Set CSTS.CFS from now on, until the host clears CC.EN. A fatal controller processes no
    /// more commands and posts no more completions.
    pub fn set_fatal(&self) {
        self.lock().fatal("fatal status requested by the test");
    }

    /// When I/O completions are posted. Completions already held stay held until released.
    pub fn set_completion_mode(&self, mode: CompletionMode) {
        self.lock().mode = mode;
    }

    /// Post up to `n` held completions, oldest first ([`CompletionMode::Reversed`]: newest
    /// first). Returns how many left the hold (a completion queue without room keeps them
    /// until the host frees slots). Nothing is posted by a removed, fatal or disabled
    /// controller.
    pub fn release(&self, n: usize) -> usize {
        let mut g = self.lock();
        if g.removed || g.csts & csts::CFS != 0 || g.csts & csts::RDY == 0 {
            return 0;
        }
        let mut done = 0;
        while done < n {
            let next = match g.mode {
                CompletionMode::Reversed => g.held.pop_back(),
                _ => g.held.pop_front(),
            };
            let Some(c) = next else { break };
            g.post(c);
            done += 1;
        }
        done
    }

    /// From now on I/O completions are posted by a thread of the model's own, every `delay`
    /// or so after their commands ran ([`CompletionMode::Threaded`]), until another mode is
    /// set or the model is dropped. Data still moves while the doorbell write is processed;
    /// only the completion entries come from the other thread, written as a controller writes
    /// them (the phase tag last, after a release fence).
    pub fn complete_from_thread(self: &Arc<Self>, delay: Duration) {
        {
            let mut g = self.lock();
            if g.mode == CompletionMode::Threaded {
                return;
            }
            g.mode = CompletionMode::Threaded;
        }
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("model-completer".into())
            .spawn(move || loop {
                std::thread::sleep(delay);
                let Some(m) = weak.upgrade() else { return };
                if m.lock().mode != CompletionMode::Threaded {
                    // Held completions wait for release() as in the other holding modes.
                    return;
                }
                m.release_all();
            })
            .expect("spawn the model's completer thread");
    }

    /// Post all held completions; see [`Model::release`].
    pub fn release_all(&self) -> usize {
        self.release(usize::MAX)
    }

    /// Completions waiting for [`Model::release`].
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Make every I/O command touching `lba` of namespace `nsid` (Read, Write, Compare, Write
    /// Zeroes, Dataset Management deallocation) complete with `status`, without transferring
    /// data: always (`times` = None) or for the next `n` such commands (`Some(n)`). A new
    /// rule for the same block replaces the old one; `Some(0)` removes it.
    pub fn fail_lba(&self, nsid: u32, lba: u64, status: NvmeStatus, times: Option<u32>) {
        let mut g = self.lock();
        g.fail_rules.retain(|r| !(r.nsid == nsid && r.lba == lba));
        if times != Some(0) {
            g.fail_rules.push(FailRule {
                nsid,
                lba,
                status,
                remaining: times,
            });
        }
    }

    /// Make Abort useless: it reports every command as not aborted and leaves it where it is,
    /// so only a controller reset recovers a lost command.
    pub fn set_abort_ineffective(&self, on: bool) {
        self.lock().abort_ineffective = on;
    }

    /// Swallow the next `n` completions of any queue: those commands are lost (until aborted,
    /// their queue is deleted or the controller is reset).
    pub fn drop_next_completions(&self, n: u32) {
        self.lock().drop_next = n;
    }

    /// Post each of the next `n` completions twice.
    pub fn duplicate_next_completions(&self, n: u32) {
        self.lock().dup_next = n;
    }

    /// The device disappears: every register reads as all ones, writes are ignored, and no
    /// completion is posted any more.
    pub fn surprise_remove(&self) {
        let mut g = self.lock();
        g.removed = true;
        warn!("model: surprise removal: registers read as 0xffffffff from now on");
    }

    /// Misbehave on `rate_percent` percent of I/O commands, chosen at random but reproducibly
    /// from `seed`: hold the completion (until released or aborted), post it after the other
    /// completions of the same doorbell, post it twice, lose it, or fail the command with a
    /// random error status (with or without DNR). A rate of 0 turns this off.
    pub fn set_random_misbehaviour(&self, seed: u64, rate_percent: u8) {
        let mut g = self.lock();
        g.random = (rate_percent > 0).then(|| Random {
            // xorshift must not start at 0.
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            rate: rate_percent.min(100),
        });
    }

    /// `count` blocks of namespace `nsid` from `lba`.
    ///
    /// # Panics
    ///
    /// If the namespace does not exist or the range is outside it.
    pub fn read_ns(&self, nsid: u32, lba: u64, count: u64) -> Vec<u8> {
        let g = self.lock();
        let ns = g.ns_for_test(nsid, lba, count);
        let mut out = vec![0u8; (count * ns.lba_size) as usize];
        ns.data.read(lba * ns.lba_size, &mut out);
        out
    }

    /// Store `data` in namespace `nsid` from `lba` (a partial last block keeps the rest).
    ///
    /// # Panics
    ///
    /// If the namespace does not exist or the data does not fit.
    pub fn write_ns(&self, nsid: u32, lba: u64, data: &[u8]) {
        let mut g = self.lock();
        let lba_size = g.ns_for_test(nsid, lba, 0).lba_size;
        let count = (data.len() as u64).div_ceil(lba_size);
        g.ns_for_test(nsid, lba, count);
        let i = g.ns_index(nsid).expect("checked above");
        g.namespaces[i].data.write(lba * lba_size, data);
    }

    /// Counters since the model was created.
    pub fn stats(&self) -> ModelStats {
        self.lock().stats.clone()
    }

    /// Shutdown notifications processed (CC.SHN set from 00b).
    pub fn shutdowns(&self) -> u32 {
        self.lock().shutdowns
    }

    /// Times CC.EN went from 0 to 1.
    pub fn enables(&self) -> u32 {
        self.lock().enables
    }

    /// Bytes currently DMA-mapped (for leak checks).
    pub fn mapped_bytes(&self) -> u64 {
        self.lock().iommu.mapped_bytes()
    }

    /// The CC register.
    pub fn cc(&self) -> u32 {
        self.lock().cc
    }

    /// The CSTS register (as it would read without surprise removal).
    pub fn csts(&self) -> u32 {
        self.lock().csts
    }
}

impl Hardware for Model {
    fn name(&self) -> &str {
        "model"
    }

    // Never inlined: the overhead benchmark subtracts these two functions by name, as the
    // emulated controller's share of the work.
    #[inline(never)]
    fn read32(&self, offset: usize) -> u32 {
        self.lock().read_reg(offset)
    }

    #[inline(never)]
    fn write32(&self, offset: usize, value: u32) {
        self.lock().write_reg(offset, value)
    }

    fn interrupt_vectors(&self) -> u32 {
        self.lock().cfg.msix_vectors
    }

    fn enable_interrupts(&self, fds: &[&vmm_sys_util::eventfd::EventFd]) -> Result<(), HwError> {
        let mut g = self.lock();
        let fail = |why: String| HwError::Interrupts {
            dev: "model".into(),
            why,
        };
        if fds.len() as u32 > g.cfg.msix_vectors {
            return Err(fail(format!(
                "{} vectors asked for, the model offers {}",
                fds.len(),
                g.cfg.msix_vectors
            )));
        }
        g.vectors = fds
            .iter()
            .map(|f| {
                f.try_clone().map(|fd| Vector {
                    fd,
                    masked: false,
                    pending: false,
                })
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    fn mask_interrupt(
        &self,
        vector: u16,
        fd: Option<&vmm_sys_util::eventfd::EventFd>,
    ) -> Result<(), HwError> {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(v) = g.vectors.get_mut(vector as usize) else {
            return Err(HwError::Interrupts {
                dev: "model".into(),
                why: format!("vector {vector} is not enabled"),
            });
        };
        g.stats.interrupt_masks += 1;
        match fd {
            None => v.masked = true,
            Some(fd) => {
                v.fd = fd.try_clone().map_err(|e| HwError::Interrupts {
                    dev: "model".into(),
                    why: e.to_string(),
                })?;
                v.masked = false;
                if std::mem::take(&mut v.pending) {
                    let _ = v.fd.write(1);
                    g.stats.interrupts += 1;
                }
            }
        }
        Ok(())
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        let space = iommu::IOVA_START..iommu::IOVA_END;
        vec![space]
    }

    unsafe fn dma_map(&self, vaddr: *mut u8, len: usize, iova: Iova) -> Result<(), HwError> {
        // The caller's `dma_map` contract is exactly what the table needs for its accesses.
        self.lock().iommu.map(vaddr, len, iova.0).map_err(|r| {
            let hint = match r {
                MapRefusal::Overlap(_) => "; unmap the old range first or pick a free IOVA",
                MapRefusal::OutOfRange => "; allocate IOVAs inside iova_ranges()",
                _ => "; map whole 4 KiB pages",
            };
            HwError::Map {
                dev: "model".into(),
                iova,
                len,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, r.to_string()),
                hint: hint.into(),
            }
        })
    }

    fn function_reset(&self) -> Result<(), HwError> {
        let mut g = self.lock();
        if g.removed || g.flr_fails {
            return Err(HwError::Reset {
                dev: "model".into(),
                why: "the model was told to fail function level resets".into(),
            });
        }
        g.flrs += 1;
        g.stuck_enabled = false;
        g.reset();
        g.cc = 0;
        g.aqa = 0;
        g.asq = 0;
        g.acq = 0;
        Ok(())
    }

    fn dma_unmap(&self, iova: Iova, len: usize) -> Result<(), HwError> {
        self.lock()
            .iommu
            .unmap(iova.0, len)
            .map_err(|r| HwError::Unmap {
                dev: "model".into(),
                iova,
                len,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, r.to_string()),
            })
    }
}

impl Inner {
    // ----- registers -----

    fn read_reg(&self, offset: usize) -> u32 {
        if self.removed {
            return u32::MAX;
        }
        match offset {
            reg::CAP => self.cap as u32,
            CAP_HI => (self.cap >> 32) as u32,
            reg::VS => VERSION,
            reg::INTMS | reg::INTMC => self.intms,
            reg::CC => self.cc,
            reg::CSTS => self.csts,
            reg::AQA => self.aqa,
            reg::ASQ => self.asq as u32,
            ASQ_HI => (self.asq >> 32) as u32,
            reg::ACQ => self.acq as u32,
            ACQ_HI => (self.acq >> 32) as u32,
            o if o % 4 != 0 => {
                error!("model: unaligned 32-bit register read at BAR0 offset {o:#x}");
                0
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: usize, value: u32) {
        if self.removed {
            return;
        }
        if !offset.is_multiple_of(4) {
            error!("model: unaligned 32-bit register write at BAR0 offset {offset:#x} ignored");
            return;
        }
        let enabled = self.cc & cc::EN != 0;
        match offset {
            reg::INTMS => self.intms |= value,
            reg::INTMC => self.intms &= !value,
            reg::CC => self.write_cc(value),
            reg::AQA | reg::ASQ | ASQ_HI | reg::ACQ | ACQ_HI => {
                if enabled {
                    warn!(
                        "model: admin queue register {offset:#x} written while CC.EN = 1; it \
                         takes effect at the next enable"
                    );
                }
                self.store_admin_reg(offset, value);
            }
            o if o >= reg::DOORBELL_BASE => self.doorbell(o, value),
            o if o < reg::CC => {
                warn!("model: write of {value:#x} to read-only register {o:#x} ignored")
            }
            o => debug!("model: write of {value:#x} to unimplemented register {o:#x} ignored"),
        }
    }

    fn store_admin_reg(&mut self, offset: usize, value: u32) {
        let set_lo = |r: &mut u64| *r = (*r & !0xffff_ffff) | value as u64;
        let set_hi = |r: &mut u64| *r = (*r & 0xffff_ffff) | (value as u64) << 32;
        match offset {
            reg::AQA => self.aqa = value,
            reg::ASQ => set_lo(&mut self.asq),
            ASQ_HI => set_hi(&mut self.asq),
            reg::ACQ => set_lo(&mut self.acq),
            _ => set_hi(&mut self.acq),
        }
    }

    fn write_cc(&mut self, value: u32) {
        let old = self.cc;
        self.cc = value;
        let was_on = old & cc::EN != 0;
        let on = value & cc::EN != 0;
        if !was_on && on {
            self.enable();
        } else if was_on && !on {
            if self.stuck_enabled {
                warn!("model: CC.EN cleared, but this controller cannot be disabled");
                self.cc = old;
                return;
            }
            self.reset();
        } else if on && (old ^ value) & !(cc::EN | cc::SHN_MASK) != 0 {
            warn!(
                "model: CC changed from {old:#x} to {value:#x} while enabled; only EN and SHN \
                 take effect before the next reset"
            );
        }
        if value & cc::SHN_MASK != 0 && old & cc::SHN_MASK == 0 {
            self.csts = (self.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
            self.shutdowns += 1;
            self.shut_down = true;
            debug!("model: shutdown notification processed");
        }
    }

    /// Why a CC.EN 0 -> 1 transition cannot succeed, if it cannot.
    fn enable_problem(&self) -> Option<String> {
        let v = self.cc;
        let mps = ((v >> 7) & 0xf) as u8;
        if mps < self.cfg.mpsmin || mps > MPSMAX {
            return Some(format!(
                "CC.MPS {mps} is outside CAP.MPSMIN {} ..= CAP.MPSMAX {MPSMAX}",
                self.cfg.mpsmin
            ));
        }
        let css = (v >> 4) & 7;
        if css != 0 {
            return Some(format!("CC.CSS {css} selects a command set other than NVM"));
        }
        let ams = (v >> 11) & 7;
        if ams != 0 {
            return Some(format!(
                "CC.AMS {ams} selects an arbitration the model lacks"
            ));
        }
        let (iosqes, iocqes) = ((v >> 16) & 0xf, (v >> 20) & 0xf);
        if iosqes != 6 || iocqes != 4 {
            return Some(format!(
                "CC.IOSQES {iosqes} / IOCQES {iocqes} are not 6 / 4"
            ));
        }
        let (asqs, acqs) = (self.aqa & 0xfff, (self.aqa >> 16) & 0xfff);
        if asqs == 0 || acqs == 0 {
            return Some(format!(
                "AQA {:#x}: admin queues need at least two entries (ASQS and ACQS nonzero)",
                self.aqa
            ));
        }
        let page = 4096u64 << mps;
        for (name, base) in [("ASQ", self.asq), ("ACQ", self.acq)] {
            if base == 0 || base % page != 0 {
                return Some(format!(
                    "{name} {base:#x} is zero or not aligned to {page} bytes"
                ));
            }
        }
        None
    }

    fn enable(&mut self) {
        self.enables += 1;
        self.csts &= !csts::SHST_MASK;
        self.shut_down = false;
        if let Some(why) = self.enable_problem() {
            self.fatal(&format!("CC.EN set with an invalid configuration: {why}"));
            return;
        }
        if self.csts & csts::CFS != 0 {
            warn!("model: CC.EN set while CSTS.CFS = 1; clear CC.EN to reset the controller");
            return;
        }
        self.page_size = 4096 << ((self.cc >> 7) & 0xf);
        self.ready_pending = true;
        if !self.never_ready {
            self.become_ready();
        }
    }

    fn become_ready(&mut self) {
        self.ready_pending = false;
        let asqs = (self.aqa & 0xfff) + 1;
        let acqs = ((self.aqa >> 16) & 0xfff) + 1;
        self.sqs[0] = Some(Sq::new(self.asq, asqs, 0));
        self.cqs[0] = Some(Cq::new(self.acq, acqs));
        self.csts |= csts::RDY;
    }

    /// CC.EN 1 -> 0: a controller reset. Parked commands stop: a disabled controller does no
    /// more DMA.
    fn reset(&mut self) {
        self.parked.clear();
        self.dbbuf = None;
        if !self.shut_down && self.csts & csts::RDY != 0 {
            self.unsafe_shutdowns += 1;
        }
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.held.clear();
        self.lost.clear();
        self.aers.clear();
        self.reordered.clear();
        self.granted_sqs = self.cfg.max_io_queues;
        self.granted_cqs = self.cfg.max_io_queues;
        self.wce = self.cfg.vwc;
        self.coalescing = 0;
        self.ready_pending = false;
        self.shut_down = false;
        self.csts = 0;
    }

    /// Enter the fatal state (CSTS.CFS) and say why.
    fn fatal(&mut self, why: &str) {
        error!("model: controller fatal status (CSTS.CFS = 1): {why}; reset the controller");
        self.csts |= csts::CFS;
    }

    /// Whether queues are processed now.
    fn running(&self) -> bool {
        !self.removed
            && self.cc & cc::EN != 0
            && self.csts & csts::RDY != 0
            && self.csts & csts::CFS == 0
            && !self.shut_down
    }

    // ----- doorbells -----

    fn doorbell(&mut self, offset: usize, value: u32) {
        let stride = 4usize << self.cfg.dstrd;
        let rel = offset - reg::DOORBELL_BASE;
        let index = rel / stride;
        let qid = index / 2;
        if !rel.is_multiple_of(stride) || qid >= self.sqs.len() {
            warn!("model: write of {value:#x} to BAR0 offset {offset:#x} is not a doorbell of this controller; ignored");
            self.stats.ignored_doorbells += 1;
            return;
        }
        let qid = qid as u16;
        if !self.running() {
            if self.csts & csts::CFS != 0 || self.shut_down {
                warn!("model: doorbell write for queue {qid} ignored: the controller is fatal or shut down");
            } else {
                debug!(
                    "model: doorbell write for queue {qid} ignored: the controller is not ready"
                );
            }
            self.stats.ignored_doorbells += 1;
            return;
        }
        if index.is_multiple_of(2) {
            self.sq_doorbell(qid, value);
        } else {
            self.cq_doorbell(qid, value);
        }
    }

    fn sq_doorbell(&mut self, qid: u16, value: u32) {
        let Some(sq) = self.sqs[qid as usize].as_mut() else {
            warn!("model: tail doorbell for submission queue {qid}, which does not exist; ignored");
            self.stats.ignored_doorbells += 1;
            return;
        };
        if value >= sq.size {
            warn!(
                "model: SQ {qid} tail doorbell value {value} is not below the queue size {}; ignored",
                sq.size
            );
            self.stats.ignored_doorbells += 1;
            return;
        }
        sq.tail = value;
        self.stats.sq_doorbells += 1;
        self.run_sq(qid);
        let lazy = self.shadow_lazy;
        self.shadow_sq(qid, !lazy, false);
    }

    /// Fetch and run commands from submission queue `qid` up to `sq.tail`.
    fn run_sq(&mut self, qid: u16) {
        loop {
            if !self.running() {
                break;
            }
            let Some(sq) = self.sqs[qid as usize].as_mut() else {
                break;
            };
            if sq.head == sq.tail {
                break;
            }
            let at = sq.base + sq.head as u64 * 64;
            let cqid = sq.cqid;
            sq.head = (sq.head + 1) % sq.size;
            let head = sq.head as u16;
            let mut entry = SqEntry::default();
            if let Err(f) = self.iommu.read(at, entry.as_mut_bytes()) {
                self.fatal(&format!(
                    "cannot fetch the entry of SQ {qid} at {at:#x}: {f}"
                ));
                break;
            }
            self.process(qid, cqid, head, &entry);
        }
        while let Some(c) = self.reordered.pop() {
            self.post(c);
        }
    }

    /// Byte offsets of queue `qid`'s submission tail and completion head dwords in the
    /// shadow pages.
    fn shadow_offsets(&self, qid: u16) -> (u64, u64) {
        let stride = 4u64 << self.cfg.dstrd;
        (2 * qid as u64 * stride, (2 * qid as u64 + 1) * stride)
    }

    fn read_dword(&self, iova: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.iommu.read(iova, &mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    fn write_dword(&mut self, iova: u64, value: u32) {
        if let Err(f) = self.iommu.write(iova, &value.to_le_bytes()) {
            self.fatal(&format!("cannot write the shadow page at {iova:#x}: {f}"));
        }
    }

    /// With shadow doorbells: keep fetching while the shadow tail of SQ `qid` moves; then,
    /// with `arm`, set its event index to the tail read, asking for an MMIO doorbell for
    /// whatever comes next. `polled`: no MMIO doorbell brought the model here, so a tail that
    /// passed the event index is a doorbell the host should have rung (counted).
    fn shadow_sq(&mut self, qid: u16, arm: bool, polled: bool) {
        let Some((dbs, eis)) = self.dbbuf else {
            return;
        };
        let (sq_off, _) = self.shadow_offsets(qid);
        loop {
            let Some(size) = self.sqs[qid as usize].as_ref().map(|q| q.size) else {
                return;
            };
            let Some(tail) = self.read_dword(dbs + sq_off) else {
                self.fatal("cannot read the shadow doorbell page");
                return;
            };
            if tail >= size {
                self.fatal(&format!(
                    "shadow tail {tail} of SQ {qid} is not below the queue size {size}"
                ));
                return;
            }
            let sq = self.sqs[qid as usize].as_mut().expect("checked above");
            if tail == sq.tail {
                if arm {
                    sq.event_index = Some(tail as u16);
                    self.write_dword(eis + sq_off, tail);
                }
                return;
            }
            if polled
                && sq
                    .event_index
                    .is_some_and(|e| crate::doorbell::need_event(e, tail as u16, sq.tail as u16))
            {
                warn!(
                    "model: the shadow tail of SQ {qid} moved from {} to {tail} past the event \
                     index {:?} without an MMIO doorbell",
                    sq.tail, sq.event_index
                );
                self.stats.missed_doorbells += 1;
            }
            sq.tail = tail;
            self.stats.sq_shadow_fetches += 1;
            self.run_sq(qid);
        }
    }

    /// With shadow doorbells: take the shadow head of CQ `qid` (posting what waited for room);
    /// with `arm`, set its event index to it.
    fn shadow_cq(&mut self, qid: u16, arm: bool) {
        let Some((dbs, eis)) = self.dbbuf else {
            return;
        };
        let (_, cq_off) = self.shadow_offsets(qid);
        let Some(cq) = self.cqs[qid as usize].as_ref() else {
            return;
        };
        let (size, old, used) = (cq.size, cq.head, cq.used());
        let Some(head) = self.read_dword(dbs + cq_off) else {
            self.fatal("cannot read the shadow doorbell page");
            return;
        };
        if head >= size || (head + size - old) % size > used {
            self.fatal(&format!(
                "shadow head {head} of CQ {qid} is invalid (size {size}, head {old}, {used} \
                 entries posted and not consumed)"
            ));
            return;
        }
        if arm {
            self.write_dword(eis + cq_off, head);
        }
        if head == old {
            return;
        }
        self.cqs[qid as usize].as_mut().expect("checked above").head = head;
        self.post_waiting(qid);
    }

    /// Post the completions that waited for room in CQ `qid`, as far as there is room now.
    fn post_waiting(&mut self, qid: u16) {
        while self.running() {
            let Some(cq) = self.cqs[qid as usize].as_mut() else {
                break;
            };
            if cq.full() {
                break;
            }
            let Some(c) = cq.waiting.pop_front() else {
                break;
            };
            self.write_cqe(c);
        }
    }

    /// Doorbell Buffer Config: PRP1 the shadow doorbells, PRP2 the event indexes.
    pub(super) fn doorbell_buffer_config(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let (dbs, eis) = (e.dptr1, e.dptr2);
        if dbs == 0 || eis == 0 || dbs % self.page_size != 0 || eis % self.page_size != 0 {
            return bad(
                NvmeStatus::INVALID_FIELD,
                format!("shadow pages {dbs:#x} / {eis:#x} must be nonzero and page aligned"),
            );
        }
        for at in [dbs, eis] {
            if let Err(f) = self.iommu.check(at, self.page_size) {
                return bad(NvmeStatus::DATA_TRANSFER_ERROR, f.to_string());
            }
        }
        self.dbbuf = Some((dbs, eis));
        // As QEMU does: the current tails and heads go to the shadow doorbells.
        for qid in 0..self.sqs.len() as u16 {
            let (sq_off, cq_off) = self.shadow_offsets(qid);
            if let Some(t) = self.sqs[qid as usize].as_ref().map(|q| q.tail) {
                self.write_dword(dbs + sq_off, t);
            }
            if let Some(h) = self.cqs[qid as usize].as_ref().map(|q| q.head) {
                self.write_dword(dbs + cq_off, h);
            }
        }
        Ok(0)
    }

    fn cq_doorbell(&mut self, qid: u16, value: u32) {
        let Some(cq) = self.cqs[qid as usize].as_mut() else {
            warn!("model: head doorbell for completion queue {qid}, which does not exist; ignored");
            self.stats.ignored_doorbells += 1;
            return;
        };
        if value >= cq.size || (value + cq.size - cq.head) % cq.size > cq.used() {
            warn!(
                "model: CQ {qid} head doorbell value {value} is invalid (size {}, head {}, {} \
                 entries posted and not consumed); ignored",
                cq.size,
                cq.head,
                cq.used()
            );
            self.stats.ignored_doorbells += 1;
            return;
        }
        cq.head = value;
        self.stats.cq_doorbells += 1;
        self.post_waiting(qid);
    }

    // ----- commands -----

    /// Execute one fetched command and dispose of its completion.
    fn process(&mut self, sqid: u16, cqid: u16, sq_head: u16, e: &SqEntry) {
        let cid = e.cid();
        let sq = self.sqs[sqid as usize]
            .as_mut()
            .expect("the queue being processed exists");
        let mut c = Completion {
            sqid,
            cqid,
            cid,
            dw0: 0,
            status: 0,
            sq_head,
            frees_cid: true,
            duplicate: false,
        };
        if sq.outstanding.contains(cid) {
            self.stats.cid_conflicts += 1;
            let f = Failure::new(
                NvmeStatus::INVALID_FIELD,
                format!("CID {cid} is already outstanding on SQ {sqid}; use a free CID"),
            );
            c.frees_cid = false;
            self.fail_completion(&mut c, e, f);
            self.post(c);
            return;
        }
        sq.outstanding.insert(cid);
        if self.late != LateDma::Off && self.park(sqid, e, &c) {
            return;
        }
        let mut action = None;
        let outcome = if sqid == 0 {
            self.admin(e, &c)
        } else {
            self.count_io(e.opcode());
            action = self.random.as_mut().and_then(Random::roll);
            match action {
                Some(Misbehaviour::Error(st)) => {
                    Outcome::Complete(Err(Failure::injected(st, "random misbehaviour")))
                }
                _ => Outcome::Complete(self.io(e)),
            }
        };
        let result = match outcome {
            Outcome::Complete(r) => r,
            Outcome::Parked => return,
        };
        match result {
            Ok(dw0) => c.dw0 = dw0,
            Err(f) => self.fail_completion(&mut c, e, f),
        }
        self.dispose(c, action);
    }

    /// Put a failure into a completion, log it and record it.
    fn fail_completion(&mut self, c: &mut Completion, e: &SqEntry, f: Failure) {
        warn!(
            "model: SQ {} CID {} opcode {:#04x}: {} ({}, SCT {} SC {:#04x}{})",
            c.sqid,
            c.cid,
            e.opcode(),
            f.why,
            f.status.name(),
            f.status.sct,
            f.status.sc,
            if f.status.dnr { ", DNR" } else { "" }
        );
        c.status = f.status.to_field();
        let lba = if c.sqid != 0 { e.slba() } else { 0 };
        self.record_error(c, e.nsid, lba);
    }

    /// Count an error completion and add it to the Error Information log.
    fn record_error(&mut self, c: &Completion, nsid: u32, lba: u64) {
        let st = NvmeStatus::from_field(c.status);
        self.stats.errors_returned += 1;
        if st.sct == crate::status::sct::MEDIA {
            self.media_errors += 1;
        }
        self.error_count += 1;
        self.error_log.push_front(ErrorRecord {
            count: self.error_count,
            sqid: c.sqid,
            cid: c.cid,
            status: c.status,
            lba,
            nsid,
        });
        self.error_log.truncate(ERROR_LOG_ENTRIES);
    }

    /// Decide what happens to a completion: lost, held, reordered, duplicated or posted.
    fn dispose(&mut self, mut c: Completion, action: Option<Misbehaviour>) {
        if self.drop_next > 0 {
            self.drop_next -= 1;
            self.stats.completions_dropped += 1;
            self.lost.push(c);
            return;
        }
        if self.dup_next > 0 {
            self.dup_next -= 1;
            c.duplicate = true;
        }
        match action {
            Some(Misbehaviour::Drop) => {
                self.stats.completions_dropped += 1;
                self.lost.push(c);
                return;
            }
            Some(Misbehaviour::Duplicate) => c.duplicate = true,
            _ => {}
        }
        if c.sqid != 0
            && (self.mode != CompletionMode::Instant || action == Some(Misbehaviour::Hold))
        {
            self.held.push_back(c);
        } else if action == Some(Misbehaviour::Reorder) {
            self.reordered.push(c);
        } else {
            self.post(c);
        }
    }

    /// Post a completion, or queue it behind earlier ones while its CQ has no free slot.
    fn post(&mut self, c: Completion) {
        if c.duplicate {
            let first = Completion {
                duplicate: false,
                ..c
            };
            self.post(first);
            self.stats.completions_duplicated += 1;
            self.post(Completion {
                frees_cid: false,
                ..first
            });
            return;
        }
        let Some(cq) = self.cqs.get_mut(c.cqid as usize).and_then(Option::as_mut) else {
            warn!(
                "model: completion of CID {} (SQ {}) dropped: CQ {} no longer exists",
                c.cid, c.sqid, c.cqid
            );
            return;
        };
        if self.dbbuf.is_some() && (!cq.waiting.is_empty() || cq.full()) {
            // A controller with shadow doorbells reads the host's head before it gives up.
            let lazy = self.shadow_lazy;
            self.shadow_cq(c.cqid, !lazy);
        }
        let Some(cq) = self.cqs.get_mut(c.cqid as usize).and_then(Option::as_mut) else {
            return;
        };
        if !cq.waiting.is_empty() || cq.full() {
            cq.waiting.push_back(c);
            self.stats.cq_full_waits += 1;
            return;
        }
        self.write_cqe(c);
    }

    /// Write a completion into the next CQ slot (the caller checked there is room).
    fn write_cqe(&mut self, c: Completion) {
        let sq_head = match self.sqs.get(c.sqid as usize).and_then(Option::as_ref) {
            Some(sq) => sq.head as u16,
            None => c.sq_head,
        };
        let cq = self.cqs[c.cqid as usize]
            .as_mut()
            .expect("posting to an existing CQ");
        let entry = crate::spec::CqEntry::build(c.dw0, sq_head, c.sqid, c.cid, cq.phase, c.status);
        let at = cq.base + cq.tail as u64 * 16;
        let bytes: [u8; 16] = zerocopy::transmute!(entry);
        if let Err(f) = self.iommu.write_cqe(at, &bytes) {
            let why = format!(
                "cannot write the completion of CID {} to CQ {}: {f}",
                c.cid, c.cqid
            );
            self.fatal(&why);
            return;
        }
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        let vector = cq.vector;
        self.stats.completions_posted += 1;
        if let Some(v) = vector.and_then(|v| self.vectors.get_mut(v as usize)) {
            if v.masked {
                // The Pending Bit: sent when the vector is unmasked.
                v.pending = true;
            } else {
                // The MSI-X message: the entry is in memory before the host can see the signal.
                let _ = v.fd.write(1);
                self.stats.interrupts += 1;
            }
        }
        if c.frees_cid {
            if let Some(sq) = self.sqs.get_mut(c.sqid as usize).and_then(Option::as_mut) {
                sq.outstanding.remove(c.cid);
            }
        }
    }

    // ----- helpers for the command sets -----

    /// Index of the active namespace `nsid`.
    fn ns_index(&self, nsid: u32) -> Option<usize> {
        self.namespaces.binary_search_by_key(&nsid, |n| n.nsid).ok()
    }

    fn ns_for_test(&self, nsid: u32, lba: u64, count: u64) -> &Namespace {
        let i = self
            .ns_index(nsid)
            .unwrap_or_else(|| panic!("model: no namespace {nsid}"));
        let ns = &self.namespaces[i];
        assert!(
            lba.checked_add(count).is_some_and(|end| end <= ns.blocks),
            "model: blocks {lba}+{count} are outside namespace {nsid} ({} blocks)",
            ns.blocks
        );
        ns
    }

    /// The largest transfer in bytes (MDTS), or None without a limit.
    /// Park `e` if [`Model::set_late_dma`] selects it: walk its data pointer now, keep the
    /// segments and the completion for later. Returns whether it was parked.
    fn park(&mut self, sqid: u16, e: &SqEntry, c: &Completion) -> bool {
        let len = match (self.late, sqid) {
            (LateDma::Io, 1..) => match e.opcode() {
                io_op::READ | io_op::WRITE => {
                    let Some(ns) = self.ns_index(e.nsid) else {
                        return false;
                    };
                    ((e.cdw12 & 0xffff) as u64 + 1) * self.namespaces[ns].lba_size
                }
                _ => return false,
            },
            (LateDma::Admin, 0) => match e.opcode() {
                admin_op::IDENTIFY => 4096,
                admin_op::GET_LOG_PAGE => {
                    let numd = (e.cdw10 >> 16) as u64 | ((e.cdw11 as u64 & 0xffff) << 16);
                    (numd + 1) * 4
                }
                _ => return false,
            },
            _ => return false,
        };
        if self.map_data(e, len, sqid != 0).is_err() {
            return false;
        }
        let segs = self.segs.iter().map(|s| (s.iova, s.len)).collect();
        self.parked.push(ParkedCommand {
            segs,
            completion: *c,
        });
        true
    }

    fn max_transfer(&self) -> Option<u64> {
        (self.cfg.mdts != 0).then(|| 1u64 << (self.cfg.mdts as u32 + 12 + self.cfg.mpsmin as u32))
    }

    /// Walk the data pointer of `e` for `len` bytes into `self.segs` and check that all of it
    /// is mapped. `sgl_ok`: SGLs may be used (I/O commands of a controller advertising them).
    fn map_data(&mut self, e: &SqEntry, len: u64, sgl_ok: bool) -> Result<(), Failure> {
        let mut segs = std::mem::take(&mut self.segs);
        segs.clear();
        let mut ctr = WalkCounters::default();
        let walked = match e.psdt() {
            0 => dptr::walk_prp(
                &self.iommu,
                e.dptr1,
                e.dptr2,
                len,
                self.page_size,
                &mut segs,
                &mut ctr,
            ),
            1 if sgl_ok && self.cfg.sgl => {
                dptr::walk_sgl(&self.iommu, e.dptr1, e.dptr2, len, &mut segs, &mut ctr)
            }
            1 if sgl_ok => Err(WalkError {
                status: NvmeStatus::INVALID_FIELD,
                why: "PSDT selects SGLs but the controller does not advertise them".into(),
            }),
            p => Err(WalkError {
                status: NvmeStatus::INVALID_FIELD,
                why: format!("PSDT {p} is not allowed for this command"),
            }),
        };
        let walked = walked.and_then(|()| {
            let odd = segs.iter().find(|s| (s.iova | s.len) & 3 != 0);
            match odd {
                Some(s) if e.psdt() == 1 && self.cfg.sgl_dword => Err(WalkError {
                    status: NvmeStatus::INVALID_FIELD,
                    why: format!(
                        "SGL data block {:#x}+{:#x} is not dword aligned (SGLS = 10b)",
                        s.iova, s.len
                    ),
                }),
                _ => Ok(()),
            }
        });
        self.stats.prp_list_pages += ctr.prp_list_pages;
        self.stats.sgl_descriptors += ctr.sgl_descriptors;
        let checked = walked.map_err(Failure::from).and_then(|()| {
            for s in &segs {
                if let Err(f) = self.iommu.check(s.iova, s.len) {
                    return bad(
                        NvmeStatus::DATA_TRANSFER_ERROR,
                        format!("data segment {:#x}+{:#x}: {f}", s.iova, s.len),
                    );
                }
            }
            Ok(())
        });
        self.segs = segs;
        checked
    }

    /// Copy `data` to the segments in `self.segs`, zero-filling whatever they describe beyond
    /// it.
    fn send_to_host(&self, data: &[u8]) -> Result<(), Failure> {
        let mut done = 0usize;
        for s in &self.segs {
            self.iommu
                .for_each_slice(s.iova, s.len, |vs| {
                    let n = vs.len();
                    let have = data.len().saturating_sub(done).min(n);
                    vs.subslice(0, have)
                        .expect("in range")
                        .copy_from(&data[done..done + have]);
                    let mut z = have;
                    while z < n {
                        let k = (n - z).min(ZERO_PAGE.len());
                        vs.subslice(z, k)
                            .expect("in range")
                            .copy_from(&ZERO_PAGE[..k]);
                        z += k;
                    }
                    done += n;
                })
                .map_err(|f| Failure::new(NvmeStatus::DATA_TRANSFER_ERROR, f.to_string()))?;
        }
        Ok(())
    }

    /// Read the data described by `self.segs` into `self.buf`.
    fn fetch_from_host(&mut self, len: usize) -> Result<(), Failure> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(len, 0);
        let mut done = 0usize;
        let mut result = Ok(());
        for s in &self.segs {
            let r = self.iommu.for_each_slice(s.iova, s.len, |vs| {
                let n = vs.len();
                vs.copy_to(&mut buf[done..done + n]);
                done += n;
            });
            if let Err(f) = r {
                result = bad(NvmeStatus::DATA_TRANSFER_ERROR, f.to_string());
                break;
            }
        }
        self.buf = buf;
        result
    }
}

/// Zeros for filling host memory.
static ZERO_PAGE: [u8; 4096] = [0; 4096];
