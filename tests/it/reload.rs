//! Hot reload, on the real binary: SIGHUP and admin `POST /reload` read the file again and
//! swap the live configuration; requests in flight finish on the old one, no connection is
//! dropped, and an invalid file keeps the running configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;

use crate::support::*;

const ADMIN: &str = "admin-token-0123456789";

fn body(origin: &Origin, ttl_s: u64, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\n\n[admin]\ntoken_env = \"ADMIN\"\n\n\
         [[rule]]\nname = \"item\"\nmatch = \"/item/{{id}}\"\nttl = \"{ttl_s}s\"\n{extra}",
        origin.url()
    )
}

async fn get(client: &Client, url: String) -> Result<(u16, String), String> {
    let resp = client
        .get(url.parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let cache_status = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, cache_status))
}

async fn admin(daemon: &Daemon, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", daemon.admin));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .request(req.body(http_body_util::Full::default()).unwrap())
        .await
        .expect("admin answers");
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

async fn metrics(daemon: &Daemon) -> String {
    admin(daemon, "GET", "/metrics", None).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_nothing_and_the_new_ttl_takes_effect() {
    let origin = Origin::echo().await;
    let daemon = Daemon::start_env(&body(&origin, 100, ""), &[("ADMIN", ADMIN)]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = client();
    let mut load = Vec::new();
    for worker in 0..8 {
        let (stop, ok, failed, client) = (stop.clone(), ok.clone(), failed.clone(), client.clone());
        let addr = daemon.addr.clone();
        load.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let url = format!("http://{addr}/item/{}", (worker * 1000 + i) % 64);
                match get(&client, url).await {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                    Ok((status, _)) => {
                        eprintln!("status {status}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                    Err(e) => {
                        eprintln!("error {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    // Ten reloads, a second apart, each with another TTL.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_ttl = 100;
    for k in 1..=10u64 {
        tick.tick().await;
        // Ten seconds apart, so a TTL read a moment after storing (rounded down) still
        // names the reload it came from.
        last_ttl = 100 + 10 * k;
        daemon.rewrite(&body(&origin, last_ttl, ""));
        daemon.signal("HUP");
        eventually(Duration::from_secs(10), "the reload lands", || async {
            metric(
                &metrics(&daemon).await,
                "cachegate_config_reloads_total{result=\"success\"}",
            ) >= k as f64
        })
        .await;
    }
    tick.tick().await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during reloads"
    );
    assert!(ok.load(Ordering::SeqCst) > 100);
    let (status, cache_status) = get(&client, format!("http://{}/item/fresh", daemon.addr))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let ttl: u64 = cache_status
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {cache_status}"));
    assert!(
        (last_ttl - 2..=last_ttl).contains(&ttl),
        "the last reload's TTL ({last_ttl}s) applies: {cache_status}"
    );
    let m = metrics(&daemon).await;
    assert!(metric(&m, "cachegate_config_last_reload_success_timestamp_seconds") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_keeps_the_running_config() {
    let origin = Origin::echo().await;
    let daemon = Daemon::start_env(&body(&origin, 100, ""), &[("ADMIN", ADMIN)]).await;
    // Two mistakes: a bad duration and an unknown key.
    let broken =
        body(&origin, 100, "").replace("ttl = \"100s\"", "ttl = \"5 minutes\"\nttll = \"1s\"");
    daemon.rewrite(&broken);
    let (status, text) = admin(&daemon, "POST", "/reload", Some(ADMIN)).await;
    assert_eq!(status, 400, "{text}");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let problems = report["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 2, "{text}");
    let first = problems[0].as_str().unwrap();
    assert!(
        first.contains("cachegate.toml:13:7: rule \"item\": ttl \"5 minutes\" is not a duration"),
        "{text}"
    );
    assert!(
        problems[1]
            .as_str()
            .unwrap()
            .contains("unknown field `ttll`"),
        "{text}"
    );
    // A SIGHUP with the same file changes nothing either, and the process keeps serving.
    daemon.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "both reloads are counted",
        || async {
            metric(
                &metrics(&daemon).await,
                "cachegate_config_reloads_total{result=\"failure\"}",
            ) >= 2.0
        },
    )
    .await;
    let (status, cache_status) = get(&client(), format!("http://{}/item/1", daemon.addr))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(cache_status.contains("ttl=100"), "{cache_status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_needs_the_token() {
    let origin = Origin::echo().await;
    let daemon = Daemon::start_env(&body(&origin, 100, ""), &[("ADMIN", ADMIN)]).await;
    assert_eq!(admin(&daemon, "POST", "/reload", None).await.0, 401);
    assert_eq!(
        admin(&daemon, "POST", "/reload", Some("wrong-token-0123456789"))
            .await
            .0,
        401
    );
    let (status, text) = admin(&daemon, "POST", "/reload", Some(ADMIN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"reloaded\":true"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_rule_takes_its_metrics_and_a_restart_setting_stays() {
    let origin = Origin::echo().await;
    let two = format!(
        "{}\n[[rule]]\nname = \"gone\"\nmatch = \"/gone/{{id}}\"\nttl = \"1m\"\n",
        body(&origin, 100, "")
    );
    let daemon = Daemon::start_env(&two, &[("ADMIN", ADMIN)]).await;
    let c = client();
    get(&c, format!("http://{}/gone/1", daemon.addr))
        .await
        .unwrap();
    assert!(metrics(&daemon).await.contains("rule=\"gone\""));
    // The rule goes; the connection limit changes too, which needs a restart.
    let changed =
        body(&origin, 100, "").replace("[upstream]", "[server]\nmax_connections = 5\n\n[upstream]");
    daemon.rewrite(&changed);
    let (status, text) = admin(&daemon, "POST", "/reload", Some(ADMIN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("server.max_connections"), "{text}");
    let m = metrics(&daemon).await;
    assert!(!m.contains("rule=\"gone\""), "{m}");
    assert!(m.contains("rule=\"item\""), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwt_secret_accepts_new_tokens_and_refuses_old_ones() {
    let redis = Redis::start().await;
    let origin = Origin::echo().await;
    let secret_a = "first-secret-0123456789abcdef";
    let secret_b = "second-secret-0123456789abcdef";
    let config = |secret_file: &std::path::Path| {
        format!(
            "[upstream]\nurl = \"{}\"\n\n{}\n[admin]\ntoken_env = \"ADMIN\"\n\n\
             [auth]\njwt_secret_file = \"{}\"\n\n\
             [[rule]]\nname = \"profile\"\nmatch = \"/profile\"\nauth = \"required\"\n",
            origin.url(),
            redis_store(&redis),
            secret_file.display()
        )
    };
    // The secret file lives beside the config; the first body names a path made up front.
    let dir = std::env::temp_dir().join(format!("cachegate-secret-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("jwt.secret");
    std::fs::write(&secret_file, format!("{secret_a}\n")).unwrap();
    let daemon = Daemon::start_env(&config(&secret_file), &[("ADMIN", ADMIN)]).await;
    let token = |secret: &str| {
        hs256(
            secret,
            &serde_json::json!({ "sub": "alice", "exp": 4_000_000_000u64, "jti": secret }),
        )
    };
    let call = |t: String| {
        let addr = daemon.addr.clone();
        async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let req = http::Request::get(format!("http://{addr}/profile"))
                .header("authorization", format!("Bearer {t}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            client.request(req).await.unwrap().status().as_u16()
        }
    };
    let old = token(secret_a);
    let _: () = redis.cmd(&["SET", "user_token:alice", &old]).await;
    assert_eq!(call(old.clone()).await, 200);
    // Rotate: a new secret in the file, then a reload.
    std::fs::write(&secret_file, format!("{secret_b}\n")).unwrap();
    assert_eq!(admin(&daemon, "POST", "/reload", Some(ADMIN)).await.0, 200);
    assert_eq!(call(old).await, 401, "a token signed with the old secret");
    let new = token(secret_b);
    let _: () = redis.cmd(&["SET", "user_token:alice", &new]).await;
    assert_eq!(call(new).await, 200);
    let _ = std::fs::remove_dir_all(dir);
}
