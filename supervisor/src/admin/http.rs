//! The admin endpoint's HTTP/1.1 server (hyper): routing, and handing each
//! request to the master's loop as an event.

use super::auth::{Caller, WritePolicy};
use super::limits::{Caps, Held, Table};
use super::respond::{Answer, Endpoint};
use crate::master::{Event, Events};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request's headers, counted from
/// its accept or from its previous answer: a silent, trickling (slowloris)
/// or idle keep-alive connection is closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `/healthz` and `/readyz` wait for the master's loop; past it
/// the loop is not answering, and `/healthz` says so with a 503.
const PROBE_WAIT: Duration = Duration::from_secs(1);

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

/// Where requests go: health and readiness probes to the master's loop's
/// first inbox, so that they never queue behind scrapes or CLI requests;
/// the rest with the control socket's requests.
#[derive(Clone)]
pub struct Inboxes {
    /// `/metrics`, `/status`, and the writes.
    pub requests: Events,
    /// `/healthz`, `/readyz`.
    pub probes: Events,
    /// Who may write, as the running configuration says (see
    /// [`super::auth`]).
    pub writes: Arc<arc_swap::ArcSwap<WritePolicy>>,
}

/// Accepts connections until aborted, always: the caps of [`Table`] close
/// idle ones for newcomers instead. Once `closing` is cancelled (the
/// socket goes to another master, or this image execs), each connection
/// ends after its current or first request, so that no client keeps
/// talking to a master that no longer serves.
pub async fn serve(listener: Listener, inboxes: Inboxes, closing: CancellationToken) {
    let table = Table::new(Caps::for_process());
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, from)| {
                let _ = s.set_nodelay(true);
                spawn(s, Caller::Tcp(from), &table, &inboxes, &closing)
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                // Without credentials the peer is gone already: nothing
                // to answer.
                if let Ok(peer) = s.peer_cred() {
                    let caller = Caller::Unix {
                        pid: peer.pid(),
                        uid: peer.uid(),
                    };
                    spawn(s, caller, &table, &inboxes, &closing)
                }
            }),
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
    caller: Caller,
    table: &Table,
    inboxes: &Inboxes,
    closing: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = match caller {
        Caller::Tcp(address) => Some(address.ip()),
        Caller::Unix { .. } => None,
    };
    let (held, _closed) = table.admit(peer);
    if held.close.is_cancelled() {
        // Every other connection of this peer is being answered.
        return;
    }
    let held = Arc::new(held);
    let inboxes = inboxes.clone();
    let closing = closing.clone();
    let answered = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        let service = {
            let (closing, answered, held) = (closing.clone(), answered.clone(), held.clone());
            hyper::service::service_fn(move |request| {
                let (inboxes, closing, answered, held) = (
                    inboxes.clone(),
                    closing.clone(),
                    answered.clone(),
                    held.clone(),
                );
                async move {
                    held.busy();
                    let mut response = answer(request, caller, &inboxes).await;
                    if closing.is_cancelled() {
                        response
                            .headers_mut()
                            .insert(hyper::header::CONNECTION, "close".parse().expect("valid"));
                    }
                    answered.store(true, Ordering::Relaxed);
                    held.idle();
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
            // Closed for a newcomer: it was idle, nothing is cut.
            _ = held.close.cancelled() => {}
            _ = closing.cancelled() => {
                // A connection that has not been answered yet gets its
                // first answer (with `Connection: close`); an idle
                // keep-alive one is closed now, a busy one after its answer.
                if answered.load(Ordering::Relaxed) {
                    connection.as_mut().graceful_shutdown();
                }
                tokio::select! {
                    _ = connection => {}
                    _ = held.close.cancelled() => {}
                }
            }
        }
        drop::<Arc<Held>>(held);
    });
}

/// A response's body: an answer, or the `/events` stream.
type Body = BoxBody<Bytes, std::convert::Infallible>;

async fn answer(request: Request<Incoming>, caller: Caller, inboxes: &Inboxes) -> Response<Body> {
    if super::write::PATHS.contains(&request.uri().path()) {
        return write(request, caller, inboxes).await;
    }
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
        "/events" if request.method() == Method::GET => return events(),
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
    let probe = matches!(endpoint, Endpoint::Healthz | Endpoint::Readyz);
    let inbox = if probe {
        &inboxes.probes
    } else {
        &inboxes.requests
    };
    let (tx, rx) = oneshot::channel();
    if inbox
        .send(Event::Admin {
            endpoint,
            reply: tx,
        })
        .is_err()
    {
        return reply(Answer::text(503, "the master is exiting\n".into()));
    }
    let answer = if probe {
        match tokio::time::timeout(PROBE_WAIT, rx).await {
            Ok(answer) => answer,
            Err(_) => {
                return reply(Answer::text(
                    503,
                    format!("the master's loop has not answered within {PROBE_WAIT:?}\n"),
                ))
            }
        }
    } else {
        rx.await
    };
    reply(answer.unwrap_or_else(|_| Answer::text(503, "the master is exiting\n".into())))
}

/// `POST /reload` and the other writes (see [`super::write`]): refused
/// unless [`WritePolicy`] lets the caller through, before the body is read.
async fn write(request: Request<Incoming>, caller: Caller, inboxes: &Inboxes) -> Response<Body> {
    let path = request.uri().path().to_string();
    let written = if request.method() != Method::POST {
        let mut response = reply(Answer::text(405, format!("{path} takes POST\n")));
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, "POST".parse().expect("valid"));
        return response;
    } else {
        let authorization = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let presented = authorization.is_some();
        match inboxes.writes.load().authorize(caller, authorization) {
            Err(refusal) => {
                refused_write(&path, caller, &refusal);
                super::write::Written::refused(refusal, presented)
            }
            Ok(grant) => {
                let from = crate::audit::Requester::admin(caller, &grant);
                let query = request.uri().query().map(str::to_string);
                super::write::run(
                    &path,
                    query.as_deref(),
                    request.into_body(),
                    &inboxes.requests,
                    from,
                )
                .await
            }
        }
    };
    let mut response = reply(Answer {
        status: written.status,
        content_type: "application/json",
        body: written.body,
    });
    if let Some(challenge) = written.challenge {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            challenge.parse().expect("valid"),
        );
    }
    response
}

/// Logs a refused write (who, which path, why; never a token), at most
/// ten a second: a client hammering with bad tokens must not flood the log.
fn refused_write(path: &str, caller: Caller, refusal: &super::auth::Refusal) {
    static LIMIT: std::sync::Mutex<Option<crate::ratelimit::Window>> = std::sync::Mutex::new(None);
    let now = tokio::time::Instant::now();
    let mut limit = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let window =
        limit.get_or_insert_with(|| crate::ratelimit::Window::new(10, Duration::from_secs(1), now));
    let dropped = window.roll(now);
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "admin writes refused without a log line (over 10 a second)"
        );
    }
    if window.allow(now) {
        let from = match caller {
            Caller::Tcp(address) => address.to_string(),
            Caller::Unix { pid, uid } => format!("pid {} uid {uid}", pid.unwrap_or(0)),
        };
        tracing::warn!(
            event = "admin.write_refused",
            path,
            from,
            status = refusal.status,
            reason = %refusal.reason,
            "admin write refused"
        );
    }
}

/// `GET /events`: the key events as Server-Sent Events (see
/// [`crate::events`]).
fn events() -> Response<Body> {
    let mut response = Response::new(crate::events::subscribe().boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "text/event-stream".parse().expect("valid"),
    );
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        "no-store".parse().expect("valid"),
    );
    response
}

fn reply(answer: Answer) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)).boxed());
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
/status   the JSON of `baton status --json`\n\
/events   every reload, rollback, probation result, crash loop and worker exit, as Server-Sent Events\n\
POST /reload /upgrade /restart /promote /rollback /scale /drain /stop /reopen\n\
          what the CLI command of the same name does, with a token (see docs/operations.md)\n";
