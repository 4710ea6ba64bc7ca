//! The node's TCP socket table from `sock_diag` (this network namespace's): what
//! /proc/net/tcp{,6} shows, plus each socket's cookie, which keys the flows of connections
//! older than the agent in the kernel (docs/accounting.md).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::{
    Socket as NetlinkSocket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG,
};
use procfs::net::TcpState;

use super::TrackerError;

/// One TCP socket, addresses normalised to IPv6 (IPv4 as IPv4-mapped) so that both tables
/// compare with the flow keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// Bytes received and not yet read by the application (an unread request).
    pub rx_queue: u32,
    /// Bytes sent and not yet acknowledged (or not yet sent).
    pub tx_queue: u32,
    /// The kernel's cookie of the socket (`bpf_get_socket_cookie`): unique on the host for
    /// the socket's lifetime.
    pub cookie: u64,
}

/// Every TCP socket (IPv4 and IPv6) in this network namespace.
pub fn tcp_sockets() -> Result<Vec<Socket>, TrackerError> {
    let read_error = |err: std::io::Error| TrackerError::Read {
        what: "the socket table (sock_diag; module tcp_diag)",
        source: Box::new(err),
    };
    if injected_failure() {
        return Err(read_error(std::io::Error::other(
            "failure injected by DRAIN_AGENT_TEST_FAIL_SOCKET_READS",
        )));
    }
    let mut socket = NetlinkSocket::new(NETLINK_SOCK_DIAG).map_err(read_error)?;
    socket.bind_auto().map_err(read_error)?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(read_error)?;
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(&socket, family, &mut sockets).map_err(read_error)?;
    }
    Ok(sockets)
}

/// Tests only: the first N reads of the socket table fail
/// (`DRAIN_AGENT_TEST_FAIL_SOCKET_READS=N`), as they would without the `tcp_diag` module.
fn injected_failure() -> bool {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    };
    static LEFT: OnceLock<AtomicU32> = OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicU32::new(
            std::env::var("DRAIN_AGENT_TEST_FAIL_SOCKET_READS")
                .ok()
                .and_then(|count| count.parse().ok())
                .unwrap_or(0),
        )
    });
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
        left.checked_sub(1)
    })
    .is_ok()
}

/// One family's TCP sockets, every state, appended to `out`.
fn dump(socket: &NetlinkSocket, family: u8, out: &mut Vec<Socket>) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let invalid = |err: netlink_packet_core::DecodeError| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err.to_string())
    };
    let mut buffer = vec![0; 256 * 1024];
    loop {
        let received = socket.recv(&mut &mut buffer[..], 0)?;
        let mut at = 0;
        while at < received {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[at..received])
                .map_err(invalid)?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    if let Some(socket) = from_response(&response) {
                        out.push(socket);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(err) => {
                    return Err(err
                        .code
                        .map(|code| std::io::Error::from_raw_os_error(-code.get()))
                        .unwrap_or_else(|| std::io::Error::other("sock_diag dump failed")));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            // Messages are 4-byte aligned in the buffer.
            at += (length + 3) & !3;
        }
    }
}

fn from_response(response: &InetResponse) -> Option<Socket> {
    let header = &response.header;
    let id = &header.socket_id;
    Some(Socket {
        local: mapped(SocketAddr::new(id.source_address, id.source_port)),
        remote: mapped(SocketAddr::new(id.destination_address, id.destination_port)),
        state: TcpState::from_u8(header.state)?,
        rx_queue: header.recv_queue,
        tx_queue: header.send_queue,
        // Two host-order u32 words, low word first (sock_diag_save_cookie).
        cookie: {
            let [a, b, c, d, e, f, g, h] = id.cookie;
            u64::from(u32::from_ne_bytes([a, b, c, d]))
                | u64::from(u32::from_ne_bytes([e, f, g, h])) << 32
        },
    })
}

/// IPv4 addresses as IPv4-mapped IPv6, the way flow keys hold them.
pub fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// A socket address as flow-table bytes (16 bytes, IPv4-mapped for IPv4) and port.
pub fn to_flow_bytes(addr: SocketAddr) -> ([u8; 16], u16) {
    let IpAddr::V6(v6) = mapped(addr).ip() else {
        unreachable!("mapped() returns IPv6");
    };
    (v6.octets(), addr.port())
}

/// A flow-table address (16 bytes, IPv4-mapped for IPv4) as a socket address.
pub fn from_flow_bytes(addr: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(addr)), port)
}

/// Whether a socket in this state still holds a connection the tracker should know.
pub fn is_connected(state: &TcpState) -> bool {
    matches!(
        state,
        TcpState::Established
            | TcpState::SynRecv
            | TcpState::FinWait1
            | TcpState::FinWait2
            | TcpState::CloseWait
            | TcpState::Closing
            | TcpState::LastAck
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped_like_the_flow_table() {
        let v4: SocketAddr = "10.0.0.1:8774".parse().unwrap();
        let flow = from_flow_bytes(
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1],
            8774,
        );
        assert_eq!(mapped(v4), flow);
        assert_eq!(from_flow_bytes(to_flow_bytes(v4).0, 8774), flow);
    }
}
