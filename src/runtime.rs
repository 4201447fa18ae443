//! The worker threads that serve client connections.
//!
//! Like nginx's worker processes, each worker is one thread running its own single-threaded
//! tokio runtime: a connection, once accepted, lives on one worker, and everything a
//! request on it does (parsing, the cache lookup, the upstream and Redis exchanges on that
//! worker's own pooled connections, writing the answer) happens on that thread, with no
//! hand-off between threads and no work-stealing wake-ups. The accept loop and the
//! background tasks (admin API, purge queue, store probe, reloads) run on the main runtime
//! and give each new connection to the worker serving the fewest.
//!
//! Code that keeps per-thread resources (the upstream client pool, the Redis connections)
//! asks `slot()` which one to use: 0 off the workers, `1..=n` on them.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// How many workers the process runs (set once, by `Workers::start`).
static WORKERS: OnceLock<usize> = OnceLock::new();

/// The per-thread resource slot of the calling thread: 0 off the workers, `1..=n` on them.
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// How many per-thread slots resources keep: one for the main runtime plus one per worker.
pub fn slots() -> usize {
    1 + WORKERS.get().copied().unwrap_or(0)
}

/// One worker: its runtime and the connections it serves.
struct Worker {
    handle: tokio::runtime::Handle,
    connections: AtomicUsize,
}

/// The worker threads.
pub struct Workers {
    workers: Vec<Worker>,
}

/// A connection counted on its worker until dropped.
pub struct Placed {
    workers: Arc<Workers>,
    index: usize,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.workers.workers[self.index]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Start `n` workers (at least one). Only the first pool of a process sets `slots()`.
    pub fn start(n: usize) -> std::io::Result<Arc<Workers>> {
        let n = n.max(1);
        let _ = WORKERS.set(n);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("cachegate-w{i}"))
                .spawn(move || {
                    SLOT.with(|s| s.set(i + 1));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    // Runs until the process exits; connection tasks are spawned onto it.
                    rt.block_on(std::future::pending::<()>());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread failed to start"))??;
            workers.push(Worker {
                handle,
                connections: AtomicUsize::new(0),
            });
        }
        Ok(Arc::new(Workers { workers }))
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Run a new connection's task on the worker serving the fewest connections.
    pub fn place<F>(self: &Arc<Self>, task: impl FnOnce(Placed) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let index = (0..self.workers.len())
            .min_by_key(|&i| self.workers[i].connections.load(Ordering::Relaxed))
            .unwrap_or(0);
        let worker = &self.workers[index];
        worker.connections.fetch_add(1, Ordering::Relaxed);
        let placed = Placed {
            workers: self.clone(),
            index,
        };
        worker.handle.spawn(task(placed));
    }
}
