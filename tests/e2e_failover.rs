//! Failover with real VMs: the cluster `web` has 2 slots on VMs n1 and n2, each with its own slot disk
//! (an NBD overlay), corral's agent heartbeating and the test OS's application (busybox httpd, run by the
//! agent as a service group) answering corral's HTTP probe. n3 waits in the pool. Every VM is switched
//! by QEMU's QMP.
//!
//! (b) n1 is made slow (its probe answers after 1.2 s, the rule says > 500 ms for 8 s): corral hands its
//!     slot to n3, which boots with web-1's identity and finds n1's file on the slot's disk; n1 is drained
//!     (its stop hook runs), switched off and on, and returns to the pool.
//! (a) n2 is killed (QMP `quit`) after writing to its slot's disk: corral sees the heartbeats stop, fences
//!     it, and boots n1 (back in the pool) into web-2: its marker shows web-2 and the file n2 wrote.
//! (c) n3 is killed too, with no node left in the pool: corral raises an alert, as an event and as a
//!     webhook call that a test HTTP server receives.
//!
//! Detection and failover times are printed (`FAILOVER` lines; bench/failover.sh collects them); the test
//! checks behaviour only.

mod common;

use corral::lab::{vm_mac, Firmware, Lab, Vm};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn policy(nodes: &[(String, PathBuf)], webhook: &str) -> String {
    let mut p = format!(
        r#"
[settings]
cooldown = 0
heartbeat_interval = "1s"
power_off_timeout = "10s"
boot_timeout = "180s"
alert_webhook = "{webhook}"

[[cluster]]
name = "web"
priority = 5
min = 2
max = 2
default = 2
images = ["app"]
disk = "base"
identity = {{ hostname = "web-{{n}}" }}
drain = {{ grace = "5s" }}

[cluster.health]
heartbeat_timeout = "6s"
on_failure = "pool"
failover_attempts = 2
probe = {{ port = 80, path = "/cgi-bin/health", body = "ok", interval = "2s", timeout = "2s", failures = 3 }}
slow = [{{ metric = "probe_ms", above = 500.0, for = "8s" }}]
"#
    );
    for (mac, qmp) in nodes {
        p.push_str(&format!(
            "\n[[node]]\nmac = \"{mac}\"\npower = {{ driver = \"qemu\", qmp = \"{}\" }}\n",
            qmp.display()
        ));
    }
    p
}

use common::{lab_api as api, lab_events as events, lab_log as corral_log, lab_wait as wait, tail};

fn event_of(lab: &Lab, kind: &str, mac: &str) -> Option<serde_json::Value> {
    events(lab)
        .into_iter()
        .find(|e| e["kind"] == kind && e["node"].as_str() == Some(mac))
}

/// The part of a VM's serial log after byte `from`.
fn log_after(vm: &Vm, from: usize) -> String {
    let l = vm.log();
    l.get(from..).unwrap_or("").to_string()
}

/// Waits for a serial line holding `needle` after byte `from`; returns the line.
fn wait_line(vm: &Vm, from: usize, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = log_after(vm, from).lines().find(|l| l.contains(needle)) {
            return l.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{}: no `{needle}` within {timeout:?}:\n{}",
            vm.name,
            tail(&vm.log(), 3000)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// QMP `quit`: the VM is gone at once, as a node that loses power.
fn qmp_quit(qmp: &Path) {
    let s = std::os::unix::net::UnixStream::connect(qmp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    let mut w = s;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    w.write_all(b"{\"execute\":\"quit\"}\n").unwrap();
    line.clear();
    let _ = r.read_line(&mut line);
}

/// The VM's address, from its agent's start line.
fn ip_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .unwrap_or_default()
        .to_string()
}

fn secs(e: &serde_json::Value) -> f64 {
    e["secs"].as_f64().unwrap_or(f64::NAN)
}

/// Detection and total from a failover-done message ("... detected after D s ...").
fn figures(what: &str, done: &serde_json::Value) {
    let msg = done["message"].as_str().unwrap_or("");
    let grab = |after: &str| {
        msg.split(after)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let detect = grab("detected after ");
    let server = grab("s, ");
    eprintln!(
        "FAILOVER {what}: detection {detect:.2} s, failure to healthy replacement {:.2} s, server side {server:.3} s (TCG)",
        secs(done)
    );
}

#[test]
fn failed_and_slow_nodes_are_replaced_and_no_spare_raises_an_alert() {
    if !common::need_root("namespaces and taps") {
        return;
    }
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let images = common::testos_catalog(
        tmp.path(),
        &["app"],
        "console=ttyS0 panic=-1 quiet corral.slot={{cluster}}/{{slot}} corral.hostname={{hostname}} corral.disk={{disk}} corral.testos.write={{mac}} {{agent}}",
    );
    let disks = common::base_disk(tmp.path());

    let mut lab = Lab::new(&tmp.path().join("lab")).unwrap();
    lab.disks_dir = Some(disks);
    // The webhook receiver: a small HTTP server in the server's namespace that logs each POST body.
    let hook_log = lab.dir.join("webhook.jsonl");
    let hook_port = 9099;
    let receiver = format!(
        r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open("{log}", "ab") as f:
            f.write(body + b"\n")
        self.send_response(204)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("0.0.0.0", {hook_port}), H).serve_forever()
"#,
        log = hook_log.display()
    );
    let ns = lab.server_ns.clone();
    lab.spawn_in(&ns, "python3", &["-c", &receiver], "webhook.log")
        .unwrap();
    let webhook = format!("http://{}:{hook_port}/alerts", lab.server_ip());

    let nodes: Vec<(String, PathBuf)> = (1..=3)
        .map(|i| (vm_mac(lab.id, i), lab.dir.join(format!("n{i}.qmp"))))
        .collect();
    let policy_path = tmp.path().join("policy.toml");
    std::fs::write(&policy_path, policy(&nodes, &webhook)).unwrap();
    lab.start_corral_with(
        Path::new(env!("CARGO_BIN_EXE_corral")),
        "full",
        &images,
        &root.join("boot-scripts"),
        Some(&policy_path),
    )
    .unwrap();

    // n1 and n2 fill web-1 and web-2 (one at a time, so n1 is web-1); n3 parks in the pool.
    let mut vms: Vec<Vm> = Vec::new();
    let mut ips = Vec::new();
    for i in 1..=2 {
        let mut vm = lab
            .vm_with_power(&format!("n{i}"), Firmware::Bios, &vm_mac(lab.id, i))
            .unwrap();
        let (line, s) = vm
            .wait_for("CORRAL-AGENT start", BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", tail(&corral_log(&lab), 3000)));
        assert!(line.contains(&format!("host=web-{i}")), "{line}");
        eprintln!("  n{i}: {line} after {s:.1} s");
        ips.push(ip_of(&line));
        vms.push(vm);
    }
    let mut n3 = lab
        .vm_with_power("n3", Firmware::Bios, &vm_mac(lab.id, 3))
        .unwrap();
    n3.wait_for("is parked", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vms.push(n3);
    let mac: Vec<String> = vms.iter().map(|v| v.mac.clone()).collect();
    // Both nodes answer the probe and run their service group.
    wait(
        &lab,
        "both nodes' service groups",
        Duration::from_secs(90),
        || {
            let view = api(&lab, "/api/v1/nodes");
            let ok = |m: &str| {
                view.as_array().is_some_and(|a| {
                    a.iter().any(|n| {
                        n["mac"] == m
                            && n["heartbeat"]["heartbeat"]["groups"][0]["state"] == "running"
                    })
                })
            };
            (ok(&mac[0]) && ok(&mac[1])).then_some(())
        },
    );

    // (b) n1 slow.
    let n1_mark = vms[0].log().len();
    let n3_mark = vms[2].log().len();
    let out = lab
        .run_in_server(
            "curl",
            &["-s", &format!("http://{}/cgi-bin/slow?1200", ips[0])],
        )
        .unwrap();
    assert!(out.contains("delay 1200"), "{out}");
    let slow = wait(&lab, "n1 found slow", Duration::from_secs(60), || {
        event_of(&lab, "health-slow", &mac[0])
    });
    eprintln!("  {}", slow["message"]);
    assert!(slow["message"]
        .as_str()
        .unwrap()
        .contains("probe_ms above 500"));
    let line = wait_line(&vms[2], n3_mark, "CORRAL-AGENT start", BOOT_TIMEOUT);
    assert!(
        line.contains("host=web-1"),
        "n3 takes web-1's identity: {line}"
    );
    let disk = log_after(&vms[2], n3_mark);
    assert!(
        disk.contains(&format!("CORRAL-DISK found={}", mac[0])),
        "n3 reads what n1 wrote to web-1's disk:\n{}",
        tail(&disk, 3000)
    );
    let done = wait(&lab, "the slow failover to finish", BOOT_TIMEOUT, || {
        event_of(&lab, "failover-done", &mac[2])
    });
    figures("slow", &done);
    // n1 was drained (the agent stopped its group, the image's stop hook ran), and went back to the pool.
    wait_line(
        &vms[0],
        n1_mark,
        "CORRAL-STOP-HOOK host=web-1",
        Duration::from_secs(60),
    );
    wait(&lab, "n1 back in the pool", BOOT_TIMEOUT, || {
        let k: Vec<String> = events(&lab)
            .iter()
            .filter(|e| e["node"].as_str() == Some(&mac[0]))
            .map(|e| e["kind"].as_str().unwrap_or("").to_string())
            .collect();
        k.contains(&"move-done".to_string()).then_some(())
    });
    wait_line(&vms[0], n1_mark, "is parked", BOOT_TIMEOUT);

    // (a) n2 dies after writing to web-2's disk (its boot wrote its MAC to node.txt, synced and detached).
    assert!(vms[1]
        .log()
        .contains(&format!("CORRAL-DISK wrote={}", mac[1])));
    let n1_mark = vms[0].log().len();
    qmp_quit(vms[1].qmp.as_ref().unwrap());
    let killed = Instant::now();
    eprintln!("  killed n2 ({})", mac[1]);
    let failed = wait(&lab, "n2's failure", Duration::from_secs(60), || {
        event_of(&lab, "health-failed", &mac[1])
    });
    eprintln!(
        "  {} ({:.1} s after the kill)",
        failed["message"],
        killed.elapsed().as_secs_f64()
    );
    assert!(failed["message"].as_str().unwrap().contains("no heartbeat"));
    let fence = wait(&lab, "n2 fenced", Duration::from_secs(60), || {
        event_of(&lab, "fence", &mac[1])
    });
    assert!(fence["message"]
        .as_str()
        .unwrap()
        .contains("export is closed"));
    let line = wait_line(&vms[0], n1_mark, "CORRAL-AGENT start", BOOT_TIMEOUT);
    assert!(
        line.contains("host=web-2"),
        "n1 takes web-2's identity: {line}"
    );
    let after = log_after(&vms[0], n1_mark);
    assert!(
        after.contains(&format!("CORRAL-DISK found={}", mac[1])),
        "n1 reads the file the dead n2 wrote:\n{}",
        tail(&after, 3000)
    );
    let done = wait(&lab, "the failover of web-2", BOOT_TIMEOUT, || {
        event_of(&lab, "failover-done", &mac[0])
    });
    figures("killed", &done);
    let view = api(&lab, "/api/v1/nodes");
    let state = |m: &str| {
        view.as_array()
            .unwrap()
            .iter()
            .find(|n| n["mac"] == m)
            .map(|n| n["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(
        state(&mac[1]).as_deref(),
        Some("failed"),
        "the dead node stays failed"
    );
    assert_eq!(state(&mac[0]).as_deref(), Some("assigned"));
    assert_eq!(state(&mac[2]).as_deref(), Some("assigned"));

    // (c) n3 dies and nobody is left: an alert, and the webhook hears of it.
    qmp_quit(vms[2].qmp.as_ref().unwrap());
    eprintln!("  killed n3 ({}); no spare left", mac[2]);
    let alert = wait(&lab, "an alert", Duration::from_secs(60), || {
        events(&lab).into_iter().find(|e| {
            e["kind"] == "alert"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no eligible node") && m.contains(&mac[2]))
        })
    });
    eprintln!("  {}", alert["message"]);
    let hook = wait(&lab, "the webhook call", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&hook_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["kind"] == "alert"
                    && v["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("no eligible node"))
            })
    });
    assert_eq!(hook["cluster"], "web");
    assert_eq!(hook["node"].as_str(), Some(mac[2].as_str()));
    eprintln!("failover end to end: {:.0} s", t0.elapsed().as_secs_f64());
}
