//! The agent's TOML configuration.
//!
//! `raw.rs` is the schema (each value checked by its type, so toml locates its errors),
//! `validate.rs` the defaults and the rules between values, `error.rs` the located error.
//! Every error names the file, the line, the key and the value, and says what would be valid,
//! so an operator can fix it before a maintenance window rather than during one.

mod error;
mod raw;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use error::Locator;
pub use error::{ConfigError, ConfigErrors};

/// Where `run` and `check-config` read the config unless told otherwise (the shipped unit's
/// path too).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/drain-agent/config.toml";
/// Where the operation journal lives unless the config says otherwise (the unit's
/// `StateDirectory=drain-agent`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/drain-agent";
/// Where the control socket lives unless the config says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/drain-agent/control.sock";
/// How long in-flight must stay at 0 before a backend counts as quiet.
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_millis(50);
/// How long a tracked connection may go without packets before the garbage collector checks
/// whether its socket still exists.
pub const DEFAULT_FLOW_IDLE_CHECK: Duration = Duration::from_secs(60);
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
    /// Most connections the table of seeded connections (older than the agent, or untracked)
    /// holds.
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
    /// Where the operation journal is kept (survives the agent's crash).
    pub state_dir: PathBuf,
    /// What a restarted agent does with an operation the previous one left unfinished.
    pub on_restart: OnRestart,
    /// HAProxy instances in front of this node.
    pub load_balancers: Vec<LoadBalancer>,
    /// The API services on this node.
    pub backends: Vec<Backend>,
    /// The line of each key that checks after parsing may name (`interfaces[0]`,
    /// `control_group`, `load_balancer[0].runtime_api`, `backend[0].haproxy`), so they never
    /// read the file again.
    pub lines: BTreeMap<String, usize>,
}

/// One HAProxy instance and how to reach its runtime API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancer {
    pub name: String,
    pub runtime_api: RuntimeApi,
    /// Deadline for one runtime API command.
    pub timeout: Duration,
}

/// Address of an HAProxy runtime API ("stats socket"): "unix:/path" or "tcp:host:port".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
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

/// What a restarted agent does with a drain or cycle the previous agent left unfinished (it
/// crashed, or was killed). A restart that was under way is always verified first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRestart {
    /// Undo it: put the server back in service (after a health check if the service was being
    /// restarted; the rollback path if that fails). The safe default: capacity comes back.
    Restore,
    /// Finish it: drain again (with what the restarted agent can see) and carry a cycle on to
    /// its restart, verification and return.
    Finish,
}

impl OnRestart {
    /// The value as the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRestart::Restore => "restore",
            OnRestart::Finish => "finish",
        }
    }
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
    /// GET `url` (http:// or https://); healthy on status `expect`.
    Http {
        url: reqwest::Url,
        /// The name to ask for instead of the URL's host: the Host header and, over https,
        /// the name the certificate must carry. The connection still goes to the URL's host.
        host: Option<String>,
        /// A PEM file of CA certificates trusted besides the system's roots.
        ca: Option<PathBuf>,
        expect: u16,
    },
    /// A TCP connection to host:port succeeds.
    Tcp(String),
}

/// One API service on this node: where it listens, and how to drain, restart and verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Name the operator uses for it (CLI, status, agent-send).
    pub name: String,
    /// Local TCP ports: those of `listen`, once each.
    pub ports: Vec<u16>,
    /// The addresses and ports its service listens on (`listen`); from `ports`, each port on
    /// every address. Another listener on the same port at another address (HAProxy's
    /// frontend on the VIP) is not the backend's.
    pub listen: Vec<ServiceAddress>,
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
    /// The kernel gate: while the backend drains, new connections from other sources are
    /// refused with a RST (docs/gate.md).
    pub gate: Option<Gate>,
    /// The same-host handover: how the next version starts beside this one and how the
    /// old one stops (docs/handover.md).
    pub handover: Option<Handover>,
}

/// An address and port a backend's service listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddress {
    /// `None`: every address of the node (a wildcard listener, or `ports = [...]`). IPv4 as
    /// IPv4 (an IPv4-mapped address is taken as the IPv4 one).
    pub addr: Option<std::net::IpAddr>,
    pub port: u16,
}

impl ServiceAddress {
    /// Whether a socket bound to `local` is on this address and port.
    pub fn covers(&self, local: std::net::SocketAddr) -> bool {
        local.port() == self.port
            && self
                .addr
                .is_none_or(|addr| addr == local.ip().to_canonical())
    }
}

impl std::fmt::Display for ServiceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            None => write!(f, "*:{}", self.port),
            Some(addr) => write!(f, "{}", std::net::SocketAddr::new(addr, self.port)),
        }
    }
}

impl Backend {
    /// Whether a connection or listener with local address `local` is this backend's.
    pub fn serves(&self, local: std::net::SocketAddr) -> bool {
        self.listen.iter().any(|listen| listen.covers(local))
    }

    /// Whether the backend listens on given addresses only (not every address of a port).
    pub fn address_bound(&self) -> bool {
        self.listen.iter().any(|listen| listen.addr.is_some())
    }

    /// Where a plain TCP connection reaches the service: its first listen address, or the
    /// loopback on its first port.
    pub fn local_address(&self) -> std::net::SocketAddr {
        let first = self.listen[0];
        let addr = first
            .addr
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        std::net::SocketAddr::new(addr, first.port)
    }
}

/// How a backend hands over to a new version of its service on the same node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub how: HandoverHow,
    /// Deadline of each start or stop command, and of the old version's exit after `stop`.
    pub timeout: Duration,
}

/// The two forms of `handover`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverHow {
    /// `start` launches the new version (listening on the same port with SO_REUSEPORT);
    /// `stop` ends the old one gracefully, with `DRAIN_AGENT_PIDS` naming its processes
    /// (without it: SIGTERM to the old version's main process).
    Commands {
        start: Vec<String>,
        stop: Option<Vec<String>>,
    },
    /// Two systemd units (e.g. template instances `nova-api@blue`, `nova-api@green`): the
    /// inactive one is started, the active one stopped once it is quiet.
    Units([String; 2]),
}

/// Deadline of a handover's start and stop unless the backend says otherwise.
pub const DEFAULT_HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// A backend's kernel gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// Sources whose new connections a closed gate still accepts (typically the load
    /// balancers, whose health checks must keep working).
    pub allow: Vec<ipnet::IpNet>,
    /// How long a closed gate stays closed at most, when the operator sets it; otherwise
    /// computed from the backend's budgets.
    pub deadline: Option<Duration>,
}

/// Added to a closed gate's deadline beyond the operation's own budgets.
pub const GATE_MARGIN: Duration = Duration::from_secs(30);

impl Backend {
    /// How long a gate closed for this backend stays closed at most: the drain's timeout, the
    /// restart's and the rollback's, two health checks (after each), and a margin. The kernel
    /// opens it by itself then, so an agent that hangs cannot keep the node closed.
    pub fn gate_deadline(&self) -> Duration {
        if let Some(deadline) = self.gate.as_ref().and_then(|gate| gate.deadline) {
            return deadline;
        }
        let step = |step: &Option<Step>| step.as_ref().map_or(Duration::ZERO, |s| s.timeout);
        let health = self
            .health
            .as_ref()
            .map_or(DEFAULT_HEALTH_TIMEOUT, |health| health.timeout);
        self.drain_timeout + step(&self.restart) + step(&self.rollback) + health * 2 + GATE_MARGIN
    }
}

/// How long in-flight work may take to finish unless the backend says otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Other servers that must stay UP, for a backend with `haproxy` (without it: 0).
pub const DEFAULT_MIN_SERVING: u32 = 1;
/// Deadline of a restart or rollback step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restarted service has to pass its health check.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one runtime API command.
pub const DEFAULT_RUNTIME_API_TIMEOUT: Duration = Duration::from_secs(5);

impl Config {
    /// Reads and validates a config file; the error lists every problem found. Does not
    /// look at the host (see [`Config::check_host`]).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            path: path.to_owned(),
            line: None,
            key: None,
            message: format!(
                "cannot read the config file: {err} (`run --config FILE` and `check-config \
                 FILE` name another; the default is {DEFAULT_CONFIG_FILE})"
            ),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` is only used in messages. Every problem is
    /// reported, in the order of the file's lines: a wrong value does not hide the next one.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let at = Locator { path, text };
        let mut unknown = Vec::new();
        let raw: raw::RawConfig =
            serde_ignored::deserialize(toml::Deserializer::new(text), |ignored| {
                unknown.push(error::segments(&ignored));
            })
            .map_err(|err| at.syntax_error(err))?;
        let mut errors: Vec<ConfigError> = unknown
            .iter()
            .map(|path| at.unknown_key(path, raw::fields_of_table(path)))
            .collect();
        match validate::validate(&at, raw) {
            Ok(config) if errors.is_empty() => return Ok(config),
            Ok(_) => {}
            Err(more) => errors.extend(more),
        }
        errors.sort_by_key(|error| error.line.unwrap_or(usize::MAX));
        Err(ConfigErrors(errors))
    }

    /// Checks what depends on this node: every interface exists here, the control group
    /// too, and each CA file holds certificates. Every problem is reported.
    pub fn check_host(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if let Some(group) = &self.control_group {
            match nix::unistd::Group::from_name(group) {
                Ok(Some(entry)) if !can_give_files_to(entry.gid) => errors.push(self.error_at(
                    "control_group",
                    format!(
                        "the agent cannot hand the control socket to group `{group}`: it has \
                         no CAP_CHOWN (the shipped unit does not grant it) and is not a member \
                         of `{group}`. Add `SupplementaryGroups={group}` to the unit (systemctl \
                         edit drain-agent), or remove control_group"
                    ),
                )),
                Ok(Some(_)) => {}
                _ => errors.push(self.error_at(
                    "control_group",
                    format!(
                        "group `{group}` does not exist on this node (see `getent group`): \
                         create it, or name an existing group"
                    ),
                )),
            }
        }
        for (index, name) in self.interfaces.iter().enumerate() {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                errors.push(self.error_at(
                    &format!("interfaces[{index}]"),
                    format!(
                        "interface `{name}` does not exist on this node (see `ip link`); \
                         name the interface the API traffic arrives on"
                    ),
                ));
            }
        }
        for (index, backend) in self.backends.iter().enumerate() {
            let Some(HealthCheck {
                probe: Probe::Http { ca: Some(ca), .. },
                ..
            }) = &backend.health
            else {
                continue;
            };
            let problem = match std::fs::read(ca) {
                Err(err) => Some(format!("cannot read {}: {err}", ca.display())),
                Ok(pem) => reqwest::Certificate::from_pem_bundle(&pem)
                    .ok()
                    .filter(|certificates| !certificates.is_empty())
                    .is_none()
                    .then(|| format!("{} holds no PEM certificate", ca.display())),
            };
            if let Some(problem) = problem {
                errors.push(self.error_at(
                    &format!("backend[{index}].health.ca"),
                    format!(
                        "{problem}: name a readable PEM file with the CA certificate(s) of \
                         the service's certificate"
                    ),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// An error about `key`, on the line the key was read from (when remembered).
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: self.lines.get(key).copied(),
            key: Some(key.to_string()),
            message: message.into(),
        }
    }

    /// A backend by name.
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|backend| backend.name == name)
    }

    /// The backend a connection or listener with local address `local` belongs to.
    pub fn backend_serving(&self, local: std::net::SocketAddr) -> Option<usize> {
        self.backends
            .iter()
            .position(|backend| backend.serves(local))
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

#[cfg(test)]
mod tests {
    use drain_agent_common::DEFAULT_FLOW_TABLE_SIZE;

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

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(Path::new("agent.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn a_backend_is_its_listen_addresses_and_a_wildcard_keeps_the_port_on_every_address() {
        let with = |listen: &str| GOOD.replacen("ports = [8774]", listen, 1);
        let config = parse(&with(
            "listen = [\"10.0.0.5:8774\", \"[fd00::5]:8774\", \"[::ffff:10.0.0.6]:8775\"]",
        ))
        .unwrap();
        let backend = &config.backends[0];
        assert_eq!(backend.ports, [8774, 8775]);
        assert!(backend.address_bound());
        assert!(backend.serves("10.0.0.5:8774".parse().unwrap()));
        assert!(backend.serves("[::ffff:10.0.0.5]:8774".parse().unwrap()));
        assert!(backend.serves("[fd00::5]:8774".parse().unwrap()));
        assert!(backend.serves("10.0.0.6:8775".parse().unwrap()));
        assert!(
            !backend.serves("192.0.2.10:8774".parse().unwrap()),
            "the VIP"
        );
        assert!(!backend.serves("[::]:8774".parse().unwrap()));
        assert_eq!(backend.local_address(), "10.0.0.5:8774".parse().unwrap());
        for wildcard in ["*:8774", "0.0.0.0:8774", "[::]:8774"] {
            let config = parse(&with(&format!("listen = [\"{wildcard}\"]"))).unwrap();
            let backend = &config.backends[0];
            assert!(!backend.address_bound(), "{wildcard}");
            assert!(
                backend.serves("192.0.2.10:8774".parse().unwrap()),
                "{wildcard}"
            );
            assert_eq!(backend.listen[0].to_string(), "*:8774");
        }
        for (listen, message) in [
            (
                "ports = [8774]\nlisten = [\"10.0.0.5:8774\"]",
                "backend[0].listen: backend `nova-api` has both `ports` and `listen`",
            ),
            (
                "listen = [\"10.0.0.5\"]",
                "backend[0].listen[0]: `10.0.0.5` is not an address:port the service listens on",
            ),
            (
                "listen = [\"*:8774\", \"10.0.0.5:8774\"]",
                "backend[0].listen[1]: `10.0.0.5:8774` overlaps `*:8774`",
            ),
            (
                "listen = [\"10.0.0.5:8774\", \"10.0.0.5:8774\"]",
                "`10.0.0.5:8774` is listed twice",
            ),
            ("listen = []", "has no listen addresses"),
            (
                "listen = [\"10.0.0.5:0\"]",
                "port 0 in `10.0.0.5:0` is out of range",
            ),
            ("name2 = 1", "missing field `listen`"),
        ] {
            let text = with(listen);
            let text = if listen.starts_with("name2") {
                text.replace("name2 = 1", "")
            } else {
                text
            };
            let found = error(&text);
            assert!(found.contains(message), "{listen}: {found}");
        }
        let two = format!("{GOOD}\n[[backend]]\nname = \"other\"\nlisten = [\"10.0.0.9:8774\"]\n");
        assert!(
            error(&two).contains("port 8774 is already used by backend `nova-api`"),
            "{}",
            error(&two)
        );
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.interfaces, ["eth0"]);
        assert_eq!(config.quiet_period, Duration::from_millis(100));
        assert_eq!(config.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(config.backends[1].ports, [8778, 8779]);
        assert_eq!(
            config.backend_serving("10.0.0.5:8779".parse().unwrap()),
            Some(1)
        );
        assert_eq!(config.backend_serving("[::1]:80".parse().unwrap()), None);
    }

    #[test]
    fn minimal_config_from_the_readme_parses() {
        let config =
            parse("interfaces = [\"eth0\"]\n[[backend]]\nname = \"nova-api\"\nports = [8774]\n")
                .unwrap();
        assert_eq!(config.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(config.quiet_period, DEFAULT_QUIET_PERIOD);
        assert_eq!(config.backends[0].min_serving, 0);
    }

    #[test]
    fn port_out_of_range_names_line_and_key() {
        let text = GOOD.replace("[8774]", "[87740]");
        assert_eq!(
            error(&text),
            "agent.toml:8: backend[0].ports[0]: port 87740 is out of range: use 1 to 65535"
        );
    }

    #[test]
    fn duplicate_port_across_backends_names_the_owner() {
        let text = GOOD.replace("[8778, 8779]", "[8778, 8774]");
        assert_eq!(
            error(&text),
            "agent.toml:12: backend[1].ports[1]: port 8774 is already used by backend \
             `nova-api`: a port belongs to one backend"
        );
    }

    #[test]
    fn a_wrong_duration_names_file_line_key_and_value_and_shows_valid_ones() {
        let text = GOOD.replace("quiet_period = \"100ms\"", "quiet_period = \"5 parsecs\"");
        assert_eq!(
            error(&text),
            "agent.toml:4: quiet_period: \"5 parsecs\" is not a duration (e.g. \"30s\", \"2m\")"
        );
    }

    #[test]
    fn unknown_key_names_the_line() {
        let text = GOOD.replace("quiet_period", "quiet_periode");
        let message = error(&text);
        assert!(
            message.starts_with("agent.toml:4: unknown field `quiet_periode`"),
            "{message}"
        );
        assert!(
            message.ends_with("did you mean `quiet_period`?"),
            "{message}"
        );
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let text = GOOD.replace("ports = [8774]", "ports = [8774");
        assert!(error(&text).starts_with("agent.toml:"), "{}", error(&text));
    }

    #[test]
    fn missing_interfaces_and_backends_explain_the_fix() {
        assert!(error("[[backend]]\nname = \"a\"\nports = [1]\n").contains("interfaces: missing"));
        assert!(error("interfaces = []\n").contains("list at least one interface"));
        assert!(error("interfaces = [\"eth0\"]\n").contains("add a [[backend]] table"));
    }

    #[test]
    fn a_gate_is_read_with_its_allow_list_and_its_deadline_defaults_to_the_backends_budgets() {
        let text = GOOD.replacen(
            "ports = [8774]",
            "ports = [8774]\ngate = { allow = [\"192.0.2.10\", \"2001:db8::/64\"] }",
            1,
        );
        let config = parse(&text).unwrap();
        let backend = &config.backends[0];
        let gate = backend.gate.as_ref().expect("the gate");
        assert_eq!(gate.allow.len(), 2);
        assert_eq!(gate.deadline, None);
        let restart = backend
            .restart
            .as_ref()
            .map_or(Duration::ZERO, |s| s.timeout);
        let rollback = backend
            .rollback
            .as_ref()
            .map_or(Duration::ZERO, |s| s.timeout);
        let health = backend
            .health
            .as_ref()
            .map_or(DEFAULT_HEALTH_TIMEOUT, |h| h.timeout);
        assert_eq!(
            backend.gate_deadline(),
            backend.drain_timeout + restart + rollback + health * 2 + GATE_MARGIN
        );
        let set = parse(&text.replace(
            "\"2001:db8::/64\"] }",
            "\"2001:db8::/64\"], deadline = \"90s\" }",
        ))
        .unwrap();
        assert_eq!(set.backends[0].gate_deadline(), Duration::from_secs(90));
    }

    #[test]
    fn a_bad_gate_names_its_key_and_the_fix() {
        let text = GOOD.replacen(
            "ports = [8774]",
            "ports = [8774]\ngate = { allow = [\"lb1\"] }",
            1,
        );
        assert!(
            error(&text).contains("backend[0].gate.allow[0]: `lb1` is not an address or network"),
            "{}",
            error(&text)
        );
        let missing = GOOD.replacen("ports = [8774]", "ports = [8774]\ngate = {}", 1);
        assert!(
            error(&missing).contains("backend[0].gate: missing field `allow`"),
            "{}",
            error(&missing)
        );
    }

    #[test]
    fn a_handover_is_read_in_both_forms_with_its_timeout() {
        let health = "health = { http = \"http://127.0.0.1:8774/healthz\" }";
        let commands = GOOD.replacen(
            "ports = [8774]",
            &format!(
                "ports = [8774]\n{health}\nhandover = {{ start = [\"/bin/start-beside\"], \
                 stop = [\"/bin/stop-old\"], timeout = \"20s\" }}"
            ),
            1,
        );
        let handover = parse(&commands).unwrap().backends[0]
            .handover
            .clone()
            .unwrap();
        assert_eq!(handover.timeout, Duration::from_secs(20));
        assert_eq!(
            handover.how,
            HandoverHow::Commands {
                start: vec!["/bin/start-beside".into()],
                stop: Some(vec!["/bin/stop-old".into()]),
            }
        );
        let units = GOOD.replacen(
            "ports = [8774]",
            &format!(
                "ports = [8774]\n{health}\nhandover = {{ units = [\"nova-api@blue\", \
                 \"nova-api@green\"] }}"
            ),
            1,
        );
        let handover = parse(&units).unwrap().backends[0].handover.clone().unwrap();
        assert_eq!(handover.timeout, DEFAULT_HANDOVER_TIMEOUT);
        assert_eq!(
            handover.how,
            HandoverHow::Units(["nova-api@blue".into(), "nova-api@green".into()])
        );
    }

    #[test]
    fn a_bad_handover_names_its_key_and_the_fix() {
        let with = |backend: &str| GOOD.replacen("ports = [8774]", backend, 1);
        let no_health = with("ports = [8774]\nhandover = { start = [\"/bin/x\"] }");
        assert!(
            error(&no_health).contains("backend[0].handover: a handover verifies the new version"),
            "{}",
            error(&no_health)
        );
        let health = "health = { http = \"http://127.0.0.1:8774/\" }";
        let both = with(&format!(
            "ports = [8774]\n{health}\nhandover = {{ start = [\"/bin/x\"], units = [\"a\", \"b\"] }}"
        ));
        assert!(
            error(&both).contains("both `start` and `units` are given"),
            "{}",
            error(&both)
        );
        let one_unit = with(&format!(
            "ports = [8774]\n{health}\nhandover = {{ units = [\"a@blue\"] }}"
        ));
        assert!(
            error(&one_unit)
                .contains("backend[0].handover.units: `units` names two different units"),
            "{}",
            error(&one_unit)
        );
        let ipv6 = with(
            "ports = [8774]\nhealth = { http = \"http://[::1]:8774/\" }\nhandover = { start = [\"/bin/x\"] }",
        );
        assert!(
            error(&ipv6).contains("check the service over IPv4"),
            "{}",
            error(&ipv6)
        );
    }

    #[test]
    fn duplicate_backend_name() {
        let text = GOOD.replace("\"placement\"", "\"nova-api\"");
        assert_eq!(
            error(&text),
            "agent.toml:11: backend[1].name: backend `nova-api` is defined twice: give each \
             [[backend]] its own name"
        );
    }

    #[test]
    fn unknown_interface_is_a_host_error_on_its_line() {
        let text = GOOD.replace("eth0", "nosuchif0");
        let config = parse(&text).unwrap();
        let message = config.check_host().unwrap_err().to_string();
        assert_eq!(
            message,
            "agent.toml:2: interfaces[0]: interface `nosuchif0` does not exist on this node \
             (see `ip link`); name the interface the API traffic arrives on"
        );
    }

    /// Every key, one per line, so each bad value below has a known line.
    const FULL: &str = r#"interfaces = ["lo"]
control_socket = "/run/drain-agent/control.sock"
quiet_period = "50ms"
flow_table_size = 262144
flow_idle_check = "60s"
agent_check_listen = "0.0.0.0:9500"
agent_check_interval = "2s"
agent_check_allow = ["10.0.0.0/24", "fd00::1"]
agent_check_max_connections = 256
shutdown_timeout = "4m"
metrics_listen = "127.0.0.1:9477"
control_group = "drain-operators"
on_shutdown = "abort"
state_dir = "/var/lib/drain-agent"
on_restart = "restore"

[[load_balancer]]
name = "lb1"
runtime_api = "unix:/run/haproxy/admin.sock"
timeout = "5s"

[[backend]]
name = "nova-api"
ports = [8774]
haproxy = { backend = "nova-api", server = "controller" }
min_serving = 1
drain_timeout = "2m"
on_timeout = "abort"
restart = { systemd_unit = "nova-api.service", timeout = "2m" }
health = { http = "https://127.0.0.1:8774/healthz", expect = 200, host = "api.internal", ca = "/etc/drain-agent/ca.pem", timeout = "60s" }
rollback = { command = ["/usr/local/bin/rollback", "nova-api"], timeout = "2m" }
"#;

    #[test]
    fn every_key_parses_from_the_full_example() {
        let config = parse(FULL).unwrap();
        assert_eq!(config.agent_check_allow.len(), 2);
        assert_eq!(config.control_group.as_deref(), Some("drain-operators"));
        let backend = &config.backends[0];
        assert_eq!(
            backend.health.as_ref().unwrap().probe,
            Probe::Http {
                url: "https://127.0.0.1:8774/healthz".parse().unwrap(),
                host: Some("api.internal".into()),
                ca: Some("/etc/drain-agent/ca.pem".into()),
                expect: 200,
            }
        );
        // The lines later checks name are kept, so nothing reads the file again.
        assert_eq!(config.lines["interfaces[0]"], 1);
        assert_eq!(config.lines["control_group"], 12);
        assert_eq!(config.lines["load_balancer[0].runtime_api"], 19);
        assert_eq!(config.lines["backend[0].haproxy"], 25);
        assert_eq!(config.lines["backend[0].health.ca"], 30);
    }

    #[test]
    fn every_keys_bad_values_are_refused_with_file_line_key_value_and_what_is_valid() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[\"lo\"]",
                "[\"eth0/1\"]",
                "agent.toml:1: interfaces[0]: \"eth0/1\" is not an interface name: use the name `ip link` shows, e.g. \"eth0\"",
            ),
            (
                "[\"lo\"]",
                "[\"a-very-long-name0\"]",
                "agent.toml:1: interfaces[0]: \"a-very-long-name0\" is not an interface name",
            ),
            (
                "[\"lo\"]",
                "[]",
                "agent.toml:1: interfaces: [] names no interface: list at least one",
            ),
            (
                "[\"lo\"]",
                "\"lo\"",
                "agent.toml:1: interfaces: invalid type: string \"lo\", expected a sequence",
            ),
            (
                "[\"lo\"]",
                "[\"lo\", \"lo\"]",
                "agent.toml:1: interfaces[1]: interface `lo` is listed twice",
            ),
            (
                "\"/run/drain-agent/control.sock\"",
                "\"control.sock\"",
                "agent.toml:2: control_socket: \"control.sock\" is not a socket path: use an absolute path of at most 107 bytes, e.g. \"/run/drain-agent/control.sock\"",
            ),
            (
                "\"50ms\"",
                "\"soon\"",
                "agent.toml:3: quiet_period: \"soon\" is not a duration (e.g. \"30s\", \"2m\")",
            ),
            (
                "\"50ms\"",
                "50",
                "agent.toml:3: quiet_period: 50 is not a duration (e.g. \"30s\", \"2m\")",
            ),
            (
                "262144",
                "10",
                "agent.toml:4: flow_table_size: 10 is out of range: use 1024 to 16777216 connections",
            ),
            (
                "262144",
                "\"big\"",
                "agent.toml:4: flow_table_size: \"big\" is not a table size: use 1024 to 16777216 connections",
            ),
            (
                "\"60s\"",
                "\"0s\"",
                "agent.toml:5: flow_idle_check: \"0s\" is not an interval or a timeout: use more than 0",
            ),
            (
                "\"0.0.0.0:9500\"",
                "\"9500\"",
                "agent.toml:6: agent_check_listen: `9500` is not an address:port to listen on: use an IP address and a port, e.g. \"0.0.0.0:9500\"",
            ),
            (
                "agent_check_interval = \"2s\"",
                "agent_check_interval = \"0s\"",
                "agent.toml:7: agent_check_interval: \"0s\" is not an interval or a timeout: use more than 0, e.g. \"2s\"",
            ),
            (
                "agent_check_interval = \"2s\"",
                "agent_check_interval = \"often\"",
                "agent.toml:7: agent_check_interval: \"often\" is not a duration",
            ),
            (
                "\"10.0.0.0/24\"",
                "\"10.0.0.0/33\"",
                "agent.toml:8: agent_check_allow[0]: `10.0.0.0/33` is not an address or network, e.g. \"10.0.0.0/24\" or \"fd00::1\"",
            ),
            (
                "\"fd00::1\"",
                "\"lb1\"",
                "agent.toml:8: agent_check_allow[1]: `lb1` is not an address or network",
            ),
            (
                "= 256",
                "= 0",
                "agent.toml:9: agent_check_max_connections: 0 is out of range: use 1 to 65536",
            ),
            (
                "= 256",
                "= 100000",
                "agent.toml:9: agent_check_max_connections: 100000 is out of range: use 1 to 65536",
            ),
            (
                "\"4m\"",
                "\"4 parsecs\"",
                "agent.toml:10: shutdown_timeout: \"4 parsecs\" is not a duration (e.g. \"30s\", \"2m\")",
            ),
            (
                "\"127.0.0.1:9477\"",
                "\"localhost:9477\"",
                "agent.toml:11: metrics_listen: `localhost:9477` is not an address:port to listen on",
            ),
            (
                "\"127.0.0.1:9477\"",
                "\"127.0.0.1:9500\"",
                "agent.toml:11: metrics_listen: 127.0.0.1:9500 collides with agent_check_listen 0.0.0.0:9500: use another port",
            ),
            (
                "\"drain-operators\"",
                "\"drain operators\"",
                "agent.toml:12: control_group: \"drain operators\" is not a group name: use one word",
            ),
            (
                "on_shutdown = \"abort\"",
                "on_shutdown = \"later\"",
                "agent.toml:13: on_shutdown: unknown variant `later`, expected `abort` or `finish`",
            ),
            (
                "on_shutdown = \"abort\"",
                "on_shutdown = \"finsh\"",
                "did you mean `finish`?",
            ),
            (
                "\"/var/lib/drain-agent\"",
                "\"state\"",
                "agent.toml:14: state_dir: \"state\" is not an absolute path: name the journal's directory, e.g. \"/var/lib/drain-agent\"",
            ),
            (
                "on_restart = \"restore\"",
                "on_restart = \"resume\"",
                "agent.toml:15: on_restart: unknown variant `resume`, expected `restore` or `finish`",
            ),
            (
                "quiet_period",
                "quiet_periode",
                "agent.toml:3: unknown field `quiet_periode`",
            ),
            (
                "name = \"lb1\"",
                "name = \"\"",
                "agent.toml:18: load_balancer[0].name: \"\" is not a usable name: use a non-empty word",
            ),
            (
                "\"unix:/run/haproxy/admin.sock\"",
                "\"unix:admin.sock\"",
                "agent.toml:19: load_balancer[0].runtime_api: `unix:admin.sock` is not a runtime API address: use \"unix:/run/haproxy/admin.sock\" or \"tcp:192.0.2.10:9999\"",
            ),
            (
                "\"unix:/run/haproxy/admin.sock\"",
                "\"tcp:192.0.2.10\"",
                "agent.toml:19: load_balancer[0].runtime_api: `tcp:192.0.2.10` is not a runtime API address",
            ),
            (
                "timeout = \"5s\"",
                "timeout = \"0s\"",
                "agent.toml:20: load_balancer[0].timeout: \"0s\" is not an interval or a timeout",
            ),
            (
                "runtime_api =",
                "runtime_apo =",
                "agent.toml:19: load_balancer[0]: unknown field `runtime_apo`",
            ),
            (
                "name = \"nova-api\"",
                "name = \"nova api\"",
                "agent.toml:23: backend[0].name: \"nova api\" is not a usable name",
            ),
            (
                "[8774]",
                "[0]",
                "agent.toml:24: backend[0].ports[0]: port 0 is out of range: use 1 to 65535",
            ),
            (
                "[8774]",
                "[87740]",
                "agent.toml:24: backend[0].ports[0]: port 87740 is out of range: use 1 to 65535",
            ),
            (
                "[8774]",
                "[\"8774\"]",
                "agent.toml:24: backend[0].ports[0]: \"8774\" is not a port: use 1 to 65535",
            ),
            (
                "[8774]",
                "\"8774\"",
                "agent.toml:24: backend[0].ports: invalid type: string \"8774\", expected a sequence",
            ),
            (
                "[8774]",
                "[]",
                "agent.toml:24: backend[0].ports: backend `nova-api` has no ports: list the TCP ports it serves",
            ),
            (
                "[8774]",
                "[8774, 8774]",
                "agent.toml:24: backend[0].ports[1]: port 8774 is listed twice for backend `nova-api`",
            ),
            (
                "server = \"controller\"",
                "server = \"ctl;shutdown\"",
                "agent.toml:25: backend[0].haproxy.server: \"ctl;shutdown\" is not an HAProxy name: use letters, digits and - _ . :",
            ),
            (
                "backend = \"nova-api\"",
                "backend = \"\"",
                "agent.toml:25: backend[0].haproxy.backend: \"\" is not an HAProxy name",
            ),
            (
                "server = \"controller\"",
                "servr = \"controller\"",
                "agent.toml:25: backend[0].haproxy: unknown field `servr`, expected `backend` or `server`; did you mean `server`?",
            ),
            (
                "min_serving = 1",
                "min_serving = -1",
                "agent.toml:26: backend[0].min_serving: -1 is not a server count: use 0 or more",
            ),
            (
                "\"2m\"\non_timeout",
                "\"5 parsecs\"\non_timeout",
                "agent.toml:27: backend[0].drain_timeout: \"5 parsecs\" is not a duration (e.g. \"30s\", \"2m\")",
            ),
            (
                "on_timeout = \"abort\"",
                "on_timeout = \"abrot\"",
                "agent.toml:28: backend[0].on_timeout: unknown variant `abrot`, expected `abort` or `force`; did you mean `abort`?",
            ),
            (
                "systemd_unit = \"nova-api.service\"",
                "systemd_unit = \"nova api\"",
                "agent.toml:29: backend[0].restart.systemd_unit: \"nova api\" is not a unit name",
            ),
            (
                "systemd_unit = \"nova-api.service\", ",
                "",
                "agent.toml:29: backend[0].restart: give exactly one of `systemd_unit = \"name.service\"` or `command = [\"program\", \"arg\", ...]` (neither is given)",
            ),
            (
                "systemd_unit = \"nova-api.service\"",
                "systemd_unit = \"x\", command = [\"y\"]",
                "agent.toml:29: backend[0].restart: give exactly one of `systemd_unit = \"name.service\"` or `command = [\"program\", \"arg\", ...]` (both are given)",
            ),
            (
                "timeout = \"2m\" }\nhealth",
                "timeout = \"0s\" }\nhealth",
                "agent.toml:29: backend[0].restart.timeout: \"0s\" is not an interval or a timeout",
            ),
            (
                "[\"/usr/local/bin/rollback\", \"nova-api\"]",
                "[]",
                "agent.toml:31: backend[0].rollback.command: [] is not a command: use a list of strings, the program first",
            ),
            (
                "[\"/usr/local/bin/rollback\", \"nova-api\"]",
                "\"/usr/local/bin/rollback nova-api\"",
                "agent.toml:31: backend[0].rollback.command: \"/usr/local/bin/rollback nova-api\" is not a command",
            ),
            (
                "\"https://127.0.0.1:8774/healthz\"",
                "\"ftp://127.0.0.1/\"",
                "agent.toml:30: backend[0].health.http: `ftp://127.0.0.1/` must start with http:// or https://",
            ),
            (
                "\"https://127.0.0.1:8774/healthz\"",
                "\"127.0.0.1:8774\"",
                "agent.toml:30: backend[0].health.http: `127.0.0.1:8774` is not a URL",
            ),
            (
                "expect = 200",
                "expect = 999",
                "agent.toml:30: backend[0].health.expect: expect = 999 is not an HTTP status: use 100 to 599, e.g. 200",
            ),
            (
                "\"api.internal\"",
                "\"api.internal:8443\"",
                "agent.toml:30: backend[0].health.host: \"api.internal:8443\" is not a host name: use the name the service answers to, without a port",
            ),
            (
                "\"/etc/drain-agent/ca.pem\"",
                "\"ca.pem\"",
                "agent.toml:30: backend[0].health.ca: \"ca.pem\" is not an absolute path: name the CA's PEM file",
            ),
            (
                "\"https://127.0.0.1:8774/healthz\"",
                "\"http://127.0.0.1:8774/healthz\"",
                "agent.toml:30: backend[0].health.ca: `ca` needs an https:// URL, and `http://127.0.0.1:8774/healthz` is plain HTTP",
            ),
            (
                "http = \"https://127.0.0.1:8774/healthz\"",
                "tcp = \"127.0.0.1:8774\"",
                "agent.toml:30: backend[0].health.expect: `expect` belongs to an `http` check",
            ),
            (
                "http = \"https://127.0.0.1:8774/healthz\", expect = 200",
                "tcp = \"8774\"",
                "agent.toml:30: backend[0].health.tcp: `8774` needs a host and a port, e.g. \"127.0.0.1:8774\"",
            ),
            (
                "expect = 200",
                "tcp = \"127.0.0.1:8774\"",
                "agent.toml:30: backend[0].health: give exactly one of `http = \"http://host:port/path\"`",
            ),
            (
                "timeout = \"60s\"",
                "timeout = \"0s\"",
                "agent.toml:30: backend[0].health.timeout: \"0s\" is not an interval or a timeout",
            ),
        ];
        for (from, to, expected) in cases {
            assert!(FULL.contains(from), "{from}");
            let message = error(&FULL.replacen(from, to, 1));
            assert!(
                message.contains(expected),
                "{to}: expected {expected:?} in {message:?}"
            );
        }
    }

    #[test]
    fn min_serving_above_0_without_haproxy_is_refused_and_defaults_to_0() {
        let text = FULL.replacen(
            "haproxy = { backend = \"nova-api\", server = \"controller\" }\n",
            "",
            1,
        );
        assert!(
            error(&text).starts_with(
                "agent.toml:25: backend[0].min_serving: min_serving = 1 needs `haproxy = { \
                 backend, server }` and a [[load_balancer]] runtime_api"
            ),
            "{}",
            error(&text)
        );
        let config = parse(&text.replacen("min_serving = 1\n", "", 1)).unwrap();
        assert_eq!(config.backends[0].min_serving, 0);
        let config = parse(&FULL.replacen("min_serving = 1\n", "", 1)).unwrap();
        assert_eq!(config.backends[0].min_serving, DEFAULT_MIN_SERVING);
    }

    #[test]
    fn haproxy_server_without_load_balancer_names_the_backends_line() {
        let text = FULL.replacen(
            "[[load_balancer]]\nname = \"lb1\"\nruntime_api = \"unix:/run/haproxy/admin.sock\"\ntimeout = \"5s\"\n",
            "",
            1,
        );
        assert_eq!(
            error(&text),
            "agent.toml:21: backend[0].haproxy: backend `nova-api` names an HAProxy server but \
             no [[load_balancer]] is configured: add one with `name` and `runtime_api`"
        );
    }

    #[test]
    fn a_load_balancer_name_used_twice_is_refused() {
        let text = FULL.replacen(
            "[[backend]]",
            "[[load_balancer]]\nname = \"lb1\"\nruntime_api = \"tcp:192.0.2.10:9999\"\n\n[[backend]]",
            1,
        );
        assert_eq!(
            error(&text),
            "agent.toml:23: load_balancer[1].name: load balancer name \"lb1\" is used twice: \
             give each [[load_balancer]] its own name"
        );
    }

    #[test]
    fn more_backends_than_the_kernel_tracks_are_refused() {
        let mut text = String::from("interfaces = [\"lo\"]\n");
        for index in 0..=MAX_BACKENDS_FOR_TEST {
            text.push_str(&format!(
                "[[backend]]\nname = \"b{index}\"\nports = [{}]\n",
                index + 1
            ));
        }
        assert!(
            error(&text).contains(&format!(
                "backend[{MAX_BACKENDS_FOR_TEST}]: {} backends are configured: at most \
                 {MAX_BACKENDS_FOR_TEST} are supported",
                MAX_BACKENDS_FOR_TEST + 1
            )),
            "{}",
            error(&text)
        );
    }

    const MAX_BACKENDS_FOR_TEST: u32 = drain_agent_common::MAX_BACKENDS;

    #[test]
    fn a_ca_file_that_is_missing_is_a_host_error_on_its_line() {
        let config =
            parse(&FULL.replacen("/etc/drain-agent/ca.pem", "/nonexistent/ca.pem", 1)).unwrap();
        let config = Config {
            interfaces: vec!["lo".into()],
            control_group: None,
            ..config
        };
        assert_eq!(
            config.check_host().unwrap_err().to_string(),
            "agent.toml:30: backend[0].health.ca: cannot read /nonexistent/ca.pem: No such file or \
             directory (os error 2): name a readable PEM file with the CA certificate(s) of the \
             service's certificate"
        );
    }

    #[test]
    fn three_independent_mistakes_are_all_named_in_one_run_in_file_order() {
        let text = FULL
            .replacen("quiet_period = \"50ms\"", "quiet_period = \"soon\"", 1)
            .replacen("servr", "server", 1)
            .replacen("server = \"controller\"", "servr = \"controller\"", 1)
            .replacen("[8774]", "[87740]", 1);
        let errors = parse(&text).unwrap_err().0;
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "agent.toml:3: quiet_period: \"soon\" is not a duration (e.g. \"30s\", \"2m\")",
                "agent.toml:24: backend[0].ports[0]: port 87740 is out of range: use 1 to 65535",
                "agent.toml:25: backend[0].haproxy: unknown field `servr`, expected `backend` or \
                 `server`; did you mean `server`?",
                "agent.toml:25: backend[0].haproxy: missing field `server`: write haproxy = { \
                 backend = \"name in haproxy.cfg\", server = \"this node's server\" }",
            ]
        );
    }

    #[test]
    fn a_wrong_value_does_not_hide_the_rules_that_do_not_depend_on_it() {
        let text = GOOD.replace("[8778, 8779]", "[8778, 8774]").replace(
            "quiet_period = \"100ms\"",
            "quiet_period = 5\nflow_table_size = \"big\"",
        );
        let message = error(&text);
        for expected in [
            "agent.toml:4: quiet_period: 5 is not a duration",
            "agent.toml:5: flow_table_size: \"big\" is not a table size",
            "backend[1].ports[1]: port 8774 is already used by backend `nova-api`",
        ] {
            assert!(
                message.contains(expected),
                "{expected} missing in:\n{message}"
            );
        }
        assert_eq!(message.lines().count(), 3, "{message}");
    }

    #[test]
    fn unreadable_file_names_the_file() {
        let message = Config::load(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("/nonexistent/agent.toml: cannot read the config file"));
    }
}
