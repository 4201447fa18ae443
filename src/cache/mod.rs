//! The cache: keys, the entry envelope, cacheability policy, revalidation, the store,
//! fill-once coordination, and the tag-generation bookkeeping that makes purges O(tags).
//!
//! `Cache` gives the proxy meaning-level operations (look up an entry together with its tag
//! generations, record generations for a fill, store an entry, bump tags) on top of the
//! guarded store. It never sees an HTTP message.
//!
//! Generations: each tag has a key `{prefix}g:{hash(tag)}` holding a random 64-bit value. A
//! fill records the values it read before asking the upstream (initializing absent keys
//! with SET NX); a purge overwrites the values. An entry is usable only while every
//! recorded value is still current, so a purge kills every variant at once, and a fill that
//! raced a write is dead on arrival. Generation keys expire after the longest entry lifetime
//! (refreshed by each fill); a lost or evicted key reads as absent, which never equals a
//! recorded value, so losing one can only cause misses, never stale hits.

pub mod coalesce;
pub mod entry;
pub mod key;
pub mod policy;
pub mod revalidate;
pub mod store;

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use entry::Entry;
use key::{Id, Keys, SessionKey};
use store::{Guarded, StoreError};

/// A random 64-bit value (generations, lock tokens). Not secret, only unique.
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u64(crate::clock::now_ms());
    match h.finish() {
        0 => 1,
        v => v,
    }
}

/// What a lookup found under an entry key.
// Unboxed on purpose: it lives briefly on the stack, and a box would cost every hit an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Found {
    /// Nothing stored.
    Absent,
    /// A decodable entry whose generations are all current.
    Entry(Entry),
    /// An entry filled before one of its tags was purged.
    Dead,
    /// Bytes that are not a valid entry for this key (treated as a miss, then overwritten).
    Corrupt,
    /// The entry could not be read (its generations and session could).
    Unavailable,
}

/// The result of one lookup round trip.
pub struct Lookup {
    pub found: Found,
    /// Current generation of each requested tag (`None`: absent or unreadable).
    pub gens: Vec<Option<u64>>,
    /// The session value, when a session key was asked for.
    pub session: Option<Bytes>,
}

/// Room for an entry's envelope (timeline, generations, headers) beyond its body.
pub const ENVELOPE_ALLOWANCE: usize = 128 << 10;

/// Meaning-level cache operations over a guarded store.
pub struct Cache {
    store: Arc<Guarded>,
    keys: Keys,
    /// How long generation keys live (past the longest entry of any rule); follows reloads.
    gen_ttl_ms: AtomicU64,
    /// The most bytes an encoded entry may have: what is read of an entry key, and the
    /// largest entry written. Follows `max_object_size` across reloads.
    entry_limit: AtomicU64,
    pub flights: coalesce::Flights,
}

fn parse_gen(v: &Option<Bytes>) -> Option<u64> {
    let b = v.as_ref()?;
    std::str::from_utf8(b)
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|g| *g != 0)
}

impl Cache {
    /// `gen_ttl` must be at least the longest time any entry is kept; `max_object_size`
    /// bounds entry bodies (`[cache] max_object_size`).
    pub fn new(
        store: Arc<Guarded>,
        prefix: &str,
        gen_ttl: Duration,
        max_object_size: usize,
    ) -> Cache {
        let cache = Cache {
            store,
            keys: Keys::new(prefix),
            gen_ttl_ms: AtomicU64::new(0),
            entry_limit: AtomicU64::new(0),
            flights: coalesce::Flights::default(),
        };
        cache.set_limits(gen_ttl, max_object_size);
        cache
    }

    /// Follow a reload: new generation lifetime and entry size bound.
    pub fn set_limits(&self, gen_ttl: Duration, max_object_size: usize) {
        self.gen_ttl_ms
            .store(gen_ttl.as_millis() as u64, Ordering::Relaxed);
        self.entry_limit.store(
            (max_object_size + ENVELOPE_ALLOWANCE) as u64,
            Ordering::Relaxed,
        );
    }

    fn gen_ttl(&self) -> Duration {
        Duration::from_millis(self.gen_ttl_ms.load(Ordering::Relaxed))
    }

    fn entry_limit(&self) -> usize {
        self.entry_limit.load(Ordering::Relaxed) as usize
    }

    pub fn store(&self) -> &Arc<Guarded> {
        &self.store
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// How long a finished fill stays joinable after its write: as long as a lookup that
    /// started before the write may still be on its way back (a store round trip, bounded
    /// by the command timeout), and no longer, since it holds the whole entry. An
    /// in-process store answers lookups at once.
    pub fn write_linger(&self) -> Duration {
        if self.store.is_local() {
            Duration::from_millis(1)
        } else {
            self.store.timeout()
        }
    }

    /// Decode what was read under an entry key: too large, foreign or malformed bytes are
    /// a corrupt entry (a miss, overwritten by the next fill).
    fn found(
        &self,
        raw: Result<Option<Bytes>, StoreError>,
        id: &Id,
        tags: &[Id],
        gens: &[Option<u64>],
    ) -> Found {
        let Ok(raw) = raw else {
            return Found::Unavailable;
        };
        match raw {
            None => Found::Absent,
            Some(bytes) if bytes.len() > self.entry_limit() => Found::Corrupt,
            Some(bytes) => match Entry::decode(bytes, id) {
                Err(_) => Found::Corrupt,
                Ok(entry) if generations_match(&entry, tags, gens) => Found::Entry(entry),
                Ok(_) => Found::Dead,
            },
        }
    }

    /// One round trip: the session value (if asked), the entry, and its tags' generations.
    pub async fn lookup(
        &self,
        id: &Id,
        tags: &[Id],
        session: Option<&SessionKey>,
    ) -> Result<Lookup, StoreError> {
        let entry_key = self.keys.entry(id);
        let gen_keys: Vec<_> = tags.iter().map(|t| self.keys.generation(t)).collect();
        let read = self
            .store
            .lookup(Some((&entry_key, self.entry_limit())), session, &gen_keys)
            .await?;
        let gens: Vec<Option<u64>> = read.gens.iter().map(parse_gen).collect();
        let found = self.found(read.entry, id, tags, &gens);
        Ok(Lookup {
            found,
            gens,
            session: read.session,
        })
    }

    /// The generations a fill records: the ones read by the lookup, with absent keys
    /// initialized (SET NX, so concurrent fills agree on one value).
    pub async fn record_gens(
        &self,
        tags: &[Id],
        seen: &[Option<u64>],
    ) -> Result<Vec<u64>, StoreError> {
        let missing: Vec<usize> = (0..tags.len())
            .filter(|&i| seen.get(i).copied().flatten().is_none())
            .collect();
        let mut out: Vec<u64> = seen.iter().map(|g| g.unwrap_or(0)).collect();
        out.resize(tags.len(), 0);
        if missing.is_empty() {
            return Ok(out);
        }
        let items: Vec<_> = missing
            .iter()
            .map(|&i| {
                (
                    self.keys.generation(&tags[i]),
                    Bytes::from(random_u64().to_string()),
                )
            })
            .collect();
        let proposals: Vec<Bytes> = items.iter().map(|(_, v)| v.clone()).collect();
        let now = self.store.init_gens(items, self.gen_ttl()).await?;
        let mut unreadable = Vec::new();
        for (j, &i) in missing.iter().enumerate() {
            match parse_gen(&now.get(j).cloned().flatten()) {
                Some(g) => out[i] = g,
                None => unreadable.push((i, proposals[j].clone())),
            }
        }
        if !unreadable.is_empty() {
            // A foreign value sits under a generation key: it matches no entry, so
            // replacing it invalidates nothing that was valid.
            let items = unreadable
                .iter()
                .map(|(i, v)| (self.keys.generation(&tags[*i]), v.clone()))
                .collect();
            self.store.set_gens(items, self.gen_ttl()).await?;
            for (i, v) in unreadable {
                out[i] = parse_gen(&Some(v)).unwrap_or(0);
            }
        }
        Ok(out)
    }

    /// Store entries (a response, and its vary marker if any) for `ttl` in one round trip,
    /// and extend their tags' generation keys to outlive them.
    pub async fn put(&self, entries: &[&Entry], ttl: Duration) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let items: Vec<_> = entries
            .iter()
            .map(|e| (self.keys.entry(&e.key), e.encode()))
            .collect();
        if items.iter().any(|(_, v)| v.len() > self.entry_limit()) {
            // Headers past the envelope allowance: it could never be read back whole.
            return Ok(());
        }
        let touch: Vec<_> = first
            .gens
            .iter()
            .map(|(t, _)| self.keys.generation(t))
            .collect();
        self.store.put(items, ttl, &touch, self.gen_ttl()).await
    }

    /// Read one more entry (a variant named by a vary marker) against generations already
    /// read by the lookup.
    pub async fn lookup_entry(
        &self,
        id: &Id,
        tags: &[Id],
        gens: &[Option<u64>],
    ) -> Result<Found, StoreError> {
        let key = self.keys.entry(id);
        let read = self
            .store
            .lookup(Some((&key, self.entry_limit())), None, &[])
            .await?;
        let raw = read.entry?;
        Ok(self.found(Ok(raw), id, tags, gens))
    }

    /// Purge: give each tag a new generation (one round trip).
    pub async fn bump(&self, tags: &[Id]) -> Result<(), StoreError> {
        if tags.is_empty() {
            return Ok(());
        }
        let items = tags
            .iter()
            .map(|t| {
                (
                    self.keys.generation(t),
                    Bytes::from(random_u64().to_string()),
                )
            })
            .collect();
        self.store.bump_gens(items, self.gen_ttl()).await
    }
}

/// An entry is usable only if it recorded exactly these tags, each at its current generation.
fn generations_match(entry: &Entry, tags: &[Id], current: &[Option<u64>]) -> bool {
    entry.gens.len() == tags.len()
        && tags.iter().zip(current).all(|(tag, cur)| {
            cur.is_some_and(|g| {
                entry
                    .gens
                    .iter()
                    .any(|(t, recorded)| t == tag && *recorded == g)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use http::{HeaderMap, StatusCode};

    fn cache() -> Cache {
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Guarded::new(
            Arc::new(store::memory::MemoryStore::new(1 << 20)),
            Duration::from_millis(100),
            metrics,
        ));
        Cache::new(store, "t:", Duration::from_secs(3600), 1 << 20)
    }

    fn entry(id: Id, gens: Vec<(Id, u64)>) -> Entry {
        Entry {
            key: id,
            status: StatusCode::OK,
            flags: 0,
            stored_at_ms: 0,
            age_at_store_s: 0,
            fresh_until_ms: u64::MAX / 2,
            swr_until_ms: 0,
            sie_until_ms: 0,
            gens,
            vary: vec![],
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"x"),
        }
    }

    #[tokio::test]
    async fn a_bump_kills_entries_filled_before_it() {
        let c = cache();
        let id = Id([9; 16]);
        let tags = [key::tag_id("user:1"), key::path_tag("/user/1")];
        let first = c.lookup(&id, &tags, None).await.unwrap();
        assert!(matches!(first.found, Found::Absent));
        let gens = c.record_gens(&tags, &first.gens).await.unwrap();
        assert!(gens.iter().all(|g| *g != 0));
        let e = entry(id, tags.iter().copied().zip(gens.iter().copied()).collect());
        c.put(&[&e], Duration::from_secs(60)).await.unwrap();
        assert!(matches!(
            c.lookup(&id, &tags, None).await.unwrap().found,
            Found::Entry(_)
        ));
        c.bump(&tags[..1]).await.unwrap();
        assert!(matches!(
            c.lookup(&id, &tags, None).await.unwrap().found,
            Found::Dead
        ));
    }

    #[tokio::test]
    async fn a_fill_that_raced_a_purge_is_dead_on_arrival() {
        let c = cache();
        let id = Id([8; 16]);
        let tags = [key::tag_id("user:2")];
        let seen = c.lookup(&id, &tags, None).await.unwrap().gens;
        let recorded = c.record_gens(&tags, &seen).await.unwrap();
        // The write lands while the fill is at the upstream.
        c.bump(&tags).await.unwrap();
        c.put(
            &[&entry(id, vec![(tags[0], recorded[0])])],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert!(matches!(
            c.lookup(&id, &tags, None).await.unwrap().found,
            Found::Dead
        ));
    }

    #[tokio::test]
    async fn garbage_under_keys_is_a_miss_not_an_error() {
        let c = cache();
        let id = Id([7; 16]);
        let tags = [key::tag_id("t")];
        c.store()
            .put(
                vec![(c.keys().entry(&id), Bytes::from_static(b"garbage"))],
                Duration::from_secs(60),
                &[],
                Duration::ZERO,
            )
            .await
            .unwrap();
        c.store()
            .set_gens(
                vec![(c.keys().generation(&tags[0]), Bytes::from_static(b"zz"))],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let l = c.lookup(&id, &tags, None).await.unwrap();
        assert!(matches!(l.found, Found::Corrupt));
        assert_eq!(l.gens, vec![None]);
        let g = c.record_gens(&tags, &l.gens).await.unwrap();
        assert_ne!(g[0], 0, "an unreadable generation is replaced");
    }
}
