//! What a controller's handles and its queue pairs share: the admin queue pair and its
//! commands, the controller's identity and limits, queue ids, the reset generation, and the
//! recovery (reset, disable) the queue pairs call on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dma::DmaSlice;
use crate::dma::{Backing, DmaBuffer, DmaPool, DmaWords};
use crate::error::{Error, Result};
use crate::hw::Hardware;
use crate::identify::{ControllerInfo, NamespaceInfo};
use crate::irq::Interrupt;
use crate::queue::{DataPointerMode, QueuePair, Recovery, Shadow};
use crate::spec::{admin_op, cc, cns, csts, feature, reg, Cap, SqEntry, MAX_NLB, PAGE_SIZE};
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
    /// Interrupt Coalescing (Set Features 08h) for queue pairs that wait on interrupts: set at
    /// bring-up and after every reset when given. Off by default (one interrupt per batch of
    /// completions the controller posts).
    pub interrupt_coalescing: Option<Coalescing>,
}

/// Interrupt Coalescing: the controller may hold an interrupt back until `threshold + 1`
/// completions are waiting or `time_100us` × 100 µs have passed since the first.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Coalescing {
    /// Aggregation threshold, 0-based (0: an interrupt per completion).
    pub threshold: u8,
    /// Aggregation time in 100 µs units (0: no delay).
    pub time_100us: u8,
}

impl Coalescing {
    /// The Set Features dword 11 of feature 08h.
    pub fn cdw11(self) -> u32 {
        self.threshold as u32 | (self.time_100us as u32) << 8
    }
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
            interrupt_coalescing: None,
        }
    }
}

/// The admin queue pair and the commands that run on it.
pub(crate) struct Admin {
    pub(crate) hw: Arc<dyn Hardware>,
    pub(crate) pool: DmaPool,
    pub(crate) qp: Mutex<QueuePair>,
    pub(crate) timeout: Duration,
}

pub(crate) struct Shared {
    pub(crate) hw: Arc<dyn Hardware>,
    pub(crate) pool: DmaPool,
    pub(crate) cap: Cap,
    pub(crate) admin: Admin,
    pub(crate) info: ControllerInfo,
    pub(crate) namespaces: Vec<NamespaceInfo>,
    pub(crate) io_queues_granted: u16,
    pub(crate) qids_in_use: Mutex<Vec<bool>>,
    pub(crate) max_transfer: u32,
    pub(crate) options: ControllerOptions,
    /// Bumped by every controller reset; queue pairs compare it with their own (at every
    /// submission: they hold the counter itself).
    pub(crate) generation: Arc<AtomicU64>,
    /// Bumped every time the controller was seen stopped (CSTS.RDY = 0 after disabling it,
    /// or a function level reset): see [`Recovery::quiesces`].
    pub(crate) quiesces: AtomicU64,
    /// One reset at a time.
    pub(crate) reset_lock: Mutex<()>,
    /// The shadow doorbell and event index pages, when the controller offers them and they
    /// are wanted. Lent to the controller while it is enabled.
    pub(crate) dbbuf: Option<(Arc<DmaWords>, Arc<DmaWords>)>,
    /// Whether the controller took them (Doorbell Buffer Config succeeded since its last
    /// enable).
    pub(crate) dbbuf_on: AtomicBool,
    /// MSI-X vectors by queue id (vector `n` for queue `n`, 0 the admin queue's), enabled
    /// when the first queue pair that waits on interrupts is created; then kept until the
    /// device is closed.
    pub(crate) interrupts: Mutex<Option<Vec<Arc<Interrupt>>>>,
}

/// Poll `cond` until it holds, failing after `ms` milliseconds; CSTS.CFS and a removed
/// device end the wait early.
pub(crate) fn wait_register(
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
pub(crate) fn disable(hw: &dyn Hardware, cap: Cap) -> Result<()> {
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

/// Set Features feature identifier of the Host Memory Buffer.
const FEATURE_HOST_MEMORY_BUFFER: u32 = 0x0d;

/// Whether admin command `cmd` makes the controller use host memory after it completes.
pub(crate) fn keeps_memory(cmd: &SqEntry) -> bool {
    match cmd.opcode() {
        admin_op::CREATE_IO_SQ | admin_op::CREATE_IO_CQ | admin_op::DOORBELL_BUFFER_CONFIG => true,
        admin_op::SET_FEATURES => cmd.cdw10 & 0xff == FEATURE_HOST_MEMORY_BUFFER,
        _ => false,
    }
}

impl Admin {
    pub(crate) fn lock(&self) -> MutexGuard<'_, QueuePair> {
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
    pub(crate) fn admin_cmd_raw(&self, cmd: SqEntry, what: &'static str) -> Result<u32> {
        self.run(cmd, None, true, what)
    }

    pub(crate) fn run(
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

    pub(crate) fn identify(&self, cns: u32, nsid: u32, what: &'static str) -> Result<Vec<u8>> {
        let buf = self.pool.alloc(PAGE_SIZE)?;
        let mut c = SqEntry::new(admin_op::IDENTIFY, nsid);
        c.cdw10 = cns;
        self.admin_cmd(c, Some(&buf), what)?;
        Ok(buf.to_vec())
    }

    pub(crate) fn identify_controller(&self) -> Result<ControllerInfo> {
        let data = self.identify(cns::CONTROLLER, 0, "Identify Controller")?;
        ControllerInfo::parse(&data).map_err(|source| Error::Identify {
            dev: self.hw.name().to_string(),
            source,
        })
    }

    pub(crate) fn identify_namespace(&self, nsid: u32) -> Result<NamespaceInfo> {
        let data = self.identify(cns::NAMESPACE, nsid, "Identify Namespace")?;
        NamespaceInfo::parse(nsid, &data).map_err(|source| Error::Identify {
            dev: self.hw.name().to_string(),
            source,
        })
    }

    pub(crate) fn active_namespace_ids(&self) -> Result<Vec<u32>> {
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

    /// The interrupt vector of queue `qid`, enabling MSI-X on the device the first time.
    /// Every I/O queue gets a vector of its own (a shared eventfd would let one waiter consume
    /// another's wake-up): a queue id beyond the device's vectors is refused.
    pub(crate) fn interrupt_for(&self, qid: u16) -> Result<Arc<Interrupt>> {
        let dev = || self.hw.name().to_string();
        let mut v = self.interrupts.lock().unwrap_or_else(|e| e.into_inner());
        if v.is_none() {
            let offered = self.hw.interrupt_vectors();
            if offered < 2 {
                return Err(Error::Unsupported {
                    dev: dev(),
                    why: format!(
                        "no MSI-X vectors for I/O queues (the device offers {offered}): use \
                         polled queue pairs"
                    ),
                });
            }
            let n = offered.min(self.io_queues_granted as u32 + 1) as u16;
            let hw = Arc::downgrade(&self.hw);
            let made = (0..n)
                .map(|v| Interrupt::new(v, Some(hw.clone())))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| Error::InvalidArgument(format!("{}: eventfd: {e}", dev())))?;
            // Coalescing first: a controller that refuses it leaves interrupts off.
            if let Some(c) = self.options.interrupt_coalescing {
                self.set_coalescing(c)?;
            }
            let fds: Vec<_> = made.iter().map(|i| i.eventfd()).collect();
            self.hw.enable_interrupts(&fds)?;
            log::info!("{}: MSI-X enabled with {n} vectors", dev());
            *v = Some(made.into_iter().map(Arc::new).collect());
        }
        let vectors = v.as_ref().expect("set above");
        vectors
            .get(qid as usize)
            .cloned()
            .ok_or_else(|| Error::Unsupported {
                dev: dev(),
                why: format!(
                    "queue {qid} has no interrupt vector of its own: the device offers {} MSI-X \
                 vectors (one is the admin queue's)",
                    vectors.len()
                ),
            })
    }

    /// Set Interrupt Coalescing (feature 08h).
    pub(crate) fn set_coalescing(&self, c: Coalescing) -> Result<()> {
        self.admin
            .set_features(feature::INTERRUPT_COALESCING, c.cdw11(), None)
            .map(|_| ())
    }

    pub(crate) fn create_queues(&self, qp: &QueuePair) -> Result<()> {
        let qid = qp.qid() as u32;
        let size = (qp.entries() as u32 - 1) << 16;
        let mut c = SqEntry::new(admin_op::CREATE_IO_CQ, 0);
        c.dptr1 = qp.cq_iova().0;
        c.cdw10 = qid | ((qp.cq_entries() as u32 - 1) << 16);
        // Physically contiguous; interrupts enabled (IEN) on the queue's vector (IV) when the
        // queue pair waits on them.
        c.cdw11 = match qp.interrupt() {
            Some(irq) => 1 | 1 << 1 | (irq.vector() as u32) << 16,
            None => 1,
        };
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

    pub(crate) fn delete_cq(&self, qid: u16) -> Result<()> {
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

    pub(crate) fn shutdown(&self) {
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
        let irqs = self.interrupts.lock().map(|v| v.is_some()).unwrap_or(false);
        if let (true, Some(c)) = (irqs, self.options.interrupt_coalescing) {
            if let Err(e) = self.set_coalescing(c) {
                log::warn!("{}: interrupt coalescing after the reset: {e}", hw.name());
            }
        }
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
    pub(crate) fn configure_dbbuf(&self) {
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
    pub(crate) fn stop(&self, during: &str) -> Result<()> {
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
