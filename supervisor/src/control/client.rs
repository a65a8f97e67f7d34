//! The CLI's side of the control socket.

use super::protocol::{encode_line, Envelope, Reply, Request, VERSION};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No master listens there (exit code 2).
    #[error("cannot reach the master at {path}: {source}")]
    Unreachable {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The master did not answer in time.
    #[error("no reply from the master within {0:?}")]
    Timeout(Duration),
    /// The reply could not be read.
    #[error("bad reply from the master: {0}")]
    BadReply(String),
}

/// Sends `request` and waits up to `timeout` for the reply.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    request_watching(socket, request, timeout, timeout, || {})
}

/// Sends `request` and waits up to `timeout` for the reply, calling
/// `waiting` every `every` meanwhile (`baton reload` looks at the master's
/// status then, to say when its generation goes live on probation).
pub fn request_watching(
    socket: &Path,
    request: &Request,
    timeout: Duration,
    every: Duration,
    mut waiting: impl FnMut(),
) -> Result<Reply, ClientError> {
    let started = std::time::Instant::now();
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: socket.display().to_string(),
        source,
    })?;
    let broken = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ClientError::Timeout(timeout)
        }
        _ => ClientError::BadReply(e.to_string()),
    };
    let every = every.min(timeout).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(every)).map_err(broken)?;
    match stream.write_all(&encode_line(request)) {
        // A master that refuses the peer answers and closes without reading
        // the request: its answer is still there to read.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.map_err(broken)?,
    }
    // `read_until` keeps what it read before a timeout: a line that
    // arrives in pieces is still read whole.
    let mut reader = BufReader::new(&stream);
    let mut bytes = Vec::new();
    loop {
        match reader.read_until(b'\n', &mut bytes) {
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && started.elapsed() < timeout =>
            {
                waiting();
                let left = timeout.saturating_sub(started.elapsed());
                let wait = every.min(left).max(Duration::from_millis(1));
                stream.set_read_timeout(Some(wait)).map_err(broken)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(broken(e)),
        }
    }
    let line = String::from_utf8_lossy(&bytes);
    if line.is_empty() {
        return Err(ClientError::BadReply(
            "the master closed the connection".into(),
        ));
    }
    let reply: Envelope<Reply> =
        serde_json::from_str(&line).map_err(|e| ClientError::BadReply(format!("{e}: {line:?}")))?;
    if reply.v != VERSION {
        return Err(ClientError::BadReply(format!(
            "control protocol version {}, this CLI speaks {VERSION}",
            reply.v
        )));
    }
    Ok(reply.body)
}
