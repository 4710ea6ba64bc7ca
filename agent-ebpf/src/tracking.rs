//! The TC programs' part: the in-flight definition, updated from every segment of a tracked
//! connection (docs/accounting.md). They never create or end a connection the kernel
//! established — the `sock_ops` program does (lifecycle.rs) — they only record hints (a FIN, a
//! RST at the exact sequence, a RST from the node) that classify the kernel's ending. Seeded
//! connections (older than the agent) have no kernel callback, so the TC programs end those on
//! the FIN pair or an exact RST; userspace deletes their entries.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use drain_agent_common::flow::{
    COUNTED_REMOVED, COUNTED_UNKNOWN, FIN_FROM_CLIENT, FIN_FROM_SERVER, Flow, PAYLOAD_SEEN,
    RST_FROM_CLIENT, RST_FROM_SERVER, in_client_window, seq_after,
};

use crate::{
    accounting::{Ending, account_end, claim, counters, hint, lookup, settle},
    maps::JUST_ENDED,
    packet::{Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// last_seen_ns only needs GC precision; skipping the store keeps the flow's cache line clean.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
/// How long after the state change a node RST still re-counts a `vanished` ending: the RST of
/// an abort follows within microseconds (or once the neighbour resolves).
const ABORT_RST_WITHIN_NS: u64 = 1_000_000_000;

/// A segment from the client. Not trusted: anyone on the path can send one.
#[inline(always)]
pub fn from_client(segment: &Segment) {
    let Some((flow, seeded)) = lookup(&segment.key) else {
        // No state before the kernel established the connection (a SYN, the handshake's ACK),
        // nor after it ended.
        return;
    };
    if flow.counted_in_flight == COUNTED_REMOVED {
        return;
    }
    if seeded {
        touch(flow);
        if flow.client_unsynced != 0 {
            sync_client(segment, flow);
        }
    }

    if segment.has(TCP_RST) {
        // RFC 5961: the kernel accepts a RST only at exactly the next expected sequence
        // number; any other RST it ignores (or answers with a challenge ACK), and so do we.
        if segment.seq != flow.client_next_seq {
            return;
        }
        // A RST acknowledges what the client received (HAProxy resets its health-check
        // connections right after reading the answer), so a fully answered connection is not
        // counted as cut. Its window field means nothing.
        apply_ack(segment, flow);
        flow.client_window_closed = 0;
        hint(flow, RST_FROM_CLIENT);
        if seeded {
            end_seeded(flow, Ending::ResetByClient);
        } else {
            settle(flow.backend, flow);
        }
        return;
    }
    // Far outside any receive window: the kernel drops it, ACK and all.
    if !in_client_window(segment.seq, flow.client_next_seq) {
        return;
    }
    apply_ack(segment, flow);
    if segment.has(TCP_ACK) {
        let closed = u32::from(segment.window == 0);
        if flow.client_window_closed != closed {
            flow.client_window_closed = closed;
        }
    }
    let end_seq = segment.seq.wrapping_add(segment.payload_len);
    if segment.payload_len != 0 {
        if flow.counted_in_flight == COUNTED_UNKNOWN {
            hint(flow, PAYLOAD_SEEN); // a request: the unknown flow is settled
        }
        // Only new bytes make a request; a retransmission ends at or before client_next_seq.
        if seq_after(end_seq, flow.client_next_seq) {
            flow.client_next_seq = end_seq;
            flow.request_pending = 1;
        }
    }
    if segment.has(TCP_FIN) {
        // The FIN occupies one sequence number: the client's RST after it comes at end + 1.
        let fin_end = end_seq.wrapping_add(1);
        if seq_after(fin_end, flow.client_next_seq) {
            flow.client_next_seq = fin_end;
        }
        let before = hint(flow, FIN_FROM_CLIENT);
        if seeded && before & FIN_FROM_SERVER != 0 {
            end_seeded(flow, Ending::Closed);
            return;
        }
    }
    settle(flow.backend, flow);
}

/// A segment from the node: its own, trusted.
#[inline(always)]
pub fn from_server(segment: &Segment) {
    if segment.has(TCP_SYN) {
        return; // a handshake: no state until the kernel established it
    }
    let Some((flow, seeded)) = lookup(&segment.key) else {
        if segment.has(TCP_RST) {
            recount_abort(segment);
        }
        return;
    };
    if flow.counted_in_flight == COUNTED_REMOVED {
        return;
    }
    if seeded {
        touch(flow);
        if flow.server_unsynced != 0 {
            sync_server(segment, flow);
        }
    }
    if segment.has(TCP_RST) {
        // Sent before the state change (ss -K, keepalive or orphan timeouts): the state
        // callback reads the hint. Aborts by close() send theirs after: see recount_abort.
        hint(flow, RST_FROM_SERVER);
        if seeded {
            end_seeded(flow, Ending::ResetByServer);
        }
        return;
    }
    if segment.payload_len != 0 {
        if flow.counted_in_flight == COUNTED_UNKNOWN {
            hint(flow, PAYLOAD_SEEN); // a response: in flight until acknowledged, then idle
        }
        let end_seq = segment.seq.wrapping_add(segment.payload_len);
        // New response bytes answer every request byte received before them.
        if seq_after(end_seq, flow.server_next_seq) {
            flow.server_next_seq = end_seq;
            flow.request_pending = 0;
        }
    }
    if segment.has(TCP_FIN) {
        let before = hint(flow, FIN_FROM_SERVER);
        if seeded && before & FIN_FROM_CLIENT != 0 {
            end_seeded(flow, Ending::Closed);
            return;
        }
    }
    settle(flow.backend, flow);
}

/// A client ACK counts only for bytes the node sent (plus its FIN): the kernel ignores an ACK
/// of data it never sent, and a forged one must not make a running response look delivered.
#[inline(always)]
fn apply_ack(segment: &Segment, flow: &mut Flow) {
    if segment.has(TCP_ACK)
        && seq_after(segment.ack, flow.client_acked)
        && !seq_after(segment.ack, flow.server_next_seq.wrapping_add(1))
    {
        flow.client_acked = segment.ack;
    }
}

/// The node's RST of a connection the state callback just ended as `vanished`: the kernel
/// changes the state to `TCP_CLOSE` first and sends the RST of an abort (close() with unread
/// data, SO_LINGER 0) right after, so this is where that ending learns it was the node's
/// reset. The delete decides who re-counts (exactly once).
#[inline(always)]
fn recount_abort(segment: &Segment) {
    let Some(ended) = JUST_ENDED.get_ptr(segment.key) else {
        return;
    };
    // SAFETY: valid for this program run (see accounting::lookup).
    let ended = unsafe { *ended };
    // SAFETY: helper without preconditions.
    if unsafe { bpf_ktime_get_ns() }.wrapping_sub(ended) > ABORT_RST_WITHIN_NS {
        return;
    }
    if JUST_ENDED.remove(segment.key).is_err() {
        return;
    }
    // The backend's first slot: the flow (and its instance) is gone, and the backend's
    // totals are the sum over its slots.
    if let Some(counters) = counters(segment.backend) {
        // A vanished connection and a node reset are both cuts when in flight: the cut
        // count stays as it is.
        crate::accounting::add(&mut counters.vanished, u64::MAX);
        crate::accounting::add(&mut counters.reset_by_server, 1);
    }
}

/// Ends a seeded flow (marks it removed and takes it out of the aggregates); userspace deletes
/// the entry, and untracks it then.
#[inline(always)]
fn end_seeded(flow: &mut Flow, ending: Ending) {
    if let Some(counted) = claim(flow) {
        account_end(
            flow.backend,
            counted,
            flow.request_pending != 0,
            ending,
            false,
        );
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

/// Seeded flows only: the garbage collector checks those silent for `flow_idle_check`.
#[inline(always)]
fn touch(flow: &mut Flow) {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(flow.last_seen_ns) >= LAST_SEEN_GRANULARITY_NS {
        flow.last_seen_ns = now;
    }
}
