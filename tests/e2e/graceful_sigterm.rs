//! SIGTERM, what `docker stop`, Kubernetes and systemd send, drains.

use baton_tests::harness::{
    config_with_worker, event_name, field, get_path, steady_load, Baton, Binaries,
};
use baton_tests::load::Mode;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// Two SDK workers whose `/slow` takes 1.5 s, draining within 10 s.
fn slow_config(extra_supervisor: &str) -> String {
    let config = config_with_worker(&format!(
        "command = [{:?}, \"slow-http\", \"1500\"]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"10s\"\n",
        Binaries::testworker().display().to_string()
    ));
    config.replacen(
        "[supervisor]\n",
        &format!("[supervisor]\n{extra_supervisor}"),
        1,
    )
}

#[test]
fn sigterm_finishes_requests_in_flight_and_exits_zero() {
    let mut baton = Baton::start(&slow_config(""));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = steady_load(addr, Mode::KeepAlive);
    let slow: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get_path(addr, "/slow")))
        .collect();
    // Bounded: the slow requests are on the wire long before they finish.
    std::thread::sleep(Duration::from_millis(300));
    let signalled = load.run_start().elapsed();
    baton.signal(Signal::SIGTERM);
    let status = baton.wait_exit(Duration::from_secs(15));
    let report = load.stop();
    assert!(status.success(), "master exit: {status:?}");
    for request in slow {
        let (code, _, body) = request.join().unwrap().expect("the slow request completes");
        assert_eq!((code, body.as_str()), (200, "done\n"));
    }
    // Every request started before the signal completed; what came after
    // found the workers draining (answered with `Connection: close`), then
    // the master gone.
    let cut: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.start < signalled && s.class.is_failure())
        .collect();
    let before = report
        .samples
        .iter()
        .filter(|s| s.start < signalled)
        .count();
    eprintln!(
        "SIGTERM under keep-alive load: {before} requests started before it, {} cut; 4 slow ones in flight",
        cut.len()
    );
    assert!(report.ok() > 100, "too little traffic: {}", report.ok());
    assert!(cut.is_empty(), "requests cut by the stop: {cut:?}");
    let exits: Vec<String> = baton
        .events(|e| event_name(e) == "worker.exited")
        .iter()
        .map(|e| field(e, "status"))
        .collect();
    assert_eq!(exits.len(), 2, "{exits:?}");
    assert!(exits.iter().all(|s| s == "exit status 0"), "{exits:?}");
}

#[test]
fn a_second_sigterm_makes_the_stop_fast() {
    let mut baton = Baton::start(&slow_config(""));
    baton.wait_committed(1);
    // A request in flight keeps a worker draining.
    let addr = baton.address("http");
    let slow = std::thread::spawn(move || get_path(addr, "/slow"));
    std::thread::sleep(Duration::from_millis(300));
    baton.signal(Signal::SIGTERM);
    baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "master.stopping" && field(e, "how") == "Graceful"
    });
    baton.signal(Signal::SIGTERM);
    baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "master.stopping" && field(e, "how") == "Fast"
    });
    assert!(baton.wait_exit(Duration::from_secs(10)).success());
    // The fast stop's SIGTERM reached the SDK worker as a drain request.
    assert_eq!(slow.join().unwrap().expect("the slow request").0, 200);
}

#[test]
fn sigterm_fast_keeps_nginx_meaning() {
    let mut baton = Baton::start(&slow_config("sigterm = \"fast\"\n"));
    baton.wait_committed(1);
    let started = Instant::now();
    baton.signal(Signal::SIGTERM);
    baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "master.stopping" && field(e, "how") == "Fast"
    });
    assert!(baton.wait_exit(Duration::from_secs(10)).success());
    eprintln!("fast stop took {:?}", started.elapsed());
}
