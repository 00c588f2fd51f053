//! DHCP: full (authoritative) and ProxyDHCP service on the boot interface, PXE/iPXE client handling, leases.
//!
//! Interface contract used by `main`/`controller` (to be implemented in this room):
//! - `DhcpServer::bind(cfg: &Config, store: Store) -> anyhow::Result<DhcpServer>` (async): opens every socket.
//! - `DhcpServer::run(self) -> anyhow::Result<()>` (async): serves until the task is dropped.
//! - `DhcpServer::stats(&self) -> Arc<DhcpStats>` where `DhcpStats: crate::metrics::Report`.
