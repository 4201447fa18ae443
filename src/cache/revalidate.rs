//! Building and refreshing stored entries (RFC 9111 §3 and §4.3): an entry from a storable
//! response, the marker of a resource that varies, the validators a revalidation sends,
//! and the merge of a 304 into the stored response.
//!
//! Pure functions of headers, timelines and generations: no I/O.

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName};

use super::entry::{Entry, flags as entry_flags};
use super::key::Id;
use super::policy::Freshness;

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

/// The entry a storable response becomes (its body follows when it has streamed), filed
/// under `id` with the generations recorded for its tags.
pub fn entry_template(
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

/// The marker filed under the plain key of a resource that varies: which headers it varies
/// on, with the same generations and lifetime as the variant it was written with.
pub fn vary_marker(plain: Id, variant: &Entry) -> Entry {
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

/// RFC 9111 §4.3.1: revalidate a stored response with its validators.
pub fn add_validators(request: &mut HeaderMap, stored: &Entry) {
    if let Some(etag) = stored.headers.get(header::ETAG) {
        request.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = stored.headers.get(header::LAST_MODIFIED) {
        request.insert(header::IF_MODIFIED_SINCE, lm.clone());
    }
}

/// RFC 9111 §4.3.4: replace stored header fields with those of the 304, except
/// Content-Length (which describes the 304, not the stored body).
pub fn refresh_headers(stored: &mut HeaderMap, update: &HeaderMap) {
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
pub fn retime(entry: &mut Entry, tags: &[Id], recorded: &[u64], fresh: &Freshness, now: u64) {
    entry.stored_at_ms = now;
    entry.age_at_store_s = fresh.age_at_store_s;
    entry.fresh_until_ms = fresh.fresh_until_ms;
    entry.swr_until_ms = fresh.swr_until_ms;
    entry.sie_until_ms = fresh.sie_until_ms;
    entry.flags = freshness_flags(fresh) | (entry.flags & entry_flags::VARY_INDEX);
    entry.gens = tags.iter().copied().zip(recorded.iter().copied()).collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_304_replaces_stored_fields_but_not_the_length() {
        let mut stored = HeaderMap::new();
        stored.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        stored.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        stored.insert("x-kept", HeaderValue::from_static("1"));
        let mut update = HeaderMap::new();
        update.insert(header::ETAG, HeaderValue::from_static("\"v2\""));
        update.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        update.insert(header::AGE, HeaderValue::from_static("5"));
        refresh_headers(&mut stored, &update);
        assert_eq!(stored[header::ETAG], "\"v2\"");
        assert_eq!(stored[header::CONTENT_LENGTH], "10");
        assert!(!stored.contains_key(header::AGE));
        assert_eq!(stored["x-kept"], "1");
    }
}
