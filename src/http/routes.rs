//! The routing table: every path corral serves over HTTP, with the listener that serves it, the methods it
//! takes and the credential it needs, in one place. The paths are matched by `matchit` (a radix tree built
//! once); what a request may do is decided here, sans-IO, before any handler runs, so the table is tested
//! route by route without a socket.

use hyper::Method;
use std::sync::OnceLock;

/// What a matched path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/boot.ipxe`: the entry script every iPXE chains to first.
    Entry,
    /// `/boot/{mac}`: a node's own script.
    NodeScript,
    /// `/images/{image}/{*file}`: a catalog image's files.
    ImageFile,
    /// `/ipxe/{*file}`: the TFTP root over HTTP (UEFI HTTP boot).
    IpxeFile,
    /// `/healthz`.
    Health,
    /// `/` and `/dashboard`.
    Dashboard,
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/api/v1/nodes`.
    Nodes,
    /// `/api/v1/clusters`.
    Clusters,
    /// `/api/v1/events?limit=`.
    Events,
    /// `POST /api/v1/metrics`: scale-rule samples.
    Samples,
    /// `POST /api/v1/nodes/{mac}/release`.
    Release,
    /// `POST /api/v1/agent/heartbeat`.
    AgentHeartbeat,
    /// `GET /api/v1/agent/orders?wait=`.
    AgentOrders,
    /// `POST /api/v1/agent/ack`.
    AgentAck,
    /// Anything else under `/api/v1/agent/`: a 404 that lists the agent API.
    AgentUnknown,
}

/// Which listener serves a route when there are two (`[api]` configured); with one, it serves all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `[http]`: firmware, nodes and agents (and operators too when there is no operator listener).
    Boot,
    /// `[api]`: operators only.
    Operator,
}

/// The credential a route needs before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: boot files and scripts (a script's secrets are guarded by who asks, see `controller::trust`).
    Open,
    /// The read token when one is configured (or the admin token).
    Read,
    /// The admin token; without one configured, writes are disabled.
    Admin,
    /// The token of a node's current boot, checked by the agent handlers themselves.
    Agent,
}

/// One row of the table.
#[derive(Debug)]
pub struct Spec {
    pub route: Route,
    pub surface: Surface,
    pub access: Access,
    /// GET also allows HEAD.
    pub methods: &'static [Method],
}

impl Spec {
    /// The `Allow` header for a 405 (every route takes either GET and HEAD, or POST).
    pub fn allow(&self) -> &'static str {
        if self.methods == POST {
            "POST"
        } else {
            "GET, HEAD"
        }
    }
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];

/// The table: path pattern and row. Static segments win over parameters in `matchit`, so
/// `/api/v1/agent/heartbeat` is matched before `/api/v1/agent/{*rest}`.
fn rows() -> Vec<(&'static str, Spec)> {
    use Access::*;
    use Route::*;
    use Surface::*;
    let row = |route, surface, access, methods: &'static [Method]| Spec {
        route,
        surface,
        access,
        methods,
    };
    vec![
        ("/boot.ipxe", row(Entry, Boot, Open, GET)),
        ("/boot/{mac}", row(NodeScript, Boot, Open, GET)),
        ("/images/{image}/{*file}", row(ImageFile, Boot, Open, GET)),
        ("/ipxe/{*file}", row(IpxeFile, Boot, Open, GET)),
        ("/healthz", row(Health, Boot, Open, GET)),
        ("/", row(Dashboard, Operator, Open, GET)),
        ("/dashboard", row(Dashboard, Operator, Open, GET)),
        ("/metrics", row(Metrics, Operator, Read, GET)),
        ("/api/v1/nodes", row(Nodes, Operator, Read, GET)),
        ("/api/v1/clusters", row(Clusters, Operator, Read, GET)),
        ("/api/v1/events", row(Events, Operator, Read, GET)),
        ("/api/v1/metrics", row(Samples, Operator, Admin, POST)),
        (
            "/api/v1/nodes/{mac}/release",
            row(Release, Operator, Admin, POST),
        ),
        (
            "/api/v1/agent/heartbeat",
            row(AgentHeartbeat, Boot, Agent, POST),
        ),
        ("/api/v1/agent/orders", row(AgentOrders, Boot, Agent, GET)),
        ("/api/v1/agent/ack", row(AgentAck, Boot, Agent, POST)),
        ("/api/v1/agent/{*rest}", row(AgentUnknown, Boot, Open, &[])),
    ]
}

fn router() -> &'static matchit::Router<Spec> {
    static ROUTER: OnceLock<matchit::Router<Spec>> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let mut r = matchit::Router::new();
        for (pattern, spec) in rows() {
            // The table is a constant: a pattern that does not insert is a bug caught by the tests.
            r.insert(pattern, spec)
                .unwrap_or_else(|e| panic!("route {pattern}: {e}"));
        }
        r
    })
}

/// Where a request goes, or why it goes nowhere.
#[derive(Debug)]
pub enum Resolved<'p> {
    /// A route that takes this method, with the path's parameters (still percent-encoded).
    Route(&'static Spec, matchit::Params<'static, 'p>),
    /// A known path, another method: 405 with `Allow`.
    WrongMethod(&'static Spec),
    /// No such path: 404.
    NotFound,
}

impl Resolved<'_> {
    /// The row matched, right method or not.
    pub fn spec(&self) -> Option<&'static Spec> {
        match self {
            Resolved::Route(s, _) | Resolved::WrongMethod(s) => Some(s),
            Resolved::NotFound => None,
        }
    }
}

/// Looks a request up in the table.
pub fn resolve<'p>(method: &Method, path: &'p str) -> Resolved<'p> {
    let Ok(m) = router().at(path) else {
        return Resolved::NotFound;
    };
    let spec = m.value;
    let head_as_get = *method == Method::HEAD && spec.methods.contains(&Method::GET);
    // The agent catch-all takes every method: its handler answers 404 with the API's shape.
    if spec.methods.is_empty() || spec.methods.contains(method) || head_as_get {
        Resolved::Route(spec, m.params)
    } else {
        Resolved::WrongMethod(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, path: &str) -> Option<Route> {
        match resolve(&method, path) {
            Resolved::Route(s, _) => Some(s.route),
            _ => None,
        }
    }

    #[test]
    fn every_row_is_reachable_by_its_own_pattern() {
        for (pattern, spec) in rows() {
            let path = pattern
                .replace("{mac}", "52-54-00-00-00-01")
                .replace("{image}", "testos")
                .replace("{*file}", "vmlinuz")
                .replace("{*rest}", "whatever");
            let method = spec.methods.first().cloned().unwrap_or(Method::GET);
            assert_eq!(route(method, &path), Some(spec.route), "{pattern}");
        }
    }

    #[test]
    fn parameters_and_methods() {
        match resolve(&Method::GET, "/images/testos/sub/dir/initrd.img") {
            Resolved::Route(s, p) => {
                assert_eq!(s.route, Route::ImageFile);
                assert_eq!(p.get("image"), Some("testos"));
                assert_eq!(p.get("file"), Some("sub/dir/initrd.img"));
            }
            other => panic!("{other:?}"),
        }
        match resolve(&Method::POST, "/api/v1/nodes/52:54:00:00:00:01/release") {
            Resolved::Route(s, p) => {
                assert_eq!((s.route, s.access), (Route::Release, Access::Admin));
                assert_eq!(p.get("mac"), Some("52:54:00:00:00:01"));
            }
            other => panic!("{other:?}"),
        }
        // HEAD is GET without a body.
        assert_eq!(route(Method::HEAD, "/ipxe/ipxe.efi"), Some(Route::IpxeFile));
        // A known path with another method: 405 with what it allows.
        match resolve(&Method::POST, "/images/testos/vmlinuz") {
            Resolved::WrongMethod(s) => assert_eq!(s.allow(), "GET, HEAD"),
            other => panic!("{other:?}"),
        }
        match resolve(&Method::GET, "/api/v1/metrics") {
            Resolved::WrongMethod(s) => assert_eq!(s.allow(), "POST"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            resolve(&Method::GET, "/api/v1/agent/orders"),
            Resolved::Route(s, _) if s.route == Route::AgentOrders
        ));
        assert_eq!(
            route(Method::DELETE, "/api/v1/agent/nope"),
            Some(Route::AgentUnknown)
        );
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for path in [
            "/nothing",
            "/boot/",
            "/images/testos",
            "/images/",
            "/ipxe/",
            "/api/v1",
            "/api/v1/nodes/aa/bb/release",
            "/api/v2/nodes",
            "",
        ] {
            assert!(
                matches!(resolve(&Method::GET, path), Resolved::NotFound),
                "{path:?}"
            );
        }
    }

    #[test]
    fn surfaces_and_access() {
        let spec = |m: Method, p: &str| resolve(&m, p).spec().unwrap();
        // The boot network's paths: firmware and agents need no operator credential.
        for p in [
            "/boot.ipxe",
            "/boot/x",
            "/images/a/b",
            "/ipxe/a",
            "/healthz",
        ] {
            let s = spec(Method::GET, p);
            assert_eq!((s.surface, s.access), (Surface::Boot, Access::Open), "{p}");
        }
        assert_eq!(
            spec(Method::POST, "/api/v1/agent/heartbeat").access,
            Access::Agent
        );
        // Every operator read needs the read token, but the dashboard page itself (it asks for one).
        for p in [
            "/metrics",
            "/api/v1/nodes",
            "/api/v1/clusters",
            "/api/v1/events",
        ] {
            let s = spec(Method::GET, p);
            assert_eq!(
                (s.surface, s.access),
                (Surface::Operator, Access::Read),
                "{p}"
            );
        }
        assert_eq!(spec(Method::GET, "/").access, Access::Open);
        assert_eq!(spec(Method::POST, "/api/v1/metrics").access, Access::Admin);
    }
}
