//! Response bodies: the boxed type handed to hyper, an idle timeout for upstream bodies, and
//! the tee that streams a miss to the client while keeping a bounded copy for the store.
//!
//! Nothing here buffers without a cap: the tee drops its copy (and stops copying) as soon as
//! the body passes `max_object_size`, and the client keeps streaming.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

/// Error type of every body cachegate produces.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response cachegate sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The error an upstream body reports when it goes quiet for longer than the timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream body stalled for longer than the upstream timeout")]
pub struct BodyStalled;

/// Fails a body that produces no frame for `timeout`, so a stalled upstream (or client)
/// cannot pin a connection (and a cache fill) forever. It can record its progress.
pub struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    /// Made the first time the body has to wait: a body that is there when read (a small
    /// answer in one packet) never touches the timer wheel.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Waiting since the timer was last armed (no frame came since): the clock runs only
    /// while the body is being waited for, from the poll that found nothing.
    waiting: bool,
    progress: Option<Arc<Progress>>,
    stalled: fn() -> BoxError,
}

impl<B> IdleTimeout<B> {
    /// An upstream response body: fails with `BodyStalled`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        IdleTimeout {
            inner,
            timeout,
            sleep: None,
            waiting: false,
            progress: None,
            stalled: || Box::new(BodyStalled),
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(p) = &this.progress {
                    p.touch();
                }
                this.waiting = false;
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = match &mut this.sleep {
                    Some(s) => {
                        if !this.waiting {
                            s.as_mut().reset(Instant::now() + timeout);
                        }
                        s
                    }
                    None => this.sleep.insert(Box::pin(tokio::time::sleep(timeout))),
                };
                this.waiting = true;
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Some(Err((this.stalled)())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a client's request body reports when the client goes quiet for longer than
/// `[server] body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body stalled for longer than the body read timeout")]
pub struct ClientBodyStalled;

/// When a request body last moved, shared between the body (which records it) and the
/// upstream call (which only times out after that long without progress).
#[derive(Debug)]
pub struct Progress {
    base: std::time::Instant,
    /// Nanoseconds after `base` of the last frame (or of the start).
    last_ns: std::sync::atomic::AtomicU64,
}

impl Progress {
    fn new() -> Arc<Progress> {
        Arc::new(Progress {
            base: std::time::Instant::now(),
            last_ns: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ns = self.base.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last_ns.store(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// The last moment the body moved.
    pub fn last(&self) -> std::time::Instant {
        self.base + Duration::from_nanos(self.last_ns.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// A request body on its way upstream, with its progress handle (`None`: no body).
pub struct Upload {
    body: BoxBody<Bytes, BoxError>,
    progress: Option<Arc<Progress>>,
}

impl Upload {
    /// A body that is already complete (nothing to wait for).
    pub fn none(body: BoxBody<Bytes, BoxError>) -> Upload {
        Upload {
            body,
            progress: None,
        }
    }

    /// A client's body: fails if no frame arrives for `timeout`, and records its progress.
    pub fn new<B>(inner: B, timeout: Duration) -> Upload
    where
        B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let progress = Progress::new();
        let body = IdleTimeout {
            inner,
            timeout,
            sleep: None,
            waiting: false,
            progress: Some(progress.clone()),
            stalled: || Box::new(ClientBodyStalled),
        };
        Upload {
            body: body.boxed(),
            progress: Some(progress),
        }
    }

    pub fn into_parts(self) -> (BoxBody<Bytes, BoxError>, Option<Arc<Progress>>) {
        (self.body, self.progress)
    }
}

/// Called once with the complete body when a tee finishes within its limit.
pub type OnComplete = Box<dyn FnOnce(Bytes) + Send + Sync>;

/// Streams `inner` to the client and hands a copy (at most `limit` bytes) to `on_complete`
/// when the body ends. Past the limit, on an error, or if the client goes away first, the
/// copy is dropped and `on_complete` is never called (dropping it releases its waiters).
///
/// The copy is handed over before the last data frame is released to the client, so a
/// client that reads its response and asks again finds the fill already finished.
pub struct Tee<B> {
    inner: B,
    copy: Vec<Bytes>,
    copied: usize,
    limit: usize,
    on_complete: Option<OnComplete>,
}

impl<B: Body> Tee<B> {
    pub fn new(inner: B, limit: usize, on_complete: OnComplete) -> Self {
        let mut tee = Tee {
            inner,
            copy: Vec::new(),
            copied: 0,
            limit,
            on_complete: Some(on_complete),
        };
        // An empty body (a 204, Content-Length: 0) is never polled: it is complete now.
        if tee.inner.is_end_stream() {
            tee.finish();
        }
        tee
    }

    fn finish(&mut self) {
        if let Some(done) = self.on_complete.take() {
            let parts = std::mem::take(&mut self.copy);
            done(concat(parts, self.copied));
        }
    }

    fn abandon(&mut self) {
        self.on_complete = None;
        self.copy = Vec::new();
    }
}

/// Join chunks into one buffer (no copy for a single chunk).
pub fn concat(mut parts: Vec<Bytes>, len: usize) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(len);
            for p in parts {
                buf.extend_from_slice(&p);
            }
            buf.freeze()
        }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if this.on_complete.is_some()
                    && let Some(data) = frame.data_ref()
                {
                    this.copied += data.len();
                    if this.copied > this.limit {
                        this.abandon();
                    } else {
                        this.copy.push(data.clone());
                    }
                }
                // Trailers end the body: hyper stops polling after them.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.abandon();
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.finish();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The first bytes of a body, read to inspect it (login capture).
pub struct Prefix {
    chunks: Vec<Bytes>,
    len: usize,
    /// The whole body fit within the limit.
    done: bool,
}

impl Prefix {
    /// The whole body, when it fit within the limit.
    pub fn complete(&self) -> Option<Bytes> {
        self.done.then(|| concat(self.chunks.clone(), self.len))
    }

    /// The body to send on: what was read, then the rest.
    pub fn into_body<B>(self, rest: B) -> ProxyBody
    where
        B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + Sync + 'static,
    {
        Prefixed {
            head: self.chunks.into(),
            rest: if self.done { None } else { Some(rest) },
        }
        .boxed()
    }
}

/// Read up to `limit` bytes of a body (more only if one frame crosses the limit).
pub async fn read_prefix<B>(mut body: B, limit: usize) -> Result<(Prefix, B), BoxError>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let mut prefix = Prefix {
        chunks: Vec::new(),
        len: 0,
        done: false,
    };
    while prefix.len <= limit {
        match body.frame().await {
            None => {
                prefix.done = true;
                break;
            }
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    prefix.len += data.len();
                    prefix.chunks.push(data);
                }
            }
        }
    }
    if prefix.len > limit {
        prefix.done = false;
    }
    Ok((prefix, body))
}

struct Prefixed<B> {
    head: std::collections::VecDeque<Bytes>,
    rest: Option<B>,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}

/// Read a whole body with no client attached, up to `limit` bytes (background fills).
/// `Ok(None)` when the body is larger than the limit.
pub async fn collect_limited<B>(mut body: B, limit: usize) -> Result<Option<Bytes>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut parts = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Ok(data) = frame.into_data() {
            len += data.len();
            if len > limit {
                return Ok(None);
            }
            parts.push(data);
        }
    }
    Ok(Some(concat(parts, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// A body that yields the given chunks one frame at a time.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
        // Like hyper's Incoming with a Content-Length: ended once nothing is left.
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        Chunks(parts.iter().map(|p| Bytes::from_static(p)).collect())
    }

    #[tokio::test]
    async fn tee_hands_over_the_whole_body_within_the_limit() {
        let got = Arc::new(Mutex::new(None));
        let sink = got.clone();
        let tee = Tee::new(
            chunks(&[b"ab", b"cd"]),
            10,
            Box::new(move |b| *sink.lock().unwrap() = Some(b)),
        );
        let out = tee.collect().await.unwrap().to_bytes();
        assert_eq!(out, "abcd");
        assert_eq!(got.lock().unwrap().as_deref(), Some(&b"abcd"[..]));
    }

    #[tokio::test]
    async fn an_empty_body_completes_at_once() {
        let got = Arc::new(Mutex::new(None));
        let sink = got.clone();
        let _tee = Tee::new(
            chunks(&[]),
            10,
            Box::new(move |b| *sink.lock().unwrap() = Some(b)),
        );
        assert_eq!(got.lock().unwrap().as_deref(), Some(&b""[..]));
    }

    #[tokio::test]
    async fn tee_streams_but_drops_its_copy_past_the_limit() {
        let got = Arc::new(Mutex::new(None));
        let sink = got.clone();
        let tee = Tee::new(
            chunks(&[b"abc", b"def"]),
            4,
            Box::new(move |b| *sink.lock().unwrap() = Some(b)),
        );
        let out = tee.collect().await.unwrap().to_bytes();
        assert_eq!(out, "abcdef", "the client still gets everything");
        assert!(got.lock().unwrap().is_none(), "nothing stored");
    }
}
