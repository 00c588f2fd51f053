//! Scale rules: a cluster metric above or below a threshold *continuously* for a duration adds or removes
//! nodes, within min/max, then waits out the rule's cooldown. Pure: samples and `now` in, targets out.
//!
//! A rule's condition must hold on every sample for the whole duration: one sample on the other side of the
//! threshold restarts the clock, so a flapping metric never fires. Samples older than the duration count as
//! silence, not as a held condition. What rules decide is kept as an offset from the cluster's base count
//! (its schedule window or default), so schedules keep working after a rule has fired.

use std::collections::BTreeMap;

use super::{Cluster, Policy};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RuleState {
    /// Since when the condition has held without a break.
    since: Option<u64>,
    last_sample: Option<u64>,
    last_fired: Option<u64>,
}

/// What a rule did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub cluster: String,
    pub metric: String,
    /// Nodes added (positive) or removed (negative), after clamping.
    pub delta: i64,
    pub target: u32,
}

/// Scale-rule state for every cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScaleState {
    rules: BTreeMap<(String, usize), RuleState>,
    /// Per cluster: nodes added (+) or removed (-) by rules, relative to the base count.
    offsets: BTreeMap<String, i64>,
}

/// A sample counts for this long at least, so rules with a very short duration still see the samples
/// that arrive between two planner passes.
const MIN_FRESH: u64 = 30;

fn fresh_for(for_: u64) -> u64 {
    for_.max(MIN_FRESH)
}

fn holds(value: f64, above: Option<f64>, below: Option<f64>) -> bool {
    above.is_some_and(|a| value > a) || below.is_some_and(|b| value < b)
}

impl ScaleState {
    /// Records one sample of a cluster metric.
    pub fn observe(&mut self, policy: &Policy, cluster: &str, metric: &str, value: f64, now: u64) {
        let Some(c) = policy.cluster(cluster) else {
            return;
        };
        for (i, r) in c.spec.scale.iter().enumerate() {
            if r.metric != metric {
                continue;
            }
            let st = self.rules.entry((cluster.to_string(), i)).or_default();
            let stale = st
                .last_sample
                .is_some_and(|t| now.saturating_sub(t) > fresh_for(r.for_.0));
            st.last_sample = Some(now);
            if holds(value, r.above, r.below) {
                if st.since.is_none() || stale {
                    st.since = Some(now);
                }
            } else {
                st.since = None;
            }
        }
    }

    /// Fires every rule whose condition has held for its full duration and whose cooldown has passed.
    /// `base` is the cluster's count before rules (schedule window or default).
    pub fn evaluate(
        &mut self,
        policy: &Policy,
        base: &dyn Fn(&Cluster) -> u32,
        now: u64,
    ) -> Vec<Fired> {
        let mut fired = Vec::new();
        for c in &policy.clusters {
            for (i, r) in c.spec.scale.iter().enumerate() {
                let Some(st) = self.rules.get_mut(&(c.spec.name.clone(), i)) else {
                    continue;
                };
                let fresh = st
                    .last_sample
                    .is_some_and(|t| now.saturating_sub(t) <= fresh_for(r.for_.0));
                let held = st.since.is_some_and(|s| now.saturating_sub(s) >= r.for_.0);
                let cooled = st
                    .last_fired
                    .is_none_or(|t| now.saturating_sub(t) >= r.cooldown.0);
                if !(fresh && held && cooled) {
                    continue;
                }
                let b = base(c) as i64;
                let offset = self.offsets.get(&c.spec.name).copied().unwrap_or(0);
                let step = r.add as i64 - r.remove as i64;
                let target = (b + offset + step).clamp(c.spec.min as i64, c.spec.max as i64);
                let delta = target - (b + offset).clamp(c.spec.min as i64, c.spec.max as i64);
                st.last_fired = Some(now);
                // The condition must hold for a full duration again before the rule fires again.
                st.since = Some(now);
                if delta != 0 {
                    self.offsets.insert(c.spec.name.clone(), target - b);
                    fired.push(Fired {
                        cluster: c.spec.name.clone(),
                        metric: r.metric.clone(),
                        delta,
                        target: target as u32,
                    });
                }
            }
        }
        fired
    }

    /// Desired counts set by rules (clusters whose rules have not moved them are absent).
    pub fn targets(
        &self,
        policy: &Policy,
        base: &dyn Fn(&Cluster) -> u32,
    ) -> BTreeMap<String, u32> {
        policy
            .clusters
            .iter()
            .filter_map(|c| {
                let off = *self.offsets.get(&c.spec.name)?;
                let t = (base(c) as i64 + off).clamp(c.spec.min as i64, c.spec.max as i64);
                Some((c.spec.name.clone(), t as u32))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy() -> Policy {
        let text = r#"
[[cluster]]
name = "web"
min = 1
max = 4
default = 2
images = ["a"]
scale = [
  { metric = "rt_ms", above = 500.0, for = "2m", add = 1, cooldown = "5m" },
  { metric = "rt_ms", below = 50.0, for = "10m", remove = 1, cooldown = "5m" },
]
"#;
        Policy::parse(text, Path::new("p.toml"), &|_, _| true).unwrap()
    }

    fn base(c: &Cluster) -> u32 {
        c.default
    }

    /// Feeds `value` every 10 s from `from` to `to` and evaluates after each sample.
    fn feed(s: &mut ScaleState, p: &Policy, value: f64, from: u64, to: u64) -> Vec<Fired> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            s.observe(p, "web", "rt_ms", value, t);
            out.extend(s.evaluate(p, &base, t));
            t += 10;
        }
        out
    }

    #[test]
    fn threshold_must_hold_for_the_full_duration() {
        let p = policy();
        let mut s = ScaleState::default();
        assert!(
            feed(&mut s, &p, 800.0, 0, 110).is_empty(),
            "fired before 2 minutes"
        );
        let f = feed(&mut s, &p, 800.0, 120, 120);
        assert_eq!(
            f,
            vec![Fired {
                cluster: "web".into(),
                metric: "rt_ms".into(),
                delta: 1,
                target: 3
            }]
        );
        assert_eq!(s.targets(&p, &base).get("web"), Some(&3));
    }

    #[test]
    fn flapping_never_fires() {
        let p = policy();
        let mut s = ScaleState::default();
        for k in 0..30u64 {
            let v = if k % 5 == 4 { 100.0 } else { 900.0 };
            assert!(
                feed(&mut s, &p, v, k * 10, k * 10).is_empty(),
                "fired at {k}"
            );
        }
        assert!(s.targets(&p, &base).is_empty());
    }

    #[test]
    fn cooldown_and_bounds() {
        let p = policy();
        let mut s = ScaleState::default();
        let fired = feed(&mut s, &p, 900.0, 0, 1800);
        // Fires at 2 min, then not before the 5 min cooldown, and never above max 4.
        assert_eq!(
            fired.iter().map(|f| f.target).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(s.targets(&p, &base).get("web"), Some(&4));
    }

    #[test]
    fn recovery_clears_and_scale_in_follows() {
        let p = policy();
        let mut s = ScaleState::default();
        feed(&mut s, &p, 900.0, 0, 120);
        assert_eq!(s.targets(&p, &base).get("web"), Some(&3));
        // Fast again: the remove rule needs 10 minutes of it.
        let f = feed(&mut s, &p, 10.0, 130, 130 + 590);
        assert!(f.is_empty());
        let f = feed(&mut s, &p, 10.0, 730, 730);
        assert_eq!(f[0].target, 2);
    }

    #[test]
    fn silence_is_not_a_held_condition() {
        let p = policy();
        let mut s = ScaleState::default();
        s.observe(&p, "web", "rt_ms", 900.0, 0);
        // No samples for ten minutes: nothing fires, and an old sample does not count as holding.
        assert!(s.evaluate(&p, &base, 600).is_empty());
        s.observe(&p, "web", "rt_ms", 900.0, 600);
        assert!(s.evaluate(&p, &base, 600).is_empty());
    }
}
