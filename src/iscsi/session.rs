//! The full feature phase of one connection as a state machine: request PDUs in, response PDUs and SCSI
//! work out. The shell runs the SCSI commands it is handed (they touch the disk) and feeds their
//! [`scsi::Reply`](super::scsi::Reply) back; nothing here blocks or reads a clock.
//!
//! - Command numbering: non-immediate commands advance ExpCmdSN; MaxCmdSN keeps a window of
//!   [`CMD_WINDOW`] open; every response carries StatSN, ExpCmdSN and MaxCmdSN.
//! - Reads: the reply's data goes out in Data-In PDUs no larger than the initiator's
//!   MaxRecvDataSegmentLength, the last carrying the status when the command succeeded (phase collapse);
//!   otherwise a SCSI Response with sense data. Residuals are reported against the expected length.
//! - Writes: immediate data, unsolicited Data-Out up to FirstBurstLength (when InitialR2T=No), then R2Ts
//!   of at most MaxBurstLength each, at most MaxOutstandingR2T at once; the command runs when its data
//!   is complete.
//!   A Data-Out out of its sequence (DataSN) ends its task with CHECK CONDITION, "protocol service CRC
//!   error" (RFC 7143 7.8, 7.9: an implied digest error, and ErrorRecoveryLevel 0 cannot ask again);
//!   the connection stays up.
//! - NOP-Out pings are echoed; Task Management ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LUN RESET and
//!   the target resets drop the tasks they name (ABORT TASK of a task that is gone: "task does not
//!   exist", unless its CmdSN has not arrived yet, RFC 7143 11.5.1); Text `SendTargets` lists targets;
//!   Logout ends the connection. Anything else gets a Reject.

use std::collections::BTreeMap;

use super::login::Params;
use super::pdu::{self, op, reject, Numbers, Pdu, NO_TAG};
use super::scsi;

/// Commands the initiator may have outstanding beyond ExpCmdSN.
pub const CMD_WINDOW: u32 = 64;

/// The most Data-Out one command may make the target hold: the largest transfer the Block Limits page
/// allows (32 MiB).
const MAX_DATA_OUT: u32 = scsi::MAX_TRANSFER_BLOCKS * scsi::BLOCK as u32;

/// Work for the shell.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Send this PDU.
    Send(Pdu),
    /// Run this SCSI command and hand the reply to [`Session::completed`].
    Execute {
        itt: u32,
        lun: u64,
        cdb: Vec<u8>,
        data_out: Vec<u8>,
    },
    /// Send what came before, then close the connection (after a Logout, or a fatal protocol error).
    Close,
}

/// A write command collecting its data.
#[derive(Debug)]
struct Collecting {
    lun: u64,
    cdb: Vec<u8>,
    /// The data the target takes in (the expected length, unless that was beyond any transfer).
    expected: u32,
    /// The expected length the initiator gave, which residuals are reported against.
    wire_expected: u32,
    buf: Vec<u8>,
    received: u32,
    /// Offset up to which the initiator has been asked for (or was allowed to send) data.
    requested: u32,
    /// Unsolicited data (immediate and Data-Out without a transfer tag) may not go beyond this.
    unsolicited: u32,
    next_r2t_sn: u32,
    /// R2Ts out whose data has not all arrived: ttt → (offset, len, received, next DataSN).
    outstanding: BTreeMap<u32, (u32, u32, u32, u32)>,
    /// The next DataSN of unsolicited Data-Out.
    unsolicited_sn: u32,
    /// A Data-Out came out of sequence: the rest of the data is taken in and dropped, then the task
    /// ends with CHECK CONDITION.
    broken: bool,
}

/// A command waiting for its reply.
#[derive(Debug)]
struct Running {
    /// Bytes the initiator expects back (reads).
    expected_in: u32,
    write: bool,
    /// For writes: the expected length minus what the command moves (reported as residual).
    residual_out: i64,
}

/// One connection in the full feature phase.
pub struct Session {
    params: Params,
    stat_sn: u32,
    exp_cmd_sn: u32,
    collecting: BTreeMap<u32, Collecting>,
    running: BTreeMap<u32, Running>,
    next_ttt: u32,
    /// Targets listed to a SendTargets request: (name, address).
    targets: Vec<(String, String)>,
}

/// What [`Session::run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ran {
    /// SCSI commands executed.
    pub commands: u64,
    /// False once the session has ended (logout, or a protocol error that closes the connection).
    pub open: bool,
}

impl Session {
    /// A session after login: `stat_sn` is the next StatSN, `exp_cmd_sn` the CmdSN of the login.
    pub fn new(params: Params, stat_sn: u32, exp_cmd_sn: u32) -> Session {
        Session {
            params,
            stat_sn,
            exp_cmd_sn,
            collecting: BTreeMap::new(),
            running: BTreeMap::new(),
            next_ttt: 1,
            targets: Vec::new(),
        }
    }

    /// What a discovery session's SendTargets answers with.
    pub fn set_targets(&mut self, targets: Vec<(String, String)>) {
        self.targets = targets;
    }

    fn numbers(&self) -> Numbers {
        Numbers {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1),
        }
    }

    /// Numbers for a response that carries a status: StatSN advances.
    fn status_numbers(&mut self) -> Numbers {
        let n = self.numbers();
        self.stat_sn = self.stat_sn.wrapping_add(1);
        n
    }

    /// Counts a command in: non-immediate commands advance ExpCmdSN. Returns false for a CmdSN outside
    /// the window (the PDU is then dropped, as RFC 7143 3.2.2.1 says).
    fn admit(&mut self, p: &Pdu) -> bool {
        let sn = p.cmd_sn();
        if p.immediate() {
            return true;
        }
        let ahead = sn.wrapping_sub(self.exp_cmd_sn);
        if ahead >= CMD_WINDOW {
            return false;
        }
        if ahead == 0 {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        }
        true
    }

    fn reject(&self, reason: u8, p: &Pdu) -> Event {
        Event::Send(pdu::reject(reason, &p.bhs, self.numbers()))
    }

    /// Handles one PDU from the initiator.
    pub fn on_pdu(&mut self, p: &Pdu) -> Vec<Event> {
        match p.opcode() {
            op::SCSI_COMMAND => self.command(p),
            op::DATA_OUT => self.data_out(p),
            op::NOP_OUT => {
                if !self.admit(p) {
                    return Vec::new();
                }
                if p.itt() == NO_TAG {
                    // The answer to a ping of ours: nothing to say.
                    return Vec::new();
                }
                let n = self.status_numbers();
                vec![Event::Send(pdu::nop_in(
                    p.lun(),
                    p.itt(),
                    NO_TAG,
                    p.data.clone(),
                    n,
                ))]
            }
            op::TASK_MGMT => {
                if !self.admit(p) {
                    return Vec::new();
                }
                let response = self.task_management(p);
                let n = self.status_numbers();
                vec![Event::Send(pdu::task_response(p.itt(), response, n))]
            }
            op::TEXT => {
                if !self.admit(p) {
                    return Vec::new();
                }
                self.text(p)
            }
            op::LOGOUT => {
                let _ = self.admit(p);
                let n = self.status_numbers();
                vec![
                    Event::Send(pdu::logout_response(p.itt(), 0, n)),
                    Event::Close,
                ]
            }
            op::SNACK => vec![self.reject(reject::SNACK_REJECT, p)],
            op::LOGIN => vec![self.reject(reject::PROTOCOL_ERROR, p), Event::Close],
            _ => vec![self.reject(reject::COMMAND_NOT_SUPPORTED, p)],
        }
    }

    fn command(&mut self, p: &Pdu) -> Vec<Event> {
        if !self.admit(p) {
            return Vec::new();
        }
        let itt = p.itt();
        if self.collecting.contains_key(&itt) || self.running.contains_key(&itt) {
            return vec![self.reject(reject::TASK_IN_PROGRESS, p)];
        }
        let flags = p.flags();
        let (read, write) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let expected = p.u32_at(20);
        let cdb = p.cdb();
        let lun = p.lun();
        // A write flag with no expected length: run it as it is. A write flag on a command known to send
        // nothing runs at once too when no data is on its way (none immediate, and InitialR2T=Yes
        // means none unsolicited); otherwise its data is collected (and ignored) like a write's, so
        // that the connection stays in step. Unknown commands get their data collected and then
        // their INVALID COMMAND sense for the same reason.
        let nothing_coming = p.data.is_empty() && self.params.initial_r2t;
        let write = write && expected > 0 && !(scsi::sends_nothing(&cdb) && nothing_coming);
        if !write {
            if !p.data.is_empty() {
                return vec![self.reject(reject::PROTOCOL_ERROR, p)];
            }
            // A command that should send data but was given no room for it (expected length 0): it runs
            // with none, and the whole transfer is the overflow.
            let owed = scsi::data_out_len(&cdb);
            self.running.insert(
                itt,
                Running {
                    expected_in: if read { expected } else { 0 },
                    write: owed > 0,
                    residual_out: -i64::from(owed),
                },
            );
            return vec![Event::Execute {
                itt,
                lun,
                cdb,
                data_out: Vec::new(),
            }];
        }
        // The buffer below is sized by the expected length, a number from the wire: one beyond the largest
        // transfer corral allows is not taken on trust. The target then takes what the CDB moves and reports
        // the rest as residual underflow (RFC 7143 11.4.5.1 lets it transfer less than expected).
        let wire_expected = expected;
        let expected = if expected > MAX_DATA_OUT {
            let owed = scsi::data_out_len(&cdb);
            if owed == 0 || owed > MAX_DATA_OUT || p.data.len() as u32 > owed {
                return vec![self.reject(reject::PROTOCOL_ERROR, p)];
            }
            owed
        } else {
            expected
        };
        // Immediate data: only as negotiated, never beyond FirstBurstLength or the expected length.
        let imm = p.data.len() as u32;
        if (imm > 0 && !self.params.immediate_data)
            || imm > self.params.first_burst
            || imm > expected
        {
            return vec![self.reject(reject::PROTOCOL_ERROR, p)];
        }
        let mut c = Collecting {
            lun,
            cdb,
            expected,
            wire_expected,
            buf: vec![0; expected as usize],
            received: imm,
            requested: 0,
            unsolicited: 0,
            unsolicited_sn: 0,
            next_r2t_sn: 0,
            outstanding: BTreeMap::new(),
            broken: false,
        };
        c.buf[..imm as usize].copy_from_slice(&p.data);
        // Without InitialR2T the initiator may send up to FirstBurstLength unsolicited.
        c.requested = if self.params.initial_r2t {
            imm
        } else {
            expected.min(self.params.first_burst).max(imm)
        };
        c.unsolicited = c.requested;
        self.collecting.insert(itt, c);
        self.advance_write(itt)
    }

    /// Sends R2Ts for a write while it may, or runs it once its data is complete.
    fn advance_write(&mut self, itt: u32) -> Vec<Event> {
        let mut out = Vec::new();
        let n = self.numbers();
        let (max_burst, max_r2t) = (self.params.max_burst, self.params.max_outstanding_r2t);
        let Some(c) = self.collecting.get_mut(&itt) else {
            return out;
        };
        if c.received >= c.expected && c.outstanding.is_empty() {
            let c = self
                .collecting
                .remove(&itt)
                .unwrap_or_else(|| unreachable!());
            self.running.insert(
                itt,
                Running {
                    expected_in: 0,
                    write: true,
                    residual_out: i64::from(c.wire_expected)
                        - i64::from(scsi::data_out_len(&c.cdb)),
                },
            );
            out.push(Event::Execute {
                itt,
                lun: c.lun,
                cdb: c.cdb,
                data_out: c.buf,
            });
            return out;
        }
        // Unsolicited data still to come: wait for it before asking for more.
        if c.received < c.requested && c.outstanding.is_empty() {
            return out;
        }
        while c.requested < c.expected && (c.outstanding.len() as u32) < max_r2t {
            let len = (c.expected - c.requested).min(max_burst);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
            if self.next_ttt == NO_TAG {
                self.next_ttt = 1;
            }
            c.outstanding.insert(ttt, (c.requested, len, 0, 0));
            out.push(Event::Send(pdu::r2t(
                c.lun,
                itt,
                ttt,
                c.next_r2t_sn,
                c.requested,
                len,
                n,
            )));
            c.next_r2t_sn += 1;
            c.requested += len;
        }
        out
    }

    fn data_out(&mut self, p: &Pdu) -> Vec<Event> {
        let itt = p.itt();
        let ttt = p.u32_at(20);
        let offset = p.u32_at(40);
        let len = p.data.len() as u32;
        let Some(c) = self.collecting.get_mut(&itt) else {
            // Data for a task that was aborted or never was: dropped (RFC 7143 11.7.5 allows a Reject).
            return vec![self.reject(reject::INVALID_PDU_FIELD, p)];
        };
        let end = offset.checked_add(len);
        let ok_range = end.is_some_and(|e| e <= c.expected);
        // Data PDUs of a sequence are numbered from 0 (RFC 7143 11.7.5). A gap or repeat means an
        // earlier PDU was lost to a digest error (7.9); with ErrorRecoveryLevel 0 nothing can be asked
        // again, so the task ends with CHECK CONDITION once its data is in (7.8).
        let data_sn = p.u32_at(36);
        let (allowed, in_sequence) = if ttt == NO_TAG {
            // Unsolicited: within the first burst, after any immediate data.
            let seq = data_sn == c.unsolicited_sn;
            c.unsolicited_sn = c.unsolicited_sn.wrapping_add(1);
            (end.is_some_and(|e| e <= c.unsolicited), seq)
        } else {
            match c.outstanding.get_mut(&ttt) {
                Some((o, l, _, sn)) => {
                    let seq = data_sn == *sn;
                    *sn = sn.wrapping_add(1);
                    (offset >= *o && end.is_some_and(|e| e <= *o + *l), seq)
                }
                None => (false, false),
            }
        };
        if !ok_range || !allowed {
            return vec![self.reject(reject::PROTOCOL_ERROR, p), Event::Close];
        }
        if c.broken || !in_sequence {
            c.broken = true;
            c.received += len;
            if p.final_bit() && ttt != NO_TAG {
                c.outstanding.remove(&ttt);
            }
            // Done when nothing more is owed: no R2T still open, and the sequence just ended.
            if c.outstanding.is_empty() && (p.final_bit() || c.received >= c.expected) {
                self.collecting.remove(&itt);
                let n = self.status_numbers();
                let sense = scsi::Sense::PROTOCOL_SERVICE_CRC.fixed();
                return vec![Event::Send(pdu::scsi_response(
                    itt,
                    scsi::CHECK_CONDITION,
                    Some(&sense),
                    0,
                    n,
                ))];
            }
            return Vec::new();
        }
        c.buf[offset as usize..(offset + len) as usize].copy_from_slice(&p.data);
        c.received += len;
        if ttt != NO_TAG {
            if let Some(r) = c.outstanding.get_mut(&ttt) {
                r.2 += len;
                if r.2 >= r.1 {
                    c.outstanding.remove(&ttt);
                }
            }
        }
        if p.final_bit() || c.received >= c.expected {
            return self.advance_write(itt);
        }
        Vec::new()
    }

    /// Carries `events` through: each command runs on `lun` (LUN 0 is the slot's disk and the only
    /// one; a discovery session has none) and its reply comes back as further events; every PDU to send
    /// goes to `send`, in order. Stops at [`Event::Close`].
    pub fn run<E>(
        &mut self,
        mut events: Vec<Event>,
        lun: Option<&scsi::Lun>,
        mut send: impl FnMut(Pdu) -> Result<(), E>,
    ) -> Result<Ran, E> {
        let mut ran = Ran {
            commands: 0,
            open: true,
        };
        while !events.is_empty() {
            let mut next = Vec::new();
            for ev in events {
                match ev {
                    Event::Send(r) => send(r)?,
                    Event::Close => {
                        ran.open = false;
                        return Ok(ran);
                    }
                    Event::Execute {
                        itt,
                        lun: l,
                        cdb,
                        data_out,
                    } => {
                        ran.commands += 1;
                        let reply = match lun {
                            Some(unit) if l == 0 => unit.execute(&cdb, &data_out),
                            _ => scsi::Reply::check(scsi::Sense::LUN_NOT_SUPPORTED),
                        };
                        next.extend(self.completed(itt, reply));
                    }
                }
            }
            events = next;
        }
        Ok(ran)
    }

    /// The reply of a command handed out by [`Event::Execute`].
    pub fn completed(&mut self, itt: u32, reply: scsi::Reply) -> Vec<Event> {
        let Some(r) = self.running.remove(&itt) else {
            // Aborted meanwhile: its answer is dropped.
            return Vec::new();
        };
        let mut out = Vec::new();
        if r.write {
            // Residual: the expected length against what the command moved.
            let n = self.status_numbers();
            let sense = reply.sense.map(|s| s.fixed());
            let residual = if reply.status == scsi::GOOD {
                r.residual_out
            } else {
                0
            };
            out.push(Event::Send(pdu::scsi_response(
                itt,
                reply.status,
                sense.as_ref().map(|s| &s[..]),
                residual,
                n,
            )));
            return out;
        }
        if reply.status != scsi::GOOD || reply.data.is_empty() {
            let residual = i64::from(r.expected_in);
            let n = self.status_numbers();
            let sense = reply.sense.map(|s| s.fixed());
            out.push(Event::Send(pdu::scsi_response(
                itt,
                reply.status,
                sense.as_ref().map(|s| &s[..]),
                if reply.status == scsi::GOOD {
                    residual
                } else {
                    0
                },
                n,
            )));
            return out;
        }
        let mut data = reply.data;
        let residual = i64::from(r.expected_in) - data.len() as i64;
        data.truncate(r.expected_in as usize);
        if data.is_empty() {
            // Nothing the initiator made room for: status (and the overflow) in a SCSI Response.
            let n = self.status_numbers();
            out.push(Event::Send(pdu::scsi_response(
                itt,
                scsi::GOOD,
                None,
                residual,
                n,
            )));
            return out;
        }
        let chunk = self.params.initiator_max_recv.max(512) as usize;
        let total = data.len();
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        while offset < total {
            let end = (offset + chunk).min(total);
            let last = end == total;
            let n = if last {
                self.status_numbers()
            } else {
                self.numbers()
            };
            out.push(Event::Send(pdu::data_in(
                itt,
                data_sn,
                offset as u32,
                data[offset..end].to_vec(),
                last,
                last.then_some((scsi::GOOD, residual)),
                n,
            )));
            offset = end;
            data_sn += 1;
        }
        out
    }

    /// Task management: returns the response code (0 complete, 1 no such task, 5 not supported).
    fn task_management(&mut self, p: &Pdu) -> u8 {
        let function = p.flags() & 0x7F;
        match function {
            // ABORT TASK (RFC 7143 11.5.1)
            1 => {
                let rtt = p.u32_at(20);
                let found =
                    self.collecting.remove(&rtt).is_some() | self.running.remove(&rtt).is_some();
                if found {
                    return 0;
                }
                // Not here: a command whose CmdSN is still to come (in the window, before this
                // request's own) counts as received and aborted, "function complete"; one that
                // completed already (its CmdSN behind the window) "task does not exist".
                let ref_sn = p.u32_at(32);
                let pending = ref_sn.wrapping_sub(self.exp_cmd_sn) < CMD_WINDOW;
                let before = (p.cmd_sn().wrapping_sub(ref_sn) as i32) > 0;
                if pending && before {
                    0
                } else {
                    1
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LUN RESET, TARGET WARM/COLD RESET
            2 | 3 | 5 | 6 | 7 => {
                self.collecting.clear();
                self.running.clear();
                0
            }
            _ => 5,
        }
    }

    fn text(&mut self, p: &Pdu) -> Vec<Event> {
        let keys = match pdu::parse_text(&p.data) {
            Ok(k) => k,
            Err(_) => return vec![self.reject(reject::PROTOCOL_ERROR, p)],
        };
        let mut answer = Vec::new();
        for (k, v) in keys {
            if k == "SendTargets" {
                for (name, addr) in &self.targets {
                    if v == "All" || v == *name || v.is_empty() {
                        answer.push(("TargetName".to_string(), name.clone()));
                        answer.push(("TargetAddress".to_string(), addr.clone()));
                    }
                }
            } else {
                answer.push((k, "NotUnderstood".to_string()));
            }
        }
        let n = self.status_numbers();
        let mut r = Pdu::new(op::TEXT_RESPONSE);
        r.set_u64(8, p.lun())
            .set_u32(16, p.itt())
            .set_u32(20, NO_TAG);
        vec![Event::Send(
            r.numbered(n).with_data(pdu::encode_text(&answer)),
        )]
    }

    /// Tasks in flight (for the shell's bookkeeping and tests).
    pub fn tasks(&self) -> usize {
        self.collecting.len() + self.running.len()
    }
}

#[cfg(test)]
mod tests;
