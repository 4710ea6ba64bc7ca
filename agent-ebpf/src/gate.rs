//! The kernel gate (XDP): while a backend's gate is closed, a new connection (a SYN without
//! ACK) addressed to the backend on this node — one of its listen addresses, or for a backend
//! on every address one of the node's own — from a source outside its allow list is answered
//! with a RST built here and sent back out of the same interface (`XDP_TX`). A SYN to another
//! address on the port (HAProxy's frontend on the VIP, or traffic the node forwards to another
//! host) passes. The frame may carry 802.1Q or 802.1ad tags (up to two): they are parsed past,
//! and kept in the answer. The client's `connect` fails at
//! once with "connection refused", and HAProxy with `option redispatch` retries another server
//! at once; a dropped SYN would cost the client a retransmission (1 s or more) instead.
//!
//! Everything else passes untouched, and the common case costs the least: a segment that is
//! not a bare SYN (every packet of an established connection) leaves after three header
//! reads, before any map lookup.

use core::{mem::size_of, ptr};

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use drain_agent_common::gate::{ALLOW_KEY_BITS, AllowedSource};

use crate::{
    backend,
    maps::{GATE_ALLOW, GATE_COUNTERS, GATE_LOGGED_AT, GATES},
};

/// The MAC addresses, before the first EtherType (or VLAN tag protocol identifier).
const MACS_LEN: usize = 12;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// A VLAN tag: its protocol identifier and its control information.
const VLAN_TAG_LEN: usize = 4;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// At most one refusal is logged per CPU in this many nanoseconds (aya-log, debug level).
const LOG_EVERY_NS: u64 = 1_000_000_000;

/// What the answer to a refused SYN needs from it.
struct Syn {
    v6: bool,
    /// Where the network header starts: past the MACs, any VLAN tags and the EtherType.
    l3: usize,
    /// Source and destination addresses; IPv4 IPv4-mapped (`::ffff:a.b.c.d`).
    src: [u8; 16],
    dst: [u8; 16],
    src_port: [u8; 2],
    dst_port: [u8; 2],
    /// The SYN's sequence number plus what it occupies (SYN flag and any data): the RST's
    /// acknowledgement number.
    ack: u32,
    port: u16,
    backend: u32,
}

#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `at` checked that the bytes lie inside the packet.
    at::<T>(ctx, offset).map(|p| unsafe { ptr::read_unaligned(p) })
}

/// The frame's EtherType and where its network header starts, past up to two VLAN tags
/// (802.1ad outside 802.1Q, or either alone). A tag the NIC took off the frame before XDP
/// ran is not here: userspace does not attach the gate where that can happen (gate.rs).
#[inline(always)]
fn network_header(ctx: &XdpContext) -> Option<(u16, usize)> {
    let tagged = |ether_type| ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD;
    let mut at = MACS_LEN;
    let mut ether_type = u16::from_be_bytes(read::<[u8; 2]>(ctx, at)?);
    if tagged(ether_type) {
        at += VLAN_TAG_LEN;
        ether_type = u16::from_be_bytes(read::<[u8; 2]>(ctx, at)?);
        if tagged(ether_type) {
            at += VLAN_TAG_LEN;
            ether_type = u16::from_be_bytes(read::<[u8; 2]>(ctx, at)?);
        }
    }
    Some((ether_type, at + 2))
}

/// The XDP verdict for one frame.
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    match refused(ctx) {
        Some(syn) => answer_with_reset(ctx, &syn),
        None => XDP_PASS,
    }
}

/// The SYN to refuse, if this frame is one: a bare SYN to a backend port whose gate is closed
/// and not yet expired, from a source outside the backend's allow list.
#[inline(always)]
fn refused(ctx: &XdpContext) -> Option<Syn> {
    let (ether_type, l3) = network_header(ctx)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (v6, tcp_offset, segment_len) = match ether_type {
        ETH_P_IP => {
            let ip = read::<[u8; IPV4_LEN]>(ctx, l3)?;
            // Non-first fragments carry no TCP header.
            if ip[9] != IPPROTO_TCP || (u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff) != 0 {
                return None;
            }
            let header_len = ((ip[0] & 0x0f) as usize) * 4;
            if header_len < IPV4_LEN {
                return None;
            }
            // IPv4-mapped, as the backend's addresses are stored.
            src[10] = 0xff;
            src[11] = 0xff;
            src[12..].copy_from_slice(&ip[12..16]);
            dst[10] = 0xff;
            dst[11] = 0xff;
            dst[12..].copy_from_slice(&ip[16..20]);
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            (false, l3 + header_len, total.saturating_sub(header_len))
        }
        ETH_P_IPV6 => {
            let ip = read::<[u8; IPV6_LEN]>(ctx, l3)?;
            // Extension headers are not followed: such a SYN passes.
            if ip[6] != IPPROTO_TCP {
                return None;
            }
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            (
                true,
                l3 + IPV6_LEN,
                u16::from_be_bytes([ip[4], ip[5]]) as usize,
            )
        }
        _ => return None,
    };
    let tcp = read::<[u8; TCP_LEN]>(ctx, tcp_offset)?;
    // The common path ends here: anything but a bare SYN belongs to a connection that exists
    // (or to none), and the gate never touches those.
    if tcp[13] & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return None;
    }
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    backend::watched_port(u32::from(port))?;
    // Addressed to the backend on this node: not to another listener on the port, nor to a
    // host behind this one.
    let backend = backend::addressed(dst, port)?;
    let closed_until = GATES.get(backend)?.closed_until_ns;
    // SAFETY: a helper without arguments.
    if closed_until == 0 || unsafe { bpf_ktime_get_ns() } >= closed_until {
        return None;
    }
    let counters = GATE_COUNTERS.get_ptr_mut(backend)?;
    let source = AllowedSource {
        backend_be: backend.to_be_bytes(),
        addr: src,
    };
    if GATE_ALLOW.get(Key::new(ALLOW_KEY_BITS, source)).is_some() {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { (*counters).allowed += 1 };
        return None;
    }
    // SAFETY: as above.
    unsafe { (*counters).refused += 1 };
    let data_len = segment_len.saturating_sub(((tcp[12] >> 4) as usize) * 4);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Some(Syn {
        v6,
        l3,
        src,
        dst,
        src_port: [tcp[0], tcp[1]],
        dst_port: [tcp[2], tcp[3]],
        ack: seq.wrapping_add(1).wrapping_add(data_len as u32),
        port,
        backend,
    })
}

/// Turns the frame into the RST that answers `syn` (as the kernel's own reset for a closed
/// port would: sequence 0, acknowledging the SYN) and sends it back. A frame that cannot be
/// rewritten passes: the gate fails open.
#[inline(always)]
fn answer_with_reset(ctx: &XdpContext, syn: &Syn) -> u32 {
    let Some(macs) = read::<[u8; 12]>(ctx, 0) else {
        return XDP_PASS;
    };
    let ip_len = if syn.v6 { IPV6_LEN } else { IPV4_LEN };
    // The link header as it came, tags included: the answer leaves on the same VLAN.
    let reply_len = syn.l3 + ip_len + TCP_LEN;
    let delta = reply_len as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the helper takes the program's own context; delta only shrinks the frame.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return XDP_PASS;
    }

    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..].copy_from_slice(&macs[..6]);
    let mut tcp = [0u8; TCP_LEN];
    tcp[0..2].copy_from_slice(&syn.dst_port);
    tcp[2..4].copy_from_slice(&syn.src_port);
    // Sequence 0 (bytes 4..8), then the acknowledgement of everything the SYN occupied.
    tcp[8..12].copy_from_slice(&syn.ack.to_be_bytes());
    tcp[12] = ((TCP_LEN / 4) as u8) << 4;
    tcp[13] = TCP_RST | TCP_ACK;

    let written = if syn.v6 {
        let mut ip = [0u8; IPV6_LEN];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
        ip[6] = IPPROTO_TCP;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&syn.dst);
        ip[24..40].copy_from_slice(&syn.src);
        let mut sum = add_words(0, &ip[8..40]);
        sum += TCP_LEN as u32 + IPPROTO_TCP as u32;
        sum = add_words(sum, &tcp);
        tcp[16..18].copy_from_slice(&fold(sum).to_be_bytes());
        write(ctx, syn.l3, ip) && write(ctx, syn.l3 + IPV6_LEN, tcp)
    } else {
        let mut ip = [0u8; IPV4_LEN];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((IPV4_LEN + TCP_LEN) as u16).to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&syn.dst[12..]);
        ip[16..20].copy_from_slice(&syn.src[12..]);
        let checksum = fold(add_words(0, &ip));
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        let mut sum = add_words(0, &ip[12..20]);
        sum += TCP_LEN as u32 + IPPROTO_TCP as u32;
        sum = add_words(sum, &tcp);
        tcp[16..18].copy_from_slice(&fold(sum).to_be_bytes());
        write(ctx, syn.l3, ip) && write(ctx, syn.l3 + IPV4_LEN, tcp)
    };
    if !(written && write(ctx, 0, eth)) {
        // The frame was shrunk but could not be rewritten: drop rather than hand the stack a
        // truncated SYN. Only a frame shorter than its own headers said gets here.
        return aya_ebpf::bindings::xdp_action::XDP_DROP;
    }
    log_refusal(ctx, syn);
    XDP_TX
}

#[inline(always)]
fn write<const N: usize>(ctx: &XdpContext, offset: usize, bytes: [u8; N]) -> bool {
    match at::<[u8; N]>(ctx, offset) {
        // SAFETY: `at` checked that the bytes lie inside the packet.
        Some(p) => {
            unsafe { ptr::write_unaligned(p, bytes) };
            true
        }
        None => false,
    }
}

/// One's-complement sum of big-endian 16-bit words (an even number of bytes).
#[inline(always)]
fn add_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A refusal at debug level, at most once a second per CPU: a closed gate under a flood of
/// SYNs must not turn into a flood of log lines.
#[inline(always)]
fn log_refusal(ctx: &XdpContext, syn: &Syn) {
    let Some(last) = GATE_LOGGED_AT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a helper without arguments; this CPU's own slot of a per-CPU array.
    unsafe {
        let now = bpf_ktime_get_ns();
        if now.wrapping_sub(*last) < LOG_EVERY_NS {
            return;
        }
        *last = now;
    }
    debug!(
        ctx,
        "gate closed: refused a new connection to port {} (backend index {})",
        syn.port,
        syn.backend
    );
}
