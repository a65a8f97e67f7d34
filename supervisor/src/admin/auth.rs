//! Who may write through the admin endpoint (`POST /reload`, ...).
//!
//! Writes are off unless the configuration turns them on, two ways:
//!
//! - `[supervisor] admin_token_file`: a file of bearer tokens, one per line
//!   (`#` comments and blank lines ignored), each at least
//!   [`MIN_TOKEN_LEN`] bytes. A request carrying `Authorization: Bearer
//!   TOKEN` with one of them may write. Several lines let a token be
//!   rotated: add the new one, reload, move the clients, remove the old
//!   one, reload. The file is read with the configuration (a bad one fails
//!   `baton check` and the reload, and changes nothing); only the tokens'
//!   SHA-256 digests are kept, compared in constant time
//!   ([`subtle`]); a token is never logged, the audit names its line.
//! - `[supervisor] admin_peer_writes = true`, on a `unix:` admin endpoint:
//!   a peer running as root or as the master's uid may write without a
//!   token, as on the control socket (`SO_PEERCRED`).
//!
//! A missing or wrong token is refused with 401 (and `WWW-Authenticate:
//! Bearer`); writes that are off, or a peer of another uid, with 403.
//! Reads (`/metrics`, `/status`, the probes, `/events`) stay open.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The shortest token accepted: 128 bits as hex.
pub const MIN_TOKEN_LEN: usize = 32;

/// The tokens of an `admin_token_file`, as digests.
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens {
    file: PathBuf,
    /// Each token's SHA-256 and its line in the file.
    digests: Vec<([u8; 32], usize)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests only, but still nothing a log needs.
        write!(
            f,
            "Tokens({}, {} token(s))",
            self.file.display(),
            self.digests.len()
        )
    }
}

impl Tokens {
    /// Reads `file`; the error names the file and, for a bad token, its
    /// line (never the token).
    pub fn read(file: &Path) -> Result<Tokens, String> {
        let at = |line: usize| format!("admin_token_file {}:{line}", file.display());
        let meta = std::fs::metadata(file)
            .map_err(|e| format!("admin_token_file {}: {e}", file.display()))?;
        if !meta.is_file() || meta.len() > 64 * 1024 {
            return Err(format!(
                "admin_token_file {}: not a regular file of at most 64 KiB",
                file.display()
            ));
        }
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("admin_token_file {}: {e}", file.display()))?;
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "{}: a token must have at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)",
                    at(index + 1)
                ));
            }
            if token.contains(char::is_whitespace) || !token.is_ascii() {
                return Err(format!(
                    "{}: a token is one word of printable ASCII, one per line",
                    at(index + 1)
                ));
            }
            digests.push((Sha256::digest(token.as_bytes()).into(), index + 1));
        }
        if digests.is_empty() {
            return Err(format!(
                "admin_token_file {}: no token in it (one per line)",
                file.display()
            ));
        }
        Ok(Tokens {
            file: file.to_path_buf(),
            digests,
        })
    }

    /// The line of the token `presented` is, if any. Every token is
    /// compared, each in constant time, whatever matches.
    fn line_of(&self, presented: &[u8]) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = 0u64;
        for (known, line) in &self.digests {
            let equal = known.ct_eq(&digest);
            found = u64::conditional_select(&found, &(*line as u64), equal);
        }
        (found != 0).then_some(found as usize)
    }
}

/// What the configuration allows, as the admin server sees it (swapped in
/// when a reload commits another configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WritePolicy {
    /// `admin_token_file`, read.
    pub tokens: Option<Tokens>,
    /// `admin_peer_writes`.
    pub peer_writes: bool,
}

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone, Copy)]
pub enum Caller {
    /// A TCP client.
    Tcp(std::net::SocketAddr),
    /// A Unix-socket peer, as `SO_PEERCRED` names it.
    Unix {
        /// Its pid.
        pid: Option<i32>,
        /// Its uid.
        uid: u32,
    },
}

/// Why a write was let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// A bearer token: the line of the file it is on.
    Token(String),
    /// A Unix peer of the right uid.
    Peer,
}

/// A refused write: the HTTP status and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 or 403.
    pub status: u16,
    /// What to tell the client.
    pub reason: String,
}

impl WritePolicy {
    /// Whether `caller`, presenting `authorization` (the header's value),
    /// may write.
    pub fn authorize(
        &self,
        caller: Caller,
        authorization: Option<&[u8]>,
    ) -> Result<Grant, Refusal> {
        let refuse = |status, reason: String| Err(Refusal { status, reason });
        if self.tokens.is_none() && !self.peer_writes {
            return refuse(
                403,
                "writes are off on this admin endpoint: set [supervisor] admin_token_file (or admin_peer_writes on a unix: admin endpoint)".into(),
            );
        }
        if let Some(header) = authorization {
            let Some(tokens) = &self.tokens else {
                return refuse(
                    403,
                    "this admin endpoint takes no tokens (no admin_token_file)".into(),
                );
            };
            let Some(token) = bearer(header) else {
                return refuse(401, "the Authorization header is not `Bearer TOKEN`".into());
            };
            return match tokens.line_of(token) {
                Some(line) => Ok(Grant::Token(format!("{}:{line}", tokens.file.display()))),
                None => refuse(401, "invalid token".into()),
            };
        }
        match caller {
            Caller::Unix { uid, .. } if self.peer_writes => {
                let master = nix::unistd::geteuid().as_raw();
                if uid == 0 || uid == master {
                    Ok(Grant::Peer)
                } else {
                    refuse(
                        403,
                        format!("permission denied: uid {uid} may not write (only root and uid {master}, or a token)"),
                    )
                }
            }
            _ if self.tokens.is_some() => refuse(
                401,
                "a write needs `Authorization: Bearer TOKEN` (a token of admin_token_file)".into(),
            ),
            _ => refuse(
                403,
                "writes over TCP need admin_token_file; admin_peer_writes applies to unix: peers"
                    .into(),
            ),
        }
    }
}

/// The token of `Bearer TOKEN` (the scheme in any case, RFC 7235).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let space = header.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = header.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";
    const OTHER: &str = "fedcba9876543210fedcba9876543210";

    fn tokens(text: &str) -> Result<Tokens, String> {
        let dir = std::env::temp_dir().join(format!(
            "baton-tokens-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens");
        std::fs::write(&file, text).unwrap();
        let read = Tokens::read(&file);
        std::fs::remove_dir_all(&dir).unwrap();
        read
    }

    fn policy(peer_writes: bool) -> WritePolicy {
        WritePolicy {
            tokens: Some(tokens(&format!("# deploy bot\n{GOOD}\n\n{OTHER}\n")).unwrap()),
            peer_writes,
        }
    }

    const TCP: Caller = Caller::Tcp(std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        1,
    )));

    #[test]
    fn a_token_file_names_its_bad_line_and_never_the_token() {
        let short = tokens("# c\nshort-secret\n").unwrap_err();
        assert!(
            short.contains(":2: a token must have at least 32"),
            "{short}"
        );
        assert!(!short.contains("short-secret"), "{short}");
        let spaced = tokens(&format!("{GOOD} {OTHER}\n")).unwrap_err();
        assert!(spaced.contains(":1: a token is one word"), "{spaced}");
        assert!(!spaced.contains(GOOD), "{spaced}");
        assert!(tokens("# none\n\n").unwrap_err().contains("no token in it"));
        assert!(Tokens::read(Path::new("/nonexistent/tokens"))
            .unwrap_err()
            .contains("/nonexistent/tokens"));
        assert!(!format!("{:?}", policy(false)).contains(GOOD));
    }

    #[test]
    fn a_right_token_is_granted_with_its_line_a_wrong_or_missing_one_is_401() {
        let policy = policy(false);
        let bearer = |t: &str| format!("Bearer {t}");
        match policy.authorize(TCP, Some(bearer(OTHER).as_bytes())) {
            Ok(Grant::Token(line)) => assert!(line.ends_with("tokens:4"), "{line}"),
            other => panic!("{other:?}"),
        }
        assert!(policy
            .authorize(TCP, Some(format!("bearer  {GOOD}").as_bytes()))
            .is_ok());
        let status = |header: Option<&str>| {
            policy
                .authorize(TCP, header.map(str::as_bytes))
                .unwrap_err()
                .status
        };
        assert_eq!(status(Some(&bearer(&GOOD[1..]))), 401);
        assert_eq!(status(Some(&bearer(&format!("{GOOD}x")))), 401);
        assert_eq!(status(Some(&format!("Basic {GOOD}"))), 401);
        assert_eq!(status(Some("Bearer ")), 401);
        assert_eq!(status(None), 401);
    }

    #[test]
    fn writes_are_off_unless_configured_and_peers_go_by_uid() {
        let off = WritePolicy::default();
        assert_eq!(off.authorize(TCP, None).unwrap_err().status, 403);
        let root = Caller::Unix {
            pid: Some(1),
            uid: 0,
        };
        assert_eq!(off.authorize(root, None).unwrap_err().status, 403);
        let peers = WritePolicy {
            tokens: None,
            peer_writes: true,
        };
        assert_eq!(peers.authorize(root, None), Ok(Grant::Peer));
        let stranger = Caller::Unix {
            pid: Some(1),
            uid: 4242,
        };
        let refused = peers.authorize(stranger, None).unwrap_err();
        assert_eq!(refused.status, 403);
        assert!(refused.reason.contains("uid 4242"), "{}", refused.reason);
        // A token from another uid is as good as anywhere.
        assert!(policy(true)
            .authorize(stranger, Some(format!("Bearer {GOOD}").as_bytes()))
            .is_ok());
        assert_eq!(peers.authorize(TCP, None).unwrap_err().status, 403);
    }
}
