//! A private `redis-server` per test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::free_port;

fn redis_server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A private redis-server on a free port, killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// Served over TLS only: the server's certificate and the CA that signed it.
    tls: Option<(super::Issued, std::path::PathBuf)>,
}

impl Redis {
    pub async fn start() -> Redis {
        for _ in 0..5 {
            let port = free_port();
            let mut r = Redis {
                child: None,
                port,
                tls: None,
            };
            if r.spawn().await {
                return r;
            }
        }
        panic!("could not start redis-server (is it installed? apt-get install redis-server)");
    }

    /// A redis-server that speaks TLS only, with a certificate `pki` issues.
    pub async fn start_tls(pki: &super::Pki) -> Redis {
        let issued = pki.issue(&format!("redis-{}", super::free_port()), &[]);
        for _ in 0..5 {
            let mut r = Redis {
                child: None,
                port: free_port(),
                tls: Some((issued.clone(), pki.ca_file())),
            };
            if r.spawn().await {
                return r;
            }
        }
        panic!("could not start redis-server with TLS");
    }

    /// A client for this server (over TLS with the test CA when it speaks TLS).
    pub fn client(&self) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(self.url()).expect("url"),
            Some((_, ca)) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).expect("ca file")),
                },
            )
            .expect("tls client"),
        }
    }

    async fn spawn(&mut self) -> bool {
        let mut command = Command::new(redis_server_binary());
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((issued, ca)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&issued.cert)
                .arg("--tls-key-file")
                .arg(&issued.key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            panic!("cannot run redis-server (is it installed? apt-get install redis-server)");
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: port taken
            }
            if self.ping().await {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    async fn ping(&self) -> bool {
        let client = self.client();
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                redis::cmd("PING").query_async::<String>(&mut conn)
            )
            .await,
            Ok(Ok(_))
        )
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// An independent connection, for checking what is in Redis.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    }

    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = self.conn().await;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.expect("redis command")
    }

    /// Send one inline command on a fresh raw connection and return the first reply line
    /// (works while the server pauses clients, since nothing else is sent first).
    pub async fn raw(&self, command: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to redis");
        s.write_all(format!("{command}\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).trim().to_string()
    }

    /// Send the server a signal by name (`STOP` freezes it with its data, `CONT` thaws it).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("redis is running").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Kill the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty: nothing is persisted).
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn().await {
            assert!(
                Instant::now() < deadline,
                "redis did not come back on port {}",
                self.port
            );
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
