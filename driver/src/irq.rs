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

use rustix::event::{PollFd, PollFlags, Timespec};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
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
}

impl Interrupt {
    /// A vector with a fresh non-blocking eventfd.
    pub(crate) fn new(vector: u16) -> std::io::Result<Interrupt> {
        Ok(Interrupt {
            vector,
            fd: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            signals: AtomicU64::new(0),
        })
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
        let irq = Interrupt::new(3).unwrap();
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
        let irq = std::sync::Arc::new(Interrupt::new(1).unwrap());
        let other = irq.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            other.eventfd().write(1).unwrap();
        });
        assert!(irq.sleep(Duration::from_secs(30)));
        t.join().unwrap();
    }
}
