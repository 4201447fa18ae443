//! Memory bounds, measured as an operator would: the resident size of a real cachegate
//! process (the release binary) while distinct keys stream through it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// Resident set size of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// The cachegate binary running a config, killed on drop.
pub struct Daemon {
    child: Child,
    pub addr: String,
    pub admin: String,
    _dir: std::path::PathBuf,
}

impl Daemon {
    pub async fn start(config_body: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!(
            "cachegate-daemon-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (port, admin_port) = (free_port(), free_port());
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n{config_body}"
        );
        let path = dir.join("cachegate.toml");
        std::fs::write(&path, text).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cachegate"))
            .args(["run", "--config"])
            .arg(&path)
            .env("CACHEGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cachegate runs");
        let d = Daemon {
            child,
            addr: format!("127.0.0.1:{port}"),
            admin: format!("127.0.0.1:{admin_port}"),
            _dir: dir,
        };
        let client = client();
        eventually(Duration::from_secs(20), "cachegate is ready", || {
            let url = format!("http://{}/readyz", d.admin);
            let client = client.clone();
            async move {
                matches!(client.get(url.parse().unwrap()).await, Ok(r) if r.status() == 200)
            }
        })
        .await;
        d
    }

    pub fn rss(&self) -> u64 {
        rss(self.child.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_stays_within_its_memory_bound() {
    const BODY: usize = 8 << 10;
    let origin = Origin::start(handler(|s, _| {
        let mut body = s.path.clone().into_bytes();
        body.resize(BODY, b'.');
        Answer::ok(body)
    }))
    .await;
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
    let grown = daemon.rss().saturating_sub(baseline);
    eprintln!(
        "memory bound: baseline {} MiB, grown {} MiB for max_bytes {} MiB",
        baseline >> 20,
        grown >> 20,
        max_bytes >> 20
    );
    assert!(
        grown as f64 <= 1.2 * max_bytes as f64,
        "RSS grew by {} MiB over its baseline for a {} MiB store",
        grown >> 20,
        max_bytes >> 20
    );
}
