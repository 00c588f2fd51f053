//! Tests of the TFTP core: a simulated client drives the transfer machine with a fake clock.

use super::*;
use proptest::prelude::*;

const LIM: Limits = Limits {
    max_blksize: 65464,
    max_windowsize: 64,
    timeout: 1,
    retries: 3,
    max_timeout: 5,
};

fn opts(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(len: usize) -> bytes::Bytes {
    (0..len)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A client that ACKs every window's last block (or each block with window 1); returns the file it got
/// and the number of data packets it saw.
fn run(
    data: bytes::Bytes,
    options: &[(&str, &str)],
    drop_every: Option<usize>,
) -> (Vec<u8>, usize) {
    let n = negotiate(&opts(options), data.len() as u64, &LIM);
    let mut t = Transfer::new(data, &n, &LIM);
    let mut now = Instant::now();
    let mut got: Vec<u8> = Vec::new();
    let mut expect: u16 = 1;
    let mut packets = 0usize;
    let mut step = t.start(now);
    let mut since_ack = 0u16;
    for _ in 0..2_000_000 {
        match step {
            Step::Done => return (got, packets),
            Step::Failed(e) => panic!("failed: {e}"),
            Step::Wait(d) => {
                now = d;
                step = t.on_timeout(now);
            }
            Step::Send(pkts, deadline) => {
                let mut reply = None;
                for p in pkts {
                    packets += 1;
                    if drop_every.is_some_and(|k| packets % k == 0) {
                        continue; // lost on the wire
                    }
                    match Packet::parse(&p).unwrap() {
                        Packet::Oack { .. } => reply = Some(Packet::Ack { block: 0 }.encode()),
                        Packet::Data { block, data } => {
                            if block == expect {
                                got.extend_from_slice(&data);
                                expect = expect.wrapping_add(1);
                                since_ack += 1;
                                let last = data.len() < n.blksize;
                                if since_ack == n.windowsize || last {
                                    reply = Some(Packet::Ack { block }.encode());
                                    since_ack = 0;
                                }
                            } else {
                                // Out of order: ACK what we have (RFC 7440).
                                reply = Some(
                                    Packet::Ack {
                                        block: expect.wrapping_sub(1),
                                    }
                                    .encode(),
                                );
                                since_ack = 0;
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                step = match reply {
                    Some(r) => t.on_packet(&r, now, deadline),
                    None => {
                        now = deadline;
                        t.on_timeout(now)
                    }
                };
            }
        }
    }
    panic!("transfer did not end");
}

#[test]
fn packets_round_trip() {
    for p in [
        Packet::Rrq {
            filename: "a/b".into(),
            mode: "octet".into(),
            options: opts(&[("blksize", "1468"), ("tsize", "0")]),
        },
        Packet::Data {
            block: 7,
            data: vec![1, 2, 3],
        },
        Packet::Ack { block: 65535 },
        Packet::Error {
            code: 1,
            message: "no".into(),
        },
        Packet::Oack {
            options: opts(&[("windowsize", "16")]),
        },
    ] {
        assert_eq!(Packet::parse(&p.encode()).unwrap(), p);
    }
    assert_eq!(
        Packet::parse(b"\x00\x01file\x00").unwrap_err(),
        ParseError::Short
    );
    assert_eq!(
        Packet::parse(b"\x00\x09\x00\x00").unwrap_err(),
        ParseError::Opcode(9)
    );
    assert_eq!(
        Packet::parse(b"\x00\x01f\x00octet").unwrap_err(),
        ParseError::Unterminated
    );
}

#[test]
fn negotiation_clamps_and_reports() {
    let lim = Limits {
        max_blksize: 1468,
        max_windowsize: 8,
        ..LIM
    };
    let n = negotiate(
        &opts(&[
            ("blksize", "9000"),
            ("tsize", "0"),
            ("windowsize", "100"),
            ("timeout", "3"),
            ("bogus", "1"),
        ]),
        4242,
        &lim,
    );
    assert_eq!(n.blksize, 1468);
    assert_eq!(n.windowsize, 8);
    assert_eq!(n.timeout, Duration::from_secs(3));
    assert_eq!(
        n.oack,
        opts(&[
            ("blksize", "1468"),
            ("tsize", "4242"),
            ("windowsize", "8"),
            ("timeout", "3")
        ])
    );
    // Nonsense values are ignored, not echoed.
    let n = negotiate(
        &opts(&[("blksize", "4"), ("windowsize", "0"), ("timeout", "0")]),
        1,
        &lim,
    );
    assert_eq!((n.blksize, n.windowsize), (512, 1));
    assert!(n.oack.is_empty());
}

#[test]
fn plain_transfer_without_options() {
    let data = file(512 * 3 + 100);
    let (got, _) = run(data.clone(), &[], None);
    assert_eq!(got, data);
}

#[test]
fn exact_multiple_ends_with_empty_block() {
    let data = file(512 * 4);
    let (got, packets) = run(data.clone(), &[], None);
    assert_eq!(got, data);
    assert_eq!(packets, 5, "4 full blocks and an empty one");
    let (got, _) = run(bytes::Bytes::new(), &[], None);
    assert!(got.is_empty());
}

#[test]
fn windows_and_blksizes() {
    let data = file(200_000);
    for (b, w) in [("512", "1"), ("1468", "16"), ("8192", "16"), ("8192", "1")] {
        let (got, _) = run(
            data.clone(),
            &[("blksize", b), ("windowsize", w), ("tsize", "0")],
            None,
        );
        assert_eq!(got, data, "blksize {b} window {w}");
    }
}

#[test]
fn losses_are_recovered() {
    let data = file(100_000);
    for (w, k) in [("1", 7), ("16", 5), ("16", 13)] {
        let (got, _) = run(
            data.clone(),
            &[("windowsize", w), ("blksize", "1024")],
            Some(k),
        );
        assert_eq!(got, data, "window {w} dropping every {k}th packet");
    }
}

#[test]
fn block_numbers_wrap_past_65535() {
    let data = file(70_000 * 16);
    let (got, _) = run(
        data.clone(),
        &[("blksize", "16"), ("windowsize", "64")],
        None,
    );
    assert_eq!(got, data);
}

#[test]
fn client_error_ends_and_silence_fails() {
    let n = negotiate(&opts(&[("tsize", "0")]), 10, &LIM);
    let mut t = Transfer::new(file(10), &n, &LIM);
    let now = Instant::now();
    let Step::Send(p, d) = t.start(now) else {
        panic!()
    };
    assert!(matches!(Packet::parse(&p[0]).unwrap(), Packet::Oack { .. }));
    // EDK2 asks for tsize and aborts with error 8 on purpose.
    assert!(matches!(
        t.on_packet(&error(8, "tsize only"), now, d),
        Step::Failed(_)
    ));

    let mut t = Transfer::new(file(10), &negotiate(&[], 10, &LIM), &LIM);
    t.start(now);
    let mut fails = 0;
    for i in 1..=10 {
        if let Step::Failed(_) = t.on_timeout(now + Duration::from_secs(i)) {
            fails = i;
            break;
        }
    }
    assert_eq!(fails, 4, "3 retransmissions, then give up");
}

#[test]
fn duplicate_and_stray_acks_are_ignored() {
    let n = negotiate(&opts(&[("windowsize", "4")]), 5000, &LIM);
    let mut t = Transfer::new(file(5000), &n, &LIM);
    let now = Instant::now();
    let d = now + Duration::from_secs(1);
    let Step::Send(p, _) = t.start(now) else {
        panic!()
    };
    assert!(matches!(Packet::parse(&p[0]).unwrap(), Packet::Oack { .. }));
    let Step::Send(w, _) = t.on_packet(&Packet::Ack { block: 0 }.encode(), now, d) else {
        panic!()
    };
    assert_eq!(w.len(), 4);
    let Step::Send(w, _) = t.on_packet(&Packet::Ack { block: 4 }.encode(), now, d) else {
        panic!()
    };
    assert_eq!(w.len(), 4);
    // A duplicate of the old ACK and an ACK for a block never sent change nothing.
    assert_eq!(
        t.on_packet(&Packet::Ack { block: 4 }.encode(), now, d),
        Step::Wait(d)
    );
    assert_eq!(
        t.on_packet(&Packet::Ack { block: 300 }.encode(), now, d),
        Step::Wait(d)
    );
    assert_eq!(t.on_packet(b"\x00", now, d), Step::Wait(d));
}

#[test]
fn a_repeated_option_is_acknowledged_once_with_the_value_used() {
    // Found by the tftp_transfer fuzz target (fuzz/regressions/tftp_transfer/): the OACK said blksize
    // 654 and then 20, while the transfer used 20.
    let n = negotiate(
        &opts(&[
            ("blksize", "654"),
            ("tsize", "0"),
            ("blksize", "20"),
            ("tsize", "0"),
        ]),
        100,
        &LIM,
    );
    assert_eq!(n.blksize, 20);
    assert_eq!(n.oack, opts(&[("blksize", "20"), ("tsize", "100")]));
}

#[test]
fn an_oack_without_options_is_refused() {
    // Found by the tftp_packet fuzz target (fuzz/regressions/tftp_packet/): it parsed, but encoded to a
    // 2-byte packet that does not.
    assert_eq!(
        Packet::parse(b"\x00\x06blksize\x00"),
        Err(ParseError::Short)
    );
    assert_eq!(Packet::parse(b"\x00\x06\x00"), Err(ParseError::Short));
    let ok = Packet::parse(b"\x00\x06blksize\x001428\x00").unwrap();
    assert_eq!(Packet::parse(&ok.encode()), Ok(ok));
}

proptest! {
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Packet::parse(&bytes);
    }

    #[test]
    fn transfer_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..64), len in 0usize..5000) {
        let mut t = Transfer::new(file(len), &negotiate(&opts(&[("windowsize", "8")]), len as u64, &LIM), &LIM);
        let now = Instant::now();
        t.start(now);
        let _ = t.on_packet(&bytes, now, now);
    }

    #[test]
    fn any_size_any_window_arrives_whole(len in 0usize..20_000, b in 8u32..2048, w in 1u32..20) {
        let data = file(len);
        let (got, _) = run(data.clone(), &[("blksize", &b.to_string()), ("windowsize", &w.to_string())], None);
        prop_assert_eq!(got, data.to_vec());
    }
}

#[test]
fn timeout_above_the_bound_is_left_out_of_the_oack() {
    // Within the bound: echoed as asked (RFC 2349 wants the very value back).
    let n = negotiate(&opts(&[("timeout", "5"), ("tsize", "0")]), 9, &LIM);
    assert_eq!(n.timeout, Duration::from_secs(5));
    assert!(!n.timeout_clamped);
    assert_eq!(n.oack, opts(&[("timeout", "5"), ("tsize", "9")]));
    // Above it: not acknowledged (a lower value is not allowed), our side runs with max_timeout.
    for asked in ["6", "255"] {
        let n = negotiate(&opts(&[("timeout", asked), ("tsize", "0")]), 9, &LIM);
        assert_eq!(n.timeout, Duration::from_secs(5), "asked {asked}");
        assert!(n.timeout_clamped);
        assert_eq!(n.oack, opts(&[("tsize", "9")]));
    }
    // The only option left out: no OACK at all, the transfer starts with DATA 1.
    let n = negotiate(&opts(&[("timeout", "255")]), 9, &LIM);
    assert!(n.oack.is_empty() && n.timeout_clamped);
    let mut t = Transfer::new(file(9), &n, &LIM);
    let Step::Send(p, d) = t.start(Instant::now()) else {
        panic!()
    };
    assert!(matches!(
        Packet::parse(&p[0]).unwrap(),
        Packet::Data { block: 1, .. }
    ));
    assert!(d <= Instant::now() + Duration::from_secs(5));
    // Values that are no number of seconds are ignored and not counted as clamped.
    let n = negotiate(&opts(&[("timeout", "256"), ("timeout", "x")]), 9, &LIM);
    assert!(!n.timeout_clamped && n.oack.is_empty());
    // A server default above the bound (the config refuses it, the core does not trust it) is capped.
    let n = negotiate(
        &[],
        9,
        &Limits {
            timeout: 9,
            max_timeout: 2,
            ..LIM
        },
    );
    assert_eq!(n.timeout, Duration::from_secs(2));
}

/// A client that asks for the longest timeout and then never answers holds its session no longer than
/// max_timeout × (retries + 1): every deadline the transfer sets is within max_timeout of the last, and it
/// gives up at the silence limit, not before.
#[test]
fn a_silent_client_is_abandoned_within_the_bound() {
    for options in [
        opts(&[("timeout", "255"), ("blksize", "1024")]),
        opts(&[("timeout", "255")]),
        Vec::new(),
    ] {
        let n = negotiate(&options, 100_000, &LIM);
        let mut t = Transfer::new(file(100_000), &n, &LIM);
        let start = Instant::now();
        let bound = Duration::from_secs(u64::from(LIM.max_timeout)) * (u32::from(LIM.retries) + 1);
        assert!(t.silence_limit() <= bound, "{options:?}");
        let mut step = t.start(start);
        let mut sends = 0;
        let end = loop {
            match step {
                Step::Send(_, d) => {
                    sends += 1;
                    step = t.on_timeout(d);
                    if let Step::Failed(_) = step {
                        break d;
                    }
                }
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(sends, 1 + LIM.retries as usize, "{options:?}");
        assert_eq!(end - start, t.silence_limit(), "{options:?}");
    }
}

#[test]
fn busy_errors_name_the_bound() {
    use crate::conn::Busy;
    for (why, text) in [
        (Busy::Full, "too many transfers"),
        (Busy::PeerFull, "from this address"),
    ] {
        match Packet::parse(&busy(why)).unwrap() {
            Packet::Error { code: c, message } => {
                assert_eq!(c, code::NOT_DEFINED);
                assert!(message.contains(text), "{message}");
            }
            p => panic!("{p:?}"),
        }
    }
}
