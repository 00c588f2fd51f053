//! What a node's request for its script gets: the controller decides it whole (who may have the script,
//! the node's role and image, its identity, its disk, its boot token and keys) and records what the request
//! means (discovery, facts, a parked node's move input); the HTTP room only renders the plan with the
//! templates. Keeping the decision here is what lets the request path be tested without HTTP and keeps
//! secrets (tokens, PSKs, CHAP) from being gathered by the transport.

use std::net::IpAddr;
use std::sync::Arc;

use super::{BootDecision, BootState, Controller};
use crate::boot::{Image, ImageKind, NodeVars, SanVars};
use crate::domain::{Mac, NodeFacts};
use crate::iscsi::login::Chap;

/// What a script request is answered with.
#[derive(Debug)]
pub enum BootPlan {
    /// The request is not from the node's own address (as corral's DHCP knows it): refused, with why.
    Refused(String),
    /// A node corral will not take in (yet): an error script that asks again later.
    NotTaken(String),
    /// No work for the node: the parked script, which asks again after the poll.
    Park,
    /// The node should boot something it cannot: an error script with why, asking again later.
    Error(String),
    /// Boot `image` with these values.
    Boot {
        image: Arc<Image>,
        /// Boxed: a plan is mostly a refusal or a parked node, and those stay small.
        vars: Box<ScriptVars>,
        /// For a `sanboot` image: the slot's iSCSI disk and how to log in to it.
        san: Option<SanPlan>,
    },
}

/// The values a node's script is rendered with (see [`crate::boot::NodeVars`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptVars {
    pub base_url: String,
    pub server: String,
    pub mac: String,
    pub hostname: String,
    pub cluster: String,
    pub slot: String,
    pub address: String,
    pub disk: String,
    pub disk_export: String,
    /// `corral.api=… corral.token=…`: this boot's token (a secret).
    pub agent: String,
    /// `corral.nbd_psk=…`: the slot's NBD key (a secret).
    pub nbd_psk: String,
}

impl ScriptVars {
    /// The borrowed form the templates take.
    pub fn as_vars(&self) -> NodeVars<'_> {
        NodeVars {
            base_url: &self.base_url,
            server: &self.server,
            mac: &self.mac,
            hostname: &self.hostname,
            cluster: &self.cluster,
            slot: &self.slot,
            address: &self.address,
            disk: &self.disk,
            disk_export: &self.disk_export,
            agent: &self.agent,
            nbd_psk: &self.nbd_psk,
        }
    }
}

/// A `sanboot` image's disk: iPXE's root path, the initiator's name, the slot's CHAP secrets.
#[derive(Debug, Clone)]
pub struct SanPlan {
    pub root_path: String,
    pub initiator_iqn: String,
    pub chap: Option<Chap>,
}

impl SanPlan {
    pub fn as_vars(&self) -> SanVars<'_> {
        SanVars {
            root_path: &self.root_path,
            initiator_iqn: &self.initiator_iqn,
            chap: self.chap.as_ref(),
        }
    }
}

impl Controller {
    /// Decides what a request for `mac`'s script from `peer` gets, with `facts` from its query, and
    /// records what the request means. Returns the boot state it decided with, whose templates render it.
    ///
    /// Only a request from the node's own address (as corral's DHCP knows it, see `trust`) gets a script
    /// that carries its secrets (boot token, NBD key, CHAP) or changes anything (discovery, facts, holds,
    /// move confirmations, a failed node's return); under a policy every other request is refused,
    /// counted and logged with its peer. Without a policy a script carries no secret unless its image
    /// says so, and is served to anyone, but only the node's own requests are recorded.
    pub fn boot_plan(
        &self,
        mac: Mac,
        facts: NodeFacts,
        peer: IpAddr,
        now: u64,
    ) -> (Arc<BootState>, BootPlan) {
        let state = self.state();
        let plan = self.plan_for(&state, mac, facts, peer, now);
        (state, plan)
    }

    fn plan_for(
        &self,
        state: &BootState,
        mac: Mac,
        facts: NodeFacts,
        peer: IpAddr,
        now: u64,
    ) -> BootPlan {
        let from_node = self.is_from_node(mac, peer);
        let policy = state.policy.is_some();
        if policy && !from_node {
            self.refuse_foreign(mac, peer, "a node script");
            return BootPlan::Refused(
                "corral serves this node's script only to the node itself, from the address its DHCP knows it by".into(),
            );
        }
        let slot = if policy {
            if !self.is_known(mac) {
                if let Err(why) = self.may_discover(mac, peer, now) {
                    // Not an attack on a node (the request is from its address), only a node corral will
                    // not take in (yet): the error script asks again later, when it may be listed.
                    return BootPlan::NotTaken(format!(
                        "corral does not take this node in: {}",
                        why.as_str()
                    ));
                }
            }
            // Discovery (and planning for a new node) happens here, so its first request gets its role.
            self.node_seen(mac, facts.clone(), now);
            // Parked while the slot's disk is still held by the node it is taken from.
            self.bootable_slot_of(mac)
        } else {
            None
        };
        let decision = state.decide(mac, &facts, now, slot.as_ref());
        if !policy {
            if let BootDecision::Image(image, _) = &decision {
                if image.spec.secret && !from_node {
                    self.refuse_foreign(mac, peer, "a secret image's script");
                    return BootPlan::Refused(
                        "this image's script is served only to the node itself, from the address corral knows it by".into(),
                    );
                }
            }
            if from_node {
                self.node_seen(mac, facts, now);
            }
        }
        match decision {
            BootDecision::Image(image, role) => {
                let (vars, san) = self.script_vars(state, mac, &image, role.as_ref(), now);
                tracing::debug!(%mac, image = %image.name, "node script: image");
                BootPlan::Boot {
                    image,
                    vars: Box::new(vars),
                    san,
                }
            }
            BootDecision::Park => {
                tracing::debug!(%mac, "node script: parked");
                // Parked for want of a role (not while waiting for its slot's disk to be freed).
                if self.slot_of(mac).is_none() {
                    self.move_input(mac, super::moves::Input::Parked);
                }
                BootPlan::Park
            }
            BootDecision::Error(msg) => {
                tracing::warn!(%mac, reason = %msg, "node script: cannot boot");
                BootPlan::Error(msg)
            }
        }
    }

    /// The values of a script that boots `image` on `mac` in `role`: identity, disk, this boot's token
    /// (issued here: every boot into a role gets its own) and the slot's keys.
    fn script_vars(
        &self,
        state: &BootState,
        mac: Mac,
        image: &Image,
        role: Option<&super::Role>,
        now: u64,
    ) -> (ScriptVars, Option<SanPlan>) {
        let base_url = state.config.public_url();
        let server = state.config.server.address.to_string();
        let mut v = ScriptVars {
            mac: mac.to_string(),
            hostname: hostname_for(&state.config, mac),
            ..Default::default()
        };
        if let Some(r) = role {
            v.hostname = r.identity.hostname.clone();
            v.cluster = r.slot.cluster.clone();
            v.slot = r.slot.slot.to_string();
            v.address = r
                .identity
                .address
                .map(|a| a.to_string())
                .unwrap_or_default();
        }
        let has_disk = role.is_some_and(|r| {
            state
                .policy
                .as_ref()
                .and_then(|p| p.cluster(&r.slot.cluster))
                .is_some_and(|c| c.spec.disk.is_some())
        });
        if has_disk && state.config.nbd.enabled {
            let export = format!("{}/{}", v.cluster, v.slot);
            let port = state.config.nbd.listen.port();
            v.disk = format!("nbd:{server}:{port}:{export}");
            v.disk_export = export;
        }
        // Every boot into a role gets its own token (the same however often this boot fetches its
        // script): the agent of this boot, and only it, speaks for the node.
        if state.policy.is_some() {
            let token = self.script_token(mac, role.map(|r| &r.slot), now);
            v.agent = format!("corral.api={base_url} corral.token={token}");
        }
        // The slot's NBD key, for clients that speak TLS-PSK (qemu, libnbd); the kernel's nbd-client
        // cannot, which is why `optional` still serves plain connections.
        if !v.disk.is_empty() && state.config.nbd.tls != crate::config::NbdTls::Off {
            if let Some(p) = self.slot_psk(&v.cluster, &v.slot) {
                v.nbd_psk = format!("corral.nbd_psk={}", p.psk_line());
            }
        }
        // The policy check makes sure a sanboot image's cluster has a disk and iSCSI is on.
        let san = (image.spec.kind == ImageKind::Sanboot).then(|| {
            let iscsi = &state.config.iscsi;
            SanPlan {
                root_path: format!(
                    "iscsi:{server}::{}::{}",
                    iscsi.listen.port(),
                    iscsi.target_iqn(&v.cluster, &v.slot)
                ),
                initiator_iqn: iscsi.initiator_iqn(&mac),
                chap: self.slot_chap(&v.cluster, &v.slot),
            }
        });
        v.base_url = base_url;
        v.server = server;
        (v, san)
    }
}

/// The node's hostname: its DHCP reservation's, else one derived from its MAC.
pub fn hostname_for(cfg: &crate::config::Config, mac: Mac) -> String {
    cfg.dhcp
        .reservation
        .iter()
        .find(|r| Mac::parse(&r.mac) == Some(mac))
        .and_then(|r| r.hostname.clone())
        .unwrap_or_else(|| format!("node-{}", mac.to_string().replace(':', "")))
}
