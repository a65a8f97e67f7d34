//! QUIC across reloads: with `quic = true`, a client's HTTP/3 connections
//! to `h3-app` keep their streams through every reload, each served to
//! its end by the generation that accepted it, while new connections go to
//! the newest generation.

use baton_tests::harness::{config_with_worker, event_name, Baton, Binaries, TempDir};
use bytes::Buf;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const RELOADS: u64 = 5;
/// Long-lived connections opened in each generation.
const PER_GENERATION: usize = 4;
/// Ticks each connection reads once every reload is done.
const TICKS_AFTER: u32 = 5;

/// A self-signed certificate for `localhost` in `dir`: its DER, and the
/// paths of its PEM files.
fn certificate(dir: &TempDir) -> (rustls::pki_types::CertificateDer<'static>, String, String) {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    let show = |p: std::path::PathBuf| p.display().to_string();
    (pair.cert.der().clone(), show(cert), show(key))
}

fn client_config(cert: rustls::pki_types::CertificateDer<'static>) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    // A connection that hears nothing for 5 s has failed (quinn's default
    // is 30 s): a steered one hears a tick every 100 ms.
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into().unwrap()));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    config
}

type Failure = String;

/// What a connection's generation was, or what failed.
type Outcome = Result<u64, Failure>;

/// The HTTP/3 code for a connection closed with nothing wrong.
const H3_NO_ERROR: u32 = 0x100;

/// An HTTP/3 connection from a client socket of its own (so that the
/// port's flow hash spreads connections over the workers).
async fn connect(
    address: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<
    (
        quinn::Endpoint,
        quinn::Connection,
        h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>,
    ),
    Failure,
> {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(config);
    let connection = endpoint
        .connect(address, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(connection.clone()))
        .await
        .map_err(|e| format!("h3: {e}"))?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    Ok((endpoint, connection, send))
}

/// Opens `GET path` and returns the stream and its generation header.
async fn get(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>,
    path: &str,
) -> Result<
    (
        h3::client::RequestStream<h3_quinn::BidiStream<bytes::Bytes>, bytes::Bytes>,
        u64,
    ),
    Failure,
> {
    let request = hyper::Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap();
    let mut stream = send
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    // A server that has answered already may stop reading the request
    // (STOP_SENDING) before the client says it has ended: what counts is the
    // response.
    let _ = stream.finish().await;
    let response = stream
        .recv_response()
        .await
        .map_err(|e| format!("response: {e}"))?;
    let generation = response
        .headers()
        .get("x-baton-generation")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or("no generation header")?;
    Ok((stream, generation))
}

/// One connection's long stream of ticks, read until `TICKS_AFTER` ticks
/// arrived after `done` was set: its generation, or what failed.
async fn long_stream(
    address: SocketAddr,
    config: quinn::ClientConfig,
    done: Arc<AtomicBool>,
    mut opened: Opened,
    migrate: bool,
) -> Result<u64, Failure> {
    let (endpoint, connection, mut send) = connect(address, config).await?;
    let (mut stream, generation) = get(&mut send, "/ticks/3000").await?;
    opened.done();
    let (mut next, mut after, mut line) = (0u32, 0u32, Vec::new());
    while after < TICKS_AFTER {
        let Some(mut chunk) = stream
            .recv_data()
            .await
            .map_err(|e| format!("tick {next}: {e}"))?
        else {
            return Err(format!("the stream ended after {next} ticks"));
        };
        while chunk.has_remaining() {
            let byte = chunk.get_u8();
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            let text = String::from_utf8_lossy(&std::mem::take(&mut line)).into_owned();
            let wanted = format!("generation {generation} tick {next}");
            if text != wanted {
                return Err(format!("got {text:?}, wanted {wanted:?}"));
            }
            next += 1;
            if migrate && next == 1 {
                // The client moves to another address and port (as a phone
                // switching networks does): the rest of the connection's
                // datagrams come from there.
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
                endpoint
                    .rebind(socket)
                    .map_err(|e| format!("rebind: {e}"))?;
            }
            if done.load(Ordering::SeqCst) {
                after += 1;
            }
        }
    }
    connection.close(H3_NO_ERROR.into(), b"done");
    endpoint.wait_idle().await;
    Ok(generation)
}

/// Counts a long stream as opened (answered, or failed) once.
struct Opened(Option<Arc<AtomicUsize>>);

impl Opened {
    fn done(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.done();
    }
}

/// A new connection's `GET /`: the generation that answered.
async fn fresh(address: SocketAddr, config: quinn::ClientConfig) -> Result<u64, Failure> {
    let (endpoint, connection, mut send) = connect(address, config).await?;
    let (mut stream, generation) = get(&mut send, "/").await?;
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    let wanted = format!("hello from generation {generation}\n");
    if body != wanted.as_bytes() {
        return Err(format!("answered {:?}", String::from_utf8_lossy(&body)));
    }
    connection.close(H3_NO_ERROR.into(), b"done");
    endpoint.wait_idle().await;
    Ok(generation)
}

/// `f`, or a failure after 3 minutes.
async fn bounded(
    f: impl std::future::Future<Output = Result<u64, Failure>>,
) -> Result<u64, Failure> {
    tokio::time::timeout(Duration::from_secs(180), f)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

/// How each new generation comes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// SIGHUP.
    Reload,
    /// SIGUSR2 with `upgrade = "exec"`: the master re-executes itself.
    InPlaceUpgrade,
    /// SIGUSR2: a new master process takes over (the old one lives on
    /// until its workers have drained).
    Upgrade,
}

/// Long streams opened in every generation across `RELOADS` reloads:
/// each one's generation or failure, and which generation answered a new
/// connection after each reload.
fn streams_across_reloads(quic: bool) -> (Vec<Outcome>, Vec<Outcome>) {
    streams_across(quic, Step::Reload, RELOADS)
}

/// `PER_GENERATION` long streams opened in every generation across `steps`
/// new generations, each come by `step`.
fn streams_across(quic: bool, step: Step, steps: u64) -> (Vec<Outcome>, Vec<Outcome>) {
    let steps: Vec<Step> = std::iter::repeat_n(step, steps as usize).collect();
    streams_across_steps(quic, &steps, |_| PER_GENERATION, false)
}

/// `opened(g)` long streams opened in each generation `g`, across a new
/// generation for each of `steps`: each stream's generation or failure,
/// and which generation answered a new connection after each step.
fn streams_across_steps(
    quic: bool,
    steps: &[Step],
    opened_in: impl Fn(u64) -> usize,
    migrate: bool,
) -> (Vec<Outcome>, Vec<Outcome>) {
    let certs = TempDir::new();
    let (cert, cert_path, key_path) = certificate(&certs);
    let config = format!(
        "{}\n[[listener]]\nname = \"h3\"\naddress = \"udp:127.0.0.1:0\"\nquic = {quic}\n",
        config_with_worker(&format!(
            "command = [{:?}, \"--cert\", {cert_path:?}, \"--key\", {key_path:?}]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"120s\"\n",
            Binaries::example("h3-app").display().to_string()
        ))
    );
    let config = match steps.contains(&Step::InPlaceUpgrade) {
        true => config.replace("[supervisor]\n", "[supervisor]\nupgrade = \"exec\"\n"),
        false => config,
    };
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let address = baton.address("h3");
    let client = client_config(cert);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    let mut fresh_answers = Vec::new();
    for generation in 1..=steps.len() as u64 + 1 {
        if generation > 1 {
            next_generation(&mut baton, steps[generation as usize - 2], generation);
        }
        fresh_answers.push(runtime.block_on(bounded(fresh(address, client.clone()))));
        for _ in 0..opened_in(generation) {
            let counted = Opened(Some(opened.clone()));
            let task = long_stream(address, client.clone(), done.clone(), counted, migrate);
            streams.push(runtime.spawn(bounded(task)));
        }
        // The generation's streams are open before the next one comes.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while opened.load(Ordering::SeqCst) < streams.len() {
            assert!(std::time::Instant::now() < deadline, "streams not opened");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Every stream has been open since its generation was current; each
    // reads a few more ticks now that all reloads are done.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    let streams = runtime.block_on(async {
        let mut results = Vec::new();
        for task in streams {
            results.push(task.await.unwrap());
        }
        results
    });
    if quic {
        // Its connections closed, a drained generation exits before its
        // deadline.
        baton.wait_generation_finished(1);
    }
    (streams, fresh_answers)
}

/// Brings generation `generation` by `step`, and waits until it serves.
fn next_generation(baton: &mut Baton, step: Step, generation: u64) {
    match step {
        Step::Reload => {
            // After an upgrade, the new master's.
            let outcome = baton.reload_current();
            assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        }
        Step::InPlaceUpgrade => {
            baton.signal_current(Signal::SIGUSR2);
            baton.wait_committed(generation);
        }
        Step::Upgrade => {
            let old = baton.master_pid().expect("a master");
            baton.signal_current(Signal::SIGUSR2);
            baton.wait_committed(generation);
            // The new master serves once the old one has handed over.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while baton.master_pid().is_none_or(|pid| pid == old) {
                assert!(std::time::Instant::now() < deadline, "no new master");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Asserts that no stream failed and that each was served, to its end, by
/// the generation current when it opened, as was each new connection.
fn assert_nothing_lost(what: &str, steps: u64, streams: Vec<Outcome>, fresh: Vec<Outcome>) {
    let wanted: Vec<u64> = (1..=steps + 1)
        .flat_map(|g| std::iter::repeat_n(g, PER_GENERATION))
        .collect();
    assert_served(what, steps, streams, fresh, wanted);
}

/// Asserts that no stream failed, that the streams were served, to their
/// ends, by the generations `wanted` lists, and that a new connection was
/// served by the newest generation after each of `steps`.
fn assert_served(
    what: &str,
    steps: u64,
    streams: Vec<Outcome>,
    fresh: Vec<Outcome>,
    wanted: Vec<u64>,
) {
    let failed: Vec<&Failure> = streams
        .iter()
        .chain(&fresh)
        .filter_map(|r| r.as_ref().err())
        .collect();
    eprintln!(
        "{what}: {} long streams, {} failed {failed:?}",
        streams.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{what}: {failed:?}");
    let generations: Vec<u64> = streams.into_iter().map(Result::unwrap).collect();
    assert_eq!(generations, wanted, "{what}");
    let fresh: Vec<u64> = fresh.into_iter().map(Result::unwrap).collect();
    assert_eq!(fresh, (1..=steps + 1).collect::<Vec<_>>(), "{what}");
}

#[test]
fn quic_connections_keep_their_streams_across_in_place_upgrades() {
    let (streams, fresh) = streams_across(true, Step::InPlaceUpgrade, 3);
    assert_nothing_lost("in-place upgrades", 3, streams, fresh);
}

/// Five child-mode upgrades in a row (USR2): each old master lives on
/// while its generation's streams do, its sockets still in the port's
/// group, steered to by their slots.
#[test]
fn quic_connections_keep_their_streams_across_upgrades() {
    let (streams, fresh) = streams_across(true, Step::Upgrade, 5);
    assert_nothing_lost("upgrades", 5, streams, fresh);
}

/// The figure: 50 connections opened in the first generation keep
/// their streams across 30 reloads and 5 binary upgrades of baton (USR2, a
/// new master each time, the first one living on with the connections'
/// generation), and every new connection after each lands on the newest
/// generation.
#[test]
fn fifty_quic_connections_keep_their_streams_across_30_reloads_and_5_upgrades() {
    let steps: Vec<Step> = (1..=35)
        .map(|i| match i % 7 {
            0 => Step::Upgrade,
            _ => Step::Reload,
        })
        .collect();
    let (streams, fresh) =
        streams_across_steps(true, &steps, |g| if g == 1 { 50 } else { 0 }, false);
    assert_served("30 reloads and 5 upgrades", 35, streams, fresh, vec![1; 50]);
}

/// Connection migration: a client that moves to another address and port
/// keeps reaching its worker (steering goes by connection ID, not by
/// address), across reloads too.
#[test]
fn migrated_quic_connections_keep_reaching_their_worker() {
    let steps = [Step::Reload, Step::Reload];
    let (streams, fresh) = streams_across_steps(true, &steps, |_| PER_GENERATION, true);
    assert_nothing_lost("migrated connections", 2, streams, fresh);
}

#[test]
fn quic_connections_keep_their_streams_across_reloads() {
    let (streams, fresh) = streams_across_reloads(true);
    assert_nothing_lost("reloads", RELOADS, streams, fresh);
}

#[test]
fn without_quic_steering_connections_break() {
    // The same workers on a UDP listener without `quic = true`: every
    // socket of the port is the listener's one, read by every worker of
    // every generation, so a datagram reaches whichever process reads
    // first, and QUIC connections fail. (A new connection's Initial that
    // reaches a draining worker gets no answer, and its next try may reach
    // a current one: three generations, so that some connection fails
    // whatever the order the workers read in.)
    let (streams, fresh) = streams_across(false, Step::Reload, 3);
    let failed = streams.iter().chain(&fresh).filter(|r| r.is_err()).count();
    eprintln!(
        "quic steering off: {} long streams and {} new connections, {failed} failed: {:?}",
        streams.len(),
        fresh.len(),
        streams
            .iter()
            .chain(&fresh)
            .filter_map(|r| r.as_ref().err())
            .collect::<Vec<_>>()
    );
    assert!(failed > 0, "no connection failed without steering");
}

/// A port number free for both TCP and UDP on 127.0.0.1 right now.
fn free_port_for_tcp_and_udp() -> u16 {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// `examples/h3/baton.toml` as shipped (but the port, and the binary's
/// path): HTTP/3 and, on the same port number, HTTP/1.1 that points at it
/// with `Alt-Svc`; both answer the new generation after a reload.
#[test]
fn the_h3_example_serves_http3_beside_tcp_on_the_same_port() {
    let example = baton_tests::tools::repository().join("examples/h3");
    let port = free_port_for_tcp_and_udp();
    let config = std::fs::read_to_string(example.join("baton.toml"))
        .unwrap()
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
        .replace(
            "../../target/release/examples/h3-app",
            &Binaries::example("h3-app").display().to_string(),
        )
        .replace("[supervisor]\n", "[supervisor]\nlog_format = \"json\"\n");
    let dir = TempDir::new();
    // The certificate, as the config's comment says to make it.
    let generated = std::process::Command::new(Binaries::example("h3-app"))
        .args(["--generate", "--cert", "cert.pem", "--key", "key.pem"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(generated.success());
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(
        first_pem_der(&cert).expect("a certificate in cert.pem"),
    );
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let tcp = baton.address("http");
    let udp = baton.address("h3");
    assert_eq!((tcp.port(), udp.port()), (port, port));
    let client = client_config(cert);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for generation in 1..=2 {
        if generation == 2 {
            let outcome = baton.reload();
            assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        }
        // The generations of an SDK worker share the TCP listening socket:
        // a worker of the last one that has not yet read its drain message
        // may still accept a connection or two. The new one answers soon.
        let mut tries = 0;
        let (status, headers, body) = loop {
            let stream = std::net::TcpStream::connect(tcp).unwrap();
            let answer = baton_tests::harness::exchange(stream, "/").unwrap();
            tries += 1;
            if answer.2 == format!("hello from generation {generation}\n") || tries == 50 {
                break answer;
            }
            assert_eq!(answer.2, "hello from generation 1\n");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status, 200);
        assert_eq!(body, format!("hello from generation {generation}\n"));
        assert!(
            headers
                .to_ascii_lowercase()
                .contains(&format!("alt-svc: h3=\":{port}\"")),
            "{headers}"
        );
        let answered = runtime.block_on(bounded(fresh(udp, client.clone())));
        assert_eq!(answered, Ok(generation));
    }
}

/// The DER of the first PEM block of `pem`.
fn first_pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

/// A canary on a QUIC port: during probation new connections split
/// between the canary and the standby generation by the client address's
/// flow; `baton promote` sends them all to the canary.
#[test]
fn a_canary_gets_a_share_of_new_quic_connections_until_promoted() {
    let certs = TempDir::new();
    let (cert, cert_path, key_path) = certificate(&certs);
    let config = format!(
        "{}\n[[listener]]\nname = \"h3\"\naddress = \"udp:127.0.0.1:0\"\nquic = true\n",
        config_with_worker(&format!(
            "command = [{:?}, \"--cert\", {cert_path:?}, \"--key\", {key_path:?}]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\nprobation = \"1h\"\ncanary = \"50%\"\n",
            Binaries::example("h3-app").display().to_string()
        ))
    );
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let address = baton.address("h3");
    let client = client_config(cert);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let generations = |n: usize| -> Vec<u64> {
        (0..n)
            .map(|_| {
                runtime
                    .block_on(bounded(fresh(address, client.clone())))
                    .unwrap()
            })
            .collect()
    };
    baton.signal(Signal::SIGHUP);
    baton.wait_event(Duration::from_secs(20), |e| {
        event_name(e) == "rollout.started"
    });
    let split = generations(24);
    let canary = split.iter().filter(|g| **g == 2).count();
    eprintln!("during the canary: {split:?}");
    assert!(
        split.iter().all(|g| *g == 1 || *g == 2) && canary > 0 && canary < split.len(),
        "new connections during a 50% canary: {split:?}"
    );
    let promoted = baton.cli(&["promote"]);
    assert!(promoted.status.success());
    let after = generations(8);
    assert!(after.iter().all(|g| *g == 2), "after promote: {after:?}");
}
