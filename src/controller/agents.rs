//! The controller's side of the agents: a token for every boot into a role (put on that boot's kernel
//! command line), heartbeats, and orders waiting for a node's agent to fetch them.
//!
//! A token names one node and the role it booted into. The rules of who gets one and when it rotates are
//! in [`super::trust::TokenBook`]: one token per boot (a script fetched twice in a boot carries the same
//! one), handed only to a request from the node's own address; a new boot's token replaces the old one
//! once it is first used, so an image that is gone (the node was moved) cannot speak for the node any
//! more, and a script fetched but never booted cannot cut a running agent off. Tokens are stored, so a
//! restart of corral does not cut its agents off.

use crate::events::EventKind;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::moves::Input;
use super::trust::{TokenBook, TokenChange};
use super::Controller;
use crate::agent::proto::{Ack, Heartbeat, HeartbeatReply, Order, OrderKind};
use crate::domain::{Mac, SlotRef};
use crate::store::NewEvent;

/// A heartbeat as last received.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Beat {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub heartbeat: Heartbeat,
    pub role: Option<SlotRef>,
}

#[derive(Default)]
pub struct Agents {
    /// Every node's boot tokens.
    pub(super) book: TokenBook,
    pub(super) beats: HashMap<Mac, Beat>,
    /// The token the node's last heartbeat carried: a heartbeat with another is a new boot's first.
    beat_token: HashMap<Mac, String>,
    orders: HashMap<Mac, Order>,
    /// The id of the latest order sent to each node: an acknowledgement of an earlier one is stale.
    latest: HashMap<Mac, u64>,
    wakers: HashMap<Mac, Arc<tokio::sync::Notify>>,
    next_order: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AgentError {
    /// Unknown token, or one of an earlier boot.
    Unauthorized,
}

/// 128 random bits, hex.
fn new_token() -> String {
    super::trust::random_hex(16)
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agents {
    /// A node leaves the inventory: its tokens, beats and orders go.
    pub fn forget(&mut self, mac: Mac) {
        self.book.forget(mac);
        self.beats.remove(&mac);
        self.beat_token.remove(&mac);
        self.orders.remove(&mac);
        self.latest.remove(&mac);
        self.wakers.remove(&mac);
    }
}

impl Controller {
    #[track_caller]
    pub(super) fn agents(&self) -> super::Part<'_, Agents> {
        self.part(|c| &c.agents, |c| &mut c.agents)
    }

    /// Seconds between heartbeats, from the policy.
    fn heartbeat_interval(&self) -> u64 {
        self.state()
            .policy
            .as_ref()
            .map(|p| p.heartbeat_interval)
            .unwrap_or(5)
    }

    /// Loads stored tokens (at start): the current table, and rows of the older one-token table as used
    /// current tokens. Epochs count from 0 again after a restart, so every stored grant is of boot 0.
    pub(crate) fn load_agent_tokens(&self) {
        use super::trust::{Grant, NodeTokens};
        let mut a = self.agents();
        if let Ok(docs) = self.store.node_token_docs() {
            for (mac, doc) in docs {
                // A row we cannot read is skipped: that node's agent gets a token at its next boot.
                if let Ok(mut t) = serde_json::from_str::<NodeTokens>(&doc) {
                    t.current.epoch = 0;
                    if let Some(p) = t.previous.as_mut() {
                        p.epoch = 0;
                    }
                    a.book.restore(mac, t);
                }
            }
        }
        if let Ok(old) = self.store.agent_tokens() {
            for t in old {
                if a.book.tokens(t.mac).is_some() {
                    continue;
                }
                let role = t.role.map(|(cluster, slot)| SlotRef { cluster, slot });
                a.book.restore(
                    t.mac,
                    NodeTokens {
                        current: Grant {
                            token: t.token,
                            role,
                            epoch: 0,
                            issued: t.issued,
                            used: true,
                        },
                        previous: None,
                    },
                );
            }
        }
    }

    /// The token for the script `mac` is fetching (from its own address) to boot into `role`: the same
    /// within one boot, a new one for a new boot (see [`TokenBook::for_script`]).
    pub fn script_token(&self, mac: Mac, role: Option<&SlotRef>, now: u64) -> String {
        // One turn of the core: the boot DHCP counts, the token, and the row queued for the writer.
        let mut core = self.core();
        let epoch = core.identity.sightings.epoch(mac);
        let (token, change) = core
            .agents
            .book
            .for_script(mac, epoch, role, now, new_token);
        let queued = queue_token_row(&mut core.tokens_due, change);
        drop(core);
        self.wake_writer_if(queued);
        token
    }

    /// Wakes the writer ([`Controller::flush`]) for a token row just queued: the script and heartbeat
    /// paths never wait for SQLite. A token is in memory (and answers) from the moment it is queued; it
    /// is on disk within a commit or so. If corral is killed in between, that boot's agent is refused
    /// after the restart and the node is treated as one whose agent went silent.
    fn wake_writer_if(&self, queued: bool) {
        if queued {
            self.writer_wake.notify_one();
        }
    }

    /// The node and role of a token (using it: the first use of a new boot's token retires the old one).
    fn node_of(&self, token: &str) -> Result<(Mac, Option<SlotRef>), AgentError> {
        let mut core = self.core();
        let found = core.agents.book.authenticate(token);
        let (mac, role, _current, change) = found.ok_or(AgentError::Unauthorized)?;
        let queued = queue_token_row(&mut core.tokens_due, change);
        drop(core);
        self.wake_writer_if(queued);
        Ok((mac, role))
    }

    /// A heartbeat from the agent holding `token`.
    pub fn agent_heartbeat(
        &self,
        token: &str,
        hb: Heartbeat,
        now_ms: u64,
    ) -> Result<HeartbeatReply, AgentError> {
        let (mac, role) = self.node_of(token)?;
        let interval = self.heartbeat_interval();
        let first = {
            let mut a = self.agents();
            // Every boot gets its own token, so the first heartbeat with a token is the boot's first
            // (uptimes cannot tell: a reboot may beat later in its boot than the last beat of the one
            // before it).
            let first = a.beat_token.get(&mac).map(String::as_str) != Some(token);
            if first {
                a.beat_token.insert(mac, token.to_string());
            }
            a.beats.insert(
                mac,
                Beat {
                    at_ms: now_ms,
                    heartbeat: hb.clone(),
                    role: role.clone(),
                },
            );
            first
        };
        let current = {
            let mut fleet = self.fleet();
            // Written (and so published) only when it changed: most heartbeats repeat the last one.
            let utilisation = hb.utilisation();
            let same = fleet
                .state
                .nodes
                .get(&mac)
                .is_none_or(|n| n.busy == hb.busy && n.utilisation == utilisation);
            if !same {
                if let Some(n) = fleet.state.nodes.get_mut(&mac) {
                    n.busy = hb.busy;
                    n.utilisation = utilisation;
                }
            }
            fleet.state.assignments.get(&mac).cloned()
        };
        if first {
            let what = match &role {
                Some(r) => format!("{}/{}", r.cluster, r.slot),
                None => "no role".into(),
            };
            let msg = format!("{mac}'s agent is up as {} ({what})", hb.hostname);
            tracing::info!("{msg}");
            let mut e = NewEvent::new(now_ms / 1000, EventKind::AgentUp, msg);
            e.node = Some(mac.to_string());
            e.cluster = role.as_ref().map(|r| r.cluster.clone());
            let _ = self.store.apply(&[], &[e]);
        }
        if role.is_some() && role == current {
            self.move_input(mac, Input::NewRoleHeartbeat);
        }
        self.health_heartbeat(mac, role.as_ref(), &hb, now_ms);
        Ok(HeartbeatReply {
            interval_secs: interval,
        })
    }

    /// The node's last heartbeat, if any.
    pub fn last_beat(&self, mac: Mac) -> Option<Beat> {
        self.agents().beats.get(&mac).cloned()
    }

    /// Whether the node's agent heartbeated within three intervals (it can take orders).
    pub fn agent_alive(&self, mac: Mac, now_ms: u64) -> bool {
        let interval = self.heartbeat_interval();
        self.agents()
            .beats
            .get(&mac)
            .is_some_and(|b| now_ms.saturating_sub(b.at_ms) <= 3 * interval * 1000 + 1000)
    }

    /// Queues an order for the node's agent (replacing one not yet fetched) and wakes its long poll.
    pub fn send_order(&self, mac: Mac, kind: OrderKind) -> u64 {
        let mut a = self.agents();
        a.next_order += 1;
        let id = a.next_order;
        a.orders.insert(mac, Order { id, kind });
        a.latest.insert(mac, id);
        // Every waiter wakes: a long poll of an earlier boot (its node rebooted while corral held the
        // request) must not swallow the order; it finds its token dead and leaves it for the current one.
        if let Some(w) = a.wakers.get(&mac) {
            w.notify_waiters();
        }
        id
    }

    /// What the agent holding `token` waits on: its node and a notifier that fires on a new order.
    pub fn agent_waiter(&self, token: &str) -> Result<(Mac, Arc<tokio::sync::Notify>), AgentError> {
        let (mac, _) = self.node_of(token)?;
        let w = self.agents().wakers.entry(mac).or_default().clone();
        Ok((mac, w))
    }

    /// The node's pending order, handed out once, and only to the agent of the node's current boot.
    pub fn take_order(&self, token: &str) -> Result<Option<Order>, AgentError> {
        let mut a = self.agents();
        let mac = a.book.holder(token).ok_or(AgentError::Unauthorized)?;
        let current = a.book.tokens(mac).is_some_and(|t| t.current.token == token);
        if !current {
            // An earlier boot's agent (still honoured for its heartbeats) gets no orders meant for the
            // node's new role.
            return Ok(None);
        }
        Ok(a.orders.remove(&mac))
    }

    /// The agent says an order is done.
    pub fn agent_ack(&self, token: &str, ack: Ack) -> Result<(), AgentError> {
        let (mac, _) = self.node_of(token)?;
        tracing::info!(%mac, id = ack.id, ok = ack.ok, detail = %ack.detail, "agent acknowledged an order");
        // A late acknowledgement of an earlier order (a drain that overran its grace, say) must not be
        // taken for the answer to the current one.
        if self.agents().latest.get(&mac) != Some(&ack.id) {
            tracing::info!(%mac, id = ack.id, "stale acknowledgement ignored");
            return Ok(());
        }
        self.move_input(
            mac,
            Input::Acked {
                ok: ack.ok,
                detail: ack.detail,
            },
        );
        Ok(())
    }
}

/// Queues the row of a changed token for the writer (the newest per node); says whether one was queued.
fn queue_token_row(due: &mut BTreeMap<Mac, String>, change: Option<TokenChange>) -> bool {
    match change {
        Some(TokenChange::Put(mac, t)) => {
            due.insert(mac, serde_json::to_string(&t).unwrap_or_default());
            true
        }
        _ => false,
    }
}
