//! The admin endpoint (`[supervisor] admin`): what Prometheus, Kubernetes
//! probes and an on-call engineer read, and that it never moves while the
//! master reloads, upgrades or stops.

use baton_tests::harness::{event_name, hello_config, wrapped_worker, Baton, TempDir};
use baton_tests::tools::require;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `config` with the admin endpoint on `address`.
fn with_admin(config: &str, address: &str) -> String {
    config.replace(
        "[supervisor]\n",
        &format!("[supervisor]\nadmin = {address:?}\n"),
    )
}

/// The admin endpoint's address, as `baton status` reports it.
fn admin_address(baton: &Baton) -> SocketAddr {
    let status = baton.status();
    status["master"]["admin"]
        .as_str()
        .unwrap_or_else(|| panic!("no admin address in {status}"))
        .parse()
        .unwrap()
}

/// `GET path` on `stream`: `(status, body)`.
fn exchange(stream: impl Read + Write, path: &str) -> std::io::Result<(u16, String)> {
    let (status, _, body) = baton_tests::harness::exchange(stream, path)?;
    Ok((status, body))
}

/// `GET path` on the TCP admin endpoint.
fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(stream, path)
}

/// Kills a helper process (Prometheus) when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query against Prometheus: `{labels → value}` of the
/// result vector, labels joined as `k=v,...` in the order asked.
fn query(prometheus: SocketAddr, promql: &str, labels: &[&str]) -> Option<Vec<(String, f64)>> {
    let (status, body) = admin_get(
        prometheus,
        &format!("/api/v1/query?query={}", encode(promql)),
    )
    .ok()?;
    if status != 200 {
        return None;
    }
    let answer: Value = serde_json::from_str(&body).ok()?;
    let mut out: Vec<(String, f64)> = answer["data"]["result"]
        .as_array()?
        .iter()
        .map(|r| {
            let key = labels
                .iter()
                .map(|l| format!("{l}={}", r["metric"][l].as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",");
            let value = r["value"][1]
                .as_str()
                .unwrap_or("nan")
                .parse()
                .unwrap_or(f64::NAN);
            (key, value)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Some(out)
}

#[test]
fn prometheus_scrapes_reload_counts_and_promtool_accepts_the_exposition() {
    let (Some(prometheus), Some(promtool)) = (
        require("prometheus", "apt-get install prometheus"),
        require("promtool", "apt-get install prometheus"),
    ) else {
        return;
    };
    let mut baton = Baton::start(&with_admin(&hello_config(2), "127.0.0.1:0"));
    baton.wait_committed(1);
    let admin = admin_address(&baton);

    let dir = TempDir::new();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n\
             scrape_configs:\n  - job_name: baton\n    static_configs:\n      - targets: [\"{admin}\"]\n"
        ),
    )
    .unwrap();
    let _prometheus = Reaped(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );

    // Three reloads from the CLI, one by SIGHUP, one that fails.
    for generation in 2..=4 {
        assert!(baton.cli(&["reload"]).status.success());
        baton.wait_committed(generation);
    }
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let good = std::fs::read_to_string(baton.dir().join("baton.toml")).unwrap();
    baton.write_config("this is not toml");
    let out = baton.cli(&["reload"]);
    assert!(!out.status.success());
    baton.write_config(&good);

    let expected = vec![
        ("trigger=cli,outcome=committed".to_string(), 3.0),
        ("trigger=cli,outcome=failed".to_string(), 1.0),
        ("trigger=signal,outcome=committed".to_string(), 1.0),
        ("trigger=start,outcome=committed".to_string(), 1.0),
    ];
    let promql = "sum by (trigger, outcome) (baton_reloads_total)";
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        last = query(web, promql, &["trigger", "outcome"]);
        if last.as_ref() == Some(&expected) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last, Some(expected), "Prometheus' answer to {promql}");
    // The gauges Prometheus saw name the current generation and its workers.
    let workers = query(
        web,
        "sum by (generation) (baton_workers{state=\"ready\"})",
        &["generation"],
    );
    assert_eq!(workers, Some(vec![("generation=5".to_string(), 2.0)]));

    // The classic text format is what promtool lints.
    let (status, exposition) = admin_get(admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "baton_reload_phase_duration_seconds_bucket{",
        "baton_listener_accept_queue{listener=\"http\"",
        "baton_listener_backlog{listener=\"http\"",
        "baton_host_listen_overflows_total ",
        "baton_config_info{generation=\"5\"",
        "baton_current_generation 5",
    ] {
        assert!(exposition.contains(name), "no {name} in\n{exposition}");
    }
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{exposition}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[test]
fn readyz_turns_503_when_a_graceful_stop_starts_while_workers_drain() {
    // Workers that ignore SIGTERM drain until their deadline: the master
    // stays up, stopping, meanwhile.
    let config = baton_tests::harness::config_with_worker(&wrapped_worker(
        &["--ignore-term"],
        "drain_timeout = \"30s\"\n",
    ));
    let mut baton = Baton::start(&with_admin(&config, "unix:admin.sock"));
    baton.wait_committed(1);
    let socket = baton.dir().join("admin.sock");
    let unix_get = |path: &str| {
        let stream = std::os::unix::net::UnixStream::connect(&socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        exchange(stream, path)
    };
    assert_eq!(unix_get("/healthz").unwrap().0, 200);
    assert_eq!(unix_get("/readyz").unwrap(), (200, "ready\n".to_string()));
    let (status, body) = unix_get("/status").unwrap();
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&body).unwrap();
    let asked = baton.status();
    assert_eq!(served["master"], {
        let mut m = asked["master"].clone();
        m["uptime_s"] = served["master"]["uptime_s"].clone();
        m
    });
    assert_eq!(unix_get("/nope").unwrap().0, 404);

    baton.signal(Signal::SIGQUIT);
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "master.stopping"
    });
    let (status, body) = unix_get("/readyz").unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: the master is stopping\n")
    );
    assert_eq!(unix_get("/healthz").unwrap().0, 200);
    let (_, metrics) = unix_get("/metrics").unwrap();
    assert!(metrics.contains("baton_stopping 1\n"), "{metrics}");
    assert!(
        metrics.contains("baton_workers{generation=\"1\",state=\"draining\"} 1\n"),
        "{metrics}"
    );
    // Still draining: the master is alive, stopping.
    assert!(baton.try_exit().is_none());
    baton.signal(Signal::SIGINT);
    baton.wait_exit(Duration::from_secs(15));
    assert!(
        !Path::new(&socket).exists(),
        "admin socket file left behind"
    );
}

/// Polls `/healthz` and `/metrics` until `stop`: `(answered, failures)`.
fn poll_admin(addr: SocketAddr, stop: &std::sync::atomic::AtomicBool) -> (u64, Vec<String>) {
    let mut answered = 0;
    let mut failures = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for path in ["/healthz", "/metrics"] {
            match admin_get(addr, path) {
                Ok((200, _)) => answered += 1,
                Ok((status, body)) => failures.push(format!("{path}: {status} {body}")),
                Err(e) => failures.push(format!("{path}: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (answered, failures)
}

fn admin_stays_reachable_across_upgrades(extra: &str, upgrades: usize) {
    let config = with_admin(&hello_config(1), "127.0.0.1:0")
        .replace("[supervisor]\n", &format!("[supervisor]\n{extra}"));
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let admin = admin_address(&baton);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (answered, failures) = std::thread::scope(|s| {
        let poller = s.spawn(|| poll_admin(admin, &stop));
        let mut master = baton.pid();
        for round in 0..upgrades {
            let out = baton.cli(&["upgrade"]);
            assert!(out.status.success(), "upgrade {round} failed");
            if extra.is_empty() {
                master = baton.wait_new_master(master, Duration::from_secs(30));
            }
            baton.wait_committed(round as u64 + 2);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        poller.join().unwrap()
    });
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(answered > upgrades as u64, "only {answered} answers");
    assert_eq!(admin_address(&baton), admin);
    let (_, metrics) = admin_get(admin, "/metrics").unwrap();
    assert!(
        metrics.contains("baton_upgrades_total{outcome=\"committed\"} 1\n"),
        "{metrics}"
    );
}

#[test]
fn admin_endpoint_stays_reachable_across_ten_upgrades() {
    admin_stays_reachable_across_upgrades("", 10);
}

#[test]
fn admin_endpoint_stays_reachable_across_in_place_upgrades() {
    admin_stays_reachable_across_upgrades("upgrade = \"exec\"\n", 3);
}

/// `GET path` on a Unix admin socket.
fn unix_get(socket: &Path, path: &str) -> std::io::Result<(u16, String)> {
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(stream, path)
}

#[test]
fn a_reload_moves_the_admin_endpoint_and_one_that_cannot_bind_fails_in_bind() {
    let config = hello_config(1);
    let mut baton = Baton::start(&with_admin(&config, "unix:a.sock"));
    baton.wait_committed(1);
    let (a, b) = (baton.dir().join("a.sock"), baton.dir().join("b.sock"));
    assert_eq!(unix_get(&a, "/healthz").unwrap().0, 200);

    baton.write_config(&with_admin(&config, "unix:b.sock"));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(unix_get(&b, "/healthz").unwrap().0, 200);
    assert!(!a.exists(), "the old admin socket file is left behind");

    // A port someone else holds: the reload fails, nothing moves.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    baton.write_config(&with_admin(&config, &address));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.failed", "{outcome}");
    assert_eq!(baton_tests::harness::field(&outcome, "phase"), "bind");
    assert!(
        baton_tests::harness::field(&outcome, "reason")
            .contains(&format!("binding the admin endpoint on {address}")),
        "{outcome}"
    );
    assert_eq!(unix_get(&b, "/readyz").unwrap().0, 200);
    assert_eq!(baton.status()["master"]["admin"], b.display().to_string());
}

#[test]
fn a_unix_admin_socket_is_handed_to_the_new_master_at_an_upgrade() {
    let baton = Baton::start(&with_admin(&hello_config(1), "unix:admin.sock"));
    baton.wait_committed(1);
    let socket = baton.dir().join("admin.sock");
    let old = baton.pid();
    assert!(baton.cli(&["upgrade"]).status.success());
    let new = baton.wait_new_master(old, Duration::from_secs(30));
    let (status, body) = unix_get(&socket, "/status").unwrap();
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["master"]["pid"], new.as_raw());
    assert_eq!(unix_get(&socket, "/readyz").unwrap().0, 200);
}

/// `GET path` on a new connection, within `bound`: `(status, took)`.
fn probe(addr: SocketAddr, path: &str, bound: Duration) -> Result<(u16, Duration), String> {
    let start = Instant::now();
    let stream = std::net::TcpStream::connect_timeout(&addr, bound).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(bound))
        .map_err(|e| e.to_string())?;
    let (status, _) =
        exchange(stream, path).map_err(|e| format!("{e} after {:?}", start.elapsed()))?;
    Ok((status, start.elapsed()))
}

#[test]
fn health_and_readiness_answer_while_silent_slow_and_idle_clients_crowd_the_admin_port() {
    use baton_tests::crowd::{Crowd, Kind};
    let baton = Baton::start(&with_admin(&hello_config(1), "127.0.0.1:0"));
    baton.wait_committed(1);
    let admin = admin_address(&baton);
    let limit = Duration::from_secs(60);
    let crowds = [
        Crowd::start(admin, Kind::Silent, 200, limit),
        Crowd::start(admin, Kind::Slowloris, 200, limit),
        Crowd::start(admin, Kind::IdleKeepAlive, 64, limit),
    ];
    // Every crowd has opened its connections (at one a second per slot,
    // reopening what the master closes).
    let deadline = Instant::now() + Duration::from_secs(10);
    while crowds.iter().map(Crowd::opened).sum::<u64>() < 464 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Probes over 8 s, across the 5 s header deadline that closes the
    // crowd's connections and its reopening them. 1 s is a generous
    // bound: the endpoint answers in about a millisecond.
    let bound = Duration::from_secs(1);
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        for path in ["/healthz", "/readyz"] {
            match probe(admin, path, bound) {
                Ok((200, took)) => slowest = slowest.max(took),
                Ok((status, took)) => failures.push(format!("{path}: {status} after {took:?}")),
                Err(e) => failures.push(format!("{path}: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    let opened: Vec<u64> = crowds.iter().map(Crowd::opened).collect();
    drop(crowds);
    assert!(
        failures.is_empty(),
        "{} of 40 probes failed (crowd opened {opened:?}): {failures:?}",
        failures.len()
    );
    eprintln!("slowest probe: {slowest:?}; crowd opened {opened:?}");
    // The master is fine, and the admin endpoint still serves scrapes.
    assert_eq!(admin_get(admin, "/metrics").unwrap().0, 200);
}
