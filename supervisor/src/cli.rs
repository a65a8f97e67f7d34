//! The `baton` command line.

use crate::config::Config;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// baton: a hot-restart supervisor. Reloads and upgrades drop no connection.
#[derive(Debug, Parser)]
#[command(name = "baton", version, about)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        default_value = "baton.toml"
    )]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the master in the foreground.
    Run,
    /// Validate a configuration without touching a running master (like `nginx -t`).
    Check,
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match cli.command {
        Command::Check => match Config::load(&cli.config) {
            Ok(config) => {
                println!("{}", config.summary());
                0
            }
            Err(e) => {
                eprintln!("baton: {e}");
                1
            }
        },
        Command::Run => match run(&cli.config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("baton: {e:#}");
                1
            }
        },
    }
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    crate::fds::close_on_exec_inherited().context("marking inherited fds close-on-exec")?;
    let log = crate::logging::init(&config.supervisor.log_filter, config.supervisor.log_format)
        .context("setting up logging")?;
    // One thread, one event loop: the master never needs more.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let result = runtime.block_on(crate::master::run(config, log));
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "master failed");
    }
    result
}
