//! WebSocket clients for the guarantees table: each connects to `/ws`,
//! reads the greeting, then sends a text every 20 ms and reads its answer,
//! until the server ends the session; it then notes how (with a close frame,
//! or cut) and connects again, until the run is stopped. A session that
//! moves to the next generation (`axum-app`'s) is never ended.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Between two texts of a session.
const PING_EVERY: Duration = Duration::from_millis(20);

/// What the clients counted.
#[derive(Debug, Default)]
pub struct WsReport {
    /// Sessions opened.
    pub sessions: u64,
    /// Sessions the server ended.
    pub ended: u64,
    /// Of those, ended without a close frame (reset, EOF, no answer).
    pub cut: u64,
    /// Connections or handshakes that failed.
    pub failed_handshakes: u64,
    /// Texts received (greetings and echoes).
    pub texts: u64,
}

impl WsReport {
    /// Sessions opened, and handshakes that failed.
    pub fn attempts(&self) -> u64 {
        self.sessions + self.failed_handshakes
    }

    /// Sessions cut and handshakes failed.
    pub fn failed(&self) -> u64 {
        self.cut + self.failed_handshakes
    }

    pub fn summary(&self) -> String {
        format!(
            "sessions={} ended={} cut={} failed_handshakes={} texts={}",
            self.sessions, self.ended, self.cut, self.failed_handshakes, self.texts
        )
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    sessions: AtomicU64,
    ended: AtomicU64,
    cut: AtomicU64,
    failed_handshakes: AtomicU64,
    texts: AtomicU64,
}

/// Clients under way on a thread of their own.
pub struct WsLoad {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WsLoad {
    /// `clients` clients of `ws://ADDR/ws`, for at most `bound`; each step
    /// (handshake, echo) within `patience`.
    pub fn start(addr: SocketAddr, clients: usize, bound: Duration, patience: Duration) -> WsLoad {
        let shared = Arc::new(Shared::default());
        let mine = Arc::clone(&shared);
        let end = Instant::now() + bound;
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime for the WebSocket clients");
            runtime.block_on(async {
                let tasks: Vec<_> = (0..clients)
                    .map(|_| tokio::spawn(client(addr, end, patience, Arc::clone(&mine))))
                    .collect();
                for task in tasks {
                    let _ = task.await;
                }
            });
        });
        WsLoad {
            shared,
            thread: Some(thread),
        }
    }

    /// Waits until `n` sessions were opened; false after `patience`.
    pub fn wait_for_sessions(&self, n: u64, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        while self.shared.sessions.load(Ordering::Relaxed) < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stops the clients (each leaves its session with a close frame of
    /// its own, not counted) and returns the counts.
    pub fn stop(mut self) -> WsReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        let s = &self.shared;
        WsReport {
            sessions: s.sessions.load(Ordering::Relaxed),
            ended: s.ended.load(Ordering::Relaxed),
            cut: s.cut.load(Ordering::Relaxed),
            failed_handshakes: s.failed_handshakes.load(Ordering::Relaxed),
            texts: s.texts.load(Ordering::Relaxed),
        }
    }
}

impl Drop for WsLoad {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// How a session ended.
enum End {
    /// The server sent a close frame.
    Closed,
    /// The connection failed or ended without one, or the server stopped
    /// answering.
    Cut,
    /// This side stopped the run.
    Stopped,
}

async fn client(addr: SocketAddr, end: Instant, patience: Duration, shared: Arc<Shared>) {
    let url = format!("ws://{addr}/ws");
    let running = || !shared.stop.load(Ordering::Relaxed) && Instant::now() < end;
    while running() {
        let connected =
            tokio::time::timeout(patience, tokio_tungstenite::connect_async(&url)).await;
        let Ok(Ok((mut socket, _))) = connected else {
            shared.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        let ended = 'session: loop {
            // The greeting first, then an echo for each text.
            loop {
                match tokio::time::timeout(patience, socket.next()).await {
                    Ok(Some(Ok(Message::Text(_)))) => {
                        shared.texts.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(Some(Ok(Message::Close(Some(_))))) => break 'session End::Closed,
                    Ok(Some(Ok(Message::Close(None)))) => break 'session End::Closed,
                    Ok(Some(Ok(_))) => continue,
                    Ok(Some(Err(_)) | None) | Err(_) => break 'session End::Cut,
                }
            }
            if !running() {
                break End::Stopped;
            }
            tokio::time::sleep(PING_EVERY).await;
            if socket.send(Message::Text("ping".into())).await.is_err() {
                // The server may have closed meanwhile: its close frame
                // is still to be read.
                break loop {
                    match tokio::time::timeout(patience, socket.next()).await {
                        Ok(Some(Ok(Message::Close(_)))) => break End::Closed,
                        Ok(Some(Ok(_))) => continue,
                        _ => break End::Cut,
                    }
                };
            }
        };
        match ended {
            End::Stopped => {
                let _ = tokio::time::timeout(patience, socket.close(None)).await;
                return;
            }
            End::Closed => {
                shared.ended.fetch_add(1, Ordering::Relaxed);
            }
            End::Cut => {
                shared.ended.fetch_add(1, Ordering::Relaxed);
                shared.cut.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Let tungstenite finish the close handshake.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = socket.next().await {}
        })
        .await;
    }
}
