//! The controller ties the rooms together: it owns the running boot state (config, image catalog, script
//! templates), answers "what does this node boot?" for the HTTP room, and records every node that asks.
//!
//! Until the policy engine lands, a node's image comes from `[boot]` in corral.toml (per-MAC, then the
//! default); a node with neither is parked. Inventory writes are batched: a script request updates an
//! in-memory queue that a background task commits to the store every few hundred milliseconds, so a burst of
//! booting nodes costs one transaction, not one fsync per request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::boot::{Catalog, Image, Templates};
use crate::config::{Config, Diagnostics};
use crate::mac::Mac;
use crate::store::{BootsSeen, NodeFacts, Store};

/// What a node boots, decided at the moment it asks.
#[derive(Debug, Clone)]
pub enum BootDecision {
    /// Boot this image.
    Image(Arc<Image>),
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
        Ok(BootState {
            config,
            catalog,
            templates,
            node_images,
        })
    }

    /// The decision for one node, given what iPXE reported.
    pub fn decide(&self, mac: Mac, facts: &NodeFacts, now: u64) -> BootDecision {
        let name = self
            .node_images
            .get(&mac)
            .or(self.config.boot.default_image.as_ref());
        let Some(name) = name else {
            return BootDecision::Park;
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
        BootDecision::Image(image.clone())
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

/// The running controller, shared by the servers.
pub struct Controller {
    state: RwLock<Arc<BootState>>,
    store: Store,
    /// Requests since the last commit, merged per node: a node asking a thousand times costs one row.
    seen: Mutex<HashMap<Mac, BootsSeen>>,
}

impl Controller {
    pub fn new(state: BootState, store: Store) -> Arc<Controller> {
        Arc::new(Controller {
            state: RwLock::new(Arc::new(state)),
            store,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// The current boot state (a cheap snapshot; a reload swaps it whole).
    pub fn state(&self) -> Arc<BootState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Replaces the boot state, e.g. after SIGHUP. On error the running state stays.
    pub fn reload(&self, config: Config) -> Result<(), Diagnostics> {
        let next = BootState::load(config)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// Records that a node asked for its script (committed by [`Controller::flush`]).
    pub fn node_seen(&self, mac: Mac, facts: NodeFacts, now: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&mac) {
            Some(b) => {
                b.last = now;
                b.count += 1;
                merge_facts(&mut b.facts, facts);
            }
            None => {
                seen.insert(
                    mac,
                    BootsSeen {
                        mac,
                        facts,
                        first: now,
                        last: now,
                        count: 1,
                    },
                );
            }
        }
    }

    /// Commits queued inventory updates in one transaction.
    pub fn flush(&self) -> anyhow::Result<()> {
        let batch: Vec<BootsSeen> =
            std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        if !batch.is_empty() {
            self.store.record_boots(&batch)?;
        }
        Ok(())
    }

    /// Flushes the inventory queue every `period` until the task is dropped.
    pub async fn run_flusher(self: Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.flush()).await {
                Ok(Err(e)) => tracing::error!(error = %e, "cannot record node inventory"),
                Err(e) => tracing::error!(error = %e, "inventory flush task failed"),
                Ok(Ok(())) => {}
            }
        }
    }
}
