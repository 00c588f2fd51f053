//! The SCSI block device an iSCSI target exposes for a slot disk (SPC-4 / SBC-3 subset): a command
//! descriptor block (and, for writes, the data the initiator sent) in, status with sense data or data to
//! return out. No sockets and no PDUs here: the iSCSI session carries the bytes.
//!
//! Supported: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard; VPD 00, 80, 83, B0, B1, B2), READ
//! CAPACITY(10/16), GET LBA STATUS, READ and WRITE (6/10/16, FUA), SYNCHRONIZE CACHE(10/16), REPORT LUNS, MODE SENSE(6/10)
//! (caching and control pages), UNMAP, WRITE SAME(10/16) (with and without UNMAP), START STOP UNIT and
//! PREVENT ALLOW MEDIUM REMOVAL (accepted, nothing to do). Anything else: CHECK CONDITION, ILLEGAL REQUEST,
//! INVALID COMMAND OPERATION CODE.

use std::sync::Arc;

use crate::disk::{Disk, DiskError};

/// Logical block size: 512 bytes, what firmware (INT13) and every initiator expects of a plain disk.
pub const BLOCK: u64 = 512;
/// Most blocks one READ or WRITE may move (32 MiB), reported in the Block Limits page.
pub const MAX_TRANSFER_BLOCKS: u32 = 65_536;
/// Most blocks one UNMAP descriptor or WRITE SAME may cover.
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Most descriptors in one UNMAP parameter list.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// SCSI status codes.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys.
pub const NO_SENSE: u8 = 0x0;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const DATA_PROTECT: u8 = 0x7;
pub const ABORTED_COMMAND: u8 = 0xB;

/// Why a command did not complete: sense key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const INVALID_OPCODE: Sense = Sense::new(ILLEGAL_REQUEST, 0x20, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(ILLEGAL_REQUEST, 0x24, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(ILLEGAL_REQUEST, 0x1A, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(ILLEGAL_REQUEST, 0x21, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(ILLEGAL_REQUEST, 0x25, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(DATA_PROTECT, 0x27, 0x00);
    pub const READ_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x0C, 0x00);

    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70; // current error, fixed format
        s[2] = self.key & 0x0F;
        s[7] = 10; // additional sense length
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

/// How a command ended: its status, sense data for CHECK CONDITION, and the data to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data: Vec<u8>,
}

impl Reply {
    pub fn good() -> Reply {
        Reply {
            status: GOOD,
            sense: None,
            data: Vec::new(),
        }
    }

    pub fn data(data: Vec<u8>) -> Reply {
        Reply {
            status: GOOD,
            sense: None,
            data,
        }
    }

    pub fn check(sense: Sense) -> Reply {
        Reply {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data: Vec::new(),
        }
    }
}

/// One logical unit: a disk with its identity.
pub struct Lun {
    pub disk: Arc<dyn Disk>,
    /// Unit serial number (VPD 80), also the vendor-specific part of the identifiers.
    pub serial: String,
    /// A 64-bit NAA identifier (VPD 83), unique per slot and stable across restarts.
    pub naa: u64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]))
}

/// A block range a command names: (first LBA, blocks).
fn rw_range(cdb: &[u8]) -> Option<(u64, u32)> {
    Some(match cdb.first()? {
        // 6-byte: 21-bit LBA; a length of 0 means 256 blocks.
        0x08 | 0x0A if cdb.len() >= 6 => {
            let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1F, cdb[2], cdb[3]]));
            let n = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            (lba, n)
        }
        0x28 | 0x2A | 0x41 if cdb.len() >= 10 => {
            (u64::from(be32(&cdb[2..])), u32::from(be16(&cdb[7..])))
        }
        0x88 | 0x8A | 0x93 if cdb.len() >= 16 => (be64(&cdb[2..]), be32(&cdb[10..])),
        _ => return None,
    })
}

/// Whether the command is one this core knows to carry no Data-Out.
pub fn sends_nothing(cdb: &[u8]) -> bool {
    matches!(
        cdb.first(),
        Some(
            0x00 | 0x03
                | 0x08
                | 0x12
                | 0x1A
                | 0x1B
                | 0x1E
                | 0x25
                | 0x28
                | 0x35
                | 0x5A
                | 0x88
                | 0x91
                | 0x9E
                | 0xA0
        )
    )
}

/// How many bytes of Data-Out a command carries (what the initiator will send), from its CDB.
pub fn data_out_len(cdb: &[u8]) -> u32 {
    match cdb.first() {
        Some(0x0A | 0x2A | 0x8A) => rw_range(cdb)
            .map(|(_, n)| n.saturating_mul(BLOCK as u32))
            .unwrap_or(0),
        // WRITE SAME: one block, unless NDOB (16 only) says none.
        Some(0x41) => BLOCK as u32,
        Some(0x93) if cdb.len() >= 2 && cdb[1] & 0x01 != 0 => 0,
        Some(0x93) => BLOCK as u32,
        Some(0x42) if cdb.len() >= 9 => u32::from(be16(&cdb[7..])),
        _ => 0,
    }
}

/// The block range of a READ, WRITE or WRITE SAME, refusing a malformed CDB or one that asks for
/// protection information.
fn block_range(cdb: &[u8]) -> Result<(u64, u32), Sense> {
    match rw_range(cdb) {
        Some(r) if !protect_field(cdb) => Ok(r),
        _ => Err(Sense::INVALID_FIELD_IN_CDB),
    }
}

/// RDPROTECT/WRPROTECT (byte 1, bits 5-7) set: protection information was asked for, and this disk
/// has none (INQUIRY says PROTECT=0).
fn protect_field(cdb: &[u8]) -> bool {
    cdb[0] != 0x08 && cdb[0] != 0x0A && cdb.get(1).is_some_and(|b| b & 0xE0 != 0)
}

/// Fills `s` into a space-padded ASCII field of `n` bytes.
fn ascii(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// At most `alloc` bytes of `data` (the initiator's allocation length).
fn clip(mut data: Vec<u8>, alloc: usize) -> Vec<u8> {
    data.truncate(alloc);
    data
}

impl Lun {
    pub fn new(disk: Arc<dyn Disk>, serial: &str, naa: u64) -> Lun {
        Lun {
            disk,
            serial: serial.to_string(),
            naa,
        }
    }

    fn blocks(&self) -> u64 {
        self.disk.size() / BLOCK
    }

    /// Carries out one command; `data_out` is what the initiator sent with it (writes, parameter lists).
    pub fn execute(&self, cdb: &[u8], data_out: &[u8]) -> Reply {
        let Some(&op) = cdb.first() else {
            return Reply::check(Sense::INVALID_OPCODE);
        };
        match op {
            0x00 | 0x1B | 0x1E => Reply::good(),
            0x03 if cdb.len() >= 6 => Reply::data(clip(
                Sense::new(NO_SENSE, 0, 0).fixed().to_vec(),
                cdb[4].into(),
            )),
            0x12 if cdb.len() >= 6 => self.inquiry(cdb),
            0x25 if cdb.len() >= 10 => {
                let last = self.blocks().saturating_sub(1);
                let mut d = Vec::with_capacity(8);
                d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                Reply::data(d)
            }
            // SERVICE ACTION IN(16): READ CAPACITY(16).
            0x9E if cdb.len() >= 16 && cdb[1] & 0x1F == 0x10 => {
                let mut d = vec![0u8; 32];
                d[..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
                // Thin provisioning (UNMAP works) and unmapped blocks read as zeros.
                d[14] = 0x80 | 0x40;
                Reply::data(clip(d, be32(&cdb[10..]) as usize))
            }
            // SERVICE ACTION IN(16): GET LBA STATUS.
            0x9E if cdb.len() >= 16 && cdb[1] & 0x1F == 0x12 => self.lba_status(cdb),
            0x08 | 0x28 | 0x88 => self.read(cdb),
            0x0A | 0x2A | 0x8A => self.write(cdb, data_out),
            0x35 | 0x91 => match self.disk.flush() {
                Ok(()) => Reply::good(),
                Err(_) => Reply::check(Sense::WRITE_ERROR),
            },
            0xA0 if cdb.len() >= 12 => {
                // One LUN: 0.
                let mut d = vec![0u8; 16];
                d[3] = 8;
                Reply::data(clip(d, be32(&cdb[6..]) as usize))
            }
            0x1A if cdb.len() >= 6 => self.mode_sense(cdb, false),
            0x5A if cdb.len() >= 10 => self.mode_sense(cdb, true),
            0x42 if cdb.len() >= 10 => self.unmap(cdb, data_out),
            0x41 if cdb.len() >= 10 => self.write_same(cdb, data_out),
            0x93 if cdb.len() >= 16 => self.write_same(cdb, data_out),
            _ => Reply::check(Sense::INVALID_OPCODE),
        }
    }

    fn inquiry(&self, cdb: &[u8]) -> Reply {
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        let alloc = be16(&cdb[3..]) as usize;
        if !evpd {
            if page != 0 {
                return Reply::check(Sense::INVALID_FIELD_IN_CDB);
            }
            let mut d = vec![0u8; 8];
            d[0] = 0x00; // direct-access block device, connected
            d[2] = 0x06; // SPC-4
            d[3] = 0x02 | 0x10; // response data format 2, HiSup
            d[7] = 0x02; // CmdQue
            d.extend(ascii("CORRAL", 8));
            d.extend(ascii("slot disk", 16));
            d.extend(ascii("0001", 4));
            // Bytes 36..58: vendor specific and reserved; then version descriptors: SAM-5, iSCSI, SPC-4,
            // SBC-3.
            d.resize(58, 0);
            for v in [0x00A0u16, 0x0960, 0x0460, 0x04C0] {
                d.extend_from_slice(&v.to_be_bytes());
            }
            d.resize(74, 0);
            d[4] = (d.len() - 5) as u8;
            return Reply::data(clip(d, alloc));
        }
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2],
            0x80 => ascii(&self.serial, self.serial.len().max(1)),
            0x83 => {
                let mut v = Vec::new();
                // NAA designator: binary, LU association, 8 bytes.
                v.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
                v.extend_from_slice(&self.naa.to_be_bytes());
                // T10 vendor ID designator: ASCII, "CORRAL  " + serial.
                let id: Vec<u8> = ascii("CORRAL", 8)
                    .into_iter()
                    .chain(self.serial.bytes())
                    .collect();
                v.extend_from_slice(&[0x02, 0x01, 0x00, id.len() as u8]);
                v.extend(id);
                v
            }
            0xB0 => {
                let mut v = vec![0u8; 60];
                v[0] = 0x01; // WSNZ: a WRITE SAME of 0 blocks ("to the end") is refused
                v[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes()); // maximum transfer length
                v[8..12].copy_from_slice(&128u32.to_be_bytes()); // optimal transfer length (64 KiB)
                v[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes()); // max unmap LBA count
                v[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                v[24..28].copy_from_slice(&1u32.to_be_bytes()); // unmap granularity: 1 block
                v[32..40].copy_from_slice(&u64::from(MAX_UNMAP_BLOCKS).to_be_bytes()); // max write same
                v
            }
            0xB1 => {
                let mut v = vec![0u8; 60];
                v[1] = 0x01; // non-rotating medium
                v
            }
            0xB2 => {
                // Threshold exponent 0; LBPU (UNMAP), LBPWS (WRITE SAME 16 with UNMAP), LBPWS10, LBPRZ;
                // provisioning type: thin.
                vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
            }
            _ => return Reply::check(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend(body);
        Reply::data(clip(d, alloc))
    }

    /// Checks a block range against the disk; returns the byte offset and length.
    fn range(&self, lba: u64, blocks: u32) -> Result<(u64, u64), Sense> {
        let end = lba
            .checked_add(u64::from(blocks))
            .ok_or(Sense::LBA_OUT_OF_RANGE)?;
        if end > self.blocks() {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        Ok((lba * BLOCK, u64::from(blocks) * BLOCK))
    }

    /// GET LBA STATUS: one descriptor from the starting LBA: mapped, or deallocated where the disk
    /// holds nothing of its own there (reads as zeros).
    fn lba_status(&self, cdb: &[u8]) -> Reply {
        let lba = be64(&cdb[2..]);
        let alloc = be32(&cdb[10..]) as usize;
        if lba >= self.blocks() {
            return Reply::check(Sense::LBA_OUT_OF_RANGE);
        }
        let rest = (self.blocks() - lba).min(u64::from(u32::MAX));
        let extents = match self.disk.extents(lba * BLOCK, rest * BLOCK) {
            Ok(e) => e,
            Err(_) => return Reply::check(Sense::READ_ERROR),
        };
        let Some(first) = extents.first() else {
            return Reply::check(Sense::READ_ERROR);
        };
        // Whole blocks only; a run shorter than a block counts as one block of its kind.
        let blocks = (first.len / BLOCK).max(1).min(rest) as u32;
        let deallocated = first.hole || first.zero;
        let mut d = vec![0u8; 24];
        d[..4].copy_from_slice(&20u32.to_be_bytes()); // parameter data length (n - 3)
        d[8..16].copy_from_slice(&lba.to_be_bytes());
        d[16..20].copy_from_slice(&blocks.to_be_bytes());
        d[20] = u8::from(deallocated);
        Reply::data(clip(d, alloc))
    }

    fn read(&self, cdb: &[u8]) -> Reply {
        let (lba, n) = match block_range(cdb) {
            Ok(r) => r,
            Err(sense) => return Reply::check(sense),
        };
        if n > MAX_TRANSFER_BLOCKS {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let (off, len) = match self.range(lba, n) {
            Ok(r) => r,
            Err(s) => return Reply::check(s),
        };
        let mut buf = vec![0u8; len as usize];
        match self.disk.read(off, &mut buf) {
            Ok(()) => Reply::data(buf),
            Err(DiskError::Range) => Reply::check(Sense::LBA_OUT_OF_RANGE),
            Err(_) => Reply::check(Sense::READ_ERROR),
        }
    }

    fn write(&self, cdb: &[u8], data: &[u8]) -> Reply {
        let (lba, n) = match block_range(cdb) {
            Ok(r) => r,
            Err(sense) => return Reply::check(sense),
        };
        if self.disk.read_only() {
            return Reply::check(Sense::WRITE_PROTECTED);
        }
        if n > MAX_TRANSFER_BLOCKS {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let (off, len) = match self.range(lba, n) {
            Ok(r) => r,
            Err(s) => return Reply::check(s),
        };
        // The initiator's expected length may differ from what the CDB moves; the session reports the
        // residual. With less data than the CDB names, the whole blocks that came are written (what the
        // initiator allowed) and the rest is the overflow.
        let usable = (data.len() as u64).min(len) / BLOCK * BLOCK;
        let data = &data[..usable as usize];
        if data.is_empty() {
            return Reply::good();
        }
        // FUA: byte 1 bit 3 (not in the 6-byte form).
        let fua = cdb[0] != 0x0A && cdb[1] & 0x08 != 0;
        match self.disk.write(off, data, fua) {
            Ok(()) => Reply::good(),
            Err(DiskError::ReadOnly) => Reply::check(Sense::WRITE_PROTECTED),
            Err(DiskError::Range) => Reply::check(Sense::LBA_OUT_OF_RANGE),
            Err(_) => Reply::check(Sense::WRITE_ERROR),
        }
    }

    fn mode_sense(&self, cdb: &[u8], ten: bool) -> Reply {
        let dbd = cdb[1] & 0x08 != 0;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3F;
        let subpage = cdb[3];
        let alloc = if ten {
            be16(&cdb[7..]) as usize
        } else {
            cdb[4] as usize
        };
        if subpage != 0 && subpage != 0xFF {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
        // Changeable values (pc 1): nothing can be changed.
        let changeable = pc == 1;
        let caching = || {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 18;
            if !changeable {
                p[2] = 0x04; // WCE: writes are cached until SYNCHRONIZE CACHE (or FUA)
            }
            p
        };
        let control = || {
            let mut p = vec![0u8; 12];
            p[0] = 0x0A;
            p[1] = 10;
            if !changeable {
                p[2] = 0x02; // GLTSD
                p[8] = 0xFF; // busy timeout period: unlimited
                p[9] = 0xFF;
            }
            p
        };
        let pages: Vec<u8> = match page {
            0x08 => caching(),
            0x0A => control(),
            0x3F => [caching(), control()].concat(),
            _ => return Reply::check(Sense::INVALID_FIELD_IN_CDB),
        };
        let block_desc: Vec<u8> = if dbd {
            Vec::new()
        } else {
            let mut b = vec![0u8; 8];
            let blocks = u32::try_from(self.blocks()).unwrap_or(u32::MAX);
            b[..4].copy_from_slice(&blocks.to_be_bytes());
            b[5..8].copy_from_slice(&(BLOCK as u32).to_be_bytes()[1..]);
            b
        };
        // Device-specific parameter: WP when read-only; DPOFUA (FUA is honoured, DPO is a hint).
        let wp = if self.disk.read_only() { 0x80 } else { 0x00 } | 0x10;
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[3] = wp;
            h[6..8].copy_from_slice(&(block_desc.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, wp, block_desc.len() as u8]
        };
        d.extend(block_desc);
        d.extend(pages);
        if ten {
            let len = (d.len() - 2) as u16;
            d[..2].copy_from_slice(&len.to_be_bytes());
        } else {
            d[0] = (d.len() - 1) as u8;
        }
        Reply::data(clip(d, alloc))
    }

    fn unmap(&self, cdb: &[u8], data: &[u8]) -> Reply {
        if self.disk.read_only() {
            return Reply::check(Sense::WRITE_PROTECTED);
        }
        let param_len = be16(&cdb[7..]) as usize;
        if param_len == 0 {
            return Reply::good();
        }
        if param_len < 8 || data.len() < param_len {
            return Reply::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let desc_len = be16(&data[2..]) as usize;
        if desc_len % 16 != 0 || 8 + desc_len > param_len {
            return Reply::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if desc_len / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return Reply::check(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        // Check every descriptor before touching the disk: all or nothing.
        let mut ranges = Vec::new();
        for d in data[8..8 + desc_len].chunks_exact(16) {
            let (lba, n) = (be64(d), be32(&d[8..]));
            if n > MAX_UNMAP_BLOCKS {
                return Reply::check(Sense::INVALID_FIELD_IN_PARAMETERS);
            }
            match self.range(lba, n) {
                Ok(r) => ranges.push(r),
                Err(s) => return Reply::check(s),
            }
        }
        for (off, len) in ranges {
            if len > 0 && self.disk.write_zeroes(off, len, false).is_err() {
                return Reply::check(Sense::WRITE_ERROR);
            }
        }
        Reply::good()
    }

    fn write_same(&self, cdb: &[u8], data: &[u8]) -> Reply {
        let (lba, n) = match block_range(cdb) {
            Ok(r) => r,
            Err(sense) => return Reply::check(sense),
        };
        if self.disk.read_only() {
            return Reply::check(Sense::WRITE_PROTECTED);
        }
        let unmap = cdb[1] & 0x08 != 0;
        let ndob = cdb[0] == 0x93 && cdb[1] & 0x01 != 0;
        // A length of 0 would mean "to the end of the medium"; the Block Limits page says we do not.
        if n == 0 || n > MAX_UNMAP_BLOCKS {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let (off, len) = match self.range(lba, n) {
            Ok(r) => r,
            Err(s) => return Reply::check(s),
        };
        let block: &[u8] = if ndob { &[] } else { data };
        if !ndob && block.len() != BLOCK as usize {
            return Reply::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let zero = ndob || block.iter().all(|b| *b == 0);
        let result = if zero || unmap {
            if !zero {
                // UNMAP of non-zero data cannot be honoured by discarding: write it out instead.
                self.fill(off, len, block)
            } else {
                self.disk.write_zeroes(off, len, false)
            }
        } else {
            self.fill(off, len, block)
        };
        match result {
            Ok(()) => Reply::good(),
            Err(_) => Reply::check(Sense::WRITE_ERROR),
        }
    }

    /// Writes `block` repeatedly over `off..off+len`, a megabyte at a time.
    fn fill(&self, off: u64, len: u64, block: &[u8]) -> Result<(), DiskError> {
        let chunk: Vec<u8> = block.iter().copied().cycle().take(1 << 20).collect();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.disk.write(off + done, &chunk[..n], false)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
