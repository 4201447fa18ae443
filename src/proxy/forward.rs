//! Forwarding to the upstream: a request's body on its way up (with its own idle timeout),
//! the upstream call with its timing, and the pass-through that skips the cache.

use std::time::Instant;

use http::{HeaderMap, Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::error::ProxyError;
use super::headers;
use super::respond::Trace;
use super::{Cx, Served};
use crate::body::{Upload, empty};
use crate::labels::Reason;
use crate::upstream::DownBody;

/// A client's request body on its way upstream: bounded by its own idle timeout
/// (`[server] body_read_timeout`), and reporting progress so the upstream timeout only
/// counts time in which nothing moved.
pub fn upload(cx: &Cx, body: Incoming) -> Upload {
    if body.is_end_stream() {
        return Upload::none(empty());
    }
    Upload::new(body, cx.live.config.server.body_read_timeout)
}

/// No body.
pub fn no_body() -> Upload {
    Upload::none(empty())
}

/// Send a request upstream to `cx.target` (the canonical path and query); timing recorded.
pub async fn forward(
    cx: &mut Cx,
    method: Method,
    headers: HeaderMap,
    body: Upload,
) -> Result<Response<DownBody>, ProxyError> {
    let upstream = &cx.live.upstream;
    let uri = upstream.uri(&cx.target)?;
    let (body, progress) = body.into_parts();
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let started = Instant::now();
    let result = upstream.send(req, progress).await;
    let elapsed = started.elapsed();
    cx.upstream_ms = Some(elapsed.as_secs_f64() * 1000.0);
    cx.rule_metrics().upstream.observe(elapsed.as_secs_f64());
    let mut resp = result?;
    cx.fwd_status = Some(resp.status().as_u16());
    headers::strip_hop_by_hop(resp.headers_mut());
    Ok(resp)
}

/// Forward a client's request: its headers as classified, with the forwarding fields and
/// the Host set here, only now that it goes upstream.
pub async fn client_request(
    cx: &mut Cx,
    method: Method,
    mut headers: HeaderMap,
    body: Upload,
) -> Result<Response<DownBody>, ProxyError> {
    headers::set_forwarded(&mut headers, cx.client.ip(), &cx.host);
    headers.insert(http::header::HOST, cx.host.clone());
    forward(cx, method, headers, body).await
}

/// Forward untouched (no lookup, no store), recording why.
pub async fn bypass(
    cx: &mut Cx,
    parts: http::request::Parts,
    body: Incoming,
    why: Reason,
) -> Result<Served, ProxyError> {
    let upload = upload(cx, body);
    let resp = client_request(cx, parts.method, parts.headers, upload).await?;
    let trace = Trace::bypass(Some(why)).with_status(resp.status());
    Ok(Served::new(resp.map(|b| b.boxed()), trace))
}
