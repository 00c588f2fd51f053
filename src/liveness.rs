//! Whether corral's event loops still answer, for systemd's watchdog: each loop (an HTTP worker's runtime,
//! a DHCP thread, the controller's locks) beats a [`Beat`] while it runs; `WATCHDOG=1` is sent only while
//! every registered loop beat recently. A loop that is stuck (a deadlock, a runaway request) stops its
//! beats, the pings stop, and systemd restarts the service after `WatchdogSec=`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One loop's last sign of life (unix milliseconds).
#[derive(Clone, Default)]
pub struct Beat(Arc<AtomicU64>);

impl Beat {
    pub fn beat(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::Relaxed);
    }

    fn last(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every loop that must answer.
#[derive(Clone, Default)]
pub struct Liveness(Arc<Mutex<Vec<(String, Beat)>>>);

impl Liveness {
    /// A new loop named `name`, alive from `now_ms`.
    pub fn register(&self, name: &str, now_ms: u64) -> Beat {
        let b = Beat::default();
        b.beat(now_ms);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), b.clone()));
        b
    }

    /// The loops that have not beat within `within_ms` of `now_ms` (empty: all answer).
    pub fn silent(&self, now_ms: u64, within_ms: u64) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, b)| now_ms.saturating_sub(b.last()) > within_ms)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// systemd's watchdog interval from `WATCHDOG_USEC` (for this process: `WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<std::time::Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_named() {
        let l = Liveness::default();
        let a = l.register("http-0", 1000);
        let _b = l.register("dhcp-67", 1000);
        assert!(l.silent(1500, 1000).is_empty());
        a.beat(2500);
        assert_eq!(l.silent(2600, 1000), vec!["dhcp-67".to_string()]);
        assert!(Liveness::default().silent(u64::MAX, 0).is_empty());
    }
}
