//! A master with hundreds of listeners makes a generation's sockets and
//! lets go of a finished generation's a chunk of ports per turn of its
//! loop: every port must still get its socket, be steered, and be tidied.

use baton_tests::harness::{event_name, get, Baton, Binaries, TempDir};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Several chunks of the master's bind and tidy steps (64 ports each).
const LISTENERS: usize = 300;

/// `wrapped` on the last listener's fd, with `LISTENERS` listeners.
fn config() -> String {
    let mut text = format!(
        "[supervisor]\npid_file = \"baton.pid\"\nlog_format = \"json\"\nlog_filter = \"info\"\n\n\
         [worker]\ncommand = [{:?}, \"--fd\", \"{}\"]\nprotocol = \"systemd\"\nready = \"notify\"\n\
         ready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::wrapped().display().to_string(),
        3 + LISTENERS - 1
    );
    for i in 0..LISTENERS {
        text.push_str(&format!(
            "\n[[listener]]\nname = \"l{i}\"\naddress = \"127.0.0.1:0\"\n"
        ));
    }
    text
}

/// How many sockets listen on `port` (from `/proc/net/tcp`).
fn listening_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "0A"
        })
        .count()
}

/// Waits (bounded) until at most `most` sockets listen on `addr`'s port.
fn wait_at_most(addr: SocketAddr, most: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while listening_on(addr.port()) > most {
        assert!(
            Instant::now() < deadline,
            "{} sockets still listen on {addr}",
            listening_on(addr.port())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hundreds_of_listeners_are_bound_steered_and_tidied_on_every_port() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config()).unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let first = baton.address("l0");
    let last = baton.address(&format!("l{}", LISTENERS - 1));
    for generation in 2..=4 {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        baton.wait_generation_finished(generation - 1);
        for i in 0..16 {
            match get(last) {
                Ok((200, Some(g), _)) if g == generation => {}
                other => panic!("request {i} after the reload to {generation}: {other:?}"),
            }
        }
        // The listener's own socket, the serving generation's, and at most
        // one the serving one is still in front of: on the first port and
        // on the last, whichever chunk it was tidied in.
        wait_at_most(first, 3);
        wait_at_most(last, 3);
    }
}
