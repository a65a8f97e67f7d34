use baton_tests::harness::{hello_config, message, Baton};
use baton_tests::load::{LoadConfig, LoadHandle, Mode};
use std::time::{Duration, Instant};

const RELOADS: u64 = 20;

/// ≥ 20 HUPs a few hundred ms apart under a closed-loop client: not one
/// request may fail, and the responses move from generation 1 to the last.
fn reloads_under_load_drop_nothing(mode: Mode) {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = LoadHandle::start(LoadConfig {
        addr,
        connections: 8,
        mode,
        duration: Duration::from_secs(90),
        max_requests: 20_000_000,
        timeout: Duration::from_secs(10),
        path: "/".into(),
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.ok_so_far() < 200 {
        assert!(Instant::now() < deadline, "no traffic flows");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..RELOADS {
        let outcome = baton.reload();
        assert_eq!(message(&outcome), "reload committed", "{outcome}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let last = RELOADS + 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.latest_generation() != Some(last) {
        assert!(
            Instant::now() < deadline,
            "generation {last} never answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let report = load.stop();
    eprintln!(
        "{mode:?}: {} ok, {} failed, generations {:?} in {:?}",
        report.ok(),
        report.failed(),
        report.generations(),
        report.elapsed
    );
    assert!(
        report.ok() > 1000,
        "too little traffic to mean anything: {}",
        report.ok()
    );
    assert_eq!(
        report.failed(),
        0,
        "failed requests: {}",
        report.failures_summary()
    );
    let generations = report.generations();
    assert_eq!(generations.first(), Some(&1));
    assert_eq!(generations.last(), Some(&last));
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "generations appear in increasing order: {generations:?}"
    );
}

#[test]
fn hup_under_keepalive_load_fails_no_request() {
    reloads_under_load_drop_nothing(Mode::KeepAlive);
}

#[test]
fn hup_under_new_connection_load_fails_no_request() {
    reloads_under_load_drop_nothing(Mode::NewConnection);
}
