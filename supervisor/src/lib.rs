//! The baton master and CLI. See docs/architecture.md (in the repository)
//! for the modules, the event loop, the reload transaction and the socket
//! steering; each module is one noun of the design.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod activation;
pub mod admin;
pub mod adopt;
pub mod audit;
pub mod check;
pub mod children;
pub mod cli;
pub mod config;
pub mod connections;
pub mod control;
pub mod endpoints;
pub mod events;
pub mod exec;
pub mod fds;
pub mod fdstore;
pub mod fleet;
pub mod forker;
pub mod handover;
pub mod inplace;
pub mod keeper;
pub mod ktls;
pub mod listener;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod notify;
pub mod operation;
pub mod orphans;
pub mod output;
pub mod pidfile;
pub mod probe;
pub mod ratelimit;
pub mod reload;
pub mod rollout;
pub mod scale;
pub mod sd_notify;
pub mod signals;
pub mod sockdiag;
pub mod status;
pub mod steering;
pub mod traces;
pub mod upgrade;
pub mod watch;
pub mod worker;
