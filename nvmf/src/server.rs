//! The running target: listeners, poll threads (each with its own queue pair on every device
//! and its share of the connections), shutdown, and counters.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nix::poll::{poll, ppoll, PollFd, PollFlags, PollTimeout};
use rnvme_driver::clock::Ticks;
use rnvme_driver::io::IoQueuePair;
use rnvme_driver::irq::WaitMode;
use rnvme_driver::queue::Completion;

use crate::conn::{untag, Conn, ConnStats, End, Io};
use crate::target::Target;
use crate::Error;

/// How a target runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Addresses to listen on (I/O and discovery controllers alike).
    pub listen: Vec<SocketAddr>,
    /// Poll threads, pinned to these CPUs (empty: one thread, not pinned).
    pub cpus: Vec<usize>,
    /// Entries of each poll thread's queue pair on each device.
    pub device_queue_entries: u32,
    /// Connections at most (more are closed at once).
    pub max_connections: usize,
    /// Busy polling goes on this long after the last work before a thread sleeps in
    /// ppoll(2) on its sockets, at least.
    pub spin: Duration,
    /// And longer, up to [`MAX_ADAPTIVE_SPIN`]: twice the recent quiet stretches between two
    /// pieces of work, so that a host issuing one command after another finds the thread
    /// polling instead of asleep (a wake-up costs more than the spin on most machines); not
    /// when those stretches are longer than half that bound (the spin would not catch the
    /// next command, and would take CPU from a loaded machine).
    pub adaptive_spin: bool,
    /// How a poll thread with nothing else to do waits for the commands it has at a device.
    pub device_wait: DeviceWait,
    /// The longest a poll thread with no command at any device sleeps before it looks at its
    /// timers (a connection's connect or keep-alive deadline, if sooner, ends the sleep
    /// earlier; a controller ended on another connection is seen within this). New
    /// connections and the stop wake it at once: an idle target does not wake up on its own
    /// more than this allows (each wake-up takes CPU from whatever else the machine runs).
    pub idle_wait: Duration,
}

/// How a poll thread with nothing to do but wait for commands at a device waits (after its
/// spin).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DeviceWait {
    /// Sleep until a socket is readable or a device queue pair's completion interrupt fires:
    /// each poll thread's queue pairs have an MSI-X vector each, masked while polling finds
    /// completions and unmasked before a sleep. A device without vectors for every poll
    /// thread falls back to [`DeviceWait::Timed`] with 50 µs.
    Interrupt,
    /// Sleep at most this long between polls of the device's completions (no interrupts).
    Timed(Duration),
    /// Never sleep while commands are at a device, as SPDK does on dedicated cores.
    Busy,
}

impl DeviceWait {
    /// The fallback of [`DeviceWait::Interrupt`].
    pub const FALLBACK: DeviceWait = DeviceWait::Timed(Duration::from_micros(50));
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 4420))],
            cpus: Vec::new(),
            device_queue_entries: 1024,
            max_connections: 1024,
            spin: Duration::from_micros(20),
            adaptive_spin: true,
            device_wait: DeviceWait::Interrupt,
            idle_wait: Duration::from_secs(1),
        }
    }
}

/// Wakes a thread sleeping in poll(2) or ppoll(2): a byte into a socket pair whose other end
/// it polls. (A Unix socket pair from the standard library rather than an eventfd: nothing
/// to add to the dependencies, and the same readiness semantics.)
struct Wake {
    rx: UnixStream,
    tx: UnixStream,
}

impl Wake {
    fn new() -> std::io::Result<Wake> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Wake { rx, tx })
    }

    /// Makes the polled end readable (a full buffer already is).
    fn wake(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    /// Reads what the wakes wrote, so that the next poll sleeps again.
    fn clear(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.rx).read(&mut b), Ok(n) if n > 0) {}
    }
}

/// A connection's counters, for reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnReport {
    pub thread: usize,
    pub peer: String,
    pub cntlid: Option<u16>,
    pub qid: Option<u16>,
    #[serde(flatten)]
    pub stats: ConnStats,
}

/// A poll thread's counters, for reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ThreadReport {
    pub thread: usize,
    /// How it waits for commands at a device: `interrupt`, `timed` or `busy` (`timed` where
    /// interrupts were asked for and a device had no vectors for them).
    pub device_wait: &'static str,
    /// Sleeps in ppoll(2).
    pub sleeps: u64,
    /// Sleeps that a device's completion interrupt ended.
    pub device_wakeups: u64,
}

/// Counters of the whole target.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub controllers: usize,
    pub threads: Vec<ThreadReport>,
    pub connections: Vec<ConnReport>,
}

struct Shared {
    stop: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    live: AtomicU64,
    /// Per thread: its own and its connections' counters, refreshed every 100 ms.
    reports: Mutex<Vec<(ThreadReport, Vec<ConnReport>)>>,
    /// Per thread: when it last went round its loop (milliseconds since `epoch`).
    heartbeats: Vec<AtomicU64>,
    epoch: Instant,
    /// Per poll thread: woken for a new connection and for the stop.
    wakes: Vec<Wake>,
    /// Woken (and never cleared) at the stop: the acceptors wait on it with their listener.
    stopped: Wake,
}

/// A target serving its subsystems.
pub struct Server {
    target: Arc<Target>,
    shared: Arc<Shared>,
    local: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Server {
    /// Listens, and starts the poll threads (each creates its device queue pairs first: an
    /// error there is returned here).
    pub fn start(target: Arc<Target>, opts: &ServeOptions) -> Result<Server, Error> {
        let mut listeners = Vec::new();
        let mut local = Vec::new();
        for a in &opts.listen {
            let l = TcpListener::bind(a).map_err(|e| Error::Listen(*a, e))?;
            local.push(l.local_addr().map_err(|e| Error::Listen(*a, e))?);
            l.set_nonblocking(true).map_err(|e| Error::Listen(*a, e))?;
            listeners.push(l);
        }
        *target.listen.lock().unwrap_or_else(|e| e.into_inner()) = local.clone();
        let nthreads = opts.cpus.len().max(1);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            live: AtomicU64::new(0),
            reports: Mutex::new(vec![Default::default(); nthreads]),
            heartbeats: (0..nthreads).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            wakes: (0..nthreads)
                .map(|_| Wake::new())
                .collect::<std::io::Result<_>>()
                .map_err(Error::Thread)?,
            stopped: Wake::new().map_err(Error::Thread)?,
        });
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), Error>>(nthreads);
        for t in 0..nthreads {
            let (tx, rx) = crossbeam_channel::unbounded::<(TcpStream, SocketAddr)>();
            senders.push(tx);
            let target = target.clone();
            let shared = shared.clone();
            let cpu = opts.cpus.get(t).copied();
            let entries = opts.device_queue_entries;
            let spin = opts.spin;
            let adaptive_spin = opts.adaptive_spin;
            let device_wait = opts.device_wait;
            let idle_wait = opts.idle_wait;
            let ready = ready_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("rnvme-serve-{t}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        if let Err(e) = rnvme_driver::affinity::pin_current_thread(c) {
                            log::warn!("poll thread {t}: cannot pin to CPU {c}: {e}");
                        }
                    }
                    // Short sleeps while commands are at a device are meant as written, not
                    // stretched by the default 50 µs of timer slack.
                    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
                        log::warn!("poll thread {t}: timer slack: {e}");
                    }
                    let mut qps = Vec::new();
                    let mut device_wait = device_wait;
                    for d in &target.devices {
                        let want = entries.min(d.max_queue_entries());
                        let q = match device_wait {
                            DeviceWait::Interrupt => d
                                .create_io_qpair_with(want, WaitMode::Interrupt)
                                .or_else(|e| {
                                    log::warn!(
                                        "poll thread {t}: {}: no completion interrupts ({e}): \
                                         polling every 50 µs while commands are at a device",
                                        d.name()
                                    );
                                    device_wait = DeviceWait::FALLBACK;
                                    d.create_io_qpair(want)
                                }),
                            _ => d.create_io_qpair(want),
                        };
                        match q {
                            Ok(q) => qps.push(q),
                            Err(e) => {
                                let _ = ready.send(Err(Error::Device(d.name().to_string(), e)));
                                return;
                            }
                        }
                    }
                    let _ = ready.send(Ok(()));
                    Poller {
                        thread: t,
                        target,
                        shared,
                        qps,
                        conns: Vec::new(),
                        incoming: rx,
                        spin,
                        adaptive_spin,
                        device_wait,
                        idle_wait,
                        sleeps: 0,
                        device_wakeups: 0,
                    }
                    .run();
                })
                .map_err(Error::Thread)?;
            threads.push(h);
        }
        drop(ready_tx);
        let mut failure = None;
        for _ in 0..nthreads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e),
                Err(_) => {
                    failure = Some(Error::Thread(std::io::Error::other("a poll thread died")))
                }
            }
        }
        let mut acceptors = Vec::new();
        if failure.is_none() {
            for l in listeners {
                let shared = shared.clone();
                let senders = senders.clone();
                let max = opts.max_connections as u64;
                acceptors.push(
                    std::thread::Builder::new()
                        .name("rnvme-accept".into())
                        .spawn(move || accept_loop(l, senders, shared, max))
                        .map_err(Error::Thread)?,
                );
            }
        }
        let server = Server {
            target,
            shared,
            local,
            threads,
            acceptors,
        };
        if let Some(e) = failure {
            server.stop();
            return Err(e);
        }
        Ok(server)
    }

    /// The addresses listened on (a port 0 asked for is the one the system gave).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// The target.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Counters now.
    pub fn report(&self) -> Report {
        let reports = self
            .shared
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Report {
            connections_accepted: self.shared.accepted.load(Ordering::Relaxed),
            connections_refused: self.shared.refused.load(Ordering::Relaxed),
            controllers: self.target.ctrl_count(),
            threads: reports.iter().map(|(t, _)| t.clone()).collect(),
            connections: reports.iter().flat_map(|(_, c)| c).cloned().collect(),
        }
    }

    /// Whether a poll thread has ended on its own (it should not before [`Server::stop`]).
    pub fn is_running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Poll threads that have not gone round their loop for `age`: stopped without ending
    /// (a thread the kernel killed, as an oops does, leaves no trace but this).
    pub fn stalled_threads(&self, age: Duration) -> Vec<usize> {
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        self.shared
            .heartbeats
            .iter()
            .enumerate()
            .filter(|(_, h)| now.saturating_sub(h.load(Ordering::Relaxed)) > age.as_millis() as u64)
            .map(|(i, _)| i)
            .collect()
    }

    /// Stops: no new connections or commands; commands at the devices complete and are
    /// answered; every namespace is flushed; connections close. Returns when all is done.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.stopped.wake();
        for w in &self.shared.wakes {
            w.wake();
        }
        for a in self.acceptors {
            let _ = a.join();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    l: TcpListener,
    senders: Vec<Sender<(TcpStream, SocketAddr)>>,
    shared: Arc<Shared>,
    max: u64,
) {
    let mut next = 0;
    while !shared.stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, peer)) => {
                if shared.live.load(Ordering::Acquire) >= max {
                    log::warn!("{peer}: refused, {max} connections already");
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                shared.live.fetch_add(1, Ordering::AcqRel);
                let t = next % senders.len();
                let _ = senders[t].send((s, peer));
                shared.wakes[t].wake();
                next += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Until a connection comes or the stop: no wake-ups of its own.
                let mut fds = [
                    PollFd::new(l.as_fd(), PollFlags::POLLIN),
                    PollFd::new(shared.stopped.rx.as_fd(), PollFlags::POLLIN),
                ];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Completions a poll thread finds by polling without sleeping before it masks its queue
/// pairs' interrupt vectors.
const MASK_AFTER: u32 = 64;

/// Quiet stretches shorter than this (between two turns that both did work) say nothing about
/// how long a host takes to send its next command.
const MIN_GAP: Duration = Duration::from_micros(5);

/// The longest an adaptive spin lasts (unless `--spin-us` asks for longer).
pub const MAX_ADAPTIVE_SPIN: Duration = Duration::from_millis(1);

/// A poll thread's spin lengths in time-stamp counter ticks, once the counter's rate is known.
#[derive(Copy, Clone)]
struct SpinTicks {
    spin: u64,
    min_gap: u64,
    max: u64,
    recent: u64,
}

/// For this long after its last work an idle poll thread still wakes every 10 ms (its
/// counters are published and its timers looked at as while busy); after that it sleeps up to
/// [`ServeOptions::idle_wait`].
const RECENTLY_BUSY: Duration = Duration::from_millis(200);

/// While commands are at a device and the sockets were quiet, a poll thread reads them every
/// this many turns of its loop (and polls the completion queues every turn).
const RX_EVERY: u32 = 16;

/// Hands device completions to the connections whose requests they end.
fn deliver(conns: &mut [Option<Conn>], completions: &[Completion]) {
    for c in completions {
        let (slot, req) = untag(c.tag);
        if let Some(Some(conn)) = conns.get_mut(slot) {
            conn.on_completion(req, c);
        }
    }
}

struct Poller {
    thread: usize,
    target: Arc<Target>,
    shared: Arc<Shared>,
    qps: Vec<IoQueuePair>,
    conns: Vec<Option<Conn>>,
    incoming: Receiver<(TcpStream, SocketAddr)>,
    spin: Duration,
    adaptive_spin: bool,
    device_wait: DeviceWait,
    idle_wait: Duration,
    sleeps: u64,
    device_wakeups: u64,
}

impl Poller {
    fn run(mut self) {
        let mut completions: Vec<Completion> = Vec::with_capacity(256);
        // Time from the time-stamp counter on the loop's path: a guest whose clock source is
        // an emulated HPET pays a VM exit for every clock read. The wall clock (for timers
        // and reports) is read every 256 turns, and around sleeps.
        rnvme_driver::clock::start_learning_rate();
        let mut last_work = Ticks::now();
        let mut spin_ticks: Option<SpinTicks> = None;
        // The recent quiet stretches between two pieces of work (an average over about 8).
        let mut recent_gap: u64 = 0;
        let mut now = Instant::now();
        let mut turns: u32 = 0;
        let mut last_report = now;
        let mut stopping: Option<Instant> = None;
        // The last turn ended in a sleep (its completions came by interrupt, or a socket).
        let mut just_woke = false;
        // Completions found by polling since the last sleep.
        let mut polled_since_sleep: u32 = 0;
        // The last read of the sockets found something.
        let mut rx_busy = false;
        loop {
            let mut progress = false;
            let stop = self.shared.stop.load(Ordering::Acquire);
            if stop && stopping.is_none() {
                stopping = Some(Instant::now());
                for c in self.conns.iter_mut().flatten() {
                    c.quiesce();
                    c.abort_held();
                }
            }
            if !stop {
                while let Ok((s, peer)) = self.incoming.try_recv() {
                    match Conn::new(s, peer, self.target.clone()) {
                        Ok(c) => {
                            log::info!("{peer}: connection on poll thread {}", self.thread);
                            match self.conns.iter().position(|c| c.is_none()) {
                                Some(i) => self.conns[i] = Some(c),
                                None => self.conns.push(Some(c)),
                            }
                        }
                        Err(e) => {
                            log::warn!("{peer}: {e}");
                            self.shared.live.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    progress = true;
                }
            }
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(256) {
                now = Instant::now();
            }
            // Reading a socket is a system call and polling a completion queue a memory
            // read: while commands are at a device and the sockets were quiet on their last
            // read, they are read every RX_EVERY turns only.
            let at_device = self.qps.iter().any(|q| q.outstanding() > 0);
            let rx_now = !at_device || just_woke || rx_busy || turns.is_multiple_of(RX_EVERY);
            if rx_now {
                rx_busy = false;
            }
            for (slot, c) in self.conns.iter_mut().enumerate() {
                let Some(c) = c else { continue };
                if !stop {
                    let mut io = Io {
                        qps: &mut self.qps,
                        slot,
                    };
                    if rx_now {
                        let got = c.poll_rx(&mut io);
                        rx_busy |= got;
                        progress |= got;
                    }
                    c.submit(&mut io);
                    c.check(now);
                }
            }
            for qi in 0..self.qps.len() {
                completions.clear();
                self.qps[qi].poll(256, |c| completions.push(c));
                if completions.is_empty() {
                    continue;
                }
                progress = true;
                // Polling keeps finding completions: the vector's interrupts would only
                // cost time until the thread sleeps again. Masking and unmasking cost a
                // system call each (hundreds of µs in an emulator), so only a thread that
                // has found many completions without sleeping masks (it unmasks before its
                // next sleep); one that sleeps between commands leaves the vector alone.
                if !just_woke {
                    polled_since_sleep += completions.len() as u32;
                    if polled_since_sleep >= MASK_AFTER {
                        if let Some(irq) = self.qps[qi].interrupt() {
                            irq.mask();
                        }
                    }
                }
                deliver(&mut self.conns, &completions);
            }
            just_woke = false;
            for slot in 0..self.conns.len() {
                let Some(c) = self.conns[slot].as_mut() else {
                    continue;
                };
                progress |= c.flush();
                let drained = stop && c.in_flight() == 0 && !c.wants_write();
                if c.finished() || drained {
                    if drained && c.ending().is_none() {
                        c.end(End::Closed);
                    }
                    log::info!("{}: closed", c.peer);
                    let _ = c.socket().shutdown(std::net::Shutdown::Both);
                    self.conns[slot] = None;
                    self.shared.live.fetch_sub(1, Ordering::AcqRel);
                }
            }
            if now.duration_since(last_report) > Duration::from_millis(100) {
                self.publish();
                self.shared.heartbeats[self.thread].store(
                    now.duration_since(self.shared.epoch).as_millis() as u64,
                    Ordering::Relaxed,
                );
                last_report = now;
            }
            if let Some(since) = stopping {
                let busy = self.conns.iter().flatten().any(|c| c.in_flight() > 0);
                if !busy || since.elapsed() > Duration::from_secs(30) {
                    break;
                }
            }
            if spin_ticks.is_none() {
                spin_ticks = rnvme_driver::clock::learned_rate().map(|r| SpinTicks {
                    spin: r.ticks(self.spin),
                    min_gap: r.ticks(MIN_GAP),
                    max: r.ticks(self.spin.max(MAX_ADAPTIVE_SPIN)),
                    recent: r.ticks(RECENTLY_BUSY),
                });
            }
            if progress {
                let t = Ticks::now();
                // A quiet stretch that work ended: the spin after the next work covers twice
                // the recent ones, so a steady host's next command is found by polling.
                if let (true, Some(st)) = (self.adaptive_spin, spin_ticks) {
                    let gap = t.since(last_work);
                    if gap > st.min_gap {
                        recent_gap = (recent_gap * 7 + gap.min(st.max)) / 8;
                    }
                }
                last_work = t;
                continue;
            }
            // Before the counter's rate is learnt (50 ms), spin by turns.
            let idle = Ticks::now().since(last_work);
            let spun = spin_ticks.map_or(turns.is_multiple_of(64), |st| {
                // Spinning pays only where it catches the next piece of work: with quiet
                // stretches longer than half the longest spin (a slow or overloaded host),
                // the thread would only take CPU from the others, and spins `spin`.
                let adaptive = recent_gap.saturating_mul(2);
                let budget = if adaptive <= st.max {
                    st.spin.max(adaptive)
                } else {
                    st.spin
                };
                idle > budget
            });
            // Still spinning: the next turn follows at once, with no PAUSE (`spin_loop`)
            // between. A turn is already a poll of the completion queues and often a `recv`,
            // as a turn of SPDK's reactor is, and under an emulator a PAUSE is not free: QEMU's
            // TCG leaves its translated code on one and takes its global lock, the lock its
            // emulated controller needs to answer. Measured in three boots (fio through the
            // kernel's initiator, the two builds alternating): 4 KiB random reads at depth 1
            // faster without it in all 11 rounds (median +8 %), at depth 32 reads and writes
            // in 10 of 11 (median +4 %).
            if !spun {
                continue;
            }
            let outstanding: usize = self.qps.iter().map(|q| q.outstanding()).sum();
            let wait = match (outstanding, self.device_wait) {
                (0, _) if spin_ticks.is_none_or(|st| idle < st.recent) => {
                    Some(Duration::from_millis(10))
                }
                // Quiet for a while: until the first of the connections' deadlines, at most
                // `idle_wait`.
                (0, _) => Some(
                    self.conns
                        .iter()
                        .flatten()
                        .filter_map(|c| c.deadline())
                        .fold(self.idle_wait, |w, d| {
                            w.min(d.saturating_duration_since(now) + Duration::from_millis(1))
                        }),
                ),
                (_, DeviceWait::Busy) => None,
                (_, DeviceWait::Timed(d)) => Some(d),
                // The interrupt ends the sleep; the bound lets timers and deadlines be seen.
                (_, DeviceWait::Interrupt) => Some(Duration::from_millis(10)),
            };
            if let Some(w) = wait {
                polled_since_sleep = 0;
                // Whatever woke the thread is work for the next turn, which counts it;
                // a sleep that ran out its time is followed by another, not a spin.
                just_woke = self.sleep(w, &mut completions);
                now = Instant::now();
            }
        }
        self.finish();
    }

    /// Waits in ppoll(2) for any socket, for the thread's wake (a new connection, the stop),
    /// and for the completion interrupts of the queue pairs with commands outstanding (when
    /// they have vectors), at most `wait` (which the caller keeps within the connections'
    /// deadlines). Whether it slept: getting ready to sleep on an interrupt polls its queue
    /// pair once more, and what that finds is delivered instead.
    fn sleep(&mut self, wait: Duration, completions: &mut Vec<Completion>) -> bool {
        // The queue pairs whose interrupts the sleep waits for.
        let mut irqs: Vec<usize> = Vec::new();
        let mut found = false;
        for qi in 0..self.qps.len() {
            let qp = &mut self.qps[qi];
            if qp.outstanding() == 0 || qp.interrupt().is_none() {
                continue;
            }
            completions.clear();
            if qp.prepare_sleep(256, |c| completions.push(c)) > 0 {
                deliver(&mut self.conns, completions);
                found = true;
            } else {
                irqs.push(qi);
            }
        }
        if found {
            return false;
        }
        let mut fds: Vec<PollFd<'_>> = self
            .conns
            .iter()
            .flatten()
            .map(|c| {
                // Not readable interest while the connection will not read (ending, or its
                // host is not reading its answers): the wait would end at once, again and
                // again. Hang-ups and errors are reported all the same.
                let mut f = if c.wants_read() {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                };
                if c.wants_write() {
                    f |= PollFlags::POLLOUT;
                }
                PollFd::new(c.socket().as_fd(), f)
            })
            .collect();
        fds.push(PollFd::new(
            self.shared.wakes[self.thread].rx.as_fd(),
            PollFlags::POLLIN,
        ));
        let socks = fds.len();
        fds.extend(irqs.iter().filter_map(|&qi| {
            let irq = self.qps[qi].interrupt()?;
            Some(PollFd::new(irq.as_fd(), PollFlags::POLLIN))
        }));
        let t = nix::sys::time::TimeSpec::from_duration(wait);
        let _ = ppoll(&mut fds, Some(t), None);
        let woken = fds[socks - 1].revents().is_some_and(|r| !r.is_empty());
        let signalled: Vec<bool> = fds[socks..]
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if woken {
            self.shared.wakes[self.thread].clear();
        }
        self.sleeps += 1;
        if signalled.iter().any(|&s| s) {
            self.device_wakeups += 1;
        }
        for (qi, s) in irqs.into_iter().zip(signalled) {
            self.qps[qi].woke(s);
        }
        true
    }

    fn publish(&self) {
        let list: Vec<ConnReport> = self
            .conns
            .iter()
            .flatten()
            .map(|c| ConnReport {
                thread: self.thread,
                peer: c.peer.to_string(),
                cntlid: c.cntlid(),
                qid: c.qid(),
                stats: c.stats(),
            })
            .collect();
        if let Some(r) = self
            .shared
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(self.thread)
        {
            *r = (
                ThreadReport {
                    thread: self.thread,
                    device_wait: match self.device_wait {
                        DeviceWait::Interrupt => "interrupt",
                        DeviceWait::Timed(_) => "timed",
                        DeviceWait::Busy => "busy",
                    },
                    sleeps: self.sleeps,
                    device_wakeups: self.device_wakeups,
                },
                list,
            );
        }
    }

    /// The end: everything answered is sent, the namespaces are flushed, the connections close.
    fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.conns.iter().flatten().any(|c| c.wants_write()) {
            for c in self.conns.iter_mut().flatten() {
                c.flush();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.thread == 0 {
            for s in &self.target.subsystems {
                if s.read_only {
                    continue;
                }
                for n in &s.namespaces {
                    if let Err(e) = self.qps[n.dev].flush(n.dev_nsid) {
                        log::warn!(
                            "flush of namespace {} of {}: {e}",
                            n.dev_nsid,
                            self.target.devices[n.dev].name()
                        );
                    }
                }
            }
        }
        for c in self.conns.iter_mut().flatten() {
            let _ = c.socket().shutdown(std::net::Shutdown::Both);
        }
        self.publish();
        for c in self.conns.iter_mut().flatten() {
            if c.in_flight() > 0 {
                log::warn!(
                    "{}: {} commands still at the device at shutdown: their memory stays quarantined",
                    c.peer,
                    c.in_flight()
                );
            }
        }
    }
}
