//! Fill once: at most one upstream fill per cache key per process (flights), and, with
//! `[cache] distributed_lock`, one across the instances sharing a store (leases).
//!
//! The first miss for a key becomes the leader; concurrent misses wait for its entry. A
//! flight is keyed by the full entry key (which includes the user scope), so a waiter can
//! only ever receive a response filled for exactly its own key. A flight also remembers the
//! tag generations its leader saw: a request that observed newer generations (a purge landed
//! after the fill started) never joins it and starts its own fill instead.
//!
//! A finished flight stays joinable until its store write completes, so a request arriving
//! between "body complete" and "entry written" is served from the finished fill. After the
//! write it lingers briefly as `Stored`: a request whose lookup ran just before the write
//! landed is told to look up again rather than fetch the same response a second time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::entry::{Entry, flags as entry_flags};
use super::key::{Id, LeaseKey};
use super::store::Guarded;
use super::{Cache, Found, random_u64};

/// What a flight's waiters see.
#[derive(Clone)]
pub enum FlightState {
    Pending,
    /// The fill finished with a storable response (its store write may still be running).
    Done(Arc<Entry>),
    /// The entry is in the store. Waiters already on the flight still take it from here;
    /// requests joining now read it from the store.
    Stored(Arc<Entry>),
    /// The fill ended without a storable response; waiters fetch for themselves.
    Failed,
}

struct Flight {
    state: watch::Sender<FlightState>,
    /// Led without the store (it could not be read): joinable only by requests that could
    /// not read it either, and only while no purge happened in this process since.
    degraded: Option<u64>,
    /// The process's purge epoch when the fill started.
    epoch_at_start: u64,
    /// Generations the leader read before its fill (`None`: the key was absent).
    seen: Vec<Option<u64>>,
    /// Generations the leader recorded after initializing absent ones.
    recorded: OnceLock<Vec<u64>>,
}

impl Flight {
    /// May a request that read `gens` wait on this flight? Only a generation the request
    /// saw that neither the leader saw nor recorded rules it out: that is a purge the fill
    /// did not see. A generation the request found absent was not purged before its lookup
    /// (a purge writes a value), and one the leader found absent is being initialized by
    /// it, so either matches until the entry is done; `entry_serves` then checks the
    /// recorded values.
    fn serves(&self, gens: &[Option<u64>]) -> bool {
        if gens.len() != self.seen.len() {
            return false;
        }
        let recorded = self.recorded.get();
        gens.iter().enumerate().all(|(i, g)| {
            g.is_none()
                || *g == self.seen[i]
                || self.seen[i].is_none()
                || recorded.is_some_and(|r| Some(r[i]) == *g)
        })
    }
}

type Map = Arc<Mutex<HashMap<Id, Arc<Flight>>>>;

/// May an entry filled by a flight answer a request that read `gens` before joining? Every
/// generation the request saw must be the one the fill recorded (an absent one was not
/// purged before the request's lookup, so anything recorded is as new).
pub fn entry_serves(entry: &Entry, gens: &[Option<u64>]) -> bool {
    entry.gens.len() == gens.len()
        && entry
            .gens
            .iter()
            .zip(gens)
            .all(|((_, recorded), seen)| seen.is_none_or(|g| g == *recorded))
}

/// The in-process table of fills under way.
#[derive(Default)]
pub struct Flights {
    map: Map,
}

/// The outcome of joining.
pub enum Joined {
    /// Fetch from the upstream and complete (or drop) the returned handle.
    Leader(Leader),
    /// Wait on this for the leader's result.
    Waiter(watch::Receiver<FlightState>),
    /// A fill for this key was just written: look up again.
    Relookup,
}

fn lock(map: &Map) -> std::sync::MutexGuard<'_, HashMap<Id, Arc<Flight>>> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flights {
    /// Lead a new fill for `id`, or wait on the compatible one under way. `relookup`: the
    /// caller may be sent back to the store once if a fill was just written. `epoch`: the
    /// process's purge epoch now (see `join_degraded`).
    pub fn join(&self, id: Id, gens: &[Option<u64>], relookup: bool, epoch: u64) -> Joined {
        let mut map = lock(&self.map);
        if let Some(f) = map.get(&id).filter(|f| f.degraded.is_none()) {
            match &*f.state.borrow() {
                FlightState::Stored(_) if relookup => return Joined::Relookup,
                FlightState::Pending | FlightState::Done(_) if f.serves(gens) => {
                    return Joined::Waiter(f.state.subscribe());
                }
                _ => {}
            }
        }
        self.lead(&mut map, id, None, epoch, gens.to_vec())
    }

    /// Start a flight for `id` (replacing any incompatible one) and lead it.
    fn lead(
        &self,
        map: &mut HashMap<Id, Arc<Flight>>,
        id: Id,
        degraded: Option<u64>,
        epoch: u64,
        seen: Vec<Option<u64>>,
    ) -> Joined {
        let flight = Arc::new(Flight {
            state: watch::Sender::new(FlightState::Pending),
            degraded,
            epoch_at_start: epoch,
            seen,
            recorded: OnceLock::new(),
        });
        map.insert(id, flight.clone());
        Joined::Leader(Leader {
            map: self.map.clone(),
            id,
            flight,
        })
    }

    /// Join or lead a fill for `id` without the store: the request could not read it, so
    /// it knows no generations. It waits on any fill under way for the key that started
    /// after the last purge in this process (`epoch`, which every purge advances), so
    /// concurrent misses still make one upstream request while the store is away.
    pub fn join_degraded(&self, id: Id, epoch: u64) -> Joined {
        let mut map = lock(&self.map);
        if let Some(f) = map.get(&id) {
            let same_epoch = match f.degraded {
                Some(e) => e == epoch,
                // A fill that read the store: its generations were current at its lookup.
                None => f.epoch_at_start == epoch,
            };
            if same_epoch
                && matches!(
                    *f.state.borrow(),
                    FlightState::Pending | FlightState::Done(_)
                )
            {
                return Joined::Waiter(f.state.subscribe());
            }
        }
        self.lead(&mut map, id, Some(epoch), epoch, Vec::new())
    }

    /// Number of fills under way (for tests and metrics).
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The leader's handle. Dropping it without `complete` fails the flight; dropping it after
/// `complete` retires the flight.
pub struct Leader {
    map: Map,
    id: Id,
    flight: Arc<Flight>,
}

impl Leader {
    /// Record the generations the fill will store (after absent ones were initialized).
    pub fn set_recorded(&self, gens: Vec<u64>) {
        let _ = self.flight.recorded.set(gens);
    }

    /// Publish the finished entry to waiters (and to joiners until `stored`).
    pub fn complete(&self, entry: Arc<Entry>) {
        self.flight.state.send_replace(FlightState::Done(entry));
    }

    /// The entry is in the store; late joiners read it from there.
    pub fn stored(&self) {
        self.flight.state.send_modify(|s| {
            if let FlightState::Done(e) = s {
                *s = FlightState::Stored(e.clone());
            }
        });
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if matches!(*self.flight.state.borrow(), FlightState::Pending) {
            self.flight.state.send_replace(FlightState::Failed);
        }
        let mut map = lock(&self.map);
        if map
            .get(&self.id)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            map.remove(&self.id);
        }
    }
}

/// How often a request waiting on another instance's fill looks for the entry.
const LEASE_POLL: Duration = Duration::from_millis(20);

/// A lease on a key's fill, held in the store so instances sharing it fill once.
/// Dropping it gives it back (only if it is still ours), whatever way the fill ended: a
/// fill abandoned mid-body must not leave other instances waiting for the lease to expire.
pub struct Lease {
    store: Arc<Guarded>,
    key: LeaseKey,
    token: Bytes,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // shutting down: the lease expires by itself
        };
        let store = self.store.clone();
        let key = std::mem::replace(&mut self.key, LeaseKey(Vec::new()));
        let token = std::mem::take(&mut self.token);
        runtime.spawn(async move {
            let _ = store.lease_release(&key, token).await;
        });
    }
}

/// How taking a key's lease ended.
pub enum LeaseOutcome {
    Held(Lease),
    /// Another instance filled the key while we waited.
    Filled(Arc<Entry>),
    /// No lease (store error, or the wait timed out): fill anyway.
    Proceed,
}

/// Take the lease of a fill of `id` (whose tags were recorded at `recorded`), or wait,
/// polling the store, for the instance holding it to store the entry, at most `wait`.
/// Returns the outcome and how long it waited.
pub async fn take_lease(
    cache: &Cache,
    id: &Id,
    tags: &[Id],
    recorded: &[u64],
    lease_ttl: Duration,
    wait: Duration,
) -> (LeaseOutcome, Option<Duration>) {
    let store = cache.store();
    let key = cache.keys().lease(id);
    let token = Bytes::from(random_u64().to_string());
    let gens: Vec<Option<u64>> = recorded.iter().map(|g| Some(*g)).collect();
    let started = Instant::now();
    loop {
        match store.lease_take(&key, token.clone(), lease_ttl).await {
            Ok(true) => {
                let lease = Lease {
                    store: store.clone(),
                    key,
                    token,
                };
                return (LeaseOutcome::Held(lease), None);
            }
            Ok(false) => {}
            Err(_) => return (LeaseOutcome::Proceed, None),
        }
        if started.elapsed() >= wait {
            return (LeaseOutcome::Proceed, Some(started.elapsed()));
        }
        tokio::time::sleep(LEASE_POLL).await;
        if let Ok(Found::Entry(e)) = cache.lookup_entry(id, tags, &gens).await
            && e.flags & entry_flags::VARY_INDEX == 0
            && crate::clock::now_ms() < e.fresh_until_ms
        {
            return (LeaseOutcome::Filled(e), Some(started.elapsed()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_request_waits_and_a_purge_starts_a_new_flight() {
        let flights = Flights::default();
        let id = Id([1; 16]);
        let Joined::Leader(leader) = flights.join(id, &[Some(5)], true, 0) else {
            panic!("first is leader")
        };
        assert!(matches!(
            flights.join(id, &[Some(5)], true, 0),
            Joined::Waiter(_)
        ));
        assert!(
            matches!(flights.join(id, &[None], true, 0), Joined::Waiter(_)),
            "an older view (before the generation existed) waits too"
        );
        // Someone saw generation 6: a purge landed after the leader read 5.
        let Joined::Leader(newer) = flights.join(id, &[Some(6)], true, 0) else {
            panic!("a newer generation must not join an older fill")
        };
        drop(leader);
        assert_eq!(
            flights.len(),
            1,
            "the old leader does not remove the newer flight"
        );
        drop(newer);
        assert!(flights.is_empty());
    }

    #[test]
    fn a_generation_being_initialized_is_checked_when_the_entry_is_done() {
        let flights = Flights::default();
        let id = Id([5; 16]);
        let Joined::Leader(leader) = flights.join(id, &[None], true, 0) else {
            panic!()
        };
        // The leader is initializing the generation; whatever a joiner saw, it may wait...
        assert!(matches!(
            flights.join(id, &[Some(9)], true, 0),
            Joined::Waiter(_)
        ));
        leader.set_recorded(vec![7]);
        // ...but the finished entry only serves requests that saw what it recorded.
        let mut e = crate::cache::entry::tests::sample();
        e.gens = vec![(Id([0; 16]), 7)];
        assert!(entry_serves(&e, &[Some(7)]));
        assert!(entry_serves(&e, &[None]));
        assert!(!entry_serves(&e, &[Some(9)]));
    }

    #[test]
    fn dropping_the_leader_fails_waiters() {
        let flights = Flights::default();
        let id = Id([2; 16]);
        let Joined::Leader(leader) = flights.join(id, &[], true, 0) else {
            panic!()
        };
        let Joined::Waiter(rx) = flights.join(id, &[], true, 0) else {
            panic!()
        };
        drop(leader);
        assert!(matches!(*rx.borrow(), FlightState::Failed));
    }

    #[test]
    fn a_stored_flight_sends_joiners_back_to_the_store_once() {
        let flights = Flights::default();
        let id = Id([6; 16]);
        let Joined::Leader(leader) = flights.join(id, &[], true, 0) else {
            panic!()
        };
        leader.complete(Arc::new(crate::cache::entry::tests::sample()));
        assert!(
            matches!(flights.join(id, &[], true, 0), Joined::Waiter(_)),
            "written yet? serve the fill"
        );
        leader.stored();
        assert!(matches!(flights.join(id, &[], true, 0), Joined::Relookup));
        assert!(
            matches!(flights.join(id, &[], false, 0), Joined::Leader(_)),
            "only once"
        );
    }

    #[test]
    fn without_the_store_fills_are_shared_until_a_purge() {
        let flights = Flights::default();
        let id = Id([9; 16]);
        let Joined::Leader(leader) = flights.join_degraded(id, 3) else {
            panic!("first is leader")
        };
        assert!(matches!(flights.join_degraded(id, 3), Joined::Waiter(_)));
        assert!(
            matches!(flights.join(id, &[Some(1)], true, 3), Joined::Leader(_)),
            "a request that read the store never waits on a fill that did not"
        );
        drop(leader);
        let Joined::Leader(_normal) = flights.join(id, &[Some(1)], true, 3) else {
            panic!()
        };
        assert!(
            matches!(flights.join_degraded(id, 3), Joined::Waiter(_)),
            "a fill that read the store serves requests that could not"
        );
        assert!(
            matches!(flights.join_degraded(id, 4), Joined::Leader(_)),
            "after a purge, a new fetch"
        );
    }

    #[test]
    fn keys_never_share_a_flight() {
        let flights = Flights::default();
        let Joined::Leader(_a) = flights.join(Id([3; 16]), &[], true, 0) else {
            panic!()
        };
        assert!(matches!(
            flights.join(Id([4; 16]), &[], true, 0),
            Joined::Leader(_)
        ));
    }
}
