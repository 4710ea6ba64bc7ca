//! drain-agent's kernel side: a `sock_ops` program on the cgroup-v2 root that starts and ends
//! flows from the kernel's own socket state, and two `cgroup_skb` programs there (ingress and
//! egress) that keep each flow's in-flight state from its segments, with per-backend
//! aggregates of established, in-flight and idle connections. They only observe: every packet continues
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
mod backend;
mod gate;
mod lifecycle;
mod maps;
mod packet;
mod steer;
mod tracking;

use aya_ebpf::{
    macros::{cgroup_skb, sk_lookup, sock_ops, xdp},
    programs::{SkBuffContext, SkLookupContext, SockOpsContext, XdpContext},
};

/// What a `cgroup_skb` program returns to let the packet through.
const PASS: i32 = 1;

/// Client → node, at the receiving socket (cgroup-v2 root). Always lets the packet through.
#[cgroup_skb(ingress)]
pub fn drain_ingress(ctx: SkBuffContext) -> i32 {
    tracking::packet(&ctx, packet::Direction::ToServer);
    PASS
}

/// Node → client, from the sending socket.
#[cgroup_skb(egress)]
pub fn drain_egress(ctx: SkBuffContext) -> i32 {
    tracking::packet(&ctx, packet::Direction::FromServer);
    PASS
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
