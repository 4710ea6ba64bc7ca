//! A handover a crashed agent left: finished or undone by the next one.

use std::{sync::Arc, time::Instant};

use super::{
    keepalive,
    version::{owner_of, stop, wait_exit},
};
use crate::drain::{
    operation::Operations,
    phase::{Phase, millis},
    report::{Outcome, Report},
};

impl Operations {
    /// An agent started after a crash mid-handover: both versions listened meanwhile (the
    /// steering went with the crashed agent). Before the switch the new version is stopped
    /// (undone: no client was sent to it on purpose); after it, the old one is stopped
    /// gracefully (finished: its server lets its requests in flight end).
    pub(in crate::drain) async fn reconcile_handover(self: &Arc<Self>, index: usize) -> Report {
        let backend = self.config.backends[index].clone();
        let record = self.board.handover(index);
        let started = Instant::now();
        let mut report = Report::empty(&backend.name, "handover", Phase::Serving);
        let message = match (record, backend.handover.as_ref()) {
            (None, _) => "it had changed nothing yet".to_string(),
            (Some(_), None) => format!(
                "the backend no longer has a `handover` in {}: both versions may still run; \
                 stop the one you do not want",
                self.config.path.display()
            ),
            (Some(record), Some(handover)) => {
                let (pids, unit, which) = if record.switched {
                    (
                        record.old_pids.clone(),
                        record.units.clone().map(|(old, _)| old),
                        "old",
                    )
                } else {
                    (
                        record.new_pids.clone(),
                        record.units.clone().map(|(_, new)| new),
                        "new",
                    )
                };
                let owner = owner_of(&pids);
                // The old version's connections outlive it, as in a handover's own stop.
                let held = if record.switched {
                    keepalive::hold(&pids, &backend.ports)
                } else {
                    Vec::new()
                };
                let stopped = if pids.is_empty() && unit.is_none() {
                    Ok(())
                } else {
                    stop(handover, &pids, owner, unit).await
                };
                let exited = wait_exit(&pids, handover.timeout).await;
                if exited {
                    keepalive::relay(held, handover.timeout);
                }
                let done = if record.switched {
                    "finished: the new version serves every new connection"
                } else {
                    "undone: the old version serves, as it did throughout"
                };
                match (stopped, exited) {
                    (Ok(()), true) => {
                        format!("{done}; the {which} version (pids {pids:?}) was stopped")
                    }
                    (Err(err), _) => {
                        report.outcome = Outcome::Error;
                        format!(
                            "{done}, but stopping the {which} version (pids {pids:?}) failed: {err}"
                        )
                    }
                    (Ok(()), false) => {
                        report.outcome = Outcome::Error;
                        format!("{done}, but the {which} version (pids {pids:?}) has not exited")
                    }
                }
            }
        };
        self.board.set_handover(index, None);
        self.board.set(index, Phase::Serving, None);
        report.exit_code = report.outcome.exit_code();
        report.message = message;
        report.total_ms = millis(started.elapsed());
        report
    }
}
