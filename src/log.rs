//! The log writer: lines are appended to a buffer of the thread that logs them and written
//! to stdout by one writer thread, in batches.
//!
//! A request pays for formatting its line and one uncontended lock of its own thread's
//! buffer: no system call, no wake-up of another thread per line, and never a wait on the
//! terminal, a pipe or the journal. The writer thread is woken when a buffer goes from
//! empty to non-empty, lets lines gather for `BATCH`, then writes each buffer whole. Lines
//! of one thread stay in order; lines of different threads interleave by batch (each
//! carries its own timestamp).
//!
//! Nothing is dropped: a thread whose buffer passes `BEHIND` (stdout is not keeping up)
//! writes its buffer itself, waiting on stdout, which slows that thread rather than losing
//! lines or growing without bound. `Guard` writes whatever is left when it is dropped.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How long lines gather before a batch is written.
const BATCH: Duration = Duration::from_millis(20);
/// A thread's unwritten lines past which it writes them itself.
const BEHIND: usize = 4 << 20;

struct Shared {
    /// Every thread's buffer.
    buffers: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
    /// Some buffer has lines the writer has not taken yet.
    pending: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<()>,
    stop: AtomicBool,
}

static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

thread_local! {
    static BUFFER: Arc<Mutex<Vec<u8>>> = {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        if let Some(shared) = SHARED.get() {
            lock(&shared.buffers).push(buffer.clone());
        }
        buffer
    };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes what is left when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _l = lock(&self.shared.wake_lock);
            self.shared.wake.notify_one();
        }
        match self.thread.take() {
            Some(t) => {
                let _ = t.join();
            }
            None => drain(&self.shared),
        }
    }
}

/// The `MakeWriter` of the log subscriber: each line goes to the calling thread's buffer.
#[derive(Clone, Copy)]
pub struct Lines;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Lines;

    fn make_writer(&'a self) -> Lines {
        Lines
    }
}

impl Write for Lines {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let Some(shared) = SHARED.get() else {
            return std::io::stdout().lock().write(line);
        };
        let behind = BUFFER.with(|b| {
            let mut buf = lock(b);
            buf.extend_from_slice(line);
            (buf.len() > BEHIND).then(|| std::mem::take(&mut *buf))
        });
        if let Some(lines) = behind {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&lines);
            let _ = out.flush();
        } else if !shared.pending.load(Ordering::Relaxed)
            && !shared.pending.swap(true, Ordering::AcqRel)
        {
            let _l = lock(&shared.wake_lock);
            shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Start the writer thread (once per process; later calls get a guard that only drains).
pub fn start() -> Guard {
    let mut first = false;
    let shared = SHARED
        .get_or_init(|| {
            first = true;
            Arc::new(Shared {
                buffers: Mutex::new(Vec::new()),
                pending: AtomicBool::new(false),
                wake: Condvar::new(),
                wake_lock: Mutex::new(()),
                stop: AtomicBool::new(false),
            })
        })
        .clone();
    let thread = first
        .then(|| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("cachegate-log".into())
                .spawn(move || run(&shared))
                .ok()
        })
        .flatten();
    Guard { shared, thread }
}

fn run(shared: &Shared) {
    loop {
        {
            let mut l = lock(&shared.wake_lock);
            while !shared.pending.load(Ordering::Acquire) && !shared.stop.load(Ordering::Acquire) {
                l = shared.wake.wait(l).unwrap_or_else(|p| p.into_inner());
            }
            if !shared.stop.load(Ordering::Acquire) {
                // Let the batch gather (a stop request cuts the wait short).
                let _ = shared.wake.wait_timeout(l, BATCH);
            }
        }
        shared.pending.store(false, Ordering::Release);
        drain(shared);
        if shared.stop.load(Ordering::Acquire) {
            drain(shared);
            return;
        }
    }
}

/// Write out every buffer; forget the buffers of threads that have ended.
fn drain(shared: &Shared) {
    let buffers: Vec<_> = {
        let mut all = lock(&shared.buffers);
        // A buffer only the list still holds belongs to a thread that ended.
        all.retain(|b| Arc::strong_count(b) > 1 || !lock(b).is_empty());
        all.clone()
    };
    let mut out = std::io::stdout().lock();
    for b in buffers {
        let lines = std::mem::take(&mut *lock(&b));
        if !lines.is_empty() {
            let _ = out.write_all(&lines);
        }
    }
    let _ = out.flush();
}

/// The text format of a log line, the same as `tracing_subscriber`'s default without ANSI
/// colours (`2026-01-02T03:04:05.123456Z  INFO message key=value key="text"`), written
/// without going through `fmt::Debug` for the common field types, and with the timestamp's
/// date and time of day formatted once per second per thread.
pub struct Text;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Text
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        timestamp(&mut writer)?;
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "ERROR ",
            tracing::Level::WARN => " WARN ",
            tracing::Level::INFO => " INFO ",
            tracing::Level::DEBUG => "DEBUG ",
            tracing::Level::TRACE => "TRACE ",
        };
        writer.write_str(level)?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{{{fields}}}")?;
                }
                writer.write_str(": ")?;
            }
        }
        let mut visitor = Fields {
            out: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.result?;
        writer.write_char('\n')
    }
}

/// Writes `2026-01-02T03:04:05.123456Z ` for now.
fn timestamp(w: &mut impl std::fmt::Write) -> std::fmt::Result {
    use std::cell::RefCell;
    use std::fmt::Write as _;
    thread_local! {
        /// The second last formatted, and its `YYYY-MM-DDTHH:MM:SS.` text.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|s| {
        let mut s = s.borrow_mut();
        if s.0 != secs {
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let t = secs % 86_400;
            s.1.clear();
            let _ = write!(
                s.1,
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.",
                t / 3600,
                t % 3600 / 60,
                t % 60
            );
            s.0 = secs;
        }
        w.write_str(&s.1)
    })?;
    let micros = now.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut m = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    w.write_str(std::str::from_utf8(&digits).unwrap_or("000000"))?;
    w.write_str("Z ")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Writes an event's fields: the message as is, the others as ` key=value`, strings quoted
/// and escaped as `Debug` does.
struct Fields<'w, W> {
    out: &'w mut W,
    first: bool,
    result: std::fmt::Result,
}

impl<W: std::fmt::Write> Fields<'_, W> {
    fn key(&mut self, field: &tracing::field::Field) -> std::fmt::Result {
        if !self.first {
            self.out.write_char(' ')?;
        }
        self.first = false;
        if field.name() != "message" {
            self.out.write_str(field.name())?;
            self.out.write_char('=')?;
        }
        Ok(())
    }

    fn put(
        &mut self,
        field: &tracing::field::Field,
        value: impl FnOnce(&mut W) -> std::fmt::Result,
    ) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.out));
        }
    }
}

impl<W: std::fmt::Write> tracing::field::Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let plain = value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        if field.name() == "message" {
            self.put(field, |w| w.write_str(value));
        } else if plain {
            self.put(field, |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            self.put(field, |w| write!(w, "{value:?}"));
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if value.is_finite() {
            self.put(field, |w| {
                w.write_str(ryu::Buffer::new().format_finite(value))
            });
        } else {
            self.put(field, |w| write!(w, "{value:?}"));
        }
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field, |w| write!(w, "{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2000-02-29 (a leap day of a century leap year) and 2026-12-02.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_789), (2026, 12, 2));
    }

    #[test]
    fn timestamps_are_rfc3339_with_micros() {
        let mut s = String::new();
        timestamp(&mut s).unwrap();
        // 2026-12-02T07:55:49.301946Z and a space
        assert_eq!(s.len(), 28, "{s}");
        assert!(s.ends_with("Z "), "{s}");
        assert_eq!(&s[10..11], "T");
    }

    /// One event through `format`, the part after the timestamp.
    fn render(ours: bool) -> String {
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_target(false)
            .with_writer(move || out.clone());
        let event = || {
            tracing::info!(
                method = %http::Method::GET,
                path = "/a b",
                status = 200u16,
                delta = -3i64,
                ok = true,
                quoted = "say \"hi\"\n",
                ms = 0.25f64,
                "request"
            );
            tracing::warn!(error = "x", "store failed");
        };
        if ours {
            let s = tracing_subscriber::registry().with(layer.event_format(Text));
            tracing::subscriber::with_default(s, event);
        } else {
            let s = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(s, event);
        }
        let text = String::from_utf8(lock(&buf.0).clone()).unwrap();
        text.lines()
            .map(|l| l.split_once("Z ").unwrap().1.to_owned() + "\n")
            .collect()
    }

    #[test]
    fn lines_are_those_of_the_default_format() {
        let ours = render(true);
        assert_eq!(ours, render(false));
        assert_eq!(
            ours,
            " INFO request method=GET path=\"/a b\" status=200 delta=-3 ok=true quoted=\"say \\\"hi\\\"\\n\" ms=0.25\n WARN store failed error=\"x\"\n"
        );
    }
}
