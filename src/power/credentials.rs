//! BMC credentials: a TOML file apart from the policy (`server.credentials`), readable by corral only.
//! Its secrets never reach logs, events or the API: [`Secret`] prints as `***`.
//!
//! ```toml
//! [bmc-r12-05]
//! user = "admin"
//! password = "..."
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret {{ user: {:?}, password: *** }}", self.user)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Credentials(BTreeMap<String, Secret>);

impl Credentials {
    /// Reads the file, refusing one that others than its owner (and group) could read.
    pub fn load(path: &Path) -> Result<Credentials, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o007 != 0 {
            return Err(format!(
                "{}: readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let map: BTreeMap<String, Secret> = toml::from_str(&text)
            // The parser's message may quote the offending line: keep only its position.
            .map_err(|e| {
                let at = e
                    .span()
                    .map(|s| {
                        let line = text[..s.start].lines().count().max(1);
                        format!(" at line {line}")
                    })
                    .unwrap_or_default();
                format!("{}: not a valid credentials file{at}", path.display())
            })?;
        Ok(Credentials(map))
    }

    pub fn get(&self, key: &str) -> Option<&Secret> {
        self.0.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Secret)> {
        self.0.iter()
    }

    /// Refuses iSCSI CHAP entries (`iscsi:...`, `iscsi-target:...`) whose secret is shorter than the 12
    /// bytes RFC 7143 requires, or mutual entries whose secret equals the initiator's (the RFC forbids
    /// one secret for both directions).
    pub fn check_iscsi(&self) -> Result<(), String> {
        for (key, secret) in self.iter() {
            let Some(rest) = key
                .strip_prefix("iscsi:")
                .or_else(|| key.strip_prefix("iscsi-target:"))
            else {
                continue;
            };
            if secret.password.len() < 12 {
                return Err(format!(
                    "[{key}]: a CHAP secret must be at least 12 bytes (RFC 7143)"
                ));
            }
            if key.starts_with("iscsi-target:")
                && self
                    .get(&format!("iscsi:{rest}"))
                    .is_some_and(|i| i.password == secret.password)
            {
                return Err(format!(
                    "[{key}]: the target's secret must differ from the initiator's (RFC 7143)"
                ));
            }
        }
        Ok(())
    }

    pub fn from_map(map: BTreeMap<String, Secret>) -> Credentials {
        Credentials(map)
    }
}
