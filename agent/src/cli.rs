//! Command-line interface: `run` starts the agent, the other commands talk to it.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, ConfigError, ConfigErrors, DEFAULT_CONFIG_FILE, DEFAULT_CONTROL_SOCKET},
    control::{self, Request, Response},
    drain::report::exit,
    kernel::KernelMode,
    logging::LogFormat,
};

/// What `--help` says about exit codes; docs/operations.md has the same table.
const EXIT_CODES: &str = "\
Exit codes:
  0    done (check-config: clean)
  1    error: the agent, a load balancer or the service answered with an error
  2    usage or config error (check-config: a problem found); nothing was changed
  3    refused for safety; nothing was changed (run: another agent watches the interfaces)
  4    drain timed out with on_timeout = \"abort\"; the server is back in service
  5    the cycle failed (restart failed, or unhealthy even after the rollback);
       the server is left in MAINT
  6    rolled back: serving again on the previous version
  7    back in service, but a load balancer did not confirm it
  8    the agent went away mid-operation
  9    the operation was cancelled (resume, or the agent stopped); back in service
  130  interrupted (Ctrl-C): the operation goes on in the agent; `wait BACKEND` follows it";

/// eBPF-assisted connection drain agent for API nodes behind HAProxy.
#[derive(Debug, Parser)]
#[command(name = "drain-agent", version, about, after_help = EXIT_CODES)]
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
    ///
    /// Refused (exit 3) while another drain-agent watches one of the interfaces.
    Run {
        /// The agent's TOML config.
        #[arg(long, short, default_value = DEFAULT_CONFIG_FILE)]
        config: PathBuf,
        /// Where connection numbers come from. `procfs` is a degraded mode for nodes without
        /// eBPF: established counts only, no in-flight tracking.
        #[arg(long, value_enum, default_value_t = KernelMode::Ebpf)]
        kernel: KernelMode,
    },
    /// Check a config without acting, and list every problem in one run (file:line:key
    /// each): syntax, keys, values, the node (interfaces, control group, CA files), and every
    /// load balancer's HAProxy backend and server names.
    ///
    /// Exit 0 only when clean; 2 on any error, or any warning without --allow-warnings.
    #[command(after_help = EXIT_CODES)]
    CheckConfig {
        /// The config file.
        #[arg(default_value = DEFAULT_CONFIG_FILE)]
        file: PathBuf,
        /// Also check against the running world what the first drain would trip on: each
        /// runtime API answers at `level admin`, each HAProxy server's port is one of the
        /// backend's `ports`, `min_serving` can be met, restart and rollback commands exist,
        /// and no other drain-agent watches the interfaces.
        #[arg(long)]
        online: bool,
        /// Exit 0 when only warnings were found (e.g. a load balancer down right now).
        #[arg(long)]
        allow_warnings: bool,
    },
    /// Drain a backend: HAProxy stops sending it new requests, and the agent waits until
    /// in-flight work is done, then moves the server to MAINT.
    #[command(after_help = EXIT_CODES)]
    Drain {
        /// The backend's name in the config.
        backend: String,
        /// Return only when the backend is drained (or the drain failed). On a drain of the
        /// backend that is already running, follows it instead.
        #[arg(long)]
        wait: bool,
        /// Print one JSON object (the report, or what happened instead).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
    },
    /// Put a backend back in service (cancels its drain if one is running).
    #[command(after_help = EXIT_CODES)]
    Resume {
        backend: String,
        /// Print one JSON object (the report, or what happened instead).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
    },
    /// The whole cycle: drain, restart the service, verify its health, put it back.
    #[command(after_help = EXIT_CODES)]
    Cycle {
        backend: String,
        /// Print one JSON object (the report, or what happened instead) instead of progress
        /// and a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
    },
    /// Hand a backend over to a new version on this node: start it beside the running one
    /// (same port, SO_REUSEPORT), verify it, send it every new connection, stop the old one
    /// once it has no request in flight. The node stays in rotation (docs/handover.md).
    #[command(after_help = EXIT_CODES)]
    Handover {
        backend: String,
        /// Print one JSON object (the report, or what happened instead) instead of progress
        /// and a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AgentAddress,
    },
    /// Follow a backend's running drain or cycle to its end and exit with its code, e.g.
    /// after Ctrl-C; when none runs, print the report of its last one.
    #[command(after_help = EXIT_CODES)]
    Wait {
        backend: String,
        /// Print one JSON object (the report, or what happened instead).
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
    /// Bad config or usage (every problem found): exit code 2, nothing was changed.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// An operation that did not end well, with its exit code.
    #[error("{message}")]
    Operation { exit_code: u8, message: String },
    /// An operation whose report (with its outcome) was printed; it ended with this code.
    #[error("{message}")]
    Reported { exit_code: u8, message: String },
    /// Anything else: exit code 1.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code())
    }

    fn code(&self) -> u8 {
        match self {
            Failure::Config(_) => exit::CONFIG,
            Failure::Operation { exit_code, .. } | Failure::Reported { exit_code, .. } => {
                *exit_code
            }
            Failure::Other(_) => exit::ERROR,
        }
    }
}

impl From<control::ControlError> for Failure {
    fn from(err: control::ControlError) -> Failure {
        Failure::Other(err.into())
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Failure {
        Failure::Config(error.into())
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
            // Another agent on these interfaces is refused; a lock this process may not
            // take (no write access to /run/drain-agent) only loses that check, and the
            // kernel step says what privileges are missing.
            let _watch = match crate::instance::claim(&config) {
                Ok(watch) => Some(watch),
                Err(
                    err @ (crate::instance::InstanceError::Busy(_)
                    | crate::instance::InstanceError::StateDirBusy { .. }),
                ) => {
                    return Err(Failure::Operation {
                        exit_code: exit::REFUSED,
                        message: err.to_string(),
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot check whether another drain-agent watches the interfaces");
                    None
                }
            };
            crate::agent::run(config, kernel)?;
            Ok(())
        }
        Command::CheckConfig {
            file,
            online,
            allow_warnings,
        } => check_config(&file, online, allow_warnings),
        Command::Drain {
            backend,
            wait,
            json,
            target,
        } => json_on_failure(
            json,
            operate(&target, &Request::Drain { backend, wait }, json),
        ),
        Command::Resume {
            backend,
            json,
            target,
        } => json_on_failure(json, operate(&target, &Request::Resume { backend }, json)),
        Command::Cycle {
            backend,
            json,
            target,
        } => json_on_failure(json, operate(&target, &Request::Cycle { backend }, json)),
        Command::Handover {
            backend,
            json,
            target,
        } => json_on_failure(json, operate(&target, &Request::Handover { backend }, json)),
        Command::Wait {
            backend,
            json,
            target,
        } => json_on_failure(json, operate(&target, &Request::Wait { backend }, json)),
        Command::Status { json, target } => json_on_failure(json, status(&target, json)),
    }
}

/// `status`: the table, or one JSON object.
fn status(target: &AgentAddress, json: bool) -> Result<(), Failure> {
    let socket = target.socket()?;
    let Response::Status(status) = control::request(&socket, &Request::Status)? else {
        return Err(anyhow::anyhow!("the agent answered status with something else").into());
    };
    show(json, &status, || status.render());
    Ok(())
}

/// Prints `value` as pretty JSON, or its rendering for people.
fn show(json: bool, value: &impl serde::Serialize, render: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("answers serialize")
        );
    } else {
        print!("{}", render());
    }
}

/// With `--json`, a command that failed before printing its report prints one JSON object
/// saying so (`outcome`, `exit_code`, `message`), so a script always has an object to read.
fn json_on_failure(json: bool, result: Result<(), Failure>) -> Result<(), Failure> {
    let Err(failure) = &result else {
        return result;
    };
    if !json {
        return result;
    }
    let outcome = match failure {
        // A report with its own outcome was printed already.
        Failure::Reported { .. } => return result,
        Failure::Config(_) => "config-error",
        Failure::Operation { exit_code, .. } => match *exit_code {
            exit::REFUSED => "refused",
            exit::CONFIG => "config-error",
            AGENT_GONE => "agent-gone",
            INTERRUPTED => "interrupted",
            _ => "error",
        },
        Failure::Other(_) => "error",
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "outcome": outcome,
            "exit_code": failure.code(),
            "message": format!("{failure:#}"),
        }))
        .expect("a JSON value serializes")
    );
    result
}

/// Sends a drain, resume, cycle or wait request, shows progress, and turns the outcome into
/// the exit code. Ctrl-C stops only this command: it says so, and how to follow the operation.
fn operate(target: &AgentAddress, request: &Request, json: bool) -> Result<(), Failure> {
    let socket = target.socket()?;
    let interrupted = interrupt_flag()?;
    let terminal = std::io::stderr().is_terminal();
    let (done, answer) = std::sync::mpsc::channel();
    let answered = Arc::new(AtomicBool::new(false));
    let drew_line = Arc::new(AtomicBool::new(false));
    {
        let (request, answered, drew_line) = (request.clone(), answered.clone(), drew_line.clone());
        std::thread::spawn(move || {
            let mut last_phase = None;
            let result = control::request_streaming(&socket, &request, |response| {
                answered.store(true, Ordering::Relaxed);
                let Response::Progress(progress) = response else {
                    return;
                };
                if json {
                    return;
                }
                if terminal {
                    // One live line, redrawn in place.
                    eprint!("\r\x1b[2K{}", progress.render());
                    drew_line.store(true, Ordering::Relaxed);
                } else if last_phase != Some(progress.phase) {
                    eprintln!("{}", progress.render());
                }
                last_phase = Some(progress.phase);
            });
            let _ = done.send(result);
        });
    }
    let answer = loop {
        match answer.recv_timeout(Duration::from_millis(100)) {
            Ok(result) => break result?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(
                    anyhow::anyhow!("the CLI's request thread ended without an answer").into(),
                );
            }
        }
        if interrupted.load(Ordering::Relaxed) {
            if drew_line.load(Ordering::Relaxed) {
                eprintln!();
            }
            return Err(Failure::Operation {
                exit_code: INTERRUPTED,
                message: interrupted_sentence(request, answered.load(Ordering::Relaxed)),
            });
        }
    };
    if drew_line.load(Ordering::Relaxed) {
        eprintln!();
    }
    match answer {
        Response::Started {
            backend,
            unconfirmed,
        } => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "backend": backend,
                        "outcome": "draining",
                        "exit_code": 0,
                        "unconfirmed": unconfirmed,
                    }))
                    .expect("a JSON value serializes")
                );
            } else if unconfirmed.is_empty() {
                println!(
                    "{backend}: draining; the load balancers confirmed. `drain-agent wait \
                     {backend}` follows it to its end, `drain-agent resume {backend}` cancels"
                );
            } else {
                println!(
                    "{backend}: draining, but {} did not confirm the drain. `drain-agent wait \
                     {backend}` follows it to its end, `drain-agent resume {backend}` cancels",
                    unconfirmed.join(", ")
                );
            }
            Ok(())
        }
        Response::Report(report) => {
            show(json, &report, || report.render());
            if report.exit_code == 0 {
                Ok(())
            } else {
                Err(Failure::Reported {
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

/// What Ctrl-C on a command means for the operation it asked for.
fn interrupted_sentence(request: &Request, answered: bool) -> String {
    let (Request::Drain { backend, .. }
    | Request::Cycle { backend }
    | Request::Handover { backend }
    | Request::Resume { backend }
    | Request::Wait { backend }) = request
    else {
        return "interrupted".into();
    };
    let started = if answered || matches!(request, Request::Wait { .. }) {
        format!(
            "the {} of `{backend}` goes on in the agent",
            match request {
                Request::Wait { .. } => "operation",
                _ => operation_name(request),
            }
        )
    } else {
        format!(
            "the agent may have started the {} of `{backend}`, and if so it goes on",
            operation_name(request)
        )
    };
    let cancel = match request {
        Request::Resume { .. } => String::new(),
        _ => format!("; `drain-agent resume {backend}` cancels a drain"),
    };
    format!(
        "interrupted: {started} (Ctrl-C stops only this command). `drain-agent wait {backend}` \
         follows it to its end and exits with its code; `drain-agent status` shows it{cancel}"
    )
}

/// Set when SIGINT arrives (Ctrl-C), so the command can say what goes on instead of dying
/// silently.
fn interrupt_flag() -> Result<&'static AtomicBool, Failure> {
    static INTERRUPTED_FLAG: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_interrupt(_: libc::c_int) {
        INTERRUPTED_FLAG.store(true, Ordering::Relaxed);
    }
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_interrupt),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &action) }
        .map_err(|err| anyhow::anyhow!("cannot handle Ctrl-C: {err}"))?;
    Ok(&INTERRUPTED_FLAG)
}

/// Exit code when the agent went away while an operation was running (docs/operations.md).
const AGENT_GONE: u8 = 8;
/// Exit code when Ctrl-C stopped the command (128 + SIGINT, as shells report it); the
/// operation goes on in the agent.
const INTERRUPTED: u8 = 130;

/// The operation a request asks for, in the CLI's words.
fn operation_name(request: &Request) -> &'static str {
    match request {
        Request::Status => "status",
        Request::Drain { .. } => "drain",
        Request::Resume { .. } => "resume",
        Request::Cycle { .. } => "cycle",
        Request::Handover { .. } => "handover",
        Request::Wait { .. } => "wait",
    }
}

/// Prints every problem with file, line and key, then a count; exit 2 on an error, or on a
/// warning unless `allow_warnings`.
fn check_config(file: &std::path::Path, online: bool, allow_warnings: bool) -> Result<(), Failure> {
    use crate::check::{Severity, check};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let (_, problems) = runtime.block_on(check(file, online));
    for problem in &problems {
        let word = match problem.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        };
        println!("{word}: {}", problem.error);
    }
    let count = |severity| problems.iter().filter(|p| p.severity == severity).count();
    let (errors, warnings) = (count(Severity::Error), count(Severity::Warning));
    let counted = format!(
        "{}: {errors} error(s), {warnings} warning(s){}",
        file.display(),
        if online { " (online)" } else { "" }
    );
    if errors > 0 || (warnings > 0 && !allow_warnings) {
        return Err(Failure::Operation {
            exit_code: exit::CONFIG,
            message: if errors == 0 {
                format!("{counted}: not clean (--allow-warnings accepts warnings)")
            } else {
                counted
            },
        });
    }
    if warnings > 0 {
        println!("{counted}: ok with warnings (--allow-warnings)");
    } else {
        println!(
            "{}: ok{}",
            file.display(),
            if online { " (online)" } else { "" }
        );
    }
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
    let mut errors = Vec::new();
    for problem in runtime.block_on(check_load_balancers(config)) {
        match problem.severity {
            Severity::Warning => tracing::warn!("{}", problem.error),
            Severity::Note => tracing::info!("{}", problem.error),
            Severity::Error => errors.push(problem.error),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::Config(ConfigErrors(errors)))
    }
}
