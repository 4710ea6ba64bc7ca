//! The drain and cycle operations, run by the agent on behalf of the CLI.
//!
//! The order of steps is what makes them safe: the phase (and so the agent-check answer)
//! changes before the runtime API commands, so an HAProxy that misses a command converges on
//! its next agent check; the server goes back to `ready` only after its health check passed;
//! and every failure path either restores the previous state or says plainly what it left.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    phase::{Board, Phase, millis},
    report::{
        Counts, KernelSeen, LoadBalancerReport, Outcome, PhaseTiming, Progress, Report, exit,
    },
};
use crate::{
    config::{Backend, Config, HealthCheck, OnTimeout, Probe},
    haproxy::{AdminState, HaproxyError, RuntimeApiClient},
    health,
    kernel::BackendSample,
    service,
};

/// How often the kernel counters are read while draining (cheap: O(CPUs)).
const KERNEL_POLL: Duration = Duration::from_millis(10);
/// How often HAProxy's view is read while draining.
const LB_POLL: Duration = Duration::from_millis(200);
/// How long a load balancer may take to show DRAIN or MAINT after the command.
const STATE_CONFIRM_WITHIN: Duration = Duration::from_secs(5);
/// How long it may take to show the server UP again (its health checks must pass).
const READY_CONFIRM_WITHIN: Duration = Duration::from_secs(30);
/// How often progress lines are sent.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Which operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Drain and leave the server in MAINT.
    Drain,
    /// Drain, restart, verify, put back.
    Cycle,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Drain => "drain",
            Kind::Cycle => "cycle",
        }
    }
}

/// Reads the kernel's numbers for a backend (implemented by the agent).
pub trait KernelView: Send + Sync + 'static {
    fn sample(&self, backend: usize) -> Option<BackendSample>;
}

/// An operation that did not start; nothing was changed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub exit_code: u8,
    pub message: String,
}

impl Refusal {
    fn new(exit_code: u8, message: impl Into<String>) -> Refusal {
        Refusal {
            exit_code,
            message: message.into(),
        }
    }
}

/// What an operation sends back while it runs.
#[derive(Debug)]
pub enum Event {
    /// The load balancers confirmed the drain; the operation goes on in the agent.
    Started,
    Progress(Progress),
    Done(Box<Report>),
}

/// Starts and tracks drains and cycles on this node.
pub struct Operations {
    config: Arc<Config>,
    board: Arc<Board>,
    kernel: Arc<dyn KernelView>,
    /// Set to the reason to ask the running drain to give up and restore service.
    cancel: watch::Sender<Option<String>>,
}

impl Operations {
    pub fn new(config: Arc<Config>, board: Arc<Board>, kernel: Arc<dyn KernelView>) -> Operations {
        Operations {
            config,
            board,
            kernel,
            cancel: watch::channel(None).0,
        }
    }

    pub fn board(&self) -> &Arc<Board> {
        &self.board
    }

    /// Asks a running drain to stop and put the server back in service. A restart or health
    /// check already under way is not interrupted: the cycle ends as it ends.
    pub fn cancel(&self, reason: &str) {
        let _ = self.cancel.send(Some(reason.to_string()));
    }

    /// Checks that the operation may run, then runs it in the background; events arrive on
    /// the returned channel until `Event::Done`.
    pub async fn start(
        self: &Arc<Self>,
        backend_name: &str,
        kind: Kind,
    ) -> Result<mpsc::Receiver<Event>, Refusal> {
        let (index, backend) = self.backend(backend_name)?;
        if kind == Kind::Cycle && backend.restart.is_none() {
            return Err(Refusal::new(
                exit::CONFIG,
                format!(
                    "backend `{}` has no `restart` in {}: add restart = {{ systemd_unit = \
                     \"...\" }} or {{ command = [...] }}",
                    backend.name,
                    self.config.path.display()
                ),
            ));
        }
        if backend.haproxy.is_none() && self.config.agent_check_listen.is_none() {
            return Err(Refusal::new(
                exit::CONFIG,
                format!(
                    "backend `{}` has no `haproxy` server and agent_check_listen is not set: \
                     nothing would stop new requests reaching it",
                    backend.name
                ),
            ));
        }
        let claim = self
            .board
            .claim(format!("{} {}", kind.as_str(), backend.name))
            .map_err(|other| {
                Refusal::new(
                    exit::REFUSED,
                    format!(
                        "refused: `{other}` is already running on this node; one drain at a time"
                    ),
                )
            })?;
        let phase = self.board.get(index).phase;
        let allowed = match kind {
            Kind::Drain => phase == Phase::Serving,
            Kind::Cycle => matches!(phase, Phase::Serving | Phase::Drained),
        };
        if !allowed {
            return Err(Refusal::new(
                exit::REFUSED,
                format!(
                    "refused: backend `{}` is {}; `drain-agent resume {}` puts it back in service first",
                    backend.name,
                    phase.as_str(),
                    backend.name
                ),
            ));
        }
        let lbs = self.preflight(&backend).await?;

        let (events, receiver) = mpsc::channel(64);
        let _ = self.cancel.send(None);
        let this = self.clone();
        tokio::spawn(async move {
            let _claim = claim;
            let mut run = Run::new(&this, index, backend, kind, lbs, events.clone());
            let report = run.execute(phase).await;
            info!(
                backend = report.backend,
                outcome = ?report.outcome,
                message = report.message,
                "{} finished",
                report.operation
            );
            let _ = events.send(Event::Done(Box::new(report))).await;
        });
        Ok(receiver)
    }

    /// Puts a backend back in service: asks a running drain of it to stop, then sets the
    /// server ready everywhere.
    pub async fn resume(self: &Arc<Self>, backend_name: &str) -> Result<Report, Refusal> {
        let (index, backend) = self.backend(backend_name)?;
        if let Some(running) = self.board.running() {
            if running == format!("drain {}", backend.name)
                && self.board.get(index).phase == Phase::Draining
            {
                self.cancel("`resume`");
                // The drain restores service itself; wait until it has let go of the node.
                let deadline = Instant::now() + Duration::from_secs(30);
                while self.board.running().is_some() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } else {
                return Err(Refusal::new(
                    exit::REFUSED,
                    format!("refused: `{running}` is running on this node; wait for it to finish"),
                ));
            }
        }
        let _claim = self
            .board
            .claim(format!("resume {}", backend.name))
            .map_err(|other| {
                Refusal::new(exit::REFUSED, format!("refused: `{other}` is running"))
            })?;
        let lbs = RuntimeApiClient::for_each(&self.config.load_balancers);
        let (events, _) = mpsc::channel(1);
        let mut run = Run::new(self, index, backend, Kind::Drain, lbs, events);
        run.operation = "resume";
        Ok(run.resume().await)
    }

    fn backend(&self, name: &str) -> Result<(usize, Backend), Refusal> {
        self.config
            .backends
            .iter()
            .position(|backend| backend.name == name)
            .map(|index| (index, self.config.backends[index].clone()))
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .config
                    .backends
                    .iter()
                    .map(|b| b.name.as_str())
                    .collect();
                Refusal::new(
                    exit::CONFIG,
                    format!(
                        "no backend named `{name}` in {}; configured: {}",
                        self.config.path.display(),
                        known.join(", ")
                    ),
                )
            })
    }

    /// Asks every load balancer about the backend before anything changes: the server must
    /// exist, enough other servers must stay UP, and an unreachable load balancer is only
    /// acceptable when agent-check can still tell it.
    async fn preflight(&self, backend: &Backend) -> Result<Vec<RuntimeApiClient>, Refusal> {
        let clients = RuntimeApiClient::for_each(&self.config.load_balancers);
        let Some(server) = &backend.haproxy else {
            return Ok(clients);
        };
        let mut unreachable = Vec::new();
        for client in &clients {
            let servers = match client.servers(&server.backend).await {
                Ok(servers) => servers,
                Err(err) if err.is_unreachable() => {
                    unreachable.push(err.to_string());
                    continue;
                }
                Err(err) => return Err(Refusal::new(exit::ERROR, err.to_string())),
            };
            if !servers.iter().any(|stat| stat.name == server.server) {
                let err = HaproxyError::NoSuchServer {
                    lb: client.name().to_string(),
                    backend: server.backend.clone(),
                    server: server.server.clone(),
                };
                return Err(Refusal::new(exit::CONFIG, err.to_string()));
            }
            let others: Vec<_> = servers
                .iter()
                .filter(|stat| stat.name != server.server)
                .collect();
            let serving = others.iter().filter(|stat| stat.is_serving()).count();
            if (serving as u64) < u64::from(backend.min_serving) {
                let states: Vec<String> = others
                    .iter()
                    .map(|stat| format!("{}/{} is {}", server.backend, stat.name, stat.status))
                    .collect();
                return Err(Refusal::new(
                    exit::REFUSED,
                    format!(
                        "refused: draining {}/{} would leave {serving} other server(s) UP on {} \
                         (min_serving = {}): {}",
                        server.backend,
                        server.server,
                        client.name(),
                        backend.min_serving,
                        if states.is_empty() {
                            "no other servers".to_string()
                        } else {
                            states.join(", ")
                        }
                    ),
                ));
            }
        }
        if !unreachable.is_empty() && self.config.agent_check_listen.is_none() {
            return Err(Refusal::new(
                exit::REFUSED,
                format!(
                    "refused: {}; without agent_check_listen that load balancer would keep \
                     sending requests to this node. Fix its runtime_api, or enable agent-check",
                    unreachable.join("; ")
                ),
            ));
        }
        for problem in &unreachable {
            warn!(
                problem,
                "load balancer unreachable: it will learn the state from agent-check"
            );
        }
        Ok(clients)
    }
}

/// One running operation.
struct Run {
    config: Arc<Config>,
    board: Arc<Board>,
    kernel: Arc<dyn KernelView>,
    cancel: watch::Receiver<Option<String>>,
    index: usize,
    backend: Backend,
    kind: Kind,
    operation: &'static str,
    lbs: Vec<RuntimeApiClient>,
    events: mpsc::Sender<Event>,
    started: Instant,
    phase_started: Instant,
    report: Report,
    kernel_at_start: Option<BackendSample>,
}

impl Run {
    fn new(
        ops: &Operations,
        index: usize,
        backend: Backend,
        kind: Kind,
        lbs: Vec<RuntimeApiClient>,
        events: mpsc::Sender<Event>,
    ) -> Run {
        let now = Instant::now();
        let phase = ops.board.get(index).phase;
        Run {
            config: ops.config.clone(),
            board: ops.board.clone(),
            kernel: ops.kernel.clone(),
            cancel: ops.cancel.subscribe(),
            index,
            report: Report {
                backend: backend.name.clone(),
                operation: kind.as_str().to_string(),
                outcome: Outcome::Ok,
                exit_code: exit::OK,
                message: String::new(),
                phase,
                phases: Vec::new(),
                at_drain_start: None,
                in_flight_zero_ms: None,
                drained_ms: None,
                forced_with_in_flight: None,
                restart_ms: None,
                time_to_healthy_ms: None,
                rollback: None,
                load_balancers: lbs
                    .iter()
                    .map(|lb| LoadBalancerReport {
                        name: lb.name().to_string(),
                        reachable: true,
                        ..Default::default()
                    })
                    .collect(),
                kernel: None,
                total_ms: 0,
            },
            backend,
            kind,
            operation: kind.as_str(),
            lbs,
            events,
            started: now,
            phase_started: now,
            kernel_at_start: ops.kernel.sample(index),
        }
    }

    async fn execute(&mut self, from: Phase) -> Report {
        if from == Phase::Serving {
            if let Err(outcome) = self.drain().await {
                return self.finish(outcome.0, outcome.1);
            }
        }
        if self.kind == Kind::Drain {
            return self.finish(
                Outcome::Ok,
                format!(
                    "drained; the server is in MAINT. `drain-agent resume {}` puts it back",
                    self.backend.name
                ),
            );
        }
        self.restart_and_verify().await
    }

    /// serving → draining → drained. `Err` carries the outcome when the drain did not finish.
    async fn drain(&mut self) -> Result<(), (Outcome, String)> {
        let sample = self.kernel.sample(self.index);
        self.report.at_drain_start = sample.as_ref().map(|sample| Counts {
            established: sample.established,
            in_flight: sample.in_flight,
            idle: sample
                .in_flight
                .map(|f| sample.established.saturating_sub(f)),
        });
        self.enter(Phase::Draining, None);
        if let Err(err) = self.set_all(AdminState::Drain).await {
            self.restore_service().await;
            return Err((
                Outcome::Error,
                format!("{err}; the server was put back in service"),
            ));
        }
        let _ = self.events.send(Event::Started).await;

        let drain_started = Instant::now();
        let deadline = drain_started + self.backend.drain_timeout;
        let quiet_period = self.config.quiet_period;
        let mut lb_sessions = 0u64;
        let mut last_lb_poll: Option<Instant> = None;
        let mut last_progress: Option<Instant> = None;
        loop {
            let sample = self.kernel.sample(self.index).unwrap_or_default();
            if last_lb_poll.is_none_or(|at| at.elapsed() >= LB_POLL) {
                lb_sessions = self.lb_sessions().await;
                last_lb_poll = Some(Instant::now());
            }
            let kernel_quiet = match sample.in_flight {
                Some(in_flight) => {
                    in_flight == 0
                        && sample
                            .since_last_idle
                            .is_none_or(|since| since >= quiet_period)
                }
                // procfs mode: no in-flight view; rely on HAProxy's sessions and one quiet period.
                None => drain_started.elapsed() >= quiet_period,
            };
            if last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) {
                let _ = self
                    .events
                    .try_send(Event::Progress(self.progress(&sample, lb_sessions)));
                last_progress = Some(Instant::now());
            }
            if kernel_quiet && lb_sessions == 0 {
                // Confirm HAProxy's side right now rather than from a poll up to 200 ms old.
                lb_sessions = self.lb_sessions().await;
                if lb_sessions == 0 {
                    self.report.drained_ms = Some(millis(drain_started.elapsed()));
                    self.report.in_flight_zero_ms = sample.since_last_idle.and_then(|since| {
                        let zero_at = Instant::now().checked_sub(since)?;
                        zero_at.checked_duration_since(drain_started).map(millis)
                    });
                    break;
                }
            }
            let cancelled = self.cancel.borrow().clone();
            if let Some(by) = cancelled {
                self.restore_service().await;
                return Err((
                    Outcome::Cancelled,
                    format!("drain cancelled by {by}; the server is back in service"),
                ));
            }
            if Instant::now() >= deadline {
                let in_flight = sample.in_flight.unwrap_or(0);
                match self.backend.on_timeout {
                    OnTimeout::Abort => {
                        self.restore_service().await;
                        return Err((
                            Outcome::DrainTimeout,
                            format!(
                                "still {in_flight} request(s) in flight and {lb_sessions} HAProxy \
                                 session(s) after drain_timeout ({:?}); on_timeout = \"abort\": \
                                 the server was put back in service",
                                self.backend.drain_timeout
                            ),
                        ));
                    }
                    OnTimeout::Force => {
                        warn!(in_flight, "drain_timeout reached: forcing the drain");
                        self.report.forced_with_in_flight = Some(in_flight);
                        self.report.drained_ms = Some(millis(drain_started.elapsed()));
                        break;
                    }
                }
            }
            tokio::time::sleep(KERNEL_POLL).await;
        }

        self.enter(Phase::Drained, None);
        if let Err(err) = self.set_all(AdminState::Maint).await {
            // Still drained (weight 0); MAINT only purges idle connections sooner.
            warn!(%err, "could not move the server to MAINT");
        }
        Ok(())
    }

    /// drained → restarting → verifying → serving, with rollback when the service stays
    /// unhealthy.
    async fn restart_and_verify(&mut self) -> Report {
        let restart = self.backend.restart.clone().expect("checked at start");
        let check = self.health_check();
        self.enter(Phase::Restarting, None);
        let restart_started = Instant::now();
        let restarted = service::run(&restart).await;
        self.report.restart_ms = Some(millis(restart_started.elapsed()));
        let mut problem = match restarted {
            Ok(()) => {
                self.enter(Phase::Verifying, None);
                match health::wait_healthy(&check).await {
                    Ok(_) => {
                        self.report.time_to_healthy_ms = Some(millis(restart_started.elapsed()));
                        return self
                            .back_in_service(
                                Outcome::Ok,
                                "restarted, healthy and back in service".into(),
                            )
                            .await;
                    }
                    Err(err) => err,
                }
            }
            Err(err) => format!("restart failed: {err}"),
        };
        if let Some(rollback) = self.backend.rollback.clone() {
            warn!(problem, "running the rollback");
            self.enter(Phase::Restarting, Some(problem.clone()));
            match service::run(&rollback).await {
                Err(err) => {
                    self.report.rollback = Some(format!("failed: {err}"));
                    problem = format!("{problem}; rollback failed: {err}");
                }
                Ok(()) => {
                    self.enter(Phase::Verifying, Some(problem.clone()));
                    match health::wait_healthy(&check).await {
                        Ok(_) => {
                            self.report.rollback = Some("ran; the service is healthy again".into());
                            return self
                                .back_in_service(
                                    Outcome::RolledBack,
                                    format!("{problem}; rolled back, healthy and back in service on the previous version"),
                                )
                                .await;
                        }
                        Err(err) => {
                            self.report.rollback = Some(format!("ran; still unhealthy: {err}"));
                            problem = format!("{problem}; after the rollback: {err}");
                        }
                    }
                }
            }
        }
        // Leave it out of rotation, loudly.
        self.enter(Phase::Failed, Some(problem.clone()));
        let _ = self.set_all(AdminState::Maint).await;
        let lbs: Vec<&str> = self.lbs.iter().map(RuntimeApiClient::name).collect();
        self.finish(
            Outcome::Failed,
            format!(
                "{problem}. The server is left in MAINT{}{}; fix the service, then run \
                 `drain-agent resume {}`",
                if lbs.is_empty() { "" } else { " on " },
                lbs.join(", "),
                self.backend.name
            ),
        )
    }

    async fn back_in_service(&mut self, outcome: Outcome, message: String) -> Report {
        self.enter(Phase::Serving, None);
        match self.set_all(AdminState::Ready).await {
            Ok(()) => self.finish(outcome, message),
            Err(err) => self.finish(
                Outcome::Error,
                format!("{message}, but {err}; that load balancer follows on its next agent check"),
            ),
        }
    }

    /// resume: serving everywhere.
    async fn resume(&mut self) -> Report {
        self.back_in_service(Outcome::Ok, "back in service".into())
            .await
    }

    /// Undoes a drain: serving, and ready on every load balancer.
    async fn restore_service(&mut self) {
        self.enter(Phase::Serving, None);
        if let Err(err) = self.set_all(AdminState::Ready).await {
            warn!(%err, "could not put the server back to ready everywhere");
        }
    }

    fn health_check(&self) -> HealthCheck {
        self.backend.health.clone().unwrap_or_else(|| HealthCheck {
            probe: Probe::Tcp(format!("127.0.0.1:{}", self.backend.ports[0])),
            timeout: crate::config::DEFAULT_HEALTH_TIMEOUT,
        })
    }

    /// Sets the server's state on every reachable load balancer and confirms it in `show
    /// stat`. Unreachable ones are noted (they follow agent-check); an LB that refuses fails.
    async fn set_all(&mut self, state: AdminState) -> Result<(), HaproxyError> {
        let Some(server) = self.backend.haproxy.clone() else {
            return Ok(());
        };
        let mut first_error = None;
        for (lb, report) in self.lbs.iter().zip(self.report.load_balancers.iter_mut()) {
            // Ready waits for HAProxy's health check to see the service (rise checks).
            let confirm_within = match state {
                AdminState::Ready => READY_CONFIRM_WITHIN,
                AdminState::Drain | AdminState::Maint => STATE_CONFIRM_WITHIN,
            };
            let confirmed = async {
                lb.set_state(&server, state).await?;
                let deadline = Instant::now() + confirm_within;
                loop {
                    let stat = lb.server(&server).await?;
                    if state.shown_by(&stat.status) || Instant::now() >= deadline {
                        return Ok::<bool, HaproxyError>(state.shown_by(&stat.status));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            .await;
            let at = Some(millis(self.started.elapsed()));
            match confirmed {
                Ok(true) => match state {
                    AdminState::Drain => report.drain_confirmed_ms = at,
                    AdminState::Maint => report.maint_confirmed_ms = at,
                    AdminState::Ready => report.ready_confirmed_ms = at,
                },
                Ok(false) => {
                    report.error = Some(format!(
                        "did not show {} within {confirm_within:?}",
                        state.as_str()
                    ));
                }
                Err(err) if err.is_unreachable() => {
                    report.reachable = false;
                    report.error = Some(err.to_string());
                    warn!(%err, "load balancer unreachable; it follows on its next agent check");
                }
                Err(err) => {
                    report.error = Some(err.to_string());
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Requests HAProxy still has on, or queued for, this server, over reachable LBs.
    async fn lb_sessions(&self) -> u64 {
        let Some(server) = &self.backend.haproxy else {
            return 0;
        };
        let mut total = 0;
        for lb in &self.lbs {
            if let Ok(stat) = lb.server(server).await {
                total += stat.scur + stat.qcur;
            }
        }
        total
    }

    fn progress(&self, sample: &BackendSample, lb_sessions: u64) -> Progress {
        Progress {
            backend: self.backend.name.clone(),
            phase: self.board.get(self.index).phase,
            in_flight: sample.in_flight,
            idle: sample
                .in_flight
                .map(|f| sample.established.saturating_sub(f)),
            lb_sessions,
            elapsed_ms: millis(self.started.elapsed()),
        }
    }

    fn enter(&mut self, phase: Phase, reason: Option<String>) {
        self.close_phase();
        self.board.set(self.index, phase, reason);
        self.phase_started = Instant::now();
        self.report.phases.push(PhaseTiming {
            phase,
            started_ms: millis(self.started.elapsed()),
            duration_ms: 0,
        });
        let sample = self.kernel.sample(self.index).unwrap_or_default();
        let _ = self
            .events
            .try_send(Event::Progress(self.progress(&sample, 0)));
    }

    fn close_phase(&mut self) {
        if let Some(last) = self.report.phases.last_mut() {
            last.duration_ms = millis(self.phase_started.elapsed());
        }
    }

    fn finish(&mut self, outcome: Outcome, message: String) -> Report {
        self.close_phase();
        // The phase the operation ends in is where the backend rests, not a timed step.
        if let Some(last) = self.report.phases.last_mut() {
            last.duration_ms = 0;
        }
        self.report.operation = self.operation.to_string();
        self.report.outcome = outcome;
        self.report.exit_code = outcome.exit_code();
        self.report.message = message;
        self.report.phase = self.board.get(self.index).phase;
        self.report.total_ms = millis(self.started.elapsed());
        if let (Some(before), Some(after)) = (&self.kernel_at_start, self.kernel.sample(self.index))
        {
            let delta =
                |a: Option<u64>, b: Option<u64>| b.unwrap_or(0).saturating_sub(a.unwrap_or(0));
            self.report.kernel = Some(KernelSeen {
                resets_by_node: delta(before.reset_by_server, after.reset_by_server),
                resets_by_clients: delta(before.reset_by_client, after.reset_by_client),
                cut_in_flight: delta(before.cut_in_flight, after.cut_in_flight),
                accepted: delta(before.accepted, after.accepted),
            });
        }
        self.report.clone()
    }
}
