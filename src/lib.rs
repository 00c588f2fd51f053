//! corral: a network boot appliance. One control point that racks of diskless nodes boot from: DHCP (full or
//! ProxyDHCP), TFTP and HTTP answering each node with its own iPXE script.
//!
//! Rooms (see `docs/` and the repository's DESIGN notes): protocol rooms each have a sans-IO core (bytes and
//! `now` in, decisions and bytes out) and a thin tokio shell; the `controller` ties them together.
//! The nouns several rooms use live in [`domain`], and the boot files TFTP and HTTP both serve in [`files`],
//! so no room reaches into another for them. The VM lab (`lab`) needs the `lab` feature, on by default.

pub mod agent;
pub mod boot;
pub mod client;
pub mod config;
pub mod conn;
pub mod controller;
pub mod dhcp;
pub mod disk;
pub mod domain;
pub mod events;
pub mod files;
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod iscsi;
#[cfg(feature = "lab")]
pub mod lab;
pub mod liveness;
pub mod mac;
pub mod metrics;
pub mod nbd;
pub mod policy;
pub mod power;
pub mod store;
pub mod tftp;

/// Seconds since the Unix epoch: the only clock read in the crate, passed into every core as `now`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
