//! HTTP on loopback against curl: entry and node scripts, boot files with HEAD, Range, validators, 404/400,
//! path confinement, and the inventory surviving a restart.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let cfg = dir.join("corral.toml");
    let text = format!(
        "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n[tftp]\nenabled = false\n{extra}",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts").display()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn start(dir: &Path, port: u16) -> Server {
    let cfg = dir.join("corral.toml");
    let log = std::fs::File::create(dir.join(format!("serve-{port}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "corral did not start: {}",
            std::fs::read_to_string(dir.join(format!("serve-{port}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, port }
}

/// Runs curl; returns (status line code, headers, body).
fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-S", "-D", "-", "--path-as-is"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_lowercase(), raw[split..].to_vec())
}

fn image_dir(dir: &Path) -> PathBuf {
    let img = dir.join("images/testos");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(img.join("image.toml"), "arch = \"x86_64\"\nkernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\ncmdline = \"console=ttyS0 node={{mac}} host={{hostname}}\"\n").unwrap();
    let mut data = Vec::with_capacity(5_000_000);
    let mut x: u32 = 12345;
    for _ in 0..5_000_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        data.push((x >> 16) as u8);
    }
    std::fs::File::create(img.join("initrd.img"))
        .unwrap()
        .write_all(&data)
        .unwrap();
    std::fs::write(img.join("vmlinuz"), b"kernel-bytes").unwrap();
    img
}

#[test]
fn scripts_files_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = image_dir(dir);
    std::fs::write(dir.join("outside"), b"secret").unwrap();
    std::os::unix::fs::symlink(dir.join("outside"), img.join("escape")).unwrap();
    let port = free_port();
    write_config(
        dir,
        port,
        "[boot]\nnode = [{ mac = \"52:54:00:00:00:02\", image = \"testos\" }]\n\
         [[dhcp.reservation]]\nmac = \"52:54:00:00:00:02\"\naddress = \"127.0.0.1\"\n",
    );
    let srv = start(dir, port);
    let base = format!("http://127.0.0.1:{}", srv.port);

    // Entry script chains to the per-node URL with iPXE's facts.
    let (code, _, body) = curl(&[&format!("{base}/boot.ipxe")]);
    assert_eq!(code, 200);
    let body = String::from_utf8(body).unwrap();
    assert!(body.starts_with("#!ipxe"));
    assert!(
        body.contains(&format!("{base}/boot/${{netX/mac:hexhyp}}?uuid=${{uuid}}")),
        "{body}"
    );

    // Unmapped node with no default image: parked.
    let (code, _, body) = curl(&[&format!("{base}/boot/52-54-00-00-00-01?buildarch=x86_64")]);
    assert_eq!(code, 200);
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("is parked")
            && body.contains(&format!("chain --replace --autofree {base}/boot.ipxe")),
        "{body}"
    );

    // Mapped node: its image, with its own MAC and hostname in the cmdline.
    let (code, head, body) = curl(&[&format!(
        "{base}/boot/52-54-00-00-00-02?buildarch=x86_64&uuid=abcd&serial=S%201"
    )]);
    assert_eq!(code, 200);
    assert!(head.contains("cache-control: no-store"));
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains(&format!("kernel {base}/images/testos/vmlinuz console=ttyS0 node=52:54:00:00:00:02 host=node-525400000002 initrd=initrd.img")),
        "{body}"
    );
    // Wrong architecture: an error script that says why, not an image.
    let (_, _, body) = curl(&[&format!("{base}/boot/52-54-00-00-00-02?buildarch=arm64")]);
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("is for x86_64 but this node runs arm64"));

    // Bad MAC: 400 with a clear message.
    let (code, _, body) = curl(&[&format!("{base}/boot/not-a-mac")]);
    assert_eq!(code, 400);
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("not a MAC address"));

    // Boot file: HEAD, whole GET, ranges, validators.
    let original = std::fs::read(img.join("initrd.img")).unwrap();
    let url = format!("{base}/images/testos/initrd.img");
    let (code, head, body) = curl(&["-I", "-o", "/dev/null", &url]);
    assert_eq!(code, 200);
    assert!(
        head.contains("content-length: 5000000") && head.contains("accept-ranges: bytes"),
        "{head}"
    );
    assert!(body.is_empty());
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_string();
    let (code, _, body) = curl(&[&url]);
    assert_eq!(code, 200);
    assert!(body == original, "whole file differs");
    let (code, head, body) = curl(&["-r", "1000-1999", &url]);
    assert_eq!(code, 206);
    assert!(
        head.contains("content-range: bytes 1000-1999/5000000"),
        "{head}"
    );
    assert_eq!(body, &original[1000..2000]);
    let (code, _, body) = curl(&["-r", "-100", &url]);
    assert_eq!(code, 206);
    assert_eq!(body, &original[original.len() - 100..]);
    let (code, head, _) = curl(&["-r", "6000000-", &url]);
    assert_eq!(code, 416);
    assert!(head.contains("content-range: bytes */5000000"));
    let (code, _, body) = curl(&["-H", &format!("If-None-Match: {etag}"), &url]);
    assert_eq!(code, 304);
    assert!(body.is_empty());
    // If-Range with a stale validator: the whole file, not the range.
    let (code, _, body) = curl(&["-r", "0-9", "-H", "If-Range: \"stale\"", &url]);
    assert_eq!(code, 200);
    assert_eq!(body.len(), original.len());

    // 404s and confinement: nothing outside the image folder is reachable, symlinks included.
    for bad in [
        "/images/testos/missing",
        "/images/nope/vmlinuz",
        "/images/testos/../../outside",
        "/images/testos/escape",
        "/nothing",
    ] {
        let (code, _, body) = curl(&[&format!("{base}{bad}")]);
        assert_eq!(code, 404, "{bad}");
        assert!(!String::from_utf8_lossy(&body).contains("secret"));
    }
    // Only GET and HEAD.
    let (code, head, _) = curl(&["-X", "POST", &url]);
    assert_eq!(code, 405);
    assert!(head.contains("allow: get, head"));

    // Inventory recorded the node's facts.
    let (_, _, body) = curl(&[&format!("{base}/api/v1/nodes")]);
    let nodes: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let n = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["mac"] == "52:54:00:00:00:02")
        .expect("node recorded");
    assert_eq!(n["facts"]["uuid"], "abcd");
    assert_eq!(n["facts"]["serial"], "S 1");
    assert_eq!(n["boot_count"], 2);
    let (code, head, page) = curl(&[&format!("{base}/")]);
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/html"));
    assert!(String::from_utf8(page)
        .unwrap()
        .contains("/api/v1/clusters"));
    let (_, _, metrics) = curl(&[&format!("{base}/metrics")]);
    assert!(String::from_utf8(metrics)
        .unwrap()
        .contains("corral_http_node_scripts_total 3"));

    // Without a policy a script carries no secret, so another host gets it too, but its request is not
    // the node's: nothing about the node changes (facts, boot count).
    let (code, _, _) = curl(&[
        "--interface",
        "127.0.0.7",
        &format!("{base}/boot/52-54-00-00-00-02?buildarch=x86_64&uuid=forged"),
    ]);
    assert_eq!(code, 200);
    std::thread::sleep(Duration::from_millis(600));
    let (_, _, body) = curl(&[&format!("{base}/api/v1/nodes")]);
    let nodes: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let n = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["mac"] == "52:54:00:00:00:02")
        .unwrap();
    assert_eq!(
        (n["facts"]["uuid"].as_str(), n["boot_count"].as_u64()),
        (Some("abcd"), Some(2))
    );
}

#[test]
fn inventory_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    image_dir(dir);
    let port = free_port();
    write_config(
        dir,
        port,
        "[boot]\ndefault_image = \"testos\"\n[[dhcp.reservation]]\nmac = \"52:54:00:aa:bb:cc\"\naddress = \"127.0.0.1\"\n",
    );
    {
        let srv = start(dir, port);
        curl(&[&format!(
            "http://127.0.0.1:{}/boot/52-54-00-aa-bb-cc?uuid=u-1&memsize=2048",
            srv.port
        )]);
        // SIGTERM: a clean stop flushes the inventory.
        let pid = srv.child.id() as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(500));
    }
    let srv = start(dir, port);
    let (_, _, body) = curl(&[&format!("http://127.0.0.1:{}/api/v1/nodes", srv.port)]);
    let nodes: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(nodes[0]["mac"], "52:54:00:aa:bb:cc");
    assert_eq!(nodes[0]["facts"]["memsize"], 2048);
}

#[test]
fn check_reports_every_error_with_position() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    image_dir(dir);
    let cfg = write_config(
        dir,
        1,
        "[boot]\ndefault_image = \"testoss\"\nprak_poll = 3\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corral.toml:12:1: unknown key `prak_poll`, did you mean `park_poll`?"),
        "{err}"
    );
    // Fix the key: the unknown image is reported at its value.
    let cfg = write_config(dir, 1, "[boot]\ndefault_image = \"testoss\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["check", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"][0]["line"], 11);
    assert_eq!(v["errors"][0]["column"], 17);
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("did you mean `testos`?"));
}
