//! Wake-on-LAN: the magic packet (six 0xff, then the MAC sixteen times) as a UDP broadcast to port 9 on the
//! boot interface only. It can switch a node on; off goes through the node's agent.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use super::{failed, PowerDriver, PowerError, PowerResult, PowerState};
use crate::domain::Mac;

pub struct Wol {
    mac: Mac,
    interface: Option<String>,
    broadcast: Ipv4Addr,
}

/// The 102-byte magic packet for `mac`.
pub fn magic_packet(mac: Mac) -> Vec<u8> {
    let mut p = vec![0xffu8; 6];
    for _ in 0..16 {
        p.extend_from_slice(&mac.0);
    }
    p
}

impl Wol {
    pub fn new(mac: Mac, interface: Option<String>, broadcast: Ipv4Addr) -> Wol {
        Wol {
            mac,
            interface,
            broadcast,
        }
    }

    pub fn send(&self) -> std::io::Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_broadcast(true)?;
        if let Some(i) = &self.interface {
            // Nothing leaves through another interface.
            s.bind_device(Some(i.as_bytes()))?;
        }
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
        let s: UdpSocket = s.into();
        let p = magic_packet(self.mac);
        // Sent three times: it is one unacknowledged datagram.
        for _ in 0..3 {
            s.send_to(&p, (self.broadcast, 9))?;
        }
        Ok(())
    }
}

impl PowerDriver for Wol {
    fn kind(&self) -> &'static str {
        "wol"
    }
    fn on(&self) -> PowerResult<()> {
        self.send().map_err(failed)
    }
    fn off(&self, _: bool) -> PowerResult<()> {
        Err(PowerError::Unsupported("wol"))
    }
    fn cycle(&self) -> PowerResult<()> {
        Err(PowerError::Unsupported("wol"))
    }
    fn status(&self) -> PowerResult<PowerState> {
        Ok(PowerState::Unknown)
    }
    fn boot_network_once(&self) -> PowerResult<()> {
        Err(PowerError::Unsupported("wol"))
    }
}
