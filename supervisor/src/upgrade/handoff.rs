//! The handshake between an old master and the new one it started: the
//! messages, and the new master's side of receiving the listeners.
//!
//! The channel is a `SOCK_SEQPACKET` socketpair whose new-master end is named
//! by `BATON_UPGRADE_FD`. Listeners travel by `SCM_RIGHTS` in batches, exactly
//! like a worker's, and each fd is checked against its metadata.

use crate::config::{ListenerAddress, ListenerConfig};
use crate::listener::Listener;
use crate::steering::Layout;
use anyhow::{bail, Context};
use baton_wire::channel::Channel;
use baton_wire::protocol::ListenerInfo;
use baton_wire::protocol::MAX_FDS_PER_MESSAGE;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// Names the new master's end of the handshake channel.
pub const UPGRADE_FD_ENV: &str = "BATON_UPGRADE_FD";

/// Names the fd the new binary was executed from.
pub const BINARY_FD_ENV: &str = "BATON_UPGRADE_BINARY_FD";

/// How long the new master waits for the old one's listeners.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener handed over: its configuration and what it is bound to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedListener {
    /// The configuration entry (`name`, `address` as configured, `backlog`).
    pub name: String,
    /// The configured address (`127.0.0.1:0`, `unix:/path`, ...).
    pub address: String,
    /// The listen backlog.
    pub backlog: i32,
    /// Kind and actual bound address, checked against the fd.
    pub info: ListenerInfo,
    /// Passed by socket activation: its socket file is not baton's to remove.
    #[serde(default)]
    pub activated: bool,
    /// A UDP listener with `quic = true`.
    #[serde(default)]
    pub quic: bool,
}

/// Old master → new master.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OldMessage {
    /// First message: who hands over and what follows.
    Takeover {
        /// The old master's pid.
        old_pid: u32,
        /// The generation number the new master continues from.
        next_generation: u64,
        /// How many listeners follow.
        listener_count: u32,
        /// How many port groups follow the listeners.
        #[serde(default)]
        group_count: u32,
    },
    /// A batch of listeners; the message carries their fds in this order.
    Listeners {
        /// Index of the first one.
        offset: u32,
        /// The batch.
        listeners: Vec<HandedListener>,
    },
    /// A TCP listener's port group: the message carries every member
    /// socket, in the kernel's order.
    Group {
        /// Which listener.
        listener: u32,
        /// The member new connections go to.
        steered: Option<u32>,
        /// A QUIC port's slots and generations (absent for TCP ports, so
        /// that an older master takes them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic: Option<crate::steering::QuicLayout>,
    },
    /// The old master has released the control socket and is draining: the
    /// new master takes over the control socket and the pid file.
    Handover {},
    /// Idle connections of the old master's draining SDK workers, for the
    /// new master's generation; the message carries their sockets in this
    /// order. Answered with [`NewMessage::HandedOver`] or
    /// [`NewMessage::HandoverRefused`].
    Connections {
        /// Names them in the answer.
        id: u64,
        /// Their listener's address.
        address: String,
        /// Each one's bytes already read.
        connections: Vec<baton_wire::protocol::HandedConnection>,
    },
}

/// New master → old master.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NewMessage {
    /// The new master's generation is ready and serving.
    Ready {
        /// The new master's pid.
        pid: u32,
        /// Its generation.
        generation: u64,
        /// Listeners whose new connections now go to a socket of its
        /// generation's own: the old master's sockets on them no longer get
        /// any (its generation sockets never do).
        #[serde(default)]
        steered: Vec<String>,
    },
    /// The new master gives up; it exits after sending this.
    Failed {
        /// Where: `config`, `ready`, `takeover`.
        phase: String,
        /// Why.
        reason: String,
    },
    /// A worker of the new master's generation took the connections of
    /// [`OldMessage::Connections`] `id`.
    HandedOver {
        /// Their id.
        id: u64,
    },
    /// The connections of [`OldMessage::Connections`] `id` were not taken:
    /// the old master's worker closes them between requests.
    HandoverRefused {
        /// Their id.
        id: u64,
        /// Why.
        reason: String,
    },
}

/// What the new master received from the old one.
pub struct Takeover {
    /// The handshake channel.
    pub channel: Arc<Channel>,
    /// The old master's pid.
    pub old_pid: u32,
    /// The generation number to continue from.
    pub next_generation: u64,
    /// The listeners, checked.
    pub listeners: Vec<Listener>,
    /// Port groups, by listener index.
    pub groups: Vec<(usize, Layout)>,
}

impl Takeover {
    /// If this process was started by an upgrade, receives the old master's
    /// listeners. Must run inside the tokio runtime.
    pub async fn receive_from_env() -> anyhow::Result<Option<Takeover>> {
        let Ok(value) = std::env::var(UPGRADE_FD_ENV) else {
            return Ok(None);
        };
        // The new binary's own fd, kept open across exec for interpreters;
        // a real binary no longer needs it.
        if let Some(binary) = std::env::var(BINARY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
        {
            if binary > 2 && binary.to_string() != value {
                let _ = nix::unistd::close(binary);
            }
        }
        let fd = crate::fds::inherited(UPGRADE_FD_ENV)?
            .with_context(|| format!("{UPGRADE_FD_ENV} is not set"))?;
        let channel = Arc::new(Channel::new(fd).context("registering the upgrade channel")?);
        let takeover = tokio::time::timeout(TAKEOVER_TIMEOUT, receive(channel.clone()))
            .await
            .with_context(|| {
                format!("no listeners from the old master within {TAKEOVER_TIMEOUT:?}")
            })??;
        Ok(Some(takeover))
    }

    /// Tells the old master this side failed.
    pub fn fail(&self, phase: &str, reason: &str) {
        report_failure(&self.channel, phase, reason);
    }
}

/// Sends [`NewMessage::Failed`] to the old master.
pub fn report_failure(channel: &Channel, phase: &str, reason: &str) {
    let message = NewMessage::Failed {
        phase: phase.into(),
        reason: reason.into(),
    };
    if let Err(e) = channel.try_send(&message, &[]) {
        eprintln!("baton: cannot report the failure to the old master: {e}");
    }
}

async fn receive(channel: Arc<Channel>) -> anyhow::Result<Takeover> {
    let first = channel
        .recv::<OldMessage>()
        .await?
        .context("the old master closed the channel")?;
    let OldMessage::Takeover {
        old_pid,
        next_generation,
        listener_count,
        group_count,
    } = first.message
    else {
        bail!("expected takeover, got {:?}", first.message);
    };
    let mut listeners = Vec::new();
    while listeners.len() < listener_count as usize {
        let batch = channel
            .recv::<OldMessage>()
            .await?
            .context("the old master closed the channel")?;
        let OldMessage::Listeners {
            offset,
            listeners: handed,
        } = batch.message
        else {
            bail!("expected listeners, got {:?}", batch.message);
        };
        if offset as usize != listeners.len() || handed.len() != batch.fds.len() {
            bail!("listener batch at offset {offset} does not fit");
        }
        for (listener, fd) in handed.into_iter().zip(batch.fds) {
            listeners.push(listener.adopt(fd)?);
        }
    }
    let mut groups = Vec::new();
    while groups.len() < group_count as usize {
        let received = channel
            .recv::<OldMessage>()
            .await?
            .context("the old master closed the channel")?;
        let OldMessage::Group {
            listener,
            steered,
            quic,
        } = received.message
        else {
            bail!("expected a port group, got {:?}", received.message);
        };
        let index = listener as usize;
        let owner = listeners.get(index).with_context(|| {
            format!("port group for listener {index}, which was not handed over")
        })?;
        let mut members = Vec::with_capacity(received.fds.len());
        for fd in received.fds {
            let (_, fd) = baton_wire::listener::verify(owner.info.clone(), fd)
                .with_context(|| format!("adopting a socket of listener `{}`", owner.info.name))?;
            members.push(fd);
        }
        let layout = Layout {
            members,
            steered: steered.map(|s| s as usize),
            quic,
        };
        groups.push((index, layout));
    }
    Ok(Takeover {
        channel,
        old_pid,
        next_generation,
        listeners,
        groups,
    })
}

impl HandedListener {
    /// Describes `listener` for the next master.
    pub fn of(listener: &Listener) -> HandedListener {
        HandedListener {
            name: listener.config.name.clone(),
            address: listener.config.address.to_string(),
            backlog: listener.backlog(),
            info: listener.info.clone(),
            activated: listener.activated(),
            quic: listener.config.quic,
        }
    }

    /// Adopts `fd` as this listener, after checking it.
    pub fn adopt(self, fd: OwnedFd) -> anyhow::Result<Listener> {
        let address: ListenerAddress = self
            .address
            .parse()
            .map_err(|e: String| anyhow::anyhow!("listener `{}`: {e}", self.name))?;
        let config = ListenerConfig {
            name: self.name,
            address,
            backlog: self.backlog,
            nodelay: None,
            quic: self.quic,
        };
        Ok(Listener::adopt(config, self.info, fd)?.with_activated(self.activated))
    }
}

/// The old master's side: sends the takeover, every listener, and every
/// port group (all sockets on each TCP port, generations' own included).
pub fn send_takeover(
    channel: &Channel,
    next_generation: u64,
    listeners: &[crate::listener::Shared],
) -> Result<(), baton_wire::channel::ChannelError> {
    let mut groups = Vec::new();
    for (index, listener) in listeners.iter().enumerate() {
        if let Some(layout) = listener.layout()? {
            groups.push((index, layout));
        }
    }
    channel.try_send(
        &OldMessage::Takeover {
            old_pid: std::process::id(),
            next_generation,
            listener_count: listeners.len() as u32,
            group_count: groups.len() as u32,
        },
        &[],
    )?;
    for (batch, chunk) in listeners.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
        let fds: Vec<_> = chunk.iter().map(|l| l.fd()).collect();
        let handed = chunk.iter().map(|l| HandedListener::of(l)).collect();
        channel.try_send(
            &OldMessage::Listeners {
                offset: (batch * MAX_FDS_PER_MESSAGE) as u32,
                listeners: handed,
            },
            &fds,
        )?;
    }
    for (index, layout) in groups {
        let fds: Vec<_> = layout.members.iter().map(|fd| fd.as_fd()).collect();
        channel.try_send(
            &OldMessage::Group {
                listener: index as u32,
                steered: layout.steered.map(|s| s as u32),
                quic: layout.quic.clone(),
            },
            &fds,
        )?;
    }
    Ok(())
}
