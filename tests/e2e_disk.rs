//! Slot disks with real VMs: a node assigned to a slot boots the test OS over HTTP, attaches its slot's
//! NBD export with the Linux kernel's NBD client (Debian's nbd-client in the initramfs), finds the base's
//! file, writes its own file, powers off; booted again it reads its file back; a second node in another
//! slot of the same cluster sees the base and not the first node's file. The base image never changes.

mod common;

use common::disk_field as field;
use corral::lab::{vm_mac, Firmware, Lab, Vm};
use std::path::Path;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn boot(lab: &mut Lab, name: &str, mac: &str) -> (Vm, String, String, String) {
    let mut vm = lab.vm(name, Firmware::Bios, mac).unwrap();
    let (marker, secs) = vm.wait_for("CORRAL-MARKER", BOOT_TIMEOUT).unwrap();
    let slot = marker
        .split_whitespace()
        .find_map(|w| w.strip_prefix("corral.slot="))
        .unwrap_or_default()
        .to_string();
    let field = |vm: &Vm, lab: &Lab, key: &str| field(vm, lab, key, BOOT_TIMEOUT);
    let attached = field(&vm, lab, "attached export");
    assert_eq!(attached, slot, "the node attached its own slot's export");
    let base = field(&vm, lab, "base");
    let found = field(&vm, lab, "found");
    let wrote = field(&vm, lab, "wrote");
    assert_eq!(wrote, mac);
    vm.wait_for("CORRAL-DISK detached", BOOT_TIMEOUT).unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(120)),
        "{name} did not power off"
    );
    eprintln!("  {name} ({mac}) in {slot}: base={base} found={found} ({secs:.1} s to marker)");
    (vm, slot, base, found)
}

#[test]
fn slot_disks_follow_the_slot_across_reboots() {
    let Some(src) = common::testos_for_vms() else {
        return;
    };
    let t0 = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let d = images.join("disk-os");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    std::fs::write(
        d.join("image.toml"),
        "arch = \"x86_64\"\nkernel = \"vmlinuz\"\ninitrds = [\"initrd.img\"]\ncmdline = \"console=ttyS0 panic=-1 quiet corral.slot={{cluster}}/{{slot}} corral.disk={{disk}} corral.testos.write={{mac}}\"\n",
    )
    .unwrap();
    let disks = common::base_disk(tmp.path());
    let base_before = std::fs::read(disks.join("base.img")).unwrap();
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 2\ndefault = 2\nimages = [\"disk-os\"]\ndisk = \"base\"\n",
    )
    .unwrap();
    let mut lab = Lab::new(&tmp.path().join("lab")).unwrap();
    lab.disks_dir = Some(disks.clone());
    lab.start_corral_with(
        Path::new(env!("CARGO_BIN_EXE_corral")),
        "full",
        &images,
        &root.join("boot-scripts"),
        Some(&policy),
    )
    .unwrap();

    let (a, b) = (vm_mac(lab.id, 1), vm_mac(lab.id, 2));
    // First boot of node A: its slot's disk is the base, plus nothing of its own yet.
    let (vm, slot_a, base, found) = boot(&mut lab, "a1", &a);
    drop(vm);
    assert_eq!(
        (base.as_str(), found.as_str()),
        ("corral", "none"),
        "base.txt says `corral base`"
    );
    // Node B fills the other slot and sees the base only, not A's file.
    let (vm, slot_b, base, found) = boot(&mut lab, "b1", &b);
    drop(vm);
    assert_ne!(slot_a, slot_b);
    assert_eq!((base.as_str(), found.as_str()), ("corral", "none"));
    // A again: the same slot, and the file it wrote.
    let (vm, slot_a2, _, found) = boot(&mut lab, "a2", &a);
    drop(vm);
    assert_eq!(slot_a2, slot_a);
    assert_eq!(found, a, "node A reads back its own file after the reboot");
    assert!(
        std::fs::read(disks.join("base.img")).unwrap() == base_before,
        "the base image changed"
    );
    eprintln!("disk end to end: {:.0} s", t0.elapsed().as_secs_f64());
}
