//! The DHCP shell: sockets bound to the boot interface (SO_BINDTODEVICE), one blocking thread per port
//! (67, and 4011 in proxy mode) around the shared decision core, leases stored before each reply goes out.
//!
//! Blocking threads rather than async tasks: the work per packet is a decision and, for a REQUEST, a
//! SQLite commit that must finish before the ACK is sent; a thread does exactly that with no hand-offs.
//! Datagrams that arrive together are decided together and their leases committed in one transaction.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};

use super::core::{self, Dest, Port, Responder, Settings};
use super::leases::{LeaseChange, Pool};
use crate::config::{Config, DhcpMode};
use crate::mac::Mac;
use crate::metrics::{write_counter, Counter, Report};
use crate::store::Store;

#[derive(Default)]
pub struct DhcpStats {
    pub received: Counter,
    pub malformed: Counter,
    pub replies: Counter,
    pub offers: Counter,
    pub acks: Counter,
    pub naks: Counter,
    pub ignored: Counter,
    pub store_errors: Counter,
}

impl Report for DhcpStats {
    fn report(&self, out: &mut String) {
        write_counter(
            out,
            "corral_dhcp_received_total",
            "DHCP datagrams received",
            self.received.get(),
        );
        write_counter(
            out,
            "corral_dhcp_malformed_total",
            "Malformed DHCP datagrams dropped",
            self.malformed.get(),
        );
        write_counter(
            out,
            "corral_dhcp_replies_total",
            "DHCP replies sent",
            self.replies.get(),
        );
        write_counter(
            out,
            "corral_dhcp_offers_total",
            "OFFERs sent",
            self.offers.get(),
        );
        write_counter(out, "corral_dhcp_acks_total", "ACKs sent", self.acks.get());
        write_counter(out, "corral_dhcp_naks_total", "NAKs sent", self.naks.get());
        write_counter(
            out,
            "corral_dhcp_ignored_total",
            "Requests not for us (other server, not PXE in proxy mode)",
            self.ignored.get(),
        );
        write_counter(
            out,
            "corral_dhcp_store_errors_total",
            "Leases that could not be stored (no reply sent)",
            self.store_errors.get(),
        );
    }
}

/// The address a node must get (its cluster slot's identity), when the policy gives one.
pub type FixedAddress = Arc<dyn Fn(Mac) -> Option<Ipv4Addr> + Send + Sync>;

pub struct DhcpServer {
    sockets: Vec<(UdpSocket, Port)>,
    responder: Arc<Mutex<Responder>>,
    store: Store,
    stats: Arc<DhcpStats>,
    fixed: Option<FixedAddress>,
}

fn socket(interface: &str, port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    // Nothing is ever received from or sent to another interface.
    s.bind_device(Some(interface.as_bytes()))?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    Ok(s.into())
}

impl DhcpServer {
    pub async fn bind(cfg: &Config, store: Store) -> anyhow::Result<DhcpServer> {
        let Some(iface) = cfg.server.interface.as_deref() else {
            anyhow::bail!("DHCP needs server.interface");
        };
        let mut sockets = vec![(
            socket(iface, cfg.dhcp.port)
                .map_err(|e| anyhow::anyhow!("dhcp port {} on {iface}: {e}", cfg.dhcp.port))?,
            Port::Dhcp,
        )];
        if cfg.dhcp.mode == DhcpMode::Proxy {
            let s = socket(iface, cfg.dhcp.proxy_port)
                .map_err(|e| anyhow::anyhow!("pxe port {} on {iface}: {e}", cfg.dhcp.proxy_port))?;
            sockets.push((s, Port::Pxe));
        }
        let pool = match (cfg.dhcp.mode, cfg.dhcp.range) {
            (DhcpMode::Full, Some([a, b])) => {
                let reservations = cfg
                    .dhcp
                    .reservation
                    .iter()
                    .filter_map(|r| Some((Mac::parse(&r.mac)?, r.address, r.hostname.clone())))
                    .collect();
                let mut pool = Pool::new(a, b, reservations);
                let s = store.clone();
                pool.load(&tokio::task::spawn_blocking(move || s.leases()).await??);
                Some(pool)
            }
            _ => None,
        };
        let responder = Responder::new(Settings::from_config(cfg), pool);
        Ok(DhcpServer {
            sockets,
            responder: Arc::new(Mutex::new(responder)),
            store,
            stats: Arc::default(),
            fixed: None,
        })
    }

    /// Gives nodes in cluster slots their slot's address.
    pub fn with_fixed_addresses(mut self, f: FixedAddress) -> DhcpServer {
        self.fixed = Some(f);
        self
    }

    pub fn stats(&self) -> Arc<DhcpStats> {
        self.stats.clone()
    }

    /// Serves until a socket fails.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut threads = tokio::task::JoinSet::new();
        for (sock, port) in self.sockets {
            let (responder, store, stats, fixed) = (
                self.responder.clone(),
                self.store.clone(),
                self.stats.clone(),
                self.fixed.clone(),
            );
            threads.spawn_blocking(move || {
                serve(sock, port, &responder, &store, &stats, fixed.as_ref())
            });
        }
        match threads.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(anyhow::anyhow!("dhcp thread: {e}")),
            None => Ok(()),
        }
    }
}

/// Most datagrams taken from the socket before their leases are committed together.
const BATCH: usize = 64;

/// A decided reply waiting for its batch's commit.
struct Pending {
    msg: dhcproto::v4::Message,
    to: SocketAddrV4,
    mac: Option<Mac>,
}

fn serve(
    sock: UdpSocket,
    port: Port,
    responder: &Mutex<Responder>,
    store: &Store,
    stats: &DhcpStats,
    fixed: Option<&FixedAddress>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut changes = Vec::new();
    let mut replies: Vec<Pending> = Vec::new();
    loop {
        // Wait for one datagram, then take whatever else has already arrived (up to BATCH) without
        // waiting: under load the lease commit is shared by the whole burst, and when idle a lone
        // request is answered at once.
        sock.set_nonblocking(false)?;
        let first = sock.recv_from(&mut buf)?;
        sock.set_nonblocking(true)?;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some((n, src)) = next.take() {
            taken += 1;
            stats.received.inc();
            decide(
                &buf[..n],
                src,
                port,
                responder,
                stats,
                fixed,
                &mut changes,
                &mut replies,
            );
            if taken < BATCH {
                match sock.recv_from(&mut buf) {
                    Ok(got) => next = Some(got),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // The leases are durable before any client hears of them.
        if let Err(e) = store.apply_leases(&changes) {
            stats.store_errors.add(replies.len() as u64);
            tracing::error!(error = %e, "cannot store leases; not answering this batch");
            changes.clear();
            replies.clear();
            continue;
        }
        changes.clear();
        for r in replies.drain(..) {
            match r.msg.opts().msg_type() {
                Some(dhcproto::v4::MessageType::Offer) => stats.offers.inc(),
                Some(dhcproto::v4::MessageType::Ack) => stats.acks.inc(),
                Some(dhcproto::v4::MessageType::Nak) => stats.naks.inc(),
                _ => {}
            }
            tracing::debug!(mac = ?r.mac, kind = ?r.msg.opts().msg_type(), yiaddr = %r.msg.yiaddr(), to = %r.to, "dhcp reply");
            if let Err(e) = sock.send_to(&core::encode(&r.msg), r.to) {
                tracing::warn!(error = %e, to = %r.to, "dhcp send failed");
            } else {
                stats.replies.inc();
            }
        }
    }
}

/// Runs one datagram through the decision core, queueing its lease changes and reply.
#[allow(clippy::too_many_arguments)]
fn decide(
    data: &[u8],
    src: SocketAddr,
    port: Port,
    responder: &Mutex<Responder>,
    stats: &DhcpStats,
    fixed: Option<&FixedAddress>,
    changes: &mut Vec<LeaseChange>,
    replies: &mut Vec<Pending>,
) {
    let SocketAddr::V4(src) = src else { return };
    let Some(msg) = core::decode(data) else {
        stats.malformed.inc();
        return;
    };
    let mac = Mac::from_slice(msg.chaddr());
    let fixed_ip = mac.and_then(|m| fixed.and_then(|f| f(m)));
    let outcome = responder.lock().unwrap_or_else(|p| p.into_inner()).handle(
        &msg,
        port,
        src,
        crate::unix_now(),
        fixed_ip,
    );
    changes.extend(outcome.changes);
    let Some(reply) = outcome.reply else {
        stats.ignored.inc();
        return;
    };
    let to = match reply.dest {
        Dest::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
        Dest::Unicast(a) => a,
    };
    replies.push(Pending {
        msg: reply.msg,
        to,
        mac,
    });
}
