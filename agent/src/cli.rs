//! Command-line interface: `run` starts the agent, the other commands talk to it.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, ConfigError, DEFAULT_CONFIG_FILE, DEFAULT_CONTROL_SOCKET},
    control::{self, Request, Response},
    kernel::KernelMode,
    logging::LogFormat,
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs and serve the control socket until SIGTERM.
    Run {
        /// The agent's TOML config.
        #[arg(long, short, default_value = DEFAULT_CONFIG_FILE)]
        config: PathBuf,
        /// Where connection numbers come from. `procfs` is a degraded mode for nodes without
        /// eBPF: established counts only, no in-flight tracking.
        #[arg(long, value_enum, default_value_t = KernelMode::Ebpf)]
        kernel: KernelMode,
    },
    /// Check a config without acting: syntax, keys, values, interfaces, and every load
    /// balancer's runtime API and HAProxy server names. Exit 0 only when clean.
    CheckConfig {
        /// The config file.
        #[arg(default_value = DEFAULT_CONFIG_FILE)]
        file: PathBuf,
    },
    /// Drain a backend: HAProxy stops sending it new requests, and the agent waits until
    /// in-flight work is done, then moves the server to MAINT.
    Drain {
        /// The backend's name in the config.
        backend: String,
        /// Return only when the backend is drained (or the drain failed).
        #[arg(long)]
        wait: bool,
        /// Print the final report as JSON (with --wait).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
    },
    /// Put a backend back in service (cancels its drain if one is running).
    Resume {
        backend: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
    },
    /// The whole cycle: drain, restart the service, verify its health, put it back.
    ///
    /// Exit codes: 0 done; 1 error; 2 usage or config; 3 refused for safety (nothing
    /// changed); 4 drain timed out and was aborted; 5 the service stayed unhealthy and the
    /// server is left in MAINT; 6 rolled back and serving on the previous version; 7 back in
    /// service but a load balancer did not confirm it; 8 the agent went away mid-operation.
    Cycle {
        backend: String,
        /// Print the final report as JSON instead of progress and a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
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
    /// An operation that ended with a non-zero exit code; its message was printed.
    #[error("{message}")]
    Operation { exit_code: u8, message: String },
    /// Anything else: exit code 1.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Operation { exit_code, .. } => ExitCode::from(*exit_code),
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
            refuse_unknown_haproxy_servers(&config)?;
            crate::agent::run(config, kernel)?;
            Ok(())
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::Drain {
            backend,
            wait,
            json,
            target,
        } => operate(&target, &Request::Drain { backend, wait }, json),
        Command::Resume {
            backend,
            json,
            target,
        } => operate(&target, &Request::Resume { backend }, json),
        Command::Cycle {
            backend,
            json,
            target,
        } => operate(&target, &Request::Cycle { backend }, json),
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

/// Sends a drain, resume or cycle request, shows progress, and turns the outcome into the
/// exit code.
fn operate(target: &AgentAddress, request: &Request, json: bool) -> Result<(), Failure> {
    let socket = target.socket()?;
    let terminal = std::io::stderr().is_terminal();
    let mut last_phase = None;
    let mut drew_line = false;
    let answer = control::request_streaming(&socket, request, |response| {
        let Response::Progress(progress) = response else {
            return;
        };
        if json {
            return;
        }
        if terminal {
            // One live line, redrawn in place.
            eprint!("\r\x1b[2K{}", progress.render());
            drew_line = true;
        } else if last_phase != Some(progress.phase) {
            eprintln!("{}", progress.render());
        }
        last_phase = Some(progress.phase);
    })?;
    if drew_line {
        eprintln!();
    }
    match answer {
        Response::Started {
            backend,
            unconfirmed,
        } => {
            if unconfirmed.is_empty() {
                println!(
                    "{backend}: draining; the load balancers confirmed. `drain-agent status` \
                     shows progress, `drain-agent resume {backend}` cancels"
                );
            } else {
                println!(
                    "{backend}: draining, but {} did not confirm the drain. `drain-agent \
                     status` shows progress, `drain-agent resume {backend}` cancels",
                    unconfirmed.join(", ")
                );
            }
            Ok(())
        }
        Response::Report(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                );
            } else {
                print!("{}", report.render());
            }
            if report.exit_code == 0 {
                Ok(())
            } else {
                Err(Failure::Operation {
                    exit_code: report.exit_code,
                    message: report.message.clone(),
                })
            }
        }
        Response::Refused { exit_code, message } => Err(Failure::Operation { exit_code, message }),
        Response::Progress(progress) => Err(Failure::Operation {
            exit_code: AGENT_GONE,
            message: format!(
                "the agent went away while {} `{}` was {} ({:.1}s in): the server may be left \
                 out of rotation on its load balancers. The agent reconciles when it starts \
                 again; `drain-agent status` and the load balancers' `show servers state` say \
                 where it is",
                operation_name(request),
                progress.backend,
                progress.phase.as_str(),
                progress.elapsed_ms as f64 / 1000.0
            ),
        }),
        Response::Status(_) => Err(anyhow::anyhow!(
            "the agent answered a {} request with its status: is it an older drain-agent?",
            operation_name(request)
        )
        .into()),
        Response::Error { message } => Err(anyhow::anyhow!("the agent failed: {message}").into()),
    }
}

/// Exit code when the agent went away while an operation was running (docs/operations.md).
const AGENT_GONE: u8 = 8;

/// The operation a request asks for, in the CLI's words.
fn operation_name(request: &Request) -> &'static str {
    match request {
        Request::Status => "status",
        Request::Drain { .. } => "drain",
        Request::Resume { .. } => "resume",
        Request::Cycle { .. } => "cycle",
    }
}

/// Prints every problem with file, line and key; exit 2 when there is an error.
fn check_config(file: &std::path::Path) -> Result<(), Failure> {
    use crate::check::{Severity, check};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let (_, problems) = runtime.block_on(check(file));
    for problem in &problems {
        let word = match problem.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        println!("{word}: {}", problem.error);
    }
    let errors = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .count();
    if errors > 0 {
        return Err(Failure::Operation {
            exit_code: 2,
            message: format!("{}: {errors} error(s)", file.display()),
        });
    }
    println!(
        "{}: ok{}",
        file.display(),
        if problems.is_empty() {
            ""
        } else {
            " (with warnings)"
        }
    );
    Ok(())
}

/// `run` refuses what check-config calls an error on a load balancer (a server HAProxy does
/// not know); an unreachable load balancer is only a warning, since HAProxy may be down now
/// and agent-check still reaches it later.
fn refuse_unknown_haproxy_servers(config: &Config) -> Result<(), Failure> {
    use crate::check::{Severity, check_load_balancers};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    for problem in runtime.block_on(check_load_balancers(config)) {
        match problem.severity {
            Severity::Warning => tracing::warn!("{}", problem.error),
            Severity::Error => return Err(Failure::Config(problem.error)),
        }
    }
    Ok(())
}
