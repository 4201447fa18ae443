//! Purge on write: tag generations, race-free fills, admin purge, and no stale entry after a
//! Redis outage. The origin keeps a version per resource that writes increment, so a stale
//! answer is visible in the body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;

/// An origin with versioned resources: GET answers the current version, PUT/POST/PATCH/DELETE
/// increment it (paths ending in /404 and /500 fail instead).
pub(crate) struct Versioned {
    versions: Arc<Mutex<HashMap<String, u64>>>,
}

fn resource(path: &str) -> String {
    path.trim_start_matches('/').to_string()
}

pub(crate) async fn versioned() -> (Origin, Versioned) {
    let versions: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let v = versions.clone();
    let origin = Origin::start(Arc::new(move |s, _| {
        let v = v.clone();
        Box::pin(async move {
            if s.path.ends_with("/404") {
                return Answer::ok("{}").status(404);
            }
            if s.path.ends_with("/500") {
                return Answer::ok("{}").status(500);
            }
            let key = resource(&s.path);
            if s.method != "GET" && s.method != "HEAD" {
                let mut m = v.lock().unwrap();
                let n = m.entry(key).or_insert(0);
                *n += 1;
                return Answer::ok(format!("{{\"v\":{n}}}"));
            }
            // A held answer keeps the version it read here.
            let version = *v.lock().unwrap().get(&key).unwrap_or(&0);
            let lang = s.headers.get("accept-language").and_then(|h| h.to_str().ok()).unwrap_or("-").to_string();
            let user = s.headers.get("x-auth-subject").and_then(|h| h.to_str().ok()).unwrap_or("-").to_string();
            let q = s.query.clone().unwrap_or_default();
            Answer::ok(format!("{{\"r\":\"{key}\",\"v\":{version},\"lang\":\"{lang}\",\"user\":\"{user}\",\"q\":\"{q}\"}}"))
        })
    }))
    .await;
    (origin, Versioned { versions })
}

pub(crate) fn v_of(got: &Got) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap_or_default();
    v["v"].as_u64().unwrap_or(u64::MAX)
}

pub(crate) const SECRET: &str = "purge-test-secret-0123456789";
pub(crate) const ADMIN: &str = "purge-admin-token-0123456789";

pub(crate) const RULES: &str = r#"
[auth]
jwt_secret_env = "JWT_SECRET"

[admin]
token_env = "ADMIN_TOKEN"

[[rule]]
name = "user"
match = "/user/{id}"
ttl = "5m"
vary = ["accept-language"]
auth = "optional"
scope = "user"
tags = ["user:{id}"]
purge = ["user:{id}", "users"]

[[rule]]
name = "users"
match = "/users"
ttl = "5m"
tags = ["users"]

[[rule]]
name = "account"
match = "/account/{id}"
ttl = "5m"
auth = "required"
tags = ["account:{id}"]
purge = ["account:{id}"]

[[rule]]
name = "plain"
match = "/plain/{id}"
ttl = "5m"
"#;

pub(crate) async fn proxy_on(redis: &Redis, origin: &Origin) -> Proxy {
    Proxy::start_env(
        &config(origin, &redis_store(redis), RULES),
        &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", ADMIN)],
    )
    .await
}

pub(crate) fn token(sub: &str) -> String {
    hs256(
        SECRET,
        &serde_json::json!({"sub": sub, "exp": 4_000_000_000u64}),
    )
}

pub(crate) async fn session(redis: &Redis, sub: &str) -> String {
    let t = token(sub);
    let _: () = redis.cmd(&["SET", &format!("user_token:{sub}"), &t]).await;
    format!("Bearer {t}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_get_returns_new_data_with_every_variant_gone() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let proxy = proxy_on(&redis, &origin).await;
    let alice = session(&redis, "alice").await;
    let bob = session(&redis, "bob").await;
    // Every kind of variant of /user/7, each stored.
    let variants: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("/user/7?a=1", vec![]),
        ("/user/7?a=2", vec![]),
        ("/user/7", vec![("accept-language", "fr")]),
        ("/user/7", vec![("accept-language", "en")]),
        ("/user/7", vec![("authorization", alice.as_str())]),
        ("/user/7", vec![("authorization", bob.as_str())]),
    ];
    for (path, headers) in &variants {
        assert_eq!(proxy.get_with(path, headers).await.x_cache(), "MISS");
        let hit = proxy.get_with(path, headers).await;
        assert_eq!(
            (hit.x_cache(), v_of(&hit)),
            ("HIT", 0),
            "{path} {headers:?}"
        );
    }
    assert_eq!(
        proxy.send("HEAD", "/user/7?a=1", &[], "").await.x_cache(),
        "HIT"
    );

    let put = proxy
        .send(
            "PUT",
            "/user/7",
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
    assert_eq!(put.status, 200);

    for (path, headers) in &variants {
        let after = proxy.get_with(path, headers).await;
        assert_eq!(
            after.x_cache(),
            "MISS",
            "{path} {headers:?} must not be served stale"
        );
        assert!(
            after.header("cache-status").contains("detail=purged"),
            "{}",
            after.header("cache-status")
        );
        assert_eq!(v_of(&after), 1, "{path} {headers:?}: new data");
    }
    let head = proxy.send("HEAD", "/user/7?a=2", &[], "").await;
    assert_eq!(head.x_cache(), "HIT", "refilled by the GET above");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cachegate_purges_total{rule=\"user\",trigger=\"write\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(&m, "cachegate_stale_generation_misses_total") >= 6.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_purges_nothing() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let proxy = proxy_on(&redis, &origin).await;
    for path in ["/user/404", "/user/500"] {
        proxy.get(path).await;
        let gens_before = redis.keys("cachegate:g:*").await;
        let mut values_before = Vec::new();
        for k in &gens_before {
            let v: String = redis.cmd(&["GET", k]).await;
            values_before.push(v);
        }
        let write = proxy.send("POST", path, &[], "{}").await;
        assert!(write.status.as_u16() >= 400);
        for (k, before) in gens_before.iter().zip(values_before) {
            let now: String = redis.cmd(&["GET", k]).await;
            assert_eq!(
                now, before,
                "{path}: generation {k} changed after an error answer"
            );
        }
    }
    assert_eq!(proxy.get("/plain/1").await.x_cache(), "MISS");
    let put = proxy.send("PUT", "/plain/500", &[], "{}").await;
    assert_eq!(put.status, 500);
    assert_eq!(proxy.get("/plain/1").await.x_cache(), "HIT");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cachegate_purges_total{rule=\"user\",trigger=\"write\"}"
        ),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_tags_reach_a_list_route() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let proxy = proxy_on(&redis, &origin).await;
    assert_eq!(proxy.get("/users?page=1").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/users?page=1").await.x_cache(), "HIT");
    assert_eq!(proxy.send("PUT", "/user/7", &[], "{}").await.status, 200);
    let after = proxy.get("/users?page=1").await;
    assert_eq!(after.x_cache(), "MISS", "PUT /user/7 bumps `users`");
    assert_eq!(origin.hits("/users?page=1"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_raced_a_write_is_never_served() {
    let redis = Redis::start().await;
    let (origin, state) = versioned().await;
    let proxy = Arc::new(proxy_on(&redis, &origin).await);
    for i in 0..100 {
        let path = format!("/plain/race{i}");
        let release = origin.hold_next();
        // The GET reaches the origin, which reads version 0 and holds its answer back.
        let p = proxy.clone();
        let get_path = path.clone();
        let slow_get = tokio::spawn(async move { p.get(&get_path).await });
        eventually(
            Duration::from_secs(5),
            "the GET is held at the origin",
            || async { origin.is_holding() },
        )
        .await;
        // The write completes while the fill is at the origin.
        let put = proxy.send("PUT", &path, &[], "{}").await;
        assert_eq!(put.status, 200);
        // Now the old answer arrives and is stored... dead on arrival.
        release.release();
        let old = slow_get.await.unwrap();
        assert_eq!(v_of(&old), 0, "the raced GET itself saw the old data");
        // Each earlier iteration wrote two entries (the raced fill and the refetch); this
        // one's late fill is the next write.
        proxy.stored(2 * i + 1).await;
        let after = proxy.get(&path).await;
        assert_eq!(v_of(&after), 1, "iteration {i}: the stale fill was served");
    }
    let _ = state.versions;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_is_a_miss_on_the_other() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let a = proxy_on(&redis, &origin).await;
    let b = proxy_on(&redis, &origin).await;
    // B hears Redis's announcements from its first fill on.
    crate::l1::tracking(&b).await;
    let host = [("host", "api.example.com")];
    assert_eq!(b.get_with("/plain/1", &host).await.x_cache(), "MISS");
    eventually(Duration::from_secs(5), "B's fill is in Redis", || async {
        b.get_with("/plain/1", &host).await.x_cache() == "HIT"
    })
    .await;
    // B holds the entry in its in-process tier: it stops serving it once Redis's
    // announcement of A's purge has reached it.
    crate::l1::settled(&b).await;
    let before = crate::l1::told(&b).await;
    assert_eq!(a.send("PUT", "/plain/1", &host, "{}").await.status, 200);
    crate::l1::until_told(&b, before).await;
    let after = b.get_with("/plain/1", &host).await;
    assert_eq!((after.x_cache(), v_of(&after)), ("MISS", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_a_write_queues_the_purge() {
    let mut redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let text = config(&origin, &redis_store_timeout(&redis, "100ms"), RULES);
    let proxy = Proxy::start_env(&text, &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", ADMIN)]).await;
    assert_eq!(proxy.get("/plain/1").await.x_cache(), "MISS");
    redis.kill();
    let put = proxy.send("PUT", "/plain/1", &[], "{}").await;
    assert_eq!(put.status, 200, "the write's response still returns");
    assert!(put.header("cache-status").contains("detail=purge-queued"));
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "cachegate_purge_queue_depth"), 1.0, "{m}");
    redis.restart().await;
    eventually(Duration::from_secs(10), "the queue is flushed", || async {
        metric(&proxy.metrics().await, "cachegate_purge_queue_depth") == 0.0
    })
    .await;
    let after = proxy.get("/plain/1").await;
    assert_eq!(v_of(&after), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_keeps_its_data_but_no_stale_entry_is_served_after_it_returns() {
    // SIGSTOP: Redis keeps every entry, but cannot take the write's purge.
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let text = config(&origin, &redis_store_timeout(&redis, "100ms"), RULES);
    let proxy = Proxy::start_env(&text, &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", ADMIN)]).await;
    proxy.get("/plain/2").await;
    assert_eq!(proxy.get("/plain/2").await.x_cache(), "HIT");
    redis.signal("STOP");
    assert_eq!(proxy.send("PUT", "/plain/2", &[], "{}").await.status, 200);
    let during = proxy.get("/plain/2").await;
    assert_eq!((during.x_cache(), v_of(&during)), ("BYPASS", 1));
    redis.signal("CONT");
    // While the queue waits for its retry, reads keep bypassing; once flushed, the old entry
    // (still in Redis) is dead.
    for _ in 0..20 {
        let got = proxy.get("/plain/2").await;
        assert_eq!(v_of(&got), 1, "{}", got.header("cache-status"));
    }
    eventually(Duration::from_secs(10), "caching resumes", || async {
        proxy.get("/plain/2").await.x_cache() == "HIT"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_purge_by_tag_and_by_path() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let proxy = proxy_on(&redis, &origin).await;
    let auth = format!("Bearer {ADMIN}");
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    for p in ["/user/1", "/user/2", "/plain/3?x=1", "/plain/3?x=2"] {
        proxy.get(p).await;
        assert_eq!(proxy.get(p).await.x_cache(), "HIT", "{p}");
    }
    let got = proxy
        .admin("POST", "/purge", &h, r#"{"tags": ["user:1"]}"#)
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), r#"{"bumped":1,"queued":false}"#);
    assert_eq!(proxy.get("/user/1").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/user/2").await.x_cache(), "HIT");
    let got = proxy
        .admin("POST", "/purge", &h, r#"{"paths": ["/plain/3"]}"#)
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        proxy.get("/plain/3?x=1").await.x_cache(),
        "MISS",
        "every variant of the path"
    );
    assert_eq!(proxy.get("/plain/3?x=2").await.x_cache(), "MISS");
    assert_eq!(
        proxy
            .admin("POST", "/purge", &h, r#"{"all": true}"#)
            .await
            .status,
        200
    );
    assert_eq!(proxy.get("/user/2").await.x_cache(), "MISS");
    for bad in [
        r#"{"tags": []}"#,
        "not json",
        r#"{"tags": "x"}"#,
        r#"{"paths": ["/a/../b"]}"#,
        r#"{"nope": 1}"#,
    ] {
        let got = proxy.admin("POST", "/purge", &h, bad).await;
        assert_eq!(got.status, 400, "{bad}");
        assert!(got.text().contains("bad_request"), "{bad}: {}", got.text());
    }
    let refused = proxy.admin("POST", "/purge", &[], r#"{"all": true}"#).await;
    assert_eq!(refused.status, 401);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cachegate_purges_total{rule=\"none\",trigger=\"admin\"}"
        ),
        3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_post_on_an_auth_required_rule_purges_nothing() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let proxy = proxy_on(&redis, &origin).await;
    let carol = session(&redis, "carol").await;
    let h = [("authorization", carol.as_str())];
    proxy.get_with("/account/5", &h).await;
    assert_eq!(proxy.get_with("/account/5", &h).await.x_cache(), "HIT");
    let anonymous = proxy.send("POST", "/account/5", &[], "{}").await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(origin.total(), 1, "the write never reached the upstream");
    assert_eq!(
        proxy.get_with("/account/5", &h).await.x_cache(),
        "HIT",
        "nothing was purged"
    );
    assert_eq!(proxy.send("POST", "/account/5", &h, "{}").await.status, 200);
    assert_eq!(proxy.get_with("/account/5", &h).await.x_cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_of_a_write_is_invalidated() {
    let redis = Redis::start().await;
    let origin = Origin::start(handler(|s, n| {
        if s.method == "POST" {
            Answer::ok("{}")
                .status(201)
                .header("location", "/plain/created")
        } else {
            Answer::ok(format!("{{\"n\":{n}}}"))
        }
    }))
    .await;
    let proxy = proxy_on(&redis, &origin).await;
    proxy.get("/plain/created").await;
    assert_eq!(proxy.get("/plain/created").await.x_cache(), "HIT");
    assert_eq!(
        proxy.send("POST", "/plain/new", &[], "{}").await.status,
        201
    );
    assert_eq!(
        proxy.get("/plain/created").await.x_cache(),
        "MISS",
        "RFC 9111 §4.4: Location"
    );
}
