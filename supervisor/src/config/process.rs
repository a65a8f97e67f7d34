//! `[worker]` settings about the worker process itself: who it runs as, its
//! limits and output, and the `{fd:NAME}` templates of `protocol = "args"`.
//! Also the checks that span several keys (a template names a listener, a
//! protocol suits the readiness mode), located with a second, lenient parse
//! of the same text that only collects spans.

use super::{Protocol, ReadyMode, WorkerConfig};
use nix::sys::signal::Signal;
use serde::{de, Deserialize, Deserializer};
use std::ops::Range;

/// The user workers run as, resolved when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// As written in the config.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary group, used when `group` is not set.
    pub gid: u32,
}

impl<'de> Deserialize<'de> for UserSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        require_root("user", &name).map_err(de::Error::custom)?;
        let found = match name.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(uid.into()),
            Err(_) => nix::unistd::User::from_name(&name),
        };
        match found {
            Ok(Some(user)) => Ok(UserSpec {
                name,
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }),
            Ok(None) => Err(de::Error::custom(format!("unknown user {name:?}"))),
            Err(e) => Err(de::Error::custom(format!("looking up user {name:?}: {e}"))),
        }
    }
}

/// The group workers run as, resolved when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// As written in the config.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

impl<'de> Deserialize<'de> for GroupSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        require_root("group", &name).map_err(de::Error::custom)?;
        let found = match name.parse::<u32>() {
            Ok(gid) => nix::unistd::Group::from_gid(gid.into()),
            Err(_) => nix::unistd::Group::from_name(&name),
        };
        match found {
            Ok(Some(group)) => Ok(GroupSpec {
                name,
                gid: group.gid.as_raw(),
            }),
            Ok(None) => Err(de::Error::custom(format!("unknown group {name:?}"))),
            Err(e) => Err(de::Error::custom(format!("looking up group {name:?}: {e}"))),
        }
    }
}

/// Only root can switch to another user: say so at load time (and in
/// `baton check`) rather than at the first spawn.
fn require_root(key: &str, name: &str) -> Result<(), String> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok(())
    } else {
        Err(format!(
            "{key} = {name:?} needs the master to run as root (it runs as uid {euid})"
        ))
    }
}

/// Who a worker becomes before exec: supplementary groups are always
/// dropped, then the gid is set, then the uid (if a user is named).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// `user`'s uid.
    pub uid: Option<u32>,
    /// `group`'s gid, or else `user`'s primary group.
    pub gid: u32,
}

impl WorkerConfig {
    /// The identity to switch to, when `user` or `group` is set.
    pub fn credentials(&self) -> Option<Credentials> {
        let gid = self
            .group
            .as_ref()
            .map(|g| g.gid)
            .or(self.user.as_ref().map(|u| u.gid))?;
        Some(Credentials {
            uid: self.user.as_ref().map(|u| u.uid),
            gid,
        })
    }
}

/// The largest `rlimit_nofile` accepted (the kernel's default `nr_open`).
const MAX_NOFILE: i64 = 1 << 20;

pub(super) fn de_rlimit_nofile<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=MAX_NOFILE).contains(&n) {
        return Err(de::Error::custom(format!(
            "rlimit_nofile must be between 1 and {MAX_NOFILE}, got {n}"
        )));
    }
    let n = n as u64;
    if !nix::unistd::geteuid().is_root() {
        use nix::sys::resource::{getrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(de::Error::custom)?;
        if n > hard {
            return Err(de::Error::custom(format!(
                "rlimit_nofile {n} exceeds the hard limit {hard}, which only root can raise"
            )));
        }
    }
    Ok(Some(n))
}

/// What happens to a worker's stdout and stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// The worker writes where the master writes.
    #[default]
    Inherit,
    /// The master reads them and logs each line as a `worker output` event.
    Capture,
}

/// The signal `baton reopen` sends to non-sdk workers, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReopenSignal(pub Option<Signal>);

impl Default for ReopenSignal {
    fn default() -> Self {
        ReopenSignal(Some(Signal::SIGUSR1))
    }
}

impl<'de> Deserialize<'de> for ReopenSignal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "none" {
            return Ok(ReopenSignal(None));
        }
        super::parse_signal(&s)
            .map(|s| ReopenSignal(Some(s)))
            .map_err(de::Error::custom)
    }
}

/// The listener names of the `{fd:NAME}` templates in `arg`, in order.
pub fn fd_templates(arg: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find("{fd:") {
        let after = &rest[start + 4..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated {{fd:NAME}} template in {arg:?}"))?;
        names.push(&after[..end]);
        rest = &after[end + 1..];
    }
    Ok(names)
}

/// `text` with every `{fd:NAME}` replaced by `fd_of(NAME)` and every
/// `{generation}` by `generation`. The config was checked at load, so
/// every name resolves.
pub fn substitute(text: &str, fd_of: impl Fn(&str) -> Option<i32>, generation: u64) -> String {
    let text = text.replace("{generation}", &generation.to_string());
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find("{fd:") {
        let after = &rest[start + 4..];
        let Some(end) = after.find('}') else { break };
        out.push_str(&rest[..start]);
        match fd_of(&after[..end]) {
            Some(fd) => out.push_str(&fd.to_string()),
            None => out.push_str(&rest[start..start + 4 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Where the `[worker]` keys that cross-field checks complain about are.
#[derive(Deserialize)]
struct Spans {
    worker: Option<WorkerSpans>,
}

#[derive(Deserialize)]
struct WorkerSpans {
    command: Option<Vec<toml::Spanned<toml::Value>>>,
    env: Option<std::collections::BTreeMap<String, toml::Spanned<toml::Value>>>,
    protocol: Option<toml::Spanned<toml::Value>>,
    ready: Option<toml::Spanned<toml::Value>>,
    nonblocking: Option<toml::Spanned<toml::Value>>,
}

/// Checks that involve more than one key: every `{fd:NAME}` in `command`
/// or an `env` value names a listener (and only protocols that place the
/// listeners on fds have them), a worker without the SDK has a readiness
/// mode it can satisfy, and `nonblocking` is only asked of a protocol that
/// places the listeners on fds.
pub(super) fn check_worker(
    worker: &WorkerConfig,
    listeners: &[&str],
    text: &str,
) -> Result<(), (Option<Range<usize>>, String)> {
    let spans = toml::from_str::<Spans>(text)
        .ok()
        .and_then(|s| s.worker)
        .unwrap_or(WorkerSpans {
            command: None,
            env: None,
            protocol: None,
            ready: None,
            nonblocking: None,
        });
    let arg_span = |i: usize| {
        spans
            .command
            .as_ref()
            .and_then(|c| c.get(i))
            .map(|s| s.span())
    };
    let env_span = |key: &str| {
        spans
            .env
            .as_ref()
            .and_then(|e| e.get(key))
            .map(|s| s.span())
    };
    let texts = worker
        .command
        .iter()
        .enumerate()
        .map(|(i, arg)| (arg_span(i), arg))
        .chain(worker.env.iter().map(|(k, v)| (env_span(k), v)));
    for (span, arg) in texts {
        let names = fd_templates(arg).map_err(|e| (span.clone(), e))?;
        if names.is_empty() {
            continue;
        }
        if worker.protocol == Protocol::Sdk {
            return Err((
                span,
                format!(
                    "{arg:?}: {{fd:NAME}} templates need protocol = \"args\" or \"systemd\" (an sdk worker gets its listeners by name)"
                ),
            ));
        }
        if let Some(unknown) = names.iter().find(|n| !listeners.contains(n)) {
            return Err((
                span,
                format!(
                    "{arg:?}: no listener named {unknown:?} (listeners: {})",
                    if listeners.is_empty() {
                        "none".to_string()
                    } else {
                        listeners.join(", ")
                    }
                ),
            ));
        }
    }
    if worker.protocol == Protocol::Sdk && worker.nonblocking {
        let span = spans.nonblocking.as_ref().map(|s| s.span());
        return Err((
            span,
            "nonblocking = true needs protocol = \"args\" or \"systemd\" (the SDK makes an sdk worker's sockets non-blocking itself)".into(),
        ));
    }
    if worker.protocol != Protocol::Sdk && worker.ready == ReadyMode::Sdk {
        let span = spans
            .ready
            .as_ref()
            .or(spans.protocol.as_ref())
            .map(|s| s.span());
        return Err((
            span,
            format!(
                "protocol = \"{}\" gives the worker no channel to report ready on: set ready = \"notify\" or \"delay:DURATION\"",
                worker.protocol.name()
            ),
        ));
    }
    Ok(())
}
