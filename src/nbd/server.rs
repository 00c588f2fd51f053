//! The NBD shell: a tokio accept loop, and one thread per connection that moves bytes between the socket
//! and the handshake and transmission cores.
//!
//! A thread per connection, not async tasks: every request is a `pread`/`pwrite` on the page cache that
//! takes microseconds, so handing each to a blocking pool would cost more than the work. Requests on a
//! connection run in arrival order and each reply is written as soon as its request completes; replies
//! are coalesced into one `write` while further pipelined requests are already waiting in the read
//! buffer, and several connections (multi-conn) run in parallel on their own threads.
//!
//! What bounds a connection ([`NbdLimits`]): the room's connection caps, checked before a thread is
//! started ([`crate::conn::Gate`]); one deadline for the whole handshake, from accept to transmission
//! (the socket's timeouts are set to the time left before each read and write of it); TCP keepalive,
//! so that a vanished client is found although NBD has no ping; and, only when configured, an idle
//! timeout in transmission, set once as the socket's read timeout so that it costs nothing per request.
//!
//! TLS ([`super::tls`]): when the handshake machine says STARTTLS, the socket is wrapped in an OpenSSL
//! session (blocking, like the rest of the thread) and the negotiation goes on inside it; the handshake
//! deadline covers the TLS handshake too. In transmission over TLS there is no `sendfile` (the bytes must
//! be encrypted): reads are copied through the reply buffer.
//!
//! Long because the accept loop, the limits and the connection thread with its socket timeouts are one
//! connection's lifecycle, kept in one place.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::handshake::{Exports, Handshake, Next};
use super::proto::{self, OptionHeader, Request, MAX_OPTION, MAX_PAYLOAD};
use super::tls::{TlsError, TlsServer};
use super::transmit::{self, Command};
use crate::config::NbdTls;
use crate::conn::{Caps, Deadline, Gate};
use crate::metrics::{write_counter, write_gauge, Counter, Report};

/// Who may open what: made by the controller, asked for every connection and re-asked while it lasts.
pub trait ExportSource: Send + Sync {
    /// The exports a client at `peer` may see and open.
    fn for_peer(&self, peer: IpAddr) -> Box<dyn Exports + Send>;
    /// Whether `peer` may still use `export` (false once its node is released from the slot).
    fn still_allowed(&self, export: &str, peer: IpAddr) -> bool;
    /// The TLS pre-shared key a client presenting `identity` must know, and the one export it opens.
    fn psk(&self, _identity: &str) -> Option<Psk> {
        None
    }
}

/// A slot's TLS pre-shared key and its export.
#[derive(Clone)]
pub struct Psk {
    pub export: String,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk {{ export: {:?}, .. }}", self.export)
    }
}

/// What bounds the NBD room's connections (from `[nbd]`).
#[derive(Debug, Clone, Copy)]
pub struct NbdLimits {
    pub connections: Caps,
    /// From accept until transmission.
    pub handshake: Duration,
    /// Without a request in transmission before the connection is closed; `None` never.
    pub idle: Option<Duration>,
    /// Whether STARTTLS is offered or demanded (not a bound, but set from `[nbd]` with them).
    pub tls: NbdTls,
}

impl NbdLimits {
    pub fn from_config(c: &crate::config::NbdConfig) -> NbdLimits {
        NbdLimits {
            connections: Caps {
                total: c.max_connections,
                per_peer: c.max_connections_per_peer,
            },
            handshake: Duration::from_secs(c.handshake_timeout),
            idle: (c.idle_timeout > 0).then(|| Duration::from_secs(c.idle_timeout)),
            tls: c.tls,
        }
    }
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits::from_config(&crate::config::NbdConfig::default())
    }
}

#[derive(Default)]
pub struct NbdStats {
    /// Connections open now, and those refused for a cap.
    pub gate: Arc<Gate>,
    pub connections: Counter,
    pub handshake_timeouts: Counter,
    pub idle_closed: Counter,
    pub refused: Counter,
    pub malformed: Counter,
    pub requests: Counter,
    pub errors: Counter,
    pub revoked: Counter,
    pub tls_sessions: Counter,
    pub tls_failed: Counter,
    pub bytes_read: Counter,
    pub bytes_written: Counter,
}

impl Report for NbdStats {
    fn report(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "corral_nbd_connections_total",
                "NBD connections accepted",
                &self.connections,
            ),
            (
                "corral_nbd_refused_busy_total",
                "NBD connections closed at once: max_connections or max_connections_per_peer reached",
                &self.gate.refused_busy,
            ),
            (
                "corral_nbd_handshake_timeouts_total",
                "NBD connections closed for not finishing the handshake within handshake_timeout",
                &self.handshake_timeouts,
            ),
            (
                "corral_nbd_idle_closed_total",
                "NBD connections closed after idle_timeout without a request",
                &self.idle_closed,
            ),
            (
                "corral_nbd_refused_total",
                "NBD handshakes that ended without an export",
                &self.refused,
            ),
            (
                "corral_nbd_malformed_total",
                "NBD connections closed for protocol violations",
                &self.malformed,
            ),
            (
                "corral_nbd_requests_total",
                "NBD requests served",
                &self.requests,
            ),
            (
                "corral_nbd_errors_total",
                "NBD requests answered with an error",
                &self.errors,
            ),
            (
                "corral_nbd_revoked_total",
                "NBD connections closed because their node left the slot",
                &self.revoked,
            ),
            (
                "corral_nbd_tls_sessions_total",
                "NBD connections upgraded to TLS with a slot's pre-shared key",
                &self.tls_sessions,
            ),
            (
                "corral_nbd_tls_failed_total",
                "NBD TLS handshakes that failed (no or unknown PSK identity, wrong key, no common suite)",
                &self.tls_failed,
            ),
            (
                "corral_nbd_read_bytes_total",
                "Bytes read by NBD clients",
                &self.bytes_read,
            ),
            (
                "corral_nbd_written_bytes_total",
                "Bytes written by NBD clients",
                &self.bytes_written,
            ),
        ] {
            write_counter(out, name, help, v.get());
        }
        write_gauge(
            out,
            "corral_nbd_connections_open",
            "NBD connections open now (in the handshake or in transmission)",
            self.gate.open() as u64,
        );
    }
}

struct Open {
    export: String,
    peer: IpAddr,
    stream: TcpStream,
}

/// Connections in transmission, so that a released slot's export can be closed.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

pub struct NbdServer {
    listener: tokio::net::TcpListener,
    source: Arc<dyn ExportSource>,
    registry: Arc<Registry>,
    stats: Arc<NbdStats>,
    limits: NbdLimits,
    tls: Option<Arc<TlsServer>>,
}

impl NbdServer {
    pub async fn bind(
        addr: SocketAddr,
        source: Arc<dyn ExportSource>,
        limits: NbdLimits,
    ) -> anyhow::Result<NbdServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("nbd listen {addr}: {e}"))?;
        let stats = NbdStats {
            gate: Gate::new(limits.connections),
            ..NbdStats::default()
        };
        let tls = match limits.tls {
            NbdTls::Off => None,
            _ => Some(Arc::new(TlsServer::new(source.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "nbd: cannot set up TLS (set [nbd] tls = \"off\" to run without): {e}"
                )
            })?)),
        };
        Ok(NbdServer {
            listener,
            source,
            registry: Arc::default(),
            stats: Arc::new(stats),
            limits,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn stats(&self) -> Arc<NbdStats> {
        self.stats.clone()
    }

    /// Serves until the task is dropped; checks every second that each open export still belongs to its
    /// client.
    pub async fn run(self) -> anyhow::Result<()> {
        let (registry, source, stats) = (
            self.registry.clone(),
            self.source.clone(),
            self.stats.clone(),
        );
        let check = move || revoke(&registry, &*source, &stats);
        let (source, registry, stats, limits, tls) = (
            self.source,
            self.registry,
            self.stats,
            self.limits,
            self.tls,
        );
        let gate = stats.gate.clone();
        crate::conn::accept_on_threads(&self.listener, "nbd", gate, check, move |stream, peer| {
            stats.connections.inc();
            let exports = source.for_peer(peer.ip());
            let r = connection(
                stream,
                peer,
                &*exports,
                &registry,
                &stats,
                &limits,
                tls.as_deref(),
            );
            crate::conn::log_end("nbd", peer, r);
        })
        .await
    }
}

fn revoke(registry: &Registry, source: &dyn ExportSource, stats: &NbdStats) {
    let open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
    for o in open.values() {
        if !source.still_allowed(&o.export, o.peer) {
            tracing::info!(export = %o.export, peer = %o.peer, "closing export: its node no longer holds the slot");
            stats.revoked.inc();
            let _ = o.stream.shutdown(Shutdown::Both);
        }
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads and drops `n` bytes.
fn skip(r: &mut impl Read, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The socket during the handshake: every read and write ends by the handshake's deadline. Owned (a
/// clone of the accepted socket), so that a TLS session can own it; the deadline is lifted for
/// transmission.
struct HsSocket {
    stream: TcpStream,
    deadline: Option<Deadline>,
}

impl Read for HsSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(d) = &self.deadline {
            d.arm(&self.stream)?;
        }
        self.stream.read(buf)
    }
}

impl Write for HsSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(d) = &self.deadline {
            d.arm(&self.stream)?;
        }
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type Tls = openssl::ssl::SslStream<HsSocket>;

/// The connection as the handshake left it: plain, or inside TLS.
enum Link {
    Plain(HsSocket),
    Tls(Box<Tls>),
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Tls(t) => t.flush(),
        }
    }
}

/// One side (reads or writes) of a TLS session, so that transmission can buffer both like a socket's
/// clones: both halves run on the connection's one thread, one call at a time.
struct TlsHalf(Rc<RefCell<Tls>>);

impl Read for TlsHalf {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl Write for TlsHalf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    exports: &dyn Exports,
    registry: &Registry,
    stats: &NbdStats,
    limits: &NbdLimits,
    tls: Option<&TlsServer>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(false)?;
    crate::conn::keepalive(&stream)?;
    // The whole handshake (TLS included) has one deadline: a client that stalls, or trickles a byte at
    // a time, does not hold a thread for longer than handshake_timeout.
    let sock = HsSocket {
        stream: stream.try_clone()?,
        deadline: Some(Deadline::after(Instant::now(), limits.handshake)),
    };
    let mode = if tls.is_some() {
        limits.tls
    } else {
        NbdTls::Off
    };
    let (export, link) = match handshake(Link::Plain(sock), peer, exports, stats, mode, tls) {
        Ok(Some(e)) => e,
        Ok(None) => return Ok(()),
        Err(e) if crate::conn::timed_out(&e) => {
            stats.handshake_timeouts.inc();
            tracing::debug!(%peer, "nbd handshake not finished in time: closing");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // Set once for the whole transmission phase (no cost per request): a read that waits longer than
    // the idle timeout ends the connection; writes wait as long as the client takes.
    let secure = matches!(link, Link::Tls(_));
    let link = match link {
        Link::Plain(s) => Link::Plain(HsSocket {
            deadline: None,
            ..s
        }),
        Link::Tls(mut t) => {
            t.get_mut().deadline = None;
            Link::Tls(t)
        }
    };
    stream.set_read_timeout(limits.idle)?;
    stream.set_write_timeout(None)?;
    tracing::info!(%peer, export = %export.name, size = export.disk.size(), tls = secure, "nbd export opened");
    let id = registry.next.fetch_add(1, Ordering::Relaxed);
    registry
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            Open {
                export: export.name.clone(),
                peer: peer.ip(),
                stream: stream.try_clone()?,
            },
        );
    let result = match link {
        Link::Plain(s) => {
            let rd = BufReader::with_capacity(256 << 10, s.stream.try_clone()?);
            let wr = BufWriter::with_capacity(256 << 10, s.stream);
            transmission(rd, wr, Some(&stream), &export, stats)
        }
        Link::Tls(t) => {
            let t = Rc::new(RefCell::new(*t));
            let rd = BufReader::with_capacity(256 << 10, TlsHalf(t.clone()));
            let wr = BufWriter::with_capacity(256 << 10, TlsHalf(t.clone()));
            let r = transmission(rd, wr, None, &export, stats);
            // close_notify, so that the client sees a clean end; bounded, the client may be gone.
            if stream
                .set_write_timeout(Some(Duration::from_secs(2)))
                .is_ok()
            {
                let _ = t.borrow_mut().shutdown();
            }
            r
        }
    };
    let result = match result {
        Err(e) if limits.idle.is_some() && crate::conn::timed_out(&e) => {
            stats.idle_closed.inc();
            tracing::info!(%peer, export = %export.name, "nbd connection idle too long: closing");
            Ok(())
        }
        r => r,
    };
    registry
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    tracing::info!(%peer, export = %export.name, "nbd export closed");
    result
}

/// The handshake up to transmission: the export chosen and the connection it goes on (plain or TLS), or
/// `None` when it ended without one.
fn handshake(
    mut link: Link,
    peer: SocketAddr,
    exports: &dyn Exports,
    stats: &NbdStats,
    mode: NbdTls,
    tls: Option<&TlsServer>,
) -> std::io::Result<Option<(super::handshake::Export, Link)>> {
    link.write_all(&proto::greeting())?;
    let mut hs = Handshake::with_tls(mode);
    if let Err(why) = hs.client_flags(read_u32(&mut link)?) {
        stats.malformed.inc();
        tracing::debug!(%peer, "nbd handshake: {why}");
        return Ok(None);
    }
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 16];
        link.read_exact(&mut head)?;
        let Ok(h) = OptionHeader::parse(&head) else {
            stats.malformed.inc();
            return Ok(None);
        };
        out.clear();
        let next = if h.len > MAX_OPTION {
            skip(&mut link, h.len as u64)?;
            hs.oversized(h, &mut out)
        } else {
            let mut data = vec![0u8; h.len as usize];
            link.read_exact(&mut data)?;
            hs.option(h, &data, exports, &mut out)
        };
        link.write_all(&out)?;
        match next {
            Next::Continue => {}
            Next::Transmit(e) => return Ok(Some((e, link))),
            Next::Close(why) => {
                stats.refused.inc();
                tracing::debug!(%peer, "nbd handshake ended: {why}");
                return Ok(None);
            }
            Next::StartTls => {
                // The machine answers STARTTLS with ACK only when TLS is offered and not yet up.
                let (Link::Plain(sock), Some(tls)) = (link, tls) else {
                    stats.malformed.inc();
                    return Ok(None);
                };
                match tls.accept(sock) {
                    Ok((t, proven)) => {
                        stats.tls_sessions.inc();
                        tracing::info!(
                            %peer,
                            identity = %proven.identity,
                            export = %proven.export,
                            version = t.ssl().version_str(),
                            cipher = t.ssl().current_cipher().map_or("?", |c| c.name()),
                            "nbd tls started"
                        );
                        hs.tls_started(proven.export);
                        link = Link::Tls(Box::new(t));
                    }
                    Err(TlsError::Io(e)) => {
                        // A stall is counted as a handshake timeout by the caller, not here.
                        if !crate::conn::timed_out(&e) {
                            stats.tls_failed.inc();
                        }
                        return Err(e);
                    }
                    Err(TlsError::Handshake(why)) => {
                        stats.tls_failed.inc();
                        tracing::info!(%peer, %why, "nbd tls handshake failed");
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Requests and replies until the client disconnects. `zero_copy` is the plain socket, for `sendfile` of
/// long reads; `None` over TLS.
fn transmission<R: Read, W: Write>(
    mut rd: BufReader<R>,
    mut wr: BufWriter<W>,
    zero_copy: Option<&TcpStream>,
    export: &super::handshake::Export,
    stats: &NbdStats,
) -> std::io::Result<()> {
    let mut payload = Vec::new();
    let mut out = Vec::with_capacity(64 << 10);
    loop {
        let mut head = [0u8; Request::SIZE];
        rd.read_exact(&mut head)?;
        let Ok(req) = Request::parse(&head) else {
            stats.malformed.inc();
            return Ok(());
        };
        // A write's payload always follows its header; one too large to take is a broken client, since
        // skipping it would take as long as reading it.
        if req.payload() > MAX_PAYLOAD {
            stats.malformed.inc();
            tracing::warn!(len = req.len, "nbd write larger than 32 MiB: closing");
            return Ok(());
        }
        payload.resize(req.payload() as usize, 0);
        rd.read_exact(&mut payload)?;
        stats.requests.inc();
        out.clear();
        match transmit::check(&req, export) {
            Err(r) => {
                stats.errors.inc();
                transmit::error_reply(&mut out, export, req.cookie, r.errno, r.why);
            }
            Ok(Command::Disconnect) => {
                wr.flush()?;
                return Ok(());
            }
            Ok(Command::Read { offset, len }) if len >= ZERO_COPY_MIN => {
                stats.bytes_read.add(len as u64);
                let zc = zero_copy.and_then(|s| Some((s, export.disk.pieces(offset, len as u64)?)));
                match zc {
                    Some((stream, pieces)) => {
                        // Zero copy: the head through the buffer, then the data from the page cache
                        // straight into the socket.
                        transmit::read_reply_head(&mut out, export, req.cookie, offset, len);
                        wr.write_all(&out)?;
                        wr.flush()?;
                        for p in pieces {
                            send_file(stream, p)?;
                        }
                        continue;
                    }
                    None => transmit::execute(
                        Command::Read { offset, len },
                        req.cookie,
                        &payload,
                        export,
                        &mut out,
                    ),
                }
            }
            Ok(cmd) => {
                match cmd {
                    Command::Read { len, .. } => stats.bytes_read.add(len as u64),
                    Command::Write { len, .. } => stats.bytes_written.add(len as u64),
                    _ => {}
                }
                transmit::execute(cmd, req.cookie, &payload, export, &mut out);
            }
        }
        wr.write_all(&out)?;
        // Coalesce replies while more requests are already here; otherwise send now.
        if rd.buffer().is_empty() {
            wr.flush()?;
        }
    }
}

/// Reads at least this long are sent with `sendfile`; shorter ones are copied into the reply buffer, where
/// several replies share one `write`.
const ZERO_COPY_MIN: u32 = 64 << 10;

/// Sends one piece of a disk with `sendfile`. The reply head is already out, so a failure here cannot be
/// answered: the connection is closed (the error ends it).
fn send_file(stream: &TcpStream, p: crate::disk::Piece<'_>) -> std::io::Result<()> {
    let mut off = p.offset as i64;
    let end = (p.offset + p.len) as i64;
    while off < end {
        let want = (end - off) as usize;
        let n = nix::sys::sendfile::sendfile64(stream, p.file, Some(&mut off), want)
            .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "disk file shorter than the disk",
            ));
        }
    }
    Ok(())
}
