//! Listener addresses as written in `baton.toml`: `IP:PORT`, `[IPv6]:PORT`,
//! `HOST:PORT`, `unix:PATH` and `udp:...`.

use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// A listener address: `IP:PORT`, `[IPv6]:PORT`, `unix:PATH` or `udp:IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenerAddress {
    /// TCP.
    Tcp(SocketAddr),
    /// Unix stream socket at this path.
    Unix(PathBuf),
    /// UDP.
    Udp(SocketAddr),
}

impl FromStr for ListenerAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ip = |a: &str| a.parse::<SocketAddr>().or_else(|_| resolve(s, a));
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || path.len() > 107 {
                return Err(format!(
                    "invalid address {s:?}: a Unix socket path is 1 to 107 bytes"
                ));
            }
            Ok(ListenerAddress::Unix(PathBuf::from(path)))
        } else if let Some(rest) = s.strip_prefix("udp:") {
            Ok(ListenerAddress::Udp(ip(rest)?))
        } else {
            Ok(ListenerAddress::Tcp(ip(s)?))
        }
    }
}

/// `HOST:PORT` with a host name: the first address it resolves to, IPv4
/// first (so `localhost:8080` is 127.0.0.1:8080; write `[::1]:8080` for
/// IPv6). Resolved whenever the config is loaded, so at every reload.
fn resolve(whole: &str, address: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let bad = || {
        format!("invalid address {whole:?}: expected HOST:PORT, IP:PORT, [IPv6]:PORT, unix:PATH or udp:HOST:PORT")
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !valid_host {
        return Err(bad());
    }
    let addresses: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("invalid address {whole:?}: cannot resolve {host:?}: {e}"))?
        .collect();
    addresses
        .iter()
        .find(|a| a.is_ipv4())
        .or(addresses.first())
        .copied()
        .ok_or_else(|| format!("invalid address {whole:?}: {host:?} resolves to no address"))
}

impl fmt::Display for ListenerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenerAddress::Tcp(a) => write!(f, "{a}"),
            ListenerAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenerAddress::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

impl<'de> Deserialize<'de> for ListenerAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}
