//! `drain-agent check-config`: everything that can be checked without acting — the file
//! itself, the node (interfaces, control group), and each load balancer (runtime API reachable,
//! HAProxy backend and server names known); with `--online`, what the first drain would trip
//! on in the running world (admin level, ports, min_serving, restart commands, another agent).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use crate::{
    config::{Action, Config, ConfigError},
    haproxy::{HaproxyError, RuntimeApiClient},
};

/// How bad a problem is: errors make the config unusable; warnings may be transient; notes
/// say what the agent will do with what it found, and change no exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
    Note,
}

/// One problem, located in the file as well as possible.
#[derive(Debug, Clone)]
pub struct Problem {
    pub severity: Severity,
    pub error: ConfigError,
}

impl Problem {
    fn error(error: ConfigError) -> Problem {
        Problem {
            severity: Severity::Error,
            error,
        }
    }

    fn warning(error: ConfigError) -> Problem {
        Problem {
            severity: Severity::Warning,
            error,
        }
    }

    fn note(error: ConfigError) -> Problem {
        Problem {
            severity: Severity::Note,
            error,
        }
    }
}

/// Checks the file and the node (and with `online` the running world); returns the config if
/// it parses, and every problem found.
pub async fn check(path: &Path, online: bool) -> (Option<Config>, Vec<Problem>) {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => return (None, errors.0.into_iter().map(Problem::error).collect()),
    };
    let mut problems: Vec<Problem> = match config.check_host() {
        Ok(()) => Vec::new(),
        Err(errors) => errors.0.into_iter().map(Problem::error).collect(),
    };
    problems.extend(check_kernel(&config));
    problems.extend(check_gate_interfaces(&config));
    problems.extend(check_load_balancers(&config).await);
    if online {
        problems.extend(check_online(&config, &problems).await);
    }
    (Some(config), problems)
}

/// Where the gate cannot run natively and still answer on the right VLAN, it runs in generic
/// mode: a note naming the VLAN devices and the way back to native mode.
fn check_gate_interfaces(config: &Config) -> Vec<Problem> {
    if !crate::kernel::gate::wanted(config) {
        return Vec::new();
    }
    config
        .interfaces
        .iter()
        .enumerate()
        .filter_map(|(index, interface)| {
            let why = crate::kernel::gate::stripped_vlans(interface)?;
            Some(Problem::note(config.error_at(
                &format!("interfaces[{index}]"),
                format!("the gate attaches to {interface} in generic mode: {why}"),
            )))
        })
        .collect()
}

/// Loads every kernel program and discards it (`kernel::features::probe`): the accounting
/// must load; a gate or a handover the kernel refuses is an error at the key that asks for it,
/// with the kernel it needs. Without the permission to load programs, a warning.
fn check_kernel(config: &Config) -> Vec<Problem> {
    use crate::kernel::features::{self, Feature};
    let node = |message: String| ConfigError {
        path: config.path.clone(),
        line: None,
        key: None,
        message,
    };
    let release = features::kernel_release();
    if let Ok(kernel) = aya::util::KernelVersion::current()
        && kernel < crate::kernel::ebpf::MIN_KERNEL
    {
        let err = crate::kernel::TrackerError::KernelTooOld { found: release };
        return vec![Problem::error(node(err.to_string()))];
    }
    let probed = match features::probe() {
        Ok(probed) => probed,
        Err(err) => {
            return vec![Problem::warning(node(format!(
                "cannot probe what this kernel runs ({err}): run check-config as root"
            )))];
        }
    };
    let mut problems = Vec::new();
    for (feature, loaded) in probed {
        let Err(reason) = loaded else {
            continue;
        };
        let refused = |key: Option<String>| {
            let message = format!(
                "kernel {release} refused the {name} programs: {reason}. The {name} needs {needs} \
                 (docs/troubleshooting.md#kernels)",
                name = feature.name(),
                needs = feature.needs(),
            );
            Problem::error(match key {
                Some(key) => config.error_at(&key, message),
                None => node(message),
            })
        };
        match feature {
            Feature::Accounting => problems.push(refused(None)),
            Feature::Gate | Feature::Handover => {
                for (index, backend) in config.backends.iter().enumerate() {
                    let (configured, key) = match feature {
                        Feature::Gate => (backend.gate.is_some(), "gate"),
                        _ => (backend.handover.is_some(), "handover"),
                    };
                    if configured {
                        problems.push(refused(Some(format!("backend[{index}].{key}"))));
                    }
                }
            }
        }
    }
    problems
}

/// Asks each load balancer for every configured HAProxy server. An unreachable one is a
/// warning (HAProxy may be down right now; agent-check covers it), a server it does not know
/// is an error.
pub async fn check_load_balancers(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (index, lb) in config.load_balancers.iter().enumerate() {
        let client = RuntimeApiClient::new(lb);
        for (backend_index, backend) in config.backends.iter().enumerate() {
            let Some(server) = &backend.haproxy else {
                continue;
            };
            match client.servers(&server.backend).await {
                Ok(servers) if servers.iter().any(|stat| stat.name == server.server) => {}
                Ok(_) => problems.push(Problem::error(
                    config.error_at(
                        &format!("backend[{backend_index}].haproxy"),
                        HaproxyError::NoSuchServer {
                            lb: lb.name.clone(),
                            backend: server.backend.clone(),
                            server: server.server.clone(),
                        }
                        .to_string(),
                    ),
                )),
                Err(err) => {
                    let error = config.error_at(
                        &format!("load_balancer[{index}].runtime_api"),
                        err.to_string(),
                    );
                    problems.push(if err.is_unreachable() {
                        Problem::warning(error)
                    } else {
                        Problem::error(error)
                    });
                    break; // one message per unreachable load balancer
                }
            }
        }
    }
    problems
}

/// What `HAProxy` answers at `level user` or `operator` to an admin command.
const PERMISSION_DENIED: &str = "Permission denied";

/// The checks against the running world: each runtime API at `level admin`, each server's
/// port among the backend's `ports`, `min_serving` reachable, restart and rollback commands
/// there, no other agent on the interfaces. `found` holds what the offline checks reported
/// (an unreachable load balancer is not reported again).
async fn check_online(config: &Config, found: &[Problem]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (index, lb) in config.load_balancers.iter().enumerate() {
        let key = format!("load_balancer[{index}].runtime_api");
        if found
            .iter()
            .any(|problem| problem.error.key.as_deref() == Some(key.as_str()))
        {
            continue;
        }
        let client = RuntimeApiClient::new(lb);
        // `set server` without arguments: refused at `level user`/`operator` before HAProxy
        // even reads its arguments; at `level admin` it only asks for them. Changes nothing.
        match client.command("set server").await {
            Ok(answer) if answer.contains(PERMISSION_DENIED) => {
                problems.push(Problem::error(config.error_at(
                    &key,
                    format!(
                        "load balancer {}: the runtime API at {} answers, but not at `level \
                         admin` (\"{PERMISSION_DENIED}\" to `set server`): the agent could not \
                         drain through it. Give its `stats socket` line `level admin` in \
                         haproxy.cfg and reload HAProxy",
                        lb.name, lb.runtime_api
                    ),
                )));
                continue;
            }
            Ok(_) => {}
            Err(err) => {
                problems.push(Problem::warning(config.error_at(&key, err.to_string())));
                continue;
            }
        }
        for (backend_index, backend) in config.backends.iter().enumerate() {
            let Some(server) = &backend.haproxy else {
                continue;
            };
            let key = format!("backend[{backend_index}].haproxy");
            let Ok(answer) = client
                .command(&format!("show servers state {}", server.backend))
                .await
            else {
                continue;
            };
            let servers = servers_state(&answer);
            if let Some(port) = servers
                .iter()
                .find(|(name, _)| *name == server.server)
                .and_then(|(_, port)| *port)
            {
                if !backend.ports.contains(&port) {
                    problems.push(Problem::error(config.error_at(
                        &key,
                        format!(
                            "load balancer {}: HAProxy sends server `{}` of backend `{}` to port \
                             {port}, which is not one of backend `{}`'s ports {:?}: the agent \
                             would watch the wrong port and call the node drained while it \
                             still serves. Add {port} to `ports`, or fix the server line in \
                             haproxy.cfg",
                            lb.name, server.server, server.backend, backend.name, backend.ports
                        ),
                    )));
                }
            }
            // The servers a drain would leave in rotation.
            let others = servers
                .iter()
                .filter(|(name, _)| *name != server.server)
                .count();
            if others < backend.min_serving as usize {
                problems.push(Problem::error(config.error_at(
                    &format!("backend[{backend_index}].min_serving"),
                    format!(
                        "min_serving = {} can never be met: HAProxy backend `{}` on load \
                         balancer {} has {others} other server(s), so every drain of `{}` \
                         would be refused. Lower min_serving, or add servers",
                        backend.min_serving, server.backend, lb.name, backend.name
                    ),
                )));
            } else if let Ok(stats) = client.servers(&server.backend).await {
                let serving = stats
                    .iter()
                    .filter(|stat| stat.name != server.server && stat.is_serving())
                    .count();
                if serving < backend.min_serving as usize {
                    problems.push(Problem::warning(config.error_at(
                        &format!("backend[{backend_index}].min_serving"),
                        format!(
                            "min_serving = {}: only {serving} other server(s) of HAProxy \
                             backend `{}` serve on load balancer {} right now, so a drain of \
                             `{}` would be refused until more are UP",
                            backend.min_serving, server.backend, lb.name, backend.name
                        ),
                    )));
                }
            }
        }
    }
    for (index, backend) in config.backends.iter().enumerate() {
        for (step, what) in [
            (&backend.restart, "restart"),
            (&backend.rollback, "rollback"),
        ] {
            let Some(step) = step else {
                continue;
            };
            if let Some(problem) = missing_action(&step.action).await {
                problems.push(Problem::error(config.error_at(
                    &format!("backend[{index}].{what}"),
                    format!("backend `{}`'s {what}: {problem}", backend.name),
                )));
            }
        }
    }
    for (index, backend) in config.backends.iter().enumerate() {
        problems.extend(check_listeners(config, index, backend));
    }
    for (index, backend) in config.backends.iter().enumerate() {
        if let Some(handover) = &backend.handover {
            problems.extend(check_handover(backend, handover).await.into_iter().map(
                |(key, problem, error)| {
                    let at = config.error_at(
                        &format!("backend[{index}].handover{key}"),
                        format!("backend `{}`'s handover: {problem}", backend.name),
                    );
                    if error {
                        Problem::error(at)
                    } else {
                        Problem::warning(at)
                    }
                },
            ));
        }
    }
    match crate::instance::holders(config) {
        Ok(holders) => {
            for holder in holders {
                let interface = config
                    .interfaces
                    .iter()
                    .position(|name| *name == holder.interface)
                    .unwrap_or(0);
                let same_config = std::fs::canonicalize(&holder.config).ok()
                    == std::fs::canonicalize(&config.path).ok();
                let key = format!("interfaces[{interface}]");
                problems.push(if same_config {
                    Problem::warning(config.error_at(
                        &key,
                        format!(
                            "{holder} with this config: `run` is refused until it stops \
                             (`systemctl restart drain-agent` does that)"
                        ),
                    ))
                } else {
                    Problem::error(config.error_at(
                        &key,
                        format!(
                            "{holder}: `run` with this config would be refused. Stop that \
                             agent, or watch other interfaces"
                        ),
                    ))
                });
            }
        }
        Err(err) => problems.push(Problem::warning(ConfigError {
            path: config.path.clone(),
            line: None,
            key: Some("interfaces".into()),
            message: format!("cannot tell whether another drain-agent runs: {err}"),
        })),
    }
    problems
}

/// Who listens on `backend`'s ports now, against what it says it serves: a listen address
/// nothing listens on (warning: the service may not run yet); another program's listener on
/// the port (HAProxy's frontend on the VIP, as Kolla-Ansible deploys it) — a note of what the
/// agent leaves alone when the backend names its addresses, an error when it claims every
/// address of the port and would count that program's clients as the service's.
fn check_listeners(
    config: &Config,
    index: usize,
    backend: &crate::config::Backend,
) -> Vec<Problem> {
    use crate::kernel::listeners;
    let key = format!(
        "backend[{index}].{}",
        if backend.address_bound() {
            "listen"
        } else {
            "ports"
        }
    );
    let (Ok(own), Ok(others)) = (
        listeners::of_backend(backend),
        listeners::others_on_ports(backend),
    ) else {
        return vec![Problem::warning(config.error_at(
            &key,
            format!(
                "backend `{}`: cannot read the socket table for its listeners",
                backend.name
            ),
        ))];
    };
    let inodes = own
        .iter()
        .chain(&others)
        .map(|listener| listener.inode)
        .collect();
    let holding = listeners::holders(&inodes);
    let program = |inode: u64| -> String {
        let Some(pid) = holding
            .get(&inode)
            .and_then(|holders| listeners::owner(holders))
        else {
            return "a process the agent cannot see".to_string();
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|comm| comm.trim().to_string())
            .unwrap_or_else(|_| "?".to_string());
        format!("{name} (pid {pid})")
    };
    let mut problems = Vec::new();
    for listen in &backend.listen {
        if !own.iter().any(|listener| listen.covers(listener.local)) {
            problems.push(Problem::warning(config.error_at(
                &key,
                format!(
                    "backend `{}`: nothing listens on {listen} now (is the service running, and \
                     bound to that address?)",
                    backend.name
                ),
            )));
        }
    }
    if backend.address_bound() {
        for listener in &others {
            problems.push(Problem::note(config.error_at(
                &key,
                format!(
                    "{} listens on {} beside backend `{}`: the agent does not count its \
                     connections, a closed gate lets them through, and a handover leaves it \
                     alone (only {} are the backend's)",
                    program(listener.inode),
                    listener.local,
                    backend.name,
                    backend
                        .listen
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )));
        }
    } else {
        // Every address of the port is the backend's: listeners of more than one process
        // tree there (not one service's master and workers) mean another program's clients
        // would be counted as the service's.
        let mut owners: std::collections::BTreeMap<String, Vec<std::net::SocketAddr>> =
            Default::default();
        for listener in &own {
            owners
                .entry(program(listener.inode))
                .or_default()
                .push(listener.local);
        }
        if owners.len() > 1 {
            let shown: Vec<String> = owners
                .iter()
                .map(|(owner, addresses)| {
                    let addresses: Vec<String> =
                        addresses.iter().map(ToString::to_string).collect();
                    format!("{owner} on {}", addresses.join(", "))
                })
                .collect();
            problems.push(Problem::error(config.error_at(
                &key,
                format!(
                    "backend `{}` claims every address of its ports, but several processes \
                     listen there: {}. The agent would count the others' connections as the \
                     service's (a drain would wait for them), a closed gate would refuse them, \
                     and a handover would take them for the old version. Name the service's \
                     own addresses with listen = [\"ADDRESS:PORT\"]",
                    backend.name,
                    shown.join("; ")
                ),
            )));
        }
    }
    problems
}

/// What would stop a handover of `backend` now: its commands missing (errors), or nothing
/// listening on a port, or a listener without SO_REUSEPORT (warnings: the service may just
/// not run yet). Each with the key suffix it belongs to.
async fn check_handover(
    backend: &crate::config::Backend,
    handover: &crate::config::Handover,
) -> Vec<(&'static str, String, bool)> {
    use crate::{config::HandoverHow, kernel::listeners};
    let mut problems = Vec::new();
    if let HandoverHow::Commands { start, stop } = &handover.how {
        for (key, argv) in [(".start", Some(start)), (".stop", stop.as_ref())] {
            let Some(argv) = argv else { continue };
            if let Some(problem) = missing_action(&Action::Command(argv.clone())).await {
                problems.push((key, problem, true));
            }
        }
    }
    let found = match listeners::of_backend(backend) {
        Ok(found) => found,
        Err(err) => return vec![("", err.to_string(), false)],
    };
    for listen in &backend.listen {
        if !found.iter().any(|listener| listen.covers(listener.local)) {
            problems.push((
                "",
                format!("nothing listens on {listen} now: a handover would be refused"),
                false,
            ));
        }
    }
    let inodes = found.iter().map(|listener| listener.inode).collect();
    let holding = listeners::holders(&inodes);
    for listener in &found {
        let Some(&(pid, fd)) = holding.get(&listener.inode).and_then(|h| h.first()) else {
            continue;
        };
        match listeners::take(listener.local, pid, fd) {
            Ok(socket) if !listeners::reuses_port(&socket) => problems.push((
                "",
                format!(
                    "the listener {} (pid {pid}) does not set SO_REUSEPORT, so a new version \
                     cannot listen beside it and a handover would be refused: start the service \
                     with it (gunicorn --reuse-port)",
                    listener.local
                ),
                false,
            )),
            Ok(_) => {}
            Err(err) => problems.push(("", err.to_string(), false)),
        }
    }
    problems
}

/// Server names and ports from `show servers state BACKEND`.
fn servers_state(answer: &str) -> Vec<(&str, Option<u16>)> {
    let mut lines = answer.lines().filter(|line| !line.trim().is_empty());
    let Some(header) = lines.find_map(|line| line.strip_prefix("# ")) else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.split_whitespace().collect();
    let column = |name: &str| columns.iter().position(|column| *column == name);
    let (Some(name), Some(port)) = (column("srv_name"), column("srv_port")) else {
        return Vec::new();
    };
    lines
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter_map(|fields| {
            Some((
                *fields.get(name)?,
                fields.get(port).and_then(|port| port.parse().ok()),
            ))
        })
        .collect()
}

/// Why a restart or rollback could not run as configured, if it could not: the program is not
/// found or not executable, or systemd does not know the unit.
async fn missing_action(action: &Action) -> Option<String> {
    match action {
        Action::Command(argv) => {
            let program = argv.first()?;
            match find_program(program) {
                Some(path) if is_executable(&path) => None,
                Some(path) => Some(format!(
                    "{} is not executable (chmod +x it, or name another program)",
                    path.display()
                )),
                None if program.contains('/') => Some(format!(
                    "command `{program}` does not exist: name an existing program"
                )),
                None => Some(format!(
                    "command `{program}` is not found in PATH ({}): use an absolute path, or \
                     install it",
                    std::env::var("PATH").unwrap_or_default()
                )),
            }
        }
        Action::SystemdUnit(unit) => {
            let Some(systemctl) = find_program("systemctl") else {
                return Some(format!(
                    "`systemd_unit = \"{unit}\"` needs systemctl, which is not in PATH: use \
                     `command = [...]` on a node without systemd"
                ));
            };
            let output = tokio::process::Command::new(systemctl)
                .args(["show", "--property=LoadState", "--value", unit])
                .output()
                .await;
            match output {
                Ok(output) if String::from_utf8_lossy(&output.stdout).trim() == "not-found" => {
                    Some(format!(
                        "systemd has no unit `{unit}` (`systemctl status {unit}`): name the \
                         service's unit"
                    ))
                }
                _ => None,
            }
        }
    }
}

/// Where a program is: itself when it names a path, else the first match in PATH.
fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return path.exists().then_some(path);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_servers_state_gives_names_and_ports() {
        let answer = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state \
                      srv_uweight srv_iweight srv_time_since_last_change srv_check_status \
                      srv_check_result srv_check_health srv_check_state srv_agent_state \
                      bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord\n\
                      2 api 1 node1 127.0.0.1 2 0 1 1 1 1 0 2 0 0 0 0 - 18774 -\n\
                      2 api 2 node2 127.0.0.1 2 0 1 1 1 1 0 2 0 0 0 0 - 18775 -\n";
        assert_eq!(
            servers_state(answer),
            [("node1", Some(18774)), ("node2", Some(18775))]
        );
    }

    #[tokio::test]
    async fn a_restart_command_that_does_not_exist_is_named() {
        let missing = missing_action(&Action::Command(vec!["no-such-restart-tool".into()]))
            .await
            .unwrap();
        assert!(
            missing.starts_with("command `no-such-restart-tool` is not found in PATH"),
            "{missing}"
        );
        assert_eq!(
            missing_action(&Action::Command(vec!["true".into()])).await,
            None
        );
        let missing = missing_action(&Action::Command(vec!["/nonexistent/restart".into()]))
            .await
            .unwrap();
        assert!(missing.contains("does not exist"), "{missing}");
    }
}
