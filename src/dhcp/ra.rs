//! IPv6 router advertisements on the boot network: prefix only, router lifetime 0, so hosts never take this
//! server as a default router. Their point is iPXE: it finishes "Configuring" only when every configurator
//! is done, and without any RA it waits ~16 s for IPv6 on every boot. An RA answers that at once.
//!
//! `build` is pure; `run` sends one every `interval` seconds and answers each Router Solicitation.

use std::net::{Ipv6Addr, SocketAddrV6};

/// The advertisement's bytes (ICMPv6 type 134; the kernel fills in the checksum for raw ICMPv6 sockets).
pub fn build(prefix: Ipv6Addr, mac: Option<[u8; 6]>) -> Vec<u8> {
    let mut p = vec![
        134, 0, 0, 0, // type, code, checksum
        64, 0, // current hop limit; M=0 O=0: no DHCPv6
        0, 0, // router lifetime 0: not a default router
        0, 0, 0, 0, // reachable time
        0, 0, 0, 0, // retrans timer
    ];
    // Prefix information: /64, on-link and autonomous (SLAAC).
    p.extend_from_slice(&[3, 4, 64, 0xc0]);
    p.extend_from_slice(&86_400u32.to_be_bytes());
    p.extend_from_slice(&14_400u32.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&prefix.octets());
    if let Some(m) = mac {
        p.extend_from_slice(&[1, 1]);
        p.extend_from_slice(&m);
    }
    p
}

/// Whether an ICMPv6 message is a Router Solicitation.
pub fn is_solicitation(b: &[u8]) -> bool {
    b.first() == Some(&133)
}

/// The interface's MAC from sysfs, for the source link-layer option.
fn interface_mac(iface: &str) -> Option<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?;
    crate::domain::Mac::parse(s.trim()).map(|m| m.0)
}

/// Sends advertisements forever; blocking (runs on its own thread). Advertisements are a convenience, so
/// a failure (the interface's link-local address still tentative, the interface gone for a while) is
/// logged and retried rather than taking the boot server down.
pub fn run(iface: &str, prefix: Ipv6Addr, interval: u64) -> anyhow::Result<()> {
    let mut logged = false;
    loop {
        if let Err(e) = advertise(iface, prefix, interval) {
            if !logged {
                tracing::warn!(error = %e, iface, "router advertisements failed; retrying");
                logged = true;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

fn advertise(iface: &str, prefix: Ipv6Addr, interval: u64) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let index = nix::net::if_::if_nametoindex(iface)
        .map_err(|e| anyhow::anyhow!("interface {iface}: {e}"))?;
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.bind_device(Some(iface.as_bytes()))?;
    // Neighbour discovery requires hop limit 255 (RFC 4861 6.1.2).
    s.set_multicast_hops_v6(255)?;
    s.set_unicast_hops_v6(255)?;
    s.set_multicast_if_v6(index)?;
    s.join_multicast_v6(&"ff02::2".parse()?, index)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(interval.max(1))))?;
    let ra = build(prefix, interface_mac(iface));
    let all_nodes = SocketAddrV6::new("ff02::1".parse()?, 0, 0, index);
    let sock: std::net::UdpSocket = s.into(); // only for its recv/send helpers on the raw fd
    let mut buf = [0u8; 1500];
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(interval + 1);
    loop {
        if last.elapsed().as_secs() >= interval {
            sock.send_to(&ra, all_nodes)?;
            last = std::time::Instant::now();
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if is_solicitation(&buf[..n]) => {
                sock.send_to(&ra, all_nodes)?;
                last = std::time::Instant::now();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_layout() {
        let p = build("fd00:77::".parse().unwrap(), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(p.len(), 16 + 32 + 8);
        assert_eq!(p[0], 134);
        assert_eq!(&p[6..8], &[0, 0], "router lifetime must be 0");
        assert_eq!(p[5] & 0xc0, 0, "no DHCPv6 flags");
        assert_eq!(&p[16..20], &[3, 4, 64, 0xc0]);
        assert_eq!(&p[32..34], &[0xfd, 0x00]);
        assert_eq!(&p[48..56], &[1, 1, 2, 0, 0, 0, 0, 1]);
        assert!(is_solicitation(&[133, 0, 0, 0]));
        assert!(!is_solicitation(&[134]));
    }
}
