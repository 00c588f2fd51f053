//! The full feature phase of one connection as a state machine: request PDUs in, response PDUs and SCSI
//! work out. The shell runs the SCSI commands it is handed (they touch the disk) and feeds their
//! [`scsi::Reply`](super::scsi::Reply) back; nothing here blocks or reads a clock.
//!
//! - Command numbering: non-immediate commands advance ExpCmdSN; every response carries StatSN, ExpCmdSN
//!   and MaxCmdSN. The window MaxCmdSN - ExpCmdSN + 1 is what is left of `max_outstanding`
//!   ([`Session::with_window`]) once the commands still outstanding are counted, and MaxCmdSN never goes
//!   back (an initiator ignores one that does, RFC 7143 4.2.2.1), so an initiator that keeps to it never
//!   has more than `max_outstanding` commands here. A command outside the window is dropped, not
//!   buffered (RFC 7143 4.2.2.1), and counted ([`Ran::dropped`]); one immediate command may be
//!   outstanding beside the window (the RFC's minimum), a further one is rejected ("too many immediate
//!   commands").
//! - What a write may make the target hold: its immediate and unsolicited data (FirstBurstLength at
//!   most, so `max_outstanding` × FirstBurstLength for all of them), and what the target asked for
//!   with R2Ts, which it asks only while the session's writes hold less than [`SOLICITED_MAX`]; a write
//!   beyond that waits for its R2Ts until another one runs. A buffer grows with what was allowed, never
//!   to the expected length up front.
//! - Liveness ([`Session::with_liveness`]): after `idle` without a PDU the shell calls
//!   [`Session::quiet`], which answers with a NOP-In ping (a Target Transfer Tag of its own, so the
//!   initiator must answer, RFC 7143 11.19); anything from the initiator within `answer_within` shows it
//!   is there, and silence after that makes `quiet` say [`Quiet::Dead`].
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
//!
//! Long because command numbering, data accounting and liveness are one state machine over one
//! `Session`'s fields; only the tests live in their own file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::login::Params;
use super::pdu::{self, op, reject, Numbers, Pdu, NO_TAG};
use super::scsi;

/// Commands the initiator may have outstanding unless [`Session::with_window`] says otherwise.
pub const CMD_WINDOW: u32 = 64;

/// The largest window: serial number arithmetic (RFC 1982) compares numbers less than 2^31 apart.
pub const MAX_WINDOW: u32 = 1 << 30;

/// Immediate commands outstanding at once beside the window (RFC 7143 3.2.2.1: at least one).
const IMMEDIATE_TASKS: u32 = 1;

/// Bytes asked for with R2Ts that a session's writes may hold at once: two of the largest transfer, so a
/// lone write of any size proceeds and many smaller ones proceed side by side.
pub const SOLICITED_MAX: u64 = 2 * MAX_DATA_OUT as u64;

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
    /// Sent as an immediate command (outside the CmdSN window).
    immediate: bool,
}

impl Collecting {
    /// Bytes this write asked for with R2Ts (beyond its immediate and unsolicited data).
    fn solicited(&self) -> u64 {
        u64::from(self.requested - self.unsolicited)
    }

    /// Room for what the initiator is now allowed to send, and no more.
    fn make_room(&mut self) {
        let want = self.requested as usize;
        if want > self.buf.capacity() {
            self.buf.reserve_exact(want - self.buf.len());
        }
    }

    /// Puts `data` at `offset` of the buffer (within what was allowed).
    fn put(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if offset == self.buf.len() {
            self.buf.extend_from_slice(data);
            return;
        }
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[offset..end].copy_from_slice(data);
    }
}

/// A command waiting for its reply.
#[derive(Debug)]
struct Running {
    /// Bytes the initiator expects back (reads).
    expected_in: u32,
    write: bool,
    /// For writes: the expected length minus what the command moves (reported as residual).
    residual_out: i64,
    immediate: bool,
}

/// What [`Session::quiet`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Send this NOP-In ping, then wait [`Session::patience`] for the initiator.
    Ping(Pdu),
    /// The ping went unanswered: close the connection.
    Dead,
    /// Nothing to do yet (no liveness check, or woken before the ping's time ran out).
    Wait,
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
    /// Commands the window allows outstanding (`max_outstanding`).
    window: u32,
    /// The highest MaxCmdSN told to the initiator.
    max_cmd_sn: u32,
    /// Tasks of non-immediate and of immediate commands (in `collecting` or `running`).
    held: u32,
    held_immediate: u32,
    /// Bytes the collecting writes asked for with R2Ts: [`Collecting::solicited`] summed.
    solicited: u64,
    /// A write was held back for want of room under [`SOLICITED_MAX`] (so there is someone to ask when
    /// room is given back).
    starved: bool,
    /// PDUs dropped for being outside the window, since [`Session::run`] last reported them.
    dropped: u64,
    /// How long the initiator may be silent before it is pinged (`None`: never), and how long it then
    /// has to answer.
    idle: Option<Duration>,
    answer_within: Duration,
    /// The ping out and unanswered: its Target Transfer Tag and when it was sent.
    ping: Option<(u32, Instant)>,
}

/// Whether serial number `a` is after `b` (RFC 1982).
fn serial_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What [`Session::run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ran {
    /// SCSI commands executed.
    pub commands: u64,
    /// False once the session has ended (logout, or a protocol error that closes the connection).
    pub open: bool,
    /// PDUs dropped for a CmdSN outside the window (since the last `run`).
    pub dropped: u64,
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
            window: CMD_WINDOW,
            max_cmd_sn: exp_cmd_sn.wrapping_add(CMD_WINDOW - 1),
            held: 0,
            held_immediate: 0,
            solicited: 0,
            starved: false,
            dropped: 0,
            idle: None,
            answer_within: Duration::ZERO,
            ping: None,
        }
    }

    /// At most `max_outstanding` commands at once (the login told the initiator the same window).
    pub fn with_window(mut self, max_outstanding: u32) -> Session {
        self.window = max_outstanding.clamp(1, MAX_WINDOW);
        self.max_cmd_sn = self.exp_cmd_sn.wrapping_add(self.window - 1);
        self
    }

    /// Pings the initiator after `idle` without a PDU (`None`: never) and gives it `answer_within`.
    pub fn with_liveness(mut self, idle: Option<Duration>, answer_within: Duration) -> Session {
        self.idle = idle;
        self.answer_within = answer_within;
        self
    }

    /// How long the shell may wait for the next PDU before it calls [`Session::quiet`]; `None`: as long
    /// as it takes.
    pub fn patience(&self) -> Option<Duration> {
        match self.ping {
            Some(_) => Some(self.answer_within),
            None => self.idle,
        }
    }

    /// The initiator has said nothing for [`Session::patience`], at `now`: ping it, or give it up if it
    /// left the last ping unanswered.
    pub fn quiet(&mut self, now: Instant) -> Quiet {
        match self.ping {
            None if self.idle.is_some() => {
                let ttt = self.take_ttt();
                self.ping = Some((ttt, now));
                // StatSN does not advance: a ping carries no status (RFC 7143 11.19).
                let n = self.numbers();
                Quiet::Ping(pdu::nop_in(0, NO_TAG, ttt, Vec::new(), n))
            }
            None => Quiet::Wait,
            Some((_, sent)) if now.saturating_duration_since(sent) >= self.answer_within => {
                Quiet::Dead
            }
            Some(_) => Quiet::Wait,
        }
    }

    /// A Target Transfer Tag not in use (never the reserved 0xffffffff, never 0).
    fn take_ttt(&mut self) -> u32 {
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
        if self.next_ttt == NO_TAG {
            self.next_ttt = 1;
        }
        ttt
    }

    /// What a discovery session's SendTargets answers with.
    pub fn set_targets(&mut self, targets: Vec<(String, String)>) {
        self.targets = targets;
    }

    /// The numbers a response carries. MaxCmdSN opens as far as the tasks outstanding allow, and never
    /// closes below what the initiator was told.
    fn numbers(&mut self) -> Numbers {
        let free = self.window.saturating_sub(self.held);
        let max = self.exp_cmd_sn.wrapping_add(free).wrapping_sub(1);
        if serial_after(max, self.max_cmd_sn) {
            self.max_cmd_sn = max;
        }
        Numbers {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
        }
    }

    /// Numbers for a response that carries a status: StatSN advances.
    fn status_numbers(&mut self) -> Numbers {
        let n = self.numbers();
        self.stat_sn = self.stat_sn.wrapping_add(1);
        n
    }

    /// Counts a command in: non-immediate commands advance ExpCmdSN. Returns false for a CmdSN outside
    /// the window, ExpCmdSN to MaxCmdSN (the PDU is then dropped, as RFC 7143 4.2.2.1 says, and counted).
    fn admit(&mut self, p: &Pdu) -> bool {
        let sn = p.cmd_sn();
        if p.immediate() {
            return true;
        }
        let ahead = sn.wrapping_sub(self.exp_cmd_sn);
        let open = self
            .max_cmd_sn
            .wrapping_sub(self.exp_cmd_sn)
            .wrapping_add(1);
        if ahead >= open {
            self.dropped += 1;
            return false;
        }
        if ahead == 0 {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        }
        true
    }

    fn reject(&mut self, reason: u8, p: &Pdu) -> Event {
        Event::Send(pdu::reject(reason, &p.bhs, self.numbers()))
    }

    /// Handles one PDU from the initiator.
    pub fn on_pdu(&mut self, p: &Pdu) -> Vec<Event> {
        // Any PDU shows the initiator is there: an unanswered ping is forgiven (its answer, when it
        // comes, is a NOP-Out like any other that asks for nothing).
        self.ping = None;
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
                let mut out = vec![Event::Send(pdu::task_response(p.itt(), response, n))];
                // Aborted writes may have left room for the R2Ts of others.
                self.solicit_waiting(&mut out);
                out
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
        let immediate = p.immediate();
        if immediate {
            if self.held_immediate >= IMMEDIATE_TASKS {
                return vec![self.reject(reject::IMMEDIATE_COMMAND_REJECT, p)];
            }
        } else if self.held >= self.window {
            // Only an initiator that sends CmdSNs out of order gets here (in order, the window is
            // closed first): dropped like a command outside the window.
            self.dropped += 1;
            return Vec::new();
        }
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
            self.hold(immediate);
            self.running.insert(
                itt,
                Running {
                    expected_in: if read { expected } else { 0 },
                    write: owed > 0,
                    residual_out: -i64::from(owed),
                    immediate,
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
            buf: Vec::new(),
            received: imm,
            requested: 0,
            unsolicited: 0,
            unsolicited_sn: 0,
            next_r2t_sn: 0,
            outstanding: BTreeMap::new(),
            broken: false,
            immediate,
        };
        // Without InitialR2T the initiator may send up to FirstBurstLength unsolicited.
        c.requested = if self.params.initial_r2t {
            imm
        } else {
            expected.min(self.params.first_burst).max(imm)
        };
        c.unsolicited = c.requested;
        c.make_room();
        c.buf.extend_from_slice(&p.data);
        self.hold(immediate);
        self.collecting.insert(itt, c);
        self.advance_write(itt)
    }

    /// Counts a new task.
    fn hold(&mut self, immediate: bool) {
        if immediate {
            self.held_immediate += 1;
        } else {
            self.held += 1;
        }
    }

    /// Counts a task out.
    fn release(&mut self, immediate: bool) {
        if immediate {
            self.held_immediate -= 1;
        } else {
            self.held -= 1;
        }
    }

    /// Removes a write that is collecting its data; what it held is given back.
    fn take_collecting(&mut self, itt: u32) -> Option<Collecting> {
        let c = self.collecting.remove(&itt)?;
        self.solicited -= c.solicited();
        self.release(c.immediate);
        Some(c)
    }

    fn take_running(&mut self, itt: u32) -> Option<Running> {
        let r = self.running.remove(&itt)?;
        self.release(r.immediate);
        Some(r)
    }

    /// R2Ts for writes that waited for room (in the order of their tags).
    fn solicit_waiting(&mut self, out: &mut Vec<Event>) {
        if !self.starved {
            return;
        }
        self.starved = false;
        // Those that would ask now: not broken, more to ask for, and not still owed unsolicited data
        // (as in `advance_write`).
        let waiting: Vec<u32> = self
            .collecting
            .iter()
            .filter(|(_, c)| {
                c.requested < c.expected
                    && !c.broken
                    && (c.received >= c.requested || !c.outstanding.is_empty())
            })
            .map(|(itt, _)| *itt)
            .collect();
        for itt in waiting {
            if self.solicited >= SOLICITED_MAX {
                self.starved = true;
                break;
            }
            self.request_more(itt, out);
        }
    }

    /// Sends R2Ts for a write while it may, or runs it once its data is complete.
    fn advance_write(&mut self, itt: u32) -> Vec<Event> {
        let mut out = Vec::new();
        let Some(c) = self.collecting.get(&itt) else {
            return out;
        };
        if c.received >= c.expected && c.outstanding.is_empty() {
            let mut c = self.take_collecting(itt).unwrap_or_else(|| unreachable!());
            // Counted again as running: the task is still outstanding until its reply goes out.
            self.hold(c.immediate);
            self.running.insert(
                itt,
                Running {
                    expected_in: 0,
                    write: true,
                    residual_out: i64::from(c.wire_expected)
                        - i64::from(scsi::data_out_len(&c.cdb)),
                    immediate: c.immediate,
                },
            );
            c.buf.resize(c.expected as usize, 0);
            out.push(Event::Execute {
                itt,
                lun: c.lun,
                cdb: c.cdb,
                data_out: c.buf,
            });
            // What it held is free for writes that waited.
            self.solicit_waiting(&mut out);
            return out;
        }
        // Unsolicited data still to come: wait for it before asking for more.
        if c.received < c.requested && c.outstanding.is_empty() {
            return out;
        }
        self.request_more(itt, &mut out);
        out
    }

    /// R2Ts for the write `itt`, as many as MaxOutstandingR2T and the room for solicited data allow.
    fn request_more(&mut self, itt: u32, out: &mut Vec<Event>) {
        let (max_burst, max_r2t) = (self.params.max_burst, self.params.max_outstanding_r2t);
        loop {
            let Some(c) = self.collecting.get(&itt) else {
                return;
            };
            if c.requested >= c.expected || c.outstanding.len() as u32 >= max_r2t {
                return;
            }
            let len = (c.expected - c.requested).min(max_burst);
            // A write alone may always go on; others wait while the session holds enough.
            if self.solicited > 0 && self.solicited + u64::from(len) > SOLICITED_MAX {
                self.starved = true;
                return;
            }
            let ttt = self.take_ttt();
            let n = self.numbers();
            let c = self
                .collecting
                .get_mut(&itt)
                .unwrap_or_else(|| unreachable!());
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
            c.make_room();
            self.solicited += u64::from(len);
        }
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
                self.take_collecting(itt);
                let n = self.status_numbers();
                let sense = scsi::Sense::PROTOCOL_SERVICE_CRC.fixed();
                let mut out = vec![Event::Send(pdu::scsi_response(
                    itt,
                    scsi::CHECK_CONDITION,
                    Some(&sense),
                    0,
                    n,
                ))];
                self.solicit_waiting(&mut out);
                return out;
            }
            return Vec::new();
        }
        c.put(offset as usize, &p.data);
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
            dropped: std::mem::take(&mut self.dropped),
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
        let Some(r) = self.take_running(itt) else {
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
                let found = self.take_collecting(rtt).is_some() | self.take_running(rtt).is_some();
                if found {
                    return 0;
                }
                // Not here: a command whose CmdSN is still to come (in the window, before this
                // request's own) counts as received and aborted, "function complete"; one that
                // completed already (its CmdSN behind the window) "task does not exist".
                let ref_sn = p.u32_at(32);
                let pending = ref_sn.wrapping_sub(self.exp_cmd_sn)
                    < self
                        .max_cmd_sn
                        .wrapping_sub(self.exp_cmd_sn)
                        .wrapping_add(1);
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
                (self.held, self.held_immediate, self.solicited) = (0, 0, 0);
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
