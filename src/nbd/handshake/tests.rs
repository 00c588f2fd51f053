//! The handshake state machine with a fake export table.

use super::*;
use crate::disk::{Disk, DiskResult, Extent};

struct Mem(u64, bool);

impl Disk for Mem {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read(&self, _: u64, buf: &mut [u8]) -> DiskResult<()> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> DiskResult<()> {
        Ok(())
    }
    fn flush(&self) -> DiskResult<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DiskResult<()> {
        Ok(())
    }
    fn extents(&self, _: u64, len: u64) -> DiskResult<Vec<Extent>> {
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])
    }
}

struct Table;

impl Exports for Table {
    fn list(&self) -> Vec<(String, String)> {
        vec![
            ("db/0".into(), String::new()),
            ("base/b".into(), String::new()),
        ]
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Disk>, Refusal> {
        match name {
            "db/0" => Ok(Arc::new(Mem(1 << 20, false))),
            "base/b" => Ok(Arc::new(Mem(1 << 20, true))),
            "db/1" => Err(Refusal::Policy("not yours".into())),
            _ => Err(Refusal::Unknown),
        }
    }
}

fn h(option: u32, len: usize) -> OptionHeader {
    OptionHeader {
        option,
        len: len as u32,
    }
}

/// Option replies in `out`: (option, type, data).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert_eq!(
            u64::from_be_bytes(b[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let len = be32(b, 16).unwrap() as usize;
        v.push((
            be32(b, 8).unwrap(),
            be32(b, 12).unwrap(),
            b[20..20 + len].to_vec(),
        ));
        b = &b[20 + len..];
    }
    v
}

fn info_payload(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[test]
fn greeting_and_client_flags() {
    let g = greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    assert!(Handshake::new().client_flags(0).is_err());
    assert!(Handshake::new().client_flags(1 << 5 | 1).is_err());
    assert!(Handshake::new().client_flags(3).is_ok());
}

#[test]
fn go_with_structured_replies_and_base_allocation() {
    let mut hs = Handshake::new();
    hs.client_flags(3).unwrap();
    let mut out = Vec::new();
    // SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
    let m = meta_payload("db/0", &[BASE_ALLOCATION]);
    hs.option(h(OPT_SET_META_CONTEXT, m.len()), &m, &Table, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    out.clear();
    assert!(matches!(
        hs.option(h(OPT_STRUCTURED_REPLY, 0), &[], &Table, &mut out),
        Next::Continue
    ));
    assert_eq!(replies(&out), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);
    out.clear();
    hs.option(h(OPT_SET_META_CONTEXT, m.len()), &m, &Table, &mut out);
    let r = replies(&out);
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(r[1].1, REP_ACK);
    out.clear();
    let d = info_payload("db/0", &[INFO_BLOCK_SIZE, INFO_NAME]);
    let Next::Transmit(ex) = hs.option(h(OPT_GO, d.len()), &d, &Table, &mut out) else {
        panic!("GO did not end the handshake");
    };
    assert!(ex.structured && ex.base_allocation);
    assert_eq!(ex.flags & TF_CAN_MULTI_CONN, TF_CAN_MULTI_CONN);
    assert_eq!(ex.flags & TF_READ_ONLY, 0);
    let r = replies(&out);
    assert_eq!(r[0].1, REP_INFO);
    assert_eq!(be16(&r[0].2, 0), Some(INFO_EXPORT));
    assert_eq!(
        u64::from_be_bytes(r[0].2[2..10].try_into().unwrap()),
        1 << 20
    );
    assert_eq!(be16(&r[1].2, 0), Some(INFO_BLOCK_SIZE));
    assert_eq!(&r[2].2[2..], b"db/0");
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn refusals_unknown_options_and_malformed_payloads() {
    let mut hs = Handshake::new();
    hs.client_flags(1).unwrap();
    let mut out = Vec::new();
    for (name, code) in [("db/1", REP_ERR_POLICY), ("nope", REP_ERR_UNKNOWN)] {
        out.clear();
        let d = info_payload(name, &[]);
        assert!(matches!(
            hs.option(h(OPT_GO, d.len()), &d, &Table, &mut out),
            Next::Continue
        ));
        assert_eq!(replies(&out)[0].1, code);
    }
    out.clear();
    hs.option(h(99, 0), &[], &Table, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
    out.clear();
    hs.option(h(OPT_STARTTLS, 0), &[], &Table, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
    // Length fields that lie.
    for bad in [
        vec![0, 0, 0, 9, b'a'],
        vec![0, 0, 0, 0, 0, 5, 0, 1],
        vec![0xff; 3],
    ] {
        out.clear();
        hs.option(h(OPT_INFO, bad.len()), &bad, &Table, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }
    out.clear();
    assert!(matches!(
        hs.oversized(h(OPT_INFO, 1 << 30), &mut out),
        Next::Continue
    ));
    assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
    // EXPORT_NAME has no error reply: a refusal closes.
    out.clear();
    assert!(matches!(
        hs.option(h(OPT_EXPORT_NAME, 4), b"db/1", &Table, &mut out),
        Next::Close(_)
    ));
    assert!(out.is_empty());
}

#[test]
fn list_export_name_and_abort() {
    let mut hs = Handshake::new();
    hs.client_flags(1).unwrap(); // no NO_ZEROES: EXPORT_NAME pads with 124 zeros
    let mut out = Vec::new();
    hs.option(h(OPT_LIST, 0), &[], &Table, &mut out);
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    assert_eq!(&r[0].2[4..], b"db/0");
    assert_eq!(r[2].1, REP_ACK);
    out.clear();
    let m = meta_payload("base/b", &[]);
    hs.option(h(OPT_LIST_META_CONTEXT, m.len()), &m, &Table, &mut out);
    assert_eq!(replies(&out)[0].1, REP_META_CONTEXT);
    out.clear();
    let Next::Transmit(ex) = hs.option(h(OPT_EXPORT_NAME, 6), b"base/b", &Table, &mut out) else {
        panic!()
    };
    assert_eq!(out.len(), 8 + 2 + 124);
    assert_eq!(ex.flags & TF_READ_ONLY, TF_READ_ONLY);
    assert!(!ex.base_allocation);
    let mut hs = Handshake::new();
    hs.client_flags(3).unwrap();
    out.clear();
    assert!(matches!(
        hs.option(h(OPT_ABORT, 0), &[], &Table, &mut out),
        Next::Close(_)
    ));
    assert_eq!(replies(&out)[0].1, REP_ACK);
}

proptest::proptest! {
    /// Any option number with any payload: an answer or a close, never a panic.
    #[test]
    fn any_option_is_answered(option in 0u32..16, data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
        let mut hs = Handshake::new();
        hs.client_flags(3).unwrap();
        let mut out = Vec::new();
        let _ = hs.option(h(option, data.len()), &data, &Table, &mut out);
    }
}

/// One option through `hs`: its replies and what the shell does next.
fn opt(hs: &mut Handshake, option: u32, data: &[u8]) -> (Vec<(u32, u32, Vec<u8>)>, Next) {
    let mut out = Vec::new();
    let next = hs.option(h(option, data.len()), data, &Table, &mut out);
    (replies(&out), next)
}

fn code(r: &[(u32, u32, Vec<u8>)]) -> u32 {
    r.last().expect("a reply").1
}

#[test]
fn starttls_when_off_is_unsupported() {
    let mut hs = Handshake::new();
    let (r, next) = opt(&mut hs, OPT_STARTTLS, &[]);
    assert_eq!(code(&r), REP_ERR_UNSUP);
    assert!(matches!(next, Next::Continue));
    assert!(!hs.secure());
}

#[test]
fn starttls_acks_once_then_is_invalid() {
    for mode in [NbdTls::Optional, NbdTls::Required] {
        let mut hs = Handshake::with_tls(mode);
        // Data with STARTTLS is invalid and starts nothing.
        let (r, next) = opt(&mut hs, OPT_STARTTLS, b"x");
        assert_eq!(code(&r), REP_ERR_INVALID);
        assert!(matches!(next, Next::Continue));
        let (r, next) = opt(&mut hs, OPT_STARTTLS, &[]);
        assert_eq!(r, vec![(OPT_STARTTLS, REP_ACK, vec![])]);
        assert!(matches!(next, Next::StartTls));
        hs.tls_started("db/0".into());
        assert!(hs.secure());
        // A second STARTTLS (TLS is up) is invalid, never TLS_REQD.
        let (r, next) = opt(&mut hs, OPT_STARTTLS, &[]);
        assert_eq!(code(&r), REP_ERR_INVALID);
        assert!(matches!(next, Next::Continue));
    }
}

#[test]
fn required_mode_errors_everything_but_starttls_and_abort() {
    let mut hs = Handshake::with_tls(NbdTls::Required);
    for (o, d) in [
        (OPT_GO, info_payload("db/0", &[])),
        (OPT_INFO, info_payload("db/0", &[])),
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_LIST_META_CONTEXT, meta_payload("db/0", &[])),
        (99, vec![]),
    ] {
        let (r, next) = opt(&mut hs, o, &d);
        assert_eq!(
            r,
            vec![(
                o,
                REP_ERR_TLS_REQD,
                b"TLS is required: send STARTTLS".to_vec()
            )],
            "option {o}"
        );
        assert!(matches!(next, Next::Continue));
    }
    // EXPORT_NAME cannot be answered with an error: the session ends, no reply.
    let (r, next) = opt(&mut hs, OPT_EXPORT_NAME, b"db/0");
    assert!(r.is_empty());
    assert!(matches!(next, Next::Close(_)));
    let mut hs = Handshake::with_tls(NbdTls::Required);
    let (r, next) = opt(&mut hs, OPT_ABORT, &[]);
    assert_eq!(code(&r), REP_ACK);
    assert!(matches!(next, Next::Close(_)));
    // After TLS: no TLS_REQD, the key's export opens.
    let mut hs = Handshake::with_tls(NbdTls::Required);
    assert!(matches!(opt(&mut hs, OPT_STARTTLS, &[]).1, Next::StartTls));
    hs.tls_started("db/0".into());
    let (r, next) = opt(&mut hs, OPT_GO, &info_payload("db/0", &[]));
    assert_eq!(code(&r), REP_ACK);
    assert!(matches!(next, Next::Transmit(e) if e.name == "db/0"));
}

#[test]
fn optional_mode_serves_plain_clients() {
    let mut hs = Handshake::with_tls(NbdTls::Optional);
    let (r, next) = opt(&mut hs, OPT_GO, &info_payload("base/b", &[]));
    assert_eq!(code(&r), REP_ACK);
    assert!(matches!(next, Next::Transmit(e) if e.name == "base/b"));
    // EXPORT_NAME too (its answer is size, flags and zeroes, not an option reply).
    let mut hs = Handshake::with_tls(NbdTls::Optional);
    let mut out = Vec::new();
    let next = hs.option(h(OPT_EXPORT_NAME, 4), b"db/0", &Table, &mut out);
    assert!(matches!(next, Next::Transmit(e) if e.name == "db/0"));
    assert_eq!(out.len(), 8 + 2 + 124);
}

#[test]
fn after_tls_only_the_keys_export() {
    let mut hs = Handshake::with_tls(NbdTls::Optional);
    assert!(matches!(opt(&mut hs, OPT_STARTTLS, &[]).1, Next::StartTls));
    hs.tls_started("db/0".into());
    // LIST shows the key's export only.
    let (r, _) = opt(&mut hs, OPT_LIST, &[]);
    let names: Vec<_> = r.iter().filter(|x| x.1 == REP_SERVER).collect();
    assert_eq!(names.len(), 1);
    assert_eq!(&names[0].2[4..8], b"db/0");
    // Another export, though this peer could open it in plain text: refused by policy, for INFO, GO and
    // meta contexts alike; EXPORT_NAME closes.
    for o in [OPT_INFO, OPT_GO] {
        let (r, next) = opt(&mut hs, o, &info_payload("base/b", &[]));
        assert_eq!(
            r,
            vec![(o, REP_ERR_POLICY, b"this TLS key opens only db/0".to_vec())]
        );
        assert!(matches!(next, Next::Continue));
    }
    let (r, _) = opt(&mut hs, OPT_LIST_META_CONTEXT, &meta_payload("base/b", &[]));
    assert_eq!(code(&r), REP_ERR_POLICY);
    let (_, next) = opt(&mut hs, OPT_EXPORT_NAME, b"base/b");
    assert!(matches!(next, Next::Close(_)));
    // The key's own export still needs the address rule: db/1 is not this peer's.
    let mut hs = Handshake::with_tls(NbdTls::Optional);
    let _ = opt(&mut hs, OPT_STARTTLS, &[]);
    hs.tls_started("db/1".into());
    let (r, _) = opt(&mut hs, OPT_GO, &info_payload("db/1", &[]));
    assert_eq!(r, vec![(OPT_GO, REP_ERR_POLICY, b"not yours".to_vec())]);
}

#[test]
fn starttls_forgets_structured_replies_and_meta_contexts() {
    let mut hs = Handshake::with_tls(NbdTls::Optional);
    assert_eq!(code(&opt(&mut hs, OPT_STRUCTURED_REPLY, &[]).0), REP_ACK);
    let set = meta_payload("db/0", &[BASE_ALLOCATION]);
    assert_eq!(code(&opt(&mut hs, OPT_SET_META_CONTEXT, &set).0), REP_ACK);
    // An INFO and a refused GO before STARTTLS do not end the haggling.
    assert_eq!(
        code(&opt(&mut hs, OPT_INFO, &info_payload("db/0", &[])).0),
        REP_ACK
    );
    assert_eq!(
        code(&opt(&mut hs, OPT_GO, &info_payload("nope", &[])).0),
        REP_ERR_UNKNOWN
    );
    assert!(matches!(opt(&mut hs, OPT_STARTTLS, &[]).1, Next::StartTls));
    hs.tls_started("db/0".into());
    // SET_META_CONTEXT needs structured replies again.
    assert_eq!(
        code(&opt(&mut hs, OPT_SET_META_CONTEXT, &set).0),
        REP_ERR_INVALID
    );
    let (_, next) = opt(&mut hs, OPT_GO, &info_payload("db/0", &[]));
    let Next::Transmit(e) = next else {
        panic!("no transmission")
    };
    assert!(!e.structured && !e.base_allocation);
    assert_eq!(e.flags & TF_SEND_DF, 0);
    // Renegotiated after TLS, they hold.
    let mut hs = Handshake::with_tls(NbdTls::Optional);
    let _ = opt(&mut hs, OPT_STARTTLS, &[]);
    hs.tls_started("db/0".into());
    assert_eq!(code(&opt(&mut hs, OPT_STRUCTURED_REPLY, &[]).0), REP_ACK);
    assert_eq!(code(&opt(&mut hs, OPT_SET_META_CONTEXT, &set).0), REP_ACK);
    let Next::Transmit(e) = opt(&mut hs, OPT_GO, &info_payload("db/0", &[])).1 else {
        panic!("no transmission")
    };
    assert!(e.structured && e.base_allocation);
}
