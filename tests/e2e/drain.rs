//! `baton drain`, a `preStop` hook: `/readyz` answers 503 at once, the
//! workers go on serving for the grace, then the master stops gracefully.

use baton_tests::harness::{get_path, hello_config, steady_load, Baton};
use baton_tests::load::Mode;
use std::time::{Duration, Instant};

const GRACE: Duration = Duration::from_secs(2);

#[test]
fn drain_says_not_ready_at_once_serves_through_its_grace_then_stops() {
    let config =
        hello_config(2).replace("[supervisor]\n", "[supervisor]\nadmin = \"127.0.0.1:0\"\n");
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let admin: std::net::SocketAddr = baton.status()["master"]["admin"]
        .as_str()
        .expect("the admin address")
        .parse()
        .unwrap();
    assert_eq!(get_path(admin, "/readyz").unwrap().0, 200);
    let load = steady_load(baton.address("http"), Mode::NewConnection);
    let dir = baton.dir().to_path_buf();
    let sent = Instant::now();
    let drain = std::thread::spawn(move || {
        std::process::Command::new(baton_tests::harness::Binaries::baton())
            .args(["drain", "--grace", "2s", "--wait", "-c"])
            .arg(dir.join("baton.toml"))
            .output()
            .expect("run baton drain")
    });
    // Not ready from the drain on.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (code, _, body) = loop {
        let answer = get_path(admin, "/readyz").unwrap();
        if answer.0 == 503 {
            break answer;
        }
        assert!(Instant::now() < deadline, "/readyz never said 503");
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "/readyz said {code} {:?} after the drain was sent",
        sent.elapsed()
    );
    assert!(body.contains("draining"), "{body}");
    assert_eq!(baton.status()["master"]["state"], "draining");
    // The workers still serve.
    let served = load.ok_so_far();
    assert!(
        load.wait_for_ok(served + 200, Duration::from_secs(1)),
        "no traffic during the grace"
    );
    let out = drain.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("draining") && stdout.contains("stopped"),
        "{stdout}"
    );
    assert!(
        sent.elapsed() >= GRACE,
        "the master stopped before its grace was over"
    );
    let status = baton.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let run_start = load.run_start();
    let report = load.stop();
    // Requests started during the grace (less a margin for the stop) all
    // succeed; after the master exits, the port is closed.
    let grace = Duration::ZERO..(sent - run_start) + GRACE - Duration::from_millis(200);
    let during = report.within(&[grace]);
    eprintln!(
        "during the grace: {} ok, {} failed",
        during.ok(),
        during.failed()
    );
    assert!(during.ok() > 100, "too little traffic: {}", during.ok());
    assert_eq!(during.failed(), 0, "{}", during.failures_summary());
}
