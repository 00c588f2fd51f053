//! The iSCSI target on loopback against initiators nobody here wrote (libiscsi's tools from
//! libiscsi-bin): discovery with iscsi-ls, INQUIRY with iscsi-inq, READ CAPACITY(16) with
//! iscsi-readcapacity16, and qemu-img (qemu-block-extra) writing and reading back through `iscsi://`; a
//! slot that is not the client's is refused at login.

mod common;

use common::*;
use std::path::Path;

const SIZE: u64 = 64 << 20;

fn setup(dir: &Path, http: u16, iscsi: u16) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    let base = std::fs::File::create(dir.join("disks/base.img")).unwrap();
    base.set_len(SIZE).unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}/boot-scripts\"\npolicy = \"policy.toml\"\ndisks_dir = \"disks\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nenabled = false\n[nbd]\nlisten = \"127.0.0.1:{}\"\n[iscsi]\nlisten = \"127.0.0.1:{iscsi}\"\n",
            env!("CARGO_MANIFEST_DIR"),
            free_port()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 2\ndefault = 1\nimages = [\"testos\"]\ndisk = \"base\"\n",
    )
    .unwrap();
}

fn ok(program: &str, args: &[&str]) -> String {
    let (code, out, err) = run(program, args);
    assert_eq!(code, 0, "{program} {args:?}: {out}{err}");
    out
}

#[test]
fn iscsi_interop_with_libiscsi_tools() {
    if run(
        "sh",
        &["-c", "command -v iscsi-inq iscsi-ls iscsi-readcapacity16"],
    )
    .0 != 0
    {
        panic!("iscsi-inq, iscsi-ls, iscsi-readcapacity16 (libiscsi-bin) are needed: tests/deps.sh installs them");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, iscsi) = (free_port(), free_port());
    setup(dir, http, iscsi);
    let _server = start(dir, http);
    // The node at 127.0.0.1 asks for its script: it fills db/0 and may log in to that target only.
    get(&format!(
        "http://127.0.0.1:{http}/boot/52-54-00-00-00-01?buildarch=x86_64"
    ));
    let portal = format!("iscsi://127.0.0.1:{iscsi}");
    let ls = ok("iscsi-ls", &["-i", "iqn.2026-11.test:node1", &portal]);
    assert!(ls.contains("iqn.2026-11.io.corral:db.0"), "{ls}");
    assert!(!ls.contains("db.1"), "{ls}");
    let lun = format!("{portal}/iqn.2026-11.io.corral:db.0/0");
    let inq = ok("iscsi-inq", &["-i", "iqn.2026-11.test:node1", &lun]);
    assert!(inq.contains("CORRAL"), "{inq}");
    let cap = ok(
        "iscsi-readcapacity16",
        &["-i", "iqn.2026-11.test:node1", &lun],
    );
    eprintln!("{ls}{inq}{cap}");
    assert!(
        cap.contains(&format!("{}", SIZE / 512 - 1)) || cap.contains(&format!("{SIZE}")),
        "{cap}"
    );
    // qemu's iSCSI block driver (libiscsi inside QEMU): 8 MiB written at 1 MiB, read back identical.
    let pattern = dir.join("pattern.img");
    std::fs::write(
        &pattern,
        (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let qi = ok("qemu-img", &["info", &lun]);
    assert!(qi.contains("64 MiB"), "{qi}");
    let json = |offset: u64| {
        format!(
            "json:{{\"driver\":\"raw\",\"offset\":{offset},\"size\":8388608,\"file\":{{\"driver\":\"iscsi\",\"transport\":\"tcp\",\"portal\":\"127.0.0.1:{iscsi}\",\"target\":\"iqn.2026-11.io.corral:db.0\",\"lun\":0,\"initiator-name\":\"iqn.2026-11.test:node1\"}}}}"
        )
    };
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            pattern.to_str().unwrap(),
            &json(1 << 20),
        ],
    );
    let cmp = ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            pattern.to_str().unwrap(),
            &json(1 << 20),
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    let (code, _, _) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            pattern.to_str().unwrap(),
            &json(0),
        ],
    );
    assert_ne!(code, 0, "a different offset differs");
    // db/1 is nobody's: its login is refused.
    let (code, out, err) = run(
        "iscsi-inq",
        &[
            "-i",
            "iqn.2026-11.test:node1",
            &format!("{portal}/iqn.2026-11.io.corral:db.1/0"),
        ],
    );
    assert_ne!(code, 0, "db.1 must be refused: {out}");
    let _ = err;
}
