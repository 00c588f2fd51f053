//! The database's schema, versioned: `PRAGMA user_version` says which migrations a database has had, and
//! [`migrate`] runs the missing ones in order, each in its own transaction with the version bump, so a
//! crash mid-migration leaves the database at the previous version, never between two.
//!
//! Opening also checks the file: `PRAGMA quick_check` on every start. A database that fails it (or is not
//! a database at all) is moved aside with a clear error and never silently replaced: leases and
//! assignments in it may be all that keeps two nodes from one address or one disk, so the operator decides
//! (restore a backup, or start again to begin empty).

use rusqlite::Connection;
use std::path::{Path, PathBuf};

/// One step of the schema. `sql` runs first, then `fixup` (for changes SQL alone cannot make
/// conditionally, such as adding a column a pre-versioning database may already have).
struct Migration {
    to: u32,
    what: &'static str,
    sql: &'static str,
    fixup: Option<fn(&Connection) -> rusqlite::Result<()>>,
}

/// The first schema. `IF NOT EXISTS` throughout, so a database made before versioning (version 0 with
/// these tables) is adopted as it is.
const V1: &str = "
CREATE TABLE IF NOT EXISTS lease (
    ip        TEXT PRIMARY KEY,
    mac       TEXT NOT NULL,
    client_id BLOB,
    hostname  TEXT,
    expires   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_mac ON lease(mac);
CREATE TABLE IF NOT EXISTS assignment (
    mac     TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    slot    INTEGER NOT NULL,
    since   INTEGER NOT NULL,
    UNIQUE (cluster, slot)
);
CREATE TABLE IF NOT EXISTS event (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    cluster TEXT,
    node    TEXT,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_token (
    mac     TEXT PRIMARY KEY,
    token   TEXT NOT NULL UNIQUE,
    cluster TEXT,
    slot    INTEGER,
    issued  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS node_tokens (
    mac  TEXT PRIMARY KEY,
    doc  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slot_secret (
    slot TEXT PRIMARY KEY,
    doc  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slot_psk (
    slot TEXT PRIMARY KEY,
    doc  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS node_flag (
    mac    TEXT PRIMARY KEY,
    state  TEXT NOT NULL,
    since  INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS node (
    mac          TEXT PRIMARY KEY,
    uuid         TEXT,
    serial       TEXT,
    manufacturer TEXT,
    product      TEXT,
    buildarch    TEXT,
    platform     TEXT,
    memsize      INTEGER,
    ip           TEXT,
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL,
    boot_count   INTEGER NOT NULL
);
";

/// In-flight work, so a restart resumes or rolls back what was under way: per node its hold on a slot's
/// disk, a pending restart into a new role (with the step its move had reached), a restart only a person
/// can do; per slot its running failover.
const V2: &str = "
CREATE TABLE node_work (
    mac          TEXT PRIMARY KEY,
    hold_cluster TEXT,
    hold_slot    INTEGER,
    restart_ms   INTEGER,
    manual       INTEGER NOT NULL,
    step         TEXT
);
CREATE TABLE failover (
    cluster TEXT NOT NULL,
    slot    INTEGER NOT NULL,
    doc     TEXT NOT NULL,
    PRIMARY KEY (cluster, slot)
);
";

const MIGRATIONS: &[Migration] = &[
    Migration {
        to: 1,
        what: "leases, nodes, assignments, events, tokens, secrets, flags",
        sql: V1,
        fixup: Some(event_secs),
    },
    Migration {
        to: 2,
        what: "in-flight work: holds, restarts, failovers",
        sql: V2,
        fixup: None,
    },
];

/// The schema version this build writes.
pub const LATEST: u32 = 2;

/// Added to `event` before versioning began: a step's duration, for events that time something.
fn event_secs(c: &Connection) -> rusqlite::Result<()> {
    let has = c
        .prepare("SELECT 1 FROM pragma_table_info('event') WHERE name = 'secs'")?
        .exists([])?;
    if !has {
        c.execute_batch("ALTER TABLE event ADD COLUMN secs REAL")?;
    }
    Ok(())
}

/// The version a database is at.
pub fn version(c: &Connection) -> rusqlite::Result<u32> {
    c.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
        .map(|v| v.max(0) as u32)
}

/// Brings a database to [`LATEST`]; refuses one made by a newer corral (its tables may mean something
/// this build does not know).
pub fn migrate(c: &mut Connection) -> anyhow::Result<()> {
    let at = version(c)?;
    if at > LATEST {
        anyhow::bail!(
            "the database is at schema version {at}, newer than this corral knows ({LATEST}): run the newer corral, or restore a backup"
        );
    }
    for m in MIGRATIONS.iter().filter(|m| m.to > at) {
        let tx = c.transaction()?;
        tx.execute_batch(m.sql)
            .map_err(|e| anyhow::anyhow!("schema migration {} ({}): {e}", m.to, m.what))?;
        if let Some(f) = m.fixup {
            f(&tx).map_err(|e| anyhow::anyhow!("schema migration {} ({}): {e}", m.to, m.what))?;
        }
        tx.pragma_update(None, "user_version", m.to)?;
        tx.commit()?;
        if at > 0 || m.to > 1 {
            tracing::info!(version = m.to, "database schema migrated: {}", m.what);
        }
    }
    Ok(())
}

/// What `quick_check` found wrong, or `None` for a sound database.
pub fn check(c: &Connection) -> Option<String> {
    let rows: rusqlite::Result<Vec<String>> = c
        .prepare("PRAGMA quick_check")
        .and_then(|mut st| st.query_map([], |r| r.get::<_, String>(0))?.collect());
    match rows {
        Ok(r) if r.len() == 1 && r[0] == "ok" => None,
        Ok(r) => Some(r.into_iter().take(5).collect::<Vec<_>>().join("; ")),
        Err(e) => Some(e.to_string()),
    }
}

/// Moves a corrupt database (and its WAL and shared-memory files) aside, next to where it was; returns
/// the new name of the database file.
pub fn move_aside(path: &Path, now: u64) -> std::io::Result<PathBuf> {
    let aside = |p: &Path| -> PathBuf {
        let mut s = p.as_os_str().to_owned();
        s.push(format!(".corrupt-{now}"));
        PathBuf::from(s)
    };
    let to = aside(path);
    std::fs::rename(path, &to)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            std::fs::rename(&side, aside(&side))?;
        }
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_database_gets_every_migration_and_a_second_run_changes_nothing() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        assert_eq!(version(&c).unwrap(), LATEST);
        migrate(&mut c).unwrap();
        assert_eq!(version(&c).unwrap(), LATEST);
        assert!(c
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'node_work'")
            .unwrap()
            .exists([])
            .unwrap());
    }

    #[test]
    fn a_database_from_before_versioning_is_adopted_with_its_rows() {
        let mut c = Connection::open_in_memory().unwrap();
        // The first release's event table had no `secs`, and no version was written.
        c.execute_batch(
            "CREATE TABLE event (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, kind TEXT NOT NULL,
             cluster TEXT, node TEXT, message TEXT NOT NULL);
             INSERT INTO event (at, kind, message) VALUES (1, 'reload', 'kept');",
        )
        .unwrap();
        migrate(&mut c).unwrap();
        assert_eq!(version(&c).unwrap(), LATEST);
        let (msg, secs): (String, Option<f64>) = c
            .query_row("SELECT message, secs FROM event", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((msg.as_str(), secs), ("kept", None));
    }

    #[test]
    fn a_newer_database_is_refused_untouched() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", LATEST + 1).unwrap();
        let e = migrate(&mut c).unwrap_err().to_string();
        assert!(e.contains("newer than this corral"), "{e}");
        assert_eq!(version(&c).unwrap(), LATEST + 1);
        assert!(!c
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'lease'")
            .unwrap()
            .exists([])
            .unwrap());
    }
}
