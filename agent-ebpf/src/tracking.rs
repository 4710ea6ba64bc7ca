//! The per-connection state machine and the aggregates it keeps (docs/accounting.md).
//!
//! A flow is created when the node answers a SYN with SYN-ACK on a watched port, counted as
//! established when the client acknowledges it, and removed on RST or once both sides sent FIN.
//! Every change of "carries work" moves the flow between the in-flight and idle aggregates.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xchg};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use drain_agent_common::{
    counters::BackendCounters,
    flow::{
        COUNTED_IDLE, COUNTED_IN_FLIGHT, COUNTED_REMOVED, FIN_FROM_CLIENT, FIN_FROM_SERVER,
        FLOW_ESTABLISHED, FLOW_SYN_RECEIVED, Flow, carries_work, seq_after,
    },
};

use crate::{
    maps::{BACKEND_COUNTERS, FLOWS},
    packet::{Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// -E2BIG from bpf_map_update_elem: the hash map is full.
const E2BIG: i32 = 7;
/// last_seen_ns only needs GC precision; skipping the store keeps the flow's cache line clean.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// How a flow ended, for the totals.
#[derive(Clone, Copy)]
enum Ending {
    Closed,
    ResetByClient,
    ResetByServer,
    Vanished,
}

/// A segment from the client.
#[inline(always)]
pub fn from_client(segment: &Segment) {
    let Some(flow) = FLOWS.get_ptr_mut(segment.key) else {
        // Flows start at the node's SYN-ACK; anything else (a stray ACK after close, a SYN
        // not yet answered) is not a connection to count.
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run.
    let flow = unsafe { &mut *flow };
    touch(flow);

    if flow.state == FLOW_SYN_RECEIVED {
        if segment.has(TCP_RST) {
            end(segment, flow, Ending::ResetByClient);
            return;
        }
        // The handshake completes with the first ACK that covers the node's SYN.
        if segment.has(TCP_SYN)
            || !segment.has(TCP_ACK)
            || seq_after(flow.server_isn.wrapping_add(1), segment.ack)
        {
            return;
        }
        flow.state = FLOW_ESTABLISHED;
        if let Some(counters) = counters(segment.backend) {
            counters.established = counters.established.wrapping_add(1);
            counters.accepted += 1;
        }
    }
    if flow.client_unsynced != 0 {
        sync_client(segment, flow);
    }
    if segment.has(TCP_ACK) && seq_after(segment.ack, flow.client_acked) {
        flow.client_acked = segment.ack;
    }
    if segment.has(TCP_RST) {
        // A RST acknowledges what the client received (HAProxy resets its health-check
        // connections right after reading the answer); only then does it end the flow, so a
        // fully answered connection is not counted as cut. Its window field means nothing.
        flow.client_window_closed = 0;
        settle(segment, flow);
        end(segment, flow, Ending::ResetByClient);
        return;
    }
    if segment.has(TCP_ACK) {
        let closed = u32::from(segment.window == 0);
        if flow.client_window_closed != closed {
            flow.client_window_closed = closed;
        }
    }
    if segment.payload_len != 0 {
        let end_seq = segment.seq.wrapping_add(segment.payload_len);
        // Only new bytes make a request; a retransmission ends at or before client_next_seq.
        if seq_after(end_seq, flow.client_next_seq) {
            flow.client_next_seq = end_seq;
            flow.request_pending = 1;
        }
    }
    if segment.has(TCP_FIN) && fin(flow, FIN_FROM_CLIENT) {
        end(segment, flow, Ending::Closed);
        return;
    }
    settle(segment, flow);
}

/// A segment from the node.
#[inline(always)]
pub fn from_server(segment: &Segment) {
    if segment.has(TCP_SYN) {
        if segment.has(TCP_ACK) {
            start(segment);
        }
        return;
    }
    let Some(flow) = FLOWS.get_ptr_mut(segment.key) else {
        return;
    };
    // SAFETY: as in from_client.
    let flow = unsafe { &mut *flow };
    touch(flow);

    if segment.has(TCP_RST) {
        end(segment, flow, Ending::ResetByServer);
        return;
    }
    if flow.state != FLOW_ESTABLISHED {
        return;
    }
    if flow.server_unsynced != 0 {
        sync_server(segment, flow);
    }
    if segment.payload_len != 0 {
        let end_seq = segment.seq.wrapping_add(segment.payload_len);
        // New response bytes answer every request byte received before them.
        if seq_after(end_seq, flow.server_next_seq) {
            flow.server_next_seq = end_seq;
            flow.request_pending = 0;
        }
    }
    if segment.has(TCP_FIN) && fin(flow, FIN_FROM_SERVER) {
        end(segment, flow, Ending::Closed);
        return;
    }
    settle(segment, flow);
}

/// The node sent SYN-ACK: start tracking (or ignore a retransmitted SYN-ACK).
#[inline(always)]
fn start(segment: &Segment) {
    if let Some(existing) = FLOWS.get_ptr_mut(segment.key) {
        // SAFETY: as in from_client.
        let existing = unsafe { &mut *existing };
        if existing.server_isn == segment.seq {
            return; // retransmitted SYN-ACK
        }
        // A new handshake on the same tuple: the old connection is gone without FIN/RST.
        end(segment, existing, Ending::Vanished);
    }
    let flow = Flow {
        backend: segment.backend,
        state: FLOW_SYN_RECEIVED,
        counted_in_flight: COUNTED_IDLE,
        request_pending: 0,
        server_isn: segment.seq,
        client_next_seq: segment.ack,
        server_next_seq: segment.seq.wrapping_add(1),
        client_acked: segment.seq,
        fin_seen: 0,
        client_window_closed: 0,
        client_unsynced: 0,
        server_unsynced: 0,
        // SAFETY: helper without preconditions.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let inserted = FLOWS.insert(segment.key, flow, BPF_NOEXIST as u64);
    let Some(counters) = counters(segment.backend) else {
        return;
    };
    match inserted {
        Ok(()) => counters.tracked = counters.tracked.wrapping_add(1),
        Err(err) if err == -E2BIG => counters.flow_table_full += 1,
        // EEXIST: the other direction raced us to the same tuple; nothing lost.
        Err(_) => {}
    }
}

/// First client segment of a connection that predates the agent: take its sequence numbers as
/// the baseline, so the payload it carries (if any) counts as a new request.
#[inline(always)]
fn sync_client(segment: &Segment, flow: &mut Flow) {
    flow.client_next_seq = segment.seq;
    flow.client_acked = segment.ack;
    if flow.server_unsynced != 0 {
        // Until the node sends, assume it has nothing outstanding beyond what the client acked.
        flow.server_next_seq = segment.ack;
    }
    flow.client_unsynced = 0;
}

/// First node segment of a connection that predates the agent: its payload counts as new
/// response bytes.
#[inline(always)]
fn sync_server(segment: &Segment, flow: &mut Flow) {
    flow.server_next_seq = segment.seq;
    if flow.client_unsynced != 0 {
        flow.client_acked = segment.seq;
        flow.client_next_seq = segment.ack;
    }
    flow.server_unsynced = 0;
}

/// Records one side's FIN; true when this completes the pair (the connection is closed).
#[inline(always)]
fn fin(flow: &mut Flow, side: u64) -> bool {
    // SAFETY: a valid, aligned u64 in map memory for this program run.
    let before =
        unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(&mut flow.fin_seen, side) };
    before & side == 0 && (before | side) == FIN_FROM_CLIENT | FIN_FROM_SERVER
}

/// After a segment: move the flow between idle and in flight if that changed.
#[inline(always)]
fn settle(segment: &Segment, flow: &mut Flow) {
    let wanted = if carries_work(flow) {
        COUNTED_IN_FLIGHT
    } else {
        COUNTED_IDLE
    };
    let counted = flow.counted_in_flight;
    if counted == wanted || counted == COUNTED_REMOVED {
        return; // the common case: a plain read, no atomic, no counter write
    }
    // Both directions may run at once on different CPUs; only the one that wins the swap
    // applies the transition, so the aggregate moves exactly once.
    // SAFETY: a valid, aligned u64 in map memory for this program run.
    let (_, swapped) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &mut flow.counted_in_flight,
            counted,
            wanted,
        )
    };
    if !swapped {
        return;
    }
    if let Some(counters) = counters(segment.backend) {
        if wanted == COUNTED_IN_FLIGHT {
            counters.in_flight = counters.in_flight.wrapping_add(1);
        } else {
            counters.in_flight = counters.in_flight.wrapping_sub(1);
            // SAFETY: helper without preconditions.
            counters.last_idle_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
}

/// Removes a flow and takes it out of the aggregates. Whoever swaps `counted_in_flight` to
/// `COUNTED_REMOVED` first owns the removal, so a FIN and a RST racing on two CPUs (or the
/// userspace garbage collector) cannot count one connection twice.
#[inline(always)]
fn end(segment: &Segment, flow: &mut Flow, ending: Ending) {
    // SAFETY: a valid, aligned u64 in map memory for this program run.
    let counted = unsafe {
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&mut flow.counted_in_flight, COUNTED_REMOVED)
    };
    if counted == COUNTED_REMOVED {
        return;
    }
    let was_established = flow.state == FLOW_ESTABLISHED;
    let _ = FLOWS.remove(segment.key);
    let Some(counters) = counters(flow.backend) else {
        return;
    };
    counters.tracked = counters.tracked.wrapping_sub(1);
    if counted == COUNTED_IN_FLIGHT {
        counters.in_flight = counters.in_flight.wrapping_sub(1);
        // SAFETY: helper without preconditions.
        counters.last_idle_ns = unsafe { bpf_ktime_get_ns() };
    }
    if !was_established {
        return; // a handshake that never completed was never counted
    }
    counters.established = counters.established.wrapping_sub(1);
    // Cuts are what the node did to a request: a RST from the node or a connection lost
    // while carrying one, or a close without an answer. A client abandoning its own request
    // (HAProxy aborting a health check as the server enters MAINT) is its reset, not a cut.
    let cut = match ending {
        Ending::Closed => flow.request_pending != 0,
        Ending::ResetByServer | Ending::Vanished => counted == COUNTED_IN_FLIGHT,
        Ending::ResetByClient => false,
    };
    if cut {
        counters.cut_in_flight += 1;
    }
    match ending {
        Ending::Closed => counters.closed += 1,
        Ending::ResetByClient => counters.reset_by_client += 1,
        Ending::ResetByServer => counters.reset_by_server += 1,
        Ending::Vanished => counters.vanished += 1,
    }
}

#[inline(always)]
fn touch(flow: &mut Flow) {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(flow.last_seen_ns) >= LAST_SEEN_GRANULARITY_NS {
        flow.last_seen_ns = now;
    }
}

#[inline(always)]
fn counters(backend: u32) -> Option<&'static mut BackendCounters> {
    // SAFETY: per-CPU slot of this CPU; BPF programs do not migrate while running.
    BACKEND_COUNTERS
        .get_ptr_mut(backend)
        .map(|counters| unsafe { &mut *counters })
}
