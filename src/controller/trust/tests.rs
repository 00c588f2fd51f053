//! The issuance and authorisation rules: who is a node, when a token rotates, who may be discovered.

use super::*;

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, n])
}
fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n)
}
fn seen(m: u8, address: Option<Ipv4Addr>, boot: bool) -> Sighting {
    Sighting {
        mac: mac(m),
        address,
        boot,
        valid_for: Some(100),
    }
}
fn slot(c: &str, s: u32) -> SlotRef {
    SlotRef {
        cluster: c.into(),
        slot: s,
    }
}
const NOBODY: &dyn Fn(Mac) -> bool = &|_| false;

#[test]
fn dhcp_says_which_address_is_whose_one_mac_per_address() {
    let mut s = Sightings::new(100);
    s.observe(&seen(1, None, true), 10, NOBODY);
    assert_eq!((s.epoch(mac(1)), s.address(mac(1), 10)), (Some(1), None));
    s.observe(&seen(1, Some(ip(5)), true), 11, NOBODY);
    assert_eq!(
        (s.epoch(mac(1)), s.address(mac(1), 11)),
        (Some(2), Some(ip(5)))
    );
    // A renewal is not a boot.
    s.observe(&seen(1, Some(ip(5)), false), 50, NOBODY);
    assert_eq!(s.epoch(mac(1)), Some(2));
    // The lease runs out: the address is nobody's.
    assert_eq!(s.address(mac(1), 150), None);
    // The address goes to another MAC: it stops being the first one's at once.
    s.observe(&seen(2, Some(ip(5)), true), 60, NOBODY);
    assert_eq!(s.address(mac(1), 61), None);
    assert_eq!(s.address(mac(2), 61), Some(ip(5)));
    // A MAC moving to a new address frees the old one.
    s.observe(&seen(2, Some(ip(6)), false), 62, NOBODY);
    s.observe(&seen(3, Some(ip(5)), false), 63, NOBODY);
    assert_eq!(s.address(mac(2), 64), Some(ip(6)));
    assert_eq!(s.address(mac(3), 64), Some(ip(5)));
    // A restored lease does not count a boot and does not override a sighting.
    s.restore(mac(3), ip(9), 1000);
    assert_eq!(
        (s.address(mac(3), 64), s.epoch(mac(3))),
        (Some(ip(5)), Some(0))
    );
    s.restore(mac(4), ip(9), 1000);
    assert_eq!(
        (s.address(mac(4), 64), s.epoch(mac(4))),
        (Some(ip(9)), Some(0))
    );
}

#[test]
fn a_flood_of_strangers_never_pushes_out_a_known_node() {
    let mut s = Sightings::new(64);
    let known = |m: Mac| m == mac(1);
    s.observe(&seen(1, Some(ip(1)), true), 0, &known);
    for i in 0..10_000u32 {
        let m = Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        let st = Sighting {
            mac: m,
            address: None,
            boot: true,
            valid_for: None,
        };
        s.observe(&st, u64::from(i) + 1, &known);
        assert!(s.len() <= 65, "bounded: {}", s.len());
    }
    assert_eq!(s.address(mac(1), 5), Some(ip(1)));
}

#[test]
fn known_addresses_match_the_peer_and_nothing_else() {
    let k = KnownAddresses {
        reservation: Some(ip(1)),
        slot: None,
        dhcp: Some(ip(2)),
        request: None,
    };
    assert!(k.contains(IpAddr::V4(ip(1))));
    assert!(k.contains(IpAddr::V4(ip(2))));
    assert!(k.contains("::ffff:10.0.0.2".parse().unwrap()), "v4-mapped");
    assert!(!k.contains(IpAddr::V4(ip(3))));
    assert!(!KnownAddresses::default().contains(IpAddr::V4(ip(3))));
    assert_eq!(k.list().len(), 2);
}

fn counter() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("t{n}")
    }
}

#[test]
fn within_a_boot_the_token_is_the_same_and_a_new_boot_gets_a_new_one() {
    let mut b = TokenBook::default();
    let mut fresh = counter();
    let db0 = slot("db", 0);
    let (t1, c) = b.for_script(mac(1), Some(2), Some(&db0), 10, &mut fresh);
    assert!(c.is_some(), "a new token is stored");
    // Fetched again in the same boot: the same token, nothing to store.
    assert_eq!(
        b.for_script(mac(1), Some(2), Some(&db0), 11, &mut fresh),
        (t1.clone(), None)
    );
    // The agent uses it.
    let (m, role, current, change) = b.authenticate(&t1).unwrap();
    assert_eq!((m, role.as_ref(), current), (mac(1), Some(&db0), true));
    assert!(change.is_some(), "first use is stored");
    assert!(
        b.authenticate(&t1).unwrap().3.is_none(),
        "later uses are not"
    );
    // A new boot (DHCP again): a new token; the old one still works until the new one is used.
    let (t2, _) = b.for_script(mac(1), Some(3), Some(&db0), 20, &mut fresh);
    assert_ne!(t1, t2);
    let (_, _, current, _) = b.authenticate(&t1).unwrap();
    assert!(
        !current,
        "the old boot's token is still honoured, as not current"
    );
    assert!(b.authenticate(&t2).unwrap().2);
    assert_eq!(
        b.authenticate(&t1),
        None,
        "retired once the new one is used"
    );
    // A different role in the same boot: a new token.
    let web = slot("web", 1);
    let (t3, _) = b.for_script(mac(1), Some(3), Some(&web), 21, &mut fresh);
    assert_ne!(t3, t2);
    assert_eq!(b.authenticate(&t3).unwrap().1, Some(web));
    assert_eq!(b.holder(&t2), None);
}

#[test]
fn a_token_never_used_is_replaced_without_keeping_it() {
    let mut b = TokenBook::default();
    let mut fresh = counter();
    let (t1, _) = b.for_script(mac(1), Some(1), None, 0, &mut fresh);
    let (t2, _) = b.for_script(mac(1), Some(2), None, 1, &mut fresh);
    assert_ne!(t1, t2);
    assert_eq!(b.authenticate(&t1), None, "no agent ran with it");
    assert!(b.tokens(mac(1)).unwrap().previous.is_none());
}

#[test]
fn without_dhcp_a_boot_is_told_by_its_token() {
    let mut b = TokenBook::default();
    let mut fresh = counter();
    let (t1, _) = b.for_script(mac(1), None, None, 0, &mut fresh);
    assert_eq!(
        b.for_script(mac(1), None, None, 1, &mut fresh).0,
        t1,
        "unused: same"
    );
    b.authenticate(&t1).unwrap();
    let (t2, _) = b.for_script(mac(1), None, None, 2, &mut fresh);
    assert_ne!(t1, t2, "used: the node booted again");
    assert!(b.authenticate(&t1).is_some());
}

#[test]
fn tokens_of_other_nodes_and_after_forgetting_are_refused() {
    let mut b = TokenBook::default();
    let mut fresh = counter();
    let (t1, _) = b.for_script(mac(1), Some(1), None, 0, &mut fresh);
    let (t2, _) = b.for_script(mac(2), Some(1), None, 0, &mut fresh);
    assert_eq!(b.authenticate(&t1).unwrap().0, mac(1));
    assert_eq!(b.authenticate(&t2).unwrap().0, mac(2));
    assert_eq!(b.authenticate("t999"), None);
    assert_eq!(b.authenticate(""), None);
    b.forget(mac(1));
    assert_eq!(b.authenticate(&t1), None);
}

#[test]
fn restored_tokens_survive_and_keep_their_boot() {
    let mut b = TokenBook::default();
    let mut fresh = counter();
    let (t1, Some(TokenChange::Put(m, stored))) =
        b.for_script(mac(1), Some(4), None, 0, &mut fresh)
    else {
        panic!("stored")
    };
    let mut after = TokenBook::default();
    // After a restart DHCP epochs count from 0 again: a stored grant is of boot 0.
    let mut stored = stored;
    stored.current.epoch = 0;
    after.restore(m, stored);
    assert_eq!(after.authenticate(&t1).unwrap().0, mac(1));
    assert_eq!(after.for_script(mac(1), Some(0), None, 5, &mut fresh).0, t1);
    assert_ne!(after.for_script(mac(1), Some(1), None, 6, &mut fresh).0, t1);
}

#[test]
fn discovery_bounds() {
    use DiscoveryAllow::*;
    assert_eq!(may_discover(Dhcp, false, 0, 10, true), Ok(()));
    assert_eq!(
        may_discover(Listed, false, 0, 10, true),
        Err(NotDiscovered::NotListed)
    );
    assert_eq!(
        may_discover(Listed, true, 99, 10, false),
        Ok(()),
        "listed: always"
    );
    assert_eq!(
        may_discover(Dhcp, false, 10, 10, true),
        Err(NotDiscovered::TooMany)
    );
    assert_eq!(
        may_discover(Dhcp, false, 1, 10, false),
        Err(NotDiscovered::RateLimited)
    );
}

#[test]
fn peer_rate_refills_and_stays_bounded() {
    let mut r = PeerRate::new(3, 4);
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    assert!((0..3).all(|_| r.allow(a, 100)));
    assert!(!r.allow(a, 100), "fourth in the same minute");
    assert!(r.allow(a, 120), "20 s later one more (3 per minute)");
    assert!(!r.allow(a, 121));
    // Other peers have their own buckets; the table stays within its cap.
    for i in 2..50u8 {
        r.allow(IpAddr::V4(ip(i)), 200);
        assert!(r.buckets.len() <= 4);
    }
}

#[test]
fn secrets_compare_whole() {
    assert!(same_secret("abcdef0123456789", "abcdef0123456789"));
    assert!(!same_secret("abcdef0123456789", "abcdef012345678"));
    assert!(!same_secret("abcdef0123456789", "Abcdef0123456789"));
    assert!(!same_secret("", "x"));
    assert_eq!(random_hex(16).len(), 32);
    assert_ne!(random_hex(16), random_hex(16));
}
