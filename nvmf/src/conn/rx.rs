//! Receiving: the receive buffer, PDU headers and their data, and where a command's data goes.

use super::*;

impl Conn {
    // ---- receiving ----

    pub(super) fn avail(&self) -> usize {
        self.rx_end - self.rx_start
    }

    /// Reads more into the receive buffer. False: nothing now.
    pub(super) fn fill(&mut self) -> Result<bool, End> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_end == self.rx.len() {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        match self.sock.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => Err(End::Closed),
            Ok(n) => {
                self.rx_end += n;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(End::Io(e)),
        }
    }

    /// Reads and handles what the host sent. Returns whether anything happened.
    pub fn poll_rx(&mut self, io: &mut Io<'_>) -> bool {
        // A host that does not read its answers gets no more of them: its commands wait in
        // the socket (TCP holds the host back) until what is queued for it has gone.
        if !self.wants_read() {
            return false;
        }
        match self.rx_loop(io) {
            Ok(progress) => progress,
            Err(e) => {
                self.end(e);
                true
            }
        }
    }

    pub(super) fn rx_loop(&mut self, io: &mut Io<'_>) -> Result<bool, End> {
        let mut progress = false;
        let mut pdus = 0;
        while pdus < PDUS_PER_POLL && self.wants_read() {
            match &mut self.state {
                RxState::Header => {
                    if self.avail() < CH_LEN {
                        if !self.fill()? {
                            break;
                        }
                        progress = true;
                        continue;
                    }
                    let s = self.rx_start;
                    let ch = CommonHeader::parse(self.rx[s..s + CH_LEN].try_into().expect("8"));
                    let lay = pdu::check_header(&ch, self.ic_done, &self.limits)?;
                    let hl = lay.header_len();
                    if self.avail() < hl {
                        if !self.fill()? {
                            break;
                        }
                        progress = true;
                        continue;
                    }
                    let hdr = self.rx[s..s + hl].to_vec();
                    self.rx_start += hl;
                    pdus += 1;
                    progress = true;
                    self.on_header(lay, hdr)?;
                }
                RxState::Payload {
                    lay,
                    dst,
                    pad_left,
                    off,
                    crc,
                    digest,
                    digest_got,
                    ..
                } => {
                    if *pad_left > 0 {
                        if self.rx_end == self.rx_start {
                            if !self.fill()? {
                                break;
                            }
                            continue;
                        }
                        let n = (*pad_left).min(self.rx_end - self.rx_start);
                        self.rx_start += n;
                        *pad_left -= n;
                        continue;
                    }
                    if *off < lay.data {
                        let want = lay.data - *off;
                        let have = self.rx_end - self.rx_start;
                        if have > 0 {
                            let n = want.min(have);
                            let bytes = &self.rx[self.rx_start..self.rx_start + n];
                            if lay.ddgst {
                                *crc = crc32c::crc32c_append(*crc, bytes);
                            }
                            match dst {
                                Dst::Heap(v) => v.extend_from_slice(bytes),
                                Dst::Dma { slot, base } => {
                                    let buf = self.reqs[*slot]
                                        .as_ref()
                                        .and_then(|r| r.buf.as_ref())
                                        .expect("a request receiving data has a buffer");
                                    buf.write_bytes(*base + *off, bytes);
                                }
                                Dst::Discard => {}
                            }
                            self.rx_start += n;
                            *off += n;
                            progress = true;
                            continue;
                        }
                        if let Dst::Dma { slot, base } = dst {
                            if want >= DIRECT_MIN {
                                let buf = self.reqs[*slot]
                                    .as_ref()
                                    .and_then(|r| r.buf.as_ref())
                                    .expect("a request receiving data has a buffer");
                                let at = *base + *off;
                                let vs = buf.volatile();
                                let mut sub = vs
                                    .subslice(at, want)
                                    .expect("the data fits the buffer (checked at its header)");
                                match self.sock.read_volatile(&mut sub) {
                                    Ok(0) => return Err(End::Closed),
                                    Ok(n) => {
                                        if lay.ddgst {
                                            *crc = crc_of(buf, at, n, *crc);
                                        }
                                        *off += n;
                                        progress = true;
                                        continue;
                                    }
                                    Err(vm_memory::VolatileMemoryError::IOError(e))
                                        if e.kind() == ErrorKind::WouldBlock =>
                                    {
                                        break
                                    }
                                    Err(vm_memory::VolatileMemoryError::IOError(e))
                                        if e.kind() == ErrorKind::Interrupted =>
                                    {
                                        continue
                                    }
                                    Err(e) => {
                                        return Err(End::Io(std::io::Error::other(e.to_string())))
                                    }
                                }
                            }
                        }
                        if !self.fill()? {
                            break;
                        }
                        continue;
                    }
                    if lay.ddgst && *digest_got < DIGEST_LEN {
                        let have = self.rx_end - self.rx_start;
                        if have == 0 {
                            if !self.fill()? {
                                break;
                            }
                            continue;
                        }
                        let n = (DIGEST_LEN - *digest_got).min(have);
                        digest[*digest_got..*digest_got + n]
                            .copy_from_slice(&self.rx[self.rx_start..self.rx_start + n]);
                        *digest_got += n;
                        self.rx_start += n;
                        continue;
                    }
                    let RxState::Payload {
                        lay,
                        hdr,
                        dst,
                        crc,
                        digest,
                        ..
                    } = std::mem::replace(&mut self.state, RxState::Header)
                    else {
                        unreachable!("in the payload state")
                    };
                    let digest_ok = !lay.ddgst || u32::from_le_bytes(digest) == crc;
                    if !digest_ok {
                        log::warn!(
                            "{}: data digest {:#010x}, computed {crc:#010x}: the command fails",
                            self.peer,
                            u32::from_le_bytes(digest)
                        );
                    }
                    progress = true;
                    self.on_payload(lay, hdr, dst, digest_ok, io);
                }
            }
        }
        Ok(progress)
    }

    /// A PDU's header is in: check its digest and decide where its data goes.
    pub(super) fn on_header(&mut self, lay: Layout, hdr: Vec<u8>) -> Result<(), End> {
        if lay.ch.ptype != pdu_type::IC_REQ
            && lay.ch.ptype != pdu_type::H2C_TERM_REQ
            && self.limits.hdgst
        {
            pdu::check_hdgst(&hdr)?;
        }
        let dst = match lay.ch.ptype {
            pdu_type::IC_REQ => {
                let ic = pdu::IcReq::parse(&hdr)?;
                self.limits.hdgst = ic.hdgst;
                self.limits.ddgst = ic.ddgst;
                self.ic_done = true;
                let resp = pdu::ic_resp(0, ic.hdgst, ic.ddgst, self.limits.max_h2c_data);
                self.push_bytes(&resp);
                return Ok(());
            }
            pdu_type::H2C_TERM_REQ => {
                let f = u16::from_le_bytes([hdr[8], hdr[9]]);
                return Err(End::HostTerminated(f));
            }
            pdu_type::CAPSULE_CMD => {
                let sqe = Sqe(hdr[8..72].try_into().expect("64 bytes"));
                self.stats.commands += 1;
                self.advance_sqhd();
                match self.command_data(&sqe, lay.data)? {
                    Some(d) => d,
                    None => return Ok(()),
                }
            }
            pdu_type::H2C_DATA => {
                let h = pdu::H2cData::parse(&hdr, &lay.ch);
                let slot = h.ttag as usize;
                let ok = self.reqs.get(slot).and_then(|r| r.as_ref()).filter(|r| {
                    r.sqe.cid() == h.cccid && r.stage == Stage::HostData && r.buf.is_some()
                });
                let Some(r) = ok else {
                    return Err(Fatal::new(
                        fes::INVALID_HEADER_FIELD,
                        10,
                        format!(
                            "H2CData for command {:#x} with transfer tag {}, which has no R2T",
                            h.cccid, h.ttag
                        ),
                    )
                    .into());
                };
                if h.datal as usize != lay.data
                    || h.datao != r.got
                    || h.datao as u64 + h.datal as u64 > r.len as u64
                {
                    return Err(Fatal::new(
                        fes::DATA_OUT_OF_RANGE,
                        12,
                        format!(
                            "H2CData of {} bytes at {} ({} in the PDU); the R2T asked for {} at {}",
                            h.datal,
                            h.datao,
                            lay.data,
                            r.len - r.got,
                            r.got
                        ),
                    )
                    .into());
                }
                Dst::Dma {
                    slot,
                    base: h.datao as usize,
                }
            }
            _ => unreachable!("check_header admits only the types above"),
        };
        self.state = RxState::Payload {
            lay,
            hdr,
            dst,
            pad_left: lay.pad,
            off: 0,
            crc: 0,
            digest: [0; DIGEST_LEN],
            digest_got: 0,
        };
        Ok(())
    }

    /// A PDU's data is in (`digest_ok`: its data digest matched, or there was none).
    pub(super) fn on_payload(
        &mut self,
        lay: Layout,
        hdr: Vec<u8>,
        dst: Dst,
        digest_ok: bool,
        io: &mut Io<'_>,
    ) {
        match (lay.ch.ptype, dst) {
            (pdu_type::CAPSULE_CMD, Dst::Heap(data)) => {
                let sqe = Sqe(hdr[8..72].try_into().expect("64 bytes"));
                if digest_ok {
                    self.run_admin(&sqe, Some(&data));
                } else {
                    self.respond(sqe.cid(), status::TRANSPORT_ERROR, 0);
                }
            }
            (pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA, Dst::Dma { slot, .. }) => {
                if let Some(r) = self.reqs[slot].as_mut() {
                    if lay.ch.ptype == pdu_type::CAPSULE_CMD {
                        r.got = r.len;
                    } else {
                        r.got += lay.data as u32;
                    }
                    if !digest_ok {
                        r.failure.get_or_insert(status::TRANSPORT_ERROR);
                    }
                    if r.got == r.len {
                        if let Some(s) = r.failure {
                            let cid = r.sqe.cid();
                            self.reqs[slot] = None;
                            self.respond(cid, s, 0);
                        } else {
                            r.stage = Stage::Ready;
                            self.pending.push_back(slot);
                        }
                    }
                }
            }
            _ => {}
        }
        self.submit(io);
    }

    pub(super) fn advance_sqhd(&mut self) {
        self.sqhd = (self.sqhd + 1) % self.entries.max(1);
    }

    /// A command capsule arrived with `in_capsule` bytes of data following: where the data
    /// goes (None: the command was answered or queued and takes no data from the capsule).
    pub(super) fn command_data(
        &mut self,
        sqe: &Sqe,
        in_capsule: usize,
    ) -> Result<Option<Dst>, End> {
        let sgl = sqe.sgl();
        let is_admin_path = self.qid.is_none_or(|q| q == 0) || sqe.opcode() == FABRICS;
        // The data descriptor: in the capsule at offset 0, or by the transport.
        let bad_sgl = if in_capsule > 0 {
            (sgl.id != sgl_id::IN_CAPSULE || sgl.addr != 0 || sgl.len as usize != in_capsule)
                .then_some(if sgl.id != sgl_id::IN_CAPSULE {
                    status::SGL_TYPE_INVALID
                } else {
                    status::SGL_LENGTH_INVALID
                })
        } else {
            (sgl.len > 0 && sgl.id != sgl_id::TRANSPORT).then_some(status::SGL_TYPE_INVALID)
        };
        if let Some(s) = bad_sgl {
            self.respond(sqe.cid(), s, 0);
            return Ok((in_capsule > 0).then_some(Dst::Discard));
        }
        if is_admin_path {
            if in_capsule > 0 {
                return Ok(Some(Dst::Heap(Vec::with_capacity(in_capsule))));
            }
            self.run_admin(sqe, None);
            return Ok(None);
        }
        // An I/O command.
        match self.prepare_io(sqe) {
            Err(s) => {
                self.respond(sqe.cid(), s, 0);
                Ok((in_capsule > 0).then_some(Dst::Discard))
            }
            Ok((slot, from_host)) => {
                let len = self.reqs[slot].as_ref().map_or(0, |r| r.len);
                if in_capsule > 0 {
                    if !from_host || in_capsule != len as usize {
                        self.reqs[slot] = None;
                        self.respond(sqe.cid(), status::SGL_LENGTH_INVALID, 0);
                        return Ok(Some(Dst::Discard));
                    }
                    return Ok(Some(Dst::Dma { slot, base: 0 }));
                }
                if from_host {
                    // Ask for all of it: the host sends it in H2CData PDUs of up to MAXH2CDATA.
                    let hd = self.limits.hdgst;
                    let cid = sqe.cid();
                    self.push_with(|v| pdu::r2t(v, cid, slot as u16, 0, len, hd));
                } else {
                    let r = self.reqs[slot].as_mut().expect("just made");
                    r.stage = Stage::Ready;
                    self.pending.push_back(slot);
                }
                Ok(None)
            }
        }
    }
}
