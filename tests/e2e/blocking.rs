//! `examples/blocking`: a std program without tokio, on the SDK's blocking
//! flavour, hands over at reloads and drains when the master dies.

use crate::reload_under_load::reloads_under_load_drop_nothing;
use baton_tests::harness::{alive, example_config, get, Baton, Binaries};
use baton_tests::load::Mode;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

fn blocking_config() -> String {
    example_config(&Binaries::example("blocking-app"), 2)
}

#[test]
fn blocking_worker_under_new_connection_load_fails_no_request_across_reloads() {
    reloads_under_load_drop_nothing(&blocking_config(), Mode::NewConnection);
}

#[test]
fn blocking_worker_drains_and_exits_when_the_master_is_killed_and_not_replaced() {
    // Without master restarts, the keeper lets go of the channels when the
    // master dies.
    let config = blocking_config().replace(
        "[supervisor]\n",
        "[supervisor]\nmaster_restarts = \"off\"\n",
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let (status, generation, _) = get(baton.address("http")).unwrap();
    assert_eq!((status, generation), (200, Some(1)));
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    baton.signal(Signal::SIGKILL);
    baton.wait_exit(Duration::from_secs(5));
    // The control channel's end of file starts the drain; nothing is in
    // flight, so the workers exit well before the 5 s drain timeout.
    let deadline = Instant::now() + Duration::from_secs(4);
    while workers.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "orphaned blocking workers survive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
