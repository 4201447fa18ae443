//! The upstream client: pooled keep-alive connections to `[upstream] url`: HTTP/1.1, or
//! over TLS (rustls) HTTP/2 when the upstream offers it by ALPN, else HTTP/1.1.
//!
//! It names transport failures (`UpstreamError`: could not connect, no answer in time, a
//! broken answer, the client's upload stalled) and wraps every response body in an idle
//! timeout. It never looks at caching.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use std::sync::Arc;

use crate::body::{BoxError, ClientBodyStalled, IdleTimeout, Progress};
use crate::config::{UpstreamConfig, UpstreamTls};

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// The TLS handshake failed (an untrusted or mismatched certificate, say).
    #[error("TLS with the upstream failed: {0}")]
    Tls(String),
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
    pools: Pools,
    cfg: UpstreamConfig,
}

type Https = HttpsConnector<HttpConnector>;

enum Pools {
    Plain(Vec<Client<HttpConnector, UpBody>>),
    Tls(Vec<Client<Https, UpBody>>),
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, String> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(cfg.pool_idle_timeout)
                .pool_max_idle_per_host(cfg.pool_max_idle)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .set_host(false);
            b
        };
        let slots = 0..crate::runtime::slots();
        let pools = if cfg.scheme == http::uri::Scheme::HTTPS {
            connector.enforce_http(false);
            let tls = tls_config(&cfg.tls)?;
            let https = HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_only();
            let https = match &cfg.tls.server_name {
                Some(name) => {
                    let name = rustls::pki_types::ServerName::try_from(name.clone())
                        .map_err(|e| format!("upstream.tls_server_name: {e}"))?;
                    https.with_server_name_resolver(FixedServerNameResolver::new(name))
                }
                None => https,
            };
            let https = https
                .enable_http1()
                .enable_http2()
                .wrap_connector(connector);
            Pools::Tls(slots.map(|_| builder().build(https.clone())).collect())
        } else {
            Pools::Plain(slots.map(|_| builder().build(connector.clone())).collect())
        };
        Ok(Upstream {
            pools,
            cfg: cfg.clone(),
        })
    }

    /// Send on the calling thread's connection pool.
    fn request(&self, req: Request<UpBody>) -> ResponseFuture {
        let slot = crate::runtime::slot();
        match &self.pools {
            Pools::Plain(c) => c[if slot < c.len() { slot } else { 0 }].request(req),
            Pools::Tls(c) => c[if slot < c.len() { slot } else { 0 }].request(req),
        }
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
        let fut = self.request(req);
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
                return Err(match tls_failure(&e) {
                    Some(why) => UpstreamError::Tls(why),
                    None => UpstreamError::Connect(error_chain(&e)),
                });
            }
            Err(e) => return Err(UpstreamError::Protocol(error_chain(&e))),
            Ok(resp) => resp,
        };
        let timeout = self.cfg.timeout;
        Ok(resp.map(|b| IdleTimeout::new(b, timeout)))
    }
}

/// The client side of TLS to the upstream: the system's roots plus `tls_ca_file`'s.
fn tls_config(tls: &UpstreamTls) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS to the upstream: {e}"))?;
    if !tls.verify {
        tracing::warn!(
            "upstream.tls_verify = false: the upstream's certificate is NOT verified; anyone on the path can read and change the traffic (for tests only)"
        );
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if let Some(ca) = &tls.ca {
        for cert in CertificateDer::pem_slice_iter(&ca.0) {
            let cert = cert.map_err(|e| format!("upstream.tls_ca_file: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("upstream.tls_ca_file: {e}"))?;
        }
    } else if added == 0 {
        tracing::warn!(
            errors = ?native.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "no system certificate authorities found: the https upstream cannot be verified (install ca-certificates or set upstream.tls_ca_file)"
        );
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// `tls_verify = false`: any certificate is accepted; signatures are still checked, so the
/// handshake itself is sound.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS error in a connect failure's chain, if the handshake is what failed. (The TLS
/// layers report it inside `io::Error`s, whose `source` skips their payload, so each
/// `io::Error` is opened too.)
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        let mut inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        while let Some(i) = inner {
            if let Some(tls) = i.downcast_ref::<rustls::Error>() {
                return Some(tls.to_string());
            }
            inner = i
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref());
        }
        cur = err.source();
    }
    None
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
