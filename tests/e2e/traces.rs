//! Reload traces: with `[supervisor] otlp_endpoint`, each reload is one
//! trace (a root span with a child span per phase) sent over OTLP/HTTP with
//! protobuf, and the new workers get the reload's `TRACEPARENT`.

use baton_tests::harness::{config_with_worker, message, Baton};
use baton_tests::otlp::{Receiver, Span};
use nix::sys::signal::Signal;
use std::time::Duration;

#[test]
fn each_reload_is_one_trace_with_its_phases_and_new_workers_join_it() {
    let receiver = Receiver::start();
    // A worker that writes the TRACEPARENT it was given, per generation.
    let worker = "command = [\"/bin/sh\", \"-c\", \"echo \\\"$TRACEPARENT\\\" > tp-$BATON_GENERATION; exec sleep 60\"]\n\
                  protocol = \"systemd\"\nready = \"delay:50ms\"\ndrain_timeout = \"2s\"\n";
    let config = config_with_worker(worker).replace(
        "[supervisor]\n",
        &format!("[supervisor]\notlp_endpoint = {:?}\n", receiver.endpoint()),
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let outcome = baton.reload();
    assert_eq!(message(&outcome), "reload committed", "{outcome}");
    // A graceful stop flushes what is batched.
    baton.signal(Signal::SIGQUIT);
    baton.wait_exit(Duration::from_secs(15));

    let spans = receiver.wait(Duration::from_secs(10), |spans| {
        spans.iter().filter(|s| s.name == "reload").count() == 2
            && spans.iter().filter(|s| s.name == "commit").count() == 2
    });
    let reloads: Vec<&Span> = spans.iter().filter(|s| s.name == "reload").collect();
    assert_ne!(
        reloads[0].trace_id, reloads[1].trace_id,
        "one trace per reload"
    );
    for reload in &reloads {
        assert_eq!(reload.parent_span_id, "", "a reload is a root: {reload:?}");
        assert!(reload.service.contains("baton"), "{reload:?}");
        let mut phases: Vec<&str> = spans
            .iter()
            .filter(|s| s.parent_span_id == reload.span_id)
            .map(|s| s.name.as_str())
            .collect();
        phases.sort();
        assert_eq!(phases, ["bind", "commit", "ready", "spawn", "validate"]);
        assert!(spans
            .iter()
            .filter(|s| s.parent_span_id == reload.span_id)
            .all(|s| s.trace_id == reload.trace_id));
    }
    // Generation 2's worker got the second reload's trace, under its spawn
    // phase.
    let traceparent = std::fs::read_to_string(baton.dir().join("tp-2")).unwrap();
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent:?}");
    let spawn = spans
        .iter()
        .find(|s| s.name == "spawn" && s.span_id == parts[2])
        .unwrap_or_else(|| panic!("TRACEPARENT {traceparent:?} names no spawn span: {spans:#?}"));
    let reload = reloads
        .iter()
        .find(|r| r.span_id == spawn.parent_span_id)
        .unwrap();
    assert_eq!(parts[1], reload.trace_id);
    assert_eq!(parts[0], "00");
}
