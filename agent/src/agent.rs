//! `drain-agent run`: load the kernel side, serve the control socket and the agent-check
//! port, run drains and cycles, collect garbage, and shut down cleanly on SIGTERM/SIGINT.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc},
};
use tracing::{error, info, warn};

use crate::{
    agent_check,
    config::{Config, OnShutdown},
    control::{self, Peer, Request, Response},
    drain::{
        Board, Kind, Operations,
        operation::{Event, KernelView},
    },
    drift,
    haproxy::RuntimeApiClient,
    journal::{Found, Journal, Record},
    kernel::{BackendSample, KernelMode, Tracker, TrackerError},
    metrics::Metrics,
    status::{BackendStatus, FlowTableStatus, OperationSummary, Status},
};

/// The kernel side, shared by status, the drain operations and housekeeping.
struct Kernel {
    tracker: Mutex<Tracker>,
}

impl KernelView for Kernel {
    fn unsupported(&self, feature: crate::kernel::features::Feature) -> Option<String> {
        let tracker = self.tracker.lock().expect("tracker lock");
        tracker
            .features()
            .into_iter()
            .find(|status| {
                status.feature == feature.name()
                    && status.state == crate::kernel::features::FeatureState::Unsupported
            })
            .map(|status| status.detail.unwrap_or_default())
    }

    fn sample(&self, backend: usize) -> Result<BackendSample, String> {
        let tracker = self.tracker.lock().expect("tracker lock");
        match tracker.sample() {
            Ok(mut samples) if backend < samples.len() => Ok(samples.swap_remove(backend)),
            Ok(_) => Err(format!("no counters for backend index {backend}")),
            Err(err) => {
                warn!(%err, "reading the kernel counters failed");
                Err(err.to_string())
            }
        }
    }

    fn set_gate(&self, backend: usize, closed_for: Option<Duration>) -> Result<bool, String> {
        let mut tracker = self.tracker.lock().expect("tracker lock");
        match closed_for {
            Some(deadline) => tracker.close_gate(backend, deadline),
            None => tracker.open_gate(backend),
        }
        .map_err(|err| err.to_string())
    }

    fn steer(
        &self,
        backend: usize,
        steering: drain_agent_common::steer::Steering,
    ) -> Result<bool, String> {
        let mut tracker = self.tracker.lock().expect("tracker lock");
        tracker
            .steer(backend, steering)
            .map_err(|err| err.to_string())
    }

    fn steer_socket(
        &self,
        port: u16,
        ipv6: bool,
        instance: u32,
        socket: Option<&std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        let mut tracker = self.tracker.lock().expect("tracker lock");
        tracker
            .steer_socket(port, ipv6, instance, socket)
            .map_err(|err| err.to_string())
    }
}

/// The last finished operation of a backend, for `status`.
struct LastOperation {
    report: crate::drain::Report,
    ended: Instant,
}

/// The running drain or cycle, for every client that follows it: the one that started it,
/// and any `wait` (or `drain --wait`) that re-attaches later.
struct Following {
    backend: String,
    kind: Kind,
    answers: broadcast::Sender<Response>,
}

/// Everything the running agent shares between its tasks.
struct Agent {
    /// The running operation's answers; taken with `last_reports` when it ends, so a client
    /// that re-attaches sees either the operation or its report, never neither.
    following: Mutex<Option<Following>>,
    /// Per backend, what load balancers show that differs from the agent's phase at rest.
    drift: Mutex<Vec<Vec<String>>>,
    /// The previous agent's journal was unreadable (torn, or of another format).
    journal_torn: bool,
    /// Per backend (config order), the last finished operation.
    last_reports: Mutex<Vec<Option<LastOperation>>>,
    config: Arc<Config>,
    kernel: Arc<Kernel>,
    operations: Arc<Operations>,
    metrics: Arc<Metrics>,
    /// The control group's id, when one is configured.
    control_gid: Option<u32>,
    started: Instant,
}

/// Answers a slow follower may fall behind by before it skips progress lines (the report at
/// the end is never skipped: it is the last one sent).
const FOLLOWER_BACKLOG: usize = 256;

/// Sends one follower the operation's answers until its report; without `wait`, until the
/// load balancers confirmed the drain. A client that went away stops only its own follower.
async fn follow(
    mut answers: broadcast::Receiver<Response>,
    wait: bool,
    sender: mpsc::Sender<Response>,
) {
    loop {
        let response = match answers.recv().await {
            Ok(response) => response,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let last = matches!(response, Response::Report(_));
        let started = matches!(response, Response::Started { .. });
        if started && wait {
            continue;
        }
        if sender.send(response).await.is_err() || last || started {
            return;
        }
    }
}

/// How often the load balancers' runtime APIs are checked: reachability and drift.
const LOAD_BALANCER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Runs the agent until a signal stops it. Errors here happen before anything serves.
pub fn run(config: Config, mode: KernelMode) -> anyhow::Result<()> {
    let tracker = Tracker::start(&config, mode)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, tracker))
}

async fn serve(config: Config, mut tracker: Tracker) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let control_gid = match &config.control_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)?
                .ok_or_else(|| anyhow::anyhow!("control_group `{name}` does not exist"))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    let listener = control::bind(&config.control_socket, control_gid)?;
    let _socket_file = RemoveOnDrop(config.control_socket.clone());
    let agent_check_listener = listen(
        config.agent_check_listen,
        "agent checks",
        "agent_check_listen",
    )
    .await?;
    let metrics_listener = listen(config.metrics_listen, "metrics", "metrics_listen").await?;
    let kernel_log = tracker.take_kernel_log();
    let kernel_mode = tracker.mode();
    let kernel_features = tracker.features();
    let kernel = Arc::new(Kernel {
        tracker: Mutex::new(tracker),
    });
    if let Some(log) = kernel_log {
        tokio::spawn(read_kernel_log(log));
    }
    let journal = Journal::open(&config.state_dir)?;
    let (record, torn, found) = match journal.read()? {
        Found::Nothing => (Record::default(), None, JournalFound::Missing),
        Found::Record(record) => {
            info!(journal = %journal.path().display(), "read the operation journal");
            (record, None, JournalFound::Read)
        }
        Found::Torn(err) => {
            error!(%err, "the operation journal is torn");
            (Record::default(), Some(err), JournalFound::Torn)
        }
    };
    let board = Arc::new(Board::restored(
        config.backends.iter().map(|b| b.name.clone()).collect(),
        Some(journal),
        &record,
    ));
    if matches!(found, JournalFound::Missing | JournalFound::Torn) {
        board.mark_past_unknown();
    }
    warn_held_out(&board, &config, found);
    let pollers = Arc::new(agent_check::Pollers::default());
    let agent = Arc::new(Agent {
        operations: Arc::new(Operations::new(
            config.clone(),
            board,
            kernel.clone(),
            pollers.clone(),
        )),
        metrics: Arc::new(Metrics::new(
            &config
                .backends
                .iter()
                .map(|backend| backend.name.clone())
                .collect::<Vec<_>>(),
            kernel_mode.as_str(),
        )),
        following: Mutex::new(None),
        last_reports: Mutex::new(config.backends.iter().map(|_| None).collect()),
        drift: Mutex::new(vec![Vec::new(); config.backends.len()]),
        journal_torn: found == JournalFound::Torn,
        config: config.clone(),
        control_gid,
        kernel,
        started: Instant::now(),
    });
    agent.metrics.kernel_features(&kernel_features);

    let mut tasks = Vec::new();
    let answering = agent.clone();
    tasks.push(tokio::spawn(control::serve(
        listener,
        move |request, peer| answering.clone().answer(request, peer),
    )));
    if let Some(listener) = agent_check_listener {
        let limits = agent_check::Limits {
            allow: config.agent_check_allow.clone(),
            max_connections: config.agent_check_max_connections,
        };
        tasks.push(tokio::spawn(agent_check::serve(
            listener,
            agent.clone(),
            pollers,
            limits,
        )));
    }
    if let Some(listener) = metrics_listener {
        let refreshing = agent.clone();
        let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || refreshing.refresh_metrics());
        tasks.push(tokio::spawn(crate::metrics::serve(
            listener,
            agent.metrics.clone(),
            refresh,
        )));
    }
    tasks.push(tokio::spawn(collect_garbage(agent.clone())));
    tasks.push(tokio::spawn(count_untracked(agent.clone())));
    tasks.push(tokio::spawn(check_load_balancers(agent.clone())));

    // Agent-check already answers from the journal's phases; now settle what the previous
    // agent left unfinished, with the load balancers' real state.
    agent.operations.restore_gates();
    let reconciling = agent.clone();
    tasks.push(tokio::spawn(async move {
        if let Some(err) = torn {
            reconciling
                .adopt_load_balancer_state(&err.to_string())
                .await;
        }
        for report in reconciling.operations.reconcile_interrupted().await {
            reconciling.finished(&report);
        }
    }));

    agent.metrics.set_ready(true);
    info!(
        control_socket = %config.control_socket.display(),
        agent_check = config
            .agent_check_listen
            .map_or_else(|| "off".to_string(), |address| address.to_string()),
        metrics = config
            .metrics_listen
            .map_or_else(|| "off".to_string(), |address| address.to_string()),
        kernel = agent.kernel.tracker.lock().expect("tracker lock").mode().as_str(),
        "drain-agent ready"
    );
    // Type=notify: systemd considers the service started only now, with everything attached.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    agent.metrics.set_ready(false);
    // A second signal while shutting down means "now".
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
        warn!("second signal: exiting immediately");
        std::process::exit(130);
    });
    agent.settle_operation(which).await;
    info!(signal = which, "shutting down: detaching kernel programs");
    for task in tasks {
        task.abort();
    }
    drop(agent); // last reference after the tasks end: drops the tracker and its links
    info!("stopped");
    Ok(())
}

/// What the start found of the previous agent's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JournalFound {
    Read,
    Missing,
    Torn,
}

/// Says, at WARN, which backends the journal brings back out of rotation: since when, by which
/// operation, and the command that puts each back (they stay out until someone says so).
/// Without a readable journal, says what the agent cannot know and leaves alone.
fn warn_held_out(board: &Board, config: &Config, found: JournalFound) {
    if found == JournalFound::Torn && config.agent_check_listen.is_some() {
        for backend in &config.backends {
            warn!(
                backend = backend.name,
                "the journal was unreadable: load balancers that only agent-check reaches may \
                 still hold the server out from before, and this agent leaves them as they are \
                 (its answers carry no admin word). `drain-agent resume {}` tells them `ready`",
                backend.name
            );
        }
    }
    for (index, backend) in config.backends.iter().enumerate() {
        let state = board.get(index);
        if !state.phase.holds_out() {
            continue;
        }
        let since = std::time::UNIX_EPOCH + Duration::from_millis(state.since_unix_ms);
        warn!(
            backend = backend.name,
            phase = state.phase.as_str(),
            since = %humantime::format_rfc3339_seconds(since),
            for_s = state.since.elapsed().as_secs(),
            by = state.by.as_deref().unwrap_or("unknown"),
            reason = state.reason.as_deref().unwrap_or(""),
            "the journal says this agent left the server out of rotation; it stays out: \
             `drain-agent resume {}` puts it back",
            backend.name
        );
    }
}

/// Binds an optional TCP listener; the error names the setting to change.
async fn listen(
    address: Option<std::net::SocketAddr>,
    purpose: &str,
    setting: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(address) = address else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|err| {
            anyhow::anyhow!("cannot listen for {purpose} on {address} ({setting}): {err}")
        })?;
    Ok(Some(listener))
}

/// Keeps the load-balancer reachability metric current, and compares what each load
/// balancer shows for this node's servers with the agent's phases (drift.rs).
async fn check_load_balancers(agent: Arc<Agent>) {
    let clients = RuntimeApiClient::for_each(&agent.config.load_balancers);
    // Per (load balancer, backend), the HAProxy process that last showed the agent's DRAIN or
    // MAINT: another process showing the server in rotation lost it (reload, restart).
    let mut held_by: std::collections::HashMap<(String, usize), (u64, u64)> =
        std::collections::HashMap::new();
    loop {
        let mut drift: Vec<Vec<String>> = vec![Vec::new(); agent.config.backends.len()];
        for client in &clients {
            let info = client.command("show info").await;
            agent
                .metrics
                .observe_load_balancer(client.name(), info.is_ok());
            let Ok(info) = info else {
                continue;
            };
            let process = haproxy_process(&info);
            for (index, backend) in agent.config.backends.iter().enumerate() {
                let Some(server) = &backend.haproxy else {
                    continue;
                };
                let Ok(stat) = client.server(server).await else {
                    continue;
                };
                let phase = agent.operations.board().get(index).phase;
                let operating = agent
                    .operations
                    .board()
                    .running()
                    .is_some_and(|running| running.ends_with(&format!(" {}", backend.name)));
                let shown = drift::Shown::of(&stat);
                let key = (client.name().to_string(), index);
                if !phase.holds_out() {
                    held_by.remove(&key);
                } else if shown == drift::Shown::Out
                    && let Some(process) = process
                {
                    held_by.insert(key.clone(), process);
                }
                // The same pid started within a few seconds (uptime is coarse) is the same one.
                let restarted = held_by.get(&key).is_some_and(|held| {
                    process.is_some_and(|now| now.0 != held.0 || now.1.abs_diff(held.1) > 2)
                });
                match drift::judge(phase, shown, operating, restarted, &stat.status) {
                    drift::Verdict::Agrees => {}
                    drift::Verdict::Reapply(state) => {
                        let result = client.set_state(server, state).await;
                        warn!(
                            backend = backend.name,
                            load_balancer = client.name(),
                            shown = stat.status,
                            reapplied = state.as_str(),
                            ok = result.is_ok(),
                            operating,
                            "a load balancer lost the server's state the agent holds (reloaded \
                             or restarted): re-applied it"
                        );
                        agent
                            .metrics
                            .observe_reapplied(&backend.name, client.name());
                    }
                    drift::Verdict::Report(sentence) => {
                        drift[index].push(format!("{} {sentence}", client.name()));
                    }
                }
            }
        }
        if agent.journal_torn && agent.config.agent_check_listen.is_some() {
            for (index, backend) in agent.config.backends.iter().enumerate() {
                if agent.operations.board().past_unknown(index) {
                    drift[index].push(format!(
                        "the journal was unreadable at start: load balancers that only \
                         agent-check reaches may still hold the server out from before; the \
                         agent leaves them as they are. `drain-agent resume {}` tells them \
                         `ready`",
                        backend.name
                    ));
                }
            }
        }
        agent.set_drift(drift);
        tokio::time::sleep(LOAD_BALANCER_CHECK_EVERY).await;
    }
}

/// The HAProxy process behind a `show info` answer: its pid and start time (Unix seconds,
/// from `Uptime_sec` against now).
fn haproxy_process(info: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    let pid = field("Pid")?;
    let uptime = field("Uptime_sec")?;
    Some((
        pid,
        (crate::journal::unix_ms() / 1000).saturating_sub(uptime),
    ))
}

/// Periodically deletes seeded connections (older than the agent) that ended or vanished.
async fn collect_garbage(agent: Arc<Agent>) {
    let period = (agent.config.flow_idle_check / 2).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // On a blocking thread, and the socket table (hundreds of milliseconds at 100k
        // connections) read without the tracker's lock: status, drains and agent checks
        // never wait for a collection.
        let kernel = agent.kernel.clone();
        let result = tokio::task::spawn_blocking(move || {
            let candidates = kernel
                .tracker
                .lock()
                .expect("tracker lock")
                .garbage_candidates()?;
            let Some(candidates) = candidates else {
                return Ok(0);
            };
            let live = if candidates.socket_table_needed() {
                crate::kernel::ebpf::live_sockets()?
            } else {
                Default::default()
            };
            kernel
                .tracker
                .lock()
                .expect("tracker lock")
                .remove_garbage(candidates, live)
        })
        .await
        .unwrap_or_else(|panic| {
            Err(TrackerError::Read {
                what: "the flow table (garbage collection panicked)",
                source: panic.to_string().into(),
            })
        });
        match result {
            Ok(0) => {}
            Ok(removed) => info!(removed, "garbage-collected vanished connections"),
            Err(err) => error!(%err, "flow table garbage collection failed"),
        }
    }
}

/// How often the agent looks for connections that went untracked.
const UNTRACKED_CHECK_EVERY: Duration = Duration::from_millis(500);
/// Fill level of a backend's flow-table share that is warned about.
const FLOW_TABLE_WARN_FILL: f64 = 0.8;

/// Counts connections that went untracked as unknown (from the socket table, on a
/// blocking thread), and warns when the table passes 80%.
async fn count_untracked(agent: Arc<Agent>) {
    let mut warned = false;
    loop {
        tokio::time::sleep(UNTRACKED_CHECK_EVERY).await;
        let kernel = agent.kernel.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut tracker = kernel.tracker.lock().expect("tracker lock");
            let fill = tracker
                .flow_table()
                .map(|(entries, capacity)| entries as f64 / capacity.max(1) as f64);
            tracker.seed_untracked().map(|seeded| (seeded, fill))
        })
        .await;
        match result {
            Ok(Ok((_, Some(fill)))) if fill >= FLOW_TABLE_WARN_FILL && !warned => {
                warn!(
                    fill = format!("{:.0}%", fill * 100.0),
                    "the table of connections older than the agent is filling: past it, older \
                     or untracked connections go uncounted; raise flow_table_size"
                );
                warned = true;
            }
            Ok(Ok((_, Some(fill)))) if fill < FLOW_TABLE_WARN_FILL * 0.9 => warned = false,
            Ok(Err(err)) => error!(%err, "counting untracked connections failed"),
            _ => {}
        }
    }
}

impl Agent {
    /// What SIGTERM does to a running drain or cycle (`on_shutdown`), said in the log.
    async fn settle_operation(&self, signal: &str) {
        let Some(running) = self.operations.board().running() else {
            return;
        };
        match self.config.on_shutdown {
            OnShutdown::Abort => {
                warn!(
                    signal,
                    running,
                    "on_shutdown = \"abort\": stopping the drain and putting the server back in service; a restart already under way is waited for"
                );
                self.operations
                    .cancel(&format!("{signal} (on_shutdown = \"abort\")"));
            }
            OnShutdown::Finish => {
                warn!(
                    signal,
                    running,
                    shutdown_timeout = %humantime::format_duration(self.config.shutdown_timeout),
                    "on_shutdown = \"finish\": letting it finish before exiting, for at most \
                     shutdown_timeout"
                );
            }
        }
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let mut aborted = self.config.on_shutdown == OnShutdown::Abort;
        while self.operations.board().running().is_some() {
            if !aborted && Instant::now() >= deadline {
                warn!(
                    running,
                    "shutdown_timeout passed: aborting the operation so the agent exits inside \
                     systemd's TimeoutStopSec"
                );
                self.operations
                    .cancel(&format!("{signal} (shutdown_timeout passed)"));
                aborted = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(running, "the operation ended; exiting");
    }

    /// Root and (with control_group) the group's members may change state; anyone who can
    /// open the socket may read status.
    fn authorized(&self, peer: Peer) -> bool {
        if peer.uid == 0 {
            return true;
        }
        let Some(gid) = self.control_gid else {
            return false;
        };
        if peer.gid == gid {
            return true;
        }
        // Supplementary groups are not in SO_PEERCRED: read the peer process's own list.
        let Some(pid) = peer.pid else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Groups:"))
                .is_some_and(|groups| {
                    groups
                        .split_whitespace()
                        .any(|group| group.parse::<u32>() == Ok(gid))
                })
        })
    }

    /// Brings the metrics up to date before a scrape. A failed kernel read is counted and its
    /// gauges left out, never served stale.
    fn refresh_metrics(&self) {
        let names: Vec<String> = self
            .config
            .backends
            .iter()
            .map(|b| b.name.clone())
            .collect();
        let board = self.operations.board();
        let phases: Vec<_> = (0..self.config.backends.len())
            .map(|i| {
                let state = board.get(i);
                (state.phase, state.since.elapsed())
            })
            .collect();
        self.metrics.observe_phases(&names, &phases);
        let tracker = self.kernel.tracker.lock().expect("tracker lock");
        match tracker.sample() {
            Ok(samples) => {
                let table = tracker.flow_table();
                self.metrics.observe_kernel(&names, &samples, table);
            }
            Err(err) => {
                warn!(%err, "reading the kernel counters for a scrape failed");
                self.metrics.observe_kernel_failure();
            }
        }
    }

    /// Answers one control request; the answer lines arrive on the returned channel.
    fn answer(self: Arc<Self>, request: Request, peer: Peer) -> mpsc::Receiver<Response> {
        let (sender, receiver) = mpsc::channel(64);
        if request.changes_state() && !self.authorized(peer) {
            let group = self
                .config
                .control_group
                .as_ref()
                .map(|group| format!(" or members of group `{group}`"))
                .unwrap_or_default();
            let (operation, backend) = match &request {
                Request::Drain { backend, .. } => ("drain", backend.as_str()),
                Request::Resume { backend } => ("resume", backend.as_str()),
                Request::Cycle { backend } => ("cycle", backend.as_str()),
                Request::Handover { backend } => ("handover", backend.as_str()),
                Request::Status | Request::Wait { .. } => ("status", ""),
            };
            warn!(
                uid = peer.uid,
                operation, backend, "refused a control request from an unauthorized peer"
            );
            let _ = sender.try_send(Response::Refused {
                exit_code: crate::drain::report::exit::REFUSED,
                message: format!(
                    "refused: uid {} may read status but not drain, cycle, hand over or resume; only root{group} may",
                    peer.uid
                ),
            });
            return receiver;
        }
        tokio::spawn(async move {
            match request {
                Request::Status => {
                    let response = match self.status() {
                        Ok(status) => Response::Status(status),
                        Err(err) => Response::Error {
                            message: err.to_string(),
                        },
                    };
                    let _ = sender.send(response).await;
                }
                Request::Resume { backend } => {
                    let response = match self.operations.resume(&backend).await {
                        Ok(report) => {
                            self.finished(&report);
                            Response::Report(Box::new(report))
                        }
                        Err(refusal) => {
                            self.metrics.observe_refusal(&backend, "resume");
                            Response::Refused {
                                exit_code: refusal.exit_code,
                                message: refusal.message,
                            }
                        }
                    };
                    let _ = sender.send(response).await;
                }
                // `drain --wait` on the drain already running re-attaches to it.
                Request::Drain {
                    backend,
                    wait: true,
                } if self.running_answers(&backend, Some(Kind::Drain)).is_some() => {
                    self.wait(&backend, sender).await;
                }
                Request::Drain { backend, wait } => {
                    self.operate(&backend, Kind::Drain, wait, sender).await;
                }
                Request::Cycle { backend } => {
                    self.operate(&backend, Kind::Cycle, true, sender).await;
                }
                Request::Handover { backend } => {
                    self.operate(&backend, Kind::Handover, true, sender).await;
                }
                Request::Wait { backend } => self.wait(&backend, sender).await,
            }
        });
        receiver
    }

    /// Starts a drain or cycle and follows it; without `wait`, stops following once the load
    /// balancers confirmed the drain (the operation goes on in the agent, and is counted when
    /// it ends whoever follows it).
    async fn operate(
        self: &Arc<Self>,
        backend: &str,
        kind: Kind,
        wait: bool,
        sender: mpsc::Sender<Response>,
    ) {
        let events = match self.operations.start(backend, kind).await {
            Ok(events) => events,
            Err(refusal) => {
                self.metrics.observe_refusal(backend, kind.as_str());
                let _ = sender
                    .send(Response::Refused {
                        exit_code: refusal.exit_code,
                        message: refusal.message,
                    })
                    .await;
                return;
            }
        };
        let (answers, mine) = broadcast::channel(FOLLOWER_BACKLOG);
        *self.following.lock().expect("following lock") = Some(Following {
            backend: backend.to_string(),
            kind,
            answers: answers.clone(),
        });
        tokio::spawn(self.clone().forward(backend.to_string(), events, answers));
        follow(mine, wait, sender).await;
    }

    /// Turns the running operation's events into answers for every follower; at its end,
    /// counts it and keeps its report, in the same step that stops following it.
    async fn forward(
        self: Arc<Self>,
        backend: String,
        mut events: mpsc::Receiver<Event>,
        answers: broadcast::Sender<Response>,
    ) {
        while let Some(event) = events.recv().await {
            let response = match event {
                Event::Started { unconfirmed } => Response::Started {
                    backend: backend.clone(),
                    unconfirmed,
                },
                Event::Progress(progress) => Response::Progress(progress),
                Event::Done(report) => {
                    let mut following = self.following.lock().expect("following lock");
                    self.finished(&report);
                    *following = None;
                    let _ = answers.send(Response::Report(report));
                    return;
                }
            };
            let _ = answers.send(response);
        }
    }

    /// The running operation's answers, if it is on `backend` (and of `kind`, when given).
    fn running_answers(
        &self,
        backend: &str,
        kind: Option<Kind>,
    ) -> Option<broadcast::Receiver<Response>> {
        let following = self.following.lock().expect("following lock");
        following
            .as_ref()
            .filter(|running| {
                running.backend == backend && kind.is_none_or(|kind| running.kind == kind)
            })
            .map(|running| running.answers.subscribe())
    }

    /// `drain-agent wait BACKEND`: follows the backend's running drain or cycle to its end, or
    /// answers the report of its last one when none runs.
    async fn wait(&self, backend: &str, sender: mpsc::Sender<Response>) {
        if self.config.backend(backend).is_none() {
            let _ = sender
                .send(Response::Refused {
                    exit_code: crate::drain::report::exit::CONFIG,
                    message: format!(
                        "no backend `{backend}` in {}: the backends are {}",
                        self.config.path.display(),
                        self.config
                            .backends
                            .iter()
                            .map(|b| format!("`{}`", b.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
                .await;
            return;
        }
        // Under the lock that `forward` ends an operation with: running, or reported.
        let (running, last) = {
            let following = self.following.lock().expect("following lock");
            let running = following
                .as_ref()
                .filter(|running| running.backend == backend)
                .map(|running| running.answers.subscribe());
            let last = self
                .config
                .backends
                .iter()
                .position(|b| b.name == backend)
                .and_then(|index| {
                    self.last_reports.lock().expect("reports lock")[index]
                        .as_ref()
                        .map(|last| last.report.clone())
                });
            (running, last)
        };
        match (running, last) {
            (Some(answers), _) => follow(answers, true, sender).await,
            (None, Some(report)) => {
                let _ = sender.send(Response::Report(Box::new(report))).await;
            }
            (None, None) => {
                let _ = sender
                    .send(Response::Error {
                        message: format!(
                            "nothing to wait for: no drain or cycle of `{backend}` is running,                              and none ran since the agent started"
                        ),
                    })
                    .await;
            }
        }
    }

    /// The journal was unreadable: take each backend's state from the load balancers. A
    /// server they hold out stays out, as "drained" with a reason that says why and how to put
    /// it back — the agent cannot know who took it out, and never returns it silently.
    async fn adopt_load_balancer_state(&self, why: &str) {
        let clients = RuntimeApiClient::for_each(&self.config.load_balancers);
        for (index, backend) in self.config.backends.iter().enumerate() {
            let Some(server) = &backend.haproxy else {
                continue;
            };
            let mut out_on = Vec::new();
            for client in &clients {
                match client.server(server).await {
                    Ok(stat) if drift::Shown::of(&stat) == drift::Shown::Out => {
                        out_on.push(format!("{} ({})", client.name(), stat.status));
                    }
                    Ok(_) => {}
                    Err(err) => {
                        warn!(backend = backend.name, %err, "cannot read the load balancer")
                    }
                }
            }
            if out_on.is_empty() {
                info!(
                    backend = backend.name,
                    "journal unreadable; every reachable load balancer has the server in rotation"
                );
                continue;
            }
            let reason = format!(
                "{why}. The load balancers hold the server out: {}. `drain-agent resume {}` \
                 puts it back",
                out_on.join(", "),
                backend.name
            );
            warn!(
                backend = backend.name,
                reason, "keeping the server out of rotation"
            );
            self.operations
                .board()
                .set(index, crate::drain::Phase::Drained, Some(reason));
        }
    }

    /// Records the drift found by the last look at the load balancers: logged when it
    /// appears, in `status` and in the metrics while it lasts.
    fn set_drift(&self, now: Vec<Vec<String>>) {
        let mut drift = self.drift.lock().expect("drift lock");
        for (index, sentences) in now.iter().enumerate() {
            let name = &self.config.backends[index].name;
            for sentence in sentences {
                if !drift[index].contains(sentence) {
                    warn!(backend = name, "load balancer drift: {sentence}");
                }
            }
            self.metrics.observe_drift(name, sentences.len());
        }
        *drift = now;
    }

    /// Counts a finished operation and keeps its report for `status`.
    fn finished(&self, report: &crate::drain::Report) {
        self.metrics.observe_report(report);
        if let Some(index) = self
            .config
            .backends
            .iter()
            .position(|backend| backend.name == report.backend)
        {
            self.last_reports.lock().expect("reports lock")[index] = Some(LastOperation {
                report: report.clone(),
                ended: Instant::now(),
            });
        }
    }

    fn status(&self) -> Result<Status, TrackerError> {
        let tracker = self.kernel.tracker.lock().expect("tracker lock");
        let samples = tracker.sample()?;
        let board = self.operations.board();
        let flow_table = tracker
            .flow_table()
            .map(|(entries, capacity)| FlowTableStatus { entries, capacity });
        Ok(Status {
            kernel: tracker.mode().as_str().to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            flow_table,
            attachments: tracker.attachments(),
            features: tracker.features(),
            running: board.running(),
            backends: self
                .config
                .backends
                .iter()
                .zip(samples)
                .enumerate()
                .map(|(index, (backend, sample))| {
                    let phase = board.get(index);
                    let versions = crate::status::VersionStatus::of(
                        &sample,
                        phase.phase == crate::drain::Phase::HandingOver,
                    );
                    let mut status = backend_status(backend, sample, self.config.quiet_period);
                    status.versions = versions;
                    status.state = phase.phase.as_str().to_string();
                    status.reason = phase.reason;
                    status.state_since_unix_ms = Some(phase.since_unix_ms);
                    status.state_by = phase.by;
                    status.drift = self.drift.lock().expect("drift lock")[index].clone();
                    status.last_operation = self.last_reports.lock().expect("reports lock")[index]
                        .as_ref()
                        .map(|last| OperationSummary::of(&last.report, last.ended.elapsed()));
                    status
                })
                .collect(),
        })
    }
}

impl agent_check::Answer for Agent {
    fn answer(&self, backend: Option<&str>, peer: std::net::IpAddr) -> Option<(usize, String)> {
        let index = match backend {
            Some(name) => self.config.backends.iter().position(|b| b.name == name)?,
            None if self.config.backends.len() == 1 => 0,
            None => return None,
        };
        let board = self.operations.board();
        let phase = board.get(index).phase;
        let owes_ready = board
            .returned(index)
            .is_some_and(|returned| self.operations.pollers().owes_ready(peer, index, returned));
        Some((index, phase.agent_check_answer(owes_ready).to_string()))
    }
}

fn backend_status(
    backend: &crate::config::Backend,
    sample: BackendSample,
    quiet_period: Duration,
) -> BackendStatus {
    let reset = sample
        .reset_by_client
        .zip(sample.reset_by_server)
        .map(|(client, server)| client + server);
    BackendStatus {
        name: backend.name.clone(),
        ports: backend.ports.clone(),
        listen: backend.listen.iter().map(ToString::to_string).collect(),
        state: "serving".into(),
        established: sample.established,
        idle: sample.idle(),
        unknown: sample.unknown,
        flow_table_entries: sample.tracked,
        quiet: sample.in_flight.map(|in_flight| {
            in_flight == 0
                && sample
                    .since_last_idle
                    .is_none_or(|since| since >= quiet_period)
        }),
        last_in_flight_ms_ago: sample.since_last_idle.map(|since| since.as_millis() as u64),
        in_flight: sample.in_flight,
        accepted: sample.accepted,
        closed: sample.closed,
        reset,
        reset_by_client: sample.reset_by_client,
        reset_by_server: sample.reset_by_server,
        flow_table_full: sample.flow_table_full,
        vanished: sample.vanished,
        cut_in_flight: sample.cut_in_flight,
        reason: None,
        state_since_unix_ms: None,
        state_by: None,
        last_operation: None,
        drift: Vec::new(),
        gate: sample.gate.as_ref().map(crate::status::GateStatus::of),
        versions: Vec::new(),
    }
}

/// Hands the kernel programs' aya-log records to the agent's log as they arrive.
async fn read_kernel_log(log: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's descriptor for as long as it lives, and the
    // AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(log, tokio::io::Interest::READABLE)
    };
    let mut log = match registered {
        Ok(log) => log,
        Err(err) => {
            warn!(%err, "cannot wait for kernel-side log records; they are not shown");
            return;
        }
    };
    loop {
        let Ok(mut ready) = log.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Removes the control socket file when the agent stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
