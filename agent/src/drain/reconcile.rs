//! What a restarted agent does with the state the previous one left: the journal says which
//! backend was mid-operation and in which phase; the load balancers say where the server
//! really is. An interrupted drain or cycle is undone or finished (`on_restart`), a restart
//! that was under way is verified before the server goes back, and everything found and done
//! is logged, counted and shown in `status` and the next report.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{Kind, Operations, Outcome, Phase, Report, operation::Run};
use crate::{config::OnRestart, haproxy::RuntimeApiClient, health};

impl Operations {
    /// Reconciles every backend the journal says was left mid-operation; returns a report
    /// per backend it acted on.
    pub async fn reconcile_interrupted(self: &Arc<Self>) -> Vec<Report> {
        let mut reports = Vec::new();
        for index in 0..self.config.backends.len() {
            let Some(operation) = self.board.interrupted(index) else {
                continue;
            };
            let name = self.config.backends[index].name.clone();
            if operation == "handover" {
                let report = self.reconcile_handover(index).await;
                warn!(
                    backend = name,
                    outcome = report.outcome.as_str(),
                    message = report.message,
                    "reconciled an interrupted handover"
                );
                *self.reconciled.lock().expect("reconciled lock") = Some(format!(
                    "after an agent restart, the interrupted `handover {name}`: {}",
                    report.message
                ));
                reports.push(report);
                continue;
            }
            // Claimed before anything is read or awaited: the phase acted on is the one read
            // under the claim, and an operator's `resume` from now on cancels this
            // reconciliation instead of being refused, or undone by it.
            let claim = match self.board.claim_reconciliation(index, &operation) {
                Ok(claim) => claim,
                Err(err) => {
                    warn!(backend = name, %err, "could not reconcile");
                    continue;
                }
            };
            if self.board.interrupted(index).is_none() {
                // An operator's command (a `resume`) acted on it since the start: the journal's
                // phase is stale, and there is nothing left to reconcile.
                info!(
                    backend = name,
                    operation,
                    "an operator's command acted on the backend since the start: nothing to reconcile"
                );
                continue;
            }
            let phase = self.board.get(index).phase;
            warn!(
                backend = name,
                operation,
                phase = phase.as_str(),
                on_restart = self.config.on_restart.as_str(),
                "the previous agent stopped in the middle of an operation: reconciling"
            );
            self.log_load_balancers(index).await;
            if self.config.backends[index].gate.is_some() && phase != Phase::Serving {
                // Its XDP link went with the previous agent's process, and the new programs
                // start with every gate open: nothing to undo in the kernel.
                info!(
                    backend = name,
                    "the gate the previous agent may have closed opened when it stopped"
                );
            }
            match self.reconcile(index, &operation, phase, claim).await {
                Ok(report) => {
                    info!(
                        backend = name,
                        outcome = report.outcome.as_str(),
                        message = report.message,
                        "reconciled"
                    );
                    *self.reconciled.lock().expect("reconciled lock") = Some(format!(
                        "after an agent restart, the interrupted `{operation} {name}` (phase \
                         {}): {}",
                        phase.as_str(),
                        report.message
                    ));
                    reports.push(report);
                }
                Err(refusal) => warn!(backend = name, %refusal, "could not reconcile"),
            }
        }
        reports
    }

    /// Closes again the gates of backends the previous agent left drained at rest with their
    /// gate closed (its XDP link went with its process), for what is left of their
    /// deadline. Interrupted operations are not touched here: their reconciliation decides.
    pub fn restore_gates(&self) {
        let now = crate::journal::unix_ms();
        for (index, backend) in self.config.backends.iter().enumerate() {
            let Some(until) = self.board.gate_closed_until(index) else {
                continue;
            };
            let still_drained = backend.gate.is_some()
                && self.board.interrupted(index).is_none()
                && self.board.get(index).phase == Phase::Drained;
            if !still_drained || until <= now {
                self.board.set_gate(index, None);
                continue;
            }
            let left = Duration::from_millis(until - now);
            match self.kernel.set_gate(index, Some(left)) {
                Ok(_) => info!(
                    backend = backend.name,
                    left_s = left.as_secs(),
                    "the backend is still drained: its gate is closed again for what is left of its deadline"
                ),
                Err(err) => {
                    warn!(backend = backend.name, %err, "could not close the gate again; it stays open");
                    self.board.set_gate(index, None);
                }
            }
        }
    }

    /// Logs what every load balancer shows for the backend's server: the real state the
    /// reconciliation starts from.
    async fn log_load_balancers(&self, index: usize) {
        let backend = &self.config.backends[index];
        let Some(server) = &backend.haproxy else {
            return;
        };
        for lb in RuntimeApiClient::for_each(&self.config.load_balancers) {
            match lb.server(server).await {
                Ok(stat) => info!(
                    backend = backend.name,
                    load_balancer = lb.name(),
                    server = format!("{}/{}", server.backend, server.server),
                    status = stat.status,
                    "found on the load balancer"
                ),
                Err(err) => warn!(backend = backend.name, %err, "cannot read the load balancer"),
            }
        }
    }

    async fn reconcile(
        self: &Arc<Self>,
        index: usize,
        operation: &str,
        phase: Phase,
        claim: super::phase::Claim,
    ) -> Result<Report, super::Refusal> {
        let backend = self.config.backends[index].clone();
        let kind = if operation == "cycle" {
            Kind::Cycle
        } else {
            Kind::Drain
        };
        let lbs = RuntimeApiClient::for_each(&self.config.load_balancers);
        let (events, _) = tokio::sync::mpsc::channel(16);
        let mut run = Run::new(self, claim.cancel(), index, backend, kind, lbs, events);
        run.operation = "reconcile";
        if let Some(by) = claim.cancel().reason() {
            // An operator's `resume` came while the load balancers were read: it decides.
            drop(claim);
            return Ok(run.finish(
                Outcome::Cancelled,
                format!("the reconciliation was cancelled by {by} before it acted"),
            ));
        }
        let on_restart = self.config.on_restart;
        let report = match phase {
            // The service may be half restarted: verify it before anything goes back.
            Phase::Restarting | Phase::Verifying => {
                // Out of rotation until verified: refuse direct clients meanwhile too.
                run.close_gate();
                // The old service can still answer while the command stops it: wait for the
                // command the previous agent started before trusting a health check.
                if let Some(group) = self.board.interrupted_step_group(index) {
                    let bound = run
                        .backend
                        .restart
                        .as_ref()
                        .map_or(Duration::from_secs(120), |step| step.timeout);
                    wait_for_process_group(&run.backend.name, group, bound).await;
                }
                let check = run.health_check();
                match health::wait_healthy(&check).await {
                    Ok(_) => {
                        run.back_in_service(
                            Outcome::Ok,
                            "the restart under way when the agent stopped completed; the service \
                             is healthy and back in service"
                                .into(),
                        )
                        .await
                    }
                    Err(problem) => {
                        run.roll_back(format!(
                            "after the agent restarted, the service was not healthy: {problem}"
                        ))
                        .await
                    }
                }
            }
            Phase::Failed => run.finish(
                Outcome::Failed,
                format!(
                    "the cycle had failed before the agent stopped; the server stays out of \
                     rotation. `drain-agent resume {}` puts it back",
                    run.backend.name
                ),
            ),
            Phase::Serving | Phase::Draining | Phase::Drained
                if on_restart == OnRestart::Restore || operation == "resume" =>
            {
                run.back_in_service(
                    Outcome::Ok,
                    format!(
                        "on_restart = \"restore\": the interrupted {operation} was undone and the \
                         server is back in service"
                    ),
                )
                .await
            }
            // on_restart = "finish": carry the operation on from where it stopped.
            // (A handover's journal is reconciled by `reconcile_handover` first.)
            Phase::Serving | Phase::HandingOver | Phase::Draining => {
                run.execute(Phase::Serving).await
            }
            Phase::Drained => run.execute(Phase::Drained).await,
        };
        drop(claim);
        Ok(report)
    }
}

/// Waits until no process of `group` (the restart or rollback command an agent started before
/// it stopped) is left, at most `bound` (the step's timeout).
async fn wait_for_process_group(backend: &str, group: i32, bound: Duration) {
    let alive = || nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group), None).is_ok();
    if !alive() {
        return;
    }
    info!(
        backend,
        process_group = group,
        "the restart the previous agent started is still running: waiting for it to finish"
    );
    let started = Instant::now();
    while alive() {
        if started.elapsed() >= bound {
            warn!(
                backend,
                process_group = group,
                "the interrupted restart still runs after its timeout: verifying the service anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!(
        backend,
        waited_ms = started.elapsed().as_millis() as u64,
        "the interrupted restart finished"
    );
}
