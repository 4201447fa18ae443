//! The test harness: a real `redis-server` per test on a free port, a fake origin on
//! 127.0.0.1:0 that counts what reaches it, cachegate started in-process, and a client.
//! Everything is observed from outside: status, headers, bodies, origin counts, Redis keys
//! (through an independent connection) and `/metrics`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachegate::config::Config;
use cachegate::server::{self, Running};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Poll `check` until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn redis_server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A private redis-server on a free port, killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        for _ in 0..5 {
            let port = free_port();
            let mut r = Redis { child: None, port };
            if r.spawn().await {
                return r;
            }
        }
        panic!("could not start redis-server (is it installed? apt-get install redis-server)");
    }

    async fn spawn(&mut self) -> bool {
        let child = Command::new(redis_server_binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            panic!("cannot run redis-server (is it installed? apt-get install redis-server)");
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: port taken
            }
            if self.ping().await {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                redis::cmd("PING").query_async::<String>(&mut conn)
            )
            .await,
            Ok(Ok(_))
        )
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// An independent connection, for checking what is in Redis.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    }

    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = self.conn().await;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.expect("redis command")
    }

    /// Send one inline command on a fresh raw connection and return the first reply line
    /// (works while the server pauses clients, since nothing else is sent first).
    pub async fn raw(&self, command: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to redis");
        s.write_all(format!("{command}\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    }

    /// Send the server a signal by name (`STOP` freezes it with its data, `CONT` thaws it).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("redis is running").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Kill the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty: nothing is persisted).
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn().await {
            assert!(
                Instant::now() < deadline,
                "redis did not come back on port {}",
                self.port
            );
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
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

/// A fake upstream on 127.0.0.1:0 that counts requests.
pub struct Origin {
    pub addr: SocketAddr,
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
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let total = Arc::new(AtomicUsize::new(0));
        let per_target: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (t, p, s) = (total.clone(), per_target.clone(), seen.clone());
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conns = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, t, p, s) = (h.clone(), t.clone(), p.clone(), s.clone());
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, t, p, s) = (h.clone(), t.clone(), p.clone(), s.clone());
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
                            };
                            s.lock().unwrap().push(seen.clone());
                            let a = h(seen, n).await;
                            Ok::<_, std::convert::Infallible>(render(a))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                conns.lock().unwrap().push(conn.abort_handle());
            }
        });
        Origin {
            addr,
            total,
            per_target,
            seen,
            task,
            connections,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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

/// cachegate started in-process.
pub struct Proxy {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn x_cache(&self) -> &str {
        self.header("x-cache")
    }
}

/// Config text for tests: listeners on port 0, this upstream, then `rest`.
pub fn config(origin: &Origin, store: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n\
         [upstream]\nurl = \"{}\"\ntimeout = \"2s\"\nconnect_timeout = \"500ms\"\n\n{store}\n{rest}",
        origin.url()
    )
}

/// The Redis store section. The command timeout is generous so a loaded test machine does
/// not turn slow commands into bypasses; fault tests set their own.
pub fn redis_store(redis: &Redis) -> String {
    redis_store_timeout(redis, "1s")
}

pub fn redis_store_timeout(redis: &Redis, timeout: &str) -> String {
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"{timeout}\"\n",
        redis.url()
    )
}

pub const MEMORY_STORE: &str = "[store]\nbackend = \"memory\"\nmax_bytes = \"64MiB\"\n";

impl Proxy {
    pub async fn start(config_text: &str) -> Proxy {
        Proxy::start_env(config_text, &[]).await
    }

    /// Start with these environment variables visible to the config (secrets).
    pub async fn start_env(config_text: &str, env: &[(&str, &str)]) -> Proxy {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        let cfg = Config::parse_with_env("test.toml", config_text, &lookup)
            .unwrap_or_else(|e| panic!("{e}\n{config_text}"));
        let running = server::start(cfg).await.expect("cachegate starts");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Proxy {
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Got {
        let mut req = Request::builder()
            .method(method)
            .uri(self.url(path))
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let resp = self
            .client
            .request(req)
            .await
            .expect("response from cachegate");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Got {
        self.send("GET", path, &[], "").await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Got {
        self.send("GET", path, headers, "").await
    }

    /// GET an admin path.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Got {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin, path))
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let resp = self.client.request(req).await.expect("admin response");
        let (parts, body) = resp.into_parts();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    pub async fn metrics(&self) -> String {
        self.admin("GET", "/metrics", &[], "").await.text()
    }

    /// Wait until `n` store writes of entries have completed (fills write in the background).
    pub async fn stored(&self, n: usize) {
        eventually(Duration::from_secs(5), "entries are written", || async {
            metric(
                &self.metrics().await,
                "cachegate_store_duration_seconds_count{op=\"put\"}",
            ) >= n as f64
        })
        .await;
    }

    /// Send raw bytes on a fresh connection and return everything read until close.
    pub async fn raw(&self, request: &[u8]) -> String {
        let mut s = TcpStream::connect(self.addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// An HS256 JWT of these claims, signed with `secret`.
pub fn hs256(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token encodes")
}

/// The value of a metric line (exact labels as rendered), 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}
