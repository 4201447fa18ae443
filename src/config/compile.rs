//! The one compile step: `FileConfig` (typed values with positions) into the validated
//! `Config`, checking what single values cannot tell (ranges, combinations, secrets in the
//! environment, files on disk, rules against each other).
//!
//! Every check reports into `Cx` and compilation goes on with a default, so one pass finds
//! every problem in the file.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::uri::Scheme;
use toml::Spanned;

use super::file::{
    AdminFile, AuthFile, Backend, CacheFile, DefaultPolicy, FileConfig, OnStoreErrorFile,
    QueryFile, RuleFile, ScopeFile, ServerFile, StoreFile, UpstreamFile, Val,
};
use super::units::format_duration;
use super::{
    AdminConfig, AuthConfig, CacheConfig, Config, LoginConfig, LogoutConfig, Pem, RedisTarget,
    RedisTls, ServerConfig, StoreBackend, StoreConfig, UpstreamConfig, UpstreamTls,
};
use crate::auth::jwt::{KeySource, Verifier};
use crate::auth::{Gate, OnStoreError, SessionTemplate};
use crate::cache::policy::{DEFAULT_STATUSES, OriginCacheControl, StatusSet};
use crate::routing::tags::TagTemplate;
use crate::routing::{Policy, QueryPolicy, Rule, RuleTable, Scope};

/// Shortest HS secret accepted without `allow_weak_jwt_secret`.
pub const MIN_JWT_SECRET: usize = 16;

/// Request headers that carry credentials besides Authorization, by default.
pub const DEFAULT_CREDENTIAL_HEADERS: [&str; 2] = ["cookie", "x-api-key"];

/// Where problems go, and where secrets come from.
pub struct Cx<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    pub problems: Vec<(Range<usize>, String)>,
}

impl<'a> Cx<'a> {
    pub fn new(env: &'a dyn Fn(&str) -> Option<String>) -> Cx<'a> {
        Cx {
            env,
            problems: Vec::new(),
        }
    }

    pub fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.problems.push((span, message.into()));
    }

    fn secret(&mut self, name: &Spanned<String>, key: &str) -> Option<String> {
        match (self.env)(name.get_ref()) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.err(
                    name.span(),
                    format!(
                        "{key}: environment variable {} is not set (export it, or remove {key})",
                        name.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn count(&mut self, v: &Val<i64>, key: &str, default: usize, max: usize) -> usize {
        match v {
            None => default,
            Some(n) => {
                let value = *n.get_ref();
                if value < 1 || value as u64 > max as u64 {
                    self.err(
                        n.span(),
                        format!("{key}: {value} is out of range (1 to {max})"),
                    );
                    default
                } else {
                    value as usize
                }
            }
        }
    }

    /// A duration that must not be zero.
    fn positive(
        &mut self,
        v: &Val<Duration>,
        key: &str,
        default: Duration,
        hint: &str,
    ) -> Duration {
        match v {
            Some(d) if d.get_ref().is_zero() => {
                self.err(d.span(), format!("{key}: must be above 0s{hint}"));
                default
            }
            Some(d) => *d.get_ref(),
            None => default,
        }
    }
}

fn get<T: Copy>(v: &Val<T>, default: T) -> T {
    v.as_ref().map(|s| *s.get_ref()).unwrap_or(default)
}

/// Report each key that is set although `when` says it is not used here.
fn unused(cx: &mut Cx<'_>, keys: &[(Range<usize>, &str)], when: &str) {
    for (span, key) in keys {
        if *span != (0..0) {
            cx.err(span.clone(), format!("{key}{when}"));
        }
    }
}

fn span_of<T>(v: &Val<T>) -> Range<usize> {
    v.as_ref().map(|s| s.span()).unwrap_or(0..0)
}

/// Compile the whole file; problems go into `cx`.
pub fn compile(cx: &mut Cx<'_>, f: FileConfig) -> Config {
    let server = compile_server(cx, &f.server);
    let upstream = compile_upstream(cx, f.upstream.as_ref());
    let store = compile_store(cx, &f.store);
    let cache = compile_cache(cx, &f.cache);
    let auth = compile_auth(cx, f.auth.as_ref());
    let admin = compile_admin(cx, &f.admin);
    let rules = compile_rules(cx, &f.rules, auth.default, &cache.credential_headers);
    Config {
        server,
        upstream,
        store,
        cache,
        auth,
        admin,
        rules,
    }
}

fn compile_server(cx: &mut Cx<'_>, s: &ServerFile) -> ServerConfig {
    let default_addr = |text: &str| text.parse::<SocketAddr>().expect("a valid default address");
    let server = ServerConfig {
        listen: get(&s.listen, default_addr("0.0.0.0:8080")),
        admin_listen: get(&s.admin_listen, default_addr("127.0.0.1:9091")),
        shutdown_grace: get(&s.shutdown_grace, Duration::from_secs(30)),
        header_read_timeout: cx.positive(
            &s.header_read_timeout,
            "server.header_read_timeout",
            Duration::from_secs(30),
            " (it guards against slow clients)",
        ),
        idle_timeout: cx.positive(
            &s.idle_timeout,
            "server.idle_timeout",
            Duration::from_secs(60),
            "",
        ),
        body_read_timeout: cx.positive(
            &s.body_read_timeout,
            "server.body_read_timeout",
            Duration::from_secs(30),
            "",
        ),
        max_connections: cx.count(
            &s.max_connections,
            "server.max_connections",
            10_000,
            1_000_000,
        ),
        max_header_count: cx.count(&s.max_header_count, "server.max_header_count", 100, 1_000),
        max_header_bytes: get(&s.max_header_bytes, 64 << 10) as usize,
        access_log: get(&s.access_log, true),
    };
    if !(8 << 10..=1 << 20).contains(&server.max_header_bytes) {
        cx.err(
            span_of(&s.max_header_bytes),
            "server.max_header_bytes: must be between 8KiB and 1MiB",
        );
    }
    server
}

fn compile_upstream(cx: &mut Cx<'_>, f: Option<&Spanned<UpstreamFile>>) -> UpstreamConfig {
    let fallback = || UpstreamConfig {
        scheme: Scheme::HTTP,
        authority: http::uri::Authority::from_static("127.0.0.1:9000"),
        base_path: String::new(),
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(30),
        pool_idle_timeout: Duration::from_secs(4),
        pool_max_idle: 256,
        tls: UpstreamTls::default(),
    };
    let Some(up) = f else {
        cx.err(
            0..0,
            "[upstream] is missing: add `[upstream]` with `url = \"http://127.0.0.1:9000\"`",
        );
        return fallback();
    };
    let table_span = up.span();
    let up = up.get_ref();
    let mut out = UpstreamConfig {
        connect_timeout: get(&up.connect_timeout, Duration::from_secs(2)),
        timeout: get(&up.timeout, Duration::from_secs(30)),
        pool_idle_timeout: get(&up.pool_idle_timeout, Duration::from_secs(4)),
        pool_max_idle: cx.count(&up.pool_max_idle, "upstream.pool_max_idle", 256, 65_536),
        ..fallback()
    };
    let Some(url) = &up.url else {
        cx.err(
            table_span,
            "upstream.url is required (e.g. \"http://127.0.0.1:9000\")",
        );
        return out;
    };
    let text = url.get_ref();
    let Ok(uri) = text.parse::<http::Uri>() else {
        cx.err(url.span(), format!("upstream.url: {text:?} is not a URL"));
        return out;
    };
    let https = uri.scheme() == Some(&Scheme::HTTPS);
    if uri.scheme() != Some(&Scheme::HTTP) && !https {
        cx.err(
            url.span(),
            format!("upstream.url: {text:?} must start with http:// or https://"),
        );
        return out;
    }
    out.tls = compile_upstream_tls(cx, up, https);
    let Some(authority) = uri.authority().cloned() else {
        cx.err(url.span(), format!("upstream.url: {text:?} has no host"));
        return out;
    };
    if authority.as_str().contains('@') {
        cx.err(
            url.span(),
            "upstream.url: credentials in the URL are not supported",
        );
        return out;
    }
    if uri.query().is_some() {
        cx.err(url.span(), "upstream.url: must not have a query string");
        return out;
    }
    out.scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
    out.authority = authority;
    out.base_path = uri.path().trim_end_matches('/').to_string();
    out
}

fn compile_store(cx: &mut Cx<'_>, f: &StoreFile) -> StoreConfig {
    let backend = match get(&f.backend, Backend::Memory) {
        Backend::Memory => {
            unused(
                cx,
                &[
                    (span_of(&f.url), "store.url"),
                    (span_of(&f.sentinels), "store.sentinels"),
                    (span_of(&f.sentinel_master), "store.sentinel_master"),
                    (
                        span_of(&f.sentinel_password_env),
                        "store.sentinel_password_env",
                    ),
                    (span_of(&f.cluster_nodes), "store.cluster_nodes"),
                    (span_of(&f.tls_ca_file), "store.tls_ca_file"),
                    (span_of(&f.tls_cert_file), "store.tls_cert_file"),
                    (span_of(&f.tls_key_file), "store.tls_key_file"),
                ],
                " is only used with backend = \"redis\"",
            );
            StoreBackend::Memory {
                max_bytes: get(&f.max_bytes, 256 << 20),
            }
        }
        Backend::Redis => {
            if let Some(mb) = &f.max_bytes {
                cx.err(
                    mb.span(),
                    "store.max_bytes bounds the memory backend only; bound Redis with its own maxmemory",
                );
            }
            let (target, tls_wanted) = redis_target(cx, f);
            let tls = redis_tls(cx, f, tls_wanted);
            let password = f
                .password_env
                .as_ref()
                .and_then(|name| {
                    match (cx.env)(name.get_ref()) {
                        Some(v) if !v.is_empty() => Some(v),
                        _ => {
                            cx.err(
                                name.span(),
                                format!(
                                    "store.password_env: environment variable {} is not set (export it, or remove password_env)",
                                    name.get_ref()
                                ),
                            );
                            None
                        }
                    }
                });
            StoreBackend::Redis {
                target,
                password,
                tls,
            }
        }
    };
    let prefix = f
        .prefix
        .as_ref()
        .map(|t| t.get_ref().clone())
        .unwrap_or_else(|| "cachegate:".into());
    if prefix.len() > 64 || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        cx.err(
            span_of(&f.prefix),
            "store.prefix: at most 64 characters, no spaces or control characters",
        );
    }
    let timeout = cx.positive(
        &f.timeout,
        "store.timeout",
        Duration::from_millis(100),
        " (try \"100ms\")",
    );
    StoreConfig {
        backend,
        prefix,
        timeout,
    }
}

/// The `[upstream]` TLS settings: only with an `https://` URL.
fn compile_upstream_tls(cx: &mut Cx<'_>, up: &UpstreamFile, https: bool) -> UpstreamTls {
    if !https {
        unused(
            cx,
            &[
                (span_of(&up.tls_ca_file), "upstream.tls_ca_file"),
                (span_of(&up.tls_server_name), "upstream.tls_server_name"),
                (span_of(&up.tls_verify), "upstream.tls_verify"),
            ],
            ": only used with an https:// upstream.url",
        );
        return UpstreamTls::default();
    }
    let server_name = up.tls_server_name.as_ref().and_then(|n| {
        match rustls::pki_types::ServerName::try_from(n.get_ref().as_str()) {
            Ok(_) => Some(n.get_ref().clone()),
            Err(_) => {
                cx.err(
                    n.span(),
                    format!(
                        "upstream.tls_server_name: {:?} is not a DNS name or IP address",
                        n.get_ref()
                    ),
                );
                None
            }
        }
    });
    UpstreamTls {
        ca: up
            .tls_ca_file
            .as_ref()
            .and_then(|p| pem_certificates(cx, p, "upstream.tls_ca_file")),
        server_name,
        verify: get(&up.tls_verify, true),
    }
}

/// Read a PEM file of certificates (at least one, all parseable).
fn pem_certificates(cx: &mut Cx<'_>, path: &Spanned<String>, key: &str) -> Option<Pem> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bytes = read_file(cx, path, key)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(c) if !c.is_empty() => Some(Pem(bytes)),
        Ok(_) => {
            cx.err(
                path.span(),
                format!(
                    "{key}: {:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.get_ref()
                ),
            );
            None
        }
        Err(e) => {
            cx.err(
                path.span(),
                format!("{key}: {:?} is not valid PEM: {e}", path.get_ref()),
            );
            None
        }
    }
}

/// Read a PEM private key file.
fn pem_private_key(cx: &mut Cx<'_>, path: &Spanned<String>, key: &str) -> Option<Pem> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let bytes = read_file(cx, path, key)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(_) => Some(Pem(bytes)),
        Err(e) => {
            cx.err(
                path.span(),
                format!(
                    "{key}: {:?} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                    path.get_ref()
                ),
            );
            None
        }
    }
}

fn read_file(cx: &mut Cx<'_>, path: &Spanned<String>, key: &str) -> Option<Vec<u8>> {
    match std::fs::read(path.get_ref()) {
        Ok(b) => Some(b),
        Err(e) => {
            cx.err(
                path.span(),
                format!("{key}: cannot read {:?}: {e}", path.get_ref()),
            );
            None
        }
    }
}

/// Which Redis: `url`, `sentinels` + `sentinel_master`, or `cluster_nodes`, exactly one of
/// them. Also says whether the target is spoken to over TLS.
fn redis_target(cx: &mut Cx<'_>, f: &StoreFile) -> (RedisTarget, bool) {
    let fallback = || RedisTarget::Url("redis://127.0.0.1:6379/0".to_string());
    let given: Vec<(&str, Range<usize>)> = [
        ("url", span_of(&f.url)),
        ("sentinels", span_of(&f.sentinels)),
        ("cluster_nodes", span_of(&f.cluster_nodes)),
    ]
    .into_iter()
    .filter(|(_, span)| *span != (0..0))
    .collect();
    if given.len() > 1 {
        let names: Vec<&str> = given.iter().map(|(n, _)| *n).collect();
        cx.err(
            given[1].1.clone(),
            format!(
                "store: {} are different ways to name Redis; set one of them",
                names.join(" and ")
            ),
        );
        return (fallback(), false);
    }
    if f.sentinels.is_none() {
        unused(
            cx,
            &[
                (span_of(&f.sentinel_master), "store.sentinel_master"),
                (
                    span_of(&f.sentinel_password_env),
                    "store.sentinel_password_env",
                ),
            ],
            ": only used with store.sentinels",
        );
    }
    if let Some(list) = &f.sentinels {
        let urls = redis_urls(cx, list, "store.sentinels");
        let master = match &f.sentinel_master {
            Some(m) if !m.get_ref().is_empty() => m.get_ref().clone(),
            _ => {
                cx.err(
                    list.span(),
                    "store.sentinels: also set sentinel_master, the name the sentinels monitor (e.g. \"mymaster\")",
                );
                String::new()
            }
        };
        let password = f
            .sentinel_password_env
            .as_ref()
            .and_then(|name| cx.secret(name, "store.sentinel_password_env"));
        let tls = urls.first().is_some_and(|u| is_tls(u));
        if urls.iter().any(|u| is_tls(u) != tls) {
            cx.err(
                list.span(),
                "store.sentinels: use rediss:// for all of them or for none",
            );
        }
        return (
            RedisTarget::Sentinel {
                sentinels: urls,
                master,
                password,
            },
            tls,
        );
    }
    if let Some(list) = &f.cluster_nodes {
        let urls = redis_urls(cx, list, "store.cluster_nodes");
        cx.err(
            list.span(),
            "store.cluster_nodes: Redis Cluster is not supported by this version; use url (one server) or sentinels (a failover pair)",
        );
        let tls = urls.first().is_some_and(|u| is_tls(u));
        if urls.iter().any(|u| is_tls(u) != tls) {
            cx.err(
                list.span(),
                "store.cluster_nodes: use rediss:// for all of them or for none",
            );
        }
        return (RedisTarget::Cluster { nodes: urls }, tls);
    }
    match &f.url {
        Some(u) => {
            validate_redis_url(cx, u.get_ref(), u.span(), "store.url");
            (RedisTarget::Url(u.get_ref().clone()), is_tls(u.get_ref()))
        }
        None => (fallback(), false),
    }
}

fn is_tls(url: &str) -> bool {
    url.get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
}

/// A non-empty list of Redis URLs, each checked.
fn redis_urls(cx: &mut Cx<'_>, list: &Spanned<Vec<Spanned<String>>>, key: &str) -> Vec<String> {
    if list.get_ref().is_empty() {
        cx.err(list.span(), format!("{key}: list at least one node"));
    }
    list.get_ref()
        .iter()
        .map(|u| {
            validate_redis_url(cx, u.get_ref(), u.span(), key);
            u.get_ref().clone()
        })
        .collect()
}

/// The `tls_*` files of `[store]`: only with a TLS target.
fn redis_tls(cx: &mut Cx<'_>, f: &StoreFile, tls: bool) -> RedisTls {
    if !tls {
        unused(
            cx,
            &[
                (span_of(&f.tls_ca_file), "store.tls_ca_file"),
                (span_of(&f.tls_cert_file), "store.tls_cert_file"),
                (span_of(&f.tls_key_file), "store.tls_key_file"),
            ],
            ": only used when Redis is reached over TLS (rediss://)",
        );
        return RedisTls::default();
    }
    let ca = f
        .tls_ca_file
        .as_ref()
        .and_then(|p| pem_certificates(cx, p, "store.tls_ca_file"));
    let client = match (&f.tls_cert_file, &f.tls_key_file) {
        (Some(c), Some(k)) => {
            let cert = pem_certificates(cx, c, "store.tls_cert_file");
            let key = pem_private_key(cx, k, "store.tls_key_file");
            cert.zip(key)
        }
        (Some(c), None) => {
            cx.err(c.span(), "store.tls_cert_file: also set tls_key_file");
            None
        }
        (None, Some(k)) => {
            cx.err(k.span(), "store.tls_key_file: also set tls_cert_file");
            None
        }
        (None, None) => None,
    };
    RedisTls {
        ca: ca.map(|p| p.0),
        client: client.map(|(c, k)| (c.0, k.0)),
    }
}

fn validate_redis_url(cx: &mut Cx<'_>, url: &str, span: Range<usize>, key: &str) {
    let lower = url.to_ascii_lowercase();
    if !lower.starts_with("redis://")
        && !lower.starts_with("rediss://")
        && !lower.starts_with("redis+unix://")
        && !lower.starts_with("unix://")
    {
        cx.err(
            span,
            format!("{key}: {url:?} is not a Redis URL (try \"redis://127.0.0.1:6379/0\")"),
        );
        return;
    }
    // A password written into the file would end up in backups and version control.
    if let Some(rest) = lower
        .strip_prefix("redis://")
        .or_else(|| lower.strip_prefix("rediss://"))
        && let Some(userinfo) = rest
            .split('/')
            .next()
            .and_then(|a| a.rsplit_once('@'))
            .map(|(u, _)| u)
        && userinfo.contains(':')
    {
        cx.err(
            span,
            format!(
                "{key}: must not contain a password; put it in an environment variable and name it in store.password_env"
            ),
        );
        return;
    }
    // The client library's own parser: what it refuses here it would refuse at start.
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
        cx.err(
            span,
            format!("{key}: {url:?} is not a valid Redis URL: {e}"),
        );
    }
}

/// A list of header names, lower-cased, sorted, without duplicates; bad ones reported.
fn header_names(cx: &mut Cx<'_>, list: &[Spanned<String>], key: &str) -> Vec<HeaderName> {
    let mut out = Vec::with_capacity(list.len());
    for v in list {
        match HeaderName::from_bytes(v.get_ref().to_ascii_lowercase().as_bytes()) {
            Ok(name) => out.push(name),
            Err(_) => cx.err(
                v.span(),
                format!("{key} {:?} is not a header name", v.get_ref()),
            ),
        }
    }
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    out
}

fn compile_cache(cx: &mut Cx<'_>, f: &CacheFile) -> CacheConfig {
    let mut max_object_size = get(&f.max_object_size, 1 << 20);
    if max_object_size > 512 << 20 {
        cx.err(
            span_of(&f.max_object_size),
            "cache.max_object_size: at most 512MiB (an entry is held in memory while it is stored)",
        );
        max_object_size = 1 << 20;
    }
    let statuses = match &f.statuses {
        None => StatusSet::new(&DEFAULT_STATUSES),
        Some(list) => {
            let mut codes = Vec::new();
            for c in list.get_ref() {
                let v = *c.get_ref();
                if !(100..=599).contains(&v) || v == 206 {
                    cx.err(
                        c.span(),
                        format!("cache.statuses: {v} cannot be cached (use final statuses 100-599 other than 206)"),
                    );
                    continue;
                }
                codes.push(v as u16);
            }
            StatusSet::new(&codes)
        }
    };
    let credential_headers = match &f.credential_headers {
        None => DEFAULT_CREDENTIAL_HEADERS
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect(),
        Some(list) => header_names(cx, list.get_ref(), "cache.credential_headers:"),
    };
    CacheConfig {
        max_object_size: max_object_size as usize,
        statuses,
        lock_timeout: get(&f.lock_timeout, Duration::from_secs(5)),
        distributed_lock: get(&f.distributed_lock, false),
        honor_client_no_cache: get(&f.honor_client_no_cache, false),
        credential_headers,
        l1_max_bytes: get(&f.l1_max_bytes, 64 << 20),
        l1_serve_disconnected: get(&f.l1_serve_disconnected, Duration::ZERO),
    }
}

fn compile_auth(cx: &mut Cx<'_>, f: Option<&Spanned<AuthFile>>) -> AuthConfig {
    let empty = AuthFile::default();
    let (f, table_span) = match f {
        Some(s) => (s.get_ref(), s.span()),
        None => (&empty, 0..0),
    };
    let default = match get(&f.default, DefaultPolicy::None) {
        DefaultPolicy::None => Policy::None,
        DefaultPolicy::Required => Policy::Required,
    };
    let template_text = f
        .session_key
        .as_ref()
        .map(|t| t.get_ref().as_str())
        .unwrap_or("user_token:{sub}");
    let template = match SessionTemplate::parse(template_text) {
        Ok(t) => t,
        Err(m) => {
            cx.err(
                span_of(&f.session_key),
                format!("auth.session_key {template_text:?}: {m}"),
            );
            SessionTemplate::parse("user_token:{sub}").expect("the default template parses")
        }
    };
    let subject_claim = match &f.subject_claim {
        Some(c) => {
            if !template.claims().any(|n| n == c.get_ref()) {
                cx.err(
                    c.span(),
                    format!(
                        "auth.subject_claim: {:?} is not named by session_key {template_text:?}",
                        c.get_ref()
                    ),
                );
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
                cx.err(
                    span_of(&f.session_key),
                    "auth.session_key names several claims: set auth.subject_claim to the one that identifies the user",
                );
                "sub".to_string()
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
    let mut secret = f
        .jwt_secret_env
        .as_ref()
        .and_then(|name| cx.secret(name, "auth.jwt_secret_env"));
    // A secret in a file (a mounted Kubernetes secret, say) is read again by every reload:
    // rotate it by replacing the file and reloading.
    let secret_name = f.jwt_secret_env.as_ref().or(f.jwt_secret_file.as_ref());
    if let Some(path) = &f.jwt_secret_file {
        if f.jwt_secret_env.is_some() {
            cx.err(
                path.span(),
                "auth: set jwt_secret_env or jwt_secret_file, not both",
            );
        } else {
            match std::fs::read_to_string(path.get_ref()) {
                Ok(text) => {
                    let text = text.trim_end_matches(['\r', '\n']).to_string();
                    if text.is_empty() {
                        cx.err(
                            path.span(),
                            format!("auth.jwt_secret_file: {:?} is empty", path.get_ref()),
                        );
                    } else {
                        secret = Some(text);
                    }
                }
                Err(e) => cx.err(
                    path.span(),
                    format!(
                        "auth.jwt_secret_file: cannot read {:?}: {e}",
                        path.get_ref()
                    ),
                ),
            }
        }
    }
    let pem = match &f.jwt_public_key_file {
        Some(path) => match std::fs::read(path.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                cx.err(
                    path.span(),
                    format!(
                        "auth.jwt_public_key_file: cannot read {:?}: {e}",
                        path.get_ref()
                    ),
                );
                None
            }
        },
        None => None,
    };
    let allow_weak = get(&f.allow_weak_jwt_secret, false);
    let mut weak_secret = false;
    if let (Some(s), Some(name)) = (&secret, secret_name)
        && s.len() < MIN_JWT_SECRET
    {
        if allow_weak {
            weak_secret = true;
        } else {
            let key = if f.jwt_secret_env.is_some() {
                "auth.jwt_secret_env"
            } else {
                "auth.jwt_secret_file"
            };
            cx.err(
                name.span(),
                format!(
                    "{key}: the secret in {} is {} bytes; an HS secret needs at least {MIN_JWT_SECRET} (to front an API that already signs with this secret, set auth.allow_weak_jwt_secret = true)",
                    name.get_ref(),
                    s.len()
                ),
            );
        }
    }
    let key = match (&secret, &pem) {
        (Some(_), Some(_)) => {
            cx.err(
                span_of(&f.jwt_public_key_file),
                "auth: set jwt_secret_env or jwt_secret_file (HS*), or jwt_public_key_file (RS*/ES*), not both",
            );
            KeySource::None
        }
        (Some(s), None) if weak_secret => KeySource::WeakSecret(s.as_bytes()),
        (Some(s), None) if s.len() >= MIN_JWT_SECRET => KeySource::Secret(s.as_bytes()),
        (Some(_), None) => KeySource::None,
        (None, Some(p)) => KeySource::PublicPem(p),
        (None, None) => KeySource::None,
    };
    let leeway = get(&f.leeway, Duration::from_secs(30));
    let verifier = Verifier::new(
        &algorithms,
        key,
        leeway.as_secs(),
        f.audience.as_ref().map(|t| t.get_ref().as_str()),
        f.issuer.as_ref().map(|t| t.get_ref().as_str()),
    )
    .unwrap_or_else(|m| {
        cx.err(alg_span, format!("auth.algorithms: {m}"));
        Verifier::new(&["HS256".into()], KeySource::None, 0, None, None)
            .expect("the fallback verifier builds")
    });
    let on_store_error = match get(&f.on_store_error, OnStoreErrorFile::Reject) {
        OnStoreErrorFile::Reject => OnStoreError::Reject,
        OnStoreErrorFile::Allow => OnStoreError::Allow,
    };
    let header_text = f
        .subject_header
        .as_ref()
        .map(|t| t.get_ref().as_str())
        .unwrap_or("x-auth-subject");
    let subject_header = HeaderName::from_bytes(header_text.to_ascii_lowercase().as_bytes())
        .unwrap_or_else(|_| {
            cx.err(
                span_of(&f.subject_header),
                format!("auth.subject_header: {header_text:?} is not a header name"),
            );
            HeaderName::from_static("x-auth-subject")
        });
    let login = f.login.as_ref().and_then(|l| {
        let span = l.span();
        let l = l.get_ref();
        let Some(path) = &l.path else {
            cx.err(span, "auth.login.path is required (e.g. \"/login\")");
            return None;
        };
        let token_pointer = match &l.token_pointer {
            None => "/access_token".into(),
            Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
            Some(p) => {
                cx.err(
                    p.span(),
                    "auth.login.token_pointer: a JSON pointer starts with '/' (e.g. \"/access_token\")",
                );
                "/access_token".into()
            }
        };
        Some(LoginConfig {
            path: endpoint_path(cx, path, "auth.login.path"),
            method: method(cx, &l.method, "auth.login.method"),
            token_pointer,
            default_ttl: get(&l.default_ttl, Duration::from_secs(3600)),
            max_body: get(&l.max_body, 64 << 10) as usize,
        })
    });
    let logout = f.logout.as_ref().and_then(|l| {
        let span = l.span();
        let l = l.get_ref();
        let Some(path) = &l.path else {
            cx.err(span, "auth.logout.path is required (e.g. \"/logout\")");
            return None;
        };
        Some(LogoutConfig {
            path: endpoint_path(cx, path, "auth.logout.path"),
            method: method(cx, &l.method, "auth.logout.method"),
        })
    });
    AuthConfig {
        default,
        gate: Gate::new(verifier, template, subject_claim),
        on_store_error,
        retry_after: get(&f.retry_after, Duration::from_secs(5)),
        subject_header,
        login,
        logout,
        weak_secret,
    }
}

fn endpoint_path(cx: &mut Cx<'_>, t: &Spanned<String>, key: &str) -> String {
    match crate::normalize::canonical_path(t.get_ref()) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            cx.err(t.span(), format!("{key}: {:?}: {e}", t.get_ref()));
            t.get_ref().clone()
        }
    }
}

fn method(cx: &mut Cx<'_>, t: &Val<String>, key: &str) -> http::Method {
    match t {
        None => http::Method::POST,
        Some(m) => http::Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes())
            .unwrap_or_else(|_| {
                cx.err(
                    m.span(),
                    format!("{key}: {:?} is not a method", m.get_ref()),
                );
                http::Method::POST
            }),
    }
}

fn compile_admin(cx: &mut Cx<'_>, f: &AdminFile) -> AdminConfig {
    let token = f.token_env.as_ref().and_then(|name| {
        let token = cx.secret(name, "admin.token_env")?;
        if token.len() < 16 {
            cx.err(
                name.span(),
                "admin.token_env: the admin token must be at least 16 characters",
            );
            return None;
        }
        Some(token)
    });
    AdminConfig { token }
}

fn compile_rules(
    cx: &mut Cx<'_>,
    rules: &[Spanned<RuleFile>],
    default_auth: Policy,
    credentials: &[HeaderName],
) -> RuleTable {
    let mut compiled: Vec<Rule> = Vec::with_capacity(rules.len());
    let mut match_spans = Vec::with_capacity(rules.len());
    for r in rules {
        if let Some((rule, span)) = compile_rule(cx, r, default_auth, credentials, &compiled) {
            compiled.push(rule);
            match_spans.push(span);
        }
    }
    match RuleTable::build(compiled.clone()) {
        Ok(t) => t,
        Err((index, message)) => {
            cx.err(match_spans[index].clone(), message);
            // Leave out the rule that could not be placed; the rest still compile.
            compiled.remove(index);
            RuleTable::build(compiled).unwrap_or_else(|_| RuleTable::empty())
        }
    }
}

fn compile_rule(
    cx: &mut Cx<'_>,
    r: &Spanned<RuleFile>,
    default_auth: Policy,
    credentials: &[HeaderName],
    earlier: &[Rule],
) -> Option<(Rule, Range<usize>)> {
    let table_span = r.span();
    let r = r.get_ref();
    let Some(name) = &r.name else {
        cx.err(
            table_span,
            "[[rule]] needs a name (it labels metrics and logs)",
        );
        return None;
    };
    let rule_name = name.get_ref().as_str();
    if let Err(m) = crate::routing::validate_rule_name(rule_name) {
        cx.err(name.span(), m);
    }
    if earlier.iter().any(|s| &*s.name == rule_name) {
        cx.err(
            name.span(),
            format!("rule {rule_name:?}: the name is used by another rule"),
        );
    }
    let Some(template) = &r.match_ else {
        cx.err(
            table_span,
            format!("rule {rule_name:?}: `match` is required (e.g. match = \"/user/{{id}}\")"),
        );
        return None;
    };
    let route = match crate::routing::path_template(template.get_ref()) {
        Ok(t) => t,
        Err(m) => {
            cx.err(
                template.span(),
                format!("rule {rule_name:?}: match {:?}: {m}", template.get_ref()),
            );
            return None;
        }
    };
    let query = match r.query.as_ref().map(|q| q.get_ref()) {
        None | Some(QueryFile::Sorted) => QueryPolicy::Sorted,
        Some(QueryFile::Ignore) => QueryPolicy::Ignore,
        Some(QueryFile::Keep(names)) => {
            if names
                .iter()
                .any(|n| n.get_ref().is_empty() || n.get_ref().len() > 128)
            {
                cx.err(
                    span_of(&r.query),
                    format!("rule {rule_name:?}: query names must be 1 to 128 characters"),
                );
            }
            let names: Vec<String> = names.iter().map(|n| n.get_ref().clone()).collect();
            QueryPolicy::keep(&names)
        }
    };
    let mut vary = Vec::new();
    for v in r.vary.iter().flat_map(|l| l.get_ref()) {
        let Ok(name) = HeaderName::from_bytes(v.get_ref().to_ascii_lowercase().as_bytes()) else {
            cx.err(
                v.span(),
                format!(
                    "rule {rule_name:?}: vary {:?} is not a header name",
                    v.get_ref()
                ),
            );
            continue;
        };
        if name == http::header::AUTHORIZATION || name == http::header::COOKIE {
            cx.err(
                v.span(),
                format!("rule {rule_name:?}: vary on {name} would key entries by a secret; use scope = \"user\" instead"),
            );
            continue;
        }
        vary.push(name);
    }
    vary.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    vary.dedup();
    let unkeyed_ok = get(&r.fill_headers_unkeyed_ok, false);
    let mut fill_headers = Vec::new();
    for v in r.fill_headers.iter().flat_map(|l| l.get_ref()) {
        let Ok(name) = HeaderName::from_bytes(v.get_ref().to_ascii_lowercase().as_bytes()) else {
            cx.err(
                v.span(),
                format!(
                    "rule {rule_name:?}: fill_headers: {:?} is not a header name",
                    v.get_ref()
                ),
            );
            continue;
        };
        let why = crate::fields::never_filled(&name).or_else(|| {
            credentials
                .contains(&name)
                .then_some("a credential is never sent on a fill (scope = \"user\" forwards the user's own Authorization)")
        });
        if let Some(why) = why {
            cx.err(
                v.span(),
                format!("rule {rule_name:?}: fill_headers {:?}: {why}", v.get_ref()),
            );
            continue;
        }
        if !vary.contains(&name) && !unkeyed_ok {
            cx.err(
                v.span(),
                format!(
                    "rule {rule_name:?}: fill_headers {:?} is not in vary, so one client's value would shape the entry every client gets; add it to vary, or set fill_headers_unkeyed_ok = true to accept that risk",
                    v.get_ref()
                ),
            );
            continue;
        }
        fill_headers.push(name);
    }
    fill_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    fill_headers.dedup();
    let mut tag_list = |list: &Val<Vec<Spanned<String>>>, key: &str| -> Vec<TagTemplate> {
        let mut out = Vec::new();
        for t in list.iter().flat_map(|l| l.get_ref()) {
            match TagTemplate::parse(t.get_ref(), &route) {
                Ok(tag) => out.push(tag),
                Err(m) => cx.err(
                    t.span(),
                    format!("rule {rule_name:?}: {key} {:?}: {m}", t.get_ref()),
                ),
            }
        }
        out
    };
    let tags = tag_list(&r.tags, "tag");
    let purge = tag_list(&r.purge, "purge tag");
    let auth = get(&r.auth, default_auth);
    let scope = match r.scope.as_ref().map(|s| *s.get_ref()) {
        None if auth == Policy::Required => Scope::User,
        None => Scope::Anonymous,
        Some(ScopeFile::Public) => Scope::Public,
        Some(ScopeFile::User) if auth == Policy::None => {
            cx.err(
                span_of(&r.scope),
                format!("rule {rule_name:?}: scope \"user\" needs auth = \"required\" or \"optional\" (there is no verified subject to scope by)"),
            );
            Scope::Anonymous
        }
        Some(ScopeFile::User) => Scope::User,
    };
    let ttl = r
        .ttl
        .as_ref()
        .map(|t| *t.get_ref())
        .filter(|d| !d.is_zero());
    let rule = Rule {
        index: 0,
        name: Arc::from(rule_name),
        template: route,
        ttl,
        query,
        vary,
        fill_headers,
        tags,
        purge,
        stale_while_revalidate: get(&r.stale_while_revalidate, Duration::ZERO),
        stale_if_error: get(&r.stale_if_error, Duration::ZERO),
        origin_cache_control: get(&r.origin_cache_control, OriginCacheControl::Respect),
        auth,
        scope,
    };
    Some((rule, template.span()))
}

/// The rule table as `cachegate check` prints it.
pub fn describe(rules: &RuleTable) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if rules.rules().is_empty() {
        out.push_str("no rules: every request is proxied untouched\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:<28} {:<8} {:<10} {:<9} {:<10} tags",
        "rule", "match", "ttl", "query", "auth", "scope"
    );
    for r in rules.rules() {
        let ttl = r.ttl.map(format_duration).unwrap_or_else(|| "-".into());
        let query = match &r.query {
            QueryPolicy::Sorted => "sorted".to_string(),
            QueryPolicy::Ignore => "ignore".to_string(),
            QueryPolicy::Keep(n) => n.join(","),
        };
        let tags: Vec<&str> = r.tags.iter().map(|t| t.source()).collect();
        let _ = write!(
            out,
            "{:<16} {:<28} {:<8} {:<10} {:<9} {:<10} {}",
            r.name,
            r.template.source,
            ttl,
            query,
            r.auth.as_str(),
            r.scope.as_str(),
            tags.join(",")
        );
        if !r.vary.is_empty() {
            let vary: Vec<&str> = r.vary.iter().map(|h| h.as_str()).collect();
            let _ = write!(out, "  vary={}", vary.join(","));
        }
        if !r.stale_while_revalidate.is_zero() {
            let _ = write!(out, "  swr={}", format_duration(r.stale_while_revalidate));
        }
        if !r.stale_if_error.is_zero() {
            let _ = write!(out, "  sie={}", format_duration(r.stale_if_error));
        }
        if r.origin_cache_control != OriginCacheControl::Respect {
            let _ = write!(out, "  origin={}", r.origin_cache_control.as_str());
        }
        if !r.purge.is_empty() {
            let purge: Vec<&str> = r.purge.iter().map(|t| t.source()).collect();
            let _ = write!(out, "  purge={}", purge.join(","));
        }
        out.push('\n');
    }
    out
}
