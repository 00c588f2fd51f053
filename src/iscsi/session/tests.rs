//! The full feature phase: reads split to the initiator's segment size, writes through immediate data,
//! unsolicited data and R2Ts, pings, task management, discovery, logout and bad PDUs.

use super::*;

fn params() -> Params {
    Params {
        initiator_max_recv: 8192,
        target_max_recv: 262_144,
        max_burst: 16_384,
        first_burst: 4096,
        initial_r2t: true,
        immediate_data: true,
        max_outstanding_r2t: 2,
        default_time2wait: 2,
        default_time2retain: 0,
    }
}

fn cmd(
    itt: u32,
    sn: u32,
    read: bool,
    write: bool,
    expected: u32,
    cdb: &[u8],
    data: Vec<u8>,
) -> Pdu {
    let mut p = Pdu::new(op::SCSI_COMMAND);
    p.bhs[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 };
    p.set_u32(16, itt).set_u32(20, expected).set_u32(24, sn);
    p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
    p.with_data(data)
}

fn data_out_sn(itt: u32, ttt: u32, sn: u32, offset: u32, data: Vec<u8>, last: bool) -> Pdu {
    let mut p = Pdu::new(op::DATA_OUT);
    p.bhs[1] = if last { 0x80 } else { 0 };
    p.set_u32(16, itt)
        .set_u32(20, ttt)
        .set_u32(36, sn)
        .set_u32(40, offset);
    p.with_data(data)
}

fn data_out(itt: u32, ttt: u32, offset: u32, data: Vec<u8>, last: bool) -> Pdu {
    data_out_sn(itt, ttt, 0, offset, data, last)
}

/// A WRITE(10) CDB moving `bytes` (rounded up to blocks).
fn w10(bytes: u32) -> [u8; 10] {
    let n = bytes.div_ceil(512) as u16;
    let mut c = [0x2A, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn sent(ev: &[Event]) -> Vec<&Pdu> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Send(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn reads_come_back_in_segments_with_status_in_the_last() {
    let mut s = Session::new(params(), 10, 1);
    let ev = s.on_pdu(&cmd(5, 1, true, false, 20_000, &[0x28], vec![]));
    assert!(matches!(&ev[..], [Event::Execute { itt: 5, .. }]));
    let ev = s.completed(5, scsi::Reply::data(vec![7; 20_000]));
    let pdus = sent(&ev);
    assert_eq!(pdus.len(), 3, "8192 + 8192 + 3616");
    assert_eq!(
        pdus.iter().map(|p| p.data.len()).collect::<Vec<_>>(),
        [8192, 8192, 3616]
    );
    assert_eq!(
        (pdus[1].u32_at(36), pdus[1].u32_at(40)),
        (1, 8192),
        "DataSN, offset"
    );
    let last = pdus[2];
    assert_eq!(last.flags() & 0x81, 0x81, "F and S");
    assert_eq!(
        (last.u32_at(24), last.u32_at(28)),
        (10, 2),
        "StatSN, ExpCmdSN"
    );
    assert_eq!(pdus[0].flags() & 0x01, 0, "no status before the last");
    // A short reply: underflow residual.
    s.on_pdu(&cmd(6, 2, true, false, 4096, &[0x12], vec![]));
    let ev = s.completed(6, scsi::Reply::data(vec![1; 36]));
    let p = sent(&ev)[0];
    assert_eq!((p.flags() & 0x03, p.u32_at(44)), (0x03, 4060));
    // CHECK CONDITION: a SCSI Response with sense.
    s.on_pdu(&cmd(7, 3, true, false, 512, &[0x28], vec![]));
    let ev = s.completed(7, scsi::Reply::check(scsi::Sense::LBA_OUT_OF_RANGE));
    let p = sent(&ev)[0];
    assert_eq!(
        (p.opcode(), p.bhs[3], p.data[2 + 12]),
        (op::SCSI_RESPONSE, 2, 0x21)
    );
    assert_eq!(s.tasks(), 0);
}

#[test]
fn writes_collect_immediate_unsolicited_and_solicited_data() {
    // InitialR2T=Yes: 1024 bytes immediate, the rest by R2Ts of 16 KiB, two at a time.
    let mut s = Session::new(params(), 1, 1);
    let total = 40_000u32;
    let payload: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
    let ev = s.on_pdu(&cmd(
        9,
        1,
        false,
        true,
        total,
        &w10(total),
        payload[..1024].to_vec(),
    ));
    let r2ts = sent(&ev);
    assert_eq!(r2ts.len(), 2);
    assert_eq!(
        r2ts.iter()
            .map(|p| (p.u32_at(40), p.u32_at(44)))
            .collect::<Vec<_>>(),
        [(1024, 16_384), (17_408, 16_384)]
    );
    let (t1, t2) = (r2ts[0].u32_at(20), r2ts[1].u32_at(20));
    // The first burst arrives in two PDUs; its completion opens the third R2T.
    assert!(s
        .on_pdu(&data_out(9, t1, 1024, payload[1024..9216].to_vec(), false))
        .is_empty());
    let ev = s.on_pdu(&data_out_sn(
        9,
        t1,
        1,
        9216,
        payload[9216..17_408].to_vec(),
        true,
    ));
    let r = sent(&ev);
    assert_eq!(
        (r.len(), r[0].u32_at(40), r[0].u32_at(44)),
        (1, 33_792, 6208)
    );
    let t3 = r[0].u32_at(20);
    assert_eq!(r[0].u32_at(36), 2, "R2TSN");
    assert!(s
        .on_pdu(&data_out(9, t3, 33_792, payload[33_792..].to_vec(), true))
        .is_empty());
    let ev = s.on_pdu(&data_out(
        9,
        t2,
        17_408,
        payload[17_408..33_792].to_vec(),
        true,
    ));
    match &ev[..] {
        [Event::Execute {
            itt: 9,
            data_out,
            cdb,
            ..
        }] => {
            assert_eq!(data_out, &payload);
            assert_eq!(cdb[0], 0x2A);
        }
        other => panic!("{other:?}"),
    }
    let ev = s.completed(9, scsi::Reply::good());
    let p = sent(&ev)[0];
    assert_eq!(
        (p.opcode(), p.bhs[3], p.u32_at(24)),
        (op::SCSI_RESPONSE, 0, 1)
    );

    // InitialR2T=No: the first burst comes unsolicited, then one R2T for the rest.
    let mut s = Session::new(
        Params {
            initial_r2t: false,
            ..params()
        },
        1,
        1,
    );
    let ev = s.on_pdu(&cmd(3, 1, false, true, 6000, &w10(6000), vec![1; 1000]));
    assert!(ev.is_empty(), "waits for the unsolicited burst");
    let ev = s.on_pdu(&data_out(3, NO_TAG, 1000, vec![2; 3096], true));
    let r = sent(&ev);
    assert_eq!((r.len(), r[0].u32_at(40), r[0].u32_at(44)), (1, 4096, 1904));
    let ev = s.on_pdu(&data_out(3, r[0].u32_at(20), 4096, vec![3; 1904], true));
    assert!(matches!(&ev[..], [Event::Execute { itt: 3, .. }]));
}

#[test]
fn bad_data_and_bad_commands() {
    let mut s = Session::new(params(), 1, 1);
    // Data beyond what an R2T asked for: a protocol error that ends the connection.
    let ev = s.on_pdu(&cmd(1, 1, false, true, 8192, &w10(8192), vec![]));
    let t = sent(&ev)[0].u32_at(20);
    let ev = s.on_pdu(&data_out(1, t, 4096, vec![0; 8192], true));
    assert!(matches!(&ev[..], [Event::Send(r), Event::Close] if r.opcode() == op::REJECT));
    // Unsolicited data when InitialR2T=Yes.
    let mut s = Session::new(params(), 1, 1);
    s.on_pdu(&cmd(1, 1, false, true, 8192, &w10(8192), vec![]));
    let ev = s.on_pdu(&data_out(1, NO_TAG, 0, vec![0; 512], false));
    assert!(matches!(ev.last(), Some(Event::Close)));
    // Immediate data beyond FirstBurstLength.
    let mut s = Session::new(params(), 1, 1);
    let ev = s.on_pdu(&cmd(2, 1, false, true, 65_536, &w10(65_536), vec![0; 8192]));
    assert_eq!(sent(&ev)[0].opcode(), op::REJECT);
    // A DataSN out of sequence: the rest of the sequence is taken in silently (the task then ends
    // with CHECK CONDITION, see a_data_sequence_error_ends_the_task_with_check_condition).
    let mut s2 = Session::new(params(), 1, 1);
    let ev = s2.on_pdu(&cmd(
        1,
        1,
        false,
        true,
        8192,
        &[0x2A, 0, 0, 0, 0, 0, 0, 0, 16, 0],
        vec![],
    ));
    let t = sent(&ev)[0].u32_at(20);
    let ev = s2.on_pdu(&data_out_sn(1, t, 5, 0, vec![0; 4096], false));
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(s2.tasks(), 1);
    // A read with no room for data: status and overflow residual in a SCSI Response, never silence.
    let mut s3 = Session::new(params(), 1, 1);
    s3.on_pdu(&cmd(2, 1, true, false, 0, &[0x28], vec![]));
    let ev = s3.completed(2, scsi::Reply::data(vec![0; 512]));
    let p = sent(&ev)[0];
    assert_eq!(
        (p.opcode(), p.flags() & 0x06, p.u32_at(44)),
        (op::SCSI_RESPONSE, 0x04, 512)
    );
    // A write flag on a command that sends nothing runs at once.
    let ev = s3.on_pdu(&cmd(
        3,
        2,
        false,
        true,
        512,
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        vec![],
    ));
    assert!(matches!(&ev[..], [Event::Execute { itt: 3, .. }]));
    // A write with no expected length: runs with no data, GOOD with the whole transfer as overflow.
    let ev = s3.on_pdu(&cmd(4, 3, false, true, 0, &w10(512), vec![]));
    assert!(matches!(&ev[..], [Event::Execute { itt: 4, data_out, .. }] if data_out.is_empty()));
    let p = sent(&s3.completed(4, scsi::Reply::good()))[0].clone();
    assert_eq!((p.bhs[3], p.flags() & 0x06, p.u32_at(44)), (0, 0x04, 512));
    // Data-Out for an unknown task.
    let ev = s.on_pdu(&data_out(77, 5, 0, vec![0; 512], true));
    assert_eq!(sent(&ev)[0].opcode(), op::REJECT);
    // A task tag already in use.
    s.on_pdu(&cmd(4, 2, true, false, 512, &[0x28], vec![]));
    let ev = s.on_pdu(&cmd(4, 3, true, false, 512, &[0x28], vec![]));
    assert_eq!(sent(&ev)[0].bhs[2], reject::TASK_IN_PROGRESS);
    // A CmdSN far outside the window is dropped silently.
    assert!(s
        .on_pdu(&cmd(8, 1000, true, false, 512, &[0x28], vec![]))
        .is_empty());
    // SNACK (ERL 0) and unknown opcodes are rejected.
    assert_eq!(
        sent(&s.on_pdu(&Pdu::new(op::SNACK)))[0].bhs[2],
        reject::SNACK_REJECT
    );
    assert_eq!(
        sent(&s.on_pdu(&Pdu::new(0x1C)))[0].bhs[2],
        reject::COMMAND_NOT_SUPPORTED
    );
}

#[test]
fn pings_tasks_text_and_logout() {
    let mut s = Session::new(params(), 1, 1);
    s.set_targets(vec![(
        "iqn.2026-11.io.corral:web.0".into(),
        "10.0.0.1:3260,1".into(),
    )]);
    let mut nop = Pdu::new(op::NOP_OUT);
    nop.bhs[0] |= 0x40;
    nop.set_u32(16, 3);
    let ev = s.on_pdu(&nop.clone().with_data(b"ping".to_vec()));
    let p = sent(&ev)[0];
    assert_eq!(
        (p.opcode(), p.itt(), p.u32_at(20), &p.data[..]),
        (op::NOP_IN, 3, NO_TAG, &b"ping"[..])
    );
    nop.set_u32(16, NO_TAG);
    assert!(s.on_pdu(&nop).is_empty(), "an answer to our ping");
    // ABORT TASK of a pending write; its late data is then rejected.
    s.on_pdu(&cmd(11, 1, false, true, 8192, &w10(8192), vec![]));
    assert_eq!(s.tasks(), 1);
    let mut tm = Pdu::new(op::TASK_MGMT);
    tm.bhs[0] |= 0x40;
    tm.bhs[1] = 0x80 | 1;
    tm.set_u32(16, 12).set_u32(20, 11);
    let p = sent(&s.on_pdu(&tm))[0].clone();
    assert_eq!(
        (p.opcode(), p.bhs[2], p.itt()),
        (op::TASK_MGMT_RESPONSE, 0, 12)
    );
    assert_eq!(s.tasks(), 0);
    // LUN RESET drops a running read: its reply goes nowhere.
    s.on_pdu(&cmd(13, 2, true, false, 512, &[0x28], vec![]));
    tm.bhs[1] = 0x80 | 5;
    assert_eq!(sent(&s.on_pdu(&tm))[0].bhs[2], 0);
    assert!(s.completed(13, scsi::Reply::data(vec![0; 512])).is_empty());
    // An unsupported function.
    tm.bhs[1] = 0x80 | 8;
    assert_eq!(sent(&s.on_pdu(&tm))[0].bhs[2], 5);
    // SendTargets.
    let mut t = Pdu::new(op::TEXT);
    t.set_u32(16, 20).set_u32(24, 3);
    let ev = s.on_pdu(&t.with_data(b"SendTargets=All\0".to_vec()));
    let kv = pdu::parse_text(&sent(&ev)[0].data).unwrap();
    assert_eq!(kv[0].1, "iqn.2026-11.io.corral:web.0");
    assert_eq!(kv[1], ("TargetAddress".into(), "10.0.0.1:3260,1".into()));
    // Logout: response, then close.
    let mut lo = Pdu::new(op::LOGOUT);
    lo.bhs[0] |= 0x40;
    lo.set_u32(16, 30);
    let ev = s.on_pdu(&lo);
    assert!(matches!(&ev[..], [Event::Send(p), Event::Close] if p.opcode() == op::LOGOUT_RESPONSE));
}

#[test]
fn a_read_flagged_as_a_write_takes_its_data_and_runs() {
    // libiscsi iSCSIResiduals.Read10Invalid: READ(10) with the W flag and a block of immediate data.
    // The data is taken in (the connection stays in step) and the read runs: GOOD, no Data-In.
    let mut s = Session::new(params(), 1, 1);
    let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let ev = s.on_pdu(&cmd(1, 1, false, true, 512, &read10, vec![0xA6; 512]));
    assert!(matches!(&ev[..], [Event::Execute { itt: 1, cdb, .. }] if cdb[0] == 0x28));
    let ev = s.completed(1, scsi::Reply::data(vec![0; 512]));
    let p = sent(&ev)[0];
    assert_eq!((p.opcode(), p.bhs[3]), (op::SCSI_RESPONSE, scsi::GOOD));
    // With InitialR2T=No and no immediate data, the unsolicited burst is waited for, then it runs.
    let mut s = Session::new(
        Params {
            initial_r2t: false,
            ..params()
        },
        1,
        1,
    );
    assert!(s
        .on_pdu(&cmd(2, 1, false, true, 512, &read10, vec![]))
        .is_empty());
    let ev = s.on_pdu(&data_out(2, NO_TAG, 0, vec![0xA6; 512], true));
    assert!(matches!(&ev[..], [Event::Execute { itt: 2, .. }]));
}

#[test]
fn abort_task_of_a_finished_task_says_it_does_not_exist() {
    // RFC 7143 11.5.1; libiscsi iSCSITMF.AbortTaskSimpleAsync: the write completed (GOOD) before the
    // ABORT TASK arrived, so the answer is "task does not exist" (1), not "function complete".
    let mut s = Session::new(params(), 1, 1);
    let ev = s.on_pdu(&cmd(7, 1, false, true, 512, &w10(512), vec![0; 512]));
    assert!(matches!(&ev[..], [Event::Execute { itt: 7, .. }]));
    s.completed(7, scsi::Reply::good());
    let mut tm = Pdu::new(op::TASK_MGMT);
    tm.bhs[0] |= 0x40;
    tm.bhs[1] = 0x80 | 1;
    tm.set_u32(16, 8)
        .set_u32(20, 7)
        .set_u32(24, 2)
        .set_u32(32, 1);
    assert_eq!(sent(&s.on_pdu(&tm))[0].bhs[2], 1);
    // A task whose CmdSN (3) is still to come, named by a request numbered after it: counted as
    // received and aborted, "function complete".
    tm.bhs[0] &= !0x40;
    tm.set_u32(16, 9)
        .set_u32(20, 99)
        .set_u32(24, 4)
        .set_u32(32, 3);
    assert_eq!(sent(&s.on_pdu(&tm))[0].bhs[2], 0);
}

#[test]
fn a_data_sequence_error_ends_the_task_with_check_condition() {
    // libiscsi iSCSIdatasn.iSCSIDataSnInvalid: Data-Out numbered 0,0 / 27 / -1 / 1,0. With
    // ErrorRecoveryLevel 0 the task ends with CHECK CONDITION, ABORTED COMMAND, "protocol service CRC
    // error" once its data is in; the connection stays up (no Close) and serves the next command.
    let check = |ev: &[Event]| {
        assert_eq!(ev.len(), 1, "{ev:?}");
        let p = sent(ev)[0];
        assert_eq!(
            (p.opcode(), p.bhs[3]),
            (op::SCSI_RESPONSE, scsi::CHECK_CONDITION)
        );
        assert_eq!(
            (p.data[2 + 2], p.data[2 + 12], p.data[2 + 13]),
            (0x0B, 0x47, 0x05)
        );
    };
    for sns in [[0u32, 0], [1, 0]] {
        let mut s = Session::new(params(), 1, 1);
        let ev = s.on_pdu(&cmd(1, 1, false, true, 1024, &w10(1024), vec![]));
        let t = sent(&ev)[0].u32_at(20);
        assert!(s
            .on_pdu(&data_out_sn(1, t, sns[0], 0, vec![0; 512], false))
            .is_empty());
        check(&s.on_pdu(&data_out_sn(1, t, sns[1], 512, vec![0; 512], true)));
        assert_eq!(s.tasks(), 0);
        let ev = s.on_pdu(&cmd(2, 2, true, false, 512, &[0x28], vec![]));
        assert!(matches!(&ev[..], [Event::Execute { itt: 2, .. }]));
    }
    for sn in [27u32, u32::MAX] {
        let mut s = Session::new(params(), 1, 1);
        let ev = s.on_pdu(&cmd(1, 1, false, true, 512, &w10(512), vec![]));
        let t = sent(&ev)[0].u32_at(20);
        check(&s.on_pdu(&data_out_sn(1, t, sn, 0, vec![0; 512], true)));
    }
}

#[test]
fn an_expected_length_beyond_any_transfer_is_not_taken_on_trust() {
    // One block written with an expected length of 4 GiB - 1: the target asks for the block the CDB moves,
    // not for 4 GiB, and holds no more than that.
    let mut s = Session::new(params(), 1, 1);
    let ev = s.on_pdu(&cmd(3, 1, false, true, u32::MAX, &w10(512), vec![7; 512]));
    match &ev[..] {
        [Event::Execute { data_out, .. }] => assert_eq!(data_out, &vec![7u8; 512]),
        other => panic!("{other:?}"),
    }
    let ev = s.completed(
        3,
        scsi::Reply {
            status: scsi::GOOD,
            sense: None,
            data: Vec::new(),
        },
    );
    // The rest is residual underflow: U bit, count = expected - moved.
    let r = sent(&ev);
    assert_eq!(r[0].bhs[1] & 0x02, 0x02, "underflow bit");
    assert_eq!(r[0].u32_at(44), u32::MAX - 512);
    // A command that moves nothing (or more than any transfer) with such a length is refused outright.
    let ev = s.on_pdu(&cmd(4, 2, false, true, u32::MAX, &[0xC0; 10], Vec::new()));
    assert_eq!(sent(&ev)[0].opcode(), op::REJECT, "{ev:?}");
    let ev = s.on_pdu(&cmd(
        5,
        3,
        false,
        true,
        u32::MAX,
        &w10(u32::MAX),
        Vec::new(),
    ));
    assert_eq!(sent(&ev)[0].opcode(), op::REJECT, "{ev:?}");
}

#[test]
fn run_executes_commands_and_stops_at_close() {
    // No unit (a discovery session): a command gets CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED, and is
    // counted; a logout's response is sent and the session ends there.
    let mut s = Session::new(params(), 1, 1);
    let mut out = Vec::new();
    let ev = s.on_pdu(&cmd(5, 1, true, false, 512, &[0x28], vec![]));
    let ran = s
        .run(ev, None, |p| {
            out.push(p);
            Ok::<(), ()>(())
        })
        .unwrap();
    assert_eq!(
        ran,
        Ran {
            commands: 1,
            open: true,
            dropped: 0,
        }
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].opcode(), op::SCSI_RESPONSE);
    assert_eq!(out[0].bhs[3], scsi::CHECK_CONDITION, "{:?}", out[0]);
    assert_eq!(
        &out[0].data[2..],
        &scsi::Sense::LUN_NOT_SUPPORTED.fixed()[..],
        "sense"
    );
    let mut lo = Pdu::new(op::LOGOUT);
    lo.bhs[0] |= 0x40;
    lo.set_u32(16, 6).set_u32(24, 2);
    let ev = s.on_pdu(&lo);
    out.clear();
    let ran = s
        .run(ev, None, |p| {
            out.push(p);
            Ok::<(), ()>(())
        })
        .unwrap();
    assert_eq!(
        ran,
        Ran {
            commands: 0,
            open: false,
            dropped: 0,
        }
    );
    assert_eq!(
        out.iter().map(|p| p.opcode()).collect::<Vec<_>>(),
        [op::LOGOUT_RESPONSE]
    );
    // An error from `send` stops the run and comes back.
    let ev = s.on_pdu(&cmd(7, 3, true, false, 512, &[0x28], vec![]));
    assert_eq!(s.run(ev, None, |_| Err("socket gone")), Err("socket gone"));
}

/// MaxCmdSN of a PDU the target sent.
fn max_cmd_sn(p: &Pdu) -> u32 {
    p.u32_at(32)
}

/// A write of `len` bytes with no immediate data (InitialR2T=Yes: it then waits for its R2Ts' data).
fn pending_write(itt: u32, sn: u32, len: u32) -> Pdu {
    cmd(itt, sn, false, true, len, &w10(len), vec![])
}

fn immediate(mut p: Pdu) -> Pdu {
    p.bhs[0] |= 0x40;
    p
}

#[test]
fn the_window_closes_while_commands_are_outstanding_and_reopens_as_they_end() {
    let mut s = Session::new(params(), 1, 1).with_window(4);
    // Four writes waiting for their data: each takes a place in the window.
    let mut seen = Vec::new();
    for i in 0..4 {
        let ev = s.on_pdu(&pending_write(100 + i, 1 + i, 8192));
        let r2t = sent(&ev)[0];
        assert_eq!(r2t.opcode(), op::R2T);
        seen.push((r2t.u32_at(28), max_cmd_sn(r2t)));
    }
    // ExpCmdSN runs on, MaxCmdSN stays at 4 (1 + 4 - 1): after the fourth the window is shut
    // (MaxCmdSN = ExpCmdSN - 1).
    assert_eq!(seen, [(2, 4), (3, 4), (4, 4), (5, 4)]);
    assert_eq!(s.tasks(), 4);
    // A fifth command is outside the window: dropped, not buffered, and counted.
    assert!(s.on_pdu(&pending_write(200, 5, 8192)).is_empty());
    assert!(s
        .on_pdu(&cmd(201, 5, true, false, 512, &[0x28], vec![]))
        .is_empty());
    assert_eq!(s.tasks(), 4);
    let ran = s.run(Vec::new(), None, |_| Ok::<(), ()>(())).unwrap();
    assert_eq!(ran.dropped, 2);
    assert_eq!(
        s.run(Vec::new(), None, |_| Ok::<(), ()>(()))
            .unwrap()
            .dropped,
        0,
        "reported once"
    );
    // A CmdSN behind ExpCmdSN (a repeat) is outside too.
    assert!(s.on_pdu(&pending_write(202, 2, 8192)).is_empty());
    // The first write's data arrives: it runs, and its status opens the window by one.
    let t = {
        let c = &s.collecting[&100];
        *c.outstanding.keys().next().unwrap()
    };
    let ev = s.on_pdu(&data_out(100, t, 0, vec![9; 8192], true));
    let Some(Event::Execute {
        itt: 100, data_out, ..
    }) = ev.first()
    else {
        panic!("{ev:?}")
    };
    assert_eq!(data_out, &vec![9; 8192]);
    let ev = s.completed(100, scsi::Reply::good());
    let st = sent(&ev)[0];
    assert_eq!((st.u32_at(28), max_cmd_sn(st)), (5, 5));
    // CmdSN 5 now fits; 6 does not.
    assert_eq!(sent(&s.on_pdu(&pending_write(203, 5, 8192))).len(), 1);
    assert!(s.on_pdu(&pending_write(204, 6, 8192)).is_empty());
    assert_eq!(s.tasks(), 4);
}

#[test]
fn commands_that_end_at_once_keep_the_window_open() {
    let mut s = Session::new(params(), 1, 1).with_window(2);
    let mut out = Vec::new();
    for sn in 1..=20u32 {
        let ev = s.on_pdu(&cmd(sn, sn, true, false, 512, &[0x28], vec![]));
        let ran = s
            .run(ev, None, |p| {
                out.push(p);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!((ran.commands, ran.dropped), (1, 0), "CmdSN {sn}");
    }
    let last = out.last().unwrap();
    assert_eq!((last.u32_at(28), max_cmd_sn(last)), (21, 22));
}

#[test]
fn max_cmd_sn_never_goes_back_and_out_of_order_commands_are_bounded_too() {
    let mut s = Session::new(params(), 1, 1).with_window(4);
    // CmdSNs ahead of ExpCmdSN (an initiator out of order) are taken within the window, but never
    // more than the window holds, whatever CmdSN they repeat.
    let mut last_max = 4;
    for i in 0..10u32 {
        let ev = s.on_pdu(&pending_write(300 + i, 3, 4096));
        for p in sent(&ev) {
            assert!(!serial_after(last_max, max_cmd_sn(p)), "MaxCmdSN went back");
            last_max = max_cmd_sn(p);
        }
    }
    assert_eq!(s.tasks(), 4);
    assert_eq!(last_max, 4, "the window, as first told");
    assert_eq!(
        s.run(Vec::new(), None, |_| Ok::<(), ()>(()))
            .unwrap()
            .dropped,
        6
    );
}

#[test]
fn one_immediate_command_beside_the_window() {
    let mut s = Session::new(params(), 1, 1).with_window(1);
    assert_eq!(sent(&s.on_pdu(&pending_write(1, 1, 4096))).len(), 1);
    // The window is shut; an immediate command still goes (RFC 7143 3.2.2.1), a second is refused.
    let ev = s.on_pdu(&immediate(pending_write(2, 2, 4096)));
    assert_eq!(sent(&ev)[0].opcode(), op::R2T);
    let ev = s.on_pdu(&immediate(pending_write(3, 2, 4096)));
    let p = sent(&ev)[0];
    assert_eq!(
        (p.opcode(), p.bhs[2]),
        (op::REJECT, reject::IMMEDIATE_COMMAND_REJECT)
    );
    assert_eq!(s.tasks(), 2);
    // Once it is aborted, another immediate command is taken.
    let mut tm = Pdu::new(op::TASK_MGMT);
    tm.bhs[0] |= 0x40;
    tm.bhs[1] = 0x80 | 1;
    tm.set_u32(16, 9).set_u32(20, 2).set_u32(24, 2);
    assert_eq!(sent(&s.on_pdu(&tm))[0].bhs[2], 0);
    let ev = s.on_pdu(&immediate(cmd(4, 2, true, false, 512, &[0x28], vec![])));
    assert!(matches!(&ev[..], [Event::Execute { itt: 4, .. }]), "{ev:?}");
}

#[test]
fn a_write_holds_only_what_it_was_allowed_to_send() {
    let mut p = params();
    p.max_burst = 65_536;
    p.max_outstanding_r2t = 1;
    let mut s = Session::new(p, 1, 1);
    // 32 MiB announced, 512 bytes of immediate data: room for those, then for one R2T's burst.
    let len = MAX_DATA_OUT;
    s.on_pdu(&cmd(7, 1, false, true, len, &w10(len), vec![1; 512]));
    let c = &s.collecting[&7];
    assert_eq!((c.buf.len(), c.requested), (512, 512 + 65_536));
    assert!(
        c.buf.capacity() <= c.requested as usize,
        "{} reserved",
        c.buf.capacity()
    );
    // Data out of order within the burst lands where it belongs.
    let t = *c.outstanding.keys().next().unwrap();
    s.on_pdu(&data_out_sn(7, t, 0, 1024, vec![3; 512], false));
    s.on_pdu(&data_out_sn(7, t, 1, 512, vec![2; 512], false));
    let c = &s.collecting[&7];
    assert_eq!(
        &c.buf[..1536],
        &[[1u8; 512], [2; 512], [3; 512]].concat()[..]
    );
}

#[test]
fn writes_wait_for_their_r2ts_while_the_session_holds_enough() {
    let mut p = params();
    p.max_burst = 16 << 20;
    p.max_outstanding_r2t = 2;
    let mut s = Session::new(p, 1, 1);
    let big = MAX_DATA_OUT;
    // Two writes of 32 MiB are asked for all of it...
    for (itt, sn) in [(1, 1), (2, 2)] {
        let ev = s.on_pdu(&pending_write(itt, sn, big));
        assert_eq!(sent(&ev).len(), 2, "two R2Ts of 16 MiB");
    }
    assert_eq!(s.solicited, SOLICITED_MAX);
    // ...a third waits, even a small one.
    assert!(s.on_pdu(&pending_write(3, 3, 8192)).is_empty());
    assert_eq!(s.tasks(), 3);
    // Write 1's data comes: it runs, and write 3 gets its R2T with it.
    let ttts: Vec<u32> = s.collecting[&1].outstanding.keys().copied().collect();
    let mut ev = Vec::new();
    for (i, t) in ttts.iter().enumerate() {
        ev = s.on_pdu(&data_out(
            1,
            *t,
            i as u32 * (16 << 20),
            vec![0; 16 << 20],
            true,
        ));
    }
    assert!(matches!(&ev[0], Event::Execute { itt: 1, .. }), "{ev:?}");
    let r2ts = sent(&ev);
    assert_eq!(
        r2ts.iter()
            .map(|p| (p.opcode(), p.itt(), p.u32_at(44)))
            .collect::<Vec<_>>(),
        [(op::R2T, 3, 8192)]
    );
    // A fourth of 32 MiB gets what still fits (one burst of 16 MiB); aborting write 2 frees room
    // for its second.
    let ev = s.on_pdu(&pending_write(4, 4, big));
    assert_eq!(
        sent(&ev)
            .iter()
            .map(|p| (p.itt(), p.u32_at(40)))
            .collect::<Vec<_>>(),
        [(4, 0)]
    );
    let mut tm = Pdu::new(op::TASK_MGMT);
    tm.bhs[0] |= 0x40;
    tm.bhs[1] = 0x80 | 1;
    tm.set_u32(16, 50).set_u32(20, 2).set_u32(24, 5);
    let ev = s.on_pdu(&tm);
    let pdus = sent(&ev);
    assert_eq!(pdus[0].opcode(), op::TASK_MGMT_RESPONSE);
    assert_eq!(
        pdus[1..]
            .iter()
            .map(|p| (p.opcode(), p.itt(), p.u32_at(40)))
            .collect::<Vec<_>>(),
        [(op::R2T, 4, 16 << 20)]
    );
    assert!(s.solicited <= SOLICITED_MAX);
}

#[test]
fn a_quiet_initiator_is_pinged_then_given_up() {
    let idle = Duration::from_secs(60);
    let answer = Duration::from_secs(15);
    let mut s = Session::new(params(), 10, 1).with_liveness(Some(idle), answer);
    assert_eq!(s.patience(), Some(idle));
    let t0 = Instant::now();
    let Quiet::Ping(ping) = s.quiet(t0) else {
        panic!("a ping")
    };
    assert_eq!(ping.opcode(), op::NOP_IN);
    assert_eq!(ping.itt(), NO_TAG, "unsolicited");
    let ttt = ping.u32_at(20);
    assert_ne!(ttt, NO_TAG, "the initiator must answer");
    assert_eq!(ping.u32_at(24), 10, "StatSN, not advanced");
    assert_eq!(s.patience(), Some(answer));
    assert_eq!(s.quiet(t0 + Duration::from_secs(5)), Quiet::Wait, "early");
    assert_eq!(s.quiet(t0 + answer), Quiet::Dead);

    // Answered: patience is back to the idle time, and a later silence pings again.
    let mut s = Session::new(params(), 10, 1).with_liveness(Some(idle), answer);
    let Quiet::Ping(ping) = s.quiet(t0) else {
        panic!("a ping")
    };
    let mut nop = Pdu::new(op::NOP_OUT);
    nop.bhs[0] |= 0x40;
    nop.set_u32(16, NO_TAG).set_u32(20, ping.u32_at(20));
    assert!(s.on_pdu(&nop).is_empty(), "nothing to say to the answer");
    assert_eq!(s.patience(), Some(idle));
    let Quiet::Ping(again) = s.quiet(t0 + idle) else {
        panic!("pinged again")
    };
    assert_ne!(again.u32_at(20), ping.u32_at(20), "a new tag");
    // Any PDU shows the initiator is there.
    s.on_pdu(&cmd(1, 1, true, false, 512, &[0x28], vec![]));
    assert_eq!(s.patience(), Some(idle));

    // Without liveness: no timer, no ping.
    let mut s = Session::new(params(), 1, 1);
    assert_eq!(s.patience(), None);
    assert_eq!(s.quiet(t0), Quiet::Wait);
}

#[test]
fn room_given_back_does_not_ask_for_data_still_owed_unsolicited() {
    let mut p = params();
    p.initial_r2t = false;
    p.first_burst = 4096;
    p.max_burst = 16 << 20;
    p.max_outstanding_r2t = 2;
    let mut s = Session::new(p, 1, 1);
    let big = MAX_DATA_OUT;
    let w = |itt, sn, len, imm: usize| cmd(itt, sn, false, true, len, &w10(len), vec![5; imm]);
    // Two big writes with their first burst as immediate data take all the room with their R2Ts.
    assert_eq!(sent(&s.on_pdu(&w(1, 1, big, 4096))).len(), 2);
    assert_eq!(sent(&s.on_pdu(&w(2, 2, big, 4096))).len(), 2);
    // A small one is owed its first burst unsolicited: it waits for that, not for room.
    assert!(s.on_pdu(&w(3, 3, 8192, 0)).is_empty());
    // A big one waits for room.
    assert!(s.on_pdu(&w(4, 4, big, 4096)).is_empty());
    // Write 1 aborted: write 4 gets R2Ts, write 3 still none (its unsolicited data is on its way).
    let mut tm = Pdu::new(op::TASK_MGMT);
    tm.bhs[0] |= 0x40;
    tm.bhs[1] = 0x80 | 1;
    tm.set_u32(16, 50).set_u32(20, 1).set_u32(24, 5);
    let ev = s.on_pdu(&tm);
    let r2ts: Vec<u32> = sent(&ev)[1..].iter().map(|p| p.itt()).collect();
    assert_eq!(r2ts, [4, 4]);
    // Write 3's unsolicited data comes: then it asks for the rest.
    let ev = s.on_pdu(&data_out(3, NO_TAG, 0, vec![6; 4096], true));
    let r2t = sent(&ev);
    assert_eq!(
        r2t.iter()
            .map(|p| (p.opcode(), p.itt(), p.u32_at(40), p.u32_at(44)))
            .collect::<Vec<_>>(),
        [(op::R2T, 3, 4096, 4096)]
    );
}
