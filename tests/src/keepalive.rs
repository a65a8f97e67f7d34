//! Many keep-alive HTTP/1.1 connections held across reloads, counting what
//! the server did to them: every TCP connect, every request answered or
//! not, and every close the client did not start.
//!
//! One tokio runtime on one thread drives them all (a thousand connections
//! need no thousand threads): half of them busy (a request again as soon as
//! the previous one is answered), half idle between requests for a time in
//! a given range ([`Clients::start`]), or all of them idle
//! ([`Clients::idle`]). A connection is only ever reopened after the server
//! ended it, so `connects - connections` is the number of reconnects. The
//! CPU time that thread used is read from /proc ([`Clients::cpu_time`]).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the clients saw, each thing counted once.
#[derive(Debug, Default)]
pub struct Tally {
    /// TCP connects, first ones included.
    pub connects: AtomicU64,
    /// Requests answered 200.
    pub ok: AtomicU64,
    /// Requests not answered, or answered otherwise.
    pub failed: AtomicU64,
    /// Connections the server ended without the client asking: end of file
    /// or a reset, whether or not a `Connection: close` came first.
    pub closed_by_server: AtomicU64,
    /// Responses saying `Connection: close`.
    pub told_to_close: AtomicU64,
    /// The highest generation that answered (`x-baton-generation`).
    pub newest: AtomicU64,
}

impl Tally {
    /// Failed requests, connections closed by the server, connects.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.failed.load(Ordering::Relaxed),
            self.closed_by_server.load(Ordering::Relaxed),
            self.connects.load(Ordering::Relaxed),
        )
    }
}

/// The clients, running until [`Clients::stop`] (or drop).
pub struct Clients {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    /// The client thread's id (0 until it runs), for its CPU time.
    thread_id: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl Clients {
    /// `connections` clients of `addr`: the even ones busy, the odd ones
    /// idle between requests for a time spread over `idle`. Returns once
    /// each has been answered once (panics after 30 s otherwise).
    pub fn start(addr: SocketAddr, connections: usize, idle: Range<Duration>) -> Clients {
        Clients::spawn(addr, connections, idle, |i| i % 2 == 1)
    }

    /// `connections` clients of `addr`, every one idle between requests
    /// for a time spread over `idle`: a light load, under which what a
    /// reload costs is not hidden by the cost of serving. Returns once each
    /// has been answered once (panics after 30 s otherwise).
    pub fn idle(addr: SocketAddr, connections: usize, idle: Range<Duration>) -> Clients {
        Clients::spawn(addr, connections, idle, |_| true)
    }

    /// `connections` clients of `addr`; client `i` pauses between requests
    /// when `pauses(i)`, for a time spread over `idle`.
    fn spawn(
        addr: SocketAddr,
        connections: usize,
        idle: Range<Duration>,
        pauses: fn(usize) -> bool,
    ) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let thread_id = Arc::new(AtomicI32::new(0));
        let thread = {
            let (stop, tally, thread_id) = (stop.clone(), tally.clone(), thread_id.clone());
            std::thread::spawn(move || {
                thread_id.store(nix::unistd::gettid().as_raw(), Ordering::Relaxed);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for the keep-alive clients");
                runtime.block_on(async move {
                    let span = idle.end.saturating_sub(idle.start).as_millis().max(1) as u64;
                    let tasks: Vec<_> = (0..connections)
                        .map(|i| {
                            let pause = pauses(i).then(|| {
                                idle.start + Duration::from_millis((i as u64 * 7919) % span)
                            });
                            tokio::spawn(client(addr, pause, stop.clone(), tally.clone()))
                        })
                        .collect();
                    for task in tasks {
                        let _ = task.await;
                    }
                });
            })
        };
        let clients = Clients {
            stop,
            tally,
            thread_id,
            thread: Some(thread),
        };
        clients.wait(Duration::from_secs(30), "every client answered once", |t| {
            t.ok.load(Ordering::Relaxed) >= connections as u64
        });
        clients
    }

    /// What they saw so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// The CPU time (user and system) the clients' thread has used so far,
    /// in clock ticks' resolution, from /proc/self/task/TID/stat; `None`
    /// once it has ended.
    pub fn cpu_time(&self) -> Option<Duration> {
        let id = self.thread_id.load(Ordering::Relaxed);
        let stat = std::fs::read_to_string(format!("/proc/self/task/{id}/stat")).ok()?;
        // utime and stime.
        let ticks = (11..=12)
            .map(|n| crate::harness::stat_field(&stat, n)?.parse::<u64>().ok())
            .sum::<Option<u64>>()?;
        Some(crate::harness::ticks_to_duration(ticks))
    }

    /// Waits until generation `n` has answered one of them (panics after
    /// `timeout`).
    pub fn wait_generation(&self, n: u64, timeout: Duration) {
        self.wait(timeout, &format!("generation {n} answered"), |t| {
            t.newest.load(Ordering::Relaxed) >= n
        });
    }

    fn wait(&self, timeout: Duration, what: &str, done: impl Fn(&Tally) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.tally) {
            assert!(
                Instant::now() < deadline,
                "keep-alive clients: never {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops them (each after its request or pause under way) and returns
    /// what they saw.
    pub fn stop(mut self) -> Arc<Tally> {
        self.halt();
        self.tally.clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("keep-alive client thread");
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One response: status, `Connection: close`, generation.
type Reply = (u16, bool, Option<u64>);

/// One client: its connection until `stop`.
async fn client(
    addr: SocketAddr,
    pause: Option<Duration>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let connect = || async {
        tally.connects.fetch_add(1, Ordering::Relaxed);
        loop {
            match TcpStream::connect(addr).await {
                Ok(stream) => return BufReader::new(stream),
                Err(_) if !stop.load(Ordering::Relaxed) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("connect to {addr}: {e}"),
            }
        }
    };
    let mut stream = connect().await;
    while !stop.load(Ordering::Relaxed) {
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if closed(&stream) {
                tally.closed_by_server.fetch_add(1, Ordering::Relaxed);
                stream = connect().await;
            }
        }
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, request(&mut stream)).await;
        match reply {
            Ok(Ok((200, close, generation))) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally
                    .newest
                    .fetch_max(generation.unwrap_or(0), Ordering::Relaxed);
                if close {
                    tally.told_to_close.fetch_add(1, Ordering::Relaxed);
                    tally.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    stream = connect().await;
                }
            }
            Ok(Ok(_)) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(_)) | Err(_) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                tally.closed_by_server.fetch_add(1, Ordering::Relaxed);
                stream = connect().await;
            }
        }
    }
}

/// Whether the server has ended an idle connection (or sent something
/// unasked), without waiting.
fn closed(stream: &BufReader<TcpStream>) -> bool {
    if !stream.buffer().is_empty() {
        return true;
    }
    let mut byte = [0u8];
    match stream.get_ref().try_read(&mut byte) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Sends `GET /` and reads the response.
async fn request(stream: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: keepalive\r\n\r\n")
        .await?;
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut length, mut close, mut generation) = (0usize, false, None);
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "connection" => close |= value.eq_ignore_ascii_case("close"),
            "x-baton-generation" => generation = value.parse().ok(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    Ok((status, close, generation))
}
