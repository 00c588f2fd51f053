//! HTTP: the iPXE entry script, each node's own script, boot files (kernels, initrds, iPXE binaries for UEFI
//! HTTP boot), the read-only API and metrics. hyper (HTTP/1.1) on tokio.
//!
//! Routes:
//! - `GET /boot.ipxe` — entry script; chains to `/boot/<mac>` with iPXE's facts in the query string.
//! - `GET /boot/<mac>?uuid=&serial=&manufacturer=&product=&buildarch=&platform=&memsize=` — the node's script
//!   (image, parked or error), and the node is recorded in the inventory.
//! - `GET|HEAD /images/<image>/<file>` — files of a catalog image.
//! - `GET|HEAD /ipxe/<file>` — files of the TFTP root (iPXE binaries for UEFI HTTP-boot clients).
//! - `GET /` — the dashboard (clusters, nodes, events; refreshes itself from the API).
//! - `GET /api/v1/nodes`, `/api/v1/clusters`, `/api/v1/events` — JSON. `POST /api/v1/metrics` — scale-rule
//!   samples (bearer token). `GET /metrics` — Prometheus text. `GET /healthz`.

pub mod limits;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

use crate::boot::{self, NodeVars};
use crate::controller::{BootDecision, Controller};
use crate::domain::{Mac, NodeFacts};
use crate::files;
use crate::metrics::{write_counter, Counter, Registry, Report};

/// The operator dashboard: one static page that reads the API.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Every response body: whole buffers or streamed files.
pub type HttpBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Request counters.
#[derive(Default)]
pub struct HttpStats {
    pub requests: Counter,
    pub scripts: Counter,
    pub files: Counter,
    pub not_found: Counter,
    pub bad_requests: Counter,
    pub unauthorized: Counter,
    /// Connections closed at once: `max_connections` reached.
    pub refused_full: Counter,
    /// Connections closed at once: `max_connections_per_peer` reached.
    pub refused_per_peer: Counter,
    /// Connections closed for a request head (or first request) that did not arrive in `header_timeout`.
    pub header_timeouts: Counter,
    /// Connections closed after `idle_timeout` with nothing happening.
    pub idle_closed: Counter,
    /// Connections open now, from both listeners.
    pub open: std::sync::OnceLock<[Arc<crate::conn::Gate>; 2]>,
}

impl Report for HttpStats {
    fn report(&self, out: &mut String) {
        write_counter(
            out,
            "corral_http_requests_total",
            "HTTP requests received",
            self.requests.get(),
        );
        write_counter(
            out,
            "corral_http_node_scripts_total",
            "Per-node iPXE scripts served",
            self.scripts.get(),
        );
        write_counter(
            out,
            "corral_http_files_total",
            "Boot file responses",
            self.files.get(),
        );
        write_counter(
            out,
            "corral_http_not_found_total",
            "Responses 404",
            self.not_found.get(),
        );
        write_counter(
            out,
            "corral_http_bad_requests_total",
            "Responses 400",
            self.bad_requests.get(),
        );
        write_counter(
            out,
            "corral_http_unauthorized_total",
            "API requests refused for a missing or wrong bearer token",
            self.unauthorized.get(),
        );
        out.push_str(
            "# HELP corral_http_refused_busy_total HTTP connections closed at once because a cap was reached\n# TYPE corral_http_refused_busy_total counter\n",
        );
        for (reason, v) in [
            ("max_connections", &self.refused_full),
            ("max_connections_per_peer", &self.refused_per_peer),
        ] {
            out.push_str(&format!(
                "corral_http_refused_busy_total{{reason=\"{reason}\"}} {}\n",
                v.get()
            ));
        }
        write_counter(
            out,
            "corral_http_header_timeouts_total",
            "HTTP connections closed for a request head not sent within header_timeout",
            self.header_timeouts.get(),
        );
        write_counter(
            out,
            "corral_http_idle_closed_total",
            "HTTP connections closed after idle_timeout with no request or no byte moving",
            self.idle_closed.get(),
        );
        if let Some(gates) = self.open.get() {
            crate::metrics::write_gauge(
                out,
                "corral_http_connections_open",
                "HTTP connections open now (boot and operator listeners)",
                gates.iter().map(|g| g.open() as u64).sum(),
            );
        }
    }
}

struct Ctx {
    controller: Arc<Controller>,
    cache: files::FileCache,
    stats: Arc<HttpStats>,
    metrics: std::sync::OnceLock<Registry>,
    /// An operator listener exists: the API, dashboard and metrics are served there only.
    split: bool,
    /// Connection caps of the boot listeners (shared by all their workers) and of the operator listener.
    boot_gate: Arc<crate::conn::Gate>,
    operator_gate: Arc<crate::conn::Gate>,
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Surface {
    /// `[http]`: firmware, nodes, agents (and operators too when there is no operator listener).
    Boot,
    /// `[api]`: operators only.
    Operator,
}

/// Paths for operators (the API but the agents' part, the dashboard, metrics), as opposed to the boot path.
fn operator_path(path: &str) -> bool {
    matches!(path, "/" | "/dashboard" | "/metrics")
        || (path.starts_with("/api/") && !path.starts_with("/api/v1/agent/"))
}

/// The bound HTTP server: one listener per worker thread.
///
/// Each worker is an OS thread with its own single-threaded runtime and its own `SO_REUSEPORT` listener (the
/// kernel spreads connections across them), so a request is parsed, decided and answered on one thread with
/// no cross-thread wake-ups — the same shape as nginx's worker processes. That was worth about a fifth of the
/// per-node script rate over tokio's work-stealing runtime on two cores.
pub struct HttpServer {
    listeners: Vec<std::net::TcpListener>,
    /// The operator listener and, for HTTPS, its TLS configuration.
    operator: Option<(std::net::TcpListener, Option<Arc<rustls::ServerConfig>>)>,
    ctx: Arc<Ctx>,
}

/// The operator listener's TLS configuration from PEM files (certificate chain, private key).
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("{}: no private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Bytes of boot files kept in memory.
const CACHE_BUDGET: u64 = 1 << 30;

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

impl HttpServer {
    /// Binds `workers` listeners on `addr` (port 0 picks one port for all).
    pub async fn bind(
        addr: SocketAddr,
        controller: Arc<Controller>,
        workers: usize,
    ) -> anyhow::Result<HttpServer> {
        let err = |e| anyhow::anyhow!("cannot listen on http {addr}: {e}");
        let first = reuseport_listener(addr).map_err(err)?;
        let actual = first.local_addr().map_err(err)?;
        let mut listeners = vec![first];
        for _ in 1..workers.max(1) {
            listeners.push(reuseport_listener(actual).map_err(err)?);
        }
        let cfg = controller.state().config.clone();
        let operator = match cfg.api.listen {
            None => None,
            Some(a) => {
                let l = reuseport_listener(a)
                    .map_err(|e| anyhow::anyhow!("cannot listen on api {a}: {e}"))?;
                let tls = match (&cfg.api.tls_cert, &cfg.api.tls_key) {
                    (Some(c), Some(k)) => Some(tls_config(c, k)?),
                    _ => None,
                };
                Some((l, tls))
            }
        };
        let caps = crate::conn::Caps {
            total: cfg.http.max_connections,
            per_peer: cfg.http.max_connections_per_peer,
        };
        let (boot_gate, operator_gate) =
            (crate::conn::Gate::new(caps), crate::conn::Gate::new(caps));
        let stats = Arc::new(HttpStats::default());
        let _ = stats.open.set([boot_gate.clone(), operator_gate.clone()]);
        let ctx = Ctx {
            controller,
            cache: files::FileCache::new(CACHE_BUDGET),
            stats,
            metrics: Default::default(),
            split: operator.is_some(),
            boot_gate,
            operator_gate,
        };
        Ok(HttpServer {
            listeners,
            operator,
            ctx: Arc::new(ctx),
        })
    }

    /// The operator listener's address, when there is one.
    pub fn operator_addr(&self) -> Option<SocketAddr> {
        self.operator
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0]
            .local_addr()
            .expect("bound socket has an address")
    }

    pub fn stats(&self) -> Arc<HttpStats> {
        self.ctx.stats.clone()
    }

    /// Serves until the task is dropped (or a worker dies, which is returned as an error). `metrics` is the
    /// registry `/metrics` renders.
    pub async fn run(
        self,
        metrics: Registry,
        liveness: crate::liveness::Liveness,
    ) -> anyhow::Result<()> {
        let _ = self.ctx.metrics.set(metrics);
        let (dead_tx, mut dead_rx) = tokio::sync::mpsc::channel::<String>(1);
        let boot = self
            .listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| (format!("http-{i}"), l, Surface::Boot, None));
        let operator = self
            .operator
            .into_iter()
            .map(|(l, tls)| ("http-api".to_string(), l, Surface::Operator, tls));
        for (name, listener, surface, tls) in boot.chain(operator) {
            let ctx = self.ctx.clone();
            let dead = dead_tx.clone();
            let thread = name.clone();
            let beat = liveness.register(&name, crate::liveness::now_ms());
            std::thread::Builder::new().name(thread).spawn(move || {
                let outcome = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|rt| {
                        // The worker's runtime beats while it runs its tasks: a request that blocks the
                        // thread stops the beats (and systemd's watchdog pings).
                        rt.spawn(async move {
                            loop {
                                beat.beat(crate::liveness::now_ms());
                                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                            }
                        });
                        rt.block_on(serve_worker(ctx, listener, surface, tls))
                            .map_err(|e| e.to_string())
                    });
                let _ = dead.blocking_send(format!("{name} stopped: {outcome:?}"));
            })?;
        }
        drop(dead_tx);
        let why = dead_rx
            .recv()
            .await
            .unwrap_or_else(|| "http workers stopped".into());
        Err(anyhow::anyhow!(why))
    }
}

async fn serve_worker(
    ctx: Arc<Ctx>,
    listener: std::net::TcpListener,
    surface: Surface,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    // Operators have a gate of their own: a flood on the boot network cannot lock them out.
    let gate = match surface {
        Surface::Boot => ctx.boot_gate.clone(),
        Surface::Operator => ctx.operator_gate.clone(),
    };
    let timeouts = limits::Timeouts::from_config(&ctx.controller.state().config.http);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: keep serving the connections we have.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Bounded before a byte is read: one beyond a cap is closed at once, without a task.
        let ticket = match gate.enter(peer.ip()) {
            Ok(t) => t,
            Err(busy) => {
                match busy {
                    crate::conn::Busy::Full => ctx.stats.refused_full.inc(),
                    crate::conn::Busy::PeerFull => ctx.stats.refused_per_peer.inc(),
                }
                tracing::debug!(%peer, ?busy, "http connection refused");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        tokio::task::spawn(async move {
            let _ticket = ticket;
            let watch = limits::Watch::new(timeouts, std::time::Instant::now());
            let c = ctx.clone();
            let w = watch.clone();
            let svc = service_fn(move |req| {
                let ctx = c.clone();
                let w = w.clone();
                w.request();
                async move {
                    let resp = handle(&ctx, req, peer, surface).await;
                    Ok::<_, std::convert::Infallible>(resp.map(|b| limits::Tracked::new(b, w)))
                }
            });
            let io = limits::Watched::new(stream, watch.clone());
            let serve = async {
                match tls {
                    None => {
                        http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(io), svc)
                            .await
                    }
                    Some(acceptor) => match acceptor.accept(io).await {
                        // The handshake counts as the first request's head: the watch bounds it.
                        Ok(s) => {
                            http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(TokioIo::new(s), svc)
                                .await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "tls handshake failed");
                            Ok(())
                        }
                    },
                }
            };
            tokio::select! {
                served = serve => {
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "http connection ended with an error");
                    }
                }
                why = watch.expiry() => {
                    match why {
                        limits::Expiry::Header => ctx.stats.header_timeouts.inc(),
                        limits::Expiry::Idle => ctx.stats.idle_closed.inc(),
                    }
                    tracing::debug!(%peer, ?why, "http connection closed by its timeout");
                }
            }
        });
    }
}

pub(crate) fn empty() -> HttpBody {
    Full::new(Bytes::new()).map_err(|n| match n {}).boxed()
}

pub(crate) fn text(status: StatusCode, body: &str) -> Response<HttpBody> {
    let mut r = Response::new(
        Full::new(Bytes::copy_from_slice(body.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn typed(body: String, content_type: &'static str) -> Response<HttpBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Scripts are decisions of the moment: never cached.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn handle(
    ctx: &Ctx,
    req: Request<Incoming>,
    peer: SocketAddr,
    surface: Surface,
) -> Response<HttpBody> {
    ctx.stats.requests.inc();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let operator = operator_path(&path);
    // With an operator listener, each listener serves its own paths only: the boot network never reaches
    // the API, and operators' TLS listener serves no boot files.
    if ctx.split && operator != (surface == Surface::Operator) {
        ctx.stats.not_found.inc();
        let where_ = if operator {
            "the operator listener (api.listen)"
        } else {
            "the boot listener (http.listen)"
        };
        return text(
            StatusCode::NOT_FOUND,
            &format!("not found here: served on {where_}\n"),
        );
    }
    if operator
        && (method == Method::GET || method == Method::HEAD)
        && path != "/"
        && path != "/dashboard"
    {
        if let Some(refused) = refuse_reader(ctx, &req) {
            return refused;
        }
    }
    let release = path
        .strip_prefix("/api/v1/nodes/")
        .and_then(|r| r.strip_suffix("/release"))
        .map(str::to_string);
    let resp = if method == Method::POST && path == "/api/v1/metrics" {
        post_metrics(ctx, req).await
    } else if let (true, Some(mac)) = (method == Method::POST, release) {
        release_node(ctx, &req, &mac)
    } else if let Some(what) = path.strip_prefix("/api/v1/agent/") {
        agent_api(ctx, &method, what, &query, req).await
    } else {
        route(ctx, &method, &path, &query, &req, peer).await
    };
    match resp.status() {
        StatusCode::NOT_FOUND => ctx.stats.not_found.inc(),
        StatusCode::BAD_REQUEST => ctx.stats.bad_requests.inc(),
        _ => {}
    }
    if resp.status().is_client_error() || resp.status().is_server_error() {
        // debug, not info: a hostile host would otherwise write the log full.
        tracing::debug!(%peer, %method, %path, status = resp.status().as_u16(), "http request refused");
    }
    resp
}

async fn route(
    ctx: &Ctx,
    method: &Method,
    path: &str,
    query: &str,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Response<HttpBody> {
    let is_get = method == Method::GET || method == Method::HEAD;
    if !is_get {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here (and POST /api/v1/metrics)\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let state = ctx.controller.state();
    let base_url = state.config.public_url();
    if path == "/boot.ipxe" {
        return typed(
            state.templates.entry.render(&[("base_url", &base_url)]),
            "text/plain; charset=utf-8",
        );
    }
    if let Some(mac) = path.strip_prefix("/boot/") {
        let Some(mac) = Mac::parse(mac) else {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("`{mac}` is not a MAC address; expected /boot/aa-bb-cc-dd-ee-ff\n"),
            );
        };
        return node_script(ctx, mac, query, peer);
    }
    if let Some(rest) = path.strip_prefix("/images/") {
        let Some((name, file)) = rest.split_once('/') else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        let Some(image) = state.catalog.get(name) else {
            return text(StatusCode::NOT_FOUND, &format!("no image named `{name}`\n"));
        };
        let Some(full) = files::confine(&image.dir, &percent_decode(file)) else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        ctx.stats.files.inc();
        return files::serve(&ctx.cache, full, method, req.headers()).await;
    }
    if let Some(file) = path.strip_prefix("/ipxe/") {
        let Some(full) = files::confine(&state.config.tftp.root, &percent_decode(file)) else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        ctx.stats.files.inc();
        return files::serve(&ctx.cache, full, method, req.headers()).await;
    }
    match path {
        "/" | "/dashboard" => {
            let mut r = typed(DASHBOARD.to_string(), "text/html; charset=utf-8");
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/metrics" => typed(
            ctx.metrics.get().map(|m| m.render()).unwrap_or_default(),
            "text/plain; version=0.0.4",
        ),
        "/api/v1/nodes" => {
            let ctl = ctx.controller.clone();
            match tokio::task::spawn_blocking(move || ctl.nodes_view()).await {
                Ok(Ok(nodes)) => json(&nodes),
                _ => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot read the inventory\n",
                ),
            }
        }
        "/api/v1/clusters" => json(&ctx.controller.clusters_view(crate::unix_now())),
        "/api/v1/events" => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100u32)
                .min(10_000);
            let store = ctx.controller.store().clone();
            match tokio::task::spawn_blocking(move || store.events(limit)).await {
                Ok(Ok(events)) => json(&events),
                _ => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read events\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The agents' API (see `agent::proto`): heartbeats, orders (a long poll) and acks, each authenticated by
/// the token of the node's current boot.
async fn agent_api(
    ctx: &Ctx,
    method: &Method,
    what: &str,
    query: &str,
    req: Request<Incoming>,
) -> Response<HttpBody> {
    use crate::agent::proto::{Ack, Heartbeat};
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    let unauthorized = || {
        text(
            StatusCode::UNAUTHORIZED,
            "unknown token, or the token of an earlier boot\n",
        )
    };
    match (method.clone(), what) {
        (Method::GET, "orders") => {
            let Ok((_, waker)) = ctx.controller.agent_waiter(&token) else {
                return unauthorized();
            };
            let wait = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("wait="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .min(60);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
            loop {
                // Registered before looking, so an order queued in between still wakes us.
                let notified = waker.notified();
                match ctx.controller.take_order(&token) {
                    Ok(Some(order)) => return json(&order),
                    Ok(None) => {}
                    // The node booted again meanwhile: this request belongs to a dead boot.
                    Err(_) => return unauthorized(),
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
                        .unwrap_or_else(|_| text(StatusCode::NO_CONTENT, ""));
                }
            }
        }
        (Method::POST, "heartbeat") | (Method::POST, "ack") => {
            let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB\n"),
            };
            let now_ms = crate::controller::agents::unix_ms();
            if what == "heartbeat" {
                let hb = match serde_json::from_slice::<Heartbeat>(&body) {
                    Ok(h) => h,
                    Err(e) => {
                        return text(StatusCode::BAD_REQUEST, &format!("bad heartbeat: {e}\n"))
                    }
                };
                match ctx.controller.agent_heartbeat(&token, hb, now_ms) {
                    Ok(reply) => json(&reply),
                    Err(_) => unauthorized(),
                }
            } else {
                let ack = match serde_json::from_slice::<Ack>(&body) {
                    Ok(a) => a,
                    Err(e) => return text(StatusCode::BAD_REQUEST, &format!("bad ack: {e}\n")),
                };
                match ctx.controller.agent_ack(&token, ack) {
                    Ok(()) => text(StatusCode::OK, "ok\n"),
                    Err(_) => unauthorized(),
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "agent API: POST heartbeat, GET orders?wait=SECS, POST ack\n",
        ),
    }
}

/// The bearer token a request carries ("" without one).
fn bearer(req: &Request<Incoming>) -> &str {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
}

/// Writes need the admin token (`Authorization: Bearer ...`); without one configured they are disabled.
/// Compared in constant time.
fn refuse_writer(ctx: &Ctx, req: &Request<Incoming>) -> Option<Response<HttpBody>> {
    let state = ctx.controller.state();
    let Some(token) = state.config.tokens.admin.as_deref() else {
        return Some(text(
            StatusCode::FORBIDDEN,
            "writes are disabled: set an admin token (http.admin_token_file)\n",
        ));
    };
    if crate::controller::trust::same_secret(bearer(req), token) {
        return None;
    }
    ctx.stats.unauthorized.inc();
    Some(text(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token\n",
    ))
}

/// With a read token configured, reads need it (or the admin token); without one they are open.
fn refuse_reader(ctx: &Ctx, req: &Request<Incoming>) -> Option<Response<HttpBody>> {
    let state = ctx.controller.state();
    let t = &state.config.tokens;
    let read = t.read.as_deref()?;
    let got = bearer(req);
    let admin_ok = t
        .admin
        .as_deref()
        .is_some_and(|a| crate::controller::trust::same_secret(got, a));
    if crate::controller::trust::same_secret(got, read) || admin_ok {
        return None;
    }
    ctx.stats.unauthorized.inc();
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "this corral's API needs its read token: Authorization: Bearer <token>\n",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// `POST /api/v1/nodes/<mac>/release`: a quarantined or failed node goes back to the pool.
fn release_node(ctx: &Ctx, req: &Request<Incoming>, mac: &str) -> Response<HttpBody> {
    if let Some(refused) = refuse_writer(ctx, req) {
        return refused;
    }
    let Some(mac) = Mac::parse(mac) else {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("`{mac}` is not a MAC address\n"),
        );
    };
    match ctx.controller.release_node(mac) {
        Ok(msg) => text(StatusCode::OK, &format!("{msg}\n")),
        Err(e) => text(StatusCode::CONFLICT, &format!("{e}\n")),
    }
}

/// `POST /api/v1/metrics` with `{"cluster": "web", "metric": "rt_ms", "value": 640.0}` (or a list of such):
/// samples for the cluster's scale rules. Needs `Authorization: Bearer <http.api_token>`.
async fn post_metrics(ctx: &Ctx, req: Request<Incoming>) -> Response<HttpBody> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        cluster: String,
        metric: String,
        value: f64,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Body {
        One(Sample),
        Many(Vec<Sample>),
    }
    if let Some(refused) = refuse_writer(ctx, &req) {
        return refused;
    }
    // Samples are small; a larger body is a mistake or an attack.
    let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB\n"),
    };
    let samples = match serde_json::from_slice::<Body>(&body) {
        Ok(Body::One(s)) => vec![s],
        Ok(Body::Many(v)) => v,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"cluster\", \"metric\", \"value\"}}: {e}\n"),
            )
        }
    };
    let now = crate::unix_now();
    for s in &samples {
        if let Err(e) = ctx
            .controller
            .record_metric(&s.cluster, &s.metric, s.value, now)
        {
            return text(StatusCode::BAD_REQUEST, &format!("{e}\n"));
        }
    }
    text(
        StatusCode::OK,
        &format!("{} sample(s) recorded\n", samples.len()),
    )
}

fn json<T: serde::Serialize>(v: &T) -> Response<HttpBody> {
    typed(
        serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
        "application/json",
    )
}

/// The iPXE error script with `message`, as a refusal: 403, so iPXE does not run it and a tool sees it.
fn refused_script(
    state: &crate::controller::BootState,
    mac: Mac,
    message: &str,
) -> Response<HttpBody> {
    let msg = boot::ipxe_safe(message);
    let mut r = typed(
        state.templates.error.render(&[
            ("base_url", &state.config.public_url()),
            ("mac", &mac.to_string()),
            ("poll", &state.config.boot.park_poll.to_string()),
            ("message", &msg),
        ]),
        "text/plain; charset=utf-8",
    );
    *r.status_mut() = StatusCode::FORBIDDEN;
    r
}

/// A node's script. Only a request from the node's own address (as corral's DHCP knows it, see
/// `controller::trust`) gets a script that carries its secrets (agent token, CHAP) or changes anything
/// (discovery, facts, holds, move confirmations, a failed node's return); under a policy every other
/// request is refused (403), counted and logged with its peer. Without a policy a script carries no
/// secret unless its image says so, and is served to anyone, but only the node's own requests are
/// recorded.
fn node_script(ctx: &Ctx, mac: Mac, query: &str, peer: SocketAddr) -> Response<HttpBody> {
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
                let msg = boot::ipxe_safe(&format!(
                    "corral does not take this node in: {}",
                    why.as_str()
                ));
                return typed(
                    state.templates.error.render(&[
                        ("base_url", &state.config.public_url()),
                        ("mac", &mac.to_string()),
                        ("poll", &state.config.boot.park_poll.to_string()),
                        ("message", &msg),
                    ]),
                    "text/plain; charset=utf-8",
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
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        let v: String = v.chars().filter(|c| !c.is_control()).take(128).collect();
        if v.is_empty() {
            continue;
        }
        match k {
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

/// Decodes `%XX` escapes and `+` (iPXE's `uristring` escapes spaces as `%20`, forms use `+`).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

    #[test]
    fn percent_decoding_tolerates_garbage() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
