//! The release binary as its own process, for what only a process shows: its resident
//! memory, its signals (SIGHUP reloads), its config file changing under it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port};

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

/// The cachegate binary running a config file, killed on drop.
pub struct Daemon {
    child: Child,
    pub addr: String,
    pub admin: String,
    dir: std::path::PathBuf,
    /// The `[server]` lines that place the listeners, kept across rewrites of the file.
    listeners: String,
}

impl Daemon {
    /// Run the binary on a config made of the listeners and `config_body`.
    pub async fn start(config_body: &str) -> Daemon {
        Daemon::start_env(config_body, &[]).await
    }

    /// As `start`, with these environment variables.
    pub async fn start_env(config_body: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = std::env::temp_dir().join(format!(
            "cachegate-daemon-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (port, admin_port) = (free_port(), free_port());
        let listeners =
            format!("listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n");
        let path = dir.join("cachegate.toml");
        std::fs::write(&path, with_listeners(&listeners, config_body)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cachegate"))
            .args(["run", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .env("CACHEGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cachegate runs");
        let d = Daemon {
            child,
            addr: format!("127.0.0.1:{port}"),
            admin: format!("127.0.0.1:{admin_port}"),
            dir,
            listeners,
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

    /// The directory the config file lives in (for files it names).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Replace the config file (same listeners).
    pub fn rewrite(&self, config_body: &str) {
        let path = self.dir.join("cachegate.toml");
        let tmp = self.dir.join("cachegate.toml.new");
        std::fs::write(&tmp, with_listeners(&self.listeners, config_body)).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// Send the process a signal by name (`HUP`, `TERM`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }
}

/// The listener lines go first in `[server]` (added to the body's own `[server]` if any).
fn with_listeners(listeners: &str, body: &str) -> String {
    match body.find("[server]\n") {
        Some(i) => {
            let at = i + "[server]\n".len();
            format!("{}{listeners}{}", &body[..at], &body[at..])
        }
        None => format!("[server]\n{listeners}{body}"),
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}
