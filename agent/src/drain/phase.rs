//! Each backend's drain phase, shared by the operations, the agent-check responder and status.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::journal::{BackendRecord, HandoverRecord, Journal, JournalError, Record, unix_ms};

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
    /// A same-host handover runs: a new version takes new connections while the old one
    /// finishes its work; the node stays in rotation (docs/handover.md).
    #[serde(rename = "handing-over")]
    HandingOver,
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
            Phase::HandingOver => "handing-over",
        }
    }

    /// Whether the agent holds the server out of rotation in this phase (it set DRAIN or
    /// MAINT on the load balancers, and owns that state).
    pub fn holds_out(self) -> bool {
        !matches!(self, Phase::Serving | Phase::HandingOver)
    }

    /// The HAProxy agent-check answer for this phase, to one load balancer. HAProxy applies
    /// an agent's admin word and a runtime API command to the same admin flags (the last
    /// writer wins), so the agent sends one only when its own state calls for it: `drain` or
    /// `maint` while it holds the server out (re-asserted on every poll, which also restores
    /// it after a reload), `ready` only to undo its own `drain`/`maint` (`owes_ready`), and
    /// otherwise `up`, which leaves an operator's MAINT, DRAIN or weight as they are.
    pub fn agent_check_answer(self, owes_ready: bool) -> &'static str {
        match self {
            Phase::Serving | Phase::HandingOver if owes_ready => "ready up",
            Phase::Serving | Phase::HandingOver => "up",
            Phase::Draining => "drain",
            Phase::Drained | Phase::Restarting | Phase::Verifying | Phase::Failed => "maint",
        }
    }
}

/// A backend's phase, since when, and why (for failures).
#[derive(Debug, Clone)]
pub struct PhaseState {
    pub phase: Phase,
    /// When the backend entered the phase (for a phase restored from the journal, when the
    /// previous agent entered it).
    pub since: Instant,
    /// The same, in ms since the Unix epoch (journaled).
    pub since_unix_ms: u64,
    /// The operation that moved the backend into the phase ("drain", "cycle", ...), if one did.
    pub by: Option<String>,
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
    backend: usize,
    cancel: Arc<CancelToken>,
    /// A restarted agent's reconciliation of an interrupted operation: an operator's
    /// `resume` cancels it rather than being refused (or undone by it).
    reconciling: bool,
}

/// Why an operation could not claim the node.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another operation holds the node (named).
    #[error("`{0}` is already running on this node; one drain at a time")]
    Busy(String),
    /// The journal could not record the start: nothing was changed.
    #[error("{0}; nothing was changed")]
    Journal(#[from] JournalError),
}

/// The phases of all backends (config order) and the operation running on this node, if any.
/// Every change is written to the journal (when there is one) before it takes effect
/// elsewhere, so a restarted agent knows where each backend was left.
pub struct Board {
    phases: Mutex<Vec<PhaseState>>,
    running: Mutex<Option<Running>>,
    names: Vec<String>,
    journal: Option<Journal>,
    /// Per backend, the operation the journal says was running when the last agent stopped.
    /// Cleared once anything moves the backend's phase: what is left to reconcile is only
    /// what nobody has acted on since the start.
    interrupted: Mutex<Vec<Option<String>>>,
    /// Per backend, the process group of the restart or rollback command running now.
    step_groups: Mutex<Vec<Option<i32>>>,
    /// Per backend, the one the journal says was running when the last agent stopped.
    interrupted_step_groups: Vec<Option<i32>>,
    /// Per backend, until when its gate is closed (Unix ms), as journaled.
    gates: Mutex<Vec<Option<u64>>>,
    /// Per backend, the handover under way, as journaled.
    handovers: Mutex<Vec<Option<HandoverRecord>>>,
    /// Per backend, when the agent last put the server back in service while `ready` is still
    /// owed to some agent-check poller (journaled as `ready_owed`).
    returned: Mutex<Vec<Option<Instant>>>,
    /// Per backend, whether what came before this agent is unknown (the journal was missing
    /// or torn) and nothing has happened since: load balancers that only agent-check reaches
    /// may still hold the server out from before, and `resume` tells them `ready`.
    past_unknown: Mutex<Vec<bool>>,
    /// Journal writes that failed (each logged at error level).
    journal_errors: std::sync::atomic::AtomicU64,
}

impl Board {
    /// One serving phase per backend, named in logs by `names` (config order); no journal.
    pub fn new(names: Vec<String>) -> Board {
        Board::restored(names, None, &Record::default())
    }

    /// The phases a journal `record` left (serving for backends it does not name), kept in
    /// `journal` from now on.
    pub fn restored(names: Vec<String>, journal: Option<Journal>, record: &Record) -> Board {
        let now = Instant::now();
        let phases = names
            .iter()
            .map(|name| match record.backends.get(name) {
                Some(saved) => {
                    let since_unix_ms = saved.since_unix_ms.unwrap_or(saved.updated_unix_ms);
                    let ago = Duration::from_millis(unix_ms().saturating_sub(since_unix_ms));
                    PhaseState {
                        phase: saved.phase,
                        since: now.checked_sub(ago).unwrap_or(now),
                        since_unix_ms,
                        by: saved.by.clone(),
                        reason: saved.reason.clone(),
                    }
                }
                None => PhaseState {
                    phase: Phase::Serving,
                    since: now,
                    since_unix_ms: unix_ms(),
                    by: None,
                    reason: None,
                },
            })
            .collect();
        let interrupted = names
            .iter()
            .map(|name| {
                record
                    .backends
                    .get(name)
                    .and_then(|saved| saved.operation.clone())
            })
            .collect();
        let interrupted_step_groups = names
            .iter()
            .map(|name| {
                record
                    .backends
                    .get(name)
                    .and_then(|saved| saved.step_process_group)
            })
            .collect();
        let gates = names
            .iter()
            .map(|name| {
                record
                    .backends
                    .get(name)
                    .and_then(|saved| saved.gate_closed_until_unix_ms)
            })
            .collect();
        let handovers = names
            .iter()
            .map(|name| {
                record
                    .backends
                    .get(name)
                    .and_then(|saved| saved.handover.clone())
            })
            .collect();
        // A return the previous agent had not confirmed everywhere: owed again to every poller.
        let returned = names
            .iter()
            .map(|name| {
                record
                    .backends
                    .get(name)
                    .is_some_and(|saved| saved.ready_owed && !saved.phase.holds_out())
                    .then_some(now)
            })
            .collect();
        Board {
            phases: Mutex::new(phases),
            handovers: Mutex::new(handovers),
            returned: Mutex::new(returned),
            past_unknown: Mutex::new(vec![false; names.len()]),
            running: Mutex::new(None),
            step_groups: Mutex::new(vec![None; names.len()]),
            interrupted_step_groups,
            gates: Mutex::new(gates),
            names,
            journal,
            interrupted: Mutex::new(interrupted),
            journal_errors: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The operation the previous agent left running on `backend`, if any.
    pub fn interrupted(&self, backend: usize) -> Option<String> {
        self.interrupted
            .lock()
            .expect("interrupted lock")
            .get(backend)
            .cloned()
            .flatten()
    }

    /// The process group of the restart or rollback command the previous agent left running
    /// on `backend`, if it journaled one.
    pub fn interrupted_step_group(&self, backend: usize) -> Option<i32> {
        self.interrupted_step_groups.get(backend).copied().flatten()
    }

    /// Journals the process group of the restart or rollback command now running on
    /// `backend` (`None` once it finished).
    pub fn set_step_group(&self, backend: usize, group: Option<i32>) {
        let phases = self.phases.lock().expect("phase lock");
        self.step_groups.lock().expect("step group lock")[backend] = group;
        let _ = self.persist_with_running(&phases);
    }

    /// Journals until when `backend`'s gate is closed (Unix ms; `None`: open). Written before
    /// the kernel closes it.
    pub fn set_gate(&self, backend: usize, closed_until_unix_ms: Option<u64>) {
        let phases = self.phases.lock().expect("phase lock");
        self.gates.lock().expect("gate lock")[backend] = closed_until_unix_ms;
        let _ = self.persist_with_running(&phases);
    }

    /// Until when `backend`'s gate is closed, as journaled (by this agent or the previous).
    pub fn gate_closed_until(&self, backend: usize) -> Option<u64> {
        self.gates
            .lock()
            .expect("gate lock")
            .get(backend)
            .copied()
            .flatten()
    }

    /// Journals the handover under way on `backend` (`None` once it ended), before what it
    /// describes takes effect.
    pub fn set_handover(&self, backend: usize, handover: Option<HandoverRecord>) {
        let phases = self.phases.lock().expect("phase lock");
        self.handovers.lock().expect("handover lock")[backend] = handover;
        let _ = self.persist_with_running(&phases);
    }

    /// The handover under way on `backend`, as journaled (by this agent or the previous).
    pub fn handover(&self, backend: usize) -> Option<HandoverRecord> {
        self.handovers.lock().expect("handover lock")[backend].clone()
    }

    /// Journal writes that failed since the start.
    pub fn journal_errors(&self) -> u64 {
        self.journal_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the current phases and running operation to the journal.
    fn persist(
        &self,
        phases: &[PhaseState],
        running: Option<(usize, &str)>,
    ) -> Result<(), JournalError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let mut record = Record::default();
        let step_groups = self.step_groups.lock().expect("step group lock").clone();
        let gates = self.gates.lock().expect("gate lock").clone();
        let handovers = self.handovers.lock().expect("handover lock").clone();
        let returned = self.returned.lock().expect("returned lock").clone();
        for (index, (name, state)) in self.names.iter().zip(phases).enumerate() {
            record.backends.insert(
                name.clone(),
                BackendRecord {
                    phase: state.phase,
                    operation: running
                        .filter(|(backend, _)| *backend == index)
                        .map(|(_, operation)| operation.to_string()),
                    reason: state.reason.clone(),
                    step_process_group: step_groups.get(index).copied().flatten(),
                    gate_closed_until_unix_ms: gates.get(index).copied().flatten(),
                    handover: handovers.get(index).cloned().flatten(),
                    ready_owed: returned.get(index).is_some_and(Option::is_some),
                    since_unix_ms: Some(state.since_unix_ms),
                    by: state.by.clone(),
                    updated_unix_ms: unix_ms(),
                },
            );
        }
        journal.write(&record).inspect_err(|err| {
            self.journal_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(%err, "the operation journal could not be written");
        })
    }

    /// Writes `phases` with whatever operation is running now.
    fn persist_with_running(&self, phases: &[PhaseState]) -> Result<(), JournalError> {
        let running = Board::running_record(&self.running.lock().expect("running lock"));
        self.persist(
            phases,
            running
                .as_ref()
                .map(|(backend, operation)| (*backend, operation.as_str())),
        )
    }

    /// The running operation as the journal names it: (backend, operation word).
    fn running_record(running: &Option<Running>) -> Option<(usize, String)> {
        running.as_ref().map(|running| {
            let operation = running
                .what
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            (running.backend, operation)
        })
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
        let by = Board::running_record(&self.running.lock().expect("running lock"))
            .filter(|(running, _)| *running == backend)
            .map(|(_, operation)| operation);
        phases[backend] = PhaseState {
            phase,
            since: Instant::now(),
            since_unix_ms: unix_ms(),
            by,
            reason,
        };
        self.past_unknown.lock().expect("past lock")[backend] = false;
        self.interrupted.lock().expect("interrupted lock")[backend] = None;
        {
            let mut returned = self.returned.lock().expect("returned lock");
            if from.holds_out() && !phase.holds_out() {
                returned[backend] = Some(Instant::now());
            } else if phase.holds_out() {
                returned[backend] = None;
            }
        }
        // Logged and counted on failure: stopping half-way would strand the server.
        let _ = self.persist_with_running(&phases);
    }

    /// Claims the node for `operation` ("drain", "cycle", "resume", "reconcile") on
    /// `backend`, with a fresh cancel token, and journals it; `Err` names the operation
    /// already running, or says the journal could not record it (nothing changed).
    pub fn claim(self: &Arc<Self>, backend: usize, operation: &str) -> Result<Claim, ClaimError> {
        self.claim_as(backend, operation, false)
    }

    /// Claims the node to reconcile the interrupted `operation` on `backend`, journaled under
    /// that operation's name (a second crash reconciles it again).
    pub fn claim_reconciliation(
        self: &Arc<Self>,
        backend: usize,
        operation: &str,
    ) -> Result<Claim, ClaimError> {
        self.claim_as(backend, operation, true)
    }

    /// Whether a reconciliation of `backend` holds the node.
    pub fn reconciling(&self, backend: usize) -> bool {
        self.running
            .lock()
            .expect("running lock")
            .as_ref()
            .is_some_and(|running| running.reconciling && running.backend == backend)
    }

    fn claim_as(
        self: &Arc<Self>,
        backend: usize,
        operation: &str,
        reconciling: bool,
    ) -> Result<Claim, ClaimError> {
        let phases = self.phases.lock().expect("phase lock");
        let mut running = self.running.lock().expect("running lock");
        if let Some(other) = running.as_ref() {
            return Err(ClaimError::Busy(other.what.clone()));
        }
        self.persist(&phases, Some((backend, operation)))?;
        let cancel = Arc::new(CancelToken::default());
        *running = Some(Running {
            what: format!(
                "{operation} {}",
                self.names.get(backend).map_or("", String::as_str)
            ),
            backend,
            cancel: cancel.clone(),
            reconciling,
        });
        Ok(Claim {
            board: self.clone(),
            cancel,
        })
    }

    /// When the agent put `backend` back in service, while it still owes some agent-check
    /// poller a `ready` for it.
    pub fn returned(&self, backend: usize) -> Option<Instant> {
        self.returned.lock().expect("returned lock")[backend]
    }

    /// The journal was missing or torn: what every backend went through before is unknown.
    pub fn mark_past_unknown(&self) {
        self.past_unknown
            .lock()
            .expect("past lock")
            .iter_mut()
            .for_each(|unknown| *unknown = true);
    }

    /// Whether `backend`'s past is unknown (see [`Board::mark_past_unknown`]).
    pub fn past_unknown(&self, backend: usize) -> bool {
        self.past_unknown.lock().expect("past lock")[backend]
    }

    /// Owes every agent-check poller `ready` for `backend` from now on, as after a return of
    /// the agent's own (journaled).
    pub fn owe_ready(&self, backend: usize) {
        let phases = self.phases.lock().expect("phase lock");
        self.returned.lock().expect("returned lock")[backend] = Some(Instant::now());
        let _ = self.persist_with_running(&phases);
    }

    /// Every agent-check poller has confirmed the return of `backend`: no `ready` is owed to
    /// any known poller, and a restarted agent owes none either.
    pub fn return_confirmed(&self, backend: usize) {
        let phases = self.phases.lock().expect("phase lock");
        let mut returned = self.returned.lock().expect("returned lock");
        if returned[backend].take().is_none() {
            return;
        }
        drop(returned);
        let _ = self.persist_with_running(&phases);
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
        let phases = self.board.phases.lock().expect("phase lock");
        *self.board.running.lock().expect("running lock") = None;
        let _ = self.board.persist(&phases, None);
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
        let claim = board.claim(0, "cycle").unwrap();
        let busy = board.claim(1, "drain").err().unwrap();
        assert!(
            matches!(&busy, ClaimError::Busy(what) if what == "cycle nova-api"),
            "{busy}"
        );
        drop(claim);
        assert!(board.claim(1, "drain").is_ok());
    }

    #[test]
    fn a_cancel_belongs_to_the_operation_it_was_sent_to() {
        let board = Arc::new(Board::new(vec!["nova-api".into()]));
        // Nothing runs: a cancel has nothing to stop and is not kept for later.
        assert_eq!(board.cancel_running("`resume`"), None);
        let first = board.claim(0, "drain").unwrap();
        assert_eq!(
            board.cancel_running("`resume`").as_deref(),
            Some("drain nova-api")
        );
        assert_eq!(first.cancel().reason().as_deref(), Some("`resume`"));
        drop(first);
        // The next operation starts clean.
        let second = board.claim(0, "drain").unwrap();
        assert_eq!(second.cancel().reason(), None);
    }

    #[test]
    fn the_journal_carries_phases_and_the_running_operation_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("board-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let names = vec!["nova-api".to_string(), "placement".to_string()];
        let journal = Journal::open(&dir).unwrap();
        let board = Arc::new(Board::restored(
            names.clone(),
            Some(journal.clone()),
            &Record::default(),
        ));
        let claim = board.claim(0, "cycle").unwrap();
        board.set(0, Phase::Restarting, None);
        board.set(1, Phase::Drained, None);
        // The agent dies here: the claim is never released.
        std::mem::forget(claim);
        let crate::journal::Found::Record(record) = journal.read().unwrap() else {
            panic!("no journal");
        };
        let restarted = Board::restored(names, Some(journal), &record);
        assert_eq!(restarted.get(0).phase, Phase::Restarting);
        assert_eq!(restarted.interrupted(0).as_deref(), Some("cycle"));
        assert_eq!(restarted.get(1).phase, Phase::Drained);
        assert_eq!(restarted.interrupted(1), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_return_owes_ready_until_confirmed_and_a_restarted_agent_owes_it_again() {
        let dir = std::env::temp_dir().join(format!("board-returned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let names = vec!["nova-api".to_string()];
        let journal = Journal::open(&dir).unwrap();
        let board = Board::restored(names.clone(), Some(journal.clone()), &Record::default());
        assert_eq!(
            board.returned(0),
            None,
            "an agent that took nothing out owes nothing"
        );
        board.set(0, Phase::Drained, None);
        assert_eq!(board.returned(0), None);
        board.set(0, Phase::Serving, None);
        assert!(
            board.returned(0).is_some(),
            "the agent's own return owes ready"
        );
        let restored = |journal: &Journal| {
            let crate::journal::Found::Record(record) = journal.read().unwrap() else {
                panic!("no journal");
            };
            Board::restored(names.clone(), Some(journal.clone()), &record)
        };
        assert!(
            restored(&journal).returned(0).is_some(),
            "journaled: owed after a crash"
        );
        board.return_confirmed(0);
        assert_eq!(board.returned(0), None);
        assert_eq!(restored(&journal).returned(0), None);
        // A drain takes it out again: nothing owed until the next return.
        board.set(0, Phase::Draining, None);
        assert_eq!(board.returned(0), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn agent_check_words() {
        assert_eq!(Phase::Serving.agent_check_answer(true), "ready up");
        assert_eq!(Phase::Serving.agent_check_answer(false), "up");
        assert_eq!(Phase::HandingOver.agent_check_answer(false), "up");
        assert_eq!(Phase::Draining.agent_check_answer(false), "drain");
        assert_eq!(Phase::Restarting.agent_check_answer(true), "maint");
        assert_eq!(Phase::Failed.agent_check_answer(false), "maint");
    }
}
