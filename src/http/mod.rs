//! HTTP: the iPXE entry script, each node's own script, boot files (kernels, initrds, iPXE binaries for UEFI
//! HTTP boot), the read-only API and metrics. hyper (HTTP/1.1) on tokio.
//!
//! Routes (the table, with each route's listener, methods and credential, is [`routes`]):
//! - `GET /boot.ipxe` — entry script; chains to `/boot/<mac>` with iPXE's facts in the query string.
//! - `GET /boot/<mac>?uuid=&serial=&manufacturer=&product=&buildarch=&platform=&memsize=` — the node's script
//!   (image, parked or error), and the node is recorded in the inventory.
//! - `GET|HEAD /images/<image>/<file>` — files of a catalog image.
//! - `GET|HEAD /ipxe/<file>` — files of the TFTP root (iPXE binaries for UEFI HTTP-boot clients).
//! - `GET /` — the dashboard (clusters, nodes, events; refreshes itself from the API).
//! - `GET /api/v1/nodes`, `/api/v1/clusters`, `/api/v1/events` — JSON. `POST /api/v1/metrics` — scale-rule
//!   samples (bearer token). `GET /metrics` — Prometheus text. `GET /healthz`.

mod agent;
mod api;
pub mod limits;
pub mod routes;
mod script;
mod stats;

pub use script::facts_from_query;
pub use stats::HttpStats;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

use crate::controller::Controller;
use crate::domain::Mac;
use crate::files;
use crate::metrics::Registry;
use routes::{Resolved, Route, Surface};

/// Every response body: whole buffers or streamed files.
pub type HttpBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

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
    let resolved = routes::resolve(&method, &path);
    // With an operator listener, each listener serves its own paths only: the boot network never reaches
    // the API, and operators' TLS listener serves no boot files.
    let elsewhere = resolved
        .spec()
        .filter(|s| ctx.split && s.surface != surface);
    let resp = if let Some(spec) = elsewhere {
        let where_ = match spec.surface {
            Surface::Operator => "the operator listener (api.listen)",
            Surface::Boot => "the boot listener (http.listen)",
        };
        text(
            StatusCode::NOT_FOUND,
            &format!("not found here: served on {where_}\n"),
        )
    } else {
        match resolved {
            Resolved::NotFound => text(StatusCode::NOT_FOUND, "not found\n"),
            Resolved::WrongMethod(spec) => {
                let mut r = text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{path} takes {} only\n", spec.allow()),
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(spec.allow()));
                r
            }
            Resolved::Route(spec, params) => match api::refuse(ctx, spec.access, &req) {
                Some(refused) => refused,
                None => dispatch(ctx, spec.route, &params, req, peer).await,
            },
        }
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

/// Runs the handler of a route the table let through (method and credential already checked).
async fn dispatch(
    ctx: &Ctx,
    route: Route,
    params: &matchit::Params<'_, '_>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<HttpBody> {
    // The path's parameters, as the table names them (still percent-encoded).
    let param = |k: &str| params.get(k).unwrap_or("");
    let (mac, image, file) = (param("mac"), param("image"), param("file"));
    let query = req.uri().query().unwrap_or("").to_string();
    let state = ctx.controller.state();
    match route {
        Route::Entry => typed(
            state
                .templates
                .entry
                .render(&[("base_url", &state.config.public_url())]),
            "text/plain; charset=utf-8",
        ),
        Route::NodeScript => match Mac::parse(mac) {
            Some(mac) => script::node_script(ctx, mac, &query, peer),
            None => text(
                StatusCode::BAD_REQUEST,
                &format!("`{mac}` is not a MAC address; expected /boot/aa-bb-cc-dd-ee-ff\n"),
            ),
        },
        Route::ImageFile => {
            let Some(img) = state.catalog.get(image) else {
                return text(
                    StatusCode::NOT_FOUND,
                    &format!("no image named `{image}`\n"),
                );
            };
            serve_file(ctx, &img.dir, file, &req).await
        }
        Route::IpxeFile => serve_file(ctx, &state.config.tftp.root, file, &req).await,
        Route::Health => text(StatusCode::OK, "ok\n"),
        Route::Dashboard => api::dashboard(),
        Route::Metrics => typed(
            ctx.metrics.get().map(|m| m.render()).unwrap_or_default(),
            "text/plain; version=0.0.4",
        ),
        Route::Nodes => api::nodes(ctx).await,
        Route::Clusters => json(&ctx.controller.clusters_view(crate::unix_now())),
        Route::Events => api::events(ctx, &query).await,
        Route::Samples => api::post_metrics(ctx, req).await,
        Route::Release => api::release_node(ctx, mac),
        Route::AgentOrders => agent::orders(ctx, &agent::token(&req), &query).await,
        Route::AgentHeartbeat => agent::heartbeat(ctx, req).await,
        Route::AgentAck => agent::ack(ctx, req).await,
        Route::AgentUnknown => text(
            StatusCode::NOT_FOUND,
            "agent API: POST heartbeat, GET orders?wait=SECS, POST ack\n",
        ),
    }
}

/// A file under `root` by its path as requested (percent-encoded; never outside `root`).
async fn serve_file(
    ctx: &Ctx,
    root: &std::path::Path,
    file: &str,
    req: &Request<Incoming>,
) -> Response<HttpBody> {
    let Some(full) = files::confine(root, &decode_path(file)) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    ctx.stats.files.inc();
    files::serve(&ctx.cache, full, req.method(), req.headers()).await
}

/// A path's `%XX` escapes decoded (`+` is a plus in a path, unlike in a query); invalid UTF-8 is
/// replaced, which then names no file.
pub fn decode_path(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The first value of `key` in a query string, decoded as a form (`+` is a space).
pub fn query_value(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// API request bodies (scale samples, heartbeats, acks) are small; a larger one is a mistake or an attack.
const MAX_BODY: usize = 64 * 1024;

/// A POST's whole body, or the 413 refusing it when it is over [`MAX_BODY`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<HttpBody>> {
    match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(text(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB\n")),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response<HttpBody> {
    typed(
        serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
        "application/json",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_decode() {
        assert_eq!(decode_path("a%2Fb"), "a/b");
        assert_eq!(decode_path("a+b%20c"), "a+b c");
        assert_eq!(decode_path("100%"), "100%");
        assert_eq!(decode_path("%zz%4"), "%zz%4");
        assert_eq!(query_value("limit=5&wait=9", "wait").as_deref(), Some("9"));
        assert_eq!(query_value("a=x+y%21", "a").as_deref(), Some("x y!"));
        assert_eq!(query_value("a", "a").as_deref(), Some(""));
        assert_eq!(query_value("b=1", "a"), None);
    }
}
