//! The store interface the engine sees, and the guard every call goes through.
//!
//! `Store` is a handful of key/value primitives (batched GET, SET PX, SET NX, DEL, PTTL) that
//! both the embedded memory store and Redis implement; meaning (entries, generations,
//! sessions, locks) is layered on top by callers. `Guarded` wraps a store with the failure
//! policy: a per-call timeout, a circuit breaker that stops paying that timeout while the
//! store is unhealthy, and metrics. Nothing here knows about HTTP.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

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

/// The largest value read under a small key (a session token, a generation); a longer one
/// reads as `SMALL_LIMIT + 1` bytes, which is never a valid token or generation.
pub const SMALL_LIMIT: usize = 16 << 10;

/// What one `read` found.
#[derive(Debug, Default)]
pub struct Read {
    /// The entry's bytes; more than its limit means it is too large to be an entry.
    pub entry: Option<Bytes>,
    /// The small keys' values, in order.
    pub small: Vec<Option<Bytes>>,
}

/// Batched key/value primitives. Each method is one round trip to the backend.
pub trait Store: Send + Sync + 'static {
    /// Read an entry (at most `limit + 1` of its bytes) and small keys (at most
    /// `SMALL_LIMIT + 1` bytes each) in one round trip; a value of a foreign type, or an
    /// empty one, reads as `None`.
    fn read<'a>(
        &'a self,
        entry: Option<(Vec<u8>, usize)>,
        small: Vec<Vec<u8>>,
    ) -> BoxFut<'a, Result<Read, StoreError>>;
    /// SET each key to its value PX ttl, and PEXPIRE each `touch` key to `touch_ttl`.
    fn put<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
        touch: Vec<Vec<u8>>,
        touch_ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>>;
    /// For each (key, proposal): SET NX PX ttl, then GET; returns what each key holds now.
    fn init_many<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<Vec<Option<Bytes>>, StoreError>>;
    /// SET each key to its value, with PX ttl when given.
    fn set_many<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Option<Duration>,
    ) -> BoxFut<'a, Result<(), StoreError>>;
    /// Give generation keys new values (SET PX); a store that refuses writes for lack of
    /// memory deletes them instead, which purges as surely.
    fn bump<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>>;
    /// SET NX PX: true when this call created the key.
    fn set_nx<'a>(
        &'a self,
        key: Vec<u8>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFut<'a, Result<bool, StoreError>>;
    /// DEL: true when a key was removed.
    fn del<'a>(&'a self, key: Vec<u8>) -> BoxFut<'a, Result<bool, StoreError>>;
    /// DEL only when the key still holds `value` (lock release).
    fn del_if_equals<'a>(
        &'a self,
        key: Vec<u8>,
        value: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>>;
    /// PTTL: `None` when the key is missing, `Some(None)` when it never expires.
    fn pttl<'a>(&'a self, key: Vec<u8>)
    -> BoxFut<'a, Result<Option<Option<Duration>>, StoreError>>;
    /// A cheap liveness probe.
    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>>;
    /// "memory" or "redis", for logs and readiness.
    fn kind(&self) -> &'static str;
    /// True for a store in this process (its calls complete without waiting on anything).
    fn is_local(&self) -> bool {
        false
    }
    /// Bytes and entries held, for a store that holds them in this process.
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

/// Store operation labels for metrics.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Lookup,
    Put,
    Init,
    Bump,
    Session,
    Lock,
    Ping,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Lookup,
        Op::Put,
        Op::Init,
        Op::Bump,
        Op::Session,
        Op::Lock,
        Op::Ping,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Put => "put",
            Op::Init => "init",
            Op::Bump => "bump",
            Op::Session => "session",
            Op::Lock => "lock",
            Op::Ping => "ping",
        }
    }
}

/// A store behind the failure policy: timeout, breaker, metrics.
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

    pub fn store(&self) -> &dyn Store {
        &*self.inner
    }

    pub fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

    /// Run one store call under the policy.
    pub async fn call<T>(
        &self,
        op: Op,
        fut: BoxFut<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            self.metrics.store_error(op, "circuit_open");
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
                self.metrics.store_error(op, "refused");
                self.warn_rate_limited(op, e, false);
            }
            Err(e) => {
                self.metrics.store_error(
                    op,
                    if matches!(e, StoreError::Timeout) {
                        "timeout"
                    } else {
                        "error"
                    },
                );
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

    fn warn_rate_limited(&self, op: Op, e: &StoreError, opened: bool) {
        let now = crate::cache::policy::now_ms();
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        if opened || now.saturating_sub(last) >= 5_000 {
            self.last_warn_ms.store(now, Ordering::Relaxed);
            tracing::warn!(
                store = self.inner.kind(),
                op = op.as_str(),
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
            self.metrics.store_error(Op::Ping, "error");
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
