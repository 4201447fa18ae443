//! Proxying rules that hold whether or not anything is cached.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let origin = Origin::start(handler(|_, _| {
        Answer::ok("ok")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "secret")
            .header("x-kept", "1")
    }))
    .await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let got = proxy
        .get_with(
            "/anything",
            &[
                ("connection", "x-client-hop"),
                ("x-client-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("x-end-to-end", "yes"),
            ],
        )
        .await;
    assert_eq!(got.status, 200);
    let seen = origin.last();
    for hop in ["x-client-hop", "keep-alive", "te", "proxy-authorization"] {
        assert!(
            !seen.headers.contains_key(hop),
            "{hop} reached the upstream"
        );
    }
    assert_eq!(seen.headers["x-end-to-end"], "yes");
    assert!(
        !got.headers.contains_key("x-upstream-hop"),
        "listed in Connection by the upstream"
    );
    assert_eq!(got.header("x-kept"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    proxy
        .get_with(
            "/x",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("host", "api.example.com"),
            ],
        )
        .await;
    let seen = origin.last();
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "api.example.com");
    assert_eq!(
        seen.headers["host"], "api.example.com",
        "the client's Host is preserved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_duplicate_host_is_400() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let no_host = proxy
        .raw(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await;
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    assert!(no_host.contains("\"error\":\"bad_host\""), "{no_host}");
    let two = proxy
        .raw(b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n")
        .await;
    assert!(two.starts_with("HTTP/1.1 400"), "{two}");
    assert_eq!(origin.total(), 0, "refused before the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_400() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    for path in [
        "/user/1%2F..%2Fadmin",
        "/a/../admin",
        "/a//b",
        "/a/%2e%2e/b",
        "/pub/..;/admin",
        "/a;x/b",
    ] {
        let got = proxy.get(path).await;
        assert_eq!(got.status, 400, "{path}");
        assert!(got.text().contains("bad_path"), "{path}");
    }
    assert_eq!(origin.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_json() {
    let origin = Origin::echo().await;
    let text = config(&origin, MEMORY_STORE, "");
    origin.stop();
    // Nothing listens on the origin's port any more.
    drop(origin);
    let proxy = Proxy::start(&text).await;
    let got = proxy.get("/x").await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("content-type"), "application/json");
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cachegate_requests_total{outcome=\"error\",rule=\"none\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_504_json() {
    let origin = Origin::start(Arc::new(|_, _| {
        Box::pin(async {
            // Never answers.
            std::future::pending::<()>().await;
            Answer::ok("")
        })
    }))
    .await;
    let text = config(&origin, MEMORY_STORE, "").replace("timeout = \"2s\"", "timeout = \"200ms\"");
    let proxy = Proxy::start(&text).await;
    let got = proxy.get("/slow").await;
    assert_eq!(got.status, 504);
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["error"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_to_the_upstream() {
    let origin = Origin::start(handler(|s, _| {
        Answer::ok(format!("got {} bytes", s.body.len())).status(201)
    }))
    .await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let payload = "x".repeat(300_000);
    let got = proxy
        .send(
            "POST",
            "/upload",
            &[("content-type", "text/plain")],
            &payload,
        )
        .await;
    assert_eq!(got.status, 201);
    assert_eq!(got.text(), "got 300000 bytes");
    assert_eq!(got.x_cache(), "BYPASS");
    assert!(got.header("cache-status").contains("fwd=method"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let origin = Origin::start(Arc::new(|_, _| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Answer::ok("finished")
        })
    }))
    .await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let resp = client.get(url.parse().unwrap()).await.unwrap();
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, body)
    });
    eventually(
        Duration::from_secs(5),
        "the request reaches the origin",
        || async { origin.total() == 1 },
    )
    .await;
    let addr = proxy.addr;
    proxy.shutdown().await;
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"finished");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served() {
    let origin = Origin::echo().await;
    let proxy = Proxy::start(&config(&origin, MEMORY_STORE, "")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(proxy.url("/h2").parse().unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(origin.last().headers["host"], proxy.addr.to_string());
}
