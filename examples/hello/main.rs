//! `hello`: the bundled example worker. Answers every request with
//! `hello from generation N`, so a client watching the body sees reloads.
//!
//! ```text
//! hello [--listen ADDR] [--greeting WORD]
//! ```
//!
//! Under baton it serves the master's listener `http`; standalone it binds
//! `--listen` (default 127.0.0.1:8080) and drains on SIGTERM or SIGINT. It
//! speaks HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port.

use baton_worker::Worker;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::Response;
use std::convert::Infallible;
use std::process::ExitCode;
use tower::service_fn;

const USAGE: &str = "usage: hello [--listen ADDR] [--greeting WORD]";

/// The command line.
struct Args {
    listen: String,
    greeting: String,
}

impl Args {
    /// `Ok(None)` when help was asked for.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
        let mut parsed = Args {
            listen: "127.0.0.1:8080".into(),
            greeting: "hello".into(),
        };
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
                _ => (arg.as_str(), None),
            };
            let slot = match flag {
                "-h" | "--help" => return Ok(None),
                "--listen" => &mut parsed.listen,
                "--greeting" => &mut parsed.greeting,
                _ => return Err(format!("unknown argument `{arg}`\n{USAGE}")),
            };
            *slot = inline
                .or_else(|| args.next())
                .ok_or_else(|| format!("`{flag}` needs a value\n{USAGE}"))?;
        }
        Ok(Some(parsed))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("hello: {message}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hello: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut worker = Worker::builder()
        .listener("http", args.listen)
        .start()
        .await?;
    if !worker.is_supervised() {
        if let Some(http) = worker.listeners().find(|l| l.name == "http") {
            eprintln!("hello: serving on {}", http.address);
        }
    }
    let generation = worker.generation();
    let body = Bytes::from(format!("{} from generation {generation}\n", args.greeting));
    let service = service_fn(move |_request| {
        let mut response = Response::new(Full::new(body.clone()));
        response
            .headers_mut()
            .insert("x-baton-generation", HeaderValue::from(generation));
        async { Ok::<_, Infallible>(response) }
    });
    // Ready, serve (HTTP/1.1 and h2c), report connections, drain.
    worker.serve("http", service).await?;
    Ok(())
}
