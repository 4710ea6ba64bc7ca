//! `drain-agent run`: load the kernel side, serve the control socket and the agent-check
//! port, run drains and cycles, collect garbage, and shut down cleanly on SIGTERM/SIGINT.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    agent_check,
    config::Config,
    control::{self, Request, Response},
    drain::{
        Board, Kind, Operations,
        operation::{Event, KernelView},
    },
    kernel::{BackendSample, KernelMode, Tracker, TrackerError},
    status::{BackendStatus, FlowTableStatus, Status},
};

/// The kernel side, shared by status, the drain operations and housekeeping.
struct Kernel {
    tracker: Mutex<Tracker>,
}

impl KernelView for Kernel {
    fn sample(&self, backend: usize) -> Option<BackendSample> {
        let tracker = self.tracker.lock().expect("tracker lock");
        match tracker.sample() {
            Ok(mut samples) if backend < samples.len() => Some(samples.swap_remove(backend)),
            Ok(_) => None,
            Err(err) => {
                warn!(%err, "reading the kernel counters failed");
                None
            }
        }
    }
}

/// Everything the running agent shares between its tasks.
struct Agent {
    config: Arc<Config>,
    kernel: Arc<Kernel>,
    operations: Arc<Operations>,
    started: Instant,
}

/// Runs the agent until a signal stops it. Errors here happen before anything serves.
pub fn run(config: Config, mode: KernelMode) -> anyhow::Result<()> {
    let tracker = Tracker::start(&config, mode)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, tracker))
}

async fn serve(config: Config, tracker: Tracker) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let listener = control::bind(&config.control_socket)?;
    let agent_check_listener = match config.agent_check_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|err| {
                    anyhow::anyhow!(
                        "cannot listen for agent checks on {address} (agent_check_listen): {err}"
                    )
                })?,
        ),
        None => None,
    };
    let _socket_file = RemoveOnDrop(config.control_socket.clone());
    let kernel = Arc::new(Kernel {
        tracker: Mutex::new(tracker),
    });
    let board = Arc::new(Board::new(config.backends.len()));
    let agent = Arc::new(Agent {
        operations: Arc::new(Operations::new(config.clone(), board, kernel.clone())),
        config: config.clone(),
        kernel,
        started: Instant::now(),
    });
    info!(
        control_socket = %config.control_socket.display(),
        agent_check = ?config.agent_check_listen,
        kernel = agent.kernel.tracker.lock().expect("tracker lock").mode().as_str(),
        "drain-agent ready"
    );

    let answering = agent.clone();
    let server = tokio::spawn(control::serve(listener, move |request| {
        answering.clone().answer(request)
    }));
    let agent_check = agent_check_listener
        .map(|listener| tokio::spawn(agent_check::serve(listener, agent.clone())));
    let housekeeping = tokio::spawn(collect_garbage(agent.clone()));

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    info!(signal = which, "shutting down: detaching kernel programs");
    // A second signal while shutting down means "now".
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
        warn!("second signal: exiting immediately");
        std::process::exit(130);
    });
    server.abort();
    housekeeping.abort();
    if let Some(task) = agent_check {
        task.abort();
    }
    drop(agent); // last reference after the tasks end: drops the tracker and its links
    info!("stopped");
    Ok(())
}

/// Periodically removes tracked connections whose sockets vanished without FIN or RST.
async fn collect_garbage(agent: Arc<Agent>) {
    let period = (agent.config.flow_idle_check / 2).max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = agent
            .kernel
            .tracker
            .lock()
            .expect("tracker lock")
            .collect_garbage();
        match result {
            Ok(0) => {}
            Ok(removed) => info!(removed, "garbage-collected vanished connections"),
            Err(err) => error!(%err, "flow table garbage collection failed"),
        }
    }
}

impl Agent {
    /// Answers one control request; the answer lines arrive on the returned channel.
    fn answer(self: Arc<Self>, request: Request) -> mpsc::Receiver<Response> {
        let (sender, receiver) = mpsc::channel(64);
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
                        Ok(report) => Response::Report(Box::new(report)),
                        Err(refusal) => Response::Refused {
                            exit_code: refusal.exit_code,
                            message: refusal.message,
                        },
                    };
                    let _ = sender.send(response).await;
                }
                Request::Drain { backend, wait } => {
                    self.operate(&backend, Kind::Drain, wait, sender).await;
                }
                Request::Cycle { backend } => {
                    self.operate(&backend, Kind::Cycle, true, sender).await;
                }
            }
        });
        receiver
    }

    /// Starts a drain or cycle and forwards its events; without `wait`, stops forwarding once
    /// the load balancers confirmed the drain (the operation goes on in the agent).
    async fn operate(&self, backend: &str, kind: Kind, wait: bool, sender: mpsc::Sender<Response>) {
        let mut events = match self.operations.start(backend, kind).await {
            Ok(events) => events,
            Err(refusal) => {
                let _ = sender
                    .send(Response::Refused {
                        exit_code: refusal.exit_code,
                        message: refusal.message,
                    })
                    .await;
                return;
            }
        };
        while let Some(event) = events.recv().await {
            let response = match event {
                Event::Started if !wait => {
                    let _ = sender
                        .send(Response::Started {
                            backend: backend.to_string(),
                        })
                        .await;
                    return;
                }
                Event::Started => continue,
                Event::Progress(progress) => Response::Progress(progress),
                Event::Done(report) => Response::Report(report),
            };
            // A client that went away does not stop the operation: keep draining events.
            let _ = sender.send(response).await;
        }
    }

    fn status(&self) -> Result<Status, TrackerError> {
        let tracker = self.kernel.tracker.lock().expect("tracker lock");
        let samples = tracker.sample()?;
        let board = self.operations.board();
        let flow_table = tracker.flow_table_size().map(|capacity| FlowTableStatus {
            entries: samples.iter().filter_map(|sample| sample.tracked).sum(),
            capacity: u64::from(capacity),
        });
        Ok(Status {
            kernel: tracker.mode().as_str().to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            flow_table,
            attachments: tracker.attachments(),
            running: board.running(),
            backends: self
                .config
                .backends
                .iter()
                .zip(samples)
                .enumerate()
                .map(|(index, (backend, sample))| {
                    let phase = board.get(index);
                    let mut status = backend_status(backend, sample, self.config.quiet_period);
                    status.state = phase.phase.as_str().to_string();
                    status.reason = phase.reason;
                    status
                })
                .collect(),
        })
    }
}

impl agent_check::Answer for Agent {
    fn answer(&self, backend: Option<&str>) -> Option<String> {
        let index = match backend {
            Some(name) => self.config.backends.iter().position(|b| b.name == name)?,
            None if self.config.backends.len() == 1 => 0,
            None => return None,
        };
        Some(
            self.operations
                .board()
                .get(index)
                .phase
                .agent_check_answer()
                .to_string(),
        )
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
        state: "serving".into(),
        established: sample.established,
        idle: sample
            .in_flight
            .map(|in_flight| sample.established.saturating_sub(in_flight)),
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
    }
}

/// Removes the control socket file when the agent stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
