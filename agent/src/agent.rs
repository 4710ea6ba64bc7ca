//! `drain-agent run`: load the kernel side, serve the control socket, collect garbage, and
//! shut down cleanly on SIGTERM/SIGINT.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    control::{self, Request, Response},
    kernel::{BackendSample, KernelMode, Tracker, TrackerError},
    status::{BackendStatus, FlowTableStatus, Status},
};

/// Shared between the control socket and the housekeeping loop.
struct Agent {
    config: Config,
    tracker: Mutex<Tracker>,
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
    let listener = control::bind(&config.control_socket)?;
    let socket_path = config.control_socket.clone();
    let _socket_file = RemoveOnDrop(socket_path.clone());
    let agent = Arc::new(Agent {
        config,
        tracker: Mutex::new(tracker),
        started: Instant::now(),
    });
    info!(
        control_socket = %socket_path.display(),
        kernel = agent.tracker.lock().expect("tracker lock").mode().as_str(),
        "drain-agent ready"
    );

    let answering = agent.clone();
    let server = tokio::spawn(control::serve(listener, move |request| match request {
        Request::Status => match answering.status() {
            Ok(status) => Response::Status(status),
            Err(err) => Response::Error {
                message: err.to_string(),
            },
        },
    }));

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
    fn status(&self) -> Result<Status, TrackerError> {
        let tracker = self.tracker.lock().expect("tracker lock");
        let samples = tracker.sample()?;
        let quiet_period = self.config.quiet_period;
        let flow_table = tracker.flow_table_size().map(|capacity| FlowTableStatus {
            entries: samples.iter().filter_map(|sample| sample.tracked).sum(),
            capacity: u64::from(capacity),
        });
        Ok(Status {
            kernel: tracker.mode().as_str().to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            flow_table,
            attachments: tracker.attachments(),
            backends: self
                .config
                .backends
                .iter()
                .zip(samples)
                .map(|(backend, sample)| backend_status(backend, sample, quiet_period))
                .collect(),
        })
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
    }
}

/// Removes the control socket file when the agent stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
