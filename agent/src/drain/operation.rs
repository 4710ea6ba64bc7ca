//! The drain and cycle operations, run by the agent on behalf of the CLI.
//!
//! The order of steps is what makes them safe: the phase (and so the agent-check answer)
//! changes before the runtime API commands, so an HAProxy that misses a command converges on
//! its next agent check; the server goes back to `ready` only after its health check passed;
//! and every failure path either restores the previous state or says plainly what it left.

use std::{
    net::IpAddr,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt as _;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{
    phase::{Board, CancelToken, ClaimError, Phase, millis},
    report::{
        Counts, GateReport, KernelSeen, LoadBalancerReport, Outcome, PhaseTiming, Progress, Report,
        Via, exit,
    },
};
use crate::{
    agent_check::Pollers,
    config::{Backend, Config, HaproxyServer, HealthCheck, OnTimeout, Probe},
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
/// Added to `agent_check_interval` when waiting for a poller: its check itself takes time.
const POLL_GRACE: Duration = Duration::from_millis(500);
/// A peer that polled within this many `agent_check_interval`s is expected to poll again.
const KNOWN_POLLER_INTERVALS: u32 = 3;

/// Which operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Drain and leave the server in MAINT.
    Drain,
    /// Drain, restart, verify, put back.
    Cycle,
    /// Start the next version beside the running one and hand new connections to it.
    Handover,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Drain => "drain",
            Kind::Cycle => "cycle",
            Kind::Handover => "handover",
        }
    }
}

/// Reads the kernel's numbers for a backend (implemented by the agent).
pub trait KernelView: Send + Sync + 'static {
    /// The backend's numbers; an error says why they could not be read (never "all zero").
    fn sample(&self, backend: usize) -> Result<BackendSample, String>;
    /// Closes the backend's kernel gate for at most `closed_for`, or opens it (`None`).
    /// `Ok(false)`: the backend has no gate here (none configured, or procfs mode).
    fn set_gate(&self, backend: usize, closed_for: Option<Duration>) -> Result<bool, String>;
    /// Writes the backend's handover steering. `Ok(false)`: this agent cannot steer (procfs).
    fn steer(
        &self,
        backend: usize,
        steering: drain_agent_common::steer::Steering,
    ) -> Result<bool, String>;
    /// Puts (`Some`) or takes (`None`) an instance's listener of `port` in the steering map.
    fn steer_socket(
        &self,
        port: u16,
        ipv6: bool,
        instance: u32,
        socket: Option<&std::os::fd::OwnedFd>,
    ) -> Result<(), String>;
    /// Why `feature` does not run on this kernel though configured (the kernel refused its
    /// program), or `None` when it runs or is not configured.
    fn unsupported(&self, feature: crate::kernel::features::Feature) -> Option<String>;
}

/// An operation that did not start; nothing was changed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub exit_code: u8,
    pub message: String,
}

impl Refusal {
    pub(super) fn new(exit_code: u8, message: impl Into<String>) -> Refusal {
        Refusal {
            exit_code,
            message: message.into(),
        }
    }
}

/// What an operation sends back while it runs.
#[derive(Debug)]
pub enum Event {
    /// Every load balancer confirmed the drain, or its bound passed (`unconfirmed` names
    /// those that did not); the operation goes on in the agent.
    Started {
        unconfirmed: Vec<String>,
    },
    Progress(Progress),
    Done(Box<Report>),
}

/// Starts and tracks drains and cycles on this node.
pub struct Operations {
    pub(super) config: Arc<Config>,
    pub(super) board: Arc<Board>,
    pub(super) kernel: Arc<dyn KernelView>,
    /// Who polled the agent-check port and what they were told.
    pollers: Arc<Pollers>,
    /// What the last reconciliation after an agent restart did, for the next report.
    pub(super) reconciled: std::sync::Mutex<Option<String>>,
}

impl Operations {
    pub fn new(
        config: Arc<Config>,
        board: Arc<Board>,
        kernel: Arc<dyn KernelView>,
        pollers: Arc<Pollers>,
    ) -> Operations {
        Operations {
            config,
            board,
            kernel,
            pollers,
            reconciled: std::sync::Mutex::new(None),
        }
    }

    pub fn board(&self) -> &Arc<Board> {
        &self.board
    }

    /// Who polled the agent-check port and what they were told.
    pub fn pollers(&self) -> &Arc<Pollers> {
        &self.pollers
    }

    /// Asks the running operation, if any, to stop draining and put the server back in
    /// service. A restart or health check already under way is not interrupted: the cycle
    /// ends as it ends. Nothing is kept for a later operation.
    pub fn cancel(&self, reason: &str) -> Option<String> {
        self.board.cancel_running(reason)
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
        // The kernel gate alone also stops new connections (direct clients see "connection
        // refused" and retry elsewhere).
        if kind != Kind::Handover
            && backend.haproxy.is_none()
            && self.config.agent_check_listen.is_none()
            && backend.gate.is_none()
        {
            return Err(Refusal::new(
                exit::CONFIG,
                format!(
                    "backend `{}` has no `haproxy` server, agent_check_listen is not set and it \
                     has no `gate`: nothing would stop new requests reaching it",
                    backend.name
                ),
            ));
        }
        let claim = self
            .board
            .claim(index, kind.as_str())
            .map_err(refusal_of_claim)?;
        let phase = self.board.get(index).phase;
        let allowed = match kind {
            Kind::Drain | Kind::Handover => phase == Phase::Serving,
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
        if kind == Kind::Handover {
            // The node stays in rotation: no load balancer is asked anything.
            return self.start_handover(index, backend, claim).await;
        }
        let lbs = self.preflight(index, &backend).await?;

        let (events, receiver) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let cancel = claim.cancel();
            let _claim = claim;
            let mut run = Run::new(&this, cancel, index, backend, kind, lbs, events.clone());
            // A panic inside the operation (a bug) must not leave the server out of rotation
            // silently: the run is still here to restore service or take the rollback path.
            let report = match AssertUnwindSafe(run.execute(phase)).catch_unwind().await {
                Ok(report) => report,
                Err(panic) => run.after_panic(panic_message(panic.as_ref())).await,
            };
            info!(
                backend = report.backend,
                outcome = report.outcome.as_str(),
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
            // A drain of this backend, or a restarted agent's reconciliation of it: `resume`
            // cancels it (a restart or health check under way still ends as it ends).
            let drain = running == format!("drain {}", backend.name)
                && self.board.get(index).phase == Phase::Draining;
            if drain || self.board.reconciling(index) {
                self.board.cancel_running("`resume`");
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
        if !self.board.get(index).phase.holds_out() {
            // The agent holds nothing out: a server out of rotation is somebody else's, and
            // stays so; nothing is changed either way.
            return self.resume_at_rest(index, &backend).await;
        }
        let (_claim, mut run) = self.resume_run(index, &backend)?;
        Ok(run.resume().await)
    }

    /// Claims the node for a `resume` of `backend` and sets up its run.
    fn resume_run(
        self: &Arc<Self>,
        index: usize,
        backend: &Backend,
    ) -> Result<(super::phase::Claim, Run), Refusal> {
        let claim = self
            .board
            .claim(index, "resume")
            .map_err(refusal_of_claim)?;
        let lbs = RuntimeApiClient::for_each(&self.config.load_balancers);
        let (events, _) = mpsc::channel(1);
        let mut run = Run::new(
            self,
            claim.cancel(),
            index,
            backend.clone(),
            Kind::Drain,
            lbs,
            events,
        );
        run.operation = "resume";
        Ok((claim, run))
    }

    /// `resume` of a backend the agent has serving. Refused, naming them, when load balancers
    /// hold the server out (somebody else's doing). When the journal was missing or torn,
    /// load balancers that only agent-check reaches may still hold it out from an agent
    /// before: they are told `ready` (and the return confirmed as any other). Otherwise
    /// already in service, and nothing is changed.
    async fn resume_at_rest(
        self: &Arc<Self>,
        index: usize,
        backend: &Backend,
    ) -> Result<Report, Refusal> {
        let mut held = Vec::new();
        if let Some(server) = &backend.haproxy {
            for client in RuntimeApiClient::for_each(&self.config.load_balancers) {
                if let Ok(stat) = client.server(server).await
                    && crate::drift::Shown::of(&stat) == crate::drift::Shown::Out
                {
                    held.push(format!("{} holds it {}", client.name(), stat.status));
                }
            }
            if !held.is_empty() {
                return Err(held_by_someone_else(server, &held));
            }
        }
        if self.board.past_unknown(index) && self.config.agent_check_listen.is_some() {
            let (_claim, mut run) = self.resume_run(index, backend)?;
            self.board.owe_ready(index);
            return Ok(run
                .back_in_service(
                    Outcome::Ok,
                    "the journal was missing or torn, so every agent-check poller was told \
                     `ready`: back in service"
                        .into(),
                )
                .await);
        }
        let mut report = Report::empty(&backend.name, "resume", Phase::Serving);
        report.outcome = Outcome::Ok;
        report.message = "already in service: this agent holds nothing out of rotation, and no \
                          load balancer it can ask holds the server out; nothing was changed"
            .to_string();
        Ok(report)
    }

    pub(super) fn backend(&self, name: &str) -> Result<(usize, Backend), Refusal> {
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
    async fn preflight(
        &self,
        index: usize,
        backend: &Backend,
    ) -> Result<Vec<RuntimeApiClient>, Refusal> {
        let clients = RuntimeApiClient::for_each(&self.config.load_balancers);
        let Some(server) = &backend.haproxy else {
            return Ok(clients);
        };
        let mut unreachable = Vec::new();
        let mut held = Vec::new();
        for client in &clients {
            let servers = match client.servers(&server.backend).await {
                Ok(servers) => servers,
                Err(err) if err.is_unreachable() => {
                    unreachable.push(err.to_string());
                    continue;
                }
                Err(err) => return Err(Refusal::new(exit::ERROR, err.to_string())),
            };
            let Some(ours) = servers.iter().find(|stat| stat.name == server.server) else {
                let err = HaproxyError::NoSuchServer {
                    lb: client.name().to_string(),
                    backend: server.backend.clone(),
                    server: server.server.clone(),
                };
                return Err(Refusal::new(exit::CONFIG, err.to_string()));
            };
            if !self.board.get(index).phase.holds_out()
                && crate::drift::Shown::of(ours) == crate::drift::Shown::Out
            {
                held.push(format!("{} holds it {}", client.name(), ours.status));
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
        if !held.is_empty() {
            return Err(held_by_someone_else(server, &held));
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

/// The refusal of an operation on a server that somebody else holds out of rotation: the
/// agent neither takes it over nor returns it to service behind the operator's back.
fn held_by_someone_else(server: &HaproxyServer, held: &[String]) -> Refusal {
    Refusal::new(
        exit::REFUSED,
        format!(
            "refused: {}/{} is held out of rotation by someone else, not this agent ({}): the \
             agent does not take over a server an operator holds, nor put it back. Return it \
             there (`set server {}/{} state ready`) and run this again, or leave it held \
             (`drain-agent status` shows it)",
            server.backend,
            server.server,
            held.join(", "),
            server.backend,
            server.server,
        ),
    )
}

/// One running operation.
pub(super) struct Run {
    config: Arc<Config>,
    board: Arc<Board>,
    kernel: Arc<dyn KernelView>,
    pollers: Arc<Pollers>,
    cancel: Arc<CancelToken>,
    index: usize,
    pub(super) backend: Backend,
    pub(super) kind: Kind,
    pub(super) operation: &'static str,
    lbs: Vec<RuntimeApiClient>,
    events: mpsc::Sender<Event>,
    started: Instant,
    phase_started: Instant,
    report: Report,
    kernel_at_start: Option<BackendSample>,
}

impl Run {
    pub(super) fn new(
        ops: &Operations,
        cancel: Arc<CancelToken>,
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
            pollers: ops.pollers.clone(),
            cancel,
            index,
            report: Report {
                load_balancers: lbs
                    .iter()
                    .map(|lb| LoadBalancerReport {
                        name: lb.name().to_string(),
                        via: Via::RuntimeApi,
                        reachable: true,
                        ..Default::default()
                    })
                    .collect(),
                reconciled_before: ops.reconciled.lock().expect("reconciled lock").take(),
                gate: backend.gate.as_ref().map(|_| GateReport {
                    deadline_s: backend.gate_deadline().as_secs(),
                    ..GateReport::default()
                }),
                ..Report::empty(&backend.name, kind.as_str(), phase)
            },
            backend,
            kind,
            operation: kind.as_str(),
            lbs,
            events,
            started: now,
            phase_started: now,
            kernel_at_start: ops.kernel.sample(index).ok(),
        }
    }

    pub(super) async fn execute(&mut self, from: Phase) -> Report {
        // A cycle from `drained` proves the drain again before it restarts anything: since
        // the drain ended, a reload may have put the server back on a load balancer (runtime
        // state is lost), an operator may have set it ready by hand, or the gate's deadline
        // passed — and requests may have arrived meanwhile.
        if from == Phase::Serving || (from == Phase::Drained && self.kind == Kind::Cycle) {
            if let Err(outcome) = self.drain(from).await {
                return self.finish(outcome.0, outcome.1);
            }
        }
        if self.kind == Kind::Drain {
            let message = match self.maint_problem() {
                None => format!(
                    "drained; the server is in MAINT. `drain-agent resume {}` puts it back",
                    self.backend.name
                ),
                Some(problem) => format!(
                    "drained, but {problem}: the server is drained (weight 0) there, not in \
                     MAINT. `drain-agent resume {}` puts it back",
                    self.backend.name
                ),
            };
            return self.finish(Outcome::Ok, message);
        }
        self.restart_and_verify().await
    }

    /// serving (or drained, for a cycle) → draining → drained. `Err` carries the outcome when
    /// the drain did not finish: from serving the server is put back in service, from
    /// drained it stays drained, as the operator left it.
    pub(super) async fn drain(&mut self, from: Phase) -> Result<(), (Outcome, String)> {
        let sample = self.kernel.sample(self.index).ok();
        self.report.at_drain_start = sample.as_ref().map(|sample| Counts {
            established: sample.established,
            in_flight: sample.in_flight,
            unknown: sample.unknown,
            idle: sample.idle(),
        });
        // The phase changes first: from now on every agent check answers "drain".
        self.enter(Phase::Draining, None);
        let drain_started = Instant::now();
        if let Err(err) = self.set_all(AdminState::Drain).await {
            let left = self.abandon_drain(from).await;
            return Err((Outcome::Error, format!("{err}; {left}")));
        }
        let mut pollers = PollerWait::new(self, drain_started);

        let deadline = drain_started + self.backend.drain_timeout;
        let mut lb_sessions: Result<u64, String> = Err("not read yet".into());
        let mut last_lb_poll: Option<Instant> = None;
        let mut last_progress: Option<Instant> = None;
        let mut started_sent = false;
        loop {
            let sample = self.kernel.sample(self.index);
            if last_lb_poll.is_none_or(|at| at.elapsed() >= LB_POLL) {
                lb_sessions = self.lb_sessions().await;
                last_lb_poll = Some(Instant::now());
            }
            let confirmed = pollers.settle(self, Phase::Draining);
            if confirmed && !started_sent {
                // Every load balancer has stopped sending new work: from now on a new
                // connection comes from something that does not follow them.
                self.close_gate();
                let _ = self
                    .events
                    .send(Event::Started {
                        unconfirmed: self.unconfirmed(),
                    })
                    .await;
                started_sent = true;
            }
            // Evidence, never its absence: a failed read is not "nothing in flight", and a
            // connection the agent did not see begin is not idle until something says so.
            let evidence = self.evidence(&sample, &lb_sessions);
            if last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) {
                let shown = sample.clone().unwrap_or_default();
                let _ = self.events.try_send(Event::Progress(
                    self.progress(&shown, lb_sessions.as_ref().ok().copied()),
                ));
                last_progress = Some(Instant::now());
            }
            if confirmed && drain_without_waiting() {
                // The suite's negative control: the load balancers stopped sending, and
                // nothing waits for what the node still has in flight.
                self.report.drained_ms = Some(millis(drain_started.elapsed()));
                self.report.drain_evidence =
                    Some("none: test hook DRAIN_AGENT_TEST_DRAIN_WITHOUT_WAITING".into());
                break;
            }
            if confirmed && evidence.is_some() && lb_sessions == Ok(0) {
                // Confirm HAProxy's side right now rather than from a poll up to 200 ms old.
                lb_sessions = self.lb_sessions().await;
                if lb_sessions == Ok(0) {
                    self.report.drained_ms = Some(millis(drain_started.elapsed()));
                    let since = sample.as_ref().ok().and_then(|s| s.since_last_idle);
                    self.report.in_flight_zero_ms = since.and_then(|since| {
                        let zero_at = Instant::now().checked_sub(since)?;
                        zero_at.checked_duration_since(drain_started).map(millis)
                    });
                    self.report.drain_evidence = evidence;
                    break;
                }
            }
            if let Some(by) = self.cancel.reason() {
                let left = self.abandon_drain(from).await;
                return Err((
                    Outcome::Cancelled,
                    format!("drain cancelled by {by}; {left}"),
                ));
            }
            if Instant::now() >= deadline {
                let in_flight = match &sample {
                    Ok(sample) => sample
                        .in_flight
                        .map_or_else(|| "an unknown number of".into(), |n| n.to_string()),
                    Err(err) => format!("an unknown number of (the kernel read failed: {err})"),
                };
                let sessions = match &lb_sessions {
                    Ok(n) => format!("{n} HAProxy session(s)"),
                    Err(err) => format!("HAProxy sessions unknown ({err})"),
                };
                let timeout = humantime::format_duration(self.backend.drain_timeout);
                match self.backend.on_timeout {
                    OnTimeout::Abort => {
                        let left = self.abandon_drain(from).await;
                        return Err((
                            Outcome::DrainTimeout,
                            format!(
                                "still {in_flight} request(s) in flight and {sessions} after \
                                 drain_timeout ({timeout}); on_timeout = \"abort\": {left}"
                            ),
                        ));
                    }
                    OnTimeout::Force => {
                        warn!(
                            backend = self.backend.name,
                            in_flight, "drain_timeout reached: forcing the drain"
                        );
                        self.report.forced_with_in_flight =
                            Some(sample.ok().and_then(|s| s.in_flight).unwrap_or(0));
                        self.report.drained_ms = Some(millis(drain_started.elapsed()));
                        self.report.drain_evidence = Some(format!(
                            "none: drain_timeout ({timeout}) with on_timeout = \"force\""
                        ));
                        break;
                    }
                }
            }
            tokio::time::sleep(self.next_kernel_look(&sample)).await;
        }

        self.enter(Phase::Drained, None);
        if let Err(err) = self.set_all(AdminState::Maint).await {
            // Still drained (weight 0); MAINT only purges idle connections sooner.
            warn!(backend = self.backend.name, %err, "could not move the server to MAINT");
        }
        Ok(())
    }

    /// Gives up a drain that did not finish: a server that was serving goes back in service; one
    /// that was drained before a cycle stays drained (MAINT), as it was. Returns what became
    /// of it, for the report.
    async fn abandon_drain(&mut self, from: Phase) -> String {
        if from != Phase::Drained {
            self.restore_service().await;
            return self.back_in_service_sentence();
        }
        self.enter(Phase::Drained, None);
        match self.set_all(AdminState::Maint).await {
            Ok(()) => "the server stays drained (MAINT), as it was before the cycle".into(),
            Err(err) => format!("the server stays drained, but {err}"),
        }
    }

    /// The evidence that the backend is drained, in words for the report, or `None` while
    /// there is none. Three sources, strongest first: the kernel's count (every connection
    /// seen and quiet), the load balancers' sessions (0 on every one of them means no request
    /// rides on connections the kernel cannot judge), and no connection at all.
    /// How long until the drain looks at the kernel again: the regular poll, or less when
    /// nothing is in flight and the quiet period ends sooner, so that the drain is declared as
    /// the quiet period ends rather than up to a poll later.
    fn next_kernel_look(&self, sample: &Result<BackendSample, String>) -> Duration {
        match sample {
            Ok(BackendSample {
                in_flight: Some(0),
                since_last_idle: Some(since),
                ..
            }) if *since < self.config.quiet_period => {
                (self.config.quiet_period - *since).min(KERNEL_POLL)
            }
            _ => KERNEL_POLL,
        }
    }

    fn evidence(
        &self,
        sample: &Result<BackendSample, String>,
        lb_sessions: &Result<u64, String>,
    ) -> Option<String> {
        let sample = sample.as_ref().ok()?;
        if sample.untracked_pending {
            // The table missed connections that are not counted as unknown yet: wait for
            // the socket table (at most a second).
            return None;
        }
        let unknown = sample.unknown.unwrap_or(0);
        // Every configured load balancer answered with 0 sessions: none was left out
        // because it was unreachable.
        let lbs_vouch = self.backend.haproxy.is_some()
            && !self.lbs.is_empty()
            && lb_sessions == &Ok(0)
            && self
                .report
                .load_balancers
                .iter()
                .filter(|lb| lb.via == Via::RuntimeApi)
                .all(|lb| lb.reachable);
        let lbs_words = "every load balancer showed 0 sessions for the server";
        if sample.established == 0 {
            return Some("no connection to the backend's ports was left".into());
        }
        match sample.in_flight {
            Some(in_flight) => {
                let quiet = in_flight == 0
                    && sample
                        .since_last_idle
                        .is_none_or(|since| since >= self.config.quiet_period);
                let kernel_words = format!(
                    "the kernel counted 0 requests in flight for {}",
                    humantime::format_duration(self.config.quiet_period)
                );
                match (quiet, unknown) {
                    (false, _) => None,
                    (true, 0) if self.backend.haproxy.is_some() => {
                        Some(format!("{kernel_words}, and {lbs_words}"))
                    }
                    (true, 0) => Some(kernel_words),
                    (true, unknown) if lbs_vouch => Some(format!(
                        "{kernel_words}, and {lbs_words}: the {unknown} connection(s) the agent \
                         did not see begin carry nothing"
                    )),
                    (true, _) => None,
                }
            }
            // procfs: the agent knows nothing per connection.
            None if lbs_vouch => Some(format!("procfs mode (in-flight unknown): {lbs_words}")),
            None => None,
        }
    }

    /// Names of the load balancers and pollers that did not confirm the current step.
    fn unconfirmed(&self) -> Vec<String> {
        self.report
            .load_balancers
            .iter()
            .filter(|lb| lb.error.is_some())
            .map(|lb| lb.name.clone())
            .collect()
    }

    /// drained → restarting → verifying → serving, with rollback when the service stays
    /// unhealthy.
    pub(super) async fn restart_and_verify(&mut self) -> Report {
        let restart = self.backend.restart.clone().expect("checked at start");
        let check = self.health_check();
        self.enter(Phase::Restarting, None);
        let restart_started = Instant::now();
        let restarted = self.run_step(&restart).await;
        self.report.restart_ms = Some(millis(restart_started.elapsed()));
        let problem = match restarted {
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
        self.roll_back(problem).await
    }

    /// Runs a restart or rollback step with its process group in the journal while it runs:
    /// an agent that crashes meanwhile leaves the command running (its own group), and the
    /// next agent waits for that group before it verifies the service.
    async fn run_step(&self, step: &crate::config::Step) -> Result<(), service::StepError> {
        let (board, index) = (self.board.clone(), self.index);
        let result = service::run_with(step, |group| board.set_step_group(index, group)).await;
        self.board.set_step_group(self.index, None);
        result
    }

    /// The service is not healthy: run the rollback (if any) and put the server back on the
    /// old version, or leave it out of rotation and say so plainly.
    pub(super) async fn roll_back(&mut self, mut problem: String) -> Report {
        let check = self.health_check();
        if let Some(rollback) = self.backend.rollback.clone() {
            warn!(backend = self.backend.name, problem, "running the rollback");
            self.enter(Phase::Restarting, Some(problem.clone()));
            match self.run_step(&rollback).await {
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
        // Leave it out of rotation, loudly, and say exactly where it is out.
        self.enter(Phase::Failed, Some(problem.clone()));
        let maint = self.set_all(AdminState::Maint).await;
        let mut in_maint = Vec::new();
        let mut not_in_maint = Vec::new();
        for lb in &self.report.load_balancers {
            if lb.via != Via::RuntimeApi {
                continue;
            }
            if lb.maint_confirmed_ms.is_some() {
                in_maint.push(lb.name.clone());
            } else {
                not_in_maint.push(format!(
                    "{} ({})",
                    lb.name,
                    lb.error.as_deref().unwrap_or("did not show MAINT")
                ));
            }
        }
        let mut where_ = String::new();
        if !in_maint.is_empty() {
            where_.push_str(&format!(
                ". The server is left in MAINT on {}",
                in_maint.join(", ")
            ));
        }
        if !not_in_maint.is_empty() || maint.is_err() {
            where_.push_str(&format!(
                ". Setting MAINT failed on {}; agent-check answers \"maint\" there",
                not_in_maint.join(", ")
            ));
        }
        if in_maint.is_empty() && not_in_maint.is_empty() {
            where_.push_str(". Agent-check answers \"maint\", so the load balancers keep it out");
        }
        self.finish(
            Outcome::Failed,
            format!(
                "{problem}{where_}; fix the service, then run `drain-agent resume {}`",
                self.backend.name
            ),
        )
    }

    /// A panic inside the operation: put things in a state that is safe and says why.
    async fn after_panic(&mut self, message: String) -> Report {
        let phase = self.board.get(self.index).phase;
        error!(
            backend = self.backend.name,
            phase = phase.as_str(),
            message,
            "the operation panicked: a bug in drain-agent; recovering"
        );
        let problem = format!("internal error in drain-agent ({message})");
        match phase {
            Phase::Serving | Phase::HandingOver | Phase::Draining | Phase::Drained
                if self.kind == Kind::Drain =>
            {
                if phase == Phase::Drained {
                    return self.finish(
                        Outcome::Error,
                        format!(
                            "{problem} after the drain finished; the server stays drained. \
                             `drain-agent resume {}` puts it back",
                            self.backend.name
                        ),
                    );
                }
                self.restore_service().await;
                let sentence = self.back_in_service_sentence();
                self.finish(Outcome::Error, format!("{problem}; {sentence}"))
            }
            Phase::Serving | Phase::HandingOver | Phase::Draining => {
                self.restore_service().await;
                let sentence = self.back_in_service_sentence();
                self.finish(Outcome::Error, format!("{problem}; {sentence}"))
            }
            // The service may be half restarted: the rollback path decides.
            Phase::Drained | Phase::Restarting | Phase::Verifying | Phase::Failed => {
                self.roll_back(problem).await
            }
        }
    }

    /// Back to serving: the phase first (agent-check answers "ready"), then every runtime
    /// API, then the wait until every known agent-check poller was told.
    pub(super) async fn back_in_service(&mut self, outcome: Outcome, message: String) -> Report {
        self.enter(Phase::Serving, None);
        let since = Instant::now();
        let set = self.set_all(AdminState::Ready).await;
        let mut pollers = PollerWait::new(self, since);
        while !pollers.settle(self, Phase::Serving) {
            tokio::time::sleep(KERNEL_POLL).await;
        }
        let unconfirmed = self.unconfirmed();
        match set {
            Err(err) => self.finish(
                Outcome::Error,
                format!("{message}, but {err}; that load balancer follows on its next agent check"),
            ),
            Ok(()) if !unconfirmed.is_empty() => self.finish(
                Outcome::Unconfirmed,
                format!(
                    "{message} here, but {} did not confirm the return: check that load \
                     balancer before draining another node",
                    unconfirmed.join(", ")
                ),
            ),
            Ok(()) => {
                let message = format!("{message}; {}", self.confirmed_sentence());
                self.finish(outcome, message)
            }
        }
    }

    /// "every load balancer confirmed ..." — only when they did.
    fn confirmed_sentence(&self) -> String {
        let names: Vec<String> = self
            .report
            .load_balancers
            .iter()
            .map(|lb| match lb.via {
                Via::RuntimeApi => format!("{} (runtime API)", lb.name),
                Via::AgentCheck => format!("{} (agent-check)", lb.name),
            })
            .collect();
        if names.is_empty() {
            "no load balancer to confirm it (no runtime API configured and no agent-check poller seen)".into()
        } else {
            format!("confirmed by {}", names.join(", "))
        }
    }

    /// After `restore_service`: says where the server is back, truthfully.
    fn back_in_service_sentence(&self) -> String {
        let unconfirmed = self.unconfirmed();
        if unconfirmed.is_empty() {
            "the server was put back in service".into()
        } else {
            format!(
                "the server was put back in service here, but {} did not confirm it",
                unconfirmed.join(", ")
            )
        }
    }

    /// resume: serving everywhere.
    async fn resume(&mut self) -> Report {
        self.back_in_service(Outcome::Ok, "back in service".into())
            .await
    }

    /// Undoes a drain: serving, and ready on every load balancer (confirmed as for a return).
    pub(super) async fn restore_service(&mut self) {
        self.enter(Phase::Serving, None);
        let since = Instant::now();
        if let Err(err) = self.set_all(AdminState::Ready).await {
            warn!(
                backend = self.backend.name,
                %err,
                "could not put the server back to ready everywhere"
            );
        }
        let mut pollers = PollerWait::new(self, since);
        while !pollers.settle(self, Phase::Serving) {
            tokio::time::sleep(KERNEL_POLL).await;
        }
    }

    /// The MAINT step's failure, if setting MAINT failed anywhere.
    fn maint_problem(&self) -> Option<String> {
        let failed: Vec<String> = self
            .report
            .load_balancers
            .iter()
            .filter(|lb| lb.via == Via::RuntimeApi && lb.maint_confirmed_ms.is_none())
            .map(|lb| {
                format!(
                    "{} did not take MAINT ({})",
                    lb.name,
                    lb.error.as_deref().unwrap_or("no confirmation")
                )
            })
            .collect();
        if self.backend.haproxy.is_none() || failed.is_empty() {
            None
        } else {
            Some(failed.join("; "))
        }
    }

    pub(super) fn health_check(&self) -> HealthCheck {
        self.backend.health.clone().unwrap_or_else(|| HealthCheck {
            probe: Probe::Tcp(self.backend.local_address().to_string()),
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
        for (lb, report) in self.lbs.iter().zip(
            self.report
                .load_balancers
                .iter_mut()
                .filter(|lb| lb.via == Via::RuntimeApi),
        ) {
            // Ready waits for HAProxy's health check to see the service (rise checks).
            let confirm_within = match state {
                AdminState::Ready => READY_CONFIRM_WITHIN,
                AdminState::Drain | AdminState::Maint => STATE_CONFIRM_WITHIN,
            };
            report.error = None;
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
                Ok(true) => {
                    report.reachable = true;
                    match state {
                        AdminState::Drain => report.drain_confirmed_ms = at,
                        AdminState::Maint => report.maint_confirmed_ms = at,
                        AdminState::Ready => report.ready_confirmed_ms = at,
                    }
                }
                Ok(false) => {
                    report.error = Some(format!(
                        "did not show {} within {}",
                        state.as_str(),
                        humantime::format_duration(confirm_within)
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

    /// Requests HAProxy still has on, or queued for, this server, summed over the load
    /// balancers. A load balancer that cannot be read is an error, never 0 sessions.
    async fn lb_sessions(&self) -> Result<u64, String> {
        let Some(server) = &self.backend.haproxy else {
            return Ok(0);
        };
        let mut total = 0;
        let reports = self
            .report
            .load_balancers
            .iter()
            .filter(|lb| lb.via == Via::RuntimeApi);
        for (lb, report) in self.lbs.iter().zip(reports) {
            // Unreachable when the drain began (tolerated because agent-check tells it): its
            // sessions were never readable; the report names it as not confirmed.
            if !report.reachable {
                continue;
            }
            let stat = lb.server(server).await.map_err(|err| err.to_string())?;
            total += stat.scur + stat.qcur;
        }
        Ok(total)
    }

    fn progress(&self, sample: &BackendSample, lb_sessions: Option<u64>) -> Progress {
        Progress {
            backend: self.backend.name.clone(),
            phase: self.board.get(self.index).phase,
            in_flight: sample.in_flight,
            unknown: sample.unknown,
            idle: sample.idle(),
            lb_sessions,
            elapsed_ms: millis(self.started.elapsed()),
            handover: None,
        }
    }

    pub(super) fn enter(&mut self, phase: Phase, reason: Option<String>) {
        self.close_phase();
        self.board.set(self.index, phase, reason);
        // The gate follows the phase: open whenever the backend serves or has failed (a
        // failed service is out of rotation on the load balancers, and refusing does not
        // help it), closed from the drain's confirmation until it serves again. Draining
        // closes it itself, once the load balancers confirmed.
        match phase {
            Phase::Serving | Phase::HandingOver | Phase::Failed => self.open_gate(),
            Phase::Drained | Phase::Restarting | Phase::Verifying => self.close_gate(),
            Phase::Draining => {}
        }
        self.phase_started = Instant::now();
        self.report.phases.push(PhaseTiming {
            phase,
            started_ms: millis(self.started.elapsed()),
            duration_ms: 0,
        });
        let sample = self.kernel.sample(self.index).unwrap_or_default();
        let _ = self
            .events
            .try_send(Event::Progress(self.progress(&sample, None)));
    }

    /// Closes the backend's gate (if it has one and this operation has not closed it yet),
    /// with its deadline. A failure is reported, and the drain goes on: the gate fails open.
    pub(super) fn close_gate(&mut self) {
        let Some(gate) = self.report.gate.as_ref() else {
            return;
        };
        if gate.closed_ms.is_some() && gate.opened_ms.is_none() {
            return;
        }
        let at = millis(self.started.elapsed());
        let deadline = self.backend.gate_deadline();
        // Journaled first: an agent started after a crash closes it again for what is left.
        self.board.set_gate(
            self.index,
            Some(crate::journal::unix_ms() + deadline.as_millis() as u64),
        );
        let result = self.kernel.set_gate(self.index, Some(deadline));
        let gate = self.report.gate.as_mut().expect("checked above");
        match result {
            Ok(true) => {
                gate.closed_ms = Some(at);
                gate.opened_ms = None;
                info!(
                    backend = self.backend.name,
                    deadline_s = gate.deadline_s,
                    "gate closed: new connections from sources outside its allow list are refused"
                );
            }
            Ok(false) => {
                self.board.set_gate(self.index, None);
                gate.problem = Some("no gate in this kernel mode (procfs)".into());
            }
            Err(err) => {
                warn!(backend = self.backend.name, %err, "could not close the gate; draining without it");
                gate.problem = Some(format!("could not close: {err}"));
            }
        }
    }

    /// Opens the backend's gate, whether this operation or an earlier drain closed it.
    fn open_gate(&mut self) {
        if self.report.gate.is_none() {
            return;
        }
        let at = millis(self.started.elapsed());
        let result = self.kernel.set_gate(self.index, None);
        let gate = self.report.gate.as_mut().expect("checked above");
        match result {
            Ok(_) => {
                self.board.set_gate(self.index, None);
                if gate.closed_ms.is_some() && gate.opened_ms.is_none() {
                    gate.opened_ms = Some(at);
                    info!(backend = self.backend.name, "gate opened");
                }
            }
            Err(err) => {
                // The deadline in the kernel still opens it.
                warn!(backend = self.backend.name, %err, "could not open the gate; it opens at its deadline");
                gate.problem = Some(format!("could not open: {err}; it opens at its deadline"));
            }
        }
    }

    fn close_phase(&mut self) {
        if let Some(last) = self.report.phases.last_mut() {
            last.duration_ms = millis(self.phase_started.elapsed());
        }
    }

    pub(super) fn finish(&mut self, outcome: Outcome, message: String) -> Report {
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
        if let (Some(before), Ok(after)) = (&self.kernel_at_start, self.kernel.sample(self.index)) {
            let delta =
                |a: Option<u64>, b: Option<u64>| b.unwrap_or(0).saturating_sub(a.unwrap_or(0));
            self.report.kernel = Some(KernelSeen {
                resets_by_node: delta(before.reset_by_server, after.reset_by_server),
                resets_by_clients: delta(before.reset_by_client, after.reset_by_client),
                cut_in_flight: delta(before.cut_in_flight, after.cut_in_flight),
                accepted: delta(before.accepted, after.accepted),
            });
            if let (Some(gate), Some(now)) = (self.report.gate.as_mut(), after.gate) {
                let then = before.gate.unwrap_or_default();
                gate.refused = now.refused.saturating_sub(then.refused);
                gate.allowed = now.allowed.saturating_sub(then.allowed);
            }
        }
        self.report.clone()
    }
}

/// Waits, bounded by `agent_check_interval`, until every agent-check poller of the backend
/// has been answered the current phase's word since `since` — the only evidence an
/// agent-check-only load balancer gives that it follows. Records each confirmation (or its
/// absence) in the report as a load balancer reached `via` agent-check.
struct PollerWait {
    since: Instant,
    bound: Instant,
    done: bool,
    /// Nobody had polled when the step began: the whole bound is waited for one to appear
    /// (unless a runtime API already confirmed the step).
    none_known: bool,
}

impl PollerWait {
    fn new(run: &Run, since: Instant) -> PollerWait {
        let interval = run.config.agent_check_interval;
        let known = run.pollers.polled_since(
            run.index,
            since
                .checked_sub(interval * KNOWN_POLLER_INTERVALS)
                .unwrap_or(since),
        );
        // A return needs a second poll (see `settle`), so it may take two intervals.
        let returning = run.board.get(run.index).phase == Phase::Serving;
        let polls = if returning { 2 } else { 1 };
        if run.config.agent_check_listen.is_none() {
            // Nobody polls: no `ready` is owed to anyone.
            run.board.return_confirmed(run.index);
        }
        // A return counts the `ready` answers from the moment the phase changed (the
        // responder owes them from then on), not from when this wait began.
        let since = match run.board.returned(run.index) {
            Some(returned) if polls == 2 => returned.min(since),
            _ => since,
        };
        PollerWait {
            since,
            bound: since + interval * polls + POLL_GRACE,
            // Nothing to confirm without agent-check, nor for a server the agent never took
            // out (no `ready` is owed: the answers stay `up`).
            done: run.config.agent_check_listen.is_none()
                || (returning && run.board.returned(run.index).is_none()),
            none_known: known.is_empty(),
        }
    }

    /// One look; true once the step is confirmed everywhere or its bound passed.
    fn settle(&mut self, run: &mut Run, phase: Phase) -> bool {
        if self.done {
            return true;
        }
        let interval = run.config.agent_check_interval;
        let look_back = self
            .since
            .checked_sub(interval * KNOWN_POLLER_INTERVALS)
            .unwrap_or(self.since);
        let peers = run.pollers.polled_since(run.index, look_back);
        let now = Instant::now();
        let mut all = true;
        for peer in &peers {
            // A drain takes effect on the poll that carries it: "drain" or "maint" both keep
            // new requests away. A return from MAINT does not: HAProxy resets the server's
            // health and marks it UP only after `rise` checks, so the second "ready" (one
            // agent-inter later) is the confirmation — docs/operations.md asks for rise ×
            // inter below agent-inter.
            let confirmed_at = run.pollers.last(*peer, run.index).and_then(|answered| {
                if phase == Phase::Serving {
                    answered.ready_confirmed_since(self.since)
                } else {
                    let out = matches!(answered.word.as_str(), "drain" | "maint");
                    (out && answered.at >= self.since).then_some(answered.at)
                }
            });
            let entry = poller_entry(&mut run.report, *peer);
            match confirmed_at {
                Some(at) => {
                    let ms = Some(millis(at.saturating_duration_since(run.started)));
                    entry.error = None;
                    match phase {
                        Phase::Serving => entry.ready_confirmed_ms = ms,
                        _ => entry.drain_confirmed_ms = ms,
                    }
                }
                None => {
                    all = false;
                    if now >= self.bound {
                        entry.error = Some(format!(
                            "did not poll the agent-check port within {} \
                             (agent_check_interval) after the server went {}",
                            humantime::format_duration(interval),
                            if phase == Phase::Serving {
                                "back"
                            } else {
                                "out"
                            }
                        ));
                    }
                }
            }
        }
        let runtime_api_confirmed = run.backend.haproxy.is_some()
            && run
                .report
                .load_balancers
                .iter()
                .any(|lb| lb.via == Via::RuntimeApi && lb.error.is_none());
        // Nobody polled yet and no runtime API vouches for the step: wait the whole
        // interval for a poller to show up before believing there is none.
        if all && !peers.is_empty() && phase == Phase::Serving {
            // Every poller was told twice: the agent owes none of them `ready` any more.
            run.board.return_confirmed(run.index);
        }
        let waiting_for_first = self.none_known && peers.is_empty() && !runtime_api_confirmed;
        if (all && !waiting_for_first) || now >= self.bound {
            if peers.is_empty() && !runtime_api_confirmed {
                warn!(
                    backend = run.backend.name,
                    interval = %humantime::format_duration(interval),
                    "no agent-check poller seen within agent_check_interval: nothing confirmed \
                     that the load balancers follow this node's state"
                );
            }
            self.done = true;
        }
        self.done
    }
}

/// The report entry of an agent-check poller, created on first sight.
fn poller_entry(report: &mut Report, peer: IpAddr) -> &mut LoadBalancerReport {
    let name = format!("agent-check poller {peer}");
    let index = match report
        .load_balancers
        .iter()
        .position(|lb| lb.via == Via::AgentCheck && lb.name == name)
    {
        Some(index) => index,
        None => {
            report.load_balancers.push(LoadBalancerReport {
                name,
                via: Via::AgentCheck,
                reachable: true,
                ..Default::default()
            });
            report.load_balancers.len() - 1
        }
    };
    &mut report.load_balancers[index]
}

/// A claim that failed, as the refusal the CLI shows.
pub(super) fn refusal_of_claim(err: ClaimError) -> Refusal {
    match err {
        ClaimError::Busy(_) => Refusal::new(exit::REFUSED, format!("refused: {err}")),
        ClaimError::Journal(_) => Refusal::new(exit::ERROR, format!("refused: {err}")),
    }
}

/// A panic's message, whatever its payload type.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Tests only (`DRAIN_AGENT_TEST_DRAIN_WITHOUT_WAITING`): a drain ends as soon as every load
/// balancer confirmed it, whatever is in flight — the suite's negative control, which must
/// lose requests where the real drain loses none.
fn drain_without_waiting() -> bool {
    std::env::var_os("DRAIN_AGENT_TEST_DRAIN_WITHOUT_WAITING").is_some()
}
