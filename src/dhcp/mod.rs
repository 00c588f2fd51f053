//! DHCP on the boot network: full (authoritative, with leases) or ProxyDHCP (boot information beside the
//! site's own server), PXE/iPXE/HTTP-boot client handling, and IPv6 router advertisements that spare iPXE
//! its IPv6 wait.
//!
//! `core` and `leases` decide, sans IO; `server` is the thin socket shell, bound to the configured interface
//! and nothing else; `ra` builds and sends router advertisements.

pub mod core;
pub mod leases;
pub mod ra;
pub mod server;

pub use server::{DhcpServer, DhcpStats};
