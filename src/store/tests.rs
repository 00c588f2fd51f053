use super::*;

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, n])
}

#[test]
fn a_corrupt_database_is_moved_aside_with_a_clear_error_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("corral.db");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    std::fs::write(dir.path().join("corral.db-wal"), b"junk").unwrap();
    let e = Store::open(dir.path()).err().expect("refused").to_string();
    assert!(
        e.contains("is corrupt") && e.contains("moved aside to"),
        "{e}"
    );
    assert!(!db.exists(), "the corrupt file is out of the way");
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        aside.iter().any(|n| n.starts_with("corral.db.corrupt-"))
            && aside
                .iter()
                .any(|n| n.starts_with("corral.db-wal.corrupt-")),
        "{aside:?}"
    );
    let kept = aside
        .iter()
        .find(|n| n.starts_with("corral.db.corrupt-"))
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join(kept)).unwrap(),
        vec![0x5a; 8192],
        "moved, not rewritten"
    );
    // Started again, corral begins empty, at the current schema.
    let s = Store::open(dir.path()).unwrap();
    assert!(s.leases().unwrap().is_empty());
}

#[test]
fn leases_survive_reopen_and_one_per_mac() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        let l = LeaseRecord {
            ip: "10.0.0.5".parse().unwrap(),
            mac: mac(1),
            client_id: None,
            hostname: Some("a".into()),
            expires: 99,
        };
        s.put_lease(&l).unwrap();
        // Same client moves to another address: the old lease goes.
        s.put_lease(&LeaseRecord {
            ip: "10.0.0.6".parse().unwrap(),
            ..l.clone()
        })
        .unwrap();
        s.put_lease(&LeaseRecord {
            ip: "10.0.0.7".parse().unwrap(),
            mac: mac(2),
            ..l
        })
        .unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let ls = s.leases().unwrap();
    assert_eq!(
        ls.iter().map(|l| l.ip.to_string()).collect::<Vec<_>>(),
        ["10.0.0.6", "10.0.0.7"]
    );
    s.delete_lease("10.0.0.6".parse().unwrap()).unwrap();
    assert_eq!(s.leases().unwrap().len(), 1);
}

#[test]
fn slot_psks_persist_and_never_show_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = SlotPsk {
        identity: "db-0".into(),
        key: "00ff10".repeat(10) + "abcd",
    };
    Store::open(dir.path())
        .unwrap()
        .put_slot_psk("db.0", &p)
        .unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(
        s.slot_psks().unwrap(),
        vec![("db.0".to_string(), p.clone())]
    );
    assert_eq!(p.psk_line(), format!("db-0:{}", p.key));
    let bytes = p.key_bytes().unwrap();
    assert_eq!(bytes.len(), 32);
    assert_eq!(&bytes[..3], &[0x00, 0xff, 0x10]);
    assert!(!format!("{p:?}").contains(&p.key));
    for bad in ["abc", "zz", "0g", "+f"] {
        let q = SlotPsk {
            key: bad.into(),
            ..p.clone()
        };
        assert!(q.key_bytes().is_none(), "{bad}");
    }
}

#[test]
fn assignments_and_events_persist_together() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        let a = |m, c: &str, slot| AssignmentRecord {
            mac: mac(m),
            cluster: c.into(),
            slot,
            since: 5,
        };
        s.apply(
            &[
                AssignmentChange::Set(a(1, "web", 0)),
                AssignmentChange::Set(a(2, "web", 1)),
            ],
            &[NewEvent::new(5, EventKind::Assign, "two".into())],
        )
        .unwrap();
        // Moving node 2 into slot 0 of db and node 1 out: one slot per node, one node per slot.
        s.apply(
            &[
                AssignmentChange::Remove(mac(1)),
                AssignmentChange::Set(a(2, "db", 0)),
            ],
            &[],
        )
        .unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let all = s.assignments().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].mac, all[0].cluster.as_str(), all[0].slot),
        (mac(2), "db", 0)
    );
    let ev = s.events(10).unwrap();
    assert_eq!(ev[0].message, "two");
}

#[test]
fn inventory_counts_boots_and_keeps_known_facts() {
    let s = Store::in_memory().unwrap();
    let f = NodeFacts {
        uuid: Some("u-1".into()),
        buildarch: Some("x86_64".into()),
        ..Default::default()
    };
    let seen = |facts, first, last, count| BootsSeen {
        mac: mac(1),
        facts,
        first,
        last,
        count,
    };
    s.record_boots(&[seen(f, 100, 100, 1)]).unwrap();
    let efi = NodeFacts {
        platform: Some("efi".into()),
        ..Default::default()
    };
    s.record_boots(&[seen(efi, 150, 160, 3)]).unwrap();
    let n = s.node(mac(1)).unwrap().unwrap();
    assert_eq!((n.first_seen, n.last_seen, n.boot_count), (100, 160, 4));
    assert_eq!(n.facts.uuid.as_deref(), Some("u-1"));
    assert_eq!(n.facts.platform.as_deref(), Some("efi"));
    assert_eq!(s.nodes().unwrap().len(), 1);
}
