//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0): the common header, the checks every
//! header from a host passes before anything else is read, and the PDUs the target sends.
//!
//! Parsing is of plain byte arrays of fixed sizes: a header is read whole (its length is known
//! from its type) before it is looked at, and every length in it is checked against what was
//! negotiated before a byte of data is read.

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest (CRC32C).
pub const DIGEST_LEN: usize = 4;
/// The longest header a host may send (ICReq).
pub const MAX_HLEN: usize = 128;

/// PDU types.
pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Flags of the common header.
pub mod flags {
    /// A header digest follows the header.
    pub const HDGST: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGST: u8 = 0x02;
    /// H2CData/C2HData: the last data PDU of the command.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command succeeded; no response capsule follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal Error Status of a termination request.
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Header lengths of the PDUs a host sends, and of those the target sends.
pub const IC_LEN: usize = 128;
pub const CAPSULE_CMD_HLEN: usize = CH_LEN + 64;
pub const CAPSULE_RESP_HLEN: usize = CH_LEN + 16;
pub const DATA_HLEN: usize = 24;
pub const R2T_HLEN: usize = 24;
pub const TERM_HLEN: usize = 24;
/// Most bytes of the offending PDU a termination request carries.
pub const TERM_DATA_MAX: usize = 152;

/// The common header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CommonHeader {
    pub ptype: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    pub fn parse(b: &[u8; CH_LEN]) -> CommonHeader {
        CommonHeader {
            ptype: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    pub fn encode(&self) -> [u8; CH_LEN] {
        let p = self.plen.to_le_bytes();
        [
            self.ptype, self.flags, self.hlen, self.pdo, p[0], p[1], p[2], p[3],
        ]
    }
}

/// Why a connection ends: the termination request's status and the offset of the bad field
/// in the offending header, and a text for the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{why} (fatal error status {fes:#x}, field at byte {fei})")]
pub struct Fatal {
    pub fes: u16,
    pub fei: u32,
    pub why: String,
}

impl Fatal {
    pub fn new(fes: u16, fei: u32, why: impl Into<String>) -> Fatal {
        Fatal {
            fes,
            fei,
            why: why.into(),
        }
    }
}

/// What was negotiated for a connection, and the limits its headers are checked against.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Header digests on (after ICReq/ICResp).
    pub hdgst: bool,
    /// Data digests on.
    pub ddgst: bool,
    /// Most in-capsule data bytes of a command capsule.
    pub in_capsule: u32,
    /// Most data bytes of one H2CData PDU (MAXH2CDATA of the ICResp).
    pub max_h2c_data: u32,
}

/// The layout of a PDU from a host, its header checked.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub ch: CommonHeader,
    /// Bytes of header after the common header, the header digest included.
    pub rest: usize,
    /// Padding between the header (and its digest) and the data.
    pub pad: usize,
    /// Data bytes.
    pub data: usize,
    /// Whether a data digest follows the data.
    pub ddgst: bool,
}

impl Layout {
    /// The whole header, its digest included.
    pub fn header_len(&self) -> usize {
        CH_LEN + self.rest
    }
}

/// Checks the common header of a PDU a host sent: its type is one a host sends, at this point
/// of the connection (`ic_done`: ICReq/ICResp are over); its lengths are the type's and add up;
/// digests are as negotiated; data is within the limits. Nothing else of the PDU has been read.
pub fn check_header(ch: &CommonHeader, ic_done: bool, l: &Limits) -> Result<Layout, Fatal> {
    use pdu_type::*;
    let hlen = match ch.ptype {
        IC_REQ => IC_LEN,
        H2C_TERM_REQ => TERM_HLEN,
        CAPSULE_CMD => CAPSULE_CMD_HLEN,
        H2C_DATA => DATA_HLEN,
        t => {
            return Err(Fatal::new(
                fes::INVALID_HEADER_FIELD,
                0,
                format!("PDU type {t:#04x} is not one a host sends"),
            ))
        }
    };
    if ch.hlen as usize != hlen {
        return Err(Fatal::new(
            fes::INVALID_HEADER_FIELD,
            2,
            format!(
                "header length {} for PDU type {:#04x} (it is {hlen})",
                ch.hlen, ch.ptype
            ),
        ));
    }
    if (ch.ptype == IC_REQ) == ic_done {
        return Err(Fatal::new(
            fes::PDU_SEQUENCE_ERROR,
            0,
            if ic_done {
                "a second ICReq".to_string()
            } else {
                format!("PDU type {:#04x} before ICReq", ch.ptype)
            },
        ));
    }
    let plen = ch.plen as usize;
    if ch.ptype == IC_REQ || ch.ptype == H2C_TERM_REQ {
        // No digests on these; a termination request may carry the offending header.
        let most = if ch.ptype == IC_REQ {
            IC_LEN
        } else {
            TERM_HLEN + TERM_DATA_MAX
        };
        if plen < hlen || plen > most {
            return Err(Fatal::new(
                fes::INVALID_HEADER_FIELD,
                4,
                format!("PDU length {plen} for PDU type {:#04x}", ch.ptype),
            ));
        }
        return Ok(Layout {
            ch: *ch,
            rest: hlen - CH_LEN,
            pad: 0,
            data: plen - hlen,
            ddgst: false,
        });
    }
    let hd = ch.flags & flags::HDGST != 0;
    if hd != l.hdgst {
        return Err(Fatal::new(
            fes::INVALID_HEADER_FIELD,
            1,
            if l.hdgst {
                "no header digest, which was negotiated"
            } else {
                "a header digest, which was not negotiated"
            },
        ));
    }
    let header = hlen + if hd { DIGEST_LEN } else { 0 };
    let dd_flag = ch.flags & flags::DDGST != 0;
    let known = flags::HDGST
        | flags::DDGST
        | if ch.ptype == H2C_DATA {
            flags::LAST_PDU
        } else {
            0
        };
    if ch.flags & !known != 0 {
        return Err(Fatal::new(
            fes::INVALID_HEADER_FIELD,
            1,
            format!("flags {:#04x} for PDU type {:#04x}", ch.flags, ch.ptype),
        ));
    }
    if plen == header && ch.pdo == 0 {
        if dd_flag {
            return Err(Fatal::new(
                fes::INVALID_HEADER_FIELD,
                1,
                "a data digest flag on a PDU with no data",
            ));
        }
        if ch.ptype == H2C_DATA {
            return Err(Fatal::new(
                fes::INVALID_HEADER_FIELD,
                4,
                "an H2CData PDU with no data",
            ));
        }
        return Ok(Layout {
            ch: *ch,
            rest: header - CH_LEN,
            pad: 0,
            data: 0,
            ddgst: false,
        });
    }
    if dd_flag != l.ddgst {
        return Err(Fatal::new(
            fes::INVALID_HEADER_FIELD,
            1,
            if l.ddgst {
                "no data digest, which was negotiated"
            } else {
                "a data digest, which was not negotiated"
            },
        ));
    }
    let pdo = ch.pdo as usize;
    if pdo < header {
        return Err(Fatal::new(
            fes::INVALID_HEADER_FIELD,
            3,
            format!("PDU data offset {pdo} inside the header ({header} bytes)"),
        ));
    }
    let trailer = if dd_flag { DIGEST_LEN } else { 0 };
    let data = plen
        .checked_sub(pdo + trailer)
        .filter(|d| *d > 0)
        .ok_or_else(|| {
            Fatal::new(
                fes::INVALID_HEADER_FIELD,
                4,
                format!("PDU length {plen} leaves no data after offset {pdo}"),
            )
        })?;
    let limit = if ch.ptype == CAPSULE_CMD {
        l.in_capsule
    } else {
        l.max_h2c_data
    } as usize;
    if data > limit {
        return Err(Fatal::new(
            fes::DATA_LIMIT_EXCEEDED,
            4,
            format!(
                "{data} data bytes in a PDU of type {:#04x} (at most {limit})",
                ch.ptype
            ),
        ));
    }
    Ok(Layout {
        ch: *ch,
        rest: header - CH_LEN,
        pad: pdo - header,
        data,
        ddgst: dd_flag,
    })
}

/// CRC32C of `data`, as the digests carry it.
pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Checks the header digest of `header` (the header followed by its 4-byte digest).
pub fn check_hdgst(header: &[u8]) -> Result<(), Fatal> {
    let (h, d) = header.split_at(header.len() - DIGEST_LEN);
    let want = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    if crc(h) != want {
        return Err(Fatal::new(
            fes::HEADER_DIGEST_ERROR,
            0,
            format!("header digest {want:#010x}, computed {:#010x}", crc(h)),
        ));
    }
    Ok(())
}

/// The fields of an ICReq.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    pub hpda: u8,
    pub hdgst: bool,
    pub ddgst: bool,
    /// Most R2Ts outstanding per command, 0's based.
    pub maxr2t: u32,
}

impl IcReq {
    pub fn parse(h: &[u8]) -> Result<IcReq, Fatal> {
        let r = IcReq {
            pfv: u16::from_le_bytes([h[8], h[9]]),
            hpda: h[10],
            hdgst: h[11] & 1 != 0,
            ddgst: h[11] & 2 != 0,
            maxr2t: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
        };
        if r.pfv != 0 {
            return Err(Fatal::new(
                fes::UNSUPPORTED_PARAMETER,
                8,
                format!("PDU format version {}", r.pfv),
            ));
        }
        if r.hpda > 31 {
            return Err(Fatal::new(
                fes::INVALID_HEADER_FIELD,
                10,
                format!("host PDU data alignment {}", r.hpda),
            ));
        }
        Ok(r)
    }
}

/// The ICResp: PDU format version 0, data alignment `cpda`, the digests granted, and MAXH2CDATA.
pub fn ic_resp(cpda: u8, hdgst: bool, ddgst: bool, max_h2c_data: u32) -> [u8; IC_LEN] {
    let mut b = [0u8; IC_LEN];
    b[..CH_LEN].copy_from_slice(
        &CommonHeader {
            ptype: pdu_type::IC_RESP,
            flags: 0,
            hlen: IC_LEN as u8,
            pdo: 0,
            plen: IC_LEN as u32,
        }
        .encode(),
    );
    b[10] = cpda;
    b[11] = hdgst as u8 | (ddgst as u8) << 1;
    b[12..16].copy_from_slice(&max_h2c_data.to_le_bytes());
    b
}

/// The fields of an H2CData header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct H2cData {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
    pub last: bool,
}

impl H2cData {
    pub fn parse(h: &[u8], ch: &CommonHeader) -> H2cData {
        H2cData {
            cccid: u16::from_le_bytes([h[8], h[9]]),
            ttag: u16::from_le_bytes([h[10], h[11]]),
            datao: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
            datal: u32::from_le_bytes([h[16], h[17], h[18], h[19]]),
            last: ch.flags & flags::LAST_PDU != 0,
        }
    }
}

/// Appends `header` to `out`, and its digest if `hdgst`.
fn push_header(out: &mut Vec<u8>, header: &[u8], hdgst: bool) {
    out.extend_from_slice(header);
    if hdgst {
        out.extend_from_slice(&crc(header).to_le_bytes());
    }
}

/// Appends a CapsuleResp carrying the 16-byte completion `cqe`.
pub fn capsule_resp(out: &mut Vec<u8>, cqe: &[u8; 16], hdgst: bool) {
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let mut h = [0u8; CAPSULE_RESP_HLEN];
    h[..CH_LEN].copy_from_slice(
        &CommonHeader {
            ptype: pdu_type::CAPSULE_RESP,
            flags: if hdgst { flags::HDGST } else { 0 },
            hlen: CAPSULE_RESP_HLEN as u8,
            pdo: 0,
            plen: (CAPSULE_RESP_HLEN + hd) as u32,
        }
        .encode(),
    );
    h[CH_LEN..].copy_from_slice(cqe);
    push_header(out, &h, hdgst);
}

/// A C2HData PDU's fields: `datal` bytes at `datao` of command `cccid`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct C2hData {
    pub cccid: u16,
    pub datao: u32,
    pub datal: u32,
    /// The last data PDU of the command.
    pub last: bool,
    /// The command succeeded: no response capsule follows.
    pub success: bool,
}

/// Appends the header of a C2HData PDU (the data and its digest follow it on the wire).
pub fn c2h_data_header(out: &mut Vec<u8>, d: &C2hData, hdgst: bool, ddgst: bool) {
    let C2hData {
        cccid,
        datao,
        datal,
        last,
        success,
    } = *d;
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let dd = if ddgst { DIGEST_LEN } else { 0 };
    let mut f = 0;
    if hdgst {
        f |= flags::HDGST;
    }
    if ddgst {
        f |= flags::DDGST;
    }
    if last {
        f |= flags::LAST_PDU;
    }
    if success {
        f |= flags::SUCCESS;
    }
    let pdo = DATA_HLEN + hd;
    let mut h = [0u8; DATA_HLEN];
    h[..CH_LEN].copy_from_slice(
        &CommonHeader {
            ptype: pdu_type::C2H_DATA,
            flags: f,
            hlen: DATA_HLEN as u8,
            pdo: pdo as u8,
            plen: (pdo + datal as usize + dd) as u32,
        }
        .encode(),
    );
    h[8..10].copy_from_slice(&cccid.to_le_bytes());
    h[12..16].copy_from_slice(&datao.to_le_bytes());
    h[16..20].copy_from_slice(&datal.to_le_bytes());
    push_header(out, &h, hdgst);
}

/// Appends an R2T: the host may send `r2tl` bytes at `r2to` of command `cccid`, tagged `ttag`.
pub fn r2t(out: &mut Vec<u8>, cccid: u16, ttag: u16, r2to: u32, r2tl: u32, hdgst: bool) {
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let mut h = [0u8; R2T_HLEN];
    h[..CH_LEN].copy_from_slice(
        &CommonHeader {
            ptype: pdu_type::R2T,
            flags: if hdgst { flags::HDGST } else { 0 },
            hlen: R2T_HLEN as u8,
            pdo: 0,
            plen: (R2T_HLEN + hd) as u32,
        }
        .encode(),
    );
    h[8..10].copy_from_slice(&cccid.to_le_bytes());
    h[10..12].copy_from_slice(&ttag.to_le_bytes());
    h[12..16].copy_from_slice(&r2to.to_le_bytes());
    h[16..20].copy_from_slice(&r2tl.to_le_bytes());
    push_header(out, &h, hdgst);
}

/// Appends a C2HTermReq for `fatal`, carrying (up to 152 bytes of) the offending header.
pub fn c2h_term_req(out: &mut Vec<u8>, fatal: &Fatal, offending: &[u8]) {
    let extra = &offending[..offending.len().min(TERM_DATA_MAX)];
    let mut h = [0u8; TERM_HLEN];
    h[..CH_LEN].copy_from_slice(
        &CommonHeader {
            ptype: pdu_type::C2H_TERM_REQ,
            flags: 0,
            hlen: TERM_HLEN as u8,
            pdo: 0,
            plen: (TERM_HLEN + extra.len()) as u32,
        }
        .encode(),
    );
    h[8..10].copy_from_slice(&fatal.fes.to_le_bytes());
    h[10..14].copy_from_slice(&fatal.fei.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(extra);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: Limits = Limits {
        hdgst: false,
        ddgst: false,
        in_capsule: 8192,
        max_h2c_data: 65536,
    };

    fn ch(ptype: u8, flags: u8, hlen: u8, pdo: u8, plen: u32) -> CommonHeader {
        CommonHeader {
            ptype,
            flags,
            hlen,
            pdo,
            plen,
        }
    }

    #[test]
    fn the_crc_is_crc32c() {
        // The check value of CRC-32C (Castagnoli).
        assert_eq!(crc(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn capsules_with_and_without_data() {
        let c = ch(pdu_type::CAPSULE_CMD, 0, 72, 0, 72);
        let l = check_header(&c, true, &L).unwrap();
        assert_eq!((l.rest, l.data, l.pad), (64, 0, 0));
        let c = ch(pdu_type::CAPSULE_CMD, 0, 72, 72, 72 + 4096);
        assert_eq!(check_header(&c, true, &L).unwrap().data, 4096);
        let hd = Limits {
            hdgst: true,
            ddgst: true,
            ..L
        };
        let c = ch(
            pdu_type::CAPSULE_CMD,
            flags::HDGST | flags::DDGST,
            72,
            76,
            76 + 512 + 4,
        );
        let l = check_header(&c, true, &hd).unwrap();
        assert_eq!((l.rest, l.data, l.ddgst), (68, 512, true));
    }

    #[test]
    fn bad_headers_are_fatal_with_their_field() {
        let f = |c: CommonHeader, done: bool| check_header(&c, done, &L).unwrap_err();
        assert_eq!(f(ch(0x05, 0, 24, 0, 24), true).fei, 0);
        assert_eq!(
            f(ch(0x42, 0, 24, 0, 24), true).fes,
            fes::INVALID_HEADER_FIELD
        );
        assert_eq!(f(ch(4, 0, 24, 0, 24), true).fei, 2);
        assert_eq!(f(ch(4, 0, 72, 0, 72), false).fes, fes::PDU_SEQUENCE_ERROR);
        assert_eq!(f(ch(0, 0, 128, 0, 128), true).fes, fes::PDU_SEQUENCE_ERROR);
        assert_eq!(f(ch(4, flags::HDGST, 72, 0, 76), true).fei, 1);
        assert_eq!(f(ch(4, 0, 72, 40, 100), true).fei, 3);
        assert_eq!(f(ch(4, 0, 72, 72, 72), true).fei, 4);
        assert_eq!(
            f(ch(4, 0, 72, 72, 72 + 8193), true).fes,
            fes::DATA_LIMIT_EXCEEDED
        );
        assert_eq!(
            f(ch(6, 0, 24, 24, 24 + 65537), true).fes,
            fes::DATA_LIMIT_EXCEEDED
        );
        assert_eq!(f(ch(6, 0, 24, 0, 24), true).fei, 4);
        assert_eq!(f(ch(4, 0x10, 72, 0, 72), true).fei, 1);
        assert_eq!(f(ch(0, 0, 128, 0, 129), false).fei, 4);
    }

    #[test]
    fn built_pdus_parse_back() {
        let mut out = Vec::new();
        c2h_data_header(
            &mut out,
            &C2hData {
                cccid: 7,
                datao: 4096,
                datal: 512,
                last: true,
                success: false,
            },
            true,
            true,
        );
        let c = CommonHeader::parse(out[..8].try_into().unwrap());
        assert_eq!(c.ptype, pdu_type::C2H_DATA);
        assert_eq!((c.hlen, c.pdo, c.plen), (24, 28, 28 + 512 + 4));
        check_hdgst(&out).unwrap();
        out.clear();
        r2t(&mut out, 3, 9, 0, 1 << 20, false);
        assert_eq!(out.len(), 24);
        assert_eq!(u32::from_le_bytes(out[16..20].try_into().unwrap()), 1 << 20);
        let ic = ic_resp(0, true, false, 131072);
        assert_eq!(ic[11], 1);
        out.clear();
        c2h_term_req(&mut out, &Fatal::new(2, 0, "x"), &[0xaa; 200]);
        assert_eq!(out.len(), 24 + 152);
        let mut bad = out[..24].to_vec();
        bad.extend_from_slice(&crc(&out[..24]).wrapping_add(1).to_le_bytes());
        assert_eq!(check_hdgst(&bad).unwrap_err().fes, fes::HEADER_DIGEST_ERROR);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20000))]
        /// Any 8 bytes: a layout within the limits, or a fatal error; never a panic.
        #[test]
        fn any_common_header_is_checked(b in proptest::array::uniform8(any::<u8>()),
                                        done in any::<bool>(), hd in any::<bool>(), dd in any::<bool>()) {
            let c = CommonHeader::parse(&b);
            let l = Limits { hdgst: hd, ddgst: dd, ..L };
            if let Ok(lay) = check_header(&c, done, &l) {
                prop_assert!(lay.header_len() <= MAX_HLEN + DIGEST_LEN);
                prop_assert_eq!(
                    lay.header_len() + lay.pad + lay.data + if lay.ddgst { 4 } else { 0 },
                    c.plen as usize
                );
                prop_assert!(lay.data <= (TERM_DATA_MAX).max(65536));
            }
        }

        #[test]
        fn any_icreq_parses_or_is_refused(b in proptest::collection::vec(any::<u8>(), 128)) {
            let _ = IcReq::parse(&b);
        }
    }
}
