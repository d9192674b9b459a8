//! The reactor thread: jobs in flight and the loop that submits, polls and answers.

use std::collections::VecDeque;
use std::time::Instant;

use crate::clock::Ticks;

use crossbeam_channel::{Receiver, TryRecvError};

use crate::dma::{DmaLease, DmaSlice};
use crate::error::Error;
use crate::io::IoQueuePair;
use crate::queue::Completion;

use super::*;

/// A request and where its answer goes. Dropped unanswered (a stopped or panicking reactor,
/// a channel torn down with messages in it), it answers [`ReactorError::Stopped`] itself, so
/// every request gets exactly one answer.
pub(super) struct Job {
    pub(super) req: IoRequest,
    pub(super) reply: Option<Reply>,
    /// The queue pair tag it runs under, once given to a queue pair (see [`Worker::tag`]).
    pub(super) issued: Option<u64>,
}

impl Job {
    /// The reply and the answer to send it, leaving the job answered (its drop then does
    /// nothing); `None` if it was answered already.
    #[inline]
    fn take_answer(
        &mut self,
        result: Result<u32, ReactorError>,
        completed: Ticks,
    ) -> Option<(Reply, IoDone)> {
        let reply = self.reply.take()?;
        let done = IoDone {
            tag: self.req.tag,
            result,
            buf: self.req.data.take_buf(),
            completed,
        };
        Some((reply, done))
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            // Given to a queue pair and not completed: the device may still use the data, so
            // it is quarantined and its buffer is not handed back.
            let buf = if self.issued.is_some() {
                self.req.data.quarantine();
                if let Some(m) = &self.req.metadata {
                    m.quarantine();
                }
                None
            } else {
                self.req.data.take_buf()
            };
            reply.send(IoDone {
                tag: self.req.tag,
                result: Err(ReactorError::Stopped),
                buf,
                completed: Ticks::now(),
            });
        }
    }
}

/// Extra polls in one loop turn while they keep finding completions.
const REPOLLS: usize = 4;

pub(super) struct Worker {
    pub(super) queues: Vec<IoQueuePair>,
    /// Requests taken and not yet submitted, per queue pair: their places in `slab`.
    pub(super) backlog: Vec<VecDeque<u32>>,
    pub(super) backlog_len: usize,
    /// Every request taken, waiting or in flight, where it stays until it is answered (the low
    /// 32 bits of a command's queue pair tag are its index here). A request is moved in once
    /// and answered in place (moving one costs a copy of its command and data pointer).
    pub(super) slab: Vec<Option<Job>>,
    pub(super) free: Vec<u32>,
    pub(super) rx: Receiver<Msg>,
    pub(super) config: ReactorConfig,
    pub(super) stats: ReactorStats,
    /// Completions of the current poll, reused.
    pub(super) done: Vec<Completion>,
    /// Clients to unpark at the end of the current poll, reused.
    pub(super) wakes: Vec<std::thread::Thread>,
    pub(super) capacity: usize,
    pub(super) stopping: bool,
    pub(super) disconnected: bool,
    pub(super) next_any: usize,
    /// An empty list to swap with this thread's requests from callbacks ([`OWN`]).
    pub(super) own_spare: Vec<Job>,
    /// Requests sent by [`Completer`]s during the current poll.
    pub(super) follow: Vec<Job>,
    /// The reactor's id (see [`Worker::tag`]).
    pub(super) id: u64,
    /// Submissions so far, wrapping (see [`Worker::tag`]).
    pub(super) issue_seq: u16,
}

impl Worker {
    pub(super) fn new(
        queues: Vec<IoQueuePair>,
        rx: Receiver<Msg>,
        config: ReactorConfig,
        id: u64,
    ) -> Worker {
        let capacity: usize = queues.iter().map(|q| q.capacity()).sum();
        Worker {
            backlog: (0..queues.len()).map(|_| VecDeque::new()).collect(),
            backlog_len: 0,
            slab: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            rx,
            config,
            stats: ReactorStats::default(),
            done: Vec::with_capacity(capacity),
            wakes: Vec::new(),
            capacity,
            stopping: false,
            disconnected: false,
            next_any: 0,
            own_spare: Vec::new(),
            follow: Vec::new(),
            id,
            issue_seq: 0,
            queues,
        }
    }

    /// Requests in flight on the queue pairs.
    fn outstanding(&self) -> usize {
        let taken = self.slab.len() - self.free.len();
        debug_assert!(
            taken >= self.backlog_len,
            "{taken} taken, {} waiting",
            self.backlog_len
        );
        taken.saturating_sub(self.backlog_len)
    }

    pub(super) fn run(mut self) -> ReactorExit {
        // Turns with nothing in flight and nothing received, and when the first of them was
        // seen (the clock is read only every IDLE_CHECK turns: it can be slow).
        const IDLE_CHECK: u32 = 256;
        let mut idle = 0u32;
        let mut idle_since: Option<Instant> = None;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let busy = self.outstanding() > 0 || self.backlog_len > 0;
            if !busy && (self.stopping || self.disconnected) {
                break;
            }
            if !self.stopping && !self.disconnected {
                if !busy && idle >= IDLE_CHECK {
                    idle = 0;
                    let now = Instant::now();
                    if now.duration_since(*idle_since.get_or_insert(now)) >= self.config.idle_spin {
                        // Nothing in flight and nothing coming: sleep on the channel.
                        self.stats.sleeps += 1;
                        match self.rx.recv() {
                            Ok(m) => self.take(m),
                            Err(_) => self.disconnected = true,
                        }
                        idle_since = None;
                    }
                }
                self.intake();
            }
            let submitted = self.submit_backlog();
            let mut reaped = self.poll_all();
            self.take_sent();
            // Completions that arrived while this turn's answers were handled go out with
            // them: the next submission then carries the whole batch under one doorbell.
            let mut more = reaped;
            for _ in 0..REPOLLS {
                if more == 0 {
                    break;
                }
                more = self.poll_all();
                self.take_sent();
                reaped += more;
            }
            if self.outstanding() == 0 && self.backlog_len == 0 && submitted == 0 && reaped == 0 {
                idle += 1;
            } else {
                idle = 0;
                idle_since = None;
            }
            if self.stopping || self.disconnected {
                let deadline = *drain_deadline
                    .get_or_insert_with(|| Instant::now() + self.config.drain_timeout);
                if Instant::now() >= deadline {
                    log::warn!(
                        "{}: {} command(s) still in flight after {} ms; giving them up",
                        self.config.name,
                        self.outstanding() + self.backlog_len,
                        self.config.drain_timeout.as_millis()
                    );
                    break;
                }
            }
        }
        self.finish()
    }

    /// Take the requests callbacks and completers sent from this thread (answered Stopped
    /// once stopping, as they would be had they come through the channel after the stop).
    fn take_sent(&mut self) {
        self.take_follow();
        self.take_own();
    }

    /// Take the requests this thread's callbacks sent through a [`ReactorHandle`].
    fn take_own(&mut self) {
        let spare = &mut self.own_spare;
        let mut own = OWN.with(|o| match o.borrow_mut().as_mut() {
            Some((_, v)) if !v.is_empty() => std::mem::replace(v, std::mem::take(spare)),
            _ => Vec::new(),
        });
        if own.is_empty() {
            return;
        }
        self.take_from_callbacks(&mut own);
        self.own_spare = own;
    }

    /// Take the requests of the current poll's [`Completer`]s.
    fn take_follow(&mut self) {
        if self.follow.is_empty() {
            return;
        }
        let mut follow = std::mem::take(&mut self.follow);
        self.take_from_callbacks(&mut follow);
        // Keep what was sent while these were taken (answers to requests refused on the way).
        follow.append(&mut self.follow);
        self.follow = follow;
    }

    fn take_from_callbacks(&mut self, jobs: &mut Vec<Job>) {
        if self.stopping {
            jobs.clear();
        } else {
            self.stats.from_callbacks += jobs.len() as u64;
            for job in jobs.drain(..) {
                self.take_job(job);
            }
        }
    }

    /// Take what the channel holds, up to what the queues can hold.
    fn intake(&mut self) {
        while !self.stopping && self.backlog_len < self.capacity {
            match self.rx.try_recv() {
                Ok(m) => self.take(m),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    break;
                }
            }
        }
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Io(job) => self.take_job(job),
            Msg::Batch(jobs) => {
                for job in jobs {
                    self.take_job(job);
                }
            }
            Msg::Stop => self.stopping = true,
        }
    }

    fn take_job(&mut self, job: Job) {
        self.stats.requests += 1;
        let q = match job.req.queue {
            Some(i) if i < self.queues.len() => i,
            Some(i) => {
                self.stats.submit_errors += 1;
                let n = self.queues.len();
                self.answer_now(
                    job,
                    Err(ReactorError::Submit(Error::InvalidArgument(format!(
                        "queue pair index {i} does not exist: the reactor owns {n} (0 to {})",
                        n - 1
                    )))),
                );
                return;
            }
            None => self.least_busy(),
        };
        let slot = self.slot();
        self.slab[slot as usize] = Some(job);
        self.backlog[q].push_back(slot);
        self.backlog_len += 1;
    }

    /// The queue pair with the fewest commands in flight and waiting, starting the search
    /// after the last choice so that ties rotate.
    fn least_busy(&mut self) -> usize {
        let n = self.queues.len();
        let mut best = self.next_any % n;
        let mut best_load = usize::MAX;
        for k in 0..n {
            let i = (self.next_any + k) % n;
            let load = self.queues[i].outstanding() + self.backlog[i].len();
            if load < best_load {
                best = i;
                best_load = load;
            }
        }
        self.next_any = best + 1;
        best
    }

    fn slot(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(None);
                (self.slab.len() - 1) as u32
            }
        }
    }

    /// Submit what the queues have room for; ring each doorbell once.
    fn submit_backlog(&mut self) -> usize {
        if self.backlog_len == 0 {
            return 0;
        }
        let mut n = 0;
        for q in 0..self.queues.len() {
            // A removed device's queue pair has no free slot ever again: what waits for it is
            // refused (its submission fails with "device removed") instead of waiting forever.
            while self.queues[q].free_slots() > 0 || self.queues[q].is_removed() {
                let Some(slot) = self.backlog[q].pop_front() else {
                    break;
                };
                self.backlog_len -= 1;
                let tag = self.tag(slot);
                let Some(job) = self.slab[slot as usize].as_mut() else {
                    continue;
                };
                job.issued = Some(tag);
                let q_pair = &mut self.queues[q];
                let cmd = job.req.cmd;
                let meta = job.req.metadata.as_ref().map(DmaLease::slice);
                let submitted = match &job.req.data {
                    IoData::None => q_pair.submit(cmd, &[], tag),
                    IoData::Segment(l) => match meta {
                        Some(m) => q_pair.submit_with_metadata(cmd, &[l.slice()], m, tag),
                        None => q_pair.submit(cmd, &[l.slice()], tag),
                    },
                    IoData::Segments(v) => {
                        let slices: Vec<DmaSlice<'_>> = v.iter().map(DmaLease::slice).collect();
                        match meta {
                            Some(m) => q_pair.submit_with_metadata(cmd, &slices, m, tag),
                            None => q_pair.submit(cmd, &slices, tag),
                        }
                    }
                    IoData::Buffer { buf, offset, len } => {
                        if offset.checked_add(*len).is_none_or(|end| end > buf.len()) {
                            let msg = format!(
                                "data range {offset}+{len} lies beyond a buffer of {} bytes",
                                buf.len()
                            );
                            Err(Error::InvalidArgument(msg))
                        } else {
                            let data = [buf.segment_at(*offset, *len)];
                            match meta {
                                Some(m) => q_pair.submit_with_metadata(cmd, &data, m, tag),
                                None => q_pair.submit(cmd, &data, tag),
                            }
                        }
                    }
                };
                match submitted {
                    Ok(_) => n += 1,
                    Err(e) => self.refuse(slot, e),
                }
            }
            self.queues[q].ring();
        }
        if n > 0 {
            self.stats.batches += 1;
            self.stats.max_batch = self.stats.max_batch.max(n as u64);
        }
        n
    }

    /// Answer the request in `slot` with [`ReactorError::Submit`].
    #[cold]
    fn refuse(&mut self, slot: u32, e: Error) {
        self.stats.submit_errors += 1;
        if let Some(job) = self.slab[slot as usize].take() {
            self.free.push(slot);
            self.answer_now(job, Err(ReactorError::Submit(e)));
        }
    }

    /// Answer a request that did not run, as a poll's answers are given: a client is woken
    /// with the poll's others, and what a completer sends is taken after it.
    fn answer_now(&mut self, mut job: Job, result: Result<u32, ReactorError>) {
        if let Some((reply, done)) = job.take_answer(result, Ticks::now()) {
            self.reply(reply, done);
        }
    }

    /// Send an answer from the reactor thread: wake-ups wait for the end of the poll, a
    /// completer's follow-ups for [`Worker::take_sent`].
    fn reply(&mut self, reply: Reply, done: IoDone) {
        reply.send_deferring(
            done,
            Some(&mut Sink {
                wakes: &mut self.wakes,
                follow: &mut self.follow,
            }),
        );
    }

    /// The queue pair tag of the request in `slot`, issued now: the reactor's id, a sequence
    /// number and the slot, so that a completion left over from an earlier reactor on the same
    /// queue pair (commands given up when it stopped) or an earlier use of the slot matches
    /// nothing.
    fn tag(&mut self, slot: u32) -> u64 {
        self.issue_seq = self.issue_seq.wrapping_add(1);
        ((self.id & 0xffff) << 48) | (u64::from(self.issue_seq) << 32) | u64::from(slot)
    }

    /// Poll every queue pair and answer what completed.
    fn poll_all(&mut self) -> usize {
        let mut total = 0;
        for q in 0..self.queues.len() {
            if self.queues[q].outstanding() == 0 {
                continue;
            }
            let done = &mut self.done;
            self.queues[q].poll(usize::MAX, |c| done.push(c));
            total += self.done.len();
            let now = Ticks::now();
            for i in 0..self.done.len() {
                let c = self.done[i];
                let index = c.tag as u32;
                let Some(job) = self
                    .slab
                    .get_mut(index as usize)
                    .and_then(Option::as_mut)
                    .filter(|j| j.issued == Some(c.tag))
                else {
                    self.stats.stale += 1;
                    log::debug!(
                        "{}: completion with tag {:#x} matches no request of this reactor \
                         (left from a command given up earlier); ignored",
                        self.config.name,
                        c.tag
                    );
                    continue;
                };
                let result = if c.status.is_success() {
                    Ok(c.dw0)
                } else {
                    Err(ReactorError::Status {
                        reactor: self.config.name.clone(),
                        opcode: job.req.cmd.opcode(),
                        status: c.status,
                    })
                };
                // Answered in place: only the reply and the answer leave the slab.
                let answer = job.take_answer(result, now);
                self.slab[index as usize] = None;
                self.free.push(index);
                self.stats.completed += 1;
                if let Some((reply, done)) = answer {
                    self.reply(reply, done);
                }
            }
            self.done.clear();
        }
        self.stats.wakes += self.wakes.len() as u64;
        for t in self.wakes.drain(..) {
            t.unpark();
        }
        total
    }

    fn finish(mut self) -> ReactorExit {
        // Requests still waiting or in flight, and anything left in the channel, answer
        // Stopped when dropped.
        self.stats.abandoned = (self.outstanding() + self.backlog_len) as u64;
        self.stats.quarantined = self
            .slab
            .iter()
            .flatten()
            .filter(|j| j.issued.is_some() && j.reply.is_some())
            .count() as u64;
        self.backlog.clear();
        self.slab.clear();
        while let Ok(m) = self.rx.try_recv() {
            drop(m);
        }
        self.stats.queues = self.queues.iter().map(|q| q.stats()).collect();
        ReactorExit {
            stats: self.stats,
            queues: self.queues,
        }
    }
}
