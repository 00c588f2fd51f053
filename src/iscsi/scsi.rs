//! The SCSI block device an iSCSI target exposes for a slot disk (SPC-4 / SBC-3 subset): a command
//! descriptor block (and, for writes, the data the initiator sent) in, status with sense data or data to
//! return out. No sockets and no PDUs here: the iSCSI session carries the bytes.
//!
//! Supported: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard; VPD 00, 80, 83, B0, B1, B2), READ
//! CAPACITY(10/16), GET LBA STATUS, READ and WRITE (6/10/12/16, FUA), WRITE AND VERIFY(10/12/16),
//! VERIFY(10/12/16) (BYTCHK 0, 1 and 3: MISCOMPARE at the first differing byte), ORWRITE(16),
//! PRE-FETCH(10/16), SYNCHRONIZE CACHE(10/16), REPORT LUNS, REPORT SUPPORTED OPERATION CODES, MODE
//! SENSE(6/10) (caching and control pages), UNMAP, WRITE SAME(10/16) (with and without UNMAP), START STOP
//! UNIT and PREVENT ALLOW MEDIUM REMOVAL (accepted, nothing to do). Anything else: CHECK CONDITION,
//! ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
//!
//! Long because every supported command (listed above) is decoded and answered here over one LUN's shared
//! range and sense checks; only the tests live in their own file.

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
/// Most blocks one GET LBA STATUS descriptor describes (64 MiB).
pub const LBA_STATUS_SPAN: u64 = 1 << 17;

/// SCSI status codes.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys.
pub const NO_SENSE: u8 = 0x0;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const DATA_PROTECT: u8 = 0x7;
pub const ABORTED_COMMAND: u8 = 0xB;
pub const MISCOMPARE: u8 = 0xE;

/// Why a command did not complete: sense key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (VALID set), e.g. the offset of the first byte a VERIFY found different.
    pub info: Option<u32>,
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
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(MISCOMPARE, 0x1D, 0x00);
    /// RFC 7143 11.4.7.2 "protocol service CRC error": how a task ends whose data sequence broke.
    pub const PROTOCOL_SERVICE_CRC: Sense = Sense::new(ABORTED_COMMAND, 0x47, 0x05);

    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    /// The same sense with the INFORMATION field set.
    pub const fn with_info(self, info: u32) -> Sense {
        Sense {
            info: Some(info),
            ..self
        }
    }

    /// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70; // current error, fixed format
        s[2] = self.key & 0x0F;
        if let Some(info) = self.info {
            s[0] |= 0x80; // VALID: the INFORMATION field means something
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
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
        // READ, WRITE, WRITE AND VERIFY, VERIFY, PRE-FETCH, WRITE SAME (10).
        0x28 | 0x2A | 0x2E | 0x2F | 0x34 | 0x41 if cdb.len() >= 10 => {
            (u64::from(be32(&cdb[2..])), u32::from(be16(&cdb[7..])))
        }
        // READ, WRITE, WRITE AND VERIFY, VERIFY (12).
        0xA8 | 0xAA | 0xAE | 0xAF if cdb.len() >= 12 => {
            (u64::from(be32(&cdb[2..])), be32(&cdb[6..]))
        }
        // READ, WRITE, ORWRITE, WRITE AND VERIFY, VERIFY, PRE-FETCH, WRITE SAME (16).
        0x88 | 0x8A | 0x8B | 0x8E | 0x8F | 0x90 | 0x93 if cdb.len() >= 16 => {
            (be64(&cdb[2..]), be32(&cdb[10..]))
        }
        _ => return None,
    })
}

/// Whether the command is one this core knows to carry no Data-Out.
pub fn sends_nothing(cdb: &[u8]) -> bool {
    match cdb.first() {
        Some(
            0x00 | 0x03 | 0x08 | 0x12 | 0x1A | 0x1B | 0x1E | 0x25 | 0x28 | 0x34 | 0x35 | 0x5A
            | 0x88 | 0x90 | 0x91 | 0x9E | 0xA0 | 0xA3 | 0xA8,
        ) => true,
        // VERIFY without a byte check compares nothing the initiator sends.
        Some(0x2F | 0xAF | 0x8F) => verify_bytchk(cdb) == 0,
        _ => false,
    }
}

/// VERIFY's BYTCHK field (byte 1, bits 1-2): 0 check the medium only, 1 compare the Data-Out with
/// the blocks, 3 compare one block of Data-Out with every block (2 is reserved).
fn verify_bytchk(cdb: &[u8]) -> u8 {
    cdb.get(1).map_or(0, |b| (b >> 1) & 0x03)
}

/// How many bytes of Data-Out a command carries (what the initiator will send), from its CDB.
pub fn data_out_len(cdb: &[u8]) -> u32 {
    let blocks = || {
        rw_range(cdb)
            .map(|(_, n)| n.saturating_mul(BLOCK as u32))
            .unwrap_or(0)
    };
    match cdb.first() {
        // WRITE, WRITE AND VERIFY, ORWRITE: a block of data per block.
        Some(0x0A | 0x2A | 0xAA | 0x8A | 0x2E | 0xAE | 0x8E | 0x8B) => blocks(),
        Some(0x2F | 0xAF | 0x8F) => match verify_bytchk(cdb) {
            1 => blocks(),
            3 => BLOCK as u32,
            _ => 0,
        },
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

/// The commands [`Lun::execute`] carries out, for REPORT SUPPORTED OPERATION CODES: operation code,
/// service action (for commands that have them) and CDB length.
const COMMANDS: &[(u8, Option<u16>, u8)] = &[
    (0x00, None, 6),        // TEST UNIT READY
    (0x03, None, 6),        // REQUEST SENSE
    (0x08, None, 6),        // READ(6)
    (0x0A, None, 6),        // WRITE(6)
    (0x12, None, 6),        // INQUIRY
    (0x1A, None, 6),        // MODE SENSE(6)
    (0x1B, None, 6),        // START STOP UNIT
    (0x1E, None, 6),        // PREVENT ALLOW MEDIUM REMOVAL
    (0x25, None, 10),       // READ CAPACITY(10)
    (0x28, None, 10),       // READ(10)
    (0x2A, None, 10),       // WRITE(10)
    (0x2E, None, 10),       // WRITE AND VERIFY(10)
    (0x2F, None, 10),       // VERIFY(10)
    (0x34, None, 10),       // PRE-FETCH(10)
    (0x35, None, 10),       // SYNCHRONIZE CACHE(10)
    (0x41, None, 10),       // WRITE SAME(10)
    (0x42, None, 10),       // UNMAP
    (0x5A, None, 10),       // MODE SENSE(10)
    (0x88, None, 16),       // READ(16)
    (0x8A, None, 16),       // WRITE(16)
    (0x8B, None, 16),       // ORWRITE(16)
    (0x8E, None, 16),       // WRITE AND VERIFY(16)
    (0x8F, None, 16),       // VERIFY(16)
    (0x90, None, 16),       // PRE-FETCH(16)
    (0x91, None, 16),       // SYNCHRONIZE CACHE(16)
    (0x93, None, 16),       // WRITE SAME(16)
    (0x9E, Some(0x10), 16), // READ CAPACITY(16)
    (0x9E, Some(0x12), 16), // GET LBA STATUS
    (0xA0, None, 12),       // REPORT LUNS
    (0xA3, Some(0x0C), 12), // REPORT SUPPORTED OPERATION CODES
    (0xA8, None, 12),       // READ(12)
    (0xAA, None, 12),       // WRITE(12)
    (0xAE, None, 12),       // WRITE AND VERIFY(12)
    (0xAF, None, 12),       // VERIFY(12)
];

/// The CDB usage data of a command (SPC-4 6.35.3): which bits of each CDB byte the device server
/// looks at. Byte 1 holds the flags (DPO and FUA for the block commands, as MODE SENSE's DPOFUA says);
/// the bytes between are LBA, length and allocation fields; the control byte is not used.
fn cdb_usage(op: u8, sa: Option<u16>, len: u8) -> Vec<u8> {
    let mut u = vec![0xFF; usize::from(len)];
    u[0] = op;
    u[1] = match op {
        _ if sa.is_some() => 0x1F,
        0x08 | 0x0A => 0x1F,
        0x28 | 0xA8 | 0x88 | 0x2A | 0xAA | 0x8A | 0x8B => 0xF8, // (RD/WR/OR)PROTECT, DPO, FUA
        0x2F | 0xAF | 0x8F => 0xF6,                             // VRPROTECT, DPO, BYTCHK
        0x2E | 0xAE | 0x8E => 0xF2,                             // WRPROTECT, DPO, BYTCHK
        0x41 => 0xF8,                                           // WRPROTECT, ANCHOR, UNMAP
        0x93 => 0xF9,                                           // ... and NDOB
        0x34 | 0x90 | 0x35 | 0x91 => 0x02,                      // IMMED
        0x12 => 0x01,                                           // EVPD
        0x1A => 0x08,                                           // DBD
        0x5A => 0x18,                                           // LLBAA, DBD
        _ => 0x00,
    };
    u[usize::from(len) - 1] = 0x00;
    u
}

/// REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): every command, or one (by operation code, or by
/// operation code and service action), with command timeouts descriptors when RCTD is set.
fn report_opcodes(cdb: &[u8]) -> Reply {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let (op, sa) = (cdb[3], be16(&cdb[4..]));
    let alloc = be32(&cdb[6..]) as usize;
    // A command timeouts descriptor: length 10, no command-specific field, no timeouts known.
    let timeouts = [0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let d = match options {
        0 => {
            let mut d = vec![0u8; 4];
            for &(op, sa, len) in COMMANDS {
                let flags = u8::from(sa.is_some()) | if rctd { 0x02 } else { 0 };
                d.extend_from_slice(&[op, 0]);
                d.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
                d.extend_from_slice(&[0, flags, 0, len]);
                if rctd {
                    d.extend_from_slice(&timeouts);
                }
            }
            let n = (d.len() - 4) as u32;
            d[..4].copy_from_slice(&n.to_be_bytes());
            d
        }
        1..=3 => {
            let has_sa = COMMANDS.iter().any(|c| c.0 == op && c.1.is_some());
            // 1 names a command without service actions, 2 one with; 3 either.
            if (options == 1 && has_sa) || (options == 2 && !has_sa) {
                return Reply::check(Sense::INVALID_FIELD_IN_CDB);
            }
            let found = COMMANDS
                .iter()
                .find(|c| c.0 == op && (!has_sa || c.1 == Some(sa)));
            match found {
                Some(&(op, sa, len)) => {
                    // SUPPORT 011b: supported as the standard says.
                    let mut d = vec![0, 0x03 | if rctd { 0x80 } else { 0 }, 0, len];
                    d.extend(cdb_usage(op, sa, len));
                    if rctd {
                        d.extend_from_slice(&timeouts);
                    }
                    d
                }
                // SUPPORT 001b: not supported; no usage data.
                None => vec![0, 0x01, 0, 0],
            }
        }
        _ => return Reply::check(Sense::INVALID_FIELD_IN_CDB),
    };
    Reply::data(clip(d, alloc))
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
            0x08 | 0x28 | 0xA8 | 0x88 => self.read(cdb),
            0x0A | 0x2A | 0xAA | 0x8A => self.write(cdb, data_out, false),
            // WRITE AND VERIFY: what is verified must be on the medium, so it is written through.
            0x2E | 0xAE | 0x8E => self.write(cdb, data_out, true),
            0x2F | 0xAF | 0x8F => self.verify(cdb, data_out),
            0x8B => self.orwrite(cdb, data_out),
            // PRE-FETCH: the range is checked; there is no cache to fill (GOOD, not CONDITION MET).
            0x34 | 0x90 => match block_range(cdb).and_then(|(lba, n)| self.range(lba, n)) {
                Ok(_) => Reply::good(),
                Err(sense) => Reply::check(sense),
            },
            // MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
            0xA3 if cdb.len() >= 12 && cdb[1] & 0x1F == 0x0C => report_opcodes(cdb),
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
                // WSNZ=0: a WRITE SAME of 0 blocks writes to the end (within the maximum below).
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
        // One descriptor for at most LBA_STATUS_SPAN blocks: the initiator asks again from where it
        // ends, and the cost of walking the map stays bounded.
        let rest = (self.blocks() - lba).min(LBA_STATUS_SPAN);
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
        match self.read_blocks(cdb) {
            Ok((_, data)) => Reply::data(data),
            Err(sense) => Reply::check(sense),
        }
    }

    /// WRITE (and, with `verify`, WRITE AND VERIFY, written through to the medium).
    fn write(&self, cdb: &[u8], data: &[u8], verify: bool) -> Reply {
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
        let fua = verify || (cdb[0] != 0x0A && cdb[1] & 0x08 != 0);
        match self.disk.write(off, data, fua) {
            Ok(()) => Reply::good(),
            Err(DiskError::ReadOnly) => Reply::check(Sense::WRITE_PROTECTED),
            Err(DiskError::Range) => Reply::check(Sense::LBA_OUT_OF_RANGE),
            Err(_) => Reply::check(Sense::WRITE_ERROR),
        }
    }

    /// The blocks a READ-like command names, read from the disk (range and length checked).
    fn read_blocks(&self, cdb: &[u8]) -> Result<(u64, Vec<u8>), Sense> {
        let (lba, n) = block_range(cdb)?;
        if n > MAX_TRANSFER_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let (off, len) = self.range(lba, n)?;
        let mut buf = vec![0u8; len as usize];
        match self.disk.read(off, &mut buf) {
            Ok(()) => Ok((off, buf)),
            Err(DiskError::Range) => Err(Sense::LBA_OUT_OF_RANGE),
            Err(_) => Err(Sense::READ_ERROR),
        }
    }

    /// VERIFY(10/12/16): the blocks are read (a medium check); with BYTCHK 1 the Data-Out is compared
    /// with them, with BYTCHK 3 its one block with each of them. The first difference is a MISCOMPARE
    /// whose INFORMATION is its offset in the Data-Out buffer (SBC-4 5.31).
    fn verify(&self, cdb: &[u8], data: &[u8]) -> Reply {
        let bytchk = verify_bytchk(cdb);
        if bytchk == 2 {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let disk = match self.read_blocks(cdb) {
            Ok((_, d)) => d,
            Err(sense) => return Reply::check(sense),
        };
        // Slices compare with memcmp; the byte loop only runs on a block known to differ.
        let first_difference = |a: &[u8], b: &[u8]| {
            let n = a.len().min(b.len());
            (a[..n] != b[..n]).then(|| a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0))
        };
        let differs = match bytchk {
            1 => disk
                .chunks(BLOCK as usize)
                .zip(data.chunks(BLOCK as usize))
                .enumerate()
                .find_map(|(i, (d, o))| first_difference(d, o).map(|at| i * BLOCK as usize + at)),
            3 => disk
                .chunks(BLOCK as usize)
                .find_map(|d| first_difference(d, data)),
            _ => None,
        };
        match differs {
            Some(at) => Reply::check(Sense::MISCOMPARE_DURING_VERIFY.with_info(at as u32)),
            None => Reply::good(),
        }
    }

    /// ORWRITE(16): every byte becomes itself OR the Data-Out's byte (SBC-4 5.9), written as one.
    fn orwrite(&self, cdb: &[u8], data: &[u8]) -> Reply {
        if let Err(sense) = block_range(cdb) {
            return Reply::check(sense);
        }
        if self.disk.read_only() {
            return Reply::check(Sense::WRITE_PROTECTED);
        }
        let (off, mut blocks) = match self.read_blocks(cdb) {
            Ok(r) => r,
            Err(sense) => return Reply::check(sense),
        };
        // As WRITE: the whole blocks the initiator sent are used.
        let usable = data.len().min(blocks.len()) / BLOCK as usize * BLOCK as usize;
        blocks.truncate(usable);
        if blocks.is_empty() {
            return Reply::good();
        }
        // Eight bytes at a time (a byte loop is slow in unoptimised builds).
        for (b, d) in blocks.chunks_exact_mut(8).zip(data.chunks_exact(8)) {
            let v = u64::from_ne_bytes((&*b).try_into().unwrap_or([0; 8]))
                | u64::from_ne_bytes(d.try_into().unwrap_or([0; 8]));
            b.copy_from_slice(&v.to_ne_bytes());
        }
        let fua = cdb[1] & 0x08 != 0;
        match self.disk.write(off, &blocks, fua) {
            Ok(()) => Reply::good(),
            Err(DiskError::ReadOnly) => Reply::check(Sense::WRITE_PROTECTED),
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
        // ANCHOR: this disk cannot anchor (ANC_SUP=0).
        if cdb[1] & 0x01 != 0 {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
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

    /// WRITE SAME(10/16) (SBC-4 5.48, 5.50): one block of Data-Out (or, with NDOB, zeros) over the
    /// range; a NUMBER OF LOGICAL BLOCKS of 0 means "to the last block" (WSNZ=0), within the maximum
    /// write same length. With UNMAP the blocks are deallocated, whatever the data (thin provisioned,
    /// LBPRZ: they read as zeros); ANCHOR is refused (ANC_SUP=0).
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
        // ANCHOR (byte 1 bit 4): an error without UNMAP, and with it too, since ANC_SUP=0.
        if cdb[1] & 0x10 != 0 {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let n = if n == 0 {
            match self.blocks().checked_sub(lba) {
                Some(rest) => rest.min(u64::from(u32::MAX)) as u32,
                None => return Reply::check(Sense::LBA_OUT_OF_RANGE),
            }
        } else {
            n
        };
        let (off, len) = match self.range(lba, n) {
            Ok(r) => r,
            Err(s) => return Reply::check(s),
        };
        if n > MAX_UNMAP_BLOCKS {
            return Reply::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let block: &[u8] = if ndob { &[] } else { data };
        if !ndob && block.len() != BLOCK as usize {
            return Reply::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if n == 0 {
            return Reply::good();
        }
        let result = if unmap || ndob || block.iter().all(|b| *b == 0) {
            self.disk.write_zeroes(off, len, false)
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
        // No bigger than needed (a WRITE SAME of one block writes one block), built by copying.
        let copies = (len.min(1 << 20) / block.len().max(1) as u64).max(1) as usize;
        let chunk = block.repeat(copies);
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
