//! How a queue pair recovers: deadlines, aborts, controller resets and removal, and what
//! becomes of the memory its outstanding commands hold when the driver gives up on them.

#![forbid(unsafe_code)]

use std::time::Duration;

use super::{Completion, QueuePair, Recovery, CHECK_INTERVAL, CID_INDEX_BITS, CID_INDEX_MASK};
use crate::clock::{self, Ticks};
use crate::error::Error;
use crate::spec::{csts, reg};
use crate::status::NvmeStatus;
use crate::types::CommandId;

impl QueuePair {
    /// Deadlines and controller health; see [`QueuePair::poll`].
    #[cold]
    pub(super) fn maintenance(&mut self, f: &mut impl FnMut(Completion)) {
        if self.removed {
            return;
        }
        if let Some(rec) = self.recovery.clone() {
            if rec.generation() != self.generation {
                self.after_reset(rec.as_ref(), f);
                return;
            }
        }
        let now = Ticks::now();
        if now.0 < self.next_check.0 {
            return;
        }
        // A controller that posted more than it was asked to (duplicates) may be waiting for
        // room: let it see every entry reaped so far.
        if self.cq_unrung > 0 {
            self.ring_cq_head();
        }
        let Some(rate) = clock::learned_rate() else {
            return;
        };
        self.next_check = now.after(rate.ticks(CHECK_INTERVAL));
        let age = |since: Ticks| rate.duration(now.since(since));
        let oldest = self
            .slots
            .iter()
            .filter(|s| s.busy)
            .map(|s| age(s.submitted))
            .max()
            .unwrap_or_default();
        // Registers are only read when something is slow: MMIO reads are expensive.
        if oldest < (self.timeout / 4).min(Duration::from_millis(100)) {
            return;
        }
        let status = self.hw.read32(reg::CSTS);
        if status == u32::MAX {
            log::error!(
                "{}: device removed: failing {} outstanding command(s)",
                self.hw.name(),
                self.outstanding()
            );
            // A removed device cannot be shown to have stopped: its commands' memory is
            // quarantined unless the controller was stopped before.
            let stopped = match self.recovery.clone() {
                Some(rec) => self.stopped_since_seen(rec.as_ref()),
                None => false,
            };
            self.cancel_all(NvmeStatus::DEVICE_REMOVED, stopped, f);
            self.mark_removed();
            return;
        }
        let Some(rec) = self.recovery.clone() else {
            return;
        };
        if status & csts::CFS != 0 {
            self.reset(
                rec.as_ref(),
                "controller fatal status (CSTS.CFS) noticed while polling",
                f,
            );
            return;
        }
        if status & csts::RDY == 0 {
            // Reset or disabled behind our back (a function level reset, say): its queues
            // are gone, so nothing outstanding will complete and an Abort cannot be heard.
            self.reset(
                rec.as_ref(),
                "the controller is not ready (CSTS.RDY = 0) while commands are outstanding",
                f,
            );
            return;
        }
        if oldest < self.timeout {
            return;
        }
        let mut need_reset = false;
        for cid in 0..self.slots.len() {
            let slot = &self.slots[cid];
            if !slot.busy || age(slot.submitted) < self.timeout {
                continue;
            }
            if slot.aborted {
                need_reset = true;
                break;
            }
            self.stats.timeouts += 1;
            self.stats.aborts += 1;
            log::warn!(
                "{}: queue {}: command {cid} (opcode {:#04x}) exceeded its {:?} deadline: aborting it",
                self.hw.name(),
                self.qid,
                slot.cmd.opcode(),
                self.timeout
            );
            let full = cid as u16 | ((slot.gen as u16) << CID_INDEX_BITS);
            let aborted = rec.abort(self.qid, full);
            let slot = &mut self.slots[cid];
            slot.aborted = true;
            slot.submitted = Ticks::now();
            if aborted.is_none() {
                // Waiting for the other commands' aborts would cost an admin timeout each.
                need_reset = true;
                break;
            }
            if aborted == Some(false) {
                log::warn!(
                    "{}: queue {}: the controller could not abort command {cid}",
                    self.hw.name(),
                    self.qid
                );
            }
        }
        if need_reset {
            self.reset(
                rec.as_ref(),
                "a command did not complete even after an abort",
                f,
            );
        }
    }

    fn reset(&mut self, rec: &dyn Recovery, why: &str, f: &mut impl FnMut(Completion)) {
        match rec.reset(self.generation, why) {
            Ok(_) => self.after_reset(rec, f),
            Err(e) => {
                log::error!(
                    "{}: controller reset failed: {e}; failing outstanding commands",
                    self.hw.name()
                );
                let removed = matches!(e, Error::DeviceRemoved { .. });
                let status = if removed {
                    NvmeStatus::DEVICE_REMOVED
                } else {
                    NvmeStatus::ABORTED_BY_RESET
                };
                let stopped = self.stopped_since_seen(rec);
                self.cancel_all(status, stopped, f);
                if removed {
                    self.mark_removed();
                }
            }
        }
    }

    /// Whether the controller was seen stopped since the outstanding commands were last
    /// accounted for (then none of them can still touch memory). Updates the mark.
    fn stopped_since_seen(&mut self, rec: &dyn Recovery) -> bool {
        let now = rec.quiesces();
        let stopped = now != self.quiesce_seen;
        self.quiesce_seen = now;
        stopped
    }

    /// The controller was reset: our queues are gone. Hand back every outstanding command
    /// as cancelled and create the queues again.
    pub(super) fn after_reset(&mut self, rec: &dyn Recovery, f: &mut impl FnMut(Completion)) {
        self.stats.resets += 1;
        self.generation = rec.generation();
        // A reset that completed disabled the controller first: nothing outstanding can still
        // touch memory. The check stays, for a reset some other way than ours.
        let stopped = self.stopped_since_seen(rec);
        self.cancel_all(NvmeStatus::ABORTED_BY_RESET, stopped, f);
        self.set_shadow(rec.shadow(self.qid));
        if let Err(e) = rec.recreate(self) {
            log::error!(
                "{}: queue {} could not be created again after a reset: {e}",
                self.hw.name(),
                self.qid
            );
            if matches!(e, Error::DeviceRemoved { .. }) {
                self.mark_removed();
            }
        }
    }

    /// From now on every submission fails with "device removed".
    fn mark_removed(&mut self) {
        self.removed = true;
        self.free.clear();
    }

    /// Complete every outstanding command with `status`. `stopped`: the controller was shown
    /// to have stopped since they were submitted, so their memory goes back; otherwise it is
    /// quarantined.
    fn cancel_all(&mut self, status: NvmeStatus, stopped: bool, f: &mut impl FnMut(Completion)) {
        for (cid, tag) in self.abandon_all(stopped) {
            self.stats.cancelled += 1;
            f(Completion {
                tag,
                cid,
                status,
                dw0: 0,
            });
        }
    }

    /// The tags of the commands still outstanding, with their command ids.
    pub fn outstanding_tags(&self) -> Vec<(CommandId, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.busy)
            .map(|(i, s)| {
                (
                    CommandId(i as u16 | ((s.gen as u16) << CID_INDEX_BITS)),
                    s.tag,
                )
            })
            .collect()
    }

    /// Forget every outstanding command and reset the ring indices, after the controller
    /// dropped its queues (a reset). Returns the tags that will never complete. `stopped`:
    /// the controller was shown to have stopped (CSTS.RDY read 0 after disabling it, or a
    /// function level reset), so the commands' memory goes back to its owners; otherwise it
    /// is quarantined.
    pub(crate) fn abandon_all(&mut self, stopped: bool) -> Vec<(CommandId, u64)> {
        let lost = self.outstanding_tags();
        for (cid, _) in &lost {
            let index = cid.0 & CID_INDEX_MASK;
            let slot = &mut self.slots[index as usize];
            slot.busy = false;
            let usable = if stopped {
                slot.release();
                true
            } else {
                self.stats.quarantined += 1;
                slot.quarantine(&self.pool)
            };
            if usable && !self.removed {
                self.free.push(index);
            }
        }
        self.sq_tail = 0;
        self.sq_head = 0;
        self.rung_tail = 0;
        self.cq_head = 0;
        self.cq_unrung = 0;
        self.phase = true;
        self.cq.fill(0);
        self.shadow_cq_head = 0;
        if let Some(sh) = &self.shadow {
            sh.clear();
        }
        lost
    }

    /// Say what became of the controller's use of this queue pair, before it is dropped:
    /// `rings_free` when the controller no longer uses its rings (the queues were deleted, or
    /// the controller was stopped), `commands_free` when outstanding commands can no longer
    /// touch memory (the controller was stopped). What is not free is quarantined.
    pub(crate) fn retire(&mut self, rings_free: bool, commands_free: bool) {
        if self.retired {
            return;
        }
        self.retired = true;
        let outstanding = self.slots.iter().filter(|s| s.busy).count();
        if outstanding > 0 && !commands_free {
            log::error!(
                "{}: queue {} goes away with {outstanding} command(s) the controller may still                  run: quarantining their memory",
                self.hw.name(),
                self.qid
            );
            for slot in self.slots.iter_mut().filter(|s| s.busy) {
                slot.busy = false;
                self.stats.quarantined += 1;
                slot.leases.quarantine();
                slot.list.quarantine();
                for b in &slot.extra {
                    b.quarantine();
                }
            }
        }
        if !rings_free {
            log::error!(
                "{}: queue {} goes away while the controller may still use its rings:                  quarantining them",
                self.hw.name(),
                self.qid
            );
            self.sq.quarantine();
            self.cq.quarantine();
        }
    }

    /// Commands whose memory was quarantined so far, and quarantined submissions refused.
    pub fn quarantined(&self) -> u64 {
        self.stats.quarantined
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // An owner that did not say otherwise knows nothing of the controller: assume it may
        // still use everything live.
        self.retire(false, false);
    }
}
