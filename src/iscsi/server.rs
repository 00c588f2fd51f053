//! The iSCSI shell: a tokio accept loop and one thread per connection that moves bytes between the
//! socket and the cores (framing, login, session, SCSI). A thread per connection for the same reason as
//! the NBD room: each command is a `pread`/`pwrite` that takes microseconds.
//!
//! What bounds a connection ([`IscsiLimits`]): the room's connection caps (checked before a thread is
//! started, [`crate::conn::Gate`]); one deadline for the whole login; in the full feature phase, the
//! session core's CmdSN window and its liveness check, for which the shell owns only the timer: the
//! socket's read timeout, set to the core's [`Session::patience`] when that changes (not per PDU), whose
//! running out is handed to [`Session::quiet`].
//!
//! Long because the accept loop, the limits and the connection thread with its socket timeouts are one
//! connection's lifecycle, kept in one place.

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::login::{self, Chap, Limits, Login, Refusal, SessionKind, Step};
use super::pdu::{self, frame, Frame, FrameError, Numbers};
use super::scsi::Lun;
use super::session::{Quiet, Session};
use crate::conn::{Caps, Deadline, Gate};
use crate::disk::Disk;
use crate::metrics::{write_counter, write_gauge, Counter, Report};

/// What bounds the iSCSI room's connections (from `[iscsi]`).
#[derive(Debug, Clone, Copy)]
pub struct IscsiLimits {
    pub connections: Caps,
    /// From accept to the full feature phase.
    pub login: Duration,
    /// Silence in the full feature phase before the target pings; `None`: never.
    pub idle: Option<Duration>,
    /// Time the initiator has to answer a ping.
    pub ping: Duration,
    /// The CmdSN window: commands a session may have outstanding.
    pub max_outstanding: u32,
}

impl IscsiLimits {
    pub fn from_config(c: &crate::config::IscsiConfig) -> IscsiLimits {
        IscsiLimits {
            connections: Caps {
                total: c.max_connections,
                per_peer: c.max_connections_per_peer,
            },
            login: Duration::from_secs(c.login_timeout),
            idle: (c.idle_timeout > 0).then(|| Duration::from_secs(c.idle_timeout)),
            ping: Duration::from_secs(c.ping_timeout),
            max_outstanding: c.max_outstanding,
        }
    }
}

impl Default for IscsiLimits {
    fn default() -> Self {
        IscsiLimits::from_config(&crate::config::IscsiConfig::default())
    }
}

/// What the controller decides for the iSCSI room.
pub trait TargetSource: Send + Sync {
    /// Targets `peer` may see in a discovery session: (IQN, `address:port,tpgt`).
    fn discover(&self, peer: IpAddr) -> Vec<(String, String)>;
    /// Whether `peer` may log in to `iqn`, and with which CHAP secrets (`None`: no authentication).
    fn admit(&self, iqn: &str, peer: IpAddr, initiator: &str) -> Result<Option<Chap>, Refusal>;
    /// The disk behind `iqn` with its identity (serial, NAA), once the login succeeded.
    fn open(&self, iqn: &str, peer: IpAddr) -> Result<(Arc<dyn Disk>, String, u64), String>;
    /// Whether `peer` may still use `iqn` (false once its node left the slot).
    fn still_allowed(&self, iqn: &str, peer: IpAddr) -> bool;
}

#[derive(Default)]
pub struct IscsiStats {
    /// Connections open now, and those refused for a cap.
    pub gate: Arc<Gate>,
    pub login_timeouts: Counter,
    pub idle_closed: Counter,
    pub dropped: Counter,
    pub connections: Counter,
    pub logins: Counter,
    pub refused: Counter,
    pub malformed: Counter,
    pub commands: Counter,
    pub revoked: Counter,
}

impl Report for IscsiStats {
    fn report(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "corral_iscsi_connections_total",
                "iSCSI connections accepted",
                &self.connections,
            ),
            (
                "corral_iscsi_refused_busy_total",
                "iSCSI connections closed at once: max_connections or max_connections_per_peer reached",
                &self.gate.refused_busy,
            ),
            (
                "corral_iscsi_login_timeouts_total",
                "iSCSI connections closed for not finishing the login within login_timeout",
                &self.login_timeouts,
            ),
            (
                "corral_iscsi_idle_closed_total",
                "iSCSI connections closed for leaving a NOP-In ping unanswered within ping_timeout",
                &self.idle_closed,
            ),
            (
                "corral_iscsi_dropped_total",
                "iSCSI commands dropped for a CmdSN outside the window (max_outstanding)",
                &self.dropped,
            ),
            (
                "corral_iscsi_logins_total",
                "iSCSI logins that reached the full feature phase",
                &self.logins,
            ),
            (
                "corral_iscsi_refused_total",
                "iSCSI logins refused",
                &self.refused,
            ),
            (
                "corral_iscsi_malformed_total",
                "iSCSI connections closed for protocol violations",
                &self.malformed,
            ),
            (
                "corral_iscsi_commands_total",
                "SCSI commands served over iSCSI",
                &self.commands,
            ),
            (
                "corral_iscsi_revoked_total",
                "iSCSI connections closed because their node left the slot",
                &self.revoked,
            ),
        ] {
            write_counter(out, name, help, v.get());
        }
        write_gauge(
            out,
            "corral_iscsi_connections_open",
            "iSCSI connections open now (logging in or in the full feature phase)",
            self.gate.open() as u64,
        );
    }
}

struct Open {
    iqn: String,
    peer: IpAddr,
    stream: TcpStream,
    /// Session identity for reinstatement: (initiator, ISID).
    session: (String, [u8; 6]),
    /// The session's TSIH, which a login adding or reinstating a connection of it names.
    tsih: u16,
}

#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
    tsih: AtomicU16,
}

pub struct IscsiServer {
    listener: tokio::net::TcpListener,
    source: Arc<dyn TargetSource>,
    registry: Arc<Registry>,
    stats: Arc<IscsiStats>,
    limits: IscsiLimits,
}

impl IscsiServer {
    pub async fn bind(
        addr: SocketAddr,
        source: Arc<dyn TargetSource>,
        limits: IscsiLimits,
    ) -> anyhow::Result<IscsiServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("iscsi listen {addr}: {e}"))?;
        Ok(IscsiServer {
            listener,
            source,
            registry: Arc::default(),
            stats: Arc::new(IscsiStats {
                gate: Gate::new(limits.connections),
                ..IscsiStats::default()
            }),
            limits,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn stats(&self) -> Arc<IscsiStats> {
        self.stats.clone()
    }

    /// Serves until the task is dropped; every second, closes connections whose node left the slot.
    pub async fn run(self) -> anyhow::Result<()> {
        let (registry, source, stats) = (
            self.registry.clone(),
            self.source.clone(),
            self.stats.clone(),
        );
        let check = move || {
            let open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
            for o in open.values() {
                if !source.still_allowed(&o.iqn, o.peer) {
                    tracing::info!(target_iqn = %o.iqn, peer = %o.peer, "closing iscsi session: its node no longer holds the slot");
                    stats.revoked.inc();
                    let _ = o.stream.shutdown(Shutdown::Both);
                }
            }
        };
        let (source, registry, stats, limits) =
            (self.source, self.registry, self.stats, self.limits);
        let gate = stats.gate.clone();
        crate::conn::accept_on_threads(&self.listener, "iscsi", gate, check, move |stream, peer| {
            stats.connections.inc();
            let r = connection(stream, peer, &*source, &registry, &stats, &limits);
            crate::conn::log_end("iscsi", peer, r);
        })
        .await
    }
}

/// Bytes asked of the socket at least per `read` (many 48-byte commands at a time when they queue up).
const READ_CHUNK: usize = 64 * 1024;

/// What came in from the initiator and is not framed yet: `buf[start..end]`. The buffer is zeroed only
/// when it grows, and framed PDUs are skipped over rather than drained out.
struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    fn new() -> Input {
        Input {
            buf: vec![0; 2 * READ_CHUNK],
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Whether a whole PDU is buffered (framing it cannot block on the socket).
    fn holds_pdu(&self) -> bool {
        let b = self.pending();
        pdu::wire_len(b).is_some_and(|n| b.len() >= n)
    }

    /// Reads more from `stream` so that at least `total` bytes can be pending; returns what it got.
    fn fill(&mut self, stream: &mut TcpStream, total: usize) -> std::io::Result<usize> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.start + total.max(self.end - self.start + READ_CHUNK) > self.buf.len() {
            // Move what is pending to the front, and grow the buffer if it is still too small.
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            let want = total.max(self.end + READ_CHUNK);
            if want > self.buf.len() {
                self.buf.resize(want, 0);
            }
        }
        let got = stream.read(&mut self.buf[self.end..])?;
        self.end += got;
        Ok(got)
    }
}

/// Reads until the buffer holds a whole PDU; `None` at a clean end of stream between PDUs. A PDU that
/// breaks the framing rules (in the login phase or after it) is answered with a Reject, counted as
/// malformed, and ends the connection. With a `deadline`, each read is given only the time left before
/// it (the login phase); without one, the socket's own read timeout applies (what is buffered stays
/// buffered when it runs out).
fn next_pdu(
    stream: &mut TcpStream,
    input: &mut Input,
    max_data: u32,
    stats: &IscsiStats,
    deadline: Option<&Deadline>,
) -> std::io::Result<Option<pdu::Pdu>> {
    loop {
        match frame(input.pending(), max_data) {
            Ok(Frame::Pdu(p, used)) => {
                input.start += used;
                return Ok(Some(p));
            }
            Ok(Frame::Need(n)) => {
                if let Some(d) = deadline {
                    d.arm(stream)?;
                }
                let had = input.pending().len();
                if input.fill(stream, n)? == 0 {
                    return if had == 0 {
                        Ok(None)
                    } else {
                        Err(std::io::ErrorKind::UnexpectedEof.into())
                    };
                }
            }
            Err(FrameError::DataTooLong { len, max, bhs }) => {
                stats.malformed.inc();
                let _ = stream.write_all(
                    &pdu::reject(pdu::reject::PROTOCOL_ERROR, &bhs, Numbers::default()).encode(),
                );
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("data segment of {len} bytes over {max}"),
                ));
            }
        }
    }
}

/// Responses on their way out. They are gathered while more requests are buffered and then written with
/// `writev`: headers from one small buffer, data segments straight from the PDUs (a read's data is not
/// copied again to be sent).
struct Output {
    stream: TcpStream,
    pdus: Vec<pdu::Pdu>,
    /// Each queued PDU's BHS (lengths filled in) and AHS, one after another.
    heads: Vec<u8>,
    bytes: usize,
}

/// Queued bytes past which the queue is written out even though requests are still buffered.
const OUT_BYTES: usize = 512 * 1024;
/// At most this many PDUs per `writev` (three slices each: header, data, padding; IOV_MAX is 1024).
const OUT_PDUS: usize = 256;

impl Output {
    fn new(stream: TcpStream) -> Output {
        Output {
            stream,
            pdus: Vec::new(),
            heads: Vec::new(),
            bytes: 0,
        }
    }

    fn push(&mut self, p: pdu::Pdu) -> std::io::Result<()> {
        self.heads.extend_from_slice(&p.header());
        self.heads.extend_from_slice(&p.ahs);
        self.bytes += pdu::BHS_LEN + p.ahs.len() + pdu::pad4(p.data.len());
        self.pdus.push(p);
        if self.bytes >= OUT_BYTES || self.pdus.len() >= OUT_PDUS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.pdus.is_empty() {
            return Ok(());
        }
        const PAD: [u8; 3] = [0; 3];
        let mut slices = Vec::with_capacity(self.pdus.len() * 3);
        let mut at = 0;
        for p in &self.pdus {
            let head = pdu::BHS_LEN + p.ahs.len();
            slices.push(IoSlice::new(&self.heads[at..at + head]));
            at += head;
            if !p.data.is_empty() {
                slices.push(IoSlice::new(&p.data));
                let pad = pdu::pad4(p.data.len()) - p.data.len();
                if pad > 0 {
                    slices.push(IoSlice::new(&PAD[..pad]));
                }
            }
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.stream.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pdus.clear();
        self.heads.clear();
        self.bytes = 0;
        Ok(())
    }
}

struct Lookup<'a> {
    source: &'a dyn TargetSource,
    registry: &'a Registry,
    peer: IpAddr,
}

impl login::Targets for Lookup<'_> {
    fn lookup(&self, target: &str, initiator: &str) -> Result<Option<Chap>, Refusal> {
        self.source.admit(target, self.peer, initiator)
    }

    fn session_exists(&self, initiator: &str, isid: [u8; 6], tsih: u16) -> bool {
        let open = self.registry.open.lock().unwrap_or_else(|p| p.into_inner());
        open.values()
            .any(|o| o.tsih == tsih && o.session.1 == isid && o.session.0 == initiator)
    }
}

fn random(buf: &mut [u8]) {
    if getrandom::getrandom(buf).is_err() {
        // Never expected on Linux; a predictable challenge is still better than none at all.
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
    }
}

fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    source: &dyn TargetSource,
    registry: &Registry,
    stats: &IscsiStats,
    limits: &IscsiLimits,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(false)?;
    crate::conn::keepalive(&stream)?;
    // The whole login has one deadline: an initiator that stalls, or trickles its PDUs, does not hold
    // a thread for longer than login_timeout.
    let deadline = Deadline::after(Instant::now(), limits.login);
    let mut input = Input::new();
    match login_phase(
        &mut stream,
        &mut input,
        peer,
        source,
        registry,
        stats,
        limits,
        &deadline,
    ) {
        Ok(Some(done)) => {
            stats.logins.inc();
            full_feature_phase(stream, input, peer, source, registry, stats, limits, done)
        }
        Ok(None) => Ok(()),
        Err(e) if crate::conn::timed_out(&e) => {
            stats.login_timeouts.inc();
            tracing::debug!(%peer, "iscsi login not finished in time: closing");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The login phase's outcome: the negotiated session, the CmdSN of its last request and its TSIH.
struct Admitted {
    login: Login,
    done: Box<login::LoggedIn>,
    first_cmd_sn: u32,
    tsih: u16,
}

/// The login: `None` when it was refused or the initiator went away; every read and write by `deadline`.
#[allow(clippy::too_many_arguments)]
fn login_phase(
    stream: &mut TcpStream,
    input: &mut Input,
    peer: SocketAddr,
    source: &dyn TargetSource,
    registry: &Registry,
    stats: &IscsiStats,
    limits: &IscsiLimits,
    deadline: &Deadline,
) -> std::io::Result<Option<Admitted>> {
    let mut login = Login::new(Limits {
        cmd_window: limits.max_outstanding,
        ..Limits::default()
    });
    let lookup = Lookup {
        source,
        registry,
        peer: peer.ip(),
    };
    // Login: requests carry at most 8 KiB of text until MaxRecvDataSegmentLength is agreed.
    loop {
        let Some(req) = next_pdu(stream, input, 8192, stats, Some(deadline))? else {
            return Ok(None);
        };
        let new_tsih = registry
            .tsih
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .max(1);
        let step = login.on_request(&req, &lookup, new_tsih, &mut random);
        deadline.arm(stream)?;
        match step {
            Step::Continue(r) => stream.write_all(&r.encode())?,
            Step::Complete(r, done) => {
                stream.write_all(&r.encode())?;
                return Ok(Some(Admitted {
                    login,
                    done,
                    first_cmd_sn: req.cmd_sn(),
                    tsih: r.u16_at(14),
                }));
            }
            Step::Fail(r) => {
                stats.refused.inc();
                tracing::info!(%peer, status = ?(r.bhs[36], r.bhs[37]), "iscsi login refused");
                stream.write_all(&r.encode())?;
                return Ok(None);
            }
        }
    }
}

/// The full feature phase of a connection that logged in: the target opened, the connection registered
/// for revocation and reinstatement, PDUs served until it ends.
#[allow(clippy::too_many_arguments)]
fn full_feature_phase(
    mut stream: TcpStream,
    mut input: Input,
    peer: SocketAddr,
    source: &dyn TargetSource,
    registry: &Registry,
    stats: &IscsiStats,
    limits: &IscsiLimits,
    admitted: Admitted,
) -> std::io::Result<()> {
    let Admitted {
        login,
        done,
        first_cmd_sn,
        tsih,
    } = admitted;
    // Writes: an initiator that stops reading its answers for as long as it may stay silent, and then
    // the time it has to answer a ping, is as gone as one that does not answer it. Reads: the core's
    // patience, set in `full_feature`.
    stream.set_write_timeout(limits.idle.map(|i| i + limits.ping))?;
    let mut session = Session::new(done.params, login.next_stat_sn(), first_cmd_sn)
        .with_window(limits.max_outstanding)
        .with_liveness(limits.idle, limits.ping);
    let (lun, iqn) = match &done.kind {
        SessionKind::Discovery => {
            session.set_targets(source.discover(peer.ip()));
            (None, None)
        }
        SessionKind::Normal { target } => match source.open(target, peer.ip()) {
            Ok((disk, serial, naa)) => (Some(Lun::new(disk, &serial, naa)), Some(target.clone())),
            Err(e) => {
                tracing::warn!(%peer, target = %target, error = %e, "iscsi: cannot open the target's disk");
                return Ok(());
            }
        },
    };
    tracing::info!(%peer, initiator = %done.initiator, target = ?iqn, "iscsi session started");
    // Registered for revocation and reinstatement: a new session with the same initiator and ISID
    // replaces the old one (the booted OS logging in again after iPXE).
    let id = registry.next.fetch_add(1, Ordering::Relaxed);
    if let Some(iqn) = &iqn {
        let mut open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
        let key = (done.initiator.clone(), done.isid);
        for o in open.values() {
            if o.session == key && &o.iqn == iqn {
                let _ = o.stream.shutdown(Shutdown::Both);
            }
        }
        open.insert(
            id,
            Open {
                iqn: iqn.clone(),
                peer: peer.ip(),
                stream: stream.try_clone()?,
                session: key,
                tsih,
            },
        );
    }
    let result = full_feature(
        &mut stream,
        &mut input,
        &mut session,
        lun.as_ref(),
        done.params.target_max_recv,
        stats,
    );
    registry
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    result
}

fn full_feature(
    stream: &mut TcpStream,
    input: &mut Input,
    session: &mut Session,
    lun: Option<&Lun>,
    max_data: u32,
    stats: &IscsiStats,
) -> std::io::Result<()> {
    let mut out = Output::new(stream.try_clone()?);
    // The socket's read timeout is the core's patience, changed only when that changes (after a ping
    // and after its answer), so a busy connection makes no extra system call.
    let mut patience = session.patience();
    stream.set_read_timeout(patience)?;
    loop {
        // Replies go out before waiting for more input; while whole requests are buffered, they gather.
        if !input.holds_pdu() {
            out.flush()?;
        }
        let p = match next_pdu(stream, input, max_data, stats, None) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(e) if patience.is_some() && crate::conn::timed_out(&e) => {
                match session.quiet(Instant::now()) {
                    Quiet::Ping(ping) => {
                        out.push(ping)?;
                        out.flush()?;
                    }
                    Quiet::Dead => {
                        stats.idle_closed.inc();
                        tracing::info!("iscsi initiator did not answer a ping: closing");
                        return Ok(());
                    }
                    Quiet::Wait => {}
                }
                if session.patience() != patience {
                    patience = session.patience();
                    stream.set_read_timeout(patience)?;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let events = session.on_pdu(&p);
        if session.patience() != patience {
            patience = session.patience();
            stream.set_read_timeout(patience)?;
        }
        let ran = session.run(events, lun, |r| out.push(r))?;
        stats.commands.add(ran.commands);
        if ran.dropped > 0 {
            stats.dropped.add(ran.dropped);
        }
        if !ran.open {
            out.flush()?;
            return Ok(());
        }
    }
}
