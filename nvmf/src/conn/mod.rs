//! One NVMe/TCP connection: one queue (admin or I/O) of a fabric controller. Reads PDUs from a
//! non-blocking socket, runs admin and fabrics commands itself, hands I/O commands to the
//! device queue pairs of its poll thread, and sends data and responses back.
//!
//! Data never takes a detour through ordinary memory when it can go straight: a read's data
//! is sent from the DMA buffer the device filled (`writev` with the PDU headers around it), and
//! a write's data is received into the DMA buffer the device then reads, directly from the
//! socket when the bytes are still in the kernel. Bytes that arrived in the same `read` as the
//! header before them are copied once from the receive buffer, as SPDK's receive pipe does.
//!
//! Here: the connection's state, its timers and its end; `rx` receives PDUs, `io` runs I/O
//! commands on the device, `admin` answers admin and fabrics commands, `tx` sends.

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

mod admin;
mod io;
mod rx;
mod tx;

use tx::crc_of;

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
/// Bytes queued for a host past which its connection reads no more commands until some
/// have gone (8 MiB: 64 reads of 128 KiB).
const TX_BACKLOG_MAX: usize = 8 << 20;
/// How long an ending connection may take to send what is left for its host.
const SEND_DEADLINE: Duration = Duration::from_secs(30);
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

/// What [`Conn::timer`] runs.
enum Timer {
    /// The connect timeout.
    Connect(Duration),
    /// Keep alive, with the host's KATO.
    KeepAlive(Duration),
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
    /// Bytes of everything in `tx` (sent ones of its first item included: see `tx_off`).
    tx_bytes: usize,
    /// When the connection started ending (what it still has to send gets until
    /// [`SEND_DEADLINE`] after that).
    ended_at: Option<Instant>,
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
            tx_bytes: 0,
            ended_at: None,
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
                )
                // A host that does not read what is left for it does not keep the
                // connection (and its buffers) for ever.
                || self.ended_at.is_some_and(|t| t.elapsed() > SEND_DEADLINE))
    }

    /// Bytes queued for the host and not sent yet.
    pub(super) fn unsent(&self) -> usize {
        self.tx_bytes - self.tx_off
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
        s.unsent = self.unsent();
        s
    }

    /// Whether the connection reads what its host sends now (see `poll_rx`).
    pub fn wants_read(&self) -> bool {
        self.ending.is_none() && self.unsent() <= TX_BACKLOG_MAX
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
            self.tx_bytes += v.len();
            self.tx.push_back(Out::Bytes(v));
        } else {
            log::info!("{}: connection ends: {why}", self.peer);
        }
        self.pending.clear();
        self.ending = Some(why);
        self.ended_at = Some(Instant::now());
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

    /// The connection's running timer and when it expires: until a queue is connected, the
    /// connect timeout; on an admin queue with keep alive, 1.5 × KATO after the last command.
    fn timer(&self) -> Option<(Instant, Timer)> {
        if self.ending.is_some() {
            return None;
        }
        if self.qid.is_none() {
            let limit = Duration::from_millis(self.target.limits.connect_timeout_ms);
            return Some((self.created + limit, Timer::Connect(limit)));
        }
        let a = self.admin.as_ref()?;
        let k = a.kato?;
        Some((a.last_keep_alive + k + k / 2, Timer::KeepAlive(k)))
    }

    /// When [`Conn::check`] would next end the connection by a timer, if nothing happens
    /// before: its connect deadline, or its keep-alive deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.timer().map(|(at, _)| at)
    }

    /// Timers: the connect timeout, keep alive, and the controller's end.
    pub fn check(&mut self, now: Instant) {
        if let Some((at, timer)) = self.timer() {
            if now > at {
                self.end(End::Timeout(match timer {
                    Timer::Connect(limit) => {
                        format!("no queue connected within {} ms", limit.as_millis())
                    }
                    Timer::KeepAlive(k) => {
                        format!("keep alive timeout ({} ms) expired", k.as_millis())
                    }
                }));
                return;
            }
        }
        if self.ending.is_none()
            && self.qid.is_some()
            && self.admin.is_none()
            && self
                .ctrl
                .as_ref()
                .is_some_and(|c| c.dead.load(Ordering::Acquire))
        {
            self.end(End::ControllerGone);
        }
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
