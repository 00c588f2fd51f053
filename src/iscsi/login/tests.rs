//! Login exchanges as iPXE and open-iscsi run them.

use super::*;

const IQN: &str = "iqn.2026-11.io.corral:web.0";
const INITIATOR: &str = "iqn.2010-04.org.ipxe:node1";

struct T(Option<Chap>);

impl Targets for T {
    fn lookup(&self, target: &str, initiator: &str) -> Result<Option<Chap>, Refusal> {
        match target {
            IQN if initiator == INITIATOR => Ok(self.0.clone()),
            IQN => Err(Refusal::Forbidden),
            _ => Err(Refusal::NotFound),
        }
    }
}

/// A Login Request: transit flag, CSG, NSG, keys.
fn req(transit: bool, csg: u8, nsg: u8, keys: &[(&str, &str)]) -> Pdu {
    let mut p = Pdu::new(op::LOGIN);
    p.bhs[0] |= 0x40;
    p.bhs[1] = (if transit { 0x80 } else { 0 }) | (csg << 2) | nsg;
    p.bhs[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0, 1]);
    p.set_u32(16, 7).set_u32(24, 1).set_u32(28, 0);
    let kv: Vec<(String, String)> = keys
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    p.with_data(encode_text(&kv))
}

fn keys(p: &Pdu) -> Vec<(String, String)> {
    parse_text(&p.data).unwrap()
}

fn get(p: &Pdu, k: &str) -> Option<String> {
    keys(p).into_iter().find(|(x, _)| x == k).map(|(_, v)| v)
}

fn rnd(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = i as u8 + 1;
    }
}

fn status_of(p: &Pdu) -> (u8, u8) {
    (p.bhs[36], p.bhs[37])
}

const OPERATIONAL: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxConnections", "1"),
    ("InitialR2T", "Yes"),
    ("ImmediateData", "Yes"),
    ("MaxRecvDataSegmentLength", "8192"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "65536"),
    ("DefaultTime2Wait", "0"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("ErrorRecoveryLevel", "0"),
    ("X-com.example.Unknown", "1"),
];

#[test]
fn a_login_without_authentication_reaches_full_feature() {
    let t = T(None);
    let mut l = Login::new(Limits::default());
    let first = req(
        true,
        0,
        1,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    let Step::Continue(r) = l.on_request(&first, &t, 9, &mut rnd) else {
        panic!("security stage")
    };
    assert_eq!(r.opcode(), op::LOGIN_RESPONSE);
    assert_eq!(r.flags(), 0x80 | 1, "transit to operational");
    assert_eq!(get(&r, "AuthMethod").as_deref(), Some("None"));
    assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("1"));
    assert_eq!(status_of(&r), status::SUCCESS);
    assert_eq!(r.itt(), 7);
    let Step::Complete(r, done) = l.on_request(&req(true, 1, 3, OPERATIONAL), &t, 9, &mut rnd)
    else {
        panic!("operational stage")
    };
    assert_eq!(r.flags(), 0x80 | (1 << 2) | 3);
    assert_eq!(r.u16_at(14), 9, "new TSIH");
    assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("None"));
    assert_eq!(get(&r, "ErrorRecoveryLevel").as_deref(), Some("0"));
    assert_eq!(
        get(&r, "X-com.example.Unknown").as_deref(),
        Some("NotUnderstood")
    );
    assert_eq!(
        get(&r, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(get(&r, "DefaultTime2Wait").as_deref(), Some("2"));
    assert!(get(&r, "TargetPortalGroupTag").is_none(), "sent once");
    assert_eq!(done.kind, SessionKind::Normal { target: IQN.into() });
    assert_eq!(done.initiator, INITIATOR);
    assert_eq!(done.params.initiator_max_recv, 8192);
    assert_eq!(done.params.target_max_recv, 262_144);
    assert_eq!(
        (done.params.max_burst, done.params.first_burst),
        (262_144, 65_536)
    );
    assert!(done.params.initial_r2t && done.params.immediate_data);
    // StatSN runs on from the first response.
    assert_eq!(l.next_stat_sn(), 2);
}

#[test]
fn chap_and_mutual_chap() {
    let chap = Chap {
        user: "node1".into(),
        secret: "s3cret-s3cret".into(),
        mutual: Some(("corral".into(), "target-secret!".into())),
    };
    let t = T(Some(chap.clone()));
    let mut l = Login::new(Limits::default());
    let Step::Continue(r) = l.on_request(
        &req(
            true,
            0,
            1,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", IQN),
                ("AuthMethod", "CHAP,None"),
            ],
        ),
        &t,
        1,
        &mut rnd,
    ) else {
        panic!()
    };
    assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
    assert_eq!(r.flags() & 0x80, 0, "no transit before authentication");
    let Step::Continue(r) = l.on_request(&req(false, 0, 0, &[("CHAP_A", "5")]), &t, 1, &mut rnd)
    else {
        panic!()
    };
    let id: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
    let c = decode_binary(&get(&r, "CHAP_C").unwrap()).unwrap();
    assert_eq!((id, c.len()), (1, 16));
    let answer = hex(&chap_response(id, b"s3cret-s3cret", &c));
    let my_challenge = [9u8; 16];
    let Step::Continue(r) = l.on_request(
        &req(
            true,
            0,
            1,
            &[
                ("CHAP_N", "node1"),
                ("CHAP_R", &answer),
                ("CHAP_I", "77"),
                ("CHAP_C", &hex(&my_challenge)),
            ],
        ),
        &t,
        1,
        &mut rnd,
    ) else {
        panic!("authenticated")
    };
    assert_eq!(r.flags(), 0x80 | 1);
    assert_eq!(get(&r, "CHAP_N").as_deref(), Some("corral"));
    let theirs = decode_binary(&get(&r, "CHAP_R").unwrap()).unwrap();
    assert_eq!(theirs, chap_response(77, b"target-secret!", &my_challenge));
    assert!(matches!(
        l.on_request(&req(true, 1, 3, OPERATIONAL), &t, 1, &mut rnd),
        Step::Complete(..)
    ));

    // A wrong answer fails with an authentication error; so does skipping the security stage.
    let mut l = Login::new(Limits::default());
    let _ = l.on_request(
        &req(
            false,
            0,
            0,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", IQN),
                ("AuthMethod", "CHAP"),
            ],
        ),
        &t,
        1,
        &mut rnd,
    );
    let _ = l.on_request(&req(false, 0, 0, &[("CHAP_A", "5")]), &t, 1, &mut rnd);
    let Step::Fail(r) = l.on_request(
        &req(
            true,
            0,
            1,
            &[
                ("CHAP_N", "node1"),
                ("CHAP_R", "0x00112233445566778899aabbccddeeff"),
            ],
        ),
        &t,
        1,
        &mut rnd,
    ) else {
        panic!("wrong response accepted")
    };
    assert_eq!(status_of(&r), status::AUTH_FAILURE);
    let mut l = Login::new(Limits::default());
    let Step::Fail(r) = l.on_request(
        &req(
            true,
            1,
            3,
            &[("InitiatorName", INITIATOR), ("TargetName", IQN)],
        ),
        &t,
        1,
        &mut rnd,
    ) else {
        panic!("skipped CHAP")
    };
    assert_eq!(status_of(&r), status::AUTH_FAILURE);
    // AuthMethod=None offered alone to a CHAP target: refused.
    let mut l = Login::new(Limits::default());
    let Step::Fail(r) = l.on_request(
        &req(
            true,
            0,
            1,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", IQN),
                ("AuthMethod", "None"),
            ],
        ),
        &t,
        1,
        &mut rnd,
    ) else {
        panic!()
    };
    assert_eq!(status_of(&r), status::AUTH_FAILURE);
    // Secrets never show in debug output.
    assert!(!format!("{chap:?}").contains("s3cret"));
}

#[test]
fn refusals_and_bad_requests() {
    let t = T(None);
    let login = |keys: &[(&str, &str)]| {
        let mut l = Login::new(Limits::default());
        match l.on_request(&req(true, 0, 1, keys), &t, 1, &mut rnd) {
            Step::Fail(r) => status_of(&r),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        login(&[("InitiatorName", INITIATOR), ("TargetName", "iqn.x:nope")]),
        status::NOT_FOUND
    );
    assert_eq!(
        login(&[("InitiatorName", "iqn.other:node"), ("TargetName", IQN)]),
        status::FORBIDDEN
    );
    assert_eq!(login(&[("TargetName", IQN)]), status::MISSING_PARAMETER);
    assert_eq!(
        login(&[("InitiatorName", INITIATOR)]),
        status::MISSING_PARAMETER
    );
    assert_eq!(
        login(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", IQN),
            ("HeaderDigest", "CRC32C")
        ]),
        status::INITIATOR_ERROR
    );
    assert_eq!(
        login(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", IQN),
            ("MaxRecvDataSegmentLength", "12")
        ]),
        status::INITIATOR_ERROR
    );
    let mut l = Login::new(Limits::default());
    let mut bad = req(true, 0, 1, &[("InitiatorName", INITIATOR)]);
    bad.data = b"garbage without equals\0".to_vec();
    assert!(matches!(l.on_request(&bad, &t, 1, &mut rnd), Step::Fail(_)));
    // A discovery session needs no target.
    let mut l = Login::new(Limits::default());
    let Step::Continue(_) = l.on_request(
        &req(
            true,
            0,
            1,
            &[
                ("InitiatorName", INITIATOR),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ],
        ),
        &t,
        1,
        &mut rnd,
    ) else {
        panic!()
    };
    let Step::Complete(_, done) = l.on_request(
        &req(true, 1, 3, &[("MaxRecvDataSegmentLength", "65536")]),
        &t,
        1,
        &mut rnd,
    ) else {
        panic!()
    };
    assert_eq!(done.kind, SessionKind::Discovery);
}

#[test]
fn text_split_over_pdus_and_limits() {
    let t = T(None);
    let mut l = Login::new(Limits::default());
    let mut a = req(false, 0, 0, &[]);
    a.bhs[1] |= 0x40; // C: more text follows
    a = a.with_data(b"InitiatorName=iqn.2010-04.org.ipxe:no".to_vec());
    let Step::Continue(r) = l.on_request(&a, &t, 1, &mut rnd) else {
        panic!()
    };
    assert!(r.data.is_empty());
    let b = req(true, 0, 3, &[]).with_data(
        format!("de1\0TargetName={IQN}\0AuthMethod=None\0MaxBurstLength=99999999\0").into_bytes(),
    );
    // The numeric value is out of range: refused.
    assert!(matches!(l.on_request(&b, &t, 1, &mut rnd), Step::Fail(_)));
    let mut l = Login::new(Limits {
        max_burst: 65_536,
        ..Limits::default()
    });
    let Step::Continue(_) = l.on_request(&a, &t, 1, &mut rnd) else {
        panic!()
    };
    let b = req(true, 1, 3, &[]).with_data(
        format!("de1\0TargetName={IQN}\0MaxBurstLength=1048576\0FirstBurstLength=262144\0")
            .into_bytes(),
    );
    let Step::Complete(r, done) = l.on_request(&b, &t, 1, &mut rnd) else {
        panic!()
    };
    assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("65536"));
    assert_eq!(
        done.params.first_burst, 65_536,
        "never above MaxBurstLength"
    );
    assert_eq!(done.initiator, INITIATOR);
}

#[test]
fn chap_values_in_hex_and_base64() {
    assert_eq!(decode_binary("0x0aFF").unwrap(), [0x0a, 0xff]);
    assert_eq!(decode_binary("0bAQID").unwrap(), [1, 2, 3]);
    assert!(decode_binary("0x0").is_none());
    assert!(decode_binary("12").is_none());
    assert_eq!(decode_binary("0XaB").unwrap(), [0xab]);
    assert_eq!(decode_binary("0BAQI=").unwrap(), [1, 2]);
    assert_eq!(decode_binary("0bAQ==").unwrap(), [1]);
    for bad in [
        "", "0", "0x", "0b", "0x+f", "0x-1", "0xg0", "0b=", "0bA", "0bAQ===", "0bA=QI", "0b!!!!",
    ] {
        assert_eq!(decode_binary(bad), None, "{bad:?}");
    }
}

/// Non-ASCII text where the digits should be: refused, and never sliced inside a character (a
/// two-byte character after "0x" used to put a cut at byte 3, inside it, and panic the thread).
#[test]
fn chap_values_with_non_ascii_text_are_refused() {
    for bad in [
        "0xé",
        "0xéa",
        "0xaé",
        "0x€0",
        "0bé",
        "0bAQé=",
        "é0x00",
        "0é",
        "ü",
        "0x😀😀",
        "0b€€€€",
    ] {
        assert_eq!(decode_binary(bad), None, "{bad:?}");
    }
}

#[test]
fn chap_values_never_panic() {
    use proptest::prelude::*;
    proptest!(|(v in any::<String>(), prefix in prop::sample::select(vec!["", "0x", "0X", "0b", "0B"]))| {
        let v = format!("{prefix}{v}");
        if let Some(bytes) = decode_binary(&v) {
            // Whatever decodes came from digits of its encoding.
            prop_assert!(v.is_ascii());
            prop_assert!(!bytes.is_empty());
        }
    });
    // And what corral encodes decodes back.
    proptest!(|(b in proptest::collection::vec(any::<u8>(), 1..64))| {
        prop_assert_eq!(decode_binary(&hex(&b)), Some(b));
    });
    // RFC 1321 test vector through the CHAP formula with an empty id byte stream is not possible;
    // check MD5 itself: MD5("abc").
    let mut h = Md5::new();
    h.update(b"abc");
    assert_eq!(hex(&h.finalize()), "0x900150983cd24fb0d6963f7d28e17f72");
}

/// Keys the fuzzing below draws from: every key this target knows, and some it does not.
fn any_key() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        3 => proptest::sample::select(vec![
            "InitiatorName", "InitiatorAlias", "SessionType", "TargetName", "AuthMethod", "CHAP_A",
            "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "HeaderDigest", "DataDigest", "MaxConnections",
            "ErrorRecoveryLevel", "InitialR2T", "ImmediateData", "DataPDUInOrder",
            "DataSequenceInOrder", "IFMarker", "OFMarker", "MaxRecvDataSegmentLength",
            "MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T", "DefaultTime2Wait",
            "DefaultTime2Retain", "TargetPortalGroupTag", "SendTargets",
        ])
        .prop_map(String::from),
        1 => "[A-Za-z][A-Za-z0-9_.-]{0,12}",
    ]
}

/// Values: the ones that mean something to some key, numbers at and beyond the limits, CHAP-looking
/// binary, and printable junk.
fn any_value() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        proptest::sample::select(vec![
            "None",
            "CHAP",
            "CHAP,None",
            "None,CHAP",
            "Yes",
            "No",
            "5",
            "5,7",
            "Normal",
            "Discovery",
            IQN,
            INITIATOR,
            "iqn.x:nope",
            "node1",
            "0",
            "511",
            "512",
            "16777215",
            "16777216",
            "0x0",
            "0x",
            "CRC32C",
            "CRC32C,None",
            "",
        ])
        .prop_map(String::from),
        proptest::prelude::any::<u64>().prop_map(|n| n.to_string()),
        "0[xb][0-9a-fA-F+/=]{0,40}",
        "[ -~]{0,24}",
    ]
}

/// The invariants of every answer the login gives.
fn check_answer(r: &Pdu) -> Result<(), proptest::test_runner::TestCaseError> {
    proptest::prop_assert_eq!(r.opcode(), op::LOGIN_RESPONSE);
    proptest::prop_assert!(parse_text(&r.data).is_ok(), "the answer's text parses");
    let wire = r.encode();
    proptest::prop_assert_eq!(wire.len() % 4, 0);
    Ok(())
}

proptest::proptest! {
    /// Any sequence of Login Requests (any flags, versions, keys and values) against a target with and
    /// without CHAP: each answer is a Login Response; a failure says why (status class not 0) and ends
    /// the login; a completed login says T and NSG=3 with sane parameters; and a CHAP target is never
    /// logged in to without the proof (which random values do not hold) other than by discovery.
    #[test]
    fn arbitrary_login_sequences_end_cleanly(
        with_chap in proptest::prelude::any::<bool>(),
        start in 0u8..3,
        requests in proptest::collection::vec(
            (
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::sample::select(vec![0x81u8, 0x87, 0x83, 0x00, 0x04, 0x41, 0x8B]),
                ],
                proptest::sample::select(vec![0u8, 0, 0, 1, 0xFF]),
                proptest::collection::vec((any_key(), any_value()), 0..10),
            ),
            1..8,
        ),
    ) {
        let chap = with_chap.then(|| Chap {
            user: "node1".into(),
            secret: "s3cret-s3cret".into(),
            mutual: Some(("corral".into(), "target-secret!".into())),
        });
        let t = T(chap);
        let mut l = Login::new(Limits::default());
        for (i, (flags, version, extra)) in requests.iter().enumerate() {
            let mut p = req(false, 0, 0, &[]);
            p.bhs[1] = *flags;
            p.bhs[3] = *version;
            // Most sequences name an initiator and a session first, so that they get somewhere.
            let mut kv: Vec<(String, String)> = match (i, start) {
                (0, 1) => vec![("InitiatorName".into(), INITIATOR.into()), ("TargetName".into(), IQN.into())],
                (0, 2) => vec![("InitiatorName".into(), INITIATOR.into()), ("SessionType".into(), "Discovery".into())],
                _ => Vec::new(),
            };
            kv.extend(extra.iter().cloned());
            let p = p.with_data(encode_text(&kv));
            match l.on_request(&p, &t, 5, &mut rnd) {
                Step::Continue(r) => {
                    check_answer(&r)?;
                    proptest::prop_assert_eq!(status_of(&r).0, 0);
                }
                Step::Complete(r, done) => {
                    check_answer(&r)?;
                    proptest::prop_assert_eq!(status_of(&r), status::SUCCESS);
                    proptest::prop_assert_eq!(r.flags() & 0x83, 0x83, "T and NSG=3");
                    // Discovery sessions need no secret (CHAP secrets belong to targets).
                    proptest::prop_assert!(
                        !with_chap || done.kind == SessionKind::Discovery,
                        "CHAP target logged in to without the proof"
                    );
                    let params = done.params;
                    proptest::prop_assert!(params.first_burst <= params.max_burst);
                    proptest::prop_assert!(params.max_burst <= Limits::default().max_burst);
                    proptest::prop_assert!((512..=16_777_215).contains(&params.initiator_max_recv));
                    proptest::prop_assert!(params.max_outstanding_r2t >= 1);
                    break;
                }
                Step::Fail(r) => {
                    check_answer(&r)?;
                    proptest::prop_assert_ne!(status_of(&r).0, 0, "a failure says why");
                    break;
                }
            }
        }
    }

    /// Login Requests with an arbitrary header and arbitrary bytes as text: an answer, never a panic.
    #[test]
    fn arbitrary_login_pdus_never_panic(
        pdus in proptest::collection::vec(
            (
                proptest::collection::vec(proptest::prelude::any::<u8>(), crate::iscsi::pdu::BHS_LEN..=crate::iscsi::pdu::BHS_LEN),
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            ),
            1..4,
        ),
    ) {
        let t = T(None);
        let mut l = Login::new(Limits::default());
        for (bhs, data) in pdus {
            let mut p = Pdu::new(op::LOGIN);
            p.bhs.copy_from_slice(&bhs);
            let p = p.with_data(data);
            match l.on_request(&p, &t, 5, &mut rnd) {
                Step::Continue(r) => check_answer(&r)?,
                Step::Complete(r, _) => check_answer(&r)?,
                Step::Fail(r) => {
                    check_answer(&r)?;
                    break;
                }
            }
        }
    }
}

#[test]
fn login_text_is_bounded_and_other_pdus_are_invalid_during_login() {
    let t = T(None);
    // Text continued without end: refused (target out of resources) once it passes the bound, and the
    // memory it held is let go.
    let mut l = Login::new(Limits::default());
    let mut a = req(false, 0, 0, &[]);
    a.bhs[1] |= 0x40;
    let a = a.with_data(vec![b'x'; 8192]);
    let mut sent = 0;
    let r = loop {
        match l.on_request(&a, &t, 1, &mut rnd) {
            Step::Continue(_) => sent += 8192,
            Step::Fail(r) => break r,
            _ => panic!("no other answer to endless text"),
        }
        assert!(sent <= MAX_LOGIN_TEXT, "held more than the bound");
    };
    assert_eq!(status_of(&r), status::OUT_OF_RESOURCES);
    assert!(l.partial.capacity() == 0);
    // A NOP-Out after the login started: "invalid during login" (RFC 7143 6.3).
    let mut l = Login::new(Limits::default());
    let first = req(
        false,
        0,
        0,
        &[("InitiatorName", INITIATOR), ("TargetName", IQN)],
    );
    assert!(matches!(
        l.on_request(&first, &t, 1, &mut rnd),
        Step::Continue(_)
    ));
    let Step::Fail(r) = l.on_request(&Pdu::new(op::NOP_OUT), &t, 1, &mut rnd) else {
        panic!()
    };
    assert_eq!(status_of(&r), status::INVALID_DURING_LOGIN);
}

#[test]
fn a_login_naming_an_unknown_session_is_refused() {
    struct Live(u16);
    impl Targets for Live {
        fn lookup(&self, _: &str, _: &str) -> Result<Option<Chap>, Refusal> {
            Ok(None)
        }
        fn session_exists(&self, initiator: &str, _: [u8; 6], tsih: u16) -> bool {
            initiator == INITIATOR && tsih == self.0
        }
    }
    let login = |live: u16, tsih: u16| {
        let mut l = Login::new(Limits::default());
        let mut r = req(
            true,
            1,
            3,
            &[("InitiatorName", INITIATOR), ("TargetName", IQN)],
        );
        r.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
        l.on_request(&r, &Live(live), 9, &mut rnd)
    };
    let Step::Fail(r) = login(5, 0x4321) else {
        panic!("a TSIH never given out must be refused")
    };
    assert_eq!(status_of(&r), status::SESSION_DOES_NOT_EXIST);
    // The live session's TSIH: a connection of that session, which keeps its TSIH.
    let Step::Complete(r, done) = login(0x4321, 0x4321) else {
        panic!()
    };
    assert_eq!((r.u16_at(14), done.tsih), (0x4321, 0x4321));
    // TSIH 0: a new session, which gets the TSIH the server hands out.
    let Step::Complete(r, _) = login(5, 0) else {
        panic!()
    };
    assert_eq!(r.u16_at(14), 9);
}

#[test]
fn login_responses_open_the_configured_window() {
    let t = T(None);
    let mut l = Login::new(Limits {
        cmd_window: 8,
        ..Limits::default()
    });
    let first = req(
        true,
        0,
        1,
        &[
            ("InitiatorName", INITIATOR),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ],
    );
    let Step::Continue(r) = l.on_request(&first, &t, 9, &mut rnd) else {
        panic!("security stage")
    };
    assert_eq!((r.u32_at(28), r.u32_at(32)), (1, 8), "ExpCmdSN, MaxCmdSN");
}
