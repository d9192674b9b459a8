//! NVM command set I/O commands of the model: Read, Write, Compare, Flush, Write Zeroes and
//! Dataset Management, over the in-memory namespaces.
//!
//! The Read and Write paths allocate nothing: the data segments go to a scratch vector kept in
//! the model, and data moves straight between the namespace chunks and DMA memory.

use super::{bad, Failure, Inner};
use crate::spec::{io_op, SqEntry};
use crate::NvmeStatus;

/// Dataset Management CDW11: Attribute – Deallocate.
const DSM_AD: u32 = 1 << 2;

#[derive(Copy, Clone, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
    Compare,
}

impl Inner {
    /// Count an I/O command by opcode.
    pub(super) fn count_io(&mut self, op: u8) {
        let s = &mut self.stats;
        s.io_commands += 1;
        match op {
            io_op::READ => s.reads += 1,
            io_op::WRITE => s.writes += 1,
            io_op::FLUSH => s.flushes += 1,
            io_op::WRITE_ZEROES => s.write_zeroes += 1,
            io_op::DATASET_MANAGEMENT => s.dsm += 1,
            io_op::COMPARE => s.compares += 1,
            _ => s.io_other += 1,
        }
    }

    pub(super) fn io(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        if (e.cdw0 >> 8) & 3 != 0 {
            return bad(
                NvmeStatus::INVALID_FIELD,
                "fused operations are not supported (FUSES = 0)",
            );
        }
        match e.opcode() {
            io_op::READ => self.read_write(e, Dir::Read),
            io_op::WRITE => self.read_write(e, Dir::Write),
            io_op::COMPARE => self.read_write(e, Dir::Compare),
            io_op::FLUSH => self.flush(e),
            io_op::WRITE_ZEROES => self.write_zeroes(e),
            io_op::DATASET_MANAGEMENT => self.dataset_management(e),
            op => bad(NvmeStatus::INVALID_OPCODE, format!("I/O opcode {op:#04x}")),
        }
    }

    /// The namespace a command addresses.
    fn io_namespace(&self, e: &SqEntry) -> Result<usize, Failure> {
        self.ns_index(e.nsid).ok_or_else(|| {
            Failure::new(
                NvmeStatus::INVALID_NAMESPACE,
                format!("NSID {:#x} is not an active namespace", e.nsid),
            )
        })
    }

    /// Check that `[slba, slba + nlb)` lies inside namespace `ns`.
    fn check_range(&self, ns: usize, slba: u64, nlb: u64) -> Result<(), Failure> {
        let blocks = self.namespaces[ns].blocks;
        if slba.checked_add(nlb).is_none_or(|end| end > blocks) {
            return bad(
                NvmeStatus::LBA_OUT_OF_RANGE,
                format!(
                    "LBAs {slba}..+{nlb} are beyond namespace {} ({blocks} blocks)",
                    self.namespaces[ns].nsid
                ),
            );
        }
        Ok(())
    }

    /// Apply the `fail_lba` rules to a command touching `[slba, slba + nlb)` of `nsid`.
    fn check_fail_rules(&mut self, nsid: u32, slba: u64, nlb: u64) -> Result<(), Failure> {
        if self.fail_rules.is_empty() {
            return Ok(());
        }
        let hit = self
            .fail_rules
            .iter()
            .position(|r| r.nsid == nsid && r.lba >= slba && r.lba - slba < nlb);
        let Some(i) = hit else { return Ok(()) };
        let rule = &mut self.fail_rules[i];
        let (lba, status) = (rule.lba, rule.status);
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                self.fail_rules.remove(i);
            }
        }
        Err(Failure::injected(
            status,
            format!("injected failure at LBA {lba} of namespace {nsid}"),
        ))
    }

    fn read_write(&mut self, e: &SqEntry, dir: Dir) -> Result<u32, Failure> {
        let ns = self.io_namespace(e)?;
        let lba_size = self.namespaces[ns].lba_size;
        let nlb = (e.cdw12 & 0xffff) as u64 + 1;
        let slba = e.slba();
        let len = nlb * lba_size;
        if let Some(max) = self.max_transfer() {
            if len > max {
                return bad(
                    NvmeStatus::INVALID_FIELD,
                    format!("transfer of {len} bytes exceeds MDTS ({max} bytes)"),
                );
            }
        }
        self.check_range(ns, slba, nlb)?;
        self.map_data(e, len, true)?;
        self.check_fail_rules(e.nsid, slba, nlb)?;
        let pos = slba * lba_size;
        match dir {
            Dir::Read => {
                let Inner {
                    iommu,
                    namespaces,
                    segs,
                    ..
                } = self;
                let data = &namespaces[ns].data;
                let mut at = pos;
                for s in segs.iter() {
                    iommu
                        .for_each_slice(s.iova, s.len, |vs| {
                            data.read_to(at, &vs);
                            at += vs.len() as u64;
                        })
                        .map_err(|f| {
                            Failure::new(NvmeStatus::DATA_TRANSFER_ERROR, f.to_string())
                        })?;
                }
                let n = &mut self.namespaces[ns];
                n.bytes_read += len;
                n.read_commands += 1;
                self.stats.bytes_read += len;
            }
            Dir::Write => {
                let Inner {
                    iommu,
                    namespaces,
                    segs,
                    ..
                } = self;
                let data = &mut namespaces[ns].data;
                let mut at = pos;
                for s in segs.iter() {
                    iommu
                        .for_each_slice(s.iova, s.len, |vs| {
                            data.write_from(at, &vs);
                            at += vs.len() as u64;
                        })
                        .map_err(|f| {
                            Failure::new(NvmeStatus::DATA_TRANSFER_ERROR, f.to_string())
                        })?;
                }
                let n = &mut self.namespaces[ns];
                n.bytes_written += len;
                n.write_commands += 1;
                self.stats.bytes_written += len;
            }
            Dir::Compare => {
                self.fetch_from_host(len as usize)?;
                self.namespaces[ns].read_commands += 1;
                if !self.namespaces[ns].data.equals(pos, &self.buf) {
                    return bad(
                        NvmeStatus::COMPARE_FAILURE,
                        format!("data differs from LBAs {slba}..+{nlb}"),
                    );
                }
            }
        }
        Ok(0)
    }

    fn flush(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        if e.nsid == u32::MAX && self.cfg.vwc {
            return Ok(0);
        }
        self.io_namespace(e)?;
        Ok(0)
    }

    fn write_zeroes(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let ns = self.io_namespace(e)?;
        let nlb = (e.cdw12 & 0xffff) as u64 + 1;
        let slba = e.slba();
        self.check_range(ns, slba, nlb)?;
        self.check_fail_rules(e.nsid, slba, nlb)?;
        let n = &mut self.namespaces[ns];
        n.data.zero(slba * n.lba_size, nlb * n.lba_size);
        Ok(0)
    }

    fn dataset_management(&mut self, e: &SqEntry) -> Result<u32, Failure> {
        let ns = self.io_namespace(e)?;
        let ranges = (e.cdw10 & 0xff) as usize + 1;
        let len = ranges * 16;
        self.map_data(e, len as u64, true)?;
        if e.cdw11 & DSM_AD == 0 {
            // Only hints (integral dataset for read/write): nothing to do.
            return Ok(0);
        }
        self.fetch_from_host(len)?;
        let range = |buf: &[u8], i: usize| {
            let r = &buf[i * 16..i * 16 + 16];
            let nlb = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")) as u64;
            let slba = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
            (slba, nlb)
        };
        for i in 0..ranges {
            let (slba, nlb) = range(&self.buf, i);
            self.check_range(ns, slba, nlb)?;
        }
        for i in 0..ranges {
            let (slba, nlb) = range(&self.buf, i);
            self.check_fail_rules(e.nsid, slba, nlb)?;
        }
        for i in 0..ranges {
            let (slba, nlb) = range(&self.buf, i);
            let n = &mut self.namespaces[ns];
            n.data.zero(slba * n.lba_size, nlb * n.lba_size);
        }
        Ok(0)
    }
}
