//! HTTP/2 through the SDK: `hello` speaks h2c, and h2load's connections,
//! opened all along, cross reloads and upgrades of the master without one
//! failed stream.

use baton_tests::h2load::Load;
use baton_tests::harness::{get, hello_config, Baton};
use baton_tests::tools::require;
use nix::sys::signal::{kill, Signal};
use std::time::Duration;

/// New connections every 100 ms, and the streams each opens at once.
const CONNECTIONS: u32 = 8;
const STREAMS: u32 = 4;

fn h2load() -> Option<std::path::PathBuf> {
    require("h2load", "apt-get install nghttp2-client")
}

/// Stops `load` and asserts h2load counted no failed, errored or timed-out
/// request and no error status.
fn assert_clean(load: Load, what: &str) {
    let summary = load
        .stop()
        .unwrap_or_else(|output| panic!("h2load: {output}"));
    eprintln!("{what}: {summary:?}");
    assert!(
        summary.done > 500,
        "too little traffic to mean anything: {summary:?}"
    );
    assert!(summary.clean(), "{what}: {summary:?}");
}

#[test]
fn hup_under_http2_load_fails_no_stream() {
    const RELOADS: u64 = 30;
    let Some(h2load) = h2load() else { return };
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = Load::start(h2load, addr, CONNECTIONS, STREAMS);
    baton.reload_times(RELOADS, Duration::from_millis(150));
    assert_clean(load, &format!("h2load across {RELOADS} reloads"));
    assert_eq!(get(addr).unwrap().1, Some(RELOADS + 1));
}

#[test]
fn usr2_under_http2_load_fails_no_stream() {
    const UPGRADES: usize = 10;
    let Some(h2load) = h2load() else { return };
    let baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = Load::start(h2load, addr, CONNECTIONS, STREAMS);
    let mut master = baton.pid();
    for _ in 0..UPGRADES {
        kill(master, Signal::SIGUSR2).unwrap();
        master = baton.wait_new_master(master, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_clean(load, &format!("h2load across {UPGRADES} upgrades"));
    assert_eq!(get(addr).unwrap().1, Some(UPGRADES as u64 + 1));
}
