//! WebSocket sessions that move to the next generation at a reload (feature
//! `ws`).
//!
//! A WebSocket outlives any single request, so at a drain a plain handler can
//! only say goodbye (a close frame with code 1012, Service Restart) and let
//! the client reconnect. A session served through this module can do better:
//! when the worker drains it is stopped at a message boundary and the app is
//! asked for a small state blob; the socket and the blob go to a worker of
//! the current generation, where the app's handler of the same kind resumes
//! it. The client sees nothing: no close, no reconnect, no message lost.
//!
//! The app registers each kind of session once, with the handler that serves
//! both a session just upgraded and one resumed from another worker
//! ([`Session::adopted_state`] tells them apart), and answers upgrade
//! requests with [`Route::accept`]:
//!
//! ```no_run
//! use axum::{extract::Request, routing::get, Router};
//! use baton_worker::ws::{Event, Message, Session};
//!
//! /// Echoes text, counting the messages of the session across workers.
//! async fn echo(mut session: Session) {
//!     let mut count = session
//!         .adopted_state()
//!         .and_then(|s| s.try_into().ok())
//!         .map_or(0, u64::from_be_bytes);
//!     while let Some(event) = session.next().await {
//!         match event {
//!             Event::Message(Message::Text(text)) => {
//!                 count += 1;
//!                 if session.send(Message::text(format!("{count} {text}"))).await.is_err() {
//!                     return;
//!                 }
//!             }
//!             Event::Message(_) => {}
//!             Event::Drain => match session.hand_over(count.to_be_bytes()).await {
//!                 Ok(()) => return, // a worker of the next generation has it
//!                 Err(kept) => return kept.session.close_for_restart().await,
//!             },
//!         }
//!     }
//! }
//!
//! # async fn run() -> Result<(), baton_worker::Error> {
//! let mut worker = baton_worker::Worker::builder().listener("http", "127.0.0.1:8080").start().await?;
//! let route = worker.sessions().route("echo", echo);
//! let app = Router::new().route("/ws", get(move |request: Request| async move { route.accept(request) }));
//! worker.serve("http", app).await
//! # }
//! ```
//!
//! Which sessions move: those of a supervised worker with `[worker] handover`
//! (on by default), on a listener without TLS, whose next generation
//! registered a handler of the same kind. Any other session gets
//! [`Event::Drain`] at its connection's turn in the close spread, and
//! [`Session::hand_over`] gives it back ([`Kept`]) to be closed as before.
//! So does one the next generation refuses, or one that does not come to a
//! message boundary within a second of the drain.
//!
//! Sessions speak WebSocket (RFC 6455) without extensions (no compression),
//! through tungstenite.

use super::registry::{Counted, DrainNotice};
use super::session::{socket_of, FdStream, Io, Raw, Resume, SessionKit, Taken};
use crate::handover::{Answer, Handover, MAX_PENDING};
use crate::Drain;
use baton_wire::protocol::{HandedSession, MAX_SESSION_STATE};
use futures_util::{SinkExt, StreamExt};
use hyper::body::{Buf, Bytes};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

pub use tokio_tungstenite::tungstenite::protocol::CloseFrame;
pub use tokio_tungstenite::tungstenite::{Error, Message};

/// The longest name of a kind of session.
pub const MAX_KIND: usize = 64;

/// How long a draining session may take to reach a message boundary (a
/// message under way to arrive whole) before it is closed instead of moved.
const BOUNDARY_WAIT: Duration = Duration::from_secs(1);

/// How long writing out what a session has queued (a pong, the rest of a
/// message) may take before it moves.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// How long [`Session::close`] waits for the client's close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(1);

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A frame is given to tungstenite once it is read whole, or this much of a
/// longer one: so at most this plus a read's worth is read ahead, within
/// what a moving connection may carry ([`MAX_PENDING`]).
const WHOLE_FRAME: u64 = 8 * 1024;

/// The worker's kinds of sessions: made by
/// [`Worker::sessions`](crate::Worker::sessions).
///
/// ```no_run
/// # fn run(worker: &baton_worker::Worker) {
/// let sessions = worker.sessions();
/// let chat = sessions.route("chat", |session| async move { drop(session) });
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Sessions {
    hub: Option<Handover>,
}

impl Sessions {
    /// The sessions of a worker whose handovers (if supervised) go through
    /// `hub`.
    pub(crate) fn new(hub: Option<Handover>) -> Sessions {
        Sessions { hub }
    }

    /// Registers the handler of the sessions of `kind`: it serves those
    /// [`Route::accept`] upgrades and those other workers hand over with the
    /// same kind. Registering a kind again replaces its handler.
    ///
    /// # Panics
    ///
    /// When `kind` is empty or longer than [`MAX_KIND`] bytes.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::Worker) {
    /// use baton_worker::ws::{Event, Session};
    ///
    /// let route = worker.sessions().route("ticker", |mut session: Session| async move {
    ///     while let Some(event) = session.next().await {
    ///         if let Event::Drain = event {
    ///             if let Err(kept) = session.hand_over(Vec::new()).await {
    ///                 kept.session.close_for_restart().await;
    ///             }
    ///             return;
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    pub fn route<F, Fut>(&self, kind: &str, handler: F) -> Route
    where
        F: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        assert!(
            !kind.is_empty() && kind.len() <= MAX_KIND,
            "a kind of session is named by 1 to {MAX_KIND} bytes, not {:?}",
            kind
        );
        let kind: Arc<str> = Arc::from(kind);
        let handler: Handler = Arc::new(move |session| Box::pin(handler(session)));
        if let Some(hub) = &self.hub {
            let (resumed_kind, resumed_by) = (kind.clone(), handler.clone());
            let resume: Resume = Arc::new(move |raw, state| {
                let (kind, handler) = (resumed_kind.clone(), resumed_by.clone());
                Box::pin(
                    async move { handler(Session::moving(raw, kind, Some(state)).await).await },
                )
            });
            hub.resume_sessions(&kind, resume);
        }
        Route {
            kind,
            handler,
            hub: self.hub.clone(),
        }
    }
}

type Handler = Arc<dyn Fn(Session) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One kind of session: answers the requests that open one. Cheap to clone.
#[derive(Clone)]
pub struct Route {
    kind: Arc<str>,
    handler: Handler,
    /// The worker's handovers, when supervised.
    hub: Option<Handover>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route").field("kind", &self.kind).finish()
    }
}

impl Route {
    /// Answers a WebSocket upgrade request: `101 Switching Protocols`, after
    /// which the route's handler serves the session in a task of its own.
    /// A request that is not a WebSocket upgrade gets `400` (`426` for a
    /// WebSocket version other than 13) with a body saying what is wrong.
    ///
    /// The request must come from a server that supports upgrades, such as
    /// [`serve`](super::serve) (else `500`).
    ///
    /// ```no_run
    /// # fn run(route: baton_worker::ws::Route) {
    /// use axum::{extract::Request, routing::get, Router};
    ///
    /// let app: Router = Router::new().route("/ws", get(move |request: Request| async move { route.accept(request) }));
    /// # }
    /// ```
    pub fn accept<B>(&self, mut request: Request<B>) -> Response<String> {
        let key = match check_upgrade(request.method(), request.headers()) {
            Ok(key) => key,
            Err((status, why)) => return refusal(status, why),
        };
        if request.extensions().get::<OnUpgrade>().is_none() {
            return refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server of this request does not support upgrades".into(),
            );
        }
        let upgrade = hyper::upgrade::on(&mut request);
        let kit = request.extensions_mut().remove::<SessionKit>();
        let notice = request.extensions_mut().remove::<DrainNotice>();
        let (kind, handler, hub) = (self.kind.clone(), self.handler.clone(), self.hub.clone());
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let taken = match kit {
                Some(kit) => kit.take(upgraded),
                None => Taken::Staying(Box::new(TokioIo::new(upgraded)), Bytes::new()),
            };
            let session = match taken {
                Taken::Moving(raw) => Session::moving(raw, kind, None).await,
                Taken::Staying(io, pending) => {
                    Session::staying(io, pending, kind, notice, hub).await
                }
                Taken::Lost => return,
            };
            handler(session).await;
        });
        let mut response = Response::new(String::new());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// The `Sec-WebSocket-Accept` of a WebSocket upgrade request, or the status
/// and reason of its refusal.
fn check_upgrade(method: &Method, headers: &HeaderMap) -> Result<String, (StatusCode, String)> {
    let bad = |why: &str| Err((StatusCode::BAD_REQUEST, format!("{why}\n")));
    if method != Method::GET {
        return bad(&format!("a WebSocket opens with GET, not {method}"));
    }
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return bad("`Connection: upgrade` is missing");
    }
    if !has_token(header::UPGRADE, "websocket") {
        return bad("`Upgrade: websocket` is missing");
    }
    let version = headers.get(header::SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v.as_bytes() != b"13") {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is spoken (`Sec-WebSocket-Version: 13`)\n".into(),
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) => Ok(derive_accept_key(key.as_bytes())),
        None => bad("`Sec-WebSocket-Key` is missing"),
    }
}

fn refusal(status: StatusCode, why: String) -> Response<String> {
    let mut response = Response::new(why);
    *response.status_mut() = status;
    if status == StatusCode::UPGRADE_REQUIRED {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    response
}

/// What [`Session::next`] brings.
#[derive(Debug)]
pub enum Event {
    /// A message from the client. Pings are answered, and a close frame
    /// answered with one, before they come here.
    Message(Message),
    /// The worker drains and the session is between two messages: hand it
    /// over with [`Session::hand_over`], or close it. Comes once.
    Drain,
}

/// A WebSocket session: the connection after the upgrade, served by the
/// route's handler.
pub struct Session {
    stream: WebSocketStream<FrameGate<Socket>>,
    kind: Arc<str>,
    adopted: Option<Vec<u8>>,
    /// The worker's handovers, when supervised: counts a session closed at
    /// the drain.
    hub: Option<Handover>,
    /// How it moves, when it can.
    mover: Option<Mover>,
    /// Its connection's turn in the close spread, when it cannot move.
    notice: Option<DrainNotice>,
    /// When the drain was seen, the time by which a boundary must come.
    boundary_by: Option<Instant>,
    /// [`Event::Drain`] was given.
    told: bool,
}

/// What moving a session takes, besides the hub.
struct Mover {
    address: Arc<str>,
    drain: Drain,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("kind", &self.kind)
            .field("adopted", &self.adopted.is_some())
            .field("can_hand_over", &self.can_hand_over())
            .finish()
    }
}

impl Session {
    /// A session whose socket can move: upgraded here, or handed over with
    /// `adopted` state.
    async fn moving(raw: Raw, kind: Arc<str>, adopted: Option<Vec<u8>>) -> Session {
        let Raw {
            socket,
            pending,
            drain,
            notice,
            handover,
            address,
        } = raw;
        let enabled = handover.is_enabled();
        let gate = FrameGate::new(Either::Left(socket), pending);
        Session {
            stream: WebSocketStream::from_raw_socket(gate, Role::Server, None).await,
            kind,
            adopted,
            mover: enabled.then_some(Mover { address, drain }),
            hub: Some(handover),
            notice: Some(notice),
            boundary_by: None,
            told: false,
        }
    }

    /// A session that stays in this worker (TLS, handovers off, not
    /// supervised).
    async fn staying(
        io: Box<dyn Io>,
        pending: Bytes,
        kind: Arc<str>,
        notice: Option<DrainNotice>,
        hub: Option<Handover>,
    ) -> Session {
        let gate = FrameGate::new(Either::Right(io), pending);
        Session {
            stream: WebSocketStream::from_raw_socket(gate, Role::Server, None).await,
            kind,
            adopted: None,
            hub,
            mover: None,
            notice,
            boundary_by: None,
            told: false,
        }
    }

    /// The session's kind, as its route was registered.
    ///
    /// ```no_run
    /// # fn run(session: &baton_worker::ws::Session) {
    /// println!("a {} session", session.kind());
    /// # }
    /// ```
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The state the app gave for this session when another worker handed
    /// it over; `None` for a session opened here.
    ///
    /// ```no_run
    /// # fn run(session: &baton_worker::ws::Session) {
    /// let count = session.adopted_state().and_then(|s| s.try_into().ok()).map_or(0, u64::from_be_bytes);
    /// # }
    /// ```
    pub fn adopted_state(&self) -> Option<&[u8]> {
        self.adopted.as_deref()
    }

    /// Whether the session can move to the next generation at a drain:
    /// supervised, `[worker] handover` on, a listener without TLS.
    ///
    /// ```no_run
    /// # fn run(session: &baton_worker::ws::Session) {
    /// if !session.can_hand_over() {
    ///     println!("this session will be closed with 1012 at a reload");
    /// }
    /// # }
    /// ```
    pub fn can_hand_over(&self) -> bool {
        self.mover.is_some()
    }

    /// The next message from the client, or [`Event::Drain`] once the
    /// worker drains and the session is between two messages; `None` when
    /// the session ended (the client closed it, or it failed).
    ///
    /// A session that moves hears of the drain as soon as the worker drains;
    /// one that cannot move, at its connection's turn in the close spread.
    /// Cancel-safe: a message arriving when the future is dropped comes with
    /// the next call.
    ///
    /// ```no_run
    /// # async fn run(mut session: baton_worker::ws::Session) {
    /// use baton_worker::ws::Event;
    ///
    /// while let Some(event) = session.next().await {
    ///     match event {
    ///         Event::Message(message) => println!("{message:?}"),
    ///         Event::Drain => return session.close_for_restart().await,
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<Event> {
        if self.told {
            return received(self.stream.next().await);
        }
        let by = match self.boundary_by {
            Some(by) => by,
            None => {
                let drain = wait_drain(self.mover.as_ref(), self.notice.as_ref());
                tokio::select! {
                    biased;
                    message = self.stream.next() => return received(message),
                    () = drain => {}
                }
                let by = Instant::now() + BOUNDARY_WAIT;
                *self.boundary_by.insert(by)
            }
        };
        // Draining: a message under way is read whole first.
        if !self.stream.get_ref().at_boundary() && Instant::now() < by {
            if let Ok(message) = timeout_at(by, self.stream.next()).await {
                return received(message);
            }
        }
        self.told = true;
        Some(Event::Drain)
    }

    /// Sends a message to the client.
    ///
    /// ```no_run
    /// # async fn run(mut session: baton_worker::ws::Session) -> Result<(), baton_worker::ws::Error> {
    /// session.send(baton_worker::ws::Message::text("hello")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send(&mut self, message: Message) -> Result<(), Error> {
        self.stream.send(message).await
    }

    /// Hands the session over to a worker of the current generation with
    /// `state` (at most 64 KiB), which the handler of the same kind there
    /// reads with [`Session::adopted_state`]. Nothing is sent to the client.
    /// Call it on [`Event::Drain`].
    ///
    /// `Err` gives the session back, with the reason, when it cannot move:
    /// see the [module](self) documentation. It is then the handler's to
    /// close, as with [`Session::close_for_restart`].
    ///
    /// ```no_run
    /// # async fn run(session: baton_worker::ws::Session, count: u64) {
    /// match session.hand_over(count.to_be_bytes()).await {
    ///     Ok(()) => {}
    ///     Err(kept) => {
    ///         eprintln!("session kept: {}", kept.reason);
    ///         kept.session.close_for_restart().await;
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn hand_over(mut self, state: impl Into<Vec<u8>>) -> Result<(), Kept> {
        let state = state.into();
        let (Some(mover), Some(handover)) = (&self.mover, self.hub.clone()) else {
            return Err(self.kept("the session cannot move: not supervised, `[worker] handover = false`, or a listener with TLS".into()));
        };
        let address = mover.address.clone();
        if state.len() > MAX_SESSION_STATE {
            let why = format!(
                "its state of {} bytes is over the limit of {MAX_SESSION_STATE}",
                state.len()
            );
            return Err(self.kept(why));
        }
        if !self.stream.get_ref().at_boundary() {
            return Err(self.kept("it is in the middle of a message".into()));
        }
        // A pong or the end of a message still queued goes out first.
        match timeout(FLUSH_WAIT, self.stream.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.kept(format!("writing what it had queued: {e}"))),
            Err(_) => return Err(self.kept("writing what it had queued took over a second".into())),
        }
        let gate = self.stream.get_ref();
        if gate.pending.len() > MAX_PENDING {
            return Err(self.kept("too many bytes read ahead".into()));
        }
        let Either::Left(socket) = &gate.io else {
            return Err(self.kept("its socket cannot move".into()));
        };
        let copy = match socket_of(socket.get_ref()).try_clone_to_owned() {
            Ok(copy) => copy,
            Err(e) => return Err(self.kept(format!("copying its socket: {e}"))),
        };
        let session = HandedSession {
            kind: self.kind.to_string(),
            state,
        };
        let pending = gate.pending.to_vec();
        match handover.offer(&address, copy, pending, Some(session)).await {
            // This worker's copy goes without a word: the socket lives on in
            // the worker that took it.
            Answer::Taken | Answer::Unknown => Ok(()),
            Answer::Refused(why) => Err(self.kept(why)),
        }
    }

    /// The session given back by [`Session::hand_over`]; one given back
    /// at a drain is counted among the connections closed at drain.
    fn kept(self, reason: String) -> Kept {
        if self.told {
            if let Some(hub) = &self.hub {
                hub.closed_at_drain();
            }
        }
        Kept {
            session: self,
            reason,
        }
    }

    /// Closes the session with `code` and `reason`, and waits a second at
    /// most for the client's close frame.
    ///
    /// ```no_run
    /// # async fn run(session: baton_worker::ws::Session) {
    /// session.close(1000, "bye").await;
    /// # }
    /// ```
    pub async fn close(mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        if self.stream.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        let _ = timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(message)) = self.stream.next().await {
                if let Message::Close(_) = message {
                    break;
                }
            }
        })
        .await;
    }

    /// Closes the session with code 1012 (Service Restart), which tells the
    /// client to reconnect: what a session that does not move says at a
    /// drain.
    ///
    /// ```no_run
    /// # async fn run(session: baton_worker::ws::Session) {
    /// session.close_for_restart().await;
    /// # }
    /// ```
    pub async fn close_for_restart(self) {
        self.close(1012, "service restart").await
    }
}

/// Completes when a session should hear of the drain: at once for one that
/// moves, at its turn in the close spread for one that does not.
async fn wait_drain(mover: Option<&Mover>, notice: Option<&DrainNotice>) {
    match (mover, notice) {
        (Some(mover), _) => {
            mover.drain.wait().await;
        }
        (None, Some(notice)) => {
            notice.notified().await;
        }
        (None, None) => std::future::pending().await,
    }
}

/// A message read, as [`Session::next`] gives it.
fn received(message: Option<Result<Message, Error>>) -> Option<Event> {
    match message {
        Some(Ok(message)) => Some(Event::Message(message)),
        Some(Err(_)) | None => None,
    }
}

/// A session [`Session::hand_over`] could not move, given back.
#[derive(Debug)]
pub struct Kept {
    /// The session, still open.
    pub session: Session,
    /// Why it did not move.
    pub reason: String,
}

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} session was not handed over: {}",
            self.session.kind, self.reason
        )
    }
}

/// A session's socket: its own, able to move, or a stream that stays.
type Socket = Either<Counted<FdStream>, Box<dyn Io>>;

/// The stream tungstenite reads a session from: it gives a frame only once
/// it is read (nearly) whole, and no byte past its end, so that between two
/// messages tungstenite holds nothing unread and every byte read ahead is
/// here, to travel with the socket.
struct FrameGate<I> {
    io: I,
    /// Read from the socket, not yet given.
    pending: Bytes,
    /// Bytes of the frame under way still to give; 0 at a frame's start.
    frame_left: u64,
    /// A fragmented message is under way (its last frame not yet seen).
    in_message: bool,
}

impl<I> FrameGate<I> {
    fn new(io: I, pending: Bytes) -> FrameGate<I> {
        FrameGate {
            io,
            pending,
            frame_left: 0,
            in_message: false,
        }
    }

    /// Whether every frame given was given whole and no message is under
    /// way: tungstenite, having parsed them, holds nothing of the client's.
    fn at_boundary(&self) -> bool {
        self.frame_left == 0 && !self.in_message
    }

    /// Starts the frame `pending` begins with once it holds the whole
    /// frame, or [`WHOLE_FRAME`] bytes of a longer one: until then its bytes
    /// stay here, and travel with the socket if the session moves.
    fn start_frame(&mut self) -> bool {
        let Some(frame) = FrameHeader::parse(&self.pending) else {
            return false;
        };
        if (self.pending.len() as u64) < frame.length.min(WHOLE_FRAME) {
            return false;
        }
        self.frame_left = frame.length;
        match frame.opcode {
            // Text, binary: a message, whole unless FIN is clear.
            1 | 2 => self.in_message = !frame.fin,
            // Continuation: the message ends with FIN.
            0 => self.in_message &= !frame.fin,
            // Control frames come between fragments and change nothing.
            _ => {}
        }
        true
    }
}

impl<I: AsyncRead + Unpin> FrameGate<I> {
    /// Reads more from the socket into `pending`; `Ok(0)` at its end.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let read = buf.filled();
        if !read.is_empty() {
            self.pending = [&self.pending[..], read].concat().into();
        }
        Poll::Ready(Ok(read.len()))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FrameGate<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let ended = if this.frame_left == 0 && !this.start_frame() {
                // A frame read in part: more of it first.
                ready!(this.fill(cx))? == 0
            } else if this.pending.is_empty() {
                ready!(this.fill(cx))? == 0
            } else {
                let n = (this.pending.len() as u64)
                    .min(this.frame_left)
                    .min(buf.remaining() as u64) as usize;
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.frame_left -= n as u64;
                return Poll::Ready(Ok(()));
            };
            if ended {
                // The client went: what is left of a header, then the end.
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FrameGate<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What a frame's header (RFC 6455 §5.2) says of it.
#[derive(Debug, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    /// The whole frame's length, header included.
    length: u64,
}

impl FrameHeader {
    /// The header `bytes` begin with, if they hold all of it.
    fn parse(bytes: &[u8]) -> Option<FrameHeader> {
        let (&first, &second) = (bytes.first()?, bytes.get(1)?);
        let (extended, payload) = match second & 0x7f {
            126 => (
                2,
                u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
            ),
            127 => (8, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)),
            short => (0, u64::from(short)),
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        Some(FrameHeader {
            fin: first & 0x80 != 0,
            opcode: first & 0x0f,
            length: (2 + extended + mask as u64).saturating_add(payload),
        })
    }
}

#[cfg(test)]
mod tests;
