//! The scenarios beyond HTTP/1.1: HTTP/2 with h2load (baton + `hello`
//! beside nginx `listen ... http2`) and WebSocket (baton + `axum-app`),
//! each under a reload every interval.
//!
//! HTTP/2 runs h2load twice: with new connections opened all along (each
//! sends its streams at once; a refused stream or a cut connection fails)
//! and with long-lived connections (`-D`). h2load never reconnects after a
//! GOAWAY and counts a failure for each connection that got one, so the
//! second mode measures what a reload costs clients that do not reconnect.
//! The WebSocket scenario counts the sessions the server ended and how many
//! of them got a close frame before the end.

use crate::args::Options;
use crate::servers::{Binaries, Kind, Server};
use baton_tests::h2load;
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
    WebSocket,
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
pub const SCENARIOS: [ProtocolScenario; 3] = [
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
        system: "baton + axum-app",
        kind: Kind::BatonAxum,
        traffic: Traffic::WebSocket,
    },
];

/// Streams each h2load connection keeps open, as in `h2load -m 4`.
const STREAMS: u32 = 4;

/// One row of the table.
pub struct Row {
    pub scenario: &'static str,
    pub system: String,
    pub traffic: String,
    pub reloads: u64,
    /// `(done, failed)`: requests, or WebSocket sessions the server ended
    /// and those of them cut without a close frame.
    pub outcome: Result<(u64, u64), String>,
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
fn h2_outcome(summary: Result<h2load::Summary, String>) -> Result<(u64, u64), String> {
    let s = summary.map_err(|output| format!("h2load printed no summary: {}", output.trim()))?;
    Ok((s.done, s.failed + s.timeout + s.bad_status))
}

fn run_http2(
    scenario: &'static ProtocolScenario,
    system: &str,
    bins: &Binaries,
    options: &Options,
) -> Vec<Row> {
    let row = |traffic: String, outcome: Result<(u64, u64), String>, reloads| Row {
        scenario: scenario.name,
        system: system.to_string(),
        traffic,
        reloads,
        outcome,
    };
    let Some(tool) = bins.h2load.clone() else {
        return vec![row("h2load".into(), Err("h2load not installed".into()), 0)];
    };
    let periods = (options.duration.as_millis() / 100).max(1) as u32;
    let per_period = options.connections as u32;
    let new_connections =
        format!("h2load, {per_period} new connections / 100 ms, {STREAMS} streams each");
    let long_lived = format!(
        "h2load -D, {} long-lived connections, {STREAMS} streams each",
        options.connections
    );
    let mut rows = Vec::new();
    for (traffic, long) in [(new_connections, false), (long_lived, true)] {
        let server = match Server::start(scenario.kind, bins) {
            Ok(server) => server,
            Err(e) => {
                rows.push(row(traffic, Err(e), 0));
                continue;
            }
        };
        let (summary, reloads) = under_reloads(&server, options, |addr| {
            if long {
                let clients = options.connections as u32;
                h2load::run_timed(&tool, addr, clients, STREAMS, options.duration)
            } else {
                h2load::run(&tool, addr, per_period * periods, per_period, STREAMS)
            }
        });
        rows.push(row(traffic, h2_outcome(summary), reloads));
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
}

/// One client: connects to `/ws`, waits for the server to end the session,
/// notes how, and reconnects, until `until`.
async fn ws_client(addr: SocketAddr, until: Instant, sessions: Arc<Sessions>) {
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{addr}/ws");
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
        let polite = loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, socket.next()).await {
                // The run is over: leave without counting.
                Err(_) => return,
                Ok(Some(Ok(Message::Close(frame)))) => break frame.is_some(),
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
                    .map(|_| tokio::spawn(ws_client(addr, until, sessions.clone())))
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
        let ended = sessions.ended.load(Ordering::Relaxed);
        Ok(((ended, sessions.cut.load(Ordering::Relaxed)), reloads))
    })();
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
        Traffic::WebSocket => vec![run_websocket(scenario, &system, bins, options)],
    }
}

/// The rows as a markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| system | traffic | reloads | requests / sessions ended | failed / cut without a close frame |\n\
         |---|---|---:|---:|---:|\n",
    );
    for row in rows {
        let (done, failed) = match &row.outcome {
            Ok((done, failed)) => (done.to_string(), failed.to_string()),
            Err(why) => (format!("not run: {why}"), "—".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {done} | {failed} |",
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
                    Ok((done, failed)) => {
                        value["done"] = json!(done);
                        value["failed"] = json!(failed);
                    }
                    Err(why) => value["not_run"] = json!(why),
                }
                value
            })
            .collect(),
    )
}
