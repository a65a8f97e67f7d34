//! `GET /events` on the admin endpoint: every key event as Server-Sent
//! Events, in the log's JSON; a reader that stops reading never delays the
//! master.

use baton_tests::harness::{event_name, hello_config, Baton};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn with_admin() -> Baton {
    let config =
        hello_config(2).replace("[supervisor]\n", "[supervisor]\nadmin = \"127.0.0.1:0\"\n");
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    baton
}

fn admin(baton: &Baton) -> SocketAddr {
    baton.status()["master"]["admin"]
        .as_str()
        .expect("the admin address")
        .parse()
        .unwrap()
}

/// Opens `/events`: the response's head is read, and its first comment.
fn open(admin: SocketAddr) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: baton\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    // Connected once the first comment came.
    let mut line = String::new();
    while !line.starts_with(": baton events") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    reader
}

/// The next SSE message: its `event:` name and its `data:` JSON (chunk
/// sizes of the chunked encoding are skipped).
fn next_message(reader: &mut BufReader<TcpStream>) -> (String, Value) {
    let mut name = None;
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        let line = line.trim_end();
        if let Some(n) = line.strip_prefix("event: ") {
            name = Some(n.to_string());
        } else if let Some(data) = line.strip_prefix("data: ") {
            let name = name.take().expect("event: before data:");
            return (name, serde_json::from_str(data).expect("JSON data"));
        }
    }
}

#[test]
fn events_stream_each_reload_as_server_sent_events_in_the_logs_json() {
    let mut baton = with_admin();
    let mut events = open(admin(&baton));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let committed = loop {
        assert!(Instant::now() < deadline, "no reload.committed: {seen:?}");
        let (name, data) = next_message(&mut events);
        assert_eq!(data["fields"]["event"], name.as_str(), "{data}");
        seen.push(name.clone());
        if name == "reload.committed" {
            break data;
        }
    };
    assert!(seen.contains(&"reload.started".to_string()), "{seen:?}");
    assert!(seen.contains(&"worker.ready".to_string()), "{seen:?}");
    // The same JSON as the log's line for it.
    assert_eq!(committed["span"]["generation"], 2, "{committed}");
    assert_eq!(committed["span"]["trigger"], "signal", "{committed}");
    assert_eq!(committed["fields"], outcome["fields"], "{committed}");
}

#[test]
fn a_reader_that_stops_reading_never_delays_the_master() {
    let mut baton = with_admin();
    let stuck = open(admin(&baton));
    for _ in 0..20 {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    }
    let started = Instant::now();
    let status = baton.status();
    eprintln!(
        "`baton status` answered in {:?} with a stuck /events reader",
        started.elapsed()
    );
    assert_eq!(status["master"]["current_generation"], 21, "{status}");
    drop(stuck);
    // Another reader still gets what happens.
    let mut events = open(admin(&baton));
    baton.reload();
    loop {
        let (name, _) = next_message(&mut events);
        if name == "reload.committed" {
            break;
        }
    }
}
