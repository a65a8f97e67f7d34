//! A master killed with SIGKILL (or crashed) stops nothing that serves:
//! its keeper starts another master, which adopts the running workers;
//! past `master_restarts`, or with it off, the keeper stops the workers,
//! and what ignores that is killed at its drain deadline.

use baton_tests::harness::{
    alive, assert_no_request_failed, config_with_worker, current_worker_pids, current_workers,
    event_name, field, generation_in, hello_config, steady_load, wait_for_generation, wait_gone,
    wrapped_worker, Baton, Binaries,
};
use baton_tests::load::Mode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::time::{Duration, Instant};

const DRAIN: Duration = Duration::from_secs(2);

/// The master's pid as `baton status` says it.
fn master_of(status: &Value) -> Pid {
    Pid::from_raw(status["master"]["pid"].as_i64().expect("master pid") as i32)
}

/// Generation 1 committed, and the turn of the master's loop that
/// committed it over: its keeper's snapshot says so. (A master killed
/// within that turn leaves the snapshot before it: see "What cannot be
/// kept" in docs/operations.md.)
fn committed(baton: &Baton) {
    baton.wait_committed(1);
    std::thread::sleep(Duration::from_millis(100));
}

/// Kills `master` with SIGKILL and waits until another master answers
/// `baton status`; returns its status and how long that took.
fn kill_and_wait_adopted(baton: &Baton, master: Pid) -> (Value, Duration) {
    kill(master, Signal::SIGKILL).expect("kill the master");
    let killed = Instant::now();
    loop {
        let out = baton.cli(&["status", "--json"]);
        if out.status.success() {
            let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
            if master_of(&status) != master {
                return (status, killed.elapsed());
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no master adopted the workers of {master} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the master ten times a second apart under keep-alive and
/// new-connection load: no request fails, the workers are the same
/// processes throughout, `baton status` answers after each kill, and a HUP
/// after the last kill commits.
fn killed_ten_times_under_load(config: &str) {
    let mut baton = Baton::start(config);
    committed(&baton);
    let addr = baton.address("http");
    let keepalive = steady_load(addr, Mode::KeepAlive);
    let fresh = steady_load(addr, Mode::NewConnection);
    let status = baton.status();
    let workers = current_worker_pids(&status);
    assert_eq!(workers.len(), 2, "{status}");
    let mut master = baton.pid();
    let mut slowest = Duration::ZERO;
    for round in 1..=10 {
        let (status, took) = kill_and_wait_adopted(&baton, master);
        slowest = slowest.max(took);
        assert_eq!(
            current_worker_pids(&status),
            workers,
            "after kill {round}: {status}"
        );
        let adopted = &status["master"]["adopted"];
        assert_eq!(adopted["previous_pid"], master.as_raw(), "{status}");
        assert_eq!(adopted["died"], "signal SIGKILL", "{status}");
        assert_eq!(adopted["adoptions"], round, "{status}");
        master = master_of(&status);
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("the slowest adoption answered `baton status` {slowest:?} after the kill");
    let metrics_status = baton.status();
    assert_eq!(master_of(&metrics_status), master);
    let outcome = baton.reload_current();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    wait_for_generation(&keepalive, 2);
    wait_for_generation(&fresh, 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_no_request_failed(&keepalive.stop(), "keep-alive across 10 master kills", 2);
    assert_no_request_failed(&fresh.stop(), "new connections across 10 master kills", 2);
}

#[test]
fn sdk_workers_serve_on_through_ten_master_kills() {
    killed_ten_times_under_load(&hello_config(2));
}

#[test]
fn systemd_protocol_workers_serve_on_through_ten_master_kills() {
    killed_ten_times_under_load(&config_with_worker(&wrapped_worker(
        &[],
        "processes = 2\ndrain_timeout = \"5s\"\n",
    )));
}

/// Every worker process of the test running in `baton`'s directory
/// (workers' cwd is the config's directory), and every live pid `status`
/// shows.
fn running_vs_shown(baton: &Baton, status: &Value) -> (Vec<i64>, Vec<i64>) {
    let dir = std::fs::canonicalize(baton.dir()).unwrap();
    let masters_and_keepers = |pid: i64| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .any(|a| a == b"run" || a == b"__keeper")
        })
    };
    let mut running: Vec<i64> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).ok().as_ref() == Some(&dir)
                && alive(Pid::from_raw(*pid as i32))
                && !masters_and_keepers(*pid)
        })
        .collect();
    running.sort_unstable();
    let mut shown: Vec<i64> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["workers"].as_array().cloned().unwrap_or_default())
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    shown.sort_unstable();
    (running, shown)
}

/// After the kill: one generation current (`current`, if given), no
/// process running that status does not show (once the unfinished ones
/// are gone), and a reload commits.
fn resolved_after_kill(baton: &mut Baton, master: Pid, current: impl Into<Option<u64>>) {
    let current = current.into();
    kill_and_wait_adopted(baton, master);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = baton.status();
        let generations = status["generations"].as_array().unwrap();
        let (running, shown) = running_vs_shown(baton, &status);
        let serving = generations.iter().any(|g| g["state"] == "current");
        if generations.len() == 1 && serving && running == shown {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still unresolved after the kill: running {running:?}, shown {shown:?}: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let serving = status["master"]["current_generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no current generation: {status}"));
    if let Some(current) = current {
        assert_eq!(serving, current, "{status}");
    }
    assert_eq!(
        generation_in(&status, serving).unwrap()["state"],
        "current",
        "{status}"
    );
    // Committed, or on probation (with a probation configured).
    baton.skip_log();
    baton.signal_current(Signal::SIGHUP);
    let outcome = baton.next_event(Duration::from_secs(30), |e| {
        matches!(
            event_name(e),
            "reload.committed" | "reload.failed" | "rollout.started"
        )
    });
    assert_ne!(event_name(&outcome), "reload.failed", "{outcome}");
}

#[test]
fn a_master_killed_while_a_generation_starts_leaves_the_last_one_current() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    baton.write_config(&config_with_worker(&format!(
        "command = [{:?}, \"never-ready\"]\nprocesses = 2\nready_timeout = \"30s\"\ndrain_timeout = \"2s\"\n",
        Binaries::testworker().display().to_string()
    )));
    baton.signal(Signal::SIGHUP);
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.started" && field(e, "generation") == "2"
    });
    baton.write_config(&hello_config(2));
    let master = baton.pid();
    resolved_after_kill(&mut baton, master, 1);
}

/// Killed at a different moment of a reload each time (validating,
/// binding, spawning, waiting for readiness, committing): each time the
/// next master resolves it.
#[test]
fn a_master_killed_at_any_moment_of_a_reload_leaves_one_generation_serving() {
    let mut baton = Baton::start(&hello_config(2));
    committed(&baton);
    let mut master = baton.pid();
    for delay_ms in [0, 2, 5, 10, 20] {
        kill(master, Signal::SIGHUP).unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        resolved_after_kill(&mut baton, master, None);
        master = master_of(&baton.status());
    }
}

#[test]
fn a_master_killed_during_probation_rolls_back() {
    let probation = format!(
        "command = [{:?}]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"2s\"\nprobation = \"60s\"\n",
        Binaries::hello().display().to_string()
    );
    let mut baton = Baton::start(&config_with_worker(&probation));
    baton.wait_committed(1);
    baton.signal(Signal::SIGHUP);
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "rollout.started"
    });
    let status = baton.status();
    assert!(status["rollout"].is_object(), "on probation: {status}");
    let master = baton.pid();
    resolved_after_kill(&mut baton, master, 1);
}

#[test]
fn a_master_killed_during_an_in_place_prepare_carries_on() {
    let dir = baton_tests::harness::TempDir::new();
    std::fs::write(dir.path().join("app.conf"), "rate = 1\n").unwrap();
    std::fs::write(
        dir.path().join("baton.toml"),
        config_with_worker(&format!(
            "command = [{:?}, \"app\"]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"2s\"\napp_config = [\"app.conf\"]\n",
            Binaries::testworker().display().to_string()
        )),
    )
    .unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    // Worker 1's parser never returns: the in-place reload waits.
    std::fs::write(baton.dir().join("app.conf"), "rate = 2\nhang_worker = 1\n").unwrap();
    baton.signal(Signal::SIGHUP);
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "reload.started"
    });
    std::thread::sleep(Duration::from_millis(300));
    // Worker 1's parser still hangs: the next reload replaces the
    // generation (a `[worker]` setting changed).
    std::fs::write(baton.dir().join("app.conf"), "rate = 3\n").unwrap();
    let config = std::fs::read_to_string(baton.dir().join("baton.toml")).unwrap();
    baton.write_config(&config.replace("drain_timeout = \"2s\"", "drain_timeout = \"3s\""));
    let master = baton.pid();
    resolved_after_kill(&mut baton, master, 1);
}

#[test]
fn a_master_killed_during_an_upgrade_abandons_it() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    baton.signal(Signal::SIGUSR2);
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "upgrade.started"
    });
    let master = baton.pid();
    resolved_after_kill(&mut baton, master, 1);
}

#[test]
fn a_killed_keeper_is_replaced_and_the_next_master_kill_survived() {
    let mut baton = Baton::start(&hello_config(2));
    committed(&baton);
    let keeper = baton.keeper().expect("the master runs a keeper");
    let workers = current_worker_pids(&baton.status());
    kill(keeper, Signal::SIGKILL).unwrap();
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "keeper.restarted"
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while baton.keeper().is_none_or(|k| k == keeper) {
        assert!(Instant::now() < deadline, "no new keeper");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its snapshot comes with the next turn of the master's loop.
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = kill_and_wait_adopted(&baton, baton.pid());
    assert_eq!(current_worker_pids(&status), workers, "{status}");
    let outcome = baton.reload_current();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
}

#[test]
fn past_master_restarts_the_keeper_stops_the_workers() {
    let config = hello_config(2).replace(
        "[supervisor]\n",
        "[supervisor]\nmaster_restarts = \"2 in 1m\"\n",
    );
    let mut baton = Baton::start(&config);
    committed(&baton);
    let addr = baton.address("http");
    let workers = current_worker_pids(&baton.status());
    let mut master = baton.pid();
    for _ in 0..2 {
        let (status, _) = kill_and_wait_adopted(&baton, master);
        master = master_of(&status);
        std::thread::sleep(Duration::from_millis(300));
    }
    kill(master, Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().any(|p| alive(Pid::from_raw(*p as i32))) {
        assert!(
            Instant::now() < deadline,
            "workers still run after the third death in the window"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    baton.wait_event(Duration::from_secs(5), |e| {
        e["raw"]
            .as_str()
            .is_some_and(|l| l.contains("master_restarts") && l.contains("stopping its workers"))
    });
    std::net::TcpListener::bind(addr).expect("the port is free again");
    let _ = &mut baton;
}

/// With `master_restarts = "off"`: kills the master alone, then checks
/// every worker is gone within the drain timeout (and a little slack), not
/// before the keeper had to act, and that a new master can take the port.
fn killed_master_leaves_nothing(worker: &str) {
    let config = config_with_worker(worker).replace(
        "[supervisor]\n",
        "[supervisor]\nmaster_restarts = \"off\"\n",
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let workers = baton.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let keeper = baton.keeper().expect("the master runs a keeper");
    kill(baton.pid(), Signal::SIGKILL).unwrap();
    baton.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        workers.iter().all(|p| alive(*p)),
        "these workers ignore their master's death until their drain deadline"
    );
    let deadline = killed + DRAIN + Duration::from_secs(3);
    while workers.iter().chain([&keeper]).any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "still alive {:?} after the master died with drain_timeout {DRAIN:?}: {:?}",
            killed.elapsed(),
            workers
                .iter()
                .chain([&keeper])
                .filter(|p| alive(**p))
                .collect::<Vec<&Pid>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::net::TcpListener::bind(addr).expect("the port is free again");
}

#[test]
fn sdk_workers_that_ignore_drain_die_at_their_deadline_when_restarts_are_off() {
    killed_master_leaves_nothing(&format!(
        "command = [{:?}, \"ignore-drain\"]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"2s\"\n",
        Binaries::testworker().display().to_string()
    ));
}

#[test]
fn wrapped_workers_that_ignore_sigterm_die_at_their_deadline_when_restarts_are_off() {
    killed_master_leaves_nothing(&wrapped_worker(
        &["--ignore-term"],
        "processes = 2\ndrain_timeout = \"2s\"\n",
    ));
}

#[test]
fn a_master_that_stops_cleanly_takes_its_keeper_along() {
    let mut baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    let keeper = baton.keeper().expect("the master runs a keeper");
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    baton.wait_exit(Duration::from_secs(10));
    wait_gone(keeper, "the keeper of a master that stopped");
}

#[test]
fn an_adopted_master_stops_cleanly_with_everything_it_adopted() {
    let baton = Baton::start(&hello_config(2));
    committed(&baton);
    let workers = current_worker_pids(&baton.status());
    let (status, _) = kill_and_wait_adopted(&baton, baton.pid());
    let master = master_of(&status);
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("master {master} stopped")),
        "`baton stop` names the adopted master: {stdout}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers
        .iter()
        .map(|p| Pid::from_raw(*p as i32))
        .chain([master])
        .any(alive)
    {
        assert!(
            Instant::now() < deadline,
            "the adopted master or its workers outlived the stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_admin_endpoint_answers_through_a_master_kill_and_counts_it() {
    let config =
        hello_config(2).replace("[supervisor]\n", "[supervisor]\nadmin = \"127.0.0.1:0\"\n");
    let baton = Baton::start(&config);
    committed(&baton);
    let status = baton.status();
    let admin: std::net::SocketAddr = status["master"]["admin"]
        .as_str()
        .expect("admin address")
        .parse()
        .unwrap();
    let (status, _) = kill_and_wait_adopted(&baton, baton.pid());
    assert_eq!(
        status["master"]["admin"],
        admin.to_string(),
        "the same socket"
    );
    let (code, _, _) = baton_tests::harness::get_path(admin, "/readyz").unwrap();
    assert_eq!(code, 200);
    let (code, _, metrics) = baton_tests::harness::get_path(admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("baton_master_adoptions_total 1\n"),
        "{metrics}"
    );
}

/// A notify worker of an adopted generation that crashes is respawned by
/// the new master (its exit seen through a pidfd) and reports ready on
/// the generation's notify socket, adopted with it.
#[test]
fn an_adopted_notify_workers_crash_is_respawned_and_its_ready_heard() {
    let config = config_with_worker(&wrapped_worker(
        &[],
        "processes = 2\ndrain_timeout = \"5s\"\n",
    ));
    let mut baton = Baton::start(&config);
    committed(&baton);
    let (status, _) = kill_and_wait_adopted(&baton, baton.pid());
    let crashed = Pid::from_raw(current_worker_pids(&status)[0] as i32);
    baton.skip_log();
    kill(crashed, Signal::SIGKILL).unwrap();
    let respawned = baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.ready"
            && field(e, "pid") != crashed.to_string()
            && e["fields"]["generation"] == 1
    });
    let pid: i64 = field(&respawned, "pid").parse().unwrap();
    let status = baton.status();
    let workers = current_workers(&status);
    assert!(
        workers
            .iter()
            .any(|w| w["pid"] == pid && w["state"] == "ready"),
        "{status}"
    );
    assert!(
        workers.iter().all(|w| w["pid"] != crashed.as_raw()),
        "{status}"
    );
}
