//! A deterministic simulator of a boot farm (quinn-proto's `Pair` is the model): the real planner
//! (`policy::plan`), the real move machine (`controller::moves`), the real failover machine
//! (`controller::failover`) and the real node monitors (`health::NodeWatch`), wired the way the
//! controller's shell wires them, over a virtual clock, with simulated nodes, agents, BMCs and boots that
//! take time, and a seeded fault schedule: nodes dying, agents going silent, nodes slowing, BMC calls
//! failing, boots hanging, corral restarted at any step (what the store keeps is kept, the rest is lost),
//! and policy edits.
//!
//! Invariants checked after every step:
//! - never two nodes on one slot's disk;
//! - a failed node is off or cut off from its slot's disk before another node boots on it;
//! - after a plan, no cluster is below `min` while a compatible node is idle;
//! - nothing kept in the store (assignments, holds, failed flags, failovers) differs across a restart;
//! - every alert is justified (no idle compatible node when "no eligible node" or "short" is said; a
//!   failover gives up only after its attempts).
//!
//! A failing run prints its seed; `CORRAL_SIM_SEED` replays one. `bench/sim.sh` runs the long campaign
//! (`CORRAL_SIM_SEEDS`, `CORRAL_SIM_DAYS`, `CORRAL_SIM_NODES`) and prints the figures.
//!
//! What is not the real code: the glue below (`Ctl`) mirrors `controller::{mod,mover,health}` by hand,
//! since the controller's shell is not yet one core that takes inputs and returns effects.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use corral::agent::proto::{Heartbeat, OrderKind};
use corral::controller::failover::{self, Failover, Failovers, Rules, SlotView};
use corral::controller::moves::{self, Call, Move, MoveSpec};
use corral::domain::{Mac, SlotRef};
use corral::health::{NodeWatch, Verdict};
use corral::policy::plan::{self, Action, NodeState, State};
use corral::policy::Policy;
use corral::power::PowerState;

/// splitmix64: small, seedable, the same everywhere.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

const SEC: u64 = 1000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;
/// The shell's health tick.
const TICK: u64 = SEC;
/// A parked node's iPXE asks for its script again this often.
const POLL: u64 = 5 * SEC;
/// The controller replans this often besides on events (schedules move with the clock).
const REPLAN_EVERY: u64 = 5 * MIN;
/// Every watch is looked at this often (watches of nodes with a fault or in flight: every tick).
const FULL_CHECK_EVERY: u64 = 5 * MIN;

fn mac(i: usize) -> Mac {
    let b = (i as u32).to_be_bytes();
    Mac([0x52, 0x54, 0x00, b[1], b[2], b[3]])
}

/// The policy: `clusters` clusters over `nodes` nodes, a mix of priorities, preemption, schedules,
/// hardware needs, quarantine and slow rules.
fn policy_text(rng: &mut Rng, clusters: usize, nodes: usize) -> String {
    let mut t = String::from(
        "[settings]\ncooldown = \"5m\"\nboot_timeout = \"3m\"\nheartbeat_interval = \"5s\"\npower_off_timeout = \"60s\"\n\n[[image]]\nname = \"img\"\ncatalog = \"testos\"\n\n",
    );
    // About 80 % of the nodes wanted by default, so there is a pool to fail over to and preemption
    // when schedules raise demand.
    let per = (nodes * 8 / 10 / clusters).max(1) as u64;
    for c in 0..clusters {
        let default = rng.range(per / 2, per + per / 2).max(1);
        let min = rng.range(0, default);
        let max = default * 2 + 1;
        let prio = rng.range(1, 20);
        let preempt = rng.chance(0.4);
        let on_failure = if rng.chance(0.1) {
            "quarantine"
        } else {
            "pool"
        };
        t += &format!(
            "[[cluster]]\nname = \"c{c:03}\"\npriority = {prio}\nmin = {min}\nmax = {max}\ndefault = {default}\npreempt = {preempt}\nimages = [\"img\"]\n"
        );
        if rng.chance(0.2) {
            t += "requires = { min_cpus = 16 }\n";
        }
        if rng.chance(0.2) {
            let busy = rng.range(default, max);
            let from = rng.range(0, 16);
            t += &format!(
                "schedule = [{{ cron = \"* {from}-{} * * *\", count = {busy} }}]\n",
                from + rng.range(1, 7)
            );
        }
        t += &format!("[cluster.health]\nheartbeat_timeout = \"15s\"\non_failure = \"{on_failure}\"\nfailover_attempts = 3\n");
        if rng.chance(0.3) {
            t += "slow = [{ metric = \"load1\", above = 50.0, for = \"60s\" }]\n";
        }
        t += "\n";
    }
    t
}

/// What a simulated machine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    Off,
    /// Firmware, iPXE, kernel: asks for its script at the end.
    Booting,
    /// Running: its role (`attached`), or parked in the pool.
    Up,
}

/// A simulated machine and its BMC and agent: the truth, which corral only sees through its inputs.
#[derive(Debug, Clone)]
struct Hw {
    power: Power,
    /// The slot whose disk it uses now (its export is open to it).
    attached: Option<SlotRef>,
    /// Dead hardware until then: no heartbeats, does not boot; the BMC still answers.
    dead_until: u64,
    /// The agent stopped heartbeating (until the node boots again).
    silent: bool,
    /// Reports a load the slow rule counts until then (or until it boots again): a slow spell.
    slow_until: u64,
    /// Its BMC fails calls until then.
    bmc_bad_until: u64,
    /// The next boot hangs in firmware.
    hang_next_boot: bool,
    /// Generation of the current boot (stale boot-done events are dropped).
    boot_gen: u64,
}

impl Hw {
    fn agent_up(&self, now: u64) -> bool {
        self.power == Power::Up && !self.silent && now >= self.dead_until
    }
}

/// Something that happens at a time.
#[derive(Debug, Clone)]
enum Ev {
    /// The controller's tick (health checks, moves' clocks, failovers followed).
    Tick,
    Replan,
    /// A boot finished: the node asks for its script.
    BootDone {
        node: usize,
        gen: u64,
    },
    /// A parked node asks again.
    Poll {
        node: usize,
        gen: u64,
    },
    /// A power call made by corral in incarnation `epoch` ends.
    PowerDone {
        node: usize,
        call: Call,
        epoch: u64,
        purpose: Purpose,
    },
    /// The agent finished an order.
    OrderDone {
        node: usize,
        kind: OrderKind,
        epoch: u64,
    },
    Fault,
    /// A cluster's broken image is fixed (the operator reloads the policy and power-cycles the nodes
    /// that hung on it).
    ImageFixed {
        cluster: String,
    },
}

/// A cluster whose image does not boot: every node that boots into it hangs after fetching its script.
#[derive(Debug, Default)]
struct Broken {
    since: u64,
    until: u64,
    /// corral restarts during the episode (each forgets the slots it had blocked).
    restarts: u64,
    /// Nodes that hung on it, per slot.
    hung: BTreeMap<u32, BTreeSet<usize>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Move,
    Fence,
    Restart,
    Wake,
}

struct Timed(u64, u64, Ev);
impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}

/// The controller's state, as the shell holds it: planner state, disk holds, fence settling, running
/// moves, the failover machine, the watches.
#[derive(Default)]
struct Ctl {
    state: State,
    holds: BTreeMap<Mac, SlotRef>,
    settling: BTreeMap<SlotRef, u64>,
    moves: BTreeMap<Mac, Move>,
    failovers: Failovers,
    owners: failover::SlotOwners,
    /// Nodes that failed to come up in slots they were moved into (in memory, as in the controller).
    boot_failures: failover::BootFailures,
    /// Nodes whose running move switched them on into their new place.
    powered_on: BTreeSet<Mac>,
    watches: HashMap<Mac, (SlotRef, NodeWatch)>,
    quarantined: BTreeSet<Mac>,
    /// Nodes in a role whose agent ran in that role (the token of the boot was used): watched again
    /// after a restart.
    ran: BTreeSet<Mac>,
}

/// What the store keeps, compared across a restart.
#[derive(Debug, PartialEq)]
struct Kept {
    assignments: BTreeMap<Mac, SlotRef>,
    holds: BTreeMap<Mac, SlotRef>,
    failed: BTreeSet<Mac>,
    quarantined: BTreeSet<Mac>,
    failovers: BTreeMap<SlotRef, String>,
    moving: BTreeSet<Mac>,
}

#[derive(Debug, Default)]
struct Figures {
    steps: u64,
    checks: u64,
    plans: u64,
    /// Plans by what asked for them.
    plan_why: BTreeMap<&'static str, u64>,
    /// Wall time spent in the planner.
    plan_wall: Duration,
    faults: BTreeMap<&'static str, u64>,
    events: BTreeMap<String, u64>,
    alerts: u64,
    restarts: u64,
    moves_done: u64,
    failovers_done: u64,
    /// Slots blocked after nodes in a row failed to come up in them.
    blocked: u64,
    /// Nodes that hung on a broken image.
    hung: u64,
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Timed>,
    policy: Policy,
    policy_text: String,
    hw: Vec<Hw>,
    index: HashMap<Mac, usize>,
    ctl: Ctl,
    epoch: u64,
    /// The assignments changed since the last tick: watches of nodes that left their role are dropped.
    replanned: bool,
    /// Nodes with a fault or in flight: their watches are looked at every tick.
    suspects: BTreeSet<usize>,
    /// Failed-over times per slot (for the churn alert's justification).
    failed_at: BTreeMap<SlotRef, Vec<u64>>,
    fig: Figures,
    /// The last things that happened to each node, printed with a violation.
    trail: HashMap<usize, std::collections::VecDeque<String>>,
    /// Wall-clock limit of the run: a sign the simulation is stuck, not a figure.
    fault_every: u64,
    /// Clusters whose image does not boot now.
    broken: BTreeMap<String, Broken>,
}

impl Sim {
    fn new(seed: u64, nodes: usize, clusters: usize) -> Sim {
        let mut rng = Rng(seed);
        let text = policy_text(&mut rng, clusters, nodes);
        let policy = Policy::parse(&text, Path::new("sim.toml"), &|_, _| true)
            .unwrap_or_else(|d| panic!("{d:?}"));
        let mut ctl = Ctl::default();
        let mut hw = Vec::new();
        let mut index = HashMap::new();
        for i in 0..nodes {
            let cpus = [4, 8, 16, 32][rng.below(4) as usize];
            let mut n = NodeState::new(mac(i));
            n.arch = Some("x86_64".into());
            n.cpus = Some(cpus);
            n.memory = Some(cpus as u64 * 4096);
            ctl.state.nodes.insert(mac(i), n);
            hw.push(Hw {
                power: Power::Off,
                attached: None,
                dead_until: 0,
                silent: false,
                slow_until: 0,
                bmc_bad_until: 0,
                hang_next_boot: false,
                boot_gen: 0,
            });
            index.insert(mac(i), i);
        }
        // Faults: on average one every 2 minutes on 5,000 nodes (720 a day), proportionally fewer on
        // smaller farms, but at least one every 10 minutes.
        let fault_every = (10 * MIN * 1000 / nodes as u64).clamp(10 * SEC, 10 * MIN);
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            policy,
            policy_text: text,
            hw,
            index,
            ctl,
            epoch: 0,
            replanned: true,
            suspects: BTreeSet::new(),
            failed_at: BTreeMap::new(),
            fig: Figures::default(),
            trail: HashMap::new(),
            fault_every,
            broken: BTreeMap::new(),
        };
        // Every node is switched on at the start and discovered when it first asks for a script.
        for i in 0..nodes {
            let at = sim.rng.below(60 * SEC);
            sim.power_on_at(i, at);
        }
        sim.at(0, Ev::Tick);
        sim.at(70 * SEC, Ev::Replan);
        let f = sim.rng.range(1, sim.fault_every);
        sim.at(f, Ev::Fault);
        sim
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Timed(t, self.seq, ev));
    }

    fn power_on_at(&mut self, i: usize, t: u64) {
        let h = &mut self.hw[i];
        if h.power != Power::Off {
            return;
        }
        h.power = Power::Booting;
        h.boot_gen += 1;
        h.silent = false;
        h.slow_until = 0;
        let gen = h.boot_gen;
        if std::mem::take(&mut h.hang_next_boot) {
            return;
        }
        let took = 20 * SEC + self.rng.below(40 * SEC);
        self.at(t + took, Ev::BootDone { node: i, gen });
    }

    fn power_off(&mut self, i: usize) {
        let h = &mut self.hw[i];
        h.power = Power::Off;
        h.attached = None;
        h.boot_gen += 1;
    }

    fn rules(&self, cluster: &str) -> Rules {
        let h = self.policy.cluster(cluster).map(|c| c.spec.health());
        Rules {
            on_failure: h.map(|h| h.on_failure).unwrap_or_default(),
            attempts: h.map_or(3, |h| h.failover_attempts),
            boot_timeout_ms: self.policy.boot_timeout * 1000,
        }
    }

    /// May `m` boot into `slot` now (the controller's `bootable_slot_of`)?
    fn bootable(&self, m: Mac, slot: &SlotRef) -> bool {
        let held = self.ctl.holds.iter().any(|(o, s)| *o != m && s == slot);
        let settling = self.ctl.settling.get(slot).is_some_and(|t| self.now < *t);
        !held && !settling
    }

    fn slot_of(&self, m: Mac) -> Option<&SlotRef> {
        self.ctl.state.assignments.get(&m)
    }

    fn note(&mut self, i: usize, what: impl FnOnce() -> String) {
        let t = self.trail.entry(i).or_default();
        if t.len() == 40 {
            t.pop_front();
        }
        t.push_back(format!("{:>10} {}", self.now, what()));
    }

    fn violation(&self, what: String) -> ! {
        let mut trails = String::new();
        let mut seen = BTreeSet::new();
        // (Not split on ':', which is inside every MAC.)
        for w in what.split([' ', ',', ';', '(', ')']) {
            let w = w.trim_end_matches([':', '.']);
            if let Some(i) = w.parse::<Mac>().ok().and_then(|m| self.index.get(&m)) {
                if seen.insert(*i) {
                    trails += &format!(
                        "\n{}:\n  {}",
                        mac(*i),
                        self.trail
                            .get(i)
                            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n  "))
                            .unwrap_or_default()
                    );
                }
            }
        }
        panic!(
            "t={} ms ({:.2} h): {what}{trails}",
            self.now,
            self.now as f64 / HOUR as f64
        )
    }

    // --- the controller's shell ---------------------------------------------------------------

    fn replan(&mut self, why: &'static str) {
        self.fig.plans += 1;
        *self.fig.plan_why.entry(why).or_default() += 1;
        for slot in self.ctl.boot_failures.expire(self.now) {
            self.ctl.state.blocked.remove(&slot);
        }
        let now_s = self.now / 1000;
        let t = Instant::now();
        let actions = plan::plan(&self.policy, &self.ctl.state, now_s);
        self.fig.plan_wall += t.elapsed();
        let next = plan::apply(&self.ctl.state, &actions, now_s);
        let mut to_move = Vec::new();
        for a in &actions {
            if let Action::Assign { node, .. }
            | Action::Release { node, .. }
            | Action::Preempt { node, .. } = a
            {
                let i = self.index[node];
                self.note(i, || format!("plan: {a:?}"));
            }
            if let Action::Release { node, from } | Action::Preempt { node, from, .. } = a {
                if self.ctl.state.assignments.contains_key(node)
                    && next.nodes.get(node).is_some_and(|n| n.healthy)
                {
                    self.ctl.holds.entry(*node).or_insert_with(|| from.clone());
                    to_move.push(*node);
                }
            }
        }
        let idle = self.idle(&next);
        for a in &actions {
            if let Action::Alert { cluster, .. } = a {
                self.fig.alerts += 1;
                // Justified: no idle node the cluster could take.
                if let Some(i) = self.idle_compatible(cluster, &idle) {
                    self.violation(format!(
                        "planner said {cluster} is short while {} is idle and compatible",
                        mac(i)
                    ));
                }
            }
        }
        self.ctl.state = next;
        self.replanned = true;
        for m in to_move {
            if !self.ctl.moves.contains_key(&m) {
                self.start_move(m);
            }
        }
        // Assigned nodes that are off are switched on; parked ones pick the role up at their next poll.
        let off: Vec<usize> = self
            .ctl
            .state
            .assignments
            .keys()
            .map(|m| self.index[m])
            .filter(|i| self.hw[*i].power == Power::Off && !self.ctl.moves.contains_key(&mac(*i)))
            .collect();
        for i in off {
            self.bmc(i, Call::On, Purpose::Wake);
        }
        self.check_min();
    }

    /// The idle nodes (unassigned, healthy, not held) of a state.
    fn idle<'a>(&self, st: &'a State) -> Vec<&'a NodeState> {
        st.nodes
            .values()
            .filter(|n| {
                n.healthy
                    && !st.assignments.contains_key(&n.mac)
                    && !self.ctl.holds.contains_key(&n.mac)
            })
            .collect()
    }

    /// An idle node compatible with `cluster`, among `idle`.
    fn idle_compatible(&self, cluster: &str, idle: &[&NodeState]) -> Option<usize> {
        let c = self.policy.cluster(cluster)?;
        idle.iter()
            .find(|n| plan::compatible(c, n))
            .map(|n| self.index[&n.mac])
    }

    fn check_min(&mut self) {
        self.fig.checks += 1;
        let idle = self.idle(&self.ctl.state);
        let mut count: BTreeMap<&str, u32> = BTreeMap::new();
        for s in self.ctl.state.assignments.values() {
            *count.entry(s.cluster.as_str()).or_default() += 1;
        }
        for c in &self.policy.clusters {
            let have = count.get(c.spec.name.as_str()).copied().unwrap_or(0);
            // Blocked slots (nodes in a row did not come up in them) take no node: a cluster left with
            // fewer open slots than its minimum cannot reach it.
            let blocked = self
                .ctl
                .state
                .blocked
                .iter()
                .filter(|s| s.cluster == c.spec.name)
                .count() as u32;
            if have < c.spec.min && c.spec.max.saturating_sub(blocked) >= c.spec.min {
                if let Some(i) = self.idle_compatible(&c.spec.name, &idle) {
                    self.violation(format!(
                        "{} has {have} < min {} nodes while {} is idle and compatible",
                        c.spec.name,
                        c.spec.min,
                        mac(i)
                    ));
                }
            }
        }
    }

    fn start_move(&mut self, m: Mac) {
        let i = self.index[&m];
        let spec = MoveSpec {
            agent: self.hw[i].agent_up(self.now),
            power: true,
            to_role: self.slot_of(m).is_some(),
            grace_ms: 5 * SEC,
            off_timeout_ms: self.policy.power_off_timeout * 1000,
            boot_timeout_ms: self.policy.boot_timeout * 1000,
        };
        self.note(i, || format!("move starts: {spec:?}"));
        let (mv, out) = Move::start(spec, self.now);
        self.ctl.moves.insert(m, mv);
        self.suspects.insert(i);
        self.move_outputs(m, out);
    }

    fn move_input(&mut self, m: Mac, input: moves::Input) {
        let Some(mv) = self.ctl.moves.get_mut(&m) else {
            return;
        };
        let out = mv.on(input, self.now);
        self.move_outputs(m, out);
    }

    fn move_outputs(&mut self, m: Mac, out: Vec<moves::Output>) {
        let i = self.index[&m];
        for o in out {
            self.note(i, || format!("move: {o:?}"));
            match o {
                moves::Output::Order(kind) => self.order(i, kind),
                moves::Output::Power(call) => self.bmc(i, call, Purpose::Move),
                moves::Output::Fence => {
                    self.ctl.holds.remove(&m);
                    self.close_export(i);
                }
                moves::Output::Event { kind, .. } => {
                    if kind == corral::events::EventKind::MovePowerOn {
                        self.ctl.powered_on.insert(m);
                    }
                    *self.fig.events.entry(kind.to_string()).or_default() += 1
                }
                moves::Output::Finished { ok, .. } => {
                    let powered_on = self.ctl.powered_on.remove(&m);
                    if !ok && powered_on {
                        // As the mover does: a node that did not come up counts against its slot.
                        if let Some(slot) = self.slot_of(m).cloned() {
                            let limit = self.rules(&slot.cluster).attempts;
                            if self.ctl.boot_failures.failed(&slot, m, self.now, limit) {
                                self.note(i, || format!("blocks {}/{}", slot.cluster, slot.slot));
                                self.ctl.state.blocked.insert(slot);
                                self.fig.blocked += 1;
                            }
                        }
                    }
                    self.ctl.moves.remove(&m);
                    self.ctl.holds.remove(&m);
                    self.close_export_unless_current(i);
                    if ok {
                        self.fig.moves_done += 1;
                    } else {
                        self.mark_failed(m, false);
                        self.replan("move failed");
                    }
                }
            }
        }
    }

    /// A node's export of a slot it no longer holds closes (the NBD room re-checks every second).
    fn close_export(&mut self, i: usize) {
        if self.hw[i].attached.is_some() {
            self.note(i, || "export closed".into());
        }
        self.hw[i].attached = None;
    }

    fn close_export_unless_current(&mut self, i: usize) {
        let m = mac(i);
        // A disk the node neither holds nor is assigned any more is closed to it.
        if self.hw[i].attached.as_ref() != self.slot_of(m) && !self.ctl.holds.contains_key(&m) {
            self.close_export(i);
        }
    }

    fn order(&mut self, i: usize, kind: OrderKind) {
        if !self.hw[i].agent_up(self.now) {
            return;
        }
        let took = self.rng.range(500, 3 * SEC);
        let epoch = self.epoch;
        self.at(
            self.now + took,
            Ev::OrderDone {
                node: i,
                kind,
                epoch,
            },
        );
    }

    fn bmc(&mut self, i: usize, call: Call, purpose: Purpose) {
        let took = self.rng.range(100, 2 * SEC);
        let epoch = self.epoch;
        self.at(
            self.now + took,
            Ev::PowerDone {
                node: i,
                call,
                epoch,
                purpose,
            },
        );
    }

    fn mark_failed(&mut self, m: Mac, quarantine: bool) {
        if let Some(n) = self.ctl.state.nodes.get_mut(&m) {
            n.healthy = false;
        }
        if quarantine {
            self.ctl.quarantined.insert(m);
        }
    }

    fn failover(&mut self, input: failover::Input) {
        let out = self.ctl.failovers.on(input, self.now);
        for o in out {
            let about = match &o {
                failover::Output::Event { mac, .. }
                | failover::Output::Alert { mac, .. }
                | failover::Output::Unwatch(mac)
                | failover::Output::Hold { mac, .. }
                | failover::Output::Release { mac }
                | failover::Output::MarkFailed { mac, .. }
                | failover::Output::Fence { mac, .. }
                | failover::Output::Restart { mac, .. }
                | failover::Output::Wake(mac)
                | failover::Output::PlanSlow { mac, .. } => Some(self.index[mac]),
                _ => None,
            };
            if let Some(i) = about {
                self.note(i, || format!("failover: {o:?}"));
            }
            match o {
                failover::Output::Event { kind, .. } => {
                    *self.fig.events.entry(kind.to_string()).or_default() += 1
                }
                failover::Output::Alert {
                    cluster,
                    message,
                    mac: m,
                } => {
                    self.fig.alerts += 1;
                    self.justify_alert(&cluster, &message, m);
                }
                failover::Output::Unwatch(m) => {
                    self.ctl.watches.remove(&m);
                }
                failover::Output::Hold { mac: m, slot } => {
                    self.ctl.holds.insert(m, slot);
                }
                failover::Output::Release { mac: m } => {
                    self.ctl.holds.remove(&m);
                    self.close_export(self.index[&m]);
                }
                failover::Output::Settle { slot, until_ms } => {
                    self.ctl.settling.insert(slot, until_ms);
                }
                failover::Output::MarkFailed {
                    mac: m, quarantine, ..
                } => {
                    self.mark_failed(m, quarantine);
                    if quarantine {
                        // Cut off from the disk at once, left running.
                        self.close_export(self.index[&m]);
                    }
                }
                failover::Output::Fence { mac: m, .. } => {
                    let i = self.index[&m];
                    self.suspects.insert(i);
                    self.bmc(i, Call::Off { hard: true }, Purpose::Fence);
                }
                failover::Output::Restart { mac: m, .. } => {
                    let i = self.index[&m];
                    self.bmc(i, Call::On, Purpose::Restart);
                }
                failover::Output::Wake(m) => {
                    let i = self.index[&m];
                    self.suspects.insert(i);
                    if self.hw[i].power == Power::Off {
                        self.bmc(i, Call::On, Purpose::Wake);
                    }
                }
                failover::Output::Plan => self.replan("failover"),
                failover::Output::PlanSlow {
                    mac: m,
                    slot,
                    reason,
                    began_ms,
                } => {
                    self.ctl.state.slow.insert(m);
                    self.replan("slow");
                    self.ctl.state.slow.remove(&m);
                    let moved = self.slot_of(m) != Some(&slot);
                    self.failover(failover::Input::SlowPlanned {
                        mac: m,
                        slot,
                        reason,
                        began_ms,
                        moved,
                    });
                }
                failover::Output::Began => {}
                failover::Output::Done => self.fig.failovers_done += 1,
            }
        }
    }

    fn justify_alert(&self, cluster: &str, message: &str, old: Mac) {
        if message.starts_with("no eligible node") {
            let idle = self.idle(&self.ctl.state);
            if let Some(i) = self.idle_compatible(cluster, &idle) {
                let mut filled: Vec<u32> = self
                    .ctl
                    .state
                    .assignments
                    .values()
                    .filter(|s| s.cluster == cluster)
                    .map(|s| s.slot)
                    .collect();
                filled.sort_unstable();
                let desired = self
                    .policy
                    .cluster(cluster)
                    .map(|c| plan::desired(c, &self.ctl.state, self.now / 1000, &self.policy.zone));
                self.violation(format!(
                    "{message}, while {} is idle ({cluster} desired {desired:?}, slots filled {filled:?})",
                    mac(i)
                ));
            }
        } else if message.contains("gave up after") {
            let n: u32 = message
                .split("after ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if n < self.rules(cluster).attempts {
                self.violation(format!("{message}: fewer than the cluster's attempts"));
            }
        } else if message.contains("failed over") {
            let slot = message.split(' ').next().unwrap_or_default();
            let (c, s) = slot.split_once('/').unwrap_or_default();
            let key = SlotRef {
                cluster: c.into(),
                slot: s.parse().unwrap_or(u32::MAX),
            };
            let recent = self.failed_at.get(&key).map_or(0, |l| {
                l.iter()
                    .filter(|t| self.now - **t < failover::CHURN_WINDOW_MS)
                    .count()
            });
            if recent <= self.rules(cluster).attempts as usize {
                self.violation(format!("{message}: only {recent} failures in the window"));
            }
        } else if !message.contains("cannot be fenced") {
            self.violation(format!("an alert nobody expects for {old}: {message}"));
        }
    }

    /// The health tick: verdicts acted on, moves' clocks, failovers followed.
    fn tick(&mut self, full: bool) {
        // Drop watches of nodes that left their role.
        if std::mem::take(&mut self.replanned) || full {
            let st = &self.ctl.state;
            let fo = &self.ctl.failovers;
            self.ctl
                .watches
                .retain(|m, (s, _)| st.assignments.get(m) == Some(s) && !fo.failing(*m, s));
        }
        let look: Vec<Mac> = if full {
            self.ctl.watches.keys().copied().collect()
        } else {
            self.suspects
                .iter()
                .map(|i| mac(*i))
                .filter(|m| self.ctl.watches.contains_key(m))
                .collect()
        };
        let hb_ok = Heartbeat::default();
        let hb_slow = Heartbeat {
            load1: 99.0,
            ..Heartbeat::default()
        };
        let mut acting = Vec::new();
        for m in look {
            let i = self.index[&m];
            if self.ctl.moves.contains_key(&m) {
                continue;
            }
            let up = self.hw[i].agent_up(self.now);
            let slow = self.now < self.hw[i].slow_until;
            let Some((slot, w)) = self.ctl.watches.get_mut(&m) else {
                continue;
            };
            // A live agent has beaten within its interval; feeding the beat at the look is the same
            // to the monitor.
            if up {
                w.heartbeat(if slow { &hb_slow } else { &hb_ok }, self.now);
            }
            match w.check(self.now) {
                Some(v) => {
                    let began = match &v {
                        Verdict::Slow { .. } => w.slow_since().unwrap_or(self.now),
                        _ => self.now,
                    };
                    acting.push((m, slot.clone(), v, began));
                }
                None => self.ctl.failovers.cleared(m),
            }
        }
        for (m, slot, v, began_ms) in acting {
            if !self.ctl.watches.contains_key(&m) {
                continue;
            }
            let rules = self.rules(&slot.cluster);
            match v {
                Verdict::Failed { detail, .. } => {
                    self.failed_at
                        .entry(slot.clone())
                        .or_default()
                        .push(self.now);
                    self.failover(failover::Input::Failed {
                        mac: m,
                        slot,
                        reason: detail,
                        began_ms,
                        rules,
                    })
                }
                Verdict::Slow { detail, .. } => {
                    if self.ctl.failovers.slow_due(m, self.now) {
                        self.failover(failover::Input::Slow {
                            mac: m,
                            slot,
                            reason: detail,
                            began_ms,
                            rules,
                        })
                    }
                }
            }
        }
        let moving: Vec<Mac> = self.ctl.moves.keys().copied().collect();
        for m in moving {
            self.move_input(m, moves::Input::Tick);
        }
        let slots: Vec<SlotRef> = self.ctl.failovers.running().keys().cloned().collect();
        for slot in slots {
            let owner = self.ctl.owners.owner(&self.ctl.state.assignments, &slot);
            let wanted = self.policy.cluster(&slot.cluster).is_some_and(|c| {
                let desired = plan::desired(c, &self.ctl.state, self.now / 1000, &self.policy.zone);
                self.ctl
                    .owners
                    .wanted(&self.ctl.state.assignments, &slot, desired)
                    && !self.ctl.state.blocked.contains(&slot)
            });
            let view = SlotView {
                wanted,
                owner,
                bootable: owner.is_some_and(|m| self.bootable(m, &slot)),
                confirmed: owner.is_some_and(|m| {
                    self.ctl
                        .watches
                        .get(&m)
                        .is_some_and(|(s, w)| *s == slot && w.confirmed())
                }),
                moving: owner.is_some_and(|m| self.ctl.moves.contains_key(&m)),
            };
            let rules = self.rules(&slot.cluster);
            self.failover(failover::Input::Look { slot, view, rules });
        }
        // Nodes with nothing in flight and no fault drop out of the per-tick looks.
        let hw = &self.hw;
        let ctl = &self.ctl;
        let now = self.now;
        self.suspects.retain(|i| {
            let m = mac(*i);
            let h = &hw[*i];
            ctl.moves.contains_key(&m)
                || ctl.holds.contains_key(&m)
                || h.silent
                || now < h.slow_until
                || now < h.dead_until
                || h.power != Power::Up
                || ctl
                    .failovers
                    .running()
                    .values()
                    .any(|f| f.old == m || f.new.is_some_and(|(n, _)| n == m))
        });
    }

    /// A node asks for its script (end of a boot, or a parked node's poll).
    fn ask(&mut self, i: usize) {
        let m = mac(i);
        match self.slot_of(m).cloned() {
            // A node being moved into this slot boots into it too (the controller serves its script and
            // its agent's heartbeat in the new role confirms the move).
            Some(slot) if self.bootable(m, &slot) && self.broken.contains_key(&slot.cluster) => {
                // The image does not boot: the node fetched its script and hangs (no disk opened, no
                // agent, no sign of it).
                self.hw[i].power = Power::Booting;
                self.note(i, || {
                    format!(
                        "hangs booting {}/{}'s broken image",
                        slot.cluster, slot.slot
                    )
                });
                if let Some(b) = self.broken.get_mut(&slot.cluster) {
                    b.hung.entry(slot.slot).or_default().insert(i);
                }
            }
            Some(slot) if self.bootable(m, &slot) => {
                self.attach(i, &slot);
                self.hw[i].power = Power::Up;
                self.ctl.ran.insert(m);
                // Its agent's first heartbeat in the role: a watch starts, a move confirms.
                let c = self
                    .policy
                    .cluster(&slot.cluster)
                    .expect("assigned cluster");
                let mut w = NodeWatch::new(
                    c.spec.health(),
                    self.policy.heartbeat_interval,
                    self.now,
                    self.policy.boot_timeout * 1000,
                );
                if self.hw[i].agent_up(self.now) {
                    w.heartbeat(&Heartbeat::default(), self.now);
                    self.ctl.watches.insert(m, (slot, w));
                }
                self.move_input(m, moves::Input::NewRoleHeartbeat);
            }
            Some(_) => {
                // Held or settling: the parked script retries.
                self.hw[i].power = Power::Up;
                let gen = self.hw[i].boot_gen;
                self.at(self.now + POLL, Ev::Poll { node: i, gen });
            }
            None => {
                self.hw[i].power = Power::Up;
                self.close_export(i);
                self.move_input(m, moves::Input::Parked);
                // A failed node back in the pool (`maybe_back`), unless quarantined, held or moving.
                let failed = self.ctl.state.nodes.get(&m).is_some_and(|n| !n.healthy);
                if failed
                    && !self.ctl.quarantined.contains(&m)
                    && !self.ctl.holds.contains_key(&m)
                    && !self.ctl.moves.contains_key(&m)
                {
                    if let Some(n) = self.ctl.state.nodes.get_mut(&m) {
                        n.healthy = true;
                    }
                    self.replan("node back");
                }
                let gen = self.hw[i].boot_gen;
                self.at(self.now + POLL, Ev::Poll { node: i, gen });
            }
        }
    }

    fn attach(&mut self, i: usize, slot: &SlotRef) {
        self.note(i, || format!("boots on {}/{}", slot.cluster, slot.slot));
        for (j, h) in self.hw.iter().enumerate() {
            if j != i && h.attached.as_ref() == Some(slot) {
                self.violation(format!(
                    "{} boots on {}/{} while {} still has its disk",
                    mac(i),
                    slot.cluster,
                    slot.slot,
                    mac(j)
                ));
            }
        }
        if let Some(f) = self.ctl.failovers.running().get(slot) {
            let old = self.index[&f.old];
            if old != i && self.hw[old].attached.as_ref() == Some(slot) {
                self.violation(format!(
                    "{} boots on {}/{} before failed {} is fenced",
                    mac(i),
                    slot.cluster,
                    slot.slot,
                    f.old
                ));
            }
        }
        self.hw[i].attached = Some(slot.clone());
    }

    // --- the world ----------------------------------------------------------------------------

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick => {
                let full = self.now % FULL_CHECK_EVERY < TICK;
                self.tick(full);
                self.at(self.now + TICK, Ev::Tick);
            }
            Ev::Replan => {
                self.replan("periodic");
                self.at(self.now + REPLAN_EVERY, Ev::Replan);
            }
            Ev::BootDone { node, gen } if self.now < self.hw[node].dead_until => {
                // Dead hardware does not boot; repaired, it does (as if power-cycled by the repair).
                let at = self.hw[node].dead_until + 30 * SEC;
                self.at(at, Ev::BootDone { node, gen });
            }
            Ev::BootDone { node, gen } | Ev::Poll { node, gen } => {
                let h = &self.hw[node];
                if h.boot_gen == gen && h.power != Power::Off && self.now >= h.dead_until {
                    let parked_in_role = h.power == Power::Up && h.attached.is_some();
                    if !parked_in_role {
                        self.ask(node);
                    }
                }
            }
            Ev::OrderDone { node, kind, epoch } => {
                if !self.hw[node].agent_up(self.now) {
                    return;
                }
                match kind {
                    OrderKind::Poweroff => self.power_off(node),
                    OrderKind::Reboot => {
                        self.power_off(node);
                        self.power_on_at(node, self.now);
                    }
                    _ => {}
                }
                if epoch == self.epoch {
                    self.move_input(
                        mac(node),
                        moves::Input::Acked {
                            ok: true,
                            detail: String::new(),
                        },
                    );
                }
            }
            Ev::PowerDone {
                node,
                call,
                epoch,
                purpose,
            } => {
                let failed = self.now < self.hw[node].bmc_bad_until;
                self.note(node, || {
                    format!(
                        "BMC {call:?} for {purpose:?}: {}",
                        if failed { "fails" } else { "ok" }
                    )
                });
                let result = if failed {
                    Err("BMC: connection refused".to_string())
                } else {
                    match call {
                        Call::Off { .. } => {
                            self.power_off(node);
                            Ok(None)
                        }
                        Call::On => {
                            self.power_on_at(node, self.now);
                            Ok(None)
                        }
                        Call::BootNetwork => Ok(None),
                        Call::Status => Ok(Some(if self.hw[node].power == Power::Off {
                            PowerState::Off
                        } else {
                            PowerState::On
                        })),
                    }
                };
                // Calls of an earlier incarnation happened in the world but nobody hears the answer.
                if epoch != self.epoch {
                    return;
                }
                let m = mac(node);
                match purpose {
                    Purpose::Move => self.move_input(m, moves::Input::Power { call, result }),
                    Purpose::Fence => {
                        let slot = self.ctl.holds.get(&m).cloned();
                        if let Some(slot) = slot {
                            let (off, how) = match &result {
                                Ok(_) => (true, "switched off".to_string()),
                                Err(e) => (false, format!("power off failed ({e})")),
                            };
                            self.failover(failover::Input::Fenced {
                                mac: m,
                                slot,
                                off,
                                how,
                                fixed_address: false,
                                took: Duration::from_millis(500),
                            });
                        }
                    }
                    Purpose::Restart | Purpose::Wake => {}
                }
            }
            Ev::ImageFixed { cluster } => self.image_fixed(&cluster),
            Ev::Fault => {
                self.fault();
                let next = self.now + self.rng.range(1, 2 * self.fault_every);
                self.at(next, Ev::Fault);
            }
        }
    }

    fn fault(&mut self) {
        let i = self.rng.below(self.hw.len() as u64) as usize;
        let kind = match self.rng.below(100) {
            0..=29 => "node dies",
            30..=44 => "agent silent",
            45..=59 => "node slows",
            60..=74 => "BMC fails",
            75..=84 => "boot hangs",
            85..=94 => "corral restarts",
            95..=97 => "policy edit",
            _ => "image breaks",
        };
        *self.fig.faults.entry(kind).or_default() += 1;
        self.suspects.insert(i);
        self.note(i, || format!("fault: {kind}"));
        let now = self.now;
        match kind {
            "node dies" => {
                self.hw[i].dead_until = now + self.rng.range(10 * MIN, 6 * HOUR);
                // Dead hardware stops writing to its disk; its export stays open until fenced.
            }
            "agent silent" => self.hw[i].silent = true,
            "node slows" => self.hw[i].slow_until = now + self.rng.range(5 * MIN, 3 * HOUR),
            "BMC fails" => self.hw[i].bmc_bad_until = now + self.rng.range(30 * SEC, 20 * MIN),
            "boot hangs" => self.hw[i].hang_next_boot = true,
            "corral restarts" => self.restart(),
            "image breaks" => self.break_image(),
            _ => self.edit_policy(),
        }
    }

    fn kept(&self) -> Kept {
        Kept {
            assignments: self.ctl.state.assignments.clone().into_iter().collect(),
            holds: self.ctl.holds.clone(),
            failed: self
                .ctl
                .state
                .nodes
                .values()
                .filter(|n| !n.healthy)
                .map(|n| n.mac)
                .collect(),
            quarantined: self.ctl.quarantined.clone(),
            failovers: self
                .ctl
                .failovers
                .running()
                .iter()
                .map(|(s, f)| (s.clone(), serde_json::to_string(f).unwrap()))
                .collect(),
            moving: self.ctl.moves.keys().copied().collect(),
        }
    }

    /// corral is killed and started again: what the store keeps comes back (failovers through their
    /// stored JSON), the rest (watches, settling, moves' progress, failover history) is rebuilt the way
    /// `controller::work::restore_work` does, and answers to calls made before are lost.
    fn restart(&mut self) {
        self.fig.restarts += 1;
        for b in self.broken.values_mut() {
            b.restarts += 1;
        }
        let before = self.kept();
        self.epoch += 1;
        // Blocked slots are in memory only, in the controller too: a restart forgets them.
        let mut state = self.ctl.state.clone();
        state.blocked.clear();
        let mut ctl = Ctl {
            state,
            holds: self.ctl.holds.clone(),
            quarantined: self.ctl.quarantined.clone(),
            ran: self.ctl.ran.clone(),
            ..Ctl::default()
        };
        for (slot, json) in &before.failovers {
            let f: Failover = serde_json::from_str(json).expect("stored failover");
            ctl.failovers.restore(slot.clone(), f);
        }
        self.ctl = ctl;
        // Moves start again from their first step (each step is safe to repeat).
        for m in &before.moving {
            self.start_move(*m);
        }
        // Failed nodes that still hold a disk are fenced again.
        let fence: Vec<Mac> = self
            .ctl
            .holds
            .keys()
            .filter(|m| {
                !self.ctl.moves.contains_key(m)
                    && self.ctl.state.nodes.get(m).is_some_and(|n| !n.healthy)
                    && !self.ctl.quarantined.contains(m)
            })
            .copied()
            .collect();
        for m in fence {
            self.bmc(self.index[&m], Call::Off { hard: true }, Purpose::Fence);
        }
        // Nodes whose agent ran in their slot are watched again from now.
        let watch: Vec<(Mac, SlotRef)> = self
            .ctl
            .state
            .assignments
            .iter()
            .filter(|(m, _)| self.ctl.ran.contains(m))
            .map(|(m, s)| (*m, s.clone()))
            .collect();
        for (m, slot) in watch {
            if self.ctl.failovers.failing(m, &slot) {
                continue;
            }
            let c = self.policy.cluster(&slot.cluster).expect("cluster");
            let w = NodeWatch::new(c.spec.health(), self.policy.heartbeat_interval, self.now, 0);
            self.ctl.watches.insert(m, (slot, w));
            self.suspects.insert(self.index[&m]);
        }
        let mut after = self.kept();
        after.moving = before.moving.clone();
        if after != before {
            self.violation(format!(
                "a restart lost state: before {before:?}, after {after:?}"
            ));
        }
        self.replan("restart");
    }

    /// One cluster's image stops booting for a while (a bad build, a broken disk base).
    fn break_image(&mut self) {
        let c = self.rng.below(self.policy.clusters.len() as u64) as usize;
        let name = self.policy.clusters[c].spec.name.clone();
        if self.broken.contains_key(&name) {
            return;
        }
        let until = self.now + self.rng.range(20 * MIN, 2 * HOUR);
        self.broken.insert(
            name.clone(),
            Broken {
                since: self.now,
                until,
                ..Default::default()
            },
        );
        self.at(until, Ev::ImageFixed { cluster: name });
    }

    /// The image is fixed: the operator reloads the policy (which unblocks every slot, as the
    /// controller's reload does) and power-cycles the nodes that hung. Checked: the broken image took at
    /// most its slots' worth of nodes, a few per slot, never the pool: per slot, the cluster's attempts for
    /// each block it needed (the first, one per block that ran out, one per corral restart that forgot
    /// it), and the one node a plain assignment leaves hanging.
    fn image_fixed(&mut self, cluster: &str) {
        let Some(b) = self.broken.remove(cluster) else {
            return;
        };
        let limit = self.rules(cluster).attempts as u64;
        let blocks = 1 + (b.until - b.since) / failover::SLOT_BLOCK_MS + b.restarts;
        let bound = limit * blocks + 1;
        for (slot, nodes) in &b.hung {
            self.fig.hung += nodes.len() as u64;
            if nodes.len() as u64 > bound {
                let list: Vec<String> = nodes.iter().map(|i| mac(*i).to_string()).collect();
                self.violation(format!(
                    "{cluster}/{slot}'s broken image took {} nodes (at most {bound} expected): {}",
                    nodes.len(),
                    list.join(" ")
                ));
            }
        }
        for slot in self.ctl.boot_failures.clear() {
            self.ctl.state.blocked.remove(&slot);
        }
        for nodes in b.hung.values() {
            for &i in nodes {
                if self.hw[i].power == Power::Booting {
                    self.power_off(i);
                    self.power_on_at(i, self.now + SEC);
                }
            }
        }
        self.replan("policy edit");
    }

    /// An operator edits the policy: one cluster's default changes.
    fn edit_policy(&mut self) {
        let c = self.rng.below(self.policy.clusters.len() as u64) as usize;
        let name = format!("name = \"c{c:03}\"");
        let Some(at) = self.policy_text.find(&name) else {
            return;
        };
        let rest = &self.policy_text[at..];
        let Some(d) = rest.find("default = ") else {
            return;
        };
        let start = at + d + "default = ".len();
        let end = start + self.policy_text[start..].find('\n').unwrap();
        let min_at = at + rest.find("min = ").unwrap() + "min = ".len();
        let min: u64 = self.policy_text[min_at..]
            .split('\n')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let max_at = at + rest.find("max = ").unwrap() + "max = ".len();
        let max: u64 = self.policy_text[max_at..]
            .split('\n')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let new = self.rng.range(min, max).to_string();
        self.policy_text.replace_range(start..end, &new);
        self.policy = Policy::parse(&self.policy_text, Path::new("sim.toml"), &|_, _| true)
            .unwrap_or_else(|d| panic!("{d:?}"));
        self.replan("policy edit");
    }

    /// The farm's state in a few lines (`CORRAL_SIM_DEBUG`), for a run that goes wrong without breaking
    /// an invariant.
    fn dump(&self) {
        let mut power: BTreeMap<String, usize> = BTreeMap::new();
        for h in &self.hw {
            *power.entry(format!("{:?}", h.power)).or_default() += 1;
        }
        let dead = self.hw.iter().filter(|h| self.now < h.dead_until).count();
        let attached = self.hw.iter().filter(|h| h.attached.is_some()).count();
        let unhealthy = self.ctl.state.nodes.values().filter(|n| !n.healthy).count();
        let faults: u64 = self.fig.faults.values().sum();
        eprintln!(
            "  t={} ({:.2} d, {faults} faults, {} plans {:?}) power {power:?} dead {dead} attached {attached} assigned {} unhealthy {unhealthy} quarantined {} holds {} watches {}",
            self.now,
            self.now as f64 / DAY as f64,
            self.fig.plans,
            self.fig.plan_why,
            self.ctl.state.assignments.len(),
            self.ctl.quarantined.len(),
            self.ctl.holds.len(),
            self.ctl.watches.len(),
        );
        for (slot, f) in self.ctl.failovers.running().iter().take(3) {
            let owner = self
                .ctl
                .state
                .assignments
                .iter()
                .find(|(_, s)| *s == slot)
                .map(|(m, _)| *m);
            eprintln!("    {}/{}: {f:?} owner {owner:?}", slot.cluster, slot.slot);
        }
    }

    /// Checks after every step that no slot's disk has two nodes on it.
    fn check_disks(&mut self) {
        self.fig.checks += 1;
        let mut seen: HashMap<&SlotRef, usize> = HashMap::with_capacity(self.hw.len());
        for (i, h) in self.hw.iter().enumerate() {
            if let Some(s) = &h.attached {
                if let Some(j) = seen.insert(s, i) {
                    self.violation(format!(
                        "{} and {} are both on {}/{}'s disk",
                        mac(i),
                        mac(j),
                        s.cluster,
                        s.slot
                    ));
                }
            }
        }
    }

    fn run(&mut self, until: u64, wall_limit: Duration) {
        let t0 = Instant::now();
        let mut next_report = 6 * HOUR;
        let debug = std::env::var_os("CORRAL_SIM_DEBUG").is_some();
        let mut next_dump = 0;
        while let Some(Timed(t, _, ev)) = self.queue.pop() {
            if t > until {
                break;
            }
            self.now = t;
            self.handle(ev);
            self.fig.steps += 1;
            // Every boot onto a disk is checked as it happens (`attach`); the whole farm is scanned
            // every 64 steps besides (a scan is linear in the nodes).
            if self.fig.steps % 64 == 0 {
                self.check_disks();
            }
            if self.hw.len() >= 1000 && t >= next_report {
                next_report += 6 * HOUR;
                eprintln!(
                    "  {:.2} simulated days, {} steps, {} plans {:?}, {} failovers and {} moves running, {} suspects, wall {:.0} s",
                    t as f64 / DAY as f64,
                    self.fig.steps,
                    self.fig.plans,
                    self.fig.plan_why,
                    self.ctl.failovers.running().len(),
                    self.ctl.moves.len(),
                    self.suspects.len(),
                    t0.elapsed().as_secs_f64()
                );
            }
            if debug && t >= next_dump {
                next_dump += HOUR;
                self.dump();
            }
            assert!(
                t0.elapsed() < wall_limit,
                "the simulation is stuck at t={t}"
            );
        }
    }
}

struct Run {
    seed: u64,
    fig: Figures,
    wall: Duration,
    sim_ms: u64,
}

fn run_seed(seed: u64, nodes: usize, clusters: usize, sim_ms: u64) -> Run {
    let t0 = Instant::now();
    let r = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed, nodes, clusters);
        sim.run(sim_ms, Duration::from_secs(3600));
        // At the end, every cluster's slots are filled by a running node unless it is short of nodes.
        sim.check_min();
        sim.fig
    });
    match r {
        Ok(fig) => Run {
            seed,
            fig,
            wall: t0.elapsed(),
            sim_ms,
        },
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "seed {seed} ({nodes} nodes, {clusters} clusters) failed: {msg}\nreplay: CORRAL_SIM_SEED={seed} CORRAL_SIM_NODES={nodes} CORRAL_SIM_CLUSTERS={clusters} bash bench/sim.sh (300 nodes: cargo test --release --test sim small)"
            );
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(r: &Run, nodes: usize) {
    let f = &r.fig;
    let faults: u64 = f.faults.values().sum();
    println!(
        "seed {}: {nodes} nodes, {:.1} simulated days, {} steps, {} faults {:?}, {} invariant checks, {} plans ({:.1} ms each), {} restarts, {} moves done, {} failovers done, {} alerts, {} slots blocked, {} nodes hung on broken images, wall {:.1} s",
        r.seed,
        r.sim_ms as f64 / DAY as f64,
        f.steps,
        faults,
        f.faults,
        f.checks,
        f.plans,
        f.plan_wall.as_secs_f64() * 1000.0 / f.plans.max(1) as f64,
        f.restarts,
        f.moves_done,
        f.failovers_done,
        f.alerts,
        f.blocked,
        f.hung,
        r.wall.as_secs_f64()
    );
}

/// A set of small farms for a simulated day each, from fixed seeds (CI).
#[test]
fn small_farms_a_day_each() {
    let seeds: Vec<u64> = match std::env::var("CORRAL_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("CORRAL_SIM_SEED")],
        Err(_) => (1..=6).map(|i| 0x5eed_0000 + i).collect(),
    };
    for seed in seeds {
        let r = run_seed(seed, 300, 12, DAY);
        report(&r, 300);
        let f = &r.fig;
        assert!(f.faults.values().sum::<u64>() > 50, "{f:?}");
        assert!(f.failovers_done > 0 && f.moves_done > 0, "{f:?}");
    }
}

/// The scenario: 5,000 nodes, 100 clusters, a simulated week (about 2.5 min). Too slow unoptimised: run with
/// `--release` (tests/run.sh does).
#[test]
#[cfg_attr(debug_assertions, ignore = "run with --release (tests/run.sh does)")]
fn five_thousand_nodes_a_week() {
    let seed = env("CORRAL_SIM_SEED", 0x5eed_5000);
    let days = env("CORRAL_SIM_DAYS", 7);
    let r = run_seed(seed, 5000, 100, days * DAY);
    report(&r, 5000);
    assert!(r.fig.failovers_done > 100, "{:?}", r.fig);
}

/// The long campaign (`bench/sim.sh`): `CORRAL_SIM_SEEDS` seeds × `CORRAL_SIM_DAYS` days.
#[test]
#[ignore]
fn campaign() {
    let seeds = env("CORRAL_SIM_SEEDS", 50);
    let days = env("CORRAL_SIM_DAYS", 30);
    let nodes = env("CORRAL_SIM_NODES", 5000) as usize;
    let clusters = env("CORRAL_SIM_CLUSTERS", 100) as usize;
    let t0 = Instant::now();
    let mut total = Figures::default();
    // CORRAL_SIM_SEED replays one seed of the campaign, at the campaign's sizes.
    let list: Vec<u64> = match std::env::var("CORRAL_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("CORRAL_SIM_SEED")],
        Err(_) => (0..seeds).map(|s| 0xca3b_0000 + s).collect(),
    };
    let seeds = list.len();
    for seed in list {
        let r = run_seed(seed, nodes, clusters, days * DAY);
        report(&r, nodes);
        total.steps += r.fig.steps;
        total.checks += r.fig.checks;
        total.restarts += r.fig.restarts;
        total.failovers_done += r.fig.failovers_done;
        total.moves_done += r.fig.moves_done;
        total.blocked += r.fig.blocked;
        total.hung += r.fig.hung;
        for (k, v) in r.fig.faults {
            *total.faults.entry(k).or_default() += v;
        }
    }
    println!(
        "campaign: {seeds} seeds × {days} days × {nodes} nodes: {} steps, {} faults {:?}, {} invariant checks, {} restarts, {} moves, {} failovers, {} slots blocked, {} nodes hung on broken images, 0 violations, wall {:.1} s",
        total.steps,
        total.faults.values().sum::<u64>(),
        total.faults,
        total.checks,
        total.restarts,
        total.moves_done,
        total.failovers_done,
        total.blocked,
        total.hung,
        t0.elapsed().as_secs_f64()
    );
}
