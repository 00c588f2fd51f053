//! Service groups: the image's agent config (`/etc/corral/groups.toml`) lists resources — processes,
//! mounts, addresses, health commands — with dependencies. The agent starts them in dependency order,
//! stops them in reverse, checks them every few seconds, restarts a failed resource (and what depends on
//! it) up to `restarts` times, and when that is spent reports the group *failed* in its heartbeats, which
//! corral treats as the node's failure.
//!
//! ```toml
//! [[group]]
//! name = "web"
//! restarts = 3
//! [[group.resource]]
//! name = "addr"
//! address = "10.0.0.5"                      # must be on an interface
//! [[group.resource]]
//! name = "httpd"
//! start = "httpd -f -p 80 -h /www"          # a process, kept running
//! check = "wget -q -O /dev/null http://127.0.0.1/"
//! after = ["addr"]
//! ```
//!
//! [`Group`] is the decision logic (no processes, no clock); [`run`] is the thread that carries it out.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use super::proto::{GroupState, GroupStatus};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupsFile {
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    /// Local restarts of one resource before the group is reported failed.
    #[serde(default = "default_restarts")]
    pub restarts: u32,
    /// Seconds between checks.
    #[serde(default = "default_interval")]
    pub interval: u64,
    /// Seconds the group has to come up: failures before its first good round within this time are
    /// not held against it (no restarts spent).
    #[serde(default = "default_startup")]
    pub startup: u64,
    #[serde(default, rename = "resource")]
    pub resources: Vec<ResourceSpec>,
}

fn default_restarts() -> u32 {
    3
}
fn default_interval() -> u64 {
    2
}
fn default_startup() -> u64 {
    30
}
/// Good rounds in a row after which a resource's restarts are refilled.
const REFILL_AFTER: u32 = 30;
/// Bound on a check command, and on a one-shot start or stop command.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One resource. `start` alone is a process that must keep running; with `oneshot = true` it is a
/// command that must succeed (and `stop` undoes it). `mount` and `address` are checked against the
/// kernel's tables; `check` is a command that must exit 0.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    pub name: String,
    pub start: Option<String>,
    #[serde(default)]
    pub oneshot: bool,
    pub stop: Option<String>,
    pub check: Option<String>,
    /// A path that must be a mount point.
    pub mount: Option<String>,
    /// An IPv4 address that must be on one of the node's interfaces.
    pub address: Option<String>,
    /// Resources that must run before this one.
    #[serde(default)]
    pub after: Vec<String>,
}

/// Reads and validates a groups file; returns each group with its resources in start order.
pub fn parse(text: &str) -> Result<Vec<GroupSpec>, String> {
    let file: GroupsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for g in file.groups {
        let order = start_order(&g.resources).map_err(|e| format!("group {}: {e}", g.name))?;
        let resources = order.into_iter().map(|i| g.resources[i].clone()).collect();
        out.push(GroupSpec { resources, ..g });
    }
    Ok(out)
}

/// Dependency order (stable: file order among equals); an unknown name or a cycle is an error.
pub fn start_order(rs: &[ResourceSpec]) -> Result<Vec<usize>, String> {
    let index: BTreeMap<&str, usize> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();
    if index.len() != rs.len() {
        return Err("two resources share a name".into());
    }
    for r in rs {
        for d in &r.after {
            if !index.contains_key(d.as_str()) {
                return Err(format!("resource {} is after unknown resource {d}", r.name));
            }
        }
    }
    let mut done = vec![false; rs.len()];
    let mut order = Vec::new();
    while order.len() < rs.len() {
        let next = (0..rs.len())
            .find(|&i| !done[i] && rs[i].after.iter().all(|d| done[index[d.as_str()]]));
        match next {
            Some(i) => {
                done[i] = true;
                order.push(i);
            }
            None => {
                let stuck: Vec<&str> = (0..rs.len())
                    .filter(|&i| !done[i])
                    .map(|i| rs[i].name.as_str())
                    .collect();
                return Err(format!("dependency cycle among {}", stuck.join(", ")));
            }
        }
    }
    Ok(order)
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Start(usize),
    Stop(usize),
}

/// A group's decisions. Resources are indexed in start order.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// For each resource, the resources (indexes) that depend on it, directly or not.
    dependents: Vec<Vec<usize>>,
    restarts: u32,
    restarts_left: Vec<u32>,
    state: GroupState,
    detail: String,
    /// Until then (seconds, the caller's clock), failures before the first good round are forgiven.
    startup_until: u64,
    good_rounds: u32,
}

impl Group {
    /// A group over resources already in start order, started at `now` (seconds).
    pub fn new(spec: &GroupSpec, now: u64) -> Group {
        let rs = &spec.resources;
        let mut dependents = vec![Vec::new(); rs.len()];
        for (i, deps) in dependents.iter_mut().enumerate() {
            // Later resources that reach `i` through `after` (start order puts dependents later).
            let mut reach = vec![false; rs.len()];
            reach[i] = true;
            for j in i + 1..rs.len() {
                if rs[j]
                    .after
                    .iter()
                    .any(|d| (0..j).any(|k| reach[k] && rs[k].name == *d))
                {
                    reach[j] = true;
                    deps.push(j);
                }
            }
        }
        Group {
            name: spec.name.clone(),
            dependents,
            restarts: spec.restarts,
            restarts_left: vec![spec.restarts; rs.len()],
            state: GroupState::Starting,
            detail: "starting".into(),
            startup_until: now + spec.startup,
            good_rounds: 0,
        }
    }

    /// Everything started, in order.
    pub fn start_all(&self) -> Vec<Step> {
        (0..self.dependents.len()).map(Step::Start).collect()
    }

    /// Everything stopped, in reverse order.
    pub fn stop_all(&self) -> Vec<Step> {
        (0..self.dependents.len()).rev().map(Step::Stop).collect()
    }

    /// The results of one round of checks at `now` (seconds; one result per resource, in order);
    /// returns what to restart.
    pub fn checked(
        &mut self,
        results: &[Result<(), String>],
        names: &[String],
        now: u64,
    ) -> Vec<Step> {
        if self.state == GroupState::Failed {
            return Vec::new();
        }
        let Some((i, err)) = results
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        else {
            self.state = GroupState::Running;
            self.detail = format!("{} resource(s) running", results.len());
            self.good_rounds += 1;
            if self.good_rounds >= REFILL_AFTER {
                self.restarts_left.fill(self.restarts);
            }
            return Vec::new();
        };
        self.good_rounds = 0;
        let name = names.get(i).map(String::as_str).unwrap_or("?");
        if self.state == GroupState::Starting && now < self.startup_until {
            self.detail = format!("starting: {name}: {err}");
            return Vec::new();
        }
        if self.restarts_left[i] == 0 {
            self.state = GroupState::Failed;
            self.detail = format!("{name}: {err}; no restarts left");
            return Vec::new();
        }
        self.restarts_left[i] -= 1;
        self.detail = format!("{name}: {err}; restarting ({} left)", self.restarts_left[i]);
        // Dependents stop first (reverse order), then the resource and its dependents start again.
        let mut again: Vec<usize> = std::iter::once(i)
            .chain(self.dependents[i].iter().copied())
            .collect();
        again.sort_unstable();
        let mut steps: Vec<Step> = again.iter().rev().map(|&j| Step::Stop(j)).collect();
        steps.extend(again.iter().map(|&j| Step::Start(j)));
        steps
    }

    pub fn status(&self) -> GroupStatus {
        GroupStatus {
            name: self.name.clone(),
            state: self.state,
            detail: self.detail.clone(),
        }
    }
}

/// The statuses heartbeats report; shared with the supervisor threads.
pub type Statuses = Arc<Mutex<Vec<GroupStatus>>>;

/// The running side of one resource.
struct Running {
    spec: ResourceSpec,
    child: Option<Child>,
    start_error: Option<String>,
}

fn sh(cmd: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd);
    c
}

/// Runs a shell command to its end, or kills it after `limit`.
fn run_bounded(cmd: &str, limit: Duration) -> Result<std::process::ExitStatus, String> {
    let mut child = sh(cmd)
        .spawn()
        .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
    let t = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Ok(st),
            Ok(None) if t.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{cmd}` still running after {limit:?}: killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for `{cmd}`: {e}")),
        }
    }
}

impl Running {
    fn start(&mut self) {
        self.start_error = None;
        let Some(cmd) = &self.spec.start else { return };
        if self.spec.oneshot {
            match run_bounded(cmd, COMMAND_TIMEOUT) {
                Ok(s) if s.success() => {}
                Ok(s) => self.start_error = Some(format!("`{cmd}` exited with {s}")),
                Err(e) => self.start_error = Some(e),
            }
        } else {
            match sh(&format!("exec {cmd}")).spawn() {
                Ok(c) => self.child = Some(c),
                Err(e) => self.start_error = Some(format!("cannot start `{cmd}`: {e}")),
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cmd) = &self.spec.stop {
            let _ = run_bounded(cmd, COMMAND_TIMEOUT);
        }
    }

    fn check(&mut self) -> Result<(), String> {
        if let Some(e) = &self.start_error {
            return Err(e.clone());
        }
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Err(format!("process exited ({st})"));
            }
        } else if self.spec.start.is_some() && !self.spec.oneshot {
            return Err("process not running".into());
        }
        if let Some(m) = &self.spec.mount {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            if !mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(m.as_str()))
            {
                return Err(format!("{m} is not mounted"));
            }
        }
        if let Some(a) = &self.spec.address {
            if !local_address(a) {
                return Err(format!("address {a} is not on any interface"));
            }
        }
        if let Some(cmd) = &self.spec.check {
            match run_bounded(cmd, CHECK_TIMEOUT) {
                Ok(s) if s.success() => {}
                Ok(s) => return Err(format!("check `{cmd}` exited with {s}")),
                Err(e) => return Err(format!("check: {e}")),
            }
        }
        Ok(())
    }
}

/// Whether `addr` is one of the node's addresses (the kernel's local routing table lists them).
fn local_address(addr: &str) -> bool {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let lines: Vec<&str> = trie.lines().collect();
    lines.windows(2).any(|w| {
        w[0].trim().trim_start_matches(['|', '-', '+', ' ']).trim() == addr
            && w[1].contains("/32 host LOCAL")
    })
}

/// Supervises the groups until `stop` is set, then stops them in reverse order. Statuses go to
/// `statuses` (same order as `groups`).
pub fn run(groups: Vec<GroupSpec>, statuses: Statuses, stop: Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let t0 = std::time::Instant::now();
    let secs = || t0.elapsed().as_secs();
    let mut all: Vec<(Group, Vec<Running>, Vec<String>)> = groups
        .iter()
        .map(|g| {
            let running = g
                .resources
                .iter()
                .map(|r| Running {
                    spec: r.clone(),
                    child: None,
                    start_error: None,
                })
                .collect();
            let names = g.resources.iter().map(|r| r.name.clone()).collect();
            (Group::new(g, 0), running, names)
        })
        .collect();
    let publish = |all: &[(Group, Vec<Running>, Vec<String>)]| {
        *statuses.lock().unwrap_or_else(|p| p.into_inner()) =
            all.iter().map(|(g, _, _)| g.status()).collect();
    };
    let apply = |rs: &mut [Running], steps: Vec<Step>| {
        for s in steps {
            match s {
                Step::Start(i) => rs[i].start(),
                Step::Stop(i) => rs[i].stop(),
            }
        }
    };
    for (g, rs, _) in all.iter_mut() {
        let steps = g.start_all();
        apply(rs, steps);
        tracing::info!(group = %g.name, "service group started");
    }
    publish(&all);
    let interval = groups.iter().map(|g| g.interval).min().unwrap_or(2).max(1);
    'rounds: while !stop.load(Ordering::SeqCst) {
        // Sleep in small steps: a drain must not wait out a whole interval.
        for _ in 0..interval * 10 {
            if stop.load(Ordering::SeqCst) {
                break 'rounds;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (g, rs, names) in all.iter_mut() {
            let results: Vec<Result<(), String>> = rs.iter_mut().map(|r| r.check()).collect();
            let before = g.status();
            let steps = g.checked(&results, names, secs());
            let after = g.status();
            if after != before {
                tracing::info!(group = %g.name, state = ?after.state, "{}", after.detail);
            }
            apply(rs, steps);
        }
        publish(&all);
    }
    for (g, rs, _) in all.iter_mut().rev() {
        let steps = g.stop_all();
        apply(rs, steps);
        tracing::info!(group = %g.name, "service group stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[group]]
name = "web"
restarts = 2
[[group.resource]]
name = "httpd"
start = "httpd"
after = ["fs", "addr"]
[[group.resource]]
name = "fs"
mount = "/srv"
[[group.resource]]
name = "addr"
address = "10.0.0.5"
[[group.resource]]
name = "cache"
start = "cache"
after = ["httpd"]
"#;

    #[test]
    fn resources_start_in_dependency_order_and_cycles_are_refused() {
        let g = parse(FILE).unwrap();
        let names: Vec<&str> = g[0].resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["fs", "addr", "httpd", "cache"]);
        let grp = Group::new(&g[0], 0);
        assert_eq!(
            grp.stop_all(),
            [Step::Stop(3), Step::Stop(2), Step::Stop(1), Step::Stop(0)]
        );
        let cyc = "[[group]]\nname='x'\n[[group.resource]]\nname='a'\nafter=['b']\n[[group.resource]]\nname='b'\nafter=['a']\n";
        assert!(parse(cyc).unwrap_err().contains("cycle"));
        let unknown = "[[group]]\nname='x'\n[[group.resource]]\nname='a'\nafter=['zz']\n";
        assert!(parse(unknown).unwrap_err().contains("unknown resource zz"));
    }

    #[test]
    fn a_failing_resource_is_restarted_with_its_dependents_then_the_group_fails() {
        let g = parse(FILE).unwrap();
        let names: Vec<String> = g[0].resources.iter().map(|r| r.name.clone()).collect();
        let mut grp = Group::new(&g[0], 0);
        let ok = vec![Ok(()); 4];
        let mut bad = ok.clone();
        bad[2] = Err("process exited".into());
        // Starting (30 s by default): failures are forgiven, no restart spent.
        assert!(grp.checked(&bad, &names, 5).is_empty());
        assert_eq!(grp.status().state, GroupState::Starting);
        assert!(grp.checked(&ok, &names, 6).is_empty());
        assert_eq!(grp.status().state, GroupState::Running);
        // httpd (2) fails: cache (3) stops first, then httpd; httpd starts, then cache.
        assert_eq!(
            grp.checked(&bad, &names, 8),
            [Step::Stop(3), Step::Stop(2), Step::Start(2), Step::Start(3)]
        );
        assert!(grp.status().detail.contains("1 left"));
        assert_eq!(grp.checked(&bad, &names, 10).len(), 4);
        // Restarts spent: failed, and it stays failed.
        assert!(grp.checked(&bad, &names, 12).is_empty());
        let st = grp.status();
        assert_eq!(st.state, GroupState::Failed);
        assert!(
            st.detail.contains("httpd") && st.detail.contains("no restarts left"),
            "{}",
            st.detail
        );
        assert!(grp.checked(&ok, &names, 14).is_empty());
        assert_eq!(grp.status().state, GroupState::Failed);
        // A leaf (cache) restarts alone; a long good run refills the restarts.
        let mut grp = Group::new(&g[0], 0);
        let mut bad = ok.clone();
        bad[3] = Err("x".into());
        assert!(grp.checked(&ok, &names, 1).is_empty());
        assert_eq!(
            grp.checked(&bad, &names, 2),
            [Step::Stop(3), Step::Start(3)]
        );
        assert_eq!(grp.checked(&bad, &names, 3).len(), 2);
        for t in 0..REFILL_AFTER as u64 {
            assert!(grp.checked(&ok, &names, 4 + t).is_empty());
        }
        assert_eq!(grp.checked(&bad, &names, 100).len(), 2);
        assert!(
            grp.status().detail.contains("1 left"),
            "{}",
            grp.status().detail
        );
    }

    #[test]
    fn a_hung_command_is_killed() {
        let t = std::time::Instant::now();
        let e = run_bounded("sleep 5", Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(run_bounded("true", Duration::from_secs(5))
            .unwrap()
            .success());
    }
}
