//! The systemd unit and corral's side of it, checked by systemd's own tools: `systemd-analyze verify`
//! accepts `systemd/corral.service` (with the built binary in place of /usr/bin/corral),
//! `systemd-analyze security` rates its exposure at most 2.5, and `corral serve` speaks sd_notify as
//! `Type=notify` and `WatchdogSec=` expect (READY=1, then WATCHDOG=1 while it answers).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/corral.service");

/// The unit as installed, its commands pointing at the binary under test (verify checks they exist).
fn unit_copy(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(UNIT).unwrap();
    assert!(
        text.contains("ExecStart=/usr/bin/corral serve"),
        "the unit no longer starts /usr/bin/corral serve"
    );
    let p = dir.join("corral.service");
    std::fs::write(
        &p,
        text.replace("/usr/bin/corral", env!("CARGO_BIN_EXE_corral")),
    )
    .unwrap();
    p
}

#[test]
fn the_unit_verifies() {
    if !common::need_tools(&["systemd-analyze"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let unit = unit_copy(tmp.path());
    let (rc, out, err) = common::run("systemd-analyze", &["verify", unit.to_str().unwrap()]);
    assert_eq!(rc, 0, "systemd-analyze verify: {out}{err}");
    // verify reports unknown keys and bad values as warnings with exit 0 on some versions: none allowed.
    assert!(
        !err.contains("Unknown") && !err.contains("Failed to parse"),
        "systemd-analyze verify complained: {err}"
    );
}

#[test]
fn the_unit_exposure_is_at_most_2_5() {
    if !common::need_tools(&["systemd-analyze"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let unit = unit_copy(tmp.path());
    let unit = unit.to_str().unwrap();
    let (rc, out, err) = common::run(
        "systemd-analyze",
        &["security", "--offline=true", "--no-pager", unit],
    );
    assert_eq!(rc, 0, "systemd-analyze security: {out}{err}");
    let level: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for corral.service:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{out}"));
    assert!(level <= 2.5, "exposure {level} > 2.5:\n{out}");
    // systemd's own threshold check agrees (its scale is the level times ten).
    let (rc, out, _) = common::run(
        "systemd-analyze",
        &["security", "--offline=true", "--threshold=25", unit],
    );
    assert_eq!(
        rc, 0,
        "systemd-analyze security --threshold=25 failed:\n{out}"
    );
}

#[test]
fn serve_notifies_ready_and_pings_the_watchdog() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("policy.toml"), "[settings]\ncooldown = 0\n").unwrap();
    let port = common::free_port();
    common::loopback_config(dir, port, "", "");
    let notify = dir.join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["serve", "--config"])
        .arg(dir.join("corral.toml"))
        .env("NOTIFY_SOCKET", &notify)
        // 1.5 s: a ping every half second while every loop answers.
        .env("WATCHDOG_USEC", "1500000")
        .env_remove("WATCHDOG_PID")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _server = common::Server(child);

    let mut seen: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    // READY=1 first, then several WATCHDOG=1 (not one stray datagram).
    while seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 3 {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!(
                "no notification ({e}); seen {seen:?}; log:\n{}",
                std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
            ),
        };
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "too few watchdog pings: {seen:?}"
        );
    }
    let ready = seen.iter().position(|m| m.contains("READY=1"));
    let first_ping = seen.iter().position(|m| m.contains("WATCHDOG=1"));
    assert!(
        matches!((ready, first_ping), (Some(r), Some(w)) if r < w),
        "READY=1 must come before the first WATCHDOG=1: {seen:?}"
    );
    // Ready means serving.
    assert!(common::get(&format!("http://127.0.0.1:{port}/healthz")).contains("ok"));
}
