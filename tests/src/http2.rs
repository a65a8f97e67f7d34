//! A strict, bounded, closed-loop HTTP/2 load client over loopback (h2c with
//! prior knowledge), built on the `h2` crate.
//!
//! Each client holds one long-lived connection and keeps
//! [`Http2Config::streams`] requests in flight on it. It behaves as RFC 9113
//! asks of a client, which h2load does not: a connection that got a GOAWAY
//! opens no new stream, and the client connects again; a stream the server
//! refused unprocessed — above the GOAWAY's last-stream-id (§6.8), or reset
//! with `REFUSED_STREAM` (§8.7) — is retried on the new connection. So the
//! counts keep apart what a conforming client retries from what it loses:
//!
//! - [`Http2Report::refused`]: streams the server refused unprocessed;
//! - [`Http2Report::unsent`]: requests the client did not open because their
//!   connection was already going away (h2 opens no stream after a GOAWAY);
//! - [`Http2Report::retried`]: the two together, each sent again;
//! - [`Http2Report::lost`]: requests that failed after the server accepted
//!   them (reset, connection closed under them, timeout, non-2xx status), or
//!   that could not be sent at all (connect or handshake failed). Nothing
//!   lost is retried.
//!
//! A request refused [`MAX_ATTEMPTS`] times is lost. A run is bounded by
//! [`Http2Config::duration`] and [`Http2Config::max_requests`]; once it
//! ends, requests in flight and pending retries finish, each within
//! [`Http2Config::timeout`] per attempt.

use bytes::Bytes;
use h2::Reason;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// How often one request may be refused before it counts as lost.
pub const MAX_ATTEMPTS: u32 = 5;
/// The response header carrying the generation of the worker that answered.
const GENERATION_HEADER: &str = "x-baton-generation";
/// Pause after a failed connect so a dead server is not hammered.
const FAILURE_PAUSE: Duration = Duration::from_millis(1);

/// What to run: where, how hard, and for how long at most.
#[derive(Clone, Debug)]
pub struct Http2Config {
    /// The server to load (h2c with prior knowledge).
    pub addr: SocketAddr,
    /// Concurrent clients, one long-lived connection each.
    pub connections: usize,
    /// Requests each connection keeps in flight (at most what the server's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` allows).
    pub streams: usize,
    /// No new request starts after it (retries still do).
    pub duration: Duration,
    /// Hard bound on the number of new requests, across all clients.
    pub max_requests: u64,
    /// Per attempt: connect and handshake, or the complete response.
    pub timeout: Duration,
    /// The request path, e.g. `/`.
    pub path: String,
}

impl Http2Config {
    /// A configuration for `addr`: 4 connections of 4 streams, 10 s, no
    /// request bound, 5 s per attempt, path `/`.
    pub fn new(addr: SocketAddr) -> Http2Config {
        Http2Config {
            addr,
            connections: 4,
            streams: 4,
            duration: Duration::from_secs(10),
            max_requests: u64::MAX,
            timeout: Duration::from_secs(5),
            path: "/".into(),
        }
    }
}

/// Why a request was lost.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lost {
    /// The TCP connection could not be made.
    Connect,
    /// The HTTP/2 handshake failed or timed out.
    Handshake,
    /// The server reset the stream (with a reason other than `REFUSED_STREAM`).
    Reset(String),
    /// The connection closed or failed under the stream.
    Closed,
    /// A GOAWAY with an error code, or a protocol error.
    Protocol(String),
    /// No complete response within the timeout.
    Timeout,
    /// A complete response with a status other than 2xx.
    Status(u16),
    /// Refused [`MAX_ATTEMPTS`] times.
    RefusedTooOften,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Connect => f.write_str("connect"),
            Lost::Handshake => f.write_str("handshake"),
            Lost::Reset(reason) => write!(f, "reset_{reason}"),
            Lost::Closed => f.write_str("closed"),
            Lost::Protocol(what) => write!(f, "protocol_{what}"),
            Lost::Timeout => f.write_str("timeout"),
            Lost::Status(status) => write!(f, "status_{status}"),
            Lost::RefusedTooOften => f.write_str("refused_too_often"),
        }
    }
}

/// What a run counted.
#[derive(Clone, Debug, Default)]
pub struct Http2Report {
    /// Requests answered with a 2xx status.
    pub ok: u64,
    /// Requests lost, by why.
    pub lost_by: BTreeMap<Lost, u64>,
    /// Streams the server refused unprocessed (GOAWAY last-stream-id or
    /// `REFUSED_STREAM`), each retried.
    pub refused: u64,
    /// Of those, the ones reset with `REFUSED_STREAM`.
    pub refused_by_reset: u64,
    /// Requests not opened on a connection already going away, each retried.
    pub unsent: u64,
    /// Connections opened (handshake done).
    pub connections: u64,
    /// The distinct generations seen, in order of first appearance.
    pub generations: Vec<u64>,
    /// From the start of the run until every client had stopped.
    pub elapsed: Duration,
}

impl Http2Report {
    /// Requests lost, for any reason.
    pub fn lost(&self) -> u64 {
        self.lost_by.values().sum()
    }

    /// Requests sent again: [`Http2Report::refused`] plus
    /// [`Http2Report::unsent`].
    pub fn retried(&self) -> u64 {
        self.refused + self.unsent
    }

    /// E.g. `ok=1200 lost=0 refused=3 (by GOAWAY 3, by REFUSED_STREAM 0)
    /// unsent=5 connections=9`, with the lost ones by why.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "ok={} lost={} refused={} (by GOAWAY {}, by REFUSED_STREAM {}) unsent={} connections={}",
            self.ok,
            self.lost(),
            self.refused,
            self.refused - self.refused_by_reset,
            self.refused_by_reset,
            self.unsent,
            self.connections
        );
        if !self.lost_by.is_empty() {
            let by: Vec<String> = self
                .lost_by
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            text.push_str(&format!(" ({})", by.join(" ")));
        }
        text
    }

    fn merge(&mut self, other: Counts) {
        self.ok += other.ok;
        self.refused += other.refused;
        self.refused_by_reset += other.refused_by_reset;
        self.unsent += other.unsent;
        self.connections += other.connections;
        for (k, n) in other.lost_by {
            *self.lost_by.entry(k).or_default() += n;
        }
    }
}

/// One client's counts.
#[derive(Default)]
struct Counts {
    ok: u64,
    lost_by: BTreeMap<Lost, u64>,
    refused: u64,
    refused_by_reset: u64,
    unsent: u64,
    connections: u64,
}

impl Counts {
    fn lose(&mut self, why: Lost) {
        *self.lost_by.entry(why).or_default() += 1;
    }
}

/// What the clients share with the handle.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    started: AtomicU64,
    progress: crate::load::Progress,
    generations: Mutex<Vec<u64>>,
}

/// A run under way. Dropping it without [`Http2Load::stop`] asks the
/// clients to stop but does not wait for them.
pub struct Http2Load {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Http2Report>>,
}

impl Http2Load {
    /// Starts the clients on a thread of their own and returns at once.
    ///
    /// # Panics
    ///
    /// If `cfg.timeout` or `cfg.streams` is zero, or the thread or its
    /// runtime cannot be made.
    pub fn start(cfg: Http2Config) -> Http2Load {
        assert!(!cfg.timeout.is_zero(), "the timeout must not be zero");
        assert!(cfg.streams > 0, "each connection needs a stream");
        let shared = Arc::new(Shared::default());
        let mine = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("http2-load".into())
            .spawn(move || run_clients(Arc::new(cfg), mine))
            .expect("spawn the HTTP/2 load thread");
        Http2Load {
            shared,
            thread: Some(thread),
        }
    }

    /// Asks the clients to stop, waits for them (in-flight requests and
    /// pending retries finish) and returns what they counted.
    pub fn stop(mut self) -> Http2Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("not stopped yet");
        match thread.join() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Requests answered 2xx so far.
    pub fn ok_so_far(&self) -> u64 {
        self.shared.progress.ok_so_far()
    }

    /// The highest generation any response carried so far.
    pub fn latest_generation(&self) -> Option<u64> {
        self.shared.progress.latest_generation()
    }

    /// Waits until at least `n` requests were answered 2xx; false if that
    /// did not happen within `patience`.
    pub fn wait_for_ok(&self, n: u64, patience: Duration) -> bool {
        self.shared.progress.wait_for_ok(n, patience)
    }
}

impl Drop for Http2Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs a load until its duration or request bound, and reports.
pub fn run(cfg: Http2Config) -> Http2Report {
    run_clients(Arc::new(cfg), Arc::new(Shared::default()))
}

fn run_clients(cfg: Arc<Http2Config>, shared: Arc<Shared>) -> Http2Report {
    let start = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the HTTP/2 load");
    let end = start.checked_add(cfg.duration);
    let mut report = runtime.block_on(async {
        let mut clients = JoinSet::new();
        for _ in 0..cfg.connections {
            clients.spawn(client(Arc::clone(&cfg), Arc::clone(&shared), end));
        }
        let mut report = Http2Report::default();
        while let Some(counts) = clients.join_next().await {
            match counts {
                Ok(counts) => report.merge(counts),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        report
    });
    report.generations = shared.generations.lock().unwrap().clone();
    report.elapsed = start.elapsed();
    report
}

impl Shared {
    /// Takes a ticket for a new request, unless the run is over.
    fn take_new(&self, cfg: &Http2Config, end: Option<Instant>) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && end.is_none_or(|end| Instant::now() < end)
            && self.started.fetch_add(1, Ordering::Relaxed) < cfg.max_requests
    }

    fn saw(&self, generation: Option<u64>) {
        self.progress.answered();
        self.progress.saw_generation(generation);
        if let Some(g) = generation {
            let mut seen = self.generations.lock().unwrap();
            if !seen.contains(&g) {
                seen.push(g);
            }
        }
    }
}

/// How one attempt ended.
enum Attempt {
    Ok(Option<u64>),
    /// Refused unprocessed; `going_away` when by a GOAWAY.
    Refused {
        going_away: bool,
    },
    Lost(Lost),
}

/// One client: connections one after the other, `streams` requests in
/// flight on each, until the run is over and nothing is left to retry.
async fn client(cfg: Arc<Http2Config>, shared: Arc<Shared>, end: Option<Instant>) -> Counts {
    let mut counts = Counts::default();
    // Requests to send again, by the attempts they had.
    let mut retries: VecDeque<u32> = VecDeque::new();
    let uri: http::Uri = format!("http://{}{}", cfg.addr, cfg.path)
        .parse()
        .expect("a valid request URI");
    loop {
        // The request this connection starts with, if any is left.
        let mut next = match retries.pop_front() {
            Some(attempts) => Some(attempts),
            None => shared.take_new(&cfg, end).then_some(0),
        };
        if next.is_none() {
            return counts;
        }
        let mut send = match connect(&cfg).await {
            Ok(send) => send,
            Err(why) => {
                counts.lose(why);
                tokio::time::sleep(FAILURE_PAUSE).await;
                continue;
            }
        };
        counts.connections += 1;
        let mut in_flight = JoinSet::new();
        let mut going_away = false;
        loop {
            while !going_away && in_flight.len() < cfg.streams {
                let attempts = match next.take().or_else(|| retries.pop_front()) {
                    Some(attempts) => attempts,
                    None if shared.take_new(&cfg, end) => 0,
                    None => break,
                };
                match timeout(cfg.timeout, poll_fn(|cx| send.poll_ready(cx))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        // The connection is going away: not sent.
                        counts.unsent += 1;
                        retries.push_front(attempts);
                        going_away = true;
                        break;
                    }
                    Err(_) => {
                        counts.lose(Lost::Timeout);
                        going_away = true;
                        break;
                    }
                }
                let request = http::Request::get(uri.clone())
                    .body(())
                    .expect("a valid request");
                match send.send_request(request, true) {
                    Ok((response, _)) => {
                        let patience = cfg.timeout;
                        in_flight
                            .spawn(async move { (attempts, exchange(response, patience).await) });
                    }
                    Err(_) => {
                        counts.unsent += 1;
                        retries.push_front(attempts);
                        going_away = true;
                        break;
                    }
                }
            }
            let Some(done) = in_flight.join_next().await else {
                break;
            };
            let (attempts, outcome) = match done {
                Ok(done) => done,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            match outcome {
                Attempt::Ok(generation) => {
                    counts.ok += 1;
                    shared.saw(generation);
                }
                Attempt::Refused { going_away: goaway } => {
                    counts.refused += 1;
                    counts.refused_by_reset += u64::from(!goaway);
                    going_away |= goaway;
                    if attempts + 1 >= MAX_ATTEMPTS {
                        counts.lose(Lost::RefusedTooOften);
                    } else {
                        retries.push_back(attempts + 1);
                    }
                }
                Attempt::Lost(why) => {
                    going_away |= matches!(why, Lost::Closed | Lost::Protocol(_));
                    counts.lose(why);
                }
            }
        }
        // Nothing in flight: this connection is done with, gracefully.
        drop(send);
    }
}

/// A new connection's request sender; its driver runs as a task that ends
/// with the connection.
async fn connect(cfg: &Http2Config) -> Result<h2::client::SendRequest<Bytes>, Lost> {
    let tcp = match timeout(cfg.timeout, TcpStream::connect(cfg.addr)).await {
        Ok(Ok(tcp)) => tcp,
        _ => return Err(Lost::Connect),
    };
    let _ = tcp.set_nodelay(true);
    let (send, connection) = match timeout(cfg.timeout, h2::client::handshake(tcp)).await {
        Ok(Ok(handshake)) => handshake,
        _ => return Err(Lost::Handshake),
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// Waits for the complete response of one stream and says how it ended.
async fn exchange(response: h2::client::ResponseFuture, patience: Duration) -> Attempt {
    let received = timeout(patience, async {
        let response = response.await?;
        let status = response.status().as_u16();
        let generation = response
            .headers()
            .get(GENERATION_HEADER)
            .and_then(|v| v.to_str().ok()?.trim().parse().ok());
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        Ok::<_, h2::Error>((status, generation))
    })
    .await;
    match received {
        Err(_) => Attempt::Lost(Lost::Timeout),
        Ok(Ok((status, generation))) if (200..300).contains(&status) => Attempt::Ok(generation),
        Ok(Ok((status, _))) => Attempt::Lost(Lost::Status(status)),
        Ok(Err(e)) => classify(&e),
    }
}

/// Refused unprocessed, or lost: h2 fails a stream above a GOAWAY's
/// last-stream-id with the GOAWAY itself (as a remote GOAWAY error), the
/// streams at or below it only if the connection then fails under them.
fn classify(e: &h2::Error) -> Attempt {
    if e.is_reset() && e.is_remote() && e.reason() == Some(Reason::REFUSED_STREAM) {
        return Attempt::Refused { going_away: false };
    }
    if e.is_go_away() && e.is_remote() {
        return Attempt::Refused { going_away: true };
    }
    if e.is_reset() {
        let reason = e.reason().map_or("unknown".into(), |r| format!("{r:?}"));
        return Attempt::Lost(Lost::Reset(reason.to_lowercase()));
    }
    if e.is_io() {
        return Attempt::Lost(Lost::Closed);
    }
    let reason = e.reason().map_or("unknown".into(), |r| format!("{r:?}"));
    Attempt::Lost(Lost::Protocol(reason.to_lowercase()))
}
