use baton_tests::harness::{
    config_with_worker, event_name, field, get, hello_config, message, Baton, Binaries,
};
use std::time::Duration;

/// Starts `hello`, breaks the config with `broken`, reloads: the reload must
/// fail in `phase` with `reason` in its message, the same workers keep
/// serving generation 1, and a following good reload works.
fn rollback(broken: &str, phase: &str, reason: &str) -> Baton {
    let good = hello_config(2);
    let mut baton = Baton::start(&good);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let before = baton.wait_workers(2, &[], Duration::from_secs(5));

    baton.write_config(broken);
    let outcome = baton.reload();
    assert!(message(&outcome).starts_with("reload failed"), "{outcome}");
    assert_eq!(field(&outcome, "phase"), phase, "{outcome}");
    assert!(field(&outcome, "reason").contains(reason), "{outcome}");

    let after = baton.wait_workers(2, &[], Duration::from_secs(15));
    assert_eq!(before, after, "the old generation's workers are untouched");
    let (status, generation, _) = get(addr).unwrap();
    assert_eq!((status, generation), (200, Some(1)));

    baton.write_config(&good);
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    // The old generation answers until it has read its drain message.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, generation, _) = get(addr).unwrap();
        assert_eq!(status, 200);
        if generation > Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "generation 1 still answers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    baton
}

#[test]
fn reload_with_syntax_error_keeps_old_generation() {
    rollback("[worker\ncommand = 1\n", "validate", "baton.toml:1:");
}

#[test]
fn reload_with_address_in_use_keeps_old_generation() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "{}\n[[listener]]\nname = \"admin\"\naddress = \"{}\"\n",
        hello_config(2),
        taken.local_addr().unwrap()
    );
    rollback(&config, "bind", "listener `admin`");
}

#[test]
fn reload_with_worker_that_exits_at_once_keeps_old_generation() {
    let config = config_with_worker(
        "command = [\"/bin/sh\", \"-c\", \"exit 3\"]\nprocesses = 2\nready_timeout = \"10s\"\n",
    );
    rollback(&config, "ready", "exit status 3 before it was ready");
}

#[test]
fn reload_with_worker_never_ready_keeps_old_generation() {
    let config = config_with_worker(&format!(
        "command = [{:?}, \"never-ready\"]\nprocesses = 2\nready_timeout = \"1s\"\ndrain_timeout = \"2s\"\n",
        Binaries::testworker().display().to_string()
    ));
    rollback(&config, "ready", "not ready within 1s");
}

#[test]
fn reload_with_worker_speaking_another_protocol_version_keeps_old_generation() {
    let config = config_with_worker(&format!(
        "command = [{:?}, \"wrong-version\"]\nprocesses = 1\nready_timeout = \"1s\"\ndrain_timeout = \"1s\"\n",
        Binaries::testworker().display().to_string()
    ));
    let baton = rollback(&config, "ready", "broke the control protocol");
    let event = baton.wait_event(Duration::from_secs(1), |e| {
        message(e) == "worker broke the control protocol: closing its channel and killing it"
    });
    assert!(
        field(&event, "error").contains("protocol version 99"),
        "{event}"
    );
    assert!(!field(&event, "pid").is_empty(), "{event}");
    assert_eq!(
        baton.count_events(|e| message(e).contains("control protocol")),
        1,
        "said once, not for every bad message"
    );
}

#[test]
fn reload_with_missing_worker_binary_keeps_old_generation() {
    let config = config_with_worker("command = [\"./no-such-worker\"]\nprocesses = 2\n");
    rollback(&config, "spawn", "no-such-worker");
}

#[test]
fn reload_switches_the_log_filter_at_commit() {
    let warn = hello_config(1).replace("log_filter = \"info\"", "log_filter = \"warn\"");
    let mut baton = Baton::start(&warn);
    baton.wait_pid_file();
    // Under "warn" generation 1 starts silently; the reload switches to
    // "info" in its commit phase, so its own outcome is the first info event.
    baton.write_config(&hello_config(1));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(baton.count_events(|e| event_name(e) == "reload.started"), 0);
    assert_eq!(
        baton.count_events(|e| event_name(e) == "reload.committed"),
        1
    );
}
