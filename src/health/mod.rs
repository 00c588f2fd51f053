//! The health room: monitors that turn observations into verdicts, as plain state machines. Observations
//! and `now` (milliseconds) go in, a verdict comes out; there is no clock, socket or task inside, so every
//! rule is tested with a fake clock. The controller feeds them (heartbeats, probe results, heartbeat
//! figures) and acts on their verdicts.
//!
//! - [`HeartbeatWatch`]: no heartbeat for longer than the cluster's timeout → *failed*.
//! - [`ProbeWatch`]: an application probe run every `interval`; `failures` consecutive failures →
//!   *failed*; any success clears the count.
//! - [`Threshold`]: a metric above (or below) a limit **continuously** for a duration → *slow*; one sample
//!   on the good side restarts the wait, so flapping never triggers; recovery clears the verdict.
//! - [`NodeWatch`]: all of a cluster's rules for one node (heartbeat loss, the probe, slow rules on
//!   heartbeat figures and probe times, the agent's service groups) behind one `check`.
//!
//! [`probe`] and [`webhook`] are the thin I/O pieces the controller runs for them.

pub mod probe;
pub mod webhook;

use crate::agent::proto::{GroupState, Heartbeat};
use crate::policy::HealthSpec;

/// What a monitor concluded about a node's role: typed by what caused it, with a sentence for people.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The role is down: its slot fails over.
    Failed { cause: Failure, detail: String },
    /// The role runs but a performance rule held: its slot may move to a capable node.
    Slow { metric: String, detail: String },
}

/// Why a role failed. Stable names (`heartbeat-lost`, ...) for the API and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// No heartbeat within the cluster's timeout.
    HeartbeatLost,
    /// The application probe failed `failures` times in a row.
    ProbeFailed,
    /// A service group the agent watches reported failed.
    GroupFailed,
}

impl Verdict {
    /// The sentence saying what was seen.
    pub fn detail(&self) -> &str {
        match self {
            Verdict::Failed { detail, .. } | Verdict::Slow { detail, .. } => detail,
        }
    }
}

/// Heartbeat loss.
#[derive(Debug, Clone)]
pub struct HeartbeatWatch {
    timeout_ms: u64,
    last: u64,
}

impl HeartbeatWatch {
    /// Starts watching at `now` (a node that never beats fails `timeout` after this).
    pub fn new(timeout_ms: u64, now: u64) -> HeartbeatWatch {
        HeartbeatWatch {
            timeout_ms,
            last: now,
        }
    }

    pub fn beat(&mut self, now: u64) {
        self.last = self.last.max(now);
    }

    pub fn check(&self, now: u64) -> Option<Verdict> {
        let silent = now.saturating_sub(self.last);
        (silent > self.timeout_ms).then(|| Verdict::Failed {
            cause: Failure::HeartbeatLost,
            detail: format!(
                "no heartbeat for {:.1} s (timeout {:.1} s)",
                silent as f64 / 1000.0,
                self.timeout_ms as f64 / 1000.0
            ),
        })
    }
}

/// An application probe's schedule and failure count.
#[derive(Debug, Clone)]
pub struct ProbeWatch {
    interval_ms: u64,
    failures_allowed: u32,
    next_due: u64,
    failures: u32,
    last_error: String,
    in_flight: bool,
    /// Until the first success, failures count only from this moment: the application may still be
    /// starting after the node's first heartbeat.
    counts_from: u64,
    answered: bool,
}

impl ProbeWatch {
    /// Probes every `interval_ms` from `now`; before the first success, failures count only after
    /// `startup_ms`.
    pub fn new(interval_ms: u64, failures: u32, now: u64, startup_ms: u64) -> ProbeWatch {
        ProbeWatch {
            interval_ms,
            failures_allowed: failures.max(1),
            next_due: now,
            failures: 0,
            last_error: String::new(),
            in_flight: false,
            counts_from: now + startup_ms,
            answered: false,
        }
    }

    /// Whether a probe should start now; if so, it counts as started.
    pub fn start(&mut self, now: u64) -> bool {
        if self.in_flight || now < self.next_due {
            return false;
        }
        self.in_flight = true;
        self.next_due = now + self.interval_ms;
        true
    }

    /// A probe's outcome at `now` (a timeout is an `Err`).
    pub fn finished(&mut self, result: Result<(), String>, now: u64) {
        self.in_flight = false;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.answered = true;
            }
            Err(e) => {
                if self.answered || now >= self.counts_from {
                    self.failures += 1;
                }
                self.last_error = e;
            }
        }
    }

    pub fn check(&self) -> Option<Verdict> {
        (self.failures >= self.failures_allowed).then(|| Verdict::Failed {
            cause: Failure::ProbeFailed,
            detail: format!(
                "probe failed {} times in a row: {}",
                self.failures, self.last_error
            ),
        })
    }
}

/// Which side of the limit is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    Above,
    Below,
}

/// A metric beyond its limit for a whole duration.
#[derive(Debug, Clone)]
pub struct Threshold {
    metric: String,
    limit: f64,
    bad: Bad,
    for_ms: u64,
    /// Since when every sample has been on the bad side.
    since: Option<u64>,
    last: f64,
}

impl Threshold {
    pub fn new(metric: &str, bad: Bad, limit: f64, for_ms: u64) -> Threshold {
        Threshold {
            metric: metric.to_string(),
            limit,
            bad,
            for_ms,
            since: None,
            last: f64::NAN,
        }
    }

    pub fn observe(&mut self, value: f64, now: u64) {
        let breach = match self.bad {
            Bad::Above => value > self.limit,
            Bad::Below => value < self.limit,
        };
        // A sample that is not a number tells nothing: it neither starts nor ends a breach.
        if value.is_nan() {
            return;
        }
        self.last = value;
        if !breach {
            self.since = None;
        } else if self.since.is_none() {
            self.since = Some(now);
        }
    }

    pub fn check(&self, now: u64) -> Option<Verdict> {
        let since = self.since?;
        let held = now.saturating_sub(since);
        (held >= self.for_ms).then(|| {
            let side = match self.bad {
                Bad::Above => "above",
                Bad::Below => "below",
            };
            Verdict::Slow {
                metric: self.metric.clone(),
                detail: format!(
                    "{} {side} {} for {:.0} s (now {:.1})",
                    self.metric,
                    self.limit,
                    held as f64 / 1000.0,
                    self.last
                ),
            }
        })
    }
}

/// Every rule of a cluster's `health` table, for one node in one role.
#[derive(Debug, Clone)]
pub struct NodeWatch {
    heartbeat: HeartbeatWatch,
    probe: Option<ProbeWatch>,
    rules: Vec<Threshold>,
    /// The previous heartbeat's counters, for rates: (now, swap pages, I/O sectors, uptime).
    counters: Option<(u64, u64, u64, f64)>,
    /// A service group the agent reports failed.
    group_failed: Option<String>,
    /// A probe has succeeded since the watch began (the role is confirmed healthy).
    probed_ok: bool,
}

impl NodeWatch {
    /// Starts watching a node at `now` (ms) under `spec`, with agents heartbeating every
    /// `heartbeat_interval` seconds; probe failures before the first good answer count only after
    /// `startup_ms`.
    pub fn new(spec: &HealthSpec, heartbeat_interval: u64, now: u64, startup_ms: u64) -> NodeWatch {
        let timeout = spec
            .heartbeat_timeout
            .map(|t| t.0)
            .unwrap_or(3 * heartbeat_interval.max(1));
        NodeWatch {
            heartbeat: HeartbeatWatch::new(timeout * 1000, now),
            probe: spec
                .probe
                .as_ref()
                .map(|p| ProbeWatch::new(p.interval.0 * 1000, p.failures, now, startup_ms)),
            rules: spec
                .slow
                .iter()
                .map(|r| {
                    let (bad, limit) = match (r.above, r.below) {
                        (Some(a), _) => (Bad::Above, a),
                        (None, Some(b)) => (Bad::Below, b),
                        (None, None) => (Bad::Above, f64::INFINITY),
                    };
                    Threshold::new(&r.metric, bad, limit, r.for_.0 * 1000)
                })
                .collect(),
            counters: None,
            group_failed: None,
            probed_ok: false,
        }
    }

    fn observe(&mut self, metric: &str, value: f64, now: u64) {
        for t in self.rules.iter_mut().filter(|t| t.metric == metric) {
            t.observe(value, now);
        }
    }

    /// A heartbeat from the node's agent (in this role).
    pub fn heartbeat(&mut self, hb: &Heartbeat, now: u64) {
        self.heartbeat.beat(now);
        self.observe("load1", hb.load1, now);
        self.observe("utilisation", hb.utilisation(), now);
        if hb.mem_total_kib > 0 {
            self.observe(
                "mem_available_mib",
                hb.mem_available_kib as f64 / 1024.0,
                now,
            );
        }
        // Saturating: the agent's figures are untrusted input, and a sum past u64 must not panic.
        let swap = hb.swap_in.saturating_add(hb.swap_out);
        let io = hb.io_read_sectors.saturating_add(hb.io_write_sectors);
        if let Some((t, s0, i0, up0)) = self.counters {
            // Counters restart with the node; a rate across a reboot means nothing.
            let secs = now.saturating_sub(t) as f64 / 1000.0;
            if secs > 0.0 && hb.uptime_secs >= up0 && swap >= s0 && io >= i0 {
                self.observe("swap_pages_per_s", (swap - s0) as f64 / secs, now);
                self.observe("io_sectors_per_s", (io - i0) as f64 / secs, now);
            }
        }
        self.counters = Some((now, swap, io, hb.uptime_secs));
        self.group_failed = hb
            .groups
            .iter()
            .find(|g| g.state == GroupState::Failed)
            .map(|g| format!("service group {} failed: {}", g.name, g.detail));
    }

    /// Whether a probe should start now (it then counts as started).
    pub fn probe_due(&mut self, now: u64) -> bool {
        self.probe.as_mut().is_some_and(|p| p.start(now))
    }

    /// A probe's outcome: its response time in ms, or what went wrong.
    pub fn probe_done(&mut self, result: Result<f64, String>, now: u64) {
        if let Ok(ms) = &result {
            self.probed_ok = true;
            self.observe("probe_ms", *ms, now);
        }
        if let Some(p) = self.probe.as_mut() {
            p.finished(result.map(|_| ()), now);
        }
    }

    /// Whether the role has shown itself healthy: a probe answered (or there is no probe).
    pub fn confirmed(&self) -> bool {
        self.probe.is_none() || self.probed_ok
    }

    /// Since when (ms) the earliest rule now breached has been breached: when a slow node began to be slow.
    pub fn slow_since(&self) -> Option<u64> {
        self.rules.iter().filter_map(|t| t.since).min()
    }

    /// The verdict at `now`: *failed* (heartbeat loss, the probe, a service group) before *slow*.
    pub fn check(&self, now: u64) -> Option<Verdict> {
        self.heartbeat
            .check(now)
            .or_else(|| self.probe.as_ref().and_then(|p| p.check()))
            .or_else(|| {
                self.group_failed.clone().map(|detail| Verdict::Failed {
                    cause: Failure::GroupFailed,
                    detail,
                })
            })
            .or_else(|| self.rules.iter().find_map(|t| t.check(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_loss_after_the_timeout_and_not_before() {
        let mut w = HeartbeatWatch::new(10_000, 0);
        assert_eq!(w.check(10_000), None);
        assert!(matches!(w.check(10_001), Some(Verdict::Failed { .. })));
        w.beat(9_000);
        assert_eq!(w.check(19_000), None);
        // A late, out-of-order beat does not move the clock back.
        w.beat(5_000);
        assert!(w.check(19_001).is_some());
    }

    #[test]
    fn probes_run_on_schedule_and_fail_after_n_in_a_row() {
        let mut p = ProbeWatch::new(1_000, 3, 0, 0);
        assert!(p.start(0));
        assert!(!p.start(500), "one at a time");
        p.finished(Err("refused".into()), 0);
        assert!(!p.start(999));
        assert!(p.start(1_000));
        p.finished(Err("refused".into()), 1_000);
        assert_eq!(p.check(), None);
        assert!(p.start(2_000));
        p.finished(Ok(()), 2_000);
        // Success cleared the count: three more failures are needed.
        for t in [3_000, 4_000] {
            assert!(p.start(t));
            p.finished(Err("timeout".into()), t);
        }
        assert_eq!(p.check(), None);
        assert!(p.start(5_000));
        p.finished(Err("timeout".into()), 5_000);
        assert!(
            matches!(p.check(), Some(Verdict::Failed { detail: m, .. }) if m.contains("3 times") && m.contains("timeout"))
        );
    }

    #[test]
    fn probe_failures_wait_for_the_application_to_start() {
        // 30 s to start: failures before then do not count, unless the application answered once.
        let mut p = ProbeWatch::new(1_000, 2, 0, 30_000);
        for t in (0..30).map(|s| s * 1_000) {
            assert!(p.start(t));
            p.finished(Err("refused".into()), t);
        }
        assert_eq!(p.check(), None, "still starting");
        for t in [30_000, 31_000] {
            assert!(p.start(t));
            p.finished(Err("refused".into()), t);
        }
        assert!(p.check().is_some(), "failures count after the startup time");
        let mut p = ProbeWatch::new(1_000, 2, 0, 30_000);
        assert!(p.start(0));
        p.finished(Ok(()), 0);
        for t in [1_000, 2_000] {
            assert!(p.start(t));
            p.finished(Err("refused".into()), t);
        }
        assert!(
            p.check().is_some(),
            "after a first answer, failures count at once"
        );
    }

    #[test]
    fn thresholds_must_hold_for_the_whole_duration() {
        // response time > 500 ms for 2 min
        let mut t = Threshold::new("rt_ms", Bad::Above, 500.0, 120_000);
        t.observe(600.0, 0);
        assert_eq!(t.check(119_999), None);
        t.observe(700.0, 60_000);
        assert!(
            matches!(t.check(120_000), Some(Verdict::Slow { detail: m, .. }) if m.contains("rt_ms above 500"))
        );
        // Recovery clears at once.
        t.observe(100.0, 121_000);
        assert_eq!(t.check(500_000), None);
    }

    #[test]
    fn flapping_never_triggers() {
        let mut t = Threshold::new("rt_ms", Bad::Above, 500.0, 45_000);
        for i in 0..100u64 {
            let v = if i % 5 == 4 { 100.0 } else { 900.0 };
            t.observe(v, i * 10_000);
            assert_eq!(t.check(i * 10_000), None, "sample {i}");
        }
        // NaN samples neither start nor end a breach.
        let mut t = Threshold::new("load", Bad::Below, 0.1, 1_000);
        t.observe(f64::NAN, 0);
        assert_eq!(t.check(10_000), None);
        t.observe(0.05, 10_000);
        t.observe(f64::NAN, 10_500);
        assert!(t.check(11_000).is_some());
    }

    fn spec(text: &str) -> HealthSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_node_watch_combines_its_rules() {
        let h = spec(
            r#"
heartbeat_timeout = "10s"
probe = { port = 80, interval = "2s", failures = 2 }
slow = [{ metric = "probe_ms", above = 500.0, for = "30s" },
        { metric = "swap_pages_per_s", above = 100.0, for = "20s" }]
"#,
        );
        let mut w = NodeWatch::new(&h, 1, 0, 0);
        assert!(!w.confirmed());
        let mut hb = Heartbeat {
            uptime_secs: 10.0,
            ..Default::default()
        };
        // Probes every 2 s answering in 900 ms, heartbeats every second: slow after 30 s, not before.
        for s in 0..=40u64 {
            let now = s * 1000;
            hb.uptime_secs += 1.0;
            w.heartbeat(&hb, now);
            if w.probe_due(now) {
                w.probe_done(Ok(900.0), now);
            }
            let v = w.check(now);
            if s < 30 {
                assert_eq!(v, None, "at {s} s");
            } else {
                assert!(
                    matches!(&v, Some(Verdict::Slow { detail: m, .. }) if m.contains("probe_ms")),
                    "{v:?}"
                );
            }
        }
        assert!(w.confirmed());
        // Fast again: cleared.
        assert!(w.probe_due(42_000));
        w.probe_done(Ok(20.0), 42_000);
        assert_eq!(w.check(42_000), None);
        // Swap storm: 200 pages/s held 20 s.
        for s in 43..=64u64 {
            hb.swap_out += 200;
            hb.uptime_secs += 1.0;
            w.heartbeat(&hb, s * 1000);
        }
        assert!(
            matches!(w.check(64_000), Some(Verdict::Slow { detail: m, .. }) if m.contains("swap"))
        );
        // A reboot resets the counters: no absurd rate, no new breach.
        let fresh = Heartbeat {
            uptime_secs: 1.0,
            ..Default::default()
        };
        w.heartbeat(&fresh, 65_000);
        // Two probe failures in a row: failed, which outranks slow.
        for t in [66_000, 68_000] {
            assert!(w.probe_due(t));
            w.probe_done(Err("refused".into()), t);
        }
        assert!(
            matches!(w.check(68_000), Some(Verdict::Failed { detail: m, .. }) if m.contains("refused"))
        );
        // Silence: failed by heartbeat loss 10 s after the last beat.
        let mut w = NodeWatch::new(&h, 1, 0, 0);
        w.heartbeat(&hb, 5_000);
        assert_eq!(w.check(15_000), None);
        assert!(
            matches!(w.check(15_001), Some(Verdict::Failed { detail: m, .. }) if m.contains("no heartbeat"))
        );
    }

    #[test]
    fn counters_summing_past_u64_do_not_panic() {
        // Found by the agent_json fuzz target (fuzz/regressions/agent_json/).
        let mut w = NodeWatch::new(&HealthSpec::default(), 5, 0, 0);
        let hb = Heartbeat {
            swap_in: u64::MAX,
            swap_out: 1,
            io_read_sectors: u64::MAX,
            io_write_sectors: u64::MAX,
            ..Default::default()
        };
        w.heartbeat(&hb, 1_000);
        w.heartbeat(&hb, 2_000);
        assert_eq!(w.check(2_000), None);
    }

    #[test]
    fn a_failed_service_group_fails_the_node_and_recovery_clears_it() {
        use crate::agent::proto::GroupStatus;
        let mut w = NodeWatch::new(&HealthSpec::default(), 5, 0, 0);
        let mut hb = Heartbeat {
            groups: vec![GroupStatus {
                name: "web".into(),
                state: GroupState::Failed,
                detail: "httpd restarted 3 times".into(),
            }],
            ..Default::default()
        };
        w.heartbeat(&hb, 1_000);
        assert!(
            matches!(w.check(1_000), Some(Verdict::Failed { detail: m, .. }) if m.contains("service group web"))
        );
        hb.groups[0].state = GroupState::Running;
        w.heartbeat(&hb, 2_000);
        assert_eq!(w.check(2_000), None);
        // Default heartbeat timeout: three intervals.
        assert_eq!(w.check(17_000), None);
        assert!(w.check(17_001).is_some());
    }
}
