//! Cheap timestamps: the CPU's time-stamp counter, and its rate learnt against the monotonic
//! clock.
//!
//! Reading `Instant::now()` is a system call where the kernel's clock source has no fast path
//! (a guest on an emulated HPET pays an MMIO exit for each, milliseconds under emulation), so
//! nothing on the I/O path reads it: submissions are stamped with [`Ticks`], and deadlines turn
//! tick counts into time with [`learned_rate`], which reads the monotonic clock only during the
//! first 50 ms of the process.
//!
//! Hand-written rather than `quanta`: quanta reads the TSC only where CPUID reports it
//! invariant and otherwise falls back to the OS monotonic clock. QEMU's TCG guests (where this
//! driver is tested) report no invariant TSC (`constant_tsc`/`nonstop_tsc` are absent and the
//! kernel marks the TSC unstable), so quanta would make every timestamp on the I/O path the
//! HPET system call this module exists to avoid. Deadlines need a steady rate, not
//! cross-CPU synchronisation: a queue pair's stamps are taken and compared on one thread.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A timestamp from a cheap, monotonic, constant-rate counter: the time-stamp counter on
/// x86_64 (invariant on the CPUs and hypervisors this driver targets), nanoseconds of the
/// monotonic clock elsewhere. Only differences mean anything; [`TickRate`] converts them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticks(pub u64);

impl Ticks {
    /// The counter now.
    #[inline]
    pub fn now() -> Ticks {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: RDTSC has no preconditions: it reads the time-stamp counter into
            // registers and touches no memory.
            Ticks(unsafe { core::arch::x86_64::_rdtsc() })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            Ticks(START.get_or_init(Instant::now).elapsed().as_nanos() as u64)
        }
    }

    /// Ticks from `earlier` to `self`; 0 if `earlier` is later (counters of two CPUs that
    /// differ by a few cycles).
    #[inline]
    pub fn since(self, earlier: Ticks) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The timestamp `ticks` later.
    #[inline]
    pub fn after(self, ticks: u64) -> Ticks {
        Ticks(self.0.saturating_add(ticks))
    }
}

/// How long a tick is, measured against the monotonic clock.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct TickRate {
    ns_per_tick: f64,
}

impl TickRate {
    /// Measure the rate over `over` (sleeping): 50 ms gives better than 10^-4 even where one
    /// clock read costs microseconds.
    pub fn calibrate(over: Duration) -> TickRate {
        let (t0, c0) = (Instant::now(), Ticks::now());
        std::thread::sleep(over);
        let (c1, t1) = (Ticks::now(), Instant::now());
        TickRate::from_measurement(t1 - t0, c1.since(c0))
    }

    /// The rate of `ticks` ticks in `elapsed`.
    pub fn from_measurement(elapsed: Duration, ticks: u64) -> TickRate {
        TickRate {
            ns_per_tick: if ticks == 0 {
                1.0
            } else {
                elapsed.as_nanos() as f64 / ticks as f64
            },
        }
    }

    /// Nanoseconds per tick.
    pub fn ns_per_tick(&self) -> f64 {
        self.ns_per_tick
    }

    /// `ticks` in nanoseconds.
    #[inline]
    pub fn nanos(&self, ticks: u64) -> u64 {
        (ticks as f64 * self.ns_per_tick) as u64
    }

    /// `ticks` as a duration.
    pub fn duration(&self, ticks: u64) -> Duration {
        Duration::from_nanos(self.nanos(ticks))
    }

    /// How many ticks `d` lasts.
    pub fn ticks(&self, d: Duration) -> u64 {
        (d.as_nanos() as f64 / self.ns_per_tick) as u64
    }
}

/// How long the rate is learnt before it is fixed.
const LEARN_FOR: Duration = Duration::from_millis(50);
/// The shortest measurement the rate is taken from.
const LEARN_MIN: Duration = Duration::from_millis(1);

/// Where the process-wide measurement started.
static LEARN_START: OnceLock<(Ticks, Instant)> = OnceLock::new();
/// The rate, once learnt.
static LEARNED: OnceLock<TickRate> = OnceLock::new();

/// Start learning the tick rate, if nobody has: the first call of [`learned_rate`] also does.
pub fn start_learning_rate() {
    LEARN_START.get_or_init(|| (Ticks::now(), Instant::now()));
}

/// The tick rate of this process: None during its first millisecond of learning; from then on
/// measured against the monotonic clock (one clock read per call) until 50 ms have passed, and
/// fixed after that (no clock read at all).
pub fn learned_rate() -> Option<TickRate> {
    if let Some(r) = LEARNED.get() {
        return Some(*r);
    }
    let &(c0, t0) = LEARN_START.get_or_init(|| (Ticks::now(), Instant::now()));
    let (c1, dt) = (Ticks::now(), t0.elapsed());
    if dt < LEARN_MIN {
        return None;
    }
    let rate = TickRate::from_measurement(dt, c1.since(c0));
    if dt >= LEARN_FOR {
        // Another thread may have fixed it meanwhile: either measurement is good.
        return Some(*LEARNED.get_or_init(|| rate));
    }
    Some(rate)
}

/// Time since `start` by [`learned_rate`]; None while the rate is still unknown.
pub fn elapsed_since(start: Ticks) -> Option<Duration> {
    learned_rate().map(|r| r.duration(Ticks::now().since(start)))
}

/// Measures time since it was started from the time-stamp counter once the rate is learnt
/// (no system call: in a guest whose clock source is emulated, `Instant::now()` is one), and
/// from the monotonic clock before that.
#[derive(Copy, Clone, Debug)]
pub struct Stopwatch {
    ticks: Ticks,
    instant: Option<Instant>,
}

impl Stopwatch {
    /// Start measuring.
    pub fn start() -> Stopwatch {
        Stopwatch {
            ticks: Ticks::now(),
            instant: LEARNED.get().is_none().then(Instant::now),
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        match (self.instant, LEARNED.get()) {
            (None, Some(r)) => r.duration(Ticks::now().since(self.ticks)),
            (Some(t), _) => t.elapsed(),
            (None, None) => unreachable!("a rate once learnt stays"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learned_rate_settles_and_matches_the_clock() {
        start_learning_rate();
        std::thread::sleep(LEARN_FOR + Duration::from_millis(10));
        let a = learned_rate().expect("learnt after 60 ms");
        let b = learned_rate().unwrap();
        assert_eq!(a, b, "fixed once learnt");
        // 20 ms of sleep measured in ticks reads back as 20 ms within 10 %.
        let (c0, t0) = (Ticks::now(), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (c1, t1) = (Ticks::now(), Instant::now());
        let measured = a.nanos(c1.since(c0)) as f64;
        let real = (t1 - t0).as_nanos() as f64;
        assert!(
            (measured / real - 1.0).abs() < 0.1,
            "{measured} ns vs {real} ns"
        );
    }

    #[test]
    fn a_stopwatch_measures_before_and_after_the_rate_is_learnt() {
        let early = Stopwatch::start();
        start_learning_rate();
        std::thread::sleep(LEARN_FOR + Duration::from_millis(10));
        learned_rate().expect("learnt");
        let late = Stopwatch::start();
        std::thread::sleep(Duration::from_millis(20));
        assert!(early.elapsed() >= Duration::from_millis(75));
        let l = late.elapsed();
        assert!(
            l >= Duration::from_millis(18) && l < Duration::from_secs(5),
            "{l:?}"
        );
    }

    #[test]
    fn rate_conversions_round_trip() {
        let r = TickRate::from_measurement(Duration::from_millis(10), 30_000_000);
        assert!((r.ns_per_tick() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.ticks(Duration::from_micros(1)), 3000);
        assert_eq!(r.nanos(3000), 1000);
        assert_eq!(
            Ticks(10).since(Ticks(20)),
            0,
            "a later start gives 0, not a wrap"
        );
        assert_eq!(Ticks(10).after(5), Ticks(15));
    }
}
