//! The coherence window of the in-process tier, as a client sees it: two cachegate
//! processes (this build's release binary) on one redis-server.
//!
//! - purge: instance B serves a warm entry from its in-process tier; a PUT through instance
//!   A returns; how long until B answers the new version, and how many stale answers B gave
//!   meanwhile (B is asked in a closed loop, as fast as one client can).
//! - login: B accepts a token from its tier; a new token is written straight into Redis (as a
//!   legacy login would, telling cachegate nothing); how long until B refuses the old one.
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
    let redis = Redis::start().await;
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
        let written = Instant::now();
        loop {
            let got = send(&c, "GET", &b.addr, "/item/1", None).await;
            if got.body != before {
                micros.push(written.elapsed().as_micros() as u64);
                break;
            }
            stale += 1;
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "B never saw the write"
            );
        }
    }
    report("purge", micros, stale);

    let mut micros = Vec::with_capacity(trials);
    let mut stale = 0;
    for i in 0..trials {
        let old = hs256(
            SECRET,
            &serde_json::json!({"sub": "u", "exp": 4_000_000_000u64, "jti": format!("{i}a")}),
        );
        let new = hs256(
            SECRET,
            &serde_json::json!({"sub": "u", "exp": 4_000_000_000u64, "jti": format!("{i}b")}),
        );
        let _: () = redis.cmd(&["SET", "user_token:u", &old]).await;
        let old_h = format!("Bearer {old}");
        warm(&c, &b.addr, "/me/1", Some(&old_h)).await;
        let _: () = redis.cmd(&["SET", "user_token:u", &new]).await;
        let written = Instant::now();
        loop {
            let got = send(&c, "GET", &b.addr, "/me/1", Some(&old_h)).await;
            if got.status == 401 {
                micros.push(written.elapsed().as_micros() as u64);
                break;
            }
            stale += 1;
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "B never saw the login"
            );
        }
    }
    report("login", micros, stale);
}
