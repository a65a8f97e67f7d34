//! `examples/axum` under baton: plain requests cross reloads without a
//! failure; its `/ws` sessions move to the next generation with their
//! per-session counter, and every WebSocket that cannot move (handover off,
//! or axum's own on `/ws-plain`) is told to go with a close frame (1012,
//! Service Restart) and reconnects to the next generation.

use crate::reload_under_load::reloads_under_load_drop_nothing;
use baton_tests::harness::{event_name, example_config, field, Baton, Binaries};
use baton_tests::load::Mode;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// Connects to `path` and returns the socket with the generation it greets
/// with.
async fn connect(addr: SocketAddr, path: &str) -> (Socket, u64) {
    let (mut socket, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
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
/// do), then reconnects to `path` and checks the new connection echoes.
async fn ride_out_the_reload(mut socket: Socket, addr: SocketAddr, path: &str) -> Outcome {
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
    let (mut socket, reconnected_to) = connect(addr, path).await;
    socket.send(Message::Text("ping".into())).await.unwrap();
    // `/ws-plain` echoes the text, `/ws` counts it: `#1 ping from ...`.
    let echoed = next_text(&mut socket).await.contains("ping");
    let _ = socket.close(None).await;
    Outcome {
        close_code,
        reconnected_to,
        echoed,
    }
}

/// `CLIENTS` WebSockets on `path` of a master running `config` across one
/// reload: each gets a close frame with code 1012 and reconnects to the
/// next generation. Returns the master, for its events.
fn websockets_close_1012_at_a_reload(config: &str, path: &'static str) -> Baton {
    const CLIENTS: usize = 20;
    let mut baton = Baton::start(config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sockets: Vec<Socket> = runtime.block_on(async {
        let mut sockets = Vec::new();
        for _ in 0..CLIENTS {
            let (socket, generation) = connect(addr, path).await;
            assert_eq!(generation, 1);
            sockets.push(socket);
        }
        sockets
    });
    let clients: Vec<_> = sockets
        .into_iter()
        .map(|socket| runtime.spawn(ride_out_the_reload(socket, addr, path)))
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
    baton
}

#[test]
fn websocket_clients_get_close_1012_at_a_reload_and_reconnect_to_the_new_generation() {
    // axum's own WebSocket: the app did not opt in to moving it.
    let baton = websockets_close_1012_at_a_reload(&axum_config(), "/ws-plain");
    // The old generation finished once its sockets were closed.
    baton.wait_generation_finished(1);
}

#[test]
fn with_handover_off_sessions_close_1012_and_are_counted_as_closed_at_drain() {
    let config = axum_config().replace("[worker]\n", "[worker]\nhandover = false\n");
    let baton = websockets_close_1012_at_a_reload(&config, "/ws");
    let finished = baton.wait_generation_finished(1);
    assert_eq!(field(&finished, "closed_at_drain"), "20", "{finished}");
    assert_eq!(field(&finished, "handed_over"), "0", "{finished}");
}

/// What the session clients saw.
#[derive(Debug, Default)]
struct SessionTally {
    /// Sessions that ended or failed while the test ran (closed by the
    /// server, a read or write error, an answer not in time).
    ended: AtomicU64,
    /// Answers whose count did not follow the previous one, or came from an
    /// older generation than the previous one: each with its story.
    out_of_order: Mutex<Vec<String>>,
    /// Messages answered.
    answered: AtomicU64,
    /// The newest generation each session has heard from.
    generations: Mutex<Vec<u64>>,
}

/// One `/ws` session: sends a message every 20 to 200 ms until `stop`, and
/// checks each answer's count follows the previous one.
async fn counting_client(
    index: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<SessionTally>,
) {
    let (mut socket, mut generation) = connect(addr, "/ws").await;
    tally.generations.lock().unwrap()[index] = generation;
    let mut count = 0u64;
    let mut pause = 20 + (index as u64 * 37) % 180;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        pause = 20 + (pause * 7 + 11) % 180;
        let text = format!("m{index}");
        if socket
            .send(Message::Text(text.clone().into()))
            .await
            .is_err()
        {
            tally.ended.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let answer = match tokio::time::timeout(PATIENCE, socket.next()).await {
            Ok(Some(Ok(Message::Text(answer)))) => answer.to_string(),
            other => {
                eprintln!("session {index} ended after {count} messages: {other:?}");
                tally.ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        count += 1;
        // `#N TEXT from generation G`
        let words: Vec<&str> = answer.split(' ').collect();
        let heard = match words[..] {
            [n, t, "from", "generation", g] if t == text => n
                .strip_prefix('#')
                .and_then(|n| n.parse::<u64>().ok())
                .zip(g.parse::<u64>().ok()),
            _ => None,
        };
        match heard {
            Some((n, g)) if n == count && g >= generation => generation = g,
            _ => {
                tally.out_of_order.lock().unwrap().push(format!(
                    "session {index}: message {count} at generation {generation} answered {answer:?}"
                ));
                generation = heard.map_or(generation, |(_, g)| g.max(generation));
            }
        }
        tally.answered.fetch_add(1, Ordering::Relaxed);
        tally.generations.lock().unwrap()[index] = generation;
    }
    let _ = socket.close(None).await;
}

/// Issue 22's WebSocket figure: 200 sessions of `/ws` across 20 HUPs, and 2
/// binary upgrades of baton itself: none closed, every session's counter
/// goes on where it was, and each ends served by the last generation.
#[test]
fn websocket_sessions_keep_their_counters_across_twenty_reloads_and_two_upgrades() {
    const SESSIONS: usize = 200;
    const RELOADS: u64 = 20;
    const UPGRADES: u64 = 2;
    let baton = Baton::start(&axum_config());
    baton.wait_committed(1);
    let addr = baton.address("http");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(SessionTally {
        generations: Mutex::new(vec![0; SESSIONS]),
        ..SessionTally::default()
    });
    let clients: Vec<_> = (0..SESSIONS)
        .map(|index| runtime.spawn(counting_client(index, addr, stop.clone(), tally.clone())))
        .collect();
    let opened = Instant::now() + PATIENCE;
    while tally.generations.lock().unwrap().contains(&0) && Instant::now() < opened {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut master = baton.pid();
    for reload in 1..=RELOADS {
        nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGHUP).unwrap();
        baton.wait_committed(reload + 1);
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..UPGRADES {
        nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGUSR2).unwrap();
        master = baton.wait_new_master(master, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    let last = RELOADS + UPGRADES + 1;
    let reached = Instant::now() + Duration::from_secs(20);
    while tally.generations.lock().unwrap().iter().any(|g| *g < last) && Instant::now() < reached {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for client in clients {
            client.await.unwrap();
        }
    });
    let out_of_order = tally.out_of_order.lock().unwrap();
    assert_eq!(
        (tally.ended.load(Ordering::Relaxed), out_of_order.len()),
        (0, 0),
        "sessions ended, answers out of order ({} answered): {out_of_order:#?}",
        tally.answered.load(Ordering::Relaxed)
    );
    let behind: Vec<u64> = tally
        .generations
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|g| *g != last)
        .collect();
    assert!(
        behind.is_empty(),
        "sessions not served by generation {last}: {behind:?}"
    );
    // Each HUP's drained generation moved every session it held.
    for generation in 1..=RELOADS {
        let finished = baton.wait_generation_finished(generation);
        assert_eq!(field(&finished, "closed_at_drain"), "0", "{finished}");
    }
}

/// A masked text frame, as a client sends it.
fn client_text_frame(text: &str) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    assert!(text.len() < 126);
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one unmasked text frame (under 126 bytes) from the server.
fn read_server_text(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = [0u8; 2];
    stream
        .read_exact(&mut head)
        .expect("a frame from the server");
    assert_eq!(head[0], 0x81, "a whole text frame, not {:#x}", head[0]);
    let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
    stream.read_exact(&mut payload).unwrap();
    String::from_utf8(payload).unwrap()
}

/// A session whose client has sent part of a frame when the worker drains:
/// the bytes read travel with the socket, and the new generation answers
/// the message once, whole, when the rest comes.
#[test]
fn a_message_half_sent_across_the_handover_is_answered_once_by_the_new_generation() {
    use std::io::{Read, Write};
    let mut baton = Baton::start(&axum_config());
    baton.wait_committed(1);
    let mut stream = std::net::TcpStream::connect(baton.address("http")).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: baton\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("the upgrade's answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    assert_eq!(read_server_text(&mut stream), "generation 1");

    let first = client_text_frame("m1");
    stream.write_all(&first[..5]).unwrap();
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let finished = baton.wait_generation_finished(1);
    assert_eq!(field(&finished, "handed_over"), "1", "{finished}");
    stream.write_all(&first[5..]).unwrap();
    assert_eq!(read_server_text(&mut stream), "#1 m1 from generation 2");
    stream.write_all(&client_text_frame("m2")).unwrap();
    assert_eq!(read_server_text(&mut stream), "#2 m2 from generation 2");
    // Nothing else came: no second answer, no close.
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut more = [0u8; 1];
    let read = stream.read(&mut more);
    assert!(
        read.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "{read:?}"
    );
}
