//! `output = "capture"`: a worker's stdout and stderr, read by the master and
//! logged line by line as `worker output` events with the generation, worker
//! index, pid and stream.
//!
//! A worker cannot flood the master's log nor take its one thread: each
//! stream logs at most [`LINES_PER_SECOND`] lines a second, and what is over
//! is dropped and counted in a `worker output suppressed` warning once the
//! second is over, with the stream's next line or at its end (as journald's
//! `RateLimitBurst` does); and the master reads
//! at most [`BYTES_PER_SECOND`] of it, so a worker writing faster than that
//! waits on its pipe (as Docker's blocking log mode does).
//!
//! An `exec:` probe's stdout and stderr are read the same way but never
//! slowed down (a probe made to wait on its pipe could time out, and its
//! verdict would be baton's doing): each stream of each try keeps its first
//! and last [`PROBE_KEEP`] bytes, reads the rest and drops it, and logs one
//! `probe output` event at its end that says how many bytes were omitted.

use crate::ratelimit::Window;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// Longer lines are cut here (and marked `truncated`); the rest of the line
/// is dropped.
pub const MAX_LINE: usize = 16 * 1024;

/// Lines a second each stream may log; more are counted and dropped.
pub const LINES_PER_SECOND: u64 = 1000;

/// Bytes a second the master reads of each stream; a faster writer waits.
pub const BYTES_PER_SECOND: u64 = 4 * 1024 * 1024;

/// Who wrote a line.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// Generation number.
    pub generation: u64,
    /// Worker index.
    pub worker: u32,
    /// Worker pid.
    pub pid: i32,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
}

/// Reads `pipe` until every process holding its write end has closed it,
/// logging each line. Must run inside the tokio runtime.
pub fn capture(pipe: OwnedFd, origin: Origin) -> std::io::Result<()> {
    let mut reader = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
    tokio::spawn(async move {
        let (second, start) = (std::time::Duration::from_secs(1), Instant::now());
        let mut lines = Lines::default();
        let mut logged = Window::new(LINES_PER_SECOND, second, start);
        let mut read = Window::new(BYTES_PER_SECOND, second, start);
        let mut chunk = vec![0u8; 8 * 1024];
        loop {
            let n = match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = Instant::now();
            report_suppressed(origin, logged.roll(now));
            lines.push(&chunk[..n], |line, truncated| {
                if logged.allow(now) {
                    emit(origin, line, truncated)
                }
            });
            tokio::time::sleep_until(read.spend(n as u64, now)).await;
        }
        let now = Instant::now();
        lines.finish(|line, truncated| {
            if logged.allow(now) {
                emit(origin, line, truncated)
            }
        });
        report_suppressed(origin, logged.take_refused());
    });
    Ok(())
}

fn report_suppressed(origin: Origin, suppressed: u64) {
    if suppressed > 0 {
        let Origin {
            generation,
            worker,
            pid,
            stream,
        } = origin;
        tracing::warn!(
            generation,
            worker,
            pid,
            stream,
            suppressed,
            limit = LINES_PER_SECOND,
            "worker output suppressed: more lines a second than the limit"
        );
    }
}

fn emit(origin: Origin, line: &[u8], truncated: bool) {
    let line = String::from_utf8_lossy(line);
    let line = line.strip_suffix('\r').unwrap_or(&line);
    let Origin {
        generation,
        worker,
        pid,
        stream,
    } = origin;
    if truncated {
        tracing::info!(
            generation,
            worker,
            pid,
            stream,
            line,
            truncated,
            "worker output"
        );
    } else {
        tracing::info!(generation, worker, pid, stream, line, "worker output");
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
struct Lines {
    pending: Vec<u8>,
    /// Dropping the rest of an overlong line, up to its newline.
    skipping: bool,
}

impl Lines {
    fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let (part, rest) = match newline {
                Some(i) => (&bytes[..i], &bytes[i + 1..]),
                None => (bytes, &[][..]),
            };
            if !self.skipping {
                let room = MAX_LINE - self.pending.len();
                self.pending
                    .extend_from_slice(&part[..part.len().min(room)]);
                if part.len() > room {
                    emit(&self.pending, true);
                    self.pending.clear();
                    self.skipping = newline.is_none();
                } else if newline.is_some() {
                    emit(&self.pending, false);
                    self.pending.clear();
                }
            } else if newline.is_some() {
                self.skipping = false;
            }
            bytes = rest;
        }
    }

    fn finish(self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.pending.is_empty() {
            emit(&self.pending, false);
        }
    }
}

/// Bytes kept of the start, and of the end, of each stream of an exec
/// probe's try; what is between is counted and dropped.
pub const PROBE_KEEP: usize = 4 * 1024;

/// How long after its try's deadline a probe's stream is read at most: a
/// process the probe started and left behind may hold the pipe open.
const PROBE_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Whose output a probe's stream is.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOrigin {
    /// The generation probed.
    pub generation: u64,
    /// The probe command's pid.
    pub pid: i32,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
}

/// Reads an exec probe's `pipe` until every writer closed it, or until
/// [`PROBE_LINGER`] past `deadline`, keeping its first and last
/// [`PROBE_KEEP`] bytes, and logs them in one `probe output` event (none
/// when it wrote nothing). Must run inside the tokio runtime.
pub fn capture_probe(pipe: OwnedFd, origin: ProbeOrigin, deadline: Instant) -> std::io::Result<()> {
    let mut reader = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
    tokio::spawn(async move {
        let mut kept = Kept::default();
        let mut chunk = vec![0u8; 64 * 1024];
        let read_all = async {
            loop {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => kept.push(&chunk[..n]),
                }
            }
        };
        let cut_off = tokio::time::timeout_at(deadline + PROBE_LINGER, read_all)
            .await
            .is_err();
        kept.log(origin, cut_off);
    });
    Ok(())
}

/// The first and last [`PROBE_KEEP`] bytes of a stream, and its length.
#[derive(Debug, Default)]
struct Kept {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl Kept {
    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let to_head = bytes.len().min(PROBE_KEEP - self.head.len());
        self.head.extend_from_slice(&bytes[..to_head]);
        let rest = &bytes[to_head..];
        let rest = &rest[rest.len().saturating_sub(PROBE_KEEP)..];
        let over = (self.tail.len() + rest.len()).saturating_sub(PROBE_KEEP);
        self.tail.drain(..over);
        self.tail.extend(rest);
    }

    /// Bytes neither in the head nor in the tail.
    fn omitted(&self) -> u64 {
        self.total - (self.head.len() + self.tail.len()) as u64
    }

    fn log(self, origin: ProbeOrigin, cut_off: bool) {
        if self.total == 0 {
            return;
        }
        let ProbeOrigin {
            generation,
            pid,
            stream,
        } = origin;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim_end().to_string();
        let output = text(&self.head);
        let omitted_bytes = self.omitted();
        let tail = text(&self.tail.iter().copied().collect::<Vec<u8>>());
        if self.tail.is_empty() && !cut_off {
            tracing::info!(generation, pid, stream, output, "probe output");
        } else {
            tracing::info!(
                generation,
                pid,
                stream,
                output,
                omitted_bytes,
                tail,
                bytes = self.total,
                cut_off,
                "probe output"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_stream_keeps_its_first_and_last_bytes_and_counts_the_rest() {
        let mut kept = Kept::default();
        kept.push(b"short");
        assert_eq!((kept.head.as_slice(), kept.tail.len()), (&b"short"[..], 0));
        let mut kept = Kept::default();
        let stream: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        for piece in stream.chunks(7_777) {
            kept.push(piece);
        }
        assert_eq!(kept.head, stream[..PROBE_KEEP]);
        assert_eq!(
            kept.tail.iter().copied().collect::<Vec<u8>>(),
            stream[stream.len() - PROBE_KEEP..]
        );
        assert_eq!(kept.total, 1_000_000);
        assert_eq!(kept.omitted(), 1_000_000 - 2 * PROBE_KEEP as u64);
        // A tail shorter than PROBE_KEEP.
        let mut kept = Kept::default();
        kept.push(&stream[..PROBE_KEEP + 10]);
        assert_eq!((kept.tail.len(), kept.omitted()), (10, 0));
    }

    fn split(chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut lines = Lines::default();
        for chunk in chunks {
            lines.push(chunk, |l, t| {
                out.push((String::from_utf8_lossy(l).into_owned(), t))
            });
        }
        lines.finish(|l, t| out.push((String::from_utf8_lossy(l).into_owned(), t)));
        out
    }

    #[test]
    fn lines_are_split_across_chunks() {
        assert_eq!(
            split(&[b"a\nb", b"c\n\nd"]),
            vec![
                ("a".into(), false),
                ("bc".into(), false),
                ("".into(), false),
                ("d".into(), false)
            ]
        );
    }

    #[test]
    fn overlong_lines_are_truncated_once() {
        let long = vec![b'x'; MAX_LINE + 10];
        let out = split(&[&long[..MAX_LINE - 1], &long[MAX_LINE - 1..], b"yy\nok\n"]);
        assert_eq!(
            out.len(),
            2,
            "{:?}",
            out.iter().map(|(l, t)| (l.len(), t)).collect::<Vec<_>>()
        );
        assert_eq!((out[0].0.len(), out[0].1), (MAX_LINE, true));
        assert_eq!(out[1], ("ok".into(), false));
        let out = split(&[&long, b"\nnext\n"]);
        assert_eq!((out[0].0.len(), out[0].1), (MAX_LINE, true));
        assert_eq!(out[1], ("next".into(), false));
    }
}
