//! What clients send a reactor and how answers come back: requests, their data, replies.

use std::sync::Arc;

use crate::clock::Ticks;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::dma::{DmaBuffer, DmaLease};
use crate::error::Error;
use crate::spec::SqEntry;
use crate::status::NvmeStatus;

use super::*;

/// The data of one request.
#[derive(Debug, Default)]
pub enum IoData {
    /// A command without data.
    #[default]
    None,
    /// One contiguous range of a buffer the caller keeps ([`DmaBuffer::lease`]): the lease
    /// keeps its memory from going back to the pool until the command is done, and the caller
    /// must leave the bytes alone until the request is answered.
    Segment(DmaLease),
    /// Scattered ranges, with the same rule as [`IoData::Segment`].
    Segments(Vec<DmaLease>),
    /// `len` bytes at `offset` of a buffer that travels with the request and comes back in
    /// [`IoDone::buf`]: nothing can free or reuse it while the device may still touch it.
    Buffer {
        /// The buffer.
        buf: DmaBuffer,
        /// Where the data starts in it.
        offset: usize,
        /// Bytes of data.
        len: usize,
    },
}

impl IoData {
    /// The whole of `buf`.
    pub fn buffer(buf: DmaBuffer) -> IoData {
        let len = buf.len();
        IoData::Buffer {
            buf,
            offset: 0,
            len,
        }
    }

    pub(super) fn take_buf(&mut self) -> Option<DmaBuffer> {
        match std::mem::take(self) {
            IoData::Buffer { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The device may still use this data: never let its memory go back.
    pub(super) fn quarantine(&self) {
        match self {
            IoData::None => {}
            IoData::Segment(l) => l.quarantine(),
            IoData::Segments(v) => v.iter().for_each(DmaLease::quarantine),
            IoData::Buffer { buf, .. } => buf.quarantine(),
        }
    }
}

/// One command for the reactor.
#[derive(Debug)]
pub struct IoRequest {
    /// The command (its command identifier is filled in by the queue pair).
    pub cmd: SqEntry,
    /// Its data.
    pub data: IoData,
    /// A value of the caller's, handed back in [`IoDone::tag`].
    pub tag: u64,
    /// A separate metadata buffer (MPTR), for namespaces that keep metadata apart from the
    /// data ([`crate::io::IoQueuePair::submit_with_metadata`]).
    pub metadata: Option<DmaLease>,
    /// Index of the queue pair (in the order given to [`Reactor::spawn`]) that must run the
    /// command, or `None` for the least busy one. Queue pairs of different controllers are
    /// not interchangeable: pin requests when a reactor owns more than one controller's.
    pub queue: Option<usize>,
}

impl IoRequest {
    /// A request for any queue pair.
    pub fn new(cmd: SqEntry, data: IoData, tag: u64) -> IoRequest {
        IoRequest {
            cmd,
            data,
            tag,
            metadata: None,
            queue: None,
        }
    }

    /// The same request with a separate metadata buffer.
    pub fn with_metadata(mut self, metadata: DmaLease) -> IoRequest {
        self.metadata = Some(metadata);
        self
    }

    /// The same request, pinned to queue pair `index`.
    pub fn on_queue(mut self, index: usize) -> IoRequest {
        self.queue = Some(index);
        self
    }
}

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// The controller completed the command with an error status.
    #[error("{reactor}: command (opcode {opcode:#04x}) failed: {status}")]
    Status {
        /// The name of the reactor ([`ReactorConfig::name`]) that ran it.
        reactor: String,
        /// The command's opcode.
        opcode: u8,
        /// Its completion status.
        status: NvmeStatus,
    },
    /// The command could not be queued (a data pointer the builder refused, a queue index
    /// that does not exist).
    #[error("the reactor could not queue the command: {0}")]
    Submit(#[source] Error),
    /// The reactor stopped (or died) before the command completed; the request may or may not
    /// have reached the device.
    #[error("the reactor stopped before the command completed; submit it to a running reactor")]
    Stopped,
}

impl ReactorError {
    /// The NVMe status, for a command the controller failed.
    pub fn status(&self) -> Option<NvmeStatus> {
        match self {
            ReactorError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The answer to one request.
#[derive(Debug)]
pub struct IoDone {
    /// The request's tag.
    pub tag: u64,
    /// Completion DW0, or why the request failed.
    pub result: Result<u32, ReactorError>,
    /// The buffer of an [`IoData::Buffer`] request.
    pub buf: Option<DmaBuffer>,
    /// When the reactor reaped the completion (or gave the request up).
    pub completed: Ticks,
}

/// Where the answer to a request goes.
pub enum Reply {
    /// Called once with the answer.
    Callback(Box<dyn FnOnce(IoDone) + Send>),
    /// Sent on this channel (a send to a dropped receiver is ignored).
    Channel(Sender<IoDone>),
    /// Sent on this channel, then `thread` is unparked: for a client that waits with
    /// [`wait_parked`], which sleeps without the busy spinning a blocking channel receive does
    /// first (on an emulated CPU each spin-loop hint can stop the world for a moment).
    Wake(Sender<IoDone>, std::thread::Thread),
    /// Given to a [`Completer`] shared by many requests: no allocation per request, and
    /// follow-up requests go straight into the reactor (see [`Next`]).
    Completer(Arc<dyn Completer>),
}

/// A completion handler shared by many requests, SPDK style: where a [`Reply::Callback`]
/// allocates a closure per request, a [`Reply::Completer`] holds one reference count.
pub trait Completer: Send + Sync + 'static {
    /// The answer to one request. Runs on the reactor thread (or, for a request that never
    /// reached it, on the thread that gave it up) and must be short. Requests sent through
    /// `next` are answered by this completer too; the reactor takes them as soon as the
    /// answers of the current poll are handled, so they share the next doorbell. A completer
    /// must not send more in answer to [`ReactorError::Stopped`]: the reactor is going away.
    fn complete(&self, done: IoDone, next: &mut Next<'_>);
}

/// Follow-up requests of a [`Completer`].
pub struct Next<'a> {
    completer: &'a Arc<dyn Completer>,
    /// The reactor's list of follow-ups; where no reactor runs (the request was given up), a
    /// list of this answer's own whose requests are answered Stopped once `complete` returns.
    follow: &'a mut Vec<Job>,
}

impl Next<'_> {
    /// Send `req`, answered by the same completer.
    #[inline]
    pub fn submit(&mut self, req: IoRequest) {
        self.follow.push(Job {
            req,
            reply: Some(Reply::Completer(self.completer.clone())),
            issued: None,
        });
    }
}

/// Where the answers of one poll leave things for the reactor to finish after it.
pub(super) struct Sink<'a> {
    /// Clients to unpark.
    pub(super) wakes: &'a mut Vec<std::thread::Thread>,
    /// Requests [`Completer`]s sent.
    pub(super) follow: &'a mut Vec<Job>,
}

/// Wait for an answer on `rx` of requests sent with [`Reply::Wake`] naming this thread: takes
/// what is there, or parks until the reactor unparks this thread. Never spins.
pub fn wait_parked(rx: &Receiver<IoDone>) -> IoDone {
    loop {
        match rx.try_recv() {
            Ok(d) => return d,
            Err(TryRecvError::Empty) => std::thread::park(),
            // Unreachable while the caller holds a sender, as clients do; without one every
            // request was answered already.
            Err(TryRecvError::Disconnected) => std::thread::park(),
        }
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reply::Callback(_) => "Reply::Callback",
            Reply::Channel(_) => "Reply::Channel",
            Reply::Wake(..) => "Reply::Wake",
            Reply::Completer(_) => "Reply::Completer",
        })
    }
}

impl Reply {
    pub(super) fn send(self, done: IoDone) {
        self.send_deferring(done, None)
    }

    /// Answer. With a `sink` (on the reactor thread, answering a poll): a [`Reply::Wake`]'s
    /// thread goes into its `wakes` (once) instead of being unparked at once, so that the
    /// reactor unparks each client once per poll, after all of the poll's answers are on
    /// their channels, and a client wakes to a whole batch; a [`Completer`]'s follow-ups go
    /// into its `follow`.
    pub(super) fn send_deferring(self, done: IoDone, sink: Option<&mut Sink<'_>>) {
        match self {
            Reply::Callback(f) => {
                // A panicking callback must not take the reactor, and every other request in
                // flight on it, down with it.
                let tag = done.tag;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(done))).is_err() {
                    log::error!("the completion callback of request {tag} panicked");
                }
            }
            Reply::Completer(c) => {
                let tag = done.tag;
                let mut orphans = Vec::new();
                let mut next = Next {
                    completer: &c,
                    follow: match sink {
                        Some(s) => &mut *s.follow,
                        None => &mut orphans,
                    },
                };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    c.complete(done, &mut next)
                }))
                .is_err()
                {
                    log::error!("the completer of request {tag} panicked");
                }
                // Sent with no reactor to take them: answered Stopped here, after the
                // completer returned (and let go of whatever it held).
                drop(orphans);
            }
            Reply::Wake(tx, thread) => {
                let _ = tx.send(done);
                match sink.map(|s| &mut *s.wakes) {
                    Some(w) => {
                        if !w.iter().any(|t| t.id() == thread.id()) {
                            w.push(thread);
                        }
                    }
                    None => thread.unpark(),
                }
            }
            Reply::Channel(tx) => {
                let _ = tx.send(done);
            }
        }
    }
}
