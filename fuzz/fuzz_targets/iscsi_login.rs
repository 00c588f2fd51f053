//! The login negotiation on arbitrary input, driven as the shell drives it: Login Requests through
//! `Login::on_request` until the login completes or fails, then the rest of the stream through the full
//! feature phase (`Session`, SCSI on a 64 KiB in-memory disk). The first byte picks the target's
//! authentication (none, CHAP, mutual CHAP) and how the rest is read:
//!
//! - top bit clear: a raw byte stream, framed into PDUs (8 KiB data segments during login, as the shell
//!   allows);
//! - top bit set: chunks split at 0xFF bytes, each a Login Request built from one flags byte (T C CSG NSG)
//!   and the key=value text that follows, so that the fuzzer reaches the keys, the stages and CHAP
//!   without having to find a valid BHS first; after the login, the rest is a raw stream again.
//!
//! Nothing may panic; every login answer is a Login Response that frames back to itself; a failure has a
//! non-zero status class and ends the connection; a completed login says T and NSG=3, and never happens
//! against a CHAP target without the initiator's proof (which the fuzzer cannot compute), discovery aside.
#![no_main]

mod common;

use corral::iscsi::login::{Chap, Limits, LoggedIn, Login, Refusal, SessionKind, Step, Targets};
use corral::iscsi::pdu::{frame, op, parse_text, Frame, Pdu};
use corral::iscsi::scsi::Lun;
use corral::iscsi::session::Session;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};

const IQN: &str = "iqn.2026-11.io.corral:db.0";

struct Table(Option<Chap>);

impl Targets for Table {
    fn lookup(&self, target: &str, _initiator: &str) -> Result<Option<Chap>, Refusal> {
        match target {
            IQN => Ok(self.0.clone()),
            "iqn.2026-11.io.corral:db.1" => Err(Refusal::Forbidden),
            _ => Err(Refusal::NotFound),
        }
    }
}

/// Checks a Login Response (with the login it completed, if it did).
fn answer(p: &Pdu, chap: bool, done: Option<&LoggedIn>) {
    assert_eq!(p.opcode(), op::LOGIN_RESPONSE);
    let wire = p.encode();
    match frame(&wire, u32::MAX) {
        Ok(Frame::Pdu(q, used)) => assert!(used == wire.len() && q == *p),
        other => panic!("a login response does not frame back: {other:?}"),
    }
    assert!(parse_text(&p.data).is_ok(), "the response's text parses");
    if let Some(done) = done {
        assert_eq!(p.bhs[36], 0, "a completed login succeeded");
        assert_eq!(p.flags() & 0x83, 0x83, "T and NSG=3");
        // Discovery needs no secret (CHAP secrets belong to targets); a normal session with a CHAP
        // target does.
        assert!(
            !chap || done.kind == SessionKind::Discovery,
            "a CHAP target was logged in to without the proof"
        );
        let params = done.params;
        assert!(params.first_burst <= params.max_burst);
        assert!((512..=16_777_215).contains(&params.initiator_max_recv));
    }
}

/// Builds a Login Request from one chunk: flags byte, then text.
fn login_pdu(chunk: &[u8], n: u32) -> Pdu {
    let mut p = Pdu::new(op::LOGIN);
    p.bhs[0] |= 0x40;
    p.bhs[1] = chunk.first().copied().unwrap_or(0x81);
    p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    p.set_u32(16, n).set_u32(24, 1).set_u32(28, n);
    p.with_data(chunk.get(1..).unwrap_or(&[]).to_vec())
}

/// The full feature phase on the raw stream `rest`, as the shell runs it.
fn full_feature(done: &LoggedIn, stat_sn: u32, cmd_sn: u32, mut rest: &[u8]) {
    let mut session = Session::new(done.params, stat_sn, cmd_sn);
    let lun = Lun::new(
        Arc::new(common::Mem(Mutex::new(vec![0; 1 << 16]), false)),
        "fuzz",
        1,
    );
    let max_data = done.params.target_max_recv;
    let chunk = done.params.initiator_max_recv.max(512) as usize;
    while let Ok(Frame::Pdu(p, used)) = frame(rest, max_data) {
        rest = &rest[used..];
        let events = session.on_pdu(&p);
        let Ok(ran) = session.run(events, Some(&lun), |r| {
            if r.opcode() == op::DATA_IN {
                assert!(
                    r.data.len() <= chunk,
                    "Data-In within the initiator's limit"
                );
            }
            let _ = r.encode();
            Ok::<(), std::convert::Infallible>(())
        });
        if !ran.open {
            return;
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let chap = match mode & 0x03 {
        0 => None,
        1 => Some(Chap {
            user: "node1".into(),
            secret: "s3cret-s3cret".into(),
            mutual: None,
        }),
        _ => Some(Chap {
            user: "node1".into(),
            secret: "s3cret-s3cret".into(),
            mutual: Some(("corral".into(), "target-secret!".into())),
        }),
    };
    let needs_chap = chap.is_some();
    let table = Table(chap);
    let mut login = Login::new(Limits::default());
    let mut counter = 0u8;
    let mut random = |buf: &mut [u8]| {
        for b in buf {
            counter = counter.wrapping_add(37);
            *b = counter;
        }
    };
    let mut tsih = 0u16;
    let mut step = |login: &mut Login, p: &Pdu| -> Option<Option<Box<LoggedIn>>> {
        tsih = tsih.wrapping_add(1).max(1);
        match login.on_request(p, &table, tsih, &mut random) {
            Step::Continue(r) => {
                answer(&r, false, None);
                assert_eq!(r.bhs[36], 0, "a login that goes on has succeeded so far");
                Some(None)
            }
            Step::Complete(r, done) => {
                answer(&r, needs_chap, Some(&done));
                Some(Some(done))
            }
            Step::Fail(r) => {
                answer(&r, false, None);
                assert_ne!(r.bhs[36], 0, "a failed login says why");
                None
            }
        }
    };
    if mode & 0x80 != 0 {
        let mut consumed = 0usize;
        let mut n = 0u32;
        for chunk in data.split(|b| *b == 0xFF) {
            consumed += chunk.len() + 1;
            n += 1;
            let p = login_pdu(chunk, n);
            match step(&mut login, &p) {
                Some(None) => {}
                Some(Some(done)) => {
                    let rest = data.get(consumed..).unwrap_or(&[]);
                    full_feature(&done, login.next_stat_sn(), 1, rest);
                    return;
                }
                None => return,
            }
        }
    } else {
        let mut rest = data;
        while let Ok(Frame::Pdu(p, used)) = frame(rest, 8192) {
            rest = &rest[used..];
            match step(&mut login, &p) {
                Some(None) => {}
                Some(Some(done)) => {
                    full_feature(&done, login.next_stat_sn(), p.cmd_sn(), rest);
                    return;
                }
                None => return,
            }
        }
    }
});
