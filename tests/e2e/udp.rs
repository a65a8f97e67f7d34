//! UDP listeners are kept across reloads like TCP ones, for every protocol:
//! a datagram echo answers every request while generations change.

use baton_tests::harness::{config_with_worker, event_name, Baton, Binaries};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RELOADS: u64 = 5;

/// Closed-loop echo client: one datagram at a time, each waited for.
struct Client {
    stop: Arc<AtomicBool>,
    latest: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<(u64, u64, Vec<u64>)>,
}

impl Client {
    fn start(addr: SocketAddr) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, l, a) = (stop.clone(), latest.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.connect(addr).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let (mut lost, mut generations) = (0, Vec::new());
            let mut buffer = [0u8; 256];
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                let request = format!("n{n}");
                socket.send(request.as_bytes()).unwrap();
                // Skip late answers to requests already counted as lost.
                let answer = loop {
                    match socket.recv(&mut buffer) {
                        Ok(len) => {
                            let text = String::from_utf8_lossy(&buffer[..len]).into_owned();
                            if text.ends_with(&format!(": {request}")) {
                                break Some(text);
                            }
                        }
                        Err(_) => break None,
                    }
                };
                let Some(text) = answer else {
                    lost += 1;
                    continue;
                };
                let generation: u64 = text
                    .strip_prefix("gen ")
                    .and_then(|t| t.split(':').next())
                    .and_then(|g| g.parse().ok())
                    .unwrap_or_else(|| panic!("bad answer {text:?}"));
                if generations.last() != Some(&generation) {
                    generations.push(generation);
                }
                l.fetch_max(generation, Ordering::SeqCst);
                a.fetch_add(1, Ordering::SeqCst);
            }
            (a.load(Ordering::SeqCst), lost, generations)
        });
        Client {
            stop,
            latest,
            answered,
            thread,
        }
    }

    fn wait_generation(&self, generation: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.latest.load(Ordering::SeqCst) < generation {
            assert!(
                Instant::now() < deadline,
                "generation {generation} never answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn udp_answers_across_reloads(worker: &str) {
    let config = format!(
        "{}\n[[listener]]\nname = \"dns\"\naddress = \"udp:127.0.0.1:0\"\n",
        config_with_worker(worker)
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let client = Client::start(baton.address("dns"));
    client.wait_generation(1);
    for reload in 1..=RELOADS {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        client.wait_generation(reload + 1);
    }
    // The shared socket is read by old generations until they have stopped.
    for generation in 1..=RELOADS {
        baton.wait_generation_finished(generation);
    }
    let before = client.answered.load(Ordering::SeqCst);
    while client.answered.load(Ordering::SeqCst) < before + 50 {
        std::thread::sleep(Duration::from_millis(10));
    }
    client.stop.store(true, Ordering::SeqCst);
    let (answered, lost, generations) = client.thread.join().unwrap();
    // While a new generation waits to be ready, old and new both answer.
    let mut seen = generations.clone();
    seen.sort();
    seen.dedup();
    eprintln!(
        "udp: {answered} answered, {lost} lost, generations {seen:?} ({} switches)",
        generations.len() - 1
    );
    assert_eq!(lost, 0, "datagrams without an answer");
    assert_eq!(generations.first(), Some(&1));
    assert_eq!(generations.last(), Some(&(RELOADS + 1)));
}

#[test]
fn udp_listener_keeps_answering_across_reloads_sdk() {
    udp_answers_across_reloads(&format!(
        "command = [{:?}, \"udp-echo\", \"dns\"]\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::testworker().display().to_string()
    ));
}

#[test]
fn udp_listener_keeps_answering_across_reloads_systemd() {
    // Listeners in config order: http on fd 3, dns on fd 4.
    udp_answers_across_reloads(&format!(
        "command = [{:?}, \"--fd\", \"4\"]\nprotocol = \"systemd\"\nready = \"notify\"\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::wrapped().display().to_string()
    ));
}

#[test]
fn udp_listener_keeps_answering_across_reloads_args() {
    udp_answers_across_reloads(&format!(
        "command = [{:?}, \"--fd\", \"{{fd:dns}}\"]\nprotocol = \"args\"\nready = \"delay:100ms\"\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::wrapped().display().to_string()
    ));
}
