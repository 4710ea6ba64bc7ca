//! The handover's steering (`sk_lookup`, docs/handover.md): while a backend hands over from
//! one version of its service to the next on the same port, the kernel's listener lookup for
//! a new connection to the backend's addresses and ports asks this program first. It assigns the
//! connection to the listening socket of the instance it should go to — the agent's own
//! probes to the new version, clients to the serving one — bypassing SO_REUSEPORT's hash
//! over the two versions' listeners. Established connections never come here: they stay
//! with the process that accepted them.
//!
//! Inactive (no handover running), or without a socket for the slot, it passes: the
//! kernel's lookup decides as it would without the agent, which is also what happens when
//! the agent dies (the program is attached as a link and goes with it).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{bindings::sk_action::SK_PASS, programs::SkLookupContext};
use drain_agent_common::{
    flow::FlowKey,
    steer::{SK_LOOKUP_F_NO_REUSEPORT, socket_key},
};

use crate::{
    backend,
    lifecycle::{v4_mapped, v6},
    maps::{STEER_SOCKETS, STEERED, STEERING},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

/// Assigns a new connection to a watched, steered port to the instance it belongs to.
#[inline(always)]
pub fn handle(ctx: &SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY (all context reads): `lookup` is the program's context, valid for this run;
    // one load per field at a constant offset.
    let (protocol, port) = unsafe {
        (
            read_volatile(addr_of!((*lookup).protocol)),
            read_volatile(addr_of!((*lookup).local_port)),
        )
    };
    if protocol != IPPROTO_TCP || port > 0xffff {
        return SK_PASS;
    }
    let Some(watched) = backend::watched_port(port) else {
        return SK_PASS;
    };
    // SAFETY: as above.
    let (family, remote4, local4, remote_port) = unsafe {
        (
            read_volatile(addr_of!((*lookup).family)),
            read_volatile(addr_of!((*lookup).remote_ip4)),
            read_volatile(addr_of!((*lookup).local_ip4)),
            read_volatile(addr_of!((*lookup).remote_port)),
        )
    };
    let ipv6 = match family {
        AF_INET => false,
        AF_INET6 => true,
        _ => return SK_PASS,
    };
    let (client_addr, server_addr) = if ipv6 {
        // SAFETY: as above.
        let (remote6, local6) = unsafe {
            (
                [
                    read_volatile(addr_of!((*lookup).remote_ip6[0])),
                    read_volatile(addr_of!((*lookup).remote_ip6[1])),
                    read_volatile(addr_of!((*lookup).remote_ip6[2])),
                    read_volatile(addr_of!((*lookup).remote_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*lookup).local_ip6[0])),
                    read_volatile(addr_of!((*lookup).local_ip6[1])),
                    read_volatile(addr_of!((*lookup).local_ip6[2])),
                    read_volatile(addr_of!((*lookup).local_ip6[3])),
                ],
            )
        };
        (v6(remote6), v6(local6))
    } else {
        (v4_mapped(remote4), v4_mapped(local4))
    };
    // Only the backend's own addresses: a connection to another listener on the port
    // (HAProxy's frontend on the VIP) goes where the kernel's lookup sends it.
    let Some(backend) = backend::serving(watched, server_addr, port as u16) else {
        return SK_PASS;
    };
    let Some(steering) = STEERING.get(backend) else {
        return SK_PASS;
    };
    if steering.active == 0 {
        return SK_PASS;
    }
    let instance = if !ipv6 && steering.probe_v4 != 0 && remote4 == steering.probe_v4 {
        steering.probes
    } else {
        steering.clients
    };
    let assign = |ipv6| {
        STEER_SOCKETS
            .redirect_sk_lookup(
                ctx,
                socket_key(port as u16, ipv6, instance),
                SK_LOOKUP_F_NO_REUSEPORT,
            )
            .is_ok()
    };
    // An IPv4 connection may go to a dual-stack IPv6 listener (`[::]:PORT`, the usual one).
    if !assign(ipv6) && (ipv6 || !assign(true)) {
        // No socket for the slot (its process closed it): the kernel's own lookup.
        return SK_PASS;
    }
    // Remembered for the handshake's end, where the flow is created and counted.
    let key = FlowKey {
        client_addr,
        server_addr,
        client_port: u16::from_be(remote_port),
        server_port: port as u16,
    };
    let _ = STEERED.insert(key, instance, 0);
    SK_PASS
}
