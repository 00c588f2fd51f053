//! Every power driver against a real peer that nobody here wrote (see tests/peers/README.md):
//! Redfish against sushy-tools' emulator (HTTP and HTTPS with a self-signed certificate), IPMI against
//! OpenIPMI's `ipmi_sim` through `ipmitool`, Wake-on-LAN captured in a second network namespace, QMP
//! against a real (paused, diskless) QEMU, the command driver against `sh`, and the credentials file.
//!
//! Peers listen on 127.0.0.1 only; Wake-on-LAN goes out of a veth between two namespaces this test
//! creates (`crl-w…-<pid>`). Every peer is stopped by its PID and every namespace removed on drop.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral::mac::Mac;
use corral::power::{
    self, Context, Credentials, PowerDriver, PowerError, PowerSpec, PowerState, Secret,
};

/// Generous: peers are slow on a loaded 2-core machine, never a measure of speed.
const DEADLINE: Duration = Duration::from_secs(30);

fn peers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mac(s: &str) -> Mac {
    Mac::parse(s).unwrap()
}

fn credentials(key: &str, user: &str, password: &str) -> Credentials {
    let mut m = BTreeMap::new();
    m.insert(
        key.to_string(),
        Secret {
            user: user.to_string(),
            password: password.to_string(),
        },
    );
    Credentials::from_map(m)
}

fn build(spec: &PowerSpec, creds: &Credentials, interface: Option<&str>) -> Box<dyn PowerDriver> {
    build_for(spec, creds, interface, mac("52:54:00:00:00:01"))
}

fn build_for(
    spec: &PowerSpec,
    creds: &Credentials,
    interface: Option<&str>,
    mac: Mac,
) -> Box<dyn PowerDriver> {
    let ctx = Context {
        mac,
        name: Some("node-a"),
        credentials: creds,
        interface,
    };
    match power::driver(spec, &ctx) {
        Ok(d) => d,
        Err(e) => panic!("driver for {spec:?}: {e}"),
    }
}

fn err_text<T: std::fmt::Debug>(r: Result<T, PowerError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    }
}

/// Polls until the driver reports `want` (the peer applies some changes asynchronously).
fn wait_status(d: &dyn PowerDriver, want: PowerState, what: &str) {
    let start = Instant::now();
    loop {
        let got = d.status().unwrap_or_else(|e| panic!("{what}: status: {e}"));
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: still {got:?}, want {want:?} after {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A peer started by one of the tests/peers scripts, stopped (by the PID it recorded) on drop.
struct Peer {
    script: &'static str,
    dir: PathBuf,
    /// What `start` printed (the URL, or "host port").
    out: String,
}

impl Peer {
    /// `script start <port> <dir> [extra]`, with a fresh port on each of a few attempts (another process
    /// could take the port between our probe and the peer's bind).
    fn start(
        script: &'static str,
        dir: &Path,
        port: fn() -> u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Peer {
        let mut last = String::new();
        for _ in 0..3 {
            let p = port().to_string();
            let out = Command::new("bash")
                .arg(peers().join(script))
                .arg("start")
                .arg(&p)
                .arg(dir)
                .args(extra)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .output()
                .expect("bash");
            if out.status.success() {
                return Peer {
                    script,
                    dir: dir.to_path_buf(),
                    out: String::from_utf8_lossy(&out.stdout).trim().to_string(),
                };
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("{script} start failed: {last}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(peers().join(self.script))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

// ---------------------------------------------------------------------------------------------------
// Redfish: sushy-tools' emulator, fake driver (tests/peers/redfish.sh)

const NODE_A: &str = "c0ffee00-0000-4000-8000-000000000001";
const NODE_B: &str = "c0ffee00-0000-4000-8000-000000000002";

fn redfish(url: &str, system: Option<&str>, insecure_tls: bool) -> PowerSpec {
    PowerSpec::Redfish {
        url: url.to_string(),
        system: system.map(str::to_string),
        credentials: Some("bmc".to_string()),
        insecure_tls,
        ca_file: None,
    }
}

/// A BMC whose certificate a private CA signed (redfish.sh --tls-ca): trusted through `ca_file`.
fn redfish_ca(url: &str, system: Option<&str>, ca: &Path) -> PowerSpec {
    PowerSpec::Redfish {
        url: url.to_string(),
        system: system.map(str::to_string),
        credentials: Some("bmc".to_string()),
        insecure_tls: false,
        ca_file: Some(ca.to_path_buf()),
    }
}

/// GET a system straight from the emulator (not through the driver), with curl (-k for the HTTPS side).
fn redfish_get(url: &str, system: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sSfk", "--max-time", "10", "-u", "admin:secret"])
        .arg(format!("{url}/redfish/v1/Systems/{system}"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl GET {system}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The requests other than GET that passed the emulator's authentication and that it answered with
/// success, in order (redfish.sh records them): (method, path, body).
fn redfish_requests(dir: &Path) -> Vec<(String, String, serde_json::Value)> {
    std::fs::read_to_string(dir.join("redfish-requests.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| {
            v["status"]
                .as_u64()
                .is_some_and(|s| (200..300).contains(&s))
        })
        .map(|v| {
            (
                v["method"].as_str().unwrap().to_string(),
                v["path"].as_str().unwrap().to_string(),
                v["body"].clone(),
            )
        })
        .collect()
}

fn reset_path(system: &str) -> String {
    format!("/redfish/v1/Systems/{system}/Actions/ComputerSystem.Reset")
}

fn reset(system: &str, kind: &str) -> (String, String, serde_json::Value) {
    (
        "POST".to_string(),
        reset_path(system),
        serde_json::json!({ "ResetType": kind }),
    )
}

fn pxe_once(system: &str) -> (String, String, serde_json::Value) {
    (
        "PATCH".to_string(),
        format!("/redfish/v1/Systems/{system}"),
        serde_json::json!({
            "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" }
        }),
    )
}

#[test]
fn redfish_against_sushy_emulator() {
    let tmp = tempfile::tempdir().unwrap();
    // A reset shows in PowerState within a second.
    let peer = Peer::start(
        "redfish.sh",
        tmp.path(),
        free_tcp_port,
        // HTTPS under a test CA: the driver sends Basic auth over https:// only.
        &["--tls-ca"],
        &[("REDFISH_POWER_DELAY", "1")],
    );
    let url = peer.out.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let ca = tmp.path().join("redfish-ca.crt");
    let creds = credentials("bmc", "admin", "secret");

    // Two systems and no `system`: the driver must not guess.
    let any = build(&redfish_ca(&url, None, &ca), &creds, None);
    let e = err_text(any.status());
    assert!(e.contains("2 systems") && e.contains("set `system`"), "{e}");
    let e = err_text(any.on());
    assert!(e.contains("set `system`"), "{e}");
    assert_eq!(
        redfish_requests(tmp.path()),
        [],
        "on() without system acted"
    );

    let a = build(&redfish_ca(&url, Some(NODE_A), &ca), &creds, None);
    let b = build(&redfish_ca(&url, Some(NODE_B), &ca), &creds, None);
    assert_eq!(a.kind(), "redfish");
    assert_eq!(a.status().unwrap(), PowerState::Off);
    assert_eq!(b.status().unwrap(), PowerState::On);

    a.on().unwrap();
    wait_status(&*a, PowerState::On, "node-a after on()");

    // One-time network boot. The emulator keeps the target; it ignores BootSourceOverrideEnabled (sushy
    // 2.2.0 always reads back "Continuous"), so "Once" is checked in what it was sent.
    let before = redfish_get(&url, NODE_A);
    assert_ne!(
        before["Boot"]["BootSourceOverrideTarget"], "Pxe",
        "{before}"
    );
    a.boot_network_once().unwrap();
    let after = redfish_get(&url, NODE_A);
    assert_eq!(after["Boot"]["BootSourceOverrideTarget"], "Pxe", "{after}");
    assert_eq!(redfish_requests(tmp.path()).last(), Some(&pxe_once(NODE_A)));
    // ... on node-a only.
    let other = redfish_get(&url, NODE_B);
    assert_ne!(other["Boot"]["BootSourceOverrideTarget"], "Pxe", "{other}");

    a.off(true).unwrap();
    wait_status(&*a, PowerState::Off, "node-a after off(hard)");
    // A restart of a dark node brings it up (the fake driver: Off at once, On when the reset completes).
    a.cycle().unwrap();
    wait_status(&*a, PowerState::On, "node-a after cycle()");

    // The other system, picked by `system`, switches off on its own.
    b.off(false).unwrap();
    wait_status(&*b, PowerState::Off, "node-b after off(soft)");
    assert_eq!(
        a.status().unwrap(),
        PowerState::On,
        "node-b's off reached node-a"
    );

    // A system addressed by name: the emulator redirects (307) to its UUID. The driver follows no
    // redirect (a redirected POST would be lost or turned into a GET): a clear error, nothing done.
    let by_name = build(&redfish_ca(&url, Some("node-a"), &ca), &creds, None);
    for e in [
        err_text(by_name.status()),
        err_text(by_name.off(true)),
        err_text(by_name.boot_network_once()),
    ] {
        assert!(e.contains("HTTP 307 redirect"), "{e}");
        assert!(e.contains(NODE_A), "{e}");
    }
    assert_eq!(
        a.status().unwrap(),
        PowerState::On,
        "a redirected off() acted"
    );

    // A system the BMC does not have.
    let ghost = build(&redfish_ca(&url, Some("no-such-system"), &ca), &creds, None);
    let e = err_text(ghost.status());
    assert!(e.contains("404"), "{e}");

    // A wrong password: a clear error that quotes neither the password nor the header made from it.
    let wrong = "wr0ng-Pa55-x7";
    let bad = build(
        &redfish_ca(&url, Some(NODE_A), &ca),
        &credentials("bmc", "admin", wrong),
        None,
    );
    for e in [err_text(bad.status()), err_text(bad.off(true))] {
        assert!(e.contains("HTTP 401"), "{e}");
        assert!(!e.contains(wrong), "password in error: {e}");
        // base64("admin:wr0ng-Pa55-x7")
        assert!(
            !e.contains("YWRtaW46d3IwbmctUGE1NS14Nw"),
            "auth header in error: {e}"
        );
    }

    // Everything the emulator accepted, in order: exactly the driver's actions, none from the failures.
    assert_eq!(
        redfish_requests(tmp.path()),
        [
            reset(NODE_A, "On"),
            pxe_once(NODE_A),
            reset(NODE_A, "ForceOff"),
            reset(NODE_A, "ForceRestart"),
            reset(NODE_B, "GracefulShutdown"),
        ]
    );
    assert_eq!(redfish_get(&url, NODE_A)["PowerState"], "On");

    // Missing credentials are refused when the driver is built.
    let ctx = Context {
        mac: mac("52:54:00:00:00:01"),
        name: None,
        credentials: &creds,
        interface: None,
    };
    let spec = PowerSpec::Redfish {
        url: url.clone(),
        system: Some(NODE_A.to_string()),
        credentials: Some("nobody".to_string()),
        insecure_tls: false,
        ca_file: Some(ca.clone()),
    };
    let e = power::driver(&spec, &ctx)
        .err()
        .expect("unknown credentials accepted");
    assert!(e.contains("nobody"), "{e}");
}

#[test]
fn redfish_https_self_signed() {
    let tmp = tempfile::tempdir().unwrap();
    // Resets stay pending for an hour: what a reset does at once is then observable without a race.
    let peer = Peer::start(
        "redfish.sh",
        tmp.path(),
        free_tcp_port,
        &["--tls"],
        &[("REDFISH_POWER_DELAY", "3600")],
    );
    let url = peer.out.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let creds = credentials("bmc", "admin", "secret");
    let untrusted =
        |e: &str| e.contains("UnknownIssuer") || e.to_lowercase().contains("certificate");

    // Verified TLS (the default) refuses the emulator's self-signed certificate, before any request.
    let strict = build(&redfish(&url, Some(NODE_B), false), &creds, None);
    let e = err_text(strict.status());
    assert!(untrusted(&e), "{e}");
    let e = err_text(strict.cycle());
    assert!(untrusted(&e), "{e}");
    assert_eq!(
        redfish_requests(tmp.path()),
        [],
        "a request went through unverified TLS"
    );

    // insecure_tls for this BMC: works.
    let b = build(&redfish(&url, Some(NODE_B), true), &creds, None);
    assert_eq!(b.status().unwrap(), PowerState::On);
    // A ForceRestart turns node-b Off at once (back On only when the pending reset completes, in an hour).
    b.cycle().unwrap();
    assert_eq!(b.status().unwrap(), PowerState::Off);

    let a = build(&redfish(&url, Some(NODE_A), true), &creds, None);
    assert_eq!(a.status().unwrap(), PowerState::Off);
    a.boot_network_once().unwrap();
    let v = redfish_get(&url, NODE_A);
    assert_eq!(v["Boot"]["BootSourceOverrideTarget"], "Pxe", "{v}");

    // Wrong password over TLS: 401, password not in the text.
    let wrong = "tls-Wr0ng-pw-99";
    let bad = build(
        &redfish(&url, Some(NODE_A), true),
        &credentials("bmc", "admin", wrong),
        None,
    );
    let e = err_text(bad.on());
    assert!(e.contains("HTTP 401"), "{e}");
    assert!(!e.contains(wrong), "password in error: {e}");

    assert_eq!(
        redfish_requests(tmp.path()),
        [reset(NODE_B, "ForceRestart"), pxe_once(NODE_A)]
    );
}

/// A BMC with a certificate from a private CA: trusted with that CA as `ca_file`, refused with a
/// certificate error naming the fix without it (the system's roots) or with another CA, and no request
/// gets through a refused handshake.
#[test]
fn redfish_private_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::start(
        "redfish.sh",
        tmp.path(),
        free_tcp_port,
        &["--tls-ca"],
        &[("REDFISH_POWER_DELAY", "3600")],
    );
    let url = peer.out.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let ca = tmp.path().join("redfish-ca.crt");
    let creds = credentials("bmc", "admin", "secret");

    let trusted = build(&redfish_ca(&url, Some(NODE_A), &ca), &creds, None);
    assert_eq!(trusted.status().unwrap(), PowerState::Off);

    // The system's roots do not know the test CA.
    let system = build(&redfish(&url, Some(NODE_A), false), &creds, None);
    for e in [err_text(system.status()), err_text(system.on())] {
        assert!(e.contains("invalid peer certificate"), "{e}");
        assert!(e.contains("set `ca_file`"), "{e}");
    }
    // Another CA in ca_file: refused as well, and the message names the file.
    let other = tmp.path().join("other-ca.crt");
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=another CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ])
        .arg("-keyout")
        .arg(tmp.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    let wrong = build(&redfish_ca(&url, Some(NODE_A), &other), &creds, None);
    let e = err_text(wrong.on());
    assert!(e.contains("invalid peer certificate"), "{e}");
    assert!(
        e.contains("not signed by the CA in ca_file") && e.contains("other-ca.crt"),
        "{e}"
    );
    assert_eq!(
        redfish_requests(tmp.path()),
        [],
        "a request went through an unverified handshake"
    );

    // A ca_file that holds no certificate is refused when the driver is built.
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let ctx = Context {
        mac: mac("52:54:00:00:00:01"),
        name: Some("node-a"),
        credentials: &creds,
        interface: None,
    };
    let e = power::driver(&redfish_ca(&url, Some(NODE_A), &junk), &ctx)
        .err()
        .expect("a ca_file without a certificate was accepted");
    assert!(e.contains("ca_file") && e.contains("junk.pem"), "{e}");

    trusted.on().unwrap();
    assert_eq!(redfish_requests(tmp.path()), [reset(NODE_A, "On")]);
}

/// Basic auth over plain http:// is refused when the driver is built, so not a packet leaves (a listener
/// on that port sees no connection); http:// without credentials is allowed and sends no Authorization.
#[test]
fn redfish_basic_auth_never_over_plain_http() {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let creds = credentials("bmc", "admin", "secret");
    let ctx = Context {
        mac: mac("52:54:00:00:00:01"),
        name: Some("rack1-u7"),
        credentials: &creds,
        interface: None,
    };
    let e = power::driver(&redfish(&url, Some(NODE_A), false), &ctx)
        .err()
        .expect("Basic auth over http:// was accepted");
    assert!(e.contains("node rack1-u7") && e.contains(&url), "{e}");
    assert!(e.contains("plain http://") && e.contains("https://"), "{e}");
    assert!(!e.contains("secret"), "{e}");
    assert_eq!(
        listener.accept().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::WouldBlock),
        "a connection reached the port"
    );

    // Without credentials: allowed, and the request carries no Authorization header.
    let spec = PowerSpec::Redfish {
        url: url.clone(),
        system: Some(NODE_A.to_string()),
        credentials: None,
        insecure_tls: false,
        ca_file: None,
    };
    let open = power::driver(&spec, &ctx).expect("http:// without credentials");
    listener.set_nonblocking(false).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended early");
            req.extend_from_slice(&buf[..n]);
        }
        use std::io::Write;
        let body = r#"{"PowerState": "On"}"#;
        write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&req).to_string()
    });
    assert_eq!(open.status().unwrap(), PowerState::On);
    let req = server.join().unwrap();
    assert!(
        req.starts_with(&format!("GET /redfish/v1/Systems/{NODE_A} ")),
        "{req}"
    );
    assert!(!req.to_ascii_lowercase().contains("authorization"), "{req}");
}

// ---------------------------------------------------------------------------------------------------
// IPMI: OpenIPMI's ipmi_sim (tests/peers/ipmi.sh) through ipmitool.
//
// ipmitool 1.8.19 first asks for the channel's cipher suites outside a session; ipmi_sim 2.0.33 drops that
// request ("Invalid authtype: 6"), so each driver call waits out ipmitool's retries (-N 2 -R 3: about 9 s)
// before falling back to cipher suite 3, as it would with a real BMC that does the same (ipmitool issue
// #199). Hence few calls, split over two simulators that run in parallel.

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_string()
}

struct Bmc {
    _peer: Peer,
    dir: PathBuf,
    spec: PowerSpec,
}

impl Bmc {
    fn start(dir: &Path) -> Bmc {
        let peer = Peer::start("ipmi.sh", dir, free_udp_port, &[], &[]);
        let port: u16 = peer
            .out
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("ipmi.sh printed {:?}", peer.out));
        Bmc {
            _peer: peer,
            dir: dir.to_path_buf(),
            spec: PowerSpec::Ipmi {
                host: "127.0.0.1".to_string(),
                port,
                credentials: "bmc".to_string(),
                cipher_suite: 3,
            },
        }
    }
    /// The emulated hardware: "1"/"0".
    fn power(&self) -> String {
        read_trim(&self.dir.join("chassis.power"))
    }
    fn boot(&self) -> String {
        read_trim(&self.dir.join("chassis.boot"))
    }
    /// What ipmi_sim asked the chassis to change, in order.
    fn sets(&self) -> Vec<String> {
        read_trim(&self.dir.join("chassis.log"))
            .lines()
            .filter(|l| l.contains(" set "))
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn ipmi_power_against_ipmi_sim() {
    if !common::need_tools(&["ipmi_sim", "ipmitool"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bmc = Bmc::start(tmp.path());
    let d = build(&bmc.spec, &credentials("bmc", "admin", "secret"), None);
    assert_eq!(d.kind(), "ipmi");

    assert_eq!(d.status().unwrap(), PowerState::Off);
    d.on().unwrap();
    assert_eq!(bmc.power(), "1", "the chassis was not switched on");
    assert_eq!(d.status().unwrap(), PowerState::On);

    d.off(true).unwrap();
    assert_eq!(bmc.power(), "0", "the chassis was not switched off");

    // Power cycle: ipmi_sim powers down at once and up again a second later.
    d.cycle().unwrap();
    let start = Instant::now();
    while bmc.sets().len() < 4 {
        assert!(
            start.elapsed() < DEADLINE,
            "no power-up after cycle: {:?}",
            bmc.sets()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        bmc.sets(),
        [
            "0x20 set power 1",
            "0x20 set power 0",
            "0x20 set power 0",
            "0x20 set power 1"
        ]
    );
    assert_eq!(d.status().unwrap(), PowerState::On);
}

#[test]
fn ipmi_bootdev_soft_off_and_auth_against_ipmi_sim() {
    if !common::need_tools(&["ipmi_sim", "ipmitool"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bmc = Bmc::start(tmp.path());
    let d = build(&bmc.spec, &credentials("bmc", "admin", "secret"), None);

    assert_ne!(bmc.boot(), "pxe");
    d.boot_network_once().unwrap();
    assert_eq!(bmc.boot(), "pxe", "boot device not set");

    // Soft off: ipmi_sim passes it on as a graceful-shutdown request, which the emulated OS obeys.
    d.on().unwrap();
    d.off(false).unwrap();
    assert_eq!(bmc.power(), "0");
    assert_eq!(d.status().unwrap(), PowerState::Off);
    assert_eq!(
        bmc.sets(),
        [
            "0x20 set boot pxe",
            "0x20 set power 1",
            "0x20 set shutdown 1"
        ]
    );

    // Wrong password: a clear error without the password, and nothing reaches the chassis.
    let wrong = "ipmi-Wr0ng-pw-42";
    let bad = build(&bmc.spec, &credentials("bmc", "admin", wrong), None);
    let e = err_text(bad.on());
    assert!(e.starts_with("ipmitool chassis power on:"), "{e}");
    assert!(e.contains("RMCP+ session"), "{e}");
    assert!(!e.contains(wrong), "password in error: {e}");
    assert_eq!(
        bmc.power(),
        "0",
        "an unauthenticated power-on reached the chassis"
    );
    assert_eq!(bmc.sets().len(), 3);
}

// ---------------------------------------------------------------------------------------------------
// Wake-on-LAN: the driver in one namespace, the capture in another, a veth between them

/// Two namespaces joined by a veth pair, removed on drop.
struct Netns {
    tx: String,
    rx: String,
    tx_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id();
        let n = Netns {
            tx: format!("crl-wtx-{id}"),
            rx: format!("crl-wrx-{id}"),
            tx_if: "crlwtx0".to_string(),
        };
        // `n` exists already: its Drop removes the namespaces if a later step panics.
        ip(&["netns", "add", &n.tx]);
        ip(&["netns", "add", &n.rx]);
        ip(&[
            "link", "add", &n.tx_if, "netns", &n.tx, "type", "veth", "peer", "name", "crlwrx0",
            "netns", &n.rx,
        ]);
        for (ns, i, a) in [
            (&n.tx, "crlwtx0", "10.77.0.1/24"),
            (&n.rx, "crlwrx0", "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", a, "dev", i]);
            ip(&["-n", ns, "link", "set", i, "up"]);
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.tx, &self.rx] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread of its own that has joined network namespace `ns` (only that thread does).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// Six 0xff, then the MAC sixteen times (built here, not with corral's own function).
fn expected_magic(m: [u8; 6]) -> Vec<u8> {
    let mut p = vec![0xff; 6];
    (0..16).for_each(|_| p.extend_from_slice(&m));
    p
}

#[test]
fn wol_magic_packet_between_namespaces() {
    if !common::need_root("network namespaces (Wake-on-LAN between them)") {
        return;
    }
    let net = Netns::new();
    let rx = in_netns(&net.rx, || {
        let s =
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 9)).expect("bind udp/9 in the rx namespace");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4PacketInfo, &true).unwrap();
        s
    });

    let good = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
    let good_subnet = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x02];
    let stray_lo = [0x52, 0x54, 0x00, 0xee, 0xee, 0x01];
    let stray_none = [0x52, 0x54, 0x00, 0xee, 0xee, 0x02];
    let tx_if = net.tx_if.clone();
    let results = in_netns(&net.tx, move || {
        let creds = Credentials::default();
        let spec = |b: Option<Ipv4Addr>| PowerSpec::Wol { broadcast: b };
        let m = |b: [u8; 6]| Mac::from_slice(&b).unwrap();
        // An interface that does not exist: an error, and nothing sent anywhere.
        let none = build_for(&spec(None), &creds, Some("crl-nosuchif"), m(stray_none));
        let e_none = none.on().map_err(|e| e.to_string());
        // Another interface (lo): whatever happens there, nothing may leave through the veth.
        let lo = build_for(&spec(None), &creds, Some("lo"), m(stray_lo));
        let _ = lo.on();
        // The boot interface: 255.255.255.255, then a subnet broadcast.
        let d = build_for(&spec(None), &creds, Some(&tx_if), m(good));
        let r1 = d.on().map_err(|e| e.to_string());
        let d2 = build_for(
            &spec(Some(Ipv4Addr::new(10, 77, 0, 255))),
            &creds,
            Some(&tx_if),
            m(good_subnet),
        );
        let r2 = d2.on().map_err(|e| e.to_string());
        let unsupported = [
            d.off(true).is_err(),
            d.cycle().is_err(),
            d.boot_network_once().is_err(),
        ];
        (
            e_none,
            r1,
            r2,
            d.status().map_err(|e| e.to_string()),
            unsupported,
            d.kind(),
        )
    });
    let (e_none, r1, r2, status, unsupported, kind) = results;
    let e = e_none.expect_err("an interface that does not exist was accepted");
    assert!(e.contains("No such device"), "{e}");
    r1.expect("wol to 255.255.255.255 on the boot interface");
    r2.expect("wol to the subnet broadcast on the boot interface");
    assert_eq!(kind, "wol");
    assert_eq!(status, Ok(PowerState::Unknown));
    assert_eq!(
        unsupported, [true; 3],
        "off/cycle/boot_network_once must be unsupported"
    );

    // Each send is three datagrams: wait for all six, then drain whatever else came. Every datagram
    // must be one of them, with the destination its driver was configured for.
    let subnet_broadcast = Ipv4Addr::new(10, 77, 0, 255);
    let mut seen = [0usize; 2];
    let which = |p: &[u8], from: Ipv4Addr, dst: Ipv4Addr| -> usize {
        assert_eq!(from, Ipv4Addr::new(10, 77, 0, 1), "sender of {p:02x?}");
        assert_eq!(p.len(), 102, "{p:02x?}");
        assert_eq!(&p[..6], &[0xff; 6], "{p:02x?}");
        if p == expected_magic(good) && dst == Ipv4Addr::BROADCAST {
            0
        } else if p == expected_magic(good_subnet) && dst == subnet_broadcast {
            1
        } else {
            panic!(
                "unexpected datagram to {dst} (from the lo or missing-interface driver?): {p:02x?}"
            );
        }
    };
    while seen != [3, 3] {
        let (p, from, dst) = recv_with_dst(&rx)
            .unwrap_or_else(|e| panic!("only {seen:?} magic packets within {DEADLINE:?}: {e}"));
        seen[which(&p, from, dst)] += 1;
    }
    rx.set_nonblocking(true).unwrap();
    while let Ok((p, from, dst)) = recv_with_dst(&rx) {
        seen[which(&p, from, dst)] += 1;
    }
    assert_eq!(seen, [3, 3], "each send is three datagrams");
}

/// One datagram, its sender and the destination address of its IP header (IP_PKTINFO).
fn recv_with_dst(s: &UdpSocket) -> std::io::Result<(Vec<u8>, Ipv4Addr, Ipv4Addr)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 1500];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let msg = recvmsg::<SockaddrIn>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let from = msg.address.map(|a| a.ip()).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut dst = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4PacketInfo(i) = c {
            dst = Some(Ipv4Addr::from(u32::from_be(i.ipi_addr.s_addr)));
        }
    }
    let n = msg.bytes;
    Ok((buf[..n].to_vec(), from, dst.expect("no IP_PKTINFO")))
}

// ---------------------------------------------------------------------------------------------------
// QMP: a real QEMU, paused, without disk or network

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Our own QMP session on QEMU's second monitor: reads the events the driver's commands cause.
struct QmpWatch(std::io::BufReader<std::os::unix::net::UnixStream>);

impl QmpWatch {
    fn connect(path: &Path) -> QmpWatch {
        use std::io::Write;
        let s = std::os::unix::net::UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut w = QmpWatch(std::io::BufReader::new(s.try_clone().unwrap()));
        assert!(w.next().get("QMP").is_some(), "no QMP greeting");
        writeln!(&s, r#"{{"execute": "qmp_capabilities"}}"#).unwrap();
        while w.next().get("return").is_none() {}
        w
    }

    fn next(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self
            .0
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("QMP watch: {e}"));
        assert!(n > 0, "QMP watch: connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP watch: {e}: {line}"))
    }

    /// Waits until every event in `want` has come (in any order; others are skipped).
    fn expect(&mut self, want: &[&str]) {
        let mut missing: Vec<&str> = want.to_vec();
        while !missing.is_empty() {
            let v = self.next();
            if let Some(e) = v["event"].as_str() {
                missing.retain(|m| *m != e);
            }
        }
    }
}

#[test]
fn qmp_against_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("qmp.sock");
    let watch_sock = tmp.path().join("watch.sock");
    let log = std::fs::File::create(tmp.path().join("qemu.log")).unwrap();
    let mut qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-display",
                "none",
                "-nodefaults",
                "-no-shutdown",
                "-S",
                "-m",
                "64",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            // A second monitor, ours, to watch the events the driver's commands cause.
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", watch_sock.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 (tests/deps.sh installs qemu-system-x86)"),
    );
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Some(st) = qemu.0.try_wait().unwrap() {
            panic!(
                "qemu exited ({st}): {}",
                read_trim(&tmp.path().join("qemu.log"))
            );
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no QMP socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut watch = QmpWatch::connect(&watch_sock);

    let creds = Credentials::default();
    let d = build(&PowerSpec::Qemu { qmp: sock.clone() }, &creds, None);
    assert_eq!(d.kind(), "qemu");
    assert_eq!(d.status().unwrap(), PowerState::Off, "-S: paused");
    d.on().unwrap();
    watch.expect(&["RESET", "RESUME"]);
    assert_eq!(d.status().unwrap(), PowerState::On);
    d.off(true).unwrap();
    watch.expect(&["STOP"]);
    assert_eq!(d.status().unwrap(), PowerState::Off);
    d.on().unwrap();
    watch.expect(&["RESET", "RESUME"]);
    assert_eq!(d.status().unwrap(), PowerState::On);
    d.cycle().unwrap();
    watch.expect(&["RESET"]);
    assert_eq!(d.status().unwrap(), PowerState::On);
    d.boot_network_once().unwrap();
    assert!(qemu.0.try_wait().unwrap().is_none(), "qemu exited");

    let missing = build(
        &PowerSpec::Qemu {
            qmp: tmp.path().join("missing.sock"),
        },
        &creds,
        None,
    );
    let e = err_text(missing.status());
    assert!(e.contains("missing.sock"), "{e}");
    let e = err_text(missing.on());
    assert!(e.contains("missing.sock"), "{e}");
}

// ---------------------------------------------------------------------------------------------------
// Command: the operator's scripts, run by sh

#[test]
fn command_driver_runs_scripts_with_node_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("calls.log");
    let state = tmp.path().join("state");
    std::fs::write(&state, "off\n").unwrap();
    let (l, s) = (log.display(), state.display());
    let line = r#"mac=$CORRAL_MAC node=$CORRAL_NODE hard=${CORRAL_HARD-unset}"#;
    let spec = PowerSpec::Command {
        on: format!(r#"echo "on {line}" >> '{l}'; echo on > '{s}'"#),
        off: format!(r#"echo "off {line}" >> '{l}'; echo off > '{s}'"#),
        status: Some(format!("cat '{s}'")),
        boot_network: Some(format!(r#"echo "pxe {line}" >> '{l}'"#)),
    };
    let creds = Credentials::default();
    let d = build_for(&spec, &creds, None, mac("52:54:00:12:34:56"));
    assert_eq!(d.kind(), "command");
    assert_eq!(d.status().unwrap(), PowerState::Off);
    d.on().unwrap();
    assert_eq!(d.status().unwrap(), PowerState::On);
    d.off(true).unwrap();
    assert_eq!(d.status().unwrap(), PowerState::Off);
    d.off(false).unwrap();
    d.cycle().unwrap();
    assert_eq!(d.status().unwrap(), PowerState::On);
    d.boot_network_once().unwrap();
    let m = "52:54:00:12:34:56";
    assert_eq!(
        read_trim(&log),
        [
            format!("on mac={m} node=node-a hard=unset"),
            format!("off mac={m} node=node-a hard=1"),
            format!("off mac={m} node=node-a hard=0"),
            format!("off mac={m} node=node-a hard=1"),
            format!("on mac={m} node=node-a hard=unset"),
            format!("pxe mac={m} node=node-a hard=unset"),
        ]
        .join("\n")
    );

    // A node without a name: CORRAL_NODE is empty.
    let ctx = Context {
        mac: mac("52:54:00:12:34:57"),
        name: None,
        credentials: &creds,
        interface: None,
    };
    power::driver(&spec, &ctx).unwrap().on().unwrap();
    assert!(
        read_trim(&log).ends_with("on mac=52:54:00:12:34:57 node= hard=unset"),
        "{}",
        read_trim(&log)
    );

    // Failures carry the script's stderr; odd status output is Unknown; missing commands are unsupported.
    let failing = PowerSpec::Command {
        on: "echo 'pdu says no' >&2; exit 3".to_string(),
        off: "true".to_string(),
        status: Some("echo maybe".to_string()),
        boot_network: None,
    };
    let f = build(&failing, &creds, None);
    let e = err_text(f.on());
    assert!(
        e.contains("on command failed") && e.contains("pdu says no"),
        "{e}"
    );
    assert_eq!(f.status().unwrap(), PowerState::Unknown);
    assert!(matches!(
        f.boot_network_once(),
        Err(PowerError::Unsupported("command"))
    ));
    let no_status = PowerSpec::Command {
        on: "true".to_string(),
        off: "true".to_string(),
        status: None,
        boot_network: None,
    };
    assert_eq!(
        build(&no_status, &creds, None).status().unwrap(),
        PowerState::Unknown
    );
}

// ---------------------------------------------------------------------------------------------------
// Credentials file

#[test]
fn credentials_file_permissions_and_secrecy() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("credentials.toml");
    let password = "Hunter2-very-secret";
    std::fs::write(
        &p,
        format!("[bmc-r12-05]\nuser = \"admin\"\npassword = \"{password}\"\n"),
    )
    .unwrap();

    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Credentials::load(&p).expect_err("a world-readable credentials file was accepted");
    assert!(e.contains("readable by others") && e.contains("644"), "{e}");
    assert!(!e.contains(password), "{e}");

    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = Credentials::load(&p).unwrap();
    let s = c.get("bmc-r12-05").expect("the entry");
    assert_eq!(s.user, "admin");
    assert_eq!(s.password, password);
    assert!(c.get("other").is_none());
    let dbg = format!("{s:?}");
    assert!(
        !dbg.contains(password) && dbg.contains("***") && dbg.contains("admin"),
        "{dbg}"
    );
    let dbg = format!("{c:?}");
    assert!(!dbg.contains(password), "{dbg}");

    // A malformed file: the error gives the position, never the line (which may hold the password).
    std::fs::write(
        &p,
        format!("[bmc]\nuser = \"admin\"\npassword = \"{password}\" trailing\n"),
    )
    .unwrap();
    let e = Credentials::load(&p).expect_err("malformed file accepted");
    assert!(e.contains("line 3"), "{e}");
    assert!(!e.contains(password), "{e}");
}
