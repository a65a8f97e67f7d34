//! Reloads that close no connection: a draining SDK worker hands each idle
//! HTTP/1.1 keep-alive connection to the current generation, and where that
//! cannot be (handover off, no worker able to take it) closes it between
//! requests as before, failing nothing.

use baton_tests::harness::{
    config_with_worker, event_name, field, hello_config, wrapped_worker, Baton, Binaries,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Keep-alive connections held across the reloads: half busy, half idle.
const CONNECTIONS: usize = 200;

/// HUPs in the main test.
const RELOADS: u64 = 20;

/// What the clients saw, each thing counted once.
#[derive(Default)]
struct Tally {
    /// TCP connects, first ones included.
    connects: AtomicU64,
    /// Requests answered 200.
    ok: AtomicU64,
    /// Requests not answered, or answered otherwise.
    failed: AtomicU64,
    /// Connections the server ended without the client asking: end of file
    /// or a reset, whether or not a `Connection: close` came first.
    closed_by_server: AtomicU64,
    /// Responses saying `Connection: close`.
    told_to_close: AtomicU64,
    /// The highest generation that answered.
    newest: AtomicU64,
}

/// One response: status, `Connection: close`, generation.
type Reply = (u16, bool, Option<u64>);

/// Sends `GET /` and reads the response on `stream`.
fn request(stream: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: handover\r\n\r\n")?;
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut length, mut close, mut generation) = (0usize, false, None);
    loop {
        line.clear();
        if stream.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "connection" => close |= value.eq_ignore_ascii_case("close"),
            "x-baton-generation" => generation = value.parse().ok(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok((status, close, generation))
}

/// Whether the server has closed `stream`'s connection (peeked, without
/// waiting).
fn closed(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).ok();
    let gone = matches!(stream.peek(&mut [0]), Ok(0))
        || matches!(stream.peek(&mut [0]), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).ok();
    gone
}

/// A client holding one keep-alive connection until `stop`: busy ones ask
/// again at once, idle ones wait `idle` between requests. It counts every
/// connect and every close it did not start, and reconnects only then.
fn client(
    addr: SocketAddr,
    idle: Option<Duration>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let connect = || {
            tally.connects.fetch_add(1, Ordering::Relaxed);
            let stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            BufReader::new(stream)
        };
        let mut stream = connect();
        while !stop.load(Ordering::Relaxed) {
            if let Some(idle) = idle {
                std::thread::sleep(idle);
                if closed(stream.get_ref()) {
                    tally.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    stream = connect();
                }
            }
            match request(&mut stream) {
                Ok((200, close, generation)) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    tally
                        .newest
                        .fetch_max(generation.unwrap_or(0), Ordering::Relaxed);
                    if close {
                        tally.told_to_close.fetch_add(1, Ordering::Relaxed);
                        tally.closed_by_server.fetch_add(1, Ordering::Relaxed);
                        stream = connect();
                    }
                }
                Ok(_) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    tally.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    stream = connect();
                }
            }
        }
    })
}

/// `connections` clients on `addr`, half of them idle for 0.2 to 1.4 s
/// between requests.
struct Clients {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    fn start(addr: SocketAddr, connections: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let threads = (0..connections)
            .map(|i| {
                let idle =
                    (i % 2 == 1).then(|| Duration::from_millis(200 + (i as u64 * 37) % 1200));
                client(addr, idle, stop.clone(), tally.clone())
            })
            .collect();
        let clients = Clients {
            stop,
            tally,
            threads,
        };
        clients.wait_ok(connections as u64);
        clients
    }

    /// Waits until `n` requests were answered in all.
    fn wait_ok(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.tally.ok.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "clients never got {n} answers");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until generation `n` has answered.
    fn wait_generation(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.tally.newest.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "generation {n} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("client thread");
        }
        self.tally
    }
}

/// The connections the master logged as handed over.
fn handed_over(baton: &Baton) -> u64 {
    baton
        .events(|e| event_name(e) == "connections.handed_over")
        .iter()
        .map(|e| field(e, "connections").parse::<u64>().unwrap_or(0))
        .sum()
}

#[test]
fn keep_alive_connections_survive_reloads_without_a_close() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let clients = Clients::start(baton.address("http"), CONNECTIONS);
    for _ in 0..RELOADS {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        std::thread::sleep(Duration::from_millis(250));
    }
    clients.wait_generation(RELOADS + 1);
    // Every idle client asks again after its pause: each has reached the last
    // generation over the connection it always had.
    std::thread::sleep(Duration::from_millis(1500));
    let tally = clients.stop();
    let (failed, closed, connects) = (
        tally.failed.load(Ordering::Relaxed),
        tally.closed_by_server.load(Ordering::Relaxed),
        tally.connects.load(Ordering::Relaxed),
    );
    assert_eq!(
        (failed, closed, connects),
        (0, 0, CONNECTIONS as u64),
        "failed, closed by the server, connects across {RELOADS} reloads ({} answered)",
        tally.ok.load(Ordering::Relaxed)
    );
    assert!(
        handed_over(&baton) >= CONNECTIONS as u64,
        "every reload moved connections"
    );
}

/// Runs `clients` keep-alive connections on generation 1 of `first`, reloads
/// to `second` twice, and returns what they saw.
fn across_reloads(first: &str, second: &str, clients: usize) -> (Baton, Arc<Tally>) {
    let mut baton = Baton::start(first);
    baton.wait_committed(1);
    let load = Clients::start(baton.address("http"), clients);
    baton.write_config(second);
    for _ in 0..2 {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        std::thread::sleep(Duration::from_millis(300));
    }
    load.wait_generation(3);
    std::thread::sleep(Duration::from_millis(1500));
    (baton, load.stop())
}

/// The fallback: nothing failed, and connections were closed (between
/// requests) instead of moving.
fn assert_closed_as_before(baton: &Baton, tally: &Tally, what: &str) {
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "{what}: failed requests"
    );
    assert!(
        tally.connects.load(Ordering::Relaxed) > 20,
        "{what}: the connections were closed and reopened"
    );
    assert_eq!(handed_over(baton), 0, "{what}: nothing was handed over");
}

#[test]
fn with_handover_off_connections_close_between_requests_as_before() {
    let config = hello_config(2).replace("[worker]\n", "[worker]\nhandover = false\n");
    let (baton, tally) = across_reloads(&config, &config, 20);
    assert_closed_as_before(&baton, &tally, "handover = false");
}

#[test]
fn connections_nobody_takes_close_between_requests_as_before() {
    // The new generation's SDK workers (the blocking SDK) take no
    // connections: every handover is refused.
    let blocking = config_with_worker(&format!(
        "command = [{:?}]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::example("blocking-app").display().to_string()
    ));
    let (baton, tally) = across_reloads(&hello_config(2), &blocking, 20);
    assert_closed_as_before(&baton, &tally, "a generation that takes none");
    let refused = baton.count_events(|e| event_name(e) == "connections.handover_refused");
    assert!(refused > 0, "the master refused the handovers");
}

#[test]
fn connections_to_a_wrapped_generation_close_between_requests_as_before() {
    let wrapped = config_with_worker(&wrapped_worker(&[], "drain_timeout = \"5s\"\n"));
    let (baton, tally) = across_reloads(&hello_config(2), &wrapped, 20);
    assert_closed_as_before(&baton, &tally, "a wrapped generation");
}

#[test]
fn a_reload_traces_its_handover_and_the_drained_generation_counts_its_moves() {
    let receiver = baton_tests::otlp::Receiver::start();
    let config = hello_config(2).replace(
        "[supervisor]\n",
        &format!("[supervisor]\notlp_endpoint = {:?}\n", receiver.endpoint()),
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let clients = Clients::start(baton.address("http"), 10);
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let finished = baton.wait_generation_finished(1);
    let tally = clients.stop();
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0);
    let moved: u64 = field(&finished, "handed_over").parse().unwrap();
    assert!(moved >= 10, "every connection moved: {finished}");
    assert_eq!(field(&finished, "closed_at_drain"), "0", "{finished}");
    // `baton status` says the same.
    let status = baton.status();
    assert_eq!(status["last_drained"]["generation"], 1, "{status}");
    assert_eq!(status["last_drained"]["handed_over"], moved, "{status}");
    assert_eq!(status["last_drained"]["closed_at_drain"], 0, "{status}");
    let text = String::from_utf8(baton.cli(&["status"]).stdout).unwrap();
    assert!(
        text.contains(&format!(
            "drained  generation 1: {moved} connection(s) handed to a newer generation, 0 closed at the drain"
        )),
        "{text}"
    );
    // A graceful stop flushes what is batched.
    baton.signal(nix::sys::signal::Signal::SIGQUIT);
    baton.wait_exit(Duration::from_secs(15));
    let spans = receiver.wait(Duration::from_secs(10), |spans| {
        spans.iter().any(|s| s.name == "handover")
    });
    let handover = spans.iter().find(|s| s.name == "handover").unwrap();
    let reload = spans
        .iter()
        .find(|s| s.span_id == handover.parent_span_id)
        .unwrap_or_else(|| panic!("the handover span's parent: {spans:#?}"));
    assert_eq!(reload.name, "reload");
}

#[test]
fn in_place_upgrades_hand_connections_over_too() {
    let config = hello_config(2).replace("[supervisor]\n", "[supervisor]\nupgrade = \"exec\"\n");
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    const CLIENTS: usize = 40;
    let clients = Clients::start(baton.address("http"), CLIENTS);
    for generation in 2..=4u64 {
        let workers = baton.wait_workers(2, &[], Duration::from_secs(10));
        baton.skip_log();
        baton.signal(nix::sys::signal::Signal::SIGUSR2);
        let committed = baton.wait_committed(generation);
        assert_eq!(committed["span"]["trigger"], "upgrade");
        baton.wait_workers(2, &workers, Duration::from_secs(10));
    }
    clients.wait_generation(4);
    std::thread::sleep(Duration::from_millis(1500));
    let tally = clients.stop();
    let (failed, closed, connects) = (
        tally.failed.load(Ordering::Relaxed),
        tally.closed_by_server.load(Ordering::Relaxed),
        tally.connects.load(Ordering::Relaxed),
    );
    assert_eq!(
        (failed, closed, connects),
        (0, 0, CLIENTS as u64),
        "failed, closed by the server, connects across 3 in-place upgrades"
    );
}

#[test]
fn upgrades_hand_connections_to_the_new_masters_generation() {
    let baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    const CLIENTS: usize = 40;
    const UPGRADES: u64 = 5;
    let clients = Clients::start(baton.address("http"), CLIENTS);
    let mut master = baton.pid();
    for _ in 0..UPGRADES {
        nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGUSR2).unwrap();
        master = baton.wait_new_master(master, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
    }
    clients.wait_generation(UPGRADES + 1);
    std::thread::sleep(Duration::from_millis(1500));
    let tally = clients.stop();
    let (failed, closed, connects) = (
        tally.failed.load(Ordering::Relaxed),
        tally.closed_by_server.load(Ordering::Relaxed),
        tally.connects.load(Ordering::Relaxed),
    );
    assert_eq!(
        (failed, closed, connects),
        (0, 0, CLIENTS as u64),
        "failed, closed by the server, connects across {UPGRADES} upgrades"
    );
}

#[test]
fn a_new_generation_with_handover_off_takes_none() {
    let off = hello_config(2).replace("[worker]\n", "[worker]\nhandover = false\n");
    let (baton, tally) = across_reloads(&hello_config(2), &off, 20);
    assert_closed_as_before(&baton, &tally, "a new generation with handover = false");
    let refused = baton.count_events(|e| {
        event_name(e) == "connections.handover_refused" && field(e, "reason").contains("handover")
    });
    assert!(refused > 0, "the master refused generation 1's handovers");
}
