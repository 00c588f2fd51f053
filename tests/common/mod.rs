//! Helpers shared by the integration tests: a corral process that is killed when dropped, free ports,
//! running the CLI and curl.
#![allow(dead_code)]

pub mod nbd;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `corral serve`, killed (by PID) when dropped.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// SIGKILL, as a crash would.
    pub fn crash(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Whether a missing prerequisite fails a test instead of skipping it: always as root (tests/run.sh runs
/// the suite as root after tests/deps.sh installed everything, so anything missing there is a broken
/// install, not a reason to pass), or with `CORRAL_TESTS_STRICT=1`.
pub fn strict() -> bool {
    is_root() || std::env::var("CORRAL_TESTS_STRICT").is_ok_and(|v| v == "1")
}

/// Where skipped tests are recorded, one line each (`<test>: <why>`): `CORRAL_SKIP_LOG`, which tests/run.sh
/// sets and counts for its closing line, else `skipped.log` in cargo's scratch directory for tests.
pub fn skip_log() -> std::path::PathBuf {
    std::env::var_os("CORRAL_SKIP_LOG")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped.log"))
}

/// Records that the running test did not run (`why`), so the run counts it as skipped, not passed; in
/// [`strict`] mode fails the test instead. The caller returns after this.
pub fn skip(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    assert!(
        !strict(),
        "{test}: {why} (a missing prerequisite fails the test when run as root / under tests/run.sh: run tests/deps.sh)"
    );
    use std::io::Write;
    // One line per skipped test: the run counts lines.
    let why: String = why.split_whitespace().collect::<Vec<_>>().join(" ");
    let line = format!("{} {test}: {why}\n", env!("CARGO_CRATE_NAME"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_log())
    {
        // One write of one line: tests run on threads and in several processes at once.
        let _ = f.write_all(line.as_bytes());
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// True when the process runs as root; otherwise records the test as skipped ([`skip`]) and returns false.
pub fn need_root(why: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(&format!("needs root for {why}"));
    false
}

/// True when every program is in PATH; otherwise records the test as skipped, naming the missing ones
/// (fails in [`strict`] mode).
pub fn need_tools(programs: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !std::env::split_paths(&path).any(|d| is_executable(&d.join(p))))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!(
        "{} not installed (tests/deps.sh installs them)",
        missing.join(", ")
    ));
    false
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Starts `corral serve --config <dir>/corral.toml` (log in `<dir>/serve.log`) and waits until
/// `port` on loopback accepts connections.
pub fn start(dir: &Path, port: u16) -> Server {
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
    let deadline = Instant::now() + Duration::from_secs(30);
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

/// GET with curl; panics unless 2xx.
pub fn get(url: &str) -> String {
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

/// Runs a program: (exit code, stdout, stderr).
pub fn run(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs the corral CLI.
pub fn corral(args: &[&str]) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_corral"), args)
}

/// Waits up to `secs` for `f`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal image (as [`image`]) whose command line carries the hostname and the agent's settings.
pub fn agent_image(dir: &Path, name: &str) {
    image(dir, name);
    std::fs::write(
        dir.join("images").join(name).join("image.toml"),
        "kernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\ncmdline = \"host={{hostname}} {{agent}}\"\n",
    )
    .unwrap();
}

/// A minimal image in `<dir>/images/<name>` whose command line shows the slot and its disk.
pub fn image(dir: &Path, name: &str) {
    let d = dir.join("images").join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("image.toml"),
        "kernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\ncmdline = \"slot={{cluster}}/{{slot}} disk={{disk}}\"\n",
    )
    .unwrap();
    std::fs::write(d.join("vmlinuz"), b"k").unwrap();
    std::fs::write(d.join("initrd.img"), b"i").unwrap();
}

/// An image catalog in `<dir>/images` with one image per name, each the test OS (built by
/// tests/testos/build.sh into images/testos) with the given command line template.
pub fn testos_catalog(dir: &Path, names: &[&str], cmdline: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/testos");
    assert!(
        src.join("vmlinuz").exists(),
        "build the test OS first: tests/testos/build.sh images/testos"
    );
    let images = dir.join("images");
    for name in names {
        let d = images.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
        std::fs::write(
            d.join("image.toml"),
            format!("arch = \"x86_64\"\nkernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\ncmdline = \"{cmdline}\"\n"),
        )
        .unwrap();
    }
    images
}

/// GET a JSON path of the corral running in a lab, from inside its namespace (Null if unreadable).
#[cfg(feature = "lab")]
pub fn lab_api(lab: &corral::lab::Lab, path: &str) -> serde_json::Value {
    let out = lab
        .run_in_server(
            "curl",
            &["-s", &format!("http://{}{path}", lab.server_ip())],
        )
        .unwrap();
    serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
}

/// Every event of a lab's corral, oldest first.
#[cfg(feature = "lab")]
pub fn lab_events(lab: &corral::lab::Lab) -> Vec<serde_json::Value> {
    let mut ev = lab_api(lab, "/api/v1/events?limit=2000")
        .as_array()
        .cloned()
        .unwrap_or_default();
    ev.reverse();
    ev
}

/// The value after `CORRAL-DISK <key>=` on the VM's serial console (the test OS's disk report), waiting for
/// it; fails with the serial log and corral's log when it does not come, or on a `CORRAL-DISK error=` line.
#[cfg(feature = "lab")]
pub fn disk_field(
    vm: &corral::lab::Vm,
    lab: &corral::lab::Lab,
    key: &str,
    timeout: Duration,
) -> String {
    let needle = format!("CORRAL-DISK {key}=");
    let deadline = Instant::now() + timeout;
    loop {
        let log = vm.log();
        // An error line ends the report: fail now rather than wait out the timeout.
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(&needle) || l.contains("CORRAL-DISK error="))
        {
            assert!(
                !line.contains("CORRAL-DISK error="),
                "{line}\nserial:\n{log}\ncorral log:\n{}",
                tail(&lab_log(lab), 6000)
            );
            let at = line.find(&needle).unwrap() + needle.len();
            return line[at..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no `{needle}` within {timeout:?}\nserial:\n{log}\ncorral log:\n{}",
            tail(&lab_log(lab), 6000)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// For the VM tests: the built test OS (`images/testos`), or None (recorded as skipped) when not root, since
/// namespaces and taps need root.
pub fn testos_for_vms() -> Option<std::path::PathBuf> {
    if !need_root("namespaces and taps") {
        return None;
    }
    let testos = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/testos");
    assert!(
        testos.join("vmlinuz").exists(),
        "build the test OS first: tests/testos/build.sh images/testos"
    );
    Some(testos)
}

/// A lab corral's log.
#[cfg(feature = "lab")]
pub fn lab_log(lab: &corral::lab::Lab) -> String {
    std::fs::read_to_string(lab.dir.join("corral.log")).unwrap_or_default()
}

/// The last `n` characters of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let v: Vec<char> = s.chars().collect();
    v[v.len().saturating_sub(n)..].iter().collect()
}

/// Waits until `f` returns Some; on timeout fails with the latest events and the end of corral's log.
#[cfg(feature = "lab")]
pub fn lab_wait<T>(
    lab: &corral::lab::Lab,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\nevents: {:#?}\ncorral log (end):\n{}",
            lab_events(lab)
                .iter()
                .rev()
                .take(25)
                .map(|e| format!("{} {} {}", e["kind"], e["node"], e["message"]))
                .collect::<Vec<_>>(),
            tail(&lab_log(lab), 4000)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A 64 MiB ext4 base disk `<dir>/disks/base.img` (tests/testos/mkbase.sh); returns the disks directory.
pub fn base_disk(dir: &Path) -> std::path::PathBuf {
    let disks = dir.join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let st = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testos/mkbase.sh"))
        .arg(disks.join("base.img"))
        .arg("64")
        .status()
        .unwrap();
    assert!(st.success(), "mkbase.sh failed");
    disks
}

/// A `[[dhcp.reservation]]` for `mac` at `address`: how a test on loopback (no DHCP) tells corral which
/// address a node asks from, so that its requests are the node's own.
pub fn reservation(mac: &str, address: &str) -> String {
    format!("[[dhcp.reservation]]\nmac = \"{mac}\"\naddress = \"{address}\"\n")
}

/// `<dir>/corral.toml` for a corral on loopback port `http` with `<dir>/images`, `<dir>/policy.toml`,
/// no DHCP or TFTP; `http_extra` and `extra` are appended to `[http]` and to the file.
pub fn loopback_config(dir: &Path, http: u16, http_extra: &str, extra: &str) {
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"{d}/state\"\nimages_dir = \"{d}/images\"\nscripts_dir = \"{s}\"\npolicy = \"{d}/policy.toml\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nlisten = \"127.0.0.1:{http}\"\n{http_extra}{extra}",
            d = dir.display(),
            s = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts").display()
        ),
    )
    .unwrap();
}

/// A small deterministic generator (xorshift), so a failing round can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A whole-disk base with its own boot loaders (tests/testos/mkboot.sh: syslinux for BIOS, a unified
/// kernel image for UEFI) at `<disks>/<name>.img`, `mib` MiB, for sanboot clusters.
pub fn boot_disk(testos: &Path, disks: &Path, name: &str, mib: u32) -> std::path::PathBuf {
    let img = disks.join(format!("{name}.img"));
    std::fs::create_dir_all(disks).unwrap();
    let (code, out, err) = run(
        "bash",
        &[
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/testos/mkboot.sh")
                .to_string_lossy(),
            &testos.to_string_lossy(),
            &img.to_string_lossy(),
            &mib.to_string(),
        ],
    );
    assert_eq!(code, 0, "mkboot.sh: {out}{err}");
    img
}

/// The boot token on a node script's command line.
pub fn token_of(script: &str) -> Option<String> {
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("corral.token="))
        .map(str::to_string)
}

/// Events of a corral on loopback port `http`, oldest first.
pub fn events_on(http: u16) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = serde_json::from_str::<serde_json::Value>(&get(&format!(
        "http://127.0.0.1:{http}/api/v1/events?limit=1000"
    )))
    .unwrap()
    .as_array()
    .cloned()
    .unwrap_or_default();
    v.reverse();
    v
}

/// POST `body` (JSON) with a bearer token to a corral on loopback; returns the status code (0 when
/// corral did not answer).
pub fn post_bearer(http: u16, path: &str, token: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A running `corral-agent`, killed when dropped.
pub struct AgentProcess(pub Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real `corral-agent` against a corral on loopback with a boot's token; its drain hook is
/// `<dir>/drain.sh` and its power-off command touches `<dir>/off`; log in `<dir>/agent<n>.log`.
pub fn agent(
    dir: &Path,
    http: u16,
    token: &str,
    n: u32,
    extra: &[std::ffi::OsString],
) -> AgentProcess {
    let log = std::fs::File::create(dir.join(format!("agent{n}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_corral-agent"))
        .args([
            "--api",
            &format!("http://127.0.0.1:{http}"),
            "--token",
            token,
        ])
        .args(["--drain-hook"])
        .arg(dir.join("drain.sh"))
        .args(extra)
        .args(["--poweroff"])
        .arg(format!("touch {}", dir.join("off").display()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    AgentProcess(child)
}

/// The boot token on a node script's command line; panics when there is none.
pub fn token(script: &str) -> String {
    token_of(script).unwrap_or_else(|| panic!("no token in {script}"))
}

/// `[boot]` for tests where several pretend nodes ask from 127.0.0.1: the trusted-network setting counts
/// each request's address as its node's (tests/hostile_lan.rs and the trust unit tests cover the default).
pub const TRUSTED_LOOPBACK: &str = "[boot]\npark_poll = 1\ntrust_request_address = true\n";

/// Two clusters for move tests: `db` (priority 10, preempts, `default = db`) and `web` (priority 1, one
/// node, 5 s drain grace), and `mac` switched by `command` power scripts that keep its power state in
/// `<dir>/off` (each call taking `delay` seconds).
pub fn move_policy(db: u32, dir: &Path, mac: &str, delay: &str, boot_timeout: &str) -> String {
    let d = dir.display();
    let wait = if delay.is_empty() {
        String::new()
    } else {
        format!("sleep {delay}; ")
    };
    format!(
        r#"
[settings]
cooldown = 0
heartbeat_interval = "1s"
power_off_timeout = "10s"
boot_timeout = "{boot_timeout}"

[[cluster]]
name = "db"
priority = 10
min = 0
max = 1
default = {db}
preempt = true
images = ["img"]
identity = {{ hostname = "db-{{n}}" }}

[[cluster]]
name = "web"
priority = 1
min = 0
max = 1
default = 1
images = ["img"]
identity = {{ hostname = "web-{{n}}" }}
drain = {{ grace = "5s" }}

[[node]]
mac = "{mac}"
power = {{ driver = "command", on = "{wait}rm -f {d}/off; echo on >> {d}/power.log", off = "{wait}touch {d}/off; echo off >> {d}/power.log", status = "if [ -e {d}/off ]; then echo off; else echo on; fi" }}
"#
    )
}
