//! Files under a root, shared by the TFTP and HTTP rooms: rooted, traversal-safe access ([`confine`]) and
//! an in-memory cache of whole boot files ([`FileCache`]). [`http`] serves them over HTTP.
//!
//! Boot files are few and read by many nodes at once, so whole files up to a budget are kept in memory as
//! `Bytes` (keyed by path, size and mtime, so a rebuilt initrd is picked up at once): serving a slice of a
//! cached file costs no disk read and no copy before the socket write.

pub mod http;

pub use self::http::serve;

use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Resolves `rel` under `root`, refusing anything that could leave it: `..`, absolute paths, empty parts,
/// and symlinks whose target lies outside the root.
pub fn confine(root: &Path, rel: &str) -> Option<PathBuf> {
    if rel.is_empty() || rel.starts_with('/') || rel.contains('\0') {
        return None;
    }
    if !rel
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..")
    {
        return None;
    }
    let root = root.canonicalize().ok()?;
    let full = root.join(rel).canonicalize().ok()?;
    full.starts_with(&root).then_some(full)
}

struct Cached {
    bytes: Bytes,
    len: u64,
    mtime: SystemTime,
    last_used: AtomicU64,
}

/// In-memory cache of whole boot files within a byte budget.
pub struct FileCache {
    entries: Mutex<HashMap<PathBuf, Arc<Cached>>>,
    budget: u64,
    clock: AtomicU64,
}

impl FileCache {
    pub fn new(budget: u64) -> FileCache {
        FileCache {
            entries: Mutex::new(HashMap::new()),
            budget,
            clock: AtomicU64::new(0),
        }
    }

    /// Bytes the cache may hold.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub(crate) fn get(&self, path: &Path, len: u64, mtime: SystemTime) -> Option<Bytes> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let c = entries.get(path)?;
        if c.len != len || c.mtime != mtime {
            return None;
        }
        c.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        Some(c.bytes.clone())
    }

    pub(crate) fn insert(&self, path: PathBuf, bytes: Bytes, mtime: SystemTime) {
        let len = bytes.len() as u64;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(&path);
        let mut used: u64 = entries.values().map(|c| c.len).sum();
        // Evict least recently used until the new file fits.
        while used + len > self.budget {
            let Some(victim) = entries
                .iter()
                .min_by_key(|(_, c)| c.last_used.load(Ordering::Relaxed))
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            used -= entries.remove(&victim).map(|c| c.len).unwrap_or(0);
        }
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        entries.insert(
            path,
            Arc::new(Cached {
                bytes,
                len,
                mtime,
                last_used: AtomicU64::new(now),
            }),
        );
    }
}

impl FileCache {
    /// The whole file, from memory when its size and mtime are unchanged.
    pub async fn load(&self, path: PathBuf) -> Option<Bytes> {
        let meta = tokio::fs::metadata(&path)
            .await
            .ok()
            .filter(|m| m.is_file())?;
        let mtime = meta.modified().ok()?;
        if let Some(b) = self.get(&path, meta.len(), mtime) {
            return Some(b);
        }
        let p = path.clone();
        let data = tokio::task::spawn_blocking(move || std::fs::read(p))
            .await
            .ok()?
            .ok()?;
        let b = Bytes::from(data);
        if b.len() as u64 == meta.len() && meta.len() <= self.budget() / 4 {
            self.insert(path, b.clone(), mtime);
        }
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confine_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("ok"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        assert!(confine(&root, "ok").is_some());
        for bad in [
            "../secret",
            "/etc/passwd",
            "link",
            "a//b",
            "./ok",
            "",
            "ok/..",
        ] {
            assert!(confine(&root, bad).is_none(), "{bad}");
        }
    }
}
