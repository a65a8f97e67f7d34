//! The `soak` scenario: does the master's memory grow with reloads?
//!
//! `hello` with `app_config = ["hello.toml"]` under a light keep-alive
//! load; every reload writes a new greeting, and the reloads alternate
//! between in place and a new generation, so both transactions, their
//! drains and their records run as many times. The master's RSS is read
//! after [`BASELINE`] reloads (once the allocator has warmed up) and every
//! [`SAMPLE_EVERY`] reloads after, up to `--soak-reloads` (100,000 by
//! default). The verdict: RSS at the end within [`ALLOWED_GROWTH_KIB`] of
//! RSS at the baseline, and no failed request.

use crate::procs;
use crate::rollouts::Running;
use crate::servers::Binaries;
use baton_tests::load::Mode;
use nix::unistd::Pid;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// For `--only`.
pub const NAME: &str = "soak";
/// Reloads before the baseline sample.
const BASELINE: usize = 1_000;
/// Reloads between samples after it.
const SAMPLE_EVERY: usize = 10_000;
/// The growth from the baseline to the end that passes.
const ALLOWED_GROWTH_KIB: u64 = 1024;

/// What was measured.
pub struct Soak {
    /// (reloads done, master RSS in KiB), the first at [`BASELINE`].
    pub samples: Vec<(usize, u64)>,
    pub reloads: usize,
    pub seconds: f64,
    pub ok: u64,
    pub failed: u64,
}

impl Soak {
    /// RSS at the end less RSS at the baseline, in KiB.
    pub fn growth_kib(&self) -> i64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(first), Some(last)) => last.1 as i64 - first.1 as i64,
            _ => 0,
        }
    }

    /// Whether the master held its memory and failed no request.
    pub fn passed(&self) -> bool {
        self.failed == 0 && self.growth_kib() <= ALLOWED_GROWTH_KIB as i64
    }
}

/// Runs `reloads` reloads (at least [`BASELINE`]), or fewer if interrupted.
pub fn run(bins: &Binaries, reloads: usize, interrupted: &AtomicBool) -> Result<Soak, String> {
    let reloads = reloads.max(BASELINE);
    let worker = format!(
        "command = [{:?}]\napp_config = [\"hello.toml\"]\n",
        bins.hello.display().to_string()
    );
    let running = Running::start(
        bins,
        "soak",
        &worker,
        &[("hello.toml", "greeting = \"hello\"\n")],
    )?;
    let master = running.master()?;
    // A load keeps every sample: a new one each [`SAMPLE_EVERY`] reloads
    // keeps the bench's own memory bounded.
    let start_load = || crate::rollouts::load(running.addr(), Mode::KeepAlive, 2);
    let mut handle = start_load();
    let (mut ok, mut failed) = (0, 0);
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut done = 0;
    while done < reloads && !interrupted.load(Ordering::Relaxed) {
        running.write("hello.toml", &format!("greeting = \"hello {done}\"\n"))?;
        let mode = if done % 2 == 0 {
            "in_place"
        } else {
            "new_generation"
        };
        let (reply, _) = running.reload(mode)?;
        if !reply.ok {
            handle.stop();
            return Err(format!(
                "reload {done} ({mode}) failed: {}",
                reply.error.unwrap_or_default()
            ));
        }
        done += 1;
        if done == BASELINE || (done > BASELINE && (done - BASELINE) % SAMPLE_EVERY == 0) {
            samples.push((done, rss(master)?));
            let report = std::mem::replace(&mut handle, start_load()).stop();
            ok += report.ok();
            failed += report.failed();
        }
    }
    if samples.last().is_some_and(|s| s.0 != done) {
        samples.push((done, rss(master)?));
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = handle.stop();
    Ok(Soak {
        samples,
        reloads: done,
        seconds,
        ok: ok + report.ok(),
        failed: failed + report.failed(),
    })
}

fn rss(master: Pid) -> Result<u64, String> {
    procs::memory(master)
        .map(|m| m.rss_kib)
        .ok_or_else(|| "the master is gone".to_string())
}

/// The markdown table.
pub fn markdown(soak: &Soak) -> String {
    let mut out = format!(
        "### Soak: master memory over {} reloads (half in place, half new generations)\n\n\
         {:.0} s, {} requests ok, {} failed under keep-alive load; RSS growth after \
         {BASELINE} reloads: {} KiB ({}, allowed {ALLOWED_GROWTH_KIB} KiB)\n\n\
         | reloads | master RSS (KiB) |\n| ---: | ---: |\n",
        soak.reloads,
        soak.seconds,
        soak.ok,
        soak.failed,
        soak.growth_kib(),
        if soak.passed() { "held" } else { "NOT HELD" },
    );
    for (reloads, rss) in &soak.samples {
        out.push_str(&format!("| {reloads} | {rss} |\n"));
    }
    out
}

/// The JSON record.
pub fn json(soak: &Soak) -> serde_json::Value {
    serde_json::json!({
        "reloads": soak.reloads,
        "seconds": soak.seconds,
        "ok": soak.ok,
        "failed": soak.failed,
        "rss_kib": soak.samples.iter().map(|(n, rss)| serde_json::json!([n, rss])).collect::<Vec<_>>(),
        "growth_kib": soak.growth_kib(),
        "held": soak.passed(),
    })
}
