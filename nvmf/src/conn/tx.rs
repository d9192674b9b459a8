//! Sending: data, responses and the queue of what is still to go out.

use super::*;

impl Conn {
    /// Sends a command's data to the host in one C2HData PDU, then its response (or, with SQ
    /// flow control off, the success flag in place of it).
    pub(super) fn send_data(&mut self, cid: u16, data: Out, then_respond: bool) {
        let len = data.len() as u32;
        let (hd, dd) = (self.limits.hdgst, self.limits.ddgst);
        let success = then_respond && !self.sqflow;
        self.push_with(|v| {
            pdu::c2h_data_header(
                v,
                &pdu::C2hData {
                    cccid: cid,
                    datao: 0,
                    datal: len,
                    last: true,
                    success,
                },
                hd,
                dd,
            )
        });
        let crc = match (&data, dd) {
            (Out::Dma(b, off, l, _), true) => Some(crc_of(b, *off, *l, 0)),
            (Out::Bytes(b), true) => Some(pdu::crc(b)),
            _ => None,
        };
        match data {
            Out::Bytes(b) => self.push_bytes(&b),
            d => {
                self.tx_bytes += d.len();
                self.tx.push_back(d);
            }
        }
        if let Some(c) = crc {
            self.push_bytes(&c.to_le_bytes());
        }
        if then_respond && !success {
            self.respond(cid, NvmeStatus::SUCCESS, 0);
        }
    }

    pub(super) fn respond(&mut self, cid: u16, s: NvmeStatus, dw0: u32) {
        self.respond_with(cid, s, dw0, 0);
    }

    pub(super) fn respond_with(&mut self, cid: u16, s: NvmeStatus, dw0: u32, dw1: u32) {
        if !s.is_success() {
            self.stats.errors += 1;
        }
        let c = cqe(dw0, dw1, self.sqhd, self.qid.unwrap_or(0), cid, s);
        let hd = self.limits.hdgst;
        self.push_with(|v| pdu::capsule_resp(v, &c, hd));
    }

    pub(super) fn answer(&mut self, sqe: &Sqe, a: Answer) {
        match a.data {
            Some(mut d) if a.status.is_none() => {
                // Exactly what the host's descriptor asked for.
                d.resize(sqe.sgl().len as usize, 0);
                if d.is_empty() {
                    self.respond(sqe.cid(), NvmeStatus::SUCCESS, a.dw0);
                } else {
                    let cid = sqe.cid();
                    self.send_data(cid, Out::Bytes(d), false);
                    self.respond(cid, NvmeStatus::SUCCESS, a.dw0);
                }
            }
            _ => self.respond_with(sqe.cid(), a.status(), a.dw0, a.dw1),
        }
    }

    // ---- sending ----

    pub(super) fn push_bytes(&mut self, b: &[u8]) {
        self.push_with(|v| v.extend_from_slice(b));
    }

    pub(super) fn push_with(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        if let Some(Out::Bytes(v)) = self.tx.back_mut() {
            let before = v.len();
            f(v);
            self.tx_bytes += v.len() - before;
        } else {
            let mut v = Vec::with_capacity(256);
            f(&mut v);
            self.tx_bytes += v.len();
            self.tx.push_back(Out::Bytes(v));
        }
    }

    /// Sends what is queued, as far as the socket takes it. Returns whether anything went.
    pub fn flush(&mut self) -> bool {
        let mut progress = false;
        while !self.tx.is_empty() {
            let mut parts: Vec<SendPart<'_>> = Vec::with_capacity(8);
            for (i, o) in self.tx.iter().take(SEND_PARTS_MAX).enumerate() {
                let skip = if i == 0 { self.tx_off } else { 0 };
                parts.push(match o {
                    Out::Bytes(b) => SendPart::Bytes(&b[skip..]),
                    Out::Dma(buf, off, len, _) => SendPart::Dma(buf, off + skip, len - skip),
                });
            }
            match send_vectored(self.sock.as_fd(), &parts) {
                Ok(mut n) => {
                    drop(parts);
                    progress = true;
                    while n > 0 {
                        let front = self.tx.front().expect("bytes were sent from it").len();
                        let left = front - self.tx_off;
                        if n >= left {
                            n -= left;
                            self.tx_bytes -= front;
                            if let Some(Out::Dma(b, _, _, dev)) = self.tx.pop_front() {
                                // Sent: the kernel has its own copy.
                                self.give_buffer(dev, b);
                            }
                            self.tx_off = 0;
                        } else {
                            self.tx_off += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.tx.clear();
                    self.tx_off = 0;
                    self.tx_bytes = 0;
                    if self.ending.is_none() {
                        self.end(End::Io(e));
                    }
                    break;
                }
            }
        }
        progress
    }
}

/// CRC32C of `len` bytes of `buf` at `at`, continuing `crc` (read out in small pieces: the
/// digest is computed from a copy, the data itself is never copied).
pub(super) fn crc_of(buf: &DmaBuffer, at: usize, len: usize, crc: u32) -> u32 {
    let mut chunk = [0u8; 4096];
    let mut crc = crc;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len());
        buf.read_bytes(at + done, &mut chunk[..n]);
        crc = crc32c::crc32c_append(crc, &chunk[..n]);
        done += n;
    }
    crc
}
