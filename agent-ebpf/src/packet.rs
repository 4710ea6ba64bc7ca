//! Header parsing: Ethernet, then IPv4 or IPv6 (no extension headers), then TCP.

use aya_ebpf::programs::TcContext;
use drain_agent_common::flow::FlowKey;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::maps::BACKEND_BY_PORT;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
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

/// Where the TCP header starts and how long the IP payload is, plus the addresses.
struct Network {
    tcp_offset: usize,
    /// IP payload length (TCP header + data), from the IP header; 0 when the header does not
    /// say (GSO/BIG TCP), then the skb length is used.
    ip_payload_len: u32,
    src: [u8; 16],
    dst: [u8; 16],
}

#[inline(always)]
pub fn parse(ctx: &TcContext, direction: Direction) -> Option<Segment> {
    let ether_type = u16::from_be(ctx.load::<EthHdr>(0).ok()?.ether_type);
    let net = match ether_type {
        ETH_P_IP => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => return None,
    };

    // Ports first: one lookup rejects a packet of an unwatched port before anything else.
    let ports = ctx.load::<[u8; 4]>(net.tcp_offset).ok()?;
    let source = u16::from_be_bytes([ports[0], ports[1]]);
    let dest = u16::from_be_bytes([ports[2], ports[3]]);
    let (server_port, client_port) = match direction {
        Direction::ToServer => (dest, source),
        Direction::FromServer => (source, dest),
    };
    let backend = *BACKEND_BY_PORT.get(server_port as u32)?;
    if backend == 0 {
        return None;
    }

    let tcp = ctx.load::<TcpHdr>(net.tcp_offset).ok()?;
    let tcp_header_len = (tcp.doff() as u32) * 4;
    let segment_len = if net.ip_payload_len != 0 {
        net.ip_payload_len
    } else {
        ctx.len().saturating_sub(net.tcp_offset as u32)
    };
    let payload_len = segment_len.saturating_sub(tcp_header_len);
    // Byte 13 of the TCP header holds CWR..FIN; the bitfield accessors would cost more.
    let flags = ctx.load::<u8>(net.tcp_offset + 13).ok()?;

    let (client_addr, server_addr) = match direction {
        Direction::ToServer => (net.src, net.dst),
        Direction::FromServer => (net.dst, net.src),
    };
    Some(Segment {
        key: FlowKey {
            client_addr,
            server_addr,
            client_port,
            server_port,
        },
        backend: backend - 1,
        seq: u32::from_be_bytes(tcp.seq),
        ack: u32::from_be_bytes(tcp.ack_seq),
        flags,
        window: u16::from_be_bytes(tcp.window),
        payload_len,
    })
}

#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<Network> {
    let ip = ctx.load::<Ipv4Hdr>(EthHdr::LEN).ok()?;
    // Non-first fragments carry no TCP header.
    if ip.proto != IPPROTO_TCP || ip.frag_offset() != 0 {
        return None;
    }
    let header_len = ip.ihl() as u32; // already in bytes
    if header_len < 20 {
        return None;
    }
    Some(Network {
        tcp_offset: EthHdr::LEN + header_len as usize,
        ip_payload_len: (ip.tot_len() as u32).saturating_sub(header_len),
        src: v4_mapped(ip.src_addr),
        dst: v4_mapped(ip.dst_addr),
    })
}

#[inline(always)]
fn ipv6(ctx: &TcContext) -> Option<Network> {
    let ip = ctx.load::<Ipv6Hdr>(EthHdr::LEN).ok()?;
    if ip.next_hdr != IPPROTO_TCP {
        return None;
    }
    Some(Network {
        tcp_offset: EthHdr::LEN + Ipv6Hdr::LEN,
        ip_payload_len: ip.payload_len() as u32,
        src: ip.src_addr,
        dst: ip.dst_addr,
    })
}

#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}
