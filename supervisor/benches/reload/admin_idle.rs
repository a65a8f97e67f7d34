//! What the admin endpoint costs an idle master (`--only admin-idle`): the
//! master's RSS, and its threads' context switches over 10 s with nothing
//! to do (each wake-up of a thread is one), with and without
//! `[supervisor] admin`, after a few scrapes of `/metrics` and `/status`.

use crate::baton_log::{message, BatonLog};
use crate::procs::{self, Guard, TempDir};
use crate::servers::Binaries;
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the idle master is watched.
const IDLE: Duration = Duration::from_secs(10);
/// Scrapes of each endpoint before it idles.
const SCRAPES: usize = 3;

/// One master, idle.
pub struct Idle {
    pub admin: bool,
    pub rss_kib: u64,
    /// Context switches of all the master's threads over [`IDLE`].
    pub wakeups: u64,
}

/// Measures a master without the admin endpoint, then one with it.
pub fn measure(bins: &Binaries, interrupted: &AtomicBool) -> Result<Vec<Idle>, String> {
    let mut out = Vec::new();
    for admin in [false, true] {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        out.push(measure_one(bins, admin, interrupted)?);
    }
    Ok(out)
}

/// A master running `hello`, with the admin endpoint if `admin`: its pid
/// and the admin endpoint's address; dropped, it is stopped and its temp
/// dir removed.
pub struct AdminMaster {
    _guard: Guard,
    pub pid: Pid,
    pub admin: Option<SocketAddr>,
    _dir: TempDir,
}

/// Starts an [`AdminMaster`] and waits until generation 1 serves.
pub fn start_master(bins: &Binaries, name: &str, admin: bool) -> Result<AdminMaster, String> {
    let dir = TempDir::new(name).map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let admin_line = if admin {
        "admin = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let config = format!(
        "[supervisor]\nlog_format = \"json\"\n{admin_line}\n\
         [[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n\
         [worker]\ncommand = [{:?}]\n",
        bins.hello.display().to_string(),
    );
    let config_path = dir.path().join("baton.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("writing baton.toml: {e}"))?;
    let mut guard = Guard::default();
    let pid = guard
        .spawn(
            Command::new(&bins.baton)
                .arg("run")
                .arg("-c")
                .arg(&config_path)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .map_err(|e| format!("cannot start baton: {e}"))?;
    let stderr = guard
        .child_mut(pid)
        .and_then(|c| c.stderr.take())
        .ok_or("baton has no stderr")?;
    let log = BatonLog::start(stderr);
    log.wait_for(0, Duration::from_secs(20), |e| {
        message(e) == "reload committed"
    })
    .ok_or("generation 1 was not committed")?;
    let admin = if admin {
        let bound = log
            .wait_for(0, Duration::from_secs(5), |e| {
                message(e) == "admin endpoint bound"
            })
            .ok_or("no `admin endpoint bound` event")?;
        let addr: SocketAddr = crate::baton_log::field(&bound, "address")
            .parse()
            .map_err(|e| format!("bad admin address: {e}"))?;
        Some(addr)
    } else {
        None
    };
    Ok(AdminMaster {
        _guard: guard,
        pid,
        admin,
        _dir: dir,
    })
}

fn measure_one(bins: &Binaries, admin: bool, interrupted: &AtomicBool) -> Result<Idle, String> {
    let running = start_master(bins, "admin-idle", admin)?;
    let master = running.pid;
    if let Some(addr) = running.admin {
        for _ in 0..SCRAPES {
            for path in ["/metrics", "/status"] {
                scrape(addr, path)?;
            }
        }
    }
    // Let what the start and the scrapes set in motion settle.
    std::thread::sleep(Duration::from_secs(1));
    let rss_kib = procs::memory(master).ok_or("the master is gone")?.rss_kib;
    let before = context_switches(master);
    let until = Instant::now() + IDLE;
    while Instant::now() < until && !interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let wakeups = context_switches(master).saturating_sub(before);
    drop(running);
    Ok(Idle {
        admin,
        rss_kib,
        wakeups,
    })
}

/// One `GET path`, answered 200.
fn scrape(addr: SocketAddr, path: &str) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("GET {path}: {e}");
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "GET {path}: {}",
            response.lines().next().unwrap_or("")
        ));
    }
    Ok(())
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn context_switches(pid: Pid) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The markdown table.
pub fn markdown(idle: &[Idle]) -> String {
    let mut out = String::from(
        "| master | RSS (KiB) | context switches in 10 s idle |\n| --- | ---: | ---: |\n",
    );
    for i in idle {
        let name = if i.admin {
            "with `admin`, after 3 scrapes"
        } else {
            "without `admin`"
        };
        out.push_str(&format!("| {name} | {} | {} |\n", i.rss_kib, i.wakeups));
    }
    out
}

/// The JSON record.
pub fn json(idle: &[Idle]) -> serde_json::Value {
    idle.iter()
        .map(|i| {
            serde_json::json!({
                "admin": i.admin,
                "rss_kib": i.rss_kib,
                "context_switches_10s_idle": i.wakeups,
            })
        })
        .collect()
}
