//! The scenarios beyond HTTP/1.1: HTTP/2 (baton + `hello` beside nginx
//! `listen ... http2`) and WebSocket (baton + `axum-app`), each under a
//! reload every interval.
//!
//! HTTP/2 runs twice. First h2load with new connections opened all along
//! (each sends its streams at once and closes; a refused stream or a cut
//! connection fails). Then long-lived connections, with the strict client of
//! `baton_tests::http2` rather than `h2load -D`: h2load opens no stream after
//! a GOAWAY and counts a failure for each, so its count there measured
//! h2load. The strict client does what RFC 9113 asks of a client — it
//! reconnects after a GOAWAY and retries the streams the server refused
//! unprocessed (above the GOAWAY's last-stream-id, or `REFUSED_STREAM`) —
//! and counts those apart from the streams lost after the server accepted
//! them. The WebSocket scenarios send a text every 50 ms on each session
//! and count the sessions the server ended, how many of them got a close
//! frame before the end, and answers out of order: `ws-baton` on
//! `axum-app`'s `/ws-plain` (axum's own WebSocket, closed with 1012 at a
//! drain), `ws-baton-handover` on its `/ws` (SDK sessions that move to the
//! next generation with their per-session count).

use crate::args::Options;
use crate::servers::{Binaries, Kind, Server};
use baton_tests::h2load;
use baton_tests::http2::{Http2Config, Http2Report};
use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a scenario sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    Http2,
    /// On this path of `axum-app`.
    WebSocket(&'static str),
    Http3,
}

/// One system under one kind of traffic, reloaded with HUP.
pub struct ProtocolScenario {
    /// For `--only`.
    pub name: &'static str,
    pub system: &'static str,
    pub kind: Kind,
    pub traffic: Traffic,
}

/// In run order.
pub const SCENARIOS: [ProtocolScenario; 5] = [
    ProtocolScenario {
        name: "h2-baton",
        system: "baton + hello",
        kind: Kind::Baton,
        traffic: Traffic::Http2,
    },
    ProtocolScenario {
        name: "h2-nginx",
        system: "nginx, listen http2",
        kind: Kind::NginxHttp2,
        traffic: Traffic::Http2,
    },
    ProtocolScenario {
        name: "ws-baton",
        system: "baton + axum-app, axum's WebSocket (`/ws-plain`)",
        kind: Kind::BatonAxum,
        traffic: Traffic::WebSocket("/ws-plain"),
    },
    ProtocolScenario {
        name: "ws-baton-handover",
        system: "baton + axum-app, SDK sessions (`/ws`)",
        kind: Kind::BatonAxum,
        traffic: Traffic::WebSocket("/ws"),
    },
    // No peer: Debian's nginx 1.22 and HAProxy 2.6 have no QUIC.
    ProtocolScenario {
        name: "h3-baton",
        system: "baton + h3-app, quic = true",
        kind: Kind::BatonH3,
        traffic: Traffic::Http3,
    },
];

/// Streams each connection opens (h2load's new connections) or keeps in
/// flight (the strict client's long-lived ones), as in `h2load -m 4`.
const STREAMS: u32 = 4;

/// What a row counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Requests, or WebSocket sessions the server ended.
    pub done: u64,
    /// Requests failed (lost after the server accepted them, for the strict
    /// client), or sessions cut without a close frame plus answers out of
    /// order.
    pub failed: u64,
    /// The strict HTTP/2 client's retries: `(refused, unsent)`, streams the
    /// server refused unprocessed and requests not opened on a connection
    /// going away.
    pub retried: Option<(u64, u64)>,
}

/// One row of the table.
pub struct Row {
    pub scenario: &'static str,
    pub system: String,
    pub traffic: String,
    pub reloads: u64,
    pub outcome: Result<Counts, String>,
}

impl Row {
    /// The row of a run that counted `Ok((counts, reloads))`, or did not
    /// run.
    fn of(
        scenario: &'static ProtocolScenario,
        system: &str,
        traffic: String,
        outcome: Result<(Counts, u64), String>,
    ) -> Row {
        let (outcome, reloads) = match outcome {
            Ok((counts, reloads)) => (Ok(counts), reloads),
            Err(e) => (Err(e), 0),
        };
        Row {
            scenario: scenario.name,
            system: system.to_string(),
            traffic,
            reloads,
            outcome,
        }
    }
}

/// Sends HUP to `master` every `interval` until `stop`; returns how many.
fn reload_every(
    master: Pid,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut sent = 0;
        // The first reload after the clients are up.
        std::thread::sleep(interval);
        while !stop.load(Ordering::Relaxed) {
            if kill(master, Signal::SIGHUP).is_ok() {
                sent += 1;
            }
            std::thread::sleep(interval);
        }
        sent
    })
}

/// Runs `traffic` against `server` for the options' duration while it is
/// reloaded; `measure` returns the outcome.
fn under_reloads<T>(
    server: &Server,
    options: &Options,
    measure: impl FnOnce(SocketAddr) -> T,
) -> (T, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let reloads = reload_every(server.master, options.interval, stop.clone());
    let outcome = measure(server.addr);
    stop.store(true, Ordering::Relaxed);
    (outcome, reloads.join().unwrap_or(0))
}

/// h2load's failed requests: failed (which includes errored) and timed out.
fn h2_outcome(summary: Result<h2load::Summary, String>) -> Result<Counts, String> {
    let s = summary.map_err(|output| format!("h2load printed no summary: {}", output.trim()))?;
    Ok(Counts {
        done: s.done,
        failed: s.failed + s.timeout + s.bad_status,
        retried: None,
    })
}

/// The strict client's requests: answered or lost, and the retries beside.
fn strict_outcome(report: &Http2Report) -> Result<Counts, String> {
    eprintln!("reload bench: strict HTTP/2 client: {}", report.summary());
    if report.ok == 0 {
        return Err(format!("no request answered: {}", report.summary()));
    }
    Ok(Counts {
        done: report.ok + report.lost(),
        failed: report.lost(),
        retried: Some((report.refused, report.unsent)),
    })
}

fn run_http2(
    scenario: &'static ProtocolScenario,
    system: &str,
    bins: &Binaries,
    options: &Options,
) -> Vec<Row> {
    let row = |traffic: String, outcome: Result<Counts, String>, reloads| Row {
        scenario: scenario.name,
        system: system.to_string(),
        traffic,
        reloads,
        outcome,
    };
    let periods = (options.duration.as_millis() / 100).max(1) as u32;
    let per_period = options.connections as u32;
    let new_connections =
        format!("h2load, {per_period} new connections / 100 ms, {STREAMS} streams each");
    let long_lived = format!(
        "strict client, {} long-lived connections, {STREAMS} streams in flight each",
        options.connections
    );
    let mut rows = Vec::new();
    for (traffic, long) in [(new_connections, false), (long_lived, true)] {
        let tool = match (&bins.h2load, long) {
            (_, true) => None,
            (Some(tool), false) => Some(tool.clone()),
            (None, false) => {
                rows.push(row(traffic, Err("h2load not installed".into()), 0));
                continue;
            }
        };
        let server = match Server::start(scenario.kind, bins) {
            Ok(server) => server,
            Err(e) => {
                rows.push(row(traffic, Err(e), 0));
                continue;
            }
        };
        let (outcome, reloads) = under_reloads(&server, options, |addr| match &tool {
            Some(tool) => h2_outcome(h2load::run(
                tool,
                addr,
                per_period * periods,
                per_period,
                STREAMS,
            )),
            None => strict_outcome(&baton_tests::http2::run(Http2Config {
                connections: options.connections,
                streams: STREAMS as usize,
                duration: options.duration,
                ..Http2Config::new(addr)
            })),
        });
        rows.push(row(traffic, outcome, reloads));
    }
    rows
}

/// What the WebSocket clients saw.
#[derive(Default)]
struct Sessions {
    /// Sessions the server ended.
    ended: AtomicU64,
    /// Of those, ended without a close frame (cut, reset).
    cut: AtomicU64,
    /// Connections or handshakes that failed.
    refused: AtomicU64,
    /// Texts answered.
    answered: AtomicU64,
    /// Answers that were not the echo expected: on `/ws`, a count that does
    /// not follow the session's previous one, or a generation older than
    /// the one that answered before.
    out_of_order: AtomicU64,
    /// Times a session was answered by a newer generation than before: on
    /// `/ws`, the sessions that moved.
    moves: AtomicU64,
}

/// Between two texts of a session.
const TEXT_EVERY: Duration = Duration::from_millis(50);

/// Whether `answer` is the right one to the session's `count`th text, `text`:
/// `/ws` answers `#COUNT TEXT from generation G`, `/ws-plain` echoes.
fn answers(path: &str, answer: &str, text: &str, count: u64) -> bool {
    match path {
        "/ws" => answer
            .strip_prefix(&format!("#{count} {text} from generation "))
            .is_some_and(|g| g.parse::<u64>().is_ok()),
        _ => answer == text,
    }
}

/// The generation an answer or a greeting names last (`... generation G`).
fn generation_of(text: &str) -> Option<u64> {
    text.strip_prefix("generation ")
        .or_else(|| text.rsplit_once(" from generation ").map(|(_, g)| g))?
        .parse()
        .ok()
}

/// One client: connects to `path`, sends a text every [`TEXT_EVERY`] and
/// checks each answer until the server ends the session, notes how, and
/// reconnects, until `until`.
async fn ws_client(addr: SocketAddr, path: &'static str, until: Instant, sessions: Arc<Sessions>) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{addr}{path}");
    while Instant::now() < until {
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(&url),
        )
        .await;
        let Ok(Ok((mut socket, _))) = connected else {
            sessions.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // The greeting first; then each text is answered before the next.
        let mut count = 0u64;
        let mut generation = 0u64;
        let mut waiting: Option<String> = None;
        let polite = loop {
            if waiting.is_none() {
                if Instant::now() >= until {
                    return;
                }
                tokio::time::sleep(TEXT_EVERY).await;
                count += 1;
                let text = format!("t{count}");
                if socket.send(Message::text(text.clone())).await.is_ok() {
                    waiting = Some(text);
                }
            }
            let left = until.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
            match tokio::time::timeout(left, socket.next()).await {
                Err(_) => break false,
                Ok(Some(Ok(Message::Close(frame)))) => break frame.is_some(),
                Ok(Some(Ok(Message::Text(answer)))) => {
                    let named = generation_of(&answer);
                    let older = named.is_some_and(|g| g < generation);
                    if named.is_some_and(|g| g > generation && generation > 0) {
                        sessions.moves.fetch_add(1, Ordering::Relaxed);
                    }
                    generation = generation.max(named.unwrap_or(0));
                    if answer.starts_with("generation ") {
                        continue;
                    }
                    let Some(text) = waiting.take() else { continue };
                    sessions.answered.fetch_add(1, Ordering::Relaxed);
                    if older || !answers(path, &answer, &text, count) {
                        sessions.out_of_order.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => break false,
            }
        };
        sessions.ended.fetch_add(1, Ordering::Relaxed);
        if !polite {
            sessions.cut.fetch_add(1, Ordering::Relaxed);
        }
        // Let tungstenite finish the close handshake.
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_secs(1), socket.next()).await
        {}
    }
}

fn run_websocket(
    scenario: &'static ProtocolScenario,
    path: &'static str,
    system: &str,
    bins: &Binaries,
    options: &Options,
) -> Row {
    let traffic = format!("WebSocket, {} clients", options.connections);
    let outcome = (|| {
        let server = Server::start(scenario.kind, bins)?;
        let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
        let sessions = Arc::new(Sessions::default());
        let (refused, reloads) = under_reloads(&server, options, |addr| {
            let until = Instant::now() + options.duration;
            runtime.block_on(async {
                let clients: Vec<_> = (0..options.connections)
                    .map(|_| tokio::spawn(ws_client(addr, path, until, sessions.clone())))
                    .collect();
                for client in clients {
                    let _ = client.await;
                }
            });
            sessions.refused.load(Ordering::Relaxed)
        });
        if refused > 0 {
            return Err(format!(
                "{refused} WebSocket connections failed ({reloads} reloads)"
            ));
        }
        let counts = Counts {
            done: sessions.ended.load(Ordering::Relaxed),
            failed: sessions.cut.load(Ordering::Relaxed)
                + sessions.out_of_order.load(Ordering::Relaxed),
            retried: None,
        };
        eprintln!(
            "{}: {} texts answered, {} out of order, {} sessions ended ({} cut), {} moves of a session to a newer generation",
            scenario.name,
            sessions.answered.load(Ordering::Relaxed),
            sessions.out_of_order.load(Ordering::Relaxed),
            counts.done,
            sessions.cut.load(Ordering::Relaxed),
            sessions.moves.load(Ordering::Relaxed)
        );
        Ok((counts, reloads))
    })();
    Row::of(scenario, system, traffic, outcome)
}

/// What the HTTP/3 clients counted.
#[derive(Default)]
struct H3Tally {
    ok: AtomicU64,
    /// Requests lost after the server took them, or with their connection.
    failed: AtomicU64,
    /// Requests the server rejected unprocessed, retried on a new connection.
    refused_streams: AtomicU64,
    /// Requests not sent on a connection going away, sent on a new one.
    unsent: AtomicU64,
    /// Connections that could not be opened.
    refused: AtomicU64,
}

/// Why a request did not complete.
enum H3Failure {
    /// Not sent: the connection was going away.
    Unsent,
    /// Rejected unprocessed by the server.
    Refused,
    /// Lost: failed after the server took it, or with its connection.
    Lost,
}

/// A quinn client trusting `dir`'s `cert.pem`, with a 5 s idle timeout.
fn h3_client_config(dir: &std::path::Path) -> Result<quinn::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::from_pem_file(dir.join("cert.pem"))
        .map_err(|e| format!("cert.pem: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .map_err(|_| "idle timeout")?,
    ));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One client: a connection kept open, `GET /` on a new stream after
/// another until `until`; a lost connection is counted and replaced.
async fn h3_client(
    addr: SocketAddr,
    config: quinn::ClientConfig,
    until: Instant,
    tally: Arc<H3Tally>,
) {
    use bytes::Buf;
    while Instant::now() < until {
        let connected = async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("address"))
                .map_err(|e| e.to_string())?;
            endpoint.set_default_client_config(config.clone());
            let connection = endpoint
                .connect(addr, "localhost")
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
            Ok::<_, String>((endpoint, connection, send))
        };
        let Ok(Ok((endpoint, connection, mut send))) =
            tokio::time::timeout(Duration::from_secs(5), connected).await
        else {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while Instant::now() < until {
            let request = async {
                let request = hyper::Request::get("https://localhost/")
                    .body(())
                    .map_err(|_| H3Failure::Lost)?;
                // Refused before it left: the connection is going away
                // (GOAWAY); a new one takes the request.
                let mut stream = send
                    .send_request(request)
                    .await
                    .map_err(|_| H3Failure::Unsent)?;
                let _ = stream.finish().await;
                let response = stream.recv_response().await.map_err(|e| match e {
                    // Not processed (RFC 9114 §5.2, §8.1): safe to retry.
                    h3::error::StreamError::RemoteTerminate {
                        code: h3::error::Code::H3_REQUEST_REJECTED,
                        ..
                    } => H3Failure::Refused,
                    // h3 keeps this variant private: known by its name.
                    e if format!("{e:?}").starts_with("RemoteClosing") => H3Failure::Refused,
                    _ => H3Failure::Lost,
                })?;
                while let Some(mut chunk) = stream.recv_data().await.map_err(|_| H3Failure::Lost)? {
                    chunk.advance(chunk.remaining());
                }
                match response.status() {
                    hyper::StatusCode::OK => Ok(()),
                    _ => Err(H3Failure::Lost),
                }
            };
            let outcome = tokio::time::timeout(Duration::from_secs(5), request)
                .await
                .unwrap_or(Err(H3Failure::Lost));
            match outcome {
                Ok(()) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(H3Failure::Unsent) => tally.unsent.fetch_add(1, Ordering::Relaxed),
                Err(H3Failure::Refused) => tally.refused_streams.fetch_add(1, Ordering::Relaxed),
                Err(H3Failure::Lost) => tally.failed.fetch_add(1, Ordering::Relaxed),
            };
            break;
        }
        connection.close(0x100u32.into(), b"done");
        endpoint.wait_idle().await;
    }
}

fn run_http3(
    scenario: &'static ProtocolScenario,
    system: &str,
    bins: &Binaries,
    options: &Options,
) -> Row {
    let traffic = format!(
        "HTTP/3, {} connections kept open, one request at a time",
        options.connections
    );
    let outcome = (|| {
        let server = Server::start(scenario.kind, bins)?;
        let config = h3_client_config(server.dir())?;
        let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
        let tally = Arc::new(H3Tally::default());
        let ((), reloads) = under_reloads(&server, options, |addr| {
            let until = Instant::now() + options.duration;
            runtime.block_on(async {
                let clients: Vec<_> = (0..options.connections)
                    .map(|_| tokio::spawn(h3_client(addr, config.clone(), until, tally.clone())))
                    .collect();
                for client in clients {
                    let _ = client.await;
                }
            });
        });
        let refused = tally.refused.load(Ordering::Relaxed);
        if refused > 0 {
            return Err(format!(
                "{refused} HTTP/3 connections could not be opened ({reloads} reloads)"
            ));
        }
        let counts = Counts {
            done: tally.ok.load(Ordering::Relaxed),
            failed: tally.failed.load(Ordering::Relaxed),
            retried: Some((
                tally.refused_streams.load(Ordering::Relaxed),
                tally.unsent.load(Ordering::Relaxed),
            )),
        };
        Ok((counts, reloads))
    })();
    Row::of(scenario, system, traffic, outcome)
}

/// Runs `scenario`, one row per kind of traffic.
pub fn run(scenario: &'static ProtocolScenario, bins: &Binaries, options: &Options) -> Vec<Row> {
    let system = match scenario.kind {
        Kind::NginxHttp2 => bins
            .nginx
            .as_deref()
            .and_then(crate::servers::version)
            .map(|v| format!("{v}, listen http2")),
        _ => None,
    }
    .unwrap_or_else(|| scenario.system.to_string());
    eprintln!("reload bench: {system} / HUP / {:?} ...", scenario.traffic);
    match scenario.traffic {
        Traffic::Http2 => run_http2(scenario, &system, bins, options),
        Traffic::WebSocket(path) => vec![run_websocket(scenario, path, &system, bins, options)],
        Traffic::Http3 => vec![run_http3(scenario, &system, bins, options)],
    }
}

/// The rows as a markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| system | traffic | reloads | requests / sessions ended | failed (lost) / cut without a close frame | refused + not sent, retried |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let (done, failed, retried) = match &row.outcome {
            Ok(c) => (
                c.done.to_string(),
                c.failed.to_string(),
                c.retried.map_or("—".into(), |(refused, unsent)| {
                    format!("{refused} + {unsent}")
                }),
            ),
            Err(why) => (format!("not run: {why}"), "—".into(), "—".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {done} | {failed} | {retried} |",
            row.system, row.traffic, row.reloads
        );
    }
    out
}

/// The rows for `reload.json`.
pub fn json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|row| {
                let mut value = json!({
                    "scenario": row.scenario,
                    "system": row.system,
                    "traffic": row.traffic,
                    "reloads": row.reloads,
                });
                match &row.outcome {
                    Ok(c) => {
                        value["done"] = json!(c.done);
                        value["failed"] = json!(c.failed);
                        if let Some((refused, unsent)) = c.retried {
                            value["refused"] = json!(refused);
                            value["unsent"] = json!(unsent);
                        }
                    }
                    Err(why) => value["not_run"] = json!(why),
                }
                value
            })
            .collect(),
    )
}
