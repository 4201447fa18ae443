//! The embedded store: everything in-process, for one instance (quick start, tests, small sites).
//!
//! Entries live in a moka cache with a per-key expiry; generations, and sessions with
//! leases, live in two more, so a burst of large entries cannot evict a session or a
//! generation. The three share `max_bytes` (entries get most of it), and every item is
//! weighed with its bookkeeping overhead, so the process holds about `max_bytes` for them,
//! not a multiple. It must not be used by several instances: nothing is shared between
//! processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::sync::Cache;

use super::{BoxFut, SMALL_LIMIT, Small, Store, StoreError};
use crate::cache::key::{EntryKey, GenKey, LeaseKey, SessionKey};

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

/// One map of the store: keys to values with their deadlines.
struct Map(Cache<Arc<[u8]>, Value>);

impl Map {
    fn new(budget: u64) -> Map {
        Map(Cache::builder()
            .max_capacity(budget)
            .weigher(weigh)
            .expire_after(ByDeadline)
            .build())
    }

    fn get(&self, key: &[u8]) -> Option<Bytes> {
        let v = self.0.get(key)?;
        match v.expires_at {
            Some(t) if t <= Instant::now() => None,
            _ => Some(v.bytes),
        }
    }

    /// Like a bounded Redis read: empty is absent, and at most `limit + 1` bytes.
    fn read(&self, key: &[u8], limit: usize) -> Option<Bytes> {
        self.get(key).filter(|b| !b.is_empty()).map(|b| {
            if b.len() > limit {
                b.slice(..limit + 1)
            } else {
                b
            }
        })
    }

    fn set(&self, key: &[u8], bytes: Bytes, ttl: Option<Duration>) {
        let value = Value {
            bytes,
            expires_at: ttl.map(|d| Instant::now() + d),
        };
        self.0.insert(Arc::from(key), value);
    }

    fn expire(&self, key: &[u8], ttl: Duration) {
        if let Some(bytes) = self.get(key) {
            self.set(key, bytes, Some(ttl));
        }
    }

    fn delete(&self, key: &[u8]) -> bool {
        let existed = self.get(key).is_some();
        self.0.invalidate(key);
        existed
    }

    fn ttl(&self, key: &[u8]) -> Option<Option<Duration>> {
        let now = Instant::now();
        self.0.get(key).and_then(|v| match v.expires_at {
            None => Some(None),
            Some(t) if t > now => Some(Some(t - now)),
            Some(_) => None,
        })
    }
}

/// The in-process store.
pub struct MemoryStore {
    entries: Map,
    /// Tag generations, apart from sessions so fills cannot evict those (a lost generation
    /// only turns hits into misses).
    generations: Map,
    /// Sessions and leases.
    small: Map,
    /// Serializes read-modify-write operations (SET NX, delete-if-equals).
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
    /// Of `max_bytes`, what the entries get (the rest is for generations and sessions).
    pub fn entry_budget(max_bytes: u64) -> u64 {
        let small_budget = (max_bytes / 16).max(1 << 20);
        max_bytes.saturating_sub(2 * small_budget).max(1 << 20)
    }

    pub fn new(max_bytes: u64) -> MemoryStore {
        // Generations and sessions get a sixteenth each (at least 1 MiB), entries the rest.
        let small_budget = (max_bytes / 16).max(1 << 20);
        let entry_budget = max_bytes.saturating_sub(2 * small_budget).max(1 << 20);
        MemoryStore {
            entries: Map::new(entry_budget),
            generations: Map::new(small_budget),
            small: Map::new(small_budget),
            lock: std::sync::Mutex::new(()),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Delete `key` from `map` only while it holds `value`.
    fn delete_if_equals(&self, map: &Map, key: &[u8], value: &[u8]) -> bool {
        let _g = self.guard();
        let matches = map.get(key).is_some_and(|v| v == value);
        if matches {
            map.delete(key);
        }
        matches
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFut<'static, T> {
    Box::pin(std::future::ready(v))
}

impl Store for MemoryStore {
    fn read_entry<'a>(
        &'a self,
        key: &'a EntryKey,
        limit: usize,
    ) -> BoxFut<'a, Result<Option<Bytes>, StoreError>> {
        ready(Ok(self.entries.read(&key.0, limit)))
    }

    fn read_small<'a>(
        &'a self,
        session: Option<&'a SessionKey>,
        gens: &'a [GenKey],
    ) -> BoxFut<'a, Result<Small, StoreError>> {
        ready(Ok(Small {
            session: session.and_then(|k| self.small.read(k.0.as_bytes(), SMALL_LIMIT)),
            session_ttl: None,
            gens: gens
                .iter()
                .map(|k| self.generations.read(&k.0, SMALL_LIMIT))
                .collect(),
        }))
    }

    fn put<'a>(
        &'a self,
        entries: Vec<(EntryKey, Bytes)>,
        ttl: Duration,
        gens: &'a [GenKey],
        gen_ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        for (key, value) in entries {
            self.entries.set(&key.0, value, Some(ttl));
        }
        let _g = self.guard();
        for k in gens {
            self.generations.expire(&k.0, gen_ttl);
        }
        ready(Ok(()))
    }

    fn init_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<Vec<Option<Bytes>>, StoreError>> {
        let _g = self.guard();
        let out = items
            .into_iter()
            .map(
                |(k, proposal)| match self.generations.read(&k.0, SMALL_LIMIT) {
                    Some(existing) => Some(existing),
                    None => {
                        self.generations.set(&k.0, proposal.clone(), Some(ttl));
                        Some(proposal)
                    }
                },
            )
            .collect();
        ready(Ok(out))
    }

    fn set_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let _g = self.guard();
        for (k, v) in items {
            self.generations.set(&k.0, v, Some(ttl));
        }
        ready(Ok(()))
    }

    fn bump_gens<'a>(
        &'a self,
        items: Vec<(GenKey, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        self.set_gens(items, ttl)
    }

    fn session_set<'a>(
        &'a self,
        key: &'a SessionKey,
        token: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let _g = self.guard();
        self.small.set(key.0.as_bytes(), token, ttl);
        ready(Ok(()))
    }

    fn session_end<'a>(
        &'a self,
        key: &'a SessionKey,
        token: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        ready(Ok(self.delete_if_equals(
            &self.small,
            key.0.as_bytes(),
            &token,
        )))
    }

    fn session_delete<'a>(&'a self, key: &'a SessionKey) -> BoxFut<'a, Result<bool, StoreError>> {
        let _g = self.guard();
        ready(Ok(self.small.delete(key.0.as_bytes())))
    }

    fn session_ttl<'a>(
        &'a self,
        key: &'a SessionKey,
    ) -> BoxFut<'a, Result<Option<Option<Duration>>, StoreError>> {
        ready(Ok(self.small.ttl(key.0.as_bytes())))
    }

    fn lease_take<'a>(
        &'a self,
        key: &'a LeaseKey,
        token: Bytes,
        ttl: Duration,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        let _g = self.guard();
        let created = if self.small.get(&key.0).is_some() {
            false
        } else {
            self.small.set(&key.0, token, Some(ttl));
            true
        };
        ready(Ok(created))
    }

    fn lease_release<'a>(
        &'a self,
        key: &'a LeaseKey,
        token: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        ready(Ok(self.delete_if_equals(&self.small, &key.0, &token)))
    }

    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>> {
        ready(Ok(()))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_local(&self) -> bool {
        true
    }

    fn stats(&self) -> Option<(u64, u64)> {
        let maps = [&self.entries, &self.generations, &self.small];
        for m in maps {
            m.0.run_pending_tasks();
        }
        Some((
            maps.iter().map(|m| m.0.weighted_size()).sum(),
            maps.iter().map(|m| m.0.entry_count()).sum(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn operations_behave_like_redis() {
        let s = MemoryStore::new(1 << 20);
        let g = GenKey(b"p:g:1".to_vec());
        let small = s.read_small(None, std::slice::from_ref(&g)).await.unwrap();
        assert_eq!(small.gens, vec![None]);
        let got = s
            .init_gens(
                vec![(g.clone(), Bytes::from_static(b"7"))],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(got, vec![Some(Bytes::from_static(b"7"))]);
        let got = s
            .init_gens(
                vec![(g.clone(), Bytes::from_static(b"8"))],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(
            got,
            vec![Some(Bytes::from_static(b"7"))],
            "SET NX keeps the first value"
        );
        let lease = LeaseKey(b"p:l:1".to_vec());
        assert!(
            s.lease_take(&lease, Bytes::from_static(b"a"), Duration::from_secs(1))
                .await
                .unwrap()
        );
        assert!(
            !s.lease_take(&lease, Bytes::from_static(b"b"), Duration::from_secs(1))
                .await
                .unwrap()
        );
        assert!(
            !s.lease_release(&lease, Bytes::from_static(b"b"))
                .await
                .unwrap()
        );
        assert!(
            s.lease_release(&lease, Bytes::from_static(b"a"))
                .await
                .unwrap()
        );
        let sess = SessionKey("user_token:1".into());
        assert_eq!(s.session_ttl(&sess).await.unwrap(), None);
        s.session_set(&sess, Bytes::from_static(b"t"), None)
            .await
            .unwrap();
        assert_eq!(s.session_ttl(&sess).await.unwrap(), Some(None));
        assert!(
            !s.session_end(&sess, Bytes::from_static(b"other"))
                .await
                .unwrap()
        );
        assert!(s.session_delete(&sess).await.unwrap());
        assert!(!s.session_delete(&sess).await.unwrap());
    }

    #[tokio::test]
    async fn entries_expire() {
        let s = MemoryStore::new(1 << 20);
        let k = EntryKey(b"p:e:1".to_vec());
        s.put(
            vec![(k.clone(), Bytes::from_static(b"x"))],
            Duration::ZERO,
            &[],
            Duration::ZERO,
        )
        .await
        .unwrap();
        assert_eq!(s.read_entry(&k, 100).await.unwrap(), None);
    }
}
