//! Drift: what each load balancer shows for this node's servers, compared with the agent's
//! own phase. The agent owns the server's admin state while it holds the server out (its
//! journal says it set DRAIN or MAINT): it re-applies it when a load balancer lost it — during
//! an operation whatever the cause, at rest only when the load balancer's process changed
//! since it last showed the agent's state (a reload or restart forgets runtime changes; the
//! same process showing the server back in rotation means somebody put it back). What the
//! agent does not own — a server held out while the agent has it serving, or put back by
//! hand — is reported (status warning, metric, log), never overwritten.

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
/// backend; `restarted` when the load balancer's process is not the one that last showed the
/// agent's DRAIN or MAINT (its runtime state was lost).
pub fn judge(
    phase: Phase,
    shown: Shown,
    operating: bool,
    restarted: bool,
    status: &str,
) -> Verdict {
    match (phase, shown) {
        // A handover keeps the server in rotation: it serves throughout.
        (Phase::Serving | Phase::HandingOver, Shown::InRotation) => Verdict::Agrees,
        // A return in progress passes through here: MAINT until `set ready` lands.
        (Phase::Serving, Shown::Out) if operating => Verdict::Agrees,
        (Phase::Serving | Phase::HandingOver, Shown::Out) => Verdict::Report(format!(
            "shows the server {status} but the agent has it serving: somebody else took it out, \
             and the agent leaves it so (its agent-check answers carry no admin word at rest; \
             drain and cycle are refused while it is held). Put it back on that load balancer \
             (`set server BACKEND/SERVER state ready`) when it should serve"
        )),
        (_, Shown::Out) => Verdict::Agrees,
        (Phase::Draining, Shown::InRotation) if operating => Verdict::Reapply(AdminState::Drain),
        (_, Shown::InRotation) if operating => Verdict::Reapply(AdminState::Maint),
        (Phase::Draining, Shown::InRotation) if restarted => Verdict::Reapply(AdminState::Drain),
        (_, Shown::InRotation) if restarted => Verdict::Reapply(AdminState::Maint),
        (phase, Shown::InRotation) => Verdict::Report(format!(
            "shows the server {status} but the agent has it {}: somebody put it back by hand \
             (the same HAProxy process showed the agent's state before). `drain-agent resume` \
             if it should serve; a `cycle` drains it again first",
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
            judge(Phase::Draining, Shown::InRotation, true, false, "UP"),
            Verdict::Reapply(AdminState::Drain)
        );
        assert_eq!(
            judge(Phase::Restarting, Shown::InRotation, true, false, "UP"),
            Verdict::Reapply(AdminState::Maint)
        );
    }

    #[test]
    fn at_rest_a_load_balancer_that_lost_the_agents_state_gets_it_again() {
        assert_eq!(
            judge(Phase::Drained, Shown::InRotation, false, true, "UP"),
            Verdict::Reapply(AdminState::Maint)
        );
        assert_eq!(
            judge(Phase::Failed, Shown::InRotation, false, true, "UP"),
            Verdict::Reapply(AdminState::Maint)
        );
        // Somebody else's MAINT is never the agent's to undo, restart or not.
        assert!(matches!(
            judge(Phase::Serving, Shown::Out, false, true, "MAINT"),
            Verdict::Report(_)
        ));
    }

    #[test]
    fn a_handover_keeps_the_server_in_rotation_and_nothing_is_reapplied() {
        assert_eq!(
            judge(Phase::HandingOver, Shown::InRotation, true, false, "UP"),
            Verdict::Agrees
        );
    }

    #[test]
    fn at_rest_a_difference_is_reported_not_overwritten() {
        assert!(matches!(
            judge(Phase::Drained, Shown::InRotation, false, false, "UP"),
            Verdict::Report(_)
        ));
        assert!(matches!(
            judge(Phase::Serving, Shown::Out, false, false, "MAINT"),
            Verdict::Report(_)
        ));
        assert_eq!(
            judge(Phase::Serving, Shown::InRotation, false, false, "DOWN"),
            Verdict::Agrees
        );
        assert_eq!(
            judge(Phase::Failed, Shown::Out, false, false, "MAINT"),
            Verdict::Agrees
        );
    }
}
