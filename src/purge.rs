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
        }
    }

    /// The purge epoch: how many purges this process has started.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
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
            if !self.pending() {
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
    async fn overflow_collapses_into_a_purge_of_everything() {
        let p = purger(2);
        p.enqueue(&[tag_id("a"), tag_id("b")]);
        p.enqueue(&[tag_id("c")]);
        assert_eq!(p.depth(), 1);
        assert_eq!(p.lock().tags[0], global_tag());
    }
}
