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
pub mod l1;
pub mod mirror;
pub mod policy;
pub mod revalidate;
pub mod store;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::metrics::Metrics;
use entry::Entry;
use key::{GenKey, Id, Keys, SessionKey};
use l1::L1;
use mirror::Mirror;
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
pub enum Found {
    /// Nothing stored.
    Absent,
    /// A decodable entry whose generations are all current.
    Entry(Arc<Entry>),
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
    /// The entry came from the in-process tier over a remote store.
    pub from_l1: bool,
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
    /// The in-process tier: a copy of entries over a remote store, or the entries
    /// themselves over the embedded one.
    l1: Option<L1>,
    /// Entries are written to (and read from) the store; false for the embedded store,
    /// whose entries live only in `l1`.
    entries_in_store: bool,
    /// The coherence table of a remote store's small keys, once tracking was started.
    mirror: OnceLock<Arc<Mirror>>,
    /// The prefix under which sessions are tracked (none: sessions are always read from
    /// the store). A session key is vouched for only if it starts with it, so a reload that
    /// changes the template cannot make the table answer for keys it does not track.
    session_prefix: OnceLock<Vec<u8>>,
    /// When this instance last extended each generation key (ms), so that fills do not
    /// touch a shared tag (and announce a change of it to every instance) on every store.
    touched: Mutex<HashMap<Id, u64>>,
    observing: Mutex<()>,
    metrics: Arc<Metrics>,
}

/// A generation key extended within this long is not extended again by a fill: it lives
/// at least an hour past the longest entry (`Live::generation_ttl`), so half of that margin
/// keeps every entry stored meanwhile covered.
const TOUCH_EVERY_MS: u64 = 30 * 60 * 1000;
/// Bound on the touch memo (it is emptied past this).
const TOUCH_MEMO_MAX: usize = 10_000;

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
    /// `l1`: the in-process tier; required for the embedded store, where it holds the
    /// entries (without one, nothing would be cached).
    pub fn new(
        store: Arc<Guarded>,
        prefix: &str,
        gen_ttl: Duration,
        max_object_size: usize,
        l1: Option<L1>,
        metrics: Arc<Metrics>,
    ) -> Cache {
        let entries_in_store = !store.is_local() || l1.is_none();
        let cache = Cache {
            store,
            keys: Keys::new(prefix),
            gen_ttl_ms: AtomicU64::new(0),
            entry_limit: AtomicU64::new(0),
            flights: coalesce::Flights::default(),
            l1,
            entries_in_store,
            mirror: OnceLock::new(),
            session_prefix: OnceLock::new(),
            touched: Mutex::new(HashMap::new()),
            observing: Mutex::new(()),
            metrics,
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
    /// in-process store answers lookups at once, and with the in-process tier such a
    /// lookup finds the fill there (`holds`) instead.
    pub fn write_linger(&self) -> Duration {
        if self.store.is_local() || self.l1.is_some() {
            Duration::from_millis(1)
        } else {
            self.store.timeout()
        }
    }

    /// The in-process tier holds a fresh entry under `id` (a fill finished since a lookup
    /// began: look up again rather than fetch again).
    pub fn holds(&self, id: &Id) -> bool {
        self.fresh_copy(id).is_some()
    }

    /// A compact copy of a fill's entry: its body and header values are slices of the
    /// upstream connection's read buffers, which anything holding them would pin (many
    /// times their size); the copy shares one exact buffer.
    pub fn compact(entry: &Entry) -> Entry {
        Entry::decode(entry.encode(), &entry.key).unwrap_or_else(|_| entry.clone())
    }

    /// Over a remote store: start keeping the coherence table of its small keys (tag
    /// generations; sessions too when `session_prefix`, the static start of the session
    /// key template, names keys of their own), within `table_bytes`. Until tracking is
    /// acknowledged the in-process tier is not used without asking the store. Nothing to do
    /// for the embedded store.
    pub fn track(&self, serve_disconnected: Duration, session_prefix: &str, table_bytes: usize) {
        if self.l1.is_none() || !self.entries_in_store {
            return;
        }
        let gen_prefix = self.keys.generation_prefix();
        let mut prefixes = vec![gen_prefix.clone()];
        // Redis refuses overlapping BCAST prefixes, and an empty one would announce every
        // write to every key: sessions are tracked only under a prefix apart from both.
        let sp = session_prefix.as_bytes();
        let sessions =
            !sp.is_empty() && !sp.starts_with(&gen_prefix) && !gen_prefix.starts_with(sp);
        if sessions {
            prefixes.push(sp.to_vec());
            let _ = self.session_prefix.set(sp.to_vec());
        }
        let mirror = Arc::new(Mirror::new(table_bytes, serve_disconnected));
        if self.mirror.set(mirror.clone()).is_ok() {
            self.store.track(mirror, prefixes);
        }
    }

    fn session_tracked(&self, key: &SessionKey) -> bool {
        self.session_prefix
            .get()
            .is_some_and(|p| key.0.as_bytes().starts_with(p))
    }

    /// Follow a reload of `[cache] l1_serve_disconnected`.
    pub fn set_serve_disconnected(&self, d: Duration) {
        if let Some(m) = self.mirror.get() {
            m.set_serve_disconnected(d);
        }
    }

    /// Update the gauges and counters read off the tiers (at scrape time).
    pub fn observe(&self) {
        // One scrape at a time: counters follow their sources by adding the difference.
        let _one = self.observing.lock().unwrap_or_else(|p| p.into_inner());
        let m = &self.metrics;
        let follow = |c: &prometheus::IntCounter, n: u64| c.inc_by(n.saturating_sub(c.get()));
        let mut held = (0, 0);
        if let Some(l1) = &self.l1 {
            held = l1.stats();
            m.l1_bytes.set(held.0 as i64);
            m.l1_entries.set(held.1 as i64);
            follow(&m.l1_evictions, l1.evictions());
        }
        if let Some(mirror) = self.mirror.get() {
            m.tracking_state.set(i64::from(mirror.is_connected()));
            follow(&m.invalidations, mirror.invalidations());
            follow(&m.tracking_losses, mirror.losses());
            follow(&m.tracking_acks, mirror.acks());
        }
        if let Some((bytes, items)) = self.store.stats() {
            // The embedded store's entries are the tier's.
            let (b, n) = if self.entries_in_store { (0, 0) } else { held };
            m.store_bytes.set((bytes + b) as i64);
            m.store_entries.set((items + n) as i64);
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
                Ok(entry) if generations_match(&entry, tags, gens) => {
                    let entry = Arc::new(entry);
                    if let Some(l1) = &self.l1 {
                        // Its body and headers share the one buffer read from the store.
                        l1.insert(entry.clone(), None);
                    }
                    Found::Entry(entry)
                }
                Ok(_) => Found::Dead,
            },
        }
    }

    /// What the in-process tier holds under `id` for these generations.
    fn found_local(&self, id: &Id, tags: &[Id], gens: &[Option<u64>]) -> Found {
        match self.l1.as_ref().and_then(|l| l.get(id)) {
            None => Found::Absent,
            Some(e) if generations_match(&e, tags, gens) => Found::Entry(e),
            Some(_) => Found::Dead,
        }
    }

    /// A fresh copy in the in-process tier (over a remote store).
    fn fresh_copy(&self, id: &Id) -> Option<Arc<Entry>> {
        let e = self.l1.as_ref()?.get(id)?;
        (crate::clock::now_ms() < e.fresh_until_ms).then_some(e)
    }

    /// Answer from the in-process tier alone: a fresh copy whose generations (and the
    /// session, if asked) the coherence table knows to be current. No store command.
    fn lookup_tracked(
        &self,
        tags: &[Id],
        gen_keys: &[GenKey],
        session: Option<&SessionKey>,
        copy: &Arc<Entry>,
    ) -> Option<Lookup> {
        let mirror = self.mirror.get()?;
        if session.is_some_and(|s| !self.session_tracked(s)) {
            return None;
        }
        let mut values = Vec::with_capacity(gen_keys.len() + 1);
        let keys = session
            .map(|s| s.0.as_bytes())
            .into_iter()
            .chain(gen_keys.iter().map(|g| &g.0[..]));
        if !mirror.get_all(keys, &mut values) {
            return None;
        }
        let mut values = values.into_iter();
        let session = match session {
            Some(_) => values.next(),
            None => None,
        };
        let gens: Vec<Option<u64>> = values.map(|v| parse_gen(&Some(v))).collect();
        if !generations_match(copy, tags, &gens) {
            return None;
        }
        Some(Lookup {
            found: Found::Entry(copy.clone()),
            gens,
            session,
            from_l1: true,
        })
    }

    /// Record small keys just read into the coherence table (under the ticket taken
    /// before the read).
    fn record(
        &self,
        ticket: Option<mirror::Ticket>,
        gen_keys: &[GenKey],
        gens: &[Option<Bytes>],
        session: Option<(&SessionKey, &Option<Bytes>, Option<Duration>)>,
    ) {
        let (Some(mirror), Some(ticket)) = (self.mirror.get(), ticket) else {
            return;
        };
        // Redis announces an expiry only when it deletes the key (when something touches
        // it, or its sweep gets there): a session is vouched for until its own expiry only.
        let now = crate::clock::now_ms();
        let session = session
            .filter(|(k, _, _)| self.session_tracked(k))
            .and_then(|(k, v, ttl)| {
                let until = ttl.map_or(u64::MAX, |d| now.saturating_add(d.as_millis() as u64));
                Some((k.0.as_bytes(), v.as_ref()?, until))
            });
        // Generations outlive every entry recorded with them (`to_touch`).
        let gens = gen_keys
            .iter()
            .zip(gens)
            .filter_map(|(k, v)| Some((&k.0[..], v.as_ref()?, u64::MAX)));
        mirror.record(ticket, session.into_iter().chain(gens));
    }

    /// Look up an entry with its tags' generations and the session (if asked).
    ///
    /// Over a remote store: a fresh copy in the in-process tier whose generations (and
    /// session) the coherence table vouches for is a hit with no store command; a copy the
    /// table cannot vouch for costs a read of the small keys only; otherwise one round trip
    /// reads the entry beside them, and a usable entry read is kept in the tier. Over the
    /// embedded store the small keys are read in process and the entry is the tier's.
    pub async fn lookup(
        &self,
        id: &Id,
        tags: &[Id],
        session: Option<&SessionKey>,
    ) -> Result<Lookup, StoreError> {
        let gen_keys: Vec<_> = tags.iter().map(|t| self.keys.generation(t)).collect();
        if !self.entries_in_store {
            let (read, gens) = self.read(None, session, &gen_keys).await?;
            let found = self.found_local(id, tags, &gens);
            self.count(&found);
            return Ok(Lookup {
                found,
                gens,
                session: read.session,
                from_l1: false,
            });
        }
        let copy = self.fresh_copy(id);
        if let Some(copy) = &copy {
            if let Some(hit) = self.lookup_tracked(tags, &gen_keys, session, copy) {
                self.metrics.l1_hits.inc();
                return Ok(hit);
            }
            // The copy may still be current: ask for the small keys only.
            let (read, gens) = self.read(None, session, &gen_keys).await?;
            if generations_match(copy, tags, &gens) {
                self.metrics.l1_hits.inc();
                return Ok(Lookup {
                    found: Found::Entry(copy.clone()),
                    gens,
                    session: read.session,
                    from_l1: true,
                });
            }
        }
        if self.l1.is_some() {
            self.metrics.l1_misses.inc();
        }
        let entry_key = self.keys.entry(id);
        let limit = self.entry_limit();
        let (read, gens) = self
            .read(Some((&entry_key, limit)), session, &gen_keys)
            .await?;
        let found = self.found(read.entry, id, tags, &gens);
        Ok(Lookup {
            found,
            gens,
            session: read.session,
            from_l1: false,
        })
    }

    /// One read of the store (the entry if asked, the session and generations), its small
    /// keys recorded into the coherence table; the generations parsed.
    async fn read(
        &self,
        entry: Option<(&key::EntryKey, usize)>,
        session: Option<&SessionKey>,
        gen_keys: &[GenKey],
    ) -> Result<(store::Read, Vec<Option<u64>>), StoreError> {
        let ticket = self.mirror.get().map(|m| m.ticket());
        let read = self.store.lookup(entry, session, gen_keys).await?;
        self.record(
            ticket,
            gen_keys,
            &read.gens,
            session.map(|s| (s, &read.session, read.session_ttl)),
        );
        let gens = read.gens.iter().map(parse_gen).collect();
        Ok((read, gens))
    }

    fn count(&self, found: &Found) {
        if matches!(found, Found::Entry(_)) {
            self.metrics.l1_hits.inc();
        } else {
            self.metrics.l1_misses.inc();
        }
    }

    /// Keep a fill's entry (`compact`ed) in the in-process tier for `ttl`, as the store
    /// keeps it.
    pub fn keep(&self, entry: &Arc<Entry>, ttl: Duration) {
        if let Some(l1) = &self.l1 {
            l1.insert(entry.clone(), Some(ttl));
        }
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
    /// and extend their tags' generation keys to outlive them. (The in-process tier got
    /// them already: `keep`.)
    pub async fn put(&self, entries: &[&Entry], ttl: Duration) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let items: Vec<_> = if self.entries_in_store {
            entries
                .iter()
                .map(|e| (self.keys.entry(&e.key), e.encode()))
                .collect()
        } else {
            Vec::new()
        };
        if items.iter().any(|(_, v)| v.len() > self.entry_limit()) {
            // Headers past the envelope allowance: it could never be read back whole.
            return Ok(());
        }
        let touch = self.to_touch(first);
        self.store.put(items, ttl, &touch, self.gen_ttl()).await
    }

    /// The generation keys of an entry that this instance has not extended lately.
    /// Extending one announces a change of it to every tracking instance, which then reads
    /// it again: a tag shared by every entry must not be touched by every fill.
    fn to_touch(&self, entry: &Entry) -> Vec<GenKey> {
        let now = crate::clock::now_ms();
        let mut memo = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        if memo.len() > TOUCH_MEMO_MAX {
            memo.clear();
        }
        entry
            .gens
            .iter()
            .filter(|(t, _)| match memo.get(t) {
                Some(at) if now.saturating_sub(*at) < TOUCH_EVERY_MS => false,
                _ => {
                    memo.insert(*t, now);
                    true
                }
            })
            .map(|(t, _)| self.keys.generation(t))
            .collect()
    }

    /// Read one more entry (a variant named by a vary marker) against generations already
    /// read by the lookup: the in-process tier's copy when it is current, else the store's.
    pub async fn lookup_entry(
        &self,
        id: &Id,
        tags: &[Id],
        gens: &[Option<u64>],
    ) -> Result<Found, StoreError> {
        Ok(self.lookup_variant(id, tags, gens).await?.0)
    }

    /// As `lookup_entry`; true when the entry came from the in-process tier over a remote
    /// store.
    pub async fn lookup_variant(
        &self,
        id: &Id,
        tags: &[Id],
        gens: &[Option<u64>],
    ) -> Result<(Found, bool), StoreError> {
        if !self.entries_in_store {
            return Ok((self.found_local(id, tags, gens), false));
        }
        if let Some(copy) = self.fresh_copy(id)
            && generations_match(&copy, tags, gens)
        {
            return Ok((Found::Entry(copy), true));
        }
        let key = self.keys.entry(id);
        let read = self
            .store
            .lookup(Some((&key, self.entry_limit())), None, &[])
            .await?;
        let raw = read.entry?;
        Ok((self.found(Ok(raw), id, tags, gens), false))
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
        Cache::new(
            store,
            "t:",
            Duration::from_secs(3600),
            1 << 20,
            None,
            Arc::new(Metrics::new()),
        )
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
