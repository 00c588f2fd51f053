//! The controller's side of "who is a node": DHCP sightings in, the addresses a node is known by out, and
//! the gates a script request passes before it gets anything (see [`super::trust`] for the rules, which
//! are sans IO and tested there). Also the generated CHAP secrets of sanboot slots and NBD TLS keys of
//! slots, and the retention of the inventory and the event log.
//!
//! Lock order: `identity` is taken before `fleet` (the known-node check inside a sighting reads the
//! fleet), never the other way round.

use crate::events::EventKind;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::trust::{self, KnownAddresses, NotDiscovered, PeerRate, Sightings};
use super::Controller;
use crate::dhcp::core::Sighting;
use crate::domain::Mac;
use crate::iscsi::login::Chap;
use crate::metrics::{write_counter, write_gauge, Counter};
use crate::store::{NewEvent, SlotPsk, SlotSecret};

/// MACs whose DHCP sightings are remembered (strangers beyond are forgotten, oldest first).
const SIGHTINGS_CAP: usize = 65_536;
/// Peers whose discovery rate is tracked at once.
const RATE_PEERS: usize = 4096;

pub struct Identity {
    pub(super) sightings: Sightings,
    rate: PeerRate,
    /// With `boot.trust_request_address`: the address each node's last script request came from.
    request: HashMap<Mac, IpAddr>,
    /// CHAP secrets generated for sanboot slots without operator-given ones, by `cluster.slot`.
    chap: HashMap<String, SlotSecret>,
    /// NBD TLS pre-shared keys of slots, by PSK identity, with the slot (`cluster`, `slot`) each opens.
    psk: HashMap<String, (String, u32, SlotPsk)>,
}

impl Identity {
    pub fn new(rate_per_peer: u32) -> Identity {
        Identity {
            sightings: Sightings::new(SIGHTINGS_CAP),
            rate: PeerRate::new(rate_per_peer, RATE_PEERS),
            request: HashMap::new(),
            chap: HashMap::new(),
            psk: HashMap::new(),
        }
    }
}

/// What the trust rules turned away, for /metrics.
#[derive(Default)]
pub struct TrustStats {
    pub sightings: Counter,
    pub scripts_refused: Counter,
    pub not_listed: Counter,
    pub too_many: Counter,
    pub rate_limited: Counter,
    pub nodes_pruned: Counter,
    pub events_pruned: Counter,
    pub tokens_refused: Counter,
}

impl Controller {
    #[track_caller]
    fn identity(&self) -> super::Part<'_, Identity> {
        self.part(|c| &c.identity, |c| &mut c.identity)
    }

    /// What corral's DHCP saw (called on the DHCP thread before its reply goes out: in memory only).
    pub fn dhcp_seen(&self, s: Sighting) {
        self.trust_stats.sightings.inc();
        let now = crate::unix_now();
        let known = |m: Mac| self.is_known(m);
        self.identity().sightings.observe(&s, now, &known);
    }

    /// Stored leases, at start: a node keeps its address across a restart of corral.
    pub(crate) fn restore_leases(&self) {
        let Ok(leases) = self.store.leases() else {
            return;
        };
        let mut id = self.identity();
        for l in leases {
            id.sightings.restore(l.mac, l.ip, l.expires);
        }
    }

    /// The boot `mac` is in as DHCP counts them; None when corral's DHCP has not seen it.
    pub fn dhcp_epoch(&self, mac: Mac) -> Option<u64> {
        self.identity().sightings.epoch(mac)
    }

    /// Whether corral knows `mac`: in the inventory, listed in the policy, or reserved.
    pub fn is_known(&self, mac: Mac) -> bool {
        self.is_listed(mac) || self.view().state.nodes.contains_key(&mac)
    }

    /// Whether the operator named `mac`: a policy `[[node]]` or a DHCP reservation.
    pub fn is_listed(&self, mac: Mac) -> bool {
        let state = self.state();
        state
            .policy
            .as_ref()
            .is_some_and(|p| p.nodes.contains_key(&mac))
            || reservation(&state.config, mac).is_some()
    }

    /// Every address `mac` is known by (see [`trust::KnownAddresses`]).
    pub fn node_addresses(&self, mac: Mac) -> KnownAddresses {
        let state = self.state();
        let now = crate::unix_now();
        let (dhcp, request) = {
            let id = self.identity();
            (
                id.sightings.address(mac, now),
                id.request
                    .get(&mac)
                    .copied()
                    .filter(|_| state.config.boot.trust_request_address),
            )
        };
        KnownAddresses {
            reservation: reservation(&state.config, mac),
            slot: self.slot_address(mac),
            dhcp,
            request,
        }
    }

    /// Whether a request from `peer` naming `mac` is the node's own. With `boot.trust_request_address`
    /// every request is (and its address is recorded as the node's).
    pub fn is_from_node(&self, mac: Mac, peer: IpAddr) -> bool {
        if self.state().config.boot.trust_request_address {
            let mut id = self.identity();
            if id.request.len() >= SIGHTINGS_CAP && !id.request.contains_key(&mac) {
                id.request.clear();
            }
            id.request.insert(mac, peer);
            return true;
        }
        self.node_addresses(mac).contains(peer)
    }

    /// Counts and logs a request that named a node it is not.
    pub fn refuse_foreign(&self, mac: Mac, peer: IpAddr, what: &str) {
        self.trust_stats.scripts_refused.inc();
        tracing::warn!(%mac, %peer, known = ?self.node_addresses(mac).list(), "refused {what}: not from the node's address");
    }

    /// Whether an unknown `mac` asking from `peer` (already found to be its address) joins the
    /// inventory; refusals are counted.
    pub fn may_discover(&self, mac: Mac, peer: IpAddr, now: u64) -> Result<(), NotDiscovered> {
        let cfg = self.state().config.discovery.clone();
        let listed = self.is_listed(mac);
        let unassigned = if listed {
            0
        } else {
            // Counted on the published view, without the fleet lock: only unknown nodes get here.
            let f = self.view();
            let policy = self.state().policy.clone();
            f.state
                .nodes
                .keys()
                .filter(|m| {
                    !f.state.assignments.contains_key(m)
                        && !policy.as_ref().is_some_and(|p| p.nodes.contains_key(m))
                })
                .count()
        };
        let rate_ok = listed || self.identity().rate.allow(peer, now);
        let r = trust::may_discover(cfg.allow, listed, unassigned, cfg.max_unassigned, rate_ok);
        if let Err(why) = r {
            match why {
                NotDiscovered::NotListed => self.trust_stats.not_listed.inc(),
                NotDiscovered::TooMany => self.trust_stats.too_many.inc(),
                NotDiscovered::RateLimited => self.trust_stats.rate_limited.inc(),
            }
            tracing::info!(%mac, %peer, why = why.as_str(), "node not discovered");
        }
        r
    }

    /// The CHAP secrets of a slot's target: the operator's (credentials file), else the ones corral
    /// generated for it (sanboot clusters), else none.
    pub fn slot_chap(&self, cluster: &str, slot: &str) -> Option<Chap> {
        let state = self.state();
        if let Some(c) = super::disks::slot_chap(&state.credentials, cluster, slot) {
            return Some(c);
        }
        let id = self.identity();
        let s = id.chap.get(&format!("{cluster}.{slot}"))?;
        Some(Chap {
            user: s.user.clone(),
            secret: s.secret.clone(),
            mutual: Some((s.target_user.clone(), s.target_secret.clone())),
        })
    }

    /// Generates (once, stored) CHAP and mutual-CHAP secrets for every slot of a cluster that sanboots
    /// and has none in the credentials file: its secrets reach iPXE in the node's script, so without them
    /// the address check would be the target's only guard.
    pub(crate) fn prepare_slot_secrets(&self, now: u64) {
        let state = self.state();
        let Some(policy) = state.policy.clone() else {
            return;
        };
        if !state.config.iscsi.enabled {
            return;
        }
        let stored: HashMap<String, SlotSecret> = self
            .store
            .slot_secrets()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut made = 0;
        let mut chap = HashMap::new();
        for c in &policy.clusters {
            let sanboot = c.slot_images.iter().any(|name| {
                state
                    .catalog
                    .get(name)
                    .is_some_and(|im| im.spec.kind == crate::boot::ImageKind::Sanboot)
            });
            if !sanboot || c.spec.disk.is_none() {
                continue;
            }
            for slot in 0..c.spec.max {
                let key = format!("{}.{slot}", c.spec.name);
                if super::disks::slot_chap(&state.credentials, &c.spec.name, &slot.to_string())
                    .is_some()
                {
                    continue;
                }
                let s = match stored.get(&key) {
                    Some(s) => s.clone(),
                    None => {
                        let s = SlotSecret {
                            user: format!("corral-{key}"),
                            secret: trust::random_hex(12),
                            target_user: "corral".into(),
                            target_secret: trust::random_hex(12),
                        };
                        if let Err(e) = self.store.put_slot_secret(&key, &s) {
                            tracing::error!(error = %e, slot = %key, "cannot store generated CHAP secrets");
                            continue;
                        }
                        made += 1;
                        s
                    }
                };
                chap.insert(key, s);
            }
        }
        self.identity().chap = chap;
        if made > 0 {
            let msg = format!("generated CHAP secrets for {made} sanboot slot(s) without any in the credentials file");
            tracing::info!("{msg}");
            let _ = self
                .store
                .apply(&[], &[NewEvent::new(now, EventKind::Secrets, msg)]);
        }
    }

    /// The NBD TLS key of a slot (generated by [`Self::prepare_slot_psks`]). Like CHAP secrets it may
    /// go only to the slot's own node: render it only after [`Self::is_from_node`].
    pub fn slot_psk(&self, cluster: &str, slot: &str) -> Option<SlotPsk> {
        let slot: u32 = slot.parse().ok()?;
        let id = self.identity();
        id.psk
            .values()
            .find(|(c, s, _)| c == cluster && *s == slot)
            .map(|(_, _, p)| p.clone())
    }

    /// The slot a PSK identity names and its key, for the NBD room's TLS handshake.
    pub fn psk_by_identity(&self, identity: &str) -> Option<(String, u32, SlotPsk)> {
        self.identity().psk.get(identity).cloned()
    }

    /// Generates (once, stored beside the CHAP secrets) an NBD TLS pre-shared key for every slot of every
    /// cluster with a disk, unless `nbd.tls` is off. The identity names the slot (`<cluster>-<slot>`):
    /// the TLS handshake picks the key by it, and the connection may then open only that slot's export.
    pub(crate) fn prepare_slot_psks(&self, now: u64) {
        let state = self.state();
        let Some(policy) = state.policy.clone() else {
            return;
        };
        if !state.config.nbd.enabled || state.config.nbd.tls == crate::config::NbdTls::Off {
            return;
        }
        drop(state);
        let stored: HashMap<String, SlotPsk> = self
            .store
            .slot_psks()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut made = 0;
        let mut psk = HashMap::new();
        for c in &policy.clusters {
            if c.spec.disk.is_none() {
                continue;
            }
            for slot in 0..c.spec.max {
                let key = format!("{}.{slot}", c.spec.name);
                let p = match stored.get(&key).filter(|p| p.key_bytes().is_some()) {
                    Some(p) => p.clone(),
                    None => {
                        let p = SlotPsk {
                            identity: format!("{}-{slot}", c.spec.name),
                            key: trust::random_hex(32),
                        };
                        if let Err(e) = self.store.put_slot_psk(&key, &p) {
                            tracing::error!(error = %e, slot = %key, "cannot store a generated NBD TLS key");
                            continue;
                        }
                        made += 1;
                        p
                    }
                };
                psk.insert(p.identity.clone(), (c.spec.name.clone(), slot, p));
            }
        }
        self.identity().psk = psk;
        if made > 0 {
            let msg = format!("generated NBD TLS keys for {made} slot(s)");
            tracing::info!("{msg}");
            let _ = self
                .store
                .apply(&[], &[NewEvent::new(now, EventKind::Secrets, msg)]);
        }
    }

    /// Prunes discovered nodes nobody took for `discovery.retention` (never assigned, not listed, not
    /// flagged, not moving) and events older than `server.event_retention`.
    pub fn prune(&self, now: u64) -> anyhow::Result<()> {
        let state = self.state();
        let retention = state.config.discovery.retention;
        let nodes = self.store.nodes()?;
        // With the planner held off (`work_io`): a plan under way may be assigning one of these nodes.
        let planner = self.work_io();
        let stale: Vec<Mac> = {
            let f = self.fleet();
            nodes
                .into_iter()
                .filter(|n| n.last_seen.saturating_add(retention) < now)
                .map(|n| n.mac)
                .filter(|m| {
                    !f.state.assignments.contains_key(m)
                        && !f.holds.contains_key(m)
                        && f.state
                            .nodes
                            .get(m)
                            .is_none_or(|n| n.last_moved.is_none() && n.healthy)
                })
                .collect()
        };
        let stale: Vec<Mac> = stale
            .into_iter()
            .filter(|m| !self.is_listed(*m) && !self.quarantined(*m))
            .collect();
        if !stale.is_empty() {
            self.store.forget_nodes(&stale)?;
            let mut f = self.fleet();
            for m in &stale {
                f.state.nodes.remove(m);
            }
            drop(f);
            let mut a = self.agents();
            for m in &stale {
                a.forget(*m);
            }
            drop(a);
            self.trust_stats.nodes_pruned.add(stale.len() as u64);
            let msg = format!(
                "{} discovered node(s) never assigned and not seen for {retention} s pruned",
                stale.len()
            );
            tracing::info!("{msg}");
            self.store
                .apply(&[], &[NewEvent::new(now, EventKind::Prune, msg)])?;
        }
        drop(planner);
        let before = now.saturating_sub(state.config.server.event_retention);
        let n = self.store.prune_events(before)?;
        self.trust_stats.events_pruned.add(n as u64);
        Ok(())
    }

    /// Prunes every `period` until the task is dropped.
    pub async fn run_retention(self: Arc<Self>, period: std::time::Duration) {
        super::every(period, "pruning the inventory and events", move || {
            self.prune(crate::unix_now())
        })
        .await
    }

    pub(crate) fn report_trust(&self, out: &mut String) {
        let s = &self.trust_stats;
        write_counter(
            out,
            "corral_dhcp_sightings_total",
            "What corral's DHCP told the controller about nodes (boots, addresses)",
            s.sightings.get(),
        );
        write_gauge(
            out,
            "corral_nodes_sighted",
            "MACs whose DHCP sightings are remembered",
            self.identity().sightings.len() as u64,
        );
        write_counter(
            out,
            "corral_http_scripts_refused_total",
            "Script requests naming a node they did not come from (no token, secrets or side effects)",
            s.scripts_refused.get(),
        );
        let _ = std::fmt::Write::write_fmt(
            out,
            format_args!(
                "# HELP corral_discovery_refused_total Unknown MACs not taken into the inventory, by reason\n# TYPE corral_discovery_refused_total counter\ncorral_discovery_refused_total{{why=\"not-listed\"}} {}\ncorral_discovery_refused_total{{why=\"too-many\"}} {}\ncorral_discovery_refused_total{{why=\"rate\"}} {}\n",
                s.not_listed.get(),
                s.too_many.get(),
                s.rate_limited.get()
            ),
        );
        write_counter(
            out,
            "corral_agent_tokens_refused_total",
            "Agent requests with an unknown token, or one of an earlier boot",
            s.tokens_refused.get(),
        );
        write_counter(
            out,
            "corral_nodes_pruned_total",
            "Discovered nodes pruned after discovery.retention without an assignment",
            s.nodes_pruned.get(),
        );
        write_counter(
            out,
            "corral_events_pruned_total",
            "Events older than server.event_retention deleted",
            s.events_pruned.get(),
        );
    }
}

/// The address reserved for `mac` in corral.toml.
pub fn reservation(cfg: &crate::config::Config, mac: Mac) -> Option<Ipv4Addr> {
    cfg.dhcp
        .reservation
        .iter()
        .find(|r| Mac::parse(&r.mac) == Some(mac))
        .map(|r| r.address)
}
