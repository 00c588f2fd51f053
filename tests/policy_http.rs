//! The policy engine through a running corral on loopback: unknown nodes that ask for their script are
//! discovered and fill clusters by priority with their slot's image link and identity; a policy edit moves a
//! node from the lower-priority cluster; a bad edit is rejected while the running policy stays; assignments
//! survive a restart; `corral status` / `corral nodes` / `corral events` show it.

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

fn start(dir: &Path, port: u16) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["serve", "--config"])
        .arg(dir.join("corral.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "corral did not start: {}",
            std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server(child)
}

fn get(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-S", "-f", url])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn corral(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn image(dir: &Path, name: &str) {
    let d = dir.join("images").join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("image.toml"), format!("kernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\ncmdline = \"img={name} host={{{{hostname}}}} addr={{{{address}}}} slot={{{{cluster}}}}/{{{{slot}}}}\"\n")).unwrap();
    std::fs::write(d.join("vmlinuz"), b"k").unwrap();
    std::fs::write(d.join("initrd.img"), b"i").unwrap();
}

const POLICY: &str = r#"
[settings]
cooldown = 0

[[cluster]]
name = "db"
priority = 10
min = 1
max = 2
default = 1
preempt = true
images = ["db-a"]
identity = { hostname = "db-{n}", addresses = "10.77.2.10-10.77.2.11" }

[[cluster]]
name = "web"
priority = 1
min = 1
max = 3
default = 3
images = ["web-a", "web-b"]
identity = { hostname = "web-{n}", addresses = "10.77.3.10-10.77.3.12" }
"#;

fn script(base: &str, n: u8) -> String {
    get(&format!(
        "{base}/boot/52-54-00-00-00-0{n}?buildarch=x86_64&memsize=512"
    ))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn discovery_priority_links_reload_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for i in ["db-a", "web-a", "web-b"] {
        image(dir, i);
    }
    let port = free_port();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts");
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}\"\npolicy = \"policy.toml\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[tftp]\nenabled = false\n[boot]\ntrust_request_address = true\n",
            scripts.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    let cfg = dir.join("corral.toml");
    let cfg = cfg.to_str().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let srv = start(dir, port);

    // Four unknown nodes ask in turn: the higher-priority cluster fills first, then web's slots in order,
    // each slot booting its own link (slot 0 → link 1, later slots → the last link) with its identity.
    let s1 = script(&base, 1);
    assert!(
        s1.contains("img=db-a host=db-1 addr=10.77.2.10 slot=db/0"),
        "{s1}"
    );
    let s2 = script(&base, 2);
    assert!(
        s2.contains("img=web-a host=web-1 addr=10.77.3.10 slot=web/0"),
        "{s2}"
    );
    let s3 = script(&base, 3);
    assert!(
        s3.contains("img=web-b host=web-2 addr=10.77.3.11 slot=web/1"),
        "{s3}"
    );
    let s4 = script(&base, 4);
    assert!(
        s4.contains("img=web-b host=web-3 addr=10.77.3.12 slot=web/2"),
        "{s4}"
    );
    // A fifth node finds no room: parked.
    assert!(script(&base, 5).contains("is parked"));

    let (code, out, _) = corral(&["status", "--json", "--config", cfg]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v[0]["name"].as_str(),
            v[0]["current"].as_u64(),
            v[0]["desired"].as_u64()
        ),
        (Some("db"), Some(1), Some(1))
    );
    assert_eq!(
        (v[1]["name"].as_str(), v[1]["current"].as_u64()),
        (Some("web"), Some(3))
    );

    let metrics = get(&format!("{base}/metrics"));
    assert!(
        metrics.contains("corral_cluster_nodes{cluster=\"web\",kind=\"current\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("corral_nodes_known 5"), "{metrics}");

    // Raise db's desired count: the idle fifth node is taken first (no preemption needed)...
    std::fs::write(
        dir.join("policy.toml"),
        POLICY.replace("default = 1\npreempt", "default = 2\npreempt"),
    )
    .unwrap();
    wait_for("reload to fill db", || {
        get(&format!("{base}/api/v1/clusters")).contains("\"current\": 2")
    });
    assert!(script(&base, 5).contains("slot=db/1"));

    // ...and with no idle node left, raising it again (max 2 → 3) takes the least utilised node of `web`.
    let grown = POLICY
        .replace("default = 1\npreempt", "default = 3\npreempt")
        .replace("max = 2\ndefault", "max = 3\ndefault")
        .replace("10.77.2.10-10.77.2.11", "10.77.2.10-10.77.2.12");
    std::fs::write(dir.join("policy.toml"), &grown).unwrap();
    wait_for("preemption", || {
        get(&format!("{base}/api/v1/events?limit=50")).contains("\"kind\": \"preempt\"")
    });
    let events = get(&format!("{base}/api/v1/events?limit=50"));
    assert!(events.contains("moves from web/"), "{events}");
    let nodes: serde_json::Value =
        serde_json::from_str(&get(&format!("{base}/api/v1/nodes"))).unwrap();
    let moved = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["cluster"] == "db" && n["slot"] == 2)
        .expect("db slot 2 filled");
    assert_eq!(moved["state"], "reboot-pending", "{moved}");
    let moved_mac = moved["mac"].as_str().unwrap().replace(':', "-");
    // When that node restarts it boots the new cluster's image with the new slot's identity.
    let s = get(&format!("{base}/boot/{moved_mac}?buildarch=x86_64"));
    assert!(
        s.contains("img=db-a host=db-3 addr=10.77.2.12 slot=db/2"),
        "{s}"
    );
    let (_, out, _) = corral(&["nodes", "--config", cfg]);
    assert!(out.contains("db-3"), "{out}");

    // A bad edit is rejected with its position; the running policy stays and keeps answering.
    std::fs::write(
        dir.join("policy.toml"),
        grown.replace("priority = 1\n", "priority = 1\nmin = 9\n"),
    )
    .unwrap();
    wait_for("reload rejection", || {
        get(&format!("{base}/api/v1/events?limit=5")).contains("reload-rejected")
    });
    let events = get(&format!("{base}/api/v1/events?limit=5"));
    assert!(events.contains("policy.toml:"), "{events}");
    assert!(script(&base, 1).contains("slot=db/0"));
    let (code, _, err) = corral(&["check", "--config", cfg]);
    assert_eq!(code, 1);
    assert!(err.contains("policy.toml:") && err.contains("min"), "{err}");
    let (_, out, _) = corral(&["events", "--config", cfg]);
    assert!(out.contains("reload-rejected"), "{out}");

    // A restart keeps every node in its slot.
    std::fs::write(dir.join("policy.toml"), &grown).unwrap();
    drop(srv);
    let _srv = start(dir, port);
    let s = get(&format!("{base}/boot/{moved_mac}?buildarch=x86_64"));
    assert!(s.contains("slot=db/2"), "{s}");
    let nodes: serde_json::Value =
        serde_json::from_str(&get(&format!("{base}/api/v1/nodes"))).unwrap();
    assert_eq!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["cluster"].is_string())
            .count(),
        5
    );
}

#[test]
fn metrics_feed_scale_rules_behind_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    image(dir, "web-a");
    let port = free_port();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts");
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}\"\npolicy = \"policy.toml\"\n[http]\nlisten = \"127.0.0.1:{port}\"\napi_token = \"s3cret-0123456789abc\"\n[tftp]\nenabled = false\n[boot]\ntrust_request_address = true\n",
            scripts.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[[cluster]]\nname = \"web\"\nmin = 1\nmax = 4\ndefault = 1\nimages = [\"web-a\"]\nscale = [{ metric = \"rt_ms\", above = 500.0, for = 0, add = 2, cooldown = \"1h\" }]\n",
    )
    .unwrap();
    let _srv = start(dir, port);
    let url = format!("http://127.0.0.1:{port}/api/v1/metrics");
    let post = |auth: &str, body: &str| -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                auth,
                "--data",
                body,
                &url,
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let sample = r#"{"cluster": "web", "metric": "rt_ms", "value": 900.0}"#;
    assert_eq!(post("X-None: 1", sample), "401");
    assert_eq!(post("Authorization: Bearer wrong", sample), "401");
    assert_eq!(
        post(
            "Authorization: Bearer s3cret-0123456789abc",
            r#"{"cluster": "nope", "metric": "rt_ms", "value": 1}"#
        ),
        "400"
    );
    assert_eq!(
        post("Authorization: Bearer s3cret-0123456789abc", "not json"),
        "400"
    );
    assert_eq!(
        post("Authorization: Bearer s3cret-0123456789abc", sample),
        "200"
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_for("the scale rule", || {
        get(&format!("{base}/api/v1/clusters")).contains("\"desired\": 3")
    });
    assert!(get(&format!("{base}/api/v1/events"))
        .contains("scale rule on rt_ms adds 2 node(s): desired now 3"));
}
