//! Cacheability and freshness (RFC 9111 for a shared cache, bent by the rule's knobs).
//!
//! Pure functions of a response's status and headers, the rule and the clock: no I/O.
//! Every refusal has a short static reason, which feeds `Cache-Status: detail=` and the
//! admin explain endpoint, so "why is this not cached?" always has an answer.

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, StatusCode, header};

use crate::labels::Reason;

/// The set of response statuses that may be stored (`[cache] statuses`).
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub fn new(codes: &[u16]) -> Self {
        let mut bits = [0u64; 10];
        for &c in codes {
            if (100..640).contains(&c) {
                bits[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
        StatusSet(bits)
    }
    pub fn contains(&self, code: u16) -> bool {
        code < 640 && self.0[(code / 64) as usize] & (1 << (code % 64)) != 0
    }
    pub fn codes(&self) -> Vec<u16> {
        (100..600).filter(|c| self.contains(*c)).collect()
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.codes()).finish()
    }
}

/// The statuses stored when `[cache] statuses` is not set.
pub const DEFAULT_STATUSES: [u16; 7] = [200, 203, 204, 300, 301, 404, 410];

/// How a rule treats the origin's caching headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OriginCacheControl {
    /// Origin directives decide within the rule: `ttl` caps explicit freshness and applies
    /// when the origin says nothing.
    #[default]
    Respect,
    /// A pure shared cache: only responses with explicit freshness are stored (`ttl` caps).
    Only,
    /// The rule's windows only; origin freshness and `no-store`/`no-cache` are ignored,
    /// but `private` and `Set-Cookie` responses are still never stored.
    Override,
}

impl OriginCacheControl {
    pub fn as_str(&self) -> &'static str {
        match self {
            OriginCacheControl::Respect => "respect",
            OriginCacheControl::Only => "only",
            OriginCacheControl::Override => "override",
        }
    }
}

/// The Cache-Control directives a shared cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub only_if_cached: bool,
    pub min_fresh: Option<u64>,
    /// `max-stale` with no value means any staleness: `Some(u64::MAX)`.
    pub max_stale: Option<u64>,
}

impl CacheControl {
    /// Parse every `Cache-Control` field line. Unknown directives are ignored; a malformed
    /// delta-seconds counts as 0 (RFC 9111 §4.2.1: treat invalid freshness as stale).
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            // Bytes outside visible ASCII (in some extension's quoted value) must not hide a
            // `private` or `no-store` in the same line.
            let text = String::from_utf8_lossy(value.as_bytes());
            for (name, arg) in directives(&text) {
                let secs = || -> u64 {
                    arg.and_then(|a| {
                        let a = a.trim_matches('"');
                        if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
                            return None;
                        }
                        // Values past u32 are clamped (RFC 9111 §1.2.2: 2^31 is "infinity").
                        Some(a.parse::<u64>().unwrap_or(u64::MAX).min(1 << 31))
                    })
                    .unwrap_or(0)
                };
                let min = |old: Option<u64>, new: u64| Some(old.map_or(new, |o| o.min(new)));
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "only-if-cached" => cc.only_if_cached = true,
                    "max-age" => cc.max_age = min(cc.max_age, secs()),
                    "s-maxage" => cc.s_maxage = min(cc.s_maxage, secs()),
                    "stale-while-revalidate" => {
                        cc.stale_while_revalidate = min(cc.stale_while_revalidate, secs())
                    }
                    "stale-if-error" => cc.stale_if_error = min(cc.stale_if_error, secs()),
                    "min-fresh" => cc.min_fresh = min(cc.min_fresh, secs()),
                    "max-stale" => {
                        cc.max_stale = Some(if arg.is_some() { secs() } else { u64::MAX });
                    }
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Split `a, b=1, c="x, y"` into (name, argument) pairs, honouring quoted strings.
fn directives(text: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    let mut rest = text;
    std::iter::from_fn(move || {
        loop {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                return None;
            }
            let mut in_quotes = false;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '"' => in_quotes = !in_quotes,
                    ',' if !in_quotes => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let item = rest[..end].trim();
            rest = &rest[end..];
            if item.is_empty() {
                continue;
            }
            return Some(match item.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim())),
                None => (item, None),
            });
        }
    })
}

/// Parse an HTTP-date header as unix seconds.
pub fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    // Names of days and months are case-insensitive (RFC 9110 §5.6.7): retry in the
    // canonical case before calling a date invalid.
    let t = httpdate::parse_http_date(v)
        .or_else(|_| httpdate::parse_http_date(&canonical_date_case(v)))
        .ok()?;
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// "thu, 01 JAN 2099 00:00:00 gmt" -> "Thu, 01 Jan 2099 00:00:00 GMT".
fn canonical_date_case(v: &str) -> String {
    v.split(' ')
        .map(|word| {
            if word.eq_ignore_ascii_case("gmt") {
                "GMT".to_string()
            } else if word.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
                let lower = word.to_ascii_lowercase();
                let mut chars = lower.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            } else {
                word.to_ascii_lowercase()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Format unix seconds as an HTTP-date.
pub fn format_http_date(unix_s: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(unix_s))
}

/// What a rule says about freshness and stale reuse.
#[derive(Debug, Clone, Copy)]
pub struct RulePolicy {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub origin: OriginCacheControl,
}

/// A storable response's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub age_at_store_s: u32,
    pub fresh_until_ms: u64,
    pub swr_until_ms: u64,
    pub sie_until_ms: u64,
    pub no_cache: bool,
    pub must_revalidate: bool,
    /// How long the store should keep the entry (past its last reuse, validators stay useful).
    pub store_ttl: Duration,
}

/// Why a response was not stored.
pub type NotStored = Reason;

/// Decide whether a response may be stored and for how long.
pub fn decide(
    status: StatusCode,
    headers: &HeaderMap,
    rule: &RulePolicy,
    statuses: &StatusSet,
    now_ms: u64,
) -> Result<Freshness, NotStored> {
    let code = status.as_u16();
    // Never a partial or an interim response.
    if code == 206 || code < 200 {
        return Err(Reason::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(Reason::SetCookie);
    }
    if headers.get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|p| p.trim() == "*"))
            .unwrap_or(true)
    }) {
        return Err(Reason::VaryStar);
    }
    let cc = CacheControl::parse(headers);
    if cc.private {
        return Err(Reason::Private);
    }
    let override_mode = rule.origin == OriginCacheControl::Override;
    let only_mode = rule.origin == OriginCacheControl::Only;
    if cc.no_store && !override_mode {
        return Err(Reason::NoStore);
    }
    let ttl_s = rule.ttl.as_secs();
    let date_s = http_date(headers, header::DATE);
    let has_validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    let no_cache = cc.no_cache && !override_mode;
    let explicit: Option<u64> = if override_mode {
        None
    } else if let Some(s) = cc.s_maxage {
        Some(s)
    } else if let Some(m) = cc.max_age {
        Some(m)
    } else if headers.contains_key(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (RFC 9111 §5.3).
        let expires = http_date(headers, header::EXPIRES);
        let base = date_s.unwrap_or(now_ms / 1000);
        Some(expires.map(|e| e.saturating_sub(base)).unwrap_or(0))
    } else if no_cache {
        // Stored to be revalidated before every use: zero freshness, explicitly.
        Some(0)
    } else {
        None
    };
    // RFC 9111 §4.2.2: without explicit freshness, a heuristic one (10% of the time since
    // Last-Modified) for statuses that are heuristically cacheable, or marked public.
    let heuristic = || -> Option<u64> {
        let cacheable = HEURISTIC_STATUSES.contains(&code) || cc.public;
        let last_modified = http_date(headers, header::LAST_MODIFIED)?;
        let base = date_s.unwrap_or(now_ms / 1000);
        cacheable.then(|| base.saturating_sub(last_modified) / 10)
    };
    // `statuses` is the operator's list; a pure shared cache (`only`) stores any final
    // status the origin gave explicit freshness, as RFC 9111 §3 allows.
    let status_allowed = statuses.contains(code) || (only_mode && explicit.is_some());
    if !status_allowed {
        return Err(Reason::Status);
    }
    let lifetime_s = match (explicit, only_mode) {
        (Some(e), _) => Some(e),
        (None, true) => heuristic(),
        (None, false) => None,
    };
    if only_mode && lifetime_s.is_none() {
        return Err(Reason::NoExplicitFreshness);
    }
    // RFC 9111 §4.2.3: the age a response already has when it arrives. Only the first
    // member of the first Age line counts; one too large to represent is 2^31 (§1.2.2).
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(',').next())
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .map(|s| s.parse::<u64>().unwrap_or(1 << 31).min(1 << 31))
        .unwrap_or(0);
    let apparent_age = date_s
        .map(|d| (now_ms / 1000).saturating_sub(d))
        .unwrap_or(0);
    let age = if override_mode {
        0
    } else {
        age_value.max(apparent_age)
    };
    // What is left of the origin's freshness, never more than the rule's ttl from now.
    let fresh_s = lifetime_s.unwrap_or(ttl_s).saturating_sub(age).min(ttl_s);
    let must_revalidate =
        !override_mode && (cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some());
    if no_cache && !has_validator {
        // Every reuse would need a full refetch: storing it would only cost memory.
        return Err(Reason::NoCacheWithoutValidator);
    }
    let fresh_ms = if no_cache { 0 } else { fresh_s * 1000 };
    // Stale windows: the origin's directives when it sends them (RFC 5861), else the rule's.
    let (swr_s, sie_s) = if override_mode {
        (
            rule.stale_while_revalidate.as_secs(),
            rule.stale_if_error.as_secs(),
        )
    } else if must_revalidate || no_cache {
        // Stale reuse without a successful validation is forbidden (RFC 9111 §5.2.2.2).
        (0, 0)
    } else {
        (
            cc.stale_while_revalidate
                .unwrap_or(rule.stale_while_revalidate.as_secs()),
            cc.stale_if_error.unwrap_or(rule.stale_if_error.as_secs()),
        )
    };
    let fresh_until_ms = now_ms + fresh_ms;
    let swr_until_ms = fresh_until_ms + swr_s * 1000;
    let sie_until_ms = fresh_until_ms + sie_s * 1000;
    let usable_ms = fresh_ms + swr_s.max(sie_s) * 1000;
    // Entries with validators are kept one more TTL, so a stale one can be revalidated with
    // a cheap 304 instead of a full refetch.
    let keep_ms = if has_validator { ttl_s * 1000 } else { 0 };
    let store_ms = usable_ms + keep_ms;
    if store_ms == 0 {
        return Err(Reason::StaleOnArrival);
    }
    Ok(Freshness {
        age_at_store_s: age.min(u32::MAX as u64) as u32,
        fresh_until_ms,
        swr_until_ms,
        sie_until_ms,
        no_cache,
        must_revalidate,
        store_ttl: Duration::from_millis(store_ms),
    })
}

/// Header names the origin's `Vary` lists beyond the rule's own (lower-case, sorted).
pub fn vary_names(headers: &HeaderMap, rule_vary: &[HeaderName]) -> Vec<HeaderName> {
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

/// RFC 9111 §5.4: `Pragma: no-cache` counts only when Cache-Control is absent.
pub fn pragma_no_cache(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::CACHE_CONTROL)
        && headers.get_all(header::PRAGMA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("no-cache"))
        })
}

/// The declared `Content-Length`, when there is a valid one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Statuses a cache may give heuristic freshness (RFC 9110 §15.1), 206 aside.
const HEURISTIC_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn rule(origin: OriginCacheControl) -> RulePolicy {
        RulePolicy {
            ttl: Duration::from_secs(300),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            origin,
        }
    }

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    const NOW: u64 = 1_700_000_000_000;

    fn fresh_s(
        pairs: &[(&'static str, &str)],
        origin: OriginCacheControl,
    ) -> Result<u64, NotStored> {
        let statuses = StatusSet::new(&DEFAULT_STATUSES);
        decide(StatusCode::OK, &h(pairs), &rule(origin), &statuses, NOW)
            .map(|f| (f.fresh_until_ms - NOW) / 1000)
    }

    #[test]
    fn directives_parse_with_quotes_and_case() {
        let cc = CacheControl::parse(&h(&[
            ("cache-control", "Max-Age=60, private=\"set-cookie, x\""),
            ("cache-control", "s-maxage=\"30\", max-stale"),
        ]));
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.s_maxage, Some(30));
        assert!(cc.private);
        assert_eq!(cc.max_stale, Some(u64::MAX));
        assert_eq!(
            CacheControl::parse(&h(&[("cache-control", "max-age=abc")])).max_age,
            Some(0)
        );
    }

    #[test]
    fn respect_mode_table() {
        use OriginCacheControl::Respect as R;
        assert_eq!(fresh_s(&[], R), Ok(300));
        assert_eq!(fresh_s(&[("cache-control", "max-age=60")], R), Ok(60));
        assert_eq!(fresh_s(&[("cache-control", "max-age=6000")], R), Ok(300));
        assert_eq!(
            fresh_s(&[("cache-control", "max-age=600, s-maxage=30")], R),
            Ok(30)
        );
        assert_eq!(
            fresh_s(&[("cache-control", "no-store")], R),
            Err(Reason::NoStore)
        );
        assert_eq!(
            fresh_s(&[("cache-control", "private")], R),
            Err(Reason::Private)
        );
        assert_eq!(fresh_s(&[("set-cookie", "a=b")], R), Err(Reason::SetCookie));
        assert_eq!(fresh_s(&[("vary", "*")], R), Err(Reason::VaryStar));
        assert_eq!(
            fresh_s(&[("cache-control", "max-age=60"), ("age", "20")], R),
            Ok(40)
        );
        assert_eq!(
            fresh_s(
                &[
                    ("cache-control", "max-age=60"),
                    ("age", "99999999999999999999")
                ],
                R
            ),
            Err(Reason::StaleOnArrival)
        );
        let mut h8 = h(&[]);
        h8.insert(
            "cache-control",
            HeaderValue::from_bytes(b"private, ext=\"caf\xc3\xa9\"").unwrap(),
        );
        let statuses = StatusSet::new(&DEFAULT_STATUSES);
        assert_eq!(
            decide(StatusCode::OK, &h8, &rule(R), &statuses, NOW),
            Err(Reason::Private)
        );
        let date = format_http_date(NOW / 1000);
        let expires = format_http_date(NOW / 1000 + 100);
        assert_eq!(
            fresh_s(&[("date", &date), ("expires", &expires)], R),
            Ok(100)
        );
        assert_eq!(fresh_s(&[("expires", "0")], R), Err(Reason::StaleOnArrival));
        assert_eq!(
            fresh_s(&[("cache-control", "no-cache")], R),
            Err(Reason::NoCacheWithoutValidator)
        );
        assert_eq!(
            fresh_s(&[("cache-control", "no-cache"), ("etag", "\"v1\"")], R),
            Ok(0)
        );
    }

    #[test]
    fn only_and_override_modes() {
        use OriginCacheControl::{Only, Override};
        assert_eq!(fresh_s(&[], Only), Err(Reason::NoExplicitFreshness));
        assert_eq!(fresh_s(&[("cache-control", "max-age=60")], Only), Ok(60));
        assert_eq!(
            fresh_s(
                &[("cache-control", "no-cache, no-store, max-age=0")],
                Override
            ),
            Ok(300)
        );
        assert_eq!(
            fresh_s(&[("cache-control", "private")], Override),
            Err(Reason::Private)
        );
        assert_eq!(
            fresh_s(&[("set-cookie", "s=1")], Override),
            Err(Reason::SetCookie)
        );
    }

    #[test]
    fn age_parsing_and_capping_follow_the_rfc() {
        use OriginCacheControl::Respect as R;
        // Only the first member counts: "7200, 0" is 7200 (stale).
        assert_eq!(
            fresh_s(&[("cache-control", "max-age=3600"), ("age", "7200, 0")], R),
            Err(Reason::StaleOnArrival)
        );
        // The ttl caps what is left of the origin's freshness, not the freshness itself.
        assert_eq!(
            fresh_s(&[("cache-control", "max-age=10000"), ("age", "3600")], R),
            Ok(300)
        );
    }

    #[test]
    fn dates_are_read_whatever_the_case_of_their_names() {
        let hm = h(&[
            ("expires", "thu, 01 JAN 2099 00:00:00 gmt"),
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert_eq!(http_date(&hm, header::EXPIRES), Some(4_070_908_800));
        assert_eq!(http_date(&hm, header::DATE), Some(784_111_777));
        assert_eq!(http_date(&h(&[("expires", "0")]), header::EXPIRES), None);
    }

    #[test]
    fn only_mode_is_a_shared_cache() {
        use OriginCacheControl::Only;
        let statuses = StatusSet::new(&DEFAULT_STATUSES);
        let r = rule(Only);
        // Any final status with explicit freshness...
        let f = decide(
            StatusCode::FOUND,
            &h(&[("cache-control", "max-age=60")]),
            &r,
            &statuses,
            NOW,
        );
        assert!(f.is_ok());
        assert_eq!(
            decide(StatusCode::FOUND, &h(&[]), &r, &statuses, NOW),
            Err(Reason::Status)
        );
        // ...heuristic freshness from Last-Modified for heuristically cacheable statuses...
        let lm = format_http_date(NOW / 1000 - 1000);
        let date = format_http_date(NOW / 1000);
        assert_eq!(
            fresh_s(&[("last-modified", &lm), ("date", &date)], Only),
            Ok(100)
        );
        // ...and no-cache with a validator is stored, to be revalidated on every use.
        assert_eq!(
            fresh_s(&[("cache-control", "no-cache"), ("etag", "\"x\"")], Only),
            Ok(0)
        );
    }

    #[test]
    fn the_origins_stale_windows_win_over_the_rules() {
        let statuses = StatusSet::new(&DEFAULT_STATUSES);
        let mut r = rule(OriginCacheControl::Respect);
        r.stale_if_error = Duration::from_secs(600);
        let h1 = h(&[("cache-control", "max-age=60, stale-if-error=1")]);
        let f = decide(StatusCode::OK, &h1, &r, &statuses, NOW).unwrap();
        assert_eq!(f.sie_until_ms - f.fresh_until_ms, 1000);
        let f = decide(
            StatusCode::OK,
            &h(&[("cache-control", "max-age=60")]),
            &r,
            &statuses,
            NOW,
        )
        .unwrap();
        assert_eq!(
            f.sie_until_ms - f.fresh_until_ms,
            600_000,
            "the rule's when the origin says nothing"
        );
    }

    #[test]
    fn statuses_outside_the_list_are_not_stored() {
        let statuses = StatusSet::new(&DEFAULT_STATUSES);
        let r = rule(OriginCacheControl::Respect);
        assert_eq!(
            decide(
                StatusCode::INTERNAL_SERVER_ERROR,
                &h(&[]),
                &r,
                &statuses,
                NOW
            ),
            Err(Reason::Status)
        );
        assert!(decide(StatusCode::NOT_FOUND, &h(&[]), &r, &statuses, NOW).is_ok());
    }

    #[test]
    fn stale_windows_and_must_revalidate() {
        let statuses = StatusSet::new(&DEFAULT_STATUSES);
        let mut r = rule(OriginCacheControl::Respect);
        r.stale_while_revalidate = Duration::from_secs(30);
        r.stale_if_error = Duration::from_secs(600);
        let f = decide(
            StatusCode::OK,
            &h(&[("cache-control", "max-age=60, stale-while-revalidate=90")]),
            &r,
            &statuses,
            NOW,
        )
        .unwrap();
        assert_eq!(f.swr_until_ms - f.fresh_until_ms, 90_000);
        assert_eq!(f.sie_until_ms - f.fresh_until_ms, 600_000);
        assert_eq!(f.store_ttl, Duration::from_secs(660));
        let f = decide(
            StatusCode::OK,
            &h(&[("cache-control", "max-age=60, must-revalidate")]),
            &r,
            &statuses,
            NOW,
        )
        .unwrap();
        assert_eq!(f.sie_until_ms, f.fresh_until_ms);
        assert!(f.must_revalidate);
    }
}
