//! The access log's writer. Lines keep the agent's log format (`[<time> INFO
//! weft::access] {json}`), so log filters and readers of the log select them as before,
//! but they do not pass through the logger: each data-path thread serialises its lines
//! straight into a buffer of its own and writes them in batches, once 32 KiB wait or
//! 50 ms after the first of them. A busy agent makes one `write` for hundreds of lines
//! instead of one each, and never formats a line twice.

use std::{cell::RefCell, io::Write, time::Duration};

use serde::Serialize;

const TARGET: &str = "weft::access";
/// Waiting lines written at once when they reach this size...
const BATCH: usize = 32 * 1024;
/// ...or at the latest this long after the first of them.
const LINGER: Duration = Duration::from_millis(50);

thread_local! {
    static WAITING: RefCell<Batch> = RefCell::new(Batch::default());
}

/// Writes `line` to the access log, if the log's filter lets `weft::access` through.
pub fn write(line: &impl Serialize) {
    if !log::log_enabled!(target: TARGET, log::Level::Info) {
        return;
    }
    let time = jiff::Timestamp::now();
    match WAITING.with_borrow_mut(|batch| batch.push(time, line)) {
        Flush::Now => flush(),
        Flush::Later => match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // On the thread that wrote the line: the runtimes are single-threaded.
                runtime.spawn(async {
                    tokio::time::sleep(LINGER).await;
                    flush();
                });
            }
            Err(_) => flush(),
        },
        Flush::Nothing => {}
    }
}

/// Writes the calling thread's waiting lines now (a worker calls it as it stops).
pub fn flush() {
    WAITING.with_borrow_mut(|batch| {
        if !batch.lines.is_empty() {
            let _ = std::io::stderr().lock().write_all(&batch.lines);
        }
        batch.clear();
    });
}

/// Lines waiting to be written, and whether a flush is on its way.
#[derive(Debug, Default)]
struct Batch {
    lines: Vec<u8>,
    scheduled: bool,
}

/// What a new line asks of its writer.
#[derive(Debug, PartialEq, Eq)]
enum Flush {
    /// The batch is full.
    Now,
    /// The line is the first of a batch: flush within [`LINGER`].
    Later,
    /// Nothing to do: a flush is on its way already, or the line was lost.
    Nothing,
}

impl Batch {
    fn push(&mut self, time: jiff::Timestamp, line: &impl Serialize) -> Flush {
        let start = self.lines.len();
        let _ = write!(self.lines, "[{time:.0} INFO  {TARGET}] ");
        if serde_json::to_writer(&mut self.lines, line).is_err() {
            // Serialising our own structures fails only on a bug; lose that line alone.
            self.lines.truncate(start);
            return Flush::Nothing;
        }
        self.lines.push(b'\n');
        if self.lines.len() >= BATCH {
            Flush::Now
        } else if self.scheduled {
            Flush::Nothing
        } else {
            self.scheduled = true;
            Flush::Later
        }
    }

    /// Empties the batch, keeping its memory for the next.
    fn clear(&mut self) {
        self.lines.clear();
        self.scheduled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_the_log_format_and_are_written_in_batches() {
        let time: jiff::Timestamp = "2026-12-03T11:45:01.734Z".parse().unwrap();
        let mut batch = Batch::default();
        assert_eq!(batch.push(time, &serde_json::json!({"a": 1})), Flush::Later);
        assert_eq!(
            batch.push(time, &serde_json::json!({"b": "x"})),
            Flush::Nothing
        );
        assert_eq!(
            String::from_utf8(batch.lines.clone()).unwrap(),
            "[2026-12-03T11:45:01Z INFO  weft::access] {\"a\":1}\n\
             [2026-12-03T11:45:01Z INFO  weft::access] {\"b\":\"x\"}\n"
        );
        batch.clear();
        assert_eq!(
            batch.push(time, &1),
            Flush::Later,
            "a new batch, a new flush"
        );

        let long = "x".repeat(1000);
        let pushes = std::iter::repeat_with(|| batch.push(time, &long))
            .take_while(|flush| *flush != Flush::Now)
            .count();
        assert!(
            (BATCH / 1100..=BATCH / 1000).contains(&pushes),
            "{pushes} lines of about 1 KiB before a full batch"
        );
    }

    #[test]
    fn a_line_that_cannot_be_serialised_is_lost_alone() {
        struct Broken;
        impl Serialize for Broken {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("broken"))
            }
        }
        let time = jiff::Timestamp::UNIX_EPOCH;
        let mut batch = Batch::default();
        assert_eq!(
            batch.push(time, &Broken),
            Flush::Nothing,
            "nothing to write"
        );
        assert!(batch.lines.is_empty());
        batch.push(time, &1);
        batch.push(time, &Broken);
        assert_eq!(
            String::from_utf8(batch.lines).unwrap(),
            "[1970-01-01T00:00:00Z INFO  weft::access] 1\n"
        );
    }
}
