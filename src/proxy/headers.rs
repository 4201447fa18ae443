//! Header rules of a proxy: hop-by-hop removal, forwarding headers, Host validation.
//!
//! Names are `static`s so nothing here allocates per header on the hot path.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 cachegate");

/// Remove hop-by-hop fields, including every name the `Connection` field lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Set `X-Forwarded-For` (appended), `-Proto` and `-Host`, and `Via` (RFC 9110 §7.6.3).
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, host: &HeaderValue) {
    let ip = client.to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    headers.append(header::VIA, VIA_VALUE.clone());
}

/// The request's host: exactly one valid `Host` field, or the URI authority (HTTP/2, absolute
/// form) which then wins (RFC 9112 §3.2.3). Returns the value to forward, or `None` for 400.
pub fn request_host(headers: &HeaderMap, uri: &http::Uri) -> Option<HeaderValue> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return None;
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return None;
        }
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    let value = first?;
    let text = value.to_str().ok()?;
    if text.is_empty() || text.contains('@') || text.contains('/') {
        return None;
    }
    // Must parse as an authority (host[:port]) and nothing else.
    let authority: http::uri::Authority = text.parse().ok()?;
    if authority.as_str() != text {
        return None;
    }
    Some(value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_listed_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn host_rules() {
        let uri: http::Uri = "/x".parse().unwrap();
        let mut h = HeaderMap::new();
        assert!(request_host(&h, &uri).is_none());
        h.insert(
            header::HOST,
            HeaderValue::from_static("api.example.com:8080"),
        );
        assert_eq!(request_host(&h, &uri).unwrap(), "api.example.com:8080");
        h.append(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(request_host(&h, &uri).is_none(), "two Host fields");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a b"));
        assert!(request_host(&h, &uri).is_none());
        h.insert(header::HOST, HeaderValue::from_static("user@host"));
        assert!(request_host(&h, &uri).is_none());
        let abs: http::Uri = "http://api.example.com/x".parse().unwrap();
        assert_eq!(
            request_host(&HeaderMap::new(), &abs).unwrap(),
            "api.example.com"
        );
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        set_forwarded(
            &mut h,
            "10.0.0.1".parse().unwrap(),
            &HeaderValue::from_static("api"),
        );
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "203.0.113.9, 10.0.0.1");
        assert_eq!(h.get(&X_FORWARDED_HOST).unwrap(), "api");
        assert_eq!(h.get(header::VIA).unwrap(), "1.1 cachegate");
    }
}
