//! The embedded store: everything in-process, for one instance (quick start, tests, small sites).
//!
//! Entries live in a moka cache with a per-key expiry; small bookkeeping keys live in two
//! more (generations; sessions and locks), so a burst of large entries cannot evict a
//! session or a generation. The three share `max_bytes` (entries get most of it), and every
//! item is weighed with its bookkeeping overhead, so the process holds about `max_bytes`
//! for them, not a multiple. It must not be used by several instances: nothing is shared
//! between processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::sync::Cache;

use super::store::{BoxFut, Read, SMALL_LIMIT, Store, StoreError};

#[derive(Clone)]
struct Value {
    bytes: Bytes,
    /// `None`: never expires.
    expires_at: Option<Instant>,
}

struct ByDeadline;

impl Expiry<Arc<[u8]>, Value> for ByDeadline {
    fn expire_after_create(&self, _k: &Arc<[u8]>, v: &Value, now: Instant) -> Option<Duration> {
        v.expires_at.map(|t| t.saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _k: &Arc<[u8]>,
        v: &Value,
        now: Instant,
        _d: Option<Duration>,
    ) -> Option<Duration> {
        v.expires_at.map(|t| t.saturating_duration_since(now))
    }
}

/// The in-process store.
pub struct MemoryStore {
    entries: Cache<Arc<[u8]>, Value>,
    /// Tag generations: bounded by bytes, apart from sessions so fills cannot evict those
    /// (a lost generation only turns hits into misses).
    generations: Cache<Arc<[u8]>, Value>,
    /// Sessions and locks.
    small: Cache<Arc<[u8]>, Value>,
    /// Key prefixes of entries (`{prefix}e:`) and generations (`{prefix}g:`).
    entry_prefix: Vec<u8>,
    generation_prefix: Vec<u8>,
    /// Serializes read-modify-write operations (SET NX, DEL IF EQUALS).
    lock: std::sync::Mutex<()>,
}

/// Memory an item costs beyond its key and value bytes: moka's node, timer and sketch
/// entries and the key's and value's allocation headers.
const ITEM_OVERHEAD: usize = 320;

/// What an item weighs against `max_bytes`: its bytes, plus a quarter for what the
/// allocator loses to size classes and fragmentation under churn (measured at about that
/// with glibc and jemalloc alike for entries of 1 to 32 KiB), plus the fixed overhead.
fn weigh(k: &Arc<[u8]>, v: &Value) -> u32 {
    let bytes = k.len() + v.bytes.len();
    (bytes + bytes / 4 + ITEM_OVERHEAD).min(u32::MAX as usize) as u32
}

impl MemoryStore {
    pub fn new(max_bytes: u64, prefix: &str) -> MemoryStore {
        // Generations and sessions get a sixteenth each (at least 1 MiB), entries the rest.
        let small_budget = (max_bytes / 16).max(1 << 20);
        let entry_budget = max_bytes.saturating_sub(2 * small_budget).max(1 << 20);
        let cache = |budget: u64| {
            Cache::builder()
                .max_capacity(budget)
                .weigher(weigh)
                .expire_after(ByDeadline)
                .build()
        };
        let entries = cache(entry_budget);
        let generations = cache(small_budget);
        let small = cache(small_budget);
        let kind = |k: &[u8]| {
            let mut p = prefix.as_bytes().to_vec();
            p.extend_from_slice(k);
            p
        };
        MemoryStore {
            entries,
            generations,
            small,
            entry_prefix: kind(b"e:"),
            generation_prefix: kind(b"g:"),
            lock: std::sync::Mutex::new(()),
        }
    }

    fn map(&self, key: &[u8]) -> &Cache<Arc<[u8]>, Value> {
        if key.starts_with(&self.entry_prefix) {
            &self.entries
        } else if key.starts_with(&self.generation_prefix) {
            &self.generations
        } else {
            &self.small
        }
    }

    fn get(&self, key: &[u8]) -> Option<Bytes> {
        let v = self.map(key).get(key)?;
        match v.expires_at {
            Some(t) if t <= Instant::now() => None,
            _ => Some(v.bytes),
        }
    }

    fn set(&self, key: &[u8], bytes: Bytes, ttl: Option<Duration>) {
        let value = Value {
            bytes,
            expires_at: ttl.map(|d| Instant::now() + d),
        };
        self.map(key).insert(Arc::from(key), value);
    }

    fn expire(&self, key: &[u8], ttl: Duration) {
        if let Some(bytes) = self.get(key) {
            self.set(key, bytes, Some(ttl));
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFut<'static, T> {
    Box::pin(std::future::ready(v))
}

impl Store for MemoryStore {
    fn read<'a>(
        &'a self,
        entry: Option<(Vec<u8>, usize)>,
        small: Vec<Vec<u8>>,
    ) -> BoxFut<'a, Result<Read, StoreError>> {
        let bounded = |v: Option<Bytes>, limit: usize| {
            v.filter(|b| !b.is_empty()).map(|b| {
                if b.len() > limit {
                    b.slice(..limit + 1)
                } else {
                    b
                }
            })
        };
        ready(Ok(Read {
            entry: entry.and_then(|(k, limit)| bounded(self.get(&k), limit)),
            small: small
                .iter()
                .map(|k| bounded(self.get(k), SMALL_LIMIT))
                .collect(),
        }))
    }

    fn bump<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        self.set_many(items, Some(ttl))
    }

    fn is_local(&self) -> bool {
        true
    }

    fn stats(&self) -> Option<(u64, u64)> {
        let caches = [&self.entries, &self.generations, &self.small];
        for c in caches {
            c.run_pending_tasks();
        }
        Some((
            caches.iter().map(|c| c.weighted_size()).sum(),
            caches.iter().map(|c| c.entry_count()).sum(),
        ))
    }

    fn put<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
        touch: Vec<Vec<u8>>,
        touch_ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        for (key, value) in items {
            self.set(&key, value, Some(ttl));
        }
        let _g = self.guard();
        for k in &touch {
            self.expire(k, touch_ttl);
        }
        ready(Ok(()))
    }

    fn init_many<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<Vec<Option<Bytes>>, StoreError>> {
        let _g = self.guard();
        let out = items
            .into_iter()
            .map(|(k, proposal)| match self.get(&k) {
                Some(existing) => Some(existing),
                None => {
                    self.set(&k, proposal.clone(), Some(ttl));
                    Some(proposal)
                }
            })
            .collect();
        ready(Ok(out))
    }

    fn set_many<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Option<Duration>,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let _g = self.guard();
        for (k, v) in items {
            self.set(&k, v, ttl);
        }
        ready(Ok(()))
    }

    fn set_nx<'a>(
        &'a self,
        key: Vec<u8>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        let _g = self.guard();
        let created = if self.get(&key).is_some() {
            false
        } else {
            self.set(&key, value, Some(ttl));
            true
        };
        ready(Ok(created))
    }

    fn del<'a>(&'a self, key: Vec<u8>) -> BoxFut<'a, Result<bool, StoreError>> {
        let _g = self.guard();
        let existed = self.get(&key).is_some();
        self.map(&key).invalidate(key.as_slice());
        ready(Ok(existed))
    }

    fn del_if_equals<'a>(
        &'a self,
        key: Vec<u8>,
        value: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        let _g = self.guard();
        let matches = self.get(&key).is_some_and(|v| v == value);
        if matches {
            self.map(&key).invalidate(key.as_slice());
        }
        ready(Ok(matches))
    }

    fn pttl<'a>(
        &'a self,
        key: Vec<u8>,
    ) -> BoxFut<'a, Result<Option<Option<Duration>>, StoreError>> {
        let now = Instant::now();
        let r = self
            .map(&key)
            .get(key.as_slice())
            .and_then(|v| match v.expires_at {
                None => Some(None),
                Some(t) if t > now => Some(Some(t - now)),
                Some(_) => None,
            });
        ready(Ok(r))
    }

    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>> {
        ready(Ok(()))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn primitives_behave_like_redis() {
        let s = MemoryStore::new(1 << 20, "p:");
        let k = b"p:g:1".to_vec();
        assert_eq!(
            s.read(None, vec![k.clone()]).await.unwrap().small,
            vec![None]
        );
        let got = s
            .init_many(
                vec![(k.clone(), Bytes::from_static(b"7"))],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(got, vec![Some(Bytes::from_static(b"7"))]);
        let got = s
            .init_many(
                vec![(k.clone(), Bytes::from_static(b"8"))],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![Some(Bytes::from_static(b"7"))],
            "SET NX keeps the first value"
        );
        assert!(
            !s.set_nx(k.clone(), Bytes::from_static(b"9"), Duration::from_secs(1))
                .await
                .unwrap()
        );
        assert!(
            !s.del_if_equals(k.clone(), Bytes::from_static(b"9"))
                .await
                .unwrap()
        );
        assert!(
            s.del_if_equals(k.clone(), Bytes::from_static(b"7"))
                .await
                .unwrap()
        );
        assert_eq!(s.pttl(k.clone()).await.unwrap(), None);
        s.set_many(vec![(k.clone(), Bytes::from_static(b"1"))], None)
            .await
            .unwrap();
        assert_eq!(s.pttl(k.clone()).await.unwrap(), Some(None));
        assert!(s.del(k.clone()).await.unwrap());
        assert!(!s.del(k).await.unwrap());
    }

    #[tokio::test]
    async fn entries_expire() {
        let s = MemoryStore::new(1 << 20, "p:");
        let k = b"p:e:1".to_vec();
        s.put(
            vec![(k.clone(), Bytes::from_static(b"x"))],
            Duration::ZERO,
            vec![],
            Duration::ZERO,
        )
        .await
        .unwrap();
        assert_eq!(s.read(Some((k, 100)), vec![]).await.unwrap().entry, None);
    }
}
