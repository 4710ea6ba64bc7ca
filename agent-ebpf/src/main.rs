//! drain-agent's kernel side: a `sock_ops` program on the cgroup-v2 root that starts and ends
//! flows from the kernel's own socket state, and two TC classifiers (ingress and egress) that
//! keep each flow's in-flight state from its segments, with per-backend aggregates of
//! established, in-flight and idle connections. They only observe: every packet continues
//! unchanged, every socket operation proceeds. The one program that steers is the gate (XDP),
//! attached only where a backend configures one: while a backend drains, it refuses new
//! connections to its ports with a RST, until a deadline it checks itself. The other is the
//! handover's `sk_lookup` program: while a backend hands over to a new version of its service
//! on the same port, it sends new connections to the new version's listener.
#![no_std]
#![no_main]
// The BPF target offers no compare-and-swap through core::sync::atomic (it lacks 32-bit
// atomics); the intrinsics reach LLVM's 64-bit BPF_CMPXCHG/BPF_XCHG directly.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod accounting;
mod gate;
mod lifecycle;
mod maps;
mod packet;
mod steer;
mod tracking;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, sk_lookup, sock_ops, xdp},
    programs::{SkLookupContext, SockOpsContext, TcContext, XdpContext},
};

/// Client → node. `TC_ACT_UNSPEC` hands the packet to the next program (or the stack) untouched.
#[classifier]
pub fn drain_ingress(ctx: TcContext) -> i32 {
    if let Some(segment) = packet::tc_segment(&ctx, packet::Direction::ToServer) {
        tracking::from_client(&segment);
    }
    TC_ACT_UNSPEC
}

/// Node → client.
#[classifier]
pub fn drain_egress(ctx: TcContext) -> i32 {
    if let Some(segment) = packet::tc_segment(&ctx, packet::Direction::FromServer) {
        tracking::from_server(&segment);
    }
    TC_ACT_UNSPEC
}

/// The gate: a RST for a new connection to a closed backend, `XDP_PASS` for everything else.
#[xdp]
pub fn drain_gate(ctx: XdpContext) -> u32 {
    gate::handle(&ctx)
}

/// The handover's steering: assigns a new connection to the instance it belongs to while a
/// backend hands over; `SK_PASS` either way (without an assignment the kernel's own lookup).
#[sk_lookup]
pub fn drain_steer(ctx: SkLookupContext) -> u32 {
    steer::handle(&ctx)
}

/// Connection lifecycle on every TCP socket of the node (cgroup-v2 root). Returns 1: never
/// refuses anything.
#[sock_ops]
pub fn drain_sock_ops(ctx: SockOpsContext) -> u32 {
    lifecycle::handle(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
