//! Request checking and replies: out-of-range, oversized, unknown and disallowed requests get the
//! protocol's errors; good ones run against a real overlay.

use super::*;
use crate::disk::{Base, Overlay};
use proptest::prelude::*;
use std::sync::Arc;

fn export(structured: bool, read_only: bool) -> (tempfile::TempDir, Export) {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("b.img");
    std::fs::write(&bp, vec![7u8; 1 << 20]).unwrap();
    let base = Arc::new(Base::open("b", &bp).unwrap());
    let disk: Arc<dyn Disk> = if read_only {
        base
    } else {
        let stem = dir.path().join("0");
        Overlay::create(&stem, &base).unwrap();
        Arc::new(Overlay::open(&stem, base).unwrap())
    };
    let ex = Export {
        name: "x".into(),
        flags: crate::nbd::handshake::transmission_flags(&*disk, structured),
        disk,
        structured,
        base_allocation: structured,
    };
    (dir, ex)
}

fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 9,
        offset,
        len,
    }
}

#[test]
fn refusals() {
    let (_d, ex) = export(false, false);
    let size = 1u64 << 20;
    let cases = [
        (req(CMD_READ, 0, size - 10, 11), EINVAL),
        (req(CMD_READ, 0, u64::MAX, 1), EINVAL),
        (req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), EOVERFLOW),
        (req(CMD_READ, CMD_FLAG_DF, 0, 10), EINVAL), // DF without structured replies
        (req(CMD_WRITE, 0, size, 1), ENOSPC),
        (req(CMD_WRITE_ZEROES, 0, size - 1, 2), ENOSPC),
        (req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096), ENOTSUP),
        (req(CMD_BLOCK_STATUS, 0, 0, 10), EINVAL), // no meta context
        (req(CMD_READ, 1 << 9, 0, 10), EINVAL),    // unknown flag
        (req(42, 0, 0, 0), EINVAL),
    ];
    for (r, errno) in cases {
        assert_eq!(check(&r, &ex).map_err(|e| e.errno), Err(errno), "{r:?}");
    }
    let (_d, ro) = export(false, true);
    assert_eq!(
        check(&req(CMD_WRITE, 0, 0, 1), &ro).map_err(|e| e.errno),
        Err(EPERM)
    );
    assert_eq!(
        check(&req(CMD_TRIM, 0, 0, 1), &ro).map_err(|e| e.errno),
        Err(EPERM)
    );
    assert!(check(&req(CMD_FLUSH, 0, 0, 0), &ro).is_ok());
}

#[test]
fn write_read_and_block_status_replies() {
    let (_d, ex) = export(true, false);
    let mut out = Vec::new();
    let c = check(&req(CMD_WRITE, CMD_FLAG_FUA, 4096, 5), &ex).unwrap();
    execute(c, 1, b"hello", &ex, &mut out);
    // Structured NONE chunk with DONE.
    assert_eq!(be32(&out, 0), Some(STRUCTURED_REPLY_MAGIC));
    assert_eq!(be16(&out, 4), Some(REPLY_FLAG_DONE));
    assert_eq!(be16(&out, 6), Some(REPLY_TYPE_NONE));
    out.clear();
    let c = check(&req(CMD_READ, 0, 4094, 8), &ex).unwrap();
    execute(c, 2, &[], &ex, &mut out);
    assert_eq!(be16(&out, 6), Some(REPLY_TYPE_OFFSET_DATA));
    assert_eq!(be32(&out, 16), Some(16));
    assert_eq!(&out[28..], &[7, 7, b'h', b'e', b'l', b'l', b'o', 7]);
    out.clear();
    let c = check(&req(CMD_BLOCK_STATUS, 0, 0, 1 << 20), &ex).unwrap();
    execute(c, 3, &[], &ex, &mut out);
    assert_eq!(be16(&out, 6), Some(REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(be32(&out, 20), Some(BASE_ALLOCATION_ID));
    let total: u64 = out[24..]
        .chunks(8)
        .map(|d| be32(d, 0).unwrap() as u64)
        .sum();
    assert_eq!(total, 1 << 20, "descriptors cover the range");
}

#[test]
fn simple_read_error_sends_no_data() {
    let (_d, ex) = export(false, false);
    let mut out = Vec::new();
    // Checked, then the disk shrinks under it: the reply is a bare error header.
    let r = req(CMD_READ, 0, 0, 16);
    let c = check(&r, &ex).unwrap();
    let bad = Command::Read {
        offset: 1 << 21,
        len: 16,
    };
    execute(bad, 5, &[], &ex, &mut out);
    assert_eq!(out.len(), 16);
    assert_eq!(be32(&out, 4), Some(EINVAL));
    out.clear();
    execute(c, 6, &[], &ex, &mut out);
    assert_eq!(out.len(), 16 + 16);
}

proptest! {
    /// Any 28 bytes: parsed and checked without a panic, and a good header round-trips.
    #[test]
    fn any_header(bytes in proptest::array::uniform28(any::<u8>()), flags: u16, kind in 0u16..10, offset: u64, len: u32) {
        let (_d, ex) = export(true, false);
        if let Ok(r) = Request::parse(&bytes) {
            let _ = check(&r, &ex);
        }
        let r = req(kind, flags, offset, len);
        prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
        if let Ok(c) = check(&r, &ex) {
            // Whatever passed the check runs without a panic (payload sized as the wire would carry it).
            if r.payload() <= (1 << 20) {
                let mut out = Vec::new();
                execute(c, 1, &vec![0u8; r.payload() as usize], &ex, &mut out);
            }
        }
    }
}
