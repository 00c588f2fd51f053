//! DHCP with real clients in network namespaces this test creates (two namespaces joined by a veth pair;
//! nothing touches the host's interfaces): busybox udhcpc and ISC dhclient get addresses in full mode, keep
//! them across a corral restart, and ProxyDHCP offers a PXE client boot information but no address.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Two namespaces and a veth pair, removed on drop.
struct Net {
    srv: String,
    cli: String,
    srv_if: String,
    cli_if: String,
    subnet: u8,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("iproute2");
    assert!(st.success(), "ip {args:?}");
}

impl Net {
    fn new(tag: &str) -> Net {
        let id = std::process::id() % 10_000;
        let n = Net {
            srv: format!("crl-{tag}s-{id}"),
            cli: format!("crl-{tag}c-{id}"),
            srv_if: format!("crs{tag}{id}"),
            cli_if: format!("crc{tag}{id}"),
            subnet: 100 + (id % 100) as u8,
        };
        ip(&["netns", "add", &n.srv]);
        ip(&["netns", "add", &n.cli]);
        ip(&[
            "link", "add", &n.srv_if, "netns", &n.srv, "type", "veth", "peer", "name", &n.cli_if,
            "netns", &n.cli,
        ]);
        for (ns, i) in [(&n.srv, &n.srv_if), (&n.cli, &n.cli_if)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", i, "up"]);
        }
        ip(&[
            "-n",
            &n.srv,
            "addr",
            "add",
            &format!("10.66.{}.1/24", n.subnet),
            "dev",
            &n.srv_if,
        ]);
        n
    }

    fn server_ip(&self) -> String {
        format!("10.66.{}.1", self.subnet)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.srv])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.cli])
            .status();
    }
}

struct Corral(Child);

impl Drop for Corral {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, net: &Net, mode: &str) -> PathBuf {
    let s = net.server_ip();
    let p = dir.join("corral.toml");
    std::fs::write(
        &p,
        format!(
            "[server]\ninterface = \"{}\"\naddress = \"{s}\"\nstate_dir = \"state\"\nscripts_dir = \"{}\"\n\
             [dhcp]\nmode = \"{mode}\"\nsubnet = \"10.66.{}.0/24\"\nrange = [\"10.66.{n}.100\", \"10.66.{n}.150\"]\nrouter = \"{s}\"\ndns = [\"{s}\"]\nlease_time = 600\n\
             [tftp]\nenabled = false\n[http]\nlisten = \"{s}:8080\"\n",
            net.srv_if,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts").display(),
            net.subnet,
            n = net.subnet
        ),
    )
    .unwrap();
    p
}

fn start(net: &Net, dir: &Path) -> Corral {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.srv,
            env!("CARGO_BIN_EXE_corral"),
            "serve",
            "--config",
        ])
        .arg(dir.join("corral.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.srv,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                &format!("http://{}:8080/healthz", net.server_ip()),
            ])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "corral did not start: {}",
            std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Corral(child)
}

/// busybox udhcpc once; the address it was given, if any.
fn udhcpc(net: &Net, dir: &Path) -> Option<String> {
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"BOUND $ip\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.cli,
            "busybox",
            "udhcpc",
            "-f",
            "-n",
            "-q",
            "-t",
            "4",
            "-T",
            "1",
            "-A",
            "1",
            "-i",
            &net.cli_if,
            "-s",
        ])
        .arg(&script)
        .output()
        .expect("busybox-static");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("BOUND ").map(|s| s.trim().to_string()))
}

/// ISC dhclient once; the address from its lease file.
fn dhclient(net: &Net, dir: &Path) -> Option<String> {
    let (lf, pf) = (dir.join("dhclient.leases"), dir.join("dhclient.pid"));
    let _ = std::fs::remove_file(&lf);
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.cli,
            "timeout",
            "30",
            "dhclient",
            "-1",
            "-sf",
            "/bin/true",
            "-lf",
        ])
        .arg(&lf)
        .arg("-pf")
        .arg(&pf)
        .arg(&net.cli_if)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("isc-dhcp-client");
    // dhclient stays in the background renewing: stop it by its pid.
    if let Ok(pid) = std::fs::read_to_string(&pf) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    if !st.success() {
        return None;
    }
    let leases = std::fs::read_to_string(&lf).ok()?;
    leases
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("fixed-address "))
        .map(|s| s.trim_end_matches(';').to_string())
}

#[test]
fn full_mode_real_clients_and_restart() {
    if !common::need_root("network namespaces") || !common::need_tools(&["busybox", "dhclient"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let net = Net::new("f");
    write_config(tmp.path(), &net, "full");
    let srv = start(&net, tmp.path());
    let a = udhcpc(&net, tmp.path()).expect("udhcpc got no lease");
    assert!(
        a.starts_with(&format!("10.66.{}.1", net.subnet)) && a != net.server_ip(),
        "{a}"
    );
    let b = dhclient(&net, tmp.path()).expect("dhclient got no lease");
    assert_eq!(a, b, "same MAC, same address");
    // Restart from the same state directory: the lease is honoured.
    drop(srv);
    let _srv = start(&net, tmp.path());
    assert_eq!(
        udhcpc(&net, tmp.path()).as_deref(),
        Some(a.as_str()),
        "lease lost across restart"
    );
    let metrics = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.srv,
            "curl",
            "-s",
            &format!("http://{}:8080/metrics", net.server_ip()),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("corral_dhcp_acks_total 1"));
}

#[test]
fn proxy_mode_gives_boot_information_but_no_address() {
    if !common::need_root("network namespaces") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let net = Net::new("p");
    write_config(tmp.path(), &net, "proxy");
    let _srv = start(&net, tmp.path());
    assert_eq!(
        udhcpc(&net, tmp.path()),
        None,
        "ProxyDHCP handed out an address"
    );
    // A PXE client (with an address from the site's server) broadcasts a DISCOVER with PXEClient.
    ip(&[
        "-n",
        &net.cli,
        "addr",
        "add",
        &format!("10.66.{}.50/24", net.subnet),
        "dev",
        &net.cli_if,
    ]);
    let probe = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, 25, sys.argv[1].encode())
s.bind(("0.0.0.0", 68))
mac = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
pkt = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0xabcd, 0, 0x8000, b"\0"*4, b"\0"*4, b"\0"*4, b"\0"*4, mac + b"\0"*10, b"\0"*64, b"\0"*128)
vc = b"PXEClient:Arch:00000:UNDI:002001"
pkt += bytes([99, 130, 83, 99, 53, 1, 1, 93, 2, 0, 0, 60, len(vc)]) + vc + bytes([255])
s.sendto(pkt, ("255.255.255.255", 67))
s.settimeout(5)
while True:
    data, _ = s.recvfrom(2048)
    if data[0] == 2 and data[4:8] == struct.pack("!I", 0xabcd):
        yi = socket.inet_ntoa(data[16:20]); si = socket.inet_ntoa(data[20:24])
        f = data[108:236].split(b"\0")[0].decode()
        print(yi, si, f, len(data))
        break
"#;
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.cli,
            "python3",
            "-c",
            probe,
            &net.cli_if,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        fields.len(),
        4,
        "no ProxyDHCP offer: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fields[0], "0.0.0.0", "ProxyDHCP offered an address");
    assert_eq!(fields[1], net.server_ip());
    assert_eq!(fields[2], "undionly.kpxe");
    assert!(fields[3].parse::<usize>().unwrap() >= 300);
}
