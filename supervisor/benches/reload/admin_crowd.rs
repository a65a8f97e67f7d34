//! The admin endpoint under a crowd (`--only admin-crowd`): `/healthz`
//! latency, each probe on a new connection as a Kubernetes probe makes it,
//! while 2,000 idle keep-alive clients and a 200-connection slowloris (one
//! header byte a second per connection) hold the admin port, all from
//! loopback and so from one peer address. Target: p99 under 100 ms.

use crate::procs;
use crate::servers::Binaries;
use baton_tests::crowd::{Crowd, Kind};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Probes measured.
const PROBES: usize = 500;
/// Between two probes.
const PACE: Duration = Duration::from_millis(20);
/// A probe slower than this failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The figures.
pub struct Crowded {
    pub idle: usize,
    pub slowloris: usize,
    pub probes: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Connections the crowd (re)opened during the run.
    pub opened: u64,
    /// The master's open fds at the end of the run, and its limit.
    pub master_fds: usize,
    pub nofile: String,
}

/// Probes `/healthz` on one master, first alone, then under the crowd.
pub fn measure(bins: &Binaries, interrupted: &AtomicBool) -> Result<Vec<Crowded>, String> {
    let running = crate::admin_idle::start_master(bins, "admin-crowd", true)?;
    let (master, addr) = (running.pid, running.admin.ok_or("no admin endpoint")?);
    let mut out = Vec::new();
    for (idle, slowloris) in [(0, 0), (2000, 200)] {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        out.push(crowded(master, addr, idle, slowloris, interrupted));
    }
    procs::memory(master).ok_or("the master died under the crowd")?;
    drop(running);
    Ok(out)
}

fn crowded(
    master: nix::unistd::Pid,
    addr: SocketAddr,
    idle: usize,
    slowloris: usize,
    interrupted: &AtomicBool,
) -> Crowded {
    let limit = Duration::from_secs(60);
    let crowds = [
        Crowd::start(addr, Kind::IdleKeepAlive, idle, limit),
        Crowd::start(addr, Kind::Slowloris, slowloris, limit),
    ];
    // The crowd opens its connections in about a second; then it keeps
    // them open, reopening what the master closes.
    let settle = Instant::now() + Duration::from_secs(10);
    while crowds.iter().map(Crowd::opened).sum::<u64>() < (idle + slowloris) as u64
        && Instant::now() < settle
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut took = Vec::with_capacity(PROBES);
    let mut failed = 0;
    for _ in 0..PROBES {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        let start = Instant::now();
        match healthz(addr) {
            Ok(()) => took.push(start.elapsed().as_secs_f64() * 1000.0),
            Err(_) => failed += 1,
        }
        std::thread::sleep(PACE);
    }
    let opened = crowds.iter().map(Crowd::opened).sum();
    let master_fds = std::fs::read_dir(format!("/proc/{master}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let nofile = std::fs::read_to_string(format!("/proc/{master}/limits"))
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_default();
    drop(crowds);
    took.sort_by(f64::total_cmp);
    let at = |q: f64| {
        took.get(((took.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Crowded {
        idle,
        slowloris,
        probes: took.len() + failed,
        failed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: took.last().copied().unwrap_or(f64::NAN),
        opened,
        master_fds,
        nofile,
    }
}

/// One `GET /healthz` on a new connection, answered 200.
fn healthz(addr: SocketAddr) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("GET /healthz: {e}");
    let mut stream = std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(fail)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).map_err(fail)?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(response.lines().next().unwrap_or("").to_string());
    }
    Ok(())
}

/// The markdown table.
pub fn markdown(rows: &[Crowded]) -> String {
    let mut out = String::from(
        "| crowd on the admin port | probes | failed | p50 (ms) | p99 (ms) | max (ms) | crowd connections opened | master fds at the end (limit soft/hard) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for c in rows {
        let crowd = if c.idle + c.slowloris == 0 {
            "none".to_string()
        } else {
            format!(
                "{} idle keep-alive + {}-connection slowloris",
                c.idle, c.slowloris
            )
        };
        out.push_str(&format!(
            "| {crowd} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} ({}) |\n",
            c.probes, c.failed, c.p50_ms, c.p99_ms, c.max_ms, c.opened, c.master_fds, c.nofile
        ));
    }
    out
}

/// The JSON record.
pub fn json(rows: &[Crowded]) -> serde_json::Value {
    rows.iter().map(json_row).collect()
}

fn json_row(c: &Crowded) -> serde_json::Value {
    serde_json::json!({
        "idle_keepalive": c.idle,
        "slowloris": c.slowloris,
        "probes": c.probes,
        "failed": c.failed,
        "healthz_p50_ms": c.p50_ms,
        "healthz_p99_ms": c.p99_ms,
        "healthz_max_ms": c.max_ms,
        "crowd_connections_opened": c.opened,
        "master_fds": c.master_fds,
        "master_nofile": c.nofile,
    })
}
