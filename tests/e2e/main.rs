//! End-to-end tests: each drives the real `baton` binary the way a user
//! does, through the shared harness in `baton_tests::harness`.
#![forbid(unsafe_code)]

mod admin;
mod audit;
mod axum;
mod blocking;
mod check;
mod cli_edges;
mod clients;
mod coalescing;
mod config_reading;
mod container_init;
mod control;
mod drain_visibility;
mod draining;
mod escaped_children;
mod floods;
mod graceful_sigterm;
mod grpc;
mod guarantees;
mod http2;
mod in_place;
mod lifecycle;
mod many_listeners;
mod master_death;
mod nginx_worker;
mod notify;
mod privileges;
mod reload_under_load;
mod resources;
mod rollback;
mod rollouts;
mod sd_notify;
mod socket_activation;
mod start_race;
mod tls;
mod traces;
mod udp;
mod upgrade;
mod upgrade_in_place;
mod wrap_args;
mod wrap_systemd;
mod wrapped_servers;
