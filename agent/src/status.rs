//! What `drain-agent status` reports: the wire format on the control socket and its rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The whole agent's status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Where the numbers come from: "ebpf" (kernel programs) or "procfs" (degraded mode).
    pub kernel: String,
    /// Seconds since the agent started.
    pub uptime_seconds: f64,
    /// Entries and size of the table of seeded connections (older than the agent, or
    /// untracked), eBPF mode only.
    pub flow_table: Option<FlowTableStatus>,
    /// The drain or cycle running on this node, if any (e.g. "cycle nova-api").
    pub running: Option<String>,
    /// The kernel programs and where they are attached (eBPF mode); the ids match bpftool's.
    pub attachments: Vec<Attachment>,
    /// What runs on this kernel (eBPF mode): the accounting, the gate, the handover, each
    /// `active`, `unsupported` (configured, refused by the kernel) or `not_configured`.
    #[serde(default)]
    pub features: Vec<crate::kernel::features::FeatureStatus>,
    /// One entry per configured backend, in config order.
    pub backends: Vec<BackendStatus>,
}

/// One kernel program attachment: a TC program on an interface, or the sock_ops program on
/// the cgroup-v2 root (`interface` is then the cgroup's path).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    /// "ingress", "egress", "sock_ops" or "gate" (XDP).
    pub direction: String,
    /// Kernel program id (`bpftool prog show id N`).
    pub program_id: u32,
    /// The gate's XDP mode: "native" (in the driver) or "generic" (in the network stack,
    /// where the driver has no XDP support).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Why the gate runs in generic mode on a driver that has native XDP (VLAN devices whose
    /// tags the NIC strips: only the network stack still has them for the answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// Flow table fill level.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowTableStatus {
    /// Entries of the table of seeded connections (older than the agent, or untracked); the
    /// connections established while the agent watched are in their sockets' storage, which
    /// has no capacity to fill (each backend's `flow_table_entries` counts both).
    pub entries: u64,
    /// Size of that table (`flow_table_size`).
    pub capacity: u64,
}

/// One backend. Fields the current kernel mode cannot know are `null`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub name: String,
    pub ports: Vec<u16>,
    /// The addresses and ports it serves (`*:PORT`: every address of the node on that port).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Drain phase; "serving" until drains exist.
    pub state: String,
    /// Connections with a completed handshake that have not closed.
    pub established: u64,
    /// Established connections carrying a request or an unacknowledged response.
    pub in_flight: Option<u64>,
    /// Established connections the agent did not see begin and whose traffic has not told
    /// yet whether they carry a request; a drain treats them as not idle
    /// (docs/accounting.md). In procfs mode, every established connection.
    #[serde(default)]
    pub unknown: Option<u64>,
    /// Established connections with nothing in flight.
    pub idle: Option<u64>,
    /// Whether in-flight has stayed at 0 for the quiet period.
    pub quiet: Option<bool>,
    /// Milliseconds since the last connection went from in flight to idle.
    pub last_in_flight_ms_ago: Option<u64>,
    /// Totals since the agent started.
    pub accepted: Option<u64>,
    pub closed: Option<u64>,
    pub reset: Option<u64>,
    pub reset_by_client: Option<u64>,
    pub reset_by_server: Option<u64>,
    /// Connections that could not be tracked: the kernel could not allocate their storage.
    pub flow_table_full: Option<u64>,
    /// This backend's tracked connections (socket storage and seeded).
    #[serde(default)]
    pub flow_table_entries: Option<u64>,
    /// Tracked connections that disappeared without FIN or RST (garbage-collected).
    pub vanished: Option<u64>,
    /// Connections the node ended while they carried a request.
    pub cut_in_flight: Option<u64>,
    /// Why the backend is in its phase, when it failed.
    pub reason: Option<String>,
    /// When the backend entered its phase (ms since the Unix epoch): for a phase the journal
    /// brought back, when the previous agent entered it.
    #[serde(default)]
    pub state_since_unix_ms: Option<u64>,
    /// The operation that moved it into its phase ("drain", "cycle", ...), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_by: Option<String>,
    /// The last drain, cycle or resume of this backend since the agent started.
    #[serde(default)]
    pub last_operation: Option<OperationSummary>,
    /// Load balancers whose view of the server differs from the agent's phase at rest, one
    /// sentence each (drift.rs).
    #[serde(default)]
    pub drift: Vec<String>,
    /// The backend's kernel gate, when it has one.
    #[serde(default)]
    pub gate: Option<GateStatus>,
    /// While two versions of the service hold connections (a handover, docs/handover.md):
    /// each one's share, the serving one first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionStatus>,
}

/// One version's share of a backend's connections during a handover.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionStatus {
    /// "new" for the one new connections go to, "old" for the other.
    pub version: String,
    pub established: u64,
    pub in_flight: u64,
    pub unknown: u64,
    pub idle: u64,
}

impl VersionStatus {
    /// Both versions' shares, when the one not serving still holds connections or a
    /// handover runs; empty otherwise.
    pub fn of(sample: &crate::kernel::BackendSample, handing_over: bool) -> Vec<VersionStatus> {
        let serving = sample.serving_instance as usize;
        let other = 1 - (serving & 1);
        let (Some(new), Some(old)) = (sample.instances.get(serving), sample.instances.get(other))
        else {
            return Vec::new();
        };
        if !handing_over && old.established == 0 {
            return Vec::new();
        }
        [("new", new), ("old", old)]
            .into_iter()
            .map(|(version, counts)| VersionStatus {
                version: version.to_string(),
                established: counts.established,
                in_flight: counts.in_flight,
                unknown: counts.unknown,
                idle: counts
                    .established
                    .saturating_sub(counts.in_flight)
                    .saturating_sub(counts.unknown),
            })
            .collect()
    }
}

/// A backend's kernel gate (docs/gate.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GateStatus {
    /// "open", "closed", or "expired" (closed by the agent, opened by its own deadline).
    pub state: String,
    /// Seconds until a closed gate opens by itself.
    pub opens_in_seconds: Option<f64>,
    /// New connections refused since the agent started.
    pub refused: u64,
    /// New connections from allowed sources let through a closed gate since the agent
    /// started.
    pub allowed: u64,
}

impl GateStatus {
    /// The status of a kernel sample.
    pub fn of(sample: &crate::kernel::gate::GateSample) -> GateStatus {
        let state = match (sample.closed_for, sample.expired) {
            (Some(_), _) => "closed",
            (None, true) => "expired",
            (None, false) => "open",
        };
        GateStatus {
            state: state.to_string(),
            opens_in_seconds: sample.closed_for.map(|left| left.as_secs_f64()),
            refused: sample.refused,
            allowed: sample.allowed,
        }
    }
}

/// How the last operation of a backend ended, and what each load balancer confirmed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OperationSummary {
    pub operation: String,
    pub outcome: crate::drain::Outcome,
    pub message: String,
    /// Seconds since it ended.
    pub ended_seconds_ago: f64,
    /// What ended its drain, if it drained.
    pub drain_evidence: Option<String>,
    /// Requests still in flight when `on_timeout = "force"` ended the drain at its deadline.
    #[serde(default)]
    pub forced_with_in_flight: Option<u64>,
    /// The exit code the operation's command returned.
    #[serde(default)]
    pub exit_code: u8,
    pub load_balancers: Vec<crate::drain::report::LoadBalancerReport>,
}

impl OperationSummary {
    /// The summary of a finished report.
    pub fn of(report: &crate::drain::Report, ago: std::time::Duration) -> OperationSummary {
        OperationSummary {
            operation: report.operation.clone(),
            outcome: report.outcome,
            message: report.message.clone(),
            ended_seconds_ago: ago.as_secs_f64(),
            drain_evidence: report.drain_evidence.clone(),
            forced_with_in_flight: report.forced_with_in_flight,
            exit_code: report.exit_code,
            load_balancers: report.load_balancers.clone(),
        }
    }
}

impl Status {
    /// The human-readable table `status` prints on a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "kernel: {}", self.kernel);
        if let Some(table) = &self.flow_table {
            let _ = write!(
                out,
                "   seeded table: {}/{} entries",
                table.entries, table.capacity
            );
        }
        let _ = writeln!(out, "   uptime: {:.0}s", self.uptime_seconds);
        if self.kernel == "procfs" {
            let _ = writeln!(
                out,
                "procfs: in-flight unknown — every established connection counts as unknown, and \
                 a drain ends only when the load balancers show 0 sessions or no connection is left"
            );
        }
        if let Some(running) = &self.running {
            // "drain api": `wait` takes the backend.
            let backend = running
                .split_once(' ')
                .map_or("BACKEND", |(_, backend)| backend);
            let _ = writeln!(
                out,
                "running: {running} (`drain-agent wait {backend}` follows it to its end)"
            );
        }
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:<10} {:>11} {:>9} {:>7} {:>6} {:>9} {:>8} {:>7} {:>10}",
            "BACKEND",
            "PORTS",
            "STATE",
            "ESTABLISHED",
            "IN-FLIGHT",
            "UNKNOWN",
            "IDLE",
            "ACCEPTED",
            "CLOSED",
            "RESET",
            "TABLE-FULL"
        );
        let show = |value: Option<u64>| value.map_or_else(|| "-".to_string(), |v| v.to_string());
        for backend in &self.backends {
            let ports = backend
                .ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(
                out,
                "{:<16} {:<12} {:<10} {:>11} {:>9} {:>7} {:>6} {:>9} {:>8} {:>7} {:>10}",
                backend.name,
                ports,
                backend.state,
                backend.established,
                show(backend.in_flight),
                show(backend.unknown),
                show(backend.idle),
                show(backend.accepted),
                show(backend.closed),
                show(backend.reset),
                show(backend.flow_table_full),
            );
        }
        if !self.features.is_empty() {
            let features: Vec<String> = self
                .features
                .iter()
                .map(|feature| format!("{} {}", feature.feature, feature.state.as_str()))
                .collect();
            let _ = writeln!(out, "kernel features: {}", features.join(", "));
            for feature in &self.features {
                if let Some(detail) = &feature.detail {
                    let _ = writeln!(out, "{}: {detail}", feature.feature);
                }
            }
        }
        for attachment in &self.attachments {
            if let Some(mode) = &attachment.mode {
                let _ = writeln!(
                    out,
                    "gate: XDP on {} in {mode} mode (program {})",
                    attachment.interface, attachment.program_id
                );
            }
        }
        for backend in &self.backends {
            for version in &backend.versions {
                out.push_str(&format!(
                    "{}: {} version: {} established, {} in flight, {} unknown, {} idle\n",
                    backend.name,
                    version.version,
                    version.established,
                    version.in_flight,
                    version.unknown,
                    version.idle
                ));
            }
            if let Some(gate) = &backend.gate {
                let state = match gate.opens_in_seconds {
                    Some(left) => format!("closed (opens by itself in {left:.0}s)"),
                    None if gate.state == "expired" => {
                        "open: its deadline passed while the agent had it closed".to_string()
                    }
                    None => gate.state.clone(),
                };
                let _ = writeln!(
                    out,
                    "{}: gate {state}; {} new connection(s) refused, {} from allowed sources let \
                     through",
                    backend.name, gate.refused, gate.allowed
                );
            }
            for sentence in &backend.drift {
                let _ = writeln!(out, "warning: {}: {sentence}", backend.name);
            }
            if let Some(cut) = backend.cut_in_flight.filter(|cut| *cut > 0) {
                let _ = writeln!(
                    out,
                    "warning: {}: {cut} connection(s) cut with a request in flight since the \
                     agent started (drain_agent_connections_cut_in_flight_total)",
                    backend.name
                );
            }
            if let Some(reason) = &backend.reason {
                let _ = writeln!(out, "{} is {}: {reason}", backend.name, backend.state);
            }
            if backend.state != "serving"
                && let Some(since) = backend.state_since_unix_ms
            {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(since);
                let _ = writeln!(
                    out,
                    "{} is {} since {}{}",
                    backend.name,
                    backend.state,
                    humantime::format_rfc3339_seconds(at),
                    backend
                        .state_by
                        .as_deref()
                        .map(|by| format!(" (by {by})"))
                        .unwrap_or_default()
                );
            }
            let Some(last) = &backend.last_operation else {
                continue;
            };
            let outcome = serde_json::to_value(last.outcome)
                .ok()
                .and_then(|value| value.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{}: last {} {:.0}s ago: {outcome} (exit {}) — {}",
                backend.name, last.operation, last.ended_seconds_ago, last.exit_code, last.message
            );
            if let Some(evidence) = &last.drain_evidence {
                let _ = writeln!(out, "  drained because {evidence}");
            }
            if let Some(forced) = last.forced_with_in_flight {
                let _ = writeln!(
                    out,
                    "  forced at the deadline with {forced} request(s) still in flight"
                );
            }
            for lb in &last.load_balancers {
                let at = |v: Option<u64>| {
                    v.map_or_else(|| "-".into(), |v| format!("{:.3}s", v as f64 / 1000.0))
                };
                let _ = writeln!(
                    out,
                    "  {}: drain confirmed {}, ready confirmed {}{}",
                    lb.name,
                    at(lb.drain_confirmed_ms),
                    at(lb.ready_confirmed_ms),
                    lb.error
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
            }
        }
        if self
            .backends
            .iter()
            .any(|backend| backend.flow_table_full.unwrap_or(0) > 0)
        {
            let _ = writeln!(
                out,
                "warning: connections went untracked (the kernel could not allocate their \
                 storage): they are counted as unknown from the socket table and hold drains \
                 until settled"
            );
        }
        out
    }
}
