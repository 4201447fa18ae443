//! Header rules of a proxy: hop-by-hop removal, forwarding headers, Host validation, and
//! reading method and URL overrides. The names themselves are `static`s in `fields`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub use crate::fields::*;

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

/// Set `X-Forwarded-For` (appended), `-Proto` and `-Host`, `Forwarded` (replaced: the
/// client's own is never passed on, RFC 7239) and `Via` (RFC 9110 §7.6.3).
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, host: &HeaderValue) {
    let ip = client.to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    set_own_forwarding(headers, client, host);
    headers.append(header::VIA, VIA_VALUE.clone());
}

/// The forwarding headers of a request cachegate makes itself (a fill): only what
/// cachegate knows, nothing the client wrote.
pub fn set_fill_forwarded(headers: &mut HeaderMap, client: IpAddr, host: &HeaderValue) {
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    set_own_forwarding(headers, client, host);
    headers.insert(header::VIA, VIA_VALUE.clone());
}

fn set_own_forwarding(headers: &mut HeaderMap, client: IpAddr, host: &HeaderValue) {
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    if let Some(v) = forwarded_value(client, host) {
        headers.insert(FORWARDED.clone(), v);
    }
}

/// `for=...;host=...;proto=http` (RFC 7239 §4), quoting what is not a token.
fn forwarded_value(client: IpAddr, host: &HeaderValue) -> Option<HeaderValue> {
    let host = host.to_str().ok()?;
    let for_ = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let host = if token(host) {
        host.to_string()
    } else if host
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        format!("\"{host}\"")
    } else {
        return None;
    };
    HeaderValue::from_str(&format!("for={for_};host={host};proto=http")).ok()
}

/// What a request's override headers ask for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Some override header is present.
    pub present: bool,
    /// Some method override names a method that is not safe (or one that is not a method at
    /// all): an upstream honouring it may write.
    pub write: bool,
    /// The request targets an upstream honouring a URL override might serve (every value
    /// of every URL override header: which one an upstream reads is its own business).
    pub urls: Vec<String>,
}

/// Read the override headers, in every spelling an upstream may read them (`_` for `-`,
/// as CGI-style servers do), and the `_method` query parameter that web frameworks read as
/// a method override.
pub fn overrides(headers: &HeaderMap, query: Option<&str>) -> Overrides {
    let mut out = Overrides::default();
    if let Some(q) = query.filter(|q| q.contains("method") || q.contains('%')) {
        for pair in q.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            // Any spelling the upstream decodes to `_method` (`%5Fmethod`, `_%6Dethod`...).
            let decoded = crate::normalize::percent_decode(name);
            if decoded.as_deref().unwrap_or(name) == "_method" {
                out.present = true;
                let value = crate::normalize::percent_decode(value);
                out.write |= !safe_method_name(value.as_deref().unwrap_or("?"));
            }
        }
    }
    for (name, value) in headers {
        let n = name.as_str();
        if !n.starts_with("x") {
            continue;
        }
        let dashed;
        let n = if n.contains('_') {
            dashed = n.replace('_', "-");
            dashed.as_str()
        } else {
            n
        };
        let Some(i) = OVERRIDE_HEADERS.iter().position(|h| h.as_str() == n) else {
            continue;
        };
        out.present = true;
        let text = value.to_str().unwrap_or("").trim();
        if i < 3 {
            out.write |= !safe_method_name(text);
        } else {
            out.urls.push(text.to_string());
        }
    }
    out
}

/// GET, HEAD, OPTIONS or TRACE, in any case (RFC 9110 §9.2.1).
fn safe_method_name(name: &str) -> bool {
    ["GET", "HEAD", "OPTIONS", "TRACE"]
        .iter()
        .any(|m| m.eq_ignore_ascii_case(name.trim()))
}

/// The request's host: exactly one valid `Host` field, or the URI authority (HTTP/2, absolute
/// form) which then wins (RFC 9112 §3.2.3). Over HTTP/2 a `host` field that disagrees with
/// `:authority` is refused (RFC 9113 §8.3.1). Returns the value to forward, or `None` for 400.
pub fn request_host(
    headers: &HeaderMap,
    uri: &http::Uri,
    version: http::Version,
) -> Option<HeaderValue> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return None;
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return None;
        }
        if version == http::Version::HTTP_2
            && first.is_some_and(|h| {
                !h.as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
            })
        {
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
        let request_host =
            |h: &HeaderMap, u: &http::Uri| request_host(h, u, http::Version::HTTP_11);
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
    fn h2_authority_and_host_must_agree() {
        let abs: http::Uri = "http://api.example.com/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("API.example.com"));
        assert!(request_host(&h, &abs, http::Version::HTTP_2).is_some());
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(request_host(&h, &abs, http::Version::HTTP_2).is_none());
        assert_eq!(
            request_host(&h, &abs, http::Version::HTTP_11).unwrap(),
            "api.example.com",
            "HTTP/1.1 absolute form: the authority wins"
        );
    }

    #[test]
    fn overrides_are_read_in_every_spelling() {
        let mut h = HeaderMap::new();
        assert_eq!(overrides(&h, Some("a=1&method=x")), Overrides::default());
        h.insert("x_http_method_override", HeaderValue::from_static("delete"));
        h.insert("x-original-url", HeaderValue::from_static("/admin"));
        let o = overrides(&h, None);
        assert!(o.present);
        assert!(o.write);
        assert_eq!(o.urls, ["/admin"]);
        let q = overrides(&HeaderMap::new(), Some("a=1&_method=put"));
        assert!(q.present && q.write);
        let safe = overrides(&HeaderMap::new(), Some("_method=get"));
        assert!(safe.present && !safe.write);
        for q in [
            "%5Fmethod=DELETE",
            "_%6Dethod=DELETE",
            "a=1&%5fmethod=delete",
        ] {
            let o = overrides(&HeaderMap::new(), Some(q));
            assert!(o.present && o.write, "{q}");
        }
        let mut two = HeaderMap::new();
        two.append("x-rewrite-url", HeaderValue::from_static("/public/y"));
        two.append("x-original-url", HeaderValue::from_static("/admin/users"));
        two.append("x-original-url", HeaderValue::from_static("/admin/other"));
        assert_eq!(
            overrides(&two, None).urls,
            ["/public/y", "/admin/users", "/admin/other"]
        );
    }

    #[test]
    fn forwarded_is_replaced_and_quoted() {
        let mut h = HeaderMap::new();
        h.insert(&FORWARDED, HeaderValue::from_static("for=evil;host=evil"));
        set_forwarded(
            &mut h,
            "::1".parse().unwrap(),
            &HeaderValue::from_static("api:8080"),
        );
        assert_eq!(h.get_all(&FORWARDED).iter().count(), 1);
        assert_eq!(h[&FORWARDED], "for=\"[::1]\";host=\"api:8080\";proto=http");
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
