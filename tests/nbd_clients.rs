//! The NBD target on loopback against clients nobody here wrote: nbdinfo (--list, --map), nbdcopy both
//! ways, qemu-img info/compare/convert on nbd://, qemu-io reads and writes at odd offsets. Reads equal what
//! was written, the base file never changes, a slot that is not the client's is refused, a read-only base
//! refuses writes, and when the policy releases the slot its open connection is closed and the export
//! refused.

mod common;

use common::*;
use std::path::Path;

const SIZE: usize = 64 << 20;

fn setup(dir: &Path, http: u16, nbd: u16, db_default: u32) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    // 48 MiB of pattern, then 16 MiB that were never written (a hole the map must show).
    let base = std::fs::File::create(dir.join("disks/base.img")).unwrap();
    base.set_len(SIZE as u64).unwrap();
    use std::os::unix::fs::FileExt;
    let pattern: Vec<u8> = (0..48 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    base.write_all_at(&pattern, 0).unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}/boot-scripts\"\npolicy = \"policy.toml\"\ndisks_dir = \"disks\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nenabled = false\n[nbd]\nlisten = \"127.0.0.1:{nbd}\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\naddress = \"127.0.0.1\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:02\"\naddress = \"127.0.0.2\"\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    policy(dir, db_default);
}

fn policy(dir: &Path, db_default: u32) {
    std::fs::write(
        dir.join("policy.toml"),
        format!("[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 2\ndefault = {db_default}\nimages = [\"testos\"]\ndisk = \"base\"\n"),
    )
    .unwrap();
}

fn sha(path: &Path) -> String {
    let (code, out, err) = run("sha256sum", &[path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    out.split_whitespace().next().unwrap().to_string()
}

fn ok(program: &str, args: &[&str]) -> String {
    let (code, out, err) = run(program, args);
    assert_eq!(code, 0, "{program} {args:?}: {out}{err}");
    out
}

#[test]
fn nbd_interop_with_real_clients() {
    if !need_tools(&["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup(dir, http, nbd, 1);
    let base_sum = sha(&dir.join("disks/base.img"));
    let server = start(dir, http);
    // The node asks for its script from 127.0.0.1: it is discovered, fills db/0, and that address may
    // open db/0 (and the base), nothing else.
    let script = get(&format!(
        "http://127.0.0.1:{http}/boot/52-54-00-00-00-01?buildarch=x86_64"
    ));
    assert!(
        script.contains(&format!("disk=nbd:127.0.0.1:{nbd}:db/0")),
        "{script}"
    );
    // Overlays exist for every slot up to max as soon as the policy loads.
    let (_, ls, _) = corral(&[
        "disk",
        "ls",
        "--config",
        dir.join("corral.toml").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        ls.contains("\"slot\":0") && ls.contains("\"slot\":1"),
        "{ls}"
    );

    let url = format!("nbd://127.0.0.1:{nbd}/db/0");
    let list = ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{nbd}")]);
    assert!(
        list.contains("db/0") && list.contains("base/base"),
        "{list}"
    );
    assert!(!list.contains("db/1"), "{list}");
    let (code, _, _) = run("nbdinfo", &[&format!("nbd://127.0.0.1:{nbd}/db/1")]);
    assert_ne!(code, 0, "db/1 belongs to no node: must be refused");
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(
        log.contains("refused: not the node assigned") && log.contains("db/1"),
        "refusal not logged: {log}"
    );
    let info = ok("nbdinfo", &[&url]);
    assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    // The map shows the base's data, then its hole.
    let map = ok("nbdinfo", &["--map", &url]);
    assert!(map.contains("data") && map.contains("hole"), "{map}");

    let qi = ok("qemu-img", &["info", "-f", "raw", &url]);
    assert!(qi.contains("64 MiB"), "{qi}");
    // Writes at aligned and unaligned offsets, inside a grain, across grains, in the hole; read back.
    let cmds = [
        "write -P 0xab 1M 64k",
        "write -P 0x11 12345 777",
        "write -P 0x22 4000 200",
        "write -P 0x33 50M 8k",
        "write -z 2M 12k",
        "read -P 0xab 1M 64k",
        "read -P 0x11 12345 777",
        "read -P 0x22 4000 200",
        "read -P 0x33 50M 8k",
        "read -P 0 2M 12k",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&url);
    let out = ok("qemu-io", &args);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Bytes around the small writes still come from the base.
    let copy = dir.join("after.img");
    ok("nbdcopy", &[&url, copy.to_str().unwrap()]);
    let got = std::fs::read(&copy).unwrap();
    let base = std::fs::read(dir.join("disks/base.img")).unwrap();
    assert_eq!(&got[..4000], &base[..4000]);
    assert_eq!(&got[4200..12345], &base[4200..12345]);
    assert!(got[4000..4200].iter().all(|&b| b == 0x22));
    assert_eq!(&got[12345 + 777..(1 << 20)], &base[12345 + 777..(1 << 20)]);

    // 50 random 4k/odd-size writes with qemu-io, then the whole disk written by nbdcopy and compared.
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "writev -P 0x44 7M 4k 512 3000",
            "-c",
            "aio_write -P 0x55 9M 128k",
            "-c",
            "aio_flush",
            "-c",
            "readv -P 0x44 7M 4k 512 3000",
            &url,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let fresh = dir.join("fresh.img");
    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(40503) >> 13) as u8)
        .collect();
    std::fs::write(&fresh, &data).unwrap();
    ok("nbdcopy", &[fresh.to_str().unwrap(), &url]);
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            fresh.to_str().unwrap(),
            &url,
        ],
    );
    let q = dir.join("out.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &url,
            q.to_str().unwrap(),
        ],
    );
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            fresh.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    // Multi-conn read of the whole disk.
    let back = dir.join("back.img");
    ok(
        "nbdcopy",
        &["--connections=4", &url, back.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "read back differs from written"
    );

    // The base: read-only and untouched.
    let base_url = format!("nbd://127.0.0.1:{nbd}/base/base");
    let (code, out, err) = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &base_url],
    );
    assert!(
        code != 0
            || out.contains("failed")
            || err.contains("failed")
            || err.contains("read-only")
            || err.contains("Read-only"),
        "write to base: {out}{err}"
    );
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            dir.join("disks/base.img").to_str().unwrap(),
            &base_url,
        ],
    );
    assert_eq!(sha(&dir.join("disks/base.img")), base_sum);

    // Released: the node leaves db/0 (default 0); its open connection is closed and the export is refused
    // from then on.
    let mut open = common::nbd::Client::connect(nbd, "db/0").unwrap();
    assert!(open.request(0, 0, 512, &[]).is_ok());
    policy(dir, 0);
    server.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("db/0 to be refused", 20, || run("nbdinfo", &[&url]).0 != 0);
    wait_for("the open connection to be closed", 10, || {
        open.request(0, 0, 512, &[]).is_err()
    });
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(
        log.contains("closing export: its node no longer holds the slot"),
        "{log}"
    );
    // Its disk stays as it was left, for whoever fills the slot next.
    let (_, ls, _) = corral(&[
        "disk",
        "ls",
        "--config",
        dir.join("corral.toml").to_str().unwrap(),
        "--json",
    ]);
    assert!(ls.contains("\"cluster\":\"db\""), "{ls}");
    drop(server);
}
