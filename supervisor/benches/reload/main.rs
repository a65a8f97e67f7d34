//! `cargo bench -p baton --bench reload`: baton's reloads and upgrades
//! side by side with nginx's and HAProxy's, on one machine in one run,
//! under a strict closed-loop HTTP/1.1 load that counts every failed
//! request (see `baton_tests::load`).
//!
//! Each scenario runs twice, with keep-alive connections and with a new
//! connection per request. The bench prints markdown tables and writes
//! `target/bench/reload.json` and `target/bench/reload.svg`. It runs the
//! `hello` example of `baton-worker`, which `cargo bench -p baton` does
//! not build: build it first with
//! `cargo build --release -p baton-worker --example hello`.

mod args;
mod chart;
mod drive;
mod procs;
mod servers;
mod summary;

use args::{Options, Parsed};
use baton_tests::load::Mode;
use drive::{Action, Load, Measured};
use nix::sys::signal::{SigSet, Signal};
use servers::{Binaries, Kind, Server};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let selected: Vec<&'static Scenario> = SCENARIOS
        .iter()
        .filter(|s| {
            options.only.is_empty() || options.only.iter().any(|o| s.name.starts_with(o.as_str()))
        })
        .collect();
    if selected.is_empty() {
        eprintln!(
            "reload bench: --only {} matches no scenario; scenarios: {}",
            options.only.join(","),
            scenario_names()
        );
        return ExitCode::from(2);
    }
    let bins = match binaries() {
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

    let runs = run_all(&selected, &bins, &options);
    let header = header(&options);
    let title = format!(
        "baton reload benchmark, {} — {} CPUs, {} s per run, reload every {} ms, {} connections",
        header["date"].as_str().unwrap_or(""),
        servers::cpus(),
        options.duration.as_secs_f64(),
        options.interval.as_millis(),
        options.connections,
    );
    println!("\n## Reload benchmark\n\n{title}\n");
    println!("{}", summary::markdown(&runs));
    match write_outputs(&runs, &header, &title) {
        Ok((json, svg)) => eprintln!(
            "reload bench: wrote {} and {}",
            json.display(),
            svg.display()
        ),
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

fn scenario_names() -> String {
    SCENARIOS
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn run_all(selected: &[&'static Scenario], bins: &Binaries, options: &Options) -> Vec<RunResult> {
    let mut runs = Vec::new();
    for scenario in selected {
        let system = match scenario.kind {
            Kind::Nginx => bins.nginx.as_deref().and_then(servers::version),
            Kind::Haproxy => bins
                .haproxy
                .as_deref()
                .and_then(servers::version)
                .map(|v| format!("{v} -W")),
            _ => None,
        }
        .unwrap_or_else(|| scenario.system.to_string());
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

/// SIGINT and SIGTERM are blocked in every thread (the servers, started
/// with a clean mask, still get their own) and awaited by one thread,
/// which asks the run to stop; a second one ends the bench at once.
fn catch_interrupts() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || loop {
        if set.wait().is_ok() {
            if INTERRUPTED.swap(true, Ordering::Relaxed) {
                std::process::exit(130);
            }
            eprintln!("\nreload bench: interrupted; stopping the servers (again to quit at once)");
        }
    });
    Ok(())
}

/// The profile directory the bench runs from: `target/release/deps/reload-HASH`
/// lives two levels below it.
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("unexpected bench binary path {}", exe.display()))
}

fn binaries() -> Result<Binaries, String> {
    let profile = profile_dir()?;
    let hello = profile.join("examples").join("hello");
    if !hello.is_file() {
        return Err(format!(
            "{} is missing; build it first (cargo bench does not build other packages' examples):\n\n    \
             cargo build --release -p baton-worker --example hello\n",
            hello.display()
        ));
    }
    warn_if_stale(&hello);
    Ok(Binaries {
        baton: PathBuf::from(env!("CARGO_BIN_EXE_baton")),
        hello,
        nginx: procs::find_program("nginx", &["/usr/sbin/nginx"]),
        haproxy: procs::find_program("haproxy", &["/usr/sbin/haproxy"]),
    })
}

/// Warns when `hello` is older than the sources it is built from.
fn warn_if_stale(hello: &Path) {
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    let Some(built) = modified(hello) else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = vec![root.join("worker-sdk/src"), root.join("examples/hello")];
    let mut newer = None;
    // Bounded: these trees hold a few dozen files.
    for _ in 0..64 {
        let Some(dir) = dirs.pop() else { break };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if modified(&path).is_some_and(|m| m > built) {
                newer = Some(path);
            }
        }
    }
    if let Some(path) = newer {
        eprintln!(
            "reload bench: warning: {} is newer than {}; rebuild it with \
             `cargo build --release -p baton-worker --example hello`",
            path.display(),
            hello.display()
        );
    }
}

/// `CARGO_TARGET_DIR` when it is absolute, else the directory above the
/// profile directory the bench runs from.
fn target_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return Ok(dir);
        }
    }
    let profile = profile_dir()?;
    // With `--target TRIPLE` the profile dir is one level deeper; cargo
    // marks the target dir itself with CACHEDIR.TAG.
    Ok(profile
        .ancestors()
        .skip(1)
        .take(2)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .or_else(|| profile.parent())
        .map_or(profile.clone(), Path::to_path_buf))
}

fn write_outputs(
    runs: &[RunResult],
    header: &serde_json::Value,
    title: &str,
) -> Result<(PathBuf, PathBuf), String> {
    let dir = target_dir()?.join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let json_path = dir.join("reload.json");
    let json = serde_json::to_string_pretty(&summary::json(runs, header))
        .map_err(|e| format!("encoding the results: {e}"))?;
    std::fs::write(&json_path, json + "\n")
        .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    let svg_path = dir.join("reload.svg");
    std::fs::write(&svg_path, chart::svg(runs, title))
        .map_err(|e| format!("writing {}: {e}", svg_path.display()))?;
    Ok((json_path, svg_path))
}

/// When, where and how the bench ran.
fn header(options: &Options) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    serde_json::json!({
        "date": utc_date(now),
        "unix_time": now.as_secs(),
        "cpus": servers::cpus(),
        "kernel": kernel.trim(),
        "duration_s": options.duration.as_secs_f64(),
        "interval_ms": options.interval.as_millis() as u64,
        "connections": options.connections,
        "quick": options.quick,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}

/// `YYYY-MM-DD HH:MM UTC`, from Howard Hinnant's days-to-civil algorithm.
fn utc_date(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs % 86_400 / 3600,
        secs % 3600 / 60
    )
}
