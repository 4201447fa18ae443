//! Side-by-side load bench: cachegate beside nginx and Varnish on the same machine, in one
//! interleaved run, reported as ratios.
//!
//! It starts, all on 127.0.0.1 free ports and stopped at exit:
//! - `upstream_fast`: nginx `return 200` of a fixed 1 KiB JSON body with
//!   `Cache-Control: public, max-age=3600` (the fastest server on the box, the baseline);
//!   without nginx, a small in-process origin stands in and the nginx anchors are skipped;
//! - `nginx_cache_hit` (nginx `proxy_cache`), `nginx_pass` (nginx `proxy_pass` with a
//!   keep-alive pool) and `varnish_hit` (varnishd, builtin VCL), when installed;
//! - redis-server, and cachegate (this build's release binary, access log on) as
//!   `cg_memory` (embedded-store hit), `cg_redis` (Redis hit), `cg_auth` (authenticated,
//!   user-scoped Redis hit) and `cg_pass` (pass-through).
//!
//! Each round runs every target once (forward in odd rounds, reversed in even ones) with
//! `wrk -t2 -c64` (or the built-in closed-loop generator without wrk) and, with `h2load`
//! installed, cleartext HTTP/2 with 64 connections. Printed: medians over the rounds of
//! req/s, p50/p99 latency, server CPU µs per request (user+system time of every process the
//! bench started for that target, upstream included, divided by requests), and the ratios
//! the README reports. Hit targets are checked to cost no upstream request.
//!
//! `cargo bench --bench load`; `LOAD_ROUNDS` (default 3), `LOAD_SECONDS` (default 8),
//! `LOAD_TARGETS` (space-separated subset of the names above).

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "load-bench-secret-0123456789abcdef";
const PATH: &str = "/api/items/42";
const AUTH_PATH: &str = "/api/me/42";

fn installed(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_port() -> u16 {
    support::free_port()
}

/// The fixed body every target serves.
fn body() -> String {
    let prefix = r#"{"id":42,"name":"bench item","price_cents":1999,"tags":["bench","json"],"description":""#;
    let suffix = r#""}"#;
    format!(
        "{prefix}{}{suffix}",
        "x".repeat(1024 - prefix.len() - suffix.len())
    )
}

/// A process started by the bench, killed on drop.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Proc {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = cmd
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    Proc { child }
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request on a fresh connection: status and the response head.
fn get(port: u16, path: &str, header: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    (status, head)
}

/// CPU seconds (user + system) used so far by `pid` and every process descending from it.
fn tree_cpu(pid: u32) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut stats = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(p) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Fields after the command name (which may hold spaces) in parentheses.
            let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid: u32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
                + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            stats.push((p, ppid, ticks));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            stats
                .iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    stats
        .iter()
        .filter(|(p, _, _)| tree.contains(p))
        .map(|(_, _, t)| t / tick)
        .sum()
}

/// One load run's result.
#[derive(Clone, Copy, Default)]
struct Run {
    rps: f64,
    requests: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: f64,
    cpu_us: f64,
}

fn parse_ms(v: &str) -> f64 {
    let v = v.trim();
    let (num, unit) = v
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| v.split_at(i))
        .unwrap_or((v, "ms"));
    let n: f64 = num.parse().unwrap_or(0.0);
    match unit {
        "us" => n / 1000.0,
        "s" => n * 1000.0,
        _ => n,
    }
}

/// wrk -t2 -c64 against `port`.
fn wrk(port: u16, path: &str, header: Option<&str>, secs: u64) -> Run {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c64", &format!("-d{secs}s"), "--latency"]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["Requests/sec:", v, ..] => run.rps = v.parse().unwrap_or(0.0),
            [n, "requests", "in", ..] => run.requests = n.parse().unwrap_or(0.0),
            ["50%", v] => run.p50_ms = parse_ms(v),
            ["99%", v] => run.p99_ms = parse_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors += n.parse().unwrap_or(0.0),
            ["Socket", "errors:", rest @ ..] => {
                run.errors += rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<f64>().ok())
                    .sum::<f64>()
            }
            _ => {}
        }
    }
    run
}

/// h2load: 64 cleartext HTTP/2 connections (prior knowledge), one stream each at a time.
fn h2load(port: u16, path: &str, header: Option<&str>, secs: u64) -> Run {
    let mut cmd = Command::new("h2load");
    cmd.args(["-c64", "-t2", "-m1", "-D", &secs.to_string()]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["finished", "in", _, rps, "req/s,", ..] => run.rps = rps.parse().unwrap_or(0.0),
            [
                "requests:",
                n,
                "total,",
                _,
                "started,",
                _,
                "done,",
                ok,
                "succeeded,",
                ..,
            ] => {
                let (n, ok): (f64, f64) = (n.parse().unwrap_or(0.0), ok.parse().unwrap_or(0.0));
                run.requests = ok;
                run.errors += n - ok;
            }
            ["status", "codes:", s2, "2xx,", ..] => {
                let ok: f64 = s2.parse().unwrap_or(0.0);
                run.errors += (run.requests - ok).max(0.0);
            }
            ["time", "for", "request:", _min, _max, mean, ..] => run.p50_ms = parse_ms(mean),
            _ => {}
        }
    }
    run
}

/// Closed-loop HTTP/1.1 load without wrk: 64 keep-alive connections on threads.
fn builtin(port: u16, path: &str, header: Option<&str>, secs: u64) -> Run {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").into_bytes();
    let started = Instant::now();
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let request = request.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut errors = 0.0;
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    return (lat, 1.0);
                };
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 64 << 10];
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if s.write_all(&request).is_err() {
                        errors += 1.0;
                        break;
                    }
                    match read_answer(&mut s, &mut buf) {
                        Some(200) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                        Some(_) => errors += 1.0,
                        None => {
                            errors += 1.0;
                            break;
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0.0;
    for t in threads {
        if let Ok((l, e)) = t.join() {
            all.extend(l);
            errors += e;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Run {
        rps: all.len() as f64 / secs,
        requests: all.len() as f64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        errors,
        cpu_us: 0.0,
    }
}

/// Read one answer (head and Content-Length body); its status.
fn read_answer(s: &mut TcpStream, buf: &mut [u8]) -> Option<u16> {
    let mut have = 0;
    let head_end = loop {
        let n = s.read(&mut buf[have..]).ok()?;
        if n == 0 {
            return None;
        }
        have += n;
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while have < head_end + len {
        let n = s.read(&mut buf[have..]).ok()?;
        if n == 0 {
            return None;
        }
        have += n;
    }
    Some(status)
}

/// A target of the run.
struct Target {
    name: &'static str,
    port: u16,
    path: &'static str,
    header: Option<String>,
    /// The processes whose CPU counts for this target (upstream included).
    pids: Vec<u32>,
    /// A hit target: the upstream must see no request during its runs.
    hit: bool,
    /// The port serving cleartext HTTP/2 (prior knowledge), when measured.
    h2: Option<u16>,
}

struct Nginx {
    dir: PathBuf,
}

impl Nginx {
    fn start(&self, name: &'static str, port: u16, http: &str) -> Proc {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let d = dir.display();
        let conf = format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n server_tokens off;\n default_type application/json;\n\
             keepalive_requests 1000000;\n keepalive_timeout 65s;\n\
             client_body_temp_path {d}/cb; proxy_temp_path {d}/pt; fastcgi_temp_path {d}/ft;\n\
             uwsgi_temp_path {d}/ut; scgi_temp_path {d}/st;\n{http}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx.conf");
        let p = spawn(
            name,
            Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .args(["-g", "daemon off;"]),
            &dir.join("stdout.log"),
        );
        wait_port(port, name);
        p
    }
}

/// The upstream's request count (nginx stub_status), when it is nginx.
fn upstream_requests(port: u16, nginx: bool) -> Option<f64> {
    if !nginx {
        return None;
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET /__stub HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split("\r\n\r\n").nth(1)?;
    body.lines().nth(2)?.split_whitespace().nth(2)?.parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = env_or("LOAD_ROUNDS", 3);
    let secs: u64 = env_or("LOAD_SECONDS", 8);
    let only: Option<Vec<String>> = std::env::var("LOAD_TARGETS")
        .ok()
        .map(|v| v.split_whitespace().map(String::from).collect());
    let wanted = |n: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == n));
    let have_nginx = installed("nginx", "-v");
    let have_varnish = installed("varnishd", "-V");
    let have_wrk = installed("wrk", "-v");
    let have_h2load = installed("h2load", "--version");
    let work = std::env::temp_dir().join(format!("cachegate-load-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let _cleanup = Cleanup(work.clone());
    let body = body();
    let mut procs: Vec<Proc> = Vec::new();
    let mut targets: Vec<Target> = Vec::new();

    // The upstream.
    let up = free_port();
    let nginx = Nginx { dir: work.clone() };
    let up_pids = if have_nginx {
        let p = nginx.start(
            "upstream_fast",
            up,
            &format!(
                "server {{ listen 127.0.0.1:{up} reuseport;\n location = /__stub {{ stub_status; }}\n\
                 location / {{ add_header Cache-Control 'public, max-age=3600'; return 200 '{body}'; }} }}"
            ),
        );
        let pid = p.child.id();
        procs.push(p);
        vec![pid]
    } else {
        eprintln!("nginx not installed: an in-process origin stands in; nginx anchors skipped");
        in_process_origin(up, body.clone());
        vec![]
    };
    targets.push(Target {
        name: "upstream_fast",
        port: up,
        path: PATH,
        header: None,
        pids: up_pids.clone(),
        hit: false,
        h2: None,
    });

    if have_nginx {
        let pool = format!("upstream up_fast {{ server 127.0.0.1:{up}; keepalive 64; }}");
        let proxy =
            "proxy_pass http://up_fast; proxy_http_version 1.1; proxy_set_header Connection '';";
        if wanted("nginx_cache_hit") {
            let port = free_port();
            let h2port = free_port();
            let p = nginx.start(
                "nginx_cache_hit",
                port,
                &format!(
                    "{pool}\nproxy_cache_path {}/nc levels=1:2 keys_zone=bench:10m max_size=256m inactive=1h use_temp_path=off;\n\
                     server {{ listen 127.0.0.1:{port} reuseport; listen 127.0.0.1:{h2port} http2 reuseport;\n\
                     location / {{ {proxy} proxy_cache bench; proxy_cache_valid 200 1h; proxy_cache_lock on;\n\
                     add_header X-Cache-Status $upstream_cache_status always; }} }}",
                    work.display()
                ),
            );
            let mut pids = up_pids.clone();
            pids.push(p.child.id());
            procs.push(p);
            targets.push(Target {
                name: "nginx_cache_hit",
                port,
                path: PATH,
                header: None,
                pids,
                hit: true,
                h2: have_h2load.then_some(h2port),
            });
        }
        if wanted("nginx_pass") {
            let port = free_port();
            let p = nginx.start(
                "nginx_pass",
                port,
                &format!(
                    "{pool}\nserver {{ listen 127.0.0.1:{port} reuseport; location / {{ {proxy} }} }}"
                ),
            );
            let mut pids = up_pids.clone();
            pids.push(p.child.id());
            procs.push(p);
            targets.push(Target {
                name: "nginx_pass",
                port,
                path: PATH,
                header: None,
                pids,
                hit: false,
                h2: None,
            });
        }
    }
    if have_varnish && have_nginx && wanted("varnish_hit") {
        let port = free_port();
        let p = spawn(
            "varnish_hit",
            Command::new("varnishd")
                .args(["-F", "-a", &format!("127.0.0.1:{port}")])
                .args(["-b", &format!("127.0.0.1:{up}"), "-s", "malloc,256m"])
                .arg("-n")
                .arg(work.join("varnish")),
            &work.join("varnishd.log"),
        );
        wait_port(port, "varnishd");
        let mut pids = up_pids.clone();
        pids.push(p.child.id());
        procs.push(p);
        targets.push(Target {
            name: "varnish_hit",
            port,
            path: PATH,
            header: None,
            pids,
            hit: true,
            h2: None,
        });
    }

    // Redis and cachegate.
    let redis_port = free_port();
    let redis = spawn(
        "redis",
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&work),
        &work.join("redis.log"),
    );
    wait_port(redis_port, "redis-server");
    let redis_pid = redis.child.id();
    procs.push(redis);
    let token = support::hs256(
        SECRET,
        &serde_json::json!({"sub": "bench", "exp": 4_000_000_000u64}),
    );
    let mut redis_cli = redis::Client::open(format!("redis://127.0.0.1:{redis_port}"))
        .and_then(|c| c.get_connection())
        .expect("connect to redis");
    let _: () = redis::cmd("SET")
        .arg("user_token:bench")
        .arg(&token)
        .query(&mut redis_cli)
        .expect("SET session");
    let modes: [(&'static str, &str, &'static str, bool); 4] = [
        ("cg_memory", "memory", PATH, true),
        ("cg_redis", "redis", PATH, true),
        ("cg_auth", "redis", AUTH_PATH, true),
        ("cg_pass", "memory", "/pass/42", false),
    ];
    for (name, store, path, hit) in modes {
        if !wanted(name) {
            continue;
        }
        let port = free_port();
        let store = match store {
            "redis" => {
                format!("[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{redis_port}\"\n")
            }
            _ => "[store]\nbackend = \"memory\"\nmax_bytes = \"64MiB\"\n".to_string(),
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\naccess_log = true\n\
             [upstream]\nurl = \"http://127.0.0.1:{up}\"\n{store}\
             [auth]\njwt_secret_env = \"BENCH_JWT_SECRET\"\n\
             [[rule]]\nname = \"items\"\nmatch = \"/api/items/{{id}}\"\nttl = \"1h\"\ntags = [\"item:{{id}}\"]\n\
             [[rule]]\nname = \"me\"\nmatch = \"/api/me/{{id}}\"\nttl = \"1h\"\nauth = \"required\"\nscope = \"user\"\n",
            free_port()
        );
        let path_conf = work.join(format!("{name}.toml"));
        std::fs::write(&path_conf, config).expect("write config");
        let p = spawn(
            name,
            Command::new(env!("CARGO_BIN_EXE_cachegate"))
                .args(["run", "--config"])
                .arg(&path_conf)
                .env("BENCH_JWT_SECRET", SECRET),
            &work.join(format!("{name}.log")),
        );
        wait_port(port, name);
        let mut pids = up_pids.clone();
        pids.push(p.child.id());
        if store.contains("redis") {
            pids.push(redis_pid);
        }
        procs.push(p);
        targets.push(Target {
            name,
            port,
            path,
            header: (name == "cg_auth").then(|| format!("Authorization: Bearer {token}")),
            pids,
            hit,
            h2: have_h2load.then_some(port),
        });
    }

    // Warm every hit target and check it answers from its cache.
    for t in &targets {
        let (status, _) = get(t.port, t.path, t.header.as_deref());
        assert_eq!(status, 200, "{}: {status}", t.name);
        let (status, head) = get(t.port, t.path, t.header.as_deref());
        assert_eq!(status, 200, "{}: {status}", t.name);
        if t.hit {
            let lower = head.to_ascii_lowercase();
            let is_hit = lower.contains("x-cache-status: hit")
                || lower.contains("x-cache: hit")
                || (t.name == "varnish_hit"
                    && lower
                        .lines()
                        .any(|l| l.starts_with("x-varnish:") && l.split_whitespace().count() == 3));
            assert!(
                is_hit,
                "{} is not answering from its cache:\n{head}",
                t.name
            );
        }
    }

    println!(
        "load: {rounds} rounds x {secs}s, wrk -t2 -c64{}, 1 KiB body; nginx {} varnish {} h2load {}",
        if have_wrk {
            ""
        } else {
            " (built-in generator: wrk not installed)"
        },
        have_nginx,
        have_varnish,
        have_h2load
    );
    // What two probes of the upstream's counter add by themselves.
    let probe_cost = match (
        upstream_requests(up, have_nginx),
        upstream_requests(up, have_nginx),
    ) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let mut results: BTreeMap<(&str, bool), Vec<Run>> = BTreeMap::new();
    let mut upstream_seen: BTreeMap<&str, f64> = BTreeMap::new();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let t = &targets[i];
            for h2 in [false, true] {
                let port = match (h2, t.h2) {
                    (false, _) => t.port,
                    (true, Some(p)) => p,
                    (true, None) => continue,
                };
                let before = upstream_requests(up, have_nginx);
                let cpu0: f64 = t.pids.iter().map(|&p| tree_cpu(p)).sum();
                let mut run = if h2 {
                    h2load(port, t.path, t.header.as_deref(), secs)
                } else if have_wrk {
                    wrk(port, t.path, t.header.as_deref(), secs)
                } else {
                    builtin(port, t.path, t.header.as_deref(), secs)
                };
                let cpu1: f64 = t.pids.iter().map(|&p| tree_cpu(p)).sum();
                if run.requests > 0.0 && !t.pids.is_empty() {
                    run.cpu_us = (cpu1 - cpu0) * 1e6 / run.requests;
                }
                if t.hit
                    && let (Some(a), Some(b)) = (before, upstream_requests(up, have_nginx))
                {
                    *upstream_seen.entry(t.name).or_default() += b - a - probe_cost;
                }
                results.entry((t.name, h2)).or_default().push(run);
            }
        }
    }

    let med = |name: &str, h2: bool, f: fn(&Run) -> f64| {
        results
            .get(&(name, h2))
            .map(|runs| median(runs.iter().map(f).collect()))
    };
    println!();
    println!(
        "| target | protocol | req/s (median) | p50 ms | p99 ms | server CPU µs/req | errors | upstream requests during runs |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for t in &targets {
        for h2 in [false, true] {
            let Some(rps) = med(t.name, h2, |r| r.rps) else {
                continue;
            };
            let errors: f64 = results[&(t.name, h2)].iter().map(|r| r.errors).sum();
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {errors} | {} |",
                t.name,
                if h2 { "h2c" } else { "http/1.1" },
                rps,
                med(t.name, h2, |r| r.p50_ms).unwrap_or(0.0),
                med(t.name, h2, |r| r.p99_ms).unwrap_or(0.0),
                med(t.name, h2, |r| r.cpu_us).unwrap_or(0.0),
                upstream_seen
                    .get(t.name)
                    .map(|n| format!("{n:.0}"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    // Ratios of medians, HTTP/1.1.
    let rps = |n: &str| med(n, false, |r| r.rps);
    let cpu = |n: &str| med(n, false, |r| r.cpu_us);
    println!();
    println!("| ratio | value |");
    println!("|---|---|");
    let ratio = |label: String, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b)
            && b > 0.0
        {
            println!("| {label} | {:.3} |", a / b);
        }
    };
    for t in &targets {
        if t.name != "upstream_fast" {
            ratio(
                format!("{} / upstream_fast", t.name),
                rps(t.name),
                rps("upstream_fast"),
            );
        }
    }
    ratio(
        "cg_pass / nginx_pass".into(),
        rps("cg_pass"),
        rps("nginx_pass"),
    );
    ratio(
        "cg_redis / varnish_hit".into(),
        rps("cg_redis"),
        rps("varnish_hit"),
    );
    ratio(
        "cg_memory / nginx_cache_hit".into(),
        rps("cg_memory"),
        rps("nginx_cache_hit"),
    );
    ratio("cg_auth / cg_redis".into(), rps("cg_auth"), rps("cg_redis"));
    ratio(
        "CPU/req: cg_pass / nginx_pass".into(),
        cpu("cg_pass"),
        cpu("nginx_pass"),
    );
    drop(procs);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Removes the work directory at exit.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Without nginx: a threaded origin answering the fixed body (its CPU is not counted).
fn in_process_origin(port: u16, body: String) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind origin");
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: public, max-age=3600\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut s = stream;
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 16 << 10];
                let mut have = 0;
                loop {
                    match s.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        if s.write_all(&answer).is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
}
