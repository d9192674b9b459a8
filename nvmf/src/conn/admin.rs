//! Admin and fabrics commands: Connect, properties, Identify, logs, features, keep alive and
//! asynchronous events.

use super::*;

impl Conn {
    // ---- admin and fabrics commands ----

    pub(super) fn run_admin(&mut self, sqe: &Sqe, data: Option<&[u8]>) {
        let a = if sqe.opcode() == FABRICS {
            self.fabrics(sqe, data)
        } else if self.qid.is_none() {
            Answer::err(status::COMMAND_SEQUENCE_ERROR)
        } else if self.qid != Some(0) {
            Answer::err(status::INVALID_OPCODE)
        } else {
            self.admin_cmd(sqe)
        };
        if let Some(a) = a.into_sent() {
            self.answer(sqe, a);
        }
    }

    pub(super) fn fabrics(&mut self, sqe: &Sqe, data: Option<&[u8]>) -> Answer {
        match sqe.fctype() {
            fctype::CONNECT => self.connect(sqe, data),
            _ if self.qid.is_none() => Answer::err(status::COMMAND_SEQUENCE_ERROR),
            fctype::PROPERTY_GET | fctype::PROPERTY_SET if self.qid != Some(0) => {
                Answer::err(status::INVALID_FIELD)
            }
            fctype::PROPERTY_GET => self.property_get(sqe),
            fctype::PROPERTY_SET => self.property_set(sqe),
            fctype::DISCONNECT => {
                if self.qid != Some(0) {
                    // The response goes out before the connection ends.
                    let c = cqe(
                        0,
                        0,
                        self.sqhd,
                        self.qid.unwrap_or(0),
                        sqe.cid(),
                        NvmeStatus::SUCCESS,
                    );
                    let hd = self.limits.hdgst;
                    self.push_with(|v| pdu::capsule_resp(v, &c, hd));
                    self.end(End::Disconnected);
                    return Answer::default().silent();
                }
                Answer::err(status::INVALID_FIELD)
            }
            _ => Answer::err(status::INVALID_OPCODE),
        }
    }

    pub(super) fn connect(&mut self, sqe: &Sqe, data: Option<&[u8]>) -> Answer {
        if self.qid.is_some() {
            return Answer::err(status::COMMAND_SEQUENCE_ERROR);
        }
        let Some(data) = data.filter(|d| d.len() >= CONNECT_DATA_LEN) else {
            return Answer::refuse(
                status::CONNECT_INVALID_PARAMETERS,
                invalid_parameter(false, 24),
            );
        };
        let c = match Connect::parse(sqe, data) {
            Ok(c) => c,
            Err(dw0) => return Answer::refuse(status::CONNECT_INVALID_PARAMETERS, dw0),
        };
        let refuse = Answer::refuse;
        if c.recfmt != 0 {
            return refuse(
                status::CONNECT_INCOMPATIBLE_FORMAT,
                invalid_parameter(false, connect_at::RECFMT),
            );
        }
        let target = self.target.clone();
        let discovery = c.subnqn == DISCOVERY_NQN;
        let subsys = if discovery {
            None
        } else {
            match target.subsystem_index(&c.subnqn) {
                Some(i) => Some(i),
                None => {
                    log::warn!("{}: Connect to unknown subsystem {}", self.peer, c.subnqn);
                    return refuse(
                        status::CONNECT_INVALID_PARAMETERS,
                        invalid_parameter(true, connect_at::SUBNQN),
                    );
                }
            }
        };
        if let Some(i) = subsys {
            if !target.subsystems[i].allows(&c.hostnqn) {
                log::warn!(
                    "{}: host {} is not allowed on {}",
                    self.peer,
                    c.hostnqn,
                    c.subnqn
                );
                return refuse(
                    status::CONNECT_INVALID_HOST,
                    invalid_parameter(true, connect_at::HOSTNQN),
                );
            }
        }
        let max_entries = if c.qid == 0 {
            ADMIN_QUEUE_ENTRIES
        } else {
            target.limits.queue_entries
        };
        if c.sqsize == 0 || c.sqsize >= max_entries {
            return refuse(
                status::CONNECT_INVALID_PARAMETERS,
                invalid_parameter(false, connect_at::SQSIZE),
            );
        }
        let ctrl = if c.qid == 0 {
            match target.create_ctrl(subsys, &c.hostnqn) {
                Ok(x) => x,
                Err((s, dw0)) => return refuse(s, dw0),
            }
        } else {
            let Some(i) = subsys else {
                return refuse(
                    status::CONNECT_INVALID_PARAMETERS,
                    invalid_parameter(false, connect_at::QID),
                );
            };
            match target.attach_io_queue(c.cntlid, i, &c.hostnqn, c.qid) {
                Ok(x) => x,
                Err((s, dw0)) => return refuse(s, dw0),
            }
        };
        self.qid = Some(c.qid);
        self.entries = c.sqsize + 1;
        self.sqflow = c.cattr & CATTR_DISABLE_SQFLOW == 0;
        self.reqs = (0..self.entries).map(|_| None).collect();
        if c.qid == 0 {
            self.admin = Some(AdminState {
                cc: 0,
                csts: 0,
                kato: kato_for(c.kato, ctrl.discovery),
                last_keep_alive: Instant::now(),
                aers: Vec::new(),
                aec: 0,
            });
        } else {
            self.limits.in_capsule = target.limits.in_capsule;
        }
        log::info!(
            "{}: host {} connected queue {} of controller {} ({}), {} entries",
            self.peer,
            c.hostnqn,
            c.qid,
            ctrl.cntlid,
            c.subnqn,
            self.entries
        );
        let cntlid = ctrl.cntlid;
        self.ctrl = Some(ctrl);
        Answer::ok(cntlid as u32)
    }

    pub(super) fn cap(&self) -> u64 {
        let mqes = (self.target.limits.queue_entries - 1) as u64;
        mqes | 1 << 16 | 15 << 24 | 1 << 37
    }

    pub(super) fn property_get(&mut self, sqe: &Sqe) -> Answer {
        let size8 = sqe.0[40] & 1 != 0;
        let offset = sqe.fabrics_u32(44);
        let a = self.admin.as_ref().expect("the admin queue");
        let v: u64 = match (offset, size8) {
            (0x00, true) => self.cap(),
            (0x08, false) => 0x0001_0300,
            (0x14, false) => a.cc as u64,
            (0x1c, false) => a.csts as u64,
            _ => return Answer::err(status::INVALID_FIELD),
        };
        Answer {
            dw0: v as u32,
            dw1: (v >> 32) as u32,
            ..Answer::default()
        }
    }

    pub(super) fn property_set(&mut self, sqe: &Sqe) -> Answer {
        let size8 = sqe.0[40] & 1 != 0;
        let offset = sqe.fabrics_u32(44);
        let value = sqe.fabrics_u64(48);
        if offset != 0x14 || size8 {
            return Answer::err(status::INVALID_FIELD);
        }
        let a = self.admin.as_mut().expect("the admin queue");
        let cc = value as u32;
        a.cc = cc;
        let mut csts = if cc & 1 != 0 { 1 } else { 0 };
        if (cc >> 14) & 3 != 0 {
            // Shutdown: every command of the host was answered after the device completed it
            // (volatile data is the device's to keep, flushed by the host's Flush).
            csts |= 2 << 2;
        }
        a.csts = csts;
        Answer::ok(0)
    }

    pub(super) fn admin_cmd(&mut self, sqe: &Sqe) -> Answer {
        let ctrl = self.ctrl.clone().expect("connected");
        let target = self.target.clone();
        if let Some(a) = self.admin.as_mut() {
            a.last_keep_alive = Instant::now();
        }
        let sgl_len = sqe.sgl().len as usize;
        // The data of any admin command fits in this; a longer descriptor is refused before
        // anything is allocated (the answer is as long as the descriptor: a host on the
        // discovery subsystem, which takes anyone, could ask for gigabytes otherwise).
        if sgl_len > MAX_ADMIN_DATA {
            return Answer::err(status::SGL_LENGTH_INVALID);
        }
        match sqe.opcode() {
            admin_op::KEEP_ALIVE => Answer::ok(0),
            admin_op::IDENTIFY => {
                let cns = (sqe.cdw(10) & 0xff) as u8;
                if sgl_len < 4096 && sgl_len != 0 {
                    // Answer::data truncates to the descriptor; allowed.
                }
                match (cns, ctrl.discovery) {
                    (0x01, _) => Answer::data(target.identify_ctrl(&ctrl)),
                    (0x00 | 0x03, false) => {
                        match target.identify_ns(ctrl.subsys, sqe.nsid(), cns) {
                            Ok(d) => Answer::data(d),
                            Err(s) => Answer::err(s),
                        }
                    }
                    (0x02, false) => {
                        if sqe.nsid() >= 0xffff_fffe {
                            Answer::err(status::INVALID_NAMESPACE)
                        } else {
                            Answer::data(target.active_ns_list(ctrl.subsys, sqe.nsid()))
                        }
                    }
                    _ => Answer::err(status::INVALID_FIELD),
                }
            }
            admin_op::GET_LOG_PAGE => {
                let (lid, offset, len) = log_page_args(sqe);
                if len > sgl_len.max(4) {
                    return Answer::err(status::SGL_LENGTH_INVALID);
                }
                match (lid, ctrl.discovery) {
                    (0x70, true) => Answer::data(slice_padded(
                        &target.discovery_log(&ctrl.hostnqn),
                        offset,
                        len,
                    )),
                    (0x70, false) | (_, true) => Answer::err(status::INVALID_LOG_PAGE),
                    (0x04, false) => Answer::data(vec![0; len]),
                    (l, false) => match target.device_log(ctrl.subsys, l, offset, len) {
                        Ok(d) => Answer::data(d),
                        Err(s) => Answer::err(s),
                    },
                }
            }
            admin_op::SET_FEATURES => {
                let fid = (sqe.cdw(10) & 0xff) as u8;
                let a = self.admin.as_mut().expect("admin");
                match fid {
                    0x07 if !ctrl.discovery => {
                        if !ctrl
                            .queues
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .is_empty()
                        {
                            return Answer::err(status::COMMAND_SEQUENCE_ERROR);
                        }
                        let nsqr = (sqe.cdw(11) & 0xffff) as u16;
                        let ncqr = (sqe.cdw(11) >> 16) as u16;
                        if nsqr == 0xffff || ncqr == 0xffff {
                            return Answer::err(status::INVALID_FIELD);
                        }
                        let n = (nsqr.min(ncqr) as u32 + 1).min(target.limits.max_io_queues as u32);
                        ctrl.io_queues.store(n as u16, Ordering::Release);
                        Answer::ok((n - 1) | (n - 1) << 16)
                    }
                    0x0b => {
                        a.aec = sqe.cdw(11);
                        Answer::ok(0)
                    }
                    0x0f => {
                        a.kato = kato_for(sqe.cdw(11), ctrl.discovery);
                        Answer::ok(0)
                    }
                    _ => Answer::err(status::INVALID_FIELD),
                }
            }
            admin_op::GET_FEATURES => {
                let fid = (sqe.cdw(10) & 0xff) as u8;
                let a = self.admin.as_ref().expect("admin");
                match fid {
                    0x07 if !ctrl.discovery => {
                        let n = ctrl.io_queues.load(Ordering::Acquire).max(1) as u32;
                        Answer::ok((n - 1) | (n - 1) << 16)
                    }
                    0x0b => Answer::ok(a.aec),
                    0x0f => Answer::ok(a.kato.map_or(0, |k| k.as_millis() as u32)),
                    0x06 if !ctrl.discovery => {
                        let vwc = target.subsystems[ctrl.subsys]
                            .namespaces
                            .first()
                            .and_then(|n| target.devices[n.dev].get_features(0x06, 0).ok())
                            .unwrap_or(0);
                        Answer::ok(vwc)
                    }
                    _ => Answer::err(status::INVALID_FIELD),
                }
            }
            admin_op::ASYNC_EVENT => {
                let a = self.admin.as_mut().expect("admin");
                if a.aers.len() >= AER_MAX {
                    return Answer::err(status::AER_LIMIT_EXCEEDED);
                }
                a.aers.push(sqe.cid());
                // Held: answered when there is an event.
                Answer::default().silent()
            }
            admin_op::ABORT => Answer::ok(1),
            _ => Answer::err(status::INVALID_OPCODE),
        }
    }
}

impl Answer {
    /// An answer that sends nothing (held, or already sent).
    pub(super) fn silent(self) -> Answer {
        Answer {
            status: Some(SILENT),
            ..self
        }
    }
}

/// Marks an [`Answer`] that sends nothing.
pub(super) const SILENT: NvmeStatus = NvmeStatus::new(7, 0xff);

impl Answer {
    /// The answer, unless it sends nothing.
    pub(super) fn into_sent(self) -> Option<Answer> {
        (self.status != Some(SILENT)).then_some(self)
    }
}

/// The most data one admin command moves (a discovery log of 1 023 entries and its header).
const MAX_ADMIN_DATA: usize = 1 << 20;
/// The keep alive of a discovery controller whose host asks for none: as the kernel's target
/// (NVMET_DISC_KATO_MS), so that a silent host on the subsystem anyone may reach does not hold
/// a connection for ever.
const DISCOVERY_KATO: Duration = Duration::from_secs(120);

/// The keep alive timeout a host asked for (`ms`, 0: none), for a discovery controller or not.
fn kato_for(ms: u32, discovery: bool) -> Option<Duration> {
    match ms {
        0 if discovery => Some(DISCOVERY_KATO),
        0 => None,
        ms => Some(Duration::from_millis(ms as u64)),
    }
}
