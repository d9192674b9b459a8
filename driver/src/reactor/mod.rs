//! Cross-thread submission: a reactor thread owns I/O queue pairs and polls them, fed by a
//! `crossbeam-channel` of requests from any number of threads.
//!
//! A [`QueuePair`](crate::queue::QueuePair) belongs to one thread and takes no locks. An
//! application that is not thread-per-core hands its commands to a [`Reactor`] instead: any
//! thread holding a [`ReactorHandle`] sends an [`IoRequest`] with a [`Reply`] (a callback, a
//! [`Completer`] shared by many requests, or a channel of its own), and the reactor thread does
//! the rest in batches: it drains the channel, submits everything it took, rings each
//! submission doorbell once, polls every queue pair and replies to each completed request.
//!
//! For the most I/O per second, complete on the reactor thread: a [`Completer`] costs no
//! allocation per request, and what it sends next goes out with the next doorbell without a
//! trip through the channel. A client that waits for answers on another thread pays a wake-up
//! per batch of answers (cheap on real hardware, ~145 µs on an emulated CPU).
//!
//! Every request gets exactly one [`IoDone`], also when it cannot run: a reactor that has
//! stopped (or panicked) answers [`ReactorError::Stopped`], and a request whose data pointer
//! cannot be built answers [`ReactorError::Submit`]. A data buffer moved in with
//! [`IoData::Buffer`] always comes back in [`IoDone::buf`].
//!
//! Callbacks run on the reactor thread (or, for a request that never reached it, on the thread
//! that gave it up): they must be short and must not wait for other requests of the same
//! reactor.
//!
//! Every answer carries the [`Ticks`] at which its completion was reaped. `Ticks` is the CPU's
//! time-stamp counter: a few nanoseconds to read where `Instant::now()` may cost microseconds
//! (a guest whose clock source is an emulated HPET makes a system call and an MMIO read for
//! each), so it can be taken for every request; [`TickRate`] turns tick counts into time.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::thread::JoinHandle;
use std::time::Duration;

pub use crate::clock::{TickRate, Ticks};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::error::Error;
use crate::io::IoQueuePair;
use crate::queue::QueueStats;

mod request;
mod worker;

use request::Sink;
pub use request::*;
use worker::{Job, Worker};

enum Msg {
    Io(Job),
    /// Requests sent together: the reactor takes them in one go, so they share a doorbell.
    Batch(Vec<Job>),
    Stop,
}

/// A pending answer, from [`ReactorHandle::call`].
#[derive(Debug)]
pub struct Pending {
    rx: Receiver<IoDone>,
    tag: u64,
}

impl Pending {
    /// Wait for the answer.
    pub fn wait(self) -> IoDone {
        let tag = self.tag;
        // The job answers on drop, so the sender cannot go away without sending.
        self.rx.recv().unwrap_or_else(|_| IoDone {
            tag,
            result: Err(ReactorError::Stopped),
            buf: None,
            completed: Ticks::now(),
        })
    }

    /// Wait at most `timeout`; `Err(self)` if the answer has not come.
    pub fn wait_timeout(self, timeout: Duration) -> Result<IoDone, Pending> {
        match self.rx.recv_timeout(timeout) {
            Ok(d) => Ok(d),
            Err(RecvTimeoutError::Timeout) => Err(self),
            Err(RecvTimeoutError::Disconnected) => Ok(IoDone {
                tag: self.tag,
                result: Err(ReactorError::Stopped),
                buf: None,
                completed: Ticks::now(),
            }),
        }
    }
}

/// How a reactor behaves.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// Name of the reactor thread.
    pub name: String,
    /// Requests the channel holds before senders block; `None` for no limit.
    pub channel_capacity: Option<usize>,
    /// How long the reactor keeps spinning on an empty channel with nothing in flight before
    /// it blocks on the channel: spinning keeps the latency of the next request low, blocking
    /// frees the CPU (and wakes up later, by a system call of the next sender).
    pub idle_spin: Duration,
    /// How long a stopping reactor waits for commands still in flight before it gives them up
    /// (they are then answered [`ReactorError::Stopped`]).
    pub drain_timeout: Duration,
    /// The CPU the reactor thread runs on (`None`: wherever the scheduler puts it). Clients
    /// pinned to the same CPU trade a cross-CPU wake-up per batch of answers for a context
    /// switch; see [`crate::affinity`].
    pub cpu: Option<usize>,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            name: "rnvme-reactor".into(),
            channel_capacity: None,
            idle_spin: Duration::from_millis(1),
            drain_timeout: Duration::from_secs(30),
            cpu: None,
        }
    }
}

/// Counters of a reactor.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReactorStats {
    /// Requests taken (from the channel, or from callbacks on the reactor thread).
    pub requests: u64,
    /// Of those, requests sent by completion callbacks and [`Completer`]s running on the
    /// reactor thread, taken without a trip through the channel.
    pub from_callbacks: u64,
    /// Requests answered by their completion (successful or not).
    pub completed: u64,
    /// Requests answered with [`ReactorError::Submit`].
    pub submit_errors: u64,
    /// Loop turns that submitted at least one command (each rings every doorbell at most once).
    pub batches: u64,
    /// Most commands submitted in one loop turn.
    pub max_batch: u64,
    /// Times the reactor blocked on an empty channel with nothing in flight.
    pub sleeps: u64,
    /// Client threads unparked ([`Reply::Wake`]): one per client and poll, however many of
    /// its answers the poll reaped.
    pub wakes: u64,
    /// Requests given up when the reactor stopped with them still waiting or in flight.
    pub abandoned: u64,
    /// Of those, requests in flight: their data was quarantined (never reused; a
    /// [`IoData::Buffer`] is not handed back).
    pub quarantined: u64,
    /// Completions that matched no request of this reactor (left over from commands an
    /// earlier reactor on the same queue pair gave up), ignored.
    pub stale: u64,
    /// Counters of each queue pair, in [`Reactor::spawn`] order.
    pub queues: Vec<QueueStats>,
}

/// What a reactor hands back when it stops.
pub struct ReactorExit {
    /// Its counters.
    pub stats: ReactorStats,
    /// Its queue pairs, for reuse (commands given up on are still outstanding on them).
    pub queues: Vec<IoQueuePair>,
}

/// A cheap, cloneable way to send requests to a reactor from any thread.
#[derive(Clone, Debug)]
pub struct ReactorHandle {
    tx: Sender<Msg>,
    queues: usize,
    /// The reactor's id (see [`OWN`]).
    id: u64,
}

/// Ids of reactors, so that a reactor thread knows its own handles.
static NEXT_REACTOR_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// On a reactor thread: the reactor's id and the requests sent to it from that thread (by
    /// completion callbacks, which run there), taken after each poll without a trip through
    /// the channel.
    static OWN: RefCell<Option<(u64, Vec<Job>)>> = const { RefCell::new(None) };
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Io(j) => write!(f, "Io(tag {})", j.req.tag),
            Msg::Batch(v) => write!(f, "Batch({} requests)", v.len()),
            Msg::Stop => f.write_str("Stop"),
        }
    }
}

impl ReactorHandle {
    /// Send `req`; `reply` gets the answer exactly once (at once, on this thread, if the
    /// reactor has stopped).
    pub fn submit(&self, req: IoRequest, reply: Reply) {
        let job = Job {
            req,
            reply: Some(reply),
            issued: None,
        };
        self.deliver(Msg::Io(job));
    }

    /// Hand `msg` to the reactor: on the reactor's own thread straight into its list of
    /// requests from callbacks, elsewhere through the channel.
    fn deliver(&self, msg: Msg) {
        let msg = OWN.with(|own| match own.borrow_mut().as_mut() {
            Some((id, local)) if *id == self.id => match msg {
                Msg::Io(job) => {
                    local.push(job);
                    None
                }
                Msg::Batch(jobs) => {
                    local.extend(jobs);
                    None
                }
                Msg::Stop => Some(Msg::Stop),
            },
            _ => Some(msg),
        });
        if let Some(msg) = msg {
            // A failed send hands the message back; dropping it answers Stopped.
            let _ = self.tx.send(msg);
        }
    }

    /// Send `req`; `f` is called with the answer.
    pub fn submit_with(&self, req: IoRequest, f: impl FnOnce(IoDone) + Send + 'static) {
        self.submit(req, Reply::Callback(Box::new(f)));
    }

    /// Send `req`; the answer goes to `tx` (one channel can collect the answers of many
    /// requests, told apart by their tags).
    pub fn submit_to(&self, req: IoRequest, tx: &Sender<IoDone>) {
        self.submit(req, Reply::Channel(tx.clone()));
    }

    /// Send several requests in one message; each answer goes to `tx`. The reactor takes them
    /// in one go, so they are submitted together and share a doorbell (sent one by one, a
    /// spinning reactor may pick them up a few at a time).
    pub fn submit_batch(&self, reqs: impl IntoIterator<Item = IoRequest>, tx: &Sender<IoDone>) {
        self.submit_batch_with(reqs, || Reply::Channel(tx.clone()));
    }

    /// Send several requests in one message, each answered through the reply `reply` makes.
    pub fn submit_batch_with(
        &self,
        reqs: impl IntoIterator<Item = IoRequest>,
        mut reply: impl FnMut() -> Reply,
    ) {
        let jobs: Vec<Job> = reqs
            .into_iter()
            .map(|req| Job {
                req,
                reply: Some(reply()),
                issued: None,
            })
            .collect();
        if !jobs.is_empty() {
            self.deliver(Msg::Batch(jobs));
        }
    }

    /// Send `req` and get a [`Pending`] answer to wait on.
    pub fn call(&self, req: IoRequest) -> Pending {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let tag = req.tag;
        self.submit(req, Reply::Channel(tx));
        Pending { rx, tag }
    }

    /// Number of queue pairs the reactor owns.
    pub fn queues(&self) -> usize {
        self.queues
    }
}

/// A thread that owns queue pairs and polls them. Stops (finishing what it has taken) when
/// [`Reactor::shutdown`] is called or the `Reactor` is dropped.
pub struct Reactor {
    handle: ReactorHandle,
    thread: Option<JoinHandle<ReactorExit>>,
}

impl Reactor {
    /// Start a reactor thread that owns `queues`.
    pub fn spawn(queues: Vec<IoQueuePair>, config: ReactorConfig) -> Result<Reactor, Error> {
        if queues.is_empty() {
            return Err(Error::InvalidArgument(
                "a reactor needs at least one I/O queue pair".into(),
            ));
        }
        let (tx, rx) = match config.channel_capacity {
            Some(n) => crossbeam_channel::bounded(n),
            None => crossbeam_channel::unbounded(),
        };
        let n = queues.len();
        let id = NEXT_REACTOR_ID.fetch_add(1, AtomicOrdering::Relaxed);
        let name = config.name.clone();
        // The thread pins itself and says how that went before it takes any request.
        let (pinned_tx, pinned_rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let pinned = config
                    .cpu
                    .map_or(Ok(()), crate::affinity::pin_current_thread);
                let failed = pinned.is_err();
                let _ = pinned_tx.send(pinned);
                if failed {
                    // Nothing was taken; `spawn` reports the error.
                    return ReactorExit {
                        stats: ReactorStats::default(),
                        queues,
                    };
                }
                OWN.with(|own| *own.borrow_mut() = Some((id, Vec::new())));
                let exit = Worker::new(queues, rx, config, id).run();
                // Requests callbacks sent while the reactor stopped answer Stopped.
                let left = OWN.with(|own| own.borrow_mut().take());
                drop(left);
                exit
            })
            .map_err(|e| {
                Error::InvalidArgument(format!("cannot start reactor thread {name}: {e}"))
            })?;
        if let Ok(Err(e)) = pinned_rx.recv() {
            let _ = thread.join();
            return Err(e.into());
        }
        Ok(Reactor {
            handle: ReactorHandle { tx, queues: n, id },
            thread: Some(thread),
        })
    }

    /// A handle to send requests with.
    pub fn handle(&self) -> ReactorHandle {
        self.handle.clone()
    }

    /// Stop: everything sent before this call is run and answered (up to the drain timeout);
    /// later requests are answered [`ReactorError::Stopped`]. Returns the counters and the
    /// queue pairs; `None` if the reactor thread panicked.
    pub fn shutdown(mut self) -> Option<ReactorExit> {
        self.stop()
    }

    fn stop(&mut self) -> Option<ReactorExit> {
        let thread = self.thread.take()?;
        let _ = self.handle.tx.send(Msg::Stop);
        match thread.join() {
            Ok(exit) => Some(exit),
            Err(_) => {
                log::error!("the reactor thread panicked; its requests were answered Stopped");
                None
            }
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use crate::controller::{Controller, ControllerOptions};
    use crate::dma::Backing;
    use crate::dma::{DmaBuffer, DmaLease};
    use crate::io::{read_cmd, write_cmd};
    use crate::model::{CompletionMode, Model, ModelConfig};
    use crate::status::NvmeStatus;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A reactor with the default configuration over one new queue pair of `entries`.
    fn one_queue(ctrl: &Controller, entries: u32) -> Reactor {
        Reactor::spawn(
            vec![ctrl.create_io_qpair(entries).unwrap()],
            ReactorConfig::default(),
        )
        .unwrap()
    }

    fn open() -> (Arc<Model>, Controller) {
        let model = Model::new(ModelConfig::default());
        let ctrl = Controller::init(
            model.clone(),
            ControllerOptions {
                backing: Backing::SmallPages,
                ..ControllerOptions::default()
            },
        )
        .expect("bring-up against the model");
        (model, ctrl)
    }

    fn stamp(lba: u64) -> Vec<u8> {
        (0..4096u64)
            .map(|i| (i.wrapping_mul(7) ^ lba.wrapping_mul(131)) as u8)
            .collect()
    }

    #[test]
    fn many_threads_write_then_read_back_through_one_reactor() {
        let (model, ctrl) = open();
        let qps = vec![
            ctrl.create_io_qpair(8).unwrap(),
            ctrl.create_io_qpair(8).unwrap(),
        ];
        let reactor = Reactor::spawn(qps, ReactorConfig::default()).unwrap();
        let threads = 4u64;
        let per = 50u64;
        std::thread::scope(|s| {
            for t in 0..threads {
                let h = reactor.handle();
                let ctrl = ctrl.clone();
                s.spawn(move || {
                    let (tx, rx) = crossbeam_channel::unbounded();
                    for i in 0..per {
                        let lba = t * per + i;
                        let buf = ctrl.alloc(4096).unwrap();
                        buf.write_bytes(0, &stamp(lba));
                        h.submit_to(
                            IoRequest::new(write_cmd(1, lba, 1, false), IoData::buffer(buf), lba),
                            &tx,
                        );
                    }
                    let mut seen = Vec::new();
                    for _ in 0..per {
                        let d = rx.recv().unwrap();
                        assert!(d.result.is_ok(), "{:?}", d.result);
                        assert!(d.buf.is_some(), "the buffer comes back");
                        seen.push(d.tag);
                    }
                    seen.sort();
                    assert_eq!(seen, (t * per..(t + 1) * per).collect::<Vec<_>>());
                });
            }
        });
        // Read back through oneshot calls.
        let h = reactor.handle();
        for lba in (0..threads * per).step_by(7) {
            let buf = ctrl.alloc(4096).unwrap();
            let sent = Ticks::now();
            let d = h
                .call(IoRequest::new(read_cmd(1, lba, 1), IoData::buffer(buf), 9))
                .wait();
            assert_eq!(d.tag, 9);
            assert!(d.result.is_ok());
            assert!(d.completed >= sent && d.completed <= Ticks::now());
            assert_eq!(d.buf.unwrap().to_vec(), stamp(lba), "LBA {lba}");
        }
        assert_eq!(model.read_ns(1, 33, 1), stamp(33));
        let exit = reactor.shutdown().expect("clean stop");
        let st = exit.stats;
        let n = threads * per + (threads * per).div_ceil(7);
        assert_eq!(st.requests, n);
        assert_eq!(st.completed, n);
        assert_eq!(st.abandoned, 0);
        let submitted: u64 = st.queues.iter().map(|q| q.submitted).sum();
        assert_eq!(submitted, n);
        assert!(
            st.queues.iter().all(|q| q.submitted > 0),
            "both queue pairs are used: {:?}",
            st.queues
        );
        let doorbells: u64 = st.queues.iter().map(|q| q.sq_doorbells).sum();
        assert!(doorbells <= st.batches * 2, "one ring per queue per batch");
        assert_eq!(exit.queues.len(), 2);
    }

    #[test]
    fn waking_replies_unpark_a_client_that_waits_without_spinning() {
        let (model, ctrl) = open();
        let reactor = one_queue(&ctrl, 16);
        let h = reactor.handle();
        let buf = ctrl.alloc(4096).unwrap();
        buf.write_bytes(0, &stamp(5));
        model.write_ns(1, 0, &stamp(5));
        let (tx, rx) = crossbeam_channel::unbounded();
        let me = std::thread::current();
        // Ten rounds of eight reads, each round waited for with wait_parked.
        let mut seen = Vec::new();
        for round in 0..10u64 {
            h.submit_batch_with(
                (0..8).map(|i| {
                    IoRequest::new(
                        read_cmd(1, 0, 1),
                        IoData::Segment(buf.segment().lease()),
                        round * 8 + i,
                    )
                }),
                || Reply::Wake(tx.clone(), me.clone()),
            );
            for _ in 0..8 {
                let d = wait_parked(&rx);
                assert!(d.result.is_ok(), "{:?}", d.result);
                seen.push(d.tag);
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..80).collect::<Vec<_>>(),
            "every request answered once"
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(reactor.shutdown().unwrap().stats.completed, 80);
    }

    #[test]
    fn a_batch_is_submitted_with_one_doorbell() {
        let (model, ctrl) = open();
        let reactor = one_queue(&ctrl, 64);
        let h = reactor.handle();
        let (tx, rx) = crossbeam_channel::unbounded();
        let bufs: Vec<DmaBuffer> = (0..32).map(|_| ctrl.alloc(4096).unwrap()).collect();
        for (i, b) in bufs.iter().enumerate() {
            b.write_bytes(0, &stamp(i as u64));
        }
        let before = model.stats().sq_doorbells;
        h.submit_batch(
            bufs.iter().enumerate().map(|(i, b)| {
                IoRequest::new(
                    write_cmd(1, i as u64, 1, false),
                    IoData::Segment(b.segment().lease()),
                    i as u64,
                )
            }),
            &tx,
        );
        let mut tags: Vec<u64> = (0..32)
            .map(|_| rx.recv().unwrap())
            .map(|d| {
                assert!(d.result.is_ok());
                d.tag
            })
            .collect();
        tags.sort();
        assert_eq!(tags, (0..32).collect::<Vec<_>>());
        assert_eq!(
            model.stats().sq_doorbells - before,
            1,
            "one doorbell for the batch"
        );
        assert_eq!(model.read_ns(1, 31, 1), stamp(31));
        h.submit_batch(std::iter::empty(), &tx);
        let st = reactor.shutdown().unwrap().stats;
        assert_eq!((st.requests, st.batches, st.max_batch), (32, 1, 32));
    }

    #[test]
    fn ticks_convert_to_time() {
        let a = Ticks::now();
        std::thread::sleep(Duration::from_millis(1));
        let b = Ticks::now();
        assert!(b > a);
        assert_eq!(a.since(b), 0, "never negative");
        assert_eq!(a.after(5).since(a), 5);
        let r = TickRate::from_measurement(Duration::from_nanos(500), 1000);
        assert_eq!(r.ns_per_tick(), 0.5);
        assert_eq!(r.nanos(2000), 1000);
        assert_eq!(r.ticks(Duration::from_micros(1)), 2000);
        assert_eq!(r.duration(4000), Duration::from_micros(2));
        assert_eq!(
            TickRate::from_measurement(Duration::ZERO, 0).ns_per_tick(),
            1.0
        );
        // A calibrated rate measures an interval as the monotonic clock does.
        let r = TickRate::calibrate(Duration::from_millis(20));
        let (t0, i0) = (Ticks::now(), Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (t1, i1) = (Ticks::now(), Instant::now());
        let by_ticks = r.duration(t1.since(t0)).as_secs_f64();
        let by_clock = (i1 - i0).as_secs_f64();
        assert!(
            (by_ticks - by_clock).abs() < 0.002,
            "{by_ticks} s by ticks, {by_clock} s by the clock"
        );
    }

    #[test]
    fn batches_share_a_doorbell_and_queue_full_waits_in_the_backlog() {
        let (model, ctrl) = open();
        // Hold completions so the reactor sees a full queue of 3 commands.
        model.set_completion_mode(CompletionMode::Deferred);
        let qp = ctrl.create_io_qpair(4).unwrap();
        let reactor = Reactor::spawn(vec![qp], ReactorConfig::default()).unwrap();
        let h = reactor.handle();
        let bufs: Vec<DmaBuffer> = (0..10).map(|_| ctrl.alloc(4096).unwrap()).collect();
        let (tx, rx) = crossbeam_channel::unbounded();
        for (i, b) in bufs.into_iter().enumerate() {
            h.submit_to(
                IoRequest::new(read_cmd(1, i as u64, 1), IoData::buffer(b), i as u64),
                &tx,
            );
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < 10 {
            assert!(Instant::now() < deadline, "only {} answers", got.len());
            model.release_all();
            while let Ok(d) = rx.try_recv() {
                assert!(d.result.is_ok());
                got.push(d.tag);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        let st = reactor.shutdown().unwrap().stats;
        assert_eq!(st.queues[0].submitted, 10);
        assert!(st.max_batch <= 3, "never more than the queue holds");
        assert!(st.queues[0].sq_doorbells <= st.batches);
    }

    #[test]
    fn errors_come_back_with_their_status_and_callbacks_run() {
        let (model, ctrl) = open();
        model.fail_lba(1, 5, NvmeStatus::UNRECOVERED_READ_ERROR, None);
        let reactor = one_queue(&ctrl, 16);
        let h = reactor.handle();
        let buf = ctrl.alloc(4096).unwrap();
        let d = h
            .call(IoRequest::new(read_cmd(1, 5, 1), IoData::buffer(buf), 1))
            .wait();
        let e = d.result.unwrap_err();
        assert_eq!(e.status(), Some(NvmeStatus::UNRECOVERED_READ_ERROR));
        assert!(e.to_string().contains("Unrecovered Read Error"), "{e}");
        assert!(d.buf.is_some());

        // Beyond the namespace: the model answers LBA Out of Range.
        let buf = ctrl.alloc(4096).unwrap();
        let d = h
            .call(IoRequest::new(
                read_cmd(1, 1 << 40, 1),
                IoData::buffer(buf),
                2,
            ))
            .wait();
        assert_eq!(
            d.result.unwrap_err().status().map(|s| (s.sct, s.sc)),
            Some((0, 0x80))
        );

        // A buffer range that does not fit, and a queue that does not exist.
        let buf = ctrl.alloc(4096).unwrap();
        let d = h
            .call(IoRequest::new(
                read_cmd(1, 0, 2),
                IoData::Buffer {
                    buf,
                    offset: 4096,
                    len: 8192,
                },
                3,
            ))
            .wait();
        assert!(matches!(d.result, Err(ReactorError::Submit(_))), "{d:?}");
        assert!(d.buf.is_some());
        let d = h
            .call(IoRequest::new(read_cmd(1, 0, 1), IoData::None, 4).on_queue(3))
            .wait();
        let e = d.result.unwrap_err().to_string();
        assert!(e.contains("index 3 does not exist"), "{e}");

        let count = Arc::new(AtomicU64::new(0));
        for i in 0..20u64 {
            let count = count.clone();
            let buf = ctrl.alloc(4096).unwrap();
            h.submit_with(
                IoRequest::new(read_cmd(1, 10 + i, 1), IoData::buffer(buf), i),
                move |d| {
                    assert_eq!(d.result.unwrap(), 0);
                    count.fetch_add(1 + d.tag, Ordering::SeqCst);
                },
            );
        }
        // A callback that panics does not stop the reactor.
        h.submit_with(
            IoRequest::new(crate::io::flush_cmd(1), IoData::None, 99),
            |_| panic!("callback failure"),
        );
        let d = h
            .call(IoRequest::new(crate::io::flush_cmd(1), IoData::None, 5))
            .wait();
        assert!(d.result.is_ok(), "{d:?}");
        let st = reactor.shutdown().unwrap().stats;
        assert_eq!(
            count.load(Ordering::SeqCst),
            (1..=20).sum::<u64>(),
            "every callback ran once before shutdown returned"
        );
        assert_eq!(st.submit_errors, 2);
    }

    #[test]
    fn requests_after_shutdown_and_lost_in_flight_answer_stopped() {
        let (model, ctrl) = open();
        let reactor = Reactor::spawn(
            vec![ctrl.create_io_qpair(8).unwrap()],
            ReactorConfig {
                drain_timeout: Duration::from_millis(200),
                idle_spin: Duration::ZERO,
                ..ReactorConfig::default()
            },
        )
        .unwrap();
        let h = reactor.handle();
        // Completions that never come.
        model.set_completion_mode(CompletionMode::Deferred);
        let buf = ctrl.alloc(4096).unwrap();
        let lost = h.call(IoRequest::new(read_cmd(1, 0, 1), IoData::buffer(buf), 7));
        let lost = match lost.wait_timeout(Duration::from_millis(50)) {
            Ok(d) => panic!("answered early: {d:?}"),
            Err(p) => p,
        };
        let exit = reactor.shutdown().unwrap();
        assert_eq!(exit.stats.abandoned, 1);
        assert_eq!(exit.stats.quarantined, 1);
        let d = lost.wait();
        assert_eq!(d.tag, 7);
        assert!(matches!(d.result, Err(ReactorError::Stopped)));
        assert!(
            d.buf.is_none(),
            "the device may still write the buffer: it does not come back"
        );
        // The reactor is gone: the request is answered at once, on this thread.
        let buf = ctrl.alloc(4096).unwrap();
        let d = h
            .call(IoRequest::new(read_cmd(1, 0, 1), IoData::buffer(buf), 8))
            .wait();
        assert!(matches!(d.result, Err(ReactorError::Stopped)));
        assert!(d.buf.is_some());

        // A new reactor on the same queue pair: the given-up command's completion comes in
        // first and must not answer the new request that took over its slot.
        let again = Reactor::spawn(exit.queues, ReactorConfig::default()).unwrap();
        model.write_ns(1, 5, &stamp(5));
        let buf = ctrl.alloc(4096).unwrap();
        let p = again
            .handle()
            .call(IoRequest::new(read_cmd(1, 5, 1), IoData::buffer(buf), 9));
        let p = match p.wait_timeout(Duration::from_millis(50)) {
            Ok(d) => panic!("answered before its completion was posted: {d:?}"),
            Err(p) => p,
        };
        assert_eq!(
            model.release_all(),
            2,
            "the given-up command and the new one"
        );
        let d = p.wait();
        assert_eq!(d.tag, 9);
        assert!(d.result.is_ok(), "{d:?}");
        let mut got = vec![0u8; 4096];
        d.buf.unwrap().read_bytes(0, &mut got);
        assert_eq!(got, stamp(5), "its own data, not the old command's");
        let st = again.shutdown().unwrap().stats;
        assert_eq!((st.stale, st.completed), (1, 1), "{st:?}");
    }

    #[test]
    fn an_idle_reactor_sleeps_and_dropping_it_runs_what_was_sent() {
        let (_model, ctrl) = open();
        let config = ReactorConfig {
            idle_spin: Duration::from_micros(100),
            ..ReactorConfig::default()
        };
        let reactor =
            Reactor::spawn(vec![ctrl.create_io_qpair(8).unwrap()], config.clone()).unwrap();
        let h = reactor.handle();
        std::thread::sleep(Duration::from_millis(50));
        let d = h
            .call(IoRequest::new(crate::io::flush_cmd(1), IoData::None, 1))
            .wait();
        assert!(d.result.is_ok());
        let st = reactor.shutdown().unwrap().stats;
        assert!(st.sleeps >= 1, "{st:?}");

        let reactor = Reactor::spawn(vec![ctrl.create_io_qpair(8).unwrap()], config).unwrap();
        let h = reactor.handle();
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..5 {
            h.submit_to(
                IoRequest::new(crate::io::flush_cmd(1), IoData::None, i),
                &tx,
            );
        }
        drop(reactor);
        let answers: Vec<IoDone> = rx.try_iter().collect();
        assert_eq!(answers.len(), 5);
        assert!(answers.iter().all(|d| d.result.is_ok()));
        assert!(Reactor::spawn(Vec::new(), ReactorConfig::default()).is_err());
    }

    #[test]
    fn a_reactor_pinned_to_a_cpu_runs_there_and_a_missing_cpu_is_refused() {
        let (_model, ctrl) = open();
        let allowed = crate::affinity::allowed_cpus().unwrap();
        let cpu = *allowed.cpus().last().unwrap();
        let config = ReactorConfig {
            cpu: Some(cpu),
            ..ReactorConfig::default()
        };
        let reactor = Reactor::spawn(vec![ctrl.create_io_qpair(8).unwrap()], config).unwrap();
        let d = reactor
            .handle()
            .call(IoRequest::new(crate::io::flush_cmd(1), IoData::None, 1))
            .wait();
        assert!(d.result.is_ok());
        assert_eq!(reactor.shutdown().unwrap().stats.completed, 1);

        let missing = (0..4096).find(|c| !allowed.contains(*c)).unwrap();
        let config = ReactorConfig {
            cpu: Some(missing),
            ..ReactorConfig::default()
        };
        let Err(e) = Reactor::spawn(vec![ctrl.create_io_qpair(8).unwrap()], config) else {
            panic!("a reactor started on CPU {missing}, which this process may not use");
        };
        assert!(
            matches!(e, Error::Affinity(crate::affinity::AffinityError::NotAllowed { cpu, .. }) if cpu == missing),
            "{e}"
        );
    }

    #[test]
    fn answers_of_one_poll_unpark_each_client_once() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let me = std::thread::current();
        let (other_tx, other_rx) = crossbeam_channel::unbounded();
        let other = std::thread::spawn(|| ()).thread().clone();
        let (mut wakes, mut follow) = (Vec::new(), Vec::new());
        let mut sink = Sink {
            wakes: &mut wakes,
            follow: &mut follow,
        };
        for tag in 0..5 {
            let done = |tag| IoDone {
                tag,
                result: Ok(0),
                buf: None,
                completed: Ticks::now(),
            };
            Reply::Wake(tx.clone(), me.clone()).send_deferring(done(tag), Some(&mut sink));
            Reply::Wake(other_tx.clone(), other.clone())
                .send_deferring(done(tag + 10), Some(&mut sink));
        }
        assert_eq!(
            rx.try_iter().map(|d| d.tag).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(other_rx.try_iter().count(), 5);
        let ids: Vec<_> = wakes.iter().map(|t| t.id()).collect();
        assert_eq!(
            ids,
            [me.id(), other.id()],
            "one unpark per client, left to the caller"
        );
    }

    #[test]
    fn callbacks_that_send_more_skip_the_channel_and_stop_cleanly() {
        let (model, ctrl) = open();
        model.write_ns(1, 9, &stamp(9));
        let reactor = one_queue(&ctrl, 8);
        // A chain of 50 reads, each sent by the callback of the one before.
        fn chain(h: ReactorHandle, seg: DmaLease, left: u32, done: Sender<u32>) {
            let req = IoRequest::new(read_cmd(1, 9, 1), IoData::Segment(seg.clone()), left as u64);
            let h2 = h.clone();
            h.submit_with(req, move |d| {
                assert!(d.result.is_ok());
                if left > 1 {
                    chain(h2, seg, left - 1, done);
                } else {
                    let _ = done.send(left);
                }
            });
        }
        let buf = ctrl.alloc(4096).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        chain(reactor.handle(), buf.segment().lease(), 50, tx);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(1));
        let mut got = vec![0u8; 4096];
        buf.read_bytes(0, &mut got);
        assert_eq!(got, stamp(9));
        let st = reactor.shutdown().unwrap().stats;
        assert_eq!((st.requests, st.completed), (50, 50));
        assert_eq!(
            st.from_callbacks, 49,
            "all but the first came from callbacks"
        );

        // A callback that keeps sending while the reactor stops gets Stopped, not a hang.
        let reactor = one_queue(&ctrl, 8);
        let stopped = Arc::new(AtomicU64::new(0));
        fn forever(h: ReactorHandle, seg: DmaLease, stopped: Arc<AtomicU64>) {
            let req = IoRequest::new(read_cmd(1, 9, 1), IoData::Segment(seg.clone()), 0);
            let h2 = h.clone();
            h.submit_with(req, move |d| match d.result {
                Ok(_) => forever(h2, seg, stopped),
                Err(ReactorError::Stopped) => {
                    stopped.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("{e}"),
            });
        }
        forever(reactor.handle(), buf.segment().lease(), stopped.clone());
        std::thread::sleep(Duration::from_millis(20));
        let st = reactor.shutdown().unwrap().stats;
        assert!(st.from_callbacks > 0, "{st:?}");
        assert_eq!(
            stopped.load(Ordering::Relaxed),
            1,
            "the last one is answered Stopped"
        );
    }

    /// Reads LBAs `lba..lba + left` one after the other, each sent by the completer from the
    /// answer to the one before, and says which it saw.
    struct Walker {
        seg: DmaLease,
        left: std::sync::Mutex<u64>,
        seen: crossbeam_channel::Sender<Result<u64, String>>,
    }

    impl Completer for Walker {
        fn complete(&self, done: IoDone, next: &mut Next<'_>) {
            let mut left = self.left.lock().unwrap();
            match done.result {
                Ok(_) => {
                    let _ = self.seen.send(Ok(done.tag));
                    *left -= 1;
                    if *left > 0 {
                        next.submit(IoRequest::new(
                            // The LBA wraps: a walk that never ends stays in the namespace.
                            read_cmd(1, (done.tag + 1) % 64, 1),
                            IoData::Segment(self.seg.clone()),
                            done.tag + 1,
                        ));
                    }
                }
                Err(e) => {
                    let _ = self.seen.send(Err(e.to_string()));
                }
            }
        }
    }

    #[test]
    fn a_completer_answers_its_follow_ups_which_skip_the_channel() {
        let (model, ctrl) = open();
        for lba in 20..60 {
            model.write_ns(1, lba, &stamp(lba));
        }
        let reactor = one_queue(&ctrl, 8);
        // Two walkers of 20 reads each, sharing one completer object per walk.
        let (tx, rx) = crossbeam_channel::unbounded();
        let bufs: Vec<DmaBuffer> = (0..2).map(|_| ctrl.alloc(4096).unwrap()).collect();
        for (k, buf) in bufs.iter().enumerate() {
            let walker: Arc<dyn Completer> = Arc::new(Walker {
                seg: buf.segment().lease(),
                left: std::sync::Mutex::new(20),
                seen: tx.clone(),
            });
            let lba = 20 + 20 * k as u64;
            let req = IoRequest::new(
                read_cmd(1, lba, 1),
                IoData::Segment(buf.segment().lease()),
                lba,
            );
            reactor.handle().submit(req, Reply::Completer(walker));
        }
        let mut seen: Vec<u64> = (0..40)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (20..60).collect::<Vec<_>>());
        let mut got = vec![0u8; 4096];
        bufs[1].read_bytes(0, &mut got);
        assert_eq!(got, stamp(59), "the last read of the second walk");
        let st = reactor.shutdown().unwrap().stats;
        assert_eq!((st.requests, st.completed), (40, 40));
        assert_eq!(st.from_callbacks, 38, "all but the first of each walk");

        // A walk cut short by the reactor stopping ends with one Stopped answer.
        let reactor = Reactor::spawn(
            vec![ctrl.create_io_qpair(8).unwrap()],
            ReactorConfig::default(),
        )
        .unwrap();
        let walker: Arc<dyn Completer> = Arc::new(Walker {
            seg: bufs[0].segment().lease(),
            left: std::sync::Mutex::new(u64::MAX),
            seen: tx.clone(),
        });
        let req = IoRequest::new(
            read_cmd(1, 0, 1),
            IoData::Segment(bufs[0].segment().lease()),
            0,
        );
        reactor.handle().submit(req, Reply::Completer(walker));
        while rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .is_ok_and(|t| t < 100)
        {}
        reactor.shutdown().unwrap();
        let tail: Vec<_> = rx.try_iter().collect();
        let stopped = tail.iter().filter(|r| r.is_err()).count();
        assert_eq!(stopped, 1, "{tail:?}");
        assert!(
            tail.last()
                .unwrap()
                .as_ref()
                .unwrap_err()
                .contains("stopped"),
            "{tail:?}"
        );
    }

    /// Sends its request again, on the reactor's only queue pair, when the first try is
    /// refused; holds its lock while it does, as completers may.
    struct Retrier {
        seg: DmaLease,
        seen: std::sync::Mutex<Vec<Result<u64, String>>>,
    }

    impl Completer for Retrier {
        fn complete(&self, done: IoDone, next: &mut Next<'_>) {
            let mut seen = self.seen.lock().unwrap();
            match done.result {
                Ok(_) => seen.push(Ok(done.tag)),
                Err(e) => {
                    let again = matches!(e, ReactorError::Submit(_));
                    seen.push(Err(e.to_string()));
                    if again {
                        let req =
                            IoRequest::new(read_cmd(1, 1, 1), IoData::Segment(self.seg.clone()), 2);
                        next.submit(req.on_queue(0));
                    }
                }
            }
        }
    }

    #[test]
    fn a_completer_may_send_again_when_its_request_is_refused() {
        let (model, ctrl) = open();
        model.write_ns(1, 1, &stamp(1));
        let reactor = one_queue(&ctrl, 8);
        let buf = ctrl.alloc(4096).unwrap();
        let retrier = Arc::new(Retrier {
            seg: buf.segment().lease(),
            seen: std::sync::Mutex::new(Vec::new()),
        });
        let c: Arc<dyn Completer> = retrier.clone();
        // Queue pair 3 does not exist: refused, and the completer's second try runs.
        let req = IoRequest::new(read_cmd(1, 1, 1), IoData::Segment(buf.segment().lease()), 1);
        reactor
            .handle()
            .submit(req.on_queue(3), Reply::Completer(c));
        let deadline = Instant::now() + Duration::from_secs(10);
        while retrier.seen.lock().unwrap().len() < 2 {
            assert!(
                Instant::now() < deadline,
                "{:?}",
                retrier.seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let st = reactor.shutdown().unwrap().stats;
        let seen = retrier.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen[0].as_ref().unwrap_err().contains("queue pair index 3"),
            "{seen:?}"
        );
        assert_eq!(seen[1], Ok(2), "the second try ran: not answered Stopped");
        let mut got = vec![0u8; 4096];
        buf.read_bytes(0, &mut got);
        assert_eq!(got, stamp(1));
        assert_eq!(
            (st.submit_errors, st.completed, st.from_callbacks),
            (1, 1, 1)
        );
    }

    #[test]
    fn requests_waiting_for_a_removed_device_are_refused_not_kept() {
        let (model, ctrl) = open();
        let reactor = one_queue(&ctrl, 4);
        model.set_completion_mode(CompletionMode::Deferred);
        let (tx, rx) = crossbeam_channel::unbounded();
        let bufs: Vec<DmaBuffer> = (0..12).map(|_| ctrl.alloc(4096).unwrap()).collect();
        // More than the queue pair holds: some wait in the reactor.
        let reqs = bufs.iter().enumerate().map(|(i, b)| {
            IoRequest::new(
                read_cmd(1, i as u64, 1),
                IoData::Segment(b.segment().lease()),
                i as u64,
            )
        });
        reactor.handle().submit_batch(reqs, &tx);
        std::thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "completions are held");
        model.surprise_remove();
        let answers: Vec<IoDone> = (0..12)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("every request answered")
            })
            .collect();
        let removed = |d: &IoDone| match &d.result {
            Err(ReactorError::Status { status, .. }) => *status == NvmeStatus::DEVICE_REMOVED,
            Err(ReactorError::Submit(Error::DeviceRemoved { .. })) => true,
            _ => false,
        };
        assert!(answers.iter().all(removed), "{answers:?}");
        assert!(
            answers
                .iter()
                .any(|d| matches!(d.result, Err(ReactorError::Submit(_)))),
            "some were still waiting: {answers:?}"
        );
        drop(reactor);
    }
}
