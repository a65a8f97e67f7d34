//! The connections a server holds, from accept until their socket is
//! dropped: also after an HTTP upgrade, when hyper hands the socket to the
//! handler (a WebSocket, say) and no longer drives it. Each one has a drain
//! notice, fired at its turn in the close spread, and a kill switch for the
//! drain deadline.

use crate::Drain;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The open connections of one server.
#[derive(Debug, Default)]
pub(super) struct Registry {
    entries: Mutex<Entries>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Entries {
    next: u64,
    open: BTreeMap<u64, Switches>,
}

#[derive(Debug, Clone, Default)]
struct Switches {
    notice: CancellationToken,
    kill: CancellationToken,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection until the returned registration is dropped.
    pub(super) fn register(self: &Arc<Registry>) -> Registration {
        let switches = Switches::default();
        let id = {
            let mut entries = self.lock();
            let id = entries.next;
            entries.next += 1;
            entries.open.insert(id, switches.clone());
            id
        };
        self.changed.notify_one();
        Registration {
            id,
            registry: self.clone(),
            switches,
        }
    }

    /// How many connections are open.
    pub(super) fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Completes after a connection opened or closed since the last call.
    pub(super) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The drain notices of the open connections, oldest first.
    pub(super) fn notices(&self) -> Vec<CancellationToken> {
        let entries = self.lock();
        entries.open.values().map(|s| s.notice.clone()).collect()
    }

    /// Makes every open connection's reads and writes fail, so that whoever
    /// holds it (hyper or an upgraded connection's handler) drops it.
    pub(super) fn kill_all(&self) {
        for switches in self.lock().open.values() {
            switches.kill.cancel();
        }
    }
}

/// One open connection, counted until dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    registry: Arc<Registry>,
    switches: Switches,
}

impl Registration {
    /// The notice handlers of this connection's requests get.
    pub(super) fn notice(&self, drain: Drain) -> DrainNotice {
        DrainNotice {
            notice: self.switches.notice.clone(),
            drain,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().open.remove(&self.id);
        self.registry.changed.notify_one();
    }
}

/// Tells a request's handler that its connection should go: put in every
/// request's extensions (in axum, extract it with
/// `Extension<DrainNotice>`). It fires when the worker drains, at the
/// connection's turn in the close spread
/// ([`ServeOptions::close_spread`](super::ServeOptions::close_spread)).
///
/// A plain request needs nothing: the server closes its connection politely.
/// A handler holding a connection of its own, such as a WebSocket after the
/// upgrade, awaits [`notified`](DrainNotice::notified) and says goodbye (a
/// close frame with code 1012, Service Restart); the client reconnects and
/// reaches the next generation. Whatever is still open at the drain deadline
/// is cut.
///
/// With axum (the whole handler is in `examples/axum`):
///
/// ```no_run
/// use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
/// use axum::{response::Response, Extension};
/// use baton_worker::http::DrainNotice;
///
/// async fn ws(upgrade: WebSocketUpgrade, Extension(notice): Extension<DrainNotice>) -> Response {
///     upgrade.on_upgrade(move |mut socket: WebSocket| async move {
///         notice.notified().await; // or select! it with socket.recv()
///         let goodbye = CloseFrame { code: close_code::RESTART, reason: "restart".into() };
///         let _ = socket.send(Message::Close(Some(goodbye))).await;
///     })
/// }
/// ```
#[derive(Debug, Clone)]
pub struct DrainNotice {
    notice: CancellationToken,
    drain: Drain,
}

impl DrainNotice {
    /// Completes when this connection is told to go; returns the drain
    /// deadline, by which the worker cuts it.
    ///
    /// ```no_run
    /// # async fn run(notice: baton_worker::http::DrainNotice) {
    /// let deadline = notice.notified().await;
    /// // say goodbye on the connection before `deadline`
    /// # }
    /// ```
    pub async fn notified(&self) -> Instant {
        self.notice.cancelled().await;
        self.drain.deadline().unwrap_or_else(Instant::now)
    }

    /// Whether this connection has been told to go.
    ///
    /// ```no_run
    /// # fn run(notice: &baton_worker::http::DrainNotice) {
    /// if notice.is_notified() {
    ///     // a long-poll handler answers now instead of waiting
    /// }
    /// # }
    /// ```
    pub fn is_notified(&self) -> bool {
        self.notice.is_cancelled()
    }

    /// The drain deadline, once draining.
    ///
    /// ```no_run
    /// # fn run(notice: &baton_worker::http::DrainNotice) {
    /// if let Some(deadline) = notice.deadline() {
    ///     println!("the worker drains; this connection is cut at {deadline:?}");
    /// }
    /// # }
    /// ```
    pub fn deadline(&self) -> Option<Instant> {
        self.drain.deadline()
    }

    /// A token cancelled with the notice, for `select!` or `tokio_util` code.
    ///
    /// ```no_run
    /// # async fn run(notice: baton_worker::http::DrainNotice) {
    /// let token = notice.token();
    /// tokio::select! {
    ///     _ = token.cancelled() => { /* say goodbye */ }
    ///     _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => { /* long poll done */ }
    /// }
    /// # }
    /// ```
    pub fn token(&self) -> CancellationToken {
        self.notice.clone()
    }
}

/// A connection's stream, counted while it exists and failing every read and
/// write once killed.
pub(crate) struct Counted<I> {
    io: I,
    kill: CancellationToken,
    // One waiter per direction: an upgraded connection is often split, its
    // reads and writes polled from different tasks.
    killed_read: Pin<Box<WaitForCancellationFutureOwned>>,
    killed_write: Pin<Box<WaitForCancellationFutureOwned>>,
    registration: Registration,
}

impl<I> Counted<I> {
    pub(super) fn new(io: I, registration: Registration) -> Counted<I> {
        let kill = registration.switches.kill.clone();
        Counted {
            io,
            killed_read: Box::pin(kill.clone().cancelled_owned()),
            killed_write: Box::pin(kill.clone().cancelled_owned()),
            kill,
            registration,
        }
    }

    /// The stream, and its registration (the connection stays counted while
    /// the registration is held).
    pub(super) fn into_parts(self) -> (I, Registration) {
        (self.io, self.registration)
    }

    /// The stream.
    pub(crate) fn get_ref(&self) -> &I {
        &self.io
    }
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection cut at the drain deadline",
    )
}

/// Whether `kill` fired; otherwise registers `cx` to be woken when it does.
fn is_killed(
    kill: &CancellationToken,
    waiter: &mut Pin<Box<WaitForCancellationFutureOwned>>,
    cx: &mut Context<'_>,
) -> bool {
    kill.is_cancelled() || waiter.as_mut().poll(cx).is_ready()
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if is_killed(&this.kill, &mut this.killed_read, cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if is_killed(&this.kill, &mut this.killed_write, cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if is_killed(&this.kill, &mut this.killed_write, cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if is_killed(&this.kill, &mut this.killed_write, cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if is_killed(&this.kill, &mut this.killed_write, cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
