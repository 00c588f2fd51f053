//! The agent, the agent API and the mover on loopback, without VMs: a node "boots" by fetching its script
//! (which carries its boot token), the real `corral-agent` runs with that token and heartbeats; the policy
//! moves the node to a higher-priority cluster, and corral drives the whole move through the agent (drain
//! hook, poweroff command) and the `command` power driver (the operator's scripts, here writing files);
//! the node "reboots" by fetching its new script and a second agent with the new token confirms the move.
//! Also: tokens of earlier boots and unknown tokens are refused; secrets never reach the API.

mod common;

use common::{free_port, get, start, wait_for};
use std::path::Path;
use std::process::Command;

const MAC: &str = "52:54:00:aa:00:01";

fn agent(dir: &Path, http: u16, token: &str, n: u32) -> common::AgentProcess {
    common::agent(
        dir,
        http,
        token,
        n,
        &["--busy-file".into(), dir.join("busy").into_os_string()],
    )
}

fn policy(db: u32, dir: &Path) -> String {
    common::move_policy(db, dir, MAC, "", "60s")
}

fn events(http: u16) -> serde_json::Value {
    serde_json::from_str(&get(&format!(
        "http://127.0.0.1:{http}/api/v1/events?limit=500"
    )))
    .unwrap()
}

fn has_event(http: u16, kind: &str) -> bool {
    events(http)
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == kind)
}

fn status(url: &str, token: &str, body: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--data", body, url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_drains_powers_off_and_confirms_a_move_with_the_command_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let http = free_port();
    // The image's command line carries the agent's settings.
    common::agent_image(dir, "img");
    std::fs::write(
        dir.join("drain.sh"),
        format!("#!/bin/sh\necho drained > {}/drained\n", dir.display()),
    )
    .unwrap();
    std::fs::write(dir.join("policy.toml"), policy(0, dir)).unwrap();
    common::loopback_config(dir, http, "", &common::reservation(MAC, "127.0.0.1"));
    let _server = start(dir, http);
    let boot = format!("http://127.0.0.1:{http}/boot/{MAC}?buildarch=x86_64");

    // First boot: web-1.
    let script = get(&boot);
    assert!(script.contains("host=web-1"), "{script}");
    let t1 = common::token(&script);
    let a1 = agent(dir, http, &t1, 1);
    wait_for("the first heartbeat", 20, || has_event(http, "agent-up"));
    let nodes = get(&format!("http://127.0.0.1:{http}/api/v1/nodes"));
    assert!(
        nodes.contains("\"mem_total_kib\""),
        "heartbeat figures in the node view: {nodes}"
    );

    // Bad tokens are refused.
    let hb = format!("http://127.0.0.1:{http}/api/v1/agent/heartbeat");
    assert_eq!(status(&hb, "nope", "{}"), "401");
    assert_eq!(status(&hb, &t1, "{not json"), "400");

    // db wants the node: drain (hook), poweroff (agent runs its command), seen off by the status script,
    // powered on by the on script, confirmed by the new boot's agent.
    std::fs::write(dir.join("policy.toml"), policy(1, dir)).unwrap();
    wait_for("the drain hook", 30, || dir.join("drained").exists());
    wait_for("the power-on", 30, || {
        std::fs::read_to_string(dir.join("power.log"))
            .unwrap_or_default()
            .contains("on")
    });
    assert!(!dir.join("off").exists(), "the on script ran");
    drop(a1);
    // The node reboots: its new script names its new role and a new token; the old one stops working.
    let script = get(&boot);
    assert!(script.contains("host=db-1"), "{script}");
    let t2 = common::token(&script);
    assert_ne!(t1, t2);
    // Fetched again in the same boot: the same token.
    assert_eq!(common::token(&get(&boot)), t2, "one token per boot");
    // Until the new boot's token is used, the earlier one is still honoured (a script fetched but not
    // booted must not cut a running agent off): its request gets past the token check to the body check.
    assert_eq!(status(&hb, &t1, "{not json"), "400");
    let _a2 = agent(dir, http, &t2, 2);
    wait_for("the move to be confirmed", 30, || {
        has_event(http, "move-done")
    });
    assert_eq!(
        status(&hb, &t1, "{}"),
        "401",
        "the earlier boot's token is dead once the new one is used"
    );
    // Another host asking for the node's script gets neither script nor token, and changes nothing.
    let foreign = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--interface",
            "127.0.0.9",
            &boot,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&foreign.stdout), "403");
    assert_eq!(
        status(&hb, &t2, "{not json"),
        "400",
        "the node's token still works"
    );
    let ev = events(http);
    let kinds: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    let want = [
        "move-start",
        "move-drain",
        "move-power-off",
        "move-reset",
        "move-power-on",
        "move-confirmed",
        "move-done",
    ];
    let got: Vec<&str> = kinds.iter().copied().filter(|k| want.contains(k)).collect();
    assert_eq!(got, want, "{ev:#}");
    let text = ev.to_string();
    assert!(text.contains("by its agent"), "{text}");
    let node = get(&format!("http://127.0.0.1:{http}/api/v1/nodes"));
    assert!(node.contains("\"assigned\""), "{node}");
}
