//! Admin commands of the model (Base spec §5): Identify, Get/Set Features, queue creation and
//! deletion, Get Log Page, Abort and Asynchronous Event Request.

use super::queues::{Completion, Cq, Sq};
use super::{bad, Failure, Inner, Outcome, AER_LIMIT, ERROR_LOG_ENTRIES, VERSION};
use crate::spec::{admin_op, cns, feature, log_page, SqEntry};
use crate::status::sct;
use crate::NvmeStatus;
use log::debug;

/// Size of Identify data structures.
const IDENTIFY_LEN: usize = 4096;
/// Largest Get Log Page transfer when MDTS sets no limit.
const MAX_LOG_TRANSFER: u64 = 16 << 20;
/// PCI vendor of the model's identity (the one QEMU's emulated controller reports).
const VID: u16 = 0x1b36;
/// PCI subsystem vendor.
const SSVID: u16 = 0x1af4;
/// ONCS: Compare, Dataset Management and Write Zeroes.
const ONCS: u16 = 1 | 1 << 2 | 1 << 3;
/// LPA: SMART log per namespace, extended Get Log Page data (NUMDU, offsets).
const LPA: u8 = 1 | 1 << 2;
/// Asynchronous Event Request Limit Exceeded (command specific).
const AER_LIMIT_EXCEEDED: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x05);
/// Feature Identifier Not Saveable (command specific).
const FEATURE_NOT_SAVEABLE: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x0d);
/// Asynchronous Event Request opcode.
const ASYNC_EVENT_REQUEST: u8 = 0x0c;
/// Identify CNS: Namespace Identification Descriptor list.
const CNS_NS_DESCRIPTORS: u32 = 0x03;

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// An ASCII field padded with spaces (non-ASCII characters become '?').
fn put_str(b: &mut [u8], off: usize, len: usize, s: &str) {
    let field = &mut b[off..off + len];
    field.fill(b' ');
    for (dst, ch) in field.iter_mut().zip(s.chars()) {
        *dst = if ch.is_ascii() && !ch.is_ascii_control() {
            ch as u8
        } else {
            b'?'
        };
    }
}

impl Inner {
    pub(super) fn admin(&mut self, e: &SqEntry, c: &Completion) -> Outcome {
        let op = e.opcode();
        self.stats.admin_commands += 1;
        *self.stats.admin_by_opcode.entry(op).or_default() += 1;
        if (e.cdw0 >> 8) & 3 != 0 {
            return Outcome::Complete(bad(
                NvmeStatus::INVALID_FIELD,
                "fused operations are not supported (FUSES = 0)",
            ));
        }
        if e.psdt() != 0 {
            return Outcome::Complete(bad(
                NvmeStatus::INVALID_FIELD,
                "admin commands must use PRPs (PSDT = 0)",
            ));
        }
        Outcome::Complete(match op {
            admin_op::IDENTIFY => self.identify(e),
            admin_op::GET_LOG_PAGE => self.get_log_page(e),
            admin_op::SET_FEATURES => self.set_features(e),
            admin_op::GET_FEATURES => self.get_features(e),
            admin_op::CREATE_IO_CQ => self.create_cq(e),
            admin_op::CREATE_IO_SQ => self.create_sq(e),
            admin_op::DELETE_IO_SQ => self.delete_sq(e),
            admin_op::DELETE_IO_CQ => self.delete_cq(e),
            admin_op::ABORT => self.abort(e),
            admin_op::DOORBELL_BUFFER_CONFIG if self.cfg.shadow_doorbells => {
                self.doorbell_buffer_config(e)
            }
            ASYNC_EVENT_REQUEST => {
                if self.aers.len() >= AER_LIMIT {
                    bad(
                        AER_LIMIT_EXCEEDED,
                        format!("more than {AER_LIMIT} outstanding"),
                    )
                } else {
                    self.aers.push(*c);
                    return Outcome::Parked;
                }
            }
            op => bad(
                NvmeStatus::INVALID_OPCODE,
                format!("admin opcode {op:#04x}"),
            ),
        })
    }

    /// Send `data` (zero-filled to `len` bytes) to the PRPs of `e`.
    fn reply(&mut self, e: &SqEntry, data: &[u8], len: u64) -> Result<u32, Failure> {
        self.map_data(e, len, false)?;
        self.send_to_host(data)?;
        Ok(0)
    }

    // ----- Identify -----

    fn identify(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let cns = e.cdw10 & 0xff;
        let mut b = vec![0u8; IDENTIFY_LEN];
        let nn = self.namespaces.last().map_or(0, |n| n.nsid);
        match cns {
            cns::CONTROLLER => self.identify_controller(&mut b, nn),
            cns::NAMESPACE => {
                if e.nsid == 0 || e.nsid > nn {
                    return bad(
                        NvmeStatus::INVALID_NAMESPACE,
                        format!("Identify Namespace of NSID {:#x} (NN is {nn})", e.nsid),
                    );
                }
                if let Some(i) = self.ns_index(e.nsid) {
                    self.identify_namespace(&mut b, i);
                }
            }
            cns::ACTIVE_NAMESPACES => {
                if e.nsid >= 0xffff_fffe {
                    return bad(
                        NvmeStatus::INVALID_NAMESPACE,
                        format!("active namespace list after NSID {:#x}", e.nsid),
                    );
                }
                let ids = self
                    .namespaces
                    .iter()
                    .map(|n| n.nsid)
                    .filter(|&id| id > e.nsid);
                for (i, id) in ids.take(IDENTIFY_LEN / 4).enumerate() {
                    put(&mut b, i * 4, &id.to_le_bytes());
                }
            }
            CNS_NS_DESCRIPTORS => {
                if self.ns_index(e.nsid).is_none() {
                    return bad(
                        NvmeStatus::INVALID_NAMESPACE,
                        format!("descriptor list of inactive NSID {:#x}", e.nsid),
                    );
                }
                // NIDT 2 (NGUID), NIDL 16.
                put(&mut b, 0, &[2, 16, 0, 0]);
                put(&mut b, 4, &nguid(e.nsid));
            }
            _ => return bad(NvmeStatus::INVALID_FIELD, format!("Identify CNS {cns:#x}")),
        }
        self.reply(e, &b, IDENTIFY_LEN as u64)
    }

    /// Identify Controller (Base spec Figure 275).
    fn identify_controller(&self, b: &mut [u8], nn: u32) {
        let c = &self.cfg;
        put(b, 0, &VID.to_le_bytes());
        put(b, 2, &SSVID.to_le_bytes());
        put_str(b, 4, 20, &c.serial);
        put_str(b, 24, 40, &c.model);
        put_str(b, 64, 8, &c.firmware);
        b[72] = 6; // RAB
        put(b, 73, &[0x00, 0x54, 0x52]); // IEEE OUI
        b[77] = c.mdts;
        put(b, 78, &0u16.to_le_bytes()); // CNTLID
        put(b, 80, &VERSION.to_le_bytes());
        b[111] = 1; // CNTRLTYPE: I/O controller
                    // OACS: Doorbell Buffer Config, when configured; no other optional admin command.
        let oacs: u16 = if c.shadow_doorbells {
            crate::spec::OACS_DOORBELL_BUFFER_CONFIG
        } else {
            0
        };
        put(b, 256, &oacs.to_le_bytes());
        b[258] = 3; // ACL: four concurrent Aborts
        b[259] = (AER_LIMIT - 1) as u8; // AERL
        b[260] = 1 << 1; // FRMW: one slot
        b[261] = LPA;
        b[262] = (ERROR_LOG_ENTRIES - 1) as u8; // ELPE
        put(b, 266, &343u16.to_le_bytes()); // WCTEMP 70 °C
        put(b, 268, &373u16.to_le_bytes()); // CCTEMP 100 °C
        b[512] = 0x66; // SQES
        b[513] = 0x44; // CQES
        put(b, 516, &nn.to_le_bytes());
        put(b, 520, &ONCS.to_le_bytes());
        // VWC: present, and Flush with NSID FFFFFFFFh supported (bits 2:1 = 11b).
        b[525] = if c.vwc { 0x07 } else { 0 };
        let sgls = if c.sgl && c.sgl_dword {
            2u32
        } else {
            c.sgl as u32
        };
        put(b, 536, &sgls.to_le_bytes());
        let nqn = format!("nqn.2024-01.io.rnvme:model:{}", c.serial);
        let n = nqn.len().min(255);
        put(b, 768, &nqn.as_bytes()[..n]);
        put(b, 2048, &2500u16.to_le_bytes()); // PSD0: 25 W
    }

    /// Identify Namespace (NVM Command Set spec Figure 97).
    fn identify_namespace(&self, b: &mut [u8], i: usize) {
        let ns = &self.namespaces[i];
        put(b, 0, &ns.blocks.to_le_bytes()); // NSZE
        put(b, 8, &ns.blocks.to_le_bytes()); // NCAP
        put(b, 16, &ns.blocks.to_le_bytes()); // NUSE
        b[25] = 0; // NLBAF: one format
        b[26] = 0; // FLBAS: format 0, no metadata
        b[33] = 0x09; // DLFEAT: deallocated blocks read as zeros; Write Zeroes may deallocate
        put(b, 104, &nguid(ns.nsid));
        let lbads = ns.lba_size.trailing_zeros();
        put(b, 128, &(lbads << 16).to_le_bytes()); // LBAF0: MS 0, LBADS, RP 0
    }

    // ----- Log pages -----

    fn get_log_page(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let lid = (e.cdw10 & 0xff) as u8;
        let numd = (((e.cdw11 & 0xffff) as u64) << 16 | (e.cdw10 >> 16) as u64) + 1;
        let len = numd * 4;
        let offset = e.cdw12 as u64 | (e.cdw13 as u64) << 32;
        if !offset.is_multiple_of(4) {
            return bad(
                NvmeStatus::INVALID_FIELD,
                format!("log page offset {offset} is not dword aligned"),
            );
        }
        let limit = self.max_transfer().unwrap_or(MAX_LOG_TRANSFER);
        if len > limit {
            return bad(
                NvmeStatus::INVALID_FIELD,
                format!("log page transfer of {len} bytes exceeds {limit}"),
            );
        }
        let log = match lid {
            log_page::ERROR => self.error_log_page(),
            log_page::SMART => self.smart_log_page(e.nsid)?,
            _ => return bad(NvmeStatus::INVALID_LOG_PAGE, format!("log page {lid:#04x}")),
        };
        if offset >= log.len() as u64 {
            return bad(
                NvmeStatus::INVALID_FIELD,
                format!(
                    "offset {offset} is beyond log page {lid:#04x} ({} bytes)",
                    log.len()
                ),
            );
        }
        self.reply(e, &log[offset as usize..], len)
    }

    /// Error Information log: 64-byte entries, newest first.
    fn error_log_page(&self) -> Vec<u8> {
        let mut b = vec![0u8; ERROR_LOG_ENTRIES * 64];
        for (i, r) in self.error_log.iter().enumerate() {
            let o = i * 64;
            put(&mut b, o, &r.count.to_le_bytes());
            put(&mut b, o + 8, &r.sqid.to_le_bytes());
            put(&mut b, o + 10, &r.cid.to_le_bytes());
            // Status field in bits 15:1, phase tag in bit 0 (reported as 0).
            put(&mut b, o + 12, &(r.status << 1).to_le_bytes());
            put(&mut b, o + 14, &0xffffu16.to_le_bytes()); // parameter error location: n/a
            put(&mut b, o + 16, &r.lba.to_le_bytes());
            put(&mut b, o + 24, &r.nsid.to_le_bytes());
        }
        b
    }

    /// SMART / Health Information log of the whole controller (NSID 0 or FFFFFFFFh) or of one
    /// namespace.
    fn smart_log_page(&self, nsid: u32) -> Result<Vec<u8>, Failure> {
        let selected: Vec<_> = if nsid == 0 || nsid == u32::MAX {
            self.namespaces.iter().collect()
        } else {
            match self.ns_index(nsid) {
                Some(i) => vec![&self.namespaces[i]],
                None => {
                    return bad(
                        NvmeStatus::INVALID_NAMESPACE,
                        format!("SMART log of NSID {nsid:#x}"),
                    )
                }
            }
        };
        let sum = |f: &dyn Fn(&super::Namespace) -> u64| selected.iter().map(|n| f(n)).sum::<u64>();
        let units = |bytes: u64| ((bytes / 512).div_ceil(1000)) as u128;
        let mut b = vec![0u8; 512];
        put(&mut b, 1, &300u16.to_le_bytes()); // composite temperature, kelvin
        b[3] = 100; // available spare
        b[4] = 10; // available spare threshold
        put(&mut b, 32, &units(sum(&|n| n.bytes_read)).to_le_bytes());
        put(&mut b, 48, &units(sum(&|n| n.bytes_written)).to_le_bytes());
        put(
            &mut b,
            64,
            &(sum(&|n| n.read_commands) as u128).to_le_bytes(),
        );
        put(
            &mut b,
            80,
            &(sum(&|n| n.write_commands) as u128).to_le_bytes(),
        );
        put(&mut b, 112, &1u128.to_le_bytes()); // power cycles
        put(&mut b, 144, &(self.unsafe_shutdowns as u128).to_le_bytes());
        put(&mut b, 160, &(self.media_errors as u128).to_le_bytes());
        put(&mut b, 176, &(self.error_count as u128).to_le_bytes());
        Ok(b)
    }

    // ----- Features -----

    fn set_features(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let fid = (e.cdw10 & 0xff) as u8;
        if e.cdw10 & (1 << 31) != 0 {
            return bad(
                FEATURE_NOT_SAVEABLE,
                format!("feature {fid:#04x} cannot be saved"),
            );
        }
        match fid {
            feature::NUMBER_OF_QUEUES => {
                let (nsqr, ncqr) = (e.cdw11 & 0xffff, e.cdw11 >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return bad(NvmeStatus::INVALID_FIELD, "65536 I/O queues requested");
                }
                let io_sqs = self.sqs.iter().skip(1).any(Option::is_some);
                let io_cqs = self.cqs.iter().skip(1).any(Option::is_some);
                if io_sqs || io_cqs {
                    return bad(
                        NvmeStatus::COMMAND_SEQUENCE_ERROR,
                        "Number of Queues set after I/O queues were created",
                    );
                }
                let max = self.cfg.max_io_queues as u32;
                self.granted_sqs = (nsqr + 1).min(max) as u16;
                self.granted_cqs = (ncqr + 1).min(max) as u16;
                debug!(
                    "model: granted {} I/O SQs and {} I/O CQs",
                    self.granted_sqs, self.granted_cqs
                );
                Ok(self.queues_dw0(self.granted_sqs, self.granted_cqs))
            }
            feature::VOLATILE_WRITE_CACHE if self.cfg.vwc => {
                self.wce = e.cdw11 & 1 != 0;
                Ok(0)
            }
            feature::INTERRUPT_COALESCING => {
                self.coalescing = e.cdw11 & 0xffff;
                Ok(0)
            }
            _ => bad(
                NvmeStatus::INVALID_FIELD,
                format!("Set Features of feature {fid:#04x}"),
            ),
        }
    }

    fn queues_dw0(&self, sqs: u16, cqs: u16) -> u32 {
        (sqs as u32 - 1) | (cqs as u32 - 1) << 16
    }

    fn get_features(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let fid = (e.cdw10 & 0xff) as u8;
        let sel = (e.cdw10 >> 8) & 7;
        if sel > 3 {
            return bad(
                NvmeStatus::INVALID_FIELD,
                format!("Get Features select {sel}"),
            );
        }
        let supported = match fid {
            feature::NUMBER_OF_QUEUES => true,
            feature::VOLATILE_WRITE_CACHE => self.cfg.vwc,
            feature::INTERRUPT_COALESCING => true,
            _ => false,
        };
        if !supported {
            return bad(
                NvmeStatus::INVALID_FIELD,
                format!("Get Features of feature {fid:#04x}"),
            );
        }
        if sel == 3 {
            // Supported capabilities: changeable, not saveable, not namespace specific.
            return Ok(1 << 2);
        }
        let current = sel == 0;
        Ok(match fid {
            feature::NUMBER_OF_QUEUES if current => {
                self.queues_dw0(self.granted_sqs, self.granted_cqs)
            }
            feature::NUMBER_OF_QUEUES => {
                self.queues_dw0(self.cfg.max_io_queues, self.cfg.max_io_queues)
            }
            feature::INTERRUPT_COALESCING if current => self.coalescing,
            feature::INTERRUPT_COALESCING => 0,
            _ if current => self.wce as u32,
            _ => 1,
        })
    }

    // ----- Queues -----

    fn create_cq(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let qid = e.cdw10 as u16;
        let qsize = e.cdw10 >> 16;
        if qid == 0 || qid > self.granted_cqs || self.cqs[qid as usize].is_some() {
            return bad(
                NvmeStatus::INVALID_QUEUE_IDENTIFIER,
                format!("cannot create CQ {qid} ({} granted)", self.granted_cqs),
            );
        }
        self.check_queue_shape(e, qsize)?;
        let ien = e.cdw11 & 2 != 0;
        let iv = (e.cdw11 >> 16) as u16;
        if ien && iv as u32 >= self.cfg.msix_vectors {
            return bad(
                NvmeStatus::INVALID_INTERRUPT_VECTOR,
                format!(
                    "CQ {qid}: interrupt vector {iv} ({} MSI-X vectors)",
                    self.cfg.msix_vectors
                ),
            );
        }
        let mut cq = Cq::new(e.dptr1, qsize + 1);
        cq.vector = ien.then_some(iv);
        self.cqs[qid as usize] = Some(cq);
        debug!(
            "model: created CQ {qid} of {} entries at {:#x}",
            qsize + 1,
            e.dptr1
        );
        Ok(0)
    }

    fn create_sq(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let qid = e.cdw10 as u16;
        let qsize = e.cdw10 >> 16;
        let cqid = (e.cdw11 >> 16) as u16;
        if qid == 0 || qid > self.granted_sqs || self.sqs[qid as usize].is_some() {
            return bad(
                NvmeStatus::INVALID_QUEUE_IDENTIFIER,
                format!("cannot create SQ {qid} ({} granted)", self.granted_sqs),
            );
        }
        if cqid == 0
            || self
                .cqs
                .get(cqid as usize)
                .and_then(Option::as_ref)
                .is_none()
        {
            return bad(
                NvmeStatus::INVALID_COMPLETION_QUEUE,
                format!("SQ {qid} would complete to CQ {cqid}, which does not exist"),
            );
        }
        self.check_queue_shape(e, qsize)?;
        self.sqs[qid as usize] = Some(Sq::new(e.dptr1, qsize + 1, cqid));
        debug!(
            "model: created SQ {qid} of {} entries at {:#x} -> CQ {cqid}",
            qsize + 1,
            e.dptr1
        );
        Ok(0)
    }

    /// Size, contiguity and base address of a queue being created.
    fn check_queue_shape(&self, e: &SqEntry, qsize: u32) -> Result<(), Failure> {
        if qsize == 0 || qsize > self.cfg.mqes as u32 {
            return bad(
                NvmeStatus::INVALID_QUEUE_SIZE,
                format!(
                    "{} entries requested, 2..={} allowed",
                    qsize + 1,
                    self.cfg.mqes as u32 + 1
                ),
            );
        }
        if e.cdw11 & 1 == 0 {
            return bad(
                NvmeStatus::INVALID_FIELD,
                "queues must be physically contiguous (PC = 1; CAP.CQR = 1)",
            );
        }
        if e.dptr1 == 0 || !e.dptr1.is_multiple_of(self.page_size) {
            return bad(
                NvmeStatus::PRP_OFFSET_INVALID,
                format!("queue base {:#x} is zero or not page aligned", e.dptr1),
            );
        }
        Ok(())
    }

    fn delete_sq(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let qid = e.cdw10 as u16;
        if qid == 0
            || self
                .sqs
                .get(qid as usize)
                .and_then(Option::as_ref)
                .is_none()
        {
            return bad(
                NvmeStatus::INVALID_QUEUE_IDENTIFIER,
                format!("cannot delete SQ {qid}"),
            );
        }
        // Commands still outstanding are aborted, their completions posted before this one.
        let of_queue = |c: &Completion| c.sqid == qid;
        let mut pending: Vec<Completion> = self.held.iter().copied().filter(of_queue).collect();
        pending.extend(self.lost.iter().copied().filter(of_queue));
        self.held.retain(|c| !of_queue(c));
        self.lost.retain(|c| !of_queue(c));
        for mut c in pending {
            c.status = NvmeStatus::ABORTED_SQ_DELETION.to_field();
            c.dw0 = 0;
            c.duplicate = false;
            self.record_error(&c, 0, 0);
            self.post(c);
        }
        self.sqs[qid as usize] = None;
        debug!("model: deleted SQ {qid}");
        Ok(0)
    }

    fn delete_cq(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let qid = e.cdw10 as u16;
        if qid == 0
            || self
                .cqs
                .get(qid as usize)
                .and_then(Option::as_ref)
                .is_none()
        {
            return bad(
                NvmeStatus::INVALID_QUEUE_IDENTIFIER,
                format!("cannot delete CQ {qid}"),
            );
        }
        let users: Vec<usize> = (1..self.sqs.len())
            .filter(|&i| self.sqs[i].as_ref().is_some_and(|s| s.cqid == qid))
            .collect();
        if !users.is_empty() {
            return bad(
                NvmeStatus::INVALID_QUEUE_DELETION,
                format!("CQ {qid} still has SQ(s) {users:?}; delete them first"),
            );
        }
        self.cqs[qid as usize] = None;
        debug!("model: deleted CQ {qid}");
        Ok(0)
    }

    // ----- Abort -----

    fn abort(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        self.stats.aborts += 1;
        let sqid = e.cdw10 as u16;
        let cid = (e.cdw10 >> 16) as u16;
        let matches = |c: &Completion| c.sqid == sqid && c.cid == cid;
        let found = if self.abort_ineffective {
            None
        } else if let Some(i) = self.held.iter().position(matches) {
            self.held.remove(i)
        } else if let Some(i) = self.lost.iter().position(matches) {
            Some(self.lost.remove(i))
        } else if let Some(i) = self.aers.iter().position(matches) {
            Some(self.aers.remove(i))
        } else {
            None
        };
        let Some(mut c) = found else {
            debug!("model: Abort of SQ {sqid} CID {cid}: not held, not aborted");
            return Ok(1);
        };
        c.status = NvmeStatus::ABORT_REQUESTED.to_field();
        c.dw0 = 0;
        c.duplicate = false;
        self.record_error(&c, 0, 0);
        self.post(c);
        debug!("model: aborted SQ {sqid} CID {cid}");
        Ok(0)
    }
}

/// The NGUID the model reports for a namespace.
fn nguid(nsid: u32) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(b"rnvmemdl");
    g[12..].copy_from_slice(&nsid.to_be_bytes());
    g
}
