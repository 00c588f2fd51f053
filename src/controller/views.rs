//! What operators see: clusters and nodes as the API, the CLI and the dashboard show them.

use serde::Serialize;

use super::Controller;
use crate::domain::{Mac, NodeFacts};
use crate::policy::plan;

/// One cluster's sizes right now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterView {
    pub name: String,
    pub priority: i32,
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    pub current: u32,
    /// Fewer nodes than desired.
    pub short: bool,
    pub below_min: bool,
    pub preempt: bool,
    /// Nodes by slot.
    pub slots: Vec<SlotView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SlotView {
    pub slot: u32,
    pub node: Mac,
    pub image: String,
    pub hostname: String,
}

/// One node and its place.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeView {
    pub mac: Mac,
    /// `assigned`, `idle`, `moving` (being drained, switched off and on into its new role),
    /// `reboot-pending` (assigned elsewhere while still running its old role) or `failed`.
    pub state: &'static str,
    pub cluster: Option<String>,
    pub slot: Option<u32>,
    pub image: Option<String>,
    pub hostname: Option<String>,
    /// The slot's identity address, else the address the node last asked from.
    pub address: Option<String>,
    pub facts: NodeFacts,
    pub first_seen: Option<u64>,
    pub last_seen: Option<u64>,
    pub boot_count: u64,
    /// The last heartbeat of the node's agent (figures, busy flag, role).
    pub heartbeat: Option<super::agents::Beat>,
}

impl Controller {
    /// Clusters with their desired and current counts (empty without a policy).
    pub fn clusters_view(&self, now: u64) -> Vec<ClusterView> {
        let state = self.state();
        let Some(policy) = &state.policy else {
            return Vec::new();
        };
        let fleet = self.fleet_state();
        policy
            .clusters
            .iter()
            .map(|c| {
                let mut slots: Vec<SlotView> = fleet
                    .assignments
                    .iter()
                    .filter(|(_, s)| s.cluster == c.spec.name)
                    .map(|(m, s)| SlotView {
                        slot: s.slot,
                        node: *m,
                        image: c
                            .slot_images
                            .get(s.slot as usize)
                            .cloned()
                            .unwrap_or_default(),
                        hostname: c
                            .identities
                            .get(s.slot as usize)
                            .map(|i| i.hostname.clone())
                            .unwrap_or_default(),
                    })
                    .collect();
                slots.sort_by_key(|s| s.slot);
                let desired = plan::desired(c, &fleet, now, &policy.zone);
                let current = slots.len() as u32;
                ClusterView {
                    name: c.spec.name.clone(),
                    priority: c.spec.priority,
                    min: c.spec.min,
                    max: c.spec.max,
                    desired,
                    current,
                    short: current < desired,
                    below_min: current < c.spec.min,
                    preempt: c.spec.preempt,
                    slots,
                }
            })
            .collect()
    }

    /// Every node the inventory or the policy knows, with its place.
    pub fn nodes_view(&self) -> anyhow::Result<Vec<NodeView>> {
        self.flush()?;
        let state = self.state();
        let fleet = self.fleet_state();
        let pending = self.reboot_pending();
        let mut records: std::collections::BTreeMap<Mac, Option<crate::store::NodeRecord>> = self
            .store()
            .nodes()?
            .into_iter()
            .map(|r| (r.mac, Some(r)))
            .collect();
        for mac in fleet.nodes.keys() {
            records.entry(*mac).or_insert(None);
        }
        Ok(records
            .into_iter()
            .map(|(mac, rec)| {
                let slot = fleet.assignments.get(&mac);
                let cluster = slot.and_then(|s| state.policy.as_ref()?.cluster(&s.cluster));
                let identity = slot
                    .zip(cluster)
                    .and_then(|(s, c)| c.identities.get(s.slot as usize));
                let healthy = fleet.nodes.get(&mac).is_none_or(|n| n.healthy);
                let st = match (slot, healthy) {
                    (_, false) if self.quarantined(mac) => "quarantined",
                    (_, false) => "failed",
                    (_, _) if self.moving(mac) => "moving",
                    (Some(_), _) if pending.contains(&mac) => "reboot-pending",
                    (Some(_), _) => "assigned",
                    (None, _) => "idle",
                };
                let facts = rec.as_ref().map(|r| r.facts.clone()).unwrap_or_default();
                NodeView {
                    mac,
                    state: st,
                    cluster: slot.map(|s| s.cluster.clone()),
                    slot: slot.map(|s| s.slot),
                    image: slot
                        .zip(cluster)
                        .and_then(|(s, c)| c.slot_images.get(s.slot as usize).cloned()),
                    hostname: identity.map(|i| i.hostname.clone()),
                    address: identity
                        .and_then(|i| i.address.map(|a| a.to_string()))
                        .or_else(|| facts.ip.clone()),
                    first_seen: rec.as_ref().map(|r| r.first_seen),
                    last_seen: rec.as_ref().map(|r| r.last_seen),
                    boot_count: rec.as_ref().map(|r| r.boot_count).unwrap_or(0),
                    heartbeat: self.last_beat(mac),
                    facts,
                }
            })
            .collect())
    }
}

/// Cluster and node gauges for `/metrics`.
pub struct ControllerMetrics(pub std::sync::Arc<Controller>);

impl crate::metrics::Report for ControllerMetrics {
    fn report(&self, out: &mut String) {
        use std::fmt::Write;
        let clusters = self.0.clusters_view(crate::unix_now());
        if !clusters.is_empty() {
            let _ = writeln!(out, "# HELP corral_cluster_nodes Nodes per cluster: desired, current, min, max.\n# TYPE corral_cluster_nodes gauge");
            for c in &clusters {
                for (kind, v) in [
                    ("desired", c.desired),
                    ("current", c.current),
                    ("min", c.min),
                    ("max", c.max),
                ] {
                    let _ = writeln!(
                        out,
                        "corral_cluster_nodes{{cluster=\"{}\",kind=\"{kind}\"}} {v}",
                        c.name
                    );
                }
            }
        }
        let fleet = self.0.fleet_state();
        crate::metrics::write_gauge(
            out,
            "corral_nodes_known",
            "Nodes the planner knows",
            fleet.nodes.len() as u64,
        );
        crate::metrics::write_gauge(
            out,
            "corral_nodes_assigned",
            "Nodes filling a cluster slot",
            fleet.assignments.len() as u64,
        );
        crate::metrics::write_gauge(
            out,
            "corral_nodes_reboot_pending",
            "Nodes moved while running their old role",
            self.0.reboot_pending().len() as u64,
        );
        self.0.report_health(out);
        self.0.report_trust(out);
    }
}
