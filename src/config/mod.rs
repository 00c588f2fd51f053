//! `corral.toml`: the server's own configuration (interfaces, ports, paths, DHCP mode, where state lives).
//!
//! Every room reads its section at start. Parsing goes through [`diag`] so that an operator sees *every*
//! problem in the file at once, each as `file:line:column: message`, with the nearest valid key suggested
//! for a misspelt one; a config that fails validation is never half-applied.

pub mod diag;

use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Diagnostics};

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub dhcp: DhcpConfig,
    pub tftp: TftpConfig,
    pub http: HttpConfig,
    pub nbd: NbdConfig,
    pub iscsi: IscsiConfig,
    pub boot: BootConfig,
    /// Where the config was read from, for error messages and relative paths.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Where corral serves and keeps its files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The boot network interface. DHCP and router advertisements are bound to it and to nothing else.
    pub interface: Option<String>,
    /// corral's IPv4 address on the boot network: next-server, and the host in every URL it hands out.
    pub address: Ipv4Addr,
    /// Embedded database and runtime files.
    pub state_dir: PathBuf,
    /// Image catalog: one folder per image, each with an `image.toml`.
    pub images_dir: PathBuf,
    /// iPXE script templates (`entry.ipxe`, `node.ipxe`, `parked.ipxe`, `error.ipxe`).
    pub scripts_dir: PathBuf,
    /// Cluster policy (`policy.toml`). When set, nodes boot what their cluster slot says and `[boot]`
    /// mappings are not used.
    pub policy: Option<PathBuf>,
    /// Base disk images, read-only: a cluster's `disk = "name"` is `<disks_dir>/<name>.img` (raw).
    pub disks_dir: PathBuf,
    /// BMC credentials for the policy's `[[node]] power` settings (TOML, mode 600: readable by corral
    /// only). Secrets never appear in logs, events or the API.
    pub credentials: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            interface: None,
            address: Ipv4Addr::LOCALHOST,
            state_dir: PathBuf::from("/var/lib/corral"),
            images_dir: PathBuf::from("/var/lib/corral/images"),
            scripts_dir: PathBuf::from("/usr/share/corral/boot-scripts"),
            policy: None,
            disks_dir: PathBuf::from("/var/lib/corral/disks"),
            credentials: None,
        }
    }
}

/// How corral takes part in DHCP on the boot network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Authoritative server for the subnet: hands out addresses and boot information.
    Full,
    /// ProxyDHCP beside the site's own DHCP server: boot information to PXE clients only, never an address.
    Proxy,
    /// No DHCP at all (another server points the nodes at corral).
    #[default]
    Off,
}

/// A fixed address (and name) for one MAC.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    pub mac: String,
    pub address: Ipv4Addr,
    pub hostname: Option<String>,
}

/// IPv6 router advertisements on the boot network: prefix only, never a default route. Without any RA
/// iPXE waits ~16 s for IPv6 autoconfiguration on every boot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterAdvertConfig {
    pub enabled: bool,
    /// An on-link /64, e.g. `fd00:77::/64`.
    pub prefix: String,
    /// Seconds between unsolicited advertisements.
    pub interval: u64,
}

impl Default for RouterAdvertConfig {
    fn default() -> Self {
        RouterAdvertConfig {
            enabled: false,
            prefix: "fd00:c0:ra1::/64".into(),
            interval: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    /// Server port (67); changeable only for tests on loopback.
    pub port: u16,
    /// PXE boot-server port (4011) where firmware asks ProxyDHCP for boot information.
    pub proxy_port: u16,
    /// The subnet served, CIDR (`10.77.0.0/24`). Required in full mode.
    pub subnet: Option<String>,
    /// First and last address of the dynamic pool, inclusive. Required in full mode.
    pub range: Option<[Ipv4Addr; 2]>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Lease time in seconds.
    pub lease_time: u32,
    /// Seconds an offered address is held for its client while the REQUEST is on its way.
    pub offer_hold: u32,
    /// Send iPXE option 175.176 (no-pxedhcp) so it does not wait ~3 s for ProxyDHCP offers. Turn off
    /// when a separate ProxyDHCP server must answer on this network.
    pub no_pxedhcp: bool,
    pub reservation: Vec<Reservation>,
    pub router_advertisement: RouterAdvertConfig,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            mode: DhcpMode::Off,
            port: 67,
            proxy_port: 4011,
            subnet: None,
            range: None,
            router: None,
            dns: Vec::new(),
            domain: None,
            lease_time: 3600,
            offer_hold: 30,
            no_pxedhcp: true,
            reservation: Vec::new(),
            router_advertisement: RouterAdvertConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    pub enabled: bool,
    /// Listen address. With an unspecified IP every transfer still answers from the address the client
    /// contacted.
    pub listen: SocketAddr,
    /// Files served read-only; nothing outside it is reachable.
    pub root: PathBuf,
    /// Upper bound for the blksize option (RFC 2348).
    pub max_blksize: u16,
    /// Upper bound for the windowsize option (RFC 7440).
    pub max_windowsize: u16,
    /// Retransmission timeout in seconds when the client does not ask for one (RFC 2349).
    pub timeout: u8,
    /// Retransmissions before a transfer is abandoned.
    pub retries: u8,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            enabled: true,
            listen: "0.0.0.0:69".parse().unwrap(),
            root: PathBuf::from("/usr/lib/ipxe"),
            max_blksize: 65464,
            max_windowsize: 64,
            timeout: 1,
            retries: 5,
        }
    }
}

/// The NBD target serving each slot's disk and the read-only bases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Hosts that may open every export (operators' backup or inspection hosts). Nodes need no entry:
    /// a node may open its own slot's export and the base of its cluster.
    pub admin_hosts: Vec<std::net::IpAddr>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            enabled: true,
            listen: "0.0.0.0:10809".parse().unwrap(),
            admin_hosts: Vec::new(),
        }
    }
}

/// The iSCSI target serving each slot's disk to firmware (iPXE `sanboot`) and initiators.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Target names are `<iqn_prefix>:<cluster>.<slot>`.
    pub iqn_prefix: String,
}

impl IscsiConfig {
    /// The target name of a slot's disk.
    pub fn target_iqn(&self, cluster: &str, slot: &str) -> String {
        format!("{}:{cluster}.{slot}", self.iqn_prefix)
    }

    /// The initiator name corral gives a node that sanboots (iPXE logs in with it, and leaves it in the
    /// iBFT for the booted OS): stable per node, so a target's log names the machine.
    pub fn initiator_iqn(&self, mac: &crate::mac::Mac) -> String {
        format!(
            "{}:node.{}",
            self.iqn_prefix,
            mac.to_string().replace(':', "")
        )
    }
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            enabled: true,
            listen: "0.0.0.0:3260".parse().unwrap(),
            iqn_prefix: "iqn.2026-11.io.corral".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// The base URL nodes use to reach this server; defaults to `http://<server.address>:<port>`.
    pub public_url: Option<String>,
    /// Bearer token that write endpoints (`POST /api/v1/metrics`) require; unset, writes are refused.
    pub api_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "0.0.0.0:80".parse().unwrap(),
            public_url: None,
            api_token: None,
        }
    }
}

/// A node pinned to an image until the policy engine decides assignments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeImage {
    pub mac: String,
    pub image: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// First stage for legacy BIOS PXE (arch 0).
    pub bios: String,
    /// First stage for x86-64 UEFI PXE (arch 7 and 9).
    pub efi_x64: String,
    /// First stage for 32-bit UEFI (arch 6).
    pub efi_ia32: String,
    /// First stage for ARM64 UEFI (arch 11).
    pub efi_arm64: String,
    /// Image for nodes that have no mapping; none means such nodes are parked.
    pub default_image: Option<String>,
    /// Seconds a parked node waits before asking again.
    pub park_poll: u32,
    /// Per-node images.
    pub node: Vec<NodeImage>,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            bios: "undionly.kpxe".into(),
            efi_x64: "snponly.efi".into(),
            efi_ia32: "ipxe-ia32.efi".into(),
            efi_arm64: "ipxe-arm64.efi".into(),
            default_image: None,
            park_poll: 5,
            node: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and validates a config file; every problem is reported.
    pub fn load(path: &Path) -> Result<Config, Diagnostics> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Diagnostics::single(path, format!("cannot read config: {e}")))?;
        Config::parse(&text, path)
    }

    /// Parses config text (`path` names it in diagnostics and anchors relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, Diagnostics> {
        let (cfg, mut found) = diag::parse_toml_lenient::<Config>(text, path);
        let Some(mut cfg) = cfg else {
            return Err(Diagnostics(found));
        };
        cfg.source = Some(path.to_path_buf());
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [cfg.server.policy.as_mut(), cfg.server.credentials.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for p in [
            &mut cfg.server.state_dir,
            &mut cfg.server.images_dir,
            &mut cfg.server.scripts_dir,
            &mut cfg.server.disks_dir,
            &mut cfg.tftp.root,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        found.extend(Diagnostics::from_paths(text, path, cfg.validate()).0);
        if found.is_empty() {
            Ok(cfg)
        } else {
            found.sort_by_key(|d| (d.line, d.column));
            Err(Diagnostics(found))
        }
    }

    /// Semantic checks; each error names the key path it is about.
    fn validate(&self) -> Vec<(Vec<String>, String)> {
        let mut errs = Vec::new();
        let mut err = |path: &[&str], msg: String| {
            errs.push((path.iter().map(|s| s.to_string()).collect(), msg))
        };
        let d = &self.dhcp;
        if d.mode != DhcpMode::Off && self.server.interface.is_none() {
            err(
                &["dhcp", "mode"],
                "DHCP needs server.interface: corral never serves DHCP on every interface".into(),
            );
        }
        if d.mode == DhcpMode::Full {
            match d.subnet.as_deref().map(parse_cidr) {
                None => err(&["dhcp", "mode"], "full mode needs dhcp.subnet".into()),
                Some(Err(e)) => err(&["dhcp", "subnet"], e),
                Some(Ok((net, prefix))) => {
                    let inside = |a: Ipv4Addr| in_subnet(a, net, prefix);
                    match d.range {
                        None => err(&["dhcp", "mode"], "full mode needs dhcp.range".into()),
                        Some([a, b]) => {
                            if u32::from(a) > u32::from(b) {
                                err(
                                    &["dhcp", "range"],
                                    format!("range start {a} is after its end {b}"),
                                );
                            }
                            if !inside(a) || !inside(b) {
                                err(
                                    &["dhcp", "range"],
                                    format!("range {a}-{b} is not inside subnet {net}/{prefix}"),
                                );
                            }
                        }
                    }
                    if let Some(r) = d.router {
                        if !inside(r) {
                            err(
                                &["dhcp", "router"],
                                format!("router {r} is not inside subnet {net}/{prefix}"),
                            );
                        }
                    }
                    for (i, r) in d.reservation.iter().enumerate() {
                        if !inside(r.address) {
                            err(
                                &["dhcp", "reservation", &i.to_string(), "address"],
                                format!(
                                    "reserved address {} is not inside subnet {net}/{prefix}",
                                    r.address
                                ),
                            );
                        }
                    }
                }
            }
        }
        for (i, r) in d.reservation.iter().enumerate() {
            if crate::mac::Mac::parse(&r.mac).is_none() {
                err(
                    &["dhcp", "reservation", &i.to_string(), "mac"],
                    format!(
                        "`{}` is not a MAC address (expected aa:bb:cc:dd:ee:ff)",
                        r.mac
                    ),
                );
            }
        }
        for (i, n) in self.boot.node.iter().enumerate() {
            if crate::mac::Mac::parse(&n.mac).is_none() {
                err(
                    &["boot", "node", &i.to_string(), "mac"],
                    format!(
                        "`{}` is not a MAC address (expected aa:bb:cc:dd:ee:ff)",
                        n.mac
                    ),
                );
            }
        }
        if d.router_advertisement.enabled {
            if let Err(e) = parse_prefix6(&d.router_advertisement.prefix) {
                err(&["dhcp", "router_advertisement", "prefix"], e);
            }
            if self.server.interface.is_none() {
                err(
                    &["dhcp", "router_advertisement", "enabled"],
                    "router advertisements need server.interface".into(),
                );
            }
        }
        if let Some(u) = &self.http.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                err(
                    &["http", "public_url"],
                    format!("`{u}` is not an http:// or https:// URL"),
                );
            }
        }
        if !(512..=65464).contains(&self.tftp.max_blksize) {
            err(
                &["tftp", "max_blksize"],
                "max_blksize must be within 512..=65464".into(),
            );
        }
        if self.tftp.max_windowsize == 0 {
            err(
                &["tftp", "max_windowsize"],
                "max_windowsize must be at least 1".into(),
            );
        }
        if self.boot.park_poll == 0 {
            err(
                &["boot", "park_poll"],
                "park_poll must be at least 1 second".into(),
            );
        }
        errs
    }

    /// The base URL handed to nodes (no trailing slash).
    pub fn public_url(&self) -> String {
        match &self.http.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None if self.http.listen.port() == 80 => format!("http://{}", self.server.address),
            None => format!("http://{}:{}", self.server.address, self.http.listen.port()),
        }
    }

    /// The subnet as (network, prefix length), when configured and valid.
    pub fn subnet(&self) -> Option<(Ipv4Addr, u8)> {
        self.dhcp.subnet.as_deref().and_then(|s| parse_cidr(s).ok())
    }
}

/// Parses `a.b.c.d/n` and returns the network address (host bits cleared) and prefix length.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not CIDR (a.b.c.d/n)"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("`{ip}` is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("`{len}` is not a prefix length 0-32"))?;
    Ok((Ipv4Addr::from(u32::from(ip) & prefix_mask(len)), len))
}

/// The netmask for a prefix length.
pub fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

pub fn in_subnet(a: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    u32::from(a) & prefix_mask(len) == u32::from(net)
}

/// Parses an IPv6 `/64` prefix for router advertisements.
pub fn parse_prefix6(s: &str) -> Result<std::net::Ipv6Addr, String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not an IPv6 prefix (x::/64)"))?;
    let ip: std::net::Ipv6Addr = ip
        .parse()
        .map_err(|_| format!("`{ip}` is not an IPv6 address"))?;
    if len != "64" {
        return Err(format!("prefix length /{len}: SLAAC needs a /64"));
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, Diagnostics> {
        Config::parse(s, Path::new("/etc/corral/corral.toml"))
    }

    #[test]
    fn documented_example_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/corral.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.dhcp.mode, DhcpMode::Full);
        assert_eq!(c.dhcp.reservation.len(), 1);
        // Every key the structs know appears in the documented example (commented or not).
        let text = std::fs::read_to_string(&path).unwrap();
        for key in [
            "interface",
            "address",
            "state_dir",
            "images_dir",
            "scripts_dir",
            "disks_dir",
            "credentials",
            "admin_hosts",
            "mode",
            "port",
            "proxy_port",
            "subnet",
            "range",
            "router",
            "dns",
            "domain",
            "lease_time",
            "offer_hold",
            "no_pxedhcp",
            "reservation",
            "hostname",
            "router_advertisement",
            "prefix",
            "interval",
            "enabled",
            "listen",
            "root",
            "max_blksize",
            "max_windowsize",
            "timeout",
            "retries",
            "public_url",
            "bios",
            "efi_x64",
            "efi_ia32",
            "efi_arm64",
            "default_image",
            "park_poll",
            "node",
            "iqn_prefix",
        ] {
            assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!(".{key}]")),
                "{key} undocumented"
            );
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.dhcp.mode, DhcpMode::Off);
        assert_eq!(c.tftp.root, PathBuf::from("/usr/lib/ipxe"));
    }

    #[test]
    fn unknown_keys_are_all_reported_with_positions_and_suggestions() {
        let text = "[server]\nadress = \"10.0.0.1\"\n\n[dhcp]\nmode = \"full\"\nlease_tme = 5\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(e.contains("corral.toml:2:1: unknown key `adress`"), "{e}");
        assert!(e.contains("did you mean `address`?"), "{e}");
        assert!(
            e.contains("corral.toml:6:1: unknown key `lease_tme`"),
            "{e}"
        );
        assert!(e.contains("`lease_time`"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_their_key() {
        let text = "[server]\ninterface = \"br0\"\n[dhcp]\nmode = \"full\"\nsubnet = \"10.0.0.0/24\"\nrange = [\"10.0.0.200\", \"10.0.1.5\"]\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(
            e.contains(
                "corral.toml:6:9: range 10.0.0.200-10.0.1.5 is not inside subnet 10.0.0.0/24"
            ),
            "{e}"
        );
    }

    #[test]
    fn type_errors_are_reported_with_position() {
        let e = parse("[dhcp]\nlease_time = \"long\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("corral.toml:2:14"), "{e}");
    }

    #[test]
    fn bad_enum_value_is_reported() {
        let e = parse("[dhcp]\nmode = \"fulll\"\n").unwrap_err().to_string();
        assert!(e.contains("corral.toml:2:8"), "{e}");
        assert!(e.contains("full"), "{e}");
    }

    #[test]
    fn public_url_defaults_to_server_address() {
        let c =
            parse("[server]\naddress = \"10.1.2.3\"\n[http]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
        assert_eq!(c.public_url(), "http://10.1.2.3:8080");
    }
}
