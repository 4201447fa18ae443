//! Memory bounds, measured as an operator would: the resident size of a real cachegate
//! process (the release binary) while distinct keys stream through it.

use crate::support::*;

/// GET `count` distinct paths, `concurrency` at a time.
async fn load(addr: &str, prefix: &str, count: usize, concurrency: usize) {
    use http_body_util::BodyExt;
    let client = client();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, addr, prefix) = (
            client.clone(),
            next.clone(),
            addr.to_string(),
            prefix.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let url = format!("http://{addr}/item/{prefix}{i}");
                let resp = client.get(url.parse().unwrap()).await.expect("response");
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.expect("body");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// An origin answering every path with a body of `size` bytes (the path, padded).
async fn padded(size: usize) -> Origin {
    Origin::start(handler(move |s, _| {
        let mut body = s.path.clone().into_bytes();
        body.resize(size, b'.');
        Answer::ok(body)
    }))
    .await
}

/// The daemon's RSS grew by at most 1.2 times `bound` over `baseline`.
fn within(daemon: &Daemon, baseline: u64, bound: u64, setting: &str) {
    let grown = daemon.rss().saturating_sub(baseline);
    eprintln!(
        "memory bound: baseline {} MiB, grown {} MiB for {setting} {} MiB",
        baseline >> 20,
        grown >> 20,
        bound >> 20
    );
    assert!(
        grown as f64 <= 1.2 * bound as f64,
        "RSS grew by {} MiB over its baseline for {setting} = {} MiB",
        grown >> 20,
        bound >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_stays_within_its_memory_bound() {
    const BODY: usize = 8 << 10;
    let origin = padded(BODY).await;
    let max_bytes: u64 = 32 << 20;
    let daemon = Daemon::start(&format!(
        "[upstream]\nurl = \"{}\"\n[store]\nbackend = \"memory\"\nmax_bytes = \"32MiB\"\n\
         [[rule]]\nname = \"item\"\nmatch = \"/item/{{id}}\"\nttl = \"1h\"\n",
        origin.url()
    ))
    .await;
    // The idle baseline: connections, buffers and the allocator warmed on a few keys.
    load(&daemon.addr, "warm", 64, 16).await;
    load(&daemon.addr, "warm", 64, 16).await;
    let baseline = daemon.rss();
    // Four times the bound in distinct entries.
    let count = (4 * max_bytes as usize) / BODY;
    load(&daemon.addr, "k", count, 16).await;
    within(&daemon, baseline, max_bytes, "max_bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tier_over_redis_stays_within_its_memory_bound() {
    let redis = Redis::start().await;
    let origin = padded(1 << 10).await;
    let l1_max: u64 = 32 << 20;
    let daemon = Daemon::start(&format!(
        "[upstream]\nurl = \"{}\"\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"2s\"\n\
         [cache]\nl1_max_bytes = \"32MiB\"\n\
         [[rule]]\nname = \"item\"\nmatch = \"/item/{{id}}\"\nttl = \"1h\"\n",
        origin.url(),
        redis.url()
    ))
    .await;
    load(&daemon.addr, "warm", 256, 16).await;
    load(&daemon.addr, "warm", 256, 16).await;
    let baseline = daemon.rss();
    // 200k distinct keys: about ten times what the bound holds.
    load(&daemon.addr, "k", 200_000, 32).await;
    within(&daemon, baseline, l1_max, "l1_max_bytes");
}
