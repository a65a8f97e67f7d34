//! Nothing a worker does floods the master's log or stalls its loop: a
//! worker that breaks the control protocol is dealt with once, and captured
//! output is rate-limited with a count of what was suppressed.

use baton_tests::harness::{config_with_worker, event_name, field, message, Baton, Binaries};
use std::time::{Duration, Instant};

#[test]
fn a_worker_sending_garbage_is_killed_once_per_process_not_logged_forever() {
    let mut baton = Baton::start(&config_with_worker(&format!(
        "command = [{:?}, \"garbage\"]\nprocesses = 1\nready_timeout = \"10s\"\ndrain_timeout = \"2s\"\n",
        Binaries::testworker().display().to_string()
    )));
    baton.wait_committed(1);
    baton.wait_event(Duration::from_secs(10), |e| {
        message(e) == "worker broke the control protocol: closing its channel and killing it"
    });
    // Each process is killed at its first bad message and respawned with a
    // backoff: a handful of lines over seconds, not thousands.
    std::thread::sleep(Duration::from_secs(2));
    let status = baton.status();
    assert_eq!(status["master"]["state"], "running", "{status}");
    let broke = baton.count_events(|e| message(e).contains("broke the control protocol"));
    assert!((1..=5).contains(&broke), "{broke} protocol errors logged");
    // The master still reloads, into a worker that behaves.
    baton.write_config(&baton_tests::harness::hello_config(1));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
}

#[test]
fn captured_output_is_rate_limited_with_a_count_of_what_was_suppressed() {
    let mut baton = Baton::start(&config_with_worker(
        "command = [\"/bin/sh\", \"-c\", \"exec yes\"]\nprotocol = \"systemd\"\nready = \"delay:100ms\"\n\
         output = \"capture\"\ndrain_timeout = \"2s\"\n",
    ));
    baton.wait_committed(1);
    let start = Instant::now();
    let suppressed = baton.wait_event(Duration::from_secs(10), |e| {
        message(e) == "worker output suppressed: more lines a second than the limit"
    });
    assert!(
        field(&suppressed, "suppressed").parse::<u64>().unwrap() > 0,
        "{suppressed}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let lines = baton.count_events(|e| message(e) == "worker output");
    let seconds = start.elapsed().as_secs() + 2;
    assert!(
        lines as u64 <= 1000 * seconds,
        "{lines} lines logged in about {seconds} s"
    );
    let status = baton.status();
    assert_eq!(status["master"]["state"], "running", "{status}");
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    baton.wait_exit(Duration::from_secs(10));
}
