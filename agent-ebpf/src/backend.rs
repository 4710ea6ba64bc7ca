//! Which backend a connection's local address and port belong to
//! (`drain_agent_common::backend`): a port array lookup, and for a backend bound to given
//! addresses one hash lookup more — made once per connection (its handshake, its listener
//! lookup, its SYN at a closed gate), never per packet.

use drain_agent_common::backend::{ADDRESS_BOUND, ServiceAddress, backend_index};

use crate::maps::{BACKEND_ADDRESSES, BACKEND_BY_PORT};

/// The `BACKEND_BY_PORT` value of a local port, if a backend watches it (on some address).
#[inline(always)]
pub fn watched_port(port: u32) -> Option<u32> {
    let value = *BACKEND_BY_PORT.get(port)?;
    backend_index(value).map(|_| value)
}

/// The backend index of local `(addr, port)`, given the port's `watched_port` value: the
/// port's backend when it listens on every address, otherwise the one `BACKEND_ADDRESSES`
/// names for exactly this address.
#[inline(always)]
pub fn serving(value: u32, addr: [u8; 16], port: u16) -> Option<u32> {
    if value & ADDRESS_BOUND == 0 {
        return backend_index(value);
    }
    addressed(addr, port)
}

/// The backend `BACKEND_ADDRESSES` holds for `(addr, port)`: an address-bound backend's
/// listen address, or the node's own address on another backend's port. The gate's test of
/// "addressed to the backend on this node".
#[inline(always)]
pub fn addressed(addr: [u8; 16], port: u16) -> Option<u32> {
    let key = ServiceAddress {
        addr,
        port,
        padding: [0; 2],
    };
    let value = BACKEND_ADDRESSES.get_ptr(key)?;
    // SAFETY: the pointer comes from a successful lookup and is valid for this program run.
    backend_index(unsafe { *value })
}
