//! iSCSI bad input on the wire (issue 7), against a real corral on loopback, with PDUs built here from RFC
//! 7143 (an encoder of the test's own, not corral's `pdu` module): a good login and READ(16) first, then
//! truncated PDUs, data segments longer than the receiver declared, immediate data beyond the expected
//! length, out-of-range and wrapping LBAs, logins to targets that are not the initiator's, and PDUs out of
//! place. Each gets the RFC's answer or a closed connection; the server keeps serving, never panics, writes
//! nothing it refused, and counts what it refused. And initiators that only hold connections (issue 15):
//! beyond the connection caps they are closed at once, logins that do not finish by the login deadline
//! are closed however slowly they keep sending, and a silent initiator in the full feature phase is
//! pinged and closed when it does not answer.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// The base disk: 1 MiB, 2048 blocks of 512 bytes.
const BLOCKS: u64 = 2048;
const IQN_PREFIX: &str = "iqn.2026-11.io.corral";
const INITIATOR: &str = "iqn.2026-11.test:bad-input";
const NODE1: &str = "127.0.0.1";
const NODE2: &str = "127.0.0.2";

// Opcodes (RFC 7143 11.1.1).
const NOP_OUT: u8 = 0x00;
const SCSI_COMMAND: u8 = 0x01;
const LOGIN: u8 = 0x03;
const TEXT: u8 = 0x04;
const LOGOUT: u8 = 0x06;
const SNACK: u8 = 0x10;
const NOP_IN: u8 = 0x20;
const SCSI_RESPONSE: u8 = 0x21;
const LOGIN_RESPONSE: u8 = 0x23;
const DATA_IN: u8 = 0x25;
const LOGOUT_RESPONSE: u8 = 0x26;
const R2T: u8 = 0x31;
const REJECT: u8 = 0x3F;
/// The I bit of byte 0: an immediate PDU.
const IMMEDIATE: u8 = 0x40;

/// What the base disk holds at byte `i`.
fn pattern(i: u64) -> u8 {
    ((i / 512) as u8).wrapping_mul(3) ^ (i % 256) as u8
}

fn pattern_range(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern).collect()
}

/// A running corral with an iSCSI slot disk; node 1 (127.0.0.1) holds db/0, db/1 and db/2 are free.
struct Corral {
    dir: PathBuf,
    http: u16,
    iscsi: u16,
    server: Server,
    _tmp: tempfile::TempDir,
}

fn setup(dir: &Path, http: u16, iscsi: u16, iscsi_keys: &str) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    std::fs::write(
        dir.join("disks/base.img"),
        pattern_range(0, (BLOCKS * 512) as usize),
    )
    .unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}/boot-scripts\"\npolicy = \"policy.toml\"\ndisks_dir = \"disks\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nenabled = false\n[nbd]\nlisten = \"127.0.0.1:{}\"\n[iscsi]\nlisten = \"127.0.0.1:{iscsi}\"\n{iscsi_keys}\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\naddress = \"127.0.0.1\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:02\"\naddress = \"127.0.0.2\"\n",
            env!("CARGO_MANIFEST_DIR"),
            free_port()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 3\ndefault = 2\nimages = [\"testos\"]\ndisk = \"base\"\n",
    )
    .unwrap();
}

/// `corral serve` as [`start`] runs it, within an address space of `kib` KiB (`ulimit -v`): a machine
/// with that much memory to give it, made the same on every test machine.
fn start_limited(dir: &Path, port: u16, kib: u64) -> Option<Server> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .unwrap();
    let child = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -v {kib} && exec \"$0\" serve --config \"$1\""),
            env!("CARGO_BIN_EXE_corral"),
        ])
        .arg(dir.join("corral.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline || !matches!(server.0.try_wait(), Ok(None)) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(server)
}

impl Corral {
    fn start() -> Corral {
        Corral::start_with(None).unwrap()
    }

    /// A corral, within `limit` KiB of address space when given (None if it cannot start in it).
    fn start_with(limit: Option<u64>) -> Option<Corral> {
        Corral::start_configured(limit, "")
    }

    /// A corral with more keys for `[iscsi]`, once no connection is open (those that waited for its
    /// listener are gone).
    fn start_keys(iscsi_keys: &str) -> Corral {
        let c = Corral::start_configured(None, iscsi_keys).unwrap();
        wait_for("no iscsi connection open", 30, || {
            c.metric("corral_iscsi_connections_open") == 0
        });
        c
    }

    fn start_configured(limit: Option<u64>, iscsi_keys: &str) -> Option<Corral> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let (http, iscsi) = (free_port(), free_port());
        setup(&dir, http, iscsi, iscsi_keys);
        let server = match limit {
            None => start(&dir, http),
            Some(kib) => start_limited(&dir, http, kib)?,
        };
        // Node 1 asks for its script until it is given db/0 (a parked script first is allowed).
        wait_for("node 1 to fill db/0", 30, || {
            get(&format!(
                "http://127.0.0.1:{http}/boot/52-54-00-00-00-01?buildarch=x86_64"
            ))
            .contains("slot=db/0")
        });
        wait_for("the iscsi listener", 30, || {
            TcpStream::connect(("127.0.0.1", iscsi)).is_ok()
        });
        Some(Corral {
            dir,
            http,
            iscsi,
            server,
            _tmp: tmp,
        })
    }

    /// The corral process has not exited (or crashed).
    fn alive(&mut self) -> bool {
        matches!(self.server.0.try_wait(), Ok(None))
    }

    fn metric(&self, name: &str) -> u64 {
        let metrics = get(&format!("http://127.0.0.1:{}/metrics", self.http));
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{metrics}"))
    }

    fn connect(&self) -> TcpStream {
        connect_from(self.iscsi, NODE1)
    }

    fn login(&self, target: &str) -> Conn {
        login(self.connect(), target).unwrap_or_else(|(st, _)| panic!("login refused: {st:?}"))
    }

    /// A fresh login to db/0 and a READ(16) that returns the disk's bytes: the server still serves.
    fn still_serves(&self) {
        let mut c = self.login(&iqn("db.0"));
        let r = c.command(0x40, &read16(7, 2), 1024, &[]).status();
        assert_eq!(r.status, 0, "READ(16) after bad input: {r:?}");
        assert_eq!(r.data, pattern_range(7 * 512, 1024));
        c.logout();
    }

    /// No panic in the log.
    fn log_is_clean(&self) {
        let log = std::fs::read_to_string(self.dir.join("serve.log")).unwrap();
        assert!(!log.contains("panicked"), "{log}");
    }
}

fn iqn(name: &str) -> String {
    format!("{IQN_PREFIX}:{name}")
}

/// A TCP connection to corral's iSCSI port from `from` (any 127/8 address is loopback).
fn connect_from(port: u16, from: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: IpAddr = from.parse().unwrap();
    sock.bind(&SocketAddr::new(local, 0).into()).unwrap();
    sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let s: TcpStream = sock.into();
    s.set_nodelay(true).unwrap();
    // Long enough for a loaded machine, short enough to fail rather than hang, and shorter than the
    // 30 s a server would wait for the rest of a PDU it had decided to read.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

// ---- PDUs, from RFC 7143 section 11 ----

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn get16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// A PDU on the wire: the 48-byte BHS with DataSegmentLength (bytes 5-7) set to the data's length, then
/// the data segment padded with zeros to a multiple of 4 bytes (no AHS, no digests).
fn wire(mut bhs: [u8; 48], data: &[u8]) -> Vec<u8> {
    let n = data.len() as u32;
    assert!(n < 1 << 24);
    bhs[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
    let mut out = bhs.to_vec();
    out.extend_from_slice(data);
    out.resize(48 + data.len().div_ceil(4) * 4, 0);
    out
}

/// A BHS declaring `len` bytes of data segment (whatever actually follows).
fn declare(mut bhs: [u8; 48], len: u32) -> [u8; 48] {
    bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    bhs
}

/// `key=value` pairs, each ended by a NUL (RFC 7143 6.1).
fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(format!("{k}={v}").as_bytes());
        out.push(0);
    }
    out
}

fn keys(data: &[u8]) -> Vec<(String, String)> {
    data.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let s = String::from_utf8_lossy(s);
            let (k, v) = s.split_once('=').unwrap_or((&s, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn key(data: &[u8], k: &str) -> Option<String> {
    keys(data).into_iter().find(|(x, _)| x == k).map(|(_, v)| v)
}

/// A PDU received: its BHS and data segment.
struct Rx {
    bhs: [u8; 48],
    data: Vec<u8>,
}

impl Rx {
    fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3F
    }
    /// Login Response Status-Class and Status-Detail (bytes 36, 37).
    fn login_status(&self) -> (u8, u8) {
        (self.bhs[36], self.bhs[37])
    }
}

impl std::fmt::Debug for Rx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pdu(op {:#04x}, flags {:#04x}, byte2 {:#04x}, byte3 {:#04x}, data {} bytes)",
            self.opcode(),
            self.bhs[1],
            self.bhs[2],
            self.bhs[3],
            self.data.len()
        )
    }
}

fn recv(s: &mut TcpStream) -> std::io::Result<Rx> {
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs)?;
    let ahs = usize::from(bhs[4]) * 4;
    let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut rest = vec![0u8; ahs + len.div_ceil(4) * 4];
    s.read_exact(&mut rest)?;
    Ok(Rx {
        bhs,
        data: rest[ahs..ahs + len].to_vec(),
    })
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads PDUs until the server closes the connection (EOF or reset): the PDUs it sent on the way.
/// Panics if the server neither sends nor closes within the read timeout (it kept the connection).
fn until_closed(s: &mut TcpStream, what: &str) -> Vec<Rx> {
    let mut got = Vec::new();
    loop {
        match recv(s) {
            Ok(rx) => got.push(rx),
            Err(e) if timed_out(&e) => {
                panic!("{what}: the server kept the connection open (got {got:?})")
            }
            Err(_) => return got,
        }
    }
}

/// A Login Request (RFC 7143 11.12): immediate, `flags` = T C 0 0 CSG NSG, version 0, an ISID of
/// the random kind, TSIH, ITT, CID 0, CmdSN, ExpStatSN.
fn login_request(flags: u8, isid: u16, tsih: u16, cmd_sn: u32, exp_stat_sn: u32) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = IMMEDIATE | LOGIN;
    b[1] = flags;
    b[8..12].copy_from_slice(&[0x80, 0x0B, 0xAD, 0x1D]);
    put16(&mut b, 12, isid);
    put16(&mut b, 14, tsih);
    put32(&mut b, 16, 0x1000 + u32::from(isid));
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    b
}

/// Security stage, transit to operational (T=1, CSG=0, NSG=1).
const SECURITY_TO_OPERATIONAL: u8 = 0x80 | 1;
/// Operational stage, transit to full feature (T=1, CSG=1, NSG=3).
const OPERATIONAL_TO_FULL: u8 = 0x80 | (1 << 2) | 3;

fn discovery_keys() -> Vec<u8> {
    text(&[
        ("InitiatorName", INITIATOR),
        ("SessionType", "Discovery"),
        ("AuthMethod", "None"),
    ])
}

fn security_keys(target: &str) -> Vec<u8> {
    text(&[
        ("InitiatorName", INITIATOR),
        ("SessionType", "Normal"),
        ("TargetName", target),
        ("AuthMethod", "None"),
    ])
}

fn operational_keys() -> Vec<u8> {
    text(&[
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxConnections", "1"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxRecvDataSegmentLength", "65536"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("MaxOutstandingR2T", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("ErrorRecoveryLevel", "0"),
    ])
}

/// A connection in the full feature phase.
struct Conn {
    s: TcpStream,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
    /// The target's MaxRecvDataSegmentLength, as it declared it.
    target_max_recv: u32,
}

/// ISIDs for the test's sessions: each its own, since a login with the ISID of an open session
/// reinstates (closes) that session.
static NEXT_ISID: AtomicU16 = AtomicU16::new(100);

/// Logs in to `target` with AuthMethod=None through the security and operational stages. On refusal:
/// the Login Response's status, and the connection.
fn login(s: TcpStream, target: &str) -> Result<Conn, ((u8, u8), TcpStream)> {
    login_keys(s, &security_keys(target))
}

/// A discovery session's login (no target named, so no slot's authorisation involved).
fn discovery_login(s: TcpStream) -> Conn {
    login_keys(s, &discovery_keys())
        .unwrap_or_else(|(st, _)| panic!("discovery login refused: {st:?}"))
}

/// [`login`] with the security stage's keys given.
fn login_keys(mut s: TcpStream, security: &[u8]) -> Result<Conn, ((u8, u8), TcpStream)> {
    let isid = NEXT_ISID.fetch_add(1, Ordering::Relaxed);
    let first = login_request(SECURITY_TO_OPERATIONAL, isid, 0, 1, 0);
    s.write_all(&wire(first, security)).unwrap();
    let r = recv(&mut s).expect("security stage response");
    assert_eq!(r.opcode(), LOGIN_RESPONSE, "{r:?}");
    assert_eq!(get32(&r.bhs, 16), get32(&first, 16), "ITT echoed");
    if r.login_status().0 != 0 {
        return Err((r.login_status(), s));
    }
    assert_eq!(r.bhs[1], SECURITY_TO_OPERATIONAL, "transit to operational");
    assert_eq!(key(&r.data, "AuthMethod").as_deref(), Some("None"));
    let stat_sn = get32(&r.bhs, 24);
    let second = login_request(OPERATIONAL_TO_FULL, isid, 0, 1, stat_sn.wrapping_add(1));
    s.write_all(&wire(second, &operational_keys())).unwrap();
    let r = recv(&mut s).expect("operational stage response");
    assert_eq!(r.opcode(), LOGIN_RESPONSE, "{r:?}");
    if r.login_status().0 != 0 {
        return Err((r.login_status(), s));
    }
    assert_eq!(r.bhs[1] & 0x83, 0x83, "transit to full feature: {r:?}");
    assert_ne!(get16(&r.bhs, 14), 0, "a new session gets a TSIH");
    assert_eq!(key(&r.data, "HeaderDigest").as_deref(), Some("None"));
    let target_max_recv = key(&r.data, "MaxRecvDataSegmentLength")
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192);
    Ok(Conn {
        s,
        // The first command after login carries the login's CmdSN (RFC 7143 4.2.2.1).
        cmd_sn: 1,
        exp_stat_sn: get32(&r.bhs, 24).wrapping_add(1),
        itt: 1,
        target_max_recv,
    })
}

/// How a command ended.
#[derive(Debug)]
enum Answer {
    /// SCSI status, with the iSCSI response code, sense data and the data read.
    Status(Status),
    /// A Reject: its reason and the header it carries back.
    Reject(u8, Vec<u8>),
}

#[derive(Debug)]
struct Status {
    response: u8,
    status: u8,
    sense: Vec<u8>,
    data: Vec<u8>,
}

impl Answer {
    fn status(self) -> Status {
        match self {
            Answer::Status(s) => s,
            Answer::Reject(reason, _) => panic!("rejected (reason {reason:#04x})"),
        }
    }
}

impl Status {
    /// Sense key and additional sense code, from fixed (70h/71h) or descriptor (72h/73h) sense data.
    fn key_asc(&self) -> (u8, u8) {
        let s = &self.sense;
        assert!(s.len() >= 3, "no sense data: {self:?}");
        match s[0] & 0x7F {
            0x70 | 0x71 if s.len() >= 13 => (s[2] & 0x0F, s[12]),
            0x72 | 0x73 => (s[1] & 0x0F, s[2]),
            _ => panic!("sense data of unknown format: {s:02x?}"),
        }
    }
}

impl Conn {
    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// A SCSI Command (RFC 7143 11.3) on LUN 0 with `rw` the R (0x40) and W (0x20) bits, all its data
    /// as immediate data, F set; then its answer.
    fn command(&mut self, rw: u8, cdb: &[u8], expected: u32, data: &[u8]) -> Answer {
        let mut b = [0u8; 48];
        b[0] = SCSI_COMMAND;
        b[1] = 0x80 | rw | 0x01; // F, R/W, ATTR simple
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, expected);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        let itt = self.itt;
        self.itt += 1;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&wire(b, data));
        self.answer(itt)
    }

    /// Data-In PDUs and a status (in the last Data-In or a SCSI Response), or a Reject.
    fn answer(&mut self, itt: u32) -> Answer {
        let mut data = Vec::new();
        loop {
            let r = recv(&mut self.s).expect("an answer to the command");
            match r.opcode() {
                DATA_IN => {
                    assert_eq!(get32(&r.bhs, 16), itt, "Data-In for our task");
                    let offset = get32(&r.bhs, 40) as usize;
                    assert_eq!(offset, data.len(), "Data-In in order");
                    data.extend_from_slice(&r.data);
                    if r.bhs[1] & 0x01 != 0 {
                        self.exp_stat_sn = get32(&r.bhs, 24).wrapping_add(1);
                        return Answer::Status(Status {
                            response: 0,
                            status: r.bhs[3],
                            sense: Vec::new(),
                            data,
                        });
                    }
                }
                SCSI_RESPONSE => {
                    assert_eq!(get32(&r.bhs, 16), itt, "response to our task");
                    self.exp_stat_sn = get32(&r.bhs, 24).wrapping_add(1);
                    let sense = if r.data.len() >= 2 {
                        let n = usize::from(get16(&r.data, 0));
                        r.data[2..(2 + n).min(r.data.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return Answer::Status(Status {
                        response: r.bhs[2],
                        status: r.bhs[3],
                        sense,
                        data,
                    });
                }
                REJECT => return Answer::Reject(r.bhs[2], r.data),
                R2T => panic!("R2T although all data went as immediate data: {r:?}"),
                _ => panic!("unexpected PDU: {r:?}"),
            }
        }
    }

    /// An immediate PDU of `opcode` (header fields as a NOP-Out would have them) and the answer.
    fn immediate(&mut self, opcode: u8, data: &[u8]) -> Rx {
        let mut b = [0u8; 48];
        b[0] = IMMEDIATE | opcode;
        b[1] = 0x80;
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, 0xFFFF_FFFF);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        self.itt += 1;
        self.send(&wire(b, data));
        recv(&mut self.s).expect("an answer")
    }

    /// A NOP-Out ping: true when a NOP-In with the same data answers it, false when the connection
    /// turns out to be closed.
    fn try_ping(&mut self) -> bool {
        let mut b = [0u8; 48];
        b[0] = IMMEDIATE | NOP_OUT;
        b[1] = 0x80;
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, 0xFFFF_FFFF);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        self.itt += 1;
        if self.s.write_all(&wire(b, b"ping")).is_err() {
            return false;
        }
        match recv(&mut self.s) {
            Ok(r) => {
                assert_eq!((r.opcode(), &r.data[..]), (NOP_IN, &b"ping"[..]), "{r:?}");
                self.exp_stat_sn = get32(&r.bhs, 24).wrapping_add(1);
                true
            }
            Err(e) if timed_out(&e) => panic!("no answer to a ping"),
            Err(_) => false,
        }
    }

    /// A NOP-Out ping answered by a NOP-In with the same data: the connection works.
    fn ping(&mut self) {
        assert!(self.try_ping(), "the connection was closed");
    }

    fn logout(mut self) {
        let mut b = [0u8; 48];
        b[0] = IMMEDIATE | LOGOUT;
        b[1] = 0x80; // reason 0: close the session
        put32(&mut b, 16, self.itt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        self.send(&wire(b, &[]));
        let r = recv(&mut self.s).expect("logout response");
        assert_eq!((r.opcode(), r.bhs[2]), (LOGOUT_RESPONSE, 0), "{r:?}");
        until_closed(&mut self.s, "after logout");
    }
}

// ---- CDBs (SBC-3) ----

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    c
}

fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0x88, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn write16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = read16(lba, blocks);
    c[0] = 0x8A;
    c
}

fn read_capacity16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    c
}

const READ: u8 = 0x40;
const WRITE: u8 = 0x20;

/// CHECK CONDITION, ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (ASC 21h).
fn assert_lba_out_of_range(a: Answer, what: &str) {
    let st = match a {
        Answer::Status(s) => s,
        Answer::Reject(r, _) => panic!("{what}: rejected (reason {r:#04x}) instead of a status"),
    };
    assert_eq!(st.response, 0, "{what}: command completed at target");
    assert_eq!(st.status, 0x02, "{what}: CHECK CONDITION: {st:?}");
    assert!(st.data.is_empty(), "{what}: no data with an error");
    assert_eq!(
        st.key_asc(),
        (0x05, 0x21),
        "{what}: ILLEGAL REQUEST / LBA OUT OF RANGE"
    );
}

// ---- the cases ----

/// (a) A full login (security and operational stages, AuthMethod=None), READ CAPACITY(16), READ(16),
/// WRITE(16) and read back, logout.
#[test]
fn a_full_login_then_reads_and_writes() {
    let c = Corral::start();
    let mut s = c.login(&iqn("db.0"));
    assert_eq!(s.target_max_recv, 262_144, "the target declares its limit");
    let cap = s.command(READ, &read_capacity16(), 32, &[]).status();
    assert_eq!(cap.status, 0, "{cap:?}");
    assert_eq!(
        u64::from_be_bytes(cap.data[..8].try_into().unwrap()),
        BLOCKS - 1,
        "last LBA"
    );
    assert_eq!(get32(&cap.data, 8), 512, "block length");
    let r = s.command(READ, &read16(0, 8), 4096, &[]).status();
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(r.data, pattern_range(0, 4096));
    let r = s
        .command(WRITE, &write16(100, 1), 512, &[0x5A; 512])
        .status();
    assert_eq!(r.status, 0, "{r:?}");
    let r = s.command(READ, &read16(99, 3), 1536, &[]).status();
    assert_eq!(&r.data[..512], &pattern_range(99 * 512, 512)[..]);
    assert_eq!(&r.data[512..1024], &[0x5A; 512][..]);
    assert_eq!(&r.data[1024..], &pattern_range(101 * 512, 512)[..]);
    s.ping();
    s.logout();
    c.log_is_clean();
}

/// (b) Truncated PDUs: a BHS cut short, a data segment shorter than its header says, in the login phase
/// and in the full feature phase, each followed by the client closing its side. The server ends those
/// connections and serves a fresh one; one left hanging half-sent does not hold up anybody else.
#[test]
fn b_truncated_pdus() {
    let c = Corral::start();
    let login_pdu = wire(
        login_request(SECURITY_TO_OPERATIONAL, 1, 0, 1, 0),
        &security_keys(&iqn("db.0")),
    );
    // Login phase: 20 bytes of a BHS.
    let mut s = c.connect();
    s.write_all(&login_pdu[..20]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let got = until_closed(&mut s, "BHS cut at 20 bytes");
    assert!(got.is_empty(), "no answer to half a header: {got:?}");
    // Login phase: a whole BHS whose data segment stops half way.
    let mut s = c.connect();
    s.write_all(&login_pdu[..48 + 30]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let got = until_closed(&mut s, "login text cut short");
    assert!(got.is_empty(), "no answer to half a PDU: {got:?}");
    // Login phase: the header alone, declaring 200 bytes that never come.
    let mut s = c.connect();
    s.write_all(&declare(
        login_request(SECURITY_TO_OPERATIONAL, 1, 0, 1, 0),
        200,
    ))
    .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    until_closed(&mut s, "login data never sent");

    // Full feature phase: a SCSI Command BHS cut at 30 bytes.
    let mut s = c.login(&iqn("db.0"));
    let mut cmd = [0u8; 48];
    cmd[0] = SCSI_COMMAND;
    cmd[1] = 0x80 | READ;
    put32(&mut cmd, 20, 512);
    put32(&mut cmd, 24, s.cmd_sn);
    cmd[32..48].copy_from_slice(&read16(0, 1));
    s.send(&cmd[..30]);
    s.s.shutdown(Shutdown::Write).unwrap();
    let got = until_closed(&mut s.s, "SCSI Command cut at 30 bytes");
    assert!(
        got.iter().all(|r| r.opcode() != DATA_IN),
        "half a command is not run: {got:?}"
    );
    // Full feature phase: a NOP-Out declaring 1000 bytes of ping data, 100 sent.
    let mut s = c.login(&iqn("db.0"));
    let mut nop = [0u8; 48];
    nop[0] = IMMEDIATE | NOP_OUT;
    nop[1] = 0x80;
    put32(&mut nop, 16, 77);
    put32(&mut nop, 20, 0xFFFF_FFFF);
    put32(&mut nop, 24, s.cmd_sn);
    s.send(&declare(nop, 1000));
    s.send(&[0xEE; 100]);
    s.s.shutdown(Shutdown::Write).unwrap();
    let got = until_closed(&mut s.s, "NOP-Out data cut short");
    assert!(
        got.iter().all(|r| r.opcode() != NOP_IN),
        "half a ping is not answered: {got:?}"
    );
    // A WRITE whose immediate data stops half way: nothing is written.
    let mut s = c.login(&iqn("db.0"));
    let mut w = [0u8; 48];
    w[0] = SCSI_COMMAND;
    w[1] = 0x80 | WRITE;
    put32(&mut w, 16, 5);
    put32(&mut w, 20, 1024);
    put32(&mut w, 24, s.cmd_sn);
    w[32..48].copy_from_slice(&write16(300, 2));
    s.send(&declare(w, 1024));
    s.send(&[0xCC; 700]);
    s.s.shutdown(Shutdown::Write).unwrap();
    until_closed(&mut s.s, "WRITE data cut short");

    // A connection left hanging in the middle of a PDU holds up nobody else.
    let mut hanging = c.login(&iqn("db.0"));
    hanging.send(&cmd[..17]);
    c.still_serves();
    drop(hanging);

    let mut s = c.login(&iqn("db.0"));
    let r = s.command(READ, &read16(300, 2), 1024, &[]).status();
    assert_eq!(
        r.data,
        pattern_range(300 * 512, 1024),
        "the cut write wrote nothing"
    );
    c.still_serves();
    c.log_is_clean();
}

/// (c) Data segments longer than the receiver declared: 16 MiB - 1 (the largest the 24-bit field holds)
/// and one word over the limit, in the login phase (8192, the default, RFC 7143 13.12) and in the full
/// feature phase (the target's declared MaxRecvDataSegmentLength). The connection is refused from the
/// header alone (the test never sends the 16 MiB) and the server serves the rest; the full feature phase
/// violations are counted as malformed.
#[test]
fn c_oversized_data_segments() {
    let c = Corral::start();
    // A session that is open throughout: it must be unaffected.
    let mut bystander = c.login(&iqn("db.0"));

    // Login phase, 16 MiB - 1 declared, header only: answered at once (a Reject or a login reject) and
    // closed; a server that waited for the data would time out this read.
    let mut s = c.connect();
    s.write_all(&declare(
        login_request(SECURITY_TO_OPERATIONAL, 1, 0, 1, 0),
        0xFF_FFFF,
    ))
    .unwrap();
    let got = until_closed(&mut s, "16 MiB login PDU");
    assert!(
        got.iter()
            .all(|r| r.opcode() == REJECT || (r.opcode() == LOGIN_RESPONSE && r.bhs[36] != 0)),
        "only a refusal: {got:?}"
    );
    // Login phase, 8196 bytes of text (one word over the 8192 a login PDU may carry), all sent.
    let mut s = c.connect();
    let mut big = security_keys(&iqn("db.0"));
    big.extend_from_slice(b"X-org.example.Padding=");
    big.resize(8195, b'a');
    big.push(0);
    s.write_all(&wire(
        login_request(SECURITY_TO_OPERATIONAL, 2, 0, 1, 0),
        &big,
    ))
    .unwrap();
    let got = until_closed(&mut s, "8196-byte login PDU");
    assert!(
        got.iter()
            .all(|r| r.opcode() != LOGIN_RESPONSE || r.bhs[36] != 0),
        "not logged in: {got:?}"
    );

    let malformed = c.metric("corral_iscsi_malformed_total");
    // Full feature phase, 16 MiB - 1 declared on a NOP-Out, header only.
    let mut s = c.login(&iqn("db.0"));
    let mut nop = [0u8; 48];
    nop[0] = IMMEDIATE | NOP_OUT;
    nop[1] = 0x80;
    put32(&mut nop, 16, 9);
    put32(&mut nop, 20, 0xFFFF_FFFF);
    put32(&mut nop, 24, s.cmd_sn);
    s.send(&declare(nop, 0xFF_FFFF));
    let got = until_closed(&mut s.s, "16 MiB NOP-Out");
    assert!(
        got.iter().all(|r| r.opcode() == REJECT),
        "only a Reject: {got:?}"
    );
    if let Some(r) = got.first() {
        assert_eq!(r.bhs[2], 0x04, "Reject reason: protocol error");
        assert_eq!(&r.data[..8], &declare(nop, 0xFF_FFFF)[..8], "our header");
    }
    // Full feature phase, one word over what the target declared, data and all.
    let mut s = c.login(&iqn("db.0"));
    let over = s.target_max_recv + 4;
    let mut w = [0u8; 48];
    w[0] = SCSI_COMMAND;
    w[1] = 0x80 | WRITE;
    put32(&mut w, 16, 3);
    put32(&mut w, 20, over);
    put32(&mut w, 24, s.cmd_sn);
    w[32..48].copy_from_slice(&write16(400, over.div_ceil(512)));
    let _ = s.s.write_all(&wire(w, &vec![0xDD; over as usize]));
    let got = until_closed(&mut s.s, "data segment over MaxRecvDataSegmentLength");
    assert!(
        got.iter().all(|r| r.opcode() == REJECT),
        "only a Reject, the write not run: {got:?}"
    );

    // Everyone else is still served; nothing of the refused write reached the disk.
    bystander.ping();
    let r = bystander.command(READ, &read16(400, 2), 1024, &[]).status();
    assert_eq!(r.data, pattern_range(400 * 512, 1024), "nothing written");
    bystander.logout();
    c.still_serves();
    c.log_is_clean();
    let after = c.metric("corral_iscsi_malformed_total");
    assert!(
        after >= malformed + 2,
        "full feature phase violations are counted: {malformed} -> {after}"
    );
}

/// (c) A SCSI WRITE whose immediate data is longer than its expected transfer length (and than what the
/// CDB moves): refused (a Reject, or an error status), nothing written, the server still serves.
#[test]
fn c_immediate_data_beyond_the_expected_length() {
    let c = Corral::start();
    let mut s = c.login(&iqn("db.0"));
    // WRITE(10) of 1 block, expected length 512, 1024 bytes of immediate data.
    let a = s.command(WRITE, &write10(200, 1), 512, &[0xAB; 1024]);
    match &a {
        Answer::Reject(reason, header) => {
            assert!(
                [0x04, 0x09].contains(reason),
                "protocol error or invalid PDU field: {reason:#04x}"
            );
            assert_eq!(header.len(), 48, "the Reject carries our header");
            assert_eq!(header[0] & 0x3F, SCSI_COMMAND);
        }
        Answer::Status(st) => assert_ne!(st.status, 0, "not GOOD: {st:?}"),
    }
    // WRITE(16) of 1 block, expected length 0, 512 bytes of immediate data.
    let a = s.command(WRITE, &write16(202, 1), 0, &[0xAB; 512]);
    if let Answer::Status(st) = &a {
        assert_ne!(st.status, 0, "not GOOD: {st:?}");
    }
    // The connection may stay (ErrorRecoveryLevel 0 allows either): when it does, it works.
    let mut s = if s.try_ping() {
        s
    } else {
        c.login(&iqn("db.0"))
    };
    let r = s.command(READ, &read16(200, 3), 1536, &[]).status();
    assert_eq!(r.data, pattern_range(200 * 512, 1536), "nothing written");
    s.logout();
    c.still_serves();
    c.log_is_clean();
}

/// One out-of-range command: what it is, R or W, CDB, expected length, data.
type Case = (&'static str, u8, Vec<u8>, u32, Vec<u8>);

/// (d) READ(10), READ(16), WRITE(10) and WRITE(16) at and beyond the last block, straddling it, and with
/// an LBA + length that wraps a u64: CHECK CONDITION, ILLEGAL REQUEST, LBA OUT OF RANGE (ASC 21h), nothing
/// written, and the connection goes on.
#[test]
fn d_out_of_range_lbas() {
    let c = Corral::start();
    let mut s = c.login(&iqn("db.0"));
    let last = BLOCKS - 1;
    let cases: Vec<Case> = vec![
        (
            "READ(10) at capacity",
            READ,
            read10(BLOCKS as u32, 1),
            512,
            vec![],
        ),
        (
            "READ(10) straddling the end",
            READ,
            read10(last as u32, 2),
            1024,
            vec![],
        ),
        (
            "READ(10) at LBA 2^32-1",
            READ,
            read10(u32::MAX, 1),
            512,
            vec![],
        ),
        ("READ(16) at capacity", READ, read16(BLOCKS, 1), 512, vec![]),
        (
            "READ(16) straddling the end",
            READ,
            read16(last, 8),
            4096,
            vec![],
        ),
        (
            "READ(16) at 2^55 (byte offset past 2^64)",
            READ,
            read16(1 << 55, 1),
            512,
            vec![],
        ),
        (
            "READ(16) wrapping u64",
            READ,
            read16(u64::MAX - 1, 4),
            2048,
            vec![],
        ),
        (
            "READ(16) at u64::MAX",
            READ,
            read16(u64::MAX, 1),
            512,
            vec![],
        ),
        (
            "WRITE(10) at LBA 2^32-1",
            WRITE,
            write10(u32::MAX, 1),
            512,
            vec![0x11; 512],
        ),
        (
            "WRITE(16) at capacity",
            WRITE,
            write16(BLOCKS, 1),
            512,
            vec![0x11; 512],
        ),
        (
            "WRITE(16) straddling the end",
            WRITE,
            write16(last, 2),
            1024,
            vec![0x11; 1024],
        ),
        (
            "WRITE(16) wrapping u64",
            WRITE,
            write16(u64::MAX, 2),
            1024,
            vec![0x11; 1024],
        ),
        (
            "WRITE(16) at 2^55",
            WRITE,
            write16(1 << 55, 1),
            512,
            vec![0x11; 512],
        ),
    ];
    for (what, rw, cdb, expected, data) in cases {
        let a = s.command(rw, &cdb, expected, &data);
        assert_lba_out_of_range(a, what);
        s.ping();
    }
    // The last block is whole and readable; the straddling write wrote nothing.
    let r = s.command(READ, &read16(last, 1), 512, &[]).status();
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(r.data, pattern_range(last * 512, 512));
    s.logout();
    c.still_serves();
    c.log_is_clean();
}

/// (e) Logins to targets that are not the initiator's: another node's slot (from either side), a slot with
/// no node, a slot beyond the cluster's max, a cluster that does not exist, and names that are not
/// corral's targets. RFC 7143 11.13.5: status class 2 (initiator error), detail 02h (authorization
/// failure: not allowed access to the target) or 03h (not found); the connection closes after the
/// Login Response; each refusal is counted.
#[test]
fn e_logins_to_targets_of_others() {
    let c = Corral::start();
    let refused = c.metric("corral_iscsi_refused_total");
    // Node 2 asks for its script from 127.0.0.2 and fills db/1.
    let boot2 = || {
        run(
            "curl",
            &[
                "-s",
                "-S",
                "-f",
                "--interface",
                NODE2,
                &format!(
                    "http://127.0.0.1:{}/boot/52-54-00-00-00-02?buildarch=x86_64",
                    c.http
                ),
            ],
        )
    };
    let mut two_nodes = false;
    let mut last = (0, String::new(), String::new());
    for _ in 0..20 {
        last = boot2();
        if last.0 == 0 && last.1.contains("slot=db/1") {
            two_nodes = true;
            break;
        }
        if last.0 != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        two_nodes,
        "a boot request from {NODE2} did not fill db/1 ({last:?})"
    );
    let refuse =
        |from: &str, target: &str, want: (u8, u8)| match login(connect_from(c.iscsi, from), target)
        {
            Ok(_) => panic!("{from} logged in to {target}"),
            Err((st, mut s)) => {
                assert_eq!(st, want, "{from} → {target}: status class/detail");
                let got = until_closed(&mut s, &format!("refused login to {target}"));
                assert!(got.is_empty(), "nothing after the login reject: {got:?}");
            }
        };
    const FORBIDDEN: (u8, u8) = (0x02, 0x02);
    const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    let mut n = 0;
    refuse(NODE1, &iqn("db.1"), FORBIDDEN);
    refuse(NODE2, &iqn("db.0"), FORBIDDEN);
    n += 2;
    // Node 2 may log in to its own.
    let mut own = login(connect_from(c.iscsi, NODE2), &iqn("db.1"))
        .unwrap_or_else(|(st, _)| panic!("node 2's own slot: {st:?}"));
    let r = own.command(READ, &read16(0, 1), 512, &[]).status();
    assert_eq!(r.data, pattern_range(0, 512));
    own.logout();
    refuse(NODE1, &iqn("db.2"), FORBIDDEN);
    refuse(NODE1, &iqn("db.9"), NOT_FOUND);
    refuse(NODE1, &iqn("web.0"), NOT_FOUND);
    refuse(NODE1, &iqn("db"), NOT_FOUND);
    refuse(NODE1, &iqn("base.base"), NOT_FOUND);
    refuse(NODE1, "iqn.1999-01.com.example:storage.disk1", NOT_FOUND);
    refuse(NODE1, "not-a-target-name", NOT_FOUND);
    n += 7;
    // A host that is no node at all, to node 1's slot.
    refuse("127.0.0.3", &iqn("db.0"), FORBIDDEN);
    n += 1;
    c.still_serves();
    c.log_is_clean();
    let after = c.metric("corral_iscsi_refused_total");
    assert!(
        after >= refused + n,
        "refused logins are counted: {refused} -> {after}, {n} refused"
    );
}

/// (f) PDUs out of place. Before login (RFC 7143 6.3: "A target receiving any PDU except a Login
/// request before the Login Phase is started MUST immediately terminate the connection"): nothing is
/// run or answered (a login reject at most) and the connection closes. In the full feature phase: an
/// opcode that does not exist gets a Reject, "command not supported" (11.17.1), and the connection goes
/// on; a SNACK (ErrorRecoveryLevel 0) a Reject; a Login Request a Reject or the connection closed.
#[test]
fn f_pdus_out_of_place() {
    let c = Corral::start();
    let first_pdus: Vec<(&str, Vec<u8>)> = {
        let mut nop = [0u8; 48];
        nop[0] = IMMEDIATE | NOP_OUT;
        nop[1] = 0x80;
        put32(&mut nop, 16, 1);
        put32(&mut nop, 20, 0xFFFF_FFFF);
        let mut cmd = [0u8; 48];
        cmd[0] = SCSI_COMMAND;
        cmd[1] = 0x80 | READ;
        put32(&mut cmd, 16, 2);
        put32(&mut cmd, 20, 512);
        cmd[32..48].copy_from_slice(&read16(0, 1));
        let mut txt = [0u8; 48];
        txt[0] = IMMEDIATE | TEXT;
        txt[1] = 0x80;
        put32(&mut txt, 16, 3);
        put32(&mut txt, 20, 0xFFFF_FFFF);
        let mut logout = [0u8; 48];
        logout[0] = IMMEDIATE | LOGOUT;
        logout[1] = 0x80;
        let mut unknown = [0u8; 48];
        unknown[0] = 0x0F;
        vec![
            ("NOP-Out", wire(nop, b"hello")),
            ("SCSI READ(16)", wire(cmd, &[])),
            (
                "Text SendTargets",
                wire(txt, &text(&[("SendTargets", "All")])),
            ),
            ("Logout", wire(logout, &[])),
            ("opcode 0x0f", wire(unknown, &[])),
        ]
    };
    for (what, bytes) in &first_pdus {
        let mut s = c.connect();
        s.write_all(bytes).unwrap();
        let got = until_closed(&mut s, &format!("{what} before login"));
        assert!(
            got.iter()
                .all(|r| r.opcode() == LOGIN_RESPONSE && r.login_status().0 != 0),
            "{what} before login: nothing but a login reject: {got:?}"
        );
    }

    let mut s = c.login(&iqn("db.0"));
    // Opcodes RFC 7143 does not define (0x07-0x0f reserved) and the vendor-specific ones (0x1c-0x1e).
    for opcode in [0x07u8, 0x0F, 0x1C, 0x1E] {
        let r = s.immediate(opcode, &[]);
        assert_eq!(r.opcode(), REJECT, "opcode {opcode:#04x}: {r:?}");
        assert_eq!(
            r.bhs[2], 0x05,
            "opcode {opcode:#04x}: command not supported"
        );
        assert_eq!(get32(&r.bhs, 16), 0xFFFF_FFFF, "a Reject's ITT is reserved");
        assert_eq!(r.data.len(), 48, "the Reject carries the header");
        assert_eq!(r.data[0] & 0x3F, opcode);
        s.ping();
    }
    // A SNACK at ErrorRecoveryLevel 0.
    let r = s.immediate(SNACK, &[]);
    assert_eq!(r.opcode(), REJECT, "SNACK: {r:?}");
    s.ping();
    let r = s.command(READ, &read16(5, 1), 512, &[]).status();
    assert_eq!(r.data, pattern_range(5 * 512, 512));
    // A Login Request in the full feature phase.
    let b = login_request(SECURITY_TO_OPERATIONAL, 1, 0, s.cmd_sn, s.exp_stat_sn);
    s.send(&wire(b, &security_keys(&iqn("db.0"))));
    let got = until_closed(&mut s.s, "Login Request in the full feature phase");
    assert!(
        got.iter().all(|r| r.opcode() == REJECT),
        "a Reject at most: {got:?}"
    );

    c.still_serves();
    c.log_is_clean();
}

/// (f) Once the login phase has started, RFC 7143 6.3: "if the target receives any PDU except a Login
/// request, it MUST send a Login reject (with Status "invalid during login") and then disconnect";
/// that status is class 02h, detail 0Bh (11.13.5).
#[test]
fn f_non_login_pdu_during_login_is_invalid_during_login() {
    let c = Corral::start();
    let mut s = c.connect();
    s.write_all(&wire(
        login_request(SECURITY_TO_OPERATIONAL, 1, 0, 1, 0),
        &security_keys(&iqn("db.0")),
    ))
    .unwrap();
    let r = recv(&mut s).unwrap();
    assert_eq!((r.opcode(), r.login_status()), (LOGIN_RESPONSE, (0, 0)));
    let mut nop = [0u8; 48];
    nop[0] = IMMEDIATE | NOP_OUT;
    nop[1] = 0x80;
    put32(&mut nop, 16, 1);
    put32(&mut nop, 20, 0xFFFF_FFFF);
    put32(&mut nop, 24, 1);
    s.write_all(&wire(nop, &[])).unwrap();
    let got = until_closed(&mut s, "NOP-Out in the login phase");
    assert_eq!(got.len(), 1, "one login reject: {got:?}");
    assert_eq!(got[0].opcode(), LOGIN_RESPONSE, "{got:?}");
    c.still_serves();
    c.log_is_clean();
    assert_eq!(
        got[0].login_status(),
        (0x02, 0x0B),
        "status: initiator error, invalid during login"
    );
}

/// (e) A login that names a session (TSIH) this target never gave out, RFC 7143 11.13.5: class 02h,
/// detail 0Ah, "session does not exist" (an attempt to add a connection to a session that is not there).
#[test]
fn e_login_to_a_session_that_does_not_exist() {
    let c = Corral::start();
    let mut s = c.connect();
    s.write_all(&wire(
        login_request(SECURITY_TO_OPERATIONAL, 1, 0x4321, 1, 0),
        &security_keys(&iqn("db.0")),
    ))
    .unwrap();
    let r = recv(&mut s).unwrap();
    assert_eq!(r.opcode(), LOGIN_RESPONSE, "{r:?}");
    c.still_serves();
    c.log_is_clean();
    assert_eq!(
        r.login_status(),
        (0x02, 0x0A),
        "status: initiator error, session does not exist"
    );
}

/// (c) Protocol violations in the login phase are counted like those after it (the metric's help:
/// "iSCSI connections closed for protocol violations"), as the NBD room counts a broken handshake.
#[test]
fn c_login_phase_violations_are_counted() {
    let c = Corral::start();
    let before = c.metric("corral_iscsi_malformed_total");
    let mut s = c.connect();
    s.write_all(&declare(
        login_request(SECURITY_TO_OPERATIONAL, 1, 0, 1, 0),
        0xFF_FFFF,
    ))
    .unwrap();
    until_closed(&mut s, "16 MiB login PDU");
    c.still_serves();
    let after = c.metric("corral_iscsi_malformed_total");
    assert!(
        after > before,
        "a 16 MiB login PDU is counted as malformed: {before} -> {after}"
    );
}

/// (c) A WRITE of one block whose Expected Data Transfer Length is 4 GiB - 1: the target asks for (or
/// takes) no more than it can hold, refuses the command, or reports the residual; it must not reserve
/// the whole expected length up front. Run within 4 GiB of address space, as on a small appliance (or
/// with strict overcommit), where a 4 GiB allocation fails and would abort the whole process (DHCP,
/// HTTP, NBD and every iSCSI session with it).
#[test]
fn c_write_with_an_expected_length_of_4_gib() {
    let Some(mut c) = Corral::start_with(Some(4 << 20)) else {
        skip("corral does not start within 4 GiB of address space on this machine");
        return;
    };
    let mut bystander = c.login(&iqn("db.0"));
    let mut s = c.login(&iqn("db.0"));
    let mut b = [0u8; 48];
    b[0] = SCSI_COMMAND;
    b[1] = 0x80 | WRITE | 0x01;
    let (itt, cmd_sn) = (s.itt, s.cmd_sn);
    put32(&mut b, 16, itt);
    put32(&mut b, 20, u32::MAX);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, s.exp_stat_sn);
    b[32..48].copy_from_slice(&write16(600, 1));
    s.itt += 1;
    s.cmd_sn += 1;
    s.send(&wire(b, &[]));
    let r = recv(&mut s.s);
    if r.is_err() {
        // The connection ended: give a dying process the moment it takes to be reaped.
        for _ in 0..50 {
            if !c.alive() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(c.alive(), "corral died on a 4 GiB expected length: {}", {
        let log = std::fs::read_to_string(c.dir.join("serve.log")).unwrap_or_default();
        log.lines()
            .filter(|l| !l.starts_with(' '))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let r = r.expect("an answer to the command");
    match r.opcode() {
        R2T => {
            // Asked for data: abort the task instead of sending it (ABORT TASK, RFC 7143 11.5).
            let desired = get32(&r.bhs, 44);
            assert!(
                desired > 0 && desired <= 262_144,
                "R2T within MaxBurstLength: {desired}"
            );
            let mut tmf = [0u8; 48];
            tmf[0] = IMMEDIATE | 0x02;
            tmf[1] = 0x80 | 1;
            put32(&mut tmf, 16, s.itt);
            put32(&mut tmf, 20, itt);
            put32(&mut tmf, 24, s.cmd_sn);
            put32(&mut tmf, 28, s.exp_stat_sn);
            put32(&mut tmf, 32, cmd_sn);
            s.itt += 1;
            s.send(&wire(tmf, &[]));
            let t = recv(&mut s.s).expect("task management response");
            assert_eq!((t.opcode(), t.bhs[2]), (0x22, 0), "ABORT TASK done: {t:?}");
        }
        REJECT | SCSI_RESPONSE => {}
        _ => panic!("unexpected answer: {r:?}"),
    }
    s.ping();
    bystander.ping();
    c.still_serves();
    assert!(c.alive());
    c.log_is_clean();
}

// ---- what only holds connections (issue 15) ----

/// Sends a discovery Login Request and tells whether the connection was closed without an answer
/// (refused at the door: a connection that was taken answers a login at once).
fn closed_without_answer(mut s: TcpStream, what: &str) -> bool {
    let req = wire(
        login_request(SECURITY_TO_OPERATIONAL, 7, 0, 1, 0),
        &discovery_keys(),
    );
    // The write may already fail if the server closed first.
    let _ = s.write_all(&req);
    until_closed(&mut s, what).is_empty()
}

/// (g) More connections than max_connections_per_peer from one address, and than max_connections in
/// all: the extra ones are closed at once and counted; connections that never finish their login
/// (silent, trickling one byte at a time, or stopping after the security stage) are closed at the login
/// deadline; and a legitimate initiator is served throughout and after.
#[test]
fn g_connection_caps_and_the_login_deadline() {
    let c = Corral::start_keys(
        "max_connections = 4\nmax_connections_per_peer = 3\nlogin_timeout = 2\n",
    );
    let port = c.iscsi;
    // Three silent connections from one address are taken...
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect_from(port, NODE1)).collect();
    wait_for("three connections open", 30, || {
        c.metric("corral_iscsi_connections_open") == 3
    });
    // ...a fourth is closed at once, its login unanswered.
    assert!(
        closed_without_answer(connect_from(port, NODE1), "a fourth from one address"),
        "a fourth connection from one address was served"
    );
    assert_eq!(c.metric("corral_iscsi_refused_busy_total"), 1);
    // Another address has places of its own, up to the total of 4.
    let mut other = discovery_login(connect_from(port, NODE2));
    other.ping();
    assert!(
        closed_without_answer(connect_from(port, "127.0.0.3"), "beyond max_connections"),
        "a connection beyond max_connections was served"
    );
    assert_eq!(c.metric("corral_iscsi_refused_busy_total"), 2);
    assert_eq!(c.metric("corral_iscsi_connections_open"), 4);

    // The silent ones are closed at the login deadline.
    for s in &mut idle {
        let got = until_closed(s, "a connection that never logs in");
        assert!(got.is_empty(), "{got:?}");
    }
    // One login that keeps sending a byte at a time (a data segment of 8 KiB, 20 ms a byte): the
    // deadline is for the whole login, so it is closed long before it has sent it all.
    let trickler = {
        let mut s = connect_from(port, NODE1);
        std::thread::spawn(move || {
            s.write_all(&declare(
                login_request(SECURITY_TO_OPERATIONAL, 8, 0, 1, 0),
                8192,
            ))
            .unwrap();
            // Writing to a connection the server closed fails (it answers with a reset).
            (0..8192).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                s.write_all(b"x").is_err()
            })
        })
    };
    // One that passes the security stage and then says nothing more.
    let mut half = connect_from(port, NODE1);
    half.write_all(&wire(
        login_request(SECURITY_TO_OPERATIONAL, 9, 0, 1, 0),
        &discovery_keys(),
    ))
    .unwrap();
    let r = recv(&mut half).expect("the security stage's answer");
    assert_eq!((r.opcode(), r.login_status()), (LOGIN_RESPONSE, (0, 0)));
    let got = until_closed(&mut half, "a login stopped after the security stage");
    assert!(got.is_empty(), "{got:?}");
    assert!(
        trickler.join().unwrap(),
        "a trickling login was still open after 160 s of it"
    );
    wait_for("the closed connections to be counted out", 30, || {
        c.metric("corral_iscsi_connections_open") == 1
    });
    assert!(c.metric("corral_iscsi_login_timeouts_total") >= 5);

    // The session that logged in is not bound by the login deadline, and the places given back serve
    // a new login from the address that was full.
    std::thread::sleep(Duration::from_secs(3));
    other.ping();
    c.still_serves();
    other.logout();
    c.log_is_clean();
}

/// A NOP-Out answering the target's ping: ITT reserved, the ping's Target Transfer Tag, immediate.
fn answer_ping(s: &mut Conn, ping: &Rx) {
    let mut b = [0u8; 48];
    b[0] = IMMEDIATE | NOP_OUT;
    b[1] = 0x80;
    b[8..16].copy_from_slice(&ping.bhs[8..16]);
    put32(&mut b, 16, 0xFFFF_FFFF);
    put32(&mut b, 20, get32(&ping.bhs, 20));
    put32(&mut b, 24, s.cmd_sn);
    put32(&mut b, 28, s.exp_stat_sn);
    s.send(&wire(b, &[]));
}

fn is_ping(r: &Rx) -> bool {
    r.opcode() == NOP_IN && get32(&r.bhs, 16) == 0xFFFF_FFFF && get32(&r.bhs, 20) != 0xFFFF_FFFF
}

/// (h) A silent initiator in the full feature phase is pinged (NOP-In asking for an answer); one that
/// answers stays, one that does not is closed and counted.
#[test]
fn h_a_silent_initiator_is_pinged_and_closed_if_it_does_not_answer() {
    let c = Corral::start_keys("idle_timeout = 1\nping_timeout = 1\n");
    let mut s = discovery_login(c.connect());
    let ping = recv(&mut s.s).expect("a ping after a silence");
    assert!(is_ping(&ping), "a NOP-In ping: {ping:?}");
    answer_ping(&mut s, &ping);
    // Still served: SendTargets gets its answer (answering any ping on the way).
    let mut txt = [0u8; 48];
    txt[0] = TEXT;
    txt[1] = 0x80;
    put32(&mut txt, 16, s.itt);
    put32(&mut txt, 20, 0xFFFF_FFFF);
    put32(&mut txt, 24, s.cmd_sn);
    put32(&mut txt, 28, s.exp_stat_sn);
    s.itt += 1;
    s.cmd_sn += 1;
    s.send(&wire(txt, &text(&[("SendTargets", "All")])));
    loop {
        let r = recv(&mut s.s).expect("the SendTargets answer");
        if is_ping(&r) {
            answer_ping(&mut s, &r);
            continue;
        }
        assert_eq!(r.opcode(), 0x24, "Text Response: {r:?}");
        break;
    }
    assert_eq!(c.metric("corral_iscsi_idle_closed_total"), 0);
    // Silent again, and this time the ping goes unanswered: closed.
    let ping = recv(&mut s.s).expect("another ping");
    assert!(is_ping(&ping), "{ping:?}");
    let got = until_closed(&mut s.s, "an unanswered ping");
    assert!(got.iter().all(is_ping), "{got:?}");
    assert_eq!(c.metric("corral_iscsi_idle_closed_total"), 1);
    // (No SCSI session here: with a ping after every second of silence, a test initiator that does
    // not expect one could meet it between two commands.)
    c.log_is_clean();
}
