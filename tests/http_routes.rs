//! The routing table through a running corral on loopback, with curl as the client: with an operator
//! listener (`[api]`) each listener serves only its own paths; operator reads need the read (or admin)
//! token and writes the admin token; a known path with another method is a 405 with `Allow`; an unknown
//! path is a 404; and each refusal is counted on /metrics.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `curl` → (status, headers lower-cased, body).
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "-D", "-", "-o", "-", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_ascii_lowercase(), body.to_string())
}

const ADMIN: &str = "admin-3c1f0e5a9d2b7e44";
const READ: &str = "read-9b77d2c81f0a6e35";

#[test]
fn listeners_methods_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = dir.join("images/testos");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(
        img.join("image.toml"),
        "kernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\n",
    )
    .unwrap();
    std::fs::write(img.join("vmlinuz"), b"kernel bytes").unwrap();
    std::fs::write(img.join("initrd.img"), b"i").unwrap();
    std::fs::write(img.join("a+b c.txt"), b"plus and space").unwrap();
    std::fs::write(dir.join("admin-token"), format!("{ADMIN}\n")).unwrap();
    std::fs::write(dir.join("read-token"), format!("{READ}\n")).unwrap();
    for f in ["admin-token", "read-token"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (boot_port, api_port) = (free_port(), free_port());
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts");
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}\"\n\
             [http]\nlisten = \"127.0.0.1:{boot_port}\"\nadmin_token_file = \"{}\"\nread_token_file = \"{}\"\n\
             [api]\nlisten = \"127.0.0.1:{api_port}\"\n[tftp]\nenabled = false\n",
            scripts.display(),
            dir.join("admin-token").display(),
            dir.join("read-token").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let srv = Server(
        Command::new(env!("CARGO_BIN_EXE_corral"))
            .args(["serve", "--config"])
            .arg(dir.join("corral.toml"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in [boot_port, api_port] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "corral did not start: {}",
                std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let boot = format!("http://127.0.0.1:{boot_port}");
    let api = format!("http://127.0.0.1:{api_port}");
    let read = format!("Authorization: Bearer {READ}");
    let admin = format!("Authorization: Bearer {ADMIN}");

    // The boot listener: firmware's paths, no token; the operator paths are not served here.
    let (code, _, body) = curl(&[&format!("{boot}/boot.ipxe")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("#!ipxe"), "{body}");
    let (code, _, body) = curl(&[&format!("{boot}/images/testos/vmlinuz")]);
    assert_eq!((code, body.as_str()), (200, "kernel bytes"));
    // A path's `+` is a plus and `%20` a space (a query's `+` would be a space).
    let (code, _, body) = curl(&[&format!("{boot}/images/testos/a+b%20c.txt")]);
    assert_eq!((code, body.as_str()), (200, "plus and space"));
    let (code, _, _) = curl(&["-I", &format!("{boot}/images/testos/vmlinuz")]);
    assert_eq!(code, 200, "HEAD is GET without a body");
    for p in ["/api/v1/nodes", "/metrics", "/"] {
        let (code, _, body) = curl(&["-H", &admin, &format!("{boot}{p}")]);
        assert_eq!(code, 404, "{p} on the boot listener");
        assert!(body.contains("operator listener"), "{p}: {body}");
    }
    // ... and the operator listener serves no boot files.
    let (code, _, body) = curl(&[&format!("{api}/images/testos/vmlinuz")]);
    assert_eq!(code, 404);
    assert!(body.contains("boot listener"), "{body}");

    // Reads: the read token or the admin token; without, 401 with a challenge. The dashboard page itself
    // carries no data and needs none.
    let (code, head, _) = curl(&[&format!("{api}/api/v1/nodes")]);
    assert_eq!(code, 401);
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    let (code, _, _) = curl(&[
        "-H",
        "Authorization: Bearer wrong",
        &format!("{api}/metrics"),
    ]);
    assert_eq!(code, 401);
    for (token, p) in [
        (&read, "/api/v1/nodes"),
        (&read, "/api/v1/clusters"),
        (&read, "/api/v1/events?limit=5"),
        (&admin, "/api/v1/nodes"),
        (&read, "/metrics"),
    ] {
        let (code, _, body) = curl(&["-H", token, &format!("{api}{p}")]);
        assert_eq!(code, 200, "{p}: {body}");
    }
    let (code, head, body) = curl(&[&format!("{api}/")]);
    assert_eq!(code, 200);
    assert!(
        head.contains("text/html") && body.contains("<html"),
        "{head}"
    );

    // Writes: the admin token only; the read token does not write.
    let (code, _, _) = curl(&[
        "-X",
        "POST",
        "-H",
        &read,
        &format!("{api}/api/v1/nodes/52:54:00:00:00:09/release"),
    ]);
    assert_eq!(code, 401);
    let (code, _, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &admin,
        &format!("{api}/api/v1/nodes/not-a-mac/release"),
    ]);
    assert_eq!(code, 400, "{body}");
    let (code, _, body) = curl(&[
        "-H",
        &admin,
        "-H",
        "Content-Type: application/json",
        "--data",
        "{\"cluster\":\"none\",\"metric\":\"m\",\"value\":1}",
        &format!("{api}/api/v1/metrics"),
    ]);
    assert_eq!(code, 400, "no policy, so no cluster `none`: {body}");

    // Methods: a known path with another one is 405 with what it takes; an unknown path is 404.
    let (code, head, _) = curl(&["-X", "POST", &format!("{boot}/images/testos/vmlinuz")]);
    assert_eq!(code, 405);
    assert!(head.contains("allow: get, head"), "{head}");
    let (code, head, _) = curl(&["-H", &admin, &format!("{api}/api/v1/metrics")]);
    assert_eq!(code, 405);
    assert!(head.contains("allow: post"), "{head}");
    for p in ["/nothing", "/boot/", "/images/testos", "/api/v2/nodes"] {
        let (code, _, _) = curl(&[&format!("{boot}{p}")]);
        assert_eq!(code, 404, "{p}");
    }
    let (code, _, body) = curl(&[&format!("{boot}/api/v1/agent/elsewhere")]);
    assert_eq!(code, 404);
    assert!(body.contains("agent API"), "{body}");
    let (code, _, _) = curl(&[&format!("{boot}/api/v1/agent/orders")]);
    assert_eq!(code, 401, "orders need a boot's token");

    // Every refusal was counted.
    let (_, _, metrics) = curl(&["-H", &read, &format!("{api}/metrics")]);
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
    };
    assert!(value("corral_http_unauthorized_total") >= 3);
    assert!(value("corral_http_not_found_total") >= 9);
    assert!(value("corral_http_bad_requests_total") >= 2);
    drop(srv);
}
