//! Purge latency against the number of cached entries: cachegate's tag-generation bump beside
//! the SCAN MATCH + DEL approach, on the same Redis, in one run.
//!
//! For each size (1k, 100k, 1M by default) the bench stores that many real entry envelopes
//! under one tag family (`users`), plus as many plainly named keys for the baseline, then
//! times: one purge of `users` (median of 25), and deleting `naive:users:*` with SCAN MATCH +
//! DEL. `PURGE_SIZES=1000,100000` picks the sizes. Needs `redis-server` on PATH.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachegate::cache::entry::Entry;
use cachegate::cache::key::{Id, tag_id};
use cachegate::cache::store::redis::RedisStore;
use cachegate::cache::store::{Guarded, Store};
use cachegate::cache::{Cache, Found};
use cachegate::config::{RedisTarget, RedisTls};
use cachegate::metrics::Metrics;
use http::{HeaderMap, HeaderValue, StatusCode};

fn entry(i: u64, users: Id, generation: u64) -> Entry {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&i.to_le_bytes());
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Entry {
        key: Id(id),
        status: StatusCode::OK,
        flags: 0,
        stored_at_ms: 0,
        age_at_store_s: 0,
        fresh_until_ms: u64::MAX / 4,
        swr_until_ms: u64::MAX / 4,
        sie_until_ms: u64::MAX / 4,
        gens: vec![(users, generation)],
        vary: vec![],
        headers,
        body: Bytes::from(format!("{{\"id\":{i},\"name\":\"user {i}\"}}")),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.3} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<u64> = std::env::var("PURGE_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 100_000, 1_000_000]);
    let redis = support::Redis::start().await;
    let metrics = Arc::new(Metrics::new());
    let timeout = Duration::from_secs(30);
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect_lazy(
            &RedisTarget::Url(redis.url()),
            None,
            &RedisTls::default(),
            timeout,
        )
        .expect("store"),
    );
    let guarded = Arc::new(Guarded::new(store.clone(), timeout, metrics.clone()));
    let cache = Cache::new(
        guarded,
        "cachegate:",
        Duration::from_secs(86_400),
        1 << 20,
        None,
        metrics,
    );
    let users = tag_id("users");
    println!("purge latency vs entries under one tag family (same Redis, same run)");
    println!(
        "  {:>9}  {:>22}  {:>22}  {:>9}",
        "entries", "cachegate purge (tag)", "SCAN MATCH + DEL", "ratio"
    );
    for n in sizes {
        let _: () = redis.cmd(&["FLUSHALL"]).await;
        let generation = cache
            .record_gens(&[users], &[None])
            .await
            .expect("generation")[0];
        // Fill: real envelopes in pipelines of 1,000.
        let mut i = 0;
        while i < n {
            let batch: Vec<_> = (i..(i + 1000).min(n))
                .map(|j| {
                    let e = entry(j, users, generation);
                    (cache.keys().entry(&e.key), e.encode())
                })
                .collect();
            store
                .put(batch, Duration::from_secs(3600), &[], Duration::ZERO)
                .await
                .expect("fill");
            i += 1000;
        }
        let mut conn = redis.conn().await;
        let value = vec![b'x'; 48];
        let mut i = 0;
        while i < n {
            let mut pipe = redis::pipe();
            for j in i..(i + 1000).min(n) {
                pipe.cmd("SET")
                    .arg(format!("naive:users:{j}"))
                    .arg(&value)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.expect("fill naive keys");
            i += 1000;
        }

        // cachegate: one bump, whatever n is. Median of 25.
        let mut times = Vec::new();
        for _ in 0..25 {
            let t = Instant::now();
            cache.bump(&[users]).await.expect("bump");
            times.push(t.elapsed());
        }
        let ours = median(times);
        let probe = entry(n / 2, users, generation);
        let gens: Vec<Option<u64>> = cache
            .lookup(&probe.key, &[users], None)
            .await
            .expect("lookup")
            .gens;
        let dead = matches!(
            cache
                .lookup_entry(&probe.key, &[users], &gens)
                .await
                .expect("lookup"),
            Found::Dead
        );
        assert!(dead, "a purged entry must be dead");

        // Baseline: walk the keyspace for the pattern and delete what matches.
        let mut conn = redis.conn().await;
        let t = Instant::now();
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("naive:users:*")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("SCAN");
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("DEL");
                deleted += n;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let scan = t.elapsed();
        assert_eq!(deleted, n, "the baseline deleted every matching key");
        println!(
            "  {n:>9}  {:>22}  {:>22}  {:>8.0}x",
            fmt(ours),
            fmt(scan),
            scan.as_secs_f64() / ours.as_secs_f64()
        );
    }
}
