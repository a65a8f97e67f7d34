//! Who keeps an old generation alive: `baton status` lists each draining
//! worker's deadline and the TCP connections it still holds (found with
//! `sock_diag` and the worker's own fds, so for any server), and a worker
//! killed at its deadline is logged with them.

use baton_tests::harness::{event_name, field, hello_config, Baton, TempDir};
use baton_tests::tools::{repository, require};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The draining workers of generation `number` in a status answer.
fn draining_workers(status: &Value, number: u64) -> Vec<Value> {
    baton_tests::harness::generation_in(status, number)
        .and_then(|g| g["workers"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|w| w["state"] == "draining")
        .collect()
}

/// Polls `baton status --json` until a draining worker of generation
/// `number` lists a connection from `peer`; returns that worker.
fn wait_listed(baton: &Baton, number: u64, peer: SocketAddr) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = baton.status();
        let found = draining_workers(&status, number).into_iter().find(|w| {
            w["open_connections"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["peer"] == peer.to_string()))
        });
        if let Some(worker) = found {
            return worker;
        }
        assert!(
            Instant::now() < deadline,
            "no draining worker of generation {number} lists {peer}: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_names_an_idle_keep_alive_client_of_a_draining_sdk_worker() {
    // With handover the idle connection would move to the new generation
    // at once: off, the old worker keeps it until it closes it.
    let config = hello_config(1).replace("[worker]\n", "[worker]\nhandover = false\n");
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let mut client = TcpStream::connect(baton.address("http")).unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = [0u8; 512];
    assert!(client.read(&mut answer).unwrap() > 0);
    // The connection is idle now, kept alive; the reload drains its worker.
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let worker = wait_listed(&baton, 1, client.local_addr().unwrap());
    let connection = worker["open_connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["peer"] == client.local_addr().unwrap().to_string())
        .unwrap()
        .clone();
    assert_eq!(connection["state"], "ESTAB", "{connection}");
    assert_eq!(connection["local"], baton.address("http").to_string());
    assert!(connection["idle_s"].as_f64().is_some(), "{connection}");
    assert!(worker["kill_in_s"].as_f64().unwrap() <= 5.0, "{worker}");
    assert!(worker["drain_deadline"].as_f64().is_some(), "{worker}");
}

#[test]
fn a_gunicorn_worker_killed_at_its_deadline_is_logged_with_its_open_connection() {
    let Some(gunicorn) = require(
        "gunicorn",
        "python3 -m venv target/wrap-venv && target/wrap-venv/bin/pip install gunicorn uvicorn",
    ) else {
        return;
    };
    let home = TempDir::new();
    let config = format!(
        "[supervisor]\nlog_format = \"json\"\n\n[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n\
         [worker]\ncommand = [{:?}, \"--workers\", \"1\", \"app:application\"]\n\
         cwd = {:?}\nenv = {{ HOME = {:?}, PYTHONDONTWRITEBYTECODE = \"1\" }}\n\
         protocol = \"systemd\"\nready = \"notify\"\nready_timeout = \"30s\"\ndrain_timeout = \"3s\"\n",
        gunicorn.display().to_string(),
        repository().join("examples/gunicorn").display().to_string(),
        home.path().display().to_string(),
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    // A client that sent half a request: gunicorn's sync worker waits on
    // it, and does not exit when told to stop.
    let mut client = TcpStream::connect(baton.address("http")).unwrap();
    client.write_all(b"GET / HTTP/1.1\r\nHost: te").unwrap();
    let peer = client.local_addr().unwrap();
    // Wait until the worker has accepted it (it is in its fds).
    std::thread::sleep(Duration::from_millis(300));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let worker = wait_listed(&baton, 1, peer);
    assert!(worker["kill_in_s"].as_f64().is_some(), "{worker}");
    let out = baton.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&peer.to_string()), "{table}");
    let killed = baton.wait_event(Duration::from_secs(15), |e| {
        event_name(e) == "worker.killed_at_deadline"
    });
    assert!(
        field(&killed, "open").contains(&peer.to_string()),
        "{killed}"
    );
}
