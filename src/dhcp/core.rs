//! The DHCP decision core, sans IO: a decoded request, the port it came in on and `now` go in; a reply and
//! where to send it, plus the lease changes to persist first, come out.
//!
//! Client kinds: option 93 picks the first-stage file (0 BIOS, 6 IA32 EFI, 7/9 x64 EFI, 10/11 ARM, 16 x64
//! UEFI HTTP boot); iPXE (user class `iPXE`, or option 175 present) gets the HTTP entry script instead, so
//! there is never a chainload loop; UEFI HTTP-boot clients get an HTTP URL and option 60 `HTTPClient`.
//!
//! Long because proxy and full mode share one `Responder`: client kinds, options, boot file, destination.

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, UnknownOption};
use std::net::{Ipv4Addr, SocketAddrV4};

use super::leases::{Declined, Pool, Refusal};
use crate::config::{Config, DhcpMode};
use crate::domain::{LeaseChange, Mac};

/// Where a request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCP (and ProxyDHCP offers).
    Dhcp,
    /// 4011: PXE boot-server requests (ProxyDHCP REQUEST).
    Pxe,
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// Limited broadcast on the serving interface, port 68.
    Broadcast,
    /// A unicast address and port.
    Unicast(SocketAddrV4),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub msg: Message,
    pub dest: Dest,
}

/// What corral's DHCP learnt of a node from one request: that it starts a boot (a DISCOVER, or a REQUEST
/// straight from INIT-REBOOT), and the address it has or asks for. This is how corral knows who a node is:
/// a script request for a MAC is the node's own only if it comes from the address DHCP knows it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sighting {
    pub mac: Mac,
    /// Full mode: the address ACKed. Proxy mode: the address the node asks the site server for (option
    /// 50 of its broadcast REQUEST) or reports in its PXE request (ciaddr).
    pub address: Option<Ipv4Addr>,
    /// The request begins a boot (a new DHCP exchange), not a renewal.
    pub boot: bool,
    /// Seconds the address is good for (full mode: the lease time; proxy mode: unknown).
    pub valid_for: Option<u32>,
}

/// Something worth counting that is not a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// A DECLINE from someone not holding a fresh lease of that address.
    DeclineIgnored,
    /// A DECLINE honoured: the address is held back.
    DeclineHonoured,
    /// The pool was exhausted and a known node took a stranger's address.
    Reclaimed { from: Mac },
    /// The pool was exhausted: no offer.
    Exhausted,
}

/// What handling one request produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Persist these before sending the reply.
    pub changes: Vec<LeaseChange>,
    pub reply: Option<Reply>,
    /// What this request says about the node (reported to the controller before the reply goes out).
    pub seen: Option<Sighting>,
    pub note: Option<Note>,
}

/// Settings the core needs, taken from the config once.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: DhcpMode,
    pub server: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub network: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_time: u32,
    pub offer_hold: u32,
    pub no_pxedhcp: bool,
    pub entry_url: String,
    pub http_base: String,
    pub bios: String,
    pub efi_x64: String,
    pub efi_ia32: String,
    pub efi_arm64: String,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        let (network, prefix) = cfg.subnet().unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
        let d = &cfg.dhcp;
        Settings {
            mode: d.mode,
            server: cfg.server.address,
            netmask: Ipv4Addr::from(crate::config::prefix_mask(prefix)),
            network,
            router: d.router,
            dns: d.dns.clone(),
            domain: d.domain.clone(),
            lease_time: d.lease_time,
            offer_hold: d.offer_hold,
            no_pxedhcp: d.no_pxedhcp,
            entry_url: format!("{}/boot.ipxe", cfg.public_url()),
            http_base: format!("{}/ipxe", cfg.public_url()),
            bios: cfg.boot.bios.clone(),
            efi_x64: cfg.boot.efi_x64.clone(),
            efi_ia32: cfg.boot.efi_ia32.clone(),
            efi_arm64: cfg.boot.efi_arm64.clone(),
        }
    }
}

/// What kind of boot client sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKind {
    pub arch: u16,
    pub pxe: bool,
    pub http: bool,
    pub ipxe: bool,
}

impl ClientKind {
    pub fn of(msg: &Message) -> ClientKind {
        let opts = msg.opts();
        let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => u16::from(*a),
            _ => 0,
        };
        let vendor = match opts.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => v.as_slice(),
            _ => &[],
        };
        let user = match opts.get(OptionCode::UserClass) {
            Some(DhcpOption::UserClass(v)) => v.as_slice(),
            _ => &[],
        };
        let ipxe =
            user.windows(4).any(|w| w == b"iPXE") || opts.get(OptionCode::Unknown(175)).is_some();
        ClientKind {
            arch,
            pxe: vendor.starts_with(b"PXEClient"),
            http: vendor.starts_with(b"HTTPClient"),
            ipxe,
        }
    }

    fn netboot(&self) -> bool {
        self.pxe || self.http || self.ipxe
    }
}

/// The boot file for a client: (file field / option 67, is it an HTTP URL).
pub fn boot_file(s: &Settings, k: &ClientKind) -> Option<String> {
    if k.ipxe {
        return Some(s.entry_url.clone());
    }
    let first = match k.arch {
        6 => &s.efi_ia32,
        7 | 9 | 16 => &s.efi_x64,
        10 | 11 | 19 => &s.efi_arm64,
        _ => &s.bios,
    };
    if k.http {
        return Some(format!("{}/{first}", s.http_base));
    }
    k.pxe.then(|| first.clone())
}

/// Decodes a datagram; `None` for anything that is not a well-formed BOOTREQUEST from Ethernet.
///
/// dhcproto 0.15 asserts on some malformed options (fixed-length options with another length, classless
/// routes with a prefix over 32, bulk-leasequery codes with length 0) instead of returning an error; our
/// property test found it. Such packets are refused before decoding, and the decoder runs under
/// `catch_unwind` so that any case we did not foresee is a dropped packet, never a dead server.
pub fn decode(bytes: &[u8]) -> Option<Message> {
    use dhcproto::{Decodable, Decoder};
    if !options_sane(bytes) {
        return None;
    }
    let msg =
        std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes)).ok()).ok()??;
    let ok =
        msg.opcode() == Opcode::BootRequest && msg.hlen() == 6 && msg.opts().msg_type().is_some();
    ok.then_some(msg)
}

/// Walks the options area: every option fits in the packet, and the ones dhcproto would assert on have
/// the lengths it expects. Options we never use are otherwise left to the decoder. dhcproto joins
/// consecutive instances of one option into one (RFC 3396 long options), so lengths are checked per run.
fn options_sane(b: &[u8]) -> bool {
    const COOKIE: [u8; 4] = [99, 130, 83, 99];
    if b.len() < 240 || b[236..240] != COOKIE {
        return false;
    }
    let length_ok = |code: u8, len: usize| match code {
        // Rapid commit carries no data; with some, dhcproto debug-asserts, and in release builds reads
        // the data as further options (found by the dhcp fuzz target).
        80 => len == 0,
        // Client FQDN: flags and two rcodes before the name (dhcproto subtracts 3).
        81 => len >= 3,
        94 => len == 3,
        151 => len >= 1,
        152..=155 => len == 4,
        // Classless static routes: we never use them, and a bad prefix length panics.
        121 => false,
        _ => true,
    };
    // The run of one option code being walked: (code, total length).
    let mut run: Option<(u8, usize)> = None;
    let mut i = 240;
    while i < b.len() {
        let code = b[i];
        if code == 0 || code == 255 {
            if let Some((c, total)) = run.take() {
                if !length_ok(c, total) {
                    return false;
                }
            }
            if code == 255 {
                return true;
            }
            i += 1;
            continue;
        }
        let Some(&len) = b.get(i + 1) else {
            return false;
        };
        let len = len as usize;
        if i + 2 + len > b.len() {
            return false;
        }
        run = match run {
            Some((c, total)) if c == code => Some((c, total + len)),
            Some((c, total)) if !length_ok(c, total) => return false,
            _ => Some((code, len)),
        };
        i += 2 + len;
    }
    run.is_none_or(|(c, total)| length_ok(c, total))
}

/// Encodes a reply, padded to the BOOTP minimum of 300 bytes that some PXE ROMs insist on.
pub fn encode(msg: &Message) -> Vec<u8> {
    use dhcproto::Encodable;
    let mut v = msg.to_vec().unwrap_or_default();
    if v.len() < 300 {
        v.resize(300, 0);
    }
    v
}

/// Whether corral knows a MAC (listed, reserved or in the inventory): such nodes may reclaim strangers'
/// addresses when the pool is exhausted.
pub type Known = std::sync::Arc<dyn Fn(Mac) -> bool + Send + Sync>;

pub struct Responder {
    pub settings: Settings,
    pub pool: Option<Pool>,
    /// Unset: nothing is ever reclaimed.
    pub known: Option<Known>,
}

impl Responder {
    pub fn new(settings: Settings, pool: Option<Pool>) -> Responder {
        Responder {
            settings,
            pool,
            known: None,
        }
    }

    /// Handles one request. `fixed` gives the address a node must have (its cluster slot's identity).
    pub fn handle(
        &mut self,
        msg: &Message,
        port: Port,
        src: SocketAddrV4,
        now: u64,
        fixed: Option<Ipv4Addr>,
    ) -> Outcome {
        let Some(mac) = Mac::from_slice(msg.chaddr()) else {
            return Outcome::default();
        };
        let Some(kind) = msg.opts().msg_type() else {
            return Outcome::default();
        };
        match self.settings.mode {
            DhcpMode::Off => Outcome::default(),
            DhcpMode::Proxy => self.proxy(msg, kind, port, src),
            DhcpMode::Full => {
                if port == Port::Pxe {
                    // A full server hands boot information out with the address; 4011 stays closed.
                    return Outcome::default();
                }
                self.full(msg, mac, kind, now, fixed)
            }
        }
    }

    fn proxy(
        &mut self,
        msg: &Message,
        kind: MessageType,
        port: Port,
        src: SocketAddrV4,
    ) -> Outcome {
        let client = ClientKind::of(msg);
        let mac = Mac::from_slice(msg.chaddr());
        // The site server hands out the addresses; what corral can see of them is the address a client
        // asks for in its broadcast REQUEST (any client: the booted OS's DHCP too) and the ciaddr of a PXE
        // request, which the client sends from that address.
        let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let ciaddr = (msg.ciaddr() != Ipv4Addr::UNSPECIFIED).then_some(msg.ciaddr());
        let seen = mac.and_then(|mac| match (kind, port) {
            (MessageType::Discover, Port::Dhcp) if client.pxe || client.http => Some(Sighting {
                mac,
                address: None,
                boot: true,
                valid_for: None,
            }),
            (MessageType::Request, Port::Dhcp) => Some(Sighting {
                mac,
                address: requested.or(ciaddr),
                boot: ciaddr.is_none(),
                valid_for: None,
            }),
            (MessageType::Request | MessageType::Inform, Port::Pxe) => ciaddr.map(|a| Sighting {
                mac,
                address: Some(a),
                boot: false,
                valid_for: None,
            }),
            _ => None,
        });
        // ProxyDHCP answers PXE and HTTP-boot firmware only, never ordinary clients.
        if !(client.pxe || client.http) {
            return Outcome {
                seen,
                ..Outcome::default()
            };
        }
        let (reply_type, dest) = match (kind, port) {
            (MessageType::Discover, Port::Dhcp) => (MessageType::Offer, Dest::Broadcast),
            // A request from 0.0.0.0 (a client without an address yet) cannot be answered by unicast:
            // sent to 0.0.0.0 the reply would go to this host itself.
            (MessageType::Request, Port::Pxe) | (MessageType::Inform, Port::Pxe)
                if src.ip().is_unspecified() =>
            {
                (MessageType::Ack, Dest::Broadcast)
            }
            (MessageType::Request, Port::Pxe) | (MessageType::Inform, Port::Pxe) => {
                (MessageType::Ack, Dest::Unicast(src))
            }
            _ => {
                return Outcome {
                    seen,
                    ..Outcome::default()
                }
            }
        };
        let mut r = self.base_reply(msg, reply_type);
        self.boot_info(&mut r, &client, true);
        let dest = if msg.giaddr() != Ipv4Addr::UNSPECIFIED {
            Dest::Unicast(SocketAddrV4::new(msg.giaddr(), 67))
        } else {
            dest
        };
        Outcome {
            reply: Some(Reply { msg: r, dest }),
            seen,
            ..Outcome::default()
        }
    }

    fn full(
        &mut self,
        msg: &Message,
        mac: Mac,
        kind: MessageType,
        now: u64,
        fixed: Option<Ipv4Addr>,
    ) -> Outcome {
        let s = &self.settings;
        let giaddr = msg.giaddr();
        // Relayed from another network: we serve one subnet, and answer only relays inside it.
        if giaddr != Ipv4Addr::UNSPECIFIED && !same_net(giaddr, s.network, s.netmask) {
            return Outcome::default();
        }
        let fixed = fixed.filter(|f| same_net(*f, s.network, s.netmask));
        let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let hostname = match msg.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(
                h.chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(63)
                    .collect::<String>(),
            ),
            _ => None,
        };
        let client_id = match msg.opts().get(OptionCode::ClientIdentifier) {
            Some(DhcpOption::ClientIdentifier(c)) => Some(c.clone()),
            _ => None,
        };
        let hold = s.offer_hold as u64;
        let lease_time = s.lease_time;
        let Some(pool) = self.pool.as_mut() else {
            return Outcome::default();
        };
        let boot = |address| {
            Some(Sighting {
                mac,
                address,
                boot: true,
                valid_for: None,
            })
        };
        match kind {
            MessageType::Discover => {
                let never = |_: Mac| false;
                let known: &dyn Fn(Mac) -> bool = match &self.known {
                    Some(k) => k.as_ref(),
                    None => &never,
                };
                let Some((ip, reclaimed)) =
                    pool.offer_or_reclaim(mac, requested, now, hold, fixed, known)
                else {
                    tracing::warn!(%mac, "dhcp pool exhausted: no offer");
                    return Outcome {
                        seen: boot(None),
                        note: Some(Note::Exhausted),
                        ..Outcome::default()
                    };
                };
                let mut out = self.address_reply(msg, MessageType::Offer, ip, Vec::new());
                out.seen = boot(None);
                if let Some(from) = reclaimed {
                    tracing::warn!(%mac, %ip, stranger = %from, "dhcp pool exhausted: a known node takes a stranger's address");
                    out.note = Some(Note::Reclaimed { from });
                }
                out
            }
            MessageType::Request => {
                if server_id.is_some_and(|id| id != self.settings.server) {
                    // The client chose another server's offer.
                    pool.forget_offer(mac);
                    return Outcome::default();
                }
                let ciaddr = msg.ciaddr();
                let ip = requested.or((ciaddr != Ipv4Addr::UNSPECIFIED).then_some(ciaddr));
                let Some(ip) = ip else {
                    return Outcome::default();
                };
                match pool.request(mac, ip, now, lease_time, client_id, hostname, fixed) {
                    Ok(change) => {
                        let mut out = self.address_reply(msg, MessageType::Ack, ip, vec![change]);
                        out.seen = Some(Sighting {
                            mac,
                            address: Some(ip),
                            // From INIT-REBOOT (no ciaddr) a REQUEST starts a boot; RENEWING does not.
                            boot: ciaddr == Ipv4Addr::UNSPECIFIED,
                            valid_for: Some(lease_time),
                        });
                        out
                    }
                    Err(Refusal::Wrong) => self.nak(msg),
                }
            }
            MessageType::Release => Outcome {
                changes: pool.release(mac, msg.ciaddr()).into_iter().collect(),
                ..Outcome::default()
            },
            MessageType::Decline => {
                let Some(ip) = requested else {
                    return Outcome::default();
                };
                match pool.decline(mac, ip, client_id.as_deref(), now) {
                    Declined::Honoured(change) => {
                        tracing::warn!(%mac, %ip, "dhcp decline: the address is in use; held back");
                        Outcome {
                            changes: change.into_iter().collect(),
                            note: Some(Note::DeclineHonoured),
                            ..Outcome::default()
                        }
                    }
                    Declined::Ignored => Outcome {
                        note: Some(Note::DeclineIgnored),
                        ..Outcome::default()
                    },
                }
            }
            MessageType::Inform => {
                let mut r = self.base_reply(msg, MessageType::Ack);
                r.set_ciaddr(msg.ciaddr());
                self.net_options(&mut r, msg, None);
                let client = ClientKind::of(msg);
                self.boot_info(&mut r, &client, false);
                let dest = reply_dest(msg, false);
                Outcome {
                    reply: Some(Reply { msg: r, dest }),
                    ..Outcome::default()
                }
            }
            _ => Outcome::default(),
        }
    }

    fn address_reply(
        &self,
        msg: &Message,
        t: MessageType,
        ip: Ipv4Addr,
        changes: Vec<LeaseChange>,
    ) -> Outcome {
        let mut r = self.base_reply(msg, t);
        r.set_yiaddr(ip);
        let mac = Mac::from_slice(msg.chaddr());
        let host = mac.and_then(|m| self.pool.as_ref()?.reservation(m)?.1.clone());
        self.net_options(&mut r, msg, host);
        let o = r.opts_mut();
        o.insert(DhcpOption::AddressLeaseTime(self.settings.lease_time));
        o.insert(DhcpOption::Renewal(self.settings.lease_time / 2));
        o.insert(DhcpOption::Rebinding(self.settings.lease_time / 8 * 7));
        let client = ClientKind::of(msg);
        self.boot_info(&mut r, &client, false);
        Outcome {
            changes,
            reply: Some(Reply {
                msg: r,
                dest: reply_dest(msg, false),
            }),
            ..Outcome::default()
        }
    }

    fn nak(&self, msg: &Message) -> Outcome {
        let r = self.base_reply(msg, MessageType::Nak);
        Outcome {
            reply: Some(Reply {
                msg: r,
                dest: reply_dest(msg, true),
            }),
            ..Outcome::default()
        }
    }

    /// A BOOTREPLY mirroring the request's transaction, addressing and client fields.
    fn base_reply(&self, msg: &Message, t: MessageType) -> Message {
        let mut r = Message::new_with_id(
            msg.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            msg.giaddr(),
            &msg.chaddr()[..6],
        );
        r.set_opcode(Opcode::BootReply);
        r.set_htype(msg.htype());
        r.set_flags(if msg.flags().broadcast() {
            Flags::default().set_broadcast()
        } else {
            Flags::default()
        });
        r.opts_mut().insert(DhcpOption::MessageType(t));
        r.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.settings.server));
        r
    }

    fn net_options(&self, r: &mut Message, _req: &Message, hostname: Option<String>) {
        let s = &self.settings;
        let o = r.opts_mut();
        o.insert(DhcpOption::SubnetMask(s.netmask));
        if let Some(rt) = s.router {
            o.insert(DhcpOption::Router(vec![rt]));
        }
        if !s.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(s.dns.clone()));
        }
        if let Some(d) = &s.domain {
            o.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(h) = hostname {
            o.insert(DhcpOption::Hostname(h));
        }
    }

    /// Boot file, next server and the PXE/iPXE options for a netbooting client.
    fn boot_info(&self, r: &mut Message, k: &ClientKind, proxy: bool) {
        if !k.netboot() {
            return;
        }
        let s = &self.settings;
        let Some(file) = boot_file(s, k) else { return };
        r.set_siaddr(s.server);
        r.set_fname_str(&file);
        let o = r.opts_mut();
        o.insert(DhcpOption::BootfileName(file.into_bytes()));
        o.insert(DhcpOption::TFTPServerName(
            s.server.to_string().into_bytes(),
        ));
        if k.http {
            o.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
        } else if k.pxe {
            o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        }
        if k.pxe && !k.ipxe && !k.http {
            // PXE discovery control 8: "the boot file in this offer is all you need". Without option 43 EDK2
            // takes the offer for a BINL one and asks port 4011 for boot information instead of loading it.
            o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        if !proxy && k.ipxe && s.no_pxedhcp {
            // iPXE encapsulated option 176 (no-pxedhcp): skip the ~3 s wait for ProxyDHCP offers.
            o.insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::Unknown(175),
                vec![176, 1, 1],
            )));
        }
    }
}

fn same_net(a: Ipv4Addr, net: Ipv4Addr, mask: Ipv4Addr) -> bool {
    u32::from(a) & u32::from(mask) == u32::from(net)
}

/// RFC 2131 4.1: to the relay; else to a configured client's address; else broadcast (a client without an
/// address cannot receive unicast before ARP knows it, and broadcast works with every firmware).
fn reply_dest(msg: &Message, nak: bool) -> Dest {
    if msg.giaddr() != Ipv4Addr::UNSPECIFIED {
        return Dest::Unicast(SocketAddrV4::new(msg.giaddr(), 67));
    }
    if !nak && msg.ciaddr() != Ipv4Addr::UNSPECIFIED {
        return Dest::Unicast(SocketAddrV4::new(msg.ciaddr(), 68));
    }
    Dest::Broadcast
}

#[cfg(test)]
mod tests;
