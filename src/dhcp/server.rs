//! The DHCP shell: sockets bound to the boot interface (SO_BINDTODEVICE), one blocking thread per port
//! (67, and 4011 in proxy mode) around the shared decision core, leases stored before each reply goes out.
//!
//! Blocking threads rather than async tasks: the work per packet is a decision and, for a REQUEST, one
//! SQLite commit that must finish before the ACK is sent; a thread does exactly that with no hand-offs.

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

fn serve(
    sock: UdpSocket,
    port: Port,
    responder: &Mutex<Responder>,
    store: &Store,
    stats: &DhcpStats,
    fixed: Option<&FixedAddress>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, src) = sock.recv_from(&mut buf)?;
        stats.received.inc();
        let SocketAddr::V4(src) = src else { continue };
        let Some(msg) = core::decode(&buf[..n]) else {
            stats.malformed.inc();
            continue;
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
        // The lease is durable before the client hears of it.
        let stored = outcome.changes.iter().try_for_each(|c| match c {
            LeaseChange::Put(l) => store.put_lease(l),
            LeaseChange::Remove(ip) => store.delete_lease(*ip),
        });
        if let Err(e) = stored {
            stats.store_errors.inc();
            tracing::error!(error = %e, "cannot store a lease; not answering");
            continue;
        }
        let Some(reply) = outcome.reply else {
            stats.ignored.inc();
            continue;
        };
        let to = match reply.dest {
            Dest::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
            Dest::Unicast(a) => a,
        };
        match reply.msg.opts().msg_type() {
            Some(dhcproto::v4::MessageType::Offer) => stats.offers.inc(),
            Some(dhcproto::v4::MessageType::Ack) => stats.acks.inc(),
            Some(dhcproto::v4::MessageType::Nak) => stats.naks.inc(),
            _ => {}
        }
        tracing::debug!(mac = ?mac, kind = ?reply.msg.opts().msg_type(), yiaddr = %reply.msg.yiaddr(), %to, "dhcp reply");
        if let Err(e) = sock.send_to(&core::encode(&reply.msg), to) {
            tracing::warn!(error = %e, %to, "dhcp send failed");
        } else {
            stats.replies.inc();
        }
    }
}
