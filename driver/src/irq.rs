//! Completion interrupts: MSI-X vectors delivered to eventfds, and how a queue pair waits.
//!
//! A queue pair waits for completions in one of three ways ([`WaitMode`]): it polls its
//! completion queue (the default: lowest latency, a busy core), it sleeps on its interrupt
//! vector's eventfd, or it polls for a while and then sleeps (hybrid).
//!
//! Sleeping without losing a wake-up takes an order: first consume any signal already pending
//! on the eventfd ([`Interrupt::arm`]), then poll the completion queue once more, and only if
//! that finds nothing, sleep. A completion posted after that last poll signals the (now
//! empty) eventfd, so the sleep returns at once; a completion posted before it is found by the
//! poll. Consuming the signal after the poll instead would lose exactly the completion that
//! lands between the two.
//!
//! A hybrid queue pair masks its vector while polling pays off ([`Interrupt::mask`]): the
//! device then holds its interrupts pending instead of sending one per completion, which
//! would cost the host an interrupt for every completion it has already found by polling.
//! Before sleeping it unmasks the vector ([`Interrupt::unmask`]) and then arms: an interrupt
//! held pending meanwhile is sent at the unmasking, and the arm and poll that follow
//! consume it and find its completion.

use crate::hw::Hardware;
use rustix::event::{PollFd, PollFlags, Timespec};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// How a queue pair waits for completions.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum WaitMode {
    /// Poll the completion queue: the lowest latency, one core busy while waiting. The
    /// completion queue is created with interrupts disabled.
    #[default]
    Polled,
    /// Sleep on the queue pair's MSI-X vector until the controller signals it.
    Interrupt,
    /// Poll while completions keep coming, and for `spin` after the last one (or twice the
    /// recent wait for a completion, if longer, up to 1 ms); then sleep on the vector as
    /// [`WaitMode::Interrupt`] does. With nothing outstanding it sleeps at once.
    Hybrid {
        /// How long to keep polling an empty completion queue before sleeping, at least.
        spin: Duration,
    },
}

impl WaitMode {
    /// Whether the completion queue needs an interrupt vector.
    pub fn needs_interrupts(self) -> bool {
        !matches!(self, WaitMode::Polled)
    }

    /// A short name: `polled`, `interrupt` or `hybrid`.
    pub fn name(self) -> &'static str {
        match self {
            WaitMode::Polled => "polled",
            WaitMode::Interrupt => "interrupt",
            WaitMode::Hybrid { .. } => "hybrid",
        }
    }
}

/// The default spin budget of [`WaitMode::Hybrid`]: about one flash read.
pub const DEFAULT_HYBRID_SPIN: Duration = Duration::from_micros(100);

/// One MSI-X vector and the eventfd it signals.
#[derive(Debug)]
pub struct Interrupt {
    vector: u16,
    fd: EventFd,
    /// Signals consumed (by `arm` and by sleeps that ended with one).
    signals: AtomicU64,
    /// The hardware that masks the vector (none: masking is not available).
    hw: Option<Weak<dyn Hardware>>,
    /// Masked now.
    masked: AtomicBool,
    /// The hardware refused to mask: do not ask again.
    no_masking: AtomicBool,
    /// Maskings and unmaskings done.
    masks: AtomicU64,
}

impl Interrupt {
    /// A vector with a fresh non-blocking eventfd.
    pub(crate) fn new(vector: u16, hw: Option<Weak<dyn Hardware>>) -> std::io::Result<Interrupt> {
        Ok(Interrupt {
            vector,
            fd: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            signals: AtomicU64::new(0),
            hw,
            masked: AtomicBool::new(false),
            no_masking: AtomicBool::new(false),
            masks: AtomicU64::new(0),
        })
    }

    /// Stop the vector's interrupts while its queue pair polls: the device holds them
    /// pending until [`Interrupt::unmask`]. Whether the vector is masked now (hardware that
    /// cannot mask keeps interrupting, which costs time but loses nothing).
    pub fn mask(&self) -> bool {
        // Called after every wait that polling ended: masked already is the common case.
        if self.masked.load(Ordering::Acquire) {
            return true;
        }
        if self.no_masking.load(Ordering::Relaxed) {
            return false;
        }
        if self.masked.swap(true, Ordering::AcqRel) {
            return true;
        }
        if let Err(e) = self.route(None) {
            log::debug!("{e}: the vector stays unmasked");
            self.masked.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Let the vector interrupt again; an interrupt held pending while it was masked signals
    /// the eventfd now. Call it before [`Interrupt::arm`] when going to sleep.
    pub fn unmask(&self) {
        if !self.masked.swap(false, Ordering::AcqRel) {
            return;
        }
        // The device is gone or refuses: sleeps with commands outstanding are bounded
        // (100 ms), after which the queue pair polls and checks its health.
        if let Err(e) = self.route(Some(&self.fd)) {
            log::warn!("{e}");
        }
    }

    /// Mask (`None`) or unmask (`Some(eventfd)`) through the hardware, counting what was done;
    /// a refusal (or hardware gone) turns masking off for good.
    fn route(&self, fd: Option<&EventFd>) -> Result<(), String> {
        let done = match self.hw.as_ref().and_then(Weak::upgrade) {
            Some(hw) => hw
                .mask_interrupt(self.vector, fd)
                .map_err(|e| e.to_string()),
            None => Err(format!("vector {}: the device is gone", self.vector)),
        };
        match done {
            Ok(()) => {
                self.masks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.no_masking.store(true, Ordering::Relaxed),
        }
        done
    }

    /// Whether the vector is masked now.
    pub fn is_masked(&self) -> bool {
        self.masked.load(Ordering::Acquire)
    }

    /// Maskings and unmaskings so far.
    pub fn masks(&self) -> u64 {
        self.masks.load(Ordering::Relaxed)
    }

    /// The MSI-X vector number.
    pub fn vector(&self) -> u16 {
        self.vector
    }

    /// The eventfd the vector signals.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// Consume a pending signal, if any (whether there was one). Call it before the last
    /// poll that precedes a sleep (see the module documentation).
    pub fn arm(&self) -> bool {
        match self.fd.read() {
            Ok(n) => {
                self.signals.fetch_add(n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Sleep until the vector is signalled or `timeout` passes; whether it was signalled.
    /// The signal is left pending: the next [`Interrupt::arm`] consumes it.
    pub fn sleep(&self, timeout: Duration) -> bool {
        let mut fds = [PollFd::new(self, PollFlags::IN)];
        let ts = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => n > 0,
            // Interrupted by a signal: the caller polls again, as after a wake-up.
            Err(_) => true,
        }
    }

    /// Interrupts consumed so far (an eventfd folds signals that arrive between two reads
    /// into one count).
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }
}

impl AsFd for Interrupt {
    fn as_fd(&self) -> BorrowedFd<'_> {
        crate::vfio::eventfd_as_fd(&self.fd)
    }
}

impl AsRawFd for Interrupt {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn arm_consumes_and_sleep_sees_a_pending_signal() {
        let irq = Interrupt::new(3, None).unwrap();
        assert!(!irq.arm(), "nothing pending on a fresh eventfd");
        let t = Instant::now();
        assert!(!irq.sleep(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(15));
        irq.eventfd().write(1).unwrap();
        // A signal that came before the sleep ends it at once, and stays for arm.
        assert!(irq.sleep(Duration::from_secs(10)));
        assert!(irq.sleep(Duration::from_secs(10)));
        assert!(irq.arm());
        assert!(!irq.arm());
        assert_eq!(irq.signals(), 1);
        assert_eq!(irq.vector(), 3);
    }

    #[test]
    fn a_signal_from_another_thread_ends_the_sleep() {
        let irq = std::sync::Arc::new(Interrupt::new(1, None).unwrap());
        let other = irq.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            other.eventfd().write(1).unwrap();
        });
        assert!(irq.sleep(Duration::from_secs(30)));
        t.join().unwrap();
    }
}
