//! The one fake upstream of the tests: answers from a handler, counts what reaches it, and
//! can hold answers back (the next one, or all of them) until the test releases them.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

/// An origin answer.
pub struct Answer {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Send the body as this many chunks (chunked encoding) instead of one.
    pub chunks: usize,
}

impl Answer {
    pub fn ok(body: impl Into<Bytes>) -> Answer {
        Answer {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.into(),
            chunks: 0,
        }
    }
    pub fn status(mut self, s: u16) -> Answer {
        self.status = StatusCode::from_u16(s).expect("status");
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Answer {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn chunked(mut self, n: usize) -> Answer {
        self.chunks = n;
        self
    }
}

pub type Handler =
    Arc<dyn Fn(Seen, usize) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// Wrap a synchronous handler. The second argument counts requests to this path+query.
pub fn handler<F>(f: F) -> Handler
where
    F: Fn(&Seen, usize) -> Answer + Send + Sync + 'static,
{
    Arc::new(move |seen, n| {
        let a = f(&seen, n);
        Box::pin(async move { a })
    })
}

/// Holds answers back: the next one (`Origin::hold_next`) or every one (`Origin::close`).
#[derive(Default)]
struct Gate {
    next: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    holding: AtomicUsize,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    /// Called with the answer ready: wait while the gate says so.
    async fn pass(&self) {
        let next = self.next.lock().unwrap().take();
        if let Some(rx) = next {
            self.holding.fetch_add(1, Ordering::SeqCst);
            let _ = rx.await;
            self.holding.fetch_sub(1, Ordering::SeqCst);
        }
        let mut closed = self.closed.subscribe();
        let _ = closed.wait_for(|c| !*c).await;
    }
}

/// Lets a held answer go.
pub struct Release(tokio::sync::oneshot::Sender<()>);

impl Release {
    pub fn release(self) {
        let _ = self.0.send(());
    }
}

/// A fake upstream on 127.0.0.1:0 that counts requests.
pub struct Origin {
    pub addr: SocketAddr,
    https: bool,
    gate: Arc<Gate>,
    total: Arc<AtomicUsize>,
    per_target: Arc<Mutex<HashMap<String, usize>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
    /// Open connections, so `stop` can close kept-alive ones too.
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Origin {
    /// The default origin: `{"path":...,"n":N}` with the subject header echoed when present.
    pub async fn echo() -> Origin {
        Origin::start(handler(|s, n| {
            let user = s
                .headers
                .get("x-auth-subject")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let q = s.query.clone().unwrap_or_default();
            Answer::ok(format!(
                "{{\"path\":\"{}\",\"query\":\"{}\",\"n\":{},\"user\":\"{}\"}}",
                s.path, q, n, user
            ))
        }))
        .await
    }

    /// An origin that reflects every request header it got into its body (the way a
    /// careless API echoes its input): whatever reaches it is visible to the client.
    pub async fn reflect() -> Origin {
        Origin::start(handler(|s, n| {
            let mut lines: Vec<String> = s
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            lines.sort();
            Answer::ok(format!("n={n}\n{}", lines.join("\n")))
                .header("cache-control", "max-age=300")
        }))
        .await
    }

    pub async fn start(h: Handler) -> Origin {
        Origin::start_with(h, None).await
    }

    /// An origin behind TLS (`url()` is https://), offering HTTP/2 and HTTP/1.1 by ALPN.
    pub async fn start_tls(h: Handler, tls: Arc<rustls::ServerConfig>) -> Origin {
        Origin::start_with(h, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(h: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let https = tls.is_some();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let total = Arc::new(AtomicUsize::new(0));
        let per_target: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (t, p, s) = (total.clone(), per_target.clone(), seen.clone());
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conns = connections.clone();
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, t, p, s, g) = (h.clone(), t.clone(), p.clone(), s.clone(), g.clone());
                let tls = tls.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, t, p, s, g) =
                            (h.clone(), t.clone(), p.clone(), s.clone(), g.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let target = parts
                                .uri
                                .path_and_query()
                                .map(|x| x.to_string())
                                .unwrap_or_default();
                            t.fetch_add(1, Ordering::SeqCst);
                            let n = {
                                let mut m = p.lock().unwrap();
                                let c = m.entry(target).or_insert(0);
                                *c += 1;
                                *c
                            };
                            let seen = Seen {
                                method: parts.method.clone(),
                                path: parts.uri.path().to_string(),
                                query: parts.uri.query().map(str::to_string),
                                headers: parts.headers.clone(),
                                body,
                                version: parts.version,
                            };
                            s.lock().unwrap().push(seen.clone());
                            let a = h(seen, n).await;
                            g.pass().await;
                            Ok::<_, std::convert::Infallible>(render(a))
                        }
                    });
                    match tls {
                        // A failed handshake (a client that does not trust us) just closes.
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = hyper_util::server::conn::auto::Builder::new(
                                    hyper_util::rt::TokioExecutor::new(),
                                )
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                            }
                        }
                        None => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
                conns.lock().unwrap().push(conn.abort_handle());
            }
        });
        Origin {
            addr,
            https,
            gate,
            total,
            per_target,
            seen,
            task,
            connections,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Hold the next request's answer (made, but not sent) until the release.
    pub fn hold_next(&self) -> Release {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self.gate.next.lock().unwrap() = Some(rx);
        Release(tx)
    }

    /// A request is being held now.
    pub fn is_holding(&self) -> bool {
        self.gate.holding.load(Ordering::SeqCst) > 0
    }

    /// Hold every answer until `open`.
    pub fn close(&self) {
        self.gate.closed.send_replace(true);
    }

    pub fn open(&self) {
        self.gate.closed.send_replace(false);
    }

    /// Requests that reached the origin, all paths.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Requests that reached the origin for this exact path and query.
    pub fn hits(&self, target: &str) -> usize {
        self.per_target
            .lock()
            .unwrap()
            .get(target)
            .copied()
            .unwrap_or(0)
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the origin saw a request")
    }

    /// Stop listening (connections already open are closed too).
    pub fn stop(&self) {
        self.task.abort();
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn render(a: Answer) -> Response<OriginBody> {
    let body: OriginBody = if a.chunks > 1 {
        let size = a.body.len().div_ceil(a.chunks).max(1);
        Chunks(a.body.chunks(size).map(Bytes::copy_from_slice).collect()).boxed()
    } else {
        Full::new(a.body).boxed()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = a.status;
    for (k, v) in a.headers {
        resp.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(&v).expect("value"),
        );
    }
    resp
}

/// A body sent as separate chunks (no Content-Length: chunked encoding).
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}
