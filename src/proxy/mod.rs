//! The request pipeline: classify -> lookup -> forward (single-flight) -> store -> respond.
//!
//! Each phase returns `Result<_, ProxyError>`; errors become responses exactly once, in
//! `Engine::handle`. Every request ends with one `Trace` that feeds the access log line, the
//! `cachegate_requests_total` outcome label and the `Cache-Status` header alike.

pub mod body;
mod cached;
pub use cached::Explain;
pub mod error;
pub mod headers;
pub mod respond;
pub mod session;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::auth::Policy;
use crate::cache::key::{self, Id};
use crate::cache::{Cache, Outcome};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::normalize::canonical_path;
use crate::purge::{Purged, Purger, Trigger};
use crate::rules::RouteMatch;
use body::{ProxyBody, Upload, empty};
use error::ProxyError;
use respond::Trace;
use session::Identity;
use upstream::{DownBody, Upstream};

/// Everything a request needs, shared by all connections.
pub struct Engine {
    pub config: Arc<Config>,
    pub cache: Arc<Cache>,
    pub purger: Arc<Purger>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
}

/// Per-request bookkeeping.
struct Cx {
    /// The client's address (the peer of the connection).
    client: SocketAddr,
    rule: Option<usize>,
    trace: Trace,
    upstream_ms: Option<f64>,
    /// Path and query sent upstream: the canonical path, so the upstream sees the resource
    /// that was routed and keyed, never another spelling of it.
    target: String,
}

impl Engine {
    /// Serve one request. Never fails: errors are rendered here, once.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let method = req.method().clone();
        let log_path = tracing::enabled!(tracing::Level::INFO).then(|| req.uri().path().to_owned());
        let mut cx = Cx {
            client,
            rule: None,
            trace: Trace::default(),
            upstream_ms: None,
            target: String::new(),
        };
        let mut resp = match self.pipeline(req, client, &mut cx).await {
            Ok(r) => r,
            Err(e) => {
                cx.trace.outcome = Outcome::Error;
                cx.trace.stored = false;
                cx.trace.detail = Some(e.code());
                if e.blame() != error::Blame::Downstream {
                    tracing::warn!(error = %e, blame = ?e.blame(), "request failed");
                }
                e.into_response()
            }
        };
        respond::decorate(resp.headers_mut(), &cx.trace);
        let rule_metrics = self.metrics.rule(cx.rule);
        rule_metrics.outcome(cx.trace.outcome);
        if let Some(path) = log_path {
            let rule = cx
                .rule
                .and_then(|i| self.config.rules.rules().get(i))
                .map(|r| &*r.name)
                .unwrap_or(crate::rules::UNMATCHED);
            tracing::info!(
                method = %method,
                path = %path,
                status = resp.status().as_u16(),
                outcome = cx.trace.outcome.as_str(),
                rule,
                upstream_ms = cx.upstream_ms,
                total_ms = start.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        }
        resp
    }

    async fn pipeline(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
        cx: &mut Cx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        // classify
        if parts.headers.len() > self.config.server.max_header_count {
            // HTTP/1 is refused by hyper already; this holds HTTP/2 to the same limit.
            return Err(ProxyError::TooManyHeaders);
        }
        let host = headers::request_host(&parts.headers, &parts.uri, parts.version)
            .ok_or(ProxyError::BadHost)?;
        let uri = parts.uri.clone();
        let path = canonical_path(uri.path()).map_err(ProxyError::BadPath)?;
        cx.target = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let config = self.config.clone();
        let route = config.rules.at(&path);
        cx.rule = route.as_ref().map(|m| m.rule.index);
        // A method or URL override: the upstream may run another method or serve another
        // path than the one routed here, so such a request is never cached, is gated by the
        // stricter of both paths' policies, and purges like the write it may be.
        let overrides = headers::overrides(&parts.headers, uri.query());
        let override_path = match overrides.url.as_deref() {
            None => None,
            Some(url) => Some(override_target(url)?),
        };
        let override_route = override_path.as_deref().and_then(|p| config.rules.at(p));
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::set_forwarded(&mut parts.headers, client.ip(), &host);
        parts.headers.insert(header::HOST, host.clone());
        // Identity headers come from the gate only, never from the client.
        let auth = &config.auth;
        session::strip_identity_headers(&mut parts.headers, &auth.subject_header);

        // authenticate (the session check follows, pipelined with a lookup where possible)
        let is_login = auth
            .login
            .as_ref()
            .is_some_and(|l| l.method == parts.method && l.path == *path);
        let is_logout = auth
            .logout
            .as_ref()
            .is_some_and(|l| l.method == parts.method && l.path == *path);
        let route_policy = route.as_ref().map(|m| m.rule.auth).unwrap_or(auth.default);
        let policy = match route_policy {
            // Whoever logs in has no session yet.
            _ if is_login && !overrides.present => Policy::None,
            // A logout needs to know whose session it ends.
            Policy::None if is_logout => Policy::Optional,
            p => p,
        };
        let policy = match &override_path {
            Some(_) => policy.stricter(
                override_route
                    .as_ref()
                    .map(|m| m.rule.auth)
                    .unwrap_or(auth.default),
            ),
            None => policy,
        };
        let claimed = self.claim(policy, &parts.headers, cx)?;

        let is_read = parts.method == Method::GET || parts.method == Method::HEAD;
        // Tags a successful write makes stale: the path's own (RFC 9111 §4.4) and the
        // rule's `purge` list, for the routed path and for an overriding URL.
        let is_write = !method_is_safe(&parts.method) || overrides.write;
        let mut write_tags = Vec::new();
        if is_write {
            write_tags.extend(write_tags_for(&path, route.as_ref()));
            if let Some(p) = &override_path {
                write_tags.extend(write_tags_for(p, override_route.as_ref()));
            }
        }
        if let Some(m) = route.filter(|m| is_read && m.rule.ttl.is_some() && !overrides.present) {
            return self.cached(parts, body, m, &path, &host, claimed, cx).await;
        }
        let identity = self.authenticate(claimed, &mut parts.headers, cx).await?;
        cx.trace.fwd = Some(if is_read { "bypass" } else { "method" });
        cx.trace.detail = Some(if overrides.present {
            "override"
        } else if cx.rule.is_some() {
            "not-cached"
        } else {
            "no-rule"
        });
        let method = parts.method.clone();
        let resp = self
            .forward(method, parts.headers, self.upload(body), cx)
            .await?;
        cx.trace.fwd_status = Some(resp.status().as_u16());
        // purge: a write the upstream accepted (2xx/3xx) invalidates before its answer returns
        let status = resp.status();
        if is_write && (status.is_success() || status.is_redirection()) {
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(p) = resp
                    .headers()
                    .get(&name)
                    .and_then(|v| same_origin_path(v, &host))
                {
                    write_tags.push(key::path_tag(&p));
                }
            }
            if self.purge_tags(&write_tags, Trigger::Write, cx.rule).await == Purged::Queued {
                cx.trace.detail = Some("purge-queued");
            }
        }
        if is_login && !overrides.present {
            return self.capture_login(resp).await;
        }
        if is_logout
            && resp.status().is_success()
            && let Identity::Verified(c) = &identity
        {
            self.end_session(c).await?;
        }
        Ok(resp.map(|b| b.boxed()))
    }

    /// Forward untouched (no lookup, no store), recording why.
    async fn bypass(
        &self,
        parts: Parts,
        body: Incoming,
        cx: &mut Cx,
        why: &'static str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        cx.trace.outcome = Outcome::Bypass;
        cx.trace.fwd = Some("bypass");
        cx.trace.detail = Some(why);
        let resp = self
            .forward(parts.method, parts.headers, self.upload(body), cx)
            .await?;
        cx.trace.fwd_status = Some(resp.status().as_u16());
        Ok(resp.map(|b| b.boxed()))
    }

    /// Give tags new generations: every entry carrying one of them stops being served.
    pub async fn purge_tags(&self, tags: &[Id], trigger: Trigger, rule: Option<usize>) -> Purged {
        self.purger.purge(tags, trigger, rule).await
    }

    /// A client's request body on its way upstream: bounded by its own idle timeout
    /// (`[server] body_read_timeout`), and reporting progress so the upstream timeout only
    /// counts time in which nothing moved.
    fn upload(&self, body: Incoming) -> Upload {
        if body.is_end_stream() {
            return Upload::none(empty());
        }
        Upload::new(body, self.config.server.body_read_timeout)
    }

    /// Send a request upstream to `cx.target` (the canonical path and query); timing recorded.
    async fn forward(
        &self,
        method: Method,
        headers: HeaderMap,
        body: Upload,
        cx: &mut Cx,
    ) -> Result<Response<DownBody>, ProxyError> {
        let uri = self.upstream.uri(&cx.target)?;
        let (body, progress) = body.into_parts();
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let started = Instant::now();
        let result = self.upstream.send(req, progress).await;
        let elapsed = started.elapsed();
        cx.upstream_ms = Some(elapsed.as_secs_f64() * 1000.0);
        self.metrics
            .rule(cx.rule)
            .upstream
            .observe(elapsed.as_secs_f64());
        let mut resp = result?;
        headers::strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }
}

/// The canonical path of a `Location` / `Content-Location` that points at this origin
/// (a path, or an absolute URI with the request's host), else `None`.
fn same_origin_path(value: &HeaderValue, host: &HeaderValue) -> Option<String> {
    let uri: http::Uri = value.to_str().ok()?.trim().parse().ok()?;
    if let Some(authority) = uri.authority()
        && !authority.as_str().eq_ignore_ascii_case(host.to_str().ok()?)
    {
        return None;
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return None;
    }
    canonical_path(path).ok().map(|p| p.into_owned())
}

/// The canonical path of an `X-Original-URL` / `X-Rewrite-URL` value (a path or an
/// absolute URI); an ambiguous one is refused like an ambiguous request path.
fn override_target(url: &str) -> Result<String, ProxyError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| ProxyError::BadPath(crate::normalize::PathError::NotOriginForm))?;
    canonical_path(uri.path())
        .map(|p| p.into_owned())
        .map_err(ProxyError::BadPath)
}

/// The tags a successful write to `path` bumps: its own and its rule's `purge` list.
fn write_tags_for(path: &str, route: Option<&RouteMatch<'_, '_>>) -> Vec<Id> {
    let mut tags = vec![key::path_tag(path)];
    if let Some(m) = route {
        tags.extend(
            m.rule
                .purge
                .iter()
                .map(|t| key::tag_id(&t.render(&m.params))),
        );
    }
    tags
}

/// Safe methods (RFC 9110 §9.2.1): every other method is a write that invalidates.
fn method_is_safe(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

fn empty_up() -> Upload {
    Upload::none(empty())
}
