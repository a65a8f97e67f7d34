//! `baton check`: what `nginx -t` is to nginx. Beyond parsing and
//! validating the config (which resolves `user` and `group` and checks
//! every `{fd:NAME}`), it looks at what a reload would meet: the working
//! directory, the worker's program, and each listener's address, which it
//! binds and releases at once, the way a reload binds it. Every problem is
//! reported with the message a reload would fail with.

use crate::config::{Config, ListenerAddress, ListenerConfig};
use crate::control::client;
use crate::control::protocol::{ListenerStatus, Request, Status};
use std::time::Duration;

/// Everything a reload of `config` would trip over, in order; empty when
/// it would get past validate, bind and the start of spawn.
pub fn problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let worker = &config.worker;
    let cwd_ok = match worker.cwd.as_deref().map(crate::exec::check_cwd) {
        Some(Err(e)) => {
            problems.push(format!("{e:#}"));
            false
        }
        _ => true,
    };
    // A relative PATH entry is looked up under the cwd: meaningless without it.
    if cwd_ok || worker.command[0].contains('/') {
        if let Err(e) = crate::worker::resolve_command(worker) {
            problems.push(format!("{e:#}"));
        }
    }
    let running = running_listeners(config);
    for listener in &config.listeners {
        if kept_by_running_master(listener, &running) {
            continue;
        }
        // Bound and closed at once: a port held by anyone fails here as
        // it would in the reload's bind phase.
        if let Err(e) = crate::listener::Listener::bind(listener) {
            problems.push(format!("{e:#}"));
        }
    }
    problems
}

/// The listeners of the master on `config`'s control socket, if one runs.
fn running_listeners(config: &Config) -> Vec<ListenerStatus> {
    let socket = &config.supervisor.control_socket;
    let Ok(reply) = client::request(socket, &Request::Status {}, Duration::from_secs(5)) else {
        return Vec::new();
    };
    reply
        .result
        .and_then(|r| serde_json::from_value::<Status>(r).ok())
        .map(|s| s.listeners)
        .unwrap_or_default()
}

/// Whether a reload would keep the running master's socket for
/// `listener` (same name and address) instead of binding it.
fn kept_by_running_master(listener: &ListenerConfig, running: &[ListenerStatus]) -> bool {
    running.iter().any(|r| {
        r.name == listener.name
            && match &listener.address {
                ListenerAddress::Tcp(a) | ListenerAddress::Udp(a) => {
                    a.port() == 0 || r.address == a.to_string()
                }
                ListenerAddress::Unix(path) => r.address == path.display().to_string(),
            }
    })
}
