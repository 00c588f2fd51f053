//! Re-provisioning with real VMs and real power switches (QEMU's QMP): three VMs run the `web` cluster,
//! each with corral's agent heartbeating. The higher-priority `db` cluster raises its desired count to 1:
//! corral takes a web node, asks its agent to drain (the image's stop hook prints on the serial console),
//! the agent powers it off, corral sees it off over QMP, fences its disk, powers it on, and the VM boots the
//! db image and heartbeats with its new identity. Every step is an event.
//!
//! Then a node that never comes back: db asks for a second node; the test kills the chosen VM's QEMU as
//! soon as corral has switched it on again. No heartbeat comes within `boot_timeout`: corral marks it
//! failed and takes another node, which boots into the slot.

mod common;

use corral::lab::{vm_mac, Firmware, Lab, Vm};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Two images on the test OS that run the agent with the slot's identity.
fn catalog(dir: &Path) -> PathBuf {
    common::testos_catalog(dir, &["web-a", "db-a"], "console=ttyS0 panic=-1 quiet corral.image={{image}} corral.slot={{cluster}}/{{slot}} corral.hostname={{hostname}} {{agent}}")
}

fn policy(db_default: u32, nodes: &[(String, PathBuf)]) -> String {
    let mut p = format!(
        r#"
[settings]
cooldown = 0
heartbeat_interval = "1s"
power_off_timeout = "10s"
boot_timeout = "75s"

[[cluster]]
name = "db"
priority = 10
min = 0
max = 2
default = {db_default}
preempt = true
images = ["db-a"]
identity = {{ hostname = "db-{{n}}" }}
drain = {{ grace = "5s" }}

[[cluster]]
name = "web"
priority = 1
min = 0
max = 3
default = 3
images = ["web-a"]
identity = {{ hostname = "web-{{n}}" }}
drain = {{ grace = "5s" }}
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

use common::{lab_api as api, lab_log as corral_log, lab_wait as wait, tail};

/// Events of one node, oldest first.
fn events_of(lab: &Lab, mac: &str) -> Vec<serde_json::Value> {
    common::lab_events(lab)
        .into_iter()
        .filter(|e| e["node"].as_str() == Some(mac))
        .collect()
}

fn kinds(ev: &[serde_json::Value]) -> Vec<String> {
    ev.iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The agent-up event of a node for a role, if any.
fn agent_up_as(lab: &Lab, mac: &str, host: &str) -> bool {
    events_of(lab, mac).iter().any(|e| {
        e["kind"] == "agent-up"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("up as {host} ")))
    })
}

#[test]
fn a_running_node_moves_to_a_higher_cluster_and_a_dead_one_is_replaced() {
    if !common::need_root("namespaces and taps") {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let images = catalog(tmp.path());
    let mut lab = Lab::new(&tmp.path().join("lab")).unwrap();
    let nodes: Vec<(String, PathBuf)> = (1..=3)
        .map(|i| (vm_mac(lab.id, i), lab.dir.join(format!("n{i}.qmp"))))
        .collect();
    let policy_path = tmp.path().join("policy.toml");
    std::fs::write(&policy_path, policy(0, &nodes)).unwrap();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts");
    lab.start_corral_with(
        Path::new(env!("CARGO_BIN_EXE_corral")),
        "full",
        &images,
        &scripts,
        Some(&policy_path),
    )
    .unwrap();

    // Three web nodes come up and heartbeat.
    let mut vms: Vec<Vm> = (1..=3)
        .map(|i| {
            lab.vm_with_power(&format!("n{i}"), Firmware::Bios, &vm_mac(lab.id, i))
                .unwrap()
        })
        .collect();
    for vm in &mut vms {
        let (line, secs) = vm
            .wait_for("CORRAL-AGENT start", BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", tail(&corral_log(&lab), 3000)));
        assert!(line.contains("host=web-"), "{line}");
        eprintln!("  {} runs {line} after {secs:.1} s", vm.name);
    }
    for vm in &vms {
        let mac = vm.mac.clone();
        wait(&lab, "first heartbeats", Duration::from_secs(60), || {
            events_of(&lab, &mac)
                .iter()
                .any(|e| e["kind"] == "agent-up")
                .then_some(())
        });
    }

    // db wants one node: one web node is drained, switched off and on, and boots as db-1.
    std::fs::write(&policy_path, policy(1, &nodes)).unwrap();
    let moved = wait(&lab, "a move to start", Duration::from_secs(30), || {
        vms.iter()
            .position(|v| kinds(&events_of(&lab, &v.mac)).contains(&"move-start".to_string()))
    });
    let mac = vms[moved].mac.clone();
    eprintln!("  moving {} ({mac})", vms[moved].name);
    wait(&lab, "the move to finish", BOOT_TIMEOUT, || {
        let k = kinds(&events_of(&lab, &mac));
        (k.contains(&"move-done".to_string()) || k.contains(&"node-failed".to_string()))
            .then_some(())
    });
    let ev = events_of(&lab, &mac);
    let k = kinds(&ev);
    let steps: Vec<&str> = [
        "move-start",
        "move-drain",
        "move-power-off",
        "move-reset",
        "move-power-on",
        "move-confirmed",
        "move-done",
    ]
    .to_vec();
    let mut at = 0;
    for s in &steps {
        let i = k[at..]
            .iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("no {s} after {:?} in {k:?}\n{ev:#?}", &k[..at]));
        at += i + 1;
    }
    for e in &ev {
        let kind = e["kind"].as_str().unwrap_or("");
        if kind.starts_with("move-") && kind != "move-manual" {
            assert!(e["secs"].is_number(), "{kind} carries its duration: {e}");
        }
        eprintln!(
            "    {kind:16} {:>8} {}",
            e["secs"],
            e["message"].as_str().unwrap_or("")
        );
    }
    // The VM's own view: its stop hook ran as the web node, then it came back as db-1.
    let log = vms[moved].log();
    let hook = log
        .find("CORRAL-STOP-HOOK host=web-")
        .unwrap_or_else(|| panic!("the stop hook did not run:\n{}", tail(&log, 3000)));
    let after = &log[hook..];
    assert!(
        after.contains("CORRAL-AGENT start host=db-1"),
        "did not come back as db-1:\n{}",
        tail(&log, 3000)
    );
    assert!(after.contains("corral.image=db-a"), "{}", tail(&log, 3000));
    assert!(agent_up_as(&lab, &mac, "db-1"), "no heartbeat as db-1");
    let view = api(&lab, "/api/v1/nodes");
    let me = view
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["mac"] == mac.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (me["cluster"].as_str(), me["state"].as_str()),
        (Some("db"), Some("assigned"))
    );
    assert_eq!(me["heartbeat"]["role"]["cluster"], "db");

    // db wants two: the next web node is taken and switched off and on, and dies before it boots.
    // corral marks it failed when no heartbeat comes and takes the last web node instead.
    std::fs::write(&policy_path, policy(2, &nodes)).unwrap();
    let victim = wait(
        &lab,
        "a second move to start",
        Duration::from_secs(30),
        || {
            vms.iter().position(|v| {
                v.mac != mac && kinds(&events_of(&lab, &v.mac)).contains(&"move-start".to_string())
            })
        },
    );
    let victim_mac = vms[victim].mac.clone();
    wait(
        &lab,
        "the victim to be switched on again",
        Duration::from_secs(60),
        || {
            kinds(&events_of(&lab, &victim_mac))
                .contains(&"move-power-on".to_string())
                .then_some(())
        },
    );
    assert!(vms[victim].log().contains("CORRAL-STOP-HOOK host=web-"));
    // Gone for good: the QEMU process is killed (the node never boots again).
    drop(vms.remove(victim));
    eprintln!("  killed {victim_mac} as it was switched on");
    wait(
        &lab,
        "the dead node to be marked failed",
        Duration::from_secs(150),
        || {
            kinds(&events_of(&lab, &victim_mac))
                .contains(&"node-failed".to_string())
                .then_some(())
        },
    );
    let last = vms.iter().position(|v| v.mac != mac).unwrap();
    let last_mac = vms[last].mac.clone();
    wait(
        &lab,
        "the replacement to finish its move",
        BOOT_TIMEOUT,
        || {
            kinds(&events_of(&lab, &last_mac))
                .contains(&"move-done".to_string())
                .then_some(())
        },
    );
    assert!(
        agent_up_as(&lab, &last_mac, "db-2"),
        "replacement not up as db-2"
    );
    let view = api(&lab, "/api/v1/nodes");
    let state = |m: &str| {
        view.as_array()
            .unwrap()
            .iter()
            .find(|n| n["mac"] == m)
            .map(|n| n["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state(&victim_mac).as_deref(), Some("failed"));
    assert_eq!(state(&last_mac).as_deref(), Some("assigned"));
    eprintln!("power end to end: {:.0} s", t0.elapsed().as_secs_f64());
}
