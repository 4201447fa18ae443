//! The TOML file as written by the operator, read into typed values with the position of
//! each: enums (`backend = "redis"`), durations, sizes, addresses, lists.
//!
//! The file is parsed by the `toml` crate into a spanned document, then read table by
//! table against the known keys. Every problem (an unknown key, a value of the wrong type,
//! a word that is not one of the choices, a malformed duration) is collected with its
//! position rather than stopping at the first, so `cachegate check` lists them all. Nothing
//! here is seen by the engine: `compile` turns it into a validated `Config`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::units;
use crate::cache::policy::OriginCacheControl;
use crate::routing::Policy;

/// A value with its position in the file.
pub type Val<T> = Option<Spanned<T>>;

/// A problem found in the file: where, and what.
pub type Problem = (Range<usize>, String);

/// A word that must be one of a fixed set (`backend = "redis"`).
pub trait Choice: Sized + Copy + 'static {
    /// "a backend", "a policy"...
    const WHAT: &'static str;
    const CHOICES: &'static [(&'static str, Self)];
}

/// `store.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

impl Choice for Backend {
    const WHAT: &'static str = "a backend";
    const CHOICES: &'static [(&'static str, Self)] =
        &[("memory", Backend::Memory), ("redis", Backend::Redis)];
}

impl Choice for Policy {
    const WHAT: &'static str = "a policy";
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("none", Policy::None),
        ("required", Policy::Required),
        ("optional", Policy::Optional),
    ];
}

/// `auth.default`: the policy of paths no rule matches (never "optional").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    None,
    Required,
}

impl Choice for DefaultPolicy {
    const WHAT: &'static str = "a policy";
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("none", DefaultPolicy::None),
        ("required", DefaultPolicy::Required),
    ];
}

/// `rule.scope` as written (anonymous sharing is what no scope means).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeFile {
    Public,
    User,
}

impl Choice for ScopeFile {
    const WHAT: &'static str = "a scope";
    const CHOICES: &'static [(&'static str, Self)] =
        &[("public", ScopeFile::Public), ("user", ScopeFile::User)];
}

/// `auth.on_store_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreErrorFile {
    Reject,
    Allow,
}

impl Choice for OnStoreErrorFile {
    const WHAT: &'static str = "a choice";
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("reject", OnStoreErrorFile::Reject),
        ("allow", OnStoreErrorFile::Allow),
    ];
}

impl Choice for OriginCacheControl {
    const WHAT: &'static str = "a mode";
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("respect", OriginCacheControl::Respect),
        ("only", OriginCacheControl::Only),
        ("override", OriginCacheControl::Override),
    ];
}

/// `query = "sorted" | "ignore" | ["page", "size"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryFile {
    Sorted,
    Ignore,
    Keep(Vec<Spanned<String>>),
}

#[derive(Debug, Default)]
pub struct FileConfig {
    pub server: ServerFile,
    pub upstream: Option<Spanned<UpstreamFile>>,
    pub store: StoreFile,
    pub cache: CacheFile,
    pub auth: Option<Spanned<AuthFile>>,
    pub admin: AdminFile,
    pub rules: Vec<Spanned<RuleFile>>,
}

#[derive(Debug, Default)]
pub struct ServerFile {
    pub listen: Val<SocketAddr>,
    pub admin_listen: Val<SocketAddr>,
    pub shutdown_grace: Val<Duration>,
    pub header_read_timeout: Val<Duration>,
    pub idle_timeout: Val<Duration>,
    pub body_read_timeout: Val<Duration>,
    pub max_connections: Val<i64>,
    pub max_header_count: Val<i64>,
    pub max_header_bytes: Val<u64>,
    pub access_log: Val<bool>,
}

#[derive(Debug, Default)]
pub struct UpstreamFile {
    pub url: Val<String>,
    pub connect_timeout: Val<Duration>,
    pub timeout: Val<Duration>,
    pub pool_idle_timeout: Val<Duration>,
    pub pool_max_idle: Val<i64>,
    pub tls_ca_file: Val<String>,
    pub tls_server_name: Val<String>,
    pub tls_verify: Val<bool>,
}

#[derive(Debug, Default)]
pub struct StoreFile {
    pub backend: Val<Backend>,
    pub max_bytes: Val<u64>,
    pub url: Val<String>,
    pub password_env: Val<String>,
    pub prefix: Val<String>,
    pub timeout: Val<Duration>,
    pub tls_ca_file: Val<String>,
    pub tls_cert_file: Val<String>,
    pub tls_key_file: Val<String>,
    pub sentinels: Val<Vec<Spanned<String>>>,
    pub sentinel_master: Val<String>,
    pub sentinel_password_env: Val<String>,
    pub cluster_nodes: Val<Vec<Spanned<String>>>,
}

#[derive(Debug, Default)]
pub struct CacheFile {
    pub max_object_size: Val<u64>,
    pub lock_timeout: Val<Duration>,
    pub distributed_lock: Val<bool>,
    pub honor_client_no_cache: Val<bool>,
    pub statuses: Val<Vec<Spanned<i64>>>,
    pub credential_headers: Val<Vec<Spanned<String>>>,
    pub l1_max_bytes: Val<u64>,
    pub l1_serve_disconnected: Val<Duration>,
}

#[derive(Debug, Default)]
pub struct AuthFile {
    pub default: Val<DefaultPolicy>,
    pub session_key: Val<String>,
    pub subject_claim: Val<String>,
    pub jwt_secret_env: Val<String>,
    pub jwt_secret_file: Val<String>,
    pub jwt_public_key_file: Val<String>,
    pub algorithms: Val<Vec<Spanned<String>>>,
    pub allow_weak_jwt_secret: Val<bool>,
    pub leeway: Val<Duration>,
    pub audience: Val<String>,
    pub issuer: Val<String>,
    pub on_store_error: Val<OnStoreErrorFile>,
    pub retry_after: Val<Duration>,
    pub subject_header: Val<String>,
    pub login: Option<Spanned<LoginFile>>,
    pub logout: Option<Spanned<LogoutFile>>,
}

#[derive(Debug, Default)]
pub struct LoginFile {
    pub path: Val<String>,
    pub method: Val<String>,
    pub token_pointer: Val<String>,
    pub default_ttl: Val<Duration>,
    pub max_body: Val<u64>,
}

#[derive(Debug, Default)]
pub struct LogoutFile {
    pub path: Val<String>,
    pub method: Val<String>,
}

#[derive(Debug, Default)]
pub struct AdminFile {
    pub token_env: Val<String>,
}

#[derive(Debug, Default)]
pub struct RuleFile {
    pub name: Val<String>,
    pub match_: Val<String>,
    pub ttl: Val<Duration>,
    pub query: Val<QueryFile>,
    pub vary: Val<Vec<Spanned<String>>>,
    pub fill_headers: Val<Vec<Spanned<String>>>,
    pub fill_headers_unkeyed_ok: Val<bool>,
    pub tags: Val<Vec<Spanned<String>>>,
    pub purge: Val<Vec<Spanned<String>>>,
    pub stale_while_revalidate: Val<Duration>,
    pub stale_if_error: Val<Duration>,
    pub origin_cache_control: Val<OriginCacheControl>,
    pub auth: Val<Policy>,
    pub scope: Val<ScopeFile>,
}

/// Parse the text and read it: the file's values, and every problem found on the way. A
/// syntax error (`Err`) leaves nothing to read.
pub fn read(text: &str) -> Result<(FileConfig, Vec<Problem>), Problem> {
    let mut problems = Vec::new();
    let doc = DeTable::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        (span, e.message().trim_end().to_string())
    })?;
    let span = doc.span();
    let mut root = Table::new(
        doc.into_inner(),
        span,
        Prefix::Section(String::new()),
        &mut problems,
    );
    let server = root.table("server").map(|t| read_server(t).into_inner());
    let upstream = root.table("upstream").map(read_upstream);
    let store = root.table("store").map(|t| read_store(t).into_inner());
    let cache = root.table("cache").map(|t| read_cache(t).into_inner());
    let auth = root.table("auth").map(read_auth);
    let admin = root.table("admin").map(|t| {
        let mut t = t;
        let token_env = t.string("token_env");
        t.finish(&["token_env"]);
        AdminFile { token_env }
    });
    let rules = root
        .array_of_tables("rule")
        .into_iter()
        .map(|(t, span)| read_rule(Table::new(t, span, Prefix::UnnamedRule, root.problems)))
        .collect();
    root.finish(&[
        "server", "upstream", "store", "cache", "auth", "admin", "rule",
    ]);
    let config = FileConfig {
        server: server.unwrap_or_default(),
        upstream,
        store: store.unwrap_or_default(),
        cache: cache.unwrap_or_default(),
        auth,
        admin: admin.unwrap_or_default(),
        rules,
    };
    Ok((config, problems))
}

fn read_server(mut t: Table<'_, '_>) -> Spanned<ServerFile> {
    let f = ServerFile {
        listen: t.addr("listen"),
        admin_listen: t.addr("admin_listen"),
        shutdown_grace: t.duration("shutdown_grace"),
        header_read_timeout: t.duration("header_read_timeout"),
        idle_timeout: t.duration("idle_timeout"),
        body_read_timeout: t.duration("body_read_timeout"),
        max_connections: t.integer("max_connections"),
        max_header_count: t.integer("max_header_count"),
        max_header_bytes: t.size("max_header_bytes"),
        access_log: t.boolean("access_log"),
    };
    t.done(
        f,
        &[
            "listen",
            "admin_listen",
            "shutdown_grace",
            "header_read_timeout",
            "idle_timeout",
            "body_read_timeout",
            "max_connections",
            "max_header_count",
            "max_header_bytes",
            "access_log",
        ],
    )
}

fn read_upstream(mut t: Table<'_, '_>) -> Spanned<UpstreamFile> {
    let f = UpstreamFile {
        url: t.string("url"),
        connect_timeout: t.duration("connect_timeout"),
        timeout: t.duration("timeout"),
        pool_idle_timeout: t.duration("pool_idle_timeout"),
        pool_max_idle: t.integer("pool_max_idle"),
        tls_ca_file: t.string("tls_ca_file"),
        tls_server_name: t.string("tls_server_name"),
        tls_verify: t.boolean("tls_verify"),
    };
    t.done(
        f,
        &[
            "url",
            "connect_timeout",
            "timeout",
            "pool_idle_timeout",
            "pool_max_idle",
            "tls_ca_file",
            "tls_server_name",
            "tls_verify",
        ],
    )
}

fn read_store(mut t: Table<'_, '_>) -> Spanned<StoreFile> {
    let f = StoreFile {
        backend: t.choice("backend"),
        max_bytes: t.size("max_bytes"),
        url: t.string("url"),
        password_env: t.string("password_env"),
        prefix: t.string("prefix"),
        timeout: t.duration("timeout"),
        tls_ca_file: t.string("tls_ca_file"),
        tls_cert_file: t.string("tls_cert_file"),
        tls_key_file: t.string("tls_key_file"),
        sentinels: t.strings("sentinels"),
        sentinel_master: t.string("sentinel_master"),
        sentinel_password_env: t.string("sentinel_password_env"),
        cluster_nodes: t.strings("cluster_nodes"),
    };
    t.done(
        f,
        &[
            "backend",
            "max_bytes",
            "url",
            "password_env",
            "prefix",
            "timeout",
            "tls_ca_file",
            "tls_cert_file",
            "tls_key_file",
            "sentinels",
            "sentinel_master",
            "sentinel_password_env",
            "cluster_nodes",
        ],
    )
}

fn read_cache(mut t: Table<'_, '_>) -> Spanned<CacheFile> {
    let f = CacheFile {
        max_object_size: t.size("max_object_size"),
        lock_timeout: t.duration("lock_timeout"),
        distributed_lock: t.boolean("distributed_lock"),
        honor_client_no_cache: t.boolean("honor_client_no_cache"),
        statuses: t.integers("statuses"),
        credential_headers: t.strings("credential_headers"),
        l1_max_bytes: t.size("l1_max_bytes"),
        l1_serve_disconnected: t.duration("l1_serve_disconnected"),
    };
    t.done(
        f,
        &[
            "max_object_size",
            "lock_timeout",
            "distributed_lock",
            "honor_client_no_cache",
            "statuses",
            "credential_headers",
            "l1_max_bytes",
            "l1_serve_disconnected",
        ],
    )
}

fn read_auth(mut t: Table<'_, '_>) -> Spanned<AuthFile> {
    let login = t.table("login").map(|mut l| {
        let f = LoginFile {
            path: l.string("path"),
            method: l.string("method"),
            token_pointer: l.string("token_pointer"),
            default_ttl: l.duration("default_ttl"),
            max_body: l.size("max_body"),
        };
        l.done(
            f,
            &["path", "method", "token_pointer", "default_ttl", "max_body"],
        )
    });
    let logout = t.table("logout").map(|mut l| {
        let f = LogoutFile {
            path: l.string("path"),
            method: l.string("method"),
        };
        l.done(f, &["path", "method"])
    });
    let f = AuthFile {
        default: t.choice("default"),
        session_key: t.string("session_key"),
        subject_claim: t.string("subject_claim"),
        jwt_secret_env: t.string("jwt_secret_env"),
        jwt_secret_file: t.string("jwt_secret_file"),
        jwt_public_key_file: t.string("jwt_public_key_file"),
        algorithms: t.strings("algorithms"),
        allow_weak_jwt_secret: t.boolean("allow_weak_jwt_secret"),
        leeway: t.duration("leeway"),
        audience: t.string("audience"),
        issuer: t.string("issuer"),
        on_store_error: t.choice("on_store_error"),
        retry_after: t.duration("retry_after"),
        subject_header: t.string("subject_header"),
        login,
        logout,
    };
    t.done(
        f,
        &[
            "default",
            "session_key",
            "subject_claim",
            "jwt_secret_env",
            "jwt_secret_file",
            "jwt_public_key_file",
            "algorithms",
            "allow_weak_jwt_secret",
            "leeway",
            "audience",
            "issuer",
            "on_store_error",
            "retry_after",
            "subject_header",
            "login",
            "logout",
        ],
    )
}

fn read_rule(mut t: Table<'_, '_>) -> Spanned<RuleFile> {
    let name = t.string("name");
    if let Some(n) = &name {
        t.prefix = Prefix::Rule(n.get_ref().clone());
    }
    let query = t.take("query").and_then(|v| {
        let span = v.span();
        match v.into_inner() {
            DeValue::String(s) => match s.as_ref() {
                "sorted" => Some(Spanned::new(span, QueryFile::Sorted)),
                "ignore" => Some(Spanned::new(span, QueryFile::Ignore)),
                other => {
                    let message = format!(
                        "query {other:?} is not a policy (use \"sorted\", \"ignore\" or a list of parameter names)"
                    );
                    t.problem(span, t.prefix.plain(&message));
                    None
                }
            },
            DeValue::Array(items) => {
                let names = t.string_items("query", items);
                Some(Spanned::new(span, QueryFile::Keep(names)))
            }
            _ => {
                t.mismatch(span, "query", "\"sorted\", \"ignore\" or a list of parameter names");
                None
            }
        }
    });
    let f = RuleFile {
        name,
        match_: t.string("match"),
        ttl: t.duration("ttl"),
        query,
        vary: t.strings("vary"),
        fill_headers: t.strings("fill_headers"),
        fill_headers_unkeyed_ok: t.boolean("fill_headers_unkeyed_ok"),
        tags: t.strings("tags"),
        purge: t.strings("purge"),
        stale_while_revalidate: t.duration("stale_while_revalidate"),
        stale_if_error: t.duration("stale_if_error"),
        origin_cache_control: t.choice("origin_cache_control"),
        auth: t.choice("auth"),
        scope: t.choice("scope"),
    };
    t.done(
        f,
        &[
            "name",
            "match",
            "ttl",
            "query",
            "vary",
            "fill_headers",
            "fill_headers_unkeyed_ok",
            "tags",
            "purge",
            "stale_while_revalidate",
            "stale_if_error",
            "origin_cache_control",
            "auth",
            "scope",
        ],
    )
}

/// How the keys of a table are named in messages.
#[derive(Debug, Clone)]
pub enum Prefix {
    /// `server.listen: ...` (empty for the top level).
    Section(String),
    /// `rule "user": ttl ...`.
    Rule(String),
    /// `[[rule]]` before its name is known.
    UnnamedRule,
}

impl Prefix {
    /// `key` as messages name it, before a colon: `server.listen`, `rule "user": ttl`.
    fn key(&self, key: &str) -> String {
        match self {
            Prefix::Section(s) if s.is_empty() => key.to_string(),
            Prefix::Section(s) => format!("{s}.{key}"),
            Prefix::Rule(name) => format!("rule {name:?}: {key}"),
            Prefix::UnnamedRule => format!("rule: {key}"),
        }
    }

    /// A value's message: `server.timeout: "x" is not ...`, `rule "user": ttl "x" is not ...`.
    fn value(&self, key: &str, message: &str) -> String {
        match self {
            Prefix::Rule(_) | Prefix::UnnamedRule => format!("{} {message}", self.key(key)),
            Prefix::Section(_) => format!("{}: {message}", self.key(key)),
        }
    }

    /// A message about the table itself.
    fn plain(&self, message: &str) -> String {
        match self {
            Prefix::Rule(name) => format!("rule {name:?}: {message}"),
            _ => message.to_string(),
        }
    }
}

/// A key of a table and its value, until a reader takes it.
type Entry<'i> = (Spanned<Cow<'i, str>>, Option<Spanned<DeValue<'i>>>);

/// One table of the file being read: its entries, which were taken, and where to report.
pub struct Table<'i, 'p> {
    entries: Vec<Entry<'i>>,
    span: Range<usize>,
    prefix: Prefix,
    problems: &'p mut Vec<Problem>,
}

impl<'i, 'p> Table<'i, 'p> {
    fn new(
        table: DeTable<'i>,
        span: Range<usize>,
        prefix: Prefix,
        problems: &'p mut Vec<Problem>,
    ) -> Self {
        Table {
            entries: table.into_iter().map(|(k, v)| (k, Some(v))).collect(),
            span,
            prefix,
            problems,
        }
    }

    fn problem(&mut self, span: Range<usize>, message: String) {
        self.problems.push((span, message));
    }

    fn mismatch(&mut self, span: Range<usize>, key: &str, expected: &str) {
        let message = format!("{}: expected {expected}", self.prefix.key(key));
        self.problem(span, message);
    }

    /// Take a key's value (it is then known, whatever its type).
    fn take(&mut self, key: &str) -> Option<Spanned<DeValue<'i>>> {
        self.entries
            .iter_mut()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .and_then(|(_, v)| v.take())
    }

    /// Report every key no one took, like serde's `deny_unknown_fields`.
    fn finish(self, known: &[&str]) {
        let expected = known
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        for (k, v) in self.entries {
            if v.is_some() {
                let span = k.span();
                self.problems.push((
                    span,
                    format!(
                        "unknown field `{}`, expected one of {expected}",
                        k.get_ref()
                    ),
                ));
            }
        }
    }

    fn done<T>(self, value: T, known: &[&str]) -> Spanned<T> {
        let span = self.span.clone();
        self.finish(known);
        Spanned::new(span, value)
    }

    /// A sub-table (`[auth.login]`).
    fn table(&mut self, key: &str) -> Option<Table<'i, '_>> {
        let v = self.take(key)?;
        let span = v.span();
        match v.into_inner() {
            DeValue::Table(t) => {
                let prefix = Prefix::Section(self.prefix.key(key));
                Some(Table::new(t, span, prefix, self.problems))
            }
            _ => {
                self.mismatch(span, key, "a table");
                None
            }
        }
    }

    /// An array of tables (`[[rule]]`): each, with its span, to be read on its own.
    fn array_of_tables(&mut self, key: &str) -> Vec<(DeTable<'i>, Range<usize>)> {
        let Some(v) = self.take(key) else {
            return Vec::new();
        };
        let span = v.span();
        let DeValue::Array(items) = v.into_inner() else {
            self.mismatch(span, key, "an array of tables ([[rule]])");
            return Vec::new();
        };
        let mut tables = Vec::new();
        for item in items {
            let span = item.span();
            match item.into_inner() {
                DeValue::Table(t) => tables.push((t, span)),
                _ => self.mismatch(span, key, "a table"),
            }
        }
        tables
    }

    fn string(&mut self, key: &str) -> Val<String> {
        let v = self.take(key)?;
        let span = v.span();
        match v.into_inner() {
            DeValue::String(s) => Some(Spanned::new(span, s.into_owned())),
            _ => {
                self.mismatch(span, key, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, key: &str) -> Val<bool> {
        let v = self.take(key)?;
        let span = v.span();
        match v.into_inner() {
            DeValue::Boolean(b) => Some(Spanned::new(span, b)),
            _ => {
                self.mismatch(span, key, "true or false");
                None
            }
        }
    }

    fn integer(&mut self, key: &str) -> Val<i64> {
        let v = self.take(key)?;
        let span = v.span();
        match integer_of(v.get_ref()) {
            Some(n) => Some(Spanned::new(span, n)),
            None => {
                self.mismatch(span, key, "a whole number");
                None
            }
        }
    }

    /// A string parsed by `parse`, whose message is reported for the key when it fails.
    fn parsed<T>(
        &mut self,
        key: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Val<T> {
        let text = {
            let v = self.take(key)?;
            let span = v.span();
            match v.into_inner() {
                DeValue::String(s) => Spanned::new(span, s.into_owned()),
                _ => {
                    self.mismatch(span, key, expected);
                    return None;
                }
            }
        };
        match parse(text.get_ref()) {
            Ok(value) => Some(Spanned::new(text.span(), value)),
            Err(message) => {
                let message = self.prefix.value(key, &message);
                self.problem(text.span(), message);
                None
            }
        }
    }

    fn duration(&mut self, key: &str) -> Val<Duration> {
        self.parsed(
            key,
            "a duration string such as \"30s\" or \"5m\"",
            units::parse_duration,
        )
    }

    fn size(&mut self, key: &str) -> Val<u64> {
        self.parsed(key, "a size string such as \"1MiB\"", units::parse_size)
    }

    fn addr(&mut self, key: &str) -> Val<SocketAddr> {
        self.parsed(
            key,
            "an address string such as \"127.0.0.1:9091\"",
            |text| {
                text.parse().map_err(|_| {
                    format!(
                        "{text:?} is not an address (try \"0.0.0.0:8080\" or \"127.0.0.1:9091\")"
                    )
                })
            },
        )
    }

    fn choice<T: Choice>(&mut self, key: &str) -> Val<T> {
        let names: Vec<String> = T::CHOICES.iter().map(|(n, _)| format!("{n:?}")).collect();
        let listed = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.parsed(key, &format!("one of {listed}"), |text| {
            T::CHOICES
                .iter()
                .find(|(n, _)| *n == text)
                .map(|(_, v)| *v)
                .ok_or_else(|| format!("{text:?} is not {} (use {listed})", T::WHAT))
        })
    }

    fn string_items(
        &mut self,
        key: &str,
        items: impl IntoIterator<Item = Spanned<DeValue<'i>>>,
    ) -> Vec<Spanned<String>> {
        let mut out = Vec::new();
        for item in items {
            let span = item.span();
            match item.into_inner() {
                DeValue::String(s) => out.push(Spanned::new(span, s.into_owned())),
                _ => self.mismatch(span, key, "a list of strings"),
            }
        }
        out
    }

    fn strings(&mut self, key: &str) -> Val<Vec<Spanned<String>>> {
        let v = self.take(key)?;
        let span = v.span();
        match v.into_inner() {
            DeValue::Array(items) => {
                let out = self.string_items(key, items);
                Some(Spanned::new(span, out))
            }
            _ => {
                self.mismatch(span, key, "a list of strings");
                None
            }
        }
    }

    fn integers(&mut self, key: &str) -> Val<Vec<Spanned<i64>>> {
        let v = self.take(key)?;
        let span = v.span();
        match v.into_inner() {
            DeValue::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    let span = item.span();
                    match integer_of(item.get_ref()) {
                        Some(n) => out.push(Spanned::new(span, n)),
                        None => self.mismatch(span, key, "a list of whole numbers"),
                    }
                }
                Some(Spanned::new(span, out))
            }
            _ => {
                self.mismatch(span, key, "a list of whole numbers");
                None
            }
        }
    }
}

fn integer_of(v: &DeValue<'_>) -> Option<i64> {
    match v {
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
        _ => None,
    }
}
