//! `baton.toml`: parsing and validation. Every error names the file, line and
//! column; values are checked while deserializing so that toml can attach the
//! location.

use serde::{de, Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod address;
mod app;
mod duration;
mod process;
mod read;
mod rollout;
pub use address::ListenerAddress;
pub use app::AppFiles;
pub use duration::{parse_duration, Dur};
pub use process::{
    fd_templates, substitute, Credentials, GroupSpec, Output, ReopenSignal, UserSpec,
};
pub use read::{read_config_file, MAX_CONFIG_BYTES};
pub use rollout::Share;

/// A configuration file that failed to load.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (absolute).
    pub path: PathBuf,
    /// Short hash of the file's bytes, for logs and status.
    pub hash: String,
    /// `[supervisor]`.
    pub supervisor: SupervisorConfig,
    /// `[[listener]]`, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// `[worker]`.
    pub worker: WorkerConfig,
    /// `[worker] app_config`, read, and the config version.
    pub app: AppFiles,
    /// Who may write through the admin endpoint: `admin_token_file`, read,
    /// and `admin_peer_writes`.
    pub admin_writes: crate::admin::auth::WritePolicy,
    /// The text it was parsed from (what a master adopting this one's
    /// workers parses again: see [`crate::adopt`]).
    pub text: std::sync::Arc<str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    supervisor: SupervisorConfig,
    #[serde(default, rename = "listener")]
    listeners: Vec<toml::Spanned<ListenerConfig>>,
    worker: WorkerConfig,
}

/// `[supervisor]`: settings of the master itself.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Unix socket for the CLI.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Where to write the master's pid.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// A `tracing` filter (`info`, `baton=debug,warn`, ...).
    #[serde(default = "default_log_filter", deserialize_with = "de_log_filter")]
    pub log_filter: String,
    /// `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Log to this file instead of stderr (reopened by `baton reopen`).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// How long a binary upgrade may take until the new master serves.
    #[serde(default = "default_upgrade_timeout")]
    pub upgrade_timeout: Dur,
    /// How a binary upgrade replaces the master.
    #[serde(default)]
    pub upgrade: UpgradeMode,
    /// Past this many draining generations, the oldest is killed.
    #[serde(
        default = "default_max_draining_generations",
        deserialize_with = "de_max_draining_generations"
    )]
    pub max_draining_generations: u32,
    /// What SIGTERM asks of the master.
    #[serde(default)]
    pub sigterm: SigtermMode,
    /// How many deaths of the master its keeper survives by starting
    /// another (`"10 in 1m"`, the default), or `"off"`.
    #[serde(default)]
    pub master_restarts: MasterRestarts,
    /// The admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`):
    /// `IP:PORT` or `unix:PATH`; off when unset.
    #[serde(default, deserialize_with = "de_admin")]
    pub admin: Option<ListenerAddress>,
    /// Bearer tokens that may write through the admin endpoint (`POST
    /// /reload`, ...), one per line; writes are off without it (see
    /// [`crate::admin::auth`]).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// On a `unix:` admin endpoint, root and the master's uid may write
    /// without a token.
    #[serde(default)]
    pub admin_peer_writes: bool,
    /// Where reload traces go over OTLP/HTTP (`http://HOST:PORT`, to which
    /// `/v1/traces` is added, or a full URL); off when unset.
    #[serde(default, deserialize_with = "de_otlp_endpoint")]
    pub otlp_endpoint: Option<String>,
    /// How long one export may wait on the collector (on the exporter's
    /// thread, never the master's loop).
    #[serde(
        default = "default_otlp_export_timeout",
        deserialize_with = "de_otlp_export_timeout"
    )]
    pub otlp_export_timeout: Dur,
    /// How long a stop or an exec-mode upgrade waits for the spans still
    /// batched; what is not sent by then is dropped and counted.
    #[serde(
        default = "default_otlp_flush_timeout",
        deserialize_with = "de_otlp_flush_timeout"
    )]
    pub otlp_flush_timeout: Dur,
}

fn default_otlp_export_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_otlp_flush_timeout() -> Dur {
    Dur(Duration::from_millis(200))
}

/// `value` when it lies in `range`, else an error naming `key`.
fn bounded_duration<E: de::Error>(
    key: &str,
    value: Dur,
    range: std::ops::RangeInclusive<Duration>,
    spelled: &str,
) -> Result<Dur, E> {
    if range.contains(&value.0) {
        Ok(value)
    } else {
        Err(E::custom(format!(
            "{key} must be between {spelled}, got {:?}",
            value.0
        )))
    }
}

fn de_otlp_export_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
    let value = Dur::deserialize(d)?;
    bounded_duration(
        "otlp_export_timeout",
        value,
        Duration::from_millis(10)..=Duration::from_secs(60),
        "10ms and 60s",
    )
}

fn de_otlp_flush_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
    let value = Dur::deserialize(d)?;
    bounded_duration(
        "otlp_flush_timeout",
        value,
        Duration::ZERO..=Duration::from_secs(10),
        "0ms and 10s",
    )
}

impl SupervisorConfig {
    /// The OTLP exporter's settings, when traces are exported.
    pub fn otlp(&self) -> Option<crate::traces::Settings> {
        self.otlp_endpoint
            .as_ref()
            .map(|endpoint| crate::traces::Settings {
                endpoint: endpoint.clone(),
                export_timeout: self.otlp_export_timeout.0,
                flush_timeout: self.otlp_flush_timeout.0,
            })
    }
}

fn de_otlp_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let url = String::deserialize(d)?;
    let host = url.strip_prefix("http://").unwrap_or_default();
    if host.is_empty() || host.starts_with('/') || url.contains(char::is_whitespace) {
        return Err(de::Error::custom(format!(
            "otlp_endpoint {url:?}: expected http://HOST:PORT (a collector's OTLP/HTTP port, usually 4318)"
        )));
    }
    Ok(Some(url))
}

fn de_admin<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ListenerAddress>, D::Error> {
    let address: ListenerAddress = String::deserialize(d)?
        .parse()
        .map_err(|e: String| de::Error::custom(format!("admin: {e}")))?;
    if let ListenerAddress::Udp(_) = address {
        return Err(de::Error::custom(format!(
            "admin: {address} is UDP; the admin endpoint speaks HTTP: use IP:PORT or unix:PATH"
        )));
    }
    Ok(Some(address))
}

fn default_max_draining_generations() -> u32 {
    16
}

fn de_max_draining_generations<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=1024).contains(&n) {
        return Err(de::Error::custom(format!(
            "max_draining_generations must be between 1 and 1024, got {n}"
        )));
    }
    Ok(n as u32)
}

/// What SIGTERM asks of the master: `docker stop`, Kubernetes and systemd
/// all stop a service with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigtermMode {
    /// Drain every generation, as SIGQUIT does (the default).
    #[default]
    Graceful,
    /// Stop the workers now, as SIGINT does (nginx's meaning).
    Fast,
}

/// How a binary upgrade replaces the master.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpgradeMode {
    /// A new master process takes over (the default; the pid changes).
    #[default]
    Child,
    /// The master re-executes itself and adopts its workers (same pid; the
    /// only mode as PID 1).
    Exec,
}

fn default_upgrade_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            control_socket: default_control_socket(),
            pid_file: None,
            log_filter: default_log_filter(),
            log_format: LogFormat::default(),
            log_file: None,
            upgrade_timeout: default_upgrade_timeout(),
            upgrade: UpgradeMode::default(),
            max_draining_generations: default_max_draining_generations(),
            sigterm: SigtermMode::default(),
            master_restarts: MasterRestarts::default(),
            admin: None,
            admin_token_file: None,
            admin_peer_writes: false,
            otlp_endpoint: None,
            otlp_export_timeout: default_otlp_export_timeout(),
            otlp_flush_timeout: default_otlp_flush_timeout(),
        }
    }
}

/// `[supervisor] master_restarts`: `"N in DURATION"` or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterRestarts(pub Option<crate::keeper::Budget>);

impl Default for MasterRestarts {
    fn default() -> Self {
        MasterRestarts(Some(crate::keeper::Budget {
            restarts: 10,
            window: Duration::from_secs(60),
        }))
    }
}

impl std::str::FromStr for MasterRestarts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "off" {
            return Ok(MasterRestarts(None));
        }
        let wrong = || {
            format!(
                "master_restarts: expected \"N in DURATION\" (\"10 in 1m\") or \"off\", got {s:?}"
            )
        };
        let (count, window) = s.split_once(" in ").ok_or_else(wrong)?;
        let restarts: u32 = count.trim().parse().map_err(|_| wrong())?;
        let window =
            duration::parse_duration(window.trim()).map_err(|e| format!("master_restarts: {e}"))?;
        if restarts == 0 {
            return Ok(MasterRestarts(None));
        }
        if window.is_zero() {
            return Err(format!("master_restarts: the window of {s:?} is zero"));
        }
        Ok(MasterRestarts(Some(crate::keeper::Budget {
            restarts,
            window,
        })))
    }
}

impl<'de> Deserialize<'de> for MasterRestarts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("baton.sock")
}

fn default_log_filter() -> String {
    "info".to_string()
}

fn de_log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let filter = String::deserialize(d)?;
    tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| de::Error::custom(format!("invalid log_filter {filter:?}: {e}")))?;
    Ok(filter)
}

/// How the master writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[[listener]]`: one named socket the master binds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// The name workers ask for.
    #[serde(deserialize_with = "de_listener_name")]
    pub name: String,
    /// Where to bind.
    pub address: ListenerAddress,
    /// `listen(2)` backlog, 1 to 65535; the kernel caps it at
    /// `net.core.somaxconn`.
    #[serde(default = "default_backlog", deserialize_with = "de_backlog")]
    pub backlog: i32,
    /// `TCP_NODELAY` on the listening socket, which the connections
    /// accepted from it inherit; `None` when not set (on). TCP only.
    #[serde(default)]
    pub nodelay: Option<bool>,
    /// A UDP listener serving QUIC through the SDK: each worker gets a
    /// socket of its own on the port, and datagrams are steered to the
    /// worker their connection ID names (see `steering::quic`).
    #[serde(default)]
    pub quic: bool,
}

impl ListenerConfig {
    /// Whether a TCP listener's connections have Nagle's algorithm off
    /// (`TCP_NODELAY`): by default, yes.
    pub fn nodelay(&self) -> bool {
        self.nodelay.unwrap_or(true)
    }
}

fn default_backlog() -> i32 {
    1024
}

fn de_backlog<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=65535).contains(&n) {
        return Err(de::Error::custom(format!(
            "backlog must be between 1 and 65535, got {n}"
        )));
    }
    Ok(n as i32)
}

fn de_listener_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let ok = !name.is_empty()
        && name.len() <= baton_wire::protocol::MAX_LISTENER_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(de::Error::custom(format!(
            "invalid listener name {name:?}: use 1 to {} letters, digits, '-', '_' or '.'",
            baton_wire::protocol::MAX_LISTENER_NAME
        )));
    }
    Ok(name)
}

/// `[worker]`: how to run the worker processes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Program and arguments.
    #[serde(deserialize_with = "de_command")]
    pub command: Vec<String>,
    /// Workers per generation.
    #[serde(default = "default_processes", deserialize_with = "de_processes")]
    pub processes: u32,
    /// How listeners reach the worker.
    #[serde(default)]
    pub protocol: Protocol,
    /// How the master learns the worker is ready.
    #[serde(default)]
    pub ready: ReadyMode,
    /// How long a new worker has to become ready.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout: Dur,
    /// How long a draining worker has before it is killed.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// The graceful-stop signal for non-sdk workers.
    #[serde(default)]
    pub stop_signal: StopSignal,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the config file's directory).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Run workers as this user (the master must be root).
    #[serde(default)]
    pub user: Option<UserSpec>,
    /// Run workers with this group (default: the user's primary group).
    #[serde(default)]
    pub group: Option<GroupSpec>,
    /// `RLIMIT_NOFILE` (soft and hard) of the workers.
    #[serde(default, deserialize_with = "process::de_rlimit_nofile")]
    pub rlimit_nofile: Option<u64>,
    /// Whether the master captures the workers' stdout and stderr.
    #[serde(default)]
    pub output: Output,
    /// What `baton reopen` sends to non-sdk workers.
    #[serde(default)]
    pub reopen_signal: ReopenSignal,
    /// Whether the listeners' sockets are passed with `O_NONBLOCK` set
    /// (systemd's `NonBlocking=`), for servers that assume it (nginx).
    #[serde(default)]
    pub nonblocking: bool,
    /// How often a probe (`ready = "tcp"`, `"http:/PATH"`, `"exec:CMD"`)
    /// is tried; also each try's timeout.
    #[serde(
        default = "rollout::default_probe_interval",
        deserialize_with = "rollout::de_probe_interval"
    )]
    pub probe_interval: Dur,
    /// After cutover, how long the old generation stays warm, ready to take
    /// the traffic back.
    #[serde(default)]
    pub probation: Option<Dur>,
    /// Consecutive failed probes during probation that roll back.
    #[serde(
        default = "rollout::default_probation_failures",
        deserialize_with = "rollout::de_probation_failures"
    )]
    pub probation_failures: u32,
    /// The share of new connections a new generation gets during probation
    /// (until `baton promote`).
    #[serde(default)]
    pub canary: Option<Share>,
    /// Crashes within `crash_loop_window` after which a worker is not
    /// respawned any more.
    #[serde(
        default = "rollout::default_crash_loop_limit",
        deserialize_with = "rollout::de_crash_loop_limit"
    )]
    pub crash_loop_limit: u32,
    /// The window of `crash_loop_limit`.
    #[serde(default = "rollout::default_crash_loop_window")]
    pub crash_loop_window: Dur,
    /// The application's configuration files (relative to this file),
    /// reloaded in place when only they change.
    #[serde(default, deserialize_with = "de_app_config")]
    pub app_config: Vec<String>,
    /// How long each worker has to prepare an in-place reload.
    #[serde(default = "default_prepare_timeout")]
    pub prepare_timeout: Dur,
    /// The tracing filter of SDK workers that use the SDK's log setup;
    /// switched in place.
    #[serde(default, deserialize_with = "de_worker_log_filter")]
    pub log_filter: Option<String>,
    /// SDK workers: at a drain, idle HTTP/1.1 connections move to the
    /// current generation instead of being closed (see docs/worker.md).
    #[serde(default = "default_handover")]
    pub handover: bool,
}

fn default_handover() -> bool {
    true
}

fn default_prepare_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn de_app_config<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    let mut seen = HashSet::new();
    for name in &names {
        if name.is_empty() || name.contains('\0') {
            return Err(de::Error::custom(format!(
                "app_config: {name:?} is not a file name"
            )));
        }
        if !seen.insert(name) {
            return Err(de::Error::custom(format!(
                "app_config: {name:?} is listed twice"
            )));
        }
    }
    Ok(names)
}

fn de_worker_log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    de_log_filter(d).map(Some)
}

impl WorkerConfig {
    /// Whether SDK workers get app config files and a log filter to reload
    /// in place.
    pub fn reloads_in_place(&self) -> bool {
        self.protocol == Protocol::Sdk && (!self.app_config.is_empty() || self.log_filter.is_some())
    }

    /// Whether a reload of this worker runs a rollout after cutover
    /// (probation or a canary), or probes the new generation: then each
    /// generation gets TCP sockets of its own, so that traffic and probes
    /// can be steered between generations.
    pub fn steers_generations(&self) -> bool {
        self.probation.is_some() || self.canary.is_some() || self.ready.probes()
    }
}

fn default_processes() -> u32 {
    1
}

fn de_processes<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=1024).contains(&n) {
        return Err(de::Error::custom(format!(
            "processes must be between 1 and 1024, got {n}"
        )));
    }
    Ok(n as u32)
}

fn de_command<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let command = Vec::<String>::deserialize(d)?;
    match command.first() {
        None => Err(de::Error::custom("command must name a program")),
        Some(p) if p.is_empty() => Err(de::Error::custom("command[0] is empty")),
        _ => Ok(command),
    }
}

fn default_ready_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

/// How listeners are passed to workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The worker links `baton-worker` (control channel, hello, fds).
    #[default]
    Sdk,
    /// systemd socket activation: fds 3.. with `LISTEN_FDS`, `LISTEN_PID`
    /// and `LISTEN_FDNAMES`.
    Systemd,
    /// fds 3.., their numbers substituted into `command` as `{fd:NAME}`.
    Args,
}

impl Protocol {
    /// The name used in the config.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Sdk => "sdk",
            Protocol::Systemd => "systemd",
            Protocol::Args => "args",
        }
    }
}

/// How readiness is decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReadyMode {
    /// The worker sends `ready` over the control channel.
    #[default]
    Sdk,
    /// The worker (or one of its children) sends `READY=1` to `NOTIFY_SOCKET`.
    Notify,
    /// Ready once the worker has stayed up this long.
    Delay(Duration),
    /// Ready once the generation accepts a TCP connection on its first TCP
    /// listener.
    Tcp,
    /// Ready once `GET PATH` on the first TCP listener answers 2xx.
    Http(String),
    /// Ready once this command exits 0.
    Exec(Vec<String>),
}

impl ReadyMode {
    /// Whether the master probes the generation to decide.
    pub fn probes(&self) -> bool {
        matches!(
            self,
            ReadyMode::Tcp | ReadyMode::Http(_) | ReadyMode::Exec(_)
        )
    }
}

impl<'de> Deserialize<'de> for ReadyMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "sdk" => return Ok(ReadyMode::Sdk),
            "notify" => return Ok(ReadyMode::Notify),
            "tcp" => return Ok(ReadyMode::Tcp),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("http:") {
            return rollout::parse_http(path)
                .map(ReadyMode::Http)
                .map_err(de::Error::custom);
        }
        if let Some(command) = s.strip_prefix("exec:") {
            return rollout::parse_exec(command)
                .map(ReadyMode::Exec)
                .map_err(de::Error::custom);
        }
        if let Some(dur) = s.strip_prefix("delay:") {
            return parse_duration(dur)
                .map(ReadyMode::Delay)
                .map_err(de::Error::custom);
        }
        Err(de::Error::custom(format!(
            "invalid ready {s:?}: expected \"sdk\", \"notify\", \"delay:DURATION\", \"tcp\", \"http:/PATH\" or \"exec:COMMAND\""
        )))
    }
}

/// A signal name like `"SIGTERM"` or `"TERM"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(pub nix::sys::signal::Signal);

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal(nix::sys::signal::Signal::SIGTERM)
    }
}

impl<'de> Deserialize<'de> for StopSignal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_signal(&s).map(StopSignal).map_err(de::Error::custom)
    }
}

/// `"SIGTERM"` or `"TERM"`.
fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    let name = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    name.parse().map_err(|_| format!("unknown signal {s:?}"))
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = read::read_config_file(&path)?;
        Config::parse(&path, &text)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(path, text, None)
    }

    /// As [`Config::parse`], with the `app_config` files given (as a
    /// generation runs them) instead of read.
    pub fn parse_with(
        path: &Path,
        text: &str,
        app: Option<AppFiles>,
    ) -> Result<Config, ConfigError> {
        let error_at = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            path: path.to_path_buf(),
            location: span.map(|s| line_col(text, s.start)),
            message,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| error_at(e.span(), with_hint(e.message(), text)))?;
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for listener in &raw.listeners {
            let span = Some(listener.span());
            let l = listener.get_ref();
            if !names.insert(l.name.clone()) {
                return Err(error_at(
                    span,
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            if l.nodelay.is_some() && !matches!(l.address, ListenerAddress::Tcp(_)) {
                return Err(error_at(
                    span,
                    format!(
                        "listener {:?}: nodelay applies to TCP listeners only, and {} is not one",
                        l.name, l.address
                    ),
                ));
            }
            if l.quic && !matches!(l.address, ListenerAddress::Udp(_)) {
                return Err(error_at(
                    span,
                    format!(
                        "listener {:?}: quic applies to UDP listeners only, and {} is not one",
                        l.name, l.address
                    ),
                ));
            }
            // Port 0 asks the kernel for a fresh port each time: never a clash.
            let ephemeral = matches!(&l.address, ListenerAddress::Tcp(a) | ListenerAddress::Udp(a) if a.port() == 0);
            if !ephemeral && !addresses.insert(l.address.clone()) {
                return Err(error_at(
                    span,
                    format!("listener {:?}: address {} is used twice", l.name, l.address),
                ));
            }
        }
        let names: Vec<&str> = raw
            .listeners
            .iter()
            .map(|l| l.get_ref().name.as_str())
            .collect();
        process::check_worker(&raw.worker, &names, text)
            .map_err(|(span, message)| error_at(span, message))?;
        let has_tcp = raw
            .listeners
            .iter()
            .any(|l| matches!(l.get_ref().address, ListenerAddress::Tcp(_)));
        rollout::check(&raw.worker, has_tcp, text)
            .map_err(|(span, message)| error_at(span, message))?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        let mut supervisor = raw.supervisor;
        supervisor.control_socket = dir.join(&supervisor.control_socket);
        supervisor.pid_file = supervisor.pid_file.map(|p| dir.join(p));
        supervisor.log_file = supervisor.log_file.map(|p| dir.join(p));
        if let Some(ListenerAddress::Unix(p)) = &supervisor.admin {
            supervisor.admin = Some(ListenerAddress::Unix(dir.join(p)));
        }
        supervisor.admin_token_file = supervisor.admin_token_file.map(|p| dir.join(p));
        let admin_writes = match admin_writes(&supervisor, text) {
            Ok(policy) => policy,
            // A generation's config as it runs, parsed again (an adopting
            // master): its token file may be gone; that must not lose the
            // workers. The master's own config is loaded afresh.
            Err((_, message)) if app.is_some() => {
                tracing::warn!(%message, "admin writes off in this generation's config");
                crate::admin::auth::WritePolicy::default()
            }
            Err((span, message)) => return Err(error_at(span, message)),
        };
        let listeners = raw
            .listeners
            .into_iter()
            .map(|l| {
                let mut l = l.into_inner();
                if let ListenerAddress::Unix(p) = &l.address {
                    l.address = ListenerAddress::Unix(dir.join(p));
                }
                l
            })
            .collect();
        let mut worker = raw.worker;
        if worker.command[0].contains('/') {
            worker.command[0] = dir.join(&worker.command[0]).display().to_string();
        }
        worker.cwd = Some(dir.join(worker.cwd.as_deref().unwrap_or(Path::new("."))));
        let app = match app {
            Some(app) => app,
            None => AppFiles::read(path, dir, &worker.app_config, &format!("{worker:?}"))?,
        };
        let hash = Sha256::digest(text.as_bytes())
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Config {
            path: path.to_path_buf(),
            hash,
            supervisor,
            listeners,
            worker,
            app,
            admin_writes,
            text: text.into(),
        })
    }

    /// One line for `baton check` and the log.
    pub fn summary(&self) -> String {
        let listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| format!("{}={}", l.name, l.address))
            .collect();
        format!(
            "{}: ok (hash {}): {} listener(s) [{}], {} worker(s) of {:?}",
            self.path.display(),
            self.hash,
            self.listeners.len(),
            listeners.join(", "),
            self.worker.processes,
            self.worker.command.join(" "),
        )
    }
}

/// `[supervisor] admin_token_file` and `admin_peer_writes`, checked against
/// the admin endpoint, with the token file read.
fn admin_writes(
    supervisor: &SupervisorConfig,
    text: &str,
) -> Result<crate::admin::auth::WritePolicy, (Option<std::ops::Range<usize>>, String)> {
    let span = |key: &str| supervisor_key_span(text, key);
    let unix = matches!(supervisor.admin, Some(ListenerAddress::Unix(_)));
    if supervisor.admin.is_none()
        && (supervisor.admin_token_file.is_some() || supervisor.admin_peer_writes)
    {
        let key = if supervisor.admin_peer_writes {
            "admin_peer_writes"
        } else {
            "admin_token_file"
        };
        return Err((
            span(key),
            format!("{key} is set but there is no admin endpoint (set admin = \"IP:PORT\" or \"unix:PATH\")"),
        ));
    }
    if supervisor.admin_peer_writes && !unix {
        return Err((
            span("admin_peer_writes"),
            "admin_peer_writes applies to a unix: admin endpoint (a TCP peer has no uid to check): use admin_token_file".into(),
        ));
    }
    let tokens = supervisor
        .admin_token_file
        .as_deref()
        .map(crate::admin::auth::Tokens::read)
        .transpose()
        .map_err(|e| (span("admin_token_file"), e))?;
    Ok(crate::admin::auth::WritePolicy {
        tokens,
        peer_writes: supervisor.admin_peer_writes,
    })
}

/// Where `[supervisor] key` is in `text`, for an error's line and column.
fn supervisor_key_span(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    #[derive(Deserialize)]
    struct Spans {
        supervisor: Option<HashMap<String, toml::Spanned<toml::Value>>>,
    }
    let spans: Spans = toml::from_str(text).ok()?;
    Some(spans.supervisor?.get(key)?.span())
}

/// toml's message, with the spelling a user most likely meant.
fn with_hint(message: &str, text: &str) -> String {
    let single_listener = text.lines().any(|l| l.trim() == "[listener]");
    if message.contains("expected a sequence") && single_listener {
        return format!(
            "{message}: listeners are an array of tables, write [[listener]] (two brackets) for each"
        );
    }
    message.to_string()
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests;
