use baton_tests::harness::{event_name, hello_config, message, span_generation, Baton};
use nix::sys::signal::Signal;
use std::time::Duration;

/// A master whose reload to generation 2 has started and sits in its ready
/// phase: `ready = "delay:700ms"` keeps it there long enough to send more
/// reload requests into it.
fn reloading_slowly() -> Baton {
    let config = hello_config(1).replace(
        "ready_timeout = \"10s\"",
        "ready = \"delay:700ms\"\nready_timeout = \"10s\"",
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    baton.signal(Signal::SIGHUP);
    baton.next_event(Duration::from_secs(5), |e| {
        event_name(e) == "reload.started" && span_generation(e) == Some(2)
    });
    baton
}

#[test]
fn hups_during_a_reload_coalesce_into_one_follow_up() {
    let baton = reloading_slowly();
    for _ in 0..3 {
        baton.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(50));
    }
    baton.wait_committed(2);
    let follow_up = baton.wait_committed(3);
    assert_eq!(follow_up["span"]["trigger"], "coalesced", "{follow_up}");
    // Long enough for a fourth reload to have started and become ready.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(baton.count_events(|e| event_name(e) == "reload.started"), 3);
    assert!(baton.count_events(|e| message(e).contains("coalesced into one follow-up")) >= 1);
}

#[test]
fn a_reload_command_during_a_reload_reports_the_coalesced_follow_up() {
    let baton = reloading_slowly();
    // Generation 2 is in its ready phase: this request joins the follow-up.
    let out = baton.cli(&["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("reload to generation 3 committed (trigger: coalesced)"),
        "{stdout}"
    );
    assert_eq!(baton.status()["master"]["current_generation"], 3);
}
