//! NBD over TLS with per-slot pre-shared keys, against clients nobody here wrote: libnbd's nbdinfo and
//! nbdcopy (`nbds://` URIs with `tls-psk-file=`), qemu-img and qemu-io (`tls-creds-psk` objects, which read
//! `keys.psk` in a directory). Data read over TLS equals the disk and writes land in it; a wrong key fails
//! the TLS handshake; slot A's key cannot open slot B even from a host that may open both in plain text;
//! `tls = "required"` refuses plain clients with NBD_REP_ERR_TLS_REQD while "optional" still serves them.
//! On a raw socket: the exact reply types of FORCEDTLS, a stalled TLS handshake closed at the handshake
//! deadline and a ClientHello of garbage dropped, both counted.
//!
//! The keys come from corral's store (where they are generated when the policy loads), as the node's
//! script renderer would read them.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const SIZE: usize = 8 << 20;

/// corral on loopback with `tls`, the slots db/0 and db/1 over an 8 MiB base, 127.0.0.1 an admin host
/// (plain text, it may open every export: so whatever a TLS key is refused is the key's doing).
fn setup(dir: &Path, http: u16, nbd: u16, tls: &str) {
    setup_with(dir, http, nbd, tls, "")
}

/// [`setup`] with more `[nbd]` keys.
fn setup_with(dir: &Path, http: u16, nbd: u16, tls: &str, nbd_keys: &str) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    if !dir.join("disks/base.img").exists() {
        let pattern: Vec<u8> = (0..SIZE as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        std::fs::write(dir.join("disks/base.img"), pattern).unwrap();
    }
    loopback_config(
        dir,
        http,
        "",
        &format!(
            "[nbd]\nlisten = \"127.0.0.1:{nbd}\"\nadmin_hosts = [\"127.0.0.1\"]\ntls = \"{tls}\"\n{nbd_keys}[iscsi]\nenabled = false\n"
        ),
    );
    // The disks directory goes into loopback_config's [server].
    let cfg = std::fs::read_to_string(dir.join("corral.toml")).unwrap();
    let cfg = cfg.replacen(
        "[server]\n",
        &format!("[server]\ndisks_dir = \"{}/disks\"\n", dir.display()),
        1,
    );
    std::fs::write(dir.join("corral.toml"), cfg).unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 2\ndefault = 0\nimages = [\"testos\"]\ndisk = \"base\"\n",
    )
    .unwrap();
}

/// The `identity:hexkey` line of a slot's key, from corral's store.
fn psk_line(dir: &Path, slot: &str) -> String {
    let store = corral::store::Store::open(&dir.join("state")).unwrap();
    let psks = store.slot_psks().unwrap();
    let (_, p) = psks
        .iter()
        .find(|(s, _)| s == slot)
        .unwrap_or_else(|| panic!("no key for {slot}: {psks:?}"));
    p.psk_line()
}

/// A directory with `keys.psk` (what qemu's tls-creds-psk reads) holding `line`; returns the file.
fn key_dir(dir: &Path, name: &str, line: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let f = d.join("keys.psk");
    std::fs::write(&f, format!("{line}\n")).unwrap();
    f
}

fn nbds(nbd: u16, export: &str, identity: &str, keys: &Path) -> String {
    format!(
        "nbds://{identity}@127.0.0.1:{nbd}/{export}?tls-psk-file={}",
        keys.display()
    )
}

fn ok(program: &str, args: &[&str]) -> String {
    let (code, out, err) = run(program, args);
    assert_eq!(code, 0, "{program} {args:?}: {out}{err}");
    out
}

fn fails(program: &str, args: &[&str]) -> String {
    let (code, out, err) = run(program, args);
    assert_ne!(code, 0, "{program} {args:?} should fail: {out}{err}");
    format!("{out}{err}")
}

/// nbdinfo that must fail, with libnbd's debug log (where the server's error message shows: nbdinfo's own
/// message names only the errno).
fn nbdinfo_debug_fails(args: &[&str]) -> String {
    let out = std::process::Command::new("nbdinfo")
        .args(args)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "nbdinfo {args:?} should fail: {err}");
    err
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

#[test]
fn nbd_tls_psk_with_real_clients() {
    if !need_tools(&["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup(dir, http, nbd, "optional");
    let _server = start(dir, http);
    wait_for("the NBD listener", 30, || {
        std::net::TcpStream::connect(("127.0.0.1", nbd)).is_ok()
    });

    let line0 = psk_line(dir, "db.0");
    let line1 = psk_line(dir, "db.1");
    let (id0, hex0) = line0.split_once(':').unwrap();
    assert_eq!(id0, "db-0");
    assert_eq!(hex0.len(), 64, "32 bytes as hex");
    assert!(hex0.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(line0, line1, "every slot has its own key");
    let keys0 = key_dir(dir, "k0", &line0);
    let keys1 = key_dir(dir, "k1", &line1);
    // The right identity with another key.
    let wrong = key_dir(dir, "kw", &format!("db-0:{}", "5a".repeat(32)));

    // nbdinfo over TLS: the export, with TLS negotiated.
    let url0 = nbds(nbd, "db/0", "db-0", &keys0);
    let info = ok("nbdinfo", &[&url0]);
    assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    assert!(log(dir).contains("tls=true"), "{}", log(dir));
    // LIST over TLS shows only the key's export (plain text, this admin host sees all).
    let list = ok("nbdinfo", &["--list", &nbds(nbd, "", "db-0", &keys0)]);
    assert!(list.contains("db/0") && !list.contains("db/1"), "{list}");
    assert!(!list.contains("base/base"), "{list}");
    let plain = ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{nbd}")]);
    assert!(plain.contains("db/0") && plain.contains("db/1"), "{plain}");

    // Data read over TLS equals the disk.
    let copy = dir.join("copy.img");
    ok("nbdcopy", &[&url0, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(dir.join("disks/base.img")).unwrap(),
        "read over TLS differs from the base"
    );
    // Writes over TLS land: nbdcopy writes the whole disk, a plain-text reader sees it.
    let fresh = dir.join("fresh.img");
    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(40503) >> 13) as u8)
        .collect();
    std::fs::write(&fresh, &data).unwrap();
    ok("nbdcopy", &[fresh.to_str().unwrap(), &url0]);
    let back = dir.join("back.img");
    ok(
        "nbdcopy",
        &[
            &format!("nbd://127.0.0.1:{nbd}/db/0"),
            back.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "writes over TLS did not land"
    );

    // qemu: tls-creds-psk reads keys.psk in its directory; writes and reads at odd offsets, then a
    // convert of the whole disk compared with what nbdcopy wrote.
    let object = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username=db-0",
        keys0.parent().unwrap().display()
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={nbd},export=db/0,tls-creds=tls0");
    let qi = ok(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    assert!(qi.contains("8 MiB"), "{qi}");
    // GnuTLS (qemu's and libnbd's) and OpenSSL agree on TLS 1.3 with the external PSK; with TLS 1.3
    // taken out of qemu's priorities, on a TLS 1.2 PSK suite.
    assert!(log(dir).contains("version=\"TLSv1.3\""), "{}", log(dir));
    assert!(!log(dir).contains("version=\"TLSv1.2\""), "{}", log(dir));
    let object12 = format!("{object},priority=NORMAL:-VERS-TLS1.3");
    let qi = ok(
        "qemu-img",
        &["info", "--object", &object12, "--image-opts", &opts],
    );
    assert!(qi.contains("8 MiB"), "{qi}");
    let l12 = log(dir);
    let l12 = l12.lines().find(|l| l.contains("version=\"TLSv1.2\""));
    assert!(l12.is_some(), "{}", log(dir));
    eprintln!("qemu without TLS 1.3: {}", l12.unwrap_or_default());
    let out = ok(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0x11 12345 777",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "read -P 0x11 12345 777",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let conv = dir.join("conv.img");
    ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            conv.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&conv).unwrap();
    assert_eq!(got.len(), SIZE);
    assert!(got[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0xab));
    assert!(got[12345..12345 + 777].iter().all(|&b| b == 0x11));
    assert_eq!(&got[..12345], &data[..12345]);
    assert_eq!(&got[2 << 20..], &data[2 << 20..]);

    // A wrong key fails the TLS handshake, for libnbd and qemu alike.
    let before = log(dir).matches("nbd tls handshake failed").count();
    fails("nbdinfo", &[&nbds(nbd, "db/0", "db-0", &wrong)]);
    let wrong_object = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username=db-0",
        wrong.parent().unwrap().display()
    );
    fails(
        "qemu-img",
        &["info", "--object", &wrong_object, "--image-opts", &opts],
    );
    assert_eq!(
        log(dir).matches("nbd tls handshake failed").count(),
        before + 2,
        "{}",
        log(dir)
    );
    // An identity corral does not know fails too.
    let stranger = key_dir(dir, "ks", &format!("db-7:{hex0}"));
    fails("nbdinfo", &[&nbds(nbd, "db/0", "db-7", &stranger)]);
    assert!(log(dir).contains("unknown PSK identity"), "{}", log(dir));

    // Slot A's key cannot open slot B (though this host may open B in plain text), nor a base; slot B's
    // key opens B.
    let msg = nbdinfo_debug_fails(&[&nbds(nbd, "db/1", "db-0", &keys0)]);
    assert!(msg.contains("this TLS key opens only db/0"), "{msg}");
    fails("nbdinfo", &[&nbds(nbd, "base/base", "db-0", &keys0)]);
    fails("nbdinfo", &[&nbds(nbd, "db/0", "db-1", &keys1)]);
    ok("nbdinfo", &[&nbds(nbd, "db/1", "db-1", &keys1)]);
    ok("nbdinfo", &[&format!("nbd://127.0.0.1:{nbd}/db/1")]);

    // "optional" still serves plain clients (the kernel's in an initramfs), tested above; the base too.
    ok("nbdinfo", &[&format!("nbd://127.0.0.1:{nbd}/base/base")]);
}

#[test]
fn nbd_tls_required_refuses_plain_and_off_offers_none() {
    if !need_tools(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup(dir, http, nbd, "required");
    let server = start(dir, http);
    wait_for("the NBD listener", 30, || {
        std::net::TcpStream::connect(("127.0.0.1", nbd)).is_ok()
    });
    let line0 = psk_line(dir, "db.0");
    let keys0 = key_dir(dir, "k0", &line0);
    // Plain text: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD, which libnbd reports.
    let msg = fails("nbdinfo", &[&format!("nbd://127.0.0.1:{nbd}/db/0")]);
    assert!(
        msg.to_lowercase().contains("tls"),
        "no word of TLS in the refusal: {msg}"
    );
    // nbdinfo's message for a refused LIST names no reason; libnbd's debug log has the server's.
    let err = nbdinfo_debug_fails(&["--list", &format!("nbd://127.0.0.1:{nbd}")]);
    assert!(err.contains("TLS is required: send STARTTLS"), "{err}");
    // Over TLS the slot opens and its data is the disk's.
    let url0 = nbds(nbd, "db/0", "db-0", &keys0);
    let info = ok("nbdinfo", &[&url0]);
    assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    let copy = dir.join("copy.img");
    ok("nbdcopy", &[&url0, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(dir.join("disks/base.img")).unwrap());
    drop(server);

    // "off": STARTTLS is unsupported, a client that insists on TLS gives up, plain text works; the keys
    // made earlier stay in the store for when TLS is turned back on.
    setup(dir, http, nbd, "off");
    let server = start(dir, http);
    wait_for("the NBD listener", 30, || {
        std::net::TcpStream::connect(("127.0.0.1", nbd)).is_ok()
    });
    fails("nbdinfo", &[&url0]);
    ok("nbdinfo", &[&format!("nbd://127.0.0.1:{nbd}/db/0")]);
    drop(server);
    // Back to "optional": the same key as before the restarts (stored, not made anew).
    setup(dir, http, nbd, "optional");
    let _server = start(dir, http);
    wait_for("the NBD listener", 30, || {
        std::net::TcpStream::connect(("127.0.0.1", nbd)).is_ok()
    });
    assert_eq!(psk_line(dir, "db.0"), line0);
    ok("nbdinfo", &[&url0]);
}

/// Sends one option (fixed newstyle header) on a raw socket.
fn send_option(s: &mut std::net::TcpStream, option: u32, data: &[u8]) {
    use std::io::Write;
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    s.write_all(&o).unwrap();
}

/// Reads one option reply: (option, reply type, data).
fn read_reply(s: &mut std::net::TcpStream) -> (u32, u32, Vec<u8>) {
    use std::io::Read;
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let be = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
    let mut d = vec![0u8; be(16) as usize];
    s.read_exact(&mut d).unwrap();
    (be(8), be(12), d)
}

/// A raw socket past the greeting (client flags: fixed newstyle, no zeroes).
fn greeted(nbd: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", nbd)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// Whether the server closed `s` (EOF or reset) rather than leaving it open.
fn closed(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn metric(http: u16, name: &str) -> u64 {
    let metrics = get(&format!("http://127.0.0.1:{http}/metrics"));
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics:\n{metrics}"))
}

#[test]
fn nbd_tls_on_the_wire_and_bad_tls_is_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup_with(dir, http, nbd, "required", "handshake_timeout = 2\n");
    let _server = start(dir, http);
    wait_for("the NBD listener", 30, || {
        std::net::TcpStream::connect(("127.0.0.1", nbd)).is_ok()
    });
    // FORCEDTLS: GO before STARTTLS gets exactly NBD_REP_ERR_TLS_REQD; STARTTLS with data is invalid
    // (and starts nothing); then STARTTLS gets ACK.
    let mut s = greeted(nbd);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"db/0");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, 7, &go);
    assert_eq!(read_reply(&mut s).1, 0x8000_0005, "NBD_REP_ERR_TLS_REQD");
    send_option(&mut s, 5, b"x");
    assert_eq!(read_reply(&mut s).1, 0x8000_0003, "NBD_REP_ERR_INVALID");
    send_option(&mut s, 5, &[]);
    assert_eq!(read_reply(&mut s), (5, 1, vec![]), "ACK");
    // Then silence where the ClientHello should be: closed at the handshake deadline, counted.
    let timeouts = metric(http, "corral_nbd_handshake_timeouts_total");
    assert!(closed(&mut s), "a stalled TLS handshake must be closed");
    wait_for("the timeout counted", 10, || {
        metric(http, "corral_nbd_handshake_timeouts_total") > timeouts
    });
    // Garbage instead of a ClientHello: the TLS handshake fails, the connection is closed, counted.
    let failed = metric(http, "corral_nbd_tls_failed_total");
    let mut s = greeted(nbd);
    send_option(&mut s, 5, &[]);
    assert_eq!(read_reply(&mut s).1, 1);
    std::io::Write::write_all(&mut s, &[0x16, 3, 1, 0, 4, 0xde, 0xad, 0xbe, 0xef]).unwrap();
    assert!(closed(&mut s));
    wait_for("the failure counted", 10, || {
        metric(http, "corral_nbd_tls_failed_total") > failed
    });
    // The server is still there for a good client.
    if need_tools(&["nbdinfo"]) {
        let keys0 = key_dir(dir, "k0", &psk_line(dir, "db.0"));
        ok("nbdinfo", &[&nbds(nbd, "db/0", "db-0", &keys0)]);
        assert!(metric(http, "corral_nbd_tls_sessions_total") >= 1);
    }
}

/// How a node gets its key: `{{nbd_psk}}` in its image's command line, rendered only into the script its
/// own address fetches; with that line alone, libnbd opens the node's slot over TLS. A request for the same
/// node from another address gets 403 and no key.
#[test]
fn a_node_gets_its_key_in_its_own_script_only() {
    if !need_tools(&["nbdinfo", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup_with(dir, http, nbd, "optional", "");
    const MAC: &str = "52:54:00:00:00:31";
    std::fs::write(
        dir.join("images/testos/image.toml"),
        "kernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\ncmdline = \"slot={{cluster}}/{{slot}} {{nbd_psk}}\"\n",
    )
    .unwrap();
    // The node at 127.0.0.1, which is no admin host here: what it opens, it opens as the slot's node.
    let mut cfg = std::fs::read_to_string(dir.join("corral.toml"))
        .unwrap()
        .replace("admin_hosts = [\"127.0.0.1\"]\n", "");
    cfg.push_str(&reservation(MAC, "127.0.0.1"));
    std::fs::write(dir.join("corral.toml"), cfg).unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        format!("[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 2\ndefault = 1\nimages = [\"testos\"]\ndisk = \"base\"\n\n[[node]]\nmac = \"{MAC}\"\n"),
    )
    .unwrap();
    let _server = start(dir, http);
    let url = format!("http://127.0.0.1:{http}/boot/{MAC}");
    let fetch = |from: &str| {
        run(
            "curl",
            &["-s", "--interface", from, "-w", "\n%{http_code}", &url],
        )
        .1
    };
    // The node's first request makes it known and assigns it; the script it gets then carries its key.
    let mut script = String::new();
    wait_for("the node's slot script", 30, || {
        script = fetch("127.0.0.1");
        script.contains("slot=db/")
    });
    let line = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("corral.nbd_psk="))
        .unwrap_or_else(|| panic!("no key in the node's own script:\n{script}"))
        .to_string();
    let slot = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("slot="))
        .unwrap()
        .to_string();
    assert_eq!(line, psk_line(dir, &slot.replace('/', ".")));
    // A stranger asking for the same node: refused, no key.
    let foreign = fetch("127.0.0.9");
    assert!(foreign.ends_with("403"), "{foreign}");
    assert!(!foreign.contains("nbd_psk"), "{foreign}");
    // The key from the script opens the node's slot over TLS (the node's own address, not an admin host).
    let (identity, _) = line.split_once(':').unwrap();
    let keys = key_dir(dir, "node", &line);
    let size = ok("nbdinfo", &["--size", &nbds(nbd, &slot, identity, &keys)]);
    assert_eq!(size.trim(), SIZE.to_string(), "{}", log(dir));
}
