//! The fixed-newstyle handshake as a state machine: the shell feeds it the client's flags and each option
//! (header and payload), and writes out the bytes it returns. It never reads or writes a socket.
//!
//! Which exports exist and who may open them is not decided here: the shell passes an [`Exports`] made
//! for the connecting peer.
//!
//! TLS (NBD_OPT_STARTTLS) is decided here too, not done: with `tls` "optional" the server is in the spec's
//! SELECTIVETLS mode with no TLS-only export (plain clients such as the kernel's in an initramfs are still
//! served), with "required" in FORCEDTLS mode (every option but STARTTLS and ABORT is answered
//! NBD_REP_ERR_TLS_REQD, EXPORT_NAME closes). On STARTTLS the machine answers ACK and returns
//! [`Next::StartTls`]; the shell runs the TLS handshake and reports the export the client's pre-shared key
//! names with [`Handshake::tls_started`]: from then on only that export may be listed, queried or opened.

use std::sync::Arc;

use super::proto::*;
use crate::config::NbdTls;
use crate::disk::Disk;

/// Why an export cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such export.
    Unknown,
    /// It exists, but this client may not open it (logged by the [`Exports`] implementation).
    Policy(String),
    /// It exists and is allowed, but its disk cannot be opened.
    Broken(String),
}

/// The exports one client may see and open.
pub trait Exports {
    /// Names for NBD_OPT_LIST, with a description each.
    fn list(&self) -> Vec<(String, String)>;
    fn open(&self, name: &str) -> Result<Arc<dyn Disk>, Refusal>;
}

/// What the shell does after an option.
pub enum Next {
    /// Read the next option.
    Continue,
    /// The ACK of STARTTLS is in the output: write it, run the TLS handshake on the socket, call
    /// [`Handshake::tls_started`], and read the next option over TLS.
    StartTls,
    /// The handshake is over: serve this export.
    Transmit(Export),
    /// Close the connection (the client aborted, or broke the protocol).
    Close(&'static str),
}

/// An export in transmission: its disk and what was negotiated.
pub struct Export {
    pub name: String,
    pub disk: Arc<dyn Disk>,
    pub flags: u16,
    pub structured: bool,
    /// `base:allocation` was selected: BLOCK_STATUS is allowed.
    pub base_allocation: bool,
}

#[derive(Default)]
pub struct Handshake {
    no_zeroes: bool,
    structured: bool,
    /// The export `base:allocation` was selected for, by SET_META_CONTEXT.
    meta_for: Option<String>,
    /// Whether STARTTLS is offered or demanded.
    mode: NbdTls,
    /// Once TLS is up: the one export the client's key opens.
    tls: Option<String>,
}

/// Transmission flags for a disk.
pub fn transmission_flags(disk: &dyn Disk, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA;
    if disk.read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    // Every connection to a disk shares its files and allocation map, so a flush on one covers writes
    // completed on all of them: what CAN_MULTI_CONN promises.
    if disk.shared_flush() {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

/// An export name and the info requests of an INFO or GO payload.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = be32(data, 0)? as usize;
    let name = std::str::from_utf8(data.get(4..4usize.checked_add(n)?)?).ok()?;
    let count = be16(data, 4 + n)? as usize;
    if data.len() != 4 + n + 2 + 2 * count {
        return None;
    }
    let reqs = (0..count)
        .map(|i| be16(data, 4 + n + 2 + 2 * i))
        .collect::<Option<Vec<_>>>()?;
    Some((name.to_string(), reqs))
}

/// An export name and queries of a LIST/SET_META_CONTEXT payload.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let n = be32(data, 0)? as usize;
    let name = std::str::from_utf8(data.get(4..4usize.checked_add(n)?)?).ok()?;
    let mut at = 4 + n;
    let count = be32(data, at)? as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let l = be32(data, at)? as usize;
        let q = std::str::from_utf8(data.get(at + 4..(at + 4).checked_add(l)?)?).ok()?;
        queries.push(q.to_string());
        at += 4 + l;
    }
    (at == data.len()).then(|| (name.to_string(), queries))
}

impl Handshake {
    /// A handshake without TLS (STARTTLS is answered NBD_REP_ERR_UNSUP).
    pub fn new() -> Handshake {
        Handshake::with_tls(NbdTls::Off)
    }

    pub fn with_tls(mode: NbdTls) -> Handshake {
        Handshake {
            mode,
            ..Handshake::default()
        }
    }

    /// TLS is up and the client's key names `export`. Per the spec nothing negotiated before STARTTLS
    /// survives it (structured replies, meta contexts); the client flags do, they are not an option.
    pub fn tls_started(&mut self, export: String) {
        self.structured = false;
        self.meta_for = None;
        self.tls = Some(export);
    }

    /// Whether TLS is up.
    pub fn secure(&self) -> bool {
        self.tls.is_some()
    }

    /// `exports.open`, narrowed to the key's export once TLS is up.
    fn open(&self, exports: &dyn Exports, name: &str) -> Result<Arc<dyn Disk>, Refusal> {
        match &self.tls {
            Some(only) if only != name => {
                Err(Refusal::Policy(format!("this TLS key opens only {only}")))
            }
            _ => exports.open(name),
        }
    }

    /// The client's 32-bit flags, right after the greeting.
    pub fn client_flags(&mut self, flags: u32) -> Result<(), &'static str> {
        if flags & CLIENT_FIXED_NEWSTYLE == 0 {
            return Err("client does not speak fixed newstyle");
        }
        if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err("client sent unknown flags");
        }
        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        Ok(())
    }

    /// An option whose payload was too long to read: the shell skipped the payload.
    pub fn oversized(&mut self, h: OptionHeader, out: &mut Vec<u8>) -> Next {
        if h.option == OPT_EXPORT_NAME {
            return Next::Close("export name too long");
        }
        option_reply(out, h.option, REP_ERR_TOO_BIG, b"option payload too long");
        Next::Continue
    }

    /// One option and its payload.
    pub fn option(
        &mut self,
        h: OptionHeader,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Next {
        let opt = h.option;
        if self.mode == NbdTls::Required && self.tls.is_none() {
            match opt {
                OPT_STARTTLS | OPT_ABORT => {}
                // No error reply exists for EXPORT_NAME: the session ends.
                OPT_EXPORT_NAME => return Next::Close("export name before TLS, which is required"),
                _ => {
                    option_reply(
                        out,
                        opt,
                        REP_ERR_TLS_REQD,
                        b"TLS is required: send STARTTLS",
                    );
                    return Next::Continue;
                }
            }
        }
        match opt {
            OPT_EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(data) else {
                    return Next::Close("export name is not UTF-8");
                };
                // This option has no error reply: a refused client is disconnected.
                let Ok(disk) = self.open(exports, name) else {
                    return Next::Close("export refused");
                };
                let flags = transmission_flags(&*disk, self.structured);
                out.extend_from_slice(&disk.size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Next::Transmit(self.export(name, disk, flags))
            }
            OPT_ABORT => {
                option_reply(out, opt, REP_ACK, &[]);
                Next::Close("client aborted")
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(out, opt, REP_ERR_INVALID, b"LIST takes no data");
                    return Next::Continue;
                }
                let visible = |n: &String| self.tls.as_ref().is_none_or(|only| only == n);
                for (name, description) in exports.list().into_iter().filter(|(n, _)| visible(n)) {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    d.extend_from_slice(description.as_bytes());
                    option_reply(out, opt, REP_SERVER, &d);
                }
                option_reply(out, opt, REP_ACK, &[]);
                Next::Continue
            }
            OPT_STARTTLS => {
                if self.mode == NbdTls::Off {
                    option_reply(out, opt, REP_ERR_UNSUP, b"TLS is not offered");
                } else if !data.is_empty() {
                    option_reply(out, opt, REP_ERR_INVALID, b"STARTTLS takes no data");
                } else if self.tls.is_some() {
                    option_reply(out, opt, REP_ERR_INVALID, b"TLS is already started");
                } else {
                    option_reply(out, opt, REP_ACK, &[]);
                    return Next::StartTls;
                }
                Next::Continue
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info(data) else {
                    option_reply(out, opt, REP_ERR_INVALID, b"malformed INFO/GO payload");
                    return Next::Continue;
                };
                let disk = match self.open(exports, &name) {
                    Ok(d) => d,
                    Err(r) => {
                        let (code, msg) = match r {
                            Refusal::Unknown => (REP_ERR_UNKNOWN, format!("no export `{name}`")),
                            Refusal::Policy(m) => (REP_ERR_POLICY, m),
                            Refusal::Broken(m) => (REP_ERR_UNKNOWN, m),
                        };
                        option_reply(out, opt, code, msg.as_bytes());
                        return Next::Continue;
                    }
                };
                let flags = transmission_flags(&*disk, self.structured);
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&disk.size().to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(out, opt, REP_INFO, &info);
                for r in requests {
                    let mut d = r.to_be_bytes().to_vec();
                    match r {
                        INFO_NAME => d.extend_from_slice(name.as_bytes()),
                        INFO_DESCRIPTION => d.extend_from_slice(b"corral disk"),
                        INFO_BLOCK_SIZE => {
                            for v in [1u32, 4096, MAX_PAYLOAD] {
                                d.extend_from_slice(&v.to_be_bytes());
                            }
                        }
                        _ => continue,
                    }
                    option_reply(out, opt, REP_INFO, &d);
                }
                option_reply(out, opt, REP_ACK, &[]);
                if opt == OPT_GO {
                    Next::Transmit(self.export(&name, disk, flags))
                } else {
                    Next::Continue
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(out, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data");
                } else {
                    self.structured = true;
                    option_reply(out, opt, REP_ACK, &[]);
                }
                Next::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let Some((name, queries)) = parse_meta(data) else {
                    option_reply(out, opt, REP_ERR_INVALID, b"malformed meta context payload");
                    return Next::Continue;
                };
                if opt == OPT_SET_META_CONTEXT && !self.structured {
                    option_reply(out, opt, REP_ERR_INVALID, b"structured replies first");
                    return Next::Continue;
                }
                if let Err(r) = self.open(exports, &name) {
                    let code = match r {
                        Refusal::Policy(_) => REP_ERR_POLICY,
                        _ => REP_ERR_UNKNOWN,
                    };
                    option_reply(out, opt, code, b"no such export for this client");
                    return Next::Continue;
                }
                let matches = if opt == OPT_LIST_META_CONTEXT {
                    queries.is_empty()
                        || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
                } else {
                    queries.iter().any(|q| q == BASE_ALLOCATION)
                };
                if opt == OPT_SET_META_CONTEXT {
                    self.meta_for = matches.then(|| name.clone());
                }
                if matches {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(out, opt, REP_META_CONTEXT, &d);
                }
                option_reply(out, opt, REP_ACK, &[]);
                Next::Continue
            }
            _ => {
                option_reply(out, opt, REP_ERR_UNSUP, b"option not supported");
                Next::Continue
            }
        }
    }

    fn export(&self, name: &str, disk: Arc<dyn Disk>, flags: u16) -> Export {
        Export {
            name: name.to_string(),
            disk,
            flags,
            structured: self.structured,
            base_allocation: self.structured && self.meta_for.as_deref() == Some(name),
        }
    }
}

#[cfg(test)]
mod tests;
