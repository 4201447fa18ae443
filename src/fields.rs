//! Header fields cachegate treats specially: hop-by-hop fields, its own forwarding and
//! cache headers, method and URL overrides, and which fields a fill may never send.
//!
//! Names are `static`s so nothing allocates per header on the hot path. A leaf: it imports
//! nothing from the crate (the config checks `fill_headers` against it, the proxy applies it).

use http::header::{self, HeaderName};

/// Hop-by-hop fields (RFC 9110 §7.6.1), plus the legacy ones proxies still meet.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Headers that ask the upstream to treat the request as another method or another URL.
/// A request carrying one is never answered from or stored into the cache.
pub static OVERRIDE_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-original-uri"),
];

/// Why a header may not be listed in a rule's `fill_headers`, if it may not.
pub fn never_filled(name: &HeaderName) -> Option<&'static str> {
    if name == header::HOST
        || name == header::ACCEPT_ENCODING
        || name == header::VIA
        || name == FORWARDED
        || name == X_FORWARDED_FOR
        || name == X_FORWARDED_PROTO
        || name == X_FORWARDED_HOST
    {
        return Some("cachegate sets this header on every fill itself");
    }
    if name == header::AUTHORIZATION || name == header::COOKIE {
        return Some(
            "a credential is never sent on a fill (scope = \"user\" forwards the user's own Authorization)",
        );
    }
    if HOP_BY_HOP.contains(name) {
        return Some("a hop-by-hop header is never forwarded");
    }
    if OVERRIDE_HEADERS.contains(name) {
        return Some("a method or URL override is never sent on a fill");
    }
    if [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ]
    .contains(name)
    {
        return Some("a fill always asks for the full representation");
    }
    None
}
