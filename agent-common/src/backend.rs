//! Which backend a local address and port belong to. A backend is its service's listening
//! addresses (`listen = ["10.0.0.5:8774"]`), or a port on every address (`ports = [8774]`):
//! on a node where HAProxy's frontend listens on `VIP:8774` beside nova-api on
//! `10.0.0.5:8774`, only the second is the backend's.

/// `BACKEND_BY_PORT` value bit: the port's backend listens on given addresses only, so a
/// connection is the backend's only if `BACKEND_ADDRESSES` holds its local (address, port).
/// Without it, every address of the node on that port is the backend's.
pub const ADDRESS_BOUND: u32 = 1 << 31;

/// The backend index of a `BACKEND_BY_PORT` value (0: no backend), whatever its flag.
#[inline(always)]
pub fn backend_index(value: u32) -> Option<u32> {
    match value & !ADDRESS_BOUND {
        0 => None,
        plus_one => Some(plus_one - 1),
    }
}

/// A `BACKEND_ADDRESSES` key: a local address (IPv4 stored IPv4-mapped, as in `FlowKey`) and
/// port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceAddress {
    pub addr: [u8; 16],
    pub port: u16,
    /// Explicit padding (the struct's alignment is 2; kept zero so keys compare whole).
    pub padding: [u8; 2],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), byte arrays and a u16 at an even offset, explicit padding; every bit
// pattern is valid.
unsafe impl aya::Pod for ServiceAddress {}

/// Most entries of `BACKEND_ADDRESSES`: the listen addresses of address-bound backends, and
/// for the gate of the others, the node's own addresses on their ports.
pub const MAX_SERVICE_ADDRESSES: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_value_names_its_backend_with_or_without_the_address_flag() {
        assert_eq!(backend_index(0), None);
        assert_eq!(backend_index(ADDRESS_BOUND), None);
        assert_eq!(backend_index(3), Some(2));
        assert_eq!(backend_index(3 | ADDRESS_BOUND), Some(2));
        assert_eq!(core::mem::size_of::<ServiceAddress>(), 20);
    }
}
