//! The control protocol between the `baton` CLI and the master:
//! newline-delimited JSON over the control socket, one request and one reply
//! per line, each with a protocol version `v`. Documented in docs/operations.md.

use baton_wire::protocol::json_kind;
use serde::{Deserialize, Serialize};

/// The control protocol version.
pub const VERSION: u32 = 1;

/// The longest request line the master reads.
pub const MAX_LINE: usize = 64 * 1024;

/// What the CLI asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Run the reload transaction and reply with its outcome.
    Reload {
        /// Send this share of new connections (`"10%"`) to the new
        /// generation until `promote`, `rollback` or the end of probation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<String>,
        /// `auto` (default), `in_place` (or fail with the reason) or
        /// `new_generation`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
        /// The version the deploy tool is rolling out (its own: a git
        /// sha, a release number). When the current generation was
        /// committed by a reload with the same `if_version`, nothing is
        /// done and the outcome says `unchanged`; otherwise the generation
        /// this reload commits records it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<String>,
    },
    /// End the probation of the reload under way: keep the new generation.
    Promote {},
    /// End the probation of the reload under way: back to the generation
    /// it replaced.
    Rollback {},
    /// Reply with the master's status.
    Status {},
    /// Replace the master by a new binary; reply with the outcome.
    Upgrade {},
    /// Replace the master process by a new one (the binary at its path),
    /// started by its keeper: the listeners stay open, the new master
    /// adopts the workers and replaces them with a new generation, drained
    /// (or, `hard`, stopped at once).
    Restart {
        /// Stop the old workers at once instead of draining them.
        #[serde(default)]
        hard: bool,
    },
    /// Stop gracefully (drain) or fast.
    Stop {
        /// Fast stop (like SIGTERM) instead of graceful (like SIGQUIT).
        #[serde(default)]
        fast: bool,
    },
    /// `baton drain`: readiness says no at once, the workers serve
    /// `grace_ms` more, then the master stops gracefully.
    Drain {
        /// How long the workers go on serving.
        grace_ms: u64,
    },
    /// Reopen the log file; workers reopen theirs.
    Reopen {},
    /// Change the number of workers of the current generation.
    Scale {
        /// Add (positive) or remove (negative) this many workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<i64>,
        /// Set the number of workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<i64>,
    },
}

/// A request on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Protocol version.
    pub v: u32,
    /// The request or reply.
    #[serde(flatten)]
    pub body: T,
}

/// The master's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded (a failed reload is `false`).
    pub ok: bool,
    /// What went wrong, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The command's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Reply {
    /// A success with `result`.
    pub fn ok(result: impl Serialize) -> Reply {
        Reply {
            ok: true,
            error: None,
            result: serde_json::to_value(result).ok(),
        }
    }

    /// A refusal or failure.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(message.into()),
            result: None,
        }
    }

    /// A failure that still carries a result (a failed reload's outcome).
    pub fn failed(message: impl Into<String>, result: impl Serialize) -> Reply {
        Reply {
            ok: false,
            error: Some(message.into()),
            result: serde_json::to_value(result).ok(),
        }
    }
}

/// Decodes one request line; the error is the reply to send, and names
/// what is wrong: not JSON (with the position), not an object, the version
/// `v`, the `command`, or the field of that command.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        format!("malformed request (expected a JSON object with \"v\"): not JSON: {e}")
    })?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(format!(
            "malformed request (expected a JSON object with \"v\"): got {}",
            json_kind(&value)
        ));
    };
    let version = match object.remove("v") {
        None => return Err("malformed request: no protocol version \"v\"".into()),
        Some(v) => v,
    };
    match version.as_u64() {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "unsupported control protocol version {v}; this master speaks {VERSION}"
            ))
        }
        None => {
            return Err(format!(
                "malformed request: protocol version \"v\" is {version}, not a version number"
            ))
        }
    }
    let command = match object.get("command") {
        Some(serde_json::Value::String(command)) => command.clone(),
        Some(other) => {
            return Err(format!(
                "invalid request: \"command\" is {}, not a string",
                json_kind(other)
            ))
        }
        None => return Err("invalid request: no \"command\"".into()),
    };
    serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| {
        let e = e.to_string();
        if e.starts_with("unknown variant") {
            format!("invalid request: command: {e}")
        } else {
            format!("invalid request: `{command}`: {e}")
        }
    })
}

/// Encodes a message as one line.
pub fn encode_line<T: Serialize>(body: T) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&Envelope { v: VERSION, body }).expect("control messages serialize");
    line.push(b'\n');
    line
}

/// Reload outcome, as `baton reload` prints it and `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The generation the transaction started.
    pub generation: u64,
    /// `start`, `signal`, `cli`, `admin`, `coalesced`, `upgrade`, `restart`.
    pub trigger: String,
    /// `committed` or `failed`.
    pub outcome: String,
    /// The failing phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_phase: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Each phase reached and its duration.
    pub phases: Vec<PhaseTime>,
    /// `new_generation` or `in_place`.
    #[serde(default = "new_generation")]
    pub kind: String,
    /// The config version it applied (when committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The deploy tool's version (`if_version`) the generation runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_version: Option<String>,
    /// The new generation's worker pids (when committed).
    pub pids: Vec<i32>,
    /// When it ended, in seconds since the Unix epoch.
    pub finished_at: f64,
    /// Who asked for it: the control socket's peer or a signal's sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<crate::audit::Requester>,
}

fn new_generation() -> String {
    "new_generation".into()
}

/// What became of a drained generation's client connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainedStatus {
    /// The generation.
    pub generation: u64,
    /// Handed to a worker of a newer generation, open.
    pub handed_over: u64,
    /// Closed at the drain (told to go) instead.
    pub closed_at_drain: u64,
}

/// One phase's duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTime {
    /// validate, bind, spawn, ready, commit.
    pub phase: String,
    /// Milliseconds.
    pub ms: f64,
}

/// `baton status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The master.
    pub master: MasterStatus,
    /// Listeners of the current configuration.
    pub listeners: Vec<ListenerStatus>,
    /// Every generation with live workers, oldest first.
    pub generations: Vec<GenerationStatus>,
    /// The generation a reload is starting, if one is under way.
    #[serde(default)]
    pub reload_in_progress: Option<u64>,
    /// The last finished reload (including the start).
    #[serde(default)]
    pub last_reload: Option<ReloadOutcome>,
    /// The last generation that finished draining with client connections
    /// to hand over or close, and what became of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drained: Option<DrainedStatus>,
    /// A reload past cutover, on probation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// A reload on probation, as `baton status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The new generation.
    pub generation: u64,
    /// The generation it replaced, on standby.
    pub standby: u64,
    /// The new generation's share of new connections, when a canary.
    #[serde(default)]
    pub canary_percent: Option<f64>,
    /// Seconds since cutover.
    pub elapsed_s: f64,
    /// Seconds until probation ends by itself (none for a canary that
    /// waits for `baton promote`).
    #[serde(default)]
    pub left_s: Option<f64>,
    /// Failed probes in a row, when the generation is probed.
    #[serde(default)]
    pub probe_failures: Option<u32>,
}

/// The master process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterStatus {
    /// Its pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// The config file it re-reads on reload.
    pub config: String,
    /// Hash of the current generation's config.
    pub config_hash: String,
    /// The current generation.
    pub current_generation: Option<u64>,
    /// `running`, `draining` (`baton drain`'s grace), `stopping`.
    pub state: String,
    /// The admin endpoint's bound address, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// Started by the keeper after the previous master died, adopting its
    /// workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<AdoptedStatus>,
}

/// How a master came to adopt its workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdoptedStatus {
    /// When (seconds since the Unix epoch).
    pub at: f64,
    /// The master that died.
    pub previous_pid: i32,
    /// How it ended: `signal SIGKILL`, `exit status 1`, or why unknown.
    pub died: String,
    /// Masters that died and were adopted since the keeper's first one.
    pub adoptions: u64,
}

/// A listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// tcp, unix, udp.
    pub kind: String,
    /// The bound address.
    pub address: String,
    /// The fd number in the master.
    pub fd: i32,
}

/// A generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStatus {
    /// 1, 2, ...
    pub number: u64,
    /// starting, current, draining, failed.
    pub state: String,
    /// Seconds since it started.
    pub age_s: f64,
    /// How many workers it should have.
    pub processes: u32,
    /// Its config's hash.
    pub config_hash: String,
    /// Its config version: the `[worker]` settings and `app_config` files.
    #[serde(default)]
    pub config_version: String,
    /// The deploy tool's version (`if_version`) it was committed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_version: Option<String>,
    /// Client connections it handed to a newer generation while draining.
    #[serde(default)]
    pub handed_over: u64,
    /// Client connections it closed at its drain instead (told to go).
    #[serde(default)]
    pub closed_at_drain: u64,
    /// The master's fd of each socket its workers were given, in config
    /// order: the listener's own, or (TCP, workers without the SDK) a socket
    /// of the generation's own on the same port.
    #[serde(default)]
    pub sockets: Vec<i32>,
    /// Worker indexes the crash-loop breaker stopped respawning: capacity
    /// lost until a reload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crash_loop: Vec<u32>,
    /// Its live workers.
    pub workers: Vec<WorkerStatus>,
}

/// A worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Pid.
    pub pid: i32,
    /// Index in its generation.
    pub index: u32,
    /// starting, ready, draining, killed.
    pub state: String,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// How many times its index was respawned.
    pub restarts: u32,
    /// Open connections it last reported.
    #[serde(default)]
    pub connections: Option<u64>,
    /// The last `STATUS=` it sent to the notify socket.
    #[serde(default)]
    pub status: Option<String>,
    /// The config version its reload handle runs, once it registered one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
    /// A draining worker: when it is killed, in seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<f64>,
    /// A draining worker: seconds until it is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_in_s: Option<f64>,
    /// A draining (or killed) worker: the TCP connections it and its
    /// process group still hold open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_connections: Option<Vec<ConnectionStatus>>,
}

/// An open TCP connection of a draining worker, as `sock_diag` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// The worker's end.
    pub local: String,
    /// The client.
    pub peer: String,
    /// TCP state (`ESTAB`, `CLOSE-WAIT`, ...).
    pub state: String,
    /// Seconds since data last went either way.
    pub idle_s: Option<f64>,
    /// Bytes received and not yet read by the worker.
    pub recv_queue: u32,
    /// Bytes sent and not yet acknowledged by the peer.
    pub send_queue: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for request in [
            Request::Reload {
                canary: None,
                mode: None,
                if_version: None,
            },
            Request::Reload {
                canary: Some("10%".into()),
                mode: Some("in_place".into()),
                if_version: Some("v42".into()),
            },
            Request::Promote {},
            Request::Rollback {},
            Request::Status {},
            Request::Stop { fast: true },
            Request::Reopen {},
            Request::Scale {
                by: Some(-1),
                to: None,
            },
        ] {
            let line = encode_line(&request);
            assert_eq!(decode_request(&line).unwrap(), request);
        }
        assert_eq!(
            String::from_utf8(encode_line(Request::Stop { fast: false })).unwrap(),
            "{\"v\":1,\"command\":\"stop\",\"fast\":false}\n"
        );
    }

    #[test]
    fn bad_requests_are_errors_that_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "malformed request"),
            (b"{\"command\":\"status\"}", "malformed request"),
            (
                b"{\"v\":2,\"command\":\"status\"}",
                "unsupported control protocol version 2",
            ),
            (
                b"{\"v\":1,\"command\":\"explode\"}",
                "unknown variant `explode`",
            ),
            (b"{\"v\":1}", "invalid request"),
            (
                b"{\"v\":1,\"command\":\"stop\",\"fast\":\"yes\"}",
                "invalid request",
            ),
            (
                b"{\"v\":1,\"command\":\"scale\",\"by\":1,\"extra\":2}",
                "unknown field",
            ),
        ];
        for (line, want) in cases {
            let error = decode_request(line).unwrap_err();
            assert!(error.contains(want), "{line:?}: {error}");
        }
    }
}
