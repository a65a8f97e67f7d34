//! One connection from handshake to close: HTTP/1.1 or HTTP/2 (told apart by
//! the client's first bytes), upgrades allowed, and the polite goodbye once
//! the connection's drain notice fires.

use super::registry::{Counted, DrainNotice, Registration};
use super::{BoxError, HyperService, ResponseBody};
use crate::Drain;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, Instant};

/// What a connection needs besides its stream.
pub(super) struct Setup<S> {
    pub(super) http: Arc<auto::Builder<TokioExecutor>>,
    pub(super) service: S,
    pub(super) drain: Drain,
    pub(super) idle_grace: Duration,
    pub(super) handshake_timeout: Option<Duration>,
}

/// Drives one connection. Once its notice fires, an HTTP/2 connection gets
/// hyper's graceful shutdown (GOAWAY with the highest stream id, a PING, then
/// GOAWAY with the last stream actually received, so no stream the client
/// already sent is refused; streams in flight finish). An HTTP/1.1 connection
/// answers further requests with `Connection: close` and is closed
/// unprompted only after `idle_grace` with no request in flight.
pub(super) async fn drive<I, S, B>(
    handshake: impl Future<Output = io::Result<I>>,
    registration: Registration,
    setup: Setup<S>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HyperService<B>,
    B: ResponseBody,
{
    let io = match setup.handshake_timeout {
        Some(limit) => timeout(limit, handshake).await.ok(),
        None => Some(handshake.await),
    };
    let Some(Ok(io)) = io else { return };
    let notice = registration.notice(setup.drain);
    let activity = Arc::new(Activity::default());
    let service = Tracked {
        inner: setup.service,
        activity: activity.clone(),
        notice: notice.clone(),
    };
    let io = TokioIo::new(Counted::new(io, registration));
    let connection = setup.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    tokio::select! {
        biased;
        _ = connection.as_mut() => return,
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
                _ = connection.as_mut() => return,
                _ = activity.became_idle.notified() => {}
            },
            Some(since) => {
                let close_at = since.max(noticed_at) + setup.idle_grace;
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
    // HTTP/1.1: idle, hyper closes it now. HTTP/2: GOAWAY; hyper closes the
    // connection when its last stream ends.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
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
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                since: Instant::now(),
                http2: false,
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
        state.since = Instant::now();
        if state.in_flight == 0 {
            self.0.became_idle.notify_one();
        }
    }
}

/// The user's service, counting requests in flight, handing each request
/// its connection's [`DrainNotice`], and adding `Connection: close` to
/// HTTP/1.1 responses completed once the connection was told to go.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    notice: DrainNotice,
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
        let response = self.inner.call(request);
        let notice = self.notice.clone();
        Box::pin(async move {
            let mut response = response.await?;
            // HTTP/2 says goodbye with GOAWAY; an upgrade keeps its connection.
            if notice.is_notified()
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
