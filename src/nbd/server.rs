//! The NBD shell: a tokio accept loop, and one thread per connection that moves bytes between the socket
//! and the handshake and transmission cores.
//!
//! A thread per connection, not async tasks: every request is a `pread`/`pwrite` on the page cache that
//! takes microseconds, so handing each to a blocking pool would cost more than the work. Requests on a
//! connection run in arrival order and each reply is written as soon as its request completes; replies
//! are coalesced into one `write` while further pipelined requests are already waiting in the read
//! buffer, and several connections (multi-conn) run in parallel on their own threads.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::handshake::{Exports, Handshake, Next};
use super::proto::{self, OptionHeader, Request, MAX_OPTION, MAX_PAYLOAD};
use super::transmit::{self, Command};
use crate::metrics::{write_counter, Counter, Report};

/// Who may open what: made by the controller, asked for every connection and re-asked while it lasts.
pub trait ExportSource: Send + Sync {
    /// The exports a client at `peer` may see and open.
    fn for_peer(&self, peer: IpAddr) -> Box<dyn Exports + Send>;
    /// Whether `peer` may still use `export` (false once its node is released from the slot).
    fn still_allowed(&self, export: &str, peer: IpAddr) -> bool;
}

#[derive(Default)]
pub struct NbdStats {
    pub connections: Counter,
    pub refused: Counter,
    pub malformed: Counter,
    pub requests: Counter,
    pub errors: Counter,
    pub revoked: Counter,
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
}

impl NbdServer {
    pub async fn bind(
        addr: SocketAddr,
        source: Arc<dyn ExportSource>,
    ) -> anyhow::Result<NbdServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("nbd listen {addr}: {e}"))?;
        Ok(NbdServer {
            listener,
            source,
            registry: Arc::default(),
            stats: Arc::default(),
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
        let (source, registry, stats) = (self.source, self.registry, self.stats);
        crate::conn::accept_on_threads(&self.listener, "nbd", check, move |stream, peer| {
            stats.connections.inc();
            let exports = source.for_peer(peer.ip());
            let r = connection(stream, peer, &*exports, &registry, &stats);
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

fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    exports: &dyn Exports,
    registry: &Registry,
    stats: &NbdStats,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(false)?;
    // A client that stalls in the handshake does not hold a thread forever.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(&proto::greeting())?;
    let mut hs = Handshake::new();
    if let Err(why) = hs.client_flags(read_u32(&mut stream)?) {
        stats.malformed.inc();
        tracing::debug!(%peer, "nbd handshake: {why}");
        return Ok(());
    }
    let mut out = Vec::new();
    let export = loop {
        let mut head = [0u8; 16];
        stream.read_exact(&mut head)?;
        let Ok(h) = OptionHeader::parse(&head) else {
            stats.malformed.inc();
            return Ok(());
        };
        out.clear();
        let next = if h.len > MAX_OPTION {
            skip(&mut stream, h.len as u64)?;
            hs.oversized(h, &mut out)
        } else {
            let mut data = vec![0u8; h.len as usize];
            stream.read_exact(&mut data)?;
            hs.option(h, &data, exports, &mut out)
        };
        stream.write_all(&out)?;
        match next {
            Next::Continue => {}
            Next::Transmit(e) => break e,
            Next::Close(why) => {
                stats.refused.inc();
                tracing::debug!(%peer, "nbd handshake ended: {why}");
                return Ok(());
            }
        }
    };
    stream.set_read_timeout(None)?;
    tracing::info!(%peer, export = %export.name, size = export.disk.size(), "nbd export opened");
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
    let result = transmission(&stream, &export, stats);
    registry
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    tracing::info!(%peer, export = %export.name, "nbd export closed");
    result
}

fn transmission(
    stream: &TcpStream,
    export: &super::handshake::Export,
    stats: &NbdStats,
) -> std::io::Result<()> {
    let mut rd = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let mut wr = BufWriter::with_capacity(256 << 10, stream.try_clone()?);
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
                match export.disk.pieces(offset, len as u64) {
                    Some(pieces) => {
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
