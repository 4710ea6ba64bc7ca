//! The old version's keep-alive connections across its stop (docs/handover.md).
//!
//! A server that stops closes its idle keep-alive connections, and a request a client sends
//! on one at that moment is lost: HTTP/1.1 has no race-free way for a server to close a
//! persistent connection, and HAProxy's pool reuses its idle connections to the old version
//! for as long as they are open. So the agent takes a copy of each of the old version's
//! connections before it stops it. A copy keeps the connection open when the old process
//! exits, and the client sees nothing: a connection whose response carried
//! `Connection: close` is closed by the client, as it would be anyway; on any other, the
//! next request is relayed, byte for byte, to the new version over a connection of its own
//! (the steering sends it there), until either side closes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use procfs::net::TcpState;
use tracing::{debug, warn};

use crate::{config::Backend, kernel::listeners};

/// One connection of the old version, held by the agent.
pub struct Held {
    local: SocketAddr,
    socket: OwnedFd,
}

/// Copies of every established connection the processes `pids` hold on `backend`'s addresses
/// and ports.
pub fn hold(pids: &[i32], backend: &Backend) -> Vec<Held> {
    let established: BTreeMap<u64, SocketAddr> = procfs::net::tcp()
        .into_iter()
        .chain(procfs::net::tcp6())
        .flatten()
        .filter(|entry| entry.state == TcpState::Established && backend.serves(entry.local_address))
        .map(|entry| (entry.inode, entry.local_address))
        .collect();
    let mut held = BTreeMap::new();
    for &pid in pids {
        let Ok(fds) = procfs::process::Process::new(pid).and_then(|process| process.fd()) else {
            continue;
        };
        for fd in fds.flatten() {
            let procfs::process::FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            let Some(&local) = established.get(&inode) else {
                continue;
            };
            if held.contains_key(&inode) {
                continue;
            }
            match listeners::take(local, pid, fd.fd) {
                Ok(socket) => {
                    held.insert(inode, Held { local, socket });
                }
                Err(err) => warn!(%err, "cannot hold a connection of the old version"),
            }
        }
    }
    held.into_values().collect()
}

/// Keeps each held connection open and relays what arrives on it to the new version; a
/// connection nothing arrives on within `unused_for` is closed. Returns how many connections
/// were relayed so far (it grows while the relays run).
pub fn relay(held: Vec<Held>, unused_for: Duration) -> Arc<AtomicU64> {
    let relayed = Arc::new(AtomicU64::new(0));
    for Held { local, socket } in held {
        let relayed = relayed.clone();
        tokio::spawn(async move {
            let std_stream = std::net::TcpStream::from(socket);
            if std_stream.set_nonblocking(true).is_err() {
                return;
            }
            let Ok(mut client) = tokio::net::TcpStream::from_std(std_stream) else {
                return;
            };
            let mut first = [0u8; 1];
            match tokio::time::timeout(unused_for, client.peek(&mut first)).await {
                // Nothing came, or the client closed it (it read `Connection: close`).
                Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
            }
            // To the service's own address: the steering (or, once it is released, the only
            // listener left) takes it to the new version.
            let mut upstream = match tokio::net::TcpStream::connect(local).await {
                Ok(upstream) => upstream,
                Err(err) => {
                    warn!(%local, %err, "cannot relay a kept-alive connection to the new version");
                    return;
                }
            };
            relayed.fetch_add(1, Ordering::Relaxed);
            let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            debug!(%local, ?copied, "relayed a kept-alive connection of the old version");
        });
    }
    relayed
}
