//! The session gate: bearer parsing, JWT verification, the session key, and the equality check
//! against the one valid token stored for each user.
//!
//! A request is authenticated when its bearer token is well formed, passes the JWT checks,
//! and equals byte for byte (in constant time) the value at its subject's session key. A newer
//! login overwrites that key, so older tokens stop working at once. `Gate` decides; the
//! sessions themselves are read and written through `session::SessionStore`. Nothing here
//! logs or echoes a token.

pub mod jwt;
pub mod session;

use std::borrow::Cow;

use http::HeaderMap;
use http::header;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::cache::key::SessionKey;
use crate::labels::AuthResult;
use crate::routing::template::{Part, Pattern, Syntax};
use jwt::{Claims, Verifier};

/// Why a request was refused with 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("no bearer token")]
    MissingToken,
    #[error("the Authorization header is not one well-formed bearer token")]
    Malformed,
    #[error("the token's signature or algorithm is not accepted")]
    InvalidSignature,
    #[error("the token is expired or not valid yet")]
    Expired,
    #[error("the session was replaced by a newer login or ended")]
    Superseded,
    #[error("there is no session for this subject")]
    SessionMissing,
}

impl Failure {
    /// The `error` of the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            Failure::MissingToken => "missing_token",
            Failure::Malformed => "malformed_token",
            Failure::InvalidSignature => "invalid_signature",
            Failure::Expired => "expired",
            Failure::Superseded => "session_superseded",
            Failure::SessionMissing => "session_missing",
        }
    }

    /// The `result` label of `cachegate_auth_total`.
    pub fn result(self) -> AuthResult {
        match self {
            Failure::MissingToken => AuthResult::MissingToken,
            Failure::Malformed => AuthResult::Malformed,
            Failure::InvalidSignature => AuthResult::InvalidSignature,
            Failure::Expired => AuthResult::Expired,
            Failure::Superseded => AuthResult::Superseded,
            Failure::SessionMissing => AuthResult::SessionMissing,
        }
    }
}

/// What to do when the session cannot be checked because the store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 with Retry-After: never a 401, which would log users out during an outage.
    Reject,
    /// Let the request through without a subject, flagged to the upstream.
    Allow,
}

/// The one bearer token of a request: `Ok(None)` when there is no Authorization header.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Failure> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Failure::Malformed);
    }
    let text = value.to_str().map_err(|_| Failure::Malformed)?;
    let (scheme, rest) = text.trim().split_once(' ').ok_or(Failure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Failure::Malformed);
    }
    let token = rest.trim();
    // token68 (RFC 7235 §2.1); JWTs use the base64url subset and '.'.
    let token68 = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
    if token.is_empty() || token.len() > 8192 || !token.bytes().all(token68) {
        return Err(Failure::Malformed);
    }
    Ok(Some(token))
}

/// A key template over JWT claims, such as `user_token:{sub}`.
#[derive(Debug, Clone)]
pub struct SessionTemplate {
    pattern: Pattern,
}

/// Longest claim value accepted into a session key.
const MAX_CLAIM_LEN: usize = 256;

impl SessionTemplate {
    pub fn parse(source: &str) -> Result<SessionTemplate, String> {
        let pattern = Pattern::parse(source, Syntax::Text).map_err(|e| {
            // The one template syntax names "parameters"; here they are claims.
            e.replace(
                "is not a name of letters, digits and '_'",
                "is not a claim name",
            )
        })?;
        if pattern.names().next().is_none() {
            return Err("must name at least one claim, e.g. \"user_token:{sub}\"".into());
        }
        Ok(SessionTemplate { pattern })
    }

    pub fn source(&self) -> &str {
        &self.pattern.source
    }

    /// The literal text every session key starts with (`user_token:` for
    /// `user_token:{sub}`; empty when the template starts with a claim).
    pub fn static_prefix(&self) -> &str {
        match self.pattern.parts.first() {
            Some(Part::Lit(s)) => s,
            _ => "",
        }
    }

    /// The claims the template names, in order.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.pattern.names()
    }

    /// Render from a token's claims.
    pub fn render(&self, claims: &Claims) -> Result<SessionKey, Failure> {
        let mut bad = false;
        let key = self
            .pattern
            .render(|name| match claim_text(claims, name) {
                Ok(t) => Some(Cow::Owned(t)),
                Err(_) => {
                    bad = true;
                    None
                }
            })
            .map_err(|_| Failure::Malformed)?;
        if bad {
            return Err(Failure::Malformed);
        }
        Ok(SessionKey(key))
    }

    /// Render for one subject (admin calls): only when the subject is the sole claim.
    pub fn render_subject(&self, subject_claim: &str, sub: &str) -> Option<SessionKey> {
        self.pattern
            .render(|name| (name == subject_claim).then_some(Cow::Borrowed(sub)))
            .ok()
            .map(SessionKey)
    }
}

/// A claim as key text: strings and integers only, printable, bounded.
fn claim_text(claims: &Claims, name: &str) -> Result<String, Failure> {
    let text = match claims.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return Err(Failure::Malformed),
    };
    valid_subject(&text)
        .then_some(text)
        .ok_or(Failure::Malformed)
}

/// A subject usable in a key, a header and a tag: 1-256 visible ASCII characters.
pub fn valid_subject(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_CLAIM_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

/// A request whose token passed the JWT checks; the session check is still to come.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub sub: String,
    pub token: String,
    pub session_key: SessionKey,
    /// The token's `exp`, when it has one.
    pub exp: Option<u64>,
}

/// Compiled `[auth]`: how to turn a bearer into a subject and a session key.
#[derive(Debug, Clone)]
pub struct Gate {
    pub verifier: Verifier,
    pub template: SessionTemplate,
    pub subject_claim: String,
    memo: Memo,
}

/// Tokens that passed the JWT checks recently, so a client's next requests skip the
/// signature verification and claim parsing. Only successes are remembered, `exp` is checked
/// again on every use, and the session equality check in the store is never skipped.
#[derive(Clone)]
struct Memo(moka::sync::Cache<String, Claimed>);

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

/// Verified tokens remembered, and for how long.
const MEMO_CAPACITY: u64 = 10_000;
const MEMO_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl Gate {
    pub fn new(verifier: Verifier, template: SessionTemplate, subject_claim: String) -> Gate {
        let memo = moka::sync::Cache::builder()
            .max_capacity(MEMO_CAPACITY)
            .time_to_live(MEMO_TTL)
            .build();
        Gate {
            verifier,
            template,
            subject_claim,
            memo: Memo(memo),
        }
    }

    /// The request's claimed identity: `Ok(None)` without Authorization.
    pub fn claim(&self, headers: &HeaderMap) -> Result<Option<Claimed>, Failure> {
        match bearer(headers)? {
            None => Ok(None),
            Some(token) => self.claim_token(token).map(Some),
        }
    }

    /// Verify a token and derive its subject and session key.
    pub fn claim_token(&self, token: &str) -> Result<Claimed, Failure> {
        if let Some(c) = self.memo.0.get(token) {
            let now = jwt::now_s();
            if c.exp
                .is_some_and(|exp| exp.saturating_add(self.verifier.leeway_s()) < now)
            {
                self.memo.0.invalidate(token);
                return Err(Failure::Expired);
            }
            return Ok(c);
        }
        let claims = self.verifier.claims(token)?;
        let sub = claim_text(&claims, &self.subject_claim)?;
        let session_key = self.template.render(&claims)?;
        let claimed = Claimed {
            sub,
            token: token.to_string(),
            session_key,
            exp: claims.get("exp").and_then(Value::as_u64),
        };
        self.memo.0.insert(token.to_string(), claimed.clone());
        Ok(claimed)
    }

    /// The stored session value against the presented token, in constant time. A missing
    /// key never matches, not even an empty token.
    pub fn check_session(stored: Option<&[u8]>, token: &str) -> Result<(), Failure> {
        match stored {
            None => Err(Failure::SessionMissing),
            Some(v) if bool::from(v.ct_eq(token.as_bytes())) => Ok(()),
            Some(_) => Err(Failure::Superseded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(values: &[&'static str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&h(&[])), Ok(None));
        assert_eq!(bearer(&h(&["Bearer abc.def.ghi"])), Ok(Some("abc.def.ghi")));
        assert_eq!(
            bearer(&h(&["bearer abc"])),
            Ok(Some("abc")),
            "scheme is case-insensitive"
        );
        assert_eq!(bearer(&h(&["BEARER   abc  "])), Ok(Some("abc")));
        assert_eq!(
            bearer(&h(&["Bearer "])),
            Err(Failure::Malformed),
            "empty bearer"
        );
        assert_eq!(bearer(&h(&["Bearer"])), Err(Failure::Malformed));
        assert_eq!(bearer(&h(&["Basic Zm9vOmJhcg=="])), Err(Failure::Malformed));
        assert_eq!(bearer(&h(&["Bearer a b"])), Err(Failure::Malformed));
        assert_eq!(
            bearer(&h(&["Bearer a", "Bearer b"])),
            Err(Failure::Malformed),
            "two headers"
        );
    }

    #[test]
    fn session_equality() {
        assert_eq!(Gate::check_session(Some(b"tok"), "tok"), Ok(()));
        assert_eq!(
            Gate::check_session(Some(b"new"), "old"),
            Err(Failure::Superseded)
        );
        assert_eq!(Gate::check_session(None, ""), Err(Failure::SessionMissing));
        assert_eq!(
            Gate::check_session(Some(b""), "x"),
            Err(Failure::Superseded)
        );
    }

    #[test]
    fn remembered_tokens_still_expire() {
        let verifier =
            Verifier::new(&["HS256".into()], jwt::KeySource::None, 0, None, None).unwrap();
        let gate = Gate::new(
            verifier,
            SessionTemplate::parse("user_token:{sub}").unwrap(),
            "sub".into(),
        );
        let expired = Claimed {
            sub: "1".into(),
            token: "t".into(),
            session_key: SessionKey("user_token:1".into()),
            exp: Some(jwt::now_s() - 10),
        };
        gate.memo.0.insert("t".into(), expired);
        assert_eq!(gate.claim_token("t").unwrap_err(), Failure::Expired);
        // ...and are forgotten: the next attempt goes through the full checks again.
        assert_eq!(gate.claim_token("t").unwrap_err(), Failure::Malformed);
    }

    #[test]
    fn templates_render_from_claims() {
        let t = SessionTemplate::parse("session:{tenant}:{sub}").unwrap();
        let claims: Claims = serde_json::from_str(r#"{"tenant":"acme","sub":42}"#).unwrap();
        assert_eq!(t.render(&claims).unwrap().0, "session:acme:42");
        let bad: Claims = serde_json::from_str(r#"{"tenant":"a b","sub":1}"#).unwrap();
        assert_eq!(t.render(&bad), Err(Failure::Malformed));
        let missing: Claims = serde_json::from_str(r#"{"sub":1}"#).unwrap();
        assert_eq!(t.render(&missing), Err(Failure::Malformed));
        assert_eq!(
            t.render_subject("sub", "7"),
            None,
            "another claim is needed"
        );
        let t = SessionTemplate::parse("user_token:{sub}").unwrap();
        assert_eq!(t.render_subject("sub", "7").unwrap().0, "user_token:7");
        assert!(SessionTemplate::parse("static").is_err());
        assert!(SessionTemplate::parse("a:{b c}").is_err());
    }
}
