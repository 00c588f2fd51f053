//! NBD over TLS with a pre-shared key per slot: the OpenSSL server context the shell wraps a socket in
//! after NBD_OPT_STARTTLS.
//!
//! Why OpenSSL and not rustls (used elsewhere in corral): rustls has no external PSK, and PSK is what
//! qemu (`tls-creds-psk`) and libnbd (`tls-psk-file=`) offer besides X.509; both use GnuTLS. What
//! interoperates with GnuTLS's defaults: TLS 1.3 with an external PSK (`psk_dhe_ke`, so the session has
//! forward secrecy) and, for older clients, TLS 1.2 ECDHE-PSK / PSK suites. There is no certificate: a
//! client that offers no PSK, or an identity corral does not know, or the wrong key, fails the handshake.
//!
//! The identity the client presents picks the key ([`super::ExportSource::psk`]), and the handshake
//! remembers which export that key opens: after TLS the connection may open that slot only.

use std::io::{Read, Write};
use std::sync::Arc;

use openssl::ex_data::Index;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVersion,
};

use super::server::ExportSource;

/// TLS 1.2 suites for clients without TLS 1.3: ECDHE-PSK first (forward secrecy), plain PSK with AEAD
/// after. TLS 1.3 suites are the SHA-256 ones: OpenSSL uses a PSK from the server callback with SHA-256.
const TLS12_SUITES: &str = "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";
const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// What a TLS session proved: the identity the client presented and the export its key opens.
#[derive(Debug, Clone)]
pub struct Proven {
    pub identity: String,
    pub export: String,
}

/// The server side of NBD TLS: one context for all connections.
pub struct TlsServer {
    ctx: SslContext,
    proven: Index<Ssl, Proven>,
}

/// Why a TLS handshake ended without a session.
#[derive(Debug)]
pub enum TlsError {
    /// The socket failed or timed out.
    Io(std::io::Error),
    /// The TLS handshake failed (no PSK, unknown identity, wrong key, no common suite).
    Handshake(String),
}

impl TlsServer {
    pub fn new(source: Arc<dyn ExportSource>) -> Result<TlsServer, openssl::error::ErrorStack> {
        let proven = Ssl::new_ex_index::<Proven>()?;
        let mut b = SslContextBuilder::new(SslMethod::tls_server())?;
        // The NBD spec: TLS 1.2 at least, nothing older by default.
        b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        b.set_cipher_list(TLS12_SUITES)?;
        b.set_ciphersuites(TLS13_SUITES)?;
        // No resumption: every connection proves the key again (and no ticket key to keep secret).
        b.set_options(SslOptions::NO_TICKET);
        b.set_num_tickets(0)?;
        b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
        b.set_psk_server_callback(move |ssl, identity, out| {
            let Some(identity) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                return Ok(0);
            };
            // 0 bytes: OpenSSL fails the handshake (unknown identity).
            let Some(psk) = source.psk(identity) else {
                tracing::info!(identity, "nbd tls: unknown PSK identity");
                return Ok(0);
            };
            if psk.key.is_empty() || psk.key.len() > out.len() {
                return Ok(0);
            }
            out[..psk.key.len()].copy_from_slice(&psk.key);
            ssl.set_ex_data(
                proven,
                Proven {
                    identity: identity.to_string(),
                    export: psk.export.clone(),
                },
            );
            Ok(psk.key.len())
        });
        Ok(TlsServer {
            ctx: b.build(),
            proven,
        })
    }

    /// Runs the server side of the TLS handshake on `stream` (the ACK of STARTTLS is already sent).
    pub fn accept<S: Read + Write>(&self, stream: S) -> Result<(SslStream<S>, Proven), TlsError> {
        let ssl = Ssl::new(&self.ctx).map_err(|e| TlsError::Handshake(e.to_string()))?;
        let tls = ssl.accept(stream).map_err(|e| match e {
            openssl::ssl::HandshakeError::Failure(m) => match m.error().io_error() {
                Some(io) => TlsError::Io(std::io::Error::new(io.kind(), io.to_string())),
                None => TlsError::Handshake(m.error().to_string()),
            },
            openssl::ssl::HandshakeError::WouldBlock(m) => TlsError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                m.error().to_string(),
            )),
            openssl::ssl::HandshakeError::SetupFailure(e) => TlsError::Handshake(e.to_string()),
        })?;
        // A finished handshake went through the PSK callback, which recorded what the key opens.
        let proven = tls
            .ssl()
            .ex_data(self.proven)
            .cloned()
            .ok_or_else(|| TlsError::Handshake("TLS session without a PSK".into()))?;
        Ok((tls, proven))
    }
}
