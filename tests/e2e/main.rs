//! End-to-end tests: each drives the real `baton` binary the way a user
//! does, through the shared harness in `baton_tests::harness`.

mod check;
mod coalescing;
mod control;
mod lifecycle;
mod reload_under_load;
mod resources;
mod rollback;
mod upgrade;
