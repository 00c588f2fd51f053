//! The TFTP shell: one listening socket, one socket per transfer (its own TID) bound to the address the
//! client contacted (learnt with IP_PKTINFO when listening on 0.0.0.0), files from the shared in-memory
//! cache, and the `core` state machine driving each transfer.
//!
//! Every transfer holds a task and a socket until it ends, so the session table ([`Gate`]) bounds them in
//! all and per client address before any file is opened: a request beyond a bound gets an ERROR from the
//! listening socket and nothing is kept for it.

use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::core::{self, code, Limits, Packet, Step, Transfer};
use crate::config::TftpConfig;
use crate::conn::{Busy, Caps, Gate};
use crate::files::{confine, FileCache};
use crate::metrics::{write_counter, write_gauge, Counter, Report};

/// Transfer counters.
#[derive(Default)]
pub struct TftpStats {
    /// The session table: transfers open now, in all and per address.
    pub gate: Arc<Gate>,
    /// Requests refused because the table held `max_sessions`, or `max_sessions_per_peer` for the address.
    pub refused_total: Counter,
    pub refused_per_peer: Counter,
    /// Requests whose `timeout` option was above `max_timeout` (left out of the OACK, run with max_timeout).
    pub timeout_clamped: Counter,
    pub requests: Counter,
    pub completed: Counter,
    pub failed: Counter,
    pub bytes_sent: Counter,
    pub malformed: Counter,
    pub refused: Counter,
}

impl Report for TftpStats {
    fn report(&self, out: &mut String) {
        write_counter(
            out,
            "corral_tftp_requests_total",
            "Read requests received",
            self.requests.get(),
        );
        write_counter(
            out,
            "corral_tftp_transfers_completed_total",
            "Transfers completed",
            self.completed.get(),
        );
        write_counter(
            out,
            "corral_tftp_transfers_failed_total",
            "Transfers abandoned or aborted",
            self.failed.get(),
        );
        write_counter(
            out,
            "corral_tftp_bytes_sent_total",
            "File bytes sent in completed transfers",
            self.bytes_sent.get(),
        );
        write_counter(
            out,
            "corral_tftp_malformed_total",
            "Malformed packets dropped",
            self.malformed.get(),
        );
        write_counter(
            out,
            "corral_tftp_refused_total",
            "Requests refused (missing file, path outside the root, write)",
            self.refused.get(),
        );
        write_gauge(
            out,
            "corral_tftp_sessions",
            "Transfers open now",
            self.gate.open() as u64,
        );
        use std::fmt::Write;
        let name = "corral_tftp_refused_busy_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests refused with an error: max_sessions (reason=total) or max_sessions_per_peer (reason=per_peer) reached\n# TYPE {name} counter\n{name}{{reason=\"total\"}} {}\n{name}{{reason=\"per_peer\"}} {}",
            self.refused_total.get(),
            self.refused_per_peer.get()
        );
        write_counter(
            out,
            "corral_tftp_timeout_clamped_total",
            "Requests asking for a timeout above max_timeout (option not acknowledged, max_timeout used)",
            self.timeout_clamped.get(),
        );
    }
}

pub struct TftpServer {
    socket: UdpSocket,
    root: PathBuf,
    limits: Limits,
    cache: Arc<FileCache>,
    stats: Arc<TftpStats>,
}

/// Whole boot files kept in memory for TFTP.
const CACHE_BUDGET: u64 = 256 << 20;

impl TftpServer {
    pub async fn bind(cfg: &TftpConfig) -> anyhow::Result<TftpServer> {
        use socket2::{Domain, Protocol, Socket, Type};
        let err = |e: std::io::Error| anyhow::anyhow!("cannot listen on tftp {}: {e}", cfg.listen);
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.set_nonblocking(true).map_err(err)?;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
            .map_err(|e| err(e.into()))?;
        s.bind(&cfg.listen.into()).map_err(err)?;
        let socket = UdpSocket::from_std(s.into()).map_err(err)?;
        let root = cfg
            .root
            .canonicalize()
            .map_err(|e| anyhow::anyhow!("tftp root {}: {e}", cfg.root.display()))?;
        Ok(TftpServer {
            socket,
            root,
            limits: Limits {
                max_blksize: cfg.max_blksize,
                max_windowsize: cfg.max_windowsize,
                timeout: cfg.timeout,
                retries: cfg.retries,
                max_timeout: cfg.max_timeout,
            },
            cache: Arc::new(FileCache::new(CACHE_BUDGET)),
            stats: Arc::new(TftpStats {
                gate: Gate::new(Caps {
                    total: cfg.max_sessions,
                    per_peer: cfg.max_sessions_per_peer,
                }),
                ..TftpStats::default()
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .expect("bound socket has an address")
    }

    pub fn stats(&self) -> Arc<TftpStats> {
        self.stats.clone()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 65536];
        let fallback = match self.local_addr().ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        loop {
            let (len, peer, dst) = match self
                .socket
                .async_io(Interest::READABLE, || recv_with_dst(&self.socket, &mut buf))
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "tftp receive failed");
                    continue;
                }
            };
            let local = dst.filter(|d| !d.is_unspecified()).unwrap_or(fallback);
            self.request(&buf[..len], peer, local).await;
        }
    }

    async fn request(&self, bytes: &[u8], peer: SocketAddr, local: Ipv4Addr) {
        let refuse = |code: u16, msg: &str| {
            self.stats.refused.inc();
            let e = core::error(code, msg);
            let sock = &self.socket;
            async move {
                let _ = sock.send_to(&e, peer).await;
            }
        };
        let (filename, mode, options) = match Packet::parse(bytes) {
            Ok(Packet::Rrq {
                filename,
                mode,
                options,
            }) => (filename, mode, options),
            Ok(Packet::Wrq { filename, .. }) => {
                tracing::warn!(%peer, %filename, "tftp write refused: read-only server");
                return refuse(code::ACCESS_VIOLATION, "read-only server").await;
            }
            // DATA/ACK/ERROR to the listening port belong to no transfer: drop them.
            Ok(_) | Err(_) => {
                self.stats.malformed.inc();
                return;
            }
        };
        self.stats.requests.inc();
        if mode != "octet" && mode != "netascii" {
            return refuse(code::ILLEGAL_OPERATION, "only octet and netascii modes").await;
        }
        // A seat in the session table before anything is opened; the ticket goes with the transfer's
        // task and frees the seat however the task ends.
        let ticket = match self.stats.gate.enter(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                match why {
                    Busy::Full => self.stats.refused_total.inc(),
                    Busy::PeerFull => self.stats.refused_per_peer.inc(),
                }
                tracing::debug!(%peer, %filename, ?why, "tftp request refused: too many transfers");
                let _ = self.socket.send_to(&core::busy(why), peer).await;
                return;
            }
        };
        // Windows-style separators, and a leading slash meaning the root (as tftpd-hpa -s does).
        let name = filename.replace('\\', "/");
        let rel = name.strip_prefix('/').unwrap_or(&name);
        let Some(path) = confine(&self.root, rel) else {
            let escapes = rel.split('/').any(|c| c == "..") || filename.contains('\0');
            tracing::warn!(%peer, %filename, "tftp request refused: {}", if escapes { "outside the root" } else { "not found" });
            return if escapes {
                refuse(code::ACCESS_VIOLATION, "access violation").await
            } else {
                refuse(code::FILE_NOT_FOUND, "file not found").await
            };
        };
        let data = match self.cache.load(path.clone()).await {
            Some(d) => d,
            None => return refuse(code::FILE_NOT_FOUND, "file not found").await,
        };
        let n = core::negotiate(&options, data.len() as u64, &self.limits);
        if n.timeout_clamped {
            self.stats.timeout_clamped.inc();
        }
        let sock = match UdpSocket::bind(SocketAddr::new(IpAddr::V4(local), 0)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %local, "tftp: cannot open a transfer socket");
                return refuse(code::NOT_DEFINED, "server busy").await;
            }
        };
        tracing::debug!(%peer, file = %path.display(), blksize = n.blksize, window = n.windowsize, "tftp transfer");
        let (limits, stats) = (self.limits, self.stats.clone());
        tokio::spawn(async move {
            let _ticket = ticket;
            let len = data.len() as u64;
            let mut t = Transfer::new(data, &n, &limits);
            match drive(&sock, peer, &mut t).await {
                Ok(()) => {
                    stats.completed.inc();
                    stats.bytes_sent.add(len);
                }
                Err(why) => {
                    stats.failed.inc();
                    tracing::debug!(%peer, file = %path.display(), "tftp transfer ended: {why}");
                }
            }
        });
    }
}

/// Runs one transfer to its end.
async fn drive(sock: &UdpSocket, peer: SocketAddr, t: &mut Transfer) -> Result<(), String> {
    let mut buf = vec![0u8; 2048];
    let mut step = t.start(Instant::now());
    // One timer for the whole transfer, moved only when the deadline moves: re-arming a fresh timer
    // for every block costs more than the block itself at blksize 512 in lock-step.
    let timer = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        let deadline = match step {
            Step::Done => return Ok(()),
            Step::Failed(e) => return Err(e),
            Step::Send(pkts, deadline) => {
                for p in &pkts {
                    sock.send_to(p, peer).await.map_err(|e| e.to_string())?;
                }
                deadline
            }
            Step::Wait(deadline) => deadline,
        };
        if armed != Some(deadline) {
            timer.as_mut().reset(deadline.into());
            armed = Some(deadline);
        }
        step = tokio::select! {
            biased;
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) if from == peer => t.on_packet(&buf[..n], Instant::now(), deadline),
                Ok((_, from)) => {
                    // Another TID: tell it, and carry on with ours (RFC 1350 section 4).
                    let _ = sock.send_to(&core::error(code::UNKNOWN_TID, "unknown transfer ID"), from).await;
                    Step::Wait(deadline)
                }
                Err(_) => Step::Wait(deadline),
            },
            _ = &mut timer => t.on_timeout(Instant::now()),
        };
    }
}

/// One datagram with the address it was sent to (IP_PKTINFO).
fn recv_with_dst(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<Ipv4Addr>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let msg = recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let peer = msg
        .address
        .map(|a| SocketAddr::new(IpAddr::V4(a.ip()), a.port()))
        .ok_or_else(|| std::io::Error::other("no peer address"))?;
    let mut dst = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
                let to = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                let spec = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
                // A broadcast request is answered from the interface's own address.
                dst = Some(if to.is_broadcast() || to.is_multicast() {
                    spec
                } else {
                    to
                });
            }
        }
    }
    Ok((msg.bytes, peer, dst))
}
