//! End-to-end load bench: cachegate (the release binary, its own process) in front of a lean
//! origin answering a fixed 1 KiB body, driven by a closed-loop load generator with 64
//! keep-alive connections. Every scenario is printed as a ratio to the baseline measured in
//! the same run (the origin answered directly), so a noisy shared machine still gives
//! comparable numbers.
//!
//! `cargo bench --bench load` runs every scenario; `cargo bench --bench load -- auth expiry`
//! runs some. `LOAD_SECONDS` sets each scenario's duration (default 5), `LOAD_CONNECTIONS`
//! the concurrency (default 64). Needs `redis-server` on PATH.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "load-bench-secret-0123456789";

/// A minimal origin: a fixed 1 KiB body after an optional delay, counting requests.
struct Origin {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
}

async fn origin(delay: Duration) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let body = Bytes::from(vec![b'x'; 1024]);
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (c, body) = (c.clone(), body.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (c, body) = (c.clone(), body.clone());
                    async move {
                        c.fetch_add(1, Ordering::Relaxed);
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().expect("static"));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Origin { addr, count }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// cachegate as its own process, killed on drop.
struct Cachegate {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Cachegate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn cachegate(origin: SocketAddr, store: &str, rules: &str) -> Cachegate {
    let addr = free_addr();
    let admin = free_addr();
    let dir = std::env::temp_dir().join(format!(
        "cachegate-load-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("cachegate.toml");
    let text = format!(
        "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n[upstream]\nurl = \"http://{origin}\"\n{store}\n\
         [auth]\njwt_secret_env = \"JWT_SECRET\"\n{rules}"
    );
    std::fs::write(&path, text).expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("CACHEGATE_LOG", "warn")
        .env("JWT_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start cachegate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "cachegate did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Cachegate {
        child,
        addr,
        _dir: tempfile_dir::Dir(dir),
    }
}

/// One scenario's result.
struct Run {
    requests: usize,
    errors: usize,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Run {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// Closed-loop load: `connections` keep-alive HTTP/1.1 connections, each sending the next
/// request as soon as the previous answer is read. `header(i)` gives connection i's
/// Authorization value, if any.
async fn load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    duration: Duration,
    header: impl Fn(usize) -> Option<String>,
) -> Run {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..connections {
        let path = path.to_string();
        let auth = header(i);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0usize;
            let Ok(stream) = TcpStream::connect(addr).await else {
                return (latencies, 1);
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut send, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                return (latencies, 1);
            };
            tokio::spawn(conn);
            while Instant::now() < deadline {
                let mut req = Request::get(path.as_str())
                    .header("host", "bench.local")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                if let Some(a) = &auth {
                    req.headers_mut()
                        .insert("authorization", a.parse().expect("header"));
                }
                let t = Instant::now();
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let drained = resp.into_body().collect().await.is_ok();
                        if ok && drained {
                            latencies.push(t.elapsed().as_micros() as u32);
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Run {
        requests: all.len(),
        errors,
        seconds,
        p50_us: pct(0.50) as u64,
        p99_us: pct(0.99) as u64,
        p999_us: pct(0.999) as u64,
        max_us: all.last().copied().unwrap_or(0) as u64,
    }
}

fn token(sub: &str) -> String {
    support::hs256(
        SECRET,
        &serde_json::json!({"sub": sub, "exp": 4_000_000_000u64}),
    )
}

async fn warm(addr: SocketAddr, path: &str, auth: Option<&str>) {
    let _ = load(addr, path, 1, Duration::from_millis(200), |_| {
        auth.map(str::to_string)
    })
    .await;
}

fn print(name: &str, run: &Run, baseline: Option<&Run>) {
    let ratio = baseline
        .map(|b| format!("{:>5.2} x baseline", run.rps() / b.rps()))
        .unwrap_or_else(|| "baseline".into());
    println!(
        "  {name:<34} {:>7.0} req/s  p50 {:>5} us  p99 {:>6} us  p99.9 {:>6} us  max {:>6} us  errors {}  {ratio}",
        run.rps(),
        run.p50_us,
        run.p99_us,
        run.p999_us,
        run.max_us,
        run.errors
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let seconds: u64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let conns: usize = std::env::var("LOAD_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let d = Duration::from_secs(seconds);
    println!("load: {conns} connections, {seconds}s per scenario, 1 KiB responses");

    let fast = origin(Duration::ZERO).await;
    let baseline = load(fast.addr, "/fixed", conns, d, |_| None).await;
    print("origin direct (baseline)", &baseline, None);

    if wants("hits") || wants("auth") {
        let redis = support::Redis::start().await;
        let rules = "[[rule]]\nname = \"hit\"\nmatch = \"/hit\"\nttl = \"1h\"\n\
                     [[rule]]\nname = \"me\"\nmatch = \"/me\"\nttl = \"1h\"\nauth = \"required\"\n";
        let redis_store = format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url());
        let via_redis = cachegate(fast.addr, &redis_store, rules).await;
        let via_memory = cachegate(fast.addr, "[store]\nbackend = \"memory\"\n", rules).await;

        let pass = load(via_memory.addr, "/pass", conns, d, |_| None).await;
        print("pass-through (no rule)", &pass, Some(&baseline));

        warm(via_memory.addr, "/hit", None).await;
        let memory_hit = load(via_memory.addr, "/hit", conns, d, |_| None).await;
        print("hit, embedded store", &memory_hit, Some(&baseline));

        warm(via_redis.addr, "/hit", None).await;
        let redis_hit = load(via_redis.addr, "/hit", conns, d, |_| None).await;
        print("hit, Redis, anonymous", &redis_hit, Some(&baseline));

        // 64 users, each with a session in Redis and a user-scoped entry.
        let users = 64;
        let tokens: Vec<String> = (0..users).map(|u| token(&format!("user{u}"))).collect();
        let mut conn = redis.conn().await;
        for (u, t) in tokens.iter().enumerate() {
            let _: () = redis::cmd("SET")
                .arg(format!("user_token:user{u}"))
                .arg(t)
                .query_async(&mut conn)
                .await
                .expect("SET session");
            warm(via_redis.addr, "/me", Some(&format!("Bearer {t}"))).await;
        }
        let auth_hit = load(via_redis.addr, "/me", conns, d, |i| {
            Some(format!("Bearer {}", tokens[i % users]))
        })
        .await;
        print(
            "hit, Redis, authenticated (user)",
            &auth_hit,
            Some(&baseline),
        );
        println!(
            "  authenticated hit / anonymous hit: {:.2} (throughput), p99 {} us vs {} us",
            auth_hit.rps() / redis_hit.rps(),
            auth_hit.p99_us,
            redis_hit.p99_us
        );
    }

    if wants("expiry") {
        // A hot key expiring every second under load, from an upstream that takes 50 ms:
        // coalescing alone (the clients of each expiry wait for one fill), then with
        // stale-while-revalidate (they are answered at once while one refresh runs).
        let slow = origin(Duration::from_millis(50)).await;
        for (name, extra) in [
            ("hot key, ttl 1s, coalescing", ""),
            (
                "hot key, ttl 1s, + swr 10s",
                "stale_while_revalidate = \"10s\"\n",
            ),
        ] {
            let rules =
                format!("[[rule]]\nname = \"hot\"\nmatch = \"/hot\"\nttl = \"1s\"\n{extra}");
            let gate = cachegate(slow.addr, "[store]\nbackend = \"memory\"\n", &rules).await;
            let before = slow.count.load(Ordering::Relaxed);
            let run = load(gate.addr, "/hot", conns, d, |_| None).await;
            let upstream = slow.count.load(Ordering::Relaxed) - before;
            print(name, &run, Some(&baseline));
            println!(
                "  {:<34} upstream requests: {upstream} in {seconds}s = {:.1} per expiry (without coalescing ~{conns})",
                "",
                upstream as f64 / seconds.max(1) as f64
            );
        }
    }
}
