//! Re-provisioning one node, as a state machine with no I/O and no clock inside (the seed's method):
//!
//! 1. **drain**: the node's agent runs the image's drain hook (the application's stop command), for at
//!    most the cluster's grace period;
//! 2. **power off**: the agent powers the node off (else the BMC's soft off); after `power_off_timeout`
//!    the BMC cuts it hard; the step ends when the BMC reports the node off;
//! 3. **reset**: the node is fenced from its old slot's disk (its export closes), its next boot is set to
//!    the network where the BMC can;
//! 4. **power on**;
//! 5. **confirm**: the new role's agent heartbeats with the token of this boot (or, for a node returned to
//!    the pool, it asks for its parked script) within `boot_timeout`; otherwise the move fails, the node is
//!    cut off and marked failed, and the planner picks another node.
//!
//! A node without power control but with an agent is restarted by its agent (drain, reset, reboot,
//! confirm). A node with neither cannot be moved: the move fails at once and says so.
//!
//! The shell ([`super::mover`]) feeds [`Input`]s (the clock, agent acks and heartbeats, power results)
//! and carries out the [`Output`]s; every step ends with an event that carries its duration.

use crate::agent::proto::OrderKind;
use crate::events::EventKind;
use crate::power::PowerState;

/// What the shell knows about the node when the move starts.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveSpec {
    /// The node heartbeated recently: it can drain and power itself off.
    pub agent: bool,
    /// The node has a power driver.
    pub power: bool,
    /// The new role, or `None` when the node goes back to the pool.
    pub to_role: bool,
    pub grace_ms: u64,
    pub off_timeout_ms: u64,
    pub boot_timeout_ms: u64,
}

/// A power call the shell makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Off { hard: bool },
    On,
    BootNetwork,
    Status,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Time passes (the shell ticks a few times a second).
    Tick,
    /// The agent reports an order done.
    Acked { ok: bool, detail: String },
    /// A power call finished.
    Power {
        call: Call,
        result: Result<Option<PowerState>, String>,
    },
    /// The node's agent heartbeated with the token of the boot into the role it now holds.
    NewRoleHeartbeat,
    /// The node asked for its script while unassigned (it is parked in the pool).
    Parked,
    // Either confirms a move, whatever its plan was: the planner may have given a node on its way to the
    // pool a new role (or released one on its way to a role) while it was being moved; the node is up in
    // its current place either way. The shell sends each only when it holds.
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Order(OrderKind),
    Power(Call),
    /// End the node's hold on its old slot's disk and close the export.
    Fence,
    /// A step ended: `kind` is the event kind, `secs` how long the step took.
    Event {
        kind: EventKind,
        message: String,
        secs: f64,
    },
    /// The move is over.
    Finished {
        ok: bool,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Draining,
    PoweringOff,
    Resetting,
    PoweringOn,
    Confirming,
    Done,
}

#[derive(Debug, Clone)]
pub struct Move {
    spec: MoveSpec,
    step: Step,
    started: u64,
    step_started: u64,
    deadline: u64,
    hard_sent: bool,
    /// When the agent acknowledged the poweroff order.
    off_acked: Option<u64>,
    /// A power call is out: do not send another until its result is in.
    pending: Option<Call>,
}

/// Bound on the wait for a hard off to show.
const HARD_OFF_MS: u64 = 30_000;
/// A switch that cannot tell on from off (Wake-on-LAN) takes the agent's word: this long after it
/// acknowledged the poweroff order, the node counts as off.
const ASSUME_OFF_MS: u64 = 5_000;
/// An agent that does not answer a drain order gets this long beyond its grace.
const ACK_SLACK_MS: u64 = 5_000;

impl Move {
    /// Starts a move at `now` (milliseconds); returns it with its first outputs.
    pub fn start(spec: MoveSpec, now: u64) -> (Move, Vec<Output>) {
        let mut m = Move {
            spec,
            step: Step::Draining,
            started: now,
            step_started: now,
            deadline: now,
            hard_sent: false,
            off_acked: None,
            pending: None,
        };
        let mut out = Vec::new();
        if !m.spec.agent && !m.spec.power {
            m.finish(
                false,
                "the node has no power control and no running agent: it cannot be moved; restart it by hand",
                &mut out,
            );
        } else if m.spec.agent {
            m.deadline = now + m.spec.grace_ms + ACK_SLACK_MS;
            out.push(Output::Order(OrderKind::Drain {
                grace_secs: m.spec.grace_ms.div_ceil(1000),
            }));
        } else {
            out.push(Output::Event {
                kind: EventKind::MoveDrain,
                message: "no running agent: nothing to drain".into(),
                secs: 0.0,
            });
            m.power_off(now, &mut out);
        }
        (m, out)
    }

    pub fn step(&self) -> Step {
        self.step
    }

    fn secs(&self, now: u64) -> f64 {
        now.saturating_sub(self.step_started) as f64 / 1000.0
    }

    fn enter(&mut self, step: Step, now: u64) {
        self.step = step;
        self.step_started = now;
    }

    fn finish(&mut self, ok: bool, message: &str, out: &mut Vec<Output>) {
        self.step = Step::Done;
        out.push(Output::Finished {
            ok,
            message: message.to_string(),
        });
    }

    fn call(&mut self, c: Call, out: &mut Vec<Output>) {
        self.pending = Some(c);
        out.push(Output::Power(c));
    }

    fn power_off(&mut self, now: u64, out: &mut Vec<Output>) {
        self.enter(Step::PoweringOff, now);
        if !self.spec.power {
            // Only the agent can restart it: the reset happens first, then the reboot order.
            self.reset(now, out);
            return;
        }
        self.deadline = now + self.spec.off_timeout_ms;
        if self.spec.agent {
            out.push(Output::Order(OrderKind::Poweroff));
        } else {
            self.call(Call::Off { hard: false }, out);
        }
    }

    fn reset(&mut self, now: u64, out: &mut Vec<Output>) {
        self.enter(Step::Resetting, now);
        out.push(Output::Fence);
        if self.spec.power {
            self.call(Call::BootNetwork, out);
        } else {
            out.push(Output::Event {
                kind: EventKind::MoveReset,
                message: "fenced from the old slot's disk; the agent restarts the node".into(),
                secs: 0.0,
            });
            out.push(Output::Order(OrderKind::Reboot));
            self.confirm(now, out);
        }
    }

    fn confirm(&mut self, now: u64, out: &mut Vec<Output>) {
        self.enter(Step::Confirming, now);
        self.deadline = now + self.spec.boot_timeout_ms;
        let _ = out;
    }

    /// Feeds one input at `now`; returns what to do.
    pub fn on(&mut self, input: Input, now: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if let Input::Power { call, .. } = &input {
            if self.pending == Some(*call) {
                self.pending = None;
            }
        }
        match (self.step, input) {
            (Step::Done, _) => {}
            (Step::Draining, Input::Acked { ok, detail }) => {
                let kind = if ok {
                    EventKind::MoveDrain
                } else {
                    EventKind::MoveDrainFailed
                };
                out.push(Output::Event {
                    kind,
                    message: detail,
                    secs: self.secs(now),
                });
                self.power_off(now, &mut out);
            }
            (Step::Draining, Input::Tick) if now >= self.deadline => {
                out.push(Output::Event {
                    kind: EventKind::MoveDrainFailed,
                    message: "the agent did not report the drain done in time".into(),
                    secs: self.secs(now),
                });
                self.power_off(now, &mut out);
            }
            (Step::PoweringOff, Input::Acked { .. }) => {
                self.off_acked = Some(now);
            }
            (
                Step::PoweringOff,
                Input::Power {
                    call: Call::Status,
                    result: Ok(Some(PowerState::Unknown)),
                },
            ) if self.off_acked.is_some_and(|t| now >= t + ASSUME_OFF_MS) => {
                out.push(Output::Event {
                    kind: EventKind::MovePowerOff,
                    message: format!(
                        "assumed off: the agent acknowledged the poweroff {} s ago and the switch cannot tell",
                        ASSUME_OFF_MS / 1000
                    ),
                    secs: self.secs(now),
                });
                self.reset(now, &mut out);
            }
            (Step::PoweringOff, Input::Tick) => {
                if now >= self.deadline && !self.hard_sent {
                    self.hard_sent = true;
                    self.deadline = now + HARD_OFF_MS;
                    out.push(Output::Event {
                        kind: EventKind::MoveHardOff,
                        message: "still on after the power-off timeout: cutting power".into(),
                        secs: self.secs(now),
                    });
                    self.call(Call::Off { hard: true }, &mut out);
                } else if now >= self.deadline {
                    out.push(Output::Event {
                        kind: EventKind::MoveFailed,
                        message: "the node did not power off".into(),
                        secs: self.secs(now),
                    });
                    self.finish(false, "the node did not power off", &mut out);
                } else if self.pending.is_none() {
                    self.call(Call::Status, &mut out);
                }
            }
            (
                Step::PoweringOff,
                Input::Power {
                    call: Call::Status,
                    result: Ok(Some(PowerState::Off)),
                },
            ) => {
                let how = if self.hard_sent {
                    "cut hard"
                } else if self.spec.agent {
                    "by its agent"
                } else {
                    "by the BMC"
                };
                out.push(Output::Event {
                    kind: EventKind::MovePowerOff,
                    message: format!("powered off ({how})"),
                    secs: self.secs(now),
                });
                self.reset(now, &mut out);
            }
            (
                Step::PoweringOff,
                Input::Power {
                    call: Call::Off { hard },
                    result: Err(e),
                },
            ) => {
                if hard {
                    out.push(Output::Event {
                        kind: EventKind::MoveFailed,
                        message: format!("hard power off failed: {e}"),
                        secs: self.secs(now),
                    });
                    self.finish(false, &format!("hard power off failed: {e}"), &mut out);
                } else {
                    // The soft off was refused: go hard at once.
                    self.hard_sent = true;
                    self.deadline = now + HARD_OFF_MS;
                    self.call(Call::Off { hard: true }, &mut out);
                }
            }
            (
                Step::Resetting,
                Input::Power {
                    call: Call::BootNetwork,
                    result,
                },
            ) => {
                let message = match result {
                    Ok(_) => "fenced from the old slot's disk; next boot: network".to_string(),
                    // Not fatal: nodes here boot from the network first anyway.
                    Err(e) => format!("fenced from the old slot's disk; next boot not set: {e}"),
                };
                out.push(Output::Event {
                    kind: EventKind::MoveReset,
                    message,
                    secs: self.secs(now),
                });
                self.enter(Step::PoweringOn, now);
                self.call(Call::On, &mut out);
            }
            (
                Step::PoweringOn,
                Input::Power {
                    call: Call::On,
                    result,
                },
            ) => match result {
                Ok(_) => {
                    out.push(Output::Event {
                        kind: EventKind::MovePowerOn,
                        message: "powered on".into(),
                        secs: self.secs(now),
                    });
                    self.confirm(now, &mut out);
                }
                Err(e) => {
                    let msg = format!("power on failed: {e}");
                    out.push(Output::Event {
                        kind: EventKind::MoveFailed,
                        message: msg.clone(),
                        secs: self.secs(now),
                    });
                    self.finish(false, &msg, &mut out);
                }
            },
            (Step::Confirming, Input::NewRoleHeartbeat) => {
                let total = now.saturating_sub(self.started) as f64 / 1000.0;
                out.push(Output::Event {
                    kind: EventKind::MoveConfirmed,
                    message: format!("the node heartbeats in its role; whole move {total:.2} s"),
                    secs: self.secs(now),
                });
                self.finish(true, "moved", &mut out);
            }
            (Step::Confirming, Input::Parked) => {
                let total = now.saturating_sub(self.started) as f64 / 1000.0;
                out.push(Output::Event {
                    kind: EventKind::MoveConfirmed,
                    message: format!("back in the pool (parked); whole move {total:.2} s"),
                    secs: self.secs(now),
                });
                self.finish(true, "returned to the pool", &mut out);
            }
            (Step::Confirming, Input::Tick) if now >= self.deadline => {
                let msg = format!(
                    "no sign of the node {} s after power-on",
                    self.spec.boot_timeout_ms / 1000
                );
                out.push(Output::Event {
                    kind: EventKind::MoveFailed,
                    message: msg.clone(),
                    secs: self.secs(now),
                });
                if self.spec.power {
                    // Cut it off: a node that comes back late must not run beside its replacement.
                    out.push(Output::Power(Call::Off { hard: true }));
                }
                self.finish(false, &msg, &mut out);
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests;
