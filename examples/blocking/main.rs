//! `blocking-app`: a plain std HTTP/1.1 server, a thread per connection and
//! no async runtime, under baton through `baton_worker::blocking`.
//!
//! ```text
//! blocking-app [--listen ADDR]
//! ```
//!
//! Every response says `hello from generation N` and closes its connection
//! (`Connection: close`), so nothing is ever idle on a keep-alive connection
//! when the worker drains. On drain it stops accepting (the next generation
//! accepts from the same socket), lets the connections in flight finish
//! until the deadline, and exits.

use baton_worker::blocking::Worker;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle accept loop sleeps, waking at once on drain.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A std HTTP/1.1 server under baton, without tokio.
#[derive(clap::Parser)]
struct Args {
    /// The address to bind when run without baton.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

/// Reads one request head and answers it.
fn answer(stream: TcpStream, generation: u64) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let body = format!("hello from generation {generation}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\
         x-baton-generation: {generation}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    (&stream).write_all(response.as_bytes())?;
    (&stream).flush()
}

fn run(listen: String) -> Result<(), baton_worker::Error> {
    let mut worker = Worker::builder().listener("http", listen).start()?;
    // Non-blocking, as the SDK hands it out: the drain is noticed between
    // accepts.
    let listener = worker.tcp_listener("http")?;
    worker.ready()?;
    let generation = worker.generation();
    let drain = worker.drain();
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    let mut reported = 0;
    while !drain.is_draining() {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                connections.push(std::thread::spawn(move || {
                    let _ = answer(stream, generation);
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                drain.wait_timeout(ACCEPT_POLL);
            }
            // One connection that died in the queue, or a passing shortage
            // of fds: the next accept may work.
            Err(_) => {
                drain.wait_timeout(ACCEPT_POLL);
            }
        }
        connections.retain(|c| !c.is_finished());
        if connections.len() != reported {
            reported = connections.len();
            worker.report_connections(reported as u64);
        }
    }
    // Other generations accept from the same socket; this one stops now.
    drop(listener);
    let deadline = drain.deadline().unwrap_or_else(Instant::now);
    while connections.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(ACCEPT_POLL);
    }
    // Whatever is still running is cut when the process exits.
    Ok(())
}

fn main() -> ExitCode {
    let listen = <Args as clap::Parser>::parse().listen;
    match run(listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("blocking-app: {error}");
            ExitCode::FAILURE
        }
    }
}
