//! Reload traces: with `[supervisor] otlp_endpoint`, each reload is one
//! trace (a root span with a child span per phase, and each new worker's
//! startup under the spawn phase) sent over OTLP/HTTP with protobuf, and
//! the new workers get the reload's `TRACEPARENT` (environment, and the
//! SDK's hello).

use baton_tests::harness::{
    config_with_worker, event_name, exchange, message, Baton, Binaries, TempDir,
};
use baton_tests::otlp::{BlackHole, Receiver, Span};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

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
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
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
        // The new worker's startup, from spawn to ready, under the spawn
        // phase.
        let spawn = children(&spans, reload, "spawn");
        let startups: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == "worker startup" && s.parent_span_id == spawn.span_id)
            .collect();
        assert_eq!(startups.len(), 1, "{spans:#?}");
        assert_eq!(startups[0].trace_id, reload.trace_id);
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

/// The one child span of `parent` named `name`.
fn children<'a>(spans: &'a [Span], parent: &Span, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id == parent.span_id)
        .collect();
    assert_eq!(found.len(), 1, "{name} under {parent:?}: {spans:#?}");
    found[0]
}

#[test]
fn sdk_workers_get_the_trace_and_an_in_place_reload_traces_its_phases() {
    let receiver = Receiver::start();
    let worker = format!(
        "command = [{:?}, \"app\"]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"2s\"\n\
         app_config = [\"app.conf\"]\nprepare_timeout = \"2s\"\n",
        Binaries::testworker().display().to_string()
    );
    let config = config_with_worker(&worker).replace(
        "[supervisor]\n",
        &format!("[supervisor]\notlp_endpoint = {:?}\n", receiver.endpoint()),
    );
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    std::fs::write(dir.path().join("app.conf"), "rate = 1\n").unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);

    // Each SDK worker has the trace context of the reload that started it
    // (generation 1's start), as `Worker::traceparent` gives it.
    let mut given = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let stream = std::net::TcpStream::connect(baton.address("http")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (status, head, _) = exchange(stream, "/").unwrap();
        assert_eq!(status, 200);
        let traceparent = head
            .lines()
            .find_map(|l| l.strip_prefix("x-traceparent: "))
            .unwrap_or_else(|| panic!("no x-traceparent: {head}"));
        given.insert(traceparent.trim().to_string());
    }
    assert_eq!(given.len(), 1, "one reload started both workers: {given:?}");

    // Only the app config changed: an in-place reload.
    std::fs::write(baton.dir().join("app.conf"), "rate = 2\n").unwrap();
    let out = baton.cli(&["reload", "--in-place"]);
    assert!(out.status.success(), "{out:?}");
    baton.signal(Signal::SIGQUIT);
    baton.wait_exit(Duration::from_secs(15));

    let spans = receiver.wait(Duration::from_secs(10), |spans| {
        spans.iter().filter(|s| s.name == "reload").count() == 2
            && spans.iter().filter(|s| s.name == "commit").count() == 2
    });
    let start = spans
        .iter()
        .find(|s| s.name == "reload" && children_named(&spans, s).contains(&"spawn"))
        .expect("generation 1's start");
    let spawn = children(&spans, start, "spawn");
    let traceparent = given.into_iter().next().unwrap();
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", start.trace_id, spawn.span_id),
        "{spans:#?}"
    );
    let startups = spans
        .iter()
        .filter(|s| s.name == "worker startup" && s.parent_span_id == spawn.span_id)
        .count();
    assert_eq!(startups, 2, "{spans:#?}");

    let in_place = spans
        .iter()
        .find(|s| s.name == "reload" && s.span_id != start.span_id)
        .unwrap();
    assert_ne!(in_place.trace_id, start.trace_id);
    let mut phases = children_named(&spans, in_place);
    phases.sort();
    assert_eq!(phases, ["commit", "prepare", "validate"], "{spans:#?}");
}

/// The names of `parent`'s child spans.
fn children_named<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a str> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .map(|s| s.name.as_str())
        .collect()
}

/// `config` exporting traces to `endpoint`, plus `extra` `[supervisor]` lines.
fn exporting_to(config: &str, endpoint: &str, extra: &str) -> String {
    config.replace(
        "[supervisor]\n",
        &format!("[supervisor]\notlp_endpoint = {endpoint:?}\n{extra}"),
    )
}

/// The SDK's batch exporter, told to send every 100 ms: an export to the
/// black hole is in flight, waiting on it, whenever the master stops or
/// upgrades.
fn exporting_often() -> [(&'static str, &'static std::ffi::OsStr); 1] {
    [("OTEL_BSP_SCHEDULE_DELAY", std::ffi::OsStr::new("100"))]
}

#[test]
fn a_collector_that_never_answers_does_not_delay_a_stop() {
    let collector = BlackHole::start();
    let config = exporting_to(
        &baton_tests::harness::hello_config(1),
        &collector.endpoint(),
        "",
    );
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let mut baton = Baton::start_with_env(&Binaries::baton(), dir, &["run"], &exporting_often());
    baton.wait_committed(1);
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    // An export is stuck on the collector now (5 s export timeout).
    std::thread::sleep(Duration::from_millis(300));
    baton.signal(Signal::SIGTERM);
    // The drain is the workers' business; from the loop's end to the
    // process's, only the flush remains: 200 ms at most (the old flush
    // waited for the 5 s export timeout). 2 s is a generous bound.
    baton.wait_event(Duration::from_secs(15), |e| message(e) == "master exiting");
    let exiting = Instant::now();
    baton.wait_exit(Duration::from_secs(15));
    let took = exiting.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the master took {took:?} from its loop's end to its exit with a collector that never answers"
    );
    let dropped = baton.wait_event(Duration::from_secs(1), |e| {
        event_name(e) == "otlp.spans_dropped"
    });
    let count = dropped["fields"]["dropped"].as_u64().unwrap_or(0);
    assert!(count >= 1, "{dropped}");
}

#[test]
fn a_collector_that_never_answers_does_not_stall_an_exec_upgrade_and_drops_are_counted() {
    let collector = BlackHole::start();
    let config = exporting_to(
        &baton_tests::harness::hello_config(1),
        &collector.endpoint(),
        "upgrade = \"exec\"\nadmin = \"127.0.0.1:0\"\n",
    );
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let mut baton = Baton::start_with_env(&Binaries::baton(), dir, &["run"], &exporting_often());
    baton.wait_committed(1);
    let admin: std::net::SocketAddr = baton.status()["master"]["admin"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    baton.skip_log();
    baton.signal(Signal::SIGUSR2);
    // `baton status` answers all along: from the old image, then the new
    // (the old flush kept it waiting for the 5 s export timeout).
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    let asked = Instant::now();
    while asked.elapsed() < Duration::from_secs(30) {
        let start = Instant::now();
        let out = baton.cli(&["status", "--json"]);
        slowest = slowest.max(start.elapsed());
        answered += usize::from(out.status.success());
        if baton.count_events(|e| event_name(e) == "reload.committed") >= 2 {
            break;
        }
    }
    let committed = baton.wait_committed(2);
    assert_eq!(committed["span"]["trigger"], "upgrade");
    assert!(answered >= 1, "no status answered during the upgrade");
    assert!(
        slowest < Duration::from_secs(2),
        "`baton status` took {slowest:?} during an exec upgrade with a collector that never answers"
    );
    assert_eq!(baton.master_pid(), Some(baton.pid()), "the pid stays");
    // The old image said what it could not send.
    let dropped = baton.wait_event(Duration::from_secs(1), |e| {
        event_name(e) == "otlp.spans_dropped"
    });
    assert!(
        dropped["fields"]["dropped"].as_u64().unwrap_or(0) >= 1,
        "{dropped}"
    );
    // The new image's exports time out (5 s) too: counted on /metrics.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let stream = std::net::TcpStream::connect(admin).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (status, _, body) = exchange(stream, "/metrics").unwrap();
        assert_eq!(status, 200);
        last = body;
        let count = last
            .lines()
            .find_map(|l| l.strip_prefix("baton_otlp_spans_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if count.is_some_and(|c| c >= 1.0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no baton_otlp_spans_dropped_total >= 1 in /metrics within 20 s:\n{last}");
}
