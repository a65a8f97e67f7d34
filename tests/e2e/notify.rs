//! `ready = "notify"`: `READY=1` on `NOTIFY_SOCKET`, from the worker or one
//! of its children, marks it ready; without it the reload rolls back.

use baton_tests::harness::{
    config_with_worker, event_name, field, generation_in, message, wait_json, Baton, Binaries,
    TempDir,
};
use serde_json::Value;
use std::time::Duration;

fn notify_config(notify: &str, dump: &TempDir, ready_timeout: &str) -> String {
    config_with_worker(&format!(
        "command = [{:?}, \"--notify\", {notify:?}, \"--dump\", {:?}]\nprocesses = 2\nprotocol = \"systemd\"\nready = \"notify\"\nready_timeout = {ready_timeout:?}\ndrain_timeout = \"5s\"\n",
        Binaries::wrapped().display().to_string(),
        dump.path().display().to_string()
    ))
}

fn worker_statuses(status: &Value, generation: u64) -> Vec<Value> {
    generation_in(status, generation)
        .map(|g| g["workers"].as_array().unwrap().clone())
        .unwrap_or_default()
}

#[test]
fn notify_worker_that_never_sends_ready_rolls_back_at_ready_timeout() {
    let dump = TempDir::new();
    let mut baton = Baton::start(&notify_config("ready", &dump, "10s"));
    baton.wait_committed(1);
    let before = baton.wait_workers(2, &[], Duration::from_secs(5));

    baton.write_config(&notify_config("never", &dump, "1s"));
    let outcome = baton.reload();
    assert!(message(&outcome).starts_with("reload failed"), "{outcome}");
    assert_eq!(field(&outcome, "phase"), "ready", "{outcome}");
    assert!(
        field(&outcome, "reason").contains("not ready within 1s"),
        "{outcome}"
    );
    // Its STATUS= line was heard all the same.
    let status = baton.wait_event(Duration::from_secs(1), |e| {
        message(e) == "worker status" && field(e, "generation") == "2"
    });
    assert_eq!(field(&status, "status"), "never ready");
    baton.wait_generation_finished(2);
    assert_eq!(baton.wait_workers(2, &[], Duration::from_secs(5)), before);
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 1);
    for worker in worker_statuses(&status, 1) {
        assert_eq!(worker["state"], "ready");
        assert_eq!(worker["status"], "serving generation", "{worker}");
    }
}

#[test]
fn ready_sent_by_a_child_of_the_worker_counts_for_the_worker() {
    let dump = TempDir::new();
    let baton = Baton::start(&notify_config("from-child", &dump, "10s"));
    baton.wait_committed(1);
    let ready = baton.wait_event(Duration::from_secs(1), |e| event_name(e) == "worker.ready");
    assert_ne!(field(&ready, "sender"), field(&ready, "pid"), "{ready}");
    let status = baton.status();
    let workers = worker_statuses(&status, 1);
    assert_eq!(workers.len(), 2);
    for worker in workers {
        assert_eq!(worker["state"], "ready");
        assert_eq!(worker["status"], "child says ready");
    }
    let out = baton.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("STATUS") && text.contains("child says ready"),
        "{text}"
    );
}

#[test]
fn ready_from_a_process_outside_the_generation_is_ignored() {
    let dump = TempDir::new();
    let mut baton = Baton::start(&notify_config("ready", &dump, "10s"));
    baton.wait_committed(1);
    baton.write_config(&notify_config("never", &dump, "3s"));
    baton.skip_log();
    baton.signal(nix::sys::signal::Signal::SIGHUP);
    let seen = wait_json(
        &dump.path().join("wrapped-2-0.json"),
        Duration::from_secs(10),
    );
    let socket = seen["NOTIFY_SOCKET"].as_str().unwrap().to_string();
    // This test process is no worker of generation 2: its READY=1 must not
    // count, however well-formed.
    let stranger = std::os::unix::net::UnixDatagram::unbound().unwrap();
    stranger.send_to(b"READY=1", &socket).unwrap();
    baton.next_event(Duration::from_secs(5), |e| {
        message(e).starts_with("notification from a process that is not a worker")
    });
    let outcome = baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "reload.committed" || event_name(e) == "reload.failed"
    });
    assert_eq!(event_name(&outcome), "reload.failed", "{outcome}");
}
