//! The compiled rule table: path templates -> cache rules, and tag templates rendered from a match.
//!
//! Matching is by template specificity (static segment beats `{param}` beats `{*rest}`), which
//! matchit gives us, never by file order. This module knows nothing about HTTP messages or
//! Redis; it only answers "which rule applies to this canonical path, with which parameters".

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use crate::auth::Policy;
use crate::cache::policy::OriginCacheControl;
use crate::config::units::format_duration;

/// Whose entry a cached response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One entry shared by every caller, authenticated or not.
    Public,
    /// One entry per verified session subject.
    User,
    /// Anonymous requests share entries; requests carrying Authorization bypass the cache
    /// (RFC 9111 §3.5).
    Anonymous,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Public => "public",
            Scope::User => "user",
            Scope::Anonymous => "anonymous",
        }
    }
}

/// What a rule does with the query string when it builds cache keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryPolicy {
    /// Keep every parameter, sorted by name (order of equal names preserved).
    Sorted,
    /// Drop the query from the key (the upstream still receives it).
    Ignore,
    /// Keep only these parameter names (sorted), drop the rest from the key.
    Keep(Vec<String>),
}

impl QueryPolicy {
    pub fn keep(names: &[String]) -> QueryPolicy {
        let mut names = names.to_vec();
        names.sort();
        names.dedup();
        QueryPolicy::Keep(names)
    }
}

/// A parsed path template (matchit syntax) and the names of its parameters.
#[derive(Debug, Clone)]
pub struct Template {
    pub source: String,
    pub params: Vec<String>,
}

impl Template {
    /// Parse and check a `match` template such as `/user/{id}` or `/static/{*rest}`.
    pub fn parse(source: &str) -> Result<Template, String> {
        if !source.starts_with('/') {
            return Err("a template must start with '/'".into());
        }
        if source.contains('?') || source.contains('#') {
            return Err("a template matches the path only; remove the query string".into());
        }
        let mut params = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if rest[open..].starts_with("{{") {
                rest = &rest[open + 2..];
                continue;
            }
            let Some(close) = rest[open..].find('}') else {
                return Err("a '{' has no matching '}'".into());
            };
            let inner = &rest[open + 1..open + close];
            let (catch_all, name) = match inner.strip_prefix('*') {
                Some(n) => (true, n),
                None => (false, inner),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "parameter {{{inner}}} needs a name of letters, digits and '_'"
                ));
            }
            if params.iter().any(|p| p == name) {
                return Err(format!("parameter {{{name}}} appears twice"));
            }
            let after = &rest[open + close + 1..];
            if catch_all && !after.is_empty() {
                return Err(format!("catch-all {{*{name}}} must end the template"));
            }
            params.push(name.to_string());
            rest = after;
        }
        // matchit has the last word on syntax (one parameter per segment, etc.).
        let mut probe = matchit::Router::new();
        probe.insert(source, ()).map_err(|e| e.to_string())?;
        Ok(Template {
            source: source.to_string(),
            params,
        })
    }

    /// Parse a tag template such as `user:{id}` against this route's parameters.
    pub fn tag(&self, source: &str) -> Result<TagTemplate, String> {
        if source.is_empty() || source.len() > 256 {
            return Err("a tag must be 1 to 256 characters".into());
        }
        if source.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a tag must not contain spaces or control characters".into());
        }
        if source == "*" {
            return Err("\"*\" is reserved for the global tag (purge everything)".into());
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TagPart::Lit(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err("a '{' has no matching '}'".into());
            };
            let name = &rest[open + 1..open + close];
            if !self.params.iter().any(|p| p == name) {
                let known = if self.params.is_empty() {
                    "it has no parameters".to_string()
                } else {
                    format!(
                        "it has {}",
                        self.params
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(format!(
                    "names {{{name}}}, which the template {:?} lacks ({known})",
                    self.source
                ));
            }
            parts.push(TagPart::Param(name.to_string()));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err("a '}' has no matching '{'".into());
        }
        if !rest.is_empty() {
            parts.push(TagPart::Lit(rest.to_string()));
        }
        Ok(TagTemplate {
            source: source.to_string(),
            parts,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TagPart {
    Lit(String),
    Param(String),
}

/// A tag such as `user:{id}`, rendered from the parameters of a match.
#[derive(Debug, Clone)]
pub struct TagTemplate {
    pub source: String,
    parts: Vec<TagPart>,
}

impl TagTemplate {
    /// The tag's text for these parameters. The result is only ever hashed into a key.
    pub fn render(&self, params: &matchit::Params<'_, '_>) -> String {
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                TagPart::Lit(s) => out.push_str(s),
                TagPart::Param(name) => out.push_str(params.get(name).unwrap_or("")),
            }
        }
        out
    }
}

/// One validated rule as the config layer hands it over.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub template: Template,
    pub ttl: Option<Duration>,
    pub query: QueryPolicy,
    pub vary: Vec<HeaderName>,
    /// Request headers a fill forwards besides `vary` (validated against it at load).
    pub fill_headers: Vec<HeaderName>,
    pub tags: Vec<TagTemplate>,
    /// Tags bumped when an unsafe method on this path succeeds.
    pub purge: Vec<TagTemplate>,
    /// Serve a stale entry at once while one background refresh runs (RFC 5861).
    pub stale_while_revalidate: Duration,
    /// Serve a stale entry while the upstream fails (RFC 5861).
    pub stale_if_error: Duration,
    pub origin_cache_control: OriginCacheControl,
    pub auth: Policy,
    pub scope: Scope,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Position in the table; indexes per-rule metric handles.
    pub index: usize,
    pub name: Arc<str>,
    pub template: Template,
    /// `None`: the rule does not cache.
    pub ttl: Option<Duration>,
    pub query: QueryPolicy,
    pub vary: Vec<HeaderName>,
    /// Request headers a fill forwards besides `vary` (validated against it at load).
    pub fill_headers: Vec<HeaderName>,
    pub tags: Vec<TagTemplate>,
    /// Tags bumped when an unsafe method on this path succeeds.
    pub purge: Vec<TagTemplate>,
    /// Serve a stale entry at once while one background refresh runs (RFC 5861).
    pub stale_while_revalidate: Duration,
    /// Serve a stale entry while the upstream fails (RFC 5861).
    pub stale_if_error: Duration,
    pub origin_cache_control: OriginCacheControl,
    pub auth: Policy,
    pub scope: Scope,
}

/// Rule names label metrics, so they are short and plain.
pub fn validate_rule_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "rule name {name:?} must be 1 to 64 letters, digits, '_' or '-'"
        ));
    }
    if name == UNMATCHED {
        return Err(format!(
            "rule name {name:?} is reserved for requests no rule matches"
        ));
    }
    Ok(())
}

/// Metric and log label of requests that no rule matched.
pub const UNMATCHED: &str = "none";

/// The result of routing a canonical path.
pub struct RouteMatch<'t, 'p> {
    pub rule: &'t Rule,
    pub params: matchit::Params<'t, 'p>,
}

/// All rules, compiled for lookup by path.
///
/// matchit refuses a `{param}` and a `{*rest}` at the same position in one tree, so such
/// templates go to separate trees; a lookup asks every tree (rarely more than two) and keeps
/// the most specific match.
#[derive(Debug)]
pub struct RuleTable {
    routers: Vec<matchit::Router<usize>>,
    rules: Vec<Rule>,
    /// Per rule, its segments ranked (static 2, parameter 1, catch-all 0).
    rank: Vec<Vec<u8>>,
}

fn specificity(template: &str) -> Vec<u8> {
    template
        .split('/')
        .skip(1)
        .map(|seg| {
            if seg.starts_with("{*") {
                0
            } else if seg.replace("{{", "").contains('{') {
                1
            } else {
                2
            }
        })
        .collect()
}

fn conflict_message(spec: &RuleSpec, rules: &[Rule], e: matchit::InsertError) -> String {
    let detail = match e {
        matchit::InsertError::Conflict { with } => {
            let owner = rules
                .iter()
                .find(|r| r.template.source == with)
                .map(|r| format!(" of rule {:?}", r.name))
                .unwrap_or_default();
            format!(
                "matches the same paths as {with:?}{owner} (rename the parameter to share one template)"
            )
        }
        other => other.to_string(),
    };
    format!(
        "rule {:?}: match {:?} {detail}",
        spec.name, spec.template.source
    )
}

impl RuleTable {
    /// Compile specs; the error names the index of the offending rule.
    pub fn build(specs: Vec<RuleSpec>) -> Result<RuleTable, (usize, String)> {
        let mut routers: Vec<matchit::Router<usize>> = vec![matchit::Router::new()];
        let mut rules: Vec<Rule> = Vec::with_capacity(specs.len());
        for (index, spec) in specs.into_iter().enumerate() {
            if let Some(other) = rules
                .iter()
                .find(|r| r.template.source == spec.template.source)
            {
                return Err((
                    index,
                    format!(
                        "rule {:?}: match {:?} is already the template of rule {:?} (merge the two rules)",
                        spec.name, spec.template.source, other.name
                    ),
                ));
            }
            let mut placed = None;
            for (n, router) in routers.iter_mut().enumerate() {
                match router.insert(spec.template.source.as_str(), index) {
                    Ok(()) => {
                        placed = Some(n);
                        break;
                    }
                    // A parameter and a catch-all at one position: try the next tree.
                    Err(matchit::InsertError::Conflict { with })
                        if with.contains("{*") || spec.template.source.contains("{*") =>
                    {
                        continue;
                    }
                    Err(e) => return Err((index, conflict_message(&spec, &rules, e))),
                }
            }
            if placed.is_none() {
                let mut router = matchit::Router::new();
                router
                    .insert(spec.template.source.as_str(), index)
                    .map_err(|e| (index, conflict_message(&spec, &rules, e)))?;
                routers.push(router);
            }
            rules.push(Rule {
                index,
                name: Arc::from(spec.name),
                template: spec.template,
                ttl: spec.ttl,
                query: spec.query,
                vary: spec.vary,
                fill_headers: spec.fill_headers,
                tags: spec.tags,
                purge: spec.purge,
                stale_while_revalidate: spec.stale_while_revalidate,
                stale_if_error: spec.stale_if_error,
                origin_cache_control: spec.origin_cache_control,
                auth: spec.auth,
                scope: spec.scope,
            });
        }
        let rank = rules
            .iter()
            .map(|r| specificity(&r.template.source))
            .collect();
        Ok(RuleTable {
            routers,
            rules,
            rank,
        })
    }

    /// An empty table: every request passes through untouched.
    pub fn empty() -> RuleTable {
        RuleTable {
            routers: vec![matchit::Router::new()],
            rules: Vec::new(),
            rank: Vec::new(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule for a canonical path. A trailing slash is also tried without it, so
    /// `/user/42/` cannot slip past the rule (and its auth) that governs `/user/42`.
    pub fn at<'t, 'p>(&'t self, path: &'p str) -> Option<RouteMatch<'t, 'p>> {
        self.at_exact(path).or_else(|| {
            if path.len() > 1 && path.ends_with('/') {
                self.at_exact(&path[..path.len() - 1])
            } else {
                None
            }
        })
    }

    fn at_exact<'t, 'p>(&'t self, path: &'p str) -> Option<RouteMatch<'t, 'p>> {
        let mut best: Option<matchit::Match<'t, 'p, &'t usize>> = None;
        for router in &self.routers {
            if let Ok(m) = router.at(path) {
                let better = match &best {
                    None => true,
                    Some(b) => self.rank[*m.value] > self.rank[*b.value],
                };
                if better {
                    best = Some(m);
                }
            }
        }
        let found = best?;
        Some(RouteMatch {
            rule: &self.rules[*found.value],
            params: found.params,
        })
    }

    /// The table as `cachegate check` prints it.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if self.rules.is_empty() {
            out.push_str("no rules: every request is proxied untouched\n");
            return out;
        }
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<8} {:<10} {:<9} {:<10} tags",
            "rule", "match", "ttl", "query", "auth", "scope"
        );
        for r in &self.rules {
            let ttl = r.ttl.map(format_duration).unwrap_or_else(|| "-".into());
            let query = match &r.query {
                QueryPolicy::Sorted => "sorted".to_string(),
                QueryPolicy::Ignore => "ignore".to_string(),
                QueryPolicy::Keep(n) => n.join(","),
            };
            let tags: Vec<&str> = r.tags.iter().map(|t| t.source.as_str()).collect();
            let _ = write!(
                out,
                "{:<16} {:<28} {:<8} {:<10} {:<9} {:<10} {}",
                r.name,
                r.template.source,
                ttl,
                query,
                r.auth.as_str(),
                r.scope.as_str(),
                tags.join(",")
            );
            if !r.vary.is_empty() {
                let vary: Vec<&str> = r.vary.iter().map(|h| h.as_str()).collect();
                let _ = write!(out, "  vary={}", vary.join(","));
            }
            if !r.stale_while_revalidate.is_zero() {
                let _ = write!(out, "  swr={}", format_duration(r.stale_while_revalidate));
            }
            if !r.stale_if_error.is_zero() {
                let _ = write!(out, "  sie={}", format_duration(r.stale_if_error));
            }
            if r.origin_cache_control != OriginCacheControl::Respect {
                let _ = write!(out, "  origin={}", r.origin_cache_control.as_str());
            }
            if !r.purge.is_empty() {
                let purge: Vec<&str> = r.purge.iter().map(|t| t.source.as_str()).collect();
                let _ = write!(out, "  purge={}", purge.join(","));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, template: &str, tags: &[&str]) -> RuleSpec {
        let t = Template::parse(template).unwrap();
        let tags = tags.iter().map(|s| t.tag(s).unwrap()).collect();
        RuleSpec {
            name: name.into(),
            template: t,
            ttl: Some(Duration::from_secs(60)),
            query: QueryPolicy::Sorted,
            vary: vec![],
            fill_headers: vec![],
            tags,
            purge: vec![],
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            origin_cache_control: OriginCacheControl::Respect,
            auth: Policy::None,
            scope: Scope::Anonymous,
        }
    }

    #[test]
    fn specificity_beats_file_order() {
        let table = RuleTable::build(vec![
            spec("rest", "/user/{*rest}", &[]),
            spec("one", "/user/{id}", &["user:{id}"]),
            spec("me", "/user/me", &[]),
        ])
        .unwrap();
        assert_eq!(&*table.at("/user/me").unwrap().rule.name, "me");
        let m = table.at("/user/42").unwrap();
        assert_eq!(&*m.rule.name, "one");
        assert_eq!(m.rule.tags[0].render(&m.params), "user:42");
        assert_eq!(&*table.at("/user/42/posts").unwrap().rule.name, "rest");
        assert!(table.at("/other").is_none());
        let table = RuleTable::build(vec![
            spec("deep", "/{*rest}", &[]),
            spec("param", "/{x}/b", &[]),
            spec("stat", "/a/{*rest}", &[]),
        ])
        .unwrap();
        assert_eq!(
            &*table.at("/a/b").unwrap().rule.name,
            "stat",
            "static first segment wins"
        );
        assert_eq!(&*table.at("/z/b").unwrap().rule.name, "param");
        assert_eq!(&*table.at("/z/c").unwrap().rule.name, "deep");
    }

    #[test]
    fn trailing_slash_keeps_the_rule() {
        let table = RuleTable::build(vec![spec("one", "/user/{id}", &[])]).unwrap();
        assert_eq!(&*table.at("/user/42/").unwrap().rule.name, "one");
        assert_eq!(table.at("/user/42/").unwrap().params.get("id"), Some("42"));
    }

    #[test]
    fn duplicate_and_conflicting_templates_are_refused() {
        let err = RuleTable::build(vec![
            spec("a", "/user/{id}", &[]),
            spec("b", "/user/{id}", &[]),
        ])
        .unwrap_err();
        assert_eq!(err.0, 1);
        assert!(
            err.1.contains("already the template of rule \"a\""),
            "{}",
            err.1
        );
        let err = RuleTable::build(vec![
            spec("a", "/user/{id}", &[]),
            spec("b", "/user/{name}", &[]),
        ])
        .unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("matches the same paths"), "{}", err.1);
    }

    #[test]
    fn templates_and_tags_are_checked() {
        assert!(Template::parse("user/{id}").is_err());
        assert!(Template::parse("/user/{id").is_err());
        assert!(Template::parse("/a/{*rest}/b").is_err());
        assert!(Template::parse("/a/{x}{y}").is_err());
        let t = Template::parse("/user/{id}").unwrap();
        assert!(t.tag("user:{name}").unwrap_err().contains("lacks"));
        assert!(t.tag("user {id}").is_err());
        assert_eq!(t.tag("users").unwrap().source, "users");
    }

    #[test]
    fn a_thousand_rules_compile_and_route() {
        let specs = (0..1000)
            .map(|i| spec(&format!("r{i}"), &format!("/svc{i}/item/{{id}}"), &[]))
            .collect();
        let table = RuleTable::build(specs).unwrap();
        assert_eq!(&*table.at("/svc999/item/5").unwrap().rule.name, "r999");
    }
}
