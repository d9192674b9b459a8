//! I/O commands: their checks and DMA buffers, submission to the device queue pairs, and
//! their completions.

use super::*;

impl Conn {
    /// Checks an I/O command and gives it a request slot (with its DMA buffer). Returns the
    /// slot and whether its data comes from the host.
    pub(super) fn prepare_io(&mut self, sqe: &Sqe) -> Result<(usize, bool), NvmeStatus> {
        let ctrl = self.ctrl.as_ref().expect("an I/O queue has a controller");
        let subsys = &self.target.subsystems[ctrl.subsys];
        let op = sqe.opcode();
        let (from_host, writes) = match op {
            io_op::READ => (false, false),
            io_op::WRITE => (true, true),
            io_op::COMPARE => (true, false),
            io_op::DATASET_MANAGEMENT => (true, true),
            io_op::WRITE_ZEROES => (false, true),
            io_op::FLUSH => (false, false),
            _ => return Err(status::INVALID_OPCODE),
        };
        if sqe.flags() & 0x3 != 0 {
            // Fused commands are not supported.
            return Err(status::INVALID_FIELD);
        }
        let nsid = sqe.nsid();
        let ns_index = if op == io_op::FLUSH && nsid == u32::MAX {
            usize::MAX
        } else {
            subsys
                .namespaces
                .iter()
                .position(|n| n.nsid == nsid)
                .ok_or(status::INVALID_NAMESPACE)?
        };
        if writes && subsys.read_only {
            return Err(status::NS_WRITE_PROTECTED);
        }
        let sgl = sqe.sgl();
        let len = match op {
            io_op::READ | io_op::WRITE | io_op::COMPARE | io_op::WRITE_ZEROES => {
                let ns = &subsys.namespaces[ns_index];
                let slba = sqe.cdw(10) as u64 | (sqe.cdw(11) as u64) << 32;
                let nlb = (sqe.cdw(12) & 0xffff) as u64 + 1;
                if slba.checked_add(nlb).is_none_or(|e| e > ns.blocks) {
                    return Err(status::LBA_OUT_OF_RANGE);
                }
                if op == io_op::WRITE_ZEROES {
                    0
                } else {
                    let bytes = nlb * ns.lba_size as u64;
                    if bytes > self.target.limits.max_transfer as u64 {
                        return Err(status::INVALID_FIELD);
                    }
                    bytes as u32
                }
            }
            io_op::DATASET_MANAGEMENT => ((sqe.cdw(10) & 0xff) + 1) * 16,
            _ => 0,
        };
        if sgl.len != len {
            return Err(status::SGL_LENGTH_INVALID);
        }
        // One pass over the slots: the first free one, and no command in flight under this ID.
        let conflict = NvmeStatus::COMMAND_ID_CONFLICT.with_dnr(true);
        let mut free = None;
        for (i, r) in self.reqs.iter().enumerate() {
            match r {
                None => {
                    free.get_or_insert(i);
                }
                Some(r) if r.sqe.cid() == sqe.cid() => return Err(conflict),
                Some(_) => {}
            }
        }
        let slot = free.ok_or(conflict)?;
        let dev = if ns_index == usize::MAX {
            0
        } else {
            subsys.namespaces[ns_index].dev
        };
        let buf = if len > 0 {
            Some(
                self.take_buffer(dev, len as usize)
                    .ok_or(status::TRANSIENT)?,
            )
        } else {
            None
        };
        self.reqs[slot] = Some(Req {
            sqe: *sqe,
            ns: ns_index,
            dev,
            buf,
            len,
            got: 0,
            stage: Stage::HostData,
            left: 0,
            failure: None,
        });
        Ok((slot, from_host))
    }

    /// Hands ready requests to the device queue pairs (as far as they have room).
    pub fn submit(&mut self, io: &mut Io<'_>) {
        let Some(ctrl) = self.ctrl.clone().filter(|c| !c.discovery) else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let target = self.target.clone();
        let subsys = &target.subsystems[ctrl.subsys];
        while let Some(&slot) = self.pending.front() {
            let Some(r) = self.reqs[slot].as_mut() else {
                self.pending.pop_front();
                continue;
            };
            // The namespaces this request goes to: one, or all of them for a flush of all.
            let targets: Vec<usize> = if r.ns == usize::MAX {
                (0..subsys.namespaces.len()).collect()
            } else {
                vec![r.ns]
            };
            if targets
                .iter()
                .any(|&n| io.qps[subsys.namespaces[n].dev].free_slots() == 0)
            {
                break;
            }
            self.pending.pop_front();
            r.stage = Stage::Device;
            for n in targets {
                let ns = &subsys.namespaces[n];
                let cmd = r.sqe.to_device(ns.dev_nsid);
                let qp = &mut io.qps[ns.dev];
                let seg;
                let data: &[_] = match &r.buf {
                    Some(b) => {
                        seg = [b.segment_at(0, r.len as usize)];
                        &seg
                    }
                    None => &[],
                };
                match qp.submit(cmd, data, tag(io.slot, slot)) {
                    Ok(_) => {
                        r.left += 1;
                        self.in_flight += 1;
                    }
                    Err(e) => {
                        log::warn!(
                            "{}: submitting to {}: {e}",
                            self.peer,
                            target.devices[ns.dev].name()
                        );
                        r.failure.get_or_insert(NvmeStatus::INTERNAL_ERROR);
                    }
                }
            }
            if r.left == 0 {
                let s = r.failure.unwrap_or(NvmeStatus::INTERNAL_ERROR);
                let cid = r.sqe.cid();
                self.reqs[slot] = None;
                self.respond(cid, s, 0);
            }
        }
    }

    /// A device completion of request `slot`.
    pub fn on_completion(&mut self, slot: usize, c: &Completion) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(r) = self.reqs.get_mut(slot).and_then(|r| r.as_mut()) else {
            log::error!(
                "{}: a completion for request {slot}, which is not in flight",
                self.peer
            );
            return;
        };
        if !c.status.is_success() {
            r.failure.get_or_insert(c.status);
        }
        r.left = r.left.saturating_sub(1);
        if r.left > 0 {
            return;
        }
        let r = self.reqs[slot].take().expect("checked above");
        if self.ending.is_some() {
            // Its memory goes back now that the device is done with it; nobody to answer.
            return;
        }
        let cid = r.sqe.cid();
        match r.failure {
            Some(s) => {
                self.stats.errors += 1;
                self.respond(cid, s, c.dw0);
            }
            None if r.sqe.opcode() == io_op::READ => {
                let buf = r.buf.expect("a read has a buffer");
                self.stats.read_bytes += r.len as u64;
                self.send_data(cid, Out::Dma(buf, 0, r.len as usize, r.dev), true);
            }
            None => {
                if r.sqe.opcode() == io_op::WRITE {
                    self.stats.written_bytes += r.len as u64;
                }
                if let Some(b) = r.buf {
                    self.give_buffer(r.dev, b);
                }
                self.respond(cid, NvmeStatus::SUCCESS, c.dw0);
            }
        }
    }

    /// A DMA buffer of device `dev` for `len` bytes: a spare one, or a new one (None: the
    /// device's pool has no memory now).
    pub(super) fn take_buffer(&mut self, dev: usize, len: usize) -> Option<DmaBuffer> {
        let class = len.next_power_of_two().max(4096);
        if let Some(i) = self
            .spare
            .iter()
            .position(|(d, b)| *d == dev && b.len() == class)
        {
            return Some(self.spare.swap_remove(i).1);
        }
        self.target.devices[dev].alloc(class).ok()
    }

    /// Keeps a buffer whose command completed (and whose data was sent) for another command.
    pub(super) fn give_buffer(&mut self, dev: usize, buf: DmaBuffer) {
        if self.spare.len() < SPARE_BUFFERS && self.ending.is_none() {
            self.spare.push((dev, buf));
        }
    }
}
