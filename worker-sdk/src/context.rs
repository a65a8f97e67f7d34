//! What a worker knows of the reload that started it, from the environment
//! the master gives it: the reload's W3C trace context, so that the worker's
//! startup and request spans can join or link to the reload's trace, and the
//! hash of the configuration file its generation was started from.
//! [`Worker::generation`](crate::Worker::generation) gives the generation.

/// The reload's W3C `traceparent` (`00-TRACEID-SPANID-FLAGS`), from
/// `TRACEPARENT`, when the master exports traces (`[supervisor]
/// otlp_endpoint`); `None` otherwise or when malformed. An SDK worker has
/// it from the master's hello as well:
/// [`Worker::traceparent`](crate::Worker::traceparent).
///
/// For a program that does not use [`Worker`](crate::Worker) (a helper it
/// starts, say):
///
/// ```
/// if let Some(parent) = baton_worker::traceparent() {
///     println!("started by the reload {parent}");
/// }
/// ```
pub fn traceparent() -> Option<String> {
    std::env::var(baton_wire::protocol::TRACEPARENT_ENV)
        .ok()
        .filter(|value| is_traceparent(value))
}

/// The short hash of the configuration file the worker's generation was
/// started from (`BATON_CONFIG_HASH`), as `baton status` shows it. (An
/// in-place reload changes the app config, not this.)
///
/// ```
/// let config = baton_worker::config_hash().unwrap_or_else(|| "standalone".into());
/// println!("serving config {config}");
/// ```
pub fn config_hash() -> Option<String> {
    std::env::var(baton_wire::protocol::CONFIG_HASH_ENV)
        .ok()
        .filter(|v| !v.is_empty())
}

pub(crate) fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_trace_contexts_are_accepted() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
        ));
        assert!(!is_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent("00-xyz-00f067aa0ba902b7-01"));
    }
}
