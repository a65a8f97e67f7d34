//! The wire protocol between the baton master and its workers.
//!
//! One definition, used by both sides. Every message is one `SOCK_SEQPACKET`
//! datagram holding a JSON object with a protocol version `v` and a `type`.
//! Listener fds travel as `SCM_RIGHTS` on [`MasterMessage::Listeners`]
//! messages, at most [`MAX_FDS_PER_MESSAGE`] per message, in the same order as
//! the metadata they carry. Decoding never panics: bad bytes are a
//! [`DecodeError`].
//!
//! The master and the SDK come from the same commit: every field is sent,
//! there is no default for one an older peer would omit (but
//! [`ListenerInfo::quic_slot`], which only adds to what a listener is), and
//! a change of the messages changes [`PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 3;

/// Environment variable naming the worker's end of the control channel
/// (`protocol = "sdk"` workers only).
pub const CONTROL_FD_ENV: &str = "BATON_CONTROL_FD";

/// Environment variable holding the worker's generation (1, 2, ...).
pub const GENERATION_ENV: &str = "BATON_GENERATION";

/// Environment variable holding the worker's index in its generation.
pub const WORKER_ENV: &str = "BATON_WORKER";

/// Environment variable holding the short hash of the configuration file
/// the worker's generation was started from, as `baton status` shows it.
pub const CONFIG_HASH_ENV: &str = "BATON_CONFIG_HASH";

/// Environment variable holding the W3C trace context of the reload that
/// started the worker, when the master exports traces.
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";

/// The most fds sent in one message. The kernel's limit (`SCM_MAX_FD`) is 253.
pub const MAX_FDS_PER_MESSAGE: usize = 252;

/// The largest message either side sends or accepts, in bytes.
pub const MAX_MESSAGE_SIZE: usize = 128 * 1024;

/// The longest listener name (keeps a full [`MasterMessage::Listeners`] message
/// well under [`MAX_MESSAGE_SIZE`]).
pub const MAX_LISTENER_NAME: usize = 64;

/// What kind of socket a listener is.
///
/// ```
/// # use baton_wire::protocol::ListenerKind;
/// assert_eq!(ListenerKind::Unix.to_string(), "unix");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// A listening TCP socket (IPv4 or IPv6).
    Tcp,
    /// A listening Unix stream socket.
    Unix,
    /// A bound UDP socket.
    Udp,
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Unix => "unix",
            ListenerKind::Udp => "udp",
        })
    }
}

/// Metadata of one listener, sent alongside its fd.
///
/// ```
/// # use baton_wire::protocol::{ListenerInfo, ListenerKind};
/// let info = ListenerInfo {
///     name: "http".into(),
///     kind: ListenerKind::Tcp,
///     address: "127.0.0.1:8080".into(),
///     quic_slot: None,
/// };
/// let port: u16 = info.address.rsplit_once(':').unwrap().1.parse()?;
/// assert_eq!(port, 8080);
/// # Ok::<(), std::num::ParseIntError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// The listener's name from the configuration.
    pub name: String,
    /// The kind of socket.
    pub kind: ListenerKind,
    /// The address the socket is bound to: `IP:PORT` for TCP and UDP (the
    /// actual port, also when the configuration said port 0), the path for Unix.
    pub address: String,
    /// For a UDP listener with `quic = true`: the slot this worker's socket
    /// has in the port's group, which its QUIC connection IDs start with so
    /// that the master steers their datagrams to it (1 to 255); `null` for
    /// other listeners. Read as `null` when absent, and ignored by SDKs that
    /// predate it: a listener's metadata takes no unknown-field check.
    #[serde(default)]
    pub quic_slot: Option<u8>,
}

/// A message from the master to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum MasterMessage {
    /// The first message on a channel.
    Hello {
        /// The generation this worker belongs to (1, 2, ...).
        generation: u64,
        /// The worker's index within its generation (0-based).
        worker_index: u32,
        /// How many listeners follow in [`MasterMessage::Listeners`] messages.
        listener_count: u32,
        /// The drain deadline the worker applies if the master goes away.
        drain_timeout_ms: u64,
        /// Whether an [`MasterMessage::AppFiles`] message with the
        /// `[worker] app_config` files follows the listeners.
        app_config: bool,
        /// The W3C `traceparent` of the reload that started the worker, when
        /// the master exports traces (also in `TRACEPARENT`).
        traceparent: Option<String>,
        /// Whether idle HTTP/1.1 connections move to the next generation at
        /// a drain (`[worker] handover`): the worker offers its own in
        /// [`WorkerMessage::Handover`] and takes others' in
        /// [`MasterMessage::Adopt`].
        handover: bool,
    },
    /// A batch of listeners; the message carries their fds, in this order.
    Listeners {
        /// Index of the first listener of this batch.
        offset: u32,
        /// The listeners of this batch.
        listeners: Vec<ListenerInfo>,
    },
    /// Reopen log files (the master's `baton reopen` / SIGUSR1).
    Reopen {},
    /// Stop accepting, finish open work, exit within `deadline_ms`.
    Drain {
        /// Milliseconds from now until the master kills the worker.
        deadline_ms: u64,
    },
    /// The `[worker] app_config` files, in the memfd this message carries:
    /// their bytes one after the other, in the order and lengths listed.
    AppFiles {
        /// `initial` (after the hello: what the worker starts with) or
        /// `prepare` (an in-place reload: build it, answer prepared or
        /// refused, swap nothing yet).
        phase: AppPhase,
        /// The config version these files make.
        version: String,
        /// Each file's name (as the config writes it) and length.
        files: Vec<AppFile>,
        /// The tracing filter for `[worker] log_filter`, if set.
        log_filter: Option<String>,
    },
    /// Swap in what was prepared for `version`, and confirm.
    AppCommit {
        /// The version prepared.
        version: String,
    },
    /// Drop what was prepared for `version`.
    AppAbort {
        /// The version prepared.
        version: String,
    },
    /// Connections a draining worker handed over, to serve as if accepted
    /// from the listener at `address`; the message carries their sockets,
    /// one per entry, in this order. Answered with
    /// [`WorkerMessage::Adopted`] or [`WorkerMessage::AdoptRefused`]: until
    /// then the draining worker keeps its copies untouched.
    Adopt {
        /// Names this adoption in the answer.
        id: u64,
        /// The listener's address, as the worker announced it in
        /// [`WorkerMessage::Adopts`].
        address: String,
        /// Each connection's bytes already read, in the order of the fds.
        connections: Vec<HandedConnection>,
        /// The worker that offered them and its id for the offer, echoed in
        /// the answer: a master that did not pass them on (the one that
        /// did died) can still tell the offerer. `null` when they came from
        /// an old master at an upgrade.
        origin: Option<HandoverOrigin>,
    },
    /// A new master adopted this worker (an in-place upgrade, or the
    /// previous master died): answers to handovers the worker offered
    /// before may have been lost with the previous one.
    NewMaster {},
    /// The connections of [`WorkerMessage::Handover`] `id` went to another
    /// worker: the draining worker drops its copies without a word.
    HandedOver {
        /// The handover's id.
        id: u64,
    },
    /// The connections of [`WorkerMessage::Handover`] `id` stay with the
    /// draining worker, which closes them between requests as without a
    /// handover.
    HandoverRefused {
        /// The handover's id.
        id: u64,
        /// Why, for the log.
        reason: String,
    },
}

/// One connection moving between workers: its socket travels as an fd next
/// to the message, its bytes already read (the start of its next request,
/// if any) here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedConnection {
    /// The bytes read from the socket but not yet served, base64 on the wire.
    #[serde(with = "base64_bytes")]
    pub pending: Vec<u8>,
    /// A long-lived session (a WebSocket) the app hands over with its
    /// state, to be resumed by the taker's handler of the same kind; `null`
    /// for an HTTP/1.1 connection between two requests.
    pub session: Option<HandedSession>,
}

/// A session moving with its connection: which of the app's handlers
/// resumes it, and the state the app gave for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedSession {
    /// The handler's name, as the app registered it in both generations.
    pub kind: String,
    /// The app's state for the session, base64 on the wire (at most
    /// [`MAX_SESSION_STATE`] bytes).
    #[serde(with = "base64_bytes")]
    pub state: Vec<u8>,
}

/// The most bytes of state a session may carry to another worker: what
/// fits, base64, in one message beside its pending bytes.
pub const MAX_SESSION_STATE: usize = 64 * 1024;

/// Who offered connections passed on in a [`MasterMessage::Adopt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverOrigin {
    /// The offering worker's pid.
    pub pid: u32,
    /// Its id for the offer ([`WorkerMessage::Handover`]'s `id`).
    pub id: u64,
}

/// Bytes as a base64 string.
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("base64 bytes: {e}")))
    }
}

/// Why app files are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppPhase {
    /// What a new worker starts with.
    Initial,
    /// An in-place reload's first phase.
    Prepare,
}

/// One app config file in an [`MasterMessage::AppFiles`] memfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    /// Its name, as `[worker] app_config` writes it.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
}

/// A message from a worker to the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// The worker serves: the reload may commit.
    Ready,
    /// The worker's count of open connections.
    Connections {
        /// Open connections right now.
        count: u64,
    },
    /// The worker is giving up; the master logs the reason.
    Error {
        /// What went wrong, for the operator.
        message: String,
    },
    /// The worker registered its reload handle(s): in-place reloads can
    /// reach it. It runs `version`.
    AppRegistered {
        /// The version it built its configuration from.
        version: String,
    },
    /// Prepared `version`: ready to swap on commit.
    AppPrepared {
        /// The version.
        version: String,
    },
    /// Refused `version`: to a prepare, nothing changed; to a commit, it
    /// had not prepared that version with every handle, so it does not
    /// serve it (the master replaces it).
    AppRefused {
        /// The version.
        version: String,
        /// Why, for the operator (the parser's error).
        reason: String,
    },
    /// Swapped `version` in.
    AppCommitted {
        /// The version.
        version: String,
    },
    /// The worker serves the listener at `address` (the address it reads
    /// on its socket) and takes connections handed over on it
    /// ([`MasterMessage::Adopt`]).
    Adopts {
        /// The listener's address: `IP:PORT`, or the path of a Unix socket.
        address: String,
    },
    /// Idle connections of the listener at `address`, offered to the
    /// current generation; the message carries their sockets, one per entry,
    /// in this order. The worker keeps its copies untouched until the
    /// master's [`MasterMessage::HandedOver`] or
    /// [`MasterMessage::HandoverRefused`] for `id`.
    Handover {
        /// Names this handover in the answer.
        id: u64,
        /// The listener's address, as in [`WorkerMessage::Adopts`].
        address: String,
        /// Each connection's bytes already read, in the order of the fds.
        connections: Vec<HandedConnection>,
    },
    /// The worker took the connections of [`MasterMessage::Adopt`] `id`:
    /// it serves them.
    Adopted {
        /// The adoption's id.
        id: u64,
        /// The `origin` of the adoption, echoed.
        origin: Option<HandoverOrigin>,
    },
    /// The worker did not take the connections of
    /// [`MasterMessage::Adopt`] `id` (their fds did not arrive, it no
    /// longer serves that listener) and closed its copies without a word.
    AdoptRefused {
        /// The adoption's id.
        id: u64,
        /// Why, for the log.
        reason: String,
        /// The `origin` of the adoption, echoed.
        origin: Option<HandoverOrigin>,
    },
    /// How many connections the worker has closed at its drain (told to
    /// go: `Connection: close`, GOAWAY) instead of handing them over, in
    /// all.
    ClosedAtDrain {
        /// The total so far.
        count: u64,
    },
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message is larger than [`MAX_MESSAGE_SIZE`].
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")]
    TooLarge(usize),
    /// The bytes are not a JSON object with a numeric `v`.
    #[error("not a baton protocol message: {0}")]
    NotAMessage(String),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {peer}, this side speaks version {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        peer: u32,
    },
    /// The version matches but the content does not.
    #[error("invalid message: {0}")]
    Invalid(String),
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    v: u32,
    #[serde(flatten)]
    message: &'a T,
}

/// Encodes a message with the current protocol version.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let envelope = Envelope {
        v: PROTOCOL_VERSION,
        message,
    };
    // Serializing these plain enums and structs into a Vec cannot fail.
    serde_json::to_vec(&envelope).expect("protocol messages always serialize")
}

/// Decodes one message, checking size and version first. The error names
/// what is wrong: not JSON (with the position), not an object, the version
/// field `v`, the `type`, or the field of that type.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if bytes.is_empty() {
        return Err(DecodeError::NotAMessage("empty message".into()));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| DecodeError::NotAMessage(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(DecodeError::NotAMessage(format!(
            "expected a JSON object, got {}",
            json_kind(&value)
        )));
    };
    let version = object
        .remove("v")
        .ok_or_else(|| DecodeError::NotAMessage("no protocol version `v`".into()))?;
    let version = version
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            DecodeError::NotAMessage(format!(
                "protocol version `v` is {version}, not a version number"
            ))
        })?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version { peer: version });
    }
    // The `type` of the message, to name it in an error about its fields.
    let kind = match object.get("type") {
        Some(serde_json::Value::String(kind)) => Some(kind.clone()),
        Some(other) => {
            return Err(DecodeError::Invalid(format!(
                "message `type` is {}, not a string",
                json_kind(other)
            )))
        }
        None => None,
    };
    serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| {
        let e = e.to_string();
        match kind {
            // An unknown type names itself.
            Some(_) if e.starts_with("unknown variant") => {
                DecodeError::Invalid(format!("message type: {e}"))
            }
            Some(kind) => DecodeError::Invalid(format!("`{kind}` message: {e}")),
            None => DecodeError::Invalid(e),
        }
    })
}

/// What a JSON value is (`null`, `a string`, `an object`...), as errors
/// name it.
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_master_messages() -> Vec<MasterMessage> {
        vec![
            MasterMessage::Hello {
                generation: 3,
                worker_index: 1,
                listener_count: 2,
                drain_timeout_ms: 60_000,
                app_config: true,
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                handover: true,
            },
            MasterMessage::Listeners {
                offset: 0,
                listeners: vec![
                    ListenerInfo {
                        name: "http".into(),
                        kind: ListenerKind::Tcp,
                        address: "127.0.0.1:8080".into(),
                        quic_slot: Some(7),
                    },
                    ListenerInfo {
                        name: "admin".into(),
                        kind: ListenerKind::Unix,
                        address: "/run/admin.sock".into(),
                        quic_slot: None,
                    },
                ],
            },
            MasterMessage::Drain { deadline_ms: 1500 },
            MasterMessage::AppFiles {
                phase: AppPhase::Prepare,
                version: "3f2a0c".into(),
                files: vec![AppFile {
                    name: "app.toml".into(),
                    len: 12,
                }],
                log_filter: Some("info".into()),
            },
            MasterMessage::AppCommit {
                version: "3f2a0c".into(),
            },
            MasterMessage::AppAbort {
                version: "3f2a0c".into(),
            },
            MasterMessage::Reopen {},
            MasterMessage::NewMaster {},
            MasterMessage::Adopt {
                id: 4,
                address: "127.0.0.1:8080".into(),
                connections: vec![
                    HandedConnection {
                        pending: vec![],
                        session: None,
                    },
                    HandedConnection {
                        pending: b"GET / HT\x00\xff".to_vec(),
                        session: None,
                    },
                    HandedConnection {
                        pending: b"\x81\x85".to_vec(),
                        session: Some(HandedSession {
                            kind: "echo".into(),
                            state: vec![0, 0, 0, 7, 0xff],
                        }),
                    },
                ],
                origin: Some(HandoverOrigin { pid: 4242, id: 9 }),
            },
            MasterMessage::HandedOver { id: 7 },
            MasterMessage::HandoverRefused {
                id: 8,
                reason: "no worker of generation 3 takes connections".into(),
            },
        ]
    }

    #[test]
    fn master_messages_round_trip() {
        for message in all_master_messages() {
            let bytes = encode(&message);
            assert_eq!(decode::<MasterMessage>(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn worker_messages_round_trip() {
        for message in [
            WorkerMessage::Ready,
            WorkerMessage::Connections { count: 42 },
            WorkerMessage::AppRegistered {
                version: "3f2a0c".into(),
            },
            WorkerMessage::AppRefused {
                version: "3f2a0c".into(),
                reason: "rate must be > 0".into(),
            },
            WorkerMessage::Error {
                message: "boom".into(),
            },
            WorkerMessage::Adopts {
                address: "/run/app.sock".into(),
            },
            WorkerMessage::Handover {
                id: 3,
                address: "127.0.0.1:8080".into(),
                connections: vec![HandedConnection {
                    pending: b"POST /".to_vec(),
                    session: None,
                }],
            },
            WorkerMessage::ClosedAtDrain { count: 12 },
            WorkerMessage::Adopted {
                id: 4,
                origin: Some(HandoverOrigin { pid: 4242, id: 9 }),
            },
            WorkerMessage::AdoptRefused {
                id: 5,
                reason: "its fds did not arrive".into(),
                origin: None,
            },
        ] {
            let bytes = encode(&message);
            assert_eq!(decode::<WorkerMessage>(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let err = decode::<WorkerMessage>(br#"{"v":9,"type":"ready"}"#).unwrap_err();
        assert_eq!(err, DecodeError::Version { peer: 9 });
        assert!(err.to_string().contains("version 9"));
        assert!(err
            .to_string()
            .contains(&format!("version {PROTOCOL_VERSION}")));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let cases: &[&[u8]] = &[
            b"",
            b"\xff\xfe\x00",
            b"null",
            b"[]",
            b"{}",
            b"{\"v\":\"1\"}",
            b"{\"v\":2}",
            b"{\"v\":2,\"type\":\"nope\"}",
            b"{\"v\":2,\"type\":\"connections\"}",
            b"{\"v\":2,\"type\":\"connections\",\"count\":-1}",
            b"{\"v\":2,\"type\":\"connections\",\"count\":1,\"extra\":1}",
            b"{\"v\":2,\"type\":\"drain\",\"deadline_ms\":1e400}",
            b"{\"v\":99999999999,\"type\":\"ready\"}",
            b"{\"v\":2,\"type\":\"handover\",\"id\":1,\"address\":\"a\",\"connections\":[{\"pending\":\"!!\"}]}",
        ];
        for bytes in cases {
            assert!(decode::<WorkerMessage>(bytes).is_err(), "{bytes:?}");
            assert!(decode::<MasterMessage>(bytes).is_err(), "{bytes:?}");
        }
        // Every prefix and single-byte corruption of valid messages.
        for message in all_master_messages() {
            let bytes = encode(&message);
            for cut in 0..bytes.len() {
                let _ = decode::<MasterMessage>(&bytes[..cut]);
                let mut corrupt = bytes.clone();
                corrupt[cut] ^= 0x5a;
                let _ = decode::<MasterMessage>(&corrupt);
            }
        }
    }

    #[test]
    fn a_hello_without_one_of_its_fields_names_it() {
        let line = format!(
            r#"{{"v":{PROTOCOL_VERSION},"type":"hello","generation":1,"worker_index":0,"listener_count":0,"drain_timeout_ms":1,"traceparent":null,"handover":true}}"#
        );
        let err = decode::<MasterMessage>(line.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("app_config"), "{err}");
    }

    #[test]
    fn a_listener_without_a_quic_slot_has_none_and_older_sdks_ignore_it() {
        let line = format!(
            r#"{{"v":{PROTOCOL_VERSION},"type":"listeners","offset":0,"listeners":[{{"name":"h3","kind":"udp","address":"127.0.0.1:443"}}]}}"#
        );
        let message = decode::<MasterMessage>(line.as_bytes()).unwrap();
        let MasterMessage::Listeners { listeners, .. } = message else {
            panic!("{message:?}")
        };
        assert_eq!(listeners[0].quic_slot, None);
        /// A listener's metadata as SDKs before `quic_slot` had it.
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Older {
            name: String,
            kind: ListenerKind,
            address: String,
        }
        let info = ListenerInfo {
            quic_slot: Some(3),
            ..listeners[0].clone()
        };
        let older: Older = serde_json::from_str(&serde_json::to_string(&info).unwrap()).unwrap();
        assert_eq!(older.address, "127.0.0.1:443");
    }

    #[test]
    fn oversized_message_is_rejected() {
        let bytes = vec![b' '; MAX_MESSAGE_SIZE + 1];
        assert_eq!(
            decode::<WorkerMessage>(&bytes),
            Err(DecodeError::TooLarge(MAX_MESSAGE_SIZE + 1))
        );
    }
}
