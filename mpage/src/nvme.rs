//! The adapter from [`BlockIo`] to a driver I/O queue pair: the only driver-facing code here.

use rnvme_driver::io::{flush_cmd, read_cmd, write_cmd, IoQueuePair};
use rnvme_driver::Error;

use crate::backend::{BlockIo, IoError, IoOp, IoRequest};

/// One namespace reached through one I/O queue pair. Owned by one thread, like the queue.
pub struct NvmeBlockIo {
    qp: IoQueuePair,
    nsid: u32,
    lba_size: u32,
    max_transfer: u32,
    name: String,
}

impl NvmeBlockIo {
    /// Drive namespace `nsid` (formatted with `lba_size`-byte LBAs) through `qp`.
    pub fn new(qp: IoQueuePair, nsid: u32, lba_size: u32) -> NvmeBlockIo {
        let max_transfer = qp.max_transfer_for(lba_size);
        let name = format!("namespace {nsid} (I/O queue {})", qp.qid());
        NvmeBlockIo {
            qp,
            nsid,
            lba_size,
            max_transfer,
            name,
        }
    }

    /// Drive namespace `nsid` through `qp`, if the page cache can: blocks of plain data (no
    /// metadata, or protection information the controller inserts and strips). A namespace
    /// with extended LBAs or a separate metadata buffer is refused with the reason.
    pub fn for_namespace(qp: IoQueuePair, nsid: u32) -> Result<NvmeBlockIo, Error> {
        let layout = qp.layout(nsid)?;
        // Block sizes are powers of two: what an extended-LBA block has beyond one is metadata.
        let block = 1u32 << (31 - layout.data_per_lba.leading_zeros());
        let (bytes, how) = if layout.metadata_per_lba != 0 {
            (layout.metadata_per_lba, "in a separate buffer")
        } else {
            (layout.data_per_lba - block, "interleaved with the data")
        };
        if bytes != 0 {
            return Err(Error::Unsupported {
                dev: format!("namespace {nsid}"),
                why: format!(
                    "it carries {bytes} bytes of metadata per block {how}; the page cache works \
                     on namespaces without metadata (or with protection information the \
                     controller inserts and strips)"
                ),
            });
        }
        Ok(NvmeBlockIo::new(qp, nsid, layout.data_per_lba))
    }

    /// The queue pair (for its counters).
    pub fn queue(&self) -> &IoQueuePair {
        &self.qp
    }

    /// Give the queue pair back.
    pub fn into_queue(self) -> IoQueuePair {
        self.qp
    }
}

impl BlockIo for NvmeBlockIo {
    fn name(&self) -> &str {
        &self.name
    }

    fn lba_size(&self) -> u32 {
        self.lba_size
    }

    fn max_transfer(&self) -> u32 {
        self.max_transfer
    }

    fn queue_depth(&self) -> usize {
        self.qp.capacity()
    }

    fn submit(&mut self, req: &IoRequest<'_>, tag: u64) -> Result<(), IoError> {
        let cmd = match req.op {
            IoOp::Read => read_cmd(self.nsid, req.slba, req.lbas),
            IoOp::Write => write_cmd(self.nsid, req.slba, req.lbas, false),
            IoOp::Flush => flush_cmd(self.nsid),
        };
        match self.qp.submit(cmd, req.segments, tag) {
            Ok(_) => Ok(()),
            Err(Error::QueueFull) => Err(IoError::QueueFull),
            Err(e) => Err(IoError::Rejected {
                dev: self.name.clone(),
                reason: e.to_string(),
            }),
        }
    }

    fn kick(&mut self) {
        self.qp.ring();
    }

    fn set_kick_only(&mut self) -> bool {
        self.qp.set_ring_on_poll(false);
        true
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Result<(), IoError>)) -> usize {
        self.qp.poll(usize::MAX, |c| done(c.tag, result(&c)))
    }

    /// The queue pair's own wait: polling (its default), or sleeping on its MSI-X vector
    /// (interrupt and hybrid wait modes).
    fn wait(
        &mut self,
        timeout: std::time::Duration,
        done: &mut dyn FnMut(u64, Result<(), IoError>),
    ) -> usize {
        self.qp
            .wait(usize::MAX, timeout, |c| done(c.tag, result(&c)))
    }
}

fn result(c: &rnvme_driver::queue::Completion) -> Result<(), IoError> {
    if c.status.is_success() {
        Ok(())
    } else {
        Err(IoError::Status(c.status))
    }
}
