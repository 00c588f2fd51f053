//! The controller's side of the disks: overlays prepared for every slot when a policy loads, and who may
//! open which NBD export.
//!
//! A slot's export `<cluster>/<slot>` may be opened only from an address of the node assigned to that
//! slot, as corral knows it (see [`super::trust`]): the slot identity's address, the address its DHCP
//! leased the node or (proxy mode) saw it ask for, its reservation — never because of an HTTP request.
//! A base `base/<name>` may be opened by nodes of the clusters built on it. Hosts in `nbd.admin_hosts`
//! may open everything. Every refusal is logged with peer and export.

use crate::events::EventKind;
use std::net::IpAddr;
use std::sync::Arc;

use super::Controller;
use crate::disk::Disk;
use crate::iscsi::login::Chap;
use crate::nbd::handshake::{Exports, Refusal};
use crate::nbd::ExportSource;
use crate::store::NewEvent;

/// What an export name refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Slot {
        cluster: String,
        slot: u32,
        base: String,
    },
    Base(String),
}

impl Controller {
    /// Creates missing overlays for every slot of every cluster with a disk, and the slots' NBD TLS keys;
    /// problems become events.
    pub(crate) fn prepare_disks(&self, now: u64) {
        let Some(policy) = self.state().policy.clone() else {
            return;
        };
        self.prepare_slot_psks(now);
        let (created, problems) = self.disks.prepare(&policy);
        if created > 0 {
            tracing::info!(created, "slot overlays created");
        }
        let events: Vec<NewEvent> = problems
            .into_iter()
            .map(|p| {
                tracing::error!("disk: {p}");
                NewEvent::new(now, EventKind::DiskError, p)
            })
            .collect();
        if !events.is_empty() {
            let _ = self.store.apply(&[], &events);
        }
    }

    pub fn disks(&self) -> &crate::disk::DiskSet {
        &self.disks
    }

    fn target(&self, export: &str) -> Option<Target> {
        let (head, tail) = export.split_once('/')?;
        let state = self.state();
        let policy = state.policy.as_ref()?;
        if head == "base" {
            return policy
                .clusters
                .iter()
                .any(|c| c.spec.disk.as_deref() == Some(tail))
                .then(|| Target::Base(tail.to_string()));
        }
        let slot: u32 = tail.parse().ok()?;
        let c = policy.cluster(head)?;
        let base = c.spec.disk.clone()?;
        (slot < c.spec.max).then(|| Target::Slot {
            cluster: head.to_string(),
            slot,
            base,
        })
    }

    fn is_admin(&self, peer: IpAddr) -> bool {
        self.state().config.nbd.admin_hosts.contains(&peer)
    }

    /// Whether `peer` may open `target`.
    fn may_open(&self, target: &Target, peer: IpAddr) -> bool {
        if self.is_admin(peer) {
            return true;
        }
        let (assignments, holds) = {
            let f = self.fleet();
            (f.state.assignments.clone(), f.holds.clone())
        };
        let state = self.state();
        match target {
            Target::Slot { cluster, slot, .. } => {
                // A node being moved keeps its old slot's disk until it is off; until then that disk
                // is its alone (fencing: two nodes never write one disk).
                let holder = holds
                    .iter()
                    .find(|(_, s)| &s.cluster == cluster && s.slot == *slot)
                    .map(|(mac, _)| *mac);
                let owner = || {
                    assignments
                        .iter()
                        .find(|(_, s)| &s.cluster == cluster && s.slot == *slot)
                        .map(|(mac, _)| *mac)
                };
                holder
                    .or_else(owner)
                    .is_some_and(|mac| self.node_addresses(mac).contains(peer))
            }
            Target::Base(base) => assignments.iter().any(|(mac, s)| {
                let on_base = state
                    .policy
                    .as_ref()
                    .and_then(|p| p.cluster(&s.cluster))
                    .is_some_and(|c| c.spec.disk.as_deref() == Some(base.as_str()));
                on_base && self.node_addresses(*mac).contains(peer)
            }),
        }
    }

    /// Every export name under the current policy.
    fn export_names(&self) -> Vec<(String, Target)> {
        let state = self.state();
        let Some(policy) = &state.policy else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bases = std::collections::BTreeSet::new();
        for c in &policy.clusters {
            let Some(base) = &c.spec.disk else { continue };
            bases.insert(base.clone());
            for slot in 0..c.spec.max {
                out.push((
                    format!("{}/{slot}", c.spec.name),
                    Target::Slot {
                        cluster: c.spec.name.clone(),
                        slot,
                        base: base.clone(),
                    },
                ));
            }
        }
        out.extend(
            bases
                .into_iter()
                .map(|b| (format!("base/{b}"), Target::Base(b))),
        );
        out
    }
}

/// The controller as the NBD room's judge of exports.
pub struct NodeDisks(pub Arc<Controller>);

struct PeerExports {
    controller: Arc<Controller>,
    peer: IpAddr,
}

impl Exports for PeerExports {
    fn list(&self) -> Vec<(String, String)> {
        self.controller
            .export_names()
            .into_iter()
            .filter(|(_, t)| self.controller.may_open(t, self.peer))
            .map(|(name, t)| {
                let what = match t {
                    Target::Slot { base, .. } => format!("slot disk over {base}"),
                    Target::Base(_) => "read-only base".to_string(),
                };
                (name, what)
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Disk>, Refusal> {
        let c = &self.controller;
        let Some(target) = c.target(name) else {
            tracing::warn!(peer = %self.peer, export = name, "nbd: refused unknown export");
            return Err(Refusal::Unknown);
        };
        if !c.may_open(&target, self.peer) {
            tracing::warn!(peer = %self.peer, export = name, "nbd: refused: not the node assigned to this disk");
            return Err(Refusal::Policy(format!(
                "{} may not open {name}: it is not the node assigned to it",
                self.peer
            )));
        }
        let opened: std::io::Result<Arc<dyn Disk>> = match &target {
            Target::Slot {
                cluster,
                slot,
                base,
            } => c
                .disks
                .slot(cluster, *slot, base)
                .map(|o| o as Arc<dyn Disk>),
            Target::Base(b) => c.disks.base(b).map(|b| b as Arc<dyn Disk>),
        };
        opened.map_err(|e| {
            tracing::error!(export = name, error = %e, "nbd: cannot open disk");
            Refusal::Broken(format!("{name}: {e}"))
        })
    }
}

impl ExportSource for NodeDisks {
    fn for_peer(&self, peer: IpAddr) -> Box<dyn Exports + Send> {
        Box::new(PeerExports {
            controller: self.0.clone(),
            peer,
        })
    }

    fn still_allowed(&self, export: &str, peer: IpAddr) -> bool {
        self.0
            .target(export)
            .is_some_and(|t| self.0.may_open(&t, peer))
    }

    fn psk(&self, identity: &str) -> Option<crate::nbd::server::Psk> {
        let (cluster, slot, p) = self.0.psk_by_identity(identity)?;
        Some(crate::nbd::server::Psk {
            export: format!("{cluster}/{slot}"),
            key: p.key_bytes()?,
        })
    }
}

impl NodeDisks {
    /// The export name (`cluster/slot`) an IQN names, if it is one of this corral's.
    fn export_of(&self, iqn: &str) -> Option<String> {
        let prefix = self.0.state().config.iscsi.iqn_prefix.clone();
        let rest = iqn.strip_prefix(&prefix)?.strip_prefix(':')?;
        let (cluster, slot) = rest.rsplit_once('.')?;
        slot.parse::<u32>().ok()?;
        Some(format!("{cluster}/{slot}"))
    }

    fn iqn_of(&self, export: &str) -> Option<String> {
        let (cluster, slot) = export.split_once('/')?;
        Some(self.0.state().config.iscsi.target_iqn(cluster, slot))
    }
}

/// The CHAP secrets of a slot's iSCSI target, from the credentials file: `["iscsi:<cluster>.<slot>"]`, else
/// `["iscsi:<cluster>"]` (user and password the initiator proves it knows); for mutual CHAP also
/// `["iscsi-target:<cluster>.<slot>"]` or `["iscsi-target:<cluster>"]` (what the target answers with).
/// `None`: the slot has no secrets and the address check alone guards it.
pub fn slot_chap(
    credentials: &crate::power::Credentials,
    cluster: &str,
    slot: &str,
) -> Option<Chap> {
    let find = |kind: &str| {
        credentials
            .get(&format!("{kind}:{cluster}.{slot}"))
            .or_else(|| credentials.get(&format!("{kind}:{cluster}")))
    };
    let initiator = find("iscsi")?;
    Some(Chap {
        user: initiator.user.clone(),
        secret: initiator.password.clone(),
        mutual: find("iscsi-target").map(|t| (t.user.clone(), t.password.clone())),
    })
}

/// A stable 64-bit NAA identifier (NAA 5 form, locally assigned) for a slot's disk.
fn naa_of(export: &str) -> u64 {
    // FNV-1a: stable across runs and releases (unlike the standard library's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in export.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0x5u64 << 60) | (h & 0x0FFF_FFFF_FFFF_FFFF)
}

impl crate::iscsi::TargetSource for NodeDisks {
    fn discover(&self, peer: IpAddr) -> Vec<(String, String)> {
        let c = &self.0;
        let state = c.state();
        let addr = format!(
            "{}:{},1",
            state.config.server.address,
            state.config.iscsi.listen.port()
        );
        c.export_names()
            .into_iter()
            .filter(|(_, t)| matches!(t, Target::Slot { .. }) && c.may_open(t, peer))
            .filter_map(|(name, _)| self.iqn_of(&name).map(|iqn| (iqn, addr.clone())))
            .collect()
    }

    fn admit(
        &self,
        iqn: &str,
        peer: IpAddr,
        _initiator: &str,
    ) -> Result<Option<Chap>, crate::iscsi::login::Refusal> {
        use crate::iscsi::login::Refusal;
        let export = self.export_of(iqn).ok_or(Refusal::NotFound)?;
        let target = self.0.target(&export).ok_or(Refusal::NotFound)?;
        if !matches!(target, Target::Slot { .. }) {
            return Err(Refusal::NotFound);
        }
        if !self.0.may_open(&target, peer) {
            tracing::warn!(%peer, iqn, "iscsi: refused: not the node assigned to this disk");
            return Err(Refusal::Forbidden);
        }
        let (cluster, slot) = export.split_once('/').ok_or(Refusal::NotFound)?;
        Ok(self.0.slot_chap(cluster, slot))
    }

    fn open(&self, iqn: &str, peer: IpAddr) -> Result<(Arc<dyn Disk>, String, u64), String> {
        let export = self.export_of(iqn).ok_or("unknown target")?;
        let exports = PeerExports {
            controller: self.0.clone(),
            peer,
        };
        let disk = exports
            .open(&export)
            .map_err(|e| format!("{export}: {e:?}"))?;
        let serial = export.replace('/', ".");
        Ok((disk, serial, naa_of(&export)))
    }

    fn still_allowed(&self, iqn: &str, peer: IpAddr) -> bool {
        self.export_of(iqn)
            .is_some_and(|e| crate::nbd::ExportSource::still_allowed(self, &e, peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::{Credentials, Secret};

    fn creds(entries: &[(&str, &str, &str)]) -> Credentials {
        Credentials::from_map(
            entries
                .iter()
                .map(|(k, u, p)| {
                    (
                        k.to_string(),
                        Secret {
                            user: u.to_string(),
                            password: p.to_string(),
                        },
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn chap_secrets_per_slot_then_per_cluster() {
        let c = creds(&[
            ("iscsi:db", "db", "cluster-secret-1"),
            ("iscsi:db.1", "db-1", "slot-secret-111"),
            ("iscsi-target:db", "corral", "target-secret-1"),
            ("bmc-1", "admin", "x"),
        ]);
        let s0 = slot_chap(&c, "db", "0").unwrap();
        assert_eq!(
            (s0.user.as_str(), s0.secret.as_str()),
            ("db", "cluster-secret-1")
        );
        assert_eq!(s0.mutual, Some(("corral".into(), "target-secret-1".into())));
        let s1 = slot_chap(&c, "db", "1").unwrap();
        assert_eq!(
            (s1.user.as_str(), s1.secret.as_str()),
            ("db-1", "slot-secret-111")
        );
        assert!(slot_chap(&c, "web", "0").is_none());
        assert!(c.check_iscsi().is_ok());
    }

    #[test]
    fn weak_or_shared_chap_secrets_are_refused() {
        let e = creds(&[("iscsi:db", "db", "short")])
            .check_iscsi()
            .unwrap_err();
        assert!(e.contains("[iscsi:db]") && e.contains("12 bytes"), "{e}");
        let e = creds(&[
            ("iscsi:db.0", "db", "same-secret-12"),
            ("iscsi-target:db.0", "corral", "same-secret-12"),
        ])
        .check_iscsi()
        .unwrap_err();
        assert!(e.contains("differ"), "{e}");
        // Other entries (BMC passwords) are not iSCSI's business.
        assert!(creds(&[("bmc", "admin", "x")]).check_iscsi().is_ok());
    }
}
