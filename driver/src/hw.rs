//! The boundary between the driver and the hardware: register access and DMA mapping.
//!
//! Everything above this trait (bring-up, queue pairs, PRP lists) is the same code whether it
//! drives a real controller through VFIO ([`crate::vfio::VfioHardware`]) or the in-process
//! controller model (`crate::model`, feature `test-utils`).

use crate::types::Iova;
use std::ops::Range;
use vmm_sys_util::eventfd::EventFd;

/// Why a DMA mapping could not be made or undone.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    /// The IOMMU refused the mapping.
    #[error("{dev}: cannot map {len} bytes for DMA at IOVA {iova}: {source}{hint}")]
    Map {
        dev: String,
        iova: Iova,
        len: usize,
        #[source]
        source: std::io::Error,
        /// What to do about it (for example raise the memlock limit), or empty.
        hint: String,
    },
    /// A function level reset could not be done.
    #[error("{dev}: function level reset failed: {why}")]
    Reset { dev: String, why: String },
    /// Interrupts could not be routed to eventfds.
    #[error("{dev}: cannot enable MSI-X interrupts: {why}")]
    Interrupts { dev: String, why: String },
    /// The IOMMU refused to undo a mapping.
    #[error("{dev}: cannot unmap {len} bytes at IOVA {iova}: {source}")]
    Unmap {
        dev: String,
        iova: Iova,
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Register access and DMA mapping for one NVMe controller.
///
/// Register offsets are byte offsets into BAR0. Implementations must perform each 32-bit
/// access as one volatile access of that width: doorbells and CC/CSTS are sensitive to it.
pub trait Hardware: Send + Sync {
    /// A name for messages: the PCI address (BDF) of the device, or the model's name.
    fn name(&self) -> &str;

    /// Read a 32-bit register.
    fn read32(&self, offset: usize) -> u32;

    /// Write a 32-bit register (this is also how doorbells are rung).
    fn write32(&self, offset: usize, value: u32);

    /// Read a 64-bit register as two 32-bit reads, low dword first.
    fn read64(&self, offset: usize) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | (hi << 32)
    }

    /// Write a 64-bit register as two 32-bit writes, low dword first.
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// The IOVA ranges the IOMMU accepts for mappings (inclusive start, exclusive end).
    fn iova_ranges(&self) -> Vec<Range<u64>>;

    /// Make `[vaddr, vaddr + len)` visible to the device at `iova`, readable and writable.
    ///
    /// # Safety
    ///
    /// The memory must stay allocated until [`Hardware::dma_unmap`] succeeds for the same
    /// `iova` and `len`. While it is mapped the device may read and write it at any time, so
    /// no Rust reference (`&`/`&mut`) to it may exist: only volatile or atomic accesses
    /// through raw pointers (as `vm_memory::VolatileSlice` does). `vaddr`, `len` and `iova`
    /// must be 4 KiB aligned.
    unsafe fn dma_map(&self, vaddr: *mut u8, len: usize, iova: Iova) -> Result<(), HwError>;

    /// Undo a mapping made by [`Hardware::dma_map`] with the same `iova` and `len`.
    fn dma_unmap(&self, iova: Iova, len: usize) -> Result<(), HwError>;

    /// MSI-X vectors the function offers (its table size); 0 when it has none or they cannot
    /// be routed here.
    fn interrupt_vectors(&self) -> u32 {
        0
    }

    /// Enable MSI-X with vectors `0..fds.len()`: when the device signals vector `i`, 1 is
    /// added to `fds[i]`. Replaces an earlier routing. Completion queues created with
    /// interrupts enabled then signal their vector's eventfd.
    fn enable_interrupts(&self, fds: &[&EventFd]) -> Result<(), HwError> {
        Err(HwError::Interrupts {
            dev: self.name().to_string(),
            why: format!("not supported by this hardware ({} eventfds)", fds.len()),
        })
    }

    /// Mask (`fd: None`) or unmask (`fd: Some`, the vector's eventfd again) one MSI-X vector
    /// after [`Hardware::enable_interrupts`]. While masked, the device holds the vector's
    /// interrupts pending (the MSI-X Pending Bit) and sends none; unmasking sends one that
    /// became pending meanwhile. A hybrid queue pair masks its vector while it polls, so the
    /// completions it finds by polling cost no interrupt.
    fn mask_interrupt(&self, vector: u16, fd: Option<&EventFd>) -> Result<(), HwError> {
        Err(HwError::Interrupts {
            dev: self.name().to_string(),
            why: format!(
                "masking vector {vector} ({}) is not supported by this hardware",
                if fd.is_some() { "unmask" } else { "mask" }
            ),
        })
    }

    /// Reset the whole PCI function (FLR) and make it answer again (memory decoding and bus
    /// mastering back on). When this returns `Ok`, the controller is in its reset state: no
    /// command of before can still touch memory. The fallback when disabling the controller
    /// (CC.EN = 0) does not bring CSTS.RDY to 0.
    fn function_reset(&self) -> Result<(), HwError> {
        Err(HwError::Reset {
            dev: self.name().to_string(),
            why: "not supported by this hardware".into(),
        })
    }
}

/// Host memory that no device can reach: mapping succeeds without an IOMMU and IOVAs are
/// handed out from a 39-bit space. For tools and tests that need [`crate::dma::DmaPool`]
/// buffers (a recording device, a dry run) without hardware. Registers read as zero.
#[derive(Debug, Default)]
pub struct MemoryOnly;

impl Hardware for MemoryOnly {
    fn name(&self) -> &str {
        "memory"
    }

    fn read32(&self, _offset: usize) -> u32 {
        0
    }

    fn write32(&self, _offset: usize, _value: u32) {}

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        std::iter::once(0x1000_0000..1 << 39).collect()
    }

    unsafe fn dma_map(&self, _vaddr: *mut u8, _len: usize, _iova: Iova) -> Result<(), HwError> {
        Ok(())
    }

    fn dma_unmap(&self, _iova: Iova, _len: usize) -> Result<(), HwError> {
        Ok(())
    }
}
