//! From the schema to a [`Config`]: defaults, and the rules that relate several values.
//!
//! Every problem is collected, not just the first: a wrong value is reported and left out,
//! and the checks that depend on it are skipped rather than reported again.

use std::{
    collections::{BTreeMap, HashSet},
    ops::Range,
};

use drain_agent_common::{DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS, gate::MAX_ALLOWED_SOURCES};

use super::{
    Action, Backend, Config, ConfigError, DEFAULT_AGENT_CHECK_INTERVAL,
    DEFAULT_AGENT_CHECK_MAX_CONNECTIONS, DEFAULT_CONTROL_SOCKET, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_FLOW_IDLE_CHECK, DEFAULT_HANDOVER_TIMEOUT, DEFAULT_HEALTH_TIMEOUT, DEFAULT_MIN_SERVING,
    DEFAULT_QUIET_PERIOD, DEFAULT_RUNTIME_API_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_STATE_DIR,
    DEFAULT_STEP_TIMEOUT, Gate, Handover, HandoverHow, HaproxyServer, HealthCheck, LoadBalancer,
    OnRestart, OnShutdown, OnTimeout, Probe, ServiceAddress, Step,
    error::{Locator, did_you_mean},
    raw::{
        BackendListen, Checked, Port, RawBackend, RawConfig, RawGate, RawHandover, RawHealth,
        RawStep,
    },
};

/// The problems found so far, and the lines later checks name.
struct Found<'a, 'b> {
    at: &'a Locator<'b>,
    errors: Vec<ConfigError>,
    lines: BTreeMap<String, usize>,
}

impl Found<'_, '_> {
    fn error(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(self.at.error(span, key, message));
    }

    /// A value and where it was written; a wrong one is reported (and `None`).
    fn spanned<T>(&mut self, checked: Option<Checked<T>>, key: &str) -> Option<(T, Range<usize>)> {
        let checked = checked?;
        match checked.value {
            Ok(value) => Some((value, checked.span)),
            Err(message) => {
                self.error(Some(checked.span), key, did_you_mean(&message));
                None
            }
        }
    }

    /// A value; a wrong one is reported (and `None`).
    fn value<T>(&mut self, checked: Option<Checked<T>>, key: &str) -> Option<T> {
        self.spanned(checked, key).map(|(value, _)| value)
    }

    /// Each right element of a list with its index (the wrong ones reported).
    fn list<T>(&mut self, checked: Vec<Checked<T>>, key: &str) -> Vec<(usize, T, Range<usize>)> {
        checked
            .into_iter()
            .enumerate()
            .filter_map(|(index, item)| {
                self.spanned(Some(item), &format!("{key}[{index}]"))
                    .map(|(value, span)| (index, value, span))
            })
            .collect()
    }

    /// Remembers the line of `key`, for checks after parsing.
    fn remember(&mut self, key: impl Into<String>, span: &Range<usize>) {
        self.lines.insert(key.into(), self.at.line(span.start));
    }
}

/// Applies defaults and the cross-field rules; returns every problem found.
pub(super) fn validate(at: &Locator<'_>, raw: RawConfig) -> Result<Config, Vec<ConfigError>> {
    let mut found = Found {
        at,
        errors: Vec::new(),
        lines: BTreeMap::new(),
    };

    let mut interfaces = Vec::new();
    match found.spanned(raw.interfaces, "interfaces") {
        None if !found.has_error_at("interfaces") => found.error(
            None,
            "interfaces",
            "missing: list the interfaces the API traffic arrives on, e.g. \
             interfaces = [\"eth0\"]",
        ),
        None => {}
        Some((list, span)) if list.is_empty() => found.error(
            Some(span),
            "interfaces",
            "[] names no interface: list at least one interface the API traffic arrives \
             on, e.g. interfaces = [\"eth0\"]",
        ),
        Some((list, _)) => {
            let mut seen = HashSet::new();
            for (index, checked) in list.into_iter().enumerate() {
                let key = format!("interfaces[{index}]");
                let Some((name, span)) = found.spanned(Some(checked), &key) else {
                    continue;
                };
                let name = name.0;
                if !seen.insert(name.clone()) {
                    found.error(
                        Some(span),
                        key,
                        format!("interface `{name}` is listed twice: list each interface once"),
                    );
                    continue;
                }
                found.remember(key, &span);
                interfaces.push(name);
            }
        }
    }

    let raw_backends = found.value(raw.backends, "backend").unwrap_or_default();
    if raw_backends.is_empty() {
        found.error(
            None,
            "backend",
            "no backend configured: add a [[backend]] table with `name` and `ports`",
        );
    }
    if raw_backends.len() > MAX_BACKENDS as usize {
        found.error(
            Some(raw_backends[MAX_BACKENDS as usize].span.clone()),
            format!("backend[{MAX_BACKENDS}]"),
            format!(
                "{} backends are configured: at most {MAX_BACKENDS} are supported",
                raw_backends.len()
            ),
        );
    }
    let mut backends: Vec<Backend> = Vec::new();
    // port → name of the backend that claimed it
    let mut port_owner: BTreeMap<u16, String> = BTreeMap::new();
    let mut names = HashSet::new();
    for (index, checked) in raw_backends.into_iter().enumerate() {
        let Some((backend, span)) = found.spanned(Some(checked), &format!("backend[{index}]"))
        else {
            continue;
        };
        if let Some(backend) = backend_of(
            &mut found,
            index,
            backend,
            span,
            &mut names,
            &mut port_owner,
        ) {
            backends.push(backend);
        }
    }
    let allowed: usize = backends
        .iter()
        .filter_map(|backend| backend.gate.as_ref())
        .map(|gate| gate.allow.len())
        .sum();
    if allowed > MAX_ALLOWED_SOURCES as usize {
        found.error(
            None,
            "backend",
            format!(
                "the gates' allow lists hold {allowed} entries in all, more than the kernel \
                 map's {MAX_ALLOWED_SOURCES}: list networks rather than single addresses"
            ),
        );
    }

    let mut load_balancers: Vec<LoadBalancer> = Vec::new();
    let raw_lbs = found
        .value(raw.load_balancers, "load_balancer")
        .unwrap_or_default();
    let any_load_balancer = !raw_lbs.is_empty();
    for (index, checked) in raw_lbs.into_iter().enumerate() {
        let table_key = format!("load_balancer[{index}]");
        let Some((raw, span)) = found.spanned(Some(checked), &table_key) else {
            continue;
        };
        let key = |field: &str| format!("{table_key}.{field}");
        let name = found.spanned(raw.name, &key("name"));
        let runtime_api = found.spanned(raw.runtime_api, &key("runtime_api"));
        let timeout = found.value(raw.timeout, &key("timeout"));
        if let Some((name, name_span)) = &name {
            if load_balancers.iter().any(|lb| lb.name == name.0) {
                found.error(
                    Some(name_span.clone()),
                    key("name"),
                    format!(
                        "load balancer name {:?} is used twice: give each [[load_balancer]] \
                         its own name",
                        name.0
                    ),
                );
            }
        }
        for (field, missing) in [
            ("name", name.is_none() && !found.has_error_at(&key("name"))),
            (
                "runtime_api",
                runtime_api.is_none() && !found.has_error_at(&key("runtime_api")),
            ),
        ] {
            if missing {
                found.error(
                    Some(span.clone()),
                    &table_key,
                    format!(
                        "missing field `{field}`: a [[load_balancer]] needs `name` and \
                         `runtime_api = \"unix:/run/haproxy/admin.sock\"`"
                    ),
                );
            }
        }
        let (Some((name, _)), Some((runtime_api, api_span))) = (name, runtime_api) else {
            continue;
        };
        found.remember(key("runtime_api"), &api_span);
        load_balancers.push(LoadBalancer {
            name: name.0,
            runtime_api,
            timeout: timeout.map_or(DEFAULT_RUNTIME_API_TIMEOUT, |timeout| timeout.0),
        });
    }
    if !any_load_balancer {
        if let Some((index, backend)) = backends
            .iter()
            .enumerate()
            .find(|(_, backend)| backend.haproxy.is_some())
        {
            let key = format!("backend[{index}].haproxy");
            found.errors.push(ConfigError {
                path: at.path.to_owned(),
                line: found.lines.get(&key).copied(),
                key: Some(key),
                message: format!(
                    "backend `{}` names an HAProxy server but no [[load_balancer]] is \
                     configured: add one with `name` and `runtime_api`",
                    backend.name
                ),
            });
        }
    }

    let agent_check_listen = found
        .spanned(raw.agent_check_listen, "agent_check_listen")
        .map(|(listen, span)| {
            found.remember("agent_check_listen", &span);
            listen.0
        });
    let metrics_listen = match found.spanned(raw.metrics_listen, "metrics_listen") {
        None => None,
        Some((listen, span)) => {
            let metrics = listen.0;
            if let Some(agent_check) = agent_check_listen {
                if agent_check.port() == metrics.port()
                    && (agent_check.ip() == metrics.ip()
                        || agent_check.ip().is_unspecified()
                        || metrics.ip().is_unspecified())
                {
                    found.error(
                        Some(span),
                        "metrics_listen",
                        format!(
                            "{metrics} collides with agent_check_listen {agent_check}: use \
                             another port"
                        ),
                    );
                }
            }
            Some(metrics)
        }
    };
    let control_group = found
        .spanned(raw.control_group, "control_group")
        .map(|(group, span)| {
            found.remember("control_group", &span);
            group.0
        });
    let control_socket = found
        .value(raw.control_socket, "control_socket")
        .map_or_else(|| DEFAULT_CONTROL_SOCKET.into(), |path| path.0);
    let quiet_period = found
        .value(raw.quiet_period, "quiet_period")
        .map_or(DEFAULT_QUIET_PERIOD, |d| d.0);
    let flow_table_size = found
        .value(raw.flow_table_size, "flow_table_size")
        .map_or(DEFAULT_FLOW_TABLE_SIZE, |size| size.0);
    let flow_idle_check = found
        .value(raw.flow_idle_check, "flow_idle_check")
        .map_or(DEFAULT_FLOW_IDLE_CHECK, |d| d.0);
    let agent_check_interval = found
        .value(raw.agent_check_interval, "agent_check_interval")
        .map_or(DEFAULT_AGENT_CHECK_INTERVAL, |d| d.0);
    let allow = found
        .value(raw.agent_check_allow, "agent_check_allow")
        .unwrap_or_default();
    let agent_check_allow = found
        .list(allow, "agent_check_allow")
        .into_iter()
        .map(|(_, source, _)| source.0)
        .collect();
    let agent_check_max_connections = found
        .value(
            raw.agent_check_max_connections,
            "agent_check_max_connections",
        )
        .map_or(DEFAULT_AGENT_CHECK_MAX_CONNECTIONS, |count| count.0);
    let shutdown_timeout = found
        .value(raw.shutdown_timeout, "shutdown_timeout")
        .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.0);
    let on_shutdown = found
        .value(raw.on_shutdown, "on_shutdown")
        .unwrap_or(OnShutdown::Abort);
    let state_dir = found
        .value(raw.state_dir, "state_dir")
        .map_or_else(|| DEFAULT_STATE_DIR.into(), |dir| dir.0);
    let on_restart = found
        .value(raw.on_restart, "on_restart")
        .unwrap_or(OnRestart::Restore);

    if !found.errors.is_empty() {
        return Err(found.errors);
    }
    Ok(Config {
        path: at.path.to_owned(),
        interfaces,
        control_socket,
        quiet_period,
        flow_table_size,
        flow_idle_check,
        agent_check_listen,
        agent_check_interval,
        agent_check_allow,
        agent_check_max_connections,
        shutdown_timeout,
        metrics_listen,
        control_group,
        on_shutdown,
        state_dir,
        on_restart,
        load_balancers,
        backends,
        lines: found.lines,
    })
}

impl Found<'_, '_> {
    /// Whether a problem was already reported about `key` (its value was wrong, not missing).
    fn has_error_at(&self, key: &str) -> bool {
        self.errors
            .iter()
            .any(|error| error.key.as_deref() == Some(key))
    }
}

/// One `[[backend]]`: its name and ports against the others', its HAProxy server,
/// min_serving, steps and health check. `None` when something in it is wrong (reported).
fn backend_of(
    found: &mut Found<'_, '_>,
    index: usize,
    raw: RawBackend,
    span: Range<usize>,
    names: &mut HashSet<String>,
    port_owner: &mut BTreeMap<u16, String>,
) -> Option<Backend> {
    let errors_before = found.errors.len();
    let table_key = format!("backend[{index}]");
    let key = |field: &str| format!("{table_key}.{field}");
    let name = match found.spanned(raw.name, &key("name")) {
        Some((name, name_span)) => {
            let name = name.0;
            if !names.insert(name.clone()) {
                found.error(
                    Some(name_span),
                    key("name"),
                    format!(
                        "backend `{name}` is defined twice: give each [[backend]] its own name"
                    ),
                );
            }
            Some(name)
        }
        None if found.has_error_at(&key("name")) => None,
        None => {
            found.error(
                Some(span.clone()),
                &table_key,
                "missing field `name`: give the backend the name operators use for it, e.g. \
                 name = \"nova-api\"",
            );
            None
        }
    };
    let shown_name = name.clone().unwrap_or_else(|| format!("#{index}"));
    let listen = listen_addresses(
        found,
        raw.ports,
        raw.listen,
        &table_key,
        &span,
        &shown_name,
        port_owner,
    );
    let mut ports: Vec<u16> = Vec::new();
    for address in &listen {
        if !ports.contains(&address.port) {
            ports.push(address.port);
        }
    }
    let haproxy =
        found
            .spanned(raw.haproxy, &key("haproxy"))
            .and_then(|(haproxy, haproxy_span)| {
                found.remember(key("haproxy"), &haproxy_span);
                let backend = found.value(haproxy.backend, &key("haproxy.backend"));
                let server = found.value(haproxy.server, &key("haproxy.server"));
                for (field, value) in [("backend", backend.is_some()), ("server", server.is_some())]
                {
                    if !value && !found.has_error_at(&key(&format!("haproxy.{field}"))) {
                        found.error(
                            Some(haproxy_span.clone()),
                            key("haproxy"),
                            format!(
                                "missing field `{field}`: write haproxy = {{ backend = \"name in \
                             haproxy.cfg\", server = \"this node's server\" }}"
                            ),
                        );
                    }
                }
                Some(HaproxyServer {
                    backend: backend?.0,
                    server: server?.0,
                })
            });
    let haproxy_given = haproxy.is_some() || found.has_error_at(&key("haproxy"));
    let min_serving = match found.spanned(raw.min_serving, &key("min_serving")) {
        // Without a runtime API the agent cannot count the other servers: the default then
        // asks nothing it cannot check (docs/operations.md says what that means).
        None if !haproxy_given => 0,
        None => DEFAULT_MIN_SERVING,
        Some((count, count_span)) => {
            found.remember(key("min_serving"), &count_span);
            let count = count.0;
            if count > 0 && !haproxy_given {
                found.error(
                    Some(count_span),
                    key("min_serving"),
                    format!(
                        "min_serving = {count} needs `haproxy = {{ backend, server }}` and a \
                         [[load_balancer]] runtime_api: with agent-check alone the agent cannot \
                         see the other servers, so it could not keep {count} of them serving. \
                         Add the runtime API, or set min_serving = 0"
                    ),
                );
            }
            count
        }
    };
    let drain_timeout = found
        .value(raw.drain_timeout, &key("drain_timeout"))
        .map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0);
    let on_timeout = found
        .value(raw.on_timeout, &key("on_timeout"))
        .unwrap_or(OnTimeout::Abort);
    let restart = step(found, raw.restart, key("restart"));
    let rollback = step(found, raw.rollback, key("rollback"));
    let health = health_check(found, raw.health, &key("health"));
    let gate = gate(found, raw.gate, &key("gate"));
    let handover = handover(found, raw.handover, &key("handover"), health.as_ref());
    if found.errors.len() > errors_before {
        return None;
    }
    Some(Backend {
        name: name?,
        ports,
        listen,
        haproxy,
        min_serving,
        drain_timeout,
        on_timeout,
        restart,
        health,
        rollback,
        gate,
        handover,
    })
}

/// A backend's `ports` (each on every address) or `listen` (addresses and ports; exactly one of
/// the two), against the other backends': a port belongs to one backend, whatever the address
/// (the kernel's steering keys listeners by port).
fn listen_addresses(
    found: &mut Found<'_, '_>,
    ports: Option<Checked<Vec<Checked<Port>>>>,
    listen: Option<Checked<Vec<Checked<BackendListen>>>>,
    table_key: &str,
    span: &Range<usize>,
    shown_name: &str,
    port_owner: &mut BTreeMap<u16, String>,
) -> Vec<ServiceAddress> {
    let key = |field: &str| format!("{table_key}.{field}");
    let (field, empty, entries, list_span) = match (ports, listen) {
        (Some(_), Some(listen)) => {
            let span = listen.span.clone();
            found.error(
                Some(span),
                key("listen"),
                format!(
                    "backend `{shown_name}` has both `ports` and `listen`: keep `listen` (the \
                     addresses and ports the service binds) and remove `ports`"
                ),
            );
            return Vec::new();
        }
        (Some(ports), None) => match found.spanned(Some(ports), &key("ports")) {
            None => return Vec::new(),
            Some((list, list_span)) => (
                "ports",
                list.is_empty(),
                found
                    .list(list, &key("ports"))
                    .into_iter()
                    .map(|(position, port, span)| {
                        (
                            position,
                            ServiceAddress {
                                addr: None,
                                port: port.0,
                            },
                            span,
                        )
                    })
                    .collect::<Vec<_>>(),
                list_span,
            ),
        },
        (None, Some(listen)) => match found.spanned(Some(listen), &key("listen")) {
            None => return Vec::new(),
            Some((list, list_span)) => (
                "listen",
                list.is_empty(),
                found
                    .list(list, &key("listen"))
                    .into_iter()
                    .map(|(position, address, span)| (position, address.0, span))
                    .collect::<Vec<_>>(),
                list_span,
            ),
        },
        (None, None) => {
            if !found.has_error_at(&key("ports")) && !found.has_error_at(&key("listen")) {
                found.error(
                    Some(span.clone()),
                    table_key,
                    format!(
                        "missing field `listen`: list the addresses and ports backend \
                         `{shown_name}` serves, e.g. listen = [\"10.0.0.5:8774\"] (or ports = \
                         [8774] for every address)"
                    ),
                );
            }
            return Vec::new();
        }
    };
    if empty {
        found.error(
            Some(list_span),
            key(field),
            if field == "ports" {
                format!(
                    "backend `{shown_name}` has no ports: list the TCP ports it serves, e.g. \
                     [8774]"
                )
            } else {
                format!(
                    "backend `{shown_name}` has no listen addresses: list the addresses and \
                     ports it serves, e.g. [\"10.0.0.5:8774\"]"
                )
            },
        );
        return Vec::new();
    }
    let mut listen: Vec<ServiceAddress> = Vec::new();
    for (position, address, entry_span) in entries {
        let port = address.port;
        let shown = if field == "ports" {
            format!("port {port}")
        } else {
            format!("`{address}`")
        };
        let message = if let Some(same) = listen.iter().find(|other| {
            other.port == port
                && (other.addr.is_none() || address.addr.is_none() || other.addr == address.addr)
        }) {
            Some(if *same == address {
                format!("{shown} is listed twice for backend `{shown_name}`: list it once")
            } else {
                format!(
                    "{shown} overlaps `{same}` of backend `{shown_name}`: a wildcard address \
                     already covers every address on port {port}; keep one of them"
                )
            })
        } else {
            match port_owner.get(&port) {
                Some(owner) if owner != shown_name => Some(format!(
                    "port {port} is already used by backend `{owner}`: a port belongs to one \
                     backend"
                )),
                _ => None,
            }
        };
        if let Some(message) = message {
            found.error(
                Some(entry_span),
                key(&format!("{field}[{position}]")),
                message,
            );
            continue;
        }
        port_owner.insert(port, shown_name.to_string());
        listen.push(address);
    }
    listen
}

/// `handover = { start = [...], stop = [...], timeout }` or `{ units = [A, B], timeout }`.
/// A handover verifies the new version with the backend's health check before any client is
/// sent to it, so it needs one, reachable over IPv4 (the probes come from a loopback
/// address of their own, which is how the kernel tells them from clients).
fn handover(
    found: &mut Found<'_, '_>,
    raw: Option<Checked<RawHandover>>,
    key: &str,
    health: Option<&HealthCheck>,
) -> Option<Handover> {
    let (raw, span) = found.spanned(raw, key)?;
    found.remember(key, &span);
    let field = |name: &str| format!("{key}.{name}");
    let start_given = raw.start.is_some();
    let units_given = raw.units.is_some();
    let stop_given = raw.stop.is_some();
    let start = found.value(raw.start, &field("start"));
    let stop = found.value(raw.stop, &field("stop"));
    let units = found
        .spanned(raw.units, &field("units"))
        .map(|(list, span)| {
            let names: Vec<String> = found
                .list(list, &field("units"))
                .into_iter()
                .map(|(_, unit, _)| unit.0)
                .collect();
            (names, span)
        });
    let timeout = found
        .value(raw.timeout, &field("timeout"))
        .map_or(DEFAULT_HANDOVER_TIMEOUT, |timeout| timeout.0);
    let how = match (start_given, units_given) {
        (true, false) => HandoverHow::Commands {
            start: start?.0,
            stop: stop.map(|stop| stop.0),
        },
        (false, true) => {
            if stop_given {
                found.error(
                    Some(span.clone()),
                    field("stop"),
                    "`stop` belongs to the `start` form: with `units` the agent stops the old                      version's unit; remove `stop`",
                );
            }
            let (names, units_span) = units?;
            match <[String; 2]>::try_from(names) {
                Ok(pair) if pair[0] != pair[1] => HandoverHow::Units(pair),
                _ => {
                    found.error(
                        Some(units_span),
                        field("units"),
                        "`units` names two different units, one per version, e.g.                          [\"nova-api@blue\", \"nova-api@green\"]",
                    );
                    return None;
                }
            }
        }
        (both, _) => {
            found.error(
                Some(span),
                key,
                if both {
                    "both `start` and `units` are given: use one, start = [...] (and stop =                      [...]) or units = [\"nova-api@blue\", \"nova-api@green\"]"
                } else {
                    "missing field `start` or `units`: write handover = { start = [...] } or                      handover = { units = [\"nova-api@blue\", \"nova-api@green\"] }"
                },
            );
            return None;
        }
    };
    match health.map(|health| &health.probe) {
        None => found.error(
            Some(span),
            key,
            "a handover verifies the new version before clients reach it: add health = {              http = \"http://127.0.0.1:PORT/...\" } (or tcp = \"127.0.0.1:PORT\")",
        ),
        Some(probe) if probe_is_ipv6(probe) => found.error(
            Some(span),
            key,
            "a handover's health probes come from an IPv4 loopback address of their own (that              is how the kernel tells them from clients): check the service over IPv4, e.g.              http://127.0.0.1:PORT/...",
        ),
        Some(_) => {}
    }
    Some(Handover { how, timeout })
}

/// Whether a probe's target is an IPv6 address literal.
fn probe_is_ipv6(probe: &Probe) -> bool {
    match probe {
        Probe::Http { url, .. } => url.host_str().is_some_and(|host| host.starts_with('[')),
        Probe::Tcp(address) => address
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|address| address.is_ipv6()),
    }
}

/// `gate = { allow = [...], deadline = "..." }`: `allow` is required (it may be empty).
fn gate(found: &mut Found<'_, '_>, raw: Option<Checked<RawGate>>, key: &str) -> Option<Gate> {
    let (raw, span) = found.spanned(raw, key)?;
    found.remember(key, &span);
    let allow_key = format!("{key}.allow");
    let allow = match found.spanned(raw.allow, &allow_key) {
        Some((list, _)) => found
            .list(list, &allow_key)
            .into_iter()
            .map(|(_, source, _)| source.0)
            .collect(),
        None => {
            if !found.has_error_at(&allow_key) {
                found.error(
                    Some(span),
                    key,
                    "missing field `allow`: list the sources a closed gate still accepts (the \
                     load balancers, for their health checks), e.g. gate = { allow = \
                     [\"192.0.2.10/32\"] }, or allow = [] for none",
                );
            }
            Vec::new()
        }
    };
    let deadline = found
        .value(raw.deadline, &format!("{key}.deadline"))
        .map(|deadline| deadline.0);
    Some(Gate { allow, deadline })
}

/// A restart or rollback: exactly one of `systemd_unit` and `command`.
fn step(found: &mut Found<'_, '_>, raw: Option<Checked<RawStep>>, key: String) -> Option<Step> {
    let (raw, span) = found.spanned(raw, &key)?;
    found.remember(key.clone(), &span);
    let unit = found.value(raw.systemd_unit, &format!("{key}.systemd_unit"));
    let command = found.value(raw.command, &format!("{key}.command"));
    let timeout = found.value(raw.timeout, &format!("{key}.timeout"));
    let unit_given = unit.is_some() || found.has_error_at(&format!("{key}.systemd_unit"));
    let command_given = command.is_some() || found.has_error_at(&format!("{key}.command"));
    let action = match (unit, command) {
        (Some(unit), None) if !command_given => Action::SystemdUnit(unit.0),
        (None, Some(command)) if !unit_given => Action::Command(command.0),
        _ if unit_given != command_given => return None, // the wrong one is reported
        _ => {
            let given = if unit_given {
                "both are given"
            } else {
                "neither is given"
            };
            found.error(
                Some(span),
                key,
                format!(
                    "give exactly one of `systemd_unit = \"name.service\"` or \
                     `command = [\"program\", \"arg\", ...]` ({given})"
                ),
            );
            return None;
        }
    };
    Some(Step {
        action,
        timeout: timeout.map_or(DEFAULT_STEP_TIMEOUT, |d| d.0),
    })
}

/// A health check: `http` (with `expect`, `host`, `ca`) or `tcp`.
fn health_check(
    found: &mut Found<'_, '_>,
    raw: Option<Checked<RawHealth>>,
    key: &str,
) -> Option<HealthCheck> {
    let (raw, span): (RawHealth, _) = found.spanned(raw, key)?;
    let field = |name: &str| format!("{key}.{name}");
    if let Some(ca) = &raw.ca {
        found.remember(field("ca"), &ca.span);
    }
    let http_given = raw.http.is_some();
    let tcp_given = raw.tcp.is_some();
    let http = found.value(raw.http, &field("http"));
    let tcp = found.value(raw.tcp, &field("tcp"));
    let expect = found.spanned(raw.expect, &field("expect"));
    let host = found.spanned(raw.host, &field("host"));
    let ca = found.spanned(raw.ca, &field("ca"));
    let timeout = found.value(raw.timeout, &field("timeout"));
    let probe = match (http_given, tcp_given) {
        (true, false) => {
            let url = http?.0;
            if let Some((_, ca_span)) = &ca {
                if url.scheme() != "https" {
                    found.error(
                        Some(ca_span.clone()),
                        field("ca"),
                        format!(
                            "`ca` needs an https:// URL, and `{url}` is plain HTTP: remove \
                             `ca`, or use https://"
                        ),
                    );
                    return None;
                }
            }
            Probe::Http {
                url,
                host: host.map(|(host, _)| host.0),
                ca: ca.map(|(ca, _)| ca.0),
                expect: expect.map_or(200, |(status, _)| status.0),
            }
        }
        (false, true) => {
            let mut only_http = |name: &str, value: Option<Range<usize>>| {
                if let Some(value) = value {
                    found.error(
                        Some(value),
                        field(name),
                        format!(
                            "`{name}` belongs to an `http` check: remove it, or check with `http`"
                        ),
                    );
                }
            };
            only_http("expect", expect.map(|(_, span)| span));
            only_http("host", host.map(|(_, span)| span));
            only_http("ca", ca.map(|(_, span)| span));
            Probe::Tcp(tcp?.0)
        }
        (http, _) => {
            let given = if http {
                "both are given"
            } else {
                "neither is given"
            };
            found.error(
                Some(span),
                key,
                format!(
                    "give exactly one of `http = \"http://host:port/path\"` (with optional \
                     `expect = 200`, `host`, `ca`) or `tcp = \"host:port\"` ({given})"
                ),
            );
            return None;
        }
    };
    Some(HealthCheck {
        probe,
        timeout: timeout.map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.0),
    })
}
