//! The agents' API (see `agent::proto`): heartbeats, orders (a long poll) and acks, each authenticated by
//! the token of the node's current boot, which the node's own script handed it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{json, query_value, read_body, text, Ctx, HttpBody};
use crate::agent::proto::{Ack, Heartbeat};

/// The boot token a request carries ("" without one).
pub(super) fn token(req: &Request<Incoming>) -> String {
    super::api::bearer(req).to_string()
}

fn unauthorized() -> Response<HttpBody> {
    text(
        StatusCode::UNAUTHORIZED,
        "unknown token, or the token of an earlier boot\n",
    )
}

/// `GET orders?wait=SECS`: the next order for this boot's node, waiting up to a minute for one.
pub(super) async fn orders(ctx: &Ctx, token: &str, query: &str) -> Response<HttpBody> {
    let Ok((_, waker)) = ctx.controller.agent_waiter(token) else {
        return unauthorized();
    };
    let wait = query_value(query, "wait")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(60);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    loop {
        // Registered before looking, so an order queued in between still wakes us.
        let notified = waker.notified();
        match ctx.controller.take_order(token) {
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

/// A POST's JSON body as `T`, or the response refusing it (too large, or not a `what`).
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    what: &str,
) -> Result<T, Response<HttpBody>> {
    let body = read_body(req).await?;
    serde_json::from_slice::<T>(&body)
        .map_err(|e| text(StatusCode::BAD_REQUEST, &format!("bad {what}: {e}\n")))
}

/// `POST heartbeat`: the node is alive, with its load; the reply says what corral expects of it.
pub(super) async fn heartbeat(ctx: &Ctx, req: Request<Incoming>) -> Response<HttpBody> {
    let token = token(&req);
    let hb = match json_body::<Heartbeat>(req, "heartbeat").await {
        Ok(h) => h,
        Err(refused) => return refused,
    };
    let now_ms = crate::controller::agents::unix_ms();
    match ctx.controller.agent_heartbeat(&token, hb, now_ms) {
        Ok(reply) => json(&reply),
        Err(_) => unauthorized(),
    }
}

/// `POST ack`: an order was carried out (or could not be).
pub(super) async fn ack(ctx: &Ctx, req: Request<Incoming>) -> Response<HttpBody> {
    let token = token(&req);
    let ack = match json_body::<Ack>(req, "ack").await {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    match ctx.controller.agent_ack(&token, ack) {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(_) => unauthorized(),
    }
}
