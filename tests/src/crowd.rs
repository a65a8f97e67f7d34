//! Clients that crowd a server without asking it anything useful: silent
//! connections, a slowloris trickling one header byte a second per
//! connection, and idle keep-alive clients. Each kind keeps its count of
//! connections open (one that the server closed is opened again, once a
//! second), until the crowd is stopped or its deadline passes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a crowd's connections do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Connect and send nothing.
    Silent,
    /// Send a request's headers one byte a second, never finishing.
    Slowloris,
    /// Send one request, read its answer, then hold the connection.
    IdleKeepAlive,
}

/// Threads holding connections open to one address.
pub struct Crowd {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    opened: Arc<AtomicU64>,
}

impl Crowd {
    /// Starts `count` connections of `kind` to `addr`, held for at most
    /// `limit`.
    pub fn start(addr: SocketAddr, kind: Kind, count: usize, limit: Duration) -> Crowd {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        // A few threads, each ticking over its share once a second.
        let threads = (0..4)
            .map(|t| {
                let share = count / 4 + usize::from(t < count % 4);
                let (stop, opened) = (stop.clone(), opened.clone());
                std::thread::spawn(move || hold(addr, kind, share, limit, &stop, &opened))
            })
            .collect();
        Crowd {
            stop,
            threads,
            opened,
        }
    }

    /// Connections opened so far (reopened ones counted again).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn open(addr: SocketAddr, kind: Kind) -> Option<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    match kind {
        Kind::Silent => {}
        Kind::Slowloris => stream.write_all(b"G").ok()?,
        Kind::IdleKeepAlive => {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: crowd\r\n\r\n")
                .ok()?;
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
        }
    }
    stream.set_nonblocking(true).ok()?;
    Some(stream)
}

/// Whether the server has closed `stream` (reads end of file or an error).
fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

const SLOW_HEADERS: &[u8] = b"ET /healthz HTTP/1.1\r\nHost: crowd\r\nX-Slow: ";

fn hold(
    addr: SocketAddr,
    kind: Kind,
    count: usize,
    limit: Duration,
    stop: &AtomicBool,
    opened: &AtomicU64,
) {
    let end = Instant::now() + limit;
    let mut held: Vec<(Option<TcpStream>, usize)> = (0..count).map(|_| (None, 0)).collect();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        let tick = Instant::now();
        for (slot, sent) in held.iter_mut() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let alive = match slot {
                Some(stream) => match kind {
                    Kind::Slowloris => {
                        let byte = SLOW_HEADERS.get(*sent).copied().unwrap_or(b'a');
                        *sent += 1;
                        stream.write(&[byte]).is_ok_and(|n| n == 1) && !closed(stream)
                    }
                    _ => !closed(stream),
                },
                None => false,
            };
            if !alive {
                *slot = open(addr, kind);
                *sent = 0;
                if slot.is_some() {
                    opened.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // One byte, or one reopening, a second per connection.
        while tick.elapsed() < Duration::from_secs(1) && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
