//! HTTP/1.1 and HTTP/2 serving that hands over at a reload without failing a
//! request.
//!
//! A keep-alive client may write its next request at any moment, so a server
//! that closes a keep-alive connection can meet a request already on the
//! wire: the client reads end of file or a reset and, unless it retries,
//! fails the request. That is how nginx and HAProxy lose requests at a reload.
//!
//! [`serve`] closes a connection only when the client cannot be using it.
//! Once draining it stops accepting (the listening socket is shared, so the
//! next generation keeps accepting from the same queue). Under baton, with
//! [`ServeOptions::handover`] (as [`Worker::serve_options`](crate::Worker::serve_options)
//! sets it), each HTTP/1.1 connection of a listener without TLS is then
//! handed to a worker of the current generation between two requests, with
//! the bytes of its next request already read: the client sees no close.
//! Every other connection, and one the next generation did not take, is told
//! to go, spread over [`ServeOptions::close_spread`]:
//!
//! - **HTTP/1.1**: every further request is answered normally, with
//!   `Connection: close`: the client reads the whole response, learns the
//!   connection is done and opens a new one, which the new generation
//!   accepts. A connection with no request in flight is closed unprompted
//!   only once it has been idle for [`ServeOptions::idle_grace`].
//! - **HTTP/2** (with prior knowledge, h2c, or by ALPN behind a TLS acceptor,
//!   see [`with_acceptor`]): the graceful GOAWAY pattern. A first GOAWAY
//!   carries the highest possible stream id and a PING; after the client's
//!   answer a second GOAWAY names the last stream actually received, so no
//!   stream the client already sent is refused. Streams in flight finish and
//!   the connection closes with its last stream.
//! - **Upgrades** (WebSocket): the connection stays counted after the
//!   upgrade. Its handler learns it should go from the [`DrainNotice`] in the
//!   request's extensions and closes it (with a close frame, code 1012).
//!
//! Whatever is still open at the drain deadline is cut, upgraded connections
//! included.
//!
//! The service is a hyper [`Service`] for [`serve`],
//! or a tower `Service` such as an `axum::Router` or tonic's `Routes` for
//! [`serve_tower`]. [`Worker::serve`](crate::Worker::serve) does the common
//! case in one call.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use http_body_util::Full;
//! use hyper::body::Bytes;
//! use hyper::{service::service_fn, Response};
//!
//! let mut worker = baton_worker::Worker::builder()
//!     .listener("http", "127.0.0.1:8080")
//!     .start()
//!     .await?;
//! let listener = worker.tcp_listener("http")?;
//! worker.ready().await?;
//! let service = service_fn(|_request| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi\n"))))
//! });
//! baton_worker::http::serve(listener, service, worker.drain(), worker.serve_options()).await?;
//! # Ok(()) }
//! ```

mod accept;
mod connection;
mod count;
mod registry;
mod rewind;
pub(crate) mod session;
mod spread;
mod worker;
#[cfg(feature = "ws")]
pub mod ws;

pub use crate::handover::Handover;
pub use accept::{with_acceptor, Accept, WithAcceptor};
pub use registry::DrainNotice;

use crate::Drain;
use connection::{drive, serve as serve_connection, Setup, Shared};
use count::ConnectionCount;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::service::TowerToHyperService;
use registry::Registry;
use spread::Spread;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the accept loop pauses after an error such as `EMFILE`, which
/// would otherwise repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// With the default close spread, how long a draining server waits before
/// its first goodbye: the generation's other workers were told to drain at
/// the same moment, and by then have stopped accepting too, so a client
/// told to go reconnects to the next generation rather than to one of them.
const SIBLINGS_STOP: Duration = Duration::from_millis(100);

/// How often a draining server re-reads the deadline, which a second drain
/// request may have moved earlier.
const DEADLINE_POLL: Duration = Duration::from_millis(100);

/// Options for [`serve`] and [`serve_tower`].
///
/// ```no_run
/// # async fn run(mut worker: baton_worker::Worker, app: axum::Router) -> Result<(), baton_worker::Error> {
/// use std::time::Duration;
///
/// let listener = worker.tcp_listener("http")?;
/// let options = baton_worker::http::ServeOptions {
///     header_read_timeout: Some(Duration::from_secs(75)), // the load balancer's keep-alive is 60 s
///     close_spread: Some(Duration::from_secs(2)),
///     ..worker.serve_options() // keeps the connection reports to the master
/// };
/// worker.ready().await?;
/// baton_worker::http::serve_tower(listener, app, worker.drain(), options).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ServeOptions {
    /// Once an HTTP/1.1 connection is told to go, how long it may stay open
    /// with no request in flight, waiting for one (answered with
    /// `Connection: close`), before it is closed. Default 1 s.
    pub idle_grace: Duration,
    /// How long a client may take to send a request head. hyper also applies
    /// it to an idle keep-alive HTTP/1.1 connection waiting for its next
    /// request, so it doubles as the keep-alive timeout; it also bounds an
    /// acceptor's handshake. `None` disables it. Default 30 s.
    pub header_read_timeout: Option<Duration>,
    /// The window over which a draining server tells its connections to go
    /// (`Connection: close`, GOAWAY, [`DrainNotice`]), one after another in
    /// the order they were accepted, like HAProxy's `close-spread-time`.
    /// `None` (the default) means a tenth of the time left until the drain
    /// deadline, at most 5 s, starting 100 ms after the drain (the
    /// generation's other workers stop accepting meanwhile, so nobody is
    /// told to go only to reconnect to one of them); `Some(Duration::ZERO)`
    /// tells all at once.
    pub close_spread: Option<Duration>,
    /// Called with the number of open connections (upgraded ones included)
    /// when it changes, at most once per 100 ms and once more with the final
    /// count when serving ends; always from the task running `serve`, so
    /// calls never overlap or arrive out of order.
    /// [`Worker::serve_options`](crate::Worker::serve_options) hooks
    /// [`Worker::report_connections`](crate::Worker::report_connections)
    /// here. Default none.
    pub on_connections: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// The worker's handovers: at a drain, each idle HTTP/1.1 connection
    /// (between two requests, with the bytes of a next request already read)
    /// moves to a worker of the current generation instead of being closed,
    /// when the listener allows it (a TCP or Unix listener without TLS) and
    /// `[worker] handover` is on; one that cannot move is closed as
    /// described above. [`Worker::serve_options`](crate::Worker::serve_options)
    /// sets it; `None` (the default, and standalone) closes every
    /// connection. [`Worker::serve`](crate::Worker::serve) tells the master
    /// it takes connections before it reports ready; a program that calls
    /// `ready` and then `serve` itself is told a moment later, and a
    /// connection offered in between is closed as without a handover.
    pub handover: Option<Handover>,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            idle_grace: Duration::from_secs(1),
            header_read_timeout: Some(Duration::from_secs(30)),
            close_spread: None,
            on_connections: None,
            handover: None,
        }
    }
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeOptions")
            .field("idle_grace", &self.idle_grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("close_spread", &self.close_spread)
            .field(
                "on_connections",
                &self.on_connections.as_ref().map(|_| ".."),
            )
            .field("handover", &self.handover)
            .finish()
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` with the hyper `service` until
/// `drain` fires and every connection has finished, as described in the
/// [module docs](self).
///
/// `listener` is a tokio `TcpListener` or `UnixListener`, or either behind
/// a TLS acceptor ([`with_acceptor`]). Each connection runs in its own task
/// with a clone of `service`. Accept errors such as `EMFILE` or
/// `ECONNABORTED` are retried; the only error returned is one saying the
/// listener itself is unusable (`EBADF`, `EINVAL` for a socket that is not
/// listening, `ENOTSOCK`), and returning it drops the open connections.
///
/// ```no_run
/// # async fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
/// use http_body_util::Full;
/// use hyper::body::Bytes;
/// use hyper::{service::service_fn, Response};
///
/// let listener = worker.unix_listener("http")?; // a tokio TcpListener works the same
/// let service = service_fn(|_request| async {
///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi\n"))))
/// });
/// worker.ready().await?;
/// baton_worker::http::serve(listener, service, worker.drain(), worker.serve_options()).await?;
/// # Ok(()) }
/// ```
pub async fn serve<L, S, B>(
    listener: L,
    service: S,
    drain: Drain,
    options: ServeOptions,
) -> io::Result<()>
where
    L: Accept,
    S: HyperService<B>,
    B: ResponseBody,
{
    serve_with(listener, service, drain, options).await
}

/// [`serve`] with a tower `Service`: an `axum::Router`, tonic's `Routes`, or
/// anything built with tower's layers, with no adapter in user code.
///
/// ```no_run
/// # async fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
/// use axum::{routing::get, Router};
///
/// let app = Router::new().route("/", get(|| async { "hello\n" }));
/// let listener = worker.tcp_listener("http")?;
/// worker.ready().await?;
/// baton_worker::http::serve_tower(listener, app, worker.drain(), worker.serve_options()).await?;
/// # Ok(()) }
/// ```
pub async fn serve_tower<L, S, B>(
    listener: L,
    service: S,
    drain: Drain,
    options: ServeOptions,
) -> io::Result<()>
where
    L: Accept,
    S: TowerService<B>,
    B: ResponseBody,
{
    serve_with(listener, TowerToHyperService::new(service), drain, options).await
}

/// A hyper service [`serve`] accepts: cloned for each connection, its
/// futures `Send`. Implemented for every type that fits.
///
/// A function generic over the services [`serve`] takes:
///
/// ```no_run
/// use baton_worker::http::{HyperService, ResponseBody};
///
/// async fn serve_on_8080<S, B>(service: S) -> std::io::Result<()>
/// where
///     S: HyperService<B>,
///     B: ResponseBody,
/// {
///     let mut worker = baton_worker::Worker::builder()
///         .listener("http", "127.0.0.1:8080")
///         .start()
///         .await
///         .map_err(std::io::Error::other)?;
///     let listener = worker.tcp_listener("http").map_err(std::io::Error::other)?;
///     baton_worker::http::serve(listener, service, worker.drain(), worker.serve_options()).await
/// }
/// ```
pub trait HyperService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<T, B> HyperService<B> for T where
    T: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + 'static
{
}

/// A tower service [`serve_tower`] and [`Worker::serve`](crate::Worker::serve)
/// accept (an `axum::Router`, tonic's `Routes`, ...). Implemented for every
/// type that fits.
///
/// A function generic over the services [`serve_tower`] takes:
///
/// ```no_run
/// use baton_worker::http::{ResponseBody, TowerService};
///
/// async fn run<S, B>(service: S) -> Result<(), baton_worker::Error>
/// where
///     S: TowerService<B>,
///     B: ResponseBody,
/// {
///     let mut worker = baton_worker::Worker::builder()
///         .listener("http", "127.0.0.1:8080")
///         .start()
///         .await?;
///     worker.serve("http", service).await
/// }
/// ```
pub trait TowerService<B>:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<T, B> TowerService<B> for T where
    T: tower_service::Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Send
        + 'static
{
}

/// A response body the server can write. Implemented for every type that
/// fits.
///
/// Any hyper body fits: `Full`, `Empty`, axum's `Body`, a boxed body:
///
/// ```
/// use baton_worker::http::ResponseBody;
/// use http_body_util::Full;
/// use hyper::body::Bytes;
///
/// fn takes<B: ResponseBody>(_body: B) {}
/// takes(Full::new(Bytes::from("hi")));
/// takes(axum::body::Body::empty());
/// ```
pub trait ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<T> ResponseBody for T where T: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// HTTP/1.1 with keep-alive and upgrades.
fn http1_builder(options: &ServeOptions) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    http
}

/// HTTP/2, by prior knowledge or ALPN.
fn http2_builder() -> http2::Builder<TokioExecutor> {
    let mut http = http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new());
    http
}

async fn serve_with<L, S, B>(
    listener: L,
    service: S,
    drain: Drain,
    options: ServeOptions,
) -> io::Result<()>
where
    L: Accept,
    S: HyperService<B>,
    B: ResponseBody,
{
    let handover = options.handover.clone();
    // Where this listener's connections are handed over, if they are.
    let address = match &handover {
        Some(h) if h.is_enabled() => listener.handover_address(),
        _ => None,
    };
    let address: Option<Arc<str>> = address.as_deref().map(Arc::from);
    let kit = match (&handover, &address) {
        (Some(handover), Some(address)) => Some(session::SessionKit::new::<L>(
            drain.clone(),
            handover.clone(),
            address.clone(),
        )),
        _ => None,
    };
    let setup = Setup {
        service,
        shared: Shared {
            h1: Arc::new(http1_builder(&options)),
            h2: Arc::new(http2_builder()),
            drain: drain.clone(),
            idle_grace: options.idle_grace,
            handshake_timeout: options.header_read_timeout,
            handover: handover.clone(),
            address: address.clone(),
            kit,
        },
    };
    // Connections other workers hand over on this listener.
    let mut adoptions = match (&handover, &address) {
        (Some(handover), Some(address)) => handover.adopt_on(address.as_ref()),
        _ => None,
    };
    let registry = Arc::new(Registry::default());
    let mut tasks = JoinSet::new();
    let mut count = ConnectionCount::new(options.on_connections.clone());
    loop {
        tokio::select! {
            biased;
            _ = drain.wait() => break,
            Some(_) = tasks.join_next() => {}
            _ = registry.changed() => {}
            _ = count.due() => count.flush(),
            Some(adoptee) = next_adoptee(&mut adoptions) => {
                spawn_adopted::<L, S, B>(&mut tasks, &registry, &setup, adoptee);
            }
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let registration = registry.register();
                    let connection = drive::<L, S, B>(listener.handshake(stream), registration, setup.clone());
                    tasks.spawn(connection);
                }
                Err(error) if is_fatal(&error) => return Err(error),
                Err(error) if is_per_connection(&error) => {}
                Err(_) => tokio::select! {
                    _ = drain.wait() => break,
                    _ = sleep(ACCEPT_BACKOFF) => {}
                },
            },
        }
        count.set(registry.len());
    }
    // Those adopted before the drain was heard are served (and handed on).
    if let (Some(handover), Some(address)) = (&handover, &address) {
        handover.stop_adopting(address.as_ref());
    }
    if let Some(adoptions) = &mut adoptions {
        adoptions.close();
        while let Ok(adoptee) = adoptions.try_recv() {
            spawn_adopted::<L, S, B>(&mut tasks, &registry, &setup, adoptee);
        }
    }
    // Other generations accept from the same socket; this one stops now.
    drop(listener);
    let mut deadline = drain.deadline().unwrap_or_else(Instant::now);
    let now = Instant::now();
    let (start, window) = match options.close_spread {
        Some(window) => (now, window),
        None => {
            let start = (now + SIBLINGS_STOP).min(deadline);
            (
                start,
                spread::default_window(deadline.saturating_duration_since(start)),
            )
        }
    };
    let mut spread = Spread::new(registry.notices(), start, window);
    spread.fire_due();
    while registry.len() > 0 {
        count.set(registry.len());
        tokio::select! {
            biased;
            _ = registry.changed() => {}
            Some(_) = tasks.join_next() => {}
            _ = spread.next_due() => spread.fire_due(),
            _ = count.due() => count.flush(),
            _ = sleep_until(deadline.min(Instant::now() + DEADLINE_POLL)) => {
                if let Some(handover) = &handover {
                    handover.report_closed(false);
                }
                deadline = drain.deadline().unwrap_or(deadline);
                if Instant::now() >= deadline {
                    // hyper's connections go with their tasks; upgraded ones,
                    // held by their handlers, fail their next read or write.
                    tasks.abort_all();
                    registry.kill_all();
                    break;
                }
            }
        }
    }
    count.set(0);
    count.flush();
    if let Some(handover) = &handover {
        handover.report_closed(true);
    }
    Ok(())
}

/// The next connection handed over to this listener; never without
/// handovers.
async fn next_adoptee(
    adoptions: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::handover::Adoptee>>,
) -> Option<crate::handover::Adoptee> {
    match adoptions {
        Some(adoptions) => adoptions.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves a connection handed over as if it had been accepted.
fn spawn_adopted<L, S, B>(
    tasks: &mut JoinSet<()>,
    registry: &Arc<Registry>,
    setup: &Setup<S>,
    adoptee: crate::handover::Adoptee,
) where
    L: Accept,
    S: HyperService<B>,
    B: ResponseBody,
{
    if let Some(session) = adoptee.session {
        return spawn_resumed(
            tasks,
            registry,
            &setup.shared,
            adoptee.fd,
            adoptee.pending,
            session,
        );
    }
    // Only fails when the runtime cannot take the socket: it closes.
    let Ok(io) = L::restore(adoptee.fd) else {
        return;
    };
    let registration = registry.register();
    let pending = adoptee.pending.into();
    tasks.spawn(serve_connection::<L, S, B>(
        io,
        Some(pending),
        registration,
        setup.clone(),
    ));
}

/// Resumes a session handed over, in the app's handler of its kind (which
/// the hub checked before taking it).
fn spawn_resumed(
    tasks: &mut JoinSet<()>,
    registry: &Arc<Registry>,
    shared: &Shared,
    fd: std::os::fd::OwnedFd,
    pending: Vec<u8>,
    session: baton_wire::protocol::HandedSession,
) {
    let (Some(handover), Some(address)) = (&shared.handover, &shared.address) else {
        return;
    };
    let Some(resume) = handover.resumer(&session.kind) else {
        return;
    };
    // Only fails when the runtime cannot take the socket: it closes.
    let Ok(stream) = session::fd_stream(fd) else {
        return;
    };
    let registration = registry.register();
    let raw = session::Raw {
        notice: registration.notice(shared.drain.clone()),
        socket: registry::Counted::new(stream, registration),
        pending: pending.into(),
        drain: shared.drain.clone(),
        handover: handover.clone(),
        address: address.clone(),
    };
    tasks.spawn(resume(raw, session.state));
}

/// Errors that say the listener itself is unusable; retrying cannot help.
fn is_fatal(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

/// Errors about one connection that died in the queue; the next accept may
/// succeed at once. Anything else (`EMFILE`, `ENOBUFS`, ...) is retried after
/// [`ACCEPT_BACKOFF`].
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || error.raw_os_error() == Some(libc::EPROTO)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod h2_tests;
