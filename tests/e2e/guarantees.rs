//! The guarantees table (`docs/guarantees.md`), measured: the SDK's
//! examples and each wrapped server (gunicorn, uvicorn, hypercorn, node,
//! nginx), reloaded with HUP under four kinds of traffic at once — a new
//! connection per request, keep-alive connections, long-lived HTTP/2
//! connections and WebSocket sessions — with every failure counted.
//!
//! What baton guarantees is asserted: not one failed request on new
//! connections for every server, and none of any kind for the SDK. What a
//! wrapped server does with the connections it owns (keep-alive, HTTP/2,
//! WebSocket) is its own: those counts are recorded, not asserted, except
//! where the server's settings in the row make them 0.
//!
//! With `BATON_GUARANTEES_OUT=docs/guarantees.md` (relative to the
//! repository) the test writes the table there, with the date and revision.

mod rows;
mod websocket;

use baton_tests::harness::{message, Baton};
use baton_tests::http2::{Http2Config, Http2Load, Http2Report};
use baton_tests::load::{LoadConfig, LoadHandle, Mode, Report};
use rows::{Expect, Row, Traffic};
use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use websocket::{WsLoad, WsReport};

/// HUPs per row.
const RELOADS: u64 = 3;
/// Pause after each committed reload, so that every load crosses it.
const PAUSE: Duration = Duration::from_millis(500);
/// Bounds every load: no request starts after it.
const LOAD_BOUND: Duration = Duration::from_secs(60);
/// Per request (or attempt, or WebSocket step).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The clients of each column.
const NEW_CONNECTION_CLIENTS: usize = 2;
const KEEP_ALIVE_CLIENTS: usize = 4;
const HTTP2_CONNECTIONS: usize = 2;
const HTTP2_STREAMS: usize = 4;
const WEBSOCKET_CLIENTS: usize = 4;

/// One cell of the table.
#[derive(Clone, Debug)]
enum Cell {
    /// The server does not serve this traffic; why.
    Unsupported(&'static str),
    /// The server is not installed here.
    NotRun,
    /// `done` requests (or WebSocket sessions opened), `failed`
    /// of them failed; `note` adds what else was counted.
    Measured {
        done: u64,
        failed: u64,
        note: String,
        expect: Expect,
    },
}

/// A row's measured cells, in column order.
struct Measured {
    row: &'static Row,
    cells: Vec<Cell>,
    /// Handovers baton gave up waiting on: a replaced generation of a
    /// wrapped server still had connections queued after `HANDOVER_LIMIT`
    /// (1 s) and was signalled all the same.
    gave_up: usize,
}

/// The warning baton logs when it signals a replaced generation whose
/// sockets still hold queued connections.
const GAVE_UP: &str =
    "connections still queued on the replaced generation's sockets: draining anyway";

/// The loads running against one master, one per column the server serves.
struct Loads {
    new_connection: Option<LoadHandle>,
    keep_alive: Option<LoadHandle>,
    http2: Option<Http2Load>,
    websocket: Option<WsLoad>,
}

fn http1(addr: SocketAddr, mode: Mode, connections: usize) -> LoadHandle {
    LoadHandle::start(LoadConfig {
        addr,
        connections,
        mode,
        duration: LOAD_BOUND,
        max_requests: 5_000_000,
        timeout: REQUEST_TIMEOUT,
        path: "/".into(),
    })
}

impl Loads {
    fn start(row: &Row, http: SocketAddr, h2: SocketAddr) -> Loads {
        let supports = |t: Traffic| row.unsupported(t).is_none();
        Loads {
            new_connection: supports(Traffic::NewConnection)
                .then(|| http1(http, Mode::NewConnection, NEW_CONNECTION_CLIENTS)),
            keep_alive: supports(Traffic::KeepAlive)
                .then(|| http1(http, Mode::KeepAlive, KEEP_ALIVE_CLIENTS)),
            http2: supports(Traffic::Http2).then(|| {
                Http2Load::start(Http2Config {
                    addr: h2,
                    connections: HTTP2_CONNECTIONS,
                    streams: HTTP2_STREAMS,
                    duration: LOAD_BOUND,
                    max_requests: 5_000_000,
                    timeout: REQUEST_TIMEOUT,
                    path: "/".into(),
                })
            }),
            websocket: supports(Traffic::WebSocket)
                .then(|| WsLoad::start(http, WEBSOCKET_CLIENTS, LOAD_BOUND, REQUEST_TIMEOUT)),
        }
    }

    /// Waits until every load got answers.
    fn wait_flowing(&self, name: &str) {
        let patience = Duration::from_secs(20);
        for (what, load) in [
            ("new connections", &self.new_connection),
            ("keep-alive", &self.keep_alive),
        ] {
            if let Some(load) = load {
                assert!(load.wait_for_ok(20, patience), "{name}: no {what} traffic");
            }
        }
        if let Some(load) = &self.http2 {
            assert!(load.wait_for_ok(20, patience), "{name}: no HTTP/2 traffic");
        }
        if let Some(load) = &self.websocket {
            assert!(
                load.wait_for_sessions(WEBSOCKET_CLIENTS as u64, patience),
                "{name}: no WebSocket session"
            );
        }
    }

    fn stop(self, row: &Row) -> Vec<Cell> {
        let expect = |t: Traffic| row.expect(t);
        let http1 = |load: Option<LoadHandle>, t: Traffic| match load {
            Some(load) => cell_of_http1(load.stop(), expect(t)),
            None => Cell::Unsupported(row.unsupported(t).unwrap_or("")),
        };
        vec![
            http1(self.new_connection, Traffic::NewConnection),
            http1(self.keep_alive, Traffic::KeepAlive),
            match self.http2 {
                Some(load) => cell_of_http2(load.stop(), expect(Traffic::Http2)),
                None => Cell::Unsupported(row.unsupported(Traffic::Http2).unwrap_or("")),
            },
            match self.websocket {
                Some(load) => cell_of_websocket(load.stop(), expect(Traffic::WebSocket)),
                None => Cell::Unsupported(row.unsupported(Traffic::WebSocket).unwrap_or("")),
            },
        ]
    }
}

fn cell_of_http1(report: Report, expect: Expect) -> Cell {
    Cell::Measured {
        done: report.samples.len() as u64,
        failed: report.failed(),
        note: if report.failed() > 0 {
            report.failures_summary()
        } else {
            String::new()
        },
        expect,
    }
}

fn cell_of_http2(report: Http2Report, expect: Expect) -> Cell {
    Cell::Measured {
        done: report.ok + report.lost(),
        failed: report.lost(),
        note: report.summary(),
        expect,
    }
}

fn cell_of_websocket(report: WsReport, expect: Expect) -> Cell {
    Cell::Measured {
        done: report.attempts(),
        failed: report.failed(),
        note: report.summary(),
        expect,
    }
}

/// Runs `row` under its loads through [`RELOADS`] HUPs.
fn measure(row: &'static Row) -> Measured {
    let Some(setup) = (row.setup)() else {
        return Measured {
            row,
            cells: vec![Cell::NotRun; 4],
            gave_up: 0,
        };
    };
    let mut baton = Baton::start_in(setup.dir, &["run"]);
    baton.wait_committed(1);
    let http = baton.address("http");
    let h2 = baton.address(setup.h2_listener);
    let loads = Loads::start(row, http, h2);
    loads.wait_flowing(row.name);
    for _ in 0..RELOADS {
        let outcome = baton.reload();
        assert_eq!(
            message(&outcome),
            "reload committed",
            "{}: {outcome}",
            row.name
        );
        std::thread::sleep(PAUSE);
    }
    // Every drained generation gone: whatever its server did to its
    // connections on the way out is in the counts.
    let started = Instant::now();
    for generation in 1..=RELOADS {
        baton.wait_generation_finished(generation);
    }
    eprintln!("{}: drained in {:?}", row.name, started.elapsed());
    std::thread::sleep(PAUSE);
    let cells = loads.stop(row);
    let gave_up = baton.count_events(|e| message(e) == GAVE_UP);
    Measured {
        row,
        cells,
        gave_up,
    }
}

#[test]
fn each_server_under_reloads_under_load_keeps_the_documented_guarantees() {
    // `BATON_GUARANTEES_ONLY=uvicorn,nginx` measures those rows only.
    let only = std::env::var("BATON_GUARANTEES_ONLY").unwrap_or_default();
    let selected = |row: &&Row| only.is_empty() || only.split(',').any(|o| o == row.name);
    let measured: Vec<Measured> = rows::ROWS.iter().filter(selected).map(measure).collect();
    let table = markdown(&measured);
    eprintln!("{table}");
    let mut broken = Vec::new();
    for m in &measured {
        for (traffic, cell) in Traffic::ALL.iter().zip(&m.cells) {
            if let Cell::Measured {
                done,
                failed,
                note,
                expect: Expect::Zero,
            } = cell
            {
                // What baton promises new connections holds while a replaced
                // generation empties its accept queue within the handover
                // limit; past it, a server that closes what it accepted
                // unread when it stops fails those (shown in the table).
                let excused = *traffic == Traffic::NewConnection && m.gave_up > 0;
                if (*failed > 0 && !excused) || *done == 0 {
                    broken.push(format!(
                        "{} / {}: {failed} of {done} failed ({note})",
                        m.row.name,
                        traffic.title()
                    ));
                }
            }
        }
    }
    if let Some(out) = std::env::var_os("BATON_GUARANTEES_OUT") {
        assert!(
            only.is_empty(),
            "BATON_GUARANTEES_OUT writes the whole table: unset BATON_GUARANTEES_ONLY"
        );
        let path = baton_tests::tools::repository().join(out);
        std::fs::write(&path, document(&table, &broken))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    }
    assert!(
        broken.is_empty(),
        "guarantees broken:\n{}",
        broken.join("\n")
    );
}

/// The table: one row per server, one column per traffic.
fn markdown(measured: &[Measured]) -> String {
    let mut out = String::from("| server, settings |");
    for t in Traffic::ALL {
        let _ = write!(out, " {} |", t.title());
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(Traffic::ALL.len()));
    out.push('\n');
    for m in measured {
        let _ = write!(out, "| {} |", m.row.label);
        for (i, cell) in m.cells.iter().enumerate() {
            let text = match cell {
                Cell::Unsupported(why) => format!("— ({why})"),
                Cell::NotRun => "not run (not installed)".into(),
                Cell::Measured {
                    done,
                    failed,
                    expect,
                    ..
                } => {
                    let mut counts = format!("{failed} of {done}");
                    if i == 0 && m.gave_up > 0 {
                        let _ = write!(counts, " ({} handovers past the 1 s limit)", m.gave_up);
                    }
                    let excused = i == 0 && m.gave_up > 0 && *failed > 0;
                    match expect {
                        Expect::Zero if !excused => format!("**{counts}**"),
                        _ => counts,
                    }
                }
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out.push_str("\nCounts in detail (HTTP/2: `lost` failed after the server accepted them, `refused` were refused unprocessed and `unsent` not opened on a connection going away, both retried on a new connection; WebSocket: `sessions` opened, those the server `ended`, `cut` without a close frame, `failed_handshakes`):\n\n");
    for m in measured {
        for (t, cell) in Traffic::ALL.iter().zip(&m.cells) {
            if let Cell::Measured { note, .. } = cell {
                if !note.is_empty() {
                    let _ = writeln!(out, "- {} / {}: {note}", m.row.name, t.title());
                }
            }
        }
    }
    out
}

/// `docs/guarantees.md`: the generated table inside its fixed text.
fn document(table: &str, broken: &[String]) -> String {
    let revision = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(baton_tests::tools::repository())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split(' ').next().unwrap_or("?");
    let machine = format!("{cpus} CPUs, load average {load} at the end of the run");
    let outcome = if broken.is_empty() {
        "The test passed in this run: every bold cell is 0.".to_string()
    } else {
        format!(
            "The test failed in this run: {}.",
            broken.join("; ").replace('|', "/")
        )
    };
    rows::DOCUMENT
        .replace("{outcome}", &outcome)
        .replace("{reloads}", &RELOADS.to_string())
        .replace("{machine}", &machine)
        .replace("{table}", table)
        .replace("{date}", &date)
        .replace("{revision}", &revision)
        .replace(
            "{new_connection_clients}",
            &NEW_CONNECTION_CLIENTS.to_string(),
        )
        .replace("{keep_alive_clients}", &KEEP_ALIVE_CLIENTS.to_string())
        .replace("{http2_connections}", &HTTP2_CONNECTIONS.to_string())
        .replace("{http2_streams}", &HTTP2_STREAMS.to_string())
        .replace("{websocket_clients}", &WEBSOCKET_CLIENTS.to_string())
}
