//! TFTP: read-only server for iPXE binaries and small files.
//!
//! Interface contract (to be implemented in this room):
//! - `TftpServer::bind(cfg: &TftpConfig) -> anyhow::Result<TftpServer>` (async)
//! - `TftpServer::run(self) -> anyhow::Result<()>` (async)
//! - `TftpServer::stats(&self) -> Arc<TftpStats>` where `TftpStats: crate::metrics::Report`.
