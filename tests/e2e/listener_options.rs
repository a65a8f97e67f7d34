//! `[[listener]]` options: every `backlog` from 1 to 65535 binds (the kernel
//! caps it at `net.core.somaxconn`), `nodelay` (on by default) reaches the
//! connections a server accepts, and a listener that cannot be bound is
//! named in the error with its address.

use baton_tests::harness::{
    config_with_worker, event_name, exchange, field, message, wrapped_worker, Baton, TempDir,
};
use std::net::SocketAddr;
use std::time::Duration;

/// One `wrapped` worker (no SDK) on listener `http`, with `options` added
/// to the listener.
fn wrapped_with(options: &str) -> String {
    config_with_worker(&wrapped_worker(&[], "drain_timeout = \"5s\"\n")).replace(
        "address = \"127.0.0.1:0\"\n",
        &format!("address = \"127.0.0.1:0\"\n{options}"),
    )
}

/// `GET /` on a new connection: the status and the `x-tcp-nodelay` the
/// `wrapped` worker saw on it.
fn get_nodelay(addr: SocketAddr) -> (u16, String) {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (status, head, _) = exchange(stream, "/").unwrap();
    let nodelay = head
        .lines()
        .find_map(|l| l.strip_prefix("x-tcp-nodelay: "))
        .unwrap_or_else(|| panic!("no x-tcp-nodelay in {head:?}"));
    (status, nodelay.to_string())
}

/// Backlogs from 4096 up were refused by the bind (`EINVAL`, naming no
/// listener) though the config accepted them.
#[test]
fn a_listener_with_backlog_65535_serves_and_reloads_change_its_backlog_in_place() {
    let mut baton = Baton::start(&wrapped_with("backlog = 65535\n"));
    baton.wait_committed(1);
    let addr = baton.address("http");
    assert_eq!(get_nodelay(addr).0, 200);
    for backlog in [1024, 4096, 65535] {
        baton.write_config(&wrapped_with(&format!("backlog = {backlog}\n")));
        let outcome = baton.reload();
        assert_eq!(
            message(&outcome),
            "reload committed",
            "{backlog}: {outcome}"
        );
        assert_eq!(get_nodelay(addr).0, 200, "{backlog}");
    }
}

/// A listener whose address is taken: the start, and a reload that adds
/// it, fail with an error that names the listener and its address.
#[test]
fn a_bind_error_names_the_listener_and_its_address() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let with_taken = wrapped_with("").replace(
        "\n[worker]\n",
        &format!("\n[[listener]]\nname = \"taken\"\naddress = \"{taken}\"\n\n[worker]\n"),
    );
    let named = format!("binding listener `taken` on {taken}: ");

    // At start: the master exits, saying so.
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), &with_taken).unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let failed = baton.wait_event(Duration::from_secs(1), |e| event_name(e) == "reload.failed");
    assert_eq!(field(&failed, "phase"), "bind", "{failed}");
    assert!(field(&failed, "reason").contains(&named), "{failed}");

    // At a reload: it fails in phase bind, and the old listener serves on.
    let mut baton = Baton::start(&wrapped_with(""));
    baton.wait_committed(1);
    let addr = baton.address("http");
    baton.write_config(&with_taken);
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.failed", "{outcome}");
    assert_eq!(field(&outcome, "phase"), "bind", "{outcome}");
    assert!(field(&outcome, "reason").contains(&named), "{outcome}");
    assert_eq!(get_nodelay(addr).0, 200);
    drop(holder);
}

/// uvicorn's `--fd` takes the socket for a Unix one and never sets
/// `TCP_NODELAY`: Nagle's algorithm held every response of a keep-alive
/// connection ~40 ms. Listening sockets carry it, so the connections a
/// server accepts have it, unless `nodelay = false`; a reload that changes
/// it applies to new connections.
#[test]
fn accepted_connections_have_tcp_nodelay_unless_the_listener_turns_it_off() {
    let mut baton = Baton::start(&wrapped_with(""));
    baton.wait_committed(1);
    let addr = baton.address("http");
    assert_eq!(get_nodelay(addr), (200, "true".into()), "by default");
    baton.write_config(&wrapped_with("nodelay = false\n"));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(get_nodelay(addr), (200, "false".into()), "nodelay = false");
    baton.write_config(&wrapped_with("nodelay = true\n"));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(get_nodelay(addr), (200, "true".into()), "nodelay = true");
}

/// Started with `nodelay = false`, the connections have Nagle's algorithm.
#[test]
fn a_listener_started_with_nodelay_false_leaves_nagle_on() {
    let baton = Baton::start(&wrapped_with("nodelay = false\n"));
    baton.wait_committed(1);
    let addr = baton.address("http");
    assert_eq!(get_nodelay(addr), (200, "false".into()));
}
