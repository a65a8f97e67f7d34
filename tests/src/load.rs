//! A strict, bounded, closed-loop HTTP/1.1 load client over loopback.
//!
//! Every request is counted exactly once and put in exactly one [`Class`].
//! Nothing is ever retried: a request that fails on a reused keep-alive
//! connection is a failure (tools like wrk quietly retry those, which hides
//! precisely the drops a hot restart must not cause).
//!
//! The client is std only: one thread per connection, each running one
//! request at a time (closed loop) over a blocking [`TcpStream`] whose read
//! and write timeouts are set from the time left before the request's
//! deadline. A run is bounded by [`LoadConfig::duration`] and
//! [`LoadConfig::max_requests`]; a request already under way when the run
//! ends is allowed to finish, which takes at most [`LoadConfig::timeout`].

use std::collections::HashSet;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The response header carrying the generation of the worker that answered.
const GENERATION_HEADER: &str = "x-baton-generation";
/// Largest accepted response head (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Largest accepted chunk-size line or trailer line.
const MAX_LINE: usize = 4 * 1024;
/// How much one `read` asks for.
const READ_CHUNK: usize = 16 * 1024;
/// Pause after a transport failure so a dead server is not hammered.
const FAILURE_PAUSE: Duration = Duration::from_millis(1);

/// How a client uses its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Reuse one connection for request after request; reconnect only when
    /// the server answered `Connection: close` or after a failure.
    KeepAlive,
    /// A fresh connection for every request, sent with `Connection: close`.
    NewConnection,
}

/// What to run: where, how hard, and for how long at most.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The server to load.
    pub addr: SocketAddr,
    /// Concurrent closed-loop clients, one thread and one connection each.
    /// Zero means no requests at all.
    pub connections: usize,
    /// Keep-alive or a new connection per request.
    pub mode: Mode,
    /// Hard bound on the run: no request starts after it. A duration too
    /// large to add to the current time means no time bound.
    pub duration: Duration,
    /// Hard bound on the number of requests started, across all clients.
    pub max_requests: u64,
    /// Per request: connect, write and the complete response must fit in
    /// it. Must not be zero.
    pub timeout: Duration,
    /// The request target, e.g. `/`.
    pub path: String,
}

impl LoadConfig {
    /// A configuration for `addr` with modest defaults: 4 keep-alive
    /// connections, 10 s, no request bound, 2 s per request, path `/`.
    pub fn new(addr: SocketAddr) -> LoadConfig {
        LoadConfig {
            addr,
            connections: 4,
            mode: Mode::KeepAlive,
            duration: Duration::from_secs(10),
            max_requests: u64::MAX,
            timeout: Duration::from_secs(2),
            path: "/".into(),
        }
    }
}

/// The outcome of one request; every request gets exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// A complete response with a 2xx status.
    Ok,
    /// A complete response with any other status (recorded in
    /// [`Sample::status`]). Counts as a failure.
    NonSuccess,
    /// `connect()` failed with `ECONNREFUSED`.
    ConnectRefused,
    /// `connect()` failed with `ECONNRESET` or any other error that is not a
    /// refusal or a timeout (e.g. `EADDRNOTAVAIL`, `ENETUNREACH`).
    ConnectReset,
    /// The request was sent, then reading failed with `ECONNRESET` (or any
    /// other read error that is not a timeout) before the response was
    /// complete.
    ResetAfterSend,
    /// The request was sent, then the server closed the connection cleanly
    /// (read returned 0) before the response was complete.
    EofBeforeResponse,
    /// Writing the request failed (`EPIPE`, `ECONNRESET`, ...), also on a
    /// reused keep-alive connection.
    WriteError,
    /// The request did not complete within [`LoadConfig::timeout`]: at
    /// connect, write or read.
    Timeout,
    /// The response could not be parsed, or the server sent bytes nobody
    /// asked for after it.
    Malformed,
}

impl Class {
    /// Every class, in the order summaries list them.
    pub const ALL: [Class; 9] = [
        Class::Ok,
        Class::NonSuccess,
        Class::ConnectRefused,
        Class::ConnectReset,
        Class::ResetAfterSend,
        Class::EofBeforeResponse,
        Class::WriteError,
        Class::Timeout,
        Class::Malformed,
    ];

    /// The class's snake_case name, e.g. `eof_before_response`.
    pub fn name(&self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::NonSuccess => "non_success",
            Class::ConnectRefused => "connect_refused",
            Class::ConnectReset => "connect_reset",
            Class::ResetAfterSend => "reset_after_send",
            Class::EofBeforeResponse => "eof_before_response",
            Class::WriteError => "write_error",
            Class::Timeout => "timeout",
            Class::Malformed => "malformed",
        }
    }

    /// Whether the request failed: everything but [`Class::Ok`], including
    /// complete responses with a non-2xx status.
    pub fn is_failure(&self) -> bool {
        *self != Class::Ok
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One request, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// When the request started (before connecting, if it had to), since
    /// the run started.
    pub start: Duration,
    /// From start to the complete response or the failure.
    pub latency: Duration,
    /// The outcome.
    pub class: Class,
    /// The status code, whenever a response head arrived (also when the
    /// body was then cut short).
    pub status: Option<u16>,
    /// The `x-baton-generation` header, whenever a response head with a
    /// valid one arrived.
    pub generation: Option<u64>,
    /// Sent on a keep-alive connection that had already carried a response.
    pub reused: bool,
    /// On a reused connection: how long it had sat idle between its
    /// previous response and this request, and which generation sent that
    /// response. Tells a server that closed a connection it took for idle
    /// (long idle) from one that closed a busy one (idle 0 ms).
    pub previous: Option<Previous>,
}

/// The response before a request on a reused connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Previous {
    /// From that response's end to this request's start.
    pub idle: Duration,
    /// The generation that sent it, if it said.
    pub generation: Option<u64>,
}

/// Every request of a run, sorted by start.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One sample per request, sorted by [`Sample::start`].
    pub samples: Vec<Sample>,
    /// From the start of the run until every client had stopped.
    pub elapsed: Duration,
}

impl Report {
    /// Requests that ended [`Class::Ok`].
    pub fn ok(&self) -> u64 {
        self.count(Class::Ok)
    }

    /// Requests that failed, in any class but [`Class::Ok`].
    pub fn failed(&self) -> u64 {
        self.samples.iter().filter(|s| s.class.is_failure()).count() as u64
    }

    /// Requests of class `c`.
    pub fn count(&self, c: Class) -> u64 {
        self.samples.iter().filter(|s| s.class == c).count() as u64
    }

    /// The failures per class, e.g. `connect_reset=2 eof_before_response=1`,
    /// followed by the first failure of each class (when it started, after
    /// how long it failed, and on which kind of connection); `none` when
    /// nothing failed.
    pub fn failures_summary(&self) -> String {
        let failing: Vec<Class> = Class::ALL
            .into_iter()
            .filter(|c| c.is_failure() && self.count(*c) > 0)
            .collect();
        if failing.is_empty() {
            return "none".into();
        }
        let counts: Vec<String> = failing
            .iter()
            .map(|c| format!("{}={}", c.name(), self.count(*c)))
            .collect();
        let examples: Vec<String> = failing
            .iter()
            .filter_map(|c| self.samples.iter().find(|s| s.class == *c))
            .map(describe_failure)
            .collect();
        format!(
            "{} (first of each: {})",
            counts.join(" "),
            examples.join("; ")
        )
    }

    /// The distinct generations seen, in order of first appearance.
    pub fn generations(&self) -> Vec<u64> {
        let mut seen = HashSet::new();
        self.samples
            .iter()
            .filter_map(|s| s.generation)
            .filter(|g| seen.insert(*g))
            .collect()
    }

    /// The `q` quantile (0.0 ..= 1.0, nearest rank) of the latencies of the
    /// [`Class::Ok`] requests; `None` when there are none.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        let mut latencies: Vec<Duration> = self
            .samples
            .iter()
            .filter(|s| s.class == Class::Ok)
            .map(|s| s.latency)
            .collect();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let rank = (q.clamp(0.0, 1.0) * latencies.len() as f64).ceil() as usize;
        Some(latencies[rank.saturating_sub(1).min(latencies.len() - 1)])
    }

    /// Requests per `bucket` of run time, by start: `(ok, failed)` for each
    /// bucket from the start of the run to the last request.
    ///
    /// # Panics
    ///
    /// If `bucket` is zero.
    pub fn timeline(&self, bucket: Duration) -> Vec<(u64, u64)> {
        assert!(!bucket.is_zero(), "timeline bucket must not be zero");
        let index = |s: &Sample| (s.start.as_nanos() / bucket.as_nanos()) as usize;
        let len = self.samples.iter().map(|s| index(s) + 1).max().unwrap_or(0);
        let mut buckets = vec![(0, 0); len];
        for s in &self.samples {
            let b = &mut buckets[index(s)];
            if s.class.is_failure() {
                b.1 += 1;
            } else {
                b.0 += 1;
            }
        }
        buckets
    }

    /// The longest a reused connection sat idle before a request was sent
    /// on it; `None` when no request went out on a reused connection. A
    /// closed-loop client idles only when its thread does not get the CPU:
    /// near a server's idle timeout, that is the client's own doing.
    pub fn longest_idle(&self) -> Option<Duration> {
        self.samples
            .iter()
            .filter_map(|s| s.previous.map(|p| p.idle))
            .max()
    }

    /// [`Class::Ok`] requests per second over the whole run.
    pub fn ok_per_second(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.ok() as f64 / self.elapsed.as_secs_f64()
    }

    /// The requests that started inside any of `windows` (half-open ranges
    /// of run time, in any order, possibly overlapping), as a report of
    /// their own whose [`Report::elapsed`] is the total time the windows
    /// cover. Every helper then applies to those windows only, e.g.
    /// `report.within(&reload_windows).latency_quantile(0.99)`.
    pub fn within(&self, windows: &[Range<Duration>]) -> Report {
        let merged = merge_windows(windows);
        let mut samples = Vec::new();
        let mut next = 0;
        for s in &self.samples {
            // Both are sorted by start: skip the windows that ended before it.
            while next < merged.len() && merged[next].end <= s.start {
                next += 1;
            }
            if next == merged.len() {
                break;
            }
            if merged[next].contains(&s.start) {
                samples.push(*s);
            }
        }
        Report {
            samples,
            elapsed: merged.iter().map(|w| w.end - w.start).sum(),
        }
    }
}

/// `windows` sorted by start, without empty ones, overlapping or touching
/// ones joined.
fn merge_windows(windows: &[Range<Duration>]) -> Vec<Range<Duration>> {
    let mut sorted: Vec<Range<Duration>> =
        windows.iter().filter(|w| !w.is_empty()).cloned().collect();
    sorted.sort_by_key(|w| w.start);
    let mut merged: Vec<Range<Duration>> = Vec::with_capacity(sorted.len());
    for w in sorted {
        match merged.last_mut() {
            Some(last) if w.start <= last.end => last.end = last.end.max(w.end),
            _ => merged.push(w),
        }
    }
    merged
}

fn describe_failure(s: &Sample) -> String {
    let mut text = format!(
        "{} at {:.3}s after {:.1}ms on a {} connection",
        s.class.name(),
        s.start.as_secs_f64(),
        s.latency.as_secs_f64() * 1000.0,
        if s.reused { "reused" } else { "new" },
    );
    if let Some(previous) = s.previous {
        text.push_str(&format!(
            " idle for {:.1}ms",
            previous.idle.as_secs_f64() * 1000.0
        ));
        if let Some(generation) = previous.generation {
            text.push_str(&format!(" since generation {generation} answered"));
        }
    }
    if let Some(status) = s.status {
        text.push_str(&format!(", status {status}"));
    }
    if let Some(generation) = s.generation {
        text.push_str(&format!(", generation {generation}"));
    }
    text
}

/// How far a load has got, shared by its clients and its handle (HTTP/1.1
/// here, HTTP/2 in [`crate::http2`]): the handle reads it while the load
/// runs ("wait until traffic flows", "which generation answers now").
#[derive(Default)]
pub(crate) struct Progress {
    ok: AtomicU64,
    /// The highest generation seen plus one; 0 when none was seen.
    latest_generation: AtomicU64,
}

impl Progress {
    /// A response, 2xx or not, carried `generation`.
    pub(crate) fn saw_generation(&self, generation: Option<u64>) {
        if let Some(generation) = generation {
            self.latest_generation
                .fetch_max(generation.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// A request was answered 2xx.
    pub(crate) fn answered(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub(crate) fn latest_generation(&self) -> Option<u64> {
        self.latest_generation
            .load(Ordering::Relaxed)
            .checked_sub(1)
    }

    /// Waits until at least `n` requests were answered 2xx, polling every
    /// millisecond; false if that did not happen within `timeout`.
    pub(crate) fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.ok_so_far() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// What the clients share with the handle.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Requests started, across all clients (may run past `max_requests`
    /// by the number of clients: each one increments it once to learn it
    /// must stop).
    started: AtomicU64,
    progress: Progress,
}

/// A run under way: client threads sending requests until stopped or
/// bounded. Dropping it without [`LoadHandle::stop`] asks the clients to
/// stop but does not wait for them.
pub struct LoadHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Vec<Sample>>>,
    run_start: Instant,
}

impl LoadHandle {
    /// Spawns the client threads and returns at once.
    ///
    /// # Panics
    ///
    /// If `cfg.timeout` is zero, or a thread cannot be spawned.
    pub fn start(cfg: LoadConfig) -> LoadHandle {
        assert!(
            !cfg.timeout.is_zero(),
            "the request timeout must not be zero"
        );
        let cfg = Arc::new(cfg);
        let shared = Arc::new(Shared::default());
        let run_start = Instant::now();
        let mut handle = LoadHandle {
            shared,
            threads: Vec::with_capacity(cfg.connections),
            run_start,
        };
        for i in 0..cfg.connections {
            let cfg = Arc::clone(&cfg);
            let shared = Arc::clone(&handle.shared);
            let spawned = std::thread::Builder::new()
                .name(format!("load-client-{i}"))
                .spawn(move || client_loop(&cfg, &shared, run_start));
            match spawned {
                Ok(thread) => handle.threads.push(thread),
                // Dropping the handle stops the clients already running.
                Err(e) => panic!("cannot spawn load client thread {i}: {e}"),
            }
        }
        handle
    }

    /// Asks the clients to stop, waits for them (each finishes the request
    /// it is in, at most [`LoadConfig::timeout`]) and merges their samples.
    pub fn stop(self) -> Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.finish()
    }

    /// The instant the run started: every [`Sample::start`] is measured
    /// from it, so a caller can put its own events (a signal sent, a
    /// process gone) on the same clock with `instant - run_start()`.
    pub fn run_start(&self) -> Instant {
        self.run_start
    }

    /// Requests that ended [`Class::Ok`] so far, for "wait until traffic
    /// flows".
    pub fn ok_so_far(&self) -> u64 {
        self.shared.progress.ok_so_far()
    }

    /// The highest generation any response carried so far.
    pub fn latest_generation(&self) -> Option<u64> {
        self.shared.progress.latest_generation()
    }

    /// Waits until at least `n` requests ended [`Class::Ok`], polling every
    /// millisecond; false if that did not happen within `timeout`.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        self.shared.progress.wait_for_ok(n, timeout)
    }

    /// Joins every client and merges their samples, sorted by start.
    fn finish(mut self) -> Report {
        let mut samples = Vec::new();
        for thread in std::mem::take(&mut self.threads) {
            match thread.join() {
                Ok(mine) => samples.extend(mine),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        samples.sort_by_key(|s| s.start);
        Report {
            samples,
            elapsed: self.run_start.elapsed(),
        }
    }
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs a load until `cfg.duration` has passed or `cfg.max_requests`
/// requests were started, and reports every request.
pub fn run(cfg: LoadConfig) -> Report {
    LoadHandle::start(cfg).finish()
}

/// One client: a closed loop of requests until stopped or bounded.
fn client_loop(cfg: &LoadConfig, shared: &Shared, run_start: Instant) -> Vec<Sample> {
    let end = run_start.checked_add(cfg.duration);
    let request = build_request(cfg);
    let mut conn: Option<Conn> = None;
    let mut samples = Vec::new();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if end.is_some_and(|end| Instant::now() >= end) {
            break;
        }
        if shared.started.fetch_add(1, Ordering::Relaxed) >= cfg.max_requests {
            break;
        }
        let started = Instant::now();
        let outcome = one_request(cfg, &request, &mut conn, started + cfg.timeout);
        let latency = started.elapsed();
        if outcome.class == Class::Ok {
            shared.progress.answered();
        }
        shared.progress.saw_generation(outcome.generation);
        samples.push(Sample {
            start: started.saturating_duration_since(run_start),
            latency,
            class: outcome.class,
            status: outcome.status,
            generation: outcome.generation,
            reused: outcome.previous.is_some(),
            previous: outcome.previous,
        });
        if !matches!(outcome.class, Class::Ok | Class::NonSuccess) {
            std::thread::sleep(FAILURE_PAUSE);
        }
    }
    samples
}

fn build_request(cfg: &LoadConfig) -> Vec<u8> {
    let close = match cfg.mode {
        Mode::KeepAlive => "",
        Mode::NewConnection => "Connection: close\r\n",
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{close}\r\n",
        cfg.path, cfg.addr
    )
    .into_bytes()
}

struct Outcome {
    class: Class,
    status: Option<u16>,
    generation: Option<u64>,
    /// Set on a reused connection.
    previous: Option<Previous>,
}

/// Sends one request on `slot`'s connection (connecting first if there is
/// none) and leaves the connection in `slot` only if it may be reused.
fn one_request(
    cfg: &LoadConfig,
    request: &[u8],
    slot: &mut Option<Conn>,
    deadline: Instant,
) -> Outcome {
    let conn = match slot {
        Some(conn) => conn,
        None => match connect(cfg.addr, cfg.timeout) {
            Ok(stream) => slot.insert(Conn::new(stream)),
            Err(class) => {
                return Outcome {
                    class,
                    status: None,
                    generation: None,
                    previous: None,
                }
            }
        },
    };
    let previous = conn.answered.map(|(at, generation)| Previous {
        idle: Instant::now().saturating_duration_since(at),
        generation,
    });
    match conn.exchange(request, deadline) {
        Ok(response) => {
            let class = if (200..300).contains(&response.status) {
                Class::Ok
            } else {
                Class::NonSuccess
            };
            if response.close || cfg.mode == Mode::NewConnection {
                *slot = None;
            } else {
                conn.answered = Some((Instant::now(), response.generation));
            }
            Outcome {
                class,
                status: Some(response.status),
                generation: response.generation,
                previous,
            }
        }
        Err(failure) => {
            *slot = None;
            Outcome {
                class: failure.class,
                status: failure.status,
                generation: failure.generation,
                previous,
            }
        }
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Class> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        ErrorKind::ConnectionRefused => Class::ConnectRefused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Class::Timeout,
        _ => Class::ConnectReset,
    })?;
    stream.set_nodelay(true).map_err(|_| Class::ConnectReset)?;
    Ok(stream)
}

/// Time left before `deadline`, `None` once it has passed.
fn remaining(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A complete response.
struct Response {
    status: u16,
    close: bool,
    generation: Option<u64>,
}

/// A failed exchange, with what was learnt of the response before it failed.
struct Failure {
    class: Class,
    status: Option<u16>,
    generation: Option<u64>,
}

struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
    /// When the last response on this connection ended and which
    /// generation sent it; `None` until one came back.
    answered: Option<(Instant, Option<u64>)>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            answered: None,
        }
    }

    /// Writes `request` and reads the complete response, all before
    /// `deadline`.
    fn exchange(&mut self, request: &[u8], deadline: Instant) -> Result<Response, Failure> {
        let mut parser = Parser::default();
        let fail = |class: Class, parser: &Parser| Failure {
            class,
            status: parser.head.as_ref().map(|h| h.status),
            generation: parser.head.as_ref().and_then(|h| h.generation),
        };

        let Some(left) = remaining(deadline) else {
            return Err(fail(Class::Timeout, &parser));
        };
        let written = self
            .stream
            .set_write_timeout(Some(left))
            .and_then(|()| self.stream.write_all(request));
        if let Err(e) = written {
            let class = if is_timeout(&e) {
                Class::Timeout
            } else {
                Class::WriteError
            };
            return Err(fail(class, &parser));
        }

        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match parser.advance(&mut self.buf) {
                Err(Malformed) => return Err(fail(Class::Malformed, &parser)),
                Ok(true) => break,
                Ok(false) => {}
            }
            let Some(left) = remaining(deadline) else {
                return Err(fail(Class::Timeout, &parser));
            };
            let read = self
                .stream
                .set_read_timeout(Some(left))
                .and_then(|()| self.stream.read(&mut chunk));
            match read {
                Ok(0) if parser.ends_at_eof() => break,
                Ok(0) => return Err(fail(Class::EofBeforeResponse, &parser)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(fail(Class::Timeout, &parser)),
                Err(_) => return Err(fail(Class::ResetAfterSend, &parser)),
            }
        }
        if !self.buf.is_empty() {
            // Bytes after the response that no request asked for.
            return Err(fail(Class::Malformed, &parser));
        }
        let head = parser.head.expect("a complete response has a head");
        Ok(Response {
            status: head.status,
            close: head.close,
            generation: head.generation,
        })
    }
}

/// The response does not parse.
#[derive(Debug, PartialEq, Eq)]
struct Malformed;

#[derive(Debug)]
struct Head {
    status: u16,
    /// The connection must not be reused after this response.
    close: bool,
    generation: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// This many body bytes still to come.
    Length(u64),
    /// A chunked body, at this point of it.
    Chunked(Chunk),
    /// The body ends when the server closes the connection.
    UntilEof,
    /// The response is complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data still to come.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
}

/// An incremental HTTP/1.x response parser that consumes what it parsed
/// (bodies are counted, not kept).
#[derive(Debug)]
struct Parser {
    head: Option<Head>,
    body: Body,
}

impl Default for Parser {
    fn default() -> Parser {
        Parser {
            head: None,
            body: Body::Length(0),
        }
    }
}

impl Parser {
    /// Parses as much of `buf` as it can and removes it; true once the
    /// response is complete.
    fn advance(&mut self, buf: &mut Vec<u8>) -> Result<bool, Malformed> {
        let mut pos = 0;
        let result = self.advance_from(buf, &mut pos);
        buf.drain(..pos);
        result
    }

    /// Whether the connection closing now completes the response.
    fn ends_at_eof(&self) -> bool {
        self.head.is_some() && self.body == Body::UntilEof
    }

    fn advance_from(&mut self, buf: &[u8], pos: &mut usize) -> Result<bool, Malformed> {
        loop {
            let rest = &buf[*pos..];
            if self.head.is_none() {
                let Some(end) = find(rest, b"\r\n\r\n") else {
                    return if rest.len() > MAX_HEAD {
                        Err(Malformed)
                    } else {
                        Ok(false)
                    };
                };
                if end > MAX_HEAD {
                    return Err(Malformed);
                }
                let (head, body) = parse_head(&rest[..end])?;
                *pos += end + 4;
                if (100..200).contains(&head.status) {
                    // An interim response (we never ask for an upgrade, so
                    // 101 is wrong): the real one follows.
                    if head.status == 101 {
                        return Err(Malformed);
                    }
                    continue;
                }
                self.head = Some(head);
                self.body = body;
                continue;
            }
            match &mut self.body {
                Body::Done => return Ok(true),
                Body::UntilEof => {
                    *pos = buf.len();
                    return Ok(false);
                }
                Body::Length(left) => {
                    let take = (*left).min(rest.len() as u64);
                    *pos += take as usize;
                    *left -= take;
                    if *left > 0 {
                        return Ok(false);
                    }
                    self.body = Body::Done;
                }
                Body::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(line) = take_line(rest)? else {
                            return Ok(false);
                        };
                        let size = parse_chunk_size(&rest[..line])?;
                        *pos += line + 2;
                        *chunk = if size == 0 {
                            Chunk::Trailer
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        let take = (*left).min(rest.len() as u64);
                        *pos += take as usize;
                        *left -= take;
                        if *left > 0 {
                            return Ok(false);
                        }
                        *chunk = Chunk::DataEnd;
                    }
                    Chunk::DataEnd => {
                        if rest.len() < 2 {
                            return Ok(false);
                        }
                        if &rest[..2] != b"\r\n" {
                            return Err(Malformed);
                        }
                        *pos += 2;
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailer => {
                        let Some(line) = take_line(rest)? else {
                            return Ok(false);
                        };
                        *pos += line + 2;
                        if line == 0 {
                            self.body = Body::Done;
                        }
                    }
                },
            }
        }
    }
}

/// The length of the CRLF-terminated line at the start of `rest`, `None`
/// if it is not complete yet.
fn take_line(rest: &[u8]) -> Result<Option<usize>, Malformed> {
    match find(rest, b"\r\n") {
        Some(line) if line <= MAX_LINE => Ok(Some(line)),
        Some(_) => Err(Malformed),
        None if rest.len() > MAX_LINE => Err(Malformed),
        None => Ok(None),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 16 {
        return Err(Malformed);
    }
    // After the size: optional whitespace, then nothing or extensions.
    let rest = trim(rest);
    if !rest.is_empty() && rest[0] != b';' {
        return Err(Malformed);
    }
    let digits = std::str::from_utf8(digits).map_err(|_| Malformed)?;
    u64::from_str_radix(digits, 16).map_err(|_| Malformed)
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// The lines of `bytes`, split at each CRLF.
fn crlf_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let r = rest?;
        match find(r, b"\r\n") {
            Some(i) => {
                rest = Some(&r[i + 2..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Parses a response head (without its final empty line).
fn parse_head(head: &[u8]) -> Result<(Head, Body), Malformed> {
    let mut lines = crlf_lines(head).map(|line| {
        if line.iter().any(|b| matches!(b, b'\r' | b'\n')) {
            Err(Malformed)
        } else {
            Ok(line)
        }
    });
    let status_line = lines.next().ok_or(Malformed)??;
    let (http10, status) = parse_status_line(status_line)?;

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close_token = false;
    let mut keep_alive_token = false;
    let mut generation = None;
    for line in lines {
        let line = line?;
        let colon = line.iter().position(|b| *b == b':').ok_or(Malformed)?;
        let name = &line[..colon];
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return Err(Malformed);
        }
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let text = std::str::from_utf8(value).map_err(|_| Malformed)?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Malformed);
            }
            let length: u64 = text.parse().map_err(|_| Malformed)?;
            if content_length.is_some_and(|l| l != length) {
                return Err(Malformed);
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // Chunked only counts as the final coding.
            chunked = value
                .split(|b| *b == b',')
                .map(trim)
                .rfind(|t| !t.is_empty())
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',').map(trim) {
                close_token |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(GENERATION_HEADER.as_bytes()) {
            generation = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        }
    }

    let mut close = close_token || (http10 && !keep_alive_token);
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Body::Done
    } else if chunked {
        Body::Chunked(Chunk::Size)
    } else if transfer_encoding {
        // A coding we cannot frame: the body runs to the end.
        close = true;
        Body::UntilEof
    } else if let Some(length) = content_length {
        Body::Length(length)
    } else {
        close = true;
        Body::UntilEof
    };
    Ok((
        Head {
            status,
            close,
            generation,
        },
        body,
    ))
}

/// `HTTP/1.x SSS reason` → (is HTTP/1.0, status).
fn parse_status_line(line: &[u8]) -> Result<(bool, u16), Malformed> {
    let http10 = if line.starts_with(b"HTTP/1.1 ") {
        false
    } else if line.starts_with(b"HTTP/1.0 ") {
        true
    } else {
        return Err(Malformed);
    };
    let rest = &line[9..];
    if rest.len() < 3 || !rest[..3].iter().all(|b| b.is_ascii_digit()) {
        return Err(Malformed);
    }
    if rest.len() > 3 && rest[3] != b' ' {
        return Err(Malformed);
    }
    let status = rest[..3]
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if status < 100 {
        return Err(Malformed);
    }
    Ok((http10, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{setsockopt, sockopt};
    use std::net::TcpListener;
    use std::sync::Mutex;

    type Handler = dyn Fn(TcpStream) + Send + Sync;

    /// A fake server: one thread accepting, one thread per connection
    /// running `handler`; dropping it stops and joins them all.
    struct FakeServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        accept: Option<JoinHandle<()>>,
        conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    }

    impl FakeServer {
        fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> FakeServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let conns = Arc::new(Mutex::new(Vec::new()));
            let handler: Arc<Handler> = Arc::new(handler);
            let accept = {
                let stop = Arc::clone(&stop);
                let conns = Arc::clone(&conns);
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        // A safety net so no handler can hang the test.
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        let handler = Arc::clone(&handler);
                        let conn = std::thread::spawn(move || handler(stream));
                        conns.lock().unwrap().push(conn);
                    }
                })
            };
            FakeServer {
                addr,
                stop,
                accept: Some(accept),
                conns,
            }
        }
    }

    impl Drop for FakeServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            if let Some(accept) = self.accept.take() {
                let _ = accept.join();
            }
            for conn in std::mem::take(&mut *self.conns.lock().unwrap()) {
                let _ = conn.join();
            }
        }
    }

    /// Reads one request head into a string; `None` at EOF or on error.
    fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = find(buf, b"\r\n\r\n") {
                let request = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                buf.drain(..end + 4);
                return Some(request);
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Waits until the peer closes (or the safety timeout).
    fn drain_until_closed(stream: &mut TcpStream) {
        let mut chunk = [0u8; 4096];
        while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
    }

    /// Answers every request on the connection with `response`.
    fn answer_all(response: &'static [u8]) -> impl Fn(TcpStream) + Send + Sync + 'static {
        move |mut stream| {
            let mut buf = Vec::new();
            while read_request(&mut stream, &mut buf).is_some() {
                if stream.write_all(response).is_err() {
                    break;
                }
            }
        }
    }

    const OK_RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nX-Baton-Generation: 7\r\n\r\nhello";

    fn cfg(addr: SocketAddr, mode: Mode, connections: usize, max_requests: u64) -> LoadConfig {
        LoadConfig {
            addr,
            connections,
            mode,
            duration: Duration::from_secs(5),
            max_requests,
            timeout: Duration::from_secs(1),
            path: "/".into(),
        }
    }

    fn classes(report: &Report) -> Vec<Class> {
        report.samples.iter().map(|s| s.class).collect()
    }

    #[test]
    fn keepalive_ok_reuses_connection_and_reads_generation() {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let requests = Arc::clone(&requests);
            FakeServer::start(move |mut stream| {
                let mut buf = Vec::new();
                while let Some(request) = read_request(&mut stream, &mut buf) {
                    requests.lock().unwrap().push(request);
                    if stream.write_all(OK_RESPONSE).is_err() {
                        break;
                    }
                }
            })
        };
        let handle = LoadHandle::start(cfg(server.addr, Mode::KeepAlive, 1, 20));
        assert!(handle.wait_for_ok(20, Duration::from_secs(2)));
        assert_eq!(handle.latest_generation(), Some(7));
        let report = handle.stop();
        assert_eq!(report.samples.len(), 20);
        assert_eq!(report.ok(), 20);
        assert_eq!(report.failed(), 0);
        assert_eq!(report.failures_summary(), "none");
        assert!(!report.samples[0].reused);
        assert!(report.samples[1..].iter().all(|s| s.reused));
        assert!(report
            .samples
            .iter()
            .all(|s| s.status == Some(200) && s.generation == Some(7)));
        assert_eq!(report.generations(), vec![7]);
        assert!(report.samples.windows(2).all(|w| w[0].start <= w[1].start));
        let requests = requests.lock().unwrap();
        assert_eq!(requests.len(), 20);
        let expected = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr);
        assert!(requests.iter().all(|r| *r == expected), "{:?}", requests[0]);
    }

    #[test]
    fn many_keepalive_connections_all_ok() {
        let server = FakeServer::start(answer_all(OK_RESPONSE));
        let report = run(cfg(server.addr, Mode::KeepAlive, 4, 200));
        assert_eq!(report.ok(), 200, "{}", report.failures_summary());
        assert!(report.count(Class::Ok) == 200);
        assert!(report.samples.iter().filter(|s| !s.reused).count() <= 4);
    }

    #[test]
    fn new_connection_mode_sends_close_and_never_reuses() {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let requests = Arc::clone(&requests);
            FakeServer::start(move |mut stream| {
                let mut buf = Vec::new();
                if let Some(request) = read_request(&mut stream, &mut buf) {
                    requests.lock().unwrap().push(request);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
                    );
                }
            })
        };
        let report = run(cfg(server.addr, Mode::NewConnection, 2, 30));
        assert_eq!(report.ok(), 30, "{}", report.failures_summary());
        assert!(report.samples.iter().all(|s| !s.reused));
        let requests = requests.lock().unwrap();
        assert_eq!(requests.len(), 30);
        assert!(requests
            .iter()
            .all(|r| r.contains("\r\nConnection: close\r\n")));
    }

    #[test]
    fn chunked_response_is_ok() {
        let server = FakeServer::start(|mut stream| {
            let mut buf = Vec::new();
            while read_request(&mut stream, &mut buf).is_some() {
                // Split across writes so the parser sees partial input.
                let parts: [&[u8]; 5] = [
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-baton-generation: 3\r\n\r\n",
                    b"5\r\nhel",
                    b"lo\r\nA;ext=1\r\n0123456789\r\n",
                    b"0\r\ntrailer: x\r\n",
                    b"\r\n",
                ];
                for part in parts {
                    if stream.write_all(part).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 5));
        assert_eq!(report.ok(), 5, "{}", report.failures_summary());
        assert_eq!(report.generations(), vec![3]);
        assert!(report.samples[1..].iter().all(|s| s.reused));
    }

    #[test]
    fn reset_after_request_is_reset_after_send() {
        let server = FakeServer::start(|mut stream| {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).is_some() {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                setsockopt(&stream, sockopt::Linger, &linger).unwrap();
            }
        });
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 3));
        assert_eq!(classes(&report), vec![Class::ResetAfterSend; 3]);
        assert!(report
            .samples
            .iter()
            .all(|s| !s.reused && s.status.is_none()));
        assert_eq!(report.failed(), 3);
    }

    #[test]
    fn close_without_answer_is_eof_before_response() {
        let server = FakeServer::start(|mut stream| {
            let mut buf = Vec::new();
            let _ = read_request(&mut stream, &mut buf);
        });
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 3));
        assert_eq!(classes(&report), vec![Class::EofBeforeResponse; 3]);
    }

    #[test]
    fn half_a_body_is_eof_before_response() {
        let server = FakeServer::start(|mut stream| {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).is_some() {
                let _ =
                    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789");
            }
        });
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 2));
        assert_eq!(classes(&report), vec![Class::EofBeforeResponse; 2]);
        // The head arrived, so its status is known.
        assert_eq!(report.samples[0].status, Some(200));
    }

    #[test]
    fn silent_server_is_timeout() {
        let server = FakeServer::start(|mut stream| drain_until_closed(&mut stream));
        let mut config = cfg(server.addr, Mode::KeepAlive, 1, 2);
        config.timeout = Duration::from_millis(200);
        let report = run(config);
        assert_eq!(classes(&report), vec![Class::Timeout; 2]);
        assert!(report
            .samples
            .iter()
            .all(|s| s.latency >= Duration::from_millis(200)
                && s.latency < Duration::from_millis(600)));
    }

    #[test]
    fn nothing_listening_is_connect_refused() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let report = run(cfg(addr, Mode::KeepAlive, 2, 6));
        assert_eq!(classes(&report), vec![Class::ConnectRefused; 6]);
        assert!(report.samples.iter().all(|s| !s.reused));
    }

    #[test]
    fn service_unavailable_is_non_success() {
        let server = FakeServer::start(answer_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
        ));
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 4));
        assert_eq!(classes(&report), vec![Class::NonSuccess; 4]);
        assert!(report.samples.iter().all(|s| s.status == Some(503)));
        // A non-2xx response is complete: the connection stays in use.
        assert!(report.samples[1..].iter().all(|s| s.reused));
        assert_eq!(report.failed(), 4);
        assert!(report.failures_summary().starts_with("non_success=4 "));
    }

    #[test]
    fn garbage_is_malformed() {
        let server = FakeServer::start(answer_all(b"SMTP ready\r\n\r\n"));
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 2));
        assert_eq!(classes(&report), vec![Class::Malformed; 2]);
    }

    #[test]
    fn idle_close_on_reused_connection_is_not_retried() {
        let server = FakeServer::start(|mut stream| {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).is_some() {
                // Answer as keep-alive, then close the idle connection.
                let _ = stream.write_all(OK_RESPONSE);
            }
        });
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 2));
        assert_eq!(report.samples.len(), 2);
        let (first, second) = (report.samples[0], report.samples[1]);
        assert_eq!(first.class, Class::Ok);
        assert!(!first.reused);
        assert!(
            matches!(
                second.class,
                Class::EofBeforeResponse | Class::ResetAfterSend | Class::WriteError
            ),
            "{second:?}"
        );
        assert!(second.reused);
        assert_eq!(first.previous, None);
        assert!(second.previous.is_some(), "{second:?}");
        assert_eq!(report.failed(), 1);
    }

    #[test]
    fn connection_close_in_keepalive_mode_reconnects() {
        let server = FakeServer::start(|mut stream| {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).is_some() {
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n\r\nhi",
                );
            }
        });
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 10));
        assert_eq!(report.ok(), 10, "{}", report.failures_summary());
        assert!(report.samples.iter().all(|s| !s.reused));
    }

    #[test]
    fn body_until_eof_is_ok() {
        let server = FakeServer::start(|mut stream| {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).is_some() {
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nsome body");
            }
        });
        let report = run(cfg(server.addr, Mode::KeepAlive, 1, 3));
        assert_eq!(report.ok(), 3, "{}", report.failures_summary());
    }

    #[test]
    fn max_requests_bounds_the_run() {
        let server = FakeServer::start(answer_all(OK_RESPONSE));
        let connections = 4;
        let report = run(cfg(server.addr, Mode::KeepAlive, connections, 50));
        assert!(report.samples.len() as u64 <= 50 + connections as u64);
        assert_eq!(report.samples.len(), 50);
        assert_eq!(report.ok(), 50);
    }

    #[test]
    fn duration_bounds_the_run() {
        let server = FakeServer::start(answer_all(OK_RESPONSE));
        let mut config = cfg(server.addr, Mode::KeepAlive, 2, u64::MAX);
        config.duration = Duration::from_millis(300);
        let report = run(config);
        assert!(report.elapsed >= Duration::from_millis(300));
        assert!(report.elapsed < Duration::from_millis(1300), "{report:?}");
        assert!(report.ok() > 0);
        assert_eq!(report.failed(), 0, "{}", report.failures_summary());
        assert!(report
            .samples
            .iter()
            .all(|s| s.start < Duration::from_millis(300)));
    }

    #[test]
    fn stop_ends_a_long_run_promptly() {
        let server = FakeServer::start(answer_all(OK_RESPONSE));
        let mut config = cfg(server.addr, Mode::KeepAlive, 2, u64::MAX);
        config.duration = Duration::from_secs(60);
        let handle = LoadHandle::start(config);
        assert!(handle.wait_for_ok(10, Duration::from_secs(2)));
        let stopped = Instant::now();
        let report = handle.stop();
        assert!(stopped.elapsed() < Duration::from_secs(1));
        assert!(report.ok() >= 10);
        assert_eq!(report.failed(), 0, "{}", report.failures_summary());
    }

    fn sample(start_ms: u64, class: Class, reused: bool) -> Sample {
        Sample {
            start: Duration::from_millis(start_ms),
            latency: Duration::from_micros(250),
            class,
            status: None,
            generation: None,
            reused,
            previous: reused.then_some(Previous {
                idle: Duration::from_micros(100),
                generation: Some(3),
            }),
        }
    }

    #[test]
    fn failures_summary_counts_and_examples() {
        let report = Report {
            samples: vec![
                sample(10, Class::Ok, false),
                sample(1234, Class::EofBeforeResponse, true),
                sample(1500, Class::ConnectReset, false),
                sample(1600, Class::ConnectReset, false),
                sample(1700, Class::EofBeforeResponse, false),
            ],
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(report.ok(), 1);
        assert_eq!(report.failed(), 4);
        assert_eq!(report.longest_idle(), Some(Duration::from_micros(100)));
        let summary = report.failures_summary();
        assert!(
            summary.starts_with("connect_reset=2 eof_before_response=2 ("),
            "{summary}"
        );
        assert!(
            summary.contains(
                "eof_before_response at 1.234s after 0.2ms on a reused connection \
                 idle for 0.1ms since generation 3 answered"
            ),
            "{summary}"
        );
        assert!(
            summary.contains("connect_reset at 1.500s after 0.2ms on a new connection"),
            "{summary}"
        );
        assert_eq!(Report::default().failures_summary(), "none");
    }

    #[test]
    fn report_helpers() {
        let mut samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                latency: Duration::from_millis(i + 1),
                generation: Some([2, 2, 1, 3, 1, 3, 2, 2, 2, 2][i as usize]),
                ..sample(i * 300, Class::Ok, false)
            })
            .collect();
        samples.push(sample(3100, Class::Timeout, false));
        let report = Report {
            samples,
            elapsed: Duration::from_secs(4),
        };
        assert_eq!(report.generations(), vec![2, 1, 3]);
        assert_eq!(report.latency_quantile(0.5), Some(Duration::from_millis(5)));
        assert_eq!(
            report.latency_quantile(1.0),
            Some(Duration::from_millis(10))
        );
        assert_eq!(report.latency_quantile(0.0), Some(Duration::from_millis(1)));
        assert_eq!(
            report.timeline(Duration::from_secs(1)),
            vec![(4, 0), (3, 0), (3, 0), (0, 1)]
        );
        assert_eq!(report.ok_per_second(), 2.5);
        assert_eq!(report.longest_idle(), None);
        assert_eq!(Report::default().latency_quantile(0.5), None);
    }

    #[test]
    fn within_keeps_requests_started_inside_the_windows() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                latency: Duration::from_millis(10 - i),
                ..sample(
                    i * 100,
                    if i == 4 {
                        Class::ResetAfterSend
                    } else {
                        Class::Ok
                    },
                    false,
                )
            })
            .collect();
        let report = Report {
            samples,
            elapsed: Duration::from_secs(1),
        };
        let ms = Duration::from_millis;
        // Unsorted, overlapping, touching and empty windows.
        let inside = report.within(&[
            ms(350)..ms(450),
            ms(0)..ms(50),
            ms(400)..ms(500),
            ms(500)..ms(501),
            ms(900)..ms(900),
        ]);
        let starts: Vec<Duration> = inside.samples.iter().map(|s| s.start).collect();
        assert_eq!(starts, vec![ms(0), ms(400), ms(500)]);
        assert_eq!(inside.elapsed, ms(50 + 151));
        assert_eq!(inside.ok(), 2);
        assert_eq!(inside.count(Class::ResetAfterSend), 1);
        assert_eq!(inside.latency_quantile(1.0), Some(ms(10)));
        assert_eq!(inside.latency_quantile(0.0), Some(ms(5)));
        // The end of a window is not in it; no window, no requests.
        assert!(report.within(&[ms(1)..ms(100)]).samples.is_empty());
        assert!(report.within(&[]).samples.is_empty());
        assert_eq!(report.within(&[]).elapsed, Duration::ZERO);
    }

    #[test]
    fn sample_starts_are_measured_from_run_start() {
        let server = FakeServer::start(answer_all(OK_RESPONSE));
        let mut config = cfg(server.addr, Mode::KeepAlive, 1, u64::MAX);
        config.duration = Duration::from_secs(5);
        let handle = LoadHandle::start(config);
        let run_start = handle.run_start();
        assert!(handle.wait_for_ok(5, Duration::from_secs(2)));
        let before_stop = run_start.elapsed();
        let report = handle.stop();
        assert!(report.samples.iter().all(|s| s.start < before_stop));
        assert!(report.elapsed >= before_stop);
    }

    #[test]
    fn class_names_are_distinct_snake_case() {
        let names: HashSet<&str> = Class::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Class::ALL.len());
        assert!(names
            .iter()
            .all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        assert_eq!(
            Class::ALL.iter().filter(|c| !c.is_failure()).count(),
            1,
            "only ok is not a failure"
        );
    }

    fn parse_all(bytes: &[u8]) -> Result<(bool, Parser), Malformed> {
        let mut parser = Parser::default();
        let mut buf = bytes.to_vec();
        let done = parser.advance(&mut buf)?;
        Ok((done, parser))
    }

    #[test]
    fn parser_edge_cases() {
        // Interim 100 Continue before the real response.
        let (done, parser) =
            parse_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert!(done);
        assert_eq!(parser.head.unwrap().status, 204);
        // Incomplete head and body.
        assert!(
            !parse_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n")
                .unwrap()
                .0
        );
        assert!(
            !parse_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab")
                .unwrap()
                .0
        );
        // HTTP/1.0 closes unless asked to keep alive.
        let (_, parser) = parse_all(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(parser.head.unwrap().close);
        let (_, parser) =
            parse_all(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        assert!(!parser.head.unwrap().close);
        // Malformed heads and chunks.
        for bad in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n",
        ] {
            assert_eq!(
                parse_all(bad).err(),
                Some(Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
