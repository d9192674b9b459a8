//! One NVMe/TCP connection: one queue (admin or I/O) of a fabric controller. Reads PDUs from a
//! non-blocking socket, runs admin and fabrics commands itself, hands I/O commands to the
//! device queue pairs of its poll thread, and sends data and responses back.
//!
//! Data never takes a detour through ordinary memory when it can go straight: a read's data
//! is sent from the DMA buffer the device filled (`writev` with the PDU headers around it), and
//! a write's data is received into the DMA buffer the device then reads, directly from the
//! socket when the bytes are still in the kernel. Bytes that arrived in the same `read` as the
//! header before them are copied once from the receive buffer, as SPDK's receive pipe does.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rnvme_driver::dma::{send_vectored, DmaBuffer, SendPart, SEND_PARTS_MAX};
use rnvme_driver::io::IoQueuePair;
use rnvme_driver::queue::Completion;
use rnvme_driver::spec::io_op;
use rnvme_driver::NvmeStatus;
use vm_memory::ReadVolatile;

use crate::cmd::{
    admin_op, connect_at, cqe, fctype, invalid_parameter, sgl_id, status, Connect, Sqe,
    CATTR_DISABLE_SQFLOW, CONNECT_DATA_LEN, FABRICS,
};
use crate::pdu::{self, fes, pdu_type, CommonHeader, Fatal, Layout, CH_LEN, DIGEST_LEN};
use crate::target::{
    log_page_args, slice_padded, Answer, FabricCtrl, Target, ADMIN_IN_CAPSULE, ADMIN_QUEUE_ENTRIES,
    AER_MAX, DISCOVERY_NQN,
};

/// Size of a connection's receive buffer.
const RX_BUF: usize = 64 * 1024;
/// Data still to come of at least this many bytes is read straight into DMA memory.
const DIRECT_MIN: usize = 2048;
/// PDUs handled per call of [`Conn::poll_rx`], so one busy connection does not starve others.
const PDUS_PER_POLL: usize = 64;
/// DMA buffers a connection keeps for its next commands once theirs completed.
const SPARE_BUFFERS: usize = 32;

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error("the host closed the connection")]
    Closed,
    #[error("protocol error: {0}")]
    Fatal(Fatal),
    #[error("the host ended the connection: termination request, status {0:#x}")]
    HostTerminated(u16),
    #[error("socket: {0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Timeout(String),
    #[error("its controller ended")]
    ControllerGone,
    #[error("the host disconnected the queue")]
    Disconnected,
}

impl From<Fatal> for End {
    fn from(f: Fatal) -> End {
        End::Fatal(f)
    }
}

/// Counters of a connection, and what it holds now.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ConnStats {
    pub commands: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub errors: u64,
    /// Commands at the device now.
    pub at_device: usize,
    /// Commands waiting for their data from the host.
    pub awaiting_data: usize,
    /// Commands waiting for room on the device queue pair.
    pub queued: usize,
    /// Bytes waiting to be sent.
    pub unsent: usize,
}

/// Where a PDU's data goes.
enum Dst {
    Heap(Vec<u8>),
    /// Into the DMA buffer of request `slot`, from byte `base`.
    Dma {
        slot: usize,
        base: usize,
    },
    Discard,
}

enum RxState {
    Header,
    Payload {
        lay: Layout,
        hdr: Vec<u8>,
        dst: Dst,
        pad_left: usize,
        off: usize,
        crc: u32,
        digest: [u8; DIGEST_LEN],
        digest_got: usize,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for its data from the host.
    HostData,
    /// Ready for the device.
    Ready,
    /// At the device.
    Device,
}

struct Req {
    sqe: Sqe,
    /// Index of the namespace in the subsystem.
    ns: usize,
    buf: Option<DmaBuffer>,
    /// The device whose memory `buf` is.
    dev: usize,
    len: u32,
    got: u32,
    stage: Stage,
    /// Device commands outstanding.
    left: u32,
    failure: Option<NvmeStatus>,
}

enum Out {
    Bytes(Vec<u8>),
    /// `len` bytes at `offset` of a buffer of device `dev`.
    Dma(DmaBuffer, usize, usize, usize),
}

impl Out {
    fn len(&self) -> usize {
        match self {
            Out::Bytes(b) => b.len(),
            Out::Dma(_, _, l, _) => *l,
        }
    }
}

/// The admin queue's state: the controller's registers, keep alive, held events.
struct AdminState {
    cc: u32,
    csts: u32,
    kato: Option<Duration>,
    last_keep_alive: Instant,
    aers: Vec<u16>,
    aec: u32,
}

/// The device queue pairs of the poll thread a connection runs on, and the tag prefix of its
/// commands.
pub struct Io<'a> {
    pub qps: &'a mut [IoQueuePair],
    pub slot: usize,
}

/// The tag of request `req` of connection `slot`.
pub fn tag(slot: usize, req: usize) -> u64 {
    (slot as u64) << 32 | req as u64
}

/// The connection slot and request of a tag.
pub fn untag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

/// One connection.
pub struct Conn {
    sock: TcpStream,
    pub peer: SocketAddr,
    target: Arc<Target>,
    ic_done: bool,
    limits: pdu::Limits,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    state: RxState,
    tx: VecDeque<Out>,
    tx_off: usize,
    /// After Connect: the queue, its controller and subsystem.
    qid: Option<u16>,
    ctrl: Option<Arc<FabricCtrl>>,
    sqflow: bool,
    sqhd: u16,
    entries: u16,
    admin: Option<AdminState>,
    reqs: Vec<Option<Req>>,
    pending: VecDeque<usize>,
    /// DMA buffers of completed commands, for the next ones: (device, buffer). Taking one
    /// saves the pool's lock and the zeroing of a new buffer; the data in it is always
    /// overwritten whole (by the device for a read, by the host for a write) before use.
    spare: Vec<(usize, DmaBuffer)>,
    /// Device commands in flight.
    in_flight: usize,
    created: Instant,
    ending: Option<End>,
    stats: ConnStats,
}

impl Conn {
    pub fn new(sock: TcpStream, peer: SocketAddr, target: Arc<Target>) -> std::io::Result<Conn> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let limits = pdu::Limits {
            hdgst: false,
            ddgst: false,
            in_capsule: ADMIN_IN_CAPSULE,
            max_h2c_data: target.limits.max_h2c_data,
        };
        Ok(Conn {
            sock,
            peer,
            target,
            ic_done: false,
            limits,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            state: RxState::Header,
            tx: VecDeque::new(),
            tx_off: 0,
            qid: None,
            ctrl: None,
            sqflow: true,
            sqhd: 0,
            entries: 1,
            admin: None,
            reqs: Vec::new(),
            pending: VecDeque::new(),
            spare: Vec::new(),
            in_flight: 0,
            created: Instant::now(),
            ending: None,
            stats: ConnStats::default(),
        })
    }

    /// The queue this connection carries, once connected.
    pub fn qid(&self) -> Option<u16> {
        self.qid
    }

    /// The controller, once connected.
    pub fn cntlid(&self) -> Option<u16> {
        self.ctrl.as_ref().map(|c| c.cntlid)
    }

    /// Device commands in flight (their memory stays until they complete).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Why the connection is ending, if it is.
    pub fn ending(&self) -> Option<&End> {
        self.ending.as_ref()
    }

    /// Whether the connection can go: it is ending, nothing is at the device, nothing is left
    /// to send (or the socket is gone).
    pub fn finished(&self) -> bool {
        self.ending.is_some()
            && self.in_flight == 0
            && (self.tx.is_empty()
                || matches!(
                    self.ending,
                    Some(End::Io(_)) | Some(End::Closed) | Some(End::HostTerminated(_))
                ))
    }

    /// The counters, and what the connection holds now.
    pub fn stats(&self) -> ConnStats {
        let mut s = self.stats.clone();
        s.at_device = self.in_flight;
        s.awaiting_data = self
            .reqs
            .iter()
            .flatten()
            .filter(|r| r.stage == Stage::HostData)
            .count();
        s.queued = self.pending.len();
        s.unsent = self.tx.iter().map(Out::len).sum::<usize>() - self.tx_off;
        s
    }

    /// Whether there is something to send.
    pub fn wants_write(&self) -> bool {
        !self.tx.is_empty()
    }

    /// The socket, to wait on.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Starts ending the connection: nothing more is read; what is at the device completes.
    pub fn end(&mut self, why: End) {
        if self.ending.is_some() {
            return;
        }
        if let End::Fatal(f) = &why {
            log::warn!("{}: {f}; terminating the connection", self.peer);
            // The termination request goes after whatever is queued; the rest is dropped.
            let mut v = Vec::new();
            let offending = match &self.state {
                RxState::Payload { hdr, .. } => hdr.clone(),
                RxState::Header => {
                    self.rx[self.rx_start..self.rx_end.min(self.rx_start + 152)].to_vec()
                }
            };
            pdu::c2h_term_req(&mut v, f, &offending);
            self.tx.push_back(Out::Bytes(v));
        } else {
            log::info!("{}: connection ends: {why}", self.peer);
        }
        self.pending.clear();
        self.ending = Some(why);
        self.release_admin();
    }

    /// What the connection leaves behind: its queue detached, its controller ended with the
    /// admin queue.
    fn release_admin(&mut self) {
        if let Some(ctrl) = &self.ctrl {
            match self.qid {
                Some(0) => self.target.remove_ctrl(ctrl.cntlid),
                Some(q) => self.target.detach_io_queue(ctrl, q),
                None => {}
            }
        }
    }

    /// Timers: the connect timeout, keep alive, and the controller's end.
    pub fn check(&mut self, now: Instant) {
        if self.ending.is_some() {
            return;
        }
        if self.qid.is_none() {
            let limit = Duration::from_millis(self.target.limits.connect_timeout_ms);
            if now.duration_since(self.created) > limit {
                self.end(End::Timeout(format!(
                    "no queue connected within {} ms",
                    limit.as_millis()
                )));
            }
            return;
        }
        if let Some(a) = &self.admin {
            if let Some(k) = a.kato {
                if now.duration_since(a.last_keep_alive) > k + k / 2 {
                    let ms = k.as_millis();
                    self.end(End::Timeout(format!(
                        "keep alive timeout ({ms} ms) expired"
                    )));
                }
            }
        } else if self
            .ctrl
            .as_ref()
            .is_some_and(|c| c.dead.load(Ordering::Acquire))
        {
            self.end(End::ControllerGone);
        }
    }

    // ---- receiving ----

    fn avail(&self) -> usize {
        self.rx_end - self.rx_start
    }

    /// Reads more into the receive buffer. False: nothing now.
    fn fill(&mut self) -> Result<bool, End> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_end == self.rx.len() {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        match self.sock.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => Err(End::Closed),
            Ok(n) => {
                self.rx_end += n;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(End::Io(e)),
        }
    }

    /// Reads and handles what the host sent. Returns whether anything happened.
    pub fn poll_rx(&mut self, io: &mut Io<'_>) -> bool {
        if self.ending.is_some() {
            return false;
        }
        match self.rx_loop(io) {
            Ok(progress) => progress,
            Err(e) => {
                self.end(e);
                true
            }
        }
    }

    fn rx_loop(&mut self, io: &mut Io<'_>) -> Result<bool, End> {
        let mut progress = false;
        let mut pdus = 0;
        while pdus < PDUS_PER_POLL && self.ending.is_none() {
            match &mut self.state {
                RxState::Header => {
                    if self.avail() < CH_LEN {
                        if !self.fill()? {
                            break;
                        }
                        progress = true;
                        continue;
                    }
                    let s = self.rx_start;
                    let ch = CommonHeader::parse(self.rx[s..s + CH_LEN].try_into().expect("8"));
                    let lay = pdu::check_header(&ch, self.ic_done, &self.limits)?;
                    let hl = lay.header_len();
                    if self.avail() < hl {
                        if !self.fill()? {
                            break;
                        }
                        progress = true;
                        continue;
                    }
                    let hdr = self.rx[s..s + hl].to_vec();
                    self.rx_start += hl;
                    pdus += 1;
                    progress = true;
                    self.on_header(lay, hdr)?;
                }
                RxState::Payload {
                    lay,
                    dst,
                    pad_left,
                    off,
                    crc,
                    digest,
                    digest_got,
                    ..
                } => {
                    if *pad_left > 0 {
                        if self.rx_end == self.rx_start {
                            if !self.fill()? {
                                break;
                            }
                            continue;
                        }
                        let n = (*pad_left).min(self.rx_end - self.rx_start);
                        self.rx_start += n;
                        *pad_left -= n;
                        continue;
                    }
                    if *off < lay.data {
                        let want = lay.data - *off;
                        let have = self.rx_end - self.rx_start;
                        if have > 0 {
                            let n = want.min(have);
                            let bytes = &self.rx[self.rx_start..self.rx_start + n];
                            if lay.ddgst {
                                *crc = crc32c::crc32c_append(*crc, bytes);
                            }
                            match dst {
                                Dst::Heap(v) => v.extend_from_slice(bytes),
                                Dst::Dma { slot, base } => {
                                    let buf = self.reqs[*slot]
                                        .as_ref()
                                        .and_then(|r| r.buf.as_ref())
                                        .expect("a request receiving data has a buffer");
                                    buf.write_bytes(*base + *off, bytes);
                                }
                                Dst::Discard => {}
                            }
                            self.rx_start += n;
                            *off += n;
                            progress = true;
                            continue;
                        }
                        if let Dst::Dma { slot, base } = dst {
                            if want >= DIRECT_MIN {
                                let buf = self.reqs[*slot]
                                    .as_ref()
                                    .and_then(|r| r.buf.as_ref())
                                    .expect("a request receiving data has a buffer");
                                let at = *base + *off;
                                let vs = buf.volatile();
                                let mut sub = vs
                                    .subslice(at, want)
                                    .expect("the data fits the buffer (checked at its header)");
                                match self.sock.read_volatile(&mut sub) {
                                    Ok(0) => return Err(End::Closed),
                                    Ok(n) => {
                                        if lay.ddgst {
                                            *crc = crc_of(buf, at, n, *crc);
                                        }
                                        *off += n;
                                        progress = true;
                                        continue;
                                    }
                                    Err(vm_memory::VolatileMemoryError::IOError(e))
                                        if e.kind() == ErrorKind::WouldBlock =>
                                    {
                                        break
                                    }
                                    Err(vm_memory::VolatileMemoryError::IOError(e))
                                        if e.kind() == ErrorKind::Interrupted =>
                                    {
                                        continue
                                    }
                                    Err(e) => {
                                        return Err(End::Io(std::io::Error::other(e.to_string())))
                                    }
                                }
                            }
                        }
                        if !self.fill()? {
                            break;
                        }
                        continue;
                    }
                    if lay.ddgst && *digest_got < DIGEST_LEN {
                        let have = self.rx_end - self.rx_start;
                        if have == 0 {
                            if !self.fill()? {
                                break;
                            }
                            continue;
                        }
                        let n = (DIGEST_LEN - *digest_got).min(have);
                        digest[*digest_got..*digest_got + n]
                            .copy_from_slice(&self.rx[self.rx_start..self.rx_start + n]);
                        *digest_got += n;
                        self.rx_start += n;
                        continue;
                    }
                    let RxState::Payload {
                        lay,
                        hdr,
                        dst,
                        crc,
                        digest,
                        ..
                    } = std::mem::replace(&mut self.state, RxState::Header)
                    else {
                        unreachable!("in the payload state")
                    };
                    let digest_ok = !lay.ddgst || u32::from_le_bytes(digest) == crc;
                    if !digest_ok {
                        log::warn!(
                            "{}: data digest {:#010x}, computed {crc:#010x}: the command fails",
                            self.peer,
                            u32::from_le_bytes(digest)
                        );
                    }
                    progress = true;
                    self.on_payload(lay, hdr, dst, digest_ok, io);
                }
            }
        }
        Ok(progress)
    }

    /// A PDU's header is in: check its digest and decide where its data goes.
    fn on_header(&mut self, lay: Layout, hdr: Vec<u8>) -> Result<(), End> {
        if lay.ch.ptype != pdu_type::IC_REQ
            && lay.ch.ptype != pdu_type::H2C_TERM_REQ
            && self.limits.hdgst
        {
            pdu::check_hdgst(&hdr)?;
        }
        let dst = match lay.ch.ptype {
            pdu_type::IC_REQ => {
                let ic = pdu::IcReq::parse(&hdr)?;
                self.limits.hdgst = ic.hdgst;
                self.limits.ddgst = ic.ddgst;
                self.ic_done = true;
                let resp = pdu::ic_resp(0, ic.hdgst, ic.ddgst, self.limits.max_h2c_data);
                self.push_bytes(&resp);
                return Ok(());
            }
            pdu_type::H2C_TERM_REQ => {
                let f = u16::from_le_bytes([hdr[8], hdr[9]]);
                return Err(End::HostTerminated(f));
            }
            pdu_type::CAPSULE_CMD => {
                let sqe = Sqe(hdr[8..72].try_into().expect("64 bytes"));
                self.stats.commands += 1;
                self.advance_sqhd();
                match self.command_data(&sqe, lay.data)? {
                    Some(d) => d,
                    None => return Ok(()),
                }
            }
            pdu_type::H2C_DATA => {
                let h = pdu::H2cData::parse(&hdr, &lay.ch);
                let slot = h.ttag as usize;
                let ok = self.reqs.get(slot).and_then(|r| r.as_ref()).filter(|r| {
                    r.sqe.cid() == h.cccid && r.stage == Stage::HostData && r.buf.is_some()
                });
                let Some(r) = ok else {
                    return Err(Fatal::new(
                        fes::INVALID_HEADER_FIELD,
                        10,
                        format!(
                            "H2CData for command {:#x} with transfer tag {}, which has no R2T",
                            h.cccid, h.ttag
                        ),
                    )
                    .into());
                };
                if h.datal as usize != lay.data
                    || h.datao != r.got
                    || h.datao as u64 + h.datal as u64 > r.len as u64
                {
                    return Err(Fatal::new(
                        fes::DATA_OUT_OF_RANGE,
                        12,
                        format!(
                            "H2CData of {} bytes at {} ({} in the PDU); the R2T asked for {} at {}",
                            h.datal,
                            h.datao,
                            lay.data,
                            r.len - r.got,
                            r.got
                        ),
                    )
                    .into());
                }
                Dst::Dma {
                    slot,
                    base: h.datao as usize,
                }
            }
            _ => unreachable!("check_header admits only the types above"),
        };
        self.state = RxState::Payload {
            lay,
            hdr,
            dst,
            pad_left: lay.pad,
            off: 0,
            crc: 0,
            digest: [0; DIGEST_LEN],
            digest_got: 0,
        };
        Ok(())
    }

    /// A PDU's data is in (`digest_ok`: its data digest matched, or there was none).
    fn on_payload(
        &mut self,
        lay: Layout,
        hdr: Vec<u8>,
        dst: Dst,
        digest_ok: bool,
        io: &mut Io<'_>,
    ) {
        match (lay.ch.ptype, dst) {
            (pdu_type::CAPSULE_CMD, Dst::Heap(data)) => {
                let sqe = Sqe(hdr[8..72].try_into().expect("64 bytes"));
                if digest_ok {
                    self.run_admin(&sqe, Some(&data));
                } else {
                    self.respond(sqe.cid(), status::TRANSPORT_ERROR, 0);
                }
            }
            (pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA, Dst::Dma { slot, .. }) => {
                if let Some(r) = self.reqs[slot].as_mut() {
                    if lay.ch.ptype == pdu_type::CAPSULE_CMD {
                        r.got = r.len;
                    } else {
                        r.got += lay.data as u32;
                    }
                    if !digest_ok {
                        r.failure.get_or_insert(status::TRANSPORT_ERROR);
                    }
                    if r.got == r.len {
                        if let Some(s) = r.failure {
                            let cid = r.sqe.cid();
                            self.reqs[slot] = None;
                            self.respond(cid, s, 0);
                        } else {
                            r.stage = Stage::Ready;
                            self.pending.push_back(slot);
                        }
                    }
                }
            }
            _ => {}
        }
        self.submit(io);
    }

    fn advance_sqhd(&mut self) {
        self.sqhd = (self.sqhd + 1) % self.entries.max(1);
    }

    /// A command capsule arrived with `in_capsule` bytes of data following: where the data
    /// goes (None: the command was answered or queued and takes no data from the capsule).
    fn command_data(&mut self, sqe: &Sqe, in_capsule: usize) -> Result<Option<Dst>, End> {
        let sgl = sqe.sgl();
        let is_admin_path = self.qid.is_none_or(|q| q == 0) || sqe.opcode() == FABRICS;
        // The data descriptor: in the capsule at offset 0, or by the transport.
        let bad_sgl = if in_capsule > 0 {
            (sgl.id != sgl_id::IN_CAPSULE || sgl.addr != 0 || sgl.len as usize != in_capsule)
                .then_some(if sgl.id != sgl_id::IN_CAPSULE {
                    status::SGL_TYPE_INVALID
                } else {
                    status::SGL_LENGTH_INVALID
                })
        } else {
            (sgl.len > 0 && sgl.id != sgl_id::TRANSPORT).then_some(status::SGL_TYPE_INVALID)
        };
        if let Some(s) = bad_sgl {
            self.respond(sqe.cid(), s, 0);
            return Ok((in_capsule > 0).then_some(Dst::Discard));
        }
        if is_admin_path {
            if in_capsule > 0 {
                return Ok(Some(Dst::Heap(Vec::with_capacity(in_capsule))));
            }
            self.run_admin(sqe, None);
            return Ok(None);
        }
        // An I/O command.
        match self.prepare_io(sqe) {
            Err(s) => {
                self.respond(sqe.cid(), s, 0);
                Ok((in_capsule > 0).then_some(Dst::Discard))
            }
            Ok((slot, from_host)) => {
                let len = self.reqs[slot].as_ref().map_or(0, |r| r.len);
                if in_capsule > 0 {
                    if !from_host || in_capsule != len as usize {
                        self.reqs[slot] = None;
                        self.respond(sqe.cid(), status::SGL_LENGTH_INVALID, 0);
                        return Ok(Some(Dst::Discard));
                    }
                    return Ok(Some(Dst::Dma { slot, base: 0 }));
                }
                if from_host {
                    // Ask for all of it: the host sends it in H2CData PDUs of up to MAXH2CDATA.
                    let hd = self.limits.hdgst;
                    let cid = sqe.cid();
                    self.push_with(|v| pdu::r2t(v, cid, slot as u16, 0, len, hd));
                } else {
                    let r = self.reqs[slot].as_mut().expect("just made");
                    r.stage = Stage::Ready;
                    self.pending.push_back(slot);
                }
                Ok(None)
            }
        }
    }

    /// Checks an I/O command and gives it a request slot (with its DMA buffer). Returns the
    /// slot and whether its data comes from the host.
    fn prepare_io(&mut self, sqe: &Sqe) -> Result<(usize, bool), NvmeStatus> {
        let ctrl = self.ctrl.as_ref().expect("an I/O queue has a controller");
        let subsys = &self.target.subsystems[ctrl.subsys];
        let op = sqe.opcode();
        let (from_host, writes) = match op {
            io_op::READ => (false, false),
            io_op::WRITE => (true, true),
            io_op::COMPARE => (true, false),
            io_op::DATASET_MANAGEMENT => (true, true),
            io_op::WRITE_ZEROES => (false, true),
            io_op::FLUSH => (false, false),
            _ => return Err(status::INVALID_OPCODE),
        };
        if sqe.flags() & 0x3 != 0 {
            // Fused commands are not supported.
            return Err(status::INVALID_FIELD);
        }
        let nsid = sqe.nsid();
        let ns_index = if op == io_op::FLUSH && nsid == u32::MAX {
            usize::MAX
        } else {
            subsys
                .namespaces
                .iter()
                .position(|n| n.nsid == nsid)
                .ok_or(status::INVALID_NAMESPACE)?
        };
        if writes && subsys.read_only {
            return Err(status::NS_WRITE_PROTECTED);
        }
        let sgl = sqe.sgl();
        let len = match op {
            io_op::READ | io_op::WRITE | io_op::COMPARE | io_op::WRITE_ZEROES => {
                let ns = &subsys.namespaces[ns_index];
                let slba = sqe.cdw(10) as u64 | (sqe.cdw(11) as u64) << 32;
                let nlb = (sqe.cdw(12) & 0xffff) as u64 + 1;
                if slba.checked_add(nlb).is_none_or(|e| e > ns.blocks) {
                    return Err(status::LBA_OUT_OF_RANGE);
                }
                if op == io_op::WRITE_ZEROES {
                    0
                } else {
                    let bytes = nlb * ns.lba_size as u64;
                    if bytes > self.target.limits.max_transfer as u64 {
                        return Err(status::INVALID_FIELD);
                    }
                    bytes as u32
                }
            }
            io_op::DATASET_MANAGEMENT => ((sqe.cdw(10) & 0xff) + 1) * 16,
            _ => 0,
        };
        if sgl.len != len {
            return Err(status::SGL_LENGTH_INVALID);
        }
        let slot = self
            .reqs
            .iter()
            .position(|r| r.is_none())
            .ok_or(NvmeStatus::COMMAND_ID_CONFLICT.with_dnr(true))?;
        if self.reqs.iter().flatten().any(|r| r.sqe.cid() == sqe.cid()) {
            return Err(NvmeStatus::COMMAND_ID_CONFLICT.with_dnr(true));
        }
        let dev = if ns_index == usize::MAX {
            0
        } else {
            subsys.namespaces[ns_index].dev
        };
        let buf = if len > 0 {
            Some(
                self.take_buffer(dev, len as usize)
                    .ok_or(status::TRANSIENT)?,
            )
        } else {
            None
        };
        self.reqs[slot] = Some(Req {
            sqe: *sqe,
            ns: ns_index,
            dev,
            buf,
            len,
            got: 0,
            stage: Stage::HostData,
            left: 0,
            failure: None,
        });
        Ok((slot, from_host))
    }

    /// Hands ready requests to the device queue pairs (as far as they have room).
    pub fn submit(&mut self, io: &mut Io<'_>) {
        let Some(ctrl) = self.ctrl.clone().filter(|c| !c.discovery) else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let target = self.target.clone();
        let subsys = &target.subsystems[ctrl.subsys];
        while let Some(&slot) = self.pending.front() {
            let Some(r) = self.reqs[slot].as_mut() else {
                self.pending.pop_front();
                continue;
            };
            // The namespaces this request goes to: one, or all of them for a flush of all.
            let targets: Vec<usize> = if r.ns == usize::MAX {
                (0..subsys.namespaces.len()).collect()
            } else {
                vec![r.ns]
            };
            if targets
                .iter()
                .any(|&n| io.qps[subsys.namespaces[n].dev].free_slots() == 0)
            {
                break;
            }
            self.pending.pop_front();
            r.stage = Stage::Device;
            for n in targets {
                let ns = &subsys.namespaces[n];
                let cmd = r.sqe.to_device(ns.dev_nsid);
                let qp = &mut io.qps[ns.dev];
                let seg;
                let data: &[_] = match &r.buf {
                    Some(b) => {
                        seg = [b.segment_at(0, r.len as usize)];
                        &seg
                    }
                    None => &[],
                };
                match qp.submit(cmd, data, tag(io.slot, slot)) {
                    Ok(_) => {
                        r.left += 1;
                        self.in_flight += 1;
                    }
                    Err(e) => {
                        log::warn!(
                            "{}: submitting to {}: {e}",
                            self.peer,
                            target.devices[ns.dev].name()
                        );
                        r.failure.get_or_insert(NvmeStatus::INTERNAL_ERROR);
                    }
                }
            }
            if r.left == 0 {
                let s = r.failure.unwrap_or(NvmeStatus::INTERNAL_ERROR);
                let cid = r.sqe.cid();
                self.reqs[slot] = None;
                self.respond(cid, s, 0);
            }
        }
    }

    /// A device completion of request `slot`.
    pub fn on_completion(&mut self, slot: usize, c: &Completion) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(r) = self.reqs.get_mut(slot).and_then(|r| r.as_mut()) else {
            log::error!(
                "{}: a completion for request {slot}, which is not in flight",
                self.peer
            );
            return;
        };
        if !c.status.is_success() {
            r.failure.get_or_insert(c.status);
        }
        r.left = r.left.saturating_sub(1);
        if r.left > 0 {
            return;
        }
        let r = self.reqs[slot].take().expect("checked above");
        if self.ending.is_some() {
            // Its memory goes back now that the device is done with it; nobody to answer.
            return;
        }
        let cid = r.sqe.cid();
        match r.failure {
            Some(s) => {
                self.stats.errors += 1;
                self.respond(cid, s, c.dw0);
            }
            None if r.sqe.opcode() == io_op::READ => {
                let buf = r.buf.expect("a read has a buffer");
                self.stats.read_bytes += r.len as u64;
                self.send_data(cid, Out::Dma(buf, 0, r.len as usize, r.dev), true);
            }
            None => {
                if r.sqe.opcode() == io_op::WRITE {
                    self.stats.written_bytes += r.len as u64;
                }
                if let Some(b) = r.buf {
                    self.give_buffer(r.dev, b);
                }
                self.respond(cid, NvmeStatus::SUCCESS, c.dw0);
            }
        }
    }

    /// Sends a command's data to the host in one C2HData PDU, then its response (or, with SQ
    /// flow control off, the success flag in place of it).
    fn send_data(&mut self, cid: u16, data: Out, then_respond: bool) {
        let len = data.len() as u32;
        let (hd, dd) = (self.limits.hdgst, self.limits.ddgst);
        let success = then_respond && !self.sqflow;
        self.push_with(|v| {
            pdu::c2h_data_header(
                v,
                &pdu::C2hData {
                    cccid: cid,
                    datao: 0,
                    datal: len,
                    last: true,
                    success,
                },
                hd,
                dd,
            )
        });
        let crc = match (&data, dd) {
            (Out::Dma(b, off, l, _), true) => Some(crc_of(b, *off, *l, 0)),
            (Out::Bytes(b), true) => Some(pdu::crc(b)),
            _ => None,
        };
        match data {
            Out::Bytes(b) => self.push_bytes(&b),
            d => self.tx.push_back(d),
        }
        if let Some(c) = crc {
            self.push_bytes(&c.to_le_bytes());
        }
        if then_respond && !success {
            self.respond(cid, NvmeStatus::SUCCESS, 0);
        }
    }

    fn respond(&mut self, cid: u16, s: NvmeStatus, dw0: u32) {
        self.respond_with(cid, s, dw0, 0);
    }

    fn respond_with(&mut self, cid: u16, s: NvmeStatus, dw0: u32, dw1: u32) {
        if !s.is_success() {
            self.stats.errors += 1;
        }
        let c = cqe(dw0, dw1, self.sqhd, self.qid.unwrap_or(0), cid, s);
        let hd = self.limits.hdgst;
        self.push_with(|v| pdu::capsule_resp(v, &c, hd));
    }

    fn answer(&mut self, sqe: &Sqe, a: Answer) {
        match a.data {
            Some(mut d) if a.status.is_none() => {
                // Exactly what the host's descriptor asked for.
                d.resize(sqe.sgl().len as usize, 0);
                if d.is_empty() {
                    self.respond(sqe.cid(), NvmeStatus::SUCCESS, a.dw0);
                } else {
                    let cid = sqe.cid();
                    self.send_data(cid, Out::Bytes(d), false);
                    self.respond(cid, NvmeStatus::SUCCESS, a.dw0);
                }
            }
            _ => self.respond_with(sqe.cid(), a.status(), a.dw0, a.dw1),
        }
    }

    // ---- admin and fabrics commands ----

    fn run_admin(&mut self, sqe: &Sqe, data: Option<&[u8]>) {
        let a = if sqe.opcode() == FABRICS {
            self.fabrics(sqe, data)
        } else if self.qid.is_none() {
            Answer::err(status::COMMAND_SEQUENCE_ERROR)
        } else if self.qid != Some(0) {
            Answer::err(status::INVALID_OPCODE)
        } else {
            self.admin_cmd(sqe)
        };
        if let Some(a) = a.into_sent() {
            self.answer(sqe, a);
        }
    }

    fn fabrics(&mut self, sqe: &Sqe, data: Option<&[u8]>) -> Answer {
        match sqe.fctype() {
            fctype::CONNECT => self.connect(sqe, data),
            _ if self.qid.is_none() => Answer::err(status::COMMAND_SEQUENCE_ERROR),
            fctype::PROPERTY_GET | fctype::PROPERTY_SET if self.qid != Some(0) => {
                Answer::err(status::INVALID_FIELD)
            }
            fctype::PROPERTY_GET => self.property_get(sqe),
            fctype::PROPERTY_SET => self.property_set(sqe),
            fctype::DISCONNECT => {
                if self.qid != Some(0) {
                    // The response goes out before the connection ends.
                    let c = cqe(
                        0,
                        0,
                        self.sqhd,
                        self.qid.unwrap_or(0),
                        sqe.cid(),
                        NvmeStatus::SUCCESS,
                    );
                    let hd = self.limits.hdgst;
                    self.push_with(|v| pdu::capsule_resp(v, &c, hd));
                    self.end(End::Disconnected);
                    return Answer::default().silent();
                }
                Answer::err(status::INVALID_FIELD)
            }
            _ => Answer::err(status::INVALID_OPCODE),
        }
    }

    fn connect(&mut self, sqe: &Sqe, data: Option<&[u8]>) -> Answer {
        if self.qid.is_some() {
            return Answer::err(status::COMMAND_SEQUENCE_ERROR);
        }
        let Some(data) = data.filter(|d| d.len() >= CONNECT_DATA_LEN) else {
            return Answer::refuse(
                status::CONNECT_INVALID_PARAMETERS,
                invalid_parameter(false, 24),
            );
        };
        let c = match Connect::parse(sqe, data) {
            Ok(c) => c,
            Err(dw0) => return Answer::refuse(status::CONNECT_INVALID_PARAMETERS, dw0),
        };
        let refuse = Answer::refuse;
        if c.recfmt != 0 {
            return refuse(
                status::CONNECT_INCOMPATIBLE_FORMAT,
                invalid_parameter(false, connect_at::RECFMT),
            );
        }
        let target = self.target.clone();
        let discovery = c.subnqn == DISCOVERY_NQN;
        let subsys = if discovery {
            None
        } else {
            match target.subsystem_index(&c.subnqn) {
                Some(i) => Some(i),
                None => {
                    log::warn!("{}: Connect to unknown subsystem {}", self.peer, c.subnqn);
                    return refuse(
                        status::CONNECT_INVALID_PARAMETERS,
                        invalid_parameter(true, connect_at::SUBNQN),
                    );
                }
            }
        };
        if let Some(i) = subsys {
            if !target.subsystems[i].allows(&c.hostnqn) {
                log::warn!(
                    "{}: host {} is not allowed on {}",
                    self.peer,
                    c.hostnqn,
                    c.subnqn
                );
                return refuse(
                    status::CONNECT_INVALID_HOST,
                    invalid_parameter(true, connect_at::HOSTNQN),
                );
            }
        }
        let max_entries = if c.qid == 0 {
            ADMIN_QUEUE_ENTRIES
        } else {
            target.limits.queue_entries
        };
        if c.sqsize == 0 || c.sqsize >= max_entries {
            return refuse(
                status::CONNECT_INVALID_PARAMETERS,
                invalid_parameter(false, connect_at::SQSIZE),
            );
        }
        let ctrl = if c.qid == 0 {
            match target.create_ctrl(subsys, &c.hostnqn) {
                Ok(x) => x,
                Err((s, dw0)) => return refuse(s, dw0),
            }
        } else {
            let Some(i) = subsys else {
                return refuse(
                    status::CONNECT_INVALID_PARAMETERS,
                    invalid_parameter(false, connect_at::QID),
                );
            };
            match target.attach_io_queue(c.cntlid, i, &c.hostnqn, c.qid) {
                Ok(x) => x,
                Err((s, dw0)) => return refuse(s, dw0),
            }
        };
        self.qid = Some(c.qid);
        self.entries = c.sqsize + 1;
        self.sqflow = c.cattr & CATTR_DISABLE_SQFLOW == 0;
        self.reqs = (0..self.entries).map(|_| None).collect();
        if c.qid == 0 {
            self.admin = Some(AdminState {
                cc: 0,
                csts: 0,
                kato: (c.kato > 0).then(|| Duration::from_millis(c.kato as u64)),
                last_keep_alive: Instant::now(),
                aers: Vec::new(),
                aec: 0,
            });
        } else {
            self.limits.in_capsule = target.limits.in_capsule;
        }
        log::info!(
            "{}: host {} connected queue {} of controller {} ({}), {} entries",
            self.peer,
            c.hostnqn,
            c.qid,
            ctrl.cntlid,
            c.subnqn,
            self.entries
        );
        let cntlid = ctrl.cntlid;
        self.ctrl = Some(ctrl);
        Answer::ok(cntlid as u32)
    }

    fn cap(&self) -> u64 {
        let mqes = (self.target.limits.queue_entries - 1) as u64;
        mqes | 1 << 16 | 15 << 24 | 1 << 37
    }

    fn property_get(&mut self, sqe: &Sqe) -> Answer {
        let size8 = sqe.0[40] & 1 != 0;
        let offset = sqe.fabrics_u32(44);
        let a = self.admin.as_ref().expect("the admin queue");
        let v: u64 = match (offset, size8) {
            (0x00, true) => self.cap(),
            (0x08, false) => 0x0001_0300,
            (0x14, false) => a.cc as u64,
            (0x1c, false) => a.csts as u64,
            _ => return Answer::err(status::INVALID_FIELD),
        };
        Answer {
            dw0: v as u32,
            dw1: (v >> 32) as u32,
            ..Answer::default()
        }
    }

    fn property_set(&mut self, sqe: &Sqe) -> Answer {
        let size8 = sqe.0[40] & 1 != 0;
        let offset = sqe.fabrics_u32(44);
        let value = sqe.fabrics_u64(48);
        if offset != 0x14 || size8 {
            return Answer::err(status::INVALID_FIELD);
        }
        let a = self.admin.as_mut().expect("the admin queue");
        let cc = value as u32;
        a.cc = cc;
        let mut csts = if cc & 1 != 0 { 1 } else { 0 };
        if (cc >> 14) & 3 != 0 {
            // Shutdown: every command of the host was answered after the device completed it
            // (volatile data is the device's to keep, flushed by the host's Flush).
            csts |= 2 << 2;
        }
        a.csts = csts;
        Answer::ok(0)
    }

    fn admin_cmd(&mut self, sqe: &Sqe) -> Answer {
        let ctrl = self.ctrl.clone().expect("connected");
        let target = self.target.clone();
        if let Some(a) = self.admin.as_mut() {
            a.last_keep_alive = Instant::now();
        }
        let sgl_len = sqe.sgl().len as usize;
        match sqe.opcode() {
            admin_op::KEEP_ALIVE => Answer::ok(0),
            admin_op::IDENTIFY => {
                let cns = (sqe.cdw(10) & 0xff) as u8;
                if sgl_len < 4096 && sgl_len != 0 {
                    // Answer::data truncates to the descriptor; allowed.
                }
                match (cns, ctrl.discovery) {
                    (0x01, _) => Answer::data(target.identify_ctrl(&ctrl)),
                    (0x00 | 0x03, false) => {
                        match target.identify_ns(ctrl.subsys, sqe.nsid(), cns) {
                            Ok(d) => Answer::data(d),
                            Err(s) => Answer::err(s),
                        }
                    }
                    (0x02, false) => {
                        if sqe.nsid() >= 0xffff_fffe {
                            Answer::err(status::INVALID_NAMESPACE)
                        } else {
                            Answer::data(target.active_ns_list(ctrl.subsys, sqe.nsid()))
                        }
                    }
                    _ => Answer::err(status::INVALID_FIELD),
                }
            }
            admin_op::GET_LOG_PAGE => {
                let (lid, offset, len) = log_page_args(sqe);
                if len > sgl_len.max(4) {
                    return Answer::err(status::SGL_LENGTH_INVALID);
                }
                match (lid, ctrl.discovery) {
                    (0x70, true) => Answer::data(slice_padded(
                        &target.discovery_log(&ctrl.hostnqn),
                        offset,
                        len,
                    )),
                    (0x70, false) | (_, true) => Answer::err(status::INVALID_LOG_PAGE),
                    (0x04, false) => Answer::data(vec![0; len]),
                    (l, false) => match target.device_log(ctrl.subsys, l, offset, len) {
                        Ok(d) => Answer::data(d),
                        Err(s) => Answer::err(s),
                    },
                }
            }
            admin_op::SET_FEATURES => {
                let fid = (sqe.cdw(10) & 0xff) as u8;
                let a = self.admin.as_mut().expect("admin");
                match fid {
                    0x07 if !ctrl.discovery => {
                        if !ctrl
                            .queues
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .is_empty()
                        {
                            return Answer::err(status::COMMAND_SEQUENCE_ERROR);
                        }
                        let nsqr = (sqe.cdw(11) & 0xffff) as u16;
                        let ncqr = (sqe.cdw(11) >> 16) as u16;
                        if nsqr == 0xffff || ncqr == 0xffff {
                            return Answer::err(status::INVALID_FIELD);
                        }
                        let n = (nsqr.min(ncqr) as u32 + 1).min(target.limits.max_io_queues as u32);
                        ctrl.io_queues.store(n as u16, Ordering::Release);
                        Answer::ok((n - 1) | (n - 1) << 16)
                    }
                    0x0b => {
                        a.aec = sqe.cdw(11);
                        Answer::ok(0)
                    }
                    0x0f => {
                        let ms = sqe.cdw(11);
                        a.kato = (ms > 0).then(|| Duration::from_millis(ms as u64));
                        Answer::ok(0)
                    }
                    _ => Answer::err(status::INVALID_FIELD),
                }
            }
            admin_op::GET_FEATURES => {
                let fid = (sqe.cdw(10) & 0xff) as u8;
                let a = self.admin.as_ref().expect("admin");
                match fid {
                    0x07 if !ctrl.discovery => {
                        let n = ctrl.io_queues.load(Ordering::Acquire).max(1) as u32;
                        Answer::ok((n - 1) | (n - 1) << 16)
                    }
                    0x0b => Answer::ok(a.aec),
                    0x0f => Answer::ok(a.kato.map_or(0, |k| k.as_millis() as u32)),
                    0x06 if !ctrl.discovery => {
                        let vwc = target.subsystems[ctrl.subsys]
                            .namespaces
                            .first()
                            .and_then(|n| target.devices[n.dev].get_features(0x06, 0).ok())
                            .unwrap_or(0);
                        Answer::ok(vwc)
                    }
                    _ => Answer::err(status::INVALID_FIELD),
                }
            }
            admin_op::ASYNC_EVENT => {
                let a = self.admin.as_mut().expect("admin");
                if a.aers.len() >= AER_MAX {
                    return Answer::err(status::AER_LIMIT_EXCEEDED);
                }
                a.aers.push(sqe.cid());
                // Held: answered when there is an event.
                Answer::default().silent()
            }
            admin_op::ABORT => Answer::ok(1),
            _ => Answer::err(status::INVALID_OPCODE),
        }
    }

    /// A DMA buffer of device `dev` for `len` bytes: a spare one, or a new one (None: the
    /// device's pool has no memory now).
    fn take_buffer(&mut self, dev: usize, len: usize) -> Option<DmaBuffer> {
        let class = len.next_power_of_two().max(4096);
        if let Some(i) = self
            .spare
            .iter()
            .position(|(d, b)| *d == dev && b.len() == class)
        {
            return Some(self.spare.swap_remove(i).1);
        }
        self.target.devices[dev].alloc(class).ok()
    }

    /// Keeps a buffer whose command completed (and whose data was sent) for another command.
    fn give_buffer(&mut self, dev: usize, buf: DmaBuffer) {
        if self.spare.len() < SPARE_BUFFERS && self.ending.is_none() {
            self.spare.push((dev, buf));
        }
    }

    // ---- sending ----

    fn push_bytes(&mut self, b: &[u8]) {
        self.push_with(|v| v.extend_from_slice(b));
    }

    fn push_with(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        if let Some(Out::Bytes(v)) = self.tx.back_mut() {
            f(v);
        } else {
            let mut v = Vec::with_capacity(256);
            f(&mut v);
            self.tx.push_back(Out::Bytes(v));
        }
    }

    /// Sends what is queued, as far as the socket takes it. Returns whether anything went.
    pub fn flush(&mut self) -> bool {
        let mut progress = false;
        while !self.tx.is_empty() {
            let mut parts: Vec<SendPart<'_>> = Vec::with_capacity(8);
            for (i, o) in self.tx.iter().take(SEND_PARTS_MAX).enumerate() {
                let skip = if i == 0 { self.tx_off } else { 0 };
                parts.push(match o {
                    Out::Bytes(b) => SendPart::Bytes(&b[skip..]),
                    Out::Dma(buf, off, len, _) => SendPart::Dma(buf, off + skip, len - skip),
                });
            }
            match send_vectored(self.sock.as_fd(), &parts) {
                Ok(mut n) => {
                    drop(parts);
                    progress = true;
                    while n > 0 {
                        let front = self.tx.front().expect("bytes were sent from it").len();
                        let left = front - self.tx_off;
                        if n >= left {
                            n -= left;
                            if let Some(Out::Dma(b, _, _, dev)) = self.tx.pop_front() {
                                // Sent: the kernel has its own copy.
                                self.give_buffer(dev, b);
                            }
                            self.tx_off = 0;
                        } else {
                            self.tx_off += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.tx.clear();
                    self.tx_off = 0;
                    if self.ending.is_none() {
                        self.end(End::Io(e));
                    }
                    break;
                }
            }
        }
        progress
    }

    /// Answers the held Asynchronous Event Requests as aborted (the controller is going).
    pub fn abort_held(&mut self) {
        if let Some(a) = self.admin.as_mut() {
            let aers = std::mem::take(&mut a.aers);
            for cid in aers {
                self.respond(cid, NvmeStatus::ABORTED_SQ_DELETION, 0);
            }
        }
    }

    /// Stops taking commands (shutdown): what is at the device completes and is answered.
    pub fn quiesce(&mut self) {
        self.pending.clear();
    }
}

/// CRC32C of `len` bytes of `buf` at `at`, continuing `crc` (read out in small pieces: the
/// digest is computed from a copy, the data itself is never copied).
fn crc_of(buf: &DmaBuffer, at: usize, len: usize, crc: u32) -> u32 {
    let mut chunk = [0u8; 4096];
    let mut crc = crc;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len());
        buf.read_bytes(at + done, &mut chunk[..n]);
        crc = crc32c::crc32c_append(crc, &chunk[..n]);
        done += n;
    }
    crc
}

impl Answer {
    /// An answer that sends nothing (held, or already sent).
    fn silent(self) -> Answer {
        Answer {
            status: Some(SILENT),
            ..self
        }
    }
}

/// Marks an [`Answer`] that sends nothing.
const SILENT: NvmeStatus = NvmeStatus::new(7, 0xff);

impl Answer {
    /// The answer, unless it sends nothing.
    fn into_sent(self) -> Option<Answer> {
        (self.status != Some(SILENT)).then_some(self)
    }
}
