//! The store's one writer: every write of every room (DHCP leases, plans, inventory, tokens, events, flags,
//! in-flight work) is a job sent to one thread, which takes whatever has queued since its last commit and
//! commits it as one transaction.
//!
//! Why one writer: SQLite allows one writer at a time anyway, so callers used to queue on the connection's
//! lock, each paying its own commit (and, for leases and assignments, its own fsync) while holding it. With
//! one thread, writers that arrive together share one commit and one fsync (group commit), no caller holds
//! a lock across disk I/O, and reads go to their own connection (WAL readers never wait for a writer).
//!
//! Each job runs inside its own savepoint, so a job that fails is undone alone and the rest of its batch
//! still commits. A batch is fsynced (`synchronous=FULL`) when any of its jobs asks for it: those are the
//! writes a reply promises (a DHCP ACK's lease, an assignment a node is told about). A caller learns that
//! its job is on disk from the job's [`Ticket`].

use rusqlite::Connection;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::Result;

/// The most jobs one transaction takes: a flood still commits in bounded steps, and a caller waits for at
/// most this many others.
const MAX_BATCH: usize = 512;

type Value = Box<dyn Any + Send>;
type Run = Box<dyn FnOnce(&Connection) -> Result<Value> + Send>;

struct Job {
    /// Must be fsynced before the caller hears back.
    durable: bool,
    run: Run,
    done: mpsc::SyncSender<Result<Value>>,
}

/// What the writer has done, for the metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Jobs that committed.
    pub writes: AtomicU64,
    /// Jobs that failed (undone alone, or with a batch whose commit failed).
    pub failed: AtomicU64,
    /// Commits that were fsynced.
    pub synced: AtomicU64,
}

impl crate::metrics::Report for WriterStats {
    fn report(&self, out: &mut String) {
        use crate::metrics::write_counter;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write_counter(
            out,
            "corral_store_commits_total",
            "Transactions the store's writer committed (each carries every write queued meanwhile)",
            get(&self.commits),
        );
        write_counter(
            out,
            "corral_store_commits_synced_total",
            "Commits fsynced because a write in them is promised in a reply (leases, assignments)",
            get(&self.synced),
        );
        write_counter(
            out,
            "corral_store_writes_total",
            "Writes committed (leases, plans, inventory, tokens, events, flags, in-flight work)",
            get(&self.writes),
        );
        write_counter(
            out,
            "corral_store_writes_failed_total",
            "Writes that failed and were undone",
            get(&self.failed),
        );
    }
}

/// The handle the store's clones share: dropping the last one ends the thread once its queue is done.
pub(super) struct Writer {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub stats: Arc<WriterStats>,
}

/// A submitted job's answer, once its batch has committed (or failed).
pub struct Ticket<T> {
    rx: mpsc::Receiver<Result<Value>>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: 'static> Ticket<T> {
    /// Waits (blocking the thread) until the job's batch is committed.
    pub fn wait(self) -> Result<T> {
        match self.rx.recv() {
            Ok(r) => r.map(|v| *v.downcast::<T>().expect("a job answers with its own type")),
            Err(_) => Err(gone()),
        }
    }
}

fn gone() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISUSE),
        Some("the store's writer has stopped".into()),
    )
}

/// An error for every job of a batch whose commit failed (rusqlite's errors are not `Clone`).
fn copy_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

impl Writer {
    /// Starts the writer thread on `conn` (the only connection that writes).
    pub fn start(conn: Arc<Mutex<Connection>>) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(WriterStats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("corral-store-writer".into())
            .spawn(move || run(&conn, &rx, &st))?;
        Ok(Writer {
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    /// Queues `f`; its [`Ticket`] says when it is committed and what it returned.
    pub fn submit<T, F>(&self, durable: bool, f: F) -> Ticket<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (done, rx) = mpsc::sync_channel(1);
        let job = Job {
            durable,
            run: Box::new(move |c| f(c).map(|v| Box::new(v) as Value)),
            done,
        };
        if let Some(q) = &*self.queue.lock().unwrap_or_else(|p| p.into_inner()) {
            // A send fails only when the thread is gone; the ticket then says so.
            let _ = q.send(job);
        }
        Ticket {
            rx,
            _t: std::marker::PhantomData,
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread after what is queued; waiting for it means a store reopened
        // right after (tests, a restart in-process) finds every write done and the connection closed.
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn run(conn: &Mutex<Connection>, rx: &mpsc::Receiver<Job>, stats: &WriterStats) {
    let mut full = false;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|j| j.durable);
        let c = conn.lock().unwrap_or_else(|p| p.into_inner());
        // `synchronous` cannot change inside a transaction: set it for the batch, only when it differs.
        if durable != full {
            let level = if durable { "FULL" } else { "NORMAL" };
            if c.pragma_update(None, "synchronous", level).is_ok() {
                full = durable;
            }
        }
        let mut answers: Vec<(mpsc::SyncSender<Result<Value>>, Result<Value>)> =
            Vec::with_capacity(batch.len());
        if let Err(e) = c.execute_batch("BEGIN IMMEDIATE") {
            for j in batch {
                let _ = j.done.send(Err(copy_error(&e)));
            }
            stats.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        for j in batch {
            let r = c.execute_batch("SAVEPOINT job").and_then(|()| (j.run)(&c));
            let end = if r.is_ok() {
                c.execute_batch("RELEASE job")
            } else {
                c.execute_batch("ROLLBACK TO job; RELEASE job")
            };
            let r = match (r, end) {
                (Ok(v), Ok(())) => Ok(v),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
            answers.push((j.done, r));
        }
        let committed = c.execute_batch("COMMIT");
        if committed.is_err() {
            let _ = c.execute_batch("ROLLBACK");
        }
        // Answered after letting go of the connection: a reader sharing it (an in-memory store) goes on.
        drop(c);
        match committed {
            Ok(()) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                if durable {
                    stats.synced.fetch_add(1, Ordering::Relaxed);
                }
                for (done, r) in answers {
                    let counter = if r.is_ok() {
                        &stats.writes
                    } else {
                        &stats.failed
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = done.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = answers.len(), "store commit failed");
                for (done, _) in answers {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = done.send(Err(copy_error(&e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Arc<Mutex<Connection>> {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        Arc::new(Mutex::new(c))
    }

    fn count(conn: &Mutex<Connection>) -> i64 {
        conn.lock()
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn writers_that_queue_together_share_one_commit() {
        let conn = table();
        let w = Writer::start(conn.clone()).unwrap();
        // Holding the connection stops the writer at its first batch; the rest queue behind it.
        let held = conn.lock().unwrap();
        let tickets: Vec<Ticket<usize>> = (0..50)
            .map(|k| {
                w.submit(k % 7 == 0, move |c| {
                    c.execute("INSERT INTO t (k, v) VALUES (?1, 'x')", [k])
                })
            })
            .collect();
        drop(held);
        for t in tickets {
            assert_eq!(t.wait().unwrap(), 1);
        }
        assert_eq!(count(&conn), 50);
        let commits = w.stats.commits.load(Ordering::Relaxed);
        assert!(
            (1..=2).contains(&commits),
            "{commits} commits for 50 writes"
        );
        assert_eq!(w.stats.writes.load(Ordering::Relaxed), 50);
        // A batch with a durable job is fsynced.
        assert!(w.stats.synced.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn a_failing_job_is_undone_alone() {
        let conn = table();
        let w = Writer::start(conn.clone()).unwrap();
        let held = conn.lock().unwrap();
        let ok1 = w.submit(false, |c| c.execute("INSERT INTO t VALUES (1, 'a')", []));
        // Writes a row, then fails: its row must not stay.
        let bad = w.submit(false, |c| {
            c.execute("INSERT INTO t VALUES (2, 'b')", [])?;
            c.execute("INSERT INTO t VALUES (1, 'dup')", [])
        });
        let ok2 = w.submit(false, |c| c.execute("INSERT INTO t VALUES (3, 'c')", []));
        drop(held);
        assert!(ok1.wait().is_ok());
        assert!(bad.wait().is_err());
        assert!(ok2.wait().is_ok());
        let keys: Vec<i64> = {
            let c = conn.lock().unwrap();
            let mut st = c.prepare("SELECT k FROM t ORDER BY k").unwrap();
            let rows = st.query_map([], |r| r.get(0)).unwrap();
            rows.map(|r| r.unwrap()).collect()
        };
        assert_eq!(keys, vec![1, 3]);
        assert_eq!(w.stats.failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn dropping_the_writer_finishes_its_queue() {
        let conn = table();
        let w = Writer::start(conn.clone()).unwrap();
        let held = conn.lock().unwrap();
        let t = w.submit(false, |c| c.execute("INSERT INTO t VALUES (9, 'z')", []));
        drop(held);
        drop(w);
        assert_eq!(t.wait().unwrap(), 1);
        assert_eq!(count(&conn), 1);
    }
}
