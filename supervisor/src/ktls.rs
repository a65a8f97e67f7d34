//! Whether this host offers kernel TLS (the `tls` upper-layer protocol of
//! TCP, `CONFIG_TLS`), with which a TLS session's keys could live in the
//! kernel and its socket move to another process like a plain one.
//!
//! baton does not hand TLS connections over yet, kernel TLS or not: a
//! draining worker says goodbye to them as without a handover
//! (docs/worker.md). The master says at its start which case this host is
//! in (`master.starting`'s `kernel_tls`), so that the limit is known for
//! what it is.

use nix::sys::socket::{setsockopt, sockopt::TcpUlp};
use std::fmt;
use std::net::{Ipv4Addr, TcpListener, TcpStream};

/// The kernel's list of TCP upper-layer protocols loaded.
const AVAILABLE_ULP: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// What the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelTls {
    /// The `tls` ULP is loaded, or loads when a socket asks for it.
    Available,
    /// It is not: why.
    Unavailable(String),
}

impl fmt::Display for KernelTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelTls::Available => f.write_str("available (TLS connections still close at a drain: their handover is not implemented)"),
            KernelTls::Unavailable(why) => write!(f, "unavailable ({why}): TLS connections close at a drain"),
        }
    }
}

/// Whether `list` (the contents of `tcp_available_ulp`) names `tls`.
fn lists_tls(list: &str) -> bool {
    list.split_whitespace().any(|ulp| ulp == "tls")
}

/// Detects it: `tls` in `/proc/sys/net/ipv4/tcp_available_ulp`, or else
/// `setsockopt(TCP_ULP, "tls")` on a connected loopback socket (which makes
/// the kernel load the module where it can).
pub fn detect() -> KernelTls {
    if std::fs::read_to_string(AVAILABLE_ULP).is_ok_and(|list| lists_tls(&list)) {
        return KernelTls::Available;
    }
    match probe() {
        Ok(()) => KernelTls::Available,
        Err(why) => KernelTls::Unavailable(why),
    }
}

/// Asks for the `tls` ULP on one end of a loopback connection (it needs an
/// established socket).
fn probe() -> Result<(), String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("cannot open a loopback socket to probe: {e}"))?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("cannot open a loopback socket to probe: {e}"))?;
    let client = TcpStream::connect(address)
        .map_err(|e| format!("cannot open a loopback socket to probe: {e}"))?;
    let _server = listener.accept();
    match setsockopt(&client, TcpUlp::default(), b"tls") {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ENOENT) => Err(format!(
            "no `tls` in {AVAILABLE_ULP} and the kernel cannot load it"
        )),
        Err(e) => Err(format!("setsockopt(TCP_ULP, \"tls\"): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ulp_list_names_tls_or_not() {
        assert!(lists_tls("mptcp tls\n"));
        assert!(lists_tls("tls"));
        assert!(!lists_tls("mptcp\n"));
        assert!(!lists_tls("espintcp tlsx"));
    }

    #[test]
    fn detection_agrees_with_the_kernel() {
        let listed = std::fs::read_to_string(AVAILABLE_ULP).is_ok_and(|l| lists_tls(&l));
        let detected = detect();
        if listed {
            assert_eq!(detected, KernelTls::Available);
        }
        // Whatever the host, after a probe that loaded the module the
        // kernel lists it.
        if detected == KernelTls::Available {
            let now = std::fs::read_to_string(AVAILABLE_ULP).unwrap_or_default();
            assert!(lists_tls(&now), "available but not listed: {now:?}");
        }
        assert!(
            detected.to_string().contains("close at a drain"),
            "{detected}"
        );
    }
}
