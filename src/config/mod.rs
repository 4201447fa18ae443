//! Configuration: `cachegate.toml -> FileConfig (typed values, positions) -> Config`.
//!
//! `file` reads the TOML into typed values with their positions; `compile` validates them
//! into the `Config` the engine runs with. Every problem in the file is reported, each as
//! `FILE:LINE:COL: message` saying what is wrong and how to fix it. This module reads the
//! environment only for the secrets the file names (`*_env`) and the files it names (a JWT
//! public key); it never opens sockets.

pub mod compile;
pub mod file;
pub mod units;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use http::uri::{Authority, Scheme};

use crate::auth::{Gate, OnStoreError};
pub use crate::cache::policy::{DEFAULT_STATUSES, StatusSet};
use crate::routing::{Policy, RuleTable};

/// One problem in a config file, at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Why a config file cannot be used: it cannot be read, or every problem found in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// Each problem on its own line, as `FILE:LINE:COL: message`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(d) => d.iter().map(|d| d.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
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

pub use compile::{DEFAULT_CREDENTIAL_HEADERS, MIN_JWT_SECRET};

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
    /// One log line per request (at info level).
    pub access_log: bool,
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
    /// For an `https://` upstream.
    pub tls: UpstreamTls,
}

/// TLS to an `https://` upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Trust anchors (PEM) added to the system's.
    pub ca: Option<Pem>,
    /// The name the certificate must carry and SNI sends (default: the URL's host).
    pub server_name: Option<String>,
    /// Verify the certificate (`tls_verify = false` is for tests only).
    pub verify: bool,
}

impl Default for UpstreamTls {
    fn default() -> UpstreamTls {
        UpstreamTls {
            ca: None,
            server_name: None,
            verify: true,
        }
    }
}

/// PEM text read from a file when the config was loaded (printed as its size only: a key
/// must never reach a log).
#[derive(Clone, PartialEq, Eq)]
pub struct Pem(pub Vec<u8>);

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pem({} bytes)", self.0.len())
    }
}

pub use crate::cache::store::redis::{RedisTarget, RedisTls};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// Embedded, in-process store bounded by `max_bytes` (one instance only).
    Memory { max_bytes: u64 },
    /// Redis; the password comes from the environment, never from the file.
    Redis {
        target: RedisTarget,
        password: Option<String>,
        tls: RedisTls,
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
    /// Bound of the in-process tier over Redis (0: no tier). The embedded store's tier is
    /// sized by `[store] max_bytes` instead.
    pub l1_max_bytes: u64,
    /// How long the in-process tier may still answer after Redis tracking was lost.
    pub l1_serve_disconnected: Duration,
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// As `load`, with the environment lookup supplied.
    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Config::parse_with_env(&path.display().to_string(), &text, env)
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
        let (parsed, problems) = file::read(text)
            .map_err(|syntax| ConfigError::Invalid(diagnostics(file, text, vec![syntax])))?;
        let mut cx = compile::Cx::new(env);
        for (span, message) in problems {
            cx.err(span, message);
        }
        let config = compile::compile(&mut cx, parsed);
        if cx.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(diagnostics(file, text, cx.problems)))
        }
    }
}

/// Problems as diagnostics, in the order of the file.
fn diagnostics(
    file: &str,
    text: &str,
    mut problems: Vec<(Range<usize>, String)>,
) -> Vec<Diagnostic> {
    problems.sort_by_key(|(span, _)| span.start);
    problems.dedup();
    problems
        .into_iter()
        .map(|(span, message)| {
            let (line, col) = line_col(text, span.start);
            Diagnostic {
                file: file.to_string(),
                line,
                col,
                message,
            }
        })
        .collect()
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

#[cfg(test)]
mod tests;
