//! One connection from handshake to close: HTTP/1.1 or HTTP/2 (told apart by
//! the client's first bytes), upgrades allowed, and at a drain either the
//! handover of an idle HTTP/1.1 connection to the next generation or the
//! polite goodbye once the connection's drain notice fires.

use super::accept::Accept;
use super::registry::{Counted, DrainNotice, Registration};
use super::rewind::Rewind;
use super::session::SessionKit;
use super::{BoxError, HyperService, ResponseBody};
use crate::handover::{Answer, Handover, MAX_PENDING};
use crate::Drain;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, Instant};

/// The first bytes of every HTTP/2 connection with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection needs besides its stream.
pub(super) struct Setup<S> {
    pub(super) service: S,
    pub(super) shared: Shared,
}

impl<S: Clone> Clone for Setup<S> {
    fn clone(&self) -> Setup<S> {
        Setup {
            service: self.service.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// What every connection of a server shares.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) h1: Arc<http1::Builder>,
    pub(super) h2: Arc<http2::Builder<TokioExecutor>>,
    pub(super) drain: Drain,
    pub(super) idle_grace: Duration,
    pub(super) handshake_timeout: Option<Duration>,
    /// The worker's handovers (supervised workers only): counts the
    /// connections closed at drain, and moves them when `address` is set.
    pub(super) handover: Option<Handover>,
    /// The listener's handover address, when its connections move at a
    /// drain (`[worker] handover`, a listener without TLS).
    pub(super) address: Option<Arc<str>>,
    /// What a session upgraded from a request takes to move, with `address`.
    pub(super) kit: Option<SessionKit>,
}

/// Drives one accepted connection: its handshake, then [`serve`].
pub(super) async fn drive<L, S, B>(
    handshake: impl Future<Output = io::Result<L::Io>>,
    registration: Registration,
    setup: Setup<S>,
) where
    L: Accept,
    S: HyperService<B>,
    B: ResponseBody,
{
    let io = match setup.shared.handshake_timeout {
        Some(limit) => timeout(limit, handshake).await.ok(),
        None => Some(handshake.await),
    };
    let Some(Ok(io)) = io else { return };
    serve::<L, S, B>(io, None, registration, setup).await;
}

/// Serves a connection until it ends or moves to another worker: one
/// accepted (`pending` is `None`), or one handed over by another worker with
/// the bytes of its next request read there (HTTP/1.1, between two
/// requests).
///
/// At a drain, an HTTP/1.1 connection whose listener hands over stops at its
/// next point between two requests (once the response in flight is written,
/// with whatever bytes of the next request were read already) and is offered
/// to the next generation; taken, this worker lets go of it without a word.
/// Otherwise (HTTP/2, TLS, no taker), once its notice fires, an HTTP/2
/// connection gets hyper's graceful shutdown (GOAWAY with the highest
/// stream id, a PING, then GOAWAY with the last stream actually received, so
/// no stream the client already sent is refused; streams in flight finish),
/// and an HTTP/1.1 connection answers further requests with `Connection:
/// close` and is closed unprompted only after `idle_grace` with no request
/// in flight.
pub(super) async fn serve<L, S, B>(
    io: L::Io,
    pending: Option<Bytes>,
    registration: Registration,
    setup: Setup<S>,
) where
    L: Accept,
    S: HyperService<B>,
    B: ResponseBody,
{
    let Setup { service, shared } = setup;
    let shared = &shared;
    let notice = registration.notice(shared.drain.clone());
    let mut io = Counted::new(io, registration);
    let handing = shared.address.is_some();
    // A connection drained before its first request comes to rest at once.
    let mut rested = false;
    let mut prefix = match pending {
        // Handed over with the start of its next request.
        Some(pending) if !pending.is_empty() => pending,
        // Accepted, or handed over idle: nothing is known of its next
        // request until its first bytes come.
        _ => {
            let stop = async {
                if handing {
                    shared.drain.wait().await;
                } else {
                    notice.notified().await;
                }
            };
            match sniff(&mut io, stop).await {
                Sniffed::Http1(prefix) => prefix,
                Sniffed::Http2(prefix) => {
                    let io = TokioIo::new(Rewind::new(prefix, io));
                    let service = Tracked::new(&service, notice.clone(), false, shared);
                    let activity = service.activity.clone();
                    let connection = Box::pin(shared.h2.serve_connection(io, service));
                    return goodbye(connection, &activity, &notice, shared).await;
                }
                Sniffed::Idle if handing => {
                    rested = true;
                    Bytes::new()
                }
                Sniffed::Idle => return count_closed(shared),
                Sniffed::Gone => return,
            }
        }
    };
    let mut handing = handing;
    loop {
        if handing {
            // Either it ended, or it rests between two requests.
            let (stopped, pending) = if rested {
                (io, prefix)
            } else {
                let tracked = Tracked::new(&service, notice.clone(), true, shared);
                match serve_until_idle(io, prefix, &notice, tracked, shared).await {
                    Some(stopped) => stopped,
                    None => return,
                }
            };
            match offer::<L>(stopped, pending, shared).await {
                Offered::Gone => return,
                Offered::Back(back, pending) => {
                    (io, prefix, handing) = (back, pending, false);
                }
            }
        } else {
            let io = Rewind::new(prefix, io);
            let service = Tracked::new(&service, notice.clone(), false, shared);
            let activity = service.activity.clone();
            let connection = shared
                .h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            return goodbye(connection, &activity, &notice, shared).await;
        }
    }
}

/// How a connection's first bytes are read.
enum Sniffed {
    /// HTTP/1.1: the bytes read.
    Http1(Bytes),
    /// HTTP/2 with prior knowledge: the bytes read.
    Http2(Bytes),
    /// `stop` came before a byte did.
    Idle,
    /// The client closed it, or reading failed.
    Gone,
}

/// Reads until the first bytes tell HTTP/2's preface from anything else (as
/// hyper-util's automatic builder does), or `stop` completes while nothing
/// was read.
async fn sniff<I: AsyncRead + Unpin>(io: &mut I, stop: impl Future<Output = ()>) -> Sniffed {
    let mut read = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; H2_PREFACE.len()];
    tokio::pin!(stop);
    let mut stopped = false;
    loop {
        let want = H2_PREFACE.len() - read.len();
        let n = tokio::select! {
            biased;
            n = io.read(&mut buf[..want]) => n,
            _ = &mut stop, if !stopped => {
                if read.is_empty() {
                    return Sniffed::Idle;
                }
                // A part of the preface: wait for the rest.
                stopped = true;
                continue;
            }
        };
        match n {
            Ok(0) | Err(_) => return Sniffed::Gone,
            Ok(n) => read.extend_from_slice(&buf[..n]),
        }
        if !H2_PREFACE.starts_with(&read) {
            return Sniffed::Http1(read.into());
        }
        if read.len() == H2_PREFACE.len() {
            return Sniffed::Http2(read.into());
        }
    }
}

/// The connection served over HTTP/1.1 until the drain, then until its next
/// point between two requests: its stream and the bytes read but not
/// served. `None` when it ended (closed by the client, upgraded, or closed
/// politely as without a handover because it never came to rest).
async fn serve_until_idle<I, S, B>(
    io: Counted<I>,
    prefix: Bytes,
    notice: &DrainNotice,
    service: Tracked<S>,
    setup: &Shared,
) -> Option<(Counted<I>, Bytes)>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HyperService<B>,
    B: ResponseBody,
{
    let io = Rewind::new(prefix, io);
    let held = io.hold();
    let activity = service.activity.clone();
    let handing = service.handing.clone();
    let mut connection = setup
        .h1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        biased;
        _ = &mut connection => return None,
        _ = setup.drain.wait() => {}
    }
    let drained_at = Instant::now();
    let give_up = drained_at + setup.idle_grace;
    let served_at_drain = activity.rest().1;
    loop {
        // Every select below polls the connection first, so a request that
        // had reached the socket is parsed, and counted in flight, before
        // `activity` is read.
        let (idle, served) = activity.rest();
        if !idle {
            // A client that pipelines request after request never lets it
            // rest: past `idle_grace` it is told to go instead. A single
            // long request is waited for.
            if served > served_at_drain && Instant::now() >= give_up {
                break;
            }
            tokio::select! {
                biased;
                _ = &mut connection => return None,
                _ = activity.became_idle.notified() => {}
                _ = sleep_until(give_up), if served > served_at_drain => {}
            }
            continue;
        }
        if served == 0 {
            // Its first request is partly read: it rests once that is
            // answered. One that never completes is closed as without a
            // handover.
            if Instant::now() >= give_up {
                break;
            }
            tokio::select! {
                biased;
                _ = &mut connection => return None,
                _ = activity.became_idle.notified() => {}
                _ = sleep_until(give_up) => {}
            }
            continue;
        }
        // Between two requests: hyper, idle, ends the connection at once
        // (its shutdown held back) and gives back the stream and the bytes of
        // the next request it read already. Not idle after all (a response
        // still being flushed, a request body left unread), it closes the
        // connection after the exchange under way, as without a handover.
        held.store(true, Ordering::Release);
        Pin::new(&mut connection).graceful_shutdown();
        let ended =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut connection).poll(cx))).await;
        match ended {
            Poll::Ready(Ok(())) => {
                let parts = connection.into_parts()?;
                let (left, io) = parts.io.into_inner().into_parts();
                let pending = if left.is_empty() {
                    parts.read_buf
                } else {
                    [left, parts.read_buf].concat().into()
                };
                return Some((io, pending));
            }
            Poll::Ready(Err(_)) => return None,
            Poll::Pending => {
                held.store(false, Ordering::Release);
                handing.store(false, Ordering::Release);
                let _ = connection.await;
                count_closed(setup);
                return None;
            }
        }
    }
    // Never came to rest: the goodbye without a handover.
    handing.store(false, Ordering::Release);
    goodbye(connection, &activity, notice, setup).await;
    None
}

/// What became of a connection offered to the next generation.
enum Offered<I> {
    /// Another worker has it, or it is closed.
    Gone,
    /// It stays: its stream and its pending bytes.
    Back(Counted<I>, Bytes),
}

/// Offers a connection stopped between two requests to the next
/// generation.
async fn offer<L: Accept>(io: Counted<L::Io>, pending: Bytes, setup: &Shared) -> Offered<L::Io> {
    let (Some(handover), Some(address)) = (&setup.handover, &setup.address) else {
        return Offered::Back(io, pending);
    };
    if pending.len() > MAX_PENDING {
        return Offered::Back(io, pending);
    }
    let (io, registration) = io.into_parts();
    let fd = match L::release(io) {
        Ok(fd) => fd,
        Err(io) => return Offered::Back(Counted::new(io, registration), pending),
    };
    // The copy travels; this worker keeps its own until the answer.
    let copy = match fd.try_clone() {
        Ok(copy) => copy,
        Err(_) => return restored::<L>(fd, registration, pending, setup),
    };
    match handover.offer(address, copy, pending.to_vec(), None).await {
        // Dropping this worker's copy closes nothing: the socket lives on
        // in the worker that took it, and nothing was written.
        Answer::Taken | Answer::Unknown => Offered::Gone,
        Answer::Refused(_) => restored::<L>(fd, registration, pending, setup),
    }
}

/// A connection offered and not taken, served again.
fn restored<L: Accept>(
    fd: std::os::fd::OwnedFd,
    registration: Registration,
    pending: Bytes,
    setup: &Shared,
) -> Offered<L::Io> {
    match L::restore(fd) {
        Ok(io) => Offered::Back(Counted::new(io, registration), pending),
        Err(_) => {
            count_closed(setup);
            Offered::Gone
        }
    }
}

/// One more connection closed at the drain instead of handed over.
fn count_closed(setup: &Shared) {
    if let Some(handover) = &setup.handover {
        handover.closed_at_drain();
    }
}

/// A hyper connection that can be told to end politely.
trait Graceful: Future<Output = hyper::Result<()>> + Unpin {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

impl<I, S, B> Graceful for Pin<Box<http2::Connection<I, S, TokioExecutor>>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful_shutdown()
    }
}

/// Serves until the notice fires, then says goodbye as described on
/// [`serve`].
async fn goodbye<C: Graceful>(
    mut connection: C,
    activity: &Activity,
    notice: &DrainNotice,
    setup: &Shared,
) {
    tokio::select! {
        biased;
        _ = &mut connection => return,
        _ = notice.notified() => {}
    }
    let noticed_at = Instant::now();
    loop {
        // Every select below polls the connection first, so a request that had
        // reached the socket is parsed, and counted in flight, before the idle
        // check reads `activity`.
        if activity.is_http2() {
            break;
        }
        match activity.idle_since() {
            None => tokio::select! {
                biased;
                _ = &mut connection => return count_closed(setup),
                _ = activity.became_idle.notified() => {}
            },
            Some(since) => {
                let close_at = since.max(noticed_at) + setup.idle_grace;
                if Instant::now() >= close_at {
                    break;
                }
                tokio::select! {
                    biased;
                    _ = &mut connection => return count_closed(setup),
                    _ = sleep_until(close_at) => {}
                }
            }
        }
    }
    // HTTP/1.1: idle, hyper closes it now. HTTP/2: GOAWAY; hyper closes the
    // connection when its last stream ends.
    Pin::new(&mut connection).graceful_shutdown();
    let _ = connection.await;
    count_closed(setup);
}

/// What a connection's requests are doing: how many are in flight, since
/// when that number last changed, and whether they came over HTTP/2.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
    became_idle: Notify,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    since: Instant,
    http2: bool,
    /// Requests answered (their responses written) so far.
    served: u64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                since: Instant::now(),
                http2: false,
                served: 0,
            }),
            became_idle: Notify::new(),
        }
    }
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Since when no request has been in flight; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.lock();
        (state.in_flight == 0).then_some(state.since)
    }

    fn is_http2(&self) -> bool {
        self.lock().http2
    }

    /// Whether no request is in flight, and how many were answered.
    fn rest(&self) -> (bool, u64) {
        let state = self.lock();
        (state.in_flight == 0, state.served)
    }
}

/// One request in flight: from the service call until hyper drops the
/// response body, which it does once the body is written.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>, http2: bool) -> InFlight {
        let mut state = activity.lock();
        state.in_flight += 1;
        state.since = Instant::now();
        state.http2 |= http2;
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        state.served += 1;
        state.since = Instant::now();
        if state.in_flight == 0 {
            self.0.became_idle.notify_one();
        }
    }
}

/// The user's service, counting requests in flight, handing each request
/// its connection's [`DrainNotice`], and adding `Connection: close` to
/// HTTP/1.1 responses completed once the connection was told to go, unless
/// it is to be handed over.
struct Tracked<S> {
    // Boxed: hyper's HTTP/1.1 connection is then `Unpin` whatever `S`, so
    // that its parts can be taken back once it ends.
    inner: Box<S>,
    activity: Arc<Activity>,
    notice: DrainNotice,
    /// The connection moves to another worker at the drain rather than
    /// being closed.
    handing: Arc<AtomicBool>,
    /// Put in every request's extensions, for a session upgraded from it.
    kit: Option<SessionKit>,
}

impl<S: Clone> Clone for Tracked<S> {
    fn clone(&self) -> Tracked<S> {
        Tracked {
            inner: self.inner.clone(),
            activity: self.activity.clone(),
            notice: self.notice.clone(),
            handing: self.handing.clone(),
            kit: self.kit.clone(),
        }
    }
}

impl<S: Clone> Tracked<S> {
    fn new(service: &S, notice: DrainNotice, handing: bool, shared: &Shared) -> Tracked<S> {
        Tracked {
            inner: Box::new(service.clone()),
            activity: Arc::new(Activity::default()),
            notice,
            handing: Arc::new(AtomicBool::new(handing)),
            kit: shared.kit.clone(),
        }
    }
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static>,
    S::Error: Into<BoxError> + 'static,
    B: Body + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let http2 = request.version() == Version::HTTP_2;
        // Counted here, synchronously, so the request is in flight from the
        // moment hyper has parsed its head.
        let in_flight = InFlight::begin(&self.activity, http2);
        request.extensions_mut().insert(self.notice.clone());
        if let Some(kit) = &self.kit {
            request.extensions_mut().insert(kit.clone());
        }
        let response = self.inner.call(request);
        let notice = self.notice.clone();
        let handing = self.handing.clone();
        Box::pin(async move {
            let mut response = response.await?;
            // HTTP/2 says goodbye with GOAWAY; an upgrade keeps its connection.
            if notice.is_notified()
                && !handing.load(Ordering::Acquire)
                && !http2
                && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                // hyper closes the connection after writing a response that
                // says so; the client, having read it all, reconnects.
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| TrackedBody {
                inner: Box::pin(body),
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request counted in flight until dropped.
struct TrackedBody<B> {
    inner: Pin<Box<B>>,
    _in_flight: InFlight,
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
