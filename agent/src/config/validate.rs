//! From the schema to a [`Config`]: defaults, and the rules that relate several values.

use std::collections::{BTreeMap, HashSet};

use drain_agent_common::{DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS, gate::MAX_ALLOWED_SOURCES};
use toml::Spanned;

use super::{
    Action, Backend, Config, ConfigError, DEFAULT_AGENT_CHECK_INTERVAL,
    DEFAULT_AGENT_CHECK_MAX_CONNECTIONS, DEFAULT_CONTROL_SOCKET, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_FLOW_IDLE_CHECK, DEFAULT_HEALTH_TIMEOUT, DEFAULT_MIN_SERVING, DEFAULT_QUIET_PERIOD,
    DEFAULT_RUNTIME_API_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_STATE_DIR, DEFAULT_STEP_TIMEOUT,
    Gate, HaproxyServer, HealthCheck, LoadBalancer, OnRestart, OnShutdown, OnTimeout, Probe, Step,
    error::Locator,
    raw::{RawBackend, RawConfig, RawHealth, RawStep},
};

/// Applies defaults and the cross-field rules; remembers the lines later checks name.
pub(super) fn validate(at: &Locator<'_>, raw: RawConfig) -> Result<Config, ConfigError> {
    let mut lines = BTreeMap::new();

    let interfaces = match raw.interfaces {
        None => {
            return Err(at.error(
                None,
                "interfaces",
                "missing: list the interfaces the API traffic arrives on, e.g. \
                 interfaces = [\"eth0\"]",
            ));
        }
        Some(list) if list.get_ref().is_empty() => {
            return Err(at.error(
                Some(list.span()),
                "interfaces",
                "[] names no interface: list at least one interface the API traffic arrives \
                 on, e.g. interfaces = [\"eth0\"]",
            ));
        }
        Some(list) => {
            let mut seen = HashSet::new();
            let mut names = Vec::new();
            for (index, name) in list.into_inner().into_iter().enumerate() {
                let span = name.span();
                let name = name.into_inner().0;
                let key = format!("interfaces[{index}]");
                if !seen.insert(name.clone()) {
                    return Err(at.error(
                        Some(span),
                        key,
                        format!("interface `{name}` is listed twice: list each interface once"),
                    ));
                }
                lines.insert(key, at.line(span.start));
                names.push(name);
            }
            names
        }
    };

    if raw.backends.is_empty() {
        return Err(at.error(
            None,
            "backend",
            "no backend configured: add a [[backend]] table with `name` and `ports`",
        ));
    }
    if raw.backends.len() > MAX_BACKENDS as usize {
        return Err(at.error(
            Some(raw.backends[MAX_BACKENDS as usize].span()),
            format!("backend[{MAX_BACKENDS}]"),
            format!(
                "{} backends are configured: at most {MAX_BACKENDS} are supported",
                raw.backends.len()
            ),
        ));
    }
    let mut backends: Vec<Backend> = Vec::new();
    // port → index of the backend that claimed it
    let mut port_owner: BTreeMap<u16, usize> = BTreeMap::new();
    for (index, backend) in raw.backends.into_iter().enumerate() {
        let backend = backend_of(
            at,
            index,
            backend.into_inner(),
            &backends,
            &mut port_owner,
            &mut lines,
        )?;
        backends.push(backend);
    }

    let mut load_balancers: Vec<LoadBalancer> = Vec::new();
    for (index, raw) in raw.load_balancers.into_iter().enumerate() {
        let raw = raw.into_inner();
        let name_span = raw.name.span();
        let name = raw.name.into_inner().0;
        if load_balancers.iter().any(|lb| lb.name == name) {
            return Err(at.error(
                Some(name_span),
                format!("load_balancer[{index}].name"),
                format!(
                    "load balancer name {name:?} is used twice: give each [[load_balancer]] its \
                     own name"
                ),
            ));
        }
        let api_span = raw.runtime_api.span();
        lines.insert(
            format!("load_balancer[{index}].runtime_api"),
            at.line(api_span.start),
        );
        load_balancers.push(LoadBalancer {
            name,
            runtime_api: raw.runtime_api.into_inner(),
            timeout: raw
                .timeout
                .map_or(DEFAULT_RUNTIME_API_TIMEOUT, |timeout| timeout.0),
        });
    }
    if load_balancers.is_empty() {
        if let Some((index, backend)) = backends
            .iter()
            .enumerate()
            .find(|(_, backend)| backend.haproxy.is_some())
        {
            let key = format!("backend[{index}].haproxy");
            return Err(ConfigError {
                path: at.path.to_owned(),
                line: lines.get(&key).copied(),
                key: Some(key),
                message: format!(
                    "backend `{}` names an HAProxy server but no [[load_balancer]] is \
                     configured: add one with `name` and `runtime_api`",
                    backend.name
                ),
            });
        }
    }

    let agent_check_listen = raw.agent_check_listen.map(|listen| {
        lines.insert("agent_check_listen".into(), at.line(listen.span().start));
        listen.into_inner().0
    });
    let metrics_listen = match raw.metrics_listen {
        None => None,
        Some(listen) => {
            let span = listen.span();
            let metrics = listen.into_inner().0;
            if let Some(agent_check) = agent_check_listen {
                if agent_check.port() == metrics.port()
                    && (agent_check.ip() == metrics.ip()
                        || agent_check.ip().is_unspecified()
                        || metrics.ip().is_unspecified())
                {
                    return Err(at.error(
                        Some(span),
                        "metrics_listen",
                        format!(
                            "{metrics} collides with agent_check_listen {agent_check}: use \
                             another port"
                        ),
                    ));
                }
            }
            Some(metrics)
        }
    };
    let control_group = raw.control_group.map(|group| {
        lines.insert("control_group".into(), at.line(group.span().start));
        group.into_inner().0
    });

    Ok(Config {
        path: at.path.to_owned(),
        interfaces,
        control_socket: raw
            .control_socket
            .map_or_else(|| DEFAULT_CONTROL_SOCKET.into(), |path| path.0),
        quiet_period: raw.quiet_period.map_or(DEFAULT_QUIET_PERIOD, |d| d.0),
        flow_table_size: raw
            .flow_table_size
            .map_or(DEFAULT_FLOW_TABLE_SIZE, |size| size.0),
        flow_idle_check: raw.flow_idle_check.map_or(DEFAULT_FLOW_IDLE_CHECK, |d| d.0),
        agent_check_listen,
        agent_check_interval: raw
            .agent_check_interval
            .map_or(DEFAULT_AGENT_CHECK_INTERVAL, |d| d.0),
        agent_check_allow: raw
            .agent_check_allow
            .unwrap_or_default()
            .into_iter()
            .map(|source| source.0)
            .collect(),
        agent_check_max_connections: raw
            .agent_check_max_connections
            .map_or(DEFAULT_AGENT_CHECK_MAX_CONNECTIONS, |count| count.0),
        shutdown_timeout: raw
            .shutdown_timeout
            .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.0),
        metrics_listen,
        control_group,
        on_shutdown: raw.on_shutdown.unwrap_or(OnShutdown::Abort),
        state_dir: raw
            .state_dir
            .map_or_else(|| DEFAULT_STATE_DIR.into(), |dir| dir.0),
        on_restart: raw.on_restart.unwrap_or(OnRestart::Restore),
        load_balancers,
        backends,
        lines,
    })
}

/// One `[[backend]]`: its ports against the others', its HAProxy server, min_serving, steps
/// and health check.
fn backend_of(
    at: &Locator<'_>,
    index: usize,
    raw: RawBackend,
    before: &[Backend],
    port_owner: &mut BTreeMap<u16, usize>,
    lines: &mut BTreeMap<String, usize>,
) -> Result<Backend, ConfigError> {
    let key = |field: &str| format!("backend[{index}].{field}");
    let name_span = raw.name.span();
    let name = raw.name.into_inner().0;
    if before.iter().any(|other| other.name == name) {
        return Err(at.error(
            Some(name_span),
            key("name"),
            format!("backend `{name}` is defined twice: give each [[backend]] its own name"),
        ));
    }
    let ports_span = raw.ports.span();
    let raw_ports = raw.ports.into_inner();
    if raw_ports.is_empty() {
        return Err(at.error(
            Some(ports_span),
            key("ports"),
            format!("backend `{name}` has no ports: list the TCP ports it serves, e.g. [8774]"),
        ));
    }
    let mut ports = Vec::new();
    for (position, port) in raw_ports.into_iter().enumerate() {
        let span = port.span();
        let port = port.into_inner().0;
        if let Some(&owner) = port_owner.get(&port) {
            let message = if owner == index {
                format!("port {port} is listed twice for backend `{name}`: list it once")
            } else {
                format!(
                    "port {port} is already used by backend `{}`: a port belongs to one backend",
                    before[owner].name
                )
            };
            return Err(at.error(Some(span), key(&format!("ports[{position}]")), message));
        }
        port_owner.insert(port, index);
        ports.push(port);
    }
    let haproxy = raw.haproxy.map(|haproxy| {
        lines.insert(key("haproxy"), at.line(haproxy.span().start));
        let haproxy = haproxy.into_inner();
        HaproxyServer {
            backend: haproxy.backend.0,
            server: haproxy.server.0,
        }
    });
    let min_serving = match raw.min_serving {
        // Without a runtime API the agent cannot count the other servers: the default then
        // asks nothing it cannot check (docs/operations.md says what that means).
        None if haproxy.is_none() => 0,
        None => DEFAULT_MIN_SERVING,
        Some(count) => {
            let span = count.span();
            let count = count.into_inner().0;
            if count > 0 && haproxy.is_none() {
                return Err(at.error(
                    Some(span),
                    key("min_serving"),
                    format!(
                        "min_serving = {count} needs `haproxy = {{ backend, server }}` and a \
                         [[load_balancer]] runtime_api: with agent-check alone the agent cannot \
                         see the other servers, so it could not keep {count} of them serving. \
                         Add the runtime API, or set min_serving = 0"
                    ),
                ));
            }
            count
        }
    };
    let restart = step(at, raw.restart, key("restart"))?;
    let rollback = step(at, raw.rollback, key("rollback"))?;
    if let Some(ca) = raw
        .health
        .as_ref()
        .and_then(|health| health.get_ref().ca.as_ref())
    {
        lines.insert(key("health.ca"), at.line(ca.span().start));
    }
    let health = raw
        .health
        .map(|health| health_check(at, health, &key("health")))
        .transpose()?;
    let gate = match raw.gate {
        None => None,
        Some(gate) => {
            let span = gate.span();
            lines.insert(key("gate"), at.line(span.start));
            let gate = gate.into_inner();
            let deadline = gate.deadline.map(|deadline| deadline.0);
            let allow: Vec<ipnet::IpNet> = gate.allow.into_iter().map(|a| a.0).collect();
            let total = allow.len()
                + before
                    .iter()
                    .filter_map(|other| other.gate.as_ref())
                    .map(|gate| gate.allow.len())
                    .sum::<usize>();
            if total > MAX_ALLOWED_SOURCES as usize {
                return Err(at.error(
                    Some(span),
                    key("gate.allow"),
                    format!(
                        "the gates' allow lists hold {total} entries in all, more than the \
                         kernel map's {MAX_ALLOWED_SOURCES}: list networks rather than single \
                         addresses"
                    ),
                ));
            }
            Some(Gate { allow, deadline })
        }
    };
    Ok(Backend {
        name,
        ports,
        haproxy,
        min_serving,
        drain_timeout: raw.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
        on_timeout: raw.on_timeout.unwrap_or(OnTimeout::Abort),
        restart,
        health,
        rollback,
        gate,
    })
}

/// A restart or rollback: exactly one of `systemd_unit` and `command`.
fn step(
    at: &Locator<'_>,
    raw: Option<Spanned<RawStep>>,
    key: String,
) -> Result<Option<Step>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let span = raw.span();
    let raw = raw.into_inner();
    let action = match (raw.systemd_unit, raw.command) {
        (Some(unit), None) => Action::SystemdUnit(unit.0),
        (None, Some(command)) => Action::Command(command.0),
        (unit, command) => {
            let given = if unit.is_some() && command.is_some() {
                "both are given"
            } else {
                "neither is given"
            };
            return Err(at.error(
                Some(span),
                key,
                format!(
                    "give exactly one of `systemd_unit = \"name.service\"` or \
                     `command = [\"program\", \"arg\", ...]` ({given})"
                ),
            ));
        }
    };
    Ok(Some(Step {
        action,
        timeout: raw.timeout.map_or(DEFAULT_STEP_TIMEOUT, |d| d.0),
    }))
}

/// A health check: `http` (with `expect`, `host`, `ca`) or `tcp`.
fn health_check(
    at: &Locator<'_>,
    raw: Spanned<RawHealth>,
    key: &str,
) -> Result<HealthCheck, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let only_http = |field: &str, value: Option<std::ops::Range<usize>>| match value {
        Some(value) => Err(at.error(
            Some(value),
            format!("{key}.{field}"),
            format!("`{field}` belongs to an `http` check: remove it, or check with `http`"),
        )),
        None => Ok(()),
    };
    let probe = match (raw.http, raw.tcp) {
        (Some(url), None) => {
            let url = url.into_inner().0;
            if let Some(ca) = &raw.ca {
                if url.scheme() != "https" {
                    return Err(at.error(
                        Some(ca.span()),
                        format!("{key}.ca"),
                        format!(
                            "`ca` needs an https:// URL, and `{url}` is plain HTTP: remove \
                             `ca`, or use https://"
                        ),
                    ));
                }
            }
            Probe::Http {
                url,
                host: raw.host.map(|host| host.into_inner().0),
                ca: raw.ca.map(|ca| ca.into_inner().0),
                expect: raw.expect.map_or(200, |status| status.into_inner().0),
            }
        }
        (None, Some(address)) => {
            only_http("expect", raw.expect.map(|value| value.span()))?;
            only_http("host", raw.host.map(|value| value.span()))?;
            only_http("ca", raw.ca.map(|value| value.span()))?;
            Probe::Tcp(address.into_inner().0)
        }
        (http, tcp) => {
            let given = if http.is_some() && tcp.is_some() {
                "both are given"
            } else {
                "neither is given"
            };
            return Err(at.error(
                Some(span),
                key,
                format!(
                    "give exactly one of `http = \"http://host:port/path\"` (with optional \
                     `expect = 200`, `host`, `ca`) or `tcp = \"host:port\"` ({given})"
                ),
            ));
        }
    };
    Ok(HealthCheck {
        probe,
        timeout: raw.timeout.map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.0),
    })
}
