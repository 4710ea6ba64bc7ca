//! A handover a crashed agent left: finished or undone by the next one.

use std::{sync::Arc, time::Instant};

use tracing::warn;

use super::{
    keepalive, stray_listeners,
    version::{boot_id, owner_of, still_running, stop, wait_exit},
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
                // Journaled pids are used only while they are still the same processes (same
                // boot, same start time): after a reboot or a pid reuse they may be anything.
                let (old, old_gone) =
                    still_running(&record.old_pids, &record.old_starts, &record.boot_id);
                let (new, new_gone) =
                    still_running(&record.new_pids, &record.new_starts, &record.boot_id);
                let (mut pids, unit, which, gone) = if record.switched {
                    (
                        old,
                        record.units.clone().map(|(old, _)| old),
                        "old",
                        old_gone,
                    )
                } else {
                    (
                        new,
                        record.units.clone().map(|(_, new)| new),
                        "new",
                        new_gone,
                    )
                };
                let mut stray = Vec::new();
                if !record.switched {
                    // Interrupted between `start` and the detection of the new listeners, the
                    // journal has no new pids: whatever listens on the ports besides the old
                    // version's sockets is the new version, as in the live undo.
                    let old_listeners = record.old_listeners.iter().copied().collect();
                    stray = stray_listeners(&backend, &old_listeners, &record.old_pids)
                        .into_iter()
                        .filter(|pid| !pids.contains(pid))
                        .collect();
                    pids.extend(&stray);
                }
                if !gone.is_empty() {
                    warn!(
                        backend = backend.name,
                        pids = ?gone,
                        "pids of the journal are no longer the processes it recorded (restarted, \
                         reused, or another boot): they are left alone"
                    );
                }
                // The old version's processes now, as in a handover's own stop: its listeners
                // (journaled inodes) are found only on the boot that journaled them.
                if record.switched && !record.boot_id.is_empty() && record.boot_id == boot_id() {
                    let listening = record.old_listeners.iter().copied().collect();
                    pids = keepalive::processes(&pids, &listening);
                }
                let owner = owner_of(&pids);
                // The old version's connections outlive it, as in a handover's own stop.
                let held = if record.switched && !keepalive::speaks_tls(&backend) {
                    keepalive::hold(&pids, &backend)
                } else {
                    Vec::new()
                };
                let nothing_to_stop = pids.is_empty() && unit.is_none();
                let stopped = if nothing_to_stop {
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
                let stray_said = if stray.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (found listening on the backend's ports, pids {stray:?}: the start \
                         had run, its listeners not yet seen)"
                    )
                };
                match (stopped, exited) {
                    (Ok(()), true) if nothing_to_stop => format!(
                        "{done}; no process of the {which} version was left to stop{}",
                        if gone.is_empty() {
                            String::new()
                        } else {
                            format!(" (journaled pids {gone:?} are other processes now)")
                        }
                    ),
                    (Ok(()), true) => {
                        format!(
                            "{done}; the {which} version (pids {pids:?}) was stopped{stray_said}"
                        )
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
