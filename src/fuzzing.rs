//! Entry points of the cargo-fuzz targets in `fuzz/`, kept in the library so that the fuzz targets and
//! `tests/fuzz_corpora.rs` (which replays every committed corpus and regression input on the stable
//! toolchain) run the very same code and cannot drift apart.
//!
//! Each entry takes arbitrary bytes, runs them through the same calls the servers make on untrusted input,
//! and asserts what must hold for any input: no panic, paths inside their root, replies that are well
//! formed, diagnostics with a position. A failed assertion is a panic, which the fuzzer reports as a crash.
//! Not part of corral's API.
#![doc(hidden)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::{Config, DhcpMode, Diagnostics};
use crate::dhcp::core::{self as dhcp, Dest, Port, Responder, Settings};
use crate::dhcp::leases::Pool;
use crate::domain::Mac;
use crate::tftp::core::{self as tftp, Limits, Packet, Step, Transfer};

/// A target's entry: bytes in, a panic on anything that must not happen.
pub type Entry = fn(&[u8]);

/// Every target, by the name of its fuzz/ binary and corpus directory.
pub const TARGETS: &[(&str, Entry)] = &[
    ("dhcp", dhcp),
    ("tftp_packet", tftp_packet),
    ("tftp_transfer", tftp_transfer),
    ("http_request", http_request),
    ("agent_json", agent_json),
    ("policy_toml", policy_toml),
    ("config_toml", config_toml),
];

/// The boot network of the DHCP target: one config, as an operator writes it, for each mode.
const DHCP_CONFIG: &str = r#"
[server]
interface = "fuzz0"
address = "10.77.0.1"
[dhcp]
mode = "MODE"
subnet = "10.77.0.0/24"
range = ["10.77.0.100", "10.77.0.104"]
router = "10.77.0.1"
dns = ["10.77.0.1"]
domain = "boot.example"
lease_time = 3600
offer_hold = 30
no_pxedhcp = true
[[dhcp.reservation]]
mac = "52:54:00:00:00:01"
address = "10.77.0.10"
hostname = "node01"
"#;

fn dhcp_config(mode: &str) -> Config {
    let text = DHCP_CONFIG.replace("MODE", mode);
    Config::parse(&text, Path::new("/nonexistent/corral.toml"))
        .unwrap_or_else(|e| panic!("the fuzz target's own {mode} config: {e}"))
}

/// The pool as the DHCP server builds it from the config.
fn pool_of(cfg: &Config) -> Option<Pool> {
    let [a, b] = cfg.dhcp.range?;
    let reservations = cfg
        .dhcp
        .reservation
        .iter()
        .filter_map(|r| Some((Mac::parse(&r.mac)?, r.address, r.hostname.clone())))
        .collect();
    Some(Pool::new(a, b, reservations))
}

/// Splits `data` into up to `max` frames, each `[header byte][u16 length][bytes]`; the last frame takes
/// what is left when its length runs past the end.
fn frames(mut data: &[u8], max: usize) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 3 && out.len() < max {
        let h = data[0];
        let len = u16::from_be_bytes([data[1], data[2]]) as usize;
        let end = (3 + len).min(data.len());
        out.push((h, &data[3..end]));
        data = &data[end..];
    }
    out
}

/// DHCP: a sequence of datagrams (see [`frames`]; header bit 0: arrived on 4011, bits 1-3: how far the
/// clock moves first, bit 4: the node has a fixed slot address, bit 5: the source is a configured address)
/// decoded and decided by a full and a ProxyDHCP responder, each fresh, built once from a config.
pub fn dhcp(data: &[u8]) {
    static CONFIGS: OnceLock<(Config, Config)> = OnceLock::new();
    let (full_cfg, proxy_cfg) = CONFIGS.get_or_init(|| (dhcp_config("full"), dhcp_config("proxy")));
    let mut full = Responder::new(Settings::from_config(full_cfg), pool_of(full_cfg));
    // Nodes with an even last MAC byte are "known": they may reclaim strangers' leases.
    full.known = Some(std::sync::Arc::new(|m: Mac| m.0[5] % 2 == 0));
    let mut proxy = Responder::new(Settings::from_config(proxy_cfg), None);
    let (first, last) = match full_cfg.dhcp.range {
        Some([a, b]) => (u32::from(a), u32::from(b)),
        None => unreachable!("the full config has a range"),
    };
    let reserved: Vec<Ipv4Addr> = full_cfg
        .dhcp
        .reservation
        .iter()
        .map(|r| r.address)
        .collect();
    let fixed_ip = Ipv4Addr::new(10, 77, 0, 60);
    let owned = |ip: Ipv4Addr| {
        (first..=last).contains(&u32::from(ip)) || reserved.contains(&ip) || ip == fixed_ip
    };
    let mut now: u64 = 1_700_000_000;
    for (h, bytes) in frames(data, 32) {
        now += [0, 1, 29, 31, 59, 61, 601, 3601][(h >> 1 & 7) as usize];
        let Some(msg) = dhcp::decode(bytes) else {
            continue;
        };
        let port = if h & 1 == 1 { Port::Pxe } else { Port::Dhcp };
        let fixed = (h & 0x10 != 0).then_some(fixed_ip);
        let src = if h & 0x20 != 0 {
            SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 101), 68)
        } else {
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
        };
        let mac =
            Mac::from_slice(msg.chaddr()).expect("decode keeps only 6-byte hardware addresses");
        let kind = dhcp::ClientKind::of(&msg);
        for (mode, r) in [(DhcpMode::Full, &mut full), (DhcpMode::Proxy, &mut proxy)] {
            let out = r.handle(&msg, port, src, now, fixed);
            if let Some(s) = out.seen {
                assert_eq!(s.mac, mac, "a sighting names the sender");
            }
            for c in &out.changes {
                let ip = match c {
                    crate::domain::LeaseChange::Put(r) => r.ip,
                    crate::domain::LeaseChange::Remove(ip) => *ip,
                };
                assert!(owned(ip), "{mode:?}: lease change outside the pool: {c:?}");
            }
            let Some(reply) = out.reply else { continue };
            let m = &reply.msg;
            assert_eq!(m.opcode(), dhcproto::v4::Opcode::BootReply);
            assert_eq!(m.xid(), msg.xid());
            assert_eq!(&m.chaddr()[..6], &mac.0[..]);
            match mode {
                DhcpMode::Proxy => {
                    // ProxyDHCP never hands out addresses, and answers only boot firmware.
                    assert_eq!(
                        m.yiaddr(),
                        Ipv4Addr::UNSPECIFIED,
                        "proxy reply with an address"
                    );
                    assert!(
                        kind.pxe || kind.http,
                        "proxy reply to a client that is not PXE/HTTP boot"
                    );
                }
                _ => {
                    let y = m.yiaddr();
                    assert!(y.is_unspecified() || owned(y), "full reply hands out {y}");
                }
            }
            if let Dest::Unicast(a) = reply.dest {
                assert!(!a.ip().is_unspecified(), "unicast reply to 0.0.0.0");
            }
            let wire = dhcp::encode(m);
            assert!(wire.len() >= 300, "reply shorter than the BOOTP minimum");
            use dhcproto::{Decodable, Decoder};
            let back = dhcproto::v4::Message::decode(&mut Decoder::new(&wire))
                .unwrap_or_else(|e| panic!("our own reply does not decode: {e}"));
            assert_eq!(back.xid(), msg.xid());
            assert_eq!(back.opts().msg_type(), m.opts().msg_type());
        }
    }
}

/// TFTP packets: parse, and for what parses, encode and parse again to the same packet; an RRQ's options
/// negotiated against two sets of limits stay within them.
pub fn tftp_packet(data: &[u8]) {
    let Ok(p) = Packet::parse(data) else { return };
    let wire = p.encode();
    assert_eq!(
        Packet::parse(&wire).as_ref(),
        Ok(&p),
        "encode/parse round trip"
    );
    if let Packet::Rrq { options, .. } = &p {
        for lim in [LIMITS, SMALL_LIMITS] {
            let n = tftp::negotiate(options, 123_456, &lim);
            check_negotiated(&n, &lim);
        }
    }
}

const LIMITS: Limits = Limits {
    max_blksize: 65464,
    max_windowsize: 64,
    timeout: 1,
    retries: 5,
    max_timeout: 255,
};

const SMALL_LIMITS: Limits = Limits {
    max_blksize: 1428,
    max_windowsize: 4,
    timeout: 3,
    retries: 1,
    max_timeout: 5,
};

fn check_negotiated(n: &tftp::Negotiated, lim: &Limits) {
    assert!(
        (8..=lim.max_blksize as usize).contains(&n.blksize) || n.blksize == 512,
        "blksize {} beyond the limit",
        n.blksize
    );
    assert!(n.windowsize >= 1 && n.windowsize <= lim.max_windowsize.max(1));
    assert!(n.timeout >= Duration::from_secs(1));
    assert!(
        n.timeout <= Duration::from_secs(lim.max_timeout.max(1) as u64),
        "timeout {:?} beyond max_timeout",
        n.timeout
    );
    // What the OACK says is what was agreed.
    for (k, v) in &n.oack {
        match k.as_str() {
            "blksize" => assert_eq!(v, &n.blksize.to_string()),
            "windowsize" => assert_eq!(v, &n.windowsize.to_string()),
            "timeout" => assert_eq!(v, &n.timeout.as_secs().to_string()),
            "tsize" => {}
            other => panic!("OACK acknowledges `{other}`"),
        }
    }
}

/// TFTP transfer: byte 0-1 size the file (0..=65535 bytes), byte 2 picks the limits; then an RRQ as the
/// server would get it (a frame, see [`frames`]), then a sequence of frames, each either a packet from the
/// client (header bit 0 clear) or the deadline passing (bit 0 set); bits 1-7 move the virtual clock in
/// 100 ms steps. Every DATA sent carries the right slice of the file, every wait has a deadline, and the
/// transfer ends (done or failed) within its retries.
pub fn tftp_transfer(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let len = u16::from_be_bytes([data[0], data[1]]) as usize;
    let lim = if data[2] & 1 == 0 {
        LIMITS
    } else {
        SMALL_LIMITS
    };
    // One file, made once: building it per input cost more than the transfer.
    static FILE: OnceLock<bytes::Bytes> = OnceLock::new();
    let file = FILE
        .get_or_init(|| {
            (0..65535)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<u8>>()
                .into()
        })
        .slice(..len);
    let mut fr = frames(&data[3..], 64).into_iter();
    let Some((_, rrq)) = fr.next() else { return };
    let Ok(Packet::Rrq { options, .. }) = Packet::parse(rrq) else {
        return;
    };
    let n = tftp::negotiate(&options, len as u64, &lim);
    check_negotiated(&n, &lim);
    let mut t = Transfer::new(file.clone(), &n, &lim);
    let base = Instant::now();
    let mut now = base;
    let mut step = t.start(now);
    let mut timeouts_in_a_row = 0u32;
    // Blocks the client has seen, for checking that DATA always carries the block's bytes.
    let blocks = len / n.blksize + 1;
    let check = |step: &Step, now: Instant| match step {
        Step::Send(pkts, deadline) => {
            assert!(*deadline > now, "a deadline in the past");
            assert!(!pkts.is_empty(), "Send with nothing to send");
            assert!(
                pkts.len() <= n.windowsize as usize,
                "more than a window at once"
            );
            for p in pkts {
                match Packet::parse(p) {
                    Ok(Packet::Data { block, data }) => {
                        assert!(data.len() <= n.blksize);
                        // Files here have fewer than 65536 blocks, so the wire number is the block.
                        let b = block as usize;
                        assert!(b >= 1 && b <= blocks, "block {b} of {blocks}");
                        let start = (b - 1) * n.blksize;
                        let end = (start + n.blksize).min(len);
                        assert_eq!(
                            &data[..],
                            &file[start..end],
                            "block {b} carries other bytes"
                        );
                    }
                    Ok(Packet::Oack { options }) => assert_eq!(options, n.oack),
                    other => panic!("the server sent {other:?}"),
                }
            }
        }
        Step::Wait(deadline) => assert!(*deadline >= now, "a deadline in the past"),
        Step::Done | Step::Failed(_) => {}
    };
    check(&step, now);
    for (h, bytes) in fr {
        let deadline = match &step {
            Step::Send(_, d) | Step::Wait(d) => *d,
            Step::Done | Step::Failed(_) => return,
        };
        now += Duration::from_millis(100 * (h >> 1) as u64);
        step = if h & 1 == 1 {
            timeouts_in_a_row += 1;
            // The shell calls on_timeout only once the deadline passed.
            now = now.max(deadline);
            t.on_timeout(now)
        } else {
            timeouts_in_a_row = 0;
            if now >= deadline {
                now = deadline;
            }
            t.on_packet(bytes, now, deadline)
        };
        check(&step, now);
        if timeouts_in_a_row > lim.retries as u32 {
            assert!(
                matches!(step, Step::Failed(_)),
                "still going after {timeouts_in_a_row} timeouts in a row"
            );
        }
    }
}

/// The files under the HTTP target's root, and a secret beside it, created once.
struct Tree {
    root: PathBuf,
    canonical: PathBuf,
    _dir: PathBuf,
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let dir = std::env::temp_dir().join("corral-fuzz-http");
        let root = dir.join("root");
        let mk = |p: &Path| std::fs::create_dir_all(p).expect("fuzz tree");
        mk(&root.join("sub/deeper"));
        mk(&dir.join("outside"));
        for f in [
            "undionly.kpxe",
            "snponly.efi",
            "sub/vmlinuz",
            "sub/deeper/initrd.img",
            "a b%",
        ] {
            std::fs::write(root.join(f), b"boot file").expect("fuzz tree");
        }
        std::fs::write(dir.join("secret"), b"secret").expect("fuzz tree");
        std::fs::write(dir.join("outside/secret"), b"secret").expect("fuzz tree");
        let link = |to: &Path, at: &str| {
            let _ = std::os::unix::fs::symlink(to, root.join(at));
        };
        link(&dir.join("secret"), "escape");
        link(&dir.join("outside"), "outdir");
        link(Path::new(".."), "up");
        link(Path::new("/"), "slash");
        link(Path::new("sub/vmlinuz"), "inside");
        link(Path::new("../root/sub"), "roundabout");
        let canonical = root.canonicalize().expect("fuzz tree");
        Tree {
            root,
            canonical,
            _dir: dir,
        }
    })
}

/// HTTP: the request target (`/ipxe/<file>`, `/images/<name>/<file>`, `/boot/<mac>?facts`) parsed as
/// hyper parses it and routed as `http::route` does, up to the file on disk, which must lie inside the
/// root; then a `Range` header against a few file lengths. Input: the request target, optionally
/// followed by a NUL and the Range header's value.
pub fn http_request(data: &[u8]) {
    use crate::files::confine;
    use crate::files::http::{parse_range, RangeReq};
    let (target, range) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    if let Ok(uri) = hyper::Uri::try_from(target) {
        let path = uri.path();
        let query = uri.query().unwrap_or("");
        let t = tree();
        // Through the real routing table: whatever file parameter it extracts stays under the root.
        if let crate::http::routes::Resolved::Route(_, params) =
            crate::http::routes::resolve(&hyper::Method::GET, path)
        {
            if let Some(rel) = params.get("file") {
                let decoded = crate::http::decode_path(rel);
                if let Some(full) = confine(&t.root, &decoded) {
                    assert!(
                        full.starts_with(&t.canonical),
                        "{path:?} resolved to {full:?}, outside the root"
                    );
                    assert!(!full.ends_with("secret"), "{path:?} reached a secret");
                }
            }
            if let Some(mac) = params.get("mac") {
                let _ = Mac::parse(mac);
            }
        }
        let peer = "10.77.0.100:1234".parse().expect("address");
        let f = crate::http::facts_from_query(query, peer);
        for v in [
            &f.uuid,
            &f.serial,
            &f.manufacturer,
            &f.product,
            &f.buildarch,
            &f.platform,
        ]
        .into_iter()
        .flatten()
        {
            assert!(
                !v.is_empty() && v.chars().count() <= 128,
                "fact {v:?} not cut"
            );
            assert!(
                !v.chars().any(char::is_control),
                "fact {v:?} has control characters"
            );
        }
    }
    if let Some(h) = range.and_then(|r| std::str::from_utf8(r).ok()) {
        for len in [0u64, 1, 100, 1 << 20, u64::MAX] {
            match parse_range(h, len) {
                RangeReq::Part(a, b) => {
                    assert!(a <= b && b < len, "range {h:?} of {len}: {a}-{b}");
                }
                RangeReq::Whole | RangeReq::Unsatisfiable => {}
            }
        }
    }
}

/// Agent JSON: heartbeat and ack bodies parsed as the controller's agent API parses them, serialised and
/// parsed back to the same values; a heartbeat then goes through a health watch (every rule kind) twice.
pub fn agent_json(data: &[u8]) {
    use crate::agent::proto::{Ack, Heartbeat, HeartbeatReply, Order};
    if let Ok(hb) = serde_json::from_slice::<Heartbeat>(data) {
        let j = serde_json::to_vec(&hb).expect("a heartbeat serialises");
        let back: Heartbeat = serde_json::from_slice(&j).expect("our own heartbeat JSON parses");
        // Floats may move by an ulp through text (serde_json without float_roundtrip); the rest may not.
        let same_but_floats = |a: &Heartbeat, b: &Heartbeat| {
            Heartbeat {
                load1: 0.0,
                uptime_secs: 0.0,
                ..a.clone()
            } == Heartbeat {
                load1: 0.0,
                uptime_secs: 0.0,
                ..b.clone()
            }
        };
        assert!(
            same_but_floats(&hb, &back),
            "heartbeat round trip: {hb:?} vs {back:?}"
        );
        let u = hb.utilisation();
        assert!((0.0..=1.0).contains(&u), "utilisation {u}");
        static SPEC: OnceLock<crate::policy::HealthSpec> = OnceLock::new();
        let spec = SPEC.get_or_init(|| {
            toml::from_str(
                r#"
                heartbeat_timeout = "15s"
                slow = [
                    { metric = "load1", above = 4.0, for = "1m" },
                    { metric = "utilisation", above = 0.9, for = "1m" },
                    { metric = "mem_available_mib", below = 256.0, for = "30s" },
                    { metric = "swap_pages_per_s", above = 100.0, for = "30s" },
                    { metric = "io_sectors_per_s", above = 1e6, for = "30s" },
                ]
                "#,
            )
            .expect("the fuzz target's health spec")
        });
        let t0 = 1_700_000_000_000u64;
        let mut w = crate::health::NodeWatch::new(spec, 5, t0, 300_000);
        w.heartbeat(&Heartbeat::default(), t0);
        w.heartbeat(&hb, t0 + 5_000);
        w.heartbeat(&hb, t0 + 65_000);
        let _ = w.check(t0 + 70_000);
    }
    if let Ok(ack) = serde_json::from_slice::<Ack>(data) {
        let j = serde_json::to_vec(&ack).expect("an ack serialises");
        assert_eq!(serde_json::from_slice::<Ack>(&j).ok(), Some(ack));
    }
    if let Ok(o) = serde_json::from_slice::<Order>(data) {
        let j = serde_json::to_vec(&o).expect("an order serialises");
        assert_eq!(serde_json::from_slice::<Order>(&j).ok(), Some(o));
    }
    if let Ok(r) = serde_json::from_slice::<HeartbeatReply>(data) {
        let j = serde_json::to_vec(&r).expect("a reply serialises");
        assert_eq!(serde_json::from_slice::<HeartbeatReply>(&j).ok(), Some(r));
    }
}

/// Every diagnostic of a refused file points into it: 1-based line and column within the text (a column
/// one past the end of its line is where a missing value goes), and the message printed with them.
fn check_diagnostics(text: &str, file: &Path, d: &Diagnostics) {
    assert!(!d.0.is_empty(), "refused without a reason");
    let lines: Vec<&str> = text.split('\n').collect();
    for x in &d.0 {
        assert_eq!(x.file, file);
        assert!(
            x.line >= 1 && x.line <= lines.len(),
            "line {} of {}",
            x.line,
            lines.len()
        );
        let width = lines[x.line - 1].chars().count();
        assert!(
            x.column >= 1 && x.column <= width + 1,
            "{}:{} past its line ({width})",
            x.line,
            x.column
        );
        let shown = x.to_string();
        assert!(
            shown.starts_with(&format!("{}:{}:{}: ", file.display(), x.line, x.column)),
            "{shown:?}"
        );
    }
}

/// Policy TOML: parse and validate (every image exists); no panic, and a refusal carries positions.
pub fn policy_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/etc/corral/policy.toml");
    let images = |name: &str, _arch: Option<&str>| !name.starts_with("missing");
    if let Err(d) = crate::policy::Policy::parse(text, file, &images) {
        check_diagnostics(text, file, &d);
    }
}

/// Config TOML: parse and validate; no panic, and a refusal carries positions.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/nonexistent/corral.toml");
    if let Err(d) = Config::parse(text, file) {
        check_diagnostics(text, file, &d);
    }
}
