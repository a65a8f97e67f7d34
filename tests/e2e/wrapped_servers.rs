//! Real third-party servers wrapped by baton, unchanged: gunicorn through
//! `protocol = "systemd"` and uvicorn through `protocol = "args"`, reloaded
//! again and again under a new-connection-per-request load. Not one request
//! may fail, and every process of a drained generation, the server's own
//! children included, must be gone.
//!
//! uvicorn is the hard one: when it starts shutting down it closes the
//! connections it has accepted but not read yet (upstream:
//! Kludex/uvicorn#2757), so on a socket shared with the new generation a
//! request now and then is reset. baton gives each such generation a socket
//! of its own on the port and signals the old one only once nothing is
//! queued for it; this test is what shows that works.
//!
//! The servers come from `$BATON_WRAP_VENV/bin`, then `target/wrap-venv/bin`
//! (where `.ci/run` installs them), then `PATH`. When one is missing the
//! test prints why and passes, unless `BATON_REQUIRE_TOOLS=1`.

use baton_tests::harness::{alive, descendants, event_name, Baton, Binaries, TempDir};
use baton_tests::load::{LoadConfig, LoadHandle, Mode, Report};
use baton_tests::tools::repository;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const RELOADS: u64 = 10;
/// Closed-loop clients, each with one request at a time.
const CONNECTIONS: usize = 4;

/// The server's executable, or `None` (after saying why) when the test
/// should be skipped.
fn find_server(name: &str) -> Option<PathBuf> {
    baton_tests::tools::require(
        name,
        "python3 -m venv target/wrap-venv && target/wrap-venv/bin/pip install gunicorn uvicorn",
    )
}

/// Waits until none of `pids` is alive.
fn wait_gone(pids: &[nix::unistd::Pid], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|p| alive(*p)) {
        let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
        assert!(
            Instant::now() < deadline,
            "processes of a drained generation still alive: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `worker` (a `[worker]` body), then HUPs it `RELOADS` times under
/// load; checks each drained generation leaves no process behind, and that
/// every generation answered. Returns the load's report.
fn reload_under_new_connection_load(name: &str, worker: &str, processes: usize) -> Report {
    let config = format!(
        "[supervisor]\nlog_format = \"json\"\n\n[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n[worker]\n{worker}"
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = LoadHandle::start(LoadConfig {
        addr,
        connections: CONNECTIONS,
        mode: Mode::NewConnection,
        duration: Duration::from_secs(240),
        max_requests: 10_000_000,
        timeout: Duration::from_secs(10),
        path: "/".into(),
    });
    assert!(
        load.wait_for_ok(50, Duration::from_secs(30)),
        "no traffic flows"
    );
    for reload in 1..=RELOADS {
        // Every process of the generation, once the server has started them.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut old = descendants(baton.pid());
        while old.len() < processes {
            assert!(Instant::now() < deadline, "{name}: only {old:?} running");
            std::thread::sleep(Duration::from_millis(20));
            old = descendants(baton.pid());
        }
        let outcome = baton.reload();
        assert_eq!(
            event_name(&outcome),
            "reload.committed",
            "{name}: {outcome}"
        );
        baton.wait_generation_finished(reload);
        wait_gone(&old, Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.latest_generation() < Some(reload + 1) {
            assert!(
                Instant::now() < deadline,
                "{name}: generation {} never answered",
                reload + 1
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let report = load.stop();
    eprintln!(
        "{name}: {} ok, {} failed ({}) over {RELOADS} reloads in {:?}, generations {:?}",
        report.ok(),
        report.failed(),
        report.failures_summary(),
        report.elapsed,
        report.generations()
    );
    assert!(
        report.ok() > 100,
        "{name}: too little traffic: {}",
        report.ok()
    );
    assert_eq!(report.generations().last(), Some(&(RELOADS + 1)));
    report
}

#[test]
fn gunicorn_via_systemd_reloads_under_new_connection_load_fail_nothing() {
    let Some(gunicorn) = find_server("gunicorn") else {
        return;
    };
    // gunicorn 23+ puts a control socket in $HOME: keep it in the test's dir.
    let home = TempDir::new();
    let worker = format!(
        "command = [{:?}, \"--workers\", \"2\", \"app:application\"]\n\
         cwd = {:?}\nenv = {{ HOME = {:?}, PYTHONDONTWRITEBYTECODE = \"1\" }}\n\
         protocol = \"systemd\"\nready = \"notify\"\nready_timeout = \"30s\"\ndrain_timeout = \"30s\"\n",
        gunicorn.display().to_string(),
        repository().join("examples/gunicorn").display().to_string(),
        home.path().display().to_string(),
    );
    // The arbiter and its 2 workers.
    let report = reload_under_new_connection_load("gunicorn", &worker, 3);
    assert_eq!(
        report.failed(),
        0,
        "gunicorn: failed requests: {}",
        report.failures_summary()
    );
}

#[test]
fn uvicorn_via_args_reloads_under_new_connection_load_fail_nothing() {
    let Some(uvicorn) = find_server("uvicorn") else {
        return;
    };
    let worker = format!(
        "command = [{:?}, \"app:app\", \"--fd\", \"{{fd:http}}\", \"--no-access-log\"]\n\
         cwd = {:?}\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\" }}\n\
         protocol = \"args\"\nready = \"delay:1s\"\nready_timeout = \"30s\"\ndrain_timeout = \"30s\"\n",
        uvicorn.display().to_string(),
        repository().join("examples/uvicorn").display().to_string(),
    );
    let report = reload_under_new_connection_load("uvicorn", &worker, 1);
    assert_eq!(report.failed(), 0, "uvicorn: {}", report.failures_summary());
}

#[test]
fn the_wrapped_server_examples_are_valid_configs() {
    for example in ["gunicorn", "uvicorn", "nginx", "node"] {
        let config = repository()
            .join("examples")
            .join(example)
            .join("baton.toml");
        let out = Command::new(Binaries::baton())
            .args(["check", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        // `baton check` also looks for the server's program, which the
        // docs (docs/wrapping.md) have the user install (a venv in the example's directory,
        // nginx on PATH): only that may be missing here.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || stderr.lines().all(|l| l.contains(": worker command \"")),
            "{}: {stderr}",
            config.display(),
        );
    }
}

/// uvicorn's `--fd` wraps the inherited socket as `AF_UNIX`, so asyncio
/// never sets `TCP_NODELAY` on what it accepts, and each response (head
/// and body in two writes) waited on Nagle's algorithm and the client's
/// delayed ACK: ~40 ms a keep-alive request, against 0.4 ms alone. The
/// listening socket carries `TCP_NODELAY` now, which accepted connections
/// inherit: 50 sequential keep-alive requests take well under 50 × 40 ms.
#[test]
fn uvicorn_keep_alive_requests_do_not_wait_on_nagle() {
    let Some(uvicorn) = find_server("uvicorn") else {
        return;
    };
    let config = format!(
        "[supervisor]\nlog_format = \"json\"\n\n[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n\
         [worker]\ncommand = [{:?}, \"app:app\", \"--fd\", \"{{fd:http}}\", \"--no-access-log\"]\n\
         cwd = {:?}\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\" }}\n\
         protocol = \"args\"\nready = \"delay:1s\"\nready_timeout = \"30s\"\ndrain_timeout = \"5s\"\n",
        uvicorn.display().to_string(),
        repository().join("examples/uvicorn").display().to_string(),
    );
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let keep_alive = |requests: u64| {
        baton_tests::load::run(LoadConfig {
            addr,
            connections: 1,
            mode: Mode::KeepAlive,
            duration: Duration::from_secs(20),
            max_requests: requests,
            timeout: Duration::from_secs(5),
            path: "/".into(),
        })
    };
    // The first request on a fresh server warms up its code paths.
    assert_eq!(keep_alive(5).failed(), 0);
    let report = keep_alive(50);
    let reused = report.samples.iter().filter(|s| s.reused).count();
    eprintln!(
        "uvicorn under baton: 50 keep-alive requests in {:?} ({reused} on the reused connection), p50 {:?}, max {:?}",
        report.elapsed,
        report.latency_quantile(0.5),
        report.latency_quantile(1.0)
    );
    assert_eq!(report.failed(), 0, "{}", report.failures_summary());
    assert_eq!(report.ok(), 50);
    assert_eq!(reused, 49, "one keep-alive connection");
    assert!(
        report.elapsed < Duration::from_secs(1),
        "50 keep-alive requests took {:?}: Nagle's algorithm holds the responses",
        report.elapsed
    );
}
