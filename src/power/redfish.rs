//! Redfish (DMTF DSP0266): `ComputerSystem.Reset` for power, `PowerState` for status, a one-time boot
//! source override to PXE for the next boot. HTTP basic authentication, over HTTPS only: a BMC with
//! credentials at an http:// URL is refused when the driver is built, before any packet, since Basic
//! auth would send the password in the clear (http:// is for emulators without credentials). HTTPS is
//! verified against the system's roots (rustls-native-certs; webpki-roots when the system has none), or
//! against the BMC's own `ca_file` (a private CA, PEM: then only that CA), unless this node's BMC is
//! configured with `insecure_tls` (self-signed certificates, common on BMCs), which applies to that BMC
//! only.

use std::time::Duration;

use super::{failed, PowerDriver, PowerResult, PowerState, Secret};

pub struct Redfish {
    base: String,
    system: Option<String>,
    secret: Option<Secret>,
    agent: ureq::Agent,
    trust: Trust,
}

/// How a BMC's HTTPS certificate is checked: the system's roots, only a `ca_file`'s CA, or any
/// certificate (`insecure_tls`).
pub use crate::client::Trust;

impl Redfish {
    pub fn new(
        url: &str,
        system: Option<String>,
        secret: Option<Secret>,
        trust: Trust,
        timeout: Duration,
    ) -> Result<Redfish, String> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("http://") {
            if secret.is_some() {
                return Err(format!(
                    "redfish BMC {url}: refusing Basic authentication over plain http:// (the password would cross the network in the clear); use https:// (with `ca_file` for a private CA), or no `credentials` for an emulator that needs none"
                ));
            }
            if trust != Trust::System {
                return Err(format!(
                    "redfish BMC {url}: `ca_file` and `insecure_tls` are for https:// URLs"
                ));
            }
        } else if !lower.starts_with("https://") {
            return Err(format!(
                "redfish BMC {url}: the URL must start with https://"
            ));
        }
        // No redirects (the shared agent follows none): ureq would turn a redirected POST/PATCH into a GET
        // (301-303) or hand back the 3xx as a success (307/308), and it drops the Authorization header on
        // the way. A BMC that redirects gets an error naming the new address instead (see `call`).
        let agent = crate::client::agent(timeout, &trust).map_err(|e| match trust {
            Trust::CaFile(_) => format!("ca_file {e}"),
            _ => e,
        })?;
        Ok(Redfish {
            base: url.trim_end_matches('/').to_string(),
            system,
            secret,
            agent,
            trust,
        })
    }

    fn auth(&self) -> Option<String> {
        use std::io::Write;
        let secret = self.secret.as_ref()?;
        let mut raw = Vec::new();
        let _ = write!(raw, "{}:{}", secret.user, secret.password);
        Some(format!("Basic {}", base64(&raw)))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> PowerResult<serde_json::Value> {
        let mut req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Accept", "application/json");
        if let Some(a) = self.auth() {
            req = req.set("Authorization", &a);
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) if !(200..300).contains(&r.status()) => Err(failed(format!(
                "redfish {method} {path}: HTTP {} redirect to {}; set `url`/`system` to that address",
                r.status(),
                r.header("Location").unwrap_or("(no Location)")
            ))),
            Ok(r) => {
                let text = r.into_string().unwrap_or_default();
                Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
            }
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or_default();
                Err(failed(format!(
                    "redfish {method} {path}: HTTP {code} {msg}"
                )))
            }
            Err(e) => {
                let text = e.to_string();
                // rustls says "invalid peer certificate: UnknownIssuer"; say what to do about it.
                let hint = if text.contains("invalid peer certificate") {
                    match &self.trust {
                        Trust::CaFile(p) => format!(
                            " (the BMC's certificate is not signed by the CA in ca_file {})",
                            p.display()
                        ),
                        _ => " (the BMC's certificate is not signed by a CA the system trusts: set `ca_file` to the CA that signed it, or `insecure_tls` for a self-signed one)".to_string(),
                    }
                } else {
                    String::new()
                };
                Err(failed(format!("redfish {method} {path}: {text}{hint}")))
            }
        }
    }

    /// The system's path: the configured id, or the only member of /redfish/v1/Systems.
    fn system_path(&self) -> PowerResult<String> {
        if let Some(id) = &self.system {
            return Ok(format!("/redfish/v1/Systems/{id}"));
        }
        let v = self.call("GET", "/redfish/v1/Systems", None)?;
        let members = v["Members"].as_array().cloned().unwrap_or_default();
        match members.as_slice() {
            [one] => one["@odata.id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| failed("redfish: system without @odata.id")),
            _ => Err(failed(format!(
                "redfish: {} systems on this BMC; set `system`",
                members.len()
            ))),
        }
    }

    fn reset(&self, kind: &str) -> PowerResult<()> {
        let sys = self.system_path()?;
        self.call(
            "POST",
            &format!("{sys}/Actions/ComputerSystem.Reset"),
            Some(serde_json::json!({ "ResetType": kind })),
        )
        .map(|_| ())
    }
}

/// Standard base64 (for the basic-auth header).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl PowerDriver for Redfish {
    fn kind(&self) -> &'static str {
        "redfish"
    }
    fn on(&self) -> PowerResult<()> {
        self.reset("On")
    }
    fn off(&self, hard: bool) -> PowerResult<()> {
        self.reset(if hard { "ForceOff" } else { "GracefulShutdown" })
    }
    fn cycle(&self) -> PowerResult<()> {
        self.reset("ForceRestart")
    }
    fn status(&self) -> PowerResult<PowerState> {
        let sys = self.system_path()?;
        let v = self.call("GET", &sys, None)?;
        Ok(match v["PowerState"].as_str() {
            Some("On") | Some("PoweringOn") => PowerState::On,
            Some("Off") | Some("PoweringOff") => PowerState::Off,
            _ => PowerState::Unknown,
        })
    }
    fn boot_network_once(&self) -> PowerResult<()> {
        let sys = self.system_path()?;
        self.call(
            "PATCH",
            &sys,
            Some(serde_json::json!({
                "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" }
            })),
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Option<Secret> {
        Some(Secret {
            user: "admin".into(),
            password: "pw-never-shown".into(),
        })
    }

    #[test]
    fn basic_auth_only_over_https() {
        let t = Duration::from_secs(1);
        let e = Redfish::new("HTTP://10.0.9.1", None, secret(), Trust::System, t)
            .err()
            .unwrap();
        assert!(
            e.contains("plain http://") && !e.contains("pw-never-shown"),
            "{e}"
        );
        assert!(Redfish::new("http://10.0.9.1", None, None, Trust::System, t).is_ok());
        assert!(Redfish::new("http://10.0.9.1", None, None, Trust::Any, t).is_err());
        assert!(Redfish::new("ftp://10.0.9.1", None, None, Trust::System, t).is_err());
        assert!(Redfish::new("https://10.0.9.1", None, secret(), Trust::System, t).is_ok());
        // The system's roots were found (Debian's ca-certificates), or the built-in ones stand in.
        assert!(!crate::client::system_roots().is_empty());
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
    }
}
