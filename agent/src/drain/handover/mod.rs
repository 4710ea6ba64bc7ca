//! The same-host handover (docs/handover.md): a new version of the service starts beside the
//! running one on the same port (SO_REUSEPORT), is verified by the agent's own probes before
//! any client reaches it, takes every new connection from one SYN to the next (the
//! `sk_lookup` program), and the old version is stopped once it has no request in flight.
//! The node never leaves the load balancers' rotation.

//!
//! `version.rs` finds, starts and stops a version; `keepalive.rs` holds the old version's
//! connections across its stop; `reconcile.rs` finishes or undoes a handover a crashed agent
//! left; `report.rs` is what the report says of it.

mod keepalive;
mod reconcile;
mod report;
mod version;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use drain_agent_common::steer::Steering;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use self::report::HandoverReport;
use self::version::{Version, owner_of, stop, units_in_order, version_of, wait_exit};
use super::{
    operation::{Event, KernelView, Operations, Refusal},
    phase::{Claim, Phase, millis},
    report::{Counts, Outcome, PhaseTiming, Progress, Report, exit},
};
use crate::{
    config::{Action, Backend, Handover, HandoverHow, Step},
    health,
    journal::HandoverRecord,
    kernel::listeners::{self, Listener},
    service,
};

use crate::kernel::features::Feature;

/// Where the agent's probes of the new version come from: a loopback address of their own,
/// which the `sk_lookup` program sends to the new version while clients still go to the old.
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 86);
/// How often the listeners are looked for while the new version starts.
const LISTEN_POLL: Duration = Duration::from_millis(100);
/// How often the old version's numbers are read while it finishes.
const QUIET_POLL: Duration = Duration::from_millis(20);
/// How often progress lines are sent.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
impl Operations {
    /// Checks that backend `index` can hand over, then runs the handover in the background.
    pub(in crate::drain) async fn start_handover(
        self: &Arc<Self>,
        index: usize,
        backend: Backend,
        claim: Claim,
    ) -> Result<mpsc::Receiver<Event>, Refusal> {
        let Some(handover) = backend.handover.clone() else {
            return Err(Refusal::new(
                exit::CONFIG,
                format!(
                    "backend `{}` has no `handover` in {}: add handover = {{ start = [...] }} or \
                     handover = {{ units = [\"NAME@blue\", \"NAME@green\"] }} (docs/handover.md)",
                    backend.name,
                    self.config.path.display()
                ),
            ));
        };
        if let Some(why) = self.kernel.unsupported(Feature::Handover) {
            return Err(Refusal::new(
                exit::REFUSED,
                format!("refused: the handover cannot run on this kernel: {why}"),
            ));
        }
        let sample = self.kernel.sample(index).map_err(|err| {
            Refusal::new(
                exit::ERROR,
                format!("cannot read the kernel's numbers: {err}"),
            )
        })?;
        if sample.instances.is_empty() {
            return Err(Refusal::new(
                exit::REFUSED,
                "refused: a handover steers connections in the kernel, and this agent runs with \
                 `--kernel procfs`; run it in eBPF mode",
            ));
        }
        let old_slot = sample.serving_instance;
        let found = listeners::of_backend(&backend)
            .map_err(|err| Refusal::new(exit::ERROR, err.to_string()))?;
        let missing: Vec<String> = backend
            .listen
            .iter()
            .filter(|listen| !found.iter().any(|listener| listen.covers(listener.local)))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(Refusal::new(
                exit::REFUSED,
                format!(
                    "refused: nothing listens on {} of backend `{}`: a handover hands over from \
                     a running version (`drain-agent cycle` restarts a stopped one; \
                     `drain-agent check-config --online` names what listens on its ports)",
                    missing.join(", "),
                    backend.name
                ),
            ));
        }
        let units = match &handover.how {
            HandoverHow::Units(pair) => {
                Some(units_in_order(pair).await.map_err(|message| {
                    Refusal::new(exit::REFUSED, format!("refused: {message}"))
                })?)
            }
            HandoverHow::Commands { .. } => None,
        };
        let old = version_of(old_slot, found, units.as_ref().map(|(old, _)| old.clone()))
            .map_err(|err| Refusal::new(exit::ERROR, err))?;
        if let Some((listener, _)) = old
            .listeners
            .iter()
            .zip(&old.copies)
            .find(|(_, socket)| !listeners::reuses_port(socket))
        {
            return Err(Refusal::new(
                exit::REFUSED,
                format!(
                    "refused: the running version's listener {} (pid {:?}) does not set \
                     SO_REUSEPORT, so a new version cannot listen beside it: start the service \
                     with it (gunicorn --reuse-port, nginx `listen ... reuseport`), then hand over",
                    listener.local, old.pids
                ),
            ));
        }
        allow_accept_queue_migration();
        let (events, receiver) = mpsc::channel(64);
        let mut run = HandoverRun {
            ops: self.clone(),
            index,
            backend,
            handover,
            old,
            new_unit: units.map(|(_, new)| new),
            events,
            started: Instant::now(),
            phase_started: Instant::now(),
            report: HandoverReport::default(),
            phases: Vec::new(),
            accepted_at_start: sample
                .instances
                .iter()
                .map(|instance| instance.accepted)
                .collect(),
        };
        run.report.old_pids = run.old.pids.clone();
        tokio::spawn(async move {
            let _claim = claim;
            let report = run.execute().await;
            info!(
                backend = report.backend,
                outcome = report.outcome.as_str(),
                message = report.message,
                "handover finished"
            );
            let _ = run.events.send(Event::Done(Box::new(report))).await;
        });
        Ok(receiver)
    }
}

/// `net.ipv4.tcp_migrate_req = 1` in this network namespace: connections waiting in the old
/// version's accept queue when it closes its listener move to the new version's (same
/// SO_REUSEPORT group) instead of being reset. The steering sends new connections to the new
/// version long before, so this only covers the few the old one had not accepted yet.
fn allow_accept_queue_migration() {
    const SETTING: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(SETTING) {
        Ok(value) if value.trim() == "1" => {}
        _ => match std::fs::write(SETTING, "1") {
            Ok(()) => {
                info!("set net.ipv4.tcp_migrate_req = 1 (accept queues move to the new version)")
            }
            Err(err) => {
                warn!(%err, "cannot set net.ipv4.tcp_migrate_req: connections in the old version's accept queue may be reset when it stops")
            }
        },
    }
}

/// The processes holding listeners on `ports` other than the `old` ones (inodes), less the old
/// version's `old_pids`: what a start left listening, whether or not it was seen yet.
pub(super) fn stray_listeners(
    backend: &Backend,
    old: &BTreeSet<u64>,
    old_pids: &[i32],
) -> Vec<i32> {
    let Ok(found) = listeners::of_backend(backend) else {
        return Vec::new();
    };
    let fresh: BTreeSet<u64> = found
        .iter()
        .map(|listener| listener.inode)
        .filter(|inode| !old.contains(inode))
        .collect();
    let pids: BTreeSet<i32> = listeners::holders(&fresh)
        .into_values()
        .flatten()
        .map(|(pid, _)| pid)
        .filter(|pid| !old_pids.contains(pid))
        .collect();
    pids.into_iter().collect()
}

/// A handover under way.
struct HandoverRun {
    ops: Arc<Operations>,
    index: usize,
    backend: Backend,
    handover: Handover,
    old: Version,
    new_unit: Option<String>,
    events: mpsc::Sender<Event>,
    started: Instant,
    phase_started: Instant,
    report: HandoverReport,
    phases: Vec<PhaseTiming>,
    accepted_at_start: Vec<u64>,
}

/// Why a handover did not complete, and what was done about it.
struct Failure {
    outcome: Outcome,
    message: String,
}

impl HandoverRun {
    fn kernel(&self) -> &Arc<dyn KernelView> {
        &self.ops.kernel
    }

    fn ms(&self) -> u64 {
        millis(self.started.elapsed())
    }

    fn new_slot(&self) -> u32 {
        1 - (self.old.slot & 1)
    }

    /// What the journal keeps of the handover: the versions' processes with their start
    /// times and boot (a pid is signalled after a crash only if it is still that process),
    /// and the old version's listeners (whatever else listens is the new version's).
    fn record(&self, switched: bool, new_pids: Vec<i32>) -> HandoverRecord {
        let starts = |pids: &[i32]| {
            pids.iter()
                .map(|&pid| version::started_at(pid).unwrap_or(0))
                .collect()
        };
        HandoverRecord {
            switched,
            old_pids: self.old.pids.clone(),
            old_starts: starts(&self.old.pids),
            new_starts: starts(&new_pids),
            new_pids,
            units: self.old.unit.clone().zip(self.new_unit.clone()),
            old_listeners: self
                .old
                .listeners
                .iter()
                .map(|listener| listener.inode)
                .collect(),
            boot_id: version::boot_id(),
        }
    }

    /// Writes the steering; failures are the handover's (it cannot steer).
    fn steer(&self, clients: u32, probes: u32) -> Result<(), String> {
        self.kernel()
            .steer(
                self.index,
                Steering {
                    active: 1,
                    clients,
                    probes,
                    probe_v4: u32::from_ne_bytes(PROBE_SOURCE.octets()),
                },
            )
            .map(drop)
    }

    /// Hands steering back to the kernel's own lookup, counting new connections under `slot`.
    fn release(&self, slot: u32) {
        let result = self.kernel().steer(
            self.index,
            Steering {
                active: 0,
                clients: slot,
                probes: slot,
                probe_v4: 0,
            },
        );
        if let Err(err) = result {
            warn!(%err, "cannot release the handover's steering");
        }
    }

    fn take_sockets(&self, version: &Version) {
        for listener in &version.listeners {
            let _ = self.kernel().steer_socket(
                listener.local.port(),
                listener.ipv6(),
                version.slot,
                None,
            );
        }
    }

    fn enter(&mut self, step: Phase) {
        let now = Instant::now();
        if let Some(last) = self.phases.last_mut() {
            last.duration_ms = millis(now - self.phase_started);
        }
        self.phases.push(PhaseTiming {
            phase: step,
            started_ms: self.ms(),
            duration_ms: 0,
        });
        self.phase_started = now;
    }

    async fn execute(&mut self) -> Report {
        self.ops.board.set(self.index, Phase::HandingOver, None);
        self.enter(Phase::HandingOver);
        self.ops
            .board
            .set_handover(self.index, Some(self.record(false, Vec::new())));
        let result = self.hand_over().await;
        let (outcome, message) = match result {
            Ok(message) => (Outcome::Ok, message),
            Err(failure) => (failure.outcome, failure.message),
        };
        self.ops.board.set_handover(self.index, None);
        self.ops.board.set(
            self.index,
            Phase::Serving,
            (outcome != Outcome::Ok).then(|| message.clone()),
        );
        self.finish(outcome, message)
    }

    /// Pin, start, verify, switch, wait, stop.
    async fn hand_over(&mut self) -> Result<String, Failure> {
        let fail = |message: String| Failure {
            outcome: Outcome::Error,
            message,
        };
        // Clients keep going to the old version's listener while the new one starts in its
        // SO_REUSEPORT group: without this, the group's hash would send them some of theirs.
        let old_slot = self.old.slot;
        let new_slot = self.new_slot();
        put_sockets(self.ops.kernel.as_ref(), &mut self.old).map_err(fail)?;
        self.steer(old_slot, new_slot).map_err(|err| {
            self.take_sockets(&self.old);
            fail(err)
        })?;

        let mut new = match self.start_new().await {
            Ok(new) => new,
            Err(message) => return Err(self.undo(None, message).await),
        };
        self.report.new_pids = new.pids.clone();
        self.ops
            .board
            .set_handover(self.index, Some(self.record(false, new.pids.clone())));
        if let Err(err) = put_sockets(self.ops.kernel.as_ref(), &mut new) {
            return Err(self.undo(Some(new), err).await);
        }
        let health = self
            .backend
            .health
            .clone()
            .expect("config validation requires a health check with a handover");
        if let Err(err) = health::wait_healthy_from(&health, Some(IpAddr::V4(PROBE_SOURCE))).await {
            let message = format!(
                "the new version never got healthy: {err}; it was stopped, and the old one \
                 served throughout"
            );
            return Err(self.undo(Some(new), message).await);
        }
        self.report.new_healthy_ms = Some(self.ms());

        // The switch: from the next SYN on, every new connection goes to the new version.
        self.ops
            .board
            .set_handover(self.index, Some(self.record(true, new.pids.clone())));
        if let Err(err) = self.steer(new_slot, new_slot) {
            return Err(self.undo(Some(new), err).await);
        }
        self.report.switched_ms = Some(self.ms());
        info!(
            backend = self.backend.name,
            "new connections go to the new version"
        );
        // Once more through the service's own port, as a client reaches it now.
        if let Err(err) = health::wait_healthy(&health).await {
            let _ = self.steer(old_slot, new_slot);
            let message = format!(
                "the new version answered the agent's probes but failed the health check once \
                 clients were sent to it: {err}; new connections went back to the old version \
                 and the new one was stopped"
            );
            return Err(self.undo(Some(new), message).await);
        }
        self.finish_old(new_slot).await
    }

    /// The old version: wait until it has nothing in flight, stop it, wait for its exit.
    async fn finish_old(&mut self, new_slot: u32) -> Result<String, Failure> {
        let forced = self.wait_old_quiet().await;
        let old_at_stop = self
            .kernel()
            .sample(self.index)
            .ok()
            .and_then(|sample| sample.instances.get(self.old.slot as usize).cloned());
        self.report.old_at_stop = old_at_stop.map(|old| Counts {
            established: old.established,
            in_flight: Some(old.in_flight),
            unknown: Some(old.unknown),
            idle: Some(
                old.established
                    .saturating_sub(old.in_flight)
                    .saturating_sub(old.unknown),
            ),
        });
        // Its processes now: a worker forked since the handover began (a pre-fork server
        // replaces the ones that end) holds its listeners and connections too.
        let listening: BTreeSet<u64> = self.old.listeners.iter().map(|l| l.inode).collect();
        self.old.pids = keepalive::processes(&self.old.pids, &listening);
        self.report.old_pids = self.old.pids.clone();
        // Its connections outlive it in the agent's hands (see `keepalive`); over TLS, only
        // until the idle ones can be closed early.
        let tls = keepalive::speaks_tls(&self.backend);
        let mut held = keepalive::hold(&self.old.pids, &self.backend);
        self.report.old_connections_held = held.len() as u64;
        self.report.old_stop_ms = Some(self.ms());
        let stopped = stop(
            &self.handover,
            &self.old.pids,
            self.old.owner,
            self.old.unit.clone(),
        )
        .await;
        if tls {
            self.report.old_connections_closed = keepalive::close_idle(std::mem::take(&mut held));
        }
        let exited = wait_exit(&self.old.pids, self.handover.timeout).await;
        if exited {
            self.report.old_exited_ms = Some(self.ms());
            let tally = keepalive::relay(held, self.handover.timeout);
            // Those closed at the exit; a later one (a TLS record or HTTP/2 as the first
            // bytes) is in the log.
            self.report.old_connections_closed += tally.closed.load(Ordering::Relaxed);
        }
        self.take_sockets(&self.old);
        // The old listeners are closed: the kernel's lookup finds only the new version's.
        self.release(new_slot);
        self.note_accepted();
        match (stopped, exited) {
            (Err(err), _) => Err(Failure {
                outcome: Outcome::Error,
                message: format!(
                    "the new version serves every new connection, but stopping the old one \
                     failed: {err}"
                ),
            }),
            (Ok(()), false) => Err(Failure {
                outcome: Outcome::Error,
                message: format!(
                    "the new version serves every new connection, but the old one (pids {:?}) \
                     had not exited {} after its stop",
                    self.old.pids,
                    humantime::format_duration(self.handover.timeout)
                ),
            }),
            (Ok(()), true) => Ok(match forced {
                None => "handed over: the new version serves every new connection, and the old \
                         one exited after its last request"
                    .to_string(),
                Some(in_flight) => format!(
                    "handed over, but the old version still had {in_flight} request(s) in flight \
                     at drain_timeout ({}): it was stopped then (gracefully)",
                    humantime::format_duration(self.backend.drain_timeout)
                ),
            }),
        }
    }

    /// Starts the new version and waits until it listens on every port and family the old
    /// one does.
    async fn start_new(&mut self) -> Result<Version, String> {
        let before: BTreeSet<u64> = self.old.listeners.iter().map(|l| l.inode).collect();
        let wanted: BTreeSet<(u16, bool)> = self
            .old
            .listeners
            .iter()
            .map(|listener| (listener.local.port(), listener.ipv6()))
            .collect();
        let action = match (&self.handover.how, &self.new_unit) {
            (HandoverHow::Commands { start, .. }, _) => Action::Command(start.clone()),
            (HandoverHow::Units(_), Some(unit)) => {
                Action::Command(vec!["systemctl".into(), "start".into(), unit.clone()])
            }
            (HandoverHow::Units(_), None) => return Err("no unit to start".into()),
        };
        let step = Step {
            action,
            timeout: self.handover.timeout,
        };
        service::run(&step)
            .await
            .map_err(|err| format!("starting the new version failed: {err}"))?;
        let deadline = Instant::now() + self.handover.timeout;
        loop {
            let found = listeners::of_backend(&self.backend).map_err(|err| err.to_string())?;
            let fresh: Vec<Listener> = found
                .into_iter()
                .filter(|listener| !before.contains(&listener.inode))
                .collect();
            let covered: BTreeSet<(u16, bool)> = fresh
                .iter()
                .map(|listener| (listener.local.port(), listener.ipv6()))
                .collect();
            if wanted.is_subset(&covered) {
                self.report.new_listening_ms = Some(self.ms());
                return version_of(self.new_slot(), fresh, self.new_unit.clone());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the new version did not listen on {:?} within {} (it must listen on the \
                     same port with SO_REUSEPORT; listening now: {:?})",
                    wanted.difference(&covered).collect::<Vec<_>>(),
                    humantime::format_duration(self.handover.timeout),
                    covered
                ));
            }
            self.progress("starting", None).await;
            tokio::time::sleep(LISTEN_POLL).await;
        }
    }

    /// Waits until the old version has had nothing in flight (nor unknown) for the quiet
    /// period; idle keep-alive connections do not hold it. `Some(in flight)` when
    /// `drain_timeout` ran out first.
    async fn wait_old_quiet(&mut self) -> Option<u64> {
        let deadline = Instant::now() + self.backend.drain_timeout;
        let mut quiet_since: Option<Instant> = None;
        let mut last_progress = Instant::now() - PROGRESS_EVERY;
        loop {
            let old = self
                .kernel()
                .sample(self.index)
                .ok()
                .and_then(|sample| sample.instances.get(self.old.slot as usize).cloned());
            // A failed read is never quiet.
            let busy = old
                .as_ref()
                .map_or(u64::MAX, |old| old.in_flight + old.unknown);
            if busy == 0 {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.ops.config.quiet_period {
                    self.report.old_quiet_ms = Some(self.ms());
                    return None;
                }
            } else {
                quiet_since = None;
            }
            if Instant::now() >= deadline {
                return Some(busy);
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                self.progress("old finishing", old).await;
            }
            tokio::time::sleep(QUIET_POLL).await;
        }
    }

    /// The new version failed: clients go on to the old version (they never left it unless
    /// the failure came after the switch), the new one is stopped, steering released once
    /// its listeners are gone.
    async fn undo(&mut self, new: Option<Version>, message: String) -> Failure {
        warn!(
            backend = self.backend.name,
            message, "handover failed; undoing it"
        );
        // Journaled as not switched first: an agent that crashes from here on must finish the
        // undo (stop the new version), never the handover (stop the old one).
        let new_pids = new.as_ref().map(|new| new.pids.clone()).unwrap_or_default();
        self.ops
            .board
            .set_handover(self.index, Some(self.record(false, new_pids)));
        let _ = self.steer(self.old.slot, self.old.slot);
        let mut message = message;
        match new {
            Some(mut new) => {
                // No copy of its listener may outlive its process (see `Version::copies`).
                new.copies.clear();
                if let Err(err) = stop(&self.handover, &new.pids, new.owner, new.unit.clone()).await
                {
                    message.push_str(&format!("; stopping the new version failed: {err}"));
                }
                if !wait_exit(&new.pids, self.handover.timeout).await {
                    message.push_str(&format!(
                        "; the new version (pids {:?}) has not exited: it listens in the same \
                         SO_REUSEPORT group, so without the agent's steering it would take a \
                         share of new connections. Stop it",
                        new.pids
                    ));
                }
                self.take_sockets(&new);
            }
            None => {
                // Whatever the start command left listening (a version that listens on some
                // of the ports only, or failed after it bound them) is stopped too: it is in
                // the SO_REUSEPORT group, and once the steering is released it would take a
                // share of new connections.
                let stray = self.stray_listeners();
                if let Some(unit) = &self.new_unit {
                    let _ = stop(&self.handover, &[], None, Some(unit.clone())).await;
                } else if !stray.is_empty() {
                    let owner = owner_of(&stray);
                    if let Err(err) = stop(&self.handover, &stray, owner, None).await {
                        message.push_str(&format!(
                            "; stopping what it left listening (pids {stray:?}) failed: {err}"
                        ));
                    }
                }
                if !wait_exit(&stray, self.handover.timeout).await {
                    message.push_str(&format!(
                        "; what the start left listening (pids {stray:?}) has not exited: stop it"
                    ));
                }
            }
        }
        self.take_sockets(&self.old);
        self.release(self.old.slot);
        self.note_accepted();
        Failure {
            outcome: Outcome::Failed,
            message,
        }
    }

    /// The processes holding listeners on the backend's ports that the old version does not
    /// hold: what a failed start left behind.
    fn stray_listeners(&self) -> Vec<i32> {
        let old: BTreeSet<u64> = self.old.listeners.iter().map(|l| l.inode).collect();
        stray_listeners(&self.backend, &old, &self.old.pids)
    }

    fn note_accepted(&mut self) {
        if let Ok(sample) = self.kernel().sample(self.index) {
            let accepted = |slot: u32| {
                let now = sample
                    .instances
                    .get(slot as usize)
                    .map_or(0, |instance| instance.accepted);
                now.saturating_sub(
                    self.accepted_at_start
                        .get(slot as usize)
                        .copied()
                        .unwrap_or(0),
                )
            };
            self.report.accepted_by_old = accepted(self.old.slot);
            self.report.accepted_by_new = accepted(self.new_slot());
        }
    }

    async fn progress(&self, step: &str, old: Option<crate::kernel::InstanceSample>) {
        let sample = self.kernel().sample(self.index).ok();
        let new = sample
            .as_ref()
            .and_then(|sample| sample.instances.get(self.new_slot() as usize).cloned());
        let _ = self.events.try_send(Event::Progress(Progress {
            backend: self.backend.name.clone(),
            phase: Phase::HandingOver,
            in_flight: old.as_ref().map(|old| old.in_flight),
            unknown: old.as_ref().map(|old| old.unknown),
            idle: old.as_ref().map(|old| {
                old.established
                    .saturating_sub(old.in_flight)
                    .saturating_sub(old.unknown)
            }),
            lb_sessions: None,
            elapsed_ms: self.ms(),
            handover: Some(super::report::HandoverProgress {
                step: step.to_string(),
                new_established: new.as_ref().map(|new| new.established),
                new_in_flight: new.as_ref().map(|new| new.in_flight),
            }),
        }));
    }

    fn finish(&mut self, outcome: Outcome, message: String) -> Report {
        if let Some(last) = self.phases.last_mut() {
            last.duration_ms = millis(self.phase_started.elapsed());
        }
        let mut report = Report::empty(&self.backend.name, "handover", Phase::Serving);
        report.outcome = outcome;
        report.exit_code = outcome.exit_code();
        report.message = message;
        report.phases = std::mem::take(&mut self.phases);
        report.handover = Some(self.report.clone());
        report.total_ms = self.ms();
        report
    }
}

/// Puts a version's listeners in the steering map, and lets go of the agent's copies.
fn put_sockets(kernel: &dyn KernelView, version: &mut Version) -> Result<(), String> {
    for (listener, socket) in version.listeners.iter().zip(&version.copies) {
        kernel.steer_socket(
            listener.local.port(),
            listener.ipv6(),
            version.slot,
            Some(socket),
        )?;
    }
    version.copies.clear();
    Ok(())
}
