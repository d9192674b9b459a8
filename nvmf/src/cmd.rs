//! NVMe commands as a fabric carries them: the 64-byte submission entry of a command capsule,
//! its SGL descriptor, the 16-byte completion of a response capsule, and the Connect data.

use rnvme_driver::spec::SqEntry;
use rnvme_driver::NvmeStatus;

/// The opcode of every fabrics command.
pub const FABRICS: u8 = 0x7f;

/// Fabrics command types.
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECEIVE: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Admin opcodes the target serves.
pub mod admin_op {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// Statuses of the fabrics command set and others the target answers with.
pub mod status {
    use rnvme_driver::status::sct;
    use rnvme_driver::NvmeStatus;
    pub const CONNECT_INCOMPATIBLE_FORMAT: NvmeStatus =
        NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x80).with_dnr(true);
    pub const CONNECT_CONTROLLER_BUSY: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x81);
    pub const CONNECT_INVALID_PARAMETERS: NvmeStatus =
        NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x82).with_dnr(true);
    pub const CONNECT_INVALID_HOST: NvmeStatus =
        NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x84).with_dnr(true);
    pub const INVALID_LOG_PAGE: NvmeStatus =
        NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x09).with_dnr(true);
    pub const AER_LIMIT_EXCEEDED: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x05);
    pub const NS_WRITE_PROTECTED: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x20).with_dnr(true);
    pub const INVALID_FIELD: NvmeStatus = NvmeStatus::INVALID_FIELD.with_dnr(true);
    pub const INVALID_OPCODE: NvmeStatus = NvmeStatus::INVALID_OPCODE.with_dnr(true);
    pub const INVALID_NAMESPACE: NvmeStatus = NvmeStatus::INVALID_NAMESPACE.with_dnr(true);
    pub const COMMAND_SEQUENCE_ERROR: NvmeStatus =
        NvmeStatus::COMMAND_SEQUENCE_ERROR.with_dnr(true);
    pub const SGL_LENGTH_INVALID: NvmeStatus = NvmeStatus::DATA_SGL_LENGTH_INVALID.with_dnr(true);
    pub const SGL_TYPE_INVALID: NvmeStatus = NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr(true);
    pub const LBA_OUT_OF_RANGE: NvmeStatus = NvmeStatus::LBA_OUT_OF_RANGE.with_dnr(true);
    /// Transient Transport Error (a data digest did not match): the host may retry.
    pub const TRANSPORT_ERROR: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x22);
    /// The target has no memory for the command now: the host may retry.
    pub const TRANSIENT: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x21);
}

/// SGL descriptor identifiers (type << 4 | subtype) a host puts in a capsule.
pub mod sgl_id {
    /// Data Block, Offset: data inside the capsule.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport SGL Data Block, transport specific A: data by R2T/H2CData or C2HData.
    pub const TRANSPORT: u8 = 0x5a;
}

/// The SGL descriptor of a command capsule.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Sgl {
    pub addr: u64,
    pub len: u32,
    pub id: u8,
}

/// A command's 64-byte submission entry as it came in a capsule.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Sqe(pub [u8; 64]);

impl Sqe {
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }

    pub fn opcode(&self) -> u8 {
        self.0[0]
    }

    /// PSDT and fused bits.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    pub fn cid(&self) -> u16 {
        self.u16(2)
    }

    pub fn nsid(&self) -> u32 {
        self.u32(4)
    }

    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.u32(n * 4)
    }

    /// The fabrics command type (of opcode 0x7f).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }

    pub fn sgl(&self) -> Sgl {
        Sgl {
            addr: u64::from_le_bytes(self.0[24..32].try_into().expect("8 bytes")),
            len: self.u32(32),
            id: self.0[39],
        }
    }

    /// Bytes 40.. of a fabrics command (its own fields).
    pub fn fabrics_u16(&self, at: usize) -> u16 {
        self.u16(at)
    }

    pub fn fabrics_u32(&self, at: usize) -> u32 {
        self.u32(at)
    }

    pub fn fabrics_u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The command for the device: this one's opcode and dwords 10-15, the device's
    /// namespace; data pointers are the driver's.
    pub fn to_device(&self, dev_nsid: u32) -> SqEntry {
        let mut c = SqEntry::new(self.opcode(), dev_nsid);
        c.cdw10 = self.cdw(10);
        c.cdw11 = self.cdw(11);
        c.cdw12 = self.cdw(12);
        c.cdw13 = self.cdw(13);
        c.cdw14 = self.cdw(14);
        c.cdw15 = self.cdw(15);
        c
    }
}

/// A completion: `dw0`, the submission queue head, the queue, the command and its status.
pub fn cqe(dw0: u32, dw1: u32, sqhd: u16, sqid: u16, cid: u16, status: NvmeStatus) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&dw0.to_le_bytes());
    b[4..8].copy_from_slice(&dw1.to_le_bytes());
    b[8..10].copy_from_slice(&sqhd.to_le_bytes());
    b[10..12].copy_from_slice(&sqid.to_le_bytes());
    b[12..14].copy_from_slice(&cid.to_le_bytes());
    b[14..16].copy_from_slice(&(status.to_field() << 1).to_le_bytes());
    b
}

/// Connect's fields: the command's and its 1024 bytes of data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub recfmt: u16,
    pub qid: u16,
    /// 0's based.
    pub sqsize: u16,
    pub cattr: u8,
    /// Keep alive timeout, milliseconds (0: none).
    pub kato: u32,
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// Connect's data length.
pub const CONNECT_DATA_LEN: usize = 1024;
/// Offsets of Connect's fields, for the "invalid parameter" answer (command: bytes; data:
/// bytes of the data).
pub mod connect_at {
    pub const RECFMT: u16 = 40;
    pub const QID: u16 = 42;
    pub const SQSIZE: u16 = 44;
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}
/// Connect's Completion Queue Attributes: SQ flow control disabled.
pub const CATTR_DISABLE_SQFLOW: u8 = 1 << 2;

/// DW0 of a Connect that failed on a parameter: the parameter's offset, in the data or in the
/// command.
pub fn invalid_parameter(in_data: bool, offset: u16) -> u32 {
    (in_data as u32) << 16 | offset as u32
}

/// An NQN field: up to its first NUL, or None if it is not a valid NQN text.
fn nqn(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = std::str::from_utf8(&b[..end]).ok()?;
    // An NQN is at most 223 bytes of printable text.
    (!s.is_empty() && s.len() <= 223 && s.bytes().all(|c| (0x21..0x7f).contains(&c)))
        .then(|| s.to_string())
}

impl Connect {
    /// Connect's fields, or the DW0 of its "invalid parameter" answer.
    pub fn parse(sqe: &Sqe, data: &[u8]) -> Result<Connect, u32> {
        if data.len() < CONNECT_DATA_LEN {
            return Err(invalid_parameter(false, 32));
        }
        let subnqn = nqn(&data[256..512]).ok_or(invalid_parameter(true, connect_at::SUBNQN))?;
        let hostnqn = nqn(&data[512..768]).ok_or(invalid_parameter(true, connect_at::HOSTNQN))?;
        Ok(Connect {
            recfmt: sqe.fabrics_u16(40),
            qid: sqe.fabrics_u16(42),
            sqsize: sqe.fabrics_u16(44),
            cattr: sqe.0[46],
            kato: sqe.fabrics_u32(48),
            hostid: data[0..16].try_into().expect("16 bytes"),
            cntlid: u16::from_le_bytes([data[16], data[17]]),
            subnqn,
            hostnqn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn completions_carry_status_and_ids() {
        let c = cqe(0x1234, 0, 5, 1, 0xbeef, status::CONNECT_INVALID_HOST);
        assert_eq!(u16::from_le_bytes([c[12], c[13]]), 0xbeef);
        let field = u16::from_le_bytes([c[14], c[15]]) >> 1;
        assert_eq!(NvmeStatus::from_field(field), status::CONNECT_INVALID_HOST);
        assert_eq!(field & 0x7ff, 0x184);
    }

    #[test]
    fn connect_parses_and_refuses_bad_nqns() {
        let mut sqe = Sqe([0; 64]);
        sqe.0[0] = FABRICS;
        sqe.0[4] = fctype::CONNECT;
        sqe.0[42..44].copy_from_slice(&3u16.to_le_bytes());
        sqe.0[44..46].copy_from_slice(&127u16.to_le_bytes());
        sqe.0[48..52].copy_from_slice(&5000u32.to_le_bytes());
        let mut d = vec![0u8; 1024];
        d[16..18].copy_from_slice(&7u16.to_le_bytes());
        d[256..256 + 9].copy_from_slice(b"nqn.a:sub");
        d[512..512 + 10].copy_from_slice(b"nqn.a:host");
        let c = Connect::parse(&sqe, &d).unwrap();
        assert_eq!((c.qid, c.sqsize, c.kato, c.cntlid), (3, 127, 5000, 7));
        assert_eq!(
            (c.subnqn.as_str(), c.hostnqn.as_str()),
            ("nqn.a:sub", "nqn.a:host")
        );
        d[512] = 0;
        assert_eq!(Connect::parse(&sqe, &d), Err(1 << 16 | 512));
        d[512] = b'n';
        d[256 + 3] = 0xff;
        assert_eq!(Connect::parse(&sqe, &d), Err(1 << 16 | 256));
        assert_eq!(Connect::parse(&sqe, &d[..100]), Err(32));
    }

    proptest! {
        #[test]
        fn any_connect_data_parses_or_is_refused(d in proptest::collection::vec(any::<u8>(), 0..1100),
                                                 s in proptest::array::uniform32(any::<u8>())) {
            let mut sqe = Sqe([0; 64]);
            sqe.0[32..64].copy_from_slice(&s);
            if let Ok(c) = Connect::parse(&sqe, &d) {
                prop_assert!(c.subnqn.len() <= 223 && c.hostnqn.len() <= 223);
            }
        }
    }
}
