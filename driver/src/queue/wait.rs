//! Waiting for completions as the queue pair's [`WaitMode`] says: polling, sleeping on its
//! MSI-X vector, or polling for a while and then sleeping (see [`crate::irq`]).

#![forbid(unsafe_code)]

use super::*;

/// The longest a hybrid wait spins, however slow recent completions were.
const MAX_HYBRID_SPIN: Duration = Duration::from_millis(1);

impl QueuePair {
    /// The interrupt vector the completion queue signals, when it waits on interrupts.
    pub fn interrupt(&self) -> Option<&Arc<Interrupt>> {
        self.irq.as_ref()
    }

    /// How [`QueuePair::wait`] waits.
    pub fn wait_mode(&self) -> WaitMode {
        self.wait_mode
    }

    /// Give the queue pair its interrupt vector (before its queues are created).
    pub(crate) fn set_interrupt(&mut self, irq: Option<Arc<Interrupt>>, mode: WaitMode) {
        self.irq = irq;
        self.wait_mode = mode;
    }

    /// Switch between waiting modes. A queue pair created polled has no interrupt vector
    /// (its completion queue was created without interrupts) and can only stay polled; one
    /// created for interrupts can also poll (its interrupts then just go unread).
    pub fn set_wait_mode(&mut self, mode: WaitMode) -> Result<()> {
        if mode.needs_interrupts() && self.irq.is_none() {
            return Err(Error::InvalidArgument(format!(
                "queue {} was created polled: it has no interrupt vector for {} mode",
                self.qid,
                mode.name()
            )));
        }
        self.wait_mode = mode;
        Ok(())
    }

    /// Check deadlines, health and removal at the next poll (after a quiet stretch spent
    /// sleeping rather than polling).
    pub(crate) fn check_soon(&mut self) {
        self.polls_to_check = 1;
        self.next_check = Ticks(0);
    }

    /// Test hook: `f` runs in [`QueuePair::wait`] after its last empty poll, just before it
    /// sleeps (to complete a command exactly in that window).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn set_before_sleep(&mut self, f: Option<Box<dyn FnMut() + Send>>) {
        self.before_sleep = f;
    }

    /// Wait until at least one completion is handed to `f` (at most `max`), or `timeout`
    /// passes; returns how many were. How it waits is the queue pair's [`WaitMode`]: polling,
    /// sleeping on the interrupt vector, or polling for the spin budget and then sleeping.
    /// Deadlines, health checks and removal are watched as in [`QueuePair::poll`].
    pub fn wait(&mut self, max: usize, timeout: Duration, mut f: impl FnMut(Completion)) -> usize {
        let n = self.poll(max, &mut f);
        if n > 0 || timeout.is_zero() {
            return n;
        }
        let start = clock::Stopwatch::start();
        let passed = || start.elapsed();
        let idle = self.nothing_to_come();
        let spin = match self.wait_mode {
            WaitMode::Polled => timeout,
            WaitMode::Interrupt => Duration::ZERO,
            // Nothing outstanding: nothing can complete, sleep at once.
            WaitMode::Hybrid { .. } if idle => Duration::ZERO,
            // Busy: at least the budget, and twice the recent wait for a completion (a device
            // or host slower than the budget keeps the queue pair polling while busy).
            WaitMode::Hybrid { spin } => spin
                .max(self.recent_wait * 2)
                .min(MAX_HYBRID_SPIN)
                .min(timeout),
        };
        let mut polls = 0u32;
        while !spin.is_zero() {
            let n = self.poll(max, &mut f);
            if n > 0 {
                self.note_wait(passed());
                // Polling pays off: stop the vector's interrupts until the next sleep (each
                // would cost the host an interrupt for a completion already found).
                if let Some(irq) = &self.irq {
                    irq.mask();
                }
                return n;
            }
            polls += 1;
            // Reading the clock costs more than a poll: every 64th.
            if polls.is_multiple_of(64) && passed() >= spin {
                break;
            }
        }
        if self.irq.is_none() {
            return 0;
        }
        loop {
            let n = self.sleep_once(max, timeout.saturating_sub(passed()), &mut f);
            if n > 0 && !idle {
                self.note_wait(passed());
            }
            if n > 0 || passed() >= timeout {
                return n;
            }
        }
    }

    /// No command outstanding and no completion held back: nothing can come.
    fn nothing_to_come(&self) -> bool {
        self.free.len() == self.slots.len() && self.deferred.is_empty()
    }

    /// Fold how long a busy wait took into `recent_wait` (an average over about 8 waits).
    fn note_wait(&mut self, waited: Duration) {
        self.recent_wait = (self.recent_wait * 7 + waited.min(MAX_HYBRID_SPIN)) / 8;
    }

    /// Get ready to sleep on the vector's eventfd in an event loop of one's own (one that also
    /// waits on sockets, say): unmask the vector (an interrupt held pending is sent now),
    /// consume its signal, tell the controller every completion reaped, and poll once more.
    /// If that poll hands completions to `f` (it returns how many), do not sleep; otherwise
    /// wait until [`Interrupt::eventfd`] is readable (with the other file descriptors), then
    /// call [`QueuePair::woke`] and poll. A completion posted after this poll signals the
    /// eventfd, so the wait cannot miss it (see [`crate::irq`]). A queue pair without a
    /// vector only polls.
    pub fn prepare_sleep(&mut self, max: usize, mut f: impl FnMut(Completion)) -> usize {
        if let Some(irq) = &self.irq {
            irq.unmask();
            irq.arm();
        }
        if self.cq_unrung > 0 {
            self.ring_cq_head();
        }
        self.poll(max, &mut f)
    }

    /// After a sleep that [`QueuePair::prepare_sleep`] prepared: whether the vector's eventfd
    /// was readable. A quiet sleep (it was not) makes the next poll check deadlines, health
    /// and removal, as a queue pair that sleeps rather than polls would not check them often
    /// enough otherwise.
    pub fn woke(&mut self, signalled: bool) {
        self.stats.sleeps += 1;
        if signalled {
            self.stats.wakeups += 1;
        } else {
            self.check_soon();
        }
    }

    /// Arm, poll once more, and sleep on the vector (at most `left`, and at most 100 ms while
    /// commands are outstanding, so deadlines are checked); then poll. See the module documentation of [`crate::irq`].
    fn sleep_once(&mut self, max: usize, left: Duration, f: &mut impl FnMut(Completion)) -> usize {
        let irq = self.irq.clone().expect("a vector to sleep on");
        let n = self.prepare_sleep(max, &mut *f);
        if n > 0 {
            return n;
        }
        #[cfg(any(test, feature = "test-utils"))]
        if let Some(hook) = self.before_sleep.as_mut() {
            hook();
        }
        // With commands outstanding, wake at least every 100 ms to check their deadlines;
        // with none, every second (the removal watcher does not depend on this).
        let cap = if self.nothing_to_come() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(100)
        };
        let signalled = irq.sleep(left.min(cap));
        self.woke(signalled);
        self.poll(max, f)
    }
}
