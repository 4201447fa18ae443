//! The one template syntax of the config: literal text with `{name}` placeholders, as in
//! path templates (`/user/{id}`, `/static/{*rest}`), tag templates (`user:{id}`) and the
//! session key (`user_token:{sub}`). Parsing checks the placeholders; rendering fills them.
//!
//! Pure string work: it knows nothing of requests, claims or stores.

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    /// `{name}`.
    Var(String),
    /// `{*name}`: the rest of a path (path templates only).
    Rest(String),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Pattern {
    pub source: String,
    pub parts: Vec<Part>,
}

/// What a template is for, which decides what it may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// A matchit path template: `{{` and `}}` are literal braces, `{*rest}` may end it.
    Path,
    /// A tag or a session key: plain text and `{name}`.
    Text,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Pattern {
    /// Split `source` into literal text and placeholders. Placeholder names are letters,
    /// digits and '_'; the error says what is wrong.
    pub fn parse(source: &str, syntax: Syntax) -> Result<Pattern, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = source;
        while let Some(i) = rest.find(['{', '}']) {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let brace = rest.as_bytes()[i];
            if syntax == Syntax::Path && after.as_bytes().first() == Some(&brace) {
                // An escaped brace.
                lit.push(brace as char);
                rest = &after[1..];
                continue;
            }
            if brace == b'}' {
                return Err("a '}' has no matching '{'".into());
            }
            let Some(close) = after.find('}') else {
                return Err("a '{' has no matching '}'".into());
            };
            let inner = &after[..close];
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
            }
            match inner.strip_prefix('*') {
                Some(name) if syntax == Syntax::Path => {
                    if !valid_name(name) {
                        return Err(format!(
                            "parameter {{{inner}}} needs a name of letters, digits and '_'"
                        ));
                    }
                    if !after[close + 1..].is_empty() {
                        return Err(format!("catch-all {{*{name}}} must end the template"));
                    }
                    parts.push(Part::Rest(name.to_string()));
                }
                _ => {
                    if !valid_name(inner) {
                        return Err(match syntax {
                            Syntax::Path => format!(
                                "parameter {{{inner}}} needs a name of letters, digits and '_'"
                            ),
                            Syntax::Text => {
                                format!("{{{inner}}} is not a name of letters, digits and '_'")
                            }
                        });
                    }
                    parts.push(Part::Var(inner.to_string()));
                }
            }
            rest = &after[close + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if syntax == Syntax::Path {
            // A path binds each name once; text may repeat one (`s:{sub}:{sub}`).
            let mut seen: Vec<&str> = Vec::new();
            for name in parts.iter().filter_map(Part::name) {
                if seen.contains(&name) {
                    return Err(format!("parameter {{{name}}} appears twice"));
                }
                seen.push(name);
            }
        }
        Ok(Pattern {
            source: source.to_string(),
            parts,
        })
    }

    /// The placeholder names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(Part::name)
    }

    /// Fill the placeholders; `None` from `value` stops with that name.
    pub fn render<'v>(
        &self,
        mut value: impl FnMut(&str) -> Option<std::borrow::Cow<'v, str>>,
    ) -> Result<String, String> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Var(name) | Part::Rest(name) => {
                    out.push_str(&value(name).ok_or_else(|| name.clone())?)
                }
            }
        }
        Ok(out)
    }
}

impl Part {
    fn name(&self) -> Option<&str> {
        match self {
            Part::Lit(_) => None,
            Part::Var(n) | Part::Rest(n) => Some(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_literals() {
        let p = Pattern::parse("user_token:{tenant}:{sub}", Syntax::Text).unwrap();
        assert_eq!(p.names().collect::<Vec<_>>(), ["tenant", "sub"]);
        let out = p
            .render(|n| Some(std::borrow::Cow::Owned(n.to_uppercase())))
            .unwrap();
        assert_eq!(out, "user_token:TENANT:SUB");
        assert_eq!(p.render(|_| None), Err("tenant".to_string()));
        let path = Pattern::parse("/a/{{x}}/{id}/{*rest}", Syntax::Path).unwrap();
        assert_eq!(path.names().collect::<Vec<_>>(), ["id", "rest"]);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(
            Pattern::parse("a:{b", Syntax::Text)
                .unwrap_err()
                .contains("no matching '}'")
        );
        assert!(
            Pattern::parse("a:b}", Syntax::Text)
                .unwrap_err()
                .contains("no matching '{'")
        );
        assert!(Pattern::parse("a:{b c}", Syntax::Text).is_err());
        assert!(
            Pattern::parse("/{*r}/x", Syntax::Path)
                .unwrap_err()
                .contains("must end")
        );
        assert!(
            Pattern::parse("/{a}/{a}", Syntax::Path)
                .unwrap_err()
                .contains("twice")
        );
    }
}
