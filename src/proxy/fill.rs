//! Filling the cache: the leader of a key's flight records the tag generations, takes the
//! cross-instance lease (with `distributed_lock`), asks the upstream for exactly what the
//! key describes (revalidating a stale entry with its validators), and streams the answer
//! to the client while a bounded copy goes to the store; waiters get the finished entry.
//! A stale entry answers when the upstream fails within its stale-if-error window, and is
//! refreshed in the background within its stale-while-revalidate window.
//!
//! Nothing here decides cacheability itself: that is `cache::policy`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;

use super::error::ProxyError;
use super::forward;
use super::headers;
use super::lookup::{KeyBase, serve_coalesced};
use super::respond::{self, Fwd, Trace};
use super::{Cx, Served};
use crate::app::{App, Live};
use crate::body::{self, ProxyBody, Tee, empty};
use crate::cache::Cache;
use crate::cache::coalesce::{self, Joined, Leader, Lease, LeaseOutcome};
use crate::cache::entry::Entry;
use crate::cache::key::{self, Id};
use crate::cache::policy::{self, RulePolicy};
use crate::cache::revalidate;
use crate::clock::now_ms;
use crate::labels::{Outcome, Reason, RefreshResult};
use crate::routing::Rule;
use crate::upstream::DownBody;

/// The inputs of a fill that outlive the request (background refreshes).
pub struct FillJob {
    pub base: KeyBase,
    /// The key the flight and lease are for: the variant's, when the resource varies.
    pub flight_id: Id,
    /// The plain key (where a vary marker goes).
    pub id: Id,
    pub tags: Vec<Id>,
    /// Generations the lookup read.
    pub seen: Vec<Option<u64>>,
    /// Request headers the origin is known to vary on (from the vary marker).
    pub vary: Vec<HeaderName>,
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
        reason: Reason,
    },
}

/// What a rule says about freshness, for the policy.
pub fn rule_policy(rule: &Rule) -> RulePolicy {
    RulePolicy {
        ttl: rule.ttl.unwrap_or_default(),
        stale_while_revalidate: rule.stale_while_revalidate,
        stale_if_error: rule.stale_if_error,
        origin: rule.origin_cache_control,
    }
}

/// Lead a fill: record generations, take the lease (if distributed), fetch (revalidating
/// `stale` if there is one), and stream the answer to the client while a bounded copy
/// goes to the store. A failing upstream is answered from `stale` within its
/// stale-if-error window. If the generations cannot be recorded (the store failed since
/// the lookup), the fill still answers its waiters but stores nothing. `miss` says why the
/// request went upstream.
pub async fn fill(
    cx: &mut Cx,
    parts: Parts,
    leader: Leader,
    job: FillJob,
    rule: &Rule,
    stale: Option<Arc<Entry>>,
    miss: Trace,
) -> Result<Served, ProxyError> {
    let recorded = match cx.app.cache.record_gens(&job.tags, &job.seen).await {
        Ok(g) => g,
        Err(_) => {
            let seen: Vec<u64> = job.seen.iter().map(|g| g.unwrap_or(0)).collect();
            leader.set_recorded(seen);
            let mut served = fill_unstored(cx, parts, leader, job, rule).await?;
            served.trace.reason = Some(Reason::StoreUnavailable);
            return Ok(served);
        }
    };
    leader.set_recorded(recorded.clone());
    let lease = match lease(cx, &job, &recorded).await {
        LeaseOutcome::Filled(entry) => {
            leader.complete(entry.clone());
            leader.stored();
            return Ok(serve_coalesced(&entry, &parts));
        }
        LeaseOutcome::Held(l) => Some(l),
        LeaseOutcome::Proceed => None,
    };
    let client_method = parts.method.clone();
    let fetched = fetch(cx, &parts.headers, &job, &recorded, rule, stale.as_deref()).await;
    match fetched {
        Err(e) => {
            drop(lease);
            match stale.filter(|s| now_ms() < s.sie_until_ms) {
                Some(s) => Ok(serve_stale_on_error(
                    s,
                    &client_method,
                    &parts.headers,
                    None,
                )),
                None => Err(e),
            }
        }
        Ok((
            Fetched::Uncacheable {
                parts: rparts,
                body,
                reason,
            },
            status,
        )) => {
            drop((lease, leader));
            if rparts.status.is_server_error()
                && let Some(s) = stale.filter(|s| now_ms() < s.sie_until_ms)
            {
                let status = Some(rparts.status);
                return Ok(serve_stale_on_error(
                    s,
                    &client_method,
                    &parts.headers,
                    status,
                ));
            }
            let trace = Trace {
                outcome: Outcome::Uncacheable,
                reason: Some(reason),
                fwd_status: Some(status.as_u16()),
                ..miss
            };
            let response = respond_streaming(rparts, body.boxed(), &client_method, None);
            Ok(Served::new(response, trace))
        }
        Ok((Fetched::NotModified { entry, ttl }, status)) => {
            let now = now_ms();
            let trace = Trace {
                outcome: Outcome::Revalidated,
                fwd: Some(Fwd::Stale),
                fwd_status: Some(status.as_u16()),
                stored: ttl.is_some(),
                ttl: Some(respond::ttl_left(&entry, now)),
                ..miss
            };
            let response = respond::from_entry(
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
                Some(ttl) => publish(&cx.app, leader, entry, None, Some(ttl), lease),
                None => drop((leader, lease)),
            }
            Ok(Served::new(response, trace))
        }
        Ok((
            Fetched::Storable {
                parts: rparts,
                body,
                template,
                marker,
                ttl,
            },
            status,
        )) => {
            let trace = Trace {
                outcome: Outcome::Miss,
                fwd_status: Some(status.as_u16()),
                stored: true,
                ttl: Some(respond::ttl_left(&template, now_ms())),
                ..miss
            };
            let response = stream_fill(
                cx,
                rparts,
                body,
                template,
                marker,
                Some(ttl),
                leader,
                lease,
                &client_method,
            );
            Ok(Served::new(response, trace))
        }
    }
}

/// A fill whose result is shared with this process's waiters but never stored (the
/// store cannot be read or written): the client and the waiters get the response.
pub async fn fill_unstored(
    cx: &mut Cx,
    parts: Parts,
    leader: Leader,
    job: FillJob,
    rule: &Rule,
) -> Result<Served, ProxyError> {
    let recorded: Vec<u64> = job.seen.iter().map(|g| g.unwrap_or(0)).collect();
    let client_method = parts.method.clone();
    let (fetched, status) = fetch(cx, &parts.headers, &job, &recorded, rule, None).await?;
    let trace = Trace::bypass(None).with_status(status);
    match fetched {
        Fetched::Storable {
            parts: rparts,
            body,
            template,
            ..
        } => {
            let response = stream_fill(
                cx,
                rparts,
                body,
                template,
                None,
                None,
                leader,
                None,
                &client_method,
            );
            Ok(Served::new(response, trace))
        }
        Fetched::Uncacheable {
            parts: rparts,
            body,
            ..
        } => {
            drop(leader);
            let response = respond_streaming(rparts, body.boxed(), &client_method, None);
            Ok(Served::new(response, trace))
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
    cx: &Cx,
    rparts: http::response::Parts,
    body: DownBody,
    template: Entry,
    marker: Option<Entry>,
    ttl: Option<Duration>,
    leader: Leader,
    lease: Option<Lease>,
    client_method: &Method,
) -> Response<ProxyBody> {
    let app = cx.app.clone();
    let on_complete: body::OnComplete = Box::new(move |bytes: Bytes| {
        let mut entry = template;
        entry.body = bytes;
        publish(&app, leader, entry, marker, ttl, lease);
    });
    let limit = cx.live.config.cache.max_object_size;
    let tee = Tee::new(body, limit, on_complete);
    respond_streaming(rparts, tee.boxed(), client_method, Some(limit))
}

/// The request a fill sends: exactly what its key describes, built from scratch (GET,
/// canonical path and normalized query, Host, the varied headers, the Accept-Encoding
/// bucket, the rule's `fill_headers`, cachegate's own forwarding headers, and, for an
/// entry of one user, that user's credentials and subject). Nothing else the client sent
/// can shape an entry another client receives. `extra` names more headers the origin's
/// `Vary` asks for.
fn fill_request(
    live: &Live,
    client_addr: SocketAddr,
    client: &HeaderMap,
    job: &FillJob,
    rule: &Rule,
    extra: &[HeaderName],
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(12 + rule.vary.len() + rule.fill_headers.len());
    if let Ok(host) = HeaderValue::from_str(&job.base.host) {
        headers::set_fill_forwarded(&mut h, client_addr.ip(), &host);
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
        if !may_fill(live, name, rule, job) {
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
        for name in [&header::AUTHORIZATION, &live.config.auth.subject_header] {
            if let Some(v) = client.get(name) {
                h.insert(name.clone(), v.clone());
            }
        }
    }
    h
}

/// May a fill forward this header? Not a credential on an entry shared between users
/// (unless the rule keys by it), and nothing cachegate sets itself.
fn may_fill(live: &Live, name: &HeaderName, rule: &Rule, job: &FillJob) -> bool {
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
        name == header::AUTHORIZATION || live.config.cache.credential_headers.contains(name);
    !credential || (name == header::AUTHORIZATION && job.base.scope.is_some())
}

/// Ask the upstream for exactly what the key says (see `fill_request`), with the stale
/// entry's validators when revalidating, and decide what may be stored. When the origin's
/// `Vary` names a header this client sent that the fill did not, the answer does not fit
/// this client: it is asked for once more with those headers. Returns the upstream status
/// too.
async fn fetch(
    cx: &mut Cx,
    client: &HeaderMap,
    job: &FillJob,
    recorded: &[u64],
    rule: &Rule,
    stale: Option<&Entry>,
) -> Result<(Fetched, StatusCode), ProxyError> {
    cx.target = job.base.fill_target();
    let live = cx.live.clone();
    let mut extra: Vec<HeaderName> = Vec::new();
    let (mut rparts, body, request_headers, origin_vary) = loop {
        let mut request_headers = fill_request(&live, cx.client, client, job, rule, &extra);
        if let Some(s) = stale {
            revalidate::add_validators(&mut request_headers, s);
        }
        let resp =
            forward::forward(cx, Method::GET, request_headers.clone(), forward::no_body()).await?;
        let (rparts, body) = resp.into_parts();
        let origin_vary = policy::vary_names(&rparts.headers, &job.base.rule_vary);
        let missing: Vec<HeaderName> = origin_vary
            .iter()
            .filter(|n| {
                !request_headers.contains_key(*n)
                    && client.contains_key(*n)
                    && may_fill(&live, n, rule, job)
            })
            .cloned()
            .collect();
        if missing.is_empty() || !extra.is_empty() {
            break (rparts, body, request_headers, origin_vary);
        }
        // The first answer was made for a request without these headers; this client has
        // them. (A resource known to vary is filled with them from the start.)
        drop(body);
        extra = missing;
    };
    let status = rparts.status;
    let now = now_ms();
    let statuses = &live.config.cache.statuses;
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
        let mut entry = Entry::clone(s);
        revalidate::refresh_headers(&mut entry.headers, &rparts.headers);
        let ttl = policy::decide(
            entry.status,
            &entry.headers,
            &rule_policy(rule),
            statuses,
            now,
        )
        .ok()
        .map(|fresh| {
            revalidate::retime(&mut entry, &job.tags, recorded, &fresh, now);
            fresh.store_ttl
        });
        return Ok((Fetched::NotModified { entry, ttl }, status));
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
        let too_large = policy::content_length(&rparts.headers)
            .is_some_and(|n| n > live.config.cache.max_object_size as u64);
        if too_large {
            Err(Reason::TooLarge)
        } else {
            Ok(f)
        }
    })
    .and_then(|f| {
        // Varying on a credential the fill may not send: the answer was made without it,
        // and no key could tell its variants apart.
        if origin_vary.iter().any(|n| !may_fill(&live, n, rule, job)) {
            Err(Reason::VaryCredential)
        } else {
            Ok(f)
        }
    });
    let fresh = match decision {
        Ok(f) => f,
        Err(reason) => {
            let fetched = Fetched::Uncacheable {
                parts: rparts,
                body,
                reason,
            };
            return Ok((fetched, status));
        }
    };
    let mut template =
        revalidate::entry_template(job.id, &rparts, &job.tags, recorded, &fresh, now);
    // The origin's Vary (beyond the rule's own `vary`): the response is stored as a variant
    // keyed by those request headers as the fill sent them, with a marker under the plain
    // key.
    let marker = if origin_vary.is_empty() {
        None
    } else {
        template.key = job.base.id(&request_headers, &origin_vary);
        template.vary = origin_vary;
        Some(revalidate::vary_marker(job.id, &template))
    };
    let fetched = Fetched::Storable {
        parts: rparts,
        body,
        template,
        marker,
        ttl: fresh.store_ttl,
    };
    Ok((fetched, status))
}

/// Publish a finished fill to its waiters, then (with a `ttl`) write it and its vary
/// marker and retire the flight. The flight lingers briefly after the write
/// (`Cache::write_linger`): a request whose lookup ran just before the write landed is sent
/// back to the store once instead of fetching again.
fn publish(
    app: &Arc<App>,
    leader: Leader,
    entry: Entry,
    marker: Option<Entry>,
    ttl: Option<Duration>,
    lease: Option<Lease>,
) {
    // Waiters, the lingering flight and the in-process tier share one compact copy.
    let entry = Arc::new(Cache::compact(&entry));
    if let Some(ttl) = ttl {
        // The in-process tier has it before the client sees the end of the body, so this
        // instance's next request for it is a hit whatever the store write is doing.
        app.cache.keep(&entry, ttl);
        if let Some(m) = &marker {
            app.cache.keep(&Arc::new(Cache::compact(m)), ttl);
        }
    }
    leader.complete(entry.clone());
    let Some(ttl) = ttl else {
        // Not to be stored: the waiters have it; the flight retires now.
        drop((leader, lease));
        return;
    };
    let app = app.clone();
    tokio::spawn(async move {
        let mut entries: Vec<&Entry> = vec![&entry];
        entries.extend(marker.as_ref());
        let stored = app.cache.put(&entries, ttl).await.is_ok();
        // Dropping the lease gives it back, so other instances read the store now.
        drop(lease);
        if stored {
            leader.stored();
            tokio::time::sleep(app.cache.write_linger()).await;
        }
        drop(leader);
    });
}

/// With `[cache] distributed_lock`: take the key's lease, or wait (polling the store) for
/// the instance that holds it to store the entry.
async fn lease(cx: &Cx, job: &FillJob, recorded: &[u64]) -> LeaseOutcome {
    let config = &cx.live.config;
    if !config.cache.distributed_lock {
        return LeaseOutcome::Proceed;
    }
    // The lease outlives the slowest fill the upstream timeout allows.
    let lease_ttl = config.upstream.timeout + Duration::from_secs(1);
    let (outcome, waited) = coalesce::take_lease(
        &cx.app.cache,
        &job.flight_id,
        &job.tags,
        recorded,
        lease_ttl,
        config.cache.lock_timeout,
    )
    .await;
    if let Some(w) = waited {
        cx.app.metrics.lock_wait.observe(w.as_secs_f64());
    }
    outcome
}

/// Refresh a stale entry in the background (stale-while-revalidate), once per key in the
/// process (and once across instances with the distributed lock). The refresh uses the
/// request's configuration snapshot.
pub fn spawn_refresh(
    cx: &Cx,
    headers: &HeaderMap,
    job: FillJob,
    rule_index: usize,
    stale: Arc<Entry>,
) {
    let epoch = cx.app.purger.epoch();
    let Joined::Leader(leader) = cx
        .app
        .cache
        .flights
        .join(job.flight_id, &job.seen, false, epoch)
    else {
        return; // a refresh (or a fill) is already under way
    };
    let headers = headers.clone();
    let mut bg = Cx::new(&cx.app, cx.live.clone(), cx.client);
    bg.rule = Some(rule_index);
    tokio::spawn(async move {
        let result = refresh(&mut bg, headers, leader, job, stale).await;
        bg.app.metrics.refresh(result);
    });
}

async fn refresh(
    cx: &mut Cx,
    headers: HeaderMap,
    leader: Leader,
    job: FillJob,
    stale: Arc<Entry>,
) -> RefreshResult {
    let live = cx.live.clone();
    let Some(rule) = cx.rule.and_then(|i| live.config.rules.rules().get(i)) else {
        return RefreshResult::Error;
    };
    let Ok(recorded) = cx.app.cache.record_gens(&job.tags, &job.seen).await else {
        return RefreshResult::Error;
    };
    leader.set_recorded(recorded.clone());
    let lease = match lease(cx, &job, &recorded).await {
        LeaseOutcome::Filled(_) => return RefreshResult::Refreshed,
        LeaseOutcome::Held(l) => Some(l),
        LeaseOutcome::Proceed => None,
    };
    let max = live.config.cache.max_object_size;
    match fetch(cx, &headers, &job, &recorded, rule, Some(&stale)).await {
        Ok((
            Fetched::NotModified {
                entry,
                ttl: Some(ttl),
            },
            _,
        )) => {
            publish(&cx.app, leader, entry, None, Some(ttl), lease);
            RefreshResult::NotModified
        }
        Ok((
            Fetched::Storable {
                body,
                template,
                marker,
                ttl,
                ..
            },
            _,
        )) => match body::collect_limited(body, max).await {
            Ok(Some(bytes)) => {
                let mut entry = template;
                entry.body = bytes;
                publish(&cx.app, leader, entry, marker, Some(ttl), lease);
                RefreshResult::Refreshed
            }
            Ok(None) => RefreshResult::Uncacheable,
            Err(_) => RefreshResult::Error,
        },
        Ok(_) => RefreshResult::Uncacheable,
        Err(_) => RefreshResult::Error,
    }
}

/// Answer with a stale entry because the upstream failed (RFC 5861 stale-if-error);
/// `status` is the upstream's failing status, if it answered.
fn serve_stale_on_error(
    entry: Arc<Entry>,
    method: &Method,
    request: &HeaderMap,
    status: Option<StatusCode>,
) -> Served {
    let now = now_ms();
    let trace = Trace {
        outcome: Outcome::Stale,
        reason: Some(Reason::StaleIfError),
        fwd: Some(Fwd::Stale),
        fwd_status: status.map(|s| s.as_u16()),
        ttl: Some(respond::ttl_left(&entry, now)),
        ..Trace::bypass(None)
    };
    let age = respond::current_age(&entry, now);
    let response = respond::from_entry(
        entry.status,
        entry.headers.clone(),
        entry.body.clone(),
        age,
        method,
        request,
    );
    Served::new(response, trace)
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

/// The request a fill of `rule` sends, header names only (for the admin `explain`).
pub fn explain_fill(live: &Live, rule: &Rule) -> Vec<String> {
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
    if rule.scope == crate::routing::Scope::User {
        forwarded.push("authorization (the user's own entries only)".into());
        forwarded.push(format!(
            "{} (the verified subject)",
            live.config.auth.subject_header
        ));
    }
    forwarded
}
