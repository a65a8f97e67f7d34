//! `h2load` (nghttp2's HTTP/2 load generator) as the tests and the bench run
//! it: timed runs, their summaries parsed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The counts on h2load's `requests:` and `status codes:` lines.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Requests that got a complete response.
    pub done: u64,
    /// Of those, the ones with a 2xx or 3xx status.
    pub succeeded: u64,
    /// Requests that failed (connection closed or reset under them, ...).
    pub failed: u64,
    /// Requests that failed with a protocol or I/O error.
    pub errored: u64,
    /// Requests that timed out.
    pub timeout: u64,
    /// Responses with a 4xx or 5xx status.
    pub bad_status: u64,
}

impl Summary {
    /// Parses h2load's output; `None` when the summary lines are missing.
    pub fn parse(output: &str) -> Option<Summary> {
        let requests = output.lines().find_map(|l| l.strip_prefix("requests: "))?;
        let count = |line: &str, what: &str| -> Option<u64> {
            line.split(", ")
                .find_map(|part| part.trim().strip_suffix(what)?.trim().parse().ok())
        };
        let statuses = output
            .lines()
            .find_map(|l| l.strip_prefix("status codes: "))?;
        Some(Summary {
            done: count(requests, " done")?,
            succeeded: count(requests, " succeeded")?,
            failed: count(requests, " failed")?,
            errored: count(requests, " errored")?,
            timeout: count(requests, " timeout")?,
            bad_status: count(statuses, " 4xx")? + count(statuses, " 5xx")?,
        })
    }

    /// Whether every request finished and succeeded.
    pub fn clean(&self) -> bool {
        self.done > 0
            && self.failed == 0
            && self.errored == 0
            && self.timeout == 0
            && self.bad_status == 0
    }
}

/// Runs h2load once against `http://ADDR/` (HTTP/2 with prior knowledge):
/// `connections` new connections, `per_period` of them every 100 ms, each
/// opening `streams` streams at once; returns its summary, or the whole
/// output when there is none.
///
/// Each connection sends all its requests as soon as it is up, and h2load
/// never reconnects: a stream the server refuses, a connection cut under
/// its streams, or one never accepted counts as failed. (h2load opens no
/// stream after a GOAWAY, counting a failure instead, so a long-lived
/// connection's run cannot cross a graceful GOAWAY: short connections are
/// what it measures honestly.)
pub fn run(
    h2load: &Path,
    addr: SocketAddr,
    connections: u32,
    per_period: u32,
    streams: u32,
) -> Result<Summary, String> {
    let args = [
        format!("--rate={per_period}"),
        "--rate-period=100ms".to_string(),
        format!("--clients={connections}"),
        format!("--requests={}", connections * streams),
        format!("--max-concurrent-streams={streams}"),
    ];
    summary_of(h2load, &args, addr)
}

/// Runs h2load for `duration` against `http://ADDR/` with `clients`
/// long-lived connections of `streams` concurrent streams each (`-D`).
/// h2load opens no stream after a GOAWAY and counts one failure per
/// connection that got one: this mode shows what a reload costs clients
/// that never reconnect.
pub fn run_timed(
    h2load: &Path,
    addr: SocketAddr,
    clients: u32,
    streams: u32,
    duration: std::time::Duration,
) -> Result<Summary, String> {
    let args = [
        format!("--duration={}", duration.as_secs().max(1)),
        format!("--clients={clients}"),
        format!("--max-concurrent-streams={streams}"),
    ];
    summary_of(h2load, &args, addr)
}

/// Runs `h2load ARGS http://ADDR/` and parses its summary.
fn summary_of(h2load: &Path, args: &[String], addr: SocketAddr) -> Result<Summary, String> {
    let output = Command::new(h2load)
        .args(args)
        .arg(format!("http://{addr}/"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", h2load.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Summary::parse(&text).ok_or(text)
}

/// [`run`] again and again, each run about 2 s of `per_period` new
/// connections every 100 ms, on a thread of its own until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Result<Summary, String>>>>,
}

/// Periods of 100 ms in one run.
const PERIODS: u32 = 20;

/// At most this many runs, so a stuck test ends.
const MAX_RUNS: usize = 60;

impl Load {
    /// Starts the runs.
    pub fn start(h2load: PathBuf, addr: SocketAddr, per_period: u32, streams: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !flag.load(Ordering::Relaxed) && runs.len() < MAX_RUNS {
                runs.push(run(
                    &h2load,
                    addr,
                    per_period * PERIODS,
                    per_period,
                    streams,
                ));
            }
            runs
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Lets the current run finish and returns every run's summary added
    /// up, or the output of a run that printed none.
    pub fn stop(mut self) -> Result<Summary, String> {
        self.stop.store(true, Ordering::Relaxed);
        let runs = self
            .thread
            .take()
            .expect("stopped once")
            .join()
            .expect("h2load thread");
        let mut total = Summary::default();
        for run in runs {
            let run = run?;
            total.done += run.done;
            total.succeeded += run.succeeded;
            total.failed += run.failed;
            total.errored += run.errored;
            total.timeout += run.timeout;
            total.bad_status += run.bad_status;
        }
        Ok(total)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_summary_lines() {
        let output = "finished in 2.00s, 41268.50 req/s, 1.97MB/s\n\
            requests: 82537 total, 82569 started, 82537 done, 82530 succeeded, 7 failed, 3 errored, 1 timeout\n\
            status codes: 82530 2xx, 0 3xx, 2 4xx, 5 5xx\n";
        let summary = Summary::parse(output).unwrap();
        assert_eq!(
            summary,
            Summary {
                done: 82537,
                succeeded: 82530,
                failed: 7,
                errored: 3,
                timeout: 1,
                bad_status: 7,
            }
        );
        assert!(!summary.clean());
        assert_eq!(Summary::parse("connection refused"), None);
    }
}
