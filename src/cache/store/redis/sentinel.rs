//! Following a master that Sentinel manages: ask the sentinels which server is the master,
//! use it, and move when they announce a failover (`+switch-master`), or when asking again
//! (every `POLL`) gives another answer. redis-rs's sentinel client resolves a master once
//! and does not follow it, so the following is done here.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo};

use super::{Conns, RedisTls, Shared, client_for, on_own_thread, with_password};
use crate::cache::store::StoreError;

/// How often the sentinels are asked when none announces anything.
const POLL: Duration = Duration::from_secs(1);

/// What is needed to find the master and connect to it.
pub(super) struct Watch {
    sentinels: Vec<(String, Client)>,
    master: String,
    /// The master's password (not the sentinels').
    password: Option<String>,
    tls: RedisTls,
    /// The master is spoken to over TLS (the sentinels are `rediss://`).
    over_tls: bool,
    timeout: Duration,
}

impl Watch {
    pub(super) fn new(
        urls: &[String],
        master: &str,
        sentinel_password: Option<&str>,
        password: Option<&str>,
        tls: &RedisTls,
        timeout: Duration,
    ) -> Result<Watch, StoreError> {
        let sentinels = urls
            .iter()
            .map(|url| {
                let info = url.as_str().into_connection_info().map_err(|e| {
                    StoreError::Backend(format!("invalid sentinel URL {url:?}: {e}"))
                })?;
                let name = info.addr().to_string();
                Ok((
                    name,
                    client_for(with_password(info, sentinel_password), tls)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Watch {
            sentinels,
            master: master.to_string(),
            password: password.map(str::to_string),
            tls: tls.clone(),
            over_tls: urls
                .first()
                .is_some_and(|u| u.to_ascii_lowercase().starts_with("rediss://")),
            timeout,
        })
    }

    /// Follow the master on a thread of its own for as long as the store exists.
    pub(super) fn start(self, shared: Weak<Shared>) {
        on_own_thread(
            "cachegate-sentinel",
            self.follow(shared),
            "cannot follow the Redis master; the cache stays bypassed",
        );
    }

    async fn follow(self, shared: Weak<Shared>) {
        // Every sentinel's announcements are heard: the one that led the failover tells
        // first, and any one of them may be down.
        let heard = Arc::new(tokio::sync::Notify::new());
        for (_, client) in &self.sentinels {
            tokio::spawn(listen(client.clone(), heard.clone(), self.timeout));
        }
        let mut current: Option<(String, u16)> = None;
        let mut failing = false;
        let mut preferred = 0;
        loop {
            let Some(store) = shared.upgrade() else {
                return;
            };
            match self.ask(&mut preferred).await {
                Ok(addr) if current.as_ref() != Some(&addr) => {
                    match self.conns_for(&addr, &store) {
                        Ok(conns) => {
                            store.switch(conns);
                            current = Some(addr);
                        }
                        Err(e) => tracing::error!(
                            error = %e,
                            master = %format!("{}:{}", addr.0, addr.1),
                            "cannot use the master the sentinels name"
                        ),
                    }
                    failing = false;
                }
                Ok(_) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            error = %e,
                            master = %self.master,
                            "cannot ask the sentinels for the Redis master; still using the last one known"
                        );
                    }
                    failing = true;
                }
            }
            // Ask again on an announcement (any: asking says what changed), when the store
            // was refused a write (READONLY: the server was demoted), or after `POLL`.
            tokio::select! {
                _ = heard.notified() => {}
                _ = store.ask_now.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// The master's address, from the first sentinel that knows it (starting with the one
    /// that answered last).
    async fn ask(&self, preferred: &mut usize) -> Result<(String, u16), String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut why = Vec::new();
        for step in 0..self.sentinels.len() {
            let i = (*preferred + step) % self.sentinels.len();
            let (name, client) = &self.sentinels[i];
            let answer = async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| e.to_string())?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            match answer {
                Ok(Some(addr)) => {
                    *preferred = i;
                    return Ok(addr);
                }
                Ok(None) => why.push(format!("{name}: does not monitor {:?}", self.master)),
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        Err(why.join("; "))
    }

    /// Connections to the master at `addr`.
    fn conns_for(&self, addr: &(String, u16), store: &Arc<Shared>) -> Result<Conns, StoreError> {
        let scheme = if self.over_tls { "rediss" } else { "redis" };
        let host = if addr.0.contains(':') {
            format!("[{}]", addr.0)
        } else {
            addr.0.clone()
        };
        let url = format!("{scheme}://{host}:{}/0", addr.1);
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| StoreError::Backend(format!("the sentinels named {url:?}: {e}")))?;
        Conns::new(
            with_password(info, self.password.as_deref()),
            &self.tls,
            &store.config,
        )
    }
}

/// Ring `heard` on every failover announcement of one sentinel, reconnecting while the
/// sentinel is unreachable, for as long as the runtime runs.
async fn listen(client: Client, heard: Arc<tokio::sync::Notify>, timeout: Duration) {
    loop {
        let subscribed = tokio::time::timeout(timeout, async {
            let mut pubsub = client.get_async_pubsub().await.ok()?;
            pubsub.subscribe("+switch-master").await.ok()?;
            Some(pubsub.into_on_message())
        })
        .await;
        if let Ok(Some(mut stream)) = subscribed {
            while stream.next().await.is_some() {
                heard.notify_one();
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
