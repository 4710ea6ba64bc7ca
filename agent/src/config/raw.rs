//! The config file's schema: what serde reads, with every single value checked by its type.
//!
//! Each value type is `#[serde(try_from = "toml::Value")]`, so toml attaches the value's span to
//! its error and the message can name the value whatever its TOML type. Rules that relate
//! several values live in `validate.rs`.

use std::{net::SocketAddr, ops::Range, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{OnRestart, OnShutdown, OnTimeout, RuntimeApi};

/// Smallest flow table worth running with.
pub const MIN_FLOW_TABLE_SIZE: u32 = 1024;
/// Largest flow table accepted: 16M connections is about 1.5 GB of kernel memory.
pub const MAX_FLOW_TABLE_SIZE: u32 = 16 * 1024 * 1024;
/// Most agent-check connections served at once.
pub const MAX_AGENT_CHECK_CONNECTIONS: usize = 65_536;

/// The whole file. Every value is [`Checked`] and every key optional, so one wrong value
/// or one missing key never hides the next: `validate.rs` reports them all. Unknown keys are
/// found beside deserialization (`mod.rs`), for the same reason.
#[derive(Deserialize)]
pub struct RawConfig {
    pub interfaces: Option<Checked<Vec<Checked<InterfaceName>>>>,
    pub control_socket: Option<Checked<SocketPath>>,
    pub quiet_period: Option<Checked<HumanDuration>>,
    pub flow_table_size: Option<Checked<FlowTableSize>>,
    pub flow_idle_check: Option<Checked<Interval>>,
    pub agent_check_listen: Option<Checked<ListenAddr>>,
    pub agent_check_interval: Option<Checked<Interval>>,
    pub agent_check_allow: Option<Checked<Vec<Checked<AllowedSource>>>>,
    pub agent_check_max_connections: Option<Checked<ConnectionLimit>>,
    pub shutdown_timeout: Option<Checked<HumanDuration>>,
    pub metrics_listen: Option<Checked<ListenAddr>>,
    pub control_group: Option<Checked<GroupName>>,
    pub on_shutdown: Option<Checked<OnShutdown>>,
    pub state_dir: Option<Checked<StateDir>>,
    pub on_restart: Option<Checked<OnRestart>>,
    #[serde(rename = "load_balancer")]
    pub load_balancers: Option<Checked<Vec<Checked<RawLoadBalancer>>>>,
    #[serde(rename = "backend")]
    pub backends: Option<Checked<Vec<Checked<RawBackend>>>>,
}

#[derive(Deserialize)]
pub struct RawLoadBalancer {
    pub name: Option<Checked<Name>>,
    pub runtime_api: Option<Checked<RuntimeApi>>,
    pub timeout: Option<Checked<Interval>>,
}

#[derive(Deserialize)]
pub struct RawBackend {
    pub name: Option<Checked<Name>>,
    pub ports: Option<Checked<Vec<Checked<Port>>>>,
    pub listen: Option<Checked<Vec<Checked<BackendListen>>>>,
    pub haproxy: Option<Checked<RawHaproxy>>,
    pub min_serving: Option<Checked<ServerCount>>,
    pub drain_timeout: Option<Checked<HumanDuration>>,
    pub on_timeout: Option<Checked<OnTimeout>>,
    pub restart: Option<Checked<RawStep>>,
    pub health: Option<Checked<RawHealth>>,
    pub rollback: Option<Checked<RawStep>>,
    pub gate: Option<Checked<RawGate>>,
    pub handover: Option<Checked<RawHandover>>,
}

/// `handover = { start = [...], stop = [...] }` or `handover = { units = ["a@blue",
/// "a@green"] }`: how a new version is started next to the running one, and the old stopped.
#[derive(Deserialize)]
pub struct RawHandover {
    pub start: Option<Checked<CommandLine>>,
    pub stop: Option<Checked<CommandLine>>,
    pub units: Option<Checked<Vec<Checked<UnitName>>>>,
    pub timeout: Option<Checked<Interval>>,
}

/// `gate = { allow = [...] }`: its presence closes the kernel gate while the backend drains.
#[derive(Deserialize)]
pub struct RawGate {
    pub allow: Option<Checked<Vec<Checked<AllowedSource>>>>,
    /// Overrides the computed deadline (see `Backend::gate_deadline`).
    pub deadline: Option<Checked<Interval>>,
}

#[derive(Deserialize)]
pub struct RawHaproxy {
    pub backend: Option<Checked<HaproxyName>>,
    pub server: Option<Checked<HaproxyName>>,
}

#[derive(Deserialize)]
pub struct RawStep {
    pub systemd_unit: Option<Checked<UnitName>>,
    pub command: Option<Checked<CommandLine>>,
    pub timeout: Option<Checked<Interval>>,
}

#[derive(Deserialize)]
pub struct RawHealth {
    pub http: Option<Checked<HttpUrl>>,
    pub expect: Option<Checked<HttpStatus>>,
    pub host: Option<Checked<HostName>>,
    pub ca: Option<Checked<CaFile>>,
    pub tcp: Option<Checked<TcpAddress>>,
    pub timeout: Option<Checked<Interval>>,
}

/// A value where it was written, and either what it means or why it is wrong. A wrong value
/// is kept, not fatal, so the rest of the file is still read and checked.
pub struct Checked<T> {
    pub span: Range<usize>,
    pub value: Result<T, String>,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Checked<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Attempt<T>>::deserialize(deserializer)?;
        Ok(Checked {
            span: spanned.span(),
            value: spanned.into_inner().0,
        })
    }
}

/// Deserializes `T`, keeping its error as a message. The value's deserializer is its own
/// (toml hands each value a fresh one), so its failure leaves the file's deserializer intact.
struct Attempt<T>(Result<T, String>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Attempt<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Attempt(T::deserialize(deserializer).map_err(|err| {
            // toml adds "in `key`" lines; the caller names the key itself.
            err.to_string()
                .lines()
                .filter(|line| !line.starts_with("in `") && !line.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        })))
    }
}

/// The keys the table at `path` accepts (`path` ends with the unknown key).
pub fn fields_of_table(path: &[super::error::Segment]) -> &'static [&'static str] {
    use super::error::Segment::{Index, Key};
    let table = &path[..path.len().saturating_sub(1)];
    match table {
        [] => fields_of::<RawConfig>(),
        [Key(name), Index(_)] if name == "backend" => fields_of::<RawBackend>(),
        [Key(name), Index(_)] if name == "load_balancer" => fields_of::<RawLoadBalancer>(),
        [Key(_), Index(_), Key(name)] if name == "haproxy" => fields_of::<RawHaproxy>(),
        [Key(_), Index(_), Key(name)] if name == "restart" || name == "rollback" => {
            fields_of::<RawStep>()
        }
        [Key(_), Index(_), Key(name)] if name == "health" => fields_of::<RawHealth>(),
        _ => &[],
    }
}

/// The keys a table of type `T` accepts, as its `Deserialize` asks for them: what "unknown
/// field `x`, expected ..." lists without a second list to keep in step.
pub fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields;
    #[derive(Debug)]
    struct Found(&'static [&'static str]);
    impl std::fmt::Display for Found {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fields found")
        }
    }
    impl std::error::Error for Found {}
    impl serde::de::Error for Found {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Found(&[])
        }
    }
    impl<'de> serde::Deserializer<'de> for Fields {
        type Error = Found;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    match T::deserialize(Fields) {
        Err(Found(fields)) => fields,
        Ok(_) => &[],
    }
}

/// The value as the operator wrote it: strings in quotes, anything else in TOML syntax.
pub fn shown(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{text:?}"),
        other => other.to_string(),
    }
}

/// Defines a `try_from = "toml::Value"` newtype around `$inner`, checked by `$check`.
macro_rules! value_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
        #[serde(try_from = "toml::Value")]
        pub struct $name(pub $inner);

        impl TryFrom<Value> for $name {
            type Error = String;
            fn try_from(value: Value) -> Result<Self, String> {
                let check: fn(&Value) -> Result<$inner, String> = $check;
                check(&value).map($name)
            }
        }
    };
}

/// A string value, or the message that says a string is needed and what would do.
fn text<'a>(value: &'a Value, what: &str, example: &str) -> Result<&'a str, String> {
    value.as_str().ok_or_else(|| {
        format!(
            "{} is not {what}: write a string, e.g. {example}",
            shown(value)
        )
    })
}

/// An integer value, or the message that says what range would do.
fn integer(value: &Value, what: &str, valid: &str) -> Result<i64, String> {
    value
        .as_integer()
        .ok_or_else(|| format!("{} is not {what}: use {valid}", shown(value)))
}

fn duration(value: &Value) -> Result<Duration, String> {
    const EXAMPLE: &str = "(e.g. \"30s\", \"2m\")";
    let text = value
        .as_str()
        .ok_or_else(|| format!("{} is not a duration {EXAMPLE}", shown(value)))?;
    humantime::parse_duration(text)
        .map_err(|_| format!("{} is not a duration {EXAMPLE}", shown(value)))
}

value_type!(
    /// A duration written for people: "50ms", "30s", "2m".
    HumanDuration(Duration),
    duration
);

value_type!(
    /// A duration above zero: an interval or a deadline.
    Interval(Duration),
    |value| {
        let duration = duration(value)?;
        if duration.is_zero() {
            return Err(format!(
                "{} is not an interval or a timeout: use more than 0, e.g. \"2s\"",
                shown(value)
            ));
        }
        Ok(duration)
    }
);

value_type!(
    /// A network interface's name, as `ip link` shows it.
    InterfaceName(String),
    |value| {
        let name = text(value, "an interface name", "\"eth0\"")?;
        if name.is_empty()
            || name.len() >= libc::IF_NAMESIZE
            || name.contains(|c: char| c == '/' || c.is_whitespace())
        {
            return Err(format!(
                "{} is not an interface name: use the name `ip link` shows, e.g. \"eth0\" \
                 (1 to {} characters, no '/' or spaces)",
                shown(value),
                libc::IF_NAMESIZE - 1
            ));
        }
        Ok(name.to_string())
    }
);

value_type!(
    /// An absolute path a Unix socket can be bound at.
    SocketPath(PathBuf),
    |value| {
        const EXAMPLE: &str = "\"/run/drain-agent/control.sock\"";
        let path = text(value, "a socket path", EXAMPLE)?;
        // sun_path holds 108 bytes with the terminating NUL.
        if !path.starts_with('/') || path.len() > 107 || path.ends_with('/') {
            return Err(format!(
                "{} is not a socket path: use an absolute path of at most 107 bytes, e.g. \
                 {EXAMPLE}",
                shown(value)
            ));
        }
        Ok(PathBuf::from(path))
    }
);

value_type!(
    /// The directory of the operation journal: absolute.
    StateDir(PathBuf),
    |value| {
        const EXAMPLE: &str = "\"/var/lib/drain-agent\"";
        let path = text(value, "a directory", EXAMPLE)?;
        if !path.starts_with('/') {
            return Err(format!(
                "{} is not an absolute path: name the journal's directory, e.g. {EXAMPLE}",
                shown(value)
            ));
        }
        Ok(PathBuf::from(path))
    }
);

value_type!(
    /// How many connections the kernel flow table holds.
    FlowTableSize(u32),
    |value| {
        let valid = format!("{MIN_FLOW_TABLE_SIZE} to {MAX_FLOW_TABLE_SIZE} connections");
        let size = integer(value, "a table size", &valid)?;
        u32::try_from(size)
            .ok()
            .filter(|size| (MIN_FLOW_TABLE_SIZE..=MAX_FLOW_TABLE_SIZE).contains(size))
            .ok_or_else(|| format!("{size} is out of range: use {valid}"))
    }
);

value_type!(
    /// An address and port to listen on.
    ListenAddr(SocketAddr),
    |value| {
        let example = "\"0.0.0.0:9500\" or \"[::1]:9477\"";
        let address = text(value, "an address:port to listen on", example)?;
        address.parse().map_err(|_| {
            format!(
                "`{address}` is not an address:port to listen on: use an IP address and a port, \
                 e.g. {example}"
            )
        })
    }
);

value_type!(
    /// A source allowed to connect to the agent-check port: an address or a network.
    AllowedSource(ipnet::IpNet),
    |value| {
        let example = "\"10.0.0.0/24\" or \"fd00::1\"";
        let source = text(value, "an address or network", example)?;
        source
            .parse::<ipnet::IpNet>()
            .or_else(|_| source.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(|net| net.trunc())
            .map_err(|_| format!("`{source}` is not an address or network, e.g. {example}"))
    }
);

value_type!(
    /// How many agent-check connections are served at once.
    ConnectionLimit(usize),
    |value| {
        let valid = format!("1 to {MAX_AGENT_CHECK_CONNECTIONS}");
        let count = integer(value, "a connection count", &valid)?;
        usize::try_from(count)
            .ok()
            .filter(|count| (1..=MAX_AGENT_CHECK_CONNECTIONS).contains(count))
            .ok_or_else(|| format!("{count} is out of range: use {valid}"))
    }
);

value_type!(
    /// A Unix group's name.
    GroupName(String),
    |value| {
        let name = text(value, "a group name", "\"drain-operators\"")?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
            return Err(format!(
                "{} is not a group name: use one word as `getent group` lists it, e.g. \
                 \"drain-operators\"",
                shown(value)
            ));
        }
        Ok(name.to_string())
    }
);

value_type!(
    /// A backend's or a load balancer's name: one word.
    Name(String),
    |value| {
        let name = text(value, "a usable name", "\"nova-api\"")?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!(
                "{} is not a usable name: use a non-empty word such as \"nova-api\"",
                shown(value)
            ));
        }
        Ok(name.to_string())
    }
);

value_type!(
    /// A local TCP port.
    Port(u16),
    |value| {
        let port = integer(value, "a port", "1 to 65535")?;
        u16::try_from(port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("port {port} is out of range: use 1 to 65535"))
    }
);

value_type!(
    /// One address:port a backend's service listens on; a wildcard address (`0.0.0.0`, `::`
    /// or `*`) is every address of the node on that port.
    BackendListen(crate::config::ServiceAddress),
    |value| {
        let example = "\"10.0.0.5:8774\" or \"[fd00::5]:8774\"";
        let text = text(value, "an address:port the service listens on", example)?;
        let wrong = || {
            format!(
                "`{text}` is not an address:port the service listens on: use the address and \
                 port it binds, e.g. {example} (\"*:8774\" for every address)"
            )
        };
        let (addr, port) = match text.strip_prefix("*:") {
            Some(port) => (None, port.parse::<u16>().map_err(|_| wrong())?),
            None => {
                let address: SocketAddr = text.parse().map_err(|_| wrong())?;
                let addr = address.ip().to_canonical();
                (
                    (!addr.is_unspecified()).then_some(addr),
                    address.port(),
                )
            }
        };
        if port == 0 {
            return Err(format!("port 0 in `{text}` is out of range: use 1 to 65535"));
        }
        Ok(crate::config::ServiceAddress { addr, port })
    }
);

value_type!(
    /// A proxy or server name in HAProxy's config.
    ///
    /// HAProxy names are letters, digits and `-_.:`; anything else could split a runtime API
    /// command (`;`, spaces, newlines) and is refused here rather than sent.
    HaproxyName(String),
    |value| {
        let name = text(value, "an HAProxy name", "\"nova-api\"")?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(format!(
                "{} is not an HAProxy name: use letters, digits and - _ . : as in the HAProxy \
                 config's `backend` and `server` lines",
                shown(value)
            ));
        }
        Ok(name.to_string())
    }
);

value_type!(
    /// How many other servers must stay UP.
    ServerCount(u32),
    |value| {
        let count = integer(value, "a server count", "0 or more")?;
        u32::try_from(count).map_err(|_| format!("{count} is not a server count: use 0 or more"))
    }
);

value_type!(
    /// A systemd unit's name.
    UnitName(String),
    |value| {
        let name = text(value, "a unit name", "\"nova-api.service\"")?;
        if name.trim().is_empty() || name.contains(char::is_whitespace) {
            return Err(format!(
                "{} is not a unit name: use the unit `systemctl` knows, e.g. \
                 \"nova-api.service\"",
                shown(value)
            ));
        }
        Ok(name.to_string())
    }
);

value_type!(
    /// A program and its arguments, run without a shell.
    CommandLine(Vec<String>),
    |value| {
        let invalid = || {
            format!(
                "{} is not a command: use a list of strings, the program first, e.g. \
                 [\"/usr/local/bin/restart-api\", \"--now\"]",
                shown(value)
            )
        };
        let words = value.as_array().ok_or_else(invalid)?;
        let words: Vec<String> = words
            .iter()
            .map(|word| word.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(invalid)?;
        if words.first().is_none_or(|program| program.is_empty()) {
            return Err(invalid());
        }
        Ok(words)
    }
);

value_type!(
    /// The URL a health check GETs: http:// or https://.
    HttpUrl(reqwest::Url),
    |value| {
        let example = "\"http://127.0.0.1:8774/healthz\" or \"https://127.0.0.1:8774/\"";
        let text = text(value, "a URL", example)?;
        let url = reqwest::Url::parse(text)
            .map_err(|err| format!("`{text}` is not a URL ({err}): use e.g. {example}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "`{text}` must start with http:// or https:// (use a `tcp` check for other \
                 protocols)"
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("`{text}` has no host: use e.g. {example}"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "`{text}` carries credentials: a health check should need none"
            ));
        }
        Ok(url)
    }
);

value_type!(
    /// The HTTP status a healthy service answers.
    HttpStatus(u16),
    |value| {
        let status = integer(value, "an HTTP status", "100 to 599, e.g. 200")?;
        u16::try_from(status)
            .ok()
            .filter(|status| (100..=599).contains(status))
            .ok_or_else(|| format!("expect = {status} is not an HTTP status: use 100 to 599, e.g. 200"))
    }
);

value_type!(
    /// The name a health check asks for (Host header, TLS server name).
    HostName(String),
    |value| {
        let host = text(value, "a host name", "\"api.example.org\"")?;
        let valid = !host.is_empty()
            && reqwest::Url::parse(&format!("http://{host}/"))
                .is_ok_and(|url| url.port().is_none() && url.host_str() == Some(host));
        if !valid {
            return Err(format!(
                "{} is not a host name: use the name the service answers to, without a port, \
                 e.g. \"api.example.org\"",
                shown(value)
            ));
        }
        Ok(host.to_string())
    }
);

value_type!(
    /// A PEM file of CA certificates.
    CaFile(PathBuf),
    |value| {
        let example = "\"/etc/drain-agent/ca.pem\"";
        let path = text(value, "a CA file", example)?;
        if !path.starts_with('/') {
            return Err(format!(
                "{} is not an absolute path: name the CA's PEM file, e.g. {example}",
                shown(value)
            ));
        }
        Ok(PathBuf::from(path))
    }
);

value_type!(
    /// host:port for a TCP health check.
    TcpAddress(String),
    |value| {
        let example = "\"127.0.0.1:8774\"";
        let address = text(value, "host:port", example)?;
        let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
        });
        if !valid {
            return Err(format!("`{address}` needs a host and a port, e.g. {example}"));
        }
        Ok(address.to_string())
    }
);

impl TryFrom<Value> for RuntimeApi {
    type Error = String;

    /// "unix:/path" or "tcp:host:port".
    fn try_from(value: Value) -> Result<RuntimeApi, String> {
        let example = "\"unix:/run/haproxy/admin.sock\" or \"tcp:192.0.2.10:9999\"";
        let text = text(&value, "a runtime API address", example)?;
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
            "`{text}` is not a runtime API address: use {example}"
        ))
    }
}
