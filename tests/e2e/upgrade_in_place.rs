use baton_tests::harness::{
    alive, assert_no_request_failed, event_name, field, hello_config, resetting_config,
    steady_load, wait_for_generation, Baton, Binaries, TempDir,
};
use baton_tests::load::Mode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::Duration;

fn exec_config(config: String) -> String {
    config.replace("[supervisor]\n", "[supervisor]\nupgrade = \"exec\"\n")
}

#[test]
fn in_place_upgrades_under_keepalive_load_keep_the_pid_adopt_workers_and_fail_no_request() {
    in_place_upgrades_under_load(&exec_config(hello_config(2)), Mode::KeepAlive);
}

/// Adopted generation sockets keep their place on the port: the fresh
/// generation is steered to, and the adopted one (whose workers reset what
/// they accept once told to stop) is signalled once nothing is queued.
#[test]
fn in_place_upgrades_under_new_connection_load_with_workers_that_reset_on_stop_fail_no_request() {
    in_place_upgrades_under_load(&exec_config(resetting_config()), Mode::NewConnection);
}

fn in_place_upgrades_under_load(config: &str, mode: Mode) {
    let mut baton = Baton::start(config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = steady_load(addr, mode);
    for generation in 2..=4u64 {
        let workers = baton.wait_workers(2, &[], Duration::from_secs(10));
        baton.skip_log();
        baton.signal(Signal::SIGUSR2);
        // The new image adopts the running workers, then replaces them with
        // a fresh generation as a reload would.
        for pid in &workers {
            baton.next_event(Duration::from_secs(20), |e| {
                event_name(e) == "worker.adopted" && field(e, "pid") == pid.to_string()
            });
        }
        let committed = baton.wait_committed(generation);
        assert_eq!(committed["span"]["trigger"], "upgrade");
        baton.wait_workers(2, &workers, Duration::from_secs(10));
        assert_eq!(baton.master_pid(), Some(baton.pid()), "the pid stays");
        assert!(alive(baton.pid()));
    }
    wait_for_generation(&load, 4);
    let report = load.stop();
    assert_no_request_failed(&report, &format!("{mode:?} across 3 in-place upgrades"), 4);
    let status = baton.status();
    assert_eq!(status["master"]["pid"], baton.pid().as_raw());
    assert_eq!(status["generations"].as_array().unwrap().len(), 1);
}

#[test]
fn in_place_upgrade_whose_check_fails_changes_nothing() {
    let dir = TempDir::new();
    let binary = dir.path().join("baton");
    std::fs::copy(Binaries::baton(), &binary).unwrap();
    std::fs::write(dir.path().join("baton.toml"), exec_config(hello_config(2))).unwrap();
    let baton = Baton::start_binary(&binary, dir, &["run"]);
    baton.wait_committed(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    {
        use std::os::unix::fs::PermissionsExt;
        let tmp = binary.with_extension("new");
        std::fs::write(
            &tmp,
            "#!/bin/sh\necho \"config rejected by the new binary\" >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &binary).unwrap();
    }
    let out = baton.cli(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("phase check"), "{stderr}");
    assert!(
        stderr.contains("config rejected by the new binary"),
        "{stderr}"
    );
    assert_eq!(baton.wait_workers(2, &[], Duration::from_secs(5)), workers);
    assert_eq!(baton.count_events(|e| event_name(e) == "worker.adopted"), 0);
    assert_eq!(baton.status()["master"]["current_generation"], 1);
}

/// The master serving now, as `baton status` says.
fn serving(baton: &Baton) -> i64 {
    baton.status()["master"]["pid"]
        .as_i64()
        .expect("master pid")
}

/// How many times a keeper's master adopted workers so far.
fn adoptions(baton: &Baton) -> usize {
    baton.count_events(|e| event_name(e) == "master.adopted")
}

/// Writes `config`, reloads it with `baton reload` and waits for
/// `generation` to commit.
fn reload_to(baton: &Baton, config: &str, generation: u64) {
    baton.write_config(config);
    let out = baton.cli(&["reload"]);
    assert!(out.status.success(), "reload to {generation}: {out:?}");
    baton.wait_committed(generation);
}

/// `baton upgrade` of the master serving now commits `generation`, in
/// place (`in_place`: the same pid) or in a new master, and no keeper
/// adopts anything afterwards: the new master lives on, and a reload of it
/// commits. Returns the master serving after it.
fn upgrade_commits(baton: &Baton, generation: u64, in_place: bool, what: &str) -> i64 {
    let before = serving(baton);
    let adopted = adoptions(baton);
    let out = baton.cli(&["upgrade"]);
    assert!(out.status.success(), "{what}: {out:?}");
    let committed = baton.wait_committed(generation);
    assert_eq!(
        committed["span"]["trigger"], "upgrade",
        "{what}: {committed}"
    );
    if in_place {
        assert_eq!(serving(baton), before, "{what}: the pid stays");
    } else {
        let new = baton.wait_new_master(Pid::from_raw(before as i32), Duration::from_secs(20));
        assert_eq!(serving(baton), i64::from(new.as_raw()), "{what}");
    }
    // A master that died after its upgrade is adopted by its keeper
    // within a second or so: give it the time to show.
    std::thread::sleep(Duration::from_secs(2));
    let after = serving(baton);
    assert!(
        alive(Pid::from_raw(after as i32)),
        "{what}: master {after} died"
    );
    assert_eq!(
        adoptions(baton),
        adopted,
        "{what}: the keeper adopted after the upgrade"
    );
    let out = baton.cli(&["reload"]);
    assert!(out.status.success(), "{what}: reload after it: {out:?}");
    baton.wait_committed(generation + 1);
    assert_eq!(serving(baton), after, "{what}");
    after
}

/// A master the keeper started for `baton restart` upgrades in place: what
/// the keeper handed it at its start is not handed again to its new image.
#[test]
fn an_in_place_upgrade_after_a_restart_commits_and_the_keeper_adopts_nothing() {
    let baton = Baton::start(&exec_config(hello_config(1)));
    baton.wait_committed(1);
    let load = steady_load(baton.address("http"), Mode::KeepAlive);
    let first = serving(&baton);
    let out = baton.cli(&["restart"]);
    assert!(out.status.success(), "restart: {out:?}");
    baton.wait_committed(2);
    assert_ne!(serving(&baton), first, "a new master process");
    upgrade_commits(&baton, 3, true, "in-place upgrade after a restart");
    wait_for_generation(&load, 4);
    assert_no_request_failed(&load.stop(), "keep-alive across restart and upgrade", 4);
}

/// A master the keeper started after the previous one was killed upgrades
/// in place.
#[test]
fn an_in_place_upgrade_after_the_keeper_adopted_commits_and_the_keeper_adopts_nothing() {
    let baton = Baton::start(&exec_config(hello_config(1)));
    baton.wait_committed(1);
    // The keeper's snapshot follows the commit's turn of the loop.
    std::thread::sleep(Duration::from_millis(100));
    let load = steady_load(baton.address("http"), Mode::KeepAlive);
    let first = serving(&baton);
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).expect("kill the master");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while baton
        .cli(&["status", "--json"])
        .status
        .success()
        .then(|| serving(&baton))
        == Some(first)
        || !baton.cli(&["status", "--json"]).status.success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no master adopted within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(adoptions(&baton), 1);
    upgrade_commits(&baton, 2, true, "in-place upgrade after an adoption");
    wait_for_generation(&load, 3);
    assert_no_request_failed(&load.stop(), "keep-alive across adoption and upgrade", 3);
}

/// A master started by a child-mode upgrade upgrades in place, and then
/// again in a new master.
#[test]
fn child_and_in_place_upgrades_follow_one_another_and_the_keeper_adopts_nothing() {
    let child = hello_config(1);
    let exec = exec_config(hello_config(1));
    assert_ne!(child, exec);
    let baton = Baton::start(&child);
    baton.wait_committed(1);
    let load = steady_load(baton.address("http"), Mode::KeepAlive);
    upgrade_commits(&baton, 2, false, "child-mode upgrade");
    reload_to(&baton, &exec, 4);
    upgrade_commits(&baton, 5, true, "in-place upgrade after a child-mode one");
    reload_to(&baton, &child, 7);
    upgrade_commits(&baton, 8, false, "child-mode upgrade after an in-place one");
    wait_for_generation(&load, 9);
    assert_no_request_failed(&load.stop(), "keep-alive across upgrades", 9);
}
