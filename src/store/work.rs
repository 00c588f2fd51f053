//! In-flight work as stored: what a restart of corral needs to finish or roll back what was under way.
//!
//! Per node ([`NodeWork`]): the slot whose disk it still holds (it may be running that slot's role until
//! it is switched off), a pending restart into its new role and the step its move had reached, or a
//! restart only a person can do. Per slot: its running failover, as a document the controller defines
//! (the store keeps it opaque, so the failover machine can grow without a migration).
//!
//! Both are replaced whole: the controller writes a snapshot of what is in flight, which stays small (a
//! row per node being moved or failed over, not per node).

use rusqlite::{params, Connection};

use super::{Result, Store};
use crate::mac::Mac;

/// One node's in-flight work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWork {
    pub mac: Mac,
    /// The slot (cluster, index) whose disk the node holds until it is fenced.
    pub hold: Option<(String, u32)>,
    /// A restart into its new role is pending since this moment (unix ms).
    pub restart_ms: Option<u64>,
    /// corral cannot restart it (no power control, no agent): a person must.
    pub manual: bool,
    /// The last step its move reached (an event kind such as `move-drain`), for the resume event.
    pub step: Option<String>,
}

/// One slot's running failover: the controller's document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverDoc {
    pub cluster: String,
    pub slot: u32,
    pub doc: String,
}

pub(super) fn replace_node_work(tx: &Connection, work: &[NodeWork]) -> Result<()> {
    tx.execute("DELETE FROM node_work", [])?;
    let mut st = tx.prepare_cached(
        "INSERT INTO node_work (mac, hold_cluster, hold_slot, restart_ms, manual, step) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for w in work {
        st.execute(params![
            w.mac.to_string(),
            w.hold.as_ref().map(|h| h.0.as_str()),
            w.hold.as_ref().map(|h| h.1 as i64),
            w.restart_ms.map(|t| t as i64),
            w.manual as i64,
            w.step
        ])?;
    }
    Ok(())
}

impl Store {
    /// Every node's in-flight work.
    pub fn node_work(&self) -> Result<Vec<NodeWork>> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT mac, hold_cluster, hold_slot, restart_ms, manual, step FROM node_work ORDER BY mac",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, cluster, slot, restart, manual, step) = row?;
                let Some(mac) = Mac::parse(&mac) else {
                    continue;
                };
                out.push(NodeWork {
                    mac,
                    hold: cluster.zip(slot).map(|(c, s)| (c, s.max(0) as u32)),
                    restart_ms: restart.map(|t| t.max(0) as u64),
                    manual: manual != 0,
                    step,
                });
            }
            Ok(out)
        })
    }

    /// Every running failover.
    pub fn failovers(&self) -> Result<Vec<FailoverDoc>> {
        self.with(|c| {
            let mut st =
                c.prepare_cached("SELECT cluster, slot, doc FROM failover ORDER BY cluster, slot")?;
            let rows = st.query_map([], |r| {
                Ok(FailoverDoc {
                    cluster: r.get(0)?,
                    slot: r.get::<_, i64>(1)?.max(0) as u32,
                    doc: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Replaces all in-flight work at once: the nodes' and the failovers'.
    pub fn save_work(&self, nodes: &[NodeWork], failovers: &[FailoverDoc]) -> Result<()> {
        let (nodes, failovers) = (nodes.to_vec(), failovers.to_vec());
        self.write(false, move |tx| {
            replace_node_work(tx, &nodes)?;
            tx.execute("DELETE FROM failover", [])?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO failover (cluster, slot, doc) VALUES (?1, ?2, ?3)",
                )?;
                for f in &failovers {
                    st.execute(params![f.cluster, f.slot as i64, f.doc])?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn work_is_replaced_whole_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let moving = NodeWork {
            mac: mac(1),
            hold: Some(("db".into(), 2)),
            restart_ms: Some(1_700_000_000_123),
            manual: false,
            step: Some("move-drain".into()),
        };
        let manual = NodeWork {
            mac: mac(2),
            hold: None,
            restart_ms: Some(5),
            manual: true,
            step: None,
        };
        let f = FailoverDoc {
            cluster: "db".into(),
            slot: 2,
            doc: "{\"old\":\"x\"}".into(),
        };
        s.save_work(&[moving.clone(), manual.clone()], std::slice::from_ref(&f))
            .unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.node_work().unwrap(), vec![moving.clone(), manual]);
        assert_eq!(s.failovers().unwrap(), vec![f]);
        // A plan replaces the nodes' work in the assignment's transaction; failovers stay.
        s.apply_plan(&[], &[], Some(std::slice::from_ref(&moving)))
            .unwrap();
        assert_eq!(s.node_work().unwrap(), vec![moving]);
        assert_eq!(s.failovers().unwrap().len(), 1);
        s.save_work(&[], &[]).unwrap();
        assert!(s.node_work().unwrap().is_empty());
        assert!(s.failovers().unwrap().is_empty());
    }
}
