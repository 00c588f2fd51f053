//! Counters every room keeps (packets served, malformed packets dropped, transfers, bytes) and their
//! Prometheus text rendering for `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A monotonically increasing count, safe to bump from any task.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Something that can write its metrics in Prometheus text format.
pub trait Report: Send + Sync {
    fn report(&self, out: &mut String);
}

/// Appends one counter in Prometheus text format.
pub fn write_counter(out: &mut String, name: &str, help: &str, value: u64) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// Appends one gauge in Prometheus text format.
pub fn write_gauge(out: &mut String, name: &str, help: &str, value: u64) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// All rooms' reporters, rendered together.
#[derive(Clone, Default)]
pub struct Registry(Vec<Arc<dyn Report>>);

impl Registry {
    pub fn add(&mut self, r: Arc<dyn Report>) {
        self.0.push(r);
    }
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.0 {
            r.report(&mut out);
        }
        out
    }
}
