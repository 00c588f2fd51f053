//! What the agent and corral say to each other over HTTP (JSON bodies; the node's boot token as a bearer
//! token):
//!
//! - `POST /api/v1/agent/heartbeat` with a [`Heartbeat`]; the answer is a [`HeartbeatReply`].
//! - `GET /api/v1/agent/orders?wait=SECS`: an [`Order`] as soon as there is one (`200`), or `204` after
//!   `wait` seconds without one (a long poll, so an order reaches the node at once, not at its next beat).
//! - `POST /api/v1/agent/ack` with an [`Ack`] when an order is carried out (for poweroff and reboot: just
//!   before).

use serde::{Deserialize, Serialize};

/// A node's figures at one moment. Counters are totals since the node booted; corral works out rates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Heartbeat {
    /// 1-minute load average.
    pub load1: f64,
    pub cpus: u32,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// Pages swapped in and out (vmstat pswpin/pswpout).
    pub swap_in: u64,
    pub swap_out: u64,
    /// Sectors read and written by all disks (diskstats).
    pub io_read_sectors: u64,
    pub io_write_sectors: u64,
    /// The application says its work must not be interrupted.
    pub busy: bool,
    pub uptime_secs: f64,
    /// The host name the node runs under (its role's identity).
    pub hostname: String,
    /// The image's service groups, as the agent supervises them.
    pub groups: Vec<GroupStatus>,
}

/// Where a service group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupState {
    /// Its resources are being started.
    Starting,
    /// Every resource runs and passes its check.
    Running,
    /// A resource failed and local restarts did not help: corral should fail the node over.
    Failed,
}

/// One service group's status in a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub state: GroupState,
    /// What failed, or what runs.
    pub detail: String,
}

impl Heartbeat {
    /// 0.0 (idle) ..= 1.0 (every CPU busy), from the load average.
    pub fn utilisation(&self) -> f64 {
        if self.cpus == 0 || !self.load1.is_finite() {
            return 0.0;
        }
        (self.load1 / self.cpus as f64).clamp(0.0, 1.0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// Seconds until the next heartbeat.
    pub interval_secs: u64,
}

/// Something corral asks of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
    #[serde(flatten)]
    pub kind: OrderKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "order", rename_all = "lowercase")]
pub enum OrderKind {
    /// Run the image's drain hook (stop the application), for at most `grace_secs`.
    Drain { grace_secs: u64 },
    /// Power the node off.
    Poweroff,
    /// Restart the node (it netboots again).
    Reboot,
}

impl OrderKind {
    pub fn name(&self) -> &'static str {
        match self {
            OrderKind::Drain { .. } => "drain",
            OrderKind::Poweroff => "poweroff",
            OrderKind::Reboot => "reboot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub id: u64,
    pub ok: bool,
    /// What went wrong, or what the hook printed last.
    #[serde(default)]
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_round_trip_in_their_wire_form() {
        let o = Order {
            id: 7,
            kind: OrderKind::Drain { grace_secs: 30 },
        };
        let j = serde_json::to_string(&o).unwrap();
        assert_eq!(j, r#"{"id":7,"order":"drain","grace_secs":30}"#);
        assert_eq!(serde_json::from_str::<Order>(&j).unwrap(), o);
        let p: Order = serde_json::from_str(r#"{"id":8,"order":"poweroff"}"#).unwrap();
        assert_eq!(p.kind, OrderKind::Poweroff);
        assert!(serde_json::from_str::<Order>(r#"{"id":9,"order":"format-disk"}"#).is_err());
    }

    #[test]
    fn utilisation_is_load_per_cpu_within_bounds() {
        let h = |load1, cpus| Heartbeat {
            load1,
            cpus,
            ..Default::default()
        };
        assert_eq!(h(1.0, 4).utilisation(), 0.25);
        assert_eq!(h(9.0, 4).utilisation(), 1.0);
        assert_eq!(h(1.0, 0).utilisation(), 0.0);
        assert_eq!(h(f64::NAN, 2).utilisation(), 0.0);
    }
}
