//! The read-through cache, end to end: real Redis (and the embedded store where it applies),
//! a counting origin, assertions on what a client and an operator can observe.

use std::time::{Duration, Instant};

use crate::support::*;

/// Which store a test runs against. Redis is kept alive for the test's duration.
pub enum Backend {
    Memory,
    Redis(Redis),
}

impl Backend {
    pub async fn redis() -> Backend {
        Backend::Redis(Redis::start().await)
    }
    pub fn store(&self) -> String {
        match self {
            Backend::Memory => MEMORY_STORE.to_string(),
            Backend::Redis(r) => redis_store(r),
        }
    }
}

/// Run one scenario against both stores.
macro_rules! on_both_stores {
    ($scenario:ident) => {
        mod $scenario {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$scenario(Backend::redis().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$scenario(Backend::Memory).await;
            }
        }
    };
}
pub(crate) use on_both_stores;

const USER_RULE: &str =
    "[[rule]]\nname = \"user\"\nmatch = \"/user/{id}\"\nttl = \"5m\"\ntags = [\"user:{id}\"]\n";

async fn miss_then_hit_with_one_upstream_call(b: Backend) {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, &b.store(), USER_RULE)).await;
    let first = proxy.get("/user/42").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    assert!(
        first.header("cache-status").contains("fwd=uri-miss"),
        "{}",
        first.header("cache-status")
    );
    assert!(first.header("cache-status").contains("stored"));
    // The entry is written in the background; until then a request is answered from the
    // finished fill (collapsed) rather than from the store.
    proxy.stored(1).await;
    let second = proxy.get("/user/42").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.x_cache(), "HIT");
    assert!(
        second
            .header("cache-status")
            .starts_with("cachegate; hit; ttl="),
        "{}",
        second.header("cache-status")
    );
    assert_eq!(second.body, first.body);
    assert!(second.headers.contains_key("age"));
    assert_eq!(second.header("content-type"), "application/json");
    assert_eq!(origin.hits("/user/42"), 1, "exactly one upstream call");
}
on_both_stores!(miss_then_hit_with_one_upstream_call);

async fn ttl_expiry_refetches(b: Backend) {
    let origin = Origin::echo().await;
    let rule = "[[rule]]\nname = \"short\"\nmatch = \"/short/{id}\"\nttl = \"1s\"\n";
    let proxy = Proxy::start(&config(&origin, &b.store(), rule)).await;
    assert_eq!(proxy.get("/short/1").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/short/1").await.x_cache(), "HIT");
    eventually(
        Duration::from_secs(5),
        "the entry expires and is fetched again",
        || async { proxy.get("/short/1").await.x_cache() == "MISS" },
    )
    .await;
    assert_eq!(origin.hits("/short/1"), 2);
}
on_both_stores!(ttl_expiry_refetches);

async fn query_order_does_not_split_the_cache(b: Backend) {
    let origin = Origin::echo().await;
    let rules = "[[rule]]\nname = \"list\"\nmatch = \"/users\"\nttl = \"5m\"\n\
                 [[rule]]\nname = \"search\"\nmatch = \"/search\"\nttl = \"5m\"\nquery = \"ignore\"\n\
                 [[rule]]\nname = \"page\"\nmatch = \"/page\"\nttl = \"5m\"\nquery = [\"page\"]\n";
    let proxy = Proxy::start(&config(&origin, &b.store(), rules)).await;
    assert_eq!(proxy.get("/users?b=2&a=1").await.x_cache(), "MISS");
    let again = proxy.get("/users?a=1&b=2").await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(origin.total(), 1);
    assert_eq!(
        proxy.get("/users?a=1&b=3").await.x_cache(),
        "MISS",
        "a different value is a different entry"
    );

    assert_eq!(proxy.get("/search?q=x").await.x_cache(), "MISS");
    assert_eq!(
        proxy.get("/search?q=y").await.x_cache(),
        "HIT",
        "query = \"ignore\" merges them"
    );

    assert_eq!(proxy.get("/page?page=1&utm=a").await.x_cache(), "MISS");
    assert_eq!(
        proxy.get("/page?utm=b&page=1").await.x_cache(),
        "HIT",
        "only listed parameters count"
    );
    assert_eq!(proxy.get("/page?page=2").await.x_cache(), "MISS");
    // The upstream still receives the query as sent.
    assert_eq!(origin.last().query.as_deref(), Some("page=2"));
}
on_both_stores!(query_order_does_not_split_the_cache);

async fn vary_splits_entries(b: Backend) {
    let origin = Origin::start(handler(|s, _| {
        let lang = s
            .headers
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        Answer::ok(format!("lang={lang}"))
    }))
    .await;
    let rule = "[[rule]]\nname = \"i18n\"\nmatch = \"/greeting\"\nttl = \"5m\"\nvary = [\"Accept-Language\"]\n";
    let proxy = Proxy::start(&config(&origin, &b.store(), rule)).await;
    let fr = proxy
        .get_with("/greeting", &[("accept-language", "fr")])
        .await;
    let en = proxy
        .get_with("/greeting", &[("accept-language", "en")])
        .await;
    assert_eq!(fr.text(), "lang=fr");
    assert_eq!(en.text(), "lang=en");
    let fr2 = proxy
        .get_with("/greeting", &[("accept-language", "fr")])
        .await;
    assert_eq!(fr2.x_cache(), "HIT");
    assert_eq!(fr2.text(), "lang=fr");
    assert_eq!(origin.total(), 2);
}
on_both_stores!(vary_splits_entries);

async fn uncacheable_responses_are_not_stored(b: Backend) {
    let origin = Origin::start(handler(|s, _| match s.path.as_str() {
        "/r/cookie" => Answer::ok("c").header("set-cookie", "session=abc"),
        "/r/nostore" => Answer::ok("n").header("cache-control", "no-store"),
        "/r/private" => Answer::ok("p").header("cache-control", "private, max-age=60"),
        "/r/error" => Answer::ok("e").status(500),
        _ => Answer::ok("ok"),
    }))
    .await;
    let rule = "[[rule]]\nname = \"r\"\nmatch = \"/r/{what}\"\nttl = \"5m\"\n";
    let proxy = Proxy::start(&config(&origin, &b.store(), rule)).await;
    for (path, reason) in [
        ("/r/cookie", "set-cookie"),
        ("/r/nostore", "no-store"),
        ("/r/private", "private"),
        ("/r/error", "status"),
    ] {
        let first = proxy.get(path).await;
        assert_eq!(first.x_cache(), "MISS", "{path}");
        assert!(
            first
                .header("cache-status")
                .contains(&format!("detail={reason}")),
            "{path}: {}",
            first.header("cache-status")
        );
        assert!(!first.header("cache-status").contains("stored"), "{path}");
        assert_eq!(
            proxy.get(path).await.x_cache(),
            "MISS",
            "{path} must not be served from cache"
        );
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    // The origin's Set-Cookie reaches the client untouched.
    assert_eq!(
        proxy.get("/r/cookie").await.header("set-cookie"),
        "session=abc"
    );
    assert_eq!(proxy.get("/r/ok").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/r/ok").await.x_cache(), "HIT");
    if let Backend::Redis(r) = &b {
        assert_eq!(
            r.keys("cachegate:e:*").await.len(),
            1,
            "only /r/ok was stored"
        );
    }
}
on_both_stores!(uncacheable_responses_are_not_stored);

async fn large_body_streams_through_and_is_not_stored(b: Backend) {
    let big: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let big = bytes::Bytes::from(big);
    let body = big.clone();
    let origin = Origin::start(handler(move |s, _| {
        // One response with Content-Length, one chunked (size unknown until the end).
        let a = Answer::ok(body.clone());
        if s.path.ends_with("chunked") {
            a.chunked(40)
        } else {
            a
        }
    }))
    .await;
    let rule = "[[rule]]\nname = \"blob\"\nmatch = \"/blob/{id}\"\nttl = \"5m\"\n";
    let store = format!("{}\n[cache]\nmax_object_size = \"1MiB\"\n", b.store());
    let proxy = Proxy::start(&config(&origin, &store, rule)).await;
    for path in ["/blob/sized", "/blob/chunked"] {
        let first = proxy.get(path).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.body.len(), big.len(), "{path}");
        assert!(first.body == big, "{path}: body intact");
        let second = proxy.get(path).await;
        assert_eq!(second.x_cache(), "MISS", "{path}");
        assert!(second.body == big);
        assert_eq!(origin.hits(path), 2, "{path} is not stored");
    }
    if let Backend::Redis(r) = &b {
        assert!(r.keys("cachegate:e:*").await.is_empty());
    }
}
on_both_stores!(large_body_streams_through_and_is_not_stored);

async fn head_is_answered_from_the_get_entry(b: Backend) {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, &b.store(), USER_RULE)).await;
    let get = proxy.get("/user/7").await;
    let head = proxy.send("HEAD", "/user/7", &[], "").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.x_cache(), "HIT");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert_eq!(origin.hits("/user/7"), 1);
    // A HEAD miss fills the cache for the next GET.
    let head = proxy.send("HEAD", "/user/8", &[], "").await;
    assert_eq!(head.x_cache(), "MISS");
    assert!(head.body.is_empty());
    eventually(
        Duration::from_secs(5),
        "the HEAD fill is stored",
        || async { proxy.get("/user/8").await.x_cache() == "HIT" },
    )
    .await;
    assert_eq!(origin.hits("/user/8"), 1);
    assert_eq!(
        origin.last().method,
        "GET",
        "fills fetch the full representation"
    );
}
on_both_stores!(head_is_answered_from_the_get_entry);

async fn conditional_request_gets_304_from_cache(b: Backend) {
    let origin = Origin::start(handler(|_, _| Answer::ok("v1").header("etag", "\"v1\""))).await;
    let proxy = Proxy::start(&config(&origin, &b.store(), USER_RULE)).await;
    proxy.get("/user/1").await;
    let cond = proxy
        .get_with("/user/1", &[("if-none-match", "\"v1\"")])
        .await;
    assert_eq!(cond.status, 304);
    assert!(cond.body.is_empty());
    assert_eq!(cond.header("etag"), "\"v1\"");
    let other = proxy
        .get_with("/user/1", &[("if-none-match", "\"v0\"")])
        .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.text(), "v1");
    assert_eq!(origin.total(), 1);
}
on_both_stores!(conditional_request_gets_304_from_cache);

async fn concurrent_cold_misses_make_one_upstream_request(b: Backend) {
    let origin = Origin::start(Arc::new(|_s, n| {
        Box::pin(async move {
            // Hold the first answer back long enough for every client to arrive.
            tokio::time::sleep(Duration::from_millis(200)).await;
            Answer::ok(format!("n={n}"))
        })
    }))
    .await;
    let proxy = std::sync::Arc::new(Proxy::start(&config(&origin, &b.store(), USER_RULE)).await);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move { p.get("/user/hot").await }));
    }
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "n=1");
    }
    assert_eq!(origin.hits("/user/hot"), 1);
}
on_both_stores!(concurrent_cold_misses_make_one_upstream_request);

use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_test_keeps_serving_and_caching_resumes() {
    let mut redis = Redis::start().await;
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, &redis_store(&redis), USER_RULE)).await;
    assert_eq!(proxy.get("/user/1").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/user/1").await.x_cache(), "HIT");

    redis.kill();
    for i in 0..20 {
        let got = proxy.get("/user/1").await;
        assert_eq!(got.status, 200, "request {i} while Redis is down");
        assert_eq!(got.x_cache(), "BYPASS");
    }
    let ready = proxy.admin("GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("redis"), "{}", ready.text());
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "cachegate_store_errors_total{op=\"lookup\"}") >= 1.0,
        "{m}"
    );

    redis.restart().await;
    eventually(
        Duration::from_secs(10),
        "caching resumes after Redis returns",
        || async { proxy.get("/user/2").await.x_cache() == "HIT" },
    )
    .await;
    assert_eq!(proxy.admin("GET", "/readyz", &[], "").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_is_a_bypass_not_a_failure() {
    let mut redis = Redis::start().await;
    redis.kill();
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, &redis_store(&redis), USER_RULE)).await;
    let got = proxy.get("/user/1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.x_cache(), "BYPASS");
    redis.restart().await;
    eventually(
        Duration::from_secs(10),
        "caching starts once Redis is up",
        || async { proxy.get("/user/1").await.x_cache() == "HIT" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_latency_is_bounded_by_the_command_timeout() {
    let redis = Redis::start().await;
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(
        &origin,
        &redis_store_timeout(&redis, "100ms"),
        USER_RULE,
    ))
    .await;
    proxy.get("/user/1").await;
    let pause_ms = 5_000u64;
    assert_eq!(
        redis.raw(&format!("CLIENT PAUSE {pause_ms} ALL")).await,
        "+OK"
    );
    let paused_at = Instant::now();
    for _ in 0..10 {
        let got = proxy.get("/user/1").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.x_cache(), "BYPASS");
    }
    // All ten were answered before the pause ended: none waited for Redis to come back.
    assert!(
        paused_at.elapsed() < Duration::from_millis(pause_ms),
        "requests waited on a paused Redis"
    );
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "cachegate_store_errors_total{op=\"lookup\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_the_entry_key_is_a_miss_then_overwritten() {
    let redis = Redis::start().await;
    let origin = Origin::echo().await;
    // Without the in-process tier, whose copy stays valid whatever the entry key holds.
    let store = format!("{}[cache]\nl1_max_bytes = \"0\"\n", redis_store(&redis));
    let proxy = Proxy::start(&config(&origin, &store, USER_RULE)).await;
    proxy.get("/user/5").await;
    let keys = redis.keys("cachegate:e:*").await;
    assert_eq!(keys.len(), 1);
    for garbage in ["not an entry", "CGE\u{1}truncated"] {
        let _: () = redis.cmd(&["SET", &keys[0], garbage]).await;
        let got = proxy.get("/user/5").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.x_cache(), "MISS");
        assert!(
            got.header("cache-status")
                .contains("detail=unreadable-entry")
        );
        assert_eq!(
            proxy.get("/user/5").await.x_cache(),
            "HIT",
            "the entry was rewritten"
        );
    }
    // A value of another type under the key is handled the same way.
    let _: () = redis.cmd(&["DEL", &keys[0]]).await;
    let _: () = redis.cmd(&["HSET", &keys[0], "f", "v"]).await;
    let got = proxy.get("/user/5").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.x_cache(), "MISS");
    let again = proxy.get("/user/5").await;
    assert_eq!(again.x_cache(), "HIT", "{}", again.header("cache-status"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_binary_envelopes_with_a_ttl_and_hashed_keys() {
    let redis = Redis::start().await;
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, &redis_store(&redis), USER_RULE)).await;
    proxy.get("/user/42?x=%2F*").await;
    let keys = redis.keys("cachegate:*").await;
    assert!(!keys.is_empty());
    for k in &keys {
        // Only hex after the prefix and kind: no request byte forms a key.
        let tail = k.strip_prefix("cachegate:").unwrap();
        let (kind, hex) = tail.split_once(':').unwrap();
        assert!(kind == "e" || kind == "g", "{k}");
        assert!(
            hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
            "{k}"
        );
    }
    let entry = redis.keys("cachegate:e:*").await.remove(0);
    let ttl: i64 = redis.cmd(&["PTTL", &entry]).await;
    assert!(ttl > 0 && ttl <= 300_000, "entry has the rule's TTL: {ttl}");
    let raw: Vec<u8> = redis.cmd(&["GET", &entry]).await;
    assert_eq!(&raw[..4], b"CGE\x01", "versioned binary envelope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_redis() {
    let redis = Redis::start().await;
    let origin = Origin::echo().await;
    let a = Proxy::start(&config(&origin, &redis_store(&redis), USER_RULE)).await;
    let b = Proxy::start(&config(&origin, &redis_store(&redis), USER_RULE)).await;
    let host = [("host", "api.example.com")];
    assert_eq!(a.get_with("/user/9", &host).await.x_cache(), "MISS");
    // A's store write runs beside its response; B sees the entry once it has landed.
    eventually(Duration::from_secs(5), "A's fill is in Redis", || async {
        !redis.keys("cachegate:e:*").await.is_empty()
    })
    .await;
    assert_eq!(b.get_with("/user/9", &host).await.x_cache(), "HIT");
    assert_eq!(origin.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_hit_and_a_miss() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, USER_RULE)).await;
    proxy.get("/user/1").await;
    // The entry is written beside the response: the second GET is a hit once it has landed.
    proxy.stored(1).await;
    proxy.get("/user/1").await;
    proxy.get("/elsewhere").await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cachegate_requests_total{outcome=\"miss\",rule=\"user\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "cachegate_requests_total{outcome=\"hit\",rule=\"user\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "cachegate_requests_total{outcome=\"bypass\",rule=\"none\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "cachegate_upstream_duration_seconds_count{rule=\"user\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(!m.contains("/user/1"), "no raw path becomes a label");
    let health = proxy.admin("GET", "/healthz", &[], "").await;
    assert_eq!(health.status, 200);
    assert_eq!(proxy.admin("GET", "/readyz", &[], "").await.status, 200);
}

async fn origin_vary_keeps_variants_apart(b: Backend) {
    // An origin that compresses for clients that accept gzip, and says so with Vary.
    let origin = Origin::start(handler(|s, _| {
        let gzip = s
            .headers
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("gzip"));
        let lang = s
            .headers
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("en")
            .to_string();
        let a = Answer::ok(if gzip {
            format!("gzip-bytes-{lang}")
        } else {
            format!("plain-{lang}")
        })
        .header("vary", "Accept-Encoding, Accept-Language");
        if gzip {
            a.header("content-encoding", "gzip")
        } else {
            a
        }
    }))
    .await;
    let rule = "[[rule]]\nname = \"doc\"\nmatch = \"/doc\"\nttl = \"5m\"\n";
    let proxy = Proxy::start(&config(&origin, &b.store(), rule)).await;
    let gz = [
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "fr"),
    ];
    let plain = [("accept-encoding", "identity"), ("accept-language", "fr")];
    let first = proxy.get_with("/doc", &gz).await;
    assert_eq!(
        (first.x_cache(), first.text().as_str()),
        ("MISS", "gzip-bytes-fr")
    );
    assert_eq!(
        origin.last().headers["accept-encoding"],
        "gzip",
        "fills forward the bucket"
    );
    let other = proxy.get_with("/doc", &plain).await;
    assert_eq!(
        other.text(),
        "plain-fr",
        "a client without gzip never gets the gzip variant"
    );
    assert!(!other.headers.contains_key("content-encoding"));
    let gz_hit = proxy
        .get_with(
            "/doc",
            &[("accept-encoding", "gzip"), ("accept-language", "fr")],
        )
        .await;
    assert_eq!(
        (gz_hit.x_cache(), gz_hit.text().as_str()),
        ("HIT", "gzip-bytes-fr"),
        "{}",
        gz_hit.header("cache-status")
    );
    assert_eq!(gz_hit.header("content-encoding"), "gzip");
    let plain_hit = proxy.get_with("/doc", &plain).await;
    assert_eq!(
        (plain_hit.x_cache(), plain_hit.text().as_str()),
        ("HIT", "plain-fr")
    );
    let de = proxy
        .get_with(
            "/doc",
            &[("accept-encoding", "identity"), ("accept-language", "de")],
        )
        .await;
    assert_eq!((de.x_cache(), de.text().as_str()), ("MISS", "plain-de"));
    // The very first fill could not know the resource varies on Accept-Language, so it was
    // asked without it (a fill sends only what the key describes) and asked once more with
    // it; every later fill of the resource sends it from the start.
    assert_eq!(origin.total(), 4);
}
on_both_stores!(origin_vary_keeps_variants_apart);

async fn fills_ask_the_upstream_for_what_the_key_says(b: Backend) {
    let origin = Origin::echo().await;
    let rule =
        "[[rule]]\nname = \"page\"\nmatch = \"/page/{id}\"\nttl = \"5m\"\nquery = [\"page\"]\n";
    let proxy = Proxy::start(&config(&origin, &b.store(), rule)).await;
    // A parameter left out of the key cannot shape the stored response...
    let poisoned = proxy.get("/page/1?page=2&callback=evil").await;
    assert_eq!(origin.last().query.as_deref(), Some("page=2"));
    assert!(!poisoned.text().contains("evil"));
    let clean = proxy.get("/page/1?page=2").await;
    assert_eq!(clean.x_cache(), "HIT");
    assert!(!clean.text().contains("evil"));
    // ...and the upstream sees the canonical path that was routed and keyed.
    proxy.get("/page/%32?page=3").await;
    assert_eq!(origin.last().path, "/page/2");
}
on_both_stores!(fills_ask_the_upstream_for_what_the_key_says);

async fn empty_responses_are_cached(b: Backend) {
    let origin = Origin::start(handler(|s, _| {
        if s.path.ends_with("204") {
            Answer::ok("").status(204)
        } else {
            Answer::ok("")
        }
    }))
    .await;
    let rule = "[[rule]]\nname = \"e\"\nmatch = \"/e/{x}\"\nttl = \"5m\"\n";
    let proxy = Proxy::start(&config(&origin, &b.store(), rule)).await;
    for path in ["/e/204", "/e/200"] {
        assert_eq!(proxy.get(path).await.x_cache(), "MISS");
        let again = proxy.get(path).await;
        assert_eq!(again.x_cache(), "HIT", "{path}");
        assert!(again.body.is_empty());
        assert_eq!(origin.hits(path), 1, "{path}");
    }
}
on_both_stores!(empty_responses_are_cached);

async fn a_no_store_request_is_not_stored(b: Backend) {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, &b.store(), USER_RULE)).await;
    let got = proxy
        .get_with("/user/3", &[("cache-control", "no-store")])
        .await;
    assert_eq!(got.x_cache(), "BYPASS");
    assert!(
        got.header("cache-status")
            .contains("detail=request-no-store")
    );
    assert_eq!(
        proxy.get("/user/3").await.x_cache(),
        "MISS",
        "nothing was stored"
    );
    // Once stored, a no-store request may still be answered from the cache.
    assert_eq!(
        proxy
            .get_with("/user/3", &[("cache-control", "no-store")])
            .await
            .x_cache(),
        "HIT"
    );
}
on_both_stores!(a_no_store_request_is_not_stored);
