//! The Redis store: the only module that imports the `redis` crate.
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

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo,
    PushKind, Value,
};

use super::{BoxFut, SMALL_LIMIT, Small, Store, StoreError};
use crate::cache::key::{EntryKey, GenKey, LeaseKey, SessionKey};
use crate::cache::mirror::Mirror;

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
    client: Client,
    /// The same server, spoken to in RESP3: the tracking connection.
    tracking_client: Client,
    timeout: Duration,
    /// The coherence table the tracking connection keeps, once tracking was started.
    mirror: OnceLock<Arc<Mirror>>,
    config: ConnectionManagerConfig,
    /// The connections of slot 0 (threads off the workers).
    first: Pair,
    /// Those of the workers (slots 1..), each made on its worker's first use.
    workers: Vec<std::sync::OnceLock<Pair>>,
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

impl RedisStore {
    /// Build the store without connecting: a Redis that is down at start only bypasses the
    /// cache until it comes up.
    pub fn connect_lazy(
        url: &str,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let mut info = url
            .into_connection_info()
            .map_err(|e| StoreError::Backend(format!("invalid Redis URL: {e}")))?;
        if let Some(pw) = password {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let tracking_client = Client::open(info.clone().set_redis_settings(resp3))
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let client = Client::open(info).map_err(|e| StoreError::Backend(e.to_string()))?;
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
        let first = Pair::new(&client, &config)?;
        let workers = (1..crate::runtime::slots())
            .map(|_| std::sync::OnceLock::new())
            .collect();
        Ok(RedisStore {
            client,
            tracking_client,
            timeout,
            mirror: OnceLock::new(),
            config,
            first,
            workers,
        })
    }

    /// The calling thread's connections (made on its first use, so that they run there).
    fn pair(&self) -> &Pair {
        let Some(cell) = crate::runtime::slot()
            .checked_sub(1)
            .and_then(|i| self.workers.get(i))
        else {
            return &self.first;
        };
        if let Some(p) = cell.get() {
            return p;
        }
        match Pair::new(&self.client, &self.config) {
            Ok(p) => cell.get_or_init(|| p),
            // Cannot happen once slot 0 was made with the same settings; slot 0 serves.
            Err(_) => &self.first,
        }
    }

    async fn run(&self, pipe: Pipeline) -> Result<Vec<Value>, StoreError> {
        run_on(&self.pair().small, pipe).await
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

async fn run_on(conn: &ConnectionManager, pipe: Pipeline) -> Result<Vec<Value>, StoreError> {
    let mut conn = conn.clone();
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
            match run_on(&self.pair().entries, pipe).await?.pop() {
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
            let values = run_on(&self.pair().small, pipe).await?;
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
                run_on(&self.pair().entries, pipe),
                run_on(&self.pair().small, touch)
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

    fn track(&self, mirror: Arc<Mirror>, prefixes: Vec<Vec<u8>>) {
        if self.mirror.set(mirror.clone()).is_err() {
            return;
        }
        let client = self.tracking_client.clone();
        let timeout = self.timeout.max(Duration::from_millis(250));
        let weak = Arc::downgrade(&mirror);
        // A thread of its own, idle but for this connection: an invalidation is taken in as
        // soon as it arrives, however busy the workers are.
        let started = std::thread::Builder::new()
            .name("cachegate-tracking".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(track_forever(client, weak, prefixes, timeout)),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot run Redis tracking; the in-process tier stays off"
                    ),
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot run Redis tracking; the in-process tier stays off");
        }
    }
}

/// How often the tracking connection is checked when nothing else is heard from it: a
/// connection that dies silently (no reset) is noticed within this plus the timeout.
const HEARTBEAT: Duration = Duration::from_millis(250);

/// Keep a tracking connection subscribed for as long as the table exists: connect,
/// subscribe, heartbeat; on any failure mark the table lost and start again (with a backoff).
async fn track_forever(
    client: Client,
    mirror: std::sync::Weak<Mirror>,
    prefixes: Vec<Vec<u8>>,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(50);
    let mut down = false;
    loop {
        let gone = Arc::new(tokio::sync::Notify::new());
        let result = tracking_session(&client, &mirror, &prefixes, timeout, &gone).await;
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
    client: &Client,
    mirror: &std::sync::Weak<Mirror>,
    prefixes: &[Vec<u8>],
    timeout: Duration,
    gone: &Arc<tokio::sync::Notify>,
) -> Result<(), String> {
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
            _ = tokio::time::sleep(HEARTBEAT) => {}
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
