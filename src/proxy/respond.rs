//! Building responses from stored entries, conditional requests, and the cache headers every
//! response carries (`Age`, `X-Cache`, RFC 9211 `Cache-Status`), all rendered from one
//! `Trace`: what happened (`Outcome`), why (`Reason`), and the facts around it.

use std::fmt::Write as _;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::headers::{CACHE_STATUS, X_CACHE};
use crate::body::{ProxyBody, empty, full};
use crate::cache::entry::Entry;
use crate::cache::policy::http_date;
use crate::labels::{Outcome, Reason};

/// Why a request went to the upstream: the RFC 9211 `fwd` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// The cache was not consulted.
    Bypass,
    /// The method is not cached.
    Method,
    /// Nothing was stored for the URI.
    UriMiss,
    /// Something was stored, but not usable (purged, unreadable).
    Miss,
    /// The client asked to revalidate.
    Request,
    /// The stored response was stale.
    Stale,
}

impl Fwd {
    pub fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::UriMiss => "uri-miss",
            Fwd::Miss => "miss",
            Fwd::Request => "request",
            Fwd::Stale => "stale",
        }
    }
}

/// What a request's journey looked like: rendered once into `X-Cache`, `Cache-Status`, the
/// access log line and the outcome metric.
#[derive(Debug, Clone)]
pub struct Trace {
    pub outcome: Outcome,
    pub reason: Option<Reason>,
    /// Why it went upstream; `None` when it was answered from the cache.
    pub fwd: Option<Fwd>,
    pub fwd_status: Option<u16>,
    pub stored: bool,
    /// Remaining freshness in seconds (negative when stale).
    pub ttl: Option<i64>,
    pub collapsed: bool,
    /// The error code when cachegate answered with an error.
    pub error: Option<&'static str>,
}

impl Trace {
    /// Answered from the cache (fresh).
    pub fn hit(ttl: i64) -> Trace {
        Trace {
            outcome: Outcome::Hit,
            fwd: None,
            ttl: Some(ttl),
            ..Trace::bypass(None)
        }
    }

    /// Answered from another request's fill.
    pub fn coalesced(ttl: i64) -> Trace {
        Trace {
            outcome: Outcome::Coalesced,
            fwd: None,
            ttl: Some(ttl),
            collapsed: true,
            ..Trace::bypass(None)
        }
    }

    /// Passed to the upstream without consulting the cache.
    pub fn bypass(reason: Option<Reason>) -> Trace {
        Trace {
            outcome: Outcome::Bypass,
            reason,
            fwd: Some(Fwd::Bypass),
            fwd_status: None,
            stored: false,
            ttl: None,
            collapsed: false,
            error: None,
        }
    }

    /// A response cachegate made itself.
    pub fn error(code: &'static str) -> Trace {
        Trace {
            outcome: Outcome::Error,
            reason: Some(Reason::Error),
            error: Some(code),
            ..Trace::bypass(None)
        }
    }

    /// The same trace with the upstream's status.
    pub fn with_status(mut self, status: StatusCode) -> Trace {
        self.fwd_status = Some(status.as_u16());
        self
    }

    /// The `detail` of `Cache-Status`: the error code, else the reason.
    pub fn detail(&self) -> Option<&'static str> {
        self.error.or(self.reason.map(Reason::as_str))
    }

    /// The `Cache-Status` member of this cache.
    pub fn cache_status(&self) -> String {
        let mut s = String::with_capacity(64);
        s.push_str("cachegate");
        let hit = matches!(self.outcome, Outcome::Hit | Outcome::Coalesced)
            || (self.outcome == Outcome::Stale && self.fwd.is_none());
        if hit {
            s.push_str("; hit");
        } else if let Some(fwd) = self.fwd {
            let _ = write!(s, "; fwd={}", fwd.as_str());
        }
        if let Some(st) = self.fwd_status {
            let _ = write!(s, "; fwd-status={st}");
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(s, "; ttl={ttl}");
        }
        if let Some(d) = self.detail() {
            let _ = write!(s, "; detail={d}");
        }
        s
    }

    pub fn x_cache(&self) -> &'static str {
        match self.outcome {
            Outcome::Hit | Outcome::Stale | Outcome::Coalesced | Outcome::Revalidated => "HIT",
            Outcome::Bypass => "BYPASS",
            Outcome::Miss | Outcome::Uncacheable | Outcome::Error => "MISS",
        }
    }
}

/// Add `X-Cache` and append our `Cache-Status` member (RFC 9211 §2: the member of the cache
/// nearest the client comes last).
pub fn decorate(headers: &mut HeaderMap, trace: &Trace) {
    headers.insert(X_CACHE.clone(), HeaderValue::from_static(trace.x_cache()));
    let ours = trace.cache_status();
    let value = match headers.get(&CACHE_STATUS).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.is_empty() => format!("{prior}, {ours}"),
        _ => ours,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(CACHE_STATUS.clone(), v);
    }
}

/// Seconds an entry has been in caches (RFC 9111 §4.2.3), at `now_ms`.
pub fn current_age(entry: &Entry, now_ms: u64) -> u64 {
    entry.age_at_store_s as u64 + now_ms.saturating_sub(entry.stored_at_ms) / 1000
}

/// Remaining freshness in whole seconds (negative once stale).
pub fn ttl_left(entry: &Entry, now_ms: u64) -> i64 {
    (entry.fresh_until_ms as i64 - now_ms as i64).div_euclid(1000)
}

/// Does a client's conditional GET/HEAD match this entry (RFC 9110 §13.2.2)? `If-None-Match`
/// wins over `If-Modified-Since`.
pub fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = request.get(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Ok(list) = inm.to_str() else { return false };
        let list = list.trim();
        if list == "*" {
            return true;
        }
        let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
        let ours = opaque(etag);
        return list.split(',').any(|t| opaque(t) == ours);
    }
    if let Some(ims) = http_date(request, header::IF_MODIFIED_SINCE) {
        let Some(lm) = http_date(stored, header::LAST_MODIFIED) else {
            return false;
        };
        return lm <= ims;
    }
    false
}

/// The single byte range a request asks for, if it should be honoured: `Some(Some((first,
/// last)))` to serve, `Some(None)` when unsatisfiable (416), `None` to serve the whole body
/// (no Range, several ranges, another unit, or an If-Range that no longer matches).
fn byte_range(
    request: &HeaderMap,
    stored: &HeaderMap,
    len: usize,
) -> Option<Option<(usize, usize)>> {
    let spec = request.get(header::RANGE)?.to_str().ok()?.trim();
    if let Some(if_range) = request.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let if_range = if_range.trim();
        let matches = if if_range.starts_with('"') {
            // A strong comparison (RFC 9110 §13.1.5): weak tags never match.
            stored.get(header::ETAG).and_then(|v| v.to_str().ok()) == Some(if_range)
        } else {
            let date = httpdate::parse_http_date(if_range).ok();
            let lm = stored
                .get(header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok());
            date.is_some() && date == lm
        };
        if !matches {
            return None;
        }
    }
    let ranges = spec.strip_prefix("bytes=")?;
    if ranges.contains(',') {
        return None;
    }
    let (a, b) = ranges.trim().split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| -> Option<usize> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        Some(s.parse::<u64>().unwrap_or(u64::MAX).min(usize::MAX as u64) as usize)
    };
    let range = if a.is_empty() {
        // A suffix: the last n bytes.
        let n = parse(b)?;
        if n == 0 || len == 0 {
            None
        } else {
            Some((len.saturating_sub(n), len - 1))
        }
    } else {
        let first = parse(a)?;
        let last = if b.is_empty() { usize::MAX } else { parse(b)? };
        if last < first {
            return None;
        }
        (first < len).then(|| (first, last.min(len - 1)))
    };
    Some(range)
}

/// Fields a 304 carries (RFC 9110 §15.4.5).
static NOT_MODIFIED_FIELDS: [header::HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// Answer a request from an entry: 304 for a matching conditional, headers only for HEAD,
/// the stored body otherwise (shared, not copied).
pub fn from_entry(
    entry_status: StatusCode,
    mut headers: HeaderMap,
    body: bytes::Bytes,
    age_s: u64,
    method: &Method,
    request: &HeaderMap,
) -> Response<ProxyBody> {
    let conditional = entry_status == StatusCode::OK && not_modified(request, &headers);
    let mut resp = if conditional {
        let mut kept = HeaderMap::with_capacity(NOT_MODIFIED_FIELDS.len() + 2);
        for name in &NOT_MODIFIED_FIELDS {
            for v in headers.get_all(name) {
                kept.append(name.clone(), v.clone());
            }
        }
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        *r.headers_mut() = kept;
        r
    } else if let Some(range) = (entry_status == StatusCode::OK && method == Method::GET)
        .then(|| byte_range(request, &headers, body.len()))
        .flatten()
    {
        // RFC 9110 §14: one byte range of a stored complete response.
        headers.remove(header::CONTENT_LENGTH);
        let len = body.len();
        let mut r = match range {
            Some((first, last)) => {
                let value = format!("bytes {first}-{last}/{len}");
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                let mut r = Response::new(full(body.slice(first..last + 1)));
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                r
            }
            None => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                let mut r = Response::new(empty());
                *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                r
            }
        };
        *r.headers_mut() = headers;
        r
    } else {
        let len = body.len();
        let mut r = if method == Method::HEAD {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Response::new(empty())
        } else {
            // hyper derives Content-Length from the body itself.
            headers.remove(header::CONTENT_LENGTH);
            Response::new(full(body))
        };
        *r.status_mut() = entry_status;
        *r.headers_mut() = headers;
        r
    };
    resp.headers_mut()
        .insert(header::AGE, HeaderValue::from(age_s));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn conditional_matching() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert!(not_modified(
            &h(&[("if-none-match", "\"v0\", \"v1\"")]),
            &stored
        ));
        assert!(not_modified(&h(&[("if-none-match", "W/\"v1\"")]), &stored));
        assert!(not_modified(&h(&[("if-none-match", "*")]), &stored));
        assert!(!not_modified(&h(&[("if-none-match", "\"v2\"")]), &stored));
        assert!(not_modified(
            &h(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            &h(&[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")]),
            &stored
        ));
        // If-None-Match takes precedence.
        assert!(!not_modified(
            &h(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
            ]),
            &stored
        ));
    }

    #[test]
    fn byte_ranges() {
        let stored = h(&[("etag", "\"v1\"")]);
        let r = |v: &'static str| byte_range(&h(&[("range", v)]), &stored, 10);
        assert_eq!(r("bytes=0-3"), Some(Some((0, 3))));
        assert_eq!(r("bytes=5-"), Some(Some((5, 9))));
        assert_eq!(r("bytes=-3"), Some(Some((7, 9))));
        assert_eq!(r("bytes=8-100"), Some(Some((8, 9))));
        assert_eq!(r("bytes=10-12"), Some(None), "unsatisfiable");
        assert_eq!(r("bytes=0-1,4-5"), None, "several ranges: the whole body");
        assert_eq!(r("items=0-1"), None);
        assert_eq!(r("bytes=3-1"), None);
        let stale = h(&[("range", "bytes=0-1"), ("if-range", "\"v0\"")]);
        assert_eq!(
            byte_range(&stale, &stored, 10),
            None,
            "If-Range no longer matches"
        );
        let fresh = h(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]);
        assert_eq!(byte_range(&fresh, &stored, 10), Some(Some((0, 1))));
    }

    #[test]
    fn cache_status_members() {
        let t = Trace::hit(42);
        assert_eq!(t.cache_status(), "cachegate; hit; ttl=42");
        let t = Trace {
            outcome: Outcome::Miss,
            fwd: Some(Fwd::UriMiss),
            fwd_status: Some(200),
            stored: true,
            ttl: Some(300),
            ..Trace::bypass(None)
        };
        assert_eq!(
            t.cache_status(),
            "cachegate; fwd=uri-miss; fwd-status=200; stored; ttl=300"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "cache-status",
            HeaderValue::from_static("origin-cache; hit"),
        );
        decorate(&mut headers, &t);
        assert_eq!(
            headers["cache-status"],
            "origin-cache; hit, cachegate; fwd=uri-miss; fwd-status=200; stored; ttl=300"
        );
        assert_eq!(headers["x-cache"], "MISS");
    }
}
