// The iSCSI PDU framer, the text key=value parser and the SCSI core on arbitrary bytes: PDUs are framed
// one after another; each SCSI Command's CDB runs against a 64 KiB in-memory disk with its data segment
// as Data-Out. Nothing may panic, and framing must always make progress or stop.
#![no_main]

mod common;

use corral::iscsi::pdu::{frame, op, parse_text, Frame};
use corral::iscsi::scsi::Lun;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};

fuzz_target!(|data: &[u8]| {
    let lun = Lun::new(Arc::new(common::Mem(Mutex::new(vec![0; 1 << 16]), false)), "fuzz", 1);
    let mut rest = data;
    while let Ok(Frame::Pdu(p, used)) = frame(rest, 8192) {
        assert!(used >= 48 && used <= rest.len());
        match p.opcode() {
            op::SCSI_COMMAND => {
                let _ = lun.execute(&p.cdb(), &p.data);
            }
            op::LOGIN | op::TEXT => {
                let _ = parse_text(&p.data);
            }
            _ => {}
        }
        let _ = p.encode();
        rest = &rest[used..];
    }
});
