//! `baton restart`: a new master process, started by the keeper, adopts
//! the workers and replaces them with a new generation as a reload does;
//! the listeners never close, so no request fails. `--hard` stops the old
//! workers at once.

use baton_tests::harness::{
    alive, assert_no_request_failed, current_workers, hello_config, resetting_config, steady_load,
    wait_for_generation, Baton,
};
use baton_tests::load::Mode;
use nix::unistd::Pid;
use serde_json::Value;
use std::time::{Duration, Instant};

fn pids(status: &Value) -> Vec<Pid> {
    current_workers(status)
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .map(|p| Pid::from_raw(p as i32))
        .collect()
}

/// Restarts `rounds` times under keep-alive and new-connection load: each
/// restart answers with the new master's committed generation, and not
/// one request fails.
fn restarts_under_load(config: &str, rounds: u64) {
    let baton = Baton::start(config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let keepalive = steady_load(addr, Mode::KeepAlive);
    let fresh = steady_load(addr, Mode::NewConnection);
    let mut master = baton.status()["master"]["pid"].as_i64().unwrap();
    for round in 1..=rounds {
        let out = baton.cli(&["restart"]);
        assert!(out.status.success(), "restart {round}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!(
                "reload to generation {} committed (trigger: restart)",
                round + 1
            )),
            "{stdout}"
        );
        let status = baton.status();
        let now = status["master"]["pid"].as_i64().unwrap();
        assert_ne!(now, master, "a new master process: {status}");
        assert_eq!(
            status["master"]["adopted"]["previous_pid"], master,
            "{status}"
        );
        master = now;
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for_generation(&keepalive, rounds + 1);
    wait_for_generation(&fresh, rounds + 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_no_request_failed(&keepalive.stop(), "keep-alive across restarts", rounds + 1);
    assert_no_request_failed(&fresh.stop(), "new connections across restarts", rounds + 1);
}

#[test]
fn restarts_of_sdk_workers_under_load_fail_no_request() {
    restarts_under_load(&hello_config(2), 5);
}

#[test]
fn restarts_of_workers_without_the_sdk_under_load_fail_no_request() {
    restarts_under_load(&resetting_config(), 3);
}

#[test]
fn a_hard_restart_stops_the_old_workers_at_once() {
    let baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let old = pids(&baton.status());
    let out = baton.cli(&["restart", "--hard"]);
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while old.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "the old workers were not stopped at once"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 2, "{status}");
    assert_eq!(
        status["generations"].as_array().unwrap().len(),
        1,
        "{status}"
    );
    let (code, generation, _) = baton_tests::harness::get(baton.address("http")).unwrap();
    assert_eq!((code, generation), (200, Some(2)));
}
