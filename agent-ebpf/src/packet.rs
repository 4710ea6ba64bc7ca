//! Header parsing: Ethernet, then IPv4 or IPv6 (no extension headers), then TCP.
//!
//! The parser reads the frame in place (direct packet access: a bounds check against the end
//! of the readable bytes, then plain loads) over `(data, data_end)` only, so every program
//! type that exposes its packet that way — the TC classifiers here, an XDP program — shares
//! it. Nothing on the common path calls a helper: the one port lookup is an array lookup the
//! verifier inlines into a load.

use aya_ebpf::programs::TcContext;
use drain_agent_common::flow::FlowKey;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::maps::BACKEND_BY_PORT;

const ETH_P_IP: [u8; 2] = 0x0800u16.to_be_bytes();
const ETH_P_IPV6: [u8; 2] = 0x86ddu16.to_be_bytes();
const IPPROTO_TCP: u8 = 6;
/// Offset of the EtherType in the Ethernet header.
const ETHER_TYPE_AT: usize = 12;
/// Longest IPv4 header (IHL 15).
const IPV4_HEADER_MAX: usize = 60;
/// Every byte the parser may read: Ethernet, the longest IP header, the fixed TCP header.
pub const HEADERS_MAX: usize = EthHdr::LEN + IPV4_HEADER_MAX + TcpHdr::LEN;

// The header types are read through references into the packet, which need not be aligned:
// only byte-array fields (alignment 1) make that sound.
const _: () =
    assert!(align_of::<Ipv4Hdr>() == 1 && align_of::<Ipv6Hdr>() == 1 && align_of::<TcpHdr>() == 1);

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

/// The parts of a TCP segment to a watched port that the tracker needs.
pub struct Segment {
    pub key: FlowKey,
    /// Backend index (already looked up from the local port).
    pub backend: u32,
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

/// A frame as a program's context exposes it.
#[derive(Clone, Copy)]
pub struct Frame {
    /// Address of the first byte (the Ethernet header).
    pub data: usize,
    /// Address just past the last byte that may be read directly.
    pub data_end: usize,
    /// The whole frame's length, which may exceed `data_end - data` when part of it is not
    /// directly readable (an skb's paged data). Only used when the IP header gives no length.
    pub len: u32,
}

/// Why a frame yields no segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not TCP over IPv4/IPv6, or not to or from a watched port: nothing to track.
    NotWatched,
    /// The headers end past `data_end`: not all of them are directly readable.
    Truncated,
}

/// Parses a frame into the segment of a watched port. The port is checked before anything
/// else is read: a packet of an unwatched port costs the Ethernet and IP headers, the ports
/// and one array lookup.
#[inline(always)]
pub fn parse(frame: Frame, direction: Direction) -> Result<Segment, Skip> {
    let ether_type: &[u8; 2] = at(frame, ETHER_TYPE_AT)?;
    // The TCP header's offset, the IP payload length (TCP header + data; 0 when the header
    // does not say: BIG TCP/jumbograms, then the frame length is used) and the addresses.
    let (tcp_at, ip_payload_len, source_addr, dest_addr) = if *ether_type == ETH_P_IP {
        let ip: &Ipv4Hdr = at(frame, EthHdr::LEN)?;
        // Non-first fragments carry no TCP header.
        if ip.proto != IPPROTO_TCP || ip.frag_offset() != 0 {
            return Err(Skip::NotWatched);
        }
        let header_len = usize::from(ip.ihl()); // in bytes, at most 60
        if header_len < Ipv4Hdr::LEN {
            return Err(Skip::NotWatched);
        }
        (
            EthHdr::LEN + header_len,
            u32::from(ip.tot_len()).saturating_sub(header_len as u32),
            v4_mapped(ip.src_addr),
            v4_mapped(ip.dst_addr),
        )
    } else if *ether_type == ETH_P_IPV6 {
        let ip: &Ipv6Hdr = at(frame, EthHdr::LEN)?;
        if ip.next_hdr != IPPROTO_TCP {
            return Err(Skip::NotWatched);
        }
        (
            EthHdr::LEN + Ipv6Hdr::LEN,
            u32::from(u16::from_be_bytes(ip.payload_len)),
            ip.src_addr,
            ip.dst_addr,
        )
    } else {
        return Err(Skip::NotWatched);
    };

    let tcp: &TcpHdr = at(frame, tcp_at)?;
    // Ports first: one lookup rejects a packet of an unwatched port before anything else.
    let source = u16::from_be_bytes(tcp.source);
    let dest = u16::from_be_bytes(tcp.dest);
    let (server_port, client_port, client_addr, server_addr) = match direction {
        Direction::ToServer => (dest, source, source_addr, dest_addr),
        Direction::FromServer => (source, dest, dest_addr, source_addr),
    };
    let backend = match BACKEND_BY_PORT.get(u32::from(server_port)) {
        Some(&backend) if backend != 0 => backend - 1,
        _ => return Err(Skip::NotWatched),
    };

    // SAFETY: `at` checked that the whole fixed header (20 bytes) is readable; bytes 12 and
    // 13 hold the data offset and CWR..FIN (the bitfield accessors would cost more).
    let (offset_byte, flags) = unsafe {
        let header = (tcp as *const TcpHdr).cast::<u8>();
        (*header.add(12), *header.add(13))
    };
    let tcp_header_len = u32::from(offset_byte >> 4) * 4;
    let segment_len = if ip_payload_len != 0 {
        ip_payload_len
    } else {
        frame.len.saturating_sub(tcp_at as u32)
    };
    Ok(Segment {
        key: FlowKey {
            client_addr,
            server_addr,
            client_port,
            server_port,
        },
        backend,
        seq: u32::from_be_bytes(tcp.seq),
        ack: u32::from_be_bytes(tcp.ack_seq),
        flags,
        window: u16::from_be_bytes(tcp.window),
        // From the IP header, not the frame: Ethernet padding on short frames is not data.
        payload_len: segment_len.saturating_sub(tcp_header_len),
    })
}

/// The segment of a TC program's packet. TC exposes only the skb's linear part directly;
/// the stack builds TCP/IP headers there (its own segments, and received ones after GRO or
/// veth's copy), so the first parse almost always succeeds. When the headers are not all in
/// the linear part (a driver that puts everything in pages), `bpf_skb_pull_data` moves them
/// there and the frame is parsed again — the same parser, so the same accuracy, paid only by
/// such packets. Pulling never changes the packet's bytes.
#[inline(always)]
pub fn tc_segment(ctx: &TcContext, direction: Direction) -> Option<Segment> {
    match parse(tc_frame(ctx), direction) {
        Ok(segment) => Some(segment),
        Err(Skip::NotWatched) => None,
        Err(Skip::Truncated) => {
            let len = ctx.len();
            ctx.pull_data(len.min(HEADERS_MAX as u32)).ok()?;
            // The pull invalidated every packet pointer: take them again.
            parse(tc_frame(ctx), direction).ok()
        }
    }
}

#[inline(always)]
fn tc_frame(ctx: &TcContext) -> Frame {
    Frame {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.len(),
    }
}

/// A `T` at `offset` in the frame, if all of it is directly readable.
#[inline(always)]
fn at<T>(frame: Frame, offset: usize) -> Result<&'static T, Skip> {
    let start = frame.data + offset;
    if start + size_of::<T>() > frame.data_end {
        return Err(Skip::Truncated);
    }
    // SAFETY: the bytes lie inside the packet (checked just above, the check the verifier
    // requires) and stay valid for this program run; `T` has alignment 1 (asserted above).
    Ok(unsafe { &*(start as *const T) })
}

#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}
