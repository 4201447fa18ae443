//! Production Redis and upstreams: Redis over TLS (a real `redis-server` with `tls-port` and a
//! CA made in the test), Sentinel failover (a master, a replica and three sentinels), and
//! https upstreams (HTTP/2 by ALPN, an untrusted certificate refused).

use std::time::Duration;

use crate::purge::{ADMIN, RULES, SECRET, session, token, v_of, versioned};
use crate::support::*;

fn error_of(got: &Got) -> String {
    let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap_or_default();
    format!(
        "{} {}",
        v["error"].as_str().unwrap_or(""),
        v["detail"].as_str().unwrap_or("")
    )
}

async fn proxy_with_store(origin: &Origin, store: &str) -> Proxy {
    Proxy::start_env(
        &config(origin, store, RULES),
        &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", ADMIN)],
    )
    .await
}

fn tls_store(redis: &Redis, ca: &std::path::Path) -> String {
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"1s\"\ntls_ca_file = \"{}\"\n",
        redis.url(),
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_caches_gates_and_purges() {
    let pki = Pki::new("redis-tls");
    let redis = Redis::start_tls(&pki).await;
    let (origin, _) = versioned().await;
    let proxy = proxy_with_store(&origin, &tls_store(&redis, &pki.ca_file())).await;

    // Miss, then hit; the entry is in Redis (read back over TLS by an independent client).
    assert_eq!(proxy.get("/plain/1").await.x_cache(), "MISS");
    proxy.stored(1).await;
    assert_eq!(proxy.get("/plain/1").await.x_cache(), "HIT");
    assert_eq!(origin.hits("/plain/1"), 1);
    assert!(
        !redis.keys("cachegate:*").await.is_empty(),
        "entries are stored in the TLS Redis"
    );

    // The session gate reads the TLS Redis: the stored token passes, a forged one does not.
    let alice = session(&redis, "alice").await;
    let ok = proxy
        .get_with("/account/1", &[("authorization", alice.as_str())])
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let forged = format!("Bearer {}", token("mallory"));
    let refused = proxy
        .get_with("/account/1", &[("authorization", forged.as_str())])
        .await;
    assert_eq!(refused.status, 401);

    // Purge on write.
    assert_eq!(proxy.get("/user/7").await.x_cache(), "MISS");
    proxy.stored(2).await;
    assert_eq!(proxy.get("/user/7").await.x_cache(), "HIT");
    assert_eq!(proxy.send("PUT", "/user/7", &[], "{}").await.status, 200);
    let after = proxy.get("/user/7").await;
    assert_eq!((after.x_cache(), v_of(&after)), ("MISS", 1));
    // Fills whose generations were extended lately send no extension: no empty command
    // reaches Redis, so no store error is counted.
    for i in 2..6 {
        assert_eq!(proxy.get(&format!("/plain/{i}")).await.x_cache(), "MISS");
    }
    proxy.stored(7).await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "cachegate_store_errors_total{op=\"put\"}"),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tls_with_a_wrong_ca_fails_open_and_auth_answers_503() {
    let server_pki = Pki::new("redis-server");
    let other_pki = Pki::new("redis-other");
    let redis = Redis::start_tls(&server_pki).await;
    let (origin, _) = versioned().await;
    let proxy = proxy_with_store(&origin, &tls_store(&redis, &other_pki.ca_file())).await;
    let alice = session(&redis, "alice").await;

    // The cache fails open: every request is answered, by the upstream.
    for _ in 0..3 {
        let got = proxy.get("/plain/1").await;
        assert_eq!(got.status, 200);
        assert_ne!(got.x_cache(), "HIT");
    }
    assert_eq!(origin.hits("/plain/1"), 3);
    // The gate cannot check the session: 503, never 401.
    let gated = proxy
        .get_with("/account/1", &[("authorization", alice.as_str())])
        .await;
    assert_eq!(gated.status, 503, "{}", gated.text());
    // Readiness says why, naming the certificate problem.
    eventually(
        Duration::from_secs(5),
        "readyz names the TLS failure",
        || async {
            let r = proxy.admin("GET", "/readyz", &[], "").await;
            r.status == 503 && r.text().to_ascii_lowercase().contains("certificate")
        },
    )
    .await;
}

/// An https origin answering `{"path":..,"n":..,"version":..}` with an ETag, so revalidation
/// can be seen.
async fn https_origin(pki: &Pki) -> Origin {
    let issued = pki.issue("origin", &[]);
    Origin::start_tls(
        handler(|s, n| {
            if s.headers
                .get("if-none-match")
                .is_some_and(|v| v == "\"v1\"")
            {
                return Answer::ok("").status(304).header("etag", "\"v1\"");
            }
            Answer::ok(format!(
                "{{\"path\":\"{}\",\"n\":{n},\"version\":\"{:?}\"}}",
                s.path, s.version
            ))
            .header("etag", "\"v1\"")
            .header("cache-control", "max-age=0, must-revalidate")
        }),
        Pki::server_config(&issued),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_passed_through_filled_and_revalidated_over_http2() {
    let pki = Pki::new("origin-ok");
    let origin = https_origin(&pki).await;
    let proxy = Proxy::builder(&origin)
        .upstream(&format!("tls_ca_file = \"{}\"", pki.ca_file().display()))
        .rule("name = \"item\"\nmatch = \"/item/{id}\"\nttl = \"5m\"\norigin_cache_control = \"respect\"")
        .start()
        .await;
    // Pass-through (no rule): the answer came over TLS, by HTTP/2 (offered by ALPN).
    let pass = proxy.get("/other").await;
    assert_eq!(pass.status, 200, "{}", pass.text());
    assert!(pass.text().contains("HTTP/2"), "{}", pass.text());
    assert_eq!(origin.last().version, http::Version::HTTP_2);
    // Fill, then a revalidation (max-age=0): the origin's 304 refreshes the stored body.
    let first = proxy.get("/item/1").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    let again = proxy.get("/item/1").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "served from the entry after a 304");
    assert_eq!(origin.hits("/item/1"), 2, "the second request revalidated");
    assert_eq!(
        origin
            .last()
            .headers
            .get("if-none-match")
            .map(|v| v.as_bytes()),
        Some(&b"\"v1\""[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_upstream_certificate_is_a_502_naming_the_tls_failure() {
    let pki = Pki::new("origin-untrusted");
    let origin = https_origin(&pki).await;
    // No tls_ca_file: the test CA is not among the system's roots.
    let proxy = Proxy::builder(&origin).start().await;
    let got = proxy.get("/x").await;
    assert_eq!(got.status, 502);
    let error = error_of(&got);
    assert!(error.starts_with("upstream_tls_failed"), "{error}");
    assert!(
        error.to_ascii_lowercase().contains("certificate"),
        "names the certificate problem: {error}"
    );
    assert_eq!(
        origin.total(),
        0,
        "nothing was sent to an unverified upstream"
    );
}

fn sentinel_store(s: &Sentinels) -> String {
    let list: Vec<String> = s.urls().iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[store]\nbackend = \"redis\"\nsentinels = [{}]\nsentinel_master = \"{MASTER_NAME}\"\ntimeout = \"1s\"\n",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_never_401s_and_loses_no_purge() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let s = Sentinels::start().await;
    let (origin, _) = versioned().await;
    let proxy = Arc::new(proxy_with_store(&origin, &sentinel_store(&s)).await);
    let alice = session(&s.master, "alice").await;
    let _: i64 = s.master.cmd(&["WAIT", "1", "2000"]).await;
    // The sentinels were asked, and the master they named is in use.
    eventually(Duration::from_secs(10), "the master is found", || async {
        proxy
            .get_with("/account/1", &[("authorization", alice.as_str())])
            .await
            .status
            == 200
    })
    .await;

    // Through the failover: a reader behind the session gate, and a writer whose purges
    // must hold (each GET after a PUT sees the PUT's version).
    let stop = Arc::new(AtomicBool::new(false));
    let gate_log: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let reader = {
        let (proxy, stop, log, alice) =
            (proxy.clone(), stop.clone(), gate_log.clone(), alice.clone());
        tokio::spawn(async move {
            // A steady load, paced so the rest of a parallel test run keeps its share of
            // the machine.
            let mut pace = tokio::time::interval(Duration::from_millis(1));
            while !stop.load(Ordering::SeqCst) {
                pace.tick().await;
                let got = proxy
                    .get_with("/account/1", &[("authorization", alice.as_str())])
                    .await;
                log.lock()
                    .unwrap()
                    .push((Instant::now(), got.status.as_u16()));
            }
        })
    };
    let writer = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            let mut latest = [0u64; 4];
            let mut stale = Vec::new();
            let mut i = 0usize;
            let mut pace = tokio::time::interval(Duration::from_millis(1));
            while !stop.load(Ordering::SeqCst) {
                pace.tick().await;
                let n = i % 4;
                i += 1;
                let path = format!("/user/{n}");
                // Fill (or hit), then write, then read again.
                let _ = proxy.get(&path).await;
                let put = proxy.send("PUT", &path, &[], "{}").await;
                assert_eq!(put.status, 200);
                latest[n] = v_of(&put);
                let after = proxy.get(&path).await;
                if v_of(&after) != latest[n] {
                    stale.push((path, v_of(&after), latest[n], after.x_cache().to_string()));
                }
            }
            (latest, stale)
        })
    };
    eventually(Duration::from_secs(10), "load is running", || async {
        gate_log.lock().unwrap().len() >= 20
    })
    .await;

    let old_master = s.master.port;
    let _: String = s.ask(&["SENTINEL", "FAILOVER", MASTER_NAME]).await;
    eventually(
        Duration::from_secs(30),
        "the sentinels name the replica",
        || async { s.master_port().await == s.replica.port },
    )
    .await;
    let announced = Instant::now();
    // Keep the load on well past the 2 s bound.
    eventually(
        Duration::from_secs(30),
        "load ran 3 s past the announcement",
        || async {
            gate_log
                .lock()
                .unwrap()
                .iter()
                .any(|(at, _)| at.duration_since(announced) > Duration::from_secs(3))
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    reader.await.expect("reader");
    let (latest, stale) = writer.await.expect("writer");

    let log = gate_log.lock().unwrap().clone();
    let unauthorized = log.iter().filter(|(_, st)| *st == 401).count();
    assert_eq!(unauthorized, 0, "a failover never turns into 401");
    let late_503: Vec<Duration> = log
        .iter()
        .filter(|(at, st)| *st == 503 && *at > announced)
        .map(|(at, _)| at.duration_since(announced))
        .collect();
    assert!(
        late_503.iter().all(|d| *d <= Duration::from_secs(2)),
        "503s end within 2 s of the announcement: {late_503:?}"
    );
    assert!(
        log.iter().all(|(_, st)| *st == 200 || *st == 503),
        "only 200s and 503s"
    );
    assert_eq!(log.last().map(|(_, st)| *st), Some(200));
    assert!(stale.is_empty(), "no purge lost: {stale:?}");

    // Caching and purges go on against the new master.
    assert_ne!(s.master_port().await, old_master);
    eventually(
        Duration::from_secs(10),
        "hits come from the new master",
        || async {
            let _ = proxy.get("/plain/9").await;
            proxy.get("/plain/9").await.x_cache() == "HIT"
        },
    )
    .await;
    assert!(
        !s.replica.keys("cachegate:*").await.is_empty(),
        "the new master holds the cache"
    );
    for (n, v) in latest.iter().enumerate() {
        let got = proxy.get(&format!("/user/{n}")).await;
        assert_eq!(v_of(&got), *v, "/user/{n} after the failover");
    }
    let put = proxy.send("PUT", "/user/0", &[], "{}").await;
    let after = proxy.get("/user/0").await;
    assert_eq!((after.x_cache(), v_of(&after)), ("MISS", v_of(&put)));
}
