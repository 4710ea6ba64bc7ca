//! Degraded mode: established connections per backend from the socket table. No kernel
//! programs, so in-flight, idle and the totals are unknown (`null` in status).

use std::collections::HashMap;

use procfs::net::TcpState;

use super::{BackendSample, TrackerError, sockets};
use crate::config::Config;

/// Counts established sockets on the configured ports.
pub struct ProcfsTracker {
    /// Local port → backend index.
    backend_of_port: HashMap<u16, usize>,
    backends: usize,
}

impl ProcfsTracker {
    pub fn new(config: &Config) -> ProcfsTracker {
        ProcfsTracker {
            backend_of_port: config
                .backends
                .iter()
                .enumerate()
                .flat_map(|(index, backend)| backend.ports.iter().map(move |&port| (port, index)))
                .collect(),
            backends: config.backends.len(),
        }
    }

    pub fn sample(&self) -> Result<Vec<BackendSample>, TrackerError> {
        let mut samples = vec![BackendSample::default(); self.backends];
        for socket in sockets::tcp_sockets()? {
            if socket.state != TcpState::Established {
                continue;
            }
            if let Some(&backend) = self.backend_of_port.get(&socket.local.port()) {
                samples[backend].established += 1;
            }
        }
        // Without the kernel programs nothing is known about any connection.
        for sample in &mut samples {
            sample.unknown = Some(sample.established);
        }
        Ok(samples)
    }
}
