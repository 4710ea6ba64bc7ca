//! Drift: what each load balancer shows for this node's servers, compared with the agent's
//! own phase. While an operation runs the agent owns the server's state and re-applies it
//! when a load balancer lost it (a reload or restart forgets runtime changes). At rest a
//! difference is somebody else's doing — an operator's `set server`, a reload while drained —
//! and is reported (status warning, metric, log), never silently overwritten.

use crate::{
    drain::Phase,
    haproxy::{AdminState, ServerStat},
};

/// Where a load balancer has the server, in the terms drift needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// DRAIN or MAINT: no new requests.
    Out,
    /// UP, DOWN (health), "no check": in rotation as far as the admin state goes.
    InRotation,
}

impl Shown {
    pub fn of(stat: &ServerStat) -> Shown {
        if stat.status.starts_with("DRAIN") || stat.status.starts_with("MAINT") {
            Shown::Out
        } else {
            Shown::InRotation
        }
    }
}

/// What to do about one load balancer's view of one backend's server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It agrees with the phase.
    Agrees,
    /// An operation owns the server and the load balancer lost its state: set it again.
    Reapply(AdminState),
    /// At rest, the load balancer disagrees: say so (the sentence names what differs).
    Report(String),
}

/// Judges one load balancer's view. `operating` is true while an operation acts on the
/// backend (then the agent owns the state).
pub fn judge(phase: Phase, shown: Shown, operating: bool, status: &str) -> Verdict {
    match (phase, shown) {
        // A handover keeps the server in rotation: it serves throughout.
        (Phase::Serving | Phase::HandingOver, Shown::InRotation) => Verdict::Agrees,
        // A return in progress passes through here: MAINT until `set ready` lands.
        (Phase::Serving, Shown::Out) if operating => Verdict::Agrees,
        (Phase::Serving | Phase::HandingOver, Shown::Out) => Verdict::Report(format!(
            "shows the server {status} but the agent has it serving: somebody else took it out \
             (the agent's agent-check answers will put it back if that load balancer polls)"
        )),
        (_, Shown::Out) => Verdict::Agrees,
        (Phase::Draining, Shown::InRotation) if operating => Verdict::Reapply(AdminState::Drain),
        (_, Shown::InRotation) if operating => Verdict::Reapply(AdminState::Maint),
        (phase, Shown::InRotation) => Verdict::Report(format!(
            "shows the server {status} but the agent has it {}: somebody put it back (or \
             HAProxy was reloaded). `drain-agent resume` if it should serve, or drain it again",
            phase.as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_reapplies_what_a_reload_forgot() {
        assert_eq!(
            judge(Phase::Draining, Shown::InRotation, true, "UP"),
            Verdict::Reapply(AdminState::Drain)
        );
        assert_eq!(
            judge(Phase::Restarting, Shown::InRotation, true, "UP"),
            Verdict::Reapply(AdminState::Maint)
        );
    }

    #[test]
    fn a_handover_keeps_the_server_in_rotation_and_nothing_is_reapplied() {
        assert_eq!(
            judge(Phase::HandingOver, Shown::InRotation, true, "UP"),
            Verdict::Agrees
        );
    }

    #[test]
    fn at_rest_a_difference_is_reported_not_overwritten() {
        assert!(matches!(
            judge(Phase::Drained, Shown::InRotation, false, "UP"),
            Verdict::Report(_)
        ));
        assert!(matches!(
            judge(Phase::Serving, Shown::Out, false, "MAINT"),
            Verdict::Report(_)
        ));
        assert_eq!(
            judge(Phase::Serving, Shown::InRotation, false, "DOWN"),
            Verdict::Agrees
        );
        assert_eq!(
            judge(Phase::Failed, Shown::Out, false, "MAINT"),
            Verdict::Agrees
        );
    }
}
