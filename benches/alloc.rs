//! Heap allocations per request on the hot paths, counted by a counting global allocator.
//!
//! cachegate runs in this process (the same request code as the daemon) in front of a raw
//! origin thread that answers every request with fixed bytes, driven by a raw client thread
//! that sends fixed request bytes and reads answers into a fixed buffer: neither allocates
//! per request, so every allocation counted during the measured requests is cachegate's.
//! Each scenario is warmed first (pools filled, entry stored), then measured over
//! `ALLOC_REQUESTS` (default 20,000) sequential keep-alive requests.
//!
//! `cargo bench --bench alloc`; the Redis scenarios need `redis-server` on PATH and are
//! skipped without it.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// `ALLOC_TRACE=1`: print where each allocation of one measured request comes from.
static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    static IN_TRACE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Print the first frames of the calling code that are not the allocator's or std's.
fn trace(size: usize) {
    if !TRACE.load(Ordering::Relaxed) || IN_TRACE.with(|t| t.replace(true)) {
        return;
    }
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<&str> = bt
        .lines()
        .filter(|l| !l.trim_start().starts_with("at "))
        .map(|l| l.split_once(": ").map_or(l, |(_, f)| f).trim())
        .filter(|f| {
            [
                "cachegate",
                "hyper",
                "redis",
                "http",
                "bytes",
                "tokio",
                "tracing",
                "moka",
            ]
            .iter()
            .any(|c| f.contains(c))
                && !f.contains("GlobalAlloc")
        })
        .take(3)
        .collect();
    eprintln!("{size:>6} B  {}", frames.join("  <-  "));
    IN_TRACE.with(|t| t.set(false));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        trace(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        trace(new_size);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SECRET: &str = "alloc-bench-secret-0123456789";

/// The origin: every request (a GET head, no body) gets the same 1 KiB answer.
fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: public, max-age=3600\r\ncontent-length: 1024\r\n\r\n".to_vec();
    answer.extend(std::iter::repeat_n(b'x', 1024));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut stream = stream;
                let mut buf = [0u8; 16 << 10];
                let mut have = 0;
                loop {
                    match stream.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    // Answer each complete head (requests carry no body here).
                    while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                        if stream.write_all(&answer).is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A keep-alive client sending `request` and reading whole answers, allocation-free.
struct Client {
    stream: TcpStream,
    buf: Box<[u8]>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to cachegate");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            buf: vec![0u8; 64 << 10].into_boxed_slice(),
        }
    }

    /// Send one request, read its answer; the status code.
    fn exchange(&mut self, request: &[u8]) -> u16 {
        self.stream.write_all(request).expect("send");
        let mut have = 0;
        let head_end = loop {
            let n = self.stream.read(&mut self.buf[have..]).expect("read");
            assert!(n > 0, "cachegate closed the connection");
            have += n;
            if let Some(end) = find(&self.buf[..have], b"\r\n\r\n") {
                break end + 4;
            }
        };
        let head = &self.buf[..head_end];
        let status = std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length = head
            .split(|&b| b == b'\n')
            .find_map(|line| {
                let line = std::str::from_utf8(line).ok()?.trim();
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while have < head_end + length {
            let n = self.stream.read(&mut self.buf[have..]).expect("read body");
            assert!(n > 0, "cachegate closed the connection mid-body");
            have += n;
        }
        status
    }
}

struct Scenario {
    name: &'static str,
    config: String,
    request: Vec<u8>,
    /// Run before the measurement (e.g. write the session key).
    setup: Option<(String, String)>,
}

fn request(path: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: api.example\r\nAccept: application/json\r\nUser-Agent: alloc-bench\r\n{auth}\r\n").into_bytes()
}

fn main() {
    let requests: u64 = std::env::var("ALLOC_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // The daemon's access log, formatted the same way, written nowhere.
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(false)
        .event_format(cachegate::log::Text)
        .with_writer(std::io::sink)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let origin = origin();
    let redis_installed = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok();
    let redis = redis_installed.then(|| rt.block_on(support::Redis::start()));
    let token = support::hs256(
        SECRET,
        &serde_json::json!({"sub": "u1", "exp": 4_000_000_000u64}),
    );
    let server = |addr: SocketAddr| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = true\n\
             [upstream]\nurl = \"http://{addr}\"\n"
        )
    };
    let rules = "[[rule]]\nname = \"items\"\nmatch = \"/api/items/{id}\"\nttl = \"1h\"\ntags = [\"item:{id}\"]\n\
                 [[rule]]\nname = \"me\"\nmatch = \"/api/me/{id}\"\nttl = \"1h\"\nauth = \"required\"\nscope = \"user\"\n";
    let auth = "[auth]\njwt_secret_env = \"BENCH_JWT_SECRET\"\n";
    let memory = "[store]\nbackend = \"memory\"\nmax_bytes = \"64MiB\"\n".to_string();
    let mut scenarios = vec![
        Scenario {
            name: "hit, embedded store",
            config: format!("{}{memory}{auth}{rules}", server(origin)),
            request: request("/api/items/42", None),
            setup: None,
        },
        Scenario {
            name: "pass-through (no rule)",
            config: format!("{}{memory}{auth}{rules}", server(origin)),
            request: request("/other/42", None),
            setup: None,
        },
    ];
    if let Some(redis) = &redis {
        let store = format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url());
        scenarios.push(Scenario {
            name: "hit, Redis",
            config: format!("{}{store}{auth}{rules}", server(origin)),
            request: request("/api/items/42", None),
            setup: None,
        });
        scenarios.push(Scenario {
            name: "hit, Redis, authenticated",
            config: format!("{}{store}{auth}{rules}", server(origin)),
            request: request("/api/me/1", Some(&token)),
            setup: Some(("user_token:u1".into(), token.clone())),
        });
    } else {
        eprintln!("redis-server not found: Redis scenarios skipped");
    }

    println!("| scenario | allocations per request | bytes allocated per request |");
    println!("|---|---|---|");
    for s in scenarios {
        let config = cachegate::config::Config::parse_with_env("alloc.toml", &s.config, &|name| {
            (name == "BENCH_JWT_SECRET").then(|| SECRET.to_string())
        })
        .expect("bench config");
        let running = rt
            .block_on(cachegate::server::start(config))
            .expect("cachegate starts");
        if let (Some((key, value)), Some(redis)) = (&s.setup, &redis) {
            rt.block_on(redis.cmd::<()>(&["SET", key.as_str(), value.as_str()]));
        }
        let mut client = Client::connect(running.addr);
        for _ in 0..2_000 {
            let status = client.exchange(&s.request);
            assert_eq!(status, 200, "{}: warm-up answered {status}", s.name);
        }
        if std::env::var_os("ALLOC_TRACE").is_some() {
            eprintln!("--- {}: one request", s.name);
            TRACE.store(true, Ordering::Relaxed);
            client.exchange(&s.request);
            TRACE.store(false, Ordering::Relaxed);
        }
        let (a0, b0) = (
            ALLOCS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        for _ in 0..requests {
            client.exchange(&s.request);
        }
        let (a1, b1) = (
            ALLOCS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        println!(
            "| {} | {:.1} | {:.0} |",
            s.name,
            (a1 - a0) as f64 / requests as f64,
            (b1 - b0) as f64 / requests as f64
        );
        drop(client);
        rt.block_on(running.shutdown());
    }
    if let Some(r) = redis {
        drop(r);
    }
}
