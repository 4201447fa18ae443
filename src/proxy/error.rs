//! Everything that can end a request early, and the one place errors become responses.
//!
//! Each variant maps to exactly one status and one blame (who caused it), and renders a
//! small JSON body `{"error":"...","detail":"..."}` that never echoes request bytes.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::auth::Failure;
use crate::body::{ProxyBody, full};
use crate::normalize::PathError;
use crate::upstream::UpstreamError;

/// Who a failure is attributed to, for logs and alerting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no valid Host")]
    BadHost,
    #[error("request has more header fields than allowed")]
    TooManyHeaders,
    #[error("the client stopped sending its request body")]
    ClientBodyTimeout,
    #[error("request path refused: {0}")]
    BadPath(PathError),
    #[error("unauthorized: {0}")]
    Unauthorized(Failure),
    #[error("session store unreachable")]
    SessionStoreUnavailable { retry_after_s: u64 },
    #[error("only-if-cached and nothing usable is stored")]
    NotCached,
    #[error("cannot connect to the upstream: {0}")]
    UpstreamConnect(String),
    #[error("TLS with the upstream failed: {0}")]
    UpstreamTls(String),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("upstream request failed: {0}")]
    UpstreamProtocol(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> ProxyError {
        match e {
            UpstreamError::Connect(why) => ProxyError::UpstreamConnect(why),
            UpstreamError::Tls(why) => ProxyError::UpstreamTls(why),
            UpstreamError::Timeout => ProxyError::UpstreamTimeout,
            UpstreamError::Protocol(why) => ProxyError::UpstreamProtocol(why),
            UpstreamError::ClientBodyStalled => ProxyError::ClientBodyTimeout,
            UpstreamError::Uri(why) => ProxyError::Internal(why),
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadHost => StatusCode::BAD_REQUEST,
            ProxyError::TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadPath(PathError::TooLong) => StatusCode::URI_TOO_LONG,
            ProxyError::BadPath(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::SessionStoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // RFC 9111 §5.2.1.7
            ProxyError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamTls(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            ProxyError::BadHost
            | ProxyError::TooManyHeaders
            | ProxyError::ClientBodyTimeout
            | ProxyError::BadPath(_)
            | ProxyError::Unauthorized(_)
            | ProxyError::NotCached => Blame::Downstream,
            ProxyError::SessionStoreUnavailable { .. } => Blame::Internal,
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamTls(_)
            | ProxyError::UpstreamTimeout
            | ProxyError::UpstreamProtocol(_) => Blame::Upstream,
            ProxyError::Internal(_) => Blame::Internal,
        }
    }

    /// Stable machine-readable code for the JSON body and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadHost => "bad_host",
            ProxyError::TooManyHeaders => "too_many_headers",
            ProxyError::ClientBodyTimeout => "request_body_timeout",
            ProxyError::BadPath(_) => "bad_path",
            ProxyError::Unauthorized(f) => f.code(),
            ProxyError::SessionStoreUnavailable { .. } => "session_store_unavailable",
            ProxyError::NotCached => "not_cached",
            ProxyError::UpstreamConnect(_) => "upstream_unreachable",
            ProxyError::UpstreamTls(_) => "upstream_tls_failed",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamProtocol(_) => "upstream_error",
            ProxyError::Internal(_) => "internal_error",
        }
    }

    /// The human part of the body; never contains request bytes.
    fn detail(&self) -> String {
        match self {
            ProxyError::BadHost => "the request must carry exactly one valid Host header (and over HTTP/2, no host field that disagrees with :authority)".into(),
            ProxyError::TooManyHeaders => "the request has more header fields than allowed".into(),
            ProxyError::ClientBodyTimeout => {
                "the request body stopped arriving for longer than allowed".into()
            }
            ProxyError::BadPath(e) => e.to_string(),
            ProxyError::Unauthorized(f) => f.to_string(),
            ProxyError::SessionStoreUnavailable { .. } => {
                "the session store cannot be reached; retry shortly".into()
            }
            ProxyError::NotCached => "only-if-cached: no usable stored response".into(),
            ProxyError::UpstreamConnect(_) => "the upstream refused or could not be reached".into(),
            // The TLS library's words (a certificate problem, say): no request bytes.
            ProxyError::UpstreamTls(why) => format!("TLS with the upstream failed: {why}"),
            ProxyError::UpstreamTimeout => "the upstream did not answer in time".into(),
            ProxyError::UpstreamProtocol(_) => {
                "the upstream answered with an invalid response".into()
            }
            ProxyError::Internal(_) => "internal error".into(),
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = json_error(self.status(), self.code(), &self.detail());
        match self {
            // RFC 6750 §3: no error code when the request carried no credentials.
            ProxyError::Unauthorized(Failure::MissingToken) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cachegate\""),
                );
            }
            ProxyError::Unauthorized(_) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cachegate\", error=\"invalid_token\""),
                );
            }
            ProxyError::SessionStoreUnavailable { retry_after_s } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            _ => {}
        }
        resp
    }
}

/// A small JSON error response.
pub fn json_error(status: StatusCode, code: &str, detail: &str) -> Response<ProxyBody> {
    json_response(
        status,
        &serde_json::json!({ "error": code, "detail": detail }),
    )
}

/// A JSON response that no cache may store.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_one_status_and_blame() {
        let cases = [
            (ProxyError::BadHost, 400, Blame::Downstream, "bad_host"),
            (
                ProxyError::TooManyHeaders,
                431,
                Blame::Downstream,
                "too_many_headers",
            ),
            (
                ProxyError::ClientBodyTimeout,
                408,
                Blame::Downstream,
                "request_body_timeout",
            ),
            (
                ProxyError::BadPath(PathError::DotSegment),
                400,
                Blame::Downstream,
                "bad_path",
            ),
            (
                ProxyError::BadPath(PathError::TooLong),
                414,
                Blame::Downstream,
                "bad_path",
            ),
            (
                ProxyError::Unauthorized(Failure::MissingToken),
                401,
                Blame::Downstream,
                "missing_token",
            ),
            (
                ProxyError::Unauthorized(Failure::Malformed),
                401,
                Blame::Downstream,
                "malformed_token",
            ),
            (
                ProxyError::Unauthorized(Failure::InvalidSignature),
                401,
                Blame::Downstream,
                "invalid_signature",
            ),
            (
                ProxyError::Unauthorized(Failure::Expired),
                401,
                Blame::Downstream,
                "expired",
            ),
            (
                ProxyError::Unauthorized(Failure::Superseded),
                401,
                Blame::Downstream,
                "session_superseded",
            ),
            (
                ProxyError::Unauthorized(Failure::SessionMissing),
                401,
                Blame::Downstream,
                "session_missing",
            ),
            (
                ProxyError::SessionStoreUnavailable { retry_after_s: 5 },
                503,
                Blame::Internal,
                "session_store_unavailable",
            ),
            (ProxyError::NotCached, 504, Blame::Downstream, "not_cached"),
            (
                ProxyError::UpstreamConnect("refused".into()),
                502,
                Blame::Upstream,
                "upstream_unreachable",
            ),
            (
                ProxyError::UpstreamTimeout,
                504,
                Blame::Upstream,
                "upstream_timeout",
            ),
            (
                ProxyError::UpstreamProtocol("bad".into()),
                502,
                Blame::Upstream,
                "upstream_error",
            ),
            (
                ProxyError::Internal("bug".into()),
                500,
                Blame::Internal,
                "internal_error",
            ),
        ];
        for (e, status, blame, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.blame(), blame, "{e}");
            assert_eq!(e.code(), code, "{e}");
            let resp = e.into_response();
            assert_eq!(resp.headers()["content-type"], "application/json");
        }
    }

    #[test]
    fn auth_errors_carry_their_headers() {
        let missing = ProxyError::Unauthorized(Failure::MissingToken).into_response();
        assert_eq!(
            missing.headers()["www-authenticate"],
            "Bearer realm=\"cachegate\""
        );
        let stale = ProxyError::Unauthorized(Failure::Superseded).into_response();
        assert!(
            stale.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("error=\"invalid_token\"")
        );
        let down = ProxyError::SessionStoreUnavailable { retry_after_s: 7 }.into_response();
        assert_eq!(down.headers()["retry-after"], "7");
    }
}
