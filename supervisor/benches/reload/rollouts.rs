//! The `rollouts` scenarios: what the cheaper and the safer reloads buy.
//!
//! - **In place vs new generation**: `hello` with `app_config =
//!   ["hello.toml"]` under keep-alive load; the same change (a new
//!   greeting) applied [`RELOADS`] times in place and [`RELOADS`] times
//!   with a new generation. Each is timed from the `baton reload` request
//!   to its reply, which comes once every worker serves the new version
//!   (in place: every worker committed; new generation: the new one is
//!   ready and steered to). Failed requests are counted.
//! - **Bad release**: a release whose worker 0 is killed 1.5 s after it
//!   started (`kill -9`, a crash), under new-connection load, with
//!   `probation = "5s"` and without (every earlier version's behaviour):
//!   failed requests over [`BAD_WINDOW`] after the reload, and how long
//!   until the good release alone serves again.

use crate::procs::{Guard, TempDir};
use crate::servers::{spawn_baton, Binaries};
use baton::control::client;
use baton::control::protocol::{Reply, Request};
use baton_tests::load::{LoadConfig, LoadHandle, Mode, Report};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// For `--only`.
pub const NAME: &str = "rollouts";
/// Reloads of each kind.
const RELOADS: usize = 10;
/// How long the load runs after a bad release's reload.
const BAD_WINDOW: Duration = Duration::from_secs(8);
const TIMEOUT: Duration = Duration::from_secs(60);

/// One measurement.
pub struct Row {
    pub label: &'static str,
    pub outcome: Result<Figures, String>,
}

/// What was measured.
pub struct Figures {
    /// Request to reply, per reload, in ms.
    pub reloads: Vec<f64>,
    pub ok: u64,
    pub failed: u64,
    /// For a bad release: what ended it.
    pub note: String,
}

/// One measurement's function.
type Measure = fn(&Binaries) -> Result<Figures, String>;

/// Runs every measurement, unless interrupted.
pub fn run(bins: &Binaries, interrupted: &AtomicBool) -> Vec<Row> {
    let mut rows = Vec::new();
    let measurements: [(&'static str, Measure); 4] = [
        ("in place", |b| reloads(b, "in_place")),
        ("new generation", |b| reloads(b, "new_generation")),
        ("bad release, probation 5s", |b| bad_release(b, true)),
        ("bad release, no probation", |b| bad_release(b, false)),
    ];
    for (label, measure) in measurements {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        eprint!("reload bench: rollouts / {label} ... ");
        let outcome = measure(bins);
        match &outcome {
            Ok(f) => eprintln!("{} ok, {} failed", f.ok, f.failed),
            Err(e) => eprintln!("{e}"),
        }
        rows.push(Row { label, outcome });
    }
    rows
}

/// A running baton in its temp dir.
pub struct Running {
    dir: TempDir,
    _guard: Guard,
    addr: SocketAddr,
}

impl Running {
    pub fn start(
        bins: &Binaries,
        name: &str,
        worker: &str,
        files: &[(&str, &str)],
    ) -> Result<Running, String> {
        let dir = TempDir::new(name).map_err(|e| format!("cannot create a temp dir: {e}"))?;
        for (file, text) in files {
            std::fs::write(dir.path().join(file), text)
                .map_err(|e| format!("writing {file}: {e}"))?;
        }
        let config = format!(
            "[supervisor]\ncontrol_socket = \"baton.sock\"\nlog_filter = \"warn\"\n\n\
             [[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n[worker]\nprocesses = 2\n\
             ready_timeout = \"30s\"\ndrain_timeout = \"10s\"\n{worker}",
        );
        let guard = spawn_baton(&bins.baton, dir.path(), &config)?;
        let socket = dir.path().join("baton.sock");
        let deadline = Instant::now() + TIMEOUT;
        let addr = loop {
            let status = client::request(&socket, &Request::Status {}, TIMEOUT)
                .ok()
                .and_then(|r| r.result);
            let address = status.as_ref().and_then(|s| {
                s["master"]["current_generation"].as_u64()?;
                s["listeners"][0]["address"]
                    .as_str()?
                    .parse::<SocketAddr>()
                    .ok()
            });
            if let Some(address) = address {
                break address;
            }
            if Instant::now() >= deadline {
                return Err("generation 1 did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Running {
            dir,
            _guard: guard,
            addr,
        })
    }

    /// Where the listener `http` is.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master's pid, as its status says.
    pub fn master(&self) -> Result<nix::unistd::Pid, String> {
        client::request(
            &self.dir.path().join("baton.sock"),
            &Request::Status {},
            TIMEOUT,
        )
        .ok()
        .and_then(|r| r.result?["master"]["pid"].as_i64())
        .map(|pid| nix::unistd::Pid::from_raw(pid as i32))
        .ok_or_else(|| "the master's status has no pid".to_string())
    }

    pub fn reload(&self, mode: &str) -> Result<(Reply, f64), String> {
        let sent = Instant::now();
        let reply = client::request(
            &self.dir.path().join("baton.sock"),
            &Request::Reload {
                canary: None,
                mode: Some(mode.into()),
                if_version: None,
            },
            TIMEOUT,
        )
        .map_err(|e| format!("reload: {e}"))?;
        Ok((reply, sent.elapsed().as_secs_f64() * 1000.0))
    }

    pub fn write(&self, file: &str, text: &str) -> Result<(), String> {
        std::fs::write(self.dir.path().join(file), text).map_err(|e| format!("writing {file}: {e}"))
    }
}

/// `connections` closed-loop clients on `addr`.
pub fn load(addr: SocketAddr, mode: Mode, connections: usize) -> LoadHandle {
    LoadHandle::start(LoadConfig {
        connections,
        mode,
        duration: Duration::from_secs(3600),
        max_requests: 100_000_000,
        timeout: Duration::from_secs(5),
        ..LoadConfig::new(addr)
    })
}

fn figures(reloads: Vec<f64>, report: &Report, note: String) -> Figures {
    Figures {
        reloads,
        ok: report.ok(),
        failed: report.failed(),
        note,
    }
}

/// [`RELOADS`] reloads of a new greeting, each with `mode`.
fn reloads(bins: &Binaries, mode: &str) -> Result<Figures, String> {
    let worker = format!(
        "command = [{:?}]\napp_config = [\"hello.toml\"]\n",
        bins.hello.display().to_string()
    );
    let running = Running::start(
        bins,
        "rollouts-reloads",
        &worker,
        &[("hello.toml", "greeting = \"hello\"\n")],
    )?;
    let handle = load(running.addr, Mode::KeepAlive, 4);
    let mut times = Vec::new();
    for i in 0..RELOADS {
        running.write("hello.toml", &format!("greeting = \"hello {i}\"\n"))?;
        let (reply, ms) = running.reload(mode)?;
        if !reply.ok {
            handle.stop();
            return Err(format!(
                "reload failed: {}",
                reply.error.unwrap_or_default()
            ));
        }
        times.push(ms);
    }
    let report = handle.stop();
    Ok(figures(times, &report, String::new()))
}

/// A release whose worker 0 is killed 1.5 s after it started.
fn bad_release(bins: &Binaries, probation: bool) -> Result<Figures, String> {
    let script = format!(
        "if [ \"$BATON_WORKER\" = 0 ] && [ -e bad-release ]; then (sleep 1.5; kill -9 $$) & fi; exec {}",
        bins.hello.display()
    );
    let worker =
        |release: u32| {
            format!(
            "command = [\"/bin/sh\", \"-c\", {script:?}]\nenv = {{ RELEASE = \"{release}\" }}\n{}",
            if probation { "probation = \"5s\"\n" } else { "" }
        )
        };
    let running = Running::start(bins, "rollouts-bad", &worker(1), &[])?;
    let handle = load(running.addr, Mode::NewConnection, 4);
    std::thread::sleep(Duration::from_millis(500));
    running.write("bad-release", "")?;
    std::fs::write(
        running.dir.path().join("baton.toml"),
        std::fs::read_to_string(running.dir.path().join("baton.toml"))
            .map_err(|e| e.to_string())?
            .replace("RELEASE = \"1\"", "RELEASE = \"2\""),
    )
    .map_err(|e| format!("writing baton.toml: {e}"))?;
    let started = Instant::now();
    let (reply, ms) = running.reload("new_generation")?;
    let note = match (&reply.ok, &reply.error) {
        (false, Some(e)) if e.contains("rolled back") => {
            format!("rolled back {:.1} s after the reload", ms / 1000.0)
        }
        (true, _) => "committed; worker 0 crash-loops, not recovered".into(),
        (false, e) => format!("failed: {}", e.clone().unwrap_or_default()),
    };
    std::thread::sleep(BAD_WINDOW.saturating_sub(started.elapsed()));
    let report = handle.stop();
    Ok(figures(vec![ms], &report, note))
}

fn stat(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    (median, sorted.last().copied().unwrap_or(f64::NAN))
}

/// The results as markdown tables.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!(
        "### In place vs new generation: {RELOADS} reloads of `hello.toml` each, 2 workers, keep-alive load\n\n\
         | reload | every worker on the new version: median | max | ok | failed |\n|---|---:|---:|---:|---:|\n"
    );
    for row in rows.iter().filter(|r| !r.label.starts_with("bad")) {
        match &row.outcome {
            Ok(f) => {
                let (median, max) = stat(&f.reloads);
                out.push_str(&format!(
                    "| {} | {median:.1} ms | {max:.1} ms | {} | **{}** |\n",
                    row.label, f.ok, f.failed
                ));
            }
            Err(e) => out.push_str(&format!("| {} | {e} | | | |\n", row.label)),
        }
    }
    out.push_str(&format!(
        "\n### Bad release: worker 0 killed 1.5 s after start, new-connection load, {} s window\n\n\
         | run | outcome | ok | failed |\n|---|---|---:|---:|\n",
        BAD_WINDOW.as_secs()
    ));
    for row in rows.iter().filter(|r| r.label.starts_with("bad")) {
        match &row.outcome {
            Ok(f) => out.push_str(&format!(
                "| {} | {} | {} | **{}** |\n",
                row.label, f.note, f.ok, f.failed
            )),
            Err(e) => out.push_str(&format!("| {} | {e} | | |\n", row.label)),
        }
    }
    out
}
