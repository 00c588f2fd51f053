//! A hostile boot network, end to end: four VMs boot from corral while an attacker on the same bridge tries
//! everything a host on the boot LAN can.
//!
//! The rack: cluster `db` (3 slots, each with its NBD slot disk, corral's agent heartbeating every second)
//! and cluster `san` (1 slot that firmware `sanboot`s over iSCSI with CHAP and mutual CHAP; corral generates
//! the secrets since the operator gives none). The four VMs are listed in the policy, as an operator lists
//! the rack's machines.
//!
//! The attacker, a namespace of its own on the bridge (10.N.0.50), while the VMs boot and run:
//! - fetches every node's script over and over (curl) and keeps what it gets;
//! - opens every NBD export (nbdinfo) and iSCSI target (iscsi-inq, iscsi-ls) again and again;
//! - sends DHCPDECLINE for every address of the pool, DISCOVER and REQUEST floods from 10,000 random MACs
//!   and malformed DHCP packets;
//! - claims 1,000 invented nodes over HTTP (`/boot/<random mac>`);
//! - holds 2,000 idle TCP connections each to HTTP, NBD and iSCSI;
//! - sends 10,000 TFTP RRQs (never acknowledged), a traversal corpus over TFTP and HTTP, malformed
//!   TFTP, HTTP, NBD and iSCSI bytes.
//!
//! Afterwards: every VM booted (db nodes ran their agents, the san node sanbooted and wrote its marker),
//! no agent was ever refused (it kept its first token), no failover or health failure happened, the attacker
//! received no token and no secret and opened no export, corral stayed within the bounds below, and each
//! attack shows on /metrics.
//!
//! Bounds on corral during the attack (its threads, open descriptors and peak resident memory): the rooms'
//! per-address caps (HTTP 64, NBD and iSCSI 16 by default) keep one attacker far below them.

mod common;

use corral::lab::{vm_mac, Firmware, Lab, Vm};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
const PREFIX: &str = "iqn.2026-11.io.corral";
const MAX_THREADS: u64 = 200;
const MAX_FDS: u64 = 1024;
const MAX_RSS_KIB: u64 = 512 * 1024;

use common::Rng;

/// Random MACs and garbage from [`Rng`], reproducible from a seed.
trait Attack {
    fn mac(&mut self) -> [u8; 6];
    fn bytes(&mut self, max: usize) -> Vec<u8>;
}

impl Attack for Rng {
    fn mac(&mut self) -> [u8; 6] {
        let v = self.next().to_le_bytes();
        // Locally administered, unicast: never one of the VMs' (52:54:00:...).
        [0x02, v[1], v[2], v[3], v[4], v[5]]
    }
    /// 1 to `max` random bytes.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = 1 + (self.next() as usize % max);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Runs `f` on a thread inside network namespace `ns` (setns on that thread only): its sockets are the
/// attacker's.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// Everything the attacker got back that it must not have: lines holding a secret.
#[derive(Default)]
struct Loot {
    leaks: Vec<String>,
    scripts_refused: u64,
    scripts_served: u64,
    scripts_unanswered: u64,
    nbd_opened: Vec<String>,
    iscsi_opened: Vec<String>,
    traversal_leaks: Vec<String>,
    invented_accepted: u64,
}

/// Secrets a script may carry: the agent token (kernel command line), CHAP secrets (iPXE settings), the
/// NBD PSK.
fn secret_lines(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("corral.token=")
                || l.contains("password")
                || l.contains("psk")
                || l.contains("secret")
        })
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// DHCP

fn dhcp_socket(iface: &str) -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(iface.as_bytes())).unwrap();
    let any: SocketAddr = "0.0.0.0:68".parse().unwrap();
    s.bind(&any.into()).unwrap();
    s.into()
}

fn dhcp_packet(
    kind: dhcproto::v4::MessageType,
    mac: &[u8; 6],
    xid: u32,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
) -> Vec<u8> {
    use dhcproto::{v4, Encodable, Encoder};
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = v4::Message::new_with_id(xid, u, u, u, u, mac);
    m.set_flags(v4::Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(v4::DhcpOption::MessageType(kind));
    o.insert(v4::DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    if let Some(r) = requested {
        o.insert(v4::DhcpOption::RequestedIpAddress(r));
    }
    if let Some(s) = server {
        o.insert(v4::DhcpOption::ServerIdentifier(s));
    }
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

/// DECLINE for every pool address, then DISCOVER and REQUEST from `n` random MACs, then malformed packets.
fn dhcp_attack(iface: String, subnet: u8, n: usize) -> u64 {
    use dhcproto::v4::MessageType;
    let s = dhcp_socket(&iface);
    let to: SocketAddr = "255.255.255.255:67".parse().unwrap();
    let server = Ipv4Addr::new(10, subnet, 0, 1);
    let mut rng = Rng(0x5eed_d4c9);
    let mut sent = 0u64;
    let mut send = |p: &[u8]| {
        if s.send_to(p, to).is_ok() {
            sent += 1;
        }
    };
    for last in 100..=199u8 {
        let addr = Ipv4Addr::new(10, subnet, 0, last);
        let mac = rng.mac();
        let xid = rng.next() as u32;
        send(&dhcp_packet(
            MessageType::Decline,
            &mac,
            xid,
            Some(addr),
            Some(server),
        ));
    }
    for i in 0..n {
        let mac = rng.mac();
        let xid = rng.next() as u32;
        send(&dhcp_packet(MessageType::Discover, &mac, xid, None, None));
        let addr = Ipv4Addr::new(10, subnet, 0, 100 + (rng.next() % 100) as u8);
        send(&dhcp_packet(
            MessageType::Request,
            &mac,
            xid,
            Some(addr),
            Some(server),
        ));
        if i % 50 == 0 {
            // A flood, not a burst the kernel drops before corral sees it.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Malformed: random bytes, truncated real packets, a bad cookie, an option running past the end.
    let good = dhcp_packet(MessageType::Discover, &rng.mac(), 1, None, None);
    for i in 0..500usize {
        let p = match i % 4 {
            0 => rng.bytes(600),
            1 => good[..(rng.next() as usize % good.len())].to_vec(),
            2 => {
                let mut p = good.clone();
                p[236] ^= 0xff;
                p
            }
            _ => {
                let mut p = good[..240].to_vec();
                p.extend_from_slice(&[60, 200, b'P', b'X']);
                p
            }
        };
        send(&p);
    }
    sent
}

// ---------------------------------------------------------------------------------------------------
// TFTP

fn rrq(name: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(name);
    p.push(0);
    p.extend_from_slice(b"octet\0");
    p
}

/// 10,000 RRQs from fresh ports, never acknowledged; then a traversal corpus and malformed packets,
/// whose answers must be errors. Returns the names that were answered with data.
fn tftp_attack(server: Ipv4Addr, n: usize) -> Vec<String> {
    let to = SocketAddr::from((server, 69));
    let mut rng = Rng(0x7f7e_0001);
    let mut sockets = Vec::new();
    for i in 0..n {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let _ = s.send_to(&rrq(b"undionly.kpxe"), to);
        sockets.push(s);
        // Hold a few hundred ports at a time, as many clients would.
        if sockets.len() >= 400 {
            sockets.clear();
        }
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(sockets);
    let corpus: Vec<Vec<u8>> = [
        "../../../../etc/passwd",
        "/etc/passwd",
        "..\\..\\..\\etc\\passwd",
        "a/../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "....//....//etc/passwd",
        "/../etc/shadow",
        "./../etc/hostname",
        "undionly.kpxe/../../../../etc/passwd",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([
        b"etc/passwd\0../x".to_vec(),
        vec![b'a'; 600],
        b"\xff\xfe../../etc/passwd".to_vec(),
    ])
    .collect();
    let mut served = Vec::new();
    for name in &corpus {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.send_to(&rrq(name), to);
        let mut buf = [0u8; 1024];
        if let Ok((len, _)) = s.recv_from(&mut buf) {
            // Opcode 3 (DATA) or 6 (OACK) would mean the file is served.
            if len >= 2 && (buf[1] == 3 || buf[1] == 6) {
                served.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    // Malformed: unknown opcodes, a WRQ, no terminator, an ACK and DATA out of any session.
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    for i in 0..300usize {
        let p = match i % 5 {
            0 => rng.bytes(100),
            1 => b"\x00\x02upload\x00octet\x00".to_vec(),
            2 => b"\x00\x01no-terminator".to_vec(),
            3 => b"\x00\x04\x00\x01".to_vec(),
            _ => b"\x00\x09\x00\x00".to_vec(),
        };
        let _ = s.send_to(&p, to);
    }
    served
}

// ---------------------------------------------------------------------------------------------------
// TCP: idle connections, invented nodes, traversal, malformed bytes

/// Opens up to `n` connections to `port` and holds them for `hold`; returns how many were still open at
/// the end (corral closes those beyond its caps at once, and the others at its deadlines).
fn idle_connections(server: Ipv4Addr, port: u16, n: usize, hold: Duration) -> (usize, usize) {
    let mut conns = Vec::new();
    for _ in 0..n {
        if let Ok(c) =
            TcpStream::connect_timeout(&SocketAddr::from((server, port)), Duration::from_secs(2))
        {
            conns.push(c);
        }
    }
    let opened = conns.len();
    std::thread::sleep(hold);
    let mut open = 0;
    for c in &mut conns {
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        match c.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    (opened, open)
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn http(server: Ipv4Addr, path: &str) -> (u16, String) {
    let Ok(mut c) =
        TcpStream::connect_timeout(&SocketAddr::from((server, 80)), Duration::from_secs(5))
    else {
        return (0, String::new());
    };
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// 1,000 invented nodes: `/boot/<random mac>` with made-up facts. Returns how many got a node script
/// (anything but a refusal).
fn invent_nodes(server: Ipv4Addr, n: usize) -> u64 {
    let mut rng = Rng(0x1_0000_0001);
    let mut accepted = 0;
    for _ in 0..n {
        let m = rng.mac();
        let mac = m
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let (status, _) = http(
            server,
            &format!(
                "/boot/{mac}?buildarch=x86_64&platform=pcbios&memsize=999999&manufacturer=evil"
            ),
        );
        if status == 200 {
            accepted += 1;
        }
    }
    accepted
}

/// Traversal over HTTP: every answer must be a refusal without a system file in it.
fn http_traversal(server: Ipv4Addr) -> Vec<String> {
    let mut leaks = Vec::new();
    for p in [
        "/images/../../../../etc/passwd",
        "/images/app/../../../../etc/passwd",
        "/images/app/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/images/app/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/images/%2e%2e%2f%2e%2e%2fetc/passwd",
        "/images/app/..%252f..%252fetc%252fpasswd",
        "/ipxe/../../../etc/passwd",
        "/ipxe/..%5c..%5c..%5cetc%5cpasswd",
        "/ipxe//etc/passwd",
        "/images/app/vmlinuz%00.txt",
        "/images/app/....//....//etc/passwd",
        "/boot/../api/v1/nodes",
        "/%2e%2e/%2e%2e/etc/shadow",
    ] {
        let (status, body) = http(server, p);
        if body.contains("root:") || (status == 200 && p.contains("passwd")) {
            leaks.push(format!("{p} -> {status}"));
        }
    }
    leaks
}

/// Malformed bytes to a TCP port: `n` connections of garbage (and, for HTTP, broken request lines and a
/// header block far past any limit).
fn tcp_garbage(server: Ipv4Addr, port: u16, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    for i in 0..n {
        let Ok(mut c) =
            TcpStream::connect_timeout(&SocketAddr::from((server, port)), Duration::from_secs(2))
        else {
            continue;
        };
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let p = match (port, i % 4) {
            (80, 0) => b"GARBAGE / HTTP/9.9\r\n\r\n".to_vec(),
            (80, 1) => {
                let mut h = b"GET / HTTP/1.1\r\nX: ".to_vec();
                h.extend(std::iter::repeat_n(b'a', 200_000));
                h
            }
            (80, 2) => b"GET /boot/not-a-mac?%zz%00=\xff HTTP/1.1\r\nHost: \x01\r\n\r\n".to_vec(),
            // NBD: the client flags then an option with an absurd length.
            (10809, 0) => {
                let mut p = vec![0, 0, 0, 1];
                p.extend_from_slice(b"IHAVEOPT");
                p.extend_from_slice(&7u32.to_be_bytes());
                p.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
                p
            }
            // iSCSI: a login PDU whose data segment length lies.
            (3260, 0) => {
                let mut p = vec![0u8; 48];
                p[0] = 0x43;
                p[5] = 0xff;
                p[6] = 0xff;
                p[7] = 0xff;
                p
            }
            _ => rng.bytes(2000),
        };
        let _ = c.write_all(&p);
        let mut b = [0u8; 512];
        let _ = c.read(&mut b);
    }
}

// ---------------------------------------------------------------------------------------------------
// Real clients from the attacker's namespace

fn run_in(ns: &str, program: &str, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["netns", "exec", ns, program];
    a.extend_from_slice(args);
    common::run("ip", &a)
}

/// Fetches every node's script with curl, and tries every NBD export and iSCSI target, until `stop`.
fn snoop(
    ns: String,
    server: Ipv4Addr,
    macs: Vec<String>,
    stop: Arc<AtomicBool>,
    loot: Arc<Mutex<Loot>>,
) {
    let exports = ["db/0", "db/1", "db/2", "san/0", "base", "bootdisk"];
    let targets = ["db.0", "db.1", "db.2", "san.0"];
    while !stop.load(Ordering::Relaxed) {
        for mac in &macs {
            let url = format!("http://{server}/boot/{mac}?buildarch=x86_64&platform=pcbios");
            let (_, out, _) = run_in(
                &ns,
                "curl",
                &["-s", "-m", "10", "-w", "\n%{http_code}", &url],
            );
            let (body, code) = out.rsplit_once('\n').unwrap_or((&out, ""));
            let mut l = loot.lock().unwrap();
            // 403: refused as a stranger; no answer at all: its connections were over HTTP's per-address
            // cap (the idle-connection attack holds them).
            match code {
                "403" => l.scripts_refused += 1,
                "000" => l.scripts_unanswered += 1,
                _ => l.scripts_served += 1,
            }
            for line in secret_lines(body) {
                l.leaks.push(format!("{mac}: {line}"));
            }
        }
        for e in exports {
            let uri = format!("nbd://{server}/{e}");
            let (rc, out, _) = run_in(&ns, "timeout", &["20", "nbdinfo", "--size", &uri]);
            if rc == 0 {
                loot.lock()
                    .unwrap()
                    .nbd_opened
                    .push(format!("{e}: size {}", out.trim()));
            }
        }
        let (_, listed, _) = run_in(
            &ns,
            "timeout",
            &[
                "20",
                "nbdinfo",
                "--list",
                "--json",
                &format!("nbd://{server}"),
            ],
        );
        for e in exports {
            if listed.contains(&format!("\"{e}\"")) {
                loot.lock().unwrap().nbd_opened.push(format!("{e}: listed"));
            }
        }
        for t in targets {
            let url = format!("iscsi://{server}/{PREFIX}:{t}/0");
            let (rc, out, _) = run_in(
                &ns,
                "timeout",
                &["20", "iscsi-inq", "-i", &format!("{PREFIX}:attacker"), &url],
            );
            if rc == 0 {
                loot.lock()
                    .unwrap()
                    .iscsi_opened
                    .push(format!("{t}: {}", out.trim()));
            }
        }
        let (_, listed, _) = run_in(
            &ns,
            "timeout",
            &[
                "20",
                "iscsi-ls",
                "-i",
                &format!("{PREFIX}:attacker"),
                &format!("iscsi://{server}"),
            ],
        );
        for t in targets {
            if listed.contains(&format!("{PREFIX}:{t}")) {
                loot.lock()
                    .unwrap()
                    .iscsi_opened
                    .push(format!("{t}: discovered"));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------------------
// corral's footprint

#[derive(Default, Debug, Clone, Copy)]
struct Footprint {
    threads: u64,
    fds: u64,
    rss_peak_kib: u64,
}

fn footprint(pid: u32) -> Option<Footprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Footprint {
        threads: field("Threads:"),
        fds,
        rss_peak_kib: field("VmHWM:"),
    })
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name || k.starts_with(&format!("{name}{{"))).then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

fn base_images(tmp: &Path, testos: &Path) -> (PathBuf, PathBuf) {
    let images = common::testos_catalog(
        tmp,
        &["app"],
        "console=ttyS0 panic=-1 quiet corral.slot={{cluster}}/{{slot}} corral.hostname={{hostname}} corral.disk={{disk}} corral.testos.write={{mac}} {{agent}}",
    );
    std::fs::create_dir_all(images.join("appliance")).unwrap();
    std::fs::write(
        images.join("appliance/image.toml"),
        "description = \"a whole-disk image with its own boot loader\"\nkind = \"sanboot\"\n",
    )
    .unwrap();
    let disks = common::base_disk(tmp);
    common::boot_disk(testos, &disks, "bootdisk", 64);
    (images, disks)
}

#[test]
fn a_hostile_boot_network_gets_nothing_and_the_rack_boots() {
    let Some(testos) = common::testos_for_vms() else {
        return;
    };
    for t in ["nbdinfo", "iscsi-inq", "iscsi-ls", "curl", "timeout"] {
        assert!(common::need_tools(&[t]), "{t}");
    }
    // 2,000 connections to each of three ports, held at once.
    let _ =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 16384, 16384);
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let (images, disks) = base_images(tmp.path(), &testos);

    let mut lab = Lab::new(&tmp.path().join("lab")).unwrap();
    let macs: Vec<String> = (1..=4).map(|i| vm_mac(lab.id, i)).collect();
    let mut policy = String::from(
        "[settings]\ncooldown = 0\nheartbeat_interval = \"1s\"\n\n\
         [[cluster]]\nname = \"san\"\npriority = 10\nmin = 0\nmax = 1\ndefault = 1\nimages = [\"appliance\"]\ndisk = \"bootdisk\"\n\n\
         [[cluster]]\nname = \"db\"\npriority = 5\nmin = 0\nmax = 3\ndefault = 3\nimages = [\"app\"]\ndisk = \"base\"\n\
         identity = { hostname = \"db-{n}\" }\n\
         [cluster.health]\nheartbeat_timeout = \"20s\"\non_failure = \"pool\"\n",
    );
    for m in &macs {
        policy.push_str(&format!("\n[[node]]\nmac = \"{m}\"\n"));
    }
    let policy_path = tmp.path().join("policy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    lab.disks_dir = Some(disks.clone());
    // Discovery: only MACs corral's DHCP saw, at most 50 strangers in the inventory.
    lab.extra_config = "[discovery]\nmax_unassigned = 50\n".into();
    let (attacker_ns, attacker_if) = lab.add_host("attacker", 50).unwrap();
    lab.start_corral_with(
        Path::new(env!("CARGO_BIN_EXE_corral")),
        "full",
        &images,
        &root.join("boot-scripts"),
        Some(&policy_path),
    )
    .unwrap();
    let pid = lab.corral_pid.unwrap();
    let server: Ipv4Addr = lab.server_ip().parse().unwrap();
    let subnet = lab.subnet;

    // corral's footprint, sampled throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(Footprint::default()));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(f) = footprint(pid) {
                    let mut p = peak.lock().unwrap();
                    p.threads = p.threads.max(f.threads);
                    p.fds = p.fds.max(f.fds);
                    p.rss_peak_kib = p.rss_peak_kib.max(f.rss_peak_kib);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // The attack starts before the first VM powers on and goes on while the rack boots.
    let loot = Arc::new(Mutex::new(Loot::default()));
    let snooper = {
        let (ns, macs, stop, loot) = (
            attacker_ns.clone(),
            macs.clone(),
            stop.clone(),
            loot.clone(),
        );
        std::thread::spawn(move || snoop(ns, server, macs, stop, loot))
    };
    let floods = {
        let ns = attacker_ns.clone();
        let ifc = attacker_if.clone();
        std::thread::spawn(move || {
            let dhcp = in_netns(&ns, move || dhcp_attack(ifc, subnet, 10_000));
            let tftp = in_netns(&ns, move || tftp_attack(server, 10_000));
            let invented = in_netns(&ns, move || invent_nodes(server, 1_000));
            let traversal = in_netns(&ns, move || http_traversal(server));
            let garbage: Vec<_> = [80u16, 10809, 3260]
                .into_iter()
                .map(|port| in_netns(&ns, move || tcp_garbage(server, port, 200, port as u64)))
                .collect();
            // Garbage first: while the idle connections below hold the attacker's per-address places,
            // its garbage would be refused at accept, never read.
            for g in garbage {
                g.join().unwrap();
            }
            let idle: Vec<_> = [80u16, 10809, 3260]
                .into_iter()
                .map(|port| {
                    in_netns(&ns, move || {
                        (
                            port,
                            idle_connections(server, port, 2_000, Duration::from_secs(40)),
                        )
                    })
                })
                .collect();
            let dhcp_sent = dhcp.join().unwrap();
            let tftp_served = tftp.join().unwrap();
            let invented = invented.join().unwrap();
            let traversal = traversal.join().unwrap();
            let idle: Vec<(u16, (usize, usize))> =
                idle.into_iter().map(|h| h.join().unwrap()).collect();
            (dhcp_sent, tftp_served, invented, traversal, idle)
        })
    };

    // The rack boots: the san node first (the higher-priority cluster's one slot), then db's three.
    let mut san: Vm = lab.vm("san", Firmware::Bios, &macs[0]).unwrap();
    san.wait_for("boots image appliance from iscsi:", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", common::tail(&common::lab_log(&lab), 3000)));
    let mut db: Vec<Vm> = Vec::new();
    for (i, mac) in macs[1..].iter().enumerate() {
        db.push(
            lab.vm(&format!("db{}", i + 1), Firmware::Bios, mac)
                .unwrap(),
        );
    }
    for vm in &mut db {
        let (line, s) = vm
            .wait_for("CORRAL-AGENT start", BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", common::tail(&common::lab_log(&lab), 3000)));
        eprintln!("  {}: {line} after {s:.1} s", vm.name);
    }
    let (line, _) = san.wait_for("CORRAL-DISK wrote=", BOOT_TIMEOUT).unwrap();
    eprintln!("  san: {line}");
    assert!(
        san.wait_exit(Duration::from_secs(120)),
        "the san node did not finish"
    );

    let (dhcp_sent, tftp_served, invented, traversal, idle) = floods.join().unwrap();
    // The agents keep heartbeating for a while after the floods, with the snooper still at work.
    std::thread::sleep(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    snooper.join().unwrap();
    sampler.join().unwrap();
    let peak = *peak.lock().unwrap();
    let loot = loot.lock().unwrap();

    let metrics = lab
        .run_in_server("curl", &["-s", &format!("http://{server}/metrics")])
        .unwrap();
    let nodes = common::lab_api(&lab, "/api/v1/nodes");
    let events = common::lab_events(&lab);
    eprintln!(
        "ATTACK dhcp packets {dhcp_sent}, invented nodes accepted {invented}, idle (port, opened, still open) {idle:?}, scripts refused {} served {} unanswered {}",
        loot.scripts_refused, loot.scripts_served, loot.scripts_unanswered
    );
    eprintln!(
        "FOOTPRINT corral peak: {} threads, {} fds, {} MiB resident (bounds {MAX_THREADS}, {MAX_FDS}, {} MiB); {:.0} s",
        peak.threads,
        peak.fds,
        peak.rss_peak_kib / 1024,
        MAX_RSS_KIB / 1024,
        t0.elapsed().as_secs_f64()
    );

    // Every db node booted with its agent and was never refused: it kept its first token.
    for vm in &db {
        let log = vm.log();
        for bad in [
            "heartbeat refused",
            "orders refused",
            "ack refused",
            "CORRAL-AGENT exited",
        ] {
            assert!(
                !log.contains(bad),
                "{}: `{bad}`:\n{}",
                vm.name,
                common::tail(&log, 3000)
            );
        }
        let n = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["mac"] == vm.mac))
            .unwrap_or_else(|| panic!("{} not in the inventory", vm.mac));
        assert!(
            n["heartbeat"].is_object(),
            "{}: no heartbeat on record: {n}",
            vm.name
        );
    }
    // No agent request was refused for its token (a stolen script would have rotated it).
    assert_eq!(
        metric(&metrics, "corral_agent_tokens_refused_total"),
        0.0,
        "agents were refused"
    );
    // No failover, no health failure, no move away from a slot.
    for e in &events {
        let kind = e["kind"].as_str().unwrap_or("");
        assert!(
            !(kind.starts_with("failover") || kind == "health-failed" || kind == "health-slow"),
            "unexpected event under attack: {e}"
        );
    }
    // The attacker got no secret, opened nothing, read no system file.
    assert!(loot.leaks.is_empty(), "secrets leaked: {:?}", loot.leaks);
    assert_eq!(
        loot.scripts_served, 0,
        "the attacker was served node scripts"
    );
    assert!(loot.scripts_refused > 0);
    assert!(
        loot.nbd_opened.is_empty(),
        "NBD opened: {:?}",
        loot.nbd_opened
    );
    assert!(
        loot.iscsi_opened.is_empty(),
        "iSCSI opened: {:?}",
        loot.iscsi_opened
    );
    assert!(traversal.is_empty(), "HTTP traversal: {traversal:?}");
    assert!(tftp_served.is_empty(), "TFTP traversal: {tftp_served:?}");
    assert!(loot.traversal_leaks.is_empty());
    // Invented nodes: none became a node with a script, and the inventory stayed bounded.
    assert_eq!(invented, 0, "invented nodes were served scripts");
    assert_eq!(loot.invented_accepted, 0);
    // (Invented nodes over HTTP are foreign script requests: refused before discovery, counted in
    // corral_http_scripts_refused_total. The DHCP flood's MACs are sightings, capped, not nodes.)
    let inventory = nodes.as_array().map(|a| a.len()).unwrap_or(0);
    assert_eq!(
        inventory,
        macs.len(),
        "the inventory grew to {inventory} under a flood"
    );
    // Idle connections beyond the per-address caps were closed at once; those within them at the
    // deadlines (handshake, login, header).
    for (port, (opened, still_open)) in &idle {
        assert!(
            *still_open <= 64,
            "port {port}: {still_open} of {opened} attacker connections still open"
        );
    }
    // corral stayed within its bounds.
    assert!(peak.threads <= MAX_THREADS, "{peak:?}");
    assert!(peak.fds <= MAX_FDS, "{peak:?}");
    assert!(peak.rss_peak_kib <= MAX_RSS_KIB, "{peak:?}");
    // Every attack shows on /metrics.
    for (name, what) in [
        (
            "corral_http_scripts_refused_total",
            "foreign script requests",
        ),
        (
            "corral_dhcp_declines_ignored_total",
            "DECLINEs from strangers",
        ),
        ("corral_dhcp_malformed_total", "malformed DHCP"),
        ("corral_tftp_malformed_total", "malformed TFTP"),
        (
            "corral_http_refused_busy_total",
            "HTTP connections over the cap",
        ),
        (
            "corral_nbd_refused_busy_total",
            "NBD connections over the cap",
        ),
        (
            "corral_iscsi_refused_busy_total",
            "iSCSI connections over the cap",
        ),
        ("corral_nbd_refused_total", "NBD opens refused"),
        ("corral_tftp_refused_busy_total", "the TFTP RRQ flood"),
        ("corral_http_header_timeouts_total", "idle HTTP connections"),
        (
            "corral_nbd_handshake_timeouts_total",
            "idle NBD connections",
        ),
        (
            "corral_iscsi_login_timeouts_total",
            "idle iSCSI connections",
        ),
        ("corral_iscsi_refused_total", "iSCSI logins refused"),
        ("corral_nbd_malformed_total", "malformed NBD"),
    ] {
        assert!(
            metric(&metrics, name) > 0.0,
            "{what}: {name} did not move:\n{}",
            metrics
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    eprintln!(
        "hostile LAN end to end: {:.0} s",
        t0.elapsed().as_secs_f64()
    );
}
