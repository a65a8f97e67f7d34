//! How the master is reached: the control socket, the admin endpoint and
//! the pid file, and the inboxes their requests go to. The one owner of
//! each; an upgrade hands them to the new master through here.

use crate::admin::{AdminSocket, Inboxes};
use crate::config::{Config, SupervisorConfig};
use crate::control::ControlSocket;
use crate::pidfile::PidFile;
use std::os::fd::AsRawFd;

/// See the [module documentation](self).
pub struct Endpoints {
    /// `None` in a new master until the old one hands over, and in an old
    /// master once it has.
    control: Option<ControlSocket>,
    /// `[supervisor] admin`.
    admin: Option<AdminSocket>,
    pid_file: Option<PidFile>,
    /// Where the control socket and the admin endpoint send requests.
    inboxes: Inboxes,
}

impl Endpoints {
    /// What `run` bound (or inherited); nothing is served yet but the
    /// control socket, if bound.
    pub fn new(
        control: Option<ControlSocket>,
        admin: Option<AdminSocket>,
        pid_file: Option<PidFile>,
        inboxes: Inboxes,
    ) -> Endpoints {
        Endpoints {
            control,
            admin,
            pid_file,
            inboxes,
        }
    }

    /// Whether this master holds the control socket: then it is systemd's
    /// main process (not an old master that handed over, nor a new one
    /// before the handover).
    pub fn main_process(&self) -> bool {
        self.control.is_some()
    }

    /// The listening sockets a master adopting this one's workers gets
    /// (see [`crate::adopt`]): the control socket's and the admin
    /// endpoint's fds.
    pub fn kept_fds(&self) -> (Option<std::os::fd::RawFd>, Option<std::os::fd::RawFd>) {
        (
            self.control.as_ref().map(ControlSocket::fd),
            self.admin.as_ref().map(|a| a.fd().as_raw_fd()),
        )
    }

    /// Starts answering on the admin endpoint, if there is one.
    pub fn serve_admin(&mut self) {
        if let Some(admin) = &mut self.admin {
            if let Err(e) = admin.serve(self.inboxes.clone()) {
                tracing::error!(error = %format!("{e:#}"), "cannot serve the admin endpoint");
            }
        }
    }

    /// Who may write through the admin endpoint from now on: as `config`
    /// says (a reload committed it).
    pub fn allow_writes(&self, config: &Config) {
        let current = self.inboxes.writes.load();
        if **current != config.admin_writes {
            self.inboxes
                .writes
                .store(std::sync::Arc::new(config.admin_writes.clone()));
        }
    }

    /// The admin endpoint's address, as `baton status` shows it.
    pub fn admin_address(&self) -> Option<String> {
        self.admin.as_ref().map(|a| a.address().to_string())
    }

    /// The admin endpoint `config` asks for, when it differs from the one
    /// served: bound now, served from the commit (`None`: keep it).
    #[allow(clippy::type_complexity)]
    pub fn rebind_admin(&self, config: &Config) -> anyhow::Result<Option<Option<AdminSocket>>> {
        let wanted = config.supervisor.admin.as_ref();
        if wanted == self.admin.as_ref().map(|a| a.configured()) {
            return Ok(None);
        }
        Ok(Some(wanted.map(AdminSocket::bind).transpose()?))
    }

    /// A reload committed with another admin endpoint (or none): it
    /// replaces the one served.
    pub fn replace_admin(&mut self, admin: Option<AdminSocket>) {
        self.admin = admin;
        self.serve_admin();
    }

    /// Names the control socket in `command`'s environment (an exec
    /// upgrade's new image serves it: its keeper holds a copy, so a socket
    /// file with no master behind it is not stale); returns its fd, to be
    /// inherited.
    pub fn hand_control_to(&self, command: &mut std::process::Command) -> Option<i32> {
        match &self.control {
            Some(control) => {
                command.env(crate::control::CONTROL_FD_ENV, control.fd().to_string());
                Some(control.fd())
            }
            None => {
                command.env_remove(crate::control::CONTROL_FD_ENV);
                None
            }
        }
    }

    /// Names the admin socket (if any) in `command`'s environment; returns
    /// its fd, to be inherited. Without one, a stale name is removed.
    pub fn hand_admin_to(&self, command: &mut std::process::Command) -> Option<i32> {
        match &self.admin {
            Some(admin) => {
                let fd = admin.fd().as_raw_fd();
                command.env(crate::admin::ADMIN_FD_ENV, fd.to_string());
                Some(fd)
            }
            None => {
                command.env_remove(crate::admin::ADMIN_FD_ENV);
                None
            }
        }
    }

    /// Before an in-place upgrade's exec: the admin endpoint stops
    /// accepting; new connections wait in its queue for the new image.
    pub fn pause_admin(&mut self) {
        if let Some(admin) = &mut self.admin {
            admin.stop_serving();
        }
    }

    /// A child-mode upgrade committed: the control socket is released (the
    /// new master binds it when it hears the handover; the socket file
    /// stays for it), and so is the admin endpoint.
    pub fn hand_over(&mut self) {
        self.control = None;
        if let Some(admin) = &mut self.admin {
            admin.hand_over();
        }
    }

    /// In a new master, once the old one handed over: serves the admin
    /// endpoint, binds the control socket and writes the pid file.
    pub fn take_over(&mut self, supervisor: &SupervisorConfig) {
        // The admin endpoint's queue waited for this moment.
        self.serve_admin();
        match ControlSocket::bind(&supervisor.control_socket) {
            Ok(mut control) => match control.serve(self.inboxes.requests.clone()) {
                Ok(()) => self.control = Some(control),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot serve the control socket")
                }
            },
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot take over the control socket")
            }
        }
        if let Some(path) = &supervisor.pid_file {
            match PidFile::write(path) {
                Ok(pid_file) => self.pid_file = Some(pid_file),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot write the pid file"),
            }
        }
    }

    /// A new master started: the pid file becomes `.oldbin`, as nginx's.
    pub fn pid_file_to_oldbin(&mut self) {
        if let Some(pid_file) = &mut self.pid_file {
            if let Err(e) = pid_file.rename_to_oldbin() {
                tracing::warn!(error = %format!("{e:#}"), "cannot rename the pid file");
            }
        }
    }

    /// The upgrade failed: the pid file gets its name back.
    pub fn restore_pid_file(&mut self) {
        if let Some(pid_file) = &mut self.pid_file {
            if let Err(e) = pid_file.restore() {
                tracing::error!(error = %format!("{e:#}"), "cannot restore the pid file");
            }
        }
    }
}
