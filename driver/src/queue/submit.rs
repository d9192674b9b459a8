//! Submission: a command's data pointers built from the memory it is lent, the slot that
//! holds those shares until the completion, the entry written into the ring, and the doorbell.

#![forbid(unsafe_code)]

use super::*;

/// Whether `data` fits the command's two PRP entries with no list: one piece over at most
/// two pages, or two pieces of one page each where PRP1 can end and PRP2 begin, a first that
/// ends at its page's end and a second that starts a page (two frames of a page cache that
/// are not neighbours, say). An SGL would need a list of two descriptors in memory for those,
/// one more read for the controller.
#[inline(always)]
fn fits_two_prps<S: AsRef<Segment>>(data: &[S]) -> bool {
    const MASK: u64 = PAGE_SIZE as u64 - 1;
    match data {
        [s] => {
            let s = s.as_ref();
            (s.iova.0 & MASK) + s.len as u64 <= 2 * PAGE_SIZE as u64
        }
        [a, b] => {
            let (a, b) = (a.as_ref(), b.as_ref());
            // Ending its page from an offset inside it, the first piece is never empty.
            a.iova.0 & 3 == 0
                && (a.iova.0 & MASK) + a.len as u64 == PAGE_SIZE as u64
                && b.iova.0 & MASK == 0
                && b.len > 0
                && b.len as usize <= PAGE_SIZE
        }
        _ => false,
    }
}

/// Whether a command with `data` carries an SGL rather than PRPs, in data pointer `mode`, on a
/// controller that takes SGL data only at dword-aligned addresses in whole dwords
/// (`dword_only`: Identify SGLS = 10b) or not. This is the choice [`QueuePair::submit`] makes:
/// with [`DataPointerMode::Auto`], PRPs when the command's two PRP entries describe the data
/// with no list (see `fits_two_prps`), SGLs otherwise; on a `dword_only` controller, data that
/// is not dword aligned gets PRPs. With [`DataPointerMode::Sgl`] it is always an SGL (submission refuses unaligned
/// data on a `dword_only` controller).
///
/// `mode` is the queue pair's mode as in force ([`QueuePair::data_pointer_mode`]): a controller
/// without SGL support has `Prp` there whatever was asked for.
#[inline(always)]
pub fn uses_sgl<S: AsRef<Segment>>(mode: DataPointerMode, dword_only: bool, data: &[S]) -> bool {
    match mode {
        DataPointerMode::Prp => false,
        DataPointerMode::Sgl => true,
        // A controller that wants dword-aligned SGL data gets PRPs for the rest (they check
        // alignment themselves).
        DataPointerMode::Auto => !fits_two_prps(data) && (!dword_only || dword_aligned(data)),
    }
}

/// Whether a command with `opcode` may make the device write host memory. Bits 1:0 of an
/// NVMe opcode give its data transfer direction: 01b is host to controller (the device only
/// reads the data); 10b (controller to host) and 11b (both ways) write it, and 00b (no data)
/// is taken to write it too, should such a command come with data.
#[inline]
fn device_writes(opcode: u8) -> bool {
    opcode & 3 != 0b01
}

/// Why memory given to a submission was refused.
#[derive(Copy, Clone, Debug)]
enum Refusal {
    /// The data is quarantined memory.
    Quarantined(Segment),
    /// The command may make the device write data that is being read in place.
    Viewed(Segment),
    /// A page of the data (at this IOVA) already counts the most writers it can.
    Saturated(Iova),
}

/// Lend quarantined or viewable memory to a command: `d` is the first slice of a run of
/// slices of one such buffer in `data`. Quarantined memory is refused. If the command (its
/// `opcode`) may make the device write its data, the first run of a viewable buffer claims
/// the pages of every slice of that buffer in `data` for it: a viewed page refuses the
/// command. Claims made before a refusal stay in `leases`, which the caller clears.
#[cold]
#[inline(never)]
fn lend_special(
    leases: &mut Leases,
    d: &DmaSlice<'_>,
    opcode: u8,
    data: &[DmaSlice<'_>],
) -> std::result::Result<(), Refusal> {
    let m = d.mem();
    if m.is_quarantined() {
        return Err(Refusal::Quarantined(d.segment()));
    }
    if !device_writes(opcode) {
        return Ok(());
    }
    let mut first_run = false;
    for s in data {
        first_run |= std::ptr::eq(s, d);
        if Arc::ptr_eq(s.mem(), m) {
            if !first_run {
                // An earlier run of this buffer claimed all of its slices.
                return Ok(());
            }
            claim_device_writes(leases, std::slice::from_ref(s))?;
        }
    }
    Ok(())
}

/// Count a command as a writer of the pages of every viewable slice of `data`, in `leases`.
/// Claims made before a refusal stay in `leases`, which the caller clears.
fn claim_device_writes(
    leases: &mut Leases,
    data: &[DmaSlice<'_>],
) -> std::result::Result<(), Refusal> {
    for d in data.iter().filter(|d| d.mem().is_viewable()) {
        leases
            .claim_device_write(d.mem(), d.segment())
            .map_err(|(page, why)| match why {
                Busy::Saturated => Refusal::Saturated(page),
                Busy::Viewed | Busy::Written => Refusal::Viewed(d.segment()),
            })?;
    }
    Ok(())
}

/// Write `cmd` at the tail of the submission queue ring `sq` of `entries` entries.
#[inline]
pub(super) fn push_entry(sq: &PlainBuffer, tail: &mut u16, entries: u16, cmd: &SqEntry) {
    let off = *tail as usize * std::mem::size_of::<SqEntry>();
    // One 64-byte volatile store, as eight qwords (zerocopy checks the sizes match).
    let qwords: [u64; 8] = zerocopy::transmute!(*cmd);
    sq.volatile()
        .get_ref::<[u64; 8]>(off)
        .expect("SQ slot inside the ring")
        .store(qwords);
    *tail = if *tail + 1 == entries { 0 } else { *tail + 1 };
}

impl QueuePair {
    /// Queue `cmd` with `data` (empty for commands without data) under `tag`, without ringing
    /// the doorbell. The command id is filled in here. A full queue is an
    /// [`Error::QueueFull`]: poll, then submit again. A buffer the data pointer builder
    /// refuses, or quarantined memory, is an error and nothing is queued.
    ///
    /// The command holds a share of each buffer in `data` until its completion is reaped (or
    /// the controller was stopped): dropping a buffer meanwhile does not free its memory.
    ///
    /// The data and metadata pointers of `cmd` (DPTR, MPTR) are the driver's: built from
    /// `data` (and the metadata buffer of [`QueuePair::submit_with_metadata`]), and cleared
    /// where there is none, so that a command reaches only memory it holds a share of. (A
    /// vendor specific command that carries addresses in other dwords is beyond what the
    /// driver can check.)
    #[inline(always)]
    pub fn submit(&mut self, cmd: SqEntry, data: &[DmaSlice<'_>], tag: u64) -> Result<CommandId> {
        self.submit_inner(cmd, data, None, false, tag)
    }

    /// Queue `cmd` as it is, data pointer included, without data: for the controller's own
    /// commands that hand it queue rings and doorbell pages, memory that is never viewable
    /// and outlives the commands.
    pub(crate) fn submit_raw(&mut self, cmd: SqEntry, tag: u64) -> Result<CommandId> {
        self.submit_inner(cmd, &[], None, true, tag)
    }

    /// [`QueuePair::submit`] with a separate metadata buffer: `metadata` goes into the
    /// command's metadata pointer (MPTR), one contiguous dword-aligned piece, held like the
    /// data until the command is done.
    pub fn submit_with_metadata(
        &mut self,
        cmd: SqEntry,
        data: &[DmaSlice<'_>],
        metadata: DmaSlice<'_>,
        tag: u64,
    ) -> Result<CommandId> {
        if metadata.iova.0 & 3 != 0 || metadata.len == 0 {
            return Err(Error::InvalidArgument(format!(
                "a metadata buffer must be dword aligned and not empty: {}+{}",
                metadata.iova, metadata.len
            )));
        }
        if metadata.mem().is_quarantined() {
            return Err(self.quarantined_data(metadata.segment()));
        }
        self.submit_inner(cmd, data, Some(metadata), false, tag)
    }

    /// `raw`: keep the data and metadata pointers of a command without `data` or `metadata`
    /// as they are (see [`QueuePair::submit_raw`]); otherwise they are cleared.
    #[inline(always)]
    fn submit_inner(
        &mut self,
        mut cmd: SqEntry,
        data: &[DmaSlice<'_>],
        metadata: Option<DmaSlice<'_>>,
        raw: bool,
        tag: u64,
    ) -> Result<CommandId> {
        if self.generation_now.load(Ordering::Relaxed) != self.generation {
            self.reset_noticed_on_submit();
        }
        // A removed device keeps its free list empty, so this one check covers both cases.
        let Some(index) = self.free.pop() else {
            return Err(self.no_slot());
        };
        let slot = &mut self.slots[index as usize];
        if !data.is_empty() {
            // One share per buffer: consecutive slices of one buffer (a page cache's run)
            // take one.
            let mut last: *const Mem = std::ptr::null();
            for d in data {
                let m = d.mem();
                if Arc::as_ptr(m) != last {
                    // One test for plain memory; quarantined or viewable memory is rare.
                    if m.quarantined_or_viewable() {
                        if let Err(r) = lend_special(&mut slot.leases, d, cmd.opcode(), data) {
                            slot.leases.clear();
                            self.free.push(index);
                            return Err(self.refused(r));
                        }
                    }
                    last = Arc::as_ptr(m);
                    slot.leases.push(m.clone());
                }
            }
            let built = {
                let mut lists = SlotLists {
                    first: &slot.list,
                    extra: &mut slot.extra,
                    pool: &self.pool,
                };
                let sgl = uses_sgl(self.mode, self.sgl_dword, data);
                if sgl && self.sgl_dword && !dword_aligned(data) {
                    Err(Error::InvalidArgument(
                        "this controller takes SGL data only at dword-aligned addresses in \
                         whole dwords (Identify SGLS = 10b): align the buffer, or use PRPs"
                            .into(),
                    ))
                } else if sgl {
                    build_sgl(data, &mut lists)
                        .map(|d| (d.to_dptr(), true))
                        .map_err(Error::from)
                } else {
                    build_prp(data, &mut lists)
                        .map(|p| ((p.prp1, p.prp2), false))
                        .map_err(Error::from)
                }
            };
            let slot = &mut self.slots[index as usize];
            match built {
                Ok(((d1, d2), sgl)) => {
                    if sgl {
                        cmd.cdw0 |= PSDT_SGL;
                    }
                    cmd.dptr1 = d1;
                    cmd.dptr2 = d2;
                }
                Err(e) => {
                    slot.leases.clear();
                    self.free.push(index);
                    return Err(e);
                }
            }
        } else if !raw {
            cmd.dptr1 = 0;
            cmd.dptr2 = 0;
        }
        let slot = &mut self.slots[index as usize];
        if metadata.is_none() && !raw {
            cmd.mptr = 0;
        }
        if let Some(m) = metadata {
            slot.leases.push(m.mem().clone());
            if m.mem().is_viewable() && device_writes(cmd.opcode()) {
                if let Err(r) = claim_device_writes(&mut slot.leases, std::slice::from_ref(&m)) {
                    slot.leases.clear();
                    self.free.push(index);
                    return Err(self.refused(r));
                }
            }
            cmd.mptr = m.iova.0;
        }
        slot.gen = (slot.gen + 1) & 0xf;
        let cid = index | ((slot.gen as u16) << CID_INDEX_BITS);
        cmd.set_cid(cid);
        slot.tag = tag;
        slot.busy = true;
        slot.cmd = cmd;
        slot.submitted = Ticks::now();
        slot.retries = 0;
        slot.aborted = false;
        push_entry(&self.sq, &mut self.sq_tail, self.entries, &cmd);
        self.stats.submitted += 1;
        if self.ring_each {
            self.ring();
        }
        Ok(CommandId(cid))
    }

    /// The error for memory a submission refused.
    #[cold]
    fn refused(&mut self, r: Refusal) -> Error {
        match r {
            Refusal::Quarantined(seg) => self.quarantined_data(seg),
            Refusal::Viewed(seg) => {
                self.stats.viewed_refused += 1;
                Error::BufferViewed {
                    iova: seg.iova,
                    len: seg.len,
                }
            }
            Refusal::Saturated(page) => Error::Dma(DmaError::Saturated { iova: page }),
        }
    }

    #[cold]
    fn quarantined_data(&mut self, seg: Segment) -> Error {
        self.stats.quarantined_refused += 1;
        Error::InvalidArgument(format!(
            "the data at IOVA {}+{} is quarantined DMA memory (a command that used it may still              be running in the device): use another buffer",
            seg.iova, seg.len
        ))
    }

    /// The controller was reset since this queue pair last looked: account for its commands
    /// (handed out at the next poll) and create its queues again before submitting more.
    #[cold]
    fn reset_noticed_on_submit(&mut self) {
        let Some(rec) = self.recovery.clone() else {
            return;
        };
        let mut cancelled = Vec::new();
        self.after_reset(rec.as_ref(), &mut |c| cancelled.push(c));
        self.deferred.extend(cancelled);
    }

    /// Hand `c` out at the next poll, before any new completion (for a synchronous helper
    /// that reaped completions of commands that were not its own).
    pub fn defer(&mut self, c: Completion) {
        self.deferred.push_back(c);
    }

    #[cold]
    fn no_slot(&mut self) -> Error {
        if self.removed {
            return Error::DeviceRemoved {
                dev: self.hw.name().to_string(),
            };
        }
        self.stats.queue_full += 1;
        Error::QueueFull
    }

    /// Ring the submission doorbell if anything was queued since the last ring. With shadow
    /// doorbells the tail goes to the shadow doorbell, and the MMIO doorbell is written only
    /// when the controller's event index asks for it.
    #[inline]
    pub fn ring(&mut self) {
        if self.sq_tail != self.rung_tail {
            // The entries must be visible in memory before the device learns of them.
            fence(Ordering::Release);
            let mmio = match &self.shadow {
                None => true,
                Some(sh) => {
                    self.stats.sq_shadow_writes += 1;
                    let asked = sh.update(sh.sq, self.sq_tail, self.rung_tail);
                    self.always_mmio || asked
                }
            };
            if mmio {
                self.hw.write32(self.sq_db, self.sq_tail as u32);
                self.stats.sq_doorbells += 1;
            }
            self.rung_tail = self.sq_tail;
        }
    }

    /// Whether each submission rings (see [`QueuePair::ring`]), so that a controller reading
    /// shadow doorbells picks commands up as they come, or only [`QueuePair::ring`] and
    /// [`QueuePair::poll`] do, once per batch (the default).
    pub fn set_ring_each(&mut self, each: bool) {
        self.ring_each = each;
    }

    /// Whether [`QueuePair::poll`] (and so `wait`) rings for commands queued since the last
    /// ring: on by default, so that a caller who never rings still gets its completions.
    /// Off, commands the owner queued reach the controller only through
    /// [`QueuePair::ring`] (or a synchronous call of the queue pair's own), and poll only
    /// reaps: for an owner that holds commands back to ring for several at once (a page
    /// cache submitting its readahead windows one at a time, each doorbell an MMIO write
    /// that costs the controller more than the command). Such an owner must ring before it
    /// waits for a command it queued. Commands the queue pair itself resubmits (retries)
    /// are rung by the poll that resubmitted them.
    pub fn set_ring_on_poll(&mut self, on: bool) {
        self.ring_on_poll = on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(iova: u64, len: u32) -> Segment {
        Segment::new(Iova(iova), len)
    }

    #[test]
    fn auto_takes_prps_where_no_list_is_needed_and_sgls_otherwise() {
        let p = PAGE_SIZE as u64;
        let auto = |d: &[Segment]| uses_sgl(DataPointerMode::Auto, false, d);
        assert!(!auto(&[seg(0x10_0000, 4096)]));
        assert!(!auto(&[seg(0x10_0000, 8192)]));
        assert!(!auto(&[seg(0x10_0000 + p - 512, 4096 + 512)]));
        assert!(auto(&[seg(0x10_0000 + 512, 8192)]), "three pages");
        assert!(auto(&[seg(0x10_0000, 12288)]));
        // Two pieces that PRP1 and PRP2 describe with no list: PRPs.
        assert!(!auto(&[seg(0x10_0000, 4096), seg(0x20_0000, 4096)]));
        assert!(!auto(&[
            seg(0x10_0000 + p - 512, 512),
            seg(0x20_0000, 1024)
        ]));
        // Two pieces that need more: a first that does not end its page, a second that does
        // not start one, or that runs into a third page.
        assert!(auto(&[seg(0x10_0000, 2048), seg(0x20_0000, 4096)]));
        assert!(auto(&[seg(0x10_0000, 4096), seg(0x20_0200, 512)]));
        assert!(auto(&[seg(0x10_0000, 4096), seg(0x20_0000, 8192)]));
        assert!(auto(&[
            seg(0x10_0000, 4096),
            seg(0x20_0000, 4096),
            seg(0x30_0000, 4096)
        ]));
        // A controller that takes only dword-aligned SGL data gets PRPs for the rest.
        let odd = [seg(0x10_0000, 4096), seg(0x20_0002, 4092)];
        assert!(uses_sgl(DataPointerMode::Auto, false, &odd));
        assert!(!uses_sgl(DataPointerMode::Auto, true, &odd));
        let aligned = [
            seg(0x10_0000, 4096),
            seg(0x20_0000, 4096),
            seg(0x30_0000, 4096),
        ];
        assert!(uses_sgl(DataPointerMode::Auto, true, &aligned));
        // The fixed modes do not look at the data.
        assert!(!uses_sgl(DataPointerMode::Prp, false, &aligned));
        assert!(uses_sgl(DataPointerMode::Sgl, true, &[seg(0x10_0000, 512)]));
    }
}
