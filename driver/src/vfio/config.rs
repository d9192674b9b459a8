//! PCI config space.

use super::*;

/// Where the PCI config space region sits in the device file (accessed with pread/pwrite on
/// the device file descriptor `fd`).
pub(super) struct ConfigSpace {
    pub(super) offset: u64,
    pub(super) size: u64,
}

impl ConfigSpace {
    /// The device file offset of `len` bytes at config offset `offset`, if inside the region.
    pub(super) fn locate(
        &self,
        bdf: &str,
        op: &'static str,
        offset: u64,
        len: usize,
    ) -> Result<u64, VfioSetupError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(self.offset + offset),
            _ => Err(VfioSetupError::Config {
                bdf: bdf.to_string(),
                op,
                offset,
                len,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("config space is {:#x} bytes", self.size),
                ),
            }),
        }
    }

    pub(super) fn read<const N: usize>(
        &self,
        bdf: &str,
        fd: RawFd,
        offset: u64,
    ) -> Result<[u8; N], VfioSetupError> {
        let at = self.locate(bdf, "read", offset, N)?;
        let mut buf = [0u8; N];
        pread_exact(fd, &mut buf, at).map_err(|source| VfioSetupError::Config {
            bdf: bdf.to_string(),
            op: "read",
            offset,
            len: N,
            source,
        })?;
        Ok(buf)
    }

    pub(super) fn write(
        &self,
        bdf: &str,
        fd: RawFd,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), VfioSetupError> {
        let at = self.locate(bdf, "write", offset, bytes.len())?;
        pwrite_exact(fd, bytes, at).map_err(|source| VfioSetupError::Config {
            bdf: bdf.to_string(),
            op: "write",
            offset,
            len: bytes.len(),
            source,
        })
    }

    /// Set Memory Space, Bus Master and Interrupt Disable (rnvme polls) in the command register.
    pub(super) fn enable_memory_and_bus_master(
        &self,
        bdf: &str,
        fd: RawFd,
    ) -> Result<(), VfioSetupError> {
        let wanted = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
        let before = u16::from_le_bytes(self.read::<2>(bdf, fd, PCI_COMMAND)?);
        if before & wanted != wanted {
            self.write(bdf, fd, PCI_COMMAND, &(before | wanted).to_le_bytes())?;
        }
        let after = u16::from_le_bytes(self.read::<2>(bdf, fd, PCI_COMMAND)?);
        log::debug!("{bdf}: PCI command register {before:#06x} -> {after:#06x}");
        if after & wanted != wanted {
            log::warn!(
                "{bdf}: the PCI command register reads {after:#06x} after setting {wanted:#06x}: \
                 the controller may not answer or may not do DMA"
            );
        }
        Ok(())
    }
}
