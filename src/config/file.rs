//! The TOML file as written by the operator: serde types only, with spans kept for validation.
//!
//! Nothing here is seen by the engine; `config::compile` turns it into a validated `Config`.
//! Every table denies unknown keys so a typo fails the start instead of being ignored.

use serde::Deserialize;
use toml::Spanned;

/// A string value with its position in the file.
pub type Text = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    pub upstream: Option<Spanned<UpstreamFile>>,
    pub store: Option<StoreFile>,
    #[serde(default)]
    pub cache: CacheFile,
    pub auth: Option<Spanned<AuthFile>>,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub rule: Vec<Spanned<RuleFile>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub default: Option<Text>,
    pub session_key: Option<Text>,
    pub subject_claim: Option<Text>,
    pub jwt_secret_env: Option<Text>,
    pub jwt_public_key_file: Option<Text>,
    pub algorithms: Option<Spanned<Vec<Text>>>,
    pub allow_weak_jwt_secret: Option<bool>,
    pub leeway: Option<Text>,
    pub audience: Option<Text>,
    pub issuer: Option<Text>,
    pub on_store_error: Option<Text>,
    pub retry_after: Option<Text>,
    pub subject_header: Option<Text>,
    pub login: Option<Spanned<LoginFile>>,
    pub logout: Option<Spanned<LogoutFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginFile {
    pub path: Option<Text>,
    pub method: Option<Text>,
    pub token_pointer: Option<Text>,
    pub default_ttl: Option<Text>,
    pub max_body: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogoutFile {
    pub path: Option<Text>,
    pub method: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub token_env: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: Option<Text>,
    pub admin_listen: Option<Text>,
    pub shutdown_grace: Option<Text>,
    pub header_read_timeout: Option<Text>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_header_count: Option<Spanned<i64>>,
    pub max_header_bytes: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub body_read_timeout: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub url: Option<Text>,
    pub connect_timeout: Option<Text>,
    pub timeout: Option<Text>,
    pub pool_idle_timeout: Option<Text>,
    pub pool_max_idle: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub backend: Option<Text>,
    pub max_bytes: Option<Text>,
    pub url: Option<Text>,
    pub password_env: Option<Text>,
    pub prefix: Option<Text>,
    pub timeout: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    pub max_object_size: Option<Text>,
    pub lock_timeout: Option<Text>,
    pub distributed_lock: Option<bool>,
    pub honor_client_no_cache: Option<bool>,
    pub statuses: Option<Spanned<Vec<Spanned<i64>>>>,
    pub credential_headers: Option<Vec<Text>>,
}

/// `query = "sorted" | "ignore" | ["page", "size"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum QueryFile {
    Mode(String),
    Keep(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub name: Option<Text>,
    #[serde(rename = "match")]
    pub match_: Option<Text>,
    pub ttl: Option<Text>,
    pub query: Option<Spanned<QueryFile>>,
    pub vary: Option<Vec<Text>>,
    pub fill_headers: Option<Vec<Text>>,
    pub fill_headers_unkeyed_ok: Option<bool>,
    pub tags: Option<Vec<Text>>,
    pub purge: Option<Vec<Text>>,
    pub stale_while_revalidate: Option<Text>,
    pub stale_if_error: Option<Text>,
    pub origin_cache_control: Option<Text>,
    pub auth: Option<Text>,
    pub scope: Option<Text>,
}
