//! The `baton` command line: `run` and `check` work on a config; every other
//! command talks to the running master over its control socket and reports
//! what really happened.

use crate::config::{parse_duration, Config};
use crate::control::client::{self, ClientError};
use crate::control::protocol::{ReloadOutcome, Reply, Request, Status};
use crate::master::Origin;
use crate::upgrade::handoff::Takeover;
use crate::upgrade::Program;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// baton: a hot-restart supervisor. Reloads and upgrades drop no connection.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about,
    arg_required_else_help = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// The configuration file. `run` and `check` load it; other commands
    /// read only its `control_socket` (and `pid_file` for -s) to find the
    /// master, which always re-reads the file it was started with.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        default_value = "baton.toml"
    )]
    pub config: PathBuf,
    /// The master's control socket (instead of finding it through the config).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// nginx-compatible: signal the master (found through its control socket, else a checked pid file).
    #[arg(short = 's', value_enum, value_name = "SIGNAL")]
    pub signal: Option<NginxSignal>,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the master in the foreground.
    Run {
        /// Reload when the config, an app_config file or the worker's
        /// executable changes (an app file in place, the executable with a
        /// new generation); `--watch PATH` (repeatable) also watches PATH,
        /// a file or a directory, whose change starts a new generation.
        #[arg(long, value_name = "PATH", num_args = 0..=1, action = clap::ArgAction::Append)]
        watch: Option<Vec<PathBuf>>,
    },
    /// Validate a configuration without touching a running master (like `nginx -t`).
    Check,
    /// Reload: start a new generation, wait until it is ready, drain the old one.
    Reload {
        /// How long to wait for the outcome. A reload on probation ends
        /// with it; running out while it is on probation exits 3, stating
        /// where it stands (the rollout goes on).
        #[arg(long, value_parser = duration, default_value = "10m")]
        timeout: Duration,
        /// Send this share of new connections (e.g. 10%) to the new
        /// generation, until `baton promote`, `baton rollback` or the end of
        /// `probation`.
        #[arg(long, value_name = "PERCENT")]
        canary: Option<String>,
        /// Apply only the app_config files and log filters, in every running
        /// worker, or fail with the reason why that cannot be done.
        #[arg(long, conflicts_with = "new_generation")]
        in_place: bool,
        /// Replace the worker processes even if the change could be applied
        /// in place.
        #[arg(long)]
        new_generation: bool,
        /// The version being rolled out (the deploy tool's own: a git sha,
        /// a release): when the current generation was committed with the
        /// same one, nothing is done (outcome `unchanged`).
        #[arg(long, value_name = "VERSION")]
        if_version: Option<String>,
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// End the probation of the reload under way and keep its generation.
    Promote {
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// End the probation of the reload under way and go back to the
    /// generation it replaced.
    Rollback {
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// Replace the master by the binary at its path, without dropping a connection.
    Upgrade {
        /// How long to wait for the outcome.
        #[arg(long, value_parser = duration, default_value = "10m")]
        timeout: Duration,
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// Replace the master process (the binary at its path): the listeners
    /// stay open, the new master adopts the workers and replaces them as a
    /// reload does (drained), or with --hard stops them at once.
    Restart {
        /// Stop the old workers at once instead of draining them.
        #[arg(long)]
        hard: bool,
        /// How long to wait for the new master's generation.
        #[arg(long, value_parser = duration, default_value = "10m")]
        timeout: Duration,
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// Show the master, listeners, generations and workers.
    Status {
        /// Print JSON (the format is documented in docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// For a `preStop` hook or a deploy script: /readyz answers 503 at
    /// once, the workers serve --grace more (load balancers notice), then
    /// the master stops gracefully.
    Drain {
        /// How long the workers go on serving before they drain.
        #[arg(long, value_parser = duration, default_value = "5s")]
        grace: Duration,
        /// Return once the master has exited, not when the drain began.
        #[arg(long)]
        wait: bool,
        /// With --wait: how long to wait for the master to exit.
        #[arg(long, value_parser = duration, default_value = "10m")]
        timeout: Duration,
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// Stop the master: drain every worker first, or with --fast stop them now.
    Stop {
        /// Fast stop (like SIGTERM) instead of graceful (like SIGQUIT).
        #[arg(long)]
        fast: bool,
        /// How long to wait for the master to exit.
        #[arg(long, value_parser = duration, default_value = "10m")]
        timeout: Duration,
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// Reopen the master's log file and tell workers to reopen theirs.
    Reopen {
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
    /// Change the number of workers: +N, -N or N.
    Scale {
        /// +N adds, -N removes, N sets the count.
        #[arg(allow_hyphen_values = true, value_parser = scale_change)]
        change: ScaleArg,
        /// Print the master's answer as JSON (as the admin endpoint's
        /// `POST` answers it).
        #[arg(long)]
        json: bool,
    },
}

/// `-s` signal names, as nginx spells them.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NginxSignal {
    /// SIGHUP: reload.
    Reload,
    /// SIGINT: fast stop (nginx's `stop`, whatever `[supervisor] sigterm` says).
    Stop,
    /// SIGQUIT: graceful stop.
    Quit,
    /// SIGUSR1: reopen logs.
    Reopen,
}

mod signal;

/// A parsed `scale` argument.
#[derive(Debug, Clone, Copy)]
pub enum ScaleArg {
    /// +N or -N.
    By(i64),
    /// N.
    To(i64),
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn scale_change(s: &str) -> Result<ScaleArg, String> {
    let bad = || format!("invalid scale {s:?}: expected +N, -N or N");
    let number = |n: &str| n.parse::<i64>().map_err(|_| bad());
    if let Some(n) = s.strip_prefix('+') {
        Ok(ScaleArg::By(number(n)?))
    } else if let Some(n) = s.strip_prefix('-') {
        Ok(ScaleArg::By(-number(n)?))
    } else {
        Ok(ScaleArg::To(number(s)?))
    }
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let Some(command) = cli.command else {
        if let Some(signal) = cli.signal {
            quiet_on_closed_stdout();
            if let Err(e) = config_exists(&cli.config, cli.socket.as_deref()) {
                eprintln!("baton: {e}");
                return 2;
            }
            return report(
                signal::send(&cli.config, cli.socket.as_deref(), signal).map(|()| 0),
                1,
            );
        }
        eprintln!("baton: a command or -s SIGNAL is required (see baton --help)");
        return 2;
    };
    if !matches!(command, Command::Run { .. }) {
        quiet_on_closed_stdout();
    }
    // `run` and `check` load the config (a missing one fails them, exit 1);
    // the other commands only look for the master through it (exit 2, as
    // when no master answers).
    let loads = matches!(command, Command::Run { .. } | Command::Check);
    let socket = if loads { None } else { cli.socket.as_deref() };
    if let Err(e) = config_exists(&cli.config, socket) {
        eprintln!("baton: {e}");
        return if loads { 1 } else { 2 };
    }
    match command {
        Command::Run { watch } => {
            let watch = match watch.as_deref().map(crate::watch::Watch::new).transpose() {
                Ok(watch) => watch,
                Err(e) => {
                    eprintln!("baton: {e:#}");
                    return 1;
                }
            };
            report(run(&cli.config, watch).map(|()| 0), 1)
        }
        Command::Check => check(&cli.config),
        command => {
            let socket = cli.socket.unwrap_or_else(|| control_socket(&cli.config));
            match control(&socket, command) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("baton: {e}");
                    if matches!(e, ClientError::Unreachable { .. }) {
                        2
                    } else {
                        1
                    }
                }
            }
        }
    }
}

/// `baton check`: the config, then what a reload would meet (see
/// [`crate::check`]); exit 1 naming every problem.
fn check(path: &Path) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("baton: {e}");
            return 1;
        }
    };
    let problems = crate::check::problems(&config);
    if problems.is_empty() {
        println!("{}", config.summary());
        return 0;
    }
    for problem in &problems {
        eprintln!("baton: {}: {problem}", config.path.display());
    }
    1
}

/// A command that only talks to the master still needs its config to find
/// it: say so plainly when there is none (rather than naming a socket path
/// derived from a file that does not exist).
fn config_exists(config: &Path, socket: Option<&Path>) -> Result<(), String> {
    if socket.is_some() || config.exists() {
        return Ok(());
    }
    if config == Path::new("baton.toml") {
        Err("no ./baton.toml here: pass -c FILE (the master's config) or --socket PATH".into())
    } else {
        Err(format!(
            "config file {} does not exist: pass -c FILE (the master's config) or --socket PATH",
            config.display()
        ))
    }
}

/// A command whose output goes to a pipe that was closed (`baton status |
/// head -1`) stops there, silently, as Unix tools do: SIGPIPE's default
/// action, which Rust replaces by an error every `println!` would panic on.
/// Not for `run`: the master must survive a closed pipe.
fn quiet_on_closed_stdout() {
    // SAFETY: setting a signal's disposition to its default runs no code of
    // ours in a handler; the CLI has no other threads yet.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

fn report(result: anyhow::Result<i32>, failure: i32) -> i32 {
    result.unwrap_or_else(|e| {
        eprintln!("baton: {e:#}");
        failure
    })
}

/// Where the master's control socket is, read leniently from the config: a
/// config the master will reject must still lead `baton reload` to the
/// master, which then reports the error with its location.
pub(crate) fn control_socket(config: &Path) -> PathBuf {
    supervisor_path(config, "control_socket").unwrap_or_else(|| {
        let config = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
        config.parent().unwrap_or(Path::new("/")).join("baton.sock")
    })
}

/// `[supervisor] KEY` of the config as a path resolved against its
/// directory, from whatever of the file parses.
pub(crate) fn supervisor_path(config: &Path, key: &str) -> Option<PathBuf> {
    let path = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    // Read as the master reads it: a FIFO or a huge file there must not
    // hang the CLI either.
    let table = crate::config::read_config_file(&path)
        .ok()?
        .parse::<toml::Table>()
        .ok()?;
    let value = table.get("supervisor")?.get(key)?.as_str()?;
    Some(dir.join(value))
}

fn control(socket: &Path, command: Command) -> Result<i32, ClientError> {
    const QUICK: Duration = Duration::from_secs(30);
    match command {
        Command::Run { .. } | Command::Check => unreachable!("handled by main"),
        Command::Reload {
            timeout,
            canary,
            in_place,
            new_generation,
            if_version,
            json,
        } => {
            let mode = match (in_place, new_generation) {
                (true, _) => Some("in_place".to_string()),
                (_, true) => Some("new_generation".to_string()),
                _ => None,
            };
            let request = Request::Reload {
                canary,
                mode,
                if_version,
            };
            reload(socket, &request, timeout, json)
        }
        Command::Restart {
            hard,
            timeout,
            json,
        } => {
            let started = Instant::now();
            let reply = client::request(socket, &Request::Restart { hard }, timeout)?;
            let Some(r) = reply.result.as_ref().filter(|_| reply.ok) else {
                return Ok(answer(&reply, json, || {}));
            };
            let since = r["requested_at"].as_f64().unwrap_or(0.0);
            let left = timeout.saturating_sub(started.elapsed());
            follow_first_reload(socket, "restart", since, left, json)
        }
        Command::Upgrade { timeout, json } => {
            let started = Instant::now();
            let reply = client::request(socket, &Request::Upgrade {}, timeout)?;
            let Some(r) = reply.result.as_ref().filter(|_| reply.ok) else {
                return Ok(answer(&reply, json, || {}));
            };
            if r["mode"] == "exec" {
                // The master re-executed in place: follow its first reload.
                let since = r["requested_at"].as_f64().unwrap_or(0.0);
                let left = timeout.saturating_sub(started.elapsed());
                return follow_first_reload(socket, "upgrade", since, left, json);
            }
            Ok(answer(&reply, json, || {
                println!(
                    "upgraded: master {} -> {} (generation {})",
                    r["old_pid"], r["new_pid"], r["generation"]
                )
            }))
        }
        Command::Status { json } => {
            let reply = client::request(socket, &Request::Status {}, QUICK)?;
            if let Some(status) = result::<Status>(&reply) {
                if json {
                    let text = serde_json::to_string_pretty(&status).expect("status serializes");
                    println!("{text}");
                } else {
                    print!("{}", crate::status::render(&status));
                }
            }
            Ok(exit(&reply))
        }
        Command::Drain {
            grace,
            wait,
            timeout,
            json,
        } => {
            let known = listening_pid(socket);
            let grace_ms = grace.as_millis() as u64;
            let reply = client::request(socket, &Request::Drain { grace_ms }, QUICK)?;
            let pid = known
                .or_else(|| reply.result.as_ref().and_then(|r| r["pid"].as_i64()))
                .unwrap_or(0);
            let code = answer(&reply, json, || {
                println!("master {pid} draining: not ready from now on, stopping in {grace:?}")
            });
            if code != 0 || !wait {
                return Ok(code);
            }
            Ok(wait_for_exit(pid, timeout, json))
        }
        Command::Stop {
            fast,
            timeout,
            json,
        } => {
            // The pid first, as this process sees it: a master with nothing
            // left to drain exits at once, possibly before its answer to
            // `stop` is written.
            let known = listening_pid(socket);
            let pid = match client::request(socket, &Request::Stop { fast }, QUICK) {
                Ok(reply) if !reply.ok => return Ok(answer(&reply, json, || {})),
                Ok(reply) => {
                    let answered = reply.result.as_ref().and_then(|r| r["pid"].as_i64());
                    answer(&reply, json, || {});
                    match known.or(answered) {
                        Some(pid) => pid,
                        None => return Ok(exit(&reply)),
                    }
                }
                Err(ClientError::BadReply(_)) if known.is_some() => {
                    let pid = known.expect("checked");
                    answer(&Reply::ok(serde_json::json!({ "pid": pid })), json, || {});
                    pid
                }
                Err(e) => return Err(e),
            };
            Ok(wait_for_exit(pid, timeout, json))
        }
        Command::Promote { json } | Command::Rollback { json } => {
            let promote = matches!(command, Command::Promote { .. });
            let request = if promote {
                Request::Promote {}
            } else {
                Request::Rollback {}
            };
            let reply = client::request(socket, &request, QUICK)?;
            Ok(answer(&reply, json, || {
                let generation = reply.result.as_ref().map(|r| r["generation"].clone());
                match generation {
                    Some(g) if promote => {
                        println!("generation {g} promoted: the generation it replaced drains")
                    }
                    Some(g) => println!(
                        "generation {g} rolled back: the generation it replaced serves again"
                    ),
                    None => {}
                }
            }))
        }
        Command::Reopen { json } => {
            let reply = client::request(socket, &Request::Reopen {}, QUICK)?;
            Ok(answer(&reply, json, || {
                if let Some(workers) = reply.result.as_ref().and_then(|r| r["workers"].as_u64()) {
                    println!("logs reopened; {workers} worker(s) told to reopen theirs");
                }
            }))
        }
        Command::Scale { change, json } => {
            let (by, to) = match change {
                ScaleArg::By(n) => (Some(n), None),
                ScaleArg::To(n) => (None, Some(n)),
            };
            let reply = client::request(socket, &Request::Scale { by, to }, QUICK)?;
            Ok(answer(&reply, json, || {
                if let Some(r) = &reply.result {
                    println!(
                        "generation {}: {} -> {} workers",
                        r["generation"], r["from"], r["processes"]
                    );
                }
            }))
        }
    }
}

/// Prints the master's answer: with `json`, the reply itself (what the
/// admin endpoint's `POST` answers), else what `text` prints; a failure's
/// reason goes to stderr either way. Returns the exit status.
fn answer(reply: &Reply, json: bool, text: impl FnOnce()) -> i32 {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(reply).expect("a reply serializes")
        );
    } else if reply.ok {
        text();
    }
    exit(reply)
}

/// `baton reload --timeout` ran out while the new generation is live on
/// probation: not a failure, the rollout goes on (like `kubectl rollout
/// status`'s own exit code for a rollout still in progress).
pub const EXIT_ON_PROBATION: i32 = 3;

/// How often `baton reload` looks for its generation going live.
const PROBATION_POLL: Duration = Duration::from_millis(200);

/// `baton reload`: waits for the outcome, says at once when the new
/// generation goes live on probation (and where it stands), and reports a
/// timeout during probation as such ([`EXIT_ON_PROBATION`]).
fn reload(
    socket: &Path,
    request: &Request,
    timeout: Duration,
    json: bool,
) -> Result<i32, ClientError> {
    let rollout = || {
        client::request(socket, &Request::Status {}, Duration::from_secs(2))
            .ok()
            .and_then(|reply| result::<Status>(&reply))
            .and_then(|status| status.rollout)
    };
    // A rollout already under way is not this reload's (it waits for it).
    let before = rollout().map(|r| r.generation);
    let mut live: Option<u64> = None;
    let answer = client::request_watching(socket, request, timeout, PROBATION_POLL, || {
        if live.is_some() {
            return;
        }
        if let Some(r) = rollout().filter(|r| Some(r.generation) != before) {
            live = Some(r.generation);
            if !json {
                print_rollout(&r);
            }
        }
    });
    match answer {
        Ok(reply) => Ok(self::answer(&reply, json, || {
            if let Some(outcome) = result::<ReloadOutcome>(&reply) {
                print_outcome(&outcome);
            }
        })),
        Err(ClientError::Timeout(waited)) => {
            // Still on probation: say where it stands, not that it failed.
            match rollout().filter(|r| Some(r.generation) != before) {
                Some(r) => {
                    let ends = match r.left_s {
                        Some(left) => format!("it ends in {left:.1}s"),
                        None => "it lasts until `baton promote` or `baton rollback`".into(),
                    };
                    let message = format!(
                        "stopped waiting after {waited:?}: generation {} is still on probation ({}, {:.1}s since cutover, generation {} on standby); {ends}",
                        r.generation,
                        share(&r),
                        r.elapsed_s,
                        r.standby
                    );
                    if json {
                        let reply = Reply::failed(message.clone(), &r);
                        let text = serde_json::to_string_pretty(&reply).expect("serializes");
                        println!("{text}");
                    }
                    eprintln!("baton: {message}");
                    Ok(EXIT_ON_PROBATION)
                }
                None => Err(ClientError::Timeout(waited)),
            }
        }
        Err(e) => Err(e),
    }
}

fn share(r: &crate::control::protocol::RolloutStatus) -> String {
    match r.canary_percent {
        Some(percent) => format!("canary: {percent}% of new connections"),
        None => "all new connections".into(),
    }
}

/// The moment a reload's generation goes live on probation.
fn print_rollout(r: &crate::control::protocol::RolloutStatus) {
    println!(
        "generation {} is live on probation ({}); generation {} on standby",
        r.generation,
        share(r),
        r.standby
    );
    match r.left_s {
        Some(left) => {
            println!("  probation ends in {left:.1}s, or at `baton promote` / `baton rollback`")
        }
        None => println!("  until `baton promote` or `baton rollback`"),
    }
}

/// After an in-place upgrade: waits for the re-executed master's first
/// reload (trigger `upgrade`) and reports it.
/// Follows the first reload of a master that replaced this one's image or
/// process (`trigger`: `upgrade` in place, `restart`), finished since
/// `since`: prints its outcome.
fn follow_first_reload(
    socket: &Path,
    trigger: &str,
    since: f64,
    timeout: Duration,
    json: bool,
) -> Result<i32, ClientError> {
    let started = Instant::now();
    loop {
        // The socket is briefly gone while the new image starts.
        if let Ok(reply) = client::request(socket, &Request::Status {}, Duration::from_secs(5)) {
            if let Some(status) = result::<Status>(&reply) {
                if let Some(outcome) = status
                    .last_reload
                    .filter(|r| r.trigger == trigger && r.finished_at >= since)
                {
                    if json {
                        let reply = match &outcome.reason {
                            None => Reply::ok(&outcome),
                            Some(reason) => Reply::failed(reason.clone(), &outcome),
                        };
                        return Ok(answer(&reply, true, || {}));
                    }
                    if trigger == "restart" {
                        println!(
                            "restarted: master {} adopted the workers",
                            status.master.pid
                        );
                    } else {
                        println!(
                            "upgraded in place: master {} re-executed",
                            status.master.pid
                        );
                    }
                    print_outcome(&outcome);
                    if let Some(reason) = &outcome.reason {
                        eprintln!("baton: the new binary's generation failed: {reason}; the adopted workers keep serving");
                        return Ok(1);
                    }
                    return Ok(0);
                }
            }
        }
        if started.elapsed() > timeout {
            return Err(ClientError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn result<T: serde::de::DeserializeOwned>(reply: &Reply) -> Option<T> {
    serde_json::from_value(reply.result.clone()?).ok()
}

/// 0 for success; otherwise prints the error and returns 1.
fn exit(reply: &Reply) -> i32 {
    if reply.ok {
        return 0;
    }
    eprintln!(
        "baton: {}",
        reply.error.as_deref().unwrap_or("request failed")
    );
    1
}

fn print_outcome(outcome: &ReloadOutcome) {
    if outcome.outcome == "unchanged" {
        println!(
            "generation {} already runs version {}: nothing to do",
            outcome.generation,
            outcome.deploy_version.as_deref().unwrap_or("?")
        );
        return;
    }
    match (&outcome.kind[..], &outcome.version) {
        ("in_place", Some(version)) => println!(
            "reload in place to version {version} {} (trigger: {}, generation {})",
            outcome.outcome, outcome.trigger, outcome.generation
        ),
        ("in_place", None) => println!(
            "reload in place {} (trigger: {}, generation {})",
            outcome.outcome, outcome.trigger, outcome.generation
        ),
        _ => println!(
            "reload to generation {} {} (trigger: {})",
            outcome.generation, outcome.outcome, outcome.trigger
        ),
    }
    for phase in &outcome.phases {
        println!("  {:<9} {:>9.1} ms", phase.phase, phase.ms);
    }
    // A failure's phase and reason go to stderr with the exit status.
    if outcome.failed_phase.is_none() {
        let pids: Vec<String> = outcome.pids.iter().map(i32::to_string).collect();
        println!("  workers: {}", pids.join(" "));
    }
}

/// The pid of the master listening on `socket`, as this process sees it
/// (asked before a request after which the master may exit at once).
fn listening_pid(socket: &Path) -> Option<i64> {
    std::os::unix::net::UnixStream::connect(socket)
        .ok()
        .and_then(|stream| signal::listening_pid(&stream).ok())
        .map(i64::from)
}

/// Waits until master `pid` has exited: 0, or 1 past `timeout`. Says so
/// unless `quiet` (the answer was printed as JSON).
fn wait_for_exit(pid: i64, timeout: Duration, quiet: bool) -> i32 {
    let started = Instant::now();
    while process_alive(pid as i32) {
        if started.elapsed() > timeout {
            eprintln!("baton: master {pid} still running after {timeout:?}");
            return 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !quiet {
        println!("master {pid} stopped");
    }
    0
}

pub(crate) fn process_alive(pid: i32) -> bool {
    // A zombie has exited: only its parent's wait is missing.
    crate::orphans::stat(pid).is_some_and(|fields| fields.split_whitespace().next() != Some("Z"))
}

fn run(path: &Path, watch: Option<crate::watch::Watch>) -> anyhow::Result<()> {
    // A master the keeper started inherited the signals it ignores.
    if std::env::var_os(crate::keeper::FDS_ENV).is_some() {
        crate::keeper::restore_signals();
    }
    // A container's PID 1 becomes the keeper, the master its child: a
    // dead master does not take the pid namespace with it.
    if std::process::id() == 1 && std::env::var_os(crate::keeper::KEEPER_FD_ENV).is_none() {
        if let Some(code) = crate::keeper::init() {
            std::process::exit(code);
        }
    }
    let program = Program::current();
    crate::fds::close_on_exec_inherited().context("marking inherited fds close-on-exec")?;
    crate::fds::raise_nofile();
    let path = path.to_owned();
    // One event loop on one thread; the main thread forks the workers
    // (`crate::forker` says why).
    crate::forker::run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the event loop")?;
        let result = runtime.block_on(master(&path, program, watch));
        // Dropping a runtime waits for its blocking tasks without end: a
        // config read or a `baton status` listing stuck in the kernel must
        // not keep a master that is done from exiting.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        result
    })
}

/// The master, from its takeover or exec state, config and logging to its
/// event loop's end.
async fn master(
    path: &Path,
    program: Program,
    watch: Option<crate::watch::Watch>,
) -> anyhow::Result<()> {
    // Started by an upgrade: the old master's listeners come first, and
    // a config it rejects is reported back to it.
    let takeover = Takeover::receive_from_env().await?;
    let exec_state = crate::upgrade::exec::take_state_from_env()?;
    // Started by the keeper: the workers of a master that died, and the
    // configuration they run.
    // Or by systemd, with what its fd store kept.
    let adoption = match crate::adopt::Adoption::take_from_env()? {
        None if takeover.is_none() && exec_state.is_none() => crate::fdstore::take_adoption()?,
        adoption => adoption,
    };
    // A fresh start may come with sockets from systemd; an upgraded
    // master gets the listeners from the old one instead (and an
    // in-place one still sees the variables, with its pid).
    let activated = match (&takeover, &exec_state, &adoption) {
        (None, None, None) => crate::activation::take_from_env()?,
        _ => Vec::new(),
    };
    // A restart reads the file, as a reload does; an adoption after a
    // death carries on with what runs.
    let running = adoption
        .as_ref()
        .filter(|a| a.restart.is_none())
        .and_then(|a| a.config(&std::path::absolute(path).unwrap_or_else(|_| path.into())));
    let config = match running.unwrap_or_else(|| Config::load(path).map_err(anyhow::Error::from)) {
        Ok(config) => config,
        Err(e) => {
            if let Some(takeover) = &takeover {
                takeover.fail("config", &e.to_string());
            }
            return Err(e);
        }
    };
    let log = match crate::logging::init(
        &config.supervisor.log_filter,
        config.supervisor.log_format,
        config.supervisor.log_file.as_deref(),
        config.supervisor.otlp(),
    )
    .context("setting up logging")
    {
        Ok(log) => log,
        Err(e) => {
            if let Some(takeover) = &takeover {
                takeover.fail("start", &format!("{e:#}"));
            }
            return Err(e);
        }
    };
    let origin = match (takeover, exec_state, adoption) {
        (Some(takeover), _, _) => Origin::Takeover(takeover),
        (None, Some(state), _) => Origin::Exec(state),
        (None, None, Some(adoption)) => Origin::Adopted(Box::new(adoption)),
        (None, None, None) => Origin::Fresh(activated),
    };
    let result = crate::master::run(config, log, program, origin, watch).await;
    if let Err(e) = &result {
        tracing::error!(event = "master.failed", error = %format!("{e:#}"), "master failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn scale_arguments() {
        assert!(matches!(scale_change("+2"), Ok(ScaleArg::By(2))));
        assert!(matches!(scale_change("-1"), Ok(ScaleArg::By(-1))));
        assert!(matches!(scale_change("3"), Ok(ScaleArg::To(3))));
        assert!(scale_change("x").is_err());
        assert!(scale_change("+").is_err());
    }

    #[test]
    fn watch_is_a_flag_that_may_name_paths() {
        let watch = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Some(Command::Run { watch })) => watch,
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(watch(&["baton", "run"]), None);
        assert_eq!(watch(&["baton", "run", "--watch"]), Some(vec![]));
        assert_eq!(
            watch(&["baton", "run", "--watch", "-c", "x.toml"]),
            Some(vec![])
        );
        assert_eq!(
            watch(&["baton", "run", "--watch", "src", "--watch=templates"]),
            Some(vec![PathBuf::from("src"), PathBuf::from("templates")])
        );
        assert_eq!(
            watch(&["baton", "run", "--watch", "--watch", "src"]),
            Some(vec![PathBuf::from("src")])
        );
    }

    #[test]
    fn signal_and_command_do_not_mix() {
        assert!(Cli::try_parse_from(["baton", "-s", "reload", "status"]).is_err());
        assert!(Cli::try_parse_from(["baton", "-s", "reload"]).is_ok());
        assert!(Cli::try_parse_from(["baton", "scale", "-1"]).is_ok());
    }
}
