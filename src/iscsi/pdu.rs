//! iSCSI PDUs (RFC 7143 section 11): framing a byte stream into PDUs, reading the fields of the requests
//! an initiator sends, and building the target's responses. No socket here: the shell feeds bytes in and
//! writes the encoded responses out.
//!
//! A PDU is a 48-byte Basic Header Segment, optional Additional Header Segments (`TotalAHSLength` words),
//! and a data segment padded to a multiple of 4 bytes. Digests are never negotiated (`None`), so there
//! are none to strip.

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The "reserved" task tag: no task (unsolicited NOP-In, Reject).
pub const NO_TAG: u32 = 0xFFFF_FFFF;

/// Initiator opcodes.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const TEXT: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    /// Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const REJECT: u8 = 0x3F;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OPERATION_REJECT: u8 = 0x0A;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0C;
}

/// One PDU.
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("flags", &format_args!("{:#04x}", self.bhs[1]))
            .field("itt", &format_args!("{:#x}", self.itt()))
            .field("ahs", &self.ahs.len())
            .field("data", &self.data.len())
            .finish()
    }
}

/// What framing found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole PDU yet: at least this many bytes are needed in all.
    Need(usize),
    /// A PDU, and how many bytes of the buffer it took.
    Pdu(Pdu, usize),
}

/// A stream that cannot be framed: the connection must end (after a Reject where one can be sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A data segment longer than what this side declared it can receive.
    DataTooLong {
        len: u32,
        max: u32,
        bhs: Box<[u8; BHS_LEN]>,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::DataTooLong { len, max, .. } => {
                write!(
                    f,
                    "data segment of {len} bytes, more than the {max} negotiated"
                )
            }
        }
    }
}

/// `n` rounded up to whole 4-byte words: data segments and AHS are padded to them on the wire.
pub fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// The wire length of the PDU whose BHS starts `bhs` (header, AHS, padded data), or None when fewer than
/// [`BHS_LEN`] bytes are there to tell.
pub fn wire_len(bhs: &[u8]) -> Option<usize> {
    let b = bhs.get(..BHS_LEN)?;
    let data_len = u32::from_be_bytes([0, b[5], b[6], b[7]]);
    Some(BHS_LEN + usize::from(b[4]) * 4 + pad4(data_len as usize))
}

/// Frames the PDU at the front of `buf`; `max_data` is the largest data segment this side accepts
/// (its MaxRecvDataSegmentLength, or 8192 during login).
pub fn frame(buf: &[u8], max_data: u32) -> Result<Frame, FrameError> {
    if buf.len() < BHS_LEN {
        return Ok(Frame::Need(BHS_LEN));
    }
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&buf[..BHS_LEN]);
    let ahs_len = usize::from(bhs[4]) * 4;
    let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    if data_len > max_data {
        return Err(FrameError::DataTooLong {
            len: data_len,
            max: max_data,
            bhs: Box::new(bhs),
        });
    }
    let total = wire_len(&bhs).unwrap_or_else(|| unreachable!("a whole BHS"));
    if buf.len() < total {
        return Ok(Frame::Need(total));
    }
    let ahs = buf[BHS_LEN..BHS_LEN + ahs_len].to_vec();
    let start = BHS_LEN + ahs_len;
    let data = buf[start..start + data_len as usize].to_vec();
    Ok(Frame::Pdu(Pdu { bhs, ahs, data }, total))
}

impl Pdu {
    /// An empty PDU with `opcode` (the final bit set, as most target PDUs want).
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3F;
        bhs[1] = 0x80;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3F
    }

    /// The I bit: an immediate command (not numbered by CmdSN).
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// The F bit: the last PDU of a sequence.
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.bhs[off], self.bhs[off + 1]])
    }

    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.bhs[off..off + 4].try_into().unwrap_or([0; 4]))
    }

    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.bhs[off..off + 8].try_into().unwrap_or([0; 8]))
    }

    pub fn set_u16(&mut self, off: usize, v: u16) -> &mut Self {
        self.bhs[off..off + 2].copy_from_slice(&v.to_be_bytes());
        self
    }

    pub fn set_u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.bhs[off..off + 4].copy_from_slice(&v.to_be_bytes());
        self
    }

    pub fn set_u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.bhs[off..off + 8].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// The LUN field as sent (8 bytes, SAM encoding).
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }

    /// CmdSN of a request.
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(24)
    }

    /// ExpStatSN of a request.
    pub fn exp_stat_sn(&self) -> u32 {
        self.u32_at(28)
    }

    /// The data segment length the header declares.
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]])
    }

    /// The command descriptor block of a SCSI Command: the 16 bytes of the BHS, extended by an
    /// Extended CDB AHS (type 1) when there is one.
    pub fn cdb(&self) -> Vec<u8> {
        let mut cdb = self.bhs[32..48].to_vec();
        let mut rest = &self.ahs[..];
        while rest.len() >= 4 {
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let kind = rest[2];
            let body = rest.get(4..3 + len).unwrap_or(&[]);
            if kind == 1 {
                cdb.extend_from_slice(body);
            }
            rest = rest.get(pad4(3 + len)..).unwrap_or(&[]);
        }
        cdb
    }

    /// Sets the data segment (its length goes into the header).
    pub fn with_data(mut self, data: Vec<u8>) -> Pdu {
        let n = data.len() as u32;
        self.bhs[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
        self.data = data;
        self
    }

    /// The BHS as it goes on the wire: AHS and data segment lengths filled in from what the PDU holds.
    pub fn header(&self) -> [u8; BHS_LEN] {
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        bhs[5..8].copy_from_slice(&(self.data.len() as u32).to_be_bytes()[1..]);
        bhs
    }

    /// The PDU as bytes on the wire (AHS and padded data segment included).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BHS_LEN + self.ahs.len() + pad4(self.data.len()));
        out.extend_from_slice(&self.header());
        out.extend_from_slice(&self.ahs);
        out.extend_from_slice(&self.data);
        out.resize(BHS_LEN + self.ahs.len() + pad4(self.data.len()), 0);
        out
    }
}

/// The sequence numbers every target response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Numbers {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl Pdu {
    /// StatSN, ExpCmdSN and MaxCmdSN at their usual place (bytes 24..36).
    pub fn numbered(mut self, n: Numbers) -> Pdu {
        self.set_u32(24, n.stat_sn)
            .set_u32(28, n.exp_cmd_sn)
            .set_u32(32, n.max_cmd_sn);
        self
    }
}

/// A SCSI Response: status, sense (when CHECK CONDITION) and residual.
pub fn scsi_response(itt: u32, status: u8, sense: Option<&[u8]>, residual: i64, n: Numbers) -> Pdu {
    let mut p = Pdu::new(op::SCSI_RESPONSE);
    // Residual: U (underflow, fewer bytes than expected) or O (overflow).
    if residual > 0 {
        p.bhs[1] |= 0x02;
    } else if residual < 0 {
        p.bhs[1] |= 0x04;
    }
    p.bhs[2] = 0x00; // command completed at target
    p.bhs[3] = status;
    p.set_u32(16, itt)
        .set_u32(44, residual.unsigned_abs() as u32);
    let p = p.numbered(n);
    match sense {
        Some(s) => {
            let mut d = Vec::with_capacity(2 + s.len());
            d.extend_from_slice(&(s.len() as u16).to_be_bytes());
            d.extend_from_slice(s);
            p.with_data(d)
        }
        None => p,
    }
}

/// One Data-In PDU; the last of a command may carry its status (`status`), sparing a SCSI Response.
pub fn data_in(
    itt: u32,
    data_sn: u32,
    offset: u32,
    data: Vec<u8>,
    last: bool,
    status: Option<(u8, i64)>,
    n: Numbers,
) -> Pdu {
    let mut p = Pdu::new(op::DATA_IN);
    p.bhs[1] = if last { 0x80 } else { 0 };
    p.set_u32(16, itt).set_u32(20, NO_TAG);
    p.set_u32(28, n.exp_cmd_sn).set_u32(32, n.max_cmd_sn);
    p.set_u32(36, data_sn).set_u32(40, offset);
    if let (true, Some((st, residual))) = (last, status) {
        p.bhs[1] |= 0x01; // S: status in this PDU
        if residual > 0 {
            p.bhs[1] |= 0x02;
        } else if residual < 0 {
            p.bhs[1] |= 0x04;
        }
        p.bhs[3] = st;
        p.set_u32(24, n.stat_sn)
            .set_u32(44, residual.unsigned_abs() as u32);
    }
    p.with_data(data)
}

/// An R2T: the initiator may send `len` bytes at `offset` under transfer tag `ttt`.
pub fn r2t(lun: u64, itt: u32, ttt: u32, r2t_sn: u32, offset: u32, len: u32, n: Numbers) -> Pdu {
    let mut p = Pdu::new(op::R2T);
    p.set_u64(8, lun).set_u32(16, itt).set_u32(20, ttt);
    // R2T carries StatSN without advancing it.
    let mut p = p.numbered(n);
    p.set_u32(36, r2t_sn).set_u32(40, offset).set_u32(44, len);
    p
}

/// A NOP-In answering a NOP-Out (`itt`, echoing its data), or, with `itt == NO_TAG` and a `ttt`, a ping
/// of the target's own.
pub fn nop_in(lun: u64, itt: u32, ttt: u32, data: Vec<u8>, n: Numbers) -> Pdu {
    let mut p = Pdu::new(op::NOP_IN);
    p.set_u64(8, lun).set_u32(16, itt).set_u32(20, ttt);
    p.numbered(n).with_data(data)
}

/// A Reject of the PDU whose header is `bhs`.
pub fn reject(reason: u8, bhs: &[u8; BHS_LEN], n: Numbers) -> Pdu {
    let mut p = Pdu::new(op::REJECT);
    p.bhs[2] = reason;
    p.set_u32(16, NO_TAG);
    p.numbered(n).with_data(bhs.to_vec())
}

/// A Task Management Function Response.
pub fn task_response(itt: u32, response: u8, n: Numbers) -> Pdu {
    let mut p = Pdu::new(op::TASK_MGMT_RESPONSE);
    p.bhs[2] = response;
    p.set_u32(16, itt);
    p.numbered(n)
}

/// A Logout Response.
pub fn logout_response(itt: u32, response: u8, n: Numbers) -> Pdu {
    let mut p = Pdu::new(op::LOGOUT_RESPONSE);
    p.bhs[2] = response;
    p.set_u32(16, itt);
    p.numbered(n)
}

/// Parses a text data segment: `key=value` pairs, each ended by a NUL. A pair without `=` or a key
/// that is not printable is an error (the login or text exchange then fails cleanly).
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in data.split(|b| *b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| "text key=value is not UTF-8".to_string())?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("text item {s:?} has no '='"))?;
        if k.is_empty() || k.len() > 63 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("bad text key {k:?}"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes `key=value` pairs, each ended by a NUL.
pub fn encode_text(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scsi_read10(itt: u32, lba: u32, blocks: u16) -> Vec<u8> {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.bhs[1] = 0x80 | 0x40; // F, R
        p.set_u32(16, itt)
            .set_u32(20, u32::from(blocks) * 512)
            .set_u32(24, 7)
            .set_u32(28, 3);
        p.bhs[32] = 0x28;
        p.bhs[34..38].copy_from_slice(&lba.to_be_bytes());
        p.bhs[39..41].copy_from_slice(&blocks.to_be_bytes());
        p.encode()
    }

    #[test]
    fn framing_waits_for_whole_pdus_and_pads_data() {
        let wire = scsi_read10(0x11, 100, 8);
        assert_eq!(wire.len(), 48);
        assert_eq!(frame(&wire[..20], 8192), Ok(Frame::Need(48)));
        let Ok(Frame::Pdu(p, used)) = frame(&wire, 8192) else {
            panic!("no pdu")
        };
        assert_eq!(used, 48);
        assert_eq!(
            (p.opcode(), p.itt(), p.cmd_sn(), p.exp_stat_sn()),
            (op::SCSI_COMMAND, 0x11, 7, 3)
        );
        assert_eq!(p.cdb()[0], 0x28);
        // A 5-byte data segment takes 8 bytes on the wire; framing needs all 8.
        let nop = Pdu::new(op::NOP_OUT).with_data(b"hello".to_vec()).encode();
        assert_eq!(nop.len(), 56);
        assert_eq!(frame(&nop[..53], 8192), Ok(Frame::Need(56)));
        let mut two = nop.clone();
        two.extend_from_slice(&wire);
        let Ok(Frame::Pdu(p, used)) = frame(&two, 8192) else {
            panic!()
        };
        assert_eq!((p.data.as_slice(), used), (&b"hello"[..], 56));
        let Ok(Frame::Pdu(p, _)) = frame(&two[used..], 8192) else {
            panic!()
        };
        assert_eq!(p.itt(), 0x11);
    }

    #[test]
    fn oversized_data_segments_are_refused_before_reading_them() {
        let mut p = Pdu::new(op::DATA_OUT);
        p.bhs[5..8].copy_from_slice(&[0x01, 0x00, 0x00]); // 64 KiB declared
        let e = frame(&p.bhs, 8192).unwrap_err();
        assert!(matches!(
            e,
            FrameError::DataTooLong {
                len: 65536,
                max: 8192,
                ..
            }
        ));
        assert!(e.to_string().contains("65536"));
    }

    #[test]
    fn extended_cdbs_come_from_the_ahs() {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.bhs[32] = 0x7F;
        // AHS: length 17 (type byte + 16 CDB bytes), type 1, reserved; padded to 20.
        let mut ahs = vec![0, 17, 1, 0];
        ahs.extend((0..16).map(|i| i as u8 + 100));
        p.ahs = ahs;
        let wire = p.encode();
        assert_eq!(wire[4], 5);
        let Ok(Frame::Pdu(q, _)) = frame(&wire, 0) else {
            panic!()
        };
        let cdb = q.cdb();
        assert_eq!(cdb.len(), 32);
        assert_eq!((cdb[0], cdb[16], cdb[31]), (0x7F, 100, 115));
    }

    #[test]
    fn responses_carry_status_sense_and_residuals() {
        let n = Numbers {
            stat_sn: 5,
            exp_cmd_sn: 8,
            max_cmd_sn: 40,
        };
        let sense = [
            0x70u8, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0,
        ];
        let r = scsi_response(0x22, 2, Some(&sense), 512, n);
        assert_eq!(
            (r.opcode(), r.flags(), r.bhs[3]),
            (op::SCSI_RESPONSE, 0x82, 2)
        );
        assert_eq!(
            (r.u32_at(24), r.u32_at(28), r.u32_at(32), r.u32_at(44)),
            (5, 8, 40, 512)
        );
        assert_eq!(r.data_len(), 20);
        assert_eq!(&r.data[..2], &[0, 18]);
        let d = data_in(0x22, 3, 4096, vec![1; 100], true, Some((0, -4)), n);
        assert_eq!(d.flags(), 0x80 | 0x01 | 0x04);
        assert_eq!(
            (d.u32_at(36), d.u32_at(40), d.u32_at(44), d.u32_at(24)),
            (3, 4096, 4, 5)
        );
        let d = data_in(0x22, 0, 0, vec![1; 8], false, None, n);
        assert_eq!((d.flags(), d.u32_at(24)), (0, 0), "no status, no StatSN");
        let t = r2t(0, 9, 77, 1, 8192, 65536, n);
        assert_eq!(
            (t.u32_at(20), t.u32_at(36), t.u32_at(40), t.u32_at(44)),
            (77, 1, 8192, 65536)
        );
        let j = reject(reject::PROTOCOL_ERROR, &t.bhs, n);
        assert_eq!((j.bhs[2], j.itt(), j.data.len()), (0x04, NO_TAG, 48));
    }

    #[test]
    fn text_pairs() {
        let t = b"InitiatorName=iqn.2026-11.org.example:node1\0SessionType=Normal\0\0";
        let kv = parse_text(t).unwrap();
        assert_eq!(
            kv[0],
            (
                "InitiatorName".into(),
                "iqn.2026-11.org.example:node1".into()
            )
        );
        assert_eq!(kv.len(), 2);
        assert_eq!(encode_text(&kv), t[..t.len() - 1].to_vec());
        assert!(parse_text(b"NoEquals\0").is_err());
        assert!(parse_text(b"=v\0").is_err());
        assert!(parse_text(&[0xFF, b'=', b'1', 0]).is_err());
        // A value may hold '=' (CHAP values do not, but the grammar allows it).
        assert_eq!(parse_text(b"K=a=b\0").unwrap()[0].1, "a=b");
    }

    proptest::proptest! {
        /// Arbitrary bytes frame into PDUs or a clean error, always making progress.
        #[test]
        fn arbitrary_streams_frame_or_fail_cleanly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
        ) {
            let mut rest = &bytes[..];
            loop {
                match frame(rest, 1024) {
                    Ok(Frame::Pdu(p, used)) => {
                        proptest::prop_assert!(used >= BHS_LEN && used <= rest.len());
                        proptest::prop_assert_eq!(p.encode().len(), used);
                        rest = &rest[used..];
                    }
                    Ok(Frame::Need(n)) => {
                        proptest::prop_assert!(n > rest.len());
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
