//! Micro benchmarks of the hot path, each beside a baseline measured in the same run:
//! rule matching (1,000 rules) vs an exact-path hash lookup, key building vs hashing the same
//! bytes in one call, envelope encode/decode vs copying the same bytes, the session gate's
//! token check (HS256 verify + session key) vs only decoding the claims.
//!
//! `cargo bench --bench micro` prints criterion's numbers, then one ratio line per pair.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use cachegate::cache::entry::Entry;
use cachegate::cache::key::{Id, KeyParts, tag_id};
use cachegate::routing::tags::TagTemplate;
use cachegate::routing::{Rule, RuleTable, path_template};
use criterion::{Criterion, criterion_group};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

fn rule_table(n: usize) -> RuleTable {
    let specs = (0..n)
        .map(|i| {
            let template =
                path_template(&format!("/api/v1/service{i}/items/{{id}}")).expect("template");
            let tags = vec![TagTemplate::parse("item:{id}", &template).expect("tag")];
            Rule {
                ttl: Some(Duration::from_secs(60)),
                tags,
                ..Rule::new(&format!("r{i}"), template)
            }
        })
        .collect();
    RuleTable::build(specs).expect("rules")
}

fn routing(c: &mut Criterion) {
    let table = rule_table(1000);
    let paths: Vec<String> = (0..64)
        .map(|i| format!("/api/v1/service{}/items/{}", (i * 37) % 1000, i))
        .collect();
    let exact: HashMap<String, usize> = paths
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, p)| (p, i))
        .collect();
    let mut g = c.benchmark_group("route");
    let mut i = 0;
    g.bench_function("match_1000_rules", |b| {
        b.iter(|| {
            i = (i + 1) % paths.len();
            black_box(table.at(black_box(&paths[i])).map(|m| m.rule.index))
        })
    });
    let mut j = 0;
    g.bench_function("baseline_hashmap_exact", |b| {
        b.iter(|| {
            j = (j + 1) % paths.len();
            black_box(exact.get(black_box(&paths[j])))
        })
    });
    g.finish();
}

fn keys(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "accept-language",
        HeaderValue::from_static("fr-CH, fr;q=0.9"),
    );
    let vary = [HeaderName::from_static("accept-language")];
    let mut g = c.benchmark_group("key");
    g.bench_function("build_entry_key", |b| {
        b.iter(|| {
            let parts = KeyParts {
                scheme: "http",
                host: black_box("api.example.com"),
                path: black_box("/user/42"),
                query: black_box("page=1&size=20"),
                vary: &vary,
                headers: &headers,
                scope: Some("42"),
            };
            black_box(parts.id().redis_key("cachegate:", b'e'))
        })
    });
    let raw = b"httpapi.example.com/user/42page=1&size=20accept-languagefr-CH, fr;q=0.942";
    g.bench_function("baseline_blake3_same_bytes", |b| {
        b.iter(|| black_box(blake3::hash(black_box(raw))))
    });
    g.finish();
}

fn sample_entry() -> Entry {
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("cache-control", "max-age=300"),
        ("etag", "\"33a64df551425fcc55e4d42a148795d9f25f89d4\""),
        ("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("date", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("vary", "accept-encoding"),
        ("x-request-id", "f058ebd6-02f7-4d3f-942e-904344e8cde5"),
        ("server", "legacy/1.0"),
    ] {
        headers.insert(k, HeaderValue::from_static(v));
    }
    Entry {
        key: Id([7; 16]),
        status: StatusCode::OK,
        flags: 0,
        stored_at_ms: 1_700_000_000_000,
        age_at_store_s: 0,
        fresh_until_ms: 1_700_000_300_000,
        swr_until_ms: 1_700_000_300_000,
        sie_until_ms: 1_700_000_300_000,
        gens: vec![
            (tag_id("user:42"), 1234567),
            (tag_id("path:/user/42"), 7654321),
        ],
        vary: vec![],
        headers,
        body: Bytes::from(vec![b'x'; 1024]),
    }
}

fn envelope(c: &mut Criterion) {
    let entry = sample_entry();
    let encoded = entry.encode();
    let mut g = c.benchmark_group("entry");
    g.bench_function("encode_1KiB", |b| {
        b.iter(|| black_box(black_box(&entry).encode()))
    });
    g.bench_function("decode_1KiB", |b| {
        b.iter(|| {
            black_box(Entry::decode(black_box(encoded.clone()), &entry.key).map(|e| e.body.len()))
        })
    });
    g.bench_function("baseline_copy_same_bytes", |b| {
        b.iter(|| black_box(Bytes::copy_from_slice(black_box(&encoded[..]))))
    });
    g.finish();
}

fn auth(c: &mut Criterion) {
    use base64::Engine as _;
    let secret = "bench-secret-0123456789abcdef";
    let cfg = cachegate::config::Config::parse_with_env(
        "bench.toml",
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[auth]\njwt_secret_env = \"S\"\n",
        &|_| Some(secret.to_string()),
    )
    .expect("config");
    let gate = cfg.auth.gate;
    let claims =
        serde_json::json!({"sub": "user-4242", "exp": 4_000_000_000u64, "iat": 1_700_000_000u64});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token");
    let payload = token.split('.').nth(1).expect("payload").to_string();
    let mut g = c.benchmark_group("auth");
    g.bench_function("verify_hs256_and_render_key", |b| {
        b.iter(|| {
            let claims = gate.verifier.claims(black_box(&token)).expect("valid");
            black_box(gate.template.render(&claims).map(|k| k.0.len()))
        })
    });
    g.bench_function("claim_token_remembered", |b| {
        b.iter(|| {
            black_box(
                gate.claim_token(black_box(&token))
                    .map(|c| c.session_key.0.len()),
            )
        })
    });
    g.bench_function("baseline_decode_claims_only", |b| {
        b.iter(|| {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(black_box(&payload))
                .expect("b64");
            black_box(serde_json::from_slice::<serde_json::Value>(&raw).map(|v| v.is_object()))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = routing, keys, envelope, auth
}

/// Mean time of a benchmark finished in this run, from criterion's estimates file.
fn mean_ns(group: &str, bench: &str, started: std::time::SystemTime) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{bench}/new/estimates.json");
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if modified < started {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let started = std::time::SystemTime::now();
    benches();
    Criterion::default().configure_from_args().final_summary();
    println!("\nratios against the baseline measured in this run (lower is better):");
    for (group, bench, baseline) in [
        ("route", "match_1000_rules", "baseline_hashmap_exact"),
        ("key", "build_entry_key", "baseline_blake3_same_bytes"),
        ("entry", "encode_1KiB", "baseline_copy_same_bytes"),
        ("entry", "decode_1KiB", "baseline_copy_same_bytes"),
        (
            "auth",
            "verify_hs256_and_render_key",
            "baseline_decode_claims_only",
        ),
        (
            "auth",
            "claim_token_remembered",
            "baseline_decode_claims_only",
        ),
    ] {
        match (
            mean_ns(group, bench, started),
            mean_ns(group, baseline, started),
        ) {
            (Some(a), Some(b)) => println!(
                "  {group}/{bench:<22} {a:>9.1} ns = {:>5.2} x {baseline} ({b:.1} ns)",
                a / b
            ),
            _ => println!("  {group}/{bench}: not measured in this run"),
        }
    }
}
