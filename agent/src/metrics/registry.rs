//! The agent's metrics registry: per-backend phase and connections from the kernel, every
//! operation with its outcome and durations, load balancer reachability, the build and the
//! process; and whether the agent is ready.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::process::ProcessCollector;
use crate::{
    drain::{Phase, Report},
    kernel::BackendSample,
    kernel::features::FeatureStatus,
};

type Labels = Vec<(String, String)>;
/// A gauge holding seconds or a Unix time.
type Seconds = Gauge<f64, AtomicU64>;

/// Every phase, for the one-hot phase gauge.
const PHASES: [Phase; 7] = [
    Phase::Serving,
    Phase::HandingOver,
    Phase::Draining,
    Phase::Drained,
    Phase::Restarting,
    Phase::Verifying,
    Phase::Failed,
];

/// Every operation the agent counts; `reconcile` is what a restarted agent does with the
/// operation its predecessor left unfinished.
pub const OPERATIONS: [&str; 5] = ["drain", "cycle", "handover", "resume", "reconcile"];

/// Every outcome label: the report's outcomes, and `forced` for a drain that
/// `on_timeout = "force"` ended at its deadline with requests in flight.
pub const OUTCOMES: [&str; 9] = [
    "ok",
    "forced",
    "refused",
    "cancelled",
    "drain-timeout",
    "rolled-back",
    "failed",
    "unconfirmed",
    "error",
];

/// How long load balancers take to follow: from 10 ms (a runtime API) to a minute (a slow
/// agent-check interval).
const CONFIRMATION_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0];

/// Drain and operation durations: from 10 ms (an idle node) to 10 minutes (Envoy's default
/// drain).
const DURATION_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    kernel_feature: Family<Labels, Gauge>,
    phase: Family<Labels, Gauge>,
    phase_since: Family<Labels, Seconds>,
    connections: Family<Labels, Gauge>,
    accepted: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    reset: Family<Labels, Counter>,
    cut_in_flight: Family<Labels, Counter>,
    vanished: Family<Labels, Counter>,
    flow_table_full: Family<Labels, Counter>,
    /// Registered in eBPF mode only: procfs mode has no flow table.
    flow_table_entries: Gauge,
    flow_table_capacity: Gauge,
    kernel_read_failures: Counter,
    kernel_last_read: Seconds,
    operations: Family<Labels, Counter>,
    operation_duration: Family<Labels, Histogram>,
    phase_duration: Family<Labels, Histogram>,
    last_operation: Family<Labels, Seconds>,
    drain_duration: Family<Labels, Histogram>,
    time_to_healthy: Family<Labels, Histogram>,
    in_flight_at_deadline: Family<Labels, Counter>,
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

/// Seconds since the Unix epoch of a moment `ago` before now.
fn unix_seconds(ago: Duration) -> f64 {
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |since| since.as_secs_f64())
}

/// The label a finished report is counted under: its outcome, or `forced` for a drain ended
/// at its deadline with requests still in flight (it did not drain: it is not `ok`).
pub fn outcome_label(report: &Report) -> &'static str {
    match report.outcome {
        crate::drain::Outcome::Ok if report.forced_with_in_flight.is_some() => "forced",
        outcome => outcome.as_str(),
    }
}

impl Metrics {
    /// Registers every family and creates every backend's operation counters at 0, so a
    /// first failure is an increase (`increase()` cannot see a series born at 1).
    pub fn new(backends: &[String], kernel_mode: &str) -> Metrics {
        let metrics = Metrics {
            kernel_feature: Family::default(),
            phase: Family::default(),
            phase_since: Family::default(),
            connections: Family::default(),
            accepted: Family::default(),
            closed: Family::default(),
            reset: Family::default(),
            cut_in_flight: Family::default(),
            vanished: Family::default(),
            flow_table_full: Family::default(),
            flow_table_entries: Gauge::default(),
            flow_table_capacity: Gauge::default(),
            kernel_read_failures: Counter::default(),
            kernel_last_read: Seconds::default(),
            operations: Family::default(),
            operation_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            phase_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            last_operation: Family::default(),
            drain_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            time_to_healthy: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            in_flight_at_deadline: Family::default(),
            load_balancer_up: Family::default(),
            confirmation_lag: Family::new_with_constructor(|| Histogram::new(CONFIRMATION_BUCKETS)),
            drift: Family::default(),
            reapplied: Family::default(),
            backend_table: Family::default(),
            gate_refused: Family::default(),
            gate_allowed: Family::default(),
            gate_closed: Family::default(),
            previous: Mutex::new(vec![BackendSample::default(); backends.len()]),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("drain_agent");
        let build_info: Family<Labels, Gauge> = Family::default();
        build_info
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register(
            "build_info",
            "The running drain-agent's version (always 1)",
            build_info,
        );
        let kernel: Family<Labels, Gauge> = Family::default();
        kernel
            .get_or_create(&vec![("mode".into(), kernel_mode.into())])
            .set(1);
        registry.register(
            "kernel_mode",
            "Where connection numbers come from: mode=\"ebpf\" (kernel programs) or \"procfs\" \
             (degraded: established connections only; in-flight and the connection counters \
             are not served)",
            kernel,
        );
        registry.register(
            "kernel_feature",
            "What runs on this kernel (1 for each feature's state): feature=\"accounting\", \
             \"gate\" or \"handover\"; state=\"active\", \"unsupported\" (configured, but \
             the kernel refused its program) or \"not_configured\"",
            metrics.kernel_feature.clone(),
        );
        registry.register(
            "backend_phase",
            "Drain phase of each backend (1 for the current phase)",
            metrics.phase.clone(),
        );
        registry.register(
            "backend_phase_since_timestamp_seconds",
            "Unix time the backend entered its current phase",
            metrics.phase_since.clone(),
        );
        registry.register(
            "connections",
            "Connections to the backend's ports by state: established, in_flight, unknown (not \
             seen begin, not settled yet), idle",
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
            "Connections the node ended while they carried a request (its RST, lost in flight, \
             closed unanswered)",
            metrics.cut_in_flight.clone(),
        );
        registry.register(
            "connections_vanished",
            "Tracked connections that disappeared without FIN or RST",
            metrics.vanished.clone(),
        );
        registry.register(
            "flow_table_full",
            "New connections not tracked: the kernel could not allocate their storage (they are counted as unknown from the socket table)",
            metrics.flow_table_full.clone(),
        );
        if kernel_mode == "ebpf" {
            registry.register(
                "flow_table_entries",
                "Entries of the table of seeded connections (older than the agent, or untracked)",
                metrics.flow_table_entries.clone(),
            );
            registry.register(
                "flow_table_capacity",
                "Size of the table of seeded connections (older than the agent, or untracked): flow_table_size",
                metrics.flow_table_capacity.clone(),
            );
        }
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
            "kernel_read_failures",
            "Scrapes whose kernel counters could not be read (the connection gauges are then \
             left out, never served stale)",
            metrics.kernel_read_failures.clone(),
        );
        registry.register(
            "kernel_last_read_timestamp_seconds",
            "Unix time of the last successful read of the kernel counters",
            metrics.kernel_last_read.clone(),
        );
        registry.register(
            "operations",
            "Drains, cycles and resumes by outcome, counted once when they end (refused: did not \
             start; forced: on_timeout = \"force\" ended the drain with requests in flight)",
            metrics.operations.clone(),
        );
        registry.register(
            "operation_duration_seconds",
            "From the start of a drain, cycle or resume until it ended, by operation and outcome",
            metrics.operation_duration.clone(),
        );
        registry.register(
            "phase_duration_seconds",
            "How long each phase of an operation lasted (phases shorter than a scrape show here)",
            metrics.phase_duration.clone(),
        );
        registry.register(
            "last_operation_end_timestamp_seconds",
            "Unix time the backend's last drain, cycle or resume ended (refusals included)",
            metrics.last_operation.clone(),
        );
        registry.register(
            "drain_duration_seconds",
            "From the start of a drain until the backend was drained (forced drains are not \
             observed: they ended at their deadline)",
            metrics.drain_duration.clone(),
        );
        registry.register(
            "time_to_healthy_seconds",
            "From the restart until the health check passed",
            metrics.time_to_healthy.clone(),
        );
        registry.register(
            "requests_in_flight_at_deadline",
            "Requests still in flight when on_timeout = \"force\" ended a drain at drain_timeout",
            metrics.in_flight_at_deadline.clone(),
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
            "The backend's tracked connections",
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
        for name in backends {
            for operation in OPERATIONS {
                for outcome in OUTCOMES {
                    let _created = metrics.operations.get_or_create(&with(
                        with(backend(name), "operation", operation),
                        "outcome",
                        outcome,
                    ));
                }
            }
            let _created = metrics.drift.get_or_create(&backend(name));
            let _created = metrics.in_flight_at_deadline.get_or_create(&backend(name));
        }
        Metrics {
            registry: root,
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

    /// Sets each backend's phase and since when it is in it (`since`: how long ago).
    pub fn observe_phases(&self, names: &[String], phases: &[(Phase, Duration)]) {
        for (name, (current, since)) in names.iter().zip(phases) {
            let labels = backend(name);
            for phase in PHASES {
                self.phase
                    .get_or_create(&with(labels.clone(), "phase", phase.as_str()))
                    .set(i64::from(*current == phase));
            }
            self.phase_since
                .get_or_create(&labels)
                .set(unix_seconds(*since));
        }
    }

    /// The kernel counters could not be read: counted, and the connection gauges are left
    /// out rather than served stale.
    pub fn observe_kernel_failure(&self) {
        self.kernel_read_failures.inc();
        self.connections.clear();
        self.backend_table.clear();
    }

    /// Updates the kernel-derived families from a fresh sample of every backend. What the
    /// kernel mode cannot know (`None`) is not served at all.
    pub fn observe_kernel(
        &self,
        names: &[String],
        samples: &[BackendSample],
        table: Option<(u64, u64)>,
    ) {
        self.kernel_last_read.set(unix_seconds(Duration::ZERO));
        let mut previous = self.previous.lock().expect("metrics lock");
        for (index, name) in names.iter().enumerate() {
            let labels = backend(name);
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
            let grow = |family: &Family<Labels, Counter>,
                        labels: Labels,
                        now: Option<u64>,
                        then: Option<u64>| {
                if let Some(now) = now {
                    family
                        .get_or_create(&labels)
                        .inc_by(now.saturating_sub(then.unwrap_or(0)));
                }
            };
            grow(
                &self.accepted,
                labels.clone(),
                sample.accepted,
                before.accepted,
            );
            grow(&self.closed, labels.clone(), sample.closed, before.closed);
            grow(
                &self.reset,
                with(labels.clone(), "by", "client"),
                sample.reset_by_client,
                before.reset_by_client,
            );
            grow(
                &self.reset,
                with(labels.clone(), "by", "server"),
                sample.reset_by_server,
                before.reset_by_server,
            );
            grow(
                &self.cut_in_flight,
                labels.clone(),
                sample.cut_in_flight,
                before.cut_in_flight,
            );
            grow(
                &self.vanished,
                labels.clone(),
                sample.vanished,
                before.vanished,
            );
            grow(
                &self.flow_table_full,
                labels.clone(),
                sample.flow_table_full,
                before.flow_table_full,
            );
            if let Some(gate) = &sample.gate {
                let then = before.gate.unwrap_or_default();
                grow(
                    &self.gate_refused,
                    labels.clone(),
                    Some(gate.refused),
                    Some(then.refused),
                );
                grow(
                    &self.gate_allowed,
                    labels.clone(),
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

    /// Counts a finished drain, cycle or resume, once.
    pub fn observe_report(&self, report: &Report) {
        let labels = backend(&report.backend);
        let outcome = outcome_label(report);
        let by_outcome = with(
            with(labels.clone(), "operation", &report.operation),
            "outcome",
            outcome,
        );
        self.operations.get_or_create(&by_outcome).inc();
        self.operation_duration
            .get_or_create(&by_outcome)
            .observe(report.total_ms as f64 / 1000.0);
        self.last_operation
            .get_or_create(&labels)
            .set(unix_seconds(Duration::ZERO));
        for timing in &report.phases {
            self.phase_duration
                .get_or_create(&with(labels.clone(), "phase", timing.phase.as_str()))
                .observe(timing.duration_ms as f64 / 1000.0);
        }
        match (report.drained_ms, report.forced_with_in_flight) {
            (_, Some(in_flight)) => {
                self.in_flight_at_deadline
                    .get_or_create(&labels)
                    .inc_by(in_flight);
            }
            (Some(ms), None) => self
                .drain_duration
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0),
            (None, None) => {}
        }
        if let Some(ms) = report.time_to_healthy_ms {
            self.time_to_healthy
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0);
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

    /// Counts an operation that was refused before it changed anything.
    pub fn observe_refusal(&self, backend_name: &str, operation: &str) {
        let labels = backend(backend_name);
        self.operations
            .get_or_create(&with(
                with(labels.clone(), "operation", operation),
                "outcome",
                "refused",
            ))
            .inc();
        self.last_operation
            .get_or_create(&labels)
            .set(unix_seconds(Duration::ZERO));
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

    /// Records whether a load balancer's runtime API answered.
    pub fn observe_load_balancer(&self, name: &str, up: bool) {
        self.load_balancer_up
            .get_or_create(&vec![("load_balancer".into(), name.into())])
            .set(i64::from(up));
    }

    /// The OpenMetrics text exposition (`exposition.rs` turns it into Prometheus text).
    /// Sets what runs on this kernel (once, at start).
    pub fn kernel_features(&self, features: &[FeatureStatus]) {
        for status in features {
            self.kernel_feature
                .get_or_create(&vec![
                    ("feature".into(), status.feature.clone()),
                    ("state".into(), status.state.as_str().into()),
                ])
                .set(1);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::features::FeatureState;

    #[test]
    fn kernel_features_are_exposed_by_name_and_state() {
        let metrics = Metrics::new(&names(), "ebpf");
        metrics.kernel_features(&[
            FeatureStatus {
                feature: "accounting".into(),
                state: FeatureState::Active,
                detail: None,
            },
            FeatureStatus {
                feature: "gate".into(),
                state: FeatureState::Unsupported,
                detail: Some("the verifier said: unknown func".into()),
            },
        ]);
        has(
            &metrics.render(),
            &[
                "drain_agent_kernel_feature{feature=\"accounting\",state=\"active\"} 1",
                "drain_agent_kernel_feature{feature=\"gate\",state=\"unsupported\"} 1",
            ],
        );
    }

    fn names() -> Vec<String> {
        vec!["nova-api".to_string()]
    }

    fn report(outcome: &str, extra: serde_json::Value) -> Report {
        let mut value = serde_json::json!({
            "backend": "nova-api", "operation": "cycle", "outcome": outcome, "exit_code": 0,
            "message": "", "phase": "serving", "phases": [], "at_drain_start": null,
            "in_flight_zero_ms": 1200, "drained_ms": 1250, "forced_with_in_flight": null,
            "restart_ms": 3000, "time_to_healthy_ms": 3100, "rollback": null,
            "load_balancers": [], "kernel": null, "total_ms": 4400
        });
        for (key, field) in extra.as_object().unwrap() {
            value[key] = field.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn has(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn kernel_totals_become_counters_and_phases_one_hot() {
        let metrics = Metrics::new(&names(), "ebpf");
        let sample = BackendSample {
            established: 5,
            in_flight: Some(2),
            accepted: Some(10),
            reset_by_server: Some(1),
            ..Default::default()
        };
        metrics.observe_phases(&names(), &[(Phase::Draining, Duration::from_secs(3))]);
        metrics.observe_kernel(&names(), std::slice::from_ref(&sample), Some((5, 1024)));
        let later = BackendSample {
            accepted: Some(12),
            ..sample
        };
        metrics.observe_kernel(&names(), &[later], Some((5, 1024)));
        let text = metrics.render();
        has(
            &text,
            &[
                "drain_agent_backend_phase{backend=\"nova-api\",phase=\"draining\"} 1",
                "drain_agent_backend_phase{backend=\"nova-api\",phase=\"serving\"} 0",
                "drain_agent_backend_phase_since_timestamp_seconds{backend=\"nova-api\"} 1",
                "drain_agent_connections{backend=\"nova-api\",state=\"in_flight\"} 2",
                "drain_agent_connections{backend=\"nova-api\",state=\"idle\"} 3",
                "drain_agent_connections_accepted_total{backend=\"nova-api\"} 12",
                "drain_agent_connections_reset_total{backend=\"nova-api\",by=\"server\"} 1",
                "drain_agent_flow_table_capacity 1024",
                "drain_agent_kernel_mode{mode=\"ebpf\"} 1",
                "drain_agent_build_info{version=\"",
                "process_resident_memory_bytes ",
            ],
        );
    }

    #[test]
    fn procfs_mode_serves_no_counter_it_cannot_know() {
        let metrics = Metrics::new(&names(), "procfs");
        let sample = BackendSample {
            established: 4,
            unknown: Some(4),
            ..Default::default()
        };
        metrics.observe_kernel(&names(), &[sample], None);
        let text = metrics.render();
        has(
            &text,
            &[
                "drain_agent_connections{backend=\"nova-api\",state=\"established\"} 4",
                "drain_agent_kernel_mode{mode=\"procfs\"} 1",
            ],
        );
        for absent in [
            "state=\"in_flight\"",
            "state=\"idle\"",
            "drain_agent_connections_accepted_total{",
            "drain_agent_connections_cut_in_flight_total{",
            "drain_agent_flow_table_full_total{",
            "drain_agent_flow_table_entries 0",
        ] {
            assert!(
                !text.contains(absent),
                "{absent} served in procfs mode:\n{text}"
            );
        }
    }

    #[test]
    fn a_failed_kernel_read_is_counted_and_its_gauges_are_not_served_stale() {
        let metrics = Metrics::new(&names(), "ebpf");
        let sample = BackendSample {
            established: 5,
            in_flight: Some(2),
            ..Default::default()
        };
        metrics.observe_kernel(&names(), &[sample], Some((5, 1024)));
        metrics.observe_kernel_failure();
        let text = metrics.render();
        has(&text, &["drain_agent_kernel_read_failures_total 1"]);
        assert!(!text.contains("drain_agent_connections{"), "{text}");
    }

    #[test]
    fn every_operation_counter_exists_at_0_before_the_first_operation() {
        let metrics = Metrics::new(&names(), "ebpf");
        let text = metrics.render();
        for operation in OPERATIONS {
            for outcome in OUTCOMES {
                has(
                    &text,
                    &[&format!(
                        "drain_agent_operations_total{{backend=\"nova-api\",operation=\"{operation}\",outcome=\"{outcome}\"}} 0"
                    )],
                );
            }
        }
    }

    #[test]
    fn reports_feed_outcomes_and_duration_histograms() {
        let metrics = Metrics::new(&names(), "ebpf");
        metrics.observe_report(&report(
            "ok",
            serde_json::json!({"phases": [
                {"phase": "draining", "started_ms": 0, "duration_ms": 1250},
                {"phase": "restarting", "started_ms": 1250, "duration_ms": 40},
            ]}),
        ));
        let text = metrics.render();
        has(
            &text,
            &[
                "drain_agent_operations_total{backend=\"nova-api\",operation=\"cycle\",outcome=\"ok\"} 1",
                "# TYPE drain_agent_drain_duration_seconds histogram",
                "drain_agent_drain_duration_seconds_bucket{le=\"2.5\",backend=\"nova-api\"} 1",
                "drain_agent_time_to_healthy_seconds_count{backend=\"nova-api\"} 1",
                "drain_agent_operation_duration_seconds_count{backend=\"nova-api\",operation=\"cycle\",outcome=\"ok\"} 1",
                "drain_agent_phase_duration_seconds_bucket{le=\"0.05\",backend=\"nova-api\",phase=\"restarting\"} 1",
                "drain_agent_last_operation_end_timestamp_seconds{backend=\"nova-api\"} 1",
            ],
        );
    }

    #[test]
    fn a_forced_drain_is_counted_forced_and_its_deadline_is_not_a_drain_duration() {
        let metrics = Metrics::new(&names(), "ebpf");
        metrics.observe_report(&report(
            "ok",
            serde_json::json!({"forced_with_in_flight": 2, "drained_ms": 30000}),
        ));
        let text = metrics.render();
        has(
            &text,
            &[
                "drain_agent_operations_total{backend=\"nova-api\",operation=\"cycle\",outcome=\"forced\"} 1",
                "drain_agent_operations_total{backend=\"nova-api\",operation=\"cycle\",outcome=\"ok\"} 0",
                "drain_agent_requests_in_flight_at_deadline_total{backend=\"nova-api\"} 2",
            ],
        );
        assert!(
            !text.contains("drain_agent_drain_duration_seconds_count{backend=\"nova-api\"}"),
            "{text}"
        );
    }
}
