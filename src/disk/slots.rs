//! Where every disk lives and which one an export name means: bases in the disks directory, one overlay
//! per cluster slot under the state directory, created for every slot up to `max` when a policy loads.
//!
//! Open disks are shared: all connections to one slot use one [`Overlay`] (one bitmap, one lock on its
//! files), and the overlay closes when its last connection does.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use super::{Base, Overlay};
use crate::policy::Policy;

/// A slot's overlay as the files say (for `corral disk ls`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotDisk {
    pub cluster: String,
    pub slot: u32,
    pub base: String,
    pub size: u64,
    /// Bytes the slot has written (as of its last flush), in whole grains.
    pub written: u64,
    pub path: PathBuf,
}

pub struct DiskSet {
    disks_dir: PathBuf,
    overlays_dir: PathBuf,
    bases: Mutex<HashMap<String, Weak<Base>>>,
    overlays: Mutex<HashMap<(String, u32), Weak<Overlay>>>,
}

/// Names that are safe as one path component: letters, digits, `-`, `_`, `.` (not leading).
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl DiskSet {
    pub fn new(disks_dir: &Path, state_dir: &Path) -> DiskSet {
        DiskSet {
            disks_dir: disks_dir.to_path_buf(),
            overlays_dir: state_dir.join("overlays"),
            bases: Mutex::default(),
            overlays: Mutex::default(),
        }
    }

    pub fn base_path(&self, name: &str) -> Option<PathBuf> {
        safe_name(name).then(|| self.disks_dir.join(format!("{name}.img")))
    }

    pub fn overlay_stem(&self, cluster: &str, slot: u32) -> Option<PathBuf> {
        safe_name(cluster).then(|| self.overlays_dir.join(cluster).join(slot.to_string()))
    }

    /// The base named `name`, shared while anyone has it open.
    pub fn base(&self, name: &str) -> io::Result<Arc<Base>> {
        let mut bases = self.bases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = bases.get(name).and_then(Weak::upgrade) {
            return Ok(b);
        }
        let path = self
            .base_path(name)
            .ok_or_else(|| io::Error::other(format!("`{name}` is not a valid disk name")))?;
        let b = Arc::new(Base::open(name, &path)?);
        bases.insert(name.to_string(), Arc::downgrade(&b));
        Ok(b)
    }

    /// The overlay of `cluster`'s slot over `base`, created if missing, shared while anyone has it open.
    pub fn slot(&self, cluster: &str, slot: u32, base: &str) -> io::Result<Arc<Overlay>> {
        let key = (cluster.to_string(), slot);
        let mut overlays = self.overlays.lock().unwrap_or_else(|p| p.into_inner());
        let closing = match overlays.get(&key) {
            Some(w) => match w.upgrade() {
                Some(o) if o.base().name == base => return Ok(o),
                Some(_) => false,
                // The last user let go and its close (a flush, then unlocking) may still be running on
                // its thread: the lock it holds is about to be released.
                None => true,
            },
            None => false,
        };
        let stem = self
            .overlay_stem(cluster, slot)
            .ok_or_else(|| io::Error::other(format!("`{cluster}` is not a valid cluster name")))?;
        let b = self.base(base)?;
        Overlay::create(&stem, &b)?;
        let mut tries = if closing { 250 } else { 0 };
        let o = loop {
            match Overlay::open(&stem, b.clone()) {
                Ok(o) => break Arc::new(o),
                Err(e) if tries > 0 && e.to_string().contains("in use") => {
                    tries -= 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        overlays.insert(key, Arc::downgrade(&o));
        Ok(o)
    }

    /// Creates the overlay of every slot (up to `max`) of every cluster that names a disk. Returns how many
    /// were created, and the problems (a missing base is also a policy error, reported at load).
    pub fn prepare(&self, policy: &Policy) -> (usize, Vec<String>) {
        let mut created = 0;
        let mut problems = Vec::new();
        for c in &policy.clusters {
            let Some(disk) = &c.spec.disk else { continue };
            let base = match self.base(disk) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(format!("cluster {}: base disk `{disk}`: {e}", c.spec.name));
                    continue;
                }
            };
            for slot in 0..c.spec.max {
                let Some(stem) = self.overlay_stem(&c.spec.name, slot) else {
                    continue;
                };
                match Overlay::create(&stem, &base) {
                    Ok(true) => created += 1,
                    Ok(false) => {}
                    Err(e) => problems.push(format!("{}/{slot}: {e}", c.spec.name)),
                }
            }
        }
        (created, problems)
    }

    /// Every overlay on disk, from its files.
    pub fn list(&self) -> io::Result<Vec<SlotDisk>> {
        let mut out = Vec::new();
        let Ok(clusters) = std::fs::read_dir(&self.overlays_dir) else {
            return Ok(out);
        };
        for c in clusters.flatten() {
            let cluster = c.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(c.path())?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Some(slot) = name
                    .strip_suffix(".map")
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let stem = c.path().join(slot.to_string());
                match Overlay::inspect(&stem) {
                    Ok((h, grains)) => out.push(SlotDisk {
                        cluster: cluster.clone(),
                        slot,
                        base: h.base_name,
                        size: h.size,
                        written: grains * super::overlay::GRAIN,
                        path: stem,
                    }),
                    Err(e) => {
                        tracing::warn!(path = %stem.display(), error = %e, "unreadable overlay")
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.cluster, a.slot).cmp(&(&b.cluster, b.slot)));
        Ok(out)
    }

    pub fn disks_dir(&self) -> &Path {
        &self.disks_dir
    }
}
