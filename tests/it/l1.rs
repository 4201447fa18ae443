//! The in-process tier over Redis: warm hits cost no Redis command, and what one instance
//! (or anything else) writes to Redis stops every instance serving the old entry or
//! accepting the old token. Two cachegate instances share one real redis-server.

use std::time::Duration;

use crate::purge::{ADMIN, RULES, SECRET, proxy_on, session, token, v_of, versioned};
use crate::support::*;

/// Calls of the commands that read keys, from `INFO commandstats`.
async fn reads(redis: &Redis) -> u64 {
    let mut c = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let cmd = name.strip_prefix("cmdstat_")?;
            let reading = matches!(
                cmd,
                "get" | "getrange" | "mget" | "eval" | "evalsha" | "exists" | "pttl"
            );
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            reading.then(|| calls.parse::<u64>().ok()).flatten()
        })
        .sum()
}

pub(crate) async fn tracking(proxy: &Proxy) {
    eventually(
        Duration::from_secs(10),
        "tracking is acknowledged",
        || async { metric(&proxy.metrics().await, "cachegate_tracking_state") == 1.0 },
    )
    .await;
}

/// Two instances on one Redis, both tracking.
async fn two(redis: &Redis, origin: &Origin) -> (Proxy, Proxy) {
    let a = proxy_on(redis, origin).await;
    let b = proxy_on(redis, origin).await;
    tracking(&a).await;
    tracking(&b).await;
    (a, b)
}

/// GET until an answer comes from the in-process tier.
async fn warm(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) {
    eventually(Duration::from_secs(10), "an in-process hit", || async {
        proxy
            .get_with(path, headers)
            .await
            .header("cache-status")
            .contains("detail=l1")
    })
    .await;
}

fn with_l1(redis: &Redis, origin: &Origin, cache: &str) -> String {
    config(
        origin,
        &redis_store(redis),
        &RULES.replace("[auth]", &format!("[cache]\n{cache}\n[auth]")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_hit_sends_no_read_to_redis() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let proxy = proxy_on(&redis, &origin).await;
    tracking(&proxy).await;
    let auth = session(&redis, "7").await;
    let user = [("authorization", auth.as_str())];
    warm(&proxy, "/plain/1", &[]).await;
    warm(&proxy, "/user/7", &user).await;
    let before = reads(&redis).await;
    for _ in 0..100 {
        let got = proxy.get("/plain/1").await;
        assert_eq!(got.status, 200);
        assert!(got.header("cache-status").contains("hit; ttl="));
        assert!(got.header("cache-status").contains("detail=l1"));
        let got = proxy.get_with("/user/7", &user).await;
        assert_eq!(got.status, 200);
        assert!(got.header("cache-status").contains("detail=l1"));
    }
    assert_eq!(
        reads(&redis).await - before,
        0,
        "200 warm hits (100 of them authenticated) read nothing from Redis"
    );
    assert_eq!(origin.total(), 2);
    let m = proxy.metrics().await;
    assert!(metric(&m, "cachegate_l1_hits_total") >= 200.0, "{m}");
    assert!(metric(&m, "cachegate_l1_bytes") > 0.0, "{m}");
}

/// Invalidations this instance has been told of by Redis (and by its own writes).
pub(crate) async fn told(proxy: &Proxy) -> f64 {
    metric(&proxy.metrics().await, "cachegate_invalidations_total")
}

/// Wait until Redis's announcement of a write has reached `proxy`: the moment from which it
/// must not serve what the write made stale (the delay is the coherence window, measured by
/// `cargo bench --bench coherence`).
pub(crate) async fn until_told(proxy: &Proxy, before: f64) {
    eventually(
        Duration::from_secs(5),
        "the invalidation arrives",
        || async { told(proxy).await > before },
    )
    .await;
}

/// The first fill of `/plain/1` through `proxy` (made once its tracking was acknowledged)
/// creates and extends the resource's two generations: wait until those four announcements
/// have come back to it.
pub(crate) async fn settled(proxy: &Proxy) {
    proxy.stored(1).await;
    eventually(
        Duration::from_secs(5),
        "the fill's writes are announced",
        || async { told(proxy).await >= 4.0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_through_one_instance_is_a_miss_on_the_other() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let (a, b) = two(&redis, &origin).await;
    warm(&b, "/plain/1", &[]).await;
    settled(&b).await;
    for round in 1..=20u64 {
        warm(&b, "/plain/1", &[]).await;
        assert_eq!(v_of(&b.get("/plain/1").await), round - 1);
        let before = told(&b).await;
        assert_eq!(a.send("PUT", "/plain/1", &[], "{}").await.status, 200);
        until_told(&b, before).await;
        let after = b.get("/plain/1").await;
        assert_eq!(
            (after.x_cache(), v_of(&after)),
            ("MISS", round),
            "round {round}: B served what A's write made stale"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_written_straight_to_redis_refuses_the_old_token_on_both() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let (a, b) = two(&redis, &origin).await;
    let old = session(&redis, "5").await;
    let old_h = [("authorization", old.as_str())];
    warm(&a, "/user/5", &old_h).await;
    warm(&b, "/user/5", &old_h).await;
    // The legacy login writes the new token itself; cachegate is not told.
    let new = hs256(
        SECRET,
        &serde_json::json!({"sub": "5", "exp": 4_000_000_000u64, "jti": "second-login"}),
    );
    assert_ne!(new, token("5"));
    let _: () = redis.cmd(&["SET", "user_token:5", &new]).await;
    // Each instance refuses the old token once Redis's announcement reaches it (the
    // coherence window), and from then on.
    for p in [&a, &b] {
        eventually(
            Duration::from_secs(5),
            "the old token is refused",
            || async { p.get_with("/user/5", &old_h).await.status == 401 },
        )
        .await;
        for _ in 0..10 {
            assert_eq!(p.get_with("/user/5", &old_h).await.status, 401);
        }
    }
    let new_h = format!("Bearer {new}");
    for p in [&a, &b] {
        assert_eq!(
            p.get_with("/user/5", &[("authorization", new_h.as_str())])
                .await
                .status,
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tracking_connection_serves_nothing_stale_and_the_tier_resumes() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let (a, b) = two(&redis, &origin).await;
    warm(&b, "/plain/1", &[]).await;
    // Every client connection goes, B's tracking connection among them.
    let _: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    eventually(Duration::from_secs(5), "B has seen the loss", || async {
        metric(&b.metrics().await, "cachegate_tracking_losses_total") >= 1.0
    })
    .await;
    assert_eq!(a.send("PUT", "/plain/1", &[], "{}").await.status, 200);
    let after = b.get("/plain/1").await;
    assert_eq!(
        v_of(&after),
        1,
        "nothing stale after the tracking connection died"
    );
    tracking(&b).await;
    warm(&b, "/plain/1", &[]).await;
    assert_eq!(v_of(&b.get("/plain/1").await), 1);
    let m = b.metrics().await;
    assert!(metric(&m, "cachegate_invalidations_total") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_drops_the_tier() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let a = proxy_on(&redis, &origin).await;
    tracking(&a).await;
    warm(&a, "/plain/1", &[]).await;
    settled(&a).await;
    let before = origin.total();
    let seen = told(&a).await;
    let _: () = redis.cmd(&["FLUSHALL"]).await;
    until_told(&a, seen).await;
    let after = a.get("/plain/1").await;
    assert_eq!(after.x_cache(), "MISS");
    assert_eq!(origin.total(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_requests_are_answered_and_the_tier_waits_for_tracking() {
    let mut redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let env = [("JWT_SECRET", SECRET), ("ADMIN_TOKEN", ADMIN)];
    let strict = Proxy::start_env(&with_l1(&redis, &origin, ""), &env).await;
    let lenient = Proxy::start_env(
        &with_l1(&redis, &origin, "l1_serve_disconnected = \"1h\""),
        &env,
    )
    .await;
    for p in [&strict, &lenient] {
        tracking(p).await;
        warm(p, "/plain/1", &[]).await;
    }
    redis.kill();
    for p in [&strict, &lenient] {
        eventually(Duration::from_secs(10), "tracking is seen lost", || async {
            metric(&p.metrics().await, "cachegate_tracking_state") == 0.0
        })
        .await;
    }
    let before = origin.total();
    let got = strict.get("/plain/1").await;
    assert_eq!(got.status, 200, "answered without Redis (fail open)");
    assert!(!got.header("cache-status").contains("detail=l1"));
    assert_eq!(origin.total(), before + 1);
    let got = lenient.get("/plain/1").await;
    assert_eq!(got.status, 200);
    assert!(
        got.header("cache-status").contains("detail=l1"),
        "within l1_serve_disconnected: {}",
        got.header("cache-status")
    );
    assert_eq!(origin.total(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_refused_though_redis_never_announced_it() {
    let redis = Redis::start().await;
    let (origin, _) = versioned().await;
    let proxy = proxy_on(&redis, &origin).await;
    tracking(&proxy).await;
    let t = token("8");
    let _: () = redis.cmd(&["SET", "user_token:8", &t, "PX", "800"]).await;
    let auth = format!("Bearer {t}");
    let h = [("authorization", auth.as_str())];
    warm(&proxy, "/user/8", &h).await;
    // Nothing touches the key, so Redis deletes (and announces) it only when its sweep gets
    // there; the tier must not vouch for it past its expiry.
    eventually(
        Duration::from_secs(5),
        "the expired session is refused",
        || async { proxy.get_with("/user/8", &h).await.status == 401 },
    )
    .await;
}
