//! Failover paths on loopback, without VMs: corral with three known nodes switched by the `command`
//! power driver (scripts writing files), their "agents" played by the test (heartbeats over the real agent
//! API), and a webhook receiver.
//!
//! Node a fills the slot; its service group fails → corral quarantines it (left running: its power
//! script is never told off) and hands the slot to b. b never heartbeats within `boot_timeout` → marked
//! failed, and with `failover_attempts = 1` the failover gives up with an alert that the webhook
//! receives; the planner then gives the slot to c, which comes up. The quarantined node gets no work until
//! the operator releases it (`corral release`: power cycled, back in the pool when it boots); failed and
//! quarantined flags survive a restart.

mod common;

use common::{free_port, get, start, wait_for};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const A: &str = "52:54:00:bb:00:01";
const B: &str = "52:54:00:bb:00:02";
const C: &str = "52:54:00:bb:00:03";

fn policy(dir: &Path, hook: u16) -> String {
    let mut p = format!(
        r#"
[settings]
cooldown = 0
heartbeat_interval = "1s"
boot_timeout = "4s"
alert_webhook = "http://127.0.0.1:{hook}/alerts"

[[cluster]]
name = "app"
min = 0
max = 1
default = 1
images = ["img"]
identity = {{ hostname = "app-{{n}}" }}

[cluster.health]
heartbeat_timeout = "3s"
on_failure = "quarantine"
failover_attempts = 1
"#
    );
    for (i, mac) in [A, B, C].iter().enumerate() {
        let d = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let d = d.display();
        p.push_str(&format!(
            "\n[[node]]\nmac = \"{mac}\"\npower = {{ driver = \"command\", on = \"echo on >> {d}/power.log\", off = \"echo off >> {d}/power.log\", status = \"echo on\" }}\n"
        ));
    }
    p
}

use common::{events_on as events, post_bearer as post, token_of};

fn has(http: u16, kind: &str, node: &str) -> bool {
    events(http)
        .iter()
        .any(|e| e["kind"] == kind && e["node"].as_str() == Some(node))
}

fn state(http: u16, mac: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&get(&format!("http://127.0.0.1:{http}/api/v1/nodes"))).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|n| n["mac"] == mac)
        .map(|n| n["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The heartbeats the test sends for its pretend agents: token → group state.
type Beats = Arc<Mutex<Vec<(String, &'static str)>>>;

fn heartbeat_loop(http: u16, beats: Beats) {
    std::thread::spawn(move || loop {
        let list = beats.lock().unwrap().clone();
        for (token, group) in list {
            let body = format!(
                r#"{{"hostname":"app-1","uptime_secs":5,"groups":[{{"name":"app","state":"{group}","detail":"test"}}]}}"#
            );
            post(http, "/api/v1/agent/heartbeat", &token, &body);
        }
        std::thread::sleep(Duration::from_millis(400));
    });
}

/// Accepts webhook calls and keeps their bodies.
fn webhook_receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got: Arc<Mutex<Vec<String>>> = Default::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then Content-Length bytes of body.
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        g.lock().unwrap().push(body.to_string());
                        break;
                    }
                }
            }
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
    });
    (port, got)
}

#[test]
fn quarantine_retry_limit_alert_webhook_and_release() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let http = free_port();
    // The image's command line carries the agent's settings.
    common::agent_image(dir, "img");
    let (hook, calls) = webhook_receiver();
    std::fs::write(dir.join("policy.toml"), policy(dir, hook)).unwrap();
    common::loopback_config(
        dir,
        http,
        "api_token = \"op-secret-0123456789\"\n",
        // Several nodes ask from 127.0.0.1: this test is about health (see `TRUSTED_LOOPBACK`).
        common::TRUSTED_LOOPBACK,
    );
    let server = start(dir, http);
    let boot = |mac: &str| {
        get(&format!(
            "http://127.0.0.1:{http}/boot/{mac}?buildarch=x86_64"
        ))
    };
    let beats: Beats = Default::default();
    heartbeat_loop(http, beats.clone());

    // a boots into app-1 and its group runs; b and c are parked.
    let script = boot(A);
    assert!(script.contains("host=app-1"), "{script}");
    let ta = token_of(&script).unwrap();
    assert!(boot(B).contains("is parked"));
    assert!(boot(C).contains("is parked"));
    beats.lock().unwrap().push((ta.clone(), "running"));
    wait_for("a's agent", 20, || has(http, "agent-up", A));

    // a's service group fails: quarantined, left running; b gets the slot.
    beats.lock().unwrap()[0].1 = "failed";
    wait_for("a's failure", 20, || has(http, "health-failed", A));
    wait_for("a's quarantine", 10, || has(http, "quarantine", A));
    assert_eq!(state(http, A), "quarantined");
    let failed = events(http)
        .into_iter()
        .find(|e| e["kind"] == "health-failed")
        .unwrap();
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("service group app failed"),
        "{failed}"
    );
    // b is parked until a's connections are cut, then boots into the slot with the same identity.
    let mut tb = None;
    wait_for("b's script for the slot", 20, || {
        tb = token_of(&boot(B));
        tb.is_some()
    });
    assert!(boot(B).contains("host=app-1"));
    // b never heartbeats: failed after boot_timeout; one attempt allowed, so the failover gives up.
    wait_for("b marked failed", 30, || has(http, "node-failed", B));
    wait_for("the alert", 10, || {
        events(http).iter().any(|e| {
            e["kind"] == "alert"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("gave up after 1"))
        })
    });
    wait_for("the webhook", 10, || {
        calls
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.contains("gave up after 1") && b.contains("\"cluster\":\"app\""))
    });
    // The planner keeps going: c takes the slot and comes up.
    let mut tc = None;
    wait_for("c's script for the slot", 20, || {
        tc = token_of(&boot(C));
        tc.is_some()
    });
    beats.lock().unwrap().push((tc.unwrap(), "running"));
    wait_for("c's agent", 20, || has(http, "agent-up", C));
    assert_eq!(state(http, C), "assigned");
    assert_eq!(state(http, B), "failed");

    // The quarantined node was never switched off, and asking again gets it no work.
    let a_power = std::fs::read_to_string(dir.join("n0/power.log")).unwrap_or_default();
    assert!(
        !a_power.contains("off"),
        "quarantine leaves the node up: {a_power}"
    );
    assert!(boot(A).contains("is parked"));
    assert_eq!(state(http, A), "quarantined");

    // Out-of-service flags survive a restart of corral.
    server.crash();
    let _server = start(dir, http);
    assert_eq!(state(http, A), "quarantined");
    assert_eq!(state(http, B), "failed");

    // The operator releases it: wrong token refused, right token returns it to the pool.
    assert_eq!(
        post(http, &format!("/api/v1/nodes/{A}/release"), "wrong", ""),
        401
    );
    // The CLI takes the admin token from the config (never from its command line).
    let config = dir.join("corral.toml");
    let (code, out, err) = common::corral(&[
        "release",
        A,
        "--config",
        config.to_str().unwrap(),
        "--url",
        &format!("http://127.0.0.1:{http}"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("from quarantine") && out.contains("power cycled"),
        "{out}"
    );
    // Still running its old role until it restarts: back in the pool once it asks for a script.
    wait_for("a's power cycle", 10, || {
        std::fs::read_to_string(dir.join("n0/power.log"))
            .unwrap_or_default()
            .contains("off")
    });
    assert!(boot(A).contains("is parked"));
    assert_eq!(state(http, A), "idle");
    // Or from a file only its owner reads.
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, "op-secret-0123456789\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (code, _, err) = common::corral(&[
        "release",
        A,
        "--token-file",
        token_file.to_str().unwrap(),
        "--url",
        &format!("http://127.0.0.1:{http}"),
    ]);
    assert_eq!(code, 1, "a healthy node cannot be released: {err}");
    assert!(err.contains("HTTP 409"), "past the token check: {err}");
}
