//! The I/O side of application probes: one HTTP GET or TCP connect against a node, bounded by the
//! probe's timeout. The schedule, failure counts and verdicts live in the sans-IO [`super::NodeWatch`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::policy::{ProbeKind, ProbeSpec};

/// Most of a response a probe reads (the status line and enough body to find the expected text).
const MAX_RESPONSE: usize = 64 * 1024;

/// Runs one probe against `ip`; `Ok` carries the response time in milliseconds.
pub async fn run(spec: &ProbeSpec, ip: IpAddr) -> Result<f64, String> {
    let t0 = Instant::now();
    let limit = Duration::from_secs(spec.timeout.0);
    match tokio::time::timeout(limit, once(spec, ip)).await {
        Ok(Ok(())) => Ok(t0.elapsed().as_secs_f64() * 1000.0),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {} s", spec.timeout.0)),
    }
}

async fn once(spec: &ProbeSpec, ip: IpAddr) -> Result<(), String> {
    let addr = SocketAddr::new(ip, spec.port);
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    if spec.kind == ProbeKind::Tcp {
        return Ok(());
    }
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: corral-probe\r\nConnection: close\r\n\r\n",
        spec.path
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    while buf.len() < MAX_RESPONSE {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    check_response(&buf, spec.status, spec.body.as_deref())
}

/// Whether an HTTP response has the expected status and holds the expected text.
pub fn check_response(raw: &[u8], status: u16, body: Option<&str>) -> Result<(), String> {
    let text = String::from_utf8_lossy(raw);
    let line = text.lines().next().unwrap_or("");
    let got: Option<u16> = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok());
    match got {
        None => return Err(format!("not an HTTP response: {:?}", truncate(line, 80))),
        Some(g) if g != status => return Err(format!("status {g}, expected {status}")),
        Some(_) => {}
    }
    if let Some(want) = body {
        let content = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        if !content.contains(want) {
            return Err(format!("body lacks {want:?}"));
        }
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_judged_by_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        assert_eq!(check_response(ok, 200, None), Ok(()));
        assert_eq!(check_response(ok, 200, Some("ok")), Ok(()));
        assert!(check_response(ok, 200, Some("fine"))
            .unwrap_err()
            .contains("lacks"));
        assert!(check_response(ok, 204, None)
            .unwrap_err()
            .contains("status 200"));
        let e = check_response(b"SSH-2.0-OpenSSH\r\n", 200, None).unwrap_err();
        assert!(e.contains("not an HTTP response"), "{e}");
        assert!(check_response(b"", 200, None).is_err());
        assert!(check_response(b"HTTP/1.0 500 Oops\r\n\r\n", 200, None).is_err());
    }

    /// A server on loopback that answers each connection with `reply` after `delay`.
    fn server(reply: &'static str, delay: std::time::Duration) -> u16 {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                std::thread::sleep(delay);
                let _ = s.write_all(reply.as_bytes());
            }
        });
        port
    }

    fn spec(kind: ProbeKind, port: u16) -> ProbeSpec {
        ProbeSpec {
            kind,
            port,
            path: "/health".into(),
            status: 200,
            body: Some("ok".into()),
            interval: crate::policy::Secs(2),
            timeout: crate::policy::Secs(1),
            failures: 3,
        }
    }

    #[tokio::test]
    async fn probes_against_real_sockets() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let fast = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
            Default::default(),
        );
        let ms = run(&spec(ProbeKind::Http, fast), lo).await.unwrap();
        assert!(ms >= 0.0);
        let wrong = server("HTTP/1.1 503 Busy\r\n\r\n", Default::default());
        let e = run(&spec(ProbeKind::Http, wrong), lo).await.unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        let slow = server(
            "HTTP/1.1 200 OK\r\n\r\nok",
            std::time::Duration::from_millis(1500),
        );
        let e = run(&spec(ProbeKind::Http, slow), lo).await.unwrap_err();
        assert!(e.contains("no answer within 1 s"), "{e}");
        // TCP: a listener is enough; a closed port is refused.
        assert!(run(&spec(ProbeKind::Tcp, slow), lo).await.is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = run(&spec(ProbeKind::Tcp, closed), lo).await.unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }
}
