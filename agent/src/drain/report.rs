//! What a drain or cycle tells the operator: progress while it runs, a report at the end,
//! and the exit code the CLI returns.

use serde::{Deserialize, Serialize};

use super::phase::Phase;

/// Exit codes of `drain`, `resume` and `cycle` (also in docs/operations.md).
pub mod exit {
    pub const OK: u8 = 0;
    /// The agent, a load balancer or the service answered with an error.
    pub const ERROR: u8 = 1;
    /// Usage or configuration error (unknown backend, HAProxy server not found).
    pub const CONFIG: u8 = 2;
    /// Refused for safety; nothing was changed.
    pub const REFUSED: u8 = 3;
    /// In-flight work outlived drain_timeout with on_timeout = "abort": the server was put
    /// back in service.
    pub const DRAIN_TIMEOUT: u8 = 4;
    /// The cycle failed and no rollback saved it: the restart command failed, or the
    /// restarted service never became healthy (even after the rollback). The server is left
    /// in MAINT on every load balancer.
    pub const FAILED: u8 = 5;
    /// The restart failed its health check, the rollback made the service healthy again and
    /// the server is back in service on the old version.
    pub const ROLLED_BACK: u8 = 6;
    /// The server is back in service on this node, but a load balancer (named in the
    /// message) did not confirm the return within its bound: do not drain the next node
    /// before checking it.
    pub const UNCONFIRMED: u8 = 7;
    /// (8 is the CLI's: the agent went away mid-operation.)
    /// The operation was cancelled (`resume`, or the agent stopping with
    /// `on_shutdown = "abort"`): the server was put back in service.
    pub const CANCELLED: u8 = 9;
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ok,
    Error,
    Refused,
    DrainTimeout,
    Cancelled,
    RolledBack,
    Failed,
    /// Back in service here, but a load balancer did not confirm it.
    Unconfirmed,
}

impl Outcome {
    /// The outcome as reports, logs and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
            Outcome::DrainTimeout => "drain-timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::RolledBack => "rolled-back",
            Outcome::Failed => "failed",
            Outcome::Unconfirmed => "unconfirmed",
        }
    }

    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Ok => exit::OK,
            Outcome::Error => exit::ERROR,
            Outcome::Cancelled => exit::CANCELLED,
            Outcome::Refused => exit::REFUSED,
            Outcome::DrainTimeout => exit::DRAIN_TIMEOUT,
            Outcome::RolledBack => exit::ROLLED_BACK,
            Outcome::Failed => exit::FAILED,
            Outcome::Unconfirmed => exit::UNCONFIRMED,
        }
    }
}

/// A live progress line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub backend: String,
    pub phase: Phase,
    pub in_flight: Option<u64>,
    /// Connections the agent did not see begin and cannot yet tell idle.
    #[serde(default)]
    pub unknown: Option<u64>,
    pub idle: Option<u64>,
    /// Requests HAProxy still has on (or queued for) this server, summed over load balancers;
    /// `None` while a load balancer cannot be read.
    pub lb_sessions: Option<u64>,
    pub elapsed_ms: u64,
    /// During a handover: its step and the new version's numbers (the counts above are then
    /// the old version's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandoverProgress>,
}

/// A handover's share of a progress line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HandoverProgress {
    pub step: String,
    pub new_established: Option<u64>,
    pub new_in_flight: Option<u64>,
}

impl Progress {
    /// The one-line rendering for a terminal.
    pub fn render(&self) -> String {
        let show = |value: Option<u64>| value.map_or_else(|| "-".into(), |v| v.to_string());
        if let Some(handover) = &self.handover {
            return format!(
                "{:<14} old: in-flight {:>4}  unknown {:>4}  idle {:>4}  new: in-flight {:>4}  \
                 established {:>4}  {:>6.1}s",
                handover.step,
                show(self.in_flight),
                show(self.unknown),
                show(self.idle),
                show(handover.new_in_flight),
                show(handover.new_established),
                self.elapsed_ms as f64 / 1000.0
            );
        }
        format!(
            "{:<10} in-flight {:>4}  unknown {:>4}  idle {:>4}  lb-sessions {:>4}  {:>6.1}s",
            self.phase.as_str(),
            show(self.in_flight),
            show(self.unknown),
            show(self.idle),
            self.lb_sessions
                .map_or_else(|| "?".into(), |v| v.to_string()),
            self.elapsed_ms as f64 / 1000.0
        )
    }
}

/// Connection counts at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub established: u64,
    pub in_flight: Option<u64>,
    #[serde(default)]
    pub unknown: Option<u64>,
    pub idle: Option<u64>,
}

/// One phase's timing, relative to the start of the operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PhaseTiming {
    pub phase: Phase,
    pub started_ms: u64,
    pub duration_ms: u64,
}

/// How a load balancer's confirmation was obtained.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Read back from its runtime API (`show stat` shows the state).
    #[default]
    RuntimeApi,
    /// It polled the agent-check port and was answered the new state word.
    AgentCheck,
}

/// What one load balancer confirmed, in milliseconds since the operation started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoadBalancerReport {
    /// The configured name, or "agent-check poller ADDRESS".
    pub name: String,
    pub via: Via,
    /// Answered the runtime API at the start.
    pub reachable: bool,
    pub drain_confirmed_ms: Option<u64>,
    pub maint_confirmed_ms: Option<u64>,
    pub ready_confirmed_ms: Option<u64>,
    /// The last problem with this load balancer, if any.
    pub error: Option<String>,
}

/// What the kernel saw on the backend's ports while the operation ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelSeen {
    /// RSTs the node sent on the service ports.
    pub resets_by_node: u64,
    /// RSTs clients sent.
    pub resets_by_clients: u64,
    /// Connections the node ended while they carried a request (its RST, lost in flight, or
    /// closed unanswered); a client abandoning its own request is not counted.
    pub cut_in_flight: u64,
    /// New connections accepted.
    pub accepted: u64,
}

/// What the backend's kernel gate did during the operation (backends with `gate`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GateReport {
    /// When the gate closed (ms since the operation started); `None`: it never closed.
    pub closed_ms: Option<u64>,
    /// When it opened again; `None` while it stays closed (a drain that ends drained).
    pub opened_ms: Option<u64>,
    /// The deadline the kernel opens it at by itself, counted from when it closed (s).
    pub deadline_s: u64,
    /// New connections refused with a RST while the operation ran.
    pub refused: u64,
    /// New connections from allowed sources let through meanwhile.
    pub allowed: u64,
    /// What went wrong with the gate, if anything (it fails open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The final report of a drain or cycle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub backend: String,
    /// "drain" or "cycle".
    pub operation: String,
    pub outcome: Outcome,
    pub exit_code: u8,
    /// One sentence for the operator: what happened and, when it failed, what to do.
    pub message: String,
    pub phase: Phase,
    pub phases: Vec<PhaseTiming>,
    pub at_drain_start: Option<Counts>,
    /// When the kernel's in-flight count last reached 0 (ms since the drain started).
    pub in_flight_zero_ms: Option<u64>,
    /// When the backend counted as drained (ms since the drain started).
    pub drained_ms: Option<u64>,
    /// What ended the drain, in words (the kernel's count, the load balancers' sessions, or
    /// a forced deadline).
    pub drain_evidence: Option<String>,
    /// In-flight connections when the deadline forced the drain to end (on_timeout = force).
    pub forced_with_in_flight: Option<u64>,
    pub restart_ms: Option<u64>,
    /// From the start of the restart until the health check passed.
    pub time_to_healthy_ms: Option<u64>,
    /// Whether the rollback ran, and how it went.
    pub rollback: Option<String>,
    pub load_balancers: Vec<LoadBalancerReport>,
    pub kernel: Option<KernelSeen>,
    /// The kernel gate, for a backend that has one.
    #[serde(default)]
    pub gate: Option<GateReport>,
    /// What the agent found and did when it last started after a crash, if that has not been
    /// reported yet (a reconciliation).
    pub reconciled_before: Option<String>,
    /// A same-host handover's steps and the two versions (docs/handover.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<super::handover::HandoverReport>,
    pub total_ms: u64,
}

impl Report {
    /// A report with nothing recorded yet.
    pub fn empty(backend: &str, operation: &str, phase: Phase) -> Report {
        Report {
            backend: backend.to_string(),
            operation: operation.to_string(),
            outcome: Outcome::Ok,
            exit_code: exit::OK,
            message: String::new(),
            phase,
            phases: Vec::new(),
            at_drain_start: None,
            in_flight_zero_ms: None,
            drained_ms: None,
            drain_evidence: None,
            forced_with_in_flight: None,
            restart_ms: None,
            time_to_healthy_ms: None,
            rollback: None,
            load_balancers: Vec::new(),
            kernel: None,
            gate: None,
            reconciled_before: None,
            handover: None,
            total_ms: 0,
        }
    }

    /// The human-readable summary `cycle`/`drain` print at the end.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} {}: {} — {}\n",
            self.operation,
            self.backend,
            serde_json::to_value(self.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            self.message
        );
        for timing in &self.phases {
            out.push_str(&format!(
                "  {:<10} {:>8.3}s\n",
                timing.phase.as_str(),
                timing.duration_ms as f64 / 1000.0
            ));
        }
        if let Some(counts) = &self.at_drain_start {
            let show = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
            out.push_str(&format!(
                "  at drain start: {} established, {} in flight, {} unknown, {} idle\n",
                counts.established,
                show(counts.in_flight),
                show(counts.unknown),
                show(counts.idle)
            ));
        }
        if let Some(zero) = self.in_flight_zero_ms {
            out.push_str(&format!(
                "  in-flight reached 0 after {:.3}s\n",
                zero as f64 / 1000.0
            ));
        }
        if let Some(evidence) = &self.drain_evidence {
            out.push_str(&format!("  drained because {evidence}\n"));
        }
        if let Some(forced) = self.forced_with_in_flight {
            out.push_str(&format!(
                "  forced at the deadline with {forced} request(s) still in flight\n"
            ));
        }
        for lb in &self.load_balancers {
            let at = |v: Option<u64>| {
                v.map_or_else(|| "-".into(), |v| format!("{:.3}s", v as f64 / 1000.0))
            };
            let via = match lb.via {
                Via::RuntimeApi => "runtime API",
                Via::AgentCheck => "agent-check",
            };
            out.push_str(&format!(
                "  {} ({via}): drain {} maint {} ready {}{}\n",
                lb.name,
                at(lb.drain_confirmed_ms),
                at(lb.maint_confirmed_ms),
                at(lb.ready_confirmed_ms),
                lb.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ));
        }
        if let Some(rollback) = &self.rollback {
            out.push_str(&format!("  rollback: {rollback}\n"));
        }
        if let Some(reconciled) = &self.reconciled_before {
            out.push_str(&format!("  before this: {reconciled}\n"));
        }
        if let Some(kernel) = &self.kernel {
            out.push_str(&format!(
                "  kernel: {} resets sent by the node, {} connections cut with a request in flight\n",
                kernel.resets_by_node, kernel.cut_in_flight
            ));
        }
        if let Some(gate) = &self.gate {
            out.push_str(&format!("  gate: {}\n", gate.render()));
        }
        if let Some(handover) = &self.handover {
            out.push_str(&handover.render());
        }
        out
    }
}

impl GateReport {
    /// One line: when it closed and opened, and what it refused.
    pub fn render(&self) -> String {
        let at = |ms: u64| format!("{:.3}s", ms as f64 / 1000.0);
        let mut line = match (self.closed_ms, self.opened_ms) {
            (None, _) => "never closed".to_string(),
            (Some(closed), Some(opened)) => {
                format!("closed at {} and opened at {}", at(closed), at(opened))
            }
            (Some(closed), None) => format!(
                "closed at {} and still closed (it opens by itself {}s after closing)",
                at(closed),
                self.deadline_s
            ),
        };
        line.push_str(&format!(
            "; {} new connection(s) refused, {} from allowed sources let through",
            self.refused, self.allowed
        ));
        if let Some(problem) = &self.problem {
            line.push_str(&format!(" ({problem})"));
        }
        line
    }
}
