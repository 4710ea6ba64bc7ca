//! The agent's metrics registry: per-backend phase and connections from the kernel, drain and
//! cycle outcomes and durations, load balancer reachability; and whether the agent is ready.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    drain::{Phase, Report},
    kernel::BackendSample,
};

type Labels = Vec<(String, String)>;

/// Every phase, for the one-hot phase gauge.
const PHASES: [Phase; 6] = [
    Phase::Serving,
    Phase::Draining,
    Phase::Drained,
    Phase::Restarting,
    Phase::Verifying,
    Phase::Failed,
];

/// How long load balancers take to follow: from 10 ms (a runtime API) to a minute (a slow
/// agent-check interval).
const CONFIRMATION_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0];

/// Drain durations: from 10 ms (an idle node) to 10 minutes (Envoy's default drain).
const DURATION_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    phase: Family<Labels, Gauge>,
    connections: Family<Labels, Gauge>,
    accepted: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    reset: Family<Labels, Counter>,
    cut_in_flight: Family<Labels, Counter>,
    vanished: Family<Labels, Counter>,
    flow_table_full: Family<Labels, Counter>,
    flow_table_entries: Gauge,
    flow_table_capacity: Gauge,
    operations: Family<Labels, Counter>,
    drain_duration: Family<Labels, Histogram>,
    time_to_healthy: Family<Labels, Histogram>,
    cut_at_deadline: Family<Labels, Counter>,
    load_balancer_up: Family<Labels, Gauge>,
    confirmation_lag: Family<Labels, Histogram>,
    drift: Family<Labels, Gauge>,
    reapplied: Family<Labels, Counter>,
    backend_table: Family<Labels, Gauge>,
    gate_refused: Family<Labels, Counter>,
    gate_allowed: Family<Labels, Counter>,
    gate_closed: Family<Labels, Gauge>,
    /// Kernel totals at the previous scrape, to turn them into counter increments.
    previous: Mutex<Vec<BackendSample>>,
    ready: AtomicBool,
}

fn backend(name: &str) -> Labels {
    vec![("backend".into(), name.into())]
}

fn with(mut labels: Labels, key: &str, value: &str) -> Labels {
    labels.push((key.into(), value.into()));
    labels
}

impl Metrics {
    /// Registers every family; `backends` sizes the kernel baseline.
    pub fn new(backends: usize) -> Metrics {
        let mut registry = Registry::with_prefix("drain_agent");
        let metrics = Metrics {
            phase: Family::default(),
            connections: Family::default(),
            accepted: Family::default(),
            closed: Family::default(),
            reset: Family::default(),
            cut_in_flight: Family::default(),
            vanished: Family::default(),
            flow_table_full: Family::default(),
            flow_table_entries: Gauge::default(),
            flow_table_capacity: Gauge::default(),
            operations: Family::default(),
            drain_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            time_to_healthy: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            cut_at_deadline: Family::default(),
            load_balancer_up: Family::default(),
            confirmation_lag: Family::new_with_constructor(|| Histogram::new(CONFIRMATION_BUCKETS)),
            drift: Family::default(),
            reapplied: Family::default(),
            backend_table: Family::default(),
            gate_refused: Family::default(),
            gate_allowed: Family::default(),
            gate_closed: Family::default(),
            previous: Mutex::new(vec![BackendSample::default(); backends]),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "backend_phase",
            "Drain phase of each backend (1 for the current phase)",
            metrics.phase.clone(),
        );
        registry.register(
            "connections",
            "Connections to the backend's ports by state: established, in_flight, unknown (not seen begin, not settled yet), idle",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "Handshakes completed on the backend's ports",
            metrics.accepted.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections ended by FIN from both sides",
            metrics.closed.clone(),
        );
        registry.register(
            "connections_reset",
            "Connections ended by RST, by who sent it (client, server)",
            metrics.reset.clone(),
        );
        registry.register(
            "connections_cut_in_flight",
            "Connections the node ended while they carried a request (its RST, lost in flight, closed unanswered)",
            metrics.cut_in_flight.clone(),
        );
        registry.register(
            "connections_vanished",
            "Tracked connections that disappeared without FIN or RST",
            metrics.vanished.clone(),
        );
        registry.register(
            "flow_table_full",
            "New connections not tracked because the flow table was full",
            metrics.flow_table_full.clone(),
        );
        registry.register(
            "gate_refused",
            "New connections the kernel gate refused with a RST while the backend drained",
            metrics.gate_refused.clone(),
        );
        registry.register(
            "gate_allowed",
            "New connections from allowed sources let through a closed gate",
            metrics.gate_allowed.clone(),
        );
        registry.register(
            "gate_closed",
            "1 while the backend's kernel gate refuses new connections",
            metrics.gate_closed.clone(),
        );
        registry.register(
            "flow_table_entries",
            "Connections in the kernel flow table",
            metrics.flow_table_entries.clone(),
        );
        registry.register(
            "flow_table_capacity",
            "Size of the kernel flow table",
            metrics.flow_table_capacity.clone(),
        );
        registry.register(
            "operations",
            "Drains, cycles and resumes by outcome",
            metrics.operations.clone(),
        );
        registry.register(
            "drain_duration_seconds",
            "From the start of a drain until the backend was drained",
            metrics.drain_duration.clone(),
        );
        registry.register(
            "time_to_healthy_seconds",
            "From the restart until the health check passed",
            metrics.time_to_healthy.clone(),
        );
        registry.register(
            "connections_cut_at_deadline",
            "Requests still in flight when drain_timeout forced a drain",
            metrics.cut_at_deadline.clone(),
        );
        registry.register(
            "load_balancer_up",
            "Whether the load balancer's runtime API answers (1) or not (0)",
            metrics.load_balancer_up.clone(),
        );
        registry.register(
            "load_balancer_confirmation_seconds",
            "From a server's state change until each load balancer confirmed it (step=\"drain\" \
             or \"ready\"; via=\"runtime-api\" read back, or \"agent-check\" answered)",
            metrics.confirmation_lag.clone(),
        );
        registry.register(
            "backend_flow_table_entries",
            "The backend's entries in the kernel flow table (its share of flow_table_capacity)",
            metrics.backend_table.clone(),
        );
        registry.register(
            "load_balancer_drift",
            "Load balancers whose view of the backend's server differs from the agent's phase \
             at rest (status says how)",
            metrics.drift.clone(),
        );
        registry.register(
            "state_reapplied",
            "Times a load balancer lost the server's state during an operation (reload, \
             restart) and the agent set it again",
            metrics.reapplied.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Marks the agent ready (kernel programs attached, sockets bound) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the agent said it is ready (`/ready`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Updates the kernel-derived families from a fresh sample of every backend.
    pub fn observe_kernel(
        &self,
        names: &[String],
        phases: &[Phase],
        samples: &[BackendSample],
        table: Option<(u64, u64)>,
    ) {
        let mut previous = self.previous.lock().expect("metrics lock");
        for (index, name) in names.iter().enumerate() {
            let labels = backend(name);
            for phase in PHASES {
                self.phase
                    .get_or_create(&with(labels.clone(), "phase", phase.as_str()))
                    .set(i64::from(phases.get(index) == Some(&phase)));
            }
            let (Some(sample), Some(before)) = (samples.get(index), previous.get_mut(index)) else {
                continue;
            };
            let gauge = |state: &str, value: u64| {
                self.connections
                    .get_or_create(&with(labels.clone(), "state", state))
                    .set(value as i64);
            };
            gauge("established", sample.established);
            if let Some(unknown) = sample.unknown {
                gauge("unknown", unknown);
            }
            if let Some(entries) = sample.tracked {
                self.backend_table
                    .get_or_create(&backend(name))
                    .set(entries as i64);
            }
            if let Some(in_flight) = sample.in_flight {
                gauge("in_flight", in_flight);
                gauge("idle", sample.idle().unwrap_or(0));
            }
            let grow = |counter: &Counter, now: Option<u64>, then: Option<u64>| {
                counter.inc_by(now.unwrap_or(0).saturating_sub(then.unwrap_or(0)));
            };
            grow(
                &self.accepted.get_or_create(&labels),
                sample.accepted,
                before.accepted,
            );
            grow(
                &self.closed.get_or_create(&labels),
                sample.closed,
                before.closed,
            );
            grow(
                &self
                    .reset
                    .get_or_create(&with(labels.clone(), "by", "client")),
                sample.reset_by_client,
                before.reset_by_client,
            );
            grow(
                &self
                    .reset
                    .get_or_create(&with(labels.clone(), "by", "server")),
                sample.reset_by_server,
                before.reset_by_server,
            );
            grow(
                &self.cut_in_flight.get_or_create(&labels),
                sample.cut_in_flight,
                before.cut_in_flight,
            );
            grow(
                &self.vanished.get_or_create(&labels),
                sample.vanished,
                before.vanished,
            );
            grow(
                &self.flow_table_full.get_or_create(&labels),
                sample.flow_table_full,
                before.flow_table_full,
            );
            if let Some(gate) = &sample.gate {
                let then = before.gate.unwrap_or_default();
                grow(
                    &self.gate_refused.get_or_create(&labels),
                    Some(gate.refused),
                    Some(then.refused),
                );
                grow(
                    &self.gate_allowed.get_or_create(&labels),
                    Some(gate.allowed),
                    Some(then.allowed),
                );
                self.gate_closed
                    .get_or_create(&labels)
                    .set(i64::from(gate.closed_for.is_some()));
            }
            *before = sample.clone();
        }
        if let Some((entries, capacity)) = table {
            self.flow_table_entries.set(entries as i64);
            self.flow_table_capacity.set(capacity as i64);
        }
    }

    /// Counts a finished drain, cycle or resume.
    pub fn observe_report(&self, report: &Report) {
        let labels = backend(&report.backend);
        let outcome = serde_json::to_value(report.outcome)
            .ok()
            .and_then(|value| value.as_str().map(str::to_string))
            .unwrap_or_default();
        self.operations
            .get_or_create(&with(
                with(labels.clone(), "operation", &report.operation),
                "outcome",
                &outcome,
            ))
            .inc();
        if let Some(ms) = report.drained_ms {
            self.drain_duration
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0);
        }
        if let Some(ms) = report.time_to_healthy_ms {
            self.time_to_healthy
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0);
        }
        if let Some(cut) = report.forced_with_in_flight {
            self.cut_at_deadline.get_or_create(&labels).inc_by(cut);
        }
        // The lag is measured from the start of the phase that asked for the state.
        let started = |phase: Phase, last: bool| {
            let mut starts = report.phases.iter().filter(|timing| timing.phase == phase);
            if last {
                starts.next_back()
            } else {
                starts.next()
            }
            .map(|timing| timing.started_ms)
        };
        let draining = started(Phase::Draining, false);
        let serving = started(Phase::Serving, true);
        for lb in &report.load_balancers {
            let via = match lb.via {
                crate::drain::report::Via::RuntimeApi => "runtime-api",
                crate::drain::report::Via::AgentCheck => "agent-check",
            };
            for (step, from, at) in [
                ("drain", draining, lb.drain_confirmed_ms),
                ("ready", serving, lb.ready_confirmed_ms),
            ] {
                let (Some(from), Some(at)) = (from, at) else {
                    continue;
                };
                let lag = at.saturating_sub(from) as f64 / 1000.0;
                let labels = with(
                    with(with(labels.clone(), "load_balancer", &lb.name), "via", via),
                    "step",
                    step,
                );
                self.confirmation_lag.get_or_create(&labels).observe(lag);
            }
        }
    }

    /// How many load balancers disagree with the backend's phase at rest.
    pub fn observe_drift(&self, backend_name: &str, count: usize) {
        self.drift
            .get_or_create(&backend(backend_name))
            .set(count as i64);
    }

    /// Counts a state the agent set again on a load balancer that lost it.
    pub fn observe_reapplied(&self, backend_name: &str, load_balancer: &str) {
        self.reapplied
            .get_or_create(&with(backend(backend_name), "load_balancer", load_balancer))
            .inc();
    }

    /// Counts an operation that was refused before it changed anything.
    pub fn observe_refusal(&self, backend_name: &str, operation: &str) {
        self.operations
            .get_or_create(&with(
                with(backend(backend_name), "operation", operation),
                "outcome",
                "refused",
            ))
            .inc();
    }

    /// Records whether a load balancer's runtime API answered.
    pub fn observe_load_balancer(&self, name: &str, up: bool) {
        self.load_balancer_up
            .get_or_create(&vec![("load_balancer".into(), name.into())])
            .set(i64::from(up));
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_totals_become_counters_and_phases_one_hot() {
        let metrics = Metrics::new(1);
        let names = vec!["nova-api".to_string()];
        let sample = BackendSample {
            established: 5,
            in_flight: Some(2),
            accepted: Some(10),
            reset_by_server: Some(1),
            ..Default::default()
        };
        metrics.observe_kernel(
            &names,
            &[Phase::Draining],
            std::slice::from_ref(&sample),
            Some((5, 1024)),
        );
        let later = BackendSample {
            accepted: Some(12),
            ..sample
        };
        metrics.observe_kernel(&names, &[Phase::Draining], &[later], Some((5, 1024)));
        let text = metrics.render();
        for line in [
            "drain_agent_backend_phase{backend=\"nova-api\",phase=\"draining\"} 1",
            "drain_agent_backend_phase{backend=\"nova-api\",phase=\"serving\"} 0",
            "drain_agent_connections{backend=\"nova-api\",state=\"in_flight\"} 2",
            "drain_agent_connections{backend=\"nova-api\",state=\"idle\"} 3",
            "drain_agent_connections_accepted_total{backend=\"nova-api\"} 12",
            "drain_agent_connections_reset_total{backend=\"nova-api\",by=\"server\"} 1",
            "drain_agent_flow_table_capacity 1024",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn reports_feed_outcomes_and_duration_histograms() {
        let metrics = Metrics::new(1);
        let report: Report = serde_json::from_value(serde_json::json!({
            "backend": "nova-api", "operation": "cycle", "outcome": "ok", "exit_code": 0,
            "message": "", "phase": "serving", "phases": [], "at_drain_start": null,
            "in_flight_zero_ms": 1200, "drained_ms": 1250, "forced_with_in_flight": null,
            "restart_ms": 3000, "time_to_healthy_ms": 3100, "rollback": null,
            "load_balancers": [], "kernel": null, "total_ms": 4400
        }))
        .unwrap();
        metrics.observe_report(&report);
        let text = metrics.render();
        for line in [
            "drain_agent_operations_total{backend=\"nova-api\",operation=\"cycle\",outcome=\"ok\"} 1",
            "# TYPE drain_agent_drain_duration_seconds histogram",
            "drain_agent_drain_duration_seconds_bucket{le=\"2.5\",backend=\"nova-api\"} 1",
            "drain_agent_time_to_healthy_seconds_count{backend=\"nova-api\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
