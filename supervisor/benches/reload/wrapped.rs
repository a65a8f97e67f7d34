//! Per-request latency of wrapped servers on one keep-alive connection
//! (`--only wrapped-latency`): gunicorn (gthread), uvicorn, hypercorn and
//! nginx, each run alone on a socket it binds itself, under baton on the
//! socket baton binds and passes it, and under baton with `nodelay =
//! false` (what a server that never sets `TCP_NODELAY` itself pays to
//! Nagle's algorithm and the client's delayed ACK: uvicorn's `--fd` takes
//! the socket for a Unix one and does not).
//!
//! Requests are sequential on one connection (closed loop, the strict
//! client of `baton_tests::load`), after a warm-up. The Python servers come
//! from `$BATON_WRAP_VENV/bin`, `target/wrap-venv/bin` or `PATH`; a server
//! that is missing gets a row saying so.

use crate::procs::{self, Guard, TempDir};
use crate::servers::Binaries;
use baton_tests::load::{self, Class, LoadConfig, Mode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// For `--only`.
pub const NAME: &str = "wrapped-latency";
/// Measured requests per run.
const REQUESTS: u64 = 1000;
/// With `nodelay = false` some servers take ~40 ms a request: fewer.
const NAGLE_REQUESTS: u64 = 100;
/// Requests before measuring, once the server answers.
const WARM_UP: u64 = 50;
/// How long a server may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The servers, in run order.
const SERVERS: [&str; 4] = ["gunicorn", "uvicorn", "hypercorn", "nginx"];

/// How a server was run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Alone,
    Baton,
    BatonNagle,
}

/// One server's three runs.
pub struct Row {
    pub server: &'static str,
    alone: Result<Latency, String>,
    baton: Result<Latency, String>,
    nagle: Result<Latency, String>,
}

/// One run.
pub struct Latency {
    pub requests: u64,
    pub failed: u64,
    /// Requests sent on a connection that had served one before.
    pub reused: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Runs every server alone, under baton, and under baton without
/// `TCP_NODELAY`.
pub fn run(bins: &Binaries, interrupted: &AtomicBool) -> Vec<Row> {
    let mut rows = Vec::new();
    for server in SERVERS {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        let one = |setup: Setup| -> Result<Latency, String> {
            if interrupted.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            eprint!(
                "reload bench: {server} keep-alive latency, {} ... ",
                setup_name(setup)
            );
            let measured = measure(server, setup, bins);
            match &measured {
                Ok(l) => eprintln!(
                    "mean {:.3} ms, p99 {:.3} ms, {} failed",
                    l.mean_ms, l.p99_ms, l.failed
                ),
                Err(e) => eprintln!("{e}"),
            }
            measured
        };
        let alone = one(Setup::Alone);
        let baton = one(Setup::Baton);
        let nagle = one(Setup::BatonNagle);
        rows.push(Row {
            server,
            alone,
            baton,
            nagle,
        });
    }
    rows
}

fn setup_name(setup: Setup) -> &'static str {
    match setup {
        Setup::Alone => "alone",
        Setup::Baton => "under baton",
        Setup::BatonNagle => "under baton, nodelay = false",
    }
}

/// Starts `server` as `setup` says and measures it.
fn measure(server: &str, setup: Setup, bins: &Binaries) -> Result<Latency, String> {
    let dir = TempDir::new(&format!("wrapped-{server}"))
        .map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let addr = procs::free_port().map_err(|e| format!("no free port: {e}"))?;
    let mut guard = Guard::default();
    let mut command = match setup {
        Setup::Alone => alone(server, dir.path(), addr, bins)?,
        Setup::Baton | Setup::BatonNagle => {
            let nodelay = if setup == Setup::Baton {
                ""
            } else {
                "nodelay = false\n"
            };
            let config = format!(
                "[supervisor]\nlog_format = \"json\"\n\n\
                 [[listener]]\nname = \"http\"\naddress = \"{addr}\"\n{nodelay}\n\
                 [worker]\n{}drain_timeout = \"5s\"\nready_timeout = \"30s\"\n",
                under_baton(server, dir.path(), addr, bins)?
            );
            crate::servers::baton_run(&bins.baton, dir.path(), &config)?
        }
    };
    let log = std::fs::File::create(dir.path().join("output.log"))
        .and_then(|f| Ok((f.try_clone()?, f)))
        .map_err(|e| format!("creating output.log: {e}"))?;
    command.stdin(Stdio::null()).stdout(log.0).stderr(log.1);
    guard
        .spawn(&mut command)
        .map_err(|e| format!("cannot start {server}: {e}"))?;
    let tail = || {
        let text = std::fs::read_to_string(dir.path().join("output.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    };
    if setup != Setup::Alone {
        wait_committed(&dir.path().join("output.log"), &mut guard)
            .map_err(|e| format!("{e}; its log: {}", tail()))?;
    }
    wait_answering(addr, &mut guard).map_err(|e| format!("{e}; its log: {}", tail()))?;
    let run = |requests: u64| {
        load::run(LoadConfig {
            addr,
            connections: 1,
            mode: Mode::KeepAlive,
            duration: Duration::from_secs(60),
            max_requests: requests,
            timeout: Duration::from_secs(5),
            path: "/".into(),
        })
    };
    run(WARM_UP);
    let requests = if setup == Setup::BatonNagle {
        NAGLE_REQUESTS
    } else {
        REQUESTS
    };
    let report = run(requests);
    let mut latencies: Vec<f64> = report
        .samples
        .iter()
        .filter(|s| s.class == Class::Ok)
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    if latencies.is_empty() {
        return Err(format!(
            "no request answered: {}",
            report.failures_summary()
        ));
    }
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    drop(guard);
    Ok(Latency {
        requests: report.samples.len() as u64,
        failed: report.failed(),
        reused: report.samples.iter().filter(|s| s.reused).count() as u64,
        mean_ms: latencies.iter().sum::<f64>() / latencies.len() as f64,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
    })
}

/// A Python server's executable.
fn venv(name: &str) -> Result<PathBuf, String> {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os("BATON_WRAP_VENV")
        .map(|v| PathBuf::from(v).join("bin").join(name))
        .into_iter()
        .chain([repository.join("target/wrap-venv/bin").join(name)])
        .find(|p| p.is_file())
        .or_else(|| procs::find_program(name, &[]))
        .ok_or_else(|| "not installed".to_string())
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .display()
        .to_string()
}

/// nginx.conf serving a fixed 200 on `addr` with one worker.
fn nginx_conf(dir: &Path, addr: SocketAddr) -> Result<PathBuf, String> {
    let prefix = dir.display();
    let conf = format!(
        "worker_processes 1;\nerror_log {prefix}/error.log;\nevents {{ worker_connections 1024; }}\n\
         http {{\n    access_log off;\n    keepalive_requests 1000000;\n\
         \x20   client_body_temp_path {prefix}/body;\n    proxy_temp_path {prefix}/proxy;\n\
         \x20   fastcgi_temp_path {prefix}/fastcgi;\n    uwsgi_temp_path {prefix}/uwsgi;\n\
         \x20   scgi_temp_path {prefix}/scgi;\n\
         \x20   server {{\n        listen {addr};\n        location / {{ return 200 \"ok\\n\"; }}\n    }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| format!("writing nginx.conf: {e}"))?;
    Ok(path)
}

/// `server` binding `addr` itself.
fn alone(server: &str, dir: &Path, addr: SocketAddr, bins: &Binaries) -> Result<Command, String> {
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let mut command;
    match server {
        "gunicorn" => {
            command = Command::new(venv("gunicorn")?);
            command
                .args(["-k", "gthread", "--threads", "4", "--workers", "1"])
                .args(["-b", &addr.to_string(), "app:application"])
                .current_dir(example("gunicorn"));
        }
        "uvicorn" => {
            command = Command::new(venv("uvicorn")?);
            command
                .args([
                    "app:app",
                    "--host",
                    &host,
                    "--port",
                    &port,
                    "--no-access-log",
                ])
                .current_dir(example("uvicorn"));
        }
        "hypercorn" => {
            command = Command::new(venv("hypercorn")?);
            command
                .args(["app:app", "--bind", &addr.to_string()])
                .current_dir(example("uvicorn"));
        }
        _ => {
            command = Command::new(bins.nginx.as_deref().ok_or("not installed")?);
            command
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(nginx_conf(dir, addr)?)
                .args(["-e", "stderr", "-g", "daemon off; pid nginx.pid;"])
                .current_dir(dir);
        }
    }
    command.env("HOME", dir).env("PYTHONDONTWRITEBYTECODE", "1");
    Ok(command)
}

/// The `[worker]` body that runs `server` on baton's listener `http`.
fn under_baton(
    server: &str,
    dir: &Path,
    addr: SocketAddr,
    bins: &Binaries,
) -> Result<String, String> {
    let env = format!(
        "env = {{ HOME = {:?}, PYTHONDONTWRITEBYTECODE = \"1\" }}\n",
        dir.display().to_string()
    );
    Ok(match server {
        "gunicorn" => format!(
            "command = [{:?}, \"-k\", \"gthread\", \"--threads\", \"4\", \"--workers\", \"1\", \"app:application\"]\n\
             cwd = {:?}\n{env}protocol = \"systemd\"\nready = \"notify\"\n",
            venv("gunicorn")?.display().to_string(),
            example("gunicorn"),
        ),
        "uvicorn" => format!(
            "command = [{:?}, \"app:app\", \"--fd\", \"{{fd:http}}\", \"--no-access-log\"]\n\
             cwd = {:?}\n{env}protocol = \"args\"\nready = \"delay:1s\"\n",
            venv("uvicorn")?.display().to_string(),
            example("uvicorn"),
        ),
        "hypercorn" => format!(
            "command = [{:?}, \"app:app\", \"--bind\", \"fd://{{fd:http}}\"]\n\
             cwd = {:?}\n{env}protocol = \"args\"\nready = \"delay:1s\"\n",
            venv("hypercorn")?.display().to_string(),
            example("uvicorn"),
        ),
        _ => format!(
            "command = [{:?}, \"-p\", {:?}, \"-c\", {:?}, \"-e\", \"stderr\", \"-g\", \"daemon off; pid nginx-{{generation}}.pid;\"]\n\
             protocol = \"args\"\nenv = {{ NGINX = \"{{fd:http}};\" }}\nnonblocking = true\n\
             ready = \"delay:1s\"\nstop_signal = \"SIGQUIT\"\n",
            bins.nginx
                .as_deref()
                .ok_or("not installed")?
                .display()
                .to_string(),
            dir.display().to_string(),
            nginx_conf(dir, addr)?.display().to_string(),
        ),
    })
}

/// Waits until the master's JSON log (in `path`) says generation 1
/// committed.
fn wait_committed(path: &Path, guard: &mut Guard) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains("\"message\":\"reload committed\"") {
            return Ok(());
        }
        if let Some(status) = guard.exited() {
            return Err(format!("baton exited ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "generation 1 not committed within {START_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a `GET /` on `addr` is answered 2xx.
fn wait_answering(addr: SocketAddr, guard: &mut Guard) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let once = load::run(LoadConfig {
            addr,
            connections: 1,
            mode: Mode::NewConnection,
            duration: Duration::from_secs(5),
            max_requests: 1,
            timeout: Duration::from_secs(2),
            path: "/".into(),
        });
        if once.ok() == 1 {
            return Ok(());
        }
        if let Some(status) = guard.exited() {
            return Err(format!("it exited ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no answer on {addr} within {START_TIMEOUT:?}: {}",
                once.failures_summary()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cell(latency: &Result<Latency, String>) -> String {
    match latency {
        Ok(l) => format!(
            "{:.3} / {:.3} / {:.3} ({} failed of {})",
            l.mean_ms, l.p50_ms, l.p99_ms, l.failed, l.requests
        ),
        Err(e) => e.clone(),
    }
}

/// The markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "### Wrapped servers: keep-alive latency per request\n\n\
         One keep-alive connection, sequential requests; mean / p50 / p99 in ms. \
         On a busy machine the mean and p99 follow the scheduler: compare p50s.\n\n\
         | server | alone | under baton | baton / alone (mean / p50) | under baton, `nodelay = false` |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        let ratio = match (&row.alone, &row.baton) {
            (Ok(a), Ok(b)) => format!(
                "{:.2}× / {:.2}×",
                b.mean_ms / a.mean_ms,
                b.p50_ms / a.p50_ms
            ),
            _ => "—".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {ratio} | {} |\n",
            row.server,
            cell(&row.alone),
            cell(&row.baton),
            cell(&row.nagle)
        ));
    }
    out
}

/// The JSON record.
pub fn json(rows: &[Row]) -> serde_json::Value {
    let one = |latency: &Result<Latency, String>| match latency {
        Ok(l) => serde_json::json!({
            "requests": l.requests,
            "failed": l.failed,
            "reused": l.reused,
            "mean_ms": l.mean_ms,
            "p50_ms": l.p50_ms,
            "p99_ms": l.p99_ms,
        }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    rows.iter()
        .map(|r| {
            serde_json::json!({
                "server": r.server,
                "alone": one(&r.alone),
                "baton": one(&r.baton),
                "baton_nodelay_false": one(&r.nagle),
            })
        })
        .collect()
}
