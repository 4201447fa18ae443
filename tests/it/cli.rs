//! The command line, as an operator runs it.

use std::process::Command;

fn cachegate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cachegate"))
}

fn write_config(name: &str, text: &str) -> (tempdir::Dir, std::path::PathBuf) {
    let dir = tempdir::Dir::new();
    let path = dir.path.join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

mod tempdir {
    /// A scratch directory removed on drop.
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Dir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "cachegate-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[test]
fn check_prints_the_rule_table() {
    let (_d, path) = write_config(
        "ok.toml",
        "[upstream]\nurl = \"http://127.0.0.1:9000\"\n[[rule]]\nname = \"user\"\nmatch = \"/user/{id}\"\nttl = \"5m\"\ntags = [\"user:{id}\"]\n",
    );
    let out = cachegate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("user") && stdout.contains("/user/{id}") && stdout.contains("5m"),
        "{stdout}"
    );
}

#[test]
fn invalid_config_prints_file_line_col_and_exits_2() {
    let (_d, path) = write_config(
        "bad.toml",
        "[upstream]\nurl = \"http://127.0.0.1:9000\"\n\n[[rule]]\nname = \"user\"\nmatch = \"/user/{id}\"\nttl = \"5 minutes\"\n",
    );
    let out = cachegate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "{}:7:7: rule \"user\": ttl \"5 minutes\" is not a duration (try \"5m\")",
            path.display()
        )
    );
}

#[test]
fn unknown_config_key_fails_start() {
    let (_d, path) = write_config(
        "typo.toml",
        "[upstream]\nurl = \"http://127.0.0.1:9000\"\n[server]\nlisen = \"0.0.0.0:8080\"\n",
    );
    let out = cachegate()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":4:1: unknown field `lisen`"), "{stderr}");
}

#[test]
fn version_is_printed() {
    let out = cachegate().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cachegate "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_command_talks_to_the_admin_api() {
    use crate::support::*;
    let origin = Origin::echo().await;
    let rules = "[admin]\ntoken_env = \"ADMIN_TOKEN\"\n[[rule]]\nname = \"u\"\nmatch = \"/u/{id}\"\nttl = \"5m\"\ntags = [\"u:{id}\"]\n";
    let proxy = Proxy::start_env(
        &config(&origin, MEMORY_STORE, rules),
        &[("ADMIN_TOKEN", "cli-admin-token-0123456789")],
    )
    .await;
    proxy.get("/u/1").await;
    assert_eq!(proxy.get("/u/1").await.x_cache(), "HIT");
    let admin = format!("http://{}", proxy.admin);
    let out = tokio::task::spawn_blocking(move || {
        cachegate()
            .args(["purge", "--tag", "u:1", "--admin", &admin])
            .env("CACHEGATE_ADMIN_TOKEN", "cli-admin-token-0123456789")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"bumped":1,"queued":false}"#
    );
    assert_eq!(proxy.get("/u/1").await.x_cache(), "MISS");
    let admin = format!("http://{}", proxy.admin);
    let refused = tokio::task::spawn_blocking(move || {
        cachegate()
            .args(["purge", "--tag", "u:1", "--admin", &admin])
            .env("CACHEGATE_ADMIN_TOKEN", "wrong-token-0123456789")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
}
