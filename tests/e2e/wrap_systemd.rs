//! `protocol = "systemd"`: socket activation for servers without the SDK,
//! and the process settings and stop semantics every non-sdk worker gets.

use baton_tests::harness::{
    alive, config_with_worker, descendants, event_name, field, generation_in, message, open_fds,
    wait_json, wrapped_worker, Baton, TempDir,
};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

fn dump(dir: &Path, generation: u64, index: u32) -> Value {
    wait_json(
        &dir.join(format!("wrapped-{generation}-{index}.json")),
        Duration::from_secs(10),
    )
}

/// Checks what a systemd worker of `generation` was given: its own pid as
/// `LISTEN_PID`, the generation's sockets in config order on fds 3, 4, ...
/// (the very sockets the master holds for it: its own TCP sockets, the
/// shared UDP one), and no other fd of the master.
fn check_generation(baton: &Baton, dir: &Path, generation: u64, names: &[String]) {
    let status = baton.status();
    let master = open_fds(baton.pid());
    let master_fds: BTreeMap<i32, String> = master.into_iter().collect();
    let target = |fd: &Value| master_fds[&(fd.as_i64().unwrap() as i32)].clone();
    let listener_targets: Vec<String> = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| target(&l["fd"]))
        .collect();
    let generation_status = generation_in(&status, generation).unwrap();
    let socket_targets: Vec<String> = generation_status["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(target)
        .collect();
    assert_eq!(socket_targets.len(), names.len(), "{status}");
    for (i, name) in names.iter().enumerate() {
        // TCP listeners: a socket of the generation's own on the port; the
        // UDP one is shared.
        let shared = socket_targets[i] == listener_targets[i];
        assert_eq!(shared, name == "dns", "socket {i} ({name}): {status}");
    }
    let listener_targets = socket_targets;
    for index in 0..2 {
        let seen = dump(dir, generation, index);
        let pid = seen["pid"].as_i64().unwrap();
        assert_eq!(seen["LISTEN_PID"], pid.to_string(), "{seen}");
        assert_eq!(seen["LISTEN_FDS"], names.len().to_string(), "{seen}");
        assert_eq!(seen["LISTEN_FDNAMES"], names.join(":"), "{seen}");
        assert_eq!(seen["BATON_CONTROL_FD"], Value::Null, "{seen}");
        assert_eq!(seen["BATON_GENERATION"], generation.to_string());
        let fds = open_fds(Pid::from_raw(pid as i32));
        let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
        let expected: Vec<i32> = (0..3 + names.len() as i32).collect();
        assert_eq!(numbers, expected, "worker {pid} holds {fds:?}");
        for (i, target) in listener_targets.iter().enumerate() {
            assert_eq!(&fds[3 + i].1, target, "fd {} of worker {pid}", 3 + i);
        }
    }
}

#[test]
fn systemd_workers_get_listen_fds_with_their_own_pid_and_nothing_else() {
    let dir = TempDir::new();
    let dump_dir = dir.path().display().to_string();
    let mut config = config_with_worker(&wrapped_worker(
        &["--dump", &dump_dir],
        "processes = 2\ndrain_timeout = \"5s\"\n",
    ));
    // Enough listeners that the master's own fds for them overlap the
    // 3, 4, ... range they are moved to in the worker.
    let mut names = vec!["http".to_string()];
    for i in 0..10 {
        config.push_str(&format!(
            "\n[[listener]]\nname = \"l{i}\"\naddress = \"127.0.0.1:0\"\n"
        ));
        names.push(format!("l{i}"));
    }
    config.push_str("\n[[listener]]\nname = \"dns\"\naddress = \"udp:127.0.0.1:0\"\n");
    names.push("dns".into());
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    check_generation(&baton, dir.path(), 1, &names);
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    check_generation(&baton, dir.path(), 2, &names);
}

#[test]
fn process_settings_and_captured_output_reach_the_worker() {
    let dir = TempDir::new();
    let dump_dir = dir.path().display().to_string();
    let config = config_with_worker(&wrapped_worker(
        &["--dump", &dump_dir],
        &format!(
            "env = {{ WRAPPED_GREETING = \"hi\", LISTEN_PID = \"1\" }}\ncwd = {dump_dir:?}\nrlimit_nofile = 1000\noutput = \"capture\"\n"
        ),
    ));
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let seen = dump(dir.path(), 1, 0);
    assert_eq!(seen["WRAPPED_GREETING"], "hi");
    assert_eq!(seen["LISTEN_PID"], seen["pid"].to_string(), "{seen}");
    assert_eq!(seen["cwd"], dump_dir.as_str());
    assert_eq!(seen["rlimit_nofile"], serde_json::json!([1000, 1000]));
    // A clean environment: the test runner's variables stay out.
    let allowed = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TERM",
        "WRAPPED_GREETING",
        "BATON_GENERATION",
        "BATON_WORKER",
        "BATON_CONFIG_HASH",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
    ];
    for name in seen["env_names"].as_array().unwrap() {
        assert!(
            allowed.contains(&name.as_str().unwrap()),
            "{name} leaked into the worker"
        );
    }
    let pid = seen["pid"].to_string();
    for stream in ["stdout", "stderr"] {
        let event = baton.wait_event(Duration::from_secs(10), |e| {
            message(e) == "worker output" && field(e, "stream") == stream
        });
        assert_eq!(field(&event, "line"), "wrapped started", "{event}");
        assert_eq!(field(&event, "generation"), "1");
        assert_eq!(field(&event, "worker"), "0");
        assert_eq!(field(&event, "pid"), pid);
    }
}

/// Waits until none of `pids` is alive; panics after `timeout`.
fn wait_gone(pids: &[Pid], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "{pids:?} still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_drained_worker_leaves_no_child_behind() {
    // The server stops on SIGTERM but its child would live on: the master
    // kills what is left of the process group once the server is reaped,
    // long before the drain deadline.
    let config = config_with_worker(&wrapped_worker(&["--child"], "drain_timeout = \"60s\"\n"));
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let old = server_and_its_child(&baton);
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let finished = baton.wait_generation_finished(1);
    assert_eq!(field(&finished, "state"), "draining");
    wait_gone(&old, Duration::from_secs(5));
    assert_eq!(
        baton.count_events(|e| message(e).contains("drain deadline")),
        0
    );
}

#[test]
fn a_worker_ignoring_its_stop_signal_is_killed_with_its_group_at_the_deadline() {
    let config = config_with_worker(&wrapped_worker(
        &["--child", "--ignore-term"],
        "drain_timeout = \"1s\"\n",
    ));
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let old = server_and_its_child(&baton);
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.killed_at_deadline"
    });
    baton.wait_generation_finished(1);
    wait_gone(&old, Duration::from_secs(5));
}

#[test]
fn reopen_signals_wrapped_workers_with_sigusr1() {
    let dir = TempDir::new();
    let dump_dir = dir.path().display().to_string();
    let config = config_with_worker(&wrapped_worker(
        &["--reopened", &dump_dir],
        "processes = 2\n",
    ));
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let out = baton.cli(&["reopen"]);
    assert_eq!(out.status.code(), Some(0));
    // The server notes the signal when its accept loop next turns.
    let addr = baton.address("http");
    let deadline = Instant::now() + Duration::from_secs(10);
    for index in 0..2 {
        let path = dir.path().join(format!("reopened-1-{index}"));
        while !path.exists() {
            assert!(Instant::now() < deadline, "worker {index} never reopened");
            let _ = baton_tests::harness::get(addr);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The wrapped server and the child it started, once both run.
fn server_and_its_child(baton: &Baton) -> Vec<nix::unistd::Pid> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tree = descendants(baton.pid());
        if tree.len() >= 2 {
            return tree;
        }
        assert!(Instant::now() < deadline, "no child: {tree:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
