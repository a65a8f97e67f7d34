use baton_tests::harness::{
    assert_no_request_failed, config_with_worker, event_name, generation_in, hello_config, message,
    resetting_config, reuseport_listener, steady_load, wait_for_generation, wrapped_worker, Baton,
};
use baton_tests::load::Mode;
use std::time::Duration;

const RELOADS: u64 = 20;

/// ≥ 20 HUPs a few hundred ms apart under a closed-loop client: not one
/// request may fail, and the responses move from generation 1 to the last.
pub(crate) fn reloads_under_load_drop_nothing(config: &str, mode: Mode) {
    let mut baton = Baton::start(config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = steady_load(addr, mode);
    for _ in 0..RELOADS {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let last = RELOADS + 1;
    wait_for_generation(&load, last);
    std::thread::sleep(Duration::from_millis(200));
    let report = load.stop();
    assert_no_request_failed(&report, &format!("{mode:?} across {RELOADS} reloads"), last);
}

#[test]
fn hup_under_keepalive_load_fails_no_request() {
    reloads_under_load_drop_nothing(&hello_config(2), Mode::KeepAlive);
}

#[test]
fn hup_under_new_connection_load_fails_no_request() {
    reloads_under_load_drop_nothing(&hello_config(2), Mode::NewConnection);
}

/// Reloads that switch between SDK workers (on the listener's own socket)
/// and workers without the SDK (on sockets of their generation's own) hand
/// every connection over both ways.
#[test]
fn switching_between_sdk_and_wrapped_workers_under_new_connection_load_fails_no_request() {
    let configs = [hello_config(2), resetting_config()];
    let mut baton = Baton::start(&configs[0]);
    baton.wait_committed(1);
    let load = steady_load(baton.address("http"), Mode::NewConnection);
    const SWITCHES: u64 = 6;
    for switch in 1..=SWITCHES {
        baton.write_config(&configs[switch as usize % 2]);
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for_generation(&load, SWITCHES + 1);
    let report = load.stop();
    assert_no_request_failed(&report, "switching protocols", SWITCHES + 1);
}

/// Workers without the SDK that reset what they accept once told to stop:
/// each generation has a socket of its own, and the old one is signalled
/// only once nothing is queued for it.
#[test]
fn hup_under_new_connection_load_with_workers_that_reset_on_stop_fails_no_request() {
    reloads_under_load_drop_nothing(&resetting_config(), Mode::NewConnection);
}

/// Reloads to generation `number` and checks whether it shares the
/// listener's own socket (see `sockets` in `baton status --json`).
fn reload_sharing(baton: &mut Baton, number: u64, shared: bool) {
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let status = baton.status();
    let generation = generation_in(&status, number)
        .unwrap_or_else(|| panic!("no generation {number}: {status}"));
    let socket = &generation["sockets"][0];
    let listener = &status["listeners"][0]["fd"];
    assert_eq!(socket == listener, shared, "generation {number}: {status}");
    std::thread::sleep(Duration::from_millis(300));
}

/// Another process's socket joins the port: the master cannot know where the
/// kernel put it among the port's sockets, so while it is there the master
/// adds and removes none (new generations share the listener's own socket,
/// always first and so always steered to correctly) and never sends it a
/// connection; once it is gone, generations get sockets of their own again.
#[test]
fn a_strangers_socket_on_the_port_never_gets_a_connection_under_new_connection_load() {
    let config = config_with_worker(&wrapped_worker(
        &[],
        "processes = 2\ndrain_timeout = \"5s\"\n",
    ));
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = steady_load(addr, Mode::NewConnection);
    let stranger = reuseport_listener(addr);
    for generation in 2..=4 {
        reload_sharing(&mut baton, generation, true);
    }
    baton.wait_event(Duration::from_secs(5), |e| {
        message(e).starts_with("sockets this master does not know listen on the port")
    });
    drop(stranger);
    for generation in 5..=6 {
        reload_sharing(&mut baton, generation, false);
    }
    baton.wait_event(Duration::from_secs(5), |e| {
        message(e) == "the port's sockets are all this master's again"
    });
    wait_for_generation(&load, 6);
    let report = load.stop();
    assert_no_request_failed(&report, "a stranger on the port", 6);
}
