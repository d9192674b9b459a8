//! Controller bring-up, admin commands, I/O queue pair creation and clean shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::dma::{DmaBuffer, DmaPool, DmaWords};
use crate::error::{Error, Result};
use crate::hw::Hardware;
use crate::identify::{ControllerInfo, ErrorLogEntry, NamespaceInfo, SglSupport, SmartLog};
use crate::io::IoQueuePair;
use crate::irq::WaitMode;
use crate::queue::{QueuePair, Recovery};
use crate::spec::{admin_op, cc, csts, feature, log_page, reg, Cap, SqEntry, PAGE_SIZE};

use crate::shared::{disable, keeps_memory, wait_register, Admin, Shared};
pub use crate::shared::{Coalescing, ControllerOptions};

/// A controller brought up and ready: identify data, namespaces, admin commands, and a
/// factory of I/O queue pairs. Shared freely between threads; shut down cleanly when the
/// last handle and queue pair are gone.
#[derive(Clone)]
pub struct Controller {
    shared: Arc<Shared>,
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
            interrupts: Mutex::new(None),
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
        self.create_io_qpair_with(entries, WaitMode::Polled)
    }

    /// [`Controller::create_io_qpair`] waiting for completions as `wait` says. A queue pair
    /// that waits on interrupts gets an MSI-X vector of its own (MSI-X is enabled on the
    /// device with the first one); a device without vectors, or with too few, refuses it.
    pub fn create_io_qpair_with(&self, entries: u32, wait: WaitMode) -> Result<IoQueuePair> {
        IoQueuePair::create(
            self.shared.clone(),
            entries,
            self.shared.options.data_pointer,
            wait,
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
