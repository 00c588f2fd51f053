//! The lab: an isolated network of namespaces with QEMU VMs netbooting from corral, for `corral lab` and
//! the end-to-end tests.
//!
//! Topology (see shared/notes/netboot-lab-facts.md): a server namespace holding corral's end of a veth pair;
//! a bridge namespace holding the other end, a bridge, and one tap per VM; optional extra hosts (a site DHCP
//! server) on their own veth into the bridge. No default route and no link into the host's namespace, so
//! nothing leaves the lab. QEMU runs under TCG (KVM fails on these machines) inside the bridge namespace,
//! because a tap is created in the namespace of the process that opens /dev/net/tun. Everything started
//! is killed by PID and the namespaces are deleted on drop.
//!
//! Long because the namespaces, taps, VMs and the corral under test are set up and torn down together.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Firmware a VM boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with the NIC's iPXE option ROM.
    Bios,
    /// OVMF with its own PXE: the NIC ROM is disabled, so EDK2 fetches iPXE over TFTP.
    UefiPxe,
    /// OVMF starting the NIC's iPXE EFI ROM.
    UefiIpxe,
}

/// The QEMU arguments for a VM (pure, so it is tested without QEMU).
#[allow(clippy::too_many_arguments)]
pub fn qemu_args(
    fw: Firmware,
    mac: &str,
    tap: &str,
    ifup: &Path,
    serial: &Path,
    vars: &Path,
    sercon: &Path,
    mem_mib: u32,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "tcg",
        "-m",
        &mem_mib.to_string(),
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("-serial".into());
    a.push(format!("file:{}", serial.display()));
    a.push("-netdev".into());
    a.push(format!(
        "tap,id=n0,ifname={tap},script={},downscript=no",
        ifup.display()
    ));
    let rom = if fw == Firmware::UefiPxe {
        ",romfile="
    } else {
        ""
    };
    a.push("-device".into());
    a.push(format!("virtio-net-pci,netdev=n0,mac={mac}{rom}"));
    match fw {
        Firmware::Bios => {
            // SeaBIOS and iPXE print to the serial port only when told which one.
            a.push("-fw_cfg".into());
            a.push(format!("name=etc/sercon-port,file={}", sercon.display()));
            a.push("-boot".into());
            a.push("n".into());
        }
        Firmware::UefiPxe | Firmware::UefiIpxe => {
            a.push("-drive".into());
            a.push("if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd".into());
            a.push("-drive".into());
            a.push(format!("if=pflash,format=raw,file={}", vars.display()));
        }
    }
    a
}

/// A running VM.
pub struct Vm {
    pub name: String,
    pub mac: String,
    pub firmware: Firmware,
    pub serial: PathBuf,
    /// The QMP socket of a VM with a power switch ([`Lab::vm_with_power`]).
    pub qmp: Option<PathBuf>,
    child: Child,
    started: Instant,
}

impl Vm {
    /// What the VM printed on its serial port so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits for a serial line containing `needle`; returns that line and the seconds it took.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<(String, f64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Ok((
                    line.trim().to_string(),
                    self.started.elapsed().as_secs_f64(),
                ));
            }
            if log.contains("KVM internal error") {
                anyhow::bail!("{}: KVM failed (use TCG)", self.name);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                anyhow::bail!(
                    "{} exited ({st}) before `{needle}`; serial log:\n{}",
                    self.name,
                    tail(&log, 3000)
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{}: no `{needle}` within {:?}; serial log:\n{}",
                    self.name,
                    timeout,
                    tail(&log, 3000)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until QEMU exits (the test OS powers off), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

/// An isolated lab network.
pub struct Lab {
    pub id: u32,
    pub server_ns: String,
    pub bridge_ns: String,
    pub server_if: String,
    /// 10.<subnet>.0.0/24; the server is .1.
    pub subnet: u8,
    pub dir: PathBuf,
    /// Base disk images for the policy's clusters (`server.disks_dir`), when the lab serves disks.
    pub disks_dir: Option<PathBuf>,
    /// The credentials file (`server.credentials`: BMC passwords, iSCSI CHAP secrets), if any.
    pub credentials: Option<PathBuf>,
    /// Memory of the VMs started from now on, MiB (192 by default: enough for the test OS over HTTP).
    pub vm_memory_mib: u32,
    /// Appended to the corral config [`Lab::start_corral_with`] writes (more sections, e.g. `[discovery]`).
    pub extra_config: String,
    /// The corral process [`Lab::start_corral_with`] started (to watch its threads, descriptors, memory).
    pub corral_pid: Option<u32>,
    hosts: Vec<String>,
    children: Vec<Child>,
    taps: u32,
}

impl Lab {
    /// Creates the namespaces, veth pair and bridge. `dir` holds logs and per-VM files.
    pub fn new(dir: &Path) -> anyhow::Result<Lab> {
        let id = (std::process::id() % 1000) * 10 + COUNTER.fetch_add(1, Ordering::Relaxed) % 10;
        let lab = Lab {
            id,
            server_ns: format!("crl-lab{id}-s"),
            bridge_ns: format!("crl-lab{id}-b"),
            server_if: format!("crl{id}s"),
            subnet: 100 + (id % 150) as u8,
            dir: dir.to_path_buf(),
            disks_dir: None,
            credentials: None,
            vm_memory_mib: 192,
            extra_config: String::new(),
            corral_pid: None,
            hosts: Vec::new(),
            children: Vec::new(),
            taps: 0,
        };
        std::fs::create_dir_all(dir)?;
        ip(&["netns", "add", &lab.server_ns])?;
        ip(&["netns", "add", &lab.bridge_ns])?;
        let b = &lab.bridge_ns;
        ip(&[
            "-n",
            b,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", b, "link", "set", "br0", "up"])?;
        ip(&["-n", b, "link", "set", "lo", "up"])?;
        let peer = format!("crl{id}b");
        ip(&[
            "link",
            "add",
            &lab.server_if,
            "netns",
            &lab.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            b,
        ])?;
        ip(&["-n", b, "link", "set", &peer, "master", "br0", "up"])?;
        let s = &lab.server_ns;
        ip(&["-n", s, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{}/24", lab.server_ip()),
            "dev",
            &lab.server_if,
        ])?;
        ip(&["-n", s, "link", "set", &lab.server_if, "up"])?;
        let ifup = lab.dir.join("ifup.sh");
        std::fs::write(&ifup, "#!/bin/sh\nip link set \"$1\" master br0 up\n")?;
        std::fs::set_permissions(&ifup, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::write(lab.dir.join("sercon"), [0xf8u8, 0x03])?;
        Ok(lab)
    }

    pub fn server_ip(&self) -> String {
        format!("10.{}.0.1", self.subnet)
    }

    /// Another host on the lab network (e.g. a site DHCP server) with address `10.<subnet>.0.<last>`;
    /// returns its namespace and interface.
    pub fn add_host(&mut self, name: &str, last: u8) -> anyhow::Result<(String, String)> {
        let ns = format!("crl-lab{}-{name}", self.id);
        let iface = format!("crl{}{}", self.id, &name[..1]);
        let peer = format!("crl{}{}p", self.id, &name[..1]);
        ip(&["netns", "add", &ns])?;
        self.hosts.push(ns.clone());
        ip(&[
            "link",
            "add",
            &iface,
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.bridge_ns,
        ])?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &peer,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.{}.0.{last}/24", self.subnet),
            "dev",
            &iface,
        ])?;
        ip(&["-n", &ns, "link", "set", &iface, "up"])?;
        Ok((ns, iface))
    }

    /// Starts a command inside namespace `ns`, output to `log` in the lab folder; killed on drop.
    pub fn spawn_in(
        &mut self,
        ns: &str,
        program: &str,
        args: &[&str],
        log: &str,
    ) -> anyhow::Result<u32> {
        let out = std::fs::File::create(self.dir.join(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Runs a command in the server namespace and returns its stdout.
    pub fn run_in_server(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.server_ns, program])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Boots a VM with the given firmware and MAC on the lab bridge.
    pub fn vm(&mut self, name: &str, fw: Firmware, mac: &str) -> anyhow::Result<Vm> {
        self.start_vm(name, fw, mac, false)
    }

    /// Boots a VM that corral can switch like a machine with a BMC: a QMP socket (`<dir>/<name>.qmp`,
    /// for power driver `qemu`), and `-no-shutdown`, so that when the guest powers off or reboots the VM
    /// stops and waits (dark) instead of exiting, until it is switched on again.
    pub fn vm_with_power(&mut self, name: &str, fw: Firmware, mac: &str) -> anyhow::Result<Vm> {
        self.start_vm(name, fw, mac, true)
    }

    fn start_vm(&mut self, name: &str, fw: Firmware, mac: &str, power: bool) -> anyhow::Result<Vm> {
        self.taps += 1;
        let tap = format!("crl{}t{}", self.id, self.taps);
        let serial = self.dir.join(format!("{name}.serial"));
        let vars = self.dir.join(format!("{name}.vars.fd"));
        if fw != Firmware::Bios {
            std::fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &vars)?;
        }
        let args = qemu_args(
            fw,
            mac,
            &tap,
            &self.dir.join("ifup.sh"),
            &serial,
            &vars,
            &self.dir.join("sercon"),
            self.vm_memory_mib,
        );
        let mut args = args;
        let qmp = power.then(|| self.dir.join(format!("{name}.qmp")));
        if let Some(q) = &qmp {
            // -no-reboot turns every reset, QMP's system_reset included, into a shutdown: a switchable
            // VM reboots like a real machine instead.
            args.retain(|a| a != "-no-reboot");
            let _ = std::fs::remove_file(q);
            args.push("-qmp".into());
            args.push(format!("unix:{},server=on,wait=off", q.display()));
            args.push("-no-shutdown".into());
        }
        let err = std::fs::File::create(self.dir.join(format!("{name}.qemu.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.bridge_ns, "qemu-system-x86_64"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(err.try_clone()?)
            .stderr(err)
            .spawn()?;
        Ok(Vm {
            name: name.to_string(),
            mac: mac.to_string(),
            firmware: fw,
            serial,
            qmp,
            child,
            started: Instant::now(),
        })
    }

    /// Writes a corral config for this lab (DHCP `mode` on the server's interface, TFTP from /usr/lib/ipxe,
    /// HTTP on port 80, router advertisements on, `testos` as the default image) and starts corral with it
    /// in the server namespace; returns when its HTTP server answers.
    pub fn start_corral(
        &mut self,
        exe: &Path,
        mode: &str,
        images: &Path,
        scripts: &Path,
    ) -> anyhow::Result<()> {
        self.start_corral_with(exe, mode, images, scripts, None)
    }

    /// Like [`Lab::start_corral`], with a cluster policy file instead of the default image.
    pub fn start_corral_with(
        &mut self,
        exe: &Path,
        mode: &str,
        images: &Path,
        scripts: &Path,
        policy: Option<&Path>,
    ) -> anyhow::Result<()> {
        let (s, n) = (self.server_ip(), self.subnet);
        let boot = match policy {
            Some(_) => "[boot]\n".to_string(),
            None => "[boot]\ndefault_image = \"testos\"\n".to_string(),
        };
        let mut policy_line = policy
            .map(|p| format!("policy = \"{}\"\n", p.display()))
            .unwrap_or_default();
        if let Some(d) = &self.disks_dir {
            policy_line.push_str(&format!("disks_dir = \"{}\"\n", d.display()));
        }
        if let Some(c) = &self.credentials {
            policy_line.push_str(&format!("credentials = \"{}\"\n", c.display()));
        }
        let cfg = self.dir.join("corral.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\ninterface = \"{iface}\"\naddress = \"{s}\"\nstate_dir = \"{state}\"\nimages_dir = \"{images}\"\nscripts_dir = \"{scripts}\"\n{policy_line}\
                 [dhcp]\nmode = \"{mode}\"\nsubnet = \"10.{n}.0.0/24\"\nrange = [\"10.{n}.0.100\", \"10.{n}.0.199\"]\nlease_time = 600\n\
                 [dhcp.router_advertisement]\nenabled = true\nprefix = \"fd00:{n}::/64\"\n\
                 [tftp]\nlisten = \"0.0.0.0:69\"\nroot = \"/usr/lib/ipxe\"\n[http]\nlisten = \"0.0.0.0:80\"\n{boot}{extra}",
                iface = self.server_if,
                state = self.dir.join("state").display(),
                images = images.display(),
                scripts = scripts.display(),
                extra = self.extra_config,
            ),
        )?;
        let ns = self.server_ns.clone();
        self.corral_pid = Some(self.spawn_in(
            &ns,
            &exe.to_string_lossy(),
            &["serve", "--config", &cfg.to_string_lossy()],
            "corral.log",
        )?);
        self.wait_http(&format!("http://{s}/healthz"), Duration::from_secs(30))
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}\n{}",
                    std::fs::read_to_string(self.dir.join("corral.log")).unwrap_or_default()
                )
            })
    }

    /// Waits until an HTTP URL answers from inside the server namespace.
    pub fn wait_http(&self, url: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.server_ns,
                    "curl",
                    "-s",
                    "-f",
                    "-o",
                    "/dev/null",
                    url,
                ])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("{url} did not answer within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.hosts.iter().chain([&self.server_ns, &self.bridge_ns]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `corral lab`: corral on an isolated lab network with `count` VMs netbooting from it (BIOS with the iPXE
/// ROM, UEFI through OVMF's own PXE, UEFI with the iPXE EFI ROM, in turn), printing what happens.
pub fn demo(
    exe: &Path,
    images: &Path,
    scripts: &Path,
    count: u32,
    mode: &str,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("corral-lab-{}", std::process::id()));
    let mut lab = Lab::new(&dir)?;
    println!(
        "lab: server namespace {} at {}, VMs on a bridge in {}; files in {}",
        lab.server_ns,
        lab.server_ip(),
        lab.bridge_ns,
        dir.display()
    );
    if mode == "proxy" {
        let (ns, iface) = lab.add_host("site", 2)?;
        let n = lab.subnet;
        let leases = dir.join("dnsmasq.leases");
        let range = format!("--dhcp-range=10.{n}.0.50,10.{n}.0.90,255.255.255.0,10m");
        let args = [
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            &format!("--interface={iface}"),
            "--bind-interfaces",
            &range,
            &format!("--dhcp-leasefile={}", leases.display()),
        ];
        lab.spawn_in(&ns, "dnsmasq", &args, "dnsmasq.log")?;
        println!(
            "lab: dnsmasq is the site DHCP server (addresses only); corral answers as ProxyDHCP"
        );
    }
    lab.start_corral(exe, mode, images, scripts)?;
    println!(
        "lab: corral serving ({mode} DHCP, TFTP, HTTP); log in {}",
        dir.join("corral.log").display()
    );
    let kinds = [Firmware::Bios, Firmware::UefiPxe, Firmware::UefiIpxe];
    let mut vms = Vec::new();
    for i in 0..count {
        let fw = kinds[i as usize % kinds.len()];
        let vm = lab.vm(&format!("vm{}", i + 1), fw, &vm_mac(lab.id, i + 1))?;
        println!(
            "lab: {} ({:?}, {}) powered on",
            vm.name, vm.firmware, vm.mac
        );
        vms.push(vm);
    }
    let mut failed = 0;
    for vm in &mut vms {
        match vm.wait_for("CORRAL-MARKER", Duration::from_secs(300)) {
            Ok((line, secs)) => println!("lab: {} booted in {secs:.1} s: {line}", vm.name),
            Err(e) => {
                failed += 1;
                println!("lab: {} did not boot: {e}", vm.name);
            }
        }
    }
    let nodes = lab.run_in_server(
        "curl",
        &["-s", &format!("http://{}/api/v1/nodes", lab.server_ip())],
    )?;
    println!("lab: inventory:\n{nodes}");
    drop(vms);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    if failed > 0 {
        anyhow::bail!("{failed} of {count} VMs did not boot");
    }
    println!("lab: all {count} VMs netbooted from corral; lab removed");
    Ok(())
}

/// A locally administered MAC for VM number `n` of lab `id`.
pub fn vm_mac(id: u32, n: u32) -> String {
    format!(
        "52:54:{:02x}:{:02x}:00:{:02x}",
        (id >> 8) & 0xff,
        id & 0xff,
        n & 0xff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_arguments_per_firmware() {
        let p = Path::new("/x");
        let bios = qemu_args(Firmware::Bios, "52:54:00:00:00:01", "t1", p, p, p, p, 128).join(" ");
        assert!(
            bios.contains("-accel tcg")
                && bios.contains("-boot n")
                && bios.contains("etc/sercon-port")
        );
        assert!(
            bios.contains("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01")
                && !bios.contains("romfile")
        );
        let pxe = qemu_args(Firmware::UefiPxe, "m", "t1", p, p, p, p, 128).join(" ");
        assert!(pxe.contains("romfile=") && pxe.contains("OVMF_CODE.fd"));
        let ipxe = qemu_args(Firmware::UefiIpxe, "m", "t1", p, p, p, p, 128).join(" ");
        assert!(!ipxe.contains("romfile=") && ipxe.contains("OVMF_CODE.fd"));
        assert_eq!(vm_mac(0x1234, 7), "52:54:12:34:00:07");
    }
}
