//! The controller ties the rooms together: it owns the running boot state (config, image catalog, script
//! templates), answers "what does this node boot?" for the HTTP room, and records every node that asks.
//!
//! With a policy (`server.policy`), a node boots the image link of the cluster slot it is assigned to, with
//! that slot's identity; unassigned nodes are parked and discovered into the free pool the first time they
//! ask. The planner runs when a node is discovered, on reload, and every few seconds (schedules move with
//! the clock); its actions are stored with their events in one transaction. Without a policy, a node's image
//! comes from `[boot]` in corral.toml (per-MAC, then the default).
//!
//! Inventory writes are batched: a script request updates an in-memory queue that a background task
//! commits to the store every few hundred milliseconds, so a burst of booting nodes costs one transaction,
//! not one fsync per request. Every store write goes through the store's one writer thread.
//!
//! What the controller changes has one owner, [`Core`], behind one lock (the reason is written there);
//! the request paths read published snapshots ([`FleetView`], the boot state) and never wait for it.
//!
//! Long because the core, its guards and the planner's commit path live here; the core's methods are
//! not yet pure functions returning effects (the simulator still mirrors the shell by hand).

pub mod agents;
pub mod boot_plan;
pub mod disks;
pub mod failover;
pub mod health;
pub mod identity;
pub mod mover;
pub mod moves;
pub mod trust;
pub mod views;
pub mod work;

use crate::events::EventKind;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::boot::{Catalog, Image, Templates};
use crate::config::{Config, Diagnostics};
use crate::domain::{Mac, NodeFacts, SlotRef};
use crate::policy::plan::{self, Action, NodeState};
use crate::policy::{Identity, Policy};
use crate::store::{AssignmentChange, AssignmentRecord, BootsSeen, NewEvent, Store};

/// A node's role: the cluster slot it fills and that slot's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub slot: SlotRef,
    pub identity: Identity,
}

/// What a node boots, decided at the moment it asks.
#[derive(Debug, Clone)]
pub enum BootDecision {
    /// Boot this image (in this role, under a policy).
    Image(Arc<Image>, Option<Role>),
    /// No work for this node: wait and ask again.
    Park,
    /// The node should boot something it cannot (unknown image, missing files, wrong architecture).
    Error(String),
}

/// Everything a reload replaces at once.
pub struct BootState {
    pub config: Config,
    pub catalog: Catalog,
    pub templates: Templates,
    /// The cluster policy, when `server.policy` names one.
    pub policy: Option<Arc<Policy>>,
    /// BMC credentials (`server.credentials`), for the nodes' power drivers.
    pub credentials: crate::power::Credentials,
    node_images: HashMap<Mac, String>,
}

impl BootState {
    /// Loads the image catalog and templates a config names; every problem is reported.
    pub fn load(config: Config) -> Result<BootState, Diagnostics> {
        let catalog = Catalog::load(&config.server.images_dir);
        let templates = Templates::load(&config.server.scripts_dir);
        let mut errors = Vec::new();
        if let Err(e) = &catalog {
            errors.extend(e.0.clone());
        }
        if let Err(e) = &templates {
            errors.extend(e.0.clone());
        }
        let (Ok(catalog), Ok(templates)) = (catalog, templates) else {
            return Err(Diagnostics(errors));
        };
        // Images named in the config must exist; say so with the config's own position.
        let text = config
            .source
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let src = config
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from("corral.toml"));
        let mut errs = Vec::new();
        if let Some(d) = &config.boot.default_image {
            if catalog.get(d).is_none() {
                errs.push((
                    vec!["boot".into(), "default_image".into()],
                    unknown_image(d, &catalog),
                ));
            }
        }
        let mut node_images = HashMap::new();
        for (i, n) in config.boot.node.iter().enumerate() {
            if catalog.get(&n.image).is_none() {
                errs.push((
                    vec!["boot".into(), "node".into(), i.to_string(), "image".into()],
                    unknown_image(&n.image, &catalog),
                ));
            }
            if let Some(mac) = Mac::parse(&n.mac) {
                node_images.insert(mac, n.image.clone());
            }
        }
        if !errs.is_empty() {
            return Err(Diagnostics::from_paths(&text, &src, errs));
        }
        let credentials = match &config.server.credentials {
            Some(p) => crate::power::Credentials::load(p)
                .and_then(|c| c.check_iscsi().map(|()| c))
                .map_err(|e| Diagnostics::single(p, e))?,
            None => crate::power::Credentials::default(),
        };
        let policy = match &config.server.policy {
            None => None,
            Some(path) => {
                let exists = |name: &str, arch: Option<&str>| {
                    catalog.get(name).is_some_and(|i| i.runs_on(arch))
                };
                let policy = Policy::load(path, &exists)?;
                check_disks(&policy, path, &config, &catalog)?;
                check_power(path, &credentials)?;
                Some(Arc::new(policy))
            }
        };
        Ok(BootState {
            config,
            catalog,
            templates,
            policy,
            credentials,
            node_images,
        })
    }

    /// The decision for one node, given what iPXE reported.
    pub fn decide(
        &self,
        mac: Mac,
        facts: &NodeFacts,
        now: u64,
        slot: Option<&SlotRef>,
    ) -> BootDecision {
        let (name, role) = match &self.policy {
            Some(policy) => {
                let Some(slot) = slot else {
                    return BootDecision::Park;
                };
                let Some(c) = policy.cluster(&slot.cluster) else {
                    return BootDecision::Park;
                };
                let (Some(name), Some(identity)) = (
                    c.slot_images.get(slot.slot as usize),
                    c.identities.get(slot.slot as usize),
                ) else {
                    return BootDecision::Park;
                };
                (
                    name,
                    Some(Role {
                        slot: slot.clone(),
                        identity: identity.clone(),
                    }),
                )
            }
            None => match self
                .node_images
                .get(&mac)
                .or(self.config.boot.default_image.as_ref())
            {
                Some(name) => (name, None),
                None => return BootDecision::Park,
            },
        };
        let Some(image) = self.catalog.get(name) else {
            return BootDecision::Error(format!("image {name} is not in the catalog"));
        };
        if !image.runs_on(facts.buildarch.as_deref()) {
            return BootDecision::Error(format!(
                "image {name} is for {} but this node runs {}",
                image.spec.arch,
                facts.buildarch.as_deref().unwrap_or("?")
            ));
        }
        let missing = image.missing_files_at(now);
        if !missing.is_empty() {
            return BootDecision::Error(format!("image {name} is missing {}", missing.join(", ")));
        }
        if image.spec.kind == crate::boot::ImageKind::Sanboot && role.is_none() {
            return BootDecision::Error(format!(
                "image {name} boots a slot's disk over iSCSI: the node needs a slot (a policy)"
            ));
        }
        BootDecision::Image(image.clone(), role)
    }
}

/// Runs a blocking job every `period`, on the blocking pool so the servers' threads never wait on the
/// database; failures are logged and the next tick tries again.
async fn every<F>(period: Duration, what: &'static str, job: F)
where
    F: Fn() -> anyhow::Result<()> + Send + Sync + 'static,
{
    let job = Arc::new(job);
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let j = job.clone();
        on_blocking_pool(what, move || j()).await;
    }
}

/// Runs one blocking job on the blocking pool and logs how it failed, if it did.
async fn on_blocking_pool(
    what: &'static str,
    job: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) {
    match tokio::task::spawn_blocking(job).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "{what} failed"),
        Err(e) => tracing::error!(error = %e, "{what} panicked"),
    }
}

/// Newer reported facts replace older ones; facts a request did not carry keep their value.
fn merge_facts(into: &mut NodeFacts, newer: NodeFacts) {
    let NodeFacts {
        uuid,
        serial,
        manufacturer,
        product,
        buildarch,
        platform,
        memsize,
        ip,
    } = newer;
    into.uuid = uuid.or(into.uuid.take());
    into.serial = serial.or(into.serial.take());
    into.manufacturer = manufacturer.or(into.manufacturer.take());
    into.product = product.or(into.product.take());
    into.buildarch = buildarch.or(into.buildarch.take());
    into.platform = platform.or(into.platform.take());
    into.memsize = memsize.or(into.memsize.take());
    into.ip = ip.or(into.ip.take());
}

/// One line saying what a reload changed in the policy.
fn describe_change(old: Option<&Policy>, new: Option<&Policy>) -> String {
    let summary = |p: Option<&Policy>| -> Vec<String> {
        p.map(|p| {
            p.clusters
                .iter()
                .map(|c| {
                    format!(
                        "{}(prio {}, {}..{}, default {})",
                        c.spec.name, c.spec.priority, c.spec.min, c.spec.max, c.default
                    )
                })
                .collect()
        })
        .unwrap_or_default()
    };
    let (a, b) = (summary(old), summary(new));
    let added: Vec<&String> = b.iter().filter(|x| !a.contains(x)).collect();
    let removed: Vec<&String> = a.iter().filter(|x| !b.contains(x)).collect();
    if added.is_empty() && removed.is_empty() {
        "configuration reloaded; clusters unchanged".into()
    } else {
        let fmt = |v: Vec<&String>| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        format!(
            "configuration reloaded; now: [{}]; before: [{}]",
            fmt(added),
            fmt(removed)
        )
    }
}

fn unknown_image(name: &str, catalog: &Catalog) -> String {
    let names: Vec<&str> = catalog.images.keys().map(|s| s.as_str()).collect();
    match crate::config::diag::nearest(name, &names) {
        Some(n) => format!("image `{name}` is not in the catalog, did you mean `{n}`?"),
        None => format!(
            "image `{name}` is not in the catalog (have: {})",
            names.join(", ")
        ),
    }
}

/// Every `[[node]] power` that names credentials finds them in the credentials file.
fn check_power(
    path: &std::path::Path,
    credentials: &crate::power::Credentials,
) -> Result<(), Diagnostics> {
    use crate::power::PowerSpec;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Already validated: parsed again only for the entries' positions.
    let Ok(file) = toml::from_str::<crate::policy::PolicyFile>(&text) else {
        return Ok(());
    };
    let mut errs = Vec::new();
    for (i, n) in file.nodes.iter().enumerate() {
        let key = match &n.power {
            Some(PowerSpec::Redfish {
                credentials: Some(credentials),
                ..
            })
            | Some(PowerSpec::Ipmi { credentials, .. }) => credentials,
            _ => continue,
        };
        if credentials.get(key).is_none() {
            errs.push((
                vec![
                    "node".to_string(),
                    i.to_string(),
                    "power".to_string(),
                    "credentials".to_string(),
                ],
                format!("no entry `{key}` in the credentials file (server.credentials)"),
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(Diagnostics::from_paths(&text, path, errs))
    }
}

/// Every cluster's `disk` names a base image in the disks directory; errors point into the policy file.
fn check_disks(
    policy: &Policy,
    path: &std::path::Path,
    config: &Config,
    catalog: &crate::boot::Catalog,
) -> Result<(), Diagnostics> {
    let disks_dir = &config.server.disks_dir;
    let mut errs = Vec::new();
    for (i, c) in policy.clusters.iter().enumerate() {
        // A sanboot image boots the slot's disk over iSCSI: its cluster needs a disk and corral the target.
        let sanboot = c.slot_images.iter().find(|name| {
            catalog
                .get(name)
                .is_some_and(|im| im.spec.kind == crate::boot::ImageKind::Sanboot)
        });
        if let Some(name) = sanboot {
            let at = vec!["cluster".to_string(), i.to_string(), "images".to_string()];
            if c.spec.disk.is_none() {
                errs.push((
                    at,
                    format!(
                        "image `{name}` is a sanboot image: the cluster needs a `disk` to boot"
                    ),
                ));
            } else if !config.iscsi.enabled {
                errs.push((
                    at,
                    format!("image `{name}` is a sanboot image: [iscsi] must be enabled"),
                ));
            }
        }
        let Some(disk) = &c.spec.disk else { continue };
        let at = vec!["cluster".to_string(), i.to_string(), "disk".to_string()];
        if !crate::disk::slots::safe_name(disk) {
            errs.push((
                at,
                format!("disk `{disk}` must be a file name (letters, digits, -, _, .)"),
            ));
            continue;
        }
        let file = disks_dir.join(format!("{disk}.img"));
        if !file.is_file() {
            errs.push((
                at,
                format!("base disk `{disk}` not found: no {}", file.display()),
            ));
        }
    }
    if errs.is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    Err(Diagnostics::from_paths(&text, path, errs))
}

/// Everything the controller changes, owned in one place behind one lock ([`Controller::core`]).
///
/// Why one lock (as mini-redis keeps its whole database behind one `Mutex`): every change here is a few
/// map operations in memory (no I/O is ever done under it: store writes go to the store's writer, power
/// calls and orders to their tasks, after the lock is let go), so a single lock is never held long, and
/// one owner means no lock order to get wrong: a path that needs the fleet and the monitors together
/// takes both at once. The request paths do not take it at all for reading: DHCP, scripts, the NBD and
/// iSCSI rooms and the API read the published [`FleetView`] and boot state, which never wait. Taking the
/// core twice on one thread is a bug that would deadlock; it panics instead, naming the place.
pub(crate) struct Core {
    /// What the planner works on: known nodes and assignments (mirrors the store). Changed only through
    /// [`FleetGuard`] / [`CoreGuard::fleet_mut`], which publish the outcome to the view.
    fleet: Fleet,
    /// Monitors, running failovers, quarantined nodes.
    health: health::Health,
    /// DHCP sightings, discovery rates, generated slot secrets: who each node is.
    identity: identity::Identity,
    /// Boot tokens, heartbeats and orders of the nodes' agents.
    agents: agents::Agents,
    /// Scale-rule samples and what the rules decided.
    scale: crate::policy::scale::ScaleState,
    /// Running moves, by node: where their inputs go.
    moves: HashMap<Mac, tokio::sync::mpsc::UnboundedSender<moves::Input>>,
    /// Requests since the last commit, merged per node: a node asking a thousand times costs one row.
    seen: HashMap<Mac, BootsSeen>,
    /// Boot-token rows to write (newest per node), committed by the writer with `seen`.
    tokens_due: BTreeMap<Mac, String>,
}

thread_local! {
    /// Whether this thread holds the core: a second `core()` on it would deadlock.
    static CORE_HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The core, held. Changes to the fleet (through [`CoreGuard::fleet_mut`]) publish a new [`FleetView`]
/// when the guard is let go, still under the lock, so views are published in the order of the changes.
pub(crate) struct CoreGuard<'a> {
    core: std::sync::MutexGuard<'a, Core>,
    view: &'a ArcSwap<FleetView>,
    fleet_changed: bool,
}

impl CoreGuard<'_> {
    fn fleet_mut(&mut self) -> &mut Fleet {
        self.fleet_changed = true;
        &mut self.core.fleet
    }
}

impl std::ops::Deref for CoreGuard<'_> {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    /// Everything but the fleet (which goes through [`CoreGuard::fleet_mut`], so that it is published).
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        if self.fleet_changed {
            self.view.store(Arc::new(FleetView {
                state: self.core.fleet.state.clone(),
                holds: self.core.fleet.holds.clone(),
            }));
        }
        CORE_HELD.with(|h| h.set(false));
    }
}

/// One part of the core, held (the whole core is locked): what `health()`, `identity()` and the like
/// hand out, so a path that needs one part reads as before.
pub(crate) struct Part<'a, T> {
    core: CoreGuard<'a>,
    get: fn(&Core) -> &T,
    get_mut: fn(&mut Core) -> &mut T,
}

impl<T> std::ops::Deref for Part<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        (self.get)(&self.core.core)
    }
}

impl<T> std::ops::DerefMut for Part<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        (self.get_mut)(&mut self.core.core)
    }
}

/// The running controller, shared by the servers.
pub struct Controller {
    /// The boot state; a reload swaps it whole, and readers never wait for that.
    state: ArcSwap<BootState>,
    store: Store,
    /// Wakes the writer ([`Controller::run_flusher`]) for work that should reach the disk soon.
    writer_wake: tokio::sync::Notify,
    /// The one owner of what the controller changes (see [`Core`]).
    core: Mutex<Core>,
    /// The fleet as of its last change, for the request paths (DHCP, scripts, heartbeats, the API): they
    /// read it without a lock, so they never wait for a writer of the fleet.
    view: ArcSwap<FleetView>,
    /// Base images and slot overlays (the directories are fixed at start).
    disks: crate::disk::DiskSet,
    /// Wakes the mover when the planner decides a move.
    mover_wake: tokio::sync::Notify,
    trust_stats: identity::TrustStats,
    /// One planner at a time, and the in-flight work it last saved ([`work`]). Taken before the core,
    /// never while holding it; held while a plan is worked out and committed (only planners and the
    /// saver of in-flight work wait for it, never a request path).
    work_io: Mutex<work::SavedWork>,
    /// Wakes the saver of in-flight work.
    work_dirty: tokio::sync::Notify,
}

#[derive(Default, Clone)]
struct Fleet {
    state: plan::State,
    /// Alerts raised by the last plan, so each is recorded once when it starts.
    alerts: BTreeSet<String>,
    /// Nodes whose assignment changed while they may be running the old role, with the moment it was
    /// decided: the mover restarts them (a parked node picks its new script up at its next poll).
    reboot: BTreeMap<Mac, std::time::Instant>,
    /// The slot a node being moved still holds until it is fenced (powered off): it keeps that slot's
    /// disk, and nobody else may open it meanwhile.
    holds: BTreeMap<Mac, SlotRef>,
    /// Nodes waiting for a restart that corral cannot do (no power control, no agent).
    manual: BTreeSet<Mac>,
    /// The last step each running move reached (an event kind), kept with the pending restart.
    steps: BTreeMap<Mac, String>,
    /// Nodes discovered so far (a counter): a plan made from a copy with `arrivals = n` has seen the
    /// first n, so a discovery it covers need not plan again.
    arrivals: u64,
    /// Nodes that did not come up in the slots they were moved into; blocked slots are mirrored in
    /// `state.blocked` for the planner.
    boot_failures: failover::BootFailures,
}

/// What readers see of the fleet: a copy published by each change. Copies are cheap (the planner's maps
/// are persistent and share their trees; holds are few), so every change publishes one.
#[derive(Default)]
pub(crate) struct FleetView {
    pub state: plan::State,
    /// Nodes still holding a slot's disk they are leaving (see [`Fleet::holds`]).
    pub holds: BTreeMap<Mac, SlotRef>,
}

/// The fleet part of the core, held: a change publishes the new [`FleetView`] when it is let go.
struct FleetGuard<'a> {
    core: CoreGuard<'a>,
}

impl std::ops::Deref for FleetGuard<'_> {
    type Target = Fleet;
    fn deref(&self) -> &Fleet {
        &self.core.core.fleet
    }
}

impl std::ops::DerefMut for FleetGuard<'_> {
    fn deref_mut(&mut self) -> &mut Fleet {
        self.core.fleet_mut()
    }
}

/// Carries a plan's `actions` out on `fleet`, in place: new assignments; a healthy node that leaves a role
/// it was serving must restart, and keeps its old slot's disk (a hold) until it is off. Says whether any
/// node moves.
fn carry_out(fleet: &mut Fleet, actions: &[Action], now: u64, decided: std::time::Instant) -> bool {
    let mut moves = false;
    for a in actions {
        match a {
            // A node that was serving another role is running it still: it must restart, and it keeps
            // its old slot's disk until it is off. A failed node was cut off by the move that failed;
            // nothing more to do for it here.
            Action::Release { node, from } | Action::Preempt { node, from, .. }
                if fleet.state.assignments.contains_key(node)
                    && fleet.state.nodes.get(node).is_some_and(|n| n.healthy) =>
            {
                fleet.reboot.insert(*node, decided);
                fleet.manual.remove(node);
                // A node decided again before it was switched off still runs the role of its first
                // hold: that disk stays its own.
                fleet.holds.entry(*node).or_insert_with(|| from.clone());
                moves = true;
            }
            _ => {}
        }
    }
    plan::apply_to(&mut fleet.state, actions, now);
    moves
}

/// The event of a blocked slot that may be filled again, and why.
fn slot_unblocked(at: u64, slot: &SlotRef, why: &str) -> NewEvent {
    NewEvent {
        at,
        kind: EventKind::SlotUnblocked,
        cluster: Some(slot.cluster.clone()),
        node: None,
        message: format!("{}/{} may be filled again: {why}", slot.cluster, slot.slot),
        secs: None,
    }
}

/// What the planner knows of a node: iPXE's facts, overridden by the policy's `[[node]]` entry.
fn node_state(mac: Mac, facts: &NodeFacts, policy: Option<&Policy>) -> NodeState {
    let mut n = NodeState::new(mac);
    n.arch = facts.buildarch.clone();
    n.memory = facts.memsize;
    if let Some(spec) = policy.and_then(|p| p.nodes.get(&mac)) {
        n.tags = spec.tags.iter().cloned().collect();
        n.cpus = spec.facts.cpus.or(n.cpus);
        n.memory = spec.facts.memory.or(n.memory);
        n.arch = spec.facts.arch.clone().or(n.arch);
    }
    n
}

impl Controller {
    /// Builds the controller from the boot state and what the store remembers (inventory, assignments).
    pub fn new(state: BootState, store: Store) -> anyhow::Result<Arc<Controller>> {
        let mut fleet = Fleet::default();
        let policy = state.policy.clone();
        for rec in store.nodes()? {
            fleet
                .state
                .nodes
                .insert(rec.mac, node_state(rec.mac, &rec.facts, policy.as_deref()));
        }
        if let Some(p) = &policy {
            // Known nodes are in the pool before they ever boot.
            for mac in p.nodes.keys() {
                fleet
                    .state
                    .nodes
                    .entry(*mac)
                    .or_insert_with(|| node_state(*mac, &NodeFacts::default(), Some(p)));
            }
        }
        for a in store.assignments()? {
            fleet
                .state
                .nodes
                .entry(a.mac)
                .or_insert_with(|| NodeState::new(a.mac));
            if let Some(n) = fleet.state.nodes.get_mut(&a.mac) {
                n.last_moved = Some(a.since);
            }
            fleet.state.assignments.insert(
                a.mac,
                SlotRef {
                    cluster: a.cluster,
                    slot: a.slot,
                },
            );
        }
        let state_rate = state.config.discovery.rate_per_peer;
        let disks = crate::disk::DiskSet::new(
            &state.config.server.disks_dir,
            &state.config.server.state_dir,
        );
        let view = FleetView {
            state: fleet.state.clone(),
            holds: fleet.holds.clone(),
        };
        let c = Arc::new(Controller {
            state: ArcSwap::from_pointee(state),
            store,
            writer_wake: tokio::sync::Notify::new(),
            core: Mutex::new(Core {
                fleet,
                health: Default::default(),
                identity: identity::Identity::new(state_rate),
                agents: Default::default(),
                scale: Default::default(),
                moves: HashMap::new(),
                seen: HashMap::new(),
                tokens_due: BTreeMap::new(),
            }),
            view: ArcSwap::from_pointee(view),
            disks,
            mover_wake: tokio::sync::Notify::new(),
            trust_stats: Default::default(),
            work_io: Mutex::new(Default::default()),
            work_dirty: tokio::sync::Notify::new(),
        });
        c.restore_leases();
        c.load_agent_tokens();
        c.load_node_flags();
        c.restore_work();
        c.resume_watches(agents::unix_ms());
        c.prepare_disks(crate::unix_now());
        c.prepare_slot_secrets(crate::unix_now());
        c.replan(crate::unix_now())?;
        Ok(c)
    }

    /// The current boot state (a cheap snapshot; a reload swaps it whole).
    pub fn state(&self) -> Arc<BootState> {
        self.state.load_full()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The core, locked (see [`Core`]: never held across I/O, never taken twice on a thread).
    #[track_caller]
    pub(crate) fn core(&self) -> CoreGuard<'_> {
        if CORE_HELD.with(|h| h.replace(true)) {
            panic!(
                "controller core taken twice on one thread (this would deadlock): {}",
                std::panic::Location::caller()
            );
        }
        CoreGuard {
            core: self.core.lock().unwrap_or_else(|p| p.into_inner()),
            view: &self.view,
            fleet_changed: false,
        }
    }

    /// One part of the core, locked.
    #[track_caller]
    pub(crate) fn part<T>(
        &self,
        get: fn(&Core) -> &T,
        get_mut: fn(&mut Core) -> &mut T,
    ) -> Part<'_, T> {
        Part {
            core: self.core(),
            get,
            get_mut,
        }
    }

    #[track_caller]
    fn fleet(&self) -> FleetGuard<'_> {
        FleetGuard { core: self.core() }
    }

    /// The fleet as of its last change, without waiting for anyone.
    pub(crate) fn view(&self) -> Arc<FleetView> {
        self.view.load_full()
    }

    /// The slot a node fills, if any.
    pub fn slot_of(&self, mac: Mac) -> Option<SlotRef> {
        self.view.load().state.assignments.get(&mac).cloned()
    }

    /// The address of the slot a node fills, when its cluster's identities name addresses.
    pub fn slot_address(&self, mac: Mac) -> Option<std::net::Ipv4Addr> {
        let slot = self.slot_of(mac)?;
        let state = self.state();
        state
            .policy
            .as_ref()?
            .cluster(&slot.cluster)?
            .identities
            .get(slot.slot as usize)?
            .address
    }

    /// Nodes waiting for a reboot into a new role.
    pub fn reboot_pending(&self) -> Vec<Mac> {
        self.fleet().reboot.keys().copied().collect()
    }

    /// The planner's view: nodes and assignments (as last published; a copy costs next to nothing).
    pub fn fleet_state(&self) -> plan::State {
        self.view.load().state.clone()
    }

    /// Replaces the boot state, e.g. after SIGHUP or a file change. On error the running state stays and
    /// the error is recorded as an event.
    pub fn reload(&self, config: Config) -> Result<(), Diagnostics> {
        let now = crate::unix_now();
        let next = match BootState::load(config) {
            Ok(n) => n,
            Err(d) => {
                let _ = self.store.apply(
                    &[],
                    &[NewEvent::new(now, EventKind::ReloadRejected, d.to_string())],
                );
                return Err(d);
            }
        };
        let summary = describe_change(self.state().policy.as_deref(), next.policy.as_deref());
        let mut unblocked = Vec::new();
        {
            let mut fleet = self.fleet();
            let policy = next.policy.clone();
            let macs: Vec<Mac> = fleet.state.nodes.keys().copied().collect();
            for mac in &macs {
                let Some(n) = fleet.state.nodes.get_mut(mac) else {
                    continue;
                };
                let facts = NodeFacts {
                    buildarch: n.arch.clone(),
                    memsize: n.memory,
                    ..Default::default()
                };
                let fresh = node_state(*mac, &facts, policy.as_deref());
                n.tags = fresh.tags;
                n.cpus = fresh.cpus.or(n.cpus);
            }
            // The policy (and with it, maybe, the image that would not boot) changed: blocked slots may
            // be tried again.
            for slot in fleet.boot_failures.clear() {
                fleet.state.blocked.remove(&slot);
                unblocked.push(slot);
            }
        }
        if !unblocked.is_empty() {
            let events: Vec<NewEvent> = unblocked
                .iter()
                .map(|s| slot_unblocked(now, s, "the policy was reloaded"))
                .collect();
            let _ = self.store.apply(&[], &events);
        }
        self.state.store(Arc::new(next));
        let _ = self
            .store
            .apply(&[], &[NewEvent::new(now, EventKind::Reload, summary)]);
        self.prepare_disks(now);
        self.prepare_slot_secrets(now);
        if let Err(e) = self.replan(now) {
            tracing::error!(error = %e, "planning after reload failed");
        }
        Ok(())
    }

    /// Runs the planner and carries out its decisions: assignments stored (with their events) before
    /// anyone is told, nodes that must restart marked, alerts recorded once when they start.
    pub fn replan(&self, now: u64) -> anyhow::Result<Vec<Action>> {
        self.replan_covering(now, None)
    }

    /// [`Controller::replan`] for a discovery, the `arrival`-th: a plan that finished after the node was
    /// put in the pool has already planned it, so a burst of new nodes costs one plan per planner turn
    /// rather than one each (each new node's first request still waits for a plan that includes it).
    fn replan_covering(&self, now: u64, arrival: Option<u64>) -> anyhow::Result<Vec<Action>> {
        let Some(policy) = self.state().policy.clone() else {
            return Ok(Vec::new());
        };
        // One planner at a time: `work_io` (first in the lock order) is held for the whole plan. Only the
        // planner changes assignments, so a plan worked out from a copy of the fleet is still right for
        // the fleet it is applied to; what others change meanwhile (health flags, a node booting, a new
        // node) is kept, and the next plan sees it. The fleet lock itself is held only to copy the fleet
        // and to apply the outcome: the plan and its commit run without it, so the script, DHCP and
        // heartbeat paths never wait for the planner or for SQLite.
        let mut saved = self.work_io();
        if arrival.is_some_and(|a| saved.planned_arrivals >= a) {
            return Ok(Vec::new());
        }
        let mut events: Vec<NewEvent> = Vec::new();
        let targets = {
            let base = |c: &crate::policy::Cluster| plan::base_count(c, now, &policy.zone);
            let mut scale = self.part(|c| &c.scale, |c| &mut c.scale);
            for f in scale.evaluate(&policy, &base, now) {
                let verb = if f.delta > 0 { "adds" } else { "removes" };
                let msg = format!(
                    "scale rule on {} {verb} {} node(s): desired now {}",
                    f.metric,
                    f.delta.abs(),
                    f.target
                );
                events.push(NewEvent {
                    at: now,
                    kind: EventKind::Scale,
                    cluster: Some(f.cluster.clone()),
                    node: None,
                    message: msg,
                    secs: None,
                });
            }
            scale.targets(&policy, &base)
        };
        let copy = {
            let mut fleet = self.fleet();
            fleet.state.scale_targets = targets;
            for slot in fleet.boot_failures.expire(now * 1000) {
                fleet.state.blocked.remove(&slot);
                let why = format!(
                    "its block of {} min ran out",
                    failover::SLOT_BLOCK_MS / 60_000
                );
                events.push(slot_unblocked(now, &slot, &why));
            }
            fleet.clone()
        };
        let arrivals = copy.arrivals;
        let actions = plan::plan(&policy, &copy.state, now);
        let mut changes = Vec::new();
        let ev = |kind, cluster: &str, node: Option<&Mac>, message| NewEvent {
            at: now,
            kind,
            cluster: Some(cluster.to_string()),
            node: node.map(|n| n.to_string()),
            message,
            secs: None,
        };
        let mut alerts = BTreeSet::new();
        for a in &actions {
            match a {
                Action::Assign { node, to, image } => {
                    changes.push(AssignmentChange::Set(AssignmentRecord {
                        mac: *node,
                        cluster: to.cluster.clone(),
                        slot: to.slot,
                        since: now,
                    }));
                    events.push(ev(
                        EventKind::Assign,
                        &to.cluster,
                        Some(node),
                        format!("{node} fills {}/{} with image {image}", to.cluster, to.slot),
                    ));
                }
                Action::Release { node, from } => {
                    changes.push(AssignmentChange::Remove(*node));
                    events.push(ev(
                        EventKind::Release,
                        &from.cluster,
                        Some(node),
                        format!("{node} leaves {}/{}", from.cluster, from.slot),
                    ));
                }
                Action::Preempt {
                    node,
                    from,
                    to,
                    image,
                } => {
                    changes.push(AssignmentChange::Set(AssignmentRecord {
                        mac: *node,
                        cluster: to.cluster.clone(),
                        slot: to.slot,
                        since: now,
                    }));
                    events.push(ev(
                        EventKind::Preempt,
                        &to.cluster,
                        Some(node),
                        format!(
                            "{node} moves from {}/{} to {}/{} with image {image}",
                            from.cluster, from.slot, to.cluster, to.slot
                        ),
                    ));
                }
                Action::Alert { cluster, alert } => {
                    let text = match alert {
                        plan::Alert::Short { desired, current } => {
                            format!("cluster {cluster} is short: {current} of {desired} nodes")
                        }
                        plan::Alert::BelowMin { min, current } => format!(
                            "cluster {cluster} is below its minimum: {current} of {min} nodes"
                        ),
                    };
                    if !copy.alerts.contains(&text) {
                        tracing::warn!("{text}");
                        events.push(ev(EventKind::Alert, cluster, None, text.clone()));
                    }
                    alerts.insert(text);
                }
            }
        }
        // The plan's outcome is worked out first and stored before anything in memory changes: a node that
        // leaves a slot holds its disk from the very commit that takes the slot away.
        let decided = std::time::Instant::now();
        let mut next = copy;
        carry_out(&mut next, &actions, now, decided);
        let work = work::node_work(&next, agents::unix_ms());
        let work_changed = Self::work_differs(&saved, &work);
        if !changes.is_empty() || !events.is_empty() || work_changed {
            self.store
                .apply_plan(&changes, &events, work_changed.then_some(work.as_slice()))?;
            if work_changed {
                Self::planner_saved(&mut saved, work);
            }
        }
        for e in &events {
            if e.kind != EventKind::Alert {
                tracing::info!(kind = e.kind.as_str(), "{}", e.message);
            } else {
                self.send_webhook(None, e.cluster.as_deref(), &e.message);
            }
        }
        // Applied to the fleet as it is now, so what changed while the plan ran stays.
        let (moves, resave) = {
            let mut fleet = self.fleet();
            let moves = carry_out(&mut fleet, &actions, now, decided);
            fleet.alerts = alerts;
            let resave = Self::work_differs(&saved, &work::node_work(&fleet, agents::unix_ms()));
            (moves, resave)
        };
        saved.planned_arrivals = arrivals;
        drop(saved);
        if resave {
            // Something changed while the plan ran (a node booted, one failed): the saver writes it.
            self.work_changed();
        }
        if moves {
            self.mover_wake.notify_one();
        }
        Ok(actions)
    }

    /// Records one sample of a cluster metric for its scale rules; planning picks it up.
    pub fn record_metric(
        &self,
        cluster: &str,
        metric: &str,
        value: f64,
        now: u64,
    ) -> Result<(), String> {
        let state = self.state();
        let Some(policy) = &state.policy else {
            return Err("no policy is loaded".into());
        };
        if policy.cluster(cluster).is_none() {
            return Err(format!("no cluster named `{cluster}`"));
        }
        if !value.is_finite() {
            return Err("value must be a finite number".into());
        }
        self.part(|c| &c.scale, |c| &mut c.scale)
            .observe(policy, cluster, metric, value, now);
        Ok(())
    }

    /// Plans every `period` (schedule windows follow the clock) until the task is dropped.
    pub async fn run_planner(self: Arc<Self>, period: Duration) {
        every(period, "planning", move || {
            self.replan(crate::unix_now()).map(|_| ())
        })
        .await
    }

    /// Records that a node asked for its script (committed by [`Controller::flush`]).
    pub fn node_seen(&self, mac: Mac, facts: NodeFacts, now: u64) {
        let policy = self.state().policy.clone();
        // One turn of the core for the usual request (a known node asking again): the sighting queued
        // for the writer, a pending restart ended, and whether it may be a failed node back.
        let mut core = self.core();
        match core.seen.get_mut(&mac) {
            Some(b) => {
                b.last = now;
                b.count += 1;
                merge_facts(&mut b.facts, facts.clone());
            }
            None => {
                core.seen.insert(
                    mac,
                    BootsSeen {
                        mac,
                        facts: facts.clone(),
                        first: now,
                        last: now,
                        count: 1,
                    },
                );
            }
        }
        let Some(policy) = policy else {
            return;
        };
        let fleet = &core.fleet;
        let known = fleet
            .state
            .nodes
            .get(&mac)
            .is_some_and(|n| n.arch.is_some() || facts.buildarch.is_none());
        // A node that boots on its own (not in a move) has done its restart and left its old role.
        // Looked at before anything is written: most requests end nothing, and a write publishes.
        let pending = fleet.reboot.contains_key(&mac)
            || fleet.manual.contains(&mac)
            || fleet.steps.contains_key(&mac)
            || fleet.holds.contains_key(&mac);
        if pending && !core.moves.contains_key(&mac) {
            let fleet = core.fleet_mut();
            let mut ended = fleet.reboot.remove(&mac).is_some();
            ended |= fleet.manual.remove(&mac);
            fleet.steps.remove(&mac);
            // A failed node keeps its hold until it is fenced; any other restart ends it.
            if fleet.state.nodes.get(&mac).is_none_or(|n| n.healthy) {
                ended |= fleet.holds.remove(&mac).is_some();
            }
            if ended {
                self.work_changed();
            }
        }
        if !known {
            // Discovered (or first facts for a listed node): into the pool, and plan at once so its first
            // request already gets its role.
            let fleet = core.fleet_mut();
            let prior = fleet.state.nodes.get(&mac).cloned();
            let mut n = node_state(mac, &facts, Some(&policy));
            if let Some(p) = prior {
                n.last_moved = p.last_moved;
                n.busy = p.busy;
            }
            fleet.state.nodes.insert(mac, n);
            fleet.arrivals += 1;
            let arrival = fleet.arrivals;
            drop(core);
            if let Err(e) = self.replan_covering(now, Some(arrival)) {
                tracing::error!(error = %e, "planning after discovery failed");
            }
            return;
        }
        // A failed node in no slot, move or hold, booting again: `maybe_back` (which writes) decides.
        let fleet = &core.fleet;
        let maybe_back = fleet.state.nodes.get(&mac).is_some_and(|n| !n.healthy)
            && !fleet.state.assignments.contains_key(&mac)
            && !fleet.holds.contains_key(&mac)
            && !core.moves.contains_key(&mac)
            && !core.health.quarantined.contains(&mac);
        drop(core);
        if maybe_back {
            self.maybe_back(mac);
        }
    }

    /// Commits what the request paths queued (inventory sightings, boot tokens) in one transaction.
    pub fn flush(&self) -> anyhow::Result<()> {
        let (batch, tokens): (Vec<BootsSeen>, Vec<(Mac, String)>) = {
            let mut core = self.core();
            (
                std::mem::take(&mut core.seen).into_values().collect(),
                std::mem::take(&mut core.tokens_due).into_iter().collect(),
            )
        };
        if !batch.is_empty() || !tokens.is_empty() {
            if let Err(e) = self.store.record_boots_and_tokens(&batch, &tokens) {
                // Put back what is not newer in the queue, so the next commit tries again.
                let mut due = self.part(|c| &c.tokens_due, |c| &mut c.tokens_due);
                for (mac, doc) in tokens {
                    due.entry(mac).or_insert(doc);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// The writer of what the request paths queue: commits every `period`, and at once when woken (a new
    /// boot token), so one transaction carries whatever arrived meanwhile. Runs until dropped.
    pub async fn run_flusher(self: Arc<Self>, period: Duration) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.writer_wake.notified() => {}
            }
            let c = self.clone();
            on_blocking_pool("recording node inventory", move || c.flush()).await;
        }
    }
}
