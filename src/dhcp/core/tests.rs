//! Decision-core tests: mode × client kind × relay → reply fields, DORA sequences, and garbage.

use super::*;
use dhcproto::v4::Architecture;
use proptest::prelude::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn settings(mode: DhcpMode) -> Settings {
    Settings {
        mode,
        server: SERVER,
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        network: Ipv4Addr::new(10, 77, 0, 0),
        router: Some(SERVER),
        dns: vec![SERVER],
        domain: Some("lab".into()),
        lease_time: 3600,
        offer_hold: 30,
        no_pxedhcp: true,
        entry_url: "http://10.77.0.1/boot.ipxe".into(),
        http_base: "http://10.77.0.1/ipxe".into(),
        bios: "undionly.kpxe".into(),
        efi_x64: "snponly.efi".into(),
        efi_ia32: "ipxe-ia32.efi".into(),
        efi_arm64: "ipxe-arm64.efi".into(),
    }
}

fn responder(mode: DhcpMode) -> Responder {
    let pool = (mode == DhcpMode::Full).then(|| {
        Pool::new(
            Ipv4Addr::new(10, 77, 0, 100),
            Ipv4Addr::new(10, 77, 0, 110),
            vec![],
        )
    });
    Responder::new(settings(mode), pool)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Plain,
    BiosPxe,
    EfiPxe,
    HttpBoot,
    IpxeUserClass,
    IpxeOpt175,
}

const KINDS: [Kind; 6] = [
    Kind::Plain,
    Kind::BiosPxe,
    Kind::EfiPxe,
    Kind::HttpBoot,
    Kind::IpxeUserClass,
    Kind::IpxeOpt175,
];

fn request(kind: Kind, t: MessageType, mac: u8) -> Message {
    let mut m = Message::new_with_id(
        0x1234 + mac as u32,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &[0x52, 0x54, 0, 0, 0, mac],
    );
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(t));
    match kind {
        Kind::Plain => {}
        Kind::BiosPxe => {
            o.insert(DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
            ));
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(0)));
        }
        Kind::EfiPxe => {
            o.insert(DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00007:UNDI:003000".to_vec(),
            ));
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(7)));
        }
        Kind::HttpBoot => {
            o.insert(DhcpOption::ClassIdentifier(
                b"HTTPClient:Arch:00016:UNDI:003000".to_vec(),
            ));
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(16)));
        }
        Kind::IpxeUserClass => {
            o.insert(DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
            ));
            o.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        Kind::IpxeOpt175 => {
            o.insert(DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00007:UNDI:003010".to_vec(),
            ));
            o.insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::Unknown(175),
                vec![19, 1, 1],
            )));
        }
    }
    m
}

fn src() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
}

fn opt_bytes(m: &Message, code: OptionCode) -> Option<Vec<u8>> {
    match m.opts().get(code)? {
        DhcpOption::BootfileName(v)
        | DhcpOption::ClassIdentifier(v)
        | DhcpOption::VendorExtensions(v)
        | DhcpOption::TFTPServerName(v) => Some(v.clone()),
        DhcpOption::Unknown(u) => Some(u.data().to_vec()),
        _ => None,
    }
}

fn expected_file(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Plain => None,
        Kind::BiosPxe => Some("undionly.kpxe"),
        Kind::EfiPxe => Some("snponly.efi"),
        Kind::HttpBoot => Some("http://10.77.0.1/ipxe/snponly.efi"),
        Kind::IpxeUserClass | Kind::IpxeOpt175 => Some("http://10.77.0.1/boot.ipxe"),
    }
}

#[test]
fn full_mode_offers_by_client_kind() {
    for kind in KINDS {
        let mut r = responder(DhcpMode::Full);
        let out = r.handle(
            &request(kind, MessageType::Discover, 1),
            Port::Dhcp,
            src(),
            1000,
            None,
        );
        let reply = out.reply.expect("full mode answers every client");
        let m = &reply.msg;
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 77, 0, 100), "{kind:?}");
        assert_eq!(reply.dest, Dest::Broadcast);
        let file = opt_bytes(m, OptionCode::BootfileName).map(|b| String::from_utf8(b).unwrap());
        assert_eq!(file.as_deref(), expected_file(kind), "{kind:?}");
        if let Some(f) = expected_file(kind) {
            assert_eq!(m.fname_str().unwrap().unwrap(), f, "file header field too");
            assert_eq!(m.siaddr(), SERVER);
            assert_eq!(
                opt_bytes(m, OptionCode::TFTPServerName).unwrap(),
                b"10.77.0.1"
            );
        } else {
            assert_eq!(m.siaddr(), Ipv4Addr::UNSPECIFIED);
        }
        let no_proxy_wait = opt_bytes(m, OptionCode::Unknown(175));
        assert_eq!(
            no_proxy_wait.is_some(),
            matches!(kind, Kind::IpxeUserClass | Kind::IpxeOpt175),
            "{kind:?}"
        );
        if matches!(kind, Kind::HttpBoot) {
            assert_eq!(
                opt_bytes(m, OptionCode::ClassIdentifier).unwrap(),
                b"HTTPClient"
            );
        }
        assert!(encode(m).len() >= 300);
        assert!(out.changes.is_empty(), "an offer is not a lease");
    }
}

#[test]
fn proxy_mode_never_offers_an_address() {
    for kind in KINDS {
        let mut r = responder(DhcpMode::Proxy);
        let out = r.handle(
            &request(kind, MessageType::Discover, 1),
            Port::Dhcp,
            src(),
            1000,
            None,
        );
        match kind {
            Kind::Plain => assert!(out.reply.is_none()),
            _ => {
                let m = out.reply.unwrap().msg;
                assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
                assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
                assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
                let file =
                    String::from_utf8(opt_bytes(&m, OptionCode::BootfileName).unwrap()).unwrap();
                assert_eq!(Some(file.as_str()), expected_file(kind));
                assert!(
                    opt_bytes(&m, OptionCode::Unknown(175)).is_none(),
                    "no no-pxedhcp in proxy mode"
                );
                if matches!(kind, Kind::BiosPxe | Kind::EfiPxe) {
                    assert_eq!(
                        opt_bytes(&m, OptionCode::VendorExtensions).unwrap(),
                        vec![6, 1, 8, 255]
                    );
                }
            }
        }
        // REQUESTs on 67 belong to the site's server; on 4011 they get an ACK to the sender.
        assert!(r
            .handle(
                &request(kind, MessageType::Request, 1),
                Port::Dhcp,
                src(),
                1000,
                None
            )
            .reply
            .is_none());
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 50), 68);
        let ack = r.handle(
            &request(kind, MessageType::Request, 1),
            Port::Pxe,
            from,
            1000,
            None,
        );
        if !matches!(kind, Kind::Plain) {
            let reply = ack.reply.unwrap();
            assert_eq!(reply.dest, Dest::Unicast(from));
            assert_eq!(reply.msg.opts().msg_type(), Some(MessageType::Ack));
            assert_eq!(reply.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        }
    }
}

#[test]
fn dora_then_renew_release() {
    let mut r = responder(DhcpMode::Full);
    let offer = r
        .handle(
            &request(Kind::BiosPxe, MessageType::Discover, 1),
            Port::Dhcp,
            src(),
            1000,
            None,
        )
        .reply
        .unwrap();
    let ip = offer.msg.yiaddr();
    let mut req = request(Kind::BiosPxe, MessageType::Request, 1);
    req.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let out = r.handle(&req, Port::Dhcp, src(), 1001, None);
    assert_eq!(
        out.reply.as_ref().unwrap().msg.opts().msg_type(),
        Some(MessageType::Ack)
    );
    assert!(
        matches!(&out.changes[..], [LeaseChange::Put(l)] if l.ip == ip && l.expires == 1001 + 3600)
    );
    // Renewing: unicast with ciaddr, answered to ciaddr.
    let mut renew = request(Kind::Plain, MessageType::Request, 1);
    renew.set_ciaddr(ip);
    let out = r.handle(&renew, Port::Dhcp, SocketAddrV4::new(ip, 68), 2000, None);
    assert_eq!(
        out.reply.unwrap().dest,
        Dest::Unicast(SocketAddrV4::new(ip, 68))
    );
    // Another client asking for that address is refused.
    let mut other = request(Kind::Plain, MessageType::Request, 2);
    other.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    let out = r.handle(&other, Port::Dhcp, src(), 2000, None);
    assert_eq!(
        out.reply.unwrap().msg.opts().msg_type(),
        Some(MessageType::Nak)
    );
    // A wrong-subnet INIT-REBOOT gets a NAK, broadcast.
    let mut wrong = request(Kind::Plain, MessageType::Request, 3);
    wrong
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
            192, 168, 1, 5,
        )));
    let nak = r
        .handle(&wrong, Port::Dhcp, src(), 2000, None)
        .reply
        .unwrap();
    assert_eq!(
        (nak.msg.opts().msg_type(), nak.dest),
        (Some(MessageType::Nak), Dest::Broadcast)
    );
    // RELEASE frees it for others.
    let mut rel = request(Kind::Plain, MessageType::Release, 1);
    rel.set_ciaddr(ip);
    let out = r.handle(&rel, Port::Dhcp, src(), 2100, None);
    assert_eq!(out.changes, vec![LeaseChange::Remove(ip)]);
    assert!(out.reply.is_none());
}

#[test]
fn parallel_discovers_get_different_addresses() {
    let mut r = responder(DhcpMode::Full);
    let mut seen = std::collections::HashSet::new();
    for mac in 1..=8 {
        let ip = r
            .handle(
                &request(Kind::IpxeUserClass, MessageType::Discover, mac),
                Port::Dhcp,
                src(),
                1000,
                None,
            )
            .reply
            .unwrap()
            .msg
            .yiaddr();
        assert!(seen.insert(ip), "{ip} offered twice");
    }
}

#[test]
fn choosing_another_server_frees_the_offer_and_inform_gets_no_lease() {
    let mut r = responder(DhcpMode::Full);
    let ip = r
        .handle(
            &request(Kind::Plain, MessageType::Discover, 1),
            Port::Dhcp,
            src(),
            0,
            None,
        )
        .reply
        .unwrap()
        .msg
        .yiaddr();
    let mut req = request(Kind::Plain, MessageType::Request, 1);
    req.opts_mut()
        .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 2)));
    req.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    assert!(r.handle(&req, Port::Dhcp, src(), 1, None).reply.is_none());
    // The freed address is free again: asking for it gets it.
    let mut d = request(Kind::Plain, MessageType::Discover, 2);
    d.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    let again = r
        .handle(&d, Port::Dhcp, src(), 2, None)
        .reply
        .unwrap()
        .msg
        .yiaddr();
    assert_eq!(again, ip, "the freed offer is reused");

    let mut inform = request(Kind::BiosPxe, MessageType::Inform, 3);
    inform.set_ciaddr(Ipv4Addr::new(10, 77, 0, 9));
    let out = r.handle(&inform, Port::Dhcp, src(), 3, None);
    let m = out.reply.unwrap();
    assert_eq!(m.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(m.msg.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(out.changes.is_empty());
}

#[test]
fn relayed_requests_go_back_to_the_relay() {
    let mut r = responder(DhcpMode::Full);
    let mut d = request(Kind::EfiPxe, MessageType::Discover, 1);
    d.set_giaddr(Ipv4Addr::new(10, 77, 0, 254));
    let reply = r
        .handle(
            &d,
            Port::Dhcp,
            SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 254), 67),
            0,
            None,
        )
        .reply
        .unwrap();
    assert_eq!(
        reply.dest,
        Dest::Unicast(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 254), 67))
    );
    assert_eq!(reply.msg.giaddr(), Ipv4Addr::new(10, 77, 0, 254));
    // A relay on a network we do not serve is ignored.
    d.set_giaddr(Ipv4Addr::new(192, 168, 9, 1));
    assert!(r.handle(&d, Port::Dhcp, src(), 0, None).reply.is_none());
}

#[test]
fn slot_identity_address_wins() {
    let mut r = responder(DhcpMode::Full);
    let fixed = Some(Ipv4Addr::new(10, 77, 0, 42));
    let offer = r
        .handle(
            &request(Kind::IpxeUserClass, MessageType::Discover, 1),
            Port::Dhcp,
            src(),
            0,
            fixed,
        )
        .reply
        .unwrap();
    assert_eq!(offer.msg.yiaddr(), Ipv4Addr::new(10, 77, 0, 42));
    let mut req = request(Kind::IpxeUserClass, MessageType::Request, 1);
    req.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 42)));
    assert_eq!(
        r.handle(&req, Port::Dhcp, src(), 0, fixed)
            .reply
            .unwrap()
            .msg
            .opts()
            .msg_type(),
        Some(MessageType::Ack)
    );
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        if let Some(m) = decode(&bytes) {
            let mut r = responder(DhcpMode::Full);
            let _ = r.handle(&m, Port::Dhcp, src(), 0, None);
            let mut p = responder(DhcpMode::Proxy);
            let _ = p.handle(&m, Port::Pxe, src(), 0, None);
        }
    }

    #[test]
    fn mutated_requests_never_panic(flip in 0usize..400, val in any::<u8>(), kind in 0usize..6) {
        let mut bytes = encode(&request(KINDS[kind], MessageType::Discover, 1));
        if flip < bytes.len() {
            bytes[flip] = val;
        }
        if let Some(m) = decode(&bytes) {
            let _ = responder(DhcpMode::Full).handle(&m, Port::Dhcp, src(), 0, None);
        }
    }
}

/// Who a node is comes from here: a DISCOVER starts a boot, the ACK says its address; in proxy mode the
/// address a client asks the site server for (any client, booted OSes too) and a PXE request's ciaddr.
#[test]
fn sightings_say_when_a_boot_starts_and_which_address_a_node_has() {
    let mut r = responder(DhcpMode::Full);
    let d = r.handle(
        &request(Kind::IpxeUserClass, MessageType::Discover, 1),
        Port::Dhcp,
        src(),
        100,
        None,
    );
    let offered = d.reply.as_ref().unwrap().msg.yiaddr();
    let mac = Mac([0x52, 0x54, 0, 0, 0, 1]);
    assert_eq!(
        d.seen,
        Some(Sighting {
            mac,
            address: None,
            boot: true,
            valid_for: None
        })
    );
    let mut req = request(Kind::IpxeUserClass, MessageType::Request, 1);
    req.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offered));
    req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let a = r.handle(&req, Port::Dhcp, src(), 101, None);
    assert_eq!(
        a.seen,
        Some(Sighting {
            mac,
            address: Some(offered),
            boot: true,
            valid_for: Some(3600)
        })
    );
    // A renewal (RENEWING: ciaddr set, no option 50) is not a new boot.
    let mut renew = request(Kind::Plain, MessageType::Request, 1);
    renew.set_ciaddr(offered);
    let n = r.handle(&renew, Port::Dhcp, src(), 2000, None);
    assert_eq!(
        n.seen.map(|s| (s.address, s.boot)),
        Some((Some(offered), false))
    );
    // A NAKed request says nothing about the node.
    let mut wrong = request(Kind::Plain, MessageType::Request, 2);
    wrong
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offered));
    let nak = r.handle(&wrong, Port::Dhcp, src(), 2001, None);
    assert_eq!(nak.seen, None);

    // Proxy mode: an ordinary client's broadcast REQUEST to the site server gets no answer from corral,
    // but tells it the address; a PXE request to 4011 tells it by ciaddr.
    let mut p = responder(DhcpMode::Proxy);
    let mut os = request(Kind::Plain, MessageType::Request, 3);
    let site = Ipv4Addr::new(10, 77, 0, 57);
    os.opts_mut().insert(DhcpOption::RequestedIpAddress(site));
    let out = p.handle(&os, Port::Dhcp, src(), 5, None);
    assert!(out.reply.is_none());
    assert_eq!(
        out.seen.map(|s| (s.address, s.boot)),
        Some((Some(site), true))
    );
    let mut pxe = request(Kind::EfiPxe, MessageType::Request, 3);
    pxe.set_ciaddr(site);
    let out = p.handle(&pxe, Port::Pxe, SocketAddrV4::new(site, 4011), 6, None);
    assert!(out.reply.is_some());
    assert_eq!(
        out.seen.map(|s| (s.address, s.boot)),
        Some((Some(site), false))
    );
    let disc = p.handle(
        &request(Kind::BiosPxe, MessageType::Discover, 3),
        Port::Dhcp,
        src(),
        7,
        None,
    );
    assert_eq!(disc.seen.map(|s| (s.address, s.boot)), Some((None, true)));
}

#[test]
fn options_dhcproto_asserts_on_are_refused_before_it_sees_them() {
    // Found by replaying the dhcp fuzz corpus with debug assertions (fuzz/regressions/dhcp/): dhcproto
    // debug-asserts that option 80 is empty.
    use dhcproto::Encodable;
    let mut m = request(Kind::BiosPxe, MessageType::Discover, 1);
    let good = m.to_vec().unwrap();
    assert!(decode(&good).is_some());
    m.opts_mut().insert(DhcpOption::RapidCommit);
    let mut wire = m.to_vec().unwrap();
    assert!(decode(&wire).is_some(), "an empty rapid commit is fine");
    let at = (240..wire.len())
        .find(|&i| wire[i] == 80 && wire[i + 1] == 0)
        .unwrap();
    wire.splice(at + 1..at + 2, [2, 1, 1]);
    // Refused by the walk itself, not by catching dhcproto's panic.
    assert!(!options_sane(&wire));
    assert!(decode(&wire).is_none());
    // Likewise a client FQDN (81) shorter than its flags and rcodes.
    let mut wire = good.clone();
    let end = wire.iter().rposition(|b| *b == 255).unwrap();
    wire.splice(end..end, [81, 2, 0, 0]);
    assert!(!options_sane(&wire));
    wire[end + 1] = 3;
    wire.splice(end + 4..end + 4, [0]);
    assert!(options_sane(&wire));
    // dhcproto joins repeated options (RFC 3396): three 4-byte option 153s are one of 12 bytes, which
    // it asserts on (found by the dhcp fuzz target with debug assertions).
    let mut wire = good.clone();
    let end = wire.iter().rposition(|b| *b == 255).unwrap();
    wire.splice(end..end, [153, 4, 0, 0, 0, 1, 153, 4, 0, 0, 0, 2]);
    assert!(!options_sane(&wire));
    wire.insert(end + 6, 0); // a pad between them: two options, each fine
    assert!(options_sane(&wire));
}

#[test]
fn a_pxe_request_from_no_address_is_answered_by_broadcast() {
    // Found by the dhcp fuzz target (fuzz/regressions/dhcp/): the ACK went unicast to 0.0.0.0:68.
    let mut p = responder(DhcpMode::Proxy);
    let pxe = request(Kind::EfiPxe, MessageType::Request, 3);
    let from = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
    let out = p.handle(&pxe, Port::Pxe, from, 6, None);
    assert_eq!(out.reply.map(|r| r.dest), Some(Dest::Broadcast));
}

#[test]
fn declines_from_others_are_ignored_and_counted() {
    let mut r = responder(DhcpMode::Full);
    let d = r.handle(
        &request(Kind::Plain, MessageType::Discover, 1),
        Port::Dhcp,
        src(),
        100,
        None,
    );
    let ip = d.reply.unwrap().msg.yiaddr();
    let mut req = request(Kind::Plain, MessageType::Request, 1);
    req.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    assert!(r.handle(&req, Port::Dhcp, src(), 100, None).reply.is_some());
    let decline = |mac: u8| {
        let mut m = request(Kind::Plain, MessageType::Decline, mac);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        m
    };
    let other = r.handle(&decline(9), Port::Dhcp, src(), 101, None);
    assert_eq!(
        (other.note, other.changes.len()),
        (Some(Note::DeclineIgnored), 0)
    );
    let own = r.handle(&decline(1), Port::Dhcp, src(), 102, None);
    assert_eq!(own.note, Some(Note::DeclineHonoured));
    assert_eq!(own.changes, vec![LeaseChange::Remove(ip)]);
}

#[test]
fn a_known_node_is_never_starved_by_strangers() {
    let mut r = responder(DhcpMode::Full);
    let known_mac = Mac([0x52, 0x54, 0, 0, 0, 200]);
    r.known = Some(std::sync::Arc::new(move |m| m == known_mac));
    // The pool holds 11 addresses: 11 strangers take them all.
    for i in 1..=11u8 {
        let d = r.handle(
            &request(Kind::Plain, MessageType::Discover, i),
            Port::Dhcp,
            src(),
            u64::from(i),
            None,
        );
        let ip = d.reply.expect("a free address").msg.yiaddr();
        let mut req = request(Kind::Plain, MessageType::Request, i);
        req.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        assert!(r
            .handle(&req, Port::Dhcp, src(), u64::from(i), None)
            .reply
            .is_some());
    }
    let stranger = r.handle(
        &request(Kind::Plain, MessageType::Discover, 50),
        Port::Dhcp,
        src(),
        20,
        None,
    );
    assert_eq!(
        (stranger.reply.is_none(), stranger.note),
        (true, Some(Note::Exhausted))
    );
    let known = r.handle(
        &request(Kind::IpxeUserClass, MessageType::Discover, 200),
        Port::Dhcp,
        src(),
        21,
        None,
    );
    assert!(known.reply.is_some(), "the known node gets an offer");
    assert_eq!(
        known.note,
        Some(Note::Reclaimed {
            from: Mac([0x52, 0x54, 0, 0, 0, 1])
        }),
        "the oldest stranger's lease"
    );
}
