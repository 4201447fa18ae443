//! The cache phases of the pipeline, for GET/HEAD on a rule with a TTL:
//! lookup -> HIT | STALE (serve, refresh once in the background) | MISS -> coalesce (one fill
//! per key in the process, optionally across instances) -> fetch (revalidating a stale entry
//! with its validators) -> store while streaming -> respond.
//!
//! A stale entry is also the fallback when the upstream fails within its stale-if-error
//! window. Nothing here decides cacheability itself: that is `cache::policy`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{self, ProxyBody, Tee, empty};
use super::error::ProxyError;
use super::headers;
use super::respond;
use super::upstream::DownBody;
use super::{Cx, Engine, empty_up, method_is_safe};
use crate::auth::Claimed;
use crate::cache::entry::{Entry, flags as entry_flags};
use crate::cache::flight::{FlightState, Joined, Leader, entry_serves};
use crate::cache::key::{self, Id, KeyParts};
use crate::cache::policy::{self, CacheControl, Freshness, RulePolicy, now_ms};
use crate::cache::store::Op;
use crate::cache::{Found, Outcome, random_u64};
use crate::normalize::{QueryKeep, normalized_query};
use crate::rules::{QueryPolicy, RouteMatch, Rule, Scope};

/// How often a request waiting on another instance's fill looks for the entry.
const LEASE_POLL: Duration = Duration::from_millis(20);

/// Everything a cache key is made of, except the names of the varying headers.
#[derive(Clone)]
pub(super) struct KeyBase {
    host: String,
    path: String,
    /// The query as the rule's policy normalizes it.
    query: String,
    scope: Option<String>,
    rule_vary: Vec<HeaderName>,
}

impl KeyBase {
    /// The entry id for these request headers, varying on the rule's headers plus `extra`.
    fn id(&self, headers: &HeaderMap, extra: &[HeaderName]) -> Id {
        let mut names;
        let vary = if extra.is_empty() {
            &self.rule_vary[..]
        } else {
            names = self.rule_vary.clone();
            names.extend_from_slice(extra);
            names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            names.dedup();
            &names[..]
        };
        KeyParts {
            scheme: "http",
            host: &self.host,
            path: &self.path,
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
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// What the upstream said to a fill.
// Lives for one fill on the miss path; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Fetched {
    /// 304 to a revalidation: the stale entry with refreshed headers and timeline; `ttl` is
    /// `None` when the refreshed headers no longer allow storing it.
    NotModified { entry: Entry, ttl: Option<Duration> },
    /// A storable response: `template` (and the vary `marker`) wait for the body.
    Storable {
        parts: http::response::Parts,
        body: DownBody,
        template: Entry,
        marker: Option<Entry>,
        ttl: Duration,
    },
    /// A response that may not be stored, and why.
    Uncacheable {
        parts: http::response::Parts,
        body: DownBody,
        reason: &'static str,
    },
}

/// A lease on a key's fill, held in the store so instances sharing it fill once.
/// Dropping it gives it back (only if it is still ours), whatever way the fill ended: a
/// fill abandoned mid-body must not leave other instances waiting for the lease to expire.
struct Lease {
    cache: Arc<crate::cache::Cache>,
    key: Vec<u8>,
    token: Bytes,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // shutting down: the lease expires by itself
        };
        let cache = self.cache.clone();
        let key = std::mem::take(&mut self.key);
        let token = std::mem::take(&mut self.token);
        runtime.spawn(async move {
            let store = cache.store();
            let _ = store
                .call(Op::Lock, store.store().del_if_equals(key, token))
                .await;
        });
    }
}

enum LeaseOutcome {
    Held(Lease),
    /// Another instance filled the key while we waited.
    Filled(Entry),
    /// No lease (store error, or the wait timed out): fill anyway.
    Proceed,
}

/// The inputs of a fill that outlive the request (background refreshes).
struct FillJob {
    base: KeyBase,
    flight_id: Id,
    id: Id,
    tags: Vec<Id>,
    seen: Vec<Option<u64>>,
    /// Request headers the origin is known to vary on (from the vary marker).
    vary: Vec<HeaderName>,
}

impl Engine {
    /// GET/HEAD on a caching rule.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn cached(
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
        // RFC 9111 §3.5: a request carrying credentials (Authorization, or a configured
        // credential header such as Cookie) is never answered from, nor stored into, an
        // entry shared between users unless the rule says the route is shared.
        let own_entry = rule.scope == Scope::User && claimed.is_some();
        if !own_entry && rule.scope != Scope::Public {
            let why = if claimed.is_some() || parts.headers.contains_key(header::AUTHORIZATION) {
                Some("authorization")
            } else {
                self.config
                    .cache
                    .credential_headers
                    .iter()
                    .any(|h| !rule.vary.contains(h) && parts.headers.contains_key(h))
                    .then_some("credentials")
            };
            if let Some(why) = why {
                self.authenticate(claimed, &mut parts.headers, cx).await?;
                return self.bypass(parts, body, cx, why).await;
            }
        }
        let mut query = String::new();
        normalized_query(parts.uri.query(), query_keep(&rule.query), &mut query);
        let base = KeyBase {
            host: host.to_str().unwrap_or_default().to_ascii_lowercase(),
            path: path.to_string(),
            query,
            scope: match (&claimed, rule.scope) {
                (Some(c), Scope::User) => Some(c.sub.clone()),
                _ => None,
            },
            rule_vary: rule.vary.clone(),
        };
        let id = base.id(&parts.headers, &[]);
        // Purges wait for the store: until they land, nothing is read from the cache.
        // Concurrent requests for the key still share one upstream fetch.
        if self.purger.pending() {
            return self
                .degraded(parts, body, base, id, rule, claimed, cx, "purge-pending")
                .await;
        }
        let tags = tags_for(rule, &m.params, path, base.scope.as_deref());
        let request_cc = CacheControl::parse(&parts.headers);
        // A client may force a revalidation only where the operator allows it: otherwise
        // any client could bypass the cache and hammer the upstream.
        let client_revalidates = self.config.cache.honor_client_no_cache
            && (request_cc.no_cache
                || request_cc.max_age == Some(0)
                || pragma_no_cache(&parts.headers));

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
                    return self
                        .degraded(parts, body, base, id, rule, None, cx, "store-unavailable")
                        .await;
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
            let mut known_vary = Vec::new();
            if let Found::Entry(marker) = &found
                && marker.flags & entry_flags::VARY_INDEX != 0
            {
                flight_id = base.id(&parts.headers, &marker.vary);
                known_vary = marker.vary.clone();
                found = match self
                    .cache
                    .lookup_entry(&flight_id, &tags, &lookup.gens)
                    .await
                {
                    Ok(Found::Entry(e)) if e.flags & entry_flags::VARY_INDEX != 0 => Found::Corrupt,
                    Ok(f) => f,
                    Err(_) => {
                        return self
                            .degraded(parts, body, base, id, rule, None, cx, "store-unavailable")
                            .await;
                    }
                };
            }
            let now = now_ms();
            cx.trace.fwd = Some("uri-miss");
            let mut stale = None;
            match found {
                Found::Entry(entry) if now < entry.fresh_until_ms && !client_revalidates => {
                    cx.trace.outcome = Outcome::Hit;
                    cx.trace.fwd = None;
                    cx.trace.ttl = Some(respond::ttl_left(&entry, now));
                    return Ok(serve(entry, &parts, now));
                }
                Found::Entry(entry) if now < entry.swr_until_ms && !client_revalidates => {
                    // RFC 5861: answer at once, refresh once in the background.
                    let job = FillJob {
                        base: base.clone(),
                        flight_id,
                        id,
                        tags: tags.clone(),
                        seen: lookup.gens.clone(),
                        vary: entry.vary.clone(),
                    };
                    self.spawn_refresh(&parts.headers, cx.client, job, rule.index, entry.clone());
                    cx.trace.outcome = Outcome::Stale;
                    cx.trace.fwd = None;
                    cx.trace.detail = Some("stale-while-revalidate");
                    cx.trace.ttl = Some(respond::ttl_left(&entry, now));
                    return Ok(serve(entry, &parts, now));
                }
                Found::Entry(entry) => {
                    cx.trace.fwd = Some(if client_revalidates {
                        "request"
                    } else {
                        "stale"
                    });
                    stale = Some(entry);
                }
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
            // RFC 9111 §5.2.1.7: only what is stored, or 504.
            if request_cc.only_if_cached {
                return Err(ProxyError::NotCached);
            }
            // RFC 9111 §5.2.1.5: nothing of a no-store request's response may be stored.
            if request_cc.no_store {
                return self.bypass(parts, body, cx, "request-no-store").await;
            }

            let epoch = self.purger.epoch();
            match self
                .cache
                .flights
                .join(flight_id, &lookup.gens, relookup, epoch)
            {
                Joined::Relookup => {
                    relookup = false;
                    continue;
                }
                Joined::Waiter(rx) => {
                    let filled = self.wait_for_fill(rx).await.filter(|e| {
                        entry_serves(e, &lookup.gens)
                            && now_ms() < e.fresh_until_ms
                            && base.id(&parts.headers, &e.vary) == e.key
                    });
                    if let Some(entry) = filled {
                        return Ok(self.serve_coalesced(&entry, &parts, cx));
                    }
                    return self.bypass(parts, body, cx, "coalesce-failed").await;
                }
                Joined::Leader(leader) => {
                    drop(body);
                    let job = FillJob {
                        base,
                        flight_id,
                        id,
                        tags,
                        seen: lookup.gens,
                        vary: match &stale {
                            Some(s) if !s.vary.is_empty() => s.vary.clone(),
                            _ => known_vary,
                        },
                    };
                    return self.fill(parts, leader, job, rule, stale, cx).await;
                }
            }
        }
    }

    /// The cache cannot be read (the store is unreachable, or purges wait for it): the
    /// request goes upstream, but concurrent requests for the same shared entry still
    /// collapse onto one fetch in this process, whose response answers them all when it
    /// may be stored. Nothing is written. Entries of one user are never shared this way,
    /// since their session could not be checked either.
    #[allow(clippy::too_many_arguments)]
    async fn degraded(
        self: &Arc<Self>,
        mut parts: Parts,
        body: Incoming,
        base: KeyBase,
        id: Id,
        rule: &Rule,
        claimed: Option<Claimed>,
        cx: &mut Cx,
        why: &'static str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.authenticate(claimed, &mut parts.headers, cx).await?;
        let request_cc = CacheControl::parse(&parts.headers);
        if base.scope.is_some() || request_cc.no_store || request_cc.only_if_cached {
            if request_cc.only_if_cached {
                return Err(ProxyError::NotCached);
            }
            return self.bypass(parts, body, cx, why).await;
        }
        match self.cache.flights.join_degraded(id, self.purger.epoch()) {
            Joined::Waiter(rx) => {
                let filled = self.wait_for_fill(rx).await.filter(|e| {
                    now_ms() < e.fresh_until_ms && base.id(&parts.headers, &e.vary) == e.key
                });
                match filled {
                    Some(entry) => {
                        let resp = self.serve_coalesced(&entry, &parts, cx);
                        cx.trace.detail = Some(why);
                        Ok(resp)
                    }
                    None => self.bypass(parts, body, cx, why).await,
                }
            }
            Joined::Leader(leader) => {
                drop(body);
                let job = FillJob {
                    base,
                    flight_id: id,
                    id,
                    tags: Vec::new(),
                    seen: Vec::new(),
                    vary: Vec::new(),
                };
                let resp = self.fill_unstored(parts, leader, job, rule, cx).await;
                cx.trace.outcome = Outcome::Bypass;
                cx.trace.fwd = Some("bypass");
                cx.trace.stored = false;
                cx.trace.ttl = None;
                cx.trace.detail = Some(why);
                resp
            }
            Joined::Relookup => self.bypass(parts, body, cx, why).await,
        }
    }

    /// Wait for another request's fill (bounded by `[cache] lock_timeout`).
    async fn wait_for_fill(
        &self,
        rx: tokio::sync::watch::Receiver<FlightState>,
    ) -> Option<Arc<Entry>> {
        let waited = Instant::now();
        self.metrics.fill_waiters.inc();
        let filled = wait_for_fill(rx, self.config.cache.lock_timeout).await;
        self.metrics.fill_waiters.dec();
        self.metrics
            .lock_wait
            .observe(waited.elapsed().as_secs_f64());
        filled
    }

    /// Answer from another request's fill.
    fn serve_coalesced(&self, entry: &Entry, parts: &Parts, cx: &mut Cx) -> Response<ProxyBody> {
        let now = now_ms();
        cx.trace.outcome = Outcome::Coalesced;
        cx.trace.fwd = None;
        cx.trace.collapsed = true;
        cx.trace.ttl = Some(respond::ttl_left(entry, now));
        respond::from_entry(
            entry.status,
            entry.headers.clone(),
            entry.body.clone(),
            respond::current_age(entry, now),
            &parts.method,
            &parts.headers,
        )
    }

    /// Lead a fill: record generations, take the lease (if distributed), fetch (revalidating
    /// `stale` if there is one), and stream the answer to the client while a bounded copy
    /// goes to the store. A failing upstream is answered from `stale` within its
    /// stale-if-error window. If the generations cannot be recorded (the store failed
    /// since the lookup), the fill still answers its waiters but stores nothing.
    async fn fill(
        self: &Arc<Self>,
        parts: Parts,
        leader: Leader,
        job: FillJob,
        rule: &Rule,
        stale: Option<Entry>,
        cx: &mut Cx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let recorded = match self.cache.record_gens(&job.tags, &job.seen).await {
            Ok(g) => g,
            Err(_) => {
                let seen: Vec<u64> = job.seen.iter().map(|g| g.unwrap_or(0)).collect();
                leader.set_recorded(seen);
                let resp = self.fill_unstored(parts, leader, job, rule, cx).await;
                cx.trace.outcome = Outcome::Bypass;
                cx.trace.fwd = Some("bypass");
                cx.trace.stored = false;
                cx.trace.ttl = None;
                cx.trace.detail = Some("store-unavailable");
                return resp;
            }
        };
        leader.set_recorded(recorded.clone());
        let lease = match self.lease(&job, &recorded).await {
            LeaseOutcome::Filled(entry) => {
                let entry = Arc::new(entry);
                leader.complete(entry.clone());
                leader.stored();
                return Ok(self.serve_coalesced(&entry, &parts, cx));
            }
            LeaseOutcome::Held(l) => Some(l),
            LeaseOutcome::Proceed => None,
        };
        let client_method = parts.method.clone();
        let fetched = self
            .fetch(&parts.headers, &job, &recorded, rule, stale.as_ref(), cx)
            .await;
        match fetched {
            Err(e) => {
                drop(lease);
                match stale.filter(|s| now_ms() < s.sie_until_ms) {
                    Some(s) => Ok(self.serve_stale_on_error(s, &client_method, &parts.headers, cx)),
                    None => Err(e),
                }
            }
            Ok(Fetched::Uncacheable {
                parts: rparts,
                body,
                reason,
            }) => {
                drop((lease, leader));
                if rparts.status.is_server_error()
                    && let Some(s) = stale.filter(|s| now_ms() < s.sie_until_ms)
                {
                    return Ok(self.serve_stale_on_error(s, &client_method, &parts.headers, cx));
                }
                cx.trace.outcome = Outcome::Uncacheable;
                cx.trace.detail = Some(reason);
                Ok(respond_streaming(
                    rparts,
                    body.boxed(),
                    &client_method,
                    None,
                ))
            }
            Ok(Fetched::NotModified { entry, ttl }) => {
                let now = now_ms();
                cx.trace.outcome = Outcome::Revalidated;
                cx.trace.fwd = Some("stale");
                cx.trace.stored = ttl.is_some();
                cx.trace.ttl = Some(respond::ttl_left(&entry, now));
                let resp = respond::from_entry(
                    entry.status,
                    entry.headers.clone(),
                    entry.body.clone(),
                    respond::current_age(&entry, now),
                    &client_method,
                    &parts.headers,
                );
                // Only a storable refresh is shared with waiters: one the origin now marks
                // private, no-store or Set-Cookie belongs to this client alone.
                match ttl {
                    Some(ttl) => self.publish(leader, entry, None, Some(ttl), lease),
                    None => drop((leader, lease)),
                }
                Ok(resp)
            }
            Ok(Fetched::Storable {
                parts: rparts,
                body,
                template,
                marker,
                ttl,
            }) => {
                let now = now_ms();
                cx.trace.outcome = Outcome::Miss;
                cx.trace.stored = true;
                cx.trace.ttl = Some(respond::ttl_left(&template, now));
                Ok(self.stream_fill(
                    rparts,
                    body,
                    template,
                    marker,
                    Some(ttl),
                    leader,
                    lease,
                    &client_method,
                ))
            }
        }
    }

    /// A fill whose result is shared with this process's waiters but never stored (the
    /// store cannot be read or written): the client and the waiters get the response.
    async fn fill_unstored(
        self: &Arc<Self>,
        parts: Parts,
        leader: Leader,
        job: FillJob,
        rule: &Rule,
        cx: &mut Cx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let recorded: Vec<u64> = job.seen.iter().map(|g| g.unwrap_or(0)).collect();
        let client_method = parts.method.clone();
        match self
            .fetch(&parts.headers, &job, &recorded, rule, None, cx)
            .await?
        {
            Fetched::Storable {
                parts: rparts,
                body,
                template,
                ..
            } => Ok(self.stream_fill(
                rparts,
                body,
                template,
                None,
                None,
                leader,
                None,
                &client_method,
            )),
            Fetched::Uncacheable {
                parts: rparts,
                body,
                ..
            } => {
                drop(leader);
                Ok(respond_streaming(
                    rparts,
                    body.boxed(),
                    &client_method,
                    None,
                ))
            }
            Fetched::NotModified { .. } => {
                // Only a revalidation gets a 304, and an unstored fill never revalidates.
                drop(leader);
                Err(ProxyError::UpstreamProtocol(
                    "304 to an unconditional request".into(),
                ))
            }
        }
    }

    /// Stream a storable response to the client while a bounded copy is taken; when the
    /// body is complete the entry is published to waiters and, with a `ttl`, stored.
    #[allow(clippy::too_many_arguments)]
    fn stream_fill(
        self: &Arc<Self>,
        rparts: http::response::Parts,
        body: DownBody,
        template: Entry,
        marker: Option<Entry>,
        ttl: Option<Duration>,
        leader: Leader,
        lease: Option<Lease>,
        client_method: &Method,
    ) -> Response<ProxyBody> {
        let engine = self.clone();
        let on_complete: body::OnComplete = Box::new(move |bytes: Bytes| {
            let mut entry = template;
            entry.body = bytes;
            engine.publish(leader, entry, marker, ttl, lease);
        });
        let limit = self.config.cache.max_object_size;
        let tee = Tee::new(body, limit, on_complete);
        respond_streaming(rparts, tee.boxed(), client_method, Some(limit))
    }

    /// Answer with a stale entry because the upstream failed (RFC 5861 stale-if-error).
    fn serve_stale_on_error(
        &self,
        entry: Entry,
        method: &Method,
        request: &HeaderMap,
        cx: &mut Cx,
    ) -> Response<ProxyBody> {
        let now = now_ms();
        cx.trace.outcome = Outcome::Stale;
        cx.trace.fwd = Some("stale");
        cx.trace.detail = Some("stale-if-error");
        cx.trace.stored = false;
        cx.trace.ttl = Some(respond::ttl_left(&entry, now));
        let age = respond::current_age(&entry, now);
        respond::from_entry(
            entry.status,
            entry.headers,
            entry.body,
            age,
            method,
            request,
        )
    }

    /// The request a fill sends: exactly what its key describes, built from scratch (GET,
    /// canonical path and normalized query, Host, the varied headers, the Accept-Encoding
    /// bucket, the rule's `fill_headers`, cachegate's own forwarding headers, and, for an
    /// entry of one user, that user's credentials and subject). Nothing else the client
    /// sent can shape an entry another client receives. `extra` names more headers the
    /// origin's `Vary` asks for.
    fn fill_request(
        &self,
        client: &HeaderMap,
        job: &FillJob,
        rule: &Rule,
        extra: &[HeaderName],
        cx: &Cx,
    ) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(12 + rule.vary.len() + rule.fill_headers.len());
        if let Ok(host) = HeaderValue::from_str(&job.base.host) {
            headers::set_fill_forwarded(&mut h, cx.client.ip(), &host);
            h.insert(header::HOST, host);
        }
        let names = rule
            .vary
            .iter()
            .chain(&job.vary)
            .chain(extra)
            .chain(&rule.fill_headers);
        for name in names {
            if name == header::ACCEPT_ENCODING || h.contains_key(name) {
                continue;
            }
            if !self.may_fill(name, rule, job) {
                continue;
            }
            for v in client.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static(key::accept_encoding_bucket(client)),
        );
        if job.base.scope.is_some() {
            // The entry is this user's own: the upstream sees who asks, as on a pass-through.
            for name in [&header::AUTHORIZATION, &self.config.auth.subject_header] {
                if let Some(v) = client.get(name) {
                    h.insert(name.clone(), v.clone());
                }
            }
        }
        h
    }

    /// May a fill forward this header? Not a credential on an entry shared between users
    /// (unless the rule keys by it), and nothing cachegate sets itself.
    fn may_fill(&self, name: &HeaderName, rule: &Rule, job: &FillJob) -> bool {
        if name == header::ACCEPT_ENCODING
            || rule.vary.contains(name)
            || rule.fill_headers.contains(name)
        {
            // Accept-Encoding goes as its bucket, which is what the key holds.
            return true;
        }
        if headers::never_filled(name).is_some() {
            return false;
        }
        let credential =
            name == header::AUTHORIZATION || self.config.cache.credential_headers.contains(name);
        !credential || (name == header::AUTHORIZATION && job.base.scope.is_some())
    }

    /// Ask the upstream for exactly what the key says (see `fill_request`), with the stale
    /// entry's validators when revalidating, and decide what may be stored. When the
    /// origin's `Vary` names a header this client sent that the fill did not, the answer
    /// does not fit this client: it is asked for once more with those headers.
    async fn fetch(
        &self,
        client: &HeaderMap,
        job: &FillJob,
        recorded: &[u64],
        rule: &Rule,
        stale: Option<&Entry>,
        cx: &mut Cx,
    ) -> Result<Fetched, ProxyError> {
        cx.target = job.base.fill_target();
        let mut extra: Vec<HeaderName> = Vec::new();
        let (mut rparts, body, request_headers, origin_vary) = loop {
            let mut request_headers = self.fill_request(client, job, rule, &extra, cx);
            if let Some(s) = stale {
                // RFC 9111 §4.3.1: revalidate with the stored validators.
                if let Some(etag) = s.headers.get(header::ETAG) {
                    request_headers.insert(header::IF_NONE_MATCH, etag.clone());
                }
                if let Some(lm) = s.headers.get(header::LAST_MODIFIED) {
                    request_headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
                }
            }
            let resp = self
                .forward(Method::GET, request_headers.clone(), empty_up(), cx)
                .await?;
            let (rparts, body) = resp.into_parts();
            let origin_vary = vary_names(&rparts.headers, &job.base.rule_vary);
            let missing: Vec<HeaderName> = origin_vary
                .iter()
                .filter(|n| {
                    !request_headers.contains_key(*n)
                        && client.contains_key(*n)
                        && self.may_fill(n, rule, job)
                })
                .cloned()
                .collect();
            if missing.is_empty() || !extra.is_empty() {
                break (rparts, body, request_headers, origin_vary);
            }
            // The first answer was made for a request without these headers; this client
            // has them. (A resource known to vary is filled with them from the start.)
            drop(body);
            extra = missing;
        };
        cx.trace.fwd_status = Some(rparts.status.as_u16());
        let now = now_ms();
        let statuses = &self.config.cache.statuses;
        if rparts.status == StatusCode::NOT_MODIFIED
            && let Some(s) = stale
        {
            // RFC 9111 §4.3.4: the stored response, its headers updated from the 304 (which
            // gets a Date if it has none, so the refreshed entry's age starts now).
            if !rparts.headers.contains_key(header::DATE)
                && let Ok(date) = HeaderValue::from_str(&policy::format_http_date(now / 1000))
            {
                rparts.headers.insert(header::DATE, date);
            }
            let mut entry = s.clone();
            refresh_headers(&mut entry.headers, &rparts.headers);
            let ttl = policy::decide(
                entry.status,
                &entry.headers,
                &rule_policy(rule),
                statuses,
                now,
            )
            .ok()
            .map(|fresh| {
                retime(&mut entry, &job.tags, recorded, &fresh, now);
                fresh.store_ttl
            });
            return Ok(Fetched::NotModified { entry, ttl });
        }
        if !rparts.headers.contains_key(header::DATE)
            && let Ok(date) = HeaderValue::from_str(&policy::format_http_date(now / 1000))
        {
            rparts.headers.insert(header::DATE, date);
        }
        let decision = policy::decide(
            rparts.status,
            &rparts.headers,
            &rule_policy(rule),
            statuses,
            now,
        )
        .and_then(|f| {
            let too_large = content_length(&rparts.headers)
                .is_some_and(|n| n > self.config.cache.max_object_size as u64);
            if too_large { Err("too-large") } else { Ok(f) }
        })
        .and_then(|f| {
            // Varying on a credential the fill may not send: the answer was made without
            // it, and no key could tell its variants apart.
            if origin_vary.iter().any(|n| !self.may_fill(n, rule, job)) {
                Err("vary-credential")
            } else {
                Ok(f)
            }
        });
        let fresh = match decision {
            Ok(f) => f,
            Err(reason) => {
                return Ok(Fetched::Uncacheable {
                    parts: rparts,
                    body,
                    reason,
                });
            }
        };
        let mut template = entry_template(job.id, &rparts, &job.tags, recorded, &fresh, now);
        // The origin's Vary (beyond the rule's own `vary`): the response is stored as a
        // variant keyed by those request headers as the fill sent them, with a marker
        // under the plain key.
        let marker = if origin_vary.is_empty() {
            None
        } else {
            template.key = job.base.id(&request_headers, &origin_vary);
            template.vary = origin_vary;
            Some(vary_marker(job.id, &template))
        };
        Ok(Fetched::Storable {
            parts: rparts,
            body,
            template,
            marker,
            ttl: fresh.store_ttl,
        })
    }

    /// Write a finished fill (and its vary marker), then retire its flight. The flight
    /// lingers briefly after the write (`Cache::write_linger`): a request whose lookup ran
    /// just before the write landed is sent back to the store once instead of fetching again.
    ///
    /// Waiters get the entry at once; the write (and the flight's retirement) runs in the
    /// background.
    fn publish(
        self: &Arc<Self>,
        leader: Leader,
        entry: Entry,
        marker: Option<Entry>,
        ttl: Option<Duration>,
        lease: Option<Lease>,
    ) {
        let entry = Arc::new(entry);
        leader.complete(entry.clone());
        let Some(ttl) = ttl else {
            // Not to be stored: the waiters have it; the flight retires now.
            drop((leader, lease));
            return;
        };
        let engine = self.clone();
        tokio::spawn(async move {
            let mut entries: Vec<&Entry> = vec![&entry];
            entries.extend(marker.as_ref());
            let stored = engine.cache.put(&entries, ttl).await.is_ok();
            // Dropping the lease gives it back, so other instances read the store now.
            drop(lease);
            if stored {
                leader.stored();
                tokio::time::sleep(engine.cache.write_linger()).await;
            }
            drop(leader);
        });
    }

    /// With `[cache] distributed_lock`: take the key's lease, or wait (polling the store)
    /// for the instance that holds it to store the entry.
    async fn lease(&self, job: &FillJob, recorded: &[u64]) -> LeaseOutcome {
        if !self.config.cache.distributed_lock {
            return LeaseOutcome::Proceed;
        }
        let store = self.cache.store();
        let key = job.flight_id.redis_key(self.cache.prefix(), key::LOCK);
        let token = Bytes::from(random_u64().to_string());
        // The lease outlives the slowest fill the upstream timeout allows.
        let lease_ttl = self.config.upstream.timeout + Duration::from_secs(1);
        let gens: Vec<Option<u64>> = recorded.iter().map(|g| Some(*g)).collect();
        let started = Instant::now();
        loop {
            match store
                .call(
                    Op::Lock,
                    store.store().set_nx(key.clone(), token.clone(), lease_ttl),
                )
                .await
            {
                Ok(true) => {
                    return LeaseOutcome::Held(Lease {
                        cache: self.cache.clone(),
                        key,
                        token,
                    });
                }
                Ok(false) => {}
                Err(_) => return LeaseOutcome::Proceed,
            }
            if started.elapsed() >= self.config.cache.lock_timeout {
                self.metrics
                    .lock_wait
                    .observe(started.elapsed().as_secs_f64());
                return LeaseOutcome::Proceed;
            }
            tokio::time::sleep(LEASE_POLL).await;
            if let Ok(Found::Entry(e)) = self
                .cache
                .lookup_entry(&job.flight_id, &job.tags, &gens)
                .await
                && e.flags & entry_flags::VARY_INDEX == 0
                && now_ms() < e.fresh_until_ms
            {
                self.metrics
                    .lock_wait
                    .observe(started.elapsed().as_secs_f64());
                return LeaseOutcome::Filled(e);
            }
        }
    }

    /// Refresh a stale entry in the background (stale-while-revalidate), once per key in
    /// the process (and once across instances with the distributed lock).
    fn spawn_refresh(
        self: &Arc<Self>,
        headers: &HeaderMap,
        client: std::net::SocketAddr,
        job: FillJob,
        rule_index: usize,
        stale: Entry,
    ) {
        let epoch = self.purger.epoch();
        let Joined::Leader(leader) =
            self.cache
                .flights
                .join(job.flight_id, &job.seen, false, epoch)
        else {
            return; // a refresh (or a fill) is already under way
        };
        let headers = headers.clone();
        let engine = self.clone();
        tokio::spawn(async move {
            let result = engine
                .refresh(headers, client, leader, job, rule_index, stale)
                .await;
            engine.metrics.refresh(result);
        });
    }

    async fn refresh(
        self: &Arc<Self>,
        headers: HeaderMap,
        client: std::net::SocketAddr,
        leader: Leader,
        job: FillJob,
        rule_index: usize,
        stale: Entry,
    ) -> &'static str {
        let config = self.config.clone();
        let Some(rule) = config.rules.rules().get(rule_index) else {
            return "error";
        };
        let mut cx = Cx::background(rule_index, client);
        let Ok(recorded) = self.cache.record_gens(&job.tags, &job.seen).await else {
            return "error";
        };
        leader.set_recorded(recorded.clone());
        let lease = match self.lease(&job, &recorded).await {
            LeaseOutcome::Filled(_) => return "refreshed",
            LeaseOutcome::Held(l) => Some(l),
            LeaseOutcome::Proceed => None,
        };
        let fetched = self
            .fetch(&headers, &job, &recorded, rule, Some(&stale), &mut cx)
            .await;
        match fetched {
            Ok(Fetched::NotModified {
                entry,
                ttl: Some(ttl),
            }) => {
                self.publish(leader, entry, None, Some(ttl), lease);
                "not_modified"
            }
            Ok(Fetched::Storable {
                body,
                template,
                marker,
                ttl,
                ..
            }) => match body::collect_limited(body, self.config.cache.max_object_size).await {
                Ok(Some(bytes)) => {
                    let mut entry = template;
                    entry.body = bytes;
                    self.publish(leader, entry, marker, Some(ttl), lease);
                    "refreshed"
                }
                Ok(None) => "uncacheable",
                Err(_) => "error",
            },
            Ok(_) => "uncacheable",
            Err(_) => "error",
        }
    }
}

impl Cx {
    /// Bookkeeping of a request made by cachegate itself (a background refresh).
    fn background(rule_index: usize, client: std::net::SocketAddr) -> Cx {
        Cx {
            client,
            rule: Some(rule_index),
            trace: respond::Trace::default(),
            upstream_ms: None,
            target: String::new(),
        }
    }
}

/// RFC 9111 §4.3.4: replace stored header fields with those of the 304, except
/// Content-Length (which describes the 304, not the stored body).
fn refresh_headers(stored: &mut HeaderMap, update: &HeaderMap) {
    for name in update.keys() {
        if name == header::CONTENT_LENGTH || NOT_STORED.contains(name) {
            continue;
        }
        stored.remove(name);
        for v in update.get_all(name) {
            stored.append(name.clone(), v.clone());
        }
    }
}

/// Give a revalidated entry the new timeline and the generations read for this fill.
fn retime(entry: &mut Entry, tags: &[Id], recorded: &[u64], fresh: &Freshness, now: u64) {
    entry.stored_at_ms = now;
    entry.age_at_store_s = fresh.age_at_store_s;
    entry.fresh_until_ms = fresh.fresh_until_ms;
    entry.swr_until_ms = fresh.swr_until_ms;
    entry.sie_until_ms = fresh.sie_until_ms;
    entry.flags = freshness_flags(fresh) | (entry.flags & entry_flags::VARY_INDEX);
    entry.gens = tags.iter().copied().zip(recorded.iter().copied()).collect();
}

fn pragma_no_cache(headers: &HeaderMap) -> bool {
    // RFC 9111 §5.4: Pragma: no-cache counts only when Cache-Control is absent.
    !headers.contains_key(header::CACHE_CONTROL)
        && headers.get_all(header::PRAGMA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("no-cache"))
        })
}

/// Header names the origin's `Vary` lists beyond the rule's own (lower-case, sorted).
fn vary_names(headers: &HeaderMap, rule_vary: &[HeaderName]) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
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

/// The response to the client for an upstream answer, honouring HEAD. `store`: the body is
/// a tee whose copy is being stored, at most that many bytes: a HEAD then keeps draining it
/// in the background, but never past the limit (where the tee gives up its copy anyway).
/// Otherwise the body is dropped, which costs the pooled connection, not a download.
fn respond_streaming(
    parts: http::response::Parts,
    body: ProxyBody,
    client_method: &Method,
    store: Option<usize>,
) -> Response<ProxyBody> {
    if client_method == Method::HEAD {
        if let Some(limit) = store {
            tokio::spawn(async move {
                let mut body = body;
                let mut read = 0usize;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => read += f.data_ref().map_or(0, |d| d.len()),
                        Err(_) => break,
                    }
                    if read > limit {
                        break;
                    }
                }
            });
        }
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

pub(super) fn query_keep(policy: &QueryPolicy) -> QueryKeep<'_> {
    match policy {
        QueryPolicy::Sorted => QueryKeep::All,
        QueryPolicy::Ignore => QueryKeep::None,
        QueryPolicy::Keep(names) => QueryKeep::Only(names),
    }
}

/// The tags an entry of this rule carries: its own, the implicit path tag (RFC 9111 §4.4),
/// the global tag, and the subject tag when user-scoped.
pub(super) fn tags_for(
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

pub(super) fn rule_policy(rule: &Rule) -> RulePolicy {
    RulePolicy {
        ttl: rule.ttl.unwrap_or_default(),
        stale_while_revalidate: rule.stale_while_revalidate,
        stale_if_error: rule.stale_if_error,
        origin: rule.origin_cache_control,
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
static NOT_STORED: [HeaderName; 4] = [
    header::AGE,
    HeaderName::from_static("x-cache"),
    HeaderName::from_static("cache-status"),
    // RFC 9111 §3.1: it describes one connection's proxy authentication.
    HeaderName::from_static("proxy-authentication-info"),
];

fn freshness_flags(fresh: &Freshness) -> u16 {
    let mut flags = 0;
    if fresh.no_cache {
        flags |= entry_flags::NO_CACHE;
    }
    if fresh.must_revalidate {
        flags |= entry_flags::MUST_REVALIDATE;
    }
    flags
}

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
    Entry {
        key: id,
        status: rparts.status,
        flags: freshness_flags(fresh),
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

/// What `GET /explain` reports: how a request would be routed, keyed and cached, and
/// what is stored under its key now. Never a secret: no tokens, no stored bodies.
pub struct Explain<'a> {
    pub method: &'a str,
    pub url: &'a str,
    /// The Host the client would send; needed to name the entry.
    pub host: Option<&'a str>,
    /// The session subject, for user-scoped rules.
    pub sub: Option<&'a str>,
}

impl Engine {
    /// What a fill of this rule sends the upstream (`fill_request`), header names only.
    fn explain_fill(&self, rule: &Rule, path: &str, query: &str) -> serde_json::Value {
        let mut forwarded: Vec<String> = vec!["host".into()];
        forwarded.extend(rule.vary.iter().map(|h| h.to_string()));
        forwarded.extend(
            rule.fill_headers
                .iter()
                .filter(|h| !rule.vary.contains(h))
                .map(|h| h.to_string()),
        );
        forwarded.push("accept-encoding (as gzip, br or identity)".into());
        for own in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
            "via",
        ] {
            forwarded.push(format!("{own} (set by cachegate)"));
        }
        if rule.scope == Scope::User {
            forwarded.push("authorization (the user's own entries only)".into());
            forwarded.push(format!(
                "{} (the verified subject)",
                self.config.auth.subject_header
            ));
        }
        let target = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        };
        serde_json::json!({
            "method": "GET",
            "target": target,
            "headers": forwarded,
            "also": "the request headers the origin's Vary names for the resource (credentials excepted); nothing else the client sent",
        })
    }

    /// Explain a request (admin `/explain`).
    pub async fn explain(&self, q: Explain<'_>) -> serde_json::Value {
        use serde_json::json;
        let method =
            Method::from_bytes(q.method.to_ascii_uppercase().as_bytes()).unwrap_or(Method::GET);
        let uri: http::Uri = match q.url.parse() {
            Ok(u) => u,
            Err(_) => {
                return json!({ "error": "url is not a request target (e.g. /user/42?page=1)" });
            }
        };
        let path = match crate::normalize::canonical_path(uri.path()) {
            Ok(p) => p.into_owned(),
            Err(e) => return json!({ "url": q.url, "decision": format!("refused with 400: {e}") }),
        };
        let config = self.config.clone();
        let Some(m) = config.rules.at(&path) else {
            let auth = config.auth.default.as_str();
            let purge = if method_is_safe(&method) {
                vec![]
            } else {
                vec![format!("path:{path}")]
            };
            return json!({
                "method": method.as_str(), "url": q.url, "canonical_path": path, "rule": null,
                "auth": auth,
                "decision": "not cached: no rule matches this path; proxied untouched",
                "purge_on_success": purge,
            });
        };
        let rule = m.rule;
        let params: serde_json::Map<String, serde_json::Value> = m
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut query = String::new();
        normalized_query(uri.query(), query_keep(&rule.query), &mut query);
        let tags: Vec<String> = rule
            .tags
            .iter()
            .map(|t| t.render(&m.params))
            .chain([format!("path:{path}"), "*".to_string()])
            .chain(match (rule.scope, q.sub) {
                (Scope::User, Some(sub)) => Some(format!("sub:{sub}")),
                _ => None,
            })
            .collect();
        let purge: Vec<String> = rule
            .purge
            .iter()
            .map(|t| t.render(&m.params))
            .chain([format!("path:{path}")])
            .collect();
        let decision = if !method_is_safe(&method) {
            "not cached: an unsafe method; a 2xx/3xx answer purges the tags in purge_on_success"
                .to_string()
        } else if method != Method::GET && method != Method::HEAD {
            "not cached: only GET and HEAD are".to_string()
        } else if rule.ttl.is_none() {
            format!("not cached: rule {:?} has no ttl", rule.name)
        } else {
            let who = match rule.scope {
                Scope::User => "one entry per session subject",
                Scope::Public => "one entry shared by every caller",
                Scope::Anonymous => {
                    "shared by anonymous requests; requests carrying Authorization bypass"
                }
            };
            format!(
                "cached for up to {} ({who}) when the response is storable: status in [cache] statuses, \
                 no Set-Cookie, no private/no-store (origin_cache_control = {}), body <= max_object_size",
                crate::config::units::format_duration(rule.ttl.unwrap_or_default()),
                rule.origin_cache_control.as_str(),
            )
        };
        let mut out = json!({
            "method": method.as_str(),
            "url": q.url,
            "canonical_path": path,
            "rule": {
                "name": &*rule.name,
                "match": rule.template.source,
                "params": params,
                "ttl_s": rule.ttl.map(|d| d.as_secs()),
                "auth": rule.auth.as_str(),
                "scope": rule.scope.as_str(),
                "query": match &rule.query {
                    QueryPolicy::Sorted => json!("sorted"),
                    QueryPolicy::Ignore => json!("ignore"),
                    QueryPolicy::Keep(n) => json!(n),
                },
                "vary": rule.vary.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                "stale_while_revalidate_s": rule.stale_while_revalidate.as_secs(),
                "stale_if_error_s": rule.stale_if_error.as_secs(),
                "origin_cache_control": rule.origin_cache_control.as_str(),
            },
            "decision": decision,
            "key": { "normalized_query": query, "tags": tags },
            "purge_on_success": purge,
        });
        let cached_rule = rule.ttl.is_some() && (method == Method::GET || method == Method::HEAD);
        if cached_rule {
            out["fill_request"] = self.explain_fill(rule, &path, &query);
        }
        let needs_sub = rule.scope == Scope::User && q.sub.is_none();
        if let (true, Some(host), false) = (cached_rule, q.host, needs_sub) {
            let base = KeyBase {
                host: host.to_ascii_lowercase(),
                path: path.clone(),
                query,
                scope: if rule.scope == Scope::User {
                    q.sub.map(str::to_string)
                } else {
                    None
                },
                rule_vary: rule.vary.clone(),
            };
            let id = base.id(&HeaderMap::new(), &[]);
            let tag_ids = tags_for(rule, &m.params, &path, base.scope.as_deref());
            out["key"]["redis_key"] = json!(String::from_utf8_lossy(&self.cache.entry_key(&id)));
            out["stored"] = match self.cache.lookup(&id, &tag_ids, None).await {
                Err(e) => json!({ "state": "unknown", "error": e.to_string() }),
                Ok(l) => {
                    let now = now_ms();
                    match l.found {
                        Found::Absent => json!({ "state": "absent" }),
                        Found::Dead => {
                            json!({ "state": "dead", "why": "a tag was purged after the fill" })
                        }
                        Found::Corrupt => {
                            json!({ "state": "unreadable", "why": "not a valid entry; the next fill overwrites it" })
                        }
                        Found::Entry(e) if e.flags & entry_flags::VARY_INDEX != 0 => json!({
                            "state": "varies",
                            "vary": e.vary.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                            "why": "the origin sent Vary: each variant has its own key",
                        }),
                        Found::Entry(e) => json!({
                            "state": if now < e.fresh_until_ms { "fresh" } else { "stale" },
                            "status": e.status.as_u16(),
                            "ttl_s": respond::ttl_left(&e, now),
                            "age_s": respond::current_age(&e, now),
                            "body_bytes": e.body.len(),
                        }),
                    }
                }
            };
        } else if cached_rule {
            out["stored"] = json!({
                "state": "unknown",
                "why": if needs_sub { "pass sub=<subject> (and host=) to look up a user's entry" } else { "pass host=<Host the clients send> to look up the entry" },
            });
        }
        out
    }
}
