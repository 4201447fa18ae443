//! The session gate's phases: claim a bearer, check it against the session key, pass the
//! identity upstream, and the login capture and logout flows.
//!
//! A store fault is never turned into a 401 (that would log users out during an outage):
//! it is a 503 with `Retry-After`, or with `on_store_error = "allow"` an unauthenticated,
//! flagged request.

use bytes::Bytes;
use http::Response;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;

use super::Cx;
use super::error::ProxyError;
use crate::auth::{Claimed, Failure, Gate, OnStoreError};
use crate::body::{self, ProxyBody};
use crate::cache::key;
use crate::cache::store::StoreError;
use crate::labels::AuthResult;
use crate::purge::Trigger;
use crate::routing::Policy;
use crate::upstream::DownBody;

/// Set on requests let through unauthenticated because the session store was unreachable.
pub static X_AUTH_UNVERIFIED: HeaderName = HeaderName::from_static("x-auth-unverified");

/// Remove every client-sent copy of the identity headers, including spellings with '_' for
/// '-' (`X_Auth_Subject`), which CGI-style upstreams (PHP, Rack) read as the same variable.
pub fn strip_identity_headers(headers: &mut HeaderMap, subject_header: &HeaderName) {
    headers.remove(subject_header);
    headers.remove(&X_AUTH_UNVERIFIED);
    let lookalikes: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let n = name.as_str();
            n.contains('_') && {
                let dashed = n.replace('_', "-");
                dashed == subject_header.as_str() || dashed == X_AUTH_UNVERIFIED.as_str()
            }
        })
        .cloned()
        .collect();
    for name in lookalikes {
        headers.remove(name);
    }
}

/// Who a request is, after the gate.
pub enum Identity {
    Anonymous,
    /// The session check passed for this subject.
    Verified(Claimed),
    /// The store could not be asked and `on_store_error = "allow"`.
    Unverified,
}

fn store_unavailable(cx: &Cx) -> ProxyError {
    ProxyError::SessionStoreUnavailable {
        retry_after_s: cx.live.config.auth.retry_after.as_secs().max(1),
    }
}

/// Parse and verify the bearer as the policy asks; the session check comes later
/// (pipelined with the cache lookup where there is one).
pub fn claim(cx: &Cx, policy: Policy, headers: &HeaderMap) -> Result<Option<Claimed>, ProxyError> {
    if policy == Policy::None {
        return Ok(None);
    }
    let metrics = cx.rule_metrics();
    match cx.live.config.auth.gate.claim(headers) {
        Ok(Some(c)) => Ok(Some(c)),
        Ok(None) if policy == Policy::Optional => Ok(None),
        Ok(None) => {
            metrics.auth(Failure::MissingToken.result());
            Err(ProxyError::Unauthorized(Failure::MissingToken))
        }
        Err(f) => {
            metrics.auth(f.result());
            Err(ProxyError::Unauthorized(f))
        }
    }
}

/// Decide from what the store holds at the session key.
pub fn session_verdict(
    cx: &Cx,
    claimed: Claimed,
    stored: Result<Option<Bytes>, StoreError>,
) -> Result<Identity, ProxyError> {
    let metrics = cx.rule_metrics();
    match stored {
        Ok(value) => match Gate::check_session(value.as_deref(), &claimed.token) {
            Ok(()) => {
                metrics.auth(AuthResult::Valid);
                Ok(Identity::Verified(claimed))
            }
            Err(f) => {
                metrics.auth(f.result());
                Err(ProxyError::Unauthorized(f))
            }
        },
        Err(_) => {
            metrics.auth(AuthResult::StoreError);
            match cx.live.config.auth.on_store_error {
                OnStoreError::Reject => Err(store_unavailable(cx)),
                OnStoreError::Allow => Ok(Identity::Unverified),
            }
        }
    }
}

/// The session check for a claimed identity (if any), applied to the upstream request.
pub async fn authenticate(
    cx: &Cx,
    claimed: Option<Claimed>,
    headers: &mut HeaderMap,
) -> Result<Identity, ProxyError> {
    let identity = match claimed {
        None => Identity::Anonymous,
        Some(c) => {
            let stored = cx.app.sessions.get(&c.session_key).await;
            session_verdict(cx, c, stored)?
        }
    };
    apply_identity(cx, headers, &identity);
    Ok(identity)
}

/// Tell the upstream who is asking.
pub fn apply_identity(cx: &Cx, headers: &mut HeaderMap, identity: &Identity) {
    match identity {
        Identity::Verified(c) => {
            if let Ok(v) = HeaderValue::from_str(&c.sub) {
                headers.insert(cx.live.config.auth.subject_header.clone(), v);
            }
        }
        Identity::Unverified => {
            headers.insert(
                X_AUTH_UNVERIFIED.clone(),
                HeaderValue::from_static("store-unavailable"),
            );
        }
        Identity::Anonymous => {}
    }
}

/// After a successful login answered by the upstream: take the token from the JSON body
/// and make it the subject's one valid session (with the token's remaining life).
pub async fn capture_login(
    cx: &Cx,
    resp: Response<DownBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(login) = cx.live.config.auth.login.as_ref() else {
        return Ok(resp.map(|b| b.boxed()));
    };
    if !resp.status().is_success() {
        return Ok(resp.map(|b| b.boxed()));
    }
    let (parts, body) = resp.into_parts();
    let (head, rest) = body::read_prefix(body, login.max_body)
        .await
        .map_err(|e| ProxyError::UpstreamProtocol(e.to_string()))?;
    let Some(bytes) = head.complete() else {
        tracing::warn!(
            limit = login.max_body,
            "login response larger than auth.login.max_body; session not captured"
        );
        return Ok(Response::from_parts(parts, head.into_body(rest)));
    };
    match session_from_login(cx, &bytes, &login.token_pointer) {
        Some(c) => {
            let now = crate::clock::now_s();
            let ttl = match c.exp {
                Some(exp) if exp > now => std::time::Duration::from_secs(exp - now),
                Some(_) => {
                    tracing::warn!("login token is already expired; session not captured");
                    return Ok(Response::from_parts(parts, body::full(bytes)));
                }
                None => login.default_ttl,
            };
            cx.app
                .sessions
                .set(&c.session_key, &c.token, Some(ttl))
                .await
                .map_err(|_| store_unavailable(cx))?;
        }
        None => tracing::warn!(
            pointer = %login.token_pointer,
            "login response has no usable token at auth.login.token_pointer; session not captured"
        ),
    }
    Ok(Response::from_parts(parts, body::full(bytes)))
}

fn session_from_login(cx: &Cx, body: &[u8], pointer: &str) -> Option<Claimed> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let token = json.pointer(pointer)?.as_str()?;
    match cx.live.config.auth.gate.claim_token(token) {
        Ok(c) => Some(c),
        Err(f) => {
            tracing::warn!(
                reason = f.code(),
                "login token refused by the gate; session not captured"
            );
            None
        }
    }
}

/// After a successful logout: end the caller's session (only if it is still the one
/// presented, so an old token cannot end a newer login) and drop its cached entries.
///
/// If the session key cannot be deleted the logout is answered 503 (the client retries):
/// a 2xx would tell the user they are logged out while the token still works.
pub async fn end_session(cx: &Cx, claimed: &Claimed) -> Result<(), ProxyError> {
    let deleted = cx
        .app
        .sessions
        .end(&claimed.session_key, &claimed.token)
        .await;
    cx.app
        .purger
        .purge(
            &[key::subject_tag(&claimed.sub)],
            Trigger::Logout,
            cx.live.rule_metrics(None),
        )
        .await;
    deleted.map(|_| ()).map_err(|e| {
        tracing::warn!(error = %e, "logout: could not delete the session key");
        store_unavailable(cx)
    })
}
