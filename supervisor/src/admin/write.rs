//! The admin endpoint's writes: `POST /reload`, `/upgrade`, `/restart`,
//! `/promote`, `/rollback`, `/scale`, `/drain`, `/stop`, `/reopen`.
//!
//! Each is the control request of the same name (see
//! [`crate::control::protocol::Request`]), sent to the master's loop as the
//! control socket sends it, with the caller as its requester (so it is
//! audited the same way), and answered with the same JSON as the CLI's
//! `--json`: `{"ok": true, "result": ...}` or `{"ok": false, "error": ...}`.
//!
//! Parameters come as a query string (`POST /reload?mode=in_place`) or a
//! JSON object body (`{"mode": "in_place"}`), not both for one key. `wait`
//! (default `true`) waits for the outcome, at most `timeout` (default 10m
//! for `reload`, `upgrade` and `restart`, else 30s); `wait=false` answers
//! 202 at once (follow `/events` or `/status`).
//!
//! Statuses: 200 done; 202 accepted (`wait=false`); 400 a bad parameter;
//! 401 no or a wrong token; 403 writes off, or a peer of another uid; 405
//! not `POST`; 409 the master refused it or it failed (a failed reload's
//! outcome is in the body); 413 a body over 64 KiB; 503 the master is
//! exiting; 504 no outcome within `timeout` (the operation goes on).

use super::auth::Refusal;
use crate::audit::Requester;
use crate::control::protocol::{Reply, Request};
use crate::master::{Event, Events};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Map, Value};
use std::time::Duration;
use tokio::sync::oneshot;

/// The paths that write.
pub const PATHS: [&str; 9] = [
    "/reload",
    "/upgrade",
    "/restart",
    "/promote",
    "/rollback",
    "/scale",
    "/drain",
    "/stop",
    "/reopen",
];

/// The largest body a write reads.
const MAX_BODY: usize = 64 * 1024;

/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest `timeout` a write may ask for.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// An HTTP answer to a write: status, extra header, JSON body.
#[derive(Debug)]
pub struct Written {
    /// The HTTP status.
    pub status: u16,
    /// `WWW-Authenticate` for a 401.
    pub challenge: Option<&'static str>,
    /// The reply, as JSON.
    pub body: String,
}

impl Written {
    fn reply(status: u16, reply: &Reply) -> Written {
        Written {
            status,
            challenge: None,
            body: format!(
                "{}\n",
                serde_json::to_string_pretty(reply).expect("a reply serializes")
            ),
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Written {
        Written::reply(status, &Reply::error(message))
    }

    /// A refused authorization.
    pub fn refused(refusal: Refusal, presented: bool) -> Written {
        let mut written = Written::error(refusal.status, refusal.reason);
        if refusal.status == 401 {
            written.challenge = Some(if presented {
                "Bearer realm=\"baton\", error=\"invalid_token\""
            } else {
                "Bearer realm=\"baton\""
            });
        }
        written
    }
}

/// A write, parsed: the control request and how long to wait for it.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    /// What to ask the master.
    pub request: Request,
    /// Wait for the outcome (else answer 202 at once).
    pub wait: bool,
    /// How long to wait.
    pub timeout: Duration,
}

/// Runs the write at `path`, let through for `from`: reads its parameters,
/// asks the master, waits as told.
pub async fn run(
    path: &str,
    query: Option<&str>,
    body: Incoming,
    requests: &Events,
    from: Requester,
) -> Written {
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        http_body_util::Limited::new(body, MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Written::error(413, format!("the body is over {MAX_BODY} bytes"))
        }
        Ok(Err(e)) => return Written::error(400, format!("reading the body: {e}")),
        Err(_) => {
            return Written::error(
                400,
                format!("the body did not arrive within {BODY_TIMEOUT:?}"),
            )
        }
    };
    let parsed = match params(query, &body).and_then(|p| parse(path, p)) {
        Ok(parsed) => parsed,
        Err(message) => return Written::error(400, format!("{path}: {message}")),
    };
    let (tx, rx) = oneshot::channel();
    let event = Event::Control {
        request: parsed.request,
        reply: tx,
        from,
    };
    if requests.send(event).is_err() {
        return Written::error(503, "the master is exiting");
    }
    if !parsed.wait {
        // The master answers the dropped receiver into the void.
        return Written::reply(202, &Reply::ok(serde_json::json!({ "accepted": path })));
    }
    match tokio::time::timeout(parsed.timeout, rx).await {
        Ok(Ok(reply)) => Written::reply(if reply.ok { 200 } else { 409 }, &reply),
        Ok(Err(_)) => Written::error(503, "the master exited before answering"),
        Err(_) => Written::error(
            504,
            format!(
                "no outcome within {:?}; it goes on (see /status or /events)",
                parsed.timeout
            ),
        ),
    }
}

/// The parameters of the query string and the JSON body, merged.
fn params(query: Option<&str>, body: &[u8]) -> Result<Map<String, Value>, String> {
    let mut params = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err("the body must be a JSON object".into()),
            Err(e) => return Err(format!("the body is not JSON: {e}")),
        }
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if params
            .insert(key.to_string(), Value::String(value.to_string()))
            .is_some()
        {
            return Err(format!("{key:?} is given twice"));
        }
    }
    Ok(params)
}

/// The write `path` with `params`.
fn parse(path: &str, mut params: Map<String, Value>) -> Result<Parsed, String> {
    let slow = matches!(path, "/reload" | "/upgrade" | "/restart");
    let wait = take_bool(&mut params, "wait")?.unwrap_or(true);
    let timeout = match take_string(&mut params, "timeout")? {
        Some(t) => {
            let t = crate::config::parse_duration(&t).map_err(|e| format!("timeout: {e}"))?;
            if t.is_zero() || t > MAX_WAIT {
                return Err(format!("timeout must be above 0 and at most {MAX_WAIT:?}"));
            }
            t
        }
        None if slow => Duration::from_secs(600),
        None => Duration::from_secs(30),
    };
    let request = match path {
        "/reload" => Request::Reload {
            canary: take_string(&mut params, "canary")?,
            mode: take_string(&mut params, "mode")?,
            if_version: take_string(&mut params, "if_version")?,
        },
        "/upgrade" => Request::Upgrade {},
        "/restart" => Request::Restart {
            hard: take_bool(&mut params, "hard")?.unwrap_or(false),
        },
        "/promote" => Request::Promote {},
        "/rollback" => Request::Rollback {},
        "/scale" => Request::Scale {
            by: take_int(&mut params, "by")?,
            to: take_int(&mut params, "to")?,
        },
        "/drain" => {
            let grace = match take_string(&mut params, "grace")? {
                Some(g) => crate::config::parse_duration(&g).map_err(|e| format!("grace: {e}"))?,
                None => Duration::from_secs(5),
            };
            Request::Drain {
                grace_ms: grace.as_millis() as u64,
            }
        }
        "/stop" => Request::Stop {
            fast: take_bool(&mut params, "fast")?.unwrap_or(false),
        },
        "/reopen" => Request::Reopen {},
        _ => return Err("not a write".into()),
    };
    if let Some(unknown) = params.keys().next() {
        return Err(format!(
            "unknown parameter {unknown:?} (it takes {})",
            accepted(path)
        ));
    }
    Ok(Parsed {
        request,
        wait,
        timeout,
    })
}

/// The parameters `path` takes, for an error.
fn accepted(path: &str) -> &'static str {
    match path {
        "/reload" => "mode, canary, if_version, wait, timeout",
        "/restart" => "hard, wait, timeout",
        "/scale" => "by or to, wait, timeout",
        "/drain" => "grace, wait, timeout",
        "/stop" => "fast, wait, timeout",
        _ => "wait, timeout",
    }
}

fn take_string(params: &mut Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match params.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{key} must be a string, not {other}")),
    }
}

fn take_bool(params: &mut Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match params.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) if s == "true" || s == "1" => Ok(Some(true)),
        Some(Value::String(s)) if s == "false" || s == "0" => Ok(Some(false)),
        Some(other) => Err(format!("{key} must be true or false, not {other}")),
    }
}

fn take_int(params: &mut Map<String, Value>, key: &str) -> Result<Option<i64>, String> {
    match params.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("{key} must be an integer, not {s:?}")),
        Some(other) => Err(format!("{key} must be an integer, not {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(path: &str, query: &str, body: &str) -> Result<Parsed, String> {
        params(Some(query), body.as_bytes()).and_then(|p| parse(path, p))
    }

    #[test]
    fn query_and_body_give_the_same_request() {
        let from_query = parsed("/reload", "mode=in_place&if_version=v%2042", "").unwrap();
        let from_body = parsed(
            "/reload",
            "",
            r#"{"mode": "in_place", "if_version": "v 42"}"#,
        )
        .unwrap();
        assert_eq!(from_query, from_body);
        assert_eq!(
            from_query.request,
            Request::Reload {
                canary: None,
                mode: Some("in_place".into()),
                if_version: Some("v 42".into())
            }
        );
        assert!(from_query.wait);
        assert_eq!(from_query.timeout, Duration::from_secs(600));
        let scale = parsed("/scale", "to=3&wait=false", "").unwrap();
        assert_eq!(
            scale.request,
            Request::Scale {
                by: None,
                to: Some(3)
            }
        );
        assert!(!scale.wait);
        let drain = parsed("/drain", "", r#"{"grace": "2s", "timeout": "5s"}"#).unwrap();
        assert_eq!(drain.request, Request::Drain { grace_ms: 2000 });
        assert_eq!(drain.timeout, Duration::from_secs(5));
        assert_eq!(
            parsed("/stop", "fast=true", "").unwrap().request,
            Request::Stop { fast: true }
        );
    }

    #[test]
    fn a_bad_parameter_is_named() {
        let error = |path, query, body| parsed(path, query, body).unwrap_err();
        assert!(error("/reload", "mode=x&colour=red", "").contains("unknown parameter \"colour\""));
        assert!(error("/reload", "mode=a", r#"{"mode": "b"}"#).contains("\"mode\" is given twice"));
        assert!(error("/scale", "to=three", "").contains("to must be an integer"));
        assert!(error("/stop", "fast=maybe", "").contains("fast must be true or false"));
        assert!(error("/reload", "", "[1]").contains("must be a JSON object"));
        assert!(error("/reload", "", "{").contains("not JSON"));
        assert!(error("/reload", "timeout=2h", "").contains("at most"));
        assert!(error("/drain", "grace=soon", "").contains("grace:"));
        assert!(error("/promote", "", r#"{"mode": 1}"#).contains("(it takes wait, timeout)"));
    }
}
