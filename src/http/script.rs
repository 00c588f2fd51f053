//! A node's own script: who may have it (the node itself, from the address corral's DHCP gave it), what
//! it records (discovery, facts), and the iPXE text for the controller's decision.

use hyper::{Response, StatusCode};
use std::net::SocketAddr;

use super::{typed, Ctx, HttpBody};
use crate::boot::{self, NodeVars};
use crate::controller::BootDecision;
use crate::domain::{Mac, NodeFacts};

/// The iPXE error script with `message`, as a refusal: 403, so iPXE does not run it and a tool sees it.
fn refused_script(
    state: &crate::controller::BootState,
    mac: Mac,
    message: &str,
) -> Response<HttpBody> {
    let mut r = error_script(state, mac, message);
    *r.status_mut() = StatusCode::FORBIDDEN;
    r
}

/// The iPXE error script showing `message`, which asks again after the park poll.
fn error_script(
    state: &crate::controller::BootState,
    mac: Mac,
    message: &str,
) -> Response<HttpBody> {
    let msg = boot::ipxe_safe(message);
    typed(
        state.templates.error.render(&[
            ("base_url", &state.config.public_url()),
            ("mac", &mac.to_string()),
            ("poll", &state.config.boot.park_poll.to_string()),
            ("message", &msg),
        ]),
        "text/plain; charset=utf-8",
    )
}

/// A node's script. Only a request from the node's own address (as corral's DHCP knows it, see
/// `controller::trust`) gets a script that carries its secrets (agent token, CHAP) or changes anything
/// (discovery, facts, holds, move confirmations, a failed node's return); under a policy every other
/// request is refused (403), counted and logged with its peer. Without a policy a script carries no
/// secret unless its image says so, and is served to anyone, but only the node's own requests are
/// recorded.
pub(super) fn node_script(
    ctx: &Ctx,
    mac: Mac,
    query: &str,
    peer: SocketAddr,
) -> Response<HttpBody> {
    let state = ctx.controller.state();
    let now = crate::unix_now();
    let from_node = ctx.controller.is_from_node(mac, peer.ip());
    if state.policy.is_some() && !from_node {
        ctx.controller
            .refuse_foreign(mac, peer.ip(), "a node script");
        return refused_script(
            &state,
            mac,
            "corral serves this node's script only to the node itself, from the address its DHCP knows it by",
        );
    }
    let facts = facts_from_query(query, peer);
    let slot = if state.policy.is_some() {
        if !ctx.controller.is_known(mac) {
            if let Err(why) = ctx.controller.may_discover(mac, peer.ip(), now) {
                // Not an attack on a node (the request is from its address), only a node corral will not
                // take in (yet): the error script asks again later, when it may be listed.
                return error_script(
                    &state,
                    mac,
                    &format!("corral does not take this node in: {}", why.as_str()),
                );
            }
        }
        // Discovery (and planning for a new node) happens here, so its first request gets its role.
        ctx.controller.node_seen(mac, facts.clone(), now);
        // Parked while the slot's disk is still held by the node it is taken from.
        ctx.controller.bootable_slot_of(mac)
    } else {
        None
    };
    let decision = state.decide(mac, &facts, now, slot.as_ref());
    if state.policy.is_none() {
        if let BootDecision::Image(image, _) = &decision {
            if image.spec.secret && !from_node {
                ctx.controller
                    .refuse_foreign(mac, peer.ip(), "a secret image's script");
                return refused_script(
                    &state,
                    mac,
                    "this image's script is served only to the node itself, from the address corral knows it by",
                );
            }
        }
        if from_node {
            ctx.controller.node_seen(mac, facts, now);
        }
    }
    ctx.stats.scripts.inc();
    let base_url = state.config.public_url();
    let mac_s = mac.to_string();
    let poll = state.config.boot.park_poll.to_string();
    let body = match &decision {
        BootDecision::Image(image, role) => {
            let server = state.config.server.address.to_string();
            let (hostname, cluster, slot, address) = match role {
                Some(r) => (
                    r.identity.hostname.clone(),
                    r.slot.cluster.clone(),
                    r.slot.slot.to_string(),
                    r.identity
                        .address
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                ),
                None => (
                    hostname_for(&state.config, mac),
                    String::new(),
                    String::new(),
                    String::new(),
                ),
            };
            let has_disk = role.as_ref().is_some_and(|r| {
                state
                    .policy
                    .as_ref()
                    .and_then(|p| p.cluster(&r.slot.cluster))
                    .is_some_and(|c| c.spec.disk.is_some())
            });
            let (disk, disk_export) = if has_disk && state.config.nbd.enabled {
                let export = format!("{cluster}/{slot}");
                let port = state.config.nbd.listen.port();
                (format!("nbd:{server}:{port}:{export}"), export)
            } else {
                (String::new(), String::new())
            };
            // Every boot into a role gets its own token (the same however often this boot fetches its
            // script): the agent of this boot, and only it, speaks for the node.
            let agent = if state.policy.is_some() {
                let token = ctx
                    .controller
                    .script_token(mac, role.as_ref().map(|r| &r.slot), now);
                format!("corral.api={base_url} corral.token={token}")
            } else {
                String::new()
            };
            // The slot's NBD key, for clients that speak TLS-PSK (qemu, libnbd); the kernel's nbd-client
            // cannot, which is why `optional` still serves plain connections.
            let nbd_psk = if !disk.is_empty() && state.config.nbd.tls != crate::config::NbdTls::Off
            {
                ctx.controller
                    .slot_psk(&cluster, &slot)
                    .map(|p| format!("corral.nbd_psk={}", p.psk_line()))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let v = NodeVars {
                agent: &agent,
                nbd_psk: &nbd_psk,
                base_url: &base_url,
                server: &server,
                mac: &mac_s,
                hostname: &hostname,
                cluster: &cluster,
                slot: &slot,
                address: &address,
                disk: &disk,
                disk_export: &disk_export,
            };
            tracing::debug!(%mac, image = %image.name, "node script: image");
            match image.spec.kind {
                boot::ImageKind::Kernel => boot::node_script(&state.templates, image, &v),
                // The policy check makes sure a sanboot image's cluster has a disk and iSCSI is on.
                boot::ImageKind::Sanboot => {
                    let iscsi = &state.config.iscsi;
                    let root_path = format!(
                        "iscsi:{server}::{}::{}",
                        iscsi.listen.port(),
                        iscsi.target_iqn(&cluster, &slot)
                    );
                    let chap = ctx.controller.slot_chap(&cluster, &slot);
                    let san = boot::SanVars {
                        root_path: &root_path,
                        initiator_iqn: &iscsi.initiator_iqn(&mac),
                        chap: chap.as_ref(),
                    };
                    boot::sanboot_script(&state.templates, image, &v, &san)
                }
            }
        }
        BootDecision::Park => {
            tracing::debug!(%mac, "node script: parked");
            // Parked for want of a role (not while waiting for its slot's disk to be freed).
            if ctx.controller.slot_of(mac).is_none() {
                ctx.controller
                    .move_input(mac, crate::controller::moves::Input::Parked);
            }
            state.templates.parked.render(&[
                ("base_url", &base_url),
                ("mac", &mac_s),
                ("poll", &poll),
            ])
        }
        BootDecision::Error(msg) => {
            tracing::warn!(%mac, reason = %msg, "node script: cannot boot");
            let msg = boot::ipxe_safe(msg);
            state.templates.error.render(&[
                ("base_url", &base_url),
                ("mac", &mac_s),
                ("poll", &poll),
                ("message", &msg),
            ])
        }
    };
    typed(body, "text/plain; charset=utf-8")
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

/// Reads iPXE's facts from the query string. Empty values (iPXE expands unknown settings to nothing) are
/// absent facts; overlong ones are cut so a hostile client cannot bloat the inventory.
pub fn facts_from_query(query: &str, peer: SocketAddr) -> NodeFacts {
    let mut f = NodeFacts {
        ip: Some(peer.ip().to_string()),
        ..Default::default()
    };
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let v: String = v.chars().filter(|c| !c.is_control()).take(128).collect();
        if v.is_empty() {
            continue;
        }
        match &*k {
            "uuid" => f.uuid = Some(v),
            "serial" => f.serial = Some(v),
            "manufacturer" => f.manufacturer = Some(v),
            "product" => f.product = Some(v),
            "buildarch" => f.buildarch = Some(v),
            "platform" => f.platform = Some(v),
            "memsize" => f.memsize = v.parse().ok(),
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_parse_and_sanitise() {
        let peer: SocketAddr = "10.0.0.9:1234".parse().unwrap();
        let f = facts_from_query(
            "uuid=abc&serial=S%201&memsize=512&platform=&buildarch=x86_64&junk=1",
            peer,
        );
        assert_eq!(f.uuid.as_deref(), Some("abc"));
        assert_eq!(f.serial.as_deref(), Some("S 1"));
        assert_eq!(f.memsize, Some(512));
        assert_eq!(f.platform, None);
        assert_eq!(f.buildarch.as_deref(), Some("x86_64"));
        assert_eq!(f.ip.as_deref(), Some("10.0.0.9"));
        let long = format!("serial={}", "x".repeat(1000));
        assert_eq!(facts_from_query(&long, peer).serial.unwrap().len(), 128);
    }
}
