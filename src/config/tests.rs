//! Golden config errors: the exact text an operator sees, with file:line:col.

use super::*;
use crate::routing::{QueryPolicy, Scope};

fn env(name: &str) -> Option<String> {
    match name {
        "REDIS_PASSWORD" => Some("s3cret".into()),
        _ => None,
    }
}

fn err(text: &str) -> String {
    Config::parse_with_env("cachegate.toml", text, &env)
        .unwrap_err()
        .to_string()
}

fn ok(text: &str) -> Config {
    Config::parse_with_env("cachegate.toml", text, &env).unwrap_or_else(|e| panic!("{e}"))
}

const UPSTREAM: &str = "[upstream]\nurl = \"http://127.0.0.1:9000\"\n";

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = ok(UPSTREAM);
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9091");
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
    assert!(
        matches!(c.store.backend, StoreBackend::Memory { max_bytes } if max_bytes == 256 << 20)
    );
    assert_eq!(c.store.prefix, "cachegate:");
    assert_eq!(c.store.timeout, Duration::from_millis(100));
    assert_eq!(c.cache.max_object_size, 1 << 20);
    assert_eq!(c.cache.statuses.codes(), DEFAULT_STATUSES.to_vec());
    assert_eq!(c.upstream.timeout, Duration::from_secs(30));
    assert_eq!(c.upstream.base_path, "");
}

#[test]
fn full_example_parses() {
    let c = ok(r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"

[upstream]
url = "http://127.0.0.1:9000/api/"
connect_timeout = "1s"
timeout = "10s"

[store]
backend = "redis"
url = "redis://127.0.0.1:6379/0"
password_env = "REDIS_PASSWORD"
prefix = "cg:"
timeout = "50ms"

[cache]
max_object_size = "512KiB"
statuses = [200, 404]

[[rule]]
name = "user"
match = "/user/{id}"
ttl = "5m"
query = ["page", "size"]
vary = ["Accept-Language"]
tags = ["user:{id}", "users"]
"#);
    assert_eq!(c.upstream.base_path, "/api");
    assert!(
        matches!(&c.store.backend, StoreBackend::Redis { password: Some(p), .. } if p == "s3cret")
    );
    let r = &c.rules.rules()[0];
    assert_eq!(r.ttl, Some(Duration::from_secs(300)));
    assert_eq!(r.vary[0].as_str(), "accept-language");
    assert_eq!(
        r.query,
        QueryPolicy::Keep(vec!["page".into(), "size".into()])
    );
    assert!(compile::describe(&c.rules).contains("user:{id},users"));
}

#[test]
fn unknown_key_is_an_error_with_position() {
    assert_eq!(
        err("[upstream]\nurl = \"http://127.0.0.1:9000\"\ntimout = \"1s\"\n"),
        "cachegate.toml:3:1: unknown field `timout`, expected one of `url`, `connect_timeout`, `timeout`, `pool_idle_timeout`, `pool_max_idle`, `tls_ca_file`, `tls_server_name`, `tls_verify`"
    );
    assert!(
        err(&format!("{UPSTREAM}[cache]\nmax_size = \"1MiB\"\n"))
            .starts_with("cachegate.toml:4:1: unknown field `max_size`")
    );
}

#[test]
fn bad_duration_points_at_the_value_and_suggests_a_spelling() {
    let text = format!(
        "{UPSTREAM}\n[[rule]]\nname = \"user\"\nmatch = \"/user/{{id}}\"\nttl = \"5 minutes\"\n"
    );
    assert_eq!(
        err(&text),
        "cachegate.toml:7:7: rule \"user\": ttl \"5 minutes\" is not a duration (try \"5m\")"
    );
}

#[test]
fn duplicate_templates_are_an_error() {
    let text = format!(
        "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/user/{{id}}\"\n[[rule]]\nname = \"b\"\nmatch = \"/user/{{id}}\"\n"
    );
    assert_eq!(
        err(&text),
        "cachegate.toml:8:9: rule \"b\": match \"/user/{id}\" is already the template of rule \"a\" (merge the two rules)"
    );
}

#[test]
fn unparsable_template_is_an_error() {
    let text = format!("{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/user/{{id\"\n");
    assert_eq!(
        err(&text),
        "cachegate.toml:5:9: rule \"a\": match \"/user/{id\": a '{' has no matching '}'"
    );
}

#[test]
fn tag_naming_a_missing_parameter_is_an_error() {
    let text = format!(
        "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/user/{{id}}\"\ntags = [\"user:{{name}}\"]\n"
    );
    assert_eq!(
        err(&text),
        "cachegate.toml:6:9: rule \"a\": tag \"user:{name}\": names {name}, which the template \"/user/{id}\" lacks (it has {id})"
    );
}

#[test]
fn secrets_never_come_from_the_file() {
    let text = format!(
        "{UPSTREAM}[store]\nbackend = \"redis\"\nurl = \"redis://:hunter2@127.0.0.1:6379\"\n"
    );
    assert!(err(&text).starts_with("cachegate.toml:5:7: store.url: must not contain a password"));
    let text = format!("{UPSTREAM}[store]\nbackend = \"redis\"\npassword_env = \"NOPE\"\n");
    assert_eq!(
        err(&text),
        "cachegate.toml:5:16: store.password_env: environment variable NOPE is not set (export it, or remove password_env)"
    );
}

#[test]
fn other_value_errors() {
    assert!(err("[upstream]\nurl = \"ftp://x\"\n").starts_with("cachegate.toml:2:7: upstream.url"));
    assert!(err("").starts_with("cachegate.toml:1:1: [upstream] is missing"));
    assert!(
        err(&format!("{UPSTREAM}[server]\nlisten = \"8080\"\n"))
            .starts_with("cachegate.toml:4:10: server.listen")
    );
    assert!(
        err(&format!("{UPSTREAM}[store]\nbackend = \"mongo\"\n"))
            .starts_with("cachegate.toml:4:11: store.backend")
    );
    assert!(
        err(&format!("{UPSTREAM}[cache]\nstatuses = [200, 700]\n"))
            .starts_with("cachegate.toml:4:18: cache.statuses")
    );
    assert!(
        err(&format!("{UPSTREAM}[cache]\nmax_object_size = \"lots\"\n")).contains("is not a size")
    );
    assert!(err(&format!("{UPSTREAM}[[rule]]\nmatch = \"/x\"\n")).contains("needs a name"));
    assert!(
        err(&format!(
            "{UPSTREAM}[[rule]]\nname = \"a b\"\nmatch = \"/x\"\n"
        ))
        .contains("must be 1 to 64")
    );
    assert!(
        err(&format!(
            "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/x\"\nvary = [\"authorization\"]\n"
        ))
        .contains("use scope = \"user\"")
    );
    assert!(
        err(&format!(
            "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/x\"\nquery = \"random\"\n"
        ))
        .contains("is not a policy")
    );
}

#[test]
fn zero_ttl_means_not_cached() {
    let c = ok(&format!(
        "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/x\"\nttl = \"0s\"\n"
    ));
    assert_eq!(c.rules.rules()[0].ttl, None);
}

#[test]
fn auth_section_compiles() {
    let c = ok(&format!(
        "{UPSTREAM}[auth]\ndefault = \"required\"\nsession_key = \"sess:{{tenant}}:{{uid}}\"\nsubject_claim = \"uid\"\n\
         [auth.login]\npath = \"/login\"\n[[rule]]\nname = \"open\"\nmatch = \"/open\"\nttl = \"1m\"\nauth = \"none\"\n\
         [[rule]]\nname = \"me\"\nmatch = \"/me\"\nttl = \"1m\"\n"
    ));
    assert_eq!(c.auth.default, Policy::Required);
    assert_eq!(c.auth.gate.subject_claim, "uid");
    assert_eq!(c.auth.login.as_ref().unwrap().method, http::Method::POST);
    let rules = c.rules.rules();
    assert_eq!(
        (rules[0].auth, rules[0].scope),
        (Policy::None, Scope::Anonymous)
    );
    assert_eq!(
        (rules[1].auth, rules[1].scope),
        (Policy::Required, Scope::User),
        "inherits the default"
    );
}

#[test]
fn auth_errors() {
    assert_eq!(
        err(&format!(
            "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/a\"\nscope = \"user\"\n"
        )),
        "cachegate.toml:6:9: rule \"a\": scope \"user\" needs auth = \"required\" or \"optional\" (there is no verified subject to scope by)"
    );
    assert!(
        err(&format!(
            "{UPSTREAM}[auth]\nalgorithms = [\"HS256\", \"RS256\"]\n"
        ))
        .starts_with("cachegate.toml:4:14: auth.algorithms: mixes HMAC")
    );
    assert_eq!(
        err(&format!(
            "{UPSTREAM}[auth]\njwt_secret_env = \"JWT_SECRET\"\n"
        )),
        "cachegate.toml:4:18: auth.jwt_secret_env: environment variable JWT_SECRET is not set (export it, or remove auth.jwt_secret_env)"
    );
    assert!(
        err(&format!("{UPSTREAM}[auth]\nsession_key = \"static\"\n"))
            .contains("must name at least one claim")
    );
    assert!(
        err(&format!(
            "{UPSTREAM}[auth]\nsession_key = \"s:{{a}}:{{b}}\"\n"
        ))
        .contains("set auth.subject_claim")
    );
    assert!(
        err(&format!("{UPSTREAM}[auth]\non_store_error = \"maybe\"\n"))
            .contains("auth.on_store_error")
    );
    assert!(err(&format!("{UPSTREAM}[auth]\njwt_public_key_file = \"/nonexistent.pem\"\nalgorithms = [\"RS256\"]\n"))
        .contains("cannot read"));
    assert!(err(&format!("{UPSTREAM}[admin]\ntoken_env = \"NOPE\"\n")).contains("admin.token_env"));
    assert!(
        err(&format!("{UPSTREAM}[auth.login]\nmethod = \"POST\"\n"))
            .contains("auth.login.path is required")
    );
}

#[test]
fn purge_tags_are_checked_like_tags() {
    assert_eq!(
        err(&format!(
            "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/user/{{id}}\"\npurge = [\"users\", \"user:{{uid}}\"]\n"
        )),
        "cachegate.toml:6:19: rule \"a\": purge tag \"user:{uid}\": names {uid}, which the template \"/user/{id}\" lacks (it has {id})"
    );
    assert!(
        err(&format!(
            "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/a\"\ntags = [\"*\"]\n"
        ))
        .contains("reserved")
    );
    let c = ok(&format!(
        "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/user/{{id}}\"\npurge = [\"user:{{id}}\", \"users\"]\n"
    ));
    assert!(compile::describe(&c.rules).contains("purge=user:{id},users"));
}

#[test]
fn an_unkeyed_fill_header_is_a_config_error() {
    let text = format!(
        "{UPSTREAM}[[rule]]\nname = \"a\"\nmatch = \"/a\"\nttl = \"1m\"\nfill_headers = [\"X-Tenant\"]\n"
    );
    assert_eq!(
        err(&text),
        "cachegate.toml:7:17: rule \"a\": fill_headers \"X-Tenant\" is not in vary, so one client's value would shape the entry every client gets; add it to vary, or set fill_headers_unkeyed_ok = true to accept that risk"
    );
    let keyed = ok(&text.replace("fill_headers", "vary = [\"x-tenant\"]\nfill_headers"));
    assert_eq!(keyed.rules.rules()[0].fill_headers[0].as_str(), "x-tenant");
    let accepted = ok(&format!("{text}fill_headers_unkeyed_ok = true\n"));
    assert_eq!(accepted.rules.rules()[0].fill_headers.len(), 1);
    assert!(
        err(&text.replace("X-Tenant", "Forwarded"))
            .contains("cachegate sets this header on every fill itself")
    );
    let credential = format!("{text}fill_headers_unkeyed_ok = true\n");
    for name in ["Authorization", "Cookie", "X-Api-Key"] {
        assert!(
            err(&credential.replace("X-Tenant", name)).contains("a credential is never sent"),
            "{name}"
        );
    }
}

#[test]
fn a_short_jwt_secret_needs_the_opt_in() {
    let env = |name: &str| (name == "JWT_SECRET").then(|| "thirteen-byte".to_string());
    let text =
        format!("{UPSTREAM}[auth]\nalgorithms = [\"HS256\"]\njwt_secret_env = \"JWT_SECRET\"\n");
    let e = Config::parse_with_env("cachegate.toml", &text, &env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "cachegate.toml:5:18: auth.jwt_secret_env: the secret in JWT_SECRET is 13 bytes; an HS secret needs at least 16 (to front an API that already signs with this secret, set auth.allow_weak_jwt_secret = true)"
    );
    let c = Config::parse_with_env(
        "cachegate.toml",
        &format!("{text}allow_weak_jwt_secret = true\n"),
        &env,
    )
    .unwrap();
    assert!(c.auth.weak_secret);
}

#[test]
fn connection_limits_have_defaults_and_bounds() {
    let c = ok(UPSTREAM);
    assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
    assert_eq!(c.server.max_header_bytes, 64 << 10);
    assert_eq!(
        c.cache
            .credential_headers
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>(),
        ["cookie", "x-api-key"]
    );
    assert!(
        err(&format!("{UPSTREAM}[server]\nidle_timeout = \"0s\"\n"))
            .contains("server.idle_timeout: must be above 0s")
    );
    assert!(
        err(&format!(
            "{UPSTREAM}[server]\nmax_header_bytes = \"1KiB\"\n"
        ))
        .contains("between 8KiB and 1MiB")
    );
}

#[test]
fn the_shipped_config_files_are_valid() {
    let env = |name: &str| match name {
        "REDIS_PASSWORD" | "JWT_SECRET" | "CACHEGATE_ADMIN_TOKEN" => {
            Some("0123456789abcdef0123456789".to_string())
        }
        _ => None,
    };
    for (name, text) in [
        (
            "cachegate.toml",
            include_str!("../../config/cachegate.toml"),
        ),
        (
            "quickstart.toml",
            include_str!("../../config/quickstart.toml"),
        ),
        ("docker.toml", include_str!("../../config/docker.toml")),
    ] {
        if let Err(e) = Config::parse_with_env(name, text, &env) {
            panic!("{e}");
        }
    }
}

#[test]
fn topology_and_tls_settings_are_checked_with_positions() {
    let redis = "[store]\nbackend = \"redis\"\n";
    // One way to name Redis.
    assert_eq!(
        err(&format!(
            "{UPSTREAM}{redis}url = \"redis://a:6379\"\nsentinels = [\"redis://s:26379\"]\nsentinel_master = \"m\"\n"
        )),
        "cachegate.toml:6:13: store: url and sentinels are different ways to name Redis; set one of them"
    );
    assert!(
        err(&format!(
            "{UPSTREAM}{redis}sentinels = [\"redis://s:26379\"]\n"
        ))
        .contains("also set sentinel_master")
    );
    assert!(
        err(&format!("{UPSTREAM}{redis}sentinel_master = \"m\"\n"))
            .contains("store.sentinel_master: only used with store.sentinels")
    );
    assert!(
        err(&format!(
            "{UPSTREAM}{redis}sentinels = [\"redis://s:26379\", \"rediss://t:26379\"]\nsentinel_master = \"m\"\n"
        ))
        .contains("rediss:// for all of them or for none")
    );
    assert!(
        err(&format!(
            "{UPSTREAM}{redis}cluster_nodes = [\"http://a\"]\n"
        ))
        .contains("store.cluster_nodes: \"http://a\" is not a Redis URL")
    );
    // TLS files: only with TLS, readable, and PEM.
    assert_eq!(
        err(&format!(
            "{UPSTREAM}{redis}url = \"redis://a:6379\"\ntls_ca_file = \"/x\"\n"
        )),
        "cachegate.toml:6:15: store.tls_ca_file: only used when Redis is reached over TLS (rediss://)"
    );
    let missing = err(&format!(
        "{UPSTREAM}{redis}url = \"rediss://a:6380\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n"
    ));
    assert!(
        missing.starts_with(
            "cachegate.toml:6:15: store.tls_ca_file: cannot read \"/nonexistent/ca.pem\""
        ),
        "{missing}"
    );
    let not_pem = std::env::temp_dir().join(format!("cachegate-not-pem-{}", std::process::id()));
    std::fs::write(&not_pem, "hello").expect("write");
    let bad = err(&format!(
        "{UPSTREAM}{redis}url = \"rediss://a:6380\"\ntls_ca_file = \"{}\"\n",
        not_pem.display()
    ));
    let _ = std::fs::remove_file(&not_pem);
    assert!(bad.contains("holds no PEM certificate"), "{bad}");
    assert!(
        err(&format!(
            "{UPSTREAM}{redis}url = \"rediss://a:6380\"\ntls_cert_file = \"/x\"\n"
        ))
        .contains("also set tls_key_file")
    );
    // The memory backend takes none of them.
    assert!(
        err(&format!(
            "{UPSTREAM}[store]\nsentinels = [\"redis://s:26379\"]\n"
        ))
        .contains("store.sentinels is only used with backend = \"redis\"")
    );
    // Upstream TLS keys need an https URL; a server name must be a name.
    assert!(
        err("[upstream]\nurl = \"http://a\"\ntls_verify = false\n").starts_with(
            "cachegate.toml:3:14: upstream.tls_verify: only used with an https:// upstream.url"
        )
    );
    assert!(
        err("[upstream]\nurl = \"https://a\"\ntls_server_name = \"not a name\"\n")
            .contains("is not a DNS name or IP address")
    );
    let c = ok(
        "[upstream]\nurl = \"https://api.example.com/v1\"\ntls_server_name = \"api.internal\"\n",
    );
    assert_eq!(c.upstream.scheme, http::uri::Scheme::HTTPS);
    assert_eq!(c.upstream.tls.server_name.as_deref(), Some("api.internal"));
    assert!(c.upstream.tls.verify);
    let c = ok(&format!(
        "{UPSTREAM}{redis}sentinels = [\"redis://s1:26379\", \"redis://s2:26379\"]\nsentinel_master = \"mymaster\"\n"
    ));
    assert!(matches!(
        &c.store.backend,
        StoreBackend::Redis { target: RedisTarget::Sentinel { sentinels, master, .. }, .. }
            if sentinels.len() == 2 && master == "mymaster"
    ));
}
