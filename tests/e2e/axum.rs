//! `examples/axum` under baton: plain requests cross reloads without a
//! failure, and every WebSocket is told to go with a close frame (1012,
//! Service Restart) and reconnects to the next generation.

use crate::reload_under_load::reloads_under_load_drop_nothing;
use baton_tests::harness::{event_name, example_config, Baton, Binaries};
use baton_tests::load::Mode;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn axum_config() -> String {
    example_config(&Binaries::example("axum-app"), 2)
}

#[test]
fn axum_app_under_keepalive_load_fails_no_request_across_reloads() {
    reloads_under_load_drop_nothing(&axum_config(), Mode::KeepAlive);
}

#[test]
fn axum_app_under_new_connection_load_fails_no_request_across_reloads() {
    reloads_under_load_drop_nothing(&axum_config(), Mode::NewConnection);
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Bounds every wait on the server.
const PATIENCE: Duration = Duration::from_secs(10);

/// Connects to `/ws` and returns the socket with the generation it greets with.
async fn connect(addr: SocketAddr) -> (Socket, u64) {
    let (mut socket, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
    )
    .await
    .expect("connect within the patience")
    .expect("WebSocket handshake");
    let greeting = next_text(&mut socket).await;
    let generation = greeting
        .strip_prefix("generation ")
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("greeting {greeting:?}"));
    (socket, generation)
}

async fn next_text(socket: &mut Socket) -> String {
    match tokio::time::timeout(PATIENCE, socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// What one client saw across the reload.
#[derive(Debug)]
struct Outcome {
    close_code: Option<CloseCode>,
    reconnected_to: u64,
    echoed: bool,
}

/// Waits for the server's goodbye on `socket` (answering it, as clients
/// do), then reconnects and checks the new connection echoes.
async fn ride_out_the_reload(mut socket: Socket, addr: SocketAddr) -> Outcome {
    let close_code = loop {
        match tokio::time::timeout(PATIENCE, socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            // The stream ended, or failed, without a close frame.
            Ok(Some(Err(_)) | None) | Err(_) => break None,
        }
    };
    // tungstenite answered the close; the stream ends after it.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, socket.next()).await {}
    let (mut socket, reconnected_to) = connect(addr).await;
    socket.send(Message::Text("ping".into())).await.unwrap();
    let echoed = next_text(&mut socket).await == "ping";
    let _ = socket.close(None).await;
    Outcome {
        close_code,
        reconnected_to,
        echoed,
    }
}

#[test]
fn websocket_clients_get_close_1012_at_a_reload_and_reconnect_to_the_new_generation() {
    const CLIENTS: usize = 20;
    let mut baton = Baton::start(&axum_config());
    baton.wait_committed(1);
    let addr = baton.address("http");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sockets: Vec<Socket> = runtime.block_on(async {
        let mut sockets = Vec::new();
        for _ in 0..CLIENTS {
            let (socket, generation) = connect(addr).await;
            assert_eq!(generation, 1);
            sockets.push(socket);
        }
        sockets
    });
    let clients: Vec<_> = sockets
        .into_iter()
        .map(|socket| runtime.spawn(ride_out_the_reload(socket, addr)))
        .collect();
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let outcomes: Vec<Outcome> = runtime.block_on(async {
        let mut outcomes = Vec::new();
        for client in clients {
            outcomes.push(client.await.unwrap());
        }
        outcomes
    });
    let polite = outcomes
        .iter()
        .filter(|o| o.close_code == Some(CloseCode::Restart) && o.reconnected_to == 2 && o.echoed)
        .count();
    assert_eq!(polite, CLIENTS, "{outcomes:#?}");
    // The old generation finished once its sockets were closed.
    baton.wait_generation_finished(1);
}
