//! TFTP's bounds on loopback with tiny limits (max_sessions 4, max_sessions_per_peer 2, max_timeout 2,
//! retries 2): the request beyond a bound gets an ERROR from the listening port and nothing is kept for it
//! (no socket), slots come back when transfers finish, abort or go silent, a `timeout 255` request is not
//! acknowledged above max_timeout and a silent client is dropped after max_timeout × (retries + 1); the
//! counters on /metrics follow. Clients: raw UDP sockets from many ports and 127.0.0.x addresses, atftp
//! and tftp-hpa, whose transfers stay byte-identical.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use corral::tftp::core::Packet;

const RETRIES: usize = 2;

struct Tftp {
    server: common::Server,
    port: u16,
    http: u16,
    root: PathBuf,
    _tmp: tempfile::TempDir,
}

fn start() -> Tftp {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut x: u32 = 99;
    let big: Vec<u8> = (0..2 * 1024 * 1024 + 333)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(root.join("big.bin"), &big).unwrap();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = common::free_port();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"{d}/state\"\nscripts_dir = \"{s}\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nlisten = \"127.0.0.1:{port}\"\nroot = \"{r}\"\nmax_sessions = 4\nmax_sessions_per_peer = 2\ntimeout = 1\nretries = {RETRIES}\nmax_timeout = 2\n",
            d = dir.display(),
            r = root.display(),
            s = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts").display()
        ),
    )
    .unwrap();
    let server = common::start(dir, http);
    Tftp {
        server,
        port,
        http,
        root,
        _tmp: tmp,
    }
}

impl Tftp {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn metrics(&self) -> String {
        common::get(&format!("http://127.0.0.1:{}/metrics", self.http))
    }

    /// One sample's value (`name` with its labels, as written).
    fn metric(&self, name: &str) -> u64 {
        let m = self.metrics();
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not on /metrics:\n{m}"))
    }

    fn sessions(&self) -> u64 {
        self.metric("corral_tftp_sessions")
    }

    fn wait_sessions(&self, n: u64) {
        common::wait_for(&format!("{n} TFTP sessions open"), 60, || {
            self.sessions() == n
        });
    }

    /// UDP sockets the corral process holds: its socket fds that the kernel's UDP table lists.
    fn udp_sockets(&self) -> usize {
        let pid = self.server.0.id();
        let udp: std::collections::HashSet<String> = std::fs::read_to_string("/proc/net/udp")
            .unwrap()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(9).map(str::to_string))
            .collect();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().to_string();
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .filter(|inode| udp.contains(inode))
            .count()
    }
}

fn rrq(options: &[(&str, &str)]) -> Vec<u8> {
    Packet::Rrq {
        filename: "big.bin".into(),
        mode: "octet".into(),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
    .encode()
}

fn client(src: Ipv4Addr) -> UdpSocket {
    let s = UdpSocket::bind((src, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The first answer to a request: the packet and the port it came from.
fn answer(s: &UdpSocket) -> (Packet, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf).expect("an answer to the RRQ");
    (Packet::parse(&buf[..n]).unwrap(), from)
}

/// A transfer kept open as long as the test wants: it ACKs a block only when the server sends it again
/// (so it advances one block per server timeout and never finishes), and aborts with an ERROR on drop.
struct Holder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Opens a held transfer from `src`, or returns the server's ERROR message (checked to come from the
/// listening port: no transfer socket was opened for it).
fn hold(t: &Tftp, src: Ipv4Addr) -> Result<Holder, String> {
    let s = client(src);
    s.send_to(&rrq(&[]), t.addr()).unwrap();
    let (first, tid) = answer(&s);
    match first {
        Packet::Error { code, message } => {
            assert_eq!(tid, t.addr(), "a refusal comes from the listening port");
            assert_eq!(code, 0);
            return Err(message);
        }
        Packet::Data { block: 1, .. } => {}
        p => panic!("unexpected {p:?}"),
    }
    assert_ne!(tid, t.addr(), "a transfer has its own port");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = vec![0u8; 2048];
        let mut last = 1u16;
        while !flag.load(Ordering::Relaxed) {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                continue;
            };
            if from != tid {
                continue;
            }
            if let Ok(Packet::Data { block, .. }) = Packet::parse(&buf[..n]) {
                if block == last {
                    let _ = s.send_to(&Packet::Ack { block }.encode(), tid);
                } else {
                    last = block;
                }
            }
        }
        let _ = s.send_to(
            &Packet::Error {
                code: 0,
                message: "test is done".into(),
            }
            .encode(),
            tid,
        );
    });
    Ok(Holder {
        stop,
        thread: Some(thread),
    })
}

fn atftp(t: &Tftp, src: Option<Ipv4Addr>, options: &[&str]) -> (bool, Vec<u8>, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("atftp");
    cmd.args(["--trace", "-g", "-r", "big.bin", "-l"])
        .arg(out.path());
    for o in options {
        cmd.args(["--option", o]);
    }
    // atftp has no source-address option: it sends from the address routing picks (127.0.0.1).
    assert!(src.is_none());
    let o = cmd
        .arg("127.0.0.1")
        .arg(t.port.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("atftp is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (
        o.status.success(),
        std::fs::read(out.path()).unwrap_or_default(),
        text,
    )
}

/// tftp-hpa's client; it exits 0 even when the server refuses, so the caller looks at the file and the
/// output.
fn tftp_hpa(t: &Tftp) -> (Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new("tftp")
        .current_dir(dir.path())
        .args([
            "127.0.0.1",
            &t.port.to_string(),
            "-m",
            "binary",
            "-c",
            "get",
            "big.bin",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("tftp-hpa is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (
        std::fs::read(dir.path().join("big.bin")).unwrap_or_default(),
        text,
    )
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Sends one RRQ from each of `sockets` before reading any answer; returns (admitted, refusal messages).
/// Admitted transfers are left silent.
fn burst(t: &Tftp, sockets: &[UdpSocket]) -> (usize, Vec<String>) {
    for s in sockets {
        s.send_to(&rrq(&[]), t.addr()).unwrap();
    }
    let mut admitted = 0;
    let mut refused = Vec::new();
    for s in sockets {
        match answer(s) {
            (Packet::Data { block: 1, .. }, from) if from != t.addr() => admitted += 1,
            (Packet::Error { message, .. }, from) if from == t.addr() => refused.push(message),
            p => panic!("unexpected {p:?}"),
        }
    }
    (admitted, refused)
}

#[test]
fn sessions_are_bounded_in_all_and_per_peer_and_slots_come_back() {
    if !common::need_tools(&["atftp", "tftp", "curl"]) {
        return;
    }
    let t = start();
    let big = std::fs::read(t.root.join("big.bin")).unwrap();

    // Per peer: the third transfer from one address is refused, whatever its port.
    let h1 = hold(&t, ip(2)).unwrap();
    let h2 = hold(&t, ip(2)).unwrap();
    let e = hold(&t, ip(2)).err().expect("a third from 127.0.0.2");
    assert!(e.contains("from this address"), "{e}");
    assert_eq!(
        t.metric("corral_tftp_refused_busy_total{reason=\"per_peer\"}"),
        1
    );

    // In all: four open, the fifth refused (from a new address, and from a known one).
    let h3 = hold(&t, ip(3)).unwrap();
    let h4 = hold(&t, ip(4)).unwrap();
    assert_eq!(t.sessions(), 4);
    for src in [ip(5), ip(2)] {
        let e = hold(&t, src).err().expect("a fifth session");
        assert!(
            e.contains("too many transfers") && !e.contains("address"),
            "{e}"
        );
    }
    assert_eq!(
        t.metric("corral_tftp_refused_busy_total{reason=\"total\"}"),
        2
    );

    // Real clients are told, and get nothing.
    let (ok, got, out) = atftp(&t, None, &[]);
    assert!(!ok && got.is_empty(), "atftp while full: {out}");
    assert!(out.contains("server busy"), "atftp shows the error: {out}");
    let (got, out) = tftp_hpa(&t);
    assert!(got.is_empty(), "tftp-hpa while full: {out}");
    assert!(
        out.contains("server busy"),
        "tftp-hpa shows the error: {out}"
    );

    // Many refused requests at once, from many ports: answered from the listening socket, no socket
    // opened or kept for any of them.
    let udp = t.udp_sockets();
    let many: Vec<UdpSocket> = (0..40).map(|i| client(ip(10 + i % 4))).collect();
    let (admitted, refused) = burst(&t, &many);
    assert_eq!((admitted, refused.len()), (0, 40));
    assert_eq!(t.udp_sockets(), udp, "no socket kept for a refused request");
    assert_eq!(t.sessions(), 4);
    // 2 raw, atftp, tftp-hpa, 40 from the burst.
    assert_eq!(
        t.metric("corral_tftp_refused_busy_total{reason=\"total\"}"),
        44
    );

    // An aborted transfer frees its slot.
    drop(h1);
    t.wait_sessions(3);
    let h5 = hold(&t, ip(2)).expect("127.0.0.2 has a slot again");
    drop((h2, h3, h4, h5));
    t.wait_sessions(0);
    assert_eq!(
        t.udp_sockets(),
        udp - 4,
        "the transfers' sockets are closed"
    );

    // Concurrent requests from one address through distinct ports: exactly per_peer admitted.
    let same: Vec<UdpSocket> = (0..10).map(|_| client(ip(1))).collect();
    let (admitted, refused) = burst(&t, &same);
    assert_eq!(admitted, 2, "{refused:?}");
    assert!(
        refused.iter().all(|m| m.contains("from this address")),
        "{refused:?}"
    );
    // Those two go silent: they are dropped, and their slots come back.
    t.wait_sessions(0);
    // From ten addresses at once: exactly max_sessions admitted.
    let spread: Vec<UdpSocket> = (0..10).map(|i| client(ip(20 + i))).collect();
    let (admitted, refused) = burst(&t, &spread);
    assert_eq!(admitted, 4, "{refused:?}");
    assert!(
        refused.iter().all(|m| m.contains("too many transfers")),
        "{refused:?}"
    );
    t.wait_sessions(0);
    let failed_before = t.metric("corral_tftp_transfers_failed_total");
    assert!(failed_before >= 11, "5 aborted + 6 silent: {failed_before}");

    // Finished transfers free their slots: more complete transfers one after another than there are
    // slots, by both clients, all byte-identical.
    let completed = t.metric("corral_tftp_transfers_completed_total");
    for i in 0..5 {
        let (ok, got, out) = atftp(&t, None, &["blksize 1468"]);
        assert!(ok && got == big, "atftp transfer {i}: {out}");
    }
    for i in 0..3 {
        let (got, out) = tftp_hpa(&t);
        assert!(got == big, "tftp-hpa transfer {i}: {out}");
    }
    assert_eq!(
        t.metric("corral_tftp_transfers_completed_total"),
        completed + 8
    );
    t.wait_sessions(0);
}

#[test]
fn timeout_is_bounded_and_a_silent_client_is_dropped() {
    if !common::need_tools(&["atftp", "curl"]) {
        return;
    }
    let t = start();
    let big = std::fs::read(t.root.join("big.bin")).unwrap();
    let clamped = || t.metric("corral_tftp_timeout_clamped_total");
    assert_eq!(clamped(), 0);

    // Within max_timeout: acknowledged as asked (RFC 2349 wants the client's value back).
    let s = client(ip(1));
    s.send_to(&rrq(&[("timeout", "2"), ("tsize", "0")]), t.addr())
        .unwrap();
    let (p, tid) = answer(&s);
    let Packet::Oack { options } = p else {
        panic!("{p:?}")
    };
    assert!(
        options.contains(&("timeout".into(), "2".into())),
        "{options:?}"
    );
    s.send_to(
        &Packet::Error {
            code: 0,
            message: "bye".into(),
        }
        .encode(),
        tid,
    )
    .unwrap();
    assert_eq!(clamped(), 0);

    // 255: not acknowledged (it may not be answered lower), counted; then the client stays silent.
    let silent = client(ip(2));
    silent
        .send_to(&rrq(&[("timeout", "255"), ("tsize", "0")]), t.addr())
        .unwrap();
    let (p, tid) = answer(&silent);
    let Packet::Oack { options } = p else {
        panic!("{p:?}")
    };
    assert!(options.iter().all(|(k, _)| k != "timeout"), "{options:?}");
    assert!(
        options.contains(&("tsize".into(), big.len().to_string())),
        "{options:?}"
    );
    assert_eq!(clamped(), 1);
    // The server gives up after the first OACK and `retries` more, each max_timeout apart (a session
    // held 255 s per try would outlast the wait below by far).
    t.wait_sessions(0);
    silent.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 2048];
    let mut resent = 0;
    while let Ok((n, from)) = silent.recv_from(&mut buf) {
        assert_eq!(from, tid);
        assert!(matches!(Packet::parse(&buf[..n]), Ok(Packet::Oack { .. })));
        resent += 1;
    }
    assert_eq!(
        resent, RETRIES,
        "retransmissions of the OACK before giving up"
    );

    // atftp asking for 255 still gets the file; with no other option there is no OACK at all.
    for opts in [
        vec!["timeout 255"],
        vec!["timeout 255", "tsize 0", "blksize 1468"],
    ] {
        let before = clamped();
        let (ok, got, out) = atftp(&t, None, &opts);
        assert!(ok && got == big, "atftp {opts:?}: {out}");
        // atftp's trace shows the OACK it received: never a timeout (and one with the other options).
        let oack: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("received OACK"))
            .collect();
        assert_eq!(oack.len(), usize::from(opts.len() > 1), "{out}");
        assert!(oack.iter().all(|l| !l.contains("timeout")), "{out}");
        assert_eq!(clamped(), before + 1);
    }
    t.wait_sessions(0);
}
