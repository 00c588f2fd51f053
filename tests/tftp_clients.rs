//! TFTP on loopback against clients nobody here wrote: atftp (blksize, windowsize, tsize), curl (blksize)
//! and tftp-hpa; traversal attempts refused; many transfers at once.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server {
    child: Child,
    port: u16,
    root: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start() -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::copy("/usr/lib/ipxe/undionly.kpxe", root.join("undionly.kpxe"))
        .expect("ipxe is installed");
    let mut x: u32 = 7;
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(root.join("sub/big.bin"), &big).unwrap();
    std::fs::write(root.join("exact.bin"), vec![0x5a; 1468 * 4]).unwrap();
    std::fs::write(dir.join("secret"), b"do not serve").unwrap();
    std::os::unix::fs::symlink(dir.join("secret"), root.join("escape")).unwrap();
    let port = free_udp_port();
    let http = free_tcp_port();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nscripts_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nlisten = \"0.0.0.0:{port}\"\nroot = \"root\"\n# a hundred at once from one address (the default allows 8 per address)\nmax_sessions_per_peer = 100\n",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["serve", "--config"])
        .arg(dir.join("corral.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // Ready once HTTP answers (every listener is bound before).
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Server {
        child,
        port,
        root,
        _tmp: tmp,
    }
}

fn atftp(s: &Server, remote: &str, options: &[&str]) -> (bool, Vec<u8>) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("atftp");
    cmd.args(["-g", "-r", remote, "-l"]).arg(out.path());
    for o in options {
        cmd.args(["--option", o]);
    }
    let st = cmd
        .arg("127.0.0.1")
        .arg(s.port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("atftp is installed");
    (st.success(), std::fs::read(out.path()).unwrap_or_default())
}

fn curl(s: &Server, remote: &str, blksize: Option<u32>) -> (bool, Vec<u8>) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "30"]);
    if let Some(b) = blksize {
        cmd.args(["--tftp-blksize", &b.to_string()]);
    }
    let out = cmd
        .arg(format!("tftp://127.0.0.1:{}/{remote}", s.port))
        .output()
        .expect("curl is installed");
    (out.status.success(), out.stdout)
}

#[test]
fn real_clients_get_exact_bytes() {
    if !common::need_tools(&["atftp", "tftp", "curl"]) {
        return;
    }
    let s = start();
    let kpxe = std::fs::read(s.root.join("undionly.kpxe")).unwrap();
    let big = std::fs::read(s.root.join("sub/big.bin")).unwrap();
    let exact = std::fs::read(s.root.join("exact.bin")).unwrap();

    for opts in [
        vec![],
        vec!["blksize 512"],
        vec!["blksize 1468", "tsize 0"],
        vec!["blksize 8192"],
        vec!["blksize 1468", "windowsize 16"],
        vec!["windowsize 1", "tsize 0"],
    ] {
        let (ok, got) = atftp(&s, "sub/big.bin", &opts);
        assert!(
            ok && got == big,
            "atftp {opts:?}: ok={ok} len={}",
            got.len()
        );
    }
    let (ok, got) = atftp(&s, "exact.bin", &["blksize 1468"]);
    assert!(ok && got == exact, "file of exactly 4 blocks");
    let (ok, got) = atftp(&s, "/undionly.kpxe", &[]);
    assert!(ok && got == kpxe, "leading slash means the root");

    for b in [None, Some(512), Some(1468), Some(8192)] {
        let (ok, got) = curl(&s, "sub/big.bin", b);
        assert!(ok && got == big, "curl blksize {b:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("tftp")
        .current_dir(dir.path())
        .args([
            "127.0.0.1",
            &s.port.to_string(),
            "-m",
            "binary",
            "-c",
            "get",
            "undionly.kpxe",
        ])
        .status()
        .expect("tftp-hpa is installed");
    assert!(st.success());
    assert_eq!(
        std::fs::read(dir.path().join("undionly.kpxe")).unwrap(),
        kpxe
    );
}

#[test]
fn traversal_and_writes_are_refused() {
    let s = start();
    for bad in [
        "../secret",
        "sub/../../secret",
        "escape",
        "/etc/passwd",
        "../../../../etc/passwd",
        "missing.bin",
        "sub",
    ] {
        let (ok, got) = atftp(&s, bad, &[]);
        assert!(!ok || got.is_empty(), "{bad} was served");
        assert!(
            !String::from_utf8_lossy(&got).contains("do not serve")
                && !String::from_utf8_lossy(&got).contains("root:")
        );
        let (ok, got) = curl(&s, bad, None);
        assert!(!ok && got.is_empty(), "{bad} was served to curl");
    }
    // A write request gets an ERROR packet, and nothing is written.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(b"\x00\x02new.bin\x00octet\x00", ("127.0.0.1", s.port))
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(
        &buf[..4],
        b"\x00\x05\x00\x02",
        "access violation: {:?}",
        &buf[..n]
    );
    assert!(!s.root.join("new.bin").exists());
    // Garbage is dropped, and the server keeps serving.
    sock.send_to(b"\xff\xff\x00", ("127.0.0.1", s.port))
        .unwrap();
    sock.send_to(b"\x00\x01noterminator", ("127.0.0.1", s.port))
        .unwrap();
    let (ok, _) = curl(&s, "undionly.kpxe", None);
    assert!(ok);
}

#[test]
fn a_hundred_transfers_at_once() {
    let s = start();
    let big = std::fs::read(s.root.join("sub/big.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<(Child, PathBuf)> = (0..100)
        .map(|i| {
            let out = dir.path().join(format!("o{i}"));
            let c = Command::new("curl")
                .args(["-s", "--max-time", "120", "--tftp-blksize", "1468", "-o"])
                .arg(&out)
                .arg(format!("tftp://127.0.0.1:{}/sub/big.bin", s.port))
                .spawn()
                .unwrap();
            (c, out)
        })
        .collect();
    for (mut c, out) in children {
        assert!(c.wait().unwrap().success());
        assert!(
            std::fs::read(&out).unwrap() == big,
            "{} differs",
            out.display()
        );
    }
}
