//! The request pipeline: classify -> lookup -> forward (single-flight) -> store -> respond.
//!
//! Each phase returns `Result<_, ProxyError>`; errors become responses exactly once, in
//! `Engine::handle`. Every request ends with one `Trace` that feeds the access log line, the
//! `cachegate_requests_total` outcome label and the `Cache-Status` header alike.

pub mod body;
pub mod error;
pub mod headers;
pub mod respond;
pub mod session;
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

use crate::auth::{Claimed, Policy};
use crate::cache::entry::{Entry, flags as entry_flags};
use crate::cache::flight::{FlightState, Joined, Leader};
use crate::cache::key::{self, Id, KeyParts};
use crate::cache::policy::{self, CacheControl, Freshness, OriginCacheControl, RulePolicy, now_ms};
use crate::cache::{Cache, Found, Outcome};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::normalize::{QueryKeep, canonical_path, normalized_query};
use crate::purge::{Purged, Purger, Trigger};
use crate::rules::{QueryPolicy, RouteMatch, Rule, Scope};
use body::{ProxyBody, Tee, empty};
use error::ProxyError;
use respond::Trace;
use session::Identity;
use upstream::{DownBody, UpBody, Upstream};

/// How long a coalesced request waits for the leader's fill before fetching itself.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

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
    rule: Option<usize>,
    trace: Trace,
    upstream_ms: Option<f64>,
    /// Path and query sent upstream: the canonical path, so the upstream sees the resource
    /// that was routed and keyed, never another spelling of it.
    target: String,
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
        let host = headers::request_host(&parts.headers, &parts.uri).ok_or(ProxyError::BadHost)?;
        let uri = parts.uri.clone();
        let path = canonical_path(uri.path()).map_err(ProxyError::BadPath)?;
        cx.target = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let config = self.config.clone();
        let route = config.rules.at(&path);
        cx.rule = route.as_ref().map(|m| m.rule.index);
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::set_forwarded(&mut parts.headers, client.ip(), &host);
        parts.headers.insert(header::HOST, host.clone());
        // Identity headers come from the gate only, never from the client.
        let auth = &config.auth;
        parts.headers.remove(&auth.subject_header);
        parts.headers.remove(&session::X_AUTH_UNVERIFIED);

        // authenticate (the session check follows, pipelined with a lookup where possible)
        let is_login = auth
            .login
            .as_ref()
            .is_some_and(|l| l.method == parts.method && l.path == *path);
        let is_logout = auth
            .logout
            .as_ref()
            .is_some_and(|l| l.method == parts.method && l.path == *path);
        let policy = match route.as_ref().map(|m| m.rule.auth).unwrap_or(auth.default) {
            // Whoever logs in has no session yet.
            _ if is_login => Policy::None,
            // A logout needs to know whose session it ends.
            Policy::None if is_logout => Policy::Optional,
            p => p,
        };
        let claimed = self.claim(policy, &parts.headers, cx)?;

        let is_read = parts.method == Method::GET || parts.method == Method::HEAD;
        // Tags a successful write makes stale: the path's own (RFC 9111 §4.4) and the
        // rule's `purge` list.
        let is_safe = is_read || parts.method == Method::OPTIONS || parts.method == Method::TRACE;
        let mut write_tags = Vec::new();
        if !is_safe {
            write_tags.push(key::path_tag(&path));
            if let Some(m) = &route {
                write_tags.extend(
                    m.rule
                        .purge
                        .iter()
                        .map(|t| key::tag_id(&t.render(&m.params))),
                );
            }
        }
        if let Some(m) = route.filter(|m| is_read && m.rule.ttl.is_some()) {
            return self.cached(parts, body, m, &path, &host, claimed, cx).await;
        }
        let identity = match claimed {
            None => Identity::Anonymous,
            Some(c) => self.check_session(c, cx).await?,
        };
        self.apply_identity(&mut parts.headers, &identity);
        cx.trace.fwd = Some(if is_read { "bypass" } else { "method" });
        cx.trace.detail = Some(if cx.rule.is_some() {
            "not-cached"
        } else {
            "no-rule"
        });
        let resp = self
            .forward(parts, body.map_err(Into::into).boxed(), cx)
            .await?;
        cx.trace.fwd_status = Some(resp.status().as_u16());
        // purge: a write the upstream accepted (2xx/3xx) invalidates before its answer returns
        let status = resp.status();
        if !is_safe && (status.is_success() || status.is_redirection()) {
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
        if is_login {
            return self.capture_login(resp).await;
        }
        if is_logout
            && resp.status().is_success()
            && let Identity::Verified(c) = &identity
        {
            self.end_session(c).await;
        }
        Ok(resp.map(|b| b.boxed()))
    }

    /// GET/HEAD on a caching rule.
    #[allow(clippy::too_many_arguments)]
    async fn cached(
        self: &Arc<Self>,
        mut parts: Parts,
        body: Incoming,
        m: RouteMatch<'_, '_>,
        path: &str,
        host: &HeaderValue,
        claimed: Option<Claimed>,
        cx: &mut Cx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let rule = m.rule;
        // Whose entry: the subject's own (scope user), the shared one, or none at all.
        // RFC 9111 §3.5: a request carrying Authorization is never answered from, nor
        // stored into, a shared entry unless the rule says the route is shared.
        if rule.scope == Scope::Anonymous {
            if let Some(c) = claimed {
                let identity = self.check_session(c, cx).await?;
                self.apply_identity(&mut parts.headers, &identity);
                return self.bypass(parts, body, cx, "authorization").await;
            }
            if parts.headers.contains_key(header::AUTHORIZATION) {
                return self.bypass(parts, body, cx, "authorization").await;
            }
        }
        // Purges wait for the store: until they land, nothing is read from the cache.
        if self.purger.pending() {
            if let Some(c) = claimed {
                let identity = self.check_session(c, cx).await?;
                self.apply_identity(&mut parts.headers, &identity);
            }
            return self.bypass(parts, body, cx, "purge-pending").await;
        }
        let scope: Option<String> = match (&claimed, rule.scope) {
            (Some(c), Scope::User) => Some(c.sub.clone()),
            _ => None,
        };
        let mut query = String::new();
        normalized_query(parts.uri.query(), query_keep(&rule.query), &mut query);
        let base = KeyBase {
            host: host.to_str().unwrap_or_default().to_ascii_lowercase(),
            path,
            query,
            scope,
            rule_vary: &rule.vary,
        };
        let id = base.id(&parts.headers, &[]);
        let tags = tags_for(rule, &m.params, path, base.scope.as_deref());

        // lookup (the session check rides in the same round trip), then coalesce
        let mut session_key = claimed.as_ref().map(|c| c.session_key.as_bytes().to_vec());
        let mut claimed = claimed;
        let mut relookup = true;
        loop {
            let lookup = match self.cache.lookup(&id, &tags, session_key.take()).await {
                Ok(l) => l,
                Err(e) => {
                    if let Some(c) = claimed.take() {
                        let identity = self.session_verdict(c, Err(e), cx)?;
                        self.apply_identity(&mut parts.headers, &identity);
                    }
                    return self.bypass(parts, body, cx, "store-unavailable").await;
                }
            };
            if let Some(c) = claimed.take() {
                let identity = self.session_verdict(c, Ok(lookup.session.clone()), cx)?;
                self.apply_identity(&mut parts.headers, &identity);
            }
            // A vary marker: the origin varies on request headers, so read this request's
            // variant (a second round trip, only for such resources).
            let mut found = lookup.found;
            let mut flight_id = id;
            if let Found::Entry(marker) = &found
                && marker.flags & entry_flags::VARY_INDEX != 0
            {
                flight_id = base.id(&parts.headers, &marker.vary);
                found = match self
                    .cache
                    .lookup_entry(&flight_id, &tags, &lookup.gens)
                    .await
                {
                    Ok(Found::Entry(e)) if e.flags & entry_flags::VARY_INDEX != 0 => Found::Corrupt,
                    Ok(f) => f,
                    Err(_) => return self.bypass(parts, body, cx, "store-unavailable").await,
                };
            }
            let now = now_ms();
            cx.trace.fwd = Some("uri-miss");
            match found {
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
            // RFC 9111 §5.2.1.5: nothing of a no-store request's response may be stored.
            if CacheControl::parse(&parts.headers).no_store {
                return self.bypass(parts, body, cx, "request-no-store").await;
            }

            match self.cache.flights.join(flight_id, &lookup.gens, relookup) {
                Joined::Relookup => {
                    relookup = false;
                    continue;
                }
                Joined::Waiter(rx) => {
                    let filled = wait_for_fill(rx, LOCK_TIMEOUT).await.filter(|e| {
                        crate::cache::flight::entry_serves(e, &lookup.gens)
                            && now_ms() < e.fresh_until_ms
                            && base.id(&parts.headers, &e.vary) == e.key
                    });
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
                    return self.bypass(parts, body, cx, "coalesce-failed").await;
                }
                Joined::Leader(leader) => {
                    drop(body);
                    return self
                        .fill(parts, leader, &base, id, tags, &lookup.gens, rule, cx)
                        .await;
                }
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

    /// Lead a fill: record generations, fetch the full representation (canonical path, the
    /// key's query, bucketed Accept-Encoding, no conditionals or ranges), and stream it to
    /// the client while a bounded copy goes to the store.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        self: &Arc<Self>,
        mut parts: Parts,
        leader: Leader,
        base: &KeyBase<'_>,
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
        // The upstream is asked for exactly what the key says: a stored response can then
        // never depend on a query parameter or header spelling the key left out.
        cx.target = base.fill_target();
        for name in &FILL_STRIPPED {
            parts.headers.remove(name);
        }
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static(key::accept_encoding_bucket(&parts.headers)),
        );
        let request_headers = parts.headers.clone();
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
                return Ok(respond_streaming(
                    rparts,
                    rbody.boxed(),
                    &client_method,
                    false,
                ));
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
        let mut template = entry_template(id, &rparts, &tags, &recorded, &fresh, now);
        // The origin's Vary (beyond the rule's own `vary`): the response is stored as a
        // variant keyed by those request headers, with a marker under the plain key.
        let origin_vary = vary_names(&rparts.headers, &rule.vary);
        let marker = if origin_vary.is_empty() {
            None
        } else {
            template.key = base.id(&request_headers, &origin_vary);
            template.vary = origin_vary;
            Some(vary_marker(id, &template))
        };
        let on_complete = self.completion(leader, template, marker, fresh.store_ttl);
        let tee = Tee::new(rbody, self.config.cache.max_object_size, on_complete);
        Ok(respond_streaming(rparts, tee.boxed(), &client_method, true))
    }

    /// What happens when a fill's body is complete: waiters get the entry at once, the store
    /// write runs in the background, and the flight retires when the write is done.
    ///
    /// The finished flight lingers for one store timeout after the write: a request whose
    /// lookup ran just before the write landed (and so found nothing) is sent back to the
    /// store once, instead of fetching the same response again.
    fn completion(
        &self,
        leader: Leader,
        template: Entry,
        marker: Option<Entry>,
        ttl: Duration,
    ) -> body::OnComplete {
        let cache = self.cache.clone();
        let linger = self.config.store.timeout;
        Box::new(move |bytes: Bytes| {
            let mut entry = template;
            entry.body = bytes;
            let entry = Arc::new(entry);
            leader.complete(entry.clone());
            tokio::spawn(async move {
                let mut entries: Vec<&Entry> = vec![&entry];
                entries.extend(marker.as_ref());
                if cache.put(&entries, ttl).await.is_ok() {
                    leader.stored();
                    tokio::time::sleep(linger).await;
                }
                drop(leader);
            });
        })
    }

    /// Give tags new generations: every entry carrying one of them stops being served.
    pub async fn purge_tags(&self, tags: &[Id], trigger: Trigger, rule: Option<usize>) -> Purged {
        self.purger.purge(tags, trigger, rule).await
    }

    /// Send a request upstream: same method, path and query; timing recorded.
    async fn forward(
        &self,
        parts: Parts,
        body: UpBody,
        cx: &mut Cx,
    ) -> Result<Response<DownBody>, ProxyError> {
        let uri = self.upstream.uri(&cx.target)?;
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

/// Everything a cache key is made of, except the names of the varying headers.
struct KeyBase<'a> {
    host: String,
    path: &'a str,
    /// The query as the rule's policy normalizes it.
    query: String,
    scope: Option<String>,
    rule_vary: &'a [header::HeaderName],
}

impl KeyBase<'_> {
    /// The entry id for these request headers, varying on the rule's headers plus `extra`.
    fn id(&self, headers: &HeaderMap, extra: &[header::HeaderName]) -> Id {
        let mut names;
        let vary = if extra.is_empty() {
            self.rule_vary
        } else {
            names = self.rule_vary.to_vec();
            names.extend_from_slice(extra);
            names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            names.dedup();
            &names[..]
        };
        KeyParts {
            scheme: "http",
            host: &self.host,
            path: self.path,
            query: &self.query,
            vary,
            headers,
            scope: self.scope.as_deref(),
        }
        .id()
    }

    /// The path and query a fill asks the upstream for.
    fn fill_target(&self) -> String {
        if self.query.is_empty() {
            self.path.to_string()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// Header names the origin's `Vary` lists beyond the rule's own (lower-case, sorted).
fn vary_names(headers: &HeaderMap, rule_vary: &[header::HeaderName]) -> Vec<header::HeaderName> {
    let mut names: Vec<header::HeaderName> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| header::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !rule_vary.contains(n))
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

/// The marker filed under the plain key of a resource that varies: which headers it varies
/// on, with the same generations and lifetime as the variant it was written with.
fn vary_marker(plain: Id, variant: &Entry) -> Entry {
    Entry {
        key: plain,
        status: StatusCode::OK,
        flags: entry_flags::VARY_INDEX,
        stored_at_ms: variant.stored_at_ms,
        age_at_store_s: 0,
        fresh_until_ms: variant.fresh_until_ms,
        swr_until_ms: variant.swr_until_ms,
        sie_until_ms: variant.sie_until_ms,
        gens: variant.gens.clone(),
        vary: variant.vary.clone(),
        headers: HeaderMap::new(),
        body: Bytes::new(),
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

fn empty_up() -> UpBody {
    empty()
}

/// The response to the client for an upstream answer, honouring HEAD. `store`: the body is
/// a tee whose copy is being stored (a HEAD then keeps draining it in the background;
/// otherwise the body is dropped, which costs the pooled connection, not a download).
fn respond_streaming(
    parts: http::response::Parts,
    body: ProxyBody,
    client_method: &Method,
    store: bool,
) -> Response<ProxyBody> {
    if client_method == Method::HEAD {
        if !store {
            return Response::from_parts(parts, empty());
        }
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
            FlightState::Done(e) | FlightState::Stored(e) => Some(e.clone()),
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
/// the global tag, and the subject tag when user-scoped.
fn tags_for(
    rule: &Rule,
    params: &matchit::Params<'_, '_>,
    path: &str,
    sub: Option<&str>,
) -> Vec<Id> {
    let mut tags = Vec::with_capacity(rule.tags.len() + 3);
    tags.extend(rule.tags.iter().map(|t| key::tag_id(&t.render(params))));
    tags.push(key::path_tag(path));
    tags.push(key::global_tag());
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
