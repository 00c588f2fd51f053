//! HTTP's limits on loopback, with real sockets and curl: connections capped in all and per address (one
//! beyond a cap is closed before anything is read, counted by reason), a request head that does not arrive
//! within `header_timeout` (a slowloris trickling bytes) closes the connection, a kept-alive connection
//! lives `idle_timeout` between requests (longer than the header timeout), and /metrics shows each.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Short enough to wait for in a test, far enough apart to tell apart.
const HEADER: u64 = 2;
const IDLE: u64 = 6;
const TOTAL: usize = 8;
const PER_PEER: usize = 3;

fn setup(dir: &Path, port: u16) -> common::Server {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("policy.toml"), "[settings]\ncooldown = 0\n").unwrap();
    common::loopback_config(
        dir,
        port,
        &format!(
            "header_timeout = {HEADER}\nidle_timeout = {IDLE}\nmax_connections = {TOTAL}\nmax_connections_per_peer = {PER_PEER}\n"
        ),
        "",
    );
    let s = common::start(dir, port);
    // common::start's probes are connections too: let them be counted out.
    wait_open(port, 0);
    s
}

/// A connection to corral from `from` (a loopback address).
fn connect(from: &str, port: u16) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Whether corral closed `s` (EOF or reset) rather than keeping it: waits up to the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

/// One request on `s`, kept alive: the status line of the answer.
fn request(s: &mut TcpStream, path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nHost: corral\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // /healthz answers with a short body and a Content-Length: read until the head and body are in.
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before an answer");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= head_end + 4 + len {
                return text.lines().next().unwrap().to_string();
            }
        }
    }
}

fn metric(port: u16, name: &str) -> u64 {
    let text = common::get(&format!("http://127.0.0.1:{port}/metrics"));
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// Waits until corral counts `n` connections open (the /metrics request itself is one of them).
fn wait_open(port: u16, n: u64) {
    common::wait_for(&format!("{n} http connections open"), 30, || {
        metric(port, "corral_http_connections_open") == n + 1
    });
}

#[test]
fn connections_are_capped_per_peer_and_in_all() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let _s = setup(tmp.path(), port);

    // PER_PEER idle connections from one address: all kept, the next closed at once.
    let mut mine: Vec<TcpStream> = (0..PER_PEER).map(|_| connect("127.0.0.2", port)).collect();
    wait_open(port, PER_PEER as u64);
    let mut extra = connect("127.0.0.2", port);
    assert!(
        closed_by_server(&mut extra),
        "a connection beyond max_connections_per_peer was kept"
    );
    assert_eq!(
        metric(
            port,
            "corral_http_refused_busy_total{reason=\"max_connections_per_peer\"}"
        ),
        1
    );
    // Another address is not affected, and the first address's connections still work.
    let mut other = connect("127.0.0.3", port);
    assert!(request(&mut other, "/healthz").contains("200"));
    assert!(request(&mut mine[0], "/healthz").contains("200"));

    // Fill the room from more addresses, leaving one place for the /metrics probe, then take that
    // place too: a connection from a fresh address must bounce.
    let mut held = vec![other];
    let mut a = 4;
    while mine.len() + held.len() < TOTAL - 1 {
        held.push(connect(&format!("127.0.0.{a}"), port));
        a += 1;
    }
    wait_open(port, TOTAL as u64 - 1);
    held.push(connect("127.0.0.60", port));
    let mut beyond = connect("127.0.0.61", port);
    assert!(
        closed_by_server(&mut beyond),
        "a connection beyond max_connections was kept"
    );
    // Freed places are taken again.
    drop(held);
    drop(mine);
    wait_open(port, 0);
    // At least the one beyond: on a loaded machine the last probe's connection may still be counted
    // when 127.0.0.60 connects, and then that one is refused too (seen once in a full run).
    let refused = metric(
        port,
        "corral_http_refused_busy_total{reason=\"max_connections\"}",
    );
    assert!((1..=2).contains(&refused), "{refused} refusals counted");
    assert!(common::get(&format!("http://127.0.0.1:{port}/healthz")).contains("ok"));
}

#[test]
fn a_trickled_request_head_is_cut_at_the_header_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let _s = setup(tmp.path(), port);

    // Slowloris: one byte every half second never completes a head; corral closes it although bytes
    // keep arriving.
    let mut s = connect("127.0.0.2", port);
    let started = Instant::now();
    let mut cut = false;
    for b in b"GET /healthz HTTP/1.1\r\nHost: corral\r\nX-Slow: "
        .iter()
        .cycle()
    {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    assert!(cut, "a head trickled for a minute was never cut");
    assert!(metric(port, "corral_http_header_timeouts_total") >= 1);

    // A connection that never sends anything is closed too.
    let mut silent = connect("127.0.0.3", port);
    assert!(closed_by_server(&mut silent));
    assert!(metric(port, "corral_http_header_timeouts_total") >= 2);
}

#[test]
fn kept_alive_connections_live_the_idle_timeout_between_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let _s = setup(tmp.path(), port);

    let mut s = connect("127.0.0.2", port);
    assert!(request(&mut s, "/healthz").contains("200"));
    // Longer than the header timeout, well within the idle timeout: still open.
    std::thread::sleep(Duration::from_secs(HEADER + 2));
    assert!(request(&mut s, "/healthz").contains("200"));
    assert_eq!(metric(port, "corral_http_idle_closed_total"), 0);
    // Then nothing: closed after the idle timeout, and counted as idle (not as a header timeout).
    let before = metric(port, "corral_http_header_timeouts_total");
    assert!(closed_by_server(&mut s));
    assert_eq!(metric(port, "corral_http_idle_closed_total"), 1);
    assert_eq!(metric(port, "corral_http_header_timeouts_total"), before);

    // curl's ordinary requests are unaffected.
    assert!(common::get(&format!("http://127.0.0.1:{port}/healthz")).contains("ok"));
}
