//! The handover's steering, userspace side: attaches the `sk_lookup` program to the agent's
//! network namespace (as a link: it goes with the agent, and the kernel's own lookup takes
//! over), and writes where each backend's new connections go (docs/handover.md).

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, SockHash},
    programs::SkLookup,
};
use drain_agent_common::{
    names,
    steer::{Steering, socket_key},
};
use tracing::debug;

use super::{
    TrackerError,
    ebpf::{load_error, map_mut, program_mut},
};
use crate::{config::Config, status::Attachment};

/// Whether any backend hands over: only then is the program attached.
pub fn wanted(config: &Config) -> bool {
    config
        .backends
        .iter()
        .any(|backend| backend.handover.is_some())
}

/// Loads the program and attaches it to this network namespace.
pub fn attach(ebpf: &mut Ebpf) -> Result<Attachment, TrackerError> {
    let program: &mut SkLookup = program_mut(ebpf, names::STEER_PROGRAM)?;
    program.load().map_err(load_error)?;
    let program_id = program.info().map_err(load_error)?.id();
    let netns = File::open("/proc/self/ns/net").map_err(|err| TrackerError::Attach {
        interface: "network namespace".to_string(),
        direction: "sk_lookup",
        source: Box::new(err),
    })?;
    program
        .attach(netns.as_fd())
        .map_err(|err| TrackerError::Attach {
            interface: "network namespace".to_string(),
            direction: "sk_lookup",
            source: Box::new(err),
        })?;
    debug!(
        program_id,
        "attached the handover's sk_lookup program as a link"
    );
    Ok(Attachment {
        interface: "netns".to_string(),
        direction: "steer".to_string(),
        program_id,
        mode: None,
    })
}

/// Writes backend `index`'s steering.
pub fn set(ebpf: &mut Ebpf, index: usize, steering: Steering) -> Result<(), TrackerError> {
    let mut map: Array<&mut MapData, Steering> =
        Array::try_from(map_mut(ebpf, names::STEERING)?).map_err(load_error)?;
    map.set(index as u32, steering, 0).map_err(load_error)
}

/// Puts a listening socket in the steering map as `instance`'s listener of `port`.
pub fn add_socket(
    ebpf: &mut Ebpf,
    port: u16,
    ipv6: bool,
    instance: u32,
    socket: &std::os::fd::OwnedFd,
) -> Result<(), TrackerError> {
    let mut map: SockHash<&mut MapData, u32> =
        SockHash::try_from(map_mut(ebpf, names::STEER_SOCKETS)?).map_err(load_error)?;
    map.insert(socket_key(port, ipv6, instance), socket.as_raw_fd(), 0)
        .map_err(load_error)
}

/// Takes `instance`'s listener of `port` out of the steering map (absent is fine).
pub fn remove_socket(
    ebpf: &mut Ebpf,
    port: u16,
    ipv6: bool,
    instance: u32,
) -> Result<(), TrackerError> {
    let mut map: SockHash<&mut MapData, u32> =
        SockHash::try_from(map_mut(ebpf, names::STEER_SOCKETS)?).map_err(load_error)?;
    match map.remove(&socket_key(port, ipv6, instance)) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(err))
            if err.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(err) => Err(load_error(err)),
    }
}
