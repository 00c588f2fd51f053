//! The planner: a pure function from (policy, state, now) to actions. No I/O, no clock inside, so every
//! decision can be replayed in a test from a state and a time.
//!
//! Order of work, each step deterministic (sorted by priority, then name; nodes by size, then MAC):
//! 1. Assignments that no longer fit the policy (cluster gone, slot beyond max) are released.
//! 2. Desired count per cluster: a scale-rule target if one is set, else the first matching schedule
//!    window, else `default`; clamped to `[min, max]`.
//! 3. Clusters above desired release their highest slots, never a node that reports busy.
//! 4. Clusters below desired, highest priority first, fill their lowest empty slots: with the smallest idle
//!    compatible node (best fit), else — if the cluster may preempt — with a node of a lower-priority
//!    cluster that stays at or above its own min, is not busy (unless its cluster says `take_busy`), is
//!    inside one of its cluster's maintenance windows and was not moved within the cooldown
//!    (least utilised first, then lowest priority). A cluster still short raises an alert.
//!
//! Before 2, a slow node's slot (health verdict) is handed to a replacement that is not less capable in
//! any known fact, strictly more capable ones first: an idle node, else one preempted as in 4. Without one,
//! the slow node keeps its slot.
//!
//! Long because the planner is one pure function whose steps share its working state (`Fill`, `Pool`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::cron::Zone;
use super::{Cluster, Policy};
use crate::domain::Mac;
pub use crate::domain::SlotRef;

/// What the planner knows about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub mac: Mac,
    pub arch: Option<String>,
    pub cpus: Option<u32>,
    /// MiB.
    pub memory: Option<u64>,
    pub tags: BTreeSet<String>,
    /// The node (its agent) says its work must not be interrupted.
    pub busy: bool,
    /// 0.0 (idle) ..= 1.0 (saturated), from heartbeats.
    pub utilisation: f64,
    /// Failed or quarantined nodes get no work.
    pub healthy: bool,
    /// When the node last changed assignment (unix seconds).
    pub last_moved: Option<u64>,
}

impl NodeState {
    pub fn new(mac: Mac) -> NodeState {
        NodeState {
            mac,
            arch: None,
            cpus: None,
            memory: None,
            tags: BTreeSet::new(),
            busy: false,
            utilisation: 0.0,
            healthy: true,
            last_moved: None,
        }
    }
}

/// Everything the planner looks at.
///
/// The two big maps are persistent (`imbl`): a copy shares all of its tree with the original and only
/// the paths a change touches are copied. The controller plans a copy of the fleet taken under its lock,
/// and readers keep snapshots of it, so a copy must cost next to nothing at 5,000 nodes (a `BTreeMap`
/// copy of them took about as long as planning them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub nodes: imbl::OrdMap<Mac, NodeState>,
    /// Node → the slot it fills.
    pub assignments: imbl::OrdMap<Mac, SlotRef>,
    /// Desired counts set by scale rules (the health/metrics side computes them).
    pub scale_targets: BTreeMap<String, u32>,
    /// Nodes the health monitors found slow: their slot moves to a node at least as capable (more
    /// capable first, where facts tell) when one is free or may be preempted; otherwise they stay.
    pub slow: BTreeSet<Mac>,
    /// Slots no node is put in for now: several nodes in a row failed to boot into them (a broken image
    /// or disk; see `controller::failover::BootFailures`). A cluster fills other free slots instead.
    pub blocked: BTreeSet<SlotRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Alert {
    /// Fewer nodes than desired and none could be found.
    Short { desired: u32, current: u32 },
    /// Fewer nodes than the cluster's minimum.
    BelowMin { min: u32, current: u32 },
}

/// A decision.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Assign {
        node: Mac,
        to: SlotRef,
        image: String,
    },
    Release {
        node: Mac,
        from: SlotRef,
    },
    /// Release from a lower-priority cluster and assign to a higher one.
    Preempt {
        node: Mac,
        from: SlotRef,
        to: SlotRef,
        image: String,
    },
    Alert {
        cluster: String,
        alert: Alert,
    },
}

/// A cluster's count before scale rules: the first schedule window matching `now`, else its default.
pub fn base_count(c: &Cluster, now: u64, zone: &Zone) -> u32 {
    c.windows
        .iter()
        .find(|(cr, _)| cr.matches(now as i64, zone))
        .map(|(_, n)| *n)
        .unwrap_or(c.default)
}

/// Desired count of one cluster at `now`: a scale-rule target, else the base count; within [min, max].
pub fn desired(c: &Cluster, state: &State, now: u64, zone: &Zone) -> u32 {
    let base = state
        .scale_targets
        .get(&c.spec.name)
        .copied()
        .unwrap_or_else(|| base_count(c, now, zone));
    base.clamp(c.spec.min, c.spec.max)
}

/// Whether `n` meets the cluster's requirements.
pub fn compatible(c: &Cluster, n: &NodeState) -> bool {
    let r = &c.spec.requires;
    if !c.only_nodes.is_empty() && !c.only_nodes.contains(&n.mac) {
        return false;
    }
    if let Some(a) = &r.arch {
        match n.arch.as_deref() {
            Some(na) if na == a => {}
            // 32-bit iPXE (undionly) reports i386 on x86-64 hardware.
            Some("i386") if a == "x86_64" => {}
            _ => return false,
        }
    }
    if r.min_cpus.is_some_and(|m| n.cpus.is_none_or(|c| c < m)) {
        return false;
    }
    if r.min_memory
        .is_some_and(|m| n.memory.is_none_or(|mm| mm < m))
    {
        return false;
    }
    r.tags.iter().all(|t| n.tags.contains(t))
}

/// Best-fit order: the smallest node first, MAC as the tie-break.
fn size_key(n: &NodeState) -> (u32, u64, Mac) {
    (n.cpus.unwrap_or(0), n.memory.unwrap_or(0), n.mac)
}

/// Whether a node of cluster `c` may have its work taken away at `now`: it is not busy (or the cluster
/// lets busy nodes be taken) and one of the cluster's maintenance windows is open (or it has none).
pub fn may_take(c: &Cluster, n: &NodeState, now: u64, zone: &Zone) -> bool {
    (!n.busy || c.spec.drain.take_busy)
        && (c.maintenance.is_empty() || c.maintenance.iter().any(|cr| cr.matches(now as i64, zone)))
}

/// Known facts (CPUs, memory) that both nodes have, as (candidate, current) pairs.
fn known_facts(n: &NodeState, cur: &NodeState) -> Vec<(u64, u64)> {
    [
        (n.cpus.map(u64::from), cur.cpus.map(u64::from)),
        (n.memory, cur.memory),
    ]
    .into_iter()
    .filter_map(|(a, b)| Some((a?, b?)))
    .collect()
}

/// `n` has less of something than `cur`, as far as the facts tell.
fn less_capable(n: &NodeState, cur: &NodeState) -> bool {
    known_facts(n, cur).iter().any(|(a, b)| a < b)
}

/// `n` has at least as much of everything known and more of something.
fn more_capable(n: &NodeState, cur: &NodeState) -> bool {
    let f = known_facts(n, cur);
    !f.is_empty() && f.iter().all(|(a, b)| a >= b) && f.iter().any(|(a, b)| a > b)
}

fn in_cooldown(n: &NodeState, now: u64, cooldown: u64) -> bool {
    n.last_moved
        .is_some_and(|t| now < t.saturating_add(cooldown))
}

/// Plans the actions that bring `state` in line with `policy` at `now`.
pub fn plan(policy: &Policy, state: &State, now: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    let index: HashMap<&str, usize> = policy
        .clusters
        .iter()
        .enumerate()
        .map(|(i, c)| (c.spec.name.as_str(), i))
        .collect();
    // slots[c]: slot → node, for every cluster.
    let mut slots: Vec<BTreeMap<u32, Mac>> = vec![BTreeMap::new(); policy.clusters.len()];
    let mut assigned: HashMap<Mac, (usize, u32)> = HashMap::new();

    let node = |m: &Mac| state.nodes.get(m);
    let takeable = |c: &Cluster, m: &Mac| node(m).is_none_or(|n| may_take(c, n, now, &policy.zone));

    // 1. Assignments the policy no longer has room for, and failed nodes (their slot is refilled below,
    //    keeping its identity).
    for (mac, s) in &state.assignments {
        let healthy = node(mac).is_some_and(|n| n.healthy);
        match index.get(s.cluster.as_str()) {
            Some(&ci)
                if healthy
                    && s.slot < policy.clusters[ci].spec.max
                    && !slots[ci].contains_key(&s.slot) =>
            {
                slots[ci].insert(s.slot, *mac);
                assigned.insert(*mac, (ci, s.slot));
            }
            _ => actions.push(Action::Release {
                node: *mac,
                from: s.clone(),
            }),
        }
    }
    // 1b. Slow nodes hand their slot to a replacement when there is one.
    let mut replaced: HashSet<Mac> = HashSet::new();
    for mac in &state.slow {
        let Some(&(ci, slot)) = assigned.get(mac) else {
            continue;
        };
        let Some(cur) = node(mac) else { continue };
        let c = &policy.clusters[ci];
        let fits = |n: &NodeState| {
            n.healthy
                && n.mac != *mac
                && !state.slow.contains(&n.mac)
                && !replaced.contains(&n.mac)
                && compatible(c, n)
                && !less_capable(n, cur)
        };
        // Strictly more capable first, then best fit.
        let rank = |n: &NodeState| (!more_capable(n, cur), size_key(n));
        let idle = state
            .nodes
            .values()
            .filter(|n| fits(n) && !assigned.contains_key(&n.mac))
            .min_by_key(|n| rank(n));
        let victim = || {
            if !c.spec.preempt {
                return None;
            }
            assigned
                .iter()
                .filter_map(|(m, &(vi, vslot))| {
                    let v = &policy.clusters[vi];
                    let n = node(m)?;
                    let ok = fits(n)
                        && v.spec.priority < c.spec.priority
                        && slots[vi].len() > v.spec.min as usize
                        && may_take(v, n, now, &policy.zone)
                        && !in_cooldown(n, now, policy.cooldown);
                    ok.then_some((n, vi, vslot))
                })
                .min_by(|(a, _, _), (b, _, _)| {
                    rank(a)
                        .0
                        .cmp(&rank(b).0)
                        .then(a.utilisation.total_cmp(&b.utilisation))
                        .then_with(|| a.mac.cmp(&b.mac))
                })
        };
        let to = SlotRef {
            cluster: c.spec.name.clone(),
            slot,
        };
        let image = c.slot_images[slot as usize].clone();
        let (new, from) = match idle {
            Some(n) => (n.mac, None),
            None => match victim() {
                Some((n, vi, vslot)) => (n.mac, Some((vi, vslot))),
                None => continue,
            },
        };
        actions.push(Action::Release {
            node: *mac,
            from: to.clone(),
        });
        assigned.remove(mac);
        match from {
            None => actions.push(Action::Assign {
                node: new,
                to,
                image,
            }),
            Some((vi, vslot)) => {
                slots[vi].remove(&vslot);
                actions.push(Action::Preempt {
                    node: new,
                    from: SlotRef {
                        cluster: policy.clusters[vi].spec.name.clone(),
                        slot: vslot,
                    },
                    to,
                    image,
                });
            }
        }
        slots[ci].insert(slot, new);
        assigned.insert(new, (ci, slot));
        replaced.insert(new);
        replaced.insert(*mac);
    }

    // 2. Desired counts.
    let want: Vec<u32> = policy
        .clusters
        .iter()
        .map(|c| desired(c, state, now, &policy.zone))
        .collect();

    // 3. Scale down: highest slots first; busy nodes and nodes outside their maintenance windows stay.
    for (ci, c) in policy.clusters.iter().enumerate() {
        let mut excess = slots[ci].len().saturating_sub(want[ci] as usize);
        let highest: Vec<(u32, Mac)> = slots[ci].iter().rev().map(|(s, m)| (*s, *m)).collect();
        for (slot, mac) in highest {
            if excess == 0 {
                break;
            }
            if !takeable(c, &mac) {
                continue;
            }
            slots[ci].remove(&slot);
            assigned.remove(&mac);
            actions.push(Action::Release {
                node: mac,
                from: SlotRef {
                    cluster: c.spec.name.clone(),
                    slot,
                },
            });
            excess -= 1;
        }
    }

    // 4. Fill, highest priority first: idle nodes for every cluster, then preemption for the clusters still
    //    short, and again while preemption changed anything (a victim may refill from the idle pool, which
    //    can lift it above its min again).
    let mut order: Vec<usize> = (0..policy.clusters.len()).collect();
    order.sort_by(|&a, &b| {
        let (ca, cb) = (&policy.clusters[a].spec, &policy.clusters[b].spec);
        cb.priority
            .cmp(&ca.priority)
            .then_with(|| ca.name.cmp(&cb.name))
    });
    let short = (0..policy.clusters.len()).any(|ci| slots[ci].len() < want[ci] as usize);
    let mut pool = if short {
        Pool::new(state, &assigned, &replaced)
    } else {
        Pool::default()
    };
    let mut f = Fill {
        policy,
        state,
        now,
        slots,
        assigned,
        want,
        moved: replaced,
        actions,
    };
    // With nobody short there is nothing to hand out: skip building the pool.
    if short {
        loop {
            for &ci in &order {
                f.fill_from_idle(ci, &mut pool);
            }
            let mut preempted = false;
            for &ci in &order {
                preempted |= f.preempt(ci);
            }
            if !preempted {
                break;
            }
        }
    }
    for &ci in &order {
        let c = &policy.clusters[ci];
        let current = f.slots[ci].len() as u32;
        if current < f.want[ci] {
            let alert = Alert::Short {
                desired: f.want[ci],
                current,
            };
            f.actions.push(Action::Alert {
                cluster: c.spec.name.clone(),
                alert,
            });
        }
        if current < c.spec.min {
            let alert = Alert::BelowMin {
                min: c.spec.min,
                current,
            };
            f.actions.push(Action::Alert {
                cluster: c.spec.name.clone(),
                alert,
            });
        }
    }
    f.actions
}

/// The planner's working state while it fills clusters.
struct Fill<'a> {
    policy: &'a Policy,
    state: &'a State,
    now: u64,
    /// Per cluster: slot → node.
    slots: Vec<BTreeMap<u32, Mac>>,
    /// Node → (cluster index, slot).
    assigned: HashMap<Mac, (usize, u32)>,
    want: Vec<u32>,
    /// Nodes that changed place in this plan: none moves twice.
    moved: HashSet<Mac>,
    actions: Vec<Action>,
}

impl Fill<'_> {
    fn deficit(&self, ci: usize) -> usize {
        (self.want[ci] as usize).saturating_sub(self.slots[ci].len())
    }

    fn lowest_free_slot(&self, ci: usize) -> Option<u32> {
        let name = &self.policy.clusters[ci].spec.name;
        let blocked = |s: u32| {
            !self.state.blocked.is_empty()
                && self.state.blocked.contains(&SlotRef {
                    cluster: name.clone(),
                    slot: s,
                })
        };
        (0..self.policy.clusters[ci].spec.max)
            .find(|s| !self.slots[ci].contains_key(s) && !blocked(*s))
    }

    fn place(&mut self, ci: usize, slot: u32, mac: Mac) -> SlotRef {
        self.slots[ci].insert(slot, mac);
        self.assigned.insert(mac, (ci, slot));
        self.moved.insert(mac);
        SlotRef {
            cluster: self.policy.clusters[ci].spec.name.clone(),
            slot,
        }
    }

    /// Fills the cluster's lowest empty slots with the smallest idle compatible nodes.
    fn fill_from_idle(&mut self, ci: usize, pool: &mut Pool<'_>) {
        let c = &self.policy.clusters[ci];
        while self.deficit(ci) > 0 {
            let Some(slot) = self.lowest_free_slot(ci) else {
                return;
            };
            let Some(n) = pool.take(c) else { return };
            let to = self.place(ci, slot, n.mac);
            let image = c.slot_images[slot as usize].clone();
            self.actions.push(Action::Assign {
                node: n.mac,
                to,
                image,
            });
        }
    }

    /// Takes nodes from lower-priority clusters while short; returns whether any was taken.
    fn preempt(&mut self, ci: usize) -> bool {
        let (policy, now) = (self.policy, self.now);
        let c = &policy.clusters[ci];
        let mut any = false;
        while self.deficit(ci) > 0 && c.spec.preempt {
            let victim = self
                .assigned
                .iter()
                .filter_map(|(mac, &(vi, vslot))| {
                    let v = &policy.clusters[vi];
                    let n = self.state.nodes.get(mac)?;
                    let ok = v.spec.priority < c.spec.priority
                        && self.slots[vi].len() > v.spec.min as usize
                        && may_take(v, n, now, &policy.zone)
                        && n.healthy
                        && !self.moved.contains(mac)
                        && !in_cooldown(n, now, policy.cooldown)
                        && compatible(c, n);
                    ok.then_some((n, vi, vslot))
                })
                .min_by(|(a, ai, _), (b, bi, _)| {
                    a.utilisation
                        .total_cmp(&b.utilisation)
                        .then_with(|| {
                            policy.clusters[*ai]
                                .spec
                                .priority
                                .cmp(&policy.clusters[*bi].spec.priority)
                        })
                        .then_with(|| a.mac.cmp(&b.mac))
                });
            let Some((n, vi, vslot)) = victim else { break };
            let Some(slot) = self.lowest_free_slot(ci) else {
                break;
            };
            let mac = n.mac;
            self.slots[vi].remove(&vslot);
            let from = SlotRef {
                cluster: policy.clusters[vi].spec.name.clone(),
                slot: vslot,
            };
            let to = self.place(ci, slot, mac);
            let image = c.slot_images[slot as usize].clone();
            self.actions.push(Action::Preempt {
                node: mac,
                from,
                to,
                image,
            });
            any = true;
        }
        any
    }
}

/// Idle nodes in best-fit order. Each distinct requirement gets its own list of compatible nodes, built on
/// first use, with a cursor that only moves forward past nodes already handed out: filling 200 clusters
/// from 10,000 nodes costs one pass per distinct requirement, not one per cluster.
#[derive(Default)]
struct Pool<'a> {
    nodes: Vec<&'a NodeState>,
    taken: Vec<bool>,
    lists: HashMap<String, (Vec<usize>, usize)>,
}

impl<'a> Pool<'a> {
    /// Healthy, unassigned nodes that did not just change place (a slow node just replaced waits for
    /// the next plan).
    fn new(
        state: &'a State,
        assigned: &HashMap<Mac, (usize, u32)>,
        moved: &HashSet<Mac>,
    ) -> Pool<'a> {
        let mut nodes: Vec<&NodeState> = state
            .nodes
            .values()
            .filter(|n| n.healthy && !assigned.contains_key(&n.mac) && !moved.contains(&n.mac))
            .collect();
        nodes.sort_by_key(|n| size_key(n));
        let taken = vec![false; nodes.len()];
        Pool {
            nodes,
            taken,
            lists: HashMap::new(),
        }
    }

    fn take(&mut self, c: &Cluster) -> Option<&'a NodeState> {
        let key = format!("{:?}|{:?}", c.spec.requires, c.only_nodes);
        let nodes = &self.nodes;
        let (list, cursor) = self.lists.entry(key).or_insert_with(|| {
            (
                (0..nodes.len())
                    .filter(|&i| compatible(c, nodes[i]))
                    .collect(),
                0,
            )
        });
        while *cursor < list.len() && self.taken[list[*cursor]] {
            *cursor += 1;
        }
        let i = *list.get(*cursor)?;
        self.taken[i] = true;
        Some(self.nodes[i])
    }
}

/// The state after `actions` are carried out at `now` (moved nodes get `last_moved = now`).
pub fn apply(state: &State, actions: &[Action], now: u64) -> State {
    let mut s = state.clone();
    apply_to(&mut s, actions, now);
    s
}

/// [`apply`] in place: for a caller that owns the state, a 5,000-node fleet is not copied.
pub fn apply_to(s: &mut State, actions: &[Action], now: u64) {
    let touch = |s: &mut State, m: &Mac| {
        if let Some(n) = s.nodes.get_mut(m) {
            n.last_moved = Some(now);
        }
    };
    for a in actions {
        match a {
            Action::Assign { node, to, .. } | Action::Preempt { node, to, .. } => {
                s.assignments.insert(*node, to.clone());
                touch(s, node);
            }
            Action::Release { node, .. } => {
                s.assignments.remove(node);
                touch(s, node);
            }
            Action::Alert { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests;
