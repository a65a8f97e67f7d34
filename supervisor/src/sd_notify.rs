//! Telling systemd about the master (`Type=notify` units): ready, reloading,
//! stopping, and the new main pid after a binary upgrade.

/// Sends `state` (e.g. `READY=1`) to `$NOTIFY_SOCKET`, if set. Best effort:
/// outside systemd there is nobody to tell.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, state, "sd_notify failed");
    }
}
