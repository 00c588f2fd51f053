//! Persistent state: DHCP leases and the node inventory, in an embedded SQLite database (WAL) under the
//! state directory.
//!
//! The store is the only place state outlives the process. Rooms call its typed methods; nothing outside this
//! module writes SQL, so a distributed backend (etcd) can later sit behind the same methods. Commits use WAL.
//!
//! Every write goes through one writer thread ([`writer`]), which commits whatever has queued as one
//! transaction; reads use their own connection and never wait for a commit. Leases and assignments (what a
//! DHCP ACK or a node's script promises) are fsynced before the call returns (`synchronous=FULL`);
//! everything else uses `synchronous=NORMAL`: it survives a crash of corral (the process), and the last few
//! commits may be lost only if the whole machine loses power.
//!
//! The schema is versioned ([`schema`]); in-flight work (holds, restarts, failovers) is kept in [`work`] so
//! a restart resumes it.
//!
//! Long because all of corral's SQL lives here, by design (above).

pub mod schema;
pub mod work;
pub mod writer;

use crate::events::EventKind;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::domain::{LeaseChange, LeaseRecord, Mac, NodeFacts};

/// A node in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    pub mac: Mac,
    pub facts: NodeFacts,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    pub boot_count: u64,
}

/// Boot-script requests of one node since the last commit, merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootsSeen {
    pub mac: Mac,
    /// The newest non-empty value of each fact.
    pub facts: NodeFacts,
    /// Unix seconds of the first and last request in the batch.
    pub first: u64,
    pub last: u64,
    pub count: u64,
}

/// Handle to the database; cheap to clone, safe to share across tasks.
#[derive(Clone)]
pub struct Store {
    /// The connection reads use (for a file, not the writer's: WAL readers see the last commit and never
    /// wait for the next).
    read: Arc<Mutex<Connection>>,
    writer: Arc<writer::Writer>,
}

pub type Result<T> = std::result::Result<T, rusqlite::Error>;

impl Store {
    /// Opens (creating if needed) `corral.db` in `dir`, checks it (`quick_check`) and brings its schema
    /// up to date. A corrupt database is moved aside and the error says where; it is never replaced here.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create state directory {}: {e}", dir.display()))?;
        let path = dir.join("corral.db");
        if path.exists() {
            // Checked read-only: a read-write connection may checkpoint or delete the WAL on close,
            // and what is in it belongs with the database file that is moved aside.
            let check =
                Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .map_err(|e| e.to_string())
                    .map(|c| schema::check(&c))
                    .unwrap_or_else(Some);
            if let Some(wrong) = check {
                let aside = schema::move_aside(&path, crate::unix_now()).map_err(|e| {
                    anyhow::anyhow!(
                        "database {} is corrupt ({wrong}) and cannot be moved aside: {e}",
                        path.display()
                    )
                })?;
                anyhow::bail!(
                    "database {} is corrupt ({wrong}): moved aside to {}; restore a backup there, or start corral again to begin with an empty state (leases, assignments and tokens are then forgotten)",
                    path.display(),
                    aside.display()
                );
            }
        }
        let opened = Connection::open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
        let writes = Self::prepare(opened)
            .map_err(|e| anyhow::anyhow!("database {}: {e}", path.display()))?;
        let read = Connection::open(&path)
            .and_then(|c| {
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                c.pragma_update(None, "query_only", "ON")?;
                Ok(c)
            })
            .map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
        Self::start(Arc::new(Mutex::new(writes)), Arc::new(Mutex::new(read)))
    }

    /// A private in-memory database, for tests: one connection, which the writer and the readers share.
    pub fn in_memory() -> anyhow::Result<Store> {
        let conn = Arc::new(Mutex::new(Self::prepare(Connection::open_in_memory()?)?));
        Self::start(conn.clone(), conn)
    }

    fn prepare(mut conn: Connection) -> anyhow::Result<Connection> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn)?;
        Ok(conn)
    }

    fn start(
        writes: Arc<Mutex<Connection>>,
        read: Arc<Mutex<Connection>>,
    ) -> anyhow::Result<Store> {
        Ok(Store {
            read,
            writer: Arc::new(writer::Writer::start(writes)?),
        })
    }

    /// Runs `f` in the writer's next transaction and waits until it is committed. `durable` asks for
    /// that commit to be fsynced (`synchronous=FULL`): for writes a reply promises, a DHCP ACK's lease
    /// and an assignment the node is told about. Other writes (inventory, events, tokens) are committed at
    /// `NORMAL`: in WAL mode they survive a crash of corral and may lose the last commits only when the
    /// machine loses power.
    fn write<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.writer.submit(durable, f).wait()
    }

    /// Queues `f` for the writer's next transaction without waiting; the ticket tells when it is done.
    pub fn submit<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> writer::Ticket<T> {
        self.writer.submit(durable, f)
    }

    /// What the writer has committed so far (for the metrics).
    pub fn writer_stats(&self) -> Arc<writer::WriterStats> {
        self.writer.stats.clone()
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let c = self.read.lock().unwrap_or_else(|p| p.into_inner());
        f(&c)
    }

    /// Every stored lease, expired ones included (the DHCP core decides what expiry means).
    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT ip, mac, client_id, hostname, expires FROM lease ORDER BY ip",
            )?;
            let rows = st.query_map([], |r| {
                let ip: String = r.get(0)?;
                let mac: String = r.get(1)?;
                Ok((ip, mac, r.get(2)?, r.get(3)?, r.get::<_, i64>(4)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (ip, mac, client_id, hostname, expires) = row?;
                // A row we cannot read is skipped rather than taking the server down.
                if let (Ok(ip), Some(mac)) = (ip.parse(), Mac::parse(&mac)) {
                    out.push(LeaseRecord {
                        ip,
                        mac,
                        client_id,
                        hostname,
                        expires: expires.max(0) as u64,
                    });
                }
            }
            Ok(out)
        })
    }

    /// The address leased to `mac`, if any (expired or not: the caller compares `expires`).
    pub fn lease_of(&self, mac: Mac) -> Result<Option<(Ipv4Addr, u64)>> {
        self.with(|c| {
            c.prepare_cached("SELECT ip, expires FROM lease WHERE mac = ?1")?
                .query_row([mac.to_string()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
                .map(|o| o.and_then(|(ip, exp)| Some((ip.parse().ok()?, exp.max(0) as u64))))
        })
    }

    /// Inserts or replaces the lease for `lease.ip`; any other lease of the same MAC is removed, since a
    /// client holds one address at a time.
    pub fn put_lease(&self, lease: &LeaseRecord) -> Result<()> {
        self.apply_leases(&[LeaseChange::Put(lease.clone())])
    }

    /// Applies a batch of lease changes in order, in one transaction: either all are stored or none.
    /// The DHCP shell stores every change of a burst of packets this way before any reply leaves, so a
    /// busy server pays one commit per burst instead of one per client.
    pub fn apply_leases(&self, changes: &[LeaseChange]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let changes = changes.to_vec();
        self.write(true, move |tx| {
            for change in &changes {
                match change {
                    LeaseChange::Put(lease) => {
                        tx.prepare_cached("DELETE FROM lease WHERE mac = ?1 AND ip <> ?2")?
                            .execute(params![lease.mac.to_string(), lease.ip.to_string()])?;
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO lease (ip, mac, client_id, hostname, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![
                            lease.ip.to_string(),
                            lease.mac.to_string(),
                            lease.client_id,
                            lease.hostname,
                            lease.expires as i64
                        ])?;
                    }
                    LeaseChange::Remove(ip) => {
                        tx.prepare_cached("DELETE FROM lease WHERE ip = ?1")?
                            .execute([ip.to_string()])?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Removes the lease on `ip` (RELEASE, DECLINE, expiry clean-up).
    pub fn delete_lease(&self, ip: Ipv4Addr) -> Result<()> {
        self.apply_leases(&[LeaseChange::Remove(ip)])
    }

    /// Records batches of boot-script requests, in one transaction. Facts that iPXE did not report keep
    /// their stored value.
    pub fn record_boots(&self, seen: &[BootsSeen]) -> Result<()> {
        self.record_boots_and_tokens(seen, &[])
    }

    /// [`Store::record_boots`] and boot-token rows in one transaction: the writer's batch of what the
    /// request paths queued. A token row replaces the node's tokens (and drops its row of the older
    /// one-token table).
    pub fn record_boots_and_tokens(
        &self,
        seen: &[BootsSeen],
        tokens: &[(Mac, String)],
    ) -> Result<()> {
        let (seen, tokens) = (seen.to_vec(), tokens.to_vec());
        self.write(false, move |tx| {
            for (mac, doc) in &tokens {
                tx.prepare_cached("INSERT OR REPLACE INTO node_tokens (mac, doc) VALUES (?1, ?2)")?
                    .execute(params![mac.to_string(), doc])?;
                tx.prepare_cached("DELETE FROM agent_token WHERE mac = ?1")?
                    .execute(params![mac.to_string()])?;
            }
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO node (mac, uuid, serial, manufacturer, product, buildarch, platform, memsize, ip,
                                       first_seen, last_seen, boot_count)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT(mac) DO UPDATE SET
                        uuid = COALESCE(excluded.uuid, uuid),
                        serial = COALESCE(excluded.serial, serial),
                        manufacturer = COALESCE(excluded.manufacturer, manufacturer),
                        product = COALESCE(excluded.product, product),
                        buildarch = COALESCE(excluded.buildarch, buildarch),
                        platform = COALESCE(excluded.platform, platform),
                        memsize = COALESCE(excluded.memsize, memsize),
                        ip = COALESCE(excluded.ip, ip),
                        last_seen = excluded.last_seen,
                        boot_count = boot_count + excluded.boot_count",
                )?;
                for b in &seen {
                    let f = &b.facts;
                    st.execute(params![
                        b.mac.to_string(),
                        f.uuid,
                        f.serial,
                        f.manufacturer,
                        f.product,
                        f.buildarch,
                        f.platform,
                        f.memsize.map(|m| m as i64),
                        f.ip,
                        b.first as i64,
                        b.last as i64,
                        b.count as i64
                    ])?;
                }
            }
            Ok(())
        })
    }

    /// One node, if known.
    pub fn node(&self, mac: Mac) -> Result<Option<NodeRecord>> {
        self.with(|c| {
            c.prepare_cached(&format!("{NODE_SELECT} WHERE mac = ?1"))?
                .query_row([mac.to_string()], node_row)
                .optional()
                .map(|o| o.flatten())
        })
    }

    /// The whole inventory, ordered by MAC.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.with(|c| {
            let mut st = c.prepare_cached(&format!("{NODE_SELECT} ORDER BY mac"))?;
            let rows = st.query_map([], node_row)?;
            Ok(rows.filter_map(|r| r.ok().flatten()).collect())
        })
    }
}

/// A node's place in a cluster, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssignmentRecord {
    pub mac: Mac,
    pub cluster: String,
    pub slot: u32,
    /// Unix seconds.
    pub since: u64,
}

/// Something that happened, for operators (`corral events`, `/api/v1/events`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub id: i64,
    pub at: u64,
    pub kind: String,
    pub cluster: Option<String>,
    pub node: Option<String>,
    pub message: String,
    /// How long the step it reports took, for events that time something.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secs: Option<f64>,
}

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub at: u64,
    pub kind: EventKind,
    pub cluster: Option<String>,
    pub node: Option<String>,
    pub message: String,
    pub secs: Option<f64>,
}

impl NewEvent {
    pub fn new(at: u64, kind: EventKind, message: String) -> NewEvent {
        NewEvent {
            at,
            kind,
            cluster: None,
            node: None,
            message,
            secs: None,
        }
    }
}

/// One change to assignments, applied with others in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentChange {
    Set(AssignmentRecord),
    Remove(Mac),
}

impl Store {
    /// Every assignment.
    pub fn assignments(&self) -> Result<Vec<AssignmentRecord>> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT mac, cluster, slot, since FROM assignment ORDER BY cluster, slot",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, cluster, slot, since) = row?;
                if let Some(mac) = Mac::parse(&mac) {
                    out.push(AssignmentRecord {
                        mac,
                        cluster,
                        slot: slot.max(0) as u32,
                        since: since.max(0) as u64,
                    });
                }
            }
            Ok(out)
        })
    }

    /// Applies assignment changes and records events, all in one transaction: a crash never leaves a
    /// half-applied plan. Assignment changes are fsynced before this returns.
    pub fn apply(&self, changes: &[AssignmentChange], events: &[NewEvent]) -> Result<()> {
        self.apply_plan(changes, events, None)
    }

    /// [`Store::apply`], and with `work` the whole in-flight work of the nodes replaced in the same
    /// transaction: a node told to leave a slot keeps its hold on that slot's disk across any crash.
    pub fn apply_plan(
        &self,
        changes: &[AssignmentChange],
        events: &[NewEvent],
        work: Option<&[work::NodeWork]>,
    ) -> Result<()> {
        let durable = !changes.is_empty() || work.is_some();
        let (changes, events, work) = (changes.to_vec(), events.to_vec(), work.map(<[_]>::to_vec));
        self.write(durable, move |tx| {
            for ch in &changes {
                match ch {
                    AssignmentChange::Remove(mac) => {
                        tx.prepare_cached("DELETE FROM assignment WHERE mac = ?1")?
                            .execute([mac.to_string()])?;
                    }
                    AssignmentChange::Set(a) => {
                        tx.prepare_cached(
                            "DELETE FROM assignment WHERE (cluster = ?1 AND slot = ?2) OR mac = ?3",
                        )?
                        .execute(params![
                            a.cluster,
                            a.slot as i64,
                            a.mac.to_string()
                        ])?;
                        tx.prepare_cached("INSERT INTO assignment (mac, cluster, slot, since) VALUES (?1, ?2, ?3, ?4)")?
                            .execute(params![a.mac.to_string(), a.cluster, a.slot as i64, a.since as i64])?;
                    }
                }
            }
            for e in &events {
                tx.prepare_cached("INSERT INTO event (at, kind, cluster, node, message, secs) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
                    .execute(params![e.at as i64, e.kind, e.cluster, e.node, e.message, e.secs])?;
            }
            if let Some(w) = &work {
                work::replace_node_work(tx, w)?;
            }
            Ok(())
        })
    }

    /// The newest events first, at most `limit`.
    pub fn events(&self, limit: u32) -> Result<Vec<EventRecord>> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, at, kind, cluster, node, message, secs FROM event ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = st.query_map([limit as i64], |r| {
                Ok(EventRecord {
                    id: r.get(0)?,
                    at: r.get::<_, i64>(1)?.max(0) as u64,
                    kind: r.get(2)?,
                    cluster: r.get(3)?,
                    node: r.get(4)?,
                    message: r.get(5)?,
                    secs: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }
}

/// The token of a node's latest boot, and the role it was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentToken {
    pub mac: Mac,
    pub token: String,
    /// (cluster, slot) when the node booted into a role.
    pub role: Option<(String, u32)>,
    pub issued: u64,
}

impl Store {
    /// Every node's latest boot token.
    pub fn agent_tokens(&self) -> Result<Vec<AgentToken>> {
        self.with(|c| {
            let mut st =
                c.prepare_cached("SELECT mac, token, cluster, slot, issued FROM agent_token")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, token, cluster, slot, issued) = row?;
                let Some(mac) = Mac::parse(&mac) else {
                    continue;
                };
                out.push(AgentToken {
                    mac,
                    token,
                    role: cluster.zip(slot.map(|s| s.max(0) as u32)),
                    issued: issued.max(0) as u64,
                });
            }
            Ok(out)
        })
    }

    /// Replaces a node's boot token.
    pub fn put_agent_token(&self, t: &AgentToken) -> Result<()> {
        let t = t.clone();
        self.write(false, move |c| {
            c.prepare_cached("INSERT OR REPLACE INTO agent_token (mac, token, cluster, slot, issued) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![
                    t.mac.to_string(),
                    t.token,
                    t.role.as_ref().map(|r| r.0.clone()),
                    t.role.as_ref().map(|r| r.1 as i64),
                    t.issued as i64
                ])?;
            Ok(())
        })
    }
}

impl Store {
    /// Every node's boot tokens as the controller wrote them (a JSON document per node; the store does
    /// not look inside).
    pub fn node_token_docs(&self) -> Result<Vec<(Mac, String)>> {
        self.with(|c| {
            let mut st = c.prepare_cached("SELECT mac, doc FROM node_tokens")?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, doc) = row?;
                if let Some(mac) = Mac::parse(&mac) {
                    out.push((mac, doc));
                }
            }
            Ok(out)
        })
    }

    /// CHAP secrets corral generated for slots the operator gave none (`cluster.slot` → secrets).
    pub fn slot_secrets(&self) -> Result<Vec<(String, SlotSecret)>> {
        self.slot_docs("slot_secret")
    }

    pub fn put_slot_secret(&self, slot: &str, s: &SlotSecret) -> Result<()> {
        self.put_slot_doc("slot_secret", slot, s)
    }

    /// NBD TLS pre-shared keys corral generated per slot (`cluster.slot` → key).
    pub fn slot_psks(&self) -> Result<Vec<(String, SlotPsk)>> {
        self.slot_docs("slot_psk")
    }

    pub fn put_slot_psk(&self, slot: &str, s: &SlotPsk) -> Result<()> {
        self.put_slot_doc("slot_psk", slot, s)
    }

    /// Every row of a per-slot table of JSON documents (`table` is one of ours, never input); a row that
    /// no longer parses is skipped.
    fn slot_docs<T: serde::de::DeserializeOwned>(
        &self,
        table: &'static str,
    ) -> Result<Vec<(String, T)>> {
        self.with(|c| {
            let mut st = c.prepare_cached(&format!("SELECT slot, doc FROM {table}"))?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (slot, doc) = row?;
                if let Ok(s) = serde_json::from_str(&doc) {
                    out.push((slot, s));
                }
            }
            Ok(out)
        })
    }

    fn put_slot_doc<T: serde::Serialize>(
        &self,
        table: &'static str,
        slot: &str,
        v: &T,
    ) -> Result<()> {
        let (doc, slot) = (
            serde_json::to_string(v).unwrap_or_default(),
            slot.to_string(),
        );
        self.write(false, move |c| {
            c.prepare_cached(&format!(
                "INSERT OR REPLACE INTO {table} (slot, doc) VALUES (?1, ?2)"
            ))?
            .execute(params![slot, doc])?;
            Ok(())
        })
    }

    /// Deletes events older than `before` (unix seconds); returns how many.
    pub fn prune_events(&self, before: u64) -> Result<usize> {
        self.write(false, move |c| {
            c.prepare_cached("DELETE FROM event WHERE at < ?1")?
                .execute(params![before as i64])
        })
    }

    /// Deletes nodes from the inventory (with their tokens).
    pub fn forget_nodes(&self, macs: &[Mac]) -> Result<()> {
        let macs = macs.to_vec();
        self.write(false, move |tx| {
            for m in &macs {
                let m = m.to_string();
                for table in ["node", "node_tokens", "agent_token"] {
                    tx.execute(&format!("DELETE FROM {table} WHERE mac = ?1"), params![m])?;
                }
            }
            Ok(())
        })
    }
}

/// iSCSI CHAP secrets generated for one slot: what the initiator proves and (mutual) what corral answers.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotSecret {
    pub user: String,
    pub secret: String,
    pub target_user: String,
    pub target_secret: String,
}

impl std::fmt::Debug for SlotSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotSecret {{ user: {:?}, .. }}", self.user)
    }
}

/// The NBD TLS pre-shared key of one slot: the identity the client presents (it names the slot) and 32
/// random bytes as 64 hex digits (how GnuTLS and qemu psk files write keys).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotPsk {
    pub identity: String,
    pub key: String,
}

impl SlotPsk {
    /// The `identity:hexkey` line of a psk file (qemu's `keys.psk`, libnbd's `tls-psk-file`).
    pub fn psk_line(&self) -> String {
        format!("{}:{}", self.identity, self.key)
    }

    /// The key's bytes (None if the stored hex is damaged).
    pub fn key_bytes(&self) -> Option<Vec<u8>> {
        let h = self.key.as_bytes();
        if h.len() % 2 != 0 || !h.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        h.chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
            .collect()
    }
}

impl std::fmt::Debug for SlotPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotPsk {{ identity: {:?}, .. }}", self.identity)
    }
}

/// A node taken out of service: `failed` (gets no work until it boots again or is released) or
/// `quarantined` (kept up for investigation until the operator releases it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFlag {
    pub mac: Mac,
    pub quarantined: bool,
    pub since: u64,
    pub reason: String,
}

impl Store {
    /// Every flagged node.
    pub fn node_flags(&self) -> Result<Vec<NodeFlag>> {
        self.with(|c| {
            let mut st = c.prepare_cached("SELECT mac, state, since, reason FROM node_flag")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, state, since, reason) = row?;
                if let Some(mac) = Mac::parse(&mac) {
                    out.push(NodeFlag {
                        mac,
                        quarantined: state == "quarantined",
                        since: since.max(0) as u64,
                        reason,
                    });
                }
            }
            Ok(out)
        })
    }

    /// Flags a node (replacing an earlier flag) or, with `None`, clears its flag.
    pub fn set_node_flag(&self, mac: Mac, flag: Option<&NodeFlag>) -> Result<()> {
        let flag = flag.cloned();
        self.write(false, move |c| {
            match &flag {
                Some(f) => c
                    .prepare_cached("INSERT OR REPLACE INTO node_flag (mac, state, since, reason) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![
                        mac.to_string(),
                        if f.quarantined { "quarantined" } else { "failed" },
                        f.since as i64,
                        f.reason
                    ])?,
                None => c
                    .prepare_cached("DELETE FROM node_flag WHERE mac = ?1")?
                    .execute(params![mac.to_string()])?,
            };
            Ok(())
        })
    }
}

const NODE_SELECT: &str =
    "SELECT mac, uuid, serial, manufacturer, product, buildarch, platform, memsize, ip,
                                  first_seen, last_seen, boot_count FROM node";

fn node_row(r: &rusqlite::Row<'_>) -> Result<Option<NodeRecord>> {
    let mac: String = r.get(0)?;
    let Some(mac) = Mac::parse(&mac) else {
        return Ok(None);
    };
    Ok(Some(NodeRecord {
        mac,
        facts: NodeFacts {
            uuid: r.get(1)?,
            serial: r.get(2)?,
            manufacturer: r.get(3)?,
            product: r.get(4)?,
            buildarch: r.get(5)?,
            platform: r.get(6)?,
            memsize: r.get::<_, Option<i64>>(7)?.map(|m| m.max(0) as u64),
            ip: r.get(8)?,
        },
        first_seen: r.get::<_, i64>(9)?.max(0) as u64,
        last_seen: r.get::<_, i64>(10)?.max(0) as u64,
        boot_count: r.get::<_, i64>(11)?.max(0) as u64,
    }))
}

#[cfg(test)]
mod tests;
