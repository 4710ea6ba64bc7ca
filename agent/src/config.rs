//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every error names the file, the line and the key, so an operator can fix it before a
//! maintenance window rather than during one.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use drain_agent_common::{DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS};
use serde::Deserialize;
use toml::Spanned;

/// Where `run` and `check-config` read the config unless told otherwise (the shipped unit's
/// path too).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/drain-agent/config.toml";
/// Where the control socket lives unless the config says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/drain-agent/control.sock";
/// How long in-flight must stay at 0 before a backend counts as quiet.
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_millis(50);
/// How long a tracked connection may go without packets before the garbage collector checks
/// whether its socket still exists.
pub const DEFAULT_FLOW_IDLE_CHECK: Duration = Duration::from_secs(60);
/// Smallest flow table worth running with.
const MIN_FLOW_TABLE_SIZE: u32 = 1024;
/// Largest flow table accepted: 16M connections is about 1.5 GB of kernel memory.
const MAX_FLOW_TABLE_SIZE: u32 = 16 * 1024 * 1024;
/// HAProxy's default `agent-inter`: how often a load balancer asks the agent-check port.
pub const DEFAULT_AGENT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Agent-check connections served at once unless the config says otherwise.
pub const DEFAULT_AGENT_CHECK_MAX_CONNECTIONS: usize = 256;
/// How long `on_shutdown = "finish"` lets an operation run after SIGTERM before aborting it:
/// inside the shipped unit's `TimeoutStopSec=5min`, with room for the abort itself.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(240);

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// Interfaces whose traffic the kernel programs watch.
    pub interfaces: Vec<String>,
    /// Unix socket the CLI talks to.
    pub control_socket: PathBuf,
    /// How long in-flight must stay at 0 before a backend counts as quiet (docs/accounting.md).
    pub quiet_period: Duration,
    /// Most connections the kernel flow table holds.
    pub flow_table_size: u32,
    /// Silence after which the garbage collector checks a tracked connection's socket.
    pub flow_idle_check: Duration,
    /// Where the HAProxy agent-check responder listens (none: no responder).
    pub agent_check_listen: Option<SocketAddr>,
    /// The longest `agent-inter` of the load balancers polling this agent: how long a drain
    /// or a return waits for each of them to be told.
    pub agent_check_interval: Duration,
    /// Sources allowed to connect to the agent-check port; empty: everyone.
    pub agent_check_allow: Vec<ipnet::IpNet>,
    /// Agent-check connections served at once.
    pub agent_check_max_connections: usize,
    /// With `on_shutdown = "finish"`: how long a running operation may go on after SIGTERM
    /// before it is aborted, so the agent exits inside systemd's `TimeoutStopSec`.
    pub shutdown_timeout: Duration,
    /// Where Prometheus scrapes `/metrics` (and probes `/live`, `/ready`); none: no listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Group whose members may drain, cycle and resume over the control socket (besides
    /// root); the socket is then mode 0660 and owned by that group.
    pub control_group: Option<String>,
    /// What SIGTERM does to a drain in progress.
    pub on_shutdown: OnShutdown,
    /// HAProxy instances in front of this node.
    pub load_balancers: Vec<LoadBalancer>,
    /// The API services on this node.
    pub backends: Vec<Backend>,
}

/// One HAProxy instance and how to reach its runtime API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancer {
    pub name: String,
    pub runtime_api: RuntimeApi,
    /// Deadline for one runtime API command.
    pub timeout: Duration,
}

/// Address of an HAProxy runtime API ("stats socket").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeApi {
    Unix(PathBuf),
    Tcp(String),
}

impl fmt::Display for RuntimeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeApi::Unix(path) => write!(f, "unix:{}", path.display()),
            RuntimeApi::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

/// What SIGTERM does to a drain or cycle in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Stop a drain and put the server back in service before exiting (a restart already
    /// under way is waited for, then the cycle ends as it ends).
    Abort,
    /// Let the running drain or cycle finish, then exit.
    Finish,
}

/// What to do when in-flight work outlives `drain_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Put the server back in service and fail.
    Abort,
    /// Go on with the restart and report how many in-flight connections were cut.
    Force,
}

/// The HAProxy backend and server that stand for this node's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyServer {
    pub backend: String,
    pub server: String,
}

/// How the service is restarted (and rolled back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `systemctl restart UNIT`.
    SystemdUnit(String),
    /// A command and its arguments, run without a shell.
    Command(Vec<String>),
}

/// A restart or rollback step with its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub timeout: Duration,
}

/// How the service proves it is healthy after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// How long to keep trying before the restart counts as failed.
    pub timeout: Duration,
}

/// One health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET `path` on `address` (host:port) over HTTP/1.1; healthy on status `expect`.
    Http {
        url: String,
        address: String,
        host: String,
        path: String,
        expect: u16,
    },
    /// A TCP connection to host:port succeeds.
    Tcp(String),
}

/// One API service on this node: its ports, and how to drain, restart and verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Name the operator uses for it (CLI, status, agent-send).
    pub name: String,
    /// Local TCP ports.
    pub ports: Vec<u16>,
    /// This node's server in HAProxy (on every configured load balancer).
    pub haproxy: Option<HaproxyServer>,
    /// Never drain if fewer other servers of the HAProxy backend would stay UP.
    pub min_serving: u32,
    /// Longest wait for in-flight work to finish.
    pub drain_timeout: Duration,
    pub on_timeout: OnTimeout,
    pub restart: Option<Step>,
    pub health: Option<HealthCheck>,
    pub rollback: Option<Step>,
}

/// Defaults for the drain settings.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_MIN_SERVING: u32 = 1;
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_RUNTIME_API_TIMEOUT: Duration = Duration::from_secs(5);

/// A configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key the problem is about, e.g. `backend[1].ports`.
    pub key: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    control_socket: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    quiet_period: Option<Duration>,
    flow_table_size: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    flow_idle_check: Option<Duration>,
    agent_check_listen: Option<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    agent_check_interval: Option<Duration>,
    agent_check_allow: Option<Vec<Spanned<String>>>,
    agent_check_max_connections: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    shutdown_timeout: Option<Duration>,
    metrics_listen: Option<Spanned<String>>,
    control_group: Option<Spanned<String>>,
    on_shutdown: Option<OnShutdown>,
    #[serde(default, rename = "load_balancer")]
    load_balancers: Vec<Spanned<RawLoadBalancer>>,
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoadBalancer {
    name: Spanned<String>,
    runtime_api: Spanned<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    ports: Spanned<Vec<Spanned<i64>>>,
    haproxy: Option<Spanned<RawHaproxy>>,
    min_serving: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
    on_timeout: Option<OnTimeout>,
    restart: Option<Spanned<RawStep>>,
    health: Option<Spanned<RawHealth>>,
    rollback: Option<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHaproxy {
    backend: String,
    server: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    systemd_unit: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    http: Option<String>,
    expect: Option<u16>,
    tcp: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

impl Config {
    /// Reads and validates a config file. Does not look at the host (see [`Config::check_host`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            path: path.to_owned(),
            line: None,
            key: None,
            message: format!("cannot read the config file: {err}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let at = |span: Option<Range<usize>>, key: Option<String>, message: String| ConfigError {
            path: path.to_owned(),
            line: span.map(|span| line_of(text, span.start)),
            key,
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            at(
                err.span(),
                None,
                did_you_mean(&err.message().trim_end().replace('\n', "; ")),
            )
        })?;

        let interfaces = match raw.interfaces {
            Some(list) if !list.get_ref().is_empty() => {
                let mut seen = HashSet::new();
                let mut names = Vec::new();
                for name in list.into_inner() {
                    let span = name.span();
                    let name = name.into_inner();
                    if name.is_empty() || name.len() >= libc::IF_NAMESIZE {
                        return Err(at(
                            Some(span),
                            Some("interfaces".into()),
                            format!("`{name}` is not a valid interface name"),
                        ));
                    }
                    if !seen.insert(name.clone()) {
                        return Err(at(
                            Some(span),
                            Some("interfaces".into()),
                            format!("interface `{name}` is listed twice"),
                        ));
                    }
                    names.push(name);
                }
                names
            }
            Some(list) => {
                return Err(at(
                    Some(list.span()),
                    Some("interfaces".into()),
                    "list at least one interface the API traffic arrives on, e.g. \
                     interfaces = [\"eth0\"]"
                        .into(),
                ));
            }
            None => {
                return Err(at(
                    None,
                    Some("interfaces".into()),
                    "missing: list the interfaces the API traffic arrives on, e.g. \
                     interfaces = [\"eth0\"]"
                        .into(),
                ));
            }
        };

        let flow_table_size = match raw.flow_table_size {
            None => DEFAULT_FLOW_TABLE_SIZE,
            Some(size) => {
                let span = size.span();
                u32::try_from(*size.get_ref())
                    .ok()
                    .filter(|size| (MIN_FLOW_TABLE_SIZE..=MAX_FLOW_TABLE_SIZE).contains(size))
                    .ok_or_else(|| {
                        at(
                            Some(span),
                            Some("flow_table_size".into()),
                            format!(
                                "{} is out of range: use {MIN_FLOW_TABLE_SIZE} to \
                                 {MAX_FLOW_TABLE_SIZE} connections",
                                size.get_ref(),
                            ),
                        )
                    })?
            }
        };

        if raw.backends.is_empty() {
            return Err(at(
                None,
                Some("backend".into()),
                "no backend configured: add a [[backend]] table with `name` and `ports`".into(),
            ));
        }
        if raw.backends.len() > MAX_BACKENDS as usize {
            return Err(at(
                Some(raw.backends[MAX_BACKENDS as usize].span()),
                Some("backend".into()),
                format!("at most {MAX_BACKENDS} backends are supported"),
            ));
        }

        let mut backends: Vec<Backend> = Vec::new();
        // port → index of the backend that claimed it
        let mut port_owner: BTreeMap<u16, usize> = BTreeMap::new();
        for (index, backend) in raw.backends.into_iter().enumerate() {
            let backend = backend.into_inner();
            let name_span = backend.name.span();
            let name = backend.name.into_inner();
            if name.trim().is_empty() || name.chars().any(char::is_whitespace) {
                return Err(at(
                    Some(name_span),
                    Some(format!("backend[{index}].name")),
                    format!(
                        "{name:?} is not a usable name: use a non-empty word such as \"nova-api\""
                    ),
                ));
            }
            if let Some(other) = backends.iter().find(|other| other.name == name) {
                return Err(at(
                    Some(name_span),
                    Some(format!("backend[{index}].name")),
                    format!("backend `{}` is defined twice", other.name),
                ));
            }
            let ports_span = backend.ports.span();
            let raw_ports = backend.ports.into_inner();
            if raw_ports.is_empty() {
                return Err(at(
                    Some(ports_span),
                    Some(format!("backend[{index}].ports")),
                    format!("backend `{name}` has no ports: list the TCP ports it serves"),
                ));
            }
            let mut ports = Vec::new();
            for port in raw_ports {
                let span = port.span();
                let value = *port.get_ref();
                let port = u16::try_from(value)
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| {
                        at(
                            Some(span.clone()),
                            Some(format!("backend[{index}].ports")),
                            format!("port {value} is out of range: use 1 to 65535"),
                        )
                    })?;
                if let Some(&owner) = port_owner.get(&port) {
                    let message = if owner == index {
                        format!("port {port} is listed twice for backend `{name}`")
                    } else {
                        format!(
                            "port {port} is already used by backend `{}`: a port belongs to one backend",
                            backends[owner].name
                        )
                    };
                    return Err(at(
                        Some(span),
                        Some(format!("backend[{index}].ports")),
                        message,
                    ));
                }
                port_owner.insert(port, index);
                ports.push(port);
            }
            let key = |field: &str| Some(format!("backend[{index}].{field}"));
            let haproxy = match backend.haproxy {
                None => None,
                Some(haproxy) => {
                    let span = haproxy.span();
                    let haproxy = haproxy.into_inner();
                    for (field, value) in [
                        ("haproxy.backend", &haproxy.backend),
                        ("haproxy.server", &haproxy.server),
                    ] {
                        if let Err(message) = haproxy_name(value) {
                            return Err(at(Some(span.clone()), key(field), message));
                        }
                    }
                    Some(HaproxyServer {
                        backend: haproxy.backend,
                        server: haproxy.server,
                    })
                }
            };
            let min_serving = match backend.min_serving {
                // Without a runtime API the agent cannot count the other servers: the default
                // then asks nothing it cannot check (docs/operations.md says what that means).
                None if haproxy.is_none() => 0,
                None => DEFAULT_MIN_SERVING,
                Some(value) => {
                    let count = u32::try_from(*value.get_ref()).map_err(|_| {
                        at(
                            Some(value.span()),
                            key("min_serving"),
                            format!("{} is not a server count: use 0 or more", value.get_ref()),
                        )
                    })?;
                    if count > 0 && haproxy.is_none() {
                        return Err(at(
                            Some(value.span()),
                            key("min_serving"),
                            format!(
                                "min_serving = {count} needs `haproxy = {{ backend, server }}` and \
                                 a [[load_balancer]] runtime_api: with agent-check alone the \
                                 agent cannot see the other servers, so it could not keep \
                                 {count} of them serving. Add the runtime API, or set \
                                 min_serving = 0"
                            ),
                        ));
                    }
                    count
                }
            };
            let step =
                |raw: Option<Spanned<RawStep>>, field: &str| -> Result<Option<Step>, ConfigError> {
                    let Some(raw) = raw else { return Ok(None) };
                    let span = raw.span();
                    let raw = raw.into_inner();
                    let action = match (raw.systemd_unit, raw.command) {
                        (Some(unit), None) if !unit.trim().is_empty() => Action::SystemdUnit(unit),
                        (None, Some(command)) if !command.is_empty() && !command[0].is_empty() => {
                            Action::Command(command)
                        }
                        _ => {
                            return Err(at(
                                Some(span),
                                key(field),
                                "give exactly one of `systemd_unit = \"name.service\"` or \
                             `command = [\"program\", \"arg\", ...]`"
                                    .into(),
                            ));
                        }
                    };
                    Ok(Some(Step {
                        action,
                        timeout: raw.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT),
                    }))
                };
            let restart = step(backend.restart, "restart")?;
            let rollback = step(backend.rollback, "rollback")?;
            let health = match backend.health {
                None => None,
                Some(raw) => {
                    let span = raw.span();
                    let raw = raw.into_inner();
                    let probe = match (raw.http, raw.tcp) {
                        (Some(url), None) => parse_http_probe(&url, raw.expect.unwrap_or(200))
                            .map_err(|message| {
                                at(Some(span.clone()), key("health.http"), message)
                            })?,
                        (None, Some(address)) if raw.expect.is_none() => {
                            if !address.contains(':') {
                                return Err(at(
                                    Some(span),
                                    key("health.tcp"),
                                    format!("`{address}` needs a port, e.g. \"127.0.0.1:8774\""),
                                ));
                            }
                            Probe::Tcp(address)
                        }
                        _ => {
                            return Err(at(
                                Some(span),
                                key("health"),
                                "give exactly one of `http = \"http://host:port/path\"` (with an \
                                 optional `expect = 200`) or `tcp = \"host:port\"`"
                                    .into(),
                            ));
                        }
                    };
                    Some(HealthCheck {
                        probe,
                        timeout: raw.timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT),
                    })
                }
            };
            backends.push(Backend {
                name,
                ports,
                haproxy,
                min_serving,
                drain_timeout: backend.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
                on_timeout: backend.on_timeout.unwrap_or(OnTimeout::Abort),
                restart,
                health,
                rollback,
            });
        }

        let mut load_balancers: Vec<LoadBalancer> = Vec::new();
        for (index, raw) in raw.load_balancers.into_iter().enumerate() {
            let raw = raw.into_inner();
            let name_span = raw.name.span();
            let name = raw.name.into_inner();
            if name.trim().is_empty() || load_balancers.iter().any(|lb| lb.name == name) {
                return Err(at(
                    Some(name_span),
                    Some(format!("load_balancer[{index}].name")),
                    format!("load balancer name {name:?} is empty or used twice"),
                ));
            }
            let api_span = raw.runtime_api.span();
            let runtime_api = parse_runtime_api(raw.runtime_api.get_ref()).map_err(|message| {
                at(
                    Some(api_span),
                    Some(format!("load_balancer[{index}].runtime_api")),
                    message,
                )
            })?;
            load_balancers.push(LoadBalancer {
                name,
                runtime_api,
                timeout: raw.timeout.unwrap_or(DEFAULT_RUNTIME_API_TIMEOUT),
            });
        }
        if load_balancers.is_empty() {
            if let Some(backend) = backends.iter().find(|backend| backend.haproxy.is_some()) {
                return Err(at(
                    None,
                    Some("load_balancer".into()),
                    format!(
                        "backend `{}` names an HAProxy server but no [[load_balancer]] is \
                         configured: add one with `name` and `runtime_api`",
                        backend.name
                    ),
                ));
            }
        }

        let listen = |value: Option<Spanned<String>>, key: &str, example: &str| match value {
            None => Ok(None),
            Some(address) => address
                .get_ref()
                .parse::<SocketAddr>()
                .map(Some)
                .map_err(|_| {
                    at(
                        Some(address.span()),
                        Some(key.into()),
                        format!(
                            "`{}` is not an address:port to listen on, e.g. \"{example}\"",
                            address.get_ref()
                        ),
                    )
                }),
        };
        let agent_check_listen =
            listen(raw.agent_check_listen, "agent_check_listen", "0.0.0.0:9500")?;
        let agent_check_interval = raw
            .agent_check_interval
            .unwrap_or(DEFAULT_AGENT_CHECK_INTERVAL);
        if agent_check_interval.is_zero() {
            return Err(at(
                text.find("agent_check_interval")
                    .map(|offset| offset..offset),
                Some("agent_check_interval".into()),
                "0 is not an interval: give the load balancers' `agent-inter`, e.g. \"2s\"".into(),
            ));
        }
        let mut agent_check_allow = Vec::new();
        for source in raw.agent_check_allow.unwrap_or_default() {
            let net = source
                .get_ref()
                .parse::<ipnet::IpNet>()
                .or_else(|_| {
                    source
                        .get_ref()
                        .parse::<std::net::IpAddr>()
                        .map(ipnet::IpNet::from)
                })
                .map_err(|_| {
                    at(
                        Some(source.span()),
                        Some("agent_check_allow".into()),
                        format!(
                            "`{}` is not an address or network, e.g. \"10.0.0.0/24\" or \
                             \"fd00::1\"",
                            source.get_ref()
                        ),
                    )
                })?;
            agent_check_allow.push(net.trunc());
        }
        let agent_check_max_connections = match raw.agent_check_max_connections {
            None => DEFAULT_AGENT_CHECK_MAX_CONNECTIONS,
            Some(value) => usize::try_from(*value.get_ref())
                .ok()
                .filter(|count| (1..=65_536).contains(count))
                .ok_or_else(|| {
                    at(
                        Some(value.span()),
                        Some("agent_check_max_connections".into()),
                        format!("{} is out of range: use 1 to 65536", value.get_ref()),
                    )
                })?,
        };
        let metrics_listen = listen(raw.metrics_listen, "metrics_listen", "127.0.0.1:9477")?;
        if let (Some(a), Some(m)) = (agent_check_listen, metrics_listen) {
            if a.port() == m.port()
                && (a.ip() == m.ip() || a.ip().is_unspecified() || m.ip().is_unspecified())
            {
                return Err(at(
                    None,
                    Some("metrics_listen".into()),
                    format!("{m} collides with agent_check_listen {a}: use another port"),
                ));
            }
        }
        let control_group = match raw.control_group {
            None => None,
            Some(group) => {
                let span = group.span();
                let name = group.into_inner();
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(at(
                        Some(span),
                        Some("control_group".into()),
                        format!("{name:?} is not a group name"),
                    ));
                }
                Some(name)
            }
        };

        Ok(Config {
            path: path.to_owned(),
            interfaces,
            control_socket: raw
                .control_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
            quiet_period: raw.quiet_period.unwrap_or(DEFAULT_QUIET_PERIOD),
            flow_table_size,
            flow_idle_check: raw.flow_idle_check.unwrap_or(DEFAULT_FLOW_IDLE_CHECK),
            agent_check_listen,
            agent_check_interval,
            agent_check_allow,
            agent_check_max_connections,
            shutdown_timeout: raw.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
            metrics_listen,
            control_group,
            on_shutdown: raw.on_shutdown.unwrap_or(OnShutdown::Abort),
            load_balancers,
            backends,
        })
    }

    /// Checks what depends on this node: every interface exists here, the control group too.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        if let Some(group) = &self.control_group {
            let Ok(Some(entry)) = nix::unistd::Group::from_name(group) else {
                return Err(ConfigError {
                    path: self.path.clone(),
                    line: None,
                    key: Some("control_group".into()),
                    message: format!(
                        "group `{group}` does not exist on this node (see `getent group`)"
                    ),
                });
            };
            if !can_give_files_to(entry.gid) {
                return Err(ConfigError {
                    path: self.path.clone(),
                    line: None,
                    key: Some("control_group".into()),
                    message: format!(
                        "the agent cannot hand the control socket to group `{group}`: it has \
                         no CAP_CHOWN (the shipped unit does not grant it) and is not a member \
                         of `{group}`. Add `SupplementaryGroups={group}` to the unit (systemctl \
                         edit drain-agent), or remove control_group"
                    ),
                });
            }
        }
        for name in &self.interfaces {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                return Err(ConfigError {
                    path: self.path.clone(),
                    line: None,
                    key: Some("interfaces".into()),
                    message: format!(
                        "interface `{name}` does not exist on this node (see `ip link`); \
                         name the interface the API traffic arrives on"
                    ),
                });
            }
        }
        Ok(())
    }

    /// A backend by name.
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|backend| backend.name == name)
    }

    /// The backend serving a local port.
    pub fn backend_of_port(&self, port: u16) -> Option<usize> {
        self.backends
            .iter()
            .position(|backend| backend.ports.contains(&port))
    }
}

/// Whether this process may change a file it owns to group `gid`: with CAP_CHOWN, or as a
/// member of the group (chown(2)'s rule for owners).
fn can_give_files_to(gid: nix::unistd::Gid) -> bool {
    const CAP_CHOWN: u32 = 0;
    let has_chown = std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_CHOWN) != 0)
    });
    has_chown
        || nix::unistd::getegid() == gid
        || nix::unistd::getgroups().is_ok_and(|groups| groups.contains(&gid))
}

/// HAProxy proxy and server names are letters, digits and `-_.:`; anything else could split a
/// runtime API command (`;`, spaces, newlines) and is refused here rather than sent.
fn haproxy_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Ok(());
    }
    Err(format!(
        "{name:?} is not an HAProxy name: use letters, digits and - _ . : as in the HAProxy \
         config's `backend` and `server` lines"
    ))
}

/// Adds "did you mean `x`?" to serde's "unknown field `y`, expected one of `a`, `b`" (and
/// "unknown variant") messages when one expected name is close to the one given.
fn did_you_mean(message: &str) -> String {
    let quoted: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    let Some((given, expected)) = quoted.split_first() else {
        return message.to_string();
    };
    if !message.starts_with("unknown field") && !message.starts_with("unknown variant") {
        return message.to_string();
    }
    let best = expected
        .iter()
        .map(|candidate| (edit_distance(given, candidate), *candidate))
        .min();
    match best {
        Some((distance, candidate)) if distance <= given.len().max(3) / 3 + 1 => {
            format!("{message}; did you mean `{candidate}`?")
        }
        _ => message.to_string(),
    }
}

/// Levenshtein distance (names are short; quadratic is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

/// 1-based line of the first occurrence of `needle` in `text` (for problems found after
/// parsing, e.g. on a load balancer).
pub fn line_containing(text: &str, needle: &str) -> Option<usize> {
    text.find(needle).map(|offset| line_of(text, offset))
}

/// "unix:/path" or "tcp:host:port".
fn parse_runtime_api(text: &str) -> Result<RuntimeApi, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.starts_with('/') {
            return Ok(RuntimeApi::Unix(PathBuf::from(path)));
        }
    } else if let Some(address) = text.strip_prefix("tcp:") {
        if address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
        }) {
            return Ok(RuntimeApi::Tcp(address.to_string()));
        }
    }
    Err(format!(
        "`{text}` is not a runtime API address: use \"unix:/run/haproxy/admin.sock\" or \
         \"tcp:192.0.2.10:9999\""
    ))
}

/// "http://host:port/path" (plain HTTP: the check runs on the node itself).
fn parse_http_probe(url: &str, expect: u16) -> Result<Probe, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("`{url}` must start with http:// (use a `tcp` check for TLS-only services)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    let address = if has_port {
        authority.to_string()
    } else if !authority.is_empty() && !authority.contains(':') {
        format!("{authority}:80")
    } else {
        return Err(format!("`{url}` has no usable host"));
    };
    if !(100..=599).contains(&expect) {
        return Err(format!("expect = {expect} is not an HTTP status"));
    }
    Ok(Probe::Http {
        url: url.to_string(),
        address,
        host: authority.to_string(),
        path: path.to_string(),
        expect,
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces = ["eth0"]
control_socket = "/tmp/x.sock"
quiet_period = "100ms"

[[backend]]
name = "nova-api"
ports = [8774]

[[backend]]
name = "placement"
ports = [8778, 8779]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agent.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.interfaces, ["eth0"]);
        assert_eq!(config.quiet_period, Duration::from_millis(100));
        assert_eq!(config.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(config.backends[1].ports, [8778, 8779]);
        assert_eq!(config.backend_of_port(8779), Some(1));
        assert_eq!(config.backend_of_port(80), None);
    }

    #[test]
    fn minimal_config_from_the_readme_parses() {
        let config =
            parse("interfaces = [\"eth0\"]\n[[backend]]\nname = \"nova-api\"\nports = [8774]\n")
                .unwrap();
        assert_eq!(config.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(config.quiet_period, DEFAULT_QUIET_PERIOD);
    }

    #[test]
    fn port_out_of_range_names_line_and_key() {
        let text = GOOD.replace("[8774]", "[87740]");
        assert_eq!(
            error(&text),
            "agent.toml:8: backend[0].ports: port 87740 is out of range: use 1 to 65535"
        );
    }

    #[test]
    fn port_zero_is_rejected() {
        assert!(error(&GOOD.replace("[8774]", "[0]")).contains("port 0 is out of range"));
    }

    #[test]
    fn duplicate_port_across_backends_names_the_owner() {
        let text = GOOD.replace("[8778, 8779]", "[8778, 8774]");
        assert_eq!(
            error(&text),
            "agent.toml:12: backend[1].ports: port 8774 is already used by backend `nova-api`: \
             a port belongs to one backend"
        );
    }

    #[test]
    fn duplicate_port_within_a_backend() {
        let text = GOOD.replace("[8774]", "[8774, 8774]");
        assert!(error(&text).contains("port 8774 is listed twice for backend `nova-api`"));
    }

    #[test]
    fn unknown_key_names_the_line() {
        let text = GOOD.replace("quiet_period", "quiet_periode");
        let message = error(&text);
        assert!(
            message.starts_with("agent.toml:4: unknown field `quiet_periode`"),
            "{message}"
        );
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let text = GOOD.replace("ports = [8774]", "ports = [8774");
        assert!(error(&text).starts_with("agent.toml:"), "{}", error(&text));
    }

    #[test]
    fn wrong_type_names_the_line() {
        let text = GOOD.replace("[8774]", "\"8774\"");
        let message = error(&text);
        assert!(message.starts_with("agent.toml:8:"), "{message}");
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn bad_duration_is_rejected() {
        let message = error(&GOOD.replace("\"100ms\"", "\"soon\""));
        assert!(message.starts_with("agent.toml:4:"), "{message}");
    }

    #[test]
    fn missing_interfaces_and_backends_explain_the_fix() {
        assert!(error("[[backend]]\nname = \"a\"\nports = [1]\n").contains("interfaces: missing"));
        assert!(error("interfaces = []\n").contains("list at least one interface"));
        assert!(error("interfaces = [\"eth0\"]\n").contains("add a [[backend]] table"));
    }

    #[test]
    fn duplicate_backend_name() {
        let text = GOOD.replace("\"placement\"", "\"nova-api\"");
        assert!(error(&text).contains("backend `nova-api` is defined twice"));
    }

    #[test]
    fn unknown_interface_is_a_host_error() {
        let text = GOOD.replace("eth0", "nosuchif0");
        let config = parse(&text).unwrap();
        let message = config.check_host().unwrap_err().to_string();
        assert_eq!(
            message,
            "agent.toml: interfaces: interface `nosuchif0` does not exist on this node \
             (see `ip link`); name the interface the API traffic arrives on"
        );
    }

    const DRAIN: &str = r#"
interfaces = ["eth0"]
agent_check_listen = "0.0.0.0:9500"

[[load_balancer]]
name = "lb1"
runtime_api = "unix:/run/haproxy/admin.sock"

[[load_balancer]]
name = "lb2"
runtime_api = "tcp:192.0.2.10:9999"

[[backend]]
name = "nova-api"
ports = [8774]
haproxy = { backend = "nova-api", server = "controller" }
min_serving = 1
drain_timeout = "2m"
on_timeout = "force"
restart = { systemd_unit = "nova-api.service" }
health = { http = "http://127.0.0.1:8774/healthz", expect = 200, timeout = "60s" }
rollback = { command = ["/usr/local/bin/rollback", "nova-api"] }
"#;

    #[test]
    fn drain_settings_parse() {
        let config = parse(DRAIN).unwrap();
        assert_eq!(
            config.agent_check_listen,
            Some("0.0.0.0:9500".parse().unwrap())
        );
        assert_eq!(
            config.load_balancers[0].runtime_api,
            RuntimeApi::Unix("/run/haproxy/admin.sock".into())
        );
        assert_eq!(
            config.load_balancers[1].runtime_api,
            RuntimeApi::Tcp("192.0.2.10:9999".into())
        );
        let backend = config.backend("nova-api").unwrap();
        assert_eq!(
            backend.haproxy,
            Some(HaproxyServer {
                backend: "nova-api".into(),
                server: "controller".into()
            })
        );
        assert_eq!(backend.drain_timeout, Duration::from_secs(120));
        assert_eq!(backend.on_timeout, OnTimeout::Force);
        assert_eq!(
            backend.restart.as_ref().unwrap().action,
            Action::SystemdUnit("nova-api.service".into())
        );
        let Probe::Http {
            address,
            path,
            expect,
            ..
        } = &backend.health.as_ref().unwrap().probe
        else {
            panic!("http probe expected");
        };
        assert_eq!(
            (address.as_str(), path.as_str(), *expect),
            ("127.0.0.1:8774", "/healthz", 200)
        );
        assert_eq!(
            backend.rollback.as_ref().unwrap().action,
            Action::Command(vec!["/usr/local/bin/rollback".into(), "nova-api".into()])
        );
    }

    #[test]
    fn drain_settings_reject_bad_values() {
        for (from, to, expected) in [
            (
                "unix:/run/haproxy/admin.sock",
                "unix:admin.sock",
                "load_balancer[0].runtime_api: `unix:admin.sock` is not a runtime API address",
            ),
            (
                "tcp:192.0.2.10:9999",
                "192.0.2.10:9999",
                "load_balancer[1].runtime_api",
            ),
            (
                "on_timeout = \"force\"",
                "on_timeout = \"later\"",
                "unknown variant `later`",
            ),
            (
                "{ systemd_unit = \"nova-api.service\" }",
                "{ }",
                "backend[0].restart: give exactly one of",
            ),
            (
                "http = \"http://127.0.0.1:8774/healthz\"",
                "http = \"https://x/\"",
                "must start with http://",
            ),
            (
                "\"0.0.0.0:9500\"",
                "\"9500\"",
                "agent_check_listen: `9500` is not an address:port",
            ),
            (
                "min_serving = 1",
                "min_serving = -1",
                "backend[0].min_serving: -1 is not a server count",
            ),
            (
                "name = \"lb2\"",
                "name = \"lb1\"",
                "load balancer name \"lb1\" is empty or used twice",
            ),
        ] {
            assert!(DRAIN.contains(from), "{from}");
            let message = error(&DRAIN.replace(from, to));
            assert!(
                message.contains(expected),
                "{expected:?} not in {message:?}"
            );
        }
    }

    #[test]
    fn haproxy_server_without_load_balancer_is_an_error() {
        let text: String = DRAIN
            .lines()
            .filter(|line| {
                !line.contains("runtime_api")
                    && !line.contains("load_balancer")
                    && !line.starts_with("name = \"lb")
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            error(&text).contains("no [[load_balancer]] is configured"),
            "{}",
            error(&text)
        );
    }

    #[test]
    fn unreadable_file_names_the_file() {
        let message = Config::load(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("/nonexistent/agent.toml: cannot read the config file"));
    }
}
