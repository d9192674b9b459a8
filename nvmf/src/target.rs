//! What a target exports (subsystems of namespaces on devices), the fabric controllers hosts
//! created, and the admin commands of those controllers: Identify, logs, features, the
//! discovery log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use rnvme_driver::controller::Controller;
use rnvme_driver::spec::{admin_op as dev_admin, SqEntry};
use rnvme_driver::NvmeStatus;

use crate::cmd::{status, Sqe};

/// The well-known NQN of discovery controllers.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// A namespace a subsystem exports: namespace `dev_nsid` of device `dev`, seen by hosts as
/// `nsid`.
#[derive(Clone, Debug)]
pub struct Namespace {
    pub nsid: u32,
    /// Index into [`Target::devices`].
    pub dev: usize,
    pub dev_nsid: u32,
    pub lba_size: u32,
    pub blocks: u64,
}

/// A subsystem: an NQN, its namespaces, who may connect, and whether writes are refused.
#[derive(Clone, Debug)]
pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub namespaces: Vec<Namespace>,
    /// Host NQNs allowed to connect; empty: any host.
    pub allowed_hosts: Vec<String>,
    pub read_only: bool,
}

impl Subsystem {
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    pub fn allows(&self, hostnqn: &str) -> bool {
        self.allowed_hosts.is_empty() || self.allowed_hosts.iter().any(|h| h == hostnqn)
    }
}

/// Limits the target advertises and enforces.
#[derive(Copy, Clone, Debug)]
pub struct Limits {
    /// In-capsule data bytes of an I/O command capsule (IOCCSZ less the command).
    pub in_capsule: u32,
    /// MAXH2CDATA: most data bytes per H2CData PDU.
    pub max_h2c_data: u32,
    /// Entries of an I/O queue (MAXCMD, CAP.MQES + 1).
    pub queue_entries: u16,
    /// I/O queues a controller may have.
    pub max_io_queues: u16,
    /// Largest transfer of one command, bytes (a power of two, at least 4 KiB).
    pub max_transfer: u32,
    /// A connection that has not connected a queue by then is closed (milliseconds).
    pub connect_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            in_capsule: 8192,
            max_h2c_data: 128 * 1024,
            queue_entries: 128,
            max_io_queues: 64,
            max_transfer: 128 * 1024,
            connect_timeout_ms: 10_000,
        }
    }
}

/// In-capsule data of admin commands (the Connect's 1024 bytes and more).
pub const ADMIN_IN_CAPSULE: u32 = 8192;
/// Entries of an admin queue the target accepts at most.
pub const ADMIN_QUEUE_ENTRIES: u16 = 128;
/// Asynchronous Event Requests a controller holds at most (AERL + 1).
pub const AER_MAX: usize = 4;

/// A fabric controller a host created with an admin-queue Connect, as its queues see it.
#[derive(Debug)]
pub struct FabricCtrl {
    pub cntlid: u16,
    /// Index into [`Target::subsystems`].
    pub subsys: usize,
    pub hostnqn: String,
    pub discovery: bool,
    /// I/O queues granted by Set Features (Number of Queues).
    pub io_queues: AtomicU16,
    /// Set when the admin queue's connection ended: the I/O queues end too.
    pub dead: AtomicBool,
    /// I/O queues connected.
    pub queues: Mutex<Vec<u16>>,
}

/// The target: devices, subsystems, limits, listeners, and the controllers hosts made.
pub struct Target {
    pub devices: Vec<Arc<Controller>>,
    pub subsystems: Vec<Subsystem>,
    pub limits: Limits,
    /// The addresses listened on (for the discovery log).
    pub listen: Mutex<Vec<SocketAddr>>,
    ctrls: Mutex<BTreeMap<u16, Arc<FabricCtrl>>>,
    next_cntlid: Mutex<u16>,
    /// Discovery log generation.
    genctr: u64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("subsystems", &self.subsystems)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Why a Connect is refused: the status, and DW0 (the offending parameter).
pub type Refusal = (NvmeStatus, u32);

impl Target {
    pub fn new(
        devices: Vec<Arc<Controller>>,
        subsystems: Vec<Subsystem>,
        limits: Limits,
    ) -> Target {
        Target {
            devices,
            subsystems,
            limits,
            listen: Mutex::new(Vec::new()),
            ctrls: Mutex::new(BTreeMap::new()),
            next_cntlid: Mutex::new(1),
            genctr: 1,
        }
    }

    /// A new controller for `hostnqn` on subsystem `subsys` (None: the discovery controller).
    pub fn create_ctrl(
        &self,
        subsys: Option<usize>,
        hostnqn: &str,
    ) -> Result<Arc<FabricCtrl>, Refusal> {
        let mut ctrls = self.ctrls.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = self.next_cntlid.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..0xffef {
            let id = *next;
            *next = if id >= 0xffef { 1 } else { id + 1 };
            if ctrls.contains_key(&id) {
                continue;
            }
            let c = Arc::new(FabricCtrl {
                cntlid: id,
                subsys: subsys.unwrap_or(usize::MAX),
                hostnqn: hostnqn.to_string(),
                discovery: subsys.is_none(),
                io_queues: AtomicU16::new(0),
                dead: AtomicBool::new(false),
                queues: Mutex::new(Vec::new()),
            });
            ctrls.insert(id, c.clone());
            return Ok(c);
        }
        Err((status::CONNECT_CONTROLLER_BUSY, 0))
    }

    /// Ends controller `cntlid`: its I/O queues see `dead` and close.
    pub fn remove_ctrl(&self, cntlid: u16) {
        if let Some(c) = self
            .ctrls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cntlid)
        {
            c.dead.store(true, Ordering::Release);
        }
    }

    /// Controllers alive now.
    pub fn ctrl_count(&self) -> usize {
        self.ctrls.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Attaches I/O queue `qid` to controller `cntlid` of `subsys` made by `hostnqn`.
    pub fn attach_io_queue(
        &self,
        cntlid: u16,
        subsys: usize,
        hostnqn: &str,
        qid: u16,
    ) -> Result<Arc<FabricCtrl>, Refusal> {
        use crate::cmd::{connect_at, invalid_parameter};
        let ctrls = self.ctrls.lock().unwrap_or_else(|e| e.into_inner());
        let c = ctrls
            .get(&cntlid)
            .filter(|c| c.subsys == subsys && c.hostnqn == hostnqn && !c.discovery)
            .ok_or((
                status::CONNECT_INVALID_PARAMETERS,
                invalid_parameter(true, connect_at::CNTLID),
            ))?;
        let granted = c.io_queues.load(Ordering::Acquire);
        let mut queues = c.queues.lock().unwrap_or_else(|e| e.into_inner());
        if qid == 0 || qid > granted || queues.contains(&qid) {
            return Err((
                status::CONNECT_INVALID_PARAMETERS,
                invalid_parameter(false, connect_at::QID),
            ));
        }
        queues.push(qid);
        Ok(c.clone())
    }

    /// Detaches I/O queue `qid` of `ctrl` (its connection ended).
    pub fn detach_io_queue(&self, ctrl: &FabricCtrl, qid: u16) {
        ctrl.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|q| *q != qid);
    }

    /// Index of the subsystem named `nqn`.
    pub fn subsystem_index(&self, nqn: &str) -> Option<usize> {
        self.subsystems.iter().position(|s| s.nqn == nqn)
    }

    /// MDTS of the fabric controllers, in 4 KiB units as a power of two.
    fn mdts(&self) -> u8 {
        (self.limits.max_transfer / 4096).max(1).trailing_zeros() as u8
    }

    /// Identify Controller data of `ctrl`.
    pub fn identify_ctrl(&self, ctrl: &FabricCtrl) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        let put = |d: &mut Vec<u8>, at: usize, s: &str, len: usize| {
            let mut f = vec![b' '; len];
            let b = s.as_bytes();
            f[..b.len().min(len)].copy_from_slice(&b[..b.len().min(len)]);
            d[at..at + len].copy_from_slice(&f);
        };
        let (nqn, serial) = if ctrl.discovery {
            (DISCOVERY_NQN.to_string(), "rnvme-discovery".to_string())
        } else {
            let s = &self.subsystems[ctrl.subsys];
            (s.nqn.clone(), s.serial.clone())
        };
        // VID/SSVID: none (fabrics).
        put(&mut d, 4, &serial, 20);
        put(&mut d, 24, "rnvme serve", 40);
        put(&mut d, 64, env!("CARGO_PKG_VERSION"), 8);
        d[72] = 6; // RAB
        d[76] = 1 << 1; // CMIC: more than one controller may exist in the subsystem
        d[77] = self.mdts();
        d[78..80].copy_from_slice(&ctrl.cntlid.to_le_bytes());
        d[80..84].copy_from_slice(&0x0001_0300u32.to_le_bytes()); // VER 1.3
        d[111] = if ctrl.discovery { 2 } else { 1 }; // CNTRLTYPE
        d[258] = 3; // ACL
        d[259] = (AER_MAX - 1) as u8; // AERL
        d[261] = 1 << 2; // LPA: extended data for Get Log Page
        d[262] = 63; // ELPE
        d[320..322].copy_from_slice(&10u16.to_le_bytes()); // KAS: 1 s granularity
        d[512] = 0x66; // SQES
        d[513] = 0x44; // CQES
        d[514..516].copy_from_slice(&self.limits.queue_entries.to_le_bytes()); // MAXCMD
        if !ctrl.discovery {
            let s = &self.subsystems[ctrl.subsys];
            let nn = s.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0);
            d[516..520].copy_from_slice(&nn.to_le_bytes());
            // ONCS and VWC: what every device of the subsystem has.
            let mut oncs: u16 = (1 << 0) | (1 << 2) | (1 << 3); // compare, DSM, write zeroes
            let mut vwc = 0u8;
            for n in &s.namespaces {
                let info = self.devices[n.dev].info();
                oncs &= info.oncs;
                vwc |= info.vwc & 1;
            }
            d[520..522].copy_from_slice(&oncs.to_le_bytes());
            d[525] = vwc;
        }
        // SGLS: SGLs supported, and offsets into the capsule.
        d[536..540].copy_from_slice(&(1u32 | 1 << 20).to_le_bytes());
        put(&mut d, 768, &nqn, 256);
        for b in &mut d[768 + nqn.len()..1024] {
            *b = 0;
        }
        let ioccsz = (64 + self.limits.in_capsule) / 16;
        d[1792..1796].copy_from_slice(&ioccsz.to_le_bytes());
        d[1796..1800].copy_from_slice(&1u32.to_le_bytes()); // IORCSZ
        d[1803] = 1; // MSDBD
        d
    }

    /// The discovery log page for `hostnqn`: one entry per subsystem it may connect to, per
    /// listening address.
    pub fn discovery_log(&self, hostnqn: &str) -> Vec<u8> {
        let listen = self
            .listen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut entries = Vec::new();
        for s in self.subsystems.iter().filter(|s| s.allows(hostnqn)) {
            for a in &listen {
                let mut e = vec![0u8; 1024];
                e[0] = 3; // TRTYPE: TCP
                e[1] = if a.is_ipv4() { 1 } else { 2 }; // ADRFAM
                e[2] = 2; // SUBTYPE: NVM subsystem
                e[3] = 0; // TREQ: not specified
                e[4..6].copy_from_slice(&1u16.to_le_bytes()); // PORTID
                e[6..8].copy_from_slice(&0xffffu16.to_le_bytes()); // CNTLID: dynamic
                e[8..10].copy_from_slice(&(ADMIN_QUEUE_ENTRIES).to_le_bytes()); // ASQSZ
                let pad = |e: &mut Vec<u8>, at: usize, s: &str, len: usize| {
                    let b = s.as_bytes();
                    let n = b.len().min(len);
                    e[at..at + len].fill(b' ');
                    e[at..at + n].copy_from_slice(&b[..n]);
                };
                pad(&mut e, 32, &a.port().to_string(), 32);
                let n = s.nqn.len().min(256);
                e[256..256 + n].copy_from_slice(&s.nqn.as_bytes()[..n]);
                pad(&mut e, 512, &a.ip().to_string(), 256);
                // TSAS: no security.
                entries.push(e);
            }
        }
        let mut d = vec![0u8; 1024];
        d[0..8].copy_from_slice(&self.genctr.to_le_bytes());
        d[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        for e in entries {
            d.extend_from_slice(&e);
        }
        d
    }

    /// Identify data of namespace `nsid` of subsystem `subsys` for CNS 0 (namespace) and 3
    /// (identification descriptors): the device's own, read now.
    pub fn identify_ns(&self, subsys: usize, nsid: u32, cns: u8) -> Result<Vec<u8>, NvmeStatus> {
        let s = &self.subsystems[subsys];
        let Some(ns) = s.namespace(nsid) else {
            return if nsid == 0 || nsid == u32::MAX {
                Err(status::INVALID_NAMESPACE)
            } else {
                // An inactive namespace: zeroes.
                Ok(vec![0; 4096])
            };
        };
        let dev = &self.devices[ns.dev];
        let buf = dev.alloc(4096).map_err(|_| status::TRANSIENT)?;
        let mut c = SqEntry::new(dev_admin::IDENTIFY, ns.dev_nsid);
        c.cdw10 = cns as u32;
        match dev.admin(c, Some(&buf), "Identify for a host") {
            Ok(_) => Ok(buf.to_vec()[..4096].to_vec()),
            // No descriptor list from this device: an empty one.
            Err(_) if cns == 3 => Ok(vec![0; 4096]),
            Err(e) => {
                log::warn!("identify namespace {} of {}: {e}", ns.dev_nsid, dev.name());
                Err(NvmeStatus::INTERNAL_ERROR)
            }
        }
    }

    /// Active namespace IDs of `subsys` above `after`, as Identify CNS 2 returns them.
    pub fn active_ns_list(&self, subsys: usize, after: u32) -> Vec<u8> {
        let mut ids: Vec<u32> = self.subsystems[subsys]
            .namespaces
            .iter()
            .map(|n| n.nsid)
            .filter(|&n| n > after)
            .collect();
        ids.sort_unstable();
        let mut d = vec![0u8; 4096];
        for (i, id) in ids.iter().take(1024).enumerate() {
            d[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
        }
        d
    }

    /// A log page of the device behind `subsys` (error, SMART, firmware slot): `len` bytes
    /// from `offset`.
    pub fn device_log(
        &self,
        subsys: usize,
        lid: u8,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, NvmeStatus> {
        let s = &self.subsystems[subsys];
        let Some(ns) = s.namespaces.first() else {
            return Ok(vec![0; len]);
        };
        let whole = match lid {
            0x01 => 64 * 64,
            0x02 | 0x03 => 512,
            _ => return Err(status::INVALID_LOG_PAGE),
        };
        let dev = &self.devices[ns.dev];
        let page = dev
            .get_log_page(lid, u32::MAX, whole)
            .map_err(|_| NvmeStatus::INTERNAL_ERROR)?;
        Ok(slice_padded(&page, offset, len))
    }
}

/// `len` bytes of `page` from `offset`, zero beyond its end.
pub fn slice_padded(page: &[u8], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let start = offset.min(page.len() as u64) as usize;
    let n = (page.len() - start).min(len);
    out[..n].copy_from_slice(&page[start..start + n]);
    out
}

/// The answer to an admin command: status, DW0, and data for the host.
#[derive(Debug, Default)]
pub struct Answer {
    pub status: Option<NvmeStatus>,
    pub dw0: u32,
    pub dw1: u32,
    pub data: Option<Vec<u8>>,
}

impl Answer {
    pub fn ok(dw0: u32) -> Answer {
        Answer {
            dw0,
            ..Answer::default()
        }
    }

    pub fn data(d: Vec<u8>) -> Answer {
        Answer {
            data: Some(d),
            ..Answer::default()
        }
    }

    pub fn err(s: NvmeStatus) -> Answer {
        Answer {
            status: Some(s),
            ..Answer::default()
        }
    }

    /// A refused command: its status and DW0 (for Connect, the offending parameter).
    pub fn refuse(s: NvmeStatus, dw0: u32) -> Answer {
        Answer {
            status: Some(s),
            dw0,
            ..Answer::default()
        }
    }

    pub fn status(&self) -> NvmeStatus {
        self.status.unwrap_or(NvmeStatus::SUCCESS)
    }
}

/// Get Log Page's log identifier, offset and length in bytes.
pub fn log_page_args(sqe: &Sqe) -> (u8, u64, usize) {
    let lid = (sqe.cdw(10) & 0xff) as u8;
    let numd = ((sqe.cdw(11) & 0xffff) << 16 | sqe.cdw(10) >> 16) as usize + 1;
    let offset = sqe.cdw(12) as u64 | (sqe.cdw(13) as u64) << 32;
    (lid, offset, numd * 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_padded_and_bounded() {
        assert_eq!(slice_padded(&[1, 2, 3], 1, 4), vec![2, 3, 0, 0]);
        assert_eq!(slice_padded(&[1, 2, 3], 10, 2), vec![0, 0]);
        assert_eq!(slice_padded(&[1, 2, 3], u64::MAX, 1), vec![0]);
    }

    #[test]
    fn log_page_arguments() {
        let mut s = Sqe([0; 64]);
        s.0[40..44].copy_from_slice(&(0x70u32 | 255 << 16).to_le_bytes());
        s.0[48..52].copy_from_slice(&1024u32.to_le_bytes());
        assert_eq!(log_page_args(&s), (0x70, 1024, 1024));
    }
}
