//! Controller bring-up, admin commands, I/O queue pair creation and clean shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dma::DmaSlice;
use crate::dma::{Backing, DmaBuffer, DmaPool, DmaWords};
use crate::error::{Error, Result};
use crate::hw::Hardware;
use crate::identify::{ControllerInfo, ErrorLogEntry, NamespaceInfo, SglSupport, SmartLog};
use crate::io::IoQueuePair;
use crate::queue::{DataPointerMode, QueuePair, Recovery, Shadow};
use crate::spec::{
    admin_op, cc, cns, csts, feature, log_page, reg, Cap, SqEntry, MAX_NLB, PAGE_SIZE,
};

/// How to bring a controller up.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Where DMA memory comes from.
    pub backing: Backing,
    /// 2 MiB chunks mapped at start-up (more are mapped when needed).
    pub initial_chunks: usize,
    /// Admin queue entries.
    pub admin_entries: u16,
    /// I/O queue pairs to ask the controller for.
    pub io_queues: u16,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// Data pointers for I/O queue pairs: by default chosen per command (SGLs where PRPs
    /// would need a list); SGL and the per-command choice fall back to PRP when unsupported.
    pub data_pointer: DataPointerMode,
    /// Use shadow doorbells when the controller offers them (Doorbell Buffer Config, OACS
    /// bit 8): queue tails and heads go to memory, and an MMIO doorbell is written only when
    /// the controller's event index asks for one. On by default.
    pub shadow_doorbells: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            backing: Backing::Hugepages,
            initial_chunks: 1,
            admin_entries: 32,
            io_queues: 64,
            admin_timeout: Duration::from_secs(10),
            data_pointer: DataPointerMode::Auto,
            shadow_doorbells: true,
        }
    }
}

/// The admin queue pair and the commands that run on it.
pub(crate) struct Admin {
    hw: Arc<dyn Hardware>,
    pool: DmaPool,
    qp: Mutex<QueuePair>,
    timeout: Duration,
}

pub(crate) struct Shared {
    pub(crate) hw: Arc<dyn Hardware>,
    pub(crate) pool: DmaPool,
    pub(crate) cap: Cap,
    pub(crate) admin: Admin,
    pub(crate) info: ControllerInfo,
    namespaces: Vec<NamespaceInfo>,
    io_queues_granted: u16,
    qids_in_use: Mutex<Vec<bool>>,
    pub(crate) max_transfer: u32,
    options: ControllerOptions,
    /// Bumped by every controller reset; queue pairs compare it with their own (at every
    /// submission: they hold the counter itself).
    pub(crate) generation: Arc<AtomicU64>,
    /// Bumped every time the controller was seen stopped (CSTS.RDY = 0 after disabling it,
    /// or a function level reset): see [`Recovery::quiesces`].
    quiesces: AtomicU64,
    /// One reset at a time.
    reset_lock: Mutex<()>,
    /// The shadow doorbell and event index pages, when the controller offers them and they
    /// are wanted. Lent to the controller while it is enabled.
    dbbuf: Option<(Arc<DmaWords>, Arc<DmaWords>)>,
    /// Whether the controller took them (Doorbell Buffer Config succeeded since its last
    /// enable).
    dbbuf_on: AtomicBool,
}

/// A controller brought up and ready: identify data, namespaces, admin commands, and a
/// factory of I/O queue pairs. Shared freely between threads; shut down cleanly when the
/// last handle and queue pair are gone.
#[derive(Clone)]
pub struct Controller {
    shared: Arc<Shared>,
}

/// Poll `cond` until it holds, failing after `ms` milliseconds; CSTS.CFS and a removed
/// device end the wait early.
fn wait_register(
    hw: &dyn Hardware,
    what: &'static str,
    ms: u64,
    check_cfs: bool,
    cond: impl Fn(u32) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(ms);
    loop {
        let v = hw.read32(reg::CSTS);
        if v == u32::MAX {
            return Err(Error::DeviceRemoved {
                dev: hw.name().to_string(),
            });
        }
        if check_cfs && v & csts::CFS != 0 {
            return Err(Error::ControllerFatal {
                dev: hw.name().to_string(),
                during: what,
            });
        }
        if cond(v) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::RegisterTimeout {
                dev: hw.name().to_string(),
                what,
                ms,
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Clear CC.EN and wait for CSTS.RDY = 0.
fn disable(hw: &dyn Hardware, cap: Cap) -> Result<()> {
    let c = hw.read32(reg::CC);
    if c & cc::EN != 0 {
        hw.write32(reg::CC, c & !cc::EN);
    }
    wait_register(
        hw,
        "the controller to become not ready (CSTS.RDY = 0) after disabling it",
        cap.timeout_ms().max(500),
        false,
        |v| v & csts::RDY == 0,
    )
}

impl Controller {
    /// Open the controller at `bdf` through VFIO and bring it up.
    pub fn open(bdf: &str, options: ControllerOptions) -> Result<Controller> {
        let hw = crate::vfio::VfioHardware::open(bdf)?;
        Controller::init(Arc::new(hw), options)
    }

    /// Bring up the controller behind `hw` (disable, admin queues, enable, identify, ask for
    /// I/O queues).
    pub fn init(hw: Arc<dyn Hardware>, options: ControllerOptions) -> Result<Controller> {
        let dev = hw.name().to_string();
        let cap = Cap(hw.read64(reg::CAP));
        if cap.0 == u64::MAX {
            return Err(Error::DeviceRemoved { dev });
        }
        if cap.css() & 1 == 0 {
            return Err(Error::Unsupported {
                dev,
                why: "the NVM command set is not supported (CAP.CSS bit 0 clear)".into(),
            });
        }
        if cap.mpsmin() > 0 {
            return Err(Error::Unsupported {
                dev,
                why: format!(
                    "its smallest memory page size is {} KiB (CAP.MPSMIN = {}); rnvme uses 4 KiB pages",
                    4u32 << cap.mpsmin(),
                    cap.mpsmin()
                ),
            });
        }
        let admin_entries = options
            .admin_entries
            .clamp(2, cap.max_queue_entries().min(4096) as u16);
        disable(hw.as_ref(), cap)?;

        let pool = DmaPool::new(hw.clone(), options.backing, options.initial_chunks)?;
        let admin = QueuePair::new(
            hw.clone(),
            &pool,
            0,
            (admin_entries, admin_entries),
            cap.dstrd(),
        )?;
        let a = (admin_entries - 1) as u32;
        hw.write32(reg::AQA, a | (a << 16));
        hw.write64(reg::ASQ, admin.sq_iova().0);
        hw.write64(reg::ACQ, admin.cq_iova().0);
        hw.write32(reg::INTMS, u32::MAX);
        hw.write32(reg::CC, cc::mps(0) | cc::IOSQES_64 | cc::IOCQES_16 | cc::EN);
        wait_register(
            hw.as_ref(),
            "the controller to become ready (CSTS.RDY = 1) after enabling it",
            cap.timeout_ms().max(500),
            true,
            |v| v & csts::RDY != 0,
        )?;

        let admin = Admin {
            hw: hw.clone(),
            pool: pool.clone(),
            qp: Mutex::new(admin),
            timeout: options.admin_timeout,
        };
        let info = admin.identify_controller()?;
        let mdts = info.max_transfer_bytes(cap.mpsmin()).unwrap_or(u64::MAX);
        let mut namespaces = Vec::new();
        for nsid in admin.active_namespace_ids()? {
            match admin.identify_namespace(nsid) {
                Ok(ns) => namespaces.push(ns),
                Err(e) => log::warn!("{dev}: namespace {nsid} skipped: {e}"),
            }
        }
        let want = options.io_queues.clamp(1, 0xfffe) - 1;
        let dw0 = admin.set_features(
            feature::NUMBER_OF_QUEUES,
            want as u32 | ((want as u32) << 16),
            None,
        )?;
        let granted = ((dw0 & 0xffff).min(dw0 >> 16) + 1).min(options.io_queues as u32) as u16;
        let dbbuf = if options.shadow_doorbells
            && info.oacs & crate::spec::OACS_DOORBELL_BUFFER_CONFIG != 0
        {
            Some((
                Arc::new(DmaWords::new(pool.alloc(PAGE_SIZE)?)),
                Arc::new(DmaWords::new(pool.alloc(PAGE_SIZE)?)),
            ))
        } else {
            None
        };
        let shared = Shared {
            hw: hw.clone(),
            pool,
            cap,
            admin,
            info,
            namespaces,
            io_queues_granted: granted,
            qids_in_use: Mutex::new(vec![false; granted as usize + 1]),
            // Our own bound on one command: 8 MiB of data (three PRP list pages at most
            // per extra chain step), below the NLB limit at 512-byte LBAs (32 MiB).
            max_transfer: mdts.min(8 << 20) as u32,
            options: options.clone(),
            generation: Arc::new(AtomicU64::new(0)),
            quiesces: AtomicU64::new(0),
            reset_lock: Mutex::new(()),
            dbbuf,
            dbbuf_on: AtomicBool::new(false),
        };
        shared.configure_dbbuf();
        log::info!(
            "{dev}: ready: {} / {}, {} namespace(s), {granted} I/O queue pair(s), max transfer {} bytes",
            shared.info.model,
            shared.info.serial,
            shared.namespaces.len(),
            shared.max_transfer
        );
        Ok(Controller {
            shared: Arc::new(shared),
        })
    }

    /// The device name (BDF).
    pub fn name(&self) -> &str {
        self.shared.hw.name()
    }

    /// Identify Controller data.
    pub fn info(&self) -> &ControllerInfo {
        &self.shared.info
    }

    /// The capabilities register.
    pub fn cap(&self) -> Cap {
        self.shared.cap
    }

    /// The active namespaces.
    pub fn namespaces(&self) -> &[NamespaceInfo] {
        &self.shared.namespaces
    }

    /// One active namespace.
    pub fn namespace(&self, nsid: u32) -> Result<&NamespaceInfo> {
        self.shared
            .namespace(nsid)
            .ok_or_else(|| Error::NoSuchNamespace {
                dev: self.name().to_string(),
                nsid,
                active: self.shared.active_list(),
            })
    }

    /// Largest transfer of one command, in bytes (MDTS, bounded by the driver's PRP lists).
    pub fn max_transfer_bytes(&self) -> u32 {
        self.shared.max_transfer
    }

    /// Number of I/O queue pairs the controller granted.
    pub fn io_queues_granted(&self) -> u16 {
        self.shared.io_queues_granted
    }

    /// Largest I/O queue depth: entries per queue, CAP.MQES + 1 but at most 4096.
    pub fn max_queue_entries(&self) -> u32 {
        self.shared
            .cap
            .max_queue_entries()
            .min(crate::queue::MAX_QUEUE_ENTRIES)
    }

    /// The DMA memory pool.
    pub fn pool(&self) -> &DmaPool {
        &self.shared.pool
    }

    /// The hardware below.
    pub fn hardware(&self) -> &Arc<dyn Hardware> {
        &self.shared.hw
    }

    /// Whether queue pairs use shadow doorbells now (the controller offers them, they were
    /// not turned off in the options, and it took the pages since its last reset).
    pub fn shadow_doorbells(&self) -> bool {
        self.shared.dbbuf_on.load(Ordering::Acquire)
    }

    /// Whether the controller accepts SGLs for NVM I/O commands.
    pub fn supports_sgl(&self) -> bool {
        !matches!(self.shared.info.sgl_support(), SglSupport::None)
    }

    /// A zero-filled DMA buffer of `len` bytes.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer> {
        Ok(self.shared.pool.alloc(len)?)
    }

    /// Create an I/O queue pair with `entries` entries per queue (at most
    /// [`Controller::max_queue_entries`]), using the next free queue id.
    pub fn create_io_qpair(&self, entries: u32) -> Result<IoQueuePair> {
        IoQueuePair::create(
            self.shared.clone(),
            entries,
            self.shared.options.data_pointer,
        )
    }

    /// Run an admin command with an optional data buffer; returns completion DW0.
    ///
    /// The command's data pointer is `data`'s, and cleared without it (see
    /// [`QueuePair::submit`]). Commands that hand the controller memory it goes on using after
    /// they complete are refused: Create I/O Submission or Completion Queue, Doorbell Buffer
    /// Config, and Set Features Host Memory Buffer. The driver manages queues and doorbell
    /// pages itself, and a command holds its memory only until its completion.
    pub fn admin(&self, cmd: SqEntry, data: Option<&DmaBuffer>, what: &'static str) -> Result<u32> {
        if keeps_memory(&cmd) {
            return Err(Error::InvalidArgument(format!(
                "{what}: admin opcode {:#04x} would hand the controller memory it goes on using \
                 after the command completes (queues, doorbell buffers, a host memory buffer); \
                 the driver manages those itself",
                cmd.opcode()
            )));
        }
        self.shared.admin.admin_cmd(cmd, data, what)
    }

    /// Identify Controller, freshly read.
    pub fn identify_controller(&self) -> Result<ControllerInfo> {
        self.shared.admin.identify_controller()
    }

    /// Identify Namespace, freshly read.
    pub fn identify_namespace(&self, nsid: u32) -> Result<NamespaceInfo> {
        self.shared.admin.identify_namespace(nsid)
    }

    /// The active namespace list.
    pub fn active_namespace_ids(&self) -> Result<Vec<u32>> {
        self.shared.admin.active_namespace_ids()
    }

    /// Get Features; returns DW0.
    pub fn get_features(&self, fid: u8, cdw11: u32) -> Result<u32> {
        let mut c = SqEntry::new(admin_op::GET_FEATURES, 0);
        c.cdw10 = fid as u32;
        c.cdw11 = cdw11;
        self.shared.admin.admin_cmd(c, None, "Get Features")
    }

    /// Set Features; returns DW0.
    pub fn set_features(&self, fid: u8, cdw11: u32) -> Result<u32> {
        self.shared.admin.set_features(fid, cdw11, None)
    }

    /// Raw log page bytes.
    pub fn get_log_page(&self, lid: u8, nsid: u32, len: usize) -> Result<Vec<u8>> {
        if len == 0 || len.div_ceil(4) > 1 << 32 {
            return Err(Error::InvalidArgument(format!(
                "a log page of {len} bytes cannot be asked for: 1 byte to 16 GiB"
            )));
        }
        let buf = self.alloc(len.max(4))?;
        let numd = (len.div_ceil(4) - 1) as u32;
        let mut c = SqEntry::new(admin_op::GET_LOG_PAGE, nsid);
        c.cdw10 = lid as u32 | ((numd & 0xffff) << 16);
        c.cdw11 = numd >> 16;
        self.shared.admin.admin_cmd(c, Some(&buf), "Get Log Page")?;
        let mut v = vec![0; len];
        buf.read_bytes(0, &mut v);
        Ok(v)
    }

    /// The SMART / health information log.
    pub fn smart_log(&self) -> Result<SmartLog> {
        let data = self.get_log_page(log_page::SMART, 0xffff_ffff, 512)?;
        SmartLog::parse(&data).map_err(|source| Error::Identify {
            dev: self.name().to_string(),
            source,
        })
    }

    /// The error information log (as many entries as the controller keeps).
    pub fn error_log(&self) -> Result<Vec<ErrorLogEntry>> {
        let entries = self.shared.info.elpe as usize + 1;
        let data = self.get_log_page(log_page::ERROR, 0, entries.min(256) * 64)?;
        Ok(crate::identify::parse_error_log(&data))
    }

    /// Reset the controller (disable, enable, admin queue again): every I/O queue pair then
    /// hands back its outstanding commands as cancelled and creates its queues again at its
    /// next health check.
    pub fn reset(&self) -> Result<()> {
        let seen = self.shared.generation.load(Ordering::Acquire);
        self.shared
            .reset(seen, "requested by the application")
            .map(|_| ())
    }

    /// Controller resets so far.
    pub fn resets(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Ask the controller to abort command `cid` on submission queue `sqid`. Returns true if
    /// the controller says it aborted it.
    pub fn abort(&self, sqid: u16, cid: u16) -> Result<bool> {
        let mut c = SqEntry::new(admin_op::ABORT, 0);
        c.cdw10 = sqid as u32 | ((cid as u32) << 16);
        let dw0 = self.shared.admin.admin_cmd(c, None, "Abort")?;
        Ok(dw0 & 1 == 0)
    }
}

/// Set Features feature identifier of the Host Memory Buffer.
const FEATURE_HOST_MEMORY_BUFFER: u32 = 0x0d;

/// Whether admin command `cmd` makes the controller use host memory after it completes.
fn keeps_memory(cmd: &SqEntry) -> bool {
    match cmd.opcode() {
        admin_op::CREATE_IO_SQ | admin_op::CREATE_IO_CQ | admin_op::DOORBELL_BUFFER_CONFIG => true,
        admin_op::SET_FEATURES => cmd.cdw10 & 0xff == FEATURE_HOST_MEMORY_BUFFER,
        _ => false,
    }
}

impl Admin {
    fn lock(&self) -> MutexGuard<'_, QueuePair> {
        self.qp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `cmd` with `data`; its data and metadata pointers are the queue pair's (see
    /// [`QueuePair::submit`]).
    pub(crate) fn admin_cmd(
        &self,
        cmd: SqEntry,
        data: Option<&DmaBuffer>,
        what: &'static str,
    ) -> Result<u32> {
        self.run(cmd, data, false, what)
    }

    /// Run `cmd` with the data pointer it carries: for the commands that hand the controller
    /// queue rings and doorbell pages (see [`QueuePair::submit_raw`]).
    fn admin_cmd_raw(&self, cmd: SqEntry, what: &'static str) -> Result<u32> {
        self.run(cmd, None, true, what)
    }

    fn run(
        &self,
        cmd: SqEntry,
        data: Option<&DmaBuffer>,
        raw: bool,
        what: &'static str,
    ) -> Result<u32> {
        let seg;
        let segs: &[DmaSlice<'_>] = match data {
            Some(b) => {
                seg = [b.segment()];
                &seg
            }
            None => &[],
        };
        let mut q = self.lock();
        let cid = if raw {
            q.submit_raw(cmd, 0)?
        } else {
            q.submit(cmd, segs, 0)?
        };
        q.ring();
        let timeout = self.timeout;
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            let mut done = None;
            q.poll(usize::MAX, |c| {
                if c.cid == cid {
                    done = Some(c)
                }
            });
            if let Some(c) = done {
                return c.result().map_err(|status| Error::Command {
                    dev: self.hw.name().to_string(),
                    command: what,
                    status,
                });
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                let s = self.hw.read32(reg::CSTS);
                if s == u32::MAX {
                    return Err(Error::DeviceRemoved {
                        dev: self.hw.name().to_string(),
                    });
                }
                if s & csts::CFS != 0 {
                    return Err(Error::ControllerFatal {
                        dev: self.hw.name().to_string(),
                        during: what,
                    });
                }
                if Instant::now() >= deadline {
                    return Err(Error::CommandTimeout {
                        dev: self.hw.name().to_string(),
                        command: what,
                        ms: timeout.as_millis() as u64,
                    });
                }
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn identify(&self, cns: u32, nsid: u32, what: &'static str) -> Result<Vec<u8>> {
        let buf = self.pool.alloc(PAGE_SIZE)?;
        let mut c = SqEntry::new(admin_op::IDENTIFY, nsid);
        c.cdw10 = cns;
        self.admin_cmd(c, Some(&buf), what)?;
        Ok(buf.to_vec())
    }

    fn identify_controller(&self) -> Result<ControllerInfo> {
        let data = self.identify(cns::CONTROLLER, 0, "Identify Controller")?;
        ControllerInfo::parse(&data).map_err(|source| Error::Identify {
            dev: self.hw.name().to_string(),
            source,
        })
    }

    fn identify_namespace(&self, nsid: u32) -> Result<NamespaceInfo> {
        let data = self.identify(cns::NAMESPACE, nsid, "Identify Namespace")?;
        NamespaceInfo::parse(nsid, &data).map_err(|source| Error::Identify {
            dev: self.hw.name().to_string(),
            source,
        })
    }

    fn active_namespace_ids(&self) -> Result<Vec<u32>> {
        let data = self.identify(cns::ACTIVE_NAMESPACES, 0, "Identify Active Namespace List")?;
        Ok(crate::identify::parse_active_namespace_list(&data))
    }

    pub(crate) fn set_features(
        &self,
        fid: u8,
        cdw11: u32,
        data: Option<&DmaBuffer>,
    ) -> Result<u32> {
        let mut c = SqEntry::new(admin_op::SET_FEATURES, 0);
        c.cdw10 = fid as u32;
        c.cdw11 = cdw11;
        self.admin_cmd(c, data, "Set Features")
    }
}

impl Shared {
    pub(crate) fn namespace(&self, nsid: u32) -> Option<&NamespaceInfo> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    pub(crate) fn namespaces(&self) -> &[NamespaceInfo] {
        &self.namespaces
    }

    pub(crate) fn active_list(&self) -> String {
        self.namespaces
            .iter()
            .map(|n| n.nsid.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Take a free I/O queue id.
    pub(crate) fn take_qid(&self) -> Result<u16> {
        let mut q = self.qids_in_use.lock().unwrap_or_else(|e| e.into_inner());
        let qid = (1..q.len()).find(|&i| !q[i]).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: all {} I/O queue pairs the controller granted are in use",
                self.hw.name(),
                self.io_queues_granted
            ))
        })?;
        q[qid] = true;
        Ok(qid as u16)
    }

    pub(crate) fn release_qid(&self, qid: u16) {
        let mut q = self.qids_in_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = q.get_mut(qid as usize) {
            *s = false;
        }
    }

    pub(crate) fn create_queues(&self, qp: &QueuePair) -> Result<()> {
        let qid = qp.qid() as u32;
        let size = (qp.entries() as u32 - 1) << 16;
        let mut c = SqEntry::new(admin_op::CREATE_IO_CQ, 0);
        c.dptr1 = qp.cq_iova().0;
        c.cdw10 = qid | ((qp.cq_entries() as u32 - 1) << 16);
        c.cdw11 = 1; // physically contiguous, interrupts off
        self.admin.admin_cmd_raw(c, "Create I/O Completion Queue")?;
        let mut c = SqEntry::new(admin_op::CREATE_IO_SQ, 0);
        c.dptr1 = qp.sq_iova().0;
        c.cdw10 = qid | size;
        c.cdw11 = 1 | (qid << 16); // physically contiguous, its CQ
        if let Err(e) = self.admin.admin_cmd_raw(c, "Create I/O Submission Queue") {
            let _ = self.delete_cq(qp.qid());
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn delete_queues(&self, qid: u16) -> Result<()> {
        let mut c = SqEntry::new(admin_op::DELETE_IO_SQ, 0);
        c.cdw10 = qid as u32;
        let sq = self.admin.admin_cmd(c, None, "Delete I/O Submission Queue");
        let cq = self.delete_cq(qid);
        sq.and(cq)
    }

    fn delete_cq(&self, qid: u16) -> Result<()> {
        let mut c = SqEntry::new(admin_op::DELETE_IO_CQ, 0);
        c.cdw10 = qid as u32;
        self.admin
            .admin_cmd(c, None, "Delete I/O Completion Queue")
            .map(|_| ())
    }

    /// Largest transfer for a namespace: MDTS, the 65 536-LBA NLB limit, our list bound.
    pub(crate) fn max_transfer_for(&self, lba_size: u32) -> u32 {
        (self.max_transfer as u64).min(MAX_NLB as u64 * lba_size as u64) as u32
    }

    fn shutdown(&self) {
        let hw = self.hw.as_ref();
        let c = hw.read32(reg::CC);
        if c == u32::MAX || c & cc::EN == 0 {
            return;
        }
        hw.write32(reg::CC, (c & !cc::SHN_MASK) | cc::SHN_NORMAL);
        let ms = self.cap.timeout_ms().max(2000);
        if let Err(e) = wait_register(hw, "shutdown to complete (CSTS.SHST = 2)", ms, false, |v| {
            v & csts::SHST_MASK == csts::SHST_COMPLETE
        }) {
            log::warn!("{e}");
        }
    }
}

impl Recovery for Shared {
    fn abort(&self, sqid: u16, cid: u16) -> Option<bool> {
        let mut c = SqEntry::new(admin_op::ABORT, 0);
        c.cdw10 = sqid as u32 | ((cid as u32) << 16);
        match self.admin.admin_cmd(c, None, "Abort") {
            Ok(dw0) => Some(dw0 & 1 == 0),
            Err(e) => {
                log::warn!("{e}");
                None
            }
        }
    }

    fn reset(&self, seen: u64, why: &str) -> Result<u64> {
        let _one = self.reset_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.generation.load(Ordering::Acquire);
        if current != seen {
            return Ok(current);
        }
        let hw = self.hw.as_ref();
        log::warn!("{}: resetting the controller: {why}", hw.name());
        if hw.read32(reg::CSTS) == u32::MAX {
            return Err(Error::DeviceRemoved {
                dev: hw.name().to_string(),
            });
        }
        self.stop("a reset")?;
        let (aqa, asq, acq) = {
            let mut q = self.admin.lock();
            // Stopped: nothing the admin queue had outstanding can still touch memory.
            q.abandon_all(true);
            let a = (q.entries() - 1) as u32;
            (a | (a << 16), q.sq_iova().0, q.cq_iova().0)
        };
        let enable = || {
            hw.write32(reg::AQA, aqa);
            hw.write64(reg::ASQ, asq);
            hw.write64(reg::ACQ, acq);
            hw.write32(reg::INTMS, u32::MAX);
            hw.write32(reg::CC, cc::mps(0) | cc::IOSQES_64 | cc::IOCQES_16 | cc::EN);
        };
        enable();
        wait_register(
            hw,
            "the controller to become ready (CSTS.RDY = 1) after a reset",
            self.cap.timeout_ms().max(500),
            true,
            |v| {
                if v & csts::RDY != 0 {
                    return true;
                }
                // CC.EN reading back clear means the writes were lost: the function was
                // still being reset by someone else (its registers read as zero meanwhile).
                if hw.read32(reg::CC) & cc::EN == 0 {
                    enable();
                }
                false
            },
        )?;
        let want = (self.io_queues_granted - 1) as u32;
        self.admin
            .set_features(feature::NUMBER_OF_QUEUES, want | (want << 16), None)?;
        self.configure_dbbuf();
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        log::warn!("{}: controller reset done (reset #{g})", hw.name());
        Ok(g)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn recreate(&self, qp: &QueuePair) -> Result<()> {
        self.create_queues(qp)
    }

    fn quiesces(&self) -> u64 {
        self.quiesces.load(Ordering::Acquire)
    }

    fn shadow(&self, qid: u16) -> Option<Shadow> {
        if !self.dbbuf_on.load(Ordering::Acquire) {
            return None;
        }
        let (dbs, eis) = self.dbbuf.as_ref()?;
        Some(Shadow::new(dbs.clone(), eis.clone(), qid, self.cap.dstrd()))
    }
}

impl Shared {
    /// Give the controller the shadow doorbell pages (after every enable: a reset forgets
    /// them), and the admin queue its shadow doorbells. Without them, or if the controller
    /// refuses, everything rings MMIO doorbells.
    fn configure_dbbuf(&self) {
        self.dbbuf_on.store(false, Ordering::Release);
        let Some((dbs, eis)) = &self.dbbuf else {
            return;
        };
        let admin_shadow = Shadow::new(dbs.clone(), eis.clone(), 0, self.cap.dstrd());
        {
            let mut q = self.admin.lock();
            // The admin queue always rings MMIO too (controllers differ on whether its
            // doorbells are shadowed), and keeps the shadow current for those that read it.
            q.set_always_mmio();
            q.set_shadow(Some(admin_shadow));
        }
        let mut c = SqEntry::new(admin_op::DOORBELL_BUFFER_CONFIG, 0);
        c.dptr1 = dbs.iova().0;
        c.dptr2 = eis.iova().0;
        match self.admin.admin_cmd_raw(c, "Doorbell Buffer Config") {
            Ok(_) => self.dbbuf_on.store(true, Ordering::Release),
            Err(e) => {
                log::warn!("{}: shadow doorbells not used: {e}", self.hw.name());
                self.admin.lock().set_shadow(None);
            }
        }
    }

    /// Stop the controller: disable it and wait for CSTS.RDY = 0; if it does not get there,
    /// reset the PCI function. Either way, once this returns `Ok` no command of before can
    /// still touch memory, and [`Recovery::quiesces`] says so.
    fn stop(&self, during: &str) -> Result<()> {
        let hw = self.hw.as_ref();
        let disabled = disable(hw, self.cap);
        let result = match disabled {
            Ok(()) => Ok(()),
            Err(Error::DeviceRemoved { dev }) => Err(Error::DeviceRemoved { dev }),
            Err(e) => {
                log::error!("{}: {e}: trying a function level reset", hw.name());
                match hw.function_reset() {
                    Ok(()) => disable(hw, self.cap),
                    Err(flr) => Err(Error::ControllerStuck {
                        dev: hw.name().to_string(),
                        during: during.to_string(),
                        why: format!("{e}; {flr}"),
                    }),
                }
            }
        };
        if result.is_ok() {
            self.quiesces.fetch_add(1, Ordering::AcqRel);
        }
        result
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown();
        // Stop it too: only then is the admin queue's memory surely out of the controller's
        // hands (a removed device never is).
        let removed = self.hw.read32(reg::CSTS) == u32::MAX;
        let stopped = !removed && self.stop("closing the controller").is_ok();
        if !stopped {
            log::warn!(
                "{}: the controller could not be stopped while closing it",
                self.hw.name()
            );
        }
        self.admin.lock().retire(stopped, stopped);
        if !stopped {
            if let Some((dbs, eis)) = &self.dbbuf {
                dbs.quarantine();
                eis.quarantine();
            }
        }
    }
}
