//! The operator API's handlers (reads of the inventory, clusters and events; the writes: scale samples and
//! releasing a node) and the bearer-token checks the routing table asks for.

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::routes::Access;
use super::{json, query_value, read_body, text, typed, Ctx, HttpBody};
use crate::domain::Mac;

/// The operator dashboard: one static page that reads the API.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What a route's [`Access`] asks of the request: `None` lets it through, else the refusal.
pub(super) fn refuse(
    ctx: &Ctx,
    access: Access,
    req: &Request<Incoming>,
) -> Option<Response<HttpBody>> {
    match access {
        Access::Open | Access::Agent => None,
        Access::Read => refuse_reader(ctx, req),
        Access::Admin => refuse_writer(ctx, req),
    }
}

/// `GET /`: the dashboard page. It carries no data, so it needs no token; it asks for one to read the API.
pub(super) fn dashboard() -> Response<HttpBody> {
    let mut r = typed(DASHBOARD.to_string(), "text/html; charset=utf-8");
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /api/v1/nodes`: the inventory, read from the store on the blocking pool.
pub(super) async fn nodes(ctx: &Ctx) -> Response<HttpBody> {
    let ctl = ctx.controller.clone();
    match tokio::task::spawn_blocking(move || ctl.nodes_view()).await {
        Ok(Ok(nodes)) => json(&nodes),
        _ => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the inventory\n",
        ),
    }
}

/// `GET /api/v1/events?limit=N`: the newest events (100 by default, at most 10,000).
pub(super) async fn events(ctx: &Ctx, query: &str) -> Response<HttpBody> {
    let limit = query_value(query, "limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100u32)
        .min(10_000);
    let store = ctx.controller.store().clone();
    match tokio::task::spawn_blocking(move || store.events(limit)).await {
        Ok(Ok(events)) => json(&events),
        _ => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read events\n"),
    }
}

/// The bearer token a request carries ("" without one).
pub(super) fn bearer(req: &Request<Incoming>) -> &str {
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
pub(super) fn release_node(ctx: &Ctx, mac: &str) -> Response<HttpBody> {
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
pub(super) async fn post_metrics(ctx: &Ctx, req: Request<Incoming>) -> Response<HttpBody> {
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
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(refused) => return refused,
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
