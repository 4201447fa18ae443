//! HTTP caching on the bad days: coalescing across instances, stale-while-revalidate,
//! stale-if-error, the origin's Cache-Control, revalidation with validators, client
//! directives, and the admin explain endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cache::Backend;
use crate::support::*;

/// One scripted answer: status, headers, body.
type Scripted1 = (u16, Vec<(String, String)>, String);
/// A row of the Cache-Control table: name, origin headers, stored?, reported freshness.
type Row<'a> = (&'a str, Vec<(&'a str, String)>, bool, Option<u64>);

/// An origin whose answers tests change on the fly, counting conditional requests apart.
struct Scripted {
    origin: Origin,
    /// (status, headers, body) of the next answers; the last one repeats.
    script: Arc<Mutex<Vec<Scripted1>>>,
    conditional: Arc<AtomicUsize>,
}

async fn scripted(first: (u16, &[(&str, &str)], &str)) -> Scripted {
    let script: Arc<Mutex<Vec<Scripted1>>> = Arc::new(Mutex::new(vec![(
        first.0,
        first
            .1
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        first.2.to_string(),
    )]));
    let conditional = Arc::new(AtomicUsize::new(0));
    let (s, c) = (script.clone(), conditional.clone());
    let origin = Origin::start(handler(move |seen, _| {
        if seen.headers.contains_key("if-none-match")
            || seen.headers.contains_key("if-modified-since")
        {
            c.fetch_add(1, Ordering::SeqCst);
        }
        let (status, headers, body) = {
            let mut v = s.lock().unwrap();
            if v.len() > 1 {
                v.remove(0)
            } else {
                v[0].clone()
            }
        };
        let mut a = Answer::ok(body).status(status);
        for (k, v) in headers {
            a = a.header(&k, &v);
        }
        a
    }))
    .await;
    Scripted {
        origin,
        script,
        conditional,
    }
}

impl Scripted {
    fn then(&self, status: u16, headers: &[(&str, &str)], body: &str) {
        self.script.lock().unwrap().push((
            status,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body.to_string(),
        ));
    }
    /// Replace everything still scripted with one answer.
    fn always(&self, status: u16, headers: &[(&str, &str)], body: &str) {
        let mut v = self.script.lock().unwrap();
        v.clear();
        v.push((
            status,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body.to_string(),
        ));
    }
}

fn rule(extra: &str) -> String {
    format!("[[rule]]\nname = \"r\"\nmatch = \"/r/{{id}}\"\nttl = \"5m\"\n{extra}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_cold_gets_make_one_upstream_request() {
    let s = scripted((200, &[], "one")).await;
    let release = s.origin.hold_next();
    let proxy = Arc::new(Proxy::start(&config(&s.origin, MEMORY_STORE, &rule(""))).await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move { p.get("/r/hot").await }));
    }
    // Every client is in flight while the one fill is held at the origin.
    eventually(
        Duration::from_secs(5),
        "the fill reaches the origin",
        || async { s.origin.total() == 1 },
    )
    .await;
    release.release();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "one"));
    }
    assert_eq!(s.origin.total(), 1);
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "cachegate_requests_total{outcome=\"coalesced\",rule=\"r\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "cachegate_lock_wait_seconds_count") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_the_distributed_lock_make_one_upstream_request() {
    let redis = Redis::start().await;
    let s = scripted((200, &[], "shared")).await;
    let release = s.origin.hold_next();
    let store = format!(
        "{}\n[cache]\ndistributed_lock = true\n",
        redis_store(&redis)
    );
    let a = Arc::new(Proxy::start(&config(&s.origin, &store, &rule(""))).await);
    let b = Arc::new(Proxy::start(&config(&s.origin, &store, &rule(""))).await);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let p = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            p.get_with("/r/hot", &[("host", "api.example.com")]).await
        }));
    }
    eventually(
        Duration::from_secs(5),
        "one fill reaches the origin",
        || async { s.origin.total() == 1 },
    )
    .await;
    release.release();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "shared"));
    }
    assert_eq!(
        s.origin.total(),
        1,
        "one upstream request for both instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let s = scripted((200, &[("cache-control", "max-age=0")], "old")).await;
    let text = config(
        &s.origin,
        MEMORY_STORE,
        &rule("stale_while_revalidate = \"1m\""),
    );
    let proxy = Arc::new(Proxy::start(&text).await);
    assert_eq!(proxy.get("/r/1").await.text(), "old");
    // The entry is written beside the response; the stale answers below need it stored.
    proxy.stored(1).await;
    s.always(200, &[("cache-control", "max-age=0")], "new");
    // Hold the refresh at the origin: the stale answers must not wait for it.
    let release = s.origin.hold_next();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move { p.get("/r/1").await }));
    }
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(
            got.text(),
            "old",
            "answered while the refresh is still held"
        );
        assert_eq!(got.x_cache(), "HIT");
        assert!(
            got.header("cache-status")
                .contains("detail=stale-while-revalidate"),
            "{}",
            got.header("cache-status")
        );
    }
    assert_eq!(s.origin.total(), 2, "one refresh for twenty stale answers");
    release.release();
    eventually(Duration::from_secs(5), "the refresh lands", || async {
        proxy.get("/r/1").await.text() == "new"
    })
    .await;
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "cachegate_requests_total{outcome=\"stale\",rule=\"r\"}") >= 20.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "cachegate_background_refreshes_total{result=\"refreshed\"}"
        ) >= 1.0,
        "{m}"
    );
}

async fn stale_if_error_covers_upstream_failures(b: Backend) {
    for failure in ["503", "down", "timeout"] {
        let s = scripted((200, &[("cache-control", "max-age=0")], "kept")).await;
        let store = b.store();
        let text = config(&s.origin, &store, &rule("stale_if_error = \"10m\""))
            .replace("timeout = \"2s\"", "timeout = \"300ms\"");
        let proxy = Proxy::start(&text).await;
        assert_eq!(proxy.get("/r/1").await.text(), "kept");
        proxy.stored(1).await;
        match failure {
            "503" => s.always(503, &[], "broken"),
            "timeout" => {
                // Never released: the upstream timeout runs out.
                std::mem::forget(s.origin.hold_next());
            }
            _ => s.origin.stop(),
        }
        let got = proxy.get("/r/1").await;
        assert_eq!(
            (got.status.as_u16(), got.text().as_str()),
            (200, "kept"),
            "{failure}"
        );
        let status = got.header("cache-status");
        assert!(
            status.contains("fwd=stale") && status.contains("detail=stale-if-error"),
            "{failure}: {status}"
        );
        if failure == "503" {
            assert!(status.contains("fwd-status=503"), "{status}");
        }
    }
}
crate::cache::on_both_stores!(stale_if_error_covers_upstream_failures);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_stale_if_error_window_failures_are_errors() {
    let s = scripted((200, &[("cache-control", "max-age=0")], "kept")).await;
    let text = config(&s.origin, MEMORY_STORE, &rule("stale_if_error = \"1s\""));
    let proxy = Proxy::start(&text).await;
    proxy.get("/r/1").await;
    s.always(503, &[], "broken");
    eventually(Duration::from_secs(5), "the window closes", || async {
        proxy.get("/r/1").await.status == 503
    })
    .await;
    s.origin.stop();
    let got = proxy.get("/r/1").await;
    assert_eq!(got.status, 502);
}

/// (origin headers, stored?, freshness the Cache-Status reports)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_cache_control_table() {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let expires = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    let cases: Vec<Row<'_>> = vec![
        ("plain", vec![], true, Some(300)),
        (
            "nostore",
            vec![("cache-control", "no-store".into())],
            false,
            None,
        ),
        (
            "private",
            vec![("cache-control", "private".into())],
            false,
            None,
        ),
        (
            "maxage",
            vec![("cache-control", "max-age=60".into())],
            true,
            Some(60),
        ),
        (
            "smaxage",
            vec![("cache-control", "max-age=60, s-maxage=30".into())],
            true,
            Some(30),
        ),
        (
            "capped",
            vec![("cache-control", "max-age=9999".into())],
            true,
            Some(300),
        ),
        (
            "expires",
            vec![("date", date.clone()), ("expires", expires)],
            true,
            Some(120),
        ),
        ("expired", vec![("expires", "0".into())], false, None),
        (
            "nocache",
            vec![
                ("cache-control", "no-cache".into()),
                ("etag", "\"e1\"".into()),
            ],
            true,
            Some(0),
        ),
        ("varystar", vec![("vary", "*".into())], false, None),
    ];
    for (name, headers, stored, ttl) in cases {
        let owned: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let s = scripted((200, &owned, name)).await;
        let proxy = Proxy::start(&config(&s.origin, MEMORY_STORE, &rule(""))).await;
        let first = proxy.get("/r/1").await;
        let status = first.header("cache-status").to_string();
        assert_eq!(status.contains("stored"), stored, "{name}: {status}");
        if let Some(ttl) = ttl {
            let reported: i64 = status
                .split("ttl=")
                .nth(1)
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(
                (reported - ttl as i64).abs() <= 1,
                "{name}: ttl {reported}, expected {ttl}"
            );
        }
        let second = proxy.get("/r/1").await;
        let expect_hit = stored && ttl.unwrap_or(0) > 0;
        assert_eq!(
            second.x_cache() == "HIT",
            expect_hit,
            "{name}: {}",
            second.header("cache-status")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_override_and_only_modes() {
    let s = scripted((
        200,
        &[("cache-control", "no-cache, no-store, must-revalidate")],
        "legacy",
    ))
    .await;
    let proxy = Proxy::start(&config(
        &s.origin,
        MEMORY_STORE,
        &rule("origin_cache_control = \"override\""),
    ))
    .await;
    proxy.get("/r/1").await;
    assert_eq!(
        proxy.get("/r/1").await.x_cache(),
        "HIT",
        "override caches what a legacy API marks no-store"
    );
    let s = scripted((200, &[], "silent")).await;
    let proxy = Proxy::start(&config(
        &s.origin,
        MEMORY_STORE,
        &rule("origin_cache_control = \"only\""),
    ))
    .await;
    let got = proxy.get("/r/1").await;
    assert!(
        got.header("cache-status")
            .contains("detail=no-explicit-freshness")
    );
    assert_eq!(proxy.get("/r/1").await.x_cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_304_on_revalidation_refreshes_the_entry_and_its_headers() {
    let s = scripted((
        200,
        &[
            ("cache-control", "no-cache"),
            ("etag", "\"v1\""),
            ("x-version", "1"),
        ],
        "body-v1",
    ))
    .await;
    let proxy = Proxy::start(&config(&s.origin, MEMORY_STORE, &rule(""))).await;
    assert_eq!(proxy.get("/r/1").await.text(), "body-v1");
    s.always(
        304,
        &[
            ("etag", "\"v1\""),
            ("x-version", "2"),
            ("cache-control", "no-cache"),
        ],
        "",
    );
    let got = proxy.get("/r/1").await;
    assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "body-v1"));
    assert_eq!(
        got.header("x-version"),
        "2",
        "stored headers updated from the 304"
    );
    assert_eq!(got.x_cache(), "HIT");
    let status = got.header("cache-status");
    assert!(
        status.contains("fwd=stale") && status.contains("fwd-status=304"),
        "{status}"
    );
    assert_eq!(
        s.conditional.load(Ordering::SeqCst),
        1,
        "revalidated with If-None-Match"
    );
    assert_eq!(s.origin.last().headers["if-none-match"], "\"v1\"");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cachegate_requests_total{outcome=\"revalidated\",rule=\"r\"}"
        ),
        1.0,
        "{m}"
    );
    // The refreshed headers were stored too.
    s.always(
        304,
        &[("etag", "\"v1\""), ("cache-control", "no-cache")],
        "",
    );
    assert_eq!(proxy.get("/r/1").await.header("x-version"), "2");
    // A client's own validator still gets a 304 after the revalidation.
    let cond = proxy.get_with("/r/1", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(cond.status, 304);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_no_cache_is_ignored_unless_honored() {
    let s = scripted((200, &[("etag", "\"a\"")], "cached")).await;
    let proxy = Proxy::start(&config(&s.origin, MEMORY_STORE, &rule(""))).await;
    proxy.get("/r/1").await;
    for h in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("pragma", "no-cache"),
    ] {
        assert_eq!(proxy.get_with("/r/1", &[h]).await.x_cache(), "HIT", "{h:?}");
    }
    assert_eq!(s.origin.total(), 1);

    let s = scripted((200, &[("etag", "\"a\"")], "cached")).await;
    s.then(304, &[("etag", "\"a\"")], "");
    let text = format!("{}\n[cache]\nhonor_client_no_cache = true\n", MEMORY_STORE);
    let proxy = Proxy::start(&config(&s.origin, &text, &rule(""))).await;
    proxy.get("/r/1").await;
    proxy.stored(1).await;
    let forced = proxy
        .get_with("/r/1", &[("cache-control", "no-cache")])
        .await;
    assert!(
        forced.header("cache-status").contains("fwd-status=304"),
        "{}",
        forced.header("cache-status")
    );
    assert_eq!(s.conditional.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_if_cached_without_an_entry_is_504() {
    let s = scripted((200, &[], "x")).await;
    let proxy = Proxy::start(&config(&s.origin, MEMORY_STORE, &rule(""))).await;
    let got = proxy
        .get_with("/r/1", &[("cache-control", "only-if-cached")])
        .await;
    assert_eq!(got.status, 504);
    assert_eq!(s.origin.total(), 0);
    proxy.get("/r/1").await;
    assert_eq!(
        proxy
            .get_with("/r/1", &[("cache-control", "only-if-cached")])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_says_why() {
    let s = scripted((200, &[], "x")).await;
    let rules = "[admin]\ntoken_env = \"ADMIN\"\n[[rule]]\nname = \"user\"\nmatch = \"/user/{id}\"\nttl = \"5m\"\n\
                 tags = [\"user:{id}\"]\npurge = [\"users\"]\n";
    let proxy = Proxy::start_env(
        &config(&s.origin, MEMORY_STORE, rules),
        &[("ADMIN", "explain-admin-token-01234")],
    )
    .await;
    proxy
        .get_with("/user/42?b=2&a=1", &[("host", "api.example.com")])
        .await;
    let auth = [("authorization", "Bearer explain-admin-token-01234")];
    let got = proxy
        .admin(
            "GET",
            "/explain?method=GET&url=%2Fuser%2F42%3Fb%3D2%26a%3D1&host=api.example.com",
            &auth,
            "",
        )
        .await;
    assert_eq!(got.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(v["rule"]["name"], "user");
    assert_eq!(v["rule"]["params"]["id"], "42");
    assert_eq!(v["key"]["normalized_query"], "a=1&b=2");
    assert_eq!(v["key"]["tags"][0], "user:42");
    assert_eq!(v["stored"]["state"], "fresh");
    assert!(
        v["decision"]
            .as_str()
            .unwrap()
            .starts_with("cached for up to 5m")
    );
    let put = proxy
        .admin("GET", "/explain?method=PUT&url=/user/42", &auth, "")
        .await;
    let v: serde_json::Value = serde_json::from_slice(&put.body).unwrap();
    assert_eq!(
        v["purge_on_success"],
        serde_json::json!(["users", "path:/user/42"])
    );
    let none = proxy
        .admin("GET", "/explain?url=/elsewhere", &auth, "")
        .await;
    let v: serde_json::Value = serde_json::from_slice(&none.body).unwrap();
    assert!(v["decision"].as_str().unwrap().contains("no rule matches"));
    assert_eq!(
        proxy
            .admin("GET", "/explain?url=/user/1", &[], "")
            .await
            .status,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_served_from_a_stored_response() {
    let s = scripted((200, &[("etag", "\"r1\"")], "0123456789")).await;
    let proxy = Proxy::start(&config(&s.origin, MEMORY_STORE, &rule(""))).await;
    let full = proxy.get_with("/r/1", &[("range", "bytes=2-4")]).await;
    assert_eq!(
        (full.status.as_u16(), full.text().as_str()),
        (200, "0123456789"),
        "a miss fetches the whole body"
    );
    assert!(!s.origin.last().headers.contains_key("range"));
    proxy.stored(1).await;
    let part = proxy.get_with("/r/1", &[("range", "bytes=2-4")]).await;
    assert_eq!((part.status.as_u16(), part.text().as_str()), (206, "234"));
    assert_eq!(part.header("content-range"), "bytes 2-4/10");
    assert_eq!(part.x_cache(), "HIT");
    let bad = proxy.get_with("/r/1", &[("range", "bytes=20-30")]).await;
    assert_eq!(bad.status, 416);
    assert_eq!(bad.header("content-range"), "bytes */10");
    let changed = proxy
        .get_with("/r/1", &[("range", "bytes=2-4"), ("if-range", "\"r0\"")])
        .await;
    assert_eq!(
        (changed.status.as_u16(), changed.text().as_str()),
        (200, "0123456789")
    );
    assert_eq!(s.origin.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_fields_are_not_stored() {
    let s = scripted((
        200,
        &[
            ("proxy-authentication-info", "nextnonce=\"x\""),
            ("x-kept", "1"),
        ],
        "b",
    ))
    .await;
    let proxy = Proxy::start(&config(&s.origin, MEMORY_STORE, &rule(""))).await;
    proxy.get("/r/1").await;
    proxy.stored(1).await;
    let hit = proxy.get("/r/1").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!(!hit.headers.contains_key("proxy-authentication-info"));
    assert_eq!(hit.header("x-kept"), "1");
}
