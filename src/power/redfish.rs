//! Redfish (DMTF DSP0266): `ComputerSystem.Reset` for power, `PowerState` for status, a one-time boot
//! source override to PXE for the next boot. HTTP basic authentication; HTTPS verified against the
//! system's roots unless this node's BMC is configured with `insecure_tls` (self-signed certificates,
//! common on BMCs), which applies to that BMC only.

use std::sync::Arc;
use std::time::Duration;

use super::{failed, PowerDriver, PowerResult, PowerState, Secret};

pub struct Redfish {
    base: String,
    system: Option<String>,
    secret: Secret,
    agent: ureq::Agent,
}

/// Accepts any certificate: used only for BMCs configured with `insecure_tls`.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Redfish {
    pub fn new(
        url: &str,
        system: Option<String>,
        secret: Secret,
        insecure_tls: bool,
        timeout: Duration,
    ) -> Result<Redfish, String> {
        // No redirects: ureq would turn a redirected POST/PATCH into a GET (301-303) or hand back the 3xx
        // as a success (307/308), and it drops the Authorization header on the way. A BMC that redirects
        // gets an error naming the new address instead (see `call`).
        let mut b = ureq::AgentBuilder::new().timeout(timeout).redirects(0);
        if insecure_tls {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_no_client_auth();
            b = b.tls_config(Arc::new(cfg));
        }
        Ok(Redfish {
            base: url.trim_end_matches('/').to_string(),
            system,
            secret,
            agent: b.build(),
        })
    }

    fn auth(&self) -> String {
        use std::io::Write;
        let mut raw = Vec::new();
        let _ = write!(raw, "{}:{}", self.secret.user, self.secret.password);
        format!("Basic {}", base64(&raw))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> PowerResult<serde_json::Value> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &self.auth())
            .set("Accept", "application/json");
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
            Err(e) => Err(failed(format!("redfish {method} {path}: {e}"))),
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
