//! The packet programs' part: the in-flight definition, updated from every segment of a
//! tracked connection (docs/accounting.md). They never create or end a connection the kernel
//! established — the `sock_ops` program does (lifecycle.rs) — they only record hints (a FIN, a
//! RST at the exact sequence, a RST from the node) that classify the kernel's ending. Seeded
//! connections (older than the agent) have no kernel callback, so the packet programs end those
//! on the FIN pair or an exact RST; userspace deletes their entries.
//!
//! They run at the cgroup hooks of the node's sockets (`cgroup_skb`), where the kernel has
//! already found the packet's socket: a connection's flow is in that socket's storage, so a
//! packet costs the local port's array lookup and, on a backend port, one storage read — no
//! tuple hashed, no table searched.

use core::intrinsics::{AtomicOrdering, atomic_and};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::SkBuffContext,
};
use drain_agent_common::flow::{
    COUNTED_REMOVED, COUNTED_UNKNOWN, ENDED_VANISHED, FIN_FROM_CLIENT, FIN_FROM_SERVER, FLOW_EARLY,
    Flow, PAYLOAD_SEEN, RST_FROM_CLIENT, RST_FROM_SERVER, in_client_window, seq_after,
};

use crate::{
    accounting::{
        Ending, account_end, claim, counters, hint, seeded_flow, seeded_in_use, settle, store_flow,
        stored_flow,
    },
    backend,
    lifecycle::{v4_mapped, v6},
    packet::{self, Direction, Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// `bpf_sock::state` of a socket the kernel is establishing (a passive open's child).
const TCP_SYN_RECV: u32 = 3;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// last_seen_ns only needs GC precision; skipping the store keeps the flow's cache line clean.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
/// How long after the state change a node RST still re-counts a `vanished` ending: the RST of
/// an abort follows within microseconds (or once the neighbour resolves).
const ABORT_RST_WITHIN_NS: u64 = 1_000_000_000;

/// One packet of a socket of the node, either way. Returns nothing: the programs only observe.
#[inline(always)]
pub fn packet(ctx: &SkBuffContext, direction: Direction) {
    let skb = ctx.skb.skb;
    // SAFETY: a context field of this program run.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // The socket's local port, host order: the backend port both ways. A field of every
    // socket the kernel attaches (full, request or time-wait). 0 once the kernel closed the
    // socket and released its port: the RST of an abort leaves after that, and its flow
    // (ended, in the storage until the socket is freed) re-counts the ending.
    // Only the port: a connection to another address on it (another listener's) has no
    // storage and, older than the agent, was never seeded, so the lookups below skip it.
    // SAFETY: checked non-null; the verifier allows this field of any attached socket.
    let port = unsafe { (*sk).src_port };
    if port != 0 && backend::watched_port(port).is_none() {
        return;
    }
    let stored = stored_flow(sk);
    // SAFETY: as above (a field of every attached socket).
    let establishing = stored.is_none()
        && direction == Direction::ToServer
        && unsafe { (*sk).state } == TCP_SYN_RECV;
    // Not a connection the agent saw established, and none older than the agent to look for.
    if stored.is_none() && !seeded_in_use() && !establishing {
        return;
    }
    let frame = packet::skb_frame(ctx);
    let Ok(segment) = packet::parse(frame) else {
        return;
    };
    if establishing {
        note_early_payload(sk, port, &segment);
        return;
    }
    let (flow, seeded) = match stored {
        Some(flow) if flow.state == FLOW_EARLY => {
            if direction == Direction::ToServer {
                extend_early(flow, &segment);
            }
            return;
        }
        Some(flow) => (flow, false),
        None => match seeded(ctx) {
            Some(flow) => (flow, true),
            None => return,
        },
    };
    match direction {
        Direction::ToServer => from_client(&segment, flow, seeded),
        Direction::FromServer => from_server(&segment, flow, seeded),
    }
}

/// A client payload on a socket the kernel is still establishing, before the `sock_ops`
/// program created its flow: the handshake-completing ACK is being processed on another CPU
/// (RPS, veth, loopback), which holds the socket, and this segment waits in its backlog, past
/// the point the flow will start from. Noted in the socket's storage (`FLOW_EARLY`, counted
/// nowhere), so that the flow starts with the request pending. Only for the backend's own
/// addresses: a note on another listener's connection would never be taken.
#[inline(always)]
fn note_early_payload(sk: *mut aya_ebpf::bindings::bpf_sock, port: u32, segment: &Segment) {
    if segment.payload_len == 0 {
        return;
    }
    let Some(watched) = backend::watched_port(port) else {
        return;
    };
    // SAFETY: fields of the attached socket, as above; one volatile load each at a constant
    // offset (the verifier refuses arithmetic on a socket pointer, which LLVM makes of an
    // array walk).
    let (family, local4, local6) = unsafe {
        use core::ptr::{addr_of, read_volatile};
        (
            read_volatile(addr_of!((*sk).family)),
            read_volatile(addr_of!((*sk).src_ip4)),
            [
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
            ],
        )
    };
    let local = match family {
        AF_INET => v4_mapped(local4),
        AF_INET6 => v6(local6),
        _ => return,
    };
    if backend::serving(watched, local, port as u16).is_none() {
        return;
    }
    let mut note = Flow {
        state: FLOW_EARLY,
        request_pending: 1,
        client_next_seq: segment.seq.wrapping_add(segment.payload_len),
        ..Flow::default()
    };
    // Another CPU may have written the note first: then it is returned, and extended.
    if let Some(flow) = store_flow(sk, &mut note) {
        extend_early(flow, segment);
    }
}

/// Moves an early note's end to just past `segment`'s payload, if that is later.
#[inline(always)]
fn extend_early(flow: &mut Flow, segment: &Segment) {
    let end = segment.seq.wrapping_add(segment.payload_len);
    if segment.payload_len != 0 && seq_after(end, flow.client_next_seq) {
        flow.client_next_seq = end;
        flow.request_pending = 1;
    }
}

/// The seeded flow of the packet's socket, by its cookie: unique on the host, so another
/// namespace's connection on the same tuple cannot match, and no namespace helper is needed
/// (`bpf_get_netns_cookie` reached `cgroup_skb` only in 6.15; this one has been there since
/// 4.12).
#[inline(always)]
fn seeded(ctx: &SkBuffContext) -> Option<&'static mut Flow> {
    // SAFETY: the helper takes the program's context (the cookie of skb->sk, 0 without one).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if cookie == 0 {
        return None;
    }
    seeded_flow(cookie)
}

/// A segment from the client. Not trusted: anyone on the path can send one.
#[inline(always)]
fn from_client(segment: &Segment, flow: &mut Flow, seeded: bool) {
    if flow.counted_in_flight == COUNTED_REMOVED {
        return;
    }
    if seeded {
        touch(flow);
        if flow.client_unsynced != 0 {
            // A RST cannot be the baseline: taken as one, any RST (a forged one included)
            // would sit at the expected sequence number and end the connection. Until a
            // segment the kernel would accept gives the baseline, the kernel's own check
            // decides, and the garbage collector finds a socket it reset gone.
            if segment.has(TCP_RST) {
                return;
            }
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
fn from_server(segment: &Segment, flow: &mut Flow, seeded: bool) {
    if segment.has(TCP_SYN) {
        return; // a handshake: no state until the kernel established it
    }
    if flow.counted_in_flight == COUNTED_REMOVED {
        if segment.has(TCP_RST) && !seeded {
            recount_abort(flow);
        }
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

/// The node's RST of a connection the state callback just ended as vanished: the kernel
/// changes the state to `TCP_CLOSE` first and sends the RST of an abort (close() with unread
/// data, SO_LINGER 0) right after, from the same socket, so this is where that ending learns
/// it was the node's reset. Clearing the bit decides who re-counts (exactly once).
#[inline(always)]
fn recount_abort(flow: &mut Flow) {
    if flow.hints & ENDED_VANISHED == 0 {
        return;
    }
    // SAFETY: helper without preconditions.
    if unsafe { bpf_ktime_get_ns() }.wrapping_sub(flow.last_seen_ns) > ABORT_RST_WITHIN_NS {
        return;
    }
    // SAFETY: a valid, aligned u64 in map memory for this program run.
    let before = unsafe {
        atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(&mut flow.hints, !ENDED_VANISHED)
    };
    if before & ENDED_VANISHED == 0 {
        return;
    }
    if let Some(counters) = counters(flow.backend) {
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
