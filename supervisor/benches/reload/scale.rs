//! The `scale` scenario: what one reload costs the master when it holds
//! many listeners, and whether it still answers while a reload runs.
//!
//! baton runs `hello` with [`LISTENERS`] TCP listeners and [`PROCESSES`]
//! workers, once per worker protocol. Each reload is a `baton reload`
//! request timed to its reply; meanwhile `baton status` requests are sent
//! one after the other and each is timed to its reply. No HTTP load: what
//! is measured is the master's own work.

use crate::procs::{Guard, TempDir};
use crate::servers::{spawn_baton, Binaries};
use baton::control::client;
use baton::control::protocol::{Reply, Request};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// For `--only`.
pub const NAME: &str = "scale";
/// TCP listeners in the configuration.
pub const LISTENERS: usize = 1000;
/// Workers per generation.
pub const PROCESSES: usize = 16;
/// Reloads per protocol.
const RELOADS: usize = 5;
/// How long the first generation may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one reload or status request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The worker protocols measured, and the `ready` each needs with `hello`
/// (which reports readiness through the SDK only).
const PROTOCOLS: [(&str, &str); 2] = [("sdk", "sdk"), ("systemd", "delay:100ms")];

/// One protocol's figures.
pub struct ScaleResult {
    pub protocol: &'static str,
    pub ready: &'static str,
    /// Why it could not be measured.
    pub outcome: Result<Figures, String>,
}

/// Milliseconds, per reload and per status request.
pub struct Figures {
    /// Each reload, request to reply.
    pub reloads: Vec<f64>,
    /// Each reload's bind and spawn phases, as the master timed them.
    pub bind: Vec<f64>,
    pub spawn: Vec<f64>,
    /// Each `baton status` sent while a reload ran, request to reply.
    pub status: Vec<f64>,
}

/// Measures every protocol, unless interrupted.
pub fn run(bins: &Binaries, interrupted: &AtomicBool) -> Vec<ScaleResult> {
    let mut results = Vec::new();
    for (protocol, ready) in PROTOCOLS {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        eprint!(
            "reload bench: scale / {LISTENERS} listeners, {PROCESSES} workers, {protocol} ... "
        );
        let outcome = measure(bins, protocol, ready, interrupted);
        match &outcome {
            Ok(f) => eprintln!(
                "reload max {:.0} ms, status max {:.1} ms",
                max(&f.reloads),
                max(&f.status)
            ),
            Err(e) => eprintln!("{e}"),
        }
        results.push(ScaleResult {
            protocol,
            ready,
            outcome,
        });
    }
    results
}

fn config(hello: &Path, protocol: &str, ready: &str) -> String {
    let mut text = format!(
        "[supervisor]\ncontrol_socket = \"baton.sock\"\nlog_filter = \"warn\"\n\n\
         [worker]\ncommand = [{:?}]\nprocesses = {PROCESSES}\nprotocol = {protocol:?}\n\
         ready = {ready:?}\nready_timeout = \"60s\"\ndrain_timeout = \"10s\"\n",
        hello.display().to_string(),
    );
    for i in 0..LISTENERS {
        // `hello` serves the listener named `http`.
        let name = if i == 0 {
            "http".into()
        } else {
            format!("l{i}")
        };
        text.push_str(&format!(
            "\n[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\n"
        ));
    }
    text
}

fn measure(
    bins: &Binaries,
    protocol: &str,
    ready: &str,
    interrupted: &AtomicBool,
) -> Result<Figures, String> {
    let dir = TempDir::new(&format!("scale-{protocol}"))
        .map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let mut guard = spawn_baton(
        &bins.baton,
        dir.path(),
        &config(&bins.hello, protocol, ready),
    )?;
    let socket = dir.path().join("baton.sock");
    wait_started(&socket, &mut guard)?;
    let mut figures = Figures {
        reloads: Vec::new(),
        bind: Vec::new(),
        spawn: Vec::new(),
        status: Vec::new(),
    };
    for _ in 0..RELOADS {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        reload_once(&socket, &mut figures)?;
    }
    Ok(figures)
}

/// Waits until generation 1 serves.
fn wait_started(socket: &Path, guard: &mut Guard) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = guard.exited() {
            return Err(format!("baton exited at start ({status})"));
        }
        let reply = client::request(socket, &Request::Status {}, REQUEST_TIMEOUT);
        let current = reply
            .ok()
            .and_then(|r| r.result)
            .and_then(|r| r["master"]["current_generation"].as_u64());
        if current.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "generation 1 did not start within {START_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One reload, with status requests sent back to back while it runs.
fn reload_once(socket: &Path, figures: &mut Figures) -> Result<(), String> {
    let reloading = PathBuf::from(socket);
    let started = Instant::now();
    let reload = std::thread::spawn(move || {
        let reply = client::request(
            &reloading,
            &Request::Reload {
                canary: None,
                mode: None,
                if_version: None,
            },
            REQUEST_TIMEOUT,
        );
        (reply, started.elapsed())
    });
    while !reload.is_finished() {
        let sent = Instant::now();
        client::request(socket, &Request::Status {}, REQUEST_TIMEOUT)
            .map_err(|e| format!("status during a reload: {e}"))?;
        figures.status.push(ms(sent.elapsed()));
    }
    let (reply, took) = reload.join().map_err(|_| "the reload thread panicked")?;
    let reply = reply.map_err(|e| format!("reload: {e}"))?;
    check_committed(&reply)?;
    figures.reloads.push(ms(took));
    let phase = |name: &str| {
        reply.result.as_ref().and_then(|r| {
            r["phases"]
                .as_array()?
                .iter()
                .find(|p| p["phase"] == name)?["ms"]
                .as_f64()
        })
    };
    figures.bind.push(phase("bind").unwrap_or(f64::NAN));
    figures.spawn.push(phase("spawn").unwrap_or(f64::NAN));
    Ok(())
}

fn check_committed(reply: &Reply) -> Result<(), String> {
    if reply.ok {
        Ok(())
    } else {
        Err(format!(
            "reload failed: {}",
            reply.error.as_deref().unwrap_or("no reason given")
        ))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The results as a markdown table.
pub fn markdown(results: &[ScaleResult]) -> String {
    let mut out = format!(
        "### Scale: {LISTENERS} TCP listeners, {PROCESSES} workers, {RELOADS} reloads per protocol\n\n\
         | protocol (ready) | reload median | reload max | bind max | spawn max | status during reloads: n | median | max |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for result in results {
        let label = format!("{} ({})", result.protocol, result.ready);
        match &result.outcome {
            Ok(f) => out.push_str(&format!(
                "| {label} | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} ms | {} | {:.1} ms | {:.1} ms |\n",
                median(&f.reloads),
                max(&f.reloads),
                max(&f.bind),
                max(&f.spawn),
                f.status.len(),
                median(&f.status),
                max(&f.status),
            )),
            Err(e) => out.push_str(&format!("| {label} | {e} | | | | | | |\n")),
        }
    }
    out
}
