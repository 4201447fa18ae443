//! The request pipeline, top to bottom:
//!
//! ```text
//! classify (host, canonical path, rule, overrides, policy)   classify.rs
//!   -> claim the bearer                                       gate.rs
//!   -> GET/HEAD on a cache rule: lookup (the session check rides along) -> hit | stale | miss
//!        miss: coalesce -> fill (fetch what the key says, stream, store)   lookup.rs, fill.rs
//!   -> anything else: session check -> forward -> purge on a successful write   forward.rs
//!   -> respond: X-Cache, Cache-Status, metrics, one log line   respond.rs
//! ```
//!
//! Every phase returns a typed result; errors become responses exactly once, in `handle`.
//! Each request ends with one `Trace` (an `Outcome` and a `Reason`) that feeds the access
//! log line, the `cachegate_requests_total` outcome label and the `Cache-Status` header
//! alike. A request reads the live configuration once, at its start.

pub mod classify;
pub mod error;
pub mod fill;
pub mod forward;
pub mod gate;
pub mod headers;
pub mod lookup;
pub mod respond;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::app::{App, Live};
use crate::body::ProxyBody;
use crate::metrics::{RuleMetrics, UNMATCHED};
use crate::purge::{Purged, Trigger};
use crate::routing::Rule;
use error::ProxyError;
use gate::Identity;
use respond::{Fwd, Trace};

/// A response and what happened to make it.
pub struct Served {
    pub response: Response<ProxyBody>,
    pub trace: Trace,
}

impl Served {
    pub fn new(response: Response<ProxyBody>, trace: Trace) -> Served {
        Served { response, trace }
    }
}

/// One request's context: the application, the configuration snapshot it was routed with,
/// and its bookkeeping.
pub struct Cx {
    pub app: Arc<App>,
    pub live: Arc<Live>,
    /// The client's address (the peer of the connection).
    pub client: SocketAddr,
    /// The matched rule's position in `live`.
    pub rule: Option<usize>,
    pub upstream_ms: Option<f64>,
    /// Path and query sent upstream: the canonical path, so the upstream sees the resource
    /// that was routed and keyed, never another spelling of it.
    pub target: String,
    /// The Host a client's request is forwarded with.
    pub host: http::HeaderValue,
    /// Why the request went upstream, and what the upstream answered: kept here so an
    /// error answered after that still reports them.
    pub fwd: Fwd,
    pub fwd_status: Option<u16>,
}

impl Cx {
    pub fn new(app: &Arc<App>, live: Arc<Live>, client: SocketAddr) -> Cx {
        Cx {
            app: app.clone(),
            live,
            client,
            rule: None,
            upstream_ms: None,
            target: String::new(),
            host: http::HeaderValue::from_static(""),
            fwd: Fwd::Bypass,
            fwd_status: None,
        }
    }

    /// The matched rule, if any.
    pub fn rule(&self) -> Option<&Rule> {
        self.rule
            .and_then(|i| self.live.config.rules.rules().get(i))
    }

    pub fn rule_metrics(&self) -> &RuleMetrics {
        self.live.rule_metrics(self.rule())
    }
}

/// Serve one request. Never fails: errors are rendered here, once.
pub async fn handle(
    app: &Arc<App>,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let method = req.method().clone();
    let live = app.live();
    let log_path = (live.config.server.access_log && tracing::enabled!(tracing::Level::INFO))
        .then(|| req.uri().path().to_owned());
    let mut cx = Cx::new(app, live, client);
    let Served {
        mut response,
        trace,
    } = match pipeline(&mut cx, req).await {
        Ok(served) => served,
        Err(e) => {
            if e.blame() != error::Blame::Downstream {
                tracing::warn!(error = %e, blame = ?e.blame(), "request failed");
            }
            let trace = Trace {
                fwd: Some(cx.fwd),
                fwd_status: cx.fwd_status,
                ..Trace::error(e.code())
            };
            Served::new(e.into_response(), trace)
        }
    };
    respond::decorate(response.headers_mut(), &trace);
    cx.rule_metrics().outcome(trace.outcome);
    if let Some(path) = log_path {
        let rule = cx.rule().map(|r| &*r.name).unwrap_or(UNMATCHED);
        tracing::info!(
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            outcome = trace.outcome.as_str(),
            reason = trace.detail(),
            rule,
            upstream_ms = cx.upstream_ms,
            total_ms = start.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    response
}

async fn pipeline(cx: &mut Cx, req: Request<Incoming>) -> Result<Served, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let live = cx.live.clone();
    let route = classify::classify(&live, &mut parts, &mut cx.rule)?;
    cx.target = route.target.clone();
    cx.host = route.host.clone();
    let claimed = gate::claim(cx, route.policy, &parts.headers)?;

    if let Some(rule) = route.cached(&live) {
        return lookup::cached(cx, parts, body, rule, &route, claimed).await;
    }
    let identity = gate::authenticate(cx, claimed, &mut parts.headers).await?;
    let reason = if route.overrides.present {
        crate::labels::Reason::Override
    } else if route.rule.is_some() {
        crate::labels::Reason::NotCached
    } else {
        crate::labels::Reason::NoRule
    };
    let mut trace = Trace::bypass(Some(reason));
    if !route.is_read {
        cx.fwd = Fwd::Method;
        trace.fwd = Some(Fwd::Method);
    }
    let upload = forward::upload(cx, body);
    let resp = forward::client_request(cx, parts.method.clone(), parts.headers, upload).await?;
    let mut trace = trace.with_status(resp.status());
    // purge: a write the upstream accepted (2xx/3xx) invalidates before its answer returns
    let status = resp.status();
    if route.is_write && (status.is_success() || status.is_redirection()) {
        let mut tags = route.write_tags.clone();
        tags.extend(classify::location_tags(resp.headers(), &route.host));
        let purged = cx
            .app
            .purger
            .purge(&tags, Trigger::Write, cx.rule_metrics())
            .await;
        if purged == Purged::Queued {
            trace.reason = Some(crate::labels::Reason::PurgeQueued);
        }
    }
    if route.is_login && !route.overrides.present {
        return Ok(Served::new(gate::capture_login(cx, resp).await?, trace));
    }
    if route.is_logout
        && resp.status().is_success()
        && let Identity::Verified(c) = &identity
    {
        gate::end_session(cx, c).await?;
    }
    Ok(Served::new(resp.map(|b| b.boxed()), trace))
}

/// Safe methods (RFC 9110 §9.2.1): every other method is a write that invalidates.
pub fn method_is_safe(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}
