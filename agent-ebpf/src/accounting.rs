//! What every program shares: finding a flow, moving it between the idle and in-flight
//! aggregates, and taking an ended flow out of them exactly once (docs/accounting.md).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg};

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::{bpf_ktime_get_ns, generated::bpf_sk_storage_get},
};
use drain_agent_common::{
    counters::BackendCounters,
    flow::{
        COUNTED_IDLE, COUNTED_IN_FLIGHT, COUNTED_REMOVED, COUNTED_UNKNOWN, Flow, PAYLOAD_SEEN,
        carries_work,
    },
};

use crate::maps::{BACKEND_COUNTERS, FLOW_STORAGE, SEEDED_FLOWS, SEEDED_FLOWS_IN_USE};

/// How a flow ended, for the totals.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Closed,
    ResetByClient,
    ResetByServer,
    Vanished,
}

/// The flow in `sk`'s own storage: a connection the kernel established while the agent
/// watched. `sk` may be any socket the kernel attached to a packet (a listener, a request or
/// time-wait socket, another namespace's): only the agent's `sock_ops` program creates
/// storage, so only the agent's connections have it.
#[inline(always)]
pub fn stored_flow(sk: *mut bpf_sock) -> Option<&'static mut Flow> {
    storage(sk, null_mut(), 0)
}

/// Creates `sk`'s flow as a copy of `flow`; `None` when the kernel cannot allocate it.
#[inline(always)]
pub fn store_flow(sk: *mut bpf_sock, flow: &mut Flow) -> Option<&'static mut Flow> {
    storage(sk, flow, u64::from(BPF_SK_STORAGE_GET_F_CREATE))
}

#[inline(always)]
fn storage(sk: *mut bpf_sock, init: *mut Flow, flags: u64) -> Option<&'static mut Flow> {
    // The verifier refuses a socket pointer that may be NULL.
    if sk.is_null() {
        return None;
    }
    // The map's address as the loader relocates it (what aya's own wrapper passes; its
    // accessors take only a sock_addr context).
    let map = core::ptr::from_ref(&FLOW_STORAGE).cast_mut().cast();
    // SAFETY: the helper checks `sk` itself (NULL for anything but a full socket) and copies
    // `init` (a Flow, the map's value type) only when it creates.
    let flow = unsafe { bpf_sk_storage_get(map, sk.cast(), init.cast(), flags) }.cast::<Flow>();
    // SAFETY: storage of a socket the program holds; valid for this program run.
    unsafe { flow.as_mut() }
}

/// The seeded flow (a connection older than the agent) of the socket with `cookie`. Callers
/// look only while `seeded_in_use`: otherwise a packet pays no hash lookup at all.
#[inline(always)]
pub fn seeded_flow(cookie: u64) -> Option<&'static mut Flow> {
    SEEDED_FLOWS
        .get_ptr_mut(cookie)
        // SAFETY: the pointer comes from a successful lookup and stays valid for this
        // program run (hash map elements are freed after an RCU grace period).
        .map(|flow| unsafe { &mut *flow })
}

/// Whether seeded flows may exist: an array lookup the verifier inlines.
#[inline(always)]
pub fn seeded_in_use() -> bool {
    SEEDED_FLOWS_IN_USE
        .get(0)
        .is_some_and(|&in_use| in_use != 0)
}

/// Sets hint bits; returns the bits that were set before.
#[inline(always)]
pub fn hint(flow: &mut Flow, bits: u64) -> u64 {
    // SAFETY: a valid, aligned u64 in map memory for this program run.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(&mut flow.hints, bits) }
}

/// After a segment: move the flow between idle and in flight if that changed. An unknown
/// (seeded) flow stays unknown until payload crossed: a pure ACK says nothing about a request
/// the node may be computing.
#[inline(always)]
pub fn settle(backend: u32, flow: &mut Flow) {
    let counted = flow.counted_in_flight;
    if counted == COUNTED_UNKNOWN && flow.hints & PAYLOAD_SEEN == 0 {
        return;
    }
    let wanted = if carries_work(flow) {
        COUNTED_IN_FLIGHT
    } else {
        COUNTED_IDLE
    };
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
    if let Some(counters) = counters(backend) {
        if counted == COUNTED_UNKNOWN {
            add(&mut counters.unknown, u64::MAX);
        }
        if wanted == COUNTED_IN_FLIGHT {
            add(&mut counters.in_flight, 1);
        } else {
            if counted == COUNTED_IN_FLIGHT {
                add(&mut counters.in_flight, u64::MAX);
            }
            // Leaving in flight, or an unknown flow found idle (its response just completed):
            // either way the quiet period starts now.
            // SAFETY: helper without preconditions.
            counters.last_idle_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
}

/// Claims the ending of a flow: whoever swaps `counted_in_flight` to `COUNTED_REMOVED` first
/// owns it, so the state callback, a newer connection on the same tuple, the TC programs (for
/// a seeded flow) and the userspace garbage collector cannot count one connection twice.
/// Returns what the flow was counted as, or `None` if someone else ended it.
#[inline(always)]
pub fn claim(flow: &mut Flow) -> Option<u64> {
    // SAFETY: a valid, aligned u64 in map memory for this program run.
    let counted = unsafe {
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&mut flow.counted_in_flight, COUNTED_REMOVED)
    };
    (counted != COUNTED_REMOVED).then_some(counted)
}

/// Takes a claimed flow out of the aggregates. `untrack` when its entry leaves the flow table
/// (seeded entries leave it when userspace deletes them). `request_pending`, `backend` and
/// `counted` are copies taken before the entry was removed.
#[inline(always)]
pub fn account_end(
    backend: u32,
    counted: u64,
    request_pending: bool,
    ending: Ending,
    untrack: bool,
) {
    let Some(counters) = counters(backend) else {
        return;
    };
    if untrack {
        add(&mut counters.tracked, u64::MAX);
    }
    if counted == COUNTED_IN_FLIGHT {
        add(&mut counters.in_flight, u64::MAX);
        // SAFETY: helper without preconditions.
        counters.last_idle_ns = unsafe { bpf_ktime_get_ns() };
    }
    if counted == COUNTED_UNKNOWN {
        // Whether it carried a request is unknown: it is not counted as a cut either.
        add(&mut counters.unknown, u64::MAX);
    }
    add(&mut counters.established, u64::MAX);
    // Cuts are what the node did to a request: a RST from the node or a connection lost
    // while carrying one, or a close without an answer. A client abandoning its own request
    // (HAProxy aborting a health check as the server enters MAINT) is its reset, not a cut.
    let cut = match ending {
        Ending::Closed => request_pending,
        Ending::ResetByServer | Ending::Vanished => counted == COUNTED_IN_FLIGHT,
        Ending::ResetByClient => false,
    };
    if cut {
        add(&mut counters.cut_in_flight, 1);
    }
    let total = match ending {
        Ending::Closed => &mut counters.closed,
        Ending::ResetByClient => &mut counters.reset_by_client,
        Ending::ResetByServer => &mut counters.reset_by_server,
        Ending::Vanished => &mut counters.vanished,
    };
    add(total, 1);
}

/// This CPU's counters of a backend.
#[inline(always)]
pub fn counters(backend: u32) -> Option<&'static mut BackendCounters> {
    // SAFETY: per-CPU slot of this CPU; BPF programs do not migrate while running.
    BACKEND_COUNTERS
        .get_ptr_mut(backend)
        .map(|counters| unsafe { &mut *counters })
}

/// Adds `delta` (wrapping: `u64::MAX` is -1) to a per-CPU counter with one atomic instruction.
/// The TC programs run in softirq or with bottom halves off, but the `sock_ops` program also
/// runs in process context (close(), with preemption possible), where a plain
/// read-modify-write could interleave with another writer on the same CPU and lose an update.
/// A single locked add cannot be split.
#[inline(always)]
pub fn add(counter: &mut u64, delta: u64) {
    // SAFETY: a valid, aligned u64 in map memory for this program run.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta);
    }
}
