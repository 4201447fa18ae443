//! The cache read phase, for GET/HEAD on a rule with a TTL: whose entry (the user's own,
//! a shared one, or none for a request carrying credentials), the key, one lookup round
//! trip (with the session check riding along), then HIT | STALE (served while one
//! background refresh runs) | MISS -> coalesce onto one fill per key. When the store cannot
//! be read, concurrent requests still share one upstream fetch (`degraded`).
//!
//! Nothing here decides cacheability (that is `cache::policy`) or talks to the upstream
//! (that is `fill`).

use std::sync::Arc;

use http::Response;
use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use hyper::body::Incoming;

use super::classify::Route;
use super::error::ProxyError;
use super::fill::{self, FillJob};
use super::forward;
use super::gate;
use super::respond::{self, Fwd, Trace};
use super::{Cx, Served};
use crate::auth::Claimed;
use crate::body::ProxyBody;
use crate::cache::Found;
use crate::cache::coalesce::{FlightState, Joined, entry_serves};
use crate::cache::entry::{Entry, flags as entry_flags};
use crate::cache::key::{Id, KeyParts};
use crate::cache::policy::{self, CacheControl};
use crate::clock::now_ms;
use crate::labels::Reason;
use crate::normalize::{QueryKeep, normalized_query};
use crate::routing::{QueryPolicy, Rule, Scope, tags};

/// Everything a cache key is made of, except the names of the varying headers.
#[derive(Clone)]
pub struct KeyBase {
    pub host: String,
    pub path: String,
    /// The query as the rule's policy normalizes it.
    pub query: String,
    /// The subject, for a user's own entry.
    pub scope: Option<String>,
    pub rule_vary: Vec<HeaderName>,
}

impl KeyBase {
    /// The entry id for these request headers, varying on the rule's headers plus `extra`.
    pub fn id(&self, headers: &HeaderMap, extra: &[HeaderName]) -> Id {
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
    pub fn fill_target(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

pub fn query_keep(policy: &QueryPolicy) -> QueryKeep<'_> {
    match policy {
        QueryPolicy::Sorted => QueryKeep::All,
        QueryPolicy::Ignore => QueryKeep::None,
        QueryPolicy::Keep(names) => QueryKeep::Only(names),
    }
}

/// Why a request carrying credentials may not use the entry its rule would give it: it
/// would be shared between users (RFC 9111 §3.5), and the rule does not say it is public.
fn credentials(cx: &Cx, rule: &Rule, headers: &HeaderMap, claimed: bool) -> Option<Reason> {
    let own_entry = rule.scope == Scope::User && claimed;
    if own_entry || rule.scope == Scope::Public {
        return None;
    }
    if claimed || headers.contains_key(header::AUTHORIZATION) {
        return Some(Reason::Authorization);
    }
    cx.live
        .config
        .cache
        .credential_headers
        .iter()
        .any(|h| !rule.vary.contains(h) && headers.contains_key(h))
        .then_some(Reason::Credentials)
}

/// GET/HEAD on a caching rule.
pub async fn cached(
    cx: &mut Cx,
    mut parts: Parts,
    body: Incoming,
    rule: &Rule,
    route: &Route,
    claimed: Option<Claimed>,
) -> Result<Served, ProxyError> {
    if let Some(why) = credentials(cx, rule, &parts.headers, claimed.is_some()) {
        gate::authenticate(cx, claimed, &mut parts.headers).await?;
        return forward::bypass(cx, parts, body, why).await;
    }
    let mut query = String::new();
    normalized_query(parts.uri.query(), query_keep(&rule.query), &mut query);
    let base = KeyBase {
        host: route.host.to_str().unwrap_or_default().to_ascii_lowercase(),
        path: route.path.clone(),
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
    let moves = cx.app.purger.moves();
    if cx.app.purger.pending() {
        return degraded(
            cx,
            parts,
            body,
            base,
            id,
            rule,
            claimed,
            Reason::PurgePending,
        )
        .await;
    }
    let tags = tags::entry_tags(&route.rule_tags, &route.path, base.scope.as_deref());
    let request_cc = CacheControl::parse(&parts.headers);
    // A client may force a revalidation only where the operator allows it: otherwise any
    // client could bypass the cache and hammer the upstream.
    let client_revalidates = cx.live.config.cache.honor_client_no_cache
        && (request_cc.no_cache
            || request_cc.max_age == Some(0)
            || policy::pragma_no_cache(&parts.headers));

    // lookup (the session check rides in the same round trip), then coalesce
    let mut claimed = claimed;
    let mut relookup = true;
    loop {
        let session = claimed.as_ref().map(|c| c.session_key.clone());
        let lookup = match cx.app.cache.lookup(&id, &tags, session.as_ref()).await {
            Ok(l) => l,
            Err(e) => {
                if let Some(c) = claimed.take() {
                    let identity = gate::session_verdict(cx, c, Err(e))?;
                    gate::apply_identity(cx, &mut parts.headers, &identity);
                }
                let why = Reason::StoreUnavailable;
                return degraded(cx, parts, body, base, id, rule, None, why).await;
            }
        };
        if let Some(c) = claimed.take() {
            let identity = gate::session_verdict(cx, c, Ok(lookup.session.clone()))?;
            gate::apply_identity(cx, &mut parts.headers, &identity);
        }
        // A vary marker: the origin varies on request headers, so read this request's
        // variant (a second round trip, only for such resources).
        let mut found = lookup.found;
        if matches!(found, Found::Unavailable) {
            let why = Reason::StoreUnavailable;
            return degraded(cx, parts, body, base, id, rule, None, why).await;
        }
        let mut flight_id = id;
        let mut known_vary = Vec::new();
        let mut from_variant_l1 = false;
        if let Found::Entry(marker) = &found
            && marker.flags & entry_flags::VARY_INDEX != 0
        {
            flight_id = base.id(&parts.headers, &marker.vary);
            known_vary = marker.vary.clone();
            found = match cx
                .app
                .cache
                .lookup_variant(&flight_id, &tags, &lookup.gens)
                .await
            {
                Ok((Found::Entry(e), _)) if e.flags & entry_flags::VARY_INDEX != 0 => {
                    Found::Corrupt
                }
                Ok((f, from_l1)) => {
                    from_variant_l1 = from_l1;
                    f
                }
                Err(_) => {
                    let why = Reason::StoreUnavailable;
                    return degraded(cx, parts, body, base, id, rule, None, why).await;
                }
            };
        }
        if cx.app.purger.moves() != moves {
            // The store moved to another server while this was read (a failover): what
            // was read may predate purges the new server has not had yet.
            let why = Reason::PurgePending;
            return degraded(cx, parts, body, base, id, rule, None, why).await;
        }
        let now = now_ms();
        let mut miss = Trace {
            outcome: crate::labels::Outcome::Miss,
            fwd: Some(Fwd::UriMiss),
            ..Trace::bypass(None)
        };
        let mut stale = None;
        let absent = matches!(found, Found::Absent);
        match found {
            Found::Entry(entry) if now < entry.fresh_until_ms && !client_revalidates => {
                let mut trace = Trace::hit(respond::ttl_left(&entry, now));
                let from_l1 = if known_vary.is_empty() {
                    lookup.from_l1
                } else {
                    from_variant_l1
                };
                if from_l1 {
                    trace.reason = Some(Reason::L1);
                }
                return Ok(Served::new(serve(&entry, &parts, now), trace));
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
                fill::spawn_refresh(cx, &parts.headers, job, rule.index, entry.clone());
                let trace = Trace {
                    outcome: crate::labels::Outcome::Stale,
                    reason: Some(Reason::StaleWhileRevalidate),
                    ..Trace::hit(respond::ttl_left(&entry, now))
                };
                return Ok(Served::new(serve(&entry, &parts, now), trace));
            }
            Found::Entry(entry) => {
                miss.fwd = Some(if client_revalidates {
                    Fwd::Request
                } else {
                    Fwd::Stale
                });
                stale = Some(entry);
            }
            Found::Dead => {
                cx.app.metrics.stale_generation_misses.inc();
                miss.fwd = Some(Fwd::Miss);
                miss.reason = Some(Reason::Purged);
            }
            Found::Corrupt => {
                miss.fwd = Some(Fwd::Miss);
                miss.reason = Some(Reason::UnreadableEntry);
            }
            Found::Absent | Found::Unavailable => {}
        }
        // RFC 9111 §5.2.1.7: only what is stored, or 504.
        if request_cc.only_if_cached {
            return Err(ProxyError::NotCached);
        }
        // RFC 9111 §5.2.1.5: nothing of a no-store request's response may be stored.
        if request_cc.no_store {
            return forward::bypass(cx, parts, body, Reason::RequestNoStore).await;
        }

        // A fill of this key finished since the lookup began: look again, do not fetch again.
        if relookup && absent && cx.app.cache.holds(&flight_id) {
            relookup = false;
            continue;
        }
        let epoch = cx.app.purger.epoch();
        match cx
            .app
            .cache
            .flights
            .join(flight_id, &lookup.gens, relookup, epoch)
        {
            Joined::Relookup => {
                relookup = false;
                continue;
            }
            Joined::Waiter(rx) => {
                let filled = wait_for_fill(cx, rx).await.filter(|e| {
                    entry_serves(e, &lookup.gens)
                        && now_ms() < e.fresh_until_ms
                        && base.id(&parts.headers, &e.vary) == e.key
                });
                if let Some(entry) = filled {
                    return Ok(serve_coalesced(&entry, &parts));
                }
                return forward::bypass(cx, parts, body, Reason::CoalesceFailed).await;
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
                if let Some(fwd) = miss.fwd {
                    cx.fwd = fwd;
                }
                return fill::fill(cx, parts, leader, job, rule, stale, miss).await;
            }
        }
    }
}

/// The cache cannot be read (the store is unreachable, or purges wait for it): the
/// request goes upstream, but concurrent requests for the same shared entry still
/// collapse onto one fetch in this process, whose response answers them all when it may
/// be stored. Nothing is written. Entries of one user are never shared this way, since
/// their session could not be checked either.
#[allow(clippy::too_many_arguments)]
async fn degraded(
    cx: &mut Cx,
    mut parts: Parts,
    body: Incoming,
    base: KeyBase,
    id: Id,
    rule: &Rule,
    claimed: Option<Claimed>,
    why: Reason,
) -> Result<Served, ProxyError> {
    gate::authenticate(cx, claimed, &mut parts.headers).await?;
    let request_cc = CacheControl::parse(&parts.headers);
    if request_cc.only_if_cached {
        return Err(ProxyError::NotCached);
    }
    if base.scope.is_some() || request_cc.no_store {
        return forward::bypass(cx, parts, body, why).await;
    }
    let epoch = cx.app.purger.epoch();
    match cx.app.cache.flights.join_degraded(id, epoch) {
        Joined::Waiter(rx) => {
            let filled = wait_for_fill(cx, rx).await.filter(|e| {
                now_ms() < e.fresh_until_ms && base.id(&parts.headers, &e.vary) == e.key
            });
            match filled {
                Some(entry) => {
                    let mut served = serve_coalesced(&entry, &parts);
                    served.trace.reason = Some(why);
                    Ok(served)
                }
                None => forward::bypass(cx, parts, body, why).await,
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
            let mut served = fill::fill_unstored(cx, parts, leader, job, rule).await?;
            served.trace.reason = Some(why);
            Ok(served)
        }
        Joined::Relookup => forward::bypass(cx, parts, body, why).await,
    }
}

/// Wait for another request's fill (bounded by `[cache] lock_timeout`).
async fn wait_for_fill(
    cx: &Cx,
    mut rx: tokio::sync::watch::Receiver<FlightState>,
) -> Option<Arc<Entry>> {
    let metrics = &cx.app.metrics;
    let waited = std::time::Instant::now();
    metrics.fill_waiters.inc();
    let limit = cx.live.config.cache.lock_timeout;
    let result =
        tokio::time::timeout(limit, rx.wait_for(|s| !matches!(s, FlightState::Pending))).await;
    let filled = match result {
        Ok(Ok(state)) => match &*state {
            FlightState::Done(e) | FlightState::Stored(e) => Some(e.clone()),
            _ => None,
        },
        _ => None,
    };
    metrics.fill_waiters.dec();
    metrics.lock_wait.observe(waited.elapsed().as_secs_f64());
    filled
}

/// Serve a stored entry owned by this request (no header map copy).
pub fn serve(entry: &Entry, parts: &Parts, now: u64) -> Response<ProxyBody> {
    let age = respond::current_age(entry, now);
    respond::from_entry(
        entry.status,
        entry.headers.clone(),
        entry.body.clone(),
        age,
        &parts.method,
        &parts.headers,
    )
}

/// Answer from another request's fill.
pub fn serve_coalesced(entry: &Entry, parts: &Parts) -> Served {
    let now = now_ms();
    let response = respond::from_entry(
        entry.status,
        entry.headers.clone(),
        entry.body.clone(),
        respond::current_age(entry, now),
        &parts.method,
        &parts.headers,
    );
    Served::new(response, Trace::coalesced(respond::ttl_left(entry, now)))
}
