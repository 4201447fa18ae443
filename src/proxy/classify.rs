//! Classify a request before anything is asked of anyone: its host and canonical path, the
//! rule that governs it, its method and URL overrides, the auth policy to apply, and the
//! tags a successful write would bump. It also removes what must never be forwarded:
//! hop-by-hop fields and client-sent identity fields (the forwarding fields are set by
//! `forward::client_request`, only for requests that do go upstream).
//!
//! Nothing here does I/O.

use http::HeaderMap;
use http::header::{self, HeaderValue};
use http::request::Parts;

use super::error::ProxyError;
use super::headers::{self, Overrides};
use super::{gate, method_is_safe};
use crate::app::Live;
use crate::cache::key::{self, Id};
use crate::normalize::canonical_path;
use crate::routing::{Policy, Rule, tags};

/// What the pipeline needs to know about a request.
pub struct Route {
    /// The Host to forward (and key by).
    pub host: HeaderValue,
    /// The canonical path.
    pub path: String,
    /// Canonical path and the query as sent: what a pass-through asks the upstream for.
    pub target: String,
    /// The matched rule's position in the live table.
    pub rule: Option<usize>,
    /// The rule's own tags, rendered for this path (cache rules only).
    pub rule_tags: Vec<Id>,
    pub overrides: Overrides,
    pub policy: Policy,
    pub is_read: bool,
    /// An unsafe method, or an override to one.
    pub is_write: bool,
    /// Tags a successful write bumps (the routed path's and an overriding URL's).
    pub write_tags: Vec<Id>,
    pub is_login: bool,
    pub is_logout: bool,
}

impl Route {
    /// The cache rule to look up, when this is a GET/HEAD the cache may answer.
    pub fn cached<'l>(&self, live: &'l Live) -> Option<&'l Rule> {
        let rule = live.config.rules.rules().get(self.rule?)?;
        (self.is_read && rule.ttl.is_some() && !self.overrides.present).then_some(rule)
    }
}

/// Classify `parts` (and put its headers in shape to be forwarded). `matched` learns the
/// rule as soon as it is known, so a request refused later still counts against it.
pub fn classify(
    live: &Live,
    parts: &mut Parts,
    matched: &mut Option<usize>,
) -> Result<Route, ProxyError> {
    if parts.headers.len() > live.config.server.max_header_count {
        // HTTP/1 is refused by hyper already; this holds HTTP/2 to the same limit.
        return Err(ProxyError::TooManyHeaders);
    }
    let host = headers::request_host(&parts.headers, &parts.uri, parts.version)
        .ok_or(ProxyError::BadHost)?;
    let path = canonical_path(parts.uri.path())
        .map_err(ProxyError::BadPath)?
        .into_owned();
    let query = parts.uri.query();
    let target = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let config = &live.config;
    let route = config.rules.at(&path);
    *matched = route.as_ref().map(|m| m.rule.index);
    // A method or URL override: the upstream may run another method or serve another path
    // than the one routed here, so such a request is never cached, is gated by the
    // stricter of both paths' policies, and purges like the write it may be.
    let overrides = headers::overrides(&parts.headers, query);
    let override_paths = overrides
        .urls
        .iter()
        .map(|url| override_target(url))
        .collect::<Result<Vec<String>, ProxyError>>()?;
    headers::strip_hop_by_hop(&mut parts.headers);
    // Identity headers come from the gate only, never from the client.
    let auth = &config.auth;
    gate::strip_identity_headers(&mut parts.headers, &auth.subject_header);

    let is_login = auth
        .login
        .as_ref()
        .is_some_and(|l| l.method == parts.method && l.path == path);
    let is_logout = auth
        .logout
        .as_ref()
        .is_some_and(|l| l.method == parts.method && l.path == path);
    let policy = match route.as_ref().map(|m| m.rule.auth).unwrap_or(auth.default) {
        // Whoever logs in has no session yet.
        _ if is_login && !overrides.present => Policy::None,
        // A logout needs to know whose session it ends.
        Policy::None if is_logout => Policy::Optional,
        p => p,
    };
    // Every overriding URL is gated as if it were the path: the strictest policy wins.
    let policy = override_paths.iter().fold(policy, |policy, p| {
        let theirs = config
            .rules
            .at(p)
            .map(|m| m.rule.auth)
            .unwrap_or(auth.default);
        policy.stricter(theirs)
    });
    let is_read = parts.method == http::Method::GET || parts.method == http::Method::HEAD;
    let is_write = !method_is_safe(&parts.method) || overrides.write;
    let mut write_tags = Vec::new();
    if is_write {
        write_tags = tags::write_tags(&path, route.as_ref().map(|m| (m.rule, &m.params)));
        for p in &override_paths {
            let m = config.rules.at(p);
            write_tags.extend(tags::write_tags(p, m.as_ref().map(|m| (m.rule, &m.params))));
        }
    }
    let rule_tags = match &route {
        Some(m) if is_read && m.rule.ttl.is_some() => tags::rule_tags(m.rule, &m.params),
        _ => Vec::new(),
    };
    Ok(Route {
        rule: route.as_ref().map(|m| m.rule.index),
        host,
        path,
        target,
        rule_tags,
        overrides,
        policy,
        is_read,
        is_write,
        write_tags,
        is_login,
        is_logout,
    })
}

/// The canonical path of an `X-Original-URL` / `X-Rewrite-URL` value (a path or an
/// absolute URI); an ambiguous one is refused like an ambiguous request path.
fn override_target(url: &str) -> Result<String, ProxyError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| ProxyError::BadPath(crate::normalize::PathError::NotOriginForm))?;
    canonical_path(uri.path())
        .map(|p| p.into_owned())
        .map_err(ProxyError::BadPath)
}

/// The path tags of a same-origin `Location` / `Content-Location` in a write's answer: the
/// resource it names changed too (RFC 9111 §4.4).
pub fn location_tags(response: &HeaderMap, host: &HeaderValue) -> Vec<Id> {
    [header::LOCATION, header::CONTENT_LOCATION]
        .iter()
        .filter_map(|name| response.get(name))
        .filter_map(|v| same_origin_path(v, host))
        .map(|p| key::path_tag(&p))
        .collect()
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
