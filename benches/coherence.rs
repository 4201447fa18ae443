//! The coherence window of the in-process tier, as a client sees it: two cachegate
//! processes (this build's release binary) on one redis-server.
//!
//! - purge: instance B serves a warm entry from its in-process tier; a PUT through instance
//!   A returns; how long until B answers the new version, and how many stale answers B gave
//!   meanwhile (B is asked in a closed loop, as fast as one client can).
//! - login: B accepts a token from its tier; a new token is written straight into Redis (as a
//!   legacy login would, telling cachegate nothing); how long until B refuses the old one.
//!
//! - faults: `COHERENCE_STEPS` random steps (default 10,000): writes through A, reads and
//!   logins checked on B, `CLIENT KILL TYPE normal`, `FLUSHALL` and Redis restarts. After a
//!   write (or a login) B is asked once it has heard of it (an announcement, a lost tracking
//!   connection or a new acknowledgement, read off its metrics): from then on it must never
//!   answer the old version or accept the old token.
//!
//! Printed: p50, p99 and max over the trials, and the stale answers. `cargo bench --bench
//! coherence`; `COHERENCE_TRIALS` (default 1000). Needs `redis-server` on PATH.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::*;

const SECRET: &str = "coherence-bench-secret-0123456789";

type Http = Client<HttpConnector, Full<bytes::Bytes>>;

struct Got {
    status: u16,
    cache_status: String,
    body: String,
}

async fn send(c: &Http, method: &str, addr: &str, path: &str, auth: Option<&str>) -> Got {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = c
        .request(req.body(Full::default()).expect("request"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let cache_status = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Got {
        status,
        cache_status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// GET until the answer comes from the in-process tier.
async fn warm(c: &Http, addr: &str, path: &str, auth: Option<&str>) -> Got {
    for _ in 0..10_000 {
        let got = send(c, "GET", addr, path, auth).await;
        if got.cache_status.contains("detail=l1") {
            return got;
        }
    }
    panic!("no in-process hit for {path}");
}

/// A token of user `u`, told apart by `jti`.
fn token(jti: &str) -> String {
    hs256(
        SECRET,
        &serde_json::json!({"sub": "u", "exp": 4_000_000_000u64, "jti": jti}),
    )
}

/// Ask `changed` in a closed loop until it holds (at most 10 s): microseconds taken, and how
/// many answers came before it held.
async fn until<F, Fut>(mut changed: F) -> (u64, usize)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let written = Instant::now();
    let mut before = 0;
    while !changed().await {
        before += 1;
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "B never saw the change"
        );
    }
    (written.elapsed().as_micros() as u64, before)
}

fn report(what: &str, mut micros: Vec<u64>, stale: usize) {
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "  {what:<8} trials {:>5}  p50 {:>6} us  p99 {:>6} us  max {:>6} us  stale answers {stale} ({:.2} per trial)",
        micros.len(),
        at(0.5),
        at(0.99),
        at(1.0),
        stale as f64 / micros.len() as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let trials: usize = std::env::var("COHERENCE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut redis = Redis::start().await;
    let version = Arc::new(AtomicU64::new(0));
    let v = version.clone();
    let origin = Origin::start(handler(move |s, _| {
        if s.method != "GET" && s.method != "HEAD" {
            v.fetch_add(1, Ordering::SeqCst);
        }
        Answer::ok(v.load(Ordering::SeqCst).to_string())
    }))
    .await;
    let config = format!(
        "[upstream]\nurl = \"{}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"1s\"\n\
         [auth]\njwt_secret_env = \"JWT_SECRET\"\n\
         [[rule]]\nname = \"item\"\nmatch = \"/item/{{id}}\"\nttl = \"1h\"\n\
         [[rule]]\nname = \"me\"\nmatch = \"/me/{{id}}\"\nttl = \"1h\"\nauth = \"required\"\nscope = \"user\"\n",
        origin.url(),
        redis.url()
    );
    let env = [("JWT_SECRET", SECRET)];
    let a = Daemon::start_env(&config, &env).await;
    let b = Daemon::start_env(&config, &env).await;
    let c: Http = Client::builder(TokioExecutor::new()).build_http();
    println!("coherence window of the in-process tier: two instances, one redis-server");

    let mut micros = Vec::with_capacity(trials);
    let mut stale = 0;
    for _ in 0..trials {
        let before = warm(&c, &b.addr, "/item/1", None).await.body;
        let put = send(&c, "PUT", &a.addr, "/item/1", None).await;
        assert_eq!(put.status, 200);
        let (us, old) =
            until(|| async { send(&c, "GET", &b.addr, "/item/1", None).await.body != before })
                .await;
        micros.push(us);
        stale += old;
    }
    report("purge", micros, stale);

    let mut micros = Vec::with_capacity(trials);
    let mut stale = 0;
    for i in 0..trials {
        let (old, new) = (token(&format!("{i}a")), token(&format!("{i}b")));
        let _: () = redis.cmd(&["SET", "user_token:u", &old]).await;
        let old_h = format!("Bearer {old}");
        warm(&c, &b.addr, "/me/1", Some(&old_h)).await;
        let _: () = redis.cmd(&["SET", "user_token:u", &new]).await;
        let (us, old) =
            until(|| async { send(&c, "GET", &b.addr, "/me/1", Some(&old_h)).await.status == 401 })
                .await;
        micros.push(us);
        stale += old;
    }
    report("login", micros, stale);

    let steps: usize = std::env::var("COHERENCE_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    faults(&c, &mut redis, &a, &b, &version, steps).await;
}

/// What B has heard from Redis: announcements, losses and acknowledgements of tracking.
async fn heard(c: &Http, b: &Daemon) -> f64 {
    let text = send(c, "GET", &b.admin, "/metrics", None).await.body;
    [
        "cachegate_invalidations_total",
        "cachegate_tracking_losses_total",
        "cachegate_tracking_acks_total",
    ]
    .iter()
    .map(|name| metric(&text, name))
    .sum()
}

/// Wait until B has heard something since `before` (at most 10 s).
async fn until_heard(c: &Http, b: &Daemon, before: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if heard(c, b).await > before {
            return true;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    false
}

/// Wait until B's own writes (a fill creating generations) have been announced back.
async fn settle(c: &Http, b: &Daemon) {
    let mut last = heard(c, b).await;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = heard(c, b).await;
        if now == last {
            return;
        }
        last = now;
    }
}

async fn faults(
    c: &Http,
    redis: &mut Redis,
    a: &Daemon,
    b: &Daemon,
    version: &AtomicU64,
    steps: usize,
) {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut current = token("f0");
    let _: () = redis.cmd(&["SET", "user_token:u", &current]).await;
    let (mut stale, mut superseded, mut unheard, mut queued) = (0usize, 0usize, 0usize, 0usize);
    let (mut writes, mut reads, mut logins, mut kills, mut flushes, mut restarts) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    let mut known = version.load(Ordering::SeqCst);
    let started = Instant::now();
    for step in 0..steps {
        match next() % 1000 {
            0..=449 => {
                writes += 1;
                let before = heard(c, b).await;
                let put = send(c, "PUT", &a.addr, "/item/1", None).await;
                if put.status != 200 {
                    continue;
                }
                known = version.load(Ordering::SeqCst);
                if put.cache_status.contains("purge-queued") {
                    // A could not reach Redis (its connections were just killed): the purge
                    // lands when A's queue is flushed, and until then every instance may
                    // still serve the old version, by design. Wait for the queue.
                    queued += 1;
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        let m = send(c, "GET", &a.admin, "/metrics", None).await.body;
                        if metric(&m, "cachegate_purge_queue_depth") == 0.0 {
                            break;
                        }
                        assert!(Instant::now() < deadline, "a queued purge never landed");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                if !until_heard(c, b, before).await {
                    unheard += 1;
                }
                let got = send(c, "GET", &b.addr, "/item/1", None).await;
                if got.status == 200 && got.body.parse::<u64>().unwrap_or(0) < known {
                    stale += 1;
                }
            }
            450..=749 => {
                reads += 1;
                let got = send(c, "GET", &b.addr, "/item/1", None).await;
                if got.status == 200 && got.body.parse::<u64>().unwrap_or(0) < known {
                    stale += 1;
                }
            }
            750..=969 => {
                logins += 1;
                let old = format!("Bearer {current}");
                send(c, "GET", &b.addr, "/me/1", Some(&old)).await;
                current = token(&format!("f{}", step + 1));
                let before = heard(c, b).await;
                let _: () = redis.cmd(&["SET", "user_token:u", &current]).await;
                if !until_heard(c, b, before).await {
                    unheard += 1;
                }
                if send(c, "GET", &b.addr, "/me/1", Some(&old)).await.status == 200 {
                    superseded += 1;
                }
            }
            970..=984 => {
                kills += 1;
                let _: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "normal"]).await;
            }
            985..=996 => {
                flushes += 1;
                let _: () = redis.cmd(&["FLUSHALL"]).await;
                let _: () = redis.cmd(&["SET", "user_token:u", &current]).await;
                send(c, "GET", &b.addr, "/item/1", None).await;
                settle(c, b).await;
            }
            _ => {
                restarts += 1;
                redis.restart().await;
                let _: () = redis.cmd(&["SET", "user_token:u", &current]).await;
                send(c, "GET", &b.addr, "/item/1", None).await;
                settle(c, b).await;
            }
        }
    }
    println!(
        "  faults   steps {steps}: {writes} writes, {reads} reads, {logins} logins, {kills} CLIENT KILLs, \
         {flushes} FLUSHALLs, {restarts} restarts in {:.0} s: stale answers {stale}, superseded \
         tokens accepted {superseded}, writes B never heard of {unheard}; {queued} writes found \
         Redis unreachable and queued their purge",
        started.elapsed().as_secs_f64()
    );
}
