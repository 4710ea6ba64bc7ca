//! Each backend's drain phase, shared by the operations, the agent-check responder and status.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Where a backend is in the drain cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// In rotation.
    Serving,
    /// Load balancers send no new requests; waiting for in-flight work to finish.
    Draining,
    /// Nothing in flight; the server is in MAINT on the load balancers.
    Drained,
    /// The service is being restarted.
    Restarting,
    /// Waiting for the restarted service's health check.
    Verifying,
    /// The cycle failed; the server stays in MAINT until an operator resumes it.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
            Phase::Restarting => "restarting",
            Phase::Verifying => "verifying",
            Phase::Failed => "failed",
        }
    }

    /// The HAProxy agent-check answer for this phase. "ready" also undoes a DRAIN or MAINT
    /// that this agent set earlier, which is how an HAProxy that missed the runtime API
    /// commands (stopped, reloaded, unreachable) converges on its next agent check.
    pub fn agent_check_answer(self) -> &'static str {
        match self {
            Phase::Serving => "ready up 100%",
            Phase::Draining => "drain",
            Phase::Drained | Phase::Restarting | Phase::Verifying | Phase::Failed => "maint",
        }
    }
}

/// A backend's phase, since when, and why (for failures).
#[derive(Debug, Clone)]
pub struct PhaseState {
    pub phase: Phase,
    pub since: Instant,
    pub reason: Option<String>,
}

/// Asks one operation to give up and restore service. Each operation gets its own token when
/// it claims the node, before anything can ask it to stop, so a request never outlives (or
/// misses) the operation it was meant for.
#[derive(Debug, Default)]
pub struct CancelToken {
    reason: Mutex<Option<String>>,
}

impl CancelToken {
    /// Records why the operation should stop; the first reason wins.
    pub fn cancel(&self, reason: &str) {
        self.reason
            .lock()
            .expect("cancel lock")
            .get_or_insert_with(|| reason.to_string());
    }

    /// Why the operation was asked to stop, if it was.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().expect("cancel lock").clone()
    }
}

/// The operation holding the node: what it is and how to stop it.
struct Running {
    what: String,
    cancel: Arc<CancelToken>,
}

/// The phases of all backends (config order) and the operation running on this node, if any.
pub struct Board {
    phases: Mutex<Vec<PhaseState>>,
    running: Mutex<Option<Running>>,
    names: Vec<String>,
}

impl Board {
    /// One serving phase per backend, named in logs by `names` (config order).
    pub fn new(names: Vec<String>) -> Board {
        let backends = names.len();
        let now = Instant::now();
        Board {
            phases: Mutex::new(vec![
                PhaseState {
                    phase: Phase::Serving,
                    since: now,
                    reason: None,
                };
                backends
            ]),
            running: Mutex::new(None),
            names,
        }
    }

    pub fn get(&self, backend: usize) -> PhaseState {
        self.phases.lock().expect("phase lock")[backend].clone()
    }

    pub fn set(&self, backend: usize, phase: Phase, reason: Option<String>) {
        let mut phases = self.phases.lock().expect("phase lock");
        let from = phases[backend].phase;
        let name = self.names.get(backend).map_or("", String::as_str);
        if from == phase {
            tracing::info!(
                backend = name,
                phase = phase.as_str(),
                reason = reason.as_deref().unwrap_or(""),
                "phase unchanged"
            );
        } else {
            tracing::info!(
                backend = name,
                from = from.as_str(),
                to = phase.as_str(),
                reason = reason.as_deref().unwrap_or(""),
                "phase change"
            );
        }
        phases[backend] = PhaseState {
            phase,
            since: Instant::now(),
            reason,
        };
    }

    /// Claims the node for one operation with a fresh cancel token; `Err` names the one
    /// already running.
    pub fn claim(self: &Arc<Self>, what: String) -> Result<Claim, String> {
        let mut running = self.running.lock().expect("running lock");
        if let Some(other) = running.as_ref() {
            return Err(other.what.clone());
        }
        let cancel = Arc::new(CancelToken::default());
        *running = Some(Running {
            what,
            cancel: cancel.clone(),
        });
        Ok(Claim {
            board: self.clone(),
            cancel,
        })
    }

    /// The operation running on this node, if any.
    pub fn running(&self) -> Option<String> {
        self.running
            .lock()
            .expect("running lock")
            .as_ref()
            .map(|running| running.what.clone())
    }

    /// Asks the running operation (if any) to stop; returns what it was.
    pub fn cancel_running(&self, reason: &str) -> Option<String> {
        let running = self.running.lock().expect("running lock");
        let running = running.as_ref()?;
        running.cancel.cancel(reason);
        Some(running.what.clone())
    }
}

/// Releases the node when the operation ends, however it ends.
pub struct Claim {
    board: Arc<Board>,
    cancel: Arc<CancelToken>,
}

impl Claim {
    /// This operation's cancel token.
    pub fn cancel(&self) -> Arc<CancelToken> {
        self.cancel.clone()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        *self.board.running.lock().expect("running lock") = None;
    }
}

/// Milliseconds of a duration, for reports.
pub fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_at_a_time() {
        let board = Arc::new(Board::new(vec!["nova-api".into(), "placement".into()]));
        let claim = board.claim("cycle nova-api".into()).unwrap();
        assert_eq!(
            board.claim("drain placement".into()).err().unwrap(),
            "cycle nova-api"
        );
        drop(claim);
        assert!(board.claim("drain placement".into()).is_ok());
    }

    #[test]
    fn a_cancel_belongs_to_the_operation_it_was_sent_to() {
        let board = Arc::new(Board::new(vec!["nova-api".into()]));
        // Nothing runs: a cancel has nothing to stop and is not kept for later.
        assert_eq!(board.cancel_running("`resume`"), None);
        let first = board.claim("drain nova-api".into()).unwrap();
        assert_eq!(
            board.cancel_running("`resume`").as_deref(),
            Some("drain nova-api")
        );
        assert_eq!(first.cancel().reason().as_deref(), Some("`resume`"));
        drop(first);
        // The next operation starts clean.
        let second = board.claim("drain nova-api".into()).unwrap();
        assert_eq!(second.cancel().reason(), None);
    }

    #[test]
    fn agent_check_words() {
        assert_eq!(Phase::Serving.agent_check_answer(), "ready up 100%");
        assert_eq!(Phase::Draining.agent_check_answer(), "drain");
        assert_eq!(Phase::Restarting.agent_check_answer(), "maint");
        assert_eq!(Phase::Failed.agent_check_answer(), "maint");
    }
}
