//! The process's log: set up as configured (text or JSON, the level for this crate), written to
//! standard error — one `write` per line, except on a thread that holds a [`Batch`].
//!
//! The engine holds one for each turn of its loop: at info it logs a line for every tracked
//! webhook, and a write to standard error per line cost it nearly as much as formatting the line
//! (a system call on the one task every webhook passes through). Lines logged while a batch is
//! held are kept in a buffer of the thread's and written together when the batch ends, or
//! sooner once [`BATCH_BYTES`] are waiting. Nothing else changes: each line keeps the time it
//! was logged at, and the lines of other threads are written as they come.

use std::cell::RefCell;
use std::io::{self, Write as _};
use std::marker::PhantomData;

use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, Logging};

/// Written out before a batch grows past this, and what its buffer keeps between batches.
const BATCH_BYTES: usize = 64 * 1024;

/// Sets the global subscriber: `warn` for other crates, the configured level for this one.
pub fn init(logging: &Logging) {
    let filter = tracing_subscriber::EnvFilter::new(format!("warn,rtc_leave_bridge={}", logging.level));
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Stderr).with_ansi(ansi);
    match logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
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
