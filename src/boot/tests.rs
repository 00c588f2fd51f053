use super::*;

fn repo_templates() -> Templates {
    Templates::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts")).unwrap()
}

#[test]
fn render_fills_known_and_keeps_ipxe_settings() {
    let t = Template::compile("a {{x}} ${mac} {{ y }}", &["x", "y"]).unwrap();
    let out = t.render(&[("x", "1"), ("y", "2")]);
    assert_eq!(out, "a 1 ${mac} 2");
}

#[test]
fn placeholders_are_checked() {
    assert!(Template::compile("{{base_url}}/x", ENTRY_VARS).is_ok());
    let e = Template::compile("{{base_ulr}}", ENTRY_VARS).unwrap_err();
    assert!(e.contains("did you mean `{{base_url}}`"), "{e}");
    assert!(Template::compile("{{base_url", ENTRY_VARS).is_err());
}

#[test]
fn repository_templates_load() {
    let t = repo_templates();
    assert!(t.entry.source().contains("/boot/${netX/mac:hexhyp}"));
}

#[test]
fn node_script_names_initrds_and_renders_cmdline() {
    let t = repo_templates();
    let image = Image::new(
        "testos".into(),
        PathBuf::from("/nonexistent"),
        ImageSpec {
            description: String::new(),
            arch: "x86_64".into(),
            kind: ImageKind::Kernel,
            kernel: "vmlinuz".into(),
            initrds: vec!["boot/initrd.img".into()],
            cmdline: "console=ttyS0 node={{mac}} img={{image}}".into(),
            secret: false,
        },
    )
    .unwrap();
    let v = NodeVars {
        nbd_psk: "",
        base_url: "http://10.0.0.1",
        server: "10.0.0.1",
        mac: "52:54:00:00:00:01",
        hostname: "n1",
        cluster: "",
        slot: "",
        address: "",
        disk: "",
        disk_export: "",
        agent: "",
    };
    let s = node_script(&t, &image, &v);
    assert!(s.starts_with("#!ipxe"));
    assert!(
        s.contains("kernel http://10.0.0.1/images/testos/vmlinuz console=ttyS0 node=52:54:00:00:00:01 img=testos initrd=initrd.img || goto corral-retry"),
        "{s}"
    );
    assert!(s.contains("initrd --name initrd.img http://10.0.0.1/images/testos/boot/initrd.img || goto corral-retry"), "{s}");
    assert!(!s.contains("{{"), "{s}");
}

#[test]
fn catalog_rejects_paths_outside_the_image() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bad")).unwrap();
    std::fs::write(
        dir.path().join("bad/image.toml"),
        "kernel = \"../../etc/shadow\"\n",
    )
    .unwrap();
    let e = Catalog::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("image.toml:1:10"), "{e}");
    std::fs::create_dir(dir.path().join("good")).unwrap();
    std::fs::write(
        dir.path().join("good/image.toml"),
        "kernel = \"vmlinuz\"\ncmdline = \"x={{mac}}\"\n",
    )
    .unwrap();
    std::fs::remove_dir_all(dir.path().join("bad")).unwrap();
    let c = Catalog::load(dir.path()).unwrap();
    assert_eq!(
        c.get("good").unwrap().missing_files(),
        vec!["vmlinuz".to_string()]
    );
}

#[test]
fn sanboot_script_logs_in_as_the_node() {
    let t = repo_templates();
    let image = Image::new(
        "appliance".into(),
        PathBuf::from("/nonexistent"),
        ImageSpec {
            description: String::new(),
            arch: "any".into(),
            kind: ImageKind::Sanboot,
            kernel: String::new(),
            initrds: vec![],
            cmdline: String::new(),
            secret: false,
        },
    )
    .unwrap();
    assert!(image.missing_files().is_empty());
    let v = NodeVars {
        nbd_psk: "",
        base_url: "http://10.0.0.1",
        server: "10.0.0.1",
        mac: "52:54:00:00:00:01",
        hostname: "db-0",
        cluster: "db",
        slot: "0",
        address: "",
        disk: "",
        disk_export: "",
        agent: "",
    };
    let root = "iscsi:10.0.0.1::3260::iqn.2026-11.io.corral:db.0";
    let mut san = SanVars {
        root_path: root,
        initiator_iqn: "iqn.2026-11.io.corral:node.525400000001",
        chap: None,
    };
    let s = sanboot_script(&t, &image, &v, &san);
    assert!(s.starts_with("#!ipxe"), "{s}");
    assert!(
        s.contains("set initiator-iqn iqn.2026-11.io.corral:node.525400000001\n"),
        "{s}"
    );
    assert!(
        s.contains(&format!("sanboot {root} || goto corral-retry")),
        "{s}"
    );
    assert!(!s.contains("username") && !s.contains("{{"), "{s}");
    // With CHAP (and mutual CHAP) the secrets go into iPXE's settings, one line each; a secret cannot
    // break out of its line or expand an iPXE setting.
    let chap = crate::iscsi::login::Chap {
        user: "db-0".into(),
        secret: "s3cret-123456\nreboot".into(),
        mutual: Some(("corral".into(), "${other}-secret-1".into())),
    };
    san.chap = Some(&chap);
    let s = sanboot_script(&t, &image, &v, &san);
    assert!(s.contains("set username:string db-0\n"), "{s}");
    assert!(
        s.contains("set password:string s3cret-123456 reboot\n"),
        "{s}"
    );
    assert!(s.contains("set reverse-username:string corral\n"), "{s}");
    assert!(
        s.contains("set reverse-password:string $ {other}-secret-1\n"),
        "{s}"
    );
    assert!(!s.lines().any(|l| l.trim() == "reboot"), "{s}");
}

#[test]
fn image_kinds_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        std::fs::write(dir.path().join(name).join("image.toml"), text).unwrap();
    };
    write("nokernel", "description = \"x\"\n");
    let e = Catalog::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("nokernel/image.toml") && e.contains("needs `kernel`"),
        "{e}"
    );
    std::fs::remove_dir_all(dir.path().join("nokernel")).unwrap();
    write("san", "kind = \"sanboot\"\ncmdline = \"quiet\"\n");
    let e = Catalog::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("san/image.toml:2:11") && e.contains("ignored"),
        "{e}"
    );
    write("san", "kind = \"sanboot\"\n");
    let c = Catalog::load(dir.path()).unwrap();
    assert_eq!(c.get("san").unwrap().spec.kind, ImageKind::Sanboot);
    write("bad", "kind = \"floppy\"\n");
    let e = Catalog::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("bad/image.toml:1:8"), "{e}");
}

#[test]
fn arch_matching() {
    let mut spec = ImageSpec {
        description: String::new(),
        arch: "x86_64".into(),
        kind: ImageKind::Kernel,
        kernel: "k".into(),
        initrds: vec![],
        cmdline: String::new(),
        secret: false,
    };
    let img = |s: &ImageSpec| Image::new("i".into(), PathBuf::new(), s.clone()).unwrap();
    assert!(img(&spec).runs_on(Some("x86_64")));
    assert!(img(&spec).runs_on(Some("i386")));
    assert!(!img(&spec).runs_on(Some("arm64")));
    spec.arch = "any".into();
    assert!(img(&spec).runs_on(Some("arm64")));
}
