//! Login negotiation (RFC 7143 sections 6 and 13) as a state machine: a Login Request PDU in, a Login
//! Response PDU out, no socket and no clock (randomness for CHAP challenges is passed in).
//!
//! - Security stage: `AuthMethod` is `CHAP` when the target has a secret for the slot, else `None`. CHAP
//!   uses MD5 (`CHAP_A=5`), a fresh identifier and 16-byte challenge; with mutual CHAP the initiator's own
//!   challenge is answered with the target's secret.
//! - Operational stage: the keys iPXE and open-iscsi send, answered by the RFC's rules (minimum, maximum,
//!   AND, OR, declarative). Digests are `None`, one connection per session, ErrorRecoveryLevel 0.
//! - Unknown keys are answered `NotUnderstood`; a key that must not be sent in a stage is an initiator error.
//!
//! A login ends in the full feature phase with the negotiated [`Params`], or with an error status and
//! the connection closed.
//!
//! Long because both login stages' key rules (RFC 7143 section 13, key by key) are answered here; only the
//! tests live in their own file.

use md5::{Digest, Md5};

use super::pdu::{encode_text, op, parse_text, Pdu};

/// Login status classes and details (RFC 7143 11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0x00, 0x00);
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTH_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const FORBIDDEN: (u8, u8) = (0x02, 0x02);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0A);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0B);
    pub const TARGET_ERROR: (u8, u8) = (0x03, 0x00);
    pub const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
}

/// The most login text one request may carry over all its PDUs. The keys iPXE and open-iscsi send fit
/// in 2 KiB and a CHAP exchange in a few more; a peer that has not authenticated gets no more memory.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// What this target can take (its side of the numeric keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest data segment this target receives (declared to the initiator).
    pub max_recv_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub max_outstanding_r2t: u32,
    /// The CmdSN window Login Responses open (MaxCmdSN - CmdSN + 1): the session's `max_outstanding`,
    /// which the full feature phase then keeps to.
    pub cmd_window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recv_data_segment: 262_144,
            max_burst: 16 * 1024 * 1024,
            first_burst: 262_144,
            max_outstanding_r2t: 16,
            cmd_window: super::session::CMD_WINDOW,
        }
    }
}

/// The session's operational parameters after negotiation (RFC defaults until then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Largest data segment the initiator receives: Data-In PDUs are cut to this.
    pub initiator_max_recv: u32,
    /// Largest data segment the target receives.
    pub target_max_recv: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            initiator_max_recv: 8192,
            target_max_recv: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// CHAP secrets of a target (per slot, from the credentials file).
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    /// The name and secret the initiator must prove it knows.
    pub user: String,
    pub secret: String,
    /// With mutual CHAP: the name and secret the target answers the initiator's challenge with.
    pub mutual: Option<(String, String)>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// Why a login to a target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    Forbidden,
}

/// The session layer's answer to "may this initiator log in to this target, and with which secret?".
pub trait Targets {
    /// `Ok(None)`: no authentication; `Ok(Some(chap))`: CHAP with these secrets.
    fn lookup(&self, target: &str, initiator: &str) -> Result<Option<Chap>, Refusal>;
    /// Whether this initiator has a live session with this ISID and TSIH (a login naming a TSIH adds or
    /// reinstates a connection of it). None by default.
    fn session_exists(&self, _initiator: &str, _isid: [u8; 6], _tsih: u16) -> bool {
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKind {
    Discovery,
    Normal { target: String },
}

/// A login that reached the full feature phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn {
    pub kind: SessionKind,
    pub initiator: String,
    pub isid: [u8; 6],
    /// The TSIH the initiator sent: 0 for a new session (or the reinstatement of one with this ISID).
    pub tsih: u16,
    pub params: Params,
}

/// What to do after a Login Request.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Send this response; the login goes on.
    Continue(Pdu),
    /// Send this response; the connection is in the full feature phase.
    Complete(Pdu, Box<LoggedIn>),
    /// Send this response (an error status), then close the connection.
    Fail(Pdu),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Security,
    Operational,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChapState {
    /// Authentication not started (or not needed).
    Idle,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    Agreed,
    /// Challenge sent.
    Challenged { id: u8, challenge: Vec<u8> },
    /// The initiator proved itself.
    Done,
}

/// One connection's login.
pub struct Login {
    limits: Limits,
    initiator: Option<String>,
    kind: Option<SessionKind>,
    /// Secrets when the target requires CHAP (known once the target name is).
    chap: Option<Chap>,
    chap_state: ChapState,
    params: Params,
    isid: [u8; 6],
    tsih: u16,
    /// Key=value text of a request split over PDUs (the C bit), at most [`MAX_LOGIN_TEXT`] bytes.
    partial: Vec<u8>,
    /// A Login Response has gone out: the login has started.
    answered: bool,
    /// TargetPortalGroupTag goes out once, in the first response of a normal session.
    sent_tpgt: bool,
    stat_sn: u32,
}

/// Reads a Yes/No value.
fn yes(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// MD5(id || secret || challenge), as CHAP computes a response.
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// CHAP binary values (RFC 7143 5.1, 13.1): `0x`/`0X` and hexadecimal digits, or `0b`/`0B` and base64. Anything
/// else (no prefix, an odd number of digits, characters outside the encoding, non-ASCII text) is `None`:
/// the bytes are looked at one by one, never sliced as text.
fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let b = v.as_bytes();
    let (prefix, rest) = (b.get(..2)?, &b[2..]);
    match prefix {
        b"0x" | b"0X" => hex_decode(rest),
        b"0b" | b"0B" => base64_decode(rest),
        _ => None,
    }
}

fn hex_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.is_empty() || s.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    s.chunks_exact(2)
        .map(|p| Some(((digit(p[0])? << 4) | digit(p[1])?) as u8))
        .collect()
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    // At most two '=' of padding, and only at the end; one character alone cannot make a byte.
    let body = s
        .strip_suffix(b"==")
        .or_else(|| s.strip_suffix(b"="))
        .unwrap_or(s);
    if body.is_empty() || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in body {
        acc = ((acc << 6) | val(c)?) & 0xFFFF;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn hex(b: &[u8]) -> String {
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Constant-time comparison (CHAP responses).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Numeric key value (decimal or 0x hex).
fn number(v: &str) -> Option<u64> {
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

impl Login {
    pub fn new(limits: Limits) -> Login {
        Login {
            limits,
            initiator: None,
            kind: None,
            chap: None,
            chap_state: ChapState::Idle,
            params: Params::default(),
            isid: [0; 6],
            tsih: 0,
            partial: Vec::new(),
            answered: false,
            sent_tpgt: false,
            stat_sn: 0,
        }
    }

    fn response(
        &mut self,
        req: &Pdu,
        transit: bool,
        csg: u8,
        nsg: u8,
        st: (u8, u8),
        text: Vec<(String, String)>,
    ) -> Pdu {
        let mut p = Pdu::new(op::LOGIN_RESPONSE);
        p.bhs[1] = (if transit { 0x80 } else { 0 }) | (csg << 2) | if transit { nsg } else { 0 };
        p.bhs[2] = 0; // version-max
        p.bhs[3] = 0; // version-active
        p.bhs[8..14].copy_from_slice(&self.isid);
        p.set_u16(14, self.tsih);
        p.set_u32(16, req.itt());
        // The first response fixes StatSN at the initiator's ExpStatSN; later ones follow it.
        if self.stat_sn == 0 {
            self.stat_sn = req.exp_stat_sn();
        }
        let cmd_sn = req.cmd_sn();
        p.set_u32(24, self.stat_sn).set_u32(28, cmd_sn).set_u32(
            32,
            cmd_sn.wrapping_add(self.limits.cmd_window.clamp(1, super::session::MAX_WINDOW) - 1),
        );
        self.stat_sn = self.stat_sn.wrapping_add(1);
        self.answered = true;
        p.bhs[36] = st.0;
        p.bhs[37] = st.1;
        p.with_data(encode_text(&text))
    }

    fn fail(&mut self, req: &Pdu, st: (u8, u8)) -> Step {
        let csg = (req.flags() >> 2) & 0x03;
        Step::Fail(self.response(req, false, csg, 0, st, Vec::new()))
    }

    /// The StatSN the next response after login carries.
    pub fn next_stat_sn(&self) -> u32 {
        self.stat_sn
    }

    /// Handles one Login Request; `tsih` is what a new session gets, `random` fills CHAP challenges.
    pub fn on_request(
        &mut self,
        req: &Pdu,
        targets: &dyn Targets,
        new_tsih: u16,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Step {
        if req.opcode() != op::LOGIN {
            // Once the login has started, anything else is "invalid during login" (RFC 7143 6.3).
            let st = if self.answered {
                status::INVALID_DURING_LOGIN
            } else {
                status::INITIATOR_ERROR
            };
            return self.fail(req, st);
        }
        let flags = req.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 0x03;
        let nsg = flags & 0x03;
        // Version 0 is the only one there is.
        if req.bhs[3] > 0 {
            return self.fail(req, status::UNSUPPORTED_VERSION);
        }
        self.isid.copy_from_slice(&req.bhs[8..14]);
        self.tsih = req.u16_at(14);
        // Text split over PDUs is held until its last part: bounded, since no one has authenticated yet.
        if self.partial.len() + req.data.len() > MAX_LOGIN_TEXT {
            self.partial = Vec::new();
            return self.fail(req, status::OUT_OF_RESOURCES);
        }
        self.partial.extend_from_slice(&req.data);
        if cont {
            // More text follows: acknowledge with an empty response.
            return Step::Continue(self.response(req, false, csg, 0, status::SUCCESS, Vec::new()));
        }
        let text = std::mem::take(&mut self.partial);
        let Ok(keys) = parse_text(&text) else {
            return self.fail(req, status::INITIATOR_ERROR);
        };
        let stage = match csg {
            0 => Stage::Security,
            1 => Stage::Operational,
            _ => return self.fail(req, status::INITIATOR_ERROR),
        };
        // Skipping the security stage (starting in the operational one) is allowed only where no
        // authentication is required: checked below, once the target is known.
        let mut answer: Vec<(String, String)> = Vec::new();
        for (k, v) in &keys {
            match k.as_str() {
                "InitiatorName" => self.initiator = Some(v.clone()),
                "InitiatorAlias" => {}
                "SessionType" => match v.as_str() {
                    "Discovery" => self.kind = Some(SessionKind::Discovery),
                    "Normal" => {}
                    _ => return self.fail(req, status::INITIATOR_ERROR),
                },
                "TargetName" => {
                    self.kind = Some(SessionKind::Normal { target: v.clone() });
                }
                _ => {}
            }
        }
        let Some(initiator) = self.initiator.clone() else {
            return self.fail(req, status::MISSING_PARAMETER);
        };
        let kind = match self.kind.clone() {
            Some(k) => k,
            // A normal session must name its target.
            None => return self.fail(req, status::MISSING_PARAMETER),
        };
        if let SessionKind::Normal { target } = &kind {
            if self.chap.is_none() && self.chap_state == ChapState::Idle {
                match targets.lookup(target, &initiator) {
                    Ok(c) => self.chap = c,
                    Err(Refusal::NotFound) => return self.fail(req, status::NOT_FOUND),
                    Err(Refusal::Forbidden) => return self.fail(req, status::FORBIDDEN),
                }
            }
            if !self.sent_tpgt {
                self.sent_tpgt = true;
                answer.push(("TargetPortalGroupTag".into(), "1".into()));
            }
        }
        // A leading login naming a TSIH the target never gave out (or whose session has ended) names no
        // session (RFC 7143 11.13.5); the initiator then starts a new one with TSIH 0.
        if !self.answered
            && self.tsih != 0
            && !targets.session_exists(&initiator, self.isid, self.tsih)
        {
            return self.fail(req, status::SESSION_DOES_NOT_EXIST);
        }
        let needs_chap = self.chap.is_some();
        if stage == Stage::Operational && needs_chap && self.chap_state != ChapState::Done {
            return self.fail(req, status::AUTH_FAILURE);
        }
        let mut chap_reply: Vec<(String, String)> = Vec::new();
        let mut chap_fields: std::collections::BTreeMap<&str, &str> = Default::default();
        for (k, v) in &keys {
            match k.as_str() {
                "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" => {}
                "AuthMethod" => {
                    if stage != Stage::Security {
                        return self.fail(req, status::INITIATOR_ERROR);
                    }
                    let offered: Vec<&str> = v.split(',').collect();
                    let pick = if needs_chap { "CHAP" } else { "None" };
                    if !offered.contains(&pick) {
                        return self.fail(req, status::AUTH_FAILURE);
                    }
                    if needs_chap {
                        self.chap_state = ChapState::Agreed;
                    }
                    answer.push((k.clone(), pick.into()));
                }
                "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                    if stage != Stage::Security || !needs_chap {
                        return self.fail(req, status::INITIATOR_ERROR);
                    }
                    chap_fields.insert(k.as_str(), v.as_str());
                }
                "HeaderDigest" | "DataDigest" => {
                    if !v.split(',').any(|d| d == "None") {
                        return self.fail(req, status::INITIATOR_ERROR);
                    }
                    answer.push((k.clone(), "None".into()));
                }
                "MaxConnections" => answer.push((k.clone(), "1".into())),
                "ErrorRecoveryLevel" => answer.push((k.clone(), "0".into())),
                "InitialR2T" => {
                    // OR: the initiator may insist; this target is happy either way.
                    let Some(b) = yes(v) else {
                        return self.fail(req, status::INITIATOR_ERROR);
                    };
                    self.params.initial_r2t = b;
                    answer.push((k.clone(), yes_no(b)));
                }
                "ImmediateData" => {
                    let Some(b) = yes(v) else {
                        return self.fail(req, status::INITIATOR_ERROR);
                    };
                    self.params.immediate_data = b;
                    answer.push((k.clone(), yes_no(b)));
                }
                "DataPDUInOrder" | "DataSequenceInOrder" => {
                    // OR with this target's Yes: Yes.
                    answer.push((k.clone(), "Yes".into()));
                }
                "IFMarker" | "OFMarker" => answer.push((k.clone(), "No".into())),
                "MaxRecvDataSegmentLength" => {
                    // Declarative: what the initiator can receive. 512 .. 2^24-1.
                    let Some(n) = number(v).filter(|n| (512..=16_777_215).contains(n)) else {
                        return self.fail(req, status::INITIATOR_ERROR);
                    };
                    self.params.initiator_max_recv = n as u32;
                }
                "MaxBurstLength" | "FirstBurstLength" => {
                    let Some(n) = number(v).filter(|n| (512..=16_777_215).contains(n)) else {
                        return self.fail(req, status::INITIATOR_ERROR);
                    };
                    let n = n as u32;
                    if k == "MaxBurstLength" {
                        self.params.max_burst = n.min(self.limits.max_burst);
                        answer.push((k.clone(), self.params.max_burst.to_string()));
                    } else {
                        self.params.first_burst = n.min(self.limits.first_burst);
                        answer.push((k.clone(), self.params.first_burst.to_string()));
                    }
                }
                "MaxOutstandingR2T" => {
                    let Some(n) = number(v).filter(|n| (1..=65_535).contains(n)) else {
                        return self.fail(req, status::INITIATOR_ERROR);
                    };
                    self.params.max_outstanding_r2t =
                        (n as u32).min(self.limits.max_outstanding_r2t);
                    answer.push((k.clone(), self.params.max_outstanding_r2t.to_string()));
                }
                "DefaultTime2Wait" => {
                    let n = number(v).unwrap_or(2).min(3600) as u32;
                    self.params.default_time2wait = n.max(2);
                    answer.push((k.clone(), self.params.default_time2wait.to_string()));
                }
                "DefaultTime2Retain" => {
                    let n = number(v).unwrap_or(0).min(3600) as u32;
                    self.params.default_time2retain = n.min(20);
                    answer.push((k.clone(), self.params.default_time2retain.to_string()));
                }
                _ => answer.push((k.clone(), "NotUnderstood".into())),
            }
        }
        // FirstBurstLength may not exceed MaxBurstLength.
        self.params.first_burst = self.params.first_burst.min(self.params.max_burst);
        if !chap_fields.is_empty() {
            match self.chap_step(&chap_fields, random) {
                Ok(reply) => chap_reply = reply,
                Err(st) => return self.fail(req, st),
            }
        }
        answer.extend(chap_reply);
        // MaxRecvDataSegmentLength is declared by each side: say ours once, in the operational stage.
        if stage == Stage::Operational
            && !answer.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength")
        {
            answer.push((
                "MaxRecvDataSegmentLength".into(),
                self.limits.max_recv_data_segment.to_string(),
            ));
            self.params.target_max_recv = self.limits.max_recv_data_segment;
        }
        // Transitions: out of security only once authenticated (or with none needed).
        let may_leave_security = !needs_chap || self.chap_state == ChapState::Done;
        if transit && stage == Stage::Security && !may_leave_security {
            // Not yet: stay, the exchange goes on.
            return Step::Continue(self.response(req, false, 0, 0, status::SUCCESS, answer));
        }
        if transit {
            if nsg == 3 {
                if self.tsih == 0 {
                    self.tsih = new_tsih;
                }
                let logged = LoggedIn {
                    kind,
                    initiator,
                    isid: self.isid,
                    tsih: req.u16_at(14),
                    params: self.params,
                };
                let resp = self.response(req, true, csg, 3, status::SUCCESS, answer);
                return Step::Complete(resp, Box::new(logged));
            }
            if nsg == 1 && stage == Stage::Security {
                return Step::Continue(self.response(req, true, csg, 1, status::SUCCESS, answer));
            }
            return self.fail(req, status::INITIATOR_ERROR);
        }
        Step::Continue(self.response(req, false, csg, 0, status::SUCCESS, answer))
    }

    /// One CHAP exchange step; returns the keys to answer with.
    fn chap_step(
        &mut self,
        fields: &std::collections::BTreeMap<&str, &str>,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Vec<(String, String)>, (u8, u8)> {
        let chap = self.chap.clone().ok_or(status::AUTH_FAILURE)?;
        match (&self.chap_state, fields.get("CHAP_A")) {
            (ChapState::Agreed, Some(algs)) => {
                if !algs.split(',').any(|a| a == "5") {
                    return Err(status::AUTH_FAILURE);
                }
                let mut buf = [0u8; 17];
                random(&mut buf);
                let id = buf[0];
                let challenge = buf[1..].to_vec();
                let reply = vec![
                    ("CHAP_A".to_string(), "5".to_string()),
                    ("CHAP_I".to_string(), id.to_string()),
                    ("CHAP_C".to_string(), hex(&challenge)),
                ];
                self.chap_state = ChapState::Challenged { id, challenge };
                Ok(reply)
            }
            (ChapState::Challenged { id, challenge }, None) => {
                let (Some(name), Some(resp)) = (fields.get("CHAP_N"), fields.get("CHAP_R")) else {
                    return Err(status::AUTH_FAILURE);
                };
                let resp = decode_binary(resp).ok_or(status::AUTH_FAILURE)?;
                let want = chap_response(*id, chap.secret.as_bytes(), challenge);
                if *name != chap.user || !same(&resp, &want) {
                    return Err(status::AUTH_FAILURE);
                }
                let mut reply = Vec::new();
                // Mutual CHAP: the initiator challenges the target in the same PDU.
                match (fields.get("CHAP_I"), fields.get("CHAP_C"), &chap.mutual) {
                    (Some(i), Some(c), Some((tuser, tsecret))) => {
                        let i: u8 = i.parse().map_err(|_| status::AUTH_FAILURE)?;
                        let c = decode_binary(c).ok_or(status::AUTH_FAILURE)?;
                        // A reflected challenge would let the initiator get our answer to its own.
                        if same(&c, challenge) {
                            return Err(status::AUTH_FAILURE);
                        }
                        let r = chap_response(i, tsecret.as_bytes(), &c);
                        reply.push(("CHAP_N".to_string(), tuser.clone()));
                        reply.push(("CHAP_R".to_string(), hex(&r)));
                    }
                    (None, None, _) => {}
                    // A challenge this target has no secret to answer, or half a challenge.
                    _ => return Err(status::AUTH_FAILURE),
                }
                self.chap_state = ChapState::Done;
                Ok(reply)
            }
            _ => Err(status::AUTH_FAILURE),
        }
    }
}

#[cfg(test)]
mod tests;
