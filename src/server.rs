//! Listeners, connection limits, background tasks and graceful shutdown.
//!
//! `start` binds both listeners and returns at once with their addresses (tests bind port 0);
//! `Running::shutdown` stops accepting, lets in-flight requests finish for up to
//! `[server] shutdown_grace`, then closes what is left.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::cache::Cache;
use crate::cache::memory::MemoryStore;
use crate::cache::redis::RedisStore;
use crate::cache::store::{Guarded, Store};
use crate::config::{Config, StoreBackend};
use crate::metrics::Metrics;
use crate::proxy::Engine;
use crate::proxy::upstream::Upstream;
use crate::purge::Purger;

/// Tag bumps held while the store is unreachable; past this the queue becomes one purge of
/// everything.
const PURGE_QUEUE: usize = 10_000;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the store: {0}")]
    Store(String),
}

/// A started server.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub engine: Arc<Engine>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Build the engine (store, cache, upstream client, metrics) from a config.
    pub fn new(config: Config) -> Result<Arc<Engine>, StartError> {
        let names: Vec<&str> = config.rules.rules().iter().map(|r| &*r.name).collect();
        let metrics = Arc::new(Metrics::new(&names));
        let store: Arc<dyn Store> = match &config.store.backend {
            StoreBackend::Memory { max_bytes } => {
                Arc::new(MemoryStore::new(*max_bytes, &config.store.prefix))
            }
            StoreBackend::Redis { url, password } => Arc::new(
                RedisStore::connect_lazy(url, password.as_deref(), config.store.timeout)
                    .map_err(|e| StartError::Store(e.to_string()))?,
            ),
        };
        let guarded = Arc::new(Guarded::new(store, config.store.timeout, metrics.clone()));
        let cache = Arc::new(Cache::new(
            guarded,
            &config.store.prefix,
            generation_ttl(&config),
        ));
        let upstream = Upstream::new(&config.upstream);
        let purger = Arc::new(Purger::new(cache.clone(), metrics.clone(), PURGE_QUEUE));
        Ok(Arc::new(Engine {
            config: Arc::new(config),
            cache,
            purger,
            upstream,
            metrics,
        }))
    }

    /// Ready to serve: `Err` says why not.
    pub fn readiness(&self) -> Result<(), String> {
        self.cache.store().ready()
    }
}

/// Generation keys must outlive every entry that recorded them: the longest time any rule
/// keeps an entry (freshness + stale windows + the revalidation keep), plus a margin.
fn generation_ttl(config: &Config) -> Duration {
    let longest = config
        .rules
        .rules()
        .iter()
        .map(|r| {
            let ttl = r.ttl.unwrap_or_default();
            ttl * 2 + r.stale_while_revalidate.max(r.stale_if_error)
        })
        .max()
        .unwrap_or_default();
    longest + Duration::from_secs(3600)
}

/// Bind the listeners and start serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    let engine = Engine::new(config)?;
    let proxy_listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let admin_listener =
        TcpListener::bind(admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: admin_listen,
                source,
            })?;
    let addr = proxy_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: admin_listen,
            source,
        })?;
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(serve_proxy(engine.clone(), proxy_listener, stopped.clone())),
        tokio::spawn(serve_admin(engine.clone(), admin_listener, stopped.clone())),
        tokio::spawn(probe_store(engine.clone(), stopped.clone())),
        tokio::spawn(engine.purger.clone().run(stopped)),
    ];
    tracing::info!(%addr, %admin_addr, store = engine.cache.store().kind(), "cachegate listening");
    Ok(Running {
        addr,
        admin_addr,
        engine,
        stop,
        tasks,
    })
}

impl Running {
    /// Stop accepting, drain in-flight requests (bounded by the grace period), stop tasks.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn builder(engine: &Engine) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(engine.config.server.header_read_timeout)
        .max_headers(engine.config.server.max_header_count);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

async fn serve_proxy(
    engine: Arc<Engine>,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
) {
    let builder = builder(&engine);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(engine.config.server.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let engine_c = engine.clone();
        let service = service_fn(move |req| {
            let engine = engine_c.clone();
            async move { Ok::<_, std::convert::Infallible>(engine.handle(req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let watched = graceful.watch(conn);
        let metrics = engine.metrics.clone();
        metrics.connections.inc();
        tokio::spawn(async move {
            let _ = watched.await;
            metrics.connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    let grace = engine.config.server.shutdown_grace;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}

async fn serve_admin(
    engine: Arc<Engine>,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let engine = engine.clone();
        let service = service_fn(move |req| {
            let engine = engine.clone();
            async move { Ok::<_, std::convert::Infallible>(crate::admin::handle(engine, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

/// Probe the store every second: drives readiness and closes the breaker once it answers.
async fn probe_store(engine: Arc<Engine>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => break,
        }
        let up = engine.cache.store().probe().await;
        engine.metrics.store_up.set(up as i64);
    }
}
