//! The SCSI core against an in-memory disk.

use super::*;
use crate::disk::{DiskResult, Extent};
use std::sync::Mutex;

struct Mem {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: Mutex<u32>,
    /// Writes asked to reach the medium (FUA).
    fua_writes: Mutex<u32>,
}

impl Mem {
    fn new(blocks: u64, read_only: bool) -> Arc<Mem> {
        Arc::new(Mem {
            bytes: Mutex::new(vec![0; (blocks * BLOCK) as usize]),
            read_only,
            flushes: Mutex::new(0),
            fua_writes: Mutex::new(0),
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
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DiskResult<()> {
        *self.fua_writes.lock().unwrap() += u32::from(fua);
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
    // Zero blocks means "to the last block" (WSNZ=0): blocks 60..64 get the pattern.
    assert_eq!(
        l.execute(&[0x41, 0, 0, 0, 0, 60, 0, 0, 0, 0], &block),
        Reply::good()
    );
    assert_eq!(&m.bytes.lock().unwrap()[63 * 512..], &block[..]);
    // ... and from beyond the end it is out of range.
    assert_eq!(
        l.execute(&[0x41, 0, 0, 0, 0, 65, 0, 0, 0, 0], &block).sense,
        Some(Sense::LBA_OUT_OF_RANGE)
    );
}

#[test]
fn write_same_unmaps_whatever_the_data_and_refuses_anchor() {
    // SBC-4 WRITE SAME: UNMAP=1 deallocates (LBPRZ: zeros) even with a non-zero block (libiscsi
    // WriteSame10.UnmapUntilEnd); ANCHOR is an error with or without UNMAP (WriteSame10.Unmap).
    let (l, m) = lun(64);
    m.bytes.lock().unwrap().fill(0xAA);
    let ones = vec![0xFF; 512];
    assert_eq!(
        l.execute(&[0x41, 0x08, 0, 0, 0, 8, 0, 0, 4, 0], &ones),
        Reply::good()
    );
    let b = m.bytes.lock().unwrap().clone();
    assert!(b[8 * 512..12 * 512].iter().all(|x| *x == 0));
    assert!(b[12 * 512..13 * 512].iter().all(|x| *x == 0xAA));
    for flags in [0x10, 0x18] {
        assert_eq!(
            l.execute(&[0x41, flags, 0, 0, 0, 8, 0, 0, 1, 0], &ones)
                .sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
    }
    // UNMAP with ANCHOR: refused too (ANC_SUP=0).
    assert_eq!(
        l.execute(&[0x42, 0x01, 0, 0, 0, 0, 0, 0, 0, 0], &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    // The Block Limits page says WSNZ=0.
    let vpd = l.execute(&[0x12, 1, 0xB0, 0, 64, 0], &[]).data;
    assert_eq!(vpd[4] & 1, 0);
}

#[test]
fn twelve_byte_reads_writes_and_write_and_verify() {
    let (l, m) = lun(64);
    let w12 = [0xAA, 0, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0];
    assert_eq!(data_out_len(&w12), 1024);
    assert_eq!(l.execute(&w12, &[7; 1024]), Reply::good());
    let r12 = [0xA8, 0, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0];
    assert!(sends_nothing(&r12));
    assert_eq!(l.execute(&r12, &[]).data, vec![7; 1024]);
    // Out of range, and RDPROTECT asked for.
    let r12_end = [0xA8, 0, 0, 0, 0, 63, 0, 0, 0, 2, 0, 0];
    assert_eq!(
        l.execute(&r12_end, &[]).sense,
        Some(Sense::LBA_OUT_OF_RANGE)
    );
    let r12_prot = [0xA8, 0x20, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0];
    assert_eq!(
        l.execute(&r12_prot, &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    // WRITE AND VERIFY (10, 12, 16): written, and through to the medium (a flush).
    let before = *m.fua_writes.lock().unwrap();
    let wv10 = [0x2E, 0x02, 0, 0, 0, 9, 0, 0, 1, 0];
    let wv12 = [0xAE, 0, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0];
    let mut wv16 = [0u8; 16];
    wv16[0] = 0x8E;
    wv16[9] = 11;
    wv16[13] = 1;
    for (cdb, v) in [(&wv10[..], 1u8), (&wv12[..], 2), (&wv16[..], 3)] {
        assert_eq!(data_out_len(cdb), 512);
        assert_eq!(l.execute(cdb, &[v; 512]), Reply::good());
    }
    let b = m.bytes.lock().unwrap().clone();
    assert_eq!((b[9 * 512], b[10 * 512], b[11 * 512]), (1, 2, 3));
    assert_eq!(*m.fua_writes.lock().unwrap(), before + 3);
}

#[test]
fn verify_compares_and_reports_the_first_difference() {
    let (l, m) = lun(64);
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
    m.bytes.lock().unwrap()[4 * 512..8 * 512].copy_from_slice(&pattern);
    // BYTCHK 0: the medium is checked, nothing is sent.
    let v10 = |bytchk: u8, lba: u8, n: u8| [0x2F, bytchk << 1, 0, 0, 0, lba, 0, 0, n, 0];
    assert!(sends_nothing(&v10(0, 4, 4)));
    assert_eq!(l.execute(&v10(0, 4, 4), &[]), Reply::good());
    assert_eq!(
        l.execute(&v10(0, 62, 4), &[]).sense,
        Some(Sense::LBA_OUT_OF_RANGE)
    );
    // BYTCHK 1: the Data-Out against the blocks.
    assert_eq!(data_out_len(&v10(1, 4, 4)), 2048);
    assert_eq!(l.execute(&v10(1, 4, 4), &pattern), Reply::good());
    let mut bad = pattern.clone();
    bad[1300] ^= b'X';
    let r = l.execute(&v10(1, 4, 4), &bad);
    assert_eq!(r.status, CHECK_CONDITION);
    let sense = r.sense.unwrap();
    assert_eq!(
        (sense.key, sense.asc, sense.ascq, sense.info),
        (MISCOMPARE, 0x1D, 0, Some(1300))
    );
    let fixed = sense.fixed();
    assert_eq!((fixed[0], &fixed[3..7]), (0xF0, &1300u32.to_be_bytes()[..]));
    // BYTCHK 3: one block against each block.
    m.bytes.lock().unwrap()[20 * 512..23 * 512].fill(9);
    let v16 = |bytchk: u8, lba: u8, n: u8| {
        let mut c = [0u8; 16];
        c[0] = 0x8F;
        c[1] = bytchk << 1;
        c[9] = lba;
        c[13] = n;
        c
    };
    assert_eq!(data_out_len(&v16(3, 20, 3)), 512);
    assert_eq!(l.execute(&v16(3, 20, 3), &[9; 512]), Reply::good());
    m.bytes.lock().unwrap()[22 * 512 + 5] = 8;
    assert_eq!(
        l.execute(&v16(3, 20, 3), &[9; 512]).sense.map(|s| s.info),
        Some(Some(5))
    );
    // BYTCHK 2 is reserved; VRPROTECT is refused; VERIFY(12) is there too.
    assert_eq!(
        l.execute(&v10(2, 4, 1), &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    assert_eq!(
        l.execute(&[0x2F, 0x20, 0, 0, 0, 4, 0, 0, 1, 0], &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    let v12 = [0xAF, 0x02, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0];
    assert_eq!(l.execute(&v12, &pattern[..512]), Reply::good());
}

#[test]
fn orwrite_ors_and_prefetch_checks_the_range() {
    let (l, m) = lun(64);
    m.bytes.lock().unwrap()[..1024].fill(0x0F);
    let mut ow = [0u8; 16];
    ow[0] = 0x8B;
    ow[13] = 2;
    assert_eq!(data_out_len(&ow), 1024);
    let data: Vec<u8> = (0..1024)
        .map(|i| if i % 2 == 0 { 0xF0 } else { 0x01 })
        .collect();
    assert_eq!(l.execute(&ow, &data), Reply::good());
    let b = m.bytes.lock().unwrap().clone();
    assert_eq!((b[0], b[1], b[1023], b[1024]), (0xFF, 0x0F, 0x0F, 0));
    ow[9] = 63;
    assert_eq!(l.execute(&ow, &data).sense, Some(Sense::LBA_OUT_OF_RANGE));
    let ro = Lun::new(Mem::new(8, true), "ro", 1);
    ow[9] = 0;
    assert_eq!(ro.execute(&ow, &data).sense, Some(Sense::WRITE_PROTECTED));
    // PRE-FETCH(10/16): GOOD within the disk, out of range beyond.
    let pf10 = [0x34, 0x02, 0, 0, 0, 60, 0, 0, 4, 0];
    assert!(sends_nothing(&pf10));
    assert_eq!(l.execute(&pf10, &[]), Reply::good());
    let mut pf16 = [0u8; 16];
    pf16[0] = 0x90;
    pf16[9] = 61;
    pf16[13] = 4;
    assert_eq!(l.execute(&pf16, &[]).sense, Some(Sense::LBA_OUT_OF_RANGE));
}

#[test]
fn report_supported_operation_codes() {
    let (l, _) = lun(64);
    let rsoc = |rctd: bool, options: u8, op: u8, sa: u16| {
        let mut c = vec![
            0xA3,
            0x0C,
            options | if rctd { 0x80 } else { 0 },
            op,
            0,
            0,
            0,
            0,
            0xFF,
            0xFF,
            0,
            0,
        ];
        c[4..6].copy_from_slice(&sa.to_be_bytes());
        c
    };
    // All commands: 8-byte descriptors, SERVACTV only with a service action.
    let all = l.execute(&rsoc(false, 0, 0, 0), &[]).data;
    let len = u32::from_be_bytes(all[..4].try_into().unwrap()) as usize;
    assert_eq!(len, all.len() - 4);
    assert_eq!(len, COMMANDS.len() * 8);
    let descs: Vec<&[u8]> = all[4..].chunks(8).collect();
    assert!(descs
        .iter()
        .any(|d| d[0] == 0x28 && d[5] == 0 && d[7] == 10));
    assert!(descs
        .iter()
        .any(|d| d[0] == 0x9E && d[3] == 0x10 && d[5] == 0x01));
    assert!(descs.iter().all(|d| d[5] & 0x01 != 0 || d[2..4] == [0, 0]));
    // With RCTD: every descriptor carries a 12-byte timeouts descriptor of length 10.
    let all = l.execute(&rsoc(true, 0, 0, 0), &[]).data;
    assert_eq!(all.len() - 4, COMMANDS.len() * 20);
    assert!(all[4..]
        .chunks(20)
        .all(|d| d[5] & 0x02 != 0 && d[8..10] == [0, 10]));
    // One command: supported, with DPO and FUA in its usage data.
    let one = l.execute(&rsoc(false, 1, 0x28, 0), &[]).data;
    assert_eq!((one[1] & 0x07, one[3], one[4]), (3, 10, 0x28));
    assert_eq!(one[5] & 0x18, 0x18);
    let one = l.execute(&rsoc(false, 1, 0x2F, 0), &[]).data;
    assert_eq!(one[5] & 0x10, 0x10, "VERIFY: DPO");
    // Not supported; and a command with service actions asked for without one (and the reverse).
    assert_eq!(l.execute(&rsoc(false, 1, 0xC1, 0), &[]).data[1] & 0x07, 1);
    assert_eq!(
        l.execute(&rsoc(false, 1, 0x9E, 0), &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    assert_eq!(
        l.execute(&rsoc(false, 2, 0x28, 0), &[]).sense,
        Some(Sense::INVALID_FIELD_IN_CDB)
    );
    let by_sa = l.execute(&rsoc(true, 2, 0x9E, 0x10), &[]).data;
    assert_eq!((by_sa[1], by_sa[3], by_sa.len()), (0x83, 16, 4 + 16 + 12));
    // Allocation length respected.
    let mut short = rsoc(false, 0, 0, 0);
    short[6..10].copy_from_slice(&6u32.to_be_bytes());
    assert_eq!(l.execute(&short, &[]).data.len(), 6);
}

#[test]
fn lba_status_describes_a_bounded_span() {
    // A disk bigger than the span: one descriptor covers at most LBA_STATUS_SPAN blocks, so a query
    // from LBA 0 of a large, unwritten disk does not walk all of it.
    let (l, _) = lun(LBA_STATUS_SPAN + 100);
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x12;
    c[13] = 24;
    let d = l.execute(&c, &[]).data;
    assert_eq!(
        u32::from_be_bytes(d[16..20].try_into().unwrap()),
        LBA_STATUS_SPAN as u32
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
