//! corral killed with SIGKILL at random moments while a node moves between clusters, over loopback with
//! the real `corral-agent` and the `command` power driver (no VMs). Each run: the node boots into `web`
//! and heartbeats; the policy then wants it in `db` (higher priority, preempts), so corral drains it
//! through its agent, powers it off, resets and powers it on; somewhere in that (a seeded random moment)
//! corral is killed and started again on the same state directory.
//!
//! After every restart: the node's assignment survived (exactly one slot, no slot with two nodes), its
//! address stayed its own, the move that was under way is resumed (a `move-resumed` event) or had
//! already finished, and the move then completes (`move-done`) with the node in `db`. The number of runs
//! is `CORRAL_CRASH_RUNS` (default 12); a failing run prints its seed, and `CORRAL_CRASH_SEED` replays it.

mod common;

use common::{free_port, get, start, wait_for, Rng};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:cc:00:01";

fn agent(dir: &Path, http: u16, token: &str, n: u32) -> common::AgentProcess {
    common::agent(dir, http, token, n, &[])
}

fn policy(db: u32, dir: &Path) -> String {
    common::move_policy(db, dir, MAC, "0.3", "120s")
}

fn api(http: u16, path: &str) -> serde_json::Value {
    serde_json::from_str(&get(&format!("http://127.0.0.1:{http}{path}"))).unwrap()
}

fn kinds(http: u16) -> Vec<String> {
    api(http, "/api/v1/events?limit=1000")
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The node's slots as the API reports them: (cluster, slot) for every assignment of the node, and
/// whether any slot has two nodes.
fn assignments(http: u16) -> (Vec<String>, bool) {
    let nodes = api(http, "/api/v1/nodes");
    let mut mine = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut doubled = false;
    for n in nodes.as_array().into_iter().flatten() {
        let (Some(c), Some(s)) = (n["cluster"].as_str(), n["slot"].as_u64()) else {
            continue;
        };
        doubled |= !seen.insert((c.to_string(), s));
        if n["mac"] == MAC {
            mine.push(format!("{c}/{s}"));
        }
    }
    (mine, doubled)
}

/// A GET that may fail (corral is down for a moment in every run).
fn try_get(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "-m", "5", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The simulated node: while its power is off (the `off` file) its agent is gone; when it is switched
/// on again it boots: fetches its script and starts an agent with the new token. Runs until `stop`.
fn node(
    dir: std::path::PathBuf,
    http: u16,
    first: common::AgentProcess,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let boot = format!("http://127.0.0.1:{http}/boot/{MAC}?buildarch=x86_64");
        let mut running = Some(first);
        let (mut was_off, mut boots) = (false, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if dir.join("off").exists() {
                running = None;
                was_off = true;
            } else if was_off {
                if let Some(script) = try_get(&boot) {
                    if script.contains("corral.token=") {
                        boots += 1;
                        running = Some(agent(&dir, http, &common::token(&script), 1 + boots));
                        was_off = false;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(running);
        boots
    })
}

fn count(k: &[String], kind: &str) -> usize {
    k.iter().filter(|x| *x == kind).count()
}

/// One run: boots, starts the move, kills corral after `kill_after`, restarts, and checks.
fn run(seed: u64, kill_after: Duration) -> Result<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let http = free_port();
    common::agent_image(dir, "img");
    // The drain takes a moment, so kills land in every step.
    std::fs::write(dir.join("drain.sh"), "#!/bin/sh\nsleep 0.5\n").unwrap();
    std::fs::write(dir.join("policy.toml"), policy(0, dir)).unwrap();
    common::loopback_config(dir, http, "", &common::reservation(MAC, "127.0.0.1"));
    let server = start(dir, http);
    let boot = format!("http://127.0.0.1:{http}/boot/{MAC}?buildarch=x86_64");
    let script = get(&boot);
    if !script.contains("host=web-1") {
        return Err(format!("first boot is not web-1: {script}"));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sim = node(
        dir.to_path_buf(),
        http,
        agent(dir, http, &common::token(&script), 1),
        stop.clone(),
    );
    let finish = |r: Result<String, String>| {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = sim.join();
        r
    };
    wait_for("the first heartbeat", 30, || {
        kinds(http).iter().any(|k| k == "agent-up")
    });

    // db wants the node; corral is killed somewhere in the move.
    std::fs::write(dir.join("policy.toml"), policy(1, dir)).unwrap();
    let t0 = Instant::now();
    wait_for("the move to start", 30, || {
        kinds(http).iter().any(|k| k == "move-start")
    });
    std::thread::sleep(kill_after.saturating_sub(t0.elapsed()));
    let before = kinds(http);
    server.crash();
    let at = before
        .iter()
        .rev()
        .find(|k| k.starts_with("move-"))
        .cloned()
        .unwrap_or_default();
    let server = start(dir, http);

    // Nothing lost: the node is in exactly one slot (db/0, decided before the kill), no slot twice.
    let (mine, doubled) = assignments(http);
    if doubled {
        return finish(Err("a slot has two nodes after the restart".into()));
    }
    if mine != ["db/0"] {
        return finish(Err(format!(
            "after the restart the node holds {mine:?}, not db/0"
        )));
    }
    let after = kinds(http);
    let finished = before.iter().any(|k| k == "move-done");
    let resumed = after.iter().any(|k| k == "move-resumed");
    if !finished && !resumed {
        return finish(Err(format!(
            "the move (at {at}) was neither finished nor resumed: {after:?}"
        )));
    }
    // The resumed move runs to its end: the node boots into db and its new agent confirms it.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !finished && count(&kinds(http), "move-done") == 0 {
        if Instant::now() > deadline {
            return finish(Err(format!(
                "the move did not complete after the restart (killed at {at}): {:?}",
                kinds(http)
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mine, doubled) = assignments(http);
    if doubled || mine != ["db/0"] {
        return finish(Err(format!(
            "after the move: {mine:?} (two in a slot: {doubled})"
        )));
    }
    let r = finish(Ok(format!(
        "seed {seed}: killed {:.2} s into the move at {}; {}",
        kill_after.as_secs_f64(),
        if at.is_empty() { "(none)" } else { &at },
        if finished { "already done" } else { "resumed" }
    )));
    drop(server);
    r
}

#[test]
fn sigkill_during_moves_loses_nothing_and_every_move_resumes() {
    let runs: u64 = std::env::var("CORRAL_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seeds: Vec<u64> = match std::env::var("CORRAL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=runs).map(|i| i * 0x9e37_79b9 + 17).collect(),
    };
    let (mut resumed, mut done) = (0, 0);
    for seed in seeds {
        let mut rng = Rng(seed);
        // A move here takes about 3 s (drain hook 0.5 s, each power call 0.3 s, the new boot): kills from
        // its start to 3.4 s in land in every step and, now and then, just after its end.
        let kill_after = Duration::from_millis(rng.next() % 3400);
        match run(seed, kill_after) {
            Ok(line) => {
                eprintln!("{line}");
                if line.ends_with("resumed") {
                    resumed += 1;
                } else {
                    done += 1;
                }
            }
            Err(e) => panic!("seed {seed} (replay with CORRAL_CRASH_SEED={seed}): {e}"),
        }
    }
    eprintln!("crash campaign: {resumed} moves resumed after SIGKILL, {done} already done; 0 lost assignments, 0 slots with two nodes");
}

const A: &str = "52:54:00:cc:01:01";
const B: &str = "52:54:00:cc:01:02";

/// One slot, two nodes switched by `command` power scripts (each node's power state is a file); failed
/// nodes are fenced and go back to the pool.
fn failover_policy(dir: &Path) -> String {
    let mut p = r#"
[settings]
cooldown = 0
heartbeat_interval = "1s"
boot_timeout = "60s"

[[cluster]]
name = "app"
min = 0
max = 1
default = 1
images = ["img"]
identity = { hostname = "app-{n}" }

[cluster.health]
heartbeat_timeout = "2s"
on_failure = "pool"
failover_attempts = 3
"#
    .to_string();
    for (i, mac) in [A, B].iter().enumerate() {
        let d = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let d = d.display();
        p.push_str(&format!(
            "\n[[node]]\nmac = \"{mac}\"\npower = {{ driver = \"command\", on = \"sleep 0.2; echo on >> {d}/power.log\", off = \"sleep 0.2; echo off >> {d}/power.log\", status = \"tail -n1 {d}/power.log 2>/dev/null | grep -q off && echo off || echo on\" }}\n"
        ));
    }
    p
}

/// Heartbeats for the tokens in `beats` every 300 ms until `stop` (the pretend agents).
fn beat(
    http: u16,
    beats: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for t in beats.lock().unwrap().clone() {
                common::post_bearer(
                    http,
                    "/api/v1/agent/heartbeat",
                    &t,
                    r#"{"hostname":"app-1","uptime_secs":5}"#,
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// One failover run: a fills the slot and heartbeats, then goes silent; corral is killed `kill_after`
/// later and started again; b (parked) must get the slot only after a is fenced,
/// and the failover must finish.
fn failover_run(seed: u64, kill_after: Duration) -> Result<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let http = free_port();
    common::agent_image(dir, "img");
    std::fs::write(dir.join("policy.toml"), failover_policy(dir)).unwrap();
    // Both pretend nodes ask from 127.0.0.1 (see `TRUSTED_LOOPBACK`).
    common::loopback_config(dir, http, "", common::TRUSTED_LOOPBACK);
    let server = start(dir, http);
    let boot = |mac: &str| {
        try_get(&format!(
            "http://127.0.0.1:{http}/boot/{mac}?buildarch=x86_64"
        ))
    };
    let a = boot(A).unwrap_or_default();
    if !a.contains("host=app-1") {
        return Err(format!("a did not get the slot: {a}"));
    }
    if !boot(B).unwrap_or_default().contains("is parked") {
        return Err("b is not parked".into());
    }
    let beats = std::sync::Arc::new(std::sync::Mutex::new(vec![common::token(&a)]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beater = beat(http, beats.clone(), stop.clone());
    let finish = |r: Result<String, String>| {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = beater.join();
        r
    };
    wait_for("a's agent", 20, || {
        kinds(http).iter().any(|k| k == "agent-up")
    });
    // a goes silent, and corral is killed at a random moment: before it notices (a must then be found
    // by its heartbeat timeout after the restart), or during the fence and the replacement.
    beats.lock().unwrap().clear();
    std::thread::sleep(kill_after);
    let before = kinds(http);
    server.crash();
    let at = before.last().cloned().unwrap_or_default();
    let server = start(dir, http);
    let (slots, doubled) = assignments_of(http, "app");
    if doubled {
        return finish(Err("a slot has two nodes after the restart".into()));
    }
    // b polls as a parked node does; the first time its script names the slot, a must be off already.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let script = boot(B).unwrap_or_default();
        if script.contains("host=app-1") {
            let a_power = std::fs::read_to_string(dir.join("n0/power.log")).unwrap_or_default();
            if !a_power.lines().any(|l| l == "off") {
                return finish(Err(format!(
                    "b got a's slot before a was fenced (killed at {at}; a's power log {a_power:?})"
                )));
            }
            beats.lock().unwrap().push(common::token(&script));
            break;
        }
        if Instant::now() > deadline {
            return finish(Err(format!(
                "b never got the slot after the restart (killed at {at}; slots {slots:?}): {:?}",
                kinds(http)
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !kinds(http).iter().any(|k| k == "failover-done") {
        if Instant::now() > deadline {
            return finish(Err(format!(
                "the failover did not finish after the restart (killed at {at}): {:?}",
                kinds(http)
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (slots, doubled) = assignments_of(http, "app");
    if doubled || slots != [B] {
        return finish(Err(format!("after the failover: {slots:?}")));
    }
    let resumed = kinds(http).iter().any(|k| k.ends_with("-resumed"));
    let r = finish(Ok(format!(
        "seed {seed}: killed {:.2} s after the last heartbeat, last event {at}; {}",
        kill_after.as_secs_f64(),
        if resumed {
            "resumed"
        } else {
            "nothing under way"
        }
    )));
    drop(server);
    r
}

/// The nodes holding a cluster's slots, and whether a slot has two.
fn assignments_of(http: u16, cluster: &str) -> (Vec<String>, bool) {
    let nodes = api(http, "/api/v1/nodes");
    let mut seen = std::collections::BTreeSet::new();
    let (mut macs, mut doubled) = (Vec::new(), false);
    for n in nodes.as_array().into_iter().flatten() {
        if n["cluster"].as_str() != Some(cluster) {
            continue;
        }
        doubled |= !seen.insert(n["slot"].as_u64());
        macs.push(n["mac"].as_str().unwrap_or("").to_string());
    }
    (macs, doubled)
}

#[test]
fn sigkill_during_failovers_fences_before_reuse_and_every_failover_finishes() {
    let runs: u64 = std::env::var("CORRAL_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seeds: Vec<u64> = match std::env::var("CORRAL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=runs).map(|i| i * 0x85eb_ca6b + 3).collect(),
    };
    let (mut resumed, mut quiet) = (0, 0);
    for seed in seeds {
        let mut rng = Rng(seed);
        // Detection comes 2 s after the last heartbeat; the fence (a 0.2 s power call), the settle time
        // (1.5 s) and the replacement's choice follow within about 2.5 s.
        let kill_after = Duration::from_millis(rng.next() % 4500);
        match failover_run(seed, kill_after) {
            Ok(line) => {
                eprintln!("{line}");
                if line.ends_with("resumed") {
                    resumed += 1;
                } else {
                    quiet += 1;
                }
            }
            Err(e) => panic!("seed {seed} (replay with CORRAL_CRASH_SEED={seed}): {e}"),
        }
    }
    eprintln!("failover crash campaign: {resumed} failovers resumed after SIGKILL, {quiet} with nothing under way; 0 slots reused before the fence, 0 slots with two nodes");
}
