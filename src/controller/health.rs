//! The controller's side of health: it feeds the health room's monitors ([`crate::health::NodeWatch`])
//! with heartbeats and probe results, and acts on their verdicts by failing a slot over.
//!
//! Monitoring of a node in a role starts with that role's first heartbeat (an image without an agent is
//! not watched). On a verdict:
//! - **failed**: the node loses its slot at once, but keeps the slot's disk (`holds`) until it is fenced:
//!   switched off hard (or, without power control, restarted by its agent); then its export is closed
//!   and, a moment later, the replacement may boot. Under `on_failure = "quarantine"` the node is left
//!   running, cut off from the disk, and gets no new work. Otherwise it is switched on again and rejoins
//!   the pool when it asks for a script.
//! - **slow**: the planner hands the slot to a node at least as capable, if one is free or may be
//!   preempted; the slow node is drained and restarted into the pool by the mover. With none, it stays.
//!
//! A failover is confirmed when the replacement heartbeats in the slot and, if the cluster has a probe,
//! answers it. A replacement that does not within `boot_timeout` is marked failed and another is tried,
//! up to `failover_attempts`; then, and whenever no node is eligible, an alert is raised (event, log,
//! webhook) and the planner keeps trying as nodes appear.
//!
//! Long because health's jobs (verdicts, probes, fencing, alerts and webhooks, failover records across a
//! restart, releasing quarantined nodes) still share the controller's state; the single-owner core of
//! issue 16 will take them out, as `failover` already holds the decisions.

use crate::events::EventKind;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::agents::unix_ms;
use super::failover::{Failover, Failovers, Input, Output, Rules, SlotView};
use super::Controller;
use crate::agent::proto::{Heartbeat, OrderKind};
use crate::domain::{Mac, SlotRef};
use crate::health::{Failure, NodeWatch, Verdict};
use crate::metrics::Counter;
use crate::power::PowerDriver;
use crate::store::NewEvent;

/// How often verdicts are checked.
const TICK: Duration = Duration::from_millis(250);
/// Bound on a fencing power call.
const FENCE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the health side has done, for `/metrics`.
#[derive(Default)]
pub struct HealthCounts {
    pub probes: Counter,
    pub probe_failures: Counter,
    pub failovers: Counter,
    pub failovers_done: Counter,
    pub alerts: Counter,
}

#[derive(Default)]
pub struct Health {
    /// node → the role it is watched in, and the watch.
    watches: HashMap<Mac, (SlotRef, NodeWatch)>,
    /// Probes running now.
    probing: BTreeSet<Mac>,
    /// Running failovers, each slot's recent ones, slow nodes left where they are: the machine.
    pub(super) failover: Failovers,
    /// Failed nodes kept up for investigation.
    pub quarantined: BTreeSet<Mac>,
    /// Counts for `/metrics`.
    pub counts: HealthCounts,
    /// Slots whose previous node was just fenced: the replacement waits until then.
    settling: BTreeMap<SlotRef, u64>,
    /// Who fills each slot (for the slots under failover), rebuilt when the assignments change.
    owners: super::failover::SlotOwners,
}

/// A verdict to act on, taken out of the lock.
struct Acting {
    mac: Mac,
    slot: SlotRef,
    verdict: Verdict,
    /// When the trouble began, as best known: the last heartbeat (heartbeat loss), the start of the
    /// breach (slow), else now.
    began_ms: u64,
}

impl Controller {
    #[track_caller]
    pub(super) fn health(&self) -> super::Part<'_, Health> {
        self.part(|c| &c.health, |c| &mut c.health)
    }

    /// Appends the health counters and gauges in Prometheus text format.
    pub fn report_health(&self, out: &mut String) {
        use crate::metrics::{write_counter, write_gauge};
        let failed = self
            .fleet_state()
            .nodes
            .values()
            .filter(|n| !n.healthy)
            .count() as u64;
        let h = self.health();
        for (name, help, c) in [
            (
                "corral_health_probes_total",
                "Application probes run",
                &h.counts.probes,
            ),
            (
                "corral_health_probe_failures_total",
                "Application probes that failed",
                &h.counts.probe_failures,
            ),
            (
                "corral_failovers_total",
                "Failovers started (failed or slow nodes)",
                &h.counts.failovers,
            ),
            (
                "corral_failovers_done_total",
                "Failovers confirmed by the replacement",
                &h.counts.failovers_done,
            ),
            (
                "corral_alerts_total",
                "Alerts raised by failover",
                &h.counts.alerts,
            ),
        ] {
            write_counter(out, name, help, c.get());
        }
        write_gauge(
            out,
            "corral_failovers_running",
            "Failovers in progress",
            h.failover.running().len() as u64,
        );
        write_gauge(
            out,
            "corral_nodes_quarantined",
            "Nodes kept up after a failure",
            h.quarantined.len() as u64,
        );
        write_gauge(
            out,
            "corral_nodes_failed",
            "Nodes out of service (failed or quarantined)",
            failed,
        );
    }

    /// Whether the node is quarantined (kept up after a failure, no new work).
    pub fn quarantined(&self, mac: Mac) -> bool {
        self.health().quarantined.contains(&mac)
    }

    /// The slot `mac` may boot into now: none while the slot's disk is still held by the node it is
    /// taken from, or that node's connections are being closed.
    pub fn bootable_slot_of(&self, mac: Mac) -> Option<SlotRef> {
        let slot = self.slot_of(mac)?;
        let held = self
            .view()
            .holds
            .iter()
            .any(|(m, s)| *m != mac && *s == slot);
        let settling = self
            .health()
            .settling
            .get(&slot)
            .is_some_and(|t| unix_ms() < *t);
        (!held && !settling).then_some(slot)
    }

    /// A heartbeat of `mac`'s agent in `role` (the role of the boot its token belongs to).
    pub(crate) fn health_heartbeat(
        &self,
        mac: Mac,
        role: Option<&SlotRef>,
        hb: &Heartbeat,
        now_ms: u64,
    ) {
        let Some(role) = role else { return };
        if self.slot_of(mac).as_ref() != Some(role) {
            return;
        }
        let state = self.state();
        let Some(policy) = state.policy.as_ref() else {
            return;
        };
        // Only clusters with a `health` table are watched.
        let Some(c) = policy
            .cluster(&role.cluster)
            .filter(|c| c.spec.health.is_some())
        else {
            return;
        };
        let mut h = self.health();
        // A watch belongs to one role: a node in a new role starts a fresh one.
        let fresh = || {
            let w = NodeWatch::new(
                c.spec.health(),
                policy.heartbeat_interval,
                now_ms,
                policy.boot_timeout * 1000,
            );
            (role.clone(), w)
        };
        let w = h.watches.entry(mac).or_insert_with(&fresh);
        if &w.0 != role {
            *w = fresh();
        }
        w.1.heartbeat(hb, now_ms);
    }

    /// Checks every watched node a few times a second and acts on verdicts, until the task is dropped.
    pub async fn run_health(self: Arc<Self>) {
        loop {
            tokio::time::sleep(TICK).await;
            let now = unix_ms();
            self.start_probes(now);
            for a in self.verdicts(now) {
                let t = Instant::now();
                let Some(rules) = self.failover_rules(&a.slot.cluster) else {
                    continue;
                };
                let (mac, slot, began_ms) = (a.mac, a.slot.clone(), a.began_ms);
                let input = match a.verdict {
                    Verdict::Failed { detail, .. } => Input::Failed {
                        mac,
                        slot: slot.clone(),
                        reason: detail,
                        began_ms,
                        rules,
                    },
                    Verdict::Slow { detail, .. } => Input::Slow {
                        mac,
                        slot: slot.clone(),
                        reason: detail,
                        began_ms,
                        rules,
                    },
                };
                self.failover_on(input, now);
                let took = t.elapsed();
                self.failover_on(Input::Worked { slot, took }, now);
            }
            self.follow_failovers(now);
        }
    }

    /// Drops watches of nodes that left their role; returns the verdicts to act on.
    fn verdicts(&self, now: u64) -> Vec<Acting> {
        let fleet = self.fleet_state();
        // The monitors, the running moves and the agents' last beats together, from the one core.
        let mut core = self.core();
        let super::Core {
            health: h,
            moves,
            agents,
            ..
        } = &mut *core;
        let Health {
            watches, failover, ..
        } = &mut *h;
        watches.retain(|mac, (slot, _)| {
            fleet.assignments.get(mac) == Some(slot) && !failover.failing(*mac, slot)
        });
        let mut out = Vec::new();
        let mut cleared = Vec::new();
        for (mac, (slot, w)) in &h.watches {
            if moves.contains_key(mac) {
                continue;
            }
            match w.check(now) {
                Some(v) => {
                    let began = match &v {
                        Verdict::Failed {
                            cause: Failure::HeartbeatLost,
                            ..
                        } => agents.beats.get(mac).map(|b| b.at_ms).unwrap_or(now),
                        Verdict::Slow { .. } => w.slow_since().unwrap_or(now),
                        Verdict::Failed { .. } => now,
                    };
                    out.push(Acting {
                        mac: *mac,
                        slot: slot.clone(),
                        verdict: v,
                        began_ms: began,
                    });
                }
                None => cleared.push(*mac),
            }
        }
        for m in cleared {
            h.failover.cleared(m);
        }
        // A slow node known to have no replacement is looked at again only every so often.
        out.retain(|a| {
            !matches!(a.verdict, Verdict::Slow { .. }) || h.failover.slow_due(a.mac, now)
        });
        out
    }

    fn start_probes(self: &Arc<Self>, now: u64) {
        let state = self.state();
        let Some(policy) = state.policy.clone() else {
            return;
        };
        let due: Vec<(Mac, SlotRef)> = {
            let mut h = self.health();
            let mut due = Vec::new();
            let probing = h.probing.clone();
            for (mac, (slot, w)) in h.watches.iter_mut() {
                if !probing.contains(mac) && w.probe_due(now) {
                    due.push((*mac, slot.clone()));
                }
            }
            for (m, _) in &due {
                h.probing.insert(*m);
            }
            due
        };
        for (mac, slot) in due {
            let Some(spec) = policy
                .cluster(&slot.cluster)
                .and_then(|c| c.spec.health().probe.clone())
            else {
                self.health().probing.remove(&mac);
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let result = match me.node_addresses(mac).list().first() {
                    Some(ip) => crate::health::probe::run(&spec, *ip).await,
                    None => Err("no known address".into()),
                };
                if let Err(e) = &result {
                    tracing::debug!(%mac, error = %e, "probe failed");
                }
                let mut h = me.health();
                h.counts.probes.inc();
                if result.is_err() {
                    h.counts.probe_failures.inc();
                }
                h.probing.remove(&mac);
                if let Some((s, w)) = h.watches.get_mut(&mac) {
                    if *s == slot {
                        w.probe_done(result, unix_ms());
                    }
                }
            });
        }
    }

    pub(super) fn event(
        &self,
        kind: EventKind,
        mac: Option<Mac>,
        cluster: Option<&str>,
        message: String,
        secs: Option<f64>,
    ) {
        let e = NewEvent {
            at: crate::unix_now(),
            kind,
            cluster: cluster.map(str::to_string),
            node: mac.map(|m| m.to_string()),
            message,
            secs,
        };
        if let Err(err) = self.store.apply(&[], &[e]) {
            tracing::error!(error = %err, "cannot record a health event");
        }
    }

    /// Raises an alert: an event, a warning in the log and, when configured, a webhook call.
    pub(crate) fn alert(&self, mac: Option<Mac>, cluster: Option<&str>, message: String) {
        tracing::warn!(node = ?mac.map(|m| m.to_string()), cluster, "ALERT: {message}");
        self.health().counts.alerts.inc();
        self.event(EventKind::Alert, mac, cluster, message.clone(), None);
        self.send_webhook(mac, cluster, &message);
    }

    /// POSTs an alert to the policy's webhook, if it names one (in the background).
    pub(crate) fn send_webhook(&self, mac: Option<Mac>, cluster: Option<&str>, message: &str) {
        let Some(url) = self
            .state()
            .policy
            .as_ref()
            .and_then(|p| p.alert_webhook.clone())
        else {
            return;
        };
        let body = serde_json::json!({
            "kind": "alert",
            "at": crate::unix_now(),
            "cluster": cluster,
            "node": mac.map(|m| m.to_string()),
            "message": message,
        })
        .to_string();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            match crate::health::webhook::post(&url, &body).await {
                Ok(s) if (200..300).contains(&s) => {}
                Ok(s) => tracing::warn!(status = s, "alert webhook answered with an error"),
                Err(e) => tracing::warn!(error = %e, "alert webhook failed"),
            }
        });
    }

    /// Whether the slot's identity has a fixed address (every node in it answers on that address).
    pub(crate) fn slot_has_fixed_address(&self, slot: &SlotRef) -> bool {
        self.state()
            .policy
            .as_ref()
            .and_then(|p| p.cluster(&slot.cluster))
            .and_then(|c| c.identities.get(slot.slot as usize))
            .is_some_and(|i| i.address.is_some())
    }

    /// The node's power driver, if the policy gives it one.
    pub(crate) fn power_driver(&self, mac: Mac) -> Result<Option<Arc<dyn PowerDriver>>, String> {
        let state = self.state();
        let Some(node) = state.policy.as_ref().and_then(|p| p.nodes.get(&mac)) else {
            return Ok(None);
        };
        let Some(spec) = node.power.as_ref() else {
            return Ok(None);
        };
        let ctx = crate::power::Context {
            mac,
            name: node.name.as_deref(),
            credentials: &state.credentials,
            interface: state.config.server.interface.as_deref(),
        };
        crate::power::driver(spec, &ctx).map(|d| Some(Arc::from(d)))
    }

    /// The cluster's failover rules, from the running policy.
    pub(super) fn failover_rules(&self, cluster: &str) -> Option<Rules> {
        let state = self.state();
        let policy = state.policy.as_ref()?;
        let h = policy.cluster(cluster).map(|c| c.spec.health());
        Some(Rules {
            on_failure: h.map(|h| h.on_failure).unwrap_or_default(),
            attempts: h.map_or(3, |h| h.failover_attempts),
            boot_timeout_ms: policy.boot_timeout * 1000,
        })
    }

    /// Feeds the failover machine one input (under the health lock) and carries out what it says (after).
    fn failover_on(self: &Arc<Self>, input: Input, now: u64) {
        let out = self.health().failover.on(input, now);
        self.carry_out(out, now);
    }

    /// Carries out the failover machine's outputs, in order, holding no lock across any of them.
    fn carry_out(self: &Arc<Self>, out: Vec<Output>, now: u64) {
        for o in out {
            match o {
                Output::Event {
                    kind,
                    mac,
                    cluster,
                    message,
                    secs,
                } => {
                    match kind {
                        EventKind::HealthFailed | EventKind::HealthSlow => {
                            tracing::warn!("{message}")
                        }
                        EventKind::FailoverDone => tracing::info!("{message}"),
                        _ => {}
                    }
                    self.event(kind, Some(mac), Some(&cluster), message, secs);
                }
                Output::Alert {
                    mac,
                    cluster,
                    message,
                } => self.alert(Some(mac), Some(&cluster), message),
                Output::Unwatch(mac) => {
                    self.health().watches.remove(&mac);
                }
                Output::Hold { mac, slot } => {
                    self.fleet().holds.insert(mac, slot);
                }
                Output::Release { mac } => {
                    self.fleet().holds.remove(&mac);
                    self.work_changed();
                }
                Output::Settle { slot, until_ms } => {
                    self.health().settling.insert(slot, until_ms);
                }
                Output::MarkFailed {
                    mac,
                    quarantine,
                    reason,
                } => self.mark_failed(mac, quarantine, &reason),
                Output::Fence { mac, slot } => {
                    tokio::spawn(self.clone().fence_failed(mac, slot));
                }
                Output::Restart { mac, cluster } => {
                    tokio::spawn(self.clone().switch_on_again(mac, cluster));
                }
                Output::Wake(mac) => {
                    tokio::spawn(self.clone().wake(mac));
                }
                Output::Plan => {
                    if let Err(e) = self.replan(crate::unix_now()) {
                        tracing::error!(error = %e, "planning a failover failed");
                    }
                }
                Output::PlanSlow {
                    mac,
                    slot,
                    reason,
                    began_ms,
                } => {
                    self.fleet().state.slow.insert(mac);
                    let r = self.replan(crate::unix_now());
                    self.fleet().state.slow.remove(&mac);
                    if let Err(e) = r {
                        tracing::error!(error = %e, "planning a slow node's replacement failed");
                        continue;
                    }
                    let moved = self.slot_of(mac).as_ref() != Some(&slot);
                    self.failover_on(
                        Input::SlowPlanned {
                            mac,
                            slot,
                            reason,
                            began_ms,
                            moved,
                        },
                        now,
                    );
                }
                Output::Began => self.health().counts.failovers.inc(),
                Output::Done => self.health().counts.failovers_done.inc(),
            }
        }
    }

    /// Switches a failed node off (hard) or has its agent restart it, then tells the failover machine.
    async fn fence_failed(self: Arc<Self>, mac: Mac, slot: SlotRef) {
        let t = Instant::now();
        let (off, how) = match self.power_driver(mac) {
            Ok(Some(d)) => {
                let call = tokio::task::spawn_blocking(move || d.off(true));
                match tokio::time::timeout(FENCE_CALL_TIMEOUT, call).await {
                    Ok(Ok(Ok(()))) => (true, "switched off".to_string()),
                    Ok(Ok(Err(e))) => (false, format!("power off failed ({e})")),
                    Ok(Err(e)) => (false, format!("power off panicked ({e})")),
                    Err(_) => (false, "power off timed out".to_string()),
                }
            }
            Ok(None) if self.agent_alive(mac, unix_ms()) => {
                self.send_order(mac, OrderKind::Reboot);
                (
                    false,
                    "no power control: its agent was told to restart".to_string(),
                )
            }
            Ok(None) => (false, "no power control and no agent".to_string()),
            Err(e) => (false, format!("power driver: {e}")),
        };
        let fixed_address = self.slot_has_fixed_address(&slot);
        self.failover_on(
            Input::Fenced {
                mac,
                slot,
                off,
                how,
                fixed_address,
                took: t.elapsed(),
            },
            unix_ms(),
        );
    }

    /// Back to the pool after a fence: the node boots, asks for a script while unassigned, and is
    /// healthy again.
    async fn switch_on_again(self: Arc<Self>, mac: Mac, cluster: String) {
        let Ok(Some(d)) = self.power_driver(mac) else {
            return;
        };
        let r = tokio::task::spawn_blocking(move || {
            let _ = d.boot_network_once();
            d.on()
        })
        .await;
        let msg = match r {
            Ok(Ok(())) => format!("{mac} switched on again to rejoin the pool"),
            Ok(Err(e)) => format!("{mac} cannot be switched on again ({e}): it stays failed"),
            Err(e) => format!("{mac}: power on panicked ({e})"),
        };
        self.event(EventKind::NodeRestart, Some(mac), Some(&cluster), msg, None);
    }

    /// Looks at every slot under failover: the replacement chosen, switched on, confirmed; or retried,
    /// or alerted (the machine decides).
    fn follow_failovers(self: &Arc<Self>, now: u64) {
        let Some(policy) = self.state().policy.clone() else {
            return;
        };
        let fleet = self.fleet_state();
        let slots: Vec<SlotRef> = self.health().failover.running().keys().cloned().collect();
        for slot in slots {
            let (owner, wanted) = {
                let mut h = self.health();
                let owner = h.owners.owner(&fleet.assignments, &slot);
                let wanted = policy.cluster(&slot.cluster).is_some_and(|c| {
                    let desired = crate::policy::plan::desired(c, &fleet, now / 1000, &policy.zone);
                    // A blocked slot gets no node for now: nothing to wait for.
                    h.owners.wanted(&fleet.assignments, &slot, desired)
                        && !fleet.blocked.contains(&slot)
                });
                (owner, wanted)
            };
            let view = SlotView {
                wanted,
                owner,
                bootable: owner.is_some_and(|m| self.bootable_slot_of(m).is_some()),
                confirmed: owner.is_some_and(|m| {
                    self.health()
                        .watches
                        .get(&m)
                        .is_some_and(|(s, w)| *s == slot && w.confirmed())
                }),
                moving: owner.is_some_and(|m| self.moving(m)),
            };
            let Some(rules) = self.failover_rules(&slot.cluster) else {
                continue;
            };
            self.failover_on(Input::Look { slot, view, rules }, now);
        }
    }

    /// Makes sure a replacement taken from the pool is running: a node that is off is switched on
    /// (next boot: network). A parked node picks its new script up at its next poll anyway.
    async fn wake(self: Arc<Self>, mac: Mac) {
        let Ok(Some(d)) = self.power_driver(mac) else {
            return;
        };
        let r = tokio::task::spawn_blocking(move || -> Result<bool, String> {
            match d.status().map_err(|e| e.to_string())? {
                crate::power::PowerState::Off => {
                    let _ = d.boot_network_once();
                    d.on().map_err(|e| e.to_string())?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await;
        if let Ok(Ok(true)) = r {
            self.event(
                EventKind::FailoverPowerOn,
                Some(mac),
                None,
                format!("{mac} was off: switched on"),
                None,
            );
        }
    }

    /// The running failovers as stored documents.
    pub(crate) fn failover_docs(&self) -> Vec<crate::store::work::FailoverDoc> {
        self.health()
            .failover
            .running()
            .iter()
            .filter_map(|(slot, f)| {
                Some(crate::store::work::FailoverDoc {
                    cluster: slot.cluster.clone(),
                    slot: slot.slot,
                    doc: serde_json::to_string(f).ok()?,
                })
            })
            .collect()
    }

    /// Takes a stored failover back; returns the node that failed.
    pub(crate) fn restore_failover(&self, slot: &SlotRef, doc: &str) -> Result<Mac, String> {
        let f: Failover = serde_json::from_str(doc).map_err(|e| e.to_string())?;
        let old = f.old;
        self.health().failover.restore(slot.clone(), f);
        Ok(old)
    }

    /// At start: every node whose agent was running in its slot (its boot's token was used in that role)
    /// is watched again from now, before it beats: one that died while corral was down is found by its
    /// heartbeat timeout like any other, instead of never being watched.
    pub(crate) fn resume_watches(&self, now_ms: u64) {
        let state = self.state();
        let Some(policy) = state.policy.as_ref() else {
            return;
        };
        let assignments = self.fleet_state().assignments;
        let running: Vec<(Mac, SlotRef)> = {
            let a = self.agents();
            assignments
                .into_iter()
                .filter(|(m, s)| {
                    a.book
                        .tokens(*m)
                        .is_some_and(|t| t.current.used && t.current.role.as_ref() == Some(s))
                })
                .collect()
        };
        let mut h = self.health();
        for (mac, slot) in running {
            let Some(c) = policy
                .cluster(&slot.cluster)
                .filter(|c| c.spec.health.is_some())
            else {
                continue;
            };
            // Started as if the node had just beaten: it has one heartbeat timeout from now.
            let w = NodeWatch::new(c.spec.health(), policy.heartbeat_interval, now_ms, 0);
            h.watches.entry(mac).or_insert((slot, w));
        }
    }

    /// At start: a failed node found still in its slot gets the failover it was about to get, unless the
    /// slot has one (its failure time is when it was flagged).
    pub(crate) fn adopt_failover(&self, mac: Mac, slot: &SlotRef, now_ms: u64) {
        let since_ms = self
            .store
            .node_flags()
            .ok()
            .and_then(|f| f.into_iter().find(|f| f.mac == mac))
            .map(|f| f.since * 1000)
            .unwrap_or(now_ms);
        self.health().failover.restore(
            slot.clone(),
            Failover::begin(
                mac,
                false,
                "failed just before corral stopped".into(),
                since_ms,
                since_ms,
            ),
        );
    }

    /// At start, once tasks can run: fences again every failed node that still holds a slot's disk (its
    /// fence was under way when corral stopped, or never ran). Switching a node off twice is harmless;
    /// leaving it running on a disk another node gets is not.
    pub fn resume_fences(self: &Arc<Self>) {
        let pending: Vec<(Mac, SlotRef)> = {
            let fleet = self.fleet();
            fleet
                .holds
                .iter()
                .filter(|(m, _)| {
                    !fleet.reboot.contains_key(m)
                        && fleet.state.nodes.get(m).is_some_and(|n| !n.healthy)
                })
                .map(|(m, s)| (*m, s.clone()))
                .collect()
        };
        for (mac, slot) in pending {
            if self.quarantined(mac) {
                continue;
            }
            self.event(
                EventKind::FenceResumed,
                Some(mac),
                Some(&slot.cluster),
                format!(
                    "{mac} still held {}/{}'s disk when corral started: fencing it again",
                    slot.cluster, slot.slot
                ),
                None,
            );
            tokio::spawn(self.clone().fence_failed(mac, slot));
        }
    }

    /// Takes a node out of service (it gets no work), remembered across restarts.
    pub(crate) fn mark_failed(&self, mac: Mac, quarantine: bool, reason: &str) {
        if let Some(n) = self.fleet().state.nodes.get_mut(&mac) {
            n.healthy = false;
        }
        if quarantine {
            self.health().quarantined.insert(mac);
        }
        let flag = crate::store::NodeFlag {
            mac,
            quarantined: quarantine,
            since: crate::unix_now(),
            reason: reason.to_string(),
        };
        if let Err(e) = self.store.set_node_flag(mac, Some(&flag)) {
            tracing::error!(%mac, error = %e, "cannot record a failed node");
        }
    }

    /// Puts a node back in service; returns whether it was out (failed or quarantined).
    fn mark_healthy(&self, mac: Mac) -> bool {
        let was_quarantined = self.health().quarantined.remove(&mac);
        let was_failed = self
            .fleet()
            .state
            .nodes
            .get_mut(&mac)
            .is_some_and(|n| !std::mem::replace(&mut n.healthy, true));
        if let Err(e) = self.store.set_node_flag(mac, None) {
            tracing::error!(%mac, error = %e, "cannot clear a failed node's flag");
        }
        was_quarantined || was_failed
    }

    /// Loads flagged nodes (at start): failed and quarantined nodes stay out of service.
    pub(crate) fn load_node_flags(&self) {
        let Ok(flags) = self.store.node_flags() else {
            return;
        };
        let mut core = self.core();
        for f in flags {
            if let Some(n) = core.fleet_mut().state.nodes.get_mut(&f.mac) {
                n.healthy = false;
            }
            if f.quarantined {
                core.health.quarantined.insert(f.mac);
            }
        }
    }

    /// The operator returns a quarantined or failed node to the pool. A quarantined node still runs its
    /// old role: it is restarted (power cycle, else its agent) and rejoins the pool when it asks for a
    /// script; a failed node is trusted at once.
    pub fn release_node(self: &Arc<Self>, mac: Mac) -> Result<String, String> {
        if self.slot_of(mac).is_some() {
            return Err(format!(
                "{mac} fills a slot: it is neither failed nor quarantined"
            ));
        }
        if !self.fleet().state.nodes.contains_key(&mac) {
            return Err(format!("{mac} is not a known node"));
        }
        let msg = if self.quarantined(mac) {
            self.health().quarantined.remove(&mac);
            if let Err(e) = self.store.set_node_flag(mac, None) {
                tracing::error!(%mac, error = %e, "cannot clear a quarantine flag");
            }
            let how = match self.power_driver(mac) {
                Ok(Some(d)) => {
                    tokio::task::spawn_blocking(move || {
                        let _ = d.off(true);
                        let _ = d.boot_network_once();
                        d.on()
                    });
                    "power cycled"
                }
                _ if self.agent_alive(mac, unix_ms()) => {
                    self.send_order(mac, OrderKind::Reboot);
                    "told by its agent to restart"
                }
                _ => "to be restarted by hand",
            };
            format!("{mac} released from quarantine: {how}; it rejoins the pool when it boots")
        } else if self.mark_healthy(mac) {
            format!("{mac} released by the operator: back in the pool")
        } else {
            return Err(format!("{mac} is not failed or quarantined"));
        };
        self.event(EventKind::NodeReleased, Some(mac), None, msg.clone(), None);
        if let Err(e) = self.replan(crate::unix_now()) {
            tracing::error!(error = %e, "planning after a release failed");
        }
        Ok(msg)
    }

    /// A failed (not quarantined) node asked for a script while unassigned: it is back in the pool.
    pub(crate) fn maybe_back(&self, mac: Mac) {
        if self.quarantined(mac) || self.slot_of(mac).is_some() || self.moving(mac) {
            return;
        }
        let view = self.view();
        if view.holds.contains_key(&mac) {
            return;
        }
        let back = view.state.nodes.get(&mac).is_some_and(|n| !n.healthy) && self.mark_healthy(mac);
        if back {
            self.event(
                EventKind::NodeBack,
                Some(mac),
                None,
                format!("{mac} booted again and is back in the pool"),
                None,
            );
        }
    }
}
