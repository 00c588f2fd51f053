//! Alert webhooks: an alert is POSTed as JSON to the operator's `http://` or `https://` URL (HTTPS
//! verified against the system's roots). A failed call is logged and not retried; the alert stays in the
//! event log either way. The request itself is [`crate::client`]'s, run on tokio's blocking pool.

use std::time::Duration;

use crate::client::{Client, Trust};
use crate::policy::webhook::parse_url;

/// How long a webhook call may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(5);

/// POSTs `body` (JSON) to `url`; returns the response's status code.
pub async fn post(url: &str, body: &str) -> Result<u16, String> {
    let (url, body) = (url.to_string(), body.to_string());
    tokio::task::spawn_blocking(move || {
        let client = Client::new(parse_url(&url)?.as_str(), None, &Trust::System, TIMEOUT)?
            .max_body(64 * 1024);
        client
            .send("POST", "", Some(body.as_bytes()))
            .map(|r| r.status)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("webhook call: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn posts_json_and_reports_the_status() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/alerts", l.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut req = Vec::new();
            while !String::from_utf8_lossy(&req).ends_with("{\"kind\":\"alert\"}") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "{}", String::from_utf8_lossy(&req));
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            String::from_utf8(req).unwrap()
        });
        assert_eq!(post(&url, r#"{"kind":"alert"}"#).await, Ok(202));
        let req = t.join().unwrap();
        assert!(req.starts_with("POST /alerts HTTP/1.1\r\n"), "{req}");
        let e = post("http://127.0.0.1:1/x", "{}").await.unwrap_err();
        assert!(e.contains("cannot connect to http://127.0.0.1:1/x"), "{e}");
    }
}
