//! `axum-app`: an axum app under baton, the way an axum user writes one.
//!
//! ```text
//! axum-app [--listen ADDR]
//! ```
//!
//! Routes: `/` (text, with the `x-baton-generation` header), `/status`
//! (JSON, shared state), `/slow?ms=N` (answers after N ms, default 500),
//! `/ws` and `/ws-plain`, two WebSocket echoes that greet with their
//! generation:
//!
//! - `/ws` is a baton session: it answers each text message `#N TEXT from
//!   generation G`, N counting the session's messages, and at a reload moves
//!   to the next generation with its count, without the client noticing
//!   (only G changes).
//! - `/ws-plain` is axum's own WebSocket: it echoes the text and, when the
//!   worker drains, closes with code 1012, Service Restart, so the client
//!   reconnects to the next generation.
//!
//! Under baton it serves the master's listener `http`; standalone it binds
//! `--listen` (default 127.0.0.1:8080) and drains on SIGTERM or SIGINT.

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use baton_worker::http::DrainNotice;
use baton_worker::ws::{self, Event, Session};
use baton_worker::Worker;
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a closing WebSocket waits for the client's close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(1);

/// What every handler shares.
#[derive(Clone)]
struct App {
    generation: u64,
    requests: Arc<AtomicU64>,
}

#[derive(Serialize)]
struct Status {
    generation: u64,
    pid: u32,
    requests: u64,
}

#[derive(Deserialize)]
struct Slow {
    ms: Option<u64>,
}

async fn index(State(app): State<App>) -> impl IntoResponse {
    app.requests.fetch_add(1, Ordering::Relaxed);
    (
        [("x-baton-generation", app.generation.to_string())],
        format!("hello from generation {}\n", app.generation),
    )
}

async fn status(State(app): State<App>) -> Json<Status> {
    Json(Status {
        generation: app.generation,
        pid: std::process::id(),
        requests: app.requests.fetch_add(1, Ordering::Relaxed) + 1,
    })
}

async fn slow(State(app): State<App>, Query(slow): Query<Slow>) -> String {
    tokio::time::sleep(Duration::from_millis(slow.ms.unwrap_or(500))).await;
    format!("slow answer from generation {}\n", app.generation)
}

/// A `/ws` session, new or handed over by the previous generation with its
/// count (8 bytes, big-endian): echoes with the count until the client
/// leaves, and hands the count on at a drain.
async fn counting_echo(mut session: Session, generation: u64) {
    let mut count = match session.adopted_state() {
        Some(state) => match <[u8; 8]>::try_from(state) {
            Ok(bytes) => u64::from_be_bytes(bytes),
            Err(_) => return session.close(1011, "unreadable session state").await,
        },
        None => {
            let greeting = format!("generation {generation}");
            if session.send(ws::Message::text(greeting)).await.is_err() {
                return;
            }
            0
        }
    };
    while let Some(event) = session.next().await {
        match event {
            Event::Message(ws::Message::Text(text)) => {
                count += 1;
                let answer = format!("#{count} {text} from generation {generation}");
                if session.send(ws::Message::text(answer)).await.is_err() {
                    return;
                }
            }
            Event::Message(_) => {}
            Event::Drain => match session.hand_over(count.to_be_bytes()).await {
                Ok(()) => return,
                Err(kept) => return kept.session.close_for_restart().await,
            },
        }
    }
}

/// The SDK puts a [`DrainNotice`] in every request; the socket takes it
/// along past the upgrade.
async fn ws_plain(
    upgrade: WebSocketUpgrade,
    State(app): State<App>,
    Extension(notice): Extension<DrainNotice>,
) -> Response {
    upgrade.on_upgrade(move |socket| echo(socket, app.generation, notice))
}

/// Greets, echoes text until the client leaves or the worker drains, then
/// says goodbye with 1012 and waits briefly for the client's close frame.
async fn echo(mut socket: WebSocket, generation: u64, notice: DrainNotice) {
    let greeting = format!("generation {generation}");
    if socket.send(Message::Text(greeting.into())).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            _ = notice.notified() => break,
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let goodbye = CloseFrame {
        code: close_code::RESTART,
        reason: "service restart".into(),
    };
    if socket.send(Message::Close(Some(goodbye))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
        while let Some(Ok(message)) = socket.recv().await {
            if let Message::Close(_) = message {
                break;
            }
        }
    })
    .await;
}

fn app(generation: u64, sessions: ws::Sessions) -> Router {
    let state = App {
        generation,
        requests: Arc::default(),
    };
    let echo = sessions.route("echo", move |session| counting_echo(session, generation));
    Router::new()
        .route("/", get(index))
        .route("/status", get(status))
        .route("/slow", get(slow))
        .route(
            "/ws",
            get(move |request: Request| async move { echo.accept(request) }),
        )
        .route("/ws-plain", get(ws_plain))
        .with_state(state)
}

/// An axum app under baton.
#[derive(clap::Parser)]
struct Args {
    /// The address to bind when run without baton.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let result = async {
        let mut worker = Worker::builder()
            .listener("http", args.listen)
            .start()
            .await?;
        let app = app(worker.generation(), worker.sessions());
        worker.serve("http", app).await
    };
    match result.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("axum-app: {error}");
            ExitCode::FAILURE
        }
    }
}
