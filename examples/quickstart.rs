//! Quick start: a small demo API and cachegate in front of it, on the embedded store.
//!
//! `cargo run --release --example quickstart` starts both, shows a MISS then a HIT, and keeps
//! serving so you can try it with curl until Ctrl-C. Nothing needs to be installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachegate::config::Config;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The demo API: a slow legacy service that knows nothing about caching.
async fn demo_api(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Pretend to be slow, like the APIs cachegate is put in front of.
    tokio::time::sleep(Duration::from_millis(80)).await;
    let path = req.uri().path().to_string();
    let (status, body) = match path.strip_prefix("/users/") {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => (
            StatusCode::OK,
            format!(
                "{{\"id\":{id},\"name\":\"user {id}\",\"served_at_ms\":{}}}\n",
                now_ms()
            ),
        ),
        _ if path == "/users" => (
            StatusCode::OK,
            "[{\"id\":1},{\"id\":2},{\"id\":3}]\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "{\"error\":\"not found\"}\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    Ok(resp)
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

async fn start_demo_api() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(demo_api))
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let api = start_demo_api().await?;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/quickstart.toml");
    let mut cfg = Config::load(std::path::Path::new(path))?;
    cfg.upstream.authority = api.to_string().parse()?;
    // Prefer the documented ports; fall back to free ones if they are taken.
    if std::net::TcpListener::bind(cfg.server.listen).is_err() {
        cfg.server.listen = "127.0.0.1:0".parse()?;
    }
    if std::net::TcpListener::bind(cfg.server.admin_listen).is_err() {
        cfg.server.admin_listen = "127.0.0.1:0".parse()?;
    }
    let running = cachegate::server::start(cfg).await?;
    let base = format!("http://{}", running.addr);
    println!("demo API (slow, no caching)  http://{api}");
    println!("cachegate in front of it      {base}");
    println!(
        "metrics                       http://{}/metrics\n",
        running.admin_addr
    );

    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    for attempt in ["first", "second"] {
        let started = Instant::now();
        let resp = client.get(format!("{base}/users/42").parse()?).await?;
        let x_cache = header(&resp, "x-cache");
        let cache_status = header(&resp, "cache-status");
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        println!(
            "{attempt} GET /users/42 -> {status} X-Cache: {x_cache} ({:.1} ms)\n  Cache-Status: {cache_status}\n  {}",
            started.elapsed().as_secs_f64() * 1000.0,
            String::from_utf8_lossy(&body).trim()
        );
    }
    println!("\nTry it: curl -i {base}/users/7   (twice)");
    println!("Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}

fn header(resp: &Response<Incoming>, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}
