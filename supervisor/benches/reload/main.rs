//! `cargo bench -p baton --bench reload`: baton's reloads and upgrades
//! side by side with nginx's and HAProxy's, on one machine in one run,
//! under a strict closed-loop HTTP/1.1 load that counts every failed
//! request (see `baton_tests::load`).
//!
//! Each scenario runs twice, with keep-alive connections and with a new
//! connection per request. The HTTP/2 and WebSocket scenarios
//! (`protocols`) follow: h2load (new connections) and a strict HTTP/2
//! client (long-lived connections) against baton and nginx
//! `listen ... http2`, WebSocket clients of `axum-app`, and HTTP/3 clients
//! of `h3-app` on a QUIC listener.
//! `master-kill` kills the master of baton, nginx and HAProxy with
//! SIGKILL under load and times how long until a reload works again (see
//! `master_kill`).
//! `handover` holds 1,000 keep-alive connections across 100 HUPs and 10
//! upgrades with 2 and 4 workers and counts what closed (see `handover`).
//! `reconnects` counts the reconnects and the CPU time per reload of 1,000
//! idle keep-alive clients and of baton (with and without handovers), nginx
//! and HAProxy (see `reconnects`).
//! `wrapped-latency` measures the keep-alive latency of wrapped servers
//! (gunicorn, uvicorn, hypercorn, nginx) under baton against each run
//! alone; `soak` (only when named) the master's memory over many reloads.
//! The bench prints markdown tables and writes `target/bench/reload.json`
//! and `target/bench/reload.svg`. It runs the `hello` (and, for WebSocket,
//! `axum-app`; for HTTP/3, `h3-app`) examples of `baton-worker`, which `cargo bench -p baton`
//! does not build: build them first with
//! `cargo build --release -p baton-worker --examples`.
#![forbid(unsafe_code)]

mod admin_crowd;
mod admin_idle;
mod args;
mod baton_log;
mod chart;
mod drive;
mod handover;
mod header;
mod locate;
mod master_kill;
mod procs;
mod protocols;
mod reconnects;
mod rollouts;
mod scale;
mod servers;
mod soak;
mod summary;
mod wrapped;

use args::{Options, Parsed};
use baton_tests::load::Mode;
use drive::{Action, Load, Measured};
use nix::sys::signal::Signal;
use servers::{Binaries, Kind, Server};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// One system and what is done to it every interval.
pub struct Scenario {
    /// For `--only`.
    pub name: &'static str,
    /// Who serves; nginx's and HAProxy's versions are added at run time.
    pub system: &'static str,
    /// What a reload is.
    pub reload: &'static str,
    pub kind: Kind,
    pub action: Action,
}

impl Scenario {
    /// Whether a master process runs (whose RSS is reported).
    pub fn has_master(&self) -> bool {
        self.kind != Kind::Hello
    }

    /// Whether baton's master runs (whose fds and children are checked).
    pub fn is_baton(&self) -> bool {
        self.kind == Kind::Baton
    }
}

/// In run order.
const SCENARIOS: [Scenario; 7] = [
    Scenario {
        name: "baton-hup",
        system: "baton + hello",
        reload: "HUP",
        kind: Kind::Baton,
        action: Action::Reload(Signal::SIGHUP),
    },
    Scenario {
        name: "baton-upgrade",
        system: "baton + hello",
        reload: "USR2 upgrade",
        kind: Kind::Baton,
        action: Action::Upgrade,
    },
    Scenario {
        name: "nginx",
        system: "nginx",
        reload: "HUP",
        kind: Kind::Nginx,
        action: Action::ReloadWorkers(Signal::SIGHUP),
    },
    Scenario {
        name: "haproxy",
        system: "HAProxy -W",
        reload: "USR2",
        kind: Kind::Haproxy,
        action: Action::ReloadWorkers(Signal::SIGUSR2),
    },
    Scenario {
        name: "naive-restart",
        system: "hello alone",
        reload: "kill + start",
        kind: Kind::Hello,
        action: Action::Restart,
    },
    Scenario {
        name: "hello-alone",
        system: "hello alone",
        reload: "none",
        kind: Kind::Hello,
        action: Action::None,
    },
    Scenario {
        name: "baton-steady",
        system: "baton + hello",
        reload: "none",
        kind: Kind::Baton,
        action: Action::None,
    },
];

/// One scenario in one client mode.
pub struct RunResult {
    pub scenario: &'static Scenario,
    /// The scenario's system, with a version where there is one.
    pub system: String,
    pub mode: Mode,
    /// Why it did not run: `not installed`, or what failed.
    pub outcome: Result<Measured, String>,
}

/// Set once SIGINT or SIGTERM arrives: the run under way stops, the
/// servers are killed, and what was measured is still written.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let options = match args::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(options)) => options,
        Ok(Parsed::Help) => {
            println!("{}{}", args::USAGE, scenario_names());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::NotBenchmarking) => {
            println!("reload bench: not run without --bench; run it with `cargo bench -p baton --bench reload`");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("reload bench: {e}\n\n{}{}", args::USAGE, scenario_names());
            return ExitCode::from(2);
        }
    };
    let selected = selected(&options.only);
    let selected_protocols = selected_protocols(&options.only);
    let run_scale = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| scale::NAME.starts_with(o.as_str()));
    let run_rollouts = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| rollouts::NAME.starts_with(o.as_str()));
    let run_master_kill = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| master_kill::NAME.starts_with(o.as_str()));
    let run_handover = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| handover::NAME.starts_with(o.as_str()));
    let run_reconnects = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| reconnects::NAME.starts_with(o.as_str()));
    let admin_idle = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| ADMIN_IDLE.starts_with(o.as_str()));
    // Only when named: it takes about half an hour.
    let run_soak = options
        .only
        .iter()
        .any(|o| soak::NAME.starts_with(o.as_str()));
    let run_wrapped = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| wrapped::NAME.starts_with(o.as_str()));
    let admin_crowd = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| ADMIN_CROWD.starts_with(o.as_str()));
    if selected.is_empty()
        && selected_protocols.is_empty()
        && !run_scale
        && !run_rollouts
        && !run_master_kill
        && !run_handover
        && !run_reconnects
        && !admin_idle
        && !run_soak
        && !run_wrapped
        && !admin_crowd
    {
        eprintln!(
            "reload bench: --only {} matches no scenario; scenarios: {}",
            options.only.join(","),
            scenario_names()
        );
        return ExitCode::from(2);
    }
    let bins = match locate::binaries() {
        Ok(bins) => bins,
        Err(e) => {
            eprintln!("reload bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = catch_interrupts() {
        eprintln!("reload bench: cannot handle SIGINT: {e}");
        return ExitCode::FAILURE;
    }

    let mut header = header::header(&options);
    let runs = run_all(&selected, &bins, &options);
    let scaled = if run_scale {
        scale::run(&bins, &INTERRUPTED)
    } else {
        Vec::new()
    };
    let rolled = if run_rollouts {
        rollouts::run(&bins, &INTERRUPTED)
    } else {
        Vec::new()
    };
    let killed = if run_master_kill {
        master_kill::run(&bins, options.connections, &INTERRUPTED)
    } else {
        Vec::new()
    };
    let handed = if run_handover {
        handover::run(&bins, &INTERRUPTED)
    } else {
        Vec::new()
    };
    let reconnected = if run_reconnects {
        reconnects::run(&bins, &INTERRUPTED)
    } else {
        Vec::new()
    };
    let idle = if admin_idle && !INTERRUPTED.load(Ordering::Relaxed) {
        eprint!("reload bench: admin endpoint, idle ... ");
        let idle = admin_idle::measure(&bins, &INTERRUPTED);
        match &idle {
            Ok(idle) => eprintln!("{} masters measured", idle.len()),
            Err(e) => eprintln!("{e}"),
        }
        idle.ok()
    } else {
        None
    };
    if let Some(idle) = &idle {
        header["admin_idle"] = admin_idle::json(idle);
    }
    let soaked = if run_soak && !INTERRUPTED.load(Ordering::Relaxed) {
        eprint!("reload bench: soak, {} reloads ... ", options.soak_reloads);
        let soaked = soak::run(&bins, options.soak_reloads, &INTERRUPTED);
        match &soaked {
            Ok(s) => eprintln!(
                "{} reloads, {} KiB growth, {} failed",
                s.reloads,
                s.growth_kib(),
                s.failed
            ),
            Err(e) => eprintln!("{e}"),
        }
        soaked.ok()
    } else {
        None
    };
    if let Some(soaked) = &soaked {
        header["soak"] = soak::json(soaked);
    }
    let latencies = if run_wrapped {
        wrapped::run(&bins, &INTERRUPTED)
    } else {
        Vec::new()
    };
    if !latencies.is_empty() {
        header["wrapped_latency"] = wrapped::json(&latencies);
    }
    let crowded = if admin_crowd && !INTERRUPTED.load(Ordering::Relaxed) {
        eprint!("reload bench: admin endpoint, crowded ... ");
        let crowded = admin_crowd::measure(&bins, &INTERRUPTED);
        match &crowded {
            Ok(rows) => eprintln!("{} runs", rows.len()),
            Err(e) => eprintln!("{e}"),
        }
        crowded.ok()
    } else {
        None
    };
    if let Some(crowded) = &crowded {
        header["admin_crowd"] = admin_crowd::json(crowded);
    }
    let mut protocol_rows = Vec::new();
    for scenario in selected_protocols {
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
        protocol_rows.extend(protocols::run(scenario, &bins, &options));
    }
    let title = format!(
        "baton reload benchmark, {} ({}) — {} CPUs, {} s per run, reload every {} ms, {} connections",
        header["date"].as_str().unwrap_or(""),
        header["revision"].as_str().unwrap_or("unknown revision"),
        servers::cpus(),
        options.duration.as_secs_f64(),
        options.interval.as_millis(),
        options.connections,
    );
    println!("\n## Reload benchmark\n\n{title}\n");
    if !runs.is_empty() {
        println!("{}", summary::markdown(&runs));
    }
    if let Some(idle) = &idle {
        println!(
            "\n### Admin endpoint, idle\n\n{}",
            admin_idle::markdown(idle)
        );
    }
    if let Some(crowded) = &crowded {
        println!(
            "\n### Admin endpoint, crowded\n\n{}",
            admin_crowd::markdown(crowded)
        );
    }
    if !scaled.is_empty() {
        println!("{}", scale::markdown(&scaled));
    }
    if !rolled.is_empty() {
        println!("{}", rollouts::markdown(&rolled));
    }
    if !killed.is_empty() {
        println!("{}", master_kill::markdown(&killed));
    }
    if !handed.is_empty() {
        println!("{}", handover::markdown(&handed));
    }
    if !reconnected.is_empty() {
        println!("{}", reconnects::markdown(&reconnected));
    }
    if let Some(soaked) = &soaked {
        println!("{}", soak::markdown(soaked));
    }
    if !latencies.is_empty() {
        println!("{}", wrapped::markdown(&latencies));
    }
    if !protocol_rows.is_empty() {
        println!(
            "### HTTP/2 and WebSocket\n\n{}",
            protocols::markdown(&protocol_rows)
        );
    }
    // A scale-only run leaves the load scenarios' results as they were.
    let written = if runs.is_empty() && protocol_rows.is_empty() {
        Ok(None)
    } else {
        write_outputs(&runs, &protocol_rows, &header, &title, options.duration).map(Some)
    };
    match written {
        Ok(Some((json, svg))) => eprintln!(
            "reload bench: wrote {} and {}",
            json.display(),
            svg.display()
        ),
        Ok(None) => {}
        Err(e) => {
            eprintln!("reload bench: cannot write the results: {e}");
            return ExitCode::FAILURE;
        }
    }
    if INTERRUPTED.load(Ordering::Relaxed) {
        return ExitCode::from(130);
    }
    ExitCode::SUCCESS
}

/// The scenarios whose names start with one of `only` (all when it is
/// empty), in run order.
fn selected(only: &[String]) -> Vec<&'static Scenario> {
    SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| s.name.starts_with(o.as_str())))
        .collect()
}

/// Not a load scenario: the admin endpoint's idle cost (see [`admin_idle`]).
const ADMIN_IDLE: &str = "admin-idle";

/// Not a load scenario: `/healthz` under a crowd (see [`admin_crowd`]).
const ADMIN_CROWD: &str = "admin-crowd";

/// The HTTP/2 and WebSocket scenarios `only` selects, in run order.
fn selected_protocols(only: &[String]) -> Vec<&'static protocols::ProtocolScenario> {
    protocols::SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| s.name.starts_with(o.as_str())))
        .collect()
}

fn scenario_names() -> String {
    SCENARIOS
        .iter()
        .map(|s| s.name)
        .chain([
            scale::NAME,
            rollouts::NAME,
            master_kill::NAME,
            handover::NAME,
            reconnects::NAME,
            ADMIN_IDLE,
            ADMIN_CROWD,
            soak::NAME,
            wrapped::NAME,
        ])
        .chain(protocols::SCENARIOS.iter().map(|s| s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn run_all(selected: &[&'static Scenario], bins: &Binaries, options: &Options) -> Vec<RunResult> {
    let mut runs = Vec::new();
    for scenario in selected {
        let system = servers::label(scenario.kind, bins, scenario.system);
        for mode in [Mode::KeepAlive, Mode::NewConnection] {
            if INTERRUPTED.load(Ordering::Relaxed) {
                return runs;
            }
            eprint!(
                "reload bench: {} / {} / {} ... ",
                system,
                scenario.reload,
                summary::mode_name(mode)
            );
            let load = Load {
                mode,
                duration: options.duration,
                interval: options.interval,
                connections: options.connections,
            };
            let outcome = Server::start(scenario.kind, bins)
                .map(|mut server| drive::run(&mut server, scenario.action, load, &INTERRUPTED));
            match &outcome {
                Ok(m) => eprintln!(
                    "{} ok, {} failed, {} reloads",
                    m.report.ok(),
                    m.report.failed(),
                    m.cycles.len()
                ),
                Err(e) => eprintln!("{e}"),
            }
            runs.push(RunResult {
                scenario,
                system: system.clone(),
                mode,
                outcome,
            });
        }
    }
    runs
}

/// SIGINT and SIGTERM set [`INTERRUPTED`] (through tokio's handler, which
/// leaves the signal mask alone: the servers inherit it); a second one ends
/// the bench at once.
fn catch_interrupts() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut interrupt, mut terminate) = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                if INTERRUPTED.swap(true, Ordering::Relaxed) {
                    std::process::exit(130);
                }
                eprintln!(
                    "\nreload bench: interrupted; stopping the servers (again to quit at once)"
                );
            }
        })
    });
    Ok(())
}

fn write_outputs(
    runs: &[RunResult],
    protocol_rows: &[protocols::Row],
    header: &serde_json::Value,
    title: &str,
    duration: Duration,
) -> Result<(PathBuf, PathBuf), String> {
    let dir = locate::target_dir()?.join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let json_path = dir.join("reload.json");
    let mut results = summary::json(runs, header);
    results["protocols"] = protocols::json(protocol_rows);
    let json =
        serde_json::to_string_pretty(&results).map_err(|e| format!("encoding the results: {e}"))?;
    std::fs::write(&json_path, json + "\n")
        .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    let svg_path = dir.join("reload.svg");
    std::fs::write(&svg_path, chart::svg(runs, title, duration))
        .map_err(|e| format!("writing {}: {e}", svg_path.display()))?;
    Ok((json_path, svg_path))
}
