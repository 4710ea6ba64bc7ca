//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every error names the file, the line and the key, so an operator can fix it before a
//! maintenance window rather than during one.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use drain_agent_common::{DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS};
use serde::Deserialize;
use toml::Spanned;

/// Where the control socket lives unless the config says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/drain-agent/control.sock";
/// How long in-flight must stay at 0 before a backend counts as quiet.
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_millis(50);
/// How long a tracked connection may go without packets before the garbage collector checks
/// whether its socket still exists.
pub const DEFAULT_FLOW_IDLE_CHECK: Duration = Duration::from_secs(60);
/// Smallest flow table worth running with.
const MIN_FLOW_TABLE_SIZE: u32 = 1024;

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
    /// The API services on this node.
    pub backends: Vec<Backend>,
}

/// One API service on this node: a name and the local TCP ports it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Name the operator uses for it (and, later, the HAProxy backend it maps to).
    pub name: String,
    /// Local TCP ports.
    pub ports: Vec<u16>,
}

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
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    ports: Spanned<Vec<Spanned<i64>>>,
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
                err.message().trim_end().replace('\n', "; "),
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
                    .filter(|size| *size >= MIN_FLOW_TABLE_SIZE)
                    .ok_or_else(|| {
                        at(
                            Some(span),
                            Some("flow_table_size".into()),
                            format!(
                                "{} is out of range: use {MIN_FLOW_TABLE_SIZE} to {} connections",
                                size.get_ref(),
                                u32::MAX
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
            backends.push(Backend { name, ports });
        }

        Ok(Config {
            path: path.to_owned(),
            interfaces,
            control_socket: raw
                .control_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
            quiet_period: raw.quiet_period.unwrap_or(DEFAULT_QUIET_PERIOD),
            flow_table_size,
            flow_idle_check: raw.flow_idle_check.unwrap_or(DEFAULT_FLOW_IDLE_CHECK),
            backends,
        })
    }

    /// Checks what depends on this node: every interface exists here.
    pub fn check_host(&self) -> Result<(), ConfigError> {
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

    /// The backend serving a local port.
    pub fn backend_of_port(&self, port: u16) -> Option<usize> {
        self.backends
            .iter()
            .position(|backend| backend.ports.contains(&port))
    }
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

    #[test]
    fn unreadable_file_names_the_file() {
        let message = Config::load(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("/nonexistent/agent.toml: cannot read the config file"));
    }
}
