//! cachegate started in-process, its config built for the test, and a client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cachegate::config::Config;
use cachegate::server::{self, Running};
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Origin, Redis, eventually, metric};

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

/// A test's config, built up: listeners on port 0, the origin as upstream, a store (the
/// embedded one unless told), then server keys, rules and whole sections.
pub struct ProxyBuilder {
    upstream: String,
    upstream_keys: String,
    server: String,
    store: String,
    rest: String,
    env: Vec<(String, String)>,
}

impl ProxyBuilder {
    /// Use this Redis (with a generous command timeout for a loaded test machine).
    pub fn redis(mut self, redis: &Redis) -> Self {
        self.store = redis_store(redis);
        self
    }

    /// Use this Redis with this command timeout (fault tests).
    pub fn redis_timeout(mut self, redis: &Redis, timeout: &str) -> Self {
        self.store = redis_store_timeout(redis, timeout);
        self
    }

    /// An `[upstream]` key, e.g. `tls_ca_file = "..."`.
    pub fn upstream(mut self, line: &str) -> Self {
        self.upstream_keys.push_str(line);
        self.upstream_keys.push('\n');
        self
    }

    /// A `[server]` key, e.g. `idle_timeout = "1s"`.
    pub fn server(mut self, line: &str) -> Self {
        self.server.push_str(line);
        self.server.push('\n');
        self
    }

    /// A `[[rule]]`, given as its keys.
    pub fn rule(mut self, keys: &str) -> Self {
        self.rest.push_str("\n[[rule]]\n");
        self.rest.push_str(keys);
        self.rest.push('\n');
        self
    }

    /// Any other TOML (whole sections).
    pub fn section(mut self, toml: &str) -> Self {
        self.rest.push('\n');
        self.rest.push_str(toml);
        self.rest.push('\n');
        self
    }

    /// An environment variable the config may name (secrets).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// The config text.
    pub fn text(&self) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n{}\n\
             [upstream]\nurl = \"{}\"\ntimeout = \"2s\"\nconnect_timeout = \"500ms\"\n{}\n{}\n{}",
            self.server, self.upstream, self.upstream_keys, self.store, self.rest
        )
    }

    pub async fn start(self) -> Proxy {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Proxy::start_env(&self.text(), &env).await
    }
}

impl Proxy {
    /// A config builder for a proxy in front of `origin`.
    pub fn builder(origin: &Origin) -> ProxyBuilder {
        ProxyBuilder {
            upstream: origin.url(),
            upstream_keys: String::new(),
            server: String::new(),
            store: MEMORY_STORE.to_string(),
            rest: String::new(),
            env: Vec::new(),
        }
    }

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
