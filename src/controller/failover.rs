//! Failing a slot over, as a state machine with no I/O and no clock inside, beside [`super::moves`].
//!
//! [`Failovers`] holds every running failover (one per slot) and each slot's recent history. The shell
//! ([`super::health`]) feeds it [`Input`]s: a verdict on a node, the planner's answer for a slow node, a
//! look at each slot a few times a second ([`SlotView`]), a fence that ended. It gets back [`Output`]s
//! (events, alerts, disk holds, fences, wake-ups, re-plans) and carries them out after it lets go of its
//! lock, in the order given: the order is part of the contract (a hold is in place before the node is
//! marked failed, so no plan in between can hand the slot's disk over early).
//!
//! The paths, each unit-tested below:
//! - **failed**: the node leaves its slot; under `on_failure = "pool"` it keeps the slot's disk until it is
//!   fenced (switched off, export closed), under `"quarantine"` it is cut off at once and left running.
//!   The planner picks a replacement; it is woken, given `boot_timeout` from the moment it may boot, and
//!   confirmed by a heartbeat (and probe) in the slot. One that does not come up is failed and fenced in
//!   its turn and another is tried, up to `failover_attempts`; then an alert.
//! - **slow**: the slot moves only if the planner finds a node at least as capable; otherwise the node
//!   stays (said once, looked at again after [`SLOW_RETRY_MS`], then after twice as long each time).
//! - **no replacement**: an alert, once; the failover stays open and the planner keeps trying.
//! - **churn**: a slot failing over more than `failover_attempts` times within [`CHURN_WINDOW_MS`] raises
//!   one alert (until its history thins out), and a slow slot that churned stays where it is.
//! - **gone**: a slot no longer wanted, or held again by its old node (released and chosen anew), ends its
//!   failover silently.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::domain::{Mac, SlotRef};
use crate::events::EventKind;
use crate::policy::OnFailure;

/// The window in which a slot's failovers are counted against `failover_attempts`.
pub const CHURN_WINDOW_MS: u64 = 10 * 60 * 1000;
/// How soon a slow node without a replacement is first looked at again; each further look that finds
/// none waits twice as long, up to [`SLOW_RETRY_MAX_MS`]. Every look is a whole plan, so a fixed period
/// made each long slow spell on a full farm a plan every few seconds (the simulator's "replan storm":
/// 16,776 of 27,773 plans in a 1,000-node month); doubling makes a three-hour spell cost about 25.
pub const SLOW_RETRY_MS: u64 = 10_000;
/// The longest a slow node without a replacement waits between looks.
pub const SLOW_RETRY_MAX_MS: u64 = 10 * 60 * 1000;
/// After a fence ends a node's hold, its NBD connections are closed within a second (the NBD room
/// re-checks each connection's right to its export every second): the replacement waits this long more.
pub const FENCE_SETTLE_MS: u64 = 1500;

/// The cluster's rules for a failover, read from the policy by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub on_failure: OnFailure,
    pub attempts: u32,
    pub boot_timeout_ms: u64,
}

/// One slot being failed over. Stored as JSON (`store::work`) so a restart follows it again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failover {
    pub old: Mac,
    pub slow: bool,
    pub reason: String,
    /// Unix ms of the failure as best known (the last heartbeat, for heartbeat loss).
    pub failed_ms: u64,
    pub detected_ms: u64,
    /// The replacement being tried and since when (unix ms).
    pub new: Option<(Mac, u64)>,
    pub attempts: u32,
    /// Server-side work so far (deciding, fencing calls, planning).
    pub server: Duration,
    pub alerted: bool,
}

impl Failover {
    /// A failover of `old`'s slot detected at `now`, for a failure that began at `failed_ms`.
    pub fn begin(old: Mac, slow: bool, reason: String, failed_ms: u64, now: u64) -> Failover {
        Failover {
            old,
            slow,
            reason,
            failed_ms,
            detected_ms: now,
            new: None,
            attempts: 0,
            server: Duration::ZERO,
            alerted: false,
        }
    }
}

/// What the shell sees of a slot under failover when it looks (a few times a second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotView {
    /// The slot is still wanted (its cluster exists and wants at least that many nodes now).
    pub wanted: bool,
    /// The node the slot is assigned to now.
    pub owner: Option<Mac>,
    /// The owner may boot into the slot (no hold on its disk, no fence settling).
    pub bootable: bool,
    /// The owner heartbeats in the slot and, with a probe, answers it.
    pub confirmed: bool,
    /// The owner is being moved (drained, restarted) by the mover.
    pub moving: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A node's monitor says it failed.
    Failed {
        mac: Mac,
        slot: SlotRef,
        reason: String,
        began_ms: u64,
        rules: Rules,
    },
    /// A node's monitor says it is slow.
    Slow {
        mac: Mac,
        slot: SlotRef,
        reason: String,
        began_ms: u64,
        rules: Rules,
    },
    /// The planner's answer to [`Output::PlanSlow`]: whether the slow node lost its slot.
    SlowPlanned {
        mac: Mac,
        slot: SlotRef,
        reason: String,
        began_ms: u64,
        moved: bool,
    },
    /// A look at a slot under failover.
    Look {
        slot: SlotRef,
        view: SlotView,
        rules: Rules,
    },
    /// A fence of `mac` ended: `off` when the node was switched off; `fixed_address` when the slot's
    /// identity has a fixed address (closing the export alone does not fence a node that shares it).
    Fenced {
        mac: Mac,
        slot: SlotRef,
        off: bool,
        how: String,
        fixed_address: bool,
        /// How long the fencing calls took.
        took: Duration,
    },
    /// Server-side work spent on a slot's failover outside the machine (a fencing call, planning).
    Worked { slot: SlotRef, took: Duration },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Record an event; `secs` is the duration it carries.
    Event {
        kind: EventKind,
        mac: Mac,
        cluster: String,
        message: String,
        secs: Option<f64>,
    },
    /// Raise an alert (event, log, webhook).
    Alert {
        mac: Mac,
        cluster: String,
        message: String,
    },
    /// Stop watching the node (it left its role).
    Unwatch(Mac),
    /// The node keeps the slot's disk until it is fenced.
    Hold {
        mac: Mac,
        slot: SlotRef,
    },
    /// The node's hold ends (its export closes).
    Release {
        mac: Mac,
    },
    /// The slot's next node may not boot before `until_ms`.
    Settle {
        slot: SlotRef,
        until_ms: u64,
    },
    /// Take the node out of service, remembered across restarts.
    MarkFailed {
        mac: Mac,
        quarantine: bool,
        reason: String,
    },
    /// Switch the node off hard (or have its agent restart it), then feed back [`Input::Fenced`].
    Fence {
        mac: Mac,
        slot: SlotRef,
    },
    /// After a fence: switch the node on again so it rejoins the pool.
    Restart {
        mac: Mac,
        cluster: String,
    },
    /// Make sure the replacement runs (switch it on if it is off).
    Wake(Mac),
    /// Run the planner.
    Plan,
    /// Run the planner with `mac` counted as slow, then feed back [`Input::SlowPlanned`] (with the
    /// reason and start given here).
    PlanSlow {
        mac: Mac,
        slot: SlotRef,
        reason: String,
        began_ms: u64,
    },
    /// Count for `/metrics`: a failover began / was confirmed.
    Began,
    Done,
}

/// Who fills each slot, for the fleet's assignments as last seen: the shells look up the owner of every
/// slot under failover on every tick, and a scan of all assignments per slot per tick was what a long
/// simulation spent its time on. Rebuilt only when the assignments changed (the planner's persistent map
/// is compared by its root: any change gives it a new one), which is once per plan at most.
#[derive(Debug, Default, Clone)]
pub struct SlotOwners {
    seen: Option<imbl::OrdMap<Mac, SlotRef>>,
    by_slot: std::collections::HashMap<SlotRef, Mac>,
    filled: std::collections::HashMap<String, u32>,
}

impl SlotOwners {
    fn refresh(&mut self, assignments: &imbl::OrdMap<Mac, SlotRef>) {
        if !self.seen.as_ref().is_some_and(|s| s.ptr_eq(assignments)) {
            self.by_slot = assignments.iter().map(|(m, s)| (s.clone(), *m)).collect();
            self.filled.clear();
            for s in assignments.values() {
                *self.filled.entry(s.cluster.clone()).or_default() += 1;
            }
            self.seen = Some(assignments.clone());
        }
    }

    /// The node `slot` is assigned to in `assignments`.
    pub fn owner(
        &mut self,
        assignments: &imbl::OrdMap<Mac, SlotRef>,
        slot: &SlotRef,
    ) -> Option<Mac> {
        self.refresh(assignments);
        self.by_slot.get(slot).copied()
    }

    /// Whether a slot under failover is still wanted, by the planner's rule: a slot below the cluster's
    /// desired count is, while it has a node; an empty one only while the cluster has fewer nodes than
    /// desired. (The planner fills to a count: when a slot above the desired count could not be
    /// released yet, say its node is busy, it stands in for the empty one, and nobody is coming for
    /// that slot; saying "no eligible node" then would be an alert with no truth in it.)
    pub fn wanted(
        &mut self,
        assignments: &imbl::OrdMap<Mac, SlotRef>,
        slot: &SlotRef,
        desired: u32,
    ) -> bool {
        self.refresh(assignments);
        slot.slot < desired
            && (self.by_slot.contains_key(slot)
                || self.filled.get(&slot.cluster).copied().unwrap_or(0) < desired)
    }
}

/// How long a slot stays blocked after nodes failed to boot into it (see [`BootFailures`]).
pub const SLOT_BLOCK_MS: u64 = 30 * 60 * 1000;

/// Nodes that failed to come up in a slot they were moved into ("no sign of the node after power-on"),
/// per slot. One such failure is the node's; several different nodes in a row, within
/// [`CHURN_WINDOW_MS`], are the slot's (its image or disk does not boot): the slot is blocked for
/// [`SLOT_BLOCK_MS`], or until the policy is reloaded, so that the planner stops handing it node after
/// node. Without this a slot nobody can boot into takes the whole pool, one failed node every boot
/// timeout, each switched off and marked failed (the simulator showed half a farm lost that way).
#[derive(Debug, Default, Clone)]
pub struct BootFailures {
    recent: BTreeMap<SlotRef, Vec<(Mac, u64)>>,
    blocked: BTreeMap<SlotRef, u64>,
}

impl BootFailures {
    /// `mac` failed to come up in `slot` at `now`; returns whether that blocks the slot (`limit`
    /// different nodes within the window, the cluster's failover attempts).
    pub fn failed(&mut self, slot: &SlotRef, mac: Mac, now: u64, limit: u32) -> bool {
        if self.blocked.contains_key(slot) {
            return false;
        }
        let list = self.recent.entry(slot.clone()).or_default();
        list.retain(|(m, t)| now.saturating_sub(*t) < CHURN_WINDOW_MS && *m != mac);
        list.push((mac, now));
        if list.len() >= limit.max(1) as usize {
            self.recent.remove(slot);
            self.blocked.insert(slot.clone(), now + SLOT_BLOCK_MS);
            return true;
        }
        false
    }

    /// Slots whose block ran out by `now` (they are unblocked).
    pub fn expire(&mut self, now: u64) -> Vec<SlotRef> {
        let done: Vec<SlotRef> = self
            .blocked
            .iter()
            .filter(|(_, until)| now >= **until)
            .map(|(s, _)| s.clone())
            .collect();
        for s in &done {
            self.blocked.remove(s);
        }
        self.recent.retain(|_, l| {
            l.retain(|(_, t)| now.saturating_sub(*t) < CHURN_WINDOW_MS);
            !l.is_empty()
        });
        done
    }

    /// Unblocks every slot (a policy reload: the image may be fixed); returns them.
    pub fn clear(&mut self) -> Vec<SlotRef> {
        self.recent.clear();
        std::mem::take(&mut self.blocked).into_keys().collect()
    }

    pub fn is_blocked(&self, slot: &SlotRef) -> bool {
        self.blocked.contains_key(slot)
    }
}

/// A slow node left where it is: when it is looked at next, and how long the last wait was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlowStay {
    next_ms: u64,
    wait_ms: u64,
}

/// Every running failover, each slot's recent failovers, and the slow nodes left where they are.
#[derive(Debug, Default, Clone)]
pub struct Failovers {
    running: BTreeMap<SlotRef, Failover>,
    /// When each slot failed over lately (unix ms), to bound failovers of a slot whose new nodes fail too.
    history: BTreeMap<SlotRef, Vec<u64>>,
    /// Slots already alerted for failing over too often (until their history thins out).
    churn_alerted: BTreeSet<SlotRef>,
    /// Slow nodes no replacement was found for (the event is recorded once), with when to look again.
    slow_stay: BTreeMap<Mac, SlowStay>,
}

impl Failovers {
    /// The running failovers, by slot.
    pub fn running(&self) -> &BTreeMap<SlotRef, Failover> {
        &self.running
    }

    /// Whether `mac` is the failed node of a running failover of `slot`.
    pub fn failing(&self, mac: Mac, slot: &SlotRef) -> bool {
        self.running.get(slot).is_some_and(|f| f.old == mac)
    }

    /// Takes a failover back (from the store at start); a running one for the slot is kept.
    pub fn restore(&mut self, slot: SlotRef, f: Failover) {
        self.running.entry(slot).or_insert(f);
    }

    /// Whether a slow verdict on `mac` should be acted on now (not while it waits to be looked at again).
    pub fn slow_due(&self, mac: Mac, now: u64) -> bool {
        self.slow_stay.get(&mac).is_none_or(|s| now >= s.next_ms)
    }

    /// The node's monitor has no verdict: a slow node that stayed is forgotten (it may be said again).
    pub fn cleared(&mut self, mac: Mac) {
        self.slow_stay.remove(&mac);
    }

    pub fn on(&mut self, input: Input, now: u64) -> Vec<Output> {
        match input {
            Input::Failed {
                mac,
                slot,
                reason,
                began_ms,
                rules,
            } => self.failed(mac, slot, reason, began_ms, rules, now),
            Input::Slow {
                mac,
                slot,
                reason,
                began_ms,
                rules,
            } => {
                if self.running.contains_key(&slot) {
                    return vec![];
                }
                let limit = rules.attempts as usize;
                if self.recent(&slot, now) >= limit {
                    let why = format!(
                        "{reason}) but the slot already failed over {limit} times within {} min",
                        CHURN_WINDOW_MS / 60_000
                    );
                    return self.slow_stays(mac, &slot, &why, now);
                }
                vec![Output::PlanSlow {
                    mac,
                    slot,
                    reason,
                    began_ms,
                }]
            }
            Input::SlowPlanned {
                mac,
                slot,
                reason,
                began_ms,
                moved,
            } => {
                if !moved {
                    let why = format!("{reason}) but no more capable node is free");
                    return self.slow_stays(mac, &slot, &why, now);
                }
                self.record(&slot, now);
                self.slow_stay.remove(&mac);
                let message = format!(
                    "{mac} in {}/{} is slow: {reason}; its slot moves to another node and it returns to the pool",
                    slot.cluster, slot.slot
                );
                let out = vec![
                    Output::Began,
                    Output::Event {
                        kind: EventKind::HealthSlow,
                        mac,
                        cluster: slot.cluster.clone(),
                        message,
                        secs: None,
                    },
                    Output::Unwatch(mac),
                ];
                self.running
                    .insert(slot, Failover::begin(mac, true, reason, began_ms, now));
                out
            }
            Input::Look { slot, view, rules } => self.look(slot, view, rules, now),
            Input::Fenced {
                mac,
                slot,
                off,
                how,
                fixed_address,
                took,
            } => {
                if let Some(f) = self.running.get_mut(&slot) {
                    f.server += took;
                }
                // Closing its export fences a node that may still run, since the slot's next node has
                // another address; with a fixed slot address it would not, so the slot stays held.
                if !off && fixed_address {
                    return vec![Output::Alert {
                        mac,
                        cluster: slot.cluster.clone(),
                        message: format!(
                            "{mac} cannot be fenced ({how}) and shares {}/{}'s fixed address: the slot stays held until it boots again or is released",
                            slot.cluster, slot.slot
                        ),
                    }];
                }
                let message = format!(
                    "{mac} fenced from {}/{}: {how}; its disk export is closed",
                    slot.cluster, slot.slot
                );
                let mut out = vec![
                    // Settling first, so the replacement never sees neither.
                    Output::Settle {
                        slot: slot.clone(),
                        until_ms: now + FENCE_SETTLE_MS,
                    },
                    Output::Release { mac },
                    Output::Event {
                        kind: EventKind::Fence,
                        mac,
                        cluster: slot.cluster.clone(),
                        message,
                        secs: Some(took.as_secs_f64()),
                    },
                ];
                if off {
                    out.push(Output::Restart {
                        mac,
                        cluster: slot.cluster,
                    });
                }
                out
            }
            Input::Worked { slot, took } => {
                if let Some(f) = self.running.get_mut(&slot) {
                    f.server += took;
                }
                vec![]
            }
        }
    }

    fn failed(
        &mut self,
        mac: Mac,
        slot: SlotRef,
        reason: String,
        began_ms: u64,
        rules: Rules,
        now: u64,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        // A dead node must leave its slot whatever happened before; a slot that keeps failing is the
        // operator's to look at.
        let recent = self.record(&slot, now);
        if recent > rules.attempts as usize && self.churn_alerted.insert(slot.clone()) {
            out.push(Output::Alert {
                mac,
                cluster: slot.cluster.clone(),
                message: format!(
                    "{}/{} failed over {recent} times within {} min: its image or application may be at fault",
                    slot.cluster,
                    slot.slot,
                    CHURN_WINDOW_MS / 60_000
                ),
            });
        }
        let pool = rules.on_failure == OnFailure::Pool;
        out.push(Output::Began);
        out.push(Output::Event {
            kind: EventKind::HealthFailed,
            mac,
            cluster: slot.cluster.clone(),
            message: format!(
                "{mac} in {}/{} failed: {reason}; failing over ({})",
                slot.cluster,
                slot.slot,
                if pool {
                    "fence, then back to the pool"
                } else {
                    "quarantine"
                }
            ),
            secs: Some(now.saturating_sub(began_ms) as f64 / 1000.0),
        });
        out.push(Output::Unwatch(mac));
        // The replacement must wait for the fence: the hold (or the settling time) is in place before
        // the node is marked failed.
        if pool {
            out.push(Output::Hold {
                mac,
                slot: slot.clone(),
            });
        } else {
            out.push(Output::Settle {
                slot: slot.clone(),
                until_ms: now + FENCE_SETTLE_MS,
            });
        }
        out.push(Output::MarkFailed {
            mac,
            quarantine: !pool,
            reason: reason.clone(),
        });
        out.push(Output::Plan);
        if pool {
            out.push(Output::Fence {
                mac,
                slot: slot.clone(),
            });
        } else {
            out.push(Output::Event {
                kind: EventKind::Quarantine,
                mac,
                cluster: slot.cluster.clone(),
                message: format!(
                    "{mac} is quarantined: left running, cut off from {}/{}'s disk, no new work",
                    slot.cluster, slot.slot
                ),
                secs: None,
            });
        }
        self.running
            .insert(slot, Failover::begin(mac, false, reason, began_ms, now));
        out
    }

    fn look(&mut self, slot: SlotRef, view: SlotView, rules: Rules, now: u64) -> Vec<Output> {
        let Some(f) = self.running.get(&slot).cloned() else {
            return vec![];
        };
        // Nothing left to follow: the slot is gone or no longer wanted, or its old node holds it again.
        if !view.wanted || view.owner == Some(f.old) {
            self.running.remove(&slot);
            return vec![];
        }
        let cluster = slot.cluster.clone();
        match (view.owner, f.new) {
            (None, _) => {
                let mut out = Vec::new();
                if !f.alerted {
                    let what = if f.slow { "slow" } else { "failed" };
                    out.push(Output::Alert {
                        mac: f.old,
                        cluster,
                        message: format!(
                            "no eligible node to replace {what} node {} in {}/{}; corral keeps trying as nodes appear",
                            f.old, slot.cluster, slot.slot
                        ),
                    });
                    if let Some(x) = self.running.get_mut(&slot) {
                        x.alerted = true;
                    }
                }
                if f.slow {
                    // A slow node that lost its slot and got no replacement: nothing to follow.
                    self.running.remove(&slot);
                }
                out
            }
            (Some(new), prev) if prev.map(|p| p.0) != Some(new) => {
                // A replacement was chosen (first, or after another failed).
                let attempts = f.attempts + 1;
                if let Some(x) = self.running.get_mut(&slot) {
                    x.new = Some((new, now));
                    x.attempts = attempts;
                }
                vec![
                    Output::Event {
                        kind: EventKind::FailoverAssign,
                        mac: new,
                        cluster,
                        message: format!(
                            "{new} takes over {}/{} from {} (attempt {attempts} of {})",
                            slot.cluster, slot.slot, f.old, rules.attempts
                        ),
                        secs: None,
                    },
                    Output::Wake(new),
                ]
            }
            (Some(new), Some((_, since))) => {
                // The replacement's boot clock starts once it may boot: not while the old node is
                // still being fenced or drained.
                if !view.bootable {
                    if let Some(x) = self.running.get_mut(&slot) {
                        x.new = Some((new, now));
                    }
                    return vec![];
                }
                if view.confirmed {
                    let total = now.saturating_sub(f.failed_ms) as f64 / 1000.0;
                    let detect = f.detected_ms.saturating_sub(f.failed_ms) as f64 / 1000.0;
                    self.running.remove(&slot);
                    return vec![
                        Output::Event {
                            kind: EventKind::FailoverDone,
                            mac: new,
                            cluster,
                            message: format!(
                                "{}/{} runs on {new} again ({}: {}): {total:.2} s from the failure, detected after {detect:.2} s, {:.3} s of server-side work",
                                slot.cluster,
                                slot.slot,
                                if f.slow { "was slow" } else { "failed" },
                                f.reason,
                                f.server.as_secs_f64()
                            ),
                            secs: Some(total),
                        },
                        Output::Done,
                    ];
                }
                if now.saturating_sub(since) <= rules.boot_timeout_ms || view.moving {
                    return vec![];
                }
                // The replacement never came up: it is failed (and fenced: it may yet come up late),
                // and another is tried.
                let mut out = vec![
                    Output::Event {
                        kind: EventKind::NodeFailed,
                        mac: new,
                        cluster: cluster.clone(),
                        message: format!(
                            "{new} did not come up in {}/{} within {} s",
                            slot.cluster,
                            slot.slot,
                            rules.boot_timeout_ms / 1000
                        ),
                        secs: None,
                    },
                    Output::Hold {
                        mac: new,
                        slot: slot.clone(),
                    },
                    Output::MarkFailed {
                        mac: new,
                        quarantine: false,
                        reason: "did not come up as a replacement".into(),
                    },
                    Output::Fence {
                        mac: new,
                        slot: slot.clone(),
                    },
                ];
                if f.attempts >= rules.attempts {
                    out.push(Output::Alert {
                        mac: f.old,
                        cluster,
                        message: format!(
                            "failover of {}/{} gave up after {} attempts",
                            slot.cluster, slot.slot, f.attempts
                        ),
                    });
                    self.running.remove(&slot);
                }
                out.push(Output::Plan);
                out
            }
            // An owner that is the replacement already tried and no time recorded: cannot happen
            // (`new` is always set with its time), nothing to do.
            (Some(_), None) => vec![],
        }
    }

    /// Records a failover of `slot` at `now`; returns how many it had within the window, this one included.
    fn record(&mut self, slot: &SlotRef, now: u64) -> usize {
        let list = self.history.entry(slot.clone()).or_default();
        list.retain(|t| now.saturating_sub(*t) < CHURN_WINDOW_MS);
        list.push(now);
        let n = list.len();
        if n == 1 {
            self.churn_alerted.remove(slot);
        }
        n
    }

    /// Failovers of `slot` within the window so far.
    fn recent(&self, slot: &SlotRef, now: u64) -> usize {
        self.history.get(slot).map_or(0, |l| {
            l.iter()
                .filter(|t| now.saturating_sub(**t) < CHURN_WINDOW_MS)
                .count()
        })
    }

    /// A slow node keeps its slot: said once (`why` ends the parenthesis the message opens), looked at
    /// again after a wait that doubles with each look that finds no replacement.
    fn slow_stays(&mut self, mac: Mac, slot: &SlotRef, why: &str, now: u64) -> Vec<Output> {
        if let Some(s) = self.slow_stay.get_mut(&mac) {
            s.wait_ms = (s.wait_ms * 2).min(SLOW_RETRY_MAX_MS);
            s.next_ms = now + s.wait_ms;
            return vec![];
        }
        self.slow_stay.insert(
            mac,
            SlowStay {
                next_ms: now + SLOW_RETRY_MS,
                wait_ms: SLOW_RETRY_MS,
            },
        );
        vec![Output::Event {
            kind: EventKind::SlowStay,
            mac,
            cluster: slot.cluster.clone(),
            message: format!(
                "{mac} in {}/{} is slow ({why}: it keeps running",
                slot.cluster, slot.slot
            ),
            secs: None,
        }]
    }
}

#[cfg(test)]
mod tests;
