//! Alert webhooks: an alert is POSTed as JSON to the operator's `http://` URL. Plain HTTP only (a
//! receiver on the management network or a local relay); a failed call is logged and not retried, the
//! alert stays in the event log either way.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::policy::webhook::parse_url;

/// POSTs `body` (JSON) to `url`; returns the response's status code.
pub async fn post(url: &str, body: &str) -> Result<u16, String> {
    let t = parse_url(url)?;
    let call = async {
        let mut s = TcpStream::connect(&t.authority)
            .await
            .map_err(|e| format!("connect {}: {e}", t.authority))?;
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: corral\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            t.path,
            t.authority,
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let head = String::from_utf8_lossy(&buf[..n]);
        head.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "no HTTP status in the answer".to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
}
