//! A small blocking NVMe/TCP host: enough to connect queues, run admin and I/O commands, and
//! send PDUs a well-behaved host never would. For tests and diagnostics of targets (this one
//! and others); real hosts use their kernel's initiator.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rnvme_driver::NvmeStatus;

use crate::cmd::{fctype, sgl_id, FABRICS};
use crate::pdu::{self, flags, pdu_type, CommonHeader, CH_LEN, DIGEST_LEN};

/// A completion as the host sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub cid: u16,
    pub status: NvmeStatus,
}

/// What a target sent that the client did not expect, or a socket error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the target terminated the connection: status {fes:#x}, field at {fei}")]
    Terminated { fes: u16, fei: u32 },
    #[error("unexpected PDU: {0}")]
    Protocol(String),
}

/// One connection (one queue) of the host.
pub struct Client {
    sock: TcpStream,
    hdgst: bool,
    ddgst: bool,
    next_cid: u16,
    pub max_h2c_data: u32,
    /// In-capsule data bytes the client uses for writes (0: always by R2T).
    pub in_capsule: u32,
}

/// An SQE with opcode, nsid and cdw10..15.
pub fn sqe(opcode: u8, nsid: u32, cdw: [u32; 6]) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[4..8].copy_from_slice(&nsid.to_le_bytes());
    for (i, d) in cdw.iter().enumerate() {
        s[40 + i * 4..44 + i * 4].copy_from_slice(&d.to_le_bytes());
    }
    s
}

impl Client {
    /// Connects and exchanges ICReq/ICResp.
    pub fn connect(addr: &str, hdgst: bool, ddgst: bool) -> Result<Client, ClientError> {
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        sock.set_nodelay(true)?;
        let mut c = Client {
            sock,
            hdgst: false,
            ddgst: false,
            next_cid: 1,
            max_h2c_data: 0,
            in_capsule: 0,
        };
        let mut ic = [0u8; 128];
        ic[..8].copy_from_slice(
            &CommonHeader {
                ptype: pdu_type::IC_REQ,
                flags: 0,
                hlen: 128,
                pdo: 0,
                plen: 128,
            }
            .encode(),
        );
        ic[11] = hdgst as u8 | (ddgst as u8) << 1;
        c.sock.write_all(&ic)?;
        let (ch, h, _) = c.read_pdu()?;
        if ch.ptype != pdu_type::IC_RESP {
            return Err(ClientError::Protocol(format!("{:#x} for ICResp", ch.ptype)));
        }
        c.hdgst = h[11] & 1 != 0;
        c.ddgst = h[11] & 2 != 0;
        c.max_h2c_data = u32::from_le_bytes(h[12..16].try_into().expect("4"));
        Ok(c)
    }

    /// Writes raw bytes (hostile PDUs).
    pub fn send_raw(&mut self, b: &[u8]) -> Result<(), ClientError> {
        self.sock.write_all(b)?;
        Ok(())
    }

    /// [`Client::send_raw`], giving up when the target takes nothing for `limit`.
    pub fn send_raw_with_timeout(&mut self, b: &[u8], limit: Duration) -> Result<(), ClientError> {
        self.sock.set_write_timeout(Some(limit))?;
        let r = self.sock.write_all(b);
        self.sock.set_write_timeout(None)?;
        r?;
        Ok(())
    }

    /// Reads one PDU: its header, the header bytes, and its data.
    pub fn read_pdu(&mut self) -> Result<(CommonHeader, Vec<u8>, Vec<u8>), ClientError> {
        let mut chb = [0u8; CH_LEN];
        self.sock.read_exact(&mut chb)?;
        let ch = CommonHeader::parse(&chb);
        if (ch.plen as usize) < CH_LEN || ch.plen > 16 << 20 || (ch.hlen as usize) < CH_LEN {
            return Err(ClientError::Protocol(format!("{ch:?}")));
        }
        let mut rest = vec![0u8; ch.plen as usize - CH_LEN];
        self.sock.read_exact(&mut rest)?;
        let mut h = chb.to_vec();
        let hl = ch.hlen as usize;
        h.extend_from_slice(&rest[..hl - CH_LEN]);
        if ch.ptype == pdu_type::C2H_TERM_REQ {
            return Err(ClientError::Terminated {
                fes: u16::from_le_bytes([h[8], h[9]]),
                fei: u32::from_le_bytes(h[10..14].try_into().expect("4")),
            });
        }
        let hd = ch.flags & flags::HDGST != 0;
        if hd {
            let mut full = h.clone();
            full.extend_from_slice(&rest[hl - CH_LEN..hl - CH_LEN + DIGEST_LEN]);
            pdu::check_hdgst(&full).map_err(|e| ClientError::Protocol(e.to_string()))?;
        }
        let data = if ch.pdo > 0 {
            let dd = if ch.flags & flags::DDGST != 0 {
                DIGEST_LEN
            } else {
                0
            };
            let d = rest[ch.pdo as usize - CH_LEN..rest.len() - dd].to_vec();
            if dd > 0 {
                let want = u32::from_le_bytes(rest[rest.len() - 4..].try_into().expect("4"));
                if pdu::crc(&d) != want {
                    return Err(ClientError::Protocol("data digest mismatch".into()));
                }
            }
            d
        } else {
            Vec::new()
        };
        Ok((ch, h, data))
    }

    fn header(&self, ptype: u8, hlen: usize, data: usize) -> (CommonHeader, usize) {
        let hd = if self.hdgst { DIGEST_LEN } else { 0 };
        let dd = if self.ddgst && data > 0 {
            DIGEST_LEN
        } else {
            0
        };
        let pdo = if data > 0 { hlen + hd } else { 0 };
        let mut f = 0;
        if self.hdgst {
            f |= flags::HDGST;
        }
        if dd > 0 {
            f |= flags::DDGST;
        }
        (
            CommonHeader {
                ptype,
                flags: f,
                hlen: hlen as u8,
                pdo: pdo as u8,
                plen: (hlen + hd + data + dd) as u32,
            },
            hd,
        )
    }

    fn finish_pdu(&self, mut h: Vec<u8>, data: &[u8]) -> Vec<u8> {
        if self.hdgst {
            let c = pdu::crc(&h);
            h.extend_from_slice(&c.to_le_bytes());
        }
        h.extend_from_slice(data);
        if self.ddgst && !data.is_empty() {
            h.extend_from_slice(&pdu::crc(data).to_le_bytes());
        }
        h
    }

    /// Sends command `sqe` (its CID and SGL filled in here) with `data` for the target (in the
    /// capsule up to `in_capsule` bytes, else by R2T) and `read_len` bytes expected back.
    /// Returns the completion and the data read.
    pub fn command(
        &mut self,
        mut sqe: [u8; 64],
        data: &[u8],
        read_len: u32,
    ) -> Result<(Cqe, Vec<u8>), ClientError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe[2..4].copy_from_slice(&cid.to_le_bytes());
        let inline = !data.is_empty() && data.len() <= self.in_capsule as usize;
        let len = if data.is_empty() {
            read_len
        } else {
            data.len() as u32
        };
        sqe[32..36].copy_from_slice(&len.to_le_bytes());
        sqe[39] = if inline {
            sgl_id::IN_CAPSULE
        } else {
            sgl_id::TRANSPORT
        };
        let (ch, _) = self.header(
            pdu_type::CAPSULE_CMD,
            72,
            if inline { data.len() } else { 0 },
        );
        let mut h = ch.encode().to_vec();
        h.extend_from_slice(&sqe);
        let pdu = self.finish_pdu(h, if inline { data } else { &[] });
        self.sock.write_all(&pdu)?;
        let mut got = Vec::new();
        loop {
            let (ch, h, d) = self.read_pdu()?;
            match ch.ptype {
                pdu_type::R2T => {
                    let ttag = u16::from_le_bytes([h[10], h[11]]);
                    let r2to = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
                    let r2tl = u32::from_le_bytes(h[16..20].try_into().expect("4")) as usize;
                    let mut off = r2to;
                    while off < r2to + r2tl {
                        let n = (r2to + r2tl - off).min(self.max_h2c_data as usize);
                        self.h2c_data(
                            cid,
                            ttag,
                            off as u32,
                            &data[off..off + n],
                            off + n == r2to + r2tl,
                        )?;
                        off += n;
                    }
                }
                pdu_type::C2H_DATA => {
                    got.extend_from_slice(&d);
                    if ch.flags & flags::SUCCESS != 0 {
                        return Ok((
                            Cqe {
                                dw0: 0,
                                dw1: 0,
                                sqhd: 0,
                                cid,
                                status: NvmeStatus::SUCCESS,
                            },
                            got,
                        ));
                    }
                }
                pdu_type::CAPSULE_RESP => {
                    let c = &h[8..24];
                    let st = u16::from_le_bytes([c[14], c[15]]) >> 1;
                    return Ok((
                        Cqe {
                            dw0: u32::from_le_bytes(c[0..4].try_into().expect("4")),
                            dw1: u32::from_le_bytes(c[4..8].try_into().expect("4")),
                            sqhd: u16::from_le_bytes([c[8], c[9]]),
                            cid: u16::from_le_bytes([c[12], c[13]]),
                            status: NvmeStatus::from_field(st),
                        },
                        got,
                    ));
                }
                t => return Err(ClientError::Protocol(format!("PDU type {t:#x}"))),
            }
        }
    }

    /// Sends one H2CData PDU.
    pub fn h2c_data(
        &mut self,
        cid: u16,
        ttag: u16,
        off: u32,
        data: &[u8],
        last: bool,
    ) -> Result<(), ClientError> {
        let (mut ch, _) = self.header(pdu_type::H2C_DATA, 24, data.len());
        if last {
            ch.flags |= flags::LAST_PDU;
        }
        let mut h = ch.encode().to_vec();
        h.extend_from_slice(&cid.to_le_bytes());
        h.extend_from_slice(&ttag.to_le_bytes());
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        let pdu = self.finish_pdu(h, data);
        self.sock.write_all(&pdu)?;
        Ok(())
    }

    /// Fabrics Connect of queue `qid` (`sqsize` 0's based) to `subnqn` as `hostnqn`.
    pub fn fabrics_connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
        kato_ms: u32,
    ) -> Result<Cqe, ClientError> {
        let mut s = [0u8; 64];
        s[0] = FABRICS;
        s[4] = fctype::CONNECT;
        s[42..44].copy_from_slice(&qid.to_le_bytes());
        s[44..46].copy_from_slice(&sqsize.to_le_bytes());
        s[48..52].copy_from_slice(&kato_ms.to_le_bytes());
        let mut d = vec![0u8; 1024];
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
        let saved = self.in_capsule;
        self.in_capsule = self.in_capsule.max(1024);
        let r = self.command(s, &d, 0).map(|r| r.0);
        self.in_capsule = saved;
        r
    }

    /// Property Get (8 bytes for CAP).
    pub fn property_get(&mut self, offset: u32) -> Result<u64, ClientError> {
        let mut s = [0u8; 64];
        s[0] = FABRICS;
        s[4] = fctype::PROPERTY_GET;
        s[40] = (offset == 0) as u8;
        s[44..48].copy_from_slice(&offset.to_le_bytes());
        let (c, _) = self.command(s, &[], 0)?;
        if !c.status.is_success() {
            return Err(ClientError::Protocol(format!("Property Get: {}", c.status)));
        }
        Ok(c.dw0 as u64 | (c.dw1 as u64) << 32)
    }

    /// Property Set of CC.
    pub fn set_cc(&mut self, cc: u32) -> Result<Cqe, ClientError> {
        let mut s = [0u8; 64];
        s[0] = FABRICS;
        s[4] = fctype::PROPERTY_SET;
        s[44..48].copy_from_slice(&0x14u32.to_le_bytes());
        s[48..52].copy_from_slice(&cc.to_le_bytes());
        Ok(self.command(s, &[], 0)?.0)
    }

    /// The admin queue of a new controller, enabled, with `queues` I/O queues granted:
    /// returns the controller ID.
    pub fn admin_setup(
        &mut self,
        subnqn: &str,
        hostnqn: &str,
        queues: u16,
    ) -> Result<u16, ClientError> {
        let c = self.fabrics_connect(0, 31, 0xffff, subnqn, hostnqn, 0)?;
        if !c.status.is_success() {
            return Err(ClientError::Protocol(format!("Connect: {}", c.status)));
        }
        let cntlid = c.dw0 as u16;
        self.set_cc(1 | 6 << 16 | 4 << 20)?;
        if self.property_get(0x1c)? & 1 != 1 {
            return Err(ClientError::Protocol("CSTS.RDY is not set".into()));
        }
        if queues > 0 {
            let n = (queues - 1) as u32;
            let (c, _) = self.command(sqe(0x09, 0, [0x07, n | n << 16, 0, 0, 0, 0]), &[], 0)?;
            if !c.status.is_success() {
                return Err(ClientError::Protocol(format!("Set Features: {}", c.status)));
            }
        }
        Ok(cntlid)
    }
}
