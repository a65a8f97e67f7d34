use baton_tests::harness::{
    alive, config_with_worker, event_name, generation_in as generation, get, hello_config, message,
    Baton, Binaries, TempDir,
};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pids(generation: &Value) -> Vec<i64> {
    generation["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect()
}

/// Polls `status` until `done` holds (bounded).
fn wait_status(baton: &Baton, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = baton.status();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "status never settled: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reload_command_reports_the_new_generation_and_its_workers() {
    let baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let out = baton.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("reload to generation 2 committed"), "{text}");
    for phase in ["validate", "bind", "spawn", "ready", "commit"] {
        assert!(text.contains(phase), "{text}");
    }
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 2);
    assert_eq!(status["last_reload"]["outcome"], "committed");
    assert_eq!(status["last_reload"]["trigger"], "cli");
    let current = generation(&status, 2).unwrap();
    assert_eq!(current["state"], "current");
    for pid in pids(&current) {
        assert!(
            text.contains(&pid.to_string()),
            "pid {pid} not reported: {text}"
        );
    }
}

#[test]
fn reload_command_with_a_broken_config_exits_1_with_its_location() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    baton.write_config("[worker]\ncommand = [\"x\"]\nprocesses = \"two\"\n");
    let out = baton.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("baton.toml:3:13: "),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("phase validate"), "{}", stderr(&out));
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 1);
    assert_eq!(generation(&status, 1).unwrap()["state"], "current");
    assert_eq!(status["last_reload"]["outcome"], "failed");
    assert_eq!(status["last_reload"]["failed_phase"], "validate");
}

#[test]
fn status_json_shows_a_draining_generation_while_it_drains() {
    let config = config_with_worker(&format!(
        "command = [{:?}, \"ignore-drain\"]\nprocesses = 1\ndrain_timeout = \"3s\"\n",
        Binaries::testworker().display().to_string()
    ));
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let first = baton.status();
    assert_eq!(first["master"]["pid"], baton.pid().as_raw());
    assert_eq!(first["master"]["state"], "running");
    let listener = &first["listeners"][0];
    assert_eq!(listener["name"], "http");
    assert_eq!(listener["kind"], "tcp");
    assert_eq!(listener["address"], addr.to_string());
    assert!(listener["fd"].as_i64().unwrap() > 2);
    let old = pids(&generation(&first, 1).unwrap());

    assert_eq!(baton.cli(&["reload"]).status.code(), Some(0));
    let during = baton.status();
    let draining = generation(&during, 1).expect("generation 1 still visible");
    assert_eq!(draining["state"], "draining");
    assert_eq!(draining["workers"][0]["state"], "draining");
    assert_eq!(pids(&draining), old);
    let current = generation(&during, 2).unwrap();
    assert_eq!(current["state"], "current");
    assert_eq!(current["workers"][0]["state"], "ready");
    assert_eq!(current["workers"][0]["index"], 0);
    assert_eq!(current["workers"][0]["restarts"], 0);
    assert_eq!(during["last_reload"]["phases"].as_array().unwrap().len(), 5);

    let after = wait_status(&baton, |s| generation(s, 1).is_none());
    assert_eq!(after["generations"].as_array().unwrap().len(), 1);
    assert_eq!(after["master"]["current_generation"], 2);
}

#[test]
fn peer_with_another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    // Open the socket file so that only SO_PEERCRED stands in the way.
    let socket = baton.control_socket();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(Binaries::baton())
        .args(["status", "--socket"])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied: uid 65534"),
        "{}",
        stderr(&out)
    );
    baton.wait_event(Duration::from_secs(5), |e| {
        message(e).starts_with("control connection refused") && e["fields"]["peer_uid"] == 65534
    });
    assert_eq!(baton.status()["master"]["current_generation"], 1);
}

/// Sends raw bytes on the control socket and reads one reply line.
fn raw_request(baton: &Baton, bytes: &[u8]) -> Value {
    let mut stream = UnixStream::connect(baton.control_socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The master may answer and close before a huge request is fully written.
    let _ = stream.write_all(bytes);
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn bad_control_requests_get_error_replies_and_change_nothing() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let before = baton.wait_workers(1, &[], Duration::from_secs(5));
    let cases: [(&[u8], &str); 5] = [
        (b"this is not json\n", "malformed request"),
        // No overflow in the master.
        (
            b"{\"v\":1,\"command\":\"scale\",\"by\":9223372036854775807}\n",
            "must be between 1 and",
        ),
        (
            b"{\"v\":1,\"command\":\"explode\"}\n",
            "unknown variant `explode`",
        ),
        (
            b"{\"v\":7,\"command\":\"status\"}\n",
            "unsupported control protocol version 7",
        ),
        (b"{\"v\":1,\"command\":\"scale\"}\n", "exactly one of"),
    ];
    for (bytes, want) in cases {
        let reply = raw_request(&baton, bytes);
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains(want), "{reply}");
    }
    let huge = vec![b'x'; 200 * 1024];
    let reply = raw_request(&baton, &huge);
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("longer than"),
        "{reply}"
    );
    // Still serving, same workers, same generation.
    assert_eq!(get(addr).unwrap().1, Some(1));
    assert_eq!(baton.wait_workers(1, &[], Duration::from_secs(5)), before);
    assert_eq!(baton.status()["master"]["current_generation"], 1);
}

#[test]
fn scale_changes_the_worker_count_and_it_holds_across_reloads() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let count = |s: &Value| {
        generation(s, s["master"]["current_generation"].as_u64().unwrap()).unwrap()["workers"]
            .as_array()
            .unwrap()
            .len()
    };
    let out = baton.cli(&["scale", "+1"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("2 -> 3"), "{}", stdout(&out));
    baton.wait_workers(3, &[], Duration::from_secs(10));
    baton.signal(Signal::SIGTTOU);
    baton.wait_workers(2, &[], Duration::from_secs(10));
    baton.signal(Signal::SIGTTIN);
    baton.wait_workers(3, &[], Duration::from_secs(10));
    assert_eq!(baton.cli(&["scale", "-1"]).status.code(), Some(0));
    assert_eq!(baton.cli(&["scale", "4"]).status.code(), Some(0));
    let status = wait_status(&baton, |s| count(s) == 4);
    assert_eq!(generation(&status, 1).unwrap()["processes"], 4);
    let out = baton.cli(&["scale", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("between 1 and 1024"),
        "{}",
        stderr(&out)
    );

    // The scaled count holds for the next reload...
    assert_eq!(event_name(&baton.reload()), "reload.committed");
    let status = wait_status(&baton, |s| {
        count(s) == 4 && s["generations"].as_array().unwrap().len() == 1
    });
    assert_eq!(status["master"]["current_generation"], 2);
    // ...until the config changes `processes`.
    baton.write_config(&hello_config(1));
    assert_eq!(event_name(&baton.reload()), "reload.committed");
    wait_status(&baton, |s| {
        count(s) == 1 && s["generations"].as_array().unwrap().len() == 1
    });
}

#[test]
fn stop_waits_until_the_master_has_exited() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    let out = baton.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("stopped"));
    // The CLI returned only once the master was gone.
    let status = baton.wait_exit(Duration::from_secs(1));
    assert!(status.success());
    assert!(workers.iter().all(|p| !alive(*p)));
    assert!(
        !baton.control_socket().exists(),
        "control socket left behind"
    );
    assert!(
        !baton.dir().join("baton.pid").exists(),
        "pid file left behind"
    );
    baton.wait_event(Duration::from_secs(1), |e| {
        event_name(e) == "master.stopping" && e["fields"]["how"] == "Graceful"
    });
}

#[test]
fn stop_fast_terminates_workers_and_exits() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    let out = baton.cli(&["stop", "--fast"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(baton.wait_exit(Duration::from_secs(1)).success());
    assert!(workers.iter().all(|p| !alive(*p)));
    baton.wait_event(Duration::from_secs(1), |e| {
        event_name(e) == "master.stopping" && e["fields"]["how"] == "Fast"
    });
}

#[test]
fn reopen_reopens_the_log_file_and_tells_every_worker() {
    let dump = TempDir::new();
    let config = config_with_worker(&format!(
        "command = [{:?}, \"dump-listeners\", {:?}]\nprocesses = 2\n",
        Binaries::testworker().display().to_string(),
        dump.path().display().to_string()
    ))
    .replace("[supervisor]\n", "[supervisor]\nlog_file = \"baton.log\"\n");
    let baton = Baton::start(&config);
    baton.wait_pid_file();
    let log = baton.dir().join("baton.log");
    let wait_for = |path: &std::path::Path, text: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(text)
        {
            assert!(
                Instant::now() < deadline,
                "{} never said {text:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(&log, "reload committed");
    std::fs::rename(&log, baton.dir().join("baton.log.1")).unwrap();
    let out = baton.cli(&["reopen"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("2 worker(s)"), "{}", stdout(&out));
    wait_for(&log, "logs reopened");
    for index in 0..2 {
        wait_for(&dump.path().join(format!("reopened-1-{index}")), "reopen");
    }
    // The nginx spelling and the signal do the same.
    assert_eq!(baton.cli(&["-s", "reopen"]).status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(dump.path().join("reopened-1-0"))
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "second reopen never reached the worker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dash_s_reload_signals_the_master_from_its_pid_file() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    // No master answers on that socket: the pid file names one, checked to
    // be a baton master before it is signalled.
    let nowhere = baton.dir().join("nowhere.sock");
    let out = baton.cli(&["-s", "reload", "--socket", nowhere.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let committed = baton.wait_committed(2);
    assert_eq!(committed["span"]["trigger"], "signal");
}

#[test]
fn a_second_master_on_the_same_socket_fails_clearly() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let out = baton.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another baton master is running"),
        "{}",
        stderr(&out)
    );
    assert_eq!(get(addr).unwrap().0, 200);
    assert_eq!(baton.status()["master"]["pid"], baton.pid().as_raw());
}

#[test]
fn a_stale_control_socket_is_replaced() {
    let dir = TempDir::new();
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("baton.sock")).unwrap();
    drop(stale);
    assert!(dir.path().join("baton.sock").exists());
    std::fs::write(dir.path().join("baton.toml"), hello_config(1)).unwrap();
    let baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    assert_eq!(baton.status()["master"]["pid"], baton.pid().as_raw());
}

#[test]
fn commands_without_a_master_exit_2() {
    let dir = TempDir::new();
    let out = std::process::Command::new(Binaries::baton())
        .args(["status", "--socket"])
        .arg(dir.path().join("nobody-here.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot reach the master"),
        "{}",
        stderr(&out)
    );
}
