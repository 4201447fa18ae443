//! The upstream client: pooled keep-alive HTTP/1.1 connections to `[upstream] url`.
//!
//! It names transport failures (`UpstreamError`: could not connect, no answer in time, a
//! broken answer, the client's upload stalled) and wraps every response body in an idle
//! timeout. It never looks at caching.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use std::sync::Arc;

use crate::body::{BoxError, ClientBodyStalled, IdleTimeout, Progress};
use crate::config::UpstreamConfig;

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("upstream request failed: {0}")]
    Protocol(String),
    /// The client stopped sending the request body being forwarded.
    #[error("the client stopped sending its request body")]
    ClientBodyStalled,
    #[error("{0}")]
    Uri(String),
}

/// Request body type sent upstream.
pub type UpBody = BoxBody<Bytes, BoxError>;

/// Response body type received from upstream.
pub type DownBody = IdleTimeout<Incoming>;

/// One connection pool per worker thread (`runtime::slot`): a request is sent on a
/// connection driven by its own thread.
pub struct Upstream {
    clients: Vec<Client<HttpConnector, UpBody>>,
    cfg: UpstreamConfig,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let clients = (0..crate::runtime::slots())
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(cfg.pool_idle_timeout)
                    .pool_max_idle_per_host(cfg.pool_max_idle)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .set_host(false)
                    .build(connector.clone())
            })
            .collect();
        Upstream {
            clients,
            cfg: cfg.clone(),
        }
    }

    /// The calling thread's connection pool.
    fn client(&self) -> &Client<HttpConnector, UpBody> {
        let slot = crate::runtime::slot();
        &self.clients[if slot < self.clients.len() { slot } else { 0 }]
    }

    /// The upstream URI for a request's path and query (the base path is prefixed).
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        let mut pq = String::with_capacity(self.cfg.base_path.len() + path_and_query.len());
        pq.push_str(&self.cfg.base_path);
        pq.push_str(path_and_query);
        Uri::builder()
            .scheme(self.cfg.scheme.clone())
            .authority(self.cfg.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| UpstreamError::Uri(format!("cannot build upstream URI: {e}")))
    }

    /// Send a request; the response head must arrive within `[upstream] timeout` of the
    /// last progress of the request body (`progress`; without one, of the start), so a slow
    /// but steady upload is not cut, while a stalled upstream still is.
    pub async fn send(
        &self,
        req: Request<UpBody>,
        progress: Option<Arc<Progress>>,
    ) -> Result<Response<DownBody>, UpstreamError> {
        let fut = self.client().request(req);
        tokio::pin!(fut);
        let started = tokio::time::Instant::now();
        let result = loop {
            let since = progress
                .as_ref()
                .map(|p| tokio::time::Instant::from_std(p.last()).max(started))
                .unwrap_or(started);
            let deadline = since + self.cfg.timeout;
            tokio::select! {
                r = &mut fut => break r,
                _ = tokio::time::sleep_until(deadline) => {
                    let moved = progress.as_ref().is_some_and(|p| {
                        tokio::time::Instant::from_std(p.last()) > since
                    });
                    if !moved {
                        return Err(UpstreamError::Timeout);
                    }
                }
            }
        };
        let resp = match result {
            Err(e) if has_source::<ClientBodyStalled>(&e) => {
                return Err(UpstreamError::ClientBodyStalled);
            }
            Err(e) if e.is_connect() => {
                return Err(UpstreamError::Connect(error_chain(&e)));
            }
            Err(e) => return Err(UpstreamError::Protocol(error_chain(&e))),
            Ok(resp) => resp,
        };
        let timeout = self.cfg.timeout;
        Ok(resp.map(|b| IdleTimeout::new(b, timeout)))
    }
}

/// Is an error of type `T` somewhere in this error's chain?
fn has_source<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An error and its sources on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
