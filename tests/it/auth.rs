//! The session gate, end to end: JWTs signed in the test, session keys in a real Redis, an
//! origin that echoes the subject it was given.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

use crate::support::*;

const SECRET: &str = "test-secret-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `sub`, valid for `ttl_s` seconds (negative: already expired).
fn token(sub: &str, ttl_s: i64) -> String {
    let claims = json!({
        "sub": sub,
        "exp": (now() as i64 + ttl_s) as u64,
        "iat": now(),
        // Two logins in the same second still get different tokens.
        "jti": format!("{:x}", rand_u64()),
    });
    hs256(SECRET, &claims)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

fn bearer(t: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {t}"))
}

const RULES: &str = r#"
[auth]
jwt_secret_env = "JWT_SECRET"
algorithms = ["HS256"]
leeway = "5s"

[auth.login]
path = "/login"
token_pointer = "/access_token"

[auth.logout]
path = "/logout"

[admin]
token_env = "ADMIN_TOKEN"

[[rule]]
name = "profile"
match = "/profile/{section}"
ttl = "5m"
auth = "required"

[[rule]]
name = "account"
match = "/account"
auth = "required"

[[rule]]
name = "catalog"
match = "/catalog"
ttl = "5m"
auth = "required"
scope = "public"

[[rule]]
name = "open"
match = "/open"
ttl = "5m"
"#;

struct World {
    redis: Redis,
    origin: Origin,
    proxy: Proxy,
}

async fn world_with(origin: Origin, rules: &str) -> World {
    let redis = Redis::start().await;
    let text = config(&origin, &redis_store(&redis), rules);
    let proxy = Proxy::start_env(&text, &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", ADMIN)]).await;
    World {
        redis,
        origin,
        proxy,
    }
}

async fn world() -> World {
    world_with(Origin::echo().await, RULES).await
}

impl World {
    /// What the upstream's login does in the common setup: write the one valid token.
    async fn login(&self, sub: &str) -> String {
        let t = token(sub, 3600);
        let _: () = self
            .redis
            .cmd(&["SET", &format!("user_token:{sub}"), &t, "EX", "3600"])
            .await;
        t
    }

    async fn get_as(&self, path: &str, t: &str) -> Got {
        let (k, v) = bearer(t);
        self.proxy.get_with(path, &[(k, &v)]).await
    }
}

fn error_of(got: &Got) -> String {
    let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap_or_default();
    v["error"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_token_is_accepted_and_the_subject_forwarded() {
    let w = world().await;
    let t = w.login("alice").await;
    let got = w.get_as("/account", &t).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(w.origin.last().headers["x-auth-subject"], "alice");
    let m = w.proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cachegate_auth_total{result=\"valid\",rule=\"account\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_token_is_401() {
    let w = world().await;
    let first = w.login("alice").await;
    assert_eq!(w.get_as("/account", &first).await.status, 200);
    let second = w.login("alice").await;
    let old = w.get_as("/account", &first).await;
    assert_eq!(old.status, 401);
    assert_eq!(error_of(&old), "session_superseded");
    assert!(old.header("www-authenticate").starts_with("Bearer"));
    assert!(
        !old.text().contains(&first),
        "the body never echoes the token"
    );
    assert_eq!(w.get_as("/account", &second).await.status, 200);
    assert_eq!(
        w.origin.total(),
        2,
        "the refused request never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_session_is_401_session_missing() {
    let w = world().await;
    let t = w.login("alice").await;
    let _: () = w.redis.cmd(&["DEL", "user_token:alice"]).await;
    let got = w.get_as("/account", &t).await;
    assert_eq!(got.status, 401);
    assert_eq!(error_of(&got), "session_missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_expired_and_forged_tokens_are_refused() {
    let w = world().await;
    let good = w.login("alice").await;

    // missing
    let got = w.proxy.get("/account").await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "missing_token".into())
    );
    // empty bearer
    let got = w
        .proxy
        .get_with("/account", &[("authorization", "Bearer ")])
        .await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "malformed_token".into())
    );
    // two Authorization headers
    let (k, v) = bearer(&good);
    let got = w.proxy.get_with("/account", &[(k, &v), (k, &v)]).await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "malformed_token".into())
    );
    // scheme is case-insensitive
    let got = w
        .proxy
        .get_with("/account", &[("authorization", &format!("bEaReR {good}"))])
        .await;
    assert_eq!(got.status, 200);
    // expired (stored as the session, so only the expiry can refuse it)
    let expired = token("bob", -120);
    let _: () = w.redis.cmd(&["SET", "user_token:bob", &expired]).await;
    let got = w.get_as("/account", &expired).await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "expired".into())
    );
    // tampered signature
    // (a character in the middle: the last one of the signature carries padding bits)
    let mut tampered: Vec<char> = good.chars().collect();
    let i = tampered.len() - 10;
    tampered[i] = if tampered[i] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    let got = w.get_as("/account", &tampered).await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "invalid_signature".into())
    );
    // alg = none
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 600))
    );
    let got = w.get_as("/account", &none).await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "invalid_signature".into())
    );
    // signed with another secret, claiming alice
    let forged = hs256(
        "another-secret-0123456789",
        &json!({"sub": "alice", "exp": now() + 600}),
    );
    let got = w.get_as("/account", &forged).await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "invalid_signature".into())
    );
    assert_eq!(
        w.origin.total(),
        1,
        "only the valid request reached the upstream"
    );
    let m = w.proxy.metrics().await;
    for result in ["missing_token", "malformed", "expired", "invalid_signature"] {
        assert!(
            metric(
                &m,
                &format!("cachegate_auth_total{{result=\"{result}\",rule=\"account\"}}")
            ) >= 1.0,
            "{result}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_subject_without_signature_checking_is_refused_by_the_session_check() {
    // No key: claims are only decoded, and the session equality is what authenticates.
    let rules = "[auth]\nalgorithms = [\"HS256\"]\n[[rule]]\nname = \"account\"\nmatch = \"/account\"\nauth = \"required\"\n";
    let w = world_with(Origin::echo().await, rules).await;
    let alice = w.login("alice").await;
    let bob = w.login("bob").await;
    // Bob re-signs a token that claims to be alice.
    let forged = hs256(
        "bob-knows-no-secret-at-all",
        &json!({"sub": "alice", "exp": now() + 600}),
    );
    let got = w.get_as("/account", &forged).await;
    assert_eq!(
        (got.status.as_u16(), error_of(&got)),
        (401, "session_superseded".into())
    );
    assert_eq!(w.get_as("/account", &bob).await.status, 200);
    assert_eq!(w.origin.last().headers["x-auth-subject"], "bob");
    assert_eq!(w.get_as("/account", &alice).await.status, 200);
    assert_eq!(w.origin.last().headers["x-auth-subject"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_token_is_refused_when_rs256_is_pinned() {
    let key_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa_public.pem");
    let private = include_bytes!("../fixtures/rsa_private.pem");
    let public = include_bytes!("../fixtures/rsa_public.pem");
    let rules = format!(
        "[auth]\njwt_public_key_file = \"{key_path}\"\nalgorithms = [\"RS256\"]\n\
         [[rule]]\nname = \"account\"\nmatch = \"/account\"\nauth = \"required\"\n"
    );
    let w = world_with(Origin::echo().await, &rules).await;
    let claims = json!({"sub": "alice", "exp": now() + 600});
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(private).unwrap(),
    )
    .unwrap();
    // The classic confusion attack: HS256 keyed with the RSA public key.
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(public),
    )
    .unwrap();
    for t in [&rs, &hs] {
        let _: () = w.redis.cmd(&["SET", "user_token:alice", t]).await;
        let got = w.get_as("/account", t).await;
        if t == &rs {
            assert_eq!(
                got.status,
                200,
                "a genuine RS256 token passes: {}",
                got.text()
            );
        } else {
            assert_eq!(
                (got.status.as_u16(), error_of(&got)),
                (401, "invalid_signature".into())
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_subject_header_is_stripped_on_every_route() {
    let w = world().await;
    let t = w.login("alice").await;
    let (k, v) = bearer(&t);
    w.proxy
        .get_with("/account", &[(k, &v), ("x-auth-subject", "root")])
        .await;
    assert_eq!(w.origin.last().headers["x-auth-subject"], "alice");
    w.proxy
        .get_with(
            "/unprotected",
            &[("x-auth-subject", "root"), ("x-auth-unverified", "no")],
        )
        .await;
    let seen = w.origin.last();
    assert!(
        !seen.headers.contains_key("x-auth-subject"),
        "stripped on a route without auth"
    );
    assert!(!seen.headers.contains_key("x-auth-unverified"));
    w.proxy
        .send("POST", "/anything", &[("x-auth-subject", "root")], "x")
        .await;
    assert!(!w.origin.last().headers.contains_key("x-auth-subject"));
    // CGI-style upstreams (PHP, Rack) read X_Auth_Subject as the same variable.
    w.proxy
        .get_with(
            "/account",
            &[
                (k, &v),
                ("x_auth_subject", "root"),
                ("X_Auth_Unverified", "no"),
            ],
        )
        .await;
    let seen = w.origin.last();
    assert_eq!(seen.headers["x-auth-subject"], "alice");
    assert!(!seen.headers.contains_key("x_auth_subject"));
    assert!(!seen.headers.contains_key("x_auth_unverified"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_error_reply_is_a_fault_not_a_401() {
    use tokio::io::AsyncWriteExt;
    let w = world().await;
    let t = w.login("alice").await;
    assert_eq!(w.get_as("/profile/main", &t).await.status, 200);
    // A long script makes Redis answer every other command with -BUSY.
    assert_eq!(
        w.redis.raw("CONFIG SET busy-reply-threshold 10").await,
        "+OK"
    );
    let mut busy = tokio::net::TcpStream::connect(("127.0.0.1", w.redis.port))
        .await
        .unwrap();
    busy.write_all(b"EVAL \"while true do end\" 0\r\n")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "Redis answers BUSY", || async {
        w.redis.raw("GET x").await.starts_with("-BUSY")
    })
    .await;
    for path in ["/profile/main", "/account"] {
        let got = w.get_as(path, &t).await;
        assert_eq!(got.status, 503, "{path}: {}", got.text());
        assert_eq!(error_of(&got), "session_store_unavailable");
    }
    assert_eq!(w.redis.raw("SCRIPT KILL").await, "+OK");
    eventually(
        Duration::from_secs(10),
        "the gate answers again",
        || async { w.get_as("/account", &t).await.status == 200 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_never_turns_into_401() {
    let mut w = world().await;
    let t = w.login("alice").await;
    assert_eq!(w.get_as("/account", &t).await.status, 200);
    w.redis.kill();
    for path in ["/account", "/profile/main"] {
        for _ in 0..5 {
            let got = w.get_as(path, &t).await;
            assert_eq!(got.status, 503, "{path}: {}", got.text());
            assert_eq!(error_of(&got), "session_store_unavailable");
            assert!(got.header("retry-after").parse::<u64>().unwrap() >= 1);
        }
    }
    let m = w.proxy.metrics().await;
    assert!(
        metric(
            &m,
            "cachegate_auth_total{result=\"store_error\",rule=\"account\"}"
        ) >= 1.0,
        "{m}"
    );
    w.redis.restart().await;
    // Redis came back empty: the session is gone, which is now a 401, as it should be.
    eventually(
        Duration::from_secs(10),
        "the gate answers again",
        || async { w.get_as("/account", &t).await.status == 401 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_store_error_allow_lets_requests_through_flagged() {
    let rules = RULES.replace(
        "leeway = \"5s\"",
        "leeway = \"5s\"\non_store_error = \"allow\"",
    );
    let mut w = world_with(Origin::echo().await, &rules).await;
    let t = w.login("alice").await;
    w.redis.kill();
    let got = w.get_as("/profile/main", &t).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.x_cache(),
        "BYPASS",
        "never cached for an unverified caller"
    );
    let seen = w.origin.last();
    assert_eq!(seen.headers["x-auth-unverified"], "store-unavailable");
    assert!(!seen.headers.contains_key("x-auth-subject"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_a_never_receives_user_b_entry() {
    let origin = Origin::start(Arc::new(|s, _| {
        let user = s
            .headers
            .get("x-auth-subject")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Box::pin(async move {
            // Slow enough that fills overlap across users.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Answer::ok(format!("{{\"user\":\"{user}\"}}"))
        })
    }))
    .await;
    let w = Arc::new(world_with(origin, RULES).await);
    let users = ["u1", "u2", "u3", "u4", "u5"];
    let mut tokens = Vec::new();
    for u in users {
        tokens.push(w.login(u).await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let w = w.clone();
        let user = users[i % users.len()];
        let t = tokens[i % users.len()].clone();
        tasks.push(tokio::spawn(async move {
            let got = w.get_as("/profile/main", &t).await;
            (user, got)
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        let (user, got) = task.await.unwrap();
        statuses.push(format!("{user}: {}", got.header("cache-status")));
        assert_eq!(got.status, 200);
        assert_eq!(
            got.text(),
            format!("{{\"user\":\"{user}\"}}"),
            "{user} got someone else's entry"
        );
    }
    // One fill per user, every other request a hit or a coalesced wait on the user's own fill.
    let odd: Vec<&String> = statuses.iter().filter(|s| !s.contains("hit")).collect();
    assert_eq!(w.origin.total(), users.len(), "{odd:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relogin_keeps_the_users_cache_warm() {
    let w = world().await;
    let first = w.login("alice").await;
    assert_eq!(w.get_as("/profile/main", &first).await.x_cache(), "MISS");
    let second = w.login("alice").await;
    let got = w.get_as("/profile/main", &second).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.x_cache(), "HIT", "keyed by subject, not by token");
    assert_eq!(w.get_as("/profile/main", &first).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_scope_shares_one_entry_between_valid_users() {
    let w = world().await;
    let a = w.login("alice").await;
    let b = w.login("bob").await;
    assert_eq!(w.get_as("/catalog", &a).await.x_cache(), "MISS");
    assert_eq!(w.get_as("/catalog", &b).await.x_cache(), "HIT");
    assert_eq!(
        w.proxy.get("/catalog").await.status,
        401,
        "still needs a valid session"
    );
    assert_eq!(w.origin.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_on_a_shared_rule_bypasses_the_cache() {
    let w = world().await;
    assert_eq!(w.proxy.get("/open").await.x_cache(), "MISS");
    assert_eq!(w.proxy.get("/open").await.x_cache(), "HIT");
    let with_auth = w
        .proxy
        .get_with("/open", &[("authorization", "Basic dXNlcjpwYXNz")])
        .await;
    assert_eq!(with_auth.x_cache(), "BYPASS", "RFC 9111 §3.5");
    assert!(
        with_auth
            .header("cache-status")
            .contains("detail=authorization")
    );
    assert_eq!(
        w.origin.last().headers["authorization"],
        "Basic dXNlcjpwYXNz",
        "passed through untouched"
    );
    assert_eq!(w.origin.total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_capture_and_logout_against_an_upstream_that_knows_nothing_of_redis() {
    let origin = Origin::start(handler(|s, _| match s.path.as_str() {
        "/login" => {
            let user = String::from_utf8_lossy(&s.body).to_string();
            Answer::ok(format!(
                "{{\"access_token\":\"{}\",\"token_type\":\"Bearer\"}}",
                token(&user, 600)
            ))
        }
        "/logout" => Answer::ok("{}"),
        _ => {
            let user = s
                .headers
                .get("x-auth-subject")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            Answer::ok(format!("{{\"user\":\"{user}\"}}"))
        }
    }))
    .await;
    let w = world_with(origin, RULES).await;
    let login = |user: &'static str| {
        let w = &w;
        async move {
            let got = w.proxy.send("POST", "/login", &[], user).await;
            assert_eq!(got.status, 200);
            let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
            v["access_token"].as_str().unwrap().to_string()
        }
    };
    let first = login("carol").await;
    let stored: String = w.redis.cmd(&["GET", "user_token:carol"]).await;
    assert_eq!(
        stored, first,
        "the login response's token became the session"
    );
    let ttl: i64 = w.redis.cmd(&["TTL", "user_token:carol"]).await;
    assert!(ttl > 500 && ttl <= 600, "expires with the token: {ttl}");
    assert_eq!(w.get_as("/profile/main", &first).await.x_cache(), "MISS");
    assert_eq!(w.get_as("/profile/main", &first).await.x_cache(), "HIT");

    let second = login("carol").await;
    assert_eq!(
        error_of(&w.get_as("/account", &first).await),
        "session_superseded"
    );
    assert_eq!(w.get_as("/account", &second).await.status, 200);

    // An old token cannot end the newer session.
    let (k, v) = bearer(&first);
    assert_eq!(
        w.proxy.send("POST", "/logout", &[(k, &v)], "").await.status,
        401
    );
    assert_eq!(w.get_as("/account", &second).await.status, 200);

    let (k, v) = bearer(&second);
    assert_eq!(
        w.proxy.send("POST", "/logout", &[(k, &v)], "").await.status,
        200
    );
    let exists: i64 = w.redis.cmd(&["EXISTS", "user_token:carol"]).await;
    assert_eq!(exists, 0, "logout deleted the session");
    assert_eq!(
        error_of(&w.get_as("/account", &second).await),
        "session_missing"
    );

    // Logging in again finds nothing of the old session cached: logout bumped sub:carol.
    let third = login("carol").await;
    assert_eq!(w.get_as("/profile/main", &third).await.x_cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_force_logout_and_session_info() {
    let w = world().await;
    let t = w.login("dave").await;
    assert_eq!(w.get_as("/profile/main", &t).await.x_cache(), "MISS");
    let auth = format!("Bearer {ADMIN}");
    let info = w
        .proxy
        .admin("GET", "/sessions/dave", &[("authorization", &auth)], "")
        .await;
    assert_eq!(info.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(v["exists"], true);
    assert!(v["ttl_seconds"].as_u64().unwrap() > 3000);
    assert!(!info.text().contains(&t), "never the token");

    let del = w
        .proxy
        .admin("DELETE", "/sessions/dave", &[("authorization", &auth)], "")
        .await;
    assert_eq!(del.status, 200);
    assert_eq!(
        error_of(&w.get_as("/profile/main", &t).await),
        "session_missing"
    );
    let info = w
        .proxy
        .admin("GET", "/sessions/dave", &[("authorization", &auth)], "")
        .await;
    let v: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(v["exists"], false);
    // The forced logout also dropped dave's cached entries.
    let t2 = w.login("dave").await;
    assert_eq!(w.get_as("/profile/main", &t2).await.x_cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_without_its_token() {
    let w = world().await;
    w.login("erin").await;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-token-0123456789")],
        vec![("authorization", ADMIN)],
    ] {
        for (method, path) in [("GET", "/sessions/erin"), ("DELETE", "/sessions/erin")] {
            let got = w.proxy.admin(method, path, &headers, "").await;
            assert_eq!(got.status, 401, "{method} {path} with {headers:?}");
        }
    }
    let exists: i64 = w.redis.cmd(&["EXISTS", "user_token:erin"]).await;
    assert_eq!(exists, 1, "nothing was deleted");
    // Metrics and health stay open for scrapers.
    assert_eq!(w.proxy.admin("GET", "/metrics", &[], "").await.status, 200);

    // With no admin token configured, the admin API is off entirely.
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let got = proxy
        .admin(
            "GET",
            "/sessions/erin",
            &[("authorization", "Bearer anything")],
            "",
        )
        .await;
    assert_eq!(got.status, 403);
}
