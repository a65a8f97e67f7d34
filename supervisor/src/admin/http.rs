//! The admin endpoint's HTTP/1.1 server (hyper): routing, and handing each
//! request to the master's loop as an event.

use super::respond::{Answer, Endpoint};
use crate::master::{Event, Events};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

/// Connections served at once; more wait in the socket's backlog.
const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The accepting side, TCP or Unix.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Registers `fd` (a listening socket) with the runtime.
    pub fn new(fd: OwnedFd, unix: bool) -> std::io::Result<Listener> {
        Ok(if unix {
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(listener)?)
        } else {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(listener)?)
        })
    }
}

/// Accepts connections until aborted. Once `closing` is cancelled (the
/// socket goes to another master, or this image execs), each connection
/// ends after its current or first request, so that no client keeps
/// talking to a master that no longer serves.
pub async fn serve(listener: Listener, events: Events, closing: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let accepted = match &listener {
            Listener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, _)| spawn(s, &events, &closing, permit)),
            Listener::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| spawn(s, &events, &closing, permit)),
        };
        if let Err(e) = accepted {
            // EMFILE and the like: give the master a moment to recover.
            tracing::warn!(error = %e, "admin endpoint accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spawn<S>(
    stream: S,
    events: &Events,
    closing: &CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let events = events.clone();
    let closing = closing.clone();
    let answered = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        let service = {
            let (closing, answered) = (closing.clone(), answered.clone());
            hyper::service::service_fn(move |request| {
                let (events, closing, answered) =
                    (events.clone(), closing.clone(), answered.clone());
                async move {
                    let mut response = answer(request, &events).await;
                    if closing.is_cancelled() {
                        response
                            .headers_mut()
                            .insert(hyper::header::CONNECTION, "close".parse().expect("valid"));
                    }
                    answered.store(true, Ordering::Relaxed);
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => {}
            _ = closing.cancelled() => {
                // A connection that has not been answered yet gets its
                // first answer (with `Connection: close`); an idle
                // keep-alive one is closed now, a busy one after its answer.
                if answered.load(Ordering::Relaxed) {
                    connection.as_mut().graceful_shutdown();
                }
                let _ = connection.await;
            }
        }
        drop(permit);
    });
}

async fn answer(request: Request<Incoming>, events: &Events) -> Response<Full<Bytes>> {
    let openmetrics = request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.contains("application/openmetrics-text"))
        });
    let endpoint = match request.uri().path() {
        "/metrics" => Endpoint::Metrics { openmetrics },
        "/healthz" => Endpoint::Healthz,
        "/readyz" => Endpoint::Readyz,
        "/status" => Endpoint::Status,
        "/" => return reply(Answer::text(200, INDEX.into())),
        path => {
            return reply(Answer::text(
                404,
                format!("no such endpoint: {path}\n{INDEX}"),
            ))
        }
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(Answer::text(405, "only GET and HEAD\n".into()));
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, "GET, HEAD".parse().expect("valid"));
        return response;
    }
    let (tx, rx) = oneshot::channel();
    let asked = events.send(Event::Admin {
        endpoint,
        reply: tx,
    });
    let answer = match (asked, rx.await) {
        (Ok(()), Ok(answer)) => answer,
        _ => Answer::text(503, "the master is exiting\n".into()),
    };
    reply(answer)
}

fn reply(answer: Answer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        answer.content_type.parse().expect("valid header value"),
    );
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        "no-store".parse().expect("valid"),
    );
    response
}

const INDEX: &str = "baton admin endpoint\n\
/metrics  Prometheus metrics\n\
/healthz  200 while the master's loop answers\n\
/readyz   200 while a generation serves with every worker ready; 503 once stopping\n\
/status   the JSON of `baton status --json`\n";
