//! The listening sockets of a backend's ports and the processes that hold them: how the
//! handover tells the running version from the one it starts, and takes a copy of each
//! listener for the steering map (`pidfd_getfd`, kernel >= 5.6, with the agent's
//! CAP_SYS_PTRACE over the service's processes).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use procfs::net::TcpState;

use crate::config::Backend;

/// One listening socket of this network namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub local: SocketAddr,
    pub inode: u64,
}

impl Listener {
    pub fn ipv6(&self) -> bool {
        self.local.is_ipv6()
    }
}

/// Why a listener could not be found or taken.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no process holds the listening socket {local} (inode {inode})")]
    NoHolder { local: SocketAddr, inode: u64 },
    #[error(
        "cannot take a copy of the listening socket {local} from pid {pid} (pidfd_getfd needs \
         kernel >= 5.6 and CAP_SYS_PTRACE over the service)"
    )]
    Take {
        local: SocketAddr,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Every listening TCP socket on `ports`, IPv4 and IPv6.
pub fn on_ports(ports: &[u16]) -> Result<Vec<Listener>, ListenerError> {
    let read = |what: &str, table: procfs::ProcResult<Vec<procfs::net::TcpNetEntry>>| {
        table.map_err(|err| ListenerError::Read {
            what: what.to_string(),
            source: Box::new(err),
        })
    };
    let mut found: Vec<Listener> = read("/proc/net/tcp", procfs::net::tcp())?
        .into_iter()
        .chain(read("/proc/net/tcp6", procfs::net::tcp6())?)
        .filter(|entry| {
            entry.state == TcpState::Listen && ports.contains(&entry.local_address.port())
        })
        .map(|entry| Listener {
            local: entry.local_address,
            inode: entry.inode,
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The listening sockets of `backend`: on its addresses and ports. Another listener on the
/// same port at another address (HAProxy's frontend on the VIP) is not the backend's.
pub fn of_backend(backend: &Backend) -> Result<Vec<Listener>, ListenerError> {
    Ok(on_ports(&backend.ports)?
        .into_iter()
        .filter(|listener| backend.serves(listener.local))
        .collect())
}

/// The listening sockets on `backend`'s ports that are not the backend's.
pub fn others_on_ports(backend: &Backend) -> Result<Vec<Listener>, ListenerError> {
    Ok(on_ports(&backend.ports)?
        .into_iter()
        .filter(|listener| !backend.serves(listener.local))
        .collect())
}

/// Per socket inode among `inodes`, the processes holding it and the fd each holds it as.
pub fn holders(inodes: &BTreeSet<u64>) -> BTreeMap<u64, Vec<(i32, RawFd)>> {
    let mut found: BTreeMap<u64, Vec<(i32, RawFd)>> = BTreeMap::new();
    let Ok(processes) = procfs::process::all_processes() else {
        return found;
    };
    for process in processes.flatten() {
        // Processes that end meanwhile, or kernel threads, have no fds to read.
        let Ok(fds) = process.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target
                && inodes.contains(&inode)
            {
                found.entry(inode).or_default().push((process.pid, fd.fd));
            }
        }
    }
    found
}

/// The process that owns a listener among those holding it: the one whose parent does not
/// hold it too (a pre-fork server's master, not its workers).
pub fn owner(holding: &[(i32, RawFd)]) -> Option<i32> {
    let pids: BTreeSet<i32> = holding.iter().map(|&(pid, _)| pid).collect();
    pids.iter()
        .copied()
        .find(|&pid| parent(pid).is_none_or(|parent| !pids.contains(&parent)))
        .or_else(|| pids.first().copied())
}

/// The parent of `pid`, if it still runs.
pub fn parent(pid: i32) -> Option<i32> {
    procfs::process::Process::new(pid)
        .and_then(|process| process.stat())
        .ok()
        .map(|stat| stat.ppid)
}

/// A copy of another process's fd (`pidfd_getfd`): the same socket, held by the agent.
pub fn take(local: SocketAddr, pid: i32, fd: RawFd) -> Result<OwnedFd, ListenerError> {
    let fail = |source| ListenerError::Take { local, pid, source };
    // SAFETY: plain syscalls with integer arguments; each returned fd is checked and owned.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd from the kernel, owned from here on.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    use std::os::fd::AsRawFd as _;
    // SAFETY: as above.
    let taken = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if taken < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(taken as RawFd) })
}

/// Whether a socket has SO_REUSEPORT set: a new version can listen on the same port only if
/// the running one's socket has it (and the new one's too).
pub fn reuses_port(socket: &OwnedFd) -> bool {
    nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::ReusePort).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_found_with_its_holder_and_taken() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let found = on_ports(&[port]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        let inodes = found.iter().map(|listener| listener.inode).collect();
        let holding = holders(&inodes);
        let me = std::process::id() as i32;
        let (pid, fd) = holding[&found[0].inode][0];
        assert_eq!(pid, me);
        assert_eq!(owner(&holding[&found[0].inode]), Some(me));
        let copy = take(found[0].local, pid, fd).unwrap();
        assert!(!reuses_port(&copy));
    }
}
