//! The flow table: one entry per tracked TCP connection to a watched backend port.

/// Identifies a connection from the node's point of view. IPv4 addresses are stored
/// IPv4-mapped (`::ffff:a.b.c.d`) so one map holds both families. Ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The peer's (client's) address.
    pub client_addr: [u8; 16],
    /// The node's local address the client connected to.
    pub server_addr: [u8; 16],
    /// The peer's port.
    pub client_port: u16,
    /// The node's local port (a configured backend port).
    pub server_port: u16,
}

/// `Flow::state`: not a connection yet, only a note. A client segment with payload reached a
/// socket the kernel was still establishing (`SYN_RECV`; the handshake-completing ACK being
/// processed on another CPU) before the `sock_ops` program created its flow: the packet
/// program writes this note (`client_next_seq` just past that payload, `request_pending`),
/// and the `sock_ops` program, finding it, starts the flow with the request pending. Counted
/// nowhere until then.
pub const FLOW_EARLY: u32 = 1;
/// `Flow::state`: the kernel established the connection; counted in `established`. (There is
/// no half-open state: a flow is created only once the kernel established the connection.)
pub const FLOW_ESTABLISHED: u32 = 2;

/// `Flow::origin`: created by the `sock_ops` program when the kernel established the
/// connection (`BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`); lives in `FLOWS` and is ended by the
/// kernel's own state change to `TCP_CLOSE`.
pub const ORIGIN_HANDSHAKE: u32 = 0;
/// `Flow::origin`: a connection older than the agent, seeded by userspace from the socket table
/// into `SEEDED_FLOWS`; its sequence numbers start unknown (`*_unsynced`), and only userspace
/// deletes it.
pub const ORIGIN_SEEDED: u32 = 1;

/// `Flow::counted_in_flight`: counted as idle in the aggregates.
pub const COUNTED_IDLE: u64 = 0;
/// `Flow::counted_in_flight`: counted as in flight in the aggregates.
pub const COUNTED_IN_FLIGHT: u64 = 1;
/// `Flow::counted_in_flight`: counted as unknown: a connection the agent did not see begin
/// (seeded from the socket table) whose traffic has not yet shown whether it carries a
/// request. The first payload in either direction settles it (docs/accounting.md).
pub const COUNTED_UNKNOWN: u64 = 3;
/// `Flow::counted_in_flight`: the flow is ended and out of the aggregates; no further transition
/// may touch them. Written by whoever wins the ending (the kernel's state callback, a newer
/// connection on the same tuple, the TC programs for a seeded flow, or the userspace GC).
pub const COUNTED_REMOVED: u64 = 2;

/// `Flow::hints` bit: the client sent a FIN inside the window.
pub const FIN_FROM_CLIENT: u64 = 1;
/// `Flow::hints` bit: the node sent FIN.
pub const FIN_FROM_SERVER: u64 = 2;
/// `Flow::hints` bit: the client sent a RST at exactly the next expected sequence number (the
/// only RST the kernel accepts, RFC 5961).
pub const RST_FROM_CLIENT: u64 = 4;
/// `Flow::hints` bit: the node sent a RST.
pub const RST_FROM_SERVER: u64 = 8;
/// `Flow::hints` bit: payload crossed in either direction since the flow was seeded: an
/// unknown flow is settled from then on.
pub const PAYLOAD_SEEN: u64 = 16;
/// `Flow::hints` bit: the state callback ended the flow as vanished, at `last_seen_ns`. The
/// kernel changes the state to `TCP_CLOSE` before it sends the RST of an abort, so a RST from
/// the node right after re-counts the ending as `reset_by_server` (whoever clears the bit).
pub const ENDED_VANISHED: u64 = 32;

/// State of one tracked connection. Sequence numbers are raw TCP sequence numbers and are
/// compared modulo 2^32 (see docs/accounting.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Where the flow is counted: `steer::counter_slot` of the backend the server port
    /// belongs to and of the instance (version) whose listener took the connection.
    pub backend: u32,
    /// `FLOW_ESTABLISHED`, or `FLOW_EARLY` for the note of a payload that came first.
    pub state: u32,
    /// 1 when the client's newest payload arrived after the node's newest payload: a request
    /// the node has not started answering.
    pub request_pending: u32,
    /// `ORIGIN_HANDSHAKE` or `ORIGIN_SEEDED`.
    pub origin: u32,
    /// Sequence number just past the newest client payload (or FIN) seen: the next sequence
    /// number the client may use, where the kernel accepts its RST.
    pub client_next_seq: u32,
    /// Sequence number just past the newest payload the node sent.
    pub server_next_seq: u32,
    /// Highest acknowledgment number the client sent: node bytes before it are delivered.
    pub client_acked: u32,
    /// 1 when the client's latest ACK advertised a zero receive window: the node holds
    /// response bytes it may not send yet, although everything it sent is acknowledged.
    pub client_window_closed: u32,
    /// 1 for a connection that existed before the agent started (seeded from the socket
    /// table) until the client's first segment sets the client-side sequence numbers.
    pub client_unsynced: u32,
    /// Likewise for the node's side, until the node's first segment.
    pub server_unsynced: u32,
    /// `FIN_FROM_*` | `RST_FROM_*` bits the TC programs saw on the wire, set by atomic
    /// fetch-or (the two directions run on two CPUs). They only classify an ending the kernel
    /// decided (closed, reset by whom); for a seeded flow the completed FIN pair or a RST ends it.
    pub hints: u64,
    /// Which aggregate this flow is counted in: `COUNTED_IDLE`, `COUNTED_IN_FLIGHT` or
    /// `COUNTED_REMOVED`. Changed only by atomic compare-and-swap so that concurrent packets
    /// in both directions apply each transition to the aggregates exactly once. 64 bits
    /// because the BPF target has 64-bit atomics only (32-bit ones need alu32).
    pub counted_in_flight: u64,
    /// CLOCK_MONOTONIC nanoseconds of the flow's creation, for a seeded flow of its last
    /// packet in either direction (the userspace garbage collector checks silent ones), and
    /// once ended as vanished, of that ending (`ENDED_VANISHED`).
    pub last_seen_ns: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), integer fields only, sizes chosen so there is no implicit padding.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above; ten u32 fields put the u64 fields on their alignment.
    unsafe impl aya::Pod for super::Flow {}
}

/// `a` is after `b` in TCP sequence space (RFC 793 modular comparison).
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Largest distance, either way, between a client segment's sequence number and the next one
/// expected for the segment to be believed: 16 MiB, above the largest receive window Linux
/// advertises with its default buffers (`tcp_rmem` max 6 MiB). The kernel's own check uses the
/// exact window, which the TC programs cannot see; a segment farther away than this cannot be
/// inside it, so it is a stale or spoofed segment the kernel drops (docs/accounting.md).
pub const CLIENT_WINDOW_LIMIT: u32 = 1 << 24;

/// `seq` is within `CLIENT_WINDOW_LIMIT` of `next`, before or after (modulo 2^32).
#[inline(always)]
pub fn in_client_window(seq: u32, next: u32) -> bool {
    seq.wrapping_sub(next).wrapping_add(CLIENT_WINDOW_LIMIT) <= 2 * CLIENT_WINDOW_LIMIT
}

/// Whether a flow carries work the node has not finished: a request not yet answered,
/// response bytes the client has not acknowledged, or a response stalled by the client's
/// closed receive window (docs/accounting.md).
#[inline(always)]
pub fn carries_work(flow: &Flow) -> bool {
    flow.state == FLOW_ESTABLISHED
        && (flow.request_pending != 0
            || seq_after(flow.server_next_seq, flow.client_acked)
            || flow.client_window_closed != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 36);
        assert_eq!(core::mem::size_of::<Flow>(), 10 * 4 + 3 * 8);
    }

    #[test]
    fn sequence_comparison_wraps() {
        assert!(seq_after(1, 0));
        assert!(!seq_after(0, 0));
        assert!(seq_after(5, u32::MAX - 5));
        assert!(!seq_after(u32::MAX - 5, 5));
    }

    fn established() -> Flow {
        Flow {
            state: FLOW_ESTABLISHED,
            server_next_seq: 1001,
            client_acked: 1001,
            ..Default::default()
        }
    }

    #[test]
    fn idle_when_everything_is_acknowledged_and_nothing_is_asked() {
        assert!(!carries_work(&established()));
    }

    #[test]
    fn in_flight_while_a_request_is_pending() {
        let flow = Flow {
            request_pending: 1,
            ..established()
        };
        assert!(carries_work(&flow));
    }

    #[test]
    fn in_flight_while_response_bytes_are_unacknowledged() {
        let flow = Flow {
            server_next_seq: 5001,
            ..established()
        };
        assert!(carries_work(&flow));
    }

    #[test]
    fn in_flight_while_the_client_window_is_closed() {
        let flow = Flow {
            client_window_closed: 1,
            ..established()
        };
        assert!(carries_work(&flow));
    }

    #[test]
    fn a_flow_that_is_not_established_is_never_in_flight() {
        let flow = Flow {
            state: 0,
            request_pending: 1,
            ..established()
        };
        assert!(!carries_work(&flow));
    }

    #[test]
    fn window_check_accepts_near_and_rejects_far_sequence_numbers() {
        assert!(in_client_window(1000, 1000));
        assert!(in_client_window(1000 + 65_536, 1000));
        assert!(in_client_window(1000u32.wrapping_sub(65_536), 1000));
        assert!(in_client_window(5, u32::MAX - 5));
        assert!(!in_client_window(1000 + 0x4000_0000, 1000));
        assert!(!in_client_window(1000 + 0x8000_0000, 1000));
        assert!(!in_client_window(1000u32.wrapping_sub(0x1000_0000), 1000));
    }
}
