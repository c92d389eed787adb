//! The process's log: set up as configured (text or JSON, the level for this crate), written to
//! standard error — one `write` per line, except on a thread that holds a [`Batch`].
//!
//! The engine holds one for each turn of its loop: at info it logs a line for every tracked
//! webhook, and a write to standard error per line cost it nearly as much as formatting the line
//! (a system call on the one task every webhook passes through). Lines logged while a batch is
//! held are kept in a buffer of the thread's and written together when the batch ends, or
//! sooner once [`BATCH_BYTES`] are waiting. Nothing else changes: each line keeps the time it
//! was logged at, and the lines of other threads are written as they come.
//!
//! A line reads as tracing-subscriber's full format writes it; two of its parts are written here
//! with less work per line, as that line is on the hot path: the timestamp ([`Clock`]: the date
//! and time of day formatted once a second) and, without ANSI colours, the fields ([`Fields`]).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Write as _};
use std::marker::PhantomData;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;

use crate::config::{LogFormat, Logging};

/// Written out before a batch grows past this, and what its buffer keeps between batches.
const BATCH_BYTES: usize = 64 * 1024;

/// Sets the global subscriber: `warn` for other crates, the configured level for this one.
pub fn init(logging: &Logging) {
    let filter = tracing_subscriber::EnvFilter::new(format!("warn,rtc_leave_bridge={}", logging.level));
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(Stderr).with_ansi(ansi).with_timer(Clock);
    match logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.fmt_fields(Fields).init(),
    }
    write_held_lines_before_a_panic();
}

/// A panic's message is written after the lines its thread logged before it, not ahead of
/// lines its batch still holds (they would be written out only while unwinding).
fn write_held_lines_before_a_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        write_out_held();
        report(info);
    }));
}

/// Writes out what this thread holds, if it is not in the middle of holding a line.
fn write_out_held() {
    let _ = HELD.try_with(|held| {
        if let Ok(mut held) = held.try_borrow_mut() {
            held.write_out();
        }
    });
}

#[derive(Default)]
struct Held {
    /// Batches open on this thread.
    depth: usize,
    lines: Vec<u8>,
    /// In unit tests, what would have been written out.
    #[cfg(test)]
    written: Vec<u8>,
}

thread_local! {
    static HELD: RefCell<Held> = RefCell::new(Held::default());
}

/// While one is alive, the lines this thread logs are written together when it is dropped.
/// Not `Send`: it must end on the thread it began on (hold none across an `.await`).
#[must_use = "the lines are held only while the batch is alive"]
pub struct Batch {
    _this_thread: PhantomData<*const ()>,
}

impl Batch {
    pub fn start() -> Batch {
        HELD.with_borrow_mut(|held| held.depth += 1);
        Batch { _this_thread: PhantomData }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        HELD.with_borrow_mut(|held| {
            held.depth -= 1;
            if held.depth == 0 {
                held.write_out();
                if held.lines.capacity() > BATCH_BYTES {
                    held.lines = Vec::new();
                }
            }
        });
    }
}

impl Held {
    /// Writes what is held to standard error and empties it; a failed write is dropped, as the
    /// subscriber drops it for a line written directly.
    fn write_out(&mut self) {
        if self.lines.is_empty() {
            return;
        }
        #[cfg(test)]
        self.written.extend_from_slice(&self.lines);
        #[cfg(not(test))]
        let _ = io::stderr().write_all(&self.lines);
        self.lines.clear();
    }
}

/// The subscriber's writer: standard error, by way of the thread's [`Batch`] if it holds one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One line on its way (the subscriber formats a line, then writes it with one `write_all`).
pub struct Line;

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let held = HELD.with_borrow_mut(|held| {
            if held.depth == 0 {
                return false;
            }
            held.lines.extend_from_slice(buf);
            if held.lines.len() >= BATCH_BYTES {
                held.write_out();
            }
            true
        });
        if held { Ok(()) } else { io::stderr().write_all(buf) }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The time as tracing-subscriber's `SystemTime` timer writes it (RFC 3339, UTC, microseconds:
/// `2026-12-07T06:30:00.123456Z`), the part up to the second formatted once a second per thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock;

thread_local! {
    /// The second last formatted on this thread, and its text up to the second.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

impl FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now();
        let Some(since) = now.duration_since(UNIX_EPOCH).ok().filter(|d| d.as_secs() < LAST_FOUR_DIGIT_YEAR) else {
            // Beyond four-digit years: as the timer we stand in for writes it.
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        };
        let secs = since.as_secs();
        let (cached, mut text) = SECOND.get();
        if cached != secs {
            text = to_the_second(secs);
            SECOND.set((secs, text));
        }
        let mut micros = *b".000000Z";
        let mut n = since.subsec_micros();
        for digit in micros[1..7].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        // ASCII digits and separators only.
        w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)?;
        w.write_str(std::str::from_utf8(&micros).map_err(|_| fmt::Error)?)
    }
}

/// 10000-01-01T00:00:00Z, in seconds since the Unix epoch.
const LAST_FOUR_DIGIT_YEAR: u64 = 253_402_300_800;

/// `YYYY-MM-DDTHH:MM:SS` for `secs` since the Unix epoch (before year 10000), by the proleptic
/// Gregorian calendar (days to a civil date as in Howard Hinnant's `civil_from_days`).
fn to_the_second(secs: u64) -> [u8; 19] {
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let of_era = z % 146_097;
    let year_of_era = (of_era - of_era / 1_460 + of_era / 36_524 - of_era / 146_096) / 365;
    let of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * of_year + 2) / 153; // the month, from March
    let day = of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for digit in text[at..at + width].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3_600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    text
}

/// Fields as tracing-subscriber's default field formatter writes them without ANSI colours —
/// `name=value` by the value's `Debug`, a space between two — but not through the styling
/// wrappers it puts around every name and `=` (a third of what a line's fields cost). With ANSI
/// colours on, and for a message or an error, that formatter writes the field itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields;

impl<'a> MakeVisitor<Writer<'a>> for Fields {
    type Visitor = FieldsVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> FieldsVisitor<'a> {
        FieldsVisitor { writer, is_empty: true, result: Ok(()) }
    }
}

/// What [`Fields`] writes one line's (or one span's) fields with.
pub struct FieldsVisitor<'a> {
    writer: Writer<'a>,
    /// Whether no field has been written yet (none is preceded by a space).
    is_empty: bool,
    result: fmt::Result,
}

impl FieldsVisitor<'_> {
    /// Has tracing-subscriber's own visitor write one field.
    fn theirs(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        self.is_empty = false;
    }
}

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" || self.writer.has_ansi_escapes() {
            return self.theirs(|v| v.record_str(field, value));
        }
        self.record_debug(field, &value)
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.theirs(|v| v.record_error(field, value))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // Metadata of a `log` record, written elsewhere in the line (as the default formatter
        // skips it).
        if name.starts_with("log.") {
            return;
        }
        if name == "message" || self.writer.has_ansi_escapes() {
            return self.theirs(|v| v.record_debug(field, value));
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let w = &mut self.writer;
        let separator = if std::mem::take(&mut self.is_empty) { "" } else { " " };
        self.result = (|| {
            w.write_str(separator)?;
            w.write_str(name)?;
            w.write_char('=')?;
            write!(w, "{value:?}")
        })();
    }
}

impl VisitOutput<fmt::Result> for FieldsVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for FieldsVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this thread holds, and what it has written out since the last call.
    fn seen() -> (Vec<u8>, Vec<u8>) {
        HELD.with_borrow_mut(|held| (held.lines.clone(), std::mem::take(&mut held.written)))
    }

    #[test]
    fn lines_are_held_while_a_batch_is_open_and_written_together_when_it_ends() {
        {
            let _outer = Batch::start();
            Line.write_all(b"one\n").unwrap();
            {
                let _inner = Batch::start();
                Line.write_all(b"two\n").unwrap();
            }
            // The inner batch ending writes nothing: the outer one still holds the lines.
            assert_eq!(seen(), (b"one\ntwo\n".to_vec(), Vec::new()));
            // Another thread's lines are its own.
            std::thread::spawn(|| {
                let _batch = Batch::start();
                Line.write_all(b"elsewhere\n").unwrap();
                assert_eq!(seen(), (b"elsewhere\n".to_vec(), Vec::new()));
            })
            .join()
            .unwrap();
            assert_eq!(seen(), (b"one\ntwo\n".to_vec(), Vec::new()));
        }
        assert_eq!(seen(), (Vec::new(), b"one\ntwo\n".to_vec()), "written out, in order, once the last batch ended");
    }

    #[test]
    fn a_panic_finds_the_lines_before_it_written_out() {
        let _batch = Batch::start();
        Line.write_all(b"before the panic\n").unwrap();
        // What the panic hook does before the panic's message is written.
        write_out_held();
        assert_eq!(seen(), (Vec::new(), b"before the panic\n".to_vec()));
    }

    #[test]
    fn the_clock_writes_the_time_as_tracing_subscribers_timer_does() {
        let write = |timer: &dyn FormatTime| {
            let mut text = String::new();
            timer.format_time(&mut Writer::new(&mut text)).unwrap();
            text
        };
        // The two may fall either side of a second: then again.
        for _ in 0..3 {
            let (theirs, ours, again) =
                (write(&tracing_subscriber::fmt::time::SystemTime), write(&Clock), write(&Clock));
            assert_eq!(ours.len(), theirs.len(), "{ours} against {theirs}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            assert!(ours[20..26].bytes().all(|b| b.is_ascii_digit()), "{ours}");
            if ours[..19] == theirs[..19] && again[..19] == ours[..19] {
                return;
            }
        }
        panic!("the clock's date and time of day differ from tracing-subscriber's");
    }

    #[test]
    fn seconds_become_the_civil_date_and_time_of_day() {
        for (secs, expected) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_164_800, "2024-02-29T00:00:00"),
            (1_796_601_599, "2026-12-06T23:59:59"),
            (1_796_601_600, "2026-12-07T00:00:00"),
            (4_102_444_799, "2099-12-31T23:59:59"),
            (LAST_FOUR_DIGIT_YEAR - 1, "9999-12-31T23:59:59"),
        ] {
            assert_eq!(std::str::from_utf8(&to_the_second(secs)).unwrap(), expected, "{secs}");
        }
    }

    /// Lines formatted by a subscriber like the process's, with `fields` as its field formatter.
    fn lines_with<N>(fields: N, log: impl FnOnce()) -> String
    where
        N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn fields_are_written_as_tracing_subscribers_default_formatter_writes_them() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer \"failure\"")]
        struct Outer(#[source] std::io::Error);
        let log = || {
            let id = "PA_\"quoted\"\n";
            let span = tracing::info_span!("call", job = %"0011aabb", identity = id, n = 3);
            let _entered = span.enter();
            tracing::info!(job = %"a1b2", room = %"!r:hs", identity = "x=\"y\"", sid = "", n = 42u64, ok = true,
                r#type = "t", list = ?vec!["a", "b"], "a \"message\" with {}", "arguments");
            tracing::warn!(error = &Outer(std::io::Error::other("inner")) as &dyn std::error::Error, "failed");
            tracing::error!("no fields at all");
            tracing::info!(only = 1);
        };
        let ours = lines_with(Fields, log);
        assert_eq!(ours, lines_with(tracing_subscriber::fmt::format::DefaultFields::new(), log));
        assert_eq!(ours.lines().count(), 4, "{ours}");
    }

    #[test]
    fn a_batch_that_grows_past_its_size_is_written_out_at_once() {
        let _batch = Batch::start();
        let line = vec![b'x'; 1000];
        let fit = BATCH_BYTES / line.len();
        for _ in 0..fit {
            Line.write_all(&line).unwrap();
        }
        assert_eq!(seen(), (line.repeat(fit), Vec::new()));
        Line.write_all(&line).unwrap();
        assert_eq!(seen(), (Vec::new(), line.repeat(fit + 1)), "past {BATCH_BYTES} bytes the lines go out");
    }
}
