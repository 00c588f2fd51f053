//! corral's one HTTP client, for every request corral or its agent makes: the agent to corral's API
//! (heartbeats, orders, acks), the operator CLI (`corral status`, `nodes`, `events`, `release`), alert
//! webhooks and HTTP(S) application probes. The Redfish power driver builds its ureq agent and TLS trust
//! here too ([`agent`], [`Trust`]).
//!
//! Built on ureq (blocking, rustls) rather than hand-written requests over `TcpStream`: chunked and
//! length-delimited bodies, keep-alive, HTTPS and odd servers are handled by a small, widely used
//! library, and there is still no async runtime (the agent ships into tiny images). Async callers run it
//! with `tokio::task::spawn_blocking`. Every request has a connect timeout ([`CONNECT_TIMEOUT`], or less)
//! and an overall timeout covering connect, send, headers and body. Redirects are not followed (ureq would
//! drop the Authorization header and turn a redirected POST into a GET): a 3xx is an answer like any
//! other. HTTPS is verified according to a [`Trust`]: by default the system's roots (rustls-native-certs,
//! the built-in Mozilla roots when the system has none).

use std::io::Read;
use std::time::Duration;

/// The longest a connection may take to open (a request's shorter overall timeout bounds it too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most of a response body read by default; see [`Client::max_body`].
pub const MAX_BODY: usize = 16 << 20;

mod tls;
pub use tls::{system_roots, tls_config, Trust};

/// A ureq agent: `timeout` for each whole request, at most [`CONNECT_TIMEOUT`] to connect, no redirects
/// followed, HTTPS checked as `trust` says.
pub fn agent(timeout: Duration, trust: &Trust) -> Result<ureq::Agent, String> {
    Ok(ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT.min(timeout))
        .timeout(timeout)
        .redirects(0)
        .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls_config(trust)?)
        .build())
}

/// Checks an `http://` or `https://` URL with a host and no credentials in it; `what` names the URL
/// in the error ("webhook", "API URL").
pub fn parse_url(url: &str, what: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(url).map_err(|e| format!("{what} `{url}`: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "{what} `{url}`: only http:// and https:// URLs are supported"
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{what} `{url}`: no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "{what} `{url}`: credentials in the URL are not supported"
        ));
    }
    Ok(u)
}

/// Why a request failed. Every message names the URL asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadUrl(String),
    #[error("cannot connect to {url}: {why}")]
    Connect { url: String, why: String },
    #[error("no answer from {url} within {}", secs(*.within))]
    Timeout { url: String, within: Duration },
    #[error("{url}: not an HTTP answer ({why})")]
    NotHttp { url: String, why: String },
    #[error("{url}: {why}")]
    Failed { url: String, why: String },
    /// An answer, but not a 2xx one ([`Client::text`], [`Client::json`]).
    #[error("{url}: HTTP {code}: {body}")]
    Status {
        url: String,
        code: u16,
        body: String,
    },
    /// A 2xx answer whose body is not the JSON expected ([`Client::json`]).
    #[error("bad answer from {url}: {why}")]
    Json { url: String, why: String },
}

impl Error {
    /// Whether the server answered at all (an HTTP status, perhaps with a body it could not use).
    pub fn answered(&self) -> bool {
        matches!(self, Error::Status { .. } | Error::Json { .. })
    }
}

/// `2 s`, `0.3 s`.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", d.as_secs_f64())
    }
}

/// An answer: any status, and its body (at most the client's `max_body` bytes of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The body was longer than `max_body`; `body` holds its beginning.
    pub truncated: bool,
}

/// A client for one server (or one webhook URL): the base URL paths are appended to, an optional bearer
/// token sent with every request, and the timeout of each request.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    timeout: Duration,
    max_body: usize,
    user_agent: Option<&'static str>,
}

impl Client {
    /// `base` is an `http://` or `https://` URL; `timeout` bounds each whole request.
    pub fn new(
        base: &str,
        token: Option<String>,
        trust: &Trust,
        timeout: Duration,
    ) -> Result<Client, String> {
        let url = parse_url(base, "URL")?;
        Ok(Client {
            agent: agent(timeout, trust)?,
            base: url.to_string(),
            token,
            timeout,
            max_body: MAX_BODY,
            user_agent: None,
        })
    }

    /// Reads at most `n` bytes of each body (the rest is dropped and the answer marked truncated).
    pub fn max_body(mut self, n: usize) -> Client {
        self.max_body = n;
        self
    }

    /// Sends this User-Agent instead of `corral/<version>`.
    pub fn user_agent(mut self, ua: &'static str) -> Client {
        self.user_agent = Some(ua);
        self
    }

    /// The base URL (as normalised by the URL parser).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `path` appended to the base URL; an empty `path` is the base URL itself.
    fn url(&self, path: &str) -> String {
        if path.is_empty() {
            self.base.clone()
        } else {
            format!("{}{path}", self.base.trim_end_matches('/'))
        }
    }

    /// One request within the client's timeout; `json` is sent as an `application/json` body. Any HTTP
    /// status is an answer; `Err` means there was none (or it could not be read).
    pub fn send(&self, method: &str, path: &str, json: Option<&[u8]>) -> Result<Response, Error> {
        self.send_within(method, path, json, self.timeout)
    }

    /// [`Client::send`] with its own overall timeout (a long poll).
    pub fn send_within(
        &self,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response, Error> {
        let url = self.url(path);
        let mut req = self.agent.request(method, &url).timeout(timeout);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if let Some(ua) = self.user_agent {
            req = req.set("User-Agent", ua);
        }
        let res = match json {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(transport(url, timeout, &t)),
        };
        let status = resp.status();
        let mut body = Vec::new();
        let limit = self.max_body as u64 + 1;
        if let Err(e) = resp.into_reader().take(limit).read_to_end(&mut body) {
            return Err(if is_timeout(&e) {
                Error::Timeout {
                    url,
                    within: timeout,
                }
            } else {
                Error::Failed {
                    url,
                    why: format!("reading the body: {e}"),
                }
            });
        }
        let truncated = body.len() > self.max_body;
        body.truncate(self.max_body);
        Ok(Response {
            status,
            body,
            truncated,
        })
    }

    /// `method path` without a body; the body of a 2xx answer as text, else [`Error::Status`].
    pub fn text(&self, method: &str, path: &str) -> Result<String, Error> {
        let url = self.url(path);
        let r = self.send(method, path, None)?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        if !(200..300).contains(&r.status) {
            return Err(Error::Status {
                url,
                code: r.status,
                body: text.trim().to_string(),
            });
        }
        if r.truncated {
            return Err(Error::Failed {
                url,
                why: format!("answer longer than {} bytes", self.max_body),
            });
        }
        Ok(text)
    }

    /// GET `path` and decode its 2xx JSON body.
    pub fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let text = self.text("GET", path)?;
        serde_json::from_str(&text).map_err(|e| Error::Json {
            url: self.url(path),
            why: e.to_string(),
        })
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// A ureq transport error as an [`Error`]: timeouts, connection failures (TLS ones included) and
/// garbled answers told apart.
fn transport(url: String, within: Duration, t: &ureq::Transport) -> Error {
    let io = std::error::Error::source(t).and_then(|s| s.downcast_ref::<std::io::Error>());
    if io.is_some_and(is_timeout) {
        return Error::Timeout { url, within };
    }
    let detail = match (t.message(), std::error::Error::source(t)) {
        (Some(m), Some(s)) => format!("{m}: {s}"),
        (Some(m), None) => m.to_string(),
        (None, Some(s)) => s.to_string(),
        (None, None) => t.kind().to_string(),
    };
    match t.kind() {
        ureq::ErrorKind::ConnectionFailed => Error::Connect {
            url,
            why: std::error::Error::source(t).map_or(detail, |s| s.to_string()),
        },
        ureq::ErrorKind::BadStatus | ureq::ErrorKind::BadHeader => {
            Error::NotHttp { url, why: detail }
        }
        ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
            Error::BadUrl(format!("{url}: {detail}"))
        }
        kind => Error::Failed {
            url,
            why: format!("{kind}: {detail}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// A server on loopback answering one connection with `reply` after `delay`; it hands back the
    /// request it read (head and body).
    fn server(reply: &'static str, delay: Duration) -> (String, mpsc::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                req.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                let done = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    body.len() >= len
                });
                if n == 0 || done {
                    break;
                }
            }
            std::thread::sleep(delay);
            let _ = s.write_all(reply.as_bytes());
            let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
        });
        (base, rx)
    }

    fn client(base: &str, token: Option<&str>, timeout: Duration) -> Client {
        Client::new(base, token.map(str::to_string), &Trust::System, timeout).unwrap()
    }

    const SEC: Duration = Duration::from_secs(5);

    #[test]
    fn any_status_is_an_answer_and_only_2xx_is_text() {
        let (base, _) = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            Duration::ZERO,
        );
        assert_eq!(client(&base, None, SEC).text("GET", "/a").unwrap(), "{}");

        let (base, _) = server("HTTP/1.1 204 No Content\r\n\r\n", Duration::ZERO);
        let r = client(&base, None, SEC).send("POST", "/a", None).unwrap();
        assert_eq!((r.status, r.body.len(), r.truncated), (204, 0, false));

        let reply = "HTTP/1.1 409 Conflict\r\nContent-Length: 12\r\n\r\nnode is busy";
        let (base, _) = server(reply, Duration::ZERO);
        let r = client(&base, None, SEC).send("GET", "/a", None).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (409, &b"node is busy"[..]));
        let (base, _) = server(reply, Duration::ZERO);
        let e = client(&base, None, SEC).text("POST", "/a").unwrap_err();
        assert!(
            matches!(e, Error::Status { code: 409, .. }) && e.answered(),
            "{e:?}"
        );
        assert_eq!(e.to_string(), format!("{base}/a: HTTP 409: node is busy"));

        // Redirects are answers, not followed.
        let (base, _) = server(
            "HTTP/1.1 302 Found\r\nLocation: /b\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        );
        assert_eq!(
            client(&base, None, SEC)
                .send("GET", "/a", None)
                .unwrap()
                .status,
            302
        );
    }

    #[test]
    fn chunked_and_overlong_bodies() {
        let chunked =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (base, _) = server(chunked, Duration::ZERO);
        assert_eq!(
            client(&base, None, SEC)
                .send("GET", "/", None)
                .unwrap()
                .body,
            b"abcde"
        );
        let (base, _) = server(chunked, Duration::ZERO);
        let r = client(&base, None, SEC)
            .max_body(4)
            .send("GET", "/", None)
            .unwrap();
        assert_eq!((r.body.as_slice(), r.truncated), (&b"abcd"[..], true));
        let (base, _) = server(chunked, Duration::ZERO);
        let e = client(&base, None, SEC)
            .max_body(4)
            .text("GET", "/")
            .unwrap_err();
        assert!(e.to_string().contains("longer than 4 bytes"), "{e}");
    }

    #[test]
    fn bearer_token_json_body_and_path_prefix_are_sent() {
        let (base, rx) = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        );
        let c = client(&format!("{base}/corral/"), Some("s3cret"), SEC).user_agent("corral-probe");
        c.send("POST", "/api/v1/agent/ack", Some(br#"{"id":1}"#))
            .unwrap();
        let req = rx.recv().unwrap();
        let lower = req.to_ascii_lowercase();
        assert!(
            req.starts_with("POST /corral/api/v1/agent/ack HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.contains("\r\nAuthorization: Bearer s3cret\r\n"),
            "{req}"
        );
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{req}"
        );
        assert!(lower.contains("\r\nuser-agent: corral-probe\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n{\"id\":1}"), "{req}");

        // No token, no header; an empty path is the base URL itself (a webhook's).
        let (base, rx) = server("HTTP/1.1 204 No Content\r\n\r\n", Duration::ZERO);
        client(&format!("{base}/hook/?a=1"), None, SEC)
            .send("POST", "", Some(b"{}"))
            .unwrap();
        let req = rx.recv().unwrap();
        assert!(req.starts_with("POST /hook/?a=1 HTTP/1.1\r\n"), "{req}");
        assert!(!req.to_ascii_lowercase().contains("authorization"), "{req}");
    }

    #[test]
    fn a_slow_server_times_out() {
        let (base, _) = server("HTTP/1.1 200 OK\r\n\r\n", Duration::from_millis(1500));
        let t0 = std::time::Instant::now();
        let e = client(&base, None, Duration::from_millis(300))
            .send("GET", "/slow", None)
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("no answer from {base}/slow within 0.3 s")
        );
    }

    #[test]
    fn json_decode_errors_name_the_url() {
        let (base, _) = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nnot json",
            Duration::ZERO,
        );
        let e = client(&base, None, SEC)
            .json::<serde_json::Value>("/api/v1/nodes")
            .unwrap_err();
        assert!(matches!(e, Error::Json { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("bad answer from {base}/api/v1/nodes: expected")),
            "{msg}"
        );
        let (base, _) = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n[1,2,3]",
            Duration::ZERO,
        );
        assert_eq!(
            client(&base, None, SEC).json::<Vec<u8>>("/").unwrap(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn refused_connections_and_non_http_answers() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = client(&format!("http://{closed}"), None, SEC)
            .send("GET", "/", None)
            .unwrap_err();
        assert!(matches!(e, Error::Connect { .. }) && !e.answered(), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot connect to http://{closed}/: ")),
            "{e}"
        );
        let (base, _) = server("SSH-2.0-OpenSSH_9.2\r\n\r\n", Duration::ZERO);
        let e = client(&base, None, SEC).send("GET", "/", None).unwrap_err();
        assert!(e.to_string().contains("not an HTTP answer"), "{e}");
    }

    #[test]
    fn urls() {
        let u = parse_url("http://boot.example:8080/corral/", "API URL").unwrap();
        assert_eq!(
            (u.host_str(), u.port_or_known_default()),
            (Some("boot.example"), Some(8080))
        );
        assert_eq!(
            parse_url("https://[fd00::1]/x", "webhook")
                .unwrap()
                .port_or_known_default(),
            Some(443)
        );
        for (bad, why) in [
            ("ftp://x/", "only http:// and https://"),
            ("http://u:p@x/", "credentials"),
            ("http://x:notaport/", "invalid port"),
            ("http://:80", "empty host"),
            ("10.0.0.1:80", "relative URL"),
        ] {
            let e = parse_url(bad, "webhook").unwrap_err();
            assert!(
                e.starts_with(&format!("webhook `{bad}`: ")) && e.contains(why),
                "{e}"
            );
        }
        assert!(Client::new(
            "http://x",
            None,
            &Trust::CaFile("/nonexistent.pem".into()),
            SEC
        )
        .unwrap_err()
        .contains("/nonexistent.pem"));
        // The system's roots were found (Debian's ca-certificates), or the built-in ones stand in.
        assert!(!system_roots().is_empty());
    }
}
