//! A master killed with SIGKILL (or crashed) leaves no worker running past
//! its drain timeout, cooperative or not: its guardian kills what ignores
//! the master's death, and the next `baton run` can bind the ports.

use baton_tests::harness::{alive, config_with_worker, wrapped_worker, Baton, Binaries};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

const DRAIN: Duration = Duration::from_secs(2);

/// Kills the master alone, then checks every worker is gone within the
/// drain timeout (and a little slack), not before the guardian had to act,
/// and that a new master can take the port.
fn killed_master_leaves_nothing(worker: &str) {
    let mut baton = Baton::start(&config_with_worker(worker));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let workers = baton.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let guardian = baton.guardian().expect("the master runs a guardian");
    kill(baton.pid(), Signal::SIGKILL).unwrap();
    baton.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        workers.iter().all(|p| alive(*p)),
        "these workers ignore their master's death until their drain deadline"
    );
    let deadline = killed + DRAIN + Duration::from_secs(3);
    while workers.iter().chain([&guardian]).any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "still alive {:?} after the master died with drain_timeout {DRAIN:?}: {:?}",
            killed.elapsed(),
            workers
                .iter()
                .chain([&guardian])
                .filter(|p| alive(**p))
                .collect::<Vec<&Pid>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::net::TcpListener::bind(addr).expect("the port is free again");
}

#[test]
fn sdk_workers_that_ignore_drain_die_at_their_deadline_after_the_master_is_killed() {
    killed_master_leaves_nothing(&format!(
        "command = [{:?}, \"ignore-drain\"]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"2s\"\n",
        Binaries::testworker().display().to_string()
    ));
}

#[test]
fn wrapped_workers_that_ignore_sigterm_die_at_their_deadline_after_the_master_is_killed() {
    killed_master_leaves_nothing(&wrapped_worker(
        &["--ignore-term"],
        "processes = 2\ndrain_timeout = \"2s\"\n",
    ));
}

#[test]
fn a_master_that_stops_cleanly_takes_its_guardian_along() {
    let mut baton = Baton::start(&baton_tests::harness::hello_config(1));
    baton.wait_committed(1);
    let guardian = baton.guardian().expect("the master runs a guardian");
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    baton.wait_exit(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(guardian) {
        assert!(
            Instant::now() < deadline,
            "the guardian outlived its master"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
