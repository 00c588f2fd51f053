//! The routing table through a running corral on loopback, with curl as the client: with an operator
//! listener (`[api]`) each listener serves only its own paths; operator reads need the read (or admin)
//! token and writes the admin token; a known path with another method is a 405 with `Allow`; an unknown
//! path is a 404; and each refusal is counted on /metrics.

use std::process::Command;

mod common;

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
    common::image(dir, "testos");
    std::fs::write(dir.join("images/testos/a+b c.txt"), b"plus and space").unwrap();
    std::fs::write(dir.join("policy.toml"), "").unwrap();
    std::fs::write(dir.join("admin-token"), format!("{ADMIN}\n")).unwrap();
    std::fs::write(dir.join("read-token"), format!("{READ}\n")).unwrap();
    for f in ["admin-token", "read-token"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (boot_port, api_port) = (common::free_port(), common::free_port());
    common::loopback_config(
        dir,
        boot_port,
        &format!(
            "admin_token_file = \"{}\"\nread_token_file = \"{}\"\n",
            dir.join("admin-token").display(),
            dir.join("read-token").display()
        ),
        &format!("[api]\nlisten = \"127.0.0.1:{api_port}\"\n"),
    );
    let srv = common::start(dir, boot_port);
    common::wait_for("the operator listener", 10, || {
        std::net::TcpStream::connect(("127.0.0.1", api_port)).is_ok()
    });
    let boot = format!("http://127.0.0.1:{boot_port}");
    let api = format!("http://127.0.0.1:{api_port}");
    let read = format!("Authorization: Bearer {READ}");
    let admin = format!("Authorization: Bearer {ADMIN}");

    // The boot listener: firmware's paths, no token; the operator paths are not served here.
    let (code, _, body) = curl(&[&format!("{boot}/boot.ipxe")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("#!ipxe"), "{body}");
    let (code, _, body) = curl(&[&format!("{boot}/images/testos/vmlinuz")]);
    assert_eq!((code, body.as_str()), (200, "k"));
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

    // Parameters are matched on the raw path and decoded once: no traversal reaches a system file.
    for p in [
        "/images/../../../../etc/passwd",
        "/images/testos/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/images/testos/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/images/%2e%2e%2f%2e%2e%2fetc/passwd",
        "/ipxe/../../../etc/passwd",
        "/ipxe//etc/passwd",
        "/images/testos/vmlinuz%00.txt",
        "/boot/../api/v1/nodes",
    ] {
        let (code, _, body) = curl(&["--path-as-is", &format!("{boot}{p}")]);
        assert!(code != 200 && !body.contains("root:"), "{p}: {code} {body}");
    }

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
