//! A node's own script: who may have it (the node itself, from the address corral's DHCP gave it), what
//! it records (discovery, facts), and the iPXE text for the controller's decision.

use hyper::{Response, StatusCode};
use std::net::SocketAddr;

use super::{typed, Ctx, HttpBody};
use crate::boot;
use crate::controller::boot_plan::BootPlan;
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

/// A node's script: the controller's [`BootPlan`] for this request, rendered with the templates of the
/// boot state it was decided under. Who may have it and what it carries are the controller's decision.
pub(super) fn node_script(
    ctx: &Ctx,
    mac: Mac,
    query: &str,
    peer: SocketAddr,
) -> Response<HttpBody> {
    let facts = facts_from_query(query, peer);
    let (state, plan) = ctx
        .controller
        .boot_plan(mac, facts, peer.ip(), crate::unix_now());
    let body = match &plan {
        BootPlan::Refused(why) => return refused_script(&state, mac, why),
        BootPlan::NotTaken(why) => return error_script(&state, mac, why),
        BootPlan::Boot { image, vars, san } => match san {
            Some(san) => {
                boot::sanboot_script(&state.templates, image, &vars.as_vars(), &san.as_vars())
            }
            None => boot::node_script(&state.templates, image, &vars.as_vars()),
        },
        BootPlan::Park => state.templates.parked.render(&[
            ("base_url", &state.config.public_url()),
            ("mac", &mac.to_string()),
            ("poll", &state.config.boot.park_poll.to_string()),
        ]),
        BootPlan::Error(why) => return counted(ctx, error_script(&state, mac, why)),
    };
    counted(ctx, typed(body, "text/plain; charset=utf-8"))
}

/// A script served (booting, parked or unable to boot: not refused, not turned away).
fn counted(ctx: &Ctx, r: Response<HttpBody>) -> Response<HttpBody> {
    ctx.stats.scripts.inc();
    r
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
