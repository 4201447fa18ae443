//! The coherence table: this process's copy of the small keys a hit depends on (tag
//! generations and session tokens), kept equal to Redis by client-side caching.
//!
//! Redis tells a tracking connection (RESP3 `CLIENT TRACKING ON BCAST PREFIX ...`) about
//! every change to a key under the tracked prefixes, whoever made it: a purge, a login, an
//! expiry, an eviction, `FLUSHALL`. The table drops a key when told, so a value in the table
//! is the value in Redis, give or take the time an invalidation takes to arrive.
//!
//! Reads of the small keys run on other connections, so a value read there may arrive after
//! the invalidation that made it old. Every invalidation (and every loss of coherence) bumps
//! `version`; a reader notes the version before it sends its read and records what it read
//! only if the version has not moved since (checked under the shard's lock, which the
//! invalidation takes after bumping). A recorded value therefore was current after the last
//! invalidation the table processed.
//!
//! While the tracking connection is down, invalidations are lost: the table is emptied and
//! not used (`usable`), unless the operator accepted a window of staleness
//! (`[cache] l1_serve_disconnected`), after which the same happens.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

const SHARDS: usize = 64;

/// A value read under a small key (`None` is never recorded: an absent key is asked again),
/// and until when it may be vouched for (ms since the Unix epoch; `u64::MAX`: while no
/// announcement says otherwise).
type Values = HashMap<Box<[u8]>, (Bytes, u64)>;

struct Shard {
    map: Values,
    /// Bytes held, as weighed by `weigh`.
    bytes: usize,
}

/// What a recorded key costs: its bytes and its value's, plus the map slot and allocations.
fn weigh(key: &[u8], value: &Bytes) -> usize {
    key.len() + value.len() + 96
}

/// What a reader noted before its read: record only if nothing was invalidated since.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

pub struct Mirror {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Bumped by every invalidation, flush and loss of coherence.
    version: AtomicU64,
    /// The tracking connection is subscribed and acknowledged.
    connected: AtomicBool,
    /// When coherence was lost (ms since the Unix epoch); 0 while connected.
    lost_at_ms: AtomicU64,
    serve_disconnected_ms: AtomicU64,
    /// Bytes a shard may hold before it is emptied (a bound on memory, not a cache policy).
    per_shard: usize,
    invalidations: AtomicU64,
    losses: AtomicU64,
    acks: AtomicU64,
}

/// Lock a shard; a poisoned lock only means another thread panicked mid-update of a map
/// that stays consistent, so its data is still usable.
fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mirror {
    /// `max_bytes`: how much the table holds at most (keys and values weighed with their
    /// overhead); `serve_disconnected`: how long recorded values may still be used after
    /// coherence is lost.
    pub fn new(max_bytes: usize, serve_disconnected: Duration) -> Mirror {
        Mirror {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        bytes: 0,
                    })
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            version: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            lost_at_ms: AtomicU64::new(0),
            serve_disconnected_ms: AtomicU64::new(serve_disconnected.as_millis() as u64),
            per_shard: max_bytes / SHARDS,
            invalidations: AtomicU64::new(0),
            losses: AtomicU64::new(0),
            acks: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Follow a reload of `[cache] l1_serve_disconnected`.
    pub fn set_serve_disconnected(&self, d: Duration) {
        self.serve_disconnected_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// May recorded values be used now?
    pub fn usable(&self) -> bool {
        if self.connected.load(Ordering::Acquire) {
            return true;
        }
        let lost = self.lost_at_ms.load(Ordering::Acquire);
        if lost == 0 {
            return false;
        }
        let window = self.serve_disconnected_ms.load(Ordering::Relaxed);
        window > 0 && crate::clock::now_ms() < lost.saturating_add(window)
    }

    /// The tracking connection is up and acknowledged.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Note the version before a read of small keys.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.version.load(Ordering::Acquire))
    }

    /// The recorded value of every key, or `None` if one is not recorded (or the table may
    /// not be used now).
    pub fn get_all<'a>(&self, keys: impl Iterator<Item = &'a [u8]>, out: &mut Vec<Bytes>) -> bool {
        if !self.usable() {
            return false;
        }
        let now = crate::clock::now_ms();
        for key in keys {
            match lock(self.shard(key)).map.get(key) {
                Some((v, until)) if now < *until => out.push(v.clone()),
                _ => return false,
            }
        }
        true
    }

    /// Record values read under a ticket, each vouched for until its deadline (ms since
    /// the Unix epoch): only while connected, and only if nothing was invalidated since the
    /// ticket was taken.
    pub fn record<'a>(
        &self,
        ticket: Ticket,
        items: impl Iterator<Item = (&'a [u8], &'a Bytes, u64)>,
    ) {
        if !self.connected.load(Ordering::Acquire) {
            return;
        }
        for (key, value, until) in items {
            let weight = weigh(key, value);
            if weight > self.per_shard {
                continue;
            }
            let mut shard = lock(self.shard(key));
            if self.version.load(Ordering::Acquire) != ticket.0 {
                return;
            }
            if shard.bytes + weight > self.per_shard {
                shard.map.clear();
                shard.bytes = 0;
            }
            if let Some((old, _)) = shard.map.insert(key.into(), (value.clone(), until)) {
                shard.bytes -= weigh(key, &old);
            }
            shard.bytes += weight;
        }
    }

    /// A key changed in Redis.
    pub fn invalidate(&self, key: &[u8]) {
        self.version.fetch_add(1, Ordering::AcqRel);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        let mut shard = lock(self.shard(key));
        if let Some((old, _)) = shard.map.remove(key) {
            shard.bytes -= weigh(key, &old);
        }
    }

    /// Every key may have changed (`FLUSHALL`, a null invalidation).
    pub fn flush(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        self.clear();
    }

    fn clear(&self) {
        for s in self.shards.iter() {
            let mut shard = lock(s);
            shard.map.clear();
            shard.bytes = 0;
        }
    }

    /// The tracking connection is gone: invalidations may be lost from now on.
    pub fn lost(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        if self.connected.swap(false, Ordering::AcqRel) {
            self.losses.fetch_add(1, Ordering::Relaxed);
            self.lost_at_ms
                .store(crate::clock::now_ms().max(1), Ordering::Release);
        }
        if self.serve_disconnected_ms.load(Ordering::Relaxed) == 0 {
            self.clear();
        }
    }

    /// Tracking is acknowledged again: what was recorded before may have missed changes,
    /// so the table starts empty.
    pub fn restored(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        self.clear();
        self.lost_at_ms.store(0, Ordering::Release);
        self.connected.store(true, Ordering::Release);
        self.acks.fetch_add(1, Ordering::Relaxed);
    }

    /// Times tracking was acknowledged (and the table started empty), since start.
    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    /// Times an acknowledged tracking connection was lost, since start.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// Keys invalidated (and flushes), since start.
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_recorded() {
        let m = Mirror::new(1 << 20, Duration::ZERO);
        m.restored();
        let t = m.ticket();
        // The write lands (and is announced) while the read is on its way.
        m.invalidate(b"g:1");
        m.record(t, [(&b"g:1"[..], &b("old"), u64::MAX)].into_iter());
        let mut out = Vec::new();
        assert!(!m.get_all([&b"g:1"[..]].into_iter(), &mut out));
        let t = m.ticket();
        m.record(t, [(&b"g:1"[..], &b("new"), u64::MAX)].into_iter());
        assert!(m.get_all([&b"g:1"[..]].into_iter(), &mut out));
        assert_eq!(out, vec![b("new")]);
    }

    #[test]
    fn a_value_past_its_deadline_is_not_vouched_for() {
        let m = Mirror::new(1 << 20, Duration::ZERO);
        m.restored();
        let t = m.ticket();
        let past = crate::clock::now_ms().saturating_sub(1);
        m.record(t, [(&b"user_token:1"[..], &b("tok"), past)].into_iter());
        let mut out = Vec::new();
        assert!(!m.get_all([&b"user_token:1"[..]].into_iter(), &mut out));
    }

    #[test]
    fn nothing_is_used_while_tracking_is_down_unless_allowed() {
        let m = Mirror::new(1 << 20, Duration::ZERO);
        let t = m.ticket();
        m.record(t, [(&b"g:1"[..], &b("v"), u64::MAX)].into_iter());
        let mut out = Vec::new();
        assert!(
            !m.get_all([&b"g:1"[..]].into_iter(), &mut out),
            "never connected"
        );
        m.restored();
        let t = m.ticket();
        m.record(t, [(&b"g:1"[..], &b("v"), u64::MAX)].into_iter());
        assert!(m.get_all([&b"g:1"[..]].into_iter(), &mut out));
        m.lost();
        assert!(!m.get_all([&b"g:1"[..]].into_iter(), &mut out));
        m.restored();
        assert!(
            !m.get_all([&b"g:1"[..]].into_iter(), &mut out),
            "emptied on re-acknowledge"
        );

        let m = Mirror::new(1 << 20, Duration::from_secs(60));
        m.restored();
        let t = m.ticket();
        m.record(t, [(&b"g:1"[..], &b("v"), u64::MAX)].into_iter());
        m.lost();
        assert!(
            m.get_all([&b"g:1"[..]].into_iter(), &mut out),
            "within the accepted window"
        );
        m.flush();
        assert!(!m.get_all([&b"g:1"[..]].into_iter(), &mut out));
    }
}
