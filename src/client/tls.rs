//! TLS trust for [`super`]'s HTTPS requests (and the Redfish driver's): which roots verify a server's
//! certificate, as a rustls client configuration.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// How an HTTPS server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's roots.
    System,
    /// Only the CA certificates in this PEM file (a private CA).
    CaFile(PathBuf),
    /// The system's roots and the certificates in this PEM file (a self-signed server certificate).
    SystemAnd(PathBuf),
    /// Any certificate (self-signed BMCs with `insecure_tls`; probes, which carry no secrets).
    Any,
}

/// The system's trust roots, read once: rustls-native-certs (the distribution's bundle, `SSL_CERT_FILE`
/// and `SSL_CERT_DIR` honoured), or the Mozilla roots compiled in when none could be read.
pub fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(errors = ?found.errors, "no system trust roots found: using the built-in Mozilla roots");
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            Arc::new(roots)
        })
        .clone()
}

/// Adds the certificates of a PEM file to `roots`; a file without a usable one is an error.
fn add_file_roots(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let err = |e: &dyn std::fmt::Display| format!("CA file {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(err(&"no usable CA certificate (PEM) in it"));
    }
    Ok(())
}

/// Accepts any certificate: only for [`Trust::Any`].
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

/// The rustls client configuration for `trust` (ring, TLS 1.2 and 1.3).
pub fn tls_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let cfg = match trust {
        Trust::Any => cfg
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider))),
        Trust::System => cfg.with_root_certificates(system_roots()),
        Trust::CaFile(p) => {
            let mut roots = rustls::RootCertStore::empty();
            add_file_roots(&mut roots, p)?;
            cfg.with_root_certificates(roots)
        }
        Trust::SystemAnd(p) => {
            let mut roots = (*system_roots()).clone();
            add_file_roots(&mut roots, p)?;
            cfg.with_root_certificates(roots)
        }
    };
    Ok(Arc::new(cfg.with_no_client_auth()))
}
