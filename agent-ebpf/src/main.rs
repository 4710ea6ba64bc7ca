//! drain-agent's kernel side: two TC classifiers (ingress and egress) that keep a flow table of
//! connections to the configured backend ports and per-backend aggregates of established,
//! in-flight and idle connections. They only observe: every packet continues unchanged.
#![no_std]
#![no_main]
// The BPF target offers no compare-and-swap through core::sync::atomic (it lacks 32-bit
// atomics); the intrinsics reach LLVM's 64-bit BPF_CMPXCHG/BPF_XCHG directly.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod maps;
mod packet;
mod tracking;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

/// Client → node. `TC_ACT_UNSPEC` hands the packet to the next program (or the stack) untouched.
#[classifier]
pub fn drain_ingress(ctx: TcContext) -> i32 {
    if let Some(segment) = packet::parse(&ctx, packet::Direction::ToServer) {
        tracking::from_client(&segment);
    }
    TC_ACT_UNSPEC
}

/// Node → client.
#[classifier]
pub fn drain_egress(ctx: TcContext) -> i32 {
    if let Some(segment) = packet::parse(&ctx, packet::Direction::FromServer) {
        tracking::from_server(&segment);
    }
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
