//! Operator commands that read a running corral through its HTTP API: `status`, `nodes`, `events`.
//! Tables for people, `--json` for scripts.

pub mod disk;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

/// GET `path` from `base` (http://host:port), returning the body of a 200 response.
pub fn get(base: &str, path: &str) -> Result<String, String> {
    call(base, "GET", path, None)
}

/// One request to corral's API; the body of a 200 response, else the status and body as an error.
fn call(base: &str, method: &str, path: &str, token: Option<&str>) -> Result<String, String> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{base}` is not an http:// URL"))?;
    let host = rest.trim_end_matches('/');
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let mut s =
        TcpStream::connect(&addr).map_err(|e| format!("cannot reach corral at {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{path}: HTTP {status}: {}", body.trim()));
    }
    // hyper answers small bodies with Content-Length; decode chunked just in case.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn fetch(base: &str, path: &str) -> Result<serde_json::Value, ExitCode> {
    let body = get(base, path).map_err(|e| {
        eprintln!("corral: {e}");
        ExitCode::from(1)
    })?;
    serde_json::from_str(&body).map_err(|e| {
        eprintln!("corral: bad answer from {path}: {e}");
        ExitCode::from(1)
    })
}

/// Fetches `path`; with `--json` prints it and returns None (done), else returns it for a table.
fn fetch_table(base: &str, path: &str, json: bool) -> Result<Option<serde_json::Value>, ExitCode> {
    let v = fetch(base, path)?;
    if json {
        println!("{v}");
        return Ok(None);
    }
    Ok(Some(v))
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn status(base: &str, json: bool) -> ExitCode {
    let v = match fetch_table(base, "/api/v1/clusters", json) {
        Ok(Some(v)) => v,
        Ok(None) => return ExitCode::SUCCESS,
        Err(c) => return c,
    };
    println!(
        "{:<16} {:>8} {:>7} {:>7} {:>4} {:>4}  STATE",
        "CLUSTER", "PRIORITY", "DESIRED", "CURRENT", "MIN", "MAX"
    );
    for c in v.as_array().into_iter().flatten() {
        let state = if c["below_min"] == true {
            "BELOW MIN"
        } else if c["short"] == true {
            "short"
        } else {
            "ok"
        };
        println!(
            "{:<16} {:>8} {:>7} {:>7} {:>4} {:>4}  {}",
            s(&c["name"]),
            s(&c["priority"]),
            s(&c["desired"]),
            s(&c["current"]),
            s(&c["min"]),
            s(&c["max"]),
            state
        );
    }
    ExitCode::SUCCESS
}

pub fn nodes(base: &str, json: bool) -> ExitCode {
    let v = match fetch_table(base, "/api/v1/nodes", json) {
        Ok(Some(v)) => v,
        Ok(None) => return ExitCode::SUCCESS,
        Err(c) => return c,
    };
    println!(
        "{:<17} {:<14} {:<12} {:>4} {:<14} {:<16} ADDRESS",
        "NODE", "STATE", "CLUSTER", "SLOT", "IMAGE", "HOSTNAME"
    );
    for n in v.as_array().into_iter().flatten() {
        println!(
            "{:<17} {:<14} {:<12} {:>4} {:<14} {:<16} {}",
            s(&n["mac"]),
            s(&n["state"]),
            s(&n["cluster"]),
            s(&n["slot"]),
            s(&n["image"]),
            s(&n["hostname"]),
            s(&n["address"])
        );
    }
    ExitCode::SUCCESS
}

pub fn events(base: &str, json: bool, limit: u32) -> ExitCode {
    let v = match fetch_table(base, &format!("/api/v1/events?limit={limit}"), json) {
        Ok(Some(v)) => v,
        Ok(None) => return ExitCode::SUCCESS,
        Err(c) => return c,
    };
    let mut rows: Vec<&serde_json::Value> = v.as_array().into_iter().flatten().collect();
    rows.reverse();
    for e in rows {
        println!(
            "{:>12}  {:<16} {}",
            s(&e["at"]),
            s(&e["kind"]),
            s(&e["message"])
        );
    }
    ExitCode::SUCCESS
}

/// `corral release <mac>`: a quarantined or failed node back to the pool.
pub fn release(base: &str, mac: &str, token: Option<&str>, json: bool) -> ExitCode {
    match call(base, "POST", &format!("/api/v1/nodes/{mac}/release"), token) {
        Ok(msg) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "released": mac, "message": msg.trim() })
                );
            } else {
                println!("{}", msg.trim());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("corral: {e}");
            ExitCode::from(1)
        }
    }
}
