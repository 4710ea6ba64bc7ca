//! The `sock_ops` program's part: where a connection starts and ends, from the kernel's own
//! socket state (docs/accounting.md). A flow is created when the kernel has established a
//! passive connection — never for a half-open one — and ended exactly once when the kernel
//! moves the socket to `TCP_CLOSE`, so a RST or FIN the kernel did not accept ends nothing.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
        bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::SockOpsContext,
};
use drain_agent_common::{
    flow::{
        COUNTED_IDLE, COUNTED_IN_FLIGHT, ENDED_VANISHED, FLOW_EARLY, FLOW_ESTABLISHED, Flow,
        FlowKey, ORIGIN_HANDSHAKE, RST_FROM_CLIENT, RST_FROM_SERVER, carries_work, seq_after,
    },
    steer::counter_slot,
};

use crate::{
    accounting::{
        Ending, account_end, add, claim, counters, hint, seeded_flow, store_flow, stored_flow,
    },
    backend,
    maps::{ESTABLISHED_WHILE_SEEDING, SEEDED_TUPLES, SEEDING, STEERED, STEERING, UNTRACKED},
};

/// The agent's network namespace cookie, set by the loader. Every namespace's sockets pass
/// through a program on the root cgroup; only this namespace's are the agent's.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Dispatches the callbacks the program handles; every other one passes.
#[inline(always)]
pub fn handle(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(ctx, ctx.arg(0)),
        _ => {}
    }
}

/// The kernel established a passive connection (the client's ACK of the SYN-ACK was
/// accepted, or a Fast Open SYN): start tracking it with the socket's own sequence state.
#[inline(always)]
fn established(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY (all `field` reads): `ops` is the program's context, valid for this run.
    let port = unsafe { field(addr_of!((*ops).local_port)) } as u16; // host order
    let Some(watched) = backend::watched_port(u32::from(port)) else {
        return;
    };
    if !our_netns(ctx) {
        return;
    }
    let Some(key) = flow_key(ops, port) else {
        return;
    };
    // Another listener on the backend's port (HAProxy's frontend on the VIP, say) is not the
    // backend's.
    let Some(backend) = backend::serving(watched, key.server_addr, port) else {
        return;
    };
    let slot = instance_slot(backend, &key);
    // SAFETY: as above.
    let (rcv_nxt, snd_nxt, snd_una) = unsafe {
        (
            field(addr_of!((*ops).rcv_nxt)),
            field(addr_of!((*ops).snd_nxt)),
            field(addr_of!((*ops).snd_una)),
        )
    };
    // Payload on the handshake-completing ACK (or a Fast Open SYN) went past the packet
    // programs before this flow existed (at the listener, which has no storage); the kernel
    // queues it after this callback, so rcv_nxt does not include it yet.
    let payload = handshake_payload(ops);
    let mut client_next_seq = rcv_nxt.wrapping_add(payload);
    let mut request_pending = u32::from(payload != 0);
    // A payload that reached this socket on another CPU while the kernel established it
    // waits in the socket's backlog: the packet program left a note of where it ends.
    let early = stored_flow(socket(ops))
        .filter(|flow| flow.state == FLOW_EARLY)
        .map(|note| note.client_next_seq);
    if let Some(end) = early {
        request_pending = 1;
        if seq_after(end, client_next_seq) {
            client_next_seq = end;
        }
    }
    let mut flow = Flow {
        backend: slot,
        state: FLOW_ESTABLISHED,
        origin: ORIGIN_HANDSHAKE,
        request_pending,
        client_next_seq,
        server_next_seq: snd_nxt,
        client_acked: snd_una,
        // SAFETY: helper without preconditions.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
        ..Flow::default()
    };
    let in_flight = carries_work(&flow);
    flow.counted_in_flight = if in_flight {
        COUNTED_IN_FLIGHT
    } else {
        COUNTED_IDLE
    };

    // A seeded entry for the same tuple is a connection older than the agent that is gone
    // now (its socket's tuple is in use again). This program checked the namespace, so the
    // tuple is this namespace's.
    if let Some(cookie) = SEEDED_TUPLES.get_ptr(key)
        // SAFETY: valid for this program run (see accounting::seeded_flow).
        && let Some(old) = seeded_flow(unsafe { *cookie })
    {
        // Only userspace deletes seeded entries: mark it ended.
        if let Some(counted) = claim(old) {
            account_end(
                old.backend,
                counted,
                old.request_pending != 0,
                Ending::Vanished,
                false,
            );
        }
    }

    let Some(counters) = counters(slot) else {
        return;
    };
    // Counted before the insert: a segment on another CPU may settle the new entry at once,
    // and its -1 must never meet a gauge that lacks the +1 (it would wrap to 2^64 - 1).
    add(&mut counters.established, 1);
    add(&mut counters.tracked, 1);
    if in_flight {
        add(&mut counters.in_flight, 1);
    }
    if SEEDING.get(0).is_some_and(|&seeding| seeding != 0) {
        // Userspace is reading the socket table: it must not seed this one too.
        let _ = ESTABLISHED_WHILE_SEEDING.insert(key, 1, 0);
    }
    if let Some(stored) = store_flow(socket(ops), &mut flow) {
        if early.is_some() {
            // The storage existed (the note), so the kernel did not copy `flow` into it.
            // The state last: a packet on another CPU takes it for the note until then.
            *stored = Flow {
                state: FLOW_EARLY,
                ..flow
            };
            // SAFETY: a field of the storage this program run holds.
            unsafe {
                core::ptr::write_volatile(core::ptr::addr_of_mut!(stored.state), FLOW_ESTABLISHED)
            };
        }
        add(&mut counters.accepted, 1);
        // OR: other sock_ops programs may have set flags of their own.
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    } else {
        // The kernel could not allocate the storage: untracked. Userspace counts it as
        // unknown from the socket table (docs/accounting.md).
        add(&mut counters.established, u64::MAX);
        add(&mut counters.tracked, u64::MAX);
        if in_flight {
            add(&mut counters.in_flight, u64::MAX);
        }
        add(&mut counters.flow_table_full, 1);
        let _ = UNTRACKED.insert(key, 1, 0);
    }
}

/// The kernel moved a socket to `TCP_CLOSE`: the connection is over, whatever was or was not
/// seen on the wire. `old_state` is the state it leaves.
#[inline(always)]
fn closed(ctx: &SockOpsContext, old_state: u32) {
    if !our_netns(ctx) {
        return;
    }
    let ops = ctx.ops;
    let Some(flow) = stored_flow(socket(ops)).filter(|flow| flow.state == FLOW_ESTABLISHED) else {
        // A socket the agent never tracked (not a backend port, untracked), or one that
        // closed with only an early note, counted nowhere.
        return;
    };
    // SAFETY: as in established.
    let all_acked = unsafe { field(addr_of!((*ops).snd_una)) == field(addr_of!((*ops).snd_nxt)) };
    let hints = flow.hints;
    let ending = if hints & RST_FROM_SERVER != 0 {
        Ending::ResetByServer
    } else if hints & RST_FROM_CLIENT != 0 {
        Ending::ResetByClient
    } else if all_acked
        && matches!(
            old_state,
            BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 | BPF_TCP_CLOSING | BPF_TCP_LAST_ACK
        )
    {
        // Both FINs exchanged and everything the node sent acknowledged (or the node's own
        // close timed out in FIN_WAIT2, its data delivered).
        Ending::Closed
    } else {
        // Straight from ESTABLISHED or CLOSE_WAIT (or with data unacknowledged): a loss, or an
        // abort whose RST the node sends after this callback (recounted at egress).
        Ending::Vanished
    };
    end(flow, ending);
}

/// The counters a new connection of `backend` is counted under: those of the instance the
/// handover's steering gave its SYN to, and otherwise those of the instance serving.
#[inline(always)]
fn instance_slot(backend: u32, key: &FlowKey) -> u32 {
    let Some(steering) = STEERING.get(backend) else {
        return backend;
    };
    let mut instance = steering.clients;
    // Only during a handover: one hash lookup per new connection, never per packet.
    if steering.active != 0
        && let Some(steered) = STEERED.get_ptr(key)
    {
        // SAFETY: valid for this program run (see accounting::lookup).
        instance = unsafe { *steered };
        let _ = STEERED.remove(key);
    }
    counter_slot(backend, instance)
}

/// Ends a kernel-established flow exactly once. Its storage stays with the socket until the
/// kernel frees it, marked removed: a RST the node sends after the state change finds it.
#[inline(always)]
fn end(flow: &mut Flow, ending: Ending) {
    let Some(counted) = claim(flow) else {
        return;
    };
    if ending == Ending::Vanished {
        // SAFETY: helper without preconditions.
        flow.last_seen_ns = unsafe { bpf_ktime_get_ns() };
        hint(flow, ENDED_VANISHED);
    }
    account_end(
        flow.backend,
        counted,
        flow.request_pending != 0,
        ending,
        true,
    );
}

/// The socket of a `sock_ops` callback.
#[inline(always)]
fn socket(ops: *mut bpf_sock_ops) -> *mut aya_ebpf::bindings::bpf_sock {
    // SAFETY: a context field of this program run (the kernel's full socket for the
    // callbacks handled here; the storage helper checks it either way).
    unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)) }
}

/// Payload bytes of the skb that completed the handshake: its length minus the TCP header,
/// which is exactly what the kernel exposes as skb_data..skb_data_end for this callback.
#[inline(always)]
fn handshake_payload(ops: *mut bpf_sock_ops) -> u32 {
    // SAFETY: context fields, valid for this run; the pointers are only subtracted, never
    // dereferenced (the verifier allows pointer subtraction to privileged programs).
    let (len, data, data_end) = unsafe {
        (
            field(addr_of!((*ops).skb_len)),
            read_volatile(addr_of!((*ops).__bindgen_anon_3.skb_data)) as u64,
            read_volatile(addr_of!((*ops).__bindgen_anon_4.skb_data_end)) as u64,
        )
    };
    let header = data_end.wrapping_sub(data);
    if header == 0 || header > u64::from(len) {
        return 0;
    }
    len - header as u32
}

/// The socket's 4-tuple as the TC programs see it: IPv4 as IPv4-mapped (an IPv6 socket
/// carrying IPv4 already has mapped addresses), ports in host order.
#[inline(always)]
fn flow_key(ops: *mut bpf_sock_ops, server_port: u16) -> Option<FlowKey> {
    // SAFETY: context fields, valid for this run. One 32-bit load each at a constant offset,
    // all of them before any branch: the verifier rejects wider loads of these fields and
    // loads through a computed context pointer (which LLVM makes of a per-family choice).
    let (family, remote, remote4, local4, remote6, local6) = unsafe {
        (
            field(addr_of!((*ops).family)),
            field(addr_of!((*ops).remote_port)),
            field(addr_of!((*ops).remote_ip4)),
            field(addr_of!((*ops).local_ip4)),
            [
                field(addr_of!((*ops).remote_ip6[0])),
                field(addr_of!((*ops).remote_ip6[1])),
                field(addr_of!((*ops).remote_ip6[2])),
                field(addr_of!((*ops).remote_ip6[3])),
            ],
            [
                field(addr_of!((*ops).local_ip6[0])),
                field(addr_of!((*ops).local_ip6[1])),
                field(addr_of!((*ops).local_ip6[2])),
                field(addr_of!((*ops).local_ip6[3])),
            ],
        )
    };
    // Network order in the upper 16 bits on little-endian kernels (the kernel shifts
    // skc_dport left by 16); lower bits on big-endian ones.
    let remote = if remote > 0xffff {
        remote >> 16
    } else {
        remote
    };
    let client_port = u16::from_be(remote as u16);
    let (client_addr, server_addr) = match family {
        AF_INET => (v4_mapped(remote4), v4_mapped(local4)),
        AF_INET6 => (v6(remote6), v6(local6)),
        _ => return None,
    };
    Some(FlowKey {
        client_addr,
        server_addr,
        client_port,
        server_port,
    })
}

#[inline(always)]
fn our_netns(ctx: &SockOpsContext) -> bool {
    // SAFETY: the helper takes the program's context.
    unsafe { bpf_get_netns_cookie(ctx.ops.cast()) == our_netns_cookie() }
}

/// The agent's network namespace cookie.
#[inline(always)]
pub fn our_netns_cookie() -> u64 {
    // SAFETY: NETNS_COOKIE is a read-only global that the loader patched (volatile: the
    // compiler must not fold the 0 it was built with).
    unsafe { read_volatile(addr_of!(NETNS_COOKIE)) }
}

/// One 32-bit context load.
///
/// # Safety
/// `at` points into the program's context.
#[inline(always)]
unsafe fn field(at: *const u32) -> u32 {
    // SAFETY: the caller's.
    unsafe { read_volatile(at) }
}

/// Network-order u32 words (as stored in `bpf_sock_ops`) → address bytes.
#[inline(always)]
pub fn v6(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// A network-order IPv4 address → IPv4-mapped address bytes.
#[inline(always)]
pub fn v4_mapped(addr: u32) -> [u8; 16] {
    let a = addr.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}
