//! A Sentinel-managed pair: a master, a replica, and three sentinels, all private
//! `redis-server` processes on free ports of 127.0.0.1, killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Redis, eventually, free_port};

pub const MASTER_NAME: &str = "mymaster";

pub struct Sentinels {
    pub master: Redis,
    pub replica: Redis,
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Sentinels {
    pub async fn start() -> Sentinels {
        let master = Redis::start().await;
        let replica = Redis::start().await;
        let _: () = replica
            .cmd(&["REPLICAOF", "127.0.0.1", &master.port.to_string()])
            .await;
        eventually(
            Duration::from_secs(10),
            "the replica is in sync",
            || async {
                let info: String = replica.cmd(&["INFO", "replication"]).await;
                info.contains("master_link_status:up")
            },
        )
        .await;
        let dir = std::env::temp_dir().join(format!(
            "cachegate-sentinel-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let mut s = Sentinels {
            master,
            replica,
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let port = free_port();
            let conf = s.dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    s.dir.display(),
                    s.master.port
                ),
            )
            .expect("sentinel conf");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel runs");
            s.children.push(child);
            s.ports.push(port);
        }
        // Every sentinel knows the master and has found the replica and its peers.
        for port in s.ports.clone() {
            eventually(
                Duration::from_secs(20),
                "the sentinels are ready",
                || async move {
                    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    else {
                        return false;
                    };
                    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                        return false;
                    };
                    let replicas: Result<Vec<redis::Value>, _> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(MASTER_NAME)
                        .query_async(&mut c)
                        .await;
                    let sentinels: Result<Vec<redis::Value>, _> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(MASTER_NAME)
                        .query_async(&mut c)
                        .await;
                    matches!((replicas, sentinels), (Ok(r), Ok(s)) if r.len() == 1 && s.len() == 2)
                },
            )
            .await;
        }
        s
    }

    /// The sentinel URLs, as `[store] sentinels` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// A command to the first sentinel.
    pub async fn ask<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}", self.ports[0])).expect("url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("sentinel connection");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.expect("sentinel command")
    }

    /// The port of the server the sentinels name as master now.
    pub async fn master_port(&self) -> u16 {
        let (_, port): (String, u16) = self
            .ask(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
            .await;
        port
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
