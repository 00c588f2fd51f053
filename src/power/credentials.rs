//! BMC credentials: a TOML file apart from the policy (`server.credentials`), readable by corral only.
//! Its secrets never reach logs, events or the API: [`Secret`] prints as `***`.
//!
//! ```toml
//! [bmc-r12-05]
//! user = "admin"
//! password = "..."
//! ```

use std::collections::BTreeMap;
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
    /// Reads the file, refusing one that anyone but its owner (or this process's user, as for systemd's
    /// credentials) could read: see [`crate::config::check_private`].
    pub fn load(path: &Path) -> Result<Credentials, String> {
        crate::config::check_private(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::check_private_as;
    use std::os::unix::fs::PermissionsExt;

    /// A uid in systemd's DynamicUser= range (61184–65519): the service's user, not the file's owner.
    const SERVICE: u32 = 61_234;

    fn write(dir: &Path, name: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(format!("{name}-{mode:o}"));
        std::fs::write(&p, "[bmc]\nuser = \"admin\"\npassword = \"pw-not-shown\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// What systemd's write_credential() leaves for a service whose user does not own the file: 0400,
    /// then an ACL entry `user:<uid>:r` added by libacl (which recomputes the mask from the group class).
    /// Written as the kernel's xattr, the form `setfacl -m u:<uid>:r` writes.
    fn systemd_acl(p: &Path, uid: u32, group_read: bool) {
        use std::os::unix::ffi::OsStrExt;
        let mut x = 2u32.to_le_bytes().to_vec();
        let g = if group_read { 4 } else { 0 };
        for (tag, perm, id) in [
            (0x01u16, 4u16, u32::MAX), // owner: r
            (0x02, 4, uid),            // named user: r
            (0x04, g, u32::MAX),       // owning group
            (0x10, 4 | g, u32::MAX),   // mask: the union of the group class
            (0x20, 0, u32::MAX),       // others: nothing
        ] {
            x.extend_from_slice(&tag.to_le_bytes());
            x.extend_from_slice(&perm.to_le_bytes());
            x.extend_from_slice(&id.to_le_bytes());
        }
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated names, `x` readable for its length.
        let r = unsafe {
            libc::setxattr(
                c.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                x.as_ptr().cast(),
                x.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn group_or_world_readable_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o440] {
            let e = Credentials::load(&write(dir.path(), "credentials", mode)).unwrap_err();
            assert!(e.contains("readable by") && e.contains("chmod 600"), "{e}");
            assert!(e.contains(&format!("mode {mode:o}")), "{e}");
            assert!(!e.contains("pw-not-shown"), "{e}");
        }
        for mode in [0o600, 0o400] {
            let c = Credentials::load(&write(dir.path(), "credentials", mode)).unwrap();
            assert_eq!(c.get("bmc").unwrap().user, "admin");
        }
    }

    #[test]
    fn systemd_credentials_are_accepted_as_systemd_makes_them() {
        let dir = tempfile::tempdir().unwrap();
        // ACLs where the file system keeps them (systemd's tmpfs): owned by root, the service's user
        // named in the ACL. `ls -l` says 0440 here.
        let p = write(dir.path(), "acl", 0o400);
        systemd_acl(&p, SERVICE, false);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o440, "the group bits show the ACL mask");
        check_private_as(&p, SERVICE).unwrap();
        // The same file for a process of another user: that user is someone else.
        let e = check_private_as(&p, SERVICE + 1).unwrap_err();
        assert!(e.contains(&format!("user {SERVICE}")), "{e}");
        // An ACL that also lets the owning group read is refused, whoever asks.
        let p = write(dir.path(), "acl-group", 0o400);
        systemd_acl(&p, SERVICE, true);
        let e = check_private_as(&p, SERVICE).unwrap_err();
        assert!(e.contains("its group"), "{e}");
        // Without ACL support (ramfs) systemd chowns the 0400 file to the service's user instead.
        // (Giving a file away needs root.)
        if nix::unistd::geteuid().is_root() {
            let p = write(dir.path(), "owned", 0o400);
            std::os::unix::fs::chown(&p, Some(SERVICE), None).unwrap();
            check_private_as(&p, SERVICE).unwrap();
        }
    }
}
