//! The policy engine with real netbooting VMs: four unknown VMs are discovered and fill two clusters by
//! priority, each booting the image link of its slot (slot 0 → link 1, slot 1 → link 2) as its serial marker
//! shows; raising the higher-priority cluster's desired count (policy edit, picked up on file change) moves a
//! node from the lower-priority cluster, and when that VM restarts it boots the new cluster's image; a bad
//! policy edit is rejected while VMs keep booting.

mod common;

use corral::lab::{vm_mac, Firmware, Lab, Vm};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// A catalog with four images that share the test OS but name themselves and their slot on the cmdline.
fn catalog(dir: &Path) -> PathBuf {
    common::testos_catalog(dir, &["db-a", "db-b", "web-a", "web-b"], "console=ttyS0 panic=-1 quiet corral.image={{image}} corral.slot={{cluster}}/{{slot}} corral.host={{hostname}}")
}

const POLICY: &str = r#"
[settings]
cooldown = 0

[[cluster]]
name = "db"
priority = 10
min = 1
max = 3
default = 2
preempt = true
images = ["db-a", "db-b"]
identity = { hostname = "db-{n}" }

[[cluster]]
name = "web"
priority = 1
min = 1
max = 2
default = 2
images = ["web-a", "web-b"]
identity = { hostname = "web-{n}" }
"#;

/// The (image, cluster/slot) a VM's marker shows.
fn marker(lab: &Lab, vm: &mut Vm) -> (String, String) {
    let (line, secs) = vm
        .wait_for("CORRAL-MARKER", BOOT_TIMEOUT)
        .unwrap_or_else(|e| {
            panic!(
                "{e}\ncorral log:\n{}",
                std::fs::read_to_string(lab.dir.join("corral.log")).unwrap_or_default()
            )
        });
    assert!(line.contains(&format!("mac={}", vm.mac)), "{line}");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    eprintln!(
        "  {} booted {} as {} in {secs:.1} s",
        vm.name,
        field("corral.image="),
        field("corral.slot=")
    );
    (field("corral.image="), field("corral.slot="))
}

fn api(lab: &Lab, path: &str) -> String {
    lab.run_in_server(
        "curl",
        &["-s", &format!("http://{}{path}", lab.server_ip())],
    )
    .unwrap()
}

#[test]
fn vms_fill_clusters_and_move_on_policy_change() {
    if !common::need_root("namespaces and taps") {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let images = catalog(tmp.path());
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut lab = Lab::new(&tmp.path().join("lab")).unwrap();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts");
    lab.start_corral_with(
        Path::new(env!("CARGO_BIN_EXE_corral")),
        "full",
        &images,
        &scripts,
        Some(&policy),
    )
    .unwrap();

    // Four unknown VMs: db (priority 10) gets two, web the other two; each boots its slot's link.
    let mut vms: Vec<Vm> = (1..=4)
        .map(|i| {
            lab.vm(&format!("n{i}"), Firmware::Bios, &vm_mac(lab.id, i))
                .unwrap()
        })
        .collect();
    let mut seen = BTreeSet::new();
    for vm in &mut vms {
        let (image, slot) = marker(&lab, vm);
        seen.insert(format!("{slot}={image}"));
    }
    let want: BTreeSet<String> = ["db/0=db-a", "db/1=db-b", "web/0=web-a", "web/1=web-b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(seen, want, "slots and their links");

    // Raise db to 3: no idle node, so the planner takes one from web (which stays at its min of 1).
    std::fs::write(
        &policy,
        POLICY.replace("default = 2\npreempt", "default = 3\npreempt"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api(&lab, "/api/v1/events").contains("\"kind\": \"preempt\"") {
        assert!(
            Instant::now() < deadline,
            "no preemption after the policy edit: {}",
            api(&lab, "/api/v1/events")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let nodes: serde_json::Value = serde_json::from_str(&api(&lab, "/api/v1/nodes")).unwrap();
    let moved = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["cluster"] == "db" && n["slot"] == 2)
        .expect("db slot 2 filled")
        .clone();
    assert_eq!(moved["state"], "reboot-pending");
    let mac = moved["mac"].as_str().unwrap().to_string();
    // Restart that VM (power control comes with its own issue: here the test restarts it).
    let i = vms.iter().position(|v| v.mac == mac).unwrap();
    drop(vms.remove(i));
    let mut again = lab.vm("moved", Firmware::Bios, &mac).unwrap();
    let (image, slot) = marker(&lab, &mut again);
    assert_eq!(
        (image.as_str(), slot.as_str()),
        ("db-b", "db/2"),
        "the moved node boots the new cluster's last link"
    );

    // A bad edit is rejected; the running policy stays and nodes keep booting by it.
    std::fs::write(&policy, POLICY.replace("max = 3", "max = 0")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api(&lab, "/api/v1/events").contains("reload-rejected") {
        assert!(Instant::now() < deadline, "bad edit not reported");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(again);
    let mut after = lab.vm("after-bad-edit", Firmware::Bios, &mac).unwrap();
    let (image, slot) = marker(&lab, &mut after);
    assert_eq!((image.as_str(), slot.as_str()), ("db-b", "db/2"));
    eprintln!("policy end to end: {:.0} s", t0.elapsed().as_secs_f64());
}
