//! Which backend a local address and port belong to, as the kernel programs look it up:
//! `BACKEND_BY_PORT` (each watched port, flagged when its backend listens on given addresses
//! only) and `BACKEND_ADDRESSES` (those addresses; and, for the gate of a backend on every
//! address, the node's own addresses on its ports, so that a closed gate never refuses traffic
//! the node forwards to another host).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use drain_agent_common::{
    backend::{ADDRESS_BOUND, ServiceAddress},
    names,
};

use super::{
    TrackerError,
    ebpf::{load_error, map_mut, read_error},
};
use crate::config::Config;

/// Fills both maps for `config`'s backends: ports, and the listen addresses of the
/// address-bound ones.
pub fn load(ebpf: &mut Ebpf, config: &Config) -> Result<(), TrackerError> {
    {
        let mut ports: Array<&mut MapData, u32> =
            Array::try_from(map_mut(ebpf, names::BACKEND_BY_PORT)?).map_err(load_error)?;
        for (index, backend) in config.backends.iter().enumerate() {
            let flag = if backend.address_bound() {
                ADDRESS_BOUND
            } else {
                0
            };
            for &port in &backend.ports {
                ports
                    .set(u32::from(port), (index as u32 + 1) | flag, 0)
                    .map_err(load_error)?;
            }
        }
    }
    let mut addresses = addresses(ebpf)?;
    for (index, backend) in config.backends.iter().enumerate() {
        for listen in &backend.listen {
            if let Some(addr) = listen.addr {
                addresses
                    .insert(key(addr, listen.port), index as u32 + 1, 0)
                    .map_err(load_error)?;
            }
        }
    }
    Ok(())
}

/// The node's own addresses on the ports of backend `index` when it listens on every
/// address: what its gate may refuse. Re-read each time the gate closes (addresses come and
/// go: a VIP moves); `written` holds what the last call inserted, and what is gone is removed.
pub fn refresh_node_addresses(
    ebpf: &mut Ebpf,
    config: &Config,
    index: usize,
    written: &mut BTreeMap<usize, BTreeSet<(IpAddr, u16)>>,
) -> Result<(), TrackerError> {
    let backend = &config.backends[index];
    if backend.address_bound() {
        return Ok(());
    }
    let node = node_addresses()?;
    let wanted: BTreeSet<(IpAddr, u16)> = node
        .iter()
        .flat_map(|&addr| backend.ports.iter().map(move |&port| (addr, port)))
        .collect();
    let mut addresses = addresses(ebpf)?;
    let before = written.entry(index).or_default();
    for &(addr, port) in before.difference(&wanted) {
        let _ = addresses.remove(&key(addr, port));
    }
    for &(addr, port) in &wanted {
        addresses
            .insert(key(addr, port), index as u32 + 1, 0)
            .map_err(read_error("the backends' addresses"))?;
    }
    *before = wanted;
    Ok(())
}

/// Every address of the node's interfaces (this network namespace), IPv4 as IPv4.
pub fn node_addresses() -> Result<BTreeSet<IpAddr>, TrackerError> {
    let interfaces = nix::ifaddrs::getifaddrs().map_err(|err| TrackerError::Read {
        what: "the node's addresses (getifaddrs)",
        source: Box::new(err),
    })?;
    Ok(interfaces
        .filter_map(|interface| interface.address)
        .filter_map(|address| {
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .map(|addr| addr.to_canonical())
        .collect())
}

fn addresses(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, ServiceAddress, u32>, TrackerError> {
    HashMap::try_from(map_mut(ebpf, names::BACKEND_ADDRESSES)?).map_err(load_error)
}

/// The map key of `addr:port`: IPv4 IPv4-mapped, as the programs store it.
pub fn key(addr: IpAddr, port: u16) -> ServiceAddress {
    let addr = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    ServiceAddress {
        addr,
        port,
        padding: [0; 2],
    }
}
