//! baton as a container's PID 1 (a fresh pid namespace, as Docker and
//! Kubernetes give it): PID 1 is the keeper and the master its child, so a
//! dead master is replaced and its workers adopted; SIGTERM drains, orphans
//! re-parented to PID 1 are reaped.

use baton_tests::harness::{
    alive, children_of, config_with_worker, descendants, event_name, is_keeper, wrapped_worker,
    zombies_of, Baton, Binaries, TempDir,
};
use baton_tests::tools;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn as_pid_1_baton_reaps_orphans_and_drains_on_sigterm() {
    let Some(unshare) = tools::require("unshare", "apt-get install util-linux") else {
        return;
    };
    // A pid namespace needs privileges a CI container may not grant.
    let probe = std::process::Command::new(&unshare)
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output()
        .unwrap();
    if !probe.status.success() {
        let why = format!(
            "unshare cannot make a pid namespace here: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        assert!(!tools::required(), "BATON_REQUIRE_TOOLS=1 but {why}");
        eprintln!("skipped: {why}");
        return;
    }
    // Each worker leaves a child behind in its process group: when the
    // worker exits, that child is killed and re-parented to PID 1.
    let config = config_with_worker(&wrapped_worker(&["--child"], "drain_timeout = \"5s\"\n"));
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let baton_path = Binaries::baton().display().to_string();
    let mut baton = Baton::start_with_env(
        &unshare,
        dir,
        &[
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            &baton_path,
            "run",
        ],
        &[],
    );
    baton.wait_committed(1);
    // The keeper is PID 1 inside, unshare's only child; the master is its
    // child (pid 2 inside).
    let init: Pid = children_of(baton.pid())[0];
    let master_of = |init: Pid| -> Pid {
        children_of(init)
            .into_iter()
            .find(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"run"))
            })
            .expect("PID 1's master")
    };
    let master = master_of(init);
    assert_ne!(
        std::fs::read_to_string(baton.dir().join("baton.pid"))
            .unwrap()
            .trim(),
        "1",
        "the master is not PID 1"
    );

    // Generation 1's worker and the child it left in its process group.
    let generation_1: Vec<Pid> = children_of(master)
        .into_iter()
        .filter(|p| alive(*p) && !is_keeper(*p))
        .flat_map(|w| std::iter::once(w).chain(descendants(w)))
        .collect();
    assert!(generation_1.len() >= 2, "{generation_1:?}");

    // The master dies: PID 1 starts another, which adopts the worker.
    kill(master, Signal::SIGKILL).unwrap();
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "master.adopted"
    });
    assert!(alive(init), "PID 1 outlives the master");
    assert!(
        generation_1.iter().all(|p| alive(*p)),
        "the worker serves on"
    );
    let master = master_of(init);
    assert!(
        children_of(master).is_empty() && generation_1.iter().all(|p| alive(*p)),
        "adopted, not restarted"
    );

    // Signals to PID 1 reach the master.
    kill(init, Signal::SIGHUP).unwrap();
    baton.wait_committed(2);
    baton.wait_generation_finished(1);
    eventually("generation 1's processes are gone", || {
        generation_1.iter().all(|p| !alive(*p))
    });
    // The old worker's child died after its parent: a zombie of PID 1's
    // until baton reaps it.
    eventually("orphans re-parented to baton are reaped", || {
        zombies_of(init).is_empty()
    });

    kill(init, Signal::SIGTERM).unwrap();
    let status = baton.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    baton.wait_event(Duration::from_secs(1), |e| {
        event_name(e) == "master.stopping" && e["fields"]["how"] == "Graceful"
    });
}
