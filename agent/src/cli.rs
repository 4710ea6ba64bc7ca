//! Command-line interface: `run` starts the agent, the other commands talk to it.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, ConfigError, DEFAULT_CONTROL_SOCKET},
    control::{self, Request, Response},
    kernel::KernelMode,
};

/// eBPF-assisted connection drain agent for API nodes behind HAProxy.
#[derive(Debug, Parser)]
#[command(name = "drain-agent", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs and serve the control socket until SIGTERM.
    Run {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Where connection numbers come from. `procfs` is a degraded mode for nodes without
        /// eBPF: established counts only, no in-flight tracking.
        #[arg(long, value_enum, default_value_t = KernelMode::Ebpf)]
        kernel: KernelMode,
    },
    /// Show each backend's connections as the running agent sees them.
    Status {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
    },
}

/// How the CLI finds the running agent.
#[derive(Debug, clap::Args)]
pub struct AgentAddress {
    /// The agent's control socket.
    #[arg(long, conflicts_with = "config")]
    pub control_socket: Option<PathBuf>,
    /// Read the control socket's path from this config.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

impl AgentAddress {
    fn socket(&self) -> Result<PathBuf, Failure> {
        Ok(match (&self.control_socket, &self.config) {
            (Some(socket), _) => socket.clone(),
            (None, Some(config)) => Config::load(config)?.control_socket,
            (None, None) => PathBuf::from(DEFAULT_CONTROL_SOCKET),
        })
    }
}

/// A command's failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad config or usage: exit code 2, nothing was changed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else: exit code 1.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Other(_) => ExitCode::from(1),
        }
    }
}

impl From<control::ControlError> for Failure {
    fn from(err: control::ControlError) -> Failure {
        Failure::Other(err.into())
    }
}

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run { config, kernel } => {
            crate::logging::init(cli.log_format);
            let config = Config::load(&config)?;
            config.check_host()?;
            crate::agent::run(config, kernel)?;
            Ok(())
        }
        Command::Status { json, target } => {
            let socket = target.socket()?;
            let Response::Status(status) = control::request(&socket, &Request::Status)? else {
                return Err(
                    anyhow::anyhow!("the agent answered status with something else").into(),
                );
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serializes")
                );
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
    }
}
