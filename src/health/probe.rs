//! The I/O side of application probes: one HTTP(S) GET (through [`crate::client`], on tokio's blocking
//! pool) or TCP connect against a node, bounded by the probe's timeout. The schedule, failure counts and
//! verdicts live in the sans-IO [`super::NodeWatch`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::client::{Client, Trust};
use crate::policy::{ProbeKind, ProbeSpec};

/// Most of a response body a probe reads (enough to find the expected text).
const MAX_RESPONSE: usize = 64 * 1024;

/// Runs one probe against `ip`; `Ok` carries the response time in milliseconds.
pub async fn run(spec: &ProbeSpec, ip: IpAddr) -> Result<f64, String> {
    let addr = SocketAddr::new(ip, spec.port);
    let limit = Duration::from_secs(spec.timeout.0);
    let scheme = match spec.kind {
        ProbeKind::Tcp => {
            let t0 = Instant::now();
            return match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(t0.elapsed().as_secs_f64() * 1000.0),
                Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
                Err(_) => Err(format!("no answer from {addr} within {} s", spec.timeout.0)),
            };
        }
        ProbeKind::Http => "http",
        ProbeKind::Https => "https",
    };
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let client = Client::new(&format!("{scheme}://{addr}"), None, &Trust::Any, limit)?
            .max_body(MAX_RESPONSE)
            .user_agent("corral-probe");
        let r = client
            .send("GET", &spec.path, None)
            .map_err(|e| e.to_string())?;
        check_response(r.status, &r.body, spec.status, spec.body.as_deref())?;
        Ok(t0.elapsed().as_secs_f64() * 1000.0)
    })
    .await
    .map_err(|e| format!("probe: {e}"))?
}

/// Whether an HTTP answer has the expected status and its body holds the expected text.
pub fn check_response(
    got: u16,
    content: &[u8],
    status: u16,
    body: Option<&str>,
) -> Result<(), String> {
    if got != status {
        return Err(format!("status {got}, expected {status}"));
    }
    if let Some(want) = body {
        if !String::from_utf8_lossy(content).contains(want) {
            return Err(format!("body lacks {want:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_judged_by_status_and_body() {
        assert_eq!(check_response(200, b"ok\n", 200, None), Ok(()));
        assert_eq!(check_response(200, b"ok\n", 200, Some("ok")), Ok(()));
        assert!(check_response(200, b"ok\n", 200, Some("fine"))
            .unwrap_err()
            .contains("lacks"));
        assert!(check_response(200, b"ok\n", 204, None)
            .unwrap_err()
            .contains("status 200"));
        assert!(check_response(500, b"", 200, None).is_err());
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
        assert!(
            e.contains("no answer from") && e.contains("within 1 s"),
            "{e}"
        );
        let ssh = server("SSH-2.0-OpenSSH_9.2\r\n\r\n", Default::default());
        let e = run(&spec(ProbeKind::Http, ssh), lo).await.unwrap_err();
        assert!(e.contains("not an HTTP answer"), "{e}");
        // https: any certificate; a plain-HTTP server is a failed handshake.
        let e = run(&spec(ProbeKind::Https, fast), lo).await.unwrap_err();
        assert!(e.contains("cannot connect to https://127.0.0.1"), "{e}");
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
