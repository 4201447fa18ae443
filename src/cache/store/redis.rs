//! The Redis store: the only module that speaks to Redis (`config` only parses its URLs).
//!
//! Each worker thread (`runtime::slot`) has its own pair of multiplexed connections
//! (redis-rs `ConnectionManager`), made on first use on that thread so their I/O runs there:
//! concurrent requests are pipelined on the wire with no pool checkout and no hand-off
//! between threads. One connection of a pair is for the small keys (sessions, tag
//! generations, leases), one for entries, so a large entry on its way cannot hold up a
//! session check. Each operation is one pipeline on one connection, i.e. one round trip; a
//! lookup reads both connections at once. Timeouts and the circuit breaker are applied by
//! the caller (`Guarded`); reconnection is the manager's job.
//!
//! Nothing is read unbounded: values are read with GETRANGE up to a limit (an entry's
//! `max_object_size` plus its envelope; `SMALL_LIMIT` for small keys), so a huge foreign
//! value under a key costs one bounded reply, never its whole size. Every command touches
//! one key, and scripts never more than one.

mod sentinel;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo,
    IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, PushKind, TlsCertificates, Value,
};

use super::{BoxFut, Move, Moved, SMALL_LIMIT, Small, Store, StoreError};
use crate::cache::key::{EntryKey, GenKey, LeaseKey, SessionKey};
use crate::cache::mirror::Mirror;

/// TLS to Redis (`rediss://`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    /// Trust anchors (PEM) used instead of the system's.
    pub ca: Option<Vec<u8>>,
    /// Client certificate chain and key (PEM), for servers that ask for one.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    // Sizes only: a key must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_bytes", &self.ca.as_ref().map(Vec::len))
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// Where the Redis to use is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`url`).
    Url(String),
    /// The master Sentinel names `master`, followed across failovers. The master is spoken
    /// to with the sentinels' scheme (`rediss://` sentinels: TLS to the master too).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        /// For the sentinels themselves.
        password: Option<String>,
    },
    /// A Redis Cluster, discovered from these seed nodes.
    Cluster { nodes: Vec<String> },
}

/// Drops its keys from the coherence table when dropped (see `RedisStore::writing`).
struct Writing<'k> {
    store: &'k RedisStore,
    keys: Vec<&'k [u8]>,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.store.mirror.get() {
            for k in &self.keys {
                m.invalidate(k);
            }
        }
    }
}

/// A Redis-backed store.
pub struct RedisStore {
    shared: Arc<Shared>,
    timeout: Duration,
    /// The coherence table the tracking connection keeps, once tracking was started.
    mirror: OnceLock<Arc<Mirror>>,
}

/// What the store and its background threads (tracking, Sentinel) share.
struct Shared {
    /// The connections to the server in use; none until Sentinel named a master.
    conns: ArcSwapOption<Conns>,
    /// Advanced each time `conns` is replaced, and `moved` rung: the tracking connection
    /// follows to the new server.
    generation: AtomicU64,
    moved: tokio::sync::Notify,
    /// Called after a move to another server (set once, by the purger).
    on_moved: OnceLock<Moved>,
    /// Rung when the server refuses a write as a replica (READONLY): it was demoted, so the
    /// sentinels are asked at once who the master is now.
    ask_now: tokio::sync::Notify,
    config: ConnectionManagerConfig,
}

/// The connections to one server.
struct Conns {
    /// The server, for logs.
    addr: String,
    client: Client,
    /// The same server, spoken to in RESP3: the tracking connection.
    tracking_client: Client,
    /// The connections of slot 0 (threads off the workers).
    first: Pair,
    /// Those of the workers (slots 1..), each made on its worker's first use.
    workers: Vec<std::sync::OnceLock<Pair>>,
}

impl Conns {
    /// Connections (made lazily) to the server `info` names.
    fn new(
        info: ConnectionInfo,
        tls: &RedisTls,
        config: &ConnectionManagerConfig,
    ) -> Result<Conns, StoreError> {
        let addr = info.addr().to_string();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let tracking_client = client_for(info.clone().set_redis_settings(resp3), tls)?;
        let client = client_for(info, tls)?;
        let first = Pair::new(&client, config)?;
        let workers = (1..crate::runtime::slots())
            .map(|_| std::sync::OnceLock::new())
            .collect();
        Ok(Conns {
            addr,
            client,
            tracking_client,
            first,
            workers,
        })
    }

    /// The calling thread's connections (made on its first use, so that they run there).
    fn pair(&self, config: &ConnectionManagerConfig) -> &Pair {
        let Some(cell) = crate::runtime::slot()
            .checked_sub(1)
            .and_then(|i| self.workers.get(i))
        else {
            return &self.first;
        };
        if let Some(p) = cell.get() {
            return p;
        }
        match Pair::new(&self.client, config) {
            Ok(p) => cell.get_or_init(|| p),
            // Cannot happen once slot 0 was made with the same settings; slot 0 serves.
            Err(_) => &self.first,
        }
    }
}

/// A client for `info`, over TLS with the configured trust and client certificate when the
/// address is a `rediss://` one.
fn client_for(info: ConnectionInfo, tls: &RedisTls) -> Result<Client, StoreError> {
    let result = if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: tls.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                root_cert: tls.ca.clone(),
            },
        )
    } else {
        Client::open(info)
    };
    result.map_err(|e| StoreError::Backend(format!("cannot use this Redis address: {e}")))
}

/// Check that a Redis URL parses (for `cachegate check`).
pub fn check_url(url: &str) -> Result<(), String> {
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The connections of one thread.
struct Pair {
    /// Sessions, generations, leases.
    small: ConnectionManager,
    /// Entries.
    entries: ConnectionManager,
}

impl Pair {
    fn new(client: &Client, config: &ConnectionManagerConfig) -> Result<Pair, StoreError> {
        Ok(Pair {
            small: ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(backend)?,
            entries: ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(backend)?,
        })
    }
}

/// With a password, if one is given.
fn with_password(info: ConnectionInfo, password: Option<&str>) -> ConnectionInfo {
    match password {
        Some(pw) => {
            let settings = info.redis_settings().clone().set_password(pw);
            info.set_redis_settings(settings)
        }
        None => info,
    }
}

impl RedisStore {
    /// Build the store without connecting: a Redis that is down at start only bypasses the
    /// cache until it comes up. With Sentinel, the master is asked for in the background and
    /// followed across failovers.
    pub fn connect_lazy(
        target: &RedisTarget,
        password: Option<&str>,
        tls: &RedisTls,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
            // No response timeout here: every call runs under `Guarded`'s, which drops the
            // waiting request (its late reply is discarded), so one timer per call is enough.
            .set_response_timeout(None)
            // Reconnection is retried a few times quickly; the caller's breaker and health
            // probe take over after that, so requests never wait on a long backoff.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let shared = Arc::new(Shared {
            conns: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            moved: tokio::sync::Notify::new(),
            on_moved: OnceLock::new(),
            ask_now: tokio::sync::Notify::new(),
            config,
        });
        match target {
            RedisTarget::Url(url) => {
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| StoreError::Backend(format!("invalid Redis URL: {e}")))?;
                let conns = Conns::new(with_password(info, password), tls, &shared.config)?;
                shared.conns.store(Some(Arc::new(conns)));
            }
            RedisTarget::Sentinel {
                sentinels,
                master,
                password: sentinel_password,
            } => {
                let watch = sentinel::Watch::new(
                    sentinels,
                    master,
                    sentinel_password.as_deref(),
                    password,
                    tls,
                    timeout.max(Duration::from_millis(250)),
                )?;
                watch.start(Arc::downgrade(&shared));
            }
            RedisTarget::Cluster { .. } => {
                return Err(StoreError::Backend(
                    "Redis Cluster is not supported by this build".into(),
                ));
            }
        }
        Ok(RedisStore {
            shared,
            timeout,
            mirror: OnceLock::new(),
        })
    }

    /// One of the calling thread's connections (`entries`: the one for entries).
    fn conn(&self, entries: bool) -> Result<ConnectionManager, StoreError> {
        let guard = self.shared.conns.load();
        let Some(conns) = guard.as_ref() else {
            return Err(StoreError::Backend(
                "no Redis master known yet (asking the sentinels)".into(),
            ));
        };
        let pair = conns.pair(&self.shared.config);
        Ok(if entries {
            pair.entries.clone()
        } else {
            pair.small.clone()
        })
    }

    async fn run(&self, pipe: Pipeline) -> Result<Vec<Value>, StoreError> {
        let result = run_on(self.conn(false)?, pipe).await;
        let demoted = match &result {
            Err(StoreError::Refused(why)) => why.contains("READONLY"),
            Ok(values) => values
                .iter()
                .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY")),
            Err(_) => false,
        };
        if demoted {
            self.shared.ask_now.notify_one();
        }
        result
    }

    /// A write of small keys this instance is making: when it ends (it landed, failed, or
    /// was given up on and may still land) its keys are dropped from the coherence table
    /// at once, without waiting for Redis to announce it, so this instance's next read
    /// after the write never uses the old value.
    fn writing<'k>(&'k self, keys: Vec<&'k [u8]>) -> Writing<'k> {
        Writing { store: self, keys }
    }

    /// One command on the small-keys connection, its reply.
    async fn one(&self, pipe: Pipeline) -> Result<Value, StoreError> {
        self.run(pipe)
            .await?
            .pop()
            .ok_or_else(|| StoreError::Backend("empty reply".into()))
    }
}

impl Shared {
    /// Use the server `info` names from now on (Sentinel named a new master).
    fn switch(&self, conns: Conns) {
        let addr = conns.addr.clone();
        let moving = self.conns.load().is_some();
        let hook = self.on_moved.get().filter(|_| moving);
        if let Some(f) = hook {
            // Before any call can reach the new server: reads stop using the cache.
            f(Move::Starting);
        }
        let old = self.conns.swap(Some(Arc::new(conns)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.moved.notify_waiters();
        if let Some(f) = hook {
            f(Move::Done);
        }
        match old {
            Some(old) => tracing::warn!(
                from = %old.addr,
                to = %addr,
                "Redis master changed; the store follows it and replays recent purges"
            ),
            None => tracing::info!(master = %addr, "Redis master found"),
        }
    }
}

async fn run_on(mut conn: ConnectionManager, pipe: Pipeline) -> Result<Vec<Value>, StoreError> {
    // Nothing to send (no generation to extend, say): the client would call that an error.
    if pipe.is_empty() {
        return Ok(Vec::new());
    }
    pipe.query_async::<Vec<Value>>(&mut conn)
        .await
        .map_err(backend)
}

fn backend(e: redis::RedisError) -> StoreError {
    use redis::ErrorKind;
    if e.is_timeout() {
        StoreError::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Backend(e.to_string())
    } else if matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) {
        // Redis answered, with a refusal (OOM under maxmemory, READONLY, LOADING...): the
        // store is reachable, so this must not trip the breaker or readiness.
        StoreError::Refused(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

/// A bounded read: GETRANGE returns at most `limit + 1` bytes, so a longer value is seen
/// as too long without being transferred. An absent key reads as empty, i.e. absent.
fn bounded_get(pipe: &mut Pipeline, key: &[u8], limit: usize) {
    pipe.cmd("GETRANGE").arg(key).arg(0).arg(limit);
}

/// A reply as bytes. A value of another type (a hash where an entry should be, say:
/// WRONGTYPE) reads as absent, so the caller treats it as a miss and overwrites it. Any
/// other error reply (LOADING after a restart, BUSY, MASTERDOWN...) is a store fault: it
/// must never read as "no session" (a 401) or "no generation" (a wildcard).
fn bytes_of(v: Value) -> Result<Option<Bytes>, StoreError> {
    match v {
        Value::BulkString(b) if b.is_empty() => Ok(None),
        Value::BulkString(b) => Ok(Some(Bytes::from(b))),
        Value::SimpleString(s) => Ok(Some(Bytes::from(s))),
        Value::Int(i) => Ok(Some(Bytes::from(i.to_string()))),
        Value::ServerError(e) if e.code() == "WRONGTYPE" => Ok(None),
        // LOADING, MASTERDOWN, BUSY...: the store cannot answer reads now.
        Value::ServerError(e) => Err(StoreError::Backend(format!(
            "{} {}",
            e.code(),
            e.details().unwrap_or_default()
        ))),
        _ => Ok(None),
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// True when a reply says the command did its work (OK, or a positive count).
fn done(v: &Value) -> bool {
    matches!(v, Value::Okay | Value::SimpleString(_)) || matches!(v, Value::Int(n) if *n > 0)
}

/// Delete `key` only while it holds `value` (one key per script: safe on a cluster).
fn del_if_equals(key: &[u8], value: &[u8]) -> Pipeline {
    const SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL").arg(SCRIPT).arg(1).arg(key).arg(value);
    pipe
}

impl Store for RedisStore {
    fn read_entry<'a>(
        &'a self,
        key: &'a EntryKey,
        limit: usize,
    ) -> BoxFut<'a, Result<Option<Bytes>, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        bounded_get(&mut pipe, &key.0, limit);
        Box::pin(async move {
            match run_on(self.conn(true)?, pipe).await?.pop() {
                Some(v) => bytes_of(v),
                None => Err(StoreError::Backend("empty GETRANGE reply".into())),
            }
        })
    }

    fn read_small<'a>(
        &'a self,
        session: Option<&'a SessionKey>,
        gens: &'a [GenKey],
    ) -> BoxFut<'a, Result<Small, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if let Some(s) = session {
            bounded_get(&mut pipe, s.0.as_bytes(), SMALL_LIMIT);
            // Its remaining life: the coherence table vouches for it no longer than that.
            pipe.cmd("PTTL").arg(s.0.as_bytes());
        }
        for g in gens {
            bounded_get(&mut pipe, &g.0, SMALL_LIMIT);
        }
        let count = 2 * usize::from(session.is_some()) + gens.len();
        Box::pin(async move {
            let values = run_on(self.conn(false)?, pipe).await?;
            if values.len() != count {
                return Err(StoreError::Backend(format!(
                    "expected {count} replies, got {}",
                    values.len()
                )));
            }
            let mut values = values.into_iter();
            let (session, session_ttl) = match session {
                Some(_) => {
                    let value = values.next().map(bytes_of).transpose()?.flatten();
                    let ttl = match values.next() {
                        Some(Value::Int(-1)) => None,
                        Some(Value::Int(n)) if n >= 0 => Some(Duration::from_millis(n as u64)),
                        // Absent, or not known: vouched for no time at all.
                        _ => Some(Duration::ZERO),
                    };
                    (value, ttl)
                }
                None => (None, None),
            };
            let gens = values.map(bytes_of).collect::<Result<Vec<_>, _>>()?;
            Ok(Small {
                session,
                session_ttl,
                gens,
            })
        })
    }

    fn put<'a>(
        &'a self,
        entries: Vec<(EntryKey, Bytes)>,
        ttl: Duration,
        gens: &'a [GenKey],
        gen_ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        for (key, value) in &entries {
            pipe.cmd("SET")
                .arg(&key.0)
                .arg(value.as_ref())
                .arg("PX")
                .arg(ms(ttl))
                .ignore();
        }
        let mut touch = redis::pipe();
        for g in gens {
            touch.cmd("PEXPIRE").arg(&g.0).arg(ms(gen_ttl)).ignore();
        }
        Box::pin(async move {
            let (stored, touched) = tokio::join!(
                run_on(self.conn(true)?, pipe),
                run_on(self.conn(false)?, touch)
            );
            stored?;
            touched.map(|_| ())
        })
    }

    fn init_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<Vec<Option<Bytes>>, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (k, v) in &items {
            pipe.cmd("SET")
                .arg(&k.0)
                .arg(v.as_ref())
                .arg("NX")
                .arg("PX")
                .arg(ms(ttl))
                .ignore();
            bounded_get(&mut pipe, &k.0, SMALL_LIMIT);
        }
        Box::pin(async move { self.run(pipe).await?.into_iter().map(bytes_of).collect() })
    }

    fn set_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        for (k, v) in &items {
            pipe.cmd("SET")
                .arg(&k.0)
                .arg(v.as_ref())
                .arg("PX")
                .arg(ms(ttl))
                .ignore();
        }
        Box::pin(async move {
            let _writing = self.writing(items.iter().map(|(k, _)| &k.0[..]).collect());
            self.run(pipe).await.map(|_| ())
        })
    }

    fn bump_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (k, v) in &items {
            pipe.cmd("SET")
                .arg(&k.0)
                .arg(v.as_ref())
                .arg("PX")
                .arg(ms(ttl));
        }
        let mut del = redis::pipe();
        for (k, _) in &items {
            del.cmd("DEL").arg(&k.0).ignore();
        }
        Box::pin(async move {
            let _writing = self.writing(items.iter().map(|(k, _)| &k.0[..]).collect());
            let mut refused = None;
            for v in self.run(pipe).await? {
                if let Value::ServerError(e) = v {
                    refused = Some(format!("{} {}", e.code(), e.details().unwrap_or_default()));
                }
            }
            match refused {
                None => Ok(()),
                // Redis refuses writes (maxmemory with noeviction, say) but still deletes:
                // an absent generation matches no entry, so a DEL purges as surely.
                Some(why) if why.starts_with("OOM") => self.run(del).await.map(|_| ()),
                Some(why) => Err(StoreError::Refused(why)),
            }
        })
    }

    fn session_set<'a>(
        &'a self,
        key: &'a SessionKey,
        token: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("SET").arg(key.0.as_bytes()).arg(token.as_ref());
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ms(ttl));
        }
        cmd.ignore();
        Box::pin(async move {
            let _writing = self.writing(vec![key.0.as_bytes()]);
            self.run(pipe).await.map(|_| ())
        })
    }

    fn session_end<'a>(
        &'a self,
        key: &'a SessionKey,
        token: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        let pipe = del_if_equals(key.0.as_bytes(), &token);
        Box::pin(async move {
            let _writing = self.writing(vec![key.0.as_bytes()]);
            Ok(done(&self.one(pipe).await?))
        })
    }

    fn session_delete<'a>(&'a self, key: &'a SessionKey) -> BoxFut<'a, Result<bool, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(key.0.as_bytes());
        Box::pin(async move {
            let _writing = self.writing(vec![key.0.as_bytes()]);
            Ok(done(&self.one(pipe).await?))
        })
    }

    fn session_ttl<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFut<'a, Result<Option<Option<Duration>>, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("PTTL").arg(key.0.as_bytes());
        Box::pin(async move {
            match self.one(pipe).await? {
                Value::Int(-2) => Ok(None),
                Value::Int(-1) => Ok(Some(None)),
                Value::Int(n) if n >= 0 => Ok(Some(Some(Duration::from_millis(n as u64)))),
                other => Err(StoreError::Backend(format!(
                    "unexpected PTTL reply {other:?}"
                ))),
            }
        })
    }

    fn lease_take<'a>(
        &'a self,
        key: &'a LeaseKey,
        token: Bytes,
        ttl: Duration,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key.0)
            .arg(token.as_ref())
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl));
        Box::pin(async move { Ok(done(&self.one(pipe).await?)) })
    }

    fn lease_release<'a>(
        &'a self,
        key: &'a LeaseKey,
        token: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        let pipe = del_if_equals(&key.0, &token);
        Box::pin(async move { Ok(done(&self.one(pipe).await?)) })
    }

    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        Box::pin(async move { self.run(pipe).await.map(|_| ()) })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn on_moved(&self, f: Moved) {
        let _ = self.shared.on_moved.set(f);
    }

    fn track(&self, mirror: Arc<Mirror>, prefixes: Vec<Vec<u8>>) {
        if self.mirror.set(mirror.clone()).is_err() {
            return;
        }
        let shared = Arc::downgrade(&self.shared);
        let timeout = self.timeout.max(Duration::from_millis(250));
        let weak = Arc::downgrade(&mirror);
        // A thread of its own, idle but for this connection: an invalidation is taken in as
        // soon as it arrives, however busy the workers are.
        on_own_thread(
            "cachegate-tracking",
            track_forever(shared, weak, prefixes, timeout),
            "cannot run Redis tracking; the in-process tier stays off",
        );
    }
}

/// Run `task` on a thread of its own, on a single-threaded runtime; `failed` is logged if
/// that cannot be.
fn on_own_thread(
    name: &str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
    failed: &'static str,
) {
    let started = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(task),
                Err(e) => tracing::error!(error = %e, "{failed}"),
            }
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "{failed}");
    }
}

/// How often the tracking connection is checked when nothing else is heard from it: a
/// connection that dies silently (no reset) is noticed within this plus the timeout.
const HEARTBEAT: Duration = Duration::from_millis(250);

/// Keep a tracking connection subscribed for as long as the table exists: connect,
/// subscribe, heartbeat; on any failure mark the table lost and start again (with a backoff).
/// When the store moves to another server (a Sentinel failover), it moves along.
async fn track_forever(
    shared: std::sync::Weak<Shared>,
    mirror: std::sync::Weak<Mirror>,
    prefixes: Vec<Vec<u8>>,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(50);
    let mut down = false;
    loop {
        let Some(store) = shared.upgrade() else {
            return;
        };
        let gone = Arc::new(tokio::sync::Notify::new());
        let result = tracking_session(&store, &mirror, &prefixes, timeout, &gone).await;
        drop(store);
        let Some(table) = mirror.upgrade() else {
            return;
        };
        table.lost();
        match result {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                tracing::warn!(
                    "Redis tracking connection lost; the in-process tier is not used until it is back"
                );
                down = true;
            }
            Err(e) if !down => {
                tracing::warn!(
                    error = %e,
                    "Redis tracking unavailable; the in-process tier is not used until it is back"
                );
                down = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One tracking connection's life. `Ok` once it was acknowledged and then lost (or the
/// table is gone); `Err` if it never got that far.
async fn tracking_session(
    store: &Shared,
    mirror: &std::sync::Weak<Mirror>,
    prefixes: &[Vec<u8>],
    timeout: Duration,
    gone: &Arc<tokio::sync::Notify>,
) -> Result<(), String> {
    let generation = store.generation.load(Ordering::Acquire);
    let Some(client) = store
        .conns
        .load()
        .as_ref()
        .map(|c| c.tracking_client.clone())
    else {
        return Err("no Redis master known yet".into());
    };
    let table = mirror.clone();
    let notify = gone.clone();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_push_sender(move |info: PushInfo| -> Result<(), ()> {
            if let Some(m) = table.upgrade() {
                on_push(&m, &notify, info);
            }
            Ok(())
        });
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("TRACKING").arg("ON").arg("BCAST");
    for p in prefixes {
        cmd.arg("PREFIX").arg(&p[..]);
    }
    cmd.query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("CLIENT TRACKING refused: {e}"))?;
    match mirror.upgrade() {
        Some(m) => m.restored(),
        None => return Ok(()),
    }
    // A disconnection announced before `restored` left a permit: the first wait ends at once.
    loop {
        tokio::select! {
            _ = gone.notified() => return Ok(()),
            _ = store.moved.notified() => {}
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        if store.generation.load(Ordering::Acquire) != generation {
            // The store moved to another server: track that one.
            return Ok(());
        }
        if mirror.strong_count() == 0
            || redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .is_err()
        {
            return Ok(());
        }
    }
}

/// An invalidation (keys, or a flush) or the connection's end, as Redis and the client
/// library announce them.
fn on_push(mirror: &Mirror, gone: &tokio::sync::Notify, info: PushInfo) {
    match info.kind {
        PushKind::Invalidate => match info.data.into_iter().next() {
            Some(Value::Array(keys)) => {
                for k in keys {
                    match k {
                        Value::BulkString(b) => mirror.invalidate(&b),
                        Value::SimpleString(s) => mirror.invalidate(s.as_bytes()),
                        // Not a key we can name: assume anything changed.
                        _ => mirror.flush(),
                    }
                }
            }
            // A null invalidation: FLUSHALL / FLUSHDB, or keys Redis did not list.
            _ => mirror.flush(),
        },
        PushKind::Disconnection => {
            mirror.lost();
            gone.notify_one();
        }
        _ => {}
    }
}
