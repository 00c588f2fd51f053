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

/// What a monitor concluded about a node's role.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Failed(String),
    Slow(String),
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
        (silent > self.timeout_ms).then(|| {
            Verdict::Failed(format!(
                "no heartbeat for {:.1} s (timeout {:.1} s)",
                silent as f64 / 1000.0,
                self.timeout_ms as f64 / 1000.0
            ))
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
}

impl ProbeWatch {
    pub fn new(interval_ms: u64, failures: u32, now: u64) -> ProbeWatch {
        ProbeWatch {
            interval_ms,
            failures_allowed: failures.max(1),
            next_due: now,
            failures: 0,
            last_error: String::new(),
            in_flight: false,
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

    /// A probe's outcome (a timeout is an `Err`).
    pub fn finished(&mut self, result: Result<(), String>) {
        self.in_flight = false;
        match result {
            Ok(()) => self.failures = 0,
            Err(e) => {
                self.failures += 1;
                self.last_error = e;
            }
        }
    }

    pub fn check(&self) -> Option<Verdict> {
        (self.failures >= self.failures_allowed).then(|| {
            Verdict::Failed(format!(
                "probe failed {} times in a row: {}",
                self.failures, self.last_error
            ))
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
            Verdict::Slow(format!(
                "{} {side} {} for {:.0} s (now {})",
                self.metric,
                self.limit,
                held as f64 / 1000.0,
                self.last
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_loss_after_the_timeout_and_not_before() {
        let mut w = HeartbeatWatch::new(10_000, 0);
        assert_eq!(w.check(10_000), None);
        assert!(matches!(w.check(10_001), Some(Verdict::Failed(_))));
        w.beat(9_000);
        assert_eq!(w.check(19_000), None);
        // A late, out-of-order beat does not move the clock back.
        w.beat(5_000);
        assert!(w.check(19_001).is_some());
    }

    #[test]
    fn probes_run_on_schedule_and_fail_after_n_in_a_row() {
        let mut p = ProbeWatch::new(1_000, 3, 0);
        assert!(p.start(0));
        assert!(!p.start(500), "one at a time");
        p.finished(Err("refused".into()));
        assert!(!p.start(999));
        assert!(p.start(1_000));
        p.finished(Err("refused".into()));
        assert_eq!(p.check(), None);
        assert!(p.start(2_000));
        p.finished(Ok(()));
        // Success cleared the count: three more failures are needed.
        for t in [3_000, 4_000] {
            assert!(p.start(t));
            p.finished(Err("timeout".into()));
        }
        assert_eq!(p.check(), None);
        assert!(p.start(5_000));
        p.finished(Err("timeout".into()));
        assert!(matches!(p.check(), Some(Verdict::Failed(m)) if m.contains("3 times") && m.contains("timeout")));
    }

    #[test]
    fn thresholds_must_hold_for_the_whole_duration() {
        // response time > 500 ms for 2 min
        let mut t = Threshold::new("rt_ms", Bad::Above, 500.0, 120_000);
        t.observe(600.0, 0);
        assert_eq!(t.check(119_999), None);
        t.observe(700.0, 60_000);
        assert!(matches!(t.check(120_000), Some(Verdict::Slow(m)) if m.contains("rt_ms above 500")));
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
}
