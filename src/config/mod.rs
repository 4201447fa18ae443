//! Configuration: `cachegate.toml -> FileConfig (serde, spans) -> Config (validated, typed)`.
//!
//! This module owns every message an operator sees about the file. Errors carry the file name
//! and the line:column of the offending value, say what is wrong and how to fix it. It reads
//! the environment only for the secrets the file names (`password_env`); it never opens sockets.

pub mod file;
pub mod units;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use http::uri::{Authority, Scheme};

use crate::auth::jwt::{KeySource, Verifier};
use crate::auth::{Gate, OnStoreError, Policy, SessionTemplate};
use crate::cache::policy::OriginCacheControl;
use crate::rules::{QueryPolicy, RuleSpec, RuleTable, Scope};
use file::{FileConfig, QueryFile, Text};

/// A configuration error, ready to print: `FILE:LINE:COL: message`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{col}: {message}")]
    At {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
}

/// The validated configuration the engine runs with.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub rules: RuleTable,
}

/// Compiled `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Policy of paths no rule matches.
    pub default: Policy,
    pub gate: Gate,
    pub on_store_error: OnStoreError,
    /// Seconds announced in `Retry-After` of a 503 for an unreachable session store.
    pub retry_after: Duration,
    /// Header carrying the verified subject to the upstream (client copies are stripped).
    pub subject_header: http::HeaderName,
    pub login: Option<LoginConfig>,
    pub logout: Option<LogoutConfig>,
    /// The HS secret is shorter than 16 bytes and the operator accepted it
    /// (`allow_weak_jwt_secret`).
    pub weak_secret: bool,
}

/// Shortest HS secret accepted without `allow_weak_jwt_secret`.
pub const MIN_JWT_SECRET: usize = 16;

/// `[auth.login]`: capture the token of a successful login into the session key.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    pub path: String,
    pub method: http::Method,
    /// RFC 6901 pointer to the token in the JSON body.
    pub token_pointer: String,
    /// Session lifetime when the token has no `exp`.
    pub default_ttl: Duration,
    /// Largest login response body read to find the token.
    pub max_body: usize,
}

/// `[auth.logout]`: end the caller's session after the upstream's logout succeeds.
#[derive(Debug, Clone)]
pub struct LogoutConfig {
    pub path: String,
    pub method: http::Method,
}

/// Compiled `[admin]`.
#[derive(Clone, Default)]
pub struct AdminConfig {
    /// Bearer token of the admin API; `None` disables it.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token", &self.token.as_ref().map(|_| "set"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// Time a new connection has to deliver a complete first request head (either
    /// protocol), counted from accept (slowloris and silent-socket guard).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive
    /// and HTTP/2 alike).
    pub idle_timeout: Duration,
    /// Longest silence while a client uploads a request body (failure: 408).
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    /// Header fields per request, both protocols (more: 431).
    pub max_header_count: usize,
    /// Bytes of a request's header section, both protocols (more: 431).
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the upstream URL without a trailing slash ("" for the root).
    pub base_path: String,
    pub connect_timeout: Duration,
    /// Bound on the wait for the upstream's response head, and on each gap between body chunks.
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// Embedded, in-process store bounded by `max_bytes` (one instance only).
    Memory { max_bytes: u64 },
    /// Redis at `url`; the password comes from the environment, never from the file.
    Redis {
        url: String,
        password: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub prefix: String,
    /// Per-command timeout; past it the cache is bypassed.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_object_size: usize,
    pub statuses: StatusSet,
    /// How long a request waits for another request's fill of the same key.
    pub lock_timeout: Duration,
    /// Coalesce fills across instances with a lease in the store.
    pub distributed_lock: bool,
    /// Let clients' `Cache-Control: no-cache` / `max-age=0` force a revalidation.
    pub honor_client_no_cache: bool,
    /// Request headers besides Authorization that carry credentials: a request with one of
    /// them never touches an entry shared between users unless the rule is `public`.
    pub credential_headers: Vec<http::HeaderName>,
}

/// The set of response statuses that may be stored.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub fn new(codes: &[u16]) -> Self {
        let mut bits = [0u64; 10];
        for &c in codes {
            if (100..640).contains(&c) {
                bits[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
        StatusSet(bits)
    }
    pub fn contains(&self, code: u16) -> bool {
        code < 640 && self.0[(code / 64) as usize] & (1 << (code % 64)) != 0
    }
    pub fn codes(&self) -> Vec<u16> {
        (100..600).filter(|c| self.contains(*c)).collect()
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.codes()).finish()
    }
}

pub const DEFAULT_STATUSES: [u16; 7] = [200, 203, 204, 300, 301, 404, 410];

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Config::parse(&path.display().to_string(), &text)
    }

    /// Validate config text; `file` is only used in messages.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(file, text, &|name| std::env::var(name).ok())
    }

    /// As `parse`, with the environment lookup supplied (tests use a fixed map).
    pub fn parse_with_env(
        file: &str,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let cx = Cx { file, text, env };
        let parsed: FileConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            cx.err(span, e.message().trim_end().to_string())
        })?;
        compile(&cx, parsed)
    }
}

/// Where messages point: the file name and its text (for line:col).
struct Cx<'a> {
    file: &'a str,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Cx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, col) = line_col(self.text, span.start);
        ConfigError::At {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
        }
    }

    fn duration(
        &self,
        v: &Option<Text>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(t) => units::parse_duration(t.get_ref())
                .map_err(|m| self.err(t.span(), format!("{key}: {m}"))),
        }
    }

    fn size(&self, v: &Option<Text>, key: &str, default: u64) -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(t) => units::parse_size(t.get_ref())
                .map_err(|m| self.err(t.span(), format!("{key}: {m}"))),
        }
    }

    fn addr(&self, v: &Option<Text>, key: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        let (text, span) = match v {
            None => (default, 0..0),
            Some(t) => (t.get_ref().as_str(), t.span()),
        };
        text.parse().map_err(|_| {
            self.err(
                span,
                format!(
                    "{key}: {text:?} is not an address (try \"0.0.0.0:8080\" or \"127.0.0.1:9091\")"
                ),
            )
        })
    }

    fn count(
        &self,
        v: &Option<toml::Spanned<i64>>,
        key: &str,
        default: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) => {
                let value = *n.get_ref();
                if value < 1 || value as u64 > max as u64 {
                    Err(self.err(
                        n.span(),
                        format!("{key}: {value} is out of range (1 to {max})"),
                    ))
                } else {
                    Ok(value as usize)
                }
            }
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

fn compile(cx: &Cx<'_>, f: FileConfig) -> Result<Config, ConfigError> {
    let s = &f.server;
    let server = ServerConfig {
        listen: cx.addr(&s.listen, "server.listen", "0.0.0.0:8080")?,
        admin_listen: cx.addr(&s.admin_listen, "server.admin_listen", "127.0.0.1:9091")?,
        shutdown_grace: cx.duration(
            &s.shutdown_grace,
            "server.shutdown_grace",
            Duration::from_secs(30),
        )?,
        header_read_timeout: cx.duration(
            &s.header_read_timeout,
            "server.header_read_timeout",
            Duration::from_secs(30),
        )?,
        max_connections: cx.count(
            &s.max_connections,
            "server.max_connections",
            10_000,
            1_000_000,
        )?,
        idle_timeout: cx.duration(
            &s.idle_timeout,
            "server.idle_timeout",
            Duration::from_secs(60),
        )?,
        body_read_timeout: cx.duration(
            &s.body_read_timeout,
            "server.body_read_timeout",
            Duration::from_secs(30),
        )?,
        max_header_count: cx.count(&s.max_header_count, "server.max_header_count", 100, 1_000)?,
        max_header_bytes: cx.size(&s.max_header_bytes, "server.max_header_bytes", 64 << 10)?
            as usize,
    };
    for (value, key) in [
        (&s.idle_timeout, "server.idle_timeout"),
        (&s.body_read_timeout, "server.body_read_timeout"),
    ] {
        if let Some(t) = value
            && units::parse_duration(t.get_ref()).is_ok_and(|d| d.is_zero())
        {
            return Err(cx.err(t.span(), format!("{key}: must be above 0s")));
        }
    }
    if !(8 << 10..=1 << 20).contains(&server.max_header_bytes) {
        return Err(cx.err(
            span_of(&s.max_header_bytes),
            "server.max_header_bytes: must be between 8KiB and 1MiB",
        ));
    }
    if server.header_read_timeout.is_zero() {
        let span = s
            .header_read_timeout
            .as_ref()
            .map(|t| t.span())
            .unwrap_or(0..0);
        return Err(cx.err(
            span,
            "server.header_read_timeout: must be above 0s (it guards against slow clients)",
        ));
    }

    let upstream = compile_upstream(cx, &f)?;
    let store = compile_store(cx, f.store.as_ref())?;
    let cache = compile_cache(cx, &f.cache)?;
    let auth = compile_auth(cx, f.auth.as_ref())?;
    let admin = compile_admin(cx, &f.admin)?;
    let rules = compile_rules(cx, &f.rule, auth.default)?;
    Ok(Config {
        server,
        upstream,
        store,
        cache,
        auth,
        admin,
        rules,
    })
}

fn compile_upstream(cx: &Cx<'_>, f: &FileConfig) -> Result<UpstreamConfig, ConfigError> {
    let Some(up) = &f.upstream else {
        return Err(cx.err(
            0..0,
            "[upstream] is missing: add `[upstream]` with `url = \"http://127.0.0.1:9000\"`",
        ));
    };
    let table_span = up.span();
    let up = up.get_ref();
    let Some(url) = &up.url else {
        return Err(cx.err(
            table_span,
            "upstream.url is required (e.g. \"http://127.0.0.1:9000\")",
        ));
    };
    let uri: http::Uri = url.get_ref().parse().map_err(|_| {
        cx.err(
            url.span(),
            format!("upstream.url: {:?} is not a URL", url.get_ref()),
        )
    })?;
    let scheme = uri.scheme().cloned();
    if scheme != Some(Scheme::HTTP) {
        return Err(cx.err(
            url.span(),
            format!(
                "upstream.url: {:?} must start with http:// (the upstream is reached over plain HTTP; terminate TLS in front of it or use a local sidecar)",
                url.get_ref()
            ),
        ));
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(cx.err(
            url.span(),
            format!("upstream.url: {:?} has no host", url.get_ref()),
        ));
    };
    if authority.as_str().contains('@') {
        return Err(cx.err(
            url.span(),
            "upstream.url: credentials in the URL are not supported",
        ));
    }
    if uri.query().is_some() {
        return Err(cx.err(url.span(), "upstream.url: must not have a query string"));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(UpstreamConfig {
        scheme: Scheme::HTTP,
        authority,
        base_path,
        connect_timeout: cx.duration(
            &up.connect_timeout,
            "upstream.connect_timeout",
            Duration::from_secs(2),
        )?,
        timeout: cx.duration(&up.timeout, "upstream.timeout", Duration::from_secs(30))?,
        pool_idle_timeout: cx.duration(
            &up.pool_idle_timeout,
            "upstream.pool_idle_timeout",
            Duration::from_secs(4),
        )?,
        pool_max_idle: cx.count(&up.pool_max_idle, "upstream.pool_max_idle", 256, 65_536)?,
    })
}

fn compile_store(cx: &Cx<'_>, f: Option<&file::StoreFile>) -> Result<StoreConfig, ConfigError> {
    let empty = file::StoreFile::default();
    let f = f.unwrap_or(&empty);
    let backend_name = f
        .backend
        .as_ref()
        .map(|t| t.get_ref().as_str())
        .unwrap_or("memory");
    let backend = match backend_name {
        "memory" => {
            if let Some(url) = &f.url {
                return Err(cx.err(
                    url.span(),
                    "store.url is only used with backend = \"redis\"",
                ));
            }
            StoreBackend::Memory {
                max_bytes: cx.size(&f.max_bytes, "store.max_bytes", 256 << 20)?,
            }
        }
        "redis" => {
            if let Some(mb) = &f.max_bytes {
                return Err(cx.err(
                    mb.span(),
                    "store.max_bytes bounds the memory backend only; bound Redis with its own maxmemory",
                ));
            }
            let url = f
                .url
                .as_ref()
                .map(|t| (t.get_ref().clone(), t.span()))
                .unwrap_or_else(|| ("redis://127.0.0.1:6379/0".to_string(), 0..0));
            validate_redis_url(cx, &url.0, url.1)?;
            let password = match &f.password_env {
                None => None,
                Some(name) => match (cx.env)(name.get_ref()) {
                    Some(v) if !v.is_empty() => Some(v),
                    _ => {
                        return Err(cx.err(
                            name.span(),
                            format!(
                                "store.password_env: environment variable {} is not set (export it, or remove password_env)",
                                name.get_ref()
                            ),
                        ));
                    }
                },
            };
            StoreBackend::Redis {
                url: url.0,
                password,
            }
        }
        other => {
            let span = f.backend.as_ref().map(|t| t.span()).unwrap_or(0..0);
            return Err(cx.err(
                span,
                format!("store.backend: {other:?} is not a backend (use \"memory\" or \"redis\")"),
            ));
        }
    };
    let prefix = f
        .prefix
        .as_ref()
        .map(|t| t.get_ref().clone())
        .unwrap_or_else(|| "cachegate:".into());
    if prefix.len() > 64 || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        let span = f.prefix.as_ref().map(|t| t.span()).unwrap_or(0..0);
        return Err(cx.err(
            span,
            "store.prefix: at most 64 characters, no spaces or control characters",
        ));
    }
    let timeout = cx.duration(&f.timeout, "store.timeout", Duration::from_millis(100))?;
    if timeout.is_zero() {
        let span = f.timeout.as_ref().map(|t| t.span()).unwrap_or(0..0);
        return Err(cx.err(span, "store.timeout: must be above 0s (try \"100ms\")"));
    }
    Ok(StoreConfig {
        backend,
        prefix,
        timeout,
    })
}

fn validate_redis_url(cx: &Cx<'_>, url: &str, span: Range<usize>) -> Result<(), ConfigError> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("rediss://") {
        return Err(cx.err(
            span,
            "store.url: rediss:// (TLS) is not supported by this build; reach Redis over a TLS tunnel or a private network",
        ));
    }
    if !lower.starts_with("redis://")
        && !lower.starts_with("redis+unix://")
        && !lower.starts_with("unix://")
    {
        return Err(cx.err(
            span,
            format!("store.url: {url:?} is not a Redis URL (try \"redis://127.0.0.1:6379/0\")"),
        ));
    }
    // A password written into the file would end up in backups and version control.
    if let Some(rest) = lower.strip_prefix("redis://")
        && let Some(userinfo) = rest
            .split('/')
            .next()
            .and_then(|a| a.rsplit_once('@'))
            .map(|(u, _)| u)
        && userinfo.contains(':')
    {
        return Err(cx.err(
            span,
            "store.url: must not contain a password; put it in an environment variable and name it in store.password_env",
        ));
    }
    Ok(())
}

fn compile_cache(cx: &Cx<'_>, f: &file::CacheFile) -> Result<CacheConfig, ConfigError> {
    let max_object_size = cx.size(&f.max_object_size, "cache.max_object_size", 1 << 20)?;
    if max_object_size > 512 << 20 {
        let span = f.max_object_size.as_ref().map(|t| t.span()).unwrap_or(0..0);
        return Err(cx.err(
            span,
            "cache.max_object_size: at most 512MiB (an entry is held in memory while it is stored)",
        ));
    }
    let statuses = match &f.statuses {
        None => StatusSet::new(&DEFAULT_STATUSES),
        Some(list) => {
            let mut codes = Vec::new();
            for c in list.get_ref() {
                let v = *c.get_ref();
                if !(100..=599).contains(&v) || (200..300).contains(&v) && v == 206 {
                    return Err(cx.err(
                        c.span(),
                        format!("cache.statuses: {v} cannot be cached (use final statuses 100-599 other than 206)"),
                    ));
                }
                codes.push(v as u16);
            }
            StatusSet::new(&codes)
        }
    };
    let lock_timeout = cx.duration(
        &f.lock_timeout,
        "cache.lock_timeout",
        Duration::from_secs(5),
    )?;
    let credential_headers = match &f.credential_headers {
        None => DEFAULT_CREDENTIAL_HEADERS
            .iter()
            .map(|n| http::HeaderName::from_static(n))
            .collect(),
        Some(list) => header_names(cx, list, "cache.credential_headers")?,
    };
    Ok(CacheConfig {
        max_object_size: max_object_size as usize,
        statuses,
        lock_timeout,
        distributed_lock: f.distributed_lock.unwrap_or(false),
        honor_client_no_cache: f.honor_client_no_cache.unwrap_or(false),
        credential_headers,
    })
}

/// Request headers that carry credentials besides Authorization, by default.
pub const DEFAULT_CREDENTIAL_HEADERS: [&str; 2] = ["cookie", "x-api-key"];

/// A list of header names, lower-cased, sorted, without duplicates.
fn header_names(
    cx: &Cx<'_>,
    list: &[Text],
    key: &str,
) -> Result<Vec<http::HeaderName>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for v in list {
        let name = http::HeaderName::from_bytes(v.get_ref().to_ascii_lowercase().as_bytes())
            .map_err(|_| {
                cx.err(
                    v.span(),
                    format!("{key}: {:?} is not a header name", v.get_ref()),
                )
            })?;
        out.push(name);
    }
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    Ok(out)
}

fn span_of(t: &Option<Text>) -> Range<usize> {
    t.as_ref().map(|t| t.span()).unwrap_or(0..0)
}

fn secret_from_env(cx: &Cx<'_>, name: &Text, key: &str) -> Result<String, ConfigError> {
    match (cx.env)(name.get_ref()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(cx.err(
            name.span(),
            format!(
                "{key}: environment variable {} is not set (export it, or remove {key})",
                name.get_ref()
            ),
        )),
    }
}

fn compile_auth(
    cx: &Cx<'_>,
    f: Option<&toml::Spanned<file::AuthFile>>,
) -> Result<AuthConfig, ConfigError> {
    let empty = file::AuthFile::default();
    let (f, table_span) = match f {
        Some(s) => (s.get_ref(), s.span()),
        None => (&empty, 0..0),
    };
    let default = match f.default.as_ref().map(|t| t.get_ref().as_str()) {
        None | Some("none") => Policy::None,
        Some("required") => Policy::Required,
        Some(other) => {
            return Err(cx.err(
                span_of(&f.default),
                format!("auth.default: {other:?} is not a policy (use \"none\" or \"required\")"),
            ));
        }
    };
    let template_text = f
        .session_key
        .as_ref()
        .map(|t| t.get_ref().as_str())
        .unwrap_or("user_token:{sub}");
    let template = SessionTemplate::parse(template_text).map_err(|m| {
        cx.err(
            span_of(&f.session_key),
            format!("auth.session_key {template_text:?}: {m}"),
        )
    })?;
    let subject_claim = match &f.subject_claim {
        Some(c) => {
            if !template.claims().any(|n| n == c.get_ref()) {
                return Err(cx.err(
                    c.span(),
                    format!(
                        "auth.subject_claim: {:?} is not named by session_key {template_text:?}",
                        c.get_ref()
                    ),
                ));
            }
            c.get_ref().clone()
        }
        None => {
            let names: Vec<&str> = template.claims().collect();
            if names.len() == 1 {
                names[0].to_string()
            } else if names.contains(&"sub") {
                "sub".to_string()
            } else {
                return Err(cx.err(
                    span_of(&f.session_key),
                    "auth.session_key names several claims: set auth.subject_claim to the one that identifies the user",
                ));
            }
        }
    };
    let algorithms: Vec<String> = match &f.algorithms {
        None => vec!["HS256".into()],
        Some(list) => list.get_ref().iter().map(|t| t.get_ref().clone()).collect(),
    };
    let alg_span = f
        .algorithms
        .as_ref()
        .map(|a| a.span())
        .unwrap_or(table_span.clone());
    let secret = match &f.jwt_secret_env {
        Some(name) => Some(secret_from_env(cx, name, "auth.jwt_secret_env")?),
        None => None,
    };
    let pem = match &f.jwt_public_key_file {
        Some(path) => Some(std::fs::read(path.get_ref()).map_err(|e| {
            cx.err(
                path.span(),
                format!(
                    "auth.jwt_public_key_file: cannot read {:?}: {e}",
                    path.get_ref()
                ),
            )
        })?),
        None => None,
    };
    let allow_weak = f.allow_weak_jwt_secret.unwrap_or(false);
    let mut weak_secret = false;
    if let (Some(s), Some(name)) = (&secret, &f.jwt_secret_env)
        && s.len() < MIN_JWT_SECRET
    {
        if !allow_weak {
            return Err(cx.err(
                name.span(),
                format!(
                    "auth.jwt_secret_env: the secret in {} is {} bytes; an HS secret needs at least {MIN_JWT_SECRET} (to front an API that already signs with this secret, set auth.allow_weak_jwt_secret = true)",
                    name.get_ref(),
                    s.len()
                ),
            ));
        }
        weak_secret = true;
    }
    let key = match (&secret, &pem) {
        (Some(_), Some(_)) => {
            return Err(cx.err(
                span_of(&f.jwt_public_key_file),
                "auth: set jwt_secret_env (HS*) or jwt_public_key_file (RS*/ES*), not both",
            ));
        }
        (Some(s), None) if weak_secret => KeySource::WeakSecret(s.as_bytes()),
        (Some(s), None) => KeySource::Secret(s.as_bytes()),
        (None, Some(p)) => KeySource::PublicPem(p),
        (None, None) => KeySource::None,
    };
    let leeway = cx.duration(&f.leeway, "auth.leeway", Duration::from_secs(30))?;
    let verifier = Verifier::new(
        &algorithms,
        key,
        leeway.as_secs(),
        f.audience.as_ref().map(|t| t.get_ref().as_str()),
        f.issuer.as_ref().map(|t| t.get_ref().as_str()),
    )
    .map_err(|m| cx.err(alg_span, format!("auth.algorithms: {m}")))?;
    let on_store_error = match f.on_store_error.as_ref().map(|t| t.get_ref().as_str()) {
        None | Some("reject") => OnStoreError::Reject,
        Some("allow") => OnStoreError::Allow,
        Some(other) => {
            return Err(cx.err(
                span_of(&f.on_store_error),
                format!(
                    "auth.on_store_error: {other:?} is not a choice (use \"reject\" or \"allow\")"
                ),
            ));
        }
    };
    let retry_after = cx.duration(&f.retry_after, "auth.retry_after", Duration::from_secs(5))?;
    let header_text = f
        .subject_header
        .as_ref()
        .map(|t| t.get_ref().as_str())
        .unwrap_or("x-auth-subject");
    let subject_header = http::HeaderName::from_bytes(header_text.to_ascii_lowercase().as_bytes())
        .map_err(|_| {
            cx.err(
                span_of(&f.subject_header),
                format!("auth.subject_header: {header_text:?} is not a header name"),
            )
        })?;
    let login = match &f.login {
        None => None,
        Some(l) => {
            let span = l.span();
            let l = l.get_ref();
            let Some(path) = &l.path else {
                return Err(cx.err(span, "auth.login.path is required (e.g. \"/login\")"));
            };
            Some(LoginConfig {
                path: endpoint_path(cx, path, "auth.login.path")?,
                method: method(cx, &l.method, "auth.login.method")?,
                token_pointer: match &l.token_pointer {
                    None => "/access_token".into(),
                    Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
                    Some(p) => {
                        return Err(cx.err(
                            p.span(),
                            "auth.login.token_pointer: a JSON pointer starts with '/' (e.g. \"/access_token\")",
                        ));
                    }
                },
                default_ttl: cx.duration(
                    &l.default_ttl,
                    "auth.login.default_ttl",
                    Duration::from_secs(3600),
                )?,
                max_body: cx.size(&l.max_body, "auth.login.max_body", 64 << 10)? as usize,
            })
        }
    };
    let logout = match &f.logout {
        None => None,
        Some(l) => {
            let span = l.span();
            let l = l.get_ref();
            let Some(path) = &l.path else {
                return Err(cx.err(span, "auth.logout.path is required (e.g. \"/logout\")"));
            };
            Some(LogoutConfig {
                path: endpoint_path(cx, path, "auth.logout.path")?,
                method: method(cx, &l.method, "auth.logout.method")?,
            })
        }
    };
    Ok(AuthConfig {
        default,
        gate: Gate::new(verifier, template, subject_claim),
        on_store_error,
        retry_after,
        subject_header,
        login,
        logout,
        weak_secret,
    })
}

fn endpoint_path(cx: &Cx<'_>, t: &Text, key: &str) -> Result<String, ConfigError> {
    let canonical = crate::normalize::canonical_path(t.get_ref())
        .map_err(|e| cx.err(t.span(), format!("{key}: {:?}: {e}", t.get_ref())))?;
    Ok(canonical.into_owned())
}

fn method(cx: &Cx<'_>, t: &Option<Text>, key: &str) -> Result<http::Method, ConfigError> {
    match t {
        None => Ok(http::Method::POST),
        Some(m) => {
            http::Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes()).map_err(|_| {
                cx.err(
                    m.span(),
                    format!("{key}: {:?} is not a method", m.get_ref()),
                )
            })
        }
    }
}

fn compile_admin(cx: &Cx<'_>, f: &file::AdminFile) -> Result<AdminConfig, ConfigError> {
    let token = match &f.token_env {
        None => None,
        Some(name) => {
            let token = secret_from_env(cx, name, "admin.token_env")?;
            if token.len() < 16 {
                return Err(cx.err(
                    name.span(),
                    "admin.token_env: the admin token must be at least 16 characters",
                ));
            }
            Some(token)
        }
    };
    Ok(AdminConfig { token })
}

fn compile_rules(
    cx: &Cx<'_>,
    rules: &[toml::Spanned<file::RuleFile>],
    default_auth: Policy,
) -> Result<RuleTable, ConfigError> {
    let mut specs = Vec::with_capacity(rules.len());
    let mut match_spans = Vec::with_capacity(rules.len());
    for r in rules {
        let table_span = r.span();
        let r = r.get_ref();
        let Some(name) = &r.name else {
            return Err(cx.err(
                table_span,
                "[[rule]] needs a name (it labels metrics and logs)",
            ));
        };
        let rule_name = name.get_ref().as_str();
        crate::rules::validate_rule_name(rule_name).map_err(|m| cx.err(name.span(), m))?;
        if specs.iter().any(|s: &RuleSpec| s.name == rule_name) {
            return Err(cx.err(
                name.span(),
                format!("rule {rule_name:?}: the name is used by another rule"),
            ));
        }
        let Some(template) = &r.match_ else {
            return Err(cx.err(
                table_span,
                format!("rule {rule_name:?}: `match` is required (e.g. match = \"/user/{{id}}\")"),
            ));
        };
        let ttl = match &r.ttl {
            None => None,
            Some(t) => {
                let d = units::parse_duration(t.get_ref())
                    .map_err(|m| cx.err(t.span(), format!("rule {rule_name:?}: ttl {m}")))?;
                if d.is_zero() { None } else { Some(d) }
            }
        };
        let query = match &r.query {
            None => QueryPolicy::Sorted,
            Some(q) => match q.get_ref() {
                QueryFile::Mode(m) if m == "sorted" => QueryPolicy::Sorted,
                QueryFile::Mode(m) if m == "ignore" => QueryPolicy::Ignore,
                QueryFile::Mode(m) => {
                    return Err(cx.err(
                        q.span(),
                        format!("rule {rule_name:?}: query {m:?} is not a policy (use \"sorted\", \"ignore\" or a list of parameter names)"),
                    ));
                }
                QueryFile::Keep(names) => {
                    if names.iter().any(|n| n.is_empty() || n.len() > 128) {
                        return Err(cx.err(
                            q.span(),
                            format!("rule {rule_name:?}: query names must be 1 to 128 characters"),
                        ));
                    }
                    QueryPolicy::keep(names)
                }
            },
        };
        let mut vary = Vec::new();
        for v in r.vary.iter().flatten() {
            let name = http::HeaderName::from_bytes(v.get_ref().to_ascii_lowercase().as_bytes())
                .map_err(|_| {
                    cx.err(
                        v.span(),
                        format!(
                            "rule {rule_name:?}: vary {:?} is not a header name",
                            v.get_ref()
                        ),
                    )
                })?;
            if name == http::header::AUTHORIZATION || name == http::header::COOKIE {
                return Err(cx.err(
                    v.span(),
                    format!("rule {rule_name:?}: vary on {name} would key entries by a secret; use scope = \"user\" instead"),
                ));
            }
            vary.push(name);
        }
        vary.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        vary.dedup();
        let unkeyed_ok = r.fill_headers_unkeyed_ok.unwrap_or(false);
        let mut fill_headers = Vec::new();
        for v in r.fill_headers.iter().flatten() {
            let name = header_names(
                cx,
                std::slice::from_ref(v),
                &format!("rule {rule_name:?}: fill_headers"),
            )?
            .remove(0);
            if let Some(why) = crate::proxy::headers::never_filled(&name) {
                return Err(cx.err(
                    v.span(),
                    format!("rule {rule_name:?}: fill_headers {:?}: {why}", v.get_ref()),
                ));
            }
            if !vary.contains(&name) && !unkeyed_ok {
                return Err(cx.err(
                    v.span(),
                    format!(
                        "rule {rule_name:?}: fill_headers {:?} is not in vary, so one client's value would shape the entry every client gets; add it to vary, or set fill_headers_unkeyed_ok = true to accept that risk",
                        v.get_ref()
                    ),
                ));
            }
            fill_headers.push(name);
        }
        fill_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        fill_headers.dedup();
        let route = crate::rules::Template::parse(template.get_ref()).map_err(|m| {
            cx.err(
                template.span(),
                format!("rule {rule_name:?}: match {:?}: {m}", template.get_ref()),
            )
        })?;
        let tag_list = |list: &Option<Vec<Text>>, key: &str| -> Result<Vec<_>, ConfigError> {
            let mut out = Vec::new();
            for t in list.iter().flatten() {
                out.push(route.tag(t.get_ref()).map_err(|m| {
                    cx.err(
                        t.span(),
                        format!("rule {rule_name:?}: {key} {:?}: {m}", t.get_ref()),
                    )
                })?);
            }
            Ok(out)
        };
        let tags = tag_list(&r.tags, "tag")?;
        let purge = tag_list(&r.purge, "purge tag")?;
        let window = |v: &Option<Text>, key: &str| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(Duration::ZERO),
                Some(t) => units::parse_duration(t.get_ref())
                    .map_err(|m| cx.err(t.span(), format!("rule {rule_name:?}: {key} {m}"))),
            }
        };
        let stale_while_revalidate = window(&r.stale_while_revalidate, "stale_while_revalidate")?;
        let stale_if_error = window(&r.stale_if_error, "stale_if_error")?;
        let origin_cache_control = match r
            .origin_cache_control
            .as_ref()
            .map(|t| t.get_ref().as_str())
        {
            None | Some("respect") => OriginCacheControl::Respect,
            Some("only") => OriginCacheControl::Only,
            Some("override") => OriginCacheControl::Override,
            Some(other) => {
                return Err(cx.err(
                    span_of(&r.origin_cache_control),
                    format!("rule {rule_name:?}: origin_cache_control {other:?} is not a mode (use \"respect\", \"only\" or \"override\")"),
                ));
            }
        };
        let auth = match r.auth.as_ref().map(|t| t.get_ref().as_str()) {
            None => default_auth,
            Some("none") => Policy::None,
            Some("required") => Policy::Required,
            Some("optional") => Policy::Optional,
            Some(other) => {
                return Err(cx.err(
                    span_of(&r.auth),
                    format!("rule {rule_name:?}: auth {other:?} is not a policy (use \"none\", \"required\" or \"optional\")"),
                ));
            }
        };
        let scope = match r.scope.as_ref().map(|t| t.get_ref().as_str()) {
            None if auth == Policy::Required => Scope::User,
            None => Scope::Anonymous,
            Some("public") => Scope::Public,
            Some("user") if auth == Policy::None => {
                return Err(cx.err(
                    span_of(&r.scope),
                    format!("rule {rule_name:?}: scope \"user\" needs auth = \"required\" or \"optional\" (there is no verified subject to scope by)"),
                ));
            }
            Some("user") => Scope::User,
            Some(other) => {
                return Err(cx.err(
                    span_of(&r.scope),
                    format!("rule {rule_name:?}: scope {other:?} is not a scope (use \"public\" or \"user\")"),
                ));
            }
        };
        match_spans.push(template.span());
        specs.push(RuleSpec {
            name: rule_name.to_string(),
            template: route,
            ttl,
            query,
            vary,
            fill_headers,
            tags,
            purge,
            stale_while_revalidate,
            stale_if_error,
            origin_cache_control,
            auth,
            scope,
        });
    }
    RuleTable::build(specs).map_err(|(index, message)| cx.err(match_spans[index].clone(), message))
}

#[cfg(test)]
mod tests;
