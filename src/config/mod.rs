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

use crate::rules::{QueryPolicy, RuleSpec, RuleTable};
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
    pub rules: RuleTable,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// Time a client has to send a complete request head, counted from the end of the
    /// previous response on keep-alive connections (slowloris and idle guard).
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_header_count: usize,
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
        max_header_count: cx.count(&s.max_header_count, "server.max_header_count", 100, 1_000)?,
    };
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
    let rules = compile_rules(cx, &f.rule)?;
    Ok(Config {
        server,
        upstream,
        store,
        cache,
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
    Ok(CacheConfig {
        max_object_size: max_object_size as usize,
        statuses,
    })
}

fn compile_rules(
    cx: &Cx<'_>,
    rules: &[toml::Spanned<file::RuleFile>],
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
        let route = crate::rules::Template::parse(template.get_ref()).map_err(|m| {
            cx.err(
                template.span(),
                format!("rule {rule_name:?}: match {:?}: {m}", template.get_ref()),
            )
        })?;
        let mut tags = Vec::new();
        for t in r.tags.iter().flatten() {
            tags.push(route.tag(t.get_ref()).map_err(|m| {
                cx.err(
                    t.span(),
                    format!("rule {rule_name:?}: tag {:?}: {m}", t.get_ref()),
                )
            })?);
        }
        match_spans.push(template.span());
        specs.push(RuleSpec {
            name: rule_name.to_string(),
            template: route,
            ttl,
            query,
            vary,
            tags,
        });
    }
    RuleTable::build(specs).map_err(|(index, message)| cx.err(match_spans[index].clone(), message))
}

#[cfg(test)]
mod tests;
