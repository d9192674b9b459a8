//! Structures and constants from the NVM Express Base Specification 2.x and the NVM Command
//! Set Specification. Everything here is plain data: no pointers, no device access.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Controller register offsets in BAR0 (Base spec §3.1.4).
pub mod reg {
    /// Controller Capabilities (64 bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base address (64 bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base address (64 bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell register.
    pub const DOORBELL_BASE: usize = 0x1000;

    /// Offset of the submission queue `qid` tail doorbell for a doorbell stride of
    /// `4 << dstrd` bytes.
    #[inline]
    pub const fn sq_tail_doorbell(qid: u16, dstrd: u8) -> usize {
        DOORBELL_BASE + (2 * qid as usize) * (4usize << dstrd)
    }

    /// Offset of the completion queue `qid` head doorbell.
    #[inline]
    pub const fn cq_head_doorbell(qid: u16, dstrd: u8) -> usize {
        DOORBELL_BASE + (2 * qid as usize + 1) * (4usize << dstrd)
    }
}

/// Decoded Controller Capabilities register.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum queue entries supported, 1-based (MQES + 1).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// Contiguous queues required.
    pub fn cqr(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// Worst-case time for RDY to change, in milliseconds (TO × 500 ms).
    pub fn timeout_ms(self) -> u64 {
        ((self.0 >> 24) & 0xff) * 500
    }
    /// Doorbell stride exponent: the stride is `4 << dstrd` bytes.
    pub fn dstrd(self) -> u8 {
        ((self.0 >> 32) & 0xf) as u8
    }
    /// Command sets supported (bit 0: NVM).
    pub fn css(self) -> u8 {
        ((self.0 >> 37) & 0xff) as u8
    }
    /// Minimum memory page size exponent: 2^(12 + MPSMIN).
    pub fn mpsmin(self) -> u8 {
        ((self.0 >> 48) & 0xf) as u8
    }
    /// Maximum memory page size exponent.
    pub fn mpsmax(self) -> u8 {
        ((self.0 >> 52) & 0xf) as u8
    }
}

/// CC register fields.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O submission queue entry size 64 bytes (2^6).
    pub const IOSQES_64: u32 = 6 << 16;
    /// I/O completion queue entry size 16 bytes (2^4).
    pub const IOCQES_16: u32 = 4 << 20;
    /// Shutdown notification mask.
    pub const SHN_MASK: u32 = 3 << 14;
    /// Normal shutdown notification.
    pub const SHN_NORMAL: u32 = 1 << 14;
    /// Memory page size field for 2^(12 + mps).
    pub const fn mps(mps: u8) -> u32 {
        ((mps as u32) & 0xf) << 7
    }
}

/// CSTS register fields.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown status mask.
    pub const SHST_MASK: u32 = 3 << 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// Admin command opcodes (Base spec Figure 28).
pub mod admin_op {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// Identify Controller OACS bit 8: the controller supports Doorbell Buffer Config.
pub const OACS_DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;

/// NVM command set I/O opcodes.
pub mod io_op {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
}

/// Log page identifiers.
pub mod log_page {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
}

/// CDW0 PSDT: PRPs for the data.
pub const PSDT_PRP: u32 = 0;
/// CDW0 PSDT: SGLs for the data, metadata pointer a plain address.
pub const PSDT_SGL: u32 = 1 << 14;
/// CDW12 bit 30 of Read/Write: Force Unit Access.
pub const CDW12_FUA: u32 = 1 << 30;

/// A submission queue entry (Base spec §4.2, Figure 88). 64 bytes.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SqEntry {
    /// Opcode 7:0, fused 9:8, PSDT 15:14, CID 31:16.
    pub cdw0: u32,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    /// PRP1, or the first 8 bytes of the SGL descriptor.
    pub dptr1: u64,
    /// PRP2, or the last 8 bytes of the SGL descriptor.
    pub dptr2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<SqEntry>() == 64);

impl SqEntry {
    /// A command with this opcode and namespace, everything else zero.
    #[inline]
    pub const fn new(opcode: u8, nsid: u32) -> SqEntry {
        SqEntry {
            cdw0: opcode as u32,
            nsid,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr1: 0,
            dptr2: 0,
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        }
    }
    /// The opcode.
    #[inline]
    pub const fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }
    /// The command identifier.
    #[inline]
    pub const fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
    /// Set the command identifier.
    #[inline]
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xffff) | ((cid as u32) << 16);
    }
    /// The PSDT field (0 = PRP, 1 = SGL).
    #[inline]
    pub const fn psdt(&self) -> u32 {
        (self.cdw0 >> 14) & 3
    }
    /// Starting LBA (CDW10/11) for the NVM I/O commands.
    #[inline]
    pub fn set_slba(&mut self, slba: u64) {
        self.cdw10 = slba as u32;
        self.cdw11 = (slba >> 32) as u32;
    }
    /// Starting LBA.
    #[inline]
    pub const fn slba(&self) -> u64 {
        self.cdw10 as u64 | ((self.cdw11 as u64) << 32)
    }
}

/// A completion queue entry (Base spec §4.2.1, Figure 89). 16 bytes.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CqEntry {
    /// Command specific.
    pub dw0: u32,
    /// Command specific.
    pub dw1: u32,
    /// SQ head pointer 15:0, SQ identifier 31:16.
    pub dw2: u32,
    /// CID 15:0, phase tag 16, status 31:17.
    pub dw3: u32,
}

const _: () = assert!(std::mem::size_of::<CqEntry>() == 16);

impl CqEntry {
    /// SQ head pointer reported by the controller.
    #[inline]
    pub const fn sq_head(&self) -> u16 {
        self.dw2 as u16
    }
    /// SQ identifier.
    #[inline]
    pub const fn sq_id(&self) -> u16 {
        (self.dw2 >> 16) as u16
    }
    /// Command identifier.
    #[inline]
    pub const fn cid(&self) -> u16 {
        self.dw3 as u16
    }
    /// Phase tag.
    #[inline]
    pub const fn phase(&self) -> bool {
        self.dw3 & (1 << 16) != 0
    }
    /// The 15-bit status field (SC 7:0, SCT 10:8, CRD 12:11, More 13, DNR 14).
    #[inline]
    pub const fn status_field(&self) -> u16 {
        (self.dw3 >> 17) as u16
    }
    /// Build an entry (for the controller model and tests).
    pub const fn build(
        dw0: u32,
        sq_head: u16,
        sq_id: u16,
        cid: u16,
        phase: bool,
        status: u16,
    ) -> CqEntry {
        CqEntry {
            dw0,
            dw1: 0,
            dw2: sq_head as u32 | ((sq_id as u32) << 16),
            dw3: cid as u32 | ((phase as u32) << 16) | (((status as u32) & 0x7fff) << 17),
        }
    }
}

/// An SGL descriptor (Base spec §4.1.2). 16 bytes.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SglDescriptor {
    pub addr: u64,
    pub len: u32,
    pub reserved: [u8; 3],
    /// Type in bits 7:4, sub type in 3:0.
    pub id: u8,
}

const _: () = assert!(std::mem::size_of::<SglDescriptor>() == 16);

/// SGL descriptor types (identifier bits 7:4).
pub mod sgl_type {
    pub const DATA_BLOCK: u8 = 0x0;
    pub const SEGMENT: u8 = 0x2;
    pub const LAST_SEGMENT: u8 = 0x3;
}

impl SglDescriptor {
    /// A descriptor of type `ty` (sub type 0: address).
    pub const fn new(ty: u8, addr: u64, len: u32) -> SglDescriptor {
        SglDescriptor {
            addr,
            len,
            reserved: [0; 3],
            id: ty << 4,
        }
    }
    /// The descriptor type.
    pub const fn ty(&self) -> u8 {
        self.id >> 4
    }
    /// The two dwords as they sit in DPTR of a command.
    pub fn to_dptr(&self) -> (u64, u64) {
        let hi = self.len as u64 | ((self.id as u64) << 56);
        (self.addr, hi)
    }
    /// The descriptor held in DPTR of a command.
    pub fn from_dptr(dptr1: u64, dptr2: u64) -> SglDescriptor {
        SglDescriptor {
            addr: dptr1,
            len: dptr2 as u32,
            reserved: [0; 3],
            id: (dptr2 >> 56) as u8,
        }
    }
}

/// The memory page size the driver programs (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;
/// Eight-byte entries in one PRP list page.
pub const PRP_ENTRIES_PER_PAGE: usize = PAGE_SIZE / 8;
/// Number of logical blocks one command can carry at most (NLB is 16 bits, zero-based).
pub const MAX_NLB: u32 = 65536;
