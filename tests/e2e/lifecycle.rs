use baton_tests::harness::{
    alive, config_with_worker, event_name, field, get, hello_config, message, Baton, Binaries,
};
use nix::sys::signal::{kill, Signal};
use std::time::Duration;

#[test]
fn worker_ignoring_drain_is_killed_at_drain_timeout() {
    let config = config_with_worker(&format!(
        "command = [{:?}, \"ignore-drain\"]\nprocesses = 1\ndrain_timeout = \"1s\"\n",
        Binaries::testworker().display().to_string()
    ));
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let old = baton.wait_workers(1, &[], Duration::from_secs(5));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let killed = baton.wait_event(Duration::from_secs(10), |e| {
        message(e).contains("drain deadline") && field(e, "pid") == old[0].to_string()
    });
    assert_eq!(field(&killed, "generation"), "1");
    baton.wait_workers(1, &old, Duration::from_secs(5));
}

#[test]
fn crashed_worker_is_respawned_into_its_generation() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let before = baton.wait_workers(2, &[], Duration::from_secs(5));
    kill(before[0], Signal::SIGKILL).unwrap();
    let after = baton.wait_workers(2, &before[..1], Duration::from_secs(10));
    assert!(after.contains(&before[1]) && !after.contains(&before[0]));
    baton.next_event(Duration::from_secs(5), |e| {
        event_name(e) == "worker.respawning"
    });
    let (status, generation, _) = get(addr).unwrap();
    assert_eq!((status, generation), (200, Some(1)));
}

#[test]
fn crash_loop_is_logged_and_backed_off_not_spun() {
    // Ready, then exits after 300 ms: every respawn crashes again.
    let script = format!(
        "exec {:?} ignore-drain & pid=$!; sleep 0.3; kill -9 $pid; exit 1",
        Binaries::testworker().display().to_string()
    );
    let config = config_with_worker(&format!(
        "command = [\"/bin/sh\", \"-c\", {script:?}]\nprocesses = 1\n"
    ));
    let baton = Baton::start(&config);
    baton.wait_event(Duration::from_secs(20), |e| {
        message(e) == "worker crash loop: respawn delayed"
    });
    // Five crashes with backoff take seconds; a spinning supervisor would have
    // started hundreds of workers by then.
    let started = baton.count_events(|e| event_name(e) == "worker.started");
    assert!(
        started < 12,
        "{started} workers started: respawns are not backed off"
    );
}

#[test]
fn quit_drains_every_worker_and_exits_cleanly() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    assert!(baton.dir().join("baton.pid").exists());
    baton.signal(Signal::SIGQUIT);
    let status = baton.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    assert!(workers.iter().all(|p| !alive(*p)), "workers left behind");
    assert!(
        !baton.dir().join("baton.pid").exists(),
        "pid file left behind"
    );
}

#[test]
fn int_stops_every_worker_fast_and_exits() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    baton.signal(Signal::SIGINT);
    let status = baton.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(workers.iter().all(|p| !alive(*p)), "workers left behind");
}

#[test]
fn workers_exit_when_the_master_is_killed_and_not_replaced() {
    let config = hello_config(2).replace(
        "[supervisor]\n",
        "[supervisor]\nmaster_restarts = \"off\"\n",
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    baton.signal(Signal::SIGKILL);
    baton.wait_exit(Duration::from_secs(5));
    // drain_timeout is 5 s; no worker may outlive it by much.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while workers.iter().any(|p| alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "orphaned workers survive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn start_with_a_failing_worker_exits_non_zero() {
    let config = config_with_worker("command = [\"/bin/false\"]\nprocesses = 1\n");
    let mut baton = Baton::start(&config);
    let status = baton.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    baton.wait_event(Duration::from_secs(1), |e| event_name(e) == "master.failed");
}
