//! Alert webhooks: an alert is POSTed as JSON to the operator's `http://` URL. Plain HTTP only (a
//! receiver on the management network or a local relay); a failed call is logged and not retried, the
//! alert stays in the event log either way.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a webhook goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub authority: String,
    pub path: String,
}

/// Checks and splits an `http://host[:port]/path` URL.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: only http:// webhooks are supported"))?;
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.is_empty() || auth.contains('@') || path.contains(char::is_whitespace) {
        return Err(format!("`{url}` is not a usable http:// URL"));
    }
    let authority = if auth
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        auth.to_string()
    } else if auth.contains(':') && !auth.ends_with(']') {
        return Err(format!("`{url}`: bad port"));
    } else {
        format!("{auth}:80")
    };
    Ok(Target {
        authority,
        path: path.to_string(),
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://10.0.0.1:9000/hook").unwrap(),
            Target {
                authority: "10.0.0.1:9000".into(),
                path: "/hook".into()
            }
        );
        assert_eq!(
            parse_url("http://ops.example").unwrap().authority,
            "ops.example:80"
        );
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http://u:p@x/").is_err());
        assert!(parse_url("http:///x").is_err());
        assert!(parse_url("http://x:notaport/").is_err());
    }
}
