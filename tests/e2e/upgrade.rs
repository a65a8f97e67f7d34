use baton_tests::harness::{
    alive, assert_no_request_failed, config_with_worker, event_name, get, hello_config, message,
    open_fds, read_pid, resetting_config, steady_load, wait_for_generation, Baton, Binaries,
    TempDir,
};
use baton_tests::load::Mode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A temp dir holding `baton.toml` and a copy of the baton binary that the
/// test may replace; the master runs from the copy.
fn start_from_copy(config: &str) -> (Baton, PathBuf) {
    let dir = TempDir::new();
    let binary = dir.path().join("baton");
    std::fs::copy(Binaries::baton(), &binary).unwrap();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let baton = Baton::start_binary(&binary, dir, &["run"]);
    baton.wait_committed(1);
    (baton, binary)
}

/// Replaces `binary` the way an installer does: a new file renamed over it.
fn replace(binary: &Path, contents: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = binary.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, binary).unwrap();
}

fn upgrades_under_load_drop_nothing(config: &str, mode: Mode) {
    const UPGRADES: usize = 10;
    let baton = Baton::start(config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = steady_load(addr, mode);
    let mut master = baton.pid();
    let mut masters = vec![master];
    for _ in 0..UPGRADES {
        kill(master, Signal::SIGUSR2).unwrap();
        master = baton.wait_new_master(master, Duration::from_secs(30));
        masters.push(master);
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = UPGRADES as u64 + 1;
    wait_for_generation(&load, last);
    let report = load.stop();
    let what = format!("{mode:?} across {UPGRADES} upgrades, masters {masters:?}");
    assert_no_request_failed(&report, &what, last);
    // Every master was a new process, and only the last one is left.
    let mut distinct = masters.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), UPGRADES + 1);
    for old in &masters[..UPGRADES] {
        assert!(!alive(*old), "old master {old} still running");
    }
    assert!(
        !baton.dir().join("baton.pid.oldbin").exists(),
        "*.oldbin left behind"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while baton.master_workers().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "workers: {:?}",
            baton.master_workers()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn usr2_upgrades_under_keepalive_load_fail_no_request() {
    upgrades_under_load_drop_nothing(&hello_config(2), Mode::KeepAlive);
}

#[test]
fn usr2_upgrades_under_new_connection_load_fail_no_request() {
    upgrades_under_load_drop_nothing(&hello_config(2), Mode::NewConnection);
}

/// The new master steers new connections to its own generation's sockets;
/// the old one signals its workers (which reset what they accept once told
/// to stop) only once nothing is queued for them.
#[test]
fn usr2_upgrades_under_new_connection_load_with_workers_that_reset_on_stop_fail_no_request() {
    upgrades_under_load_drop_nothing(&resetting_config(), Mode::NewConnection);
}

/// Upgrades that also switch between SDK workers (on the listeners' own
/// sockets) and workers without the SDK (on sockets of their generation's
/// own): the new master tells the old one which listeners it steered away
/// from, and the old one drains only once nothing is queued for it there.
#[test]
fn usr2_upgrades_switching_between_sdk_and_wrapped_workers_under_new_connection_load_fail_no_request(
) {
    const UPGRADES: u64 = 4;
    let configs = [hello_config(2), resetting_config()];
    let baton = Baton::start(&configs[0]);
    baton.wait_committed(1);
    let load = steady_load(baton.address("http"), Mode::NewConnection);
    let mut master = baton.pid();
    for upgrade in 1..=UPGRADES {
        baton.write_config(&configs[upgrade as usize % 2]);
        kill(master, Signal::SIGUSR2).unwrap();
        master = baton.wait_new_master(master, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for_generation(&load, UPGRADES + 1);
    let report = load.stop();
    assert_no_request_failed(&report, "upgrades switching protocols", UPGRADES + 1);
}

/// Runs `baton upgrade` against a master whose binary was replaced by
/// something that fails: it must exit 1 with `reason`, and the old master
/// must keep serving with the same workers and its pid file.
fn failed_upgrade_keeps_the_old_master(baton: &Baton, reason: &str) {
    let addr = baton.address("http");
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    let out = baton.cli(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("upgrade failed"), "{stderr}");
    assert!(stderr.contains(reason), "{stderr}");
    assert_eq!(baton.master_pid(), Some(baton.pid()), "pid file restored");
    assert!(!baton.dir().join("baton.pid.oldbin").exists());
    let (status, generation, _) = get(addr).unwrap();
    assert_eq!((status, generation), (200, Some(1)));
    // The failed new master and whatever it started are gone; the old
    // master's workers are the same.
    let after = baton.wait_workers(2, &[], Duration::from_secs(15));
    assert_eq!(after, workers);
    assert_eq!(baton.status()["master"]["pid"], baton.pid().as_raw());
}

#[test]
fn upgrade_to_a_missing_binary_fails_and_keeps_the_old_master() {
    let (baton, binary) = start_from_copy(&hello_config(2));
    std::fs::remove_file(&binary).unwrap();
    failed_upgrade_keeps_the_old_master(&baton, "phase binary");
}

#[test]
fn upgrade_to_a_non_executable_file_fails_and_keeps_the_old_master() {
    let (baton, binary) = start_from_copy(&hello_config(2));
    replace(&binary, b"#!/bin/sh\nexit 0\n", 0o644);
    failed_upgrade_keeps_the_old_master(&baton, "not an executable file");
}

#[test]
fn upgrade_to_a_binary_that_exits_fails_and_keeps_the_old_master() {
    let (baton, binary) = start_from_copy(&hello_config(2));
    replace(&binary, b"#!/bin/sh\nexit 7\n", 0o755);
    failed_upgrade_keeps_the_old_master(&baton, "exited with exit status 7");
}

#[test]
fn upgrade_to_a_binary_that_hangs_times_out_and_keeps_the_old_master() {
    let config =
        hello_config(2).replace("[supervisor]\n", "[supervisor]\nupgrade_timeout = \"1s\"\n");
    let (baton, binary) = start_from_copy(&config);
    replace(&binary, b"#!/bin/sh\nsleep 60\n", 0o755);
    failed_upgrade_keeps_the_old_master(&baton, "not ready within upgrade_timeout");
}

#[test]
fn upgrade_whose_config_check_fails_keeps_the_old_master() {
    let (baton, _binary) = start_from_copy(&hello_config(2));
    baton.write_config(&format!("{}\nbogus = 1\n", hello_config(2)));
    failed_upgrade_keeps_the_old_master(&baton, "unknown field `bogus`");
}

#[test]
fn upgrade_whose_workers_never_become_ready_keeps_the_old_master() {
    let (baton, _binary) = start_from_copy(&hello_config(2));
    baton.write_config(&config_with_worker(&format!(
        "command = [{:?}, \"never-ready\"]\nprocesses = 2\nready_timeout = \"1s\"\ndrain_timeout = \"1s\"\n",
        Binaries::testworker().display().to_string()
    )));
    failed_upgrade_keeps_the_old_master(&baton, "not ready within 1s");
}

#[test]
fn a_second_usr2_during_an_upgrade_is_refused_with_a_log_line() {
    let config =
        hello_config(2).replace("[supervisor]\n", "[supervisor]\nupgrade_timeout = \"3s\"\n");
    let (baton, binary) = start_from_copy(&config);
    replace(&binary, b"#!/bin/sh\nsleep 60\n", 0o755);
    baton.signal(Signal::SIGUSR2);
    baton.wait_event(Duration::from_secs(5), |e| {
        message(e) == "new master started"
    });
    assert!(
        baton.dir().join("baton.pid.oldbin").exists(),
        "pid file is *.oldbin during the upgrade"
    );
    baton.signal(Signal::SIGUSR2);
    let refused = baton.wait_event(Duration::from_secs(5), |e| {
        event_name(e) == "upgrade.refused"
    });
    assert!(
        refused["fields"]["reason"]
            .as_str()
            .unwrap()
            .contains("already in progress"),
        "{refused}"
    );
    baton.wait_event(Duration::from_secs(10), |e| {
        message(e).starts_with("upgrade failed")
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while baton.master_pid() != Some(baton.pid()) {
        assert!(Instant::now() < deadline, "pid file not restored");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn twenty_upgrades_leave_one_master_one_generation_and_no_leaked_fds() {
    let baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let kinds = |pid: Pid| {
        let mut kinds: Vec<String> = open_fds(pid)
            .into_iter()
            .map(|(_, target)| target.split(':').next().unwrap_or("").to_string())
            .collect();
        kinds.sort();
        kinds
    };
    // The first master inherited the test's stdio; compare masters that
    // were both started by an upgrade.
    let mut master = baton.pid();
    let mut masters = Vec::new();
    let mut first_kinds = Vec::new();
    for i in 0..20 {
        let out = baton.cli(&["upgrade"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        master = baton.wait_new_master(master, Duration::from_secs(30));
        masters.push(master);
        if i == 0 {
            std::thread::sleep(Duration::from_millis(300));
            first_kinds = kinds(master);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while baton.master_workers().len() != 2 || kinds(master) != first_kinds {
        assert!(
            Instant::now() < deadline,
            "workers {:?}; fds {:?} vs {:?}",
            baton.master_workers(),
            kinds(master),
            first_kinds
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for old in &masters[..19] {
        assert!(!alive(*old), "old master {old} still running");
    }
    let status = baton.status();
    assert_eq!(status["generations"].as_array().unwrap().len(), 1);
    assert_eq!(status["master"]["current_generation"], 21);
    assert_eq!(read_pid(&baton.dir().join("baton.pid")), Some(master));
}

#[test]
fn a_failed_upgrade_leaves_the_old_masters_unix_socket_in_place() {
    let config = format!(
        "{}\n[[listener]]\nname = \"sock\"\naddress = \"unix:app.sock\"\n",
        hello_config(2)
    );
    let (baton, _binary) = start_from_copy(&config);
    let socket = baton.dir().join("app.sock");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    // The new master adopts the listeners, then rejects the config.
    baton.write_config(&format!("{config}\nbogus = 1\n"));
    let out = baton.cli(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "the failed new master removed the old master's socket file"
    );
    // A successful upgrade hands the file over: the new master serves on it
    // and removes it when it stops.
    baton.write_config(&config);
    assert_eq!(baton.cli(&["upgrade"]).status.code(), Some(0));
    let new_master = baton.wait_new_master(baton.pid(), Duration::from_secs(20));
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    assert_eq!(baton.cli(&["stop"]).status.code(), Some(0));
    assert!(!alive(new_master));
    assert!(!socket.exists(), "the socket file outlived its last master");
}

/// The new config's admin port is taken: the new master cannot bind it and
/// gives up; `baton upgrade` says why (not only "the new master exited with
/// exit status 1"), and the old master keeps serving.
#[test]
fn upgrade_whose_new_admin_port_is_taken_says_why() {
    let (baton, _binary) = start_from_copy(&hello_config(2));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    baton.write_config(&hello_config(2).replace(
        "[supervisor]\n",
        &format!("[supervisor]\nadmin = \"{address}\"\n"),
    ));
    failed_upgrade_keeps_the_old_master(
        &baton,
        &format!("the new master gave up: binding the admin endpoint on {address}"),
    );
    drop(taken);
}
