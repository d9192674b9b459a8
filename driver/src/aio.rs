//! Futures for the I/O commands of a queue pair, for any async runtime.
//!
//! An [`AsyncQueuePair`] wraps an [`IoQueuePair`]; any number of tasks (on any threads)
//! share it through clones, and each command is a future: [`AsyncQueuePair::read`],
//! [`write`](AsyncQueuePair::write), [`compare`](AsyncQueuePair::compare),
//! [`flush`](AsyncQueuePair::flush), [`write_zeroes`](AsyncQueuePair::write_zeroes) and
//! [`deallocate`](AsyncQueuePair::deallocate). A future submits its command(s) when first
//! polled (splitting a transfer at the device's maximum) and is ready when every completion
//! was reaped. Nothing depends on one runtime: each command keeps its task's waker, and
//! completions are reaped by whoever gets there — the futures themselves, the queue pair's own
//! reaper thread sleeping on its interrupt, a poller task ([`AsyncQueuePair::poller`]), or
//! the runtime when the interrupt's eventfd becomes readable (see [`Drive`]).
//!
//! Memory: a read or write future owns its [`DmaBuffer`] and gives it back with the result. A
//! future dropped before its completion does not take memory from the device: the queue pair
//! holds a share of every buffer a command uses until its completion is reaped (or the
//! controller is stopped), so dropping the buffer with the future returns nothing to the pool
//! early — the rule of [`crate::queue`]. The command's completion is then reaped and
//! discarded.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::clock::Stopwatch;

use crate::dma::{DmaBuffer, DmaLease, DmaSlice};
use crate::error::{Error, Result};
use crate::identify::NamespaceInfo;
use crate::io::{
    check_range, compare_cmd, deallocate_cmd, flush_cmd, read_cmd, split_transfer, write_cmd,
    write_zeroes_cmd, IoQueuePair,
};
use crate::irq::{Interrupt, WaitMode};
use crate::queue::Completion;
use crate::spec::SqEntry;
use crate::status::NvmeStatus;

/// How long a future of [`Drive::Poll`] keeps polling an empty completion queue before it
/// yields to the executor.
const POLL_SPIN: Duration = Duration::from_micros(50);
/// Polls between two looks at the clock while spinning: in a guest, reading the time-stamp
/// counter costs more than many polls of an empty completion queue.
const POLL_CLOCK_EVERY: u32 = 256;

/// Who reaps completions for the futures of an [`AsyncQueuePair`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Drive {
    /// The futures poll the completion queue themselves and ask to be polled again at once
    /// while their command is outstanding: the lowest latency, the executor's thread busy.
    /// For a polled queue pair. Every pending future is polled again and again: with many
    /// futures in flight, [`Drive::Poller`] costs the executor less.
    Poll,
    /// A task of its own reaps: spawn [`AsyncQueuePair::poller`] on the executor. Futures
    /// sleep until the poller wakes them, so the executor polls only the poller and the
    /// futures whose commands completed; the commands that the woken tasks submit go to the
    /// controller with one doorbell at the poller's next turn. The poller spins while commands
    /// are outstanding (a polled queue pair: the executor's thread stays busy) and sleeps
    /// while none are. For a polled queue pair.
    Poller,
    /// A thread of the queue pair's own waits as the queue pair's [`WaitMode`] says
    /// (interrupt, or hybrid: spinning first) and reaps; futures sleep until woken. For a
    /// queue pair created with interrupts.
    Reaper,
    /// The owner reaps: it calls [`AsyncQueuePair::reap_interrupt`] whenever the interrupt's
    /// eventfd ([`AsyncQueuePair::interrupt`]) is readable, for example through tokio's
    /// `AsyncFd`, or [`AsyncQueuePair::reap`] on its own schedule; futures sleep until woken.
    /// Reap now and then even without a signal (every 100 ms, say): reaping is also when the
    /// queue pair checks its commands' deadlines, for a device that never answers.
    External,
}

/// A command's progress, by its index (its commands' tag).
#[derive(Default)]
struct Op {
    in_use: bool,
    /// Commands submitted and not yet completed.
    outstanding: u32,
    /// Every command of the operation was submitted (or submitting stopped at an error).
    all_submitted: bool,
    /// The future was dropped: discard the result when the last completion comes.
    abandoned: bool,
    status: Option<NvmeStatus>,
    waker: Option<Waker>,
    /// Counted in [`State::ready`].
    ready: bool,
}

impl Op {
    fn done(&self) -> bool {
        self.all_submitted && self.outstanding == 0
    }
}

struct State {
    qp: IoQueuePair,
    ops: Vec<Op>,
    free: Vec<usize>,
    /// Futures waiting for a free slot in the submission queue.
    slot_waiters: Vec<Waker>,
    /// Operations complete whose futures have not yet collected the result.
    ready: usize,
    /// The poller task of [`Drive::Poller`], parked while nothing is outstanding.
    poller: Option<Waker>,
}

impl State {
    fn take_op(&mut self) -> usize {
        let i = self.free.pop().unwrap_or_else(|| {
            self.ops.push(Op::default());
            self.ops.len() - 1
        });
        self.ops[i] = Op {
            in_use: true,
            ..Op::default()
        };
        i
    }

    fn release_op(&mut self, i: usize) {
        if self.ops[i].ready {
            self.ready -= 1;
        }
        self.ops[i] = Op::default();
        self.free.push(i);
    }

    /// Reap what the completion queue holds and wake the futures whose commands are done
    /// (under the lock: a waker only schedules its task, and a task that runs meanwhile on
    /// another thread waits for the lock at most as long as this reap).
    fn reap(&mut self) -> usize {
        let State {
            qp,
            ops,
            free,
            ready,
            ..
        } = self;
        let mut finished = Vec::new();
        let n = qp.poll(usize::MAX, |c: Completion| {
            let Some(op) = ops.get_mut(c.tag as usize).filter(|o| o.in_use) else {
                log::warn!("async queue pair: completion with unknown tag {:#x}", c.tag);
                return;
            };
            op.outstanding -= 1;
            if !c.status.is_success() && op.status.is_none() {
                op.status = Some(c.status);
            }
            if op.done() {
                if op.abandoned {
                    finished.push(c.tag as usize);
                } else {
                    *ready += 1;
                    op.ready = true;
                    if let Some(w) = op.waker.take() {
                        w.wake();
                    }
                }
            }
        });
        for i in finished {
            ops[i] = Op::default();
            free.push(i);
        }
        if n > 0 {
            self.slot_waiters.drain(..).for_each(Waker::wake);
        }
        n
    }
}

/// What a command needs to know of a namespace, kept at creation (no lock, no copy per
/// command).
struct NsFacts {
    info: NamespaceInfo,
    /// Bytes of the data buffer per LBA and the largest transfer, or why the async API cannot
    /// move this namespace's data.
    data: std::result::Result<(u32, u32), String>,
}

struct Inner {
    state: Mutex<State>,
    namespaces: Vec<NsFacts>,
    irq: Option<Arc<Interrupt>>,
    drive: Drive,
    dev: String,
}

impl Drop for Inner {
    /// The last handle is gone: a parked poller wakes to find it so and end.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = st.poller.take() {
            w.wake();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap(&self) -> usize {
        let n = self.lock().reap();
        n
    }
}

/// An I/O queue pair whose commands are futures; clones share it. See the module
/// documentation.
#[derive(Clone)]
pub struct AsyncQueuePair {
    inner: Arc<Inner>,
}

impl AsyncQueuePair {
    /// Make `qp` asynchronous, its completions reaped as `drive` says. [`Drive::Reaper`]
    /// needs a queue pair created with interrupts ([`WaitMode::Interrupt`] or
    /// [`WaitMode::Hybrid`]; its spin budget is the reaper's), and starts the reaper thread,
    /// which ends a little after the last clone (and future) is dropped.
    pub fn new(qp: IoQueuePair, drive: Drive) -> Result<AsyncQueuePair> {
        let irq = qp.interrupt().cloned();
        if matches!(drive, Drive::Reaper | Drive::External) && irq.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{:?} reaping sleeps on the queue pair's interrupt: create it with \
                 WaitMode::Interrupt or Hybrid (queue {} is polled)",
                drive,
                qp.qid()
            )));
        }
        if drive == Drive::External {
            // The runtime waits on the eventfd: a vector left masked by an earlier hybrid wait
            // would never signal it.
            if let Some(irq) = &irq {
                irq.unmask();
            }
        }
        let spin = match qp.wait_mode() {
            WaitMode::Hybrid { spin } => spin,
            _ => Duration::ZERO,
        };
        let namespaces = qp
            .namespaces()
            .iter()
            .map(|ns| NsFacts {
                info: ns.clone(),
                data: match ns.layout() {
                    Ok(l) if l.metadata_per_lba > 0 && !l.pract => Err(format!(
                        "namespace {} keeps metadata in a separate buffer: the async API moves \
                         data only",
                        ns.nsid
                    )),
                    Ok(l) => Ok((l.data_per_lba, qp.max_transfer_for(l.data_per_lba))),
                    Err(why) => Err(why),
                },
            })
            .collect();
        let inner = Arc::new(Inner {
            namespaces,
            dev: qp.device_name().to_string(),
            state: Mutex::new(State {
                qp,
                ops: Vec::new(),
                free: Vec::new(),
                slot_waiters: Vec::new(),
                poller: None,
                ready: 0,
            }),
            irq,
            drive,
        });
        if drive == Drive::Reaper {
            let weak = Arc::downgrade(&inner);
            let irq = inner.irq.clone().expect("checked above");
            std::thread::Builder::new()
                .name(format!("rnvme-reaper-{}", inner.dev))
                .spawn(move || reaper(weak, irq, spin))
                .map_err(|e| Error::InvalidArgument(format!("starting the reaper thread: {e}")))?;
        }
        Ok(AsyncQueuePair { inner })
    }

    /// The interrupt vector the completion queue signals, if it has one: for
    /// [`Drive::External`], wait until its eventfd is readable, then call
    /// [`AsyncQueuePair::reap_interrupt`].
    pub fn interrupt(&self) -> Option<Arc<Interrupt>> {
        self.inner.irq.clone()
    }

    /// The poller of [`Drive::Poller`]: a future that reaps for this queue pair's futures
    /// until every other handle of it is gone (it then ends). Spawn it once on the executor
    /// the futures run on (or any other). Each turn rings the doorbell for what was
    /// submitted since the last, reaps, and wakes the futures whose commands completed; with
    /// nothing found it polls on for up to 50 µs, then yields to the executor; with nothing
    /// outstanding it sleeps until a future submits.
    pub fn poller(&self) -> Poller {
        Poller {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Who reaps for this queue pair's futures.
    pub fn drive(&self) -> Drive {
        self.inner.drive
    }

    /// Reap the completions that are there and wake their futures; how many there were.
    pub fn reap(&self) -> usize {
        self.inner.reap()
    }

    /// Consume the interrupt's signal, then reap (in that order, so a completion that lands
    /// meanwhile signals the eventfd again instead of being missed).
    pub fn reap_interrupt(&self) -> usize {
        if let Some(irq) = &self.inner.irq {
            irq.arm();
        }
        self.inner.reap()
    }

    /// Run `f` on the queue pair (its statistics, say). Completions it reaps outside this
    /// module are not its futures': do not poll it here.
    pub fn with_queue_pair<T>(&self, f: impl FnOnce(&mut IoQueuePair) -> T) -> T {
        f(&mut self.inner.lock().qp)
    }

    /// Read `blocks` LBAs at `slba` of namespace `nsid` into `buf` (from its start); the buffer
    /// comes back with the data.
    pub fn read(&self, nsid: u32, slba: u64, blocks: u64, buf: DmaBuffer) -> IoFuture {
        self.transfer(Kind::Read, nsid, slba, blocks, buf)
    }

    /// Write `blocks` LBAs at `slba` from `buf`; the buffer comes back.
    pub fn write(&self, nsid: u32, slba: u64, blocks: u64, buf: DmaBuffer, fua: bool) -> IoFuture {
        self.transfer(Kind::Write { fua }, nsid, slba, blocks, buf)
    }

    /// Compare `blocks` LBAs at `slba` with `buf`: a difference is an [`Error::Command`] with
    /// status Compare Failure.
    pub fn compare(&self, nsid: u32, slba: u64, blocks: u64, buf: DmaBuffer) -> IoFuture {
        self.transfer(Kind::Compare, nsid, slba, blocks, buf)
    }

    /// Write zeroes to `blocks` LBAs at `slba`.
    pub fn write_zeroes(&self, nsid: u32, slba: u64, blocks: u64) -> IoFuture {
        let plan = self.plan(nsid, slba, blocks, None, |p| {
            write_zeroes_cmd(nsid, p.slba, p.blocks)
        });
        IoFuture::new(self.clone(), "Write Zeroes", plan, Data::None)
    }

    /// Flush the volatile write cache of namespace `nsid`.
    pub fn flush(&self, nsid: u32) -> IoFuture {
        IoFuture::new(
            self.clone(),
            "Flush",
            Ok(Pieces::One((flush_cmd(nsid), None))),
            Data::None,
        )
    }

    /// Deallocate (trim) `blocks` LBAs at `slba` (one range of up to 2^32 - 1 LBAs).
    pub fn deallocate(&self, nsid: u32, slba: u64, blocks: u64) -> IoFuture {
        let made = (|| {
            check_range(&self.facts(nsid)?.info, slba, blocks)?;
            if blocks > u32::MAX as u64 {
                return Err(Error::InvalidArgument(format!(
                    "{blocks} LBAs in one deallocate: at most {} per range",
                    u32::MAX
                )));
            }
            let buf = self.inner.lock().qp.pool().alloc(16)?;
            buf.write_u64(0, blocks << 32);
            buf.write_u64(8, slba);
            Ok(buf)
        })();
        match made {
            Ok(buf) => IoFuture::new(
                self.clone(),
                "Dataset Management",
                Ok(Pieces::One((deallocate_cmd(nsid, 1), Some((0, 16))))),
                Data::Buffer(buf),
            ),
            Err(e) => IoFuture::new(self.clone(), "Dataset Management", Err(e), Data::None),
        }
    }

    /// [`AsyncQueuePair::read`] into memory the caller keeps a [`DmaBuffer`] of, lent as a
    /// [`DmaLease`] (from [`DmaBuffer::lease`]): the caller reads the data from its buffer
    /// once the future is ready.
    pub fn read_lease(&self, nsid: u32, slba: u64, blocks: u64, lease: DmaLease) -> IoFuture {
        self.transfer(Kind::Read, nsid, slba, blocks, Data::Lease(lease))
    }

    /// [`AsyncQueuePair::write`] from leased memory (see [`AsyncQueuePair::read_lease`]).
    pub fn write_lease(
        &self,
        nsid: u32,
        slba: u64,
        blocks: u64,
        lease: DmaLease,
        fua: bool,
    ) -> IoFuture {
        self.transfer(Kind::Write { fua }, nsid, slba, blocks, Data::Lease(lease))
    }

    fn transfer(
        &self,
        kind: Kind,
        nsid: u32,
        slba: u64,
        blocks: u64,
        buf: impl Into<Data>,
    ) -> IoFuture {
        let data = buf.into();
        let plan = self.plan(nsid, slba, blocks, Some(data.len()), |p| match kind {
            Kind::Read => read_cmd(nsid, p.slba, p.blocks),
            Kind::Write { fua } => write_cmd(nsid, p.slba, p.blocks, fua),
            Kind::Compare => compare_cmd(nsid, p.slba, p.blocks),
        });
        IoFuture::new(self.clone(), kind.name(), plan, data)
    }

    /// The commands of a transfer, split at the device's maximum, with their data ranges.
    fn plan(
        &self,
        nsid: u32,
        slba: u64,
        blocks: u64,
        buf: Option<usize>,
        make: impl Fn(crate::io::Piece) -> SqEntry,
    ) -> Result<Pieces> {
        let facts = self.facts(nsid)?;
        check_range(&facts.info, slba, blocks)?;
        let (per, max) = match buf {
            Some(b) => {
                let (per, max) = facts.data.clone().map_err(|why| Error::Unsupported {
                    dev: self.inner.dev.clone(),
                    why,
                })?;
                let need = blocks.saturating_mul(per as u64);
                if (b as u64) < need {
                    return Err(Error::InvalidArgument(format!(
                        "a buffer of {b} bytes is too small for {blocks} LBAs of {per} bytes \
                         ({need} bytes)"
                    )));
                }
                (per, max)
            }
            None => (facts.info.lba_size, u32::MAX),
        };
        Ok(split_transfer(slba, blocks, per, max)
            .map(|p| {
                let data = buf.map(|_| (p.offset as usize, p.blocks as usize * per as usize));
                (make(p), data)
            })
            .collect())
    }

    /// What the queue pair knows of namespace `nsid`.
    fn facts(&self, nsid: u32) -> Result<&NsFacts> {
        match self.inner.namespaces.iter().find(|n| n.info.nsid == nsid) {
            Some(f) => Ok(f),
            // The queue pair's own error, naming the active namespaces.
            None => Err(match self.inner.lock().qp.namespace(nsid) {
                Err(e) => e,
                Ok(_) => Error::InvalidArgument(format!(
                    "namespace {nsid} became active after the async queue pair was made"
                )),
            }),
        }
    }
}

#[derive(Copy, Clone)]
enum Kind {
    Read,
    Write { fua: bool },
    Compare,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "Read",
            Kind::Write { .. } => "Write",
            Kind::Compare => "Compare",
        }
    }
}

/// A command and the range of the future's buffer it carries.
type Piece = (SqEntry, Option<(usize, usize)>);

/// An operation's commands: most are one (no allocation for those).
enum Pieces {
    One(Piece),
    Many(Vec<Piece>),
}

impl Pieces {
    fn as_slice(&self) -> &[Piece] {
        match self {
            Pieces::One(p) => std::slice::from_ref(p),
            Pieces::Many(v) => v,
        }
    }
}

impl FromIterator<Piece> for Pieces {
    fn from_iter<I: IntoIterator<Item = Piece>>(iter: I) -> Pieces {
        let mut it = iter.into_iter();
        let Some(first) = it.next() else {
            return Pieces::Many(Vec::new());
        };
        match it.next() {
            None => Pieces::One(first),
            Some(second) => {
                let mut v = vec![first, second];
                v.extend(it);
                Pieces::Many(v)
            }
        }
    }
}

/// The memory a future's commands carry.
enum Data {
    None,
    /// Owned, and given back with the result.
    Buffer(DmaBuffer),
    /// A share of the caller's buffer.
    Lease(DmaLease),
}

impl From<DmaBuffer> for Data {
    fn from(b: DmaBuffer) -> Data {
        Data::Buffer(b)
    }
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::Buffer(b) => b.len(),
            Data::Lease(l) => l.segment().len as usize,
        }
    }

    fn slice(&self, off: usize, len: usize) -> Option<DmaSlice<'_>> {
        match self {
            Data::None => None,
            Data::Buffer(b) => Some(b.segment_at(off, len)),
            Data::Lease(l) => Some(l.slice().sub(off, len)),
        }
    }
}

/// One I/O operation (one or more commands) of an [`AsyncQueuePair`]. Its output is the
/// buffer it was given back (`None` for commands without one, or with leased memory), or
/// the first error.
#[must_use = "a future does nothing until polled"]
pub struct IoFuture {
    aqp: AsyncQueuePair,
    what: &'static str,
    plan: Result<Pieces>,
    next: usize,
    buf: Data,
    op: Option<usize>,
    /// An error that stopped the submissions (commands already submitted still complete).
    error: Option<Error>,
}

impl IoFuture {
    fn new(aqp: AsyncQueuePair, what: &'static str, plan: Result<Pieces>, buf: Data) -> IoFuture {
        IoFuture {
            aqp,
            what,
            plan,
            next: 0,
            buf,
            op: None,
            error: None,
        }
    }
}

/// Submit what the queue has room for of `plan` from `*next`; when it is full, the waker
/// waits for a free slot. An error stops the submissions (into `error`).
#[allow(clippy::too_many_arguments)]
fn submit(
    plan: &[Piece],
    next: &mut usize,
    buf: &Data,
    error: &mut Option<Error>,
    st: &mut State,
    op: usize,
    cx: &Context<'_>,
    ring: bool,
) {
    while *next < plan.len() {
        let (cmd, range) = plan[*next];
        let slice: [DmaSlice<'_>; 1];
        let data: &[DmaSlice<'_>] = match range.and_then(|(o, l)| buf.slice(o, l)) {
            Some(s) => {
                slice = [s];
                &slice
            }
            None => &[],
        };
        match st.qp.submit(cmd, data, op as u64) {
            Ok(_) => {
                st.ops[op].outstanding += 1;
                *next += 1;
            }
            Err(Error::QueueFull) => {
                st.qp.ring();
                st.slot_waiters.push(cx.waker().clone());
                return;
            }
            Err(e) => {
                *error = Some(e);
                break;
            }
        }
    }
    st.ops[op].all_submitted = true;
    if ring {
        st.qp.ring();
    }
}

impl Future for IoFuture {
    type Output = Result<Option<DmaBuffer>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.plan.is_err() {
            if let Err(e) = std::mem::replace(&mut this.plan, Ok(Pieces::Many(Vec::new()))) {
                return Poll::Ready(Err(e));
            }
        }
        let IoFuture {
            aqp,
            what,
            plan,
            next,
            buf,
            op: this_op,
            error,
        } = this;
        let inner = &*aqp.inner;
        let mut st = inner.lock();
        let op = match *this_op {
            Some(op) => op,
            None => {
                let op = st.take_op();
                *this_op = Some(op);
                op
            }
        };
        let polled = inner.drive == Drive::Poll;
        let fresh = !st.ops[op].all_submitted;
        if fresh {
            // Polled: the doorbell waits for the next reap (whoever's, or the poller's), so
            // the commands of the futures that run before it go to the controller with one
            // doorbell. A sleeping reaper would not come: ring now.
            let ring = !matches!(inner.drive, Drive::Poll | Drive::Poller);
            if let Ok(plan) = plan {
                submit(plan.as_slice(), next, buf, error, &mut st, op, cx, ring);
            }
            if let Some(w) = st.poller.take() {
                w.wake();
            }
        }
        if polled && fresh && st.ready > 0 && !st.ops[op].done() {
            // Other futures have results to collect (and maybe commands to submit after
            // them): let them run before this one reaps and rings. Once only, and woken at
            // once: the owner may be waiting for this future before it polls those.
            drop(st);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if !st.ops[op].done() && inner.drive != Drive::Poller {
            // A polled queue pair: keep reaping a little while nothing comes, rather than
            // hand every empty poll back to the executor (a round trip through its scheduler
            // costs more than many polls, and clock reads of its own in some guests). Stop at
            // the first completion, whoever's it is: others' futures are woken to run.
            let watch = Stopwatch::start();
            let mut polls = 0u32;
            while st.reap() == 0 && inner.drive == Drive::Poll {
                polls += 1;
                if polls.is_multiple_of(POLL_CLOCK_EVERY) && watch.elapsed() >= POLL_SPIN {
                    break;
                }
            }
        }
        let ready = if st.ops[op].done() {
            let status = st.ops[op].status;
            st.release_op(op);
            *this_op = None;
            Some(status)
        } else {
            match inner.drive {
                Drive::Poll => cx.waker().wake_by_ref(),
                Drive::Poller | Drive::Reaper | Drive::External => {
                    let w = &mut st.ops[op].waker;
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                }
            }
            None
        };
        drop(st);
        match ready {
            None => Poll::Pending,
            Some(status) => Poll::Ready(match (error.take(), status) {
                (Some(e), _) => Err(e),
                (None, Some(s)) if s == NvmeStatus::DEVICE_REMOVED => Err(Error::DeviceRemoved {
                    dev: inner.dev.clone(),
                }),
                (None, Some(status)) => Err(Error::Command {
                    dev: inner.dev.clone(),
                    command: what,
                    status,
                }),
                (None, None) => Ok(match std::mem::replace(buf, Data::None) {
                    Data::Buffer(b) => Some(b),
                    _ => None,
                }),
            }),
        }
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        let Some(op) = self.op.take() else { return };
        let mut st = self.aqp.inner.lock();
        // Nothing more is submitted; what is at the device completes into the void. Its
        // buffer's memory stays lent (the queue pair's share) until then.
        st.ops[op].all_submitted = true;
        st.qp.ring();
        if st.ops[op].outstanding == 0 {
            st.release_op(op);
        } else {
            st.ops[op].abandoned = true;
            st.ops[op].waker = None;
        }
    }
}

/// The future of [`AsyncQueuePair::poller`].
#[must_use = "the poller reaps only while it is polled: spawn it"]
pub struct Poller {
    inner: Weak<Inner>,
}

impl Future for Poller {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(inner) = self.inner.upgrade() else {
            return Poll::Ready(());
        };
        // Every other handle is gone (this upgrade is the last): nothing can submit.
        if Arc::strong_count(&inner) == 1 {
            return Poll::Ready(());
        }
        let mut st = inner.lock();
        let watch = Stopwatch::start();
        let mut polls = 0u32;
        loop {
            if st.reap() > 0 {
                break;
            }
            if st.qp.outstanding() == 0 {
                // Nothing can complete: sleep until a future submits (it wakes the poller
                // under the same lock, so the wake-up is not lost).
                st.poller = Some(cx.waker().clone());
                return Poll::Pending;
            }
            polls += 1;
            if polls.is_multiple_of(POLL_CLOCK_EVERY) && watch.elapsed() >= POLL_SPIN {
                break;
            }
        }
        drop(st);
        // The woken futures run before the next turn, which rings for what they submit.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The reaper thread of [`Drive::Reaper`]: reap while completions come (and for `spin`
/// after the last), then arm the interrupt, reap once more and sleep on it. Ends when the
/// queue pair is gone.
fn reaper(inner_weak: Weak<Inner>, irq: Arc<Interrupt>, spin: Duration) {
    let mut last = Stopwatch::start();
    // Whether the last reap found nothing and the thread spun on.
    let mut spun = false;
    loop {
        let Some(inner) = inner_weak.upgrade() else {
            return;
        };
        if inner.reap() > 0 {
            if spun {
                // Spinning pays off: no interrupts until the next sleep.
                irq.mask();
            }
            spun = false;
            last = Stopwatch::start();
            continue;
        }
        if !spin.is_zero() && last.elapsed() < spin {
            spun = true;
            std::hint::spin_loop();
            continue;
        }
        spun = false;
        irq.unmask();
        irq.arm();
        if inner.reap() > 0 {
            last = Stopwatch::start();
            continue;
        }
        drop(inner);
        if !irq.sleep(Duration::from_millis(100)) {
            // A quiet stretch: let the queue pair check deadlines, health and removal at the
            // next reap.
            let Some(inner) = inner_weak.upgrade() else {
                return;
            };
            inner.lock().qp.check_soon();
        }
    }
}
