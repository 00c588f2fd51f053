//! The controller's boot plan, in process and without HTTP: the node is who corral's DHCP says it is
//! (sightings fed as the DHCP room feeds them), a request from any other address is refused and gets no
//! secret, the node's own request is discovered, planned and given its role, identity and boot token in
//! one go; a new boot (a new DHCP sighting) gets a new token; a node with no slot is parked.

mod common;

use corral::controller::boot_plan::BootPlan;
use corral::controller::{BootState, Controller};
use corral::dhcp::core::Sighting;
use corral::domain::{Mac, NodeFacts};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

const POLICY: &str = r#"
[settings]
cooldown = 0

[[cluster]]
name = "web"
priority = 1
min = 0
max = 1
default = 1
images = ["img"]
identity = { hostname = "web-{n}", addresses = "10.9.0.1-10.9.0.4" }
"#;

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0xbb, 0, n])
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n)
}

fn controller(dir: &std::path::Path) -> Arc<Controller> {
    common::agent_image(dir, "img");
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    common::loopback_config(dir, common::free_port(), "", "");
    let config = corral::config::Config::load(&dir.join("corral.toml")).unwrap();
    let store = corral::store::Store::open(&config.server.state_dir).unwrap();
    let state = BootState::load(config).unwrap_or_else(|d| panic!("{d}"));
    Controller::new(state, store).unwrap()
}

/// The DHCP room telling the controller it gave `mac` the address `at` (a new boot when `boot`).
fn dhcp(c: &Controller, m: Mac, at: Ipv4Addr, boot: bool) {
    c.dhcp_seen(Sighting {
        mac: m,
        address: Some(at),
        boot,
        valid_for: Some(3600),
    });
}

fn facts() -> NodeFacts {
    NodeFacts {
        buildarch: Some("x86_64".into()),
        ..Default::default()
    }
}

fn plan(c: &Controller, m: Mac, from: Ipv4Addr) -> BootPlan {
    c.boot_plan(m, facts(), IpAddr::V4(from), corral::unix_now())
        .1
}

fn token(p: &BootPlan) -> String {
    let BootPlan::Boot { vars, .. } = p else {
        panic!("not a boot: {p:?}");
    };
    vars.agent
        .split("corral.token=")
        .nth(1)
        .expect("a token")
        .to_string()
}

#[test]
fn only_the_node_itself_gets_its_plan_and_each_boot_its_own_token() {
    let tmp = tempfile::tempdir().unwrap();
    let c = controller(tmp.path());
    dhcp(&c, mac(1), ip(5), true);

    // Someone else on the boot LAN asks for the node's script: refused, nothing learnt or planned.
    let p = plan(&c, mac(1), ip(99));
    assert!(matches!(p, BootPlan::Refused(_)), "{p:?}");
    assert!(
        c.slot_of(mac(1)).is_none(),
        "a foreign request plans nothing"
    );

    // The node itself: discovered, planned and booted into web/0 with that slot's identity.
    let p = plan(&c, mac(1), ip(5));
    let BootPlan::Boot { image, vars, san } = &p else {
        panic!("{p:?}");
    };
    assert_eq!(image.name, "img");
    assert!(san.is_none());
    assert_eq!(
        (vars.cluster.as_str(), vars.slot.as_str()),
        ("web", "0"),
        "{vars:?}"
    );
    assert_eq!(vars.hostname, "web-1");
    assert_eq!(vars.address, "10.9.0.1");
    assert!(vars.disk.is_empty(), "the cluster has no disk");
    assert!(vars.agent.starts_with("corral.api=http://127.0.0.1:"));
    let t1 = token(&p);

    // The same boot asking again: the same token. A foreign request still gets nothing.
    assert_eq!(token(&plan(&c, mac(1), ip(5))), t1);
    assert!(matches!(plan(&c, mac(1), ip(99)), BootPlan::Refused(_)));

    // A renewal is the same boot; a new DHCP boot is a new one, with a new token.
    dhcp(&c, mac(1), ip(5), false);
    assert_eq!(token(&plan(&c, mac(1), ip(5))), t1);
    dhcp(&c, mac(1), ip(5), true);
    let t2 = token(&plan(&c, mac(1), ip(5)));
    assert_ne!(t1, t2);

    // The address moves to another node: the first node's requests from it are now foreign.
    dhcp(&c, mac(2), ip(5), true);
    assert!(matches!(plan(&c, mac(1), ip(5)), BootPlan::Refused(_)));

    // The second node is the node at that address; web is full (max 1), so it is parked.
    let p = plan(&c, mac(2), ip(5));
    assert!(matches!(p, BootPlan::Park), "{p:?}");
    assert_eq!(c.slot_of(mac(1)).map(|s| s.cluster), Some("web".into()));
}

#[test]
fn a_node_the_dhcp_never_saw_is_refused_under_a_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let c = controller(tmp.path());
    let p = plan(&c, mac(7), ip(7));
    assert!(matches!(p, BootPlan::Refused(_)), "{p:?}");
    assert!(!c.is_known(mac(7)));
}
