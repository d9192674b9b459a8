//! I/O queue pairs and the NVM I/O commands: Read, Write, Flush, Write Zeroes, Dataset
//! Management (deallocate) and Compare, with splitting at the controller's max transfer.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Ticks;
use crate::dma::DmaBuffer;
use crate::error::{Error, Result};
use crate::identify::{DataLayout, NamespaceInfo};
use crate::irq::WaitMode;
use crate::queue::{DataPointerMode, QueuePair, Recovery};
use crate::shared::Shared;
use crate::spec::{io_op, SqEntry, CDW12_FUA, MAX_NLB};
use crate::status::NvmeStatus;

/// A Read command for `blocks` LBAs (1..=65 536) at `slba`.
#[inline]
pub fn read_cmd(nsid: u32, slba: u64, blocks: u32) -> SqEntry {
    rw_cmd(io_op::READ, nsid, slba, blocks, false)
}

/// A Write command, with Force Unit Access if `fua`.
#[inline]
pub fn write_cmd(nsid: u32, slba: u64, blocks: u32, fua: bool) -> SqEntry {
    rw_cmd(io_op::WRITE, nsid, slba, blocks, fua)
}

/// A Compare command.
#[inline]
pub fn compare_cmd(nsid: u32, slba: u64, blocks: u32) -> SqEntry {
    rw_cmd(io_op::COMPARE, nsid, slba, blocks, false)
}

/// A Write Zeroes command.
#[inline]
pub fn write_zeroes_cmd(nsid: u32, slba: u64, blocks: u32) -> SqEntry {
    rw_cmd(io_op::WRITE_ZEROES, nsid, slba, blocks, false)
}

/// A Flush command.
#[inline]
pub fn flush_cmd(nsid: u32) -> SqEntry {
    SqEntry::new(io_op::FLUSH, nsid)
}

/// A Dataset Management command with the Deallocate attribute over `ranges` range entries
/// (the 16-byte range list is the data buffer).
#[inline]
pub fn deallocate_cmd(nsid: u32, ranges: u32) -> SqEntry {
    let mut c = SqEntry::new(io_op::DATASET_MANAGEMENT, nsid);
    c.cdw10 = ranges - 1;
    c.cdw11 = 1 << 2;
    c
}

#[inline]
fn rw_cmd(op: u8, nsid: u32, slba: u64, blocks: u32, fua: bool) -> SqEntry {
    debug_assert!((1..=MAX_NLB).contains(&blocks));
    let mut c = SqEntry::new(op, nsid);
    c.set_slba(slba);
    c.cdw12 = (blocks - 1) | if fua { CDW12_FUA } else { 0 };
    c
}

/// One command's share of a larger transfer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// First LBA of this piece.
    pub slba: u64,
    /// LBAs in this piece.
    pub blocks: u32,
    /// Byte offset of this piece in the caller's buffer.
    pub offset: u64,
}

/// Split `blocks` LBAs at `slba` into commands of at most `max_transfer` bytes (and at most
/// 65 536 LBAs). A max transfer below one LBA still yields one LBA per command.
pub fn split_transfer(
    slba: u64,
    blocks: u64,
    lba_size: u32,
    max_transfer: u32,
) -> impl Iterator<Item = Piece> {
    let per = ((max_transfer / lba_size.max(1)) as u64).clamp(1, MAX_NLB as u64);
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= blocks {
            return None;
        }
        let n = per.min(blocks - done);
        let p = Piece {
            slba: slba + done,
            blocks: n as u32,
            offset: done * lba_size as u64,
        };
        done += n;
        Some(p)
    })
}

/// PRINFO of a Read, Write or Compare on a namespace whose 8 bytes of metadata are all
/// protection information: the controller inserts it on writes and checks and strips it on
/// reads (PRACT); the guard is checked, and for types 1 and 2 the reference tag, which starts
/// at the low 32 bits of the first LBA (ILBRT), as the Linux driver and nvme-cli write it.
fn apply_pract(cmd: &mut SqEntry, pi_type: u8) {
    const PRACT: u32 = 1 << 29;
    const PRCHK_GUARD: u32 = 1 << 28;
    const PRCHK_REFTAG: u32 = 1 << 26;
    let reftag = matches!(pi_type, 1 | 2);
    let mut prinfo = PRACT;
    if cmd.opcode() != io_op::WRITE {
        prinfo |= PRCHK_GUARD;
        if reftag {
            prinfo |= PRCHK_REFTAG;
        }
    }
    cmd.cdw12 |= prinfo;
    if reftag {
        cmd.cdw14 = cmd.cdw10;
    }
}

/// Check that `blocks` LBAs at `slba` lie inside the namespace.
pub fn check_range(ns: &NamespaceInfo, slba: u64, blocks: u64) -> Result<()> {
    if blocks == 0 {
        return Err(Error::InvalidArgument(
            "a transfer of zero LBAs: give a count of at least 1".into(),
        ));
    }
    match slba.checked_add(blocks) {
        Some(end) if end <= ns.size_lbas => Ok(()),
        end => Err(Error::LbaOutOfRange {
            nsid: ns.nsid,
            lba: slba,
            end: end.unwrap_or(u64::MAX),
            size: ns.size_lbas,
        }),
    }
}

/// What a synchronous transfer does.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write { fua: bool },
    Compare,
    WriteZeroes,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "Read",
            Op::Write { .. } => "Write",
            Op::Compare => "Compare",
            Op::WriteZeroes => "Write Zeroes",
        }
    }
}

/// An I/O queue pair: a [`QueuePair`] registered with the controller, deleted from it when
/// dropped. Owned by one thread (`Send`, not `Sync`); no locks on its I/O path.
pub struct IoQueuePair {
    qp: QueuePair,
    shared: Arc<Shared>,
    /// Deadline for the synchronous helpers.
    timeout: Duration,
    /// Calls of the synchronous helpers so far: part of their commands' tags.
    batch_seq: u32,
    /// How each active namespace's blocks move (or why they cannot), for the checks of
    /// [`IoQueuePair::submit`].
    layouts: Vec<(u32, std::result::Result<DataLayout, String>)>,
}

/// The top bits of the tags of the synchronous helpers' commands. Tags the owner gives its
/// own asynchronous commands should not use this pattern, or the helpers would count them
/// as their own.
pub const HELPER_TAG: u64 = 0xfe5c << 48;

impl Deref for IoQueuePair {
    type Target = QueuePair;
    fn deref(&self) -> &QueuePair {
        &self.qp
    }
}

impl DerefMut for IoQueuePair {
    fn deref_mut(&mut self) -> &mut QueuePair {
        &mut self.qp
    }
}

impl IoQueuePair {
    pub(crate) fn create(
        shared: Arc<Shared>,
        entries: u32,
        mode: DataPointerMode,
        wait: WaitMode,
    ) -> Result<IoQueuePair> {
        let max = shared
            .cap
            .max_queue_entries()
            .min(crate::queue::MAX_QUEUE_ENTRIES);
        if !(2..=max).contains(&entries) {
            return Err(Error::InvalidArgument(format!(
                "queue depth {entries} is outside what the controller allows: 2 to {max} entries (CAP.MQES + 1)"
            )));
        }
        // A completion queue larger than the submission queue lets the head doorbell be rung
        // once per many completions (see `QueuePair`): twice the entries, at least 256, within
        // what the controller allows.
        let cq_entries = (entries * 2).max(256).min(max);
        let qid = shared.take_qid()?;
        let irq = if wait.needs_interrupts() {
            match shared.interrupt_for(qid) {
                Ok(irq) => Some(irq),
                Err(e) => {
                    shared.release_qid(qid);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let made = QueuePair::new(
            shared.hw.clone(),
            &shared.pool,
            qid,
            (entries as u16, cq_entries as u16),
            shared.cap.dstrd(),
        )
        .and_then(|mut qp| {
            qp.set_interrupt(irq, wait);
            qp.set_shadow(Recovery::shadow(shared.as_ref(), qid));
            shared.create_queues(&qp).map(|_| qp)
        });
        let mut qp = match made {
            Ok(qp) => qp,
            Err(e) => {
                shared.release_qid(qid);
                return Err(e);
            }
        };
        let generation = Recovery::generation(shared.as_ref());
        qp.set_recovery(shared.clone(), shared.generation.clone(), generation);
        let sgl = !matches!(shared.info.sgl_support(), crate::identify::SglSupport::None);
        qp.set_sgl_dword_aligned(matches!(
            shared.info.sgl_support(),
            crate::identify::SglSupport::DwordAligned
        ));
        qp.set_data_pointer_mode_unchecked(match mode {
            DataPointerMode::Sgl | DataPointerMode::Auto if sgl => mode,
            _ => DataPointerMode::Prp,
        });
        let layouts = shared
            .namespaces()
            .iter()
            .map(|n| (n.nsid, n.layout()))
            .collect();
        Ok(IoQueuePair {
            qp,
            shared,
            timeout: crate::queue::DEFAULT_TIMEOUT * 3 + Duration::from_secs(1),
            batch_seq: 0,
            layouts,
        })
    }

    /// Queue `cmd` with `data` under `tag` (see [`QueuePair::submit`]). A Read, Write or
    /// Compare must move exactly NLB logical blocks of its namespace as the namespace lays them
    /// out ([`NamespaceInfo::layout`]: on an extended-LBA format each block carries its
    /// metadata); anything else is refused, never sent with a size the device would disagree
    /// with. On a namespace with protection information the controller inserts and strips it
    /// (PRACT is set here). A namespace with a separate metadata buffer needs
    /// [`IoQueuePair::submit_with_metadata`].
    #[inline(always)]
    pub fn submit(
        &mut self,
        mut cmd: SqEntry,
        data: &[crate::dma::DmaSlice<'_>],
        tag: u64,
    ) -> Result<crate::types::CommandId> {
        if matches!(cmd.opcode(), io_op::READ | io_op::WRITE | io_op::COMPARE) {
            self.check_blocks(&mut cmd, data, None)?;
        }
        self.qp.submit(cmd, data, tag)
    }

    /// [`IoQueuePair::submit`] for a namespace whose metadata lives in a separate buffer:
    /// `metadata` holds NLB × the metadata size bytes, one contiguous dword-aligned piece.
    pub fn submit_with_metadata(
        &mut self,
        mut cmd: SqEntry,
        data: &[crate::dma::DmaSlice<'_>],
        metadata: crate::dma::DmaSlice<'_>,
        tag: u64,
    ) -> Result<crate::types::CommandId> {
        if !matches!(cmd.opcode(), io_op::READ | io_op::WRITE | io_op::COMPARE) {
            return Err(Error::InvalidArgument(format!(
                "opcode {:#04x} carries no metadata: only Read, Write and Compare do",
                cmd.opcode()
            )));
        }
        self.check_blocks(&mut cmd, data, Some(metadata.len as u64))?;
        self.qp.submit_with_metadata(cmd, data, metadata, tag)
    }

    /// The checks of [`IoQueuePair::submit`]; sets PRACT where the layout asks for it.
    #[inline(always)]
    fn check_blocks(
        &self,
        cmd: &mut SqEntry,
        data: &[crate::dma::DmaSlice<'_>],
        metadata: Option<u64>,
    ) -> Result<()> {
        let Some((_, layout)) = self.layouts.iter().find(|f| f.0 == cmd.nsid) else {
            // An unknown namespace: the controller answers Invalid Namespace.
            return Ok(());
        };
        let nlb = (cmd.cdw12 & 0xffff) as u64 + 1;
        let len: u64 = data.iter().map(|d| d.len as u64).sum();
        match layout {
            Ok(l)
                if len == nlb * l.data_per_lba as u64
                    && metadata.unwrap_or(0) == nlb * l.metadata_per_lba as u64 =>
            {
                if l.pract {
                    apply_pract(cmd, l.pi_type);
                }
                Ok(())
            }
            Ok(l) => Err(self.bad_blocks(cmd.nsid, nlb, (len, metadata), l)),
            Err(why) => Err(Error::Unsupported {
                dev: self.shared.hw.name().to_string(),
                why: why.clone(),
            }),
        }
    }

    #[cold]
    fn bad_blocks(
        &self,
        nsid: u32,
        nlb: u64,
        (len, meta): (u64, Option<u64>),
        l: &DataLayout,
    ) -> Error {
        let data = nlb * l.data_per_lba as u64;
        let want_meta = nlb * l.metadata_per_lba as u64;
        let what = match (meta, want_meta) {
            (None, 0) | (Some(_), _) if len != data => format!(
                "{len} bytes of data for {nlb} LBA(s) of namespace {nsid}: the data must be \
                 exactly {data} bytes ({} per LBA{})",
                l.data_per_lba,
                if l.data_per_lba > self.lba_size(nsid) {
                    ", metadata included: the namespace uses extended LBAs"
                } else {
                    ""
                }
            ),
            (None, _) => format!(
                "namespace {nsid} keeps {} bytes of metadata per LBA in a separate buffer: \
                 give one of {want_meta} bytes (submit_with_metadata, or --metadata FILE)",
                l.metadata_per_lba
            ),
            (Some(m), 0) => {
                format!("namespace {nsid} has no separate metadata, but {m} bytes of it were given")
            }
            (Some(m), _) => format!(
                "{m} bytes of metadata for {nlb} LBA(s) of namespace {nsid}: it must be exactly \
                 {want_meta} bytes ({} per LBA)",
                l.metadata_per_lba
            ),
        };
        Error::InvalidArgument(what)
    }

    fn lba_size(&self, nsid: u32) -> u32 {
        self.shared.namespace(nsid).map_or(0, |n| n.lba_size)
    }

    /// How namespace `nsid` lays out its blocks in host memory, or why rnvme cannot move them.
    pub fn layout(&self, nsid: u32) -> Result<DataLayout> {
        let ns = self.namespace(nsid)?;
        ns.layout().map_err(|why| Error::Unsupported {
            dev: self.shared.hw.name().to_string(),
            why,
        })
    }

    /// Choose PRPs, SGLs or a per-command choice for data. SGLs need controller support;
    /// without it the per-command choice is PRPs.
    pub fn set_data_pointer_mode(&mut self, mode: DataPointerMode) -> Result<()> {
        let unsupported = matches!(
            self.shared.info.sgl_support(),
            crate::identify::SglSupport::None
        );
        let mode = match mode {
            DataPointerMode::Sgl if unsupported => {
                return Err(Error::Unsupported {
                    dev: self.shared.hw.name().to_string(),
                    why: "the controller does not support SGLs".into(),
                });
            }
            DataPointerMode::Auto if unsupported => DataPointerMode::Prp,
            m => m,
        };
        self.qp.set_data_pointer_mode_unchecked(mode);
        Ok(())
    }

    /// Command deadline (see [`QueuePair::set_command_timeout`]); the synchronous helpers
    /// below give up on a stuck device after three times as long.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.qp.set_command_timeout(timeout);
        self.timeout = timeout
            .saturating_mul(3)
            .saturating_add(Duration::from_secs(1));
    }

    /// Largest transfer of one command for LBAs of `lba_size` bytes.
    pub fn max_transfer_for(&self, lba_size: u32) -> u32 {
        self.shared.max_transfer_for(lba_size)
    }

    /// The DMA pool of the controller.
    pub(crate) fn pool(&self) -> &crate::dma::DmaPool {
        &self.shared.pool
    }

    /// The device's name (its PCI address, or the model's name).
    pub fn device_name(&self) -> &str {
        self.shared.hw.name()
    }

    /// The controller's active namespaces.
    pub(crate) fn namespaces(&self) -> &[NamespaceInfo] {
        self.shared.namespaces()
    }

    pub(crate) fn namespace(&self, nsid: u32) -> Result<NamespaceInfo> {
        self.shared
            .namespace(nsid)
            .cloned()
            .ok_or_else(|| Error::NoSuchNamespace {
                dev: self.shared.hw.name().to_string(),
                nsid,
                active: self.shared.active_list(),
            })
    }

    /// Read `blocks` LBAs at `slba` into `buf` (from its start), split at the max transfer.
    pub fn read(&mut self, nsid: u32, slba: u64, blocks: u64, buf: &DmaBuffer) -> Result<()> {
        self.transfer(Op::Read, nsid, slba, blocks, Some(buf), None)
    }

    /// Write `blocks` LBAs at `slba` from `buf`.
    pub fn write(
        &mut self,
        nsid: u32,
        slba: u64,
        blocks: u64,
        buf: &DmaBuffer,
        fua: bool,
    ) -> Result<()> {
        self.transfer(Op::Write { fua }, nsid, slba, blocks, Some(buf), None)
    }

    /// Compare `blocks` LBAs at `slba` with `buf`; a mismatch is a Compare Failure status.
    pub fn compare(&mut self, nsid: u32, slba: u64, blocks: u64, buf: &DmaBuffer) -> Result<()> {
        self.transfer(Op::Compare, nsid, slba, blocks, Some(buf), None)
    }

    /// Read `blocks` LBAs at `slba` of a namespace with a separate metadata buffer: the data
    /// into `buf`, the metadata into `meta` (both from their starts).
    pub fn read_with_metadata(
        &mut self,
        nsid: u32,
        slba: u64,
        blocks: u64,
        buf: &DmaBuffer,
        meta: &DmaBuffer,
    ) -> Result<()> {
        self.transfer(Op::Read, nsid, slba, blocks, Some(buf), Some(meta))
    }

    /// Write `blocks` LBAs at `slba` of a namespace with a separate metadata buffer.
    pub fn write_with_metadata(
        &mut self,
        nsid: u32,
        slba: u64,
        blocks: u64,
        (buf, meta): (&DmaBuffer, &DmaBuffer),
        fua: bool,
    ) -> Result<()> {
        self.transfer(Op::Write { fua }, nsid, slba, blocks, Some(buf), Some(meta))
    }

    /// Zero `blocks` LBAs at `slba` without transferring data.
    pub fn write_zeroes(&mut self, nsid: u32, slba: u64, blocks: u64) -> Result<()> {
        self.transfer(Op::WriteZeroes, nsid, slba, blocks, None, None)
    }

    /// Flush the volatile write cache of the namespace.
    pub fn flush(&mut self, nsid: u32) -> Result<()> {
        self.namespace(nsid)?;
        self.run_one(flush_cmd(nsid), None, "Flush")
    }

    /// Deallocate (trim) `blocks` LBAs at `slba`.
    pub fn deallocate(&mut self, nsid: u32, slba: u64, blocks: u64) -> Result<()> {
        let ns = self.namespace(nsid)?;
        check_range(&ns, slba, blocks)?;
        // One range entry holds up to 2^32 - 1 LBAs; up to 256 entries fit one command.
        let mut ranges = Vec::new();
        let (mut at, end) = (slba, slba + blocks);
        while at < end {
            let n = (end - at).min(u32::MAX as u64);
            ranges.push((at, n as u32));
            at += n;
        }
        for group in ranges.chunks(256) {
            let buf = self.shared.pool.alloc(group.len() * 16)?;
            for (i, (s, n)) in group.iter().enumerate() {
                buf.write_u64(i * 16, (*n as u64) << 32);
                buf.write_u64(i * 16 + 8, *s);
            }
            self.run_one(
                deallocate_cmd(nsid, group.len() as u32),
                Some(&buf),
                "Dataset Management",
            )?;
        }
        Ok(())
    }

    fn run_one(
        &mut self,
        cmd: SqEntry,
        data: Option<&DmaBuffer>,
        what: &'static str,
    ) -> Result<()> {
        let range = data.map(|b| (0, b.len()));
        self.run_batch(what, (data, None), 1, |_| (cmd, range, None))
    }

    fn transfer(
        &mut self,
        op: Op,
        nsid: u32,
        slba: u64,
        blocks: u64,
        buf: Option<&DmaBuffer>,
        meta: Option<&DmaBuffer>,
    ) -> Result<()> {
        let ns = self.namespace(nsid)?;
        check_range(&ns, slba, blocks)?;
        let layout = match buf {
            Some(_) => self.layout(nsid)?,
            None => DataLayout::plain(ns.lba_size),
        };
        let per = layout.data_per_lba as u64;
        let per_meta = layout.metadata_per_lba as u64;
        if let Some(b) = buf {
            let need = blocks.saturating_mul(per);
            if (b.len() as u64) < need {
                return Err(Error::InvalidArgument(format!(
                    "a buffer of {} bytes is too small for {blocks} LBAs of {per} bytes ({need} bytes)",
                    b.len()
                )));
            }
            let need_meta = blocks.saturating_mul(per_meta);
            match meta {
                None if per_meta > 0 => {
                    return Err(Error::InvalidArgument(format!(
                        "namespace {nsid} keeps {per_meta} bytes of metadata per LBA in a \
                         separate buffer: give one of {need_meta} bytes"
                    )))
                }
                Some(m) if per_meta == 0 => {
                    return Err(Error::InvalidArgument(format!(
                        "namespace {nsid} has no separate metadata, but a metadata buffer of {} \
                         bytes was given",
                        m.len()
                    )))
                }
                Some(m) if (m.len() as u64) < need_meta => {
                    return Err(Error::InvalidArgument(format!(
                        "a metadata buffer of {} bytes is too small for {blocks} LBAs of \
                         {per_meta} bytes of metadata ({need_meta} bytes)",
                        m.len()
                    )))
                }
                _ => {}
            }
        }
        let max = if buf.is_some() {
            self.max_transfer_for(layout.data_per_lba)
        } else {
            u32::MAX
        };
        let pieces: Vec<Piece> = split_transfer(slba, blocks, layout.data_per_lba, max).collect();
        let meta = if per_meta > 0 { meta } else { None };
        self.run_batch(op.name(), (buf, meta), pieces.len(), |i| {
            let p = pieces[i];
            let cmd = match op {
                Op::Read => read_cmd(nsid, p.slba, p.blocks),
                Op::Write { fua } => write_cmd(nsid, p.slba, p.blocks, fua),
                Op::Compare => compare_cmd(nsid, p.slba, p.blocks),
                Op::WriteZeroes => write_zeroes_cmd(nsid, p.slba, p.blocks),
            };
            let data = buf.map(|_| (p.offset as usize, p.blocks as usize * per as usize));
            let meta = meta.map(|_| {
                (
                    ((p.slba - slba) * per_meta) as usize,
                    p.blocks as usize * per_meta as usize,
                )
            });
            (cmd, data, meta)
        })
    }

    /// Run `count` commands made by `make` (the command, and the ranges of the data buffer
    /// and of the metadata buffer it carries), keeping the queue as full as it goes, and
    /// wait for all of them.
    ///
    /// It never returns while one of its commands may still use a buffer: after an error it
    /// stops submitting and waits for what is outstanding (the queue pair's deadlines, aborts
    /// and resets bound that wait); if even that runs out of time, the buffers are quarantined
    /// before the error is returned. Completions of other commands on the queue pair
    /// (submitted asynchronously by the owner) are kept for the owner's next poll, not
    /// counted here.
    #[allow(clippy::type_complexity)]
    fn run_batch(
        &mut self,
        what: &'static str,
        (buf, meta): (Option<&DmaBuffer>, Option<&DmaBuffer>),
        count: usize,
        make: impl Fn(usize) -> (SqEntry, Option<(usize, usize)>, Option<(usize, usize)>),
    ) -> Result<()> {
        // Tags of this call: a marker in the top bits, a sequence number, the piece index.
        self.batch_seq = self.batch_seq.wrapping_add(1);
        let base = HELPER_TAG | ((self.batch_seq as u64 & 0xff_ffff) << 32);
        let ours = |tag: u64| tag & !0xffff_ffff == base;
        let mut error: Option<Error> = None;
        let mut outstanding = 0usize;
        let mut next = 0usize;
        let mut others = Vec::new();
        let mut started = Ticks::now();
        let mut spins = 0u32;
        let dev = self.shared.hw.name().to_string();
        loop {
            // A removed device has no free slot ever again: submitting says so.
            while next < count
                && error.is_none()
                && (self.qp.free_slots() > 0 || self.qp.is_removed())
            {
                let (cmd, range, meta_range) = make(next);
                let slice;
                let data: &[crate::dma::DmaSlice<'_>] = match (buf, range) {
                    (Some(b), Some((off, len))) => {
                        slice = [b.segment_at(off, len)];
                        &slice
                    }
                    _ => &[],
                };
                let tag = base | next as u64;
                let submitted = match (meta, meta_range) {
                    (Some(m), Some((off, len))) => {
                        self.submit_with_metadata(cmd, data, m.segment_at(off, len), tag)
                    }
                    _ => self.submit(cmd, data, tag),
                };
                match submitted {
                    Ok(_) => {
                        outstanding += 1;
                        next += 1;
                    }
                    Err(Error::QueueFull) => break,
                    Err(e) => error = Some(e),
                }
            }
            if outstanding == 0 && (next == count || error.is_some()) {
                break;
            }
            // Whatever the queue pair's poll does (see `QueuePair::set_ring_on_poll`), what
            // this call submitted reaches the controller before it waits for it.
            self.qp.ring();
            let polled = self.qp.wait_mode() == WaitMode::Polled;
            let handle = |c: crate::queue::Completion| {
                if !ours(c.tag) {
                    others.push(c);
                    return;
                }
                outstanding -= 1;
                if !c.status.is_success() && error.is_none() {
                    error = Some(if c.status == NvmeStatus::DEVICE_REMOVED {
                        Error::DeviceRemoved { dev: dev.clone() }
                    } else {
                        Error::Command {
                            dev: dev.clone(),
                            command: what,
                            status: c.status,
                        }
                    });
                }
            };
            let n = if polled {
                self.qp.poll(usize::MAX, handle)
            } else {
                // Sleep on the vector (after the spin budget, in hybrid mode); every empty
                // wait counts as 1024 empty polls for the checks below.
                let n = self.qp.wait(usize::MAX, Duration::from_millis(100), handle);
                if n == 0 {
                    spins |= 1023;
                }
                n
            };
            if n > 0 {
                // Progress: the deadline counts from the last completion.
                spins = 0;
                started = Ticks::now();
                continue;
            }
            spins += 1;
            if spins.is_multiple_of(1024) {
                if let Err(e) = self.check_alive(started, what) {
                    // The queue pair's own recovery did not bring the commands back in time:
                    // the device may still use the buffer.
                    for b in [buf, meta].into_iter().flatten() {
                        b.quarantine();
                    }
                    error.get_or_insert(e);
                    break;
                }
            }
        }
        for c in others {
            self.qp.defer(c);
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Checked every 1024 empty polls of a wait that began at `started`: once the wait is
    /// longer than a millisecond, whether the controller is still there and healthy and whether
    /// the wait has run out of time, and the CPU is offered to other threads. Shorter waits read
    /// neither registers nor clocks (both can be slow: an MMIO exit, a system call).
    fn check_alive(&self, started: Ticks, what: &'static str) -> Result<()> {
        let Some(waited) = crate::clock::elapsed_since(started) else {
            return Ok(());
        };
        if waited < Duration::from_millis(1) {
            return Ok(());
        }
        let dev = self.shared.hw.name().to_string();
        if waited >= self.timeout {
            return Err(Error::CommandTimeout {
                dev,
                command: what,
                ms: self.timeout.as_millis() as u64,
            });
        }
        std::thread::yield_now();
        Ok(())
    }
}

impl Drop for IoQueuePair {
    fn drop(&mut self) {
        // A controller that is not ready (removed, fatal, or reset behind our back and not
        // brought back) has no queues to delete, and each admin command would wait for its
        // full timeout.
        let s = self.shared.hw.read32(crate::spec::reg::CSTS);
        let removed = s == u32::MAX;
        let stopped = !removed && s & crate::spec::csts::RDY == 0;
        let ready = !removed && !stopped && s & crate::spec::csts::CFS == 0;
        let deleted = if !ready {
            log::warn!(
                "{}: not deleting I/O queue pair {}: the controller is not ready (CSTS {s:#x})",
                self.shared.hw.name(),
                self.qp.qid()
            );
            false
        } else {
            match self.shared.delete_queues(self.qp.qid()) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("deleting I/O queue pair {}: {e}", self.qp.qid());
                    false
                }
            }
        };
        // The rings are out of the controller's hands once its queues are deleted or it is
        // stopped; commands still outstanding only once it is stopped.
        self.qp.retire(deleted || stopped, stopped);
        self.shared.release_qid(self.qp.qid());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_respects_max_transfer_and_nlb() {
        let p: Vec<Piece> = split_transfer(100, 10, 4096, 16384).collect();
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[0],
            Piece {
                slba: 100,
                blocks: 4,
                offset: 0
            }
        );
        assert_eq!(
            p[1],
            Piece {
                slba: 104,
                blocks: 4,
                offset: 16384
            }
        );
        assert_eq!(
            p[2],
            Piece {
                slba: 108,
                blocks: 2,
                offset: 32768
            }
        );
        // 65 536-LBA limit applies even with a huge max transfer.
        let p: Vec<Piece> = split_transfer(0, 200_000, 512, u32::MAX).collect();
        assert_eq!(
            p.iter().map(|x| x.blocks).collect::<Vec<_>>(),
            vec![65536, 65536, 65536, 3392]
        );
        // A max transfer below one LBA still makes progress.
        assert_eq!(split_transfer(0, 3, 4096, 512).count(), 3);
    }
}
