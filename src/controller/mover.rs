//! The mover: carries out the planner's moves of running nodes, one task per node, each driving a
//! [`Move`] state machine with the node's power driver, its agent and the clock.
//!
//! The planner's assignment is stored at decision time (so a node is never planned twice); until the node
//! is fenced (powered off), it keeps access to its old slot's disk and nobody else may open that disk.
//! A move that fails marks the node failed: the planner releases its slot and picks another node.

use crate::events::EventKind;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::agents::unix_ms;
use super::moves::{Call, Input, Move, MoveSpec, Output};
use super::Controller;
use crate::domain::{Mac, SlotRef};
use crate::power::{PowerDriver, PowerState};
use crate::store::NewEvent;

/// How often a move's clock ticks (power status polls go at this pace).
const TICK: Duration = Duration::from_millis(200);

impl Controller {
    /// Hands an input to the node's running move, if it has one.
    pub(crate) fn move_input(&self, mac: Mac, input: Input) {
        if let Some(tx) = self.core().moves.get(&mac) {
            let _ = tx.send(input);
        }
    }

    /// Whether the node is being moved.
    pub fn moving(&self, mac: Mac) -> bool {
        self.core().moves.contains_key(&mac)
    }

    /// Ends the node's hold on its old slot's disk; the NBD room closes the export within a second.
    fn fence(&self, mac: Mac) {
        self.fleet().holds.remove(&mac);
        self.work_changed();
    }

    /// Starts moves for nodes that need a restart into a new role (or back to the pool), as soon as the
    /// planner decides them, until the task is dropped.
    pub async fn run_mover(self: Arc<Self>) {
        loop {
            let pending: Vec<(Mac, Instant)> =
                self.fleet().reboot.iter().map(|(m, t)| (*m, *t)).collect();
            for (mac, decided) in pending {
                if !self.moving(mac) && !self.fleet().manual.contains(&mac) {
                    self.clone().start_move(mac, decided);
                }
            }
            tokio::select! {
                _ = self.mover_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    fn start_move(self: Arc<Self>, mac: Mac, decided: Instant) {
        let state = self.state();
        let Some(policy) = state.policy.clone() else {
            return;
        };
        let to = self.slot_of(mac);
        let from = self.fleet().holds.get(&mac).cloned();
        let mut problems = Vec::new();
        let driver = self.power_driver(mac).unwrap_or_else(|e| {
            problems.push(format!("power driver: {e}"));
            None
        });
        let grace = from
            .as_ref()
            .and_then(|f| policy.cluster(&f.cluster))
            .map(|c| c.spec.drain.grace.0)
            .unwrap_or(30);
        let agent = self.agent_alive(mac, unix_ms());
        if !agent && driver.is_none() {
            // Nothing corral can do: the node moves when someone restarts it (it then asks for its new
            // script). It cannot be fenced either, so its old slot's disk is closed to it now.
            {
                let mut fleet = self.fleet();
                fleet.manual.insert(mac);
                fleet.holds.remove(&mac);
            }
            self.work_changed();
            let cluster = to.as_ref().or(from.as_ref()).map(|s| s.cluster.clone());
            let why = if problems.is_empty() {
                "no power control and no running agent".to_string()
            } else {
                problems.join("; ")
            };
            self.move_event(
                mac,
                cluster,
                EventKind::MoveManual,
                format!("{mac} must be restarted by hand to take its new role: {why}"),
                None,
            );
            return;
        }
        let spec = MoveSpec {
            agent,
            power: driver.is_some(),
            to_role: to.is_some(),
            grace_ms: grace * 1000,
            off_timeout_ms: policy.power_off_timeout * 1000,
            boot_timeout_ms: policy.boot_timeout * 1000,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.core().moves.insert(mac, tx);
        let slot = |s: &Option<crate::policy::plan::SlotRef>| match s {
            Some(s) => format!("{}/{}", s.cluster, s.slot),
            None => "the pool".into(),
        };
        let msg = format!(
            "moving {mac} from {} to {} (agent: {}, power: {}){}",
            slot(&from),
            slot(&to),
            if spec.agent { "running" } else { "none" },
            driver.as_ref().map(|d| d.kind()).unwrap_or("none"),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; {}", problems.join("; "))
            }
        );
        let cluster = to.as_ref().or(from.as_ref()).map(|s| s.cluster.clone());
        let waited = decided.elapsed().as_secs_f64();
        self.move_event(
            mac,
            cluster.clone(),
            EventKind::MoveStart,
            msg,
            Some(waited),
        );
        tokio::spawn(self.drive(mac, cluster, spec, driver, rx, decided));
    }

    fn move_event(
        &self,
        mac: Mac,
        cluster: Option<String>,
        kind: EventKind,
        message: String,
        secs: Option<f64>,
    ) {
        tracing::info!(%mac, kind = kind.as_str(), secs, "{message}");
        let e = NewEvent {
            at: crate::unix_now(),
            kind,
            cluster,
            node: Some(mac.to_string()),
            message,
            secs,
        };
        if let Err(err) = self.store.apply(&[], &[e]) {
            tracing::error!(error = %err, "cannot record a move event");
        }
    }

    async fn drive(
        self: Arc<Self>,
        mac: Mac,
        cluster: Option<String>,
        spec: MoveSpec,
        driver: Option<Arc<dyn PowerDriver>>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Input>,
        decided: Instant,
    ) {
        let t0 = Instant::now();
        let ms = move || t0.elapsed().as_millis() as u64;
        // Server-side time: from the decision to the move's start, plus every call corral makes itself
        // (orders, power calls, fencing). The rest is the node: its drain hook, shutdown, firmware, kernel.
        let mut server = t0.duration_since(decided);
        let (mut m, first) = Move::start(spec, 0);
        let mut queue: VecDeque<Output> = first.into();
        let mut fenced = false;
        // Whether the node was switched on into its new place: a move that fails after that is a boot
        // that did not come up (the node's fault, or the slot's when several nodes fail in a row).
        let mut powered_on = false;
        let outcome = loop {
            let mut finished = None;
            while let Some(o) = queue.pop_front() {
                let t = Instant::now();
                match o {
                    Output::Order(kind) => {
                        self.send_order(mac, kind);
                        server += t.elapsed();
                    }
                    Output::Fence => {
                        fenced = true;
                        self.fence(mac);
                        server += t.elapsed();
                    }
                    Output::Power(call) => {
                        let result = match &driver {
                            Some(d) => {
                                let d = d.clone();
                                tokio::task::spawn_blocking(move || power_call(&*d, call))
                                    .await
                                    .unwrap_or_else(|e| Err(format!("power call panicked: {e}")))
                            }
                            None => Err("no power driver".into()),
                        };
                        server += t.elapsed();
                        if let Err(e) = &result {
                            tracing::warn!(%mac, ?call, error = %e, "power call failed");
                        }
                        queue.extend(m.on(Input::Power { call, result }, ms()));
                    }
                    Output::Event {
                        kind,
                        message,
                        secs,
                    } => {
                        powered_on |= kind == EventKind::MovePowerOn;
                        self.fleet().steps.insert(mac, kind.to_string());
                        self.work_changed();
                        self.move_event(mac, cluster.clone(), kind, message, Some(secs))
                    }
                    Output::Finished { ok, message } => finished = Some((ok, message)),
                }
            }
            if let Some(f) = finished {
                break f;
            }
            let input = tokio::select! {
                i = rx.recv() => i.unwrap_or(Input::Tick),
                _ = tokio::time::sleep(TICK) => Input::Tick,
            };
            queue.extend(m.on(input, ms()));
        };
        let total = t0.elapsed().as_secs_f64() + t0.duration_since(decided).as_secs_f64();
        let (ok, message) = outcome;
        // A node that failed before it was switched off may still run its old role. Closing its disk
        // export fences it, unless it shares an address with whoever gets the slot next (a fixed slot
        // address): then the hold stays until an operator or a later boot clears it.
        let held = self.fleet().holds.get(&mac).cloned();
        let keep_hold = !ok
            && !fenced
            && held
                .as_ref()
                .is_some_and(|s| self.slot_has_fixed_address(s));
        {
            let mut fleet = self.fleet();
            // A move confirms the node in its *current* place (a heartbeat in the role it holds now, or
            // parked while it holds none), so a decision made during the move is carried out too.
            fleet.reboot.remove(&mac);
            fleet.steps.remove(&mac);
            if !keep_hold {
                fleet.holds.remove(&mac);
            }
        }
        self.work_changed();
        // Only now may a new move start: the state above is settled.
        self.core().moves.remove(&mac);
        if !ok {
            if let (true, Some(slot)) = (powered_on, self.slot_of(mac)) {
                self.boot_failed_in(mac, &slot);
            }
            self.mark_failed(mac, false, &message);
        }
        if let (true, Some(s)) = (keep_hold, held) {
            self.alert(
                Some(mac),
                Some(&s.cluster),
                format!(
                    "{mac} could not be switched off and shares {}/{}'s fixed address: the slot stays held until it boots again or is released",
                    s.cluster, s.slot
                ),
            );
        }
        let kind = if ok {
            EventKind::MoveDone
        } else {
            EventKind::NodeFailed
        };
        self.move_event(
            mac,
            cluster,
            kind,
            format!(
                "{message}: {total:.2} s from the decision, {:.3} s of it server side",
                server.as_secs_f64()
            ),
            Some(total),
        );
        if !ok {
            // Its slot goes to another node.
            if let Err(e) = self.replan(crate::unix_now()) {
                tracing::error!(error = %e, "planning after a failed move failed");
            }
        }
    }
}

impl Controller {
    /// `mac` did not come up in `slot` after a move: counted against the slot, which is blocked when
    /// the cluster's failover attempts' worth of different nodes failed in it in a row.
    fn boot_failed_in(&self, mac: Mac, slot: &SlotRef) {
        let limit = self.failover_rules(&slot.cluster).map_or(3, |r| r.attempts);
        let now_ms = unix_ms();
        let blocked = {
            let mut fleet = self.fleet();
            let blocked = fleet.boot_failures.failed(slot, mac, now_ms, limit);
            if blocked {
                fleet.state.blocked.insert(slot.clone());
            }
            blocked
        };
        if blocked {
            self.alert(
                Some(mac),
                Some(&slot.cluster),
                format!(
                    "{limit} nodes in a row failed to come up in {}/{} (the last: {mac}): no node is put in it for {} min or until the policy is reloaded; check its image and disk",
                    slot.cluster,
                    slot.slot,
                    super::failover::SLOT_BLOCK_MS / 60_000
                ),
            );
            self.event(
                EventKind::SlotBlocked,
                Some(mac),
                Some(&slot.cluster),
                format!(
                    "{}/{} is blocked: {limit} nodes in a row failed to come up in it",
                    slot.cluster, slot.slot
                ),
                None,
            );
        }
    }
}

fn power_call(d: &dyn PowerDriver, call: Call) -> Result<Option<PowerState>, String> {
    let r = match call {
        Call::Off { hard } => d.off(hard).map(|_| None),
        Call::On => d.on().map(|_| None),
        Call::BootNetwork => d.boot_network_once().map(|_| None),
        Call::Status => d.status().map(Some),
    };
    r.map_err(|e| e.to_string())
}
