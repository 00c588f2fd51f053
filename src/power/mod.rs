//! The power room: switching nodes on and off and pointing their next boot at the network, through
//! whatever each node has: a Redfish BMC, an IPMI BMC, Wake-on-LAN, an operator's command, or QEMU's QMP
//! (the lab). One trait, [`PowerDriver`]; drivers are built from a node's `power = {...}` in the policy
//! and its credentials from a separate file only corral can read ([`credentials`]).
//!
//! Drivers block (HTTP, a subprocess, a socket round trip): callers run them on blocking threads.

pub mod command;
pub mod credentials;
pub mod ipmi;
pub mod qmp;
pub mod redfish;
pub mod wol;

use std::time::Duration;

pub use credentials::{Credentials, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("not supported by the {0} driver")]
    Unsupported(&'static str),
    #[error("{0}")]
    Failed(String),
}

pub type PowerResult<T> = Result<T, PowerError>;

fn failed(e: impl std::fmt::Display) -> PowerError {
    PowerError::Failed(e.to_string())
}

/// One node's power control.
pub trait PowerDriver: Send + Sync {
    fn kind(&self) -> &'static str;
    fn on(&self) -> PowerResult<()>;
    /// Off: `hard` cuts power at once, otherwise the OS is asked to shut down.
    fn off(&self, hard: bool) -> PowerResult<()>;
    /// Hard reset (off and on again).
    fn cycle(&self) -> PowerResult<()>;
    fn status(&self) -> PowerResult<PowerState>;
    /// Makes the next boot (once) a network boot, where the BMC can.
    fn boot_network_once(&self) -> PowerResult<()>;
}

/// A node's `power = { driver = ..., ... }` in the policy.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(tag = "driver", rename_all = "lowercase", deny_unknown_fields)]
pub enum PowerSpec {
    Redfish {
        /// `https://bmc.example` (or http:// for emulators).
        url: String,
        /// The ComputerSystem id under /redfish/v1/Systems/ (default: the only one).
        system: Option<String>,
        /// A key in the credentials file (HTTP Basic auth, over https:// only). None: no authentication
        /// (emulators).
        #[serde(default)]
        credentials: Option<String>,
        /// Accept a self-signed certificate for this BMC (and only this one).
        #[serde(default)]
        insecure_tls: bool,
        /// A PEM file of the private CA that signed this BMC's certificate: trusted for this BMC only,
        /// instead of the system's roots.
        #[serde(default)]
        ca_file: Option<std::path::PathBuf>,
    },
    Ipmi {
        host: String,
        #[serde(default = "ipmi_port")]
        port: u16,
        credentials: String,
        /// RMCP+ cipher suite (default 3, which BMCs support widely). Naming it spares every call
        /// ipmitool's cipher-suite discovery, which some BMCs (and ipmi_sim) never answer: ~9 s each.
        #[serde(default = "ipmi_cipher_suite")]
        cipher_suite: u8,
    },
    /// Wake-on-LAN: on only (off goes through the node's agent).
    Wol {
        /// Broadcast address (default 255.255.255.255) on the boot interface.
        broadcast: Option<std::net::Ipv4Addr>,
    },
    /// Operator's commands, run with `sh -c` and the node's variables in the environment
    /// (CORRAL_MAC, CORRAL_NODE).
    Command {
        on: String,
        off: String,
        status: Option<String>,
        boot_network: Option<String>,
    },
    /// QEMU's QMP socket (the lab and tests).
    Qemu { qmp: std::path::PathBuf },
}

fn ipmi_port() -> u16 {
    623
}

fn ipmi_cipher_suite() -> u8 {
    3
}

/// What a driver needs besides its spec.
pub struct Context<'a> {
    pub mac: crate::domain::Mac,
    pub name: Option<&'a str>,
    pub credentials: &'a Credentials,
    /// The boot network interface (Wake-on-LAN goes out there and nowhere else).
    pub interface: Option<&'a str>,
}

/// Builds the driver a spec describes.
pub fn driver(spec: &PowerSpec, ctx: &Context<'_>) -> Result<Box<dyn PowerDriver>, String> {
    let secret = |key: &str| {
        ctx.credentials
            .get(key)
            .cloned()
            .ok_or_else(|| format!("no credentials named `{key}`"))
    };
    Ok(match spec {
        PowerSpec::Redfish {
            url,
            system,
            credentials,
            insecure_tls,
            ca_file,
        } => {
            let trust = match (insecure_tls, ca_file) {
                (true, Some(_)) => {
                    return Err("redfish: `insecure_tls` and `ca_file` together: choose one".into())
                }
                (true, None) => redfish::Trust::Any,
                (false, Some(p)) => redfish::Trust::CaFile(p.clone()),
                (false, None) => redfish::Trust::System,
            };
            let secret = credentials.as_deref().map(secret).transpose()?;
            let who = ctx.name.map_or_else(|| ctx.mac.to_string(), str::to_string);
            Box::new(
                redfish::Redfish::new(url, system.clone(), secret, trust, Duration::from_secs(10))
                    .map_err(|e| format!("node {who}: {e}"))?,
            )
        }
        PowerSpec::Ipmi {
            host,
            port,
            credentials,
            cipher_suite,
        } => Box::new(ipmi::Ipmi::new(
            host,
            *port,
            secret(credentials)?,
            *cipher_suite,
        )),
        PowerSpec::Wol { broadcast } => Box::new(wol::Wol::new(
            ctx.mac,
            ctx.interface.map(str::to_string),
            broadcast.unwrap_or(std::net::Ipv4Addr::BROADCAST),
        )),
        PowerSpec::Command {
            on,
            off,
            status,
            boot_network,
        } => Box::new(command::Command {
            on: on.clone(),
            off: off.clone(),
            status: status.clone(),
            boot_network: boot_network.clone(),
            mac: ctx.mac,
            name: ctx.name.map(str::to_string),
        }),
        PowerSpec::Qemu { qmp } => Box::new(qmp::Qmp::new(qmp)),
    })
}
