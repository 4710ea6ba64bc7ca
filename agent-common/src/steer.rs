//! The same-host handover: which of a backend's two instances (the version serving now and
//! the one taking over) new connections go to, and under which counters a connection is
//! counted.
//!
//! A backend has two instance slots, 0 and 1. Its counters in `BACKEND_COUNTERS` are per
//! slot ([`counter_slot`]): a flow is stamped with the slot of the instance whose listener
//! took it, so the version being replaced is seen on its own while the new one serves.

use crate::MAX_BACKENDS;

/// Instance slots per backend.
pub const INSTANCES: u32 = 2;

/// One backend's steering (`STEERING` is an array indexed by backend index). Written by
/// userspace only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Steering {
    /// 1 while the `sk_lookup` program assigns the backend's new connections itself; 0: the
    /// kernel's own lookup (and SO_REUSEPORT's hash) decides, as without the agent.
    pub active: u32,
    /// The slot new client connections go to (and, while not active, the slot new
    /// connections are counted under: the instance serving).
    pub clients: u32,
    /// The slot connections from `probe_v4` go to: the agent's own health probes of the
    /// new version, before any client is sent there.
    pub probes: u32,
    /// The probes' IPv4 source address as the kernel stores it (network order); 0: none.
    pub probe_v4: u32,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), four u32, no padding; every bit pattern is valid.
unsafe impl aya::Pod for Steering {}

/// `STEER_SOCKETS` key of a listening socket: the local port, the address family (0 IPv4,
/// 1 IPv6) and the instance slot.
#[inline(always)]
pub fn socket_key(port: u16, ipv6: bool, instance: u32) -> u32 {
    (u32::from(port) << 16) | (u32::from(ipv6) << 8) | (instance & 1)
}

/// Index in `BACKEND_COUNTERS` of a backend's instance.
#[inline(always)]
pub fn counter_slot(backend: u32, instance: u32) -> u32 {
    backend + MAX_BACKENDS * (instance & 1)
}

/// `bpf_sk_assign` flag: the chosen socket, not SO_REUSEPORT's pick in its group (old and
/// new version listen in one group).
pub const SK_LOOKUP_F_NO_REUSEPORT: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_ports_families_and_instances_differ() {
        let keys = [
            socket_key(8774, false, 0),
            socket_key(8774, false, 1),
            socket_key(8774, true, 0),
            socket_key(8775, false, 0),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(counter_slot(3, 1), 3 + MAX_BACKENDS);
    }
}
