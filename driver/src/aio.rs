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
    check_range, compare_cmd, deallocate_cmd, flush_cmd, read_cmd, write_cmd, write_zeroes_cmd,
    IoQueuePair,
};
use crate::irq::{Interrupt, WaitMode};
use crate::queue::Completion;
use crate::spec::{SqEntry, MAX_NLB};
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
        self.transfer(Kind::Read, nsid, slba, blocks, Data::Buffer(buf))
    }

    /// Write `blocks` LBAs at `slba` from `buf`; the buffer comes back.
    pub fn write(&self, nsid: u32, slba: u64, blocks: u64, buf: DmaBuffer, fua: bool) -> IoFuture {
        self.transfer(Kind::Write { fua }, nsid, slba, blocks, Data::Buffer(buf))
    }

    /// Compare `blocks` LBAs at `slba` with `buf`: a difference is an [`Error::Command`] with
    /// status Compare Failure.
    pub fn compare(&self, nsid: u32, slba: u64, blocks: u64, buf: DmaBuffer) -> IoFuture {
        self.transfer(Kind::Compare, nsid, slba, blocks, Data::Buffer(buf))
    }

    /// Write zeroes to `blocks` LBAs at `slba`.
    pub fn write_zeroes(&self, nsid: u32, slba: u64, blocks: u64) -> IoFuture {
        let kind = Kind::WriteZeroes;
        let made = self.facts(nsid).and_then(|f| {
            check_range(&f.info, slba, blocks)?;
            Ok(Plan::new(
                kind,
                nsid,
                slba,
                blocks,
                f.info.lba_size,
                u32::MAX,
            ))
        });
        IoFuture::new(self.clone(), kind, made, Data::None)
    }

    /// Flush the volatile write cache of namespace `nsid`.
    pub fn flush(&self, nsid: u32) -> IoFuture {
        let kind = Kind::Flush;
        IoFuture::new(self.clone(), kind, Ok(Plan::one(kind, nsid)), Data::None)
    }

    /// Deallocate (trim) `blocks` LBAs at `slba` (one range of up to 2^32 - 1 LBAs).
    pub fn deallocate(&self, nsid: u32, slba: u64, blocks: u64) -> IoFuture {
        let kind = Kind::Deallocate;
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
                kind,
                Ok(Plan::one(kind, nsid)),
                Data::Buffer(buf),
            ),
            Err(e) => IoFuture::new(self.clone(), kind, Err(e), Data::None),
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

    /// A read, write or compare: the range and the buffer checked here, its commands made as
    /// the queue takes them (split at the device's maximum transfer).
    fn transfer(&self, kind: Kind, nsid: u32, slba: u64, blocks: u64, data: Data) -> IoFuture {
        let made = self.facts(nsid).and_then(|facts| {
            check_range(&facts.info, slba, blocks)?;
            let (per, max) = match facts.data {
                Ok(d) => d,
                Err(ref why) => {
                    return Err(Error::Unsupported {
                        dev: self.inner.dev.clone(),
                        why: why.clone(),
                    })
                }
            };
            let (have, need) = (data.len() as u64, blocks.saturating_mul(per as u64));
            if have < need {
                return Err(Error::InvalidArgument(format!(
                    "a buffer of {have} bytes is too small for {blocks} LBAs of {per} bytes \
                     ({need} bytes)"
                )));
            }
            Ok(Plan::new(kind, nsid, slba, blocks, per, max))
        });
        IoFuture::new(self.clone(), kind, made, data)
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

/// The command of an operation.
#[derive(Copy, Clone)]
enum Kind {
    Read,
    Write { fua: bool },
    Compare,
    WriteZeroes,
    Flush,
    Deallocate,
}

impl Kind {
    /// The command's name in errors.
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "Read",
            Kind::Write { .. } => "Write",
            Kind::Compare => "Compare",
            Kind::WriteZeroes => "Write Zeroes",
            Kind::Flush => "Flush",
            Kind::Deallocate => "Dataset Management",
        }
    }
}

/// An operation's commands, made one at a time as the queue takes them (a future carries
/// this rather than the commands: it stays small, and a one-command operation costs no list).
#[derive(Copy, Clone)]
struct Plan {
    kind: Kind,
    nsid: u32,
    slba: u64,
    blocks: u64,
    /// Bytes of the buffer per LBA: a command's data starts at its first LBA's (0 for no data).
    data_per_lba: u32,
    /// LBAs per command at most.
    per_cmd: u32,
    /// LBAs submitted so far.
    done: u64,
}

impl Plan {
    /// `blocks` LBAs at `slba` in commands of at most `max` bytes (at `per` bytes per LBA;
    /// `per` is the buffer's step too for the kinds with data).
    fn new(kind: Kind, nsid: u32, slba: u64, blocks: u64, per: u32, max: u32) -> Plan {
        Plan {
            kind,
            nsid,
            slba,
            blocks,
            data_per_lba: per,
            per_cmd: (max / per.max(1)).clamp(1, MAX_NLB),
            done: 0,
        }
    }

    /// A command without a range (Flush, or a Dataset Management of one range).
    fn one(kind: Kind, nsid: u32) -> Plan {
        Plan::new(kind, nsid, 0, 1, 0, 1)
    }

    fn finished(&self) -> bool {
        self.done >= self.blocks
    }

    /// The next command, the range of the buffer it carries, and its LBAs.
    fn next(&self) -> (SqEntry, Option<(usize, usize)>, u64) {
        let n = (self.per_cmd as u64).min(self.blocks - self.done);
        let slba = self.slba + self.done;
        let range = || {
            let per = self.data_per_lba as usize;
            Some((self.done as usize * per, n as usize * per))
        };
        // n <= per_cmd <= MAX_NLB, so it fits a command.
        let nlb = n as u32;
        match self.kind {
            Kind::Read => (read_cmd(self.nsid, slba, nlb), range(), n),
            Kind::Write { fua } => (write_cmd(self.nsid, slba, nlb, fua), range(), n),
            Kind::Compare => (compare_cmd(self.nsid, slba, nlb), range(), n),
            Kind::WriteZeroes => (write_zeroes_cmd(self.nsid, slba, nlb), None, n),
            Kind::Flush => (flush_cmd(self.nsid), None, n),
            Kind::Deallocate => (deallocate_cmd(self.nsid, 1), Some((0, 16)), n),
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
    plan: Plan,
    buf: Data,
    /// Its index in the queue pair's operations while it has one.
    op: Option<u32>,
    /// An error found before the first command (the future is ready with it at once), or one
    /// that stopped the submissions (commands already submitted still complete). Boxed: rare,
    /// and the future stays small to move.
    error: Option<Box<Error>>,
}

impl IoFuture {
    fn new(aqp: AsyncQueuePair, kind: Kind, plan: Result<Plan>, buf: Data) -> IoFuture {
        let (plan, error) = match plan {
            Ok(p) => (p, None),
            // Nothing to submit: `done` is past `blocks`.
            Err(e) => (Plan::new(kind, 0, 0, 0, 0, 1), Some(Box::new(e))),
        };
        IoFuture {
            aqp,
            plan,
            buf,
            op: None,
            error,
        }
    }
}

/// Submit what the queue has room for of `plan`; when it is full, the waker waits for a
/// free slot. An error stops the submissions (into `error`).
fn submit(
    plan: &mut Plan,
    buf: &Data,
    error: &mut Option<Box<Error>>,
    st: &mut State,
    op: usize,
    cx: &Context<'_>,
    ring: bool,
) {
    while !plan.finished() {
        let (cmd, range, blocks) = plan.next();
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
                plan.done += blocks;
            }
            Err(Error::QueueFull) => {
                st.qp.ring();
                st.slot_waiters.push(cx.waker().clone());
                return;
            }
            Err(e) => {
                *error = Some(Box::new(e));
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
        let IoFuture {
            aqp,
            plan,
            buf,
            op: this_op,
            error,
        } = self.get_mut();
        if this_op.is_none() {
            if let Some(e) = error.take() {
                // Refused before any command.
                return Poll::Ready(Err(*e));
            }
        }
        let inner = &*aqp.inner;
        let mut st = inner.lock();
        let op = match *this_op {
            Some(op) => op as usize,
            None => {
                let op = st.take_op();
                *this_op = Some(op as u32);
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
            submit(plan, buf, error, &mut st, op, cx, ring);
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
        if !st.ops[op].done() {
            match inner.drive {
                Drive::Poll => cx.waker().wake_by_ref(),
                Drive::Poller | Drive::Reaper | Drive::External => {
                    let w = &mut st.ops[op].waker;
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                }
            }
            return Poll::Pending;
        }
        let status = st.ops[op].status;
        st.release_op(op);
        drop(st);
        *this_op = None;
        Poll::Ready(match (error.take(), status) {
            (Some(e), _) => Err(*e),
            (None, Some(s)) if s == NvmeStatus::DEVICE_REMOVED => Err(Error::DeviceRemoved {
                dev: inner.dev.clone(),
            }),
            (None, Some(status)) => Err(Error::Command {
                dev: inner.dev.clone(),
                command: plan.kind.name(),
                status,
            }),
            (None, None) => Ok(match std::mem::replace(buf, Data::None) {
                Data::Buffer(b) => Some(b),
                _ => None,
            }),
        })
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        let Some(op) = self.op.take() else { return };
        let op = op as usize;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::split_transfer;
    use crate::spec::io_op;

    /// A command as the test sees it: (opcode, slba, LBAs, data range).
    type Made = (u8, u64, u32, Option<(usize, usize)>);

    /// The commands a plan makes, in order.
    fn made(mut p: Plan) -> Vec<Made> {
        let mut out = Vec::new();
        while !p.finished() {
            let (cmd, range, n) = p.next();
            out.push((cmd.opcode(), cmd.slba(), (cmd.cdw12 & 0xffff) + 1, range));
            p.done += n;
        }
        out
    }

    #[test]
    fn a_plan_makes_the_commands_of_split_transfer_one_at_a_time() {
        // (LBAs, bytes per LBA, largest transfer): one command, an exact multiple, a remainder,
        // a maximum that is not a multiple of the LBA size, the NLB limit.
        for (blocks, per, max) in [
            (1u64, 4096u32, 131_072u32),
            (64, 4096, 131_072),
            (67, 512, 16_384),
            (5, 4096, 10_000),
            (200_000, 512, u32::MAX),
        ] {
            let plan = Plan::new(Kind::Read, 1, 1000, blocks, per, max);
            let want: Vec<_> = split_transfer(1000, blocks, per, max)
                .map(|s| {
                    let range = Some((s.offset as usize, s.blocks as usize * per as usize));
                    (io_op::READ, s.slba, s.blocks, range)
                })
                .collect();
            assert_eq!(made(plan), want, "{blocks} LBAs of {per} bytes, max {max}");
        }
        // Write Zeroes carries no data; Flush and Dataset Management are one command each, the
        // latter with its 16-byte range.
        let z = made(Plan::new(Kind::WriteZeroes, 1, 0, 70_000, 512, u32::MAX));
        assert_eq!(z.len(), 2);
        assert!(z.iter().all(|c| c.3.is_none()));
        assert_eq!((z[0].2, z[1].1, z[1].2), (65_536, 65_536, 70_000 - 65_536));
        let f = made(Plan::one(Kind::Flush, 3));
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].0, f[0].3), (io_op::FLUSH, None));
        let d = made(Plan::one(Kind::Deallocate, 3));
        let want = (1, io_op::DATASET_MANAGEMENT, Some((0, 16)));
        assert_eq!((d.len(), d[0].0, d[0].3), want);
    }
}
