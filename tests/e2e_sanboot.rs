//! Whole-disk images booted by firmware over iSCSI, with real VMs: the slot disks' base is a disk with its
//! own boot loaders (tests/testos/mkboot.sh: syslinux for BIOS, a unified kernel image at
//! \EFI\BOOT\BOOTX64.EFI for UEFI); each VM's iPXE ROM (SeaBIOS for node A, OVMF for node B) fetches its
//! script from corral, logs in to its slot's target with CHAP and mutual CHAP, and `sanboot`s it: the
//! firmware reads the boot loader and kernel through iPXE's INT13 drive (BIOS) or EFI block device (UEFI).
//! The booted test OS then finds the
//! iBFT iPXE left, logs in again with Linux's initiator (open-iscsi's iscsistart, same initiator name and
//! secrets), writes a marker to its slot's overlay and powers off. Booted again, the node sees its marker;
//! a second node in the other slot of the same cluster does not. The shared base never changes.

mod common;

use common::disk_field;
use corral::lab::{vm_mac, Firmware, Lab, Vm};
use std::path::Path;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const PREFIX: &str = "iqn.2026-11.io.corral";

struct Boot {
    target: String,
    found: String,
}

/// Boots `name` (MAC `mac`) with firmware `fw` and follows the test OS's report to its power-off.
fn boot(lab: &mut Lab, name: &str, fw: Firmware, mac: &str) -> Boot {
    let mut vm: Vm = lab.vm(name, fw, mac).unwrap();
    let t0 = Instant::now();
    let field = |vm: &Vm, lab: &Lab, key: &str| disk_field(vm, lab, key, BOOT_TIMEOUT);
    let target = field(&vm, lab, "ibft target");
    let log = vm.log();
    // corral's script sanbooted the node; the kernel came off the iSCSI disk (on BIOS, loaded by
    // syslinux, whose banner reaches the serial port).
    assert!(
        log.contains("boots image appliance from iscsi:")
            && log.contains("Booting from SAN device"),
        "no sanboot:\n{log}"
    );
    assert!(
        fw != Firmware::Bios || log.contains("SYSLINUX"),
        "no boot loader ran:\n{log}"
    );
    let initiator = {
        let (line, _) = vm.wait_for("CORRAL-DISK ibft", BOOT_TIMEOUT).unwrap();
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("initiator="))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        initiator,
        format!("{PREFIX}:node.{}", mac.replace(':', "")),
        "iPXE logged in as the node corral named"
    );
    let attached = field(&vm, lab, "attached dev");
    let found = field(&vm, lab, "found");
    if found == "none" {
        assert_eq!(field(&vm, lab, "wrote"), mac);
    }
    vm.wait_for("CORRAL-DISK detached", BOOT_TIMEOUT).unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(120)),
        "{name} did not power off"
    );
    eprintln!(
        "  {name} ({mac}): {target} as /dev/{attached}, found={found} ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    Boot { target, found }
}

#[test]
fn sanboot_whole_disk_images_over_iscsi() {
    let Some(testos) = common::testos_for_vms() else {
        return;
    };
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let disks = tmp.path().join("disks");
    common::boot_disk(&testos, &disks, "bootdisk", 64);
    let base_before = std::fs::read(disks.join("bootdisk.img")).unwrap();

    // A sanboot image has no files: its disk is the cluster's.
    let images = tmp.path().join("images");
    std::fs::create_dir_all(images.join("appliance")).unwrap();
    std::fs::write(
        images.join("appliance/image.toml"),
        "description = \"a whole-disk image with its own boot loader\"\nkind = \"sanboot\"\n",
    )
    .unwrap();
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"san\"\nmin = 0\nmax = 2\ndefault = 2\nimages = [\"appliance\"]\ndisk = \"bootdisk\"\n",
    )
    .unwrap();
    // CHAP both ways: iPXE proves the node's secret and checks corral's; the booted OS does the same with
    // what iPXE left in the iBFT.
    let creds = tmp.path().join("credentials.toml");
    std::fs::write(
        &creds,
        "[\"iscsi:san\"]\nuser = \"san-node\"\npassword = \"initiator-secret-1\"\n\n[\"iscsi-target:san\"]\nuser = \"corral\"\npassword = \"target-secret-22\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut lab = Lab::new(&tmp.path().join("lab")).unwrap();
    lab.disks_dir = Some(disks.clone());
    lab.credentials = Some(creds);
    // OVMF loads the whole unified kernel image (kernel and initramfs, 19 MB, spread over 58 MB of
    // address space) before the kernel unpacks itself: 192 MiB is too little (a page fault in firmware).
    lab.vm_memory_mib = 384;
    lab.start_corral_with(
        Path::new(env!("CARGO_BIN_EXE_corral")),
        "full",
        &images,
        &root.join("boot-scripts"),
        Some(&policy),
    )
    .unwrap();

    let (a, b) = (vm_mac(lab.id, 1), vm_mac(lab.id, 2));
    // Node A's first boot: its slot's disk is the base; no marker yet, so it writes its own.
    let a1 = boot(&mut lab, "a1", Firmware::Bios, &a);
    assert_eq!(a1.found, "none");
    assert!(
        a1.target.starts_with(&format!("{PREFIX}:san.")),
        "{}",
        a1.target
    );
    // Node B (UEFI) fills the other slot: another target, the base alone, not A's marker.
    let b1 = boot(&mut lab, "b1", Firmware::UefiIpxe, &b);
    assert_ne!(b1.target, a1.target, "two nodes, two slots, two targets");
    assert_eq!(b1.found, "none", "node B must not see node A's write");
    // A again: the same target, and the marker it wrote survived the power-off.
    let a2 = boot(&mut lab, "a2", Firmware::Bios, &a);
    assert_eq!(a2.target, a1.target);
    assert_eq!(
        a2.found, a,
        "node A reads back its own marker after the reboot"
    );
    assert!(
        std::fs::read(disks.join("bootdisk.img")).unwrap() == base_before,
        "the base image changed"
    );
    // Every boot logged in twice (iPXE, then Linux), each time with CHAP.
    let metrics = lab
        .run_in_server(
            "curl",
            &["-s", &format!("http://{}/metrics", lab.server_ip())],
        )
        .unwrap();
    let logins: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("corral_iscsi_logins_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no corral_iscsi_logins_total in:\n{metrics}"));
    assert!(
        logins >= 6.0,
        "{logins} logins for three sanboots\n{metrics}"
    );
    eprintln!("sanboot end to end: {:.0} s", t0.elapsed().as_secs_f64());
}
