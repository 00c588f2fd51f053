//! End to end with real firmware: QEMU VMs with no disk, on a bridge in namespaces this test creates,
//! netboot from corral to a marker line the test OS prints on the serial console. The marker shows the VM's
//! MAC (read by the booted kernel from its NIC) and the kernel command line rendered from its image; both
//! are checked. Scenarios: BIOS (SeaBIOS + iPXE ROM), UEFI (OVMF's own PXE → TFTP snponly.efi → iPXE →
//! HTTP), ProxyDHCP beside dnsmasq as the site DHCP server (BIOS and UEFI), and 8 VMs at once.
//!
//! VMs run under TCG (KVM fails on these machines), which is slow: timeouts are generous; nothing here
//! asserts a duration. The scenarios run one after another so that at most 8 VMs share the two cores.

mod common;

use corral::lab::{vm_mac, Firmware, Lab, Vm};
use std::path::Path;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn images_dir() -> std::path::PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("images");
    assert!(
        d.join("testos/vmlinuz").exists() && d.join("testos/initrd.img").exists(),
        "build the test OS first: tests/testos/build.sh images/testos"
    );
    d
}

/// Starts corral in the lab's server namespace.
fn corral(lab: &mut Lab, mode: &str) {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-scripts");
    lab.start_corral(
        Path::new(env!("CARGO_BIN_EXE_corral")),
        mode,
        &images_dir(),
        &scripts,
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits for a VM's marker and checks it: its own MAC, and the image's command line rendered for it.
fn check_marker(lab: &Lab, vm: &mut Vm) -> f64 {
    let (line, secs) = vm
        .wait_for("CORRAL-MARKER", BOOT_TIMEOUT)
        .unwrap_or_else(|e| {
            panic!(
                "{e}\ncorral log:\n{}",
                std::fs::read_to_string(lab.dir.join("corral.log")).unwrap_or_default()
            )
        });
    assert!(
        line.contains(&format!("mac={}", vm.mac)),
        "{}: wrong MAC in {line}",
        vm.name
    );
    assert!(
        line.contains(&format!("corral.image=testos corral.node={}", vm.mac)),
        "{}: cmdline not rendered for this node: {line}",
        vm.name
    );
    assert!(line.contains("console=ttyS0 panic=-1"), "{line}");
    eprintln!(
        "  {} ({:?}) reached its marker after {secs:.1} s",
        vm.name, vm.firmware
    );
    secs
}

#[test]
fn vms_netboot_from_corral() {
    if !common::need_root("namespaces and taps") {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // CORRAL_E2E_KEEP=1 keeps serial logs and configs for a look after a failure.
    let (_guard, root) = if std::env::var_os("CORRAL_E2E_KEEP").is_some() {
        let p = tmp.keep();
        eprintln!("keeping lab files in {}", p.display());
        (None, p)
    } else {
        let p = tmp.path().to_path_buf();
        (Some(tmp), p)
    };

    // (a) BIOS and (b) UEFI with its own PXE, full mode.
    {
        let mut lab = Lab::new(&root.join("full")).unwrap();
        corral(&mut lab, "full");
        let mut bios = lab.vm("bios", Firmware::Bios, &vm_mac(lab.id, 1)).unwrap();
        let mut uefi = lab
            .vm("uefi-pxe", Firmware::UefiPxe, &vm_mac(lab.id, 2))
            .unwrap();
        check_marker(&lab, &mut bios);
        check_marker(&lab, &mut uefi);
        // The UEFI VM really went through firmware PXE and TFTP.
        let metrics = lab
            .run_in_server(
                "curl",
                &["-s", &format!("http://{}/metrics", lab.server_ip())],
            )
            .unwrap();
        assert!(
            !metrics.contains("corral_tftp_transfers_completed_total 0"),
            "no TFTP transfer: {metrics}"
        );
        // Both nodes are in the inventory with iPXE's facts.
        let nodes = lab
            .run_in_server(
                "curl",
                &["-s", &format!("http://{}/api/v1/nodes", lab.server_ip())],
            )
            .unwrap();
        assert!(
            nodes.contains(&bios.mac) && nodes.contains(&uefi.mac),
            "{nodes}"
        );
        assert!(
            nodes.contains("\"platform\": \"efi\"") && nodes.contains("\"platform\": \"pcbios\""),
            "{nodes}"
        );
        eprintln!("full mode: {:.0} s", t0.elapsed().as_secs_f64());
    }

    // (c) ProxyDHCP beside dnsmasq, which hands out addresses only.
    {
        let t = Instant::now();
        let mut lab = Lab::new(&root.join("proxy")).unwrap();
        let (site_ns, site_if) = lab.add_host("site", 2).unwrap();
        let n = lab.subnet;
        let leases = lab.dir.join("dnsmasq.leases");
        lab.spawn_in(
            &site_ns,
            "dnsmasq",
            &[
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                &format!("--interface={site_if}"),
                "--bind-interfaces",
                &format!("--dhcp-range=10.{n}.0.50,10.{n}.0.90,255.255.255.0,10m"),
                &format!("--dhcp-leasefile={}", leases.display()),
                "--log-dhcp",
            ],
            "dnsmasq.log",
        )
        .unwrap();
        corral(&mut lab, "proxy");
        let mut bios = lab
            .vm("proxy-bios", Firmware::Bios, &vm_mac(lab.id, 1))
            .unwrap();
        let mut uefi = lab
            .vm("proxy-uefi", Firmware::UefiPxe, &vm_mac(lab.id, 2))
            .unwrap();
        check_marker(&lab, &mut bios);
        check_marker(&lab, &mut uefi);
        // The addresses came from dnsmasq, not corral.
        let l = std::fs::read_to_string(&leases).unwrap_or_default();
        assert!(
            l.contains(&bios.mac) && l.contains(&uefi.mac),
            "dnsmasq leases: {l}"
        );
        // corral stored no lease: in proxy mode it never hands out an address.
        let nodes = lab
            .run_in_server(
                "curl",
                &["-s", &format!("http://{}/metrics", lab.server_ip())],
            )
            .unwrap();
        assert!(
            nodes.contains("corral_dhcp_offers_total")
                && !nodes.contains("corral_dhcp_offers_total 0"),
            "no ProxyDHCP offer sent"
        );
        eprintln!("proxy mode: {:.0} s", t.elapsed().as_secs_f64());
    }

    // (d) 8 VMs at once, mixed firmware.
    {
        let t = Instant::now();
        let mut lab = Lab::new(&root.join("eight")).unwrap();
        corral(&mut lab, "full");
        let mut vms: Vec<Vm> = (1..=8)
            .map(|i| {
                let fw = if i % 2 == 0 {
                    Firmware::UefiIpxe
                } else {
                    Firmware::Bios
                };
                lab.vm(&format!("vm{i}"), fw, &vm_mac(lab.id, i)).unwrap()
            })
            .collect();
        for vm in &mut vms {
            check_marker(&lab, vm);
        }
        let leases = lab
            .run_in_server(
                "curl",
                &["-s", &format!("http://{}/api/v1/nodes", lab.server_ip())],
            )
            .unwrap();
        for vm in &vms {
            assert!(leases.contains(&vm.mac), "{} not in the inventory", vm.mac);
        }
        eprintln!("8 VMs at once: {:.0} s", t.elapsed().as_secs_f64());
    }
    eprintln!("all scenarios: {:.0} s", t0.elapsed().as_secs_f64());
}
