//! Operator commands that read a running corral through its HTTP API: `status`, `nodes`, `events`,
//! `release`. Tables for people, `--json` for scripts. The bearer token comes from a file (`--token-file`)
//! or the config's token files, never from the command line.

pub mod disk;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use corral::client::{Client, Error, Trust};

/// A running corral's operator API: its address, the bearer token and the TLS roots (through
/// [`corral::client`]).
pub struct Api(Client);

impl Api {
    /// `base` is `http://host:port` or `https://host:port`; `ca` (PEM) is trusted besides the system's
    /// roots (the operator listener's own certificate, when it is self-signed).
    pub fn new(base: &str, token: Option<String>, ca: Option<&Path>) -> Result<Api, String> {
        let trust = ca.map_or(Trust::System, |p| Trust::SystemAnd(p.to_path_buf()));
        Client::new(base, token, &trust, Duration::from_secs(30)).map(Api)
    }

    /// One request; the body of a 2xx answer, else what went wrong.
    fn call(&self, method: &str, path: &str) -> Result<String, String> {
        self.0.text(method, path).map_err(explain)
    }
}

/// An answer that is not the one expected as it is; no answer as corral out of reach.
fn explain(e: Error) -> String {
    if e.answered() {
        e.to_string()
    } else {
        format!("cannot reach corral: {e}")
    }
}

fn fetch(api: &Api, path: &str) -> Result<serde_json::Value, ExitCode> {
    api.0.json(path).map_err(|e| {
        eprintln!("corral: {}", explain(e));
        ExitCode::from(1)
    })
}

/// Fetches `path`; with `--json` prints it and returns None (done), else returns it for a table.
fn fetch_table(api: &Api, path: &str, json: bool) -> Result<Option<serde_json::Value>, ExitCode> {
    let v = fetch(api, path)?;
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

pub fn status(api: &Api, json: bool) -> ExitCode {
    let v = match fetch_table(api, "/api/v1/clusters", json) {
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

pub fn nodes(api: &Api, json: bool) -> ExitCode {
    let v = match fetch_table(api, "/api/v1/nodes", json) {
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

pub fn events(api: &Api, json: bool, limit: u32) -> ExitCode {
    let v = match fetch_table(api, &format!("/api/v1/events?limit={limit}"), json) {
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
pub fn release(api: &Api, mac: &str, json: bool) -> ExitCode {
    match api.call("POST", &format!("/api/v1/nodes/{mac}/release")) {
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
