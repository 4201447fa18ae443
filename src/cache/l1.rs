//! The in-process tier: decoded entries (`Arc<Entry>`), bounded in bytes.
//!
//! An entry here is only a copy: whether it may be served is decided by the generations it
//! recorded, compared with the current ones (`Cache::lookup`), exactly as for an entry read
//! from the store. Over Redis, the current generations come from the coherence table
//! (`mirror`), so a warm hit costs no Redis command; with the embedded store this tier
//! holds the entries themselves (one cache, no second copy).
//!
//! Each entry lives until the end of its last window (fresh, stale-while-revalidate,
//! stale-if-error), like its copy in the store, or until the byte bound evicts it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::notification::RemovalCause;
use moka::sync::Cache;

use super::entry::Entry;
use super::key::Id;

#[derive(Clone)]
struct Slot {
    entry: Arc<Entry>,
    expires_at: Instant,
}

struct ByDeadline;

impl Expiry<Id, Slot> for ByDeadline {
    fn expire_after_create(&self, _k: &Id, v: &Slot, now: Instant) -> Option<Duration> {
        Some(v.expires_at.saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _k: &Id,
        v: &Slot,
        now: Instant,
        _d: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.expires_at.saturating_duration_since(now))
    }
}

/// Memory an entry costs beyond its body and header bytes: the `Entry` and `HeaderMap`
/// structures, moka's node, timer and sketch entries, allocation headers.
const ITEM_OVERHEAD: usize = 512;

/// What an entry weighs against the bound: its bytes, plus a quarter for what the
/// allocator loses to size classes and fragmentation under churn, plus the fixed overhead.
fn weigh(_k: &Id, v: &Slot) -> u32 {
    let e = &v.entry;
    let headers: usize = e
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 48)
        .sum();
    let bytes = e.body.len() + headers + e.gens.len() * 24 + e.vary.len() * 32;
    (bytes + bytes / 4 + ITEM_OVERHEAD).min(u32::MAX as usize) as u32
}

/// The tier. Cheap to share: the map is internally synchronized.
pub struct L1 {
    map: Cache<Id, Slot>,
    evictions: Arc<AtomicU64>,
}

impl L1 {
    /// A tier of at most `max_bytes` (weighed as above).
    pub fn new(max_bytes: u64) -> L1 {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let map = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(weigh)
            .expire_after(ByDeadline)
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        L1 { map, evictions }
    }

    /// The entry under `id`, while its last window lasts.
    pub fn get(&self, id: &Id) -> Option<Arc<Entry>> {
        let slot = self.map.get(id)?;
        (slot.expires_at > Instant::now()).then_some(slot.entry)
    }

    /// Hold `entry` for `ttl` (what the store keeps it for), or, when that is not known,
    /// until the end of its last window (nothing when that has passed).
    pub fn insert(&self, entry: Arc<Entry>, ttl: Option<Duration>) {
        let left = ttl.unwrap_or_else(|| {
            let last_ms = entry
                .fresh_until_ms
                .max(entry.swr_until_ms)
                .max(entry.sie_until_ms);
            Duration::from_millis(last_ms.saturating_sub(crate::clock::now_ms()))
        });
        if left.is_zero() {
            self.map.invalidate(&entry.key);
            return;
        }
        let slot = Slot {
            expires_at: Instant::now() + left,
            entry,
        };
        self.map.insert(slot.entry.key, slot);
    }

    pub fn remove(&self, id: &Id) {
        self.map.invalidate(id);
    }

    /// Bytes held (as weighed) and entries, after pending maintenance.
    pub fn stats(&self) -> (u64, u64) {
        self.map.run_pending_tasks();
        (self.map.weighted_size(), self.map.entry_count())
    }

    /// Entries evicted to stay within the bound, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(n: u8, body: usize, fresh_for_ms: u64) -> Arc<Entry> {
        let now = crate::clock::now_ms();
        Arc::new(Entry {
            key: Id([n; 16]),
            status: StatusCode::OK,
            flags: 0,
            stored_at_ms: now,
            age_at_store_s: 0,
            fresh_until_ms: now + fresh_for_ms,
            swr_until_ms: 0,
            sie_until_ms: 0,
            gens: vec![],
            vary: vec![],
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
        })
    }

    #[test]
    fn holds_entries_within_their_windows_and_its_bound() {
        let l1 = L1::new(1 << 20);
        l1.insert(entry(1, 100, 60_000), None);
        assert!(l1.get(&Id([1; 16])).is_some());
        l1.insert(entry(2, 100, 0), None);
        assert!(l1.get(&Id([2; 16])).is_none(), "already past its window");
        for n in 3..200 {
            l1.insert(entry(n, 16 << 10, 60_000), None);
        }
        let (bytes, _) = l1.stats();
        assert!(bytes <= 1 << 20, "{bytes}");
        assert!(l1.evictions() > 0);
    }
}
