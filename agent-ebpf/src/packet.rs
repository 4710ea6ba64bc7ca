//! Header parsing: IPv4 or IPv6 (no extension headers), then TCP, from the network header on.
//!
//! The parser reads the packet in place (direct packet access: a bounds check against the end
//! of the readable bytes, then plain loads) over `(data, data_end)` only. Nothing on its path
//! calls a helper. Which connection a packet belongs to is not its business: the programs take
//! that from the socket the kernel attached to the packet (tracking.rs), a connection older
//! than the agent by that socket's cookie.

use aya_ebpf::programs::SkBuffContext;
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

/// The fragment offset bits of the IPv4 flags/offset field, as loaded (network order).
const FRAGMENT_OFFSET_MASK: u16 = 0x1fffu16.to_be();
const IPPROTO_TCP: u8 = 6;

/// Which way a packet travels relative to the node's server socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Arriving from a client (ingress): the destination port is the backend port.
    ToServer,
    /// Leaving towards a client (egress): the source port is the backend port.
    FromServer,
}

/// TCP flag bits as they sit in byte 13 of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The parts of a TCP segment that the tracker needs.
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// The raw (unscaled) receive window; only "zero or not" is used.
    pub window: u16,
    pub payload_len: u32,
}

impl Segment {
    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A packet as a program's context exposes it, from the network header on.
#[derive(Clone, Copy)]
pub struct Frame {
    /// Address of the first byte (the IP header).
    pub data: usize,
    /// Address just past the last byte that may be read directly.
    pub data_end: usize,
    /// The whole packet's length, which may exceed `data_end - data` when part of it is not
    /// directly readable (an skb's paged data). Only used when the IP header gives no length.
    pub len: u32,
}

/// Why a frame yields no segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not TCP over IPv4/IPv6 (or a non-first fragment): nothing to track.
    NotTcp,
    /// The headers end past `data_end`: not all of them are directly readable.
    Truncated,
}

/// Parses a packet that starts at its IP header into its TCP segment.
#[inline(always)]
pub fn parse(frame: Frame) -> Result<Segment, Skip> {
    let ip = frame.data;
    // The TCP header's offset and the IP payload length (TCP header + data; 0 when the header
    // does not say: BIG TCP/jumbograms, then the packet length is used).
    let (tcp_at, ip_payload_len): (usize, u32);
    readable(frame, Ipv4Hdr::LEN)?;
    // SAFETY (every `load` below): the bytes were checked readable just before (`readable`).
    let version_ihl: u8 = unsafe { load(ip) };
    if version_ihl >> 4 == 4 {
        let (protocol, fragment): (u8, u16) = unsafe { (load(ip + 9), load(ip + 6)) };
        // Non-first fragments carry no TCP header.
        if protocol != IPPROTO_TCP || fragment & FRAGMENT_OFFSET_MASK != 0 {
            return Err(Skip::NotTcp);
        }
        let header_len = usize::from(version_ihl & 0x0f) * 4; // at most 60
        if header_len < Ipv4Hdr::LEN {
            return Err(Skip::NotTcp);
        }
        let total_len = u16::from_be(unsafe { load(ip + 2) });
        tcp_at = header_len;
        ip_payload_len = u32::from(total_len).saturating_sub(header_len as u32);
    } else if version_ihl >> 4 == 6 {
        readable(frame, Ipv6Hdr::LEN)?;
        let next_header: u8 = unsafe { load(ip + 6) };
        if next_header != IPPROTO_TCP {
            return Err(Skip::NotTcp);
        }
        tcp_at = Ipv6Hdr::LEN;
        ip_payload_len = u32::from(u16::from_be(unsafe { load(ip + 4) }));
    } else {
        return Err(Skip::NotTcp);
    }

    let tcp = header_at(ip, tcp_at);
    if tcp + TcpHdr::LEN > frame.data_end {
        return Err(Skip::Truncated);
    }
    // Byte 12 holds the data offset, byte 13 CWR..FIN.
    let (seq, ack, offset_byte, flags, window): (u32, u32, u8, u8, u16) = unsafe {
        (
            load(tcp + 4),
            load(tcp + 8),
            load(tcp + 12),
            load(tcp + 13),
            load(tcp + 14),
        )
    };
    let tcp_header_len = u32::from(offset_byte >> 4) * 4;
    let segment_len = if ip_payload_len != 0 {
        ip_payload_len
    } else {
        frame.len.saturating_sub(tcp_at as u32)
    };
    Ok(Segment {
        seq: u32::from_be(seq),
        ack: u32::from_be(ack),
        flags,
        window: u16::from_be(window),
        // From the IP header, not the frame: padding on short frames is not data.
        payload_len: segment_len.saturating_sub(tcp_header_len),
    })
}

/// The packet of a `cgroup_skb` program: the kernel hands it over from the network header on.
/// The TCP stack has the IP and TCP headers in the skb's linear part at both hooks (it pulled
/// them to find the socket on the way in, and built them there on the way out), so they are
/// directly readable.
#[inline(always)]
pub fn skb_frame(ctx: &SkBuffContext) -> Frame {
    let skb = ctx.skb.skb;
    // SAFETY: context fields of this program run.
    unsafe {
        Frame {
            data: (*skb).data as usize,
            data_end: (*skb).data_end as usize,
            len: (*skb).len,
        }
    }
}

/// The address of a header at a variable offset, opaque to the compiler. The verifier tracks
/// the readable range per pointer, so the bounds check must be made through the very pointer
/// the loads use; left to itself, LLVM reassociates `ip + offset + 20` into
/// `(ip + 20) + offset` for the check (or merges two checks into one), and the verifier then
/// knows nothing about the pointer the loads go through.
#[inline(always)]
fn header_at(ip: usize, offset: usize) -> usize {
    core::hint::black_box(ip + offset)
}

/// Fails unless the frame's first `len` bytes are directly readable: the check the verifier
/// requires before any load from the packet.
#[inline(always)]
fn readable(frame: Frame, len: usize) -> Result<(), Skip> {
    if frame.data + len > frame.data_end {
        return Err(Skip::Truncated);
    }
    Ok(())
}

/// One load of a `T` from the packet, as the header's bytes sit in memory (network order).
///
/// # Safety
/// `at .. at + size_of::<T>()` lies inside the frame's readable bytes. The load is a plain
/// (aligned-typed) one on purpose: LLVM's BPF backend splits an unaligned-typed load into
/// single bytes, several times the instructions. Packet headers sit at any 2-byte boundary,
/// and the verifier accepts such loads from packets wherever the architecture has efficient
/// unaligned access (x86-64, arm64), as for every C program that reads `iph->saddr`; on a
/// strict-alignment architecture it refuses the program at load time, never at run time.
#[inline(always)]
unsafe fn load<T: Copy>(at: usize) -> T {
    // SAFETY: the caller's; see above for the alignment. Not volatile: the compiler may then
    // move a load to where its value is needed (past the port check).
    unsafe { core::ptr::read(at as *const T) }
}
