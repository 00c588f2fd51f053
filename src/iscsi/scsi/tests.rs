//! The SCSI core against an in-memory disk.

use super::*;
use crate::disk::{DiskResult, Extent};
use std::sync::Mutex;

struct Mem {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: Mutex<u32>,
}

impl Mem {
    fn new(blocks: u64, read_only: bool) -> Arc<Mem> {
        Arc::new(Mem {
            bytes: Mutex::new(vec![0; (blocks * BLOCK) as usize]),
            read_only,
            flushes: Mutex::new(0),
        })
    }
}

impl Disk for Mem {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DiskResult<()> {
        crate::disk::check_range(self.size(), offset, buf.len() as u64)?;
        let b = self.bytes.lock().unwrap();
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _: bool) -> DiskResult<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        crate::disk::check_range(self.size(), offset, data.len() as u64)?;
        let mut b = self.bytes.lock().unwrap();
        b[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> DiskResult<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> DiskResult<()> {
        crate::disk::check_range(self.size(), offset, len)?;
        let mut b = self.bytes.lock().unwrap();
        b[offset as usize..(offset + len) as usize].fill(0);
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

fn lun(blocks: u64) -> (Lun, Arc<Mem>) {
    let m = Mem::new(blocks, false);
    (Lun::new(m.clone(), "web-0", 0x6001_4052_0000_0001), m)
}

fn read10(lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn write16(lba: u64, n: u32, fua: bool) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x8A;
    c[1] = if fua { 0x08 } else { 0 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

#[test]
fn reads_and_writes_round_trip_and_stay_in_range() {
    let (l, _) = lun(1024);
    let data: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 251) as u8).collect();
    let cdb = write16(10, 2, true);
    assert_eq!(data_out_len(&cdb), 1024);
    assert_eq!(l.execute(&cdb, &data), Reply::good());
    let r = l.execute(&read10(10, 2), &[]);
    assert_eq!((r.status, r.data.len()), (GOOD, 1024));
    assert_eq!(r.data, data);
    // READ(6) with length 0 means 256 blocks.
    let r = l.execute(&[0x08, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data.len(), 256 * 512);
    // The last block reads; one past it does not, nor an LBA that wraps.
    assert_eq!(l.execute(&read10(1023, 1), &[]).status, GOOD);
    assert_eq!(
        l.execute(&read10(1023, 2), &[]).sense,
        Some(Sense::LBA_OUT_OF_RANGE)
    );
    assert_eq!(
        l.execute(&write16(u64::MAX, 2, false), &[0; 1024]).sense,
        Some(Sense::LBA_OUT_OF_RANGE)
    );
    // A write given less data than its length writes the whole blocks it got (the initiator's expected
    // length was shorter; the session reports the overflow).
    assert_eq!(l.execute(&write16(100, 2, false), &[9; 700]), Reply::good());
    let r = l.execute(&read10(100, 2), &[]);
    assert!(r.data[..512].iter().all(|b| *b == 9) && r.data[512..].iter().all(|b| *b == 0));
}

#[test]
fn capacity_inquiry_and_vpd() {
    let (l, _) = lun(2048);
    let r = l.execute(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data, [0, 0, 0x07, 0xFF, 0, 0, 2, 0]);
    let mut rc16 = vec![0u8; 16];
    rc16[0] = 0x9E;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let r = l.execute(&rc16, &[]);
    assert_eq!(r.data.len(), 32);
    assert_eq!(u64::from_be_bytes(r.data[..8].try_into().unwrap()), 2047);
    assert_eq!(r.data[14] & 0xC0, 0xC0, "LBPME and LBPRZ");
    // Standard INQUIRY: a disk, SPC-4, vendor and product padded.
    let r = l.execute(&[0x12, 0, 0, 0, 96, 0], &[]);
    assert_eq!(r.data[0], 0);
    assert_eq!(r.data[2], 6);
    assert_eq!(r.data[4] as usize + 5, r.data.len());
    assert_eq!(&r.data[8..16], b"CORRAL  ");
    assert_eq!(r.data.len(), 74);
    assert_eq!(
        &r.data[58..66],
        &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]
    );
    // Allocation length clips.
    assert_eq!(l.execute(&[0x12, 0, 0, 0, 5, 0], &[]).data.len(), 5);
    // A page without EVPD is an invalid field.
    assert_eq!(
        l.execute(&[0x12, 0, 0x80, 0, 96, 0], &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    let vpd = |p: u8| l.execute(&[0x12, 1, p, 1, 0, 0], &[]);
    assert_eq!(vpd(0x00).data[4..], [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    assert_eq!(&vpd(0x80).data[4..], b"web-0");
    let id = vpd(0x83).data;
    assert_eq!(id[1], 0x83);
    assert_eq!(&id[4..8], &[0x01, 0x03, 0x00, 0x08]);
    assert_eq!(
        u64::from_be_bytes(id[8..16].try_into().unwrap()),
        0x6001_4052_0000_0001
    );
    let bl = vpd(0xB0).data;
    assert_eq!(be32(&bl[8..]), MAX_TRANSFER_BLOCKS);
    assert_eq!(be32(&bl[24..]), MAX_UNMAP_DESCRIPTORS);
    assert_eq!(vpd(0xB1).data[5], 1, "non-rotating");
    assert_eq!(
        vpd(0xB2).data[5] & 0xE4,
        0xE4,
        "LBPU, LBPWS, LBPWS10, LBPRZ"
    );
    assert_eq!(vpd(0x99).sense, Some(Sense::INVALID_FIELD_IN_CDB));
}

#[test]
fn lba_status_follows_the_disk_extents() {
    let (l, _) = lun(64);
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x12;
    c[9] = 8; // LBA 8
    c[13] = 24;
    let r = l.execute(&c, &[]);
    assert_eq!(r.data.len(), 24);
    assert_eq!(be32(&r.data), 20);
    assert_eq!(be64(&r.data[8..]), 8);
    assert_eq!(
        be32(&r.data[16..]),
        56,
        "the in-memory disk is one mapped extent"
    );
    assert_eq!(r.data[20], 0);
    c[9] = 64;
    assert_eq!(l.execute(&c, &[]).sense, Some(Sense::LBA_OUT_OF_RANGE));
}

#[test]
fn unknown_commands_get_invalid_opcode_sense() {
    let (l, _) = lun(8);
    let r = l.execute(&[0xC7, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        (r.status, r.sense),
        (CHECK_CONDITION, Some(Sense::INVALID_OPCODE))
    );
    let s = Sense::INVALID_OPCODE.fixed();
    assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 5, 10, 0x20, 0));
    assert_eq!(l.execute(&[], &[]).sense, Some(Sense::INVALID_OPCODE));
    // Truncated CDBs are refused, never read past.
    assert_eq!(l.execute(&[0x28, 0], &[]).status, CHECK_CONDITION);
    assert_eq!(l.execute(&[0x9E, 0x10], &[]).status, CHECK_CONDITION);
}

#[test]
fn sync_cache_report_luns_mode_sense() {
    let (l, m) = lun(64);
    assert_eq!(
        l.execute(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
        Reply::good()
    );
    assert_eq!(*m.flushes.lock().unwrap(), 1);
    let r = l.execute(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[]);
    assert_eq!(r.data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // MODE SENSE(6), caching page, with the block descriptor.
    let r = l.execute(&[0x1A, 0, 0x08, 0, 255, 0], &[]);
    assert_eq!(r.data[0] as usize + 1, r.data.len());
    assert_eq!(r.data[3], 8, "block descriptor length");
    assert_eq!(&r.data[12..14], &[0x08, 18]);
    assert_eq!(r.data[14] & 0x04, 0x04, "WCE");
    assert_eq!(r.data[2] & 0x10, 0x10, "DPOFUA");
    // MODE SENSE(10), all pages, no block descriptors.
    let r = l.execute(&[0x5A, 0x08, 0x3F, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(be16(&r.data) as usize + 2, r.data.len());
    assert_eq!(be16(&r.data[6..]), 0);
    assert_eq!(r.data[8], 0x08);
    assert_eq!(r.data[28], 0x0A);
    assert_eq!(
        l.execute(&[0x1A, 0, 0x19, 0, 255, 0], &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    // Read-only disks say so and refuse writes.
    let ro = Lun::new(Mem::new(8, true), "b", 1);
    assert_eq!(
        ro.execute(&[0x1A, 0, 0x3F, 0, 255, 0], &[]).data[2] & 0x80,
        0x80
    );
    assert_eq!(
        ro.execute(&write16(0, 1, false), &[0; 512]).sense,
        Some(Sense::WRITE_PROTECTED)
    );
}

#[test]
fn unmap_and_write_same() {
    let (l, m) = lun(64);
    m.bytes.lock().unwrap().fill(0xAA);
    // UNMAP blocks 2..4 and 10.
    let mut p = vec![0u8; 8 + 32];
    p[0..2].copy_from_slice(&38u16.to_be_bytes());
    p[2..4].copy_from_slice(&32u16.to_be_bytes());
    p[8..16].copy_from_slice(&2u64.to_be_bytes());
    p[16..20].copy_from_slice(&2u32.to_be_bytes());
    p[24..32].copy_from_slice(&10u64.to_be_bytes());
    p[32..36].copy_from_slice(&1u32.to_be_bytes());
    let cdb = [0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0];
    assert_eq!(data_out_len(&cdb), 40);
    assert_eq!(l.execute(&cdb, &p), Reply::good());
    let b = m.bytes.lock().unwrap().clone();
    assert!(b[2 * 512..4 * 512].iter().all(|x| *x == 0));
    assert!(b[10 * 512..11 * 512].iter().all(|x| *x == 0));
    assert!(b[4 * 512..10 * 512].iter().all(|x| *x == 0xAA));
    // A descriptor out of range: nothing is unmapped.
    p[24..32].copy_from_slice(&64u64.to_be_bytes());
    m.bytes.lock().unwrap().fill(0xAA);
    assert_eq!(l.execute(&cdb, &p).sense, Some(Sense::LBA_OUT_OF_RANGE));
    assert!(m.bytes.lock().unwrap().iter().all(|x| *x == 0xAA));
    // Bad lengths.
    assert_eq!(
        l.execute(&[0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0], &p[..4]).sense,
        Some(Sense::PARAMETER_LIST_LENGTH_ERROR)
    );
    // WRITE SAME(10) of a pattern over 3 blocks, then WRITE SAME(16) with UNMAP of zeros.
    let block: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let ws10 = [0x41, 0, 0, 0, 0, 20, 0, 0, 3, 0];
    assert_eq!(data_out_len(&ws10), 512);
    assert_eq!(l.execute(&ws10, &block), Reply::good());
    let b = m.bytes.lock().unwrap().clone();
    for k in 20..23 {
        assert_eq!(&b[k * 512..(k + 1) * 512], &block[..]);
    }
    let mut ws16 = vec![0u8; 16];
    ws16[0] = 0x93;
    ws16[1] = 0x08;
    ws16[9] = 20;
    ws16[13] = 3;
    assert_eq!(l.execute(&ws16, &[0; 512]), Reply::good());
    assert!(m.bytes.lock().unwrap()[20 * 512..23 * 512]
        .iter()
        .all(|x| *x == 0));
    // Zero blocks is refused (WSNZ).
    assert_eq!(
        l.execute(&[0x41, 0, 0, 0, 0, 20, 0, 0, 0, 0], &block).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
}

proptest::proptest! {
    /// Any CDB with any data: a reply, never a panic, never a read or write outside the disk.
    #[test]
    fn arbitrary_commands_never_panic(
        cdb in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
    ) {
        let (l, _) = lun(16);
        let r = l.execute(&cdb, &data);
        proptest::prop_assert!(r.status == GOOD || r.sense.is_some());
    }
}
