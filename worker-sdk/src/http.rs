//! HTTP/1.1 serving that hands over at a reload without failing a request.
//!
//! A keep-alive client may write its next request at any moment, so a server
//! that closes a keep-alive connection can meet a request already on the
//! wire: the client reads end of file or a reset and, unless it retries,
//! fails the request. That is how nginx and HAProxy lose requests at a reload.
//!
//! [`serve`] closes a connection only when the client cannot be using it.
//! Once draining it stops accepting (the listening socket is shared, so the
//! next generation keeps accepting from the same queue) and answers every
//! further request normally, adding `Connection: close`: the client reads the
//! whole response, learns the connection is done and opens a new one, which
//! the new generation accepts. A connection with no request in flight is
//! closed unprompted only once it has been idle for
//! [`ServeOptions::idle_grace`] (the one window left: a client silent that
//! long whose request crosses the close), and whatever is still open at the
//! drain deadline is dropped.
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
//! baton_worker::http::serve(listener, service, worker.drain(), Default::default()).await?;
//! # Ok(()) }
//! ```

use crate::Drain;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the accept loop pauses after an error such as `EMFILE`, which
/// would otherwise repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The least time between two calls of [`ServeOptions::on_connections`].
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// How often a draining server re-reads the deadline, which a second drain
/// request may have moved earlier.
const DEADLINE_POLL: Duration = Duration::from_millis(100);

/// Options for [`serve`] and [`serve_unix`].
#[derive(Clone)]
pub struct ServeOptions {
    /// Once draining, how long a connection with no request in flight may
    /// stay open waiting for one (answered with `Connection: close`) before it
    /// is closed. Default 1 s.
    pub idle_grace: Duration,
    /// How long a client may take to send a request head. hyper also applies
    /// it to an idle keep-alive connection waiting for its next request, so it
    /// doubles as the keep-alive timeout. `None` disables it. Default 30 s.
    pub header_read_timeout: Option<Duration>,
    /// Called with the number of open connections when it changes, at most
    /// once per 100 ms and once more with the final count when serving ends;
    /// always from the task running `serve`, so calls never overlap or arrive
    /// out of order. Hook [`Worker::report_connections`](crate::Worker::report_connections)
    /// here. Default none.
    pub on_connections: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            idle_grace: Duration::from_secs(1),
            header_read_timeout: Some(Duration::from_secs(30)),
            on_connections: None,
        }
    }
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeOptions")
            .field("idle_grace", &self.idle_grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field(
                "on_connections",
                &self.on_connections.as_ref().map(|_| ".."),
            )
            .finish()
    }
}

/// Serves HTTP/1.1 on `listener` with `service` until `drain` fires and every
/// connection has finished, as described in the [module docs](self).
///
/// Each connection runs in its own task with a clone of `service`. Requests in
/// flight when draining starts complete, with `Connection: close`. Accept
/// errors such as `EMFILE` or `ECONNABORTED` are retried; the only error
/// returned is one saying the listener itself is unusable (`EBADF`, `EINVAL`
/// for a socket that is not listening, `ENOTSOCK`), and returning it drops the
/// open connections.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    drain: Drain,
    options: ServeOptions,
) -> io::Result<()>
where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        > + Clone
        + Send
        + 'static,
    B: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    serve_with(listener, service, drain, options).await
}

/// [`serve`] on a Unix stream listener.
pub async fn serve_unix<S, B>(
    listener: UnixListener,
    service: S,
    drain: Drain,
    options: ServeOptions,
) -> io::Result<()>
where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        > + Clone
        + Send
        + 'static,
    B: Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    serve_with(listener, service, drain, options).await
}

/// The bounds `serve` puts on a service, named once.
trait Handler<B>:
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

impl<T, B> Handler<B> for T where
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

/// The bounds `serve` puts on a response body, named once.
trait ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<T> ResponseBody for T where T: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// A listening socket to accept connections from.
trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send + '_;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    async fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Responses are written whole; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<UnixStream> {
        Ok(UnixListener::accept(self).await?.0)
    }
}

async fn serve_with<A, S, B>(
    listener: A,
    service: S,
    drain: Drain,
    options: ServeOptions,
) -> io::Result<()>
where
    A: Accept,
    S: Handler<B>,
    B: ResponseBody,
{
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let mut connections = JoinSet::new();
    let mut count = ConnectionCount::new(options.on_connections);
    loop {
        tokio::select! {
            biased;
            _ = drain.wait() => break,
            Some(_) = connections.join_next() => {}
            _ = count.due() => count.flush(),
            accepted = listener.accept() => match accepted {
                Ok(io) => {
                    let activity = Arc::new(Activity::default());
                    let service = Tracked {
                        inner: service.clone(),
                        activity: activity.clone(),
                        drain: drain.clone(),
                    };
                    let connection = http.serve_connection(TokioIo::new(io), service);
                    let grace = options.idle_grace;
                    connections.spawn(drive(connection, activity, drain.clone(), grace));
                }
                Err(error) if is_fatal(&error) => return Err(error),
                Err(error) if is_per_connection(&error) => {}
                Err(_) => tokio::select! {
                    _ = drain.wait() => break,
                    _ = sleep(ACCEPT_BACKOFF) => {}
                },
            },
        }
        count.set(connections.len());
    }
    // Other generations accept from the same socket; this one stops now.
    drop(listener);
    let mut deadline = drain.deadline().unwrap_or_else(Instant::now);
    let mut aborted = false;
    loop {
        count.set(connections.len());
        tokio::select! {
            biased;
            joined = connections.join_next() => if joined.is_none() { break },
            _ = count.due() => count.flush(),
            _ = sleep_until(deadline.min(Instant::now() + DEADLINE_POLL)), if !aborted => {
                deadline = drain.deadline().unwrap_or(deadline);
                if Instant::now() >= deadline {
                    connections.abort_all();
                    aborted = true;
                }
            }
        }
    }
    count.set(0);
    count.flush();
    Ok(())
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

/// Drives one connection; once draining, closes it after `idle_grace` without
/// a request in flight.
async fn drive<I, S, B>(
    connection: http1::Connection<TokioIo<I>, Tracked<S>>,
    activity: Arc<Activity>,
    drain: Drain,
    idle_grace: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Handler<B>,
    B: ResponseBody,
{
    tokio::pin!(connection);
    tokio::select! {
        biased;
        _ = connection.as_mut() => return,
        _ = drain.wait() => {}
    }
    let draining_since = Instant::now();
    loop {
        // Every select below polls the connection first, so a request that had
        // reached the socket is parsed, and counted in flight, before the idle
        // check reads `activity`.
        match activity.idle_since() {
            None => tokio::select! {
                biased;
                _ = connection.as_mut() => return,
                _ = activity.became_idle.notified() => {}
            },
            Some(since) => {
                let close_at = since.max(draining_since) + idle_grace;
                if Instant::now() >= close_at {
                    break;
                }
                tokio::select! {
                    biased;
                    _ = connection.as_mut() => return,
                    _ = sleep_until(close_at) => {}
                }
            }
        }
    }
    // Idle: hyper closes it now.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// What a connection's requests are doing: how many are in flight, and since
/// when that number last changed.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
    became_idle: Notify,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    since: Instant,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                since: Instant::now(),
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
}

/// One request in flight: from the service call until hyper drops the
/// response body, which it does once the body is written.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> InFlight {
        let mut state = activity.lock();
        state.in_flight += 1;
        state.since = Instant::now();
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        state.since = Instant::now();
        if state.in_flight == 0 {
            self.0.became_idle.notify_one();
        }
    }
}

/// The user's service, counting requests in flight and adding
/// `Connection: close` to responses completed while draining.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    drain: Drain,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static>,
    S::Error: 'static,
    B: Body + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        // Counted here, synchronously, so the request is in flight from the
        // moment hyper has parsed its head.
        let in_flight = InFlight::begin(&self.activity);
        let response = self.inner.call(request);
        let drain = self.drain.clone();
        Box::pin(async move {
            let mut response = response.await?;
            if drain.is_draining() {
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

/// The open-connection count, reported to [`ServeOptions::on_connections`]
/// at most once per [`REPORT_INTERVAL`].
struct ConnectionCount {
    hook: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    current: u64,
    reported: Option<u64>,
    next_report: Instant,
}

impl ConnectionCount {
    fn new(hook: Option<Arc<dyn Fn(u64) + Send + Sync>>) -> ConnectionCount {
        ConnectionCount {
            hook,
            current: 0,
            reported: None,
            next_report: Instant::now(),
        }
    }

    fn set(&mut self, count: usize) {
        self.current = count as u64;
        if Instant::now() >= self.next_report {
            self.flush();
        }
    }

    fn pending(&self) -> bool {
        self.hook.is_some() && self.reported != Some(self.current)
    }

    fn flush(&mut self) {
        if let (Some(hook), true) = (&self.hook, self.pending()) {
            hook(self.current);
            self.reported = Some(self.current);
            self.next_report = Instant::now() + REPORT_INTERVAL;
        }
    }

    /// Completes when a change held back by the throttle is due.
    async fn due(&self) {
        if self.pending() {
            sleep_until(self.next_report).await;
        } else {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests;
