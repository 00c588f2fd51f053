//! The policy engine: `policy.toml` (virtual clusters, their sizes, priorities, images by node count,
//! identities, schedules and scale rules; known nodes), its validation with file:line:column, and the pure
//! planner ([`plan::plan`]) that decides which node serves which cluster slot.
//!
//! A cluster has slots `0..max`. Everything a slot carries — its image link, its identity (hostname and
//! address) — is fixed when the policy loads, before any node is chosen; an assignment only binds a node to
//! a slot. So a slot keeps its identity when its node changes.
//!
//! Long because the file model and its one validation pass (`build`) stay side by side, field by field.

pub mod cron;
pub mod plan;
pub mod scale;
pub mod webhook;

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use crate::config::diag::{parse_toml_lenient, Diagnostics};
use crate::domain::Mac;
pub use cron::Zone;

/// A span of time written as `30s`, `5m`, `2h`, `1d` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Secs(pub u64);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Secs(n)),
            Raw::S(s) => parse_secs(&s).map(Secs).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `90`, `30s`, `5m`, `2h`, `1d`.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30s, 5m, 2h, 1d)"))
}

/// The whole policy file as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub settings: Settings,
    #[serde(default, rename = "cluster")]
    pub clusters: Vec<ClusterSpec>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeSpec>,
    #[serde(default, rename = "image")]
    pub images: Vec<ImageRef>,
}

/// Settings for the whole policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// A node that was moved is not moved again within this time (no thrashing).
    pub cooldown: Secs,
    /// Offset of the site's local time from UTC for schedules, e.g. `+01:00` (fixed all year); unset: UTC.
    pub utc_offset: Option<String>,
    /// The site's IANA time zone for schedules, e.g. `Europe/Berlin`: windows follow daylight saving
    /// time. Replaces `utc_offset`; setting both is an error.
    pub timezone: Option<String>,
    /// When a node's running work may be taken away (released or moved to another cluster): cron
    /// patterns, one of which must match the minute; empty = any time. A cluster's own `maintenance`
    /// replaces this one.
    pub maintenance: Vec<String>,
    /// How long a node has to power off when asked (agent or BMC soft off) before it is cut hard.
    pub power_off_timeout: Secs,
    /// How long a node has from power-on to its first heartbeat in its new role before it is marked
    /// failed and another node is chosen.
    pub boot_timeout: Secs,
    /// How often agents heartbeat.
    pub heartbeat_interval: Secs,
    /// Where alerts are POSTed as JSON (an `http://` URL), besides the event log and the service log.
    pub alert_webhook: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cooldown: Secs(300),
            utc_offset: None,
            timezone: None,
            maintenance: Vec::new(),
            power_off_timeout: Secs(60),
            boot_timeout: Secs(300),
            heartbeat_interval: Secs(5),
            alert_webhook: None,
        }
    }
}

/// One virtual cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Higher wins conflicts.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub min: u32,
    pub max: u32,
    /// Desired count when no schedule window or scale rule says otherwise (default: `min`).
    pub default: Option<u32>,
    /// May take nodes from lower-priority clusters.
    #[serde(default)]
    pub preempt: bool,
    /// Share of all nodes this cluster is entitled to, percent (informational; checked to sum to ≤ 100).
    pub entitlement: Option<f64>,
    #[serde(default)]
    pub requires: Requires,
    /// Boot image links by node count: the 1st member boots the 1st link, and so on; the last repeats.
    pub images: Vec<ImageLink>,
    /// Base disk for the slot overlays.
    pub disk: Option<String>,
    pub identity: Option<IdentitySpec>,
    #[serde(default)]
    pub drain: DrainSpec,
    /// When this cluster's nodes may be taken away (cron patterns); default: `[settings] maintenance`.
    pub maintenance: Option<Vec<String>>,
    #[serde(default)]
    pub schedule: Vec<Window>,
    #[serde(default)]
    pub scale: Vec<ScaleRule>,
    /// How the cluster's nodes are watched and what happens when one fails or is slow. Without this
    /// table the cluster's nodes are not watched (no failover); with it, its keys have defaults.
    pub health: Option<HealthSpec>,
}

impl ClusterSpec {
    /// The cluster's health settings, or the defaults when it has no `health` table.
    pub fn health(&self) -> &HealthSpec {
        static DEFAULT: std::sync::OnceLock<HealthSpec> = std::sync::OnceLock::new();
        self.health
            .as_ref()
            .unwrap_or_else(|| DEFAULT.get_or_init(HealthSpec::default))
    }
}

/// Monitoring and failover for a cluster's nodes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSpec {
    /// No heartbeat for this long → the node has failed (default: three heartbeat intervals).
    pub heartbeat_timeout: Option<Secs>,
    /// An application probe corral runs against each node.
    pub probe: Option<ProbeSpec>,
    /// Performance rules: a figure beyond a limit for a whole duration → the node is slow.
    pub slow: Vec<SlowRule>,
    /// What becomes of a failed node: `pool` (fenced, switched off and on, back to the pool when it
    /// boots) or `quarantine` (fenced from its disk but left running for investigation, no new work).
    pub on_failure: OnFailure,
    /// How many replacement nodes one failover tries before it gives up and alerts.
    pub failover_attempts: u32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            heartbeat_timeout: None,
            probe: None,
            slow: Vec::new(),
            on_failure: OnFailure::Pool,
            failover_attempts: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Pool,
    Quarantine,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Http,
    /// HTTP over TLS. The certificate is not checked: a probe is addressed to the node's IP (which
    /// certificates seldom name) and carries no secret; it tells whether the application answers.
    Https,
    Tcp,
}

/// An application probe: an HTTP(S) GET (status and, optionally, a text the body must hold) or a TCP
/// connect, to the node's address.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    #[serde(default)]
    pub kind: ProbeKind,
    pub port: u16,
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// The HTTP status expected (default 200).
    #[serde(default = "default_probe_status")]
    pub status: u16,
    /// Text the body must contain.
    pub body: Option<String>,
    #[serde(default = "default_probe_interval")]
    pub interval: Secs,
    /// A probe without an answer in this time has failed.
    #[serde(default = "default_probe_timeout")]
    pub timeout: Secs,
    /// Consecutive failures that fail the node.
    #[serde(default = "default_probe_failures")]
    pub failures: u32,
}

fn default_probe_path() -> String {
    "/".into()
}
fn default_probe_status() -> u16 {
    200
}
fn default_probe_interval() -> Secs {
    Secs(5)
}
fn default_probe_timeout() -> Secs {
    Secs(2)
}
fn default_probe_failures() -> u32 {
    3
}

/// Figures a slow rule can watch: the probe's response time and the agent's heartbeat figures.
pub const HEALTH_METRICS: &[&str] = &[
    "probe_ms",
    "load1",
    "utilisation",
    "mem_available_mib",
    "swap_pages_per_s",
    "io_sectors_per_s",
];

/// `metric` above (or below) a limit for `for` → slow.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlowRule {
    pub metric: String,
    pub above: Option<f64>,
    pub below: Option<f64>,
    #[serde(rename = "for")]
    pub for_: Secs,
}

/// What a node must have to serve a cluster.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Requires {
    pub arch: Option<String>,
    pub min_cpus: Option<u32>,
    /// MiB.
    pub min_memory: Option<u64>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Only these nodes (MACs or `[[node]]` names).
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// An image link: a name (its position gives the node count) or a name with explicit counts.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ImageLink {
    Name(String),
    Counted {
        image: String,
        /// `"3"` or `"3-8"`: 1-based member numbers.
        nodes: String,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// Hostname pattern: `{cluster}`, `{slot}` (0-based), `{n}` (1-based), with optional zero padding `{n:02}`.
    pub hostname: String,
    /// Addresses for the slots, in order: `a.b.c.d-a.b.c.e` or CIDR.
    pub addresses: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DrainSpec {
    /// How long the application gets to stop before its node is taken.
    pub grace: Secs,
    /// Take a node even while its agent reports it busy (default: a busy node is left alone).
    pub take_busy: bool,
}

impl Default for DrainSpec {
    fn default() -> Self {
        DrainSpec {
            grace: Secs(30),
            take_busy: false,
        }
    }
}

/// A calendar window: while `cron` matches, the desired count is `count`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub cron: String,
    pub count: u32,
}

/// A metric above/below a threshold for a duration adds/removes nodes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScaleRule {
    pub metric: String,
    pub above: Option<f64>,
    pub below: Option<f64>,
    #[serde(rename = "for")]
    pub for_: Secs,
    #[serde(default)]
    pub add: u32,
    #[serde(default)]
    pub remove: u32,
    #[serde(default)]
    pub cooldown: Secs,
}

/// A known node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub mac: String,
    pub name: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub facts: FactsSpec,
    /// How corral switches this node (Redfish, IPMI, Wake-on-LAN, a command, QEMU's QMP).
    pub power: Option<crate::power::PowerSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FactsSpec {
    pub cpus: Option<u32>,
    /// MiB.
    pub memory: Option<u64>,
    pub arch: Option<String>,
}

/// A policy name for a catalog image.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    pub name: String,
    /// The catalog image (default: the same name).
    pub catalog: Option<String>,
}

/// A slot's identity, generated when the policy loads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub hostname: String,
    pub address: Option<Ipv4Addr>,
}

/// A validated cluster, ready for the planner.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub default: u32,
    /// Catalog image per slot, index = slot.
    pub slot_images: Vec<String>,
    /// Identity per slot, index = slot.
    pub identities: Vec<Identity>,
    pub windows: Vec<(cron::Cron, u32)>,
    /// When the cluster's nodes may be taken away; empty = any time.
    pub maintenance: Vec<cron::Cron>,
    /// Resolved `requires.nodes`.
    pub only_nodes: BTreeSet<Mac>,
}

/// A validated policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub clusters: Vec<Cluster>,
    pub nodes: BTreeMap<Mac, NodeSpec>,
    pub cooldown: u64,
    /// Local time for schedules and maintenance windows.
    pub zone: Zone,
    pub power_off_timeout: u64,
    pub boot_timeout: u64,
    pub heartbeat_interval: u64,
    pub alert_webhook: Option<String>,
}

impl Policy {
    /// Reads and validates a policy file. `image_exists(name, arch)` says whether the catalog has an image
    /// (for the arch a cluster requires, when it names one).
    pub fn load(
        path: &Path,
        image_exists: &dyn Fn(&str, Option<&str>) -> bool,
    ) -> Result<Policy, Diagnostics> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Diagnostics::single(path, format!("cannot read policy: {e}")))?;
        Policy::parse(&text, path, image_exists)
    }

    pub fn parse(
        text: &str,
        path: &Path,
        image_exists: &dyn Fn(&str, Option<&str>) -> bool,
    ) -> Result<Policy, Diagnostics> {
        let (file, mut found) = parse_toml_lenient::<PolicyFile>(text, path);
        let Some(file) = file else {
            return Err(Diagnostics(found));
        };
        let mut errs: Vec<(Vec<String>, String)> = Vec::new();
        let policy = build(&file, image_exists, &mut errs);
        found.extend(Diagnostics::from_paths(text, path, errs).0);
        if found.is_empty() {
            Ok(policy)
        } else {
            found.sort_by_key(|d| (d.line, d.column));
            Err(Diagnostics(found))
        }
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.spec.name == name)
    }
}

fn p(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn build(
    file: &PolicyFile,
    image_exists: &dyn Fn(&str, Option<&str>) -> bool,
    errs: &mut Vec<(Vec<String>, String)>,
) -> Policy {
    let fixed = file.settings.utc_offset.as_deref().map(|o| {
        parse_offset(o).unwrap_or_else(|e| {
            errs.push((p(&["settings", "utc_offset"]), e));
            0
        })
    });
    let zone = match &file.settings.timezone {
        None => Zone::Fixed(fixed.unwrap_or(0)),
        Some(name) => {
            if fixed.is_some() {
                errs.push((
                    p(&["settings", "timezone"]),
                    "set `timezone` or `utc_offset`, not both".into(),
                ));
            }
            Zone::named(name).unwrap_or_else(|e| {
                errs.push((p(&["settings", "timezone"]), e));
                Zone::default()
            })
        }
    };
    // Nodes.
    let mut nodes = BTreeMap::new();
    let mut names = BTreeMap::new();
    for (i, n) in file.nodes.iter().enumerate() {
        let at = |k: &str| p(&["node", &i.to_string(), k]);
        match Mac::parse(&n.mac) {
            None => errs.push((at("mac"), format!("`{}` is not a MAC address", n.mac))),
            Some(m) => {
                if nodes.insert(m, n.clone()).is_some() {
                    errs.push((at("mac"), format!("node {m} is listed twice")));
                }
                if let Some(name) = &n.name {
                    if names.insert(name.clone(), m).is_some() {
                        errs.push((at("name"), format!("node name `{name}` is used twice")));
                    }
                }
            }
        }
    }
    // Image names: [[image]] aliases, else catalog names directly.
    let mut aliases = BTreeMap::new();
    for (i, im) in file.images.iter().enumerate() {
        let target = im.catalog.clone().unwrap_or_else(|| im.name.clone());
        if aliases.insert(im.name.clone(), target).is_some() {
            errs.push((
                p(&["image", &i.to_string(), "name"]),
                format!("image `{}` is declared twice", im.name),
            ));
        }
    }
    let mut clusters = Vec::new();
    let mut seen = BTreeSet::new();
    let mut ranges: Vec<(u32, u32, String, usize)> = Vec::new();
    let mut entitlement = 0.0;
    for (ci, c) in file.clusters.iter().enumerate() {
        let idx = ci.to_string();
        let at = |k: &[&str]| {
            let mut v = p(&["cluster", &idx]);
            v.extend(k.iter().map(|s| s.to_string()));
            v
        };
        if !seen.insert(c.name.clone()) {
            errs.push((
                at(&["name"]),
                format!("cluster `{}` is defined twice", c.name),
            ));
        }
        if c.name.is_empty()
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            errs.push((
                at(&["name"]),
                format!("cluster name `{}` must be letters, digits, - or _", c.name),
            ));
        }
        if c.min > c.max {
            errs.push((
                at(&["min"]),
                format!("min {} is above max {}", c.min, c.max),
            ));
        }
        let default = c.default.unwrap_or(c.min);
        if c.default.is_some() && (default < c.min || default > c.max) {
            errs.push((
                at(&["default"]),
                format!(
                    "default {default} is outside min {} .. max {}",
                    c.min, c.max
                ),
            ));
        }
        if c.max > 4096 {
            errs.push((
                at(&["max"]),
                format!(
                    "max {} is more slots than corral plans for one cluster (4096)",
                    c.max
                ),
            ));
        }
        if let Some(e) = c.entitlement {
            if !(0.0..=100.0).contains(&e) {
                errs.push((
                    at(&["entitlement"]),
                    format!("entitlement {e} is not a percentage"),
                ));
            }
            entitlement += e;
        }
        // Image links → one catalog image per slot.
        let slot_images = match link_table(&c.images, c.max) {
            Ok(t) => t,
            Err(e) => {
                errs.push((at(&["images"]), e));
                Vec::new()
            }
        };
        let mut resolved = Vec::with_capacity(slot_images.len());
        let mut reported = BTreeSet::new();
        for name in &slot_images {
            let target = aliases.get(name).cloned().unwrap_or_else(|| name.clone());
            if !image_exists(&target, c.requires.arch.as_deref()) && reported.insert(name.clone()) {
                let arch = c
                    .requires
                    .arch
                    .as_deref()
                    .map(|a| format!(" for {a}"))
                    .unwrap_or_default();
                errs.push((
                    at(&["images"]),
                    format!("image `{name}` does not exist{arch} in the catalog"),
                ));
            }
            resolved.push(target);
        }
        // Identities for every slot up to max.
        let identities = match &c.identity {
            None => (0..c.max)
                .map(|s| Identity {
                    hostname: format!("{}-{}", c.name, s + 1),
                    address: None,
                })
                .collect(),
            Some(id) => {
                let addrs = match id.addresses.as_deref().map(parse_range) {
                    None => None,
                    Some(Ok((a, b))) => {
                        if b - a + 1 < c.max {
                            errs.push((
                                at(&["identity", "addresses"]),
                                format!("{} addresses for {} slots", b - a + 1, c.max),
                            ));
                        }
                        ranges.push((a, b, c.name.clone(), ci));
                        Some(a)
                    }
                    Some(Err(e)) => {
                        errs.push((at(&["identity", "addresses"]), e));
                        None
                    }
                };
                let mut ids = Vec::new();
                for s in 0..c.max {
                    match hostname(&id.hostname, &c.name, s) {
                        Ok(h) => ids.push(Identity {
                            hostname: h,
                            address: addrs.map(|a| Ipv4Addr::from(a + s)),
                        }),
                        Err(e) => {
                            errs.push((at(&["identity", "hostname"]), e));
                            break;
                        }
                    }
                }
                ids
            }
        };
        let mut windows = Vec::new();
        for (wi, w) in c.schedule.iter().enumerate() {
            match cron::Cron::parse(&w.cron) {
                Ok(cr) => windows.push((cr, w.count)),
                Err(e) => errs.push((at(&["schedule", &wi.to_string(), "cron"]), e)),
            }
            if w.count < c.min || w.count > c.max {
                errs.push((
                    at(&["schedule", &wi.to_string(), "count"]),
                    format!(
                        "count {} is outside min {} .. max {}",
                        w.count, c.min, c.max
                    ),
                ));
            }
        }
        for (ri, r) in c.scale.iter().enumerate() {
            let rat = |k: &str| at(&["scale", &ri.to_string(), k]);
            match (r.above, r.below) {
                (Some(_), Some(_)) | (None, None) => errs.push((
                    rat("metric"),
                    "a scale rule needs exactly one of `above` or `below`".into(),
                )),
                _ => {}
            }
            if (r.add == 0) == (r.remove == 0) {
                errs.push((
                    rat("metric"),
                    "a scale rule needs exactly one of `add` or `remove`".into(),
                ));
            }
        }
        if let Some(h) = &c.health {
            check_health(h, &at, errs);
            // A quarantined node stays up on its slot's address, which its replacement takes too.
            if h.on_failure == OnFailure::Quarantine
                && c.identity.as_ref().is_some_and(|i| i.addresses.is_some())
            {
                errs.push((
                    at(&["health", "on_failure"]),
                    "`quarantine` keeps a failed node up, but this cluster's slots have fixed addresses (identity.addresses) that its replacement needs: use `pool`".into(),
                ));
            }
        }
        let mut maintenance = Vec::new();
        let (patterns, inherited) = match &c.maintenance {
            Some(m) => (m, false),
            None => (&file.settings.maintenance, true),
        };
        for (mi, m) in patterns.iter().enumerate() {
            match cron::Cron::parse(m) {
                Ok(cr) => maintenance.push(cr),
                // The settings' own patterns are reported once, below.
                Err(_) if inherited => {}
                Err(e) => errs.push((at(&["maintenance", &mi.to_string()]), e)),
            }
        }
        let mut only_nodes = BTreeSet::new();
        for (ni, n) in c.requires.nodes.iter().enumerate() {
            match Mac::parse(n).or_else(|| names.get(n).copied()) {
                Some(m) => {
                    only_nodes.insert(m);
                }
                None => errs.push((
                    at(&["requires", "nodes"]),
                    format!(
                        "`{n}` (entry {}) is neither a MAC nor a known node name",
                        ni + 1
                    ),
                )),
            }
        }
        clusters.push(Cluster {
            spec: c.clone(),
            default,
            slot_images: resolved,
            identities,
            windows,
            maintenance,
            only_nodes,
        });
    }
    if entitlement > 100.0 {
        errs.push((
            p(&["cluster"]),
            format!("entitlements add up to {entitlement}%, more than 100%"),
        ));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.0 <= a.1 {
            errs.push((
                p(&["cluster", &b.3.to_string(), "identity", "addresses"]),
                format!(
                    "addresses overlap with cluster `{}` ({}..{})",
                    a.2,
                    Ipv4Addr::from(a.0),
                    Ipv4Addr::from(a.1)
                ),
            ));
        }
    }
    for (mi, m) in file.settings.maintenance.iter().enumerate() {
        if let Err(e) = cron::Cron::parse(m) {
            errs.push((p(&["settings", "maintenance", &mi.to_string()]), e));
        }
    }
    if let Some(url) = &file.settings.alert_webhook {
        if let Err(e) = webhook::parse_url(url) {
            errs.push((p(&["settings", "alert_webhook"]), e));
        }
    }
    for (key, v) in [
        ("power_off_timeout", file.settings.power_off_timeout.0),
        ("boot_timeout", file.settings.boot_timeout.0),
        ("heartbeat_interval", file.settings.heartbeat_interval.0),
    ] {
        if v == 0 {
            errs.push((
                p(&["settings", key]),
                format!("`{key}` must be at least 1 second"),
            ));
        }
    }
    Policy {
        clusters,
        nodes,
        cooldown: file.settings.cooldown.0,
        zone,
        power_off_timeout: file.settings.power_off_timeout.0,
        boot_timeout: file.settings.boot_timeout.0,
        heartbeat_interval: file.settings.heartbeat_interval.0,
        alert_webhook: file.settings.alert_webhook.clone(),
    }
}

/// A cluster's `health` keys make sense together.
fn check_health(
    h: &HealthSpec,
    at: &dyn Fn(&[&str]) -> Vec<String>,
    errs: &mut Vec<(Vec<String>, String)>,
) {
    if h.heartbeat_timeout.is_some_and(|t| t.0 == 0) {
        errs.push((
            at(&["health", "heartbeat_timeout"]),
            "`heartbeat_timeout` must be at least 1 second".into(),
        ));
    }
    if let Some(pr) = &h.probe {
        let pat = |k: &str| at(&["health", "probe", k]);
        if pr.port == 0 {
            errs.push((pat("port"), "probe port must be 1..65535".into()));
        }
        if pr.interval.0 == 0 || pr.timeout.0 == 0 {
            errs.push((
                pat("interval"),
                "probe `interval` and `timeout` must be at least 1 second".into(),
            ));
        }
        if pr.timeout.0 > pr.interval.0 {
            errs.push((
                pat("timeout"),
                format!(
                    "probe timeout {} s is longer than its interval {} s",
                    pr.timeout.0, pr.interval.0
                ),
            ));
        }
        if pr.failures == 0 {
            errs.push((
                pat("failures"),
                "probe `failures` must be at least 1".into(),
            ));
        }
        if pr.kind != ProbeKind::Tcp && !pr.path.starts_with('/') {
            errs.push((
                pat("path"),
                format!("probe path `{}` must start with /", pr.path),
            ));
        }
        if !(100..=599).contains(&pr.status) {
            errs.push((
                pat("status"),
                format!("{} is not an HTTP status", pr.status),
            ));
        }
    }
    for (i, r) in h.slow.iter().enumerate() {
        let rat = |k: &str| at(&["health", "slow", &i.to_string(), k]);
        if !HEALTH_METRICS.contains(&r.metric.as_str()) {
            let near = crate::config::diag::nearest(&r.metric, HEALTH_METRICS);
            errs.push((
                rat("metric"),
                match near {
                    Some(n) => format!("unknown metric `{}`, did you mean `{n}`?", r.metric),
                    None => format!(
                        "unknown metric `{}` (have: {})",
                        r.metric,
                        HEALTH_METRICS.join(", ")
                    ),
                },
            ));
        }
        if r.metric == "probe_ms" && h.probe.is_none() {
            errs.push((
                rat("metric"),
                "`probe_ms` needs a `probe` in the same health table".into(),
            ));
        }
        if r.above.is_some() == r.below.is_some() {
            errs.push((
                rat("metric"),
                "a slow rule needs exactly one of `above` or `below`".into(),
            ));
        }
    }
    if h.failover_attempts == 0 {
        errs.push((
            at(&["health", "failover_attempts"]),
            "`failover_attempts` must be at least 1".into(),
        ));
    }
}

/// Expands image links into one image name per slot (0..max).
pub fn link_table(links: &[ImageLink], max: u32) -> Result<Vec<String>, String> {
    if links.is_empty() {
        return Err("a cluster needs at least one image link".into());
    }
    let mut table: Vec<Option<String>> = vec![None; max as usize];
    let mut last = String::new();
    let mut next = 1u32; // 1-based member number for positional links
    for l in links {
        let (image, a, b) = match l {
            ImageLink::Name(n) => (n.clone(), next, next),
            ImageLink::Counted { image, nodes } => {
                let (a, b) = match nodes.split_once('-') {
                    Some((a, b)) => (a.trim().parse::<u32>(), b.trim().parse::<u32>()),
                    None => (nodes.trim().parse::<u32>(), nodes.trim().parse::<u32>()),
                };
                match (a, b) {
                    (Ok(a), Ok(b)) if a >= 1 && a <= b => (image.clone(), a, b),
                    _ => {
                        return Err(format!(
                            "`{nodes}` is not a node count or range like \"3-8\""
                        ))
                    }
                }
            }
        };
        for n in a..=b {
            if let Some(slot) = table.get_mut(n as usize - 1) {
                if slot.is_some() {
                    return Err(format!("node {n} has two image links"));
                }
                *slot = Some(image.clone());
            }
        }
        next = b + 1;
        last = image;
    }
    // The last link repeats; earlier gaps take the link before them.
    let mut fill = None;
    Ok(table
        .into_iter()
        .map(|s| {
            if s.is_some() {
                fill = s.clone();
            }
            s.or_else(|| fill.clone()).unwrap_or_else(|| last.clone())
        })
        .collect())
}

fn parse_offset(s: &str) -> Result<i32, String> {
    let bad = || format!("`{s}` is not a UTC offset like +01:00");
    let (sign, rest) = match s.chars().next() {
        Some('+') => (1, &s[1..]),
        Some('-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m))
}

/// `a.b.c.d-a.b.c.e` or CIDR → inclusive u32 range.
pub fn parse_range(s: &str) -> Result<(u32, u32), String> {
    if let Some((a, b)) = s.split_once('-') {
        let a: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        let b: Ipv4Addr = b
            .trim()
            .parse()
            .map_err(|_| format!("`{b}` is not an IPv4 address"))?;
        if u32::from(a) > u32::from(b) {
            return Err(format!("range {a}-{b} runs backwards"));
        }
        return Ok((a.into(), b.into()));
    }
    let (net, len) = crate::config::parse_cidr(s)?;
    let size = if len == 32 { 1 } else { 1u64 << (32 - len) };
    Ok((u32::from(net), (u32::from(net) as u64 + size - 1) as u32))
}

/// Renders a hostname pattern for one slot.
pub fn hostname(pattern: &str, cluster: &str, slot: u32) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let j = rest[i..]
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in hostname pattern `{pattern}`"))?
            + i;
        let inner = &rest[i + 1..j];
        let (name, width) = match inner.split_once(':') {
            Some((n, w)) => (
                n,
                w.trim_start_matches('0')
                    .parse::<usize>()
                    .map_err(|_| format!("bad width `{w}` in `{pattern}`"))?,
            ),
            None => (inner, 0),
        };
        match name {
            "cluster" => out.push_str(cluster),
            "slot" => out.push_str(&format!("{slot:0width$}")),
            "n" => out.push_str(&format!("{:0width$}", slot + 1)),
            other => {
                return Err(format!(
                    "unknown `{{{other}}}` in hostname pattern (use {{cluster}}, {{slot}}, {{n}})"
                ))
            }
        }
        rest = &rest[j + 1..];
    }
    out.push_str(rest);
    if out.is_empty()
        || out.len() > 63
        || !out.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || out.starts_with('-')
    {
        return Err(format!("`{out}` is not a valid hostname"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_image(_: &str, _: Option<&str>) -> bool {
        true
    }

    fn parse(text: &str) -> Result<Policy, Diagnostics> {
        Policy::parse(text, Path::new("policy.toml"), &|n, _| {
            ["a", "b", "c"].contains(&n)
        })
    }

    #[test]
    fn links_by_node_count() {
        let l = |v: &[&str]| {
            v.iter()
                .map(|s| ImageLink::Name(s.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            link_table(&l(&["a", "b"]), 4).unwrap(),
            ["a", "b", "b", "b"]
        );
        let counted = vec![
            ImageLink::Name("a".into()),
            ImageLink::Counted {
                image: "c".into(),
                nodes: "3-4".into(),
            },
            ImageLink::Name("b".into()),
        ];
        // Member 2 has no link: it takes the one before it; member 5 takes the positional `b`.
        assert_eq!(
            link_table(&counted, 6).unwrap(),
            ["a", "a", "c", "c", "b", "b"]
        );
        let clash = vec![
            ImageLink::Name("a".into()),
            ImageLink::Counted {
                image: "c".into(),
                nodes: "1".into(),
            },
        ];
        assert!(link_table(&clash, 2)
            .unwrap_err()
            .contains("two image links"));
    }

    #[test]
    fn identities_for_every_slot() {
        let pol = parse(
            "[[cluster]]\nname = \"web\"\nmax = 3\nimages = [\"a\"]\nidentity = { hostname = \"{cluster}-{n:02}\", addresses = \"10.0.1.10-10.0.1.20\" }\n",
        )
        .unwrap();
        let ids = &pol.clusters[0].identities;
        assert_eq!(ids.len(), 3);
        assert_eq!(
            ids[2],
            Identity {
                hostname: "web-03".into(),
                address: Some("10.0.1.12".parse().unwrap())
            }
        );
    }

    #[test]
    fn every_error_with_position() {
        let text = "\
[[cluster]]
name = \"web\"
min = 3
max = 2
images = [\"a\", \"zzz\"]
schedule = [{ cron = \"* 25 * * *\", count = 2 }]
identity = { hostname = \"web-{n}\", addresses = \"10.0.0.1-10.0.0.9\" }

[[cluster]]
name = \"db\"
max = 2
priorty = 3
images = [\"b\"]
identity = { hostname = \"db-{n}\", addresses = \"10.0.0.5-10.0.0.6\" }
";
        let e = parse(text).unwrap_err().to_string();
        for want in [
            "policy.toml:3:7: min 3 is above max 2",
            "policy.toml:5:10: image `zzz` does not exist",
            "policy.toml:6:22: hour: 25 is outside 0-23",
            "policy.toml:12:1: unknown key `priorty`, did you mean `priority`?",
        ] {
            assert!(e.contains(want), "missing {want:?} in\n{e}");
        }
        let text2 = text.replace("priorty = 3\n", "");
        let e = parse(&text2).unwrap_err().to_string();
        assert!(e.contains("addresses overlap with cluster `web`"), "{e}");
    }

    #[test]
    fn health_keys_are_checked_with_positions() {
        let text = "\
[settings]
alert_webhook = \"ftp://ops.example/hook\"

[[cluster]]
name = \"web\"
max = 2
images = [\"a\"]
[cluster.health]
heartbeat_timeout = \"0s\"
probe = { port = 80, path = \"health\", interval = \"2s\", timeout = \"5s\" }
slow = [{ metric = \"prob_ms\", above = 500.0, for = \"2m\" },
        { metric = \"load1\", for = \"1m\" }]
on_failure = \"quarantine\"
";
        let e = parse(text).unwrap_err().to_string();
        for want in [
            "policy.toml:2:17: webhook `ftp://ops.example/hook`: only http:// and https:// URLs are supported",
            "policy.toml:9:21: `heartbeat_timeout` must be at least 1 second",
            "probe timeout 5 s is longer than its interval 2 s",
            "probe path `health` must start with /",
            "unknown metric `prob_ms`, did you mean `probe_ms`?",
            "a slow rule needs exactly one of `above` or `below`",
        ] {
            assert!(e.contains(want), "missing {want:?} in\n{e}");
        }
        let fixed = "[[cluster]]\nname = \"w\"\nmax = 1\nimages = [\"a\"]\nidentity = { hostname = \"w-{n}\", addresses = \"10.0.0.1-10.0.0.1\" }\nhealth = { on_failure = \"quarantine\" }\n";
        let e = parse(fixed).unwrap_err().to_string();
        assert!(
            e.contains("policy.toml:6:") && e.contains("fixed addresses"),
            "{e}"
        );
        let bad_choice = "[[cluster]]\nname = \"w\"\nmax = 1\nimages = [\"a\"]\nhealth = { on_failure = \"reboot\" }\n";
        let e = parse(bad_choice).unwrap_err().to_string();
        assert!(e.contains("policy.toml:5:") && e.contains("reboot"), "{e}");
        // Defaults: no probe, heartbeat timeout from the interval, failed nodes back to the pool.
        let ok = parse("[[cluster]]\nname = \"w\"\nmax = 1\nimages = [\"a\"]\n").unwrap();
        assert!(
            ok.clusters[0].spec.health.is_none(),
            "not watched without a table"
        );
        let h = ok.clusters[0].spec.health();
        assert_eq!(
            (h.probe.is_none(), h.on_failure, h.failover_attempts),
            (true, OnFailure::Pool, 3)
        );
    }

    #[test]
    fn durations_and_offsets() {
        assert_eq!(parse_secs("90").unwrap(), 90);
        assert_eq!(parse_secs("5m").unwrap(), 300);
        assert_eq!(parse_secs("2h").unwrap(), 7200);
        assert!(parse_secs("soon").is_err());
        assert_eq!(parse_offset("-05:30").unwrap(), -330);
        assert!(parse_offset("01:00").is_err());
        let _ = any_image("a", None);
    }

    #[test]
    fn time_zones_by_name_with_positions() {
        let ok = parse("[settings]\ntimezone = \"America/New_York\"\n").unwrap();
        assert_eq!(ok.zone.to_string(), "America/New_York");
        // 2027-07-01 12:00 UTC is 08:00 EDT (-04:00); 2027-01-15 12:00 UTC is 07:00 EST (-05:00).
        assert_eq!(ok.zone.offset_at(1_814_443_200), -4 * 3600);
        assert_eq!(ok.zone.offset_at(1_800_014_400), -5 * 3600);
        assert_eq!(
            parse("[settings]\nutc_offset = \"+05:30\"\n").unwrap().zone,
            Zone::Fixed(330)
        );
        let e = parse("[settings]\ntimezone = \"Europe/Atlantis\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policy.toml:2:12: `Europe/Atlantis` is not a time zone"),
            "{e}"
        );
        for offset in ["+01:00", "+00:00"] {
            let e = parse(&format!(
                "[settings]\nutc_offset = \"{offset}\"\ntimezone = \"Europe/Paris\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("policy.toml:3:12: set `timezone` or `utc_offset`, not both"),
                "{offset}: {e}"
            );
        }
    }

    #[test]
    fn documented_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/policy.example.toml");
        let pol = Policy::load(&path, &|n, _| n == "testos").unwrap();
        let web = pol.cluster("web").unwrap();
        assert_eq!(web.slot_images[0], "testos");
        assert_eq!(web.identities[7].hostname, "web-08");
        assert_eq!(web.windows.len(), 1);
        assert_eq!(pol.nodes.len(), 1);
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname("{cluster}-{slot}", "db", 0).unwrap(), "db-0");
        assert_eq!(hostname("n{n:03}", "db", 4).unwrap(), "n005");
        assert!(hostname("{bogus}", "db", 0).is_err());
        assert!(hostname("bad_name", "db", 0).is_err());
    }
}
