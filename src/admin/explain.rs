//! The admin `explain` report: how a request would be routed, keyed and cached, what a fill
//! would send the upstream, and what is stored under its key now. Never a secret: no
//! tokens, no stored bodies.

use http::{HeaderMap, Method};

use crate::app::App;
use crate::cache::Found;
use crate::cache::entry::flags as entry_flags;
use crate::clock::now_ms;
use crate::normalize::normalized_query;
use crate::proxy::lookup::{KeyBase, query_keep};
use crate::proxy::method_is_safe;
use crate::proxy::respond;
use crate::routing::{QueryPolicy, Scope, tags};

/// What `GET /explain` asks about.
pub struct Query<'a> {
    pub method: &'a str,
    pub url: &'a str,
    /// The Host the client would send; needed to name the entry.
    pub host: Option<&'a str>,
    /// The session subject, for user-scoped rules.
    pub sub: Option<&'a str>,
}

/// Explain a request (admin `/explain`).
pub async fn explain(app: &App, q: Query<'_>) -> serde_json::Value {
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
    let live = app.live();
    let config = &live.config;
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
        let target = if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        };
        out["fill_request"] = json!({
            "method": "GET",
            "target": target,
            "headers": crate::proxy::fill::explain_fill(&live, rule),
            "also": "the request headers the origin's Vary names for the resource (credentials excepted); nothing else the client sent",
        });
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
        let rule_tags = tags::rule_tags(rule, &m.params);
        let tag_ids = tags::entry_tags(&rule_tags, &path, base.scope.as_deref());
        out["key"]["redis_key"] = json!(String::from_utf8_lossy(&app.cache.keys().entry(&id).0));
        out["stored"] = match app.cache.lookup(&id, &tag_ids, None).await {
            Err(e) => json!({ "state": "unknown", "error": e.to_string() }),
            Ok(l) => {
                let now = now_ms();
                match l.found {
                    Found::Absent => json!({ "state": "absent" }),
                    Found::Unavailable => {
                        json!({ "state": "unknown", "error": "the entry could not be read" })
                    }
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
