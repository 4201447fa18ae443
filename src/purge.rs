//! Purges: tag generation bumps, and the retry queue that keeps an outage from leaving stale
//! entries behind.
//!
//! A purge is one pipelined round trip that gives each tag a new generation; every entry that
//! recorded an older one is dead from then on, whatever the number of entries or variants.
//! When the store cannot take the bump, the tags wait in a bounded in-memory queue and cache
//! reads are bypassed until the queue is flushed, so nothing stale is served after the store
//! comes back. If the queue overflows it collapses into one bump of the global tag every
//! entry carries (everything is purged: correct, if expensive). If the process dies with a
//! non-empty queue, the entries it would have killed live until their TTL: TTLs are the bound.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::cache::Cache;
use crate::cache::key::{Id, global_tag};
use crate::cache::store::Move;
pub use crate::labels::Trigger;
use crate::metrics::{Metrics, RuleMetrics};

/// Tags queued while the store was unreachable.
struct Queue {
    tags: VecDeque<Id>,
    /// Bumped each time the queue collapses into the global tag: a flush that started
    /// before a collapse must not pop what replaced its batch.
    epoch: u64,
}

/// Bumps tags, queueing what the store could not take.
pub struct Purger {
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    queue: std::sync::Mutex<Queue>,
    /// Fast check on the read path: true while anything is queued.
    pending: AtomicBool,
    capacity: usize,
    wake: Notify,
    /// Advanced by every purge this process makes: fills that could not read the store
    /// are only shared within one epoch.
    epoch: std::sync::atomic::AtomicU64,
    /// The purges of the last `REPLAY_WINDOW_MS`, replayed when the store moves to another
    /// server (`replay_recent`).
    recent: std::sync::Mutex<Recent>,
    /// While the store is moving to another server, the queue is not flushed: a flush now
    /// could land on the server being left.
    held: AtomicBool,
    /// How many times the store started moving to another server.
    moves: std::sync::atomic::AtomicU64,
}

/// How far back purges are replayed after the store moved to another server: beyond the
/// time Sentinel takes between promoting a replica and announcing it.
const REPLAY_WINDOW_MS: u64 = 10_000;
/// At most this many recent tags are kept; more within the window replay as a purge of
/// everything.
const RECENT_MAX: usize = 4096;

#[derive(Default)]
struct Recent {
    /// (when, tag), oldest first.
    tags: VecDeque<(u64, Id)>,
    /// When a tag still inside the window had to be dropped (0: never).
    overflowed_ms: u64,
}

/// The result of a purge request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purged {
    /// Every tag has a new generation.
    Done,
    /// The store could not be reached; the tags are queued and reads bypass the cache.
    Queued,
}

impl Purger {
    pub fn new(cache: Arc<Cache>, metrics: Arc<Metrics>, capacity: usize) -> Purger {
        Purger {
            cache,
            metrics,
            queue: std::sync::Mutex::new(Queue {
                tags: VecDeque::new(),
                epoch: 0,
            }),
            pending: AtomicBool::new(false),
            capacity: capacity.max(1),
            wake: Notify::new(),
            epoch: std::sync::atomic::AtomicU64::new(0),
            recent: std::sync::Mutex::new(Recent::default()),
            held: AtomicBool::new(false),
            moves: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The store is moving to another server (a failover): before it does, replay the
    /// recent purges and hold them; once it has, let them go to the new server.
    pub fn store_moving(&self, step: Move) {
        match step {
            Move::Starting => {
                self.held.store(true, Ordering::Release);
                // Pending first, then the count: a read that sees the new count sees
                // pending too, and one that saw the old count checks it again after.
                self.replay_recent();
                self.moves.fetch_add(1, Ordering::AcqRel);
            }
            Move::Done => {
                self.held.store(false, Ordering::Release);
                self.wake.notify_one();
            }
        }
    }

    /// Remember `tags` as purged now (for `replay_recent`).
    fn remember(&self, tags: &[Id]) {
        let now = crate::clock::now_ms();
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while r
            .tags
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > REPLAY_WINDOW_MS)
        {
            r.tags.pop_front();
        }
        for tag in tags {
            if r.tags.len() >= RECENT_MAX {
                r.tags.pop_front();
                r.overflowed_ms = now;
            }
            r.tags.push_back((now, *tag));
        }
    }

    /// The store moved to another server (a failover): the old one may have dropped the
    /// last purges it took, so queue them again. Reads bypass the cache until the new
    /// server has them (re-bumping a generation costs only misses).
    pub fn replay_recent(&self) {
        let now = crate::clock::now_ms();
        let tags: Vec<Id> = {
            let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.overflowed_ms != 0 && now.saturating_sub(r.overflowed_ms) <= REPLAY_WINDOW_MS {
                vec![global_tag()]
            } else {
                r.tags
                    .iter()
                    .filter(|(at, _)| now.saturating_sub(*at) <= REPLAY_WINDOW_MS)
                    .map(|(_, t)| *t)
                    .collect()
            }
        };
        if !tags.is_empty() {
            tracing::warn!(
                tags = tags.len(),
                "the store moved to another server: replaying recent purges"
            );
            self.enqueue(&tags);
        }
    }

    /// The purge epoch: how many purges this process has started.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// How many times the store started moving to another server: a cache read that saw
    /// this change while it ran must not be trusted.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Acquire)
    }

    /// True while bumps wait for the store: cache reads must be bypassed.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    pub fn depth(&self) -> usize {
        self.lock().tags.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bump `tags` now, or queue them; counted against `rule`.
    pub async fn purge(&self, tags: &[Id], trigger: Trigger, rule: &RuleMetrics) -> Purged {
        if tags.is_empty() {
            return Purged::Done;
        }
        rule.purge(trigger);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.remember(tags);
        if self.held.load(Ordering::Acquire) {
            // The store is moving to another server: the bump goes there once it has.
            self.enqueue(tags);
            return Purged::Queued;
        }
        match self.cache.bump(tags).await {
            Ok(()) => Purged::Done,
            Err(e) => {
                self.enqueue(tags);
                tracing::warn!(
                    error = %e,
                    trigger = trigger.as_str(),
                    queued = self.depth(),
                    "purge queued: the store is unreachable; cache reads bypassed until it is flushed"
                );
                Purged::Queued
            }
        }
    }

    fn enqueue(&self, tags: &[Id]) {
        let mut q = self.lock();
        if q.tags.len() + tags.len() > self.capacity {
            // Dropping any of them could leave stale entries: purge everything instead.
            q.tags.clear();
            q.tags.push_back(global_tag());
            q.epoch += 1;
            tracing::error!(
                capacity = self.capacity,
                "purge queue full: it will purge the whole cache"
            );
        } else {
            q.tags.extend(tags.iter().copied());
        }
        self.pending.store(true, Ordering::Release);
        self.metrics.purge_queue_depth.set(q.tags.len() as i64);
        drop(q);
        self.wake.notify_one();
    }

    /// Try to flush the queue once; true when it is empty afterwards.
    pub async fn flush(&self) -> bool {
        if self.held.load(Ordering::Acquire) {
            return false;
        }
        let Some((batch, epoch)) = self.snapshot() else {
            return true;
        };
        if self.cache.bump(&batch).await.is_err() {
            return false;
        }
        self.flushed(&batch, epoch)
    }

    /// What a flush attempt sends: the queued tags and the queue's epoch.
    fn snapshot(&self) -> Option<(Vec<Id>, u64)> {
        let q = self.lock();
        if q.tags.is_empty() {
            return None;
        }
        Some((q.tags.iter().copied().collect(), q.epoch))
    }

    /// After `batch` was bumped: drop it from the queue; true when nothing is left.
    fn flushed(&self, batch: &[Id], epoch: u64) -> bool {
        let mut q = self.lock();
        // Tags queued while the batch was in flight stay for the next round; after a
        // collapse the queue holds the global tag instead of the batch, and it stays.
        if q.epoch == epoch {
            for _ in 0..batch.len().min(q.tags.len()) {
                q.tags.pop_front();
            }
        }
        let empty = q.tags.is_empty();
        if empty {
            self.pending.store(false, Ordering::Release);
            tracing::warn!(
                flushed = batch.len(),
                "purge queue flushed; cache reads resume"
            );
        }
        self.metrics.purge_queue_depth.set(q.tags.len() as i64);
        empty
    }

    /// Background task: retry the queue until it is empty, while `running`.
    pub async fn run(self: Arc<Self>, mut stopped: tokio::sync::watch::Receiver<bool>) {
        loop {
            if !self.pending() || self.held.load(Ordering::Acquire) {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = stopped.changed() => return,
                }
            }
            if !self.flush().await {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = stopped.changed() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::tag_id;
    use crate::cache::store::Guarded;
    use crate::cache::store::memory::MemoryStore;

    fn purger(capacity: usize) -> Purger {
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Guarded::new(
            Arc::new(MemoryStore::new(1 << 20)),
            Duration::from_millis(100),
            metrics.clone(),
        ));
        let cache = Arc::new(Cache::new(
            store,
            "t:",
            Duration::from_secs(60),
            1 << 20,
            None,
            metrics.clone(),
        ));
        Purger::new(cache, metrics, capacity)
    }

    #[tokio::test]
    async fn queue_blocks_reads_until_flushed() {
        let p = purger(10);
        p.enqueue(&[tag_id("a"), tag_id("b")]);
        assert!(p.pending());
        assert_eq!(p.depth(), 2);
        assert!(p.flush().await);
        assert!(!p.pending());
        assert_eq!(p.depth(), 0);
    }

    #[tokio::test]
    async fn a_collapse_during_a_flush_keeps_the_global_purge() {
        let p = purger(3);
        p.enqueue(&[tag_id("a"), tag_id("b")]);
        let (batch, epoch) = p.snapshot().unwrap();
        // While that batch is being bumped, another write's purge fails and overflows.
        p.enqueue(&[tag_id("c"), tag_id("d")]);
        assert!(
            !p.flushed(&batch, epoch),
            "the global tag is still to be bumped"
        );
        assert!(p.pending());
        assert_eq!(
            p.lock().tags.iter().copied().collect::<Vec<_>>(),
            vec![global_tag()]
        );
        assert!(p.flush().await);
        assert!(!p.pending());
    }

    #[tokio::test]
    async fn a_move_replays_recent_purges_and_blocks_reads_until_they_land() {
        let p = purger(100);
        let rule = p.metrics.rule("r");
        assert_eq!(
            p.purge(&[tag_id("a"), tag_id("b")], Trigger::Write, &rule)
                .await,
            Purged::Done
        );
        assert!(!p.pending());
        p.store_moving(Move::Starting);
        assert!(p.pending(), "reads bypass until the replay lands");
        assert!(!p.flush().await, "nothing is flushed while the store moves");
        p.store_moving(Move::Done);
        assert_eq!(
            p.lock().tags.iter().copied().collect::<Vec<_>>(),
            vec![tag_id("a"), tag_id("b")]
        );
        assert!(p.flush().await);
        assert!(!p.pending());
        // Too many to remember within the window: everything is purged instead.
        let many: Vec<Id> = (0..RECENT_MAX + 1)
            .map(|i| tag_id(&i.to_string()))
            .collect();
        p.remember(&many);
        p.replay_recent();
        assert_eq!(
            p.lock().tags.iter().copied().collect::<Vec<_>>(),
            vec![global_tag()]
        );
    }

    #[tokio::test]
    async fn overflow_collapses_into_a_purge_of_everything() {
        let p = purger(2);
        p.enqueue(&[tag_id("a"), tag_id("b")]);
        p.enqueue(&[tag_id("c")]);
        assert_eq!(p.depth(), 1);
        assert_eq!(p.lock().tags[0], global_tag());
    }
}
