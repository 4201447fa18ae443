//! The admin listener: metrics, health and readiness, and the admin API (sessions, purge,
//! explain, reload).
//!
//! `/metrics`, `/healthz` and `/readyz` are open (scrapers and orchestrators call them). Every
//! other endpoint needs `Authorization: Bearer <admin token>` from `[admin] token_env`, compared
//! in constant time, refused after repeated failures from one address, and refused outright
//! when no admin token is configured. It must never be reachable through the proxy listener,
//! and it never returns a session token.

pub mod explain;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::auth::valid_subject;
use crate::body::{ProxyBody, full};
use crate::cache::key;
use crate::proxy::error::{json_error, json_response};
use crate::purge::{Purged, Trigger};

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Failed admin token attempts allowed per client address in a burst, and how fast the
/// allowance comes back.
const FAILURE_BURST: f64 = 10.0;
const FAILURE_REFILL_PER_S: f64 = 0.2;

/// Rate limit of failed admin authentications, per client address: a token guesser gets
/// 429 after a burst, before its guess is even compared.
pub struct Limiter {
    buckets: moka::sync::Cache<IpAddr, (f64, Instant)>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            buckets: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }
}

impl Limiter {
    /// The allowance left to `ip` now.
    fn left(&self, ip: IpAddr) -> f64 {
        match self.buckets.get(&ip) {
            None => FAILURE_BURST,
            Some((tokens, at)) => {
                (tokens + at.elapsed().as_secs_f64() * FAILURE_REFILL_PER_S).min(FAILURE_BURST)
            }
        }
    }

    fn limited(&self, ip: IpAddr) -> bool {
        self.left(ip) < 1.0
    }

    fn failed(&self, ip: IpAddr) {
        let left = (self.left(ip) - 1.0).max(0.0);
        self.buckets.insert(ip, (left, Instant::now()));
    }
}

/// Serve one admin request.
pub async fn handle(
    app: Arc<App>,
    limiter: &Limiter,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            app.cache.observe();
            let mut resp = text(StatusCode::OK, app.metrics.render());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return resp;
        }
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            return match app.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            };
        }
        _ => {}
    }
    if limiter.limited(peer.ip()) {
        app.metrics.admin_auth_failures.inc();
        let mut resp = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            "too many failed admin token attempts from this address; retry later",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    }
    if let Some(refused) = refuse_unauthorized(&app, &req) {
        if refused.status() == StatusCode::UNAUTHORIZED {
            app.metrics.admin_auth_failures.inc();
            limiter.failed(peer.ip());
        }
        return refused;
    }
    if let Some(sub) = path.strip_prefix("/sessions/") {
        return sessions(&app, req.method(), sub).await;
    }
    if path == "/explain" {
        return explain(&app, req.uri().query().unwrap_or("")).await;
    }
    if path == "/reload" {
        if req.method() != Method::POST {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST",
            );
        }
        return reload(&app).await;
    }
    if path == "/purge" {
        if req.method() != Method::POST {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST",
            );
        }
        return purge(&app, req).await;
    }
    json_error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
}

/// The admin token check: the refusal to send, if any. Refuses everything when no token is
/// configured.
fn refuse_unauthorized(app: &App, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    let live = app.live();
    let Some(expected) = live.config.admin.token.as_deref() else {
        return Some(json_error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin API is disabled: set [admin] token_env",
        ));
    };
    // Exactly one Authorization field: with two, which one counts depends on who reads.
    let mut fields = req.headers().get_all(header::AUTHORIZATION).iter();
    let presented = fields
        .next()
        .filter(|_| fields.next().is_none())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match presented {
        Some(t) if bool::from(t.as_bytes().ct_eq(expected.as_bytes())) => None,
        _ => {
            let mut resp = json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid admin token is required",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cachegate-admin\""),
            );
            Some(resp)
        }
    }
}

/// `GET /explain?method=GET&url=/user/42&host=api.example.com[&sub=42]`: which rule
/// matched, the key parts, the cacheability decision and why, and what is stored.
async fn explain(app: &App, query: &str) -> Response<ProxyBody> {
    let mut method = "GET".to_string();
    let mut url = None;
    let mut host = None;
    let mut sub = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(v) = crate::normalize::percent_decode(&v.replace('+', " ")) else {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "malformed percent-escape",
            );
        };
        match k {
            "method" => method = v,
            "url" => url = Some(v),
            "host" => host = Some(v),
            "sub" => sub = Some(v),
            _ => {}
        }
    }
    let Some(url) = url else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "url is required, e.g. /explain?method=GET&url=/user/42&host=api.example.com",
        );
    };
    let report = explain::explain(
        app,
        explain::Query {
            method: &method,
            url: &url,
            host: host.as_deref(),
            sub: sub.as_deref(),
        },
    )
    .await;
    json_response(StatusCode::OK, &report)
}

/// `POST /reload`: read the config file again; 200 with what changed, or 400 with every
/// problem in the file (the running configuration stays).
async fn reload(app: &App) -> Response<ProxyBody> {
    match app.reload().await {
        Ok(r) => json_response(
            StatusCode::OK,
            &serde_json::json!({
                "reloaded": true,
                "rules": r.rules,
                "restart_needed": r.restart_needed,
            }),
        ),
        Err(e) => json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({
                "error": "invalid_config",
                "detail": "the file was not loaded; the running configuration stays",
                "problems": e.lines(),
            }),
        ),
    }
}

/// The largest purge request body accepted.
const MAX_PURGE_BODY: usize = 64 << 10;
/// The most tags and paths one purge request may name.
const MAX_PURGE_ITEMS: usize = 1000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// `POST /purge` with `{"tags": [...]}`, `{"paths": [...]}` or `{"all": true}`:
/// one bump per tag (a path means its implicit tag, i.e. all its variants).
async fn purge(app: &App, req: Request<Incoming>) -> Response<ProxyBody> {
    let bad = |detail: &str| json_error(StatusCode::BAD_REQUEST, "bad_request", detail);
    let body = match crate::body::collect_limited(req.into_body(), MAX_PURGE_BODY).await {
        Ok(Some(b)) => b,
        Ok(None) => return bad("the body is larger than 64 KiB"),
        Err(_) => return bad("the body could not be read"),
    };
    let parsed: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return bad(&format!(
                "expected {{\"tags\": [...]}} or {{\"paths\": [...]}}: {e}"
            ));
        }
    };
    if parsed.tags.is_empty() && parsed.paths.is_empty() && !parsed.all {
        return bad("name at least one tag or path (or \"all\": true)");
    }
    if parsed.tags.len() + parsed.paths.len() > MAX_PURGE_ITEMS {
        return bad("at most 1000 tags and paths per request");
    }
    let mut ids = Vec::with_capacity(parsed.tags.len() + parsed.paths.len() + 1);
    for tag in &parsed.tags {
        if tag.is_empty()
            || tag.len() > 1024
            || tag.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return bad("a tag must be 1 to 1024 characters without spaces or control characters");
        }
        ids.push(key::tag_id(tag));
    }
    for p in &parsed.paths {
        match crate::normalize::canonical_path(p) {
            Ok(canonical) => ids.push(key::path_tag(&canonical)),
            Err(e) => return bad(&format!("path {p:?}: {e}")),
        }
    }
    if parsed.all {
        ids.push(key::global_tag());
    }
    ids.sort_by_key(|id| id.0);
    ids.dedup();
    let live = app.live();
    let outcome = app
        .purger
        .purge(&ids, Trigger::Admin, live.rule_metrics(None))
        .await;
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "bumped": ids.len(),
            "queued": outcome == Purged::Queued,
        }),
    )
}

/// `GET /sessions/{sub}` (exists + TTL, never the token) and `DELETE /sessions/{sub}`
/// (force logout: delete the key and drop the subject's cached entries).
async fn sessions(app: &App, method: &Method, raw_sub: &str) -> Response<ProxyBody> {
    let Some(sub) = crate::normalize::percent_decode(raw_sub).filter(|s| valid_subject(s)) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_subject",
            "the subject must be 1-256 visible ASCII characters",
        );
    };
    let live = app.live();
    let gate = &live.config.auth.gate;
    let Some(session_key) = gate.template.render_subject(&gate.subject_claim, &sub) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "unsupported",
            "auth.session_key names claims besides the subject; sessions cannot be addressed by subject alone",
        );
    };
    match *method {
        Method::GET => match app.sessions.ttl(&session_key).await {
            Ok(ttl) => json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "sub": sub,
                    "exists": ttl.is_some(),
                    "ttl_seconds": ttl.flatten().map(|d| d.as_secs()),
                }),
            ),
            Err(e) => json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                &e.to_string(),
            ),
        },
        Method::DELETE => {
            let deleted = match app.sessions.delete(&session_key).await {
                Ok(d) => d,
                Err(e) => {
                    return json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        &e.to_string(),
                    );
                }
            };
            app.purger
                .purge(
                    &[key::subject_tag(&sub)],
                    Trigger::Logout,
                    live.rule_metrics(None),
                )
                .await;
            json_response(
                StatusCode::OK,
                &serde_json::json!({ "sub": sub, "deleted": deleted }),
            )
        }
        _ => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET or DELETE",
        ),
    }
}
