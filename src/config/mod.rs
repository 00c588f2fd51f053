//! `corral.toml`: the server's own configuration (interfaces, ports, paths, DHCP mode, where state lives).
//!
//! Every room reads its section at start. Parsing goes through [`diag`] so that an operator sees *every*
//! problem in the file at once, each as `file:line:column: message`, with the nearest valid key suggested
//! for a misspelt one; a config that fails validation is never half-applied.
//!
//! Long because `Config::parse` checks every section in one pass, so every error is reported at once.

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
    pub discovery: DiscoveryConfig,
    pub api: ApiConfig,
    /// Where the config was read from, for error messages and relative paths.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The operator API's bearer tokens, read from their files when the config loads (never logged).
    #[serde(skip)]
    pub tokens: ApiTokens,
}

/// The operator API's bearer tokens: `admin` for every write, `read` (or `admin`) for reads.
#[derive(Clone, Default)]
pub struct ApiTokens {
    pub admin: Option<String>,
    pub read: Option<String>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens never reach a log, not even a debug one.
        f.debug_struct("ApiTokens")
            .field("admin", &self.admin.as_ref().map(|_| "<set>"))
            .field("read", &self.read.as_ref().map(|_| "<set>"))
            .finish()
    }
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
    /// only). Secrets never appear in logs, events or the API. Unset, `$CREDENTIALS_DIRECTORY/credentials`
    /// (systemd `LoadCredential=credentials:...`) is used when it exists.
    pub credentials: Option<PathBuf>,
    /// Seconds events are kept; older ones are pruned.
    pub event_retention: u64,
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
            event_retention: 30 * 86400,
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
    /// Seconds an expired lease is kept (so a node coming back soon gets its old address) before it is
    /// pruned.
    pub expired_lease_retention: u64,
    /// When the pool is exhausted, a node corral knows (listed in the policy, reserved, or in the
    /// inventory) takes the address of the oldest lease held by a MAC corral has never seen boot: a flood of
    /// invented MACs cannot starve the rack.
    pub reclaim_from_strangers: bool,
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
            expired_lease_retention: 86400,
            reclaim_from_strangers: true,
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
    /// Transfers at once, in all and from one address; requests beyond are refused with an error packet.
    pub max_sessions: usize,
    pub max_sessions_per_peer: usize,
    /// Upper bound for the timeout a client may ask for (RFC 2349 allows 255 s): a transfer's state is
    /// never held longer than `max_timeout` × (`retries` + 1) for a silent client.
    pub max_timeout: u8,
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
            max_sessions: 512,
            max_sessions_per_peer: 8,
            max_timeout: 5,
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
    /// Connections at once, in all and from one address; more are closed at once (and counted).
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Seconds from accept to the end of the handshake (the whole handshake, not each read).
    pub handshake_timeout: u64,
    /// Seconds without a request after the handshake before the connection is closed; 0 never closes.
    /// Off by default: a kernel NBD client whose node does no disk I/O sits idle for hours and has no
    /// ping in the protocol, and closing it fails the node's root disk. Dead peers are found by TCP
    /// keepalive instead.
    pub idle_timeout: u64,
    /// NBD over TLS (NBD_OPT_STARTTLS) with a per-slot pre-shared key: "off", "optional" (offered to
    /// clients that ask), or "required" (plain connections are refused the slot exports).
    pub tls: NbdTls,
}

/// Whether the NBD target offers or demands TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    Off,
    #[default]
    Optional,
    Required,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            enabled: true,
            listen: "0.0.0.0:10809".parse().unwrap(),
            admin_hosts: Vec::new(),
            max_connections: 256,
            max_connections_per_peer: 16,
            handshake_timeout: 10,
            idle_timeout: 0,
            tls: NbdTls::Optional,
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
    /// Connections at once, in all and from one address; more are closed at once (and counted).
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Seconds from accept to the end of the login (the whole login, not each PDU).
    pub login_timeout: u64,
    /// Seconds without a PDU in the full feature phase before the target pings the initiator (NOP-In);
    /// 0 never pings.
    pub idle_timeout: u64,
    /// Seconds the initiator has to answer that ping before the connection is closed.
    pub ping_timeout: u64,
    /// SCSI commands a session may have outstanding (the CmdSN window): immediate and unsolicited data
    /// held for them is bounded by this times FirstBurstLength.
    pub max_outstanding: u32,
}

impl IscsiConfig {
    /// The target name of a slot's disk.
    pub fn target_iqn(&self, cluster: &str, slot: &str) -> String {
        format!("{}:{cluster}.{slot}", self.iqn_prefix)
    }

    /// The initiator name corral gives a node that sanboots (iPXE logs in with it, and leaves it in the
    /// iBFT for the booted OS): stable per node, so a target's log names the machine.
    pub fn initiator_iqn(&self, mac: &crate::domain::Mac) -> String {
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
            max_connections: 256,
            max_connections_per_peer: 16,
            login_timeout: 10,
            idle_timeout: 60,
            ping_timeout: 15,
            max_outstanding: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// The base URL nodes use to reach this server; defaults to `http://<server.address>:<port>`.
    pub public_url: Option<String>,
    /// The admin token inline (prefer `admin_token_file`): every write endpoint requires it.
    pub api_token: Option<String>,
    /// A file holding the admin token (unset: `$CREDENTIALS_DIRECTORY/admin-token` when it exists).
    /// Without any admin token, writes are refused.
    pub admin_token_file: Option<PathBuf>,
    /// A file holding the read token (unset: `$CREDENTIALS_DIRECTORY/read-token` when it exists). With
    /// one, every API read (and /metrics, the dashboard's data) needs it or the admin token.
    pub read_token_file: Option<PathBuf>,
    /// Seconds a client has to send a request's headers once it starts one (and, on a new connection,
    /// to start).
    pub header_timeout: u64,
    /// Seconds a kept-alive connection may sit between requests before it is closed.
    pub idle_timeout: u64,
    /// Connections at once, in all and from one address; more are closed at once (and counted).
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "0.0.0.0:80".parse().unwrap(),
            public_url: None,
            api_token: None,
            admin_token_file: None,
            read_token_file: None,
            header_timeout: 10,
            idle_timeout: 75,
            max_connections: 4096,
            max_connections_per_peer: 64,
        }
    }
}

/// A separate listener for operators (API, dashboard, metrics), optionally over TLS; the boot path stays
/// on `[http]` in plain HTTP for firmware. With it, the boot listener serves only boot scripts, boot files
/// and the agents' API.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and private key: both set, the operator listener speaks HTTPS (rustls).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Which unknown nodes that ask for a script join the inventory (and the free pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryAllow {
    /// MACs corral's own DHCP has seen (and listed ones), asking from the address DHCP knows them by.
    #[default]
    Dhcp,
    /// Only MACs listed in the policy (`[[node]]`) or reserved in `[[dhcp.reservation]]`.
    Listed,
}

/// Bounds on discovery: what an unknown MAC may cost.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    pub allow: DiscoveryAllow,
    /// Discovered nodes that no cluster has taken and the policy does not list, at most; beyond, new
    /// MACs are refused (and counted) until some are assigned or pruned.
    pub max_unassigned: usize,
    /// New nodes one address may introduce per minute.
    pub rate_per_peer: u32,
    /// Seconds after its last request a discovered node that was never assigned (and is not listed) is
    /// pruned from the inventory.
    pub retention: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            allow: DiscoveryAllow::Dhcp,
            max_unassigned: 1000,
            rate_per_peer: 30,
            retention: 7 * 86400,
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
    /// Count the address a script request comes from as the node's own (how corral worked before it
    /// checked): only for a boot network where every host is trusted and corral cannot see the nodes'
    /// DHCP (mode "off" without reservations). Off, a node's address is what corral's DHCP leased it,
    /// its reservation, its slot's address, or (proxy mode) what it asked the site server for.
    pub trust_request_address: bool,
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
            trust_request_address: false,
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
        for p in [
            cfg.server.policy.as_mut(),
            cfg.server.credentials.as_mut(),
            cfg.http.admin_token_file.as_mut(),
            cfg.http.read_token_file.as_mut(),
            cfg.api.tls_cert.as_mut(),
            cfg.api.tls_key.as_mut(),
        ]
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
        let mut errs = cfg.validate();
        errs.extend(cfg.load_secrets(std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)));
        found.extend(Diagnostics::from_paths(text, path, errs).0);
        if found.is_empty() {
            Ok(cfg)
        } else {
            found.sort_by_key(|d| (d.line, d.column));
            Err(Diagnostics(found))
        }
    }

    /// Reads the API tokens (and finds the credentials file) from their files or from systemd's
    /// credentials directory (`LoadCredential=admin-token:...`, `read-token:...`, `credentials:...`), so
    /// no secret has to sit in this file or on a command line. Empty or short tokens and files others can
    /// read are refused.
    fn load_secrets(&mut self, credentials_dir: Option<PathBuf>) -> Vec<(Vec<String>, String)> {
        let mut errs = Vec::new();
        // An empty credential is no credential: the unit file's `SetCredential=name:` (empty) stands in
        // for a `LoadCredential=` whose file the operator did not create.
        let from_dir = |name: &str| {
            credentials_dir
                .as_ref()
                .map(|d| d.join(name))
                .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
        };
        if self.server.credentials.is_none() {
            self.server.credentials = from_dir("credentials");
        }
        let h = &self.http;
        let admin_file = h.admin_token_file.clone().or_else(|| {
            h.api_token
                .is_none()
                .then(|| from_dir("admin-token"))
                .flatten()
        });
        let read_file = h.read_token_file.clone().or_else(|| from_dir("read-token"));
        let mut admin = h.api_token.clone().map(|t| (t, vec!["http", "api_token"]));
        if let Some(p) = admin_file {
            if admin.is_some() {
                errs.push((
                    vec!["http".into(), "admin_token_file".into()],
                    "set either api_token or admin_token_file, not both".into(),
                ));
            }
            match read_secret_file(&p) {
                Ok(t) => admin = Some((t, vec!["http", "admin_token_file"])),
                Err(e) => errs.push((vec!["http".into(), "admin_token_file".into()], e)),
            }
        }
        let read = match read_file {
            None => None,
            Some(p) => match read_secret_file(&p) {
                Ok(t) => Some((t, vec!["http", "read_token_file"])),
                Err(e) => {
                    errs.push((vec!["http".into(), "read_token_file".into()], e));
                    None
                }
            },
        };
        for (token, at) in admin.iter().chain(read.iter()) {
            if let Err(e) = check_token(token) {
                errs.push((at.iter().map(|s| s.to_string()).collect(), e));
            }
        }
        if let (Some((a, _)), Some((r, at))) = (&admin, &read) {
            if a == r {
                errs.push((
                    at.iter().map(|s| s.to_string()).collect(),
                    "the read token must differ from the admin token".into(),
                ));
            }
        }
        self.tokens = ApiTokens {
            admin: admin.map(|(t, _)| t),
            read: read.map(|(t, _)| t),
        };
        errs
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
            if crate::domain::Mac::parse(&r.mac).is_none() {
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
            if crate::domain::Mac::parse(&n.mac).is_none() {
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
            match url::Url::parse(u) {
                Ok(p) if matches!(p.scheme(), "http" | "https") && p.has_host() => {}
                Ok(_) => err(
                    &["http", "public_url"],
                    format!("`{u}` is not an http:// or https:// URL"),
                ),
                Err(e) => err(&["http", "public_url"], format!("`{u}`: {e}")),
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
        for (path, v) in [
            (["http", "header_timeout"], self.http.header_timeout),
            (["http", "idle_timeout"], self.http.idle_timeout),
            (
                ["http", "max_connections"],
                self.http.max_connections as u64,
            ),
            (
                ["http", "max_connections_per_peer"],
                self.http.max_connections_per_peer as u64,
            ),
            (["tftp", "max_sessions"], self.tftp.max_sessions as u64),
            (
                ["tftp", "max_sessions_per_peer"],
                self.tftp.max_sessions_per_peer as u64,
            ),
            (["tftp", "max_timeout"], u64::from(self.tftp.max_timeout)),
            (["nbd", "max_connections"], self.nbd.max_connections as u64),
            (
                ["nbd", "max_connections_per_peer"],
                self.nbd.max_connections_per_peer as u64,
            ),
            (["nbd", "handshake_timeout"], self.nbd.handshake_timeout),
            (
                ["iscsi", "max_connections"],
                self.iscsi.max_connections as u64,
            ),
            (
                ["iscsi", "max_connections_per_peer"],
                self.iscsi.max_connections_per_peer as u64,
            ),
            (["iscsi", "login_timeout"], self.iscsi.login_timeout),
            (["iscsi", "ping_timeout"], self.iscsi.ping_timeout),
            (
                ["iscsi", "max_outstanding"],
                u64::from(self.iscsi.max_outstanding),
            ),
            (
                ["discovery", "rate_per_peer"],
                u64::from(self.discovery.rate_per_peer),
            ),
        ] {
            if v == 0 {
                err(&path, format!("{} must be at least 1", path[1]));
            }
        }
        if self.tftp.timeout > self.tftp.max_timeout {
            err(
                &["tftp", "timeout"],
                format!(
                    "timeout {} is above max_timeout {}",
                    self.tftp.timeout, self.tftp.max_timeout
                ),
            );
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            err(
                &["api", "tls_cert"],
                "HTTPS needs both tls_cert and tls_key".into(),
            );
        }
        if self.api.tls_cert.is_some() && self.api.listen.is_none() {
            err(
                &["api", "tls_cert"],
                "TLS is for the operator listener: set api.listen too".into(),
            );
        }
        if let Some(l) = self.api.listen {
            if l == self.http.listen {
                err(
                    &["api", "listen"],
                    format!("{l} is the boot listener's address (http.listen)"),
                );
            }
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

/// Reads a secret from a file only its owner can read (mode 600 or 400): the whole file, trimmed.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.trim().to_string())
}

/// Refuses a secret file that anyone but its owner, or this process's user, may read: the group or others
/// in its mode bits, or a POSIX ACL entry for another user or any group. systemd's credentials
/// (`$CREDENTIALS_DIRECTORY`) pass as systemd makes them: mode 0400 owned by the service's user, or (the
/// usual case with `DynamicUser=`) 0400 owned by root plus an ACL entry granting the service's user read,
/// which `ls -l` shows as 0440 because the group bits then stand for the ACL mask.
pub fn check_private(path: &Path) -> Result<(), String> {
    check_private_as(path, nix::unistd::geteuid().as_raw())
}

/// [`check_private`] for a process running as `reader`.
pub fn check_private_as(path: &Path, reader: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    let acl = posix_acl(path).map_err(|e| format!("{}: reading its ACL: {e}", path.display()))?;
    match who_else_reads(mode, acl.as_deref(), reader) {
        None => Ok(()),
        Some(who) => Err(format!(
            "{}: readable by {who} (mode {mode:o}); a secret file must be readable by its owner only: chmod 600 it",
            path.display()
        )),
    }
}

/// The file's access ACL (`system.posix_acl_access`), `None` when it has none or the file system keeps none.
fn posix_acl(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let name = c"system.posix_acl_access";
    let mut buf = vec![0u8; 1024];
    // SAFETY: both names are NUL-terminated and `buf` is writable for its length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// Who, besides the owner and `reader` (this process's user), may read a file with these mode bits and
/// access ACL (the kernel's xattr form: a version-2 header, then 8-byte entries of tag, permissions, id).
/// `None`: nobody.
fn who_else_reads(mode: u32, acl: Option<&[u8]>, reader: u32) -> Option<String> {
    const READ: u16 = 4;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    if mode & 0o004 != 0 {
        return Some("others".into());
    }
    let entries: Vec<(u16, u16, u32)> = match acl {
        Some(a) if a.len() >= 4 && u32::from_le_bytes([a[0], a[1], a[2], a[3]]) == 2 => a[4..]
            .chunks_exact(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect(),
        // An ACL we cannot read is not trusted to narrow the mode: the group bits decide.
        _ => Vec::new(),
    };
    let Some(mask) = entries.iter().find(|e| e.0 == MASK).map(|e| e.1) else {
        // No ACL (or a minimal one, which is the mode): the group bits are the owning group's.
        return (mode & 0o040 != 0).then(|| "its group".into());
    };
    for (tag, perm, id) in &entries {
        if perm & mask & READ == 0 {
            continue;
        }
        match *tag {
            GROUP_OBJ => return Some("its group".into()),
            GROUP => return Some(format!("group {id} (ACL)")),
            USER if *id != reader => return Some(format!("user {id} (ACL)")),
            _ => {}
        }
    }
    None
}

/// An API token must be there and hard to guess.
fn check_token(token: &str) -> Result<(), String> {
    if token.trim().is_empty() {
        return Err("the token is empty: an empty token would let anyone in".into());
    }
    if token.len() < 16 {
        return Err(format!(
            "the token is {} bytes: use at least 16 (e.g. `openssl rand -hex 16`)",
            token.len()
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the token must not contain spaces or control characters".into());
    }
    Ok(())
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
            "event_retention",
            "expired_lease_retention",
            "reclaim_from_strangers",
            "max_sessions",
            "max_sessions_per_peer",
            "max_timeout",
            "api_token",
            "admin_token_file",
            "read_token_file",
            "header_timeout",
            "idle_timeout",
            "max_connections",
            "max_connections_per_peer",
            "tls_cert",
            "tls_key",
            "handshake_timeout",
            "tls",
            "login_timeout",
            "ping_timeout",
            "max_outstanding",
            "trust_request_address",
            "allow",
            "max_unassigned",
            "rate_per_peer",
            "retention",
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
    fn tokens_come_from_private_files_and_must_be_strong() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, body: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let good = file("admin", "0123456789abcdef-admin\n", 0o600);
        let read = file("read", "0123456789abcdef-read", 0o400);
        let cfg = |extra: &str| {
            format!(
                "[http]\nadmin_token_file = \"{}\"\nread_token_file = \"{}\"\n{extra}",
                good.display(),
                read.display()
            )
        };
        let c = parse(&cfg("")).unwrap();
        assert_eq!(c.tokens.admin.as_deref(), Some("0123456789abcdef-admin"));
        assert_eq!(c.tokens.read.as_deref(), Some("0123456789abcdef-read"));
        assert!(
            !format!("{:?}", c.tokens).contains("abcdef"),
            "tokens never print"
        );

        let open = file("open", "0123456789abcdef-open", 0o644);
        let e = parse(&format!(
            "[http]\nadmin_token_file = \"{}\"\n",
            open.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("corral.toml:2:") && e.contains("chmod 600"),
            "{e}"
        );
        let empty = file("empty", "  \n", 0o600);
        let e = parse(&format!(
            "[http]\nread_token_file = \"{}\"\n",
            empty.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = parse("[http]\napi_token = \"\"\n").unwrap_err().to_string();
        assert!(e.contains("corral.toml:2:") && e.contains("empty"), "{e}");
        let e = parse("[http]\napi_token = \"short\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 16"), "{e}");
        let e = parse(&cfg("api_token = \"0123456789abcdef-inline\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");

        // systemd's credentials directory stands in for unset files.
        let creds = tempfile::tempdir().unwrap();
        for (name, body) in [
            ("admin-token", "0123456789abcdef-systemd"),
            ("credentials", "# no secrets yet\n"),
            ("read-token", ""),
        ] {
            let p = creds.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        let mut c = parse("").unwrap();
        assert!(c.load_secrets(Some(creds.path().to_path_buf())).is_empty());
        assert_eq!(c.tokens.admin.as_deref(), Some("0123456789abcdef-systemd"));
        assert_eq!(c.tokens.read, None);
        assert_eq!(c.server.credentials, Some(creds.path().join("credentials")));
        // An empty credential (the unit's `SetCredential=read-token:` fallback) is no credential.
        std::fs::write(creds.path().join("credentials"), "").unwrap();
        let mut c = parse("").unwrap();
        assert!(c.load_secrets(Some(creds.path().to_path_buf())).is_empty());
        assert_eq!(c.server.credentials, None);
    }

    #[test]
    fn limits_must_be_positive_and_tls_needs_both_files() {
        let e = parse(
            "[tftp]\nmax_sessions = 0\n[nbd]\nhandshake_timeout = 0\n[api]\ntls_cert = \"/x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("corral.toml:2:") && e.contains("max_sessions must be at least 1"),
            "{e}"
        );
        assert!(e.contains("handshake_timeout must be at least 1"), "{e}");
        assert!(e.contains("both tls_cert and tls_key"), "{e}");
        let e = parse("[tftp]\ntimeout = 9\n").unwrap_err().to_string();
        assert!(e.contains("above max_timeout"), "{e}");
    }

    #[test]
    fn public_url_defaults_to_server_address() {
        let c =
            parse("[server]\naddress = \"10.1.2.3\"\n[http]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
        assert_eq!(c.public_url(), "http://10.1.2.3:8080");
        for (bad, why) in [
            ("ftp://10.1.2.3/", "is not an http:// or https:// URL"),
            ("10.1.2.3:8080", "relative URL without a base"),
            ("http://10.1.2.3:port/", "invalid port"),
        ] {
            let text =
                format!("[server]\naddress = \"10.1.2.3\"\n[http]\npublic_url = \"{bad}\"\n");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let text =
            "[server]\naddress = \"10.1.2.3\"\n[http]\npublic_url = \"https://boot.example/c/\"\n";
        assert_eq!(parse(text).unwrap().public_url(), "https://boot.example/c");
    }
}

#[cfg(test)]
mod private_file_tests {
    use super::who_else_reads;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut x = 2u32.to_le_bytes().to_vec();
        for (t, p, i) in entries {
            x.extend_from_slice(&t.to_le_bytes());
            x.extend_from_slice(&p.to_le_bytes());
            x.extend_from_slice(&i.to_le_bytes());
        }
        x
    }

    #[test]
    fn mode_bits_without_acl() {
        assert_eq!(who_else_reads(0o600, None, 0), None);
        assert_eq!(who_else_reads(0o400, None, 0), None);
        assert_eq!(who_else_reads(0o640, None, 0).as_deref(), Some("its group"));
        assert_eq!(who_else_reads(0o604, None, 0).as_deref(), Some("others"));
        // Write or execute for others is not reading, but a minimal ACL (no mask) is only the mode.
        assert_eq!(
            who_else_reads(0o620, Some(&acl(&[(1, 6, u32::MAX)])), 0),
            None
        );
    }

    #[test]
    fn acl_entries_count_through_the_mask() {
        let me = 61_234;
        let systemd = acl(&[
            (1, 4, !0),
            (2, 4, me),
            (4, 0, !0),
            (0x10, 4, !0),
            (0x20, 0, !0),
        ]);
        assert_eq!(who_else_reads(0o440, Some(&systemd), me), None);
        assert_eq!(
            who_else_reads(0o440, Some(&systemd), 1000).as_deref(),
            Some("user 61234 (ACL)")
        );
        let group = acl(&[
            (1, 6, !0),
            (4, 0, !0),
            (8, 4, 50),
            (0x10, 4, !0),
            (0x20, 0, !0),
        ]);
        assert_eq!(
            who_else_reads(0o640, Some(&group), 0).as_deref(),
            Some("group 50 (ACL)")
        );
        // A mask without read disables every group-class entry.
        let masked = acl(&[
            (1, 6, !0),
            (2, 4, 7),
            (4, 4, !0),
            (0x10, 0, !0),
            (0x20, 0, !0),
        ]);
        assert_eq!(who_else_reads(0o600, Some(&masked), 0), None);
        // Garbage where the ACL should be does not narrow the mode.
        assert_eq!(
            who_else_reads(0o640, Some(b"junk"), 0).as_deref(),
            Some("its group")
        );
    }
}
