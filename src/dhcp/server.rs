//! The DHCP shell: sockets bound to the boot interface (SO_BINDTODEVICE), one blocking thread per port
//! (67, and 4011 in proxy mode) around the shared decision core, leases stored before each reply goes out.
//!
//! Blocking threads rather than async tasks: the work per packet is a decision and, for a REQUEST, a
//! SQLite commit that must finish before the ACK is sent; a thread does exactly that with no hand-offs.
//! Datagrams that arrive together are decided together and their leases committed in one transaction.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};

use super::core::{self, Dest, Note, Port, Responder, Settings, Sighting};
use super::leases::Pool;
use crate::config::{Config, DhcpMode};
use crate::domain::{LeaseChange, Mac};
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
    pub declines_ignored: Counter,
    pub declines_honoured: Counter,
    pub reclaimed: Counter,
    pub exhausted: Counter,
    pub leases_pruned: Counter,
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
        write_counter(
            out,
            "corral_dhcp_declines_ignored_total",
            "DHCPDECLINEs ignored: not from the holder of a fresh lease of the address",
            self.declines_ignored.get(),
        );
        write_counter(
            out,
            "corral_dhcp_declines_total",
            "DHCPDECLINEs honoured (the address is held back for 10 minutes)",
            self.declines_honoured.get(),
        );
        write_counter(
            out,
            "corral_dhcp_reclaimed_total",
            "Addresses a known node took from a stranger's lease when the pool was exhausted",
            self.reclaimed.get(),
        );
        write_counter(
            out,
            "corral_dhcp_exhausted_total",
            "DISCOVERs left without an offer: the pool was exhausted",
            self.exhausted.get(),
        );
        write_counter(
            out,
            "corral_dhcp_leases_pruned_total",
            "Leases deleted long after they expired (dhcp.expired_lease_retention)",
            self.leases_pruned.get(),
        );
    }
}

/// The address a node must get (its cluster slot's identity), when the policy gives one.
pub type FixedAddress = Arc<dyn Fn(Mac) -> Option<Ipv4Addr> + Send + Sync>;

/// Told what DHCP learnt of each node (a boot starting, its address) before the reply goes out, so the
/// node's next script request is judged by it. Must be quick: it runs on the DHCP thread.
pub type Observer = Arc<dyn Fn(Sighting) + Send + Sync>;

pub struct DhcpServer {
    sockets: Vec<(UdpSocket, Port)>,
    responder: Arc<Mutex<Responder>>,
    store: Store,
    stats: Arc<DhcpStats>,
    fixed: Option<FixedAddress>,
    observer: Option<Observer>,
    /// Seconds expired leases are kept (dhcp.expired_lease_retention).
    retention: u64,
    liveness: Option<crate::liveness::Liveness>,
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
            observer: None,
            retention: cfg.dhcp.expired_lease_retention,
            liveness: None,
        })
    }

    /// Gives nodes in cluster slots their slot's address.
    pub fn with_fixed_addresses(mut self, f: FixedAddress) -> DhcpServer {
        self.fixed = Some(f);
        self
    }

    /// Each serving thread beats `l` while it runs (systemd's watchdog).
    pub fn with_liveness(mut self, l: crate::liveness::Liveness) -> DhcpServer {
        self.liveness = Some(l);
        self
    }

    /// Reports every sighting of a node (see [`Observer`]).
    pub fn with_observer(mut self, o: Observer) -> DhcpServer {
        self.observer = Some(o);
        self
    }

    /// Lets nodes corral knows reclaim strangers' addresses when the pool is exhausted.
    pub fn with_known(self, known: core::Known) -> DhcpServer {
        self.responder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .known = Some(known);
        self
    }

    pub fn stats(&self) -> Arc<DhcpStats> {
        self.stats.clone()
    }

    /// Serves until a socket fails.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut threads = tokio::task::JoinSet::new();
        for (sock, port) in self.sockets {
            let ctx = Shell {
                responder: self.responder.clone(),
                store: self.store.clone(),
                stats: self.stats.clone(),
                fixed: self.fixed.clone(),
                observer: self.observer.clone(),
                retention: self.retention,
                beat: self
                    .liveness
                    .as_ref()
                    .map(|l| l.register(&format!("dhcp-{port:?}"), crate::liveness::now_ms())),
            };
            threads.spawn_blocking(move || serve(sock, port, &ctx));
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

/// What each serving thread shares.
struct Shell {
    responder: Arc<Mutex<Responder>>,
    store: Store,
    stats: Arc<DhcpStats>,
    fixed: Option<FixedAddress>,
    observer: Option<Observer>,
    retention: u64,
    beat: Option<crate::liveness::Beat>,
}

/// Seconds between sweeps of long-expired leases.
const PRUNE_EVERY: u64 = 60;
/// A quiet network still wakes the thread this often (its liveness beat, the lease sweep).
const WAKE_EVERY: u64 = 2;

fn serve(sock: UdpSocket, port: Port, sh: &Shell) -> anyhow::Result<()> {
    let (responder, store, stats) = (&*sh.responder, &sh.store, &*sh.stats);
    let mut buf = vec![0u8; 4096];
    let mut changes = Vec::new();
    let mut replies: Vec<Pending> = Vec::new();
    let mut seen: Vec<Sighting> = Vec::new();
    let mut last_prune = 0u64;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(WAKE_EVERY)))?;
    loop {
        if let Some(b) = &sh.beat {
            b.beat(crate::liveness::now_ms());
        }
        let now = crate::unix_now();
        if port == Port::Dhcp && now.saturating_sub(last_prune) >= PRUNE_EVERY {
            last_prune = now;
            let gone = responder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pool
                .as_mut()
                .map(|p| p.prune(now, sh.retention))
                .unwrap_or_default();
            if !gone.is_empty() {
                match store.apply_leases(&gone) {
                    Ok(()) => stats.leases_pruned.add(gone.len() as u64),
                    Err(e) => tracing::error!(error = %e, "cannot delete expired leases"),
                }
            }
        }
        // Wait for one datagram, then take whatever else has already arrived (up to BATCH) without
        // waiting: under load the lease commit is shared by the whole burst, and when idle a lone
        // request is answered at once.
        sock.set_nonblocking(false)?;
        let first = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
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
                sh,
                &mut changes,
                &mut replies,
                &mut seen,
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
            seen.clear();
            continue;
        }
        changes.clear();
        // Before the replies: a node that gets its ACK asks for its script at once, and is judged by what
        // DHCP just saw.
        if let Some(o) = &sh.observer {
            seen.drain(..).for_each(|s| o(s));
        } else {
            seen.clear();
        }
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

/// Runs one datagram through the decision core, queueing its lease changes, sighting and reply.
fn decide(
    data: &[u8],
    src: SocketAddr,
    port: Port,
    sh: &Shell,
    changes: &mut Vec<LeaseChange>,
    replies: &mut Vec<Pending>,
    seen: &mut Vec<Sighting>,
) {
    let stats = &sh.stats;
    let SocketAddr::V4(src) = src else { return };
    let Some(msg) = core::decode(data) else {
        stats.malformed.inc();
        return;
    };
    let mac = Mac::from_slice(msg.chaddr());
    let fixed_ip = mac.and_then(|m| sh.fixed.as_ref().and_then(|f| f(m)));
    let outcome = sh
        .responder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .handle(&msg, port, src, crate::unix_now(), fixed_ip);
    changes.extend(outcome.changes);
    seen.extend(outcome.seen);
    match outcome.note {
        Some(Note::DeclineIgnored) => stats.declines_ignored.inc(),
        Some(Note::DeclineHonoured) => stats.declines_honoured.inc(),
        Some(Note::Reclaimed { .. }) => stats.reclaimed.inc(),
        Some(Note::Exhausted) => stats.exhausted.inc(),
        None => {}
    }
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
