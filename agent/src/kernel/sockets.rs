//! The node's TCP socket table from /proc/net/tcp{,6} (this network namespace's).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

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
}

/// Every TCP socket (IPv4 and IPv6) in this network namespace.
pub fn tcp_sockets() -> Result<Vec<Socket>, TrackerError> {
    let read = |table: procfs::ProcResult<Vec<procfs::net::TcpNetEntry>>| {
        table.map_err(|err| TrackerError::Read {
            what: "/proc/net/tcp",
            source: Box::new(err),
        })
    };
    let mut sockets = Vec::new();
    for entry in read(procfs::net::tcp())?
        .into_iter()
        .chain(read(procfs::net::tcp6())?)
    {
        sockets.push(Socket {
            local: mapped(entry.local_address),
            remote: mapped(entry.remote_address),
            state: entry.state,
            rx_queue: entry.rx_queue,
            tx_queue: entry.tx_queue,
        });
    }
    Ok(sockets)
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
