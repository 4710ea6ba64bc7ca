//! What a handover's report says of it.

use serde::{Deserialize, Serialize};

use crate::drain::report::Counts;

/// What a handover did, for its report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoverReport {
    /// The processes of the version that served before (its listeners' holders).
    pub old_pids: Vec<i32>,
    /// The new version's, once it listened.
    pub new_pids: Vec<i32>,
    /// When the new version's listeners were all found (ms since the start).
    pub new_listening_ms: Option<u64>,
    /// When the agent's probes found the new version healthy.
    pub new_healthy_ms: Option<u64>,
    /// When new connections began to go to the new version.
    pub switched_ms: Option<u64>,
    /// When the old version had no request in flight for the quiet period.
    pub old_quiet_ms: Option<u64>,
    /// When the old version was told to stop.
    pub old_stop_ms: Option<u64>,
    /// When its last process exited.
    pub old_exited_ms: Option<u64>,
    /// The old version's connections when it was told to stop: all idle (keep-alive) unless
    /// the quiet wait hit `drain_timeout`.
    pub old_at_stop: Option<Counts>,
    /// The old version's connections the agent held across its stop: each stays open, and a
    /// request on it goes on to the new version (docs/handover.md).
    #[serde(default)]
    pub old_connections_held: u64,
    /// Of those, the ones closed instead of relayed: when the old version exited, it had left
    /// a request unfinished on them, or what waited on them was not an HTTP/1.x request; over
    /// TLS, the ones between requests when it was told to stop (the client retries).
    #[serde(default)]
    pub old_connections_closed: u64,
    /// New connections each version accepted while the handover ran.
    pub accepted_by_old: u64,
    pub accepted_by_new: u64,
}

impl HandoverReport {
    /// The report's lines about the two versions.
    pub fn render(&self) -> String {
        let at = |ms: Option<u64>| {
            ms.map_or_else(|| "-".into(), |ms| format!("{:.3}s", ms as f64 / 1000.0))
        };
        let mut out = format!(
            "  new version {:?}: listening {}, healthy {}, took new connections at {}\n",
            self.new_pids,
            at(self.new_listening_ms),
            at(self.new_healthy_ms),
            at(self.switched_ms)
        );
        out.push_str(&format!(
            "  old version {:?}: quiet {}, stop {}, exited {}\n",
            self.old_pids,
            at(self.old_quiet_ms),
            at(self.old_stop_ms),
            at(self.old_exited_ms)
        ));
        if let Some(counts) = &self.old_at_stop {
            out.push_str(&format!(
                "  old version at stop: {} connections, {} in flight, {} unknown, {} idle; {} \
                 held open by the agent across the stop (their next request goes to the new \
                 version), {} of them closed at its exit (not between requests)\n",
                counts.established,
                counts.in_flight.unwrap_or(0),
                counts.unknown.unwrap_or(0),
                counts.idle.unwrap_or(0),
                self.old_connections_held,
                self.old_connections_closed
            ));
        }
        out.push_str(&format!(
            "  new connections during the handover: {} to the old version, {} to the new\n",
            self.accepted_by_old, self.accepted_by_new
        ));
        out
    }
}
