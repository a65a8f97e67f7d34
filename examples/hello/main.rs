//! `hello`: the bundled example worker. Answers every request with
//! `GREETING from generation N`, so a client watching the body sees
//! reloads.
//!
//! ```text
//! hello [--listen ADDR] [--greeting WORD] [--config hello.toml]
//! ```
//!
//! Under baton it serves the master's listener `http`; standalone it binds
//! `--listen` (default 127.0.0.1:8080) and drains on SIGTERM or SIGINT. It
//! speaks HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port.
//!
//! The greeting comes from `hello.toml` (`greeting = "hello"`) when baton's
//! `[worker] app_config` names it (or, standalone, `--config` does),
//! through a reload handle: editing the file and running `baton reload`
//! changes the answer in place, with the same worker processes. Each answer
//! names the config version it was served with (`x-config-version`).
//! Otherwise it is `--greeting` (default `hello`).

use baton_worker::Worker;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::Response;
use std::convert::Infallible;
use std::process::ExitCode;
use tower::service_fn;

const USAGE: &str = "usage: hello [--listen ADDR] [--greeting WORD] [--config hello.toml]";

/// The command line.
struct Args {
    listen: String,
    greeting: String,
    config: String,
}

/// `hello.toml`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    greeting: String,
}

impl Settings {
    fn parse(files: &baton_worker::Files) -> Result<Settings, String> {
        let settings: Settings = toml::from_str(files.only_text()?).map_err(|e| e.to_string())?;
        if settings.greeting.trim().is_empty() {
            return Err("greeting must not be empty".into());
        }
        Ok(settings)
    }
}

impl Args {
    /// `Ok(None)` when help was asked for.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
        let mut parsed = Args {
            listen: "127.0.0.1:8080".into(),
            greeting: "hello".into(),
            config: String::new(),
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
                "--config" => &mut parsed.config,
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
    let mut builder = Worker::builder().listener("http", args.listen);
    if !args.config.is_empty() {
        builder = builder.app_config_file(&args.config);
    }
    let mut worker = builder.start().await?;
    if !worker.is_supervised() {
        if let Some(http) = worker.listeners().find(|l| l.name == "http") {
            eprintln!("hello: serving on {}", http.address);
        }
    }
    let generation = worker.generation();
    let settings = if worker.has_app_config() {
        Some(worker.app_config(Settings::parse)?)
    } else {
        None
    };
    let fixed = Bytes::from(format!("{} from generation {generation}\n", args.greeting));
    let service = service_fn(move |_request| {
        let mut response = match &settings {
            // Loaded once per request: lock-free, and this request keeps
            // this version whatever a reload swaps in meanwhile.
            Some(settings) => {
                let (current, version) = settings.load_versioned();
                let body = format!("{} from generation {generation}\n", current.greeting);
                let mut response = Response::new(Full::new(Bytes::from(body)));
                if let Ok(version) = HeaderValue::from_str(&version) {
                    response.headers_mut().insert("x-config-version", version);
                }
                response
            }
            None => Response::new(Full::new(fixed.clone())),
        };
        response
            .headers_mut()
            .insert("x-baton-generation", HeaderValue::from(generation));
        async { Ok::<_, Infallible>(response) }
    });
    // Ready, serve (HTTP/1.1 and h2c), report connections, drain.
    worker.serve("http", service).await?;
    Ok(())
}
