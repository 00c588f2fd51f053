//! TFTP protocol core, sans IO: packet parsing and encoding (RFC 1350), option negotiation (RFC 2347
//! blksize/tsize/timeout RFC 2348/2349, windowsize RFC 7440) and the read-transfer state machine. Bytes and
//! `now` go in, packets to send and the next deadline come out; the tokio shell owns sockets and clocks.
//!
//! Bounds on what one client may hold: the session table's caps (the shell's [`crate::conn::Gate`],
//! refused with [`busy`]), the `timeout` option capped by [`Limits::max_timeout`], and a silent client's
//! session abandoned after [`Transfer::silence_limit`].

use std::time::{Duration, Instant};

/// TFTP error codes (RFC 1350, 2347).
pub mod code {
    pub const NOT_DEFINED: u16 = 0;
    pub const FILE_NOT_FOUND: u16 = 1;
    pub const ACCESS_VIOLATION: u16 = 2;
    pub const ILLEGAL_OPERATION: u16 = 4;
    pub const UNKNOWN_TID: u16 = 5;
    pub const OPTION_REFUSED: u16 = 8;
}

/// A TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq {
        filename: String,
        mode: String,
        options: Vec<(String, String)>,
    },
    Wrq {
        filename: String,
        mode: String,
    },
    Data {
        block: u16,
        data: Vec<u8>,
    },
    Ack {
        block: u16,
    },
    Error {
        code: u16,
        message: String,
    },
    Oack {
        options: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Short,
    Opcode(u16),
    Unterminated,
    NotText,
}

fn strings(b: &[u8]) -> Result<Vec<String>, ParseError> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    if *b.last().unwrap() != 0 {
        return Err(ParseError::Unterminated);
    }
    b[..b.len() - 1]
        .split(|c| *c == 0)
        .map(|s| String::from_utf8(s.to_vec()).map_err(|_| ParseError::NotText))
        .collect()
}

fn pairs(v: &[String]) -> Vec<(String, String)> {
    v.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_ascii_lowercase(), c[1].clone()))
        .collect()
}

impl Packet {
    pub fn parse(b: &[u8]) -> Result<Packet, ParseError> {
        if b.len() < 4 {
            return Err(ParseError::Short);
        }
        let op = u16::from_be_bytes([b[0], b[1]]);
        let num = u16::from_be_bytes([b[2], b[3]]);
        match op {
            1 | 2 => {
                let s = strings(&b[2..])?;
                if s.len() < 2 || s[0].is_empty() {
                    return Err(ParseError::Short);
                }
                let (filename, mode) = (s[0].clone(), s[1].to_ascii_lowercase());
                if op == 1 {
                    Ok(Packet::Rrq {
                        filename,
                        mode,
                        options: pairs(&s[2..]),
                    })
                } else {
                    Ok(Packet::Wrq { filename, mode })
                }
            }
            3 => Ok(Packet::Data {
                block: num,
                data: b[4..].to_vec(),
            }),
            4 => Ok(Packet::Ack { block: num }),
            5 => {
                let msg = strings(&b[4..]).unwrap_or_default();
                Ok(Packet::Error {
                    code: num,
                    message: msg.first().cloned().unwrap_or_default(),
                })
            }
            6 => {
                // An OACK acknowledges at least one option (RFC 2347); one without any would not
                // survive encoding (2 bytes, shorter than any packet).
                let options = pairs(&strings(&b[2..])?);
                if options.is_empty() {
                    return Err(ParseError::Short);
                }
                Ok(Packet::Oack { options })
            }
            other => Err(ParseError::Opcode(other)),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let text = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        match self {
            Packet::Rrq {
                filename,
                mode,
                options,
            } => {
                out.extend_from_slice(&1u16.to_be_bytes());
                text(&mut out, filename);
                text(&mut out, mode);
                for (k, v) in options {
                    text(&mut out, k);
                    text(&mut out, v);
                }
            }
            Packet::Wrq { filename, mode } => {
                out.extend_from_slice(&2u16.to_be_bytes());
                text(&mut out, filename);
                text(&mut out, mode);
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&3u16.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&5u16.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                text(&mut out, message);
            }
            Packet::Oack { options } => {
                out.extend_from_slice(&6u16.to_be_bytes());
                for (k, v) in options {
                    text(&mut out, k);
                    text(&mut out, v);
                }
            }
        }
        out
    }
}

/// An ERROR packet's bytes.
pub fn error(code: u16, message: &str) -> Vec<u8> {
    Packet::Error {
        code,
        message: message.to_string(),
    }
    .encode()
}

/// Server limits for negotiation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Retransmission timeout when the client asks for none, seconds.
    pub timeout: u8,
    /// Retransmissions before a transfer is abandoned.
    pub retries: u8,
    /// The longest `timeout` a client may ask for, seconds (RFC 2349 allows 255).
    pub max_timeout: u8,
}

impl Limits {
    /// The server's own timeout when the client asks for none, never above `max_timeout`.
    fn default_timeout(&self) -> u8 {
        self.timeout.min(self.max_timeout).max(1)
    }
}

/// What was agreed for one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: usize,
    pub windowsize: u16,
    pub timeout: Duration,
    /// Options to acknowledge with an OACK (empty: start with DATA 1).
    pub oack: Vec<(String, String)>,
    /// The client asked for a `timeout` above `max_timeout`: the option is left out of the OACK and the
    /// transfer runs with `max_timeout`.
    pub timeout_clamped: bool,
}

/// Sets an option's value in an OACK: a repeated option replaces its earlier value, so the OACK never
/// names an option twice, and what it says is what the transfer uses.
fn acknowledge(oack: &mut Vec<(String, String)>, key: &str, value: String) {
    match oack.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = value,
        None => oack.push((key.into(), value)),
    }
}

/// Negotiates the client's options (unknown or malformed ones are ignored, as RFC 2347 allows).
pub fn negotiate(options: &[(String, String)], file_len: u64, lim: &Limits) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: Duration::from_secs(lim.default_timeout() as u64),
        oack: Vec::new(),
        timeout_clamped: false,
    };
    for (k, v) in options {
        match k.as_str() {
            "blksize" => {
                if let Ok(b) = v.parse::<u32>() {
                    if b >= 8 {
                        let b = b.min(lim.max_blksize as u32).min(65464);
                        n.blksize = b as usize;
                        acknowledge(&mut n.oack, "blksize", b.to_string());
                    }
                }
            }
            "tsize" => acknowledge(&mut n.oack, "tsize", file_len.to_string()),
            // RFC 2349: the OACK's timeout "must match the value specified by the client", so a value
            // above our bound cannot be answered lower; it is left out of the OACK (the client then keeps
            // its own timer, as for a server without the option) and our side uses `max_timeout`. That
            // bounds how long a silent client holds a session whatever it asked for.
            "timeout" => {
                if let Ok(t) = v.parse::<u8>() {
                    if t > lim.max_timeout.max(1) {
                        n.timeout = Duration::from_secs(lim.max_timeout.max(1) as u64);
                        n.timeout_clamped = true;
                        // A repeated option: an earlier, acceptable value must not stay acknowledged.
                        n.oack.retain(|(k, _)| k != "timeout");
                    } else if t >= 1 {
                        n.timeout = Duration::from_secs(t as u64);
                        acknowledge(&mut n.oack, "timeout", t.to_string());
                    }
                }
            }
            "windowsize" => {
                if let Ok(w) = v.parse::<u32>() {
                    if w >= 1 {
                        let w = w.min(lim.max_windowsize as u32).min(65535) as u16;
                        n.windowsize = w;
                        acknowledge(&mut n.oack, "windowsize", w.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    n
}

/// The ERROR packet for a request the session table has no room for: code 0 (RFC 1350 has no "busy"
/// code) and a message saying which bound, so a client's log tells the operator what to raise.
pub fn busy(why: crate::conn::Busy) -> Vec<u8> {
    match why {
        crate::conn::Busy::Full => error(code::NOT_DEFINED, "server busy: too many transfers"),
        crate::conn::Busy::PeerFull => error(
            code::NOT_DEFINED,
            "server busy: too many transfers from this address",
        ),
    }
}

/// What the shell should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these packets, then wait for a packet until the deadline.
    Send(Vec<Vec<u8>>, Instant),
    /// Nothing to send; keep waiting until the deadline.
    Wait(Instant),
    /// The transfer completed.
    Done,
    /// The transfer ended without completing (client error, too many retries).
    Failed(String),
}

/// One read transfer. Blocks are numbered from 1 internally without wrapping (u64); on the wire the
/// number is taken modulo 65536, so files larger than 65535 blocks work as tftpd-hpa serves them.
pub struct Transfer {
    data: bytes::Bytes,
    blksize: usize,
    window: u64,
    timeout: Duration,
    retries_left: u8,
    max_retries: u8,
    oack: Option<Vec<u8>>,
    /// Highest block the client acknowledged (0: none).
    acked: u64,
    /// Last block of the file.
    last: u64,
}

impl Transfer {
    pub fn new(data: bytes::Bytes, n: &Negotiated, lim: &Limits) -> Transfer {
        let blksize = n.blksize.max(1);
        let last = data.len() as u64 / blksize as u64 + 1;
        let oack = (!n.oack.is_empty()).then(|| {
            Packet::Oack {
                options: n.oack.clone(),
            }
            .encode()
        });
        Transfer {
            data,
            blksize,
            window: n.windowsize.max(1) as u64,
            timeout: n.timeout,
            retries_left: lim.retries,
            max_retries: lim.retries,
            oack,
            acked: 0,
            last,
        }
    }

    /// The first packets: the OACK, or the first window of data.
    pub fn start(&mut self, now: Instant) -> Step {
        match &self.oack {
            Some(o) => Step::Send(vec![o.clone()], now + self.timeout),
            None => self.send_window(now),
        }
    }

    fn block(&self, n: u64) -> Vec<u8> {
        let start = ((n - 1) as usize)
            .saturating_mul(self.blksize)
            .min(self.data.len());
        let end = start.saturating_add(self.blksize).min(self.data.len());
        let mut out = Vec::with_capacity(4 + end - start);
        out.extend_from_slice(&3u16.to_be_bytes());
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&self.data[start..end]);
        out
    }

    fn send_window(&self, now: Instant) -> Step {
        let from = self.acked + 1;
        let to = (self.acked + self.window).min(self.last);
        Step::Send(
            (from..=to).map(|b| self.block(b)).collect(),
            now + self.timeout,
        )
    }

    /// A packet from the client's TID.
    pub fn on_packet(&mut self, bytes: &[u8], now: Instant, deadline: Instant) -> Step {
        match Packet::parse(bytes) {
            Ok(Packet::Ack { block }) => {
                if self.oack.is_some() {
                    if block == 0 {
                        self.oack = None;
                        self.retries_left = self.max_retries;
                        return self.send_window(now);
                    }
                    return Step::Wait(deadline);
                }
                // Map the 16-bit number onto the blocks in flight: acked ..= acked + window.
                let in_flight = (self.acked..=(self.acked + self.window).min(self.last))
                    .find(|b| (*b as u16) == block);
                match in_flight {
                    Some(b) if b > self.acked => {
                        self.acked = b;
                        self.retries_left = self.max_retries;
                        if self.acked >= self.last {
                            Step::Done
                        } else {
                            // The next window starts after the ACKed block. RFC 7440: an ACK short of the
                            // window's end means the rest was lost, so this also resends from there.
                            self.send_window(now)
                        }
                    }
                    // A duplicate or old ACK: ignore it (answering it would cause Sorcerer's Apprentice).
                    _ => Step::Wait(deadline),
                }
            }
            Ok(Packet::Error { code: c, message }) => {
                Step::Failed(format!("client error {c}: {message}"))
            }
            _ => Step::Wait(deadline),
        }
    }

    /// The deadline passed with no progress.
    pub fn on_timeout(&mut self, now: Instant) -> Step {
        if self.retries_left == 0 {
            return Step::Failed("client stopped answering".into());
        }
        self.retries_left -= 1;
        self.start(now)
    }

    /// The longest a transfer waits for a client that stopped answering before it is abandoned: the
    /// last send and `retries` retransmissions, each given the timeout to be answered. With the timeout
    /// capped by `max_timeout`, at most `max_timeout` × (`retries` + 1).
    pub fn silence_limit(&self) -> Duration {
        self.timeout * (u32::from(self.max_retries) + 1)
    }

    /// Size of the file being sent.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

#[cfg(test)]
mod tests;
