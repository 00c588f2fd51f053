//! In-flight work kept across restarts: which node holds which slot's disk, which nodes wait for a restart
//! into a new role (and how far their move got), which only a person can restart, and every running
//! failover. A restart of corral (a crash, `kill -9`, an upgrade) resumes or rolls back each, with an event.
//!
//! Two writers, one order: the planner writes the nodes' work in the same transaction as the assignments
//! it changes (a node told to leave a slot holds that slot's disk from the same commit on), and a saver
//! task writes everything else a moment after it changes. Both go through `work_io`, taken before the
//! fleet lock, which also remembers what was last written so the saver never puts back an older picture
//! than the planner's.

use crate::events::EventKind;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::agents::unix_ms;
use super::{Controller, Fleet};
use crate::mac::Mac;
use crate::policy::plan::SlotRef;
use crate::store::work::{FailoverDoc, NodeWork};
use crate::store::NewEvent;

/// What was last written, so unchanged work is not written again.
#[derive(Default)]
pub(crate) struct SavedWork {
    nodes: Vec<NodeWork>,
    failovers: Vec<FailoverDoc>,
    /// `Fleet::arrivals` of the copy the last finished plan was made from.
    pub(super) planned_arrivals: u64,
}

/// How long the saver waits after a change, so a burst of changes is one write.
const SAVE_DELAY: Duration = Duration::from_millis(20);
/// How often the saver looks even without being told (failover records change as they are followed).
const SAVE_PERIOD: Duration = Duration::from_millis(250);

/// The nodes' in-flight work in the fleet, in MAC order.
pub(super) fn node_work(fleet: &Fleet, now_ms: u64) -> Vec<NodeWork> {
    let mut out: BTreeMap<Mac, NodeWork> = BTreeMap::new();
    let blank = |mac: Mac| NodeWork {
        mac,
        hold: None,
        restart_ms: None,
        manual: false,
        step: None,
    };
    for (mac, slot) in &fleet.holds {
        out.entry(*mac).or_insert_with(|| blank(*mac)).hold =
            Some((slot.cluster.clone(), slot.slot));
    }
    for (mac, decided) in &fleet.reboot {
        let w = out.entry(*mac).or_insert_with(|| blank(*mac));
        w.restart_ms = Some(now_ms.saturating_sub(decided.elapsed().as_millis() as u64));
        w.step = fleet.steps.get(mac).cloned();
    }
    for mac in &fleet.manual {
        out.entry(*mac).or_insert_with(|| blank(*mac)).manual = true;
    }
    out.into_values().collect()
}

/// A work record compared without its clock: a pending restart's moment is rebuilt from an `Instant`
/// and may shift by a millisecond between two snapshots.
fn same_work(a: &[NodeWork], b: &[NodeWork]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.mac == y.mac
                && x.hold == y.hold
                && x.manual == y.manual
                && x.step == y.step
                && x.restart_ms.is_some() == y.restart_ms.is_some()
        })
}

impl Controller {
    pub(crate) fn work_io(&self) -> std::sync::MutexGuard<'_, SavedWork> {
        self.work_io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says in-flight work changed: the saver writes it within moments.
    pub(crate) fn work_changed(&self) {
        self.work_dirty.notify_one();
    }

    /// Records what the planner wrote with its assignments (the caller holds `work_io`).
    pub(crate) fn planner_saved(saved: &mut SavedWork, nodes: Vec<NodeWork>) {
        saved.nodes = nodes;
    }

    /// Whether the nodes' work differs from what was last written (the caller holds `work_io`).
    pub(crate) fn work_differs(saved: &SavedWork, nodes: &[NodeWork]) -> bool {
        !same_work(&saved.nodes, nodes)
    }

    /// Writes the in-flight work if it changed since the last write.
    pub fn save_work(&self) -> anyhow::Result<()> {
        let mut saved = self.work_io();
        let nodes = node_work(&self.fleet(), unix_ms());
        let failovers = self.failover_docs();
        if same_work(&saved.nodes, &nodes) && saved.failovers == failovers {
            return Ok(());
        }
        self.store.save_work(&nodes, &failovers)?;
        saved.nodes = nodes;
        saved.failovers = failovers;
        Ok(())
    }

    /// Writes in-flight work as it changes, until the task is dropped.
    pub async fn run_work_saver(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.work_dirty.notified() => tokio::time::sleep(SAVE_DELAY).await,
                _ = tokio::time::sleep(SAVE_PERIOD) => {}
            }
            let c = self.clone();
            match tokio::task::spawn_blocking(move || c.save_work()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot record in-flight work"),
                Err(e) => tracing::error!(error = %e, "recording in-flight work panicked"),
            }
        }
    }

    /// At start: takes back the in-flight work the store remembers. Pending restarts are resumed by the
    /// mover (their move starts again from its first step: every step is safe to repeat), failovers are
    /// followed again, and a hold that no move or failed node explains is rolled back. Each gets an event.
    pub(crate) fn restore_work(&self) {
        let (nodes, failovers) = match (self.store.node_work(), self.store.failovers()) {
            (Ok(n), Ok(f)) => (n, f),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot read in-flight work");
                return;
            }
        };
        let now = crate::unix_now();
        let now_ms = unix_ms();
        let mut events = Vec::new();
        let ev = |kind, mac: Mac, cluster: Option<&str>, message: String| NewEvent {
            at: now,
            kind,
            cluster: cluster.map(str::to_string),
            node: Some(mac.to_string()),
            message,
            secs: None,
        };
        {
            let mut fleet = self.fleet();
            for w in &nodes {
                let hold = w.hold.as_ref().map(|(c, s)| SlotRef {
                    cluster: c.clone(),
                    slot: *s,
                });
                let failed = fleet.state.nodes.get(&w.mac).is_some_and(|n| !n.healthy);
                if let Some(at) = w.restart_ms {
                    let ago = Duration::from_millis(now_ms.saturating_sub(at));
                    let decided = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
                    fleet.reboot.insert(w.mac, decided);
                    if let Some(s) = &w.step {
                        fleet.steps.insert(w.mac, s.clone());
                    }
                    let cluster = hold.as_ref().map(|h| h.cluster.clone());
                    let message = if w.manual {
                        format!(
                            "{} still waits to be restarted by hand into its new role",
                            w.mac
                        )
                    } else {
                        format!(
                            "{}'s move was under way when corral stopped ({}): it starts again",
                            w.mac,
                            match &w.step {
                                Some(s) => format!("last step {s}"),
                                None => "not started".into(),
                            }
                        )
                    };
                    events.push(ev(
                        EventKind::MoveResumed,
                        w.mac,
                        cluster.as_deref(),
                        message,
                    ));
                }
                if w.manual {
                    fleet.manual.insert(w.mac);
                }
                if let Some(h) = hold {
                    if w.restart_ms.is_some() || failed {
                        fleet.holds.insert(w.mac, h);
                    } else {
                        events.push(ev(
                            EventKind::HoldRolledBack,
                            w.mac,
                            Some(&h.cluster),
                            format!(
                                "{} held {}/{}'s disk with no move or failure to explain it: released",
                                w.mac, h.cluster, h.slot
                            ),
                        ));
                    }
                }
            }
        }
        let mut stranded_slots = Vec::new();
        {
            // A failed node still in its slot: corral stopped between marking it failed and the plan
            // that takes the slot away. It may be running the role yet, so it holds the slot's disk until
            // it is fenced (`resume_fences`), like any failed node.
            let quarantined = self.health().quarantined.clone();
            let mut fleet = self.fleet();
            let stranded: Vec<(Mac, SlotRef)> = fleet
                .state
                .assignments
                .iter()
                .filter(|(m, _)| {
                    fleet.state.nodes.get(m).is_some_and(|n| !n.healthy)
                        && !quarantined.contains(m)
                        && !fleet.holds.contains_key(m)
                })
                .map(|(m, s)| (*m, s.clone()))
                .collect();
            for (mac, slot) in stranded {
                // One event here (its failover); `resume_fences` says the fence.
                events.push(ev(
                    EventKind::FailoverResumed,
                    mac,
                    Some(&slot.cluster),
                    format!(
                        "{mac} was failed but still in {}/{} when corral stopped: it holds the slot's disk until it is fenced, and the slot fails over",
                        slot.cluster, slot.slot
                    ),
                ));
                fleet.holds.insert(mac, slot.clone());
                stranded_slots.push((mac, slot));
            }
        }
        for f in &failovers {
            let slot = SlotRef {
                cluster: f.cluster.clone(),
                slot: f.slot,
            };
            match self.restore_failover(&slot, &f.doc) {
                Ok(old) => events.push(ev(
                    EventKind::FailoverResumed,
                    old,
                    Some(&slot.cluster),
                    format!(
                        "the failover of {}/{} from {old} was under way when corral stopped: followed again",
                        slot.cluster, slot.slot
                    ),
                )),
                Err(e) => tracing::error!(cluster = %slot.cluster, slot = slot.slot, error = %e, "cannot read a stored failover: dropped"),
            }
        }
        // After the stored failovers, so one stored for the slot is the one followed.
        for (mac, slot) in &stranded_slots {
            self.adopt_failover(*mac, slot, now_ms);
        }
        for e in &events {
            tracing::info!(kind = e.kind.as_str(), "{}", e.message);
        }
        if !events.is_empty() {
            if let Err(e) = self.store.apply(&[], &events) {
                tracing::error!(error = %e, "cannot record resumed work");
            }
        }
        // What was read is what is stored (less what was rolled back, which the saver writes).
        let mut saved = self.work_io();
        saved.nodes = nodes;
        saved.failovers = failovers;
        drop(saved);
        self.work_changed();
    }
}
