//! Pipeline phases of the session gate: claim a bearer, check it against the session key,
//! pass the identity upstream, and the login capture / logout flows.
//!
//! A store fault is never turned into a 401 (that would log users out during an outage):
//! it is a 503 with `Retry-After`, or with `on_store_error = "allow"` an unauthenticated,
//! flagged request.

use bytes::Bytes;
use http::Response;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;

use super::body::{self, ProxyBody};
use super::error::ProxyError;
use super::upstream::DownBody;
use super::{Cx, Engine};
use crate::auth::{Claimed, Failure, Gate, OnStoreError, Policy};
use crate::cache::key;
use crate::cache::store::{Op, StoreError};
use crate::purge::Trigger;

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

impl Engine {
    /// Parse and verify the bearer as the policy asks; the session check comes later
    /// (pipelined with the cache lookup where there is one).
    pub(super) fn claim(
        &self,
        policy: Policy,
        headers: &HeaderMap,
        cx: &Cx,
    ) -> Result<Option<Claimed>, ProxyError> {
        if policy == Policy::None {
            return Ok(None);
        }
        let metrics = self.metrics.rule(cx.rule);
        match self.config.auth.gate.claim(headers) {
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) if policy == Policy::Optional => Ok(None),
            Ok(None) => {
                metrics.auth(Failure::MissingToken.metric());
                Err(ProxyError::Unauthorized(Failure::MissingToken))
            }
            Err(f) => {
                metrics.auth(f.metric());
                Err(ProxyError::Unauthorized(f))
            }
        }
    }

    /// The session check on its own (requests that do not look up the cache).
    pub(super) async fn check_session(
        &self,
        claimed: Claimed,
        cx: &Cx,
    ) -> Result<Identity, ProxyError> {
        let stored = self
            .cache
            .session(claimed.session_key.as_bytes().to_vec())
            .await;
        self.session_verdict(claimed, stored, cx)
    }

    /// Decide from what the store holds at the session key.
    pub(super) fn session_verdict(
        &self,
        claimed: Claimed,
        stored: Result<Option<Bytes>, StoreError>,
        cx: &Cx,
    ) -> Result<Identity, ProxyError> {
        let metrics = self.metrics.rule(cx.rule);
        match stored {
            Ok(value) => match Gate::check_session(value.as_deref(), &claimed.token) {
                Ok(()) => {
                    metrics.auth("valid");
                    Ok(Identity::Verified(claimed))
                }
                Err(f) => {
                    metrics.auth(f.metric());
                    Err(ProxyError::Unauthorized(f))
                }
            },
            Err(_) => {
                metrics.auth("store_error");
                match self.config.auth.on_store_error {
                    OnStoreError::Reject => Err(ProxyError::SessionStoreUnavailable {
                        retry_after_s: self.config.auth.retry_after.as_secs().max(1),
                    }),
                    OnStoreError::Allow => Ok(Identity::Unverified),
                }
            }
        }
    }

    /// The session check for a claimed identity (if any), applied to the upstream request.
    pub(super) async fn authenticate(
        &self,
        claimed: Option<Claimed>,
        headers: &mut HeaderMap,
        cx: &Cx,
    ) -> Result<Identity, ProxyError> {
        let identity = match claimed {
            None => Identity::Anonymous,
            Some(c) => self.check_session(c, cx).await?,
        };
        self.apply_identity(headers, &identity);
        Ok(identity)
    }

    /// Tell the upstream who is asking.
    pub(super) fn apply_identity(&self, headers: &mut HeaderMap, identity: &Identity) {
        match identity {
            Identity::Verified(c) => {
                if let Ok(v) = HeaderValue::from_str(&c.sub) {
                    headers.insert(self.config.auth.subject_header.clone(), v);
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
    /// and make it the subject's one valid session (SET with the token's remaining life).
    pub(super) async fn capture_login(
        &self,
        resp: Response<DownBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(login) = self.config.auth.login.as_ref() else {
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
        match self.session_from_login(&bytes, &login.token_pointer) {
            Some(c) => {
                let now = crate::auth::jwt::now_s();
                let ttl = match c.exp {
                    Some(exp) if exp > now => std::time::Duration::from_secs(exp - now),
                    Some(_) => {
                        tracing::warn!("login token is already expired; session not captured");
                        return Ok(Response::from_parts(parts, body::full(bytes)));
                    }
                    None => login.default_ttl,
                };
                let store = self.cache.store();
                let item = vec![(c.session_key.into_bytes(), Bytes::from(c.token))];
                store
                    .call(Op::Session, store.store().set_many(item, Some(ttl)))
                    .await
                    .map_err(|_| ProxyError::SessionStoreUnavailable {
                        retry_after_s: self.config.auth.retry_after.as_secs().max(1),
                    })?;
            }
            None => tracing::warn!(
                pointer = %login.token_pointer,
                "login response has no usable token at auth.login.token_pointer; session not captured"
            ),
        }
        Ok(Response::from_parts(parts, body::full(bytes)))
    }

    fn session_from_login(&self, body: &[u8], pointer: &str) -> Option<Claimed> {
        let json: serde_json::Value = serde_json::from_slice(body).ok()?;
        let token = json.pointer(pointer)?.as_str()?;
        match self.config.auth.gate.claim_token(token) {
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
    pub(super) async fn end_session(&self, claimed: &Claimed) -> Result<(), ProxyError> {
        let store = self.cache.store();
        let key = claimed.session_key.as_bytes().to_vec();
        let token = Bytes::from(claimed.token.clone());
        let deleted = store
            .call(Op::Session, store.store().del_if_equals(key, token))
            .await;
        self.purge_tags(&[key::subject_tag(&claimed.sub)], Trigger::Logout, None)
            .await;
        deleted.map(|_| ()).map_err(|e| {
            tracing::warn!(error = %e, "logout: could not delete the session key");
            ProxyError::SessionStoreUnavailable {
                retry_after_s: self.config.auth.retry_after.as_secs().max(1),
            }
        })
    }
}
