//! Listeners, connection limits, background tasks and graceful shutdown.
//!
//! `start` binds both listeners and returns at once with their addresses (tests bind port 0);
//! `Running::shutdown` stops accepting, lets in-flight requests finish for up to
//! `[server] shutdown_grace`, then closes what is left.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::app::{App, AppError};
use crate::body::ProxyBody;
use crate::config::Config;
use crate::runtime::Workers;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    App(#[from] AppError),
}

/// A started server.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Build the application from `config` and start serving (reloads are refused: there is
/// no file to read again).
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_app(App::new(config, None)?, None).await
}

/// Bind the listeners and start serving `app`: client connections on `workers`, or on the
/// calling runtime without them.
pub async fn start_app(
    app: Arc<App>,
    workers: Option<Arc<Workers>>,
) -> Result<Running, StartError> {
    let live = app.live();
    let listen = live.config.server.listen;
    let admin_listen = live.config.server.admin_listen;
    if live.config.auth.weak_secret {
        tracing::warn!(
            "auth.allow_weak_jwt_secret: the JWT secret is shorter than 16 bytes; tokens signed with it are easier to forge"
        );
    }
    let proxy_listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let admin_listener =
        TcpListener::bind(admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: admin_listen,
                source,
            })?;
    let addr = proxy_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: admin_listen,
            source,
        })?;
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(serve_proxy(
            app.clone(),
            proxy_listener,
            workers,
            stopped.clone(),
        )),
        tokio::spawn(serve_admin(app.clone(), admin_listener, stopped.clone())),
        tokio::spawn(probe_store(app.clone(), stopped.clone())),
        tokio::spawn(app.purger.clone().run(stopped)),
    ];
    tracing::info!(%addr, %admin_addr, store = app.cache.store().kind(), "cachegate listening");
    Ok(Running {
        addr,
        admin_addr,
        app,
        stop,
        tasks,
    })
}

impl Running {
    /// Stop accepting, drain in-flight requests (bounded by the grace period), stop tasks.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The protocol builders of the client listener.
struct Builders {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

fn builders(server: &crate::config::ServerConfig) -> Builders {
    // Each connection's own watchdog enforces header_read_timeout from accept (both
    // protocols) and idle_timeout between requests; hyper's HTTP/1 head timer would also
    // cut idle keep-alive connections at header_read_timeout.
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(server.max_header_bytes);
    if server.max_header_count != DEFAULT_MAX_HEADERS {
        // A non-default count moves hyper's header parsing to the heap.
        h1.max_headers(server.max_header_count);
    }
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(server.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    Builders { h1, h2 }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Read the first bytes of a connection until they tell HTTP/2 (the whole preface) from
/// HTTP/1 (anything else). `None`: the client closed first.
async fn sniff(stream: &mut TcpStream) -> std::io::Result<Option<(bool, bytes::Bytes)>> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some((false, buf.freeze())));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some((true, buf.freeze())));
        }
    }
}

/// A client stream that first replays bytes already read from it, and tells its
/// connection's watchdog when the client stops taking what is written to it.
struct Rewind {
    pre: bytes::Bytes,
    inner: TcpStream,
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

impl Rewind {
    fn wrote<T>(
        &self,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        let blocked = &self.conn.write_blocked_since_ms;
        match &r {
            std::task::Poll::Pending => {
                if blocked.load(Ordering::Relaxed) == 0 {
                    blocked.store(self.conns.now_ms() + 1, Ordering::Relaxed);
                }
            }
            std::task::Poll::Ready(_) => {
                if blocked.load(Ordering::Relaxed) != 0 {
                    blocked.store(0, Ordering::Relaxed);
                }
            }
        }
        r
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let chunk = self.pre.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's default HTTP/1 header count.
const DEFAULT_MAX_HEADERS: usize = 100;

/// At the connection limit with every connection busy: how often to look again for one
/// gone idle.
const EVICT_RETRY: Duration = Duration::from_millis(100);

/// How long a connection told to close may take to finish what it is writing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One client connection, as the accept loop and its watchdog see it.
struct Conn {
    /// Requests whose response is not finished yet.
    in_flight: AtomicU32,
    /// Milliseconds (on the table's clock) since which nothing has been in flight.
    idle_since_ms: AtomicU64,
    /// A request head has arrived on this connection.
    served: AtomicBool,
    /// Told to close (evicted to make room).
    close: Notify,
    /// Chosen for eviction and not yet closed: never chosen twice.
    closing: AtomicBool,
    /// Milliseconds (on the table's clock, plus one) since which the client has not taken
    /// what is written to it; 0 while writes go through.
    write_blocked_since_ms: AtomicU64,
}

/// The open client connections, for the connection limit.
struct Conns {
    clock: Instant,
    next_id: AtomicU64,
    open: std::sync::Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn new() -> Conns {
        Conns {
            clock: Instant::now(),
            next_id: AtomicU64::new(0),
            open: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            served: AtomicBool::new(false),
            close: Notify::new(),
            closing: AtomicBool::new(false),
            write_blocked_since_ms: AtomicU64::new(0),
        });
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Tell the connection idle for the longest time (nothing in flight: a silent socket,
    /// a keep-alive connection between requests) to close. False when every one is busy.
    fn evict_oldest_idle(&self) -> bool {
        let open = self.lock();
        let oldest = open
            .values()
            .filter(|c| {
                c.in_flight.load(Ordering::Acquire) == 0 && !c.closing.load(Ordering::Relaxed)
            })
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Relaxed));
        match oldest {
            Some(c) => {
                c.closing.store(true, Ordering::Relaxed);
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Held while a request is in flight on a connection (moved into the response body, so it
/// ends when hyper is done with the response, or when the request is abandoned).
struct InFlight {
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

impl InFlight {
    fn enter(conn: &Arc<Conn>, conns: &Arc<Conns>) -> InFlight {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.served.store(true, Ordering::Relaxed);
        InFlight {
            conn: conn.clone(),
            conns: conns.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn
                .idle_since_ms
                .store(self.conns.now_ms(), Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it.
pub struct Tracked {
    inner: ProxyBody,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn serve_proxy(
    app: Arc<App>,
    listener: TcpListener,
    workers: Option<Arc<Workers>>,
    mut stopped: watch::Receiver<bool>,
) {
    let conns = Arc::new(Conns::new());
    // The connection limit needs a restart to change; everything else follows reloads.
    let limit = Arc::new(Semaphore::new(app.live().config.server.max_connections));
    let drained = Arc::new(Notify::new());
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: a new client gets in by closing the connection idle the longest
                // (silent sockets first of all); while every one is busy it waits, and
                // looks again for one gone idle every EVICT_RETRY.
                let mut got = None;
                while got.is_none() {
                    conns.evict_oldest_idle();
                    tokio::select! {
                        p = limit.clone().acquire_owned() => match p {
                            Ok(p) => got = Some(p),
                            Err(_) => break,
                        },
                        _ = tokio::time::sleep(EVICT_RETRY) => {}
                        _ = stopped.changed() => break,
                    }
                }
                match got {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (id, conn) = conns.add();
        let metrics = app.metrics.clone();
        metrics.connections.inc();
        let (app, conns, stopped, drained) =
            (app.clone(), conns.clone(), stopped.clone(), drained.clone());
        let serve = move |stream: std::io::Result<TcpStream>| async move {
            if let Ok(stream) = stream {
                serve_connection(app, stream, peer, &conn, &conns, stopped).await;
            }
            conns.remove(id);
            metrics.connections.dec();
            drop(permit);
            drained.notify_waiters();
        };
        match &workers {
            None => {
                tokio::spawn(serve(Ok(stream)));
            }
            Some(workers) => {
                // The socket moves to the worker's own event loop.
                let stream = stream.into_std();
                workers.place(move |placed| async move {
                    serve(stream.and_then(TcpStream::from_std)).await;
                    drop(placed);
                });
            }
        }
    }
    drop(listener);
    let grace = app.live().config.server.shutdown_grace;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    let all_closed = async {
        loop {
            let wait = drained.notified();
            if conns.lock().is_empty() {
                return;
            }
            wait.await;
        }
    };
    if tokio::time::timeout(grace, all_closed).await.is_err() {
        tracing::warn!("shutdown grace period over; closing remaining connections");
        for c in conns.lock().values() {
            c.close.notify_one();
        }
    }
}

/// Serve one client connection: tell the protocol, then serve it under its time limits.
async fn serve_connection(
    app: Arc<App>,
    mut stream: TcpStream,
    peer: SocketAddr,
    conn: &Arc<Conn>,
    conns: &Arc<Conns>,
    mut stopped: watch::Receiver<bool>,
) {
    // A connection keeps the limits that were live when it was accepted.
    let server = app.live().config.server.clone();
    let builders = builders(&server);
    // The protocol is told within the same header_read_timeout as the first request head:
    // a silent socket, or one that sends half of the HTTP/2 preface, is closed on time.
    let sniffed = tokio::select! {
        r = tokio::time::timeout(server.header_read_timeout, sniff(&mut stream)) => r,
        _ = conn.close.notified() => return,
        _ = stopped.changed() => return,
    };
    let Ok(Ok(Some((h2, pre)))) = sniffed else {
        return;
    };
    let io = TokioIo::new(Rewind {
        pre,
        inner: stream,
        conn: conn.clone(),
        conns: conns.clone(),
    });
    let (conn_c, conns_c) = (conn.clone(), conns.clone());
    let service = service_fn(move |req| {
        let guard = InFlight::enter(&conn_c, &conns_c);
        let app = app.clone();
        async move {
            let resp = crate::proxy::handle(&app, req, peer).await;
            Ok::<_, std::convert::Infallible>(resp.map(|inner| Tracked {
                inner,
                _guard: guard,
            }))
        }
    });
    if h2 {
        let served = builders.h2.serve_connection(io, service);
        watch_connection(
            served,
            |c| c.graceful_shutdown(),
            conn,
            conns,
            &server,
            stopped,
        )
        .await;
    } else {
        let served = builders.h1.serve_connection(io, service);
        watch_connection(
            served,
            |c| c.graceful_shutdown(),
            conn,
            conns,
            &server,
            stopped,
        )
        .await;
    }
}

/// Serve one connection to its end, closing it when it breaks a time limit: no complete
/// first request head within `header_read_timeout` of accept, nothing in flight for
/// `idle_timeout` after that, a client that takes none of its response for `idle_timeout`,
/// an eviction, or the server stopping (after in-flight requests finish).
async fn watch_connection<C: std::future::Future>(
    served: C,
    graceful: impl Fn(std::pin::Pin<&mut C>),
    conn: &Conn,
    conns: &Conns,
    server: &crate::config::ServerConfig,
    mut stopped: watch::Receiver<bool>,
) {
    tokio::pin!(served);
    // Nothing has been in flight since accept.
    let accepted = conn.idle_since_ms.load(Ordering::Relaxed);
    let mut stopping = false;
    // One timer for the connection's life, moved only when it fires: requests starting and
    // finishing touch two atomics, never the timer wheel.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            _ = served.as_mut() => return,
            _ = timer.as_mut() => {
                // When the connection may close: `idle_timeout` after the last request
                // finished, or `header_read_timeout` after accept while none has come;
                // while a request is in flight, only a client that has taken nothing of its
                // response for `idle_timeout` is closed.
                let now = conns.now_ms();
                let deadline_ms = if conn.in_flight.load(Ordering::Acquire) > 0 {
                    match conn.write_blocked_since_ms.load(Ordering::Relaxed) {
                        0 => None,
                        since => Some(since - 1 + server.idle_timeout.as_millis() as u64),
                    }
                } else {
                    let limit = if conn.served.load(Ordering::Relaxed) {
                        server.idle_timeout
                    } else {
                        server.header_read_timeout
                    };
                    let since = conn.idle_since_ms.load(Ordering::Relaxed).max(accepted);
                    Some(since + limit.as_millis() as u64)
                };
                if deadline_ms.is_some_and(|d| now >= d) {
                    break;
                }
                // Looked at again at least twice per idle_timeout: a request that is in
                // flight now may finish, and its connection's idle clock start, meanwhile.
                let recheck = server.idle_timeout / 2;
                let wait = match deadline_ms {
                    Some(d) => Duration::from_millis(d - now).min(recheck),
                    None => recheck,
                };
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            _ = conn.close.notified() => {
                if conn.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                // A request arrived after it was chosen: it stays, someone else goes.
                conn.closing.store(false, Ordering::Relaxed);
            }
            _ = stopped.changed(), if !stopping => {
                // Stop taking requests; in-flight ones finish (the server bounds the wait).
                stopping = true;
                graceful(served.as_mut());
            }
        }
    }
    graceful(served.as_mut());
    let _ = tokio::time::timeout(CLOSE_GRACE, served).await;
}

async fn serve_admin(app: Arc<App>, listener: TcpListener, mut stopped: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let limiter = Arc::new(crate::admin::Limiter::default());
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let app = app.clone();
        let limiter = limiter.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            let limiter = limiter.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    crate::admin::handle(app, &limiter, req, peer).await,
                )
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

/// Probe the store every second: drives readiness and closes the breaker once it answers.
async fn probe_store(app: Arc<App>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => break,
        }
        let up = app.cache.store().probe().await;
        app.metrics.store_up.set(up as i64);
    }
}
