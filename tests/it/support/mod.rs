//! The test harness: a real `redis-server` per test on a free port, one kind of fake origin
//! on 127.0.0.1:0 that counts (and can hold) what reaches it, cachegate started in-process
//! from a config builder, and a client. Everything is observed from outside: status,
//! headers, bodies, origin counts, Redis keys (through an independent connection) and
//! `/metrics`.

#![allow(dead_code)]

mod daemon;
mod origin;
mod proxy;
mod redis;
mod sentinel;
mod tls;

#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use origin::*;
#[allow(unused_imports)]
pub use proxy::*;
pub use redis::*;
#[allow(unused_imports)]
pub use sentinel::*;
#[allow(unused_imports)]
pub use tls::*;

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll `check` until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An HS256 JWT of these claims, signed with `secret`.
pub fn hs256(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token encodes")
}

/// The value of a metric line (exact labels as rendered), 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}
