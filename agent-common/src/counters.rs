//! Per-backend aggregates the kernel keeps up to date on every connection event.

/// One CPU's share of a backend's counters (`BACKEND_COUNTERS` is a per-CPU array).
///
/// The gauges (`established`, `in_flight`) are stored as wrapping deltas: a connection can open
/// on one CPU and close on another, so one CPU's value may be "negative"; the wrapping sum over
/// all CPUs is the true value. The totals only ever grow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// Connections whose handshake completed and which have not closed (gauge, wrapping delta).
    pub established: u64,
    /// Flow-table entries of this backend (gauge delta): the table's fill level without
    /// walking it. Only established connections have entries.
    pub tracked: u64,
    /// Established connections carrying a request or an unacknowledged response (gauge delta).
    pub in_flight: u64,
    /// Established connections the agent did not see begin and cannot judge yet (gauge delta;
    /// userspace adds the ones it seeds).
    pub unknown: u64,
    /// Handshakes completed (total).
    pub accepted: u64,
    /// Connections closed by FIN in both directions (total).
    pub closed: u64,
    /// Connections ended by a RST sent by the client (total).
    pub reset_by_client: u64,
    /// Connections ended by a RST sent by the node (total).
    pub reset_by_server: u64,
    /// Connections the node ended while they carried a request: its RST, a connection lost
    /// while in flight, or a close with a request never answered (total). A client's own
    /// reset is not a cut.
    pub cut_in_flight: u64,
    /// New connections that could not be tracked because the flow table was full (total).
    pub flow_table_full: u64,
    /// Tracked connections that ended without FIN or RST the agent could attribute (total): the
    /// kernel gave up on them (retransmission timeouts, a socket destroyed without a RST on the
    /// wire) or a new handshake reused the tuple. Userspace adds the seeded ones its garbage
    /// collector removes.
    pub vanished: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last in-flight → idle transition on this CPU.
    pub last_idle_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u64 fields, no padding; every bit pattern is valid.
unsafe impl aya::Pod for BackendCounters {}

impl BackendCounters {
    /// Folds the per-CPU values of one backend into its true values.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a BackendCounters>) -> BackendCounters {
        per_cpu
            .into_iter()
            .fold(BackendCounters::default(), |acc, c| BackendCounters {
                established: acc.established.wrapping_add(c.established),
                tracked: acc.tracked.wrapping_add(c.tracked),
                in_flight: acc.in_flight.wrapping_add(c.in_flight),
                unknown: acc.unknown.wrapping_add(c.unknown),
                accepted: acc.accepted.wrapping_add(c.accepted),
                closed: acc.closed.wrapping_add(c.closed),
                reset_by_client: acc.reset_by_client.wrapping_add(c.reset_by_client),
                reset_by_server: acc.reset_by_server.wrapping_add(c.reset_by_server),
                cut_in_flight: acc.cut_in_flight.wrapping_add(c.cut_in_flight),
                flow_table_full: acc.flow_table_full.wrapping_add(c.flow_table_full),
                vanished: acc.vanished.wrapping_add(c.vanished),
                last_idle_ns: acc.last_idle_ns.max(c.last_idle_ns),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_opened_and_closed_on_different_cpus_sum_to_zero() {
        let cpu0 = BackendCounters {
            established: 1,
            in_flight: 1,
            accepted: 1,
            ..Default::default()
        };
        let cpu1 = BackendCounters {
            established: 0u64.wrapping_sub(1),
            in_flight: 0u64.wrapping_sub(1),
            closed: 1,
            last_idle_ns: 7,
            ..Default::default()
        };
        let total = BackendCounters::sum([&cpu0, &cpu1]);
        assert_eq!(total.established, 0);
        assert_eq!(total.in_flight, 0);
        assert_eq!(total.accepted, 1);
        assert_eq!(total.closed, 1);
        assert_eq!(total.last_idle_ns, 7);
    }
}
