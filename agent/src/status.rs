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
    /// Connections the flow table holds and can hold (eBPF mode only).
    pub flow_table: Option<FlowTableStatus>,
    /// The drain or cycle running on this node, if any (e.g. "cycle nova-api").
    pub running: Option<String>,
    /// The kernel programs and where they are attached (eBPF mode); the ids match bpftool's.
    pub attachments: Vec<Attachment>,
    /// One entry per configured backend, in config order.
    pub backends: Vec<BackendStatus>,
}

/// One kernel program attachment: a TC program on an interface, or the sock_ops program on
/// the cgroup-v2 root (`interface` is then the cgroup's path).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    /// "ingress", "egress" or "sock_ops".
    pub direction: String,
    /// Kernel program id (`bpftool prog show id N`).
    pub program_id: u32,
}

/// Flow table fill level.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowTableStatus {
    /// Entries in use (established and half-open connections).
    pub entries: u64,
    /// Size of the table (`flow_table_size`).
    pub capacity: u64,
}

/// One backend. Fields the current kernel mode cannot know are `null`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub name: String,
    pub ports: Vec<u16>,
    /// Drain phase; "serving" until drains exist.
    pub state: String,
    /// Connections with a completed handshake that have not closed.
    pub established: u64,
    /// Established connections carrying a request or an unacknowledged response.
    pub in_flight: Option<u64>,
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
    /// Connections that could not be tracked because the flow table was full.
    pub flow_table_full: Option<u64>,
    /// Tracked connections that disappeared without FIN or RST (garbage-collected).
    pub vanished: Option<u64>,
    /// Connections the node ended while they carried a request.
    pub cut_in_flight: Option<u64>,
    /// Why the backend is in its phase, when it failed.
    pub reason: Option<String>,
}

impl Status {
    /// The human-readable table `status` prints on a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "kernel: {}", self.kernel);
        if let Some(table) = &self.flow_table {
            let _ = write!(
                out,
                "   flow table: {}/{} entries",
                table.entries, table.capacity
            );
        }
        let _ = writeln!(out, "   uptime: {:.0}s", self.uptime_seconds);
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:<10} {:>11} {:>9} {:>6} {:>9} {:>8} {:>7} {:>10}",
            "BACKEND",
            "PORTS",
            "STATE",
            "ESTABLISHED",
            "IN-FLIGHT",
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
                "{:<16} {:<12} {:<10} {:>11} {:>9} {:>6} {:>9} {:>8} {:>7} {:>10}",
                backend.name,
                ports,
                backend.state,
                backend.established,
                show(backend.in_flight),
                show(backend.idle),
                show(backend.accepted),
                show(backend.closed),
                show(backend.reset),
                show(backend.flow_table_full),
            );
        }
        if self
            .backends
            .iter()
            .any(|backend| backend.flow_table_full.unwrap_or(0) > 0)
        {
            let _ = writeln!(
                out,
                "warning: the flow table was full; connections beyond it are not counted \
                 (raise flow_table_size)"
            );
        }
        out
    }
}
