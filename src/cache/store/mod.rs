//! The store the cache speaks to, and the guard every call goes through.
//!
//! `Store` is a set of typed operations (an entry lookup with its generations and session,
//! putting entries, initializing and bumping generations, sessions, leases) that both the
//! embedded memory store and Redis implement. Keys are typed (`cache::key`), so a store
//! never infers meaning from bytes. `Guarded` wraps a store with the failure policy (a
//! per-call timeout, a circuit breaker that stops paying that timeout while the store is
//! unhealthy, and metrics) and exposes the same operations: callers never reach the store
//! past it. Nothing here knows about HTTP.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::key::{EntryKey, GenKey, LeaseKey, SessionKey};
use crate::labels::StoreOp;
use crate::metrics::Metrics;

/// A boxed, sendable future (the trait is object-safe so backends are interchangeable).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a store call failed. Every variant means "the store cannot answer now".
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store command timed out")]
    Timeout,
    #[error("store unavailable (circuit open)")]
    Unavailable,
    #[error("store error: {0}")]
    Backend(String),
    /// The store answered with a refusal (out of memory, read-only...): it is reachable,
    /// so this is not a reason to stop asking it.
    #[error("store refused: {0}")]
    Refused(String),
}

impl StoreError {
    /// The failure's kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Unavailable => "circuit_open",
            StoreError::Backend(_) => "error",
            StoreError::Refused(_) => "refused",
        }
    }
}

/// What the store calls when it moves to another server (see `Store::on_moved`).
pub type Moved = Arc<dyn Fn(Move) + Send + Sync>;

/// The two steps of a move to another server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Calls still go to the old server.
    Starting,
    /// Calls go to the new server.
    Done,
}

/// The largest value read under a small key (a session token, a generation); a longer one
/// reads as `SMALL_LIMIT + 1` bytes, which is never a valid token or generation.
pub const SMALL_LIMIT: usize = 16 << 10;

/// What one lookup read. A value of a foreign type, or an empty one, reads as `None`.
#[derive(Debug)]
pub struct Read {
    /// The entry's bytes (more than its limit: too large to be an entry), or why they could
    /// not be read: a failed entry read does not fail the session and generations read
    /// beside it.
    pub entry: Result<Option<Bytes>, StoreError>,
    /// The session value, when one was asked for.
    pub session: Option<Bytes>,
    /// How long the session key lives on (`None`: no expiry, or not known).
    pub session_ttl: Option<Duration>,
    /// The generations, in the order asked.
    pub gens: Vec<Option<Bytes>>,
}

/// What a read of small keys found: the session (if asked) and generations, in order.
#[derive(Debug, Default)]
pub struct Small {
    pub session: Option<Bytes>,
    /// How long the session key lives on (`None`: no expiry, or not known).
    pub session_ttl: Option<Duration>,
    pub gens: Vec<Option<Bytes>>,
}

/// The typed operations of a store. Each is one round trip to the backend (per
/// connection); values are read bounded (entries at the given limit, small keys at
/// `SMALL_LIMIT`), so a huge foreign value is never read whole.
pub trait Store: Send + Sync + 'static {
    /// Read an entry: at most `limit + 1` of its bytes.
    fn read_entry<'a>(
        &'a self,
        key: &'a EntryKey,
        limit: usize,
    ) -> BoxFut<'a, Result<Option<Bytes>, StoreError>>;
    /// Read a session and generations (each at most `SMALL_LIMIT + 1` bytes).
    fn read_small<'a>(
        &'a self,
        session: Option<&'a SessionKey>,
        gens: &'a [GenKey],
    ) -> BoxFut<'a, Result<Small, StoreError>>;
    /// Store entries for `ttl`, and extend their generations to `gen_ttl`.
    fn put<'a>(
        &'a self,
        entries: Vec<(EntryKey, Bytes)>,
        ttl: Duration,
        gens: &'a [GenKey],
        gen_ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>>;
    /// Create absent generations (SET NX); returns what each holds now.
    fn init_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<Vec<Option<Bytes>>, StoreError>>;
    /// Overwrite generations (unreadable ones being replaced).
    fn set_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>>;
    /// Purge: give generations new values; a store that refuses writes for lack of memory
    /// deletes them instead, which purges as surely (an absent generation matches nothing).
    fn bump_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>>;
    /// Make `token` the session, for `ttl` (or without expiry).
    fn session_set<'a>(
        &'a self,
        key: &'a SessionKey,
        token: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFut<'a, Result<(), StoreError>>;
    /// End the session only if it still holds `token`; true when it did.
    fn session_end<'a>(
        &'a self,
        key: &'a SessionKey,
        token: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>>;
    /// End the session whatever it holds; true when there was one.
    fn session_delete<'a>(&'a self, key: &'a SessionKey) -> BoxFut<'a, Result<bool, StoreError>>;
    /// The session's remaining life: `None` when absent, `Some(None)` when it never expires.
    fn session_ttl<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFut<'a, Result<Option<Option<Duration>>, StoreError>>;
    /// Take a fill lease (SET NX PX); true when this call got it.
    fn lease_take<'a>(
        &'a self,
        key: &'a LeaseKey,
        token: Bytes,
        ttl: Duration,
    ) -> BoxFut<'a, Result<bool, StoreError>>;
    /// Give a lease back, only if it is still ours.
    fn lease_release<'a>(
        &'a self,
        key: &'a LeaseKey,
        token: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>>;
    /// A cheap liveness probe.
    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>>;
    /// "memory" or "redis", for logs and readiness.
    fn kind(&self) -> &'static str;
    /// Keep `mirror` equal to the store's keys under `prefixes` (tag generations,
    /// sessions) for as long as the process runs. A store that cannot leaves the table
    /// disconnected, so it is never used.
    fn track(&self, _mirror: Arc<crate::cache::mirror::Mirror>, _prefixes: Vec<Vec<u8>>) {}
    /// Call `f` each time the store moves to another server (a Sentinel failover): writes
    /// the old one took after its replica was promoted may be lost, so the caller replays
    /// what it recently wrote. `f(Move::Starting)` comes before any call can reach the new
    /// server, `f(Move::Done)` once calls go there. A store that never moves never calls it.
    fn on_moved(&self, _f: Moved) {}
    /// True for a store in this process (its calls complete without waiting on anything).
    fn is_local(&self) -> bool {
        false
    }
    /// Bytes and items held, for a store that holds them in this process.
    fn stats(&self) -> Option<(u64, u64)> {
        None
    }
}

/// Consecutive failures that open the breaker.
const OPEN_AFTER: u32 = 3;
/// How long an open breaker refuses calls before it lets one probe through.
const COOL_DOWN: Duration = Duration::from_millis(500);

/// A circuit breaker: closed -> (3 failures) -> open -> (cool-down) -> one probe -> closed | open.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls are refused; 0 when closed.
    open_until: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Breaker {
    fn now(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    /// May a call go through now? While open, exactly one caller per cool-down is let
    /// through as the probe.
    pub fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        if now < until {
            return false;
        }
        self.open_until
            .compare_exchange(
                until,
                now + COOL_DOWN.as_millis() as u64,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Record a success; returns true when this closed an open breaker.
    pub fn success(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.open_until.swap(0, Ordering::AcqRel) != 0
    }

    /// Record a failure; returns true when this opened the breaker.
    pub fn failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= OPEN_AFTER {
            let until = self.now() + COOL_DOWN.as_millis() as u64;
            let previous = self.open_until.swap(until, Ordering::AcqRel);
            return previous == 0;
        }
        false
    }

    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }
}

/// A store behind the failure policy: timeout, breaker, metrics. Every operation of the
/// store is one of its methods; the store itself is never handed out.
pub struct Guarded {
    inner: Arc<dyn Store>,
    timeout: Duration,
    breaker: Breaker,
    healthy: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
    metrics: Arc<Metrics>,
    last_warn_ms: AtomicU64,
}

impl Guarded {
    pub fn new(inner: Arc<dyn Store>, timeout: Duration, metrics: Arc<Metrics>) -> Guarded {
        Guarded {
            inner,
            timeout,
            breaker: Breaker::default(),
            healthy: AtomicBool::new(true),
            last_error: std::sync::Mutex::new(None),
            metrics,
            last_warn_ms: AtomicU64::new(0),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// True for a store in this process.
    pub fn is_local(&self) -> bool {
        self.inner.is_local()
    }

    /// Start keeping `mirror` coherent with the store (see `Store::track`).
    pub fn track(&self, mirror: Arc<crate::cache::mirror::Mirror>, prefixes: Vec<Vec<u8>>) {
        self.inner.track(mirror, prefixes);
    }

    /// Call `f` when the store moves to another server (see `Store::on_moved`).
    pub fn on_moved(&self, f: Moved) {
        self.inner.on_moved(f);
    }

    /// Bytes and items held, for an in-process store.
    pub fn stats(&self) -> Option<(u64, u64)> {
        self.inner.stats()
    }

    /// True while calls are being refused without trying.
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Readiness: the last probe (or call) succeeded. `Err` says why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.healthy.load(Ordering::Acquire) && !self.breaker.is_open() {
            Ok(())
        } else {
            let why = self
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "unreachable".into());
            Err(format!("{} store: {why}", self.inner.kind()))
        }
    }

    /// Read an entry, a session and generations at once. The session and generations
    /// decide whether the store answered (their failure is the lookup's); a failed entry
    /// read is reported in `Read::entry` and does not count against the store's health,
    /// since a slow large value says nothing about the small keys beside it.
    pub async fn lookup(
        &self,
        entry: Option<(&EntryKey, usize)>,
        session: Option<&SessionKey>,
        gens: &[GenKey],
    ) -> Result<Read, StoreError> {
        // Both reads run at once; each is timed and guarded like any call.
        let small = async {
            if session.is_none() && gens.is_empty() {
                return Ok(Small::default());
            }
            let op = if entry.is_none() && gens.is_empty() {
                StoreOp::Session
            } else {
                StoreOp::Lookup
            };
            self.call(op, self.inner.read_small(session, gens)).await
        };
        let entry = async {
            match entry {
                None => Ok(None),
                Some((key, limit)) => {
                    self.call_quietly(StoreOp::Lookup, self.inner.read_entry(key, limit))
                        .await
                }
            }
        };
        let (small, entry) = tokio::join!(small, entry);
        let small = small?;
        Ok(Read {
            entry,
            session: small.session,
            session_ttl: small.session_ttl,
            gens: small.gens,
        })
    }

    /// A call under the timeout and the open breaker that does not itself open the breaker
    /// (its failure is counted and logged).
    async fn call_quietly<T>(
        &self,
        op: StoreOp,
        fut: BoxFut<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if self.breaker.is_open() {
            self.metrics.store_error(op);
            return Err(StoreError::Unavailable);
        }
        let start = Instant::now();
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout),
        };
        self.metrics.store_duration(op, start.elapsed());
        if let Err(e) = &result {
            self.metrics.store_error(op);
            self.warn_rate_limited(op, e, false);
        }
        result
    }

    pub async fn put(
        &self,
        entries: Vec<(EntryKey, Bytes)>,
        ttl: Duration,
        gens: &[GenKey],
        gen_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.call(StoreOp::Put, self.inner.put(entries, ttl, gens, gen_ttl))
            .await
    }

    pub async fn init_gens(
        &self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        self.call(StoreOp::Init, self.inner.init_gens(items, ttl))
            .await
    }

    pub async fn set_gens(
        &self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.call(StoreOp::Init, self.inner.set_gens(items, ttl))
            .await
    }

    pub async fn bump_gens(
        &self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.call(StoreOp::Bump, self.inner.bump_gens(items, ttl))
            .await
    }

    pub async fn session_set(
        &self,
        key: &SessionKey,
        token: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.call(StoreOp::Session, self.inner.session_set(key, token, ttl))
            .await
    }

    pub async fn session_end(&self, key: &SessionKey, token: Bytes) -> Result<bool, StoreError> {
        self.call(StoreOp::Session, self.inner.session_end(key, token))
            .await
    }

    pub async fn session_delete(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.call(StoreOp::Session, self.inner.session_delete(key))
            .await
    }

    pub async fn session_ttl(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Option<Duration>>, StoreError> {
        self.call(StoreOp::Session, self.inner.session_ttl(key))
            .await
    }

    pub async fn lease_take(
        &self,
        key: &LeaseKey,
        token: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.call(StoreOp::Lock, self.inner.lease_take(key, token, ttl))
            .await
    }

    pub async fn lease_release(&self, key: &LeaseKey, token: Bytes) -> Result<bool, StoreError> {
        self.call(StoreOp::Lock, self.inner.lease_release(key, token))
            .await
    }

    /// Run one store call under the policy.
    async fn call<T>(
        &self,
        op: StoreOp,
        fut: BoxFut<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            self.metrics.store_error(op);
            return Err(StoreError::Unavailable);
        }
        let start = Instant::now();
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout),
        };
        self.metrics.store_duration(op, start.elapsed());
        match &result {
            Ok(_) => {
                self.healthy.store(true, Ordering::Release);
                if self.breaker.success() {
                    tracing::warn!(
                        store = self.inner.kind(),
                        "store recovered; cache back in use"
                    );
                }
            }
            Err(e @ StoreError::Refused(_)) => {
                // Reachable, but saying no: not a health problem, and not for the breaker.
                self.metrics.store_error(op);
                self.warn_rate_limited(op, e, false);
            }
            Err(e) => {
                self.metrics.store_error(op);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.to_string());
                }
                let opened = self.breaker.failure();
                if opened {
                    self.healthy.store(false, Ordering::Release);
                }
                self.warn_rate_limited(op, e, opened);
            }
        }
        result
    }

    fn warn_rate_limited(&self, op: StoreOp, e: &StoreError, opened: bool) {
        let now = crate::clock::now_ms();
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        if opened || now.saturating_sub(last) >= 5_000 {
            self.last_warn_ms.store(now, Ordering::Relaxed);
            tracing::warn!(
                store = self.inner.kind(),
                op = op.as_str(),
                kind = e.kind(),
                error = %e,
                circuit_open = self.breaker.is_open(),
                "store call failed; cache bypassed"
            );
        }
    }

    /// Probe the store once (health task): closes the breaker when it answers.
    pub async fn probe(&self) -> bool {
        let ok = match tokio::time::timeout(
            self.timeout.max(Duration::from_millis(250)),
            self.inner.ping(),
        )
        .await
        {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.to_string());
                }
                false
            }
            Err(_) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(StoreError::Timeout.to_string());
                }
                false
            }
        };
        self.healthy.store(ok, Ordering::Release);
        if ok {
            if self.breaker.success() {
                tracing::warn!(
                    store = self.inner.kind(),
                    "store recovered; cache back in use"
                );
            }
        } else {
            self.metrics.store_error(StoreOp::Ping);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_repeated_failures_and_lets_one_probe_through() {
        let b = Breaker::default();
        assert!(b.allow());
        assert!(!b.failure());
        assert!(!b.failure());
        assert!(b.failure());
        assert!(!b.allow(), "open right after the third failure");
        // Force the cool-down to have passed.
        b.open_until.store(1, Ordering::Release);
        assert!(b.allow(), "one probe after the cool-down");
        assert!(!b.allow(), "only one");
        assert!(b.success());
        assert!(b.allow());
        assert!(!b.is_open());
    }
}
