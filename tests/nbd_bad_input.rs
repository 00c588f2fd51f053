//! Bad input on the wire: broken handshakes, oversized options, truncated and oversized requests,
//! out-of-range requests. Each gets the protocol's error or a closed connection; the server keeps serving
//! everyone else, never panics, and the overlay still reads what was written. And clients that only
//! hold connections: beyond the connection caps they are closed at once, and those that never finish
//! the handshake are closed at its deadline, however slowly they keep sending.

mod common;

use common::nbd::Client;
use common::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

fn setup(dir: &Path, http: u16, nbd: u16) {
    setup_with(dir, http, nbd, "");
}

/// [`setup`] with more keys for `[nbd]`.
fn setup_with(dir: &Path, http: u16, nbd: u16, nbd_keys: &str) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    std::fs::write(dir.join("disks/base.img"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}/boot-scripts\"\npolicy = \"policy.toml\"\ndisks_dir = \"disks\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nenabled = false\n[nbd]\nlisten = \"127.0.0.1:{nbd}\"\nadmin_hosts = [\"127.0.0.1\"]\n{nbd_keys}[iscsi]\nenabled = false\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[[cluster]]\nname = \"db\"\nmin = 0\nmax = 1\ndefault = 0\nimages = [\"testos\"]\ndisk = \"base\"\n",
    )
    .unwrap();
}

/// True when the server closed the connection (EOF or reset) within a few seconds.
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
            }
        }
    }
}

fn greeted(nbd: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", nbd)).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s
}

#[test]
fn bad_input_is_refused_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup(dir, http, nbd);
    let _server = start(dir, http);

    // A good write first, to check it is intact at the end.
    let mut good = Client::connect(nbd, "db/0").unwrap();
    good.request(1, 8192, 4, b"keep").unwrap();
    good.request(3, 0, 0, &[]).unwrap();

    // Not fixed newstyle.
    let mut s = greeted(nbd);
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s), "non-fixed-newstyle client not closed");
    // Bad option magic.
    let mut s = greeted(nbd);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed(&mut s), "bad option magic not closed");
    // An oversized option is refused with ERR_TOO_BIG and the handshake goes on.
    let mut s = greeted(nbd);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let big = 100_000u32;
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&big.to_be_bytes());
    opt.extend(std::iter::repeat_n(0u8, big as usize));
    s.write_all(&opt).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes(r[12..16].try_into().unwrap()),
        (1 << 31) | 9,
        "ERR_TOO_BIG"
    );
    // A handshake cut off in the middle.
    let mut s = greeted(nbd);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\0\0\0\x07\0\0\0\x40abc").unwrap();
    drop(s);

    // In transmission: out of range → ENOSPC/EINVAL replies and the connection stays usable.
    let mut c = Client::connect(nbd, "db/0").unwrap();
    let e = c.request(1, (1 << 20) - 2, 4, b"oops").unwrap_err();
    assert!(e.to_string().contains("nbd error 28"), "{e}");
    let e = c.request(0, u64::MAX - 1, 4, &[]).unwrap_err();
    assert!(e.to_string().contains("nbd error 22"), "{e}");
    assert_eq!(c.request(0, 8192, 4, &[]).unwrap(), b"keep");
    // A request with a bad magic ends the connection.
    c.0.write_all(&[0xde; 28]).unwrap();
    assert!(closed(&mut c.0), "bad request magic not closed");
    // A truncated request, then the client vanishes.
    let mut c = Client::connect(nbd, "db/0").unwrap();
    c.0.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1, 0])
        .unwrap();
    drop(c);
    // A write announcing 64 MiB of payload: closed, nothing written.
    let mut c = Client::connect(nbd, "db/0").unwrap();
    let mut r = vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1];
    r.extend_from_slice(&1u64.to_be_bytes());
    r.extend_from_slice(&0u64.to_be_bytes());
    r.extend_from_slice(&(64u32 << 20).to_be_bytes());
    c.0.write_all(&r).unwrap();
    c.0.write_all(&[0xff; 4096]).unwrap();
    assert!(closed(&mut c.0), "oversized write not closed");

    // Everyone else is still served, the good data is there, nothing panicked.
    assert_eq!(good.request(0, 8192, 4, &[]).unwrap(), b"keep");
    let mut fresh = Client::connect(nbd, "db/0").unwrap();
    assert_eq!(fresh.request(0, 0, 4, &[]).unwrap(), [1, 1, 1, 1]);
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    let metrics = get(&format!("http://127.0.0.1:{http}/metrics"));
    let malformed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("corral_nbd_malformed_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("malformed counter");
    assert!(
        malformed >= 4,
        "malformed connections are counted: {malformed}"
    );
}

/// A connection to corral's NBD port from `from` (any 127/8 address is loopback).
fn try_connect_from(port: u16, from: &str) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: IpAddr = from.parse().unwrap();
    sock.bind(&SocketAddr::new(local, 0).into())?;
    sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

fn connect_from(port: u16, from: &str) -> TcpStream {
    try_connect_from(port, from).unwrap()
}

/// Reads the server's greeting: true if it came, false if the connection was closed without one.
fn greeting(s: &mut TcpStream) -> bool {
    let mut g = [0u8; 18];
    match s.read_exact(&mut g) {
        Ok(()) => {
            assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
            true
        }
        Err(e) => {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "neither a greeting nor a close: {e}"
            );
            false
        }
    }
}

/// True once the server closed the connection (EOF or reset); false if it was still open after 30 s.
fn closed_eventually(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

fn metric(http: u16, name: &str) -> u64 {
    let metrics = get(&format!("http://127.0.0.1:{http}/metrics"));
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics:\n{metrics}"))
}

#[test]
fn connections_beyond_the_caps_and_past_the_handshake_deadline_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup_with(
        dir,
        http,
        nbd,
        "max_connections = 4\nmax_connections_per_peer = 3\nhandshake_timeout = 2\n",
    );
    let _server = start(dir, http);
    // Until the listener is up (probing from an address the test uses for nothing else), and until
    // the probes are gone, so that they take no place below the caps.
    wait_for("the nbd listener", 30, || {
        try_connect_from(nbd, "127.0.0.9").is_ok()
    });
    wait_for("no connection open", 30, || {
        metric(http, "corral_nbd_connections_open") == 0
    });

    // Three idle connections from one address are taken (each is greeted); a fourth is closed at once,
    // without a greeting: a connection that was taken is always greeted first.
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect_from(nbd, "127.0.0.1")).collect();
    for s in &mut idle {
        assert!(greeting(s), "within the per-peer cap");
    }
    let mut extra = connect_from(nbd, "127.0.0.1");
    assert!(
        !greeting(&mut extra),
        "a fourth from one address is refused"
    );
    assert!(metric(http, "corral_nbd_refused_busy_total") >= 1);
    // Another address has places of its own, until the room's total (4) is reached.
    let mut other = connect_from(nbd, "127.0.0.2");
    assert!(greeting(&mut other), "another address is served");
    assert_eq!(metric(http, "corral_nbd_connections_open"), 4);
    let mut third = connect_from(nbd, "127.0.0.3");
    assert!(!greeting(&mut third), "beyond max_connections");
    assert!(metric(http, "corral_nbd_refused_busy_total") >= 2);

    // A client that keeps sending, one byte at a time, an option that never ends: the handshake has
    // one deadline in all, so it is closed too, long before it would have sent it all.
    let trickler = std::thread::spawn(move || {
        let mut s = other;
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(b"IHAVEOPT\0\0\0\x07\0\0\x10\0").unwrap();
        // Writing to a connection the server closed fails (it answers with a reset).
        (0..4096).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(b"x").is_err()
        })
    });
    // The idle ones, which never said anything, are closed at the deadline.
    for s in &mut idle {
        assert!(closed_eventually(s), "an idle handshake is closed");
    }
    assert!(
        trickler.join().unwrap(),
        "a trickling handshake was still open after 80 s of it"
    );
    wait_for("the closed connections to be counted out", 30, || {
        metric(http, "corral_nbd_connections_open") == 0
    });
    assert!(metric(http, "corral_nbd_handshake_timeouts_total") >= 4);

    // The places were given back: a client from the same address opens an export and reads.
    let mut good = Client::connect(nbd, "db/0").unwrap();
    assert_eq!(good.request(0, 0, 4, &[]).unwrap(), [1, 1, 1, 1]);
    assert_eq!(metric(http, "corral_nbd_connections_open"), 1);
    // In transmission the handshake deadline no longer applies (idle_timeout is 0 by default).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(good.request(0, 0, 4, &[]).unwrap(), [1, 1, 1, 1]);
    drop((extra, third));
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// With idle_timeout set, a connection in transmission that sends no request for that long is closed
/// and counted (off by default: see the key's documentation).
#[test]
fn an_idle_export_is_closed_when_idle_timeout_is_set() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup_with(dir, http, nbd, "idle_timeout = 1\n");
    let _server = start(dir, http);
    wait_for("the nbd listener", 30, || {
        try_connect_from(nbd, "127.0.0.9").is_ok()
    });
    let mut c = Client::connect(nbd, "db/0").unwrap();
    assert_eq!(c.request(0, 0, 4, &[]).unwrap(), [1, 1, 1, 1]);
    assert!(closed_eventually(&mut c.0), "an idle export is closed");
    assert_eq!(metric(http, "corral_nbd_idle_closed_total"), 1);
}
