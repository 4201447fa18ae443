//! The running application: what lives as long as the process (the store and cache, the
//! purge queue, the metrics) and the live configuration snapshot (`Live`) every request
//! reads, swapped whole by a reload.
//!
//! A request loads the snapshot once at its start and uses it to its end, so a reload never
//! changes the rules under a request in flight, and no connection is dropped. A reload
//! validates the file exactly like `cachegate check`; an invalid file keeps the running
//! configuration. Settings that cannot change while running (listen addresses, the store)
//! keep their old values and are reported as needing a restart. This module knows nothing
//! of HTTP handling: the proxy and the admin API use it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::auth::session::SessionStore;
use crate::cache::Cache;
use crate::cache::l1::L1;
use crate::cache::store::memory::MemoryStore;
use crate::cache::store::redis::RedisStore;
use crate::cache::store::{Guarded, Store};
use crate::config::{Config, ConfigError, StoreBackend};
use crate::labels::ReloadResult;
use crate::metrics::{Metrics, RuleMetrics, UNMATCHED};
use crate::purge::Purger;
use crate::routing::Rule;
use crate::upstream::Upstream;

/// Tag bumps held while the store is unreachable; past this the queue becomes one purge of
/// everything.
const PURGE_QUEUE: usize = 10_000;

/// Why the application could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot set up the store: {0}")]
    Store(String),
    #[error("cannot set up the upstream client: {0}")]
    Upstream(String),
}

/// Everything a request reads from configuration, immutable: a reload builds a new one.
pub struct Live {
    pub config: Config,
    pub upstream: Upstream,
    /// Per-rule metric handles, in rule order, then the unmatched label's.
    rule_metrics: Vec<Arc<RuleMetrics>>,
}

impl Live {
    fn new(config: Config, metrics: &Metrics) -> Result<Live, String> {
        let rule_metrics = config
            .rules
            .rules()
            .iter()
            .map(|r| &*r.name)
            .chain(std::iter::once(UNMATCHED))
            .map(|name| metrics.rule(name))
            .collect();
        Ok(Live {
            upstream: Upstream::new(&config.upstream)?,
            config,
            rule_metrics,
        })
    }

    /// The metric handles of a rule (`None`: requests no rule matched).
    pub fn rule_metrics(&self, rule: Option<&Rule>) -> &RuleMetrics {
        let i = rule
            .map(|r| r.index)
            .unwrap_or(self.rule_metrics.len() - 1)
            .min(self.rule_metrics.len() - 1);
        &self.rule_metrics[i]
    }

    /// How long generation keys must live: past the longest time any rule keeps an entry
    /// (freshness + stale windows + the revalidation keep), plus a margin.
    fn generation_ttl(&self) -> Duration {
        let longest = self
            .config
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
}

/// Where the configuration comes from, for reloads.
struct Source {
    path: PathBuf,
    env: Env,
}

/// How a reload reads the secrets the file names.
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What a successful reload changed.
#[derive(Debug, Clone, Default)]
pub struct Reloaded {
    pub rules: usize,
    /// Settings that changed in the file but keep their running values until a restart.
    pub restart_needed: Vec<&'static str>,
}

/// The running application.
pub struct App {
    live: ArcSwap<Live>,
    pub metrics: Arc<Metrics>,
    pub cache: Arc<Cache>,
    pub sessions: SessionStore,
    pub purger: Arc<Purger>,
    source: Option<Source>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl App {
    /// Build the application from a validated config. `path`: the file to read again on
    /// reload (none: reloads are refused).
    pub fn new(config: Config, path: Option<PathBuf>) -> Result<Arc<App>, AppError> {
        App::with_env(config, path, Arc::new(|name| std::env::var(name).ok()))
    }

    /// As `new`, with the environment lookup a reload uses.
    pub fn with_env(config: Config, path: Option<PathBuf>, env: Env) -> Result<Arc<App>, AppError> {
        let metrics = Arc::new(Metrics::new());
        // Of `l1_max_bytes`, an eighth is the coherence table's (`Cache::track`).
        let table_bytes = config.cache.l1_max_bytes / 8;
        let mut l1 = (config.cache.l1_max_bytes > 0)
            .then(|| L1::new(config.cache.l1_max_bytes - table_bytes));
        let store: Arc<dyn Store> = match &config.store.backend {
            StoreBackend::Memory { max_bytes } => {
                // The embedded store keeps the small keys; its entries are the tier's.
                l1 = Some(L1::new(MemoryStore::entry_budget(*max_bytes)));
                Arc::new(MemoryStore::new(*max_bytes))
            }
            StoreBackend::Redis {
                target,
                password,
                tls,
            } => Arc::new(
                RedisStore::connect_lazy(target, password.as_deref(), tls, config.store.timeout)
                    .map_err(|e| AppError::Store(e.to_string()))?,
            ),
        };
        let guarded = Arc::new(Guarded::new(store, config.store.timeout, metrics.clone()));
        // rustls's process-wide provider, for the TLS clients that ask for it (Redis's).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let live = Live::new(config, &metrics).map_err(AppError::Upstream)?;
        let cache = Arc::new(Cache::new(
            guarded.clone(),
            &live.config.store.prefix,
            live.generation_ttl(),
            live.config.cache.max_object_size,
            l1,
            metrics.clone(),
        ));
        cache.track(
            live.config.cache.l1_serve_disconnected,
            live.config.auth.gate.template.static_prefix(),
            table_bytes as usize,
        );
        let purger = Arc::new(Purger::new(cache.clone(), metrics.clone(), PURGE_QUEUE));
        let replay = Arc::downgrade(&purger);
        guarded.on_moved(Arc::new(move |step| {
            if let Some(p) = replay.upgrade() {
                p.store_moving(step);
            }
        }));
        if live.config.auth.weak_secret {
            metrics.auth_weak_secret.set(1);
        }
        metrics.loaded();
        Ok(Arc::new(App {
            live: ArcSwap::from_pointee(live),
            metrics,
            cache,
            sessions: SessionStore::new(guarded),
            purger,
            source: path.map(|path| Source { path, env }),
            reloading: tokio::sync::Mutex::new(()),
        }))
    }

    /// The live configuration now. A request takes it once and keeps it to its end.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Ready to serve: `Err` says why not.
    pub fn readiness(&self) -> Result<(), String> {
        self.cache.store().ready()
    }

    /// Read the config file again and, if it is valid, make it live. Every problem of an
    /// invalid file is returned (and logged); the running configuration stays.
    pub async fn reload(&self) -> Result<Reloaded, ConfigError> {
        let _one = self.reloading.lock().await;
        let Some(source) = &self.source else {
            return Err(ConfigError::Invalid(vec![crate::config::Diagnostic {
                file: "(none)".into(),
                line: 0,
                col: 0,
                message: "this instance was not started from a config file".into(),
            }]));
        };
        let path = source.path.clone();
        let env = source.env.clone();
        // Reading and compiling touch the disk (files the config names): off the runtime.
        let loaded = tokio::task::spawn_blocking(move || Config::load_with_env(&path, &*env))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError::Invalid(vec![crate::config::Diagnostic {
                    file: source.path.display().to_string(),
                    line: 0,
                    col: 0,
                    message: format!("reading the file failed: {e}"),
                }]))
            });
        let mut config = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reload(ReloadResult::Failure);
                for line in e.lines() {
                    tracing::error!(problem = %line, "reload refused: the running configuration stays");
                }
                return Err(e);
            }
        };
        let old = self.live();
        let restart_needed = keep_restart_settings(&old.config, &mut config);
        for setting in &restart_needed {
            tracing::warn!(
                setting,
                "reload: this setting changed but needs a restart; the running value stays"
            );
        }
        let live = match Live::new(config, &self.metrics) {
            Ok(live) => Arc::new(live),
            Err(why) => {
                self.metrics.reload(ReloadResult::Failure);
                tracing::error!(problem = %why, "reload refused: the running configuration stays");
                return Err(ConfigError::Invalid(vec![crate::config::Diagnostic {
                    file: source.path.display().to_string(),
                    line: 0,
                    col: 0,
                    message: why,
                }]));
            }
        };
        // The new snapshot first: requests from now on see it, then the shared state follows.
        self.live.store(live.clone());
        let names: Vec<&str> = live.config.rules.rules().iter().map(|r| &*r.name).collect();
        self.metrics.retain_rules(&names);
        self.cache
            .set_limits(live.generation_ttl(), live.config.cache.max_object_size);
        self.cache
            .set_serve_disconnected(live.config.cache.l1_serve_disconnected);
        self.metrics
            .auth_weak_secret
            .set(i64::from(live.config.auth.weak_secret));
        let rules = live.config.rules.rules().len();
        self.metrics.reload(ReloadResult::Success);
        tracing::info!(rules, "configuration reloaded");
        Ok(Reloaded {
            rules,
            restart_needed,
        })
    }
}

/// Settings a running instance cannot change: put the running values back into `new`, and
/// name those that differed.
fn keep_restart_settings(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push("server.listen");
        new.server.listen = old.server.listen;
    }
    if old.server.admin_listen != new.server.admin_listen {
        changed.push("server.admin_listen");
        new.server.admin_listen = old.server.admin_listen;
    }
    if old.server.max_connections != new.server.max_connections {
        changed.push("server.max_connections");
        new.server.max_connections = old.server.max_connections;
    }
    if old.store.backend != new.store.backend {
        changed
            .push("store (backend, url, sentinels, cluster_nodes, password, tls files, max_bytes)");
        new.store.backend = old.store.backend.clone();
    }
    if old.store.prefix != new.store.prefix {
        changed.push("store.prefix");
        new.store.prefix = old.store.prefix.clone();
    }
    if old.cache.l1_max_bytes != new.cache.l1_max_bytes {
        changed.push("cache.l1_max_bytes");
        new.cache.l1_max_bytes = old.cache.l1_max_bytes;
    }
    if old.store.timeout != new.store.timeout {
        changed.push("store.timeout");
        new.store.timeout = old.store.timeout;
    }
    changed
}
