//! The event vocabulary: every kind of event corral records, with the stable name it has in the store,
//! the API (`GET /api/v1/events`, `kind`), the CLI and webhooks. These names are a public API: a kind may
//! be added, never renamed or given another meaning.

use std::fmt;

macro_rules! kinds {
    ($($(#[doc = $doc:literal])+ $variant:ident = $name:literal,)+) => {
        /// What an event reports. Serialised as its stable name (`move-done`, ...).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl EventKind {
            /// Every kind, in the order documented here.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant,)+];

            /// The stable name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $name,)+
                }
            }

            /// What the kind means, for the API's documentation.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(EventKind::$variant => concat!($($doc),+).trim_start(),)+
                }
            }
        }

        impl std::str::FromStr for EventKind {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok(EventKind::$variant),)+
                    _ => Err(format!("`{s}` is not an event kind")),
                }
            }
        }
    };
}

kinds! {
    /// The planner put an idle node in a cluster slot.
    Assign = "assign",
    /// The planner took a node out of its slot (scale down, policy change).
    Release = "release",
    /// The planner moved a node from a lower-priority cluster's slot to a higher one's.
    Preempt = "preempt",
    /// A cluster is short of nodes or below its minimum (raised once when it starts).
    Alert = "alert",
    /// A scale rule changed a cluster's desired count.
    Scale = "scale",
    /// A configuration or policy reload took effect.
    Reload = "reload",
    /// A configuration or policy reload was refused; the running one stays.
    ReloadRejected = "reload-rejected",
    /// Old events, expired leases or never-assigned nodes were pruned.
    Prune = "prune",
    /// Slot secrets (CHAP, NBD PSK) were generated for slots the credentials file gives none.
    Secrets = "secrets",
    /// A slot disk could not be prepared or reset.
    DiskError = "disk-error",
    /// A node's agent sent its first heartbeat of a boot.
    AgentUp = "agent-up",
    /// A move of a running node into its new role (or back to the pool) started.
    MoveStart = "move-start",
    /// The node's agent was told to drain.
    MoveDrain = "move-drain",
    /// The drain failed or timed out; the move goes on.
    MoveDrainFailed = "move-drain-failed",
    /// The node was asked to power off (agent or BMC).
    MovePowerOff = "move-power-off",
    /// A soft power-off did not work in time: switched off hard.
    MoveHardOff = "move-hard-off",
    /// The node's boot image and disk were reset for its new role.
    MoveReset = "move-reset",
    /// The node was switched on into its new role.
    MovePowerOn = "move-power-on",
    /// The node came up in its new place (a heartbeat in its role, or parked).
    MoveConfirmed = "move-confirmed",
    /// A step of a move failed.
    MoveFailed = "move-failed",
    /// The move finished, with its duration.
    MoveDone = "move-done",
    /// corral cannot restart the node (no power control, no agent): a person must.
    MoveManual = "move-manual",
    /// A move under way when corral stopped starts again after its restart.
    MoveResumed = "move-resumed",
    /// A hold on a slot's disk that nothing explained after a restart was released.
    HoldRolledBack = "hold-rolled-back",
    /// A node failed (health verdict, move failure, or a replacement that did not come up).
    NodeFailed = "node-failed",
    /// A fenced node was switched on again to rejoin the pool.
    NodeRestart = "node-restart",
    /// A failed node booted again and is back in the pool.
    NodeBack = "node-back",
    /// The operator returned a failed or quarantined node to the pool.
    NodeReleased = "node-released",
    /// A node in a slot failed its health checks: failing over.
    HealthFailed = "health-failed",
    /// A node in a slot is slow (a performance threshold held): its slot may move.
    HealthSlow = "health-slow",
    /// A slow node stays in its slot: no capable replacement.
    SlowStay = "slow-stay",
    /// A failed node was cut off from its slot's disk (switched off).
    Fence = "fence",
    /// A fence under way when corral stopped is done again after its restart.
    FenceResumed = "fence-resumed",
    /// A failed node is left running, cut off from the disk, for investigation.
    Quarantine = "quarantine",
    /// A replacement node was chosen for a failed-over slot.
    FailoverAssign = "failover-assign",
    /// A replacement taken from the pool was off: switched on.
    FailoverPowerOn = "failover-power-on",
    /// A failed-over slot runs again on its replacement, with the time it took.
    FailoverDone = "failover-done",
    /// A failover under way when corral stopped is followed again after its restart.
    FailoverResumed = "failover-resumed",
    /// Several nodes in a row failed to boot into a slot: no node is put in it for a while.
    SlotBlocked = "slot-blocked",
    /// A blocked slot may be filled again (its time ran out, or the policy was reloaded).
    SlotUnblocked = "slot-unblocked",
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl rusqlite::ToSql for EventKind {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_round_trip_and_documented() {
        let mut seen = std::collections::BTreeSet::new();
        for k in EventKind::ALL {
            assert!(seen.insert(k.as_str()), "{k} twice");
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), *k);
            let json = serde_json::to_string(k).unwrap();
            assert_eq!(json, format!("\"{k}\""));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), *k);
            assert!(!k.meaning().is_empty());
        }
        assert!("move-teleport".parse::<EventKind>().is_err());
    }
}
