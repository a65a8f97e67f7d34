//! A worker that misbehaves on purpose, for the end-to-end tests.
//!
//! `testworker MODE [DIR]`:
//! - `never-ready`: takes its listeners, never reports ready, exits on drain.
//! - `ignore-drain`: reports ready, then ignores drain (the master must kill it).
//! - `dump-listeners DIR`: writes the listeners it received, checked, to
//!   `DIR/worker-GEN-INDEX.json`, reports ready, appends a line to
//!   `DIR/reopened-GEN-INDEX` per reopen request, exits on drain.
//! - `wrong-version`: speaks protocol version 99 on the control channel,
//!   then waits to be stopped.
//! - `http [SECS]`: answers every HTTP request on listener `http` with its
//!   generation (one request per connection), until told to drain; with
//!   SECS, worker 0 exits with status 1 that long after it reported ready,
//!   between two requests (a release that crashes).
//! - `app`: registers a reload handle for its one app config file, lines of
//!   `key = value`: `rate` (a number; 0 is refused), `refuse_worker = N`
//!   (worker N refuses), `hang_worker = N` (worker N's parser never
//!   returns), `exit_worker = N` (worker N exits 50 ms after it prepared a
//!   reload; not at its start).
//!   Answers every HTTP request with `x-config-version`, `x-traceparent`
//!   (the SDK's `Worker::traceparent`, `-` when none) and
//!   `rate=RATE version=VERSION pid=PID`, one request per connection, and
//!   logs `served` at info level through the SDK's log setup, whose filter
//!   is `[worker] log_filter`.
//! - `garbage`: reports ready, then sends undecodable bytes on its control
//!   channel as fast as it can, until the master closes it.
//! - `udp-echo NAME`: answers each datagram on UDP listener NAME with
//!   `gen GENERATION: ` and the datagram, until told to drain.
//! - `slow-http MS`: serves HTTP on listener `http` with the SDK's `serve`
//!   (which finishes requests in flight when draining); `/slow` answers
//!   after MS milliseconds, anything else at once, with `x-baton-generation`.

use baton_worker::Worker;
use std::io::Write;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    if mode == "wrong-version" {
        return wrong_version().await;
    }
    let mut worker = match Worker::from_env().await {
        Ok(worker) => worker,
        Err(e) => {
            eprintln!("testworker: {e}");
            std::process::exit(1);
        }
    };
    let drain = worker.drain();
    match mode {
        "never-ready" => {
            drain.wait().await;
        }
        "ignore-drain" => {
            worker.ready().await.expect("ready");
            drain.wait().await;
            // Ignore the drain: keep running until killed.
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
        "dump-listeners" => {
            let dir = args.get(1).expect("dump-listeners DIR");
            let names: Vec<String> = worker.listeners().map(|l| l.name.clone()).collect();
            let mut entries = Vec::new();
            for name in names {
                let (info, _fd) = worker.take_fd(&name).expect("listener");
                entries.push(serde_json::json!({
                    "name": info.name, "kind": info.kind.to_string(), "address": info.address,
                }));
            }
            let path = format!(
                "{dir}/worker-{}-{}.json",
                worker.generation(),
                worker.index()
            );
            let tmp = format!("{path}.tmp");
            let mut file = std::fs::File::create(&tmp).expect("create");
            file.write_all(serde_json::Value::Array(entries).to_string().as_bytes())
                .expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
            worker.ready().await.expect("ready");
            // Each reopen request appends a line to DIR/reopened-GEN-INDEX.
            let reopened = format!("{dir}/reopened-{}-{}", worker.generation(), worker.index());
            let mut reopen = worker.reopen();
            loop {
                tokio::select! {
                    _ = drain.wait() => break,
                    more = reopen.requested() => {
                        if !more { break }
                        let mut file = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&reopened)
                            .expect("open");
                        file.write_all(b"reopen\n").expect("write");
                    }
                }
            }
        }
        "http" => {
            let listener = worker.tcp_listener("http").expect("listener http");
            worker.ready().await.expect("ready");
            let exit_at = args.get(1).filter(|_| worker.index() == 0).map(|s| {
                tokio::time::Instant::now() + Duration::from_secs_f64(s.parse().expect("SECS"))
            });
            let generation = worker.generation();
            loop {
                let crash = async {
                    match exit_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = drain.wait() => break,
                    _ = crash => {
                        eprintln!("testworker: exiting with status 1 as asked");
                        std::process::exit(1);
                    }
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        // Answered in hand: a crash waits for it.
                        answer(stream, generation).await;
                    }
                }
            }
        }
        "app" => {
            let index = worker.index();
            baton_worker::logging::init(&mut worker).expect("log setup");
            let config = worker
                .app_config(move |files| parse_app(files, index))
                .expect("app config");
            let listener = worker.tcp_listener("http").expect("listener http");
            worker.ready().await.expect("ready");
            let generation = worker.generation();
            let traceparent = worker.traceparent().unwrap_or("-").to_string();
            loop {
                tokio::select! {
                    biased;
                    _ = drain.wait() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (app, version) = config.load_versioned();
                        tracing::info!(%version, "served");
                        let body = format!("rate={} version={version} pid={}\n", app.rate, std::process::id());
                        let headers = [("x-config-version", version.as_str()), ("x-traceparent", &traceparent)];
                        respond(stream, generation, &headers, &body).await;
                    }
                }
            }
        }
        "garbage" => {
            worker.ready().await.expect("ready");
            let fd: i32 = std::env::var("BATON_CONTROL_FD")
                .expect("BATON_CONTROL_FD")
                .parse()
                .expect("fd number");
            for _ in 0..10_000_000 {
                let sent = nix::sys::socket::send(
                    fd,
                    b"\xff not a message",
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                );
                match sent {
                    Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                    Err(_) => break,
                }
            }
            drain.wait().await;
        }
        "udp-echo" => {
            let name = args.get(1).expect("udp-echo NAME");
            let socket = worker.udp_socket(name).expect("udp listener");
            worker.ready().await.expect("ready");
            let prefix = format!("gen {}: ", worker.generation());
            let mut buffer = [0u8; 2048];
            loop {
                tokio::select! {
                    _ = drain.wait() => break,
                    received = socket.recv_from(&mut buffer) => {
                        let (n, peer) = received.expect("recv");
                        let mut reply = prefix.clone().into_bytes();
                        reply.extend_from_slice(&buffer[..n]);
                        let _ = socket.send_to(&reply, peer).await;
                    }
                }
            }
        }
        "slow-http" => {
            let delay: u64 = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .expect("slow-http MS");
            slow_http(worker, Duration::from_millis(delay)).await;
        }
        other => {
            eprintln!("testworker: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}

/// The `app` mode's configuration.
struct App {
    rate: u64,
}

/// How many times `parse_app` ran: the first is the worker's start.
static PARSES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn parse_app(files: &baton_worker::Files, index: u32) -> Result<App, String> {
    let reload = PARSES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0;
    let text = files.only_text()?;
    let mut rate = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?}: expected key = value"))?;
        let (key, value) = (key.trim(), value.trim());
        let mine = value.parse::<u32>().ok() == Some(index);
        match key {
            "rate" => rate = Some(value.parse::<u64>().map_err(|e| format!("rate: {e}"))?),
            "refuse_worker" if mine => return Err(format!("worker {index} refuses this config")),
            "hang_worker" if mine => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "exit_worker" if mine && reload => {
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(50));
                    std::process::exit(3);
                });
            }
            _ => {}
        }
    }
    match rate {
        Some(0) => Err("rate must be > 0".into()),
        Some(rate) => Ok(App { rate }),
        None => Err("rate is missing".into()),
    }
}

/// Reads one request head and answers it with the generation.
async fn answer(stream: tokio::net::TcpStream, generation: u64) {
    let body = format!("testworker generation {generation}\n");
    respond(stream, generation, &[], &body).await;
}

/// Reads one request head and answers `body` with the generation and
/// `headers`.
async fn respond(
    mut stream: tokio::net::TcpStream,
    generation: u64,
    headers: &[(&str, &str)],
    body: &str,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let response = format!(
        "HTTP/1.1 200 OK\r\nx-baton-generation: {generation}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// Answers the master in a protocol version it does not speak.
async fn wrong_version() {
    let fd: i32 = std::env::var("BATON_CONTROL_FD")
        .expect("BATON_CONTROL_FD")
        .parse()
        .expect("fd number");
    nix::sys::socket::send(
        fd,
        br#"{"v":99,"type":"ready"}"#,
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("send");
    tokio::time::sleep(Duration::from_secs(30)).await;
}

/// Serves `/slow` after `delay` and everything else at once, until drained.
async fn slow_http(mut worker: Worker, delay: Duration) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = worker.tcp_listener("http").expect("listener http");
    let generation = worker.generation();
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| async move {
        if request.uri().path() == "/slow" {
            tokio::time::sleep(delay).await;
        }
        let mut response = hyper::Response::new(Full::new(Bytes::from("done\n")));
        response
            .headers_mut()
            .insert("x-baton-generation", generation.into());
        Ok::<_, std::convert::Infallible>(response)
    });
    worker.ready().await.expect("ready");
    let drain = worker.drain();
    baton_worker::http::serve(listener, service, drain, Default::default())
        .await
        .expect("serve");
}
