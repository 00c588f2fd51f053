//! The iSCSI target on loopback against initiators nobody here wrote (libiscsi's tools from
//! libiscsi-bin): discovery with iscsi-ls, INQUIRY with iscsi-inq, READ CAPACITY(16) with
//! iscsi-readcapacity16, and qemu-img (qemu-block-extra) writing and reading back through `iscsi://`; a
//! slot that is not the client's is refused at login. With secrets in the credentials file the target asks
//! for CHAP (and mutual CHAP) and a `sanboot` image's script hands iPXE the same secrets.

mod common;

use common::*;
use std::path::Path;

const SIZE: u64 = 64 << 20;

fn setup(dir: &Path, http: u16, iscsi: u16) {
    setup_with(dir, http, iscsi, "", "testos");
}

/// `server_extra` goes into `[server]`; `image` is what cluster db boots.
fn setup_with(dir: &Path, http: u16, iscsi: u16, server_extra: &str, cluster_image: &str) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    let base = std::fs::File::create(dir.join("disks/base.img")).unwrap();
    base.set_len(SIZE).unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}/boot-scripts\"\npolicy = \"policy.toml\"\ndisks_dir = \"disks\"\n{server_extra}\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nenabled = false\n[nbd]\nlisten = \"127.0.0.1:{}\"\n[iscsi]\nlisten = \"127.0.0.1:{iscsi}\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\naddress = \"127.0.0.1\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:02\"\naddress = \"127.0.0.2\"\n",
            env!("CARGO_MANIFEST_DIR"),
            free_port()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        format!("[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 2\ndefault = 1\nimages = [\"{cluster_image}\"]\ndisk = \"base\"\n"),
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
    if !need_tools(&["iscsi-inq", "iscsi-ls", "iscsi-readcapacity16", "qemu-img"]) {
        return;
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

#[test]
fn chap_secrets_from_the_credentials_file() {
    if !need_tools(&["iscsi-inq"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, iscsi) = (free_port(), free_port());
    // A sanboot image: the node boots the slot's disk itself over iSCSI.
    std::fs::create_dir_all(dir.join("images/appliance")).unwrap();
    std::fs::write(
        dir.join("images/appliance/image.toml"),
        "kind = \"sanboot\"\n",
    )
    .unwrap();
    let creds = dir.join("credentials.toml");
    std::fs::write(
        &creds,
        "[\"iscsi:db\"]\nuser = \"db-node\"\npassword = \"initiator-secret-1\"\n\n[\"iscsi-target:db\"]\nuser = \"corral\"\npassword = \"target-secret-22\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    setup_with(
        dir,
        http,
        iscsi,
        "credentials = \"credentials.toml\"",
        "appliance",
    );
    let _server = start(dir, http);
    let script = get(&format!(
        "http://127.0.0.1:{http}/boot/52-54-00-00-00-01?buildarch=x86_64"
    ));
    // iPXE gets the root path, its initiator name and both secrets.
    for line in [
        "set initiator-iqn iqn.2026-11.io.corral:node.525400000001",
        "set username:string db-node",
        "set password:string initiator-secret-1",
        "set reverse-username:string corral",
        "set reverse-password:string target-secret-22",
        &format!(
            "sanboot iscsi:127.0.0.1::{iscsi}::iqn.2026-11.io.corral:db.0 || goto corral-retry"
        ),
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "{line:?} missing from:\n{script}"
        );
    }
    // Another host asking for the same script gets a refusal without a secret in it.
    let (code, foreign, _) = run(
        "curl",
        &[
            "-s",
            "-w",
            "\n%{http_code}",
            "--interface",
            "127.0.0.9",
            &format!("http://127.0.0.1:{http}/boot/52-54-00-00-00-01?buildarch=x86_64"),
        ],
    );
    assert_eq!(code, 0);
    assert!(foreign.ends_with("403"), "{foreign}");
    assert!(
        !foreign.contains("initiator-secret-1") && !foreign.contains("target-secret-22"),
        "{foreign}"
    );
    let target = "iqn.2026-11.io.corral:db.0/0";
    let inq = |auth: &str, query: &str| {
        run(
            "iscsi-inq",
            &[
                "-i",
                "iqn.2026-11.io.corral:node.525400000001",
                &format!("iscsi://{auth}127.0.0.1:{iscsi}/{target}{query}"),
            ],
        )
    };
    // No secret, a wrong secret, a wrong user: refused.
    assert_ne!(inq("", "").0, 0, "a login without CHAP must be refused");
    assert_ne!(
        inq("db-node%wrong-secret-1@", "").0,
        0,
        "a wrong secret must be refused"
    );
    assert_ne!(
        inq("other%initiator-secret-1@", "").0,
        0,
        "a wrong user must be refused"
    );
    // The right secret: in.
    let (code, out, err) = inq("db-node%initiator-secret-1@", "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("CORRAL"), "{out}");
    // Mutual CHAP: the initiator checks the target's answer too; a wrong expected target secret fails.
    let (code, out, err) = inq(
        "db-node%initiator-secret-1@",
        "?target_user=corral&target_password=target-secret-22",
    );
    assert_eq!(code, 0, "mutual CHAP: {out}{err}");
    assert_ne!(
        inq(
            "db-node%initiator-secret-1@",
            "?target_user=corral&target_password=not-the-secret-1"
        )
        .0,
        0,
        "the initiator must reject a target that does not know the target secret"
    );
}

/// A sanboot cluster without secrets in the credentials file: corral generates CHAP and mutual-CHAP
/// secrets per slot (stored, the same after a restart), hands them only to the slot's node in its script,
/// and the target demands them.
#[test]
fn generated_chap_secrets_guard_a_sanboot_slot() {
    if !need_tools(&["iscsi-inq"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, iscsi) = (free_port(), free_port());
    std::fs::create_dir_all(dir.join("images/appliance")).unwrap();
    std::fs::write(
        dir.join("images/appliance/image.toml"),
        "kind = \"sanboot\"\n",
    )
    .unwrap();
    setup_with(dir, http, iscsi, "", "appliance");
    let url = format!("http://127.0.0.1:{http}/boot/52-54-00-00-00-01?buildarch=x86_64");
    let setting = |script: &str, name: &str| {
        script
            .lines()
            .find_map(|l| l.strip_prefix(&format!("set {name}:string ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{script}"))
            .to_string()
    };
    let (user, secret, target_secret) = {
        let _server = start(dir, http);
        let script = get(&url);
        let s = (
            setting(&script, "username"),
            setting(&script, "password"),
            setting(&script, "reverse-password"),
        );
        assert!(s.1.len() >= 12 && s.2.len() >= 12 && s.1 != s.2, "{s:?}");
        // Fetched again within the boot: the same secrets.
        assert_eq!(setting(&get(&url), "password"), s.1);
        s
    };
    // After a restart the slot keeps its secrets.
    let _server = start(dir, http);
    assert_eq!(setting(&get(&url), "password"), secret);
    let inq = |auth: &str| {
        run(
            "iscsi-inq",
            &[
                "-i",
                "iqn.2026-11.io.corral:node.525400000001",
                &format!("iscsi://{auth}127.0.0.1:{iscsi}/iqn.2026-11.io.corral:db.0/0?target_user=corral&target_password={target_secret}"),
            ],
        )
        .0
    };
    assert_ne!(inq(""), 0, "no CHAP: refused");
    assert_ne!(inq(&format!("{user}%wrong-secret-000@")), 0);
    assert_eq!(
        inq(&format!("{user}%{secret}@")),
        0,
        "the generated secret works"
    );
}
