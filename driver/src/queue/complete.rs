//! Completion: reaping the completion queue by phase tag, retries, handing completions back,
//! and the completion doorbell.

#![forbid(unsafe_code)]

use super::submit::push_entry;
use super::*;

impl QueuePair {
    /// Reap up to `max` completions, calling `f` for each; rings the submission doorbell
    /// first if needed and, when the completion queue's surplus of entries is used up, the
    /// completion doorbell once at the end. Returns how many were
    /// reaped. Completions for a command id that is not outstanding are counted as spurious
    /// and dropped, so no command ever completes twice.
    ///
    /// Every so often while commands are outstanding, poll also checks their deadlines and
    /// the controller's health: a command past its deadline is aborted, and if that does not
    /// bring it back the controller is reset and the queue pair recreated; a fatal controller
    /// status resets it too; a removed device fails every outstanding command. Commands the
    /// driver had to cancel complete with [`NvmeStatus::ABORTED_BY_RESET`] or
    /// [`NvmeStatus::DEVICE_REMOVED`], so the caller always gets a completion. Failures with
    /// a retryable status are resubmitted up to the retry limit before they are handed back.
    #[inline]
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(Completion)) -> usize {
        self.polls_to_check -= 1;
        if self.polls_to_check == 0 {
            self.polls_to_check = CHECK_EVERY;
            if self.free.len() < self.slots.len() {
                self.maintenance(&mut f);
            }
        }
        if self.ring_on_poll {
            self.ring();
        }
        self.stats.polls += 1;
        let mut handed = 0;
        if !self.deferred.is_empty() {
            while handed < max {
                let Some(c) = self.deferred.pop_front() else {
                    break;
                };
                f(c);
                handed += 1;
            }
        }
        let max = max - handed;
        let mut n = 0;
        let mut retried = false;
        let cq = self.cq.volatile();
        while n < max {
            let off = self.cq_head as usize * std::mem::size_of::<CqEntry>();
            let dw3 = cq
                .get_ref::<u32>(off + 12)
                .expect("CQ entry inside the ring")
                .load();
            if (dw3 & (1 << 16) != 0) != self.phase {
                break;
            }
            // The phase tag says the entry is complete; read the rest only after it.
            fence(Ordering::Acquire);
            let dwords = cq
                .get_ref::<[u32; 4]>(off)
                .expect("CQ entry inside the ring")
                .load();
            let e: CqEntry = zerocopy::transmute!(dwords);
            self.cq_head += 1;
            if self.cq_head == self.cq_entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            n += 1;
            let head = e.sq_head();
            if head < self.entries {
                self.sq_head = head;
            }
            let cid = e.cid();
            let index = cid & CID_INDEX_MASK;
            match self.slots.get_mut(index as usize) {
                Some(slot) if slot.busy && slot.gen as u16 == cid >> CID_INDEX_BITS => {
                    let field = e.status_field();
                    // Success is the common case: skip decoding and the retry checks.
                    let status = if field == 0 {
                        NvmeStatus::SUCCESS
                    } else {
                        NvmeStatus::from_field(field)
                    };
                    if field != 0
                        && status.is_retryable()
                        && slot.retries < self.retry_limit
                        && !slot.aborted
                        && status != NvmeStatus::ABORT_REQUESTED
                    {
                        slot.retries += 1;
                        slot.submitted = Ticks::now();
                        let cmd = slot.cmd;
                        self.stats.retries += 1;
                        log::debug!(
                            "{}: queue {}: retrying command {cid} after {status}",
                            self.hw.name(),
                            self.qid
                        );
                        push_entry(&self.sq, &mut self.sq_tail, self.entries, &cmd);
                        retried = true;
                        continue;
                    }
                    slot.busy = false;
                    slot.release();
                    self.free.push(index);
                    self.stats.completed += 1;
                    f(Completion {
                        tag: slot.tag,
                        cid: CommandId(cid),
                        status,
                        dw0: e.dw0,
                    });
                }
                _ => {
                    self.stats.spurious += 1;
                    log::warn!(
                        "{}: queue {}: completion for command id {cid} that is not outstanding (ignored)",
                        self.hw.name(),
                        self.qid
                    );
                }
            }
        }
        if retried && !self.ring_on_poll {
            // The owner rings for what it queued; what the queue pair queued again is its own.
            self.ring();
        }
        if n > 0 {
            // Fewer than `cq_entries` (at most 4096) completions are reaped per call: no
            // overflow.
            self.cq_unrung += n as u16;
            if self.cq_unrung > self.cq_entries - self.entries {
                self.ring_cq_head();
            } else if let Some(sh) = &self.shadow {
                // A shadow head costs a memory write: a controller that reads it sees freed
                // entries at once. The MMIO doorbell waits for the surplus to run out, as
                // without shadows: the controller never finds the queue full before that.
                sh.dbs.store(sh.cq, self.cq_head as u32);
                self.stats.cq_shadow_writes += 1;
            }
        } else if handed == 0 {
            self.stats.idle_polls += 1;
        }
        n + handed
    }

    /// Tell the controller every completion reaped so far.
    #[inline(always)]
    pub(super) fn ring_cq_head(&mut self) {
        let mmio = match &self.shadow {
            None => true,
            Some(sh) => {
                self.stats.cq_shadow_writes += 1;
                let old = std::mem::replace(&mut self.shadow_cq_head, self.cq_head);
                let asked = sh.update(sh.cq, self.cq_head, old);
                // Past the surplus the controller may be about to find the queue full:
                // ring whatever the event index says.
                self.always_mmio || self.cq_unrung > self.cq_entries - self.entries || asked
            }
        };
        if mmio {
            self.hw.write32(self.cq_db, self.cq_head as u32);
            self.stats.cq_doorbells += 1;
        }
        self.cq_unrung = 0;
    }
}
