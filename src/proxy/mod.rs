//! The request pipeline: classify -> lookup -> forward (single-flight) -> store -> respond.
//!
//! Each phase returns `Result<_, ProxyError>`; errors become responses exactly once, in
//! `Engine::handle`. Every request ends with one `Trace` that feeds the access log line, the
//! `cachegate_requests_total` outcome label and the `Cache-Status` header alike.

pub mod body;
pub mod error;
pub mod headers;
pub mod respond;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::cache::entry::Entry;
use crate::cache::flight::{FlightState, Joined, Leader};
use crate::cache::key::{self, Id, KeyParts};
use crate::cache::policy::{self, Freshness, OriginCacheControl, RulePolicy, now_ms};
use crate::cache::{Cache, Found, Outcome};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::normalize::{QueryKeep, canonical_path, normalized_query};
use crate::rules::{QueryPolicy, RouteMatch, Rule};
use body::{ProxyBody, Tee, empty};
use error::ProxyError;
use respond::Trace;
use upstream::{DownBody, UpBody, Upstream};

/// How long a coalesced request waits for the leader's fill before fetching itself.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a request needs, shared by all connections.
pub struct Engine {
    pub config: Arc<Config>,
    pub cache: Arc<Cache>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
}

/// Per-request bookkeeping.
struct Cx {
    rule: Option<usize>,
    trace: Trace,
    upstream_ms: Option<f64>,
}

/// Conditional and range fields of a client request, held back while a fill fetches the
/// full representation.
static FILL_STRIPPED: [header::HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

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
            rule: None,
            trace: Trace::default(),
            upstream_ms: None,
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
        let host = headers::request_host(&parts.headers, &parts.uri).ok_or(ProxyError::BadHost)?;
        let uri = parts.uri.clone();
        let path = canonical_path(uri.path()).map_err(ProxyError::BadPath)?;
        let config = self.config.clone();
        let route = config.rules.at(&path);
        cx.rule = route.as_ref().map(|m| m.rule.index);
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::set_forwarded(&mut parts.headers, client.ip(), &host);
        parts.headers.insert(header::HOST, host.clone());

        let is_read = parts.method == Method::GET || parts.method == Method::HEAD;
        match route {
            Some(m) if is_read && m.rule.ttl.is_some() => {
                self.cached(parts, body, m, &path, &host, cx).await
            }
            _ => {
                cx.trace.fwd = Some(if is_read { "bypass" } else { "method" });
                cx.trace.detail = Some(if route_is_some(cx) {
                    "not-cached"
                } else {
                    "no-rule"
                });
                let resp = self
                    .forward(parts, body.map_err(Into::into).boxed(), cx)
                    .await?;
                cx.trace.fwd_status = Some(resp.status().as_u16());
                Ok(resp.map(|b| b.boxed()))
            }
        }
    }

    /// GET/HEAD on a caching rule.
    async fn cached(
        self: &Arc<Self>,
        mut parts: Parts,
        body: Incoming,
        m: RouteMatch<'_, '_>,
        path: &str,
        host: &HeaderValue,
        cx: &mut Cx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let rule = m.rule;
        // RFC 9111 §3.5: a shared cache must not answer a request carrying Authorization
        // from a shared entry, nor store its response.
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return self.bypass(parts, body, cx, "authorization").await;
        }
        let mut query = String::new();
        normalized_query(parts.uri.query(), query_keep(&rule.query), &mut query);
        let host_lc = host.to_str().unwrap_or_default().to_ascii_lowercase();
        let id = KeyParts {
            scheme: "http",
            host: &host_lc,
            path,
            query: &query,
            vary: &rule.vary,
            headers: &parts.headers,
            scope: None,
        }
        .id();
        let tags = tags_for(rule, &m.params, path, None);

        // lookup
        let lookup = match self.cache.lookup(&id, &tags, None).await {
            Ok(l) => l,
            Err(_) => return self.bypass(parts, body, cx, "store-unavailable").await,
        };
        let now = now_ms();
        cx.trace.fwd = Some("uri-miss");
        match lookup.found {
            Found::Entry(entry) if now < entry.fresh_until_ms => {
                cx.trace.outcome = Outcome::Hit;
                cx.trace.fwd = None;
                cx.trace.ttl = Some(respond::ttl_left(&entry, now));
                return Ok(serve(entry, &parts, now));
            }
            Found::Entry(_) => cx.trace.fwd = Some("stale"),
            Found::Dead => {
                self.metrics.stale_generation_misses.inc();
                cx.trace.fwd = Some("miss");
                cx.trace.detail = Some("purged");
            }
            Found::Corrupt => {
                cx.trace.fwd = Some("miss");
                cx.trace.detail = Some("unreadable-entry");
            }
            Found::Absent => {}
        }

        // coalesce
        match self.cache.flights.join(id, &lookup.gens) {
            Joined::Waiter(rx) => {
                let filled = wait_for_fill(rx, LOCK_TIMEOUT)
                    .await
                    .filter(|e| crate::cache::flight::entry_serves(e, &lookup.gens));
                if let Some(entry) = filled {
                    let now = now_ms();
                    cx.trace.outcome = Outcome::Coalesced;
                    cx.trace.fwd = None;
                    cx.trace.collapsed = true;
                    cx.trace.ttl = Some(respond::ttl_left(&entry, now));
                    let age = respond::current_age(&entry, now);
                    return Ok(respond::from_entry(
                        entry.status,
                        entry.headers.clone(),
                        entry.body.clone(),
                        age,
                        &parts.method,
                        &parts.headers,
                    ));
                }
                self.bypass(parts, body, cx, "coalesce-failed").await
            }
            Joined::Leader(leader) => {
                drop(body);
                for name in &FILL_STRIPPED {
                    parts.headers.remove(name);
                }
                self.fill(parts, leader, id, tags, &lookup.gens, rule, cx)
                    .await
            }
        }
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
            .forward(parts, body.map_err(Into::into).boxed(), cx)
            .await?;
        cx.trace.fwd_status = Some(resp.status().as_u16());
        Ok(resp.map(|b| b.boxed()))
    }

    /// Lead a fill: record generations, fetch the full representation, stream it to the
    /// client while a bounded copy goes to the store.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        self: &Arc<Self>,
        mut parts: Parts,
        leader: Leader,
        id: Id,
        tags: Vec<Id>,
        seen: &[Option<u64>],
        rule: &Rule,
        cx: &mut Cx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let recorded = match self.cache.record_gens(&tags, seen).await {
            Ok(g) => g,
            Err(_) => {
                drop(leader);
                cx.trace.outcome = Outcome::Bypass;
                cx.trace.fwd = Some("bypass");
                cx.trace.detail = Some("store-unavailable");
                let resp = self.forward(parts, empty_up(), cx).await?;
                cx.trace.fwd_status = Some(resp.status().as_u16());
                return Ok(resp.map(|b| b.boxed()));
            }
        };
        leader.set_recorded(recorded.clone());
        let client_method = std::mem::replace(&mut parts.method, Method::GET);
        let resp = self.forward(parts, empty_up(), cx).await?;
        let (mut rparts, rbody) = resp.into_parts();
        cx.trace.fwd_status = Some(rparts.status.as_u16());
        let now = now_ms();
        let decision = policy::decide(
            rparts.status,
            &rparts.headers,
            &rule_policy(rule),
            &self.config.cache.statuses,
            now,
        )
        .and_then(|f| {
            let too_large = content_length(&rparts.headers)
                .is_some_and(|n| n > self.config.cache.max_object_size as u64);
            if too_large { Err("too-large") } else { Ok(f) }
        });
        let fresh = match decision {
            Ok(f) => f,
            Err(reason) => {
                drop(leader);
                cx.trace.outcome = Outcome::Uncacheable;
                cx.trace.detail = Some(reason);
                return Ok(respond_streaming(rparts, rbody.boxed(), &client_method));
            }
        };
        cx.trace.outcome = Outcome::Miss;
        cx.trace.stored = true;
        cx.trace.ttl = Some(((fresh.fresh_until_ms - now) / 1000) as i64);
        if !rparts.headers.contains_key(header::DATE) {
            rparts.headers.insert(
                header::DATE,
                HeaderValue::from_str(&policy::format_http_date(now / 1000))
                    .unwrap_or(HeaderValue::from_static("")),
            );
        }
        let template = entry_template(id, &rparts, &tags, &recorded, &fresh, now);
        let on_complete = self.completion(leader, template, fresh.store_ttl);
        let tee = Tee::new(rbody, self.config.cache.max_object_size, on_complete);
        Ok(respond_streaming(rparts, tee.boxed(), &client_method))
    }

    /// What happens when a fill's body is complete: waiters get the entry at once, the store
    /// write runs in the background, and the flight retires when the write is done.
    fn completion(&self, leader: Leader, template: Entry, ttl: Duration) -> body::OnComplete {
        let cache = self.cache.clone();
        Box::new(move |bytes: Bytes| {
            let mut entry = template;
            entry.body = bytes;
            let entry = Arc::new(entry);
            leader.complete(entry.clone());
            tokio::spawn(async move {
                let _ = cache.put(&entry, ttl).await;
                drop(leader);
            });
        })
    }

    /// Send a request upstream: same method, path and query; timing recorded.
    async fn forward(
        &self,
        parts: Parts,
        body: UpBody,
        cx: &mut Cx,
    ) -> Result<Response<DownBody>, ProxyError> {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = self.upstream.uri(pq)?;
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers;
        let started = Instant::now();
        let result = self.upstream.send(req).await;
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

fn route_is_some(cx: &Cx) -> bool {
    cx.rule.is_some()
}

fn empty_up() -> UpBody {
    empty()
}

/// The response to the client for an upstream answer, honouring HEAD.
fn respond_streaming(
    parts: http::response::Parts,
    body: ProxyBody,
    client_method: &Method,
) -> Response<ProxyBody> {
    if client_method == Method::HEAD {
        // The fill fetched with GET; the client asked for the head only. The body keeps
        // draining into the store in the background.
        tokio::spawn(async move {
            let mut body = body;
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        });
        return Response::from_parts(parts, empty());
    }
    Response::from_parts(parts, body)
}

/// Serve a stored entry owned by this request (no header map copy).
fn serve(entry: Entry, parts: &Parts, now: u64) -> Response<ProxyBody> {
    let age = respond::current_age(&entry, now);
    respond::from_entry(
        entry.status,
        entry.headers,
        entry.body,
        age,
        &parts.method,
        &parts.headers,
    )
}

async fn wait_for_fill(
    mut rx: tokio::sync::watch::Receiver<FlightState>,
    limit: Duration,
) -> Option<Arc<Entry>> {
    let waited =
        tokio::time::timeout(limit, rx.wait_for(|s| !matches!(s, FlightState::Pending))).await;
    match waited {
        Ok(Ok(state)) => match &*state {
            FlightState::Done(e) => Some(e.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn query_keep(policy: &QueryPolicy) -> QueryKeep<'_> {
    match policy {
        QueryPolicy::Sorted => QueryKeep::All,
        QueryPolicy::Ignore => QueryKeep::None,
        QueryPolicy::Keep(names) => QueryKeep::Only(names),
    }
}

/// The tags an entry of this rule carries: its own, the implicit path tag (RFC 9111 §4.4),
/// and the subject tag when user-scoped.
fn tags_for(
    rule: &Rule,
    params: &matchit::Params<'_, '_>,
    path: &str,
    sub: Option<&str>,
) -> Vec<Id> {
    let mut tags = Vec::with_capacity(rule.tags.len() + 2);
    tags.extend(rule.tags.iter().map(|t| key::tag_id(&t.render(params))));
    tags.push(key::path_tag(path));
    if let Some(sub) = sub {
        tags.push(key::subject_tag(sub));
    }
    tags.sort_by_key(|t| t.0);
    tags.dedup();
    tags
}

fn rule_policy(rule: &Rule) -> RulePolicy {
    RulePolicy {
        ttl: rule.ttl.unwrap_or_default(),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        origin: OriginCacheControl::Respect,
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Response fields that are never stored: computed per response, or per connection.
static NOT_STORED: [header::HeaderName; 3] = [
    header::AGE,
    header::HeaderName::from_static("x-cache"),
    header::HeaderName::from_static("cache-status"),
];

fn entry_template(
    id: Id,
    rparts: &http::response::Parts,
    tags: &[Id],
    recorded: &[u64],
    fresh: &Freshness,
    now: u64,
) -> Entry {
    let mut headers = rparts.headers.clone();
    for name in &NOT_STORED {
        headers.remove(name);
    }
    let mut flags = 0;
    if fresh.no_cache {
        flags |= crate::cache::entry::flags::NO_CACHE;
    }
    if fresh.must_revalidate {
        flags |= crate::cache::entry::flags::MUST_REVALIDATE;
    }
    Entry {
        key: id,
        status: rparts.status,
        flags,
        stored_at_ms: now,
        age_at_store_s: fresh.age_at_store_s,
        fresh_until_ms: fresh.fresh_until_ms,
        swr_until_ms: fresh.swr_until_ms,
        sie_until_ms: fresh.sie_until_ms,
        gens: tags.iter().copied().zip(recorded.iter().copied()).collect(),
        vary: Vec::new(),
        headers,
        body: Bytes::new(),
    }
}

/// A status and JSON body for requests the pipeline refuses before the upstream.
pub fn refuse(status: StatusCode, code: &str, detail: &str) -> Response<ProxyBody> {
    error::json_error(status, code, detail)
}
