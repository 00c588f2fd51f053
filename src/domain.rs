//! The nouns every room shares: a node's hardware address ([`Mac`]), what iPXE tells about a node
//! ([`NodeFacts`]), a cluster slot ([`SlotRef`]) and DHCP leases ([`LeaseRecord`], [`LeaseChange`]). Rooms
//! name them from here, so none reaches into another room for a plain type.

use serde::Serialize;
use std::net::Ipv4Addr;

pub use crate::mac::Mac;

/// A slot of a cluster.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SlotRef {
    pub cluster: String,
    pub slot: u32,
}

/// What iPXE told us about a node when it asked for its script.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeFacts {
    pub uuid: Option<String>,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    /// iPXE `buildarch` (`i386`, `x86_64`, `arm64`).
    pub buildarch: Option<String>,
    /// iPXE `platform` (`pcbios`, `efi`).
    pub platform: Option<String>,
    /// Memory in MiB as iPXE reports it.
    pub memsize: Option<u64>,
    /// The address the request came from.
    pub ip: Option<String>,
}

/// A change to the lease table, which the DHCP shell must persist before replying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    Put(LeaseRecord),
    Remove(Ipv4Addr),
}

/// A DHCP lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseRecord {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    /// DHCP option 61, when the client sent one.
    pub client_id: Option<Vec<u8>>,
    pub hostname: Option<String>,
    /// Unix seconds.
    pub expires: u64,
}
