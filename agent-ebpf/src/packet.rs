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

/// EtherTypes as loaded from the header (network byte order in a native u16).
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
/// The fragment offset bits of the IPv4 flags/offset field, as loaded (network order).
const FRAGMENT_OFFSET_MASK: u16 = 0x1fffu16.to_be();
const IPPROTO_TCP: u8 = 6;
/// Offset of the EtherType in the Ethernet header.
const ETHER_TYPE_AT: usize = 12;
/// Longest IPv4 header (IHL 15).
const IPV4_HEADER_MAX: usize = 60;
/// Every byte the parser may read: Ethernet, the longest IP header, the fixed TCP header.
pub const HEADERS_MAX: usize = EthHdr::LEN + IPV4_HEADER_MAX + TcpHdr::LEN;

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
    let data = frame.data;
    // The TCP header's offset and the IP payload length (TCP header + data; 0 when the header
    // does not say: BIG TCP/jumbograms, then the frame length is used). The addresses are read
    // only once the port is known to be watched.
    let (ipv6, tcp_at, ip_payload_len): (bool, usize, u32);
    readable(frame, EthHdr::LEN)?;
    // SAFETY (every `load` below): the bytes were checked readable just before (`readable`).
    let ether_type: u16 = unsafe { load(data + ETHER_TYPE_AT) };
    if ether_type == ETH_P_IP {
        readable(frame, EthHdr::LEN + Ipv4Hdr::LEN)?;
        let ip = data + EthHdr::LEN;
        let (version_ihl, protocol, fragment): (u8, u8, u16) =
            unsafe { (load(ip), load(ip + 9), load(ip + 6)) };
        // Non-first fragments carry no TCP header.
        if protocol != IPPROTO_TCP || fragment & FRAGMENT_OFFSET_MASK != 0 {
            return Err(Skip::NotWatched);
        }
        let header_len = usize::from(version_ihl & 0x0f) * 4; // at most 60
        if header_len < Ipv4Hdr::LEN {
            return Err(Skip::NotWatched);
        }
        let total_len = u16::from_be(unsafe { load(ip + 2) });
        ipv6 = false;
        tcp_at = EthHdr::LEN + header_len;
        ip_payload_len = u32::from(total_len).saturating_sub(header_len as u32);
    } else if ether_type == ETH_P_IPV6 {
        readable(frame, EthHdr::LEN + Ipv6Hdr::LEN)?;
        let ip = data + EthHdr::LEN;
        let next_header: u8 = unsafe { load(ip + 6) };
        if next_header != IPPROTO_TCP {
            return Err(Skip::NotWatched);
        }
        ipv6 = true;
        tcp_at = EthHdr::LEN + Ipv6Hdr::LEN;
        ip_payload_len = u32::from(u16::from_be(unsafe { load(ip + 4) }));
    } else {
        return Err(Skip::NotWatched);
    }

    // Checked through the very pointer the loads use: the verifier tracks the readable range
    // per pointer, and the TCP header's offset is variable.
    let tcp = data + tcp_at;
    if tcp + TcpHdr::LEN > frame.data_end {
        return Err(Skip::Truncated);
    }
    // Ports first: one lookup rejects a packet of an unwatched port before anything else.
    let (source, dest): (u16, u16) = unsafe { (load(tcp), load(tcp + 2)) };
    let (source, dest) = (u16::from_be(source), u16::from_be(dest));
    let (server_port, client_port) = match direction {
        Direction::ToServer => (dest, source),
        Direction::FromServer => (source, dest),
    };
    let backend = match BACKEND_BY_PORT.get(u32::from(server_port)) {
        Some(&backend) if backend != 0 => backend - 1,
        _ => return Err(Skip::NotWatched),
    };

    // Address words of the flow key, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
    let ip = data + EthHdr::LEN;
    let (source_addr, dest_addr): ([u32; 4], [u32; 4]) = if ipv6 {
        unsafe { (load(ip + 8), load(ip + 24)) }
    } else {
        unsafe { (v4_mapped(load(ip + 12)), v4_mapped(load(ip + 16))) }
    };
    let (client_addr, server_addr) = match direction {
        Direction::ToServer => (source_addr, dest_addr),
        Direction::FromServer => (dest_addr, source_addr),
    };

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
        key: flow_key(client_addr, server_addr, client_port, server_port),
        backend,
        seq: u32::from_be(seq),
        ack: u32::from_be(ack),
        flags,
        window: u16::from_be(window),
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

/// An IPv4 address (4 bytes as in the header) as the words of `::ffff:a.b.c.d`.
#[inline(always)]
fn v4_mapped(addr: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr]
}

/// The flow key from address words (bytes in network order, as loaded) and host-order ports,
/// built a word at a time.
#[inline(always)]
fn flow_key(client: [u32; 4], server: [u32; 4], client_port: u16, server_port: u16) -> FlowKey {
    let [a, b, c, d] = client;
    let [e, f, g, h] = server;
    let ports = u32::from_ne_bytes({
        let [c0, c1] = client_port.to_ne_bytes();
        let [s0, s1] = server_port.to_ne_bytes();
        [c0, c1, s0, s1]
    });
    // SAFETY: FlowKey is repr(C): two 16-byte addresses, then the client's and the server's
    // u16 port, 36 bytes without padding (layout test in drain-agent-common); any bytes are a
    // valid FlowKey.
    unsafe { core::mem::transmute::<[u32; 9], FlowKey>([a, b, c, d, e, f, g, h, ports]) }
}
