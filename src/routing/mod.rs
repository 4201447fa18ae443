//! Routing: which rule applies to a canonical path, with which parameters. Rules are
//! compiled once per configuration (`config::compile`) into a table that matches by
//! template specificity (static segment beats `{param}` beats `{*rest}`), never by file
//! order, and that knows its rules by name.
//!
//! This module knows nothing about HTTP messages or stores: a rule is data (its cache,
//! auth and purge settings), and the table answers "which rule, with which parameters".

pub mod tags;
pub mod template;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use crate::cache::policy::OriginCacheControl;
pub use crate::metrics::UNMATCHED;
use tags::TagTemplate;
use template::{Pattern, Syntax};

/// Who may pass a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Untouched: no check, Authorization passed through.
    None,
    /// A valid session is needed.
    Required,
    /// Checked when a bearer is present; anonymous otherwise.
    Optional,
}

impl Policy {
    /// The stricter of two policies (`required` > `optional` > `none`).
    pub fn stricter(self, other: Policy) -> Policy {
        let rank = |p: Policy| match p {
            Policy::None => 0,
            Policy::Optional => 1,
            Policy::Required => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Required => "required",
            Policy::Optional => "optional",
        }
    }
}

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

/// Parse and check a rule's `match` template such as `/user/{id}` or `/static/{*rest}`.
pub fn path_template(source: &str) -> Result<Pattern, String> {
    if !source.starts_with('/') {
        return Err("a template must start with '/'".into());
    }
    if source.contains('?') || source.contains('#') {
        return Err("a template matches the path only; remove the query string".into());
    }
    let pattern = Pattern::parse(source, Syntax::Path)?;
    // matchit has the last word on syntax (one parameter per segment, etc.).
    let mut probe = matchit::Router::new();
    probe.insert(source, ()).map_err(|e| e.to_string())?;
    Ok(pattern)
}

/// One rule, as compiled from the file.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Position in its table (assigned by `RuleTable::build`).
    pub index: usize,
    pub name: Arc<str>,
    pub template: Pattern,
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

impl Rule {
    /// A rule matching `template` with nothing set: every setting at its default.
    pub fn new(name: &str, template: Pattern) -> Rule {
        Rule {
            index: 0,
            name: Arc::from(name),
            template,
            ttl: None,
            query: QueryPolicy::Sorted,
            vary: Vec::new(),
            fill_headers: Vec::new(),
            tags: Vec::new(),
            purge: Vec::new(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            origin_cache_control: OriginCacheControl::Respect,
            auth: Policy::None,
            scope: Scope::Anonymous,
        }
    }
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

fn conflict_message(spec: &Rule, rules: &[Rule], e: matchit::InsertError) -> String {
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
    /// Compile rules; the error names the index of the offending rule.
    pub fn build(specs: Vec<Rule>) -> Result<RuleTable, (usize, String)> {
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
            let mut rule = spec;
            rule.index = index;
            rules.push(rule);
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

    /// A rule by name.
    pub fn named(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| &*r.name == name)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, template: &str, tags: &[&str]) -> Rule {
        let t = path_template(template).unwrap();
        let tags = tags
            .iter()
            .map(|s| TagTemplate::parse(s, &t).unwrap())
            .collect();
        Rule {
            ttl: Some(Duration::from_secs(60)),
            tags,
            ..Rule::new(name, t)
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
        assert!(path_template("user/{id}").is_err());
        assert!(path_template("/user/{id").is_err());
        assert!(path_template("/a/{*rest}/b").is_err());
        assert!(path_template("/a/{x}{y}").is_err());
        let t = path_template("/user/{id}").unwrap();
        assert!(
            TagTemplate::parse("user:{name}", &t)
                .unwrap_err()
                .contains("lacks")
        );
        assert!(TagTemplate::parse("user {id}", &t).is_err());
        assert_eq!(TagTemplate::parse("users", &t).unwrap().source(), "users");
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
