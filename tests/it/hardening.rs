//! Hostile input and faults: a stored response depends only on its key; connections, store
//! replies and bursts cannot starve the proxy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Headers a client can send that a careless origin reflects: none of them is part of any
/// key, so none may reach an entry another client gets. Each with a marker to look for.
const POISON: &[(&str, &str, &str)] = &[
    ("forwarded", "for=6.6.6.6;host=evil.example", "evil.example"),
    ("x-forwarded-host", "evil2.example", "evil2.example"),
    ("x-forwarded-for", "6.6.6.7", "6.6.6.7"),
    ("x-original-url", "/admin-panel", "/admin-panel"),
    ("x-http-method-override", "DELETE", "DELETE"),
    ("x_http_method_override", "PATCH", "PATCH"),
    ("cookie", "session=alice-secret", "alice-secret"),
    ("x-api-key", "alice-api-key", "alice-api-key"),
    ("user-agent", "<script>evil()</script>", "<script>"),
    ("x-poison", "poisoned-value", "poisoned-value"),
];

async fn reflected_headers_never_reach_another_client(rule_extra: &str) {
    let origin = Origin::reflect().await;
    let rule =
        format!("[[rule]]\nname = \"page\"\nmatch = \"/page/{{id}}\"\nttl = \"5m\"\n{rule_extra}");
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, &rule)).await;
    for (i, (name, value, marker)) in POISON.iter().enumerate() {
        let path = format!("/page/{i}");
        let poisoned = proxy.get_with(&path, &[(name, value)]).await;
        assert_eq!(poisoned.status, 200, "{name}");
        let clean = proxy.get(&path).await;
        assert_eq!(clean.status, 200);
        assert!(
            !clean.text().contains(marker),
            "{name} sent by one client reached another:\n{}",
            clean.text()
        );
    }
    // All of them at once, on a cold key.
    let all: Vec<(&str, &str)> = POISON.iter().map(|(n, v, _)| (*n, *v)).collect();
    proxy.get_with("/page/all", &all).await;
    let clean = proxy.get("/page/all").await;
    for (name, _, marker) in POISON {
        assert!(!clean.text().contains(marker), "{name}: {}", clean.text());
    }
    // And what the origin was asked on a fill is only what the key says.
    let cached = proxy.get("/page/fresh").await;
    assert_eq!(cached.x_cache(), "MISS");
    let seen = origin.last();
    let mut names: Vec<&str> = seen.headers.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "accept-encoding",
            "forwarded",
            "host",
            "via",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflected_headers_never_reach_another_client_on_the_default_rule() {
    reflected_headers_never_reach_another_client("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflected_headers_never_reach_another_client_on_a_public_rule() {
    reflected_headers_never_reach_another_client("scope = \"public\"\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_keep_a_request_away_from_shared_entries() {
    let origin = Origin::reflect().await;
    let rule = "[[rule]]\nname = \"page\"\nmatch = \"/page/{id}\"\nttl = \"5m\"\n";
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, rule)).await;
    assert_eq!(proxy.get("/page/1").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/page/1").await.x_cache(), "HIT");
    for (name, value) in [("cookie", "s=1"), ("x-api-key", "k")] {
        let got = proxy.get_with("/page/1", &[(name, value)]).await;
        assert_eq!(got.x_cache(), "BYPASS", "{name}");
        assert!(got.header("cache-status").contains("detail=credentials"));
        assert!(got.text().contains(value), "passed through to the origin");
    }
    // A configured list replaces the default.
    let rule = "[cache]\ncredential_headers = [\"x-tenant-token\"]\n[[rule]]\nname = \"page\"\nmatch = \"/page/{id}\"\nttl = \"5m\"\n";
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, rule)).await;
    proxy.get("/page/2").await;
    let got = proxy.get_with("/page/2", &[("x-tenant-token", "t")]).await;
    assert_eq!(got.x_cache(), "BYPASS");
    assert_eq!(
        proxy
            .get_with("/page/2", &[("cookie", "s=1")])
            .await
            .x_cache(),
        "HIT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_headers_are_forwarded_and_keyed() {
    let origin = Origin::reflect().await;
    let rule = "[admin]\ntoken_env = \"ADMIN\"\n[[rule]]\nname = \"page\"\nmatch = \"/page/{id}\"\nttl = \"5m\"\nvary = [\"x-tenant\"]\nfill_headers = [\"x-tenant\", \"x-trace-flag\"]\nfill_headers_unkeyed_ok = true\n";
    let admin = "admin-token-0123456789";
    let proxy = Proxy::start_env(&config(&origin, MEMORY_STORE, rule), &[("ADMIN", admin)]).await;
    let a = proxy.get_with("/page/1", &[("x-tenant", "acme")]).await;
    assert!(a.text().contains("x-tenant: acme"));
    let b = proxy.get_with("/page/1", &[("x-tenant", "other")]).await;
    assert_eq!(b.x_cache(), "MISS", "another tenant, another entry");
    assert!(b.text().contains("x-tenant: other"));
    let c = proxy
        .get_with("/page/2", &[("x-trace-flag", "1"), ("x-other", "no")])
        .await;
    assert!(
        c.text().contains("x-trace-flag: 1"),
        "an unkeyed fill header the operator accepted"
    );
    assert!(!c.text().contains("x-other"));
    let explain = proxy
        .admin(
            "GET",
            "/explain?url=/page/1",
            &[("authorization", &format!("Bearer {admin}"))],
            "",
        )
        .await;
    assert_eq!(explain.status, 200);
    let report: serde_json::Value = serde_json::from_slice(&explain.body).unwrap();
    let headers = report["fill_request"]["headers"].to_string();
    for name in [
        "host",
        "x-tenant",
        "x-trace-flag",
        "accept-encoding",
        "forwarded",
    ] {
        assert!(headers.contains(name), "{name} missing from {headers}");
    }
    assert!(!headers.contains("cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_get_is_not_cached() {
    let origin = Origin::echo().await;
    let rule = "[[rule]]\nname = \"user\"\nmatch = \"/user/{id}\"\nttl = \"5m\"\n";
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, rule)).await;

    let got = proxy
        .get_with("/user/2", &[("x-http-method-override", "GET")])
        .await;
    assert_eq!(got.x_cache(), "BYPASS");
    assert!(got.header("cache-status").contains("detail=override"));
    assert_eq!(
        origin.last().headers["x-http-method-override"],
        "GET",
        "passed through as sent"
    );
    assert_eq!(
        proxy.get("/user/2").await.x_cache(),
        "MISS",
        "nothing was stored by the overriding request"
    );
    let got = proxy
        .get_with("/user/2", &[("x-original-url", "/user/3")])
        .await;
    assert_eq!(got.x_cache(), "BYPASS", "never served from the cache");

    // A write in disguise purges like the write.
    assert_eq!(proxy.get("/user/1").await.x_cache(), "MISS");
    assert_eq!(proxy.get("/user/1").await.x_cache(), "HIT");
    let write = proxy
        .get_with("/user/1", &[("x-http-method-override", "DELETE")])
        .await;
    assert_eq!(write.status, 200);
    let after = proxy.get("/user/1").await;
    assert_eq!(after.x_cache(), "MISS", "{}", after.header("cache-status"));
    // An overriding URL purges its own path too.
    assert_eq!(proxy.get("/user/7").await.x_cache(), "MISS");
    proxy
        .send("POST", "/user/8", &[("x-original-url", "/user/7")], "")
        .await;
    assert_eq!(proxy.get("/user/7").await.x_cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_override_is_gated_like_its_target() {
    let origin = Origin::echo().await;
    let rules = "[auth]\njwt_secret_env = \"JWT_SECRET\"\n\n[[rule]]\nname = \"open\"\nmatch = \"/open\"\nauth = \"none\"\n\n[[rule]]\nname = \"admin\"\nmatch = \"/admin/{*rest}\"\nauth = \"required\"\n";
    let redis = Redis::start().await;
    let proxy = Proxy::start_env(
        &config(&origin, &redis_store(&redis), rules),
        &[("JWT_SECRET", "0123456789abcdef0123")],
    )
    .await;
    let got = proxy
        .get_with("/open", &[("x-original-url", "/admin/users")])
        .await;
    assert_eq!(got.status, 401, "the stricter policy of the two paths");
    // Several overriding URLs: whichever the upstream reads, each is gated.
    let got = proxy
        .get_with(
            "/open",
            &[
                ("x-rewrite-url", "/open"),
                ("x-original-url", "/admin/users"),
            ],
        )
        .await;
    assert_eq!(got.status, 401, "every overriding URL counts");
    assert_eq!(origin.total(), 0);
    let got = proxy
        .get_with("/open", &[("x-rewrite-url", "/a/../admin/users")])
        .await;
    assert_eq!(
        got.status, 400,
        "an ambiguous override is refused like a path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_forwarded_header_is_replaced() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    proxy
        .get_with(
            "/x",
            &[
                ("forwarded", "for=203.0.113.9;host=evil.example;proto=https"),
                ("host", "api.example.com"),
            ],
        )
        .await;
    let seen = origin.last();
    let forwarded: Vec<_> = seen.headers.get_all("forwarded").iter().collect();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(
        forwarded[0],
        "for=127.0.0.1;host=api.example.com;proto=http"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_at_max_connections_do_not_lock_out_a_real_client() {
    let origin = Origin::echo().await;
    let proxy = Proxy::builder(&origin)
        .server("max_connections = 16")
        .server("header_read_timeout = \"60s\"")
        .server("idle_timeout = \"60s\"")
        .start()
        .await;
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    eventually(Duration::from_secs(10), "the table is full", || async {
        metric(&proxy.metrics().await, "cachegate_open_connections") >= 16.0
    })
    .await;
    // Far sooner than any of the silent sockets would time out on its own.
    let got = tokio::time::timeout(Duration::from_secs(20), proxy.get("/hello"))
        .await
        .expect("a real client is answered while silent sockets fill the table");
    assert_eq!(got.status, 200);
    let mut closed = 0;
    for s in &mut silent {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 1, "the oldest idle socket made room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_preface_connections_are_closed_after_the_header_timeout() {
    let origin = Origin::echo().await;
    let proxy = Proxy::builder(&origin)
        .server("header_read_timeout = \"500ms\"")
        .start()
        .await;
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut half = TcpStream::connect(proxy.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut slow_h1 = TcpStream::connect(proxy.addr).await.unwrap();
    slow_h1
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    for (what, s) in [
        ("silent", &mut silent),
        ("half preface", &mut half),
        ("half head", &mut slow_h1),
    ] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "{what} connection still open");
    }
}

/// An HTTP/2 (prior knowledge) connection to the proxy.
async fn h2(
    proxy: &Proxy,
    ping_every: Option<Duration>,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if let Some(every) = ping_every {
        builder
            .keep_alive_interval(every)
            .keep_alive_while_idle(true);
    }
    let (send, conn) = builder.handshake(TokioIo::new(tcp)).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn h2_get(proxy: &Proxy, path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(proxy.url(path))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_after_idle_timeout() {
    let origin = Origin::echo().await;
    let proxy = Proxy::builder(&origin)
        .server("idle_timeout = \"500ms\"")
        .start()
        .await;
    // A client that answers (and sends) PINGs is still idle: no request in flight.
    let (mut send, conn) = h2(&proxy, Some(Duration::from_millis(100))).await;
    let resp = send.send_request(h2_get(&proxy, "/x")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle connection was closed")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_header_count_and_size_are_limited_like_http1() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let (mut send, _conn) = h2(&proxy, None).await;
    let mut req = h2_get(&proxy, "/many");
    for i in 0..1500 {
        req.headers_mut().append(
            format!("x-h{i}").parse::<http::HeaderName>().unwrap(),
            "v".parse().unwrap(),
        );
    }
    match send.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => panic!("expected 431, got {e}"),
    }
    let mut req = h2_get(&proxy, "/big");
    req.headers_mut()
        .insert("x-big", "a".repeat(70 << 10).parse().unwrap());
    match send.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => assert!(e.to_string().contains("reset") || e.is_closed(), "{e}"),
    }
    assert_eq!(origin.total(), 0, "neither reached the upstream");
    // HTTP/1 answers the same.
    let mut raw = String::from("GET /many HTTP/1.1\r\nHost: a\r\n");
    for i in 0..1500 {
        raw.push_str(&format!("x-h{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    assert!(proxy.raw(raw.as_bytes()).await.starts_with("HTTP/1.1 431"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_and_host_that_disagree_are_400() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let (mut send, _conn) = h2(&proxy, None).await;
    let mut req = h2_get(&proxy, "/x");
    req.headers_mut()
        .insert("host", "evil.example".parse().unwrap());
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let mut req = h2_get(&proxy, "/x");
    req.headers_mut()
        .insert("host", proxy.addr.to_string().parse().unwrap());
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "agreeing fields are fine");
    assert_eq!(origin.total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_steady_upload_is_not_cut_by_the_upstream_timeout() {
    let origin = Origin::echo().await;
    let text = config(&origin, MEMORY_STORE, "").replace("timeout = \"2s\"", "timeout = \"500ms\"");
    let proxy = Proxy::start(&text).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // Four chunks, 300 ms apart: the whole upload takes longer than the upstream timeout,
    // but it never stops moving for that long.
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    for _ in 0..4 {
        tick.tick().await;
        s.write_all(b"4\r\nabcd\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(&origin.last().body[..], b"abcdabcdabcdabcd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_408() {
    let origin = Origin::echo().await;
    let proxy = Proxy::builder(&origin)
        .server("body_read_timeout = \"300ms\"")
        .start()
        .await;
    let out = proxy
        .raw(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("request_body_timeout"), "{out}");
}

const USER_AND_PROFILE: &str = r#"
[auth]
jwt_secret_env = "JWT_SECRET"

[[rule]]
name = "user"
match = "/user/{id}"
ttl = "5m"

[[rule]]
name = "profile"
match = "/profile/{section}"
ttl = "5m"
auth = "required"
"#;
const JWT_SECRET: &str = "0123456789abcdef0123";

fn session_token(sub: &str) -> String {
    hs256(
        JWT_SECRET,
        &serde_json::json!({ "sub": sub, "exp": 4_000_000_000u64 }),
    )
}

async fn net_output_bytes(redis: &Redis) -> u64 {
    let info: String = redis.cmd(&["INFO", "stats"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_net_output_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64mib_foreign_value_is_a_miss_and_stalls_nothing_else() {
    let redis = Redis::start().await;
    let origin = Origin::echo().await;
    let proxy = Arc::new(
        Proxy::start_env(
            &config(&origin, &redis_store(&redis), USER_AND_PROFILE),
            &[("JWT_SECRET", JWT_SECRET)],
        )
        .await,
    );
    proxy.get("/user/1").await;
    proxy.get("/user/2").await;
    proxy.stored(2).await;
    let keys = redis.keys("cachegate:e:*").await;
    assert_eq!(keys.len(), 2);
    let token = session_token("alice");
    let _: () = redis.cmd(&["SET", "user_token:alice", &token]).await;
    // 64 MiB under one entry key, as a confused neighbour of the Redis might write it.
    let big = "x".repeat(64 << 20);
    for key in &keys {
        let mut c = redis.conn().await;
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(&big)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    drop(big);
    let before = net_output_bytes(&redis).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let p = proxy.clone();
        let bearer = format!("Bearer {token}");
        tasks.push(tokio::spawn(async move {
            match i {
                0..3 => p.get("/user/1").await,
                3..6 => p.get("/user/2").await,
                _ if i % 2 == 0 => {
                    p.get_with("/profile/main", &[("authorization", &bearer)])
                        .await
                }
                _ => p.get(&format!("/user/other{}", i % 4)).await,
            }
        }));
    }
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let first = proxy.get("/user/3").await;
    assert_eq!(first.status, 200);
    // Each of the six requests on a big key may read it at most twice (lookup, and again
    // after a fill was written): never more than the 1 MiB limit plus the envelope.
    let read = net_output_bytes(&redis).await - before;
    assert!(
        read < 32 << 20,
        "cachegate read {read} bytes from Redis: the 64 MiB values were read whole"
    );
    let again = proxy.get("/user/1").await;
    assert_eq!(again.x_cache(), "HIT", "the foreign value was overwritten");
}

/// An origin that holds every answer until the test opens it.
async fn gated_origin() -> Origin {
    let origin = Origin::start(handler(|_s, n| Answer::ok(format!("n={n}")))).await;
    origin.close();
    origin
}

async fn hundred_cold_gets_make_one_upstream_request(origin: &Origin, proxy: Arc<Proxy>) {
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move { p.get("/user/hot").await }));
    }
    // Every request is either the one fetching or waiting for it.
    eventually(
        Duration::from_secs(30),
        "99 requests wait for one fill",
        || async { metric(&proxy.metrics().await, "cachegate_fill_waiters") >= 99.0 },
    )
    .await;
    origin.open();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "n=1");
    }
    assert_eq!(origin.hits("/user/hot"), 1);
}

const USER_RULE: &str = "[[rule]]\nname = \"user\"\nmatch = \"/user/{id}\"\nttl = \"5m\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_holds_while_redis_is_paused() {
    let redis = Redis::start().await;
    let origin = gated_origin().await;
    let proxy = Arc::new(
        Proxy::start(&config(
            &origin,
            &redis_store_timeout(&redis, "100ms"),
            USER_RULE,
        ))
        .await,
    );
    // Paused for longer than the test runs (an UNPAUSE would wait in the same queue); the
    // server is killed when the test ends.
    assert_eq!(redis.raw("CLIENT PAUSE 60000 ALL").await, "+OK");
    hundred_cold_gets_make_one_upstream_request(&origin, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_holds_while_redis_is_killed() {
    let mut redis = Redis::start().await;
    let origin = gated_origin().await;
    let proxy = Arc::new(
        Proxy::start(&config(
            &origin,
            &redis_store_timeout(&redis, "100ms"),
            USER_RULE,
        ))
        .await,
    );
    redis.kill();
    hundred_cold_gets_make_one_upstream_request(&origin, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_jwt_secret_works_only_with_the_opt_in() {
    let origin = Origin::echo().await;
    let redis = Redis::start().await;
    let short = "thirteen-byte"; // 13 bytes, as a legacy API might sign with
    let rules = USER_AND_PROFILE.replace(
        "jwt_secret_env = \"JWT_SECRET\"\n",
        "jwt_secret_env = \"JWT_SECRET\"\nallow_weak_jwt_secret = true\n",
    );
    let proxy = Proxy::start_env(
        &config(&origin, &redis_store(&redis), &rules),
        &[("JWT_SECRET", short)],
    )
    .await;
    let token = hs256(
        short,
        &serde_json::json!({ "sub": "bob", "exp": 4_000_000_000u64 }),
    );
    let _: () = redis.cmd(&["SET", "user_token:bob", &token]).await;
    let got = proxy
        .get_with(
            "/profile/main",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        metric(&proxy.metrics().await, "cachegate_auth_weak_secret"),
        1.0
    );
    let refused = cachegate::config::Config::parse_with_env(
        "cachegate.toml",
        &config(&origin, &redis_store(&redis), USER_AND_PROFILE),
        &|_| Some(short.to_string()),
    )
    .unwrap_err()
    .to_string();
    assert!(refused.contains("allow_weak_jwt_secret"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_brute_force_is_429() {
    let origin = Origin::echo().await;
    let admin_token = "admin-token-0123456789";
    let proxy = Proxy::start_env(
        &config(&origin, MEMORY_STORE, "[admin]\ntoken_env = \"ADMIN\"\n"),
        &[("ADMIN", admin_token)],
    )
    .await;
    let right = format!("Bearer {admin_token}");
    let ok = proxy
        .admin("GET", "/explain?url=/x", &[("authorization", &right)], "")
        .await;
    assert_eq!(ok.status, 200);
    let two = proxy
        .admin(
            "GET",
            "/explain?url=/x",
            &[("authorization", &right), ("authorization", "Bearer other")],
            "",
        )
        .await;
    assert_eq!(two.status, 401, "two Authorization fields are refused");
    let mut statuses = Vec::new();
    for i in 0..20 {
        let guess = format!("Bearer guess-{i:016}");
        statuses.push(
            proxy
                .admin("GET", "/explain?url=/x", &[("authorization", &guess)], "")
                .await
                .status
                .as_u16(),
        );
    }
    assert!(statuses.contains(&401));
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let after = proxy
        .admin("GET", "/explain?url=/x", &[("authorization", &right)], "")
        .await;
    assert_eq!(after.status, 429, "not even a right guess is compared now");
    assert!(
        metric(
            &proxy.metrics().await,
            "cachegate_admin_auth_failures_total"
        ) >= 20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_while_redis_refuses_writes_still_lands() {
    let redis = Redis::start().await;
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, &redis_store(&redis), USER_RULE)).await;
    assert_eq!(proxy.get("/user/1").await.x_cache(), "MISS");
    proxy.stored(1).await;
    assert_eq!(proxy.get("/user/1").await.x_cache(), "HIT");
    // Full: every write is refused (maxmemory with noeviction), deletes still work.
    let _: () = redis
        .cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    let _: () = redis.cmd(&["CONFIG", "SET", "maxmemory", "1"]).await;
    let write = proxy.send("PUT", "/user/1", &[], "{}").await;
    assert_eq!(write.status, 200);
    assert!(
        !write.header("cache-status").contains("purge-queued"),
        "{}",
        write.header("cache-status")
    );
    let after = proxy.get("/user/1").await;
    assert_ne!(after.x_cache(), "HIT", "{}", after.header("cache-status"));
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "cachegate_purge_queue_depth"), 0.0);
    for _ in 0..5 {
        proxy.get("/user/1").await;
        assert_eq!(proxy.admin("GET", "/readyz", &[], "").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_reports_its_size() {
    let origin = Origin::echo().await;
    let store = "[store]\nbackend = \"memory\"\nmax_bytes = \"16MiB\"\n";
    let proxy = Proxy::start(&config(&origin, store, USER_RULE)).await;
    for i in 0..50 {
        proxy.get(&format!("/user/{i}")).await;
    }
    let m = proxy.metrics().await;
    let bytes = metric(&m, "cachegate_store_bytes");
    let entries = metric(&m, "cachegate_store_entries");
    assert!(entries >= 50.0, "{m}");
    assert!(bytes > 0.0 && bytes <= (16 << 20) as f64, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped() {
    const SIZE: usize = 32 << 20;
    let origin = Origin::start(handler(|_, _| Answer::ok(vec![b'x'; SIZE]))).await;
    let proxy = Proxy::builder(&origin)
        .server("idle_timeout = \"300ms\"")
        .start()
        .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // The client reads nothing: once the socket buffers are full, the connection is stuck
    // on a response nobody takes, and is closed.
    eventually(
        Duration::from_secs(20),
        "the connection is closed",
        || async { metric(&proxy.metrics().await, "cachegate_open_connections") == 0.0 },
    )
    .await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(
        got.len() < SIZE,
        "the whole response was delivered to a client that never read"
    );
}
