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
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
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

#[cfg(test)]
mod tests {
    use super::super::{Client, Error};
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// A self-signed certificate for 127.0.0.1 and its key (PEM).
    fn self_signed() -> (Vec<u8>, Vec<u8>) {
        use openssl::{asn1::Asn1Time, bn::BigNum, ec, nid::Nid, pkey::PKey, x509};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "corral test").unwrap();
        let name = name.build();
        let mut b = x509::X509::builder().unwrap();
        b.set_version(2).unwrap();
        let serial = BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        let san = x509::extension::SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .build(&b.x509v3_context(None, None))
            .unwrap();
        b.append_extension(san).unwrap();
        b.sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        let cert = b.build().to_pem().unwrap();
        (cert, key.private_key_to_pem_pkcs8().unwrap())
    }

    /// An HTTPS server on loopback answering every request with `204`.
    fn https_server(cert: &[u8], key: &[u8]) -> String {
        use openssl::ssl::{SslAcceptor, SslMethod};
        let mut a = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        a.set_certificate(&openssl::x509::X509::from_pem(cert).unwrap())
            .unwrap();
        a.set_private_key(&openssl::pkey::PKey::private_key_from_pem(key).unwrap())
            .unwrap();
        let a = a.build();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("https://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let Ok(mut s) = a.accept(s) else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                let _ = s.shutdown();
            }
        });
        base
    }

    #[test]
    fn https_is_verified_as_trust_says() {
        let (cert, key) = self_signed();
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("server.pem");
        std::fs::write(&pem, &cert).unwrap();
        let base = https_server(&cert, &key);
        let get = |trust: Trust| {
            Client::new(&base, None, &trust, Duration::from_secs(5))
                .unwrap()
                .send("GET", "/", None)
        };
        for trust in [
            Trust::SystemAnd(pem.clone()),
            Trust::CaFile(pem.clone()),
            Trust::Any,
        ] {
            assert_eq!(get(trust.clone()).unwrap().status, 204, "{trust:?}");
        }
        let e = get(Trust::System).unwrap_err();
        assert!(
            matches!(e, Error::Connect { .. })
                && e.to_string().contains("invalid peer certificate"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = tls_config(&Trust::SystemAnd(junk)).unwrap_err();
        assert!(e.contains("junk.pem: no usable CA certificate"), "{e}");
    }
}
