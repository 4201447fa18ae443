//! Tags: the templates a rule names (`user:{id}`), rendered from a match, and the tags an
//! entry carries or a write bumps. Tags are only ever hashed into keys (`cache::key`).

use std::borrow::Cow;

use super::Rule;
use super::template::{Pattern, Syntax};
use crate::cache::key::{self, Id};

/// A tag such as `user:{id}`, rendered from the parameters of a match.
#[derive(Debug, Clone)]
pub struct TagTemplate {
    pattern: Pattern,
}

impl TagTemplate {
    /// Parse a tag template against the parameters of its rule's path template.
    pub fn parse(source: &str, template: &Pattern) -> Result<TagTemplate, String> {
        if source.is_empty() || source.len() > 256 {
            return Err("a tag must be 1 to 256 characters".into());
        }
        if source.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a tag must not contain spaces or control characters".into());
        }
        if source == "*" {
            return Err("\"*\" is reserved for the global tag (purge everything)".into());
        }
        let pattern = Pattern::parse(source, Syntax::Text)?;
        let params: Vec<&str> = template.names().collect();
        if let Some(name) = pattern.names().find(|n| !params.contains(n)) {
            let known = if params.is_empty() {
                "it has no parameters".to_string()
            } else {
                format!(
                    "it has {}",
                    params
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(format!(
                "names {{{name}}}, which the template {:?} lacks ({known})",
                template.source
            ));
        }
        Ok(TagTemplate { pattern })
    }

    pub fn source(&self) -> &str {
        &self.pattern.source
    }

    /// The tag's text for these parameters. The result is only ever hashed into a key.
    pub fn render(&self, params: &matchit::Params<'_, '_>) -> String {
        self.pattern
            .render(|name| Some(Cow::Borrowed(params.get(name).unwrap_or(""))))
            .unwrap_or_default()
    }
}

/// A rule's own tags, rendered for a match.
pub fn rule_tags(rule: &Rule, params: &matchit::Params<'_, '_>) -> Vec<Id> {
    rule.tags
        .iter()
        .map(|t| key::tag_id(&t.render(params)))
        .collect()
}

/// The tags an entry carries: its rule's own (`rule_tags`), the implicit path tag (RFC 9111
/// §4.4), the global tag, and the subject tag when the entry is one user's (`sub`).
pub fn entry_tags(rule_tags: &[Id], path: &str, sub: Option<&str>) -> Vec<Id> {
    let mut tags = Vec::with_capacity(rule_tags.len() + 3);
    tags.extend_from_slice(rule_tags);
    tags.push(key::path_tag(path));
    tags.push(key::global_tag());
    if let Some(sub) = sub {
        tags.push(key::subject_tag(sub));
    }
    tags.sort_by_key(|t| t.0);
    tags.dedup();
    tags
}

/// The tags a successful write to `path` bumps: the path's own and its rule's `purge` list.
pub fn write_tags(path: &str, rule: Option<(&Rule, &matchit::Params<'_, '_>)>) -> Vec<Id> {
    let mut tags = vec![key::path_tag(path)];
    if let Some((rule, params)) = rule {
        tags.extend(rule.purge.iter().map(|t| key::tag_id(&t.render(params))));
    }
    tags
}
