//! The kernel gate: per backend, whether new connections are refused, until when, and from
//! which sources they are still accepted.

/// One backend's gate (`GATES` is an array indexed by backend index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gate {
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`) until which new connections are
    /// refused; 0 = open. The XDP program compares it with the clock itself, so a gate whose
    /// agent hangs opens at this instant without anyone's help.
    pub closed_until_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), one u64, no padding; every bit pattern is valid.
unsafe impl aya::Pod for Gate {}

/// The data of a `GATE_ALLOW` LPM-trie key: the backend index (big-endian, so that it is the
/// first 32 bits the trie matches) and the source address, IPv4 stored IPv4-mapped
/// (`::ffff:a.b.c.d`) as in the flow table. An allow entry for `10.0.0.0/24` on backend 2 is
/// `{ prefix_len: 32 + 96 + 24, backend: 2, addr: ::ffff:10.0.0.0 }`; a lookup uses 160 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedSource {
    pub backend_be: [u8; 4],
    pub addr: [u8; 16],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), byte arrays only (alignment 1, no padding); every bit pattern is valid.
unsafe impl aya::Pod for AllowedSource {}

/// Bits of an `AllowedSource` key that a lookup matches: backend and whole address.
pub const ALLOW_KEY_BITS: u32 = 32 + 128;
/// Bits of the backend index in an allow key.
pub const ALLOW_BACKEND_BITS: u32 = 32;
/// Bits an IPv4 prefix is offset by inside the IPv4-mapped address (`::ffff:0:0/96`).
pub const ALLOW_V4_MAPPED_BITS: u32 = 96;
/// Most allow-list entries over all backends.
pub const MAX_ALLOWED_SOURCES: u32 = 1024;

/// One CPU's share of a backend's gate counters (`GATE_COUNTERS` is a per-CPU array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateCounters {
    /// New connections (SYN) answered with a RST while the gate was closed (total).
    pub refused: u64,
    /// New connections let through while the gate was closed because their source is in the
    /// backend's allow list (total).
    pub allowed: u64,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u64 fields, no padding; every bit pattern is valid.
unsafe impl aya::Pod for GateCounters {}

impl GateCounters {
    /// Folds the per-CPU values of one backend.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a GateCounters>) -> GateCounters {
        per_cpu
            .into_iter()
            .fold(GateCounters::default(), |acc, c| GateCounters {
                refused: acc.refused.wrapping_add(c.refused),
                allowed: acc.allowed.wrapping_add(c.allowed),
            })
    }
}
